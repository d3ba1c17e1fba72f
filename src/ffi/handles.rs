//! The table of communicators: handles are keys, never pointers; each entry is a world of its
//! own `WorldManager` with its formation, last error and pending operations. Also the guard
//! that keeps panics from crossing into C, and where errors without a communicator are kept.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;
use std::time::Duration;

use super::*;
use crate::api::error::{Error, ErrorKind};
use crate::api::manager::{EventQueue, Formation, WorldManager};
use crate::api::request::Completion;
use crate::api::world::World;
use crate::sys::sync::{lock, Arc, Mutex};

/// Where a communicator stands.
pub(super) enum Phase {
    Forming(Formation),
    /// Being made from another communicator on a thread of its own (a non-blocking
    /// `mwCommSplit` or `mwCommShrink`): the result, once there.
    Making(Arc<Mutex<Option<Result<World, Error>>>>),
    Ready(World),
    Failed(Error),
}

/// Rank and size of a communicator still being split off another.
pub(super) const UNKNOWN: usize = usize::MAX;

pub(super) struct Comm {
    pub(super) manager: WorldManager,
    pub(super) phase: Mutex<Phase>,
    pub(super) rank: usize,
    pub(super) size: usize,
    pub(super) blocking: bool,
    /// Operations of a non-blocking communicator not yet seen finished.
    pub(super) pending: Mutex<Vec<Arc<Completion>>>,
    pub(super) last_error: Mutex<String>,
    /// What runs operations on device buffers, from the first one on.
    #[cfg(feature = "cuda")]
    pub(super) device: Mutex<Option<crate::gpu::device::DeviceBackend>>,
}

impl Comm {
    /// A communicator in `phase`, with nothing pending and no error yet.
    pub(super) fn new(manager: WorldManager, phase: Phase, rank: usize, size: usize, blocking: bool) -> Comm {
        Comm {
            manager,
            phase: Mutex::new(phase),
            rank,
            size,
            blocking,
            pending: Mutex::new(Vec::new()),
            last_error: Mutex::new(String::new()),
            #[cfg(feature = "cuda")]
            device: Mutex::new(None),
        }
    }

    /// The world, once formed. A formation that finished is settled here.
    pub(super) fn world(&self) -> Result<World, Error> {
        let mut p = lock(&self.phase);
        if let Phase::Making(m) = &*p {
            let Some(r) = lock(m).take() else {
                return Err(Error::new(ErrorKind::InProgress, "the communicator is still being made"));
            };
            *p = match r {
                Ok(w) => Phase::Ready(w),
                Err(e) => Phase::Failed(e),
            };
        }
        if let Phase::Forming(f) = &*p {
            if !f.test() {
                return Err(Error::new(ErrorKind::InProgress, "the communicator is still forming"));
            }
            let Phase::Forming(f) = std::mem::replace(&mut *p, Phase::Failed(Error::internal("settling"))) else {
                return Err(Error::internal("formation vanished"));
            };
            *p = match f.wait() {
                Ok(w) => Phase::Ready(w),
                Err(e) => Phase::Failed(e),
            };
        }
        match &*p {
            Phase::Ready(w) => Ok(w.clone()),
            Phase::Failed(e) => Err(e.clone()),
            Phase::Forming(_) | Phase::Making(_) => Err(Error::internal("formation not settled")),
        }
    }

    /// Abandons the formation if it is still under way (returns at once); the communicator
    /// then reads as failed.
    /// This rank and the size: known from the start, except for a communicator still being
    /// split off another (`mwInProgress` until it is made).
    pub(super) fn shape(&self) -> Result<(usize, usize), Error> {
        if self.size != UNKNOWN {
            return Ok((self.rank, self.size));
        }
        self.world().map(|w| (w.rank(), w.size()))
    }

    pub(super) fn abandon_formation(&self) {
        let mut p = lock(&self.phase);
        if let Phase::Forming(f) = &*p {
            if !f.test() {
                f.abort();
                let e = Error::new(ErrorKind::InvalidUsage, "the communicator was aborted while it formed");
                *p = Phase::Failed(e);
            }
        }
    }

    /// Blocks until formation has finished.
    pub(super) fn settle(&self) -> Result<World, Error> {
        loop {
            match self.world() {
                Err(e) if e.kind() == ErrorKind::InProgress => std::thread::sleep(Duration::from_micros(200)),
                r => return r,
            }
        }
    }

