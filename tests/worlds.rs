//! Worlds across real processes: one process in several worlds at once, the address form,
//! non-blocking requests and futures, and formation that does not stall other worlds.

mod common;

use std::time::{Duration, Instant};

use common::{block_on, block_on_woken, spawn, Ctx};
use multiworld::{ReduceOp, Rendezvous, UniqueId, WorldManager, WorldOptions};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[
        ("hub", hub),
        ("spoke", spoke),
        ("address", address),
        ("async_ops", async_ops),
        ("busy_during_formation", busy_during_formation),
        ("late_joiner", late_joiner),
        ("awaited", awaited),
    ]);
}

const ROUNDS: usize = 20;
const LEN: usize = 1 << 18;

/// The data spoke `s` contributes in round `i`.
fn spoke_data(s: usize, i: usize) -> Vec<f32> {
    (0..LEN).map(|j| ((j + i * 7 + s * 13) % 97) as f32).collect()
}

/// Rank 0 of three worlds: moves data in all three at once, from three threads.
fn hub(_ctx: &Ctx) {
    let m = WorldManager::new();
    let ids: Vec<UniqueId> =
        (1..=3).map(|k| std::env::var(format!("MW_TEST_ID{k}")).unwrap().parse().unwrap()).collect();
    // Form the three worlds concurrently (non-blocking forms), then use them concurrently.
    let forms: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(k, id)| m.form(&format!("w{}", k + 1), id.into(), 0, 2, &WorldOptions::default()))
        .collect();
    let worlds: Vec<_> = forms.into_iter().map(|f| f.wait().unwrap()).collect();
    assert_eq!(m.worlds().len(), 3);
    std::thread::scope(|s| {
        for (k, w) in worlds.iter().enumerate() {
            s.spawn(move || {
                let spoke = k + 1;
                for i in 0..ROUNDS {
                    // all_reduce: hub contributes its round number, the spoke its data.
                    let mine = vec![i as f32; LEN];
                    let mut out = vec![0f32; LEN];
                    w.all_reduce(&mine, &mut out, ReduceOp::Sum).unwrap();
                    let want: Vec<f32> = spoke_data(spoke, i).iter().map(|x| x + i as f32).collect();
                    assert_eq!(out, want, "world {} round {i}", w.name());
                    // and a point-to-point message each way
                    let mut got = vec![0u32; 1000];
                    w.recv(&mut got, 1).unwrap();
                    assert!(got.iter().enumerate().all(|(j, v)| *v == (j * spoke + i) as u32));
                    w.send(&got, 1).unwrap();
                }
            });
        }
    });
    for w in &worlds {
        assert_eq!(w.stats().ops_completed, 3 * ROUNDS as u64);
    }
    println!("hub: {} rounds in each of 3 worlds, all correct", ROUNDS);
}

fn spoke(ctx: &Ctx) {
    let m = WorldManager::new();
    let k: usize = ctx.arg.parse().unwrap();
    let id: UniqueId = std::env::var(format!("MW_TEST_ID{k}")).unwrap().parse().unwrap();
    let w = m.init_world(&format!("w{k}"), &id, 1, 2).unwrap();
    for i in 0..ROUNDS {
        let mut out = vec![0f32; LEN];
        w.all_reduce(&spoke_data(k, i), &mut out, ReduceOp::Sum).unwrap();
        let msg: Vec<u32> = (0..1000).map(|j| (j * k + i) as u32).collect();
        w.send(&msg, 0).unwrap();
        let mut back = vec![0u32; 1000];
        w.recv(&mut back, 0).unwrap();
        assert_eq!(back, msg);
    }
}

#[test]
fn one_process_in_three_worlds_at_once() {
    let ids: Vec<UniqueId> = (0..3).map(|_| UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap()).collect();
    let env: Vec<(String, String)> =
        ids.iter().enumerate().map(|(k, id)| (format!("MW_TEST_ID{}", k + 1), id.to_string())).collect();
    let env_ref: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let mut procs = vec![spawn("hub", 0, 2, &env_ref, &[])];
    for k in 1..=3 {
        let mut e = env_ref.clone();
        e.push(("MW_TEST_ARG", k.to_string()));
        procs.push(spawn("spoke", 1, 2, &e, &[]));
    }
    common::finish(&mut procs, Duration::from_secs(120));
}

