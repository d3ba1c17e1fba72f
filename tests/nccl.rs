//! The NCCL backend (feature `nccl`): a missing library is a clear error (this one runs
//! everywhere, CI included); with a GPU and NCCL, every operation against the reference, the
//! C API's device calls, and a peer killed or stopped mid all-reduce: the survivor's call and
//! stream return an error within the detection bound while another NCCL world and a native
//! world of the same process keep going. Each GPU test prints why it skips.

#![cfg(feature = "nccl")]

mod common;

use std::time::{Duration, Instant};

use common::device::{have_gpu, meet, stream_for, typed};
use common::reference::{blocks, gathered, input, reduced};
use common::Ctx;
use multiworld::{BackendChoice, DeviceWorld, ErrorKind, ReduceOp, UniqueId, WorldManager, WorldOptions};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[
        ("no_library", no_library),
        ("collectives", common::device::collectives),
        ("c_api", c_api),
        ("fault", fault),
    ]);
}

fn this_test() -> String {
    std::thread::current().name().unwrap_or("an NCCL test").to_string()
}

/// What a missing NCCL must look like: forming an NCCL world fails at once with a `System`
/// error that names the library, nothing is left behind (the name forms again natively), and
/// the version query says the same.
fn no_library(_: &Ctx) {
    if multiworld::nccl::version().is_ok() {
        // Installed where the loader always finds it: nothing to hide it from.
        common::skipped("a_missing_nccl_library_is_a_clear_error", "libnccl.so is on the loader's default path");
        return;
    }
    let e = multiworld::nccl::version().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::System, "{e}");
    let m = WorldManager::with_defaults(WorldOptions::default().with_backend(BackendChoice::Nccl));
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let t = Instant::now();
    let e = m.init_world("w", &id, 0, 1).expect_err("no NCCL here");
    assert_eq!(e.kind(), ErrorKind::System, "{e}");
    assert!(e.message().contains("libnccl.so") && e.message().contains("'w'"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "the error took {:?}", t.elapsed());
    // `MW_BACKEND=nccl` asks the same of a world formed with the default options.
    let e = WorldManager::new().init_world("v", &id, 0, 1).expect_err("MW_BACKEND=nccl, no NCCL");
    assert_eq!(e.kind(), ErrorKind::System, "{e}");
    // Nothing was reserved: the name forms, natively, once the environment no longer asks.
    std::env::remove_var("MW_BACKEND");
    let native = WorldOptions::default().with_backend(BackendChoice::Native);
    let fresh = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let w = m.init_world_with("w", (&fresh).into(), 0, 1, &native).unwrap();
    assert_eq!(w.backend(), BackendChoice::Native);
    let mut x = [1f32];
    w.all_reduce_in_place(&mut x, ReduceOp::Sum).unwrap();
    println!("no NCCL: {e}");
}

/// Runs everywhere: where NCCL loads, in a child process whose loader path is emptied.
#[test]
fn a_missing_nccl_library_is_a_clear_error() {
    let env = [("LD_LIBRARY_PATH", String::new()), ("MW_BACKEND", "nccl".to_string())];
    let mut p = vec![common::spawn("no_library", 0, 1, &env, &[])];
    let out = common::finish(&mut p, Duration::from_secs(60));
    let log = out.join("\n");
    assert!(log.contains("no NCCL:") || log.contains("SKIPPED"), "{log}");
}

/// Where NCCL loads (a GPU is not needed): a world asks for it and forms, keeps it when it is
/// duplicated, refuses every host-memory call with `InvalidUsage` naming NCCL and loses nothing
/// (the buffers come back, the world still works for what it may do).
#[test]
fn an_nccl_world_refuses_host_memory() {
    if let Err(e) = multiworld::nccl::version() {
        common::skipped(&this_test(), &e.to_string());
        return;
    }
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let o = WorldOptions::default().with_backend(BackendChoice::Nccl);
    let both = std::sync::Arc::new(std::sync::Barrier::new(2));
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let (id, o, both) = (id.clone(), o.clone(), both.clone());
            std::thread::spawn(move || {
                let m = WorldManager::new();
                let w = m.init_world_with("n", id.into(), r, 2, &o).unwrap();
                assert_eq!(w.backend(), BackendChoice::Nccl);
                let mut x = [1f32; 4];
                let e = w.all_reduce_in_place(&mut x, ReduceOp::Sum).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::InvalidUsage, "{e}");
                assert!(e.message().contains("NCCL"), "{e}");
                assert_eq!(w.barrier().unwrap_err().kind(), ErrorKind::InvalidUsage);
                let f = w.all_reduce_async(vec![2f32; 4], ReduceOp::Sum).wait().unwrap_err();
                assert_eq!(f.error.kind(), ErrorKind::InvalidUsage);
                assert_eq!(f.buffers, vec![2f32; 4], "the buffer comes back");
                // Worlds made from it run on NCCL too.
                let d = w.dup("n2").unwrap();
                assert_eq!(d.backend(), BackendChoice::Nccl);
                assert_eq!(d.send(&x, 1 - r).unwrap_err().kind(), ErrorKind::InvalidUsage);
                // Without a GPU the device side says so.
                if multiworld::cuda::device_count().map_or(true, |n| n == 0) {
                    assert!(multiworld::cuda::context(0).is_err());
                }
                let state = w.state();
                // Neither leaves (which breaks the other's world) before both have looked.
                both.wait();
                state
            })
        })
        .collect();
    for r in ranks {
        assert_eq!(r.join().unwrap(), multiworld::WorldState::Ready);
    }
}

