//! The NCCL backend (feature `nccl`): NCCL moves a world's device bytes, the crate forms the
//! world and watches it (`docs/nccl.md`).
//!
//! The world forms as any other, through the crate's rendezvous, and keeps its links and
//! heartbeats. When its first device operation needs it, rank 0 makes NCCL's id, the world's own
//! links carry it to the other ranks, and every rank creates its communicator non-blocking,
//! polled against the formation deadline. From then on one process-wide thread (`mw-nccl`)
//! watches every NCCL communicator of the process: when the crate's world breaks (a closed
//! link, heartbeat silence, a peer's abort) it aborts the communicator, which releases the
//! streams NCCL's kernels hold; when NCCL reports an error of its own, or a batch passes the
//! world's operation deadline, it breaks the world, so that the peers abort theirs too.
//!
//! Every NCCL call on a communicator is made under its lock, abort included: NCCL forbids an
//! abort from inside another call on the same communicator, and with `blocking = 0` no call
//! holds the lock for long. cudarc loads `libnccl.so` at run time but panics where it is
//! absent, so [`library`] checks first and every entry goes through it.

use std::collections::VecDeque;
use std::ffi::{c_void, CStr, CString};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nc;

use crate::api::error::{BrokenCause, Error, ErrorKind, Result};
use crate::api::types::{DataType, ReduceOp};
use crate::api::world::{World, WorldState};
use crate::engine::wire::OpKind;
use crate::gpu::cuda::{check, RawContext};
use crate::gpu::staging::DeviceOp;
use crate::sys::sync::{lock, wait_timeout, Arc, AtomicBool, Condvar, Mutex, Ordering, Weak};

/// NCCL as this process loaded it.
pub(crate) struct Library {
    /// `ncclGetVersion`'s code.
    version: i32,
    /// Whether it has its own gather, scatter and all-to-all (NCCL 2.28 on); without them
    /// those operations are grouped sends and receives.
    gather: bool,
    scatter: bool,
    all_to_all: bool,
}

/// The oldest NCCL the backend takes: non-blocking communicators, `ncclCommFinalize`.
const OLDEST: i32 = 21400;

/// The first NCCL that lets several ranks of one communicator share a GPU (when
/// `NCCL_MULTI_RANK_GPU_ENABLE` is set).
const MULTI_RANK_GPU: i32 = 23000;

/// How often the watcher looks at each communicator.
const WATCH_EVERY: Duration = Duration::from_millis(5);

/// NCCL, loaded once; an error of kind `System` naming what is missing where it cannot be.
pub(crate) fn library() -> Result<&'static Library> {
    static LIB: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(|m| Error::new(ErrorKind::System, m.clone()))
}

fn load() -> std::result::Result<Library, String> {
    // SAFETY: only tries to open the library; no NCCL call is made.
    if !unsafe { nc::is_culib_present() } {
        return Err("NCCL cannot be loaded: no libnccl.so on the dynamic loader's path (LD_LIBRARY_PATH). \
                    A pip install of nvidia-nccl-cu13 brings libnccl.so.2: link it as libnccl.so in a directory \
                    on that path"
            .into());
    }
    let mut version = 0;
    // SAFETY: an out-pointer to a local; the library is present.
    let r = unsafe { nc::ncclGetVersion(&mut version) };
    if r != nc::ncclResult_t::ncclSuccess {
        return Err(format!("ncclGetVersion failed: {r:?}"));
    }
    if version < OLDEST {
        return Err(format!(
            "NCCL {} is too old: the backend needs {} or newer (non-blocking communicators)",
            version_text(version),
            version_text(OLDEST)
        ));
    }
    // SAFETY: the library is present (checked above); looking a symbol up calls nothing.
    let has = |name: &str| unsafe { nc::culib().get::<unsafe extern "C" fn()>(name.as_bytes()).is_ok() };
    Ok(Library { version, gather: has("ncclGather"), scatter: has("ncclScatter"), all_to_all: has("ncclAlltoAll") })
}

