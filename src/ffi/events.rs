//! The process's event queue, shared by every communicator (`mwPollEvent`, `mwWaitEvent`).

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{c_char, c_int};
use std::time::Duration;

use super::handles::*;
use super::*;
use crate::api::error::BrokenCause;
use crate::api::manager::Event;

pub(super) fn fill(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len() - 1);
    for (d, b) in dst.iter_mut().zip(&s.as_bytes()[..n]) {
        *d = *b as c_char;
    }
    dst[n] = 0;
}

pub(super) unsafe fn write_event(ev: Event, out: *mut mwEvent_t) {
    let mut e = mwEvent_t { kind: 0, generation: 0, peer: -1, name: [0; 256], cause: [0; 512] };
    let (kind, name, generation, cause): (c_int, String, u32, Option<BrokenCause>) = match ev {
        Event::Ready { name, generation } => (MW_EVENT_READY, name, generation, None),
        Event::Broken { name, generation, cause } => (MW_EVENT_BROKEN, name, generation, Some(cause)),
        Event::Removed { name, generation } => (MW_EVENT_REMOVED, name, generation, None),
        Event::MemberGone { name, generation, rank } => {
            e.peer = rank as c_int;
            (MW_EVENT_MEMBER_GONE, name, generation, None)
        }
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

pub(super) unsafe fn wait_event(event: *mut mwEvent_t, timeout: Option<Duration>) -> mwResult_t {
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