/// The environment the NCCL tests' ranks need, or `None` (printed) where they cannot run: a
/// GPU, NCCL, and NCCL 2.30 or newer unless there are `gpus_needed` GPUs (rank `r` uses GPU
/// `r % count`, so ranks of one world may share one). NCCL's own variable asks for shared
/// GPUs, exported to the rank processes as they start.
fn nccl_env(gpus_needed: usize) -> Option<Vec<(&'static str, String)>> {
    if !have_gpu() {
        return None;
    }
    let v = match multiworld::nccl::version() {
        Ok(v) => v,
        Err(e) => {
            common::skipped(&this_test(), &e.to_string());
            return None;
        }
    };
    let gpus = multiworld::cuda::device_count().unwrap_or(0);
    let mut env = Vec::new();
    if v >= (2, 30, 0) {
        env.push(("NCCL_MULTI_RANK_GPU_ENABLE", "1".to_string()));
    } else if gpus < gpus_needed {
        let why = format!(
            "{gpus} GPU(s) for {gpus_needed} ranks, and NCCL {}.{}.{} cannot put two ranks of a communicator on one",
            v.0, v.1, v.2
        );
        common::skipped(&this_test(), &why);
        return None;
    }
    Some(env)
}

#[test]
fn nccl_every_operation_two_ranks() {
    if let Some(mut env) = nccl_env(2) {
        env.push(("MW_BACKEND", "nccl".into()));
        common::run_ranks("collectives", 2, &env, Duration::from_secs(400));
    }
}

