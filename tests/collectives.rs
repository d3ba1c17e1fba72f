//! Every operation x every data type x every reduction x counts {0, 1, 7, 4097, 1048576} x
//! world sizes {2, 3, 4}, in place and out of place, across real processes, over shared memory
//! and over TCP (and, with the `rdma` feature, over RDMA on the software provider). Each rank checks its own output against the reference it computes itself;
//! all-reduce results are also compared bit for bit across ranks.

mod common;

use std::time::Duration;

use common::reference::{blocks, gathered, input, reduced};
use common::Ctx;
use multiworld::{bf16, f16, Element, ReduceOp, TransportKind, World, WorldManager};

const COUNTS: [usize; 5] = [0, 1, 7, 4097, 1_048_576];

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[("matrix", matrix)]);
}

fn typed<T: Element>(b: &[u8]) -> Vec<T> {
    b.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect()
}

fn bytes<T: Element>(v: &[T]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// FNV-1a, to compare outputs across ranks cheaply.
fn hash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ *x as u64).wrapping_mul(0x100_0000_01b3))
}

struct Check<'a> {
    w: &'a World,
    n: usize,
    rank: usize,
    root: usize,
    hashes: Vec<u64>,
}

impl Check<'_> {
    fn ok(&self, what: &str, got: &[u8], want: &[u8]) {
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b);
            panic!("rank {} {what}: wrong result (first difference at byte {at:?} of {})", self.rank, want.len());
        }
    }

    fn run<T: Element>(&mut self) {
        let d = T::DATA_TYPE;
        let (n, rank, root, w) = (self.n, self.rank, self.root, self.w);
        for count in COUNTS {
            let what = |op: &str| format!("{op} {d} count={count} n={n}");
            for op in ReduceOp::ALL {
                let want = reduced(d, op, n, 0, count);
                // all_reduce, out of place and in place
                let send: Vec<T> = typed(&input(d, rank, 0, count));
                let mut recv = vec![T::zeroed(); count];
                w.all_reduce(&send, &mut recv, op).unwrap();
                self.ok(&what(&format!("all_reduce {op}")), bytes(&recv), &want);
                self.hashes.push(hash(bytes(&recv)));
                let mut buf = send.clone();
                w.all_reduce_in_place(&mut buf, op).unwrap();
                self.ok(&what(&format!("all_reduce in place {op}")), bytes(&buf), &want);
                // reduce to the root
                let mut recv = vec![T::zeroed(); if rank == root { count } else { 0 }];
                w.reduce(&send, &mut recv, op, root).unwrap();
                if rank == root {
                    self.ok(&what(&format!("reduce {op}")), bytes(&recv), &want);
                }
                let mut buf = send.clone();
                w.reduce_in_place(&mut buf, op, root).unwrap();
                if rank == root {
                    self.ok(&what(&format!("reduce in place {op}")), bytes(&buf), &want);
                }
                // reduce_scatter: count is per rank
                let want_rs = reduced(d, op, n, rank, count);
                let send: Vec<T> = typed(&blocks(d, rank, n, count));
                let mut recv = vec![T::zeroed(); count];
                w.reduce_scatter(&send, &mut recv, op).unwrap();
                self.ok(&what(&format!("reduce_scatter {op}")), bytes(&recv), &want_rs);
                let mut buf = send;
                w.reduce_scatter_in_place(&mut buf, op).unwrap();
                self.ok(
                    &what(&format!("reduce_scatter in place {op}")),
                    bytes(&buf[rank * count..(rank + 1) * count]),
                    &want_rs,
                );
            }
            let mine: Vec<T> = typed(&input(d, rank, 0, count));
            // broadcast
            let root_data = input(d, root, 0, count);
            let mut recv = vec![T::zeroed(); count];
            w.broadcast((rank == root).then_some(&mine[..]), &mut recv, root).unwrap();
            self.ok(&what("broadcast"), bytes(&recv), &root_data);
            let mut buf = if rank == root { mine.clone() } else { vec![T::zeroed(); count] };
            w.broadcast_in_place(&mut buf, root).unwrap();
            self.ok(&what("broadcast in place"), bytes(&buf), &root_data);
            // all_gather
            let want = gathered(d, n, 0, count);
            let mut recv = vec![T::zeroed(); count * n];
            w.all_gather(&mine, &mut recv).unwrap();
            self.ok(&what("all_gather"), bytes(&recv), &want);
            let mut buf = vec![T::zeroed(); count * n];
            buf[rank * count..(rank + 1) * count].copy_from_slice(&mine);
            w.all_gather_in_place(&mut buf).unwrap();
            self.ok(&what("all_gather in place"), bytes(&buf), &want);
            // gather
            let mut recv = vec![T::zeroed(); if rank == root { count * n } else { 0 }];
            w.gather(&mine, &mut recv, root).unwrap();
            if rank == root {
                self.ok(&what("gather"), bytes(&recv), &want);
            }
            // scatter: block r of the root's input goes to rank r
            let send: Vec<T> = if rank == root { typed(&blocks(d, root, n, count)) } else { Vec::new() };
            let mut recv = vec![T::zeroed(); count];
            w.scatter(&send, &mut recv, root).unwrap();
            self.ok(&what("scatter"), bytes(&recv), &input(d, root, rank, count));
            // all_to_all: block r of my input goes to rank r
            let send: Vec<T> = typed(&blocks(d, rank, n, count));
            let mut recv = vec![T::zeroed(); count * n];
            w.all_to_all(&send, &mut recv).unwrap();
            self.ok(&what("all_to_all"), bytes(&recv), &gathered(d, n, rank, count));
            // send/recv around a ring (grouped: every rank sends and receives at once)
            let (right, left) = ((rank + 1) % n, (rank + n - 1) % n);
            let mut got = vec![T::zeroed(); count];
            let mut g = w.group();
            g.send(&mine, right).unwrap();
            g.recv(&mut got, left).unwrap();
            g.end().unwrap();
            self.ok(&what("send/recv"), bytes(&got), &input(d, left, 0, count));
        }
        w.barrier().unwrap();
    }
}

