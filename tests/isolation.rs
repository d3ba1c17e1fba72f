//! What a world shares with the rest of the process must never let it stall: a waker that
//! calls back into its world, a standard error that nobody reads, an abort while the world is
//! still forming, a busy world on the same progress thread.

mod common;

use std::future::Future;
use std::io::Read;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use common::Ctx;
use multiworld::{ErrorKind, ReduceOp, UniqueId, World, WorldManager, WorldOptions};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[
        ("unread_stderr", unread_stderr),
        ("unread_stderr_peer", unread_stderr_peer),
        ("busy_neighbour", busy_neighbour),
    ]);
}

/// Forms a two-rank world with both ranks in this process (two managers, as two C
/// communicators would be).
fn pair(name: &str) -> (WorldManager, WorldManager, World, World) {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let (m0, m1) = (WorldManager::new(), WorldManager::new());
    let o = WorldOptions::default();
    let f0 = m0.form(name, (&id).into(), 0, 2, &o);
    let f1 = m1.form(name, (&id).into(), 1, 2, &o);
    let (w0, w1) = (f0.wait().unwrap(), f1.wait().unwrap());
    (m0, m1, w0, w1)
}

/// A waker that, when woken, calls back into the world it waits on (as an executor that polls
/// inline does), then records that it got through.
struct Reentrant {
    world: World,
    through: AtomicUsize,
}

impl Wake for Reentrant {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let _ = self.world.state();
        let _ = self.world.stats();
        self.through.fetch_add(1, Ordering::SeqCst);
    }
}

/// The progress thread completes an awaited operation; the completion wakes the task's waker,
/// which calls into the same world. Woken under the world's lock, that deadlocked the world's
/// only driver for good.
#[test]
fn a_waker_that_calls_back_into_its_world_does_not_deadlock() {
    // Bounded: a deadlock fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        reentrant_waker();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("the world deadlocked in its waker"),
        r => r.expect("the test body panicked"),
    }
}

fn reentrant_waker() {
    let (_m0, _m1, w0, w1) = pair("reentrant");
    let peer = std::thread::spawn(move || {
        for _ in 0..20 {
            let mut out = vec![0f32; 1000];
            w1.all_reduce(&vec![2f32; 1000], &mut out, ReduceOp::Sum).unwrap();
        }
        w1
    });
    let waker_state = Arc::new(Reentrant { world: w0.clone(), through: AtomicUsize::new(0) });
    let waker = Waker::from(waker_state.clone());
    let mut cx = Context::from_waker(&waker);
    for round in 0..20 {
        let mut req = std::pin::pin!(w0.all_reduce_async(vec![1f32; 1000], ReduceOp::Sum));
        let end = Instant::now() + Duration::from_secs(10);
        let out = loop {
            if let Poll::Ready(r) = req.as_mut().poll(&mut cx) {
                break r.unwrap();
            }
            assert!(Instant::now() < end, "round {round}: the awaited all_reduce never completed");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(out.iter().all(|x| *x == 3.0), "round {round}");
    }
    let w1 = peer.join().unwrap();
    // The wakers ran, and got through their calls into the world.
    assert!(waker_state.through.load(Ordering::SeqCst) > 0, "no waker ran");
    assert_eq!(w0.stats().ops_completed, 20);
    drop(w1);
}

/// Rank 0 of two worlds with one peer, its standard error a pipe that nobody reads, already
/// full. World `a` breaks (the peer aborts it) while a call waits on it: the break is logged,
/// and the call must still return `WorldBroken` promptly; world `b` must keep working.
fn unread_stderr(ctx: &Ctx) {
    let m = WorldManager::new();
    let o = WorldOptions::default();
    let fa = m.form("a", ctx.env("MW_ADDR_A").as_str().into(), 0, 2, &o);
    let fb = m.form("b", ctx.env("MW_ADDR_B").as_str().into(), 0, 2, &o);
    let (a, b) = (fa.wait().unwrap(), fb.wait().unwrap());
    // Fill standard error until a write blocks: that thread then holds the stream's lock for
    // good, as a logger stuck on a stalled pipe would.
    let written = Arc::new(AtomicUsize::new(0));
    {
        let written = written.clone();
        std::thread::spawn(move || loop {
            eprintln!("{:>1023}", "filler");
            written.fetch_add(1, Ordering::SeqCst);
        });
    }
    let mut last = usize::MAX;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = written.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    println!("stderr blocked after {last} lines");
    let waiting = {
        let a = a.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16];
            let r = a.recv(&mut buf, 1);
            (r, Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    // Tell the peer to abort `a`, then keep `b` busy.
    let told = Instant::now();
    b.send(&[1u8], 1).unwrap();
    for i in 0..50 {
        let mut out = vec![0f32; 4096];
        b.all_reduce(&vec![i as f32; 4096], &mut out, ReduceOp::Sum).unwrap();
        assert!(out.iter().all(|x| *x == 2.0 * i as f32));
    }
    println!("world b: 50 all_reduces after the abort");
    let done = Arc::new(AtomicBool::new(false));
    {
        let done = done.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(20));
            if !done.load(Ordering::SeqCst) {
                println!("FAIL: the call on the broken world never returned");
                std::process::exit(3);
            }
        });
    }
    // A panic message would block on standard error too: failures are told on stdout.
    let check = |ok: bool, what: String| {
        if !ok {
            println!("FAIL: {what}");
            std::process::exit(4);
        }
    };
    let (r, at) = waiting.join().unwrap();
    let kind = r.as_ref().err().map(|e| e.kind());
    check(kind == Some(ErrorKind::WorldBroken), format!("the call on the aborted world returned {r:?}"));
    println!("world a: the waiting call returned {kind:?} after {:?}", at.saturating_duration_since(told));
    // The break was reported as an event too (after the two worlds' `Ready`).
    let broken = (0..3).any(|_| {
        matches!(m.next_event(Some(Duration::from_secs(5))), Some(multiworld::Event::Broken { ref name, .. }) if name == "a")
    });
    check(broken, "no Broken event for world a".into());
    done.store(true, Ordering::SeqCst);
    println!("OK");
}

