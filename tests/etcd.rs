//! Rendezvous through a real etcd server (feature `etcd`), started by each test on free
//! loopback ports with a temporary data directory: worlds form with no root; the process that
//! registered first may leave and the others still form; a same-name replacement and two
//! replacements racing get generations of their own; an unreachable etcd is a clear error in
//! time; a stopped etcd leaves formed worlds running and later formations working again; a
//! killed process's registration expires and its peers' managers see it; `mw-worlds` lists
//! and watches the directory. Without an `etcd` binary each test says so and skips.
#![cfg(feature = "etcd")]

mod common;

use std::time::{Duration, Instant};

use common::etcd::Server;
use common::{finish, spawn, Ctx};
use multiworld::{ErrorKind, Event, ReduceOp, Rendezvous, World, WorldManager, WorldOptions};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[
        ("form", form),
        ("form_then_leave", form_then_leave),
        ("watch_gone", watch_gone),
        ("etcd_stopped", etcd_stopped),
        ("register_and_die", register_and_die),
    ]);
}

/// Every rank contributes `rank + 1`; checks the sum.
fn check_sum(w: &World) {
    let mut v = vec![w.rank() as u64 + 1; 256];
    w.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    let n = w.size() as u64;
    assert!(v.iter().all(|x| *x == n * (n + 1) / 2), "'{}': {}", w.name(), v[0]);
}

/// Forms `MW_TEST_NAME` through `MW_TEST_ETCD` (optionally after `MW_TEST_DELAY_MS`), checks
/// traffic, prints its generation, and (with `MW_TEST_AGAIN`) forms the same name again.
fn form(ctx: &Ctx) {
    std::thread::sleep(Duration::from_millis(ctx.env("MW_TEST_DELAY_MS").parse().unwrap_or(0)));
    let m = WorldManager::new();
    let (url, name) = (ctx.env("MW_TEST_ETCD"), ctx.env("MW_TEST_NAME"));
    let w = m.init_world_at(&name, &url, ctx.rank, ctx.size).unwrap_or_else(|e| panic!("rank {}: {e}", ctx.rank));
    for _ in 0..50 {
        check_sum(&w);
    }
    println!("formed '{name}' generation {}", w.generation());
    w.barrier().unwrap();
    if ctx.env("MW_TEST_AGAIN") == "1" {
        m.remove_world(&name).unwrap();
        let again = m.init_world_at(&name, &url, ctx.rank, ctx.size).unwrap();
        assert!(again.generation() > w.generation(), "{} then {}", w.generation(), again.generation());
        check_sum(&again);
        println!("formed '{name}' again generation {}", again.generation());
        again.barrier().unwrap();
    }
}

/// Forms `w` of three ranks; rank 0 (which registers first: the others wait) exits at once;
/// ranks 1 and 2 then form `pair` through etcd without it.
fn form_then_leave(ctx: &Ctx) {
    if ctx.rank > 0 {
        std::thread::sleep(Duration::from_millis(300));
    }
    let m = WorldManager::new();
    let url = ctx.env("MW_TEST_ETCD");
    let w = m.init_world_at("w", &url, ctx.rank, 3).unwrap();
    check_sum(&w);
    if ctx.rank == 0 {
        std::process::exit(0);
    }
    let p = m.init_world_at("pair", &url, ctx.rank - 1, 2).unwrap();
    for _ in 0..20 {
        check_sum(&p);
    }
    p.barrier().unwrap();
}

/// Forms `w` of three ranks with a 2 s lease; the last rank waits to be killed, the others
/// wait for the manager's `MemberGone` for it.
fn watch_gone(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = m.init_world_at("w", &ctx.env("MW_TEST_ETCD"), ctx.rank, ctx.size).unwrap();
    check_sum(&w);
    println!("rank {} formed", ctx.rank);
    if ctx.rank == ctx.size - 1 {
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let t = Instant::now();
    let end = t + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match m.next_event(Some(left)) {
            Some(Event::MemberGone { name, rank, .. }) if name == "w" && rank == ctx.size - 1 => break,
            Some(e) => seen.push(e),
            None => panic!("rank {}: no MemberGone for rank {}; saw {seen:?}", ctx.rank, ctx.size - 1),
        }
    }
    println!("rank {} saw the member gone {:?} after the kill signal file", ctx.rank, t.elapsed());
}

