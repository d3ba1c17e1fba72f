//! The RDMA transport (feature `rdma`): frames as RDMA writes with immediate into the peer's
//! registered receive ring, over one reliably connected queue pair per peer pair
//! (`docs/rdma.md`).
//!
//! Each side registers a receive ring of [`SLOTS`] slots and a send staging area of as many.
//! A frame (header and payload, at most [`RDMA_MAX_PAYLOAD`] bytes of payload) is copied into
//! the staging slot of the same index as the ring slot it goes to, then written there with
//! immediate `slot << 24 | bytes`; the peer's receive completion says a frame is in that slot,
//! and completions come in the order of the writes (RC). The writer holds a credit per free
//! slot of the peer's ring and spends one per frame; the reader hands credits back, half a
//! ring at a time, as a write of no bytes whose immediate carries the count. A staging slot is
//! reused once its write completed. Messages of [`LARGE_MESSAGES`] bytes or more go as large
//! frames: the slot says where the payload lies in the writer's memory (registered for the
//! peer to read), the reader reads it with RDMA READ straight into its destination and says
//! `RELEASE`, and only then does the writer's frame complete.
//!
//! The world's TCP connection to the peer stays open beside the queue pair: it carried the
//! connection data, and it ends when the peer's process does, which the link notices even while
//! the queue pair is silent. A peer that leaves on purpose says so first with a write whose
//! immediate is [`LEFT`]. Any completion with an error status, or the queue pair in the error
//! state, breaks the link with the verbs status and the provider's name.
//!
//! Providers (`verbs.rs`): a device through libibverbs (`device.rs`, the default), and the
//! software provider (`soft.rs`, `MW_RDMA_PROVIDER=soft`) between processes of one host.

pub(crate) mod device;
pub(crate) mod soft;
pub(crate) mod verbs;

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::{Armed, Link, LinkError, Sink, TransportKind};
use crate::engine::wire::{FrameHeader, OpKind, HEADER_LEN};
use crate::sys::Epoll;
use verbs::Access;
use verbs::{Completion, Op, QpState, QueuePair, Region, Remote, Status};

/// Slots of a receive ring (and of the send staging area).
pub(crate) const SLOTS: usize = 8;
/// Largest payload of one frame.
pub(crate) const RDMA_MAX_PAYLOAD: usize = 32 << 10;
const SLOT_BYTES: usize = HEADER_LEN + RDMA_MAX_PAYLOAD;
/// Receives kept posted: a ring of frames, the credit writes that can be in flight beside
/// them, and the farewell.
const RECVS: u64 = 2 * SLOTS as u64 + 4;
/// Immediate flag: the write carries credits (the count in the low bits), not a frame.
const CREDIT: u32 = 1 << 31;
/// Immediate: the peer leaves the world on purpose.
pub(crate) const LEFT: u32 = 1 << 30;
/// Work request id of writes that carry no frame (credits, farewell, releases).
const CONTROL_WR: u64 = 1 << 58;
/// Work request id of the read of a large frame.
const READ_WR: u64 = (1 << 58) + 1;
/// Immediate flag: the peer has read the large frame this side offered; its buffer is free.
const RELEASE: u32 = 1 << 29;
/// Messages of at least this many bytes go as large frames (up to the wire's limit each): the
/// writer's slot carries only where the payload is, in the writer's memory, registered for the
/// peer to read, and the reader reads it straight into its destination with an RDMA READ, then
/// says so. No copy through staging or the ring, on either side.
const LARGE_MESSAGES: usize = 512 << 10;
/// Largest payload of a large frame: the wire's.
const LARGE_MAX_PAYLOAD: usize = crate::engine::wire::MAX_FRAME_PAYLOAD;
/// A large frame's slot: the header, then the payload's address, remote key and length.
const LARGE_DESC: usize = 24;
const _: () = assert!(SLOTS < 64 && SLOT_BYTES < (1 << 24));

/// The providers.
enum Provider {
    Device,
    Soft,
}

/// This process's RDMA provider: `MW_RDMA_PROVIDER=soft` for the software provider, else
/// (unset or `ibverbs`) a device with an active port; an error saying why where there is none
/// (never a silent fallback to another transport).
fn provider() -> Result<Provider, String> {
    match std::env::var("MW_RDMA_PROVIDER").as_deref() {
        Ok("soft") => Ok(Provider::Soft),
        Ok("ibverbs") | Err(_) => match device::available() {
            Ok(_) => Ok(Provider::Device),
            Err(e) => {
                Err(format!("{e}; MW_RDMA_PROVIDER=soft selects the software provider between processes of one host"))
            }
        },
        Ok(other) => Err(format!("MW_RDMA_PROVIDER={other}: unknown provider (ibverbs or soft)")),
    }
}

