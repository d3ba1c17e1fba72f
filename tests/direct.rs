//! The direct path of lone small sends and receives on shared memory and TCP
//! (`src/engine/direct.rs`), across real processes: it is taken (counted in
//! `WorldStats::direct_ops`), it delivers every message in order and intact, it keeps its place
//! among collectives and non-blocking calls, a send that a full socket takes only in part still
//! arrives whole and before what follows it, and a call that differs from its peer's is still
//! refused with the general path's error rather than delivered.

mod common;

use std::time::{Duration, Instant};

use common::Ctx;
use multiworld::{ErrorKind, ReduceOp, WorldManager, WorldOptions};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[
        ("pingpong", pingpong),
        ("mismatch", mismatch),
        ("dies", dies),
        ("aborts", aborts),
        ("full_socket", full_socket),
        ("send_then_leave", send_then_leave),
        ("stuck_send", stuck_send),
    ]);
}

/// The world of a test worker: over TCP when the test sets `MW_TEST_TCP=1`.
fn world(m: &WorldManager, ctx: &Ctx, name: &str) -> multiworld::World {
    let opts = if ctx.env("MW_TEST_TCP") == "1" {
        WorldOptions::default().with_transport(multiworld::TransportChoice::Tcp)
    } else {
        WorldOptions::default()
    };
    m.init_world_with(name, ctx.id().into(), ctx.rank, 2, &opts).unwrap()
}

/// TCP with socket buffers small enough to fill with a few messages of the direct path.
fn small_socket_buffers() -> WorldOptions {
    WorldOptions::default().with_transport(multiworld::TransportChoice::Tcp).with_socket_buffer(Some(64 << 10))
}

