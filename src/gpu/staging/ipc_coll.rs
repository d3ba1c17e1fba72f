//! Collectives over CUDA IPC (`MW_DEVICE_IPC=1`): when every rank of a world is on this host,
//! `all_reduce`, `reduce_scatter`, `all_gather`, `broadcast` and `reduce` on device buffers run
//! on the GPUs: each rank's stream reads its peers' buffers through CUDA IPC mappings and
//! combines them with the crate's kernel (up to 8 sources at once), instead of moving the
//! bytes through host memory.
//!
//! Every rank exchanges a few small messages with every peer over the world (its host
//! transport, with its fault handling), in rounds:
//!
//! 1. **token**, when this rank's stream reaches the operation (its buffers are ready): the
//!    call (kind, type, reduction, count, root: checked against every peer's), and the IPC
//!    handles and offsets of its input and output.
//! 2. **status**: whether this rank mapped every peer buffer it reads. Unless all ranks did,
//!    the operation moves its bytes by host, as a staged operation does, on every rank alike.
//! 3. **phase 1 done**, once the stream has run phase 1 and so will read no more of the peers'
//!    inputs. `all_reduce` has a phase 2 and a round 4 after it. By host, round 3 says
//!    instead that this rank has closed its mappings (then unused).
//!
//! The phases, run by each rank's stream between flags that its own stager writes:
//! - `all_reduce`: phase 1 combines chunk `rank` of every rank's input into this rank's
//!   output (a reduce-scatter with no extra buffer); phase 2, once every rank is past phase 1,
//!   copies chunk `s` of rank `s`'s output into the same chunk of this rank's output. In
//!   place, no rank ever writes a chunk that another reads at that time.
//! - `reduce_scatter`: combine chunk `rank` of every input into the output.
//! - `all_gather`: copy every rank's input into its place in the output.
//! - `broadcast`: copy the root's input into the output. `reduce`: the root combines.
//!
//! The stream leaves the operation only after the last round has come from every peer: no
//! peer reads this rank's buffers any more. A rank unmaps its peers' buffers before sending
//! its last round, so that no rank frees memory that another still maps. If the world breaks
//! at any point, the stager writes the flags as failed and the streams move on, as everywhere
//! (`cuda_ipc.rs`); the output of a failed operation is unspecified. (A peer's stream may then
//! still be reading this rank's buffer: nothing a broken world says can be waited for.)
//!
//! The choice of this path is made at enqueue, from what every rank knows alike: an
//! operation alone in its batch (not grouped), of one of those kinds, with some bytes, in a
//! world of 2 to 8 ranks all on this host, with IPC on. Ranks must agree on `MW_DEVICE_IPC` and
//! on grouping, as for point-to-point operations (`docs/cuda.md`).

use cudarc::driver::sys::CUdeviceptr;

use super::{
    get, put, read_flag, tell_copies, write_flag, Batch, Block, Device, DeviceOp, Staging, StreamCmd, COPY_LEN,
    DONE_FAILED, HANDLE_LEN,
};
use crate::api::error::{Error, Result};
use crate::api::request::Completion;
use crate::api::types::{DataType, ReduceOp};
use crate::coll::OpDesc;
use crate::engine::wire::OpKind;
use crate::sys::buf::RawBuf;
use crate::sys::sync::Arc;

/// Most ranks a collective runs over IPC with: the sources the combine kernel takes at once.
pub(super) const MAX_RANKS: usize = 8;

// The control area (offsets from `IpcColl::ctl`). Flags the stream waits on or raises:
const GO1: usize = 0;
const P1: usize = 4;
const GO2: usize = 8;
const P2: usize = 12;
/// Copy descriptors (3 words: source, destination, bytes) and the combine descriptor (as
/// `cuda/kernels.cu` lays it out: destination, elements, sources, reduction, divisor, then up
/// to 8 source addresses).
const IN_COPY: usize = 16;
const AFTER: usize = IN_COPY + COPY_LEN;
const COMBINE: usize = AFTER + COPY_LEN;
const COMBINE_LEN: usize = 8 * (5 + MAX_RANKS);
const COPIES: usize = COMBINE + COMBINE_LEN;