/// (major, minor, patch) of an NCCL version code (the code changed form at 2.9).
fn version_parts(v: i32) -> (u32, u32, u32) {
    let v = v.max(0) as u32;
    if v >= 10000 {
        (v / 10000, v % 10000 / 100, v % 100)
    } else {
        (v / 1000, v % 1000 / 100, v % 100)
    }
}

fn version_text(v: i32) -> String {
    let (a, b, c) = version_parts(v);
    format!("{a}.{b}.{c}")
}

/// The version of the NCCL library this process loads, as (major, minor, patch); an error of
/// kind `System` where none can be loaded (the NCCL backend is then unavailable).
pub fn version() -> Result<(u32, u32, u32)> {
    library().map(|l| version_parts(l.version))
}

/// Several ranks of one communicator on one GPU are asked for with NCCL's own variable,
/// `NCCL_MULTI_RANK_GPU_ENABLE=1`, exported when the process starts (a library cannot set a
/// variable safely once other threads may read the environment). NCCL 2.30 on honours it; with
/// an older NCCL the ask is refused here, saying why, instead of failing later as a duplicate
/// GPU.
fn multi_rank_gpu(lib: &Library) -> Result<()> {
    let asked = std::env::var("NCCL_MULTI_RANK_GPU_ENABLE").is_ok_and(|v| v.trim() == "1");
    if asked && lib.version < MULTI_RANK_GPU {
        return Err(Error::invalid_usage(format!(
            "NCCL_MULTI_RANK_GPU_ENABLE=1 needs NCCL {} or newer to put ranks of one communicator on one GPU; \
             this process loaded NCCL {}",
            version_text(MULTI_RANK_GPU),
            version_text(lib.version)
        )));
    }
    Ok(())
}

/// An error from an NCCL result, with NCCL's words for it.
fn nccl_error(what: &str, r: nc::ncclResult_t) -> Error {
    use nc::ncclResult_t::*;
    let kind = match r {
        ncclUnhandledCudaError => ErrorKind::Cuda,
        ncclInvalidArgument => ErrorKind::InvalidArgument,
        ncclInvalidUsage => ErrorKind::InvalidUsage,
        ncclSystemError | ncclRemoteError => ErrorKind::System,
        _ => ErrorKind::Internal,
    };
    // SAFETY: NCCL returns static strings (or NULL) for both; the library is loaded (every
    // caller holds a communicator or went through `library`).
    let (text, last) = unsafe {
        let text = nc::ncclGetErrorString(r);
        let last = nc::ncclGetLastError(std::ptr::null_mut());
        let s = |p: *const std::ffi::c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        (s(text), s(last))
    };
    let last = if last.is_empty() { String::new() } else { format!("; last NCCL error: {last}") };
    Error::new(kind, format!("{what}: {r:?} ({text}){last}"))
}

fn data_type(d: DataType) -> nc::ncclDataType_t {
    use nc::ncclDataType_t::*;
    match d {
        DataType::I8 => ncclInt8,
        DataType::U8 => ncclUint8,
        DataType::I32 => ncclInt32,
        DataType::U32 => ncclUint32,
        DataType::I64 => ncclInt64,
        DataType::U64 => ncclUint64,
        DataType::F16 => ncclFloat16,
        DataType::F32 => ncclFloat32,
        DataType::F64 => ncclFloat64,
        DataType::BF16 => ncclBfloat16,
    }
}

fn red_op(op: ReduceOp) -> nc::ncclRedOp_t {
    use nc::ncclRedOp_t::*;
    match op {
        ReduceOp::Sum => ncclSum,
        ReduceOp::Prod => ncclProd,
        ReduceOp::Max => ncclMax,
        ReduceOp::Min => ncclMin,
        ReduceOp::Avg => ncclAvg,
    }
}

