//! The one source of atomics, locks and condition variables in the crate.
//!
//! Under `--cfg loom` these are loom's model-checked types, so the concurrency protocols built on
//! them (completion, abort, the driver hand-off) can be explored exhaustively by the `loom_*`
//! tests; otherwise they are the standard library's. Nothing else in the crate names
//! `std::sync::atomic`, `Mutex` or `Condvar` directly.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Condvar, Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Locks a mutex, ignoring poisoning: a panic in another thread must not turn every later call
/// of this process into a panic too. The data behind our locks stays consistent at every
/// unlock point, so continuing is sound.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Tries to lock a mutex without blocking (poisoning ignored, as in [`lock`]).
pub(crate) fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        #[cfg(not(loom))]
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        #[cfg(loom)]
        Err(loom::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(_) => None,
    }
}

/// Waits on a condition variable with a timeout, ignoring poisoning.
pub(crate) fn wait_timeout<'a, T>(c: &Condvar, g: MutexGuard<'a, T>, d: std::time::Duration) -> MutexGuard<'a, T> {
    #[cfg(not(loom))]
    {
        match c.wait_timeout(g, d) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        }
    }
    #[cfg(loom)]
    {
        // loom has no time: a timed wait is modelled as a plain wait.
        let _ = d;
        match c.wait(g) {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}
