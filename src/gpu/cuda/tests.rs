//! The kernels' arithmetic, checked against the crate's own reduction code: on the host (the
//! same source compiled for the CPU, so it runs everywhere the `cuda` feature builds) and, on a
//! machine with a GPU, the kernels themselves.

use super::*;
use crate::coll::reduce::{reduce_into, scale_avg};
use crate::testutil::Rng;
use half::{bf16, f16};

/// Random bytes for `n` elements of `d`: 16-bit floats without NaNs (NaN payloads are not
/// part of the contract), everything else raw.
fn random(rng: &mut Rng, d: DataType, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n * d.size()];
    rng.fill(&mut b);
    if matches!(d, DataType::F16 | DataType::BF16) {
        for c in b.chunks_exact_mut(2) {
            let v = u16::from_le_bytes([c[0], c[1]]);
            let nan = if d == DataType::F16 {
                (v & 0x7c00) == 0x7c00 && v & 0x3ff != 0
            } else {
                (v & 0x7f80) == 0x7f80 && v & 0x7f != 0
            };
            if nan {
                c.copy_from_slice(&(v & 0x8000).to_le_bytes());
            }
        }
    }
    if matches!(d, DataType::F32 | DataType::F64) {
        // Keep magnitudes moderate so that sums and products mean something.
        let e = d.size();
        for c in b.chunks_exact_mut(e) {
            let x = (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % 2001) as f64 / 8.0 - 125.0;
            if e == 4 {
                c.copy_from_slice(&(x as f32).to_le_bytes());
            } else {
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
    b
}

fn to_f32(d: DataType, b: &[u8]) -> f32 {
    let v = u16::from_le_bytes([b[0], b[1]]);
    if d == DataType::F16 {
        f16::from_bits(v).to_f32()
    } else {
        bf16::from_bits(v).to_f32()
    }
}

fn from_f32(d: DataType, x: f32) -> [u8; 2] {
    if d == DataType::F16 {
        f16::from_f32(x).to_bits().to_le_bytes()
    } else {
        bf16::from_f32(x).to_bits().to_le_bytes()
    }
}

/// The reference: a left fold of the crate's pairwise kernels; 16-bit floats accumulate in f32
/// and round once (max and min keep the winner's own bits), as the device kernels do.
fn reference(d: DataType, op: ReduceOp, srcs: &[Vec<u8>]) -> Vec<u8> {
    let e = d.size();
    if !matches!(d, DataType::F16 | DataType::BF16) {
        let mut acc = srcs[0].clone();
        for s in &srcs[1..] {
            reduce_into(d, op, &mut acc, s);
        }
        return acc;
    }
    let n = srcs[0].len() / e;
    let mut out = vec![0u8; n * e];
    for i in 0..n {
        let r = i * e..(i + 1) * e;
        let mut best = [srcs[0][r.clone()][0], srcs[0][r.clone()][1]];
        let mut acc = [to_f32(d, &best)];
        for s in &srcs[1..] {
            let raw = [s[r.clone()][0], s[r.clone()][1]];
            let before = acc[0].to_bits();
            reduce_into(DataType::F32, op, bytemuck::cast_slice_mut(&mut acc), bytemuck::bytes_of(&to_f32(d, &raw)));
            if matches!(op, ReduceOp::Max | ReduceOp::Min) && acc[0].to_bits() != before {
                best = raw;
            }
        }
        let v = if matches!(op, ReduceOp::Max | ReduceOp::Min) { best } else { from_f32(d, acc[0]) };
        out[r].copy_from_slice(&v);
    }
    out
}

fn same(d: DataType, a: &[u8], b: &[u8]) -> bool {
    let e = d.size();
    a.chunks(e).zip(b.chunks(e)).all(|(x, y)| {
        x == y
            || match d {
                DataType::F32 => {
                    f32::from_le_bytes(x.try_into().unwrap()).is_nan()
                        && f32::from_le_bytes(y.try_into().unwrap()).is_nan()
                }
                DataType::F64 => {
                    f64::from_le_bytes(x.try_into().unwrap()).is_nan()
                        && f64::from_le_bytes(y.try_into().unwrap()).is_nan()
                }
                // NaN payloads differ between the GPU and the CPU (0 x inf in a product).
                DataType::F16 | DataType::BF16 => to_f32(d, x).is_nan() && to_f32(d, y).is_nan(),
                _ => false,
            }
    })
}

fn host_combine(d: DataType, op: ReduceOp, srcs: &[Vec<u8>]) -> Vec<u8> {
    let n = srcs[0].len() / d.size();
    let mut out = vec![0u8; srcs[0].len()];
    let ptrs: Vec<*const u8> = srcs.iter().map(|s| s.as_ptr()).collect();
    // SAFETY: every buffer holds `n` elements of `d`; the output is apart from the inputs.
    unsafe { host::mw_host_combine(d as i32, op as i32, out.as_mut_ptr(), ptrs.as_ptr(), srcs.len() as i32, n) };
    out
}

#[test]
fn kernel_arithmetic_built_for_the_host_matches_the_reference() {
    let mut rng = Rng::new(5);
    for d in DataType::ALL {
        for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Max, ReduceOp::Min] {
            for nsrc in [1, 2, 3, MAX_SOURCES] {
                let n = 1031;
                let srcs: Vec<Vec<u8>> = (0..nsrc).map(|_| random(&mut rng, d, n)).collect();
                let got = host_combine(d, op, &srcs);
                let want = reference(d, op, &srcs);
                assert!(same(d, &got, &want), "{d} {op} with {nsrc} sources differs from the reference");
            }
        }
        // The end of an average.
        for ranks in [1usize, 3, 7] {
            let mut a = random(&mut rng, d, 257);
            let mut b = a.clone();
            // SAFETY: `a` holds 257 elements of `d`.
            unsafe { host::mw_host_scale(d as i32, a.as_mut_ptr(), 257, ranks as i32) };
            scale_avg(d, &mut b, ranks);
            assert!(same(d, &a, &b), "{d} average over {ranks} differs from the reference");
        }
    }
}

#[test]
fn no_driver_is_an_error_never_a_panic() {
    match device_count() {
        Ok(n) => println!("{n} CUDA devices"),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Cuda);
            println!("no CUDA here, as expected: {e}");
        }
    }
}

