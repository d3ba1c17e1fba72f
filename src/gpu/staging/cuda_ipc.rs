//! The CUDA IPC transport (`MW_DEVICE_IPC=1`): point-to-point operations between ranks on
//! the same host move device bytes straight from the sender's buffer into the receiver's, with
//! one copy on the receiver's stream, instead of through host memory.
//!
//! The receiver *pulls*: it maps the sender's allocation (CUDA IPC handle) and its stream
//! copies from there into its own buffer. Every write happens on the writer's own stream, in
//! its own order; a peer only reads a send buffer while the sender's stream holds it. Per
//! operation, three small messages travel over the world (its ordinary host transport, with
//! its fault handling):
//!
//! 1. **token**, sender → receiver, when the sender's stream reaches the operation: the IPC
//!    handle of the send buffer's allocation, the offset, the byte count and the type (or
//!    "cannot share").
//! 2. **reply**, receiver → sender: "copied" once the receiver's stream has copied through
//!    the mapping (and the mapping is closed), or "send the bytes" when the buffer cannot be
//!    shared or mapped (stream-ordered pool memory, ranks in one process, GPUs without peer
//!    access).
//! 3. **final**, sender → receiver: an acknowledgement of "copied" — the send buffer stayed
//!    untouched through the copy, so the receiver's result is good — or the bytes themselves.
//!
//! Streams wait only on flags this process's stager writes (as for staged operations). Each
//! operation's stream part is: wait for `GO`, copy what the stager told (`mw_copy_told`),
//! raise `COPIED`: the receiver's copy through the mapping, or the sender's copy into the
//! block when the bytes go by host; a receiver whose bytes came by host copies them out of
//! the block after the batch's `DONE`. A receive's `GO` needs only the peer's token, a send's
//! needs the peer's reply; receives come first on the stream, so no stream waits on a stream
//! that waits on it. If the world breaks at any point, the stager writes the flags as failed
//! and the streams move on: a failed operation leaves the receive buffer unspecified, as
//! everywhere.
//!
//! Per peer and direction, a side posts all its tokens, then its replies, then its final
//! messages, each in batch order, so that the two sides match them one for one; this asks
//! both sides to batch the operations between them the same way (`docs/cuda.md`).

use cudarc::driver::sys::CUdeviceptr;

use super::{get, put, tell_copies, Batch, Block, Device, Staging, StreamCmd, DONE_FAILED, HANDLE_LEN};
use crate::api::error::{Error, Result};
use crate::api::types::{DataType, ReduceOp};
use crate::coll::OpDesc;
use crate::engine::wire::OpKind;
use crate::sys::buf::RawBuf;
use crate::sys::sync::Arc;

// An operation's control area in the block (`CTL_LEN` bytes at `IpcOp::ctl`).
/// Flag the stream waits on before the operation's copy.
const GO: usize = 0;
/// Raised by the stream after that copy.
const COPIED: usize = 4;
/// What that copy does: source, destination, bytes (three u64; zero bytes: nothing).
const TOLD: usize = 8;
/// What a receiver's stream copies after the batch's `DONE` (bytes that came by host).
const TOLD_AFTER: usize = 32;
/// The token, sent or received.
const TOKEN: usize = 64;
const TOKEN_LEN: usize = 32 + HANDLE_LEN;
/// The reply, sent or received (one u64).
const REPLY: usize = TOKEN + TOKEN_LEN;
/// The acknowledgement (one u64).
const ACK: usize = REPLY + 8;
pub(super) const CTL_LEN: usize = ACK + 8;

/// Reply values, and the acknowledgement's (distinct, so that a message out of order is caught).
const COPIED_THROUGH_IPC: u64 = 1;
const SEND_THE_BYTES: u64 = 2;
const ACKNOWLEDGED: u64 = 3;

/// The messages of one operation, in order.
const ROUNDS: u8 = 3;

/// How an operation's bytes moved, once the two sides know.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum How {
    Mapped,
    Bytes,
}

/// One point-to-point operation that goes through CUDA IPC.
pub(super) struct IpcOp {
    peer: usize,
    /// This rank sends the bytes.
    sends: bool,
    /// The caller's device buffer and its length.
    addr: CUdeviceptr,
    len: usize,
    dtype: DataType,
    /// Offsets in the block: the control area, and room for the bytes if they go by host.
    ctl: usize,
    data: usize,
    /// Messages posted so far (rounds 1..=3, in order) and their completions.
    posted: u8,
    rounds: Vec<Arc<crate::api::request::Completion>>,
    how: Option<How>,
    /// The sender's allocation, mapped here until this rank's copy from it is done.
    pub(super) mapping: Option<CUdeviceptr>,
    /// A receiver has its bytes: acknowledged, or copied in from the host.
    landed: bool,
}

