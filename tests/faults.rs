//! Fault domains across real processes: killed, stopped and late peers, operation deadlines,
//! abort, containment, replacement under the same name, and no leaks over many cycles. Each
//! test that measures a detection time asserts a bound that holds on a loaded 2-core machine
//! and prints the figure it measured.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{spawn, Ctx};
use multiworld::{
    BrokenCause, ErrorKind, Event, ReduceOp, TransportChoice, UniqueId, World, WorldManager, WorldOptions, WorldState,
};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[
        ("kill_survivor", kill_survivor),
        ("victim", victim),
        ("stop_survivor", stop_survivor),
        ("stream_partner", stream_partner),
        ("deadline", deadline),
        ("abort_waiters", abort_waiters),
        ("sent_then_left", sent_then_left),
        ("cycles", cycles),
        ("scenario_leader", scenario_leader),
        ("sender", sender),
        ("formation_survivor", formation_survivor),
        ("formation_victim", formation_victim),
        ("sleeper", sleeper),
        ("aborted_kept", aborted_kept),
    ]);
}

/// Timing-sensitive tests run one at a time, so that they load the machine less.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn pid_env(ctx: &Ctx) -> i32 {
    ctx.env("MW_TEST_VICTIM").parse().expect("victim pid")
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid of a process this test spawned.
    unsafe { libc::kill(pid, sig) };
}

/// A peer that joins and then waits in a receive that never completes, until its world breaks.
fn victim(ctx: &Ctx) {
    let m = WorldManager::new();
    let opts = WorldOptions::default().with_heartbeat(Duration::from_millis(100), Duration::from_secs(1));
    let w = m.init_world_with(&ctx.arg, ctx.id().into(), ctx.rank, 2, &opts).unwrap();
    // Take part in a large all-reduce if asked (the survivor kills us in its middle).
    if ctx.env("MW_TEST_ALLREDUCE") == "1" {
        let mut v = vec![1f32; 32 << 20];
        let _ = w.all_reduce_in_place(&mut v, ReduceOp::Sum);
        return;
    }
    let mut x = [0u8; 1];
    let e = w.recv(&mut x, 1 - ctx.rank).unwrap_err();
    println!("victim: world ended: {e}");
}

fn spawn_pair(survivor: &str, victim_env: &[(&str, String)], world: &str) -> Vec<common::Proc> {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let mut env = vec![("MW_TEST_ID", id.to_string()), ("MW_TEST_ARG", world.to_string())];
    env.extend(victim_env.iter().cloned());
    let v = spawn("victim", 1, 2, &env, &[]);
    env.push(("MW_TEST_VICTIM", v.pid().to_string()));
    let s = spawn(survivor, 0, 2, &env, &[]);
    vec![s, v]
}

/// SIGKILL the peer in the middle of a 128 MiB all-reduce; the pending operation and every
/// later one fail with `WorldBroken`, naming the world and the peer, at once: the closed socket
/// tells, long before any heartbeat timeout (3 s here). The bounds below hold on a loaded
/// 2-core machine; the latency itself is printed (tens of microseconds when idle).
fn kill_survivor(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = m.init_world(&ctx.arg, &ctx.id(), 0, 2).unwrap();
    let req = w.all_reduce_async(vec![1f32; 32 << 20], ReduceOp::Sum);
    let t0 = Instant::now();
    while w.stats().bytes_received == 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "no data arrived");
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(!req.test(), "the all-reduce finished before the kill");
    let killed = Instant::now();
    signal(pid_env(ctx), libc::SIGKILL);
    let e = req.wait().unwrap_err().error;
    let latency = killed.elapsed();
    println!("kill detected {:.2} ms after SIGKILL: {e}", latency.as_secs_f64() * 1e3);
    assert_eq!(e.kind(), ErrorKind::WorldBroken);
    assert!(matches!(e.broken_cause(), Some(BrokenCause::PeerClosed { peer: 1, .. })), "{e}");
    assert!(e.message().contains(&format!("'{}'", ctx.arg)) && e.message().contains("rank 1"), "{e}");
    assert!(latency < Duration::from_millis(500), "detection took {latency:?}");
    // Later operations fail at once, and the manager reported the break.
    let t = Instant::now();
    assert_eq!(w.barrier().unwrap_err().kind(), ErrorKind::WorldBroken);
    assert!(t.elapsed() < Duration::from_millis(500), "{:?}", t.elapsed());
    assert!(matches!(w.state(), WorldState::Broken(BrokenCause::PeerClosed { peer: 1, .. })));
    let ev = m.next_event(Some(Duration::from_secs(1)));
    assert!(matches!(ev, Some(Event::Ready { .. })), "{ev:?}");
    let ev = m.next_event(Some(Duration::from_secs(1)));
    assert!(
        matches!(&ev, Some(Event::Broken { name, cause: BrokenCause::PeerClosed { peer: 1, .. }, .. }) if *name == ctx.arg),
        "{ev:?}"
    );
}

