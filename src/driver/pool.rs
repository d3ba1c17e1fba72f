//! The progress pool: a few threads, shared by every world of the process, that watch the
//! worlds' links and timers and drive the worlds that no caller drives.
//!
//! Each pool thread ([`Worker`]) owns an `epoll` instance, an inbox, a descriptor that wakes it
//! (`wake`), and, on its own stack, the worlds it watches and a heap of their timers. A world
//! is given to the least loaded thread when it forms and stays there. The thread:
//!
//! 1. sleeps in `epoll_wait` until a link reports, the inbox gets news, or the earliest timer
//!    is due (rounded up to a [`TIMER_GRAIN`] grid, so that the heartbeats of many worlds are
//!    served in one wake-up);
//! 2. serves each world that a link, the inbox or a timer named ([`Driver::serve`]): a bounded
//!    slice of passes, then the world's links armed again (one-shot, under the world's lock)
//!    and its next timer pushed on the heap;
//! 3. forgets a world once it is broken (its links are closed by then, which removes them from
//!    the `epoll` set).
//!
//! Events and inbox entries name a world by its key (the address of its driver), looked up in
//! the thread's own table: a stale key (a world forgotten meanwhile, whose address another
//! world may reuse) at worst costs one pass that finds nothing to do.
//!
//! **Adding a world quietly.** Waking the thread for a new world costs the forming thread a
//! context switch, tens of microseconds on a busy machine: more than a world made on lanes
//! costs in all. So a new world is added without waking the thread when nothing needs it
//! sooner than the thread wakes anyway: the forming thread arms the world's hang-up
//! descriptors in the thread's `epoll` set itself (a peer that dies wakes the thread at once,
//! which then finds the world in its inbox), and the thread is awake or sleeps until no later
//! than the world's first heartbeat (`Inbox::sleep`: the thread sets it under the inbox's lock
//! just before it sleeps, after looking whether the inbox is empty, and clears it when it
//! takes the inbox, so a quiet entry is always taken at the thread's next wake-up, which
//! comes by the instant the forming thread saw). Otherwise it is woken as before. A request to
//! serve a world wakes the thread unless a wake-up is already pending (`Inbox::told`), so a
//! quiet entry never holds one up.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::{Driver, Served};
use crate::api::error::{Error, Result};
use crate::sys::sync::{lock, Arc, Mutex, Ordering};
use crate::sys::{Epoll, EventFd};

/// Timers are served on this grid: a heartbeat a few milliseconds late costs nothing, and a
/// thousand worlds' heartbeats cost a few wake-ups instead of a thousand.
const TIMER_GRAIN: Duration = Duration::from_millis(20);
/// The key of the worker's own wake-up descriptor in its `epoll` set (no driver lives there).
const WAKE_KEY: u64 = u64::MAX;
/// Most pool threads started by default (`MW_PROGRESS_THREADS` overrides).
const DEFAULT_MAX_THREADS: usize = 4;

/// What a pool thread is told from outside.
enum Msg {
    /// Watch a new world.
    Add(Arc<Driver>),
    /// Serve the world with this key.
    Serve(u64),
}

/// What waits for a pool thread (`M` is [`Msg`]; the loom model below uses numbers).
struct Inbox<M> {
    msgs: Vec<M>,
    /// The thread was woken since it last took the inbox: a new message needs no other wake.
    told: bool,
    /// How the thread sleeps: `None` while it is awake (it looks at the inbox before it sleeps
    /// again), `Some(None)` with no deadline, `Some(Some(t))` until `t` at the latest.
    sleep: Option<Option<Instant>>,
}

impl<M> Default for Inbox<M> {
    fn default() -> Self {
        Inbox { msgs: Vec::new(), told: false, sleep: None }
    }
}

