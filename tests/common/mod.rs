//! Support for tests that run real processes.
//!
//! A test spawns its ranks by re-running its own test executable (found at run time through
//! `std::env::current_exe`, so the executables also run on another machine) with the ignored
//! test `worker` selected and the role in the environment. `worker` dispatches to the role's
//! function; a panic there fails the process, which fails the test.

#![allow(dead_code)]

#[cfg(feature = "cuda")]
pub mod device;
pub mod etcd;
pub mod reference;

pub use multiworld::{DataType, ReduceOp};

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// What a worker process knows about itself.
pub struct Ctx {
    pub role: String,
    pub rank: usize,
    pub size: usize,
    /// Free-form argument from the parent (`MW_TEST_ARG`).
    pub arg: String,
}

impl Ctx {
    pub fn id(&self) -> multiworld::UniqueId {
        std::env::var("MW_TEST_ID").expect("MW_TEST_ID").parse().expect("a unique id")
    }
    pub fn env(&self, k: &str) -> String {
        std::env::var(k).unwrap_or_default()
    }
}

pub type Role = fn(&Ctx);

/// Entry point of a worker process: runs the role named by `MW_TEST_ROLE`.
pub fn worker_main(roles: &[(&str, Role)]) {
    let Ok(role) = std::env::var("MW_TEST_ROLE") else {
        return;
    };
    let ctx = Ctx {
        role: role.clone(),
        rank: std::env::var("MW_TEST_RANK").ok().and_then(|v| v.parse().ok()).unwrap_or(0),
        size: std::env::var("MW_TEST_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(1),
        arg: std::env::var("MW_TEST_ARG").unwrap_or_default(),
    };
    let f = roles.iter().find(|(n, _)| *n == role).unwrap_or_else(|| panic!("unknown role {role}")).1;
    f(&ctx);
}

/// Says that `test` skipped and why, on standard error as written by the process itself: the
/// test harness captures `println!` of passing tests, and a skip must show in every log. CI
/// counts these lines (`SKIPPED <test>: <why>`), since the harness counts a skip as a pass.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("SKIPPED {test}: {why}\n").as_bytes());
}

/// A spawned worker process and where its output goes.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub rank: usize,
    pub status: Option<ExitStatus>,
}

impl Proc {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we spawned and own.
        unsafe { libc::kill(self.pid(), sig) };
    }
    /// Waits until the process exits or `timeout` passes (then kills it); returns the status.
    pub fn wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.status = Some(s);
                return Some(s);
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The command that re-runs this test executable as a worker, optionally through a wrapper
/// (like `ip netns exec NAME`).
pub fn worker_command(wrapper: &[&str]) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = if wrapper.is_empty() {
        Command::new(&exe)
    } else {
        let mut c = Command::new(wrapper[0]);
        c.args(&wrapper[1..]).arg(&exe);
        c
    };
    cmd.args(["worker", "--exact", "--ignored", "--nocapture", "--test-threads=1", "-q"]);
    cmd
}

/// Spawns one worker process for `role` as `rank` of `size`.
pub fn spawn(role: &str, rank: usize, size: usize, env: &[(&str, String)], wrapper: &[&str]) -> Proc {
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = std::env::temp_dir().join(format!("mw-test-{}-{n}-{role}-{rank}.log", std::process::id()));
    let file = std::fs::File::create(&log).expect("log file");
    let mut cmd = worker_command(wrapper);
    cmd.env("MW_TEST_ROLE", role)
        .env("MW_TEST_RANK", rank.to_string())
        .env("MW_TEST_SIZE", size.to_string())
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup"))
        .stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawning a worker");
    Proc { child, log, rank, status: None }
}

/// Spawns `size` ranks of `role` sharing a fresh unique id, waits for all (at most
/// `timeout`), and fails the test with every rank's output if any rank failed.
pub fn run_ranks(role: &str, size: usize, env: &[(&str, String)], timeout: Duration) -> Vec<String> {
    let id = multiworld::UniqueId::new_on("127.0.0.1".parse().unwrap()).expect("unique id");
    let mut env: Vec<(&str, String)> = env.to_vec();
    env.push(("MW_TEST_ID", id.to_string()));
    let mut procs: Vec<Proc> = (0..size).map(|r| spawn(role, r, size, &env, &[])).collect();
    finish(&mut procs, timeout)
}