/// The communicator handle: null once aborted or destroyed.
struct Raw(nc::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread, one call at a time: every use goes
// through the `Mutex` that holds this.
unsafe impl Send for Raw {}

/// A batch enqueued on a stream, by the event recorded after it.
struct Batch {
    event: cu::CUevent,
    /// The world's operation deadline, if it has one.
    deadline: Option<(Instant, Duration)>,
}

// SAFETY: an event handle may be queried and destroyed from any thread.
unsafe impl Send for Batch {}

/// One rank's NCCL communicator of one world.
pub(crate) struct NcclComm {
    world: World,
    ctx: RawContext,
    /// Holds the context alive where cudarc owns it.
    _keep: Option<Arc<cudarc::driver::CudaContext>>,
    lib: &'static Library,
    raw: Mutex<Raw>,
    /// The first failure of an operation, NCCL's own errors included.
    error: Mutex<Option<Error>>,
    /// Batches the streams may not have run yet, oldest first.
    batches: Mutex<VecDeque<Batch>>,
    /// The world's name for NCCL's logs (NCCL keeps the pointer).
    _name: CString,
    /// Four device bytes of the communicator's own: a barrier is an all-reduce of them.
    barrier: cu::CUdeviceptr,
    /// An abort was handed to a thread of its own (`NcclComm::abort_soon`).
    aborting: AtomicBool,
}

/// A pause in a polling loop that began at `since`: yields for the first 2 ms (NCCL usually
/// finishes a launch in microseconds, and a sleep would add its own to every operation), then
/// sleeps 100 µs at a time (a machine may have as few cores as ranks).
fn pause(since: Instant) {
    if since.elapsed() < Duration::from_millis(2) {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(100));
    }
}

impl NcclComm {
    /// Creates this rank's communicator of `world` on `ctx`'s device: collective, bounded by
    /// the world's formation deadline. Any failure breaks the world (with the failure as the
    /// cause), so that no peer waits for this rank until its own deadline.
    pub(crate) fn start(
        world: World,
        ctx: RawContext,
        keep: Option<Arc<cudarc::driver::CudaContext>>,
    ) -> Result<Arc<NcclComm>> {
        let w = world.clone();
        NcclComm::make(world, ctx, keep).inspect_err(|e| {
            if e.broken_cause().is_none() {
                w.break_with(BrokenCause::Nccl { detail: e.message().to_owned() });
            }
        })
    }

    fn make(world: World, ctx: RawContext, keep: Option<Arc<cudarc::driver::CudaContext>>) -> Result<Arc<NcclComm>> {
        let lib = library()?;
        crate::gpu::cuda::driver_present()?;
        multi_rank_gpu(lib)?;
        let timeout = world.options().timeout;
        let until = Instant::now() + timeout;
        // Rank 0 makes NCCL's id; the world's own links carry it to the others.
        let mut id = [0u8; 128];
        if world.rank() == 0 {
            let mut uid = nc::ncclUniqueId { internal: [0; 128] };
            // SAFETY: an out-pointer to a local.
            let r = unsafe { nc::ncclGetUniqueId(&mut uid) };
            if r != nc::ncclResult_t::ncclSuccess {
                return Err(nccl_error("ncclGetUniqueId", r));
            }
            id.copy_from_slice(bytemuck::cast_slice(&uid.internal));
        }
        let call = world.broadcast_call::<u8>(None, &mut id, 0, true)?;
        world.run_bounded(call, timeout)?;
        let uid = nc::ncclUniqueId { internal: bytemuck::cast(id) };
        let name = CString::new(world.name()).unwrap_or_default();
        let mut config = config(&name);
        let mut raw: nc::ncclComm_t = std::ptr::null_mut();
        let mut barrier: cu::CUdeviceptr = 0;
        let r = {
            let _current = ctx.push()?;
            // SAFETY: out-pointer to a local, the context current; freed on drop.
            check("cuMemAlloc", unsafe { cu::cuMemAlloc_v2(&mut barrier, 4) })?;
            // SAFETY: out-pointer to a local; the id and config live across the call, and the
            // name (which NCCL keeps) as long as the communicator.
            unsafe { nc::ncclCommInitRankConfig(&mut raw, world.size() as i32, uid, world.rank() as i32, &mut config) }
        };
        let comm = Arc::new(NcclComm {
            world,
            ctx,
            _keep: keep,
            lib,
            raw: Mutex::new(Raw(raw)),
            error: Mutex::new(None),
            batches: Mutex::new(VecDeque::new()),
            _name: name,
            barrier,
            aborting: AtomicBool::new(false),
        });
        let started = match r {
            nc::ncclResult_t::ncclSuccess | nc::ncclResult_t::ncclInProgress if !raw.is_null() => {
                comm.settle(&lock(&comm.raw), Some(until), "ncclCommInitRankConfig")
            }
            _ => Err(nccl_error("ncclCommInitRankConfig", r)),
        };
        if let Err(e) = started {
            comm.fail(e.clone(), false);
            return Err(e);
        }
        info!(
            "world '{}' rank {}: NCCL {} communicator ready",
            comm.world.name(),
            comm.world.rank(),
            version_text(lib.version)
        );
        watcher().add(&comm);
        Ok(comm)
    }

