//! Collective algorithms, written once as plans of point-to-point transfers.
//!
//! A [`Plan`] is a list of actions — send a region to a peer, receive a region from a peer
//! (optionally combining it with local data as it arrives), copy, reduce or scale locally —
//! with dependencies between them. A `Stream` dependency lets a send forward the bytes of a
//! receive as they arrive (pipelining at frame granularity); a `Done` dependency waits for the
//! whole action (to reuse a region, or for local steps). Sends to one peer leave in plan order
//! and receives from one peer are matched in plan order, so two ranks' plans pair up without
//! tags. Plans know nothing of transports or of the memory kind: the engine executes them over
//! whatever links the world has, with the reduction kernel of the buffers' memory.
//!
//! Algorithm choice depends only on the call (size, count, type), so every rank chooses the
//! same one:
//! - all_reduce: recursive doubling below [`RING_MIN_BYTES`], else ring reduce-scatter +
//!   all-gather (every rank ends bitwise identical: each element is reduced once, on one rank,
//!   then copied);
//! - broadcast / reduce: binomial tree when small, pipelined chain when large;
//! - all_gather / reduce_scatter: direct exchange when small, ring when large;
//! - gather / scatter: direct; all_to_all: pairwise exchange; barrier: recursive doubling on
//!   empty messages;
//! - rooted operations (broadcast, reduce, gather, scatter) also send one empty message around
//!   the ring, so that ranks disagreeing on the root are caught (see `with_agreement`).

pub(crate) mod reduce;
mod ring;
mod simple;
mod tree;

use crate::api::types::{DataType, ReduceOp};
use crate::engine::wire::OpKind;

/// Messages at or above this many bytes use the bandwidth-optimal algorithms.
pub(crate) const RING_MIN_BYTES: usize = 256 << 10;

/// One posted operation, as the ranks agree on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpDesc {
    pub kind: OpKind,
    pub dtype: DataType,
    /// `Sum` for operations that do not reduce.
    pub redop: ReduceOp,
    /// NCCL's count for the operation: elements per rank for all_gather (send count),
    /// reduce_scatter (receive count), gather/scatter and all_to_all (per peer); the buffer
    /// length otherwise.
    pub count: usize,
    /// Root rank of rooted operations; the peer of `send`/`recv`; else 0.
    pub root: usize,
    /// For `P2p`: true for send, false for recv.
    pub is_send: bool,
    /// The input is the output buffer (see each planner for the layout).
    pub in_place: bool,
}

impl OpDesc {
    /// Bytes of `count` elements.
    pub(crate) fn bytes(&self) -> usize {
        self.count * self.dtype.size()
    }

    /// Bytes the send and receive buffers must hold on `rank` of a world of `size`:
    /// `(send, recv)`, or `None` if that does not fit in memory. In-place operations have no
    /// send buffer; their receive buffer holds the input as NCCL lays it out.
    pub(crate) fn buffer_bytes_checked(&self, rank: usize, size: usize) -> Option<(usize, usize)> {
        // No buffer may be larger than `isize::MAX` bytes (C's PTRDIFF_MAX): Rust slices cannot
        // be, and a C count beyond it can only mean reading or writing past the buffer.
        let all = self.count.checked_mul(self.dtype.size())?.checked_mul(size.max(1))?;
        if all > isize::MAX as usize {
            return None;
        }
        Some(self.buffer_bytes(rank, size))
    }

    /// [`OpDesc::buffer_bytes_checked`] for counts known to fit.
    pub(crate) fn buffer_bytes(&self, rank: usize, size: usize) -> (usize, usize) {
        let b = self.bytes();
        let nb = b * size;
        let root = rank == self.root;
        let (send, recv) = match self.kind {
            OpKind::P2p if self.is_send => (b, 0),
            OpKind::P2p => (0, b),
            OpKind::Broadcast => (if root { b } else { 0 }, b),
            OpKind::Reduce => (b, if root { b } else { 0 }),
            OpKind::AllReduce => (b, b),
            OpKind::AllGather => (b, nb),
            OpKind::ReduceScatter => (nb, b),
            OpKind::Gather => (b, if root { nb } else { 0 }),
            OpKind::Scatter => (if root { nb } else { 0 }, b),
            OpKind::AllToAll => (nb, nb),
            OpKind::Barrier => (0, 0),
        };
        if self.in_place {
            match self.kind {
                OpKind::AllGather | OpKind::ReduceScatter => (0, nb),
                // In-place reduce uses the one buffer on every rank.
                OpKind::Reduce => (0, b),
                _ => (0, recv.max(send)),
            }
        } else {
            (send, recv)
        }
    }
}

/// Which of the operation's buffers a region lies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BufId {
    Send,
    Recv,
    Scratch,
}

/// Bytes `[off, off + len)` of one of the operation's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Region {
    pub buf: BufId,
    pub off: usize,
    pub len: usize,
}

impl Region {
    pub(crate) fn new(buf: BufId, off: usize, len: usize) -> Region {
        Region { buf, off, len }
    }
}