impl IpcOp {
    /// The operation's plan if it goes through CUDA IPC (a send or receive of some bytes with
    /// a rank that `shares` says is reachable so), placing its areas with `place`.
    pub(super) fn plan(
        desc: &OpDesc,
        send: Option<(CUdeviceptr, usize)>,
        recv: Option<(CUdeviceptr, usize)>,
        shares: &[bool],
        place: &mut dyn FnMut(usize) -> Result<(usize, usize)>,
    ) -> Result<Option<IpcOp>> {
        if desc.kind != OpKind::P2p || !shares.get(desc.root).copied().unwrap_or(false) {
            return Ok(None);
        }
        let Some((addr, len)) = (if desc.is_send { send } else { recv }) else { return Ok(None) };
        if len == 0 {
            return Ok(None);
        }
        Ok(Some(IpcOp {
            peer: desc.root,
            sends: desc.is_send,
            addr,
            len,
            dtype: desc.dtype,
            ctl: place(CTL_LEN)?.0,
            data: place(len)?.0,
            posted: 0,
            rounds: Vec::with_capacity(ROUNDS as usize),
            how: None,
            mapping: None,
            landed: false,
        }))
    }

    /// Zeroes the control area of a block about to be used.
    pub(super) fn clear(&self, base: *mut u8) {
        // SAFETY: the control area lies inside the block, which no stream uses yet.
        unsafe { std::ptr::write_bytes(base.add(self.ctl), 0, CTL_LEN) };
    }

    /// The stream's part before the batch's `DONE`: wait for `GO`, copy as told, raise
    /// `COPIED`. A receiver is told to copy through the mapping (or nothing, when the bytes
    /// come by host); a sender, to copy its buffer into the block when the bytes must go by
    /// host (or nothing). Every receive of a batch comes before every send: a receive's `GO`
    /// needs only the peer's token, a send's needs the peer's reply, which needs the peer's
    /// receive copy — so receives first, and no stream waits on one that waits on it.
    pub(super) fn stream_cmds(ops: &[IpcOp]) -> Vec<StreamCmd> {
        let receives = ops.iter().filter(|o| !o.sends);
        receives
            .chain(ops.iter().filter(|o| o.sends))
            .flat_map(|o| {
                [
                    StreamCmd::WaitFor { at: o.ctl + GO, value: 1 },
                    StreamCmd::CopyAsTold { at: o.ctl + TOLD, count: 1, max: o.len },
                    StreamCmd::Raise { at: o.ctl + COPIED },
                ]
            })
            .collect()
    }

    /// The stream's part after `DONE`: receives whose bytes came by host copy them from the
    /// block into the caller's buffer.
    pub(super) fn stream_cmds_after(ops: &[IpcOp]) -> Vec<StreamCmd> {
        ops.iter()
            .filter(|o| !o.sends)
            .map(|o| StreamCmd::CopyAsTold { at: o.ctl + TOLD_AFTER, count: 1, max: o.len })
            .collect()
    }

    pub(super) fn all_posted(&self) -> bool {
        self.posted == ROUNDS
    }

    /// Every message completed (successfully: failures fail the batch first), and a receiver
    /// has its bytes.
    pub(super) fn finished(&self) -> bool {
        self.all_posted() && (1..=ROUNDS).all(|r| self.round_done(r)) && (self.sends || self.landed)
    }

    /// Whether this rank sends (rather than receives) the message of `round`.
    fn outgoing(&self, round: u8) -> bool {
        self.sends == (round != 2)
    }

    /// Message `round` completed successfully (a failed one fails the batch instead).
    fn round_done(&self, round: u8) -> bool {
        self.rounds.get(round as usize - 1).is_some_and(|c| matches!(c.result(), Some(Ok(()))))
    }
}

/// Releases a failed batch's copies that have not been told anything: their streams copy
/// nothing and move on.
pub(super) fn release<B: Block>(b: &Batch<B>) {
    for o in &b.ipc {
        if b.flag(o.ctl + GO) == 0 {
            // TOLD is still zero (cleared at enqueue): nothing to copy.
            b.set_flag(o.ctl + GO, DONE_FAILED);
        } else if b.flag(o.ctl + COPIED) == 0 {
            // Told, but the stream has not copied yet: copy nothing, so that a failed peer's
            // buffer is read as little as possible (a copy already running goes on).
            put(b.block.host_ptr(), o.ctl + TOLD + 16, 0);
        }
    }
}

