//! The shared-memory transport, for peers on the same host.
//!
//! One segment per peer pair holds two rings (one per direction) of fixed-size slots; a frame
//! is one slot. The writer copies header and payload into a free slot and publishes it; the
//! reader looks at the slot in place — a plain copy goes straight to the destination, a
//! reduction reads its operand straight from the ring — and releases it. Both sides spin
//! briefly when there is nothing to do, then sleep on the pair's TCP socket, which after the
//! handshake carries only doorbell bytes and, by closing, the news that the peer process died
//! (`ring.rs` has the protocol and its loom models). Worlds made from a world use further lanes
//! of the same segment (`lane.rs`) and share that socket with it (`bell.rs`).
//!
//! **Single copy.** A frame larger than a slot (up to [`CMA_MAX_PAYLOAD`]) does not go through
//! the ring: its slot carries the header and the address of the payload in the sender's
//! memory, the receiver copies the payload straight from there into its destination with
//! `process_vm_readv` (the kernel's cross-memory attach, as Open MPI's vader uses), then
//! releases the slot, and only that release lets the sender's frame complete, so the sender's
//! buffer stays put while it is read. One copy instead of two, and no slot-sized chunks. It is
//! used toward a peer only once that peer proved at set-up that it can read this process (each
//! side publishes its pid and the address and value of a random word; the other reads it back):
//! other pid namespaces, `ptrace` restrictions leave the pair on the ring alone. It is off unless
//! `MW_SHM_SINGLE_COPY=1`: measured here, the ring beats it at every size (one core copying
//! through the kernel against two copying at once, `docs/benchmarks.md`). A peer that dies mid-read fails the read (`ESRCH`), which breaks the world.
//!
//! The segment is a file in `/dev/shm` made with `O_EXCL` and mode 0600 by the higher rank,
//! opened by the lower rank, and unlinked as soon as both have mapped it (or the set-up
//! failed), so nothing else can open it and nothing is left behind. Its pages are reserved
//! before it is mapped, so a full `/dev/shm` fails the set-up instead of raising `SIGBUS`
//! later. If anything in the set-up fails, the pair uses TCP instead, and the world counts it
//! in `WorldStats::shm_fallbacks`.

mod bell;
pub(crate) mod lane;
pub(crate) mod ring;
mod segment;

pub(crate) use bell::Bell;
pub(crate) use lane::{LaneClaim, LaneSource};
pub(crate) use segment::Segment;

use std::fs::{File, OpenOptions};
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

use super::{Armed, Link, LinkCounters, LinkError, Sink, TransportKind};
use crate::engine::wire::{FrameHeader, OpKind, FRAME_MAGIC, HEADER_LEN};
use crate::sys::sync::{Arc, AtomicU32, AtomicU64, Ordering};
use crate::transport::shm::ring::{RingCtrl, SlotWords, CTRL_BYTES};
use crate::transport::wake::Wake;

/// Slots per ring.
const SLOTS: u64 = 32;
/// Largest payload of one frame (one slot). A ring holds 1 MiB, twice a core's L2 here: a
/// slot is rewritten only after its lines left the reader's L2, so the writer does not pull
/// them back from the other core; with 256 KiB rings (8 x 32 KiB) a 1 MiB stream ran at a third
/// of the speed. Slots of 32 KiB rather than fewer larger ones: a 64 KiB message is two frames
/// that both cores copy at once, and small frames still cycle through the whole ring
/// (`docs/benchmarks.md`).
pub(crate) const SHM_MAX_PAYLOAD: usize = 32 << 10;
/// A slot: the header, then the payload at `HEADER_LEN + pad`, where `pad` is the sender's
/// payload address modulo 64 (up to 63 bytes), carried in the slot's sequence word. Then both
/// copies, into the slot and out of it, run between mutually aligned addresses whenever the
/// two buffers are alike modulo 64 (as buffers from the same allocator usually are): a copy
/// whose source and destination disagree modulo 32 ran at 13-16 GB/s here, against 20-27
/// when they agree (`docs/benchmarks.md`).
const SLOT_BYTES: usize = HEADER_LEN + SHM_MAX_PAYLOAD + 64;
/// The tag of a wrap (`ring.rs`); other tags are the pad (0-63).
const WRAP: u32 = 64;
const _: () = assert!(ring::TAG_BITS >= 7);
/// Frame slots per lap of a small ring: an idle pair's writer puts frames in slot 0 only and
/// wraps in slot 1, so a ring holds one slot and a line of memory, not 32 slots (`grow`).
const SMALL_SLOTS: u64 = 1;
/// A small ring grows to all its slots once its writer tries this many frames between two
/// ticks...
const GROW_FRAMES: u32 = 8;
/// ...and shrinks back once this many ticks in a row saw at most `QUIET_FRAMES` frames each
/// (heartbeats) and the ring is empty. A tick is `TICK` at least (the world's timers may run
/// more often: on every pass of a world without heartbeats).
const QUIET_TICKS: u32 = 2;
const QUIET_FRAMES: u32 = 2;
const TICK: std::time::Duration = std::time::Duration::from_millis(200);
/// Largest payload of a single-copy frame: the wire's limit (a few round trips per message).
pub(crate) const CMA_MAX_PAYLOAD: usize = crate::engine::wire::MAX_FRAME_PAYLOAD;
/// Sizes of the messages that go by single copy (`max_payload`).
const SINGLE_COPY_MESSAGES: std::ops::RangeInclusive<usize> = (512 << 10)..=(8 << 20);
/// The two control blocks sit in the first page, then each side's probe (for single copy);
/// the rings follow.
const PROBE_AT: usize = 2 * CTRL_BYTES;
/// Per side: pid, address of the probe word, its value, and "this side can read the other".
const PROBE_BYTES: usize = 32;
/// A word the segment's maker sets to 1 when it reserved the whole segment (its kernel cannot
/// populate a mapping on request): both rings then keep all their slots.
const FIXED_AT: usize = PROBE_AT + 2 * PROBE_BYTES;
/// Per side, the word that says that side's link of the lane ended ([`END_LEFT`] or
/// [`END_CLOSED`]): the socket is shared by every lane of the pair (`bell.rs`), so a lane's end
/// is said here, and rung. A departure is told from a crash by it also when the close frame
/// found no room in the ring.
const END_AT: usize = FIXED_AT + 8;
/// The side left on purpose (its world closed gracefully)...
const END_LEFT: u64 = 1;
/// ...or its link ended otherwise (its world broke, was aborted or removed).
const END_CLOSED: u64 = 2;
/// In lane 0's first page only: the state word of each lane (`lane.rs`).
const LANE_STATE_AT: usize = END_AT + 16;
const RINGS_AT: usize = 4096;
const _: () = assert!(LANE_STATE_AT + 8 * lane::LANES <= RINGS_AT);
/// Bytes of a single-copy descriptor in its slot, after the header: address, length, and a
/// word the sender sets if it abandons the frame (its buffer may change from then on).
const REMOTE_DESC: usize = 24;
const RING_BYTES: usize = SLOTS as usize * SLOT_BYTES;
/// Bytes of one lane: a control page and two rings. A pair's first link uses lane 0; worlds
/// made from its world (`dup`, `split`) claim the others (`lane.rs`).
pub(crate) const LANE_BYTES: usize = RINGS_AT + 2 * RING_BYTES;
const _: () = assert!(LANE_BYTES % 4096 == 0);
/// Size of a pair's segment: all its lanes. The file is sparse: only the pages a lane's rings
/// touch are ever reserved.
pub(crate) const SEGMENT_BYTES: usize = lane::LANES * LANE_BYTES;

/// The pages of ring `ring` of a lane that a small ring leaves untouched, as offsets in the
/// lane: whole pages from past the first line of slot `SMALL_SLOTS` (where the small ring
/// wraps) to the ring's end.
fn grown_part(ring: usize) -> std::ops::Range<usize> {
    let ring_at = RINGS_AT + ring * RING_BYTES;
    let from = (ring_at + SMALL_SLOTS as usize * SLOT_BYTES + 64).next_multiple_of(4096);
    let to = (ring_at + RING_BYTES) / 4096 * 4096;
    from..to
}

/// Side `side`'s end word of the lane at `lane`.
fn end_word(seg: &Segment, lane: usize, side: usize) -> &AtomicU64 {
    seg.word(lane + END_AT + 8 * side)
}

