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
//!   memory and the call only enqueues its work on the stream, as NCCL does (`gpu/staging/`);
//!   failures then show in `mwCommGetAsyncError`. Without the feature a stream is refused.
//!
//! Each communicator is a world of its own `WorldManager` (so that one process may hold several
//! ranks of one world, as NCCL allows); all of them report events to one queue, read with
//! `mwPollEvent` / `mwWaitEvent`.

#![allow(non_camel_case_types, non_upper_case_globals, non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::api::error::ErrorKind;
use crate::sys::sync::lock;

mod comm;
mod elastic;
mod events;
mod group;
mod handles;
mod ops;

pub use comm::*;
pub use elastic::*;
pub use events::*;
use group::LAST_ERROR;
pub use group::*;
use handles::{global_error, guard, invalid, table};
pub use ops::*;

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
    /// Deadline of every operation in milliseconds. 0 (the default): the process's default,
    /// `MW_OP_TIMEOUT_MS` if set, else none; -1: none, whatever the environment says. The
    /// only guard against a live peer that never makes the matching call.
    pub opTimeoutMs: c_int,
    /// 0: shared memory where possible, else TCP (default); 1: TCP only.
    pub transport: c_int,
    /// What runs operations on device buffers (streams): 0 the library's own (default), 1
    /// NCCL (a build with the `nccl` feature and a loadable `libnccl.so`; host buffers are
    /// then refused). `MW_BACKEND=nccl` sets 1 for every communicator of the process.
    pub backend: c_int,
}

/// An event of one of the process's communicators.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct mwEvent_t {
    /// `MW_EVENT_READY`, `MW_EVENT_BROKEN`, `MW_EVENT_REMOVED` or `MW_EVENT_MEMBER_GONE`.
    pub kind: c_int,
    /// Generation of the world.
    pub generation: c_int,
    /// For broken worlds, the peer rank the cause points at; for `MW_EVENT_MEMBER_GONE`, the
    /// member's rank; else -1.
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
/// A member's registration of a world formed through etcd is gone (its process's lease expired
/// or it removed the world); `peer` is its rank. The world is not broken by it.
pub const MW_EVENT_MEMBER_GONE: c_int = 4;

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
