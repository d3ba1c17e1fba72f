//! Addresses and the socket steps of formation (bootstrap and link handshakes), as waits of
//! the formation thread (`exec.rs`).
//!
//! Which address a rank listens on for its peers: the interface named by
//! [`WorldOptions::interface`](crate::WorldOptions) or `MW_SOCKET_IFNAME` (an interface name
//! such as `eth0`, or an IP address), else the address this host uses to reach the
//! rendezvous root — which is, by construction, one that the other ranks can reach too.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::exec;
use crate::api::error::{Error, ErrorKind, Result};
use crate::sys;
use crate::sys::sync::{AtomicBool, Ordering};

/// Largest bootstrap message accepted (a table for thousands of ranks fits).
pub(crate) const MAX_MESSAGE: usize = 1 << 20;
/// How often a formation step that waits looks whether its formation was abandoned.
pub(crate) const CANCEL_CHECK: Duration = Duration::from_millis(50);

/// The error of a step whose formation was abandoned ([`crate::Formation::abort`]).
pub(crate) fn abandoned() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "the formation was abandoned")
}

/// True once `cancel` (if any) is set.
pub(crate) fn is_cancelled(cancel: Option<&AtomicBool>) -> bool {
    cancel.is_some_and(|c| c.load(Ordering::Acquire))
}

/// Waits until `fd` has one of `events`: `TimedOut` once `deadline` passes, the
/// [`abandoned`] error once `cancel` is set (looked at every [`CANCEL_CHECK`]).
pub(crate) async fn wait_for(fd: RawFd, events: i16, deadline: Instant, cancel: Option<&AtomicBool>) -> io::Result<()> {
    loop {
        if is_cancelled(cancel) {
            return Err(abandoned());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        let step = if cancel.is_some() { deadline.min(now + CANCEL_CHECK) } else { deadline };
        if exec::ready(&[(fd, events)], step).await? {
            return Ok(());
        }
    }
}

/// The IP of interface `spec` (a name like `eth0`, or an IP address literal).
pub(crate) fn interface_ip(spec: &str) -> Result<IpAddr> {
    if let Ok(ip) = spec.parse::<IpAddr>() {
        return Ok(ip);
    }
    let addrs = sys::interface_addrs().map_err(|e| Error::system("listing network interfaces", e))?;
    let pick = addrs.iter().filter(|a| a.name == spec).min_by_key(|a| (a.addr.is_ipv6(), !a.up)).map(|a| a.addr);
    pick.ok_or_else(|| {
        let names: Vec<_> = addrs.iter().map(|a| a.name.as_str()).collect();
        Error::invalid_arg(format!("no network interface '{spec}' (this host has: {})", names.join(", ")))
    })
}

/// The IP of the configured interface (`configured`, else `MW_SOCKET_IFNAME`), if one is
/// configured.
pub(crate) fn configured_ip(configured: Option<&str>) -> Option<Result<IpAddr>> {
    let spec = configured.map(str::to_owned).or_else(|| std::env::var("MW_SOCKET_IFNAME").ok())?;
    (!spec.is_empty()).then(|| interface_ip(&spec))
}

/// The IP to listen on when nothing says otherwise: the configured interface
/// (`MW_SOCKET_IFNAME`), else the first interface that is up and not loopback, else loopback.
pub(crate) fn default_ip(configured: Option<&str>) -> Result<IpAddr> {
    if let Some(ip) = configured_ip(configured) {
        return ip;
    }
    let addrs = sys::interface_addrs().unwrap_or_default();
    Ok(addrs
        .iter()
        .filter(|a| a.up && !a.loopback && a.addr.is_ipv4())
        .map(|a| a.addr)
        .next()
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)))
}

/// Resolves `host:port` to one socket address (IPv4 preferred).
pub(crate) fn resolve(addr: &str) -> Result<SocketAddr> {
    let mut all: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| Error::invalid_arg(format!("cannot resolve address '{addr}': {e}")))?
        .collect();
    all.sort_by_key(|a| a.is_ipv6());
    all.into_iter().next().ok_or_else(|| Error::invalid_arg(format!("address '{addr}' resolves to nothing")))
}

/// Time left until `deadline`, or a `Timeout` error naming `what`.
pub(crate) fn left(deadline: Instant, what: &dyn Fn() -> String) -> Result<Duration> {
    let now = Instant::now();
    if now >= deadline {
        return Err(Error::timeout(what()));
    }
    Ok(deadline - now)
}

