//! The engine of one world: executes operation plans over the world's links.
//!
//! No threads, no clock, no blocking: [`Engine::pass`] does all the work that can be done now
//! (given `now`), and [`Engine::wait_set`] says what to sleep on until more can be done. The
//! driver (`driver/`) owns the threads and the sleeping. This keeps every rule of the
//! world in one place that tests can drive with in-memory links and a virtual clock.
//!
//! Rules:
//! - Operations run in posting order. A collective runs alone; consecutive point-to-point
//!   operations run together (like a group), so that a rank may post a send and a receive to
//!   the same peer without deadlock.
//! - Each peer has a queue of sends and a queue of receives, filled in plan order as operations
//!   start; only the head of each queue moves, so both ranks see one order of messages.
//! - Every data frame describes its operation; the receiver checks it against its own call
//!   and breaks the world on any difference, naming both calls.
//! - Frames from a peer that arrive before their receive is posted wait in a bounded queue;
//!   beyond [`UNEXPECTED_CAP`] bytes, or when the worlds of this process together hold
//!   their cap ([`early`]), the link is not read (the peer then waits for us).
//! - Any failure breaks the whole world at once: every operation in flight fails with the
//!   cause, peers get a best-effort abort frame, links are closed. Nothing is retried.

mod direct;
pub(crate) use direct::Direct;
pub(crate) mod early;
pub(crate) mod health;
mod rx;
mod tx;
pub(crate) mod wire;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::api::error::{BrokenCause, Error};
use crate::api::options::Checksum;
use crate::api::request::{Completion, KeepAlive};
use crate::api::types::{DataType, ReduceOp};
use crate::coll::reduce::{reduce3, reduce_into, scale_avg};
use crate::coll::{plan, Act, BufId, Dep, OpDesc, Plan};
use crate::engine::health::{Heartbeat, Liveness, Verdict};
use crate::engine::wire::{world_tag, FrameHeader, FrameKind, OpKind, HEADER_LEN};
use crate::sys::buf::{ranges_overlap, RawBuf, Scratch};
use crate::sys::sync::Arc;
use crate::transport::{Armed, Link, LinkError, Sink, TransportKind};

/// Bytes of early frames buffered per peer before the link stops being read.
pub(crate) const UNEXPECTED_CAP: usize = 16 << 20;
/// Bytes moved per pass (over the links, or by local copies and reductions) before the engine
/// yields, so that a pass never holds the world for long: about half a millisecond of copying
/// here, under the progress pool's 1 ms slice.
const PASS_BUDGET: u64 = 4 << 20;
/// The most bytes a local step (copy, reduction, scaling) moves at once: larger ones go in
/// pieces across rounds and passes. A multiple of every element's size.
const LOCAL_PIECE: usize = PASS_BUDGET as usize;

/// Identity and settings of the world an engine serves.
#[derive(Debug, Clone)]
pub(crate) struct EngineConfig {
    pub name: Arc<str>,
    pub rank: usize,
    pub size: usize,
    pub world_id: u64,
    pub generation: u32,
    /// `None`: no heartbeats, no silence detection.
    pub heartbeat: Option<Heartbeat>,
    /// Which links carry payload checksums.
    pub checksum: Checksum,
}

/// An operation handed to the engine.
pub(crate) struct Posted {
    pub desc: OpDesc,
    pub send: RawBuf,
    pub recv: RawBuf,
    pub completion: Arc<Completion>,
    /// The operation fails with `Timeout` (and breaks the world) if not done in this time.
    pub timeout: Option<Duration>,
    /// Keeps a non-blocking request's buffers alive until the engine is done with them.
    pub keepalive: Option<KeepAlive>,
}

/// Counters of a world, for tests and tools.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorldStats {
    /// Operations completed successfully.
    pub ops_completed: u64,
    /// Frames dropped because they carried another world instance's id or generation.
    pub stale_frames_dropped: u64,
    /// Heartbeat frames sent.
    pub heartbeats_sent: u64,
    /// Payload bytes sent and received.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Peers on this host that wanted shared memory but were linked over TCP instead (a full
    /// `/dev/shm`, a segment the peer could not map).
    pub shm_fallbacks: u64,
    /// Payload bytes received by single copy from a peer's memory (shared memory's large
    /// frames; `docs/architecture.md`).
    pub single_copy_bytes: u64,
    /// Passes that left a link unread because the early frames held by all the worlds of the
    /// process reached their cap (`MW_EARLY_FRAMES_MAX_MB`): the peer then waits, and nothing
    /// is lost.
    pub early_frames_paused: u64,
    /// Times a shared-memory ring could not grow under traffic for lack of `/dev/shm` and
    /// worked on in its small form (`docs/architecture.md`).
    pub shm_grow_refused: u64,
    /// Sends and receives done on the direct path (a lone small send or receive on shared
    /// memory or TCP, straight through the ring or socket: `docs/architecture.md`); counted in
    /// `ops_completed` too.
    pub direct_ops: u64,
    /// Links on lanes of a parent world's shared-memory segments, or on channels of its TCP
    /// sockets: a world made by `dup`, `split` or `shrink` reuses its parent's pairs that way,
    /// and one made by `grow` its members' pairs (`docs/elastic.md`).
    pub lane_links: u64,
}

