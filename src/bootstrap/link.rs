//! Links between the ranks of a formed world: each rank connects to every lower rank's
//! listener and accepts every higher rank; a link hello (world id, generation, secret, ranks)
//! opens each connection, and the pair then picks its transport (shared memory on one host,
//! else TCP).
//!
//! The listener is open to anyone who can reach it, so its connections are served side by
//! side: every pending connection's bytes are read as they come, an honest hello is answered
//! the moment it is complete, and a connection that says nothing useful within
//! [`LINK_HELLO_GRACE`], or that comes past [`MAX_PENDING`] others, is dropped. A stranger's
//! connection never holds up an honest one.

use super::*;
use crate::engine::wire::world_tag;

pub(super) const LINK_MAGIC: u32 = 0x4D57_4C31; // "MWL1"
/// A connection to a rank's peer listener must complete its link hello within this time.
pub(super) const LINK_HELLO_GRACE: Duration = Duration::from_secs(2);
/// Connections waiting for their hello at once; past this the oldest is dropped.
pub(super) const MAX_PENDING: usize = 128;
/// How long a rank waits for a higher rank's link before it looks whether that rank is still
/// there (see [`probe`]), and how often it looks again.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// The most one such look may take (a peer that does not answer in this time tells nothing:
/// the deadline still bounds the wait).
const PROBE_WAIT: Duration = Duration::from_millis(200);
/// How often a rank that waits for something else (the others' registrations in etcd, a lower
/// rank's answer) looks at its own door.
pub(super) const DOOR_TICK: Duration = Duration::from_millis(50);
/// How long a peer listener whose accept failed (no descriptor to spare) is not looked at.
const LISTENER_PAUSE: Duration = Duration::from_millis(20);
/// Bytes of a link hello at the most (its secret is the id's, 32 bytes; any is accepted up to
/// this).
const MAX_LINK_HELLO: usize = 4 + 8 + 4 + 4 + 4 + 4 + 256;

/// A probe's hello: "are you rank `to` of this world and generation?", answered with one
/// byte and closed; it links nothing.
const LINK_PROBE_MAGIC: u32 = 0x4D57_5031; // "MWP1"

pub(super) fn link_hello(world_id: u64, generation: u32, from: usize, to: usize, secret: &[u8]) -> Vec<u8> {
    hello_of(LINK_MAGIC, world_id, generation, from, to, secret)
}

fn hello_of(magic: u32, world_id: u64, generation: u32, from: usize, to: usize, secret: &[u8]) -> Vec<u8> {
    MsgWriter::new().u32(magic).u64(world_id).u32(generation).u32(from as u32).u32(to as u32).bytes(secret).finish()
}

/// Who may link to this rank: the world, its generation and secret, and this rank.
pub(super) struct Expect<'a> {
    pub name: &'a str,
    pub world_id: u64,
    pub generation: u32,
    pub secret: &'a [u8],
    pub rank: usize,
    pub size: usize,
    /// Each rank's listener, where known: a higher rank that has not linked yet is looked for
    /// there (see [`probe`]).
    pub listeners: &'a [Option<SocketAddr>],
}

/// What a hello that a rank accepts asks for.
#[derive(Debug, PartialEq)]
enum Hello {
    /// A link from this higher rank.
    Link(usize),
    /// A lower rank's look whether this rank is still there.
    Probe,
}

impl Expect<'_> {
    /// What a hello asks for, if it is one this rank answers.
    fn check(&self, msg: &[u8], taken: &[bool]) -> std::result::Result<Hello, String> {
        let mut r = MsgReader::new(msg);
        let magic = r.u32()?;
        if magic != LINK_MAGIC && magic != LINK_PROBE_MAGIC {
            return Err("not a multiworld link hello".into());
        }
        let (wid, generation, from, to, sec) = (r.u64()?, r.u32()?, r.u32()?, r.u32()?, r.bytes()?);
        r.end()?;
        if wid != self.world_id || generation != self.generation || sec != self.secret {
            return Err("wrong world, generation or secret".into());
        }
        if magic == LINK_PROBE_MAGIC {
            return if to as usize == self.rank { Ok(Hello::Probe) } else { Err(format!("a probe for rank {to}")) };
        }
        let from = from as usize;
        if to as usize != self.rank || from <= self.rank || from >= self.size || taken.get(from) == Some(&true) {
            return Err(format!("unexpected rank {from}"));
        }
        Ok(Hello::Link(from))
    }
}

/// A connection to the peer listener, until its hello is complete.
struct Pending {
    s: TcpStream,
    from: SocketAddr,
    buf: Vec<u8>,
    since: Instant,
    /// Its hello is complete and checked, from this rank, held until the table is (see
    /// [`Door::serve`]).
    held: Option<usize>,
}

