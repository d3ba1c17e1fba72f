//! `mw-bench`: runs N local processes and measures multiworld's operations, printing
//! nccl-tests-style rows, with the physical limits measured in the same run as baselines.
//!
//! ```text
//! mw-bench [--ranks N] [--ops all_reduce,send_recv,...|all] [--dtype float|all] [--redop sum]
//!          [-b MIN] [-e MAX] [-f FACTOR] [--iters N] [--warmup N] [--transport auto|tcp|rdma]
//!          [--json] [--targets] [--smoke] [--device] [--osu] [--osu-table FILE] [--worlds N]
//!          [--elastic]
//! ```
//!
//! - default: a table per operation: size, count, type, redop, time (us), algbw, busbw (GB/s,
//!   nccl-tests' bus-bandwidth factors), `#wrong` (every result is checked against a reference
//!   computed here), and single-thread memcpy bandwidth of the same size.
//! - `--targets`: the performance targets of `docs/benchmarks.md`, each as a ratio against its
//!   baseline measured in the same run.
//! - `--smoke`: every operation and type at a few sizes; exits non-zero if any result is wrong.
//! - `--osu`: the OSU-style shapes of Open MPI's side of the comparison, same line format
//!   (`osu.rs`); `--osu-table FILE` sets interleaved runs of both side by side.
//! - `--worlds N`: what N idle worlds cost a process, and a busy world beside them
//!   (`worlds.rs`).
//! - `--elastic`: how long dup, split, shrink and grow take against a fresh formation
//!   (`elastic.rs`).
//! - `--device` (feature `cuda`): operations on GPU buffers beside the device-to-device copy
//!   bandwidth, and the reduction kernel against that copy (`device.rs`).
//!
//! The first process is rank 0; it starts the others by running itself again.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use multiworld::{
    bf16, f16, BackendChoice, DataType, Element, ReduceOp, Rendezvous, TransportChoice, UniqueId, World, WorldManager,
    WorldOptions,
};

#[path = "../../../tests/common/reference.rs"]
mod reference;

#[cfg(feature = "cuda")]
mod device;
mod elastic;
mod osu;
mod worlds;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduce,
    Broadcast,
    Reduce,
    AllGather,
    ReduceScatter,
    Gather,
    Scatter,
    AllToAll,
    SendRecv,
    /// One-way stream: even ranks send to the next odd rank.
    Send,
}

const ALL_OPS: [Op; 10] = [
    Op::AllReduce,
    Op::Broadcast,
    Op::Reduce,
    Op::AllGather,
    Op::ReduceScatter,
    Op::Gather,
    Op::Scatter,
    Op::AllToAll,
    Op::SendRecv,
    Op::Send,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::Broadcast => "broadcast",
            Op::Reduce => "reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::Gather => "gather",
            Op::Scatter => "scatter",
            Op::AllToAll => "all_to_all",
            Op::SendRecv => "send_recv",
            Op::Send => "send",
        }
    }
    fn reduces(self) -> bool {
        matches!(self, Op::AllReduce | Op::Reduce | Op::ReduceScatter)
    }
    /// nccl-tests' factor from algorithm bandwidth to bus bandwidth.
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Op::AllReduce => 2.0 * (n - 1.0) / n,
            Op::AllGather | Op::ReduceScatter | Op::AllToAll | Op::Gather | Op::Scatter => (n - 1.0) / n,
            Op::Broadcast | Op::Reduce | Op::SendRecv | Op::Send => 1.0,
        }
    }
    /// Elements per rank block for a "size" (the largest buffer, in bytes, as nccl-tests counts).
    fn count(self, size: usize, e: usize, n: usize) -> usize {
        match self {
            Op::AllGather | Op::ReduceScatter | Op::AllToAll | Op::Gather | Op::Scatter => size / e / n,
            _ => size / e,
        }
    }
}

#[derive(Debug, Clone)]
struct Args {
    ranks: usize,
    ops: Vec<Op>,
    dtypes: Vec<DataType>,
    redop: ReduceOp,
    min: usize,
    max: usize,
    factor: usize,
    iters: usize,
    warmup: usize,
    transport: TransportChoice,
    json: bool,
    mode: Mode,
    /// `--backend`: who runs `--device`'s operations.
    backends: Vec<BackendChoice>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Table,
    Targets,
    Smoke,
    Device,
    Osu,
    /// `--worlds N`.
    Worlds(usize),
    /// `--elastic`.
    Elastic,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1usize << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().map(|v| v * mul).map_err(|e| format!("bad size '{s}': {e}"))
}