/// Where one step of a plan stands.
#[derive(Debug, Clone, Copy, Default)]
struct StepState {
    /// Bytes done (sent, or delivered in place).
    progress: usize,
    done: bool,
    /// Index of a send/recv step among the operation's messages to/from its peer.
    msg: u32,
}

struct OpState {
    id: u64,
    desc: OpDesc,
    seq: u64,
    send: RawBuf,
    recv: RawBuf,
    scratch: RawBuf,
    scratch_mem: Scratch,
    plan: Plan,
    /// Where each step of the plan stands.
    steps: Vec<StepState>,
    left: usize,
    /// Local steps (copies, reductions, scaling) not yet done: an operation without any is
    /// skipped by `run_local_steps`, which every pass runs.
    local_left: usize,
    active: bool,
    completion: Arc<Completion>,
    deadline: Option<(Instant, Duration)>,
    _keepalive: Option<KeepAlive>,
}

impl OpState {
    fn is_p2p(&self) -> bool {
        self.desc.kind == OpKind::P2p
    }

    fn buf(&self, id: BufId) -> RawBuf {
        match id {
            BufId::Send => self.send,
            BufId::Recv => self.recv,
            BufId::Scratch => self.scratch,
        }
    }

    fn deps_done(&self, step: usize) -> bool {
        self.plan.steps[step].deps.iter().all(|d| match d {
            Dep::Done(i) | Dep::Stream(i) => self.steps[*i].done,
        })
    }

    /// Bytes of a send step that may go out now.
    fn available(&self, step: usize, len: usize) -> usize {
        let mut a = len;
        for d in self.plan.steps[step].deps.iter() {
            match *d {
                Dep::Done(i) if !self.steps[i].done => a = 0,
                Dep::Stream(i) if !self.steps[i].done => a = a.min(self.steps[i].progress),
                _ => {}
            }
        }
        a
    }

    /// Marks a step done; true when that was the operation's last step.
    #[must_use]
    fn finish_step(&mut self, step: usize) -> bool {
        if !self.steps[step].done {
            self.steps[step].done = true;
            self.left -= 1;
            return self.left == 0;
        }
        false
    }
}

enum TxPayload {
    None,
    Raw(RawBuf, usize, usize),
    /// A copy: the rest of a frame that the direct path started (`direct.rs`).
    Owned(Vec<u8>),
}

enum TxDone {
    Data {
        op: u64,
        step: usize,
        bytes: usize,
    },
    Control,
    /// The rest of a direct send's frame: its sender waits for this (`direct.rs`).
    Rest(Arc<Completion>),
}

struct TxFrame {
    header: [u8; HEADER_LEN],
    payload: TxPayload,
    written: usize,
    done: TxDone,
}

struct Peer {
    link: Box<dyn Link>,
    live: Option<Liveness>,
    tx: Option<TxFrame>,
    tx_queue: VecDeque<(u64, usize)>,
    rx_queue: VecDeque<(u64, usize)>,
    unexpected: VecDeque<(FrameHeader, early::Early)>,
    unexpected_bytes: usize,
    /// Input not read this pass because the unexpected queue, or the process's, is full.
    paused: bool,
    traffic: (u64, u64),
    tx_seq: u64,
    rx_seq: u64,
    /// The peer left (closed, aborted or died), and why; its link is no longer used, but what
    /// it sent before leaving can still be received.
    gone: Option<BrokenCause>,
    /// Data frames to this peer carry the payload's CRC32C.
    checksum: bool,
}

/// Where to sleep until the engine can do more.
#[derive(Debug, Default)]
pub(crate) struct WaitSet {
    pub fds: Vec<libc::pollfd>,
    pub deadline: Option<Instant>,
    /// Some link can make progress right away.
    pub ready: bool,
}

/// Called once when the world breaks.
pub(crate) type OnBroken = Box<dyn FnMut(&BrokenCause) + Send>;

/// What a pass must not do itself, because it runs under the world's lock: wake tasks (a
/// waker is user code that may poll inline and call back into the world) and report the break
/// (the manager's event queue, its waiters and their wakers). The engine collects them here;
/// the driver runs them once it has let go of the lock ([`Engine::take_outbox`]), so nothing
/// outside the world runs while the world is held. (Log lines need no such care: the logger
/// only queues them, `sys/log.rs`.)
#[derive(Default)]
pub(crate) struct Outbox {
    wakers: Vec<std::task::Waker>,
    broken: Option<(OnBroken, BrokenCause)>,
}

impl Outbox {
    pub(crate) fn is_empty(&self) -> bool {
        self.wakers.is_empty() && self.broken.is_none()
    }