/// MultiWorld's address form: rank 0 listens on host:port.
fn address(ctx: &Ctx) {
    let m = WorldManager::new();
    let addr = ctx.env("MW_TEST_ADDR");
    let w = m.init_world_at("by-address", &addr, ctx.rank, ctx.size).unwrap();
    let mut v = vec![ctx.rank as u64 + 1; 4097];
    w.all_reduce_in_place(&mut v, ReduceOp::Prod).unwrap();
    let want: u64 = (1..=ctx.size as u64).product();
    assert!(v.iter().all(|x| *x == want));
    w.barrier().unwrap();
}

#[test]
fn address_form_with_three_ranks() {
    let addr = format!("127.0.0.1:{}", common::free_port());
    let env = [("MW_TEST_ADDR", addr)];
    let mut procs: Vec<_> = (0..3).map(|r| spawn("address", r, 3, &env, &[])).collect();
    common::finish(&mut procs, Duration::from_secs(60));
}

/// Non-blocking requests: both ranks post a large send and receive without a group and
/// without deadlock; all-reduce and formation as futures; `test` polling.
fn async_ops(ctx: &Ctx) {
    let m = WorldManager::new();
    let world = block_on(m.form("async", ctx.id().into(), ctx.rank, 2, &WorldOptions::default())).unwrap();
    let peer = 1 - ctx.rank;
    let n = 4 << 20; // 16 MiB each way: more than socket buffers and the early-frame queue
    let out: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(ctx.rank as u32 + 3)).collect();
    let s = world.send_async(out, peer);
    let r = world.recv_async(vec![0u32; n], peer);
    let got = r.wait().unwrap();
    assert!(got.iter().enumerate().all(|(i, v)| *v == (i as u32).wrapping_mul(peer as u32 + 3)));
    let sent = s.wait().unwrap();
    assert_eq!(sent.len(), n);
    // A future awaited on a minimal executor.
    let v = block_on(world.all_reduce_async(vec![ctx.rank as f64 + 0.5; 1000], ReduceOp::Sum)).unwrap();
    assert!(v.iter().all(|x| *x == 2.0));
    // test() until done.
    let req = world.all_gather_async(vec![ctx.rank as i32; 3], vec![0i32; 6]);
    let t0 = Instant::now();
    while !req.test() {
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_micros(100));
    }
    let (_, all) = req.wait().unwrap();
    assert_eq!(all, vec![0, 0, 0, 1, 1, 1]);
    // A request whose arguments are wrong completes at once with the error, buffers kept.
    let bad = world.all_gather_async(vec![1i32; 3], vec![0i32; 5]).wait().unwrap_err();
    assert_eq!(bad.error.kind(), multiworld::ErrorKind::InvalidArgument);
    assert_eq!(bad.buffers.1.len(), 5);
    block_on(world.barrier_async()).unwrap();
}

#[test]
fn non_blocking_requests_and_futures() {
    common::run_ranks("async_ops", 2, &[], Duration::from_secs(60));
}

/// Rank 0 of world A keeps all-reducing in a thread while it forms world B, whose other
/// rank arrives a second late. Traffic on A must go on during B's formation.
fn busy_during_formation(ctx: &Ctx) {
    let m = WorldManager::new();
    let a = m.init_world("A", &ctx.id(), 0, 2).unwrap();
    let id_b: UniqueId = ctx.env("MW_TEST_ID_B").parse().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let during = std::thread::scope(|s| {
        let t = s.spawn(|| {
            let mut stamps = Vec::new();
            let mut v = vec![1f32; 1024];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                a.all_reduce_in_place(&mut v, ReduceOp::Max).unwrap();
                stamps.push(Instant::now());
            }
            // Tell the other rank we are done: a value above anything it contributes.
            let mut end = vec![100f32; 1024];
            a.all_reduce_in_place(&mut end, ReduceOp::Max).unwrap();
            stamps
        });
        let t0 = Instant::now();
        let b = m.init_world("B", &id_b, 0, 2).unwrap();
        let t1 = Instant::now();
        assert!(t1 - t0 > Duration::from_millis(800), "B formed before its second rank started");
        let mut x = [3u8];
        b.broadcast_in_place(&mut x, 0).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let stamps = t.join().unwrap();
        stamps.iter().filter(|s| **s > t0 && **s < t1).count()
    });
    println!("world A completed {during} all-reduces while world B formed");
    assert!(during >= 20, "only {during} operations on world A during formation of B");
}

