//! Elastic worlds across real processes: split (by parity with reversed keys, and with a
//! colour of `None`), dup, shrink after a peer was SIGKILLed and shrink excluding a live rank,
//! grow from 2 to 4 ranks with two new processes, and every kind of disagreement. Traffic runs
//! on the new worlds and on their parent at once, and every result is checked against a value
//! computed here from the ranks' contributions. Worlds made by `dup` and `split` form on lanes
//! of their parent's shared-memory segments (and, with `MW_LANES=0`, on links of their own):
//! a peer killed under worlds that share its segments, a break of a parent or of a child, and
//! lanes used up, released and claimed again. Over TCP (`MW_TRANSPORT=tcp`) the same roles
//! run on channels of their parent's sockets: no new connection, the same fault isolation, and
//! a world that stops reading does not hold up its sibling on the same socket.

mod common;

use std::time::{Duration, Instant};

use common::{finish, spawn, Ctx};
use multiworld::{ErrorKind, Event, ReduceOp, TransportKind, UniqueId, World, WorldManager, WorldState};

#[test]
#[ignore = "worker process entry, run by the other tests"]
fn worker() {
    common::worker_main(&[
        ("split", split),
        ("dup", dup),
        ("shrink_after_kill", shrink_after_kill),
        ("shrink_live", shrink_live),
        ("shrink_without_free_lanes", shrink_without_free_lanes),
        ("kept_until_removed", kept_until_removed),
        ("grow_member", grow_member),
        ("grow_newcomer", grow_newcomer),
        ("disagree", disagree),
        ("lanes_kill", lanes_kill),
        ("lanes_reuse", lanes_reuse),
        ("c_split_nonblocking", c_split_nonblocking),
        ("c_split_tcp", c_split_tcp),
        ("stalled_sibling", stalled_sibling),
        ("rest_aside", rest_aside),
        ("idle_end", idle_end),
        ("idle_removed", idle_removed),
    ]);
}

/// A C communicator of the test's world, formed through its id.
fn c_comm(ctx: &Ctx) -> multiworld::ffi::mwComm_t {
    use multiworld::ffi::*;
    let mut id = mwUniqueId { internal: [0; MW_UNIQUE_ID_BYTES] };
    for (d, b) in id.internal.iter_mut().zip(ctx.id().to_bytes()) {
        *d = b as std::ffi::c_char;
    }
    let mut comm: mwComm_t = std::ptr::null_mut();
    // SAFETY: a valid out-pointer.
    assert_eq!(unsafe { mwCommInitRank(&mut comm, ctx.size as i32, id, ctx.rank as i32) }, mwSuccess);
    comm
}

/// Waits (at most 20 s) until a non-blocking C communicator has nothing in progress; its state.
fn c_settle(comm: multiworld::ffi::mwComm_t) -> multiworld::ffi::mwResult_t {
    use multiworld::ffi::*;
    let mut st = mwInProgress;
    let end = Instant::now() + Duration::from_secs(20);
    while st == mwInProgress && Instant::now() < end {
        // SAFETY: a communicator of the caller's, a valid out-pointer.
        unsafe { mwCommGetAsyncError(comm, &mut st) };
        std::thread::sleep(Duration::from_millis(1));
    }
    st
}

/// All-reduces one int on a C communicator (waiting for a non-blocking one); the sum.
fn c_sum(comm: multiworld::ffi::mwComm_t, v: i32) -> i32 {
    use multiworld::ffi::*;
    let (send, mut recv) = (v, 0i32);
    // SAFETY: one int each way, host memory, no stream.
    let r = unsafe {
        mwAllReduce(
            (&send as *const i32).cast(),
            (&mut recv as *mut i32).cast(),
            1,
            mwInt,
            mwSum,
            comm,
            std::ptr::null_mut(),
        )
    };
    let r = if r == mwInProgress { c_settle(comm) } else { r };
    // SAFETY: the communicator's last error, a NUL-terminated string it keeps.
    assert_eq!(r, mwSuccess, "{}", unsafe { std::ffi::CStr::from_ptr(mwGetLastError(comm)) }.to_string_lossy());
    recv
}

/// A non-blocking C split finishes on another thread: whatever it does over the parent must
/// not come between the caller's own later calls on the parent. The last rank takes no colour
/// (its split returns at once) and all-reduces on the parent right away; the others come 50
/// ms later.
fn c_split_nonblocking(ctx: &Ctx) {
    use multiworld::ffi::*;
    let comm = c_comm(ctx);
    // SAFETY: zeroed config filled by mwConfigInit; valid out-pointers; communicators made here.
    unsafe {
        let mut cfg: mwConfig_t = std::mem::zeroed();
        assert_eq!(mwConfigInit(&mut cfg), mwSuccess);
        cfg.blocking = 0;
        let mut half: mwComm_t = std::ptr::null_mut();
        let last = ctx.rank == ctx.size - 1;
        let r = mwCommSplit(comm, if last { MW_SPLIT_NOCOLOR } else { 0 }, 0, &mut half, &mut cfg);
        assert!(r == mwSuccess || r == mwInProgress, "split: {r}");
        if !last {
            std::thread::sleep(Duration::from_millis(50));
        }
        for i in 0..20 {
            assert_eq!(c_sum(comm, i), i * ctx.size as i32);
        }
        if !last {
            assert_eq!(c_settle(half), mwSuccess);
            assert_eq!(c_sum(half, 1), ctx.size as i32 - 1);
            assert_eq!(mwCommDestroy(half), mwSuccess);
        }
        c_sum(comm, 0);
        assert_eq!(mwCommDestroy(comm), mwSuccess);
    }
}

