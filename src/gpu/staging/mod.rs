//! Running a world's operations on device buffers from a CUDA stream, through pinned host
//! memory, so that the stream never waits on anything a peer could withhold (feature `cuda`).
//!
//! A *batch* (one operation, or the operations of a group) takes one staging block of mapped
//! pinned memory. On the stream, the batch is: copy each input from its device buffer into the
//! block; write `READY`; wait until `DONE` is set; copy each output back; write `FINISHED`. A
//! host thread per [`Staging`] (the stager) sees `READY`, posts the batch to the world on the
//! block's memory — the world's engine then runs it over its transports, as for host buffers —
//! and writes `DONE` when the batch completes **or fails**. The stream only ever waits on a flag
//! that this process's own thread writes, whatever the peers do: a dead, hung or cut-off peer
//! breaks the world, the batch fails, the flag is written, and the stream moves on. The error
//! is kept for the caller ([`Staging::error`]); the device output of a failed batch is
//! unspecified, as on the host.
//!
//! Both the Rust API ([`crate::DeviceWorld`], cudarc buffers) and the C API (raw device
//! pointers and a `CUstream`) enqueue through here.
//!
//! What the stream does for a batch is written once, as a list of [`StreamCmd`]s, and handed
//! to a [`Device`], which turns each into its own call: [`CudaDevice`] into CUDA driver calls.
//! The tests run the same batches on a stand-in device whose "stream" is a host thread, so the
//! stager's logic — ordering, failure, release — is checked on machines without a GPU.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::task::{Wake, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::sys::{self, CUdeviceptr, CUstream};

use crate::api::error::{Error, Result};
use crate::api::request::Completion;
use crate::api::types::DataType;
use crate::api::world::{World, WorldState};
use crate::coll::OpDesc;
use crate::gpu::cuda::{check, check_device_buffer, check_not_capturing, Current, Pinned, RawContext};
use crate::sys::buf::RawBuf;
use crate::sys::sync::{fence, lock, wait_timeout, Arc, AtomicBool, AtomicU64, Condvar, Mutex, Ordering};
use crate::transport::TransportKind;

mod cuda_device;
mod cuda_ipc;
pub(crate) use cuda_device::{CudaDevice, HANDLE_LEN};
mod ipc_coll;
use cuda_ipc::IpcOp;
use ipc_coll::IpcColl;

/// Flag words at the start of each staging block; the data follows from `DATA`.
const READY: usize = 0;
const DONE: usize = 4;
const FINISHED: usize = 8;
const DATA: usize = 64;
/// Values of the done flag; the stream waits for either (`>= DONE_OK`).
const DONE_OK: u32 = 1;
const DONE_FAILED: u32 = 2;
/// Alignment of each buffer inside a block (keeps the host reductions on aligned data).
const ALIGN: usize = 64;

/// One operation to stage: its descriptor and its device input and output (address, bytes),
/// laid out as [`OpDesc::buffer_bytes`] says (in place: no input, the output holds it).
pub(crate) type DeviceOp = (OpDesc, Option<(CUdeviceptr, usize)>, Option<(CUdeviceptr, usize)>);

/// One step of a batch on the stream. Offsets are into the batch's block; addresses are the
/// device buffers the caller passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamCmd {
    /// Copy `len` bytes from the device buffer at `from` into the block at `at`.
    ToBlock { from: CUdeviceptr, at: usize, len: usize },
    /// Copy `len` bytes from the block at `at` into the device buffer at `to`.
    FromBlock { at: usize, to: CUdeviceptr, len: usize },
    /// Set the flag word at `at` to 1, after everything before it on the stream.
    Raise { at: usize },
    /// Hold the stream until the flag word at `at` is at least `value`.
    WaitFor { at: usize, value: u32 },
    /// Copy what `count` descriptors from `at` on say when the stream gets there, one after
    /// the other: three words each, source, destination, bytes (at most `max`; zero: nothing),
    /// as the stager wrote them before releasing the stream to this point. For addresses known
    /// only then: a peer's buffer mapped through CUDA IPC (`cuda_ipc.rs`, `ipc_coll.rs`).
    CopyAsTold { at: usize, count: usize, max: usize },
    /// Combine elements of `dtype` as the descriptor at `at` says when the stream gets there
    /// (destination, elements — at most `max`, zero: nothing — sources, reduction, divisor,
    /// source addresses: `cuda/kernels.cu`'s `mw_combine_told`), written as for `CopyAsTold`.
    CombineAsTold { at: usize, dtype: DataType, max: usize },
}

