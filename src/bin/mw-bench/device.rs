//! `--device` (feature `cuda`): operations on CUDA device buffers, each row beside the
//! device-to-device copy bandwidth of the same size measured in the same run, and a row for the
//! crate's reduction kernel against that copy.
//!
//! Every rank uses GPU `rank % count`; ranks may share one GPU. Types: `float`. `send_recv` is
//! the host tables' exchange: each rank sends to the next and receives from the previous, in
//! one group: staged through host memory, or with `MW_DEVICE_IPC=1` through CUDA IPC (then on
//! `cuMemAlloc` buffers, which IPC can share).
//!
//! `--backend native|nccl|both` picks who runs the operations: the crate's own path, NCCL
//! (feature `nccl`), or both on the same buffers and stream, each row then with its ratio to
//! NCCL's of the same size and operation.

use std::sync::Arc;
use std::time::Instant;

use multiworld::cuda::cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use multiworld::cuda::Kernels;
use multiworld::{BackendChoice, DataType, DeviceWorld, ReduceOp, WorldOptions};

use crate::{reference, sizes, typed, Bench};

/// Most staging bytes in flight at once in a timed loop.
const WINDOW: usize = 1 << 30;

/// The device operations measured.
#[derive(Clone, Copy, PartialEq)]
enum DevOp {
    AllReduce,
    SendRecv,
}

impl DevOp {
    fn name(self) -> &'static str {
        match self {
            DevOp::AllReduce => "all_reduce",
            DevOp::SendRecv => "send_recv",
        }
    }
}

struct Device<'a> {
    b: &'a Bench,
    s: Arc<CudaStream>,
    /// `MW_DEVICE_IPC=1`: operations between ranks on this host go through CUDA IPC.
    ipc: bool,
}

