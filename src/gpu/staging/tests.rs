//! The stager's logic on a stand-in device whose "stream" is a host thread running the same
//! commands a CUDA stream would (copies, flag writes, flag waits) on host memory. Ranks are
//! threads of this process with real worlds between them. What is checked: batches run in
//! stream order with the right results, a broken world releases a stream that waits on it,
//! a failed enqueue releases the stream and breaks the world, and closing drains and frees.
//! (On a GPU, `tests/cuda.rs` checks the same through CUDA itself.)

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::api::error::ErrorKind;
use crate::api::types::{DataType, ReduceOp};
use crate::engine::wire::OpKind;
use crate::{UniqueId, WorldManager};

/// Host memory standing in for a mapped pinned block.
struct HostBlock {
    ptr: *mut u8,
    layout: Layout,
    live: Arc<AtomicUsize>,
}

// SAFETY: owned memory, reached only through the block's methods.
unsafe impl Send for HostBlock {}

impl Block for HostBlock {
    fn host_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn dev_ptr(&self) -> CUdeviceptr {
        self.ptr as CUdeviceptr
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
}

impl Drop for HostBlock {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
        // SAFETY: allocated in `HostDevice::alloc` with this layout, freed once.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

enum Work {
    Run(usize, Vec<StreamCmd>),
    Mark(mpsc::Sender<()>),
    /// Stops the stream until the sender is dropped (a stream busy with other work).
    Hold(mpsc::Receiver<()>),
}

/// A stream: a thread that runs the commands it is given, in order, on host memory.
struct HostStream {
    tx: Mutex<mpsc::Sender<Work>>,
}

impl HostStream {
    /// A new stream (leaked: its thread lives as long as the test process).
    fn new() -> &'static HostStream {
        let (tx, rx) = mpsc::channel::<Work>();
        thread::spawn(move || {
            for w in rx {
                match w {
                    Work::Run(base, cmds) => cmds.iter().for_each(|c| run(base, c)),
                    Work::Mark(done) => {
                        let _ = done.send(());
                    }
                    Work::Hold(until) => {
                        let _ = until.recv();
                    }
                }
            }
        });
        Box::leak(Box::new(HostStream { tx: Mutex::new(tx) }))
    }

    /// Holds the stream (what is put on it later waits) until the returned sender is dropped.
    fn hold(&self) -> mpsc::Sender<()> {
        let (tx, rx) = mpsc::channel();
        self.tx.lock().unwrap().send(Work::Hold(rx)).unwrap();
        tx
    }

    /// True when everything put on the stream so far has run within `limit`.
    fn synchronize(&self, limit: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        self.tx.lock().unwrap().send(Work::Mark(tx)).unwrap();
        rx.recv_timeout(limit).is_ok()
    }
}

/// One command, as a stream would run it.
fn run(base: usize, c: &StreamCmd) {
    let at = |o: usize| (base + o) as *mut u8;
    // SAFETY: the offsets come from the batch's layout inside its block, and the addresses
    // are the tests' own buffers, alive until the stream is synchronized.
    unsafe {
        match *c {
            StreamCmd::ToBlock { from, at: o, len } => std::ptr::copy_nonoverlapping(from as *const u8, at(o), len),
            StreamCmd::FromBlock { at: o, to, len } => std::ptr::copy_nonoverlapping(at(o), to as *mut u8, len),
            StreamCmd::Raise { at: o } => {
                std::sync::atomic::fence(Ordering::SeqCst);
                std::ptr::write_volatile(at(o) as *mut u32, 1);
            }
            // A GPU polls the flag; this stream looks often for a while, then naps.
            StreamCmd::WaitFor { at: o, value } => {
                let t = Instant::now();
                while std::ptr::read_volatile(at(o) as *const u32) < value {
                    if t.elapsed() < Duration::from_millis(1) {
                        thread::yield_now();
                    } else {
                        thread::sleep(Duration::from_micros(50));
                    }
                }
                std::sync::atomic::fence(Ordering::SeqCst);
            }
            StreamCmd::CopyAsTold { at: o, count, max } => {
                for k in 0..count {
                    let w = |j: usize| std::ptr::read_volatile((base + o + 24 * k + 8 * j) as *const u64);
                    let (src, dst, len) = (w(0), w(1), w(2) as usize);
                    assert!(len <= max, "told to copy {len} bytes, at most {max} planned");
                    if len > 0 {
                        std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len);
                    }
                }
            }
            // The kernel's arithmetic, as built for the host (`cuda/host_check.cpp`).
            StreamCmd::CombineAsTold { at: o, dtype, max } => {
                let w = |j: usize| std::ptr::read_volatile((base + o + 8 * j) as *const u64);
                let (dst, n, nsrc, op, divide) = (w(0), w(1) as usize, w(2) as usize, w(3), w(4));
                assert!(n <= max, "told to combine {n} elements, at most {max} planned");
                if n > 0 {
                    assert!((1..=8).contains(&nsrc), "{nsrc} sources");
                    let srcs: Vec<*const u8> = (0..nsrc).map(|k| w(5 + k) as *const u8).collect();
                    let (t, dst) = (dtype as i32, dst as *mut u8);
                    crate::gpu::cuda::host::mw_host_combine(t, op as i32, dst, srcs.as_ptr(), nsrc as i32, n);
                    if divide > 0 {
                        crate::gpu::cuda::host::mw_host_scale(t, dst, n, divide as i32);
                    }
                }
            }
        }
    }
}

/// What the stand-in device does for CUDA IPC. Ranks are threads of one process, so a
/// "handle" is simply the allocation's address.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Share {
    /// No IPC: every operation is staged.
    #[default]
    Off,
    On,
    /// Buffers cannot be exported (as memory from a stream-ordered pool).
    NoExport,
    /// Peers' buffers cannot be mapped (as GPUs without peer access).
    NoOpen,
}

/// What the stand-in device was asked to do.
#[derive(Default)]
struct Counts {
    opened: AtomicUsize,
    closed: AtomicUsize,
}