/// The C API on an NCCL communicator (config backend 1): every collective, grouped sends and
/// receives, a barrier on the stream; host memory refused.
fn c_api(ctx: &Ctx) {
    use multiworld::cuda::cudarc::driver::{DevicePtr, DevicePtrMut};
    use multiworld::ffi::*;
    use std::ffi::c_void;
    let (n, rank) = (ctx.size, ctx.rank);
    let s = stream_for(rank);
    let mut id = mwUniqueId { internal: [0; MW_UNIQUE_ID_BYTES] };
    for (d, b) in id.internal.iter_mut().zip(ctx.id().to_bytes()) {
        *d = b as std::ffi::c_char;
    }
    let mut cfg = mwConfig_t {
        size: 0,
        blocking: 0,
        timeoutMs: 0,
        heartbeatIntervalMs: 0,
        heartbeatTimeoutMs: 0,
        opTimeoutMs: 0,
        transport: 0,
        backend: 0,
    };
    // SAFETY: out-pointers to locals; the id is a value.
    unsafe {
        assert_eq!(mwConfigInit(&mut cfg), mwSuccess);
        cfg.backend = 1;
        let mut comm: mwComm_t = std::ptr::null_mut();
        assert_eq!(mwCommInitRankConfig(&mut comm, n as i32, id, rank as i32, &mut cfg), mwSuccess);
        let d = multiworld::DataType::F32;
        let count = 4097;
        let up = |b: &[u8]| s.clone_htod(&typed::<f32>(b)).unwrap();
        let zeros = |k: usize| s.alloc_zeros::<f32>(k).unwrap();
        let root = n - 1;
        let send = up(&input(d, rank, 0, count));
        let mine_blocks = up(&blocks(d, rank, n, count));
        let (mut sum, mut all, mut got, mut scat, mut a2a) =
            (zeros(count), zeros(count * n), zeros(count), zeros(count), zeros(count * n));
        let mut gath = zeros(count * n);
        let mut rs = zeros(count);
        let st = s.cu_stream() as *mut c_void;
        let (right, left) = ((rank + 1) % n, (rank + n - 1) % n);
        {
            let (sp, _g1) = send.device_ptr(&s);
            let (bp, _g2) = mine_blocks.device_ptr(&s);
            let (up_, _g3) = sum.device_ptr_mut(&s);
            let (ap, _g4) = all.device_ptr_mut(&s);
            let (gp, _g5) = got.device_ptr_mut(&s);
            let (cp, _g6) = scat.device_ptr_mut(&s);
            let (tp, _g7) = a2a.device_ptr_mut(&s);
            let (hp, _g8) = gath.device_ptr_mut(&s);
            let (rp, _g9) = rs.device_ptr_mut(&s);
            let p = |x: u64| x as *mut c_void;
            assert_eq!(mwAllReduce(p(sp), p(up_), count, mwFloat, mwSum, comm, st), mwSuccess);
            assert_eq!(mwAllGather(p(sp), p(ap), count, mwFloat, comm, st), mwSuccess);
            assert_eq!(mwReduceScatter(p(bp), p(rp), count, mwFloat, mwSum, comm, st), mwSuccess);
            assert_eq!(mwGather(p(sp), p(hp), count, mwFloat, root as i32, comm, st), mwSuccess);
            assert_eq!(mwScatter(p(bp), p(cp), count, mwFloat, root as i32, comm, st), mwSuccess);
            assert_eq!(mwAllToAll(p(bp), p(tp), count, mwFloat, comm, st), mwSuccess);
            assert_eq!(mwGroupStart(), mwSuccess);
            assert_eq!(mwSend(p(sp), count, mwFloat, right as i32, comm, st), mwSuccess);
            assert_eq!(mwRecv(p(gp), count, mwFloat, left as i32, comm, st), mwSuccess);
            assert_eq!(mwGroupEnd(), mwSuccess);
            assert_eq!(mwBarrier(comm, st), mwSuccess);
            // Host memory on an NCCL communicator: refused, nothing lost.
            let mut x = [1f32];
            let host =
                mwAllReduce(x.as_ptr().cast(), x.as_mut_ptr().cast(), 1, mwFloat, mwSum, comm, std::ptr::null_mut());
            assert_eq!(host, mwInvalidUsage, "host memory on an NCCL communicator");
        }
        s.synchronize().unwrap();
        let bytes = |v: Vec<f32>| bytemuck::cast_slice::<f32, u8>(&v).to_vec();
        assert_eq!(bytes(s.clone_dtoh(&sum).unwrap()), reduced(d, ReduceOp::Sum, n, 0, count), "mwAllReduce");
        assert_eq!(bytes(s.clone_dtoh(&all).unwrap()), gathered(d, n, 0, count), "mwAllGather");
        assert_eq!(bytes(s.clone_dtoh(&rs).unwrap()), reduced(d, ReduceOp::Sum, n, rank, count), "mwReduceScatter");
        if rank == root {
            assert_eq!(bytes(s.clone_dtoh(&gath).unwrap()), gathered(d, n, 0, count), "mwGather");
        }
        assert_eq!(bytes(s.clone_dtoh(&scat).unwrap()), input(d, root, rank, count), "mwScatter");
        assert_eq!(bytes(s.clone_dtoh(&a2a).unwrap()), gathered(d, n, rank, count), "mwAllToAll");
        assert_eq!(bytes(s.clone_dtoh(&got).unwrap()), input(d, left, 0, count), "grouped mwSend/mwRecv");
        let mut state = mwInternalError;
        assert_eq!(mwCommGetAsyncError(comm, &mut state), mwSuccess);
        assert_eq!(state, mwSuccess);
        // Everyone is past their last operation before anyone leaves.
        assert_eq!(mwBarrier(comm, st), mwSuccess);
        s.synchronize().unwrap();
        assert_eq!(mwCommDestroy(comm), mwSuccess);
    }
    println!("rank {rank}: the C API on NCCL checked");
}

#[test]
fn nccl_through_the_c_api() {
    if let Some(env) = nccl_env(2) {
        common::run_ranks("c_api", 2, &env, Duration::from_secs(120));
    }
}