// The token's words (then the two handles).
const T_KIND: usize = 0;
const T_DTYPE: usize = 8;
const T_REDOP: usize = 16;
const T_COUNT: usize = 24;
const T_ROOT: usize = 32;
const T_SHARED: usize = 40;
const T_IN_OFF: usize = 48;
const T_OUT_OFF: usize = 56;
const T_IN_HANDLE: usize = 64;
const T_OUT_HANDLE: usize = T_IN_HANDLE + HANDLE_LEN;
const TOKEN_LEN: usize = T_OUT_HANDLE + HANDLE_LEN;
/// `T_SHARED` bits: the input, the output can be mapped by peers.
const IN_SHARED: u64 = 1;
const OUT_SHARED: u64 = 2;

/// Round 2's values; round 3's by host; rounds 3 and 4's mapped (`PHASE_DONE` + round). All
/// distinct, and distinct from the point-to-point protocol's, so that a message out of place
/// is caught.
const MAPPED_ALL: u64 = 0x4d57_1001;
const BY_HOST: u64 = 0x4d57_1002;
const UNMAPPED: u64 = 0x4d57_1003;
const PHASE_DONE: u64 = 0x4d57_0000;

/// How the operation's bytes move, once every rank's status is in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Mapped,
    ByHost,
}

/// A collective that goes through CUDA IPC.
pub(super) struct IpcColl {
    desc: OpDesc,
    rank: usize,
    size: usize,
    /// This rank's input and output regions (device address; zero: none). Their lengths
    /// follow from the call.
    input: CUdeviceptr,
    output: CUdeviceptr,
    /// The caller's buffers, as the staged fallback copies them in and out.
    send: Option<(CUdeviceptr, usize)>,
    recv: Option<(CUdeviceptr, usize)>,
    /// Offsets in the block: the control area, and the fallback's send and receive areas.
    ctl: usize,
    stage_send: (usize, usize),
    stage_recv: (usize, usize),
    /// 2 for `all_reduce`, else 1.
    phases: u8,
    mode: Option<Mode>,
    /// Rounds posted so far, and per round the receives' completions.
    posted: u8,
    received: Vec<Vec<Arc<Completion>>>,
    /// Peers' inputs and outputs as mapped here, by rank.
    peer_in: Vec<CUdeviceptr>,
    peer_out: Vec<CUdeviceptr>,
    /// Mappings to close once this rank's stream reads no more through them.
    pub(super) mappings: Vec<CUdeviceptr>,
    /// By host: the staged operation on the block, once posted.
    host_op: Option<Arc<Completion>>,
    /// The stream may leave the operation: everything it must copy has been told.
    landed: bool,
}

impl IpcColl {
    /// The operation's plan if it goes through CUDA IPC (see the module's comment): `alone`,
    /// in its batch; `shares`, per rank, whether it is reachable so. Areas placed by `place`.
    pub(super) fn plan(
        op: &DeviceOp,
        alone: bool,
        rank: usize,
        shares: &[bool],
        place: &mut dyn FnMut(usize) -> Result<(usize, usize)>,
    ) -> Result<Option<IpcColl>> {
        let (desc, send, recv) = *op;
        let size = shares.len();
        let kinds = [OpKind::AllReduce, OpKind::ReduceScatter, OpKind::AllGather, OpKind::Broadcast, OpKind::Reduce];
        if !alone
            || !kinds.contains(&desc.kind)
            || desc.count == 0
            || !(2..=MAX_RANKS).contains(&size)
            || !(0..size).all(|s| s == rank || shares[s])
        {
            return Ok(None);
        }
        let b = desc.bytes() as u64;
        let addr = |x: Option<(CUdeviceptr, usize)>| x.map_or(0, |x| x.0);
        let (input, output) = if desc.in_place {
            let buf = addr(recv);
            match desc.kind {
                OpKind::AllGather => (buf + rank as u64 * b, buf),
                OpKind::ReduceScatter => (buf, buf + rank as u64 * b),
                _ => (buf, buf),
            }
        } else {
            (addr(send), addr(recv))
        };
        let (send_len, recv_len) = desc.buffer_bytes(rank, size);
        Ok(Some(IpcColl {
            desc,
            rank,
            size,
            input,
            output,
            send,
            recv,
            ctl: place(ctl_len(size))?.0,
            stage_send: place(send_len)?,
            stage_recv: place(recv_len)?,
            phases: if desc.kind == OpKind::AllReduce { 2 } else { 1 },
            mode: None,
            posted: 0,
            received: Vec::new(),
            peer_in: vec![0; size],
            peer_out: vec![0; size],
            mappings: Vec::new(),
            host_op: None,
            landed: false,
        }))
    }