impl Pending {
    /// Reads what is there. `Ok(Some(msg))` once a whole hello arrived (also when the peer
    /// closed right after sending it); `Err` to drop the connection.
    fn read(&mut self) -> std::result::Result<Option<Vec<u8>>, String> {
        let mut chunk = [0u8; 512];
        let mut closed = false;
        while self.buf.len() <= 4 + MAX_LINK_HELLO {
            match addr::recv_now(&self.s, &mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let incomplete = || if closed { Err("closed before its hello was complete".to_string()) } else { Ok(None) };
        if closed && self.buf.is_empty() {
            // A lower rank's look at this listener (`probe`), or a port scan: nothing to say.
            return Err(String::new());
        }
        if self.buf.len() < 4 {
            return incomplete();
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_LINK_HELLO {
            return Err(format!("a link hello of {len} bytes"));
        }
        match self.buf.len().cmp(&(4 + len)) {
            std::cmp::Ordering::Less => incomplete(),
            std::cmp::Ordering::Equal => Ok(Some(self.buf[4..].to_vec())),
            std::cmp::Ordering::Greater => Err("bytes after its link hello".into()),
        }
    }
}

/// A rank's peer listener and the connections it has accepted whose hellos are not yet
/// answered. It is served while the rank waits for its lower ranks' answers and while it
/// accepts its links, and through etcd also while it waits for the others to register (every
/// [`DOOR_TICK`]; not during the rank's own etcd calls): a connector that reached this listener
/// by mistake (a dead process's registration whose port the kernel gave to this listener) is
/// refused within moments instead of waiting for an answer until its deadline, and a lower
/// rank's probe is answered while this rank is still busy with its own connects.
pub(super) struct Door {
    listener: TcpListener,
    pending: Vec<Pending>,
    /// Until when the listener is not looked at (its accept failed: no descriptor to spare).
    paused: Option<Instant>,
}

impl Door {
    pub(super) fn new(listener: TcpListener) -> Result<Door> {
        listener.set_nonblocking(true).map_err(|e| Error::system("peer listener", e))?;
        Ok(Door { listener, pending: Vec::new(), paused: None })
    }

    /// Waits (at most until `until`) for a connection or for bytes on a pending one, or for the
    /// oldest pending connection's grace to end.
    pub(super) async fn wait(&mut self, until: Instant) {
        let now = Instant::now();
        let paused = self.paused.is_some_and(|p| now < p);
        let mut fds = Vec::with_capacity(self.pending.len() + 1);
        if !paused {
            fds.push((self.listener.as_raw_fd(), libc::POLLIN));
        }
        // A complete hello held for later (`serve` without `taken`) needs no wait.
        fds.extend(
            self.pending.iter().filter(|p| p.held.is_none()).map(|p| (p.s.as_raw_fd(), libc::POLLIN | libc::POLLRDHUP)),
        );
        let mut until = until;
        if let Some(p) = self.pending.iter().find(|p| p.held.is_none()) {
            until = until.min(p.since + LINK_HELLO_GRACE);
        }
        if let Some(p) = self.paused.filter(|_| paused) {
            until = until.min(p);
        }
        let _ = exec::ready(&fds, until).await;
    }

    /// Accepts what waits on the listener and reads what the pending connections sent. A probe
    /// that `expect` accepts is answered and closed; a stranger's connection, or one that is
    /// silent past its grace, is closed. A link hello that `expect` accepts is acknowledged and
    /// returned with the rank it comes from when `taken` is given (and marked there); without
    /// it (the table is not complete yet) it is held, unanswered, for a later call.
    pub(super) async fn serve(
        &mut self,
        expect: &Expect<'_>,
        mut taken: Option<&mut [bool]>,
        deadline: Instant,
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<(usize, TcpStream)>> {
        let (name, rank) = (expect.name, expect.rank);
        if self.paused.is_none_or(|p| Instant::now() >= p) {
            self.accept_all(name, rank);
        }
        let now = Instant::now();
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            if taken.is_none() && self.pending[i].held.is_some() {
                // Checked already, and still to be held.
                i += 1;
                continue;
            }
            let outcome = match self.pending[i].read() {
                Ok(Some(msg)) => expect.check(&msg, taken.as_deref().unwrap_or(&[])).map(Some),
                Ok(None) if now.duration_since(self.pending[i].since) >= LINK_HELLO_GRACE => {
                    Err(format!("no link hello within {LINK_HELLO_GRACE:?}"))
                }
                Ok(None) => Ok(None),
                Err(why) => Err(why),
            };
            match outcome {
                Ok(None) => i += 1,
                Ok(Some(Hello::Probe)) => {
                    let p = self.pending.remove(i);
                    let _ = addr::write_all(&p.s, &[1], deadline, cancel).await;
                }
                Ok(Some(Hello::Link(from))) => match taken.as_deref_mut() {
                    // One held hello per rank: a second from the same rank is a stranger's.
                    None if self.pending.iter().enumerate().any(|(j, p)| j != i && p.held == Some(from)) => {
                        let p = self.pending.remove(i);
                        warn!("world '{name}' rank {rank}: refused link connection from {}: rank {from} again", p.from);
                    }
                    None => {
                        self.pending[i].held = Some(from);
                        i += 1;
                    }
                    Some(taken) => {
                        let p = self.pending.remove(i);
                        if addr::write_all(&p.s, &[1], deadline, cancel).await.is_err() {
                            return Err(Error::new(
                                ErrorKind::WorldBroken,
                                format!("rank {from} went away while connecting"),
                            ));
                        }
                        taken[from] = true;
                        done.push((from, p.s));
                    }
                },
                Err(why) => {
                    let p = self.pending.remove(i);
                    if !why.is_empty() {
                        warn!("world '{name}' rank {rank}: refused link connection from {}: {why}", p.from);
                    }
                }
            }
        }
        Ok(done)
    }

    /// Queues every connection waiting on the listener. When accepting fails (out of
    /// descriptors, say) the pending ones still get served, and the listener is looked at
    /// again in a moment.
    fn accept_all(&mut self, name: &str, rank: usize) {
        loop {
            match self.listener.accept() {
                Ok((s, from)) => {
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    // Held hellos (one per rank, honest) do not count, and are never dropped.
                    if self.pending.iter().filter(|p| p.held.is_none()).count() >= MAX_PENDING {
                        if let Some(i) = self.pending.iter().position(|p| p.held.is_none()) {
                            let old = self.pending.remove(i);
                            warn!(
                                "world '{name}' rank {rank}: dropped link connection from {} (too many pending)",
                                old.from
                            );
                        }
                    }
                    self.pending.push(Pending { s, from, buf: Vec::new(), since: Instant::now(), held: None });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.paused = Some(Instant::now() + LISTENER_PAUSE);
                    return;
                }
            }
        }
    }
}

/// Accepts the connections of `want` higher ranks not `taken` yet (those are linked
/// already, on lanes) at `door` and returns each checked connection by rank, its hello
/// acknowledged. Ends with an error at `deadline` or when
/// `cancel` is set, or when a rank it waits for is found gone (see [`probe`]).
pub(super) async fn accept_links(
    door: &mut Door,
    expect: &Expect<'_>,
    mut taken: Vec<bool>,
    want: usize,
    deadline: Instant,
    cancel: Option<&AtomicBool>,
    what: &(dyn Fn(&[bool]) -> String + Sync),
) -> Result<Vec<(usize, TcpStream)>> {
    let mut done: Vec<(usize, TcpStream)> = Vec::new();
    let mut next_probe = Instant::now() + PROBE_EVERY;
    let mut probed = expect.rank;
    loop {
        done.extend(door.serve(expect, Some(&mut taken), deadline, cancel).await?);
        if done.len() >= want {
            return Ok(done);
        }
        if addr::is_cancelled(cancel) {
            return Err(Error::system(what(&taken), addr::abandoned()));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::timeout(what(&taken)));
        }
        if now >= next_probe {
            if let Some(gone) = probe(expect, &taken, &mut probed, deadline, cancel).await {
                return Err(Error::new(ErrorKind::WorldBroken, gone));
            }
            next_probe = Instant::now() + PROBE_EVERY;
            continue;
        }
        let mut until = deadline.min(next_probe);
        if cancel.is_some() {
            until = until.min(now + addr::CANCEL_CHECK);
        }
        door.wait(until).await;
    }
}

/// Looks at the listener of the next higher rank (after `*probed`, in turn) that has not
/// linked yet: whether that rank is still there. A rank's listener is served until its own
/// links are made, and it makes the link to this rank before that; so a listener that
/// refuses the connection, or closes it unanswered (its port now serves someone else), means
/// that rank's process died or gave up this formation, and waiting for it to the deadline
/// would be in vain. That happens where the table came from etcd with a dead process's
/// registration in it, or when a rank dies between the table and its links. A rank that does
/// not answer in time (busy connecting to its own lower ranks) is waited for.
async fn probe(
    expect: &Expect<'_>,
    taken: &[bool],
    probed: &mut usize,
    deadline: Instant,
    cancel: Option<&AtomicBool>,
) -> Option<String> {
    let size = expect.size;
    let next = (1..size).map(|k| (*probed + k) % size).find(|r| *r > expect.rank && !taken[*r])?;
    *probed = next;
    let at = (*expect.listeners.get(next)?)?;
    let until = deadline.min(Instant::now() + PROBE_WAIT);
    let gone = |how: &str| {
        Some(formation_err(
            expect.name,
            expect.rank,
            format!("rank {next} left the formation: its listener at {at} {how} (its process died or gave up)"),
        ))
    };
    let s = match addr::connect(at, until, cancel).await {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return gone("refuses connections"),
        Err(_) => return None,
    };
    let hello = hello_of(LINK_PROBE_MAGIC, expect.world_id, expect.generation, expect.rank, next, expect.secret);
    match addr::send_msg(&s, &hello, until, cancel).await {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => return None,
        Err(_) => return gone("closed the connection"),
    }
    let mut ack = [0u8; 1];
    match addr::read_exact_until(&s, &mut ack, until, cancel).await {
        Ok(()) => None,
        Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => None,
        Err(_) => gone("closed the connection unanswered"),
    }
}

/// Connects to every lower rank and accepts every higher one. Lower ranks accept only after
/// their own connects are done, so the order has no cycle.
pub(super) async fn connect_links(
    spec: &JoinSpec,
    t: &Table,
    secret: &[u8],
    mut door: Door,
    deadline: Instant,
    shm_fallbacks: &mut u64,
    made: Option<Vec<Option<Box<dyn Link>>>>,
) -> Result<Vec<Option<Box<dyn Link>>>> {
    let (name, rank, size) = (spec.name.as_str(), spec.rank, spec.size);
    let cancel = Some(&*spec.cancel);
    let mut links: Vec<Option<Box<dyn Link>>> = made.unwrap_or_default();
    links.resize_with(size, || None);
    if links[rank].is_none() {
        links[rank] = Some(Box::new(QueueLink::loopback()));
    }
    // Pairs linked already (on lanes) connect nothing.
    let linked: Vec<bool> = links.iter().map(Option::is_some).collect();
    let listeners: Vec<Option<SocketAddr>> = t.peers.iter().map(|p| p.0.parse().ok()).collect();
    let expect =
        Expect { name, world_id: t.world_id, generation: t.generation, secret, rank, size, listeners: &listeners };
    for (peer, (addr, _host, _door)) in t.peers.iter().enumerate().take(rank).filter(|(p, _)| !linked[*p]) {
        let what = || formation_err(name, rank, format!("connecting to rank {peer}"));
        let a: SocketAddr = addr.parse().map_err(|_| Error::internal(what()))?;
        let s = addr::connect_once(a, deadline, cancel, &what).await?;
        addr::send_msg(&s, &link_hello(t.world_id, t.generation, rank, peer, secret), deadline, cancel)
            .await
            .map_err(|e| Error::new(ErrorKind::WorldBroken, format!("{}: {e}", what())))?;
        // While the lower rank has not answered, this rank's own door is served: probes are
        // answered (this rank is alive, only busy) and strangers refused; higher ranks' link
        // hellos are held for the accepts below.
        let mut ack = [0u8; 1];
        let acked = loop {
            let tick = deadline.min(Instant::now() + DOOR_TICK);
            match addr::read_exact_until(&s, &mut ack, tick, cancel).await {
                Err(e) if e.kind() == io::ErrorKind::TimedOut && Instant::now() < deadline => {
                    door.serve(&expect, None, deadline, cancel).await?;
                }
                other => break other,
            }
        };
        match acked {
            Ok(()) if ack[0] == 1 => {}
            Ok(()) => return Err(Error::new(ErrorKind::WorldBroken, format!("{}: refused", what()))),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(Error::timeout(format!("{}: no answer before the deadline", what())))
            }
            Err(e) => return Err(Error::new(ErrorKind::WorldBroken, format!("{}: {e}", what()))),
        }
        let same_host = t.peers[peer].1 == t.peers[rank].1;
        let want_shm = spec.auto && same_host;
        let key = world_tag(t.world_id);
        let rdma = Rdma::of(spec, same_host);
        let link = match rdma {
            Rdma::Must => offer_rdma(s, None, deadline, cancel).await,
            Rdma::May if rdma.can() => offer_rdma(s, Some((key, spec.socket_buffer)), deadline, cancel).await,
            _ => offer_transport(s, key, want_shm, spec.socket_buffer, deadline, cancel).await,
        }
        .map_err(|e| Error::system(what(), e))?;
        *shm_fallbacks += u64::from(want_shm && link.kind() != TransportKind::Shm);
        links[peer] = Some(link);
    }
    let missing = |taken: &[bool]| {
        let m: Vec<usize> = (rank + 1..size).filter(|r| !taken.get(*r).copied().unwrap_or(false)).collect();
        formation_err(name, rank, format!("ranks {m:?} did not connect before the deadline"))
    };
    let want = (rank + 1..size).filter(|r| !linked[*r]).count();
    for (from, s) in accept_links(&mut door, &expect, linked, want, deadline, cancel, &missing).await? {
        let same_host = t.peers[from].1 == t.peers[rank].1;
        let want_shm = spec.auto && same_host;
        let rdma = Rdma::of(spec, same_host);
        let link = answer_transport(s, world_tag(t.world_id), want_shm, rdma, spec.socket_buffer, deadline, cancel)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::WorldBroken,
                    formation_err(name, rank, format!("setting up the link to rank {from}: {e}")),
                )
            })?;
        *shm_fallbacks += u64::from(want_shm && link.kind() != TransportKind::Shm);
        links[from] = Some(link);
    }
    Ok(links)
}