fn env(url: &str, name: &str) -> Vec<(&'static str, String)> {
    vec![("MW_TEST_ETCD", url.to_owned()), ("MW_TEST_NAME", name.to_owned()), ("MW_ETCD_TTL", "2".to_owned())]
}

fn generations(logs: &[String]) -> Vec<u32> {
    logs.iter()
        .flat_map(|l| l.lines())
        .filter_map(|l| l.strip_prefix("formed '"))
        .filter(|l| !l.contains(" again "))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn three_ranks_form_with_no_root_and_a_replacement_gets_a_higher_generation() {
    let Some(etcd) = Server::start("three_ranks_form_with_no_root_and_a_replacement_gets_a_higher_generation") else {
        return;
    };
    let url = etcd.url("t1");
    let mut e = env(&url, "w");
    e.push(("MW_TEST_AGAIN", "1".into()));
    let mut procs: Vec<_> = (0..3).map(|r| spawn("form", r, 3, &e, &[])).collect();
    let logs = finish(&mut procs, Duration::from_secs(60));
    let first = generations(&logs);
    assert_eq!(first.len(), 3, "{logs:?}");
    assert!(first.iter().all(|g| *g == first[0]));
    // Fresh processes that never saw the earlier ones: a higher generation still.
    let mut procs: Vec<_> = (0..3).map(|r| spawn("form", r, 3, &env(&url, "w"), &[])).collect();
    let later = generations(&finish(&mut procs, Duration::from_secs(60)));
    assert!(later.iter().all(|g| *g > first[0] + 1), "first {first:?}, the replacement and then {later:?}");
}

#[test]
fn the_first_registrant_leaves_and_the_others_still_form() {
    let Some(etcd) = Server::start("the_first_registrant_leaves_and_the_others_still_form") else { return };
    let e = env(&etcd.url("t2"), "w");
    let mut procs: Vec<_> = (0..3).map(|r| spawn("form_then_leave", r, 3, &e, &[])).collect();
    finish(&mut procs, Duration::from_secs(60));
}

#[test]
fn two_replacements_racing_under_one_name_get_two_generations() {
    let Some(etcd) = Server::start("two_replacements_racing_under_one_name_get_two_generations") else { return };
    let e = env(&etcd.url("t3"), "race");
    // Two sets of two ranks, all at once.
    let mut procs: Vec<_> = (0..4).map(|i| spawn("form", i % 2, 2, &e, &[])).collect();
    let gens = generations(&finish(&mut procs, Duration::from_secs(60)));
    let mut distinct = gens.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 2, "generations {gens:?}");
    for g in &distinct {
        assert_eq!(gens.iter().filter(|x| *x == g).count(), 2, "generations {gens:?}");
    }
}

#[test]
fn an_unreachable_etcd_is_a_clear_error_within_the_deadline() {
    let port = common::free_port();
    let m = WorldManager::new();
    let opts = WorldOptions::default().with_timeout(Duration::from_secs(1));
    let url = format!("etcd://127.0.0.1:{port}/p");
    let t = Instant::now();
    let e = m.init_world_with("w", Rendezvous::Address(url), 0, 2, &opts).unwrap_err();
    let took = t.elapsed();
    assert!(matches!(e.kind(), ErrorKind::Timeout | ErrorKind::System), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // Nothing is left reserved.
    assert!(m.world("w").is_none());
    let bad = m.init_world_at("w", "etcd://", 0, 2).unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidArgument, "{bad}");
}