fn tcp() -> [(&'static str, String); 1] {
    [("MW_TEST_TCP", "1".into())]
}

const ROUNDS: u64 = 20_000;

/// A payload that differs per round and per byte, computed the same way on both sides.
fn payload(round: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (round.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8).collect()
}

/// Ping-pong of small messages of changing sizes, with a collective and a non-blocking receive
/// mixed in now and then; prints the stats the test checks.
fn pingpong(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = world(&m, ctx, "direct");
    let peer = 1 - ctx.rank;
    for round in 0..ROUNDS {
        let len = [0usize, 1, 8, 100, 1024, 4096, 32 << 10][round as usize % 7];
        let want = payload(round, len);
        if (round % 2 == 0) == (ctx.rank == 0) {
            w.send(&want, peer).unwrap();
        } else {
            let mut got = vec![0xEEu8; len];
            w.recv(&mut got, peer).unwrap();
            assert!(got == want, "round {round}: {len} bytes differ");
        }
        if round % 1000 == 999 {
            // A collective between the sends: it must neither overtake nor be overtaken.
            let mut v = [round as f32 + ctx.rank as f32];
            w.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
            assert_eq!(v[0], 2.0 * round as f32 + 1.0);
            // A non-blocking receive posted first, then the blocking send the peer waits for:
            // the message after it must still land in order.
            if ctx.rank == 0 {
                let r = w.recv_async(vec![0u8; 16], peer);
                w.send(&payload(round + 1, 16), peer).unwrap();
                let got = r.wait().map_err(|f| f.error).unwrap();
                assert!(got == payload(round + 2, 16), "the posted receive got another message");
            } else {
                let mut got = vec![0u8; 16];
                w.recv(&mut got, peer).unwrap();
                assert!(got == payload(round + 1, 16));
                w.send(&payload(round + 2, 16), peer).unwrap();
            }
        }
    }
    let s = w.stats();
    println!("direct_ops={} ops_completed={}", s.direct_ops, s.ops_completed);
    w.barrier().unwrap();
}

fn stats_of(logs: &[String]) -> Vec<(u64, u64)> {
    logs.iter()
        .map(|l| {
            let line = l.lines().find(|l| l.starts_with("direct_ops=")).expect("stats line");
            let mut it = line.split_whitespace().map(|f| f.split_once('=').unwrap().1.parse::<u64>().unwrap());
            (it.next().unwrap(), it.next().unwrap())
        })
        .collect()
}

fn check_direct(logs: &[String]) {
    let stats = stats_of(logs);
    println!("(direct, completed) per rank: {stats:?}");
    for (rank, (direct, completed)) in stats.into_iter().enumerate() {
        // Every send can go direct (nothing else in flight: half of the rounds); receives go
        // direct when their frame arrives within the short look (nearly all on an idle
        // machine, fewer on a loaded one). Without the direct path: 0.
        assert!(direct >= ROUNDS / 4, "rank {rank}: only {direct} of {completed} operations went direct");
        assert!(direct <= completed);
    }
}

#[test]
fn small_sends_and_receives_take_the_direct_path_in_order() {
    check_direct(&common::run_ranks("pingpong", 2, &[], Duration::from_secs(120)));
}

#[test]
fn over_tcp_small_sends_and_receives_take_the_direct_path_in_order() {
    check_direct(&common::run_ranks("pingpong", 2, &tcp(), Duration::from_secs(180)));
}

/// Rank 0 sends 9 floats where rank 1 receives 8: the receive must fail with the general
/// path's error naming both calls (invalid usage, the world broken), not deliver.
fn mismatch(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = world(&m, ctx, "direct-mismatch");
    // A first exchange; then the differing frame waits in the ring when the receive comes, so
    // the direct path looks at it first and must leave it to the general path.
    if ctx.rank == 0 {
        w.send(&[1f32; 4], 1).unwrap();
        let _ = w.send(&[2f32; 9], 1);
    } else {
        let mut v = [0f32; 4];
        w.recv(&mut v, 0).unwrap();
        assert_eq!(v, [1.0; 4]);
        std::thread::sleep(Duration::from_millis(50));
        let mut v = [0f32; 8];
        let e = w.recv(&mut v, 0).unwrap_err();
        println!("mismatch: {e}");
        // The general path's verdict on calls that differ: invalid usage, naming both.
        assert_eq!(e.kind(), ErrorKind::InvalidUsage, "{e}");
        assert!(e.message().contains("count=9") && e.message().contains("count=8"), "{e}");
        assert_eq!(v, [0.0; 8], "nothing of the refused message was delivered");
    }
}

#[test]
fn a_receive_that_differs_from_its_send_is_refused_not_delivered() {
    common::run_ranks("mismatch", 2, &[], Duration::from_secs(60));
}

#[test]
fn over_tcp_a_receive_that_differs_from_its_send_is_refused_not_delivered() {
    common::run_ranks("mismatch", 2, &tcp(), Duration::from_secs(60));
}

/// Ping-pong until rank 1 kills itself (SIGKILL) after 1000 rounds, in the middle of the
/// exchange: rank 0's next call fails with `WorldBroken` promptly, whichever path it was on.
fn dies(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = world(&m, ctx, "direct-dies");
    let peer = 1 - ctx.rank;
    let mut buf = [0u8; 8];
    for round in 0u64.. {
        if ctx.rank == 1 && round == 1000 {
            // SAFETY: kill(2) on this very process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        let t = Instant::now();
        let r = if (round % 2 == 0) == (ctx.rank == 0) { w.send(&buf, peer) } else { w.recv(&mut buf, peer) };
        if let Err(e) = r {
            let took = t.elapsed();
            println!("round {round}: failed after {:.2} ms: {e}", took.as_secs_f64() * 1e3);
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
            assert!(round >= 1000, "failed at round {round}, before the peer died");
            assert!(took < Duration::from_secs(2), "{took:?}");
            assert!(w.stats().direct_ops > 500);
            return;
        }
        assert!(round < 100_000, "no failure although the peer died");
    }
}

#[test]
fn a_peer_killed_mid_exchange_fails_the_next_call() {
    killed_mid_exchange(false);
}

#[test]
fn over_tcp_a_peer_killed_mid_exchange_fails_the_next_call() {
    killed_mid_exchange(true);
}

fn killed_mid_exchange(tcp: bool) {
    survives("dies", ("MW_TEST_TCP", if tcp { "1" } else { "0" }.into()));
}

/// Runs `role` as rank 0, which must succeed, and rank 1, which kills itself; prints rank 0's
/// line about its failed call.
fn survives(role: &str, extra: (&str, String)) {
    let id = multiworld::UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let env = [("MW_TEST_ID", id.to_string()), extra];
    let mut survivor = common::spawn(role, 0, 2, &env, &[]);
    let mut victim = common::spawn(role, 1, 2, &env, &[]);
    let ok = survivor.wait_for(Duration::from_secs(60)).is_some_and(|s| s.success());
    victim.wait_for(Duration::from_secs(5));
    assert!(ok, "survivor failed:\n{}", survivor.log_text());
    println!("{}", survivor.log_text().lines().find(|l| l.contains("failed after")).unwrap_or(""));
}

/// A send or receive right after `abort()` fails, even where the direct path would take it:
/// the abort reaches the engine only at its next pass, and the direct path must not run ahead.
fn aborts(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = world(&m, ctx, "direct-abort");
    let peer = 1 - ctx.rank;
    // Warm: one exchange each way on the direct path.
    if ctx.rank == 0 {
        w.send(&[1u8; 4], peer).unwrap();
        w.recv(&mut [0u8; 4], peer).unwrap();
        w.abort();
        let e = w.send(&[7u8; 4], peer).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorldBroken, "send after abort: {e}");
        let e = w.recv(&mut [0u8; 4], peer).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorldBroken, "recv after abort: {e}");
        println!("after abort: {e}");
    } else {
        w.recv(&mut [0u8; 4], peer).unwrap();
        w.send(&[2u8; 4], peer).unwrap();
        let mut got = [0u8; 4];
        let r = w.recv(&mut got, peer);
        assert!(r.is_err(), "a message sent after the peer's abort arrived: {got:?}");
    }
}

