//! The one source of atomics, locks and condition variables in the crate.
//!
//! Under `--cfg loom` these are loom's model-checked types, so the concurrency protocols built on
//! them (completion, abort, the driver hand-off) can be explored exhaustively by the `loom_*`
//! tests; otherwise they are the standard library's. Nothing else in the crate names
//! `std::sync::atomic`, `Mutex` or `Condvar` directly.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

/// Reference counting is the standard library's in every build: loom's `Arc` lacks the
/// coercions (`Arc<str>`, `Arc<dyn Trait>`) the crate relies on, and sharing is not where
/// the interleavings worth exploring are.
pub(crate) use std::sync::{Arc, Weak};

/// Locks a mutex, ignoring poisoning: a panic in another thread must not turn every later call
/// of this process into a panic too. The data behind our locks stays consistent at every
/// unlock point, so continuing is sound.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
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