    /// Zeroes the control area of a block about to be used.
    pub(super) fn clear(&self, base: *mut u8) {
        // SAFETY: the control area lies inside the block, which no stream uses yet.
        unsafe { std::ptr::write_bytes(base.add(self.ctl), 0, ctl_len(self.size)) };
    }

    /// The stream's part before the batch's `DONE`: phase 1 (the fallback's copy in, the
    /// combine, the copies), and phase 2 for `all_reduce`, each after its flag.
    pub(super) fn stream_cmds(&self) -> Vec<StreamCmd> {
        let c = self.ctl;
        let (n, b) = (self.size, self.desc.bytes());
        let mut cmds = vec![
            StreamCmd::WaitFor { at: c + GO1, value: 1 },
            StreamCmd::CopyAsTold { at: c + IN_COPY, count: 1, max: self.stage_send.1.max(self.stage_recv.1) },
        ];
        // Only the launches the kind can need (an empty one still reads its descriptor).
        if matches!(self.desc.kind, OpKind::AllReduce | OpKind::ReduceScatter | OpKind::Reduce) {
            cmds.push(StreamCmd::CombineAsTold { at: c + COMBINE, dtype: self.desc.dtype, max: self.desc.count });
        } else {
            cmds.push(StreamCmd::CopyAsTold { at: c + COPIES, count: n, max: b });
        }
        cmds.push(StreamCmd::Raise { at: c + P1 });
        if self.phases == 2 {
            cmds.extend([
                StreamCmd::WaitFor { at: c + GO2, value: 1 },
                StreamCmd::CopyAsTold { at: c + COPIES + n * COPY_LEN, count: n, max: b },
                StreamCmd::Raise { at: c + P2 },
            ]);
        }
        cmds
    }

    /// The stream's part after `DONE`: by host, the result's copy out of the block.
    pub(super) fn stream_cmds_after(&self) -> Vec<StreamCmd> {
        vec![StreamCmd::CopyAsTold { at: self.ctl + AFTER, count: 1, max: self.stage_recv.1 }]
    }

    fn rounds(&self) -> u8 {
        match self.mode {
            Some(Mode::ByHost) => 3,
            _ => 2 + self.phases,
        }
    }

    /// Every message posted, and by host the staged operation too.
    pub(super) fn all_posted(&self) -> bool {
        self.mode.is_some()
            && self.posted == self.rounds()
            && (self.mode == Some(Mode::Mapped) || self.host_op.is_some())
    }

    /// The stream may be let go: every peer is done with this rank's buffers.
    pub(super) fn finished(&self) -> bool {
        self.landed
    }

    /// Every receive of `round` has completed successfully (failures fail the batch first).
    fn round_in(&self, round: u8) -> bool {
        self.received.get(round as usize - 1).is_some_and(|r| r.iter().all(|c| matches!(c.result(), Some(Ok(())))))
    }

