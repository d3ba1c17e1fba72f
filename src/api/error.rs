//! The crate's one error type.
//!
//! Kinds follow NCCL's `ncclResult_t` so that the C ABI can map them one to one; every error
//! carries a message that names the world and the ranks involved. Foreign error codes (errno,
//! CUDA, NCCL) are converted once, where they enter the crate.

use std::fmt;

/// What went wrong, in the categories of NCCL's `ncclResult_t` (plus [`ErrorKind::Timeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A CUDA call failed (`ncclUnhandledCudaError`).
    Cuda,
    /// An operating-system call failed: socket, memory map, thread (`ncclSystemError`).
    System,
    /// A bug or broken invariant inside multiworld (`ncclInternalError`).
    Internal,
    /// An argument is wrong on this rank alone: null or short buffer, rank out of range,
    /// unknown type (`ncclInvalidArgument`).
    InvalidArgument,
    /// The call is wrong in context: ranks disagree on count, type, op or root; the world is
    /// already removed; a name is taken (`ncclInvalidUsage`).
    InvalidUsage,
    /// The world is broken: a peer died, hung, was cut off, aborted, or the world was aborted
    /// locally (`ncclRemoteError`). The world cannot be used again; remove and re-form it.
    WorldBroken,
    /// A non-blocking operation has not finished yet (`ncclInProgress`).
    InProgress,
    /// A deadline passed: formation, or an operation's own deadline. An operation that timed
    /// out also breaks its world, because its peers are then in an unknown state.
    Timeout,
}

impl ErrorKind {
    /// A short lower-case name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Cuda => "cuda error",
            ErrorKind::System => "system error",
            ErrorKind::Internal => "internal error",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::InvalidUsage => "invalid usage",
            ErrorKind::WorldBroken => "world broken",
            ErrorKind::InProgress => "in progress",
            ErrorKind::Timeout => "timeout",
        }
    }
}

/// Why a world broke. Carried by [`ErrorKind::WorldBroken`] errors and by
/// [`crate::Event::Broken`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokenCause {
    /// The peer's end of the link closed or reset: the peer process died or closed the world.
    PeerClosed {
        /// The peer's rank.
        peer: usize,
        /// What the transport reported.
        detail: String,
    },
    /// The peer closed the world on purpose (removed it, or its manager shut down).
    PeerLeft {
        /// The peer's rank.
        peer: usize,
    },
    /// Nothing arrived from the peer for longer than the heartbeat timeout: it hangs, is
    /// stopped, or the network between us is cut.
    PeerUnresponsive {
        /// The peer's rank.
        peer: usize,
        /// How long nothing arrived, in milliseconds.
        silent_ms: u64,
    },
    /// The peer told us it broke the world, and why.
    PeerAborted {
        /// The peer's rank.
        peer: usize,
        /// The peer's reason.
        reason: String,
    },
    /// The ranks called different operations, or with different counts, types, ops or roots.
    Mismatch {
        /// The peer whose call differs from ours.
        peer: usize,
        /// What differs.
        detail: String,
    },
    /// A peer sent bytes that are not a valid frame.
    Protocol {
        /// The peer's rank.
        peer: usize,
        /// What was wrong.
        detail: String,
    },
    /// An operation passed its deadline.
    OperationTimeout {
        /// The deadline, in milliseconds.
        after_ms: u64,
    },
    /// This process aborted the world (`World::abort`, removal, or manager shutdown).
    LocalAbort,
    /// NCCL, running the world's device operations (`BackendChoice::Nccl`), reported an error
    /// of its own, or did not start within the world's deadline.
    Nccl {
        /// NCCL's error and message.
        detail: String,
    },
    /// multiworld found its own state inconsistent (a bug); the world is closed to be safe.
    Internal {
        /// What was inconsistent.
        detail: String,
    },
}

