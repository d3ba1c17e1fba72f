//! [`World`]: one communicator — a name, a rank, a size — and its operations.
//!
//! Every operation exists in a blocking form on borrowed slices (returns when done, like a
//! host-side NCCL call followed by a stream synchronize) and a non-blocking form on owned
//! vectors that returns a [`Request`]; inside [`World::scope`] (`api/scope.rs`), non-blocking
//! operations borrow their buffers instead. Arguments are checked here, on this rank, before
//! anything is sent: a bad call gets an `InvalidArgument` error and changes nothing. Checks
//! that need the other ranks' calls (counts, types, ops, roots) happen on the wire, in the
//! engine.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use crate::api::elastic::Lineage;
use crate::api::error::{BrokenCause, Error, Result};
use crate::api::options::BackendChoice;
use crate::api::request::{Completion, Failed, KeepAlive, Progress, Request, Slot};
use crate::api::types::{DataType, Element, ReduceOp};
use crate::backend::Backend;
use crate::coll::OpDesc;
use crate::engine::wire::OpKind;
use crate::engine::{Direct, Posted, WorldStats};
use crate::sys::buf::RawBuf;
use crate::sys::sync::{Arc, AtomicBool, AtomicU64, Ordering};
use crate::transport::TransportKind;

/// Where a world stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorldState {
    /// Formed and usable.
    Ready,
    /// Broken: every operation fails. Remove it and form a new one.
    Broken(BrokenCause),
    /// Removed from its manager; every operation fails.
    Removed,
}

pub(crate) struct WorldInner {
    pub name: Arc<str>,
    pub rank: usize,
    pub size: usize,
    pub generation: u32,
    pub backend: Arc<dyn Backend>,
    /// Operation deadline in milliseconds; 0 = none.
    pub op_timeout_ms: AtomicU64,
    pub removed: AtomicBool,
    /// What worlds made from this one need (`api/elastic.rs`).
    pub lineage: Lineage,
}

/// One communicator and its own fault domain. Cheap to clone (a handle); all clones are the
/// same world.
#[derive(Clone)]
pub struct World {
    pub(crate) inner: Arc<WorldInner>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("name", &self.name())
            .field("rank", &self.rank())
            .field("size", &self.size())
            .field("generation", &self.generation())
            .finish()
    }
}

/// What one call looks like before it is posted.
pub(crate) struct Call {
    desc: OpDesc,
    send: RawBuf,
    recv: RawBuf,
}

/// How long a blocking receive keeps looking for its frame on the direct path before it posts
/// the call and lets the driver spin and sleep.
const DIRECT_RECV_SPIN: Duration = Duration::from_micros(20);

fn desc(kind: OpKind, dtype: DataType, count: usize) -> OpDesc {
    OpDesc { kind, dtype, redop: ReduceOp::Sum, count, root: 0, is_send: false, in_place: false }
}

impl World {
    pub(crate) fn new(inner: WorldInner) -> World {
        World { inner: Arc::new(inner) }
    }

    /// The world's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// This process's rank in the world.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// Generation of this instance of the name: each new world under a name gets a larger one.
    pub fn generation(&self) -> u32 {
        self.inner.generation
    }

    /// Ready, broken (with the cause) or removed.
    pub fn state(&self) -> WorldState {
        if self.inner.removed.load(Ordering::Acquire) {
            return WorldState::Removed;
        }
        match self.inner.backend.broken() {
            Some(c) => WorldState::Broken(c),
            None => WorldState::Ready,
        }
    }

    /// Counters: operations, bytes, heartbeats, dropped stale frames.
    pub fn stats(&self) -> WorldStats {
        self.inner.backend.stats()
    }

    /// The transport used to reach each rank (`None` for this rank itself).
    pub fn transports(&self) -> Vec<Option<TransportKind>> {
        self.inner.backend.transports()
    }

    /// Breaks the world from this side: every pending and later operation fails with
    /// `WorldBroken`, the peers are told, sockets and threads are released. Local,
    /// non-blocking and idempotent; needs no peer.
    pub fn abort(&self) {
        self.inner.backend.abort();
    }

    /// Sets the deadline of operations posted from now on (`None`: no deadline). An operation
    /// that passes it fails with `Timeout` and breaks the world.
    pub fn set_op_timeout(&self, t: Option<Duration>) {
        let ms = t.map_or(0, |d| d.as_millis().clamp(1, u64::MAX as u128) as u64);
        self.inner.op_timeout_ms.store(ms, Ordering::Release);
    }