/// Releasing a communicator's staging (C `mwCommAbort` / `mwCommDestroy`) returns at once
/// even when its stream never gets to the batch it holds; the world is left, and the blocks
/// are freed once the stream moves on. Both an abort (the batch fails) and a destroy (the
/// batch runs first, then the world is left).
#[test]
fn releasing_a_staging_never_waits_for_its_stream() {
    const N: usize = 1000;
    for abort in [true, false] {
        ranks(2, &["held"], move |rank, worlds| {
            let w = worlds[0].clone();
            if rank == 1 {
                // Takes part in the all-reduce when the held stream finally posts it (destroy),
                // or sees the world aborted (abort).
                let mut sum = vec![0f32; N];
                let r = w.all_reduce(&data(1, N, 0), &mut sum, ReduceOp::Sum);
                assert_eq!(r.is_err(), abort, "rank 1: {r:?}");
                return;
            }
            let stream = HostStream::new();
            let device = HostDevice::default();
            let live = device.live.clone();
            let st = Arc::new(Staging::with_device(w.clone(), device).unwrap());
            let gate = stream.hold();
            let a = data(0, N, 0);
            let mut sum = vec![0f32; N];
            // SAFETY: the buffers outlive the synchronize below.
            unsafe {
                st.enqueue(stream, &[(desc(OpKind::AllReduce, ReduceOp::Sum, N, 0, false), dev(&a), out(&mut sum))])
            }
            .unwrap();
            if abort {
                w.abort();
            }
            let left = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let l2 = left.clone();
            let t = Instant::now();
            st.release_in_background(abort, move || l2.store(true, Ordering::SeqCst));
            let took = t.elapsed();
            assert!(took < Duration::from_millis(500), "abort={abort}: release took {took:?}");
            if abort {
                // The world is left at once; the stream still holds its batch.
                let end = Instant::now() + Duration::from_secs(10);
                while !left.load(Ordering::SeqCst) {
                    assert!(Instant::now() < end, "the world was not left");
                    thread::sleep(Duration::from_millis(5));
                }
            }
            assert!(live.load(Ordering::SeqCst) > 0, "a block was freed while the stream still needed it");
            drop(gate);
            assert!(stream.synchronize(Duration::from_secs(20)), "abort={abort}: the stream did not drain");
            let end = Instant::now() + Duration::from_secs(10);
            while live.load(Ordering::SeqCst) > 0 || !left.load(Ordering::SeqCst) {
                assert!(Instant::now() < end, "abort={abort}: blocks not freed or world not left");
                thread::sleep(Duration::from_millis(5));
            }
            if !abort {
                let want: Vec<f32> = data(0, N, 0).iter().zip(&data(1, N, 0)).map(|(x, y)| x + y).collect();
                assert_eq!(sum, want, "the destroyed communicator's last batch");
            }
        });
    }
}

/// The stand-in device. `fail_after`: a submit puts that many commands on the stream, then
/// fails (as a CUDA call failing half-way through an enqueue would). `slow_close`: unmapping
/// takes that long.
#[derive(Default)]
struct HostDevice {
    fail_after: Option<usize>,
    share: Share,
    slow_close: Option<Duration>,
    live: Arc<AtomicUsize>,
    counts: Arc<Counts>,
}

/// Every "allocation" some rank of this process maps now (with repeats), as the stand-in
/// device's `open` and `close` see them.
static MAPPED: Mutex<Vec<CUdeviceptr>> = Mutex::new(Vec::new());

impl HostDevice {
    fn sharing(share: Share) -> HostDevice {
        HostDevice { share, ..Default::default() }
    }
}

/// Pretend allocations are 4 KiB-aligned ranges, so that offsets into them are exercised.
const PAGE: u64 = 4096;

impl Device for HostDevice {
    type Stream = &'static HostStream;
    type Block = HostBlock;
    type Entered = ();

    fn enter(&self) -> Result<()> {
        Ok(())
    }

    fn check_buffer(&self, what: &str, addr: CUdeviceptr, len: usize) -> Result<()> {
        if len > 0 && addr == 0 {
            return Err(Error::invalid_arg(format!("{what}: null buffer")));
        }
        Ok(())
    }

    unsafe fn check_stream(&self, _: &'static HostStream) -> Result<()> {
        Ok(())
    }

    fn alloc(&self, len: usize) -> Result<HostBlock> {
        let layout = Layout::from_size_align(len.max(DATA), 64).map_err(|_| Error::invalid_arg("block size"))?;
        // SAFETY: a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(HostBlock { ptr, layout, live: self.live.clone() })
    }

    unsafe fn submit(&self, s: &'static HostStream, block: &HostBlock, cmds: &[StreamCmd]) -> Result<()> {
        let n = self.fail_after.unwrap_or(cmds.len()).min(cmds.len());
        s.tx.lock().unwrap().send(Work::Run(block.ptr as usize, cmds[..n].to_vec())).unwrap();
        match self.fail_after {
            Some(_) => Err(Error::new(ErrorKind::Cuda, "injected failure half-way through an enqueue")),
            None => Ok(()),
        }
    }

    fn can_share(&self) -> bool {
        self.share != Share::Off
    }

    fn export(&self, addr: CUdeviceptr) -> Option<([u8; HANDLE_LEN], u64)> {
        if self.share == Share::NoExport {
            return None;
        }
        let mut h = [0u8; HANDLE_LEN];
        h[..8].copy_from_slice(&(addr - addr % PAGE).to_le_bytes());
        Some((h, addr % PAGE))
    }

    fn open(&self, handle: &[u8; HANDLE_LEN]) -> Result<(CUdeviceptr, usize)> {
        if self.share == Share::NoOpen {
            return Err(Error::new(ErrorKind::Cuda, "cannot map a peer's memory here"));
        }
        self.counts.opened.fetch_add(1, Ordering::SeqCst);
        let base = u64::from_le_bytes(handle[..8].try_into().unwrap());
        MAPPED.lock().unwrap().push(base);
        // The tests' buffers are far smaller than this "allocation".
        Ok((base, 1 << 40))
    }

    fn close(&self, base: CUdeviceptr) {
        if let Some(d) = self.slow_close {
            thread::sleep(d);
        }
        let mut mapped = MAPPED.lock().unwrap();
        let i = mapped.iter().position(|m| *m == base).expect("closing what is not mapped");
        mapped.swap_remove(i);
        self.counts.closed.fetch_add(1, Ordering::SeqCst);
    }
}

/// Runs `f(rank, worlds)` on `n` threads, each rank with its own manager and the worlds
/// `names` formed among them. A rank's manager, and so its worlds, stay until every rank has
/// returned from `f` (bounded, so that a rank that failed does not hang the others): a rank
/// that left would break its worlds for the ranks still at work in them.
fn ranks(n: usize, names: &[&str], f: impl Fn(usize, Vec<World>) + Send + Sync + 'static) {
    let ids: Vec<UniqueId> = names.iter().map(|_| UniqueId::new().unwrap()).collect();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let f = Arc::new(f);
    let returned = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..n)
        .map(|r| {
            let (ids, names, f, returned) = (ids.clone(), names.clone(), f.clone(), returned.clone());
            thread::spawn(move || {
                let m = WorldManager::new();
                let worlds = names.iter().zip(&ids).map(|(name, id)| m.init_world(name, id, r, n).unwrap()).collect();
                f(r, worlds);
                returned.fetch_add(1, Ordering::SeqCst);
                let t = Instant::now();
                while returned.load(Ordering::SeqCst) < n && t.elapsed() < Duration::from_secs(20) {
                    thread::sleep(Duration::from_millis(1));
                }
                drop(m);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("rank thread panicked");
    }
}

fn desc(kind: OpKind, redop: ReduceOp, count: usize, root: usize, in_place: bool) -> OpDesc {
    OpDesc { kind, dtype: DataType::F32, redop, count, root, is_send: false, in_place }
}

fn dev(v: &[f32]) -> Option<(CUdeviceptr, usize)> {
    Some((v.as_ptr() as CUdeviceptr, std::mem::size_of_val(v)))
}

/// [`dev`] for a buffer the stream writes.
fn out(v: &mut [f32]) -> Option<(CUdeviceptr, usize)> {
    Some((v.as_mut_ptr() as CUdeviceptr, std::mem::size_of_val(v)))
}

/// Values that every rank can compute for every rank, exact in f32.
fn data(rank: usize, n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 + rank * 13 + salt * 5) % 251) as f32 - 100.0).collect()
}