impl BrokenCause {
    /// The peer rank this cause points at, if it points at one.
    pub fn peer(&self) -> Option<usize> {
        match self {
            BrokenCause::PeerClosed { peer, .. }
            | BrokenCause::PeerLeft { peer }
            | BrokenCause::PeerUnresponsive { peer, .. }
            | BrokenCause::PeerAborted { peer, .. }
            | BrokenCause::Mismatch { peer, .. }
            | BrokenCause::Protocol { peer, .. } => Some(*peer),
            BrokenCause::OperationTimeout { .. }
            | BrokenCause::LocalAbort
            | BrokenCause::Nccl { .. }
            | BrokenCause::Internal { .. } => None,
        }
    }
}

impl fmt::Display for BrokenCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokenCause::PeerClosed { peer, detail } => {
                write!(f, "peer rank {peer} closed the link ({detail})")
            }
            BrokenCause::PeerLeft { peer } => write!(f, "peer rank {peer} closed the world"),
            BrokenCause::PeerUnresponsive { peer, silent_ms } => {
                write!(f, "peer rank {peer} silent for {silent_ms} ms (hung or cut off)")
            }
            BrokenCause::PeerAborted { peer, reason } => {
                write!(f, "peer rank {peer} broke the world: {reason}")
            }
            BrokenCause::Mismatch { peer, detail } => {
                write!(f, "call differs from peer rank {peer}: {detail}")
            }
            BrokenCause::Protocol { peer, detail } => {
                write!(f, "protocol error from peer rank {peer}: {detail}")
            }
            BrokenCause::OperationTimeout { after_ms } => {
                write!(f, "an operation passed its deadline of {after_ms} ms")
            }
            BrokenCause::LocalAbort => write!(f, "aborted by this process"),
            BrokenCause::Nccl { detail } => write!(f, "NCCL failed: {detail}"),
            BrokenCause::Internal { detail } => write!(f, "internal error: {detail}"),
        }
    }
}

/// The crate's error: a kind, a message naming the world and ranks, and for broken worlds the
/// cause.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    cause: Option<BrokenCause>,
}

impl Error {
    /// Makes an error of a kind with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), cause: None }
    }

    /// The error for an operation of world `world` (its name, seen from `rank`) that the
    /// world's breaking ended. The operations in flight when the world broke get the kind that
    /// fits the cause (`InvalidUsage` for a mismatch this rank detected, `Timeout` for a passed
    /// deadline); later operations (`in_flight == false`) get `WorldBroken`.
    pub(crate) fn broken(world: &str, rank: usize, cause: BrokenCause, in_flight: bool) -> Self {
        let kind = match cause {
            BrokenCause::Mismatch { .. } if in_flight => ErrorKind::InvalidUsage,
            BrokenCause::OperationTimeout { .. } if in_flight => ErrorKind::Timeout,
            _ => ErrorKind::WorldBroken,
        };
        Error { kind, message: format!("world '{world}' (rank {rank}) is broken: {cause}"), cause: Some(cause) }
    }

    pub(crate) fn invalid_arg(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    pub(crate) fn invalid_usage(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidUsage, message)
    }

    pub(crate) fn system(context: impl fmt::Display, e: std::io::Error) -> Self {
        let hint = match e.raw_os_error() {
            Some(libc::EMFILE) => match crate::sys::descriptor_limit() {
                Some(n) => format!(
                    " (this process may hold {n} open descriptors, its RLIMIT_NOFILE, already raised to the hard \
                     limit; each world holds one per link to another rank: raise the hard limit, e.g. `ulimit -Hn`, or \
                     hold fewer worlds)"
                ),
                None => " (the process's RLIMIT_NOFILE is reached)".to_string(),
            },
            Some(libc::ENFILE) => " (the system's table of open files is full: fs.file-max)".to_string(),
            _ => String::new(),
        };
        Error::new(ErrorKind::System, format!("{context}: {e}{hint}"))
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Internal, message)
    }

    pub(crate) fn timeout(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Timeout, message)
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, naming the world and the ranks involved.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Why the world broke, for errors caused by a broken world.
    pub fn broken_cause(&self) -> Option<&BrokenCause> {
        self.cause.as_ref()
    }

    /// True when the error means the world can no longer be used.
    pub fn is_world_broken(&self) -> bool {
        self.cause.is_some()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for Error {}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