/// Every world of the processes over RDMA, on the software provider (feature `rdma`).
#[cfg(feature = "rdma")]
const RDMA: [(&str, &str); 2] = [("MW_TRANSPORT", "rdma"), ("MW_RDMA_PROVIDER", "soft")];

#[test]
fn sigkill_mid_all_reduce_is_detected_at_once() {
    sigkill_mid_all_reduce(&[]);
}

#[test]
#[cfg(feature = "rdma")]
fn sigkill_mid_all_reduce_is_detected_at_once_over_rdma() {
    sigkill_mid_all_reduce(&RDMA);
}

fn sigkill_mid_all_reduce(extra: &[(&str, &str)]) {
    let _s = serial();
    let mut env = vec![("MW_TEST_ALLREDUCE", "1".to_string())];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let mut procs = spawn_pair("kill_survivor", &env, "killme");
    let mut survivor = procs.remove(0);
    let mut victim = procs.remove(0);
    let ok = survivor.wait_for(Duration::from_secs(60)).is_some_and(|s| s.success());
    victim.wait_for(Duration::from_secs(5));
    assert!(ok, "survivor failed:\n{}", survivor.log_text());
    println!("{}", survivor.log_text().lines().find(|l| l.contains("detected")).unwrap_or(""));
}

/// SIGSTOP the peer of world A while world B (with another process) streams: A's pending
/// receive fails after the heartbeat timeout (1 s here); B is not stalled meanwhile.
fn stop_survivor(ctx: &Ctx) {
    let m = WorldManager::new();
    let opts = WorldOptions::default().with_heartbeat(Duration::from_millis(100), Duration::from_secs(1));
    let a = m.init_world_with("A", ctx.id().into(), 0, 2, &opts).unwrap();
    let id_b: UniqueId = ctx.env("MW_TEST_ID_B").parse().unwrap();
    let b = m.init_world_with("B", id_b.into(), 0, 2, &opts).unwrap();
    let stop = AtomicBool::new(false);
    let (stamps, (latency, e)) = std::thread::scope(|s| {
        let t = s.spawn(|| {
            let mut stamps = Vec::new();
            let mut v = vec![0f32; 64 << 10];
            while !stop.load(Ordering::Relaxed) {
                b.recv(&mut v, 1).unwrap();
                stamps.push(Instant::now());
            }
            stamps
        });
        std::thread::sleep(Duration::from_millis(500));
        let pending = a.recv_async(vec![0u8; 16], 1);
        let stopped = Instant::now();
        signal(pid_env(ctx), libc::SIGSTOP);
        let e = pending.wait().unwrap_err().error;
        let latency = stopped.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let stamps = t.join().unwrap();
        (stamps, (latency, e))
    });
    signal(pid_env(ctx), libc::SIGCONT);
    println!("hang detected {:.0} ms after SIGSTOP: {e}", latency.as_secs_f64() * 1e3);
    assert!(matches!(e.broken_cause(), Some(BrokenCause::PeerUnresponsive { peer: 1, .. })), "{e}");
    // Silence is counted from the last heartbeat, up to one interval (100 ms) before the stop.
    assert!(latency >= Duration::from_millis(850) && latency < Duration::from_secs(3), "{latency:?}");
    // World B kept going while A stalled: no gap near the stall, plenty of messages.
    let start = *stamps.first().unwrap();
    let gaps: Vec<Duration> = stamps.windows(2).map(|w| w[1] - w[0]).collect();
    let max_gap = gaps.iter().max().copied().unwrap_or_default();
    println!(
        "world B: {} messages in {:.1} s, longest gap {:.1} ms while world A stalled",
        stamps.len(),
        (*stamps.last().unwrap() - start).as_secs_f64(),
        max_gap.as_secs_f64() * 1e3
    );
    assert!(max_gap < Duration::from_millis(800), "world B stalled for {max_gap:?}");
    assert!(stamps.len() > 100);
    assert_eq!(b.state(), WorldState::Ready);
    m.remove_world("A").unwrap();
}

