//! Communicators made from communicators, as NCCL's: `mwCommSplit`, `mwCommShrink`,
//! `mwCommGrow` and `mwCommGetUniqueId` (`api/elastic.rs` does the work).
//!
//! Each new communicator is a world of a manager of its own, like one from `mwCommInitRank`:
//! destroying or aborting the parent leaves it alone, and the other way round. On a
//! non-blocking configuration (`blocking = 0`) `mwCommSplit` and `mwCommShrink` return
//! `mwInProgress` with the new handle at once (a split's agreement already posted on the
//! parent, in the caller's order of operations) and make the communicator on a thread of its
//! own; `mwCommGetAsyncError` says when it is ready. `mwCommGrow` blocks. None may be called
//! inside a group. A `NULL` config gives the new communicator the parent's settings.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::c_int;

use super::comm::{id_name, init, options, parse_id};
use super::group::in_group;
use super::handles::*;
use super::*;
use crate::api::elastic::Target;
use crate::api::error::Error;
use crate::api::manager::{Rendezvous, WorldManager};
use crate::api::world::World;
use crate::sys::crc32c::crc32c;
use crate::sys::sync::lock;
use crate::sys::sync::{Arc, Mutex};
use crate::UniqueId;

/// `color` of a rank of `mwCommSplit` that joins no new communicator (`NCCL_SPLIT_NOCOLOR`).
pub const MW_SPLIT_NOCOLOR: c_int = -1;
/// `mwCommShrink`: leave the parent's operations alone (`NCCL_SHRINK_DEFAULT`).
pub const MW_SHRINK_DEFAULT: c_int = 0;
/// `mwCommShrink`: abort the parent first, failing its operations in flight, as after a
/// failure or a hang (`NCCL_SHRINK_ABORT`).
pub const MW_SHRINK_ABORT: c_int = 1;

/// What a call needs: the parent, its world, the new communicator's manager (its registry
/// is `to.manager`) and settings.
struct Call {
    parent: Arc<Comm>,
    world: World,
    manager: WorldManager,
    to: Target,
    blocking: bool,
}

/// Looks up the parent and reads `config` (`NULL`: the parent's settings).
unsafe fn start(comm: mwComm_t, config: *const mwConfig_t, what: &str) -> Result<Call, mwResult_t> {
    let parent = lookup(comm)?;
    if in_group() {
        return Err(invalid(Some(&parent), format!("{what} cannot be called inside a group")));
    }
    let world = parent.settle().map_err(|e| fail(Some(&parent), e))?;
    let (opts, blocking) = if config.is_null() {
        (world.inner.lineage.options.clone(), parent.blocking)
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { options(config) }.map_err(|m| invalid(Some(&parent), format!("{what}: {m}")))?
    };
    let manager = WorldManager::with_event_queue(opts.clone(), events().clone());
    let to = Target { manager: manager.inner().clone(), options: opts };
    Ok(Call { parent, world, manager, to, blocking })
}

/// Registers the new communicator, if any, in `*newcomm` (else `NULL`), or records the error
/// on the parent.
unsafe fn finish(call: Call, r: Result<Option<World>, Error>, newcomm: *mut mwComm_t) -> mwResult_t {
    // SAFETY: the caller checked `newcomm`.
    unsafe { *newcomm = std::ptr::null_mut() };
    let w = match r {
        Err(e) => return fail(Some(&call.parent), e),
        Ok(None) => return mwSuccess,
        Ok(Some(w)) => w,
    };
    let (rank, size) = (w.rank(), w.size());
    let c = Comm::new(call.manager, Phase::Ready(w), rank, size, call.blocking);
    // SAFETY: as above.
    unsafe { *newcomm = register(c) };
    mwSuccess
}

/// Makes the new communicator on a thread of its own (a non-blocking call): it is registered
/// at once, `mwInProgress` until `job` is done. `shape` is its rank and size if known now.
unsafe fn finish_later(
    call: Call,
    shape: Option<(usize, usize)>,
    job: impl FnOnce() -> Result<Option<World>, Error> + Send + 'static,
    newcomm: *mut mwComm_t,
) -> mwResult_t {
    let slot = Arc::new(Mutex::new(None));
    let out = slot.clone();
    let spawned = std::thread::Builder::new().name("mw-comm-make".into()).spawn(move || {
        let r = job().and_then(|w| w.ok_or_else(|| Error::internal("no communicator was made")));
        *lock(&out) = Some(r);
    });
    if let Err(e) = spawned {
        // SAFETY: the caller checked `newcomm`.
        unsafe { *newcomm = std::ptr::null_mut() };
        return fail(Some(&call.parent), Error::system("starting a thread for a non-blocking call", e));
    }
    let (rank, size) = shape.unwrap_or((UNKNOWN, UNKNOWN));
    let c = Comm::new(call.manager, Phase::Making(slot), rank, size, call.blocking);
    // SAFETY: as above.
    unsafe { *newcomm = register(c) };
    mwInProgress
}

