//! The receiving half of a pass: frames in from one peer, each header checked against this
//! rank's own call before its payload is delivered (copied, or combined with local data), or
//! kept in the bounded queue of early frames until its receive is posted.

use super::*;
use crate::sys::crc32c::crc32c;

impl Engine {
    /// Checks an incoming data frame against the receive it is for.
    pub(super) fn check(
        &self,
        peer: usize,
        op: &OpState,
        step: usize,
        h: &FrameHeader,
        total: usize,
    ) -> Result<(), BrokenCause> {
        let d = &op.desc;
        let (redop, root) =
            (if d.kind.reduces() { d.redop as u8 } else { 0 }, if d.kind.rooted() { d.root as u32 } else { 0 });
        let same_call = h.op == Some(d.kind)
            && h.seq == op.seq
            && h.dtype == d.dtype as u8
            && h.count == d.count as u64
            && h.redop == redop
            && h.root == root;
        if same_call
            && h.total as usize == total
            && h.msg == op.steps[step].msg
            && h.offset as usize == op.steps[step].progress
        {
            return Ok(());
        }
        // Something differs: spell both calls out.
        let mine = describe(Some(d.kind), d.dtype as u8, d.count as u64, redop, root);
        let theirs = describe(h.op, h.dtype, h.count, h.redop, h.root);
        let mismatch = |what: &str| BrokenCause::Mismatch {
            peer,
            detail: format!(
                "{what}: rank {peer} called {theirs} (operation #{}) where rank {} called {mine} (operation #{})",
                h.seq, self.cfg.rank, op.seq
            ),
        };
        if h.op != Some(d.kind) {
            return Err(mismatch("different operations"));
        }
        if h.seq != op.seq {
            return Err(mismatch("operations out of step"));
        }
        if !same_call {
            if mine == theirs {
                // A field this operation does not use differs (a root on an all-reduce, a
                // reduction on a broadcast): not a call we can name, so a broken protocol.
                return Err(BrokenCause::Protocol {
                    peer,
                    detail: format!(
                        "frame for {mine} carries root {} and reduction {} where {root} and {redop} were due",
                        h.root, h.redop
                    ),
                });
            }
            return Err(mismatch("different arguments"));
        }
        if h.total as usize != total {
            let e = d.dtype.size();
            return Err(BrokenCause::Mismatch {
                peer,
                detail: format!(
                    "message sizes differ: rank {peer} sends {} elements of {} where rank {} expects {} in {mine}",
                    h.total as usize / e,
                    d.dtype,
                    self.cfg.rank,
                    total / e
                ),
            });
        }
        if h.msg != op.steps[step].msg || h.offset as usize != op.steps[step].progress {
            return Err(BrokenCause::Protocol {
                peer,
                detail: format!(
                    "frame out of order in {mine}: message {} offset {} where {} offset {} was due",
                    h.msg, h.offset, op.steps[step].msg, op.steps[step].progress
                ),
            });
        }
        Ok(())
    }

    /// Places the payload of a checked frame (from the link, or already buffered).
    pub(super) fn deliver(
        &mut self,
        peer: usize,
        i: usize,
        step: usize,
        h: &FrameHeader,
        stored: Option<&[u8]>,
    ) -> Result<bool, BrokenCause> {
        let op = &self.ops[i];
        let Act::Recv { dst, combine, .. } = op.plan.steps[step].act else {
            return Err(internal("send step in a receive queue"));
        };
        let (dtype, redop) = (op.desc.dtype, op.desc.redop);
        let off = h.offset as usize;
        let len = h.len as usize;
        if len % dtype.size() != 0 {
            return Err(BrokenCause::Protocol {
                peer,
                detail: format!("frame of {len} bytes splits a {dtype} element"),
            });
        }
        let dbuf = op.buf(dst.buf);
        let cbuf = combine.map(|c| (op.buf(c.buf), c));
        // SAFETY: the destination belongs to this operation and no other view of it is alive.
        let Some(dslice) = (unsafe { dbuf.bytes_mut(dst.off + off, len) }) else {
            return Err(internal("receive region out of range"));
        };
        // A checksummed payload is checked before any of it is combined; a copied one right
        // after it landed (a mismatch fails the operation, whose output is then unspecified).
        let verify = |payload: &[u8]| {
            match h.crc {
            Some(sent) if crc32c(payload) != sent => Err(BrokenCause::Protocol {
                peer,
                detail: format!(
                    "a frame of {len} bytes failed its CRC32C check (sent {sent:#010x}, received {:#010x}): bytes changed on the way",
                    crc32c(payload)
                ),
            }),
            _ => Ok(()),
        }
        };
        let apply = |payload: &[u8], dslice: &mut [u8]| -> Result<(), BrokenCause> {
            verify(payload)?;
            match cbuf {
                None => dslice.copy_from_slice(payload),
                Some((_, c)) if c == dst => reduce_into(dtype, redop, dslice, payload),
                Some((cb, c)) => {
                    // SAFETY: the plan combines with a region apart from the destination.
                    let a =
                        unsafe { cb.bytes(c.off + off, len) }.ok_or_else(|| internal("combine region out of range"))?;
                    reduce3(dtype, redop, dslice, a, payload);
                }
            }
            Ok(())
        };
        let complete = match stored {
            Some(payload) => {
                apply(payload, dslice)?;
                true
            }
            None => {
                let Some(p) = self.peers[peer].as_mut() else { return Ok(false) };
                if cbuf.is_none() {
                    let done = p.link.consume(Sink::Copy(&mut *dslice)).map_err(|e| link_cause(peer, e))?;
                    if done {
                        verify(dslice)?;
                    }
                    done
                } else {
                    let mut result = Ok(());
                    let mut visit = |payload: &[u8]| result = apply(payload, &mut *dslice);
                    let c = p.link.consume(Sink::Visit(&mut visit)).map_err(|e| link_cause(peer, e))?;
                    result?;
                    c
                }
            }
        };
        if complete {
            self.stats.bytes_received += len as u64;
            let op = &mut self.ops[i];
            op.steps[step].progress += len;
            if op.steps[step].progress >= dst.len {
                if op.finish_step(step) {
                    self.finished += 1;
                }
                if let Some(p) = self.peers[peer].as_mut() {
                    p.rx_queue.pop_front();
                }
            }
        }
        Ok(complete)
    }