/// Streams 256 KiB messages to rank 0 until its world ends.
fn stream_partner(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = m.init_world(&ctx.arg, &ctx.id(), 1, 2).unwrap();
    let v = vec![1f32; 64 << 10];
    while w.send(&v, 0).is_ok() {}
}

#[test]
fn sigstop_is_detected_at_the_heartbeat_timeout_and_other_worlds_go_on() {
    sigstop_with_another_world(&[]);
}

#[test]
#[cfg(feature = "rdma")]
fn sigstop_is_detected_at_the_heartbeat_timeout_and_other_worlds_go_on_over_rdma() {
    sigstop_with_another_world(&RDMA);
}

fn sigstop_with_another_world(extra: &[(&str, &str)]) {
    let _s = serial();
    let id_b = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let extra: Vec<(&str, String)> = extra.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let mut victim_env = vec![("MW_TEST_ID_B", id_b.to_string())];
    victim_env.extend(extra.iter().cloned());
    let mut procs = spawn_pair("stop_survivor", &victim_env, "A");
    let mut env = vec![("MW_TEST_ID", id_b.to_string()), ("MW_TEST_ARG", "B".to_string())];
    env.extend(extra);
    procs.push(spawn("stream_partner", 1, 2, &env, &[]));
    let logs = common::finish(&mut procs, Duration::from_secs(60));
    for l in logs[0].lines().filter(|l| l.contains("detected") || l.contains("world B")) {
        println!("{l}");
    }
}

/// An operation deadline: the receive times out with `Timeout`, the world is broken, and the
/// peer learns why.
fn deadline(ctx: &Ctx) {
    let m = WorldManager::new();
    let opts = WorldOptions::default().with_op_timeout(Some(Duration::from_millis(300)));
    let w = m.init_world_with("deadline", ctx.id().into(), ctx.rank, 2, &opts).unwrap();
    if ctx.rank == 0 {
        let t = Instant::now();
        let e = w.recv(&mut [0u8; 4], 1).unwrap_err();
        let took = t.elapsed();
        println!("deadline hit after {:.0} ms: {e}", took.as_secs_f64() * 1e3);
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(1500), "{took:?}");
        assert_eq!(w.barrier().unwrap_err().kind(), ErrorKind::WorldBroken);
        // Request-level deadline on another world behaves the same.
    } else {
        w.set_op_timeout(None);
        let e = w.recv(&mut [0u8; 4], 0).unwrap_err();
        assert!(
            matches!(e.broken_cause(), Some(BrokenCause::PeerAborted { peer: 0, reason }) if reason.contains("deadline")),
            "{e}"
        );
    }
}

#[test]
fn operation_deadline_gives_timeout_and_breaks_the_world() {
    common::run_ranks("deadline", 2, &[], Duration::from_secs(30));
}

