//! A software verbs provider: RC semantics between two processes of one host, over a Unix
//! stream socket that stands in for the wire, so that the RDMA transport's protocol runs for
//! real where no RDMA device exists (CI, this machine).
//!
//! A write with immediate travels as a packet (header, then the bytes, copied from the local
//! region when posted, as a NIC reads them before it completes). The receiving process's
//! provider, when polled, checks the remote key and the bounds against its registrations,
//! copies the bytes into its memory, consumes a posted receive and completes it with the
//! immediate, then acknowledges; the writer's completion comes with the acknowledgement. A
//! wrong key or a range outside the region is refused (`RemoteAccess`), a write finding no
//! receive posted too (`ReceiverNotReady`: a real NIC would retry first); either moves both
//! queue pairs to the error state, as do the peer's process ending (`RetryExceeded`) and the
//! peer's queue pair breaking. In the error state every outstanding work request completes
//! (the first with the cause, the rest `Flushed`) and posts are refused.
//!
//! The socket lives in the abstract namespace under a random name; the side that connects
//! first sends the passive side's random token, so that only the peer given the connection
//! data can attach.
//!
//! Fault injection, for tests, through `MW_SOFT_VERBS_FAULT` (read when a queue pair is made):
//! `qp_error_after=N` forces the queue pair into the error state at its N-th write;
//! `lose_completion_after=N` drops the completion of its N-th write (it never arrives);
//! `bad_rkey_after=N` sends its N-th write with a wrong remote key (the peer refuses it, and the
//! refusal comes back as the write's completion); `port_down_after=N` takes the port down at its
//! N-th write, as a device reports with an asynchronous event: that write goes nowhere, the
//! queue pair is in the error state, and the peer is not told; `connect_refused` fails the
//! connection of the queue pair (a path the fabric cannot set up).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::Duration;

use super::verbs::{Access, Completion, Op, QpState, QueuePair, Region, Remote, Status, VerbsError};
use crate::sys::random_u64;

/// Bytes of a packet header: kind, status, imm, rkey, length, remote address, sequence.
const PACKET: usize = 32;
const WRITE: u8 = 1;
const ACK: u8 = 2;
const NAK: u8 = 3;
/// The sender's queue pair went to the error state.
const BROKE: u8 = 4;
/// The first packet of the connecting side: the passive side's token.
const HELLO: u8 = 5;
/// A read request, its answer (the bytes), and its refusal.
const READ: u8 = 6;
const READ_DATA: u8 = 7;
const READ_NAK: u8 = 8;

/// Largest write the provider takes (a bound on what one packet may make the peer buffer).
const MAX_WRITE: usize = 16 << 20;

fn status_code(s: &Status) -> u8 {
    match s {
        Status::Success => 0,
        Status::LocalProtection => 1,
        Status::RemoteAccess => 2,
        Status::ReceiverNotReady => 3,
        Status::RetryExceeded => 4,
        Status::Flushed => 5,
        Status::Other(_) => 6,
    }
}

fn status_of(code: u8) -> Status {
    match code {
        0 => Status::Success,
        1 => Status::LocalProtection,
        2 => Status::RemoteAccess,
        3 => Status::ReceiverNotReady,
        4 => Status::RetryExceeded,
        5 => Status::Flushed,
        c => Status::Other(format!("status {c} from the peer")),
    }
}

/// One packet's header.
#[derive(Clone, Copy, Default)]
struct Packet {
    kind: u8,
    status: u8,
    imm: u32,
    rkey: u32,
    len: u32,
    addr: u64,
    seq: u64,
}