/// Waits for every process; on any failure or timeout prints all logs and panics.
pub fn finish(procs: &mut [Proc], timeout: Duration) -> Vec<String> {
    let end = Instant::now() + timeout;
    let mut ok = true;
    for p in procs.iter_mut() {
        let left = end.saturating_duration_since(Instant::now());
        match p.wait_for(left) {
            Some(s) if s.success() => {}
            Some(s) => {
                eprintln!("rank {} exited with {s}", p.rank);
                ok = false;
            }
            None => {
                eprintln!("rank {} did not finish within {timeout:?}", p.rank);
                ok = false;
            }
        }
    }
    let logs: Vec<String> = procs.iter().map(|p| p.log_text()).collect();
    if !ok {
        for (p, l) in procs.iter().zip(&logs) {
            eprintln!("----- rank {} ({}) -----\n{l}", p.rank, p.log.display());
        }
        // Each rank's panic message again, last: a log cut to its head and tail still shows
        // why the test failed.
        let why: Vec<String> = procs.iter().zip(&logs).flat_map(|(p, l)| panic_lines(p.rank, l)).collect();
        panic!("worker processes failed:\n{}", why.join("\n"));
    }
    for p in procs.iter() {
        let _ = std::fs::remove_file(&p.log);
    }
    logs
}

/// The message of each panic in a worker's log (the line after `panicked at`), by rank.
fn panic_lines(rank: usize, log: &str) -> Vec<String> {
    let lines: Vec<&str> = log.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("panicked at"))
        .map(|(i, _)| format!("rank {rank}: {}", lines.get(i + 1).copied().unwrap_or("")))
        .collect()
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on this thread (a minimal executor: no runtime needed).
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

struct FlagWaker {
    woken: std::sync::Mutex<bool>,
    cond: std::sync::Condvar,
}

impl Wake for FlagWaker {
    fn wake(self: Arc<Self>) {
        *self.woken.lock().unwrap() = true;
        self.cond.notify_all();
    }
}

/// Runs a future as a real executor does: it is polled again only after it woke its waker.
/// Returns `None` if it stayed pending, unwoken, for `limit` (a lost wake-up).
pub fn block_on_woken<F: Future>(f: F, limit: Duration) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let flag = Arc::new(FlagWaker { woken: std::sync::Mutex::new(false), cond: std::sync::Condvar::new() });
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    let end = Instant::now() + limit;
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
        let mut woken = flag.woken.lock().unwrap();
        while !*woken {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            woken = flag.cond.wait_timeout(woken, left).unwrap().0;
        }
        *woken = false;
    }
}

/// A free TCP port on 127.0.0.1 for a rank to listen on, chosen below the kernel's ephemeral
/// range (32768 and up by default), so that no outgoing connection of another test takes it
/// between the moment it is chosen and the moment it is bound.
pub fn free_port() -> u16 {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut x = seed | 1;
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20000 + (x % 12000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Open file descriptors and threads of this process, leaving out what the process keeps for
/// all its worlds once the first needed it: the progress pool's threads, their `epoll` sets
/// and wake-up descriptors, each calling thread's wake-up descriptor, and the rendezvous and
/// formation threads with theirs. What is counted is what a world or a formation owns:
/// sockets, listeners, mappings' files. The process's door (a listener opened by
/// its first formation on an address, for the life of the process) is counted: take a
/// baseline after a first formation.
pub fn fds_and_threads() -> (usize, usize) {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                    !["mw-progress", "mw-roots", "mw-form"].iter().any(|t| name.starts_with(t))
                })
                .count()
        })
        .unwrap_or(0);
    (world_fds(), threads)
}

/// Open descriptors of this process, less event and `epoll` descriptors: those belong to the
/// process's threads (the progress pool's, the rendezvous thread's, and each calling thread's
/// wake-up descriptor, made the first time it sleeps), not to worlds.
pub fn world_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let t = std::fs::read_link(e.path()).unwrap_or_default();
                    !matches!(t.to_string_lossy().as_ref(), "anon_inode:[eventfd]" | "anon_inode:[eventpoll]")
                })
                .count()
        })
        .unwrap_or(0)
}

/// Waits (at most `limit`) for world `name` of `m` to break; how long it took. Panics with the
/// events seen meanwhile if it does not, saying `what` did not happen.
pub fn wait_broken(m: &multiworld::WorldManager, name: &str, limit: Duration, what: &str) -> Duration {
    let t = Instant::now();
    let mut seen = Vec::new();
    while !seen.iter().any(|e| matches!(e, multiworld::Event::Broken { name: n, .. } if n == name)) {
        match m.next_event(Some(limit.saturating_sub(t.elapsed()))) {
            Some(e) => seen.push(e),
            None => panic!("{what}; saw {seen:?}"),
        }
    }
    t.elapsed()
}
