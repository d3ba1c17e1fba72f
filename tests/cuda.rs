//! Operations on CUDA device memory (feature `cuda`), across real processes sharing one GPU:
//! every collective against the host reference (staged, and with CUDA IPC for sends and
//! receives), sends and receives through CUDA IPC mappings, and a peer killed while the
//! survivor's stream waits on it. Each test prints why it skips where there is no GPU.

#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::device::{have_gpu, stream_for, typed};
use common::reference::{gathered, input, reduced};
use common::Ctx;
use multiworld::cuda::cudarc::driver::{CudaSlice, CudaStream};
use multiworld::{DeviceWorld, ErrorKind, ReduceOp, WorldManager};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[
        ("collectives", collectives),
        ("ipc", ipc),
        ("ipc_collectives", ipc_collectives),
        ("kill", kill),
        ("kill_ipc", kill_ipc),
        ("c_api", c_api),
    ]);
}

fn collectives(ctx: &Ctx) {
    common::device::collectives(ctx);
}

#[test]
fn device_collectives_two_ranks() {
    if have_gpu() {
        common::run_ranks("collectives", 2, &[], Duration::from_secs(400));
    }
}

#[test]
fn device_collectives_three_ranks() {
    if have_gpu() {
        common::run_ranks("collectives", 3, &[], Duration::from_secs(400));
    }
}

/// The same with CUDA IPC on: operations between these ranks (one host) go through it.
/// cudarc allocates from the stream-ordered pool, which CUDA IPC cannot share, so here the
/// bytes take IPC's by-host fallback, for sends and receives and for collectives alike (the
/// `ipc` and `ipc_collectives` roles below map buffers).
#[test]
fn device_collectives_three_ranks_with_ipc() {
    if have_gpu() {
        common::run_ranks("collectives", 3, &[("MW_DEVICE_IPC", "1".into())], Duration::from_secs(400));
    }
}

/// A device buffer from `cuMemAlloc` (which CUDA IPC can share, unlike cudarc's pool memory),
/// wrapped as a cudarc slice; freed by `free`.
fn shareable(s: &Arc<CudaStream>, data: &[f32]) -> CudaSlice<f32> {
    use multiworld::cuda::cudarc::driver::sys;
    s.context().bind_to_thread().expect("bind");
    let mut p = 0;
    // SAFETY: an out-pointer to a local, with the context current.
    let r = unsafe { sys::cuMemAlloc_v2(&mut p, std::mem::size_of_val(data).max(4)) };
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "cuMemAlloc");
    // SAFETY: a fresh allocation of `data.len()` floats in the stream's context.
    let mut slice = unsafe { s.upgrade_device_ptr::<f32>(p, data.len()) };
    s.memcpy_htod(data, &mut slice).expect("upload");
    slice
}

fn free(s: &Arc<CudaStream>, slice: CudaSlice<f32>) {
    s.synchronize().expect("synchronize");
    let p = slice.leak();
    // SAFETY: allocated by `shareable`, no longer used by any stream.
    unsafe { multiworld::cuda::cudarc::driver::sys::cuMemFree_v2(p) };
}

