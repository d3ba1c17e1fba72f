//! Bad input gets a clear error of the right kind, never a panic or a hang: arguments wrong on
//! one rank (checked before anything is sent), and calls that disagree between ranks
//! (detected on the wire, across real processes).

mod common;

use std::time::Duration;

use common::{spawn, Ctx};
use multiworld::{ErrorKind, ReduceOp, UniqueId, World, WorldManager, WorldOptions};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[("claim", claim), ("disagree", disagree)]);
}

fn kind_of<T: std::fmt::Debug>(r: multiworld::Result<T>) -> ErrorKind {
    r.expect_err("expected an error").kind()
}

/// A world of one rank, formed in this process.
fn solo(m: &WorldManager, name: &str) -> World {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    m.init_world(name, &id, 0, 1).unwrap()
}

#[test]
fn formation_arguments_are_checked_locally() {
    let m = WorldManager::new();
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let e = m.init_world("w", &id, 0, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("1 to 8192 ranks"), "{e}");
    let e = m.init_world("w", &id, 3, 3).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("rank 3 is out of range"), "{e}");
    assert_eq!(kind_of(m.init_world("", &id, 0, 1)), ErrorKind::InvalidArgument);
    assert_eq!(kind_of(m.init_world_at("w", "no-such-host.invalid:1", 0, 2)), ErrorKind::InvalidArgument);
    assert_eq!(kind_of("not an id".parse::<UniqueId>()), ErrorKind::InvalidArgument);
    // A name in use cannot be formed again while its world works.
    let w = solo(&m, "taken");
    assert_eq!(kind_of(m.init_world("taken", &id, 0, 1)), ErrorKind::InvalidUsage);
    drop(w);
}

#[test]
fn operation_arguments_are_checked_locally() {
    let m = WorldManager::new();
    let w = solo(&m, "solo");
    let mut out = vec![0f32; 4];
    let e = w.send(&[1f32; 4], 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("peer rank 1 is out of range") && e.message().contains("'solo'"), "{e}");
    assert_eq!(kind_of(w.recv(&mut out, 7)), ErrorKind::InvalidArgument);
    assert_eq!(kind_of(w.broadcast(Some(&[1f32; 4][..]), &mut out, 1)), ErrorKind::InvalidArgument);
    let e = w.all_reduce(&[1f32; 5], &mut out, ReduceOp::Sum).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("receive buffer of 5 elements, got 4"), "{e}");
    assert_eq!(kind_of(w.broadcast::<f32>(None, &mut out, 0)), ErrorKind::InvalidArgument);
    assert_eq!(kind_of(w.all_gather(&[1f32; 3], &mut out)), ErrorKind::InvalidArgument);
    assert_eq!(kind_of(w.reduce_scatter(&[1f32; 3], &mut out, ReduceOp::Max)), ErrorKind::InvalidArgument);
    assert_eq!(kind_of(w.gather(&[1f32; 3], &mut out, 0)), ErrorKind::InvalidArgument);
    assert_eq!(kind_of(w.scatter(&[1f32; 3], &mut out, 0)), ErrorKind::InvalidArgument);
    assert_eq!(kind_of(w.all_to_all(&[1f32; 3], &mut out)), ErrorKind::InvalidArgument);
    assert_eq!(kind_of(w.reduce(&[1f32; 3], &mut out, ReduceOp::Sum, 2)), ErrorKind::InvalidArgument);
    // None of that broke the world: it still works.
    w.all_reduce(&[2f32; 4], &mut out, ReduceOp::Sum).unwrap();
    assert_eq!(out, vec![2f32; 4]);
    let mut g = w.group();
    assert_eq!(kind_of(g.send(&[1u8; 2], 5)), ErrorKind::InvalidArgument);
    g.end().unwrap();
    // Removed worlds answer InvalidUsage.
    m.remove_world("solo").unwrap();
    assert_eq!(kind_of(w.barrier()), ErrorKind::InvalidUsage);
    assert_eq!(kind_of(m.remove_world("solo")), ErrorKind::InvalidArgument);
}

