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

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::JoinHandle;
use std::time::Duration;

use cudarc::driver::sys::{self, CUdeviceptr, CUstream};

use crate::buf::RawBuf;
use crate::coll::OpDesc;
use crate::cuda::{check, check_device_buffer, check_not_capturing, Pinned, RawContext};
use crate::error::{Error, Result};
use crate::request::Completion;
use crate::sync::{fence, lock, wait_timeout, Arc, AtomicBool, Condvar, Mutex, Ordering};
use crate::world::{World, WorldState};

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
}

struct Batch {
    block: Pinned,
    slots: Vec<Slot>,
    stage: Stage,
}

impl Batch {
    fn flag(&self, at: usize) -> u32 {
        // SAFETY: the block holds at least DATA bytes; the flag words are aligned u32s that the
        // device writes through its mapping, hence the volatile read.
        let v = unsafe { std::ptr::read_volatile(self.block.host_ptr().add(at) as *const u32) };
        // What the device wrote before the flag is read after it (weakly ordered hosts).
        fence(Ordering::Acquire);
        v
    }

    fn set_done(&self, v: u32) {
        // The results are written before the flag that lets the stream copy them out.
        fence(Ordering::SeqCst);
        // SAFETY: as in `flag`.
        unsafe { std::ptr::write_volatile(self.block.host_ptr().add(DONE) as *mut u32, v) };
    }
}

/// Stages one world's operations from streams of one CUDA context.
pub(crate) struct Staging {
    world: World,
    ctx: RawContext,
    /// Held from an enqueue's first stream call until its batch joins `pending`, so that
    /// `pending` is in the order the stream runs the batches.
    enqueue: Mutex<()>,
    /// Batches on the stream, in stream order.
    pending: Mutex<VecDeque<Batch>>,
    /// Blocks no stream uses any more. They are freed only when the staging goes (freeing
    /// pinned memory may wait for the whole device, including streams that wait on a stager),
    /// so the pool holds as much as was ever in flight at once.
    pool: Mutex<Vec<Pinned>>,
    /// The first error of a batch, reported to the caller.
    error: Mutex<Option<Error>>,
    /// Set (under `enqueue`) when the owner goes: no more batches; the stager exits once the
    /// streams are done with the ones it has.
    closed: AtomicBool,
    /// Rung by enqueues (for the stager) and by the stager when batches move (for waiters).
    bell: Condvar,
    stager: Mutex<Option<JoinHandle<()>>>,
    /// Keeps a cudarc-owned context alive as long as the blocks (declared last: dropped last).
    _keep: Option<Arc<cudarc::driver::CudaContext>>,
}