fn unread_stderr_peer(ctx: &Ctx) {
    let m = WorldManager::new();
    let o = WorldOptions::default();
    let fa = m.form("a", ctx.env("MW_ADDR_A").as_str().into(), 1, 2, &o);
    let fb = m.form("b", ctx.env("MW_ADDR_B").as_str().into(), 1, 2, &o);
    let (a, b) = (fa.wait().unwrap(), fb.wait().unwrap());
    let mut go = [0u8; 1];
    b.recv(&mut go, 0).unwrap();
    a.abort();
    for i in 0..50 {
        let mut out = vec![0f32; 4096];
        b.all_reduce(&vec![i as f32; 4096], &mut out, ReduceOp::Sum).unwrap();
    }
    // Stay until rank 0 is done with `b`.
    std::thread::sleep(Duration::from_millis(500));
}

/// A process whose standard error nobody reads: a world that breaks there still fails its
/// pending call at once, and its other world keeps going. Before logging was queued, the
/// thread that broke the world blocked in the log write, holding the world, and the pending
/// call never returned.
#[test]
fn a_standard_error_nobody_reads_stalls_no_world() {
    let env = vec![
        ("MW_ADDR_A", format!("127.0.0.1:{}", common::free_port())),
        ("MW_ADDR_B", format!("127.0.0.1:{}", common::free_port())),
    ];
    let out = std::env::temp_dir().join(format!("mw-test-{}-unread-stderr.out", std::process::id()));
    let mut cmd = common::worker_command(&[]);
    cmd.env("MW_TEST_ROLE", "unread_stderr")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::piped());
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    // Held open and never read until the worker is done.
    let mut stderr = child.stderr.take().unwrap();
    let mut peer = common::spawn("unread_stderr_peer", 1, 2, &env, &[]);
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    let mut rest = Vec::new();
    let _ = stderr.read_to_end(&mut rest);
    peer.wait_for(Duration::from_secs(10));
    println!("{text}");
    assert!(status.is_some_and(|s| s.success()), "rank 0 failed ({status:?}):\n{text}\npeer:\n{}", peer.log_text());
    assert!(text.contains("stderr blocked after") && text.contains("OK"), "{text}");
}