fn parse_dtype(s: &str) -> Result<DataType, String> {
    DataType::ALL.into_iter().find(|d| d.name() == s).ok_or(format!("unknown type '{s}'"))
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        ranks: 2,
        ops: ALL_OPS.to_vec(),
        dtypes: vec![DataType::F32],
        redop: ReduceOp::Sum,
        min: 8,
        max: 64 << 20,
        factor: 8,
        iters: 20,
        warmup: 5,
        transport: TransportChoice::Auto,
        json: false,
        mode: Mode::Table,
        backends: vec![BackendChoice::Native],
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--ranks" | "-n" => a.ranks = v()?.parse().map_err(|e| format!("--ranks: {e}"))?,
            "--ops" => {
                let s = v()?;
                a.ops = if s == "all" {
                    ALL_OPS.to_vec()
                } else {
                    s.split(',')
                        .map(|o| ALL_OPS.into_iter().find(|x| x.name() == o).ok_or(format!("unknown op '{o}'")))
                        .collect::<Result<_, _>>()?
                };
            }
            "--dtype" | "-d" => {
                let s = v()?;
                a.dtypes = if s == "all" {
                    DataType::ALL.to_vec()
                } else {
                    s.split(',').map(parse_dtype).collect::<Result<_, _>>()?
                };
            }
            "--redop" | "-o" => {
                let s = v()?;
                a.redop = ReduceOp::ALL.into_iter().find(|o| o.name() == s).ok_or(format!("unknown op '{s}'"))?;
            }
            "-b" | "--minbytes" => a.min = parse_size(&v()?)?,
            "-e" | "--maxbytes" => a.max = parse_size(&v()?)?,
            "-f" | "--stepfactor" => a.factor = v()?.parse().map_err(|e| format!("-f: {e}"))?,
            "--iters" | "-n-iters" => a.iters = v()?.parse().map_err(|e| format!("--iters: {e}"))?,
            "--warmup" | "-w" => a.warmup = v()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--transport" => {
                a.transport = match v()?.as_str() {
                    "auto" | "shm" => TransportChoice::Auto,
                    "tcp" => TransportChoice::Tcp,
                    "rdma" => TransportChoice::Rdma,
                    t => return Err(format!("unknown transport '{t}'")),
                }
            }
            "--backend" => {
                a.backends = match v()?.as_str() {
                    "native" => vec![BackendChoice::Native],
                    "nccl" => vec![BackendChoice::Nccl],
                    "both" => vec![BackendChoice::Native, BackendChoice::Nccl],
                    b => return Err(format!("unknown backend '{b}' (native, nccl or both)")),
                }
            }
            "--json" => a.json = true,
            "--targets" => a.mode = Mode::Targets,
            "--smoke" => a.mode = Mode::Smoke,
            "--osu" => a.mode = Mode::Osu,
            "--elastic" => a.mode = Mode::Elastic,
            "--worlds" => a.mode = Mode::Worlds(v()?.parse().map_err(|e| format!("--worlds: {e}"))?),
            "--osu-table" => {
                let f = v()?;
                if let Err(e) = osu::table(&f) {
                    return Err(format!("--osu-table: {e}"));
                }
                std::process::exit(0);
            }
            "--device" if cfg!(feature = "cuda") => a.mode = Mode::Device,
            "--device" => return Err("--device needs a build with the cuda feature".into()),
            "-h" | "--help" => {
                println!("{}", include_str!("usage.txt"));
                std::process::exit(0);
            }
            _ => return Err(format!("unknown option '{k}' (see --help)")),
        }
    }
    if a.ranks == 0 || a.factor < 2 || a.min == 0 || a.min > a.max || a.iters == 0 {
        return Err("need --ranks >= 1, -f >= 2, 0 < -b <= -e, --iters >= 1".into());
    }
    Ok(a)
}

/// Everything one rank needs to run the suite.
struct Bench {
    w: World,
    m: WorldManager,
    rank: usize,
    n: usize,
    args: Args,
    rows: Vec<String>,
    wrong_total: u64,
}

fn typed<T: Element>(b: &[u8]) -> Vec<T> {
    b.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect()
}

/// Runs per figure in `--targets`.
const REPEATS: usize = 5;
/// Worlds formed in the burst of `--targets`.
const BURST: usize = 20;

/// Runs a baseline and then our side, REPEATS times: the medians of ours, of the baseline, and
/// of the ratio ours / baseline within each pair (a ratio of neighbours drifts less than the
/// machine does).
fn paired(mut base: impl FnMut() -> f64, mut ours: impl FnMut() -> f64) -> (f64, f64, f64) {
    let (mut o, mut b, mut r) = (vec![], vec![], vec![]);
    for _ in 0..REPEATS {
        let x = base();
        let y = ours();
        r.push(y / x);
        o.push(y);
        b.push(x);
    }
    (median(&mut o), median(&mut b), median(&mut r))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Bandwidth (GB/s) of moving `size`-byte messages `iters` times through a bare ring between
/// two threads, with the shared-memory transport's slot size and count but none of its logic:
/// the cross-core copy rate this machine allows.
fn bare_ring_gbps(size: usize, iters: usize) -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    const SLOT: usize = 32 << 10;
    const SLOTS: usize = 32;
    struct Ring {
        head: AtomicU64,
        _pad: [u64; 7],
        tail: AtomicU64,
        buf: Vec<std::cell::UnsafeCell<u8>>,
    }
    // SAFETY: the head/tail protocol below gives each slot to one thread at a time.
    unsafe impl Sync for Ring {}
    let ring = Ring {
        head: AtomicU64::new(0),
        _pad: [0; 7],
        tail: AtomicU64::new(0),
        buf: (0..SLOT * SLOTS).map(|_| std::cell::UnsafeCell::new(0)).collect(),
    };
    let frames = size.div_ceil(SLOT);
    let src = vec![1u8; size];
    let base = |r: &Ring| r.buf[0].get();
    let t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut dst = vec![0u8; size];
            let mut tail = 0u64;
            for _ in 0..iters {
                for f in 0..frames {
                    while ring.head.load(Ordering::Acquire) == tail {
                        std::hint::spin_loop();
                    }
                    let n = SLOT.min(size - f * SLOT);
                    // SAFETY: a published slot belongs to the consumer until it moves `tail`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            base(&ring).add((tail as usize % SLOTS) * SLOT),
                            dst.as_mut_ptr().add(f * SLOT),
                            n,
                        )
                    };
                    tail += 1;
                    ring.tail.store(tail, Ordering::Release);
                }
            }
            std::hint::black_box(&dst);
        });
        let mut head = 0u64;
        for _ in 0..iters {
            for f in 0..frames {
                while head - ring.tail.load(Ordering::Acquire) >= SLOTS as u64 {
                    std::hint::spin_loop();
                }
                let n = SLOT.min(size - f * SLOT);
                // SAFETY: a free slot belongs to the producer until it moves `head`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr().add(f * SLOT),
                        base(&ring).add((head as usize % SLOTS) * SLOT),
                        n,
                    )
                };
                head += 1;
                ring.head.store(head, Ordering::Release);
            }
        }
    });
    (size * iters) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Single-thread memcpy bandwidth for `size` bytes, GB/s.
