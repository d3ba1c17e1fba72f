//! A thousand worlds in one process, between real processes: 1000 two-rank worlds with one
//! peer process, and 250 with each of four. Every world is formed (at most 200 formations in
//! flight) and moves data, checked against values computed here; the process holds at most 8
//! threads of the crate's and about one descriptor per world; removing every world gives back
//! every descriptor, mapping and thread, twice over. With four peers, one is SIGKILLed: every
//! one of its 250 worlds reports `Broken` within a second, and the other 750 are untouched and
//! go on working.

mod common;

use std::time::{Duration, Instant};

use common::{spawn, Ctx};
use multiworld::{Rendezvous, UniqueId, World, WorldManager, WorldOptions, WorldState, UNIQUE_ID_BYTES};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[("hub", hub), ("peer", peer)]);
}

/// Formations in flight at once, on each side.
const IN_FLIGHT: usize = 200;

/// The heavy tests run one at a time: two of them at once on two cores would measure each
/// other.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// `MW_TEST_ARG`: `peers x worlds-per-peer`, e.g. `1x1000`.
fn shape(ctx: &Ctx) -> (usize, usize) {
    let (p, k) = ctx.arg.split_once('x').expect("PxK");
    (p.parse().expect("peers"), k.parse().expect("worlds per peer"))
}

fn name(peer: usize, k: usize) -> String {
    format!("w{peer}-{k}")
}

/// Forms the worlds named by `names` with the ids in `ids`, as `rank`, `IN_FLIGHT` at a time.
fn form_all(m: &WorldManager, names: &[String], ids: &[UniqueId], rank: usize) -> Vec<World> {
    let opts = WorldOptions::default();
    let mut worlds = Vec::with_capacity(names.len());
    for (ns, is) in names.chunks(IN_FLIGHT).zip(ids.chunks(IN_FLIGHT)) {
        let forming: Vec<_> =
            ns.iter().zip(is).map(|(n, id)| m.form(n, Rendezvous::Id(id.clone()), rank, 2, &opts)).collect();
        // Formations in flight are tasks of one formation thread, not threads.
        let during = crate_threads();
        assert!(during <= 8, "{during} threads of the crate's with {} formations in flight", ns.len());
        for f in forming {
            worlds.push(f.wait().expect("formation"));
        }
    }
    worlds
}

/// One all-reduce on world number `g` in round `round`: the hub adds `[g + 10000 round, 1]`,
/// the peer `[2g, round]`; both check `[3g + 10000 round, 1 + round]`.
fn exchange(w: &World, g: usize, round: usize, hub: bool) {
    let mut x = if hub { [(g + 10000 * round) as f32, 1.0] } else { [(2 * g) as f32, round as f32] };
    w.all_reduce_in_place(&mut x, multiworld::ReduceOp::Sum)
        .unwrap_or_else(|e| panic!("world {} round {round}: {e}", w.name()));
    assert_eq!(x, [(3 * g + 10000 * round) as f32, (1 + round) as f32], "world {} round {round}", w.name());
}

/// Threads of the crate's own (named `mw-...`) in this process.
fn crate_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|n| n.starts_with("mw-")))
                .count()
        })
        .unwrap_or(0)
}

/// Every thread of this process (a thread's name is set by the thread itself, a moment after
/// it starts: counting all is what a baseline needs).
fn all_threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// Mappings of `/dev/shm` files in this process (the shared-memory segments of its links; the
/// system-wide use of `/dev/shm` moves with every other process of the machine).
fn shm_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().filter(|l| l.contains("/dev/shm/")).count())
        .unwrap_or(0)
}