/// Sends and receives through CUDA IPC mappings (`MW_DEVICE_IPC=1`, `cuMemAlloc` buffers):
/// a ring and a grouped exchange, for three sizes, against the values sent; every receive
/// must have copied through a mapping.
fn ipc(ctx: &Ctx) {
    let s = stream_for(ctx.rank);
    let m = WorldManager::new();
    let w = m.init_world("ipc", &ctx.id(), ctx.rank, ctx.size).unwrap();
    let dw = DeviceWorld::new(w, s.clone()).unwrap();
    let (n, rank) = (ctx.size, ctx.rank);
    let (right, left) = ((rank + 1) % n, (rank + n - 1) % n);
    let values =
        |r: usize, count: usize| -> Vec<f32> { (0..count).map(|i| (i % 4093) as f32 + 5000.0 * r as f32).collect() };
    let mut receives = 0;
    for count in [1usize, 4097, 1 << 22] {
        let send = shareable(&s, &values(rank, count));
        let mut got = shareable(&s, &vec![0f32; count]);
        if rank == 0 {
            dw.send(&send, right).unwrap();
            dw.recv(&mut got, left).unwrap();
        } else {
            dw.recv(&mut got, left).unwrap();
            dw.send(&send, right).unwrap();
        }
        assert!(s.clone_dtoh(&got).unwrap() == values(left, count), "rank {rank}: ring, {count} floats");
        let mut again = shareable(&s, &vec![0f32; count]);
        let mut g = dw.group();
        g.send(&send, right).unwrap();
        g.recv(&mut again, left).unwrap();
        g.end().unwrap();
        assert!(s.clone_dtoh(&again).unwrap() == values(left, count), "rank {rank}: grouped, {count} floats");
        receives += 2;
        for b in [send, got, again] {
            free(&s, b);
        }
    }
    dw.synchronize().unwrap();
    let stats = dw.ipc_stats();
    assert_eq!((stats.receives_mapped, stats.by_host), (receives, 0), "rank {rank}: {stats:?}");
    dw.world().barrier().unwrap();
    println!("rank {rank}: {receives} receives through CUDA IPC mappings");
}

#[test]
fn device_point_to_point_through_ipc_mappings() {
    if have_gpu() {
        for n in [2, 3] {
            common::run_ranks("ipc", n, &[("MW_DEVICE_IPC", "1".into())], Duration::from_secs(200));
        }
    }
}

