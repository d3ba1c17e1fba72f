//! Non-blocking operations on borrowed buffers: [`World::scope`].
//!
//! A [`Request`](crate::Request) owns its buffers, so a window of sends of one buffer would
//! need a vector per message. Inside a scope, operations borrow their buffers instead and
//! return a [`ScopedRequest`]; the scope does not return before every operation posted in it
//! has completed (the pattern of `std::thread::scope`), so a buffer can never be freed or
//! reused while the world still reads or writes it, whatever the caller does with the
//! requests (drops them, forgets them, panics). A scoped group ([`Scope::group`]) records
//! any operations and posts them together without waiting.
//!
//! The borrow checker holds the rest: a buffer must outlive the scope,
//!
//! ```compile_fail
//! # fn f(w: &multiworld::World) {
//! w.scope(|s| {
//!     let buf = vec![0u8; 4];
//!     let _ = s.send(&buf, 1); // error: `buf` does not live long enough
//! });
//! # }
//! ```
//!
//! and a request cannot leave its scope:
//!
//! ```compile_fail
//! # fn f(w: &multiworld::World) {
//! let data = vec![0u8; 4];
//! let escaped = w.scope(|s| s.send(&data, 1)); // error: lifetime may not live long enough
//! # }
//! ```

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use crate::api::error::{Error, Result};
use crate::api::request::{wait_any_of, Completion, Progress};
use crate::api::types::{Element, ReduceOp};
use crate::api::world::{Call, Group, World};
use crate::sys::sync::{lock, Arc, Mutex};

/// Completed operations are dropped from a scope's list once it holds this many, so a long
/// scope that posts millions of operations keeps a short list.
const PRUNE_AT: usize = 64;

/// The scope of [`World::scope`]: operations posted through it may borrow anything that
/// outlives the scope, and all of them have completed when the scope returns.
pub struct Scope<'scope, 'env: 'scope> {
    world: &'env World,
    /// Every operation posted in this scope and perhaps not yet completed.
    pending: Mutex<Vec<Arc<Completion>>>,
    /// Invariant in both lifetimes, as `std::thread::Scope` is, so neither can be shortened.
    _scope: PhantomData<&'scope mut &'scope ()>,
    _env: PhantomData<&'env mut &'env ()>,
}

/// A non-blocking operation (or a posted group) inside a [`Scope`]. Its buffers are borrowed
/// for the scope; waiting gives the result. Dropping it does not cancel the operation: the
/// scope still waits for it before it returns.
#[must_use = "a request does nothing visible unless waited on"]
pub struct ScopedRequest<'scope> {
    completions: Vec<Arc<Completion>>,
    progress: Arc<dyn Progress>,
    _scope: PhantomData<&'scope ()>,
}

impl World {
    /// Runs `f` with a [`Scope`] in which operations borrow their buffers and do not block:
    /// `s.send(&buf, peer)` returns at once with a [`ScopedRequest`]. Returns what `f`
    /// returns, once every operation posted in the scope has completed (also when `f` panics:
    /// the panic goes on after the wait). Errors of requests never waited on are not reported.
    ///
    /// ```no_run
    /// # fn demo(w: &multiworld::World) -> multiworld::Result<()> {
    /// let data = vec![1.0f32; 1024];
    /// w.scope(|s| {
    ///     // A window of sends of one buffer, no copy and no vector per message.
    ///     let window: Vec<_> = (0..16).map(|_| s.send(&data, 1)).collect();
    ///     multiworld::ScopedRequest::wait_all(window).into_iter().collect::<multiworld::Result<()>>()
    /// })
    /// # }
    /// ```
    pub fn scope<'env, F, T>(&'env self, f: F) -> T
    where
        F: for<'scope> FnOnce(&'scope Scope<'scope, 'env>) -> T,
    {
        let scope = Scope { world: self, pending: Mutex::new(Vec::new()), _scope: PhantomData, _env: PhantomData };
        // Waits in `drop`, so that an unwinding panic waits too before the borrows end.
        struct WaitAll<'a, 'b>(&'a Scope<'a, 'b>);
        impl Drop for WaitAll<'_, '_> {
            fn drop(&mut self) {
                let pending = std::mem::take(&mut *lock(&self.0.pending));
                let all: Vec<&Completion> = pending.iter().map(|c| &**c).collect();
                self.0.world.inner.backend.wait(&all, None);
            }
        }
        let guard = WaitAll(&scope);
        let r = f(guard.0);
        drop(guard);
        r
    }
}

