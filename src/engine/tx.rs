//! The sending half of a pass: frames out to one peer, header and payload from the head of its
//! send queue, one frame at a time, never blocking (a full link just stops the loop).

use super::*;
use crate::sys::crc32c::crc32c;

impl Engine {
    pub(super) fn service_tx(&mut self, peer: usize) -> Result<bool, BrokenCause> {
        let mut progress = false;
        loop {
            let Some(p) = self.peers[peer].as_mut() else { return Ok(progress) };
            if let Some(f) = p.tx.as_mut() {
                let payload: &[u8] = match &f.payload {
                    TxPayload::None => &[],
                    // SAFETY: the operation that owns this view is alive while its frame is in
                    // flight (it cannot finish before its last frame is written).
                    TxPayload::Raw(b, off, len) => unsafe { b.bytes(*off, *len) }.unwrap_or(&[]),
                    TxPayload::Owned(v) => v,
                };
                let complete = p.link.write(&f.header, payload, &mut f.written).map_err(|e| link_cause(peer, e))?;
                if !complete {
                    return Ok(progress);
                }
                let f = p.tx.take().expect("frame checked above");
                progress = true;
                if let TxDone::Rest(c) = &f.done {
                    self.complete(c, Ok(()));
                }
                if let TxDone::Data { op, step, bytes } = f.done {
                    self.stats.bytes_sent += bytes as u64;
                    let i = self.op_index(op)?;
                    let o = &mut self.ops[i];
                    o.steps[step].progress += bytes;
                    let len = match o.plan.steps[step].act {
                        Act::Send { src, .. } => src.len,
                        _ => 0,
                    };
                    if o.steps[step].progress >= len {
                        if o.finish_step(step) {
                            self.finished += 1;
                        }
                        if let Some(p) = self.peers[peer].as_mut() {
                            p.tx_queue.pop_front();
                        }
                    }
                }
                continue;
            }
            // Start the next frame of the head send, if it has bytes ready.
            let Some(&(id, step)) = p.tx_queue.front() else { return Ok(progress) };
            let i = self.op_index(id)?;
            let op = &self.ops[i];
            let Act::Send { src, .. } = op.plan.steps[step].act else {
                return Err(internal("receive step in a send queue"));
            };
            let Some(p) = self.peers[peer].as_ref() else { return Ok(progress) };
            let (max, checksum) = (p.link.max_payload(op.desc.kind, src.len), p.checksum);
            let sent = op.steps[step].progress;
            let chunk = if src.len == 0 {
                if !op.deps_done(step) {
                    return Ok(progress);
                }
                0
            } else {
                let avail = op.available(step, src.len);
                if avail <= sent {
                    return Ok(progress);
                }
                let e = op.desc.dtype.size();
                let max = (max / e).max(1) * e;
                (avail - sent).min(max)
            };
            let mut header = self.data_header(op, step, sent, chunk, src.len);
            let buf = op.buf(src.buf);
            if checksum {
                // SAFETY: as for the frame's payload above: the operation owns this view.
                let payload = unsafe { buf.bytes(src.off + sent, chunk) }.unwrap_or(&[]);
                header.crc = Some(crc32c(payload));
            }
            let header = header.encode();
            let frame = TxFrame {
                header,
                payload: TxPayload::Raw(buf, src.off + sent, chunk),
                written: 0,
                done: TxDone::Data { op: id, step, bytes: chunk },
            };
            if let Some(p) = self.peers[peer].as_mut() {
                p.tx = Some(frame);
            }
        }
    }

    pub(super) fn data_header(
        &self,
        op: &OpState,
        step: usize,
        offset: usize,
        len: usize,
        total: usize,
    ) -> FrameHeader {
        self.frame_header(&op.desc, op.seq, op.steps[step].msg, offset, len, total)
    }

    /// The header of a data frame of an operation described by `d`, numbered `seq`: its
    /// message `msg`, bytes `[offset, offset + len)` of `total` (no checksum yet). The direct
    /// path builds its frames, and the frames it expects, with it too.
    pub(super) fn frame_header(
        &self,
        d: &OpDesc,
        seq: u64,
        msg: u32,
        offset: usize,
        len: usize,
        total: usize,
    ) -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Data,
            op: Some(d.kind),
            dtype: d.dtype as u8,
            redop: if d.kind.reduces() { d.redop as u8 } else { 0 },
            generation: self.cfg.generation,
            msg,
            world: world_tag(self.cfg.world_id),
            crc: None,
            seq,
            count: d.count as u64,
            root: if d.kind.rooted() { d.root as u32 } else { 0 },
            len: len as u32,
            offset: offset as u64,
            total: total as u64,
        }
    }
}
