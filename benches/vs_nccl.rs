//! The crate's device path against NCCL (features `cuda` and `nccl`): all_reduce, all_gather,
//! reduce_scatter, broadcast and a grouped send/recv around the ring, 8 B to 256 MiB, both
//! backends on the same device buffers and stream, ranks as processes on this host (GPU
//! `rank % count`). Rank 0 runs criterion and tells the other ranks, over a host world of their
//! own, which operation to run how many times. Skips, saying why, without a GPU or NCCL.
//!
//! `cargo bench --features cuda,nccl --bench vs_nccl` (ranks: `MW_VS_NCCL_RANKS`, default 2).

#[cfg(not(feature = "nccl"))]
fn main() {
    println!("vs_nccl: skipped: built without the nccl feature (cargo bench --features cuda,nccl)");
}

#[cfg(feature = "nccl")]
fn main() {
    bench::main();
}

#[cfg(feature = "nccl")]
mod bench {
    use std::process::{Child, Command};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use criterion::{BenchmarkId, Criterion, Throughput};
    use multiworld::cuda::cudarc::driver::{CudaSlice, CudaStream};
    use multiworld::{BackendChoice, DeviceWorld, ReduceOp, UniqueId, World, WorldManager, WorldOptions};

    const OPS: [&str; 5] = ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "send_recv"];
    const SIZES: [usize; 6] = [8, 1 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20];
    const BACKENDS: [BackendChoice; 2] = [BackendChoice::Native, BackendChoice::Nccl];

    /// Why the comparison cannot run here, if it cannot; else the environment its ranks need.
    fn setup() -> Result<Vec<(&'static str, String)>, String> {
        let gpus = multiworld::cuda::device_count().map_err(|e| e.to_string())?;
        if gpus == 0 {
            return Err("no CUDA device on this machine".into());
        }
        let v = multiworld::nccl::version().map_err(|e| e.to_string())?;
        if gpus < ranks() && v < (2, 30, 0) {
            return Err(format!(
                "{gpus} GPU(s) for {} ranks, and NCCL {}.{}.{} cannot put two ranks of a communicator on one",
                ranks(),
                v.0,
                v.1,
                v.2
            ));
        }
        Ok(Vec::new())
    }

    fn ranks() -> usize {
        std::env::var("MW_VS_NCCL_RANKS").ok().and_then(|v| v.parse().ok()).unwrap_or(2).max(2)
    }

    /// One rank: a host world for the commands, and a device world per backend on one stream.
    struct Rank {
        ctl: World,
        s: Arc<CudaStream>,
        dws: Vec<DeviceWorld>,
        rank: usize,
        n: usize,
        _m: WorldManager,
    }

    impl Rank {
        fn join(rank: usize, n: usize) -> Rank {
            let id = |k: &str| std::env::var(k).expect(k).parse::<UniqueId>().expect("id");
            let m = WorldManager::new();
            let ctl = m.init_world("ctl", &id("MW_VS_ID_CTL"), rank, n).expect("control world");
            let gpus = multiworld::cuda::device_count().expect("GPUs");
            let s = multiworld::cuda::context(rank % gpus).expect("context").new_stream().expect("stream");
            let dws = BACKENDS
                .iter()
                .zip([("native", "MW_VS_ID_NATIVE"), ("nccl", "MW_VS_ID_NCCL")])
                .map(|(&b, (name, k))| {
                    let o = WorldOptions::default().with_backend(b);
                    let w = m.init_world_with(name, id(k).into(), rank, n, &o).expect("device world");
                    DeviceWorld::new(w, s.clone()).expect("device world")
                })
                .collect();
            Rank { ctl, s, dws, rank, n, _m: m }
        }

        /// Runs `iters` of operation `op` on `bytes` (the largest buffer, as nccl-tests counts)
        /// with backend `b`, and waits for the stream; returns the time of the loop.
        fn run(&self, op: usize, b: usize, bytes: usize, iters: u64) -> Duration {
            let dw = &self.dws[b];
            let count = (bytes / 4).max(1);
            let block = match OPS[op] {
                "all_gather" | "reduce_scatter" => (count / self.n).max(1),
                _ => count,
            };
            let big = block * self.n;
            let send: CudaSlice<f32> =
                self.s.alloc_zeros(if OPS[op] == "reduce_scatter" { big } else { block }).unwrap();
            let mut recv: CudaSlice<f32> =
                self.s.alloc_zeros(if OPS[op] == "all_gather" { big } else { block }).unwrap();
            let (right, left) = ((self.rank + 1) % self.n, (self.rank + self.n - 1) % self.n);
            let once = |recv: &mut CudaSlice<f32>| match OPS[op] {
                "all_reduce" => dw.all_reduce(&send, recv, &ReduceOp::Sum),
                "all_gather" => dw.all_gather(&send, recv),
                "reduce_scatter" => dw.reduce_scatter(&send, recv, &ReduceOp::Sum),
                "broadcast" => dw.broadcast((self.rank == 0).then_some(&send), recv, 0),
                _ => {
                    let mut g = dw.group();
                    g.send(&send, right).and_then(|_| g.recv(recv, left)).and_then(|_| g.end())
                }
            };
            once(&mut recv).expect("warm-up");
            dw.synchronize().expect("synchronize");
            self.ctl.barrier().expect("barrier");
            let t = Instant::now();
            for _ in 0..iters {
                once(&mut recv).expect("operation");
            }
            dw.synchronize().expect("synchronize");
            t.elapsed()
        }

        /// Rank 0 hands every rank the next command: (op, backend, bytes, iters), or stop.
        fn command(&self, cmd: Option<[u64; 4]>) -> Option<[u64; 4]> {
            let mut c = [0u64; 5];
            if let Some(x) = cmd {
                c = [1, x[0], x[1], x[2], x[3]];
            }
            self.ctl.broadcast_in_place(&mut c, 0).expect("command");
            (c[0] == 1).then(|| [c[1], c[2], c[3], c[4]])
        }
    }

    pub fn main() {
        // Ranks share GPUs where there are fewer GPUs than ranks: NCCL 2.30 on allows it when
        // asked by its own variable, set here while this process has only its main thread (the
        // ranks it starts inherit it).
        if std::env::var_os("NCCL_MULTI_RANK_GPU_ENABLE").is_none()
            && multiworld::nccl::version().is_ok_and(|v| v >= (2, 30, 0))
        {
            std::env::set_var("NCCL_MULTI_RANK_GPU_ENABLE", "1");
        }
        if let Ok(r) = std::env::var("MW_VS_NCCL_RANK") {
            let rank = r.parse().expect("rank");
            let me = Rank::join(rank, ranks());
            while let Some([op, b, bytes, iters]) = me.command(None) {
                me.run(op as usize, b as usize, bytes as usize, iters);
            }
            return;
        }
        let env = match setup() {
            Ok(env) => env,
            Err(why) => {
                println!("vs_nccl: skipped: {why}");
                return;
            }
        };
        let ip = "127.0.0.1".parse().unwrap();
        let ids: Vec<(&str, String)> = ["MW_VS_ID_CTL", "MW_VS_ID_NATIVE", "MW_VS_ID_NCCL"]
            .into_iter()
            .map(|k| (k, UniqueId::new_on(ip).unwrap().to_string()))
            .collect();
        let exe = std::env::current_exe().expect("own executable");
        let mut peers: Vec<Child> = (1..ranks())
            .map(|r| {
                Command::new(&exe)
                    .envs(env.iter().chain(&ids).map(|(k, v)| (*k, v.as_str())))
                    .env("MW_VS_NCCL_RANK", r.to_string())
                    .spawn()
                    .expect("spawning a rank")
            })
            .collect();
        for (k, v) in env.iter().chain(&ids) {
            std::env::set_var(k, v);
        }
        let me = Rank::join(0, ranks());
        let mut c = Criterion::default()
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(1))
            .configure_from_args();
        for (op, name) in OPS.iter().enumerate() {
            let mut g = c.benchmark_group(*name);
            for bytes in SIZES {
                g.throughput(Throughput::Bytes(bytes as u64));
                for (b, label) in ["native", "nccl"].iter().enumerate() {
                    g.bench_with_input(BenchmarkId::new(*label, bytes), &bytes, |bench, &bytes| {
                        bench.iter_custom(|iters| {
                            me.command(Some([op as u64, b as u64, bytes as u64, iters]));
                            me.run(op, b, bytes, iters)
                        })
                    });
                }
            }
            g.finish();
        }
        me.command(None);
        for p in &mut peers {
            let _ = p.wait();
        }
    }
}
