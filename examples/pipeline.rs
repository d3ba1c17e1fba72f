//! A leader and N workers, one world per leader-worker pair, streaming tensors through.
//!
//! ```text
//! cargo run --release --example pipeline -- [--workers N] [--seconds S] [--tensor-kib K]
//!                                            [--kill-after S] [--replace]
//! ```
//!
//! Each worker is a process of its own. The leader sends a tensor to every worker, the worker
//! transforms it and sends it back, and the leader checks the result; throughput per world is
//! printed every second. With `--kill-after S` the leader kills worker 1 after S seconds: its
//! world breaks (the leader prints how long detection took), the other worlds go on, and with
//! `--replace` a new worker takes over the same world name (a new generation).

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use multiworld::{Event, UniqueId, World, WorldManager, WorldOptions};

struct Args {
    workers: usize,
    seconds: f64,
    tensor: usize,
    kill_after: Option<f64>,
    replace: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args { workers: 3, seconds: 6.0, tensor: 1024 * 1024 / 4, kill_after: None, replace: false };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--workers" => a.workers = val()?.parse().map_err(|e| format!("--workers: {e}"))?,
            "--seconds" => a.seconds = val()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--tensor-kib" => a.tensor = val()?.parse::<usize>().map_err(|e| format!("--tensor-kib: {e}"))? * 1024 / 4,
            "--kill-after" => a.kill_after = Some(val()?.parse().map_err(|e| format!("--kill-after: {e}"))?),
            "--replace" => a.replace = true,
            "--help" | "-h" => {
                println!("usage: pipeline [--workers N] [--seconds S] [--tensor-kib K] [--kill-after S] [--replace]");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown option {k}")),
        }
    }
    if a.workers == 0 || a.tensor == 0 {
        return Err("--workers and --tensor-kib must be positive".into());
    }
    Ok(a)
}

/// What the worker does to a tensor; the leader checks it.
fn transform(x: f32) -> f32 {
    x * 2.0 + 1.0
}

fn worker(name: &str, id: &str) -> multiworld::Result<()> {
    let m = WorldManager::new();
    let id: UniqueId = id.parse()?;
    let w = m.init_world(name, &id, 1, 2)?;
    let mut t: Vec<f32> = Vec::new();
    loop {
        let mut len = [0u64];
        if w.recv(&mut len, 0).is_err() {
            return Ok(()); // the leader closed the world: done
        }
        t.resize(len[0] as usize, 0.0);
        w.recv(&mut t, 0)?;
        for x in t.iter_mut() {
            *x = transform(*x);
        }
        w.send(&t, 0)?;
    }
}

/// Per-world counters shared between the serving thread and the reporter.
struct Stats {
    bytes: AtomicU64,
    broken_at: Mutex<Option<(Instant, String)>>,
    stop: AtomicBool,
}

/// Serves one world until it breaks or the leader stops: send a tensor, get it back, check.
fn serve(w: World, tensor: usize, stats: Arc<Stats>) {
    let mut out: Vec<f32> = (0..tensor).map(|i| (i % 1000) as f32).collect();
    let mut back = vec![0f32; tensor];
    let mut round = 0u64;
    while !stats.stop.load(Ordering::Relaxed) {
        out[0] = round as f32;
        let r = w.send(&[tensor as u64], 1).and_then(|_| w.send(&out, 1)).and_then(|_| w.recv(&mut back, 1));
        if let Err(e) = r {
            *stats.broken_at.lock().unwrap() = Some((Instant::now(), e.to_string()));
            return;
        }
        if back[0] != transform(out[0]) || back[tensor - 1] != transform(out[tensor - 1]) {
            *stats.broken_at.lock().unwrap() = Some((Instant::now(), "wrong result".into()));
            return;
        }
        stats.bytes.fetch_add(2 * 4 * tensor as u64, Ordering::Relaxed);
        round += 1;
    }
}

struct Slot {
    name: String,
    child: Child,
    world: World,
    stats: Arc<Stats>,
    thread: std::thread::JoinHandle<()>,
}

fn start_worker(m: &WorldManager, name: &str, tensor: usize) -> Result<Slot, String> {
    let id = UniqueId::new().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .env("MW_DEMO_WORKER", name)
        .env("MW_DEMO_ID", id.to_string())
        .spawn()
        .map_err(|e| format!("spawning worker: {e}"))?;
    let opts = WorldOptions::default().with_timeout(Duration::from_secs(20));
    let world = m.form(name, id.into(), 0, 2, &opts).wait().map_err(|e| e.to_string())?;
    let stats = Arc::new(Stats { bytes: AtomicU64::new(0), broken_at: Mutex::new(None), stop: AtomicBool::new(false) });
    let (w, s) = (world.clone(), stats.clone());
    let thread = std::thread::spawn(move || serve(w, tensor, s));
    Ok(Slot { name: name.to_owned(), child, world, stats, thread })
}