/// On a GPU: the kernels themselves, against the host build, for every type and op, aligned
/// and not.
#[test]
fn kernels_on_the_gpu_match_the_host_build() {
    let ctx = match context(0) {
        Ok(c) => c,
        Err(e) => {
            skipped("kernels_on_the_gpu_match_the_host_build", &format!("needs a CUDA GPU: {e}"));
            return;
        }
    };
    let k = Kernels::load(&ctx).expect("kernels load");
    let stream = ctx.default_stream();
    let mut rng = Rng::new(9);
    for d in DataType::ALL {
        for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Max, ReduceOp::Min] {
            for offset in [0usize, 1] {
                let n = 4099;
                let srcs: Vec<Vec<u8>> = (0..3).map(|_| random(&mut rng, d, n + offset)).collect();
                let devs: Vec<_> = srcs.iter().map(|s| stream.clone_htod(s).expect("upload")).collect();
                let out = stream.alloc_zeros::<u8>((n + offset) * d.size()).expect("alloc");
                let e = d.size();
                let ptr = |s: &cudarc::driver::CudaSlice<u8>| {
                    let (p, _sync) = cudarc::driver::DevicePtr::device_ptr(s, &stream);
                    p + (offset * e) as u64
                };
                let src_ptrs: Vec<u64> = devs.iter().map(ptr).collect();
                let dst = ptr(&out);
                // SAFETY: all buffers hold n + offset elements; the kernel reads n from `offset`.
                unsafe { k.combine(&stream, d, op, dst, &src_ptrs, n) }.expect("launch");
                let got = stream.clone_dtoh(&out).expect("download");
                let host_srcs: Vec<Vec<u8>> = srcs.iter().map(|s| s[offset * e..].to_vec()).collect();
                let want = host_combine(d, op, &host_srcs);
                assert!(same(d, &got[offset * e..], &want), "{d} {op} offset {offset}: GPU differs from host build");
            }
        }
        // The most sources one launch takes.
        let srcs: Vec<Vec<u8>> = (0..MAX_SOURCES).map(|_| random(&mut rng, d, 1027)).collect();
        let devs: Vec<_> = srcs.iter().map(|s| stream.clone_htod(s).expect("upload")).collect();
        let out = stream.alloc_zeros::<u8>(1027 * d.size()).expect("alloc");
        let addr = |s: &cudarc::driver::CudaSlice<u8>| cudarc::driver::DevicePtr::device_ptr(s, &stream).0;
        let src_ptrs: Vec<u64> = devs.iter().map(addr).collect();
        // SAFETY: every buffer holds 1027 elements.
        unsafe { k.combine(&stream, d, ReduceOp::Sum, addr(&out), &src_ptrs, 1027) }.expect("launch");
        let got = stream.clone_dtoh(&out).expect("download");
        assert!(same(d, &got, &host_combine(d, ReduceOp::Sum, &srcs)), "{d} sum of {MAX_SOURCES} sources");
        // The end of an average.
        for ranks in [3usize, 7] {
            let host = random(&mut rng, d, 1027);
            let dev = stream.clone_htod(&host).expect("upload");
            // SAFETY: `dev` holds 1027 elements.
            unsafe { k.scale(&stream, d, addr(&dev), 1027, ranks) }.expect("launch");
            let mut want = host.clone();
            scale_avg(d, &mut want, ranks);
            assert!(same(d, &stream.clone_dtoh(&dev).expect("download"), &want), "{d} average over {ranks}");
        }
    }
    // The chunk copy, aligned and not.
    for (soff, doff) in [(0u64, 0u64), (3, 5), (16, 0)] {
        let len = 100_003usize;
        let src: Vec<u8> = (0..len + 16).map(|i| (i * 7 + 1) as u8).collect();
        let dsrc = stream.clone_htod(&src).expect("upload");
        let ddst = stream.alloc_zeros::<u8>(len + 16).expect("alloc");
        let addr = |s: &cudarc::driver::CudaSlice<u8>| cudarc::driver::DevicePtr::device_ptr(s, &stream).0;
        // SAFETY: both buffers hold len + 16 bytes; the offsets are below 16.
        unsafe { k.copy(&stream, addr(&ddst) + doff, addr(&dsrc) + soff, len) }.expect("launch");
        let got = stream.clone_dtoh(&ddst).expect("download");
        let (s, d) = (soff as usize, doff as usize);
        assert_eq!(&got[d..d + len], &src[s..s + len], "copy from offset {soff} to {doff}");
        assert!(got[..d].iter().chain(&got[d + len..]).all(|b| *b == 0), "copy wrote outside its range");
    }
    println!("kernels checked on {:?}", ctx.ordinal());
}