    pub(crate) fn world(&self) -> &World {
        &self.world
    }

    pub(crate) fn context(&self) -> RawContext {
        self.ctx
    }

    /// Polls a non-blocking call on the communicator until NCCL is done with it, it fails,
    /// the world breaks, or `until` (if any) passes.
    fn settle(&self, raw: &Raw, until: Option<Instant>, what: &str) -> Result<()> {
        let since = Instant::now();
        loop {
            let mut state = nc::ncclResult_t::ncclInProgress;
            // SAFETY: a live communicator (the caller holds its lock), an out-pointer to a local.
            let r = unsafe { nc::ncclCommGetAsyncError(raw.0, &mut state) };
            if r != nc::ncclResult_t::ncclSuccess {
                return Err(nccl_error("ncclCommGetAsyncError", r));
            }
            match state {
                nc::ncclResult_t::ncclSuccess => return Ok(()),
                nc::ncclResult_t::ncclInProgress => {}
                e => return Err(nccl_error(what, e)),
            }
            if let WorldState::Broken(cause) = self.world.state() {
                return Err(Error::broken(self.world.name(), self.world.rank(), cause, false));
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                return Err(Error::timeout(format!(
                    "world '{}' rank {}: {what} did not finish in time",
                    self.world.name(),
                    self.world.rank()
                )));
            }
            pause(since);
        }
    }

    /// Records `e` as this communicator's failure, breaks the world with it when `tell`
    /// (NCCL's own errors, which the peers cannot see otherwise), and aborts the communicator.
    fn fail(&self, e: Error, tell: bool) {
        if tell && e.broken_cause().is_none() {
            self.world.break_with(BrokenCause::Nccl { detail: e.message().to_owned() });
        }
        lock(&self.error).get_or_insert(e);
        self.abort();
    }

    /// Aborts the communicator (local: NCCL stops its kernels, which releases the streams
    /// waiting on them). An operation a stream had not finished by then has failed.
    fn abort(&self) {
        let mut raw = lock(&self.raw);
        if raw.0.is_null() {
            return;
        }
        // Without the context (gone with its owner) the events cannot be asked; NCCL aborts
        // all the same (it sets its device itself).
        let current = self.ctx.push().ok();
        if current.is_none() || self.unfinished() > 0 {
            let e = match self.world.state() {
                WorldState::Broken(cause) => Error::broken(self.world.name(), self.world.rank(), cause, false),
                _ => Error::new(ErrorKind::WorldBroken, format!("world '{}': NCCL aborted", self.world.name())),
            };
            lock(&self.error).get_or_insert(e);
        }
        // SAFETY: a live communicator, under its lock; nothing else uses it after this.
        let r = unsafe { nc::ncclCommAbort(raw.0) };
        if r != nc::ncclResult_t::ncclSuccess {
            warn!("world '{}': ncclCommAbort: {r:?}", self.world.name());
        }
        raw.0 = std::ptr::null_mut();
        if current.is_some() {
            self.forget_batches();
        }
    }