    fn peers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.size).filter(move |s| *s != self.rank)
    }

    /// Offsets of this rank's outgoing message of `round`, and of the one from `peer`.
    fn out_at(&self, round: u8) -> usize {
        let c = self.ctl + COPIES + 2 * self.size * COPY_LEN;
        if round == 1 {
            c
        } else {
            c + TOKEN_LEN + 8 * (round as usize - 2)
        }
    }

    fn in_at(&self, round: u8, peer: usize) -> usize {
        let c = self.out_at(1) + TOKEN_LEN + 24;
        if round == 1 {
            c + peer * TOKEN_LEN
        } else {
            c + self.size * TOKEN_LEN + 8 * ((round as usize - 2) * self.size + peer)
        }
    }

    /// Length of rank `s`'s input and output regions.
    fn in_len(&self) -> usize {
        self.desc.bytes() * if self.desc.kind == OpKind::ReduceScatter { self.size } else { 1 }
    }

    fn out_len(&self) -> usize {
        self.desc.bytes() * if self.desc.kind == OpKind::AllGather { self.size } else { 1 }
    }

    /// Which of peer `s`'s regions this rank reads: (input, output).
    fn needs(&self, s: usize) -> (bool, bool) {
        let root = self.desc.root;
        match self.desc.kind {
            OpKind::AllReduce => (true, true),
            OpKind::ReduceScatter | OpKind::AllGather => (true, false),
            OpKind::Broadcast => (self.rank != root && s == root, false),
            OpKind::Reduce => (self.rank == root, false),
            _ => (false, false),
        }
    }

    /// Which of this rank's regions some peer reads: (input, output).
    fn read_by_peers(&self) -> (bool, bool) {
        let root = self.desc.root;
        match self.desc.kind {
            OpKind::AllReduce => (true, true),
            OpKind::ReduceScatter | OpKind::AllGather => (true, false),
            OpKind::Broadcast => (self.rank == root, false),
            OpKind::Reduce => (self.rank != root, false),
            _ => (false, false),
        }
    }

    fn inp(&self, s: usize) -> CUdeviceptr {
        if s == self.rank {
            self.input
        } else {
            self.peer_in[s]
        }
    }

    fn outp(&self, s: usize) -> CUdeviceptr {
        if s == self.rank {
            self.output
        } else {
            self.peer_out[s]
        }
    }

    /// Elements of `all_reduce`'s chunk `s`: `[lo, hi)`. Chunks are whole multiples of 16
    /// bytes where the count allows, so that the kernels move 16 bytes at a time.
    fn chunk(&self, s: usize) -> (usize, usize) {
        let lanes = (16 / self.desc.dtype.size()).max(1);
        let per = self.desc.count.div_ceil(self.size).next_multiple_of(lanes);
        ((s * per).min(self.desc.count), ((s + 1) * per).min(self.desc.count))
    }

    /// Writes phase 1's descriptors (mapped): what to combine and what to copy.
    fn tell_phase1(&self, base: *mut u8) {
        let (sz, b, me) = (self.desc.dtype.size() as u64, self.desc.bytes() as u64, self.rank);
        let divide = if self.desc.redop == ReduceOp::Avg { self.size as u64 } else { 0 };
        let combine = |dst: CUdeviceptr, srcs: Vec<CUdeviceptr>, n: usize| {
            let at = self.ctl + COMBINE;
            put(base, at, dst);
            put(base, at + 8, n as u64);
            put(base, at + 16, srcs.len() as u64);
            put(base, at + 24, self.desc.redop as u64);
            put(base, at + 32, divide);
            for (k, s) in srcs.into_iter().enumerate() {
                put(base, at + 40 + 8 * k, s);
            }
        };
        let mut copies = Vec::new();
        let all = 0..self.size;
        match self.desc.kind {
            OpKind::AllReduce => {
                let (lo, hi) = self.chunk(me);
                let at = lo as u64 * sz;
                combine(self.output + at, all.map(|s| self.inp(s) + at).collect(), hi - lo);
            }
            OpKind::ReduceScatter => {
                combine(self.output, all.map(|s| self.inp(s) + me as u64 * b).collect(), self.desc.count)
            }
            OpKind::Reduce if me == self.desc.root => {
                combine(self.output, all.map(|s| self.inp(s)).collect(), self.desc.count)
            }
            OpKind::AllGather => {
                for s in all {
                    let to = self.output + s as u64 * b;
                    if self.inp(s) != to {
                        copies.push((self.inp(s), to, b));
                    }
                }
            }
            OpKind::Broadcast => {
                let from = self.inp(self.desc.root);
                if from != self.output {
                    copies.push((from, self.output, b));
                }
            }
            _ => {}
        }
        tell_copies(base, self.ctl + COPIES, &copies);
    }

    /// Writes phase 2's descriptors (`all_reduce`, mapped): every other rank's chunk of the
    /// result, from its output.
    fn tell_phase2(&self, base: *mut u8) {
        let sz = self.desc.dtype.size() as u64;
        let copies: Vec<_> = self
            .peers()
            .map(|s| {
                let (lo, hi) = self.chunk(s);
                let at = lo as u64 * sz;
                (self.outp(s) + at, self.output + at, (hi - lo) as u64 * sz)
            })
            .collect();
        tell_copies(base, self.ctl + COPIES + self.size * COPY_LEN, &copies);
    }
}