    /// Runs what was collected. Each piece runs on its own: a waker or callback that panics
    /// loses only itself.
    pub(crate) fn run(self) {
        let once = |f: &mut dyn FnMut()| {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        };
        if let Some((mut f, cause)) = self.broken {
            once(&mut || f(&cause));
        }
        for w in self.wakers {
            once(&mut || w.wake_by_ref());
        }
    }
}

pub(crate) struct Engine {
    /// Tests: the next pass panics, as a bug in it would.
    #[cfg(test)]
    pub(crate) panic_in_pass: bool,
    cfg: EngineConfig,
    peers: Vec<Option<Peer>>,
    /// Once broken: per peer, the pair's shared-memory segment or TCP socket (the links are
    /// closed), for a `shrink` to form on its other lanes or channels.
    kept_segments: Vec<Option<crate::transport::PairSource>>,
    ops: VecDeque<OpState>,
    next_id: u64,
    /// Operations posted and not yet started (`activate` has nothing to do at 0).
    inactive: usize,
    /// Operations whose every step is done, not yet retired (`retire` has nothing to do at 0).
    finished: usize,
    coll_seq: u64,
    broken: Option<BrokenCause>,
    /// The same cause, for readers that must not wait for a pass to end (`World::state`).
    broken_seen: Arc<std::sync::OnceLock<BrokenCause>>,
    stats: WorldStats,
    on_broken: Option<OnBroken>,
    outbox: Outbox,
    /// When the timers (heartbeats, silence, deadlines) next need a look; `None`: at once.
    next_timer: Option<Instant>,
    /// The largest scratch space a finished operation left, for the next one that needs some;
    /// let go of at a timer run that finds no operation posted since the one before.
    spare_scratch: Option<Scratch>,
    /// Bytes copied, reduced or scaled by local steps so far: a pass counts them against its
    /// budget like bytes on the links (a one-rank world's queue is nothing but local steps).
    local_bytes: u64,
    posted_since_timers: bool,
}

fn link_cause(peer: usize, e: LinkError) -> BrokenCause {
    match e {
        LinkError::Closed(detail) | LinkError::Io(detail) => BrokenCause::PeerClosed { peer, detail },
        LinkError::Left(_) => BrokenCause::PeerLeft { peer },
        LinkError::Protocol(detail) => BrokenCause::Protocol { peer, detail },
    }
}

fn internal(detail: impl Into<String>) -> BrokenCause {
    BrokenCause::Internal { detail: detail.into() }
}

/// How a call reads in an error message: `all_reduce(count=7, float, sum)`.
fn describe(kind: Option<OpKind>, dtype: u8, count: u64, redop: u8, root: u32) -> String {
    let Some(kind) = kind else { return "no operation".into() };
    let t = DataType::from_code(dtype as u32).map_or("?", |d| d.name());
    let mut s = format!("{}(count={count}, {t}", kind.name());
    if kind.reduces() {
        s += &format!(", {}", ReduceOp::from_code(redop as u32).map_or("?", |o| o.name()));
    }
    if kind.rooted() {
        s += &format!(", root={root}");
    }
    s + ")"
}

impl Engine {
    /// An engine over `links`, indexed by peer rank (`None` where there is no link; the rank
    /// itself gets a loopback link).
    pub(crate) fn new(cfg: EngineConfig, links: Vec<Option<Box<dyn Link>>>, now: Instant) -> Engine {
        let peers = links
            .into_iter()
            .map(|l| {
                l.map(|link| {
                    let live =
                        cfg.heartbeat.filter(|_| link.kind() != TransportKind::Loopback).map(|h| Liveness::new(h, now));
                    let checksum = match cfg.checksum {
                        Checksum::Off => false,
                        Checksum::Tcp => link.kind() == TransportKind::Tcp,
                        Checksum::All => link.kind() != TransportKind::Loopback,
                    };
                    Peer {
                        link,
                        live,
                        tx: None,
                        tx_queue: VecDeque::new(),
                        rx_queue: VecDeque::new(),
                        unexpected: VecDeque::new(),
                        unexpected_bytes: 0,
                        paused: false,
                        traffic: (0, 0),
                        tx_seq: 0,
                        rx_seq: 0,
                        gone: None,
                        checksum,
                    }
                })
            })
            .collect();
        Engine {
            cfg,
            peers,
            kept_segments: Vec::new(),
            ops: VecDeque::new(),
            next_id: 0,
            inactive: 0,
            finished: 0,
            coll_seq: 0,
            broken: None,
            broken_seen: Arc::new(std::sync::OnceLock::new()),
            stats: WorldStats::default(),
            on_broken: None,
            outbox: Outbox::default(),
            next_timer: None,
            spare_scratch: None,
            local_bytes: 0,
            posted_since_timers: false,
            #[cfg(test)]
            panic_in_pass: false,
        }
    }

    /// Sets what to call when the world breaks.
    pub(crate) fn set_on_broken(&mut self, f: OnBroken) {
        self.on_broken = Some(f);
    }

    /// What the passes since the last call left to do outside the lock.
    pub(crate) fn take_outbox(&mut self) -> Outbox {
        std::mem::take(&mut self.outbox)
    }

