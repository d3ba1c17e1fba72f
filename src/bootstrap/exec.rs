//! The formation thread (`mw-form`): every formation of the process runs on it as a task, so
//! that two hundred formations in flight need one thread, not two hundred.
//!
//! A formation spends its life waiting (for the root's table, its peers' connections, their
//! answers), so it is written as an `async fn` whose waits are [`Ready`]: "until one of these
//! descriptors reports, or until this instant". The thread polls the tasks that were woken,
//! then sleeps in `epoll` on every descriptor a task waits for and on the earliest instant one
//! waits until. No task ever blocks the thread: sockets are non-blocking, connects too
//! (`sys::connect_start`), and the few steps that are not waits (making a shared-memory
//! segment, building the world's engine) take microseconds.
//!
//! A task is queued at most once (its `queued` flag is read and set under the queue's lock):
//! it is taken off the queue and its flag cleared before it is polled, so a wake-up that comes
//! while it runs queues it again, and none is lost.

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use crate::api::error::{Error, Result};
use crate::sys::sync::{lock, Arc, AtomicBool, Mutex, Ordering};
use crate::sys::{self, Epoll, EventFd};

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Task {
    job: Mutex<Option<Job>>,
    exec: Arc<Exec>,
    /// In the run queue (read and written under its lock).
    queued: AtomicBool,
}

impl Queued for Task {
    fn queued(&self) -> &AtomicBool {
        &self.queued
    }
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if enqueue(&self.exec.queue, self) {
            self.exec.wake.signal();
        }
    }
}

/// Something that sits in a run queue at most once.
trait Queued {
    /// In the queue; read and written under the queue's lock only.
    fn queued(&self) -> &AtomicBool;
}

/// Queues `t` unless it is queued already; true if it was queued now (then the runner must be
/// woken).
fn enqueue<T: Queued>(q: &Mutex<VecDeque<Arc<T>>>, t: &Arc<T>) -> bool {
    let mut q = lock(q);
    if t.queued().swap(true, Ordering::Relaxed) {
        return false;
    }
    q.push_back(t.clone());
    true
}

/// The next task to run, its flag cleared before it runs: a wake-up while it runs queues it
/// again.
fn dequeue<T: Queued>(q: &Mutex<VecDeque<Arc<T>>>) -> Option<Arc<T>> {
    let mut q = lock(q);
    let t = q.pop_front()?;
    t.queued().store(false, Ordering::Relaxed);
    Some(t)
}

/// The key of the thread's own wake-up descriptor in its `epoll` set.
const WAKE_KEY: u64 = 0;

struct Exec {
    queue: Mutex<VecDeque<Arc<Task>>>,
    wake: EventFd,
    epoll: Epoll,
    /// Who waits for what: a [`Ready`]'s token and its waker.
    waiting: Mutex<HashMap<u64, Waker>>,
    /// Instants tasks wait until, with their tokens (a min-heap).
    timers: Mutex<BinaryHeap<std::cmp::Reverse<(Instant, u64)>>>,
    next_token: std::sync::atomic::AtomicU64,
}

/// The formation thread, started with the first formation (`sys::service`).
fn exec() -> Result<Arc<Exec>> {
    static EXEC: std::sync::OnceLock<Mutex<Option<Arc<Exec>>>> = std::sync::OnceLock::new();
    sys::service(&EXEC, WAKE_KEY, |wake, epoll| {
        let e = Arc::new(Exec {
            queue: Mutex::new(VecDeque::new()),
            wake,
            epoll,
            waiting: Mutex::new(HashMap::new()),
            timers: Mutex::new(BinaryHeap::new()),
            next_token: std::sync::atomic::AtomicU64::new(WAKE_KEY + 1),
        });
        let me = e.clone();
        std::thread::Builder::new().name("mw-form".into()).spawn(move || run(&me))?;
        Ok(e)
    })
    .map_err(|e| Error::system("starting the formation thread", e))
}

/// Runs `job` on the formation thread.
pub(crate) fn spawn(job: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    let exec = exec()?;
    let task = Arc::new(Task { job: Mutex::new(Some(Box::pin(job))), exec, queued: AtomicBool::new(false) });
    task.wake_by_ref();
    Ok(())
}

fn run(exec: &Exec) {
    let mut keys = Vec::new();
    loop {
        // The tasks that were woken; each comes off the queue (its flag cleared) before it runs.
        while let Some(task) = dequeue(&exec.queue) {
            let waker = Waker::from(task.clone());
            let mut job = lock(&task.job);
            if let Some(f) = job.as_mut() {
                // A panic in a formation ends that formation (its completion is dropped, which
                // fails it), not the thread that runs all of them.
                let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    f.as_mut().poll(&mut Context::from_waker(&waker)).is_ready()
                }));
                if done.unwrap_or(true) {
                    *job = None;
                }
            }
        }
        // Sleep until a descriptor reports, a timer is due, or a task is woken.
        let next = lock(&exec.timers).peek().map(|t| t.0 .0);
        exec.epoll.wait(&mut keys, next);
        exec.wake.drain();
        let mut woken: Vec<Waker> = Vec::new();
        {
            let mut waiting = lock(&exec.waiting);
            woken.extend(keys.drain(..).filter(|k| *k != WAKE_KEY).filter_map(|k| waiting.remove(&k)));
            let now = Instant::now();
            let mut timers = lock(&exec.timers);
            while timers.peek().is_some_and(|t| t.0 .0 <= now) {
                let std::cmp::Reverse((_, token)) = timers.pop().expect("peeked");
                woken.extend(waiting.remove(&token));
            }
        }
        woken.into_iter().for_each(Waker::wake);
    }
}

