//! `--worlds N`: what many idle worlds cost one process. Both ranks form N two-rank worlds
//! with each other (at most 200 formations in flight), then rank 0 reports, against the same
//! process before the worlds existed: the formation rate; threads, descriptors, resident
//! memory and `/dev/shm` per world; the CPU the idle worlds burn; and the 1 MiB all-reduce
//! throughput of one busy world beside the N idle ones against the same world alone just
//! before and just after, in five rounds (the idle worlds removed and formed again between
//! them), its ranks' calling threads pinned to cores 0 and 1.

use std::time::{Duration, Instant};

use multiworld::{Rendezvous, UniqueId, WorldOptions, UNIQUE_ID_BYTES};

use super::Bench;

/// Formations in flight at once.
const IN_FLIGHT: usize = 200;

/// Threads, descriptors and resident bytes of this process, and bytes used in `/dev/shm`.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    threads: usize,
    fds: usize,
    rss: u64,
    shm: u64,
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn footprint() -> Footprint {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: a zeroed statvfs is a valid place for the result; the path is a C string.
    let shm = unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c"/dev/shm".as_ptr(), &mut s) == 0 {
            (s.f_blocks - s.f_bfree) * s.f_frsize
        } else {
            0
        }
    };
    Footprint { threads: count("/proc/self/task"), fds: count("/proc/self/fd"), rss: rss_kib * 1024, shm }
}

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: a zeroed rusage is a valid place for the result.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Median of five short runs of the bench world's 1 MiB all-reduce (GB/s).
fn rate(b: &Bench) -> f64 {
    let mut r: Vec<f64> = (0..5).map(|_| b.all_reduce_rate(&b.w, Duration::from_millis(200))).collect();
    super::median(&mut r)
}

/// Rounds of the busy world's throughput beside the idle worlds.
const ROUNDS: usize = 5;

/// Fresh ids for `n` worlds, made by rank 0 and handed over the bench's own world.
fn fresh_ids(b: &Bench, n: usize) -> Vec<u8> {
    let mut ids = vec![0u8; n * UNIQUE_ID_BYTES];
    if b.rank == 0 {
        for c in ids.chunks_mut(UNIQUE_ID_BYTES) {
            c.copy_from_slice(&UniqueId::new_on("127.0.0.1".parse().expect("ip")).expect("unique id").to_bytes());
        }
    }
    b.w.broadcast_in_place(&mut ids, 0).expect("broadcast");
    ids
}

/// Removes the `n` idle worlds, both sides done with them first (then every world closes
/// gracefully).
fn remove_all(b: &Bench, worlds: Vec<multiworld::World>) {
    b.w.barrier().expect("barrier");
    let n = worlds.len();
    drop(worlds);
    for k in 0..n {
        b.m.remove_world(&name(k)).expect("remove");
    }
    b.w.barrier().expect("barrier");
}