impl<M> Inbox<M> {
    /// Adds `m`; true when the thread must be woken for it. The thread takes the whole inbox
    /// after it consumed its wake-up, so a message added before that is taken, and one added
    /// after finds `told` lowered.
    fn push(&mut self, m: M) -> bool {
        self.msgs.push(m);
        !std::mem::replace(&mut self.told, true)
    }

    /// Adds `m` without waking the thread (a quiet add: something else wakes it in time).
    fn push_quietly(&mut self, m: M) {
        self.msgs.push(m);
    }

    /// What the thread takes once it consumed its wake-up; it is awake from now on.
    fn take(&mut self) -> std::vec::Drain<'_, M> {
        self.told = false;
        self.sleep = None;
        self.msgs.drain(..)
    }

    /// The thread is about to sleep until `until`: the instant to wait for (now, if the inbox
    /// holds something already).
    fn going_to_sleep(&mut self, until: Option<Instant>, now: Instant) -> Option<Instant> {
        let until = if self.msgs.is_empty() { until } else { Some(now) };
        self.sleep = Some(until);
        until
    }

    /// True when the thread takes this inbox by `due` without a wake-up (always, when there
    /// is no `due`): it is awake, or sleeps until no later than `due`.
    fn taken_by(&self, due: Option<Instant>) -> bool {
        match (self.sleep, due) {
            (None, _) | (_, None) => true,
            (Some(None), Some(_)) => false,
            (Some(Some(t)), Some(d)) => t <= d,
        }
    }
}

/// One pool thread, as the worlds see it.
pub(crate) struct Worker {
    epoll: Epoll,
    wake: EventFd,
    inbox: Mutex<Inbox<Msg>>,
    /// Worlds watched, for placing new ones.
    load: crate::sys::sync::AtomicU64,
}

impl Worker {
    /// Starts watching `d`, whose engine watches `watch` while idle: its hang-up descriptors,
    /// and the instant its first timer is due. Added quietly (the module's doc) when the thread
    /// wakes before that instant anyway and the descriptors can be armed from here.
    pub(crate) fn add(&self, d: Arc<Driver>, watch: &crate::engine::WaitSet) {
        self.load.fetch_add(1, Ordering::Relaxed);
        let key = d.key();
        let mut inbox = lock(&self.inbox);
        if inbox.taken_by(watch.deadline)
            && watch.fds.iter().all(|f| self.epoll.watch_once(f.fd, f.events, key).is_ok())
        {
            inbox.push_quietly(Msg::Add(d));
            return;
        }
        self.push(&mut inbox, Msg::Add(d));
    }

    /// Asks for the world `d` to be served, unless it already waits in the inbox.
    ///
    /// `Driver::queued` is read and changed under the inbox's lock only: the thread lowers it
    /// when it takes the inbox, before it tries the world's token, so a request that finds it
    /// raised is sure to be followed by that try (`loom_token_*` in `driver/mod.rs`).
    pub(crate) fn serve_soon(&self, d: &Driver) {
        let mut inbox = lock(&self.inbox);
        if d.queued.load(Ordering::Relaxed) {
            return;
        }
        d.queued.store(true, Ordering::Relaxed);
        self.push(&mut inbox, Msg::Serve(d.key()));
    }

    /// Pushes a message with the inbox locked; wakes the thread unless it was woken since it
    /// last took the inbox (`Inbox::push`).
    fn push(&self, inbox: &mut Inbox<Msg>, m: Msg) {
        if inbox.push(m) {
            self.wake.signal();
        }
    }

    fn inbox_empty(&self) -> bool {
        lock(&self.inbox).msgs.is_empty()
    }
}

/// The process's pool threads, started with the first world. A failed start (no descriptor
/// or thread to spare) is not remembered: the next world tries again, and threads that did
/// start are kept.
static POOL: std::sync::OnceLock<Mutex<Vec<Arc<Worker>>>> = std::sync::OnceLock::new();