/// Resolves to `true` once one of `fds` reports one of its events, or to `false` at `until`,
/// whichever comes first. The formation thread watches for it, whoever polls it.
pub(crate) struct Ready<'a> {
    fds: &'a [(RawFd, i16)],
    until: Instant,
    token: Option<u64>,
}

/// Waits for any of `fds` (descriptor, `poll` events) or until `until`.
pub(crate) fn ready(fds: &[(RawFd, i16)], until: Instant) -> Ready<'_> {
    Ready { fds, until, token: None }
}

impl Future for Ready<'_> {
    type Output = io::Result<bool>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        self.forget();
        let mut pfds: Vec<libc::pollfd> = self.fds.iter().map(|&(fd, ev)| sys::pollfd(fd, ev)).collect();
        let now = Instant::now();
        if !pfds.is_empty() && sys::poll(&mut pfds, Some(now))? > 0 {
            return Poll::Ready(Ok(true));
        }
        if now >= self.until {
            return Poll::Ready(Ok(false));
        }
        let exec = exec().map_err(|e| io::Error::other(e.message().to_owned()))?;
        let token = exec.next_token.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&exec.waiting).insert(token, cx.waker().clone());
        // Noted first, so that a registration that fails half-way is taken back whole.
        self.token = Some(token);
        for &(fd, ev) in self.fds {
            if let Err(e) = exec.epoll.watch_once(fd, ev, token) {
                self.forget();
                return Poll::Ready(Err(e));
            }
        }
        lock(&exec.timers).push(std::cmp::Reverse((self.until, token)));
        if std::thread::current().name() != Some("mw-form") {
            // A wait of another thread (`block_on`): the formation thread may sleep past it.
            exec.wake.signal();
        }
        Poll::Pending
    }
}

impl Ready<'_> {
    /// Takes back this wait's registrations: its waker, and its descriptors from the set (a
    /// descriptor outlives the wait: it may go on to a world, which must not be reported here).
    fn forget(&mut self) {
        if let Some(token) = self.token.take() {
            if let Ok(exec) = exec() {
                lock(&exec.waiting).remove(&token);
                for &(fd, _) in self.fds {
                    let _ = exec.epoll.unwatch(fd);
                }
            }
        }
    }
}

impl Drop for Ready<'_> {
    fn drop(&mut self) {
        self.forget();
    }
}

/// Waits until `until` (a task's sleep).
pub(crate) async fn sleep_until(until: Instant) {
    let _ = ready(&[], until).await;
}

/// Runs `f`, turning a panic inside it into an `Internal` error of the formation, so that its
/// waiters hear of it.
pub(crate) struct Guarded<F>(pub F);

impl<T, F: Future<Output = Result<T>>> Future for Guarded<F> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        // SAFETY: the inner future is never moved out of the pinned wrapper.
        let inner = unsafe { self.map_unchecked_mut(|g| &mut g.0) };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(p) => p,
            Err(_) => Poll::Ready(Err(Error::internal("the formation panicked (a bug): it is abandoned"))),
        }
    }
}

/// Runs `f` to completion on this thread (its waits watched by the formation thread): the
/// formation steps in unit tests, and the etcd client outside a formation (its lease keeper,
/// the directory of worlds).
#[cfg_attr(not(any(test, feature = "etcd")), allow(dead_code))]
pub(crate) fn block_on<T>(f: impl Future<Output = T>) -> T {
    let mut f = std::pin::pin!(f);
    let waker = Waker::from(Arc::new(crate::api::request::Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sys::sync::AtomicU32;

    struct T {
        queued: AtomicBool,
    }

    impl Queued for T {
        fn queued(&self) -> &AtomicBool {
            &self.queued
        }
    }

    /// A task woken while the runner takes it off the queue and runs it is run again after the
    /// wake-up: the event the wake-up announces is always seen by a later run.
    #[test]
    fn loom_exec_a_wake_while_the_task_runs_is_not_lost() {
        loom::model(|| {
            let q = Arc::new(Mutex::new(VecDeque::new()));
            let t = Arc::new(T { queued: AtomicBool::new(false) });
            let event = Arc::new(AtomicU32::new(0));
            assert!(enqueue(&q, &t));
            let (q2, t2, e2) = (q.clone(), t.clone(), event.clone());
            let waker = loom::thread::spawn(move || {
                e2.store(1, Ordering::Release);
                enqueue(&q2, &t2);
            });
            // The runner: runs what is queued; a run looks at the event.
            let mut seen = 0;
            let run = |seen: &mut u32| {
                while let Some(_t) = dequeue(&q) {
                    *seen = event.load(Ordering::Acquire);
                }
            };
            run(&mut seen);
            waker.join().unwrap();
            // The runner sleeps until woken; a queued task wakes it, so it runs once more
            // exactly when something is queued.
            run(&mut seen);
            assert_eq!(seen, 1, "the last run missed the wake-up's event");
        });
    }
}
