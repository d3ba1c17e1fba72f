//! CUDA (feature `cuda`): finding devices, and the crate's own kernels.
//!
//! cudarc loads the CUDA driver library at run time, so nothing links against CUDA and the
//! crate builds on machines without it; but cudarc panics when the library is absent, so every
//! entry point here first checks that it is present and answers an [`ErrorKind::Cuda`] error
//! otherwise. The kernels (`cuda/kernels.cu`) come compiled into a fatbin by `build.rs` and are
//! loaded into a context on first use. Raw driver calls go through cudarc's `sys` layer; each
//! is checked here, once, and turned into an [`Error`].

use std::ffi::c_void;

/// The cudarc this crate was built with, for callers' device buffers and streams.
pub use cudarc;

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::api::error::{Error, ErrorKind, Result};
use crate::api::types::{DataType, ReduceOp};
use crate::sys::sync::Arc;

/// The kernels, compiled by build.rs (SASS for sm_80 and sm_90, PTX for newer GPUs).
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

/// The embedded kernels as an 8-byte aligned image, for the driver's `cuModuleLoadData`.
pub(crate) fn fatbin_image() -> Vec<u64> {
    let mut image = vec![0u64; FATBIN.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut image)[..FATBIN.len()].copy_from_slice(FATBIN);
    image
}

/// Most sources one combine kernel takes.
pub const MAX_SOURCES: usize = 8;

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::new(ErrorKind::Cuda, format!("{what}: {e:?}"))
}

/// Checks a raw driver result.
pub(crate) fn check(what: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(cuda_err(what, r))
    }
}

/// Fails with a clear error when the CUDA driver library cannot be loaded (cudarc would
/// panic on first use).
pub(crate) fn driver_present() -> Result<()> {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: only tries to open the library; no CUDA call is made.
    if *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() }) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Cuda,
            "the CUDA driver library (libcuda.so) is not present on this machine: no GPU can be used",
        ))
    }
}

/// Number of CUDA devices; an error (never a panic) where there is no driver or no device.
pub fn device_count() -> Result<usize> {
    driver_present()?;
    let n = CudaContext::device_count().map_err(|e| cuda_err("counting CUDA devices", e))?;
    Ok(n.max(0) as usize)
}

/// Opens device `ordinal`'s primary context.
pub fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    let n = device_count()?;
    if ordinal >= n {
        return Err(Error::invalid_arg(format!("CUDA device {ordinal} does not exist ({n} devices)")));
    }
    CudaContext::new(ordinal).map_err(|e| cuda_err("opening the CUDA context", e))
}

/// Source pointers of one combine launch, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Sources {
    p: [u64; MAX_SOURCES],
}

// SAFETY: a plain array of device addresses, laid out as the kernels' `MwSources`.
unsafe impl DeviceRepr for Sources {}

/// Short kernel name of each data type, as in `cuda/kernels.cu`.
pub(crate) fn type_name(d: DataType) -> &'static str {
    match d {
        DataType::I8 => "i8",
        DataType::U8 => "u8",
        DataType::I32 => "i32",
        DataType::U32 => "u32",
        DataType::I64 => "i64",
        DataType::U64 => "u64",
        DataType::F16 => "f16",
        DataType::F32 => "f32",
        DataType::F64 => "f64",
        DataType::BF16 => "bf16",
    }
}

/// The crate's element-wise kernels, loaded into one context: combining buffers with a
/// reduction, scaling (the division of `Avg`) and copying, for every [`DataType`]. The staged
/// device path ([`crate::DeviceWorld`]) reduces on the host today; these are the building blocks
/// of reductions on the GPU, and usable directly on device buffers.
pub struct Kernels {
    combine: Vec<CudaFunction>,
    scale: Vec<CudaFunction>,
    copy: CudaFunction,
}

/// Grid for `n` units of work: 256 threads a block, at most 1024 blocks (grid-stride does the
/// rest).
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 1024) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