/// Collectives through CUDA IPC mappings (`MW_DEVICE_IPC=1`, `cuMemAlloc` buffers): the
/// streams read each other's buffers and reduce them with the crate's kernel. Every kind
/// that takes this path, in and out of place, for three sizes, against a reference computed
/// here; every collective must have gone through the mappings.
fn ipc_collectives(ctx: &Ctx) {
    let s = stream_for(ctx.rank);
    let m = WorldManager::new();
    let w = m.init_world("ipc-coll", &ctx.id(), ctx.rank, ctx.size).unwrap();
    let dw = DeviceWorld::new(w, s.clone()).unwrap();
    let (n, rank, root) = (ctx.size, ctx.rank, ctx.size - 1);
    // Whole numbers: sums, maxima and the division of an average are exact or rounded alike.
    let values = |r: usize, count: usize, salt: usize| -> Vec<f32> {
        (0..count).map(|i| ((i * 7 + salt) % 4093) as f32 + 5000.0 * r as f32).collect()
    };
    let fold = |count: usize, salt: usize, f: fn(f32, f32) -> f32| -> Vec<f32> {
        (0..count).map(|i| (1..n).fold(values(0, count, salt)[i], |acc, r| f(acc, values(r, count, salt)[i]))).collect()
    };
    let check = |what: &str, buf: &CudaSlice<f32>, want: &[f32]| {
        let got = s.clone_dtoh(buf).unwrap();
        let wrong = got.iter().zip(want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert!(got.len() == want.len() && wrong == 0, "rank {rank}: {what}: {wrong} of {} wrong", want.len());
    };
    let mut collectives = 0;
    for count in [1usize, 4097, 1 << 22] {
        let what = |op: &str| format!("{op}, {count} floats, {n} ranks");
        let send = shareable(&s, &values(rank, count, 0));
        let mut sum = shareable(&s, &vec![0f32; count]);
        dw.all_reduce(&send, &mut sum, &ReduceOp::Sum).unwrap();
        check(&what("all_reduce sum"), &sum, &fold(count, 0, |a, b| a + b));
        let mut avg = shareable(&s, &values(rank, count, 1));
        dw.all_reduce_in_place(&mut avg, &ReduceOp::Avg).unwrap();
        let want: Vec<f32> = fold(count, 1, |a, b| a + b).iter().map(|x| x / n as f32).collect();
        check(&what("all_reduce avg in place"), &avg, &want);
        let blocks = shareable(&s, &values(rank, count * n, 2));
        let mut mine = shareable(&s, &vec![0f32; count]);
        dw.reduce_scatter(&blocks, &mut mine, &ReduceOp::Max).unwrap();
        check(&what("reduce_scatter max"), &mine, &fold(count * n, 2, f32::max)[rank * count..(rank + 1) * count]);
        let mut all = shareable(&s, &vec![0f32; count * n]);
        dw.all_gather(&send, &mut all).unwrap();
        check(&what("all_gather"), &all, &(0..n).flat_map(|r| values(r, count, 0)).collect::<Vec<_>>());
        let mut b = shareable(&s, &if rank == root { values(root, count, 3) } else { vec![0f32; count] });
        dw.broadcast_in_place(&mut b, root).unwrap();
        check(&what("broadcast in place"), &b, &values(root, count, 3));
        let mut r = shareable(&s, &vec![0f32; count]);
        dw.reduce(&send, &mut r, &ReduceOp::Sum, root).unwrap();
        if rank == root {
            check(&what("reduce sum"), &r, &fold(count, 0, |a, b| a + b));
        }
        collectives += 6;
        for buf in [send, sum, avg, blocks, mine, all, b, r] {
            free(&s, buf);
        }
    }
    dw.synchronize().unwrap();
    let stats = dw.ipc_stats();
    assert_eq!((stats.collectives_mapped, stats.collectives_by_host), (collectives, 0), "rank {rank}: {stats:?}");
    dw.world().barrier().unwrap();
    println!("rank {rank}: {collectives} collectives through CUDA IPC mappings");
}

#[test]
fn device_collectives_through_ipc_mappings() {
    if have_gpu() {
        for n in [2, 3] {
            common::run_ranks("ipc_collectives", n, &[("MW_DEVICE_IPC", "1".into())], Duration::from_secs(200));
        }
    }
}

/// Three ranks: world "a" joins 0 and 1, world "b" joins 0 and 2. Rank 1 dies while rank 0's
/// stream waits on a receive from it; that stream drains, world "a" reports `WorldBroken`,
/// and world "b" on another stream keeps working.
fn kill(ctx: &Ctx) {
    let s = stream_for(ctx.rank);
    let m = WorldManager::new();
    let id = |k: &str| ctx.env(k).parse::<multiworld::UniqueId>().expect("id");
    match ctx.rank {
        0 => {
            let a = DeviceWorld::new(m.init_world("a", &id("MW_ID_A"), 0, 2).unwrap(), s.clone()).unwrap();
            let sb = stream_for(0);
            let b = DeviceWorld::new(m.init_world("b", &id("MW_ID_B"), 0, 2).unwrap(), sb.clone()).unwrap();
            let one = sb.clone_htod(&[1f32; 1024]).unwrap();
            let mut sum = s.alloc_zeros::<f32>(1024).unwrap();
            a.all_reduce(&s.clone_htod(&[1f32; 1024]).unwrap(), &mut sum, &ReduceOp::Sum).unwrap();
            assert_eq!(s.clone_dtoh(&sum).unwrap(), vec![2f32; 1024], "all_reduce before the kill");
            // Rank 1 now kills itself; this receive can never be matched.
            let mut got = s.alloc_zeros::<f32>(1 << 20).unwrap();
            let t = Instant::now();
            a.recv(&mut got, 1).unwrap();
            let e = a.synchronize().expect_err("the receive from a dead peer must fail");
            let drained = t.elapsed();
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "error {e}");
            assert!(drained < Duration::from_secs(10), "stream drained only after {drained:?}");
            let e = a.all_reduce(&got, &mut sum, &ReduceOp::Sum).expect_err("the world is broken");
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "error {e}");
            // The stream itself is fine, and so is the other world.
            assert_eq!(s.clone_dtoh(&sum).unwrap(), vec![2f32; 1024]);
            let mut out = sb.alloc_zeros::<f32>(1024).unwrap();
            b.all_reduce(&one, &mut out, &ReduceOp::Sum).unwrap();
            assert_eq!(sb.clone_dtoh(&out).unwrap(), vec![2f32; 1024], "world b after the kill");
            b.synchronize().unwrap();
            b.world().barrier().unwrap();
            println!("rank 0: stream drained {drained:?} after the kill; world b unaffected");
        }
        1 => {
            let a = DeviceWorld::new(m.init_world("a", &id("MW_ID_A"), 1, 2).unwrap(), s.clone()).unwrap();
            let mut sum = s.alloc_zeros::<f32>(1024).unwrap();
            a.all_reduce(&s.clone_htod(&[1f32; 1024]).unwrap(), &mut sum, &ReduceOp::Sum).unwrap();
            a.synchronize().unwrap();
            // Give rank 0 time to enqueue its receive, so that its stream waits when we die.
            std::thread::sleep(Duration::from_millis(500));
            // SAFETY: kill(2) on this process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        _ => {
            let b = DeviceWorld::new(m.init_world("b", &id("MW_ID_B"), 1, 2).unwrap(), s.clone()).unwrap();
            let one = s.clone_htod(&[1f32; 1024]).unwrap();
            let mut out = s.alloc_zeros::<f32>(1024).unwrap();
            b.all_reduce(&one, &mut out, &ReduceOp::Sum).unwrap();
            b.synchronize().unwrap();
            assert_eq!(s.clone_dtoh(&out).unwrap(), vec![2f32; 1024], "world b");
            b.world().barrier().unwrap();
        }
    }
}

