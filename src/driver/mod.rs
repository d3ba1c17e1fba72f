//! Drives a world's engine: who runs it, and how threads sleep and wake.
//!
//! Each world has its own [`Driver`]: its engine behind a mutex that is held only for one
//! non-blocking pass, never across a sleep, and shared with no other world, so a world whose
//! peer hangs cannot slow another world down. Worlds share no threads of their own: a small
//! process-wide [`pool`] of progress threads watches every world's links with `epoll` and
//! drives the worlds nobody else drives.
//!
//! One thread at a time **drives** a world: it holds the driving token, passes the engine, and
//! sleeps on what the engine waits for. Every other thread waiting for an operation sleeps on
//! that operation's completion, which whoever completes it signals. So a wake-up can never go to
//! the wrong sleeper:
//!
//! - A blocking call posts its operation and, if nobody drives, takes the token and drives
//!   until its own operation is done, sleeping in `poll` on the world's links and on its own
//!   thread's wake-up descriptor — no hop to another thread. If another thread drives, the post
//!   **kicks** it: a caller that drives is woken through its thread's descriptor, the pool by
//!   being told to serve the world.
//! - Non-blocking operations are driven by the world's pool thread, which a post tells to
//!   serve the world; so is work a blocking caller leaves when it stops driving.
//! - The pool thread serves a world in bounded slices: it passes the engine while that moves
//!   anything (spinning briefly only when no other world waits for it), then arms the world's
//!   links in its `epoll` (one-shot) and gives the token back. An idle world is armed for its
//!   links' hang-ups only and for its next timer (heartbeats, silence, deadlines) on the pool
//!   thread's timer heap: a dead peer is seen at once, a silent one at the heartbeat timeout,
//!   and an idle world costs nothing between its timers.
//! - Abort sets a flag, kicks whoever drives and tells the pool; the next pass fails every
//!   operation and closes the links, and the pool forgets the world.

mod pool;

use std::time::{Duration, Instant};

use crate::api::error::{BrokenCause, Result};
use crate::api::request::{Completion, Progress};
use crate::engine::{Direct, Engine, Posted, WaitSet, WorldStats};
use crate::sys::buf::RawBuf;
use crate::sys::sync::{lock, Arc, AtomicBool, AtomicU32, Mutex, MutexGuard, Ordering};
use crate::sys::{self, EventFd};
use crate::transport::TransportKind;

/// How long a driver keeps passing without progress before it goes to sleep. Long enough to
/// cover a peer's reply to a small message; short enough not to starve the peer on a machine
/// with few cores.
const SPIN_FOR: Duration = Duration::from_micros(50);
/// When a spin starts yielding its core now and then (`Driver::drive`): later than any reply to
/// a small message on a healthy machine, which therefore never waits behind a yield (with a
/// busy thread on the same core, a yield can cost a scheduler slice). A world with more ranks
/// on this host than the process has cores yields from the start instead (`Driver::yield_after`).
const YIELD_AFTER: Duration = Duration::from_micros(20);
/// A yield that kept the thread off its core this long most likely gave the core to something
/// other than the ranks it waits for (they answer in microseconds): a busy process beside ours,
/// which keeps a core for its scheduler slice.
const LONG_YIELD: Duration = Duration::from_millis(2);
/// The yields of oversubscribed worlds' spins (`Driver::yield_after` zero) are judged in
/// samples of this many, process-wide; a sample with [`LONG_IN_SAMPLE`] long ones or more finds
/// the cores contended. (Measured here, four ranks on two cores: with nothing else running,
/// about one yield in 1500 took 2 ms or more; beside two busy processes, two in three.)
const YIELD_SAMPLE: u32 = 8;
const LONG_IN_SAMPLE: u32 = 3;
/// For so long after a sample finds the cores contended, the waits of oversubscribed worlds
/// sleep at once (until the peer's doorbell) instead of spinning: a spin there only hands the
/// core to the busy process, a scheduler slice at a time, while a sleeper that is woken gets the
/// core back at once. Beside two busy processes, four ranks' 512-byte all-reduce takes 0.15-0.25
/// ms so, against 1.4-5 ms spinning.
const CONTENDED_FOR: Duration = Duration::from_millis(500);
/// How long a waiter that does not drive sleeps on its completion before it looks whether it
/// could drive instead.
const WAITER_RECHECK: Duration = Duration::from_millis(2);
/// How long a pool thread serves one world before it looks at the others.
const SLICE: Duration = Duration::from_millis(1);

