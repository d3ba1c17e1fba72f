//! Several operations at once, across real processes: `wait_any` returns the request that
//! completed first (not the first in the vector), `wait_all` returns every outcome in order, a
//! failed one included, and one group takes every operation, each result checked against
//! what is computed here independently. Scoped requests borrow their buffers: a window of
//! sends of one buffer, receives into pieces of one buffer, a group posted without waiting,
//! and a scope that returns only once everything posted in it is done, also when the world
//! breaks.

mod common;

use std::time::{Duration, Instant};

use common::Ctx;
use multiworld::{ErrorKind, ReduceOp, Request, ScopedRequest, WorldManager};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[("any", any), ("group", group), ("scoped", scoped)]);
}

/// Rank 0 posts a receive from rank 1 and one from rank 2; rank 2 sends at once, rank 1 only
/// after 300 ms. Then rank 0 posts two receives from rank 1 of which only the first is ever
/// matched, and rank 1 aborts the world.
fn any(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = m.init_world("requests", &ctx.id(), ctx.rank, 3).unwrap();
    match ctx.rank {
        0 => {
            let t = Instant::now();
            let mut reqs = vec![w.recv_async(vec![0u32; 4], 1), w.recv_async(vec![0u32; 4], 2)];
            let (i, got) = Request::wait_any(&mut reqs).unwrap();
            let first = t.elapsed();
            assert_eq!(i, 1, "the receive from rank 2 completed first");
            assert_eq!(got.map_err(|f| f.error).unwrap(), vec![2u32; 4]);
            assert!(first < Duration::from_millis(250), "wait_any waited {first:?} for a message sent at once");
            let (i, got) = Request::wait_any(&mut reqs).unwrap();
            assert_eq!(i, 0);
            assert_eq!(got.map_err(|f| f.error).unwrap(), vec![1u32; 4]);
            assert!(t.elapsed() >= Duration::from_millis(250), "rank 1 sent after 300 ms");
            assert!(Request::wait_any(&mut reqs).is_none());
            println!(
                "wait_any: first after {:.2} ms, second after {:.2} ms",
                first.as_secs_f64() * 1e3,
                t.elapsed().as_secs_f64() * 1e3
            );
            w.barrier().unwrap();
            // wait_all: the first receive is matched, the second never is; rank 1 aborts.
            let reqs = vec![w.recv_async(vec![0u32; 4], 1), w.recv_async(vec![0u32; 4], 1)];
            let out = Request::wait_all(reqs);
            assert_eq!(out.len(), 2);
            assert_eq!(out[0].as_ref().map_err(|f| f.error.clone()).unwrap(), &vec![3u32; 4]);
            let e = &out[1].as_ref().unwrap_err().error;
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
        }
        1 => {
            std::thread::sleep(Duration::from_millis(300));
            w.send(&[1u32; 4], 0).unwrap();
            w.barrier().unwrap();
            w.send(&[3u32; 4], 0).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            w.abort();
        }
        _ => {
            w.send(&[2u32; 4], 0).unwrap();
            w.barrier().unwrap();
            let _ = w.recv(&mut [0u8; 1], 0);
        }
    }
}

#[test]
fn wait_any_returns_the_first_to_complete_and_wait_all_every_outcome() {
    let logs = common::run_ranks("any", 3, &[], Duration::from_secs(60));
    println!("{}", logs[0].lines().find(|l| l.starts_with("wait_any")).unwrap_or(""));
}

/// Rank r's input for an operation of `n` elements: r * 1000 + i + 1.
fn input(r: usize, n: usize) -> Vec<i64> {
    (0..n).map(|i| (r * 1000 + i + 1) as i64).collect()
}

/// Every operation in one group of 3 ranks, then each result checked.
fn group(ctx: &Ctx) {
    const N: usize = 3;
    const C: usize = 4;
    let m = WorldManager::new();
    let w = m.init_world("group-all", &ctx.id(), ctx.rank, N).unwrap();
    let r = ctx.rank;
    let mine = input(r, C);
    let blocks = input(r, C * N);
    let (mut ag, mut rs, mut ga, mut sc, mut a2a) =
        (vec![0i64; C * N], vec![0i64; C], vec![0i64; C * N], vec![0i64; C], vec![0i64; C * N]);
    let (mut red, mut ar, mut bc, mut got) = (vec![0i64; C], vec![0i64; C], vec![0i64; C], vec![0i64; C]);
    let bc_in = input(2, C);
    {
        let mut g = w.group();
        g.all_reduce(&mine, &mut ar, ReduceOp::Sum).unwrap();
        g.broadcast(if r == 2 { Some(&bc_in[..]) } else { None }, &mut bc, 2).unwrap();
        g.reduce(&mine, &mut red, ReduceOp::Max, 1).unwrap();
        g.all_gather(&mine, &mut ag).unwrap();
        g.reduce_scatter(&blocks, &mut rs, ReduceOp::Sum).unwrap();
        g.gather(&mine, &mut ga, 0).unwrap();
        g.scatter(&blocks, &mut sc, 1).unwrap();
        g.all_to_all(&blocks, &mut a2a).unwrap();
        g.barrier().unwrap();
        g.send(&mine, (r + 1) % N).unwrap();
        g.recv(&mut got, (r + N - 1) % N).unwrap();
        g.end().unwrap();
    }
    let sum = |i: usize| (0..N).map(|q| input(q, C)[i]).sum::<i64>();
    assert_eq!(ar, (0..C).map(sum).collect::<Vec<_>>(), "all_reduce");
    assert_eq!(bc, input(2, C), "broadcast");
    if r == 1 {
        assert_eq!(red, input(N - 1, C), "reduce (max) at the root");
    }
    let gathered: Vec<i64> = (0..N).flat_map(|q| input(q, C)).collect();
    assert_eq!(ag, gathered, "all_gather");
    if r == 0 {
        assert_eq!(ga, gathered, "gather at the root");
    }
    let rs_want: Vec<i64> = (0..C).map(|i| (0..N).map(|q| input(q, C * N)[r * C + i]).sum()).collect();
    assert_eq!(rs, rs_want, "reduce_scatter");
    assert_eq!(sc, input(1, C * N)[r * C..(r + 1) * C].to_vec(), "scatter from rank 1");
    let a2a_want: Vec<i64> = (0..N).flat_map(|q| input(q, C * N)[r * C..(r + 1) * C].to_vec()).collect();
    assert_eq!(a2a, a2a_want, "all_to_all");
    assert_eq!(got, input((r + N - 1) % N, C), "send/recv");
    println!("rank {r}: every operation of the group checked");
}

