//! Engine tests without sockets or threads: several engines joined by in-memory links, driven
//! in turn on a virtual clock. They check every collective against references computed here,
//! element by element, and the failure rules (silence, hang-up, mismatch, stale frames).

#![allow(clippy::needless_range_loop)]

use std::time::{Duration, Instant};

use super::*;
use crate::api::error::ErrorKind;
use crate::coll::RING_MIN_BYTES;
use crate::sys::sync::Mutex;
use crate::transport::loopback::{Faults, QueueLink};

fn hb() -> Heartbeat {
    Heartbeat { interval: Duration::from_millis(100), timeout: Duration::from_millis(1000) }
}

struct Net {
    engines: Vec<Engine>,
    faults: Vec<Vec<Option<Arc<Mutex<Faults>>>>>,
    now: Instant,
}

/// `n` engines, every pair joined by a queue link holding at most `cap` bytes each way.
fn net(n: usize, cap: usize) -> Net {
    net_with(n, cap, |_| hb())
}

/// Like [`net`], with each rank's heartbeat settings.
fn net_with(n: usize, cap: usize, heartbeat: impl Fn(usize) -> Heartbeat) -> Net {
    net_checked(n, cap, heartbeat, Checksum::Off)
}

/// Like [`net_with`], with payload checksums as `checksum` says.
fn net_checked(n: usize, cap: usize, heartbeat: impl Fn(usize) -> Heartbeat, checksum: Checksum) -> Net {
    let mut links: Vec<Vec<Option<Box<dyn Link>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    let mut faults = vec![vec![None; n]; n];
    for a in 0..n {
        links[a][a] = Some(Box::new(QueueLink::loopback()));
        for b in a + 1..n {
            let (x, y, f) = QueueLink::pair(cap);
            links[a][b] = Some(Box::new(x));
            links[b][a] = Some(Box::new(y));
            faults[a][b] = Some(f.clone());
            faults[b][a] = Some(f);
        }
    }
    let now = Instant::now();
    let engines = links
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let cfg = EngineConfig {
                name: Arc::from("test"),
                rank,
                size: n,
                world_id: 42,
                generation: 1,
                heartbeat: Some(heartbeat(rank)),
                checksum,
            };
            Engine::new(cfg, l, now)
        })
        .collect();
    Net { engines, faults, now }
}

impl Net {
    /// Passes every engine in turn (the clock moving by `step` each round) until every
    /// completion is done; panics after `rounds` rounds.
    fn run(&mut self, done: &[Arc<Completion>], step: Duration, rounds: usize) {
        for _ in 0..rounds {
            if done.iter().all(|c| c.is_done()) {
                return;
            }
            self.now += step;
            for e in &mut self.engines {
                e.pass(self.now);
            }
        }
        panic!("operations did not complete in {rounds} rounds");
    }
}

/// Buffer of `len` bytes, 16-byte aligned.
struct Buf(Vec<u128>, usize);

impl Buf {
    fn new(len: usize) -> Buf {
        Buf(vec![0; len.div_ceil(16)], len)
    }
    fn bytes(&mut self) -> &mut [u8] {
        let n = self.1;
        &mut bytemuck::cast_slice_mut(&mut self.0)[..n]
    }
    fn raw(&mut self) -> RawBuf {
        RawBuf::from_mut(self.bytes())
    }
    fn fill_f32(&mut self, v: &[f32]) {
        self.bytes()[..v.len() * 4].copy_from_slice(bytemuck::cast_slice(v));
    }
    fn f32s(&mut self) -> Vec<f32> {
        let n = self.1 / 4;
        bytemuck::cast_slice::<u8, f32>(self.bytes())[..n].to_vec()
    }
}

#[path = "../../tests/common/reference.rs"]
mod reference;
use reference::{input, reduced};

fn fill(d: DataType, rank: usize, count: usize, block: usize, out: &mut [u8]) {
    out.copy_from_slice(&input(d, rank, block, count));
}