/// Three ranks: NCCL world "a" joins 0 and 1, NCCL world "b" and native world "c" join 0 and
/// 2. Rank 1 dies (`MW_TEST_ARG=kill`) or stops (`stop`) while rank 0's stream waits in an
/// all-reduce on "a": that call or the stream's synchronize fails with `WorldBroken` within the
/// bound (a closed link at once; a silent peer at the heartbeat timeout, 1 s here), and "b"
/// and "c", on the same GPU, keep working.
fn fault(ctx: &Ctx) {
    let s = stream_for(ctx.rank);
    let hb = WorldOptions::default().with_heartbeat(Duration::from_millis(200), Duration::from_secs(1));
    let nccl = hb.clone().with_backend(BackendChoice::Nccl);
    let native = hb.with_backend(BackendChoice::Native);
    let m = WorldManager::new();
    let id = |k: &str| ctx.env(k).parse::<UniqueId>().expect("id");
    let dev = |name: &str, key: &str, rank: usize, o: &WorldOptions, s: &std::sync::Arc<_>| {
        DeviceWorld::new(m.init_world_with(name, id(key).into(), rank, 2, o).unwrap(), std::sync::Arc::clone(s))
            .unwrap()
    };
    const N: usize = 16 << 20;
    let others =
        |b: &DeviceWorld, c: &DeviceWorld, sb: &std::sync::Arc<multiworld::cuda::cudarc::driver::CudaStream>| {
            for w in [b, c] {
                let one = sb.clone_htod(&[1f32; 1024]).unwrap();
                let mut out = sb.alloc_zeros::<f32>(1024).unwrap();
                w.all_reduce(&one, &mut out, &ReduceOp::Sum).unwrap();
                w.synchronize().unwrap();
                assert_eq!(sb.clone_dtoh(&out).unwrap(), vec![2f32; 1024], "world '{}'", w.world().name());
            }
            meet(b);
            meet(c);
        };
    match ctx.rank {
        0 => {
            let a = dev("a", "MW_ID_A", 0, &nccl, &s);
            let sb = stream_for(0);
            let b = dev("b", "MW_ID_B", 0, &nccl, &sb);
            let c = dev("c", "MW_ID_C", 0, &native, &sb);
            meet(&a);
            // Rank 1 now waits, then dies or stops: this all-reduce can never finish.
            let send = s.clone_htod(&vec![1f32; N]).unwrap();
            let mut sum = s.alloc_zeros::<f32>(N).unwrap();
            let t = Instant::now();
            let r = a.all_reduce(&send, &mut sum, &ReduceOp::Sum).and_then(|_| a.synchronize());
            let took = t.elapsed();
            let e = r.expect_err("an all-reduce with a dead or stopped peer cannot succeed");
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
            assert!(took < Duration::from_secs(15), "the stream was released only after {took:?}");
            let e = a.all_reduce(&send, &mut sum, &ReduceOp::Sum).expect_err("world a is broken");
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
            // The stream itself still runs.
            s.synchronize().unwrap();
            others(&b, &c, &sb);
            println!("rank 0: {} released the stream after {took:?} ({e}); worlds b and c unaffected", ctx.arg);
        }
        1 => {
            let a = dev("a", "MW_ID_A", 1, &nccl, &s);
            meet(&a);
            std::thread::sleep(Duration::from_millis(300));
            let sig = if ctx.arg == "stop" { libc::SIGSTOP } else { libc::SIGKILL };
            // SAFETY: kill(2) on this process.
            unsafe { libc::kill(libc::getpid(), sig) };
            // A stopped rank goes no further: the test kills it.
            std::thread::sleep(Duration::from_secs(3600));
        }
        _ => {
            let b = dev("b", "MW_ID_B", 1, &nccl, &s);
            let c = dev("c", "MW_ID_C", 1, &native, &s);
            others(&b, &c, &s);
        }
    }
}

fn run_fault(how: &str) {
    let Some(mut env) = nccl_env(3) else { return };
    let ip = "127.0.0.1".parse().unwrap();
    for k in ["MW_ID_A", "MW_ID_B", "MW_ID_C"] {
        env.push((k, UniqueId::new_on(ip).unwrap().to_string()));
    }
    env.push(("MW_TEST_ARG", how.to_string()));
    let mut procs: Vec<_> = (0..3).map(|r| common::spawn("fault", r, 3, &env, &[])).collect();
    // Rank 1 dies or stops by design; ranks 0 and 2 must succeed.
    let mut failed = procs.remove(1);
    common::finish(&mut procs, Duration::from_secs(180));
    failed.signal(libc::SIGKILL);
    failed.wait_for(Duration::from_secs(10));
}

#[test]
fn nccl_stream_is_released_when_peer_is_killed() {
    run_fault("kill");
}

#[test]
fn nccl_stream_is_released_when_peer_is_stopped() {
    run_fault("stop");
}