/// Waits up to 5 s for `f` to hold; true if it did.
fn eventually(f: impl Fn() -> bool) -> bool {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > Duration::from_secs(5) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Rank 0 of every world: makes the ids, hands each peer its own over a control world, forms
/// them all, checks data and footprint; with a victim, kills it and watches its worlds break.
fn hub(ctx: &Ctx) {
    let (peers, per) = shape(ctx);
    let n = peers * per;
    let m = WorldManager::new();
    let ctl = m.init_world("ctl", &ctx.id(), 0, peers + 1).unwrap();
    let victim: Option<i32> = ctx.env("MW_TEST_VICTIM").parse().ok();
    let names: Vec<String> = (0..peers).flat_map(|p| (0..per).map(move |k| name(p, k))).collect();
    // Two cycles of forming and removing all of them (one with a victim).
    let cycles = if victim.is_some() { 1 } else { 2 };
    // A first call, so that this thread's wake-up descriptor (one per calling thread) is there
    // before the count, and a first id, so that the process's rendezvous thread is (that id's
    // root then waits, with its listener, for a rank that never comes).
    ctl.barrier().unwrap();
    let _unused = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let (fds0, threads0, shm0) = (common::world_fds(), all_threads(), shm_mappings());
    for cycle in 0..cycles {
        let ids: Vec<UniqueId> = (0..n).map(|_| UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap()).collect();
        for p in 0..peers {
            let bytes: Vec<u8> = ids[p * per..(p + 1) * per].iter().flat_map(|id| id.to_bytes()).collect();
            ctl.send(&bytes, p + 1).unwrap();
        }
        let t = Instant::now();
        let worlds = form_all(&m, &names, &ids, 0);
        let formed = t.elapsed();
        for (g, w) in worlds.iter().enumerate() {
            exchange(w, g, 1, true);
        }
        // The roots of the ids end once their worlds formed.
        assert!(eventually(|| crate_threads() <= 8), "{} threads of the crate's for {n} worlds", crate_threads());
        let fds = common::world_fds() - fds0;
        println!(
            "cycle {cycle}: {n} worlds formed in {:.2} s; {} crate threads; {fds} descriptors ({:.2} per world)",
            formed.as_secs_f64(),
            crate_threads(),
            fds as f64 / n as f64
        );
        assert!(fds as f64 <= 1.2 * n as f64, "{fds} descriptors for {n} worlds");
        // Every world maps its pair's segment (what the leak check below must see go).
        assert!(shm_mappings() >= shm0 + n, "{} /dev/shm mappings for {n} worlds", shm_mappings() - shm0);
        if let Some(pid) = victim {
            let last = peers - 1;
            // SAFETY: kill(2) on the victim's pid, given by the test that spawned it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let t = Instant::now();
            let theirs = &worlds[last * per..];
            let all_broken = || theirs.iter().all(|w| matches!(w.state(), WorldState::Broken(_)));
            assert!(eventually(all_broken), "worlds of the killed peer still not broken after 5 s");
            let took = t.elapsed();
            println!("all {per} worlds of the killed peer broken {:.0} ms after the kill", took.as_secs_f64() * 1e3);
            assert!(took < Duration::from_secs(1), "{took:?}");
            let others = &worlds[..last * per];
            assert!(others.iter().all(|w| w.state() == WorldState::Ready), "a world of a live peer broke");
            for (g, w) in others.iter().enumerate() {
                exchange(w, g, 2, true);
            }
            println!("the other {} worlds moved data again", others.len());
            return;
        }
        remove_all(&m, &ctl, &names, worlds);
        // Everything the worlds held is back (the peer closed its ends too, after the barrier).
        let back = || common::world_fds() <= fds0 && all_threads() <= threads0 && shm_mappings() <= shm0;
        assert!(
            eventually(back),
            "after removing {n} worlds: fds {fds0} -> {}, threads {threads0} -> {}, /dev/shm mappings {shm0} -> {}",
            common::world_fds(),
            all_threads(),
            shm_mappings()
        );
        println!("cycle {cycle}: all {n} worlds removed; descriptors, threads and /dev/shm back");
    }
}

/// Rank 1 of its share of the worlds.
fn peer(ctx: &Ctx) {
    let (peers, per) = shape(ctx);
    let me = ctx.rank - 1;
    let m = WorldManager::new();
    let ctl = m.init_world("ctl", &ctx.id(), ctx.rank, peers + 1).unwrap();
    let doomed = ctx.env("MW_TEST_DOOMED") == "1";
    let names: Vec<String> = (0..per).map(|k| name(me, k)).collect();
    let cycles = if ctx.env("MW_TEST_KILL") == "1" { 1 } else { 2 };
    ctl.barrier().unwrap();
    for _ in 0..cycles {
        let mut bytes = vec![0u8; per * UNIQUE_ID_BYTES];
        ctl.recv(&mut bytes, 0).unwrap();
        let ids: Vec<UniqueId> = bytes.chunks(UNIQUE_ID_BYTES).map(|c| UniqueId::from_bytes(c).unwrap()).collect();
        let worlds = form_all(&m, &names, &ids, 1);
        for (k, w) in worlds.iter().enumerate() {
            exchange(w, me * per + k, 1, false);
        }
        if doomed {
            // Killed by the hub from here on.
            std::thread::sleep(Duration::from_secs(60));
            panic!("the victim was not killed");
        }
        if ctx.env("MW_TEST_KILL") == "1" {
            for (k, w) in worlds.iter().enumerate() {
                exchange(w, me * per + k, 2, false);
            }
            return;
        }
        remove_all(&m, &ctl, &names, worlds);
    }
}

/// Every process done with the worlds before any removes them (then each world closes
/// gracefully), and every process done removing when this returns.
fn remove_all(m: &WorldManager, ctl: &World, names: &[String], worlds: Vec<World>) {
    ctl.barrier().unwrap();
    drop(worlds);
    for nm in names {
        m.remove_world(nm).unwrap();
    }
    ctl.barrier().unwrap();
}

fn run(peers: usize, per: usize, kill: bool) -> String {
    let _s = serial();
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let arg = format!("{peers}x{per}");
    let common_env = |extra: &[(&'static str, String)]| {
        let mut v = vec![("MW_TEST_ID", id.to_string()), ("MW_TEST_ARG", arg.clone())];
        if kill {
            v.push(("MW_TEST_KILL", "1".to_string()));
        }
        v.extend(extra.iter().cloned());
        v
    };
    let mut procs: Vec<_> = (1..peers).map(|r| spawn("peer", r, peers + 1, &common_env(&[]), &[])).collect();
    let last = spawn("peer", peers, peers + 1, &common_env(&[("MW_TEST_DOOMED", (kill as u8).to_string())]), &[]);
    let hub_env = common_env(&if kill { vec![("MW_TEST_VICTIM", last.pid().to_string())] } else { vec![] });
    let hub = spawn("hub", 0, peers + 1, &hub_env, &[]);
    let mut last = last;
    let logs = if kill {
        let mut all = vec![hub];
        all.extend(procs);
        let logs = common::finish(&mut all, Duration::from_secs(240));
        let status = last.wait_for(Duration::from_secs(10));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGKILL), "the victim died of the kill");
        logs
    } else {
        procs.insert(0, hub);
        procs.push(last);
        common::finish(&mut procs, Duration::from_secs(240))
    };
    let text: String = logs[0].lines().filter(|l| !l.starts_with("multiworld[")).collect::<Vec<_>>().join("\n");
    println!("{text}");
    logs[0].clone()
}

#[test]
fn a_thousand_worlds_with_one_peer_formed_used_and_removed_twice() {
    let log = run(1, 1000, false);
    assert!(log.contains("cycle 1: all 1000 worlds removed"), "{log}");
}

#[test]
fn two_hundred_fifty_worlds_with_each_of_four_peers_and_one_peer_killed() {
    let log = run(4, 250, true);
    assert!(log.contains("the other 750 worlds moved data again"), "{log}");
}