pub(crate) struct Driver {
    name: Arc<str>,
    engine: Mutex<Engine>,
    /// Held by the one thread that drives.
    token: Token,
    /// The wake-up descriptor of the caller that holds the token and may sleep in `poll` on the
    /// world; `None` while the pool drives or nobody does (a kick then goes to the pool).
    sleeper: Mutex<Option<Arc<EventFd>>>,
    aborted: AtomicBool,
    /// The world waits in its pool thread's inbox (at most once); under the inbox's lock.
    queued: AtomicBool,
    /// Callers in `Progress::wait` on this world.
    waiters: AtomicU32,
    /// The pool thread that watches this world.
    home: Arc<pool::Worker>,
    /// The engine's cause of the break, once it broke: read without waiting for a pass.
    broken: Arc<std::sync::OnceLock<BrokenCause>>,
    /// How long a spin waits before it yields its core now and then: [`YIELD_AFTER`], or
    /// nothing when the world has more ranks on this host (itself and its shared-memory peers)
    /// than this process has cores. Then a rank it waits for is most likely waiting for a core,
    /// and every microsecond spun delays it: four ranks on two cores all-gather 64 bytes in
    /// 10-25 µs yielding at once, against 50-100 µs after 20 µs of spinning.
    yield_after: Duration,
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

fn poll_with(ws: &WaitSet, wake: Option<&EventFd>, deadline: Option<Instant>) {
    let mut fds = ws.fds.clone();
    let mut deadline = match (ws.deadline, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    match wake {
        Some(e) => fds.push(sys::pollfd(e.fd(), libc::POLLIN)),
        // No descriptor of its own (the process is out of them): look again soon instead.
        None => {
            let soon = Instant::now() + WAITER_RECHECK;
            deadline = Some(deadline.map_or(soon, |d| d.min(soon)));
        }
    }
    // An error here (EINVAL/ENOMEM) cannot be acted on; the loop around re-checks state.
    let _ = sys::poll(&mut fds, deadline);
}

std::thread_local! {
    /// This thread's wake-up descriptor for when it drives a world and sleeps in `poll`: one
    /// per calling thread, not per world, made the first time it sleeps (and tried again at
    /// the next sleep if the process had no descriptor to spare).
    static CALLER_WAKE: std::cell::RefCell<Option<Arc<EventFd>>> = const { std::cell::RefCell::new(None) };
}

/// This thread's wake-up descriptor (`CALLER_WAKE`), if it has or can make one.
fn caller_wake() -> Option<Arc<EventFd>> {
    CALLER_WAKE.with(|w| {
        let mut w = w.borrow_mut();
        if w.is_none() {
            *w = EventFd::new().ok().map(Arc::new);
        }
        w.clone()
    })
}

/// What a pool thread does with a world after serving it.
pub(crate) enum Served {
    /// Serve it again as soon as the other worlds had their turn.
    Again,
    /// Its links are armed; serve it again when one reports or at `until`. `moved`: this
    /// serving moved anything.
    Wait { until: Option<Instant>, moved: bool },
    /// Broken: nothing more will happen to it.
    Forget,
}

impl Driver {
    /// A driver for `engine`, watched by a pool thread from now on.
    pub(crate) fn start(name: Arc<str>, mut engine: Engine) -> Result<Arc<Driver>> {
        let watch = engine.watch_set(true);
        let home = pool::home(watch.deadline)?;
        let broken = engine.broken_handle();
        let on_host = 1 + engine.transports().iter().filter(|t| **t == Some(TransportKind::Shm)).count();
        let yield_after = if on_host > pool::cores() { Duration::ZERO } else { YIELD_AFTER };
        let d = Arc::new(Driver {
            name,
            broken,
            engine: Mutex::new(engine),
            token: Token::default(),
            sleeper: Mutex::new(None),
            aborted: AtomicBool::new(false),
            queued: AtomicBool::new(false),
            waiters: AtomicU32::new(0),
            home: home.clone(),
            yield_after,
        });
        home.add(d.clone(), &watch);
        Ok(d)
    }

    /// Locks the engine; see [`Locked`].
    fn engine(&self) -> Locked<'_> {
        Locked(Some(lock(&self.engine)))
    }

    /// The key the pool knows this world by.
    fn key(&self) -> u64 {
        self as *const Driver as u64
    }

    /// Tells the pool thread to serve this world.
    fn schedule(&self) {
        self.home.serve_soon(self);
    }

    /// Tells whoever drives that there is news (new work, an abort): the caller sleeping on
    /// the world, or else the pool.
    fn kick(&self) {
        match lock(&self.sleeper).as_ref() {
            Some(fd) => fd.signal(),
            None => self.schedule(),
        }
    }

    /// Gives the token back; true if work is left that nobody will drive unless told.
    fn give_token(&self) -> bool {
        self.token.give_back(|| self.engine().has_work())
    }

    /// One pass under the lock, with a pending abort applied first.
    /// True if the pass moved anything.
    ///
    /// A panic in the pass (a bug) must not strand the world: its thread, a pool thread or a
    /// caller, would die or unwind holding the token with every operation pending for ever.
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

    /// A caller drives (it holds the token) until `done` says so or `deadline` passes.
    fn drive(&self, done: impl Fn(&Engine) -> bool, deadline: Option<Instant>) {
        // This thread's wake-up descriptor, once it became the world's sleeper (at its first
        // sleep: a drive that ends while spinning never touches the sleeper slot).
        let mut wake: Option<Option<Arc<EventFd>>> = None;
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
                    break;
                }
                // Keep passing for a moment before sleeping: the peer's reply to a small
                // message comes within microseconds, sooner than a sleep and a wake-up.
                if e.spin_worthy()
                    && now.duration_since(*spinning_since.get_or_insert(now)) < SPIN_FOR
                    && !self.sleeps_at_once(now)
                {
                    None
                } else {
                    // About to sleep: arm the links (this raises the shared-memory sleep flags).
                    Some(e.wait_set())
                }
            };
            let Some(ws) = ws else {
                self.spin_once(spinning_since.map_or(Duration::ZERO, |t| now.duration_since(t)), passes);
                continue;
            };
            let Some(fd) = &wake else {
                // First sleep: become the world's sleeper, then pass once more, so that work
                // posted before this is seen by that pass and work posted after it kicks us.
                let fd = caller_wake();
                *lock(&self.sleeper) = fd.clone();
                wake = Some(fd);
                continue;
            };
            spinning_since = None;
            if ws.ready {
                continue;
            }
            poll_with(&ws, fd.as_deref(), deadline);
            if let Some(w) = fd {
                w.drain();
            }
        }
        if wake.is_some() {
            // A kick from now on goes to the pool (`give_token`'s look for work covers the
            // rest).
            *lock(&self.sleeper) = None;
        }
    }

    /// True when this world's waits sleep at once instead of spinning: it has more ranks on
    /// this host than cores, and the spins' yields found the cores busy with other work
    /// ([`Contention`]). (A world of fewer ranks keeps spinning there: its ranks, on a core at
    /// the same moment for a slice, trade many messages in it.)
    fn sleeps_at_once(&self, now: Instant) -> bool {
        self.yield_after.is_zero() && CONTENTION.contended(now)
    }

    /// One turn of a spin that has lasted `spun` (pass number `passes`): past the first
    /// microseconds, the core is given away now and then, and at every turn in a world with
    /// more ranks on this host than cores (`yield_after`): the peer waited for may be the one
    /// waiting for this core. A yield with nobody else to run returns at once.
    fn spin_once(&self, spun: Duration, passes: u32) {
        let every = if self.yield_after.is_zero() { 1 } else { 8 };
        if spun >= self.yield_after && passes % every == 0 {
            let before = Instant::now();
            std::thread::yield_now();
            let after = Instant::now();
            if self.yield_after.is_zero() {
                CONTENTION.yielded(after.duration_since(before) >= LONG_YIELD, after);
            }
        } else {
            std::hint::spin_loop();
        }
    }

    /// The pool thread serves the world (`pool.rs`): a bounded slice of passes if nobody else
    /// drives, then the world's links armed through `arm` (called under the world's lock, so
    /// that the links it names are open) and the time of its next timer. `reported`: one of
    /// the descriptors armed last time reported; `asked`: someone asked for the world to be
    /// served (its inbox held it). `alone` says whether no other world waits for
    /// this pool thread, which makes a short spin worth it.
    pub(crate) fn serve(
        &self,
        reported: bool,
        asked: bool,
        arm: &mut dyn FnMut(&[libc::pollfd]),
        alone: &dyn Fn() -> bool,
    ) -> Served {
        if reported {
            self.engine().links_reported();
        }
        // A caller that waits on the world drives it: the pool takes over only when asked (a
        // non-blocking post, work a caller left, an abort), not because a link or a timer
        // reported, or it would take the token from under the caller between two of its calls
        // and keep it (its descriptors armed for data, reporting the caller's traffic).
        let leave = !asked && self.waiters.load(Ordering::Acquire) > 0;
        if leave || !self.token.take() {
            // A caller drives: keep watching for hang-ups and the timers while it does.
            let mut e = self.engine();
            if e.broken().is_some() {
                return Served::Forget;
            }
            let ws = e.watch_set(false);
            arm(&ws.fds);
            return Served::Wait { until: ws.deadline, moved: false };
        }
        let start = Instant::now();
        let mut spinning_since: Option<Instant> = None;
        let mut moved_any = false;
        let mut turns = 0u32;
        let served = loop {
            let now = Instant::now();
            let mut e = self.engine();
            let moved = self.pass(&mut e, now);
            moved_any |= moved;
            if e.broken().is_some() {
                break Served::Forget;
            }
            if !e.has_work() {
                let ws = e.watch_set(true);
                arm(&ws.fds);
                break Served::Wait { until: ws.deadline, moved: moved_any };
            }
            if now.duration_since(start) >= SLICE {
                break Served::Again;
            }
            if moved {
                spinning_since = None;
                continue;
            }
            if e.spin_worthy()
                && now.duration_since(*spinning_since.get_or_insert(now)) < SPIN_FOR
                && alone()
                && !self.sleeps_at_once(now)
            {
                drop(e);
                turns = turns.wrapping_add(1);
                self.spin_once(now.duration_since(spinning_since.unwrap_or(now)), turns);
                continue;
            }
            let ws = e.wait_set();
            if ws.ready {
                continue;
            }
            arm(&ws.fds);
            break Served::Wait { until: ws.deadline, moved: moved_any };
        };
        // While the pool holds the token no caller sleeps on the world, so every post kicked
        // the pool itself (`kick`): nothing is left that it was not told about.
        self.token.give_back(|| false);
        served
    }

    /// A lone send or receive done at once, if it can be (`engine/direct.rs`). An aborted
    /// world is left to the general path, which fails the call (the abort reaches the engine
    /// only at the next pass).
    pub(crate) fn run_direct(&self, desc: &crate::coll::OpDesc, send: RawBuf, recv: RawBuf) -> Direct {
        if self.aborted.load(Ordering::Acquire) {
            return Direct::No;
        }
        let r = self.engine().run_direct(desc, send, recv);
        if matches!(r, Direct::Writing(_)) && self.token.held() {
            // A socket took only part of the frame, and the caller now waits for the rest as
            // for a posted send: whoever drives must also watch the socket for room.
            self.kick();
        }
        r
    }

    /// Hands operations to the engine. `driven` means the caller will wait for them at once
    /// (a blocking call) and drive them itself if it can.
    pub(crate) fn post(&self, ops: impl IntoIterator<Item = Posted>, driven: bool) {
        self.engine().post(ops, Instant::now);
        if self.token.held() {
            self.kick();
        } else if !driven {
            self.schedule();
        }
    }

    /// Aborts the world: local, non-blocking, idempotent.
    pub(crate) fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        self.kick();
        // The pool applies it if nobody drives, and forgets the world.
        self.schedule();
    }

    /// Breaks the world with `cause` (the engine tells the peers), then aborts as
    /// [`Driver::abort`] does. Waits at most for a pass in progress to end.
    pub(crate) fn break_with(&self, cause: BrokenCause) {
        self.engine().abort(cause);
        self.abort();
    }

    /// Leaves the world — gracefully if it is idle and was not aborted: the links are closed
    /// when this returns, and the pool forgets the world.
    pub(crate) fn close(&self) {
        {
            let mut e = self.engine();
            if self.aborted.load(Ordering::Acquire) {
                e.abort(BrokenCause::LocalAbort);
            } else {
                e.close();
            }
            // Removed: no shrink of it can come now, so the segments a break kept go.
            e.release_kept_segments();
        }
        self.abort();
    }

    /// Why the world broke, if it did; never waits for a pass to end.
    pub(crate) fn broken(&self) -> Option<BrokenCause> {
        self.broken.get().cloned()
    }

    pub(crate) fn stats(&self) -> WorldStats {
        self.engine().stats()
    }

    pub(crate) fn transports(&self) -> Vec<Option<crate::transport::TransportKind>> {
        self.engine().transports()
    }

    pub(crate) fn lane_sources(&self, broken: bool) -> Vec<Option<crate::transport::PairSource>> {
        self.engine().lane_sources(broken)
    }
}