    pub(crate) fn op_timeout(&self) -> Option<Duration> {
        match self.inner.op_timeout_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    fn err(&self, what: impl std::fmt::Display) -> Error {
        Error::invalid_arg(format!("world '{}' rank {}: {what}", self.name(), self.rank()))
    }

    fn check_rank(&self, r: usize, role: &str) -> Result<()> {
        if r >= self.size() {
            return Err(self.err(format!("{role} rank {r} is out of range for a world of {} ranks", self.size())));
        }
        Ok(())
    }

    fn check_len(&self, op: &str, which: &str, got: usize, want: usize) -> Result<()> {
        if got != want {
            return Err(self.err(format!("{op} needs a {which} buffer of {want} elements, got {got}")));
        }
        Ok(())
    }

    fn usable(&self) -> Result<()> {
        if self.inner.removed.load(Ordering::Acquire) {
            return Err(Error::invalid_usage(format!("world '{}' was removed", self.name())));
        }
        Ok(())
    }

    /// [`World::usable`] for the caller's operations on host memory, which an NCCL world
    /// refuses (its links carry only what the crate itself agrees over them).
    fn usable_for_host(&self) -> Result<()> {
        self.usable()?;
        if self.backend() == BackendChoice::Nccl {
            return Err(Error::invalid_usage(format!(
                "world '{}' runs on NCCL, which moves device buffers only: host-memory operations are refused \
                 (use a DeviceWorld, or form the world with the native backend)",
                self.name()
            )));
        }
        Ok(())
    }

    /// The options the world was formed with (the backend as settled then).
    pub(crate) fn options(&self) -> &crate::api::options::WorldOptions {
        &self.inner.lineage.options
    }

    /// Breaks the world from this side with `cause`, which its peers are told: local,
    /// non-blocking, idempotent (a world already broken keeps its first cause).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn break_with(&self, cause: BrokenCause) {
        self.inner.backend.break_with(cause);
    }

    /// What runs this world's operations on device buffers (settled at formation).
    pub fn backend(&self) -> BackendChoice {
        self.options().backend
    }

    fn posted(&self, c: Call, completion: Arc<Completion>, keepalive: Option<KeepAlive>) -> Posted {
        Posted { desc: c.desc, send: c.send, recv: c.recv, completion, timeout: self.op_timeout(), keepalive }
    }

    /// Posts one call and waits for it.
    fn run_one(&self, call: Call) -> Result<()> {
        self.usable_for_host()?;
        if call.desc.kind == OpKind::P2p {
            // A lone small send or receive on shared memory or TCP: done at once when the link
            // allows (`engine/direct.rs`). A receive whose frame is not there yet looks again
            // for a few microseconds, as the driver would spin before sleeping, since the frame
            // is usually just behind.
            let backend = &self.inner.backend;
            let mut spin_until = None;
            let mut tries = 0u32;
            loop {
                match backend.run_direct(&call.desc, call.send, call.recv) {
                    Direct::Done => return Ok(()),
                    Direct::Writing(c) => {
                        backend.wait(&[&c], None);
                        return c.result().unwrap_or_else(|| Err(Error::internal("send ended without a result")));
                    }
                    Direct::No => break,
                    Direct::Later => {}
                }
                tries += 1;
                if tries % 16 == 0 {
                    let now = Instant::now();
                    if now >= *spin_until.get_or_insert(now + DIRECT_RECV_SPIN) {
                        break;
                    }
                }
                std::hint::spin_loop();
            }
        }
        let c = Completion::new();
        self.inner.backend.post_one(self.posted(call, c.clone(), None), true);
        self.inner.backend.wait(&[&c], None);
        c.result().unwrap_or_else(|| Err(Error::internal("operation ended without a result")))
    }

    /// Posts one call whose deadline is at most `limit` (or the world's operation deadline,
    /// if shorter) and waits for it: what elastic calls agree over the world is bounded by
    /// the formation deadline, whatever the world's own operation deadline.
    pub(crate) fn run_bounded(&self, call: Call, limit: Duration) -> Result<()> {
        let c = self.post_bounded(call, limit, None, true)?;
        self.wait_for(std::slice::from_ref(&c));
        c.result().unwrap_or_else(|| Err(Error::internal("operation ended without a result")))
    }

