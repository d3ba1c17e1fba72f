//! Open descriptors, in worker processes whose limits the test sets: the first manager raises
//! the soft `RLIMIT_NOFILE` to the hard limit, and a process that still runs out gets an error
//! of kind `System` that names the limit, while the worlds it already has keep working.

mod common;

use std::time::Duration;

use common::Ctx;
use multiworld::{ErrorKind, ReduceOp, Rendezvous, UniqueId, WorldManager, WorldOptions};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[("raise", raise), ("exhaust", exhaust)]);
}

fn limits() -> (u64, u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid place for the result.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    (r.rlim_cur, r.rlim_max)
}

fn set_limits(soft: u64, hard: u64) {
    let r = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: `r` is a valid rlimit; lowering limits needs no privilege.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }, 0, "{}", std::io::Error::last_os_error());
}

fn raise(_ctx: &Ctx) {
    let (_, hard) = limits();
    let hard = hard.min(4096);
    set_limits(256, hard);
    let _m = WorldManager::new();
    assert_eq!(limits().0, hard, "the manager raised the soft limit to the hard one");
    println!("raised: soft limit 256 -> {hard}");
}

fn exhaust(_ctx: &Ctx) {
    set_limits(64, 64);
    // Both ranks of each world live here, under two managers: every world then holds a socket
    // at each end (a world of one rank holds no descriptor at all).
    let (m0, m1) = (WorldManager::new(), WorldManager::new());
    let pair = |name: &str| {
        let id = UniqueId::new()?;
        let f0 = m0.form(name, Rendezvous::Id(id.clone()), 0, 2, &WorldOptions::default());
        let f1 = m1.form(name, Rendezvous::Id(id), 1, 2, &WorldOptions::default());
        Ok::<_, multiworld::Error>((f0.wait()?, f1.wait()?))
    };
    let worlds: Vec<_> = (0..3).map(|i| pair(&format!("w{i}")).unwrap()).collect();
    // Take every descriptor left.
    let mut held = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        held.push(f);
    }
    let e = UniqueId::new().and_then(|id| m0.init_world("one-more", &id, 0, 1)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::System, "{e}");
    let text = e.to_string();
    assert!(text.contains("RLIMIT_NOFILE") && text.contains("64"), "the error names the limit: {text}");
    drop(held);
    // What the process already had still works.
    for (w0, w1) in &worlds {
        std::thread::scope(|s| {
            let other = s.spawn(|| {
                let mut x = [2.5f32; 4];
                w1.all_reduce_in_place(&mut x, ReduceOp::Sum).unwrap();
                x
            });
            let mut x = [1.5f32; 4];
            w0.all_reduce_in_place(&mut x, ReduceOp::Sum).unwrap();
            assert_eq!(x, [4.0f32; 4]);
            assert_eq!(other.join().unwrap(), [4.0f32; 4]);
        });
    }
    // And with descriptors free again, the next world forms.
    pair("after").unwrap();
    println!("exhausted after {} worlds: {text}", worlds.len());
}

#[test]
fn the_first_manager_raises_the_soft_descriptor_limit() {
    let logs = common::run_ranks("raise", 1, &[], Duration::from_secs(30));
    assert!(logs[0].contains("raised"), "{}", logs[0]);
}

#[test]
fn running_out_of_descriptors_is_a_clear_error_that_loses_nothing() {
    let logs = common::run_ranks("exhaust", 1, &[], Duration::from_secs(30));
    println!("{}", logs[0].lines().find(|l| l.starts_with("exhausted")).unwrap_or(""));
}