/// Memory that both this process and a device's streams reach: a batch's block.
pub(crate) trait Block: Send + 'static {
    /// The block's first byte, as this process sees it.
    fn host_ptr(&self) -> *mut u8;
    /// The block's first byte, as the device's kernels see it.
    fn dev_ptr(&self) -> CUdeviceptr;
    fn len(&self) -> usize;
}

impl Block for Pinned {
    fn host_ptr(&self) -> *mut u8 {
        Pinned::host_ptr(self)
    }
    fn dev_ptr(&self) -> CUdeviceptr {
        Pinned::dev_ptr(self)
    }
    fn len(&self) -> usize {
        Pinned::len(self)
    }
}

/// What staging needs of a device: its blocks, checks of the caller's buffers and streams,
/// and a way to put a batch's commands on a stream.
pub(crate) trait Device: Send + Sync + 'static {
    /// A stream, as callers name it.
    type Stream: Copy;
    type Block: Block;
    /// Held while a batch is being enqueued (for CUDA: the context made current).
    type Entered;
    fn enter(&self) -> Result<Self::Entered>;
    /// Refuses a buffer that is not this device's memory.
    fn check_buffer(&self, what: &str, addr: CUdeviceptr, len: usize) -> Result<()>;
    /// Refuses a stream that cannot take a staged batch.
    ///
    /// # Safety
    /// `stream` is one of this device's streams.
    unsafe fn check_stream(&self, stream: Self::Stream) -> Result<()>;
    /// A new block of at least `len` bytes.
    fn alloc(&self, len: usize) -> Result<Self::Block>;
    /// Puts `cmds` on `stream`, in order. On an error some of them may be on the stream.
    ///
    /// # Safety
    /// As [`Staging::enqueue`]; `block` stays alive until the stream has run the commands.
    unsafe fn submit(&self, stream: Self::Stream, block: &Self::Block, cmds: &[StreamCmd]) -> Result<()>;

    // What the CUDA IPC path (`cuda_ipc.rs`) needs; the stager calls these inside `enter`.

    /// Whether operations with peers on this host go through CUDA IPC.
    fn can_share(&self) -> bool;
    /// What a peer process needs to map the allocation holding `addr`: a handle and the offset
    /// of `addr` in the allocation. `None` when it cannot be shared.
    fn export(&self, addr: CUdeviceptr) -> Option<([u8; HANDLE_LEN], u64)>;
    /// Maps a peer's allocation; returns its base address here and its size.
    fn open(&self, handle: &[u8; HANDLE_LEN]) -> Result<(CUdeviceptr, usize)>;
    /// Unmaps what [`Device::open`] mapped, once no stream uses it.
    fn close(&self, base: CUdeviceptr);
}

// SAFETY: the module and function handles belong to the context, usable from any thread
// that makes it current; they are only read after `new`.
// SAFETY: as above.
/// Where a staged batch stands.
enum Stage {
    /// Enqueued; the stream has not raised `READY` yet.
    Waiting,
    /// The world runs it.
    Running(Vec<Arc<Completion>>),
    /// `DONE` written; waiting for the stream to copy the results out.
    Releasing,
}

/// One operation's place in a block: its descriptor and the offsets and lengths of its input
/// and output.
struct Slot {
    desc: OpDesc,
    send: (usize, usize),
    recv: (usize, usize),
    /// Moved by the CUDA IPC path (its place is in `Batch::ipc`), not staged.
    ipc: bool,
}

struct Batch<B> {
    block: B,
    slots: Vec<Slot>,
    stage: Stage,
    /// The batch's point-to-point operations that go through CUDA IPC, in batch order.
    ipc: Vec<IpcOp>,
    /// The batch's collective, if it goes through CUDA IPC (then it is the batch's only
    /// operation).
    coll: Option<IpcColl>,
    /// Every message posted for `ipc` and `coll`: the block is reused only once all of them
    /// have ended.
    messages: Vec<Arc<Completion>>,
}

