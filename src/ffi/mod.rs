//! The C ABI: NCCL's functions with an `mw` prefix, result codes numbered as `ncclResult_t`.
//!
//! Rules of this layer, which owns the C result codes and their strings:
//!
//! - **No panic crosses it.** Every entry point runs its body under `catch_unwind`; a panic
//!   becomes `mwInternalError`.
//! - **Every argument is checked.** Null pointers (where the count is not zero), counts whose
//!   byte size overflows, unknown data types and reduction ops, ranks out of range, and
//!   overlapping buffers that are not NCCL's in-place layout are answered with
//!   `mwInvalidArgument`, before anything is posted.
//! - **Handles are looked up, never dereferenced.** A `mwComm_t` is an opaque number that names
//!   an entry of this layer's table; a destroyed or never-created handle is simply not found
//!   (`mwInvalidArgument`), so it cannot cause undefined behaviour.
//! - **Streams.** With a `NULL` stream the buffers are host memory and the call completes on
//!   the host, like a host-side NCCL call followed by a stream synchronize. With a stream (a
//!   `CUstream`/`cudaStream_t`, in a build with the `cuda` feature) the buffers are device
//!   memory and the call only enqueues its work on the stream, as NCCL does (`staging.rs`);
//!   failures then show in `mwCommGetAsyncError`. Without the feature a stream is refused.
//!
//! Each communicator is a world of its own `WorldManager` (so that one process may hold several
//! ranks of one world, as NCCL allows); all of them report events to one queue, read with
//! `mwPollEvent` / `mwWaitEvent`.

#![allow(non_camel_case_types, non_upper_case_globals, non_snake_case, clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;
use std::time::Duration;

use crate::api::error::{BrokenCause, Error, ErrorKind};
use crate::api::manager::{Event, EventQueue, Formation, Rendezvous, WorldManager};
use crate::api::options::{TransportChoice, WorldOptions};
use crate::api::request::Completion;
use crate::api::types::{DataType, ReduceOp};
use crate::api::world::World;
use crate::coll::OpDesc;
use crate::engine::wire::OpKind;
use crate::sys::buf::{ranges_overlap, RawBuf};
use crate::sys::sync::{lock, Arc, Mutex};
use crate::UniqueId;

/// Result of every call, numbered as NCCL's `ncclResult_t`.
pub type mwResult_t = c_int;
/// The call succeeded.
pub const mwSuccess: mwResult_t = 0;
/// A CUDA call failed.
pub const mwUnhandledCudaError: mwResult_t = 1;
/// A system call failed (socket, memory map, thread).
pub const mwSystemError: mwResult_t = 2;
/// An internal inconsistency of multiworld.
pub const mwInternalError: mwResult_t = 3;
/// An argument is wrong on this rank: null pointer, size overflow, unknown type or op, rank out
/// of range, unknown communicator handle.
pub const mwInvalidArgument: mwResult_t = 4;
/// The call is wrong in context: ranks called different operations, counts, types, ops or
/// roots; the communicator is still forming.
pub const mwInvalidUsage: mwResult_t = 5;
/// The world is broken: a peer died, hung, was cut off or aborted (NCCL's `ncclRemoteError`).
pub const mwRemoteError: mwResult_t = 6;
/// A non-blocking call has not finished (poll `mwCommGetAsyncError`).
pub const mwInProgress: mwResult_t = 7;
/// A deadline passed (formation, or an operation's own deadline). NCCL has no such code; 8 is
/// left free because NCCL uses it for `ncclNumResults`.
pub const mwTimeout: mwResult_t = 9;

/// Element type, numbered as NCCL's `ncclDataType_t`.
pub type mwDataType_t = c_int;
/// `int8_t`.
pub const mwInt8: mwDataType_t = 0;
/// `char` (same as `mwInt8`).
pub const mwChar: mwDataType_t = 0;
/// `uint8_t`.
pub const mwUint8: mwDataType_t = 1;
/// `int32_t`.
pub const mwInt32: mwDataType_t = 2;
/// `int` (same as `mwInt32`).
pub const mwInt: mwDataType_t = 2;
/// `uint32_t`.
pub const mwUint32: mwDataType_t = 3;
/// `int64_t`.
pub const mwInt64: mwDataType_t = 4;
/// `uint64_t`.
pub const mwUint64: mwDataType_t = 5;
/// IEEE half precision.
pub const mwFloat16: mwDataType_t = 6;
/// Same as `mwFloat16`.
pub const mwHalf: mwDataType_t = 6;
/// `float`.
pub const mwFloat32: mwDataType_t = 7;
/// Same as `mwFloat32`.
pub const mwFloat: mwDataType_t = 7;
/// `double`.
pub const mwFloat64: mwDataType_t = 8;
/// Same as `mwFloat64`.
pub const mwDouble: mwDataType_t = 8;
/// bfloat16.
pub const mwBfloat16: mwDataType_t = 9;

/// Reduction, numbered as NCCL's `ncclRedOp_t`.
pub type mwRedOp_t = c_int;
/// Sum.
pub const mwSum: mwRedOp_t = 0;
/// Product.
pub const mwProd: mwRedOp_t = 1;
/// Maximum.
pub const mwMax: mwRedOp_t = 2;
/// Minimum.
pub const mwMin: mwRedOp_t = 3;
/// Average.
pub const mwAvg: mwRedOp_t = 4;

/// Bytes of a `mwUniqueId`, as NCCL's.
pub const MW_UNIQUE_ID_BYTES: usize = 128;

/// Identifies one world formation; made by `mwGetUniqueId`, copied to every rank.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct mwUniqueId {
    /// Opaque bytes.
    pub internal: [c_char; MW_UNIQUE_ID_BYTES],
}

/// Opaque communicator (never instantiated: a handle's value is a key of this layer's table).
pub struct mwComm {
    _private: (),
}

/// A communicator handle.
pub type mwComm_t = *mut mwComm;