    /// Posts one call whose deadline is at most `limit` (see [`World::run_bounded`]) without
    /// waiting for it; `keep` (its buffers) lives until the engine is done with it. `driven`:
    /// the caller waits for it right away (else the progress pool drives it).
    pub(crate) fn post_bounded(
        &self,
        call: Call,
        limit: Duration,
        keep: Option<KeepAlive>,
        driven: bool,
    ) -> Result<Arc<Completion>> {
        self.usable()?;
        let c = Completion::new();
        let mut p = self.posted(call, c.clone(), keep);
        p.timeout = Some(p.timeout.map_or(limit, |t| t.min(limit)));
        self.inner.backend.post_one(p, driven);
        Ok(c)
    }

    /// Posts operations on raw buffers (the C ABI) as one batch. With `wait`, blocks until all
    /// are done and returns the first error; otherwise returns their completions at once.
    ///
    /// # Safety
    /// Each view's memory must stay valid, and untouched by anyone else, until its operation
    /// completes (the C caller's contract, as with NCCL).
    pub(crate) unsafe fn post_raw(
        &self,
        ops: Vec<(OpDesc, RawBuf, RawBuf)>,
        wait: bool,
    ) -> Result<Vec<Arc<Completion>>> {
        let completions =
            self.post_calls(ops.into_iter().map(|(desc, send, recv)| Call { desc, send, recv }).collect(), wait)?;
        if wait {
            self.wait_for(&completions);
        }
        Ok(completions)
    }

    /// Blocks until every completion (of operations of this world) is done.
    pub(crate) fn wait_for(&self, completions: &[Arc<Completion>]) {
        let all: Vec<&Completion> = completions.iter().map(|c| &**c).collect();
        self.inner.backend.wait(&all, None);
    }

    /// Posts calls as one batch and returns their completions at once, in order. `driven`: the
    /// caller waits for them right away (and drives them itself if it can).
    pub(crate) fn post_calls(&self, calls: Vec<Call>, driven: bool) -> Result<Vec<Arc<Completion>>> {
        self.usable_for_host()?;
        let completions: Vec<_> = calls.iter().map(|_| Completion::new()).collect();
        let posted = calls.into_iter().zip(&completions).map(|(c, k)| self.posted(c, k.clone(), None)).collect();
        self.inner.backend.post(posted, driven);
        Ok(completions)
    }