/// Runs one operation on every rank of an in-memory world and checks each rank's output
/// against the reference.
fn check_op(kind: OpKind, d: DataType, op: ReduceOp, n: usize, count: usize, root: usize, in_place: bool) {
    let mut net = net(n, 1 << 20);
    let e = d.size();
    let b = count * e;
    let mut bufs = Vec::new();
    let mut done = Vec::new();
    for rank in 0..n {
        let desc = OpDesc { kind, dtype: d, redop: op, count, root, is_send: false, in_place };
        let (sl, rl) = desc.buffer_bytes(rank, n);
        let (mut sb, mut rb) = (Buf::new(sl), Buf::new(rl));
        // Inputs: in place, the input lives in the receive buffer where NCCL puts it.
        let input: &mut [u8] = if in_place { rb.bytes() } else { sb.bytes() };
        match kind {
            OpKind::AllGather if in_place => fill(d, rank, count, 0, &mut input[rank * b..(rank + 1) * b]),
            OpKind::AllGather | OpKind::Gather => fill(d, rank, count, 0, input),
            OpKind::ReduceScatter | OpKind::AllToAll => {
                for blk in 0..n {
                    fill(d, rank, count, blk, &mut input[blk * b..(blk + 1) * b]);
                }
            }
            OpKind::Scatter if rank == root => {
                for blk in 0..n {
                    fill(d, rank, count, blk, &mut input[blk * b..(blk + 1) * b]);
                }
            }
            OpKind::Broadcast if rank == root => fill(d, rank, count, 0, input),
            OpKind::Broadcast | OpKind::Scatter => {}
            _ => fill(d, rank, count, 0, input),
        }
        let c = Completion::new();
        let (s, r) = (sb.raw(), rb.raw());
        net.engines[rank].post(
            vec![Posted { desc, send: s, recv: r, completion: c.clone(), timeout: None, keepalive: None }],
            || net.now,
        );
        done.push(c);
        bufs.push((sb, rb));
    }
    net.run(&done, Duration::from_micros(10), 100_000);
    let what = format!("{kind:?} {d} {op} n={n} count={count} root={root} in_place={in_place}");
    for (rank, c) in done.iter().enumerate() {
        assert!(c.result().unwrap().is_ok(), "{what}: rank {rank} failed: {:?}", c.result());
        let out = bufs[rank].1.bytes().to_vec();
        let expect: Vec<u8> = match kind {
            OpKind::AllReduce => reduced(d, op, n, 0, count),
            OpKind::Reduce if rank == root => reduced(d, op, n, 0, count),
            OpKind::Reduce => continue,
            OpKind::ReduceScatter => {
                let r = reduced(d, op, n, rank, count);
                let o = if in_place { &out[rank * b..(rank + 1) * b] } else { &out[..] };
                assert_eq!(o, &r[..], "{what}: rank {rank}");
                continue;
            }
            OpKind::Broadcast => {
                let mut x = vec![0u8; b];
                fill(d, root, count, 0, &mut x);
                x
            }
            OpKind::AllGather => {
                let mut x = vec![0u8; b * n];
                for r in 0..n {
                    fill(d, r, count, 0, &mut x[r * b..(r + 1) * b]);
                }
                x
            }
            OpKind::Gather if rank == root => {
                let mut x = vec![0u8; b * n];
                for r in 0..n {
                    fill(d, r, count, 0, &mut x[r * b..(r + 1) * b]);
                }
                x
            }
            OpKind::Gather => continue,
            OpKind::Scatter => {
                let mut x = vec![0u8; b];
                fill(d, root, count, rank, &mut x);
                x
            }
            OpKind::AllToAll => {
                let mut x = vec![0u8; b * n];
                for r in 0..n {
                    fill(d, r, count, rank, &mut x[r * b..(r + 1) * b]);
                }
                x
            }
            OpKind::P2p | OpKind::Barrier => continue,
        };
        assert_eq!(out, expect, "{what}: rank {rank}");
    }
}

const KINDS: [OpKind; 8] = [
    OpKind::AllReduce,
    OpKind::Broadcast,
    OpKind::Reduce,
    OpKind::AllGather,
    OpKind::ReduceScatter,
    OpKind::Gather,
    OpKind::Scatter,
    OpKind::AllToAll,
];

fn in_place_ok(k: OpKind) -> bool {
    matches!(k, OpKind::AllReduce | OpKind::Broadcast | OpKind::Reduce | OpKind::AllGather | OpKind::ReduceScatter)
}

#[test]
fn every_collective_small_and_large_against_reference() {
    // Sizes 1..=5 cover powers of two and the fold of extra ranks; counts cover empty, one
    // element, several frames, and the ring path (>= RING_MIN_BYTES).
    for n in 1..=5 {
        for kind in KINDS {
            for &count in &[0usize, 1, 7, 4097, RING_MIN_BYTES / 4 + 3] {
                for in_place in [false, true] {
                    if in_place && !in_place_ok(kind) {
                        continue;
                    }
                    let root = n / 2;
                    let ops: &[ReduceOp] = if kind.reduces() { &ReduceOp::ALL } else { &[ReduceOp::Sum] };
                    for &op in ops {
                        check_op(kind, DataType::F32, op, n, count, root, in_place);
                    }
                }
            }
        }
    }
}

