//! # multiworld
//!
//! Collective communication for elastic model serving. A process belongs to many small
//! communicators — **worlds** — each its own fault domain: a dead, hung or cut-off peer breaks
//! only the worlds it belongs to (every pending call there returns an error promptly), the
//! other worlds keep running, and new worlds form while traffic flows.
//!
//! ```no_run
//! use multiworld::{ReduceOp, UniqueId, WorldManager};
//!
//! # fn main() -> multiworld::Result<()> {
//! // On one process: make an id and hand its text form to every rank (env var, file, ...).
//! let id = UniqueId::new()?;
//! let text = id.to_string();
//!
//! // On every rank:
//! let id: UniqueId = text.parse()?;
//! let manager = WorldManager::new();
//! let world = manager.init_world("stage0-stage1", &id, /* rank */ 0, /* size */ 2)?;
//! let send = vec![1.0f32; 1024];
//! let mut recv = vec![0.0f32; 1024];
//! world.all_reduce(&send, &mut recv, ReduceOp::Sum)?;
//! # Ok(()) }
//! ```
//!
//! Layers: the API ([`WorldManager`], [`World`]), collectives written once as plans of
//! point-to-point transfers (`coll`), transports that move frames (`transport`), and a backend
//! that runs a world's operations (`backend`). `docs/architecture.md` follows one all-reduce
//! through all of them.
//!
//! With the `cuda` feature, `DeviceWorld` runs the same operations on device buffers, ordered
//! on a CUDA stream that never waits forever on a failed peer, and the `cuda` module holds the
//! crate's kernels (`docs/cuda.md`).

#![deny(unsafe_op_in_unsafe_fn)]

// The layers, one folder each (docs/architecture.md), from the system calls up to the API.
#[macro_use]
mod sys;
mod api;
mod backend;
mod bootstrap;
mod coll;
mod driver;
mod engine;
pub mod ffi;
#[cfg(feature = "cuda")]
mod gpu;
mod transport;

pub use api::error::{BrokenCause, Error, ErrorKind, Result};
pub use api::id::{UniqueId, UNIQUE_ID_BYTES};
pub use api::manager::{Event, Formation, NextEvent, Rendezvous, WorldManager};
pub use api::options::{BackendChoice, Checksum, Heartbeat, TransportChoice, WorldOptions};
pub use api::request::{Failed, Request};
pub use api::scope::{Scope, ScopedGroup, ScopedRequest};
pub use api::types::{DataType, Element, ReduceOp};
pub use api::world::{Group, World, WorldState};
pub use engine::WorldStats;
#[cfg(feature = "cuda")]
pub use gpu::cuda;
#[cfg(feature = "cuda")]
pub use gpu::device_world::{DeviceGroup, DeviceWorld, IpcStats};
/// The NCCL backend's library (feature `nccl`): which version this process loads.
#[cfg(feature = "nccl")]
pub use gpu::nccl;
pub use transport::TransportKind;

/// The directory of worlds formed through etcd (feature `etcd`): [`etcd::list`],
/// [`etcd::watch`]; `mw-worlds` prints it.
#[cfg(feature = "etcd")]
pub mod etcd {
    pub use crate::api::directory::{list, watch, EntryState, Member, WorldEntry};
}

/// Re-exported so that users name the 16-bit float types without depending on `half`.
pub use half::{bf16, f16};

/// Internals exposed for the crate's own benchmarks (`benches/`); not part of the API.
#[doc(hidden)]
pub mod __bench {
    /// `dst[i] = dst[i] op src[i]` over byte buffers of `dtype` elements (the host reduction
    /// kernel).
    pub fn reduce_into(dtype: crate::DataType, op: crate::ReduceOp, dst: &mut [u8], src: &[u8]) {
        crate::coll::reduce::reduce_into(dtype, op, dst, src)
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    /// A small deterministic generator for tests (xorshift64*).
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        pub(crate) fn fill(&mut self, b: &mut [u8]) {
            for x in b {
                *x = self.next() as u8;
            }
        }
    }
}