    /// Completes an operation; its tasks' wakers wait in the outbox.
    fn complete(&mut self, c: &Completion, r: crate::api::error::Result<()>) {
        let wakers = c.settle(r);
        self.outbox.wakers.extend(wakers);
    }

    fn set_broken(&mut self, cause: BrokenCause) {
        let _ = self.broken_seen.set(cause.clone());
        self.broken = Some(cause);
    }

    /// Where the cause of the break is published, readable without the engine's lock.
    pub(crate) fn broken_handle(&self) -> Arc<std::sync::OnceLock<BrokenCause>> {
        self.broken_seen.clone()
    }

    pub(crate) fn broken(&self) -> Option<&BrokenCause> {
        self.broken.as_ref()
    }

    pub(crate) fn stats(&self) -> WorldStats {
        let mut s = self.stats;
        self.add_link_counters(&mut s);
        s
    }

    /// Adds what the links still open counted (folded into the stats when they close).
    fn add_link_counters(&self, s: &mut WorldStats) {
        for c in self.peers.iter().flatten().map(|p| p.link.counters()) {
            s.single_copy_bytes += c.single_copy_bytes;
            s.shm_grow_refused += c.ring_grow_refused;
        }
    }

    /// Records how many of this rank's links fell back from shared memory to TCP.
    pub(crate) fn set_shm_fallbacks(&mut self, n: u64) {
        self.stats.shm_fallbacks = n;
    }

    /// Records how many of this rank's links are on lanes of a parent world's segments.
    pub(crate) fn set_lane_links(&mut self, n: u64) {
        self.stats.lane_links = n;
    }

    /// Operations in flight, or the rest of a frame that the direct path left to write.
    pub(crate) fn has_work(&self) -> bool {
        !self.ops.is_empty()
            || self.peers.iter().flatten().any(|p| matches!(p.tx, Some(TxFrame { done: TxDone::Rest(_), .. })))
    }

    /// True when some link is worth spinning on (memory-based links) rather than sleeping.
    pub(crate) fn spin_worthy(&self) -> bool {
        self.peers.iter().flatten().any(|p| p.gone.is_none() && p.link.spins())
    }

    /// Per peer, where a world made from this one may claim a lane of the pair's segment
    /// (`transport/shm/lane.rs`) or a channel of its socket (`transport/tcp.rs`); `None` for
    /// other links, for a link gone, or a broken world unless `broken` (`shrink`: a break
    /// leaves its live peers' segments and sockets alone).
    pub(crate) fn lane_sources(&mut self, broken: bool) -> Vec<Option<crate::transport::PairSource>> {
        if self.broken.is_some() {
            return if broken { self.kept_segments.clone() } else { Vec::new() };
        }
        self.peers
            .iter_mut()
            .map(|p| p.as_mut().filter(|p| p.gone.is_none()).and_then(|p| p.link.lane_source()))
            .collect()
    }

    /// The transport used for each peer (`None` for the rank itself or absent links).
    pub(crate) fn transports(&self) -> Vec<Option<TransportKind>> {
        self.peers.iter().map(|p| p.as_ref().map(|p| p.link.kind())).collect()
    }

    /// Accepts operations, in order. On a broken world they fail at once.
    /// `now` is asked for only when an operation has a deadline.
    pub(crate) fn post(&mut self, ops: impl IntoIterator<Item = Posted>, now: impl Fn() -> Instant) {
        self.posted_since_timers = true;
        for p in ops {
            if p.timeout.is_some() {
                self.next_timer = None;
            }
            if let Some(cause) = &self.broken {
                let e = Error::broken(&self.cfg.name, self.cfg.rank, cause.clone(), false);
                self.complete(&p.completion, Err(e));
                continue;
            }
            let seq = if p.desc.kind == OpKind::P2p {
                let Some(peer) = self.peers.get_mut(p.desc.root).and_then(|x| x.as_mut()) else {
                    let e = Error::invalid_arg(format!(
                        "world '{}': rank {} has no link to rank {}",
                        self.cfg.name, self.cfg.rank, p.desc.root
                    ));
                    self.complete(&p.completion, Err(e));
                    continue;
                };
                let c = if p.desc.is_send { &mut peer.tx_seq } else { &mut peer.rx_seq };
                *c += 1;
                *c
            } else {
                self.coll_seq += 1;
                self.coll_seq
            };
            let plan = plan(&p.desc, self.cfg.rank, self.cfg.size);
            let n = plan.steps.len();
            let local_left =
                plan.steps.iter().filter(|s| !matches!(s.act, Act::Send { .. } | Act::Recv { .. })).count();
            self.inactive += 1;
            if n == 0 {
                self.finished += 1;
            }
            let mut scratch_mem = if plan.scratch == 0 {
                Scratch::default()
            } else {
                Scratch::reuse(self.spare_scratch.take(), plan.scratch)
            };
            let scratch = scratch_mem.raw();
            self.next_id += 1;
            self.ops.push_back(OpState {
                id: self.next_id,
                desc: p.desc,
                seq,
                send: p.send,
                recv: p.recv,
                scratch,
                scratch_mem,
                plan,
                steps: vec![StepState::default(); n],
                left: n,
                local_left,
                active: false,
                completion: p.completion,
                deadline: p.timeout.map(|t| (now() + t, t)),
                _keepalive: p.keepalive,
            });
        }
    }

