//! Collectives on CUDA device memory (feature `cuda`), ordered on a CUDA stream, that never
//! leave the stream waiting on a peer.
//!
//! [`DeviceWorld`] reads like cudarc's NCCL `Comm`: it binds a world to a stream, takes
//! cudarc device buffers in the same positions, and each call only *enqueues* its work on the
//! stream and returns, as NCCL does. This version stages through pinned host memory: for each
//! operation the stream copies the input to a host buffer, raises a "ready" flag, waits on a
//! "done" flag, and copies the result back. The host side — a thread per device world —
//! sees the ready flag, runs the operation with the world's host engine (every transport,
//! every algorithm), and writes "done" when it completes **or fails**. The stream only ever
//! waits on a flag that this process's own thread writes, and that thread writes it whatever
//! the peers do: a dead, hung or cut-off peer breaks the world, the operation fails, the flag
//! is written, and the stream moves on. The failure is reported by the next call (and by
//! [`DeviceWorld::error`] and the world's state); the output of a failed operation is
//! unspecified, as on the host.
//!
//! The flags live in mapped pinned memory, so the stream writes and waits on them with
//! `cuStreamWriteValue32` / `cuStreamWaitValue32`. Staging costs two PCIe copies per
//! operation; same-host CUDA IPC transfers and reductions with the crate's kernels on the GPU
//! are the next step (see docs/cuda.md).

use std::collections::VecDeque;
use std::time::Duration;

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

use crate::buf::RawBuf;
use crate::coll::OpDesc;
use crate::cuda::{check, Pinned};
use crate::error::{Error, ErrorKind, Result};
use crate::request::Completion;
use crate::sync::{fence, lock, wait_timeout, Arc, AtomicBool, Condvar, Mutex, Ordering};
use crate::types::{DataType, Element, ReduceOp};
use crate::wire::OpKind;
use crate::world::{World, WorldState};

/// Flag words at the start of each staging block; the data follows at `DATA`.
const READY: usize = 0;
const DONE: usize = 4;
const FINISHED: usize = 8;
const DATA: usize = 64;
/// Values of the done flag.
const DONE_OK: u32 = 1;
const DONE_FAILED: u32 = 2;

/// Where one staged operation stands.
enum Stage {
    /// Enqueued; the stream has not copied the input yet.
    Waiting,
    /// The host engine runs it.
    Running(Arc<Completion>),
    /// Done written; waiting for the stream to finish copying the result back.
    Releasing,
}

struct Staged {
    block: Pinned,
    desc: OpDesc,
    send_len: usize,
    recv_len: usize,
    stage: Stage,
}

impl Staged {
    fn flag(&self, at: usize) -> u32 {
        // SAFETY: the block holds at least DATA bytes; the flag words are aligned u32s that the
        // device writes through its mapping, hence the volatile read.
        let v = unsafe { std::ptr::read_volatile(self.block.host_ptr().add(at) as *const u32) };
        // What the device wrote before the flag is read after it (needed on weakly ordered
        // hosts).
        fence(Ordering::Acquire);
        v
    }

    fn set_done(&self, v: u32) {
        // SAFETY: as in `flag`; the fence orders the result bytes before the flag.
        unsafe {
            fence(Ordering::SeqCst);
            std::ptr::write_volatile(self.block.host_ptr().add(DONE) as *mut u32, v);
        }
    }
}

struct Shared {
    world: World,
    ctx: Arc<CudaContext>,
    /// Held by an enqueue from its first stream call until its operation joins `pending`.
    enqueue: Mutex<()>,
    /// The operations on the stream, in stream order.
    pending: Mutex<VecDeque<Staged>>,
    /// Staging blocks no stream uses any more. They are freed only when the device world goes
    /// (freeing pinned memory may wait for the whole device, including streams waiting on a
    /// stager), so the pool holds as much as was ever in flight at once.
    pool: Mutex<Vec<Pinned>>,
    /// The first operation error, reported by the next call.
    error: Mutex<Option<Error>>,
    closed: AtomicBool,
    bell: Condvar,
}

/// A world whose operations run on device buffers, ordered on one CUDA stream.
pub struct DeviceWorld {
    shared: Arc<Shared>,
    stream: Arc<CudaStream>,
}