    /// [`NcclComm::abort`] on a thread of its own: `ncclCommAbort` sets NCCL's abort flag at
    /// once but then waits for the streams to get past this communicator's kernels, and a
    /// stream may first have to get past another communicator's, which only its own abort
    /// releases. So no abort waits for another, and the watcher never waits for one.
    fn abort_soon(self: &Arc<Self>, then: impl FnOnce() + Send + 'static) {
        if self.aborting.swap(true, Ordering::AcqRel) {
            then();
            return;
        }
        let me = self.clone();
        crate::sys::on_own_thread("mw-nccl-abort", move || {
            me.abort();
            then();
        });
    }

    /// Batches the streams have not finished; forgets those they have (the context is current).
    fn unfinished(&self) -> usize {
        let mut batches = lock(&self.batches);
        while let Some(b) = batches.front() {
            // SAFETY: a live event of this context.
            if unsafe { cu::cuEventQuery(b.event) } == cu::CUresult::CUDA_ERROR_NOT_READY {
                break;
            }
            // SAFETY: as above; destroyed once.
            unsafe { cu::cuEventDestroy_v2(b.event) };
            batches.pop_front();
        }
        batches.len()
    }

    fn forget_batches(&self) {
        for b in lock(&self.batches).drain(..) {
            // SAFETY: a live event of this context (current), destroyed once.
            unsafe { cu::cuEventDestroy_v2(b.event) };
        }
    }

    /// The first failure of an operation already enqueued, if any.
    pub(crate) fn error(&self) -> Option<Error> {
        lock(&self.error).clone()
    }

    /// Why a new operation cannot be enqueued, if it cannot.
    fn refusal(&self) -> Option<Error> {
        if let Some(e) = self.error() {
            return Some(e);
        }
        match self.world.state() {
            WorldState::Broken(cause) => Some(Error::broken(self.world.name(), self.world.rank(), cause, false)),
            WorldState::Removed => Some(Error::invalid_usage(format!("world '{}' was removed", self.world.name()))),
            _ => None,
        }
    }

    /// Enqueues `ops` on `stream` as one NCCL group.
    ///
    /// # Safety
    /// `stream` is a live stream of this communicator's context; the buffers are device memory
    /// of the sizes given, valid until the stream has run the operations.
    pub(crate) unsafe fn enqueue(&self, stream: cu::CUstream, ops: &[DeviceOp]) -> Result<()> {
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        let raw = lock(&self.raw);
        if raw.0.is_null() {
            drop(raw);
            return Err(self.refusal().unwrap_or_else(|| Error::internal("NCCL communicator gone")));
        }
        let _current = self.ctx.push()?;
        let s = stream as nc::cudaStream_t;
        // One group, always: inside it NCCL only records, and the group's end is the one call
        // that may be in progress.
        // SAFETY: group calls take no arguments; the issued calls get a live communicator and
        // the caller's buffers and stream.
        let issued = unsafe {
            let r = nc::ncclGroupStart();
            if r != nc::ncclResult_t::ncclSuccess {
                return Err(nccl_error("ncclGroupStart", r));
            }
            let mut first = Ok(());
            for op in ops {
                first = self.issue(raw.0, s, op);
                if first.is_err() {
                    break;
                }
            }
            let r = nc::ncclGroupEnd();
            first.and(match r {
                nc::ncclResult_t::ncclSuccess | nc::ncclResult_t::ncclInProgress => Ok(()),
                r => Err(nccl_error("ncclGroupEnd", r)),
            })
        };
        // Bounded by the world's operation deadline if it has one, as any operation is; the
        // world breaking ends the wait in any case.
        let until = self.world.op_timeout().map(|t| Instant::now() + t);
        let settled = issued.and_then(|_| self.settle(&raw, until, "ncclGroupEnd"));
        if let Err(e) = settled {
            drop(raw);
            // In non-blocking mode NCCL keeps any error it returned as the communicator's own,
            // so even refused arguments end it (the crate checks arguments before NCCL sees
            // them).
            self.fail(e.clone(), true);
            return Err(e);
        }
        let mut event: cu::CUevent = std::ptr::null_mut();
        // SAFETY: out-pointer to a local, the context current; the stream is the caller's.
        unsafe {
            check("cuEventCreate", cu::cuEventCreate(&mut event, cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32))?;
            if let Err(e) = check("cuEventRecord", cu::cuEventRecord(event, stream)) {
                cu::cuEventDestroy_v2(event);
                return Err(e);
            }
        }
        let deadline = self.world.op_timeout().map(|t| (Instant::now() + t, t));
        lock(&self.batches).push_back(Batch { event, deadline });
        Ok(())
    }