/// Settings of a communicator (`mwCommInitRankConfig`, `mwCommInitAt`). Start from
/// `MW_CONFIG_INITIALIZER` or `mwConfigInit`, then change fields.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct mwConfig_t {
    /// `sizeof(mwConfig_t)`, so that the library can tell versions apart.
    pub size: usize,
    /// 1: calls return when done. 0: calls return `mwInProgress` at once; poll
    /// `mwCommGetAsyncError` until it says `mwSuccess` (or an error).
    pub blocking: c_int,
    /// Formation deadline in milliseconds (default 30000).
    pub timeoutMs: c_int,
    /// Heartbeat interval in milliseconds (default 200); 0 turns heartbeats off.
    pub heartbeatIntervalMs: c_int,
    /// Silence, in milliseconds, after which a peer is declared hung (default 3000).
    pub heartbeatTimeoutMs: c_int,
    /// Deadline of every operation in milliseconds; 0: none (default).
    pub opTimeoutMs: c_int,
    /// 0: shared memory where possible, else TCP (default); 1: TCP only.
    pub transport: c_int,
}

/// An event of one of the process's communicators.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct mwEvent_t {
    /// `MW_EVENT_READY`, `MW_EVENT_BROKEN` or `MW_EVENT_REMOVED`.
    pub kind: c_int,
    /// Generation of the world.
    pub generation: c_int,
    /// For broken worlds, the peer rank the cause points at, else -1.
    pub peer: c_int,
    /// The world's name, NUL-terminated (truncated to fit).
    pub name: [c_char; 256],
    /// For broken worlds, the cause, NUL-terminated (truncated to fit).
    pub cause: [c_char; 512],
}

/// A world formed and is ready.
pub const MW_EVENT_READY: c_int = 1;
/// A world broke.
pub const MW_EVENT_BROKEN: c_int = 2;
/// A world was removed (its communicator destroyed or aborted).
pub const MW_EVENT_REMOVED: c_int = 3;

fn code(kind: ErrorKind) -> mwResult_t {
    match kind {
        ErrorKind::Cuda => mwUnhandledCudaError,
        ErrorKind::System => mwSystemError,
        ErrorKind::Internal => mwInternalError,
        ErrorKind::InvalidArgument => mwInvalidArgument,
        ErrorKind::InvalidUsage => mwInvalidUsage,
        ErrorKind::WorldBroken => mwRemoteError,
        ErrorKind::InProgress => mwInProgress,
        ErrorKind::Timeout => mwTimeout,
    }
}

/// Where a communicator stands.
enum Phase {
    Forming(Formation),
    Ready(World),
    Failed(Error),
}

struct Comm {
    manager: WorldManager,
    phase: Mutex<Phase>,
    rank: usize,
    size: usize,
    blocking: bool,
    /// Operations of a non-blocking communicator not yet seen finished.
    pending: Mutex<Vec<Arc<Completion>>>,
    last_error: Mutex<String>,
    /// Where operations on device buffers are staged, from the first one on.
    #[cfg(feature = "cuda")]
    staging: Mutex<Option<Arc<crate::gpu::staging::Staging>>>,
}

impl Comm {
    /// The world, once formed. A formation that finished is settled here.
    fn world(&self) -> Result<World, Error> {
        let mut p = lock(&self.phase);
        if let Phase::Forming(f) = &*p {
            if !f.test() {
                return Err(Error::new(ErrorKind::InProgress, "the communicator is still forming"));
            }
            let Phase::Forming(f) = std::mem::replace(&mut *p, Phase::Failed(Error::internal("settling"))) else {
                return Err(Error::internal("formation vanished"));
            };
            *p = match f.wait() {
                Ok(w) => Phase::Ready(w),
                Err(e) => Phase::Failed(e),
            };
        }
        match &*p {
            Phase::Ready(w) => Ok(w.clone()),
            Phase::Failed(e) => Err(e.clone()),
            Phase::Forming(_) => Err(Error::internal("formation not settled")),
        }
    }

    /// Blocks until formation has finished.
    fn settle(&self) -> Result<World, Error> {
        loop {
            match self.world() {
                Err(e) if e.kind() == ErrorKind::InProgress => std::thread::sleep(Duration::from_micros(200)),
                r => return r,
            }
        }
    }

    fn record(&self, e: &Error) -> mwResult_t {
        *lock(&self.last_error) = e.message().to_owned();
        code(e.kind())
    }

    /// Waits until the operations enqueued on streams so far have entered the world's order,
    /// so that a host operation called now comes after them on every rank, as it was called.
    fn wait_device_posted(&self) {
        #[cfg(feature = "cuda")]
        let staging = lock(&self.staging).clone();
        #[cfg(feature = "cuda")]
        if let Some(s) = staging {
            s.wait_posted();
        }
    }

    /// The first failure of an operation on device buffers.
    fn device_error(&self) -> Option<Error> {
        #[cfg(feature = "cuda")]
        if let Some(s) = &*lock(&self.staging) {
            return s.error();
        }
        None
    }

    /// Enqueues operations on device buffers as one batch on `stream`.
    #[cfg(feature = "cuda")]
    fn enqueue_device(&self, stream: usize, ops: &[Checked]) -> Result<(), Error> {
        use crate::gpu::cuda::RawContext;
        use crate::gpu::staging::Staging;
        let w = if self.blocking { self.settle() } else { self.world() }?;
        let stream = stream as cudarc::driver::sys::CUstream;
        // SAFETY: the C caller passes a live stream (NCCL's contract).
        let ctx = unsafe { RawContext::of_stream(stream) }?;
        let staging = {
            let mut slot = lock(&self.staging);
            match &*slot {
                Some(s) if s.context() != ctx => {
                    return Err(Error::invalid_arg(
                        "the stream belongs to another CUDA context than this communicator's earlier operations",
                    ))
                }
                Some(s) => s.clone(),
                None => slot.insert(Staging::start(w, ctx, None)?).clone(),
            }
        };
        let some = |(p, n): (usize, usize)| (n > 0).then_some((p as u64, n));
        let ops: Vec<_> = ops.iter().map(|o| (o.desc, some(o.send), some(o.recv))).collect();
        // SAFETY: the stream is of the staging's context (checked); the buffers are device
        // memory valid until the stream has run the operations (the C caller's contract).
        unsafe { staging.enqueue(stream, &ops) }
    }
}