/// Bytes of the control area for `n` ranks.
fn ctl_len(n: usize) -> usize {
    // Descriptors; the outgoing token and three words; the incoming tokens and words.
    COPIES + 2 * n * COPY_LEN + TOKEN_LEN + 24 + n * (TOKEN_LEN + 24)
}

/// Releases a failed batch's collective: flags not written yet are written as failed (their
/// descriptors are still zero: nothing to do); descriptors told but not run yet are emptied,
/// so that a failed peer's buffers are read as little as possible.
pub(super) fn release<B: Block>(b: &Batch<B>) {
    let Some(c) = &b.coll else { return };
    let base = b.block.host_ptr();
    for (go, done) in [(GO1, P1), (GO2, P2)] {
        if read_flag(base, c.ctl + go) == 0 {
            write_flag(base, c.ctl + go, DONE_FAILED);
        } else if read_flag(base, c.ctl + done) == 0 {
            put(base, c.ctl + COMBINE + 8, 0);
            for k in 0..2 * c.size {
                put(base, c.ctl + COPIES + k * COPY_LEN + 16, 0);
            }
        }
    }
}

/// What a step of the stager works on: the block (as this process and as the device see it),
/// the collective, and the batch's messages (the block is reused only once all have ended).
struct Parts<'a> {
    base: *mut u8,
    dev: CUdeviceptr,
    c: &'a mut IpcColl,
    messages: &'a mut Vec<Arc<Completion>>,
}

impl<D: Device> Staging<D> {
    /// Moves the batch's collective on as far as it can go now. True if anything moved.
    pub(super) fn advance_coll(&self, b: &mut Batch<D::Block>) -> Result<bool> {
        let (base, dev) = (b.block.host_ptr(), b.block.dev_ptr());
        let Batch { coll, messages, .. } = b;
        let Some(c) = coll.as_mut() else { return Ok(false) };
        let mut p = Parts { base, dev, c, messages };
        let mut moved = false;
        while self.step_coll(&mut p)? {
            moved = true;
        }
        Ok(moved)
    }