#[test]
fn batches_run_in_stream_order_and_match_a_reference() {
    const N: usize = 4097;
    ranks(2, &["w"], |rank, worlds| {
        let peer = 1 - rank;
        let device = HostDevice::default();
        let live = device.live.clone();
        let st = Staging::with_device(worlds[0].clone(), device).unwrap();
        let stream = HostStream::new();

        let a = data(rank, N, 0);
        let mut sum = vec![0f32; N];
        let mut max = data(rank, N, 1);
        let b = data(rank, N, 2);
        let mut bcast = vec![0f32; N];
        let mine = data(rank, N, 3);
        let mut theirs = vec![0f32; N];
        let mut gathered = vec![0f32; 2 * N];
        let p2p = |is_send| OpDesc { is_send, ..desc(OpKind::P2p, ReduceOp::Sum, N, peer, false) };
        // SAFETY: every buffer lives until the stream is synchronized below.
        unsafe {
            st.enqueue(stream, &[(desc(OpKind::AllReduce, ReduceOp::Sum, N, 0, false), dev(&a), out(&mut sum))])
                .unwrap();
            st.enqueue(stream, &[(desc(OpKind::AllReduce, ReduceOp::Max, N, 0, true), None, out(&mut max))]).unwrap();
            let send = if rank == 1 { dev(&b) } else { None };
            st.enqueue(stream, &[(desc(OpKind::Broadcast, ReduceOp::Sum, N, 1, false), send, out(&mut bcast))])
                .unwrap();
            // Both ranks send first and receive second: only a group lets that meet.
            st.enqueue(stream, &[(p2p(true), dev(&mine), None), (p2p(false), None, out(&mut theirs))]).unwrap();
            st.enqueue(stream, &[(desc(OpKind::AllGather, ReduceOp::Sum, N, 0, false), dev(&a), out(&mut gathered))])
                .unwrap();
        }
        assert!(stream.synchronize(Duration::from_secs(30)), "rank {rank}: the stream did not drain");
        assert!(st.error().is_none(), "rank {rank}: {:?}", st.error());

        let (a0, a1) = (data(0, N, 0), data(1, N, 0));
        let want_sum: Vec<f32> = a0.iter().zip(&a1).map(|(x, y)| x + y).collect();
        let want_max: Vec<f32> = data(0, N, 1).iter().zip(&data(1, N, 1)).map(|(x, y)| x.max(*y)).collect();
        assert_eq!(sum, want_sum, "rank {rank}: all_reduce sum");
        assert_eq!(max, want_max, "rank {rank}: in-place all_reduce max");
        assert_eq!(bcast, data(1, N, 2), "rank {rank}: broadcast from rank 1");
        assert_eq!(theirs, data(peer, N, 3), "rank {rank}: grouped exchange");
        assert_eq!(gathered, [a0, a1].concat(), "rank {rank}: all_gather");

        // Closing waits for nothing more here; afterwards every block is freed and no batch
        // is taken.
        st.close();
        st.join();
        assert_eq!(live.load(Ordering::SeqCst), 0, "rank {rank}: blocks left after close");
        // SAFETY: as above.
        let e = unsafe {
            st.enqueue(stream, &[(desc(OpKind::AllReduce, ReduceOp::Sum, N, 0, false), dev(&a), out(&mut sum))])
        }
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidUsage, "{e}");
    });
}

#[test]
fn a_broken_world_releases_a_stream_waiting_on_it() {
    const N: usize = 1000;
    ranks(2, &["doomed", "other"], |rank, worlds| {
        let (doomed, other) = (worlds[0].clone(), worlds[1].clone());
        let stream = HostStream::new();
        if rank == 0 {
            let st = Staging::with_device(doomed, HostDevice::default()).unwrap();
            let mut got = vec![0f32; N];
            let a = data(0, N, 0);
            let mut sum = vec![0f32; N];
            let recv = desc(OpKind::P2p, ReduceOp::Sum, N, 1, false);
            let t0 = Instant::now();
            // SAFETY: the buffers outlive the synchronize below.
            unsafe {
                st.enqueue(stream, &[(recv, None, out(&mut got))]).unwrap();
                // A batch queued behind the one that waits is released too.
                st.enqueue(stream, &[(desc(OpKind::AllReduce, ReduceOp::Sum, N, 0, false), dev(&a), out(&mut sum))])
                    .unwrap();
            }
            assert!(stream.synchronize(Duration::from_secs(10)), "the stream still waits on a broken world");
            println!("stream released {:.1} ms after it started waiting", t0.elapsed().as_secs_f64() * 1e3);
            let e = st.error().expect("the failure is reported");
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
            // SAFETY: as above.
            let e = unsafe { st.enqueue(stream, &[(recv, None, out(&mut got))]) }.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
            // Closing after a failure still ends the stager and frees its blocks.
            st.close();
            st.join();
        } else {
            // Never sends: the receive on rank 0 waits until the world breaks.
            thread::sleep(Duration::from_millis(300));
            doomed.abort();
        }
        // The other world between the same ranks, on another stream, still works.
        let st = Staging::with_device(other, HostDevice::default()).unwrap();
        let a = data(rank, N, 4);
        let mut sum = vec![0f32; N];
        // SAFETY: as above.
        unsafe { st.enqueue(stream, &[(desc(OpKind::AllReduce, ReduceOp::Sum, N, 0, false), dev(&a), out(&mut sum))]) }
            .unwrap();
        assert!(stream.synchronize(Duration::from_secs(30)), "rank {rank}: the other world's stream did not drain");
        assert!(st.error().is_none(), "rank {rank}: {:?}", st.error());
        let want: Vec<f32> = data(0, N, 4).iter().zip(&data(1, N, 4)).map(|(x, y)| x + y).collect();
        assert_eq!(sum, want, "rank {rank}: all_reduce on the other world");
    });
}

