//! The TCP transport: frames over one non-blocking stream socket per peer pair, shared by every
//! world of the pair that was made from a world on it.
//!
//! Writes go out with one vectored `sendmsg` (header and payload together, no copy), or, for a
//! frame of at most 512 bytes, gathered into one buffer and sent with one `send`. Reads fill
//! a staging buffer so that many small frames cost one system call; a large payload headed for
//! a plain copy is read straight into its destination instead. `TCP_NODELAY` is on (latency of
//! small messages). Socket buffers are left to the kernel, which grows them with the traffic
//! (asking for a size turns that growth off, and a stock kernel caps the size far below what a
//! fast link wants); `WorldOptions::socket_buffer` sets one where an operator knows better.
//!
//! **Channels.** A pair's socket (a [`Pair`]) carries one channel per world that uses it: the
//! world it was connected for, and each world made from a world on it (`dup`, `split`,
//! `shrink`, `grow`: `bootstrap/lanes.rs`), which opens a channel instead of a connection of
//! its own. Frames say their world (the header's world tag), which is the channel's key. A
//! channel that reads the socket takes its own frames straight into their destination, and
//! moves any other channel's frame into that channel's inbox, waking it; so one world never
//! waits for another to read. Each channel may have at most [`WINDOW`] bytes of frames that
//! its peer's world has not taken yet (credit: the peer grants more with a `Credit` frame each
//! time its world took a quarter of it), so a world that stops reading holds at most that much memory of its
//! peer and never blocks the socket for its siblings. A channel closed by its world sends
//! `End`: the peer's world on it sees the link closed, exactly as if its socket had closed,
//! while the pair and its other channels go on. The socket failing (the peer process gone,
//! the connection cut, bytes that are no frame) fails every channel: every world of the pair
//! breaks. `docs/fault-model.md` says what is shared and what is not. A link alone on its
//! socket that never offered it to a world made from its own holds the pair's state without a
//! lock; offering it (`Link::lane_source`) puts the state behind the pair's lock for good.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};

use super::wake::Wake;
use super::{Armed, Link, LinkError, Sink, TransportKind};
use crate::engine::wire::{FrameHeader, FrameKind, OpKind, HEADER_LEN};
use crate::sys;
use crate::sys::sync::{lock, Arc, Mutex, MutexGuard};

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
/// Bytes of frames (headers included) a channel may have sent that its peer's world has not
/// taken yet: what one world can leave in its peer's memory. Several times what the socket
/// holds in flight on a fast link, so that credit rarely stops a stream.
pub(crate) const WINDOW: u64 = 8 << 20;
/// A channel grants its peer more credit once its world took this much since it last did.
const GRANT_AT: u64 = WINDOW / 4;
/// Channels of one pair at most (worlds made from worlds beyond it connect on their own).
pub(crate) const MAX_CHANNELS: usize = 64;

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

/// One world's link over a pair's socket: its channel.
pub(crate) struct TcpLink {
    /// Always `Some` between calls.
    mode: Option<Mode>,
    key: u32,
    /// The frame `peek` returned has all its payload here already (staged or parked), which
    /// stays true until it is consumed: `payload_ready` answers without the pair's lock (an
    /// atomic exchange costs about as much here as the rest of the call).
    whole: bool,
}

/// How a link holds its pair's state.
enum Mode {
    /// Alone on the socket, which it has offered to no world made from its own: nothing else
    /// can reach the state, so no lock (on this machine each lock and unlock costs about as
    /// much as the rest of a link call).
    Solo(Box<PairState>),
    /// Shared with other channels (or offered to them): through the pair's lock.
    Shared(Arc<Pair>),
}

/// The pair's state for one call of a link.
enum St<'a> {
    Solo(&'a mut PairState),
    Shared(MutexGuard<'a, PairState>),
}

impl std::ops::Deref for St<'_> {
    type Target = PairState;
    fn deref(&self) -> &PairState {
        match self {
            St::Solo(s) => s,
            St::Shared(g) => g,
        }
    }
}

impl std::ops::DerefMut for St<'_> {
    fn deref_mut(&mut self) -> &mut PairState {
        match self {
            St::Solo(s) => s,
            St::Shared(g) => g,
        }
    }
}

/// A pair's socket, for a world made from a world that uses it ([`TcpSource::open`]).
#[derive(Clone)]
pub(crate) struct TcpSource(Arc<Pair>);

/// The socket of a peer pair and what its channels share.
struct Pair {
    st: Mutex<PairState>,
}

struct PairState {
    sock: TcpStream,
    staging: Box<[u8]>,
    start: usize,
    end: usize,
    /// The frame whose payload comes next on the socket.
    cur: Option<Cur>,
    chans: Vec<Chan>,
    /// The channel whose frame is half written and whose world's engine writes the rest (one
    /// channel alone on the pair: it keeps its payload, so nothing is copied; no channel
    /// opens meanwhile). With other channels, a half-written frame's rest goes to `pending`
    /// instead.
    tx_owner: Option<u32>,
    /// Bytes to send before any new frame: the rest of a frame, then the pair's own frames.
    pending: Vec<u8>,
    pending_at: usize,
    /// The channel whose frame's rest is in `pending`, and where that rest ends there: its
    /// world's frame is written once `pending` went out that far (its engine keeps calling
    /// `write` until then, so the world stays busy, and its socket watched for room).
    rest: Option<(u32, usize)>,
    /// A channel alone on the pair asleep on the bare socket (armed without a `Wake`): no
    /// channel opens until it calls again, since nothing could wake it for a parked frame.
    bare_sleeper: bool,
    /// Why the socket failed, for every channel.
    failed: Option<LinkError>,
}

/// The frame whose payload the socket delivers next.
struct Cur {
    key: u32,
    h: FrameHeader,
    /// Payload bytes read so far.
    done: usize,
    route: Route,
}

enum Route {
    /// Its channel reads it itself, straight into where the payload goes.
    Owner,
    /// Another channel moves it into its channel's inbox: the payload from `base` on (what
    /// its channel had read before is in place already).
    Inbox { data: Vec<u8>, base: usize },
    /// No channel has this key (closed here): dropped.
    Nowhere,
}

/// A frame moved into its channel's inbox: the payload from `base` on.
struct Parked {
    h: FrameHeader,
    data: Vec<u8>,
    base: usize,
}