/// The table of communicators: handles are keys, never pointers (keys are never reused).
#[derive(Default)]
struct Table {
    next: u64,
    comms: HashMap<u64, Arc<Comm>>,
}

fn table() -> &'static Mutex<Table> {
    static T: OnceLock<Mutex<Table>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(Table::default()))
}

fn events() -> &'static Arc<EventQueue> {
    static E: OnceLock<Arc<EventQueue>> = OnceLock::new();
    E.get_or_init(|| Arc::new(EventQueue::default()))
}

/// The last error of calls that had no communicator to record it on.
fn global_error() -> &'static Mutex<String> {
    static G: OnceLock<Mutex<String>> = OnceLock::new();
    G.get_or_init(|| Mutex::new(String::new()))
}

fn fail(comm: Option<&Comm>, e: Error) -> mwResult_t {
    match comm {
        Some(c) => c.record(&e),
        None => {
            *lock(global_error()) = e.message().to_owned();
            code(e.kind())
        }
    }
}

fn invalid(comm: Option<&Comm>, msg: impl Into<String>) -> mwResult_t {
    fail(comm, Error::invalid_arg(msg))
}

fn lookup(comm: mwComm_t) -> Result<Arc<Comm>, mwResult_t> {
    let key = comm as usize as u64;
    match lock(table()).comms.get(&key) {
        Some(c) if key != 0 => Ok(c.clone()),
        _ => Err(invalid(None, format!("{comm:p} is not a live communicator"))),
    }
}

fn register(c: Comm) -> mwComm_t {
    let mut t = lock(table());
    t.next += 1;
    let key = t.next;
    t.comms.insert(key, Arc::new(c));
    key as usize as mwComm_t
}

/// Runs an entry point's body; a panic becomes `mwInternalError`, never unwinding into C.
fn guard(f: impl FnOnce() -> mwResult_t) -> mwResult_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            *lock(global_error()) = "internal error: a panic was caught at the C boundary".into();
            mwInternalError
        }
    }
}

/// Operations recorded between `mwGroupStart` and `mwGroupEnd`, per thread (as NCCL's).
#[derive(Default)]
struct GroupState {
    depth: u32,
    /// Each call with its stream (0: host memory).
    ops: Vec<(Arc<Comm>, Checked, usize)>,
    inits: Vec<Arc<Comm>>,
}

thread_local! {
    static GROUP: RefCell<GroupState> = RefCell::new(GroupState::default());
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn in_group() -> bool {
    GROUP.with(|g| g.borrow().depth > 0)
}

/// Library version: `major * 10000 + minor * 100 + patch`.
#[no_mangle]
pub unsafe extern "C" fn mwGetVersion(version: *mut c_int) -> mwResult_t {
    guard(|| {
        if version.is_null() {
            return invalid(None, "mwGetVersion: version is NULL");
        }
        let v = |s: &str| s.parse::<c_int>().unwrap_or(0);
        let n = v(env!("CARGO_PKG_VERSION_MAJOR")) * 10000
            + v(env!("CARGO_PKG_VERSION_MINOR")) * 100
            + v(env!("CARGO_PKG_VERSION_PATCH"));
        // SAFETY: checked non-null; the caller passes a pointer to an int.
        unsafe { *version = n };
        mwSuccess
    })
}

/// Makes a unique id and starts its rendezvous root in this process (`ncclGetUniqueId`).
#[no_mangle]
pub unsafe extern "C" fn mwGetUniqueId(uniqueId: *mut mwUniqueId) -> mwResult_t {
    guard(|| {
        if uniqueId.is_null() {
            return invalid(None, "mwGetUniqueId: uniqueId is NULL");
        }
        match UniqueId::new() {
            Ok(id) => {
                let mut out = mwUniqueId { internal: [0; MW_UNIQUE_ID_BYTES] };
                for (o, b) in out.internal.iter_mut().zip(id.to_bytes()) {
                    *o = b as c_char;
                }
                // SAFETY: checked non-null; the caller passes a pointer to a mwUniqueId.
                unsafe { *uniqueId = out };
                mwSuccess
            }
            Err(e) => fail(None, e),
        }
    })
}

/// Fills `config` with the defaults (same as `MW_CONFIG_INITIALIZER`).
#[no_mangle]
pub unsafe extern "C" fn mwConfigInit(config: *mut mwConfig_t) -> mwResult_t {
    guard(|| {
        if config.is_null() {
            return invalid(None, "mwConfigInit: config is NULL");
        }
        // SAFETY: checked non-null; the caller passes a pointer to a mwConfig_t.
        unsafe { *config = default_config() };
        mwSuccess
    })
}

fn default_config() -> mwConfig_t {
    mwConfig_t {
        size: std::mem::size_of::<mwConfig_t>(),
        blocking: 1,
        timeoutMs: 30_000,
        heartbeatIntervalMs: 200,
        heartbeatTimeoutMs: 3_000,
        opTimeoutMs: 0,
        transport: 0,
    }
}

/// Options and blocking flag from a C config (NULL: defaults).
unsafe fn options(config: *const mwConfig_t) -> Result<(WorldOptions, bool), String> {
    let c = if config.is_null() {
        default_config()
    } else {
        // SAFETY: the caller passes a pointer to a mwConfig_t; its first field says its size.
        let size = unsafe { (*config).size };
        if size != std::mem::size_of::<mwConfig_t>() {
            return Err(format!(
                "config.size is {size}, expected {} (initialize with MW_CONFIG_INITIALIZER or mwConfigInit)",
                std::mem::size_of::<mwConfig_t>()
            ));
        }
        // SAFETY: as above, and the size matches this version's struct.
        unsafe { *config }
    };
    if c.timeoutMs <= 0 || c.heartbeatIntervalMs < 0 || c.heartbeatTimeoutMs < 0 || c.opTimeoutMs < 0 {
        return Err("config: timeouts must be positive (heartbeat and operation timeouts may be 0)".into());
    }
    if !(0..=1).contains(&c.transport) || !(0..=1).contains(&c.blocking) {
        return Err("config: blocking and transport are 0 or 1".into());
    }
    let ms = |v: c_int| Duration::from_millis(v as u64);
    let mut o = WorldOptions::default()
        .with_timeout(ms(c.timeoutMs))
        .with_op_timeout((c.opTimeoutMs > 0).then(|| ms(c.opTimeoutMs)))
        .with_transport(if c.transport == 1 { TransportChoice::Tcp } else { TransportChoice::Auto });
    o = if c.heartbeatIntervalMs == 0 {
        o.without_heartbeat()
    } else {
        if c.heartbeatTimeoutMs <= c.heartbeatIntervalMs {
            return Err("config: heartbeatTimeoutMs must exceed heartbeatIntervalMs".into());
        }
        o.with_heartbeat(ms(c.heartbeatIntervalMs), ms(c.heartbeatTimeoutMs))
    };
    Ok((o, c.blocking == 1))
}

/// Starts a communicator's formation; blocks until it is ready for blocking communicators
/// outside a group.
unsafe fn init(
    comm: *mut mwComm_t,
    nranks: c_int,
    rank: c_int,
    name: String,
    rendezvous: Rendezvous,
    config: *const mwConfig_t,
) -> mwResult_t {
    if comm.is_null() {
        return invalid(None, "comm is NULL");
    }
    if nranks <= 0 || rank < 0 || rank >= nranks {
        return invalid(None, format!("rank {rank} of {nranks} ranks is not valid"));
    }
    // SAFETY: forwarded from the caller.
    let (opts, blocking) = match unsafe { options(config) } {
        Ok(x) => x,
        Err(m) => return invalid(None, m),
    };
    let manager = WorldManager::with_event_queue(opts.clone(), events().clone());
    let f = manager.form(&name, rendezvous, rank as usize, nranks as usize, &opts);
    let c = Comm {
        manager,
        phase: Mutex::new(Phase::Forming(f)),
        rank: rank as usize,
        size: nranks as usize,
        blocking,
        pending: Mutex::new(Vec::new()),
        last_error: Mutex::new(String::new()),
        #[cfg(feature = "cuda")]
        staging: Mutex::new(None),
    };
    let handle = register(c);
    // SAFETY: checked non-null.
    unsafe { *comm = handle };
    let Ok(c) = lookup(handle) else { return mwInternalError };
    if in_group() {
        GROUP.with(|g| g.borrow_mut().inits.push(c));
        return mwSuccess;
    }
    if !blocking {
        return mwInProgress;
    }
    match c.settle() {
        Ok(_) => mwSuccess,
        Err(e) => {
            // A failed formation leaves no communicator behind.
            lock(table()).comms.remove(&(handle as usize as u64));
            // SAFETY: checked non-null.
            unsafe { *comm = std::ptr::null_mut() };
            fail(None, e)
        }
    }
}

fn id_name(id: &UniqueId) -> String {
    // Every rank derives the same name from the id; the secret itself never appears.
    let h = id.to_bytes().iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3));
    format!("comm-{h:016x}")
}