#[test]
fn a_failed_enqueue_releases_the_stream_and_breaks_the_world() {
    const N: usize = 100;
    ranks(2, &["w"], |rank, worlds| {
        let a = data(rank, N, 0);
        let mut sum = vec![0f32; N];
        let op = desc(OpKind::AllReduce, ReduceOp::Sum, N, 0, false);
        if rank == 0 {
            // The copy in, READY and the wait reach the stream; then the enqueue fails.
            let st = Staging::with_device(worlds[0].clone(), HostDevice { fail_after: Some(3), ..Default::default() })
                .unwrap();
            let stream = HostStream::new();
            // SAFETY: the buffers outlive the synchronize below.
            let e = unsafe { st.enqueue(stream, &[(op, dev(&a), out(&mut sum))]) }.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Cuda, "{e}");
            assert!(stream.synchronize(Duration::from_secs(10)), "the stream still waits after a failed enqueue");
            assert_eq!(st.error().map(|e| e.kind()), Some(ErrorKind::Cuda));
            // SAFETY: as above.
            let e = unsafe { st.enqueue(stream, &[(op, dev(&a), out(&mut sum))]) }.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Cuda, "the first error is kept: {e}");
        } else {
            // This rank's peer cannot take part: its world breaks instead of waiting.
            let e = worlds[0].all_reduce(&a, &mut sum, ReduceOp::Sum).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
        }
    });
}

fn p2p(is_send: bool, count: usize, peer: usize) -> OpDesc {
    OpDesc { is_send, ..desc(OpKind::P2p, ReduceOp::Sum, count, peer, false) }
}

/// Point-to-point traffic of every shape on `n` ranks whose devices share as `share(rank)`
/// says; returns each rank's counts after checking every result against the reference.
fn p2p_traffic(n: usize, share: fn(usize) -> Share, check: fn(usize, [u64; 4])) {
    const N: usize = 3001; // not a multiple of 16 bytes: the copies' tails are exercised
    ranks(n, &["w"], move |rank, worlds| {
        let (right, left) = ((rank + 1) % n, (rank + n - 1) % n);
        let device = HostDevice::sharing(share(rank));
        let counts = device.counts.clone();
        let st = Staging::with_device(worlds[0].clone(), device).unwrap();
        let stream = HostStream::new();

        let mine = data(rank, N, 0);
        let mut ring = vec![0f32; N];
        let x = data(rank, N + 5, 1);
        let y = data(rank, 7, 2);
        let mut gx = vec![0f32; N + 5];
        let mut gy = vec![0f32; 7];
        let a = data(rank, N, 3);
        let mut sum = vec![0f32; N];
        let mut again = vec![0f32; N];
        // SAFETY: every buffer lives until the stream is synchronized below.
        unsafe {
            // A ring without groups: rank 0 sends first, the others receive first.
            let send = (p2p(true, N, right), dev(&mine), None);
            let recv = (p2p(false, N, left), None, out(&mut ring));
            if rank == 0 {
                st.enqueue(stream, &[send]).unwrap();
                st.enqueue(stream, &[recv]).unwrap();
            } else {
                st.enqueue(stream, &[recv]).unwrap();
                st.enqueue(stream, &[send]).unwrap();
            }
            // One group: two messages to the right, two from the left, receives first on
            // odd ranks, and an all-reduce staged beside them.
            let mut g = vec![
                (p2p(true, N + 5, right), dev(&x), None),
                (p2p(true, 7, right), dev(&y), None),
                (p2p(false, N + 5, left), None, out(&mut gx)),
                (p2p(false, 7, left), None, out(&mut gy)),
            ];
            if rank % 2 == 1 {
                g.rotate_left(2);
            }
            g.push((desc(OpKind::AllReduce, ReduceOp::Sum, N, 0, false), dev(&a), out(&mut sum)));
            st.enqueue(stream, &g).unwrap();
            // The same buffers again: mapped afresh.
            st.enqueue(
                stream,
                &[(p2p(true, N, right), dev(&mine), None), (p2p(false, N, left), None, out(&mut again))],
            )
            .unwrap();
        }
        assert!(stream.synchronize(Duration::from_secs(30)), "rank {rank}: the stream did not drain");
        assert!(st.error().is_none(), "rank {rank}: {:?}", st.error());
        assert_eq!(ring, data(left, N, 0), "rank {rank}: ring");
        assert_eq!(gx, data(left, N + 5, 1), "rank {rank}: grouped, first message");
        assert_eq!(gy, data(left, 7, 2), "rank {rank}: grouped, second message");
        assert_eq!(again, data(left, N, 0), "rank {rank}: the same buffers again");
        let want: Vec<f32> = (0..N).map(|i| (0..n).map(|r| data(r, N, 3)[i]).sum()).collect();
        assert_eq!(sum, want, "rank {rank}: all_reduce beside the messages");
        st.close();
        st.join();
        assert_eq!(counts.opened.load(Ordering::SeqCst), counts.closed.load(Ordering::SeqCst), "rank {rank}: mappings");
        check(rank, st.ipc_counts());
    });
}

#[test]
fn point_to_point_goes_through_ipc_mappings_and_matches_the_reference() {
    for n in [2, 3] {
        p2p_traffic(
            n,
            |_| Share::On,
            // Four receives, each through a mapping of the sender's buffer; no byte by host.
            |rank, c| assert_eq!(c, [4, 0, 0, 0], "rank {rank}: (receives mapped, operations by host, -, -)"),
        );
    }
}

#[test]
fn point_to_point_moves_bytes_by_host_when_buffers_cannot_be_shared() {
    // Rank 0's buffers cannot be exported: what it sends goes by host, what it receives
    // through mappings. Rank 1 cannot map: what it receives goes by host.
    p2p_traffic(
        3,
        |rank| [Share::NoExport, Share::NoOpen, Share::On][rank],
        |rank, c| {
            let want = match rank {
                // Receives from rank 2 through mappings; its sends to rank 1 go by host.
                0 => [4, 4, 0, 0],
                // Receives from rank 0 by host; its sends to rank 2 are mapped there.
                1 => [0, 4, 0, 0],
                // Receives from rank 1 mapped; its sends to rank 0 are mapped there.
                _ => [4, 0, 0, 0],
            };
            assert_eq!(c, want, "rank {rank}: (receives mapped, operations by host)");
        },
    );
}

#[test]
fn a_broken_world_releases_streams_in_ipc_operations() {
    const N: usize = 500;
    ranks(3, &["doomed"], |rank, worlds| {
        let w = worlds[0].clone();
        let st = Staging::with_device(w.clone(), HostDevice::sharing(Share::On)).unwrap();
        let stream = HostStream::new();
        let mine = data(rank, N, 0);
        let mut got = vec![0f32; N];
        match rank {
            // Receives from rank 2, which never sends.
            0 => unsafe { st.enqueue(stream, &[(p2p(false, N, 2), None, out(&mut got))]) }.unwrap(),
            // Sends to rank 2, which never receives: waits for a reply.
            1 => unsafe { st.enqueue(stream, &[(p2p(true, N, 2), dev(&mine), None)]) }.unwrap(),
            _ => {
                thread::sleep(Duration::from_millis(300));
                w.abort();
                return;
            }
        }
        let t0 = Instant::now();
        assert!(stream.synchronize(Duration::from_secs(10)), "rank {rank}: the stream still waits");
        println!("rank {rank}: stream released {:.1} ms after enqueue", t0.elapsed().as_secs_f64() * 1e3);
        let e = st.error().expect("the failure is reported");
        assert_eq!(e.kind(), ErrorKind::WorldBroken, "rank {rank}: {e}");
        st.close();
        st.join();
    });
}

