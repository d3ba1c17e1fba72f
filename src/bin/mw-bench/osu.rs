//! `--osu`: the shapes of Open MPI's side of the host comparison (`../shared/bench/mpi_bench.c`,
//! OSU-style), measured the same way, printed in the same line format with `mw` for `mpi`, so
//! that `--osu-table` can set the two side by side:
//!
//! - `p2p_lat`: ping-pong between ranks 0 and 1, every round trip timed, one-way = RTT / 2,
//!   median of 20 000 (5 000 at 64 KiB) after 5 000 (1 000) of warm-up.
//! - `p2p_bw`: rank 0 posts a window of sends of one buffer, rank 1 the matching receives into
//!   one buffer, both wait for all, then a 4-byte ack; bytes x window / time; median over
//!   trials. Posted through the C API (a group of `mwSend`/`mwRecv`), the one API that lets
//!   a window of receives share one buffer, as OSU's do.
//! - `allreduce`: f32 sum; per iteration a barrier, then the timed call; max over ranks; median.
//!
//! `MW_OSU_WINDOW=N` replaces the bandwidth rows' windows by N (1: one message in flight at a
//! time, a pipeline stage's pattern), for comparison with the same change to `mpi_bench.c`.
//!
//! Each rank pins itself to the core of its rank number, as `mpirun` binds at `-np 2`.

use std::collections::BTreeMap;
use std::os::raw::{c_int, c_void};
use std::time::Instant;

use multiworld::ffi;
use multiworld::{ReduceOp, World};

use super::{median, Bench};

/// Pins the calling thread (and the threads it starts later) to `core`.
pub(crate) fn pin(core: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity get a valid
    // pointer to it and its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A buffer of `n` elements set to `v` that starts on a page boundary, as `mpi_bench.c`'s
/// (`posix_memalign(4096)`): the alignment of both sides' buffers decides how fast a copy
/// runs, so both benchmarks use the same.
struct PageBuf<T> {
    store: Vec<T>,
    at: usize,
    n: usize,
}

impl<T: Copy> PageBuf<T> {
    fn new(n: usize, v: T) -> PageBuf<T> {
        let per_page = 4096 / std::mem::size_of::<T>();
        let store = vec![v; n + per_page];
        let at = (4096 - store.as_ptr() as usize % 4096) % 4096 / std::mem::size_of::<T>();
        PageBuf { store, at, n }
    }
}

impl<T> std::ops::Deref for PageBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.store[self.at..self.at + self.n]
    }
}

impl<T> std::ops::DerefMut for PageBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.store[self.at..self.at + self.n]
    }
}

fn latency(w: &World, rank: usize, size: usize) -> f64 {
    let (warm, iters) = if size >= 65536 { (1000, 5000) } else { (5000, 20000) };
    let mut buf = PageBuf::new(size, 1u8);
    let mut rt = Vec::with_capacity(iters);
    w.barrier().expect("barrier");
    for i in 0..warm + iters {
        let t = Instant::now();
        if rank == 0 {
            w.send(&buf, 1).expect("send");
            w.recv(&mut buf, 1).expect("recv");
        } else {
            w.recv(&mut buf, 0).expect("recv");
            w.send(&buf, 0).expect("send");
        }
        if i >= warm {
            rt.push(t.elapsed().as_secs_f64() * 0.5e6);
        }
    }
    median(&mut rt)
}

fn check(what: &str, r: ffi::mwResult_t) {
    assert!(r == ffi::mwSuccess, "{what} failed: {r}");
}

