//! Drives a world's engine: who runs it, and how threads sleep and wake.
//!
//! Each world has its own [`Driver`] and its own progress thread, and shares no lock with any
//! other world, so a world whose peer hangs cannot slow another world down. The engine sits
//! behind a mutex that is held only for one non-blocking pass, never across a sleep.
//!
//! One thread at a time **drives**: it holds the driving token, passes the engine, and sleeps
//! in `poll` on what the engine waits for. Every other thread waiting for an operation sleeps
//! on that operation's completion, which whoever completes it signals. So a wake-up can never
//! go to the wrong sleeper:
//!
//! - A blocking call posts its operation and, if nobody drives, takes the token and drives
//!   until its own operation is done — no hop to another thread. If another thread drives, the
//!   post kicks it (an event descriptor only the driver polls) and the caller waits on its
//!   completion.
//! - Non-blocking operations are driven by the progress thread, which a post wakes through a
//!   second event descriptor that only the idle progress thread polls. A caller that stops
//!   driving with work left wakes it the same way.
//! - An idle world's progress thread sleeps on its links' hang-up events and wakes once per
//!   heartbeat interval: a dead peer is seen at once, a silent one at the heartbeat timeout.
//! - Abort sets a flag and signals a third event descriptor that every sleeper polls and
//!   nobody drains; the next pass fails every operation and closes the links, and the
//!   progress thread exits.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::error::{BrokenCause, Error, Result};
use crate::api::request::{Completion, Progress};
use crate::engine::{Direct, Engine, Posted, WaitSet, WorldStats};
use crate::sys::buf::RawBuf;
use crate::sys::sync::{lock, Arc, AtomicBool, Mutex, MutexGuard, Ordering};
use crate::sys::{self, EventFd};

/// How long a driver keeps passing without progress before it goes to sleep. Long enough to
/// cover a peer's reply to a small message; short enough not to starve the peer on a machine
/// with few cores.
const SPIN_FOR: Duration = Duration::from_micros(50);
/// How long a waiter that does not drive sleeps on its completion before it looks whether it
/// could drive instead.
const WAITER_RECHECK: Duration = Duration::from_millis(2);

pub(crate) struct Driver {
    name: Arc<str>,
    engine: Mutex<Engine>,
    /// Held by the one thread that drives.
    token: Token,
    /// Signalled once, on abort; never drained; every sleeper polls it.
    abort_fd: EventFd,
    /// Tells the driver that new work was posted; polled and drained by the driver only.
    kick_fd: EventFd,
    /// Tells the idle progress thread that there is work; polled and drained by it only.
    wake_fd: EventFd,
    aborted: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The world's engine, locked. When the guard goes, the lock is let go of first, and then
/// whatever the engine left in its outbox (log lines, task wake-ups, the break's event) runs,
/// so that nothing outside the world ever runs while the world is held.
struct Locked<'a>(Option<MutexGuard<'a, Engine>>);