fn late_joiner(ctx: &Ctx) {
    let m = WorldManager::new();
    if ctx.arg == "A" {
        let a = m.init_world("A", &ctx.id(), 1, 2).unwrap();
        let mut v = vec![1f32; 1024];
        loop {
            a.all_reduce_in_place(&mut v, ReduceOp::Max).unwrap();
            if v[0] >= 100.0 {
                break;
            }
            v.fill(0.5);
        }
    } else {
        std::thread::sleep(Duration::from_millis(1000));
        let id_b: UniqueId = ctx.env("MW_TEST_ID_B").parse().unwrap();
        let b = m.init_world_with("B", Rendezvous::Id(id_b), 1, 2, &WorldOptions::default()).unwrap();
        let mut x = [0u8];
        b.broadcast_in_place(&mut x, 0).unwrap();
        assert_eq!(x[0], 3);
    }
}

#[test]
fn forming_a_world_does_not_stall_the_others() {
    let ida = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let idb = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let env = [("MW_TEST_ID", ida.to_string()), ("MW_TEST_ID_B", idb.to_string())];
    let mut procs = vec![spawn("busy_during_formation", 0, 2, &env, &[])];
    let mut e = env.to_vec();
    e.push(("MW_TEST_ARG", "A".into()));
    procs.push(spawn("late_joiner", 1, 2, &e, &[]));
    let mut e = env.to_vec();
    e.push(("MW_TEST_ARG", "B".into()));
    procs.push(spawn("late_joiner", 1, 2, &e, &[]));
    let logs = common::finish(&mut procs, Duration::from_secs(60));
    assert!(logs[0].contains("while world B formed"));
}

/// Each rank belongs to two worlds and awaits many small all-reduces on each from its own
/// thread, on an executor that polls again only when woken. Every one must complete promptly:
/// a post that races with the driver giving its token back must still get the world driven,
/// whatever the heartbeat interval (`MW_TEST_ARG`: `5s`, or `off`).
fn awaited(ctx: &Ctx) {
    const OPS: usize = 1500;
    let m = WorldManager::new();
    let opts = match ctx.arg.as_str() {
        "off" => WorldOptions::default().without_heartbeat(),
        _ => WorldOptions::default().with_heartbeat(Duration::from_secs(5), Duration::from_secs(30)),
    };
    let id_b: UniqueId = ctx.env("MW_TEST_ID_B").parse().unwrap();
    let worlds = [
        m.init_world_with("awaited-a", ctx.id().into(), ctx.rank, ctx.size, &opts).unwrap(),
        m.init_world_with("awaited-b", id_b.into(), ctx.rank, ctx.size, &opts).unwrap(),
    ];
    let limit = Duration::from_secs(1);
    let slowest = std::thread::scope(|s| {
        let threads: Vec<_> = worlds
            .iter()
            .enumerate()
            .map(|(w, world)| {
                s.spawn(move || {
                    let mut slowest = Duration::ZERO;
                    for i in 0..OPS {
                        let t = Instant::now();
                        let v = vec![(ctx.rank + i + w) as f32; 1000];
                        let got = block_on_woken(world.all_reduce_async(v, ReduceOp::Sum), limit)
                            .unwrap_or_else(|| panic!("world {w}: awaited all-reduce {i} not woken within {limit:?}"))
                            .unwrap();
                        let n = ctx.size;
                        let want = (n * (i + w) + n * (n - 1) / 2) as f32;
                        assert!(got.iter().all(|x| *x == want), "world {w} op {i}: {} != {want}", got[0]);
                        slowest = slowest.max(t.elapsed());
                    }
                    slowest
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).max().unwrap()
    });
    println!(
        "rank {}: {} awaited all-reduces on 2 worlds, slowest {:.2} ms",
        ctx.rank,
        2 * OPS,
        slowest.as_secs_f64() * 1e3
    );
}

fn run_awaited(heartbeat: &str) {
    let id_b = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let env = [("MW_TEST_ID_B", id_b.to_string()), ("MW_TEST_ARG", heartbeat.to_string())];
    let logs = common::run_ranks("awaited", 3, &env, Duration::from_secs(120));
    for l in logs.iter().flat_map(|l| l.lines()).filter(|l| l.contains("awaited all-reduces")) {
        println!("{l}");
    }
}

#[test]
fn awaited_operations_complete_without_heartbeat_ticks() {
    run_awaited("5s");
}

#[test]
fn awaited_operations_complete_with_heartbeats_off() {
    run_awaited("off");
}