    /// Posts calls as one batch and waits for all of them; the first error wins.
    fn run(&self, calls: Vec<Call>) -> Result<()> {
        let completions = self.post_calls(calls, true)?;
        self.wait_for(&completions);
        let mut first = Ok(());
        for c in &completions {
            let r = c.result().unwrap_or_else(|| Err(Error::internal("operation ended without a result")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Posts one call on owned buffers and returns its request; a call that fails its checks
    /// comes back as a request that is already complete with the error (the buffers are not
    /// lost).
    fn post_owned<B: Send + 'static>(&self, bufs: B, make: impl FnOnce(&mut B) -> Result<Call>) -> Request<B> {
        let slot = Slot::new(bufs);
        let completion = Completion::new();
        let progress: Arc<dyn Progress> = self.inner.backend.clone();
        let call =
            self.usable_for_host().and_then(|_| slot.with(make).unwrap_or_else(|| Err(Error::internal("empty slot"))));
        match call {
            Ok(call) => {
                let keep: KeepAlive = slot.clone();
                let p = self.posted(call, completion.clone(), Some(keep));
                self.inner.backend.post_one(p, false);
            }
            Err(e) => completion.complete(Err(e)),
        }
        Request::new(completion, slot, progress)
    }

    // ----- argument checks, shared by blocking and non-blocking forms -----

    pub(crate) fn p2p_call<T: Element>(&self, send: Option<&[T]>, recv: Option<&mut [T]>, peer: usize) -> Result<Call> {
        self.check_rank(peer, "peer")?;
        let is_send = send.is_some();
        let (count, s, r) = match (send, recv) {
            (Some(s), _) => (s.len(), RawBuf::from_slice(s), RawBuf::EMPTY),
            (None, Some(r)) => (r.len(), RawBuf::EMPTY, RawBuf::from_mut(r)),
            (None, None) => return Err(Error::internal("p2p call without a buffer")),
        };
        let d = OpDesc { root: peer, is_send, ..desc(OpKind::P2p, T::DATA_TYPE, count) };
        Ok(Call { desc: d, send: s, recv: r })
    }

    pub(crate) fn broadcast_call<T: Element>(
        &self,
        send: Option<&[T]>,
        recv: &mut [T],
        root: usize,
        in_place: bool,
    ) -> Result<Call> {
        self.check_rank(root, "root")?;
        let mut s = RawBuf::EMPTY;
        if self.rank() == root && !in_place {
            let Some(send) = send else {
                return Err(self.err("broadcast: the root must pass a send buffer"));
            };
            self.check_len("broadcast", "send", send.len(), recv.len())?;
            s = RawBuf::from_slice(send);
        }
        let d = OpDesc { root, in_place, ..desc(OpKind::Broadcast, T::DATA_TYPE, recv.len()) };
        Ok(Call { desc: d, send: s, recv: RawBuf::from_mut(recv) })
    }

    fn reduce_call<T: Element>(&self, send: Option<&[T]>, recv: &mut [T], op: ReduceOp, root: usize) -> Result<Call> {
        self.check_rank(root, "root")?;
        let in_place = send.is_none();
        let count = send.map_or(recv.len(), |s| s.len());
        if !in_place && self.rank() == root {
            self.check_len("reduce", "receive", recv.len(), count)?;
        }
        let d = OpDesc { root, redop: op, in_place, ..desc(OpKind::Reduce, T::DATA_TYPE, count) };
        let recv = if in_place || self.rank() == root { RawBuf::from_mut(recv) } else { RawBuf::EMPTY };
        Ok(Call { desc: d, send: send.map_or(RawBuf::EMPTY, RawBuf::from_slice), recv })
    }

    pub(crate) fn all_reduce_call<T: Element>(&self, send: Option<&[T]>, recv: &mut [T], op: ReduceOp) -> Result<Call> {
        if let Some(s) = send {
            self.check_len("all_reduce", "receive", recv.len(), s.len())?;
        }
        let d = OpDesc { redop: op, in_place: send.is_none(), ..desc(OpKind::AllReduce, T::DATA_TYPE, recv.len()) };
        Ok(Call { desc: d, send: send.map_or(RawBuf::EMPTY, RawBuf::from_slice), recv: RawBuf::from_mut(recv) })
    }

    /// Count per rank of a buffer that holds one block per rank.
    fn per_rank(&self, op: &str, len: usize) -> Result<usize> {
        if len % self.size() != 0 {
            return Err(self.err(format!(
                "{op} needs a buffer of one equal block per rank: {len} elements do not split into {} blocks",
                self.size()
            )));
        }
        Ok(len / self.size())
    }

    pub(crate) fn all_gather_call<T: Element>(&self, send: Option<&[T]>, recv: &mut [T]) -> Result<Call> {
        let count = match send {
            Some(s) => {
                self.check_len("all_gather", "receive", recv.len(), s.len() * self.size())?;
                s.len()
            }
            None => self.per_rank("all_gather", recv.len())?,
        };
        let d = OpDesc { in_place: send.is_none(), ..desc(OpKind::AllGather, T::DATA_TYPE, count) };
        Ok(Call { desc: d, send: send.map_or(RawBuf::EMPTY, RawBuf::from_slice), recv: RawBuf::from_mut(recv) })
    }

    fn reduce_scatter_call<T: Element>(&self, send: Option<&[T]>, recv: &mut [T], op: ReduceOp) -> Result<Call> {
        let count = match send {
            Some(s) => {
                self.check_len("reduce_scatter", "send", s.len(), recv.len() * self.size())?;
                recv.len()
            }
            None => self.per_rank("reduce_scatter", recv.len())?,
        };
        let d = OpDesc { redop: op, in_place: send.is_none(), ..desc(OpKind::ReduceScatter, T::DATA_TYPE, count) };
        Ok(Call { desc: d, send: send.map_or(RawBuf::EMPTY, RawBuf::from_slice), recv: RawBuf::from_mut(recv) })
    }

    fn gather_call<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<Call> {
        self.check_rank(root, "root")?;
        let is_root = self.rank() == root;
        if is_root {
            self.check_len("gather", "receive", recv.len(), send.len() * self.size())?;
        }
        let d = OpDesc { root, ..desc(OpKind::Gather, T::DATA_TYPE, send.len()) };
        let recv = if is_root { RawBuf::from_mut(recv) } else { RawBuf::EMPTY };
        Ok(Call { desc: d, send: RawBuf::from_slice(send), recv })
    }

    fn scatter_call<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<Call> {
        self.check_rank(root, "root")?;
        let is_root = self.rank() == root;
        if is_root {
            self.check_len("scatter", "send", send.len(), recv.len() * self.size())?;
        }
        let d = OpDesc { root, ..desc(OpKind::Scatter, T::DATA_TYPE, recv.len()) };
        let send = if is_root { RawBuf::from_slice(send) } else { RawBuf::EMPTY };
        Ok(Call { desc: d, send, recv: RawBuf::from_mut(recv) })
    }

    fn all_to_all_call<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<Call> {
        self.check_len("all_to_all", "receive", recv.len(), send.len())?;
        let count = self.per_rank("all_to_all", send.len())?;
        let d = desc(OpKind::AllToAll, T::DATA_TYPE, count);
        Ok(Call { desc: d, send: RawBuf::from_slice(send), recv: RawBuf::from_mut(recv) })
    }

    fn barrier_call(&self) -> Call {
        Call { desc: desc(OpKind::Barrier, DataType::U8, 0), send: RawBuf::EMPTY, recv: RawBuf::EMPTY }
    }

    // ----- blocking operations -----

    /// Sends `buf` to `peer`, which must post a matching [`World::recv`] (same count and
    /// type). Returns once the data has left this rank's buffer.
    pub fn send<T: Element>(&self, buf: &[T], peer: usize) -> Result<()> {
        self.run_one(self.p2p_call(Some(buf), None, peer)?)
    }

    /// Receives from `peer` into `buf` (the sender's count and type must match).
    pub fn recv<T: Element>(&self, buf: &mut [T], peer: usize) -> Result<()> {
        self.run_one(self.p2p_call(None, Some(buf), peer)?)
    }

    /// Copies the root's `send` into every rank's `recv`. Non-root ranks pass `None`.
    pub fn broadcast<T: Element>(&self, send: Option<&[T]>, recv: &mut [T], root: usize) -> Result<()> {
        self.run_one(self.broadcast_call(send, recv, root, false)?)
    }

    /// Broadcast from the root's `buf` into every rank's `buf`.
    pub fn broadcast_in_place<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.run_one(self.broadcast_call(None, buf, root, true)?)
    }

    /// Reduces every rank's `send` with `op` into the root's `recv` (ignored on other ranks,
    /// which may pass an empty slice).
    pub fn reduce<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.run_one(self.reduce_call(Some(send), recv, op, root)?)
    }

    /// Reduce with the input and, on the root, the output in `buf`. Other ranks' `buf` may
    /// be used as scratch space.
    pub fn reduce_in_place<T: Element>(&self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.run_one(self.reduce_call(None, buf, op, root)?)
    }

    /// Reduces every rank's `send` with `op`; every rank gets the same result in `recv`, bit
    /// for bit.
    pub fn all_reduce<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        self.run_one(self.all_reduce_call(Some(send), recv, op)?)
    }

