//! The cap on early frames held by a whole process (`MW_EARLY_FRAMES_MAX_MB`), across real
//! processes: a world whose receiver is late fills the cap and its link stops being read (its
//! sender waits), another world of the same processes still delivers, and once the late
//! receives are posted every byte arrives as sent. And two ranks that both send before they
//! receive, on shared memory without heartbeats (nothing else would wake a stuck side): each
//! keeps the other's early frames moving, so no round waits.

mod common;

use std::time::Duration;

use common::Ctx;
use multiworld::{TransportChoice, UniqueId, WorldManager, WorldOptions};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[("late", late), ("crossing", crossing)]);
}

const MSG: usize = 1 << 20;
const FLOOD: usize = 4;

fn message(k: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) ^ (k * 7919)) as u8).collect()
}

fn late(ctx: &Ctx) {
    // TCP, read (and kept, if early) at every pass, and an idle world passes at each of its
    // heartbeats: frequent ones here, so that the flood is read while rank 1 sleeps.
    let opts = WorldOptions::default()
        .with_transport(TransportChoice::Tcp)
        .with_heartbeat(Duration::from_millis(50), Duration::from_secs(3));
    let m = WorldManager::with_defaults(opts);
    let a = m.init_world("flooded", &ctx.id(), ctx.rank, 2).unwrap();
    let mut text = [0u8; 256];
    if ctx.rank == 0 {
        let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap().to_string();
        text[..id.len()].copy_from_slice(id.as_bytes());
        a.send(&text, 1).unwrap();
    } else {
        a.recv(&mut text, 0).unwrap();
    }
    let id: UniqueId = std::str::from_utf8(&text).unwrap().trim_end_matches('\0').parse().unwrap();
    let b = m.init_world("other", &id, ctx.rank, 2).unwrap();
    if ctx.rank == 0 {
        // Four 1 MiB messages on `flooded` that rank 1 receives only later, then one on
        // `other`, which rank 1 takes first.
        let sends: Vec<_> = (0..FLOOD).map(|k| a.send_async(message(k, MSG), 1)).collect();
        b.send(&message(99, 256 << 10), 1).unwrap();
        for s in sends {
            s.wait().unwrap();
        }
    } else {
        std::thread::sleep(Duration::from_millis(300));
        let mut got = vec![0u8; 256 << 10];
        b.recv(&mut got, 0).unwrap();
        assert!(got == message(99, 256 << 10), "the other world's message");
        let paused = a.stats().early_frames_paused;
        assert!(paused > 0, "the flooded world never hit the process's cap: {:?}", a.stats());
        for k in 0..FLOOD {
            let mut got = vec![0u8; MSG];
            a.recv(&mut got, 0).unwrap();
            assert!(got == message(k, MSG), "message {k} of the flooded world");
        }
        println!("late receiver: the flooded world paused its link in {paused} passes; all delivered");
    }
    a.barrier().unwrap();
}

#[test]
fn a_process_caps_its_early_frames_and_loses_nothing() {
    let env = [("MW_EARLY_FRAMES_MAX_MB", "1".to_string())];
    let logs = common::run_ranks("late", 2, &env, Duration::from_secs(60));
    assert!(logs[1].contains("all delivered"), "{}", logs[1]);
}

/// Both ranks send a message larger than a ring, then receive the other's, round after round,
/// on shared memory with heartbeats off.
const CROSS: usize = 3 << 20;
const ROUNDS: usize = 30;

fn crossing(ctx: &Ctx) {
    let m = WorldManager::with_defaults(WorldOptions::default().without_heartbeat());
    let w = m.init_world("crossing", &ctx.id(), ctx.rank, 2).unwrap();
    let peer = 1 - ctx.rank;
    let t = std::time::Instant::now();
    for round in 0..ROUNDS {
        let out = message(round * 2 + ctx.rank, CROSS);
        w.send(&out, peer).unwrap();
        let mut got = vec![0u8; CROSS];
        w.recv(&mut got, peer).unwrap();
        assert!(got == message(round * 2 + peer, CROSS), "round {round}");
    }
    let took = t.elapsed();
    assert!(took < Duration::from_secs(20), "{ROUNDS} crossing rounds took {took:?}: a side waited to be woken");
    println!("crossing: {ROUNDS} rounds in {:.1} ms", took.as_secs_f64() * 1e3);
}

#[test]
fn ranks_that_both_send_first_never_wait_on_each_other() {
    common::run_ranks("crossing", 2, &[], Duration::from_secs(60));
}