/// Claims a rank given by the parent (`MW_TEST_ARG`: "rank size"), expecting formation to
/// fail with `MW_TEST_EXPECT` in the message.
fn claim(ctx: &Ctx) {
    let m = WorldManager::new();
    let mut parts = ctx.arg.split_whitespace().map(|x| x.parse::<usize>().unwrap());
    let (rank, size) = (parts.next().unwrap(), parts.next().unwrap());
    let opts = WorldOptions::default().with_timeout(Duration::from_secs(20));
    let e = m.init_world_with("claimed", ctx.id().into(), rank, size, &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidUsage, "{e}");
    let expect = ctx.env("MW_TEST_EXPECT");
    assert!(e.message().contains(&expect), "message '{}' lacks '{expect}'", e.message());
    println!("rank {rank}: formation refused: {e}");
}

fn claims(ranks: &[(usize, usize)], expect: &str) {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let mut procs = Vec::new();
    for (i, (rank, size)) in ranks.iter().enumerate() {
        let env = [
            ("MW_TEST_ID", id.to_string()),
            ("MW_TEST_ARG", format!("{rank} {size}")),
            ("MW_TEST_EXPECT", expect.to_string()),
        ];
        procs.push(spawn("claim", i, ranks.len(), &env, &[]));
        // Let each join in turn, so that the conflicting one is last.
        std::thread::sleep(Duration::from_millis(200));
    }
    common::finish(&mut procs, Duration::from_secs(30));
}

#[test]
fn two_processes_claiming_one_rank_fail_formation_for_all() {
    claims(&[(0, 3), (1, 3), (1, 3)], "two processes claim rank 1");
}

#[test]
fn ranks_that_disagree_on_the_size_fail_formation_for_all() {
    claims(&[(0, 2), (1, 3)], "says the world has 3 ranks");
}

/// Two ranks make calls that disagree, one world per case; each side gets an error naming
/// both calls, and the next call on that world fails as broken.
fn disagree(ctx: &Ctx) {
    let m = WorldManager::new();
    let ids: Vec<UniqueId> = ctx.env("MW_TEST_IDS").split(',').map(|s| s.parse().unwrap()).collect();
    let r = ctx.rank;
    type Case = fn(&World, usize) -> multiworld::Result<()>;
    let cases: [(&str, Case, &str); 5] = [
        ("count", |w, r| w.all_reduce_in_place(&mut vec![1f32; 7 + r], ReduceOp::Sum), "count=7"),
        (
            "type",
            |w, r| {
                if r == 0 {
                    w.all_reduce_in_place(&mut [1f32; 4], ReduceOp::Sum)
                } else {
                    w.all_reduce_in_place(&mut [1i32; 4], ReduceOp::Sum)
                }
            },
            "int32",
        ),
        ("op", |w, r| w.all_reduce_in_place(&mut [1f32; 4], if r == 0 { ReduceOp::Sum } else { ReduceOp::Max }), "max"),
        ("root", |w, r| w.broadcast_in_place(&mut [1u8; 64], r), "root=1"),
        (
            "kind",
            |w, r| {
                if r == 0 {
                    w.all_reduce_in_place(&mut [1f32; 4], ReduceOp::Sum)
                } else {
                    w.all_gather_in_place(&mut [1f32; 4])
                }
            },
            "all_gather",
        ),
    ];
    for (i, (name, case, needle)) in cases.iter().enumerate() {
        let w = m.init_world(name, &ids[i], r, 2).unwrap();
        let e = case(&w, r).expect_err(name);
        assert!(matches!(e.kind(), ErrorKind::InvalidUsage | ErrorKind::WorldBroken), "{name}: {e}");
        assert!(e.message().contains(needle), "{name}: '{}' lacks '{needle}'", e.message());
        assert_eq!(w.barrier().unwrap_err().kind(), ErrorKind::WorldBroken, "{name}");
        m.remove_world(name).unwrap();
        println!("rank {r}, {name}: {e}");
    }
}

#[test]
fn calls_that_disagree_between_ranks_are_reported_on_both() {
    let ids: Vec<String> =
        (0..5).map(|_| UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap().to_string()).collect();
    let env = [("MW_TEST_IDS", ids.join(","))];
    let mut procs: Vec<_> = (0..2).map(|r| spawn("disagree", r, 2, &env, &[])).collect();
    common::finish(&mut procs, Duration::from_secs(60));
}