/// Descriptors of this process that are sockets of `domain`.
fn sockets_of(domain: i32) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|fd| {
            let (mut d, mut len) = (0i32, std::mem::size_of::<i32>() as libc::socklen_t);
            // SAFETY: getsockopt into a live int; a descriptor that is no socket just fails.
            let r = unsafe {
                libc::getsockopt(*fd, libc::SOL_SOCKET, libc::SO_DOMAIN, (&mut d as *mut i32).cast(), &mut len)
            };
            r == 0 && d == domain
        })
        .count()
}

/// A C split whose config asks for TCP gets TCP links, not lanes of its shared-memory parent.
fn c_split_tcp(ctx: &Ctx) {
    use multiworld::ffi::*;
    let comm = c_comm(ctx);
    c_sum(comm, 1);
    let (unix, inet) = (sockets_of(libc::AF_UNIX), sockets_of(libc::AF_INET));
    // SAFETY: as in c_split_nonblocking.
    unsafe {
        let mut cfg: mwConfig_t = std::mem::zeroed();
        assert_eq!(mwConfigInit(&mut cfg), mwSuccess);
        cfg.transport = 1;
        let mut child: mwComm_t = std::ptr::null_mut();
        assert_eq!(mwCommSplit(comm, 0, 0, &mut child, &mut cfg), mwSuccess);
        assert_eq!(sockets_of(libc::AF_UNIX), unix, "a lane's Unix socket for a TCP-only world");
        assert!(sockets_of(libc::AF_INET) > inet, "no TCP link for a TCP-only world");
        assert_eq!(c_sum(child, 2), 2 * ctx.size as i32);
        assert_eq!(mwCommDestroy(child), mwSuccess);
        assert_eq!(mwCommDestroy(comm), mwSuccess);
    }
}

/// True when the test forces TCP (`MW_TRANSPORT=tcp`): worlds made from worlds then run on
/// channels of their parent's sockets instead of lanes of its segments.
fn over_tcp() -> bool {
    std::env::var("MW_TRANSPORT").as_deref() == Ok("tcp")
}

/// The transport every pair of the tests' worlds uses on one host.
fn host_transport() -> TransportKind {
    if over_tcp() {
        TransportKind::Tcp
    } else {
        TransportKind::Shm
    }
}

/// This process's sockets: TCP and Unix.
fn sockets() -> (usize, usize) {
    (sockets_of(libc::AF_INET), sockets_of(libc::AF_UNIX))
}

/// Checks that `w` links its peers by the tests' transport and that making it opened no
/// socket (`before`: this process's [`sockets`] before) where it formed on its parent's links.
fn linked_on_parent(w: &World, before: (usize, usize)) {
    let want = host_transport();
    assert!(w.transports().iter().enumerate().all(|(r, t)| r == w.rank() || *t == Some(want)), "{:?}", w.transports());
    if w.stats().lane_links > 0 {
        assert_eq!(sockets(), before, "'{}' opened sockets of its own (TCP, Unix)", w.name());
    }
}

/// Links a world made by `dup` or `split` of `size` ranks should have on lanes (or channels):
/// all of them, unless the test turned lanes off.
fn lanes_expected(size: usize) -> u64 {
    match std::env::var("MW_LANES").as_deref() {
        Ok("0") => 0,
        _ => size as u64 - 1,
    }
}

fn parent(ctx: &Ctx) -> (WorldManager, World) {
    let m = WorldManager::new();
    let w = m.init_world("parent", &ctx.id(), ctx.rank, ctx.size).expect("parent world");
    (m, w)
}

/// All-reduces `rounds` times on `w`: rank `r` (of `w`) contributes `tag * (r + 1) + i` in
/// round `i`; checks each sum against the one computed from that formula.
fn traffic(w: &World, tag: u64, rounds: u64) {
    let n = w.size() as u64;
    for i in 0..rounds {
        let mine = vec![tag * (w.rank() as u64 + 1) + i; 1024];
        let mut out = vec![0u64; 1024];
        w.all_reduce(&mine, &mut out, ReduceOp::Sum).unwrap_or_else(|e| panic!("all_reduce on '{}': {e}", w.name()));
        let want = tag * n * (n + 1) / 2 + n * i;
        assert!(out.iter().all(|v| *v == want), "'{}' round {i}: got {}, want {want}", w.name(), out[0]);
    }
}

/// Runs traffic on every world at once, one thread each.
fn traffic_at_once(worlds: &[(&World, u64)]) {
    std::thread::scope(|s| {
        for (w, tag) in worlds {
            s.spawn(move || traffic(w, *tag, 200));
        }
    });
}

fn ready(evs: &[Event], name: &str) -> bool {
    evs.iter().any(|e| matches!(e, Event::Ready { name: n, .. } if n == name))
}

/// Waits (at most 10 s) for the `Ready` event of world `name`; the events seen meanwhile.
fn wait_ready(m: &WorldManager, name: &str) -> Vec<Event> {
    let end = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !ready(&seen, name) {
        let left = end.saturating_duration_since(Instant::now());
        match m.next_event(Some(left)) {
            Some(e) => seen.push(e),
            None => panic!("no Ready event for '{name}'; saw {seen:?}"),
        }
    }
    seen
}