impl Device<'_> {
    /// Seconds per operation (slowest rank) and wrong elements (all ranks) for `op` on `count`
    /// floats.
    fn run_op(&self, dw: &DeviceWorld, op: DevOp, count: usize) -> (f64, u64) {
        let (n, r) = (self.b.n, self.b.rank);
        let d = DataType::F32;
        let redop = self.b.args.redop;
        let input = typed::<f32>(&reference::input(d, r, 0, count));
        // Through CUDA IPC, buffers from cuMemAlloc (which it can share; cudarc's pool memory
        // it cannot, and would move by host).
        let shareable = self.ipc;
        let (send, mut recv): (CudaSlice<f32>, CudaSlice<f32>) = if shareable {
            (self.shareable(&input), self.shareable(&vec![0f32; count]))
        } else {
            (self.s.clone_htod(&input).expect("upload"), self.s.alloc_zeros(count).expect("alloc"))
        };
        let (right, left) = ((r + 1) % n, (r + n - 1) % n);
        let once = |recv: &mut CudaSlice<f32>| {
            let res = match op {
                DevOp::AllReduce => dw.all_reduce(&send, recv, &redop),
                DevOp::SendRecv => {
                    let mut g = dw.group();
                    g.send(&send, right).and_then(|_| g.recv(recv, left)).and_then(|_| g.end())
                }
            };
            res.unwrap_or_else(|e| panic!("{} failed: {e}", op.name()));
        };
        // Each operation in flight holds a pinned staging block of its input and output: at
        // most WINDOW bytes of them at once (the stream is drained every `window` operations),
        // and the warm-up grows the pool to that, so that no allocation is timed.
        let window = (WINDOW / (2 * count * 4)).max(1);
        let iters = self.b.args.iters;
        let run = |recv: &mut CudaSlice<f32>, k: usize| {
            for i in 0..k {
                once(recv);
                if (i + 1) % window == 0 {
                    self.s.synchronize().expect("synchronize");
                }
            }
            dw.synchronize().expect("synchronize");
        };
        run(&mut recv, self.b.args.warmup.max(window.min(iters)));
        self.b.w.barrier().expect("barrier");
        let t = Instant::now();
        run(&mut recv, iters);
        let secs = t.elapsed().as_secs_f64() / iters as f64;
        let want = match op {
            DevOp::AllReduce => reference::reduced(d, redop, n, 0, count),
            DevOp::SendRecv => reference::input(d, left, 0, count),
        };
        let got = self.s.clone_dtoh(&recv).expect("download");
        let got: &[u8] = bytemuck::cast_slice(&got);
        let wrong = got.chunks(4).zip(want.chunks(4)).filter(|(a, b)| a != b).count() as u64;
        if shareable {
            self.s.synchronize().expect("synchronize");
            for b in [send, recv] {
                // SAFETY: allocated by `shareable`; the stream is done with it.
                unsafe { sys::cuMemFree_v2(b.leak()) };
            }
        }
        (self.b.max_over_ranks(secs), self.b.sum_over_ranks(wrong))
    }

    /// A buffer from `cuMemAlloc` holding `data`, as a cudarc slice (freed by the caller).
    fn shareable(&self, data: &[f32]) -> CudaSlice<f32> {
        self.s.context().bind_to_thread().expect("bind");
        let mut p = 0;
        // SAFETY: an out-pointer to a local, with the context current.
        let r = unsafe { sys::cuMemAlloc_v2(&mut p, std::mem::size_of_val(data).max(4)) };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "cuMemAlloc");
        // SAFETY: a fresh allocation of `data.len()` floats in the stream's context.
        let mut slice = unsafe { self.s.upgrade_device_ptr::<f32>(p, data.len()) };
        self.s.memcpy_htod(data, &mut slice).expect("upload");
        slice
    }

    /// Device-to-device copy bandwidth (bytes copied per second, GB/s) of `bytes`.
    fn copy_gbps(&self, bytes: usize) -> f64 {
        let src: CudaSlice<u8> = self.s.alloc_zeros(bytes.max(1)).expect("alloc");
        let mut dst: CudaSlice<u8> = self.s.alloc_zeros(bytes.max(1)).expect("alloc");
        let reps = (1usize << 30).div_ceil(bytes.max(1)).clamp(5, 10_000);
        self.s.memcpy_dtod(&src, &mut dst).expect("copy");
        self.s.synchronize().expect("sync");
        let t = Instant::now();
        for _ in 0..reps {
            self.s.memcpy_dtod(&src, &mut dst).expect("copy");
        }
        self.s.synchronize().expect("sync");
        (bytes * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
    }

    /// The reduction kernel combining two float buffers of `bytes` into a third, as GB/s of
    /// bytes read and written, and the device copy of the same size counted the same way.
    fn kernel_vs_copy(&self, bytes: usize) -> (f64, f64, u64) {
        let count = bytes / 4;
        let k = Kernels::load(self.s.context()).expect("kernels");
        let a: CudaSlice<f32> = self.s.clone_htod(&vec![1.5f32; count]).expect("upload");
        let b: CudaSlice<f32> = self.s.clone_htod(&vec![2.25f32; count]).expect("upload");
        let mut out: CudaSlice<f32> = self.s.alloc_zeros(count).expect("alloc");
        let reps = (1usize << 30).div_ceil(bytes).clamp(5, 10_000);
        let run = |out: &mut CudaSlice<f32>, reps: usize| {
            let (pa, _ga) = a.device_ptr(&self.s);
            let (pb, _gb) = b.device_ptr(&self.s);
            let (po, _go) = out.device_ptr_mut(&self.s);
            for _ in 0..reps {
                // SAFETY: three live buffers of `count` floats on this stream's device.
                unsafe { k.combine(&self.s, DataType::F32, ReduceOp::Sum, po, &[pa, pb], count) }.expect("combine");
            }
        };
        run(&mut out, 1);
        self.s.synchronize().expect("sync");
        let t = Instant::now();
        run(&mut out, reps);
        self.s.synchronize().expect("sync");
        let kernel = (3 * bytes * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
        let wrong = self.s.clone_dtoh(&out).expect("download").iter().filter(|v| **v != 3.75).count() as u64;
        (kernel, 2.0 * self.copy_gbps(bytes), wrong)
    }
}

/// The number of GPUs, or why none can be used.
pub(crate) fn gpus() -> Result<usize, String> {
    match multiworld::cuda::device_count() {
        Ok(n) if n > 0 => Ok(n),
        Ok(_) => Err("no CUDA device on this machine".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Why `backends` cannot run here, if they cannot (checked by the first rank before it starts
/// the others, so that the bench skips with the reason).
pub(crate) fn unavailable(backends: &[BackendChoice]) -> Option<String> {
    if let Err(e) = gpus() {
        return Some(e);
    }
    if backends.contains(&BackendChoice::Nccl) {
        #[cfg(feature = "nccl")]
        if let Err(e) = multiworld::nccl::version() {
            return Some(e.to_string());
        }
        #[cfg(not(feature = "nccl"))]
        return Some("--backend nccl needs a build with the nccl feature".into());
    }
    None
}

/// A device world of `backend` over the bench's ranks: the bench's own world for the native
/// backend; for NCCL a second world, formed through an id that rank 0 makes and hands over the
/// bench's world.
fn device_world(b: &Bench, backend: BackendChoice, s: &Arc<CudaStream>) -> DeviceWorld {
    let w = match backend {
        BackendChoice::Native => b.w.clone(),
        _ => {
            let mut id = [0u8; multiworld::UNIQUE_ID_BYTES];
            if b.rank == 0 {
                id = multiworld::UniqueId::new_on("127.0.0.1".parse().expect("ip")).expect("id").to_bytes();
            }
            b.w.broadcast_in_place(&mut id, 0).expect("handing the NCCL world's id over");
            let id = multiworld::UniqueId::from_bytes(&id).expect("id");
            let o = WorldOptions::default().with_backend(backend);
            b.m.init_world_with("bench-nccl", id.into(), b.rank, b.n, &o).expect("forming the NCCL world")
        }
    };
    DeviceWorld::new(w, s.clone()).expect("device world")
}

fn backend_name(b: BackendChoice) -> &'static str {
    match b {
        BackendChoice::Nccl => "nccl",
        _ => "native",
    }
}

/// Runs the device rows; returns the wrong results.
pub(crate) fn run(b: &Bench) -> Result<u64, String> {
    let gpus = gpus()?;
    let ctx = multiworld::cuda::context(b.rank % gpus).expect("CUDA context");
    let s = ctx.new_stream().expect("stream");
    let ipc = std::env::var("MW_DEVICE_IPC").is_ok_and(|v| v.trim() == "1");
    let backends = b.args.backends.clone();
    let dws: Vec<(BackendChoice, DeviceWorld)> = backends.iter().map(|&k| (k, device_world(b, k, &s))).collect();
    let dev = Device { b, s, ipc };
    let mut wrong_total = 0;
    let show = b.rank == 0;
    let both = dws.len() > 1;
    if show {
        let path = if dev.ipc { "cuda_ipc (MW_DEVICE_IPC=1)" } else { "staged through host memory" };
        let names: Vec<_> = backends.iter().map(|&k| backend_name(k)).collect();
        println!(
            "#\n# device buffers  ranks {}  gpus {gpus} ({})  float  backends {}  native: {path} on one host",
            b.n,
            ctx.name().unwrap_or_default(),
            names.join(",")
        );
        println!(
            "# {:>12} {:>12} {:>7} {:>11} {:>8} {:>8} {:>7} {:>10} {:>9} {:>8}",
            "size", "op", "backend", "time(us)", "algbw", "busbw", "#wrong", "d2d copy", "ratio", "vs nccl"
        );
        println!(
            "# {:>12} {:>12} {:>7} {:>11} {:>8} {:>8} {:>7} {:>10} {:>9} {:>8}",
            "(B)", "", "", "", "(GB/s)", "(GB/s)", "", "(GB/s)", "algbw/d2d", "algbw"
        );
    }
    for size in sizes(&b.args) {
        let count = size / 4;
        if count == 0 {
            continue;
        }
        for op in [DevOp::AllReduce, DevOp::SendRecv] {
            let runs: Vec<(BackendChoice, f64, u64)> =
                dws.iter().map(|(k, dw)| (*k, dev.run_op(dw, op, count))).map(|(k, (t, w))| (k, t, w)).collect();
            let nccl_secs = runs.iter().find(|r| r.0 == BackendChoice::Nccl).map(|r| r.1);
            // Rank 0 alone, while the others wait for it in the next operation.
            let copy = if show { dev.copy_gbps(count * 4) } else { 0.0 };
            for (k, secs, wrong) in runs {
                wrong_total += wrong;
                if !show {
                    continue;
                }
                let algbw = (count * 4) as f64 / secs / 1e9;
                let busbw = algbw * if op == DevOp::AllReduce { 2.0 * (b.n as f64 - 1.0) / b.n as f64 } else { 1.0 };
                let vs = match nccl_secs {
                    Some(t) if both => format!("{:.3}", t / secs),
                    _ => "-".into(),
                };
                println!(
                    "  {:>12} {:>12} {:>7} {:>11.2} {:>8.3} {:>8.3} {:>7} {:>10.3} {:>9.3} {:>8}",
                    count * 4,
                    op.name(),
                    backend_name(k),
                    secs * 1e6,
                    algbw,
                    busbw,
                    wrong,
                    copy,
                    algbw / copy,
                    vs
                );
            }
        }
    }
    let native = dws.iter().find(|(k, _)| *k == BackendChoice::Native).map(|(_, dw)| dw);
    if let (true, true, Some(dw)) = (show, dev.ipc, native) {
        let st = dw.ipc_stats();
        println!(
            "# cuda_ipc: {} receives through mappings, {} sends/receives by host; {} collectives through mappings, {} by host",
            st.receives_mapped, st.by_host, st.collectives_mapped, st.collectives_by_host
        );
    }
    if show {
        println!("#\n# reduction kernel (sum of 2 float buffers), GB/s of bytes read and written");
        println!("# {:>12} {:>10} {:>10} {:>7} {:>7}", "size(B)", "kernel", "d2d copy", "ratio", "#wrong");
        for size in [1usize << 20, 64 << 20] {
            let (kernel, copy, wrong) = dev.kernel_vs_copy(size);
            wrong_total += wrong;
            println!("  {:>12} {:>10.1} {:>10.1} {:>7.3} {:>7}", size, kernel, copy, kernel / copy, wrong);
        }
    }
    Ok(wrong_total)
}