/// Says that side `side`'s link of lane `lane` ended (unless it said it left) and rings the
/// peer's: its link learns of it from the word, woken by the bell (the socket itself stays,
/// for the pair's other lanes).
fn say_end(seg: &Segment, bell: &Bell, lane: usize, side: usize) {
    let _ = end_word(seg, lane * LANE_BYTES, side).compare_exchange(0, END_CLOSED, Ordering::AcqRel, Ordering::Acquire);
    let _ = bell.ring(lane, true);
}

/// The segment maker's "all reserved" word (lane 0's).
fn fixed_flag(seg: &Segment) -> &AtomicU64 {
    seg.word(FIXED_AT)
}

pub(crate) struct ShmLink {
    /// The pair's socket, shared with the links of the segment's other lanes.
    bell: Arc<Bell>,
    /// This link's wake, once the bell is shared (`bell.rs`).
    wake: Option<Arc<Wake>>,
    /// This link slept on the bare socket since it last looked (the bell's first link alone).
    bare: bool,
    seg: Arc<Segment>,
    /// This link's lane, and where it starts in the segment.
    lane: usize,
    at: usize,
    /// A lane other than the first, held until the link is dropped (`lane.rs`): released
    /// by its `Drop`, after its end was said and rung.
    _claim: Option<LaneClaim>,
    tx: usize,
    rx: usize,
    /// The frame being read and its slot.
    current: Option<(FrameHeader, u64)>,
    /// We slept on the socket since we last looked at it: read the doorbells (or its end).
    armed: bool,
    /// The peer's link ended (its end word), or the socket did (the peer process is gone).
    /// Frames still in the ring can be read.
    hung_up: bool,
    /// This side's copy of the tail of the ring it writes (`ring.rs`).
    seen_tail: u64,
    /// Frame slots per lap of the ring this side writes: `SMALL_SLOTS` or `SLOTS`.
    limit: u64,
    /// The segment was reserved whole: rings never shrink.
    fixed: bool,
    /// When the last tick was, frames tried since, and ticks in a row that were quiet.
    last_tick: Option<std::time::Instant>,
    frames_since_tick: u32,
    quiet_ticks: u32,
    /// Growing failed (a full `/dev/shm`) since the last tick: not tried again before it.
    grow_failed: bool,
    /// Times growing failed.
    grow_refused: u64,
    /// After a shrink: the slot number the reader must reach before the grown part's pages
    /// may be freed (it reads no slot there once past it).
    free_after: Option<u64>,
    traffic: (u64, u64),
    /// 0 for the side that made the segment (it writes ring 0), 1 for the other.
    side: usize,
    /// The peer's pid, once this side proved it can read the peer's memory.
    peer_pid: Option<i32>,
    /// The slot of this side's single-copy frame in flight, until the peer releases it.
    remote_tx: Option<u64>,
    /// Payload bytes received by single copy.
    single_copy_bytes: u64,
    /// Single copy wanted (`MW_SHM_SINGLE_COPY=1`), read once at set-up.
    single_copy: bool,
}

/// A word of this process that peers read back to prove they can read this process's memory.
fn probe_word() -> &'static u64 {
    static WORD: std::sync::OnceLock<&'static u64> = std::sync::OnceLock::new();
    WORD.get_or_init(|| Box::leak(Box::new(crate::sys::random_u64() | 1)))
}

/// Single copy is off unless `MW_SHM_SINGLE_COPY=1`: on this project's reference machine the
/// ring, with both cores copying, moves every size faster (`docs/benchmarks.md`).
fn single_copy_enabled() -> bool {
    std::env::var("MW_SHM_SINGLE_COPY").is_ok_and(|v| v == "1")
}

impl ShmLink {
    /// A link over lane 0 of `seg`, the pair's first; the higher rank of the pair (`creator`)
    /// writes ring 0.
    pub(crate) fn new(ctl: TcpStream, seg: Segment, creator: bool) -> io::Result<ShmLink> {
        ctl.set_nonblocking(true)?;
        ctl.set_nodelay(true)?;
        Ok(ShmLink::over(Bell::new(OwnedFd::from(ctl)), Arc::new(seg), None, if creator { 0 } else { 1 }))
    }

    /// A link over a lane claimed for a new world (`lane.rs`), on the pair's socket.
    pub(crate) fn on_lane(claim: LaneClaim) -> ShmLink {
        let src = claim.source();
        let (bell, seg, side) = (src.bell.clone(), src.seg.clone(), src.side);
        ShmLink::over(bell, seg, Some(claim), side)
    }

    fn over(bell: Arc<Bell>, seg: Arc<Segment>, claim: Option<LaneClaim>, side: usize) -> ShmLink {
        let (tx, rx) = (side, 1 - side);
        let lane = claim.as_ref().map_or(0, |c| c.lane());
        // A lane's link has a wake from its claim on: its peer may ring it as soon as it exists.
        let wake = claim.as_ref().map(|c| c.wake.clone());
        let mut link = ShmLink {
            bell,
            wake,
            bare: false,
            seg,
            lane,
            at: lane * LANE_BYTES,
            _claim: claim,
            tx,
            rx,
            current: None,
            armed: false,
            hung_up: false,
            seen_tail: 0,
            limit: SMALL_SLOTS,
            fixed: false,
            last_tick: None,
            frames_since_tick: 0,
            quiet_ticks: 0,
            grow_failed: false,
            grow_refused: 0,
            free_after: None,
            traffic: (0, 0),
            side,
            peer_pid: None,
            remote_tx: None,
            single_copy_bytes: 0,
            single_copy: single_copy_enabled(),
        };
        if fixed_flag(&link.seg).load(Ordering::Acquire) == 1 {
            (link.fixed, link.limit) = (true, SLOTS);
        }
        // Each side published its probe during the handshake (`bootstrap/link.rs`, or before
        // the second round of a lane's agreement), before the other could look for it.
        if link.single_copy {
            link.probe_peer();
        }
        link
    }

    /// Where worlds made from this link's world may claim lanes of the same segment.
    fn source(&self) -> LaneSource {
        LaneSource { seg: self.seg.clone(), side: self.side, bell: self.bell.clone() }
    }

    /// Reads the peer's probe word; if it reads back right, marks that this side can read the
    /// peer, so the peer may send single-copy frames here.
    fn probe_peer(&mut self) {
        let peer = 1 - self.side;
        let (pid, addr, value) = (self.probe(peer, 0), self.probe(peer, 1), self.probe(peer, 2));
        let pid = pid.load(Ordering::Acquire);
        if pid == 0 || pid > i32::MAX as u64 {
            return;
        }
        let mut got = [0u8; 8];
        let ok = matches!(crate::sys::read_process(pid as i32, addr.load(Ordering::Acquire), &mut got), Ok(8))
            && u64::from_ne_bytes(got) == value.load(Ordering::Acquire);
        if ok {
            self.peer_pid = Some(pid as i32);
            self.probe(self.side, 3).store(1, Ordering::Release);
        }
    }

    /// True when the peer proved it can read this process: frames larger than a slot may go
    /// by single copy.
    fn single_copy_out(&self) -> bool {
        self.single_copy && self.probe(1 - self.side, 3).load(Ordering::Acquire) == 1
    }