impl<D: Device> Staging<D> {
    /// Moves the batch's IPC operations on as far as they can go now: decisions, copies by
    /// host, messages. True if anything moved.
    pub(super) fn advance_ipc(&self, b: &mut Batch<D::Block>) -> Result<bool> {
        let base = b.block.host_ptr();
        let mut moved = false;
        for i in 0..b.ipc.len() {
            moved |= self.decide(b, i)?;
            // The copy through a mapping is done: unmap before replying, so that the sender,
            // free to release its buffer once it has the reply, never frees mapped memory.
            if b.ipc[i].mapping.is_some() && b.flag(b.ipc[i].ctl + COPIED) == 1 {
                let _entered = self.device.enter()?;
                self.device.close(b.ipc[i].mapping.take().unwrap_or_default());
                moved = true;
            }
        }
        // Post what is ready, in the order the peer expects; repeat while posting one message
        // lets the next one go.
        loop {
            let mut posted = false;
            for i in 0..b.ipc.len() {
                let round = b.ipc[i].posted + 1;
                let copied = b.flag(b.ipc[i].ctl + COPIED) == 1;
                if round <= ROUNDS && ready(&b.ipc[i], round, copied) && in_turn(&b.ipc, i, round) {
                    let c = self.post_message(base, &b.ipc[i], round)?;
                    b.messages.push(c.clone());
                    b.ipc[i].rounds.push(c);
                    b.ipc[i].posted = round;
                    posted = true;
                }
            }
            if !posted {
                break;
            }
            moved = true;
        }
        Ok(moved)
    }