/// A C-API communicator beside `w`, for the windowed bandwidth.
fn c_comm(b: &Bench) -> ffi::mwComm_t {
    let mut id = ffi::mwUniqueId { internal: [0; ffi::MW_UNIQUE_ID_BYTES] };
    if b.rank == 0 {
        // SAFETY: `id` is a valid place for the result.
        check("mwGetUniqueId", unsafe { ffi::mwGetUniqueId(&mut id) });
    }
    let mut bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
    b.w.broadcast_in_place(&mut bytes, 0).expect("broadcast");
    for (o, v) in id.internal.iter_mut().zip(bytes) {
        *o = v as _;
    }
    let mut comm: ffi::mwComm_t = std::ptr::null_mut();
    // SAFETY: `comm` is a valid place for the handle; the id was made by mwGetUniqueId.
    check("mwCommInitRank", unsafe { ffi::mwCommInitRank(&mut comm, 2, id, b.rank as c_int) });
    comm
}

fn bandwidth(b: &Bench, comm: ffi::mwComm_t, buf: &mut [u8], size: usize) -> (f64, usize) {
    let win = if size <= 1 << 20 {
        64
    } else if size <= 16 << 20 {
        16
    } else {
        8
    };
    let win = std::env::var("MW_OSU_WINDOW").ok().and_then(|w| w.parse().ok()).filter(|&w| w > 0).unwrap_or(win);
    let warm = if size <= 1 << 20 { 10 } else { 2 };
    let trials = match size {
        s if s <= 65536 => 200,
        s if s <= 1 << 20 => 60,
        s if s <= 16 << 20 => 20,
        _ => 10,
    };
    let p = buf.as_mut_ptr() as *mut c_void;
    let mut ack = [0u8; 4];
    let mut bw = Vec::new();
    b.w.barrier().expect("barrier");
    for t in 0..warm + trials {
        let t0 = Instant::now();
        // SAFETY: every call names `buf` (or `ack`), alive and not otherwise used until the
        // group (or the call) has completed: the communicator is blocking.
        unsafe {
            check("mwGroupStart", ffi::mwGroupStart());
            for _ in 0..win {
                let r = if b.rank == 0 {
                    ffi::mwSend(p, size, ffi::mwUint8, 1, comm, std::ptr::null_mut())
                } else {
                    ffi::mwRecv(p, size, ffi::mwUint8, 0, comm, std::ptr::null_mut())
                };
                check("mwSend/mwRecv", r);
            }
            check("mwGroupEnd", ffi::mwGroupEnd());
            let a = ack.as_mut_ptr() as *mut c_void;
            let r = if b.rank == 0 {
                ffi::mwRecv(a, 4, ffi::mwUint8, 1, comm, std::ptr::null_mut())
            } else {
                ffi::mwSend(a, 4, ffi::mwUint8, 0, comm, std::ptr::null_mut())
            };
            check("ack", r);
        }
        if t >= warm {
            bw.push((size * win) as f64 / t0.elapsed().as_secs_f64() / 1e9);
        }
    }
    (median(&mut bw), win)
}

fn all_reduce(b: &Bench, send: &[f32], recv: &mut [f32]) -> (f64, usize) {
    let n = send.len() * 4;
    let (warm, maxit) = match n {
        s if s <= 4096 => (200, 2000),
        s if s <= 1 << 20 => (20, 200),
        s if s <= 16 << 20 => (3, 30),
        _ => (3, 15),
    };
    for _ in 0..warm {
        b.w.all_reduce(send, recv, ReduceOp::Sum).expect("all_reduce");
    }
    let mut t = Vec::new();
    let mut spent = 0.0;
    while t.len() < maxit {
        b.w.barrier().expect("barrier");
        let t0 = Instant::now();
        b.w.all_reduce(send, recv, ReduceOp::Sum).expect("all_reduce");
        let dt = b.max_over_ranks(t0.elapsed().as_secs_f64());
        t.push(dt);
        spent += dt;
        if t.len() >= 5 && spent > 6.0 {
            break;
        }
    }
    assert!(recv[0] == 2.0 && recv[recv.len() - 1] == 2.0, "all_reduce result wrong: {}", recv[0]);
    let it = t.len();
    (median(&mut t), it)
}