impl Progress for Driver {
    fn wait(&self, cs: &[&Completion], deadline: Option<Instant>) {
        let mut tries = 0u32;
        let all_done = || cs.iter().all(|c| c.is_done());
        // While this caller waits, the pool leaves the world to it unless asked (`serve`).
        self.waiters.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiters);
        loop {
            if all_done() || deadline.is_some_and(|d| Instant::now() >= d) {
                return;
            }
            if self.token.take() {
                self.drive(|_| all_done(), deadline);
                // No longer waiting before the look for work left, which goes to the pool.
                drop(_waiting);
                if self.give_token() {
                    // Work of other callers is left: the pool carries it on.
                    self.schedule();
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
        // Wake whoever sleeps on this world so that it sees the break; the pool forgets it.
        self.kick();
        self.schedule();
    }

    fn nudge(&self) {
        if self.token.take() {
            {
                let mut e = self.engine();
                self.pass(&mut e, Instant::now());
            }
            if self.give_token() {
                // Work is left (ours, or posted meanwhile, whose post only told the pool while
                // we held the token): the pool drives it, so a future is woken without another
                // poll.
                self.schedule();
            }
        }
    }
}

/// Whether the cores are busy with other work than ours, judged from how long the spins'
/// yields keep their threads off the core ([`LONG_YIELD`], in samples of [`YIELD_SAMPLE`]). A
/// hint, not a protocol: threads race on the counts, and a sample a little off is harmless.
/// (std's atomics, also under loom, which has no static ones.)
struct Contention {
    yields: std::sync::atomic::AtomicU32,
    long: std::sync::atomic::AtomicU32,
    /// Until when (microseconds since [`since_start`]'s origin) waits sleep at once.
    until: std::sync::atomic::AtomicU64,
}

/// The process's cores, as its spins find them.
static CONTENTION: Contention = Contention::new();

fn since_start(t: Instant) -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    t.saturating_duration_since(*ORIGIN.get_or_init(Instant::now)).as_micros() as u64
}

impl Contention {
    const fn new() -> Contention {
        use std::sync::atomic::{AtomicU32, AtomicU64};
        Contention { yields: AtomicU32::new(0), long: AtomicU32::new(0), until: AtomicU64::new(0) }
    }