impl std::ops::Deref for Locked<'_> {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        self.0.as_deref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Engine {
        self.0.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(mut g) = self.0.take() else { return };
        let out = g.take_outbox();
        drop(g);
        if !out.is_empty() {
            out.run();
        }
    }
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
    pub(crate) fn start(name: Arc<str>, engine: Engine, heartbeat_interval: Option<Duration>) -> Result<Arc<Driver>> {
        let efd = || EventFd::new().map_err(|e| Error::system("eventfd", e));
        let d = Arc::new(Driver {
            name: name.clone(),
            engine: Mutex::new(engine),
            token: Token::default(),
            abort_fd: efd()?,
            kick_fd: efd()?,
            wake_fd: efd()?,
            aborted: AtomicBool::new(false),
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

    /// Locks the engine; see [`Locked`].
    fn engine(&self) -> Locked<'_> {
        Locked(Some(lock(&self.engine)))
    }

    fn take_token(&self) -> bool {
        self.token.take()
    }

    /// Gives the token back; true if work is left that nobody will drive unless told.
    fn give_token(&self) -> bool {
        self.token.give_back(|| self.engine().has_work())
    }

    /// One pass under the lock, with a pending abort applied first.
    /// True if the pass moved anything.
    ///
    /// A panic in the pass (a bug) must not strand the world: its thread, a progress thread or
    /// a caller, would die or unwind holding the token with every operation pending for ever.
    /// It breaks the world instead, every operation completing with the internal error.
    fn pass(&self, e: &mut Engine, now: Instant) -> bool {
        if self.aborted.load(Ordering::Acquire) {
            e.abort(BrokenCause::LocalAbort);
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.pass(now))) {
            Ok(moved) => moved,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                e.abort(BrokenCause::Internal { detail: format!("the engine panicked: {what}") });
                true
            }
        }
    }

    /// Drives (the caller holds the token) until `done` says so or `deadline` passes.
    fn drive(&self, done: impl Fn(&Engine) -> bool, deadline: Option<Instant>) {
        let mut spinning_since: Option<Instant> = None;
        let mut passes = 0u32;
        let mut now = Instant::now();
        loop {
            // While spinning the clock is read every few passes only: reading it costs about as
            // much as a pass that finds nothing to do.
            if spinning_since.is_none() || passes % 16 == 0 {
                now = Instant::now();
            }
            passes = passes.wrapping_add(1);
            let ws = {
                let mut e = self.engine();
                if self.pass(&mut e, now) {
                    // Progress: the spinning window starts again.
                    spinning_since = None;
                }
                if done(&e) || deadline.is_some_and(|d| now >= d) {
                    return;
                }
                // Keep passing for a moment before sleeping: the peer's reply to a small
                // message comes within microseconds, sooner than a sleep and a wake-up.
                if e.spin_worthy() && now.duration_since(*spinning_since.get_or_insert(now)) < SPIN_FOR {
                    None
                } else {
                    // About to sleep: arm the links (this raises the shared-memory sleep flags).
                    Some(e.wait_set())
                }
            };
            let Some(ws) = ws else {
                std::hint::spin_loop();
                continue;
            };
            spinning_since = None;
            if ws.ready {
                continue;
            }
            poll_with(&ws, &[&self.abort_fd, &self.kick_fd], deadline);
            self.kick_fd.drain();
        }
    }

    fn run(&self, interval: Option<Duration>) {
        loop {
            if self.take_token() {
                let work = {
                    let mut e = self.engine();
                    self.pass(&mut e, Instant::now());
                    e.has_work() && e.broken().is_none()
                };
                if work {
                    self.drive(|e| !e.has_work() || e.broken().is_some(), None);
                }
                let broken = self.engine().broken().is_some();
                let left = self.give_token();
                if broken {
                    break;
                }
                if left {
                    // Posted while we drove: the post only kicked us, so drive it now.
                    continue;
                }
            }
            // Idle (or another thread drives): watch for hang-ups, work, abort, the next tick.
            let ws = self.engine().watch_set();
            poll_with(&ws, &[&self.wake_fd, &self.abort_fd], interval.map(|i| Instant::now() + i));
            self.wake_fd.drain();
        }
        debug!("world '{}': progress thread exits", self.name);
    }

    /// A lone send or receive done at once, if it can be (`engine/direct.rs`). An aborted
    /// world is left to the general path, which fails the call (the abort reaches the engine
    /// only at the next pass).
    pub(crate) fn run_direct(&self, desc: &crate::coll::OpDesc, send: RawBuf, recv: RawBuf) -> Direct {
        if self.aborted.load(Ordering::Acquire) {
            return Direct::No;
        }
        self.engine().run_direct(desc, send, recv)
    }

    /// Hands operations to the engine. `driven` means the caller will wait for them at once
    /// (a blocking call) and drive them itself if it can.
    pub(crate) fn post(&self, ops: impl IntoIterator<Item = Posted>, driven: bool) {
        self.engine().post(ops, Instant::now);
        if self.token.held() {
            self.kick_fd.signal();
        } else if !driven {
            self.wake_fd.signal();
        }
    }

    /// Aborts the world: local, non-blocking, idempotent.
    pub(crate) fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        self.abort_fd.signal();
    }

    /// Leaves the world — gracefully if it is idle and was not aborted — and waits for the
    /// progress thread to finish (bounded: it sleeps only on descriptors that include the
    /// abort event).
    pub(crate) fn close(&self) {
        {
            let mut e = self.engine();
            if self.aborted.load(Ordering::Acquire) {
                e.abort(BrokenCause::LocalAbort);
            } else {
                e.close();
            }
        }
        self.abort();
        let h = lock(&self.thread).take();
        if let Some(h) = h {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }

    pub(crate) fn broken(&self) -> Option<BrokenCause> {
        self.engine().broken().cloned()
    }

    pub(crate) fn stats(&self) -> WorldStats {
        self.engine().stats()
    }

    pub(crate) fn transports(&self) -> Vec<Option<crate::transport::TransportKind>> {
        self.engine().transports()
    }
}

