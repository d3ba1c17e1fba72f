//! [`Device`] for a real GPU: each [`StreamCmd`] becomes its CUDA driver call on the caller's
//! stream (copies, 32-bit flag writes and waits, the crate's told-copy and combine kernels),
//! and the CUDA IPC calls (export, open, close) of the IPC paths. Every raw driver call of
//! staging is here, checked once and turned into an [`Error`].

use super::*;

/// Bytes of a CUDA IPC memory handle.
pub(crate) const HANDLE_LEN: usize = 64;

/// A CUDA context's streams (`CUstream`) and mapped pinned blocks.
pub(crate) struct CudaDevice {
    pub(super) ctx: RawContext,
    /// The kernels' module, loaded into `ctx` when the staging starts (loading may synchronize
    /// the context, which must not happen while a stream waits on a flag of ours).
    module: Option<sys::CUmodule>,
    /// `mw_copy_told`, and `mw_combine_told_<type>` for each type (in `DataType::ALL`'s order).
    copy_told: sys::CUfunction,
    combine_told: Vec<sys::CUfunction>,
    /// Keeps a cudarc-owned context alive as long as the blocks.
    _keep: Option<Arc<cudarc::driver::CudaContext>>,
}

impl CudaDevice {
    pub(super) fn new(ctx: RawContext, keep: Option<Arc<cudarc::driver::CudaContext>>) -> Result<CudaDevice> {
        let mut device =
            CudaDevice { ctx, module: None, copy_told: std::ptr::null_mut(), combine_told: Vec::new(), _keep: keep };
        let _current = ctx.push()?;
        let mut module: sys::CUmodule = std::ptr::null_mut();
        let image = crate::gpu::cuda::fatbin_image();
        // SAFETY: the embedded fatbin, aligned; the driver copies what it needs.
        let r = unsafe { sys::cuModuleLoadData(&mut module, image.as_ptr().cast()) };
        check("cuModuleLoadData (multiworld's kernels, built for CUDA 13.0: the driver must support it)", r)?;
        // Unloaded by `drop` from here on, whatever fails below.
        device.module = Some(module);
        let function = |name: &str| -> Result<sys::CUfunction> {
            let cname = std::ffi::CString::new(name).map_err(|_| Error::internal("kernel name"))?;
            let mut f: sys::CUfunction = std::ptr::null_mut();
            // SAFETY: a module just loaded and a NUL-terminated name.
            check(&format!("cuModuleGetFunction({name})"), unsafe {
                sys::cuModuleGetFunction(&mut f, module, cname.as_ptr())
            })?;
            // Loaded now, not lazily at the first launch (which may synchronize the context
            // while a stream waits on a flag of ours).
            // SAFETY: a function of the module just loaded.
            check(&format!("cuFuncLoad({name})"), unsafe { sys::cuFuncLoad(f) })?;
            Ok(f)
        };
        device.copy_told = function("mw_copy_told")?;
        device.combine_told = DataType::ALL
            .iter()
            .map(|d| function(&format!("mw_combine_told_{}", crate::gpu::cuda::type_name(*d))))
            .collect::<Result<_>>()?;
        Ok(device)
    }
}

unsafe impl Send for CudaDevice {}

unsafe impl Sync for CudaDevice {}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // Dropped after the stager is gone: no stream still runs a batch of ours, except a
        // batch whose enqueue failed, which was left to the stream (its kernel keeps the
        // module loaded until it ends). A failure cannot be acted on: the module then stays.
        if let Some(m) = self.module.take() {
            if let Ok(_current) = self.ctx.push() {
                // SAFETY: a module loaded by `new`, unloaded once.
                unsafe { sys::cuModuleUnload(m) };
            }
        }
    }
}

impl Device for CudaDevice {
    type Stream = CUstream;
    type Block = Pinned;
    type Entered = Current;

    fn enter(&self) -> Result<Current> {
        self.ctx.push()
    }

    fn check_buffer(&self, what: &str, addr: CUdeviceptr, len: usize) -> Result<()> {
        check_device_buffer(what, addr as usize, len)
    }

    unsafe fn check_stream(&self, stream: CUstream) -> Result<()> {
        // SAFETY: the caller's promise.
        unsafe { check_not_capturing(stream) }
    }

    fn alloc(&self, len: usize) -> Result<Pinned> {
        Pinned::new(self.ctx, len)
    }