/// Pool threads to start: `MW_PROGRESS_THREADS`, or one per core up to
/// [`DEFAULT_MAX_THREADS`]. Settled once per process, when the first world forms: the count
/// of cores reads the process's cgroup files, tens of microseconds that every new world
/// (`home`) would otherwise pay.
fn thread_count() -> usize {
    static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COUNT.get_or_init(|| {
        let cores = allowed_cores();
        std::env::var("MW_PROGRESS_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| (1..=64).contains(n))
            .unwrap_or_else(|| cores.clamp(1, DEFAULT_MAX_THREADS))
    })
}

/// The cores the ranks on this host may share: those this process may run on
/// ([`allowed_cores`]), or the host's online cores when that is one, since a process pinned to one core says only
/// where a launcher put it, not that its peers share that core.
pub(crate) fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| match allowed_cores() {
        1 => {
            // SAFETY: sysconf has no preconditions.
            let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
            usize::try_from(online).unwrap_or(1).max(1)
        }
        n => n,
    })
}

/// The cores this process may run on: its affinity and cgroup quota (which reading takes tens
/// of microseconds), read once per process.
fn allowed_cores() -> usize {
    static ALLOWED: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn start_worker(i: usize) -> std::io::Result<Arc<Worker>> {
    let epoll = Epoll::new()?;
    let wake = EventFd::new()?;
    epoll.watch(wake.fd(), libc::POLLIN, WAKE_KEY)?;
    let w = Arc::new(Worker { epoll, wake, inbox: Mutex::new(Inbox::default()), load: Default::default() });
    let me = w.clone();
    std::thread::Builder::new().name(format!("mw-progress-{i}")).spawn(move || run(&me))?;
    Ok(w)
}

/// The pool thread a new world, whose first timer is due at `due`, goes to: the one that
/// watches the fewest, preferring those that wake before `due` anyway (`Worker::add`).
pub(crate) fn home(due: Option<Instant>) -> Result<Arc<Worker>> {
    let mut workers = lock(POOL.get_or_init(|| Mutex::new(Vec::new())));
    while workers.len() < thread_count() {
        match start_worker(workers.len()) {
            Ok(w) => workers.push(w),
            Err(e) if workers.is_empty() => return Err(Error::system("starting the progress pool", e)),
            // Fewer threads than asked for serve as well, if more slowly.
            Err(e) => {
                warn!("progress pool: {} threads only ({e})", workers.len());
                break;
            }
        }
    }
    // The least loaded of the threads that wake before the world's first timer anyway (it is
    // then added without a wake-up), else the least loaded.
    let load = |w: &&Arc<Worker>| (!lock(&w.inbox).taken_by(due), w.load.load(Ordering::Relaxed));
    let w = workers.iter().min_by_key(load).expect("at least one thread");
    Ok(w.clone())
}

/// A world as its pool thread keeps it.
struct Watched {
    driver: Arc<Driver>,
    /// When it wants to be served next (its timers), if ever.
    timer: Option<Instant>,
    /// The instant of its entry on the heap, if it has one: a world keeps one entry, pushed
    /// again when it comes due early or an earlier time is wanted, so that the heap does not
    /// grow with the deadlines a busy world moves on every pass.
    queued_at: Option<Instant>,
    /// The descriptors and events armed for it and not reported since: arming them again
    /// would change nothing.
    armed: Vec<(RawFd, i16)>,
    /// One of them reported since it was last served.
    reported: bool,
    /// It was asked to be served (its inbox held it) since it was last served.
    asked: bool,
    /// Reports in a row after which serving it moved nothing: a descriptor that reports for
    /// ever (a hang-up the link cannot act on yet) is then left to the timers.
    idle_reports: u8,
}

/// Reports in a row with nothing moved before a world's descriptors are left unarmed until
/// its next timer.
const IDLE_REPORTS: u8 = 3;
/// How long such a world's descriptors stay unarmed (at most: its own timers come first).
const QUIET_FOR: Duration = Duration::from_millis(100);

/// The thread's own state.
struct State<'a> {
    me: &'a Worker,
    worlds: HashMap<u64, Watched>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Worlds to serve this round, and those that asked for another slice.
    due: Vec<u64>,
    again: Vec<u64>,
    epoch: Instant,
}