unsafe fn parse_id(id: &mwUniqueId) -> Result<UniqueId, Error> {
    let bytes: Vec<u8> = id.internal.iter().map(|c| *c as u8).collect();
    UniqueId::from_bytes(&bytes)
}

/// Joins the world of `commId` as `rank` of `nranks` (`ncclCommInitRank`).
#[no_mangle]
pub unsafe extern "C" fn mwCommInitRank(
    comm: *mut mwComm_t,
    nranks: c_int,
    commId: mwUniqueId,
    rank: c_int,
) -> mwResult_t {
    guard(|| {
        // SAFETY: the id is a plain value; parse checks it.
        let id = match unsafe { parse_id(&commId) } {
            Ok(id) => id,
            Err(e) => return fail(None, e),
        };
        // SAFETY: pointers forwarded from the caller, checked inside.
        unsafe { init(comm, nranks, rank, id_name(&id), Rendezvous::Id(id), std::ptr::null()) }
    })
}

/// [`mwCommInitRank`] with settings (`ncclCommInitRankConfig`). With `config->blocking = 0` it
/// returns `mwInProgress` at once; poll `mwCommGetAsyncError`.
#[no_mangle]
pub unsafe extern "C" fn mwCommInitRankConfig(
    comm: *mut mwComm_t,
    nranks: c_int,
    commId: mwUniqueId,
    rank: c_int,
    config: *mut mwConfig_t,
) -> mwResult_t {
    guard(|| {
        // SAFETY: the id is a plain value; parse checks it.
        let id = match unsafe { parse_id(&commId) } {
            Ok(id) => id,
            Err(e) => return fail(None, e),
        };
        // SAFETY: pointers forwarded from the caller, checked inside.
        unsafe { init(comm, nranks, rank, id_name(&id), Rendezvous::Id(id), config) }
    })
}

/// Joins world `name` by address (MultiWorld's way): rank 0 listens on `address`
/// (`"host:port"`), the others connect to it. `config` may be NULL.
#[no_mangle]
pub unsafe extern "C" fn mwCommInitAt(
    comm: *mut mwComm_t,
    name: *const c_char,
    address: *const c_char,
    nranks: c_int,
    rank: c_int,
    config: *mut mwConfig_t,
) -> mwResult_t {
    guard(|| {
        if name.is_null() || address.is_null() {
            return invalid(None, "mwCommInitAt: name and address must not be NULL");
        }
        // SAFETY: checked non-null; the caller passes NUL-terminated strings.
        let (n, a) = unsafe { (CStr::from_ptr(name), CStr::from_ptr(address)) };
        let (Ok(n), Ok(a)) = (n.to_str(), a.to_str()) else {
            return invalid(None, "mwCommInitAt: name and address must be UTF-8");
        };
        // SAFETY: pointers forwarded from the caller, checked inside.
        unsafe { init(comm, nranks, rank, n.to_owned(), Rendezvous::Address(a.to_owned()), config) }
    })
}