    /// Issues one operation inside the group.
    ///
    /// # Safety
    /// As [`NcclComm::enqueue`], inside `ncclGroupStart`/`ncclGroupEnd`.
    unsafe fn issue(&self, comm: nc::ncclComm_t, s: nc::cudaStream_t, op: &DeviceOp) -> Result<()> {
        use nc::ncclResult_t::ncclSuccess;
        let (d, send, recv) = op;
        let p = |b: &Option<(u64, usize)>| b.map_or(std::ptr::null_mut(), |(p, _)| p as usize as *mut c_void);
        let (sp, rp) = (p(send), p(recv));
        let (n, dt, red, root) = (d.count, data_type(d.dtype), red_op(d.redop), d.root as i32);
        let (rank, size) = (self.world.rank(), self.world.size());
        let b = d.count * d.dtype.size();
        let at = |base: *mut c_void, k: usize| (base as usize + k * b) as *mut c_void;
        let all = |r: nc::ncclResult_t| if r == ncclSuccess { Ok(()) } else { Err(nccl_error(d.kind.name(), r)) };
        // SAFETY (every call below): the caller's buffers, of the sizes the operation's
        // description gives; a live communicator and stream.
        unsafe {
            match d.kind {
                OpKind::P2p if d.is_send => all(nc::ncclSend(sp, n, dt, root, comm, s)),
                OpKind::P2p => all(nc::ncclRecv(rp, n, dt, root, comm, s)),
                OpKind::Broadcast => {
                    let from = if d.in_place || sp.is_null() { rp } else { sp };
                    all(nc::ncclBroadcast(from, rp, n, dt, root, comm, s))
                }
                OpKind::Reduce => {
                    let from = if d.in_place { rp } else { sp };
                    all(nc::ncclReduce(from, rp, n, dt, red, root, comm, s))
                }
                OpKind::AllReduce => {
                    let from = if d.in_place { rp } else { sp };
                    all(nc::ncclAllReduce(from, rp, n, dt, red, comm, s))
                }
                // In place, the one buffer is the whole output, and this rank's block its input.
                OpKind::AllGather => {
                    let from = if d.in_place { at(rp, rank) } else { sp };
                    all(nc::ncclAllGather(from, rp, n, dt, comm, s))
                }
                // In place, the one buffer is the whole input, and this rank's block its output.
                OpKind::ReduceScatter => {
                    let (from, to) = if d.in_place { (rp, at(rp, rank)) } else { (sp, rp) };
                    all(nc::ncclReduceScatter(from, to, n, dt, red, comm, s))
                }
                OpKind::Gather if self.lib.gather => all(nc::ncclGather(sp, rp, n, dt, root, comm, s)),
                OpKind::Gather => {
                    if rank == d.root {
                        for q in 0..size {
                            all(nc::ncclRecv(at(rp, q), n, dt, q as i32, comm, s))?;
                        }
                    }
                    all(nc::ncclSend(sp, n, dt, root, comm, s))
                }
                OpKind::Scatter if self.lib.scatter => all(nc::ncclScatter(sp, rp, n, dt, root, comm, s)),
                OpKind::Scatter => {
                    if rank == d.root {
                        for q in 0..size {
                            all(nc::ncclSend(at(sp, q), n, dt, q as i32, comm, s))?;
                        }
                    }
                    all(nc::ncclRecv(rp, n, dt, root, comm, s))
                }
                OpKind::AllToAll if self.lib.all_to_all => all(nc::ncclAlltoAll(sp, rp, n, dt, comm, s)),
                OpKind::AllToAll => {
                    for q in 0..size {
                        all(nc::ncclSend(at(sp, q), n, dt, q as i32, comm, s))?;
                        all(nc::ncclRecv(at(rp, q), n, dt, q as i32, comm, s))?;
                    }
                    Ok(())
                }
                // NCCL has no barrier: an all-reduce of the communicator's own four bytes is one.
                OpKind::Barrier => {
                    let b = self.barrier as usize as *mut c_void;
                    all(nc::ncclAllReduce(b, b, 1, nc::ncclDataType_t::ncclInt32, nc::ncclRedOp_t::ncclSum, comm, s))
                }
            }
        }
    }