    /// Writes a frame larger than a slot: its slot carries the header and where the payload
    /// is; the frame is complete only once the peer has read the payload and released the
    /// slot (the engine keeps calling with the same frame until then).
    fn write_single_copy(&mut self, header: &[u8], payload: &[u8], written: &mut usize) -> Result<bool, LinkError> {
        if !self.single_copy_out() || payload.len() > CMA_MAX_PAYLOAD {
            return Err(LinkError::Io("frame does not fit a slot".into()));
        }
        if let Some(slot) = self.remote_tx {
            if !self.ctrl(self.tx).released(slot) {
                return Ok(false);
            }
            self.remote_tx = None;
            *written = HEADER_LEN + payload.len();
            self.traffic.1 += *written as u64;
            return Ok(true);
        }
        let Some(slot) = self.next_frame_slot()? else {
            return Ok(false);
        };
        let p = self.slot_ptr(self.tx, slot);
        let mut desc = [0u8; REMOTE_DESC];
        desc[..8].copy_from_slice(&(payload.as_ptr() as u64).to_le_bytes());
        desc[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        // SAFETY: the slot is the producer's alone until published; header and descriptor fit.
        unsafe {
            put_header(p, header);
            std::ptr::copy_nonoverlapping(desc.as_ptr(), p.add(HEADER_LEN), REMOTE_DESC - 8);
        }
        self.revoked(self.tx, slot).store(0, Ordering::Relaxed);
        if self.ctrl(self.tx).publish(slot, 0, &self.words(self.tx)) {
            self.doorbell();
        }
        self.remote_tx = Some(slot);
        Ok(false)
    }

    /// The word of `slot` of `ring` that says its single-copy frame was abandoned.
    fn revoked(&self, ring: usize, slot: u64) -> &AtomicU64 {
        // SAFETY: the word lies in the slot after the header (64 bytes) and two descriptor
        // words, so it is 8-byte aligned in a page-aligned map; both sides only ever use it
        // atomically.
        unsafe { &*(self.slot_ptr(ring, slot).add(HEADER_LEN + 16) as *const AtomicU64) }
    }

    /// Copies a single-copy frame's payload from the peer's memory into `dst`.
    fn read_remote(&mut self, addr: u64, dst: &mut [u8]) -> Result<(), LinkError> {
        let Some(pid) = self.peer_pid else {
            return Err(LinkError::Protocol("a single-copy frame from a peer this rank cannot read".into()));
        };
        let mut done = 0;
        while done < dst.len() {
            match crate::sys::read_process(pid, addr + done as u64, &mut dst[done..]) {
                Ok(0) => return Err(LinkError::Closed("the peer's buffer vanished mid-read".into())),
                Ok(n) => done += n,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    return Err(LinkError::Closed(format!("the peer process is gone ({e})")))
                }
                Err(e) => return Err(LinkError::Io(format!("reading the peer's buffer: {e}"))),
            }
        }
        self.single_copy_bytes += dst.len() as u64;
        Ok(())
    }

    /// After a single-copy read: fails if the sender abandoned the frame, since its buffer may
    /// have changed under the read. The sender marks the slot before its call returns (and so
    /// before its buffer can change); the fence orders the copy before this check, so a read
    /// that saw a changed byte sees the mark too.
    fn check_not_revoked(&self, slot: u64) -> Result<(), LinkError> {
        crate::sys::sync::fence(Ordering::SeqCst);
        if self.revoked(self.rx, slot).load(Ordering::SeqCst) != 0 {
            return Err(LinkError::Closed("the peer abandoned a frame while it was read".into()));
        }
        Ok(())
    }

    /// Runs `f` on the control block of the ring this side writes and on this side's copy of
    /// its tail (which the ring's producer calls read and refresh).
    fn tx_ring<R>(&mut self, f: impl FnOnce(&RingCtrl, &mut u64) -> R) -> R {
        let mut seen = self.seen_tail;
        let r = f(self.ctrl(self.tx), &mut seen);
        self.seen_tail = seen;
        r
    }

    /// The next free slot of the ring this side writes, if any.
    fn free_slot(&mut self) -> Result<Option<u64>, LinkError> {
        self.tx_ring(|ring, seen| ring.free_slot(SLOTS, seen)).map_err(|_| Self::corrupt())
    }

    /// Where the grown part of the ring this side writes starts in this mapping, and its
    /// length (page-aligned).
    fn grown_pages(&self) -> (*mut u8, usize) {
        let part = grown_part(self.tx);
        let part = self.at + part.start..self.at + part.end;
        // SAFETY: the grown part lies inside the segment's mapping.
        (self.seg.ptr(part.start), part.len())
    }

    /// The slot for this side's next frame, if one is free: wraps a small ring at its limit
    /// (the wrap is published here), and grows a ring under traffic.
    fn next_frame_slot(&mut self) -> Result<Option<u64>, LinkError> {
        self.frames_since_tick = self.frames_since_tick.saturating_add(1);
        if self.limit < SLOTS && self.frames_since_tick > GROW_FRAMES {
            self.grow();
        }
        loop {
            // (A full small ring cannot grow: its reader is still in an earlier lap. It grows
            // at a later write, once the reader has caught up.)
            let Some(slot) = self.free_slot()? else {
                return Ok(None);
            };
            if slot % SLOTS < self.limit {
                return Ok(Some(slot));
            }
            if !self.tx_ring(|ring, seen| ring.can_wrap(slot, SLOTS, seen)) {
                return Ok(None);
            }
            if self.ctrl(self.tx).publish_wrap(slot, SLOTS, WRAP, &self.words(self.tx)) {
                self.doorbell();
            }
        }
    }

    /// Gives the ring this side writes all its slots: reserves the pages of its grown part
    /// (a full `/dev/shm` leaves it small, and it works on), and marks their slots as not yet
    /// published in this lap, since freed pages read as zeros and a stale word must never
    /// look fresh to the reader.
    fn grow(&mut self) {
        if self.limit == SLOTS || self.grow_failed {
            return;
        }
        // Only once the reader has left every earlier lap: then no slot past the small ring's
        // holds a publication it has still to read (a wrap of a shrink it has not followed
        // yet, say), so resetting their words below loses nothing. Until then, it stays small.
        let head = self.ctrl(self.tx).head();
        if !self.tx_ring(|ring, seen| ring.can_wrap(head, SLOTS, seen)) {
            return;
        }
        let (pages, len) = self.grown_pages();
        // SAFETY: the range lies in this link's writable shared mapping, page-aligned.
        let ok = unsafe { crate::sys::populate(pages, len) };
        if ok.is_err() {
            // Give back what the failed call did populate: the ring stays small.
            // SAFETY: as above; nothing in the grown part is in use while the ring is small.
            let _ = unsafe { crate::sys::discard(pages, len) };
            self.grow_failed = true;
            self.grow_refused += 1;
            return;
        }
        // A number of the previous lap for each slot: the reader, in this lap, expects this
        // lap's or later.
        let stale = (head - head % SLOTS).wrapping_sub(SLOTS);
        for j in SMALL_SLOTS + 1..SLOTS {
            self.words(self.tx).word(j).store(ring::invalid_word(stale + j), Ordering::Relaxed);
        }
        // Published by the next frame's release store, before the reader can reach them.
        self.limit = SLOTS;
        self.free_after = None;
    }

    /// Once a tick: a ring that stayed quiet shrinks back to its small form, and the pages of
    /// a shrunk ring are freed once the reader has left its grown part.
    fn shrink_when_quiet(&mut self) {
        if self.fixed {
            return;
        }
        let quiet = self.frames_since_tick <= QUIET_FRAMES;
        self.frames_since_tick = 0;
        self.grow_failed = false;
        self.quiet_ticks = if quiet { self.quiet_ticks.saturating_add(1) } else { 0 };
        if self.limit == SLOTS && self.quiet_ticks >= QUIET_TICKS && self.remote_tx.is_none() {
            // Only an empty ring shrinks: the reader then waits at `head`, which the wrap (if
            // any) sends to the next lap's start, and never reads the grown part again.
            let ring = self.ctrl(self.tx);
            let head = ring.head();
            if ring.released(head.wrapping_sub(1)) {
                let start = if head % SLOTS == 0 {
                    head
                } else {
                    if ring.publish_wrap(head, SLOTS, WRAP, &self.words(self.tx)) {
                        self.doorbell();
                    }
                    head - head % SLOTS + SLOTS
                };
                self.limit = SMALL_SLOTS;
                self.free_after = Some(start);
            }
        }
        if let Some(start) = self.free_after {
            if self.ctrl(self.tx).released(start.wrapping_sub(1)) {
                let (pages, len) = self.grown_pages();
                // SAFETY: the range lies in this link's shared mapping, page-aligned; the reader
                // is past the grown part for good (it follows wraps at slot SMALL_SLOTS), and
                // this side writes there only after `grow` populated it again.
                let _ = unsafe { crate::sys::discard(pages, len) };
                self.free_after = None;
            }
        }
    }

