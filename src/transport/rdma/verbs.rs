//! The one small interface through which the RDMA transport talks to verbs: a reliably
//! connected queue pair with its completion queue and its registered memory. Two providers
//! implement it: `soft.rs`, a software provider between processes of one host (what CI tests
//! the protocol on), and, where the `ibverbs` library and a device exist, the real one.
//!
//! The semantics are RC's: writes from one side land in the peer's registered memory in the
//! order they were posted; a write with immediate consumes one receive the peer posted and
//! gives it a completion carrying the immediate and the length; the writer's completion comes
//! once the write has landed. Any error moves the queue pair to the error state, in which every
//! outstanding work request completes with `Flushed` (or the error that caused it) and no new
//! one is taken.

use std::fmt;
use std::os::fd::RawFd;

/// A registered memory region: where it is, and the keys that name it locally and remotely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    pub addr: u64,
    pub len: usize,
    pub lkey: u32,
    pub rkey: u32,
}

/// Where a write lands: an address in the peer's registered memory and the key it gave out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Remote {
    pub addr: u64,
    pub rkey: u32,
}

/// How a work request ended (the statuses the transport tells apart; `ibv_wc_status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Success,
    /// The local buffer is not inside the region its key names.
    LocalProtection,
    /// The peer refused the write: a wrong key, or outside the region.
    RemoteAccess,
    /// The peer had no receive posted for a write with immediate.
    ReceiverNotReady,
    /// The peer did not answer (gone, or the path to it broke).
    RetryExceeded,
    /// Flushed: the queue pair was in the error state.
    Flushed,
    /// Anything else, in the provider's words.
    Other(String),
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Success => f.write_str("success"),
            Status::LocalProtection => f.write_str("local protection error"),
            Status::RemoteAccess => f.write_str("remote access error"),
            Status::ReceiverNotReady => f.write_str("receiver not ready (no receive posted)"),
            Status::RetryExceeded => f.write_str("transport retry counter exceeded (peer unreachable)"),
            Status::Flushed => f.write_str("work request flushed (queue pair in error)"),
            Status::Other(s) => f.write_str(s),
        }
    }
}

/// Who may reach a registration besides this side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// This side only.
    Local,
    /// The peer may write it.
    RemoteWrite,
    /// The peer may read it.
    RemoteRead,
}

/// What a completion is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// A write this side posted.
    Write,
    /// A read this side posted (the peer's memory into this side's).
    Read,
    /// A receive this side posted, consumed by the peer's write with immediate.
    RecvImm,
}

/// One completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    pub wr_id: u64,
    pub op: Op,
    pub status: Status,
    /// The immediate of a receive.
    pub imm: u32,
    /// Bytes written, for a receive.
    pub len: u32,
}

/// A queue pair's state, as far as the transport cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QpState {
    /// Made, not connected yet.
    Init,
    /// Connected: posts are taken.
    Ready,
    /// Broken: outstanding requests are flushed, no new ones are taken.
    Error,
}

/// A verbs call that could not be made, in the provider's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VerbsError(pub String);

impl fmt::Display for VerbsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A reliably connected queue pair, its completion queue and its memory registrations. No
/// call blocks. Work request ids are the caller's below bit 59; providers may tag the bits
/// above.
pub(crate) trait QueuePair: Send {
    /// The provider and device, for logs (`soft`, `ibverbs mlx5_0 port 1`).
    fn provider(&self) -> String;

    /// What the peer needs to connect to this queue pair (exchanged over the control link).
    fn local_info(&self) -> Vec<u8>;

    /// Connects to the peer's queue pair from its `local_info`. `active`: this side initiates
    /// (providers that need one side to begin use it; the two sides pass opposite values).
    fn connect(&mut self, remote: &[u8], active: bool) -> Result<(), VerbsError>;

    /// Registers `len` bytes at `addr` for local use and for the peer as `access` says.
    ///
    /// # Safety
    /// The memory stays valid, and is not moved or freed, until it is deregistered or the
    /// queue pair is dropped; the provider (and, as `access` allows, the peer) may write or
    /// read it at any time the queue pair is polled, and a device at any time.
    unsafe fn register(&mut self, addr: *mut u8, len: usize, access: Access) -> Result<Region, VerbsError>;

    /// Ends a registration: from its return on, neither this side's requests nor the peer
    /// reach that memory through it (a peer's read in flight fails).
    fn deregister(&mut self, region: &Region);

    /// Posts a write of `len` bytes at `offset` in `local` to `remote`, with immediate `imm`;
    /// its completion carries `wr_id`. `len` may be 0 (the immediate alone).
    fn post_write_imm(
        &mut self,
        wr_id: u64,
        local: &Region,
        offset: usize,
        len: usize,
        remote: Remote,
        imm: u32,
    ) -> Result<(), VerbsError>;

    /// Posts a read of `len` bytes at `remote` into `local` at `offset`; its completion carries
    /// `wr_id`.
    fn post_read(
        &mut self,
        wr_id: u64,
        local: &Region,
        offset: usize,
        len: usize,
        remote: Remote,
    ) -> Result<(), VerbsError>;

    /// Posts a receive for one write with immediate.
    fn post_recv(&mut self, wr_id: u64) -> Result<(), VerbsError>;

    /// Appends the completions that are ready to `out`.
    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), VerbsError>;

    /// True once every write posted has left this process, so that dropping the queue pair
    /// loses none of them (a device: they completed; the software provider: its socket took
    /// their bytes). Moves them along where the provider can.
    fn drained(&mut self) -> bool;

    /// The queue pair's state.
    fn state(&self) -> QpState;

    /// Prepares to sleep until a completion may be ready: the descriptor and `poll` events to
    /// wait for, or `None` when one may already be (poll again instead of sleeping).
    fn arm(&mut self) -> Option<(RawFd, i16)>;

    /// An asynchronous event that ended this queue pair's use (its port went down; it, its
    /// completion queue or the device hit a fatal error), in the provider's words, taken once
    /// (the queue pair is then in the error state); `None` while there is none. Never blocks.
    fn event(&mut self) -> Option<String>;

    /// The descriptor that becomes readable when an asynchronous event comes, where the
    /// provider has one: a sleeping link watches it beside its completions'.
    fn event_fd(&self) -> Option<RawFd> {
        None
    }
}