/// Connects to `addr` without blocking the formation thread.
pub(crate) async fn connect(addr: SocketAddr, deadline: Instant, cancel: Option<&AtomicBool>) -> io::Result<TcpStream> {
    let (s, done) = sys::connect_start(addr)?;
    if !done {
        wait_for(s.as_raw_fd(), libc::POLLOUT, deadline, cancel).await?;
        sys::socket_error(s.as_raw_fd())?;
    }
    s.set_nodelay(true)?;
    Ok(s)
}

/// Connects to `addr`, retrying while nobody listens yet (the peer may start later), until
/// `deadline`.
pub(crate) async fn connect_retry(
    addr: SocketAddr,
    deadline: Instant,
    cancel: Option<&AtomicBool>,
    what: &(dyn Fn() -> String + Sync),
) -> Result<TcpStream> {
    let mut backoff = Duration::from_micros(200);
    loop {
        if is_cancelled(cancel) {
            return Err(Error::system(what(), abandoned()));
        }
        left(deadline, what)?;
        match connect(addr, deadline, cancel).await {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(Error::timeout(what())),
            Err(e)
                if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset)
                    || e.raw_os_error() == Some(libc::EAGAIN) =>
            {
                exec::sleep_until((Instant::now() + backoff).min(deadline)).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(Error::system(format!("connecting to {addr} ({})", what()), e)),
        }
    }
}

/// Connects once, no retry: the peer is known to be listening, so a refusal means it is gone.
pub(crate) async fn connect_once(
    addr: SocketAddr,
    deadline: Instant,
    cancel: Option<&AtomicBool>,
    what: &(dyn Fn() -> String + Sync),
) -> Result<TcpStream> {
    left(deadline, what)?;
    connect(addr, deadline, cancel).await.map_err(|e| {
        let kind = if e.kind() == io::ErrorKind::TimedOut { ErrorKind::Timeout } else { ErrorKind::WorldBroken };
        Error::new(kind, format!("{}: cannot connect to {addr}: {e}", what()))
    })
}

/// Binds a listener on `ip` with a free port.
pub(crate) fn listen_any_port(ip: IpAddr) -> Result<TcpListener> {
    TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|e| Error::system(format!("listening on {ip}"), e))
}

/// Writes one length-prefixed message, bounded by `deadline` and `cancel`.
pub(crate) async fn send_msg(
    s: &TcpStream,
    msg: &[u8],
    deadline: Instant,
    cancel: Option<&AtomicBool>,
) -> io::Result<()> {
    let mut framed = Vec::with_capacity(4 + msg.len());
    framed.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    framed.extend_from_slice(msg);
    write_all(s, &framed, deadline, cancel).await
}

/// Writes all of `bytes`, bounded by `deadline` and `cancel`.
pub(crate) async fn write_all(
    s: &TcpStream,
    bytes: &[u8],
    deadline: Instant,
    cancel: Option<&AtomicBool>,
) -> io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        match sys::send_vectored(s.as_raw_fd(), &[&bytes[done..]]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_for(s.as_raw_fd(), libc::POLLOUT, deadline, cancel).await?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes one length-prefixed message if the socket takes it now (the roots thread's
/// answers, a few bytes on a fresh connection); never waits.
pub(crate) fn send_now(s: &TcpStream, msg: &[u8]) -> io::Result<()> {
    let mut framed = Vec::with_capacity(4 + msg.len());
    framed.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    framed.extend_from_slice(msg);
    let n = sys::send_vectored(s.as_raw_fd(), &[&framed])?;
    if n < framed.len() {
        return Err(io::Error::new(io::ErrorKind::WouldBlock, "the peer's socket is full"));
    }
    Ok(())
}

/// Reads one length-prefixed message (bounded by `deadline` and `cancel`; refuses oversized
/// ones).
pub(crate) async fn recv_msg(s: &TcpStream, deadline: Instant, cancel: Option<&AtomicBool>) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    read_exact_until(s, &mut len, deadline, cancel).await?;
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("message of {n} bytes is too large")));
    }
    let mut buf = vec![0u8; n];
    read_exact_until(s, &mut buf, deadline, cancel).await?;
    Ok(buf)
}

/// Fills `buf` from `s`, waiting (see [`wait_for`]) while nothing is there; each read takes
/// what is there and never blocks.
pub(crate) async fn read_exact_until(
    s: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    cancel: Option<&AtomicBool>,
) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match recv_now(s, &mut buf[done..]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_for(s.as_raw_fd(), libc::POLLIN, deadline, cancel).await?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One `recv(2)` that does not wait, whatever the socket's mode.
pub(crate) fn recv_now(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    sys::recv_nowait(s.as_raw_fd(), buf)
}