#[test]
fn mismatched_ipc_messages_are_reported_and_release_both_streams() {
    // (Both ranks stay until both have checked, as `ranks` keeps them: the sender must be
    // released by the mismatch breaking the world, not by the receiver leaving.)
    ranks(2, &["w"], move |rank, worlds| {
        let st = Staging::with_device(worlds[0].clone(), HostDevice::sharing(Share::On)).unwrap();
        let stream = HostStream::new();
        let mine = data(rank, 100, 0);
        let mut got = vec![0f32; 50];
        // SAFETY: the buffers outlive the synchronize below.
        unsafe {
            if rank == 0 {
                st.enqueue(stream, &[(p2p(true, 100, 1), dev(&mine), None)]).unwrap();
            } else {
                st.enqueue(stream, &[(p2p(false, 50, 0), None, out(&mut got))]).unwrap();
            }
        }
        assert!(stream.synchronize(Duration::from_secs(10)), "rank {rank}: the stream still waits");
        let e = st.error().expect("the mismatch is reported");
        // The receiver sees both sides' calls; the sender sees its world broken.
        let want = if rank == 1 { ErrorKind::InvalidUsage } else { ErrorKind::WorldBroken };
        assert_eq!(e.kind(), want, "rank {rank}: {e}");
        if rank == 1 {
            assert!(e.to_string().contains("sends 400 bytes"), "{e}");
        }
        st.close();
        st.join();
    });
}

#[test]
fn a_failed_enqueue_releases_an_ipc_receive_waiting_for_its_go() {
    ranks(2, &["w"], |rank, worlds| {
        if rank == 1 {
            // The failed enqueue on rank 0 breaks the world for this rank too.
            let e = worlds[0].barrier().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::WorldBroken, "{e}");
            return;
        }
        // READY and the wait for GO reach the stream; then the enqueue fails.
        let device = HostDevice { fail_after: Some(2), share: Share::On, ..Default::default() };
        let st = Staging::with_device(worlds[0].clone(), device).unwrap();
        let stream = HostStream::new();
        let mut got = vec![0f32; 10];
        // SAFETY: the buffer outlives the synchronize below.
        let e = unsafe { st.enqueue(stream, &[(p2p(false, 10, 1), None, out(&mut got))]) }.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cuda, "{e}");
        assert!(stream.synchronize(Duration::from_secs(10)), "the stream still waits for GO");
    });
}

#[test]
fn batches_on_two_streams_keep_their_ipc_messages_apart() {
    // Rank 0 sends a large buffer on one stream and a small one on another, then overwrites
    // the large one on the first stream, which its send allows once the send is over. If the
    // second batch's messages went out between the first one's, the replies would cross and
    // the large send would end before the receiver had copied it.
    const BIG: usize = 8 << 20;
    const SMALL: usize = 16;
    ranks(2, &["w"], |rank, worlds| {
        let st = Staging::with_device(worlds[0].clone(), HostDevice::sharing(Share::On)).unwrap();
        let (s1, s2) = (HostStream::new(), HostStream::new());
        if rank == 0 {
            let x = vec![1.0f32; BIG];
            let y = vec![2.0f32; SMALL];
            let poison = vec![-7.0f32; BIG];
            // SAFETY: the buffers outlive the synchronizes below.
            unsafe {
                st.enqueue(s1, &[(p2p(true, BIG, 1), dev(&x), None)]).unwrap();
                st.enqueue(s2, &[(p2p(true, SMALL, 1), dev(&y), None)]).unwrap();
            }
            let overwrite = StreamCmd::FromBlock { at: 0, to: x.as_ptr() as u64, len: BIG * 4 };
            s1.tx.lock().unwrap().send(Work::Run(poison.as_ptr() as usize, vec![overwrite])).unwrap();
            assert!(s1.synchronize(Duration::from_secs(60)) && s2.synchronize(Duration::from_secs(60)));
            assert!(st.error().is_none(), "rank 0: {:?}", st.error());
        } else {
            let mut gx = vec![0f32; BIG];
            let mut gy = vec![0f32; SMALL];
            // SAFETY: as above.
            unsafe {
                st.enqueue(s1, &[(p2p(false, BIG, 0), None, out(&mut gx))]).unwrap();
                st.enqueue(s1, &[(p2p(false, SMALL, 0), None, out(&mut gy))]).unwrap();
            }
            assert!(s1.synchronize(Duration::from_secs(60)), "rank 1: the stream did not drain");
            assert!(st.error().is_none(), "rank 1: {:?}", st.error());
            let wrong = gx.iter().filter(|v| **v != 1.0).count();
            assert_eq!(wrong, 0, "rank 1: {wrong} of {BIG} values received wrong");
            assert!(gy.iter().all(|v| *v == 2.0), "rank 1: the small message");
        }
        st.close();
        st.join();
    });
}