#[test]
fn every_type_and_reduction() {
    for d in DataType::ALL {
        for op in ReduceOp::ALL {
            for n in [2, 3, 5] {
                for count in [7usize, RING_MIN_BYTES / d.size() + 5] {
                    check_op(OpKind::AllReduce, d, op, n, count, 0, false);
                    check_op(OpKind::ReduceScatter, d, op, n, count / n + 1, 0, true);
                    check_op(OpKind::Reduce, d, op, n, count, n - 1, false);
                }
            }
        }
    }
}

/// Posts `send`/`recv` pairs between ranks; checks data arrives and order per peer holds.
#[test]
fn point_to_point_batches_and_self_sends() {
    let n = 3;
    let mut net = net(n, 64 << 10);
    let count = 100_000usize; // several frames, more than the link holds: needs concurrency
    let mut bufs: Vec<Vec<Buf>> = (0..n).map(|_| Vec::new()).collect();
    let mut done = Vec::new();
    for rank in 0..n {
        let mut ops = Vec::new();
        // Every rank sends two messages to every rank (itself included) and receives them.
        for peer in 0..n {
            for k in 0..2 {
                for is_send in [true, false] {
                    let mut b = Buf::new(count * 4);
                    if is_send {
                        let v: Vec<u32> =
                            (0..count as u32).map(|i| i ^ (rank as u32 * 1000 + k * 100 + peer as u32)).collect();
                        b.bytes().copy_from_slice(bytemuck::cast_slice(&v));
                    }
                    let desc = OpDesc {
                        kind: OpKind::P2p,
                        dtype: DataType::U32,
                        redop: ReduceOp::Sum,
                        count,
                        root: peer,
                        is_send,
                        in_place: false,
                    };
                    let c = Completion::new();
                    let raw = b.raw();
                    let (s, r) = if is_send { (raw, RawBuf::EMPTY) } else { (RawBuf::EMPTY, raw) };
                    ops.push(Posted { desc, send: s, recv: r, completion: c.clone(), timeout: None, keepalive: None });
                    done.push(c);
                    bufs[rank].push(b);
                }
            }
        }
        net.engines[rank].post(ops, || net.now);
    }
    net.run(&done, Duration::from_micros(10), 100_000);
    for c in &done {
        assert!(c.result().unwrap().is_ok());
    }
    for rank in 0..n {
        for peer in 0..n {
            for k in 0..2u32 {
                let idx = peer * 4 + k as usize * 2 + 1; // the receive of (peer, k)
                let got: Vec<u32> = bytemuck::cast_slice(bufs[rank][idx].bytes()).to_vec();
                let want: Vec<u32> =
                    (0..count as u32).map(|i| i ^ (peer as u32 * 1000 + k * 100 + rank as u32)).collect();
                assert_eq!(got, want, "rank {rank} message {k} from {peer}");
            }
        }
    }
}

fn post_all_reduce(e: &mut Engine, now: Instant, buf: &mut Buf, count: usize, d: DataType) -> Arc<Completion> {
    let desc = OpDesc {
        kind: OpKind::AllReduce,
        dtype: d,
        redop: ReduceOp::Sum,
        count,
        root: 0,
        is_send: false,
        in_place: true,
    };
    let c = Completion::new();
    e.post(
        vec![Posted {
            desc,
            send: RawBuf::EMPTY,
            recv: buf.raw(),
            completion: c.clone(),
            timeout: None,
            keepalive: None,
        }],
        || now,
    );
    c
}

#[test]
fn mismatched_counts_fail_both_sides_with_a_clear_error() {
    let mut net = net(2, 1 << 20);
    let mut a = Buf::new(7 * 4);
    let mut b = Buf::new(8 * 4);
    let now = net.now;
    let ca = post_all_reduce(&mut net.engines[0], now, &mut a, 7, DataType::F32);
    let cb = post_all_reduce(&mut net.engines[1], now, &mut b, 8, DataType::F32);
    net.run(&[ca.clone(), cb.clone()], Duration::from_millis(1), 1000);
    for c in [&ca, &cb] {
        let e = c.result().unwrap().unwrap_err();
        assert!(e.is_world_broken());
        assert!(matches!(e.kind(), ErrorKind::InvalidUsage | ErrorKind::WorldBroken), "unexpected kind {:?}", e.kind());
        assert!(e.message().contains("count=7") && e.message().contains("count=8"), "{}", e.message());
    }
    // At least one side detected it itself.
    assert!([&ca, &cb].iter().any(|c| c.result().unwrap().unwrap_err().kind() == ErrorKind::InvalidUsage));
}

