//! Direct algorithms: point-to-point, gather, scatter, all-to-all, and the small-message forms
//! of all-gather and reduce-scatter (every rank exchanges with every other at once).

use super::{Act, BufId, OpDesc, Plan, Region};
use crate::api::types::ReduceOp;

pub(super) fn p2p(d: &OpDesc) -> Plan {
    let mut p = Plan::default();
    let b = d.bytes();
    if d.is_send {
        p.push(Act::Send { peer: d.root, src: Region::new(BufId::Send, 0, b) }, &[]);
    } else {
        p.push(Act::Recv { peer: d.root, dst: Region::new(BufId::Recv, 0, b), combine: None }, &[]);
    }
    p
}

/// Segment `i` (of `b` bytes each) of buffer `buf`.
fn seg(buf: BufId, b: usize, i: usize) -> Region {
    Region::new(buf, i * b, b)
}

/// Peers in pairwise-exchange order: at step k, send to rank + k and receive from rank - k.
fn pairs(rank: usize, n: usize) -> impl Iterator<Item = (usize, usize)> {
    (1..n).map(move |k| ((rank + k) % n, (rank + n - k) % n))
}

pub(super) fn all_gather(d: &OpDesc, rank: usize, n: usize) -> Plan {
    let mut p = Plan::default();
    let b = d.bytes();
    let input = if d.in_place { seg(BufId::Recv, b, rank) } else { Region::new(BufId::Send, 0, b) };
    if !d.in_place {
        p.push(Act::Copy { src: input, dst: seg(BufId::Recv, b, rank) }, &[]);
    }
    for (to, from) in pairs(rank, n) {
        p.push(Act::Send { peer: to, src: input }, &[]);
        p.push(Act::Recv { peer: from, dst: seg(BufId::Recv, b, from), combine: None }, &[]);
    }
    p
}

pub(super) fn reduce_scatter(d: &OpDesc, rank: usize, n: usize) -> Plan {
    let mut p = Plan::default();
    let b = d.bytes();
    let inbuf = if d.in_place { BufId::Recv } else { BufId::Send };
    let out = if d.in_place { seg(BufId::Recv, b, rank) } else { Region::new(BufId::Recv, 0, b) };
    p.scratch = b * n.saturating_sub(1);
    let mut last = None;
    if !d.in_place {
        last = Some(p.push(Act::Copy { src: seg(inbuf, b, rank), dst: out }, &[]));
    }
    let mut recvs = Vec::new();
    for (k, (to, from)) in pairs(rank, n).enumerate() {
        p.push(Act::Send { peer: to, src: seg(inbuf, b, to) }, &[]);
        let tmp = seg(BufId::Scratch, b, k);
        recvs.push((p.push(Act::Recv { peer: from, dst: tmp, combine: None }, &[]), tmp));
    }
    for (r, tmp) in recvs {
        let mut deps = vec![super::Dep::Done(r)];
        deps.extend(last.map(super::Dep::Done));
        last = Some(p.push(Act::Reduce { src: tmp, dst: out }, &deps));
    }
    if d.redop == ReduceOp::Avg && n > 1 {
        p.push_after(Act::Scale { dst: out }, last);
    }
    p
}

pub(super) fn gather(d: &OpDesc, rank: usize, n: usize) -> Plan {
    let mut p = Plan::default();
    let b = d.bytes();
    let input = Region::new(BufId::Send, 0, b);
    if rank == d.root {
        p.push(Act::Copy { src: input, dst: seg(BufId::Recv, b, rank) }, &[]);
        for k in 1..n {
            let from = (rank + k) % n;
            p.push(Act::Recv { peer: from, dst: seg(BufId::Recv, b, from), combine: None }, &[]);
        }
    } else {
        p.push(Act::Send { peer: d.root, src: input }, &[]);
    }
    p
}

pub(super) fn scatter(d: &OpDesc, rank: usize, n: usize) -> Plan {
    let mut p = Plan::default();
    let b = d.bytes();
    let out = Region::new(BufId::Recv, 0, b);
    if rank == d.root {
        for k in 1..n {
            let to = (rank + k) % n;
            p.push(Act::Send { peer: to, src: seg(BufId::Send, b, to) }, &[]);
        }
        p.push(Act::Copy { src: seg(BufId::Send, b, rank), dst: out }, &[]);
    } else {
        p.push(Act::Recv { peer: d.root, dst: out, combine: None }, &[]);
    }
    p
}

pub(super) fn all_to_all(d: &OpDesc, rank: usize, n: usize) -> Plan {
    let mut p = Plan::default();
    let b = d.bytes();
    p.push(Act::Copy { src: seg(BufId::Send, b, rank), dst: seg(BufId::Recv, b, rank) }, &[]);
    for (to, from) in pairs(rank, n) {
        p.push(Act::Send { peer: to, src: seg(BufId::Send, b, to) }, &[]);
        p.push(Act::Recv { peer: from, dst: seg(BufId::Recv, b, from), combine: None }, &[]);
    }
    p
}
