//! Completion of operations and formations, and the handles users wait on.
//!
//! A [`Completion`] is set once, by whichever thread finishes the work (the caller driving
//! progress itself, or the progress pool), and can be waited on by blocking or as a
//! `Future`. [`Request`] hands a non-blocking operation's buffers back when it is done.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::api::error::{Error, Result};
use crate::sys::sync::{lock, wait_timeout, Arc, AtomicBool, Condvar, Mutex, Ordering};

#[derive(Default)]
struct State {
    result: Option<Result<()>>,
    wakers: Vec<Waker>,
    /// Threads blocked on the condition variable (so that completing wakes nobody needlessly:
    /// a notification costs a system call).
    sleepers: usize,
}

/// A one-shot result slot with blocking and async waiting.
#[derive(Default)]
pub(crate) struct Completion {
    done: AtomicBool,
    state: Mutex<State>,
    cond: Condvar,
}

impl Completion {
    pub(crate) fn new() -> Arc<Completion> {
        Arc::new(Completion::default())
    }

    /// Sets the result; the first call wins, later calls are ignored.
    pub(crate) fn complete(&self, r: Result<()>) {
        for w in self.settle(r) {
            w.wake();
        }
    }

    /// Sets the result (the first call wins) and wakes the threads blocked on it, but hands the
    /// tasks' wakers back instead of running them: a waker is user code, which may poll inline
    /// and call back into the world, so whoever holds a lock runs them after releasing it.
    #[must_use = "the wakers must be run"]
    pub(crate) fn settle(&self, r: Result<()>) -> Vec<Waker> {
        let (wakers, sleepers) = {
            let mut s = lock(&self.state);
            if s.result.is_some() || self.done.load(Ordering::Acquire) {
                return Vec::new();
            }
            s.result = Some(r);
            self.done.store(true, Ordering::Release);
            (std::mem::take(&mut s.wakers), s.sleepers)
        };
        if sleepers > 0 {
            self.cond.notify_all();
        }
        wakers
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// The result, once done (a clone: several waiters may look).
    pub(crate) fn result(&self) -> Option<Result<()>> {
        lock(&self.state).result.clone()
    }

    /// Blocks until done or `deadline`; true when done.
    pub(crate) fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let mut s = lock(&self.state);
        while s.result.is_none() {
            let step = match deadline {
                None => Duration::from_secs(3600),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    d - now
                }
            };
            s.sleepers += 1;
            s = wait_timeout(&self.cond, s, step);
            s.sleepers -= 1;
        }
        true
    }

    /// Registers `w` to be woken at completion; false if already done.
    pub(crate) fn register(&self, w: &Waker) -> bool {
        let mut s = lock(&self.state);
        if s.result.is_some() {
            return false;
        }
        if !s.wakers.iter().any(|x| x.will_wake(w)) {
            s.wakers.push(w.clone());
        }
        true
    }
}

/// Something that can make an operation progress while its caller waits (the world's driver).
pub(crate) trait Progress: Send + Sync {
    /// Blocks until every completion in `cs` is done or `deadline` passes, doing the world's
    /// work on this thread meanwhile where that is faster than waking another.
    fn wait(&self, cs: &[&Completion], deadline: Option<Instant>);
    /// Aborts the operation's world after its caller's own deadline passed.
    fn timed_out(&self, after: Duration);
    /// Asks the background progress to take over (the caller stops driving).
    fn nudge(&self);
}

/// Why a request failed, with its buffers, which the failed operation leaves in an unspecified
/// state but does not take away. Converts into [`Error`] for `?`.
#[derive(Debug)]
pub struct Failed<B> {
    /// What went wrong.
    pub error: Error,
    /// The buffers the request was given.
    pub buffers: B,
}

impl<B> From<Failed<B>> for Error {
    fn from(f: Failed<B>) -> Error {
        f.error
    }
}

impl<B> std::fmt::Display for Failed<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// Holds a request's buffers where the engine can keep them alive while it uses them.
pub(crate) struct Slot<B>(Mutex<Option<B>>);

impl<B: Send + 'static> Slot<B> {
    pub(crate) fn new(b: B) -> Arc<Slot<B>> {
        Arc::new(Slot(Mutex::new(Some(b))))
    }
    /// Runs `f` on the buffers (to take raw views of them before posting).
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut B) -> R) -> Option<R> {
        lock(&self.0).as_mut().map(f)
    }
    fn take(&self) -> Option<B> {
        lock(&self.0).take()
    }
}

/// Type-erased keep-alive for buffers of an operation in flight.
pub(crate) type KeepAlive = Arc<dyn Any + Send + Sync>;

/// A non-blocking operation in flight. It owns the operation's buffers and gives them back
/// when the operation completes: [`Request::wait`] blocks, [`Request::test`] checks, and
/// `.await` waits without blocking a thread (no async runtime needed: the world's progress
/// thread wakes the task). Dropping a request does not cancel the operation; its buffers are
/// then freed when the operation ends.
#[must_use = "a request does nothing visible unless waited on"]
pub struct Request<B: Send + 'static> {
    completion: Arc<Completion>,
    slot: Arc<Slot<B>>,
    progress: Arc<dyn Progress>,
}