    /// The watcher's look at this communicator: the world's state, NCCL's own errors, the
    /// batches' deadlines. Never waits: a busy communicator is looked at next time, and aborts
    /// run on threads of their own.
    fn watch(self: &Arc<Self>) {
        if self.aborting.load(Ordering::Acquire) {
            return;
        }
        // A communicator whose lock is held is being enqueued on or closed: that call polls
        // NCCL and the world itself (and a watcher that waited here would leave the process's
        // other communicators unwatched meanwhile).
        match self.raw.try_lock() {
            Ok(raw) if !raw.0.is_null() => {}
            _ => return,
        }
        // A broken world fails only what the streams had not finished (a peer that left after
        // everything was done is no failure).
        if matches!(self.world.state(), WorldState::Broken(_) | WorldState::Removed) {
            return self.abort_soon(|| {});
        }
        // An enqueue holding the lock polls NCCL's errors itself.
        if let Ok(raw) = self.raw.try_lock() {
            if !raw.0.is_null() {
                let mut state = nc::ncclResult_t::ncclSuccess;
                // SAFETY: a live communicator under its lock; an out-pointer to a local.
                let r = unsafe { nc::ncclCommGetAsyncError(raw.0, &mut state) };
                let bad = match (r, state) {
                    (nc::ncclResult_t::ncclSuccess, nc::ncclResult_t::ncclSuccess)
                    | (nc::ncclResult_t::ncclSuccess, nc::ncclResult_t::ncclInProgress) => None,
                    (nc::ncclResult_t::ncclSuccess, e) => Some(nccl_error("NCCL reported", e)),
                    (r, _) => Some(nccl_error("ncclCommGetAsyncError", r)),
                };
                drop(raw);
                if let Some(e) = bad {
                    self.world.break_with(BrokenCause::Nccl { detail: e.message().to_owned() });
                    lock(&self.error).get_or_insert(e);
                    return self.abort_soon(|| {});
                }
            }
        }
        let late = {
            let Ok(_current) = self.ctx.push() else { return };
            self.unfinished();
            let now = Instant::now();
            lock(&self.batches).front().and_then(|b| b.deadline).filter(|(at, _)| now >= *at).map(|(_, t)| t)
        };
        if let Some(t) = late {
            let cause = BrokenCause::OperationTimeout { after_ms: t.as_millis() as u64 };
            self.world.break_with(cause.clone());
            lock(&self.error).get_or_insert(Error::broken(self.world.name(), self.world.rank(), cause, true));
            self.abort_soon(|| {});
        }
    }

    /// Ends the communicator gracefully: NCCL finishes what the streams hold
    /// (`ncclCommFinalize`, polled against the formation deadline and the world's state), then
    /// frees it; aborts instead where that cannot be done.
    pub(crate) fn close(&self) {
        let mut raw = lock(&self.raw);
        if raw.0.is_null() {
            return;
        }
        let Ok(_current) = self.ctx.push() else { return };
        let until = Instant::now() + self.world.options().timeout;
        // SAFETY: a live communicator under its lock.
        let r = unsafe { nc::ncclCommFinalize(raw.0) };
        let done = match r {
            nc::ncclResult_t::ncclSuccess | nc::ncclResult_t::ncclInProgress => {
                self.settle(&raw, Some(until), "ncclCommFinalize")
            }
            r => Err(nccl_error("ncclCommFinalize", r)),
        };
        match done {
            Ok(()) => {
                // SAFETY: finalized, under its lock; nothing uses it after this.
                let r = unsafe { nc::ncclCommDestroy(raw.0) };
                if r != nc::ncclResult_t::ncclSuccess {
                    warn!("world '{}': ncclCommDestroy: {r:?}", self.world.name());
                }
                raw.0 = std::ptr::null_mut();
                self.forget_batches();
            }
            Err(e) => {
                info!("world '{}': closing NCCL by abort: {e}", self.world.name());
                drop(raw);
                lock(&self.error).get_or_insert(e);
                self.abort();
            }
        }
    }