/// One action of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// Send `src` to `peer` as one message.
    Send { peer: usize, src: Region },
    /// Receive one message from `peer` into `dst`: a copy, or `dst = combine op incoming`
    /// when `combine` is set (`combine` may be `dst` itself).
    Recv { peer: usize, dst: Region, combine: Option<Region> },
    /// `dst = src`, locally.
    Copy { src: Region, dst: Region },
    /// `dst = dst op src`, locally.
    Reduce { src: Region, dst: Region },
    /// `dst = dst / world size`: the end of an average.
    Scale { dst: Region },
}

/// When an action may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dep {
    /// After the action at this index has finished.
    Done(usize),
    /// Byte `i` may be sent once byte `i` of the action at this index (a receive or copy of a
    /// region of the same length) is in place.
    Stream(usize),
}

/// Dependencies of one action: no planner needs more than three (held inline, so that
/// planning a small operation allocates little).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deps {
    n: u8,
    d: [Dep; 3],
}

impl Deps {
    fn new(deps: &[Dep]) -> Deps {
        debug_assert!(deps.len() <= 3, "a plan step with {} dependencies", deps.len());
        let mut d = [Dep::Done(0); 3];
        let n = deps.len().min(3);
        d[..n].copy_from_slice(&deps[..n]);
        Deps { n: n as u8, d }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Dep> {
        self.d[..self.n as usize].iter()
    }
}

/// One action and what it waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub act: Act,
    pub deps: Deps,
}

/// The schedule of one operation on one rank.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub steps: Vec<Step>,
    /// Bytes of scratch space the plan uses.
    pub scratch: usize,
}

impl Plan {
    /// Appends an action; returns its index for later dependencies.
    pub(crate) fn push(&mut self, act: Act, deps: &[Dep]) -> usize {
        self.steps.push(Step { act, deps: Deps::new(deps) });
        self.steps.len() - 1
    }

    /// Appends an action that waits for `after` (if any) to be done.
    pub(crate) fn push_after(&mut self, act: Act, after: Option<usize>) -> usize {
        match after {
            Some(i) => self.push(act, &[Dep::Done(i)]),
            None => self.push(act, &[]),
        }
    }
}

/// Element range `[start, end)` of segment `i` when `count` elements are cut into `n`
/// balanced segments.
pub(crate) fn segment(count: usize, n: usize, i: usize) -> (usize, usize) {
    let at = |k: usize| ((count as u128 * k as u128) / n as u128) as usize;
    (at(i), at(i + 1))
}

/// Plans `desc` for `rank` of a world of `size`.
pub(crate) fn plan(desc: &OpDesc, rank: usize, size: usize) -> Plan {
    let p = plan_data(desc, rank, size);
    if desc.kind.rooted() && size > 1 {
        with_agreement(p, rank, size)
    } else {
        p
    }
}

/// Rooted operations move data one way only, so ranks that disagree on the root could each
/// finish without ever receiving a frame to check. An empty message from each rank to its
/// right neighbour, sent first, closes that gap: every rank checks its left neighbour's call,
/// and around the ring that means every rank agrees with every other or someone finds out.
fn with_agreement(p: Plan, rank: usize, size: usize) -> Plan {
    let empty = Region::new(BufId::Recv, 0, 0);
    let shift = |d: &Dep| match *d {
        Dep::Done(i) => Dep::Done(i + 2),
        Dep::Stream(i) => Dep::Stream(i + 2),
    };
    let mut q = Plan { scratch: p.scratch, ..Plan::default() };
    q.push(Act::Send { peer: (rank + 1) % size, src: empty }, &[]);
    q.push(Act::Recv { peer: (rank + size - 1) % size, dst: empty, combine: None }, &[]);
    for s in p.steps {
        let deps: Vec<Dep> = s.deps.iter().map(shift).collect();
        q.push(s.act, &deps);
    }
    q
}

fn plan_data(desc: &OpDesc, rank: usize, size: usize) -> Plan {
    let big = desc.bytes() >= RING_MIN_BYTES;
    match desc.kind {
        OpKind::P2p => simple::p2p(desc),
        OpKind::AllReduce if big && size > 1 => ring::all_reduce(desc, rank, size),
        OpKind::AllReduce | OpKind::Barrier => tree::all_reduce_doubling(desc, rank, size),
        OpKind::Broadcast => tree::broadcast(desc, rank, size, big),
        OpKind::Reduce => tree::reduce(desc, rank, size, big),
        OpKind::AllGather if desc.bytes() * size >= RING_MIN_BYTES => ring::all_gather(desc, rank, size),
        OpKind::AllGather => simple::all_gather(desc, rank, size),
        OpKind::ReduceScatter if desc.bytes() * size >= RING_MIN_BYTES => ring::reduce_scatter(desc, rank, size),
        OpKind::ReduceScatter => simple::reduce_scatter(desc, rank, size),
        OpKind::Gather => simple::gather(desc, rank, size),
        OpKind::Scatter => simple::scatter(desc, rank, size),
        OpKind::AllToAll => simple::all_to_all(desc, rank, size),
    }
}
