//! Tree and chain algorithms: recursive doubling for small all-reduce and barrier, binomial
//! trees for small broadcast and reduce, pipelined chains for large ones.

use super::{Act, BufId, Dep, OpDesc, Plan, Region};
use crate::api::types::ReduceOp;

/// Recursive doubling on the whole buffer. Ranks beyond the largest power of two first fold
/// their data into a partner and get the result back at the end. Every pairwise step computes
/// `mine op theirs` on one side and `theirs op mine` on the other, which are bitwise equal
/// because every reduction is commutative, so all ranks end identical.
pub(super) fn all_reduce_doubling(d: &OpDesc, rank: usize, n: usize) -> Plan {
    let b = d.bytes();
    let buf = Region::new(BufId::Recv, 0, b);
    let tmp = Region::new(BufId::Scratch, 0, b);
    let mut p = Plan { scratch: b, ..Plan::default() };
    let mut last = None;
    let pow = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let extra = n - pow;
    // With separate buffers, a rank that takes part in the doubling from its first step sends
    // its input straight from the send buffer and combines the partner's frames with it into
    // the receive buffer as they arrive: no copy of the input, no scratch, no separate pass of
    // reduction, and the send and the receive need not wait for each other (one reads only the
    // send buffer, the other writes only the receive buffer).
    let direct_first = !d.in_place && b > 0 && pow > 1 && rank < pow && rank >= extra;
    if !d.in_place && b > 0 && !direct_first {
        last = Some(p.push(Act::Copy { src: Region::new(BufId::Send, 0, b), dst: buf }, &[]));
    }
    if n == 1 {
        return p;
    }
    if rank >= pow {
        let s = p.push_after(Act::Send { peer: rank - pow, src: buf }, last);
        p.push(Act::Recv { peer: rank - pow, dst: buf, combine: None }, &[Dep::Done(s)]);
        p.scratch = 0;
        return p;
    }
    if rank < extra {
        let r = p.push(Act::Recv { peer: rank + pow, dst: tmp, combine: None }, &[]);
        let mut deps = vec![Dep::Done(r)];
        deps.extend(last.map(Dep::Done));
        last = Some(p.push(Act::Reduce { src: tmp, dst: buf }, &deps));
    }
    let mut mask = 1;
    if direct_first {
        let input = Region::new(BufId::Send, 0, b);
        p.push(Act::Send { peer: rank ^ 1, src: input }, &[]);
        last = Some(p.push(Act::Recv { peer: rank ^ 1, dst: buf, combine: Some(input) }, &[]));
        mask = 2;
        if pow == 2 {
            p.scratch = 0;
        }
    }
    while mask < pow {
        let partner = rank ^ mask;
        let s = p.push_after(Act::Send { peer: partner, src: buf }, last);
        let r = p.push_after(Act::Recv { peer: partner, dst: tmp, combine: None }, last);
        last = Some(p.push(Act::Reduce { src: tmp, dst: buf }, &[Dep::Done(s), Dep::Done(r)]));
        mask <<= 1;
    }
    if d.redop == ReduceOp::Avg {
        last = Some(p.push_after(Act::Scale { dst: buf }, last));
    }
    if rank < extra {
        p.push_after(Act::Send { peer: rank + pow, src: buf }, last);
    }
    p
}

/// Position of `rank` in a tree or chain rooted at `root`, and back.
fn virt(rank: usize, root: usize, n: usize) -> usize {
    (rank + n - root) % n
}
fn real(v: usize, root: usize, n: usize) -> usize {
    (v + root) % n
}

pub(super) fn broadcast(d: &OpDesc, rank: usize, n: usize, big: bool) -> Plan {
    let b = d.bytes();
    let out = Region::new(BufId::Recv, 0, b);
    let v = virt(rank, d.root, n);
    let mut p = Plan::default();
    // What this rank forwards: the root's own input, or what it received.
    let mut src = out;
    let mut recv = None;
    if v == 0 && !d.in_place {
        src = Region::new(BufId::Send, 0, b);
        p.push(Act::Copy { src, dst: out }, &[]);
    }
    let deps = |recv: Option<usize>| -> Vec<Dep> { recv.map(Dep::Stream).into_iter().collect() };
    if big {
        // Chain: root -> v1 -> v2 -> ... ; each rank forwards frames as they arrive.
        if v > 0 {
            recv = Some(p.push(Act::Recv { peer: real(v - 1, d.root, n), dst: out, combine: None }, &[]));
        }
        if v + 1 < n {
            p.push(Act::Send { peer: real(v + 1, d.root, n), src }, &deps(recv));
        }
        return p;
    }
    // Binomial tree: receive from the parent (v minus its lowest set bit), then send to the
    // children v + 2^k for every 2^k below that bit.
    let mut mask = 1;
    while mask < n {
        if v & mask != 0 {
            recv = Some(p.push(Act::Recv { peer: real(v - mask, d.root, n), dst: out, combine: None }, &[]));
            break;
        }
        mask <<= 1;
    }
    mask >>= 1;
    while mask > 0 {
        if v + mask < n {
            p.push(Act::Send { peer: real(v + mask, d.root, n), src }, &deps(recv));
        }
        mask >>= 1;
    }
    p
}

pub(super) fn reduce(d: &OpDesc, rank: usize, n: usize, big: bool) -> Plan {
    let b = d.bytes();
    let input = Region::new(if d.in_place { BufId::Recv } else { BufId::Send }, 0, b);
    let out = Region::new(BufId::Recv, 0, b);
    let acc_tmp = Region::new(BufId::Scratch, 0, b);
    let v = virt(rank, d.root, n);
    let mut p = Plan::default();
    let avg = d.redop == ReduceOp::Avg && n > 1;
    if n == 1 {
        if !d.in_place {
            p.push(Act::Copy { src: input, dst: out }, &[]);
        }
        return p;
    }
    if big {
        // Chain toward the root: v = n-1 sends its input; each rank in between combines what
        // arrives with its input and forwards the partial result frame by frame.
        if v == n - 1 {
            p.push(Act::Send { peer: real(v - 1, d.root, n), src: input }, &[]);
            return p;
        }
        let dst = if v == 0 { out } else { acc_tmp };
        p.scratch = if v == 0 { 0 } else { b };
        let r = p.push(Act::Recv { peer: real(v + 1, d.root, n), dst, combine: Some(input) }, &[]);
        if v > 0 {
            p.push(Act::Send { peer: real(v - 1, d.root, n), src: dst }, &[Dep::Stream(r)]);
        } else if avg {
            p.push(Act::Scale { dst: out }, &[Dep::Done(r)]);
        }
        return p;
    }
    // Binomial tree: combine each child's partial result as it arrives, then pass ours up.
    let mut children = Vec::new();
    let mut parent = None;
    let mut mask = 1;
    while mask < n {
        if v & mask == 0 {
            if v | mask < n {
                children.push(v | mask);
            }
        } else {
            parent = Some(v - mask);
            break;
        }
        mask <<= 1;
    }
    let acc = if v == 0 { out } else { acc_tmp };
    if v != 0 && !children.is_empty() {
        p.scratch = b;
    }
    let mut value = input;
    let mut last = None;
    for c in children {
        let r = p.push_after(Act::Recv { peer: real(c, d.root, n), dst: acc, combine: Some(value) }, last);
        value = acc;
        last = Some(r);
    }
    match parent {
        Some(pv) => {
            p.push_after(Act::Send { peer: real(pv, d.root, n), src: value }, last);
        }
        None => {
            if avg {
                p.push_after(Act::Scale { dst: out }, last);
            }
        }
    }
    p
}