    /// The sequence words of ring `ring`'s slots.
    fn words(&self, ring: usize) -> RingWords<'_> {
        RingWords { link: self, ring }
    }

    fn ctrl(&self, ring: usize) -> &RingCtrl {
        // SAFETY: a lane's control block `ring` (0 or 1) lies in its first page (the segment
        // checks the range), suitably aligned, and a zeroed block is valid.
        unsafe { &*(self.seg.ptr(self.at + ring * CTRL_BYTES) as *const RingCtrl) }
    }

    /// Slot `slot` of ring `ring`, as raw bytes.
    fn slot_ptr(&self, ring: usize, slot: u64) -> *mut u8 {
        let at = RINGS_AT + ring * RING_BYTES + (slot % SLOTS) as usize * SLOT_BYTES;
        // `at + SLOT_BYTES <= LANE_BYTES` for every ring and slot index.
        self.seg.ptr(self.at + at)
    }

    fn corrupt() -> LinkError {
        LinkError::Protocol("shared ring counters are inconsistent".into())
    }

    /// Rings the peer. A socket whose other end is gone (`EPIPE`: the peer process left or
    /// died) is a hang-up like any other: what the peer left in the ring is still read, and the
    /// end is reported after it (`gone`), as a departure if the peer said so. A frame
    /// published just before (the last of an operation the peer had already finished) must not
    /// break the world.
    fn doorbell(&mut self) {
        if self.bell.ring(self.lane, false).is_err() {
            self.hung_up = true;
        }
    }

    /// Reads pending doorbell bytes if the socket reported since this link was armed (waking
    /// the links they are for), and notes whether the peer's link or process ended.
    fn drain_doorbells(&mut self) {
        if std::mem::take(&mut self.armed) {
            if std::mem::take(&mut self.bare) {
                self.bell.woke();
            }
            if let Some(w) = &self.wake {
                w.hup.drain();
            }
            if self.bell.drain(self.lane) {
                self.hung_up = true;
            }
            self.peer_ended();
        }
    }

    /// True when the peer's link ended (its end word) or its process did: then `hung_up`.
    fn peer_ended(&mut self) -> bool {
        if !self.hung_up && end_word(&self.seg, self.at, 1 - self.side).load(Ordering::Acquire) != 0 {
            self.hung_up = true;
        }
        self.hung_up
    }

    /// This link's wake, joined at the first need once the bell is shared; `None` while the
    /// link is alone on the bell (or cannot have one: no descriptor left).
    fn wake(&mut self) -> Option<Arc<Wake>> {
        if self.wake.is_none() && self.bell.shared() {
            self.wake = self.bell.join(self.lane).ok();
        }
        self.wake.clone()
    }

    /// Word `field` (0 pid, 1 address, 2 value, 3 can-read flag) of `side`'s probe in this
    /// link's lane.
    fn probe(&self, side: usize, field: usize) -> &AtomicU64 {
        probe_field(&self.seg, self.at, side, field)
    }

    /// The error for a peer whose end is gone: it left on purpose if it said so in the
    /// segment before it went (its close frame may not have fit in the ring), else it closed.
    fn gone(&self) -> LinkError {
        if end_word(&self.seg, self.at, 1 - self.side).load(Ordering::Acquire) == END_LEFT {
            return LinkError::Left("peer left the world".into());
        }
        LinkError::Closed("peer closed the connection".into())
    }
}

/// A slot's sequence word is its first four bytes, where a frame header has its magic number:
/// on a ring the word marks where a frame starts (and that it is complete), which is what the
/// magic does on a byte stream. The writer copies the header without them and publishes the
/// word last; the reader puts the magic back before decoding.
const WORD_BYTES: usize = 4;
const _: () = assert!(SLOT_BYTES % 64 == 0 && RINGS_AT % 64 == 0);

/// Writes `header` into the slot at `p`, all but the bytes of its sequence word.
///
/// # Safety
/// `p` is a slot this side may write (free, not yet published), and `header` is
/// `HEADER_LEN` bytes long (`Link::write` checks it first).
unsafe fn put_header(p: *mut u8, header: &[u8]) {
    debug_assert_eq!(header.len(), HEADER_LEN);
    // SAFETY: the caller's slot has room for a header; `header` is a whole one.
    unsafe {
        std::ptr::copy_nonoverlapping(header.as_ptr().add(WORD_BYTES), p.add(WORD_BYTES), HEADER_LEN - WORD_BYTES)
    }
}

/// The sequence words of one ring of a link's segment.
struct RingWords<'a> {
    link: &'a ShmLink,
    ring: usize,
}

impl SlotWords for RingWords<'_> {
    fn word(&self, slot: u64) -> &AtomicU32 {
        // SAFETY: a slot starts 64-byte aligned in a page-aligned map (asserted above), so its
        // first four bytes are a valid, aligned AtomicU32 for as long as the link (and its map)
        // lives; both sides only use them atomically.
        unsafe { &*(self.link.slot_ptr(self.ring, slot) as *const AtomicU32) }
    }
}

impl Drop for ShmLink {
    fn drop(&mut self) {
        self.revoke();
        if self.bare {
            self.bell.woke();
        }
        // A lane's claim, dropped right after, says the end and takes its wake off the bell;
        // lane 0 has no claim.
        if self._claim.is_none() {
            say_end(&self.seg, &self.bell, self.lane, self.side);
            if let Some(w) = self.wake.take() {
                self.bell.leave(self.lane, &w);
            }
        }
    }
}