#[test]
fn device_stream_drains_when_peer_is_killed() {
    if !have_gpu() {
        return;
    }
    let ip = "127.0.0.1".parse().unwrap();
    let env = [
        ("MW_ID_A", multiworld::UniqueId::new_on(ip).unwrap().to_string()),
        ("MW_ID_B", multiworld::UniqueId::new_on(ip).unwrap().to_string()),
    ];
    let mut procs: Vec<_> = (0..3).map(|r| common::spawn("kill", r, 3, &env, &[])).collect();
    // Rank 1 dies by design; ranks 0 and 2 must succeed.
    let mut dead = procs.remove(1);
    dead.wait_for(Duration::from_secs(120));
    common::finish(&mut procs, Duration::from_secs(120));
}

/// Three ranks with CUDA IPC on (`MW_DEVICE_IPC=1`): world "a" joins 0 and 1, world "b"
/// joins 0 and 2. Ranks 0 and 1 start a large all-reduce through IPC mappings, and rank 1
/// SIGKILLs itself moments later — while rank 0's stream may be waiting for it, or copying
/// from its mapped buffer. Rank 0's stream must drain (the operation fails, or had finished),
/// and its context must stay usable: world "b" on the same GPU still works afterwards.
fn kill_ipc(ctx: &Ctx) {
    let s = stream_for(ctx.rank);
    let m = WorldManager::new();
    let id = |k: &str| ctx.env(k).parse::<multiworld::UniqueId>().expect("id");
    const N: usize = 16 << 20;
    match ctx.rank {
        0 => {
            let a = DeviceWorld::new(m.init_world("a", &id("MW_ID_A"), 0, 2).unwrap(), s.clone()).unwrap();
            let sb = stream_for(0);
            let b = DeviceWorld::new(m.init_world("b", &id("MW_ID_B"), 0, 2).unwrap(), sb.clone()).unwrap();
            let send = shareable(&s, &vec![1f32; N]);
            let mut sum = shareable(&s, &vec![0f32; N]);
            let t = Instant::now();
            // Refused at once if the world already broke, else failed (or done) on the stream.
            let r = a.all_reduce(&send, &mut sum, &ReduceOp::Sum).and_then(|_| a.synchronize());
            let drained = t.elapsed();
            assert!(drained < Duration::from_secs(10), "stream drained only after {drained:?}");
            match &r {
                Ok(()) => println!("rank 0: the all-reduce finished before the kill"),
                Err(e) => assert_eq!(e.kind(), ErrorKind::WorldBroken, "error {e}"),
            }
            // The context still works: world b, on the same GPU.
            let one = shareable(&sb, &[1f32; 1024]);
            let mut out = shareable(&sb, &[0f32; 1024]);
            b.all_reduce(&one, &mut out, &ReduceOp::Sum).unwrap();
            b.synchronize().unwrap();
            assert_eq!(sb.clone_dtoh(&out).unwrap(), vec![2f32; 1024], "world b after the kill");
            b.world().barrier().unwrap();
            for buf in [send, sum] {
                free(&s, buf);
            }
            for buf in [one, out] {
                free(&sb, buf);
            }
            println!("rank 0: stream drained {drained:?} after the start ({r:?}); world b unaffected");
        }
        1 => {
            let a = DeviceWorld::new(m.init_world("a", &id("MW_ID_A"), 1, 2).unwrap(), s.clone()).unwrap();
            let send = shareable(&s, &vec![1f32; N]);
            let mut sum = shareable(&s, &vec![0f32; N]);
            a.all_reduce(&send, &mut sum, &ReduceOp::Sum).unwrap();
            std::thread::sleep(Duration::from_millis(2));
            // SAFETY: kill(2) on this process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        _ => {
            let b = DeviceWorld::new(m.init_world("b", &id("MW_ID_B"), 1, 2).unwrap(), s.clone()).unwrap();
            let one = shareable(&s, &[1f32; 1024]);
            let mut out = shareable(&s, &[0f32; 1024]);
            b.all_reduce(&one, &mut out, &ReduceOp::Sum).unwrap();
            b.synchronize().unwrap();
            assert_eq!(s.clone_dtoh(&out).unwrap(), vec![2f32; 1024], "world b");
            b.world().barrier().unwrap();
            for buf in [one, out] {
                free(&s, buf);
            }
        }
    }
}