/// Throughput of one world over phases of the run.
#[derive(Default)]
struct Phases {
    /// (bytes, seconds) before the kill, during the outage, after the replacement.
    parts: [(u64, f64); 3],
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

fn leader(a: Args) -> Result<(), String> {
    let m = WorldManager::new();
    println!(
        "leader: {} workers, one world each, {} KiB tensors, {} s{}",
        a.workers,
        a.tensor * 4 / 1024,
        a.seconds,
        match a.kill_after {
            Some(k) => format!(", killing worker 1 after {k} s{}", if a.replace { " and replacing it" } else { "" }),
            None => String::new(),
        }
    );
    let t_form = Instant::now();
    let mut slots: Vec<Slot> = Vec::new();
    for k in 1..=a.workers {
        slots.push(start_worker(&m, &format!("stage-{k}"), a.tensor)?);
    }
    println!("leader: {} worlds ready in {:.1} ms", a.workers, t_form.elapsed().as_secs_f64() * 1e3);
    let start = Instant::now();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut phases: HashMap<String, Phases> = HashMap::new();
    let mut phase = 0usize;
    let mut killed_at: Option<Instant> = None;
    let mut tick = Instant::now();
    let mut header_printed = false;
    let mut pending_event = None;
    while start.elapsed().as_secs_f64() < a.seconds {
        // Wait for an event (a world broke), at most until the next thing to do.
        pending_event = pending_event.or_else(|| m.next_event(Some(Duration::from_millis(20))));
        // Kill worker 1 when asked.
        if let (Some(k), None) = (a.kill_after, killed_at) {
            if start.elapsed().as_secs_f64() >= k {
                let s = &mut slots[0];
                s.child.kill().map_err(|e| format!("kill: {e}"))?;
                killed_at = Some(Instant::now());
                phase = 1;
                println!("leader: killed the worker of {} (pid {})", s.name, s.child.id());
            }
        }
        // Broken worlds: report detection latency; replace if asked.
        while let Some(ev) = pending_event.take().or_else(|| m.try_next_event()) {
            if let Event::Broken { name, generation, cause } = ev {
                let latency = killed_at.map(|k| k.elapsed().as_secs_f64() * 1e3);
                println!(
                    "leader: world {name} (generation {generation}) broke: {cause}{}",
                    latency.map(|l| format!(" -- detected {l:.2} ms after the kill")).unwrap_or_default()
                );
                if a.replace {
                    let i = slots.iter().position(|s| s.name == name).ok_or("unknown world")?;
                    let old = slots.remove(i);
                    let _ = old.thread.join();
                    let mut child = old.child;
                    let _ = child.wait();
                    m.remove_world(&name).map_err(|e| e.to_string())?;
                    let t = Instant::now();
                    let s = start_worker(&m, &name, a.tensor)?;
                    println!(
                        "leader: {name} replaced by a new worker (pid {}), generation {}, in {:.1} ms",
                        s.child.id(),
                        s.world.generation(),
                        t.elapsed().as_secs_f64() * 1e3
                    );
                    last.insert(name.clone(), 0);
                    slots.insert(i, s);
                    phase = 2;
                }
            }
        }
        if tick.elapsed() >= Duration::from_secs(1) {
            let dt = tick.elapsed().as_secs_f64();
            tick = Instant::now();
            if !header_printed {
                let names: Vec<String> = slots.iter().map(|s| format!("{:>14}", s.name)).collect();
                println!("{:>6} {}   (GB/s through each world)", "time", names.join(""));
                header_printed = true;
            }
            let mut row = format!("{:>5.0}s", start.elapsed().as_secs_f64());
            for s in &slots {
                let b = s.stats.bytes.load(Ordering::Relaxed);
                let prev = last.insert(s.name.clone(), b).unwrap_or(0);
                let delta = b.saturating_sub(prev);
                let p = phases.entry(s.name.clone()).or_default();
                p.parts[phase].0 += delta;
                p.parts[phase].1 += dt;
                let broken = s.stats.broken_at.lock().unwrap().is_some();
                row += &if broken { format!("{:>14}", "broken") } else { format!("{:>14.3}", gbps(delta, dt)) };
            }
            println!("{row}");
        }
    }
    for s in &slots {
        s.stats.stop.store(true, Ordering::Relaxed);
    }
    println!("summary (GB/s per world):");
    let labels = ["before", "during", "after"];
    let used = if killed_at.is_none() {
        1
    } else if a.replace {
        3
    } else {
        2
    };
    println!("{:>10} {}", "world", labels[..used].iter().map(|l| format!("{l:>10}")).collect::<String>());
    let mut names: Vec<&String> = phases.keys().collect();
    names.sort();
    for n in names {
        let p = &phases[n];
        let cols: String = p.parts[..used].iter().map(|(b, t)| format!("{:>10.3}", gbps(*b, *t))).collect();
        println!("{n:>10} {cols}");
    }
    for s in slots {
        let _ = s.thread.join();
        let _ = m.remove_world(&s.name);
        let mut c = s.child;
        let _ = c.wait();
    }
    Ok(())
}

fn main() {
    if let (Ok(name), Ok(id)) = (std::env::var("MW_DEMO_WORKER"), std::env::var("MW_DEMO_ID")) {
        if let Err(e) = worker(&name, &id) {
            eprintln!("worker {name}: {e}");
            std::process::exit(1);
        }
        return;
    }
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pipeline: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = leader(args) {
        eprintln!("pipeline: {e}");
        std::process::exit(1);
    }
}