/// Checks `got` against `want`, naming the first difference (not printing both whole).
fn same(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let wrong: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
    if let Some(&i) = wrong.first() {
        panic!(
            "{what}: {} of {} values wrong, the first at {i}: {} where {} is due",
            wrong.len(),
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// Collectives of every kind that goes through CUDA IPC, on `n` ranks whose devices share as
/// `share(rank)` says, with point-to-point messages between them; every result is checked
/// against a reference computed here. Returns each rank's counts to `check`.
fn collective_traffic(n: usize, share: fn(usize) -> Share, check: fn(usize, [u64; 4])) {
    // Not a multiple of 16 bytes, nor of the ranks: uneven chunks and the kernels' tails.
    const N: usize = 4097;
    ranks(n, &["w"], move |rank, worlds| {
        let device = HostDevice::sharing(share(rank));
        let counts = device.counts.clone();
        let st = Staging::with_device(worlds[0].clone(), device).unwrap();
        let stream = HostStream::new();
        let op = |kind, redop, count, root, in_place| desc(kind, redop, count, root, in_place);
        // Small values: products of up to 8 ranks and sums stay exact in f32.
        let small = |r: usize, len: usize, salt: usize| -> Vec<f32> {
            (0..len).map(|i| ((i * 3 + r * 5 + salt) % 7) as f32 - 3.0).collect()
        };

        let a = data(rank, N, 0);
        let mut sum = vec![0f32; N];
        let mut avg = data(rank, N, 1);
        let one = data(rank, 1, 2);
        let mut one_max = vec![0f32; 1];
        let rs_in = data(rank, n * N, 3);
        let mut rs_out = vec![0f32; N];
        let mut rs_inplace = data(rank, n * N, 4);
        let mut gathered = vec![0f32; n * N];
        let mut gathered_inplace = vec![0f32; n * N];
        gathered_inplace[rank * N..(rank + 1) * N].copy_from_slice(&data(rank, N, 5));
        let b_in = data(rank, N, 6);
        let mut bcast = vec![0f32; N];
        let mut bcast_inplace = if rank == 1 { data(1, N, 7) } else { vec![0f32; N] };
        let p_in = small(rank, N, 8);
        let mut prod = vec![0f32; N];
        let mine = data(rank, N, 9);
        let mut from_left = vec![0f32; N];
        let (right, left) = ((rank + 1) % n, (rank + n - 1) % n);
        // SAFETY: every buffer lives until the stream is synchronized below.
        unsafe {
            let go = |o: OpDesc, send, recv| st.enqueue(stream, &[(o, send, recv)]).unwrap();
            go(op(OpKind::AllReduce, ReduceOp::Sum, N, 0, false), dev(&a), out(&mut sum));
            go(op(OpKind::AllReduce, ReduceOp::Avg, N, 0, true), None, out(&mut avg));
            go(op(OpKind::AllReduce, ReduceOp::Max, 1, 0, false), dev(&one), out(&mut one_max));
            go(op(OpKind::ReduceScatter, ReduceOp::Sum, N, 0, false), dev(&rs_in), out(&mut rs_out));
            go(op(OpKind::ReduceScatter, ReduceOp::Min, N, 0, true), None, out(&mut rs_inplace));
            go(op(OpKind::AllGather, ReduceOp::Sum, N, 0, false), dev(&a), out(&mut gathered));
            go(op(OpKind::AllGather, ReduceOp::Sum, N, 0, true), None, out(&mut gathered_inplace));
            // A ring of messages between the collectives, through the same peers.
            let (send, recv) =
                ((p2p(true, N, right), dev(&mine), None), (p2p(false, N, left), None, out(&mut from_left)));
            st.enqueue(stream, &if rank % 2 == 0 { [send, recv] } else { [recv, send] }).unwrap();
            let b_send = if rank == 1 { dev(&b_in) } else { None };
            go(op(OpKind::Broadcast, ReduceOp::Sum, N, 1, false), b_send, out(&mut bcast));
            go(op(OpKind::Broadcast, ReduceOp::Sum, N, 1, true), None, out(&mut bcast_inplace));
            let p_out = if rank == 0 { out(&mut prod) } else { None };
            go(op(OpKind::Reduce, ReduceOp::Prod, N, 0, false), dev(&p_in), p_out);
        }
        assert!(stream.synchronize(Duration::from_secs(60)), "rank {rank}: the stream did not drain");
        assert!(st.error().is_none(), "rank {rank}: {:?}", st.error());

        let each = |f: &dyn Fn(usize) -> Vec<f32>| -> Vec<Vec<f32>> { (0..n).map(f).collect() };
        let fold = |v: &[Vec<f32>], g: fn(f32, f32) -> f32| -> Vec<f32> {
            (0..v[0].len()).map(|i| v[1..].iter().fold(v[0][i], |acc, x| g(acc, x[i]))).collect()
        };
        let sums = fold(&each(&|r| data(r, N, 0)), |x, y| x + y);
        same(&sum, &sums, &format!("rank {rank}: all_reduce sum"));
        let avgs: Vec<f32> = fold(&each(&|r| data(r, N, 1)), |x, y| x + y).iter().map(|x| x / n as f32).collect();
        same(&avg, &avgs, &format!("rank {rank}: in-place all_reduce avg"));
        same(&one_max, &fold(&each(&|r| data(r, 1, 2)), f32::max), &format!("rank {rank}: all_reduce of one element"));
        let chunk = |v: Vec<f32>| v[rank * N..(rank + 1) * N].to_vec();
        same(
            &rs_out,
            &fold(&each(&|r| chunk(data(r, n * N, 3))), |x, y| x + y),
            &format!("rank {rank}: reduce_scatter"),
        );
        let mins = fold(&each(&|r| chunk(data(r, n * N, 4))), f32::min);
        same(&rs_inplace[rank * N..(rank + 1) * N], &mins, &format!("rank {rank}: in-place reduce_scatter min"));
        same(&gathered, &each(&|r| data(r, N, 0)).concat(), &format!("rank {rank}: all_gather"));
        same(&gathered_inplace, &each(&|r| data(r, N, 5)).concat(), &format!("rank {rank}: in-place all_gather"));
        same(&from_left, &data(left, N, 9), &format!("rank {rank}: messages between collectives"));
        same(&bcast, &data(1, N, 6), &format!("rank {rank}: broadcast from rank 1"));
        same(&bcast_inplace, &data(1, N, 7), &format!("rank {rank}: in-place broadcast from rank 1"));
        if rank == 0 {
            same(&prod, &fold(&each(&|r| small(r, N, 8)), |x, y| x * y), "reduce prod at rank 0");
        }
        st.close();
        st.join();
        assert_eq!(counts.opened.load(Ordering::SeqCst), counts.closed.load(Ordering::SeqCst), "rank {rank}: mappings");
        check(rank, st.ipc_counts());
    });
}

/// Collectives in `collective_traffic`, and messages in its ring.
const COLLECTIVES: u64 = 10;
const RING_RECEIVES: u64 = 1;

#[test]
fn collectives_read_peers_through_ipc_mappings_and_match_the_reference() {
    for n in [2, 3, 4] {
        collective_traffic(
            n,
            |_| Share::On,
            |rank, c| {
                assert_eq!(
                    c,
                    [RING_RECEIVES, 0, COLLECTIVES, 0],
                    "rank {rank}: (p2p mapped, p2p by host, coll mapped, by host)"
                )
            },
        );
    }
}

#[test]
fn collectives_go_by_host_on_every_rank_when_one_cannot_map_or_share() {
    // Rank 1 cannot map its peers' buffers: every collective in which it reads them goes by
    // host, on every rank alike; the broadcasts from rank 1 and the reduce to rank 0 have it
    // read nothing and are mapped.
    collective_traffic(
        3,
        |rank| if rank == 1 { Share::NoOpen } else { Share::On },
        |rank, c| assert_eq!(c[2..], [3, COLLECTIVES - 3], "rank {rank}: (collectives mapped, by host)"),
    );
    // Rank 0's buffers cannot be exported: the collectives that read them go by host; the
    // broadcasts from rank 1 and the reduce to rank 0 read none of them and are mapped.
    collective_traffic(
        3,
        |rank| if rank == 0 { Share::NoExport } else { Share::On },
        |rank, c| assert_eq!(c[2..], [3, COLLECTIVES - 3], "rank {rank}: (collectives mapped, by host)"),
    );
}

#[test]
fn mismatched_ipc_collectives_are_reported_and_release_every_stream() {
    let told = Arc::new(AtomicUsize::new(0));
    let t = told.clone();
    ranks(3, &["w"], move |rank, worlds| {
        let st = Staging::with_device(worlds[0].clone(), HostDevice::sharing(Share::On)).unwrap();
        let stream = HostStream::new();
        // Rank 2 reduces 50 elements where the others reduce 100.
        let count = if rank == 2 { 50 } else { 100 };
        let a = data(rank, count, 0);
        let mut sum = vec![0f32; count];
        // SAFETY: the buffers outlive the synchronize below.
        unsafe {
            st.enqueue(stream, &[(desc(OpKind::AllReduce, ReduceOp::Sum, count, 0, false), dev(&a), out(&mut sum))])
        }
        .unwrap();
        assert!(stream.synchronize(Duration::from_secs(10)), "rank {rank}: the stream still waits");
        let e = st.error().expect("the mismatch is reported");
        // A rank that saw the other call says what differs; one whose peer saw it first may
        // see its world broken by that peer instead.
        match e.kind() {
            ErrorKind::InvalidUsage => {
                assert!(e.to_string().contains("calls all_reduce of 50") || e.to_string().contains("of 100"), "{e}");
                t.fetch_add(1, Ordering::SeqCst);
            }
            ErrorKind::WorldBroken => {}
            k => panic!("rank {rank}: {k:?}: {e}"),
        }
        st.close();
        st.join();
    });
    assert!(told.load(Ordering::SeqCst) >= 1, "no rank reported the mismatch itself");
}

#[test]
fn a_broken_world_releases_streams_in_ipc_collectives() {
    const N: usize = 5000;
    ranks(3, &["doomed"], |rank, worlds| {
        let w = worlds[0].clone();
        if rank == 2 {
            // Never calls: the others wait for its token until the world breaks.
            thread::sleep(Duration::from_millis(300));
            w.abort();
            return;
        }
        let st = Staging::with_device(w, HostDevice::sharing(Share::On)).unwrap();
        let stream = HostStream::new();
        let a = data(rank, N, 0);
        let mut sum = vec![0f32; N];
        let t0 = Instant::now();
        // SAFETY: the buffers outlive the synchronize below.
        unsafe {
            st.enqueue(stream, &[(desc(OpKind::AllReduce, ReduceOp::Sum, N, 0, false), dev(&a), out(&mut sum))])
                .unwrap();
            // A batch queued behind it is released too.
            st.enqueue(
                stream,
                &[(desc(OpKind::AllGather, ReduceOp::Sum, 1, 0, false), dev(&a[..1]), out(&mut sum[..3]))],
            )
            .unwrap();
        }
        assert!(stream.synchronize(Duration::from_secs(10)), "rank {rank}: the stream still waits");
        println!("rank {rank}: stream released {:.1} ms after enqueue", t0.elapsed().as_secs_f64() * 1e3);
        let e = st.error().expect("the failure is reported");
        assert_eq!(e.kind(), ErrorKind::WorldBroken, "rank {rank}: {e}");
        st.close();
        st.join();
    });
}

#[test]
fn a_stream_leaves_an_ipc_collective_only_once_every_peer_has_read_its_buffer() {
    // The root broadcasts a large buffer and at once overwrites it on its stream. Its own
    // part of the broadcast is nothing; had its stream left before the other rank's copy
    // through the mapping was done, that copy would read the overwritten values.
    const BIG: usize = 8 << 20;
    ranks(2, &["w"], |rank, worlds| {
        let st = Staging::with_device(worlds[0].clone(), HostDevice::sharing(Share::On)).unwrap();
        let stream = HostStream::new();
        let op = desc(OpKind::Broadcast, ReduceOp::Sum, BIG, 0, true);
        if rank == 0 {
            let x = vec![1.0f32; BIG];
            let poison = vec![-7.0f32; BIG];
            // SAFETY: the buffers outlive the synchronize below.
            unsafe { st.enqueue(stream, &[(op, None, dev(&x))]) }.unwrap();
            let overwrite = StreamCmd::FromBlock { at: 0, to: x.as_ptr() as u64, len: BIG * 4 };
            stream.tx.lock().unwrap().send(Work::Run(poison.as_ptr() as usize, vec![overwrite])).unwrap();
            assert!(stream.synchronize(Duration::from_secs(60)), "rank 0: the stream did not drain");
            // The buffer stays until the other rank is done, whatever happened.
            worlds[0].barrier().unwrap();
        } else {
            let mut got = vec![0f32; BIG];
            // SAFETY: as above.
            unsafe { st.enqueue(stream, &[(op, None, out(&mut got))]) }.unwrap();
            assert!(stream.synchronize(Duration::from_secs(60)), "rank 1: the stream did not drain");
            worlds[0].barrier().unwrap();
            let wrong = got.iter().filter(|v| **v != 1.0).count();
            assert_eq!(wrong, 0, "rank 1: {wrong} of {BIG} values received wrong");
        }
        assert!(st.error().is_none(), "rank {rank}: {:?}", st.error());
        assert_eq!(st.ipc_counts()[2], 1, "rank {rank}: the broadcast went through the mapping");
        st.close();
        st.join();
    });
}

#[test]
fn an_in_place_collective_maps_each_peer_allocation_once() {
    // In place, a peer's input and output are one buffer: one mapping of it, not two (each
    // would count against the driver's mappings, and some drivers refuse a second).
    ranks(3, &["w"], |rank, worlds| {
        let device = HostDevice::sharing(Share::On);
        let counts = device.counts.clone();
        let st = Staging::with_device(worlds[0].clone(), device).unwrap();
        let stream = HostStream::new();
        let mut buf = data(rank, 1000, 0);
        // SAFETY: the buffer outlives the synchronize below.
        unsafe { st.enqueue(stream, &[(desc(OpKind::AllReduce, ReduceOp::Sum, 1000, 0, true), None, out(&mut buf))]) }
            .unwrap();
        assert!(stream.synchronize(Duration::from_secs(30)), "rank {rank}: the stream did not drain");
        assert!(st.error().is_none(), "rank {rank}: {:?}", st.error());
        same(&buf, &(0..1000).map(|i| (0..3).map(|r| data(r, 1000, 0)[i]).sum()).collect::<Vec<f32>>(), "sum");
        assert_eq!(counts.opened.load(Ordering::SeqCst), 2, "rank {rank}: one mapping per peer");
        st.close();
        st.join();
        assert_eq!(counts.closed.load(Ordering::SeqCst), 2, "rank {rank}: every mapping closed");
    });
}

/// A page of floats: its own stand-in "allocation", which no other buffer shares.
#[repr(align(4096))]
struct Page([f32; 1024]);

#[test]
fn no_stream_leaves_a_collective_while_a_peer_still_maps_its_buffer() {
    // By host, a rank whose bytes are sent is done with its part at once (small messages
    // wait at the receiver). One rank maps a peer's buffer and is slow to unmap it; another
    // rank cannot share or map, so the operation goes by host. No rank's stream may leave
    // while a peer still maps its buffer: its caller may free the buffer then.
    // A broadcast from rank 0: rank 1 maps rank 0's buffer; rank 2 cannot map.
    // A reduce to rank 0: rank 0 maps rank 1's buffer; rank 2's cannot be shared.
    for (kind, slow, odd) in [(OpKind::Broadcast, 1, Share::NoOpen), (OpKind::Reduce, 0, Share::NoExport)] {
        ranks(3, &["w"], move |rank, worlds| {
            let share = if rank == 2 { odd } else { Share::On };
            let slow_close = (rank == slow).then_some(Duration::from_millis(300));
            let device = HostDevice { share, slow_close, ..Default::default() };
            let st = Staging::with_device(worlds[0].clone(), device).unwrap();
            let stream = HostStream::new();
            let mut buf = Box::new(Page([rank as f32; 1024]));
            let op = (desc(kind, ReduceOp::Sum, 1024, 0, true), None, out(&mut buf.0));
            // SAFETY: the buffer outlives the synchronize below.
            unsafe { st.enqueue(stream, &[op]) }.unwrap();
            assert!(stream.synchronize(Duration::from_secs(30)), "rank {rank}: the stream did not drain");
            let page = buf.0.as_ptr() as u64;
            let still = MAPPED.lock().unwrap().iter().filter(|m| **m == page).count();
            assert_eq!(still, 0, "rank {rank}, {kind:?}: the stream left while a peer still mapped its buffer");
            assert!(st.error().is_none(), "rank {rank}: {:?}", st.error());
            assert_eq!(st.ipc_counts()[2..], [0, 1], "rank {rank}: (collectives mapped, by host)");
            let want = if kind == OpKind::Reduce { 3.0 } else { 0.0 };
            if rank == 0 || kind == OpKind::Broadcast {
                assert!(buf.0.iter().all(|v| *v == want), "rank {rank}, {kind:?}: result");
            }
            st.close();
            st.join();
        });
    }
}

#[test]
fn ipc_collectives_on_two_streams_and_a_failed_enqueue() {
    const N: usize = 3000;
    ranks(2, &["w"], |rank, worlds| {
        let st = Staging::with_device(worlds[0].clone(), HostDevice::sharing(Share::On)).unwrap();
        let (s1, s2) = (HostStream::new(), HostStream::new());
        let a = data(rank, N, 0);
        let b = data(rank, N, 1);
        let (mut sum, mut all) = (vec![0f32; N], vec![0f32; 2 * N]);
        // SAFETY: the buffers outlive the synchronizes below.
        unsafe {
            st.enqueue(s1, &[(desc(OpKind::AllReduce, ReduceOp::Sum, N, 0, false), dev(&a), out(&mut sum))]).unwrap();
            st.enqueue(s2, &[(desc(OpKind::AllGather, ReduceOp::Sum, N, 0, false), dev(&b), out(&mut all))]).unwrap();
        }
        assert!(s1.synchronize(Duration::from_secs(30)) && s2.synchronize(Duration::from_secs(30)));
        assert!(st.error().is_none(), "rank {rank}: {:?}", st.error());
        same(&sum, &(0..N).map(|i| data(0, N, 0)[i] + data(1, N, 0)[i]).collect::<Vec<_>>(), "all_reduce on stream 1");
        same(&all, &[data(0, N, 1), data(1, N, 1)].concat(), "all_gather on stream 2");
        assert_eq!(st.ipc_counts()[2], 2, "rank {rank}: both through mappings");
        st.close();
        st.join();
    });
    // An enqueue that fails after the wait for GO1 reached the stream: the stream is released
    // and the peer's collective fails with the world.
    ranks(2, &["w"], |rank, worlds| {
        let fail_after = (rank == 0).then_some(3);
        let st =
            Staging::with_device(worlds[0].clone(), HostDevice { fail_after, share: Share::On, ..Default::default() })
                .unwrap();
        let stream = HostStream::new();
        let a = data(rank, N, 0);
        let mut sum = vec![0f32; N];
        // SAFETY: the buffers outlive the synchronize below.
        let r = unsafe {
            st.enqueue(stream, &[(desc(OpKind::AllReduce, ReduceOp::Sum, N, 0, false), dev(&a), out(&mut sum))])
        };
        assert!(stream.synchronize(Duration::from_secs(10)), "rank {rank}: the stream still waits");
        if rank == 0 {
            assert_eq!(r.unwrap_err().kind(), ErrorKind::Cuda);
        } else {
            // Refused at once if rank 0 already broke the world, else failed on the stream.
            let e = r.err().or_else(|| st.error());
            assert_eq!(e.map(|e| e.kind()), Some(ErrorKind::WorldBroken), "rank 1");
        }
        st.close();
        st.join();
    });
}

/// Not a test: a measurement of the stager's own cost on the stand-in device, whose streams
/// poll their flags as a GPU does. Run by hand:
/// `cargo test --release --features cuda --lib stager_latency -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, run by hand"]
fn stager_latency_on_the_stand_in() {
    const ITERS: usize = 200;
    for share in [Share::Off, Share::On] {
        ranks(2, &["w"], move |rank, worlds| {
            let st = Staging::with_device(worlds[0].clone(), HostDevice::sharing(share)).unwrap();
            let stream = HostStream::new();
            let peer = 1 - rank;
            let x = data(rank, 2, 0);
            let mut y = [0f32; 2];
            let a = data(rank, 1024, 1);
            let mut sum = vec![0f32; 1024];
            let (y, sum) = (y.as_mut_ptr() as u64, sum.as_mut_ptr() as u64);
            // Microseconds per iteration of `step`, after a warm-up.
            let time = |step: &dyn Fn()| {
                (0..20).for_each(|_| step());
                let t = Instant::now();
                (0..ITERS).for_each(|_| step());
                t.elapsed().as_secs_f64() / ITERS as f64 * 1e6
            };
            // SAFETY (both steps): the buffers outlive the synchronize that ends each step.
            let exchange = time(&|| {
                let send = (p2p(true, 2, peer), dev(&x), None);
                let recv = (p2p(false, 2, peer), None, Some((y, 8)));
                let order = if rank == 0 { [send, recv] } else { [recv, send] };
                order.iter().for_each(|op| unsafe { st.enqueue(stream, &[*op]) }.unwrap());
                assert!(stream.synchronize(Duration::from_secs(10)));
            });
            let all_reduce = time(&|| {
                let op = (desc(OpKind::AllReduce, ReduceOp::Sum, 1024, 0, false), dev(&a), Some((sum, 4096)));
                unsafe { st.enqueue(stream, &[op]) }.unwrap();
                assert!(stream.synchronize(Duration::from_secs(10)));
            });
            assert!(st.error().is_none(), "{:?}", st.error());
            if rank == 0 {
                let path = if share == Share::On { "CUDA IPC" } else { "staged" };
                println!(
                    "{path:>8}: 8-byte send then receive {exchange:7.1} us   4 KiB all_reduce {all_reduce:7.1} us"
                );
            }
            st.close();
            st.join();
        });
    }
}
