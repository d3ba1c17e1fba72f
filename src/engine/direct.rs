//! The direct path of a lone send or receive: a blocking `send`/`recv` of one small frame on a
//! shared-memory or TCP link, in a world with nothing else in flight, is done right here, under
//! the world's lock, without an operation object, a plan or a completion: the frame goes
//! straight into the ring or socket, or comes straight out of it into the caller's buffer.
//!
//! It is taken only when the result is exactly what the general path would produce: nothing
//! posted before it (so order between calls holds), no frame of this peer waiting elsewhere
//! (an earlier frame in flight, frames moved out of the link early), and, for a receive, a frame
//! at the head of the link whose every field (world, generation, operation, sequence, type,
//! count, offset, length) is the one the general path would expect, with all of its payload
//! arrived. Anything else, including a full ring or socket, a heartbeat, a checksummed frame or a
//! broken world, leaves every state as it was and answers [`Direct::No`] (or, for a receive
//! whose frame is not all there yet, [`Direct::Later`]): the caller then posts the call as
//! usual, and the general path handles it, reporting mismatches and failures as it always does.
//! (A peeked frame stays peeked: the link shows the general path the same header again.) The one
//! change before a `No` is a link that failed under the direct path: the world breaks then, as
//! the general path would break it.
//!
//! A socket may take only part of a frame (its buffer filled up mid-write): the rest of the frame
//! is copied and left to the general path as the peer's frame in flight, with a completion of
//! its own ([`Direct::Writing`]; [`Engine::has_work`] counts it), and the caller waits for that
//! as for any posted send: the send returns once the whole frame is in the socket, or fails
//! with the world, as on the general path.

use super::*;

/// What the direct path did with a call.
#[derive(Clone)]
pub(crate) enum Direct {
    /// Done: the call succeeded.
    Done,
    /// A send whose frame a socket took only in part: done when this completes (the rest is
    /// the peer's frame in flight).
    Writing(Arc<Completion>),
    /// A receive whose frame is not all in the link yet, all else being right: worth another
    /// look.
    Later,
    /// Not for the direct path (nothing was changed): post the call.
    No,
}

impl Engine {
    /// Runs a lone send or receive at once if it can be, as described above.
    pub(crate) fn run_direct(&mut self, desc: &OpDesc, send: RawBuf, recv: RawBuf) -> Direct {
        if self.broken.is_some() || !self.ops.is_empty() || desc.kind != OpKind::P2p {
            return Direct::No;
        }
        match self.p2p_direct(desc, send, recv) {
            Some(Direct::Later) => Direct::Later,
            Some(d) => {
                self.stats.ops_completed += 1;
                self.stats.direct_ops += 1;
                d
            }
            None => Direct::No,
        }
    }

    /// What became of the call (`Done`, `Writing` or `Later`); `None`: not for this path.
    fn p2p_direct(&mut self, desc: &OpDesc, send: RawBuf, recv: RawBuf) -> Option<Direct> {
        let len = desc.bytes();
        let peer = desc.root;
        let p = self.peers.get_mut(peer)?.as_mut()?;
        // One small frame at most (one ring slot): a larger message is not done in one step.
        if p.gone.is_some() || len > p.link.direct_max() || p.checksum {
            return None;
        }
        // The only frame of a message of one frame: what the general path sends, and expects.
        let only_frame = |e: &Self, seq| e.frame_header(desc, seq, 0, 0, len, len);
        if desc.is_send {
            if p.tx.is_some() || !p.tx_queue.is_empty() {
                return None;
            }
            // SAFETY: the caller's buffer, alive and unchanged for the whole call.
            let payload = unsafe { send.bytes(0, len) }?;
            let seq = p.tx_seq + 1;
            let header = only_frame(self, seq).encode();
            let p = self.peers[peer].as_mut()?;
            let mut written = 0;
            // A ring frame goes in whole or not at all: a full ring changes nothing. A socket
            // may take part of it: the rest goes out as the peer's frame in flight.
            let r = p.link.write(&header, payload, &mut written);
            let done = if matches!(r, Ok(false)) && written > 0 {
                let rest = Completion::new();
                let done = TxDone::Rest(rest.clone());
                p.tx = Some(TxFrame { header, payload: TxPayload::Owned(payload.to_vec()), written, done });
                Direct::Writing(rest)
            } else {
                self.link_step(peer, r)?;
                Direct::Done
            };
            self.peers[peer].as_mut()?.tx_seq = seq;
            self.stats.bytes_sent += len as u64;
            Some(done)
        } else {
            if p.paused || !p.rx_queue.is_empty() || !p.unexpected.is_empty() {
                return None;
            }
            let h = match p.link.peek() {
                Ok(Some(h)) => h,
                Ok(None) => return Some(Direct::Later),
                Err(_) => return None,
            };
            let seq = p.rx_seq + 1;
            if h != only_frame(self, seq) {
                return None;
            }
            let ready = self.peers[peer].as_mut()?.link.payload_ready();
            if matches!(ready, Ok(false)) {
                return Some(Direct::Later);
            }
            self.link_step(peer, ready)?;
            // SAFETY: the caller's buffer, exclusively theirs for the whole call.
            let dst = unsafe { recv.bytes_mut(0, len) }?;
            let r = self.peers[peer].as_mut()?.link.consume(Sink::Copy(dst));
            self.link_step(peer, r)?;
            self.peers[peer].as_mut()?.rx_seq = seq;
            self.stats.bytes_received += len as u64;
            Some(Direct::Done)
        }
    }

    /// The outcome of one write or read of the direct path: `Some` when it completed, `None`
    /// when it could not (nothing changed). A link error may come after the frame went in or
    /// out (a doorbell to a peer that is gone), so it breaks the world here, as the general
    /// path would.
    fn link_step(&mut self, peer: usize, r: Result<bool, LinkError>) -> Option<()> {
        match r {
            Ok(true) => Some(()),
            Ok(false) => None,
            Err(e) => {
                self.fail(link_cause(peer, e));
                None
            }
        }
    }
}