impl DeviceWorld {
    /// Binds `world` to `stream` (of the device whose buffers the calls will pass).
    pub fn new(world: World, stream: Arc<CudaStream>) -> Result<DeviceWorld> {
        crate::cuda::driver_present()?;
        let ctx = stream.context().clone();
        let shared = Arc::new(Shared {
            world,
            ctx,
            enqueue: Mutex::new(()),
            pending: Mutex::new(VecDeque::new()),
            pool: Mutex::new(Vec::new()),
            error: Mutex::new(None),
            closed: AtomicBool::new(false),
            bell: Condvar::new(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("mw-dev-{}", shared.world.name().chars().take(8).collect::<String>()))
            .spawn(move || stager(&s))
            .map_err(|e| Error::system("spawning a device staging thread", e))?;
        Ok(DeviceWorld { shared, stream })
    }

    /// The world.
    pub fn world(&self) -> &World {
        &self.shared.world
    }

    /// The stream the operations are ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The first error of an operation that already ran, if any (operations report their
    /// failures asynchronously, like NCCL's `ncclCommGetAsyncError`).
    pub fn error(&self) -> Option<Error> {
        lock(&self.shared.error).clone()
    }

    /// Enqueues one operation: input to the staging block, ready, wait for done, output back.
    fn enqueue(
        &self,
        desc: OpDesc,
        send: Option<(CUdeviceptr, usize)>,
        recv: Option<(CUdeviceptr, usize)>,
    ) -> Result<()> {
        if let Some(e) = self.error() {
            return Err(e);
        }
        let w = &self.shared.world;
        match w.state() {
            WorldState::Ready => {}
            WorldState::Broken(c) => return Err(Error::broken(w.name(), w.rank(), c, false)),
            WorldState::Removed => return Err(Error::invalid_usage(format!("world '{}' was removed", w.name()))),
        }
        // One enqueue at a time, so that the stager's queue is in the stream's order (it posts
        // the operations in that order, and the stream runs them in its own).
        let _order = lock(&self.shared.enqueue);
        // The raw driver calls below act in the thread's current context.
        self.shared
            .ctx
            .bind_to_thread()
            .map_err(|e| Error::new(ErrorKind::Cuda, format!("binding the CUDA context: {e:?}")))?;
        let (slen, rlen) = (send.map_or(0, |s| s.1), recv.map_or(0, |r| r.1));
        let block = take_block(&self.shared, DATA + slen + rlen)?;
        let staged = Staged { block, desc, send_len: slen, recv_len: rlen, stage: Stage::Waiting };
        match self.stage_on_stream(&staged, send, recv) {
            Ok(()) => {
                lock(&self.shared.pending).push_back(staged);
                self.shared.bell.notify_all();
                Ok(())
            }
            Err(e) => {
                // Part of the operation may be on the stream: release any wait, and keep the
                // block out of reuse and unfreed (the stream may still write it). This rank
                // cannot take part in the operation the peers run, so the world breaks
                // rather than leave them waiting.
                staged.set_done(DONE_FAILED);
                std::mem::forget(staged.block);
                lock(&self.shared.error).get_or_insert(e.clone());
                self.shared.world.abort();
                Err(e)
            }
        }
    }

    /// The stream's part of one operation.
    fn stage_on_stream(
        &self,
        st: &Staged,
        send: Option<(CUdeviceptr, usize)>,
        recv: Option<(CUdeviceptr, usize)>,
    ) -> Result<()> {
        let s = self.stream.cu_stream();
        let (host, dev) = (st.block.host_ptr(), st.block.dev_ptr());
        let data = host.wrapping_add(DATA);
        let output = data.wrapping_add(st.send_len);
        let copy_in = |dst: *mut u8, src: CUdeviceptr, n: usize| -> Result<()> {
            // SAFETY: `dst` is inside the pinned block, sized for `n`; `src` is the caller's
            // device buffer of at least `n` bytes, valid while its stream runs.
            check("cuMemcpyDtoHAsync", unsafe { sys::cuMemcpyDtoHAsync_v2(dst.cast(), src, n, s) })
        };
        let write = |at: usize| -> Result<()> {
            // SAFETY: the flag word is inside the mapped block. The default flags order the
            // stream's earlier writes (the copies) before the flag.
            check("cuStreamWriteValue32", unsafe {
                sys::cuStreamWriteValue32_v2(
                    s,
                    dev + at as u64,
                    1,
                    sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
                )
            })
        };
        if let Some((p, n)) = send {
            copy_in(data, p, n)?;
        }
        if st.desc.in_place {
            if let Some((p, n)) = recv {
                copy_in(output, p, n)?;
            }
        }
        write(READY)?;
        // SAFETY: as above. DONE_OK and DONE_FAILED both release the wait.
        check("cuStreamWaitValue32", unsafe {
            sys::cuStreamWaitValue32_v2(
                s,
                dev + DONE as u64,
                DONE_OK,
                sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
            )
        })?;
        if let Some((p, n)) = recv {
            // SAFETY: the block's output area, `n` bytes, to the caller's device buffer.
            check("cuMemcpyHtoDAsync", unsafe { sys::cuMemcpyHtoDAsync_v2(p, output.cast(), n, s) })?;
        }
        write(FINISHED)
    }

    /// A buffer's address and size in bytes, and cudarc's guard, which must live until the
    /// operation is enqueued (it orders the stream after other streams' writes of the buffer).
    fn ptr<'a, T, S: DevicePtr<T>>(&'a self, s: &'a S) -> ((CUdeviceptr, usize), SyncOnDrop<'a>) {
        let n = s.len() * std::mem::size_of::<T>();
        let (p, guard) = s.device_ptr(&self.stream);
        ((p, n), guard)
    }

    /// [`DeviceWorld::ptr`] for a buffer the operation writes.
    fn ptr_mut<'a, T, R: DevicePtrMut<T>>(&'a self, r: &'a mut R) -> ((CUdeviceptr, usize), SyncOnDrop<'a>) {
        let n = r.len() * std::mem::size_of::<T>();
        let (p, guard) = r.device_ptr_mut(&self.stream);
        ((p, n), guard)
    }