impl<B: Block> Batch<B> {
    fn flag(&self, at: usize) -> u32 {
        read_flag(self.block.host_ptr(), at)
    }

    fn set_done(&self, v: u32) {
        self.set_flag(DONE, v);
    }

    fn set_flag(&self, at: usize, v: u32) {
        write_flag(self.block.host_ptr(), at, v)
    }

    /// Every message of its CUDA IPC operations has been posted: a later batch may post its
    /// own (their order per peer is what the other side relies on).
    fn all_posted(&self) -> bool {
        self.ipc.iter().all(|o| o.all_posted()) && self.coll.as_ref().is_none_or(|c| c.all_posted())
    }
}

/// Reads a flag word of the block at `base`, which the device writes through its mapping.
fn read_flag(base: *mut u8, at: usize) -> u32 {
    // SAFETY: callers pass flag offsets of a batch's layout, aligned u32s inside its block;
    // the device writes them, hence the volatile read.
    let v = unsafe { std::ptr::read_volatile(base.add(at) as *const u32) };
    // What the device wrote before the flag is read after it (weakly ordered hosts).
    fence(Ordering::Acquire);
    v
}

/// Reads a u64 word of a control area in the block at `base` (a message or a descriptor).
fn get(base: *mut u8, at: usize) -> u64 {
    // Messages land before their completion is seen: a plain read after an acquire will do.
    fence(Ordering::Acquire);
    // SAFETY: callers pass offsets of words inside a batch's block.
    unsafe { std::ptr::read_unaligned(base.add(at) as *const u64) }
}

/// Writes a u64 word of a control area; the stream reads such words only after a flag
/// written later (`write_flag`).
fn put(base: *mut u8, at: usize, v: u64) {
    // SAFETY: as in `get`.
    unsafe { std::ptr::write_unaligned(base.add(at) as *mut u64, v) };
}

/// Bytes of one copy descriptor: source, destination, bytes (u64 each), as `mw_copy_told`
/// reads them.
const COPY_LEN: usize = 24;

/// Writes copy descriptors from `at` on, for `StreamCmd::CopyAsTold`; one not written stays
/// zero (cleared at enqueue): nothing to copy.
fn tell_copies(base: *mut u8, at: usize, copies: &[(CUdeviceptr, CUdeviceptr, u64)]) {
    for (k, (from, to, len)) in copies.iter().enumerate() {
        put(base, at + k * COPY_LEN, *from);
        put(base, at + k * COPY_LEN + 8, *to);
        put(base, at + k * COPY_LEN + 16, *len);
    }
}

/// Writes a flag word that a stream waits on.
fn write_flag(base: *mut u8, at: usize, v: u32) {
    // What the stream reads once released (results, descriptors) is written before.
    fence(Ordering::SeqCst);
    // SAFETY: as in `read_flag`.
    unsafe { std::ptr::write_volatile(base.add(at) as *mut u32, v) };
}

/// Stages one world's operations from streams of one device (for CUDA: of one context).
pub(crate) struct Staging<D: Device = CudaDevice> {
    world: World,
    /// Held from an enqueue's first stream call until its batch joins `pending`, so that
    /// `pending` is in the order the stream runs the batches.
    enqueue: Mutex<()>,
    /// Batches on the stream, in stream order.
    pending: Mutex<VecDeque<Batch<D::Block>>>,
    /// Blocks no stream uses any more. They are freed only when the staging goes (freeing
    /// pinned memory may wait for the whole device, including streams that wait on a stager),
    /// so the pool holds as much as was ever in flight at once.
    pool: Mutex<Vec<D::Block>>,
    /// The first error of a batch, reported to the caller.
    error: Mutex<Option<Error>>,
    /// Set (under `enqueue`) when the owner goes: no more batches; the stager exits once the
    /// streams are done with the ones it has.
    closed: AtomicBool,
    /// Rung by enqueues and by the completion of anything the stager posted (for the stager),
    /// and by the stager when batches move (for waiters).
    bell: Arc<Bell>,
    /// Rings `bell`; registered with every completion the stager waits for.
    waker: Waker,
    stager: Mutex<Option<JoinHandle<()>>>,
    /// Per rank: whether point-to-point operations with it go through CUDA IPC (a peer on
    /// this host, and a device that shares: for CUDA, with `MW_DEVICE_IPC=1`).
    shares: Vec<bool>,
    /// CUDA IPC operations so far: receives copied through a mapping, and operations (either
    /// side) whose bytes went by host; collectives run through mappings, and by host.
    ipc_mapped: AtomicU64,
    ipc_by_host: AtomicU64,
    coll_mapped: AtomicU64,
    coll_by_host: AtomicU64,
    /// Declared last, dropped last: the device outlives the blocks.
    device: D,
}

