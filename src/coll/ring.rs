//! Ring algorithms for large messages: reduce-scatter, all-gather, and all-reduce as the two
//! back to back. Each rank sends to its right neighbour and receives from its left one; every
//! send after the first forwards what the previous receive produced (`Stream` dependency), so
//! the whole ring runs as one pipeline at frame granularity.

use super::{segment, Act, BufId, Dep, OpDesc, Plan, Region};
use crate::api::types::ReduceOp;

/// Neighbours of `rank`: (right, left).
fn neighbours(rank: usize, n: usize) -> (usize, usize) {
    ((rank + 1) % n, (rank + n - 1) % n)
}

/// `(rank - k) mod n` for any k.
fn back(rank: usize, k: usize, n: usize) -> usize {
    (rank + n * (k / n + 1) - k) % n
}

pub(super) fn all_reduce(d: &OpDesc, rank: usize, n: usize) -> Plan {
    let e = d.dtype.size();
    let seg = |buf: BufId, i: usize| {
        let (a, b) = segment(d.count, n, i);
        Region::new(buf, a * e, (b - a) * e)
    };
    let input = |i: usize| seg(if d.in_place { BufId::Recv } else { BufId::Send }, i);
    let output = |i: usize| seg(BufId::Recv, i);
    let (right, left) = neighbours(rank, n);
    let mut p = Plan::default();

    // Reduce-scatter: at step s send segment rank-s, receive segment rank-s-1 and combine it
    // with our own input as it arrives.
    let mut rs_send = Vec::new();
    let mut rs_recv: Vec<usize> = Vec::new();
    for s in 0..n - 1 {
        let sseg = back(rank, s, n);
        let (src, deps) = match rs_recv.last() {
            None => (input(sseg), vec![]),
            Some(&r) => (output(sseg), vec![Dep::Stream(r)]),
        };
        rs_send.push(p.push(Act::Send { peer: right, src }, &deps));
        let rseg = back(rank, s + 1, n);
        rs_recv.push(p.push(Act::Recv { peer: left, dst: output(rseg), combine: Some(input(rseg)) }, &[]));
    }
    // Now segment rank+1 is fully reduced here.
    let own = (rank + 1) % n;
    let last_rs = rs_recv[n - 2];
    let mut first_dep = Dep::Stream(last_rs);
    if d.redop == ReduceOp::Avg {
        first_dep = Dep::Done(p.push(Act::Scale { dst: output(own) }, &[Dep::Done(last_rs)]));
    }

    // All-gather: circulate the reduced segments. A receive may overwrite a segment only after
    // the reduce-scatter send that read it has finished.
    let mut ag_recv: Vec<usize> = Vec::new();
    for (s, &rs_send_s) in rs_send.iter().enumerate() {
        let sseg = back(own, s, n);
        let dep = match ag_recv.last() {
            None => first_dep,
            Some(&r) => Dep::Stream(r),
        };
        p.push(Act::Send { peer: right, src: output(sseg) }, &[dep]);
        let rseg = back(rank, s, n);
        let reads_recv = d.in_place || s > 0;
        let deps: Vec<Dep> = if reads_recv { vec![Dep::Done(rs_send_s)] } else { vec![] };
        ag_recv.push(p.push(Act::Recv { peer: left, dst: output(rseg), combine: None }, &deps));
    }
    p
}

pub(super) fn all_gather(d: &OpDesc, rank: usize, n: usize) -> Plan {
    let b = d.bytes();
    let seg = |i: usize| Region::new(BufId::Recv, i * b, b);
    let input = if d.in_place { seg(rank) } else { Region::new(BufId::Send, 0, b) };
    let (right, left) = neighbours(rank, n);
    let mut p = Plan::default();
    if !d.in_place {
        p.push(Act::Copy { src: input, dst: seg(rank) }, &[]);
    }
    let mut prev: Option<usize> = None;
    for s in 0..n - 1 {
        let (src, deps) = match prev {
            None => (input, vec![]),
            Some(r) => (seg(back(rank, s, n)), vec![Dep::Stream(r)]),
        };
        p.push(Act::Send { peer: right, src }, &deps);
        let rseg = back(rank, s + 1, n);
        prev = Some(p.push(Act::Recv { peer: left, dst: seg(rseg), combine: None }, &[]));
    }
    p
}

pub(super) fn reduce_scatter(d: &OpDesc, rank: usize, n: usize) -> Plan {
    let b = d.bytes();
    let inbuf = if d.in_place { BufId::Recv } else { BufId::Send };
    let input = |i: usize| Region::new(inbuf, i * b, b);
    let partial = |i: usize| Region::new(BufId::Scratch, i * b, b);
    let out = if d.in_place { input(rank) } else { Region::new(BufId::Recv, 0, b) };
    let (right, left) = neighbours(rank, n);
    let mut p = Plan { scratch: b * n, ..Plan::default() };
    if n == 1 {
        if !d.in_place {
            p.push(Act::Copy { src: input(0), dst: out }, &[]);
        }
        return p;
    }
    // At step s send segment rank-s-1, receive segment rank-s-2 and combine it with our input;
    // the last receive (segment rank) lands in the output.
    let mut prev: Option<usize> = None;
    for s in 0..n - 1 {
        let sseg = back(rank, s + 1, n);
        let (src, deps) = match prev {
            None => (input(sseg), vec![]),
            Some(r) => (partial(sseg), vec![Dep::Stream(r)]),
        };
        p.push(Act::Send { peer: right, src }, &deps);
        let rseg = back(rank, s + 2, n);
        let dst = if s == n - 2 { out } else { partial(rseg) };
        prev = Some(p.push(Act::Recv { peer: left, dst, combine: Some(input(rseg)) }, &[]));
    }
    if d.redop == ReduceOp::Avg {
        p.push_after(Act::Scale { dst: out }, prev);
    }
    p
}