/// abort() is local, non-blocking and idempotent, and wakes every waiter.
fn abort_waiters(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = m.init_world("abort", &ctx.id(), ctx.rank, 2).unwrap();
    if ctx.rank == 1 {
        let e = w.recv(&mut [0u8; 4], 0).unwrap_err();
        assert!(matches!(e.broken_cause(), Some(BrokenCause::PeerAborted { peer: 0, .. })), "{e}");
        return;
    }
    let before = common::fds_and_threads();
    let woke = std::thread::scope(|s| {
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let w = w.clone();
                s.spawn(move || {
                    let e = w.recv(&mut [0u8; 4], 1).unwrap_err();
                    (Instant::now(), e)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        w.abort();
        let call = t.elapsed();
        w.abort(); // idempotent
        println!("abort() returned in {:.1} us", call.as_secs_f64() * 1e6);
        assert!(call < Duration::from_millis(500), "abort blocked for {call:?}");
        waiters.into_iter().map(|h| h.join().unwrap()).map(|(at, e)| (at - t, e)).collect::<Vec<_>>()
    });
    for (after, e) in &woke {
        println!("waiter woke {:.2} ms after abort: {e}", after.as_secs_f64() * 1e3);
        assert!(matches!(e.broken_cause(), Some(BrokenCause::LocalAbort)), "{e}");
        assert!(*after < Duration::from_secs(1), "{after:?}");
    }
    m.remove_world("abort").unwrap();
    // The world's sockets are gone, and the waiter threads have exited (a loaded machine may
    // need a moment for that).
    let t0 = Instant::now();
    let mut after = common::fds_and_threads();
    while (after.0 >= before.0 || after.1 > before.1) && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
        after = common::fds_and_threads();
    }
    assert!(after.0 < before.0, "fds {before:?} -> {after:?}");
    assert!(after.1 <= before.1, "threads {before:?} -> {after:?}");
}

#[test]
fn abort_is_local_and_wakes_every_waiter() {
    common::run_ranks("abort_waiters", 2, &[], Duration::from_secs(30));
}

/// Many cycles of form, use, break, remove under one name: generations rise, and file
/// descriptors and threads come back to where they started.
fn cycles(ctx: &Ctx) {
    let n: usize = ctx.arg.parse().unwrap();
    let addr = ctx.env("MW_TEST_ADDR");
    let m = WorldManager::new();
    let mut baseline = None;
    let mut last_gen = 0;
    for i in 0..n {
        let w = m.init_world_at("cycle", &addr, ctx.rank, 2).unwrap();
        assert!(w.generation() > last_gen, "generation {} after {last_gen}", w.generation());
        last_gen = w.generation();
        let mut v = [i as u32; 8];
        w.all_reduce_in_place(&mut v, ReduceOp::Max).unwrap();
        assert_eq!(v, [i as u32; 8]);
        // Alternate who breaks the world; the other side sees it on its next call.
        if i % 2 == ctx.rank {
            w.abort();
        } else {
            let e = w.recv(&mut [0u8; 1], 1 - ctx.rank).unwrap_err();
            assert!(e.is_world_broken(), "{e}");
        }
        m.remove_world("cycle").unwrap();
        drop(w);
        if i == 0 {
            baseline = Some(settle(None));
        }
    }
    let base = baseline.unwrap();
    let end = settle(Some(base));
    println!("rank {}: {n} cycles, last generation {last_gen}, fds/threads {base:?} -> {end:?}", ctx.rank);
    assert_eq!(end, base, "leak after {n} cycles");
    assert_eq!(last_gen as usize, n);
}

/// Waits (at most 3 s) for threads that are finishing to exit; returns (fds, threads).
fn settle(target: Option<(usize, usize)>) -> (usize, usize) {
    let t0 = Instant::now();
    loop {
        let now = common::fds_and_threads();
        if target.is_none_or(|t| now == t) || t0.elapsed() > Duration::from_secs(3) {
            if target.is_none() {
                std::thread::sleep(Duration::from_millis(200));
                return common::fds_and_threads();
            }
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_thousand_break_and_replace_cycles_leak_nothing() {
    let port = common::free_port();
    let env = [("MW_TEST_ADDR", format!("127.0.0.1:{port}")), ("MW_TEST_ARG", "1000".to_string())];
    let mut procs: Vec<_> = (0..2).map(|r| spawn("cycles", r, 2, &env, &[])).collect();
    let logs = common::finish(&mut procs, Duration::from_secs(300));
    println!("{}", logs[0].lines().find(|l| l.contains("cycles")).unwrap_or(""));
}

/// A sender: streams numbered messages to rank 0 of its world until the world ends.
fn sender(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = m.init_world(&ctx.arg, &ctx.id(), 1, 2).unwrap();
    let mut k = 0u64;
    loop {
        let msg = vec![k; 16 << 10];
        if w.send(&msg, 0).is_err() {
            return;
        }
        k += 1;
    }
}

fn receive_loop(w: &World, stamps: &Mutex<Vec<Instant>>) -> multiworld::Error {
    let mut buf = vec![0u64; 16 << 10];
    let mut expect = 0u64;
    loop {
        if let Err(e) = w.recv(&mut buf, 1) {
            return e;
        }
        assert!(buf.iter().all(|x| *x == expect), "message {expect} corrupted in {}", w.name());
        expect += 1;
        stamps.lock().unwrap().push(Instant::now());
    }
}

/// The MultiWorld paper's scenario: a leader receives from two senders over world1 and world2;
/// sender 1 is killed; world2 goes on undisturbed; the leader replaces world1 with a new
/// sender under the same name.
fn scenario_leader(ctx: &Ctx) {
    let m = WorldManager::new();
    let ids: Vec<UniqueId> = ["MW_TEST_ID1", "MW_TEST_ID2"].iter().map(|k| ctx.env(k).parse().unwrap()).collect();
    let w1 = m.init_world("world1", &ids[0], 0, 2).unwrap();
    let w2 = m.init_world("world2", &ids[1], 0, 2).unwrap();
    let stamps2 = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let t2 = s.spawn(|| {
            let mut buf = vec![0u64; 16 << 10];
            let mut expect = 0u64;
            while !stop.load(Ordering::Relaxed) {
                w2.recv(&mut buf, 1).unwrap();
                assert!(buf.iter().all(|x| *x == expect));
                expect += 1;
                stamps2.lock().unwrap().push(Instant::now());
            }
        });
        let stamps1 = &*Box::leak(Box::new(Mutex::new(Vec::new())));
        let t1 = s.spawn(|| receive_loop(&w1, stamps1));
        std::thread::sleep(Duration::from_millis(500));
        let killed = Instant::now();
        signal(pid_env(ctx), libc::SIGKILL);
        let e = t1.join().unwrap();
        let latency = killed.elapsed();
        println!("world1 broke {:.2} ms after its sender was killed: {e}", latency.as_secs_f64() * 1e3);
        assert!(matches!(e.broken_cause(), Some(BrokenCause::PeerClosed { peer: 1, .. })), "{e}");
        assert!(latency < Duration::from_millis(500), "{latency:?}");
        // Replace world1: a new sender process, the same name, a new generation.
        m.remove_world("world1").unwrap();
        let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
        let mut p = spawn("sender", 1, 2, &[("MW_TEST_ID", id.to_string()), ("MW_TEST_ARG", "world1".into())], &[]);
        let t = Instant::now();
        let w1b = m.init_world("world1", &id, 0, 2).unwrap();
        println!("world1 replaced in {:.1} ms, generation {}", t.elapsed().as_secs_f64() * 1e3, w1b.generation());
        assert_eq!(w1b.generation(), 2);
        let stamps1b = Mutex::new(Vec::new());
        let mut buf = vec![0u64; 16 << 10];
        for k in 0..50u64 {
            w1b.recv(&mut buf, 1).unwrap();
            assert!(buf.iter().all(|x| *x == k));
            stamps1b.lock().unwrap().push(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        t2.join().unwrap();
        m.remove_world("world1").unwrap();
        p.wait_for(Duration::from_secs(10));
        // world2 was undisturbed: it kept receiving through the kill and the replacement.
        let st = stamps2.lock().unwrap();
        let around: Vec<&Instant> =
            st.iter().filter(|x| **x > killed && **x < killed + Duration::from_secs(1)).collect();
        let max_gap = st.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
        println!(
            "world2: {} messages in total, {} in the second after the kill, longest gap {:.1} ms",
            st.len(),
            around.len(),
            max_gap.as_secs_f64() * 1e3
        );
        assert!(!around.is_empty() && max_gap < Duration::from_millis(800), "{max_gap:?}");
    });
    let evs: Vec<Event> = std::iter::from_fn(|| m.try_next_event()).collect();
    assert!(evs.iter().any(|e| matches!(e, Event::Broken { name, generation: 1, .. } if name == "world1")), "{evs:?}");
    assert!(evs.iter().any(|e| matches!(e, Event::Ready { name, generation: 2 } if name == "world1")), "{evs:?}");
    assert!(!evs.iter().any(|e| matches!(e, Event::Broken { name, .. } if name == "world2")), "{evs:?}");
}

#[test]
fn multiworld_scenario_kill_one_sender_replace_it_the_other_goes_on() {
    let _s = serial();
    let id1 = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let id2 = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let s1 = spawn("sender", 1, 2, &[("MW_TEST_ID", id1.to_string()), ("MW_TEST_ARG", "world1".into())], &[]);
    let s2 = spawn("sender", 1, 2, &[("MW_TEST_ID", id2.to_string()), ("MW_TEST_ARG", "world2".into())], &[]);
    let env =
        [("MW_TEST_ID1", id1.to_string()), ("MW_TEST_ID2", id2.to_string()), ("MW_TEST_VICTIM", s1.pid().to_string())];
    let leader = spawn("scenario_leader", 0, 2, &env, &[]);
    let mut procs = vec![leader, s2];
    let mut s1 = s1;
    let logs = common::finish(&mut procs, Duration::from_secs(60));
    s1.wait_for(Duration::from_secs(1));
    for l in logs[0].lines().filter(|l| l.starts_with("world")) {
        println!("{l}");
    }
}

/// Formation with a peer that is killed at some point of it, or never arrives: the survivor
/// fails within its deadline and is left clean; the name then forms with a new peer.
fn formation_survivor(ctx: &Ctx) {
    let m = WorldManager::new();
    let opts = WorldOptions::default().with_timeout(Duration::from_secs(2));
    // The process's door opens with its first formation and stays for the process's life:
    // open it before counting.
    let warm = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    m.init_world("warm", &warm, 0, 1).unwrap();
    m.remove_world("warm").unwrap();
    let base = settle(None);
    let t = Instant::now();
    let r = m.init_world_with("f", ctx.id().into(), 0, 2, &opts);
    let took = t.elapsed();
    match &r {
        Err(e) => {
            println!("formation failed after {:.0} ms: {e}", took.as_secs_f64() * 1e3);
            assert!(matches!(e.kind(), ErrorKind::Timeout | ErrorKind::WorldBroken), "{e}");
            assert!(took < Duration::from_secs(4), "{took:?}");
            assert!(m.world("f").is_none());
        }
        Ok(w) => {
            // The peer died right after formation: the world breaks at once.
            let e = w.recv(&mut [0u8; 1], 1).unwrap_err();
            println!("formed, then broke: {e}");
            assert!(e.is_world_broken());
            m.remove_world("f").unwrap();
        }
    }
    drop(r);
    // Clean: the formation's thread, listener and sockets are gone.
    let t0 = Instant::now();
    while common::fds_and_threads() != base && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(common::fds_and_threads(), base);
    // The name forms again with a live peer.
    let id2: UniqueId = ctx.env("MW_TEST_ID2").parse().unwrap();
    let w = m.init_world("f", &id2, 0, 2).unwrap();
    w.barrier().unwrap();
}

fn formation_victim(ctx: &Ctx) {
    let m = WorldManager::new();
    if ctx.arg == "second" {
        let id2: UniqueId = ctx.env("MW_TEST_ID2").parse().unwrap();
        m.init_world("f", &id2, 1, 2).unwrap().barrier().unwrap();
        return;
    }
    let _ = m.init_world("f", &ctx.id(), 1, 2);
    std::thread::sleep(Duration::from_secs(30));
}

#[test]
fn sigkill_during_formation_and_a_joiner_that_never_comes() {
    // Kill the joiner after 0, 2, 10, 40 ms (somewhere in formation), or never start it.
    for delay in [None, Some(0u64), Some(2), Some(10), Some(40)] {
        let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
        let id2 = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
        let env = [("MW_TEST_ID", id.to_string()), ("MW_TEST_ID2", id2.to_string())];
        let surv = spawn("formation_survivor", 0, 2, &env, &[]);
        if let Some(ms) = delay {
            let mut v = spawn("formation_victim", 1, 2, &env, &[]);
            std::thread::sleep(Duration::from_millis(ms));
            v.signal(libc::SIGKILL);
            v.wait_for(Duration::from_secs(5));
        }
        let mut e2 = env.to_vec();
        e2.push(("MW_TEST_ARG", "second".into()));
        let second = spawn("formation_victim", 1, 2, &e2, &[]);
        let logs = common::finish(&mut [surv, second], Duration::from_secs(30));
        println!(
            "kill after {delay:?} ms: {}",
            logs[0].lines().find(|l| l.contains("formation") || l.contains("formed")).unwrap_or("")
        );
    }
}

/// Both ranks form a world, say so, and sleep 4 s (rank 1 is SIGSTOPped for 2 s of that by the
/// test), then all-reduce once. `MW_TEST_ARG`: `forgiving` gives rank 0 a 30 s heartbeat
/// timeout, so only the stalled rank 1 (1 s) could judge; `strict` gives both 1 s.
fn sleeper(ctx: &Ctx) {
    let m = WorldManager::new();
    let timeout = if ctx.arg == "forgiving" && ctx.rank == 0 { 30 } else { 1 };
    let opts = WorldOptions::default().with_heartbeat(Duration::from_millis(100), Duration::from_secs(timeout));
    let w = m.init_world_with("sleeper", ctx.id().into(), ctx.rank, 2, &opts).unwrap();
    println!("rank {} formed", ctx.rank);
    std::thread::sleep(Duration::from_secs(4));
    let mut v = vec![1f32; 1000];
    let r = w.all_reduce_in_place(&mut v, multiworld::ReduceOp::Sum);
    match r {
        Ok(()) => println!("rank {}: all-reduce ok", ctx.rank),
        Err(e) => println!("rank {}: all-reduce failed: {:?}", ctx.rank, e.broken_cause()),
    }
}

/// Runs two sleepers and SIGSTOPs rank 1 for 2 s once both formed; returns both logs.
fn stall_rank_1(mode: &str) -> Vec<String> {
    let _s = serial();
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let env = [("MW_TEST_ID", id.to_string()), ("MW_TEST_ARG", mode.to_string())];
    let mut procs: Vec<_> = (0..2).map(|r| spawn("sleeper", r, 2, &env, &[])).collect();
    let t0 = Instant::now();
    while !procs.iter().all(|p| p.log_text().contains("formed")) {
        assert!(t0.elapsed() < Duration::from_secs(30), "the sleepers did not form");
        std::thread::sleep(Duration::from_millis(10));
    }
    procs[1].signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(2));
    procs[1].signal(libc::SIGCONT);
    let logs = common::finish(&mut procs, Duration::from_secs(60));
    for l in logs.iter().flat_map(|l| l.lines()).filter(|l| l.contains("all-reduce")) {
        println!("{l}");
    }
    logs
}

#[test]
fn a_rank_resumed_after_sigstop_does_not_accuse_its_live_peer() {
    let logs = stall_rank_1("forgiving");
    assert!(logs[0].contains("rank 0: all-reduce ok"), "{}", logs[0]);
    assert!(logs[1].contains("rank 1: all-reduce ok"), "{}", logs[1]);
}

#[test]
fn a_rank_resumed_after_sigstop_reports_the_peer_that_gave_up_on_it() {
    let logs = stall_rank_1("strict");
    // Rank 0 rightly found rank 1 silent; rank 1 must report that rank 0 gave up on it (its
    // abort, or its closed link), not accuse rank 0 of a silence that was rank 1's own.
    assert!(logs[0].contains("PeerUnresponsive { peer: 1"), "{}", logs[0]);
    assert!(!logs[1].contains("PeerUnresponsive"), "{}", logs[1]);
    assert!(logs[1].contains("PeerAborted { peer: 0") || logs[1].contains("PeerClosed { peer: 0"), "{}", logs[1]);
}

/// A peer sends a message and leaves before the receive is posted, on shared memory and on TCP:
/// the receive, posted well after the peer's socket hung up (past several heartbeat
/// intervals), still gets the message; the next call reports that the peer left. Meanwhile the
/// receiver's process does not spin on the hung-up socket (its progress thread did, re-arming
/// the socket's hang-up for ever, while the ring still held the frame).
fn sent_then_left(ctx: &Ctx) {
    let transport = if ctx.arg == "tcp" { TransportChoice::Tcp } else { TransportChoice::Auto };
    let opts = WorldOptions::default()
        .with_transport(transport)
        .with_heartbeat(Duration::from_millis(100), Duration::from_secs(5));
    let m = WorldManager::with_defaults(opts);
    let w = m.init_world("left", &ctx.id(), ctx.rank, 2).unwrap();
    let msg: Vec<u8> = (0..16u8).map(|i| i * 3 + 1).collect();
    // Traffic first, so that a shared-memory ring has grown: the last message then waits in
    // a ring that is not full, where a receiver leaves it until its receive is posted.
    const WARM: usize = 20;
    if ctx.rank == 1 {
        for k in 0..WARM {
            w.send(&[k as u8; 16], 0).unwrap();
        }
        w.send(&msg, 0).unwrap();
        m.remove_world("left").unwrap();
        return;
    }
    let cpu = || {
        // SAFETY: a zeroed rusage is a valid place for the result.
        let u = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut u);
            u
        };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        tv(u.ru_utime) + tv(u.ru_stime)
    };
    for k in 0..WARM {
        let mut got = [0u8; 16];
        w.recv(&mut got, 1).unwrap();
        assert_eq!(got, [k as u8; 16]);
    }
    let (c0, t0) = (cpu(), Instant::now());
    std::thread::sleep(Duration::from_millis(1500));
    let busy = (cpu() - c0) / t0.elapsed().as_secs_f64();
    println!("receiver idle beside a peer that left: {:.1} % of a core", busy * 100.0);
    assert!(busy < 0.2, "the process spun while its peer's socket was hung up: {busy:.2} of a core");
    let mut got = vec![0u8; 16];
    w.recv(&mut got, 1).unwrap_or_else(|e| panic!("the message sent before leaving: {e}"));
    assert_eq!(got, msg);
    // Its close frame, or only its closed socket when the close frame found no room.
    let e = w.recv(&mut got, 1).unwrap_err();
    assert!(
        matches!(e.broken_cause(), Some(BrokenCause::PeerLeft { peer: 1 } | BrokenCause::PeerClosed { peer: 1, .. })),
        "{e}"
    );
    println!("{}: the message sent before leaving arrived; then: {e}", ctx.arg);
}

#[test]
fn a_message_sent_before_the_peer_left_is_still_received() {
    let _s = serial();
    for transport in ["shm", "tcp"] {
        let logs =
            common::run_ranks("sent_then_left", 2, &[("MW_TEST_ARG", transport.to_string())], Duration::from_secs(30));
        assert!(logs[0].contains("arrived"), "{}", logs[0]);
        for l in logs[0].lines().filter(|l| l.contains("idle beside") || l.contains("arrived")) {
            println!("{transport}: {l}");
        }
    }
}

/// Two ranks on shared memory, one world and no other, heartbeats every 500 ms with a 10 s
/// timeout: rank 0 aborts the world and keeps it (a broken world keeps its end of the pair's
/// socket, for a shrink) while rank 1 has nothing posted on it. Rank 1's idle world learns of
/// the abort at once from the link's end rung on the socket where the pool watches the idle
/// world's doorbells, else at its next heartbeat: well before the silence timeout, and before
/// rank 0's process ends (2 s).
fn aborted_kept(ctx: &Ctx) {
    let opts = WorldOptions::default().with_heartbeat(Duration::from_millis(500), Duration::from_secs(10));
    let m = WorldManager::with_defaults(opts);
    let w = m.init_world("kept", &ctx.id(), ctx.rank, 2).unwrap();
    w.barrier().unwrap();
    if ctx.rank == 0 {
        std::thread::sleep(Duration::from_millis(50));
        w.abort();
        std::thread::sleep(Duration::from_secs(2));
        return;
    }
    let took =
        common::wait_broken(&m, "kept", Duration::from_secs(5), "the idle world never learnt of its peer's abort");
    println!(
        "rank 1: the idle world broke {:.1} ms after the barrier (the abort came at 50 ms)",
        took.as_secs_f64() * 1e3
    );
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[test]
fn an_idle_world_learns_of_an_abort_its_peer_keeps_within_a_heartbeat() {
    let logs = common::run_ranks("aborted_kept", 2, &[], Duration::from_secs(30));
    for l in logs.iter().flat_map(|l| l.lines()).filter(|l| l.starts_with("rank ")) {
        println!("{l}");
    }
}