impl Staging<CudaDevice> {
    /// Starts staging `world`'s operations from streams of `ctx`; `keep` holds the context
    /// alive where cudarc owns it (a C caller keeps its own context alive).
    pub(crate) fn start(
        world: World,
        ctx: RawContext,
        keep: Option<Arc<cudarc::driver::CudaContext>>,
    ) -> Result<Arc<Staging>> {
        crate::gpu::cuda::driver_present()?;
        Staging::with_device(world, CudaDevice::new(ctx, keep)?)
    }

    pub(crate) fn context(&self) -> RawContext {
        self.device.ctx
    }
}

impl<D: Device> Staging<D> {
    /// Starts staging `world`'s operations on `device`'s streams: the stager thread starts.
    pub(crate) fn with_device(world: World, device: D) -> Result<Arc<Staging<D>>> {
        let on = device.can_share();
        let bell = Arc::new(Bell { cv: Condvar::new(), rung: AtomicBool::new(false) });
        let shares = world.transports().iter().map(|t| on && *t == Some(TransportKind::Shm)).collect();
        let staging = Arc::new(Staging {
            shares,
            ipc_mapped: AtomicU64::new(0),
            ipc_by_host: AtomicU64::new(0),
            coll_mapped: AtomicU64::new(0),
            coll_by_host: AtomicU64::new(0),
            world,
            enqueue: Mutex::new(()),
            pending: Mutex::new(VecDeque::new()),
            pool: Mutex::new(Vec::new()),
            error: Mutex::new(None),
            closed: AtomicBool::new(false),
            bell: bell.clone(),
            waker: Waker::from(bell),
            stager: Mutex::new(None),
            device,
        });
        let s = staging.clone();
        let handle = std::thread::Builder::new()
            .name(format!("mw-dev-{}", staging.world.name().chars().take(8).collect::<String>()))
            .spawn(move || s.run())
            .map_err(|e| Error::system("spawning a device staging thread", e))?;
        *lock(&staging.stager) = Some(handle);
        Ok(staging)
    }

    pub(crate) fn world(&self) -> &World {
        &self.world
    }

    /// CUDA IPC operations so far: (receives copied through a mapping, point-to-point
    /// operations whose bytes went by host, collectives through mappings, collectives by host).
    pub(crate) fn ipc_counts(&self) -> [u64; 4] {
        [&self.ipc_mapped, &self.ipc_by_host, &self.coll_mapped, &self.coll_by_host].map(|c| c.load(Ordering::Relaxed))
    }

