//! A minimal HTTP/1.1 client for etcd's JSON gateway: one connection per request
//! (`Connection: close`), a body by `Content-Length`, chunked, or up to the connection's end,
//! and a streamed body read line by line (the gateway's watch writes one JSON object per line).
//! Every wait is a wait of the formation thread (`exec`), bounded by a deadline and the
//! formation's abort flag; nothing here ever blocks a thread.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

use crate::bootstrap::addr;
use crate::sys::sync::AtomicBool;

/// Largest header block and body accepted (a range of many worlds stays far below).
const MAX_HEADER: usize = 64 << 10;
const MAX_BODY: usize = 64 << 20;

/// A whole response.
pub(crate) struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// `POST path` with a JSON `body` to `to`; the whole response.
pub(crate) async fn post(
    to: SocketAddr,
    path: &str,
    body: &[u8],
    deadline: Instant,
    cancel: Option<&AtomicBool>,
) -> io::Result<Response> {
    let mut s = post_stream(to, path, body, deadline, cancel).await?;
    let mut all = Vec::new();
    while let Some(piece) = s.next_piece(deadline, cancel).await? {
        all.extend_from_slice(&piece);
        if all.len() > MAX_BODY {
            return Err(invalid("response body too large"));
        }
    }
    Ok(Response { status: s.status, body: all })
}

/// `POST path` and the response's status and headers; its body is read with
/// [`Stream::next_line`] (or [`Stream::next_piece`]).
pub(crate) async fn post_stream(
    to: SocketAddr,
    path: &str,
    body: &[u8],
    deadline: Instant,
    cancel: Option<&AtomicBool>,
) -> io::Result<Stream> {
    let sock = addr::connect(to, deadline, cancel).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {to}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    addr::write_all(&sock, head.as_bytes(), deadline, cancel).await?;
    addr::write_all(&sock, body, deadline, cancel).await?;
    let mut s = Stream { sock, buf: Vec::new(), status: 0, framing: Framing::ToEnd, lines: Vec::new(), ended: false };
    let end = loop {
        if let Some(i) = s.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if s.buf.len() > MAX_HEADER {
            return Err(invalid("response header too large"));
        }
        if !s.fill(deadline, cancel).await? {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection ended before the response"));
        }
    };
    let head = String::from_utf8_lossy(&s.buf[..end]).into_owned();
    s.buf.drain(..end + 4);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    s.status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| invalid(&format!("not an HTTP response: {status_line:?}")))?;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            let n: usize = value.parse().map_err(|_| invalid("bad Content-Length"))?;
            if n > MAX_BODY {
                return Err(invalid("response body too large"));
            }
            s.framing = Framing::Length(n);
        } else if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
            s.framing = Framing::Chunked(None);
        }
    }
    Ok(s)
}

/// How the body ends.
enum Framing {
    /// This many bytes are left.
    Length(usize),
    /// Chunks; `Some(n)`: n bytes of the current chunk are left (then its CRLF).
    Chunked(Option<usize>),
    /// At the connection's end.
    ToEnd,
}

/// A response whose body is read as it comes.
pub(crate) struct Stream {
    sock: TcpStream,
    /// Bytes read and not yet taken.
    buf: Vec<u8>,
    pub status: u16,
    framing: Framing,
    /// Body bytes taken, not yet returned as a line.
    lines: Vec<u8>,
    ended: bool,
}