/// A name every rank of the call derives alike (a C communicator's name only has to agree
/// between its ranks: each has a manager of its own).
fn derived_name(parent: &World, what: &str, detail: &[u8]) -> String {
    let mut b = parent.name().as_bytes().to_vec();
    b.extend_from_slice(what.as_bytes());
    b.extend_from_slice(detail);
    format!("{what}-{:08x}-{:08x}", crc32c(&b), crc32c(detail))
}

/// Splits `comm` (`ncclCommSplit`): ranks with the same `color` form a new communicator,
/// ranked by `(key, rank in comm)`; `MW_SPLIT_NOCOLOR` takes part and gets `*newcomm = NULL`.
/// Collective over `comm`.
#[no_mangle]
pub unsafe extern "C" fn mwCommSplit(
    comm: mwComm_t,
    color: c_int,
    key: c_int,
    newcomm: *mut mwComm_t,
    config: *mut mwConfig_t,
) -> mwResult_t {
    guard(|| {
        if newcomm.is_null() {
            return invalid(None, "mwCommSplit: newcomm is NULL");
        }
        // SAFETY: forwarded from the caller.
        let call = match unsafe { start(comm, config, "mwCommSplit") } {
            Ok(x) => x,
            Err(r) => return r,
        };
        let w = &call.world;
        let n = w.inner.lineage.calls.load(crate::sys::sync::Ordering::Acquire);
        let name = derived_name(w, "split", &n.to_le_bytes());
        let r = if color < MW_SPLIT_NOCOLOR || key < 0 {
            // Refused here, but the call takes part, so the other ranks hear of it at once.
            let why = Error::invalid_arg(format!(
                "mwCommSplit: color {color} and key {key}: color is >= 0 or MW_SPLIT_NOCOLOR, key >= 0"
            ));
            Err(w.split_refused(&call.to, &name, why))
        } else if !call.blocking {
            // Non-blocking: the agreement is posted now, in this thread's order of operations
            // on the parent; the rest goes on in the background.
            let color = (color >= 0).then_some(color as u32);
            let started = match w.split_start(&call.to, &name, color, key as u32, false) {
                Ok(s) => s,
                Err(e) => return fail(Some(&call.parent), e),
            };
            let parent = w.clone();
            let job = move || started.finish(&parent);
            if color.is_none() {
                // Nothing to wait for here: the agreement finishes in the background.
                let _ = std::thread::Builder::new().name("mw-comm-make".into()).spawn(move || drop(job()));
                // SAFETY: checked non-null.
                unsafe { *newcomm = std::ptr::null_mut() };
                return mwSuccess;
            }
            // SAFETY: checked non-null.
            return unsafe { finish_later(call, None, job, newcomm) };
        } else {
            w.split_into(&call.to, &name, (color >= 0).then_some(color as u32), key as u32)
        };
        // SAFETY: checked non-null.
        unsafe { finish(call, r, newcomm) }
    })
}

/// A new communicator of every rank of `comm` but the `excludeRanksCount` ranks of
/// `excludeRanksList` (`ncclCommShrink`), called by the others only, also on a broken `comm`.
/// `shrinkFlags`: `MW_SHRINK_DEFAULT`, or `MW_SHRINK_ABORT` to abort `comm` first.
#[no_mangle]
pub unsafe extern "C" fn mwCommShrink(
    comm: mwComm_t,
    excludeRanksList: *const c_int,
    excludeRanksCount: c_int,
    newcomm: *mut mwComm_t,
    config: *mut mwConfig_t,
    shrinkFlags: c_int,
) -> mwResult_t {
    guard(|| {
        if newcomm.is_null() || excludeRanksCount < 0 || (excludeRanksList.is_null() && excludeRanksCount > 0) {
            return invalid(None, "mwCommShrink: newcomm is NULL, or the exclude list is NULL or of a negative count");
        }
        if shrinkFlags != MW_SHRINK_DEFAULT && shrinkFlags != MW_SHRINK_ABORT {
            return invalid(None, format!("mwCommShrink: unknown flags {shrinkFlags}"));
        }
        let list: &[c_int] = if excludeRanksCount == 0 {
            &[]
        } else {
            // SAFETY: the caller passes `excludeRanksCount` ranks at `excludeRanksList`.
            unsafe { std::slice::from_raw_parts(excludeRanksList, excludeRanksCount as usize) }
        };
        let Ok(exclude) = list.iter().map(|r| usize::try_from(*r)).collect::<Result<Vec<usize>, _>>() else {
            return invalid(None, format!("mwCommShrink: negative rank in {list:?}"));
        };
        // SAFETY: forwarded from the caller.
        let call = match unsafe { start(comm, config, "mwCommShrink") } {
            Ok(x) => x,
            Err(r) => return r,
        };
        let w = &call.world;
        // The list is checked before the parent is aborted: a bad call changes nothing.
        let sorted = match w.excluded(&exclude) {
            Ok(s) => s,
            Err(e) => return fail(Some(&call.parent), e),
        };
        if shrinkFlags == MW_SHRINK_ABORT {
            w.abort();
        }
        let detail: Vec<u8> = sorted.iter().flat_map(|r| (*r as u64).to_le_bytes()).collect();
        let name = derived_name(w, "shrink", &detail);
        if !call.blocking {
            let shape = (w.rank() - sorted.iter().filter(|r| **r < w.rank()).count(), w.size() - sorted.len());
            let (parent, to) = (w.clone(), call.to.clone());
            let job = move || parent.shrink_into(&to, &name, &exclude).map(Some);
            // SAFETY: checked non-null.
            return unsafe { finish_later(call, Some(shape), job, newcomm) };
        }
        let r = w.shrink_into(&call.to, &name, &exclude).map(Some);
        // SAFETY: checked non-null.
        unsafe { finish(call, r, newcomm) }
    })
}