    /// The decisions of operation `i` that its messages so far allow. True if one was made.
    fn decide(&self, b: &mut Batch<D::Block>, i: usize) -> Result<bool> {
        let base = b.block.host_ptr();
        let o = &b.ipc[i];
        match (o.sends, o.how) {
            // Sender, at the start: the token.
            (true, None) if o.posted == 0 => {
                let _entered = self.device.enter()?;
                let t = TOKEN + o.ctl;
                match self.device.export(o.addr) {
                    Some((handle, offset)) => {
                        put(base, t, 1);
                        put(base, t + 8, offset);
                        // SAFETY: the handle's bytes lie inside the token area.
                        unsafe { std::ptr::copy_nonoverlapping(handle.as_ptr(), base.add(t + 32), HANDLE_LEN) };
                    }
                    None => put(base, t, 0),
                }
                put(base, t + 16, o.len as u64);
                put(base, t + 24, o.dtype as u64);
                Ok(false)
            }
            // Sender, once the reply is in: acknowledge, or have the stream copy the bytes into
            // the block to send them.
            (true, None) if o.round_done(2) => {
                let how = match get(base, o.ctl + REPLY) {
                    COPIED_THROUGH_IPC => {
                        put(base, o.ctl + ACK, ACKNOWLEDGED);
                        How::Mapped
                    }
                    SEND_THE_BYTES => {
                        tell_copies(base, o.ctl + TOLD, &[(o.addr, b.block.dev_ptr() + o.data as u64, o.len as u64)]);
                        self.count_by_host();
                        How::Bytes
                    }
                    v => return Err(Error::internal(format!("CUDA IPC: rank {} replied {v}", o.peer))),
                };
                b.set_flag(o.ctl + GO, 1);
                b.ipc[i].how = Some(how);
                Ok(true)
            }
            // Receiver, once the token is in: map the sender's buffer and let the stream copy,
            // or ask for the bytes.
            (false, None) if o.round_done(1) => {
                let t = TOKEN + o.ctl;
                let (len, dtype) = (get(base, t + 16), get(base, t + 24));
                if len != o.len as u64 || dtype != o.dtype as u64 {
                    let name = self.world.name();
                    return Err(Error::invalid_usage(format!(
                        "world '{name}': rank {} sends {len} bytes of type {dtype}, rank {} receives {} bytes of type {}",
                        o.peer,
                        self.world.rank(),
                        o.len,
                        o.dtype as u64
                    )));
                }
                let mut handle = [0u8; HANDLE_LEN];
                // SAFETY: the handle's bytes lie inside the token area.
                unsafe { std::ptr::copy_nonoverlapping(base.add(t + 32), handle.as_mut_ptr(), HANDLE_LEN) };
                let offset = get(base, t + 8);
                let mapped = if get(base, t) == 1 {
                    let _entered = self.device.enter()?;
                    match self.device.open(&handle) {
                        // The token's range must lie inside the allocation it names.
                        Ok((m, size)) if offset.checked_add(len).is_some_and(|end| end <= size as u64) => Some(m),
                        Ok((m, _)) => {
                            self.device.close(m);
                            return Err(Error::invalid_usage(format!(
                                "world '{}': rank {}'s send buffer ({len} bytes at offset {offset}) is not inside                                  the allocation it names",
                                self.world.name(),
                                o.peer
                            )));
                        }
                        Err(_) => None,
                    }
                } else {
                    None
                };
                let how = match mapped {
                    Some(m) => {
                        tell_copies(base, o.ctl + TOLD, &[(m + offset, o.addr, o.len as u64)]);
                        put(base, o.ctl + REPLY, COPIED_THROUGH_IPC);
                        self.count_mapped();
                        How::Mapped
                    }
                    None => {
                        put(base, o.ctl + REPLY, SEND_THE_BYTES);
                        self.count_by_host();
                        How::Bytes
                    }
                };
                // Either way the stream may go: it copies what TOLD says (nothing when the
                // bytes come by host; they are written by the stager before DONE).
                b.set_flag(o.ctl + GO, 1);
                b.ipc[i].how = Some(how);
                b.ipc[i].mapping = mapped;
                Ok(true)
            }
            // Receiver whose copy was acknowledged: the bytes it copied are good.
            (false, Some(How::Mapped)) if !o.landed && o.round_done(3) => match get(base, o.ctl + ACK) {
                ACKNOWLEDGED => {
                    b.ipc[i].landed = true;
                    Ok(true)
                }
                v => Err(Error::internal(format!("CUDA IPC: rank {} acknowledged with {v}", o.peer))),
            },
            // Receiver whose bytes came by host: its stream copies them from the block into
            // the caller's buffer after DONE.
            (false, Some(How::Bytes)) if !o.landed && o.round_done(3) => {
                tell_copies(base, o.ctl + TOLD_AFTER, &[(b.block.dev_ptr() + o.data as u64, o.addr, o.len as u64)]);
                b.ipc[i].landed = true;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Posts message `round` of `o` to the world.
    fn post_message(&self, base: *mut u8, o: &IpcOp, round: u8) -> Result<Arc<crate::api::request::Completion>> {
        let (at, len) = match (round, o.how) {
            (1, _) => (o.ctl + TOKEN, TOKEN_LEN),
            (2, _) => (o.ctl + REPLY, 8),
            (_, Some(How::Bytes)) => (o.data, o.len),
            _ => (o.ctl + ACK, 8),
        };
        // Control messages travel as `int8`, the bytes as `uint8`: the engine's check of each
        // message's type and count then tells a control message from data.
        let dtype = if round == 3 && o.how == Some(How::Bytes) { DataType::U8 } else { DataType::I8 };
        let out = o.outgoing(round);
        let desc = OpDesc {
            kind: OpKind::P2p,
            dtype,
            redop: ReduceOp::Sum,
            count: len,
            root: o.peer,
            is_send: out,
            in_place: false,
        };
        // SAFETY: the area lies inside the block, which stays alive and untouched by the
        // stream until this message has completed (the block is reused only after all have).
        let buf = unsafe { RawBuf::from_raw(base.wrapping_add(at), len, !out) };
        let (send, recv) = if out { (buf, RawBuf::EMPTY) } else { (RawBuf::EMPTY, buf) };
        // SAFETY: as above.
        let mut c = unsafe { self.post_watched(vec![(desc, send, recv)]) }?;
        c.pop().ok_or_else(|| Error::internal("posting a CUDA IPC message gave no completion"))
    }
}

/// Whether message `round` of `o` has what it needs (`copied`: its stream raised `COPIED`).
fn ready(o: &IpcOp, round: u8, copied: bool) -> bool {
    match (round, o.sends) {
        // Tokens go (or are awaited) at once; a sender awaits its reply at once.
        (1, _) | (2, true) => true,
        // A receiver replies once it decided, and if it mapped, once its stream has copied
        // and the mapping is gone.
        (2, false) => match o.how {
            Some(How::Mapped) => o.mapping.is_none(),
            Some(How::Bytes) => true,
            None => false,
        },
        // Final messages: once the reply decided how, and bytes once the stream copied them
        // into the block.
        _ => match o.how {
            Some(How::Bytes) if o.sends => copied,
            how => how.is_some(),
        },
    }
}

/// Whether message `round` of operation `i` is next in its peer and direction's order: every
/// message of an earlier round, and of the same round for an earlier operation, that travels
/// the same way between the same two ranks has been posted.
fn in_turn(ops: &[IpcOp], i: usize, round: u8) -> bool {
    let me = &ops[i];
    let out = me.outgoing(round);
    ops.iter().enumerate().filter(|(_, o)| o.peer == me.peer).all(|(j, o)| {
        (1..=ROUNDS).filter(|&r| o.outgoing(r) == out && (r < round || (r == round && j < i))).all(|r| o.posted >= r)
    })
}
