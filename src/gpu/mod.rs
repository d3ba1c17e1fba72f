//! The GPU layer (feature `cuda`): the CUDA driver calls checked once and turned into
//! [`Error`](crate::Error)s, the crate's kernels (`cuda`), staging device buffers through
//! pinned host memory and the CUDA IPC paths (`staging`), and [`DeviceWorld`], the Rust API
//! over them (the C API uses it too).

pub mod cuda;
pub(crate) mod device;
pub(crate) mod device_world;
#[cfg(feature = "nccl")]
pub mod nccl;
pub(crate) mod staging;