impl Progress for Driver {
    fn wait(&self, cs: &[&Completion], deadline: Option<Instant>) {
        let mut tries = 0u32;
        let all_done = || cs.iter().all(|c| c.is_done());
        loop {
            if all_done() || deadline.is_some_and(|d| Instant::now() >= d) {
                return;
            }
            if self.take_token() {
                self.drive(|_| all_done(), deadline);
                if self.give_token() {
                    // Work of other callers is left: the progress thread carries it on.
                    self.wake_fd.signal();
                }
                return;
            }
            // Another thread drives and will complete us, or stop driving soon.
            tries += 1;
            if tries < 64 {
                std::thread::yield_now();
            } else if let Some(c) = cs.iter().find(|c| !c.is_done()) {
                let step = Instant::now() + WAITER_RECHECK;
                c.wait_until(Some(deadline.map_or(step, |d| d.min(step))));
            }
        }
    }

    fn timed_out(&self, after: Duration) {
        self.engine().abort(BrokenCause::OperationTimeout { after_ms: after.as_millis() as u64 });
        // Wake whoever sleeps on this world so that it sees the break.
        self.kick_fd.signal();
    }

    fn nudge(&self) {
        if self.take_token() {
            {
                let mut e = self.engine();
                self.pass(&mut e, Instant::now());
            }
            if self.give_token() {
                // Work is left (ours, or posted meanwhile, whose post only kicked us): the
                // progress thread drives it, so a future is woken without another poll.
                self.wake_fd.signal();
            }
        }
    }
}

/// The driving token. Whoever gives it back must look for work posted while it was held: such
/// a post saw the token held and only kicked the driver, who may no longer be listening. The
/// look happens under the engine lock, which the post also takes before it reads the token, so
/// one of the two always sees the other (`loom_token_*` below).
#[derive(Default)]
struct Token(AtomicBool);