/// Runs the shapes on this rank; rank 0 prints the lines.
pub(crate) fn run(b: &Bench) {
    assert!(b.n == 2, "--osu needs --ranks 2");
    pin(b.rank);
    let out = |line: String| {
        if b.rank == 0 {
            println!("{line}");
        }
    };
    for size in [8usize, 1024, 65536] {
        let us = latency(&b.w, b.rank, size);
        out(format!("mw p2p_lat bytes={size} np=2 us={us:.3}"));
    }
    let comm = c_comm(b);
    let mut buf = PageBuf::new(64 << 20, 1u8);
    for size in [65536usize, 1 << 20, 16 << 20, 64 << 20] {
        let (gbps, win) = bandwidth(b, comm, &mut buf, size);
        out(format!("mw p2p_bw bytes={size} np=2 GBps={gbps:.3} window={win}"));
    }
    // SAFETY: a handle from mwCommInitRank, not used after this.
    check("mwCommDestroy", unsafe { ffi::mwCommDestroy(comm) });
    drop(buf);
    let send = PageBuf::new(16 << 20, 1f32);
    let mut recv = PageBuf::new(16 << 20, 0f32);
    for bytes in [4096usize, 1 << 20, 16 << 20, 64 << 20] {
        let n = bytes / 4;
        let (s, it) = all_reduce(b, &send[..n], &mut recv[..n]);
        let bus = bytes as f64 / s / 1e9;
        out(format!("mw allreduce bytes={bytes} np=2 us={:.2} busbw_GBps={bus:.3} iters={it}", s * 1e6));
    }
}

/// One line of a side-by-side run (`bench/side_by_side.sh`).
struct Line {
    /// `mw`, `mpi-cma`, `mpi-none`, or for a probe `memcpy`.
    who: String,
    metric: String,
    bytes: usize,
    value: f64,
    rep: String,
    /// Probes only: which run they bracket (`mpi`, `mpi-after`, `mw`, `mw-after`).
    side: String,
}

fn parse_line(l: &str) -> Option<Line> {
    let mut it = l.split_whitespace();
    let who = it.next()?;
    let metric = it.next()?;
    let kv: BTreeMap<&str, &str> = it.filter_map(|f| f.split_once('=')).collect();
    let value_key = match metric {
        "p2p_lat" | "allreduce" => "us",
        "p2p_bw" => "GBps",
        "c2c_lat" => "ns",
        _ => return None,
    };
    let who = match (who, kv.get("sc")) {
        ("mpi", Some(sc)) => format!("mpi-{sc}"),
        (w, _) => w.to_string(),
    };
    Some(Line {
        who,
        metric: metric.to_string(),
        bytes: kv.get("bytes").and_then(|b| b.parse().ok()).unwrap_or(0),
        value: kv.get(value_key)?.parse().ok()?,
        rep: kv.get("rep").unwrap_or(&"0").to_string(),
        side: kv.get("side").unwrap_or(&"mpi").to_string(),
    })
}

/// Core-to-core latency above which the two vCPUs are taken to be placed apart (the far
/// plateau: ~170 ns against ~27 ns).
const FAR_NS: f64 = 60.0;