    fn count_coll(&self, mapped: bool) {
        let c = if mapped { &self.coll_mapped } else { &self.coll_by_host };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn count_mapped(&self) {
        self.ipc_mapped.fetch_add(1, Ordering::Relaxed);
    }

    fn count_by_host(&self) {
        self.ipc_by_host.fetch_add(1, Ordering::Relaxed);
    }

    /// The first error of a batch that already ran, if any.
    pub(crate) fn error(&self) -> Option<Error> {
        lock(&self.error).clone()
    }

    /// Takes no more batches, and lets the stager exit once the streams are done with the
    /// ones it has.
    pub(crate) fn close(&self) {
        let _order = lock(&self.enqueue);
        self.closed.store(true, Ordering::Release);
        // Rung under the stager's lock, so that it is either in a pass (and sees `closed`) or
        // already waiting (and wakes).
        let _pending = lock(&self.pending);
        self.bell.ring();
    }

    /// Closes the staging and lets it go without waiting: what can take long (batches still
    /// to run on their streams, the streams getting past them) happens on a thread of its own,
    /// which then calls `leave` (the world's removal) and waits for the stager to free every
    /// block. `abort` fails the batches not yet done (the caller has aborted the world);
    /// without it they run first, as a communicator's destroy lets them.
    pub(crate) fn release_in_background(self: &Arc<Self>, abort: bool, leave: impl FnOnce() + Send + 'static) {
        if abort {
            self.close();
        }
        let me = self.clone();
        let work = move || {
            if !abort {
                me.drain();
                me.close();
            }
            leave();
            me.join();
        };
        crate::sys::on_own_thread("mw-release", work);
    }

    /// Waits for the stager to exit (after [`Staging::close`]): every block is then freed.
    /// Bounded by the streams reaching the batches they hold; a world that broke or was
    /// removed releases them at once.
    pub(crate) fn join(&self) {
        let handle = lock(&self.stager).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Waits until every batch enqueued so far has been posted to the world (or failed), so
    /// that an operation posted next comes after them in the world's order on every rank.
    pub(crate) fn wait_posted(&self) {
        self.wait_until(|b| match b.stage {
            Stage::Waiting => false,
            Stage::Running(_) => b.all_posted(),
            Stage::Releasing => true,
        });
    }

    /// Waits until every batch enqueued so far has completed (or failed).
    pub(crate) fn drain(&self) {
        self.wait_until(|b| matches!(b.stage, Stage::Releasing));
    }

    fn wait_until(&self, done: impl Fn(&Batch<D::Block>) -> bool) {
        let mut pending = lock(&self.pending);
        while !pending.iter().all(&done) {
            pending = wait_timeout(&self.bell.cv, pending, Duration::from_millis(1));
        }
    }

    /// Enqueues `ops` as one batch on `stream`. The world runs them together, as a group.
    ///
    /// # Safety
    /// `stream` belongs to this staging's device (for CUDA: its context); each address is
    /// device memory of at least its length, valid until the stream has run the batch.
    pub(crate) unsafe fn enqueue(&self, stream: D::Stream, ops: &[DeviceOp]) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        if let Some(e) = self.error() {
            return Err(e);
        }
        if !matches!(self.world.state(), WorldState::Ready) {
            return Err(unusable(&self.world));
        }
        if ops.is_empty() {
            return Ok(());
        }
        let mut off = DATA;
        let mut place = |len: usize| -> Result<(usize, usize)> {
            let at = off;
            off = len
                .checked_next_multiple_of(ALIGN)
                .and_then(|l| off.checked_add(l))
                .ok_or_else(|| Error::invalid_arg("the operations' buffers do not fit in memory"))?;
            Ok((at, len))
        };
        let mut slots = Vec::with_capacity(ops.len());
        let mut ipc = Vec::new();
        let mut coll = None;
        for op in ops {
            let (desc, send, recv) = op;
            let name = desc.kind.name();
            for (p, n) in send.iter().chain(recv) {
                self.device.check_buffer(name, *p, *n)?;
            }
            let (rank, alone) = (self.world.rank(), ops.len() == 1);
            if let Some(c) = IpcColl::plan(op, alone, rank, &self.shares, &mut place)? {
                slots.push(Slot { desc: *desc, send: (DATA, 0), recv: (DATA, 0), ipc: true });
                coll = Some(c);
                continue;
            }
            if let Some(op) = IpcOp::plan(desc, *send, *recv, &self.shares, &mut place)? {
                slots.push(Slot { desc: *desc, send: (DATA, 0), recv: (DATA, 0), ipc: true });
                ipc.push(op);
                continue;
            }
            slots.push(Slot {
                desc: *desc,
                send: place(send.map_or(0, |s| s.1))?,
                recv: place(recv.map_or(0, |r| r.1))?,
                ipc: false,
            });
        }
        let _order = lock(&self.enqueue);
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        let _entered = self.device.enter()?;
        // SAFETY: the caller's promise about the stream.
        unsafe { self.device.check_stream(stream) }?;
        let block = self.take_block(off)?;
        for op in &ipc {
            op.clear(block.host_ptr());
        }
        if let Some(c) = &coll {
            c.clear(block.host_ptr());
        }
        let batch = Batch { block, slots, stage: Stage::Waiting, ipc, coll, messages: Vec::new() };
        let cmds = program(&batch, ops);
        // SAFETY: the caller's promises, passed on; the block stays alive (pooled, or leaked
        // below) until the stream has run the commands.
        match unsafe { self.device.submit(stream, &batch.block, &cmds) } {
            Ok(()) => {
                lock(&self.pending).push_back(batch);
                self.bell.ring();
                Ok(())
            }
            Err(e) => {
                // Part of the batch may be on the stream: release any wait, and keep the block
                // out of reuse and unfreed (the stream may still write it). This rank cannot
                // take part in what the peers run, so the world breaks rather than leave them
                // waiting.
                cuda_ipc::release(&batch);
                ipc_coll::release(&batch);
                batch.set_done(DONE_FAILED);
                std::mem::forget(batch.block);
                lock(&self.error).get_or_insert(e.clone());
                self.world.abort();
                Err(e)
            }
        }
    }

    /// The stager: posts batches in stream order as their `READY` appears, writes `DONE` as
    /// they end, and returns blocks to the pool as their `FINISHED` appears. A panic in a pass
    /// fails the outstanding batches (so no stream waits on a thread that is gone) and the
    /// stager goes on draining.
    fn run(&self) {
        let mut last_moved = Instant::now();
        loop {
            // Flags written by the GPU raise no event: shortly after anything moved, when the
            // next flag is likely close, look again at once (yielding the core); otherwise nap.
            let spin = last_moved.elapsed() < SPIN;
            match catch_unwind(AssertUnwindSafe(|| self.pass(spin))) {
                Ok(Pass::Done) => break,
                Ok(Pass::Moved) => last_moved = Instant::now(),
                Ok(Pass::Still) => {}
                Err(_) => {
                    let mut pending = lock(&self.pending);
                    for b in pending.iter_mut().filter(|b| !matches!(b.stage, Stage::Releasing)) {
                        self.fail(b, Error::internal("the device staging thread panicked"));
                    }
                }
            }
        }
        // No stream uses any block now: free them here, not on a caller's thread.
        lock(&self.pool).clear();
    }

    /// One pass over the batches, then, if nothing moved, a yield (`spin`) or a nap.
    fn pass(&self, spin: bool) -> Pass {
        let mut moved = false;
        let mut pending = lock(&self.pending);
        let usable = matches!(self.world.state(), WorldState::Ready);
        // Batches are posted in stream order: none before the ones ahead of it.
        let mut in_order = true;
        for b in pending.iter_mut() {
            match &b.stage {
                Stage::Waiting if !in_order => {}
                Stage::Waiting if !usable => {
                    self.fail(b, unusable(&self.world));
                    moved = true;
                }
                Stage::Waiting if b.flag(READY) == 1 => {
                    self.post(b);
                    moved = true;
                }
                Stage::Waiting => in_order = false,
                Stage::Running(_) => match self.advance(b) {
                    Ok(m) => moved |= m,
                    Err(e) => {
                        self.fail(b, e);
                        moved = true;
                    }
                },
                Stage::Releasing => {}
            }
            // A batch on another stream of this world may reach `READY` before an earlier
            // one is done; it is posted only once every earlier batch has posted all its CUDA
            // IPC messages, whose order per peer the other side relies on (`cuda_ipc.rs`).
            if matches!(b.stage, Stage::Running(_)) && !b.all_posted() {
                in_order = false;
            }
        }
        // Blocks the stream has finished with go back to the pool, in order; peer allocations
        // still mapped (a failed batch's) are unmapped.
        while pending.front().is_some_and(|b| {
            matches!(b.stage, Stage::Releasing) && b.flag(FINISHED) == 1 && b.messages.iter().all(|c| c.is_done())
        }) {
            if let Some(b) = pending.pop_front() {
                let coll_mapped = b.coll.iter().flat_map(|c| c.mappings.iter().copied());
                let mapped: Vec<_> = b.ipc.iter().filter_map(|o| o.mapping).chain(coll_mapped).collect();
                if !mapped.is_empty() {
                    if let Ok(_entered) = self.device.enter() {
                        mapped.into_iter().for_each(|m| self.device.close(m));
                    }
                }
                lock(&self.pool).push(b.block);
                moved = true;
            }
        }
        if pending.is_empty() && self.closed.load(Ordering::Acquire) {
            return Pass::Done;
        }
        // A completion that came during the pass rang too early to wake a nap: pass again.
        let rung = self.bell.rung.swap(false, Ordering::AcqRel);
        if moved {
            self.bell.cv.notify_all();
            return Pass::Moved;
        }
        if !rung {
            if spin && !pending.is_empty() {
                drop(pending);
                std::thread::yield_now();
            } else {
                // While batches are outstanding, look at the GPU's flags again shortly;
                // otherwise sleep until an enqueue or a completion rings.
                let nap = if pending.is_empty() { Duration::from_millis(100) } else { Duration::from_micros(50) };
                drop(wait_timeout(&self.bell.cv, pending, nap));
            }
        }
        Pass::Still
    }

    /// Posts a batch whose inputs are in its block.
    fn post(&self, b: &mut Batch<D::Block>) {
        let base = b.block.host_ptr();
        let ops: Vec<_> = b
            .slots
            .iter()
            .filter(|s| !s.ipc)
            .map(|s| {
                // SAFETY: both views lie inside the pinned block, which stays alive (and
                // untouched by the stream, which waits on DONE) until the batch completes.
                unsafe {
                    (
                        s.desc,
                        RawBuf::from_raw(base.wrapping_add(s.send.0), s.send.1, false),
                        RawBuf::from_raw(base.wrapping_add(s.recv.0), s.recv.1, true),
                    )
                }
            })
            .collect();
        if ops.is_empty() {
            b.stage = Stage::Running(Vec::new());
        } else {
            // SAFETY: as above.
            match unsafe { self.post_watched(ops) } {
                Ok(c) => b.stage = Stage::Running(c),
                Err(e) => return self.fail(b, e),
            }
        }
        if let Err(e) = self.advance(b) {
            self.fail(b, e);
        }
    }

    /// Moves a running batch on: its CUDA IPC operations, then, when everything has
    /// completed, `DONE`. True if anything moved.
    fn advance(&self, b: &mut Batch<D::Block>) -> Result<bool> {
        // A failed message fails the batch (the IPC paths count a message only when it
        // succeeded).
        if let Some(e) = b.messages.iter().find_map(|c| c.result().and_then(|r| r.err())) {
            return Err(e);
        }
        let mut moved = if b.ipc.is_empty() { false } else { self.advance_ipc(b)? };
        moved |= self.advance_coll(b)?;
        let Stage::Running(c) = &b.stage else { return Ok(moved) };
        if c.iter().all(|c| c.is_done())
            && b.ipc.iter().all(|o| o.finished())
            && b.coll.as_ref().is_none_or(|c| c.finished())
        {
            if let Some(e) = c.iter().find_map(|c| c.result().and_then(|r| r.err())) {
                return Err(e);
            }
            b.set_done(DONE_OK);
            b.stage = Stage::Releasing;
            moved = true;
        }
        Ok(moved)
    }

    /// Posts operations to the world; their completions ring the stager's bell.
    ///
    /// # Safety
    /// As [`World::post_raw`].
    unsafe fn post_watched(&self, ops: Vec<(OpDesc, RawBuf, RawBuf)>) -> Result<Vec<Arc<Completion>>> {
        // SAFETY: the caller's promise.
        let done = unsafe { self.world.post_raw(ops, false) }?;
        for c in &done {
            c.register(&self.waker);
        }
        Ok(done)
    }

    fn closed_error(&self) -> Error {
        Error::invalid_usage(format!("world '{}': its device operations were closed", self.world.name()))
    }

    /// The smallest pooled block of at least `len` bytes, or a new one; its flags cleared.
    fn take_block(&self, len: usize) -> Result<D::Block> {
        let mut pool = lock(&self.pool);
        let best = pool.iter().enumerate().filter(|(_, b)| b.len() >= len).min_by_key(|(_, b)| b.len()).map(|(i, _)| i);
        let block = match best {
            Some(i) => pool.swap_remove(i),
            None => {
                drop(pool);
                self.device.alloc(len)?
            }
        };
        // SAFETY: a pooled block is no longer used by any stream (its FINISHED flag was seen);
        // a new one is at least DATA bytes (the layout starts there).
        unsafe { std::ptr::write_bytes(block.host_ptr(), 0, DATA) };
        Ok(block)
    }

    /// Fails one batch: the error is kept for the caller, and the stream released.
    fn fail(&self, b: &mut Batch<D::Block>, e: Error) {
        lock(&self.error).get_or_insert(e);
        cuda_ipc::release(b);
        ipc_coll::release(b);
        b.set_done(DONE_FAILED);
        // Staged operations still running write into the block too: it is reused only once
        // they have ended, like the IPC messages.
        if let Stage::Running(c) = std::mem::replace(&mut b.stage, Stage::Releasing) {
            b.messages.extend(c);
        }
        // This rank cannot finish its part, so its peers must not wait for it: a world that
        // is not broken yet (a local failure, a mismatch seen here) is broken now. That also
        // ends at once any message still in flight into the block.
        if matches!(self.world.state(), WorldState::Ready) {
            self.world.abort();
        }
    }
}

/// How long the stager keeps looking at the flags without napping after something moved.
const SPIN: Duration = Duration::from_micros(200);

/// What a pass of the stager did.
enum Pass {
    Moved,
    Still,
    /// Closed, and every batch released.
    Done,
}

/// The stager's doorbell: a condition variable, and a flag for rings that came while the
/// stager was not waiting. It is a waker too, so that the completion of a message wakes the
/// stager at once.
struct Bell {
    cv: Condvar,
    rung: AtomicBool,
}

impl Bell {
    fn ring(&self) {
        self.rung.store(true, Ordering::Release);
        self.cv.notify_all();
    }
}

impl Wake for Bell {
    fn wake(self: Arc<Self>) {
        self.ring();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.ring();
    }
}

/// Whether `MW_DEVICE_IPC=1` asks for the CUDA IPC path (off by default: see `cuda_ipc.rs`).
pub(crate) fn ipc_enabled() -> bool {
    std::env::var("MW_DEVICE_IPC").is_ok_and(|v| v.trim() == "1")
}

/// The error of an operation that cannot run because the world is no longer usable.
fn unusable(world: &World) -> Error {
    match world.state() {
        WorldState::Broken(c) => Error::broken(world.name(), world.rank(), c, false),
        WorldState::Removed => Error::invalid_usage(format!("world '{}' was removed", world.name())),
        WorldState::Ready => Error::internal(format!("world '{}': operation not posted", world.name())),
    }
}

/// The stream's part of one batch: copy the inputs in, raise `READY`, wait for `DONE`, copy
/// the outputs out, raise `FINISHED`; the CUDA IPC operations' parts around `DONE`.
fn program<B>(batch: &Batch<B>, ops: &[DeviceOp]) -> Vec<StreamCmd> {
    let (slots, ipc) = (&batch.slots, &batch.ipc);
    let mut cmds = Vec::with_capacity(2 * ops.len() + 3 * ipc.len() + 3);
    for (slot, (desc, send, recv)) in slots.iter().zip(ops).filter(|(s, _)| !s.ipc) {
        if let Some((from, len)) = *send {
            cmds.push(StreamCmd::ToBlock { from, at: slot.send.0, len });
        }
        if desc.in_place {
            if let Some((from, len)) = *recv {
                cmds.push(StreamCmd::ToBlock { from, at: slot.recv.0, len });
            }
        }
    }
    cmds.push(StreamCmd::Raise { at: READY });
    cmds.extend(IpcOp::stream_cmds(ipc));
    cmds.extend(batch.coll.iter().flat_map(|c| c.stream_cmds()));
    cmds.push(StreamCmd::WaitFor { at: DONE, value: DONE_OK });
    cmds.extend(IpcOp::stream_cmds_after(ipc));
    cmds.extend(batch.coll.iter().flat_map(|c| c.stream_cmds_after()));
    for (slot, (_, _, recv)) in slots.iter().zip(ops).filter(|(s, _)| !s.ipc) {
        if let Some((to, len)) = *recv {
            cmds.push(StreamCmd::FromBlock { at: slot.recv.0, to, len });
        }
    }
    cmds.push(StreamCmd::Raise { at: FINISHED });
    cmds
}

#[cfg(test)]
mod tests;
