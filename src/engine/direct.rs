//! The direct path of a lone send or receive: a blocking `send`/`recv` on a shared-memory link,
//! in a world with nothing else in flight, is done right here, under the world's lock, without
//! an operation object, a plan or a completion: the frame goes straight into the ring, or comes
//! straight out of it into the caller's buffer.
//!
//! It is taken only when the result is exactly what the general path would produce: nothing
//! posted before it (so order between calls holds), no frame of this peer waiting elsewhere
//! (an earlier frame in flight, frames moved out of the ring early), and, for a receive, a frame
//! at the head of the ring whose every field (world, generation, operation, sequence, type,
//! count, offset, length) is the one the general path would expect. Anything else, including a
//! full ring, a heartbeat, a checksummed frame or a broken world, leaves every state as it was
//! and answers [`Direct::No`] (or, for a receive whose frame is not there yet, [`Direct::Later`]):
//! the caller then posts the call as usual, and the general path handles it, reporting
//! mismatches and failures as it always does. The one change before a `No` is a link that
//! failed under the direct path: the world breaks then, as the general path would break it.

use super::*;
use crate::transport::shm::SHM_MAX_PAYLOAD;

/// What the direct path did with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direct {
    /// Done: the call succeeded.
    Done,
    /// A receive whose frame is not in the ring yet, all else being right: worth another look.
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
            Some(true) => {
                self.stats.ops_completed += 1;
                self.stats.direct_ops += 1;
                Direct::Done
            }
            Some(false) => Direct::Later,
            None => Direct::No,
        }
    }

    /// `Some(true)` done, `Some(false)` a receive whose frame is not there yet, `None` not for
    /// this path.
    fn p2p_direct(&mut self, desc: &OpDesc, send: RawBuf, recv: RawBuf) -> Option<bool> {
        let (tag, generation) = (world_tag(self.cfg.world_id), self.cfg.generation);
        let len = desc.bytes();
        // One ring slot at most: a larger frame (several frames, or single copy) is not done
        // in one step.
        if len > SHM_MAX_PAYLOAD {
            return None;
        }
        let p = self.peers.get_mut(desc.root)?.as_mut()?;
        if p.gone.is_some() || p.link.kind() != TransportKind::Shm || p.checksum {
            return None;
        }
        if desc.is_send {
            if p.tx.is_some() || !p.tx_queue.is_empty() {
                return None;
            }
            // SAFETY: the caller's buffer, alive and unchanged for the whole call.
            let payload = unsafe { send.bytes(0, len) }?;
            let seq = p.tx_seq + 1;
            let header = FrameHeader {
                kind: FrameKind::Data,
                op: Some(OpKind::P2p),
                dtype: desc.dtype as u8,
                redop: 0,
                generation,
                msg: 0,
                world: tag,
                crc: None,
                seq,
                count: desc.count as u64,
                root: 0,
                len: len as u32,
                offset: 0,
                total: len as u64,
            }
            .encode();
            let mut written = 0;
            // A ring frame goes in whole or not at all: a full ring changes nothing. An error
            // may come after the frame went in (its doorbell failed: the peer is gone), so it
            // breaks the world here, as the general path would.
            match p.link.write(&header, payload, &mut written) {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    let cause = link_cause(desc.root, e);
                    self.fail(cause);
                    return None;
                }
            }
            p.tx_seq = seq;
            self.stats.bytes_sent += len as u64;
        } else {
            if p.paused || !p.rx_queue.is_empty() || !p.unexpected.is_empty() {
                return None;
            }
            let h = match p.link.peek() {
                Ok(Some(h)) => h,
                Ok(None) => return Some(false),
                Err(_) => return None,
            };
            let expected = h.kind == FrameKind::Data
                && h.world == tag
                && h.generation == generation
                && h.op == Some(OpKind::P2p)
                && h.crc.is_none()
                && h.seq == p.rx_seq + 1
                && h.dtype == desc.dtype as u8
                && h.redop == 0
                && h.root == 0
                && h.msg == 0
                && h.count == desc.count as u64
                && h.offset == 0
                && h.total == len as u64
                && h.len as usize == len;
            if !expected {
                return None;
            }
            // SAFETY: the caller's buffer, exclusively theirs for the whole call.
            let dst = unsafe { recv.bytes_mut(0, len) }?;
            match p.link.consume(Sink::Copy(dst)) {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    let cause = link_cause(desc.root, e);
                    self.fail(cause);
                    return None;
                }
            }
            p.rx_seq += 1;
            self.stats.bytes_received += len as u64;
        }
        Some(true)
    }
}