/// Whether this process can make RDMA links, and if not, why.
pub(crate) fn usable() -> Result<(), String> {
    provider().map(|_| ())
}

/// A queue pair of this process's provider.
fn new_queue_pair() -> Result<Box<dyn QueuePair>, String> {
    Ok(match provider()? {
        Provider::Soft => Box::new(soft::SoftQp::new().map_err(|e| e.to_string())?),
        Provider::Device => Box::new(device::DeviceQp::new().map_err(|e| e.to_string())?),
    })
}

/// Registered memory of a link: the receive ring or the send staging area. Only reached
/// through raw pointers, since the provider may write the ring at any time it is polled.
struct Area {
    ptr: *mut u8,
    len: usize,
    region: Region,
}

// SAFETY: the area owns its allocation, reached only through its owner.
unsafe impl Send for Area {}

impl Area {
    /// `remote_write`: the peer may write it (the receive ring; not the staging area).
    fn new(qp: &mut dyn QueuePair, remote_write: bool) -> io::Result<Area> {
        let len = SLOTS * SLOT_BYTES;
        let ptr = Box::into_raw(vec![0u8; len].into_boxed_slice()) as *mut u8;
        // SAFETY: a fresh allocation owned by this area, freed only in its drop, which the
        // link runs after dropping its queue pair (field order).
        let access = if remote_write { Access::RemoteWrite } else { Access::Local };
        match unsafe { qp.register(ptr, len, access) } {
            Ok(region) => Ok(Area { ptr, len, region }),
            Err(e) => {
                // SAFETY: allocated just above as a boxed slice of `len` bytes.
                drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) });
                Err(io::Error::other(format!("registering {len} bytes: {e}")))
            }
        }
    }

    fn slot(&self, i: usize) -> *mut u8 {
        debug_assert!(i < SLOTS);
        // SAFETY: slot `i` lies inside the allocation.
        unsafe { self.ptr.add(i * SLOT_BYTES) }
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` as a boxed slice of `len` bytes; the queue pair that could
        // write it is gone (the link drops it first).
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

/// What one side tells the other at set-up: its queue pair's connection data and where its
/// receive ring is.
pub(crate) fn setup_info(qp: &dyn QueuePair, ring: &Region) -> Vec<u8> {
    let info = qp.local_info();
    let mut v = Vec::with_capacity(info.len() + 16);
    v.extend_from_slice(&ring.addr.to_le_bytes());
    v.extend_from_slice(&ring.rkey.to_le_bytes());
    v.extend_from_slice(&info);
    v
}

fn parse_info(b: &[u8]) -> io::Result<(Remote, &[u8])> {
    if b.len() < 12 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short RDMA set-up data"));
    }
    let addr = u64::from_le_bytes(b[0..8].try_into().unwrap_or([0; 8]));
    let rkey = u32::from_le_bytes(b[8..12].try_into().unwrap_or([0; 4]));
    Ok((Remote { addr, rkey }, &b[12..]))
}

/// A link whose queue pair and memory are made but not connected yet.
pub(crate) struct Pending {
    qp: Box<dyn QueuePair>,
    rx: Area,
    tx: Area,
}

impl Pending {
    /// A queue pair of this process's provider, and the link's registered memory.
    pub(crate) fn new() -> io::Result<Pending> {
        let mut qp = new_queue_pair().map_err(io::Error::other)?;
        let rx = Area::new(&mut *qp, true)?;
        let tx = Area::new(&mut *qp, false)?;
        Ok(Pending { qp, rx, tx })
    }

    /// What the peer needs to connect (`setup_info`).
    pub(crate) fn info(&self) -> Vec<u8> {
        setup_info(&*self.qp, &self.rx.region)
    }

    /// Connects to the peer's set-up data (`active`: this side initiates; the two sides pass
    /// opposite values), posts the receives, and makes the link over the control socket `ctl`.
    pub(crate) fn connect(mut self, ctl: TcpStream, peer: &[u8], active: bool) -> io::Result<RdmaLink> {
        let (ring, qp_info) = parse_info(peer)?;
        self.qp.connect(qp_info, active).map_err(|e| io::Error::other(e.to_string()))?;
        // A write that comes before its receive is posted waits (a device retries it; the
        // software provider reads nothing before the link first polls).
        for wr in 0..RECVS {
            self.qp.post_recv(wr).map_err(|e| io::Error::other(e.to_string()))?;
        }
        ctl.set_nonblocking(true)?;
        let waits = Epoll::new()?;
        waits.watch(ctl.as_raw_fd(), libc::POLLRDHUP | libc::POLLIN, 0)?;
        // The device's events wake a sleeping link, and the watch of an idle world.
        let idle = match self.qp.event_fd() {
            Some(fd) => {
                waits.watch(fd, libc::POLLIN, 2)?;
                let idle = Epoll::new()?;
                idle.watch(ctl.as_raw_fd(), libc::POLLRDHUP, 0)?;
                idle.watch(fd, libc::POLLIN, 1)?;
                Some(idle)
            }
            None => None,
        };
        info!("RDMA link up: {}", self.qp.provider());
        Ok(RdmaLink {
            qp: self.qp,
            rx: self.rx,
            tx: self.tx,
            ctl,
            waits,
            idle,
            qp_fd: None,
            peer_ring: ring,
            credits: SLOTS,
            next_slot: 0,
            tx_busy: [false; SLOTS],
            arrived: VecDeque::new(),
            rx_next: 0,
            large_tx: None,
            large_rx: None,
            scratch: None,
            current: None,
            freed: 0,
            peer_left: false,
            hung_up: false,
            armed: false,
            broken: None,
            rx_bytes: 0,
            tx_bytes: 0,
            completions: Vec::new(),
        })
    }
}

pub(crate) struct RdmaLink {
    // Dropped first: nothing writes the areas after it.
    qp: Box<dyn QueuePair>,
    rx: Area,
    tx: Area,
    ctl: TcpStream,
    /// The control socket and the queue pair's descriptor, so that one descriptor wakes the
    /// link for either.
    waits: Epoll,
    /// For the watch of an idle world, where the provider has an event descriptor: it and the
    /// control socket's hang-up.
    idle: Option<Epoll>,
    /// The queue pair's descriptor as last watched, and for what.
    qp_fd: Option<(RawFd, i16)>,
    peer_ring: Remote,
    /// Free slots of the peer's ring.
    credits: usize,
    /// The slot the next frame goes to (in the peer's ring and in the staging area).
    next_slot: usize,
    tx_busy: [bool; SLOTS],
    /// Frames in the ring, in arrival order: (slot, bytes).
    arrived: VecDeque<(usize, usize)>,
    /// The slot the peer's next frame must be in.
    rx_next: usize,
    /// The large frame this side offered and the peer has not read yet: its payload's
    /// registration, and whether the peer said it read it.
    large_tx: Option<(Region, bool)>,
    /// The large frame being read: where to, and whether the read completed.
    large_rx: Option<LargeRead>,
    /// Where large frames that are not copied straight to a destination are read into (a
    /// reduction's operand), registered.
    scratch: Option<(Box<[u8]>, Region)>,
    current: Option<FrameHeader>,
    /// Slots read and not yet handed back as credits.
    freed: usize,
    peer_left: bool,
    /// The control socket ended: the peer's process is gone or left.
    hung_up: bool,
    /// The link slept since it last looked at the control socket.
    armed: bool,
    /// Why the queue pair stopped working, kept until the frames that came before are read.
    broken: Option<LinkError>,
    rx_bytes: u64,
    tx_bytes: u64,
    completions: Vec<Completion>,
}

/// A large frame being read.
struct LargeRead {
    /// The registration read into: the caller's destination, or the scratch area's.
    into: Region,
    /// The destination was the caller's (`Sink::Copy`), registered for this read alone.
    copy: bool,
    done: bool,
}

/// How long a link that ends waits for what it posted to leave (its farewell, an abort frame).
const DRAIN_FOR: Duration = Duration::from_millis(200);

impl RdmaLink {
    /// The queue pair's asynchronous event, if one came (taken once), as the link's failure.
    fn event(&mut self) -> Option<LinkError> {
        self.qp.event().map(|e| LinkError::Io(format!("RDMA asynchronous event: {e}")))
    }

    fn failed(&mut self, what: &str, status: &Status) -> LinkError {
        // An event that came with the failure (the port went down) is its cause.
        if let Some(e) = self.event() {
            return e;
        }
        // A queue pair that broke because the peer went: the control socket says which.
        self.look_at_control();
        if matches!(status, Status::Flushed | Status::RetryExceeded) && (self.hung_up || self.peer_left) {
            return self.gone();
        }
        LinkError::Io(format!("RDMA {what}: {status} ({})", self.qp.provider()))
    }

    fn gone(&self) -> LinkError {
        if self.peer_left {
            LinkError::Left("peer left the world".into())
        } else {
            LinkError::Closed("peer closed the connection".into())
        }
    }

    /// The peer is gone or left and nothing more will come from it.
    fn ended(&self) -> bool {
        self.hung_up || self.peer_left
    }

    /// Reads the control socket: only its end matters.
    fn look_at_control(&mut self) {
        let mut buf = [0u8; 64];
        loop {
            match (&self.ctl).read(&mut buf) {
                Ok(0) => break self.hung_up = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break self.hung_up = true,
            }
        }
    }

    /// Takes the completions that are ready. A failure is kept (`broken`): the frames that
    /// arrived before it are still read first.
    fn drive(&mut self) {
        if self.broken.is_some() {
            return;
        }
        // An event first: it is the cause of the flushed completions that follow it.
        if let Some(e) = self.event() {
            self.broken = Some(e);
            return;
        }
        let mut done = std::mem::take(&mut self.completions);
        if let Err(e) = self.qp.poll(&mut done) {
            self.broken = Some(LinkError::Io(format!("RDMA poll: {e}")));
        }
        for c in done.drain(..) {
            if self.broken.is_none() {
                if let Err(e) = self.complete(c) {
                    self.broken = Some(e);
                }
            }
        }
        self.completions = done;
        if self.broken.is_none() && self.qp.state() == QpState::Error {
            self.broken = Some(self.failed("queue pair", &Status::Flushed));
        }
    }

    fn complete(&mut self, c: Completion) -> Result<(), LinkError> {
        match c.op {
            Op::Write => {
                if c.status != Status::Success {
                    return Err(self.failed("write", &c.status));
                }
                if let Some(busy) = self.tx_busy.get_mut(c.wr_id as usize) {
                    *busy = false;
                }
            }
            Op::Read => {
                if c.status != Status::Success {
                    return Err(self.failed("read of a large frame", &c.status));
                }
                if let Some(r) = &mut self.large_rx {
                    r.done = true;
                }
            }
            Op::RecvImm => {
                if c.status != Status::Success {
                    return Err(self.failed("receive", &c.status));
                }
                // The receive goes back on the queue, unless the queue pair has broken since (the
                // frame it brought is still read; the break is reported after it).
                if self.qp.state() == QpState::Ready {
                    self.qp.post_recv(c.wr_id).map_err(|e| LinkError::Io(format!("RDMA post receive: {e}")))?;
                }
                if c.imm & CREDIT != 0 {
                    self.credits += (c.imm & 0xffff) as usize;
                    if self.credits > SLOTS {
                        return Err(LinkError::Protocol(format!(
                            "RDMA: {} credits for a ring of {SLOTS}",
                            self.credits
                        )));
                    }
                } else if c.imm == LEFT {
                    self.peer_left = true;
                } else if c.imm == RELEASE {
                    match &mut self.large_tx {
                        Some((_, released)) => *released = true,
                        None => return Err(LinkError::Protocol("RDMA: a release of no large frame".into())),
                    }
                } else {
                    let (slot, len) = ((c.imm >> 24) as usize, (c.imm & 0xff_ffff) as usize);
                    // Frames fill the ring in order, never more than it holds: anything else is a
                    // peer (or an accounting) gone wrong, not a frame to read.
                    if slot != self.rx_next
                        || self.arrived.len() >= SLOTS
                        || !(HEADER_LEN..=SLOT_BYTES).contains(&len)
                        || c.len as usize != len
                    {
                        return Err(LinkError::Protocol(format!(
                            "RDMA: a frame of {len} bytes in slot {slot} (expected slot {}, {} waiting)",
                            self.rx_next,
                            self.arrived.len()
                        )));
                    }
                    self.rx_next = (slot + 1) % SLOTS;
                    self.arrived.push_back((slot, len));
                }
            }
        }
        Ok(())
    }

    /// Hands freed slots back to the writer.
    fn give_credits(&mut self) -> Result<(), LinkError> {
        if self.freed == 0 {
            return Ok(());
        }
        self.post_control(CREDIT | self.freed as u32)?;
        self.freed = 0;
        Ok(())
    }

    fn can_write(&self) -> bool {
        self.credits > 0 && !self.tx_busy[self.next_slot] && self.large_tx.is_none()
    }

    /// Whether a `write` call would move: a slot and a credit for a new frame, or the peer's
    /// release of the large frame in flight.
    fn write_ready(&self) -> bool {
        match self.large_tx {
            Some((_, released)) => released,
            None => self.can_write(),
        }
    }

    /// Whether a `peek` or `consume` call would move.
    fn read_ready(&self) -> bool {
        match &self.large_rx {
            Some(r) => r.done,
            None => self.current.is_some() || !self.arrived.is_empty(),
        }
    }

    /// Posts `len` bytes of `payload`'s frame to the next slot: header and `body` copied into
    /// staging, written with immediate.
    fn post_frame(&mut self, header: &[u8], body: &[u8]) -> Result<(), LinkError> {
        let slot = self.next_slot;
        let total = HEADER_LEN + body.len();
        // SAFETY: the staging slot is this side's (its last write completed: not busy) and holds
        // `SLOT_BYTES`, which header and body fit (checked by the callers).
        unsafe {
            let p = self.tx.slot(slot);
            std::ptr::copy_nonoverlapping(header.as_ptr(), p, HEADER_LEN);
            std::ptr::copy_nonoverlapping(body.as_ptr(), p.add(HEADER_LEN), body.len());
        }
        let remote = Remote { addr: self.peer_ring.addr + (slot * SLOT_BYTES) as u64, rkey: self.peer_ring.rkey };
        let imm = (slot as u32) << 24 | total as u32;
        if let Err(e) = self.qp.post_write_imm(slot as u64, &self.tx.region, slot * SLOT_BYTES, total, remote, imm) {
            let e = LinkError::Io(format!("RDMA write: {e} ({})", self.qp.provider()));
            self.broken = Some(e.clone());
            return Err(e);
        }
        self.tx_busy[slot] = true;
        self.credits -= 1;
        self.next_slot = (slot + 1) % SLOTS;
        Ok(())
    }

    /// A control write: no bytes, an immediate.
    fn post_control(&mut self, imm: u32) -> Result<(), LinkError> {
        self.qp
            .post_write_imm(CONTROL_WR, &self.tx.region, 0, 0, self.peer_ring, imm)
            .map_err(|e| LinkError::Io(format!("RDMA control write: {e}")))
    }

    /// Frees the slot of the frame just read, handing credits back half a ring at a time.
    fn free_current(&mut self) {
        self.current = None;
        self.arrived.pop_front();
        self.freed += 1;
        if self.freed >= SLOTS / 2 && self.broken.is_none() && !self.ended() {
            if let Err(e) = self.give_credits() {
                self.broken = Some(e);
            }
        }
    }

    /// `write` of a large frame: first its slot, which says where the payload is (registered
    /// for the peer to read); then, on later calls, done once the peer says it read it. Until
    /// then `written` stays at the header's length, and the payload must not change (the
    /// engine keeps it; a world that breaks revokes the registration first).
    fn write_large(&mut self, header: &[u8], payload: &[u8], written: &mut usize) -> Result<bool, LinkError> {
        if *written == 0 {
            if !self.can_write() {
                self.drive();
                if let Some(e) = &self.broken {
                    return Err(e.clone());
                }
                if !self.can_write() {
                    return if self.ended() { Err(self.gone()) } else { Ok(false) };
                }
            }
            // SAFETY: the payload stays valid and unchanged until this frame is written (the
            // engine's contract for a frame in progress); the registration ends when the peer
            // releases it, or when the world breaks (`revoke`), before the caller gets it back.
            let region = unsafe { self.qp.register(payload.as_ptr() as *mut u8, payload.len(), Access::RemoteRead) }
                .map_err(|e| LinkError::Io(format!("RDMA: registering a large frame: {e}")))?;
            let mut desc = [0u8; LARGE_DESC];
            desc[0..8].copy_from_slice(&region.addr.to_le_bytes());
            desc[8..12].copy_from_slice(&region.rkey.to_le_bytes());
            desc[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
            if let Err(e) = self.post_frame(header, &desc) {
                self.qp.deregister(&region);
                return Err(e);
            }
            self.large_tx = Some((region, false));
            *written = header.len();
            return Ok(false);
        }
        self.drive();
        match self.large_tx {
            Some((region, true)) => {
                self.qp.deregister(&region);
                self.large_tx = None;
                self.tx_bytes += (header.len() + payload.len()) as u64;
                *written = header.len() + payload.len();
                Ok(true)
            }
            _ => match &self.broken {
                Some(e) => Err(e.clone()),
                None if self.ended() => Err(self.gone()),
                None => Ok(false),
            },
        }
    }

    /// `consume` of a large frame: the first call reads the payload from the peer's memory,
    /// straight into a `Copy` destination (registered for this read) or into the scratch area;
    /// a later call, once the read completed, hands it over, tells the peer, and frees the slot.
    fn consume_large(&mut self, slot: usize, len: usize, sink: Sink<'_>) -> Result<bool, LinkError> {
        if self.large_rx.is_none() {
            // SAFETY: the slot holds a completed write of the descriptor (checked in `peek`).
            let d = unsafe { std::slice::from_raw_parts(self.rx.slot(slot).add(HEADER_LEN), LARGE_DESC) };
            let word = |i: usize, n: usize| d[i..i + n].iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b));
            let (addr, rkey, n) = (word(0, 8), word(8, 4) as u32, word(16, 8));
            if n != len as u64 {
                return Err(LinkError::Protocol(format!("RDMA: a large frame of {len} bytes describes {n}")));
            }
            let (into, copy) = match &sink {
                // Nothing to read: the peer is told at once.
                Sink::Discard => {
                    self.free_current();
                    self.release_large();
                    return Ok(true);
                }
                Sink::Copy(dst) if dst.len() != len => {
                    return Err(LinkError::Io("copy target does not match the payload".into()));
                }
                // SAFETY: the caller's destination, exclusively borrowed for this frame, which
                // stays theirs until the read completes (the engine consumes this frame again
                // with it); deregistered before it is handed back.
                Sink::Copy(dst) => (
                    unsafe { self.qp.register(dst.as_ptr() as *mut u8, len, Access::Local) }
                        .map_err(|e| LinkError::Io(format!("RDMA: registering a destination: {e}")))?,
                    true,
                ),
                Sink::Visit(_) => (self.scratch(len)?, false),
            };
            if let Err(e) = self.qp.post_read(READ_WR, &into, 0, len, Remote { addr, rkey }) {
                if copy {
                    self.qp.deregister(&into);
                }
                return Err(self.unreadable(LinkError::Io(format!("RDMA read: {e}"))));
            }
            self.large_rx = Some(LargeRead { into, copy, done: false });
        }
        self.drive();
        let Some(read) = self.large_rx.as_ref() else { return Err(LinkError::Io("a large read vanished".into())) };
        if !read.done {
            return match self.broken.clone() {
                Some(e) => Err(self.unreadable(e)),
                None => Ok(false),
            };
        }
        let (into, copy) = (read.into, read.copy);
        // The engine may hand a frame it first meant to keep aside (read into the scratch area)
        // to a receive posted meanwhile, or the other way round: the bytes go from wherever
        // they were read to wherever they are wanted now.
        // SAFETY: the area the completed read filled with `len` bytes: the scratch area, or the
        // destination the engine gave for this frame, which stays its buffer while it is read.
        let data = unsafe { std::slice::from_raw_parts(into.addr as usize as *const u8, len) };
        match sink {
            Sink::Copy(dst) if dst.len() != len => {
                return Err(self.unreadable(LinkError::Io("copy target does not match the payload".into())));
            }
            Sink::Copy(dst) if dst.as_ptr() as u64 == into.addr => {}
            Sink::Copy(dst) => dst.copy_from_slice(data),
            Sink::Visit(f) => f(data),
            Sink::Discard => {}
        }
        if copy {
            self.qp.deregister(&into);
        }
        self.large_rx = None;
        self.rx_bytes += (HEADER_LEN + len) as u64;
        self.free_current();
        self.release_large();
        Ok(true)
    }

    /// Tells the peer its large frame was read (its buffer is free), unless it is gone; a
    /// failure is the link's end, reported by the next call (the frame itself was handed over).
    fn release_large(&mut self) {
        if self.broken.is_none() && !self.ended() {
            if let Err(e) = self.post_control(RELEASE) {
                self.broken = Some(e);
            }
        }
    }

    /// A large frame that can no longer be read (its read failed: the peer or the queue pair is
    /// gone): it and the frames behind it are dropped, so that the link holds no frame it
    /// cannot hand over, and `e` is the link's end.
    fn unreadable(&mut self, e: LinkError) -> LinkError {
        if let Some(r) = self.large_rx.take() {
            if r.copy {
                self.qp.deregister(&r.into);
            }
        }
        self.current = None;
        self.arrived.clear();
        self.broken.get_or_insert(e).clone()
    }

    /// The scratch area, at least `len` bytes, registered.
    fn scratch(&mut self, len: usize) -> Result<Region, LinkError> {
        if let Some((_, r)) = &self.scratch {
            if r.len >= len {
                return Ok(*r);
            }
        }
        if let Some((_, old)) = self.scratch.take() {
            self.qp.deregister(&old);
        }
        let mut buf = vec![0u8; len.max(RDMA_MAX_PAYLOAD)].into_boxed_slice();
        // SAFETY: the buffer is owned by the link and deregistered before it is freed (here, on
        // growth, or with the queue pair, which the link drops first).
        let r = unsafe { self.qp.register(buf.as_mut_ptr(), buf.len(), Access::Local) }
            .map_err(|e| LinkError::Io(format!("RDMA: registering a read area: {e}")))?;
        self.scratch = Some((buf, r));
        Ok(r)
    }

    /// Waits, at most `DRAIN_FOR`, until what was posted has left this process (so that
    /// dropping the queue pair loses none of it: the farewell, an abort frame).
    fn drain_posted(&mut self) {
        let end = Instant::now() + DRAIN_FOR;
        while self.qp.state() == QpState::Ready && !self.qp.drained() && Instant::now() < end {
            let mut done = std::mem::take(&mut self.completions);
            let _ = self.qp.poll(&mut done);
            done.clear();
            self.completions = done;
            std::thread::yield_now();
        }
    }
}

impl Drop for RdmaLink {
    fn drop(&mut self) {
        // A world that broke drops its links right after posting the abort frame: let it out.
        self.drain_posted();
    }
}

impl Link for RdmaLink {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn max_payload(&self, _op: OpKind, total: usize) -> usize {
        if total >= LARGE_MESSAGES {
            LARGE_MAX_PAYLOAD
        } else {
            RDMA_MAX_PAYLOAD
        }
    }

    fn revoke(&mut self) {
        // The peer must not read a buffer handed back to the caller: its read fails instead.
        if let Some((region, _)) = self.large_tx.take() {
            self.qp.deregister(&region);
        }
    }

    fn write(&mut self, header: &[u8], payload: &[u8], written: &mut usize) -> Result<bool, LinkError> {
        let total = header.len() + payload.len();
        if *written >= total {
            return Ok(true);
        }
        if header.len() != HEADER_LEN || payload.len() > LARGE_MAX_PAYLOAD {
            return Err(LinkError::Protocol(format!("RDMA: cannot write a frame of {} bytes", payload.len())));
        }
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        if payload.len() > RDMA_MAX_PAYLOAD {
            return self.write_large(header, payload, written);
        }
        if *written != 0 {
            return Err(LinkError::Protocol("RDMA: a small frame written in parts".into()));
        }
        if !self.can_write() {
            self.drive();
            if !self.can_write() {
                if let Some(e) = &self.broken {
                    return Err(e.clone());
                }
                // No credit will come from a peer that is gone.
                if self.ended() {
                    return Err(self.gone());
                }
                return Ok(false);
            }
        }
        self.post_frame(header, payload)?;
        self.tx_bytes += total as u64;
        *written = total;
        Ok(true)
    }

    fn peek(&mut self) -> Result<Option<FrameHeader>, LinkError> {
        if let Some(h) = self.current {
            return Ok(Some(h));
        }
        if std::mem::take(&mut self.armed) {
            self.look_at_control();
        }
        self.drive();
        let Some(&(slot, len)) = self.arrived.front() else {
            // Everything the peer wrote has been read: if it broke or is gone, that is the end.
            if let Some(e) = &self.broken {
                return Err(e.clone());
            }
            return if self.ended() { Err(self.gone()) } else { Ok(None) };
        };
        // SAFETY: the slot holds a completed write of `len` >= HEADER_LEN bytes, which the peer
        // does not write again before this side hands the slot back.
        let bytes = unsafe { std::slice::from_raw_parts(self.rx.slot(slot), HEADER_LEN) };
        let h = FrameHeader::decode(bytes).map_err(LinkError::Protocol)?;
        let large = h.len as usize > RDMA_MAX_PAYLOAD;
        if large && (len != HEADER_LEN + LARGE_DESC || h.len as usize > LARGE_MAX_PAYLOAD) {
            return Err(LinkError::Protocol(format!("RDMA: a large frame of {} bytes in a slot of {len}", h.len)));
        }
        if !large && h.len as usize + HEADER_LEN != len {
            return Err(LinkError::Protocol(format!("RDMA: a frame of {len} bytes says its payload is {}", h.len)));
        }
        self.current = Some(h);
        Ok(Some(h))
    }

    fn consume(&mut self, sink: Sink<'_>) -> Result<bool, LinkError> {
        let Some(h) = self.current else {
            return Err(LinkError::Io("consume without a peeked frame".into()));
        };
        let Some(&(slot, _)) = self.arrived.front() else {
            return Err(LinkError::Io("consume without an arrived frame".into()));
        };
        let len = h.len as usize;
        if len > RDMA_MAX_PAYLOAD {
            return self.consume_large(slot, len, sink);
        }
        // SAFETY: as in `peek`; the payload follows the header inside the slot.
        let payload = unsafe { std::slice::from_raw_parts(self.rx.slot(slot).add(HEADER_LEN), len) };
        match sink {
            Sink::Copy(dst) if dst.len() != len => {
                return Err(LinkError::Io("copy target does not match the payload".into()));
            }
            Sink::Copy(dst) => dst.copy_from_slice(payload),
            Sink::Visit(f) => f(payload),
            Sink::Discard => {}
        }
        self.rx_bytes += (HEADER_LEN + len) as u64;
        self.free_current();
        Ok(true)
    }

    fn traffic(&self) -> (u64, u64) {
        (self.rx_bytes, self.tx_bytes)
    }

    fn arm(&mut self, read: bool, write: bool) -> Armed {
        if std::mem::take(&mut self.armed) {
            // Woken since the last look: maybe by the control socket, whose end stays
            // readable, so it is read here, not slept on again.
            self.look_at_control();
        }
        if (read && self.read_ready()) || (write && self.write_ready()) {
            return Armed::Ready;
        }
        if self.broken.is_some() || self.ended() {
            // The next peek or write reports it; a link asked for neither has nothing to wait for.
            return if read || write { Armed::Ready } else { Armed::Idle };
        }
        let Some((fd, ev)) = self.qp.arm() else { return Armed::Ready };
        let watched = match self.qp_fd {
            Some((f, e)) if f == fd && e == ev => Ok(()),
            Some((f, _)) if f == fd => self.waits.rewatch(fd, ev, 1),
            _ => self.waits.watch(fd, ev, 1),
        };
        if watched.is_err() {
            return Armed::Ready;
        }
        self.qp_fd = Some((fd, ev));
        self.armed = true;
        Armed::Wait(self.waits.fd(), libc::POLLIN)
    }

    fn hangup_fd(&mut self, _idle: bool) -> Option<(RawFd, i16)> {
        if self.hung_up {
            return None;
        }
        match &self.idle {
            Some(w) => Some((w.fd(), libc::POLLIN)),
            None => Some((self.ctl.as_raw_fd(), libc::POLLRDHUP)),
        }
    }

    fn reported(&mut self) {
        self.armed = true;
    }

    fn holds_frames(&self) -> bool {
        self.current.is_some() || !self.arrived.is_empty()
    }

    fn spins(&self) -> bool {
        true
    }

    fn shutdown(&mut self) {
        // Credits owed, then the farewell (no credit needed: it fills no slot), then what was
        // posted leaves (bounded), then the socket's end.
        if self.qp.state() == QpState::Ready && self.broken.is_none() {
            let _ = self.give_credits();
            let _ = self.qp.post_write_imm(CONTROL_WR, &self.tx.region, 0, 0, self.peer_ring, LEFT);
            self.drain_posted();
        }
        let _ = self.ctl.shutdown(std::net::Shutdown::Write);
    }
}