    /// The C API's destroy and abort, then `leave` (the world's removal). An abort returns at
    /// once (the abort runs on a thread of its own); a destroy finalizes here, as
    /// `ncclCommDestroy` does: it waits for the streams to finish what the communicator holds,
    /// bounded by the formation deadline and by the world breaking.
    pub(crate) fn release(self: &Arc<Self>, abort: bool, leave: impl FnOnce() + Send + 'static) {
        if abort {
            return self.abort_soon(leave);
        }
        self.close();
        leave();
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Whoever let go without closing: nothing may outlive this but NCCL's own state.
        self.abort();
        if let Ok(_current) = self.ctx.push() {
            // SAFETY: allocated in `start`; NCCL, which used it, is gone.
            unsafe { cu::cuMemFree_v2(self.barrier) };
        }
    }
}

/// NCCL's config for a communicator of the crate's: non-blocking, the rest NCCL's defaults.
fn config(name: &CStr) -> nc::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    let (major, minor, patch) = (2, 30, 0);
    nc::ncclConfig_t {
        size: std::mem::size_of::<nc::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: major * 10000 + minor * 100 + patch,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: name.as_ptr(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// The process's one watcher of NCCL communicators.
struct Watcher {
    comms: Mutex<Vec<Weak<NcclComm>>>,
    bell: Condvar,
}

fn watcher() -> &'static Watcher {
    static W: OnceLock<&'static Watcher> = OnceLock::new();
    W.get_or_init(|| {
        let w: &'static Watcher = Box::leak(Box::new(Watcher { comms: Mutex::new(Vec::new()), bell: Condvar::new() }));
        let spawned = std::thread::Builder::new().name("mw-nccl".into()).spawn(move || w.run());
        if let Err(e) = spawned {
            // Without it, nothing aborts a communicator whose world broke: say so loudly.
            warn!("cannot start the NCCL watcher thread ({e}): NCCL worlds will not be aborted on failure");
        }
        w
    })
}

impl Watcher {
    fn add(&self, c: &Arc<NcclComm>) {
        lock(&self.comms).push(Arc::downgrade(c));
        self.bell.notify_one();
    }

    fn run(&self) {
        loop {
            let live: Vec<Arc<NcclComm>> = {
                let mut comms = lock(&self.comms);
                comms.retain(|w| w.strong_count() > 0);
                if comms.is_empty() {
                    drop(wait_timeout(&self.bell, comms, Duration::from_secs(1)));
                    continue;
                }
                comms.iter().filter_map(Weak::upgrade).collect()
            };
            for c in &live {
                c.watch();
            }
            drop(live);
            std::thread::sleep(WATCH_EVERY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_read_in_both_forms() {
        assert_eq!(version_parts(22803), (2, 28, 3));
        assert_eq!(version_parts(23000), (2, 30, 0));
        assert_eq!(version_parts(2708), (2, 7, 8));
        assert_eq!(version_text(21400), "2.14.0");
    }

    /// Where no libnccl.so can be loaded (this test's machine in CI), asking for NCCL is an
    /// error of kind `System` that says what is missing, never a panic.
    #[test]
    fn a_missing_library_is_an_error_not_a_panic() {
        // SAFETY: only tries to open the library.
        if unsafe { nc::is_culib_present() } {
            println!("SKIPPED a_missing_library_is_an_error_not_a_panic: libnccl.so is present here");
            return;
        }
        let e = library().err().expect("no NCCL here");
        assert_eq!(e.kind(), ErrorKind::System);
        assert!(e.message().contains("libnccl.so"), "{e}");
        assert_eq!(version().unwrap_err().kind(), ErrorKind::System);
    }
}