/// State of a communicator: `mwSuccess` when ready and nothing is in flight,
/// `mwInProgress` while forming or while non-blocking operations run, else the error that
/// ended it (`ncclCommGetAsyncError`).
#[no_mangle]
pub unsafe extern "C" fn mwCommGetAsyncError(comm: mwComm_t, asyncError: *mut mwResult_t) -> mwResult_t {
    guard(|| {
        let c = match lookup(comm) {
            Ok(c) => c,
            Err(r) => return r,
        };
        if asyncError.is_null() {
            return invalid(Some(&c), "mwCommGetAsyncError: asyncError is NULL");
        }
        let state = match c.world() {
            Err(e) => c.record(&e),
            Ok(w) => {
                let mut pending = lock(&c.pending);
                let mut first = c.device_error();
                pending.retain(|k| match k.result() {
                    None => true,
                    Some(Ok(())) => false,
                    Some(Err(e)) => {
                        first.get_or_insert(e);
                        false
                    }
                });
                match (first, pending.is_empty(), w.state()) {
                    (Some(e), _, _) => c.record(&e),
                    (None, false, _) => mwInProgress,
                    // A peer that closed the world on purpose is not a fault of this
                    // communicator's operations; the next operation says it is over.
                    (None, true, crate::WorldState::Broken(BrokenCause::PeerLeft { .. })) => mwSuccess,
                    (None, true, crate::WorldState::Broken(cause)) => {
                        c.record(&Error::broken(w.name(), w.rank(), cause, false))
                    }
                    (None, true, _) => mwSuccess,
                }
            }
        };
        // SAFETY: checked non-null.
        unsafe { *asyncError = state };
        mwSuccess
    })
}

fn release(comm: mwComm_t, abort: bool) -> mwResult_t {
    let key = comm as usize as u64;
    let Some(c) = lock(table()).comms.remove(&key).filter(|_| key != 0) else {
        return invalid(None, format!("{comm:p} is not a live communicator"));
    };
    // Operations on streams: a destroy lets those enqueued finish first (as NCCL's does); an
    // abort fails them. Either way no stream is left waiting, and every staging block is
    // freed before this returns.
    #[cfg(feature = "cuda")]
    let staging = lock(&c.staging).take();
    #[cfg(feature = "cuda")]
    if let Some(s) = &staging {
        if !abort {
            s.drain();
        }
        s.close();
    }
    if let Ok(w) = c.settle() {
        if abort || lock(&c.pending).iter().any(|k| !k.is_done()) {
            w.abort();
        }
        let _ = c.manager.remove_world(w.name());
    }
    #[cfg(feature = "cuda")]
    if let Some(s) = staging {
        s.join();
    }
    mwSuccess
}

/// Aborts a communicator and frees it: local, needs no peer; operations in flight fail
/// (`ncclCommAbort`).
#[no_mangle]
pub unsafe extern "C" fn mwCommAbort(comm: mwComm_t) -> mwResult_t {
    guard(|| release(comm, true))
}

/// Frees a communicator. An idle one leaves its world gracefully (its peers see it leave);
/// host operations still in flight are aborted — wait for them with `mwCommGetAsyncError`
/// first; operations enqueued on streams run first (`ncclCommDestroy`).
#[no_mangle]
pub unsafe extern "C" fn mwCommDestroy(comm: mwComm_t) -> mwResult_t {
    guard(|| release(comm, false))
}

/// Number of ranks (`ncclCommCount`).
#[no_mangle]
pub unsafe extern "C" fn mwCommCount(comm: mwComm_t, count: *mut c_int) -> mwResult_t {
    guard(|| match lookup(comm) {
        Err(r) => r,
        Ok(c) if count.is_null() => invalid(Some(&c), "mwCommCount: count is NULL"),
        Ok(c) => {
            // SAFETY: checked non-null.
            unsafe { *count = c.size as c_int };
            mwSuccess
        }
    })
}

/// This process's rank (`ncclCommUserRank`).
#[no_mangle]
pub unsafe extern "C" fn mwCommUserRank(comm: mwComm_t, rank: *mut c_int) -> mwResult_t {
    guard(|| match lookup(comm) {
        Err(r) => r,
        Ok(c) if rank.is_null() => invalid(Some(&c), "mwCommUserRank: rank is NULL"),
        Ok(c) => {
            // SAFETY: checked non-null.
            unsafe { *rank = c.rank as c_int };
            mwSuccess
        }
    })
}

/// What one C call asks for, before it is checked.
struct RawCall {
    kind: OpKind,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    datatype: mwDataType_t,
    op: mwRedOp_t,
    /// Root, or the peer of send/recv.
    root: c_int,
    is_send: bool,
}

/// A checked call: the operation and its buffers as (address, bytes), host or device memory.
#[derive(Clone, Copy)]
struct Checked {
    desc: OpDesc,
    send: (usize, usize),
    recv: (usize, usize),
}

impl Checked {
    /// In a CUDA build, refuses device memory passed with a NULL stream (host memory): the
    /// host would fault on it.
    fn check_host(&self) -> Result<(), Error> {
        #[cfg(feature = "cuda")]
        for (p, n) in [self.send, self.recv] {
            use cudarc::driver::sys::CUmemorytype;
            if n > 0 && crate::gpu::cuda::memory_type(p) == Some(CUmemorytype::CU_MEMORYTYPE_DEVICE) {
                return Err(Error::invalid_arg(format!(
                    "{}: {p:#x} is device memory, which needs a stream (a NULL stream means host memory)",
                    self.desc.kind.name()
                )));
            }
        }
        Ok(())
    }

    /// The operation on views of host buffers.
    ///
    /// # Safety
    /// The buffers are host memory that stays valid until the operation is done (the C
    /// caller's contract, as with NCCL).
    unsafe fn host(&self) -> (OpDesc, RawBuf, RawBuf) {
        let ((sp, sl), (rp, rl)) = (self.send, self.recv);
        // SAFETY: the caller's contract; the lengths were computed from the count and checked
        // against overflow.
        unsafe { (self.desc, RawBuf::from_raw(sp as *mut u8, sl, false), RawBuf::from_raw(rp as *mut u8, rl, true)) }
    }
}