    /// Breaks the world from this side (abort, removal, a passed deadline).
    pub(crate) fn abort(&mut self, cause: BrokenCause) {
        self.fail(cause);
    }

    /// Does everything that can be done now; true if anything moved.
    pub(crate) fn pass(&mut self, now: Instant) -> bool {
        if self.broken.is_some() {
            return false;
        }
        match self.pass_inner(now) {
            Ok(moved) => moved,
            Err(cause) => {
                self.fail(cause);
                true
            }
        }
    }

    fn pass_inner(&mut self, now: Instant) -> Result<bool, BrokenCause> {
        #[cfg(test)]
        if std::mem::take(&mut self.panic_in_pass) {
            panic!("a bug in a pass (injected by a test)");
        }
        let mut moved_any = false;
        let start = self.stats.bytes_sent + self.stats.bytes_received + self.local_bytes;
        for p in self.peers.iter_mut().flatten() {
            if p.paused {
                p.paused = false;
                if let Some(l) = p.live.as_mut() {
                    l.resume_listening(now);
                }
            }
        }
        // Timers (heartbeats to queue, silent peers, deadlines) run after the links were read
        // once: a rank that was itself stalled (descheduled, SIGSTOPped) finds its peers'
        // heartbeats, or their abort, waiting there, and must not accuse a live peer of a
        // silence that was its own. What the timers start is handled by the next round of
        // this same pass. Between their deadlines they have nothing to say, which keeps a
        // spinning pass short.
        let mut timers_due = self.next_timer.is_none_or(|t| now >= t);
        loop {
            let mut progress = self.activate()?;
            progress |= self.run_local_steps()?;
            for peer in 0..self.peers.len() {
                progress |= self.serve_peer(peer)?;
            }
            progress |= self.retire();
            moved_any |= progress;
            if timers_due {
                timers_due = false;
                self.sample_traffic(now);
                self.timers(now)?;
                self.next_timer = self.timer_deadline();
                continue;
            }
            let moved = self.stats.bytes_sent + self.stats.bytes_received + self.local_bytes - start;
            if !progress || moved > PASS_BUDGET {
                break;
            }
        }
        self.sample_traffic(now);
        // A departed peer breaks the world once nothing is left to do with what it sent.
        if !self.ops.iter().any(|o| o.active) {
            let spent = self
                .peers
                .iter()
                .flatten()
                .find(|p| p.gone.is_some() && p.unexpected.is_empty() && !p.link.holds_frames());
            if let Some(c) = spent.and_then(|p| p.gone.clone()) {
                return Err(c);
            }
        }
        Ok(moved_any)
    }

    /// Moves data to and from one peer.
    ///
    /// A peer that leaves (closes, aborts, dies) is like a stream that ends: what it sent
    /// before leaving can still be received, and the world breaks, with the peer's cause, as
    /// soon as an operation needs anything more of it — a frame it did not send, or sending
    /// to it — or, when the world is idle, as soon as nothing it sent is left to receive.
    fn serve_peer(&mut self, peer: usize) -> Result<bool, BrokenCause> {
        let Some(p) = self.peers[peer].as_ref() else { return Ok(false) };
        if let Some(cause) = p.gone.clone() {
            // What it left in the link (a shared-memory ring) is still read, up to its end.
            let read_on = p.link.holds_frames();
            let progress = match self.service_rx(peer, read_on) {
                Ok(moved) => moved,
                Err(
                    c @ (BrokenCause::PeerClosed { .. }
                    | BrokenCause::PeerLeft { .. }
                    | BrokenCause::PeerAborted { .. }),
                ) if read_on && c.peer() == Some(peer) => {
                    // Its last word (a close or an abort frame) says best why it left.
                    self.peers[peer].as_mut().expect("checked above").gone = Some(c);
                    true
                }
                Err(c) => return Err(c),
            };
            let p = self.peers[peer].as_ref().expect("checked above");
            let data_pending = matches!(p.tx, Some(TxFrame { done: TxDone::Data { .. } | TxDone::Rest(_), .. }));
            let nothing_left = p.unexpected.is_empty() && !p.link.holds_frames();
            if !p.tx_queue.is_empty() || data_pending || (!p.rx_queue.is_empty() && nothing_left) {
                return Err(p.gone.clone().unwrap_or(cause));
            }
            return Ok(progress);
        }
        let r = self.service_tx(peer).and_then(|a| Ok(a | self.service_rx(peer, true)?));
        match r {
            Err(
                c @ (BrokenCause::PeerClosed { .. } | BrokenCause::PeerLeft { .. } | BrokenCause::PeerAborted { .. }),
            ) if c.peer() == Some(peer) => {
                debug!("world '{}' rank {}: rank {peer} left ({c})", self.cfg.name, self.cfg.rank);
                self.peers[peer].as_mut().expect("checked above").gone = Some(c);
                self.serve_peer(peer).map(|_| true)
            }
            other => other,
        }
    }

