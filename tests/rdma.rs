//! The RDMA transport's failures on the software provider (feature `rdma`), across real
//! processes: a queue pair forced into the error state, a completion that never arrives, a
//! provider that is missing, and ranks that disagree about RDMA. (The collective matrix runs
//! over RDMA in `tests/collectives.rs`, the kill and stop tests in `tests/faults.rs`.)

#![cfg(feature = "rdma")]

mod common;

use std::time::{Duration, Instant};

use common::Ctx;
use multiworld::{BrokenCause, ErrorKind, TransportChoice, TransportKind, UniqueId, WorldManager, WorldOptions};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[
        ("exchange", exchange),
        ("stream", stream),
        ("mixed", mixed),
        ("leave", leave),
        ("sink", sink),
        ("auto", auto),
    ]);
}

/// Prints the ranks' own lines about how the world ended.
fn show(logs: &[String]) {
    for l in logs.iter().flat_map(|l| l.lines()).filter(|l| l.starts_with("rank ")) {
        println!("{l}");
    }
}

fn rdma_options() -> WorldOptions {
    WorldOptions::default()
        .with_transport(TransportChoice::Rdma)
        .with_heartbeat(Duration::from_millis(100), Duration::from_secs(1))
}

fn env(fault_on_rank0: &str) -> Vec<(&'static str, String)> {
    vec![("MW_RDMA_PROVIDER", "soft".into()), ("MW_TEST_FAULT", fault_on_rank0.into())]
}

/// Rank 0 takes the fault asked for (`MW_SOFT_VERBS_FAULT` is read when a queue pair is
/// made, so it is set before the world forms, in rank 0 only).
fn form(ctx: &Ctx) -> (WorldManager, multiworld::World) {
    if ctx.rank == 0 {
        std::env::set_var("MW_SOFT_VERBS_FAULT", ctx.env("MW_TEST_FAULT"));
    }
    let m = WorldManager::new();
    let w = m.init_world_with("r", ctx.id().into(), ctx.rank, 2, &rdma_options()).unwrap();
    assert_eq!(w.transports()[1 - ctx.rank], Some(TransportKind::Rdma));
    (m, w)
}