/// Checks a call against the communicator.
fn prepare(c: &Comm, r: &RawCall) -> Result<Checked, Error> {
    let name = r.kind.name();
    let bad = |m: String| Error::invalid_arg(format!("{name}: {m}"));
    let dtype = DataType::from_code(r.datatype as u32)
        .filter(|_| r.datatype >= 0)
        .ok_or_else(|| bad(format!("unknown data type {}", r.datatype)))?;
    let redop = if r.kind.reduces() {
        ReduceOp::from_code(r.op as u32)
            .filter(|_| r.op >= 0)
            .ok_or_else(|| bad(format!("unknown reduction {}", r.op)))?
    } else {
        ReduceOp::Sum
    };
    let root = if r.kind.rooted() || r.kind == OpKind::P2p {
        if r.root < 0 || r.root as usize >= c.size {
            return Err(bad(format!("rank {} is out of range for {} ranks", r.root, c.size)));
        }
        r.root as usize
    } else {
        0
    };
    let e = dtype.size();
    let (send_p, recv_p) = (r.send as usize, r.recv as usize);
    let block = r.count.checked_mul(e).ok_or_else(|| bad("count overflows".into()))?;
    // NCCL's in-place layouts.
    let in_place = match r.kind {
        OpKind::AllReduce | OpKind::Broadcast | OpKind::Reduce => send_p == recv_p && send_p != 0,
        OpKind::AllGather => {
            send_p != 0 && Some(send_p) == block.checked_mul(c.rank).and_then(|o| recv_p.checked_add(o))
        }
        OpKind::ReduceScatter => {
            recv_p != 0 && Some(recv_p) == block.checked_mul(c.rank).and_then(|o| send_p.checked_add(o))
        }
        _ => false,
    };
    let desc = OpDesc { kind: r.kind, dtype, redop, count: r.count, root, is_send: r.is_send, in_place };
    let too_big = || bad(format!("count overflows: {} elements of {dtype} are more bytes than PTRDIFF_MAX", r.count));
    let (slen, rlen) = desc.buffer_bytes_checked(c.rank, c.size).ok_or_else(too_big)?;
    if (slen > 0 && send_p == 0) || (rlen > 0 && recv_p == 0) {
        return Err(bad("a buffer is NULL".into()));
    }
    if send_p.checked_add(slen).is_none() || recv_p.checked_add(rlen).is_none() {
        return Err(bad("a buffer runs past the end of the address space".into()));
    }
    // In place, the one buffer starts where NCCL says the operation's full buffer starts.
    let recv_start = if in_place && r.kind == OpKind::ReduceScatter { send_p } else { recv_p };
    let (send, recv) = ((send_p, slen), (recv_start, rlen));
    if !in_place && ranges_overlap(send, recv) {
        return Err(bad("send and receive buffers overlap but are not the in-place layout".into()));
    }
    Ok(Checked { desc, send, recv })
}

/// Runs one call: records it in the current group, or posts it (and waits, on a blocking
/// communicator).
fn run(comm: mwComm_t, call: RawCall, stream: *mut c_void) -> mwResult_t {
    let c = match lookup(comm) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let checked = match prepare(&c, &call) {
        Ok(x) => x,
        Err(e) => return c.record(&e),
    };
    if !stream.is_null() && !cfg!(feature = "cuda") {
        return c.record(&Error::invalid_arg(format!(
            "{}: a stream means device buffers, which need a build with the cuda feature (host buffers take a NULL stream)",
            call.kind.name()
        )));
    }
    if stream.is_null() {
        if let Err(e) = checked.check_host() {
            return c.record(&e);
        }
    }
    if in_group() {
        GROUP.with(|g| g.borrow_mut().ops.push((c, checked, stream as usize)));
        return mwSuccess;
    }
    if stream.is_null() {
        // SAFETY: host buffers under the C caller's contract.
        post(&c, vec![unsafe { checked.host() }])
    } else {
        device(&c, stream as usize, &[checked])
    }
}

/// Enqueues operations on device buffers on `stream` (builds with the `cuda` feature).
fn device(c: &Comm, stream: usize, ops: &[Checked]) -> mwResult_t {
    #[cfg(feature = "cuda")]
    let r = c.enqueue_device(stream, ops);
    #[cfg(not(feature = "cuda"))]
    let r = {
        let _ = (stream, ops);
        Err(Error::invalid_arg("device buffers need a build with the cuda feature"))
    };
    match r {
        Ok(()) => mwSuccess,
        Err(e) => c.record(&e),
    }
}

fn post(c: &Comm, ops: Vec<(OpDesc, RawBuf, RawBuf)>) -> mwResult_t {
    match start(c, ops) {
        Err(r) => r,
        Ok(None) => mwInProgress,
        Ok(Some((w, done))) => finish(c, &w, &done),
    }
}

/// Posts operations without waiting. For a blocking communicator, returns what to wait for;
/// for a non-blocking one, files them as pending.
#[allow(clippy::type_complexity)]
fn start(c: &Comm, ops: Vec<(OpDesc, RawBuf, RawBuf)>) -> Result<Option<(World, Vec<Arc<Completion>>)>, mwResult_t> {
    let w = (if c.blocking { c.settle() } else { c.world() }).map_err(|e| c.record(&e))?;
    c.wait_device_posted();
    // SAFETY: the views come from `prepare`, under the C caller's contract that the buffers
    // stay valid until the operation is done.
    let done = unsafe { w.post_raw(ops, false) }.map_err(|e| c.record(&e))?;
    if c.blocking {
        Ok(Some((w, done)))
    } else {
        lock(&c.pending).extend(done);
        Ok(None)
    }
}

/// Waits for a blocking communicator's operations; the first error.
fn finish(c: &Comm, w: &World, done: &[Arc<Completion>]) -> mwResult_t {
    w.wait_for(done);
    match done.iter().find_map(|k| k.result().and_then(|r| r.err())) {
        Some(e) => c.record(&e),
        None => mwSuccess,
    }
}

/// Sends `count` elements to `peer`, which posts a matching `mwRecv` (`ncclSend`).
#[no_mangle]
pub unsafe extern "C" fn mwSend(
    sendbuff: *const c_void,
    count: usize,
    datatype: mwDataType_t,
    peer: c_int,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| {
        let call = RawCall {
            kind: OpKind::P2p,
            send: sendbuff,
            recv: std::ptr::null_mut(),
            count,
            datatype,
            op: 0,
            root: peer,
            is_send: true,
        };
        run(comm, call, stream)
    })
}