impl<'scope, 'env> Scope<'scope, 'env> {
    /// The world the scope's operations run on.
    pub fn world(&self) -> &'env World {
        self.world
    }

    /// Posts checked calls (nothing is posted when a check failed) and returns their request:
    /// one that is already complete with the error when the check failed.
    fn post(&'scope self, calls: Result<Vec<Call>>) -> ScopedRequest<'scope> {
        let progress: Arc<dyn Progress> = self.world.inner.backend.clone();
        let completions = match calls.and_then(|c| self.world.post_calls(c, false)) {
            Ok(cs) => cs,
            Err(e) => {
                let c = Completion::new();
                c.complete(Err(e));
                vec![c]
            }
        };
        let mut pending = lock(&self.pending);
        if pending.len() >= PRUNE_AT {
            pending.retain(|c| !c.is_done());
        }
        pending.extend(completions.iter().cloned());
        drop(pending);
        ScopedRequest { completions, progress, _scope: PhantomData }
    }

    /// Non-blocking [`World::send`] of a borrowed buffer.
    pub fn send<T: Element>(&'scope self, buf: &'scope [T], peer: usize) -> ScopedRequest<'scope> {
        self.post(self.world.p2p_call(Some(buf), None, peer).map(|c| vec![c]))
    }

    /// Non-blocking [`World::recv`] into a borrowed buffer.
    pub fn recv<T: Element>(&'scope self, buf: &'scope mut [T], peer: usize) -> ScopedRequest<'scope> {
        self.post(self.world.p2p_call(None, Some(buf), peer).map(|c| vec![c]))
    }

    /// Non-blocking [`World::all_reduce`].
    pub fn all_reduce<T: Element>(
        &'scope self,
        send: &'scope [T],
        recv: &'scope mut [T],
        op: ReduceOp,
    ) -> ScopedRequest<'scope> {
        self.post(self.world.all_reduce_call(Some(send), recv, op).map(|c| vec![c]))
    }

    /// Non-blocking [`World::all_reduce_in_place`].
    pub fn all_reduce_in_place<T: Element>(&'scope self, buf: &'scope mut [T], op: ReduceOp) -> ScopedRequest<'scope> {
        self.post(self.world.all_reduce_call(None, buf, op).map(|c| vec![c]))
    }

    /// Non-blocking [`World::broadcast`].
    pub fn broadcast<T: Element>(
        &'scope self,
        send: Option<&'scope [T]>,
        recv: &'scope mut [T],
        root: usize,
    ) -> ScopedRequest<'scope> {
        self.post(self.world.broadcast_call(send, recv, root, false).map(|c| vec![c]))
    }

    /// Starts a group whose operations borrow for the scope; [`ScopedGroup::post`] posts them
    /// together without waiting. Every operation of [`Group`] can be recorded on it.
    pub fn group(&'scope self) -> ScopedGroup<'scope, 'env> {
        ScopedGroup { group: Some(self.world.group()), scope: self }
    }
}

/// A group started in a [`Scope`]: records operations like [`Group`] (it dereferences to one)
/// and can be posted without waiting. Dropped without [`ScopedGroup::post`], it is ended, as a
/// group is.
#[must_use = "a group posts nothing until it is posted or ended"]
pub struct ScopedGroup<'scope, 'env: 'scope> {
    group: Option<Group<'scope>>,
    scope: &'scope Scope<'scope, 'env>,
}

impl<'scope> Deref for ScopedGroup<'scope, '_> {
    type Target = Group<'scope>;
    fn deref(&self) -> &Group<'scope> {
        self.group.as_ref().expect("a scoped group is whole until posted")
    }
}

impl<'scope> DerefMut for ScopedGroup<'scope, '_> {
    fn deref_mut(&mut self) -> &mut Group<'scope> {
        self.group.as_mut().expect("a scoped group is whole until posted")
    }
}

impl<'scope> ScopedGroup<'scope, '_> {
    /// Posts everything recorded as one batch (as [`Group::end`] would) and returns at once;
    /// the request completes when all of it has.
    pub fn post(mut self) -> ScopedRequest<'scope> {
        let calls = self.group.take().map(Group::take_calls).unwrap_or_default();
        self.scope.post(Ok(calls))
    }

    /// Posts everything recorded and waits for it, like [`Group::end`].
    pub fn end(self) -> Result<()> {
        self.post().wait()
    }
}

impl<'scope> ScopedRequest<'scope> {
    fn outcome(&self) -> Result<()> {
        for c in &self.completions {
            match c.result() {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(e),
                None => return Err(Error::internal("request finished before completion")),
            }
        }
        Ok(())
    }

    fn refs(&self) -> Vec<&Completion> {
        self.completions.iter().map(|c| &**c).collect()
    }

    /// Blocks until the operation (every operation of a posted group) completes; the first
    /// error.
    pub fn wait(self) -> Result<()> {
        self.progress.wait(&self.refs(), None);
        self.outcome()
    }

    /// Blocks at most `timeout`. If the operation is still not done then, its world is broken
    /// (its peers are in an unknown state) and the error has kind `Timeout`.
    pub fn wait_timeout(self, timeout: Duration) -> Result<()> {
        self.progress.wait(&self.refs(), Some(Instant::now() + timeout));
        if !self.test_quiet() {
            self.progress.timed_out(timeout);
            self.progress.wait(&self.refs(), None);
        }
        self.outcome()
    }

    fn test_quiet(&self) -> bool {
        self.completions.iter().all(|c| c.is_done())
    }

    /// True once the operation has completed (successfully or not); never blocks.
    pub fn test(&self) -> bool {
        if !self.test_quiet() {
            self.progress.nudge();
        }
        self.test_quiet()
    }

    /// Waits for every request, in order, and returns each one's outcome in the same order.
    pub fn wait_all(requests: Vec<ScopedRequest<'scope>>) -> Vec<Result<()>> {
        requests.into_iter().map(ScopedRequest::wait).collect()
    }

    /// Blocks until one of `requests` completes, takes it out of the vector and returns its
    /// index (in the vector as it was) and its outcome; `None` when the vector is empty.
    pub fn wait_any(requests: &mut Vec<ScopedRequest<'scope>>) -> Option<(usize, Result<()>)> {
        let i = wait_any_of(
            requests.len(),
            |i, waker| requests[i].completions.iter().all(|c| c.is_done() || !c.register(waker)),
            |i| requests[i].progress.nudge(),
        )?;
        let r = requests.remove(i);
        Some((i, r.outcome()))
    }
}
