//! `--elastic`: how long worlds made from a world take (`World::dup`, `split`, `shrink`,
//! `grow`), against a fresh formation through a `UniqueId` between the same processes in the
//! same run. Every figure is the median over repetitions of the slowest rank's time; each
//! new world runs one all-reduce before it is removed, so that it is known to work.
//!
//! - `dup`: every rank; `split`: two colours by parity (a world of 2 or more);
//! - `shrink`: every rank but the last shrinks without it (a live rank, which waits), then the
//!   first all-reduce on the new world (`first op`): after a failure this is what the
//!   survivors pay once they have noticed it;
//! - `grow` (4 ranks or more): the first half splits off, then grows back to all ranks with
//!   the second half joining as newcomers through `init_world`; both sides' times.

use std::time::Instant;

use multiworld::{ReduceOp, UniqueId, World, UNIQUE_ID_BYTES};

use super::{median, Bench};

const REPEATS: usize = 200;

fn check(w: &World) {
    let mut v = [1u32];
    w.all_reduce_in_place(&mut v, ReduceOp::Sum).expect("all_reduce on the new world");
    assert_eq!(v[0] as usize, w.size(), "all_reduce on '{}'", w.name());
}

impl Bench {
    /// Median over `REPEATS` of the slowest rank's time for `f` (`None`: this rank sat out).
    fn timed(&self, mut f: impl FnMut(usize) -> Option<f64>) -> f64 {
        let mut v: Vec<f64> = (0..REPEATS)
            .map(|i| {
                let t = f(i).unwrap_or(0.0);
                self.w.barrier().expect("barrier");
                self.max_over_ranks(t)
            })
            .collect();
        median(&mut v)
    }

    fn fresh_id(&self) -> UniqueId {
        let mut idb = [0u8; UNIQUE_ID_BYTES];
        if self.rank == 0 {
            idb = UniqueId::new_on("127.0.0.1".parse().expect("ip")).expect("id").to_bytes();
        }
        self.w.broadcast_in_place(&mut idb, 0).expect("broadcast");
        UniqueId::from_bytes(&idb).expect("id")
    }
}

pub(crate) fn run(b: &Bench) {
    let (w, m, n, rank) = (&b.w, &b.m, b.n, b.rank);
    let done = |name: &str, nw: World| {
        check(&nw);
        m.remove_world(name).expect("remove");
    };
    // Median time of `make(name)` (the ranks' id exchange, if any, done before the clock).
    let made = |what: &str, make: &dyn Fn(&str) -> World| {
        b.timed(|i| {
            let name = format!("{what}{i}");
            let t = Instant::now();
            let nw = make(&name);
            let dt = t.elapsed().as_secs_f64();
            done(&name, nw);
            Some(dt)
        })
    };
    let fresh = b.timed(|i| {
        let id = b.fresh_id();
        let name = format!("fresh{i}");
        let t = Instant::now();
        let nw = m.init_world(&name, &id, rank, n).expect("fresh world");
        let dt = t.elapsed().as_secs_f64();
        done(&name, nw);
        Some(dt)
    });
    let dup = made("dup", &|name| w.dup(name).expect("dup"));
    let split =
        made("split", &|name| w.split(name, Some((rank % 2) as u32), rank as u32).expect("split").expect("a colour"));
    let (mut shrink, mut first) = (vec![], vec![]);
    for i in 0..REPEATS {
        let name = format!("shrink{i}");
        let (mut s, mut f) = (0.0, 0.0);
        if rank != n - 1 {
            let t = Instant::now();
            let nw = w.shrink(&name, &[n - 1]).expect("shrink");
            s = t.elapsed().as_secs_f64();
            check(&nw);
            f = t.elapsed().as_secs_f64();
            m.remove_world(&name).expect("remove");
        }
        w.barrier().expect("barrier");
        shrink.push(b.max_over_ranks(s));
        first.push(b.max_over_ranks(f));
    }
    let (shrink, first) = (median(&mut shrink), median(&mut first));
    let grow = (n >= 4).then(|| {
        let half = n / 2;
        let (mut member, mut newcomer) = (vec![], vec![]);
        for i in 0..REPEATS / 4 {
            let id = b.fresh_id();
            let (name, part) = (format!("grow{i}"), format!("part{i}"));
            let sub = w.split(&part, (rank < half).then_some(0), 0).expect("split");
            let t = Instant::now();
            let g = match &sub {
                Some(s) => s.grow(&name, &id, n).expect("grow"),
                None => m.init_world(&name, &id, rank, n).expect("newcomer"),
            };
            let dt = t.elapsed().as_secs_f64();
            done(&name, g);
            if sub.is_some() {
                m.remove_world(&part).expect("remove");
            }
            w.barrier().expect("barrier");
            member.push(b.max_over_ranks(if rank < half { dt } else { 0.0 }));
            newcomer.push(b.max_over_ranks(if rank < half { 0.0 } else { dt }));
        }
        (median(&mut member), median(&mut newcomer))
    });
    if rank == 0 {
        let us = |s: f64| s * 1e6;
        println!("# elastic worlds, {n} ranks on one host: median of the slowest rank, {REPEATS} runs");
        println!("#  {:<44} {:>12} {:>18}", "call", "time (us)", "/ fresh formation");
        let row = |what: &str, s: f64| println!("   {what:<44} {:>12.1} {:>18.3}", us(s), s / fresh);
        row(&format!("fresh formation (UniqueId), {n} ranks"), fresh);
        row(&format!("dup, {n} ranks"), dup);
        row(&format!("split by parity, {n} ranks"), split);
        row(&format!("shrink without a live rank, {} ranks", n - 1), shrink);
        row("  shrink and its first all_reduce", first);
        if let Some((member, newcomer)) = grow {
            row(&format!("grow {} -> {n}: members", n / 2), member);
            row(&format!("grow {} -> {n}: newcomers (init_world)", n / 2), newcomer);
        }
    }
}
