//! Transports: how bytes move between two ranks of a world.
//!
//! A [`Link`] carries frames (a [`FrameHeader`] and its payload) in both directions between
//! this rank and one peer, without ever blocking: every call does what it can now and says how
//! far it got. The engine decides what to send and where incoming payloads go; the link only
//! moves bytes and reports failures. Each transport is one file and one `Link` impl:
//!
//! | transport | reaches | file |
//! |---|---|---|
//! | `shm` | the same host (same kernel and network namespace) | `shm/` |
//! | `tcp` | any host | `tcp.rs` |
//! | `rdma` | hosts with RDMA devices, or one host through the software provider (feature `rdma`) | `rdma/` |
//! | `loopback` | this rank itself (send/recv to self) | `loopback.rs` |
//!
//! A world picks a transport per peer when it forms ([`TransportKind`]).

pub(crate) mod loopback;
#[cfg(feature = "rdma")]
pub(crate) mod rdma;
pub(crate) mod shm;
pub(crate) mod tcp;
pub(crate) mod wake;

/// Whether this process can link a peer on another host by RDMA when its world lets the crate
/// choose: a device with an active port, or the software provider where `MW_RDMA_PROVIDER=soft`
/// asks for it; looked for once per process (`rdma::usable`). Never without the `rdma` feature.
pub(crate) fn rdma_across_hosts() -> bool {
    #[cfg(feature = "rdma")]
    {
        static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *USABLE.get_or_init(|| rdma::usable().is_ok())
    }
    #[cfg(not(feature = "rdma"))]
    false
}

use std::os::fd::RawFd;

use crate::engine::wire::{FrameHeader, OpKind};

/// The transports a world can use for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportKind {
    /// Rings in shared memory: peers on the same host.
    Shm,
    /// TCP sockets: works between any two hosts.
    Tcp,
    /// RDMA writes over a reliably connected queue pair (feature `rdma`).
    Rdma,
    /// This rank to itself.
    Loopback,
    /// In-memory pair inside one process (tests only).
    #[doc(hidden)]
    Memory,
}

impl TransportKind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Shm => "shm",
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
            TransportKind::Loopback => "loopback",
            TransportKind::Memory => "memory",
        }
    }
}

/// Where a world made from a world may link a pair without connecting it anew: a free lane
/// of the pair's shared-memory segment (`shm/lane.rs`), or a channel of its TCP socket
/// (`tcp.rs`).
#[derive(Clone)]
pub(crate) enum PairSource {
    Shm(shm::LaneSource),
    Tcp(tcp::TcpSource),
}

/// Why a link stopped working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkError {
    /// The peer closed its end (clean EOF) or the connection reset.
    Closed(String),
    /// The peer left on purpose (its world closed gracefully) and said so out of band (a
    /// shared-memory link's "left" word), where its close frame could not be sent.
    Left(String),
    /// The peer sent bytes that are not a valid frame.
    Protocol(String),
    /// Any other failure of the underlying channel.
    Io(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Closed(s) | LinkError::Left(s) | LinkError::Protocol(s) | LinkError::Io(s) => f.write_str(s),
        }
    }
}

/// Where the payload of an incoming frame goes.
pub(crate) enum Sink<'a> {
    /// Copy it into this slice, exactly as long as the payload; may take several calls.
    Copy(&'a mut [u8]),
    /// Show the whole payload to this function, once, when all of it is available.
    Visit(&'a mut dyn FnMut(&[u8])),
    /// Drop it.
    Discard,
}

/// How to wait for a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Armed {
    /// The link can make progress now; do not sleep.
    Ready,
    /// Sleep until this descriptor reports these `poll` events.
    Wait(RawFd, i16),
    /// Nothing to wait for on this link.
    Idle,
}

/// What a link counts for its world's stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LinkCounters {
    /// Payload bytes received by single copy (shared memory's cross-memory reads).
    pub single_copy_bytes: u64,
    /// Times a shared-memory ring could not grow (a full `/dev/shm`) and stayed small.
    pub ring_grow_refused: u64,
}

/// A bidirectional, non-blocking frame channel to one peer.
pub(crate) trait Link: Send {
    /// The transport of this link.
    fn kind(&self) -> TransportKind;

    /// What the link counted for the world's stats (shared memory's).
    fn counters(&self) -> LinkCounters {
        LinkCounters::default()
    }