/// Abandoning a formation whose other rank never comes returns at once, ends the formation
/// with `WorldBroken` and frees the name for a new formation at once (the formation's own
/// thread stops within a look, `bootstrap/link.rs`'s tests).
#[test]
fn aborting_a_formation_returns_at_once_and_frees_the_name() {
    let m = WorldManager::new();
    let o = WorldOptions::default().with_timeout(Duration::from_secs(30));
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let f = m.form("lonely", (&id).into(), 0, 2, &o);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!f.test(), "the formation finished without its peer");
    let t = Instant::now();
    f.abort();
    let took = t.elapsed();
    assert!(took < Duration::from_millis(500), "abort took {took:?}");
    let e = f.wait().expect_err("an abandoned formation");
    assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
    assert!(matches!(e.broken_cause(), Some(multiworld::BrokenCause::LocalAbort)), "{e}");
    // The name is free again: a new world of that name forms (with a peer this time).
    let id2 = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let m1 = WorldManager::new();
    let f1 = m1.form("lonely", (&id2).into(), 1, 2, &o);
    let w0 = m.init_world("lonely", &id2, 0, 2).unwrap();
    let w1 = f1.wait().unwrap();
    let mut out = vec![0u32; 10];
    std::thread::scope(|s| {
        s.spawn(|| w1.all_reduce(&[1u32; 10], &mut [0u32; 10], ReduceOp::Sum).unwrap());
        w0.all_reduce(&[2u32; 10], &mut out, ReduceOp::Sum).unwrap();
    });
    assert_eq!(out, vec![3u32; 10]);
    drop((w0, w1, m, m1));
}

/// `mwCommAbort` and `mwCommDestroy` on non-blocking communicators still forming (their other
/// rank never comes) return at once instead of waiting out the 30 s formation deadline.
#[test]
fn c_abort_and_destroy_of_a_forming_communicator_return_at_once() {
    use multiworld::ffi::*;
    for abort in [true, false] {
        let mut id = mwUniqueId { internal: [0; MW_UNIQUE_ID_BYTES] };
        // SAFETY: valid pointers to locals.
        unsafe {
            assert_eq!(mwGetUniqueId(&mut id), mwSuccess);
            let mut cfg: mwConfig_t = std::mem::zeroed();
            assert_eq!(mwConfigInit(&mut cfg), mwSuccess);
            cfg.blocking = 0;
            cfg.timeoutMs = 30_000;
            let mut comm: mwComm_t = std::ptr::null_mut();
            assert_eq!(mwCommInitRankConfig(&mut comm, 2, id, 0, &mut cfg), mwInProgress);
            std::thread::sleep(Duration::from_millis(100));
            let t = Instant::now();
            let r = if abort { mwCommAbort(comm) } else { mwCommDestroy(comm) };
            let took = t.elapsed();
            assert_eq!(r, mwSuccess);
            assert!(took < Duration::from_millis(500), "abort={abort}: took {took:?}");
            // The handle is gone.
            assert_eq!(mwCommDestroy(comm), mwInvalidArgument);
        }
    }
}

/// A deadline set once for a whole manager reaches its worlds, formed and to come: a receive
/// whose peer lives but never sends fails with `Timeout` instead of waiting for ever.
#[test]
fn a_manager_wide_operation_deadline_catches_a_peer_that_never_calls() {
    let (m0, _m1, w0, _w1) = pair("deadline-now");
    m0.set_op_timeout(Some(Duration::from_millis(300)));
    for w in [w0, {
        // Formed after the call: gets the deadline too.
        let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
        let m2 = WorldManager::new();
        let f = m2.form("deadline-later", (&id).into(), 1, 2, &WorldOptions::default());
        let w = m0.init_world("deadline-later", &id, 0, 2).unwrap();
        std::mem::forget((f.wait().unwrap(), m2));
        w
    }] {
        let t = Instant::now();
        let e = w.recv(&mut [0u8; 4], 1).expect_err("nobody sends");
        let took = t.elapsed();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{}: {e}", w.name());
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(10), "{}: {took:?}", w.name());
    }
}

/// Notes when it is woken.
struct Stamp(std::sync::Mutex<Option<Instant>>);

impl Wake for Stamp {
    fn wake(self: Arc<Self>) {
        *self.0.lock().unwrap() = Some(Instant::now());
    }
}

