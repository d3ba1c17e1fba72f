//! The point-to-point path: a ping-pong between two ranks in two threads of this process, over
//! shared memory and over TCP loopback, for small and large messages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use multiworld::{Rendezvous, TransportChoice, UniqueId, WorldManager, WorldOptions};

fn ping_pong(c: &mut Criterion) {
    let mut g = c.benchmark_group("ping_pong");
    g.measurement_time(Duration::from_secs(3));
    for (label, transport) in [("shm", TransportChoice::Auto), ("tcp", TransportChoice::Tcp)] {
        let opts = WorldOptions::default().with_transport(transport);
        let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sizes = [8usize, 64 << 10, 1 << 20];
        // Rank 1 echoes every message until told to stop (a one-byte message).
        let echo = {
            let (id, opts, stop) = (id.clone(), opts.clone(), stop.clone());
            std::thread::spawn(move || {
                let m = WorldManager::new();
                let w = m.init_world_with("bench", Rendezvous::Id(id), 1, 2, &opts).unwrap();
                let mut len = [0u64];
                while !stop.load(Ordering::Relaxed) {
                    w.recv(&mut len, 0).unwrap();
                    if len[0] == 0 {
                        break;
                    }
                    let mut buf = vec![0u8; len[0] as usize];
                    w.recv(&mut buf, 0).unwrap();
                    w.send(&buf, 0).unwrap();
                }
            })
        };
        let m = WorldManager::new();
        let w = m.init_world_with("bench", Rendezvous::Id(id), 0, 2, &opts).unwrap();
        for size in sizes {
            let out = vec![1u8; size];
            let mut back = vec![0u8; size];
            g.throughput(Throughput::Bytes(2 * size as u64));
            g.bench_with_input(BenchmarkId::new(label, size), &size, |b, _| {
                b.iter(|| {
                    w.send(&[size as u64], 1).unwrap();
                    w.send(&out, 1).unwrap();
                    w.recv(&mut back, 1).unwrap();
                })
            });
        }
        stop.store(true, Ordering::Relaxed);
        w.send(&[0u64], 1).unwrap();
        echo.join().unwrap();
    }
    g.finish();
}

criterion_group!(benches, ping_pong);
criterion_main!(benches);