struct Chan {
    key: u32,
    inbox: VecDeque<Parked>,
    /// Bytes of frames this side may still send.
    credit: u64,
    /// Bytes of frames this side's world took since it last granted credit.
    taken: u64,
    /// A frame waits for credit.
    starved: bool,
    /// The peer closed this channel.
    ended: Option<LinkError>,
    /// With other channels on the pair: what wakes this channel's world when another channel
    /// parked a frame for it, granted it credit or saw it end.
    wake: Option<Wake>,
    /// The world sleeps on `wake`.
    asleep: bool,
    rx: u64,
    tx: u64,
}

impl Chan {
    fn new(key: u32) -> Chan {
        Chan {
            key,
            inbox: VecDeque::new(),
            credit: WINDOW,
            taken: 0,
            starved: false,
            ended: None,
            wake: None,
            asleep: false,
            rx: 0,
            tx: 0,
        }
    }

    /// The channel ended, or the socket failed: wakes its driver and its idle watch.
    fn hang_up(&mut self) {
        if let Some(w) = &self.wake {
            w.hup.signal();
        }
        self.wake();
    }

    fn wake(&mut self) {
        if let (true, Some(w)) = (self.asleep, &self.wake) {
            w.ev.signal();
            self.asleep = false;
        }
    }
}

/// A pair's own frame (credit, end) about channel `key`.
fn pair_frame(kind: FrameKind, key: u32, count: u64) -> [u8; HEADER_LEN] {
    let mut h = FrameHeader::control(kind, key, 0, 0);
    h.count = count;
    h.encode()
}

impl PairState {
    fn staged(&self) -> usize {
        self.end - self.start
    }

    /// The channel of `key`, if it is open here.
    fn find(&mut self, key: u32) -> Option<&mut Chan> {
        self.chans.iter_mut().find(|c| c.key == key)
    }

    fn chan(&mut self, key: u32) -> Result<&mut Chan, LinkError> {
        self.find(key).ok_or_else(|| LinkError::Io("channel closed".into()))
    }

    /// Records that the socket failed, for every channel, and wakes them.
    fn broke(&mut self, e: LinkError) -> LinkError {
        if self.failed.is_none() {
            self.failed = Some(e.clone());
            for c in &mut self.chans {
                c.hang_up();
            }
        }
        e
    }

    fn check(&self) -> Result<(), LinkError> {
        self.failed.clone().map_or(Ok(()), Err)
    }