impl Kernels {
    /// Loads the embedded kernels into `ctx`.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Kernels> {
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec())).map_err(|e| {
            let mut v = 0i32;
            // SAFETY: an out-pointer to a local.
            let driver = match unsafe { sys::cuDriverGetVersion(&mut v) } {
                sys::CUresult::CUDA_SUCCESS => format!("{}.{}", v / 1000, v % 1000 / 10),
                _ => "unknown".into(),
            };
            cuda_err(
                &format!(
                    "loading multiworld's kernels (built by nvcc for CUDA 13.0: the driver must support 13.0 \
                     or newer; this one supports {driver})"
                ),
                e,
            )
        })?;
        let f = |name: String| module.load_function(&name).map_err(|e| cuda_err(&format!("kernel {name}"), e));
        let combine =
            DataType::ALL.iter().map(|d| f(format!("mw_combine_{}", type_name(*d)))).collect::<Result<_>>()?;
        let scale = DataType::ALL.iter().map(|d| f(format!("mw_scale_{}", type_name(*d)))).collect::<Result<_>>()?;
        Ok(Kernels { combine, scale, copy: f("mw_copy".into())? })
    }

    fn index(d: DataType) -> usize {
        DataType::ALL.iter().position(|x| *x == d).unwrap_or(0)
    }

    /// Enqueues `dst[i] = srcs[0][i] op srcs[1][i] op ...` for `n` elements on `stream`
    /// (`Avg` sums; finish it with [`Kernels::scale`]).
    ///
    /// # Safety
    /// `dst` and every source are device addresses of at least `n` elements of `dtype`, valid
    /// until the kernel has run; `dst` may be one of the sources.
    pub unsafe fn combine(
        &self,
        stream: &Arc<CudaStream>,
        dtype: DataType,
        op: ReduceOp,
        dst: CUdeviceptr,
        srcs: &[CUdeviceptr],
        n: usize,
    ) -> Result<()> {
        if srcs.is_empty() || srcs.len() > MAX_SOURCES {
            return Err(Error::internal(format!("combine of {} sources", srcs.len())));
        }
        if n == 0 {
            return Ok(());
        }
        let mut s = Sources::default();
        s.p[..srcs.len()].copy_from_slice(srcs);
        let (op, nsrc) = (op as i32, srcs.len() as i32);
        let mut b = stream.launch_builder(&self.combine[Self::index(dtype)]);
        b.arg(&op).arg(&dst).arg(&s).arg(&nsrc).arg(&n);
        // SAFETY: the arguments match `mw_combine_<type>(int, T*, MwSources, int, size_t)`; the
        // caller vouches for the pointers.
        unsafe { b.launch(grid(n.div_ceil(16 / dtype.size().min(16)))) }.map_err(|e| cuda_err("combine kernel", e))?;
        Ok(())
    }

    /// Enqueues `dst[i] = dst[i] / ranks` for `n` elements (the end of an average).
    ///
    /// # Safety
    /// `dst` is a device address of at least `n` elements of `dtype`, valid until the kernel
    /// has run.
    pub unsafe fn scale(
        &self,
        stream: &Arc<CudaStream>,
        dtype: DataType,
        dst: CUdeviceptr,
        n: usize,
        ranks: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let r = ranks as i32;
        let mut b = stream.launch_builder(&self.scale[Self::index(dtype)]);
        b.arg(&dst).arg(&n).arg(&r);
        // SAFETY: matches `mw_scale_<type>(T*, size_t, int)`; the caller vouches for `dst`.
        unsafe { b.launch(grid(n)) }.map_err(|e| cuda_err("scale kernel", e))?;
        Ok(())
    }

    /// Enqueues a copy of `bytes` bytes between device addresses.
    ///
    /// # Safety
    /// Both ranges are valid device memory until the kernel has run and do not overlap.
    pub unsafe fn copy(
        &self,
        stream: &Arc<CudaStream>,
        dst: CUdeviceptr,
        src: CUdeviceptr,
        bytes: usize,
    ) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let mut b = stream.launch_builder(&self.copy);
        b.arg(&dst).arg(&src).arg(&bytes);
        // SAFETY: matches `mw_copy(unsigned char*, const unsigned char*, size_t)`.
        unsafe { b.launch(grid(bytes.div_ceil(16))) }.map_err(|e| cuda_err("copy kernel", e))?;
        Ok(())
    }
}

/// A CUDA context handle: one cudarc owns (`CudaContext::cu_ctx`) or one a C caller's stream
/// belongs to. Whoever makes one keeps the context alive for as long as it is used.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct RawContext(pub(crate) sys::CUcontext);

// SAFETY: a context handle may be made current on any thread.
unsafe impl Send for RawContext {}
// SAFETY: as above.
unsafe impl Sync for RawContext {}

impl RawContext {
    /// Makes the context current on this thread until the guard drops, which restores the
    /// caller's own (raw driver calls act in the current context; the caller's must survive).
    pub(crate) fn push(self) -> Result<Current> {
        // SAFETY: a live context handle (the maker's promise).
        check("cuCtxPushCurrent", unsafe { sys::cuCtxPushCurrent_v2(self.0) })?;
        Ok(Current(std::marker::PhantomData))
    }

    /// The context `stream` belongs to.
    ///
    /// # Safety
    /// `stream` is a live stream handle, or one of the driver's special streams.
    pub(crate) unsafe fn of_stream(stream: sys::CUstream) -> Result<RawContext> {
        driver_present()?;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: an out-pointer to a local; the caller vouches for the stream.
        check("cuStreamGetCtx", unsafe { sys::cuStreamGetCtx(stream, &mut ctx) })?;
        Ok(RawContext(ctx))
    }
}

/// A context pushed on this thread by [`RawContext::push`]; popped on drop (on this thread:
/// hence not `Send`).
pub(crate) struct Current(std::marker::PhantomData<*const ()>);

