//! Backends: what executes a world's operations.
//!
//! The API (`api/world.rs`) validates a call, turns it into [`Posted`] operations and hands them to
//! the world's backend. `native` runs them with the crate's own collectives over its own
//! transports. Every backend breaks the world on failure and completes each operation exactly
//! once, so the API layer never needs to know which one it talks to.

mod native;

use crate::api::error::BrokenCause;
use crate::api::request::Progress;
use crate::coll::OpDesc;
use crate::engine::{Direct, Posted, WorldStats};
use crate::sys::buf::RawBuf;
use crate::transport::TransportKind;

/// Executes the operations of one world.
pub(crate) trait Backend: Progress {
    /// Accepts operations, in order, as one batch. `driven` means the caller will wait on
    /// them right away (a blocking call) and may drive them itself.
    fn post(&self, ops: Vec<Posted>, driven: bool);
    /// [`Backend::post`] for one operation (the common case, without a vector).
    fn post_one(&self, op: Posted, driven: bool);
    /// Runs a lone send or receive at once if this backend can (the direct path of shared memory and TCP,
    /// `engine/direct.rs`); `None` when the call must be posted.
    fn run_direct(&self, _desc: &OpDesc, _send: RawBuf, _recv: RawBuf) -> Direct {
        Direct::No
    }
    /// Breaks the world from this side: local, non-blocking, idempotent.
    fn abort(&self);
    /// [`Backend::abort`] with a cause of the caller's (told to the peers); a world already
    /// broken keeps its first cause.
    fn break_with(&self, cause: BrokenCause);
    /// Aborts and releases everything (threads, sockets, memory); returns when done.
    fn close(&self);
    /// Why the world broke, if it did.
    fn broken(&self) -> Option<BrokenCause>;
    /// Counters.
    fn stats(&self) -> WorldStats;
    /// Transport per peer rank (`None` for this rank).
    fn transports(&self) -> Vec<Option<TransportKind>>;
    /// Per peer rank, where a world made from this one may link the pair without connecting
    /// it anew: a shared-memory lane (`transport/shm/lane.rs`) or a TCP channel
    /// (`transport/tcp.rs`); empty where there is none. `broken`: also when this world is
    /// broken (its live peers' segments and sockets, and their other lanes and channels, are
    /// untouched by that).
    fn lane_sources(&self, _broken: bool) -> Vec<Option<crate::transport::PairSource>> {
        Vec::new()
    }
}