    /// True while the last sample that found the cores contended is recent ([`CONTENDED_FOR`]).
    fn contended(&self, now: Instant) -> bool {
        let until = self.until.load(std::sync::atomic::Ordering::Relaxed);
        until != 0 && since_start(now) < until
    }

    /// Counts a spin's yield (`long`: it kept the thread off its core at least [`LONG_YIELD`])
    /// into the current sample, and judges the sample when it is full.
    fn yielded(&self, long: bool, now: Instant) {
        use std::sync::atomic::Ordering::Relaxed;
        let long = if long { self.long.fetch_add(1, Relaxed) + 1 } else { self.long.load(Relaxed) };
        if self.yields.fetch_add(1, Relaxed) + 1 >= YIELD_SAMPLE {
            self.yields.store(0, Relaxed);
            self.long.store(0, Relaxed);
            if long >= LONG_IN_SAMPLE {
                self.until.store(since_start(now + CONTENDED_FOR), Relaxed);
            }
        }
    }
}

/// Counts a caller out of `Driver::waiters` when it stops waiting, however it leaves.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
        // The last handle is gone (the pool holds one until it forgets a broken world): close
        // the links.
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
    fn a_sample_of_long_yields_makes_waits_sleep_for_a_while() {
        let c = Contention::new();
        let t = Instant::now();
        // A long yield or two in a sample are the machine's noise; three are contention.
        for i in 0..YIELD_SAMPLE {
            c.yielded(i < LONG_IN_SAMPLE - 1, t);
        }
        assert!(!c.contended(t));
        for i in 0..YIELD_SAMPLE {
            c.yielded(i % 2 == 1 && i < 2 * LONG_IN_SAMPLE, t);
        }
        assert!(c.contended(t) && c.contended(t + CONTENDED_FOR / 2));
        assert!(!c.contended(t + CONTENDED_FOR + Duration::from_millis(1)));
        // Short yields later do not end it early; it ends when its time is up.
        for _ in 0..YIELD_SAMPLE {
            c.yielded(false, t);
        }
        assert!(c.contended(t + CONTENDED_FOR / 2));
    }

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
        let d = Driver::start(Arc::from("p"), engine).unwrap();
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
        // Posted without a caller: the pool passes, and panics.
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

/// Loom models of the driving token, the kick and the pool's inbox: run with
/// `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {
    use super::Token;
    use crate::sys::sync::{lock, Arc, AtomicBool, AtomicU32, Mutex, Ordering};

