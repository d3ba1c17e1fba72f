//! The shared-memory transport, for peers on the same host.
//!
//! One segment per peer pair holds two rings (one per direction) of fixed-size slots; a frame
//! is one slot. The writer copies header and payload into a free slot and publishes it; the
//! reader looks at the slot in place — a plain copy goes straight to the destination, a
//! reduction reads its operand straight from the ring — and releases it. Both sides spin
//! briefly when there is nothing to do, then sleep on the pair's TCP socket, which after the
//! handshake carries only doorbell bytes and, by closing, the news that the peer died
//! (`ring.rs` has the protocol and its loom models).
//!
//! The segment is a file in `/dev/shm` made with `O_EXCL` and mode 0600 by the higher rank,
//! opened by the lower rank, and unlinked as soon as both have mapped it (or the set-up
//! failed), so nothing else can open it and nothing is left behind. Its pages are reserved
//! before it is mapped, so a full `/dev/shm` fails the set-up instead of raising `SIGBUS`
//! later. If anything in the set-up fails, the pair uses TCP instead, and the world counts it
//! in `WorldStats::shm_fallbacks`.

pub(crate) mod ring;
mod segment;

pub(crate) use segment::Segment;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

use super::{Armed, Link, LinkError, Sink, TransportKind};
use crate::engine::wire::{FrameHeader, HEADER_LEN};
use crate::transport::shm::ring::{RingCtrl, CTRL_BYTES};

/// Slots per ring.
const SLOTS: u64 = 8;
/// Largest payload of one frame (one slot).
pub(crate) const SHM_MAX_PAYLOAD: usize = 32 << 10;
const SLOT_BYTES: usize = HEADER_LEN + SHM_MAX_PAYLOAD;
/// The two control blocks sit in the first page; the rings follow.
const RINGS_AT: usize = 4096;
const RING_BYTES: usize = SLOTS as usize * SLOT_BYTES;
/// Size of a pair's segment.
pub(crate) const SEGMENT_BYTES: usize = RINGS_AT + 2 * RING_BYTES;

pub(crate) struct ShmLink {
    ctl: TcpStream,
    seg: Segment,
    tx: usize,
    rx: usize,
    /// The frame being read and its slot.
    current: Option<(FrameHeader, u64)>,
    /// We slept on the socket since we last looked at it: read the doorbells (or its end).
    armed: bool,
    /// The socket ended: the peer is gone. Frames still in the ring can be read.
    hung_up: bool,
    rx_seen: u64,
    traffic: (u64, u64),
}

fn closed(e: io::Error) -> LinkError {
    LinkError::Closed(e.to_string())
}

impl ShmLink {
    /// A link over `seg`; the higher rank of the pair (`creator`) writes ring 0.
    pub(crate) fn new(ctl: TcpStream, seg: Segment, creator: bool) -> io::Result<ShmLink> {
        ctl.set_nonblocking(true)?;
        ctl.set_nodelay(true)?;
        let (tx, rx) = if creator { (0, 1) } else { (1, 0) };
        Ok(ShmLink { ctl, seg, tx, rx, current: None, armed: false, hung_up: false, rx_seen: 0, traffic: (0, 0) })
    }

    fn ctrl(&self, ring: usize) -> &RingCtrl {
        // SAFETY: the segment is SEGMENT_BYTES long and page aligned; control block `ring`
        // (0 or 1) lies in its first page, suitably aligned, and a zeroed block is valid.
        unsafe { &*(self.seg.map.as_ptr().add(ring * CTRL_BYTES) as *const RingCtrl) }
    }

    /// Slot `slot` of ring `ring`, as raw bytes.
    fn slot_ptr(&self, ring: usize, slot: u64) -> *mut u8 {
        let at = RINGS_AT + ring * RING_BYTES + (slot % SLOTS) as usize * SLOT_BYTES;
        // SAFETY: `at + SLOT_BYTES <= SEGMENT_BYTES` for every ring and slot index.
        unsafe { self.seg.map.as_ptr().add(at) as *mut u8 }
    }

    fn corrupt() -> LinkError {
        LinkError::Protocol("shared ring counters are inconsistent".into())
    }

    fn doorbell(&self) -> Result<(), LinkError> {
        match (&self.ctl).write(&[1]) {
            Ok(_) => Ok(()),
            // A full socket already holds doorbells enough.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(closed(e)),
        }
    }

    /// Reads pending doorbell bytes, and notes whether the socket reports the peer's end.
    fn drain_doorbells(&mut self) {
        let mut buf = [0u8; 256];
        loop {
            match (&self.ctl).read(&mut buf) {
                Ok(0) => break self.hung_up = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break self.hung_up = true,
            }
        }
    }

    fn gone() -> LinkError {
        LinkError::Closed("peer closed the connection".into())
    }
}

impl Link for ShmLink {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn max_payload(&self) -> usize {
        SHM_MAX_PAYLOAD
    }