    /// All-reduce in place.
    pub fn all_reduce_in_place<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.run_one(self.all_reduce_call(None, buf, op)?)
    }

    /// Gathers every rank's `send` into every rank's `recv`, in rank order
    /// (`recv.len() == send.len() * size`).
    pub fn all_gather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.run_one(self.all_gather_call(Some(send), recv)?)
    }

    /// All-gather in place: this rank's block is already at `buf[rank * count..]`.
    pub fn all_gather_in_place<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        self.run_one(self.all_gather_call(None, buf)?)
    }

    /// Reduces every rank's `send` (one block per rank) with `op`; rank `r` gets block `r` of
    /// the result in `recv` (`send.len() == recv.len() * size`).
    pub fn reduce_scatter<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        self.run_one(self.reduce_scatter_call(Some(send), recv, op)?)
    }

    /// Reduce-scatter in place: the result lands in `buf[rank * count..(rank + 1) * count]`.
    pub fn reduce_scatter_in_place<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.run_one(self.reduce_scatter_call(None, buf, op)?)
    }

    /// Gathers every rank's `send` into the root's `recv`, in rank order (ignored elsewhere).
    pub fn gather<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.run_one(self.gather_call(send, recv, root)?)
    }

    /// Sends block `r` of the root's `send` to rank `r`'s `recv` (`send` ignored elsewhere).
    pub fn scatter<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.run_one(self.scatter_call(send, recv, root)?)
    }

    /// Sends block `r` of `send` to rank `r`, which stores it as block `rank` of its `recv`.
    pub fn all_to_all<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.run_one(self.all_to_all_call(send, recv)?)
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&self) -> Result<()> {
        self.run_one(self.barrier_call())
    }

    /// Starts a group: operations recorded on it are posted together by [`Group::end`], so
    /// that sends and receives between the same ranks cannot deadlock (NCCL's
    /// `ncclGroupStart`/`ncclGroupEnd`).
    pub fn group(&self) -> Group<'_> {
        Group { world: self, calls: Vec::new(), ended: false, _bufs: PhantomData }
    }

    // ----- non-blocking operations -----

    /// Non-blocking [`World::send`].
    pub fn send_async<T: Element>(&self, buf: Vec<T>, peer: usize) -> Request<Vec<T>> {
        self.post_owned(buf, |b| self.p2p_call(Some(b), None, peer))
    }

    /// Non-blocking [`World::recv`].
    pub fn recv_async<T: Element>(&self, buf: Vec<T>, peer: usize) -> Request<Vec<T>> {
        self.post_owned(buf, |b| self.p2p_call(None, Some(b), peer))
    }

    /// Non-blocking [`World::broadcast_in_place`].
    pub fn broadcast_async<T: Element>(&self, buf: Vec<T>, root: usize) -> Request<Vec<T>> {
        self.post_owned(buf, |b| self.broadcast_call(None, b, root, true))
    }

    /// Non-blocking [`World::reduce_in_place`].
    pub fn reduce_async<T: Element>(&self, buf: Vec<T>, op: ReduceOp, root: usize) -> Request<Vec<T>> {
        self.post_owned(buf, |b| self.reduce_call(None, b, op, root))
    }

    /// Non-blocking [`World::all_reduce_in_place`].
    pub fn all_reduce_async<T: Element>(&self, buf: Vec<T>, op: ReduceOp) -> Request<Vec<T>> {
        self.post_owned(buf, |b| self.all_reduce_call(None, b, op))
    }

    /// Non-blocking [`World::all_gather`]; gives back `(send, recv)`.
    pub fn all_gather_async<T: Element>(&self, send: Vec<T>, recv: Vec<T>) -> Request<(Vec<T>, Vec<T>)> {
        self.post_owned((send, recv), |(s, r)| self.all_gather_call(Some(s), r))
    }

    /// Non-blocking [`World::reduce_scatter`]; gives back `(send, recv)`.
    pub fn reduce_scatter_async<T: Element>(
        &self,
        send: Vec<T>,
        recv: Vec<T>,
        op: ReduceOp,
    ) -> Request<(Vec<T>, Vec<T>)> {
        self.post_owned((send, recv), |(s, r)| self.reduce_scatter_call(Some(s), r, op))
    }

    /// Non-blocking [`World::gather`]; gives back `(send, recv)`.
    pub fn gather_async<T: Element>(&self, send: Vec<T>, recv: Vec<T>, root: usize) -> Request<(Vec<T>, Vec<T>)> {
        self.post_owned((send, recv), |(s, r)| self.gather_call(s, r, root))
    }

    /// Non-blocking [`World::scatter`]; gives back `(send, recv)`.
    pub fn scatter_async<T: Element>(&self, send: Vec<T>, recv: Vec<T>, root: usize) -> Request<(Vec<T>, Vec<T>)> {
        self.post_owned((send, recv), |(s, r)| self.scatter_call(s, r, root))
    }

    /// Non-blocking [`World::all_to_all`]; gives back `(send, recv)`.
    pub fn all_to_all_async<T: Element>(&self, send: Vec<T>, recv: Vec<T>) -> Request<(Vec<T>, Vec<T>)> {
        self.post_owned((send, recv), |(s, r)| self.all_to_all_call(s, r))
    }

    /// Non-blocking [`World::barrier`].
    pub fn barrier_async(&self) -> Request<()> {
        self.post_owned((), |_| Ok(self.barrier_call()))
    }
}