fn matrix(ctx: &Ctx) {
    let m = WorldManager::new();
    // Through etcd when the test gives its address (feature `etcd`), else through the id.
    let w = match ctx.env("MW_TEST_ETCD").as_str() {
        "" => m.init_world("matrix", &ctx.id(), ctx.rank, ctx.size).unwrap(),
        url => m.init_world_at("matrix", url, ctx.rank, ctx.size).unwrap(),
    };
    let want = match ctx.env("MW_TRANSPORT").as_str() {
        "tcp" => TransportKind::Tcp,
        "rdma" => TransportKind::Rdma,
        _ => TransportKind::Shm,
    };
    for (r, t) in w.transports().iter().enumerate() {
        assert_eq!(*t, (r != ctx.rank).then_some(want).or(Some(TransportKind::Loopback)), "transport to rank {r}");
    }
    let mut c = Check { w: &w, n: ctx.size, rank: ctx.rank, root: ctx.size - 1, hashes: Vec::new() };
    c.run::<i8>();
    c.run::<u8>();
    c.run::<i32>();
    c.run::<u32>();
    c.run::<i64>();
    c.run::<u64>();
    c.run::<f16>();
    c.run::<bf16>();
    c.run::<f32>();
    c.run::<f64>();
    // Every rank's all-reduce outputs are bitwise identical: compare the hashes.
    let mut all = vec![0u64; c.hashes.len() * ctx.size];
    w.all_gather(&c.hashes, &mut all).unwrap();
    for (r, theirs) in all.chunks(c.hashes.len()).enumerate() {
        assert_eq!(theirs, &c.hashes[..], "rank {r}'s all_reduce results differ from rank {}'s", ctx.rank);
    }
    println!("rank {}: {} all_reduce results identical across ranks, all operations checked", ctx.rank, c.hashes.len());
}

fn matrix_over(size: usize, transport: &str) {
    // RDMA runs on the software provider: no machine here has an RDMA device.
    let env = [("MW_TRANSPORT", transport.to_string()), ("MW_RDMA_PROVIDER", "soft".to_string())];
    common::run_ranks("matrix", size, &env, Duration::from_secs(400));
}

#[test]
fn matrix_two_ranks_shm() {
    matrix_over(2, "auto");
}

#[test]
fn matrix_three_ranks_shm() {
    matrix_over(3, "auto");
}

#[test]
fn matrix_four_ranks_shm() {
    matrix_over(4, "auto");
}

#[test]
fn matrix_two_ranks_tcp() {
    matrix_over(2, "tcp");
}

#[test]
fn matrix_three_ranks_tcp() {
    matrix_over(3, "tcp");
}

#[test]
fn matrix_four_ranks_tcp() {
    matrix_over(4, "tcp");
}

#[test]
#[cfg(feature = "etcd")]
fn matrix_three_ranks_through_etcd() {
    let Some(etcd) = common::etcd::Server::start("matrix_three_ranks_through_etcd") else { return };
    common::run_ranks("matrix", 3, &[("MW_TEST_ETCD", etcd.url("matrix"))], Duration::from_secs(400));
}

#[test]
#[cfg(feature = "rdma")]
fn matrix_two_ranks_rdma() {
    matrix_over(2, "rdma");
}

#[test]
#[cfg(feature = "rdma")]
fn matrix_three_ranks_rdma() {
    matrix_over(3, "rdma");
}

#[test]
#[cfg(feature = "rdma")]
fn matrix_four_ranks_rdma() {
    matrix_over(4, "rdma");
}