    fn desc(kind: OpKind, dtype: DataType, redop: ReduceOp, count: usize, root: usize, in_place: bool) -> OpDesc {
        OpDesc { kind, dtype, redop, count, root, is_send: false, in_place }
    }

    fn check_rank(&self, r: usize, what: &str) -> Result<()> {
        let n = self.shared.world.size();
        if r >= n {
            return Err(Error::invalid_arg(format!(
                "world '{}': {what} rank {r} is out of range for {n} ranks",
                self.shared.world.name()
            )));
        }
        Ok(())
    }

    fn check_len(&self, op: &str, got: usize, want: usize) -> Result<()> {
        if got != want {
            return Err(Error::invalid_arg(format!(
                "world '{}': {op} needs a buffer of {want} elements, got {got}",
                self.shared.world.name()
            )));
        }
        Ok(())
    }

    /// Sends `data` to `peer` (cudarc's `Comm::send`). Point-to-point operations on one stream
    /// run in enqueue order: order the two sides of an exchange so that they meet.
    pub fn send<T: Element, S: DevicePtr<T>>(&self, data: &S, peer: usize) -> Result<()> {
        self.check_rank(peer, "peer")?;
        let d =
            OpDesc { is_send: true, ..Self::desc(OpKind::P2p, T::DATA_TYPE, ReduceOp::Sum, data.len(), peer, false) };
        let (s, _g) = self.ptr(data);
        self.enqueue(d, Some(s), None)
    }

    /// Receives into `buf` from `peer` (cudarc's `Comm::recv`).
    pub fn recv<T: Element, R: DevicePtrMut<T>>(&self, buf: &mut R, peer: usize) -> Result<()> {
        self.check_rank(peer, "peer")?;
        let d = Self::desc(OpKind::P2p, T::DATA_TYPE, ReduceOp::Sum, buf.len(), peer, false);
        let (r, _g) = self.ptr_mut(buf);
        self.enqueue(d, None, Some(r))
    }