/// Operations recorded to be posted together (see [`World::group`]). The buffers stay
/// borrowed until [`Group::end`] returns; a group started in a scope
/// ([`Scope::group`](crate::Scope::group)) can also be posted without waiting. Dropping a group without calling `end` ends it too
/// (like cudarc's group guard), but then its result is lost: call `end` to see errors.
#[must_use = "a group posts nothing until it ends"]
pub struct Group<'a> {
    world: &'a World,
    calls: Vec<Call>,
    ended: bool,
    _bufs: PhantomData<&'a mut [u8]>,
}

impl<'a> Group<'a> {
    /// Records a send of `buf` to `peer`.
    pub fn send<T: Element>(&mut self, buf: &'a [T], peer: usize) -> Result<()> {
        self.calls.push(self.world.p2p_call(Some(buf), None, peer)?);
        Ok(())
    }

    /// Records a receive into `buf` from `peer`.
    pub fn recv<T: Element>(&mut self, buf: &'a mut [T], peer: usize) -> Result<()> {
        self.calls.push(self.world.p2p_call(None, Some(buf), peer)?);
        Ok(())
    }

    /// Records an all-reduce (collectives in a group run in the order recorded).
    pub fn all_reduce<T: Element>(&mut self, send: &'a [T], recv: &'a mut [T], op: ReduceOp) -> Result<()> {
        self.calls.push(self.world.all_reduce_call(Some(send), recv, op)?);
        Ok(())
    }