impl Packet {
    fn encode(&self) -> [u8; PACKET] {
        let mut b = [0u8; PACKET];
        b[0] = self.kind;
        b[1] = self.status;
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b[8..12].copy_from_slice(&self.rkey.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Packet {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        Packet {
            kind: b[0],
            status: b[1],
            imm: u32_at(4),
            rkey: u32_at(8),
            len: u32_at(12),
            addr: u64_at(16),
            seq: u64_at(24),
        }
    }
}

/// The faults a test asked for.
#[derive(Clone, Copy, Default)]
struct Faults {
    qp_error_after: Option<u64>,
    lose_completion_after: Option<u64>,
    bad_rkey_after: Option<u64>,
    port_down_after: Option<u64>,
    connect_refused: bool,
}

impl Faults {
    fn from_env() -> Faults {
        let mut f = Faults::default();
        let Ok(spec) = std::env::var("MW_SOFT_VERBS_FAULT") else { return f };
        for part in spec.split(',') {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let n = v.trim().parse().ok();
            match k.trim() {
                "qp_error_after" => f.qp_error_after = n,
                "lose_completion_after" => f.lose_completion_after = n,
                "bad_rkey_after" => f.bad_rkey_after = n,
                "port_down_after" => f.port_down_after = n,
                "connect_refused" => f.connect_refused = true,
                _ => {}
            }
        }
        f
    }
}

/// A queue pair of the software provider.
pub(crate) struct SoftQp {
    /// The passive side's listener, until the peer attached.
    listener: Option<UnixListener>,
    name: String,
    token: u64,
    sock: Option<UnixStream>,
    state: QpState,
    regions: Vec<(Region, Access)>,
    /// Reads sent and not yet answered: (sequence, work request id, destination address,
    /// bytes).
    reads: VecDeque<(u64, u64, usize, usize)>,
    recvs: VecDeque<u64>,
    /// Writes sent and not yet acknowledged: (sequence, work request id).
    unacked: VecDeque<(u64, u64)>,
    next_seq: u64,
    /// Bytes for the socket, from `out_at` on.
    out: Vec<u8>,
    out_at: usize,
    /// Bytes read from the socket and not yet handled.
    inbound: Vec<u8>,
    ready: VecDeque<Completion>,
    faults: Faults,
    writes: u64,
    acks: u64,
    /// An asynchronous event not yet taken (`QueuePair::event`).
    event: Option<String>,
}

impl SoftQp {
    /// A queue pair listening under a fresh abstract name.
    pub(crate) fn new() -> Result<SoftQp, VerbsError> {
        let name = format!("multiworld-soft-verbs-{}-{:016x}", std::process::id(), random_u64());
        let err = |e: io::Error| VerbsError(format!("soft verbs: cannot listen on @{name}: {e}"));
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?;
        let listener = UnixListener::bind_addr(&addr).map_err(err)?;
        Ok(SoftQp {
            listener: Some(listener),
            name,
            token: random_u64(),
            sock: None,
            state: QpState::Init,
            regions: Vec::new(),
            reads: VecDeque::new(),
            recvs: VecDeque::new(),
            unacked: VecDeque::new(),
            next_seq: 1,
            out: Vec::new(),
            out_at: 0,
            inbound: Vec::new(),
            ready: VecDeque::new(),
            faults: Faults::from_env(),
            writes: 0,
            acks: 0,
            event: None,
        })
    }

    fn send(&mut self, p: Packet, data: &[u8]) {
        self.out.extend_from_slice(&p.encode());
        self.out.extend_from_slice(data);
    }

    /// Moves to the error state for `cause`: every outstanding request completes, the first
    /// (a write if any is outstanding, else a receive) with the cause and the rest flushed; the
    /// peer is told unless it told us.
    fn break_with(&mut self, cause: Status, tell_peer: bool) {
        if self.state == QpState::Error {
            return;
        }
        self.state = QpState::Error;
        let mut first = Some(cause);
        for (_, wr_id) in std::mem::take(&mut self.unacked) {
            let status = first.take().unwrap_or(Status::Flushed);
            self.ready.push_back(Completion { wr_id, op: Op::Write, status, imm: 0, len: 0 });
        }
        for (_, wr_id, _, _) in std::mem::take(&mut self.reads) {
            let status = first.take().unwrap_or(Status::Flushed);
            self.ready.push_back(Completion { wr_id, op: Op::Read, status, imm: 0, len: 0 });
        }
        for wr_id in std::mem::take(&mut self.recvs) {
            let status = first.take().unwrap_or(Status::Flushed);
            self.ready.push_back(Completion { wr_id, op: Op::RecvImm, status, imm: 0, len: 0 });
        }
        if tell_peer {
            self.send(Packet { kind: BROKE, ..Packet::default() }, &[]);
            self.flush();
        }
    }

    /// Writes what the socket takes of the pending bytes (never raising `SIGPIPE`: the peer's
    /// end is an error here, not a signal to a C host).
    fn flush(&mut self) {
        let Some(sock) = &self.sock else { return };
        let fd = sock.as_raw_fd();
        while self.out_at < self.out.len() {
            let rest = &self.out[self.out_at..];
            // SAFETY: sends from a live buffer of `rest.len()` bytes on a socket this owns.
            let n = unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
            if n > 0 {
                self.out_at += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => break,
                _ => {
                    self.out.clear();
                    self.out_at = 0;
                    if self.state != QpState::Error {
                        self.break_with(Status::RetryExceeded, false);
                    }
                    return;
                }
            }
        }
        if self.out_at == self.out.len() {
            self.out.clear();
            self.out_at = 0;
        } else if self.out_at > (1 << 20) {
            self.out.drain(..self.out_at);
            self.out_at = 0;
        }
    }

    /// Reads what the socket has (at most a write's worth beyond what is buffered); true when
    /// the peer's end came (what arrived before it is still handled).
    fn fill(&mut self) -> bool {
        let Some(sock) = &self.sock else { return false };
        let mut sock = sock;
        let mut buf = [0u8; 64 << 10];
        while self.inbound.len() < PACKET + MAX_WRITE {
            match sock.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => self.inbound.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
        false
    }

    /// Whether a request of `op` on `len` bytes at `offset` in `local` may go: an error where
    /// the queue pair is not ready; false (the request completed with `LocalProtection`, the
    /// queue pair broke) where the range is not inside a registration of this queue pair.
    fn may_post(&mut self, wr_id: u64, op: Op, local: &Region, offset: usize, len: usize) -> Result<bool, VerbsError> {
        if self.state != QpState::Ready {
            return Err(VerbsError(format!("soft verbs: the queue pair is not ready ({:?})", self.state)));
        }
        let known = self.regions.iter().any(|(r, _)| r == local);
        if !known || offset.checked_add(len).is_none_or(|e| e > local.len) || len > MAX_WRITE {
            self.ready.push_back(Completion { wr_id, op, status: Status::LocalProtection, imm: 0, len: 0 });
            self.break_with(Status::Flushed, true);
            return Ok(false);
        }
        Ok(true)
    }

    /// The registration `rkey` names, if the peer may reach it as `need` says and it covers
    /// `len` bytes at `addr`.
    fn target(&self, rkey: u32, addr: u64, len: usize, need: Access) -> Option<*mut u8> {
        let (r, _) = self.regions.iter().find(|(r, a)| r.rkey == rkey && r.rkey != 0 && *a == need)?;
        let end = addr.checked_add(len as u64)?;
        (len <= MAX_WRITE && addr >= r.addr && end <= r.addr + r.len as u64).then_some(addr as usize as *mut u8)
    }

    /// The bytes a packet of this kind carries after its header.
    fn carried(&self, p: &Packet) -> usize {
        match p.kind {
            WRITE | READ_DATA => p.len as usize,
            _ => 0,
        }
    }

    /// Handles the complete packets read so far.
    fn handle(&mut self) {
        let mut at = 0;
        while self.state != QpState::Error && self.inbound.len() - at >= PACKET {
            let p = Packet::decode(&self.inbound[at..at + PACKET]);
            let len = p.len as usize;
            // A write is judged by its header, before its bytes are waited for: an oversized or
            // misdirected one is refused at once, never buffered.
            if p.kind == WRITE && self.target(p.rkey, p.addr, len, Access::RemoteWrite).is_none() {
                self.send(Packet { kind: NAK, status: status_code(&Status::RemoteAccess), seq: p.seq, ..p }, &[]);
                self.break_with(Status::RemoteAccess, false);
                break;
            }
            // The answer to a read must be the read asked for, the oldest one.
            if p.kind == READ_DATA && self.reads.front().is_none_or(|r| r.0 != p.seq || r.3 != len) {
                self.break_with(Status::Other("soft verbs: an answer to no read asked for".into()), true);
                break;
            }
            let carried = self.carried(&p);
            if self.inbound.len() - at - PACKET < carried {
                break;
            }
            let data_at = at + PACKET;
            at = data_at + carried;
            match p.kind {
                WRITE => {
                    let Some(dst) = self.target(p.rkey, p.addr, len, Access::RemoteWrite) else {
                        self.send(
                            Packet { kind: NAK, status: status_code(&Status::RemoteAccess), seq: p.seq, ..p },
                            &[],
                        );
                        self.break_with(Status::RemoteAccess, false);
                        break;
                    };
                    let Some(wr_id) = self.recvs.pop_front() else {
                        let code = status_code(&Status::ReceiverNotReady);
                        self.send(Packet { kind: NAK, status: code, seq: p.seq, ..p }, &[]);
                        self.break_with(Status::ReceiverNotReady, false);
                        break;
                    };
                    // SAFETY: `dst` lies inside a region registered under `register`'s
                    // contract (valid, not moved, writable by the peer while polled), checked
                    // for the whole length; the source is this buffer.
                    unsafe { std::ptr::copy_nonoverlapping(self.inbound[data_at..].as_ptr(), dst, len) };
                    self.ready.push_back(Completion {
                        wr_id,
                        op: Op::RecvImm,
                        status: Status::Success,
                        imm: p.imm,
                        len: p.len,
                    });
                    self.send(Packet { kind: ACK, seq: p.seq, ..Packet::default() }, &[]);
                }
                ACK | NAK => {
                    let Some((seq, wr_id)) = self.unacked.pop_front() else {
                        self.break_with(Status::Other("soft verbs: an acknowledgement of nothing".into()), true);
                        break;
                    };
                    if seq != p.seq {
                        self.break_with(Status::Other("soft verbs: acknowledgements out of order".into()), true);
                        break;
                    }
                    if p.kind == NAK {
                        let status = status_of(p.status);
                        self.ready.push_back(Completion {
                            wr_id,
                            op: Op::Write,
                            status: status.clone(),
                            imm: 0,
                            len: 0,
                        });
                        self.break_with(status, false);
                        break;
                    }
                    self.acks += 1;
                    if self.faults.lose_completion_after == Some(self.acks) {
                        continue;
                    }
                    self.ready.push_back(Completion { wr_id, op: Op::Write, status: Status::Success, imm: 0, len: 0 });
                }
                READ => match self.target(p.rkey, p.addr, len, Access::RemoteRead) {
                    Some(src) => {
                        // SAFETY: `src` lies inside a region registered under `register`'s
                        // contract for the peer's reads, checked for the whole length.
                        let data = unsafe { std::slice::from_raw_parts(src as *const u8, len) }.to_vec();
                        self.send(Packet { kind: READ_DATA, seq: p.seq, len: p.len, ..Packet::default() }, &data);
                    }
                    None => {
                        let code = status_code(&Status::RemoteAccess);
                        self.send(Packet { kind: READ_NAK, status: code, seq: p.seq, ..Packet::default() }, &[]);
                        self.break_with(Status::RemoteAccess, false);
                        break;
                    }
                },
                READ_DATA => {
                    let Some((_, wr_id, dst, n)) = self.reads.pop_front() else { break };
                    // SAFETY: `dst` is the local range the read was posted for, inside a
                    // registration of this queue pair (checked when posted); `n` bytes came.
                    unsafe { std::ptr::copy_nonoverlapping(self.inbound[data_at..].as_ptr(), dst as *mut u8, n) };
                    self.ready.push_back(Completion {
                        wr_id,
                        op: Op::Read,
                        status: Status::Success,
                        imm: 0,
                        len: p.len,
                    });
                }
                READ_NAK => {
                    let Some((_, wr_id, _, _)) = self.reads.pop_front() else { break };
                    let status = status_of(p.status);
                    self.ready.push_back(Completion { wr_id, op: Op::Read, status: status.clone(), imm: 0, len: 0 });
                    self.break_with(status, false);
                    break;
                }
                BROKE => {
                    self.break_with(Status::Other("the peer's queue pair went to the error state".into()), false);
                    break;
                }
                _ => {
                    self.break_with(Status::Other(format!("soft verbs: unknown packet kind {}", p.kind)), true);
                    break;
                }
            }
        }
        self.inbound.drain(..at.min(self.inbound.len()));
    }
}

impl QueuePair for SoftQp {
    fn provider(&self) -> String {
        "soft (software verbs between processes of this host)".into()
    }

    fn local_info(&self) -> Vec<u8> {
        let mut v = self.token.to_le_bytes().to_vec();
        v.extend_from_slice(self.name.as_bytes());
        v
    }

    fn connect(&mut self, remote: &[u8], active: bool) -> Result<(), VerbsError> {
        if self.faults.connect_refused {
            return Err(VerbsError("soft verbs: the connection was refused (fault injection)".into()));
        }
        if self.state != QpState::Init {
            return Err(VerbsError("soft verbs: the queue pair is already connected".into()));
        }
        let io = |what: &str, e: io::Error| VerbsError(format!("soft verbs: {what}: {e}"));
        let sock = if active {
            let (token, name) =
                remote.split_at_checked(8).ok_or_else(|| VerbsError("soft verbs: bad peer info".into()))?;
            let addr = SocketAddr::from_abstract_name(name).map_err(|e| io("peer address", e))?;
            let mut s = UnixStream::connect_addr(&addr).map_err(|e| io("connecting to the peer", e))?;
            let token = u64::from_le_bytes(token.try_into().unwrap_or([0; 8]));
            s.write_all(&Packet { kind: HELLO, seq: token, ..Packet::default() }.encode())
                .map_err(|e| io("greeting the peer", e))?;
            s
        } else {
            // The active side connected and greeted before it answered over the control link.
            let l = self.listener.as_ref().ok_or_else(|| VerbsError("soft verbs: no listener".into()))?;
            l.set_nonblocking(true).map_err(|e| io("listener", e))?;
            let (mut s, _) = l.accept().map_err(|e| io("the peer did not attach", e))?;
            s.set_nonblocking(false).map_err(|e| io("socket", e))?;
            s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| io("socket", e))?;
            let mut hello = [0u8; PACKET];
            s.read_exact(&mut hello).map_err(|e| io("reading the peer's greeting", e))?;
            let p = Packet::decode(&hello);
            if p.kind != HELLO || p.seq != self.token {
                return Err(VerbsError("soft verbs: a stranger attached (wrong token)".into()));
            }
            s
        };
        sock.set_nonblocking(true).map_err(|e| io("socket", e))?;
        self.listener = None;
        self.sock = Some(sock);
        self.state = QpState::Ready;
        Ok(())
    }

    unsafe fn register(&mut self, addr: *mut u8, len: usize, access: Access) -> Result<Region, VerbsError> {
        // Keys are random per registration; a region the peer may not reach has no remote key
        // that names it.
        let lkey = random_u64() as u32;
        let rkey = if access == Access::Local { 0 } else { random_u64() as u32 | 1 };
        let r = Region { addr: addr as usize as u64, len, lkey, rkey };
        self.regions.push((r, access));
        Ok(r)
    }

    fn deregister(&mut self, region: &Region) {
        self.regions.retain(|(r, _)| r != region);
    }

    fn post_read(
        &mut self,
        wr_id: u64,
        local: &Region,
        offset: usize,
        len: usize,
        remote: Remote,
    ) -> Result<(), VerbsError> {
        if !self.may_post(wr_id, Op::Read, local, offset, len)? {
            return Ok(());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let p = Packet { kind: READ, rkey: remote.rkey, len: len as u32, addr: remote.addr, seq, ..Packet::default() };
        self.send(p, &[]);
        self.reads.push_back((seq, wr_id, local.addr as usize + offset, len));
        self.flush();
        Ok(())
    }

    fn drained(&mut self) -> bool {
        self.flush();
        self.out_at >= self.out.len()
    }

    fn post_write_imm(
        &mut self,
        wr_id: u64,
        local: &Region,
        offset: usize,
        len: usize,
        remote: Remote,
        imm: u32,
    ) -> Result<(), VerbsError> {
        if self.state != QpState::Ready {
            return Err(VerbsError(format!("soft verbs: the queue pair is not ready ({:?})", self.state)));
        }
        // The faults act on the write as posted, before it is checked.
        self.writes += 1;
        let remote = if self.faults.bad_rkey_after == Some(self.writes) {
            Remote { rkey: remote.rkey ^ 0x8000_0000, ..remote }
        } else {
            remote
        };
        if self.faults.port_down_after == Some(self.writes) {
            self.event = Some("soft verbs: port 1 went down (fault injection)".into());
            self.break_with(Status::RetryExceeded, false);
            // The write itself went nowhere: flushed, as a device does.
            self.ready.push_back(Completion { wr_id, op: Op::Write, status: Status::Flushed, imm: 0, len: 0 });
            return Ok(());
        }
        if self.faults.qp_error_after == Some(self.writes) {
            self.break_with(Status::Other("queue pair forced into the error state (fault injection)".into()), true);
            return Err(VerbsError("soft verbs: the queue pair was forced into the error state".into()));
        }
        if !self.may_post(wr_id, Op::Write, local, offset, len)? {
            return Ok(());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        // SAFETY: the range lies inside a region registered under `register`'s contract.
        let data = unsafe { std::slice::from_raw_parts((local.addr as usize + offset) as *const u8, len) };
        let p = Packet { kind: WRITE, imm, rkey: remote.rkey, len: len as u32, addr: remote.addr, seq, status: 0 };
        self.send(p, data);
        self.unacked.push_back((seq, wr_id));
        self.flush();
        Ok(())
    }

    fn post_recv(&mut self, wr_id: u64) -> Result<(), VerbsError> {
        if self.state == QpState::Error {
            return Err(VerbsError("soft verbs: the queue pair is in the error state".into()));
        }
        self.recvs.push_back(wr_id);
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), VerbsError> {
        if self.state == QpState::Ready {
            self.flush();
            let ended = self.fill();
            self.handle();
            if ended {
                self.break_with(Status::RetryExceeded, false);
            }
        }
        // Also in the error state: a refusal or acknowledgement queued before it still goes.
        self.flush();
        out.extend(self.ready.drain(..));
        Ok(())
    }

    fn state(&self) -> QpState {
        self.state
    }

    fn event(&mut self) -> Option<String> {
        self.event.take()
    }

    fn arm(&mut self) -> Option<(RawFd, i16)> {
        if !self.ready.is_empty() || self.event.is_some() {
            return None;
        }
        match (&self.sock, &self.listener) {
            (Some(s), _) if self.out_at < self.out.len() => Some((s.as_raw_fd(), libc::POLLIN | libc::POLLOUT)),
            (Some(s), _) => Some((s.as_raw_fd(), libc::POLLIN)),
            (None, Some(l)) => Some((l.as_raw_fd(), libc::POLLIN)),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SoftQp, SoftQp) {
        let mut a = SoftQp::new().unwrap();
        let mut b = SoftQp::new().unwrap();
        b.connect(&a.local_info(), true).unwrap();
        a.connect(&b.local_info(), false).unwrap();
        (a, b)
    }

    /// Polls until `n` completions came, or a second passed.
    fn wait(qp: &mut SoftQp, n: usize) -> Vec<Completion> {
        let mut got = Vec::new();
        let end = std::time::Instant::now() + Duration::from_secs(1);
        while got.len() < n && std::time::Instant::now() < end {
            qp.poll(&mut got).unwrap();
            std::thread::yield_now();
        }
        got
    }

    #[test]
    fn writes_land_in_order_with_their_immediates_and_complete_both_sides() {
        let (mut a, mut b) = pair();
        let mut src = vec![0u8; 4096];
        let mut dst = vec![0u8; 4096];
        // SAFETY: both buffers outlive the queue pairs' use of them in this test.
        let (ls, rd) = unsafe {
            (
                a.register(src.as_mut_ptr(), 4096, Access::RemoteWrite).unwrap(),
                b.register(dst.as_mut_ptr(), 4096, Access::RemoteWrite).unwrap(),
            )
        };
        for i in 0..4 {
            b.post_recv(100 + i).unwrap();
        }
        for (i, byte) in [1u8, 2, 3].into_iter().enumerate() {
            src[i * 100..i * 100 + 100].fill(byte);
            let remote = Remote { addr: rd.addr + 1000 * i as u64, rkey: rd.rkey };
            a.post_write_imm(i as u64, &ls, i * 100, 100, remote, 7 + i as u32).unwrap();
        }
        let got = wait(&mut b, 3);
        assert_eq!(
            got.iter().map(|c| (c.wr_id, c.imm, c.len)).collect::<Vec<_>>(),
            [(100, 7, 100), (101, 8, 100), (102, 9, 100)]
        );
        assert!(got.iter().all(|c| c.op == Op::RecvImm && c.status == Status::Success));
        for i in 0..3 {
            assert!(dst[i * 1000..i * 1000 + 100].iter().all(|&x| x == i as u8 + 1), "write {i} landed");
        }
        let sent = wait(&mut a, 3);
        assert_eq!(sent.iter().map(|c| c.wr_id).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(sent.iter().all(|c| c.op == Op::Write && c.status == Status::Success));
    }

    #[test]
    fn a_wrong_key_or_range_is_refused_and_breaks_both_queue_pairs() {
        for bad in [(1u64, 0x1234u32), (4000, 0)] {
            let (mut a, mut b) = pair();
            let mut src = vec![0u8; 256];
            let mut dst = vec![0u8; 4096];
            // SAFETY: both buffers outlive the queue pairs' use of them in this test.
            let (ls, rd) = unsafe {
                (
                    a.register(src.as_mut_ptr(), 256, Access::RemoteWrite).unwrap(),
                    b.register(dst.as_mut_ptr(), 4096, Access::RemoteWrite).unwrap(),
                )
            };
            b.post_recv(1).unwrap();
            let rkey = if bad.1 == 0 { rd.rkey } else { bad.1 };
            a.post_write_imm(9, &ls, 0, 256, Remote { addr: rd.addr + bad.0, rkey }, 0).unwrap();
            let got = wait(&mut b, 1);
            assert_eq!(got[0].status, Status::RemoteAccess, "the receive ends with the cause");
            assert_eq!(b.state(), QpState::Error);
            let sent = wait(&mut a, 1);
            assert_eq!(sent[0].wr_id, 9);
            assert_eq!(sent[0].status, Status::RemoteAccess);
            assert_eq!(a.state(), QpState::Error);
            assert!(a.post_write_imm(10, &ls, 0, 1, Remote { addr: rd.addr, rkey: rd.rkey }, 0).is_err());
            assert!(dst.iter().all(|&x| x == 0), "nothing landed");
        }
    }

    #[test]
    fn no_receive_posted_and_a_lost_peer_break_the_queue_pair() {
        let (mut a, mut b) = pair();
        let mut src = vec![0u8; 64];
        let mut dst = vec![0u8; 64];
        // SAFETY: both buffers outlive the queue pairs' use of them in this test.
        let (ls, rd) = unsafe {
            (
                a.register(src.as_mut_ptr(), 64, Access::RemoteWrite).unwrap(),
                b.register(dst.as_mut_ptr(), 64, Access::RemoteWrite).unwrap(),
            )
        };
        a.post_write_imm(1, &ls, 0, 8, Remote { addr: rd.addr, rkey: rd.rkey }, 0).unwrap();
        assert!(wait(&mut b, 1).is_empty());
        assert_eq!(b.state(), QpState::Error);
        assert_eq!(wait(&mut a, 1)[0].status, Status::ReceiverNotReady);

        let (mut a, b) = pair();
        // SAFETY: as above.
        let ls = unsafe { a.register(src.as_mut_ptr(), 64, Access::RemoteWrite).unwrap() };
        a.post_write_imm(5, &ls, 0, 8, Remote { addr: 0, rkey: 0 }, 0).unwrap();
        a.post_write_imm(6, &ls, 0, 8, Remote { addr: 0, rkey: 0 }, 0).unwrap();
        a.post_recv(7).unwrap();
        drop(b);
        let got = wait(&mut a, 3);
        assert_eq!(a.state(), QpState::Error);
        let status: Vec<_> = got.iter().map(|c| (c.wr_id, c.status.clone())).collect();
        assert_eq!(status, [(5, Status::RetryExceeded), (6, Status::Flushed), (7, Status::Flushed)]);
    }

    #[test]
    fn reads_fetch_what_the_peer_registered_for_reading_and_nothing_after_it_deregisters() {
        let (mut a, mut b) = pair();
        let mut src: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut dst = vec![0u8; 8192];
        // SAFETY: both buffers outlive the queue pairs' use of them in this test.
        let (rs, ld) = unsafe {
            (
                a.register(src.as_mut_ptr(), 8192, Access::RemoteRead).unwrap(),
                b.register(dst.as_mut_ptr(), 8192, Access::Local).unwrap(),
            )
        };
        b.post_read(3, &ld, 100, 5000, Remote { addr: rs.addr + 50, rkey: rs.rkey }).unwrap();
        let mut got = Vec::new();
        let end = std::time::Instant::now() + Duration::from_secs(1);
        while got.is_empty() && std::time::Instant::now() < end {
            a.poll(&mut Vec::new()).unwrap();
            b.poll(&mut got).unwrap();
        }
        assert_eq!(got[0].wr_id, 3);
        assert_eq!((got[0].op, got[0].status.clone()), (Op::Read, Status::Success));
        assert_eq!(&dst[100..5100], &src[50..5050]);
        // A write-only or deregistered region cannot be read.
        a.deregister(&rs);
        b.post_read(4, &ld, 0, 16, Remote { addr: rs.addr, rkey: rs.rkey }).unwrap();
        let mut got = Vec::new();
        let end = std::time::Instant::now() + Duration::from_secs(1);
        while got.is_empty() && std::time::Instant::now() < end {
            a.poll(&mut Vec::new()).unwrap();
            b.poll(&mut got).unwrap();
        }
        assert_eq!((got[0].wr_id, got[0].status.clone()), (4, Status::RemoteAccess));
        assert_eq!(b.state(), QpState::Error);
    }

    #[test]
    fn a_stranger_cannot_attach() {
        let mut a = SoftQp::new().unwrap();
        let mut info = a.local_info();
        info[0] ^= 1;
        let mut s = SoftQp::new().unwrap();
        s.connect(&info, true).unwrap();
        assert!(a.connect(&s.local_info(), false).is_err());
    }
}