    /// All-reduce of `send` into `recv` (cudarc's `Comm::all_reduce`).
    pub fn all_reduce<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        send: &S,
        recv: &mut R,
        op: &ReduceOp,
    ) -> Result<()> {
        self.check_len("all_reduce", recv.len(), send.len())?;
        let d = Self::desc(OpKind::AllReduce, T::DATA_TYPE, *op, send.len(), 0, false);
        let ((s, _gs), (r, _gr)) = (self.ptr(send), self.ptr_mut(recv));
        self.enqueue(d, Some(s), Some(r))
    }

    /// All-reduce in place (cudarc's `Comm::all_reduce_in_place`).
    pub fn all_reduce_in_place<T: Element, R: DevicePtrMut<T>>(&self, buf: &mut R, op: &ReduceOp) -> Result<()> {
        let d = Self::desc(OpKind::AllReduce, T::DATA_TYPE, *op, buf.len(), 0, true);
        let (r, _g) = self.ptr_mut(buf);
        self.enqueue(d, None, Some(r))
    }

    /// Broadcast from `root` (cudarc's `Comm::broadcast`; `send` only on the root).
    pub fn broadcast<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        send: Option<&S>,
        recv: &mut R,
        root: usize,
    ) -> Result<()> {
        self.check_rank(root, "root")?;
        let me = self.shared.world.rank() == root;
        let send = match (send, me) {
            (Some(s), true) => {
                self.check_len("broadcast", s.len(), recv.len())?;
                Some(s)
            }
            (None, true) => return Err(Error::invalid_arg("broadcast: the root must pass a send buffer")),
            (_, false) => None,
        };
        let d = Self::desc(OpKind::Broadcast, T::DATA_TYPE, ReduceOp::Sum, recv.len(), root, false);
        let s = send.map(|s| self.ptr(s));
        let (r, _gr) = self.ptr_mut(recv);
        self.enqueue(d, s.as_ref().map(|s| s.0), Some(r))
    }

    /// Broadcast in place (cudarc's `Comm::broadcast_in_place`).
    pub fn broadcast_in_place<T: Element, R: DevicePtrMut<T>>(&self, buf: &mut R, root: usize) -> Result<()> {
        self.check_rank(root, "root")?;
        let d = Self::desc(OpKind::Broadcast, T::DATA_TYPE, ReduceOp::Sum, buf.len(), root, true);
        let (r, _g) = self.ptr_mut(buf);
        self.enqueue(d, None, Some(r))
    }

    /// Reduce to `root` (cudarc's `Comm::reduce`; `recv` is written on the root only).
    pub fn reduce<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        send: &S,
        recv: &mut R,
        op: &ReduceOp,
        root: usize,
    ) -> Result<()> {
        self.check_rank(root, "root")?;
        let me = self.shared.world.rank() == root;
        if me {
            self.check_len("reduce", recv.len(), send.len())?;
        }
        let d = Self::desc(OpKind::Reduce, T::DATA_TYPE, *op, send.len(), root, false);
        let (s, _gs) = self.ptr(send);
        let r = if me { Some(self.ptr_mut(recv)) } else { None };
        self.enqueue(d, Some(s), r.as_ref().map(|r| r.0))
    }

    /// All-gather (cudarc's `Comm::all_gather`): `recv` holds `size` blocks of `send.len()`.
    pub fn all_gather<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(&self, send: &S, recv: &mut R) -> Result<()> {
        self.check_len("all_gather", recv.len(), send.len() * self.shared.world.size())?;
        let d = Self::desc(OpKind::AllGather, T::DATA_TYPE, ReduceOp::Sum, send.len(), 0, false);
        let ((s, _gs), (r, _gr)) = (self.ptr(send), self.ptr_mut(recv));
        self.enqueue(d, Some(s), Some(r))
    }

    /// Reduce-scatter (cudarc's `Comm::reduce_scatter`): `send` holds `size` blocks of
    /// `recv.len()`.
    pub fn reduce_scatter<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        send: &S,
        recv: &mut R,
        op: &ReduceOp,
    ) -> Result<()> {
        self.check_len("reduce_scatter", send.len(), recv.len() * self.shared.world.size())?;
        let d = Self::desc(OpKind::ReduceScatter, T::DATA_TYPE, *op, recv.len(), 0, false);
        let ((s, _gs), (r, _gr)) = (self.ptr(send), self.ptr_mut(recv));
        self.enqueue(d, Some(s), Some(r))
    }

    /// All-to-all: block `r` of `send` goes to rank `r`, block `r` of `recv` comes from rank
    /// `r`.
    pub fn all_to_all<T: Element, S: DevicePtr<T>, R: DevicePtrMut<T>>(&self, send: &S, recv: &mut R) -> Result<()> {
        self.check_len("all_to_all", recv.len(), send.len())?;
        let n = self.shared.world.size();
        if send.len() % n != 0 {
            return Err(Error::invalid_arg("all_to_all: the buffer does not split into one block per rank"));
        }
        let d = Self::desc(OpKind::AllToAll, T::DATA_TYPE, ReduceOp::Sum, send.len() / n, 0, false);
        let ((s, _gs), (r, _gr)) = (self.ptr(send), self.ptr_mut(recv));
        self.enqueue(d, Some(s), Some(r))
    }

    /// Waits (on the host) until everything enqueued so far on the stream has run, then reports
    /// the first failure among the operations, if any.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| Error::new(ErrorKind::Cuda, format!("stream synchronize: {e:?}")))?;
        match self.error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for DeviceWorld {
    fn drop(&mut self) {
        // The staging thread finishes what the stream still uses, then exits.
        self.shared.closed.store(true, Ordering::Release);
        self.shared.bell.notify_all();
    }
}