#[test]
fn nothing_goes_through_after_abort() {
    common::run_ranks("aborts", 2, &[], Duration::from_secs(60));
}

#[test]
fn over_tcp_nothing_goes_through_after_abort() {
    common::run_ranks("aborts", 2, &tcp(), Duration::from_secs(60));
}

const FULL_SENDS: u64 = 200;
const FULL_LEN: usize = 16 << 10;

/// Over TCP with small socket buffers: rank 0 sends messages of the direct path's largest size
/// while rank 1 is not receiving yet, so its socket fills and takes frames only in part (the
/// direct path then leaves the rest to the driver), and makes no call for a second; then a
/// larger message on the general path. Rank 1 receives them all: each whole, in order, the
/// small ones without waiting for rank 0's next call (the driver writes what is left on its
/// own), and the large one last.
fn full_socket(ctx: &Ctx) {
    let m = WorldManager::new();
    let opts = small_socket_buffers();
    let w = m.init_world_with("direct-full", ctx.id().into(), ctx.rank, 2, &opts).unwrap();
    let big = payload(FULL_SENDS, 200 << 10);
    if ctx.rank == 0 {
        for round in 0..FULL_SENDS {
            w.send(&payload(round, FULL_LEN), 1).unwrap();
        }
        std::thread::sleep(Duration::from_secs(1));
        w.send(&big, 1).unwrap();
        println!("direct_ops={}", w.stats().direct_ops);
    } else {
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        for round in 0..FULL_SENDS {
            let mut got = vec![0u8; FULL_LEN];
            w.recv(&mut got, 0).unwrap();
            assert!(got == payload(round, FULL_LEN), "message {round} arrived damaged or out of order");
        }
        let took = t.elapsed();
        println!("small messages received in {took:?}");
        assert!(took < Duration::from_millis(800), "the last small message waited for the sender's next call");
        let mut got = vec![0u8; big.len()];
        w.recv(&mut got, 0).unwrap();
        assert!(got == big, "the general path's message after the direct ones differs");
    }
    w.barrier().unwrap();
}