thread_local! {
    /// Where a single-copy payload lands when the engine wants to see it whole (a receive that
    /// combines): one buffer per thread, reused, not one per link.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Word `field` (0 pid, 1 address, 2 value, 3 can-read flag) of `side`'s probe in the lane at
/// `lane`.
fn probe_field(seg: &Segment, lane: usize, side: usize, field: usize) -> &AtomicU64 {
    seg.word(lane + PROBE_AT + side * PROBE_BYTES + field * 8)
}

/// Publishes this process's probe as `side` of the lane at `lane` of the segment (pid last,
/// so a peer that sees the pid sees the rest).
pub(crate) fn publish_probe(seg: &Segment, lane: usize, side: usize) {
    if single_copy_enabled() {
        write_probe(seg, lane, side);
    }
}

fn write_probe(seg: &Segment, lane: usize, side: usize) {
    let word = probe_word();
    probe_field(seg, lane, side, 1).store(word as *const u64 as u64, Ordering::Relaxed);
    probe_field(seg, lane, side, 2).store(*word, Ordering::Relaxed);
    probe_field(seg, lane, side, 0).store(std::process::id() as u64, Ordering::Release);
}

impl Link for ShmLink {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn max_payload(&self, op: OpKind, total: usize) -> usize {
        // Single copy only where it is faster (docs/benchmarks.md): where the receiver copies
        // the payload as it is (a reduction is faster through the ring on two cores: the
        // sender's copy into a slot runs beside the receiver's reduction), and for messages
        // of SINGLE_COPY_MESSAGES. A smaller message would hold its sender until the receiver
        // woke and read it, where the ring lets a window of them stream; a larger one is
        // faster copied twice, by both cores at once, than once by the receiver alone.
        if self.single_copy_out() && !op.reduces() && SINGLE_COPY_MESSAGES.contains(&total) {
            CMA_MAX_PAYLOAD
        } else {
            SHM_MAX_PAYLOAD
        }
    }

    fn write(&mut self, header: &[u8], payload: &[u8], written: &mut usize) -> Result<bool, LinkError> {
        if header.len() != HEADER_LEN {
            return Err(LinkError::Io("frame header of the wrong size".into()));
        }
        if self.hung_up {
            return Err(self.gone());
        }
        if payload.len() > SHM_MAX_PAYLOAD {
            return self.write_single_copy(header, payload, written);
        }
        let Some(slot) = self.next_frame_slot()? else {
            // No room: if the peer is gone (its socket reported since this link was armed),
            // there never will be, also while the engine reads nothing from this peer.
            self.drain_doorbells();
            return if self.peer_ended() { Err(self.gone()) } else { Ok(false) };
        };
        let p = self.slot_ptr(self.tx, slot);
        let pad = payload.as_ptr() as usize % 64;
        // SAFETY: the ring protocol gives this slot to the producer alone until it is
        // published; header, pad and payload fit the slot (checked above).
        unsafe {
            put_header(p, header);
            std::ptr::copy_nonoverlapping(payload.as_ptr(), p.add(HEADER_LEN + pad), payload.len());
        }
        if self.ctrl(self.tx).publish(slot, pad as u32, &self.words(self.tx)) {
            self.doorbell();
        }
        *written = HEADER_LEN + payload.len();
        self.traffic.1 += *written as u64;
        Ok(true)
    }

    fn counters(&self) -> LinkCounters {
        LinkCounters { single_copy_bytes: self.single_copy_bytes, ring_grow_refused: self.grow_refused }
    }

    fn peek(&mut self) -> Result<Option<FrameHeader>, LinkError> {
        // Also with a frame waiting for its receive: the hang-up must be noticed then too, or a
        // write blocked on the peer's full ring would wait for a dead peer until the heartbeat
        // timeout (the socket reporting, and nothing reading it).
        self.drain_doorbells();
        if let Some((h, _)) = self.current {
            return Ok(Some(h));
        }
        let slot = loop {
            let ring = self.ctrl(self.rx);
            let Some(s) = ring.full_slot(&self.words(self.rx)) else {
                // Everything the peer sent has been read: if it is gone, that is the end.
                return if self.hung_up { Err(self.gone()) } else { Ok(None) };
            };
            match ring.tag(s, &self.words(self.rx)) {
                // The peer's small ring starts its next lap: follow.
                WRAP => {
                    if ring.release_wrap(s, SLOTS) {
                        self.doorbell();
                    }
                }
                tag if tag > WRAP => {
                    return Err(LinkError::Protocol(format!("slot tag {tag} is no pad and no wrap")));
                }
                _ => break s,
            }
        };
        let p = self.slot_ptr(self.rx, slot);
        let mut hb = [0u8; HEADER_LEN];
        // SAFETY: a published slot belongs to the consumer until released; its header bytes
        // are in bounds.
        unsafe { std::ptr::copy_nonoverlapping(p, hb.as_mut_ptr(), HEADER_LEN) };
        hb[..WORD_BYTES].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        let h = FrameHeader::decode(&hb).map_err(LinkError::Protocol)?;
        if h.len as usize > SHM_MAX_PAYLOAD && (self.peer_pid.is_none() || h.len as usize > CMA_MAX_PAYLOAD) {
            return Err(LinkError::Protocol(format!("frame of {} bytes is over the slot size", h.len)));
        }
        self.current = Some((h, slot));
        Ok(Some(h))
    }

    fn consume(&mut self, sink: Sink<'_>) -> Result<bool, LinkError> {
        let Some((h, slot)) = self.current.take() else {
            return Err(LinkError::Io("consume without a peeked frame".into()));
        };
        let len = h.len as usize;
        let p = self.slot_ptr(self.rx, slot);
        if len > SHM_MAX_PAYLOAD {
            // SAFETY: as in peek; the descriptor lies in the slot after the header.
            let desc = unsafe { std::slice::from_raw_parts(p.add(HEADER_LEN), REMOTE_DESC) };
            let word = |i: usize| u64::from_le_bytes(desc[i..i + 8].try_into().unwrap_or([0; 8]));
            let (addr, n) = (word(0), word(8));
            if n != len as u64 {
                return Err(LinkError::Protocol(format!("single-copy frame of {len} bytes describes {n}")));
            }
            match sink {
                Sink::Copy(dst) if dst.len() != len => {
                    self.current = Some((h, slot));
                    return Err(LinkError::Io("copy target does not match the payload".into()));
                }
                Sink::Copy(dst) => {
                    self.read_remote(addr, dst)?;
                    self.check_not_revoked(slot)?;
                }
                Sink::Visit(f) => {
                    let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
                    scratch.resize(len, 0);
                    let r = self.read_remote(addr, &mut scratch).and_then(|()| self.check_not_revoked(slot));
                    if r.is_ok() {
                        f(&scratch);
                    }
                    SCRATCH.with(|s| *s.borrow_mut() = scratch);
                    r?;
                }
                Sink::Discard => {}
            }
            if self.ctrl(self.rx).release(slot) {
                self.doorbell();
            }
            return Ok(true);
        }
        // Below 64: peek refused any other tag.
        let pad = self.ctrl(self.rx).tag(slot, &self.words(self.rx)) as usize % 64;
        // SAFETY: as in peek; the payload length was checked against the slot size, and a
        // tag is below 64, so pad and payload fit the slot.
        let payload = unsafe { std::slice::from_raw_parts(p.add(HEADER_LEN + pad), len) };
        match sink {
            Sink::Copy(dst) if dst.len() != len => {
                self.current = Some((h, slot));
                return Err(LinkError::Io("copy target does not match the payload".into()));
            }
            Sink::Copy(dst) => dst.copy_from_slice(payload),
            Sink::Visit(f) => f(payload),
            Sink::Discard => {}
        }
        if self.ctrl(self.rx).release(slot) {
            self.doorbell();
        }
        Ok(true)
    }

    fn traffic(&self) -> (u64, u64) {
        // Frames the peer published (read here, when liveness asks, not on every look at the
        // ring: the counter's line stays in the peer's cache meanwhile).
        (self.ctrl(self.rx).published(), self.traffic.1)
    }

    fn arm(&mut self, read: bool, write: bool) -> Armed {
        // Before the ring is looked at: a doorbell that another link reads from here on
        // raises the wake again.
        let wake = self.wake();
        if let Some(w) = &wake {
            w.ev.drain();
        }
        if !self.hung_up && self.peer_ended() {
            // The engine's next look at the link reports it.
            return Armed::Ready;
        }
        if self.hung_up {
            // The socket stays readable for ever now; only the ring can change, and it cannot.
            // A write waiting for room never gets it: try it again, to fail (`write`).
            return if write { Armed::Ready } else { Armed::Idle };
        }
        if read {
            let may_sleep = match self.current {
                None => self.ctrl(self.rx).consumer_may_sleep(&self.words(self.rx)),
                // A frame waits for its receive: sleep, but be rung by the next publication,
                // which may fill the ring (then the engine moves the frames out, so that the
                // peer is not stuck behind a receive this side has not posted yet).
                Some(_) => self.ctrl(self.rx).consumer_may_sleep_until_full(SLOTS),
            };
            if !may_sleep {
                return Armed::Ready;
            }
        }
        if write {
            let may_sleep = match self.remote_tx {
                // Waiting for the peer to finish reading this side's buffer.
                Some(slot) => self.ctrl(self.tx).producer_may_sleep_until_released(slot),
                None => {
                    let limit = self.limit;
                    self.tx_ring(|ring, seen| ring.producer_may_sleep(SLOTS, limit, seen))
                }
            };
            if !may_sleep {
                return Armed::Ready;
            }
        }
        let fd = self.bell.fd();
        match wake {
            Some(w) => {
                if w.ep.rewatch(fd, libc::POLLIN | libc::POLLRDHUP, 1).is_err() {
                    return Armed::Ready;
                }
                self.armed = true;
                Armed::Wait(w.ep.fd(), libc::POLLIN)
            }
            None if self.bell.sleep_bare() => {
                (self.armed, self.bare) = (true, true);
                Armed::Wait(fd, libc::POLLIN | libc::POLLRDHUP)
            }
            // The bell turned shared since the wake was looked for: look again.
            None => Armed::Ready,
        }
    }

    fn hangup_fd(&mut self, idle: bool) -> Option<(RawFd, i16)> {
        // A socket that hung up reports so for ever: nothing more to learn from it (what the
        // peer left in the ring is read without it).
        if self.hung_up {
            return None;
        }
        // Shared, the watch sleeps on its wake: its `hup` is raised when a link of the pair
        // here reads the doorbell that says the peer's link ended. Not on the socket's doorbells
        // themselves: every idle world of the pair would wake for each doorbell its siblings
        // get (measured: a dup of four ranks took 160-220 us instead of 85-120). With nothing
        // reading the socket, the end is seen at the world's next tick (`tick`) or call.
        // Alone, an idle world's watch reads its doorbells: only its own peer rings them, and
        // its peer's end may come without the socket's (a broken world keeps its process's end
        // of the socket for a shrink, `segment_source`). Not while a caller drives the world:
        // the caller's own sleep wakes for them, and the watch would wake the pool with it.
        let fd = self.bell.fd();
        match self.wake() {
            Some(w) => {
                w.idle.rewatch(fd, libc::POLLRDHUP, 1).ok()?;
                Some((w.idle.fd(), libc::POLLIN))
            }
            None if idle => Some((fd, libc::POLLIN | libc::POLLRDHUP)),
            None => Some((fd, libc::POLLRDHUP)),
        }
    }

    fn reported(&mut self) {
        self.armed = true;
    }

    fn holds_frames(&self) -> bool {
        self.current.is_some() || self.ctrl(self.rx).full_slot(&self.words(self.rx)).is_some()
    }

    fn spins(&self) -> bool {
        true
    }

    fn direct_max(&self) -> usize {
        // One slot: such a frame is written whole or not at all, and read whole once peeked.
        SHM_MAX_PAYLOAD
    }

    fn tick(&mut self, now: std::time::Instant) {
        if self.last_tick.is_some_and(|t| now.duration_since(t) < TICK) {
            return;
        }
        self.last_tick = Some(now);
        // An idle world's link sees its peer's end here if no doorbell told it (`hangup_fd`);
        // the engine's next look at the link reports it.
        self.peer_ended();
        self.shrink_when_quiet();
    }

    fn drain_early_frames(&self) -> bool {
        // Move frames out only when the ring is full, so that a peer that sends ahead is never
        // stuck behind receives not yet posted (up to the engine's early-frame limit). A
        // single-copy frame holds its sender until it is read, full ring or not: it is moved
        // out at once, so that sends stay as eager as they are through the ring.
        if self.current.is_some_and(|(h, _)| h.len as usize > SHM_MAX_PAYLOAD) {
            return true;
        }
        self.ctrl(self.rx).full_slot(&self.words(self.rx)).is_some() && self.ctrl(self.rx).in_use(SLOTS) >= SLOTS
    }

    fn lane_source(&mut self) -> Option<super::PairSource> {
        (!self.hung_up).then(|| super::PairSource::Shm(self.source()))
    }

    fn segment_source(&mut self) -> Option<super::PairSource> {
        Some(super::PairSource::Shm(self.source()))
    }

    fn revoke(&mut self) {
        if let Some(slot) = self.remote_tx.take() {
            self.revoked(self.tx, slot).store(1, Ordering::SeqCst);
            crate::sys::sync::fence(Ordering::SeqCst);
        }
    }

    fn shutdown(&mut self) {
        // Frames already in the ring stay readable; the peer reads them before it reports the
        // end, which this word says was on purpose.
        end_word(&self.seg, self.at, self.side).store(END_LEFT, Ordering::Release);
        let _ = self.bell.ring(self.lane, true);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::engine::wire::FrameKind;
    use std::net::{TcpListener, TcpStream};

    /// Both ends of a pair in this process, set up in the order the handshake uses.
    fn pair() -> (ShmLink, ShmLink) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let mut seg = Segment::create().unwrap();
        publish_probe(&seg, 0, 0);
        let path = seg.path().unwrap().to_string_lossy().into_owned();
        let mut opener = ShmLink::new(b, Segment::open(&path).unwrap(), false).unwrap();
        seg.unlink();
        let mut creator = ShmLink::new(a, seg, true).unwrap();
        // Single copy on for both, as MW_SHM_SINGLE_COPY=1 would have it (without touching
        // the environment of a process whose other tests run in parallel).
        for l in [&mut creator, &mut opener] {
            l.single_copy = true;
            write_probe(&l.seg, l.at, l.side);
        }
        creator.probe_peer();
        opener.probe_peer();
        (creator, opener)
    }

    /// The two sides' sources of a fresh segment, with a socket between them as the pair's
    /// first link has.
    fn sources() -> (LaneSource, LaneSource) {
        let seg = Arc::new(Segment::create().unwrap());
        let (sa, sb) = crate::sys::socket_pair().unwrap();
        (
            LaneSource { seg: seg.clone(), side: 0, bell: Bell::new(sa) },
            LaneSource { seg, side: 1, bell: Bell::new(sb) },
        )
    }

    /// Two links over lane `lane` of a fresh segment, as a world made from a world gets them.
    fn lane_pair(lane: usize, tag: u64) -> (ShmLink, ShmLink) {
        let (a, b) = sources();
        assert!(a.bell.share() && b.bell.share());
        (ShmLink::on_lane(a.claim(lane, tag).unwrap()), ShmLink::on_lane(b.claim(lane, tag).unwrap()))
    }

    /// True when `fd` is readable within `ms` milliseconds.
    fn readable(fd: RawFd, ms: i32) -> bool {
        let mut p = [crate::sys::pollfd(fd, libc::POLLIN)];
        // SAFETY: polls one live pollfd.
        unsafe { libc::poll(p.as_mut_ptr(), 1, ms) == 1 }
    }

    #[test]
    fn links_on_two_lanes_of_one_segment_carry_their_own_frames() {
        let (sa, sb) = sources();
        assert!(sa.bell.share() && sb.bell.share());
        let mut links = Vec::new();
        for lane in [1, 2] {
            let a = ShmLink::on_lane(sa.claim(lane, 40 + lane as u64).unwrap());
            let b = ShmLink::on_lane(sb.claim(lane, 40 + lane as u64).unwrap());
            links.push((a, b));
        }
        for (i, (a, _)) in links.iter_mut().enumerate() {
            let mut w = 0;
            assert!(a.write(&header(64), &pattern(64, i as u8 + 1), &mut w).unwrap());
        }
        for (i, (_, b)) in links.iter_mut().enumerate().rev() {
            assert_eq!(b.peek().unwrap().unwrap().len, 64);
            let mut out = vec![0u8; 64];
            assert!(b.consume(Sink::Copy(&mut out)).unwrap());
            assert_eq!(out, pattern(64, i as u8 + 1), "lane {} got another lane's frame", i + 1);
        }
        // One lane's end leaves the other lane alone, on the same socket.
        let (a1, b1) = links.remove(0);
        drop((a1, b1));
        let (a2, b2) = &mut links[0];
        let mut w = 0;
        assert!(a2.write(&header(8), &pattern(8, 9), &mut w).unwrap());
        b2.armed = true;
        assert_eq!(b2.peek().unwrap().unwrap().len, 8);
    }

    /// Three links of one pair's socket on each side: a doorbell one link reads wakes the link
    /// of the lane it names, and a lane's end wakes its peer's link and its idle watch, which
    /// then reports the end, while the pair's other links go on.
    #[test]
    fn a_doorbell_read_by_another_lane_wakes_the_lane_it_is_for() {
        let (sa, sb) = sources();
        assert!(sa.bell.share() && sb.bell.share());
        let mut a: Vec<ShmLink> =
            [1, 2, 3].iter().map(|&l| ShmLink::on_lane(sa.claim(l, 60 + l as u64).unwrap())).collect();
        let mut b: Vec<ShmLink> =
            [1, 2, 3].iter().map(|&l| ShmLink::on_lane(sb.claim(l, 60 + l as u64).unwrap())).collect();
        // b[2] (lane 3) waits for a frame, asleep on its wake.
        assert!(b[2].peek().unwrap().is_none());
        let Armed::Wait(fd, _) = b[2].arm(true, false) else { panic!("nothing to wait for") };
        assert!(!readable(fd, 0));
        let mut w = 0;
        assert!(a[2].write(&header(16), &pattern(16, 3), &mut w).unwrap());
        // Lane 1's link reads the socket first: it takes lane 3's doorbell and hands it on.
        b[0].armed = true;
        assert!(b[0].peek().unwrap().is_none());
        assert!(readable(fd, 1000), "the doorbell read by lane 1 did not wake lane 3");
        assert_eq!(
            crate::sys::recv_nowait(sb.bell.fd(), &mut [0u8; 8]).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock)
        );
        b[2].armed = true;
        assert_eq!(b[2].peek().unwrap().unwrap().len, 16);
        let mut out = [0u8; 16];
        assert!(b[2].consume(Sink::Copy(&mut out)).unwrap());
        assert_eq!(out.to_vec(), pattern(16, 3));

        // Lane 2's world is idle on side b; its peer's link ends (a world removed or broken).
        let (idle_fd, _) = b[1].hangup_fd(true).unwrap();
        assert!(!readable(idle_fd, 0));
        drop(a.remove(1));
        // Lane 1's link reads the socket and wakes lane 2's watch, whose link then reports.
        b[0].armed = true;
        assert!(b[0].peek().unwrap().is_none());
        assert!(readable(idle_fd, 1000), "the end of lane 2's peer did not wake its idle watch");
        b[1].reported();
        assert!(matches!(b[1].peek(), Err(LinkError::Closed(_))));
        // The others go on.
        for (x, y) in [(0, 0), (1, 2)] {
            assert!(a[x].write(&header(8), &pattern(8, 7), &mut w).unwrap());
            assert_eq!(b[y].peek().unwrap().unwrap().len, 8);
        }
        // The peer process's end (every link there gone, the socket closed) ends them all.
        drop(a);
        drop(sa);
        for l in &mut b[..] {
            l.armed = true;
            while let Ok(Some(_)) = l.peek() {
                assert!(l.consume(Sink::Discard).unwrap());
            }
            assert!(l.peek().is_err());
        }
    }

    /// A lane claimed on both sides whose formation failed on one side after the claim (no link
    /// made there): the side that made its link learns of it at once.
    #[test]
    fn a_claim_that_no_link_took_over_ends_the_peers_link() {
        let (a, b) = sources();
        assert!(a.bell.share() && b.bell.share());
        let claim_a = a.claim(6, 33).unwrap();
        let mut link_b = ShmLink::on_lane(b.claim(6, 33).unwrap());
        assert!(link_b.peek().unwrap().is_none());
        let Armed::Wait(fd, _) = link_b.arm(true, false) else { panic!("nothing to wait for") };
        drop(claim_a);
        assert!(readable(fd, 1000), "the peer's end did not wake the link");
        assert!(matches!(link_b.peek(), Err(LinkError::Closed(_))));
    }

    /// A link whose world is idle (nothing reads the pair's socket) sees its peer's end at its
    /// next tick, which then reports it.
    #[test]
    fn an_idle_link_sees_its_peers_end_at_its_tick() {
        let (tx, mut rx) = lane_pair(4, 91);
        // The peer process stays (its socket open, as for its other worlds): only the link ends.
        let _peer_socket = tx.bell.clone();
        drop(tx);
        assert!(rx.peek().unwrap().is_none(), "seen before anything looked");
        tick(&mut rx);
        assert!(matches!(rx.peek(), Err(LinkError::Closed(_))));
    }

    /// The first link alone sleeps on the bare socket; lanes are not offered while it does
    /// (another link could read its doorbell), and once they were, it sleeps on its wake.
    #[test]
    fn no_lane_is_offered_while_the_first_link_sleeps_on_the_bare_socket() {
        let (mut tx, mut rx) = pair();
        let Armed::Wait(fd, _) = rx.arm(true, false) else { panic!("nothing to wait for") };
        assert_eq!(fd, rx.bell.fd(), "alone, on the bare socket");
        assert!(!rx.bell.share(), "shared while the first link sleeps on the bare socket");
        let mut w = 0;
        assert!(tx.write(&header(8), &pattern(8, 1), &mut w).unwrap());
        assert!(readable(fd, 1000));
        assert_eq!(rx.peek().unwrap().unwrap().len, 8);
        assert!(rx.consume(Sink::Discard).unwrap());
        assert!(rx.bell.share(), "awake: lanes may be offered");
        let Armed::Wait(fd, _) = rx.arm(true, false) else { panic!("nothing to wait for") };
        assert_ne!(fd, rx.bell.fd(), "shared: on its own wake");
        assert!(tx.write(&header(8), &pattern(8, 2), &mut w).unwrap());
        assert!(readable(fd, 1000));
    }

    #[test]
    fn a_doorbell_to_a_peer_that_left_is_a_hang_up_not_a_failure() {
        let (mut tx, mut rx) = lane_pair(5, 77);
        // The receiver read everything, said it sleeps, then left.
        assert!(rx.peek().unwrap().is_none());
        assert!(matches!(rx.arm(true, false), Armed::Wait(..)));
        rx.shutdown();
        drop(rx);
        // The last frame of an operation the peer had finished: published, the doorbell rung.
        // The peer's end is reported as its departure.
        let mut w = 0;
        assert!(tx.write(&header(16), &pattern(16, 1), &mut w).unwrap(), "the write itself succeeds");
        tx.armed = true;
        match tx.peek() {
            Err(LinkError::Left(_)) => {}
            other => panic!("expected the peer's departure, got {other:?}"),
        }
    }

    fn header(len: usize) -> [u8; HEADER_LEN] {
        FrameHeader::control(FrameKind::Abort, 7, 1, len as u32).encode()
    }

    /// Bytes that differ at every offset and between calls, computed independently of the link.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(seed as u32) as u8 ^ seed).collect()
    }

    #[test]
    fn a_frame_larger_than_a_slot_is_read_straight_from_the_senders_memory() {
        let (mut tx, mut rx) = pair();
        assert_eq!(
            tx.max_payload(OpKind::P2p, 1 << 20),
            CMA_MAX_PAYLOAD,
            "this process can read itself, so single copy is on"
        );
        for (len, seed) in [(SHM_MAX_PAYLOAD + 1, 1u8), (300 << 10, 2), (CMA_MAX_PAYLOAD, 3)] {
            let data = pattern(len, seed);
            let h = header(len);
            let mut written = 0;
            // Not complete until the receiver has read it.
            assert!(!tx.write(&h, &data, &mut written).unwrap());
            assert!(!tx.write(&h, &data, &mut written).unwrap());
            let got = rx.peek().unwrap().expect("the header is in the ring");
            assert_eq!(got.len as usize, len);
            let mut out = vec![0u8; len];
            assert!(rx.consume(Sink::Copy(&mut out)).unwrap());
            assert!(out == data, "payload of {len} bytes differs");
            assert!(tx.write(&h, &data, &mut written).unwrap(), "released once read");
            assert_eq!(written, HEADER_LEN + len);
        }
        // A receive that wants to see the payload whole (a combining receive).
        let data = pattern(300 << 10, 9);
        let mut written = 0;
        assert!(!tx.write(&header(data.len()), &data, &mut written).unwrap());
        rx.peek().unwrap().unwrap();
        let mut seen = Vec::new();
        let mut visit = |b: &[u8]| seen.extend_from_slice(b);
        assert!(rx.consume(Sink::Visit(&mut visit)).unwrap());
        assert!(seen == data);
        assert!(tx.write(&header(data.len()), &data, &mut written).unwrap());
        assert_eq!(
            rx.counters().single_copy_bytes,
            (SHM_MAX_PAYLOAD + 1 + (300 << 10) + CMA_MAX_PAYLOAD + (300 << 10)) as u64
        );
    }

    #[test]
    fn payloads_from_every_alignment_and_of_a_whole_slot_arrive_intact() {
        let (mut tx, mut rx) = pair();
        let big = pattern(SHM_MAX_PAYLOAD + 64, 5);
        // Every start modulo 64 (the slot's pad), more than a lap of the ring, lengths up to a
        // whole slot at the largest pad.
        for i in 0..(2 * SLOTS as usize + 64) {
            let at = i % 64;
            let len = if i % 7 == 0 { SHM_MAX_PAYLOAD } else { (i * 997) % SHM_MAX_PAYLOAD + 1 };
            let data = &big[at..at + len];
            let mut written = 0;
            assert!(tx.write(&header(len), data, &mut written).unwrap(), "a free slot");
            assert_eq!(rx.peek().unwrap().unwrap().len as usize, len);
            let mut out = vec![0u8; len];
            assert!(rx.consume(Sink::Copy(&mut out)).unwrap());
            assert!(out == data, "payload {i} ({len} bytes from offset {at}) differs");
        }
        assert!(rx.peek().unwrap().is_none());
    }

    /// Resident pages of ring `ring`'s grown part, as this process's mapping sees them.
    fn grown_pages_resident(l: &ShmLink, ring: usize) -> usize {
        let part = grown_part(ring);
        let mut vec = vec![0u8; part.len() / 4096];
        // SAFETY: the range lies in the link's mapping, page-aligned; `vec` has a byte per page.
        let r =
            unsafe { libc::mincore(l.seg.ptr(l.at + part.start) as *mut libc::c_void, part.len(), vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", io::Error::last_os_error());
        vec.iter().filter(|&&v| v & 1 == 1).count()
    }

    /// A tick, as if `TICK` had passed since the last.
    fn tick(l: &mut ShmLink) {
        l.last_tick = None;
        l.tick(std::time::Instant::now());
    }

    /// Writes and reads `n` frames of `len` bytes (distinct each time), checking each.
    fn stream(tx: &mut ShmLink, rx: &mut ShmLink, n: usize, len: usize, seed: u8) {
        for i in 0..n {
            let data = pattern(len, seed.wrapping_add(i as u8));
            let mut written = 0;
            assert!(tx.write(&header(len), &data, &mut written).unwrap(), "frame {i} found no room");
            assert_eq!(rx.peek().unwrap().unwrap().len as usize, len);
            let mut out = vec![0u8; len];
            assert!(rx.consume(Sink::Copy(&mut out)).unwrap());
            assert!(out == data, "frame {i} of {len} bytes differs");
        }
    }

    #[test]
    fn a_ring_grows_under_traffic_and_gives_its_memory_back_when_quiet() {
        if !crate::sys::can_populate() {
            eprintln!("SKIPPED a_ring_grows_under_traffic_and_gives_its_memory_back_when_quiet: this kernel cannot populate a mapping on request, so rings are reserved whole");
            return;
        }
        let (mut tx, mut rx) = pair();
        let all = grown_part(tx.tx).len() / 4096;
        assert_eq!(grown_pages_resident(&tx, tx.tx), 0, "a new pair's rings are small");
        assert_eq!(grown_pages_resident(&rx, rx.tx), 0);
        // A few frames stay in the small ring (slot 0, then a wrap)...
        stream(&mut tx, &mut rx, GROW_FRAMES as usize, SHM_MAX_PAYLOAD, 1);
        assert_eq!(tx.limit, SMALL_SLOTS);
        assert_eq!(grown_pages_resident(&tx, tx.tx), 0);
        // ...more make it grow: every page of the ring is there, and frames still arrive whole
        // across the change and over more than a lap.
        stream(&mut tx, &mut rx, 3 * SLOTS as usize, SHM_MAX_PAYLOAD, 2);
        assert_eq!(tx.limit, SLOTS);
        assert_eq!(grown_pages_resident(&tx, tx.tx), all);
        assert_eq!(grown_pages_resident(&rx, rx.rx), all, "the reader maps the same pages");
        // A world without heartbeats runs its timers on every pass: ticks that close together
        // count as one, and a busy ring stays grown.
        for i in 0..2 * SLOTS as usize {
            stream(&mut tx, &mut rx, 1, 4096, i as u8);
            tx.tick(std::time::Instant::now());
        }
        assert_eq!(tx.limit, SLOTS, "a busy ring shrank on ticks that came with every frame");
        // Quiet ticks: it shrinks (a wrap sends the reader to the next lap), and once the
        // reader has followed, the pages go, in both processes' view.
        tick(&mut tx);
        assert_eq!(tx.limit, SLOTS, "the tick that saw the traffic does not shrink");
        tick(&mut tx);
        tick(&mut tx);
        assert_eq!(tx.limit, SMALL_SLOTS);
        assert!(rx.peek().unwrap().is_none(), "a wrap is not a frame");
        tick(&mut tx);
        assert_eq!(grown_pages_resident(&tx, tx.tx), 0);
        assert_eq!(grown_pages_resident(&rx, rx.rx), 0);
        // And it grows again, with nothing stale read from the freed slots.
        stream(&mut tx, &mut rx, 3 * SLOTS as usize, 1000, 3);
        assert_eq!(tx.limit, SLOTS);
        // Shrunk mid-lap (a wrap the reader has not followed yet), then busy again at once:
        // the ring must not grow over the unread wrap, and every frame arrives as sent.
        stream(&mut tx, &mut rx, 5, 1000, 4);
        assert_ne!(tx.ctrl(tx.tx).head() % SLOTS, 0, "the shrink happens mid-lap");
        for _ in 0..3 {
            tick(&mut tx);
        }
        assert_eq!(tx.limit, SMALL_SLOTS);
        tx.frames_since_tick = GROW_FRAMES + 1;
        stream(&mut tx, &mut rx, 3 * SLOTS as usize, 1000, 5);
        assert_eq!(tx.limit, SLOTS);
    }

    #[test]
    fn a_small_ring_that_cannot_grow_still_moves_frames_and_reports_itself_full() {
        let (mut tx, mut rx) = pair();
        if tx.fixed {
            eprintln!("SKIPPED a_small_ring_that_cannot_grow_still_moves_frames_and_reports_itself_full: rings are reserved whole on this kernel");
            return;
        }
        // As if /dev/shm were full: growing fails until the next tick.
        tx.grow_failed = true;
        let (a, b) = (pattern(100, 4), pattern(100, 5));
        let mut written = 0;
        assert!(tx.write(&header(100), &a, &mut written).unwrap());
        assert!(!rx.drain_early_frames(), "one frame in a ring with room");
        // The one frame slot is taken: the next write wraps, then finds no room, and the
        // reader sees a full ring (so the engine moves early frames out to make room).
        assert!(!tx.write(&header(100), &b, &mut written).unwrap());
        assert!(rx.drain_early_frames(), "a stuck small ring reads as full");
        let mut out = vec![0u8; 100];
        assert_eq!(rx.peek().unwrap().unwrap().len, 100);
        assert!(rx.consume(Sink::Copy(&mut out)).unwrap());
        assert!(out == a);
        assert!(tx.write(&header(100), &b, &mut written).unwrap(), "room once the reader moved on");
        assert_eq!(rx.peek().unwrap().unwrap().len, 100, "the reader follows the wrap");
        assert!(rx.consume(Sink::Copy(&mut out)).unwrap());
        assert!(out == b);
        assert_eq!(tx.limit, SMALL_SLOTS, "it never grew");
    }

    #[test]
    fn a_slot_tag_that_is_no_pad_and_no_wrap_is_refused() {
        let (mut tx, mut rx) = pair();
        let data = pattern(100, 6);
        let mut written = 0;
        assert!(tx.write(&header(100), &data, &mut written).unwrap());
        // A peer that writes nonsense into the word: a pad past the slot's room.
        let w = tx.words(tx.tx).word(0).load(Ordering::Relaxed);
        tx.words(tx.tx).word(0).store((w & !127) | 100, Ordering::Release);
        match rx.peek() {
            Err(LinkError::Protocol(why)) => assert!(why.contains("tag"), "{why}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn a_frame_its_sender_abandoned_fails_at_the_reader() {
        let (mut tx, mut rx) = pair();
        let data = pattern(SHM_MAX_PAYLOAD * 2, 4);
        let mut written = 0;
        assert!(!tx.write(&header(data.len()), &data, &mut written).unwrap());
        tx.revoke();
        rx.peek().unwrap().unwrap();
        let mut out = vec![0u8; data.len()];
        match rx.consume(Sink::Copy(&mut out)) {
            Err(LinkError::Closed(why)) => assert!(why.contains("abandoned"), "{why}"),
            other => panic!("expected the read to fail, got {other:?}"),
        }
    }

    #[test]
    fn a_single_copy_frame_to_a_peer_that_cannot_read_is_refused() {
        let (mut tx, mut rx) = pair();
        // As if the opener's probe had failed (another pid namespace, ptrace rules).
        rx.probe(rx.side, 3).store(0, Ordering::SeqCst);
        rx.peer_pid = None;
        assert_eq!(tx.max_payload(OpKind::P2p, 1 << 20), SHM_MAX_PAYLOAD, "the ring alone");
        let data = pattern(SHM_MAX_PAYLOAD + 8, 5);
        let mut written = 0;
        assert!(matches!(tx.write(&header(data.len()), &data, &mut written), Err(LinkError::Io(_))));
        // Frames of a slot still go through the ring, copied twice.
        let data = pattern(SHM_MAX_PAYLOAD, 6);
        assert!(tx.write(&header(data.len()), &data, &mut written).unwrap());
        rx.peek().unwrap().unwrap();
        let mut out = vec![0u8; data.len()];
        assert!(rx.consume(Sink::Copy(&mut out)).unwrap());
        assert!(out == data);
        assert_eq!(rx.counters().single_copy_bytes, 0);
    }

    /// A peer that leaves on purpose while its small ring is full (its close frame finds no
    /// room) is still known to have left, not crashed, once its last frame is read; a peer
    /// that just goes away is a hang-up.
    #[test]
    fn a_peer_that_left_on_purpose_is_told_from_one_that_closed() {
        for on_purpose in [true, false] {
            let (mut tx, mut rx) = pair();
            let data = pattern(100, 3);
            let mut written = 0;
            assert!(tx.write(&header(100), &data, &mut written).unwrap());
            // The small ring holds one frame: the close frame would not fit.
            let mut w2 = 0;
            assert!(!tx.write(&header(0), &[], &mut w2).unwrap(), "a second frame found room in a small ring");
            if on_purpose {
                tx.shutdown();
            }
            drop(tx);
            assert_eq!(rx.peek().unwrap().unwrap().len, 100);
            let mut out = vec![0u8; 100];
            assert!(rx.consume(Sink::Copy(&mut out)).unwrap());
            assert_eq!(out, data);
            rx.armed = true;
            let e = loop {
                match rx.peek() {
                    Ok(None) => {
                        rx.armed = true;
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Ok(Some(h)) => panic!("a frame after the last one: {h:?}"),
                    Err(e) => break e,
                }
            };
            match (on_purpose, &e) {
                (true, LinkError::Left(_)) | (false, LinkError::Closed(_)) => {}
                _ => panic!("left on purpose: {on_purpose}, got {e:?}"),
            }
        }
    }
}