fn split(ctx: &Ctx) {
    let (m, w) = parent(ctx);
    let (rank, size) = (ctx.rank, ctx.size);
    // Same parity, reversed keys: the highest old rank comes first.
    let before = sockets();
    let t = Instant::now();
    let half = w.split("half", Some((rank % 2) as u32), (size - rank) as u32).unwrap().expect("a colour joins");
    eprintln!("split of {size} ranks took {:?}", t.elapsed());
    linked_on_parent(&half, before);
    let mates: Vec<usize> = (0..size).rev().filter(|r| r % 2 == rank % 2).collect();
    assert_eq!(half.size(), mates.len());
    assert_eq!(half.stats().lane_links, lanes_expected(half.size()), "{:?}", half.stats());
    assert_eq!(w.stats().lane_links, 0);
    assert_eq!(half.rank(), mates.iter().position(|r| *r == rank).unwrap());
    assert_eq!(half.name(), "half");
    // The new world is the manager's like any other.
    assert!(m.world("half").is_some());
    wait_ready(&m, "half");
    traffic_at_once(&[(&w, 1), (&half, 1000 + (rank % 2) as u64)]);

    // A colour of None takes part and joins nothing.
    let odd = w.split("odd", (rank % 2 == 1).then_some(7), 0).unwrap();
    match (rank % 2, &odd) {
        (0, None) => assert!(m.world("odd").is_none()),
        (1, Some(o)) => {
            assert_eq!(o.size(), size / 2);
            assert_eq!(o.rank(), rank / 2);
        }
        _ => panic!("rank {rank}: split with colour {:?} gave {odd:?}", (rank % 2 == 1).then_some(7)),
    }
    let mut with: Vec<(&World, u64)> = vec![(&w, 2), (&half, 3)];
    if let Some(o) = &odd {
        with.push((o, 4));
    }
    traffic_at_once(&with);
    m.remove_world("half").unwrap();
    assert_eq!(half.state(), WorldState::Removed);
    w.barrier().unwrap();
    traffic(&w, 5, 10);
}

fn dup(ctx: &Ctx) {
    let (m, w) = parent(ctx);
    let before = sockets();
    let t = Instant::now();
    let d = w.dup("copy").unwrap();
    eprintln!("dup of {} ranks took {:?}", ctx.size, t.elapsed());
    linked_on_parent(&d, before);
    assert_eq!((d.rank(), d.size()), (w.rank(), w.size()));
    assert_ne!(d.generation(), 0);
    assert_eq!(d.stats().lane_links, lanes_expected(d.size()), "{:?}", d.stats());
    traffic_at_once(&[(&w, 7), (&d, 11)]);
    // Breaking the copy leaves the parent alone.
    if ctx.rank == 0 {
        d.abort();
    }
    let mut v = [0u32; 4];
    assert!(d.all_reduce_in_place(&mut v, ReduceOp::Sum).is_err() || ctx.rank != 0);
    traffic(&w, 13, 20);
    assert_eq!(w.state(), WorldState::Ready);
    m.remove_world("copy").unwrap();
    w.barrier().unwrap();

    // Breaking the parent leaves a copy alone, also one on lanes of the parent's segments.
    let d2 = w.dup("copy2").unwrap();
    traffic(&d2, 3, 10);
    if ctx.rank == 0 {
        w.abort();
    }
    let mut v = [0u32; 4];
    while w.all_reduce_in_place(&mut v, ReduceOp::Sum).is_ok() {}
    assert!(matches!(w.state(), WorldState::Broken(_)));
    traffic(&d2, 17, 200);
    assert_eq!(d2.state(), WorldState::Ready);
    d2.barrier().unwrap();
}

/// Three ranks: the parent, a dup of it and a split of ranks 0 and 1, all on lanes of the
/// same segments. The last rank is killed: on the survivors the parent and the dup break
/// promptly, and the split world between the two survivors, whose lanes lie in the segments
/// that the dead rank's worlds used too, keeps moving.
fn lanes_kill(ctx: &Ctx) {
    let (m, w) = parent(ctx);
    let victim = ctx.size - 1;
    let d = w.dup("all").unwrap();
    let pair = w.split("pair", (ctx.rank != victim).then_some(0), 0).unwrap();
    assert_eq!(d.stats().lane_links, lanes_expected(d.size()));
    traffic_at_once(&[(&w, 1), (&d, 2)]);
    if ctx.rank == victim {
        // SAFETY: kill(2) on this very process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        unreachable!();
    }
    let pair = pair.expect("the survivors form the pair");
    assert_eq!(pair.stats().lane_links, lanes_expected(2));
    let t = Instant::now();
    for world in [&w, &d] {
        let mut v = vec![1u32; 256];
        let e = loop {
            if let Err(e) = world.all_reduce_in_place(&mut v, ReduceOp::Sum) {
                break e;
            }
        };
        assert_eq!(e.kind(), ErrorKind::WorldBroken, "'{}': {e}", world.name());
    }
    let noticed = t.elapsed();
    eprintln!("rank {}: parent and dup broke within {noticed:?}", ctx.rank);
    assert!(noticed < Duration::from_secs(5), "the break took {noticed:?}");
    traffic(&pair, 5, 300);
    assert_eq!(pair.state(), WorldState::Ready);
    let evs = wait_ready(&m, "pair");
    let _ = evs;
    pair.barrier().unwrap();
}