#[test]
fn device_ipc_collective_drains_when_peer_is_killed() {
    if !have_gpu() {
        return;
    }
    let ip = "127.0.0.1".parse().unwrap();
    let env = [
        ("MW_ID_A", multiworld::UniqueId::new_on(ip).unwrap().to_string()),
        ("MW_ID_B", multiworld::UniqueId::new_on(ip).unwrap().to_string()),
        ("MW_DEVICE_IPC", "1".into()),
    ];
    let mut procs: Vec<_> = (0..3).map(|r| common::spawn("kill_ipc", r, 3, &env, &[])).collect();
    // Rank 1 dies by design; ranks 0 and 2 must succeed.
    let mut dead = procs.remove(1);
    dead.wait_for(Duration::from_secs(120));
    common::finish(&mut procs, Duration::from_secs(120));
}

/// The C API with device pointers and a stream: an all-reduce, an in-place all-gather and a
/// grouped exchange around the ring, enqueued and then checked after a stream synchronize.
/// With `MW_DEVICE_IPC=1` the buffers come from `cuMemAlloc`, so that the collectives and
/// the grouped exchange go through CUDA IPC mappings.
fn c_api(ctx: &Ctx) {
    use multiworld::ffi::*;
    use std::ffi::c_void;
    let (n, rank) = (ctx.size, ctx.rank);
    let s = stream_for(rank);
    let mut id = mwUniqueId { internal: [0; MW_UNIQUE_ID_BYTES] };
    for (d, b) in id.internal.iter_mut().zip(ctx.id().to_bytes()) {
        *d = b as std::ffi::c_char;
    }
    let mut comm: mwComm_t = std::ptr::null_mut();
    // SAFETY: out-pointer to a local; the id is a value.
    assert_eq!(unsafe { mwCommInitRank(&mut comm, n as i32, id, rank as i32) }, mwSuccess);
    let d = multiworld::DataType::F32;
    let count = 4097;
    let mine = input(d, rank, 0, count);
    let ipc = std::env::var("MW_DEVICE_IPC").is_ok_and(|v| v == "1");
    let buf = |data: &[f32]| if ipc { shareable(&s, data) } else { s.clone_htod(data).unwrap() };
    let send = buf(&typed::<f32>(&mine));
    let mut sum = buf(&vec![0f32; count]);
    let mut all = buf(&vec![0f32; count * n]);
    let mut got = buf(&vec![0f32; count]);
    // The rank's own block goes in place first.
    s.memcpy_htod(&typed::<f32>(&mine), &mut all.slice_mut(rank * count..(rank + 1) * count)).unwrap();
    let st = s.cu_stream() as *mut c_void;
    let (right, left) = ((rank + 1) % n, (rank + n - 1) % n);
    {
        use multiworld::cuda::cudarc::driver::{DevicePtr, DevicePtrMut};
        let (sp, _g1) = send.device_ptr(&s);
        let (rp, _g2) = sum.device_ptr_mut(&s);
        let (ap, _g3) = all.device_ptr_mut(&s);
        let (gp, _g4) = got.device_ptr_mut(&s);
        let own = (ap + (rank * count * 4) as u64) as *const c_void;
        // SAFETY: device buffers of the sizes the calls need, alive until the stream is
        // synchronized below; `comm` is live.
        unsafe {
            assert_eq!(mwAllReduce(sp as *const c_void, rp as *mut c_void, count, mwFloat, mwSum, comm, st), mwSuccess);
            assert_eq!(mwAllGather(own, ap as *mut c_void, count, mwFloat, comm, st), mwSuccess);
            assert_eq!(mwGroupStart(), mwSuccess);
            assert_eq!(mwSend(sp as *const c_void, count, mwFloat, right as i32, comm, st), mwSuccess);
            assert_eq!(mwRecv(gp as *mut c_void, count, mwFloat, left as i32, comm, st), mwSuccess);
            assert_eq!(mwGroupEnd(), mwSuccess);
        }
    }
    s.synchronize().unwrap();
    let bytes = |v: Vec<f32>| bytemuck::cast_slice::<f32, u8>(&v).to_vec();
    assert_eq!(bytes(s.clone_dtoh(&sum).unwrap()), reduced(d, ReduceOp::Sum, n, 0, count), "mwAllReduce");
    assert_eq!(bytes(s.clone_dtoh(&all).unwrap()), gathered(d, n, 0, count), "mwAllGather in place");
    assert_eq!(bytes(s.clone_dtoh(&got).unwrap()), input(d, left, 0, count), "grouped mwSend/mwRecv");
    let mut state = mwInternalError;
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { mwCommGetAsyncError(comm, &mut state) }, mwSuccess);
    assert_eq!(state, mwSuccess);
    // Mistakes are refused and lose nothing: device memory with a NULL stream, host memory
    // with a stream.
    let host = vec![0f32; count];
    let mut host_out = vec![0f32; count];
    {
        use multiworld::cuda::cudarc::driver::DevicePtr;
        let (sp, _g) = send.device_ptr(&s);
        // SAFETY: the calls only check their arguments and refuse.
        unsafe {
            let dev_as_host = mwAllReduce(
                sp as *const c_void,
                host_out.as_mut_ptr().cast(),
                count,
                mwFloat,
                mwSum,
                comm,
                std::ptr::null_mut(),
            );
            assert_eq!(dev_as_host, mwInvalidArgument, "device memory with a NULL stream");
            let host_as_dev =
                mwAllReduce(host.as_ptr().cast(), host_out.as_mut_ptr().cast(), count, mwFloat, mwSum, comm, st);
            assert_eq!(host_as_dev, mwInvalidArgument, "host memory with a stream");
        }
    }
    // Host memory on the same communicator, with the stream drained: a NULL stream.
    // SAFETY: `comm` is live.
    assert_eq!(unsafe { mwBarrier(comm, std::ptr::null_mut()) }, mwSuccess);
    // SAFETY: as above; destroyed once.
    assert_eq!(unsafe { mwCommDestroy(comm) }, mwSuccess);
    if ipc {
        for b in [send, sum, all, got] {
            free(&s, b);
        }
    }
}

#[test]
fn device_pointers_through_the_c_api() {
    if have_gpu() {
        common::run_ranks("c_api", 3, &[], Duration::from_secs(120));
        common::run_ranks("c_api", 3, &[("MW_DEVICE_IPC", "1".into())], Duration::from_secs(120));
    }
}
