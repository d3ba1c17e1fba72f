//! A forming world is fed hostile connections — garbage, a wrong secret, truncated and
//! oversized messages — at its rendezvous root and at its peer listener. Each is refused with a
//! log line, nothing panics, and the world then forms and works with its real peer.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{spawn, Ctx};
use multiworld::{ReduceOp, WorldManager, WorldOptions};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[("guarded", guarded)]);
}

fn guarded(ctx: &Ctx) {
    let m = WorldManager::new();
    let opts = WorldOptions::default().with_secret(b"s3cret").with_timeout(Duration::from_secs(30));
    let w = m.init_world_with("guarded", ctx.env("MW_TEST_ADDR").as_str().into(), ctx.rank, 2, &opts).unwrap();
    let mut v = vec![ctx.rank as i64 + 1; 1000];
    w.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    assert!(v.iter().all(|x| *x == 3));
    println!("rank {}: world formed and works", ctx.rank);
}

/// A length-prefixed message, as the formation protocol frames them.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn lp(v: &mut Vec<u8>, b: &[u8]) {
    v.extend_from_slice(&(b.len() as u32).to_le_bytes());
    v.extend_from_slice(b);
}

/// A well-formed rendezvous hello (see docs/protocol.md) with the given secret.
fn hello(secret: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x4D57_4231u32.to_le_bytes());
    v.extend_from_slice(&4u32.to_le_bytes()); // protocol version
    lp(&mut v, secret);
    lp(&mut v, b"guarded");
    v.extend_from_slice(&1u32.to_le_bytes()); // rank
    v.extend_from_slice(&2u32.to_le_bytes()); // size
    v.extend_from_slice(&1u32.to_le_bytes()); // generation
    lp(&mut v, b"127.0.0.1:1");
    lp(&mut v, b"somewhere");
    v.extend_from_slice(&1000u64.to_le_bytes());
    lp(&mut v, b"127.0.0.1:2"); // door
    v.extend_from_slice(&0u64.to_le_bytes()); // key
    lp(&mut v, b""); // agree
    lp(&mut v, b""); // lanes
    v
}

/// A link hello for a world id and secret the attacker cannot know.
fn link_hello() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x4D57_4C31u32.to_le_bytes());
    v.extend_from_slice(&12345u64.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    lp(&mut v, b"guess");
    v
}

/// The address of a rank's peer listener, from its log (`MW_LOG=info`).
fn peer_listener(rank: &common::Proc) -> String {
    let t = Instant::now();
    loop {
        let log = rank.log_text();
        if let Some(l) = log.lines().find(|l| l.contains("listening for peers on")) {
            return l.rsplit(' ').next().unwrap().to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the rank never listened:\n{log}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn attack(addr: &str, bytes: &[u8]) {
    if let Ok(mut s) = TcpStream::connect(addr) {
        let _ = s.write_all(bytes);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn hostile_connections_are_refused_and_the_world_forms_anyway() {
    let port = common::free_port();
    let root = format!("127.0.0.1:{port}");
    let env = [("MW_TEST_ADDR", root.clone()), ("MW_LOG", "info".to_string())];
    let rank0 = spawn("guarded", 0, 2, &env, &[]);
    // Wait for rank 0 to announce its peer listener.
    let peer_addr = peer_listener(&rank0);
    // At the root.
    attack(&root, b"GET / HTTP/1.0\r\n\r\n"); // oversized length prefix
    attack(&root, &framed(&[0xAB; 40])); // garbage inside a frame
    attack(&root, &framed(&hello(b"wrong"))); // wrong secret
    let h = framed(&hello(b"s3cret"));
    attack(&root, &h[..h.len() / 2]); // truncated
                                      // At rank 0's peer listener.
    attack(&peer_addr, &[0xFF; 64]);
    attack(&peer_addr, &framed(&link_hello()));
    attack(&peer_addr, &framed(&link_hello())[..10]);
    // Now the real rank 1 joins.
    let rank1 = spawn("guarded", 1, 2, &[("MW_TEST_ADDR", root)], &[]);
    let logs = common::finish(&mut [rank0, rank1], Duration::from_secs(60));
    let log0 = &logs[0];
    for needle in [
        "oversized message",
        "not a valid hello",
        "wrong secret",
        "truncated",
        "refused link connection",
        "wrong world, generation or secret",
        "world formed and works",
    ] {
        assert!(log0.contains(needle), "rank 0's log lacks '{needle}':\n{log0}");
    }
    let refusals = log0.lines().filter(|l| l.contains("refused")).count();
    println!("{refusals} hostile connections refused, each with a log line; the world formed and worked");
    assert!(refusals >= 7, "{log0}");
    assert!(!log0.contains("panicked"));
}

/// Forty idle connections (some with one byte) sit on rank 0's peer listener before the real
/// rank 1 links up; the world must still form at once. Read one at a time, each stranger held
/// the listener for its grace of seconds and the formation missed its 30 s deadline.
#[test]
fn idle_connections_on_the_peer_listener_do_not_stall_formation() {
    let root = format!("127.0.0.1:{}", common::free_port());
    let env = [("MW_TEST_ADDR", root.clone()), ("MW_LOG", "info".to_string())];
    let rank0 = spawn("guarded", 0, 2, &env, &[]);
    let peer_addr = peer_listener(&rank0);
    let idle: Vec<TcpStream> = (0..40)
        .filter_map(|k| {
            let mut s = TcpStream::connect(&peer_addr).ok()?;
            if k % 2 == 0 {
                let _ = s.write_all(&[1]);
            }
            Some(s)
        })
        .collect();
    assert_eq!(idle.len(), 40);
    let joined = Instant::now();
    let rank1 = spawn("guarded", 1, 2, &[("MW_TEST_ADDR", root)], &[]);
    let logs = common::finish(&mut [rank0, rank1], Duration::from_secs(60));
    let took = joined.elapsed();
    println!("formed and worked {took:?} after rank 1 started, with 40 idle connections held open");
    assert!(logs[0].contains("world formed and works"), "{}", logs[0]);
    drop(idle);
}