/// Two ranks: fifteen dups held at once take the fifteen free lanes of the pair's segment; the
/// sixteenth forms links of its own; once they are removed, new dups (and dups of dups) claim
/// the released lanes again, clean.
fn lanes_reuse(ctx: &Ctx) {
    let (m, w) = parent(ctx);
    let held: Vec<World> = (0..16).map(|i| w.dup(&format!("d{i}")).unwrap()).collect();
    for (i, d) in held.iter().enumerate() {
        assert_eq!(d.stats().lane_links, u64::from(i < 15), "dup {i}: {:?}", d.stats());
    }
    std::thread::scope(|s| {
        for (i, d) in held.iter().enumerate() {
            s.spawn(move || traffic(d, 100 + i as u64, 20));
        }
    });
    for i in 0..16 {
        m.remove_world(&format!("d{i}")).unwrap();
    }
    w.barrier().unwrap();
    for i in 0..40 {
        let d = w.dup("again").unwrap();
        assert_eq!(d.stats().lane_links, 1, "dup {i} after the release: {:?}", d.stats());
        let dd = d.dup("again2").unwrap();
        assert_eq!(dd.stats().lane_links, 1);
        traffic(&d, 7, 3);
        traffic(&dd, 9, 3);
        m.remove_world("again2").unwrap();
        m.remove_world("again").unwrap();
        // Both sides have let go before the next dup looks for free lanes.
        w.barrier().unwrap();
    }

    // Two worlds that share the pair's segment (the parent and a dup of it) make worlds at
    // the same moment, from two threads: both look for free lanes at once and may pick the
    // same one; a world whose claim lost forms links of its own. Every world works.
    let c = w.dup("c").unwrap();
    let mut own_links = 0;
    for i in 0..20 {
        let (x, y) = std::thread::scope(|s| {
            let x = s.spawn(|| w.dup(&format!("x{i}")).unwrap());
            let y = s.spawn(|| c.dup(&format!("y{i}")).unwrap());
            (x.join().unwrap(), y.join().unwrap())
        });
        own_links += u64::from(x.stats().lane_links == 0) + u64::from(y.stats().lane_links == 0);
        std::thread::scope(|s| {
            s.spawn(|| traffic(&x, 3, 5));
            s.spawn(|| traffic(&y, 5, 5));
        });
        m.remove_world(&format!("x{i}")).unwrap();
        m.remove_world(&format!("y{i}")).unwrap();
        w.barrier().unwrap();
    }
    eprintln!("rank {}: of 40 worlds made at once in pairs, {own_links} formed links of their own", ctx.rank);
}

fn shrink_after_kill(ctx: &Ctx) {
    let (m, w) = parent(ctx);
    let victim = ctx.size - 1;
    traffic(&w, 1, 5);
    if ctx.rank == victim {
        // SAFETY: kill(2) on this very process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        unreachable!();
    }
    // Use the parent until it breaks.
    let broke = loop {
        let mut v = vec![1u32; 256];
        if let Err(e) = w.all_reduce_in_place(&mut v, ReduceOp::Sum) {
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
            break Instant::now();
        }
    };
    // The survivors notice at different moments and call shrink at different moments.
    std::thread::sleep(Duration::from_millis(150 * ctx.rank as u64));
    let t = Instant::now();
    let s = w.shrink("survivors", &[victim]).unwrap();
    let formed = t.elapsed();
    let mut v = vec![ctx.rank as u64 + 1; 64];
    s.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    let first = t.elapsed();
    let n = ctx.size as u64 - 1;
    assert!(v.iter().all(|x| *x == n * (n + 1) / 2));
    eprintln!(
        "rank {}: parent broke, shrink formed in {formed:?} (called {:?} after the break), first all_reduce done {first:?} after the call",
        ctx.rank,
        t - broke
    );
    assert_eq!((s.rank(), s.size()), (ctx.rank, ctx.size - 1));
    // On lanes of the broken parent's segments: its break left them alone.
    assert_eq!(s.stats().lane_links, lanes_expected(s.size()), "{:?}", s.stats());
    assert!(matches!(w.state(), WorldState::Broken(_)));
    assert_eq!(s.state(), WorldState::Ready);
    let evs = wait_ready(&m, "survivors");
    assert!(evs.iter().any(|e| matches!(e, Event::Broken { name, .. } if name == "parent")), "{evs:?}");
    traffic(&s, 3, 100);
    assert_eq!(s.state(), WorldState::Ready);
    // Nobody leaves before everyone has looked.
    s.barrier().unwrap();
}

fn shrink_live(ctx: &Ctx) {
    let (m, w) = parent(ctx);
    let out = ctx.size - 1;
    if ctx.rank != out {
        let s = w.shrink("without-last", &[out]).unwrap();
        assert_eq!((s.rank(), s.size()), (ctx.rank, ctx.size - 1));
        assert_eq!(s.stats().lane_links, lanes_expected(s.size()), "{:?}", s.stats());
        traffic_at_once(&[(&w, 17), (&s, 19)]);
        m.remove_world("without-last").unwrap();
    } else {
        // The excluded rank goes on using the parent with everyone.
        traffic(&w, 17, 200);
    }
    traffic(&w, 23, 10);
    assert_eq!(w.state(), WorldState::Ready);
    w.barrier().unwrap();
}