impl Drop for Current {
    fn drop(&mut self) {
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: pops what `push` pushed on this thread; the result cannot be acted on.
        unsafe { sys::cuCtxPopCurrent_v2(&mut ctx) };
    }
}

/// What CUDA knows of the memory at `ptr`: `None` for memory it does not know (plain host
/// memory, wild pointers) or when the driver is absent or not initialized.
pub(crate) fn memory_type(ptr: usize) -> Option<sys::CUmemorytype> {
    driver_present().ok()?;
    let mut t: u32 = 0;
    // SAFETY: an out-pointer to a local of the attribute's size (an unsigned int); the driver
    // only looks the address up.
    let r = unsafe {
        sys::cuPointerGetAttribute(
            (&mut t as *mut u32).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr as CUdeviceptr,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return None;
    }
    [
        sys::CUmemorytype::CU_MEMORYTYPE_HOST,
        sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED,
    ]
    .into_iter()
    .find(|m| *m as u32 == t)
}

/// Checks that the first and last byte of a buffer are memory CUDA knows, so that a host or
/// wild pointer passed as device memory is refused before any copy is enqueued. (Only the two
/// ends: one buffer may span several mappings of one virtual range.)
pub(crate) fn check_device_buffer(what: &str, ptr: usize, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let last = ptr.checked_add(len - 1);
    if memory_type(ptr).is_none() || last.and_then(memory_type).is_none() {
        return Err(Error::invalid_arg(format!(
            "{what}: {len} bytes at {ptr:#x} are not memory CUDA knows (host buffers take a NULL stream)"
        )));
    }
    Ok(())
}

/// Refuses a stream that is capturing a CUDA graph: a staged operation waits on a flag its
/// host thread writes once the stream reaches it, which a graph would only replay later.
///
/// # Safety
/// `stream` is a live stream handle, or one of the driver's special streams.
pub(crate) unsafe fn check_not_capturing(stream: sys::CUstream) -> Result<()> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: an out-pointer to a local; the caller vouches for the stream.
    check("cuStreamIsCapturing", unsafe { sys::cuStreamIsCapturing(stream, &mut status) })?;
    if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        return Err(Error::invalid_usage(
            "operations cannot be captured into a CUDA graph: they wait on their host thread",
        ));
    }
    Ok(())
}

/// Pinned host memory mapped into the device's address space: what both the host and the
/// device's stream can read and write (staging buffers, and the flags streams wait on).
pub(crate) struct Pinned {
    /// Bound before freeing: the free needs the context current on whichever thread drops.
    ctx: RawContext,
    host: *mut u8,
    dev: CUdeviceptr,
    len: usize,
}

// SAFETY: the allocation is owned by this value and only reached through its methods.
unsafe impl Send for Pinned {}
// SAFETY: as above; concurrent readers only ever see plain bytes.
unsafe impl Sync for Pinned {}

impl Pinned {
    /// Allocates `len` bytes (at least one) of mapped pinned memory in `ctx`, zeroed. The
    /// context must outlive the block.
    pub(crate) fn new(ctx: RawContext, len: usize) -> Result<Pinned> {
        let _current = ctx.push()?;
        let len = len.max(8);
        let mut host: *mut c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: out-pointer to a local; checked below.
        check("cuMemHostAlloc", unsafe { sys::cuMemHostAlloc(&mut host, len, flags) })?;
        let mut dev: CUdeviceptr = 0;
        // SAFETY: `host` was just allocated with DEVICEMAP.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host, 0) };
        if let Err(e) = check("cuMemHostGetDevicePointer", r) {
            // SAFETY: freeing what was allocated above, once.
            unsafe { sys::cuMemFreeHost(host) };
            return Err(e);
        }
        // SAFETY: `len` bytes were just allocated at `host`.
        unsafe { std::ptr::write_bytes(host as *mut u8, 0, len) };
        Ok(Pinned { ctx, host: host as *mut u8, dev, len })
    }

    pub(crate) fn host_ptr(&self) -> *mut u8 {
        self.host
    }

    pub(crate) fn dev_ptr(&self) -> CUdeviceptr {
        self.dev
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // A failure here cannot be acted on: the memory is then leaked, never used again.
        if let Ok(_current) = self.ctx.push() {
            // SAFETY: allocated by cuMemHostAlloc in `new`, freed once.
            unsafe { sys::cuMemFreeHost(self.host as *mut c_void) };
        }
    }
}

/// Host builds of the kernels' per-element arithmetic (`cuda/host_check.cpp`), for tests.
#[cfg(test)]
pub(crate) mod host {
    extern "C" {
        pub fn mw_host_combine(dtype: i32, op: i32, dst: *mut u8, src: *const *const u8, nsrc: i32, n: usize);
        pub fn mw_host_scale(dtype: i32, dst: *mut u8, n: usize, ranks: i32);
    }
}

#[cfg(test)]
mod tests;