/// `--osu-table FILE`: reads the lines of interleaved runs (`bench/side_by_side.sh`) and prints
/// one table of medians per plateau: Open MPI's better single-copy setting per row, multiworld,
/// the ratio. A run counts on the near plateau when the probes before and after it both read
/// under 60 ns; runs that straddle the two plateaus are left out and counted.
pub(crate) fn table(path: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let lines: Vec<Line> = text.lines().filter_map(parse_line).collect();
    let probe: BTreeMap<(String, String), f64> =
        lines.iter().filter(|l| l.metric == "c2c_lat").map(|l| ((l.rep.clone(), l.side.clone()), l.value)).collect();
    // Each run's plateau from the probes that bracket it: Some(true) near, Some(false) far.
    let plateau = |l: &Line| -> Option<bool> {
        let (before, after) = if l.who == "mw" { ("mw", "mw-after") } else { ("mpi", "mpi-after") };
        let b = probe.get(&(l.rep.clone(), before.to_string()))?;
        let a = probe.get(&(l.rep.clone(), after.to_string())).unwrap_or(b);
        match (*b < FAR_NS, *a < FAR_NS) {
            (true, true) => Some(true),
            (false, false) => Some(false),
            _ => None,
        }
    };
    let probes: Vec<f64> = probe.values().copied().collect();
    if !probes.is_empty() {
        let near = probes.iter().filter(|&&v| v < FAR_NS).count();
        println!(
            "core-to-core probes: {near} of {} near (~27 ns: the vCPUs share a cache), the others far (~170 ns: placed apart)\n",
            probes.len()
        );
    }
    let straddling = lines.iter().filter(|l| l.metric != "c2c_lat" && plateau(l).is_none()).count();
    for (near, title) in [(true, "near plateau"), (false, "far plateau")] {
        let mut by: BTreeMap<(String, usize, String), Vec<f64>> = BTreeMap::new();
        for l in lines.iter().filter(|l| l.metric != "c2c_lat" && plateau(l) == Some(near)) {
            by.entry((l.metric.clone(), l.bytes, l.who.clone())).or_default().push(l.value);
        }
        if !by.keys().any(|k| k.2 == "mw") {
            continue;
        }
        print_table(title, &by);
    }
    if straddling > 0 {
        println!("({straddling} measurements left out: their run straddled the two plateaus)");
    }
    Ok(())
}

fn print_table(title: &str, by: &BTreeMap<(String, usize, String), Vec<f64>>) {
    let med = |k: (String, usize, String)| by.get(&k).map(|v| median(&mut v.clone()));
    let runs = |k: (String, usize, String)| by.get(&k).map_or(0, |v| v.len());
    println!("{title}:\n");
    println!("| metric | Open MPI, best of CMA / copy-in-out | multiworld | ratio (mw / mpi) | runs (mpi, mw) |");
    println!("|---|---|---|---|---|");
    let rows: Vec<(&str, usize)> = [8, 1024, 65536]
        .into_iter()
        .map(|s| ("p2p_lat", s))
        .chain([65536, 1 << 20, 16 << 20, 64 << 20].into_iter().map(|s| ("p2p_bw", s)))
        .chain([4096, 1 << 20, 16 << 20, 64 << 20].into_iter().map(|s| ("allreduce", s)))
        .collect();
    for (metric, bytes) in rows {
        let m = metric.to_string();
        let cma = med((m.clone(), bytes, "mpi-cma".into()));
        let none = med((m.clone(), bytes, "mpi-none".into()));
        let mw = med((m.clone(), bytes, "mw".into()));
        let higher_better = metric == "p2p_bw";
        let best = match (cma, none) {
            (Some(a), Some(b)) if higher_better => Some(a.max(b)),
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mpi_runs = runs((m.clone(), bytes, "mpi-cma".into())).max(runs((m.clone(), bytes, "mpi-none".into())));
        let mw_runs = runs((m.clone(), bytes, "mw".into()));
        let unit = if higher_better { "GB/s" } else { "µs" };
        let size = if bytes >= 1 << 20 {
            format!("{} MiB", bytes >> 20)
        } else if bytes >= 1024 {
            format!("{} KiB", bytes >> 10)
        } else {
            format!("{bytes} B")
        };
        let name = match metric {
            "p2p_lat" => format!("one-way latency {size}"),
            "p2p_bw" => format!("bandwidth {size}"),
            _ => format!("all_reduce {size}"),
        };
        let fmt = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.3} {unit}"));
        let ratio = match (best, mw) {
            (Some(p), Some(w)) if p > 0.0 => format!("{:.2}", w / p),
            _ => "—".into(),
        };
        println!("| {name} | {} | {} | {ratio} | {mpi_runs}, {mw_runs} |", fmt(best), fmt(mw));
    }
    println!();
}