    /// `Driver` reduced to its protocol: a work counter for the engine, the sleeper slot with
    /// a flag for the caller's wake-up descriptor, and the pool's inbox (requests waiting in
    /// it, and the world's `queued` flag, which lives under the inbox's lock).
    struct World {
        token: Token,
        work: Mutex<u32>,
        sleeper: Mutex<bool>,
        caller_woken: AtomicBool,
        inbox: Mutex<Inbox>,
        waiters: AtomicU32,
    }

    struct Inbox {
        requests: u32,
        queued: bool,
    }

    impl World {
        fn new(work: u32) -> Arc<World> {
            Arc::new(World {
                token: Token::default(),
                work: Mutex::new(work),
                sleeper: Mutex::new(false),
                caller_woken: AtomicBool::new(false),
                inbox: Mutex::new(Inbox { requests: 0, queued: false }),
                waiters: AtomicU32::new(0),
            })
        }

        /// `Driver::schedule` (`Worker::serve_soon`).
        fn schedule(&self) {
            let mut inbox = lock(&self.inbox);
            if !inbox.queued {
                inbox.queued = true;
                inbox.requests += 1;
            }
        }

        /// `Driver::kick`.
        fn kick(&self) {
            if *lock(&self.sleeper) {
                self.caller_woken.store(true, Ordering::Release);
            } else {
                self.schedule();
            }
        }