fn run(me: &Worker) {
    let mut st = State {
        me,
        worlds: HashMap::new(),
        timers: BinaryHeap::new(),
        due: Vec::new(),
        again: Vec::new(),
        epoch: Instant::now(),
    };
    let mut keys = Vec::new();
    loop {
        // A bug in one round must not stop the thread that every world here depends on.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| st.round(&mut keys)));
        if r.is_err() {
            warn!("progress pool: a round panicked; going on");
            keys.clear();
            // What the round had taken (reports, the inbox) may be lost: serve every world
            // again, arming its descriptors afresh.
            for (k, w) in st.worlds.iter_mut() {
                w.armed.clear();
                st.again.push(*k);
            }
        }
    }
}

impl State<'_> {
    fn round(&mut self, keys: &mut Vec<u64>) {
        let now = Instant::now();
        let wait_until = if self.again.is_empty() { self.next_wake() } else { Some(now) };
        let wait_until = lock(&self.me.inbox).going_to_sleep(wait_until, now);
        keys.clear();
        self.me.epoll.wait(keys, wait_until);
        self.due.append(&mut self.again);
        for &k in keys.iter() {
            if k == WAKE_KEY {
                self.me.wake.drain();
            } else if let Some(w) = self.worlds.get_mut(&k) {
                // Reported: its one-shot registrations are spent.
                w.armed.clear();
                w.reported = true;
                self.due.push(k);
            }
        }
        {
            let mut inbox = lock(&self.me.inbox);
            for m in inbox.take() {
                match m {
                    Msg::Add(d) => {
                        let k = d.key();
                        let w = Watched {
                            driver: d,
                            timer: None,
                            queued_at: None,
                            armed: Vec::new(),
                            reported: false,
                            asked: true,
                            idle_reports: 0,
                        };
                        self.worlds.insert(k, w);
                        self.due.push(k);
                    }
                    Msg::Serve(k) => {
                        if let Some(w) = self.worlds.get_mut(&k) {
                            // From here on a new request to serve it queues it again.
                            w.driver.queued.store(false, Ordering::Relaxed);
                            w.asked = true;
                            self.due.push(k);
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        while let Some(&Reverse((t, k))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(w) = self.worlds.get_mut(&k).filter(|w| w.queued_at == Some(t)) else { continue };
            w.queued_at = None;
            match w.timer {
                Some(want) if want <= now => {
                    w.timer = None;
                    self.due.push(k);
                }
                // It wants a later time now: its one entry moves there.
                Some(want) => {
                    w.queued_at = Some(want);
                    self.timers.push(Reverse((want, k)));
                }
                None => {}
            }
        }
        self.due.sort_unstable();
        self.due.dedup();
        let due = std::mem::take(&mut self.due);
        for (i, &k) in due.iter().enumerate() {
            self.serve(k, i + 1 == due.len());
        }
        self.due = due;
        self.due.clear();
    }

    /// When the earliest timer is due, on the grid.
    fn next_wake(&self) -> Option<Instant> {
        let Reverse((t, _)) = *self.timers.peek()?;
        let since = t.saturating_duration_since(self.epoch).as_nanos();
        let grain = TIMER_GRAIN.as_nanos();
        Some(self.epoch + Duration::from_nanos((since.div_ceil(grain) * grain) as u64))
    }

    /// Serves one world; `last`: no other world is due this round.
    fn serve(&mut self, k: u64, last: bool) {
        let Some(w) = self.worlds.get_mut(&k) else { return };
        let driver = w.driver.clone();
        let reported = std::mem::take(&mut w.reported);
        let asked = std::mem::take(&mut w.asked);
        let quiet = w.idle_reports >= IDLE_REPORTS;
        let mut arm_failed = false;
        let (epoll, armed, me) = (&self.me.epoll, &mut w.armed, self.me);
        let mut arm = |fds: &[libc::pollfd]| {
            if quiet || (armed.len() == fds.len() && armed.iter().zip(fds).all(|(a, f)| *a == (f.fd, f.events))) {
                return;
            }
            armed.clear();
            for f in fds {
                match epoll.watch_once(f.fd, f.events, k) {
                    Ok(()) => armed.push((f.fd, f.events)),
                    // Cannot happen with a valid open descriptor; watch by timer instead.
                    Err(e) => {
                        warn!("progress pool: cannot watch descriptor {}: {e}", f.fd);
                        arm_failed = true;
                    }
                }
            }
        };
        let alone = || last && me.inbox_empty();
        let served = driver.serve(reported, asked, &mut arm, &alone);
        let w = self.worlds.get_mut(&k).expect("served above");
        match served {
            Served::Forget => {
                debug!("progress pool: world '{}' is broken and no longer watched", driver.name);
                self.worlds.remove(&k);
                self.me.load.fetch_sub(1, Ordering::Relaxed);
            }
            Served::Again => {
                w.idle_reports = 0;
                self.again.push(k);
            }
            Served::Wait { until, moved } => {
                w.idle_reports = if reported && !moved { w.idle_reports.saturating_add(1) } else { 0 };
                // Unwatched descriptors (left to the timers, or not armable): look again soon.
                let now = Instant::now();
                let fallback = match (arm_failed, quiet) {
                    (true, _) => Some(now + TIMER_GRAIN),
                    (false, true) => Some(now + QUIET_FOR),
                    (false, false) => None,
                };
                w.timer = match (until, fallback) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if let Some(t) = w.timer.filter(|t| w.queued_at.is_none_or(|q| *t < q)) {
                    w.queued_at = Some(t);
                    self.timers.push(Reverse((t, k)));
                }
            }
        }
    }
}

/// Loom model of the inbox's wake-ups: run with
/// `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {
    use super::Inbox;
    use crate::sys::sync::{lock, Arc, Condvar, Mutex};

    /// The thread's wake-up descriptor: a flag and a condition variable.
    struct Pool {
        inbox: Mutex<Inbox<u32>>,
        wake: Mutex<bool>,
        cv: Condvar,
    }

    impl Pool {
        fn signal(&self) {
            *lock(&self.wake) = true;
            self.cv.notify_one();
        }

        fn push(&self, m: u32) {
            let wake = lock(&self.inbox).push(m);
            if wake {
                self.signal();
            }
        }
    }

    /// A quiet add and two requests from two threads, with the thread sleeping until woken
    /// and taking the inbox after each wake-up: every request is taken (no lost wake-up would
    /// leave the thread asleep with one in the inbox: loom reports that as a deadlock), and
    /// the quiet add with or before the request that follows it.
    #[test]
    fn loom_pool_inbox_never_loses_a_request() {
        loom::model(|| {
            let p = Arc::new(Pool { inbox: Mutex::new(Inbox::default()), wake: Mutex::new(false), cv: Condvar::new() });
            let a = {
                let p = p.clone();
                loom::thread::spawn(move || {
                    lock(&p.inbox).push_quietly(1);
                    p.push(2);
                })
            };
            let b = {
                let p = p.clone();
                loom::thread::spawn(move || p.push(4))
            };
            let mut got = 0;
            while got & 6 != 6 {
                let mut w = lock(&p.wake);
                while !*w {
                    w = p.cv.wait(w).unwrap();
                }
                *w = false;
                drop(w);
                got |= lock(&p.inbox).take().fold(0, |m, x| m | x);
            }
            assert_eq!(got, 7, "the quiet add came with the request after it");
            a.join().unwrap();
            b.join().unwrap();
        });
    }
}
