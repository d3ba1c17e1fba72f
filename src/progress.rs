//! Drives a world's engine: who runs it, and how they sleep.
//!
//! Each world has its own [`Driver`] and its own progress thread, and shares no lock with any
//! other world, so a world whose peer hangs cannot slow another world down. The engine sits
//! behind one mutex that is held only for a non-blocking pass, never across a sleep.
//!
//! - A blocking call posts its operation and then drives the engine itself until the
//!   operation completes: no thread hop on the way. While such a caller drives, the progress
//!   thread only watches for hang-ups and heartbeat deadlines.
//! - Non-blocking operations are driven by the progress thread, which a post wakes through an
//!   event descriptor.
//! - An idle world's progress thread sleeps on its links' hang-up events and wakes once per
//!   heartbeat interval: a dead peer is seen at once, a silent one at the heartbeat timeout.
//! - Abort sets a flag and signals an event descriptor that every sleeper polls and nobody
//!   drains, so it wakes all of them; the next pass fails every operation and closes the
//!   links, and the progress thread exits.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::{Engine, Posted, WaitSet, WorldStats};
use crate::error::{BrokenCause, Error, Result};
use crate::request::{Completion, Progress};
use crate::sync::{lock, try_lock, Arc, AtomicBool, AtomicUsize, Mutex, Ordering};
use crate::sys::{self, EventFd};

/// Passes without progress before a driver on a spin-worthy link goes to sleep.
const SPIN_PASSES: u32 = 200;

pub(crate) struct Driver {
    name: Arc<str>,
    engine: Mutex<Engine>,
    /// Signalled once, on abort; never drained.
    abort_fd: EventFd,
    /// Wakes the progress thread when work is posted for it.
    wake_fd: EventFd,
    aborted: AtomicBool,
    /// Callers currently driving the engine themselves.
    inline: AtomicUsize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn poll_with(ws: &WaitSet, extra: &[&EventFd], deadline: Option<Instant>) {
    let mut fds = ws.fds.clone();
    fds.extend(extra.iter().map(|e| sys::pollfd(e.fd(), libc::POLLIN)));
    let deadline = match (ws.deadline, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    // An error here (EINVAL/ENOMEM) cannot be acted on; the loop around re-checks state.
    let _ = sys::poll(&mut fds, deadline);
}

impl Driver {
    /// Starts the world's progress thread.
    pub(crate) fn start(name: Arc<str>, engine: Engine, heartbeat_interval: Duration) -> Result<Arc<Driver>> {
        let d = Arc::new(Driver {
            name: name.clone(),
            engine: Mutex::new(engine),
            abort_fd: EventFd::new().map_err(|e| Error::system("eventfd", e))?,
            wake_fd: EventFd::new().map_err(|e| Error::system("eventfd", e))?,
            aborted: AtomicBool::new(false),
            inline: AtomicUsize::new(0),
            thread: Mutex::new(None),
        });
        let me = d.clone();
        let h = std::thread::Builder::new()
            .name(format!("mw-{}", name.chars().take(12).collect::<String>()))
            .spawn(move || me.run(heartbeat_interval))
            .map_err(|e| Error::system("spawning a progress thread", e))?;
        *lock(&d.thread) = Some(h);
        Ok(d)
    }

    /// One pass under the lock, with a pending abort applied first.
    fn pass(&self, e: &mut Engine, now: Instant) {
        if self.aborted.load(Ordering::Acquire) {
            e.abort(BrokenCause::LocalAbort);
        }
        e.pass(now);
    }

    fn run(&self, interval: Duration) {
        loop {
            let (ws, active) = {
                let mut e = lock(&self.engine);
                self.pass(&mut e, Instant::now());
                if e.broken().is_some() {
                    break;
                }
                let active = e.has_work() && self.inline.load(Ordering::Acquire) == 0;
                (if active { e.wait_set() } else { e.watch_set() }, active)
            };
            if active && ws.ready {
                continue;
            }
            // Idle or watching: wake at least once per heartbeat interval.
            let tick = (!active).then(|| Instant::now() + interval);
            poll_with(&ws, &[&self.wake_fd, &self.abort_fd], tick);
            self.wake_fd.drain();
        }
        debug!("world '{}': progress thread exits", self.name);
    }

    /// Hands operations to the engine. `driven` means the caller will drive them itself
    /// (blocking call); otherwise the progress thread is woken to do it.
    pub(crate) fn post(&self, ops: Vec<Posted>, driven: bool) {
        lock(&self.engine).post(ops, Instant::now());
        if !driven && self.inline.load(Ordering::Acquire) == 0 {
            self.wake_fd.signal();
        }
    }

    /// Aborts the world: local, non-blocking, idempotent.
    pub(crate) fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        self.abort_fd.signal();
    }

    /// Aborts and waits for the progress thread to finish (bounded: the thread only ever
    /// sleeps on descriptors that include the abort event).
    pub(crate) fn close(&self) {
        lock(&self.engine).close();
        self.abort();
        let h = lock(&self.thread).take();
        if let Some(h) = h {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        // Apply the abort even if the thread had already exited, so links are closed now.
        let mut e = lock(&self.engine);
        self.pass(&mut e, Instant::now());
    }

    pub(crate) fn broken(&self) -> Option<BrokenCause> {
        lock(&self.engine).broken().cloned()
    }

    pub(crate) fn stats(&self) -> WorldStats {
        lock(&self.engine).stats()
    }

    pub(crate) fn transports(&self) -> Vec<Option<crate::transport::TransportKind>> {
        lock(&self.engine).transports()
    }
}

impl Progress for Driver {
    fn wait(&self, c: &Completion, deadline: Option<Instant>) {
        if c.is_done() {
            return;
        }
        self.inline.fetch_add(1, Ordering::AcqRel);
        let mut idle_passes = 0;
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break;
            }
            let (ws, spin) = {
                let mut e = lock(&self.engine);
                self.pass(&mut e, now);
                if c.is_done() {
                    break;
                }
                (e.wait_set(), e.spin_worthy())
            };
            if ws.ready {
                continue;
            }
            if spin && idle_passes < SPIN_PASSES {
                idle_passes += 1;
                std::hint::spin_loop();
                continue;
            }
            idle_passes = 0;
            poll_with(&ws, &[&self.abort_fd], deadline);
        }
        if self.inline.fetch_sub(1, Ordering::AcqRel) == 1 && lock(&self.engine).has_work() {
            self.wake_fd.signal();
        }
    }

    fn timed_out(&self, after: Duration) {
        lock(&self.engine).abort(BrokenCause::OperationTimeout { after_ms: after.as_millis() as u64 });
    }

    fn nudge(&self) {
        if let Some(mut e) = try_lock(&self.engine) {
            self.pass(&mut e, Instant::now());
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The last handle is gone: make sure nothing keeps running (the thread holds a handle
        // of its own, so by now it has exited; this closes the links).
        let mut e = lock(&self.engine);
        e.abort(BrokenCause::LocalAbort);
    }
}