#[test]
fn mismatched_operations_and_types_are_reported() {
    let mut net = net(2, 1 << 20);
    let mut a = Buf::new(16);
    let mut b = Buf::new(16);
    let now = net.now;
    let ca = post_all_reduce(&mut net.engines[0], now, &mut a, 4, DataType::F32);
    let cb = post_all_reduce(&mut net.engines[1], now, &mut b, 4, DataType::I32);
    net.run(&[ca.clone(), cb.clone()], Duration::from_millis(1), 1000);
    let e = ca.result().unwrap().unwrap_err();
    assert!(e.message().contains("float") || e.message().contains("int32"), "{}", e.message());
    assert!(cb.result().unwrap().is_err());
}

#[test]
fn a_frame_with_any_header_field_altered_breaks_the_world() {
    // Each field the receiver checks, altered in rank 1's frames of an all-reduce.
    type Tamper = fn(&mut FrameHeader);
    let tampers: [(&str, Tamper); 6] = [
        ("root", |h| h.root ^= 1),
        ("redop", |h| h.redop ^= 1),
        ("dtype", |h| h.dtype ^= 1),
        ("count", |h| h.count += 1),
        ("seq", |h| h.seq += 1),
        ("offset", |h| h.offset += 4),
    ];
    for (field, t) in tampers {
        let mut net = net(2, 1 << 20);
        net.faults[1][0].as_ref().unwrap().lock().unwrap().tamper = Some(t);
        let mut a = Buf::new(64);
        let mut b = Buf::new(64);
        let now = net.now;
        let ca = post_all_reduce(&mut net.engines[0], now, &mut a, 16, DataType::F32);
        let cb = post_all_reduce(&mut net.engines[1], now, &mut b, 16, DataType::F32);
        net.run(&[ca.clone(), cb.clone()], Duration::from_millis(1), 1000);
        let e = ca.result().unwrap().unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::WorldBroken | ErrorKind::InvalidUsage), "{field}: {e}");
        assert!(e.broken_cause().is_some(), "{field}: {e}");
        assert!(cb.result().unwrap().is_err(), "{field}");
    }
}

/// One bit flipped in every data payload from rank 1: without checksums the all-reduce
/// completes with a wrong result (what a corrupting network does to an unchecked world); with
/// them both ranks fail, rank 0 naming the CRC32C mismatch and rank 1.
#[test]
fn a_flipped_payload_bit_is_caught_by_the_checksum_and_only_by_it() {
    for checksum in [Checksum::Off, Checksum::All] {
        let mut net = net_checked(2, 1 << 20, |_| hb(), checksum);
        net.faults[1][0].as_ref().unwrap().lock().unwrap().flip_payload = true;
        let mut a = Buf::new(64);
        let mut b = Buf::new(64);
        a.fill_f32(&[1.0; 16]);
        b.fill_f32(&[2.0; 16]);
        let now = net.now;
        let ca = post_all_reduce(&mut net.engines[0], now, &mut a, 16, DataType::F32);
        let cb = post_all_reduce(&mut net.engines[1], now, &mut b, 16, DataType::F32);
        net.run(&[ca.clone(), cb.clone()], Duration::from_millis(1), 1000);
        match checksum {
            Checksum::Off => {
                assert!(ca.result().unwrap().is_ok(), "unchecked: {:?}", ca.result());
                assert!(a.f32s().iter().any(|x| *x != 3.0), "the flipped bit did not show: {:?}", a.f32s());
            }
            _ => {
                let e = ca.result().unwrap().unwrap_err();
                assert!(
                    matches!(e.broken_cause(), Some(BrokenCause::Protocol { peer: 1, detail }) if detail.contains("CRC32C")),
                    "{e}"
                );
                assert!(cb.result().unwrap().is_err());
            }
        }
    }
}