    /// Records a broadcast.
    pub fn broadcast<T: Element>(&mut self, send: Option<&'a [T]>, recv: &'a mut [T], root: usize) -> Result<()> {
        self.calls.push(self.world.broadcast_call(send, recv, root, false)?);
        Ok(())
    }

    /// Records a reduce to `root` (`recv` matters on the root only, as in [`World::reduce`]).
    pub fn reduce<T: Element>(&mut self, send: &'a [T], recv: &'a mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.calls.push(self.world.reduce_call(Some(send), recv, op, root)?);
        Ok(())
    }

    /// Records an all-gather.
    pub fn all_gather<T: Element>(&mut self, send: &'a [T], recv: &'a mut [T]) -> Result<()> {
        self.calls.push(self.world.all_gather_call(Some(send), recv)?);
        Ok(())
    }

    /// Records a reduce-scatter.
    pub fn reduce_scatter<T: Element>(&mut self, send: &'a [T], recv: &'a mut [T], op: ReduceOp) -> Result<()> {
        self.calls.push(self.world.reduce_scatter_call(Some(send), recv, op)?);
        Ok(())
    }

    /// Records a gather to `root`.
    pub fn gather<T: Element>(&mut self, send: &'a [T], recv: &'a mut [T], root: usize) -> Result<()> {
        self.calls.push(self.world.gather_call(send, recv, root)?);
        Ok(())
    }

    /// Records a scatter from `root`.
    pub fn scatter<T: Element>(&mut self, send: &'a [T], recv: &'a mut [T], root: usize) -> Result<()> {
        self.calls.push(self.world.scatter_call(send, recv, root)?);
        Ok(())
    }

    /// Records an all-to-all.
    pub fn all_to_all<T: Element>(&mut self, send: &'a [T], recv: &'a mut [T]) -> Result<()> {
        self.calls.push(self.world.all_to_all_call(send, recv)?);
        Ok(())
    }

    /// Records a barrier.
    pub fn barrier(&mut self) -> Result<()> {
        self.calls.push(self.world.barrier_call());
        Ok(())
    }

    /// Takes the recorded calls out (the group is then ended, and posts nothing when dropped).
    pub(crate) fn take_calls(mut self) -> Vec<Call> {
        self.ended = true;
        std::mem::take(&mut self.calls)
    }

    /// Posts everything recorded and waits for all of it; returns the first error.
    pub fn end(mut self) -> Result<()> {
        self.ended = true;
        let calls = std::mem::take(&mut self.calls);
        if calls.is_empty() {
            return Ok(());
        }
        self.world.run(calls)
    }
}

impl Drop for Group<'_> {
    fn drop(&mut self) {
        if !self.ended && !self.calls.is_empty() {
            let calls = std::mem::take(&mut self.calls);
            // The buffers are borrowed for the group's life, which ends here: run it now.
            let _ = self.world.run(calls);
        }
    }
}

/// Hands [`Failed`] back as a plain error where the buffers are not needed.
impl<B> Failed<B> {
    /// Drops the buffers and keeps the error.
    pub fn into_error(self) -> Error {
        self.error
    }
}