    /// One step, if one can be taken now. True if it was.
    fn step_coll(&self, p: &mut Parts) -> Result<bool> {
        let (base, ctl) = (p.base, p.c.ctl);
        match (p.c.mode, p.c.posted) {
            // The stream reached the operation: tokens out.
            (None, 0) => {
                self.write_token(base, p.c)?;
                self.post_round(p, 1)
            }
            // Every token in: check the calls, map, and say whether that worked.
            (None, 1) if p.c.round_in(1) => {
                let status = self.map_peers(base, p.c)?;
                put(base, p.c.out_at(2), status);
                self.post_round(p, 2)
            }
            // Every status in: the way every rank takes.
            (None, 2) if p.c.round_in(2) => {
                self.choose(p)?;
                Ok(true)
            }
            (Some(Mode::Mapped), posted) => {
                let c = &mut *p.c;
                // Phase k done on this stream: round k + 2 says so.
                let k = posted - 1;
                if k <= c.phases && read_flag(base, ctl + if k == 1 { P1 } else { P2 }) == 1 {
                    if k == c.phases && !c.mappings.is_empty() {
                        // The last read through the mappings is done: unmap before saying so,
                        // so that no peer frees memory still mapped here.
                        let _entered = self.device.enter()?;
                        c.mappings.drain(..).for_each(|m| self.device.close(m));
                    }
                    put(base, c.out_at(posted + 1), PHASE_DONE + posted as u64 + 1);
                    return self.post_round(p, posted + 1);
                }
                // Every peer past phase k: the next phase may start, or the stream leave.
                let last = posted - 2 == c.phases;
                if posted >= 3 && c.round_in(posted) && !c.landed && (last || read_flag(base, ctl + GO2) == 0) {
                    for s in c.peers() {
                        let v = get(base, c.in_at(posted, s));
                        if v != PHASE_DONE + posted as u64 {
                            return Err(Error::internal(format!("CUDA IPC: rank {s} sent {v} in round {posted}")));
                        }
                    }
                    if last {
                        c.landed = true;
                    } else {
                        c.tell_phase2(base);
                        write_flag(base, ctl + GO2, 1);
                    }
                    return Ok(true);
                }
                Ok(false)
            }
            (Some(Mode::ByHost), _) => self.step_by_host(p),
            _ => Ok(false),
        }
    }

    fn write_token(&self, base: *mut u8, c: &IpcColl) -> Result<()> {
        let t = c.out_at(1);
        let d = &c.desc;
        for (at, v) in [
            (T_KIND, d.kind as u64),
            (T_DTYPE, d.dtype as u64),
            (T_REDOP, d.redop as u64),
            (T_COUNT, d.count as u64),
            (T_ROOT, d.root as u64),
        ] {
            put(base, t + at, v);
        }
        let (read_in, read_out) = c.read_by_peers();
        let mut shared = 0;
        let _entered = self.device.enter()?;
        for (read, addr, bit, off, handle) in [
            (read_in, c.input, IN_SHARED, T_IN_OFF, T_IN_HANDLE),
            (read_out, c.output, OUT_SHARED, T_OUT_OFF, T_OUT_HANDLE),
        ] {
            if !read || addr == 0 {
                continue;
            }
            // Memory that legacy IPC cannot share (stream-ordered pools): the peers then say
            // so, and the operation goes by host.
            if let Some((h, o)) = self.device.export(addr) {
                shared |= bit;
                put(base, t + off, o);
                // SAFETY: the handle's bytes lie inside the token area.
                unsafe { std::ptr::copy_nonoverlapping(h.as_ptr(), base.add(t + handle), HANDLE_LEN) };
            }
        }
        put(base, t + T_SHARED, shared);
        Ok(())
    }