fn memcpy_gbps(size: usize) -> f64 {
    let src = vec![1u8; size.max(1)];
    let mut dst = vec![0u8; size.max(1)];
    dst.copy_from_slice(&src);
    let reps = (256usize << 20).div_ceil(size.max(1)).clamp(3, 100_000);
    let t = Instant::now();
    for _ in 0..reps {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    (size * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn sizes(a: &Args) -> Vec<usize> {
    let mut v = Vec::new();
    let mut s = a.min;
    while s <= a.max {
        v.push(s);
        s = s.saturating_mul(a.factor);
    }
    v
}

impl Bench {
    fn max_over_ranks(&self, x: f64) -> f64 {
        let mut v = [x];
        self.w.all_reduce_in_place(&mut v, ReduceOp::Max).expect("all_reduce");
        v[0]
    }

    fn sum_over_ranks(&self, x: u64) -> u64 {
        let mut v = [x];
        self.w.all_reduce_in_place(&mut v, ReduceOp::Sum).expect("all_reduce");
        v[0]
    }

    /// Runs one operation on `count` elements of `T`: `iters` times after `warmup`, then checks
    /// the output. Returns (seconds per operation, slowest rank; wrong elements, all ranks).
    fn run_op<T: Element>(&self, op: Op, count: usize, iters: usize, warmup: usize) -> (f64, u64) {
        let d = T::DATA_TYPE;
        let (n, r, root) = (self.n, self.rank, 0usize);
        let redop = self.args.redop;
        let mine: Vec<T> = typed(&reference::input(d, r, 0, count));
        let blocks: Vec<T> = typed(&reference::blocks(d, r, n, count));
        let (send, mut recv): (Vec<T>, Vec<T>) = match op {
            Op::AllReduce | Op::Broadcast | Op::Reduce | Op::SendRecv | Op::Send => (mine, vec![T::zeroed(); count]),
            Op::AllGather | Op::Gather => (mine, vec![T::zeroed(); count * n]),
            Op::ReduceScatter | Op::Scatter => (blocks, vec![T::zeroed(); count]),
            Op::AllToAll => (blocks, vec![T::zeroed(); count * n]),
        };
        let (right, left) = ((r + 1) % n, (r + n - 1) % n);
        let once = |recv: &mut Vec<T>| {
            let w = &self.w;
            let res = match op {
                Op::AllReduce => w.all_reduce(&send, recv, redop),
                Op::Broadcast => w.broadcast((r == root).then_some(&send[..]), recv, root),
                Op::Reduce => w.reduce(&send, recv, redop, root),
                Op::AllGather => w.all_gather(&send, recv),
                Op::ReduceScatter => w.reduce_scatter(&send, recv, redop),
                Op::Gather => w.gather(&send, recv, root),
                Op::Scatter => w.scatter(&send, recv, root),
                Op::AllToAll => w.all_to_all(&send, recv),
                Op::SendRecv => {
                    let mut g = w.group();
                    g.send(&send, right).and_then(|_| g.recv(recv, left)).and_then(|_| g.end())
                }
                Op::Send if r % 2 == 0 && r + 1 < n => w.send(&send, r + 1),
                Op::Send if r % 2 == 1 => w.recv(recv, r - 1),
                Op::Send => Ok(()),
            };
            res.unwrap_or_else(|e| panic!("{} failed: {e}", op.name()));
        };
        for _ in 0..warmup {
            once(&mut recv);
        }
        self.w.barrier().expect("barrier");
        let t = Instant::now();
        for _ in 0..iters {
            once(&mut recv);
        }
        if op == Op::Send {
            // A stream is done when the receivers have everything.
            self.w.barrier().expect("barrier");
        }
        let secs = t.elapsed().as_secs_f64() / iters as f64;
        let want: Option<Vec<u8>> = match op {
            Op::AllReduce => Some(reference::reduced(d, redop, n, 0, count)),
            Op::Reduce => (r == root).then(|| reference::reduced(d, redop, n, 0, count)),
            Op::ReduceScatter => Some(reference::reduced(d, redop, n, r, count)),
            Op::Broadcast => Some(reference::input(d, root, 0, count)),
            Op::AllGather => Some(reference::gathered(d, n, 0, count)),
            Op::Gather => (r == root).then(|| reference::gathered(d, n, 0, count)),
            Op::Scatter => Some(reference::input(d, root, r, count)),
            Op::AllToAll => Some(reference::gathered(d, n, r, count)),
            Op::SendRecv => Some(reference::input(d, left, 0, count)),
            Op::Send => (r % 2 == 1).then(|| reference::input(d, r - 1, 0, count)),
        };
        let got: &[u8] = bytemuck::cast_slice(&recv);
        let e = d.size();
        let wrong = want.map_or(0, |w| got.chunks(e).zip(w.chunks(e)).filter(|(a, b)| a != b).count() as u64);
        (self.max_over_ranks(secs), self.sum_over_ranks(wrong))
    }

    fn run_dtype(&self, op: Op, d: DataType, count: usize) -> (f64, u64) {
        let (it, wu) = (self.args.iters, self.args.warmup);
        match d {
            DataType::I8 => self.run_op::<i8>(op, count, it, wu),
            DataType::U8 => self.run_op::<u8>(op, count, it, wu),
            DataType::I32 => self.run_op::<i32>(op, count, it, wu),
            DataType::U32 => self.run_op::<u32>(op, count, it, wu),
            DataType::I64 => self.run_op::<i64>(op, count, it, wu),
            DataType::U64 => self.run_op::<u64>(op, count, it, wu),
            DataType::F16 => self.run_op::<f16>(op, count, it, wu),
            DataType::BF16 => self.run_op::<bf16>(op, count, it, wu),
            DataType::F32 => self.run_op::<f32>(op, count, it, wu),
            DataType::F64 => self.run_op::<f64>(op, count, it, wu),
        }
    }

    fn table(&mut self, sizes: &[usize]) {
        let kind = self.w.transports()[(self.rank + 1) % self.n].unwrap_or(multiworld::TransportKind::Loopback);
        let mut transport = format!("{kind:?}");
        if kind == multiworld::TransportKind::Rdma && std::env::var("MW_RDMA_PROVIDER").as_deref() == Ok("soft") {
            // The software provider moves bytes through a socket: its figures measure the
            // protocol's overheads, nothing of a NIC.
            transport.push_str(" (software provider: not a NIC)");
        }
        for op in self.args.ops.clone() {
            if self.rank == 0 && !self.args.json {
                println!("#\n# {}  ranks {}  transport {}", op.name(), self.n, transport.to_lowercase());
                println!(
                    "# {:>12} {:>12} {:>9} {:>6} {:>11} {:>8} {:>8} {:>7} {:>10}",
                    "size", "count", "type", "redop", "time(us)", "algbw", "busbw", "#wrong", "memcpy"
                );
                println!(
                    "# {:>12} {:>12} {:>9} {:>6} {:>11} {:>8} {:>8} {:>7} {:>10}",
                    "(B)", "(elements)", "", "", "", "(GB/s)", "(GB/s)", "", "(GB/s)"
                );
            }
            for d in self.args.dtypes.clone() {
                for &size in sizes {
                    let e = d.size();
                    let count = op.count(size, e, self.n);
                    let bytes = match op {
                        Op::AllGather | Op::ReduceScatter | Op::AllToAll | Op::Gather | Op::Scatter => {
                            count * e * self.n
                        }
                        _ => count * e,
                    };
                    if count == 0 && size > 0 {
                        continue;
                    }
                    let (secs, wrong) = self.run_dtype(op, d, count);
                    self.wrong_total += wrong;
                    if self.rank != 0 {
                        continue;
                    }
                    let algbw = bytes as f64 / secs / 1e9;
                    let busbw = algbw * op.bus_factor(self.n);
                    let mc = memcpy_gbps(bytes);
                    let redop = if op.reduces() { self.args.redop.name() } else { "none" };
                    if self.args.json {
                        self.rows.push(format!(
                            "{{\"op\":\"{}\",\"ranks\":{},\"transport\":\"{}\",\"size\":{bytes},\"count\":{count},\"type\":\"{}\",\"redop\":\"{redop}\",\"time_us\":{:.3},\"algbw\":{:.4},\"busbw\":{:.4},\"wrong\":{wrong},\"memcpy\":{:.4}}}",
                            op.name(), self.n, transport.to_lowercase(), d.name(), secs * 1e6, algbw, busbw, mc
                        ));
                    } else {
                        println!(
                            "  {:>12} {:>12} {:>9} {:>6} {:>11.2} {:>8.3} {:>8.3} {:>7} {:>10.3}",
                            bytes,
                            count,
                            d.name(),
                            redop,
                            secs * 1e6,
                            algbw,
                            busbw,
                            wrong,
                            mc
                        );
                    }
                }
            }
        }
    }

    /// A second world between the same processes, with other options (rank 0 makes the id and
    /// broadcasts it over the bench world).
    fn side_world(&self, name: &str, opts: &WorldOptions) -> World {
        let mut idb = [0u8; multiworld::UNIQUE_ID_BYTES];
        if self.rank == 0 {
            idb = UniqueId::new_on("127.0.0.1".parse().expect("ip")).expect("unique id").to_bytes();
        }
        self.w.broadcast_in_place(&mut idb, 0).expect("broadcast");
        let id = UniqueId::from_bytes(&idb).expect("id");
        self.m.init_world_with(name, Rendezvous::Id(id), self.rank, self.n, opts).expect("side world")
    }

    /// One-way bandwidth from rank 0 to rank 1 over `w` (seconds per message).
    fn one_way(&self, w: &World, size: usize, iters: usize) -> f64 {
        let mut buf = vec![7u8; size];
        let run = |buf: &mut Vec<u8>, k: usize| {
            for _ in 0..k {
                if self.rank == 0 {
                    w.send(buf, 1).expect("send");
                } else if self.rank == 1 {
                    w.recv(buf, 0).expect("recv");
                }
            }
            // The receiver says it has everything.
            let mut ack = [0u8];
            if self.rank == 1 {
                w.send(&ack, 0).expect("ack");
            } else if self.rank == 0 {
                w.recv(&mut ack, 1).expect("ack");
            }
        };
        run(&mut buf, 3);
        let t = Instant::now();
        run(&mut buf, iters);
        self.max_over_ranks(t.elapsed().as_secs_f64() / iters as f64)
    }

    /// Half the round trip of an 8-byte ping-pong between ranks 0 and 1.
    fn latency(&self, w: &World, iters: usize) -> f64 {
        let mut b = [0u8; 8];
        let mut run = |k: usize| {
            for _ in 0..k {
                if self.rank == 0 {
                    w.send(&b, 1).expect("send");
                    w.recv(&mut b, 1).expect("recv");
                } else if self.rank == 1 {
                    w.recv(&mut b, 0).expect("recv");
                    w.send(&b, 0).expect("send");
                }
            }
        };
        run(iters / 10);
        let t = Instant::now();
        run(iters);
        self.max_over_ranks(t.elapsed().as_secs_f64() / iters as f64 / 2.0)
    }

    /// A plain blocking TCP connection (no delay) between ranks 0 and 1, for the baselines;
    /// `None` on other ranks.
    fn plain_pair(&self) -> Option<TcpStream> {
        let mut port = [0u32];
        let listener = (self.rank == 0).then(|| TcpListener::bind("127.0.0.1:0").expect("bind"));
        if let Some(l) = &listener {
            port[0] = l.local_addr().expect("addr").port() as u32;
        }
        self.w.broadcast_in_place(&mut port, 0).expect("broadcast");
        let s = match self.rank {
            0 => listener.expect("listener").accept().expect("accept").0,
            1 => TcpStream::connect(("127.0.0.1", port[0] as u16)).expect("connect"),
            _ => return None,
        };
        s.set_nodelay(true).ok();
        Some(s)
    }

    /// The same one-way stream over a plain blocking TCP socket pair.
    fn plain_socket(&self, size: usize, iters: usize) -> f64 {
        let mut secs = 0.0;
        if let Some(mut s) = self.plain_pair() {
            let mut ack = [0u8];
            if self.rank == 0 {
                let buf = vec![7u8; size];
                s.write_all(&buf).expect("write");
                s.read_exact(&mut ack).expect("ack");
                let t = Instant::now();
                for _ in 0..iters {
                    s.write_all(&buf).expect("write");
                }
                s.read_exact(&mut ack).expect("ack");
                secs = t.elapsed().as_secs_f64() / iters as f64;
            } else {
                let mut buf = vec![0u8; size];
                s.read_exact(&mut buf).expect("read");
                s.write_all(&[1]).expect("ack");
                for _ in 0..iters {
                    s.read_exact(&mut buf).expect("read");
                }
                s.write_all(&[1]).expect("ack");
            }
        }
        self.max_over_ranks(secs)
    }

    /// Half the round trip of an 8-byte ping-pong over a plain TCP socket pair, as
    /// [`Bench::latency`] measures a world's: with blocking reads, or (`poll`) non-blocking
    /// reads tried again at once, as a driver spins on a TCP link.
    fn plain_latency(&self, iters: usize, poll: bool) -> f64 {
        let mut secs = 0.0;
        if let Some(mut s) = self.plain_pair() {
            s.set_nonblocking(poll).expect("non-blocking");
            let mut b = [0u8; 8];
            let read = |s: &mut TcpStream, b: &mut [u8; 8]| {
                let mut got = 0;
                while got < b.len() {
                    match s.read(&mut b[got..]) {
                        Ok(0) => panic!("the peer closed the baseline's socket"),
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                        Err(e) => panic!("read: {e}"),
                    }
                }
            };
            let mut run = |k: usize| {
                for _ in 0..k {
                    if self.rank == 0 {
                        s.write_all(&b).expect("write");
                        read(&mut s, &mut b);
                    } else {
                        read(&mut s, &mut b);
                        s.write_all(&b).expect("write");
                    }
                }
            };
            run(iters / 10);
            let t = Instant::now();
            run(iters);
            secs = t.elapsed().as_secs_f64() / iters as f64 / 2.0;
        }
        self.max_over_ranks(secs)
    }

    /// Throughput (GB/s) of 1 MiB all-reduces on `w` for about `dur`.
    pub(crate) fn all_reduce_rate(&self, w: &World, dur: Duration) -> f64 {
        let mut v = vec![1f32; 1 << 18];
        let mut out = vec![0f32; 1 << 18];
        for _ in 0..3 {
            w.all_reduce(&v, &mut out, ReduceOp::Sum).expect("all_reduce");
        }
        // Rank 0 decides when to stop, so all ranks run the same number of operations.
        let t = Instant::now();
        let mut k = 0u64;
        loop {
            w.all_reduce(&v, &mut out, ReduceOp::Sum).expect("all_reduce");
            k += 1;
            if k % 16 == 0 {
                let mut stop = [(self.rank == 0 && t.elapsed() >= dur) as u8];
                w.broadcast_in_place(&mut stop, 0).expect("broadcast");
                if stop[0] == 1 {
                    break;
                }
            }
        }
        v[0] = out[0];
        (k as f64 * (1 << 20) as f64) / t.elapsed().as_secs_f64() / 1e9
    }

    fn targets(&mut self) {
        assert!(self.n == 2, "--targets needs --ranks 2");
        let mut lines: Vec<(String, String, String, bool)> = Vec::new();
        let mut target = |what: &str, measured: String, goal: String, ok: bool| {
            lines.push((what.to_string(), measured, goal, ok));
        };
        let shm = self.side_world("shm", &WorldOptions::default());
        // Every figure is the median of REPEATS runs, each paired with its baseline run right
        // before it: this machine's speed drifts, and a ratio of neighbours drifts less.
        // 1. Latency.
        let mut lat: Vec<f64> = (0..REPEATS).map(|_| self.latency(&shm, 20_000)).collect();
        let l = median(&mut lat);
        target(
            "send/recv 8 B one-way latency (shm)",
            format!("{:.3} us (best {:.3})", l * 1e6, lat[0] * 1e6),
            "<= 0.5 us".into(),
            l <= 0.5e-6,
        );
        // 2. Bandwidth, against single-thread memcpy, with a bare two-thread ring (the
        //    cross-core copy this machine allows, no library logic) for context.
        for (size, goal) in [(1usize << 20, 0.35), (64 << 20, 0.7)] {
            let iters = if size > 1 << 20 { 20 } else { 500 };
            let (mut bw, mut mc, mut bare, mut r) = (vec![], vec![], vec![], vec![]);
            for _ in 0..REPEATS {
                let m = self.on_rank0(|| memcpy_gbps(size));
                let b = size as f64 / self.one_way(&shm, size, iters) / 1e9;
                bare.push(self.on_rank0(|| bare_ring_gbps(size, iters)));
                r.push(b / m);
                bw.push(b);
                mc.push(m);
            }
            let (b, m, br, ratio) = (median(&mut bw), median(&mut mc), median(&mut bare), median(&mut r));
            target(
                &format!("send/recv {} MiB bandwidth (shm) / memcpy", size >> 20),
                format!("{b:.2} / {m:.2} GB/s = {ratio:.2}x (bare ring {br:.2})"),
                format!(">= {goal}x"),
                ratio >= goal,
            );
        }
        // 3. All-reduce.
        let mut wrong = 0;
        let (bus, mc, ratio) = paired(
            || self.on_rank0(|| memcpy_gbps(64 << 20)),
            || {
                let (s64, w) = self.run_op::<f32>(Op::AllReduce, 16 << 20, 10, 2);
                wrong += w;
                (64 << 20) as f64 / s64 / 1e9 * Op::AllReduce.bus_factor(2)
            },
        );
        target(
            "all_reduce f32 sum 64 MiB busbw / memcpy (shm)",
            format!("{bus:.2} / {mc:.2} GB/s = {ratio:.2}x ({wrong} wrong)"),
            ">= 0.4x".into(),
            ratio >= 0.4 && wrong == 0,
        );
        let mut t4: Vec<f64> = (0..REPEATS)
            .map(|_| self.run_op::<f32>(Op::AllReduce, 1024, 5000, 500))
            .map(|(s, w)| {
                wrong += w;
                s
            })
            .collect();
        let t = median(&mut t4);
        target(
            "all_reduce f32 sum 4 KiB time (shm)",
            format!("{:.2} us ({wrong} wrong)", t * 1e6),
            "<= 2 us".into(),
            t <= 2e-6 && wrong == 0,
        );
        // 4. Formation of a new 2-rank world between running processes.
        let mut times = Vec::new();
        for i in 0..60 {
            let mut idb = [0u8; multiworld::UNIQUE_ID_BYTES];
            if self.rank == 0 {
                idb = UniqueId::new_on("127.0.0.1".parse().expect("ip")).expect("id").to_bytes();
            }
            self.w.broadcast_in_place(&mut idb, 0).expect("broadcast");
            let id = UniqueId::from_bytes(&idb).expect("id");
            let t = Instant::now();
            let nw = self.m.init_world(&format!("form{i}"), &id, self.rank, 2).expect("form");
            let dt = t.elapsed().as_secs_f64();
            nw.barrier().expect("barrier");
            self.m.remove_world(&format!("form{i}")).expect("remove");
            times.push(self.max_over_ranks(dt));
        }
        let med = median(&mut times);
        target(
            "new 2-rank world formed and ready (median of 60)",
            format!("{:.3} ms", med * 1e3),
            "<= 1 ms".into(),
            med <= 1e-3,
        );
        // 5. Fault detection on against off, alternating.
        let off = self.side_world("no-heartbeat", &WorldOptions::default().without_heartbeat());
        let (mut on, mut of, mut r) = (vec![], vec![], vec![]);
        for i in 0..2 * REPEATS {
            // Alternate which goes first, so that neither pays for switching more often.
            let (a, b) = if i % 2 == 0 {
                let a = self.all_reduce_rate(&shm, Duration::from_millis(500));
                (a, self.all_reduce_rate(&off, Duration::from_millis(500)))
            } else {
                let b = self.all_reduce_rate(&off, Duration::from_millis(500));
                (self.all_reduce_rate(&shm, Duration::from_millis(500)), b)
            };
            r.push(a / b);
            on.push(a);
            of.push(b);
        }
        let ratio = median(&mut r);
        target(
            "1 MiB all_reduce throughput, heartbeats on / off",
            format!("{:.3} / {:.3} GB/s = {ratio:.4}", median(&mut on), median(&mut of)),
            ">= 0.99".into(),
            ratio >= 0.99,
        );
        // 6. TCP against a plain socket pair.
        let tcp = self.side_world("tcp", &WorldOptions::default().with_transport(TransportChoice::Tcp));
        let (ours, plain, ratio) = paired(
            || (64 << 20) as f64 / self.plain_socket(64 << 20, 8) / 1e9,
            || (64 << 20) as f64 / self.one_way(&tcp, 64 << 20, 8) / 1e9,
        );
        target(
            "TCP 64 MiB one-way bandwidth / plain socket pair",
            format!("{ours:.2} / {plain:.2} GB/s = {ratio:.2}x"),
            ">= 0.9x".into(),
            ratio >= 0.9,
        );
        // Against the faster of the two plain baselines in each run: blocking reads (a wake-up
        // per message) or polling ones (a core per side, as a spinning driver uses).
        let (ours, plain, ratio) = paired(
            || self.plain_latency(20_000, false).min(self.plain_latency(20_000, true)) * 1e6,
            || self.latency(&tcp, 20_000) * 1e6,
        );
        target(
            "TCP 8 B one-way latency / plain socket ping-pong (best of blocking, polling)",
            format!("{ours:.2} / {plain:.2} us = {ratio:.3}x"),
            "<= 1.1x".into(),
            ratio <= 1.1,
        );
        // 7. Other worlds' throughput during a burst of formations: BURST new worlds, one every
        //    100 ms, formed and removed while the measured world streams all-reduces.
        let (mut r, mut during_v, mut base_v) = (vec![], vec![], vec![]);
        for _ in 0..REPEATS {
            let base = self.all_reduce_rate(&shm, Duration::from_millis(2000));
            let during = std::thread::scope(|s| {
                let traffic = s.spawn(|| self.all_reduce_rate(&shm, Duration::from_millis(2000)));
                let t = Instant::now();
                let mut k = 0;
                while let Some(id) = self.burst_id(&tcp, k < BURST) {
                    let name = format!("burst{k}");
                    let nw = self.m.init_world(&name, &id, self.rank, 2).expect("burst world");
                    nw.barrier().expect("barrier");
                    self.m.remove_world(&name).expect("remove");
                    k += 1;
                    std::thread::sleep(
                        (t + Duration::from_millis(100 * k as u64)).saturating_duration_since(Instant::now()),
                    );
                }
                traffic.join().expect("traffic")
            });
            r.push(during / base);
            during_v.push(during);
            base_v.push(base);
        }
        let ratio = median(&mut r);
        target(
            &format!("1 MiB all_reduce throughput during a burst of {BURST} formations / without"),
            format!("{:.3} / {:.3} GB/s = {ratio:.3}", median(&mut during_v), median(&mut base_v)),
            ">= 0.95".into(),
            ratio >= 0.95,
        );
        if self.rank == 0 {
            println!("# performance targets ({} ranks, one host; medians of {REPEATS} runs)", self.n);
            for (what, m, g, ok) in &lines {
                println!("  {what:<62} {m:<52} target {g:<10} {}", if *ok { "met" } else { "MISSED" });
            }
        }
    }

    /// Runs `f` on rank 0 only (a local baseline) while the others wait; every rank gets the
    /// result.
    fn on_rank0(&self, f: impl FnOnce() -> f64) -> f64 {
        let mut v = [if self.rank == 0 { f() } else { 0.0 }];
        self.w.broadcast_in_place(&mut v, 0).expect("broadcast");
        v[0]
    }

    /// The next burst world's id, or `None` when rank 0 says the burst is over; sent over `w`,
    /// a side world, so that the burst's own control traffic does not ride on the world being
    /// measured.
    fn burst_id(&self, w: &World, go_on: bool) -> Option<UniqueId> {
        let mut idb = [0u8; multiworld::UNIQUE_ID_BYTES + 1];
        if self.rank == 0 && go_on {
            idb[0] = 1;
            idb[1..].copy_from_slice(&UniqueId::new_on("127.0.0.1".parse().expect("ip")).expect("id").to_bytes());
        }
        w.broadcast_in_place(&mut idb, 0).expect("broadcast");
        (idb[0] == 1).then(|| UniqueId::from_bytes(&idb[1..]).expect("id"))
    }
}

fn run(rank: usize, args: Args) -> Result<u64, String> {
    let n = args.ranks;
    let id: UniqueId =
        std::env::var("MW_BENCH_ID").map_err(|_| "no MW_BENCH_ID")?.parse().map_err(|e| format!("{e}"))?;
    let m = WorldManager::new();
    let opts = WorldOptions::default().with_transport(args.transport).with_timeout(Duration::from_secs(60));
    let w = m.init_world_with("bench", Rendezvous::Id(id), rank, n, &opts).map_err(|e| e.to_string())?;
    let mut b = Bench { w, m, rank, n, args: args.clone(), rows: Vec::new(), wrong_total: 0 };
    match args.mode {
        Mode::Table => {
            let s = sizes(&args);
            b.table(&s);
        }
        Mode::Smoke => {
            b.args.dtypes = DataType::ALL.to_vec();
            b.args.iters = 2;
            b.args.warmup = 1;
            let s = vec![0usize, 8 * n, 4096 * n, (1 << 20) * n];
            for op in ReduceOp::ALL {
                b.args.redop = op;
                b.args.ops = ALL_OPS.iter().copied().filter(|o| o.reduces() || op == ReduceOp::Sum).collect();
                b.table(&s);
            }
        }
        Mode::Targets => b.targets(),
        Mode::Osu => osu::run(&b),
        Mode::Worlds(n) => worlds::run(&b, n),
        Mode::Elastic => elastic::run(&b),
        #[cfg(feature = "cuda")]
        Mode::Device => b.wrong_total += device::run(&b).map_err(|e| format!("--device: {e}"))?,
        #[cfg(not(feature = "cuda"))]
        Mode::Device => unreachable!("refused by parse"),
    }
    if rank == 0 && args.json {
        println!("[\n{}\n]", b.rows.join(",\n"));
    }
    b.w.barrier().map_err(|e| e.to_string())?;
    Ok(b.wrong_total)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mw-bench: {e}");
            std::process::exit(2);
        }
    };
    // Ranks share GPUs where there are fewer GPUs than ranks: NCCL 2.30 on allows it when asked
    // by its own variable, set here while this process has only its main thread (the ranks it
    // starts inherit it).
    #[cfg(feature = "nccl")]
    if args.backends.contains(&BackendChoice::Nccl)
        && std::env::var_os("NCCL_MULTI_RANK_GPU_ENABLE").is_none()
        && multiworld::nccl::version().is_ok_and(|v| v >= (2, 30, 0))
    {
        std::env::set_var("NCCL_MULTI_RANK_GPU_ENABLE", "1");
    }
    if let Ok(r) = std::env::var("MW_BENCH_RANK") {
        let rank: usize = r.parse().unwrap_or(0);
        match run(rank, args) {
            Ok(_) => return,
            Err(e) => {
                eprintln!("mw-bench rank {rank}: {e}");
                std::process::exit(1);
            }
        }
    }
    // Without a GPU (or NCCL, where asked for) the device rows skip, saying why.
    #[cfg(feature = "cuda")]
    if args.mode == Mode::Device {
        if let Some(why) = device::unavailable(&args.backends) {
            println!("mw-bench --device: skipped: {why}");
            std::process::exit(0);
        }
    }
    // Rank 0: start the other ranks, then run.
    let id = match UniqueId::new_on("127.0.0.1".parse().expect("ip")) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("mw-bench: {e}");
            std::process::exit(1);
        }
    };
    let exe = std::env::current_exe().expect("own executable");
    let mut children: Vec<Child> = (1..args.ranks)
        .map(|r| {
            Command::new(&exe)
                .args(std::env::args().skip(1))
                .env("MW_BENCH_RANK", r.to_string())
                .env("MW_BENCH_ID", id.to_string())
                .spawn()
                .expect("spawning a rank")
        })
        .collect();
    std::env::set_var("MW_BENCH_ID", id.to_string());
    let r = run(0, args.clone());
    let mut failed = children.iter_mut().map(|c| c.wait()).filter(|s| !s.as_ref().is_ok_and(|s| s.success())).count();
    match r {
        Ok(wrong) if wrong > 0 => {
            eprintln!("mw-bench: {wrong} wrong results");
            failed += 1;
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("mw-bench: {e}");
            failed += 1;
        }
    }
    if args.mode == Mode::Smoke && failed == 0 && !args.json {
        println!("# smoke: every operation and type checked, 0 wrong");
    }
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