/// Fifteen dups of a 3-rank world hold every lane of each pair's segment; a shrink to two
/// ranks then finds none free (its second round says so) and forms links of its own.
fn shrink_without_free_lanes(ctx: &Ctx) {
    let (_m, w) = parent(ctx);
    let held: Vec<World> = (0..15).map(|i| w.dup(&format!("hold{i}")).unwrap()).collect();
    assert!(held.iter().all(|d| d.stats().lane_links == 2), "the dups took every lane");
    if ctx.rank != 2 {
        let s = w.shrink("pair", &[2]).unwrap();
        assert_eq!(s.stats().lane_links, 0, "{:?}", s.stats());
        assert_eq!(s.transports()[1 - ctx.rank], Some(TransportKind::Shm));
        traffic(&s, 7, 20);
        s.barrier().unwrap();
    }
    w.barrier().unwrap();
}

/// This process's mappings of shared-memory segments.
fn shm_maps() -> usize {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.contains("/dev/shm/mw-")).count()
}

/// A broken world keeps its segments mapped (for a shrink) until it is removed, also when it
/// broke by this rank's own abort, and lets go of them at removal while its handle lives on.
fn kept_until_removed(ctx: &Ctx) {
    let (m, w) = parent(ctx);
    traffic(&w, 1, 3);
    assert!(shm_maps() >= 1);
    if ctx.rank == 1 {
        w.abort();
    }
    let end = Instant::now() + Duration::from_secs(10);
    while !matches!(w.state(), WorldState::Broken(_)) {
        assert!(Instant::now() < end, "rank {}: the world did not break", ctx.rank);
        let mut v = vec![1u32; 4];
        let _ = w.all_reduce_in_place(&mut v, ReduceOp::Sum);
        std::thread::sleep(Duration::from_millis(10));
    }
    let kept_end = Instant::now() + Duration::from_secs(5);
    // The abort is applied by the pool: wait for the links to go, the segment to stay.
    while shm_maps() == 0 && Instant::now() < kept_end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(shm_maps() >= 1, "rank {}: the broken world let go of its segment", ctx.rank);
    m.remove_world("parent").unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while shm_maps() != 0 {
        assert!(Instant::now() < end, "rank {}: {} segments still mapped after removal", ctx.rank, shm_maps());
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(w);
}

fn grow_member(ctx: &Ctx) {
    let (_m, w) = parent(ctx);
    let new_size: usize = ctx.env("MW_TEST_NEW_SIZE").parse().unwrap();
    // Old rank 0 makes the id, hands it to the members over the world and to the newcomers
    // through a file.
    let mut bytes = [0u8; multiworld::UNIQUE_ID_BYTES];
    if ctx.rank == 0 {
        let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
        bytes = id.to_bytes();
        let path = ctx.env("MW_TEST_ID_FILE");
        std::fs::write(format!("{path}.tmp"), id.to_string()).unwrap();
        std::fs::rename(format!("{path}.tmp"), path).unwrap();
    }
    w.broadcast_in_place(&mut bytes, 0).unwrap();
    let id = UniqueId::from_bytes(&bytes).unwrap();
    // With MW_TEST_HOLD_LANES, fifteen dups hold every lane of the members' segments first.
    let hold = std::env::var("MW_TEST_HOLD_LANES").is_ok();
    let _held: Vec<World> = (0..if hold { 15 } else { 0 }).map(|i| w.dup(&format!("hold{i}")).unwrap()).collect();
    let t = Instant::now();
    let g = w.grow("grown", &id, new_size).unwrap();
    eprintln!("rank {}: grow to {new_size} took {:?}", ctx.rank, t.elapsed());
    assert_eq!((g.rank(), g.size()), (ctx.rank, new_size));
    // The members' pairs run on lanes of the parent's segments; the newcomers' links are new
    // shared-memory links.
    let lanes = if hold { 0 } else { lanes_expected(w.size()) };
    assert_eq!(g.stats().lane_links, lanes, "rank {}: {:?}", ctx.rank, g.stats());
    assert!(g.transports().iter().enumerate().all(|(r, t)| r == ctx.rank || *t == Some(host_transport())));
    assert_eq!(g.stats().shm_fallbacks, 0);
    traffic_at_once(&[(&w, 29), (&g, 31)]);
    g.barrier().unwrap();
}

fn grow_newcomer(ctx: &Ctx) {
    let path = ctx.env("MW_TEST_ID_FILE");
    let end = Instant::now() + Duration::from_secs(20);
    let id: UniqueId = loop {
        if let Ok(s) = std::fs::read_to_string(&path) {
            break s.parse().unwrap();
        }
        assert!(Instant::now() < end, "no id file");
        std::thread::sleep(Duration::from_millis(5));
    };
    // One newcomer comes late, after the members are waiting.
    std::thread::sleep(Duration::from_millis(ctx.env("MW_TEST_DELAY_MS").parse().unwrap_or(0)));
    let m = WorldManager::new();
    let g = m.init_world("grown", &id, ctx.rank, ctx.size).unwrap();
    assert_eq!(g.stats().lane_links, 0, "rank {}: {:?}", ctx.rank, g.stats());
    traffic(&g, 31, 200);
    g.barrier().unwrap();
}

fn disagree(ctx: &Ctx) {
    let (_m, w) = parent(ctx);
    let rank = ctx.rank;
    let usage = |r: multiworld::Result<_>, what: &str| {
        let e = r.err().unwrap_or_else(|| panic!("rank {rank}: {what} should fail"));
        assert_eq!(e.kind(), ErrorKind::InvalidUsage, "rank {rank}: {what}: {e}");
        e.message().to_owned()
    };

    // Names differ: every rank gets the same error, and the parent works on.
    let name = if rank == 2 { "b" } else { "a" };
    let msg = usage(w.split(name, Some(0), 0).map(|_| ()), "split with different names");
    assert!(msg.contains("rank 0 names the new world 'a', rank 2 names it 'b'"), "{msg}");
    traffic(&w, 1, 5);

    // One rank dups while the others split.
    let r = if rank == 0 { w.dup("c").map(|_| ()) } else { w.split("c", Some(1), 0).map(|_| ()) };
    let msg = usage(r, "dup against split");
    assert!(msg.contains("rank 0 calls dup, rank 1 calls split"), "{msg}");
    traffic(&w, 2, 5);

    // Members grow to different sizes.
    let mut bytes = [0u8; multiworld::UNIQUE_ID_BYTES];
    if rank == 0 {
        bytes = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap().to_bytes();
    }
    w.broadcast_in_place(&mut bytes, 0).unwrap();
    let id = UniqueId::from_bytes(&bytes).unwrap();
    let msg = usage(w.grow("g", &id, if rank == 1 { 6 } else { 5 }).map(|_| ()), "grow to different sizes");
    assert!(msg.contains("rank 0 grows the world to 5 ranks, rank 1 to 6"), "{msg}");
    traffic(&w, 3, 5);

    // Bad arguments are this rank's own error, at once, before anything is sent.
    let t = Instant::now();
    let e = w.shrink("s", &[rank]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(w.shrink("s", &[9]).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(w.shrink("s", &[3, 3]).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(w.grow("g", &id, 2).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert!(t.elapsed() < Duration::from_millis(500));

    // Survivors that name different ranks to exclude: all get InvalidUsage, whoever comes
    // first to the leading rank's door. Rank 3 is excluded by all and leaves.
    if rank == 3 {
        return;
    }
    let exclude: &[usize] = if rank == 1 { &[2, 3] } else { &[3] };
    if rank == 2 {
        // Arrives after the formation has already failed.
        std::thread::sleep(Duration::from_millis(300));
    }
    let msg = usage(w.shrink("s", exclude).map(|_| ()), "shrink with different exclude lists");
    assert!(msg.contains("excluding ranks [3]") && msg.contains("excluding ranks [2, 3]"), "{msg}");
    // A retry, agreed this time, forms (whoever comes first to the leader's door).
    let s = w.shrink("s", &[3]).unwrap_or_else(|e| panic!("rank {rank}: the retried shrink: {e}"));
    assert_eq!((s.rank(), s.size()), (rank, 3));
    traffic(&s, 5, 5);
    s.barrier().unwrap();
}

/// Two ranks over TCP, a world and its dup on the same sockets: rank 0 sends 24 MiB on the
/// dup, which rank 1 receives only after 300 all-reduces on the parent. The parent's traffic
/// runs meanwhile (the dup's frames go aside, up to its window, and its sender waits for
/// credit), then the dup's message arrives whole.
fn stalled_sibling(ctx: &Ctx) {
    let (_m, w) = parent(ctx);
    let d = w.dup("stalled").unwrap();
    assert_eq!(d.stats().lane_links, 1, "{:?}", d.stats());
    let n = 6 << 20;
    let msg: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2654435761)).collect();
    if ctx.rank == 0 {
        std::thread::scope(|s| {
            s.spawn(|| d.send(&msg, 1).unwrap());
            let t = Instant::now();
            traffic(&w, 3, 300);
            eprintln!("rank 0: 300 all-reduces beside a stalled 24 MiB send took {:?}", t.elapsed());
        });
    } else {
        let t = Instant::now();
        traffic(&w, 3, 300);
        eprintln!("rank 1: 300 all-reduces while the dup's message waited took {:?}", t.elapsed());
        let mut got = vec![0u32; n];
        d.recv(&mut got, 0).unwrap();
        assert!(got == msg, "the dup's message arrived damaged");
    }
    d.barrier().unwrap();
    w.barrier().unwrap();
}

/// Two ranks over TCP with small socket buffers and no heartbeats, a world and its dup on the
/// same sockets: rank 0 sends 8 MiB on the dup and then touches no world for 3 s; rank 1
/// starts its receive 300 ms late. The part of a frame that found the socket full waits aside
/// in rank 0's process, and must go out as rank 1 reads, not at rank 0's next call.
fn rest_aside(ctx: &Ctx) {
    let opts = multiworld::WorldOptions::default().without_heartbeat().with_socket_buffer(Some(64 << 10));
    let m = WorldManager::with_defaults(opts);
    let w = m.init_world("parent", &ctx.id(), ctx.rank, ctx.size).expect("parent world");
    let d = w.dup("copy").unwrap();
    assert_eq!(d.stats().lane_links, 1, "{:?}", d.stats());
    let msg: Vec<u32> = (0..2 << 20).map(|i: u32| i.wrapping_mul(2654435761)).collect();
    if ctx.rank == 0 {
        d.send(&msg, 1).unwrap();
        std::thread::sleep(Duration::from_secs(3));
    } else {
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let mut got = vec![0u32; msg.len()];
        d.recv(&mut got, 0).unwrap();
        let took = t.elapsed();
        eprintln!("rank 1: 8 MiB received in {took:?} once it was asked for");
        assert!(got == msg, "damaged");
        assert!(took < Duration::from_secs(1), "the receive waited {took:?} for the sender's next call");
    }
    w.barrier().unwrap();
}

/// Two ranks on shared memory, no heartbeats: a world and two dups on lanes of one segment,
/// sharing the pair's socket. Rank 0 removes the first dup while rank 1 waits in a receive on
/// it, and the second while rank 1 has nothing posted on it: the receive fails at once, and so
/// does rank 1's next call on the second (without heartbeats nothing else would tell them),
/// while the parent goes on.
fn idle_end(ctx: &Ctx) {
    let m = WorldManager::with_defaults(multiworld::WorldOptions::default().without_heartbeat());
    let w = m.init_world("parent", &ctx.id(), ctx.rank, ctx.size).expect("parent world");
    let before = sockets();
    let (d, d2) = (w.dup("copy").unwrap(), w.dup("copy2").unwrap());
    for x in [&d, &d2] {
        linked_on_parent(x, before);
        assert_eq!(x.stats().lane_links, 1, "{:?}", x.stats());
        traffic(x, 2, 20);
    }
    w.barrier().unwrap();
    let t = Instant::now();
    if ctx.rank == 0 {
        std::thread::sleep(Duration::from_millis(100));
        m.remove_world("copy").unwrap();
    } else {
        let mut got = [0u32; 4];
        let e = d.recv(&mut got, 0).expect_err("a receive from a world its peer removed");
        let took = t.elapsed();
        eprintln!("rank 1: the receive on the removed dup failed {took:?} after the barrier: {e}");
        assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
        assert!(took < Duration::from_secs(1), "the receive failed only after {took:?}");
    }
    w.barrier().unwrap();
    if ctx.rank == 0 {
        m.remove_world("copy2").unwrap();
    }
    w.barrier().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    if ctx.rank == 1 {
        let t = Instant::now();
        let e = d2.barrier().expect_err("a barrier on a world its peer removed");
        let took = t.elapsed();
        eprintln!("rank 1: the call on the idle removed dup failed in {took:?}: {e}");
        assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
        assert!(took < Duration::from_millis(500), "the call failed only after {took:?}");
    }
    traffic(&w, 4, 50);
    assert_eq!(w.state(), WorldState::Ready);
    w.barrier().unwrap();
}

/// Two ranks, heartbeats every 200 ms with a 10 s timeout: a world and its dup on the
/// parent's links (lanes, or channels over TCP). Rank 0 removes the dup while rank 1 has
/// nothing posted on it and never calls it again: rank 1's dup breaks by its next heartbeat
/// pass (which looks at its link), long before silence would break it.
fn idle_removed(ctx: &Ctx) {
    let opts = multiworld::WorldOptions::default().with_heartbeat(Duration::from_millis(200), Duration::from_secs(10));
    let m = WorldManager::with_defaults(opts);
    let w = m.init_world("parent", &ctx.id(), ctx.rank, ctx.size).expect("parent world");
    let d = w.dup("copy").unwrap();
    assert_eq!(d.stats().lane_links, 1, "{:?}", d.stats());
    traffic(&d, 2, 20);
    w.barrier().unwrap();
    if ctx.rank == 0 {
        m.remove_world("copy").unwrap();
    } else {
        let took = common::wait_broken(
            &m,
            "copy",
            Duration::from_secs(8),
            "the idle dup never learnt that its peer removed it",
        );
        eprintln!("rank 1: the idle dup broke {took:?} after the barrier");
        assert!(took < Duration::from_secs(2), "the idle dup broke only after {took:?}");
    }
    traffic(&w, 4, 20);
    w.barrier().unwrap();
}

fn run(role: &str, size: usize, env: &[(&str, String)]) -> Vec<String> {
    common::run_ranks(role, size, env, Duration::from_secs(60))
}

#[test]
fn split_by_parity_with_reversed_keys_and_a_none_colour() {
    for l in run("split", 4, &[]) {
        if let Some(line) = l.lines().find(|l| l.contains("split of")) {
            println!("{line}");
        }
    }
}

#[test]
fn dup_is_independent_of_its_parent() {
    run("dup", 3, &[]);
}

#[test]
fn dup_split_and_shrink_without_lanes_form_links_of_their_own() {
    run("dup", 3, &[("MW_LANES", "0".into())]);
    run("split", 4, &[("MW_LANES", "0".into())]);
    run("shrink_live", 4, &[("MW_LANES", "0".into())]);
}

#[test]
fn a_broken_world_keeps_its_segments_until_it_is_removed() {
    run("kept_until_removed", 2, &[]);
}

#[test]
fn a_shrink_that_finds_no_free_lane_forms_links_of_its_own() {
    run("shrink_without_free_lanes", 3, &[]);
}

/// Runs `size` ranks of `role`, whose last rank kills itself (SIGKILL) and the others must
/// pass; prints the survivors' lines that contain `shown`.
fn run_with_victim(role: &str, size: usize, shown: &str, extra: &[(&str, String)]) {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    let mut env = vec![("MW_TEST_ID", id.to_string())];
    env.extend(extra.iter().cloned());
    let mut procs: Vec<_> = (0..size).map(|r| spawn(role, r, size, &env, &[])).collect();
    let mut victim = procs.pop().unwrap();
    let status = victim.wait_for(Duration::from_secs(60)).expect("the victim ends");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "{}", victim.log_text());
    for l in finish(&mut procs, Duration::from_secs(60)) {
        if let Some(line) = l.lines().find(|l| l.contains(shown)) {
            println!("{line}");
        }
    }
}

#[test]
fn a_killed_rank_breaks_its_worlds_and_not_a_sibling_on_the_same_segments() {
    run_with_victim("lanes_kill", 3, "broke within", &[]);
}

#[test]
fn a_non_blocking_c_split_keeps_the_parent_in_order() {
    run("c_split_nonblocking", 3, &[]);
}

#[test]
fn a_c_split_asked_for_tcp_gets_tcp() {
    run("c_split_tcp", 2, &[]);
}

#[test]
fn lanes_are_used_up_released_and_claimed_again() {
    for l in run("lanes_reuse", 2, &[]) {
        if let Some(line) = l.lines().find(|l| l.contains("links of their own")) {
            println!("{line}");
        }
    }
}

#[test]
fn survivors_of_a_killed_rank_shrink_and_go_on() {
    run_with_victim("shrink_after_kill", 4, "shrink formed", &[]);
}

#[test]
fn shrink_may_exclude_a_live_rank() {
    run("shrink_live", 4, &[]);
}

/// Members `0..members` grow their world to `new_size` with newcomer processes, the last of
/// which comes 300 ms late.
fn grow(members: usize, new_size: usize, env: &[(&str, String)]) {
    let id = UniqueId::new_on("127.0.0.1".parse().unwrap()).unwrap();
    // One file per call: the grow tests run at once in this process.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = std::env::temp_dir().join(format!("mw-grow-{}-{call}", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let f = file.display().to_string();
    let mut base =
        vec![("MW_TEST_ID", id.to_string()), ("MW_TEST_ID_FILE", f), ("MW_TEST_NEW_SIZE", new_size.to_string())];
    base.extend(env.iter().cloned());
    let mut procs: Vec<_> = (0..members).map(|r| spawn("grow_member", r, members, &base, &[])).collect();
    let mut late = base.clone();
    late.push(("MW_TEST_DELAY_MS", "300".into()));
    for r in members..new_size {
        procs.push(spawn("grow_newcomer", r, new_size, if r + 1 == new_size { &late } else { &base }, &[]));
    }
    finish(&mut procs, Duration::from_secs(60));
    let _ = std::fs::remove_file(&file);
}

#[test]
fn grow_from_two_to_four_with_two_new_processes() {
    grow(2, 4, &[]);
}

#[test]
fn grow_links_three_members_on_lanes_and_a_newcomer_on_its_own() {
    grow(3, 4, &[]);
}

#[test]
fn grow_without_lanes() {
    grow(2, 4, &[("MW_LANES", "0".into())]);
}

#[test]
fn grow_without_free_lanes() {
    grow(3, 4, &[("MW_TEST_HOLD_LANES", "1".into())]);
}

#[test]
fn ranks_that_disagree_all_get_a_clear_error() {
    run("disagree", 4, &[]);
}

/// `MW_TRANSPORT=tcp` for a test's ranks.
fn tcp() -> Vec<(&'static str, String)> {
    vec![("MW_TRANSPORT", "tcp".into())]
}

#[test]
fn over_tcp_dup_split_and_shrink_form_on_the_parents_sockets() {
    run("dup", 3, &tcp());
    run("split", 4, &tcp());
    run("shrink_live", 4, &tcp());
}

#[test]
fn over_tcp_a_killed_rank_breaks_its_worlds_and_not_a_sibling_on_the_same_sockets() {
    run_with_victim("lanes_kill", 3, "broke within", &tcp());
}

#[test]
fn over_tcp_survivors_of_a_killed_rank_shrink_on_the_parents_sockets() {
    run_with_victim("shrink_after_kill", 4, "shrink formed", &tcp());
}

#[test]
fn over_tcp_grow_links_the_members_on_the_parents_sockets() {
    grow(2, 4, &tcp());
}

#[test]
fn over_tcp_a_world_that_stops_reading_does_not_hold_up_its_sibling() {
    for l in run("stalled_sibling", 2, &tcp()) {
        if let Some(line) = l.lines().find(|l| l.contains("all-reduces")) {
            println!("{line}");
        }
    }
}

#[test]
fn a_world_its_peer_removed_fails_the_next_call_at_once() {
    for l in run("idle_end", 2, &[]) {
        for line in l.lines().filter(|l| l.contains("removed dup failed")) {
            println!("{line}");
        }
    }
}

#[test]
fn an_idle_world_its_peer_removed_breaks_at_its_next_heartbeat() {
    for env in [vec![], tcp()] {
        for l in run("idle_removed", 2, &env) {
            if let Some(line) = l.lines().find(|l| l.contains("idle dup broke")) {
                println!("{line}");
            }
        }
    }
}

#[test]
fn over_tcp_a_frame_set_aside_goes_out_without_its_sender_calling_again() {
    for l in run("rest_aside", 2, &tcp()) {
        if let Some(line) = l.lines().find(|l| l.contains("received in")) {
            println!("{line}");
        }
    }
}