#[test]
fn silent_peer_breaks_the_world_after_the_heartbeat_timeout() {
    let mut net = net(2, 1 << 20);
    let mut a = Buf::new(64);
    let start = net.now;
    let ca = post_all_reduce(&mut net.engines[0], start, &mut a, 16, DataType::F32);
    // Rank 1 never posts and the link is cut: rank 0 hears nothing.
    *net.faults[0][1].as_ref().unwrap().lock().unwrap() = Faults { cut: true, ..Default::default() };
    let mut t = start;
    while !ca.is_done() {
        t += Duration::from_millis(10);
        net.engines[0].pass(t);
        assert!(t - start < Duration::from_secs(5), "never detected");
    }
    let waited = t - start;
    assert!(waited > hb().timeout && waited <= hb().timeout + Duration::from_millis(30), "{waited:?}");
    let e = ca.result().unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WorldBroken);
    assert!(matches!(e.broken_cause(), Some(BrokenCause::PeerUnresponsive { peer: 1, .. })), "{e}");
}

/// Passes the engines in `ranks` every 10 ms for `span`.
fn pass_for(net: &mut Net, ranks: &[usize], span: Duration) {
    let end = net.now + span;
    while net.now < end {
        net.now += Duration::from_millis(10);
        for &r in ranks {
            net.engines[r].pass(net.now);
        }
    }
}

#[test]
fn a_rank_that_was_stalled_does_not_accuse_a_live_peer() {
    // Rank 1 (timeout 1 s) stops passing for 2 s; rank 0 (timeout 10 s) keeps sending
    // heartbeats, which wait in the link. On resume rank 1 reads them before it judges.
    let long = Heartbeat { interval: Duration::from_millis(100), timeout: Duration::from_secs(10) };
    let mut net = net_with(2, 1 << 20, |r| if r == 0 { long } else { hb() });
    pass_for(&mut net, &[0, 1], Duration::from_millis(500));
    pass_for(&mut net, &[0], Duration::from_secs(2));
    let now = net.now;
    net.engines[1].pass(now);
    assert!(net.engines[1].broken().is_none(), "{:?}", net.engines[1].broken());
    pass_for(&mut net, &[0, 1], Duration::from_millis(500));
    let mut a = Buf::new(64);
    let mut b = Buf::new(64);
    let now = net.now;
    let ca = post_all_reduce(&mut net.engines[0], now, &mut a, 16, DataType::F32);
    let cb = post_all_reduce(&mut net.engines[1], now, &mut b, 16, DataType::F32);
    net.run(&[ca.clone(), cb.clone()], Duration::from_millis(1), 1000);
    assert!(ca.result().unwrap().is_ok() && cb.result().unwrap().is_ok());
}

#[test]
fn a_stalled_rank_reports_the_peer_that_gave_up_on_it() {
    // Rank 1 stalls past the timeout: rank 0 rightly finds it silent and aborts. On resume
    // rank 1 must report that abort, not accuse rank 0 of the silence it caused itself.
    let mut net = net(2, 1 << 20);
    pass_for(&mut net, &[0, 1], Duration::from_millis(500));
    pass_for(&mut net, &[0], Duration::from_secs(2));
    assert!(
        matches!(net.engines[0].broken(), Some(BrokenCause::PeerUnresponsive { peer: 1, .. })),
        "{:?}",
        net.engines[0].broken()
    );
    let now = net.now;
    net.engines[1].pass(now);
    let cause = net.engines[1].broken().cloned();
    assert!(matches!(cause, Some(BrokenCause::PeerAborted { peer: 0, .. })), "{cause:?}");
}

#[test]
fn idle_world_stays_alive_on_heartbeats_alone() {
    let mut net = net(3, 1 << 20);
    let start = net.now;
    let mut t = start;
    while t - start < Duration::from_secs(10) {
        t += Duration::from_millis(50);
        for e in &mut net.engines {
            e.pass(t);
        }
    }
    for e in &net.engines {
        assert!(e.broken().is_none());
        assert!(e.stats().heartbeats_sent >= 2 * 10_000 / 100 - 4);
    }
}

#[test]
fn closed_peer_breaks_every_pending_operation_at_once() {
    let mut net = net(3, 1 << 20);
    let now = net.now;
    let mut a = Buf::new(4096);
    let ca = post_all_reduce(&mut net.engines[0], now, &mut a, 1024, DataType::F32);
    net.engines[0].pass(now);
    // Rank 2 dies: its engine (and links) go away.
    drop(net.engines.pop());
    net.engines[0].pass(now);
    let e = ca.result().expect("failed in the same pass").unwrap_err();
    assert!(matches!(e.broken_cause(), Some(BrokenCause::PeerClosed { peer: 2, .. })), "{e}");
    // Later operations fail at once too, as WorldBroken.
    let mut b = Buf::new(16);
    let cb = post_all_reduce(&mut net.engines[0], now, &mut b, 4, DataType::F32);
    assert_eq!(cb.result().unwrap().unwrap_err().kind(), ErrorKind::WorldBroken);
}