        /// `Driver::post` of a non-blocking operation.
        fn post(&self) {
            *lock(&self.work) += 1;
            if self.token.held() {
                self.kick();
            } else {
                self.schedule();
            }
        }

        /// A blocking caller (`Progress::wait` and `drive`): passes, and if it `sleeps`
        /// registers as the sleeper first and passes once more (its own operation is then
        /// done), stops being the sleeper, gives the token back and hands what is left to the
        /// pool.
        fn caller(&self, sleeps: bool) {
            self.waiters.fetch_add(1, Ordering::AcqRel);
            if !self.token.take() {
                self.waiters.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            *lock(&self.work) = 0;
            if sleeps {
                *lock(&self.sleeper) = true;
                *lock(&self.work) = 0;
                *lock(&self.sleeper) = false;
            }
            self.waiters.fetch_sub(1, Ordering::AcqRel);
            if self.token.give_back(|| *lock(&self.work) > 0) {
                self.schedule();
            }
        }

        /// The pool thread (`State::round` and `Driver::serve`): takes the world from its
        /// inbox, lowering `queued`, and if it gets the token does all the work there is and
        /// gives the token back without looking (every post while it held it told the pool).
        fn pool_round(&self) {
            {
                let mut inbox = lock(&self.inbox);
                if inbox.requests == 0 {
                    return;
                }
                inbox.requests -= 1;
                inbox.queued = false;
            }
            if self.token.take() {
                *lock(&self.work) = 0;
                self.token.give_back(|| false);
            }
        }

        /// The pool thread brought to the world by a link or a timer, not by its inbox: it
        /// leaves the world to a caller that waits on it (`Driver::serve`'s `asked`).
        fn pool_event(&self) {
            if self.waiters.load(Ordering::Acquire) > 0 || !self.token.take() {
                return;
            }
            *lock(&self.work) = 0;
            self.token.give_back(|| false);
        }

        /// After every thread is done: work is left only if the pool was told to serve the
        /// world (its next round does the work).
        fn check(&self) {
            let left = *lock(&self.work);
            assert!(left == 0 || lock(&self.inbox).requests > 0, "work {left} left with the pool not told");
        }
    }