#[test]
fn one_group_takes_every_operation() {
    common::run_ranks("group", 3, &[], Duration::from_secs(60));
}

/// Message `k` of the scoped test: distinct per message and per element.
fn message(k: u32) -> Vec<u32> {
    (0..1024u32).map(|i| i.wrapping_mul(7) + 1 + k * 100_000).collect()
}

/// Two ranks. Rank 0 sends a window of 16 messages from one buffer, rank 1 receives them into
/// 16 pieces of one buffer and takes them with `wait_any`; then rank 1 answers with 8 messages
/// sent by a group posted without waiting, which rank 0 receives into pieces of one buffer
/// without ever waiting on them (the scope waits); an all-reduce in a posted group; a call
/// with a bad peer; and a scope whose world breaks while a receive is pending.
fn scoped(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = m.init_world("scoped", &ctx.id(), ctx.rank, 2).unwrap();
    let same = message(0);
    let answers: Vec<Vec<u32>> = (1..=8).map(message).collect();
    if ctx.rank == 0 {
        let mut back = vec![0u32; 8 * 1024];
        let mut sum = vec![0i64; 3];
        w.scope(|s| {
            let window: Vec<_> = (0..16).map(|_| s.send(&same, 1)).collect();
            let bad = s.send(&same, 5).wait().unwrap_err();
            assert_eq!(bad.kind(), ErrorKind::InvalidArgument, "{bad}");
            for r in ScopedRequest::wait_all(window) {
                r.unwrap();
            }
        });
        // Rank 1 answers only after 100 ms: the receives are still pending at the end of the
        // scope, which must wait for them.
        w.scope(|s| {
            for piece in back.chunks_mut(1024) {
                let _ = s.recv(piece, 1);
            }
        });
        for (k, piece) in back.chunks(1024).enumerate() {
            assert_eq!(piece, &answers[k][..], "answer {k}, received in a scope without a wait");
        }
        w.scope(|s| {
            let mut g = s.group();
            g.all_reduce(&[1i64, 2, 3][..], &mut sum, ReduceOp::Sum).unwrap();
            let posted = g.post();
            posted.wait().unwrap();
        });
        assert_eq!(sum, vec![11, 22, 33], "all_reduce of a posted group");
        // The world breaks (rank 1 aborts) while two receives are pending: the scope returns
        // with the error, and does not hang on the one never waited on.
        let t = Instant::now();
        let (mut x, mut y) = (vec![0u8; 8], vec![0u8; 8]);
        let e = w.scope(|s| {
            let _never_waited = s.recv(&mut x, 1);
            s.recv(&mut y, 1).wait()
        });
        let e = e.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
        assert!(t.elapsed() < Duration::from_secs(20), "the broken scope took {:?}", t.elapsed());
        println!("scoped: window, answers, posted group and broken scope checked");
    } else {
        let mut window = vec![0u32; 16 * 1024];
        w.scope(|s| {
            let mut reqs: Vec<_> = window.chunks_mut(1024).map(|piece| s.recv(piece, 0)).collect();
            let mut seen = Vec::new();
            while let Some((i, r)) = ScopedRequest::wait_any(&mut reqs) {
                r.unwrap();
                seen.push(i);
            }
            assert_eq!(seen.len(), 16);
        });
        for piece in window.chunks(1024) {
            assert_eq!(piece, &same[..]);
        }
        let mut sum = vec![0i64; 3];
        std::thread::sleep(Duration::from_millis(100));
        w.scope(|s| {
            let mut g = s.group();
            for a in &answers {
                g.send(a, 0).unwrap();
            }
            let answered = g.post();
            let mut g = s.group();
            g.all_reduce(&[10i64, 20, 30][..], &mut sum, ReduceOp::Sum).unwrap();
            g.end().unwrap();
            answered.wait().unwrap();
        });
        assert_eq!(sum, vec![11, 22, 33]);
        std::thread::sleep(Duration::from_millis(200));
        w.abort();
    }
}

#[test]
fn scoped_requests_borrow_buffers_and_the_scope_waits_for_them() {
    let logs = common::run_ranks("scoped", 2, &[], Duration::from_secs(60));
    assert!(logs[0].contains("scoped: window, answers"), "{}", logs[0]);
}