impl Staging {
    /// Starts staging `world`'s operations from streams of `ctx`; `keep` holds the context
    /// alive where cudarc owns it (a C caller keeps its own context alive).
    pub(crate) fn start(
        world: World,
        ctx: RawContext,
        keep: Option<Arc<cudarc::driver::CudaContext>>,
    ) -> Result<Arc<Staging>> {
        crate::cuda::driver_present()?;
        let staging = Arc::new(Staging {
            world,
            ctx,
            enqueue: Mutex::new(()),
            pending: Mutex::new(VecDeque::new()),
            pool: Mutex::new(Vec::new()),
            error: Mutex::new(None),
            closed: AtomicBool::new(false),
            bell: Condvar::new(),
            stager: Mutex::new(None),
            _keep: keep,
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

    pub(crate) fn context(&self) -> RawContext {
        self.ctx
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
        self.bell.notify_all();
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
        self.wait_until(|b| !matches!(b.stage, Stage::Waiting));
    }

    /// Waits until every batch enqueued so far has completed (or failed).
    pub(crate) fn drain(&self) {
        self.wait_until(|b| matches!(b.stage, Stage::Releasing));
    }

    fn wait_until(&self, done: impl Fn(&Batch) -> bool) {
        let mut pending = lock(&self.pending);
        while !pending.iter().all(&done) {
            pending = wait_timeout(&self.bell, pending, Duration::from_millis(1));
        }
    }

    /// Enqueues `ops` as one batch on `stream`. The world runs them together, as a group.
    ///
    /// # Safety
    /// `stream` belongs to this staging's context; each address is device memory of at least
    /// its length, valid until the stream has run the batch.
    pub(crate) unsafe fn enqueue(&self, stream: CUstream, ops: &[DeviceOp]) -> Result<()> {
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
        for (desc, send, recv) in ops {
            let name = desc.kind.name();
            for (p, n) in send.iter().chain(recv) {
                check_device_buffer(name, *p as usize, *n)?;
            }
            slots.push(Slot {
                desc: *desc,
                send: place(send.map_or(0, |s| s.1))?,
                recv: place(recv.map_or(0, |r| r.1))?,
            });
        }
        let _order = lock(&self.enqueue);
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::invalid_usage(format!(
                "world '{}': its device operations were closed",
                self.world.name()
            )));
        }
        let _current = self.ctx.push()?;
        // SAFETY: the caller's promise about the stream.
        unsafe { check_not_capturing(stream) }?;
        let block = take_block(self, off)?;
        let batch = Batch { block, slots, stage: Stage::Waiting };
        // SAFETY: the caller's promises, passed on.
        match unsafe { stage_on_stream(&batch, stream, ops) } {
            Ok(()) => {
                lock(&self.pending).push_back(batch);
                self.bell.notify_all();
                Ok(())
            }
            Err(e) => {
                // Part of the batch may be on the stream: release any wait, and keep the block
                // out of reuse and unfreed (the stream may still write it). This rank cannot
                // take part in what the peers run, so the world breaks rather than leave them
                // waiting.
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
        loop {
            match catch_unwind(AssertUnwindSafe(|| self.pass())) {
                Ok(true) => break,
                Ok(false) => {}
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

    /// One pass over the batches, then a nap if nothing moved. True when the stager is done.
    fn pass(&self) -> bool {
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
                Stage::Running(c) if c.iter().all(|c| c.is_done()) => {
                    match c.iter().find_map(|c| c.result().and_then(|r| r.err())) {
                        Some(e) => self.fail(b, e),
                        None => {
                            b.set_done(DONE_OK);
                            b.stage = Stage::Releasing;
                        }
                    }
                    moved = true;
                }
                Stage::Running(_) | Stage::Releasing => {}
            }
        }
        // Blocks the stream has finished with go back to the pool, in order.
        while pending.front().is_some_and(|b| matches!(b.stage, Stage::Releasing) && b.flag(FINISHED) == 1) {
            if let Some(b) = pending.pop_front() {
                lock(&self.pool).push(b.block);
                moved = true;
            }
        }
        if pending.is_empty() && self.closed.load(Ordering::Acquire) {
            return true;
        }
        if moved {
            self.bell.notify_all();
        } else {
            // Flags written by the GPU raise no event: while batches are outstanding, look
            // again shortly; otherwise sleep until the next enqueue rings.
            let nap = if pending.is_empty() { Duration::from_millis(100) } else { Duration::from_micros(50) };
            drop(wait_timeout(&self.bell, pending, nap));
        }
        false
    }

    /// Posts a batch whose inputs are in its block.
    fn post(&self, b: &mut Batch) {
        let base = b.block.host_ptr();
        let ops = b
            .slots
            .iter()
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
        // SAFETY: as above.
        match unsafe { self.world.post_raw(ops, false) } {
            Ok(c) => b.stage = Stage::Running(c),
            Err(e) => self.fail(b, e),
        }
    }

    /// Fails one batch: the error is kept for the caller, and the stream released.
    fn fail(&self, b: &mut Batch, e: Error) {
        lock(&self.error).get_or_insert(e);
        b.set_done(DONE_FAILED);
        b.stage = Stage::Releasing;
    }
}

/// The error of an operation that cannot run because the world is no longer usable.
fn unusable(world: &World) -> Error {
    match world.state() {
        WorldState::Broken(c) => Error::broken(world.name(), world.rank(), c, false),
        WorldState::Removed => Error::invalid_usage(format!("world '{}' was removed", world.name())),
        WorldState::Ready => Error::internal(format!("world '{}': operation not posted", world.name())),
    }
}

/// The stream's part of one batch.
///
/// # Safety
/// As [`Staging::enqueue`].
unsafe fn stage_on_stream(b: &Batch, s: CUstream, ops: &[DeviceOp]) -> Result<()> {
    let (host, dev) = (b.block.host_ptr(), b.block.dev_ptr());
    let write = |at: usize| -> Result<()> {
        // SAFETY: the flag word is inside the mapped block. The default flags order the
        // stream's earlier writes (the copies) before the flag.
        check("cuStreamWriteValue32", unsafe {
            sys::cuStreamWriteValue32_v2(
                s,
                dev + at as u64,
                1,
                sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
            )
        })
    };
    for (slot, (desc, send, recv)) in b.slots.iter().zip(ops) {
        let copy_in = |at: usize, (p, n): (CUdeviceptr, usize)| {
            // SAFETY: `at..at + n` is inside the block; `p` is the caller's device buffer.
            check("cuMemcpyDtoHAsync", unsafe { sys::cuMemcpyDtoHAsync_v2(host.add(at).cast(), p, n, s) })
        };
        if let Some(x) = send {
            copy_in(slot.send.0, *x)?;
        }
        if desc.in_place {
            if let Some(x) = recv {
                copy_in(slot.recv.0, *x)?;
            }
        }
    }
    write(READY)?;
    // SAFETY: as above.
    check("cuStreamWaitValue32", unsafe {
        sys::cuStreamWaitValue32_v2(
            s,
            dev + DONE as u64,
            DONE_OK,
            sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
        )
    })?;
    for (slot, (_, _, recv)) in b.slots.iter().zip(ops) {
        if let Some((p, n)) = recv {
            // SAFETY: the block's output area to the caller's device buffer.
            let src = unsafe { host.add(slot.recv.0) };
            check("cuMemcpyHtoDAsync", unsafe { sys::cuMemcpyHtoDAsync_v2(*p, src.cast(), *n, s) })?;
        }
    }
    write(FINISHED)
}

/// The smallest pooled block of at least `len` bytes, or a new one; its flags cleared.
fn take_block(st: &Staging, len: usize) -> Result<Pinned> {
    let mut pool = lock(&st.pool);
    let best = pool.iter().enumerate().filter(|(_, b)| b.len() >= len).min_by_key(|(_, b)| b.len()).map(|(i, _)| i);
    let block = match best {
        Some(i) => pool.swap_remove(i),
        None => {
            drop(pool);
            Pinned::new(st.ctx, len)?
        }
    };
    // SAFETY: a pooled block is no longer used by any stream (its FINISHED flag was seen).
    unsafe { std::ptr::write_bytes(block.host_ptr(), 0, DATA) };
    Ok(block)
}
