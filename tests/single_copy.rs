//! Shared memory's single-copy path across real processes: frames larger than a ring slot are
//! read straight from the sender's memory (`process_vm_readv`) when the peer proved at set-up
//! that it may and single copy is asked for (`MW_SHM_SINGLE_COPY=1`); the two-copy ring
//! carries everything otherwise. Data is
//! checked against a reference computed independently in each process, and a peer killed
//! while a large message is in flight fails the survivor's call without a hang or a crash.

mod common;

use std::time::{Duration, Instant};

use common::{spawn, Ctx};
use multiworld::{ErrorKind, ReduceOp, TransportKind, UniqueId, WorldManager};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[("exchange", exchange), ("streamer", streamer), ("cma_killer", cma_killer)]);
}

/// Message sizes around the slot (128 KiB) and the single-copy range (512 KiB to 8 MiB).
const SIZES: [usize; 7] = [8, (32 << 10) + 1, 200 << 10, 1 << 20, (3 << 20) + 5, 8 << 20, 16 << 20];

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64).map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ seed as u8).collect()
}

/// Both directions at every size, then an all-reduce whose chunks exceed a slot; prints what
/// the test checks.
fn exchange(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = m.init_world("sc", &ctx.id(), ctx.rank, 2).unwrap();
    assert_eq!(w.transports()[1 - ctx.rank], Some(TransportKind::Shm));
    for (i, &len) in SIZES.iter().enumerate() {
        for from in 0..2 {
            let seed = (i * 2 + from) as u64;
            if ctx.rank == from {
                w.send(&pattern(len, seed), 1 - from).unwrap();
            } else {
                let mut got = vec![0u8; len];
                w.recv(&mut got, from).unwrap();
                assert!(got == pattern(len, seed), "{len} bytes from rank {from} differ");
            }
        }
    }
    let n = 3 << 20;
    let mut v: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32) * (ctx.rank as f32 + 1.0)).collect();
    w.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    for (i, x) in v.iter().enumerate() {
        assert_eq!(*x, ((i % 1000) as f32) * 3.0, "element {i}");
    }
    println!("single_copy_bytes={}", w.stats().single_copy_bytes);
    w.barrier().unwrap();
}

fn copied(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .map(|log| {
            let l = log.lines().find_map(|l| l.strip_prefix("single_copy_bytes=")).expect("a count");
            l.trim().parse().unwrap()
        })
        .collect()
}

#[test]
fn large_messages_are_read_straight_from_the_senders_memory() {
    let logs = common::run_ranks("exchange", 2, &[("MW_SHM_SINGLE_COPY", "1".into())], Duration::from_secs(120));
    let each = copied(&logs);
    println!("single-copy bytes per rank: {each:?}");
    // The messages from 512 KiB to 8 MiB came by single copy (smaller and larger ones, and
    // reductions, through the ring: `ShmLink::max_payload`), in both directions.
    let p2p: u64 = SIZES.iter().filter(|&&s| (512 << 10..=8 << 20).contains(&s)).map(|&s| s as u64).sum();
    for (rank, &n) in each.iter().enumerate() {
        assert_eq!(n, p2p, "rank {rank}: bytes read by single copy");
    }
}

#[test]
fn without_single_copy_the_ring_carries_everything() {
    let logs = common::run_ranks("exchange", 2, &[], Duration::from_secs(120));
    assert_eq!(copied(&logs), vec![0, 0]);
}

/// The victim (rank 1): sends 8 MiB messages (`MW_TEST_VICTIM_DOES=send`) or receives them
/// until its world breaks or it is killed.
const MSG: usize = 8 << 20;

fn streamer(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = m.init_world("sck", &ctx.id(), ctx.rank, 2).unwrap();
    let mut buf = vec![7u8; MSG];
    loop {
        let r = if ctx.env("MW_TEST_VICTIM_DOES") == "send" { w.send(&buf, 0) } else { w.recv(&mut buf, 0) };
        if r.is_err() {
            return;
        }
    }
}

/// The survivor (rank 0): streams with the victim, a window of messages in flight, stops the
/// victim mid-stream (SIGSTOP, so that it cannot finish the window however fast it runs),
/// kills it, and checks that every pending call fails promptly with `WorldBroken`.
fn cma_killer(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = m.init_world("sck", &ctx.id(), 0, 2).unwrap();
    let victim: i32 = ctx.env("MW_TEST_VICTIM").parse().unwrap();
    let signal = |sig| {
        // SAFETY: kill(2) on the pid of the victim this test spawned.
        unsafe { libc::kill(victim, sig) };
    };
    let receiving = ctx.env("MW_TEST_VICTIM_DOES") == "send";
    let post = || if receiving { w.recv_async(vec![0u8; MSG], 1) } else { w.send_async(vec![1u8; MSG], 1) };
    // One whole message first, so that the next ones are known to run on the single-copy path.
    post().wait().map_err(|f| f.error).unwrap();
    for attempt in 0..20 {
        let base = w.stats().ops_completed;
        let window: Vec<_> = (0..16).map(|_| post()).collect();
        // Two messages into the window, stop the victim: what it published stays readable.
        let t0 = Instant::now();
        while w.stats().ops_completed < base + 2 {
            assert!(t0.elapsed() < Duration::from_secs(30), "the window does not move");
            std::thread::sleep(Duration::from_micros(100));
        }
        signal(libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(20));
        if w.stats().ops_completed == base + 16 {
            // The victim was faster than this thread: the window is done; again.
            signal(libc::SIGCONT);
            for r in window {
                r.wait().map_err(|f| f.error).unwrap();
            }
            continue;
        }
        signal(libc::SIGKILL);
        let killed = Instant::now();
        let mut failed = 0;
        for r in window {
            if let Err(f) = r.wait() {
                assert_eq!(f.error.kind(), ErrorKind::WorldBroken, "{}", f.error);
                if failed == 0 {
                    let side = if receiving { "receiving" } else { "sending" };
                    let ms = killed.elapsed().as_secs_f64() * 1e3;
                    println!("{side} side (attempt {attempt}): failed {ms:.2} ms after SIGKILL: {}", f.error);
                }
                failed += 1;
            }
        }
        let latency = killed.elapsed();
        assert!(failed > 0, "every message of the window completed although the peer was killed");
        assert!(latency < Duration::from_secs(2), "took {latency:?}");
        if receiving {
            assert!(w.stats().single_copy_bytes > 2 * MSG as u64);
        }
        return;
    }
    panic!("the victim finished every window before it could be stopped");
}

fn kill_mid_transfer(victim_role: &str) {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let mut env = vec![
        ("MW_TEST_ID", id.to_string()),
        ("MW_TEST_VICTIM_DOES", victim_role.to_string()),
        ("MW_SHM_SINGLE_COPY", "1".to_string()),
    ];
    let mut victim = spawn("streamer", 1, 2, &env, &[]);
    env.push(("MW_TEST_VICTIM", victim.pid().to_string()));
    let mut survivor = spawn("cma_killer", 0, 2, &env, &[]);
    let ok = survivor.wait_for(Duration::from_secs(90)).is_some_and(|s| s.success());
    victim.wait_for(Duration::from_secs(5));
    assert!(ok, "survivor failed:\n{}", survivor.log_text());
    println!("{}", survivor.log_text().lines().find(|l| l.contains("SIGKILL")).unwrap_or(""));
}

#[test]
fn a_sender_killed_while_its_message_is_read_fails_the_receiver() {
    kill_mid_transfer("send");
}

#[test]
fn a_receiver_killed_while_it_reads_fails_the_sender() {
    kill_mid_transfer("recv");
}
