//! Making, joining, querying and freeing communicators (`mwGetUniqueId`, `mwCommInit*`,
//! `mwCommGetAsyncError`, `mwCommAbort`, `mwCommDestroy`, `mwCommCount`, `mwCommUserRank`).

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{c_char, c_int, CStr};
use std::time::Duration;

use super::group::*;
use super::handles::*;
use super::*;
use crate::api::error::{BrokenCause, Error};
use crate::api::manager::{Rendezvous, WorldManager};
use crate::api::options::{BackendChoice, TransportChoice, WorldOptions};
use crate::sys::sync::lock;
use crate::UniqueId;

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

pub(super) fn default_config() -> mwConfig_t {
    mwConfig_t {
        size: std::mem::size_of::<mwConfig_t>(),
        blocking: 1,
        timeoutMs: 30_000,
        heartbeatIntervalMs: 200,
        heartbeatTimeoutMs: 3_000,
        opTimeoutMs: 0,
        transport: 0,
        backend: 0,
    }
}

/// Options and blocking flag from a C config (NULL: defaults).
pub(super) unsafe fn options(config: *const mwConfig_t) -> Result<(WorldOptions, bool), String> {
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
    if c.timeoutMs <= 0 || c.heartbeatIntervalMs < 0 || c.heartbeatTimeoutMs < 0 || c.opTimeoutMs < -1 {
        return Err("config: timeouts must be positive (the heartbeat ones may be 0, the operation one 0 for the default or -1 for none)".into());
    }
    if !(0..=1).contains(&c.transport) || !(0..=1).contains(&c.blocking) || !(0..=1).contains(&c.backend) {
        return Err("config: blocking, transport and backend are 0 or 1".into());
    }
    let ms = |v: c_int| Duration::from_millis(v as u64);
    let mut o = WorldOptions::default()
        .with_timeout(ms(c.timeoutMs))
        .with_op_timeout(match c.opTimeoutMs {
            -1 => None,
            0 => crate::api::options::op_timeout_from_env(),
            t => Some(ms(t)),
        })
        .with_transport(if c.transport == 1 { TransportChoice::Tcp } else { TransportChoice::Auto })
        .with_backend(if c.backend == 1 { BackendChoice::Nccl } else { BackendChoice::Native });
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
pub(super) unsafe fn init(
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
    let c = Comm::new(manager, Phase::Forming(f), rank as usize, nranks as usize, blocking);
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

pub(super) fn id_name(id: &UniqueId) -> String {
    // Every rank derives the same name from the id; the secret itself never appears.
    let h = id.to_bytes().iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3));
    format!("comm-{h:016x}")
}

pub(super) unsafe fn parse_id(id: &mwUniqueId) -> Result<UniqueId, Error> {
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
/// (`"host:port"`), the others connect to it; or, in a library built with the `etcd` feature,
/// through etcd (`"etcd://host:port[,host:port...]/prefix"`, no root: docs/etcd.md). `config`
/// may be NULL.
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

/// Frees a communicator without ever waiting on a peer, a formation or a stream: what could
/// wait is handed to a thread of its own.
///
/// - Forming: the formation is abandoned (destroy too: there is nothing to leave gracefully).
/// - Host operations: an abort, or a destroy with operations still in flight, aborts the
///   world; an idle world is left gracefully, which does not wait on the peers.
/// - Operations on streams: a destroy lets those enqueued finish first (as NCCL's does), an
///   abort fails them; either way no stream is left waiting, and the staging blocks are freed
///   once the streams are past them, in the background.
pub(super) fn release(comm: mwComm_t, abort: bool) -> mwResult_t {
    let key = comm as usize as u64;
    let Some(c) = lock(table()).comms.remove(&key).filter(|_| key != 0) else {
        return invalid(None, format!("{comm:p} is not a live communicator"));
    };
    c.abandon_formation();
    let world = c.world().ok();
    let busy = lock(&c.pending).iter().any(|k| !k.is_done());
    if let Some(w) = &world {
        if abort || busy {
            w.abort();
        }
    }
    #[cfg(feature = "cuda")]
    let device = lock(&c.device).take();
    let leave = move || {
        if let Some(w) = world {
            let _ = c.manager.remove_world(w.name());
        }
    };
    #[cfg(feature = "cuda")]
    if let Some(d) = device {
        d.release_in_background(abort, leave);
        return mwSuccess;
    }
    leave();
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
        Ok(c) => match c.shape() {
            Err(e) => c.record(&e),
            Ok((_, size)) => {
                // SAFETY: checked non-null.
                unsafe { *count = size as c_int };
                mwSuccess
            }
        },
    })
}

/// This process's rank (`ncclCommUserRank`).
#[no_mangle]
pub unsafe extern "C" fn mwCommUserRank(comm: mwComm_t, rank: *mut c_int) -> mwResult_t {
    guard(|| match lookup(comm) {
        Err(r) => r,
        Ok(c) if rank.is_null() => invalid(Some(&c), "mwCommUserRank: rank is NULL"),
        Ok(c) => match c.shape() {
            Err(e) => c.record(&e),
            Ok((r, _)) => {
                // SAFETY: checked non-null.
                unsafe { *rank = r as c_int };
                mwSuccess
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operation_deadline_of_a_config() {
        let mut c = default_config();
        let op = |c: &mwConfig_t| {
            // SAFETY: a pointer to a live, initialized config.
            unsafe { options(c) }.map(|(o, _)| o.op_timeout)
        };
        c.opTimeoutMs = 250;
        assert_eq!(op(&c), Ok(Some(Duration::from_millis(250))));
        c.opTimeoutMs = -1;
        assert_eq!(op(&c), Ok(None));
        c.opTimeoutMs = 0;
        assert_eq!(op(&c), Ok(crate::api::options::op_timeout_from_env()));
        c.opTimeoutMs = -2;
        assert!(op(&c).is_err());
    }
}
