//! Two simulated hosts: two network namespaces joined by a veth pair, one rank in each. The
//! ranks find each other by address (rank 0 listens on its veth address) and by unique id (the
//! id travels as text in a file), and move data over TCP between the namespaces.
//!
//! Needs root and `ip` (iproute2); where namespaces cannot be made the test says why and
//! returns without running.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{spawn, Ctx};
use multiworld::{ReduceOp, TransportKind, UniqueId, WorldManager};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[("host", host)]);
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
}

impl Hosts {
    fn make() -> Result<Hosts, String> {
        let tag = std::process::id() % 100_000;
        let h = Hosts { a: format!("mw{tag}a"), b: format!("mw{tag}b") };
        ip(&["netns", "add", &h.a])?;
        ip(&["netns", "add", &h.b])?;
        let (va, vb) = (format!("mwv{tag}a"), format!("mwv{tag}b"));
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
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED ranks_in_two_network_namespaces: needs root to create network namespaces");
        return;
    }
    let hosts = match Hosts::make() {
        Ok(h) => h,
        Err(why) => {
            println!("SKIPPED ranks_in_two_network_namespaces: cannot create network namespaces: {why}");
            return;
        }
    };
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