/// The connecting (higher) rank of a pair proposes the transport: `T` for TCP, or `S` and the
/// path of a fresh shared-memory segment. The acceptor answers an `S` with one byte, 1 if it
/// mapped the segment; the connector then unlinks the file either way.
pub(super) async fn offer_transport(
    s: TcpStream,
    key: u32,
    shm: bool,
    buffer: Option<usize>,
    deadline: Instant,
    cancel: Option<&AtomicBool>,
) -> io::Result<Box<dyn Link>> {
    if shm {
        match Segment::create() {
            Ok(mut seg) => {
                // Before the offer, so that the peer can read this side's probe when it maps.
                crate::transport::shm::publish_probe(&seg, 0, 0);
                let path = seg.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
                addr::send_msg(&s, format!("S{path}").as_bytes(), deadline, cancel).await?;
                let mut ok = [0u8; 1];
                addr::read_exact_until(&s, &mut ok, deadline, cancel).await?;
                seg.unlink();
                if ok[0] == 1 {
                    return Ok(Box::new(ShmLink::new(s, seg, true)?));
                }
                info!("shared memory refused by the peer; using TCP");
                return Ok(Box::new(TcpLink::new(s, buffer, key)?));
            }
            Err(e) => warn!("cannot create a shared-memory segment ({e}; is /dev/shm full?); using TCP"),
        }
    }
    addr::send_msg(&s, b"T", deadline, cancel).await?;
    Ok(Box::new(TcpLink::new(s, buffer, key)?))
}