pub(crate) fn run(b: &Bench, n: usize) {
    assert!(b.n == 2, "--worlds needs --ranks 2");
    // The busy world's callers run on cores of their own, as a serving process's would; the
    // progress pool (started with the bench's first world) is left where the system puts it.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    super::osu::pin(b.rank % cores);
    let mut alone = vec![rate(b)];
    b.w.barrier().expect("barrier");
    let before = footprint();
    let ids = fresh_ids(b, n);
    let opts = WorldOptions::default();
    // The most threads the process holds while the formations are in flight.
    let forming = std::sync::atomic::AtomicBool::new(true);
    let peak = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = 0;
            while forming.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(count("/proc/self/task"));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        });
        let r = form_all(b, n, &ids, &opts);
        forming.store(false, std::sync::atomic::Ordering::Relaxed);
        (r, sampler.join().expect("sampler"))
    });
    let ((worlds, formed), peak_threads) = peak;
    b.w.barrier().expect("barrier");
    // Let the new worlds settle before measuring: first heartbeats, and rings back to their
    // small form (two quiet ticks, which an idle world takes at its heartbeats: up to three
    // default intervals).
    std::thread::sleep(Duration::from_millis(4000));
    let idle = footprint();
    let cpu0 = cpu_time();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let idle_cpu = (cpu_time() - cpu0).as_secs_f64() / t.elapsed().as_secs_f64();
    for w in &worlds {
        w.barrier().expect("every idle world still works");
    }
    // The busy world beside the idle ones, then alone once they are removed, in rounds of a
    // few seconds (the idle worlds formed again for each): each round's figure is compared with
    // the alone runs just before and just after it, since the host's speed drifts over seconds.
    b.w.barrier().expect("barrier");
    let mut beside = vec![rate(b)];
    remove_all(b, worlds);
    alone.push(rate(b));
    for _ in 1..ROUNDS {
        let (worlds, _) = form_all(b, n, &fresh_ids(b, n), &opts);
        b.w.barrier().expect("barrier");
        // First heartbeats, as above (rings that never carried traffic are small already).
        std::thread::sleep(Duration::from_millis(1500));
        b.w.barrier().expect("barrier");
        beside.push(rate(b));
        remove_all(b, worlds);
        alone.push(rate(b));
    }
    if b.rank == 0 {
        let per = |a: u64, z: u64| (z.saturating_sub(a)) as f64 / n as f64 / 1024.0;
        println!("# {n} idle two-rank worlds between two processes (rank 0's view)");
        println!(
            "  formed in {:.3} s: {:.0} worlds/s, {IN_FLIGHT} in flight",
            formed.as_secs_f64(),
            n as f64 / formed.as_secs_f64()
        );
        println!("  threads while forming: at most {peak_threads}");
        println!(
            "  threads {} -> {} ({:.2} per world), descriptors {} -> {} ({:.2} per world)",
            before.threads,
            idle.threads,
            (idle.threads as f64 - before.threads as f64) / n as f64,
            before.fds,
            idle.fds,
            (idle.fds as f64 - before.fds as f64) / n as f64
        );
        println!(
            "  per idle world: RSS {:.1} KiB, /dev/shm {:.1} KiB (the pair's segment, counted once)",
            per(before.rss, idle.rss),
            per(before.shm, idle.shm)
        );
        println!("  idle CPU: {:.2} % of a core", idle_cpu * 100.0);
    }
    if b.rank == 0 {
        let mut ratios: Vec<f64> = (0..ROUNDS).map(|k| beside[k] / ((alone[k] + alone[k + 1]) / 2.0)).collect();
        let rounds: Vec<String> =
            (0..ROUNDS).map(|k| format!("{:.2}/({:.2},{:.2})", beside[k], alone[k], alone[k + 1])).collect();
        println!(
            "  1 MiB all_reduce GB/s beside {n} idle worlds / (alone before, after), {ROUNDS} rounds: {}",
            rounds.join(" ")
        );
        let (lo, hi) = ratios.iter().fold((f64::MAX, 0f64), |(l, h), r| (l.min(*r), h.max(*r)));
        println!("  beside / alone: median {:.3} (rounds {lo:.3} to {hi:.3})", super::median(&mut ratios));
    }
}

fn name(k: usize) -> String {
    format!("idle{k}")
}

/// Forms the `n` worlds of `ids` (the ids' bytes, one after the other), `IN_FLIGHT` at a
/// time; the worlds and the time it took.
fn form_all(b: &Bench, n: usize, ids: &[u8], opts: &WorldOptions) -> (Vec<multiworld::World>, Duration) {
    let t = Instant::now();
    let mut worlds = Vec::with_capacity(n);
    for (j, batch) in ids.chunks(IN_FLIGHT * UNIQUE_ID_BYTES).enumerate() {
        let forming: Vec<_> = batch
            .chunks(UNIQUE_ID_BYTES)
            .enumerate()
            .map(|(i, c)| {
                let id = UniqueId::from_bytes(c).expect("id");
                b.m.form(&name(j * IN_FLIGHT + i), Rendezvous::Id(id), b.rank, 2, opts)
            })
            .collect();
        for f in forming {
            worlds.push(f.wait().expect("formation"));
        }
    }
    (worlds, t.elapsed())
}