    pub(super) fn record(&self, e: &Error) -> mwResult_t {
        *lock(&self.last_error) = e.message().to_owned();
        code(e.kind())
    }

    /// Waits until the operations enqueued on streams so far have entered the world's order,
    /// so that a host operation called now comes after them on every rank, as it was called.
    pub(super) fn wait_device_posted(&self) {
        #[cfg(feature = "cuda")]
        let device = lock(&self.device).clone();
        #[cfg(feature = "cuda")]
        if let Some(d) = device {
            d.wait_posted();
        }
    }

    /// The first failure of an operation on device buffers.
    pub(super) fn device_error(&self) -> Option<Error> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &*lock(&self.device) {
            return d.error();
        }
        None
    }

    /// Enqueues operations on device buffers as one batch on `stream`.
    #[cfg(feature = "cuda")]
    pub(super) fn enqueue_device(&self, stream: usize, ops: &[Checked]) -> Result<(), Error> {
        use crate::gpu::cuda::RawContext;
        use crate::gpu::device::DeviceBackend;
        let w = if self.blocking { self.settle() } else { self.world() }?;
        let stream = stream as cudarc::driver::sys::CUstream;
        // SAFETY: the C caller passes a live stream (NCCL's contract).
        let ctx = unsafe { RawContext::of_stream(stream) }?;
        // The first operation starts the backend (for NCCL: creates the communicator, a
        // collective over the world's ranks, as their first device operations meet), outside
        // the slot's lock, which `mwCommGetAsyncError` and `mwCommDestroy` take meanwhile.
        let existing = lock(&self.device).clone();
        let backend = match existing {
            Some(s) if s.context() != ctx => {
                return Err(Error::invalid_arg(
                    "the stream belongs to another CUDA context than this communicator's earlier operations",
                ))
            }
            Some(s) => s,
            None => {
                let started = DeviceBackend::start(w, ctx, None)?;
                lock(&self.device).get_or_insert(started).clone()
            }
        };
        let some = |(p, n): (usize, usize)| (n > 0).then_some((p as u64, n));
        let ops: Vec<_> = ops.iter().map(|o| (o.desc, some(o.send), some(o.recv))).collect();
        // SAFETY: the stream is of the backend's context (checked); the buffers are device
        // memory valid until the stream has run the operations (the C caller's contract).
        unsafe { backend.enqueue(stream, &ops) }
    }
}

/// The table of communicators: handles are keys, never pointers (keys are never reused).
#[derive(Default)]
pub(super) struct Table {
    pub(super) next: u64,
    pub(super) comms: HashMap<u64, Arc<Comm>>,
}

pub(super) fn table() -> &'static Mutex<Table> {
    static T: OnceLock<Mutex<Table>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(Table::default()))
}

pub(super) fn events() -> &'static Arc<EventQueue> {
    static E: OnceLock<Arc<EventQueue>> = OnceLock::new();
    E.get_or_init(|| Arc::new(EventQueue::default()))
}

/// The last error of calls that had no communicator to record it on.
pub(super) fn global_error() -> &'static Mutex<String> {
    static G: OnceLock<Mutex<String>> = OnceLock::new();
    G.get_or_init(|| Mutex::new(String::new()))
}

pub(super) fn fail(comm: Option<&Comm>, e: Error) -> mwResult_t {
    match comm {
        Some(c) => c.record(&e),
        None => {
            *lock(global_error()) = e.message().to_owned();
            code(e.kind())
        }
    }
}

pub(super) fn invalid(comm: Option<&Comm>, msg: impl Into<String>) -> mwResult_t {
    fail(comm, Error::invalid_arg(msg))
}

pub(super) fn lookup(comm: mwComm_t) -> Result<Arc<Comm>, mwResult_t> {
    let key = comm as usize as u64;
    match lock(table()).comms.get(&key) {
        Some(c) if key != 0 => Ok(c.clone()),
        _ => Err(invalid(None, format!("{comm:p} is not a live communicator"))),
    }
}

pub(super) fn register(c: Comm) -> mwComm_t {
    let mut t = lock(table());
    t.next += 1;
    let key = t.next;
    t.comms.insert(key, Arc::new(c));
    key as usize as mwComm_t
}

/// Runs an entry point's body; a panic becomes `mwInternalError`, never unwinding into C.
pub(super) fn guard(f: impl FnOnce() -> mwResult_t) -> mwResult_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            *lock(global_error()) = "internal error: a panic was caught at the C boundary".into();
            mwInternalError
        }
    }
}
