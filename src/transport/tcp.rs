//! The TCP transport: frames over one non-blocking stream socket per peer pair.
//!
//! Writes go out with one vectored `sendmsg` (header and payload together, no copy), or, for a
//! frame of at most 512 bytes, gathered into one buffer and sent with one `send`. Reads fill
//! a staging buffer so that many small frames cost one system call; a large payload headed for
//! a plain copy is read straight into its destination instead. `TCP_NODELAY` is on (latency of
//! small messages). Socket buffers are left to the kernel, which grows them with the traffic
//! (asking for a size turns that growth off, and a stock kernel caps the size far below what a
//! fast link wants); `WorldOptions::socket_buffer` sets one where an operator knows better.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};

use super::{Armed, Link, LinkError, Sink, TransportKind};
use crate::engine::wire::{FrameHeader, OpKind, HEADER_LEN};
use crate::sys;
use crate::sys::buf::Scratch;

/// Largest payload per frame on TCP.
pub(crate) const TCP_MAX_PAYLOAD: usize = 512 << 10;
/// Staging buffer: one full frame plus its header, with room to spare.
const STAGING: usize = TCP_MAX_PAYLOAD + 4 * HEADER_LEN + (64 << 10);
/// Payload remainders at least this large are read straight into their destination.
const DIRECT_READ_MIN: usize = 32 << 10;
/// Largest payload of a lone send or receive done on the direct path (`engine/direct.rs`):
/// small enough that a write rarely stops part-way (the engine keeps a copy of the rest
/// then) and that the payload is read through the staging buffer.
pub(crate) const TCP_DIRECT_MAX: usize = 16 << 10;

pub(crate) struct TcpLink {
    sock: TcpStream,
    staging: Scratch,
    start: usize,
    end: usize,
    /// The frame whose payload is being consumed, and how much of it already is.
    current: Option<(FrameHeader, usize)>,
    rx_bytes: u64,
    tx_bytes: u64,
}

/// Tunes a connected stream for carrying frames: no Nagle delay, non-blocking, and socket
/// buffers of `buffer` bytes if asked (else the kernel's own, growing sizing).
pub(crate) fn tune(sock: &TcpStream, buffer: Option<usize>) -> io::Result<()> {
    sock.set_nodelay(true)?;
    if let Some(b) = buffer {
        let fd = sock.as_raw_fd();
        let b = b.min(i32::MAX as usize) as i32;
        // Best effort: a kernel limit below the wish is not an error.
        let _ = sys::set_sockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, b);
        let _ = sys::set_sockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, b);
    }
    sock.set_nonblocking(true)
}

fn io_err(e: io::Error) -> LinkError {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof => LinkError::Closed(e.to_string()),
        _ => LinkError::Io(e.to_string()),
    }
}

impl TcpLink {
    /// Wraps a connected stream (already past the link handshake).
    pub(crate) fn new(sock: TcpStream, buffer: Option<usize>) -> io::Result<TcpLink> {
        tune(&sock, buffer)?;
        Ok(TcpLink { sock, staging: Scratch::new(STAGING), start: 0, end: 0, current: None, rx_bytes: 0, tx_bytes: 0 })
    }

    fn staged(&self) -> usize {
        self.end - self.start
    }

    fn staging_mut(&mut self) -> &mut [u8] {
        let raw = self.staging.raw();
        // SAFETY: the staging scratch is owned by this link and only borrowed here, once.
        unsafe { raw.bytes_mut(0, raw.len()) }.unwrap_or(&mut [])
    }