/// Whether a pair uses RDMA, as one of its ranks sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rdma {
    /// Its world asks for RDMA: nothing else will do.
    Must,
    /// Its world lets the crate choose and the peer is on another host: RDMA if this process
    /// can (`transport::rdma_across_hosts`), else TCP.
    May,
    /// Not for this pair.
    No,
}

impl Rdma {
    /// For a rank of a world formed by `spec`, toward a peer on this host or not.
    fn of(spec: &JoinSpec, same_host: bool) -> Rdma {
        match (spec.rdma, spec.auto && !same_host) {
            (true, _) => Rdma::Must,
            (false, true) => Rdma::May,
            (false, false) => Rdma::No,
        }
    }

    /// True when this rank takes RDMA for the pair if the peer offers or accepts it.
    fn can(self) -> bool {
        match self {
            Rdma::Must => true,
            Rdma::May => crate::transport::rdma_across_hosts(),
            Rdma::No => false,
        }
    }
}

pub(super) async fn answer_transport(
    s: TcpStream,
    key: u32,
    shm: bool,
    rdma: Rdma,
    buffer: Option<usize>,
    deadline: Instant,
    cancel: Option<&AtomicBool>,
) -> io::Result<Box<dyn Link>> {
    let offer = addr::recv_msg(&s, deadline, cancel).await?;
    if rdma == Rdma::Must && !matches!(offer.first(), Some(b'R' | b'A')) {
        return Err(io::Error::other("this rank asks for RDMA, and the peer offered another transport"));
    }
    match offer.split_first() {
        // A peer that must use RDMA gets it from a rank that lets the crate choose, if it can.
        #[cfg(feature = "rdma")]
        Some((b'R', info)) if rdma.can() => answer_rdma(s, info, None, deadline, cancel).await,
        // An offer the peer's own choice made: RDMA where this side can too, else TCP.
        #[cfg(feature = "rdma")]
        Some((b'A', info)) if rdma.can() => {
            let fallback = (rdma == Rdma::May).then_some((key, buffer));
            answer_rdma(s, info, fallback, deadline, cancel).await
        }
        Some((b'A', _)) => {
            addr::send_msg(&s, b"T", deadline, cancel).await?;
            Ok(Box::new(TcpLink::new(s, buffer, key)?))
        }
        // A rank that must use RDMA reaches one that forced another transport, or that chooses
        // and cannot: refused, saying why.
        Some((b'R', _)) => {
            let why = match rdma {
                Rdma::May => "this rank cannot use RDMA (no usable provider, or a build without the rdma feature)",
                _ => "this rank did not ask for RDMA (its world's transport is another)",
            };
            addr::send_msg(&s, format!("N{why}").as_bytes(), deadline, cancel).await?;
            Err(io::Error::other(format!("the peer offered RDMA, and {why}")))
        }
        Some((b'T', [])) => Ok(Box::new(TcpLink::new(s, buffer, key)?)),
        Some((b'S', path)) => {
            let seg = if shm { std::str::from_utf8(path).ok().map(Segment::open) } else { None };
            match seg {
                Some(Ok(seg)) => {
                    // This side's probe before the answer: the connector probes it once it has
                    // the answer.
                    crate::transport::shm::publish_probe(&seg, 0, 1);
                    addr::write_all(&s, &[1], deadline, cancel).await?;
                    Ok(Box::new(ShmLink::new(s, seg, false)?))
                }
                other => {
                    if let Some(Err(e)) = other {
                        warn!("cannot map the peer's shared-memory segment ({e}); using TCP");
                    }
                    addr::write_all(&s, &[0], deadline, cancel).await?;
                    Ok(Box::new(TcpLink::new(s, buffer, key)?))
                }
            }
        }
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "bad transport offer")),
    }
}