impl Token {
    fn take(&self) -> bool {
        self.0.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    fn held(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Gives the token back and then looks for work; true if some is left.
    fn give_back(&self, has_work: impl FnOnce() -> bool) -> bool {
        self.0.store(false, Ordering::Release);
        has_work()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The last handle is gone (the thread holds one, so it has exited): close the links.
        self.engine().abort(BrokenCause::LocalAbort);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::api::error::ErrorKind;
    use crate::api::request::Completion;
    use crate::api::types::{DataType, ReduceOp};
    use crate::coll::OpDesc;
    use crate::engine::wire::OpKind;
    use crate::engine::EngineConfig;
    use crate::transport::loopback::QueueLink;
    use crate::transport::Link;

    #[test]
    fn a_panic_in_a_pass_breaks_the_world_and_completes_its_operations() {
        let (a, _b, _f) = QueueLink::pair(1 << 20);
        let links: Vec<Option<Box<dyn Link>>> = vec![Some(Box::new(QueueLink::loopback())), Some(Box::new(a))];
        let cfg = EngineConfig {
            name: Arc::from("p"),
            rank: 0,
            size: 2,
            world_id: 1,
            generation: 1,
            heartbeat: None,
            checksum: Default::default(),
        };
        let mut engine = Engine::new(cfg, links, Instant::now());
        engine.panic_in_pass = true;
        let d = Driver::start(Arc::from("p"), engine, None).unwrap();
        let desc = OpDesc {
            kind: OpKind::Barrier,
            dtype: DataType::U8,
            redop: ReduceOp::Sum,
            count: 0,
            root: 0,
            is_send: false,
            in_place: false,
        };
        let c = Completion::new();
        let posted = Posted {
            desc,
            send: crate::sys::buf::RawBuf::EMPTY,
            recv: crate::sys::buf::RawBuf::EMPTY,
            completion: c.clone(),
            timeout: None,
            keepalive: None,
        };
        // Posted without a caller: the progress thread passes, and panics.
        d.post([posted], false);
        assert!(c.wait_until(Some(Instant::now() + Duration::from_secs(10))), "the operation was stranded");
        let e = c.result().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
        assert!(matches!(e.broken_cause(), Some(BrokenCause::Internal { .. })), "{e}");
        assert!(matches!(d.broken(), Some(BrokenCause::Internal { .. })), "{:?}", d.broken());
        // The token was given back: a later caller is answered at once, not left waiting.
        d.nudge();
        d.close();
    }
}

/// Loom models of the driving token, the kick and the wake-up: run with
/// `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {
    use super::Token;
    use crate::sys::sync::{lock, Arc, AtomicBool, Mutex, Ordering};

    /// The driver's side and a poster's side of `Driver`, over a work counter for the engine
    /// and flags for the two event descriptors.
    struct World {
        token: Token,
        work: Mutex<u32>,
        kick: AtomicBool,
        wake: AtomicBool,
    }

    impl World {
        /// `Driver::post`: queue under the lock, then kick a driver or wake the idle thread.
        fn post(&self) {
            *lock(&self.work) += 1;
            if self.token.held() {
                self.kick.store(true, Ordering::Release);
            } else {
                self.wake.store(true, Ordering::Release);
            }
        }

        /// One round of `Driver::run` (or a blocking caller's drive): take the token, do all the
        /// work there is, give the token back and go again while work is left.
        fn drive_until_idle(&self) {
            while self.token.take() {
                *lock(&self.work) = 0;
                if !self.token.give_back(|| *lock(&self.work) > 0) {
                    return;
                }
            }
        }
    }

    /// A post racing with the driver giving the token back is never lost: when the driver goes
    /// idle, either no work is left or the idle thread's wake-up was signalled.
    #[test]
    fn loom_token_a_post_during_the_hand_back_is_never_lost() {
        loom::model(|| {
            let w = Arc::new(World {
                token: Token::default(),
                work: Mutex::new(1),
                kick: AtomicBool::new(false),
                wake: AtomicBool::new(false),
            });
            let poster = {
                let w = w.clone();
                loom::thread::spawn(move || w.post())
            };
            w.drive_until_idle();
            poster.join().unwrap();
            let left = *lock(&w.work);
            assert!(left == 0 || w.wake.load(Ordering::Acquire), "work {left} left with nobody told");
        });
    }

    /// Two drivers (a blocking caller and the progress thread) and a poster: the token is held
    /// by one at a time, and no work is stranded.
    #[test]
    fn loom_token_two_drivers_and_a_poster() {
        loom::model(|| {
            let w = Arc::new(World {
                token: Token::default(),
                work: Mutex::new(0),
                kick: AtomicBool::new(false),
                wake: AtomicBool::new(false),
            });
            let poster = {
                let w = w.clone();
                loom::thread::spawn(move || w.post())
            };
            let other = {
                let w = w.clone();
                loom::thread::spawn(move || w.drive_until_idle())
            };
            w.drive_until_idle();
            poster.join().unwrap();
            other.join().unwrap();
            let left = *lock(&w.work);
            assert!(left == 0 || w.wake.load(Ordering::Acquire), "work {left} left with nobody told");
        });
    }
}
