//! Groups (`mwGroupStart`/`mwGroupEnd`): calls recorded per thread, posted together.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::ffi::CString;

use super::handles::*;
use super::ops::*;
use super::*;
use crate::api::error::Error;
use crate::sys::sync::Arc;

/// Operations recorded between `mwGroupStart` and `mwGroupEnd`, per thread (as NCCL's).
#[derive(Default)]
pub(super) struct GroupState {
    pub(super) depth: u32,
    /// Each call with its stream (0: host memory).
    pub(super) ops: Vec<(Arc<Comm>, Checked, usize)>,
    pub(super) inits: Vec<Arc<Comm>>,
}

thread_local! {
    pub(super) static GROUP: RefCell<GroupState> = RefCell::new(GroupState::default());
    pub(super) static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(super) fn in_group() -> bool {
    GROUP.with(|g| g.borrow().depth > 0)
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
        // An NCCL communicator waits for its peers when its batch is enqueued (its first
        // operation creates it; later ones may connect to a peer): two of them in one group
        // could wait for each other's peers in this very thread. Refused until NCCL's own
        // groups across communicators are used here.
        let nccl_comms = order.iter().filter(|(c, stream)| *stream != 0 && runs_on_nccl(c)).count();
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
                if nccl_comms > 1 && runs_on_nccl(c) {
                    keep(c.record(&Error::invalid_usage(
                        "mwGroupEnd: a group may hold stream operations of one NCCL communicator only",
                    )));
                    continue;
                }
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

/// Whether a communicator's world runs its device operations on NCCL.
fn runs_on_nccl(c: &Comm) -> bool {
    c.world().is_ok_and(|w| w.backend() == crate::BackendChoice::Nccl)
}