/// The connecting rank of a pair that must use RDMA offers `R` and its set-up data (queue pair
/// connection data, receive ring); the acceptor connects its queue pair to it and answers `R`
/// and its own, or `N` and why it cannot, which fails the formation with that reason. Where the
/// crate chooses (`fallback`: the TCP link's key and buffers), the offer is `A`, which the
/// acceptor may answer with `T` instead (it cannot, or its world did not let the crate choose
/// RDMA): the pair then uses TCP; so does this side where it cannot make a queue pair itself.
async fn offer_rdma(
    s: TcpStream,
    fallback: Option<(u32, Option<usize>)>,
    deadline: Instant,
    cancel: Option<&AtomicBool>,
) -> io::Result<Box<dyn Link>> {
    #[cfg(feature = "rdma")]
    {
        use crate::transport::rdma::Pending;
        let pending = match (Pending::new(), fallback) {
            (Ok(p), _) => p,
            (Err(e), Some((key, buffer))) => {
                warn!("cannot make an RDMA queue pair ({e}); using TCP");
                return offer_transport(s, key, false, buffer, deadline, cancel).await;
            }
            (Err(e), None) => return Err(e),
        };
        let mut offer = if fallback.is_some() { b"A".to_vec() } else { b"R".to_vec() };
        offer.extend_from_slice(&pending.info());
        addr::send_msg(&s, &offer, deadline, cancel).await?;
        let answer = addr::recv_msg(&s, deadline, cancel).await?;
        match answer.split_first() {
            Some((b'R', info)) => {
                // Connected, it says so (one byte): the acceptor writes nothing before that, so
                // no write reaches a queue pair not yet ready for it.
                // Where the crate chose, a queue pair that does not connect leaves the pair on TCP,
                // on both sides (the acceptor reads the 0).
                match (pending.connect(s.try_clone()?, info, false), fallback) {
                    (Ok(link), _) => {
                        addr::write_all(&s, &[1], deadline, cancel).await?;
                        Ok(Box::new(link))
                    }
                    (Err(e), Some((key, buffer))) => {
                        warn!("cannot connect the RDMA queue pair ({e}); using TCP");
                        addr::write_all(&s, &[0], deadline, cancel).await?;
                        Ok(Box::new(TcpLink::new(s, buffer, key)?))
                    }
                    (Err(e), None) => {
                        let _ = addr::write_all(&s, &[0], deadline, cancel).await;
                        Err(e)
                    }
                }
            }
            Some((b'T', [])) => match fallback {
                Some((key, buffer)) => Ok(Box::new(TcpLink::new(s, buffer, key)?)),
                None => Err(io::Error::new(io::ErrorKind::InvalidData, "a TCP answer to an offer of RDMA")),
            },
            Some((b'N', why)) => {
                Err(io::Error::other(format!("the peer cannot use RDMA: {}", String::from_utf8_lossy(why))))
            }
            _ => Err(io::Error::new(io::ErrorKind::InvalidData, "bad RDMA answer")),
        }
    }
    #[cfg(not(feature = "rdma"))]
    {
        match fallback {
            Some((key, buffer)) => offer_transport(s, key, false, buffer, deadline, cancel).await,
            None => Err(io::Error::other("RDMA needs a build with the rdma feature")),
        }
    }
}

