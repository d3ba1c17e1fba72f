//! Frames through in-process queues: a rank's link to itself (send/recv to self inside a
//! group), and, for tests, a pair of linked queues that can be cut or closed to simulate a
//! lost network or a dead peer without any socket.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use super::{Armed, Link, LinkError, Sink, TransportKind};
use crate::engine::wire::{FrameHeader, OpKind, HEADER_LEN};
use crate::sys::sync::{lock, Arc, Mutex};

#[derive(Default)]
struct Queue {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    /// The writing side is gone.
    closed: bool,
}

/// One direction's state, shared by writer and reader.
type Shared = Arc<Mutex<Queue>>;

/// Knobs that tests turn on a pair link.
#[derive(Default)]
pub(crate) struct Faults {
    /// Everything written is silently dropped (a network partition).
    pub cut: bool,
    /// Rewrites the header of every data frame written (a peer that lies, or bits flipped).
    pub tamper: Option<fn(&mut FrameHeader)>,
    /// Flips one bit of the payload of every data frame written (corruption on the way).
    pub flip_payload: bool,
}

pub(crate) struct QueueLink {
    kind: TransportKind,
    rx: Shared,
    tx: Shared,
    /// Most bytes queued toward the peer before writes report "would block".
    cap: usize,
    faults: Arc<Mutex<Faults>>,
    traffic: (u64, u64),
    /// Frames queued, when this link is its own peer (only it writes and reads the queue, so
    /// it can answer "nothing queued" without taking the lock).
    solo_queued: Option<usize>,
}

impl QueueLink {
    /// The link from a rank to itself: what it writes it reads back.
    pub(crate) fn loopback() -> QueueLink {
        let q: Shared = Arc::new(Mutex::new(Queue::default()));
        QueueLink {
            kind: TransportKind::Loopback,
            rx: q.clone(),
            tx: q,
            cap: usize::MAX,
            faults: Arc::new(Mutex::new(Faults::default())),
            traffic: (0, 0),
            solo_queued: Some(0),
        }
    }

    /// Two connected links (tests): `cap` bytes may be in flight each way; the returned
    /// `Faults` controls both directions.
    #[cfg(test)]
    pub(crate) fn pair(cap: usize) -> (QueueLink, QueueLink, Arc<Mutex<Faults>>) {
        let a: Shared = Arc::new(Mutex::new(Queue::default()));
        let b: Shared = Arc::new(Mutex::new(Queue::default()));
        let faults = Arc::new(Mutex::new(Faults::default()));
        let mk = |rx: &Shared, tx: &Shared| QueueLink {
            kind: TransportKind::Memory,
            rx: rx.clone(),
            tx: tx.clone(),
            cap,
            faults: faults.clone(),
            traffic: (0, 0),
            solo_queued: None,
        };
        (mk(&a, &b), mk(&b, &a), faults)
    }
}

impl Drop for QueueLink {
    fn drop(&mut self) {
        lock(&self.tx).closed = true;
    }
}

impl Link for QueueLink {
    fn kind(&self) -> TransportKind {
        self.kind
    }

    fn max_payload(&self, _op: OpKind, _total: usize) -> usize {
        64 << 10
    }

    fn write(&mut self, header: &[u8], payload: &[u8], written: &mut usize) -> Result<bool, LinkError> {
        debug_assert_eq!(*written, 0);
        let mut q = lock(&self.tx);
        if q.bytes > self.cap {
            return Ok(false);
        }
        let mut f = Vec::with_capacity(header.len() + payload.len());
        f.extend_from_slice(header);
        let tamper = lock(&self.faults).tamper;
        if let Some(t) = tamper {
            if let Ok(mut h) = FrameHeader::decode(&f[..HEADER_LEN]) {
                if h.kind == crate::engine::wire::FrameKind::Data {
                    t(&mut h);
                    f[..HEADER_LEN].copy_from_slice(&h.encode());
                }
            }
        }
        f.extend_from_slice(payload);
        if lock(&self.faults).flip_payload
            && f.len() > HEADER_LEN
            && f[4] & 0x7f == crate::engine::wire::FrameKind::Data as u8
        {
            f[HEADER_LEN] ^= 0x10;
        }
        *written = f.len();
        self.traffic.1 += f.len() as u64;
        if !lock(&self.faults).cut {
            q.bytes += f.len();
            q.frames.push_back(f);
            if let Some(n) = self.solo_queued.as_mut() {
                *n += 1;
            }
        }
        Ok(true)
    }

    fn peek(&mut self) -> Result<Option<FrameHeader>, LinkError> {
        if self.solo_queued == Some(0) {
            return Ok(None);
        }
        let q = lock(&self.rx);
        match q.frames.front() {
            Some(f) => FrameHeader::decode(&f[..HEADER_LEN]).map(Some).map_err(LinkError::Protocol),
            None if q.closed => Err(LinkError::Closed("peer closed".into())),
            None => Ok(None),
        }
    }

    fn consume(&mut self, sink: Sink<'_>) -> Result<bool, LinkError> {
        let mut q = lock(&self.rx);
        let f = q.frames.pop_front().ok_or_else(|| LinkError::Io("consume without a frame".into()))?;
        q.bytes -= f.len();
        if let Some(n) = self.solo_queued.as_mut() {
            *n -= 1;
        }
        drop(q);
        self.traffic.0 += f.len() as u64;
        let payload = &f[HEADER_LEN..];
        match sink {
            Sink::Copy(dst) if dst.len() != payload.len() => {
                return Err(LinkError::Io("copy target does not match the payload".into()))
            }
            Sink::Copy(dst) => dst.copy_from_slice(payload),
            Sink::Visit(v) => v(payload),
            Sink::Discard => {}
        }
        Ok(true)
    }

    fn traffic(&self) -> (u64, u64) {
        // A frame counts as received when peeked, so that liveness sees it before consumption.
        let queued = lock(&self.rx).frames.front().map_or(0, |f| f.len() as u64);
        (self.traffic.0 + queued, self.traffic.1)
    }

    fn arm(&mut self, read: bool, _write: bool) -> Armed {
        if read && !lock(&self.rx).frames.is_empty() {
            Armed::Ready
        } else {
            Armed::Idle
        }
    }

    fn hangup_fd(&mut self, _idle: bool) -> Option<(RawFd, i16)> {
        None
    }
}