    /// Runs `f` on `w` in a thread of the model.
    fn on_thread(w: &Arc<World>, f: fn(&World)) -> loom::thread::JoinHandle<()> {
        let w = w.clone();
        loom::thread::spawn(move || f(&w))
    }

    /// A post racing with a caller that stops driving is never lost: it either wakes the
    /// caller before its last look, or reaches the pool.
    #[test]
    fn loom_token_a_post_while_a_caller_stops_driving_reaches_the_pool() {
        for sleeps in [false, true] {
            loom::model(move || {
                let w = World::new(1);
                let poster = on_thread(&w, World::post);
                w.caller(sleeps);
                poster.join().unwrap();
                w.check();
            });
        }
    }

    /// A caller, the pool woken by a link (which leaves the world to the waiting caller) and
    /// a poster: no work is stranded.
    #[test]
    fn loom_token_the_pool_woken_by_a_link_leaves_the_world_to_its_caller() {
        loom::model(|| {
            let w = World::new(1);
            let poster = on_thread(&w, World::post);
            let pool = on_thread(&w, World::pool_event);
            w.caller(true);
            poster.join().unwrap();
            pool.join().unwrap();
            w.check();
        });
    }

    /// A caller, the pool and a poster: the token is held by one at a time, and no work is
    /// stranded, whatever the order.
    #[test]
    fn loom_token_a_caller_the_pool_and_a_poster() {
        loom::model(|| {
            let w = World::new(0);
            *lock(&w.inbox) = Inbox { requests: 1, queued: true };
            let poster = on_thread(&w, World::post);
            let pool = on_thread(&w, World::pool_round);
            w.caller(true);
            poster.join().unwrap();
            pool.join().unwrap();
            w.check();
        });
    }
}
