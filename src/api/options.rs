//! Settings of a world, with the defaults a serving deployment wants.

use std::time::Duration;

pub use crate::engine::health::Heartbeat;

/// Which transports a world may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// The fastest available per peer: shared memory for peers on the same host; RDMA for
    /// peers on other hosts where both processes can use it (feature `rdma`: a device with an
    /// active port, or `MW_RDMA_PROVIDER=soft`); TCP for the others (and for any pair where
    /// neither can be set up).
    #[default]
    Auto,
    /// TCP for every peer.
    Tcp,
    /// RDMA for every peer (feature `rdma`; `docs/rdma.md`): formation fails, saying why, where
    /// a pair cannot use it.
    Rdma,
}

impl TransportChoice {
    /// The choice after the `MW_TRANSPORT` environment variable (`tcp` or `rdma` forces that
    /// transport for every world; `auto` or unset leaves the world's own choice).
    pub(crate) fn effective(self) -> TransportChoice {
        match std::env::var("MW_TRANSPORT").as_deref() {
            Ok("tcp") => TransportChoice::Tcp,
            Ok("rdma") => TransportChoice::Rdma,
            _ => self,
        }
    }
}

/// What runs a world's operations on device buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// The crate's own collectives and transports (the default).
    #[default]
    Native,
    /// NCCL (feature `nccl`; `libnccl.so` loaded at run time): the crate forms and watches the
    /// world, NCCL moves its device bytes. Host-memory calls on such a world are refused.
    /// `docs/nccl.md`.
    Nccl,
}

impl BackendChoice {
    /// The choice after the `MW_BACKEND` environment variable (`nccl` or `native`; unset
    /// leaves the world's own choice).
    pub(crate) fn effective(self) -> BackendChoice {
        match std::env::var("MW_BACKEND").as_deref() {
            Ok("nccl") => BackendChoice::Nccl,
            Ok("native") => BackendChoice::Native,
            _ => self,
        }
    }
}

/// Which links of a world checksum their payloads (CRC32C in every data frame's header,
/// checked by the receiver before it uses a byte; a mismatch breaks the world with a
/// `Protocol` cause naming the peer). `docs/fault-model.md` says what it does and does not
/// catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checksum {
    /// None (the default): TCP's own checksum and the shared memory's integrity are trusted.
    #[default]
    Off,
    /// Links over TCP.
    Tcp,
    /// Every link to another rank, shared memory included.
    All,
}

impl Checksum {
    /// The choice after the `MW_CHECKSUM` environment variable (`off`, `tcp` or `all`; unset
    /// leaves the world's own choice).
    pub(crate) fn effective(self) -> Checksum {
        match std::env::var("MW_CHECKSUM").as_deref() {
            Ok("off") => Checksum::Off,
            Ok("tcp") => Checksum::Tcp,
            Ok("all") => Checksum::All,
            _ => self,
        }
    }
}

/// How a world forms and watches its peers. Build with the `with_*` methods:
///
/// ```
/// # use std::time::Duration;
/// let opts = multiworld::WorldOptions::default()
///     .with_timeout(Duration::from_secs(5))
///     .with_secret(b"shared between the ranks");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorldOptions {
    /// Formation deadline: if the world has not formed by then, formation fails with
    /// `Timeout` and leaves nothing behind. Default 30 s.
    pub timeout: Duration,
    /// Heartbeat interval and timeout of the world's links (default 1 s / 3 s); `None`
    /// turns heartbeats off (a dead peer is still seen by its closed connection, but a hung
    /// or cut-off one only by operation deadlines).
    pub heartbeat: Option<Heartbeat>,
    /// Deadline of every operation of the world; an operation that passes it fails with
    /// `Timeout` and breaks the world. Default: `MW_OP_TIMEOUT_MS` if set (0: none), else
    /// none. This is what catches a live peer whose application never posts the matching
    /// call: its links stay healthy, so nothing else will.
    pub op_timeout: Option<Duration>,
    /// Secret that every rank must present when the world forms by address (the id form
    /// carries a random secret of its own). Default: none.
    pub secret: Option<Vec<u8>>,
    /// Interface (name like `eth0`, or an IP) on which this rank listens for its peers.
    /// Default: `MW_SOCKET_IFNAME`, else the address that reaches the rendezvous root.
    pub interface: Option<String>,
    /// Transports the world may use (default: shared memory on one host, RDMA across hosts
    /// where both ends can, else TCP; `MW_TRANSPORT=tcp` or `rdma` forces one).
    pub transport: TransportChoice,
    /// Which links checksum their payloads (default: none; `MW_CHECKSUM=tcp|all|off`).
    pub checksum: Checksum,
    /// Socket buffer size for TCP links, in bytes. Default `None`: the kernel's own sizing,
    /// which grows the buffers with the traffic (setting a size turns that off, and the
    /// kernel caps it at `net.core.rmem_max`/`wmem_max`).
    pub socket_buffer: Option<usize>,
    /// What runs operations on device buffers (default: the crate's own; `MW_BACKEND=nccl`
    /// picks NCCL for every world of the process).
    pub backend: BackendChoice,
}

impl Default for WorldOptions {
    fn default() -> Self {
        WorldOptions {
            timeout: Duration::from_secs(30),
            heartbeat: Some(Heartbeat::default()),
            op_timeout: op_timeout_from_env(),
            secret: None,
            interface: None,
            transport: TransportChoice::Auto,
            checksum: Checksum::Off,
            socket_buffer: None,
            backend: BackendChoice::Native,
        }
    }
}

/// `MW_OP_TIMEOUT_MS`: the default operation deadline for every world of the process (0 or
/// unset: none).
pub(crate) fn op_timeout_from_env() -> Option<Duration> {
    let ms: u64 = std::env::var("MW_OP_TIMEOUT_MS").ok()?.trim().parse().ok()?;
    (ms > 0).then(|| Duration::from_millis(ms))
}

impl WorldOptions {
    /// Sets which links checksum their payloads.
    pub fn with_checksum(mut self, c: Checksum) -> Self {
        self.checksum = c;
        self
    }

    /// Sets the socket buffer size of TCP links (`None`: the kernel's own sizing).
    pub fn with_socket_buffer(mut self, bytes: Option<usize>) -> Self {
        self.socket_buffer = bytes;
        self
    }

    /// Sets the formation deadline.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Sets the heartbeat interval and timeout.
    pub fn with_heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.heartbeat = Some(Heartbeat { interval, timeout });
        self
    }

    /// Turns heartbeats off (for measuring their cost; hung peers then go unnoticed unless an
    /// operation has a deadline).
    pub fn without_heartbeat(mut self) -> Self {
        self.heartbeat = None;
        self
    }

    /// Sets the deadline of every operation.
    pub fn with_op_timeout(mut self, t: Option<Duration>) -> Self {
        self.op_timeout = t;
        self
    }

    /// Sets the secret for forming by address.
    pub fn with_secret(mut self, secret: &[u8]) -> Self {
        self.secret = Some(secret.to_vec());
        self
    }

    /// Sets which transports the world may use.
    pub fn with_transport(mut self, t: TransportChoice) -> Self {
        self.transport = t;
        self
    }

    /// Sets what runs operations on device buffers.
    pub fn with_backend(mut self, b: BackendChoice) -> Self {
        self.backend = b;
        self
    }

    /// Sets the interface to listen on for peers.
    pub fn with_interface(mut self, interface: &str) -> Self {
        self.interface = Some(interface.to_owned());
        self
    }
}