/// One progress thread (`MW_PROGRESS_THREADS=1`) drives a busy world, a one-rank C
/// communicator in non-blocking mode with 400 all-gathers of 16 MiB queued in one group (each
/// a copy, the same buffers for all: about half a second of work), and a quiet two-rank world with both ranks
/// in this process, which gets one small all-gather at a time. The quiet world's operation is
/// left to the pool: rank 0's request is polled once (it cannot complete: rank 1 has not
/// posted), then rank 1 posts without waiting, and nobody drives either until rank 0's waker
/// fires. That must happen within a few of the busy world's slices, not once its queue is
/// empty.
fn busy_neighbour(_ctx: &Ctx) {
    use multiworld::ffi::*;
    use std::ffi::c_void;
    const COUNT: usize = 4 << 20;
    const OPS: usize = 400;
    let (_qm0, _qm1, q0, q1) = pair("quiet");
    // SAFETY (every C call below): pointers to live locals and buffers; the buffers outlive
    // the operations, which are waited for before they are dropped.
    let mut cfg: mwConfig_t = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { mwConfigInit(&mut cfg) }, mwSuccess);
    cfg.blocking = 0;
    let mut id: mwUniqueId = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { mwGetUniqueId(&mut id) }, mwSuccess);
    let mut busy: mwComm_t = std::ptr::null_mut();
    assert_eq!(unsafe { mwCommInitRankConfig(&mut busy, 1, id, 0, &mut cfg) }, mwInProgress);
    let state = |comm| {
        let mut st = mwInProgress;
        assert_eq!(unsafe { mwCommGetAsyncError(comm, &mut st) }, mwSuccess);
        st
    };
    while state(busy) == mwInProgress {
        std::thread::sleep(Duration::from_millis(1));
    }
    let send = vec![1f32; COUNT];
    let mut recv = vec![0f32; COUNT];
    // One batch (a group): posts one by one would each wait for the pool's pass to let go of
    // the world.
    let queued = Instant::now();
    assert_eq!(unsafe { mwGroupStart() }, mwSuccess);
    for _ in 0..OPS {
        let (sp, rp) = (send.as_ptr() as *const c_void, recv.as_mut_ptr() as *mut c_void);
        assert_eq!(unsafe { mwAllGather(sp, rp, COUNT, mwFloat, busy, std::ptr::null_mut()) }, mwSuccess);
    }
    let r = unsafe { mwGroupEnd() };
    assert!(r == mwInProgress || r == mwSuccess, "{r}");
    let mut worst = Duration::ZERO;
    let mut measured = 0;
    while measured < 20 && state(busy) == mwInProgress {
        let stamp = Arc::new(Stamp(std::sync::Mutex::new(None)));
        let waker = Waker::from(stamp.clone());
        let mut r0 = Box::pin(q0.all_gather_async(vec![2f32; 4], vec![0f32; 8]));
        assert!(r0.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
        let t = Instant::now();
        let r1 = q1.all_gather_async(vec![3f32; 4], vec![0f32; 8]);
        let done = loop {
            if let Some(d) = *stamp.0.lock().unwrap() {
                break d;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "the quiet world's all-gather never completed");
            std::thread::sleep(Duration::from_micros(100));
        };
        worst = worst.max(done.saturating_duration_since(t));
        measured += 1;
        let want = [vec![2f32; 4], vec![3f32; 4]].concat();
        assert_eq!(common::block_on(r0).expect("quiet all-gather").1, want);
        assert_eq!(r1.wait().expect("quiet all-gather").1, want);
        std::thread::sleep(Duration::from_millis(2));
    }
    while state(busy) == mwInProgress {
        std::thread::sleep(Duration::from_millis(1));
    }
    let busy_for = queued.elapsed();
    assert_eq!(state(busy), mwSuccess);
    assert!(recv.iter().all(|x| *x == 1.0));
    assert_eq!(unsafe { mwCommDestroy(busy) }, mwSuccess);
    println!(
        "busy world: {OPS} copies of 16 MiB in {busy_for:?}; the quiet world's slowest of {measured} all-gathers meanwhile: {worst:?}"
    );
    // A slice is 1 ms and one of the busy world's passes copies one 16 MiB buffer: a bound that holds on a
    // loaded machine, far below the time the busy world stays busy.
    assert!(worst < Duration::from_millis(150), "the quiet world waited {worst:?} beside a busy one");
    assert!(measured >= 5, "the busy world's work ended before the quiet world was measured");
}

#[test]
fn a_busy_world_does_not_starve_a_quiet_one_on_its_progress_thread() {
    let logs =
        common::run_ranks("busy_neighbour", 1, &[("MW_PROGRESS_THREADS", "1".to_string())], Duration::from_secs(60));
    if let Some(line) = logs[0].lines().find(|l| l.contains("busy world:")) {
        println!("{line}");
    }
}