    /// Starts operations that may run now: the first collective alone, or a run of
    /// point-to-point operations together.
    fn activate(&mut self) -> Result<bool, BrokenCause> {
        let mut progress = false;
        if self.inactive == 0 {
            return Ok(false);
        }
        // The loop stops at the first collective, so every operation before `i` is a send or
        // a receive: a p2p operation may start, a collective only when it is the first.
        for i in 0..self.ops.len() {
            let op = &self.ops[i];
            if !op.active {
                if !op.is_p2p() && i != 0 {
                    break;
                }
                self.start_op(i)?;
                progress = true;
            }
            if !self.ops[i].is_p2p() {
                break;
            }
        }
        Ok(progress)
    }

    fn start_op(&mut self, i: usize) -> Result<(), BrokenCause> {
        self.inactive -= 1;
        let op = &mut self.ops[i];
        op.active = true;
        let mut tx_count = vec![0u32; self.peers.len()];
        let mut rx_count = vec![0u32; self.peers.len()];
        for (s, step) in op.plan.steps.iter().enumerate() {
            let (peer, sending) = match step.act {
                Act::Send { peer, .. } => (peer, true),
                Act::Recv { peer, .. } => (peer, false),
                _ => continue,
            };
            let Some(p) = self.peers.get_mut(peer).and_then(|p| p.as_mut()) else {
                return Err(internal(format!("plan uses rank {peer}, which has no link")));
            };
            let counter = if sending { &mut tx_count[peer] } else { &mut rx_count[peer] };
            op.steps[s].msg = *counter;
            *counter += 1;
            if sending {
                p.tx_queue.push_back((op.id, s));
            } else {
                p.rx_queue.push_back((op.id, s));
            }
        }
        Ok(())
    }

    fn op_index(&self, id: u64) -> Result<usize, BrokenCause> {
        self.ops.iter().position(|o| o.id == id).ok_or_else(|| internal("queued step of a finished operation"))
    }

    fn run_local_steps(&mut self) -> Result<bool, BrokenCause> {
        let mut progress = false;
        let size = self.cfg.size;
        let spent_at_start = self.local_bytes;
        for op in self.ops.iter_mut().filter(|o| o.active && o.local_left > 0) {
            // One call does about a budget's worth of local work; the pass comes back for more.
            if self.local_bytes - spent_at_start >= PASS_BUDGET {
                break;
            }
            for s in 0..op.plan.steps.len() {
                if op.steps[s].done || !op.deps_done(s) {
                    continue;
                }
                let (dtype, redop) = (op.desc.dtype, op.desc.redop);
                let act = op.plan.steps[s].act;
                let len = match act {
                    Act::Copy { dst, .. } | Act::Reduce { dst, .. } | Act::Scale { dst } => dst.len,
                    Act::Send { .. } | Act::Recv { .. } => continue,
                };
                // A large step goes in pieces (its `progress` says how far it got).
                let at = op.steps[s].progress;
                let mut n = (len - at).min(LOCAL_PIECE);
                match act {
                    Act::Copy { src, dst } => {
                        let (sb, db) = (op.buf(src.buf), op.buf(dst.buf));
                        if src.len != dst.len {
                            return Err(internal("copy between regions of different sizes"));
                        }
                        if src == dst {
                            n = len - at;
                        } else {
                            // Overlapping views (an in-place call) are copied whole, as one
                            // memmove: in pieces, a later piece could read what an earlier one
                            // wrote.
                            if ranges_overlap((sb.addr() + src.off, len), (db.addr() + dst.off, len)) {
                                n = len - at;
                            }
                            // SAFETY: both views belong to this operation (buf.rs contract);
                            // `copy_region` handles overlap.
                            unsafe { crate::sys::buf::copy_region(sb, src.off + at, db, dst.off + at, n) }
                                .ok_or_else(|| internal("copy region out of range"))?;
                        }
                    }
                    Act::Reduce { src, dst } => {
                        let (sb, db) = (op.buf(src.buf), op.buf(dst.buf));
                        // SAFETY: the plan never reduces a region into itself, so these two
                        // views do not overlap; both belong to this operation.
                        let (a, b) = unsafe { (sb.bytes(src.off + at, n), db.bytes_mut(dst.off + at, n)) };
                        let (Some(a), Some(b)) = (a, b) else {
                            return Err(internal("reduce region out of range"));
                        };
                        reduce_into(dtype, redop, b, a);
                    }
                    Act::Scale { dst } => {
                        // SAFETY: a view of this operation's own buffer, alone.
                        let b = unsafe { op.buf(dst.buf).bytes_mut(dst.off + at, n) }
                            .ok_or_else(|| internal("scale region out of range"))?;
                        scale_avg(dtype, b, size);
                    }
                    Act::Send { .. } | Act::Recv { .. } => continue,
                }
                op.steps[s].progress += n;
                self.local_bytes += n as u64;
                progress = true;
                if op.steps[s].progress < len {
                    continue;
                }
                op.local_left -= 1;
                if op.finish_step(s) {
                    self.finished += 1;
                }
            }
        }
        Ok(progress)
    }