    fn write(&mut self, header: &[u8], payload: &[u8], written: &mut usize) -> Result<bool, LinkError> {
        if header.len() != HEADER_LEN || payload.len() > SHM_MAX_PAYLOAD {
            return Err(LinkError::Io("frame does not fit a slot".into()));
        }
        if self.hung_up {
            return Err(Self::gone());
        }
        let ring = self.ctrl(self.tx);
        let Some(slot) = ring.free_slot(SLOTS).map_err(|_| Self::corrupt())? else {
            return Ok(false);
        };
        let p = self.slot_ptr(self.tx, slot);
        // SAFETY: the ring protocol gives this slot to the producer alone until it is
        // published; header and payload fit the slot (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(header.as_ptr(), p, HEADER_LEN);
            std::ptr::copy_nonoverlapping(payload.as_ptr(), p.add(HEADER_LEN), payload.len());
        }
        if self.ctrl(self.tx).publish(slot) {
            self.doorbell()?;
        }
        *written = HEADER_LEN + payload.len();
        self.traffic.1 += *written as u64;
        Ok(true)
    }

    fn peek(&mut self) -> Result<Option<FrameHeader>, LinkError> {
        if let Some((h, _)) = self.current {
            return Ok(Some(h));
        }
        if std::mem::take(&mut self.armed) {
            self.drain_doorbells();
        }
        let published = self.ctrl(self.rx).published();
        if published != self.rx_seen {
            self.rx_seen = published;
            self.traffic.0 += 1;
        }
        let slot = match self.ctrl(self.rx).full_slot(SLOTS).map_err(|_| Self::corrupt())? {
            Some(s) => s,
            // Everything the peer sent has been read: if it is gone, that is the end.
            None if self.hung_up => return Err(Self::gone()),
            None => return Ok(None),
        };
        let p = self.slot_ptr(self.rx, slot);
        // SAFETY: a published slot belongs to the consumer until released; its header bytes
        // are in bounds.
        let hb = unsafe { std::slice::from_raw_parts(p, HEADER_LEN) };
        let h = FrameHeader::decode(hb).map_err(LinkError::Protocol)?;
        if h.len as usize > SHM_MAX_PAYLOAD {
            return Err(LinkError::Protocol(format!("frame of {} bytes is over the slot size", h.len)));
        }
        self.current = Some((h, slot));
        Ok(Some(h))
    }

    fn consume(&mut self, sink: Sink<'_>) -> Result<bool, LinkError> {
        let Some((h, slot)) = self.current.take() else {
            return Err(LinkError::Io("consume without a peeked frame".into()));
        };
        let len = h.len as usize;
        let p = self.slot_ptr(self.rx, slot);
        // SAFETY: as in peek; the payload length was checked against the slot size.
        let payload = unsafe { std::slice::from_raw_parts(p.add(HEADER_LEN), len) };
        match sink {
            Sink::Copy(dst) if dst.len() != len => {
                self.current = Some((h, slot));
                return Err(LinkError::Io("copy target does not match the payload".into()));
            }
            Sink::Copy(dst) => dst.copy_from_slice(payload),
            Sink::Visit(f) => f(payload),
            Sink::Discard => {}
        }
        if self.ctrl(self.rx).release(slot) {
            self.doorbell()?;
        }
        Ok(true)
    }

    fn traffic(&self) -> (u64, u64) {
        self.traffic
    }

    fn arm(&mut self, read: bool, write: bool) -> Armed {
        let fd = self.ctl.as_raw_fd();
        if self.hung_up {
            // The socket stays readable for ever now; only the ring can change, and it cannot.
            return Armed::Idle;
        }
        if read && self.current.is_none() && !self.ctrl(self.rx).consumer_may_sleep(SLOTS) {
            return Armed::Ready;
        }
        if write && !self.ctrl(self.tx).producer_may_sleep(SLOTS) {
            return Armed::Ready;
        }
        self.armed = true;
        Armed::Wait(fd, libc::POLLIN | libc::POLLRDHUP)
    }

    fn hangup_fd(&mut self) -> Option<(RawFd, i16)> {
        self.armed = true;
        Some((self.ctl.as_raw_fd(), libc::POLLRDHUP))
    }

    fn spins(&self) -> bool {
        true
    }

    fn drain_early_frames(&self) -> bool {
        // Move frames out only when the ring is full, so that a peer that sends ahead is never
        // stuck behind receives not yet posted (up to the engine's early-frame limit).
        matches!(self.ctrl(self.rx).full_slot(SLOTS), Ok(Some(_))) && self.ctrl(self.rx).in_use(SLOTS) >= SLOTS
    }

    fn shutdown(&mut self) {
        // Frames already in the ring stay readable; the socket's end tells the peer we left
        // once it has drained them.
        let _ = self.ctl.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 256];
        while matches!((&self.ctl).read(&mut sink), Ok(n) if n > 0) {}
    }
}