#[test]
fn frames_of_another_generation_are_dropped_and_counted() {
    let mut net = net(2, 1 << 20);
    // Forge a frame of generation 0 into rank 1's input, ahead of the real traffic.
    let mut forged = FrameHeader::control(FrameKind::Data, 42, 0, 4);
    forged.op = Some(OpKind::AllReduce);
    forged.dtype = DataType::F32 as u8;
    forged.count = 1;
    forged.seq = 1;
    forged.total = 4;
    {
        let p = net.engines[0].peers[1].as_mut().unwrap();
        let mut w = 0;
        p.link.write(&forged.encode(), &[0xff; 4], &mut w).unwrap();
    }
    let now = net.now;
    let mut a = Buf::new(4);
    let mut b = Buf::new(4);
    a.bytes().copy_from_slice(&1.5f32.to_le_bytes());
    b.bytes().copy_from_slice(&2.0f32.to_le_bytes());
    let ca = post_all_reduce(&mut net.engines[0], now, &mut a, 1, DataType::F32);
    let cb = post_all_reduce(&mut net.engines[1], now, &mut b, 1, DataType::F32);
    net.run(&[ca.clone(), cb.clone()], Duration::from_micros(10), 1000);
    assert!(ca.result().unwrap().is_ok() && cb.result().unwrap().is_ok());
    assert_eq!(f32::from_le_bytes(b.bytes().try_into().unwrap()), 3.5);
    assert_eq!(net.engines[1].stats().stale_frames_dropped, 1);
}

#[test]
fn operation_deadline_breaks_the_world_with_timeout() {
    let mut net = net(2, 1 << 20);
    let now = net.now;
    let mut a = Buf::new(4);
    let desc = OpDesc {
        kind: OpKind::P2p,
        dtype: DataType::F32,
        redop: ReduceOp::Sum,
        count: 1,
        root: 1,
        is_send: false,
        in_place: false,
    };
    let c = Completion::new();
    net.engines[0].post(
        vec![Posted {
            desc,
            send: RawBuf::EMPTY,
            recv: a.raw(),
            completion: c.clone(),
            timeout: Some(Duration::from_millis(300)),
            keepalive: None,
        }],
        || now,
    );
    net.run(std::slice::from_ref(&c), Duration::from_millis(10), 100);
    let e = c.result().unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(net.engines[0].broken().is_some());
    // The peer learns of it from the abort frame.
    let t = net.now + Duration::from_millis(10);
    net.engines[1].pass(t);
    assert!(
        matches!(net.engines[1].broken(), Some(BrokenCause::PeerAborted { peer: 0, .. })),
        "{:?}",
        net.engines[1].broken()
    );
}

#[test]
fn frames_arriving_before_their_receive_wait_in_order() {
    let mut net = net(2, 1 << 20);
    let now = net.now;
    // Rank 0 runs three all-reduces before rank 1 posts any.
    let mut bufs: Vec<Buf> = (0..6).map(|_| Buf::new(4 * 1000)).collect();
    let mut cs = Vec::new();
    for (i, b) in bufs.iter_mut().enumerate() {
        let v: Vec<f32> = (0..1000).map(|j| (i * 1000 + j) as f32).collect();
        b.bytes().copy_from_slice(bytemuck::cast_slice(&v));
    }
    for i in 0..3 {
        cs.push(post_all_reduce(&mut net.engines[0], now, &mut bufs[i], 1000, DataType::F32));
    }
    for _ in 0..50 {
        net.engines[0].pass(now);
    }
    for i in 3..6 {
        cs.push(post_all_reduce(&mut net.engines[1], now, &mut bufs[i], 1000, DataType::F32));
    }
    net.run(&cs, Duration::from_micros(10), 10_000);
    for i in 0..3 {
        let got: Vec<f32> = bytemuck::cast_slice(bufs[i].bytes()).to_vec();
        let want: Vec<f32> = (0..1000).map(|j| (i * 1000 + j) as f32 + ((i + 3) * 1000 + j) as f32).collect();
        assert_eq!(got, want);
        let other = bufs[i + 3].bytes().to_vec();
        assert_eq!(bufs[i].bytes(), &other[..]);
    }
}