    /// Completes finished operations.
    fn retire(&mut self) -> bool {
        let mut progress = false;
        debug_assert_eq!(self.finished, self.ops.iter().filter(|o| o.left == 0).count());
        debug_assert_eq!(self.inactive, self.ops.iter().filter(|o| !o.active).count());
        if self.finished == 0 {
            return false;
        }
        let mut i = 0;
        while i < self.ops.len() {
            if self.ops[i].active && self.ops[i].left == 0 {
                self.finished -= 1;
                let mut op = self.ops.remove(i).expect("index in range");
                let scratch = std::mem::take(&mut op.scratch_mem);
                if scratch.capacity() > self.spare_scratch.as_ref().map_or(0, |s| s.capacity()) {
                    self.spare_scratch = Some(scratch);
                }
                self.stats.ops_completed += 1;
                self.complete(&op.completion, Ok(()));
                progress = true;
            } else {
                i += 1;
            }
        }
        progress
    }

    /// Credits the bytes moved since the last look to `now`.
    fn sample_traffic(&mut self, now: Instant) {
        for p in self.peers.iter_mut().flatten().filter(|p| p.gone.is_none()) {
            let Some(live) = p.live.as_mut() else { continue };
            let (rx, tx) = p.link.traffic();
            if rx > p.traffic.0 {
                live.on_rx(now);
            }
            if tx > p.traffic.1 {
                live.on_tx(now);
            }
            p.traffic = (rx, tx);
        }
    }

    fn timers(&mut self, now: Instant) -> Result<(), BrokenCause> {
        if !std::mem::take(&mut self.posted_since_timers) {
            self.spare_scratch = None;
        }
        for (rank, slot) in self.peers.iter_mut().enumerate() {
            let Some(p) = slot.as_mut().filter(|p| p.gone.is_none()) else { continue };
            p.link.tick(now);
            let Some(live) = p.live.as_mut() else { continue };
            // A peer whose input we stopped reading proves nothing by its silence, unless we
            // are also stuck writing to it.
            let listening = !p.paused || p.tx.is_some();
            match live.poll(now, listening) {
                Verdict::Fine => {}
                Verdict::SendHeartbeat => {
                    if p.tx.is_none() {
                        let h = FrameHeader::control(
                            FrameKind::Heartbeat,
                            world_tag(self.cfg.world_id),
                            self.cfg.generation,
                            0,
                        );
                        p.tx = Some(TxFrame {
                            header: h.encode(),
                            payload: TxPayload::None,
                            written: 0,
                            done: TxDone::Control,
                        });
                        self.stats.heartbeats_sent += 1;
                    }
                    // Count the attempt as traffic so that a full socket does not make us
                    // retry on every pass; the frame goes out with the next write.
                    live.on_tx(now);
                }
                Verdict::Unresponsive(d) => {
                    return Err(BrokenCause::PeerUnresponsive { peer: rank, silent_ms: d.as_millis() as u64 });
                }
            }
        }
        if let Some((_, t)) = self.ops.iter().filter_map(|o| o.deadline).find(|(d, _)| now >= *d) {
            return Err(BrokenCause::OperationTimeout { after_ms: t.as_millis() as u64 });
        }
        Ok(())
    }

    /// The earliest instant at which `timers` may have something to do.
    fn timer_deadline(&self) -> Option<Instant> {
        let live = self.peers.iter().flatten().filter(|p| p.gone.is_none());
        let hb = live.filter_map(|p| p.live.as_ref().map(|l| l.next_deadline(!p.paused || p.tx.is_some())));
        hb.chain(self.ops.iter().filter_map(|o| o.deadline.map(|(d, _)| d))).min()
    }

    /// What to sleep on until more work can be done.
    pub(crate) fn wait_set(&mut self) -> WaitSet {
        let mut w = WaitSet::default();
        if self.broken.is_some() {
            w.ready = true;
            return w;
        }
        for p in self.peers.iter_mut().flatten().filter(|p| p.gone.is_none()) {
            let read = !p.paused;
            let write = p.tx.is_some();
            match p.link.arm(read, write) {
                Armed::Ready => w.ready = true,
                Armed::Wait(fd, ev) => w.fds.push(crate::sys::pollfd(fd, ev)),
                Armed::Idle => {}
            }
            if let Some(l) = &p.live {
                let d = l.next_deadline(!p.paused || write);
                w.deadline = Some(w.deadline.map_or(d, |x: Instant| x.min(d)));
            }
        }
        for (d, _) in self.ops.iter().filter_map(|o| o.deadline) {
            w.deadline = Some(w.deadline.map_or(d, |x| x.min(d)));
        }
        w
    }