impl<B: Send + 'static> Request<B> {
    pub(crate) fn new(completion: Arc<Completion>, slot: Arc<Slot<B>>, progress: Arc<dyn Progress>) -> Self {
        Request { completion, slot, progress }
    }

    fn finish(&self) -> std::result::Result<B, Failed<B>> {
        // `wait*` consume the request, so only a future polled again after it returned
        // `Ready` finds the slot empty; like any finished future, it panics then.
        let Some(buffers) = self.slot.take() else {
            panic!("multiworld::Request polled after it completed");
        };
        match self.completion.result() {
            Some(Ok(())) => Ok(buffers),
            Some(Err(error)) => Err(Failed { error, buffers }),
            None => Err(Failed { error: Error::internal("request finished before completion"), buffers }),
        }
    }

    /// Blocks until the operation completes; returns its buffers.
    pub fn wait(self) -> std::result::Result<B, Failed<B>> {
        self.progress.wait(&[&self.completion], None);
        self.finish()
    }

    /// Blocks at most `timeout`. If the operation is still not done then, its world is broken
    /// (its peers are in an unknown state) and the error has kind `Timeout`.
    pub fn wait_timeout(self, timeout: Duration) -> std::result::Result<B, Failed<B>> {
        self.progress.wait(&[&self.completion], Some(Instant::now() + timeout));
        if !self.completion.is_done() {
            self.progress.timed_out(timeout);
            self.progress.wait(&[&self.completion], None);
        }
        self.finish()
    }

    /// Waits for every request, in order, and returns each one's outcome in the same order.
    /// The requests may belong to different worlds; a failed one does not stop the others.
    pub fn wait_all(requests: Vec<Request<B>>) -> Vec<std::result::Result<B, Failed<B>>> {
        requests.into_iter().map(Request::wait).collect()
    }

    /// Blocks until one of `requests` completes (successfully or not), takes it out of the
    /// vector and returns its index (in the vector as it was) and its outcome; `None` when the
    /// vector is empty. The requests may belong to different worlds: their worlds' progress
    /// threads move them while this thread sleeps, and a completion wakes it.
    pub fn wait_any(requests: &mut Vec<Request<B>>) -> Option<(usize, std::result::Result<B, Failed<B>>)> {
        let i = wait_any_of(
            requests.len(),
            |i, waker| requests[i].completion.is_done() || !requests[i].completion.register(waker),
            |i| requests[i].progress.nudge(),
        )?;
        let r = requests.remove(i);
        Some((i, r.finish()))
    }

    /// True once the operation has completed (successfully or not); never blocks.
    pub fn test(&self) -> bool {
        if !self.completion.is_done() {
            self.progress.nudge();
        }
        self.completion.is_done()
    }
}

impl<B: Send + Unpin + 'static> Future for Request<B> {
    type Output = std::result::Result<B, Failed<B>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.completion.is_done() || !self.completion.register(cx.waker()) {
            return Poll::Ready(self.finish());
        }
        self.progress.nudge();
        Poll::Pending
    }
}

/// Blocks until one of `n` requests is done and returns its index; `None` when `n` is 0.
/// `done(i, waker)` says whether request `i` is done, registering `waker` on what it still
/// waits for (a completion that is done by then counts as done); `nudge(i)` asks request `i`'s
/// world to make progress. The requests may belong to different worlds: the progress pool
/// moves them while this thread sleeps, and a completion wakes it.
pub(crate) fn wait_any_of(n: usize, done: impl Fn(usize, &Waker) -> bool, nudge: impl Fn(usize)) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let waker = Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    loop {
        // Registered before the last look: a completion after it unparks this thread, and a
        // pending unpark makes the next park return at once, so none is missed.
        if let Some(i) = (0..n).find(|&i| done(i, &waker)) {
            return Some(i);
        }
        (0..n).for_each(&nudge);
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

/// Wakes a parked thread: one in [`wait_any_of`], or in the formation thread's `block_on`.
pub(crate) struct Unpark(pub std::thread::Thread);

impl std::task::Wake for Unpark {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.unpark();
    }
}

/// Loom models: run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use std::task::Wake;

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::Release);
        }
    }

    /// One thread completes while another waits and a third registers a waker: the waiter
    /// always returns with the first result, and a registered waker is always woken.
    #[test]
    fn loom_completion_wakes_waiters_and_wakers_once() {
        loom::model(|| {
            let c = Completion::new();
            let flag = Arc::new(Flag(AtomicBool::new(false)));
            let waker = Waker::from(flag.clone());
            let (c1, c2) = (c.clone(), c.clone());
            let finisher = loom::thread::spawn(move || {
                c1.complete(Ok(()));
                c1.complete(Err(Error::internal("second result must be ignored")));
            });
            let registrar = loom::thread::spawn(move || c2.register(&waker));
            assert!(c.wait_until(None));
            assert!(c.result().unwrap().is_ok());
            finisher.join().unwrap();
            let registered = registrar.join().unwrap();
            // Registered before completion: woken. Too late: told so.
            assert!(!registered || flag.0.load(Ordering::Acquire));
        });
    }
}