    unsafe fn submit(&self, s: CUstream, block: &Pinned, cmds: &[StreamCmd]) -> Result<()> {
        let (host, dev) = (block.host_ptr(), block.dev_ptr());
        for c in cmds {
            // SAFETY (each call): offsets come from the batch's layout, inside the block; the
            // addresses are the caller's device buffers (the caller's promise).
            let r = match *c {
                StreamCmd::ToBlock { from, at, len } => {
                    check("cuMemcpyDtoHAsync", unsafe { sys::cuMemcpyDtoHAsync_v2(host.add(at).cast(), from, len, s) })
                }
                StreamCmd::FromBlock { at, to, len } => {
                    check("cuMemcpyHtoDAsync", unsafe { sys::cuMemcpyHtoDAsync_v2(to, host.add(at).cast(), len, s) })
                }
                // The default flags order the stream's earlier writes (the copies) before the
                // flag.
                StreamCmd::Raise { at } => check("cuStreamWriteValue32", unsafe {
                    sys::cuStreamWriteValue32_v2(
                        s,
                        dev + at as u64,
                        1,
                        sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
                    )
                }),
                StreamCmd::WaitFor { at, value } => check("cuStreamWaitValue32", unsafe {
                    sys::cuStreamWaitValue32_v2(
                        s,
                        dev + at as u64,
                        value,
                        sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
                    )
                }),
                // 256 threads a block, 16 bytes a thread, at most 1024 blocks (the kernels
                // stride over the rest).
                StreamCmd::CopyAsTold { at, count, max } => {
                    let blocks = max.div_ceil(16 * 256).clamp(1, 1024) as u32;
                    let mut desc = dev + at as u64;
                    let mut count = i32::try_from(count).map_err(|_| Error::internal("too many copies"))?;
                    let mut params =
                        [(&mut desc as *mut u64).cast::<c_void>(), (&mut count as *mut i32).cast::<c_void>()];
                    check("cuLaunchKernel(mw_copy_told)", unsafe {
                        sys::cuLaunchKernel(
                            self.copy_told,
                            blocks,
                            1,
                            1,
                            256,
                            1,
                            1,
                            0,
                            s,
                            params.as_mut_ptr(),
                            std::ptr::null_mut(),
                        )
                    })
                }
                StreamCmd::CombineAsTold { at, dtype, max } => {
                    let f = DataType::ALL
                        .iter()
                        .position(|d| *d == dtype)
                        .and_then(|i| self.combine_told.get(i))
                        .ok_or_else(|| Error::internal("combine kernel not loaded"))?;
                    let blocks = (max * dtype.size()).div_ceil(16 * 256).clamp(1, 1024) as u32;
                    let mut desc = dev + at as u64;
                    let mut params = [(&mut desc as *mut u64).cast::<c_void>()];
                    check("cuLaunchKernel(mw_combine_told)", unsafe {
                        sys::cuLaunchKernel(
                            *f,
                            blocks,
                            1,
                            1,
                            256,
                            1,
                            1,
                            0,
                            s,
                            params.as_mut_ptr(),
                            std::ptr::null_mut(),
                        )
                    })
                }
            };
            r?;
        }
        Ok(())
    }

    fn can_share(&self) -> bool {
        ipc_enabled()
    }

    fn export(&self, addr: CUdeviceptr) -> Option<([u8; HANDLE_LEN], u64)> {
        let mut base: CUdeviceptr = 0;
        // SAFETY: an out-pointer to a local of the attribute's size; the driver only looks the
        // address up.
        let r = unsafe {
            sys::cuPointerGetAttribute(
                (&mut base as *mut CUdeviceptr).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                addr,
            )
        };
        check("cuPointerGetAttribute(RANGE_START_ADDR)", r).ok()?;
        // SAFETY: plain bytes, written by the driver below.
        let mut h: sys::CUipcMemHandle = unsafe { std::mem::zeroed() };
        // Fails for memory that legacy IPC cannot share (stream-ordered pools, virtual memory
        // management): the operation then moves the bytes through host memory.
        // SAFETY: an out-pointer to a local; the base of a device allocation.
        check("cuIpcGetMemHandle", unsafe { sys::cuIpcGetMemHandle(&mut h, base) }).ok()?;
        let handle: [u8; HANDLE_LEN] = bytemuck::cast(h.reserved);
        Some((handle, addr - base))
    }

    fn open(&self, handle: &[u8; HANDLE_LEN]) -> Result<(CUdeviceptr, usize)> {
        let h = sys::CUipcMemHandle { reserved: bytemuck::cast(*handle) };
        let mut base: CUdeviceptr = 0;
        let flags = sys::CUipcMem_flags_enum::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: an out-pointer to a local; the driver checks the handle.
        check("cuIpcOpenMemHandle", unsafe { sys::cuIpcOpenMemHandle_v2(&mut base, h, flags) })?;
        let (mut start, mut size): (CUdeviceptr, usize) = (0, 0);
        // SAFETY: out-pointers to locals; `base` was just mapped.
        let r = unsafe { sys::cuMemGetAddressRange_v2(&mut start, &mut size, base) };
        if let Err(e) = check("cuMemGetAddressRange", r) {
            self.close(base);
            return Err(e);
        }
        Ok((base, size - (base - start) as usize))
    }

    fn close(&self, base: CUdeviceptr) {
        // SAFETY: a mapping made by `open`, no longer used by any stream; a failure leaves it
        // mapped, which cannot be acted on.
        unsafe { sys::cuIpcCloseMemHandle(base) };
    }
}