    /// What a world nobody waits on watches: hang-ups only, and the next heartbeat. `idle`:
    /// it has nothing to do (else a caller drives it, asleep on the links' own descriptors).
    pub(crate) fn watch_set(&mut self, idle: bool) -> WaitSet {
        let mut w = WaitSet::default();
        for p in self.peers.iter_mut().flatten().filter(|p| p.gone.is_none()) {
            if let Some((fd, ev)) = p.link.hangup_fd(idle) {
                w.fds.push(crate::sys::pollfd(fd, ev));
            }
            if let Some(l) = &p.live {
                let d = l.next_deadline(!p.paused);
                w.deadline = Some(w.deadline.map_or(d, |x: Instant| x.min(d)));
            }
        }
        w
    }

    /// The descriptors of [`Engine::watch_set`] (or some of them) reported: the links look
    /// at them on their next read.
    pub(crate) fn links_reported(&mut self) {
        for p in self.peers.iter_mut().flatten() {
            p.link.reported();
        }
    }

    /// Leaves the world: gracefully (peers get a close frame after all data) when nothing is
    /// in flight, else as an abort.
    pub(crate) fn close(&mut self) {
        if self.broken.is_some() {
            return;
        }
        if self.has_work() {
            self.fail(BrokenCause::LocalAbort);
            return;
        }
        self.say_goodbye(FrameKind::Close, &[]);
        self.set_broken(BrokenCause::LocalAbort);
    }

    /// Lets go of the segments a break kept for a `shrink` (the world is being removed).
    pub(crate) fn release_kept_segments(&mut self) {
        self.kept_segments = Vec::new();
    }

    /// Sends every peer still there a last control frame (close, or abort with a reason),
    /// where that can be done without blocking, then closes the links. A frame not yet
    /// started gives way to it; one half written cannot be cut, so that link just closes.
    fn say_goodbye(&mut self, kind: FrameKind, reason: &[u8]) {
        let h =
            FrameHeader::control(kind, world_tag(self.cfg.world_id), self.cfg.generation, reason.len() as u32).encode();
        for p in
            self.peers.iter_mut().flatten().filter(|p| p.gone.is_none() && p.link.kind() != TransportKind::Loopback)
        {
            if p.tx.as_ref().is_none_or(|f| f.written == 0) {
                let mut written = 0;
                let _ = p.link.write(&h, reason, &mut written);
            }
            if kind == FrameKind::Close {
                p.link.shutdown();
            }
        }
        // The links go; what they counted stays. A world that breaks keeps the pairs'
        // segments until it is removed, also of peers whose end is gone (a live peer that
        // broke the world first closed its end; one that died is not among the survivors a
        // shrink names, or that shrink cannot form anyway).
        if kind != FrameKind::Close {
            self.kept_segments =
                self.peers.iter_mut().map(|p| p.as_mut().and_then(|p| p.link.segment_source())).collect();
        }
        let mut s = self.stats;
        self.add_link_counters(&mut s);
        self.stats = s;
        self.peers.clear();
    }

    /// Breaks the world: fails every operation, tells the peers (best effort), closes links.
    fn fail(&mut self, cause: BrokenCause) {
        if self.broken.is_some() {
            return;
        }
        let (name, rank, generation) = (&self.cfg.name, self.cfg.rank, self.cfg.generation);
        match cause {
            BrokenCause::LocalAbort => {}
            // A peer closing the world on purpose is the normal end of a world.
            BrokenCause::PeerLeft { .. } => {
                info!("world '{name}' (rank {rank}, generation {generation}) ended: {cause}")
            }
            _ => warn!("world '{name}' (rank {rank}, generation {generation}) broke: {cause}"),
        }
        self.set_broken(cause.clone());
        // Before any call returns: a peer must not go on reading a buffer handed back.
        for p in self.peers.iter_mut().flatten() {
            p.link.revoke();
        }
        (self.inactive, self.finished) = (0, 0);
        for op in std::mem::take(&mut self.ops) {
            self.complete(&op.completion, Err(Error::broken(&self.cfg.name, self.cfg.rank, cause.clone(), true)));
        }
        // The rests of direct sends (`direct.rs`): their senders wait as for an operation.
        let rests: Vec<_> = self
            .peers
            .iter()
            .flatten()
            .filter_map(|p| match &p.tx {
                Some(TxFrame { done: TxDone::Rest(c), .. }) => Some(c.clone()),
                _ => None,
            })
            .collect();
        for c in rests {
            self.complete(&c, Err(Error::broken(&self.cfg.name, self.cfg.rank, cause.clone(), true)));
        }
        // Tell the others: a world that ended because a peer left ends quietly for them too
        // (a close frame); any other break is passed on with its reason (an abort frame).
        let (kind, reason) = match cause {
            BrokenCause::PeerLeft { .. } => (FrameKind::Close, Vec::new()),
            _ => (FrameKind::Abort, cause.to_string().into_bytes()),
        };
        self.say_goodbye(kind, &reason);
        if let Some(f) = self.on_broken.take() {
            self.outbox.broken = Some((f, cause));
        }
    }
}

#[cfg(test)]
mod tests;
