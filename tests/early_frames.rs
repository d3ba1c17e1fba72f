//! The cap on early frames held by a whole process (`MW_EARLY_FRAMES_MAX_MB`), across real
//! processes: a world whose receiver is late fills the cap and its link stops being read (its
//! sender waits), another world of the same processes still delivers, and once the late
//! receives are posted every byte arrives as sent.

mod common;

use std::time::Duration;

use common::Ctx;
use multiworld::{TransportChoice, UniqueId, WorldManager, WorldOptions};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[("late", late)]);
}

const MSG: usize = 1 << 20;
const FLOOD: usize = 4;

fn message(k: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) ^ (k * 7919)) as u8).collect()
}

fn late(ctx: &Ctx) {
    // TCP: every frame is read (and kept, if early) as soon as it arrives.
    let opts = WorldOptions::default().with_transport(TransportChoice::Tcp);
    let m = WorldManager::with_defaults(opts);
    let a = m.init_world("flooded", &ctx.id(), ctx.rank, 2).unwrap();
    let mut text = [0u8; 256];
    if ctx.rank == 0 {
        let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap().to_string();
        text[..id.len()].copy_from_slice(id.as_bytes());
        a.send(&text, 1).unwrap();
    } else {
        a.recv(&mut text, 0).unwrap();
    }
    let id: UniqueId = std::str::from_utf8(&text).unwrap().trim_end_matches('\0').parse().unwrap();
    let b = m.init_world("other", &id, ctx.rank, 2).unwrap();
    if ctx.rank == 0 {
        // Four 1 MiB messages on `flooded` that rank 1 receives only later, then one on
        // `other`, which rank 1 takes first.
        let sends: Vec<_> = (0..FLOOD).map(|k| a.send_async(message(k, MSG), 1)).collect();
        b.send(&message(99, 256 << 10), 1).unwrap();
        for s in sends {
            s.wait().unwrap();
        }
    } else {
        std::thread::sleep(Duration::from_millis(300));
        let mut got = vec![0u8; 256 << 10];
        b.recv(&mut got, 0).unwrap();
        assert!(got == message(99, 256 << 10), "the other world's message");
        let paused = a.stats().early_frames_paused;
        assert!(paused > 0, "the flooded world never hit the process's cap: {:?}", a.stats());
        for k in 0..FLOOD {
            let mut got = vec![0u8; MSG];
            a.recv(&mut got, 0).unwrap();
            assert!(got == message(k, MSG), "message {k} of the flooded world");
        }
        println!("late receiver: the flooded world paused its link in {paused} passes; all delivered");
    }
    a.barrier().unwrap();
}

#[test]
fn a_process_caps_its_early_frames_and_loses_nothing() {
    let env = [("MW_EARLY_FRAMES_MAX_MB", "1".to_string())];
    let logs = common::run_ranks("late", 2, &env, Duration::from_secs(60));
    assert!(logs[1].contains("all delivered"), "{}", logs[1]);
}
