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
use crate::error::ErrorKind;
use crate::types::{DataType, ReduceOp};
use crate::wire::OpKind;
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
                }
            }
        });
        Box::leak(Box::new(HostStream { tx: Mutex::new(tx) }))
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
            StreamCmd::WaitFor { at: o, value } => {
                while std::ptr::read_volatile(at(o) as *const u32) < value {
                    thread::sleep(Duration::from_micros(50));
                }
                std::sync::atomic::fence(Ordering::SeqCst);
            }
            StreamCmd::CopyAsTold { at: o, max } => {
                let w = |k: usize| std::ptr::read_volatile((base + o + 8 * k) as *const u64);
                let (src, dst, len) = (w(0), w(1), w(2) as usize);
                assert!(len <= max, "told to copy {len} bytes, at most {max} planned");
                if len > 0 {
                    std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len);
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

/// The stand-in device. `fail_after`: a submit puts that many commands on the stream, then
/// fails (as a CUDA call failing half-way through an enqueue would).
#[derive(Default)]
struct HostDevice {
    fail_after: Option<usize>,
    share: Share,
    live: Arc<AtomicUsize>,
    counts: Arc<Counts>,
}

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
        // The tests' buffers are far smaller than this "allocation".
        Ok((u64::from_le_bytes(handle[..8].try_into().unwrap()), 1 << 40))
    }

    fn close(&self, _: CUdeviceptr) {
        self.counts.closed.fetch_add(1, Ordering::SeqCst);
    }
}

/// Runs `f(rank, worlds)` on `n` threads, each rank with its own manager and the worlds
/// `names` formed among them.
fn ranks(n: usize, names: &[&str], f: impl Fn(usize, Vec<World>) + Send + Sync + 'static) {
    let ids: Vec<UniqueId> = names.iter().map(|_| UniqueId::new().unwrap()).collect();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let f = Arc::new(f);
    let threads: Vec<_> = (0..n)
        .map(|r| {
            let (ids, names, f) = (ids.clone(), names.clone(), f.clone());
            thread::spawn(move || {
                let m = WorldManager::new();
                let worlds = names.iter().zip(&ids).map(|(name, id)| m.init_world(name, id, r, n).unwrap()).collect();
                f(r, worlds);
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
fn p2p_traffic(n: usize, share: fn(usize) -> Share, check: fn(usize, (u64, u64))) {
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
            |rank, c| assert_eq!(c, (4, 0), "rank {rank}: (receives mapped, operations by host)"),
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
                0 => (4, 4),
                // Receives from rank 0 by host; its sends to rank 2 are mapped there.
                1 => (0, 4),
                // Receives from rank 1 mapped; its sends to rank 0 are mapped there.
                _ => (4, 0),
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
    // Both ranks stay until both have checked: the sender must be released by the mismatch
    // breaking the world, not by the receiver leaving.
    let both = Arc::new(AtomicUsize::new(0));
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
        // Meet the other rank (bounded: a rank that failed must not hang this one).
        both.fetch_add(1, Ordering::SeqCst);
        let t = Instant::now();
        while both.load(Ordering::SeqCst) < 2 && t.elapsed() < Duration::from_secs(20) {
            thread::sleep(Duration::from_millis(1));
        }
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