fn take_block(shared: &Shared, len: usize) -> Result<Pinned> {
    let mut pool = lock(&shared.pool);
    let best = pool.iter().enumerate().filter(|(_, b)| b.len() >= len).min_by_key(|(_, b)| b.len()).map(|(i, _)| i);
    let block = match best {
        Some(i) => pool.swap_remove(i),
        None => {
            drop(pool);
            Pinned::new(&shared.ctx, len)?
        }
    };
    // SAFETY: a pooled block is no longer used by any stream (its FINISHED flag was seen).
    unsafe { std::ptr::write_bytes(block.host_ptr(), 0, DATA) };
    Ok(block)
}

/// The error of an operation that could not run because the world is no longer usable.
fn unusable(world: &World) -> Error {
    match world.state() {
        WorldState::Broken(c) => Error::broken(world.name(), world.rank(), c, false),
        WorldState::Removed => Error::invalid_usage(format!("world '{}' was removed", world.name())),
        WorldState::Ready => Error::internal(format!("world '{}': operation not posted", world.name())),
    }
}

/// Fails one staged operation: the error is kept for the caller, and the stream released.
fn fail(shared: &Shared, st: &mut Staged, e: Error) {
    lock(&shared.error).get_or_insert(e);
    st.set_done(DONE_FAILED);
    st.stage = Stage::Releasing;
}

/// The host side of the staged operations, in stream order.
fn stager(shared: &Shared) {
    loop {
        let mut moved = false;
        let mut pending = lock(&shared.pending);
        let usable = matches!(shared.world.state(), WorldState::Ready);
        // Operations are posted in stream order: none before the ones ahead of it.
        let mut in_order = true;
        for st in pending.iter_mut() {
            match &st.stage {
                Stage::Waiting if !in_order => {}
                Stage::Waiting if !usable => {
                    fail(shared, st, unusable(&shared.world));
                    moved = true;
                }
                Stage::Waiting if st.flag(READY) == 1 => {
                    let base = st.block.host_ptr().wrapping_add(DATA);
                    // SAFETY: both views lie inside the pinned block, which stays alive (and
                    // untouched by the stream, which waits on DONE) until the operation has
                    // completed.
                    let (send, recv) = unsafe {
                        (
                            RawBuf::from_raw(base, st.send_len, false),
                            RawBuf::from_raw(base.wrapping_add(st.send_len), st.recv_len, true),
                        )
                    };
                    // SAFETY: as above.
                    match unsafe { shared.world.post_raw(vec![(st.desc, send, recv)], false) } {
                        Ok(mut c) if !c.is_empty() => st.stage = Stage::Running(c.remove(0)),
                        Ok(_) => fail(shared, st, unusable(&shared.world)),
                        Err(e) => fail(shared, st, e),
                    }
                    moved = true;
                }
                Stage::Waiting => in_order = false,
                Stage::Running(c) if c.is_done() => {
                    match c.result() {
                        Some(Ok(())) => {
                            st.set_done(DONE_OK);
                            st.stage = Stage::Releasing;
                        }
                        Some(Err(e)) => fail(shared, st, e),
                        None => fail(shared, st, Error::internal("operation ended without a result")),
                    }
                    moved = true;
                }
                Stage::Running(_) | Stage::Releasing => {}
            }
        }
        // Blocks the stream has finished with go back to the pool, in order.
        while pending.front().is_some_and(|st| matches!(st.stage, Stage::Releasing) && st.flag(FINISHED) == 1) {
            if let Some(st) = pending.pop_front() {
                lock(&shared.pool).push(st.block);
                moved = true;
            }
        }
        if pending.is_empty() && shared.closed.load(Ordering::Acquire) {
            return;
        }
        if !moved {
            // Flags written by the GPU raise no event: while operations are outstanding, look
            // again shortly; otherwise sleep until the next enqueue rings.
            let nap = if pending.is_empty() { Duration::from_millis(100) } else { Duration::from_micros(50) };
            drop(wait_timeout(&shared.bell, pending, nap));
        }
    }
}
