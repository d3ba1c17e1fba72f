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
        }
    }
}

/// The stand-in device. `fail_after`: a submit puts that many commands on the stream, then
/// fails (as a CUDA call failing half-way through an enqueue would).
#[derive(Default)]
struct HostDevice {
    fail_after: Option<usize>,
    live: Arc<AtomicUsize>,
}

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
