//! Two simulated hosts: two network namespaces joined by a veth pair, one rank in each. The
//! ranks find each other by address (rank 0 listens on its veth address) and by unique id (the
//! id travels as text in a file), and move data over TCP between the namespaces.
//!
//! The same pair of hosts also shows the two failures that only a network has: a peer killed on
//! the other host (seen at once, by the connection's end) and a cut cable (seen at the heartbeat
//! timeout).
//!
//! Needs root and `ip` (iproute2); where namespaces cannot be made the test says why and
//! returns without running.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{spawn, Ctx};
use multiworld::{BrokenCause, ReduceOp, TransportKind, UniqueId, WorldManager, WorldOptions};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[("host", host), ("remote_kill", remote_kill), ("partition", partition)]);
}

const ADDR_A: &str = "10.77.0.1";
const ADDR_B: &str = "10.77.0.2";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Two namespaces joined by veth; removed on drop.
struct Hosts {
    a: String,
    b: String,
    veth_b: String,
}

impl Hosts {
    fn make() -> Result<Hosts, String> {
        let tag = std::process::id() % 100_000;
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let h = Hosts { a: format!("mw{tag}{n}a"), b: format!("mw{tag}{n}b"), veth_b: format!("mwv{tag}{n}b") };
        ip(&["netns", "add", &h.a])?;
        ip(&["netns", "add", &h.b])?;
        let (va, vb) = (format!("mwv{tag}{n}a"), h.veth_b.clone());
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &h.a])?;
        ip(&["link", "set", &vb, "netns", &h.b])?;
        for (ns, dev, addr) in [(&h.a, &va, ADDR_A), (&h.b, &vb, ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(h)
    }
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Makes the hosts, or says why it cannot and returns `None`.
fn hosts_or_skip(test: &str) -> Option<Hosts> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skipped(test, "needs root to create network namespaces");
        return None;
    }
    match Hosts::make() {
        Ok(h) => Some(h),
        Err(why) => {
            common::skipped(test, &format!("cannot create network namespaces: {why}"));
            None
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

fn host(ctx: &Ctx) {
    let m = WorldManager::new();
    let r = ctx.rank;
    // By address: rank 0 listens on its veth address.
    let w = m.init_world_at("by-addr", &format!("{ADDR_A}:29555"), r, 2).unwrap();
    assert_eq!(w.transports()[1 - r], Some(TransportKind::Tcp));
    let n = 1 << 20;
    let mut v: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * (r as f32 + 1.0)).collect();
    w.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    assert!(v.iter().enumerate().all(|(i, x)| *x == (i % 13) as f32 * 3.0));
    // By unique id, made on rank 0's host (its root listens on the veth address, the only
    // non-loopback interface there) and passed as text in a file.
    let file = ctx.env("MW_TEST_IDFILE");
    let id = if r == 0 {
        let id = UniqueId::new().unwrap();
        assert_eq!(id.root_addr().ip().to_string(), ADDR_A);
        std::fs::write(&file, id.to_string()).unwrap();
        id
    } else {
        let t0 = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Ok(id) = text.parse::<UniqueId>() {
                    break id;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "no id file");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let w2 = m.init_world("by-id", &id, r, 2).unwrap();
    let mut buf = vec![0u64; 100_000];
    if r == 0 {
        buf.iter_mut().enumerate().for_each(|(i, x)| *x = i as u64 * 3);
        w2.send(&buf, 1).unwrap();
    } else {
        w2.recv(&mut buf, 0).unwrap();
        assert!(buf.iter().enumerate().all(|(i, x)| *x == i as u64 * 3));
    }
    w2.barrier().unwrap();
    println!("rank {r}: worlds by address and by id worked across namespaces");
}

#[test]
fn ranks_in_two_network_namespaces() {
    let Some(hosts) = hosts_or_skip("ranks_in_two_network_namespaces") else { return };
    let idfile = std::env::temp_dir().join(format!("mw-netns-id-{}", std::process::id()));
    let _ = std::fs::remove_file(&idfile);
    let env = [("MW_TEST_IDFILE", idfile.to_string_lossy().into_owned())];
    let mut procs = vec![
        spawn("host", 0, 2, &env, &["ip", "netns", "exec", &hosts.a]),
        spawn("host", 1, 2, &env, &["ip", "netns", "exec", &hosts.b]),
    ];
    let logs = common::finish(&mut procs, Duration::from_secs(60));
    assert!(logs.iter().all(|l| l.contains("across namespaces")));
    let _ = std::fs::remove_file(&idfile);
}

fn fast_heartbeat() -> WorldOptions {
    WorldOptions::default().with_heartbeat(Duration::from_millis(100), Duration::from_secs(1))
}

/// Rank 0 kills rank 1 on the other host in the middle of a receive: seen at once.
fn remote_kill(ctx: &Ctx) {
    let m = WorldManager::new();
    let w =
        m.init_world_with("remote", format!("{ADDR_A}:29556").as_str().into(), ctx.rank, 2, &fast_heartbeat()).unwrap();
    w.barrier().unwrap();
    if ctx.rank == 1 {
        let _ = w.recv(&mut [0u8; 1], 0);
        return;
    }
    let pending = w.recv_async(vec![0u8; 1], 1);
    std::thread::sleep(Duration::from_millis(100));
    let pid: i32 = ctx.env("MW_TEST_VICTIM").parse().unwrap();
    let t = Instant::now();
    // SAFETY: kill(2) on the pid of the peer process the test spawned.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let e = pending.wait().unwrap_err().error;
    let took = t.elapsed();
    println!("peer on the other host killed; detected in {:.2} ms: {e}", took.as_secs_f64() * 1e3);
    assert!(matches!(e.broken_cause(), Some(BrokenCause::PeerClosed { peer: 1, .. })), "{e}");
    assert!(took < Duration::from_millis(100), "{took:?}");
}

#[test]
fn peer_killed_on_another_host_is_detected_at_once() {
    let Some(hosts) = hosts_or_skip("peer_killed_on_another_host_is_detected_at_once") else { return };
    let mut victim = spawn("remote_kill", 1, 2, &[], &["ip", "netns", "exec", &hosts.b]);
    let env = [("MW_TEST_VICTIM", victim.pid().to_string())];
    let mut procs = vec![spawn("remote_kill", 0, 2, &env, &["ip", "netns", "exec", &hosts.a])];
    let logs = common::finish(&mut procs, Duration::from_secs(60));
    victim.wait_for(Duration::from_secs(5));
    println!("{}", logs[0].lines().find(|l| l.contains("detected")).unwrap_or(""));
}

/// The cable between the hosts is cut (rank 1's interface goes down): both ranks see the
/// other fall silent and break the world at the heartbeat timeout.
fn partition(ctx: &Ctx) {
    let m = WorldManager::new();
    let w =
        m.init_world_with("cut", format!("{ADDR_A}:29557").as_str().into(), ctx.rank, 2, &fast_heartbeat()).unwrap();
    w.barrier().unwrap();
    let pending = w.recv_async(vec![0u8; 1], 1 - ctx.rank);
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    if ctx.rank == 0 {
        let ns_b = ctx.env("MW_TEST_NS_B");
        let dev = ctx.env("MW_TEST_DEV_B");
        let ok = std::process::Command::new("ip").args(["-n", &ns_b, "link", "set", &dev, "down"]).status().unwrap();
        assert!(ok.success());
    }
    let e = pending.wait().unwrap_err().error;
    let took = t.elapsed();
    println!("rank {}: partition detected {:.0} ms after the cut: {e}", ctx.rank, took.as_secs_f64() * 1e3);
    assert!(matches!(e.broken_cause(), Some(BrokenCause::PeerUnresponsive { .. })), "{e}");
    // Silence is counted from the last heartbeat, up to one interval (100 ms) before the cut.
    assert!(took >= Duration::from_millis(850) && took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn network_partition_is_detected_at_the_heartbeat_timeout() {
    let Some(hosts) = hosts_or_skip("network_partition_is_detected_at_the_heartbeat_timeout") else { return };
    let env = [("MW_TEST_NS_B", hosts.b.clone()), ("MW_TEST_DEV_B", hosts.veth_b.clone())];
    let mut procs = vec![
        spawn("partition", 0, 2, &env, &["ip", "netns", "exec", &hosts.a]),
        spawn("partition", 1, 2, &env, &["ip", "netns", "exec", &hosts.b]),
    ];
    let logs = common::finish(&mut procs, Duration::from_secs(60));
    for l in &logs {
        println!("{}", l.lines().find(|l| l.contains("detected")).unwrap_or(""));
    }
}