    /// Receives from one peer: frames already buffered first, then (if `link_open`) the link.
    pub(super) fn service_rx(&mut self, peer: usize, link_open: bool) -> Result<bool, BrokenCause> {
        let mut progress = false;
        loop {
            let Some(p) = self.peers[peer].as_ref() else { return Ok(progress) };
            // The receive that the next data frame from this peer is for, if it may start.
            let target = match p.rx_queue.front() {
                Some(&(id, step)) => {
                    let i = self.op_index(id)?;
                    self.ops[i].deps_done(step).then_some((i, step))
                }
                None => None,
            };
            if let Some((i, step)) = target {
                let p = self.peers[peer].as_mut().expect("checked above");
                if let Some((h, payload)) = p.unexpected.pop_front() {
                    p.unexpected_bytes -= payload.len();
                    let total = self.recv_len(i, step);
                    self.check(peer, &self.ops[i], step, &h, total)?;
                    self.deliver(peer, i, step, &h, Some(&*payload))?;
                    progress = true;
                    continue;
                }
            } else if p.unexpected_bytes >= UNEXPECTED_CAP {
                self.peers[peer].as_mut().expect("checked above").paused = true;
                return Ok(progress);
            }
            if !link_open {
                return Ok(progress);
            }
            let p = self.peers[peer].as_mut().expect("checked above");
            let Some(h) = p.link.peek().map_err(|e| link_cause(peer, e))? else { return Ok(progress) };
            match h.kind {
                FrameKind::Heartbeat => {
                    p.link.consume(Sink::Discard).map_err(|e| link_cause(peer, e))?;
                    progress = true;
                }
                FrameKind::Close => {
                    p.link.consume(Sink::Discard).map_err(|e| link_cause(peer, e))?;
                    return Err(BrokenCause::PeerLeft { peer });
                }
                FrameKind::Abort => {
                    let mut reason = String::new();
                    let mut visit = |b: &[u8]| reason = String::from_utf8_lossy(b).into_owned();
                    if !p.link.consume(Sink::Visit(&mut visit)).map_err(|e| link_cause(peer, e))? {
                        return Ok(progress);
                    }
                    return Err(BrokenCause::PeerAborted { peer, reason });
                }
                // A TCP pair keeps its own frames to itself.
                FrameKind::Credit | FrameKind::End => {
                    let e = LinkError::Protocol(format!("a link passed up its own {:?} frame", h.kind));
                    return Err(link_cause(peer, e));
                }
                FrameKind::Data if h.world != world_tag(self.cfg.world_id) || h.generation != self.cfg.generation => {
                    if !p.link.consume(Sink::Discard).map_err(|e| link_cause(peer, e))? {
                        return Ok(progress);
                    }
                    self.stats.stale_frames_dropped += 1;
                    warn!(
                        "world '{}' rank {}: dropped a frame of world {:#x} generation {} from rank {peer} (this is {:#x} generation {})",
                        self.cfg.name, self.cfg.rank, h.world, h.generation, world_tag(self.cfg.world_id), self.cfg.generation
                    );
                    progress = true;
                }
                FrameKind::Data => match target {
                    Some((i, step)) => {
                        let total = self.recv_len(i, step);
                        self.check(peer, &self.ops[i], step, &h, total)?;
                        if !self.deliver(peer, i, step, &h, None)? {
                            return Ok(progress);
                        }
                        progress = true;
                    }
                    None if !p.link.drain_early_frames() => return Ok(progress),
                    // The process holds all the early frames it may: wait for this receive.
                    None if !early::room_for(h.len as usize) => {
                        p.paused = true;
                        self.stats.early_frames_paused += 1;
                        return Ok(progress);
                    }
                    None => {
                        let mut data = Vec::new();
                        let mut visit = |b: &[u8]| data = b.to_vec();
                        if !p.link.consume(Sink::Visit(&mut visit)).map_err(|e| link_cause(peer, e))? {
                            return Ok(progress);
                        }
                        p.unexpected_bytes += data.len();
                        p.unexpected.push_back((h, early::Early::new(data)));
                        progress = true;
                    }
                },
            }
        }
    }

    pub(super) fn recv_len(&self, i: usize, step: usize) -> usize {
        match self.ops[i].plan.steps[step].act {
            Act::Recv { dst, .. } => dst.len,
            _ => 0,
        }
    }
}