/// Ping-pong until the world breaks; prints how it broke.
fn exchange(ctx: &Ctx) {
    let (_m, w) = form(ctx);
    let peer = 1 - ctx.rank;
    let mut buf = [0u8; 1024];
    let t = Instant::now();
    let e = loop {
        let r = if ctx.rank == 0 {
            w.send(&buf, peer).and_then(|_| w.recv(&mut buf, peer))
        } else {
            w.recv(&mut buf, peer).and_then(|_| w.send(&buf, peer))
        };
        if let Err(e) = r {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the fault never broke the world");
    };
    assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
    assert!(e.broken_cause().and_then(|c| c.peer()) == Some(peer) || ctx.rank == 0, "{e}");
    println!("rank {}: broke after {:?}: {e}", ctx.rank, t.elapsed());
    // Rank 0 stays a while, so that rank 1 learns of the failure from the queue pair, not from
    // rank 0's process ending.
    std::thread::sleep(Duration::from_millis(500));
}

/// A queue pair forced into the error state breaks the world on both ranks, and the cause
/// names the verbs failure.
#[test]
fn rdma_queue_pair_forced_into_error_breaks_the_world_on_both_ranks() {
    let logs = common::run_ranks("exchange", 2, &env("qp_error_after=50"), Duration::from_secs(60));
    show(&logs);
    assert!(logs[0].contains("RDMA") && logs[0].contains("error state"), "{}", logs[0]);
    assert!(logs[1].contains("broke after") && logs[1].contains("RDMA"), "{}", logs[1]);
}

/// Rank 0's port goes down (an asynchronous event; the peer is not told): rank 0's world breaks
/// with the event as its cause, and rank 1's breaks too (rank 0's link ends, which its control
/// connection shows).
#[test]
fn rdma_port_that_goes_down_breaks_the_world_with_the_event() {
    let logs = common::run_ranks("exchange", 2, &env("port_down_after=50"), Duration::from_secs(60));
    show(&logs);
    assert!(logs[0].contains("RDMA asynchronous event") && logs[0].contains("port 1 went down"), "{}", logs[0]);
    assert!(logs[1].contains("broke after"), "{}", logs[1]);
}

/// A write the peer refuses (a wrong remote key) comes back as the write's completion with
/// `RemoteAccess`; both ranks' worlds break, each with the verbs status.
#[test]
fn rdma_write_refused_by_the_peer_breaks_the_world_with_the_verbs_status() {
    let logs = common::run_ranks("exchange", 2, &env("bad_rkey_after=50"), Duration::from_secs(60));
    show(&logs);
    assert!(logs[0].contains("RDMA write: remote access error"), "{}", logs[0]);
    assert!(logs[1].contains("broke after") && logs[1].contains("RDMA"), "{}", logs[1]);
}

/// Rank 0 streams to rank 1; one of its writes never completes, so its staging slot never
/// frees and it stalls once it comes round to that slot, its heartbeats too: rank 1 declares
/// it unresponsive at the heartbeat timeout, and rank 0 learns the world ended.
fn stream(ctx: &Ctx) {
    let (_m, w) = form(ctx);
    let t = Instant::now();
    let v = vec![1u8; 4096];
    let e = if ctx.rank == 0 {
        loop {
            if let Err(e) = w.send(&v, 1) {
                break e;
            }
        }
    } else {
        let mut got = vec![0u8; 4096];
        loop {
            if let Err(e) = w.recv(&mut got, 0) {
                break e;
            }
        }
    };
    let took = t.elapsed();
    assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
    if ctx.rank == 1 {
        assert!(matches!(e.broken_cause(), Some(BrokenCause::PeerUnresponsive { peer: 0, .. })), "{e}");
    }
    assert!(took < Duration::from_secs(10), "took {took:?}");
    println!("rank {}: broke after {took:?}: {e}", ctx.rank);
}

#[test]
fn rdma_completion_that_never_arrives_is_caught_by_the_heartbeat() {
    show(&common::run_ranks("stream", 2, &env("lose_completion_after=5"), Duration::from_secs(60)));
}

/// One rank asks for RDMA (the one `MW_TEST_ARG` names), the other does not: neither falls back
/// to another transport. The rank that asked fails to form, saying why; the other either fails
/// too or finds its world broken at once.
fn mixed(ctx: &Ctx) {
    let m = WorldManager::new();
    let asks = ctx.arg.parse::<usize>().unwrap() == ctx.rank;
    let o = if asks { rdma_options() } else { WorldOptions::default().with_transport(TransportChoice::Tcp) };
    let o = o.with_timeout(Duration::from_secs(10));
    match m.init_world_with("mixed", ctx.id().into(), ctx.rank, 2, &o) {
        Err(e) => {
            assert!(e.message().contains("RDMA"), "{e}");
            println!("rank {}: {e}", ctx.rank);
        }
        Ok(w) => {
            assert!(!asks, "the rank that asked for RDMA formed a world without it");
            // Its link was made before the peer refused it: the world cannot stay usable.
            let e = w.barrier().expect_err("the peer refused the link");
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
            println!("rank {}: formed, then {e}", ctx.rank);
        }
    }
}

#[test]
fn ranks_that_disagree_about_rdma_fail_to_form_saying_why() {
    // The lower rank answers the higher one's offer: try both ways round.
    let mut env = env("");
    env.push(("MW_TEST_ARG", "0".into()));
    let logs = common::run_ranks("mixed", 2, &env, Duration::from_secs(60));
    show(&logs);
    assert!(logs[0].contains("asks for RDMA, and the peer offered another transport"), "{}", logs[0]);
    env.pop();
    env.push(("MW_TEST_ARG", "1".into()));
    let logs = common::run_ranks("mixed", 2, &env, Duration::from_secs(60));
    show(&logs);
    assert!(logs[1].contains("cannot use RDMA") && logs[1].contains("did not ask for RDMA"), "{}", logs[1]);
    assert!(logs[0].contains("did not ask for RDMA"), "{}", logs[0]);
}

/// Rank 1 leaves on purpose after an exchange: rank 0's pending receive fails with `PeerLeft`,
/// not as a crash (the link's farewell, before the TCP connection's end).
fn leave(ctx: &Ctx) {
    let (m, w) = form(ctx);
    let mut x = [0u8; 64];
    if ctx.rank == 1 {
        w.send(&x, 0).unwrap();
        m.remove_world("r").unwrap();
        std::thread::sleep(Duration::from_millis(500));
        return;
    }
    w.recv(&mut x, 1).unwrap();
    let e = w.recv(&mut x, 1).unwrap_err();
    assert!(matches!(e.broken_cause(), Some(BrokenCause::PeerLeft { peer: 1 })), "{e}");
    println!("rank 0: {e}");
}

#[test]
fn rdma_peer_that_leaves_is_reported_as_left() {
    show(&common::run_ranks("leave", 2, &env(""), Duration::from_secs(60)));
}

/// Rank 0 only receives large messages (no send of its own to the peer) while rank 1 streams
/// them; the test kills rank 1 in the middle: rank 0's receive fails with `WorldBroken` within a
/// bound, whatever frames of the message had already arrived.
fn sink(ctx: &Ctx) {
    let (_m, w) = form(ctx);
    let mut v = vec![0u8; 8 << 20];
    if ctx.rank == 1 {
        loop {
            w.send(&v, 0).unwrap();
        }
    }
    w.recv(&mut v, 1).unwrap();
    println!("rank 0: receiving");
    let t = Instant::now();
    let e = loop {
        if let Err(e) = w.recv(&mut v, 1) {
            break e;
        }
    };
    assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
    println!("rank 0: the receive failed {:?} after the first message: {e}", t.elapsed());
}

#[test]
fn rdma_receiver_of_a_sender_killed_mid_message_gets_an_error() {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let mut env = env("");
    env.push(("MW_TEST_ID", id.to_string()));
    let mut procs: Vec<_> = (0..2).map(|r| common::spawn("sink", r, 2, &env, &[])).collect();
    std::thread::sleep(Duration::from_millis(1500));
    procs[1].signal(libc::SIGKILL);
    let mut sender = procs.remove(1);
    sender.wait_for(Duration::from_secs(10));
    let logs = common::finish(&mut procs, Duration::from_secs(30));
    show(&logs);
    assert!(logs[0].contains("the receive failed"), "{}", logs[0]);
}

/// Without a provider (no device, and the software provider not asked for), asking for RDMA
/// is an error at once, not a silent fallback.
#[test]
fn rdma_without_a_provider_is_a_clear_error() {
    if std::env::var_os("MW_RDMA_PROVIDER").is_some() {
        common::skipped("rdma_without_a_provider_is_a_clear_error", "MW_RDMA_PROVIDER is set here");
        return;
    }
    let m = WorldManager::new();
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let t = Instant::now();
    let e = m.init_world_with("none", (&id).into(), 0, 1, &rdma_options()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidUsage, "{e}");
    assert!(e.message().contains("RDMA") && e.message().contains("MW_RDMA_PROVIDER=soft"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(1));
}

/// Three ranks whose worlds let the crate choose, each told its host (`MW_TEST_HOSTS`, one
/// name per rank, as `MW_HOST_ID`): peers on one host get shared memory, peers on two hosts the
/// transport `MW_TEST_ACROSS` says (`rdma` or `tcp`); an all-reduce over all of them is right.
fn auto(ctx: &Ctx) {
    let hosts: Vec<String> = ctx.env("MW_TEST_HOSTS").split(',').map(str::to_owned).collect();
    std::env::set_var("MW_HOST_ID", &hosts[ctx.rank]);
    // The last rank's queue pairs cannot connect (`MW_TEST_FAULT`, its soft verbs fault).
    if ctx.rank == ctx.size - 1 {
        std::env::set_var("MW_SOFT_VERBS_FAULT", ctx.env("MW_TEST_FAULT"));
    }
    let across = match ctx.env("MW_TEST_ACROSS").as_str() {
        "rdma" => TransportKind::Rdma,
        _ => TransportKind::Tcp,
    };
    let m = WorldManager::new();
    let w = m.init_world("auto", &ctx.id(), ctx.rank, ctx.size).unwrap();
    for peer in (0..ctx.size).filter(|p| *p != ctx.rank) {
        let want = if hosts[peer] == hosts[ctx.rank] { TransportKind::Shm } else { across };
        assert_eq!(w.transports()[peer], Some(want), "rank {} to rank {peer}: {:?}", ctx.rank, w.transports());
    }
    let n = ctx.size as u64;
    for round in 0..50u64 {
        let mine: Vec<u64> = (0..4096).map(|i| i * (ctx.rank as u64 + 1) + round).collect();
        let mut out = vec![0u64; mine.len()];
        w.all_reduce(&mine, &mut out, multiworld::ReduceOp::Sum).unwrap();
        assert!(out.iter().enumerate().all(|(i, v)| *v == i as u64 * n * (n + 1) / 2 + n * round), "round {round}");
    }
    println!("rank {}: {:?}", ctx.rank, w.transports());
    w.barrier().unwrap();
}

fn auto_env(hosts: &str, provider: &str, across: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MW_TEST_HOSTS", hosts.into()),
        ("MW_RDMA_PROVIDER", provider.into()),
        ("MW_TEST_ACROSS", across.into()),
        ("MW_TEST_FAULT", String::new()),
    ]
}

#[test]
fn a_world_that_lets_the_crate_choose_links_other_hosts_by_rdma_and_one_host_by_shared_memory() {
    show(&common::run_ranks("auto", 3, &auto_env("a,a,b", "soft", "rdma"), Duration::from_secs(60)));
}

#[test]
fn a_world_that_lets_the_crate_choose_uses_tcp_across_hosts_without_an_rdma_provider() {
    // An unknown provider: no RDMA in these processes, whatever devices the machine has.
    show(&common::run_ranks("auto", 3, &auto_env("a,b,c", "none", "tcp"), Duration::from_secs(60)));
}

#[test]
fn a_world_that_lets_the_crate_choose_uses_tcp_where_a_queue_pair_cannot_connect() {
    // The last rank connects its queue pairs last in each pair it offers (it is the higher
    // rank): both sides of those pairs fall back to TCP together.
    let mut env = auto_env("a,b", "soft", "tcp");
    env[3].1 = "connect_refused".into();
    show(&common::run_ranks("auto", 2, &env, Duration::from_secs(60)));
}