/// Receives `count` elements from `peer` (`ncclRecv`).
#[no_mangle]
pub unsafe extern "C" fn mwRecv(
    recvbuff: *mut c_void,
    count: usize,
    datatype: mwDataType_t,
    peer: c_int,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| {
        let call = RawCall {
            kind: OpKind::P2p,
            send: std::ptr::null(),
            recv: recvbuff,
            count,
            datatype,
            op: 0,
            root: peer,
            is_send: false,
        };
        run(comm, call, stream)
    })
}

/// Copies the root's `sendbuff` into every rank's `recvbuff` (`ncclBroadcast`; in place when
/// the two are equal).
#[no_mangle]
pub unsafe extern "C" fn mwBroadcast(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: mwDataType_t,
    root: c_int,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| {
        let call = RawCall {
            kind: OpKind::Broadcast,
            send: sendbuff,
            recv: recvbuff,
            count,
            datatype,
            op: 0,
            root,
            is_send: false,
        };
        run(comm, call, stream)
    })
}

/// Reduces every rank's `sendbuff` into the root's `recvbuff` (`ncclReduce`).
#[no_mangle]
pub unsafe extern "C" fn mwReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: mwDataType_t,
    op: mwRedOp_t,
    root: c_int,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| {
        let call =
            RawCall { kind: OpKind::Reduce, send: sendbuff, recv: recvbuff, count, datatype, op, root, is_send: false };
        run(comm, call, stream)
    })
}

/// Reduces every rank's `sendbuff`; every rank gets the result in `recvbuff`
/// (`ncclAllReduce`).
#[no_mangle]
pub unsafe extern "C" fn mwAllReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: mwDataType_t,
    op: mwRedOp_t,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| {
        let call = RawCall {
            kind: OpKind::AllReduce,
            send: sendbuff,
            recv: recvbuff,
            count,
            datatype,
            op,
            root: 0,
            is_send: false,
        };
        run(comm, call, stream)
    })
}

/// Gathers `sendcount` elements from every rank into every rank's `recvbuff`, in rank order
/// (`ncclAllGather`).
#[no_mangle]
pub unsafe extern "C" fn mwAllGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: mwDataType_t,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| {
        let call = RawCall {
            kind: OpKind::AllGather,
            send: sendbuff,
            recv: recvbuff,
            count: sendcount,
            datatype,
            op: 0,
            root: 0,
            is_send: false,
        };
        run(comm, call, stream)
    })
}

/// Reduces every rank's `sendbuff` (`recvcount` elements per rank); rank `r` gets block `r`
/// (`ncclReduceScatter`).
#[no_mangle]
pub unsafe extern "C" fn mwReduceScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: mwDataType_t,
    op: mwRedOp_t,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| {
        let call = RawCall {
            kind: OpKind::ReduceScatter,
            send: sendbuff,
            recv: recvbuff,
            count: recvcount,
            datatype,
            op,
            root: 0,
            is_send: false,
        };
        run(comm, call, stream)
    })
}

/// Sends block `r` (of `count` elements) of `sendbuff` to rank `r`, which stores it as block
/// `rank` of its `recvbuff` (`ncclAlltoAll`).
#[no_mangle]
pub unsafe extern "C" fn mwAllToAll(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: mwDataType_t,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| {
        let call = RawCall {
            kind: OpKind::AllToAll,
            send: sendbuff,
            recv: recvbuff,
            count,
            datatype,
            op: 0,
            root: 0,
            is_send: false,
        };
        run(comm, call, stream)
    })
}

/// Gathers `sendcount` elements from every rank into the root's `recvbuff` (`ncclGather`).
#[no_mangle]
pub unsafe extern "C" fn mwGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: mwDataType_t,
    root: c_int,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| {
        let call = RawCall {
            kind: OpKind::Gather,
            send: sendbuff,
            recv: recvbuff,
            count: sendcount,
            datatype,
            op: 0,
            root,
            is_send: false,
        };
        run(comm, call, stream)
    })
}

/// Sends block `r` (of `recvcount` elements) of the root's `sendbuff` to rank `r`
/// (`ncclScatter`).
#[no_mangle]
pub unsafe extern "C" fn mwScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: mwDataType_t,
    root: c_int,
    comm: mwComm_t,
    stream: *mut c_void,
) -> mwResult_t {
    guard(|| {
        let call = RawCall {
            kind: OpKind::Scatter,
            send: sendbuff,
            recv: recvbuff,
            count: recvcount,
            datatype,
            op: 0,
            root,
            is_send: false,
        };
        run(comm, call, stream)
    })
}

/// Returns once every rank has called it.
#[no_mangle]
pub unsafe extern "C" fn mwBarrier(comm: mwComm_t, stream: *mut c_void) -> mwResult_t {
    guard(|| {
        let call = RawCall {
            kind: OpKind::Barrier,
            send: std::ptr::null(),
            recv: std::ptr::null_mut(),
            count: 0,
            datatype: mwUint8,
            op: 0,
            root: 0,
            is_send: false,
        };
        run(comm, call, stream)
    })
}

/// Starts a group: calls until the matching `mwGroupEnd` are posted together, so that sends
/// and receives between the same ranks cannot deadlock, and several communicators can be
/// initialized from one thread (`ncclGroupStart`; groups nest).
#[no_mangle]
pub unsafe extern "C" fn mwGroupStart() -> mwResult_t {
    guard(|| {
        GROUP.with(|g| g.borrow_mut().depth += 1);
        mwSuccess
    })
}

