//! A nearly full `/dev/shm` (a private mount namespace with a 1 MiB tmpfs, as in a container
//! with a small shared-memory allowance): a pair's segment starts with small rings (76 KiB),
//! so several worlds get one (nine, here) and the rest fall back to TCP and say so in their stats; rings
//! that cannot grow under traffic work on in their small form and count it; every world
//! delivers, and nothing dies of `SIGBUS`, also not a dup that finds no room for a lane. Needs root (`unshare -m`); elsewhere it prints why
//! it skipped.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{spawn, Ctx};
use multiworld::{ReduceOp, TransportKind, UniqueId, WorldManager};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[("runner", runner), ("crowded", crowded)]);
}

/// Worlds formed, one after the other, between the same two processes: several segments of
/// small rings fit in 1 MiB, the rest cannot, and none can grow to its full 2 MiB.
const WORLDS: usize = 16;
const LEN: usize = 1 << 18;

/// Inside the namespace: starts both ranks there, so they share its `/dev/shm`.
fn runner(_ctx: &Ctx) {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let env = [("MW_TEST_ID", id.to_string())];
    let mut procs: Vec<_> = (0..2).map(|r| spawn("crowded", r, 2, &env, &[])).collect();
    for l in common::finish(&mut procs, Duration::from_secs(90)).iter().flat_map(|l| l.lines()) {
        if l.starts_with("rank") {
            println!("{l}");
        }
    }
}

fn crowded(ctx: &Ctx) {
    let m = WorldManager::new();
    // Each world gets its own id from rank 0, passed over the first world... which itself
    // needs an id: the first comes from the parent, the others are made by rank 0 and sent.
    let first = m.init_world("crowded-0", &ctx.id(), ctx.rank, 2).unwrap();
    let mut worlds = vec![first];
    for w in 1..WORLDS {
        let mut text = [0u8; 256];
        if ctx.rank == 0 {
            let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap().to_string();
            text[..id.len()].copy_from_slice(id.as_bytes());
            worlds[0].send(&text, 1).unwrap();
        } else {
            worlds[0].recv(&mut text, 0).unwrap();
        }
        let id: UniqueId = std::str::from_utf8(&text).unwrap().trim_end_matches('\0').parse().unwrap();
        worlds.push(m.init_world(&format!("crowded-{w}"), &id, ctx.rank, 2).unwrap());
    }
    let peer = 1 - ctx.rank;
    let mut fallbacks = 0;
    let mut refused = 0;
    let mut kinds = Vec::new();
    for (w, world) in worlds.iter().enumerate() {
        let send: Vec<f32> = (0..LEN).map(|i| (i % 101) as f32 + (ctx.rank * 1000 + w) as f32).collect();
        let mut got = vec![0f32; LEN];
        world.all_reduce(&send, &mut got, ReduceOp::Sum).unwrap();
        let want = |i: usize| 2.0 * ((i % 101) as f32 + w as f32) + 1000.0;
        assert!(got.iter().enumerate().all(|(i, v)| *v == want(i)), "world {w}: wrong sum");
        let stats = world.stats();
        let kind = world.transports()[peer].unwrap();
        assert_eq!(stats.shm_fallbacks, u64::from(kind == TransportKind::Tcp), "world {w}: {stats:?}");
        fallbacks += stats.shm_fallbacks;
        refused += stats.shm_grow_refused;
        kinds.push(kind);
    }
    // A dup of the first world, with /dev/shm full: a lane whose pages cannot be reserved is
    // refused (not touched: that would be a SIGBUS), and the dup forms links of its own.
    let d = worlds[0].dup("crowded-dup").unwrap();
    let mut v = vec![ctx.rank as u64 + 1; 1024];
    d.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    assert!(v.iter().all(|x| *x == 3), "dup: wrong sum");
    println!("rank {}: a dup in a full /dev/shm has {} links on lanes", ctx.rank, d.stats().lane_links);
    // Neither rank leaves (closing every world) while the other still looks at them.
    worlds[0].barrier().unwrap();
    println!(
        "rank {}: worlds over {kinds:?}, {fallbacks} fell back to TCP, rings refused growth {refused} times",
        ctx.rank
    );
    assert!(kinds.iter().filter(|&&k| k == TransportKind::Shm).count() >= 4, "too few shm worlds: {kinds:?}");
    assert!(fallbacks >= 2, "expected the last worlds to find /dev/shm full: {kinds:?}");
    assert!(refused >= 1, "expected rings unable to grow in a full /dev/shm");
}

#[test]
fn full_dev_shm_falls_back_to_tcp_without_sigbus() {
    let probe = Command::new("unshare").args(["-m", "--propagation", "private", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        common::skipped(
            "full_dev_shm_falls_back_to_tcp_without_sigbus",
            "unshare -m is refused here (needs root): cannot make a small /dev/shm",
        );
        return;
    }
    let script = "mount -t tmpfs -o size=1m tmpfs /dev/shm && exec \"$@\"";
    let wrapper = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"];
    let mut p = vec![spawn("runner", 0, 1, &[], &wrapper)];
    for l in common::finish(&mut p, Duration::from_secs(120)).iter().flat_map(|l| l.lines()) {
        if l.starts_with("rank") {
            println!("{l}");
        }
    }
}