/// On a GPU: the kernels that read what to do from host-mapped memory when they run (the CUDA
/// IPC paths' `mw_combine_told_<type>` and `mw_copy_told`), against the host build: three
/// sources combined for every type, with and without an average's division, and a list of
/// copies, one of them empty.
#[test]
fn told_kernels_on_the_gpu_match_the_host_build() {
    let ctx = match context(0) {
        Ok(c) => c,
        Err(e) => {
            skipped("told_kernels_on_the_gpu_match_the_host_build", &format!("needs a CUDA GPU: {e}"));
            return;
        }
    };
    let stream = ctx.default_stream();
    let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec())).expect("kernels load");
    let desc = Pinned::new(RawContext(ctx.cu_ctx()), 4096).expect("pinned descriptor");
    let tell = |words: &[u64]| {
        for (k, w) in words.iter().enumerate() {
            // SAFETY: inside the 4096-byte block; no kernel runs while the host writes it.
            unsafe { std::ptr::write_unaligned(desc.host_ptr().add(8 * k) as *mut u64, *w) };
        }
    };
    let launch = |name: &str, count: Option<i32>| {
        let f = module.load_function(name).expect("kernel");
        let dp = desc.dev_ptr();
        let mut b = stream.launch_builder(&f);
        b.arg(&dp);
        if let Some(c) = &count {
            b.arg(c);
        }
        let cfg = cudarc::driver::LaunchConfig { grid_dim: (8, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the descriptor says what the kernel touches: buffers below, alive until the
        // stream is synchronized by the download that follows.
        unsafe { b.launch(cfg) }.expect("launch");
    };
    let addr = |s: &cudarc::driver::CudaSlice<u8>| cudarc::driver::DevicePtr::device_ptr(s, &stream).0;
    let mut rng = Rng::new(11);
    for d in DataType::ALL {
        let n = 4099;
        let srcs: Vec<Vec<u8>> = (0..3).map(|_| random(&mut rng, d, n)).collect();
        let devs: Vec<_> = srcs.iter().map(|s| stream.clone_htod(s).expect("upload")).collect();
        for (op, divide) in [(ReduceOp::Sum, 0u64), (ReduceOp::Max, 0), (ReduceOp::Avg, 3)] {
            let out = stream.alloc_zeros::<u8>(n * d.size()).expect("alloc");
            let mut words = vec![addr(&out), n as u64, 3, op as u64, divide];
            words.extend(devs.iter().map(addr));
            words.resize(5 + MAX_SOURCES, 0);
            tell(&words);
            launch(&format!("mw_combine_told_{}", type_name(d)), None);
            let got = stream.clone_dtoh(&out).expect("download");
            let mut want = host_combine(d, op, &srcs);
            if divide > 0 {
                scale_avg(d, &mut want, divide as usize);
            }
            assert!(same(d, &got, &want), "{d} {op}: the told combine differs from the host build");
        }
    }
    // Three copies told at once: two of them between offsets that are not aligned, one empty.
    let src: Vec<u8> = (0..70_000).map(|i| (i * 13 + 7) as u8).collect();
    let dsrc = stream.clone_htod(&src).expect("upload");
    let ddst = stream.alloc_zeros::<u8>(70_000).expect("alloc");
    let (s, t) = (addr(&dsrc), addr(&ddst));
    tell(&[s, t, 30_000, s + 30_003, t + 30_001, 39_990, s, t + 69_999, 0]);
    launch("mw_copy_told", Some(3));
    let got = stream.clone_dtoh(&ddst).expect("download");
    assert_eq!(&got[..30_000], &src[..30_000], "first copy");
    assert_eq!(got[30_000], 0, "between the copies");
    assert_eq!(&got[30_001..69_991], &src[30_003..69_993], "second copy");
    assert!(got[69_991..].iter().all(|b| *b == 0), "the empty copy wrote nothing");
    println!("told kernels checked on {:?}", ctx.ordinal());
}

/// Says that `test` skipped and why, past the harness's capture (see `tests/common`).
fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("SKIPPED {test}: {why}\n").as_bytes());
}