    /// Checks every peer's call against this rank's and maps the peer buffers this rank
    /// reads. Returns the status to send: every one mapped, or not.
    fn map_peers(&self, base: *mut u8, c: &mut IpcColl) -> Result<u64> {
        let d = c.desc;
        let rooted = matches!(d.kind, OpKind::Broadcast | OpKind::Reduce);
        let reduces = matches!(d.kind, OpKind::AllReduce | OpKind::ReduceScatter | OpKind::Reduce);
        let mut all = true;
        let _entered = self.device.enter()?;
        for s in c.peers().collect::<Vec<_>>() {
            let t = c.in_at(1, s);
            let w = |at: usize| get(base, t + at);
            if w(T_KIND) != d.kind as u64
                || w(T_DTYPE) != d.dtype as u64
                || w(T_COUNT) != d.count as u64
                || (reduces && w(T_REDOP) != d.redop as u64)
                || (rooted && w(T_ROOT) != d.root as u64)
            {
                return Err(mismatch(self.world.name(), c, s, w));
            }
            let (need_in, need_out) = c.needs(s);
            let mut opened: Vec<([u8; HANDLE_LEN], CUdeviceptr, usize)> = Vec::new();
            for (need, bit, off, handle, len, out) in [
                (need_in, IN_SHARED, T_IN_OFF, T_IN_HANDLE, c.in_len(), false),
                (need_out, OUT_SHARED, T_OUT_OFF, T_OUT_HANDLE, c.out_len(), true),
            ] {
                if !need || !all {
                    continue;
                }
                if w(T_SHARED) & bit == 0 {
                    all = false;
                    continue;
                }
                let mut h = [0u8; HANDLE_LEN];
                // SAFETY: the handle's bytes lie inside the token area.
                unsafe { std::ptr::copy_nonoverlapping(base.add(t + handle), h.as_mut_ptr(), HANDLE_LEN) };
                let offset = w(off);
                // A peer's input and output in one allocation (in place, for one) are mapped
                // once.
                let (m, size) = match opened.iter().find(|(k, ..)| *k == h) {
                    Some(&(_, m, size)) => (m, size),
                    None => match self.device.open(&h) {
                        Ok((m, size)) => {
                            c.mappings.push(m);
                            opened.push((h, m, size));
                            (m, size)
                        }
                        // A mapping that fails (GPUs without peer access, ranks in one
                        // process): by host.
                        Err(_) => {
                            all = false;
                            continue;
                        }
                    },
                };
                // The token's range must lie inside the allocation it names.
                if offset.checked_add(len as u64).is_none_or(|end| end > size as u64) {
                    return Err(Error::invalid_usage(format!(
                        "world '{}': rank {s}'s buffer ({len} bytes at offset {offset}) is not inside the \
                         allocation it names",
                        self.world.name()
                    )));
                }
                if out {
                    c.peer_out[s] = m + offset;
                } else {
                    c.peer_in[s] = m + offset;
                }
            }
        }
        Ok(if all { MAPPED_ALL } else { BY_HOST })
    }

    /// Every status is in: mapped if every rank mapped all it reads, else by host. Either way
    /// the stream may start phase 1.
    fn choose(&self, p: &mut Parts) -> Result<()> {
        let (base, c) = (p.base, &mut *p.c);
        let mut mapped = get(base, c.out_at(2)) == MAPPED_ALL;
        for s in c.peers() {
            match get(base, c.in_at(2, s)) {
                MAPPED_ALL => {}
                BY_HOST => mapped = false,
                v => return Err(Error::internal(format!("CUDA IPC: rank {s} sent status {v}"))),
            }
        }
        if mapped {
            c.tell_phase1(base);
            c.mode = Some(Mode::Mapped);
            self.count_coll(true);
        } else {
            // Nothing is read through the mappings: they go now, and round 3 says so (no rank
            // may let its caller free a buffer that a peer still maps).
            if !c.mappings.is_empty() {
                let _entered = self.device.enter()?;
                c.mappings.drain(..).for_each(|m| self.device.close(m));
            }
            put(base, c.out_at(3), UNMAPPED);
            // The stream copies the input into the block, as a staged operation does.
            let copy = if c.desc.in_place {
                c.recv.map(|(a, len)| (a, p.dev + c.stage_recv.0 as u64, len as u64))
            } else {
                c.send.map(|(a, len)| (a, p.dev + c.stage_send.0 as u64, len as u64))
            };
            tell_copies(base, c.ctl + IN_COPY, copy.as_slice());
            c.mode = Some(Mode::ByHost);
            self.count_coll(false);
        }
        write_flag(base, c.ctl + GO1, 1);
        Ok(())
    }