    /// Abandons a frame that the peer may still be reading from this process's memory, so that
    /// it fails there rather than read a buffer that changes: called when the world breaks,
    /// before its calls return.
    fn revoke(&mut self) {}

    /// Largest payload this link puts in one frame of a message of `total` bytes of an
    /// operation of kind `op`.
    fn max_payload(&self, op: OpKind, total: usize) -> usize;

    /// Largest payload of a lone message that the direct path (`engine/direct.rs`) may move
    /// over this link as one frame; 0 (the default) keeps this link off the direct path.
    fn direct_max(&self) -> usize {
        0
    }

    /// True when all of the peeked frame's payload can be consumed now, without waiting for
    /// more of it (reading what has arrived). A memory link's frame is whole once peeked.
    fn payload_ready(&mut self) -> Result<bool, LinkError> {
        Ok(true)
    }

    /// Writes as much as it can of `header` followed by `payload`; `written` counts the bytes
    /// already written (header first) and is advanced. True once all bytes are written.
    fn write(&mut self, header: &[u8], payload: &[u8], written: &mut usize) -> Result<bool, LinkError>;

    /// The header of the next incoming frame, once all of it has arrived. Repeated calls return
    /// the same header until its payload is consumed.
    fn peek(&mut self) -> Result<Option<FrameHeader>, LinkError>;

    /// Moves the payload of the peeked frame into `sink`. True once the whole payload is
    /// consumed; the next `peek` then looks at the following frame.
    fn consume(&mut self, sink: Sink<'_>) -> Result<bool, LinkError>;

    /// Total bytes received and sent so far (liveness: any byte is a sign of life).
    fn traffic(&self) -> (u64, u64);

    /// Prepares to sleep until the link can read (`read`) or write (`write`).
    fn arm(&mut self, read: bool, write: bool) -> Armed;

    /// Called now and then (whenever the world's timers run: at its heartbeat ticks, or on
    /// every pass of a world without heartbeats): a link may trim what it holds for traffic
    /// that stopped (the shared-memory rings shrink back to their small form).
    fn tick(&mut self, _now: std::time::Instant) {}

    /// A descriptor that reports the peer hanging up, for watching a world that nobody waits
    /// on; `poll` events to ask for. `idle`: the world has nothing to do (else a caller drives
    /// it and sleeps on the link's own descriptors, which report the same). When it reports,
    /// the watcher calls [`Link::reported`].
    fn hangup_fd(&mut self, idle: bool) -> Option<(RawFd, i16)>;

    /// The descriptor of [`Link::hangup_fd`] reported: the next `peek` looks at it (an idle
    /// world's link does not, which keeps its heartbeat passes free of system calls).
    fn reported(&mut self) {}

    /// True when waiting on this link is best done by spinning a little before sleeping: new
    /// data on a memory link shows up without a system call, and on a socket a few
    /// non-blocking reads cost less than a sleep and a wake-up when the peer answers within
    /// microseconds.
    fn spins(&self) -> bool {
        false
    }

    /// True when frames that arrived before their receive was posted should be moved out of
    /// the link now. A socket must be read to keep flowing; a ring in shared memory is a
    /// buffer itself, so its frames stay in place (and are later copied once, straight to
    /// their destination) until it fills up.
    fn drain_early_frames(&self) -> bool {
        true
    }

    /// True while frames that the peer sent are still waiting in the link to be read (a ring
    /// in shared memory keeps them after its writer left; a socket is read eagerly).
    fn holds_frames(&self) -> bool {
        false
    }

    /// Ends the link gracefully: what was written still arrives, then the peer sees the end.
    fn shutdown(&mut self) {}

    /// Where a world made from this link's world may link the same pair instead of forming a
    /// link of its own: a lane of its segment (`shm/lane.rs`) or a channel of its socket
    /// (`tcp.rs`); `None` for other transports.
    fn lane_source(&mut self) -> Option<PairSource> {
        None
    }

    /// The pair's segment, whatever became of this link (closed by a break, or its peer's
    /// end gone), or its socket while that works: a broken world keeps it for a `shrink`,
    /// whose other lanes and channels a break leaves alone; `None` for other transports.
    fn segment_source(&mut self) -> Option<PairSource> {
        None
    }
}