/// Answers an offer of RDMA (`fallback`: the crate chooses, and the pair may use TCP instead,
/// with this key and these buffers, where this side cannot make its queue pair).
#[cfg(feature = "rdma")]
async fn answer_rdma(
    s: TcpStream,
    info: &[u8],
    fallback: Option<(u32, Option<usize>)>,
    deadline: Instant,
    cancel: Option<&AtomicBool>,
) -> io::Result<Box<dyn Link>> {
    use crate::transport::rdma::Pending;
    // This side connects first (the active side), then answers: the offerer attaches once it
    // has the answer, and says when it is ready.
    let made = Pending::new().and_then(|p| {
        let mut answer = b"R".to_vec();
        answer.extend_from_slice(&p.info());
        Ok((p.connect(s.try_clone()?, info, true)?, answer))
    });
    let (link, answer) = match (made, fallback) {
        (Ok(made), _) => made,
        (Err(e), Some((key, buffer))) => {
            warn!("cannot make an RDMA queue pair ({e}); using TCP");
            addr::send_msg(&s, b"T", deadline, cancel).await?;
            return Ok(Box::new(TcpLink::new(s, buffer, key)?));
        }
        (Err(e), None) => {
            addr::send_msg(&s, format!("N{e}").as_bytes(), deadline, cancel).await?;
            return Err(e);
        }
    };
    addr::send_msg(&s, &answer, deadline, cancel).await?;
    let mut ready = [0u8; 1];
    addr::read_exact_until(&s, &mut ready, deadline, cancel).await?;
    match (ready[0], fallback) {
        (1, _) => {}
        (_, Some((key, buffer))) => {
            warn!("the peer could not connect its RDMA queue pair; using TCP");
            drop(link);
            return Ok(Box::new(TcpLink::new(s, buffer, key)?));
        }
        (_, None) => return Err(io::Error::other("the peer could not connect its RDMA queue pair")),
    }
    Ok(Box::new(link))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::exec::block_on;
    use std::io::Write;

    /// Forty strangers connect to a rank's peer listener first and say nothing (or one byte);
    /// the honest peer's hello that comes after them is answered at once. Read one at a time,
    /// each stranger held the listener for its whole grace and the formation missed its
    /// deadline.
    #[test]
    fn idle_strangers_do_not_hold_up_an_honest_link() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let secret = [9u8; 32];
        let strangers: Vec<TcpStream> = (0..40)
            .map(|k| {
                let s = TcpStream::connect(at).unwrap();
                if k % 2 == 0 {
                    (&s).write_all(&[7]).unwrap();
                }
                s
            })
            .collect();
        let honest = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let s = TcpStream::connect(at).unwrap();
            block_on(addr::send_msg(
                &s,
                &link_hello(5, 2, 1, 0, &secret),
                Instant::now() + Duration::from_secs(5),
                None,
            ))
            .unwrap();
            let mut ack = [0u8; 1];
            block_on(addr::read_exact_until(&s, &mut ack, Instant::now() + Duration::from_secs(20), None)).unwrap();
            (ack[0], s)
        });
        let expect =
            Expect { name: "w", world_id: 5, generation: 2, secret: &secret, rank: 0, size: 2, listeners: &[] };
        let t = Instant::now();
        // The deadline is below the strangers' graces added up (40 x 2 s).
        let got = block_on(accept_links(
            &mut Door::new(listener).unwrap(),
            &expect,
            vec![false; expect.size],
            1,
            t + Duration::from_secs(20),
            None,
            &|_| "w".into(),
        ))
        .unwrap();
        let took = t.elapsed();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 1);
        let (ack, _s) = honest.join().unwrap();
        assert_eq!(ack, 1);
        // Well under one stranger's grace, even on a loaded machine.
        assert!(took < LINK_HELLO_GRACE, "the honest hello waited {took:?}");
        drop(strangers);
    }

    /// A wrong secret, another generation, a rank that is not higher, garbage: each refused,
    /// and the right peer still gets in.
    #[test]
    fn bad_link_hellos_are_refused_and_the_right_one_accepted() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let secret = [3u8; 32];
        let d = || Instant::now() + Duration::from_secs(5);
        let bad = [
            link_hello(5, 2, 2, 1, &[4u8; 32]),
            link_hello(5, 3, 2, 1, &secret),
            link_hello(5, 2, 0, 1, &secret),
            link_hello(5, 2, 2, 0, &secret),
            b"garbage".to_vec(),
        ];
        let mut refused = Vec::new();
        for m in &bad {
            let s = TcpStream::connect(at).unwrap();
            block_on(addr::send_msg(&s, m, d(), None)).unwrap();
            refused.push(s);
        }
        let good = TcpStream::connect(at).unwrap();
        block_on(addr::send_msg(&good, &link_hello(5, 2, 2, 1, &secret), d(), None)).unwrap();
        let expect =
            Expect { name: "w", world_id: 5, generation: 2, secret: &secret, rank: 1, size: 3, listeners: &[] };
        let got = block_on(accept_links(
            &mut Door::new(listener).unwrap(),
            &expect,
            vec![false; expect.size],
            1,
            d(),
            None,
            &|_| "w".into(),
        ))
        .unwrap();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![2]);
        // Every refused connection was closed without an acknowledgement.
        for s in &refused {
            let mut b = [0u8; 1];
            let r = block_on(addr::read_exact_until(s, &mut b, d(), None));
            assert!(r.is_err(), "a bad hello was acknowledged");
        }
    }

    /// Abandoning the formation ends the wait at once, long before the deadline.
    #[test]
    fn an_abandoned_formation_stops_accepting() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let c2 = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            c2.store(true, crate::sys::sync::Ordering::Release);
        });
        let expect = Expect { name: "w", world_id: 1, generation: 1, secret: &[], rank: 0, size: 2, listeners: &[] };
        let t = Instant::now();
        let r = block_on(accept_links(
            &mut Door::new(listener).unwrap(),
            &expect,
            vec![false; expect.size],
            1,
            t + Duration::from_secs(60),
            Some(&cancel),
            &|_| "w".into(),
        ));
        assert!(r.is_err());
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    /// Before its table is complete a rank's door refuses a hello of another generation at
    /// once, answers a probe, and holds a right link hello unanswered until the links are
    /// made; a probe of a listener that is gone says so, one of a live rank does not.
    #[test]
    fn a_waiting_door_refuses_other_generations_answers_probes_and_holds_links() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let mut door = Door::new(listener).unwrap();
        let secret = [3u8; 32];
        let d = || Instant::now() + Duration::from_secs(5);
        let expect =
            Expect { name: "w", world_id: 5, generation: 2, secret: &secret, rank: 0, size: 3, listeners: &[] };
        let send = |m: &[u8]| {
            let s = TcpStream::connect(at).unwrap();
            block_on(addr::send_msg(&s, m, d(), None)).unwrap();
            s
        };
        let stale = send(&link_hello(5, 1, 1, 0, &secret));
        let probe_ok = send(&hello_of(LINK_PROBE_MAGIC, 5, 2, 0, 0, &secret));
        let probe_wrong = send(&hello_of(LINK_PROBE_MAGIC, 5, 2, 0, 1, &secret));
        let link = send(&link_hello(5, 2, 1, 0, &secret));
        std::thread::sleep(Duration::from_millis(50));
        let none = block_on(door.serve(&expect, None, d(), None)).unwrap();
        assert!(none.is_empty());
        let answer = |s: &TcpStream| {
            let mut b = [0u8; 1];
            block_on(addr::read_exact_until(s, &mut b, Instant::now() + Duration::from_millis(300), None)).map(|_| b[0])
        };
        assert!(answer(&stale).is_err_and(|e| e.kind() != io::ErrorKind::TimedOut), "a stale hello must be refused");
        assert_eq!(answer(&probe_ok).unwrap(), 1);
        assert!(answer(&probe_wrong).is_err_and(|e| e.kind() != io::ErrorKind::TimedOut));
        assert_eq!(answer(&link).unwrap_err().kind(), io::ErrorKind::TimedOut, "held, not answered yet");
        let mut taken = vec![false; 3];
        let got = block_on(door.serve(&expect, Some(&mut taken), d(), None)).unwrap();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(answer(&link).unwrap(), 1);

        // Probes from rank 0 of a 3-rank world: rank 1's door is served, rank 2's port closed.
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let a1 = l1.local_addr().unwrap();
        let a2 = {
            let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
            l2.local_addr().unwrap()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut door = Door::new(l1).unwrap();
                let secret = [3u8; 32];
                let e =
                    Expect { name: "w", world_id: 5, generation: 2, secret: &secret, rank: 1, size: 3, listeners: &[] };
                while !stop.load(crate::sys::sync::Ordering::Acquire) {
                    block_on(door.wait(Instant::now() + Duration::from_millis(10)));
                    block_on(door.serve(&e, None, Instant::now() + Duration::from_secs(5), None)).unwrap();
                }
            })
        };
        let listeners = [None, Some(a1), Some(a2)];
        let from0 =
            Expect { name: "w", world_id: 5, generation: 2, secret: &secret, rank: 0, size: 3, listeners: &listeners };
        let mut probed = 0;
        assert_eq!(block_on(probe(&from0, &[false; 3], &mut probed, d(), None)), None, "rank 1 is there");
        assert_eq!(probed, 1);
        let gone = block_on(probe(&from0, &[false; 3], &mut probed, d(), None)).expect("rank 2 is gone");
        assert!(gone.contains("rank 2 left the formation"), "{gone}");
        stop.store(true, crate::sys::sync::Ordering::Release);
        server.join().unwrap();
    }

    /// While its table is incomplete a rank holds every honest link hello, past the limit on
    /// pending connections too (they count once per rank, and strangers go first), and
    /// refuses a second hello from a rank it holds one from.
    #[test]
    fn held_link_hellos_outlast_the_pending_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let mut door = Door::new(listener).unwrap();
        let secret = [3u8; 32];
        let d = || Instant::now() + Duration::from_secs(5);
        let size = MAX_PENDING + 40;
        let expect = Expect { name: "w", world_id: 5, generation: 2, secret: &secret, rank: 0, size, listeners: &[] };
        let mut conns = Vec::new();
        for from in 1..size {
            let s = TcpStream::connect(at).unwrap();
            block_on(addr::send_msg(&s, &link_hello(5, 2, from, 0, &secret), d(), None)).unwrap();
            conns.push(s);
            if from % 16 == 0 {
                std::thread::sleep(Duration::from_millis(20));
                block_on(door.serve(&expect, None, d(), None)).unwrap();
            }
        }
        let again = TcpStream::connect(at).unwrap();
        block_on(addr::send_msg(&again, &link_hello(5, 2, 1, 0, &secret), d(), None)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        block_on(door.serve(&expect, None, d(), None)).unwrap();
        let mut b = [0u8; 1];
        let r = block_on(addr::read_exact_until(&again, &mut b, Instant::now() + Duration::from_secs(2), None));
        assert!(r.is_err_and(|e| e.kind() != io::ErrorKind::TimedOut), "a second hello from rank 1 must be refused");
        let mut taken = vec![false; size];
        let got = block_on(door.serve(&expect, Some(&mut taken), d(), None)).unwrap();
        assert_eq!(got.len(), size - 1);
        for s in &conns {
            block_on(addr::read_exact_until(s, &mut b, d(), None)).unwrap();
            assert_eq!(b[0], 1);
        }
    }

    /// A rank still waiting for a lower rank's answer (here one that never answers) answers a
    /// probe from that lower rank, so it is not taken for gone; abandoning the formation then
    /// ends its wait.
    #[test]
    fn a_rank_busy_connecting_answers_probes() {
        let lower = TcpListener::bind("127.0.0.1:0").unwrap();
        let mine = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a0, a1) = (lower.local_addr().unwrap(), mine.local_addr().unwrap());
        let secret = vec![3u8; 32];
        let cancel = Arc::new(AtomicBool::new(false));
        let spec = JoinSpec {
            name: "w".into(),
            rank: 1,
            size: 2,
            rendezvous: Rendezvous::Address(String::new()),
            secret: secret.clone(),
            interface: None,
            auto: false,
            rdma: false,
            generation: 2,
            timeout: Duration::from_secs(30),
            cancel: cancel.clone(),
            socket_buffer: None,
        };
        let table = Table {
            generation: 2,
            world_id: 5,
            peers: vec![(a0.to_string(), "h".into(), "d".into()), (a1.to_string(), "h".into(), "d".into())],
            lanes: Vec::new(),
        };
        let door = Door::new(mine).unwrap();
        let key = secret.clone();
        let busy = std::thread::spawn(move || {
            let mut fallbacks = 0;
            let end = Instant::now() + Duration::from_secs(30);
            block_on(connect_links(&spec, &table, &key, door, end, &mut fallbacks, None)).map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(200));
        let d = Instant::now() + Duration::from_secs(5);
        let s = TcpStream::connect(a1).unwrap();
        block_on(addr::send_msg(&s, &hello_of(LINK_PROBE_MAGIC, 5, 2, 0, 1, &secret), d, None)).unwrap();
        let mut b = [0u8; 1];
        block_on(addr::read_exact_until(&s, &mut b, d, None)).expect("a busy rank answers a probe");
        assert_eq!(b[0], 1);
        cancel.store(true, crate::sys::sync::Ordering::Release);
        assert!(busy.join().unwrap().is_err());
        drop(lower);
    }
}