/// Ends a group; the outermost end posts everything recorded and, for blocking
/// communicators, waits for it (`ncclGroupEnd`). Returns the first error.
#[no_mangle]
pub unsafe extern "C" fn mwGroupEnd() -> mwResult_t {
    guard(|| {
        let taken = GROUP.with(|g| {
            let mut g = g.borrow_mut();
            if g.depth == 0 {
                return None;
            }
            g.depth -= 1;
            Some(if g.depth == 0 { std::mem::take(&mut *g) } else { GroupState::default() })
        });
        let Some(group) = taken else {
            return fail(None, Error::invalid_usage("mwGroupEnd without mwGroupStart"));
        };
        let mut result = mwSuccess;
        let mut keep = |r: mwResult_t| {
            if result == mwSuccess || result == mwInProgress {
                result = if r == mwSuccess { result } else { r };
            }
        };
        // Formations first (every rank's init of the group runs concurrently).
        for c in &group.inits {
            if !c.blocking {
                keep(mwInProgress);
                continue;
            }
            if let Err(e) = c.settle() {
                keep(c.record(&e));
            }
        }
        // Then each communicator's operations, as one batch each, in the order recorded.
        let mut order: Vec<(Arc<Comm>, usize)> = Vec::new();
        let mut by_comm: Vec<Vec<Checked>> = Vec::new();
        let mut mixed: Vec<Arc<Comm>> = Vec::new();
        for (c, op, stream) in group.ops {
            match order.iter().position(|(o, _)| Arc::ptr_eq(o, &c)) {
                Some(i) if order[i].1 != stream => {
                    if !mixed.iter().any(|m| Arc::ptr_eq(m, &c)) {
                        mixed.push(c);
                    }
                }
                Some(i) => by_comm[i].push(op),
                None => {
                    order.push((c, stream));
                    by_comm.push(vec![op]);
                }
            }
        }
        // Post every communicator's batch before waiting for any: the ranks of one world may
        // live in this very thread.
        let mut waits = Vec::new();
        for ((c, stream), ops) in order.iter().zip(by_comm) {
            if mixed.iter().any(|m| Arc::ptr_eq(m, c)) {
                keep(c.record(&Error::invalid_usage(
                    "mwGroupEnd: one communicator's calls in a group must all use the same stream (or all NULL)",
                )));
                continue;
            }
            if *stream != 0 {
                keep(device(c, *stream, &ops));
                continue;
            }
            // SAFETY: host buffers under the C caller's contract.
            let ops = ops.iter().map(|o| unsafe { o.host() }).collect();
            match start(c, ops) {
                Err(r) => keep(r),
                Ok(None) => keep(mwInProgress),
                Ok(Some(x)) => waits.push((c, x)),
            }
        }
        for (c, (w, done)) in waits {
            keep(finish(c, &w, &done));
        }
        result
    })
}

/// A static description of a result code (`ncclGetErrorString`).
#[no_mangle]
pub extern "C" fn mwGetErrorString(result: mwResult_t) -> *const c_char {
    let s: &'static CStr = match result {
        mwSuccess => c"no error",
        mwUnhandledCudaError => c"unhandled cuda error",
        mwSystemError => c"unhandled system error (socket, memory map, thread)",
        mwInternalError => c"internal error in multiworld",
        mwInvalidArgument => c"invalid argument",
        mwInvalidUsage => c"invalid usage (ranks disagree, or the communicator is not ready)",
        mwRemoteError => c"world broken: a peer died, hung, was cut off or aborted",
        mwInProgress => c"operation in progress",
        mwTimeout => c"a deadline passed",
        _ => c"unknown result code",
    };
    s.as_ptr()
}

/// The message of the last error on `comm` (or, with `comm` NULL or unknown, of the last error
/// that had no communicator). The string stays valid until this thread calls
/// `mwGetLastError` again (`ncclGetLastError`).
#[no_mangle]
pub unsafe extern "C" fn mwGetLastError(comm: mwComm_t) -> *const c_char {
    let msg = catch_unwind(AssertUnwindSafe(|| {
        let key = comm as usize as u64;
        let c = lock(table()).comms.get(&key).cloned();
        match c {
            Some(c) => lock(&c.last_error).clone(),
            None => lock(global_error()).clone(),
        }
    }))
    .unwrap_or_else(|_| "internal error".into());
    let cs = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| {
        *l.borrow_mut() = cs;
        l.borrow().as_ptr()
    })
}

fn fill(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len() - 1);
    for (d, b) in dst.iter_mut().zip(&s.as_bytes()[..n]) {
        *d = *b as c_char;
    }
    dst[n] = 0;
}

unsafe fn write_event(ev: Event, out: *mut mwEvent_t) {
    let mut e = mwEvent_t { kind: 0, generation: 0, peer: -1, name: [0; 256], cause: [0; 512] };
    let (kind, name, generation, cause): (c_int, String, u32, Option<BrokenCause>) = match ev {
        Event::Ready { name, generation } => (MW_EVENT_READY, name, generation, None),
        Event::Broken { name, generation, cause } => (MW_EVENT_BROKEN, name, generation, Some(cause)),
        Event::Removed { name, generation } => (MW_EVENT_REMOVED, name, generation, None),
    };
    e.kind = kind;
    e.generation = generation as c_int;
    fill(&mut e.name, &name);
    if let Some(c) = cause {
        e.peer = c.peer().map_or(-1, |p| p as c_int);
        fill(&mut e.cause, &c.to_string());
    }
    // SAFETY: the caller checked `out` non-null; it points at a mwEvent_t.
    unsafe { *out = e };
}

/// Takes the next event of any communicator of this process: `mwSuccess` with `*event`
/// filled, or `mwInProgress` when there is none. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn mwPollEvent(event: *mut mwEvent_t) -> mwResult_t {
    // SAFETY: forwarded.
    guard(|| unsafe { wait_event(event, Some(Duration::ZERO)) })
}

/// Like `mwPollEvent`, waiting up to `timeoutMs` milliseconds (negative: for ever).
#[no_mangle]
pub unsafe extern "C" fn mwWaitEvent(event: *mut mwEvent_t, timeoutMs: c_int) -> mwResult_t {
    let t = (timeoutMs >= 0).then(|| Duration::from_millis(timeoutMs as u64));
    // SAFETY: forwarded.
    guard(|| unsafe { wait_event(event, t) })
}

unsafe fn wait_event(event: *mut mwEvent_t, timeout: Option<Duration>) -> mwResult_t {
    if event.is_null() {
        return invalid(None, "event is NULL");
    }
    match events().next(timeout) {
        Some(ev) => {
            // SAFETY: checked non-null.
            unsafe { write_event(ev, event) };
            mwSuccess
        }
        None => mwInProgress,
    }
}