#[test]
fn a_peer_that_leaves_after_its_part_lets_the_others_finish() {
    // Rank 0 sends to rank 1 and leaves gracefully; rank 1 is still sending to rank 2. Rank
    // 1's operation needs nothing more from rank 0, so it completes; then the world breaks.
    let mut net = net(3, 1 << 20);
    let now = net.now;
    let p2p = |root: usize, is_send: bool| OpDesc {
        kind: OpKind::P2p,
        dtype: DataType::U8,
        redop: ReduceOp::Sum,
        count: 8,
        root,
        is_send,
        in_place: false,
    };
    let mut bufs: Vec<Buf> = (0..4).map(|_| Buf::new(8)).collect();
    let post = |e: &mut Engine, b: &mut Buf, d: OpDesc| {
        let c = Completion::new();
        let (s, r) = if d.is_send { (b.raw(), RawBuf::EMPTY) } else { (RawBuf::EMPTY, b.raw()) };
        e.post(
            vec![Posted { desc: d, send: s, recv: r, completion: c.clone(), timeout: None, keepalive: None }],
            || now,
        );
        c
    };
    let c0 = post(&mut net.engines[0], &mut bufs[0], p2p(1, true));
    net.engines[0].pass(now);
    assert!(c0.result().unwrap().is_ok());
    net.engines[0].close();
    let c1a = post(&mut net.engines[1], &mut bufs[1], p2p(0, false));
    let c1b = post(&mut net.engines[1], &mut bufs[2], p2p(2, true));
    net.engines[1].pass(now);
    assert!(c1a.result().unwrap().is_ok(), "{:?}", c1a.result());
    assert!(c1b.result().unwrap().is_ok(), "{:?}", c1b.result());
    // Now idle with a departed peer: broken, with the cause naming rank 0.
    let cause = net.engines[1].broken().cloned().expect("broken once idle");
    assert!(matches!(cause, BrokenCause::PeerLeft { peer: 0 }), "{cause}");
    // Rank 2 still receives rank 1's message (sent before rank 1 closed its links).
    let c2 = post(&mut net.engines[2], &mut bufs[3], p2p(1, false));
    net.engines[2].pass(now);
    assert!(c2.result().unwrap().is_ok(), "{:?}", c2.result());
}

#[test]
fn a_peer_that_leaves_while_needed_fails_the_operation_at_once() {
    let mut net = net(2, 1 << 20);
    let now = net.now;
    let mut b = Buf::new(64);
    let c = post_all_reduce(&mut net.engines[1], now, &mut b, 16, DataType::F32);
    net.engines[0].close();
    net.engines[1].pass(now);
    let e = c.result().expect("failed in the same pass").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WorldBroken);
    assert!(e.message().contains("closed the world"), "{e}");
}

#[test]
fn ranks_that_disagree_on_the_root_are_caught_whatever_the_pattern() {
    for kind in [OpKind::Broadcast, OpKind::Reduce, OpKind::Gather, OpKind::Scatter] {
        for n in [2, 3, 4] {
            // Every rank names itself root: with one-way data nobody would receive anything.
            let mut net = net(n, 1 << 20);
            let now = net.now;
            let mut bufs: Vec<(Buf, Buf)> = (0..n).map(|_| (Buf::new(64 * n), Buf::new(64 * n))).collect();
            let mut cs = Vec::new();
            for (rank, (s, r)) in bufs.iter_mut().enumerate() {
                let desc = OpDesc {
                    kind,
                    dtype: DataType::F32,
                    redop: ReduceOp::Sum,
                    count: 16,
                    root: rank,
                    is_send: false,
                    in_place: false,
                };
                let c = Completion::new();
                let (sb, rb) = (s.raw(), r.raw());
                net.engines[rank].post(
                    vec![Posted { desc, send: sb, recv: rb, completion: c.clone(), timeout: None, keepalive: None }],
                    || now,
                );
                cs.push(c);
            }
            net.run(&cs, Duration::from_millis(1), 1000);
            for c in &cs {
                let e = c.result().unwrap().unwrap_err();
                assert!(e.is_world_broken(), "{kind:?} n={n}: {e}");
            }
            assert!(
                cs.iter().any(|c| c.result().unwrap().unwrap_err().message().contains("root=")),
                "{kind:?} n={n}: no rank named the roots"
            );
        }
    }
}