#[test]
fn worlds_run_while_etcd_is_stopped_and_formations_work_again_after() {
    let Some(etcd) = Server::start("worlds_run_while_etcd_is_stopped_and_formations_work_again_after") else {
        return;
    };
    let mut e = env(&etcd.url("t4"), "w");
    e.push(("MW_TEST_ETCD_PID", etcd.pid().to_string()));
    e.push(("MW_TEST_ETCD_PORT", etcd.port.to_string()));
    e.push(("MW_LOG", "info".into()));
    let mut procs = vec![spawn("etcd_stopped", 0, 1, &e, &[])];
    for l in finish(&mut procs, Duration::from_secs(60)) {
        for line in l.lines().filter(|l| l.contains("lease") || l.contains("rounds")) {
            println!("{line}");
        }
    }
}

/// Two managers in this process form a world through etcd (lease of 2 s); etcd is stopped
/// for longer than the lease: the world keeps moving, a formation fails at its deadline naming
/// the endpoint; once etcd runs again (the lease expired meanwhile), formations work again.
fn etcd_stopped(ctx: &Ctx) {
    let (url, pid, port) = (ctx.env("MW_TEST_ETCD"), ctx.env("MW_TEST_ETCD_PID"), ctx.env("MW_TEST_ETCD_PORT"));
    let signal = |sig| {
        // SAFETY: kill(2) on the test's etcd server.
        unsafe { libc::kill(pid.parse().unwrap(), sig) };
    };
    let (m0, m1) = (WorldManager::new(), WorldManager::new());
    let opts = WorldOptions::default().with_timeout(Duration::from_secs(2));
    let pair = |name: &str| {
        std::thread::scope(|s| {
            let a = s.spawn(|| m0.init_world_with(name, Rendezvous::Address(url.clone()), 0, 2, &opts));
            let b = s.spawn(|| m1.init_world_with(name, Rendezvous::Address(url.clone()), 1, 2, &opts));
            (a.join().unwrap(), b.join().unwrap())
        })
    };
    let both = |a: &World, b: &World| {
        std::thread::scope(|s| {
            s.spawn(|| check_sum(a));
            s.spawn(|| check_sum(b));
        })
    };
    let (a, b) = pair("w");
    let (a, b) = (a.unwrap(), b.unwrap());
    signal(libc::SIGSTOP);
    // Longer than the lease's TTL: the world keeps moving.
    let end = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    while Instant::now() < end {
        both(&a, &b);
        rounds += 1;
    }
    assert!(rounds > 100, "only {rounds} rounds while etcd was stopped");
    // A formation now fails at its deadline, saying why.
    let t = Instant::now();
    let e = m0.init_world_with("x", Rendezvous::Address(url.clone()), 0, 2, &opts).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(matches!(e.kind(), ErrorKind::Timeout | ErrorKind::System), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    signal(libc::SIGCONT);
    // The lease expired meanwhile: a new one is taken and formations work again.
    std::thread::sleep(Duration::from_secs(3));
    let (c, d) = pair("y");
    let (c, d) = (c.unwrap_or_else(|e| panic!("{e}")), d.unwrap_or_else(|e| panic!("{e}")));
    both(&c, &d);
    both(&a, &b);
    println!("{rounds} rounds while etcd was stopped; formed again after");
}

#[test]
fn a_killed_process_registration_expires_and_its_peers_see_it() {
    let Some(etcd) = Server::start("a_killed_process_registration_expires_and_its_peers_see_it") else { return };
    let e = env(&etcd.url("t5"), "w");
    let mut procs: Vec<_> = (0..3).map(|r| spawn("watch_gone", r, 3, &e, &[])).collect();
    let mut victim = procs.pop().unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while !victim.log_text().contains("formed") {
        assert!(Instant::now() < end, "the victim did not form: {}", victim.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    victim.signal(libc::SIGKILL);
    let _ = victim.wait_for(Duration::from_secs(10));
    for l in finish(&mut procs, Duration::from_secs(60)) {
        if let Some(line) = l.lines().find(|l| l.contains("saw the member gone")) {
            println!("{line}");
        }
    }
}

#[test]
fn mw_worlds_lists_and_watches_the_directory() {
    let Some(etcd) = Server::start("mw_worlds_lists_and_watches_the_directory") else { return };
    let url = etcd.url("t6");
    let bin = env!("CARGO_BIN_EXE_mw-worlds");
    let out = std::process::Command::new(bin).args(["--etcd", &url]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("(no worlds)"));
    // A watcher, then a world of two ranks in this process.
    let mut watcher = std::process::Command::new(bin)
        .args(["--etcd", &url, "--watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (m0, m1) = (WorldManager::new(), WorldManager::new());
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| m0.init_world_at("serve/tp0", &url, 0, 2).unwrap());
        let b = s.spawn(|| m1.init_world_at("serve/tp0", &url, 1, 2).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    let out = std::process::Command::new(bin).args(["--etcd", &url]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.starts_with("serve/tp0")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("formed") && line.contains(&format!(" {} ", a.generation())), "{line}");
    assert!(line.contains(&format!(":{}:", std::process::id())), "{line}");
    // The watcher printed the directory again once the world was there.
    let mut stdout = watcher.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end && !seen.lines().any(|l| l.starts_with("serve/tp0") && l.contains("formed")) {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        seen
    });
    let seen = reader.join().unwrap();
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert!(seen.lines().any(|l| l.starts_with("serve/tp0") && l.contains("formed")), "{seen}");
    drop((a, b));
}

#[test]
fn the_c_api_forms_through_etcd() {
    use multiworld::ffi::*;
    use std::ffi::{c_void, CString};
    let Some(etcd) = Server::start("the_c_api_forms_through_etcd") else { return };
    let url = CString::new(etcd.url("t7")).unwrap();
    let name = CString::new("c-world").unwrap();
    let sums: Vec<f32> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|rank| {
                let (url, name) = (&url, &name);
                s.spawn(move || {
                    let mut comm: mwComm_t = std::ptr::null_mut();
                    // SAFETY: valid out-pointer and NUL-terminated strings; NULL config.
                    let r =
                        unsafe { mwCommInitAt(&mut comm, name.as_ptr(), url.as_ptr(), 2, rank, std::ptr::null_mut()) };
                    assert_eq!(r, mwSuccess, "rank {rank}");
                    let send = [rank as f32 + 1.0; 16];
                    let mut recv = [0f32; 16];
                    // SAFETY: host buffers of 16 floats each; no stream.
                    let r = unsafe {
                        mwAllReduce(
                            send.as_ptr() as *const c_void,
                            recv.as_mut_ptr() as *mut c_void,
                            16,
                            mwFloat,
                            mwSum,
                            comm,
                            std::ptr::null_mut(),
                        )
                    };
                    assert_eq!(r, mwSuccess);
                    // SAFETY: a communicator made above.
                    assert_eq!(unsafe { mwCommDestroy(comm) }, mwSuccess);
                    recv[0]
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(sums, [3.0, 3.0]);
}

/// Two ranks of a 3-rank world `w` register (two managers in this process), then the process
/// is killed before the third comes: their registrations wait out the lease.
/// Registers the ranks `MW_TEST_DEAD_RANKS` (comma-separated) of a 3-rank world 'w' (each
/// with a manager of its own), waits until the directory shows them, and kills this process.
fn register_and_die(ctx: &Ctx) {
    let url = ctx.env("MW_TEST_ETCD");
    let ranks: Vec<usize> = ctx.env("MW_TEST_DEAD_RANKS").split(',').map(|r| r.parse().unwrap()).collect();
    let n = ranks.len();
    for r in ranks {
        let url = url.clone();
        std::thread::spawn(move || {
            let m = WorldManager::new();
            let _ = m.init_world_at("w", &url, r, 3);
            std::thread::sleep(Duration::from_secs(600));
        });
    }
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let worlds = multiworld::etcd::list(&url, Duration::from_secs(2)).unwrap();
        if worlds.iter().any(|w| w.name == "w" && w.members.len() == n) {
            break;
        }
        assert!(Instant::now() < end, "the ranks did not register: {worlds:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("registered");
    // SAFETY: kill(2) on this very process.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
}

/// A process registers `dead` ranks of a 3-rank world 'w' and is killed; its lease outlives
/// the test, so its registrations stay. A fresh set of three ranks must still form, well
/// within its formation deadline (30 s): the ranks that meet the dead ones in a generation
/// find them gone (as connectors, refused; as acceptors, by looking at their listeners) and
/// form again in a later one.
fn fresh_ranks_form_past_a_dead_process(test: &str, dead: &str) {
    let Some(etcd) = Server::start(test) else { return };
    let e = env(&etcd.url("t8"), "w");
    let mut d = e.clone();
    d.extend([("MW_TEST_DEAD_RANKS", dead.to_owned()), ("MW_ETCD_TTL", "120".to_owned())]);
    let mut killed = spawn("register_and_die", 0, 1, &d, &[]);
    let status = killed.wait_for(Duration::from_secs(60)).expect("the process ends");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "{}", killed.log_text());
    let t = Instant::now();
    let mut procs: Vec<_> = (0..3).map(|r| spawn("form", r, 3, &e, &[])).collect();
    let gens = generations(&finish(&mut procs, Duration::from_secs(60)));
    let took = t.elapsed();
    assert_eq!(gens.len(), 3);
    assert!(gens.iter().all(|g| *g == gens[0] && *g > 1), "{gens:?}");
    // Far below the formation deadline, even on a loaded machine.
    assert!(took < Duration::from_secs(20), "the fresh ranks took {took:?}");
}

#[test]
fn ranks_left_registered_by_a_dead_process_do_not_keep_a_world_from_forming() {
    fresh_ranks_form_past_a_dead_process(
        "ranks_left_registered_by_a_dead_process_do_not_keep_a_world_from_forming",
        "0,1",
    );
}

#[test]
fn a_dead_process_registered_as_the_highest_rank_does_not_keep_a_world_from_forming() {
    fresh_ranks_form_past_a_dead_process(
        "a_dead_process_registered_as_the_highest_rank_does_not_keep_a_world_from_forming",
        "2",
    );
}

#[test]
fn a_stopped_first_endpoint_does_not_take_the_deadline() {
    let Some(etcd) = Server::start("a_stopped_first_endpoint_does_not_take_the_deadline") else { return };
    // An endpoint that accepts connections and never answers, listed first.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("etcd://{},127.0.0.1:{}/t9", hung.local_addr().unwrap(), etcd.port);
    let m = WorldManager::new();
    let opts = WorldOptions::default().with_timeout(Duration::from_secs(10));
    let t = Instant::now();
    let w = m.init_world_with("solo", Rendezvous::Address(url), 0, 1, &opts).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(w.size(), 1);
}

#[test]
fn a_rank_waiting_in_a_generation_that_another_size_overtook_forms_in_a_later_one() {
    let Some(etcd) = Server::start("a_rank_waiting_in_a_generation_that_another_size_overtook_forms_in_a_later_one")
    else {
        return;
    };
    let url = etcd.url("t10");
    let opts = WorldOptions::default().with_timeout(Duration::from_secs(20));
    let managers: Vec<WorldManager> = (0..5).map(|_| WorldManager::new()).collect();
    std::thread::scope(|s| {
        // Rank 0 of a 2-rank world registers first and waits.
        let a0 = s.spawn(|| managers[0].init_world_with("w", Rendezvous::Address(url.clone()), 0, 2, &opts));
        std::thread::sleep(Duration::from_millis(500));
        // A 3-rank world of the same name forms and seals a later generation.
        let three: Vec<_> = (0..3)
            .map(|r| {
                let (m, url, opts) = (&managers[1 + r], url.clone(), &opts);
                s.spawn(move || m.init_world_with("w", Rendezvous::Address(url), r, 3, opts))
            })
            .collect();
        for t in three {
            t.join().unwrap().unwrap();
        }
        // Then rank 1 of the 2-rank world: both form, in a generation after the sealed one.
        let b1 = managers[4].init_world_with("w", Rendezvous::Address(url.clone()), 1, 2, &opts).unwrap();
        let b0 = a0.join().unwrap().unwrap();
        assert_eq!(b0.generation(), b1.generation());
        assert!(b0.generation() > 2, "{}", b0.generation());
    });
}