impl Stream {
    /// Reads more into `buf`; false at the connection's end.
    async fn fill(&mut self, deadline: Instant, cancel: Option<&AtomicBool>) -> io::Result<bool> {
        let mut tmp = [0u8; 16 << 10];
        loop {
            match addr::recv_now(&self.sock, &mut tmp) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    addr::wait_for(self.sock.as_raw_fd(), libc::POLLIN, deadline, cancel).await?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next piece of the body as it arrives; `None` at its end.
    pub(crate) async fn next_piece(
        &mut self,
        deadline: Instant,
        cancel: Option<&AtomicBool>,
    ) -> io::Result<Option<Vec<u8>>> {
        loop {
            if self.ended {
                return Ok(None);
            }
            match self.framing {
                Framing::Length(0) => {
                    self.ended = true;
                    continue;
                }
                Framing::Length(n) if !self.buf.is_empty() => {
                    let take = n.min(self.buf.len());
                    self.framing = Framing::Length(n - take);
                    return Ok(Some(self.buf.drain(..take).collect()));
                }
                Framing::ToEnd if !self.buf.is_empty() => return Ok(Some(std::mem::take(&mut self.buf))),
                // The CRLF after a chunk's data.
                Framing::Chunked(Some(0)) if self.buf.len() >= 2 => {
                    if &self.buf[..2] != b"\r\n" {
                        return Err(invalid("bad chunk end"));
                    }
                    self.buf.drain(..2);
                    self.framing = Framing::Chunked(None);
                    continue;
                }
                Framing::Chunked(Some(n)) if n > 0 && !self.buf.is_empty() => {
                    let take = n.min(self.buf.len());
                    self.framing = Framing::Chunked(Some(n - take));
                    return Ok(Some(self.buf.drain(..take).collect()));
                }
                Framing::Chunked(None) => {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                        let size = line.split(';').next().unwrap_or_default().trim();
                        let n = usize::from_str_radix(size, 16).map_err(|_| invalid("bad chunk size"))?;
                        self.buf.drain(..i + 2);
                        if n == 0 {
                            self.ended = true;
                            continue;
                        }
                        self.framing = Framing::Chunked(Some(n));
                        continue;
                    }
                    if self.buf.len() > MAX_HEADER {
                        return Err(invalid("bad chunk header"));
                    }
                }
                _ => {}
            }
            if !self.fill(deadline, cancel).await? {
                return match self.framing {
                    Framing::ToEnd => {
                        self.ended = true;
                        Ok(None)
                    }
                    _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection ended inside the body")),
                };
            }
        }
    }

    /// The next line of the body (without its newline); `None` at its end.
    pub(crate) async fn next_line(
        &mut self,
        deadline: Instant,
        cancel: Option<&AtomicBool>,
    ) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.lines.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.lines.drain(..=i).collect();
                return Ok(Some(line[..line.len() - 1].to_vec()));
            }
            match self.next_piece(deadline, cancel).await? {
                Some(p) => {
                    self.lines.extend_from_slice(&p);
                    if self.lines.len() > MAX_BODY {
                        return Err(invalid("line too long"));
                    }
                }
                None if self.lines.is_empty() => return Ok(None),
                None => return Ok(Some(std::mem::take(&mut self.lines))),
            }
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::Duration;

    /// Serves one connection with `reply` after reading the request.
    fn serve(reply: &'static [u8]) -> SocketAddr {
        serve_pieces(vec![reply], 7)
    }

    /// Serves one connection with `pieces`, each cut in writes of `cut` bytes a millisecond
    /// apart, the pieces 20 ms apart (so that a read ends where a piece does).
    fn serve_pieces(pieces: Vec<&'static [u8]>, cut: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).unwrap();
                req.extend_from_slice(&b[..n]);
            }
            for p in pieces {
                for piece in p.chunks(cut) {
                    s.write_all(piece).unwrap();
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        a
    }

    #[test]
    fn bodies_by_length_chunks_and_end_and_lines_across_chunks() {
        let deadline = || Instant::now() + Duration::from_secs(5);
        let a = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        let r = crate::bootstrap::exec::block_on(post(a, "/x", b"{}", deadline(), None)).unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"hello"[..]));

        let a = serve(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab\nc\r\n3;x=1\r\nd\ne\r\n0\r\n\r\n",
        );
        let mut s = crate::bootstrap::exec::block_on(post_stream(a, "/w", b"{}", deadline(), None)).unwrap();
        assert_eq!(s.status, 404);
        let mut lines = Vec::new();
        while let Some(l) = crate::bootstrap::exec::block_on(s.next_line(deadline(), None)).unwrap() {
            lines.push(String::from_utf8(l).unwrap());
        }
        assert_eq!(lines, ["ab", "cd", "e"]);

        let a = serve(b"HTTP/1.1 200 OK\r\n\r\nto the end");
        let r = crate::bootstrap::exec::block_on(post(a, "/x", b"", deadline(), None)).unwrap();
        assert_eq!(r.body, b"to the end");

        // A chunk's closing CRLF split between two reads.
        let head: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab\n";
        let a = serve_pieces(vec![head, b"\r", b"\n0\r\n\r\n"], 1024);
        let mut s = crate::bootstrap::exec::block_on(post_stream(a, "/w", b"{}", deadline(), None)).unwrap();
        let line = crate::bootstrap::exec::block_on(s.next_line(deadline(), None)).unwrap();
        assert_eq!(line.as_deref(), Some(&b"ab"[..]));
        assert_eq!(crate::bootstrap::exec::block_on(s.next_line(deadline(), None)).unwrap(), None);

        let a = serve(b"garbage\r\n\r\n");
        assert!(crate::bootstrap::exec::block_on(post(a, "/x", b"", deadline(), None)).is_err());
    }
}