    /// Makes room for at least `need` contiguous bytes from `start`, then reads what the socket
    /// has. Returns false when nothing more is available now.
    fn fill(&mut self, need: usize) -> Result<bool, LinkError> {
        if self.start + need > STAGING || self.end == STAGING {
            self.staging.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        match (&self.sock).read(&mut self.staging[self.end..]) {
            Ok(0) => Err(self.broke(LinkError::Closed("peer closed the connection".into()))),
            Ok(n) => {
                self.end += n;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(self.broke(io_err(e))),
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

    fn settle(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads the next frame header into `cur`, or handles it if it is the pair's own. False
    /// when no whole header has arrived.
    fn next_header(&mut self) -> Result<bool, LinkError> {
        if !self.have(HEADER_LEN)? {
            return Ok(false);
        }
        let h = match FrameHeader::decode(&self.staging[self.start..self.start + HEADER_LEN]) {
            Ok(h) => h,
            Err(e) => return Err(self.broke(LinkError::Protocol(e))),
        };
        self.start += HEADER_LEN;
        let chan = self.find(h.world);
        match (h.kind, chan) {
            (FrameKind::Credit, Some(c)) => {
                c.credit = c.credit.saturating_add(h.count);
                if std::mem::take(&mut c.starved) {
                    c.wake();
                }
            }
            (FrameKind::End, Some(c)) => {
                c.ended.get_or_insert(LinkError::Closed("peer closed the world's channel".into()));
                c.hang_up();
            }
            // About a channel closed here already.
            (FrameKind::Credit | FrameKind::End, None) => {}
            (_, chan) => {
                if h.len as usize > TCP_MAX_PAYLOAD {
                    let e = LinkError::Protocol(format!("frame of {} bytes is over the TCP limit", h.len));
                    return Err(self.broke(e));
                }
                let route = match chan {
                    Some(c) => {
                        c.rx += (HEADER_LEN + h.len as usize) as u64;
                        Route::Owner
                    }
                    None => Route::Nowhere,
                };
                self.cur = Some(Cur { key: h.world, h, done: 0, route });
            }
        }
        self.settle();
        Ok(true)
    }

    /// Moves the frame in `cur` along on behalf of a channel other than its reader: its payload
    /// into its channel's inbox (or nowhere). False when the socket has nothing more now.
    fn move_along(&mut self) -> Result<bool, LinkError> {
        let Some(cur) = self.cur.as_mut() else { return Ok(true) };
        let len = cur.h.len as usize;
        if let Route::Owner = cur.route {
            cur.route = Route::Inbox { data: Vec::with_capacity(len - cur.done), base: cur.done };
        }
        while self.cur.as_ref().is_some_and(|c| c.done < len) {
            if self.staged() == 0 && !self.fill(1)? {
                return Ok(false);
            }
            let (start, staged) = (self.start, self.staged());
            let Some(cur) = self.cur.as_mut() else { break };
            let n = staged.min(len - cur.done);
            if let Route::Inbox { data, .. } = &mut cur.route {
                data.extend_from_slice(&self.staging[start..start + n]);
            }
            cur.done += n;
            self.start += n;
        }
        if let Some(Cur { key, h, route: Route::Inbox { data, base }, .. }) = self.cur.take() {
            if let Some(c) = self.find(key) {
                c.inbox.push_back(Parked { h, data, base });
                c.wake();
            }
        }
        self.settle();
        Ok(true)
    }

    /// After channel `me` read the socket: moves the other channels' frames it read along to
    /// their inboxes (waking them), up to its own next frame or the end of what arrived. A
    /// channel asleep on the socket is not woken by bytes that another read first, so
    /// whoever reads them hands them on.
    fn pass_on(&mut self, me: u32) -> Result<(), LinkError> {
        if self.chans.len() < 2 {
            return Ok(());
        }
        self.sweep(Some(me))
    }

    /// After a call of channel `me` that may have read the socket, with other channels on the
    /// pair: [`PairState::pass_on`], and bytes a frame's rest left waiting sent along. A
    /// failure is recorded for every channel, which their next call reports.
    fn hand_on(&mut self, me: u32) {
        let _ = self.pass_on(me);
        if self.pending_at < self.pending.len() {
            let _ = self.flush();
        }
    }

    /// True when `me`'s next frame has all its payload here (parked, or staged behind its
    /// header), without reading more.
    fn whole(&mut self, me: u32) -> bool {
        let staged = self.staged();
        match (self.chans.iter().find(|c| c.key == me), &self.cur) {
            (Some(c), _) if !c.inbox.is_empty() => true,
            (_, Some(Cur { key, h, done, route: Route::Owner })) if *key == me => staged >= h.len as usize - done,
            _ => false,
        }
    }

    /// Parks every whole frame that arrived, up to `me`'s own next frame (`None`: all).
    fn sweep(&mut self, me: Option<u32>) -> Result<(), LinkError> {
        loop {
            match &self.cur {
                Some(c) if Some(c.key) == me && matches!(c.route, Route::Owner) => return Ok(()),
                Some(_) => {
                    if !self.move_along()? {
                        return Ok(());
                    }
                }
                None if self.staged() < HEADER_LEN => return Ok(()),
                None => {
                    self.next_header()?;
                }
            }
        }
    }

    /// The next frame of channel `me`, as `peek` wants it.
    fn peek(&mut self, me: u32) -> Result<Option<FrameHeader>, LinkError> {
        loop {
            let c = self.chan(me)?;
            if let Some(p) = c.inbox.front() {
                return Ok(Some(p.h));
            }
            let ended = c.ended.clone();
            self.check()?;
            match &self.cur {
                Some(cur) if cur.key == me && matches!(cur.route, Route::Owner) => return Ok(Some(cur.h)),
                Some(_) => {
                    if !self.move_along()? {
                        return Ok(None);
                    }
                }
                None => {
                    // The end comes after the channel's last frame: all of them are taken.
                    if let Some(e) = ended {
                        return Err(e);
                    }
                    if !self.next_header()? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Counts `bytes` of a frame of `me` as taken by its world, and queues a grant of credit
    /// to its peer once enough was (sent by the call's [`PairState::hand_on`]).
    fn took(&mut self, me: u32, bytes: usize) {
        let Ok(c) = self.chan(me) else { return };
        c.taken += bytes as u64;
        if c.taken >= GRANT_AT {
            let grant = std::mem::take(&mut c.taken);
            self.pending.extend_from_slice(&pair_frame(FrameKind::Credit, me, grant));
        }
    }

    fn consume(&mut self, me: u32, sink: Sink<'_>) -> Result<bool, LinkError> {
        loop {
            let c = self.chan(me)?;
            if let Some(p) = c.inbox.front() {
                let len = p.h.len as usize;
                match sink {
                    Sink::Copy(dst) if dst.len() != len => {
                        return Err(LinkError::Io("copy target does not match the payload".into()))
                    }
                    Sink::Copy(dst) => dst[p.base..].copy_from_slice(&p.data),
                    Sink::Visit(_) if p.base != 0 => {
                        return Err(LinkError::Io("a payload begun as a copy cannot be visited".into()))
                    }
                    Sink::Visit(f) => f(&p.data),
                    Sink::Discard => {}
                }
                c.inbox.pop_front();
                self.took(me, HEADER_LEN + len);
                return Ok(true);
            }
            match &self.cur {
                Some(cur) if cur.key == me && matches!(cur.route, Route::Owner) => break,
                // Moved along by another channel, not yet whole: this one goes on with it.
                Some(cur) if cur.key == me => {
                    if !self.move_along()? {
                        return Ok(false);
                    }
                }
                _ => return Err(LinkError::Io("consume without a peeked frame".into())),
            }
        }
        let (h, mut done) = match &self.cur {
            Some(c) => (c.h, c.done),
            None => return Err(LinkError::Io("consume without a peeked frame".into())),
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
                        dst[done..done + n].copy_from_slice(&self.staging[self.start..self.start + n]);
                        self.start += n;
                        done += n;
                        continue;
                    }
                    if len - done >= DIRECT_READ_MIN {
                        match (&self.sock).read(&mut dst[done..]) {
                            Ok(0) => return Err(self.broke(LinkError::Closed("peer closed the connection".into()))),
                            Ok(n) => done += n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(self.broke(io_err(e))),
                        }
                    } else if !self.fill(len - done)? {
                        break;
                    }
                }
                if let Some(c) = self.cur.as_mut() {
                    c.done = done;
                }
                if done < len {
                    return Ok(false);
                }
            }
            Sink::Visit(f) => {
                if done != 0 {
                    return Err(LinkError::Io("a payload begun as a copy cannot be visited".into()));
                }
                if !self.have(len)? {
                    return Ok(false);
                }
                f(&self.staging[self.start..self.start + len]);
                self.start += len;
            }
            Sink::Discard => {
                while done < len {
                    if self.staged() == 0 && !self.fill(1)? {
                        if let Some(c) = self.cur.as_mut() {
                            c.done = done;
                        }
                        return Ok(false);
                    }
                    let n = self.staged().min(len - done);
                    self.start += n;
                    done += n;
                }
            }
        }
        self.cur = None;
        self.settle();
        self.took(me, HEADER_LEN + len);
        Ok(true)
    }

    /// Sends what waits in `pending`. True once nothing does (and no frame is half written).
    fn flush(&mut self) -> Result<bool, LinkError> {
        if self.tx_owner.is_some() {
            return Ok(false);
        }
        while self.pending_at < self.pending.len() {
            match sys::send_vectored(self.sock.as_raw_fd(), &[&self.pending[self.pending_at..]]) {
                Ok(n) => self.pending_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(self.broke(io_err(e))),
            }
        }
        self.pending.clear();
        self.pending_at = 0;
        self.rest = None;
        Ok(true)
    }

    /// True once `me`'s rest in `pending` (if any) went out.
    fn rest_sent(&mut self, me: u32) -> Result<bool, LinkError> {
        match self.rest {
            Some((k, end)) if k == me => {
                if self.pending_at < end {
                    self.flush()?;
                }
                Ok(self.rest.is_none_or(|(_, end)| self.pending_at >= end))
            }
            _ => Ok(true),
        }
    }

    fn write(&mut self, me: u32, header: &[u8], payload: &[u8], written: &mut usize) -> Result<bool, LinkError> {
        self.check()?;
        let total = header.len() + payload.len();
        if *written == 0 {
            if !self.flush()? {
                return Ok(false);
            }
            let c = self.chan(me)?;
            if let Some(e) = &c.ended {
                return Err(e.clone());
            }
            if c.credit < total as u64 {
                c.starved = true;
                return Ok(false);
            }
        } else if self.tx_owner != Some(me) {
            // Its rest waits in `pending`: the frame is written once that went out.
            if !self.rest_sent(me)? {
                return Ok(false);
            }
            if self.rest.is_some_and(|(k, _)| k == me) {
                self.rest = None;
            }
            *written = total;
            return Ok(true);
        }
        let fd = self.sock.as_raw_fd();
        while *written < total {
            let w = *written;
            let r = if w < header.len() {
                sys::send_vectored(fd, &[&header[w..], payload])
            } else {
                sys::send_vectored(fd, &[&payload[w - header.len()..]])
            };
            match r {
                Ok(n) => {
                    let c = self.chan(me)?;
                    if w == 0 {
                        c.credit -= total as u64;
                    }
                    c.tx += n as u64;
                    *written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if *written == 0 {
                        return Ok(false);
                    }
                    if self.tx_owner == Some(me) || self.chans.len() == 1 {
                        self.tx_owner = Some(me);
                        return Ok(false);
                    }
                    // Other channels must not wait for this world to write the rest: it goes
                    // to the front of `pending` (ahead of any credit or end queued there),
                    // which whoever writes next sends first; this world's frame is written
                    // once it went out.
                    let w = *written;
                    let rest: &[&[u8]] = match w < header.len() {
                        true => &[&header[w..], payload],
                        false => &[&payload[w - header.len()..]],
                    };
                    let at = self.pending_at;
                    let len: usize = rest.iter().map(|r| r.len()).sum();
                    self.pending.splice(at..at, rest.iter().flat_map(|r| r.iter().copied()));
                    self.rest = Some((me, at + len));
                    self.chan(me)?.tx += len as u64;
                    return Ok(false);
                }
                Err(e) => return Err(self.broke(io_err(e))),
            }
        }
        if self.tx_owner.take().is_some() {
            // What was queued while it wrote its rest (credit) goes now.
            let _ = self.flush();
        }
        Ok(true)
    }

    fn arm(&mut self, me: u32, read: bool, write: bool) -> Armed {
        if self.failed.is_some() {
            return Armed::Ready;
        }
        let flushed = matches!(self.flush(), Ok(true));
        // Its own frame stays in front of the others' while its world reads nothing: it goes
        // to its inbox, the others' to theirs.
        if !read
            && self.chans.len() > 1
            && self.cur.as_ref().is_some_and(|c| c.key == me)
            && self.move_along().and_then(|_| self.pass_on(me)).is_err()
        {
            return Armed::Ready;
        }
        let (staged, cur_free) = (self.staged(), self.cur.is_none());
        let fd = self.sock.as_raw_fd();
        let Ok(c) = self.chan(me) else { return Armed::Ready };
        if let Some(w) = &c.wake {
            w.ev.drain();
        }
        if read {
            // Frames parked for it, its end, or a whole header nobody looked at yet: work now.
            // (A frame already peeked but not consumed is waiting for more of its payload, or
            // for the engine, which passes before it sleeps: one the direct path peeked and
            // left is taken by the pass of the call posted right after.)
            if !c.inbox.is_empty() || c.ended.is_some() || (cur_free && staged >= HEADER_LEN) {
                return Armed::Ready;
            }
        }
        let mut ev = libc::POLLRDHUP;
        if read || (write && c.starved) {
            ev |= libc::POLLIN;
        }
        if (write && !c.starved) || !flushed {
            ev |= libc::POLLOUT;
        }
        match &c.wake {
            None => {
                self.bare_sleeper = true;
                Armed::Wait(fd, ev)
            }
            Some(w) => {
                if w.ep.rewatch(fd, ev, 1).is_err() {
                    return Armed::Ready;
                }
                c.asleep = true;
                Armed::Wait(w.ep.fd(), libc::POLLIN)
            }
        }
    }

    /// Ends channel `me` here: tells the peer (`End`), drops what was parked for it.
    fn close(&mut self, me: u32) {
        let Some(i) = self.chans.iter().position(|c| c.key == me) else { return };
        self.chans.remove(i);
        // Whoever slept on the bare socket was this channel, alone on the pair.
        self.bare_sleeper = false;
        if self.tx_owner == Some(me) {
            // Its world went with half a frame out, which no one else can finish: the stream
            // is cut, for every channel.
            self.tx_owner = None;
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
            self.broke(LinkError::Closed("a world closed its channel in the middle of a frame".into()));
            return;
        }
        if let Some(cur) = self.cur.as_mut().filter(|c| c.key == me) {
            cur.route = Route::Nowhere;
        }
        if self.rest.is_some_and(|(k, _)| k == me) {
            // Its rest stays in `pending`, to keep the stream whole; nobody waits for it.
            self.rest = None;
        }
        if self.failed.is_none() {
            self.pending.extend_from_slice(&pair_frame(FrameKind::End, me, 0));
            let _ = self.flush();
            // What it read and left in staging behind its own frame is the others': hand it
            // on, as any reader does.
            if !self.chans.is_empty() {
                let _ = self.sweep(None);
            }
        }
    }
}

impl Pair {
    fn state(&self) -> MutexGuard<'_, PairState> {
        lock(&self.st)
    }
}

impl TcpLink {
    /// Wraps a connected stream (already past the link handshake) as the first channel of a
    /// new pair, for the world whose frames carry `key`.
    pub(crate) fn new(sock: TcpStream, buffer: Option<usize>, key: u32) -> io::Result<TcpLink> {
        tune(&sock, buffer)?;
        let st = PairState {
            sock,
            staging: vec![0u8; STAGING].into_boxed_slice(),
            start: 0,
            end: 0,
            cur: None,
            chans: vec![Chan::new(key)],
            tx_owner: None,
            pending: Vec::new(),
            pending_at: 0,
            rest: None,
            bare_sleeper: false,
            failed: None,
        };
        Ok(TcpLink { mode: Some(Mode::Solo(Box::new(st))), key, whole: false })
    }

    /// The pair's state for this call (`None` cannot happen: `mode` is only empty inside
    /// [`TcpLink::shared`]).
    fn state(&mut self) -> Option<St<'_>> {
        match self.mode.as_mut()? {
            Mode::Solo(st) => Some(St::Solo(st)),
            Mode::Shared(p) => Some(St::Shared(p.state())),
        }
    }

    /// The pair, shared from now on if it was this link's alone.
    fn shared(&mut self) -> Option<Arc<Pair>> {
        let pair = match self.mode.take()? {
            Mode::Solo(st) => Arc::new(Pair { st: Mutex::new(*st) }),
            Mode::Shared(p) => p,
        };
        self.mode = Some(Mode::Shared(pair.clone()));
        Some(pair)
    }

    /// The pair, for worlds made from this link's world, while its socket works.
    fn source(&mut self) -> Option<TcpSource> {
        let pair = self.shared()?;
        let ok = pair.state().failed.is_none();
        ok.then_some(TcpSource(pair))
    }
}

impl TcpSource {
    /// True while a channel can be opened on the pair.
    pub(crate) fn can_open(&self) -> bool {
        let st = self.0.state();
        st.failed.is_none() && st.chans.len() < MAX_CHANNELS
    }

    /// Opens the channel of the world whose frames carry `key` (both sides of the pair open
    /// it before either sends on it).
    pub(crate) fn open(&self, key: u32) -> io::Result<TcpLink> {
        let mut st = self.0.state();
        if let Some(e) = &st.failed {
            return Err(io::Error::other(format!("the pair's connection failed: {e}")));
        }
        if st.chans.len() >= MAX_CHANNELS {
            return Err(io::Error::other(format!("the pair carries {MAX_CHANNELS} worlds already")));
        }
        if st.chans.iter().any(|c| c.key == key) {
            return Err(io::Error::other(format!("a world with tag {key:#x} uses the pair already")));
        }
        // The world alone on the pair writes a frame's rest itself, or sleeps on the bare
        // socket: another world's reads could then leave it waiting. Rare (the parent busy on
        // another thread during the call); the new world connects on its own instead.
        if st.tx_owner.is_some() || st.bare_sleeper {
            return Err(io::Error::other("the pair's world is in the middle of a frame or asleep on its socket"));
        }
        // From now on a channel may be woken by another: each gets its own wake-up.
        let fd = st.sock.as_raw_fd();
        for c in st.chans.iter_mut().filter(|c| c.wake.is_none()) {
            c.wake = Some(Wake::new(fd)?);
        }
        let mut c = Chan::new(key);
        c.wake = Some(Wake::new(fd)?);
        st.chans.push(c);
        Ok(TcpLink { mode: Some(Mode::Shared(self.0.clone())), key, whole: false })
    }
}

/// A link whose state went missing (cannot happen; see [`TcpLink::state`]).
fn gone() -> LinkError {
    LinkError::Io("the link's state is gone".into())
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        let key = self.key;
        if let Some(mut st) = self.state() {
            st.close(key);
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
        let key = self.key;
        let mut st = self.state().ok_or_else(gone)?;
        st.bare_sleeper = false;
        st.write(key, header, payload, written)
    }

    fn peek(&mut self) -> Result<Option<FrameHeader>, LinkError> {
        let key = self.key;
        let mut st = self.state().ok_or_else(gone)?;
        st.bare_sleeper = false;
        let r = st.peek(key);
        st.hand_on(key);
        let whole = matches!(r, Ok(Some(_))) && st.whole(key);
        drop(st);
        self.whole = whole;
        r
    }

    fn consume(&mut self, sink: Sink<'_>) -> Result<bool, LinkError> {
        let key = self.key;
        let mut st = self.state().ok_or_else(gone)?;
        st.bare_sleeper = false;
        let r = st.consume(key, sink);
        st.hand_on(key);
        drop(st);
        if matches!(r, Ok(true)) {
            self.whole = false;
        }
        r
    }

    fn traffic(&self) -> (u64, u64) {
        let counts = |st: &PairState| st.chans.iter().find(|c| c.key == self.key).map_or((0, 0), |c| (c.rx, c.tx));
        match &self.mode {
            Some(Mode::Solo(st)) => counts(st),
            Some(Mode::Shared(p)) => counts(&p.state()),
            None => (0, 0),
        }
    }

    fn arm(&mut self, read: bool, write: bool) -> Armed {
        let key = self.key;
        match self.state() {
            Some(mut st) => st.arm(key, read, write),
            None => Armed::Ready,
        }
    }

    fn hangup_fd(&mut self, _idle: bool) -> Option<(RawFd, i16)> {
        let key = self.key;
        let mut st = self.state()?;
        let fd = st.sock.as_raw_fd();
        // Bytes waiting to go (a credit, an end, a frame's rest) while every world of the pair
        // may be idle: the watch also waits for room, and `reported` sends them.
        let ev = match st.pending_at < st.pending.len() {
            true => libc::POLLRDHUP | libc::POLLOUT,
            false => libc::POLLRDHUP,
        };
        let c = st.chan(key).ok()?;
        match &c.wake {
            None => Some((fd, ev)),
            Some(w) => {
                w.idle.rewatch(fd, ev, 1).ok()?;
                Some((w.idle.fd(), libc::POLLIN))
            }
        }
    }

    fn reported(&mut self) {
        let key = self.key;
        let Some(mut st) = self.state() else { return };
        if let Ok(Chan { wake: Some(w), .. }) = st.chan(key) {
            w.hup.drain();
        }
        let _ = st.flush();
    }

    fn spins(&self) -> bool {
        true
    }

    fn direct_max(&self) -> usize {
        TCP_DIRECT_MAX
    }

    fn payload_ready(&mut self) -> Result<bool, LinkError> {
        if self.whole {
            return Ok(true);
        }
        let me = self.key;
        let mut st = self.state().ok_or_else(gone)?;
        if !st.chan(me)?.inbox.is_empty() {
            return Ok(true);
        }
        let r = match &st.cur {
            Some(Cur { key, h, done, route: Route::Owner }) if *key == me => {
                let rest = h.len as usize - done;
                st.have(rest)
            }
            _ => Ok(false),
        };
        st.hand_on(me);
        r
    }

    fn shutdown(&mut self) {
        let key = self.key;
        let last = match &self.mode {
            Some(Mode::Shared(p)) => Arc::strong_count(p) == 1,
            _ => true,
        };
        let Some(mut st) = self.state() else { return };
        st.close(key);
        // The last user of the pair: FIN after the data already queued; then read what is
        // pending so that closing with unread input does not turn the FIN into a reset.
        if st.chans.is_empty() && last && matches!(st.flush(), Ok(true)) {
            let _ = st.sock.shutdown(std::net::Shutdown::Write);
            let mut sink = [0u8; 4096];
            while matches!((&st.sock).read(&mut sink), Ok(n) if n > 0) {}
        }
    }

    fn lane_source(&mut self) -> Option<super::PairSource> {
        self.source().map(super::PairSource::Tcp)
    }

    fn segment_source(&mut self) -> Option<super::PairSource> {
        self.source().map(super::PairSource::Tcp)
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
        (TcpLink::new(s, None, 1).unwrap(), raw)
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
        let mut link = TcpLink::new(peer, None, 7).unwrap();
        assert_eq!(rcvbuf(&link.state().unwrap().sock), default);
        drop(untouched);
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let mut asked = TcpLink::new(s, Some(16 << 10), 7).unwrap();
        // Linux doubles what it is asked for (bookkeeping), within its limits.
        assert_ne!(rcvbuf(&asked.state().unwrap().sock), default);
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
        let mut b = TcpLink::new(b, None, 9).unwrap();
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

    /// Sleeps on what `arm` says, at most `ms` milliseconds.
    fn sleep_on(link: &mut TcpLink, read: bool, write: bool, ms: i32) {
        if let Armed::Wait(fd, ev) = link.arm(read, write) {
            let mut p = [sys::pollfd(fd, ev)];
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(p.as_mut_ptr(), 1, ms) };
        }
    }

    fn data_header(world: u32, seq: u64, len: usize) -> FrameHeader {
        let mut h = FrameHeader::control(FrameKind::Data, world, 1, 0);
        h.op = Some(OpKind::P2p);
        h.seq = seq;
        h.len = len as u32;
        h.total = len as u64;
        h
    }

    /// Payload of frame `i` of channel `world`: its length varies, its bytes say who and which.
    fn payload(world: u32, i: u64) -> Vec<u8> {
        let len = [0usize, 8, 1000, 40_000, 300_000][(i % 5) as usize];
        (0..len).map(|j| (world as u64 * 31 + i * 7 + j as u64) as u8).collect()
    }

    /// Sends frame `i` of `world` with payload `p`, sleeping as `arm` says when it cannot; a
    /// reader meanwhile keeps the socket moving (credit, the other channel's frames).
    fn send_one(link: &mut TcpLink, world: u32, i: u64, p: &[u8]) {
        let h = data_header(world, i, p.len()).encode();
        let mut written = 0;
        let t = std::time::Instant::now();
        while !link.write(&h, p, &mut written).unwrap() {
            assert!(t.elapsed() < std::time::Duration::from_secs(20), "world {world}: send {i} stuck");
            sleep_on(link, true, true, 50);
            // (The peer may close its end once it took the last frame, before this side saw
            // its frame's rest go.)
            let _ = link.peek();
        }
    }

    /// Takes frame `i` of `world` and checks it against `want`.
    fn recv_one(link: &mut TcpLink, world: u32, i: u64, want: &[u8]) {
        let mut got = vec![0u8; want.len()];
        let t = std::time::Instant::now();
        loop {
            assert!(t.elapsed() < std::time::Duration::from_secs(20), "world {world}: frame {i} never came");
            if let Some(h) = link.peek().unwrap() {
                assert_eq!((h.world, h.seq, h.len as usize), (world, i, want.len()), "world {world} frame {i}");
                if link.consume(Sink::Copy(&mut got)).unwrap() {
                    break;
                }
            }
            sleep_on(link, true, false, 50);
        }
        assert!(got == want, "world {world}: frame {i} damaged");
    }

    /// Sends `n` frames on `link` as world `world`.
    fn send_all(mut link: TcpLink, world: u32, n: u64) -> TcpLink {
        for i in 0..n {
            send_one(&mut link, world, i, &payload(world, i));
        }
        link
    }

    /// Receives `n` frames of world `world` and checks each against what was sent.
    fn recv_all(mut link: TcpLink, world: u32, n: u64) -> TcpLink {
        for i in 0..n {
            recv_one(&mut link, world, i, &payload(world, i));
        }
        link
    }

    /// Two ends of one socket with `buffer` socket buffers, each with world 1 (the pair's
    /// first) and world 2 (a channel opened after): `(a1, b1, a2, b2)`.
    fn two_worlds(buffer: Option<usize>) -> (TcpLink, TcpLink, TcpLink, TcpLink) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let (mut a1, mut b1) = (TcpLink::new(a, buffer, 1).unwrap(), TcpLink::new(b, buffer, 1).unwrap());
        let a2 = a1.source().unwrap().open(2).unwrap();
        let b2 = b1.source().unwrap().open(2).unwrap();
        (a1, b1, a2, b2)
    }

    /// Two worlds on one socket, each streaming both ways from its own thread: every frame
    /// arrives whole, in order, on its own channel, whichever thread read it off the socket.
    #[test]
    fn two_channels_stream_both_ways_at_once() {
        let (a1, b1, a2, b2) = two_worlds(Some(64 << 10));
        let n = 200;
        std::thread::scope(|s| {
            let t = [
                s.spawn(move || drop(send_all(a1, 1, n))),
                s.spawn(move || drop(recv_all(b1, 1, n))),
                s.spawn(move || drop(send_all(b2, 2, n))),
                s.spawn(move || drop(recv_all(a2, 2, n))),
            ];
            for t in t {
                t.join().unwrap();
            }
        });
    }

    /// Sends frame `i` of `world` and then takes the peer's frame `i`, `n` times (the shape of
    /// a collective between two ranks).
    fn ping_pong(mut link: TcpLink, world: u32, n: u64) -> TcpLink {
        for i in 0..n {
            let p = payload(world, i % 3 + 1);
            send_one(&mut link, world, i, &p);
            recv_one(&mut link, world, i, &p);
        }
        link
    }

    /// Two worlds on one socket, each in lock-step between its two ends, one thread per end.
    #[test]
    fn two_channels_in_lock_step() {
        let (a1, b1, a2, b2) = two_worlds(None);
        let n = 3000;
        std::thread::scope(|s| {
            let t = [
                s.spawn(move || ping_pong(a1, 1, n)),
                s.spawn(move || ping_pong(b1, 1, n)),
                s.spawn(move || ping_pong(a2, 2, n)),
                s.spawn(move || ping_pong(b2, 2, n)),
            ];
            let links: Vec<_> = t.into_iter().map(|t| t.join().unwrap()).collect();
            drop(links);
        });
    }

    /// A world asleep on its channel is woken when another channel reads its frame off the
    /// socket (the socket itself has nothing more to say then).
    #[test]
    fn a_frame_read_by_another_channel_wakes_its_own() {
        let (mut a1, mut b1, mut a2, _b2) = two_worlds(None);
        let Armed::Wait(fd, ev) = a2.arm(true, false) else { panic!("nothing to read yet") };
        let mut w = 0;
        let h = data_header(2, 0, 0).encode();
        assert!(b1.write(&h, &[], &mut w).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(a1.peek().unwrap(), None);
        let mut p = [sys::pollfd(fd, ev)];
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(p.as_mut_ptr(), 1, 1000) }, 1, "not woken");
        assert_eq!(a2.peek().unwrap().map(|h| h.world), Some(2));
    }

    /// A world that does not read stops its peer's sender at the window (credit), with at
    /// most that much parked on its side, while its sibling on the socket goes on; once it
    /// reads, its peer may send again.
    #[test]
    fn a_channel_not_read_stops_its_sender_at_the_window() {
        let (mut a1, mut b1, mut a2, mut b2) = two_worlds(None);
        let p = vec![7u8; 256 << 10];
        let frame = (HEADER_LEN + p.len()) as u64;
        let (mut sent, mut i) = (0u64, 0u64);
        let t = std::time::Instant::now();
        // World 1 sends, its receiver never reads; world 2's receiver reads the socket.
        while !a1.state().unwrap().chans[0].starved {
            assert!(t.elapsed() < std::time::Duration::from_secs(10), "no stop after {sent} bytes");
            let mut w = 0;
            if a1.write(&data_header(1, i, p.len()).encode(), &p, &mut w).unwrap() {
                (sent, i) = (sent + frame, i + 1);
            }
            assert_eq!(b2.peek().unwrap(), None);
        }
        assert!(sent <= WINDOW && sent + frame > WINDOW, "stopped after {sent} bytes");
        // Everything sent reaches the side that does not read, parked there, no more.
        while b1.state().unwrap().chans[0].inbox.len() < i as usize {
            assert!(t.elapsed() < std::time::Duration::from_secs(10));
            assert_eq!(b2.peek().unwrap(), None);
        }
        let parked: usize = b1.state().unwrap().chans[0].inbox.iter().map(|f| HEADER_LEN + f.data.len()).sum();
        assert_eq!(parked as u64, sent);
        // The sibling world still moves, both ways.
        ping_pong_pair(&mut a2, &mut b2);
        // Reading world 1 grants credit: its sender goes on.
        let mut got = vec![0u8; p.len()];
        for k in 0..i {
            assert_eq!(b1.peek().unwrap().map(|h| h.seq), Some(k));
            assert!(b1.consume(Sink::Copy(&mut got)).unwrap());
        }
        let mut w = 0;
        while !a1.write(&data_header(1, i, p.len()).encode(), &p, &mut w).unwrap() {
            assert!(t.elapsed() < std::time::Duration::from_secs(10), "no credit came back");
            let _ = a1.peek().unwrap();
        }
    }

    fn raw_pair() -> (TcpLink, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let raw = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (TcpLink::new(s, None, 1).unwrap(), raw)
    }

    fn poll_ms(fd: RawFd, ev: i16, ms: i32) -> i32 {
        let mut p = [sys::pollfd(fd, ev)];
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(p.as_mut_ptr(), 1, ms) }
    }

    /// Bytes of frame `i` of `world` with an `n`-byte payload of `fill`.
    fn frame_bytes(world: u32, i: u64, n: usize, fill: u8) -> Vec<u8> {
        let mut b = data_header(world, i, n).encode().to_vec();
        b.resize(HEADER_LEN + n, fill);
        b
    }

    /// A world that goes away with its own frame peeked hands on what it read behind it: its
    /// sibling, asleep, is woken for its frame (found by review: it slept on).
    #[test]
    fn a_world_closing_hands_on_the_frames_behind_its_own() {
        let (mut a1, mut raw) = raw_pair();
        let mut a2 = a1.source().unwrap().open(2).unwrap();
        let mut bytes = frame_bytes(1, 0, 100, 1);
        bytes.extend(frame_bytes(2, 0, 8, 2));
        raw.write_all(&bytes).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(a1.peek().unwrap().map(|h| h.world), Some(1));
        let Armed::Wait(fd, ev) = a2.arm(true, false) else { panic!("nothing for world 2 yet") };
        drop(a1);
        assert_eq!(poll_ms(fd, ev, 1000), 1, "world 2 not woken");
        assert_eq!(a2.peek().unwrap().map(|h| h.world), Some(2));
    }

    /// A world that finishes its own frame, which a sibling had begun to park, hands on the
    /// sibling's frame it read along (found by review: the sibling slept on).
    #[test]
    fn a_world_finishing_its_parked_frame_hands_on_what_follows() {
        let (mut a1, mut raw) = raw_pair();
        let mut a2 = a1.source().unwrap().open(2).unwrap();
        let first = frame_bytes(1, 0, 1000, 1);
        raw.write_all(&first[..HEADER_LEN + 500]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(a1.peek().unwrap().map(|h| h.world), Some(1));
        let mut dst = vec![0u8; 1000];
        assert!(!a1.consume(Sink::Copy(&mut dst)).unwrap());
        // World 2 reads the socket: world 1's frame is on its way to world 1's inbox.
        assert_eq!(a2.peek().unwrap(), None);
        let Armed::Wait(fd, ev) = a2.arm(true, false) else { panic!("nothing for world 2 yet") };
        let mut rest = first[HEADER_LEN + 500..].to_vec();
        rest.extend(frame_bytes(2, 0, 8, 2));
        raw.write_all(&rest).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(a1.consume(Sink::Copy(&mut dst)).unwrap());
        assert!(dst.iter().all(|b| *b == 1));
        assert_eq!(poll_ms(fd, ev, 1000), 1, "world 2 not woken");
        assert_eq!(a2.peek().unwrap().map(|h| h.world), Some(2));
    }

    /// No channel opens while the world alone on the pair sleeps on the bare socket, where a
    /// sibling parking its frame could not wake it, nor while it writes a frame's rest itself
    /// (found by review); either way the new world connects on its own, and once the world
    /// called again, channels open.
    #[test]
    fn no_channel_opens_beside_a_world_asleep_on_the_bare_socket_or_half_through_a_frame() {
        let (mut a1, _raw) = raw_pair();
        assert!(matches!(a1.arm(true, false), Armed::Wait(..)));
        assert!(a1.source().unwrap().open(2).is_err());
        assert_eq!(a1.peek().unwrap(), None);
        drop(a1.source().unwrap().open(2).unwrap());

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let (mut a1, mut b1) =
            (TcpLink::new(a, Some(16 << 10), 1).unwrap(), TcpLink::new(b, Some(16 << 10), 1).unwrap());
        let p = vec![9u8; 400_000];
        let h = data_header(1, 0, p.len()).encode();
        let mut w = 0;
        assert!(!a1.write(&h, &p, &mut w).unwrap());
        assert!(a1.source().unwrap().open(2).is_err(), "opened beside a half-written frame");
        assert!(finish_and_take(&mut a1, &mut b1, &h, &p, &mut w) == p);
        drop(a1.source().unwrap().open(2).unwrap());
    }

    /// With a sibling on the pair, a frame's rest goes aside when the socket fills, and the
    /// frame counts as written only once that rest went out: its world stays busy (and asks
    /// for room) until then, instead of leaving bytes that only another world's call would
    /// send (found by review: a receiver waited for the sender's next heartbeat). A credit
    /// queued meanwhile goes after the rest, never inside the frame.
    #[test]
    fn a_frame_set_aside_counts_as_written_once_its_rest_went_out() {
        let (mut a1, mut b1, _a2, _b2) = two_worlds(Some(16 << 10));
        let p = vec![5u8; 400_000];
        let h = data_header(1, 0, p.len()).encode();
        let mut w = 0;
        assert!(!a1.write(&h, &p, &mut w).unwrap());
        assert!(w > 0 && w < h.len() + p.len(), "{w}");
        assert!(a1.state().unwrap().rest.is_some());
        // A credit queued behind the rest.
        a1.state().unwrap().pending.extend_from_slice(&pair_frame(FrameKind::Credit, 2, 1));
        // Not written while the peer reads nothing.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!a1.write(&h, &p, &mut w).unwrap());
        let got = finish_and_take(&mut a1, &mut b1, &h, &p, &mut w);
        assert!(got.iter().all(|b| *b == 5), "payload damaged");
        assert_eq!(b1.state().unwrap().chans[1].credit, WINDOW + 1, "the credit went whole, after the frame");
    }

    /// Writes the rest of the frame `h`/`p` begun on `a` (`w` bytes out) while `b` takes it;
    /// the payload `b` got.
    fn finish_and_take(a: &mut TcpLink, b: &mut TcpLink, h: &[u8], p: &[u8], w: &mut usize) -> Vec<u8> {
        let mut got = vec![0u8; p.len()];
        let t = std::time::Instant::now();
        let mut done = (false, false);
        while done != (true, true) {
            assert!(t.elapsed() < std::time::Duration::from_secs(5), "stuck");
            if !done.0 {
                done.0 = a.write(h, p, w).unwrap();
            }
            match b.peek() {
                Ok(Some(_)) if !done.1 => done.1 = b.consume(Sink::Copy(&mut got)).unwrap(),
                Ok(_) => {}
                Err(e) => panic!("stream broken: {e:?}"),
            }
        }
        got
    }

    /// One frame each way on a pair of channels, waiting as needed.
    fn ping_pong_pair(x: &mut TcpLink, y: &mut TcpLink) {
        one_way(x, y);
        one_way(y, x);
    }

    fn one_way(from: &mut TcpLink, to: &mut TcpLink) {
        let t = std::time::Instant::now();
        let mut w = 0;
        while !from.write(&data_header(2, 0, 8).encode(), &[1; 8], &mut w).unwrap() {
            assert!(t.elapsed() < std::time::Duration::from_secs(5));
        }
        let mut got = [0u8; 8];
        loop {
            assert!(t.elapsed() < std::time::Duration::from_secs(5), "the sibling is held up");
            if to.peek().unwrap().is_some() && to.consume(Sink::Copy(&mut got)).unwrap() {
                break;
            }
        }
        assert_eq!(got, [1; 8]);
    }
}

/// Loom model of how a channel's world is woken when another channel's world parks a frame
/// for it (`PairState::arm`, `Chan::wake`) while the pool's idle watch looks at the same
/// channel (`hangup_fd`): run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {
    use crate::sys::sync::{lock, Arc, AtomicBool, Mutex, Ordering};

    /// A channel's part of the pair's state, reduced to the protocol.
    struct Chan {
        parked: u32,
        asleep: bool,
    }

    /// Whatever the order, a driver that went to sleep on its event counter with nothing
    /// parked either finds the counter raised or nothing parked when the others are done: the
    /// watch has a counter of its own and never lowers the driver's (when it did, a driver
    /// slept until its next heartbeat with a frame waiting).
    #[test]
    fn loom_tcp_a_parked_frame_wakes_its_sleeping_channel() {
        loom::model(|| {
            let chan = Arc::new(Mutex::new(Chan { parked: 0, asleep: false }));
            let (ev, hup) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
            // Another world reads the socket and parks this channel's frame (`move_along`).
            let parker = {
                let (chan, ev) = (chan.clone(), ev.clone());
                loom::thread::spawn(move || {
                    let mut c = lock(&chan);
                    c.parked += 1;
                    if c.asleep {
                        ev.store(true, Ordering::SeqCst);
                        c.asleep = false;
                    }
                })
            };
            // The pool's idle watch of the same world: its own counter only (`reported`).
            let watcher = {
                let (chan, hup) = (chan.clone(), hup.clone());
                loom::thread::spawn(move || {
                    let _c = lock(&chan);
                    hup.store(false, Ordering::SeqCst);
                })
            };
            // The driver arms: lowers its counter, then sleeps unless a frame is parked.
            let slept = {
                let mut c = lock(&chan);
                ev.store(false, Ordering::SeqCst);
                let sleep = c.parked == 0;
                c.asleep = sleep;
                sleep
            };
            parker.join().unwrap();
            watcher.join().unwrap();
            if slept {
                assert!(ev.load(Ordering::SeqCst) || lock(&chan).parked == 0, "asleep beside a parked frame");
            }
        });
    }
}