/// Makes the id of a `mwCommGrow` (`ncclCommGetUniqueId`): called by rank 0 of `comm`, which
/// gives it to the newcomers; the members get it from rank 0 inside `mwCommGrow`.
#[no_mangle]
pub unsafe extern "C" fn mwCommGetUniqueId(comm: mwComm_t, uniqueId: *mut mwUniqueId) -> mwResult_t {
    guard(|| {
        if let Err(r) = lookup(comm) {
            return r;
        }
        // SAFETY: forwarded; checked inside.
        unsafe { mwGetUniqueId(uniqueId) }
    })
}

/// A larger communicator (`ncclCommGrow`). Members of `comm` pass `rank = -1` and keep their
/// ranks; rank 0 of `comm` passes the id it made with `mwCommGetUniqueId` (the others may pass
/// `NULL`: they get it from rank 0). Newcomers pass `comm = NULL`, the id and their rank, from
/// the size of `comm` up to `nRanks - 1`, before or after the members call.
#[no_mangle]
pub unsafe extern "C" fn mwCommGrow(
    comm: mwComm_t,
    nRanks: c_int,
    uniqueId: *const mwUniqueId,
    rank: c_int,
    newcomm: *mut mwComm_t,
    config: *mut mwConfig_t,
) -> mwResult_t {
    guard(|| {
        if newcomm.is_null() {
            return invalid(None, "mwCommGrow: newcomm is NULL");
        }
        if comm.is_null() {
            if uniqueId.is_null() {
                return invalid(None, "mwCommGrow: a newcomer (comm NULL) must pass the id");
            }
            // SAFETY: checked non-null; the caller passes a mwUniqueId.
            let id = match unsafe { parse_id(&*uniqueId) } {
                Ok(id) => id,
                Err(e) => return fail(None, e),
            };
            // SAFETY: forwarded from the caller, checked inside.
            return unsafe { init(newcomm, nRanks, rank, id_name(&id), Rendezvous::Id(id), config) };
        }
        if rank != -1 {
            return invalid(None, format!("mwCommGrow: members of comm pass rank -1, not {rank}"));
        }
        // SAFETY: forwarded from the caller.
        let call = match unsafe { start(comm, config, "mwCommGrow") } {
            Ok(x) => x,
            Err(r) => return r,
        };
        let (w, to) = (&call.world, &call.to);
        // Rank 0's id goes to every member, within the formation deadline; a rank 0 without
        // one sends zeros, which every member then refuses alike.
        let mut bytes = [0u8; crate::UNIQUE_ID_BYTES];
        if w.rank() == 0 && !uniqueId.is_null() {
            // SAFETY: checked non-null; the caller passes a mwUniqueId.
            let id = unsafe { &*uniqueId };
            for (b, c) in bytes.iter_mut().zip(id.internal.iter()) {
                *b = *c as u8;
            }
        }
        let r = w
            .broadcast_call(None, &mut bytes, 0, true)
            .and_then(|call| w.run_bounded(call, to.options.timeout))
            .and_then(|_| {
                UniqueId::from_bytes(&bytes).map_err(|_| {
                    Error::invalid_arg("mwCommGrow: rank 0 of comm passed no id (make one with mwCommGetUniqueId)")
                })
            })
            .and_then(|id| w.grow_into(to, &id_name(&id), &id, nRanks.max(0) as usize))
            .map(Some);
        // SAFETY: checked non-null.
        unsafe { finish(call, r, newcomm) }
    })
}