#[test]
fn over_tcp_a_send_a_full_socket_takes_in_part_arrives_whole() {
    let logs = common::run_ranks("full_socket", 2, &[], Duration::from_secs(60));
    let line = logs[0].lines().find(|l| l.starts_with("direct_ops=")).expect("stats line");
    println!("rank 0: {line}");
    let direct: u64 = line["direct_ops=".len()..].parse().unwrap();
    // Sends of a fresh socket with room go direct; once it is full they go the general way.
    assert!(direct >= 1, "{line}");
}

/// Over TCP: a world that its sender removes right after its last send still delivers that
/// send whole. A probe world first finds how many messages go before a send has to wait (the
/// one that fills the socket, which takes it only in part); a fresh world then sends exactly that
/// many and is removed at once, while the receiver starts reading a second later.
fn send_then_leave(ctx: &Ctx) {
    let m = WorldManager::new();
    let opts = small_socket_buffers();
    let w = m.init_world_with("probe", ctx.id().into(), ctx.rank, 2, &opts).unwrap();
    let mut k = [0u64];
    if ctx.rank == 0 {
        for round in 0..64u64 {
            let t = Instant::now();
            w.send(&payload(round, FULL_LEN), 1).unwrap();
            if k[0] == 0 && t.elapsed() > Duration::from_millis(300) {
                k[0] = round;
            }
        }
    } else {
        std::thread::sleep(Duration::from_secs(1));
        for _ in 0..64 {
            w.recv(&mut vec![0u8; FULL_LEN], 0).unwrap();
        }
    }
    w.broadcast_in_place(&mut k, 0).unwrap();
    let k = k[0].max(1);
    m.remove_world("probe").unwrap();
    let id: multiworld::UniqueId = ctx.env("MW_TEST_ID2").parse().unwrap();
    let w = m.init_world_with("leave", id.into(), ctx.rank, 2, &opts).unwrap();
    if ctx.rank == 0 {
        for round in 0..k {
            w.send(&payload(round, FULL_LEN), 1).unwrap();
        }
        println!("sent {k}, direct_ops={}", w.stats().direct_ops);
        m.remove_world("leave").unwrap();
        std::thread::sleep(Duration::from_secs(2));
    } else {
        std::thread::sleep(Duration::from_secs(1));
        for round in 0..k {
            let mut got = vec![0u8; FULL_LEN];
            if let Err(e) = w.recv(&mut got, 0) {
                panic!("message {round} of {k} lost: {e}");
            }
            assert!(got == payload(round, FULL_LEN), "message {round} damaged");
        }
    }
}

#[test]
fn over_tcp_a_world_removed_right_after_a_send_delivers_it() {
    let id = multiworld::UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let logs = common::run_ranks("send_then_leave", 2, &[("MW_TEST_ID2", id.to_string())], Duration::from_secs(60));
    println!("{}", logs[0].lines().find(|l| l.starts_with("sent ")).unwrap_or(""));
}

/// Over TCP with small socket buffers, rank 1 never receives and kills itself (SIGKILL) after
/// half a second; rank 0 sends until a send fails. The send stuck on the full socket (the rest of
/// a frame taken in part, or a posted one) must fail with `WorldBroken` soon after the death,
/// not hang.
fn stuck_send(ctx: &Ctx) {
    let m = WorldManager::new();
    let opts = small_socket_buffers();
    let w = m.init_world_with("stuck", ctx.id().into(), ctx.rank, 2, &opts).unwrap();
    if ctx.rank == 1 {
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: kill(2) on this very process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    let t = Instant::now();
    for round in 0u64.. {
        if let Err(e) = w.send(&payload(round, FULL_LEN), 1) {
            let took = t.elapsed();
            println!("send {round} failed after {took:?}: {e}");
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
            assert!(took < Duration::from_secs(5), "{took:?}");
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "sends go on although the peer died");
    }
}

#[test]
fn over_tcp_a_send_stuck_on_a_full_socket_fails_when_the_peer_dies() {
    survives("stuck_send", ("MW_TEST_TCP", "1".into()));
}
