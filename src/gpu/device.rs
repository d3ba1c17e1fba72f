//! What runs a world's operations on device buffers, as the world's backend says: the crate's
//! own staging (`staging/`) or NCCL (`nccl.rs`, feature `nccl`). [`crate::DeviceWorld`] and the
//! C API's stream calls both go through here, so that each backend is chosen in one place.

use cudarc::driver::sys::CUstream;

use crate::api::error::{Error, Result};
use crate::api::options::BackendChoice;
use crate::api::world::World;
use crate::gpu::cuda::RawContext;
#[cfg(feature = "nccl")]
use crate::gpu::nccl::NcclComm;
use crate::gpu::staging::{DeviceOp, Staging};
use crate::sys::sync::Arc;

/// One world's device operations on one CUDA context.
#[derive(Clone)]
pub(crate) enum DeviceBackend {
    /// Staged by the crate (through host memory, or CUDA IPC mappings).
    Native(Arc<Staging>),
    /// Run by NCCL.
    #[cfg(feature = "nccl")]
    Nccl(Arc<NcclComm>),
}

impl DeviceBackend {
    /// Starts running `world`'s device operations from streams of `ctx`; `keep` holds the
    /// context alive where cudarc owns it. For an NCCL world this creates the communicator:
    /// collective, bounded by the world's formation deadline.
    pub(crate) fn start(
        world: World,
        ctx: RawContext,
        keep: Option<Arc<cudarc::driver::CudaContext>>,
    ) -> Result<DeviceBackend> {
        match world.backend() {
            BackendChoice::Native => Ok(DeviceBackend::Native(Staging::start(world, ctx, keep)?)),
            #[cfg(feature = "nccl")]
            BackendChoice::Nccl => Ok(DeviceBackend::Nccl(NcclComm::start(world, ctx, keep)?)),
            #[cfg(not(feature = "nccl"))]
            BackendChoice::Nccl => {
                let _ = (ctx, keep);
                Err(Error::invalid_arg(format!(
                    "world '{}' runs on NCCL, but this build has no `nccl` feature",
                    world.name()
                )))
            }
        }
    }

    pub(crate) fn world(&self) -> &World {
        match self {
            DeviceBackend::Native(s) => s.world(),
            #[cfg(feature = "nccl")]
            DeviceBackend::Nccl(n) => n.world(),
        }
    }

    pub(crate) fn context(&self) -> RawContext {
        match self {
            DeviceBackend::Native(s) => s.context(),
            #[cfg(feature = "nccl")]
            DeviceBackend::Nccl(n) => n.context(),
        }
    }

    /// Enqueues operations as one batch on `stream`.
    ///
    /// # Safety
    /// `stream` is a live stream of this backend's context; the buffers are device memory of
    /// the sizes given, valid until the stream has run the operations.
    pub(crate) unsafe fn enqueue(&self, stream: CUstream, ops: &[DeviceOp]) -> Result<()> {
        // SAFETY: the caller's promises, passed on.
        unsafe {
            match self {
                DeviceBackend::Native(s) => s.enqueue(stream, ops),
                #[cfg(feature = "nccl")]
                DeviceBackend::Nccl(n) => n.enqueue(stream, ops),
            }
        }
    }

    /// The first failure of an operation already enqueued, if any.
    pub(crate) fn error(&self) -> Option<Error> {
        match self {
            DeviceBackend::Native(s) => s.error(),
            #[cfg(feature = "nccl")]
            DeviceBackend::Nccl(n) => n.error(),
        }
    }

    /// Waits until what was enqueued so far has entered the world's order (the native
    /// backend posts from a thread of its own; NCCL's calls are in order when they return).
    pub(crate) fn wait_posted(&self) {
        match self {
            DeviceBackend::Native(s) => s.wait_posted(),
            #[cfg(feature = "nccl")]
            DeviceBackend::Nccl(_) => {}
        }
    }

    /// CUDA IPC counts (the native backend's; NCCL's paths are its own).
    pub(crate) fn ipc_counts(&self) -> [u64; 4] {
        match self {
            DeviceBackend::Native(s) => s.ipc_counts(),
            #[cfg(feature = "nccl")]
            DeviceBackend::Nccl(_) => [0; 4],
        }
    }

    /// Ends it from the owner's drop: what the streams hold still runs (the native stager
    /// finishes it in the background; NCCL's finalize waits for it, bounded).
    pub(crate) fn close(&self) {
        match self {
            DeviceBackend::Native(s) => s.close(),
            #[cfg(feature = "nccl")]
            DeviceBackend::Nccl(n) => n.close(),
        }
    }

    /// Lets it go (the C API's destroy and abort), then runs `leave`: the native backend
    /// without waiting; NCCL's destroy as `ncclCommDestroy` does (`NcclComm::release`).
    pub(crate) fn release_in_background(&self, abort: bool, leave: impl FnOnce() + Send + 'static) {
        match self {
            DeviceBackend::Native(s) => s.release_in_background(abort, leave),
            #[cfg(feature = "nccl")]
            DeviceBackend::Nccl(n) => n.release(abort, leave),
        }
    }
}