    /// Makes room for at least `need` contiguous bytes from `start`, then reads what the socket
    /// has. Returns false when nothing more is available now.
    fn fill(&mut self, need: usize) -> Result<bool, LinkError> {
        let (start, end) = (self.start, self.end);
        if start + need > STAGING || end == STAGING {
            self.staging_mut().copy_within(start..end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let end = self.end;
        let r = {
            let raw = self.staging.raw();
            // SAFETY: as in staging_mut; the read target is the free tail.
            let tail = unsafe { raw.bytes_mut(end, STAGING - end) }.unwrap_or(&mut []);
            (&self.sock).read(tail)
        };
        match r {
            Ok(0) => Err(LinkError::Closed("peer closed the connection".into())),
            Ok(n) => {
                self.end += n;
                self.rx_bytes += n as u64;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(io_err(e)),
        }
    }

    /// True once at least `n` bytes are staged, reading what the socket has until then; false
    /// when fewer have arrived so far.
    fn have(&mut self, n: usize) -> Result<bool, LinkError> {
        while self.staged() < n {
            if !self.fill(n)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn finish_frame(&mut self) {
        self.current = None;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

impl Link for TcpLink {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn max_payload(&self, _op: OpKind, _total: usize) -> usize {
        TCP_MAX_PAYLOAD
    }

    fn write(&mut self, header: &[u8], payload: &[u8], written: &mut usize) -> Result<bool, LinkError> {
        let total = header.len() + payload.len();
        while *written < total {
            let w = *written;
            let r = if w < header.len() {
                sys::send_vectored(self.sock.as_raw_fd(), &[&header[w..], payload])
            } else {
                sys::send_vectored(self.sock.as_raw_fd(), &[&payload[w - header.len()..]])
            };
            match r {
                Ok(n) => {
                    *written += n;
                    self.tx_bytes += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(true)
    }

    fn peek(&mut self) -> Result<Option<FrameHeader>, LinkError> {
        if let Some((h, _)) = self.current {
            return Ok(Some(h));
        }
        if !self.have(HEADER_LEN)? {
            return Ok(None);
        }
        let raw = self.staging.raw();
        // SAFETY: staging is owned by this link; the range was filled above.
        let bytes = unsafe { raw.bytes(self.start, HEADER_LEN) }.unwrap_or(&[]);
        let h = FrameHeader::decode(bytes).map_err(LinkError::Protocol)?;
        if h.len as usize > TCP_MAX_PAYLOAD {
            return Err(LinkError::Protocol(format!("frame of {} bytes is over the TCP limit", h.len)));
        }
        self.start += HEADER_LEN;
        self.current = Some((h, 0));
        Ok(Some(h))
    }

    fn consume(&mut self, sink: Sink<'_>) -> Result<bool, LinkError> {
        let Some((h, mut done)) = self.current else {
            return Err(LinkError::Io("consume without a peeked frame".into()));
        };
        let len = h.len as usize;
        match sink {
            Sink::Copy(dst) => {
                if dst.len() != len {
                    return Err(LinkError::Io("copy target does not match the payload".into()));
                }
                while done < len {
                    let staged = self.staged();
                    if staged > 0 {
                        let n = staged.min(len - done);
                        let raw = self.staging.raw();
                        // SAFETY: staging is owned by this link; the range holds staged bytes.
                        let src = unsafe { raw.bytes(self.start, n) }.unwrap_or(&[]);
                        dst[done..done + n].copy_from_slice(src);
                        self.start += n;
                        done += n;
                        continue;
                    }
                    if len - done >= DIRECT_READ_MIN {
                        match (&self.sock).read(&mut dst[done..]) {
                            Ok(0) => return Err(LinkError::Closed("peer closed the connection".into())),
                            Ok(n) => {
                                done += n;
                                self.rx_bytes += n as u64;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(io_err(e)),
                        }
                    } else if !self.fill(len - done)? {
                        break;
                    }
                }
                self.current = Some((h, done));
                if done < len {
                    return Ok(false);
                }
            }
            Sink::Visit(f) => {
                if !self.have(len)? {
                    return Ok(false);
                }
                let raw = self.staging.raw();
                // SAFETY: staging is owned by this link; the payload range is staged.
                f(unsafe { raw.bytes(self.start, len) }.unwrap_or(&[]));
                self.start += len;
            }
            Sink::Discard => {
                while done < len {
                    if self.staged() == 0 && !self.fill(1)? {
                        self.current = Some((h, done));
                        return Ok(false);
                    }
                    let n = self.staged().min(len - done);
                    self.start += n;
                    done += n;
                }
            }
        }
        self.finish_frame();
        Ok(true)
    }

    fn traffic(&self) -> (u64, u64) {
        (self.rx_bytes, self.tx_bytes)
    }

    fn arm(&mut self, read: bool, write: bool) -> Armed {
        let mut ev = libc::POLLRDHUP;
        if read {
            // A whole header that nobody looked at yet: there is work now. (A frame already
            // peeked but not consumed is waiting for more of its payload, or for the engine,
            // which passes before it sleeps: one the direct path peeked and left is taken by
            // the pass of the call posted right after.)
            if self.current.is_none() && self.staged() >= HEADER_LEN {
                return Armed::Ready;
            }
            ev |= libc::POLLIN;
        }
        if write {
            ev |= libc::POLLOUT;
        }
        Armed::Wait(self.sock.as_raw_fd(), ev)
    }

    fn hangup_fd(&mut self) -> Option<(RawFd, i16)> {
        Some((self.sock.as_raw_fd(), libc::POLLRDHUP))
    }

    fn spins(&self) -> bool {
        true
    }

    fn direct_max(&self) -> usize {
        TCP_DIRECT_MAX
    }

    fn payload_ready(&mut self) -> Result<bool, LinkError> {
        let Some((h, done)) = self.current else { return Ok(false) };
        self.have(h.len as usize - done)
    }

    fn shutdown(&mut self) {
        // FIN after the data already queued; then read what is pending so that closing with
        // unread input does not turn the FIN into a reset.
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 4096];
        while matches!((&self.sock).read(&mut sink), Ok(n) if n > 0) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::wire::{FrameKind, OpKind};
    use std::io::Write;
    use std::net::TcpListener;

    fn pair() -> (TcpLink, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let raw = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (TcpLink::new(s, None).unwrap(), raw)
    }

    /// By default the kernel keeps sizing the buffers (they stay what an untouched socket has,
    /// and grow with the traffic); a size is set only when asked. Setting 4 MiB by default
    /// turned the growth off and got clamped to a fraction of it on a stock kernel.
    #[test]
    fn socket_buffers_are_the_kernels_unless_asked() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let rcvbuf = |s: &TcpStream| sys::get_sockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap();
        let untouched = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (peer, _) = l.accept().unwrap();
        let default = rcvbuf(&peer);
        let link = TcpLink::new(peer, None).unwrap();
        assert_eq!(rcvbuf(&link.sock), default);
        drop(untouched);
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let asked = TcpLink::new(s, Some(16 << 10)).unwrap();
        // Linux doubles what it is asked for (bookkeeping), within its limits.
        assert_ne!(rcvbuf(&asked.sock), default);
    }

    /// Polls `f` until it stops answering `Ok(None)`/`Ok(false)`, for at most a second.
    fn settle<T>(mut f: impl FnMut() -> Result<Option<T>, LinkError>) -> Result<Option<T>, LinkError> {
        let t = std::time::Instant::now();
        loop {
            match f() {
                Ok(None) if t.elapsed() < std::time::Duration::from_secs(1) => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                r => return r,
            }
        }
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let (mut link, mut raw) = pair();
        raw.write_all(&[0x55; 200]).unwrap();
        assert!(matches!(settle(|| link.peek()), Err(LinkError::Protocol(m)) if m.contains("magic")));
    }

    #[test]
    fn oversized_frames_are_refused_before_reading_them() {
        let (mut link, mut raw) = pair();
        let mut h = FrameHeader::control(FrameKind::Data, 1, 1, 0);
        h.op = Some(OpKind::P2p);
        h.len = (TCP_MAX_PAYLOAD + 1) as u32;
        h.total = h.len as u64;
        raw.write_all(&h.encode()).unwrap();
        assert!(matches!(settle(|| link.peek()), Err(LinkError::Protocol(m)) if m.contains("over the TCP limit")));
    }

    #[test]
    fn a_truncated_frame_then_close_is_a_closed_link() {
        let (mut link, mut raw) = pair();
        let mut h = FrameHeader::control(FrameKind::Data, 1, 1, 0);
        h.op = Some(OpKind::P2p);
        h.len = 1000;
        h.total = 1000;
        raw.write_all(&h.encode()).unwrap();
        raw.write_all(&[1; 10]).unwrap();
        drop(raw);
        let got = settle(|| link.peek()).unwrap().unwrap();
        assert_eq!(got.len, 1000);
        let mut dst = vec![0u8; 1000];
        let t = std::time::Instant::now();
        let r = loop {
            match link.consume(Sink::Copy(&mut dst)) {
                Ok(false) if t.elapsed() < std::time::Duration::from_secs(1) => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                r => break r,
            }
        };
        assert!(matches!(r, Err(LinkError::Closed(_))), "{r:?}");
    }

    #[test]
    fn frames_round_trip_in_pieces() {
        let (mut a, b) = pair();
        let mut b = TcpLink::new(b, None).unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let mut h = FrameHeader::control(FrameKind::Data, 9, 2, 0);
        h.op = Some(OpKind::P2p);
        h.len = payload.len() as u32;
        h.total = payload.len() as u64;
        let mut written = 0;
        let mut got = vec![0u8; payload.len()];
        let mut done = false;
        let t = std::time::Instant::now();
        while !done {
            let _ = a.write(&h.encode(), &payload, &mut written).unwrap();
            if let Some(hh) = b.peek().unwrap() {
                assert_eq!(hh, h);
                done = b.consume(Sink::Copy(&mut got)).unwrap();
            }
            assert!(t.elapsed() < std::time::Duration::from_secs(5));
        }
        assert_eq!(got, payload);
    }
}
