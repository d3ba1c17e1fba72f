//! Waiting on several non-blocking requests at once, across real processes: `wait_any`
//! returns the request that completed first (not the first in the vector), and `wait_all`
//! returns every outcome in order, a failed one included.

mod common;

use std::time::{Duration, Instant};

use common::Ctx;
use multiworld::{ErrorKind, Request, WorldManager};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[("any", any)]);
}

/// Rank 0 posts a receive from rank 1 and one from rank 2; rank 2 sends at once, rank 1 only
/// after 300 ms. Then rank 0 posts two receives from rank 1 of which only the first is ever
/// matched, and rank 1 aborts the world.
fn any(ctx: &Ctx) {
    let m = WorldManager::new();
    let w = m.init_world("requests", &ctx.id(), ctx.rank, 3).unwrap();
    match ctx.rank {
        0 => {
            let t = Instant::now();
            let mut reqs = vec![w.recv_async(vec![0u32; 4], 1), w.recv_async(vec![0u32; 4], 2)];
            let (i, got) = Request::wait_any(&mut reqs).unwrap();
            let first = t.elapsed();
            assert_eq!(i, 1, "the receive from rank 2 completed first");
            assert_eq!(got.map_err(|f| f.error).unwrap(), vec![2u32; 4]);
            assert!(first < Duration::from_millis(250), "wait_any waited {first:?} for a message sent at once");
            let (i, got) = Request::wait_any(&mut reqs).unwrap();
            assert_eq!(i, 0);
            assert_eq!(got.map_err(|f| f.error).unwrap(), vec![1u32; 4]);
            assert!(t.elapsed() >= Duration::from_millis(250), "rank 1 sent after 300 ms");
            assert!(Request::wait_any(&mut reqs).is_none());
            println!(
                "wait_any: first after {:.2} ms, second after {:.2} ms",
                first.as_secs_f64() * 1e3,
                t.elapsed().as_secs_f64() * 1e3
            );
            w.barrier().unwrap();
            // wait_all: the first receive is matched, the second never is; rank 1 aborts.
            let reqs = vec![w.recv_async(vec![0u32; 4], 1), w.recv_async(vec![0u32; 4], 1)];
            let out = Request::wait_all(reqs);
            assert_eq!(out.len(), 2);
            assert_eq!(out[0].as_ref().map_err(|f| f.error.clone()).unwrap(), &vec![3u32; 4]);
            let e = &out[1].as_ref().unwrap_err().error;
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
        }
        1 => {
            std::thread::sleep(Duration::from_millis(300));
            w.send(&[1u32; 4], 0).unwrap();
            w.barrier().unwrap();
            w.send(&[3u32; 4], 0).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            w.abort();
        }
        _ => {
            w.send(&[2u32; 4], 0).unwrap();
            w.barrier().unwrap();
            let _ = w.recv(&mut [0u8; 1], 0);
        }
    }
}

#[test]
fn wait_any_returns_the_first_to_complete_and_wait_all_every_outcome() {
    let logs = common::run_ranks("any", 3, &[], Duration::from_secs(60));
    println!("{}", logs[0].lines().find(|l| l.starts_with("wait_any")).unwrap_or(""));
}
