//! Shared by the GPU tests (`tests/cuda.rs`, `tests/nccl.rs`): finding a GPU, streams, and
//! every operation of a `DeviceWorld` against the host reference, whichever backend runs it.

use std::sync::Arc;

use super::reference::{blocks, gathered, input, reduced};
use super::Ctx;
use multiworld::cuda::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use multiworld::{bf16, f16, BackendChoice, DeviceWorld, Element, ReduceOp, WorldManager};

/// Whether a GPU is here; prints which test skips and why not.
pub fn have_gpu() -> bool {
    // The test harness names each test's thread after the test.
    let test = std::thread::current().name().unwrap_or("a GPU test").to_string();
    match multiworld::cuda::device_count() {
        Ok(n) if n > 0 => true,
        Ok(_) => {
            super::skipped(&test, "no CUDA device on this machine");
            false
        }
        Err(e) => {
            super::skipped(&test, &e.to_string());
            false
        }
    }
}

/// The GPU of `rank` (ranks share GPUs round robin) and a fresh stream on it.
pub fn stream_for(rank: usize) -> Arc<CudaStream> {
    let n = multiworld::cuda::device_count().expect("devices");
    let ctx = multiworld::cuda::context(rank % n).expect("CUDA context");
    ctx.new_stream().expect("stream")
}

pub fn typed<T: Element>(b: &[u8]) -> Vec<T> {
    b.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect()
}

pub struct Dev<'a> {
    pub dw: &'a DeviceWorld,
    pub s: Arc<CudaStream>,
    pub n: usize,
    pub rank: usize,
}

impl Dev<'_> {
    pub fn up<T: Element + DeviceRepr>(&self, b: &[u8]) -> CudaSlice<T> {
        self.s.clone_htod(&typed::<T>(b)).expect("upload")
    }

    pub fn zeros<T: Element + DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> CudaSlice<T> {
        self.s.alloc_zeros::<T>(n).expect("alloc")
    }

    /// Downloads `buf` (after the stream has run everything before) and compares it.
    pub fn check<T: Element + DeviceRepr>(&self, what: &str, buf: &CudaSlice<T>, want: &[u8]) {
        let got = self.s.clone_dtoh(buf).expect("download");
        let got: &[u8] = bytemuck::cast_slice(&got);
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b);
            panic!("rank {} {what}: wrong result (first difference at byte {at:?} of {})", self.rank, want.len());
        }
    }

    pub fn run<T: Element + DeviceRepr + ValidAsZeroBits>(&self) {
        let d = T::DATA_TYPE;
        let (n, rank, root, dw) = (self.n, self.rank, self.n - 1, self.dw);
        for count in [1usize, 4097, 1 << 20] {
            let what = |op: &str| format!("{op} {d} count={count} n={n}");
            let mine = input(d, rank, 0, count);
            for op in ReduceOp::ALL {
                let want = reduced(d, op, n, 0, count);
                let send = self.up::<T>(&mine);
                let mut recv = self.zeros::<T>(count);
                dw.all_reduce(&send, &mut recv, &op).unwrap();
                self.check(&what(&format!("all_reduce {op}")), &recv, &want);
                let mut buf = self.up::<T>(&mine);
                dw.all_reduce_in_place(&mut buf, &op).unwrap();
                self.check(&what(&format!("all_reduce in place {op}")), &buf, &want);
                let mut recv = self.zeros::<T>(count);
                dw.reduce(&send, &mut recv, &op, root).unwrap();
                if rank == root {
                    self.check(&what(&format!("reduce {op}")), &recv, &want);
                }
                let send = self.up::<T>(&blocks(d, rank, n, count));
                let mut recv = self.zeros::<T>(count);
                dw.reduce_scatter(&send, &mut recv, &op).unwrap();
                self.check(&what(&format!("reduce_scatter {op}")), &recv, &reduced(d, op, n, rank, count));
            }
            let root_data = input(d, root, 0, count);
            let send = self.up::<T>(&mine);
            let mut recv = self.zeros::<T>(count);
            dw.broadcast((rank == root).then_some(&send), &mut recv, root).unwrap();
            self.check(&what("broadcast"), &recv, &root_data);
            let mut buf = if rank == root { self.up::<T>(&mine) } else { self.zeros::<T>(count) };
            dw.broadcast_in_place(&mut buf, root).unwrap();
            self.check(&what("broadcast in place"), &buf, &root_data);
            let mut recv = self.zeros::<T>(count * n);
            dw.all_gather(&send, &mut recv).unwrap();
            self.check(&what("all_gather"), &recv, &gathered(d, n, 0, count));
            let blocks_in = self.up::<T>(&blocks(d, rank, n, count));
            let mut recv = self.zeros::<T>(count * n);
            dw.all_to_all(&blocks_in, &mut recv).unwrap();
            self.check(&what("all_to_all"), &recv, &gathered(d, n, rank, count));
            // Around a ring: even ranks send first, odd ranks receive first, so that the
            // in-order operations of each stream meet.
            let (right, left) = ((rank + 1) % n, (rank + n - 1) % n);
            let mut got = self.zeros::<T>(count);
            if rank % 2 == 0 {
                dw.send(&send, right).unwrap();
                dw.recv(&mut got, left).unwrap();
            } else {
                dw.recv(&mut got, left).unwrap();
                dw.send(&send, right).unwrap();
            }
            self.check(&what("send/recv"), &got, &input(d, left, 0, count));
            // The same exchange as a group: every rank sends and receives at once.
            let mut got = self.zeros::<T>(count);
            let mut g = dw.group();
            g.send(&send, right).unwrap();
            g.recv(&mut got, left).unwrap();
            g.end().unwrap();
            self.check(&what("grouped send/recv"), &got, &input(d, left, 0, count));
        }
        dw.synchronize().unwrap();
    }
}

/// Every operation and data type on a world of the process's default backend (`MW_BACKEND`).
pub fn collectives(ctx: &Ctx) {
    let s = stream_for(ctx.rank);
    let m = WorldManager::new();
    let w = m.init_world("device", &ctx.id(), ctx.rank, ctx.size).unwrap();
    let dw = DeviceWorld::new(w, s.clone()).unwrap();
    let dev = Dev { dw: &dw, s, n: ctx.size, rank: ctx.rank };
    dev.run::<i8>();
    dev.run::<u8>();
    dev.run::<i32>();
    dev.run::<u32>();
    dev.run::<i64>();
    dev.run::<u64>();
    dev.run::<f16>();
    dev.run::<bf16>();
    dev.run::<f32>();
    dev.run::<f64>();
    meet(&dw);
    println!("rank {}: every operation on device memory checked ({:?})", ctx.rank, dw.world().backend());
}

/// Returns once every rank has come here, so that nobody leaves early (a rank that left breaks
/// the world for the others): the host barrier, or on an NCCL world (which refuses host
/// memory) an all-reduce on the device, waited for.
pub fn meet(dw: &DeviceWorld) {
    if dw.world().backend() == BackendChoice::Nccl {
        let one = dw.stream().clone_htod(&[1u32]).unwrap();
        let mut all = dw.stream().alloc_zeros::<u32>(1).unwrap();
        dw.all_reduce(&one, &mut all, &ReduceOp::Sum).unwrap();
        dw.synchronize().unwrap();
    } else {
        dw.world().barrier().unwrap();
    }
}