    /// By host: round 3 (this rank's mappings are closed); once the stream copied the input
    /// into the block, the staged operation; once it is done and every peer's round 3 is in,
    /// the copy out. True if anything moved.
    fn step_by_host(&self, p: &mut Parts) -> Result<bool> {
        if p.c.posted == 2 {
            return self.post_round(p, 3);
        }
        let (base, c) = (p.base, &mut *p.c);
        match &c.host_op {
            None if read_flag(base, c.ctl + P1) == 1 => {
                // SAFETY: both views lie inside the block, which stays alive and untouched by
                // the stream (it waits on GO2 or DONE) until the operation completes.
                let (send, recv) = unsafe {
                    (
                        RawBuf::from_raw(base.wrapping_add(c.stage_send.0), c.stage_send.1, false),
                        RawBuf::from_raw(base.wrapping_add(c.stage_recv.0), c.stage_recv.1, true),
                    )
                };
                // SAFETY: as above.
                let mut done = unsafe { self.post_watched(vec![(c.desc, send, recv)]) }?;
                let done = done.pop().ok_or_else(|| Error::internal("posting an operation gave no completion"))?;
                p.messages.push(done.clone());
                c.host_op = Some(done);
                Ok(true)
            }
            Some(done) if !c.landed && done.is_done() && c.round_in(3) => {
                if let Some(Err(e)) = done.result() {
                    return Err(e);
                }
                for s in c.peers() {
                    let v = get(base, c.in_at(3, s));
                    if v != UNMAPPED {
                        return Err(Error::internal(format!("CUDA IPC: rank {s} sent {v} in round 3")));
                    }
                }
                let copy = c.recv.map(|(a, len)| (p.dev + c.stage_recv.0 as u64, a, len as u64));
                tell_copies(base, c.ctl + AFTER, copy.as_slice());
                if c.phases == 2 {
                    // Phase 2 has nothing to do.
                    write_flag(base, c.ctl + GO2, 1);
                }
                c.landed = true;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Posts round `round` of the collective: this rank's message to every peer and the
    /// receive of every peer's, as one group. True (it moved).
    fn post_round(&self, p: &mut Parts, round: u8) -> Result<bool> {
        let (base, c) = (p.base, &mut *p.c);
        let len = if round == 1 { TOKEN_LEN } else { 8 };
        let desc = |peer, is_send| OpDesc {
            kind: OpKind::P2p,
            dtype: DataType::I8,
            redop: ReduceOp::Sum,
            count: len,
            root: peer,
            is_send,
            in_place: false,
        };
        let mut ops = Vec::new();
        for s in c.peers() {
            // SAFETY: the areas lie inside the block, which stays alive and untouched by the
            // stream until these messages have completed (the block is reused only after all
            // have).
            let (out, inc) = unsafe {
                (
                    RawBuf::from_raw(base.wrapping_add(c.out_at(round)), len, false),
                    RawBuf::from_raw(base.wrapping_add(c.in_at(round, s)), len, true),
                )
            };
            ops.push((desc(s, true), out, RawBuf::EMPTY));
            ops.push((desc(s, false), RawBuf::EMPTY, inc));
        }
        // SAFETY: as above.
        let done = unsafe { self.post_watched(ops) }?;
        p.messages.extend(done.iter().cloned());
        c.received.push(done.into_iter().skip(1).step_by(2).collect());
        c.posted = round;
        Ok(true)
    }
}

/// The error of a peer whose call differs from this rank's.
fn mismatch(world: &str, c: &IpcColl, s: usize, w: impl Fn(usize) -> u64) -> Error {
    let kind = u8::try_from(w(T_KIND)).ok().and_then(OpKind::from_u8).map_or("?", |k| k.name());
    let dtype = u32::try_from(w(T_DTYPE)).ok().and_then(DataType::from_code).map_or("?", |d| d.name());
    let redop = u32::try_from(w(T_REDOP)).ok().and_then(ReduceOp::from_code).map_or("?", |r| r.name());
    let d = &c.desc;
    Error::invalid_usage(format!(
        "world '{world}': rank {s} calls {kind} of {} {dtype} (reduction {redop}, root {}), rank {} calls {} of {} {} \
         (reduction {}, root {})",
        w(T_COUNT),
        w(T_ROOT),
        c.rank,
        d.kind.name(),
        d.count,
        d.dtype.name(),
        d.redop.name(),
        d.root
    ))
}