#[test]
fn all_reduce_finishes_when_the_peer_closes_right_after_its_part() {
    let mut net = net(2, 1 << 20);
    let now = net.now;
    let mut a = Buf::new(32);
    let mut b = Buf::new(32);
    let ca = post_all_reduce(&mut net.engines[0], now, &mut a, 8, DataType::U32);
    let cb = post_all_reduce(&mut net.engines[1], now, &mut b, 8, DataType::U32);
    // Rank 0 only posts; rank 1 runs to completion and closes.
    net.engines[0].pass(now);
    for _ in 0..10 {
        net.engines[1].pass(now);
    }
    assert!(cb.result().unwrap().is_ok());
    net.engines[1].close();
    for _ in 0..10 {
        net.engines[0].pass(now);
    }
    assert!(ca.result().expect("rank 0 finished").is_ok(), "{:?}", ca.result());
}

#[test]
fn what_a_peer_sent_before_leaving_can_still_be_received() {
    // Rank 1 sends and closes before rank 0 has posted its receive: the data is kept, the
    // receive gets it, and only then does the world break.
    let mut net = net(2, 1 << 20);
    let now = net.now;
    let mut msg = Buf::new(16);
    msg.bytes().copy_from_slice(&[7u8; 16]);
    let desc = |is_send: bool, root: usize| OpDesc {
        kind: OpKind::P2p,
        dtype: DataType::U8,
        redop: ReduceOp::Sum,
        count: 16,
        root,
        is_send,
        in_place: false,
    };
    let c1 = Completion::new();
    let m = msg.raw();
    net.engines[1].post(
        vec![Posted {
            desc: desc(true, 0),
            send: m,
            recv: RawBuf::EMPTY,
            completion: c1.clone(),
            timeout: None,
            keepalive: None,
        }],
        || now,
    );
    net.engines[1].pass(now);
    assert!(c1.result().unwrap().is_ok());
    net.engines[1].close();
    net.engines[0].pass(now); // sees the data, then the close: keeps the data
    assert!(net.engines[0].broken().is_none(), "{:?}", net.engines[0].broken());
    let mut got = Buf::new(16);
    let c0 = Completion::new();
    let g = got.raw();
    net.engines[0].post(
        vec![Posted {
            desc: desc(false, 1),
            send: RawBuf::EMPTY,
            recv: g,
            completion: c0.clone(),
            timeout: None,
            keepalive: None,
        }],
        || now,
    );
    net.engines[0].pass(now);
    assert!(c0.result().unwrap().is_ok(), "{:?}", c0.result());
    assert_eq!(got.bytes(), &[7u8; 16]);
    assert!(matches!(net.engines[0].broken(), Some(BrokenCause::PeerLeft { peer: 1 })));
    // Asking for more than it sent fails at once.
    let c2 = Completion::new();
    net.engines[0].post(
        vec![Posted {
            desc: desc(false, 1),
            send: RawBuf::EMPTY,
            recv: g,
            completion: c2.clone(),
            timeout: None,
            keepalive: None,
        }],
        || now,
    );
    assert_eq!(c2.result().unwrap().unwrap_err().kind(), ErrorKind::WorldBroken);
}

/// A pass does about a budget's worth of local work, also when the work is one large copy or
/// many queued ones (a one-rank world's queue is nothing else): the copy goes in pieces over
/// several passes, and arrives whole.
#[test]
fn a_pass_does_a_budget_of_local_work_in_pieces() {
    let mut net = net(1, 1 << 20);
    let now = net.now;
    let len = 10 * LOCAL_PIECE + 4;
    let mut send = Buf::new(len);
    let v: Vec<f32> = (0..len / 4).map(|i| i as f32).collect();
    send.fill_f32(&v);
    let mut recv = Buf::new(len);
    let desc = OpDesc {
        kind: OpKind::AllGather,
        dtype: DataType::F32,
        redop: ReduceOp::Sum,
        count: len / 4,
        root: 0,
        is_send: false,
        in_place: false,
    };
    let c = Completion::new();
    let e = &mut net.engines[0];
    e.post(
        vec![Posted {
            desc,
            send: send.raw(),
            recv: recv.raw(),
            completion: c.clone(),
            timeout: None,
            keepalive: None,
        }],
        || now,
    );
    let mut passes = 0;
    while !c.is_done() {
        let before = e.local_bytes;
        e.pass(now);
        passes += 1;
        assert!(
            e.local_bytes - before <= PASS_BUDGET + LOCAL_PIECE as u64,
            "one pass moved {}",
            e.local_bytes - before
        );
        assert!(passes < 100, "the copy never finished");
    }
    assert!(passes >= 5, "{len} bytes in {passes} passes");
    assert_eq!(recv.f32s(), v);
}
