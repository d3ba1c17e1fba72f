//! Settings of a world, with the defaults a serving deployment wants.

use std::time::Duration;

pub use crate::engine::health::Heartbeat;

/// Which transports a world may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// The fastest available per peer: shared memory for peers on the same host, TCP for the
    /// others (and for any pair where shared memory cannot be set up).
    #[default]
    Auto,
    /// TCP for every peer.
    Tcp,
}

impl TransportChoice {
    /// The choice after the `MW_TRANSPORT` environment variable (`tcp` forces TCP for every
    /// world; `auto` or unset leaves the world's own choice).
    pub(crate) fn effective(self) -> TransportChoice {
        match std::env::var("MW_TRANSPORT").as_deref() {
            Ok("tcp") => TransportChoice::Tcp,
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
    /// Heartbeat interval and timeout of the world's links (default 200 ms / 3 s); `None`
    /// turns heartbeats off (a dead peer is still seen by its closed connection, but a hung
    /// or cut-off one only by operation deadlines).
    pub heartbeat: Option<Heartbeat>,
    /// Deadline of every operation of the world; an operation that passes it fails with
    /// `Timeout` and breaks the world. Default: none.
    pub op_timeout: Option<Duration>,
    /// Secret that every rank must present when the world forms by address (the id form
    /// carries a random secret of its own). Default: none.
    pub secret: Option<Vec<u8>>,
    /// Interface (name like `eth0`, or an IP) on which this rank listens for its peers.
    /// Default: `MW_SOCKET_IFNAME`, else the address that reaches the rendezvous root.
    pub interface: Option<String>,
    /// Transports the world may use (default: shared memory where possible, else TCP;
    /// `MW_TRANSPORT=tcp` forces TCP).
    pub transport: TransportChoice,
}

impl Default for WorldOptions {
    fn default() -> Self {
        WorldOptions {
            timeout: Duration::from_secs(30),
            heartbeat: Some(Heartbeat::default()),
            op_timeout: None,
            secret: None,
            interface: None,
            transport: TransportChoice::Auto,
        }
    }
}

impl WorldOptions {
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

    /// Sets the interface to listen on for peers.
    pub fn with_interface(mut self, interface: &str) -> Self {
        self.interface = Some(interface.to_owned());
        self
    }
}
