//! The rendezvous root: collects every rank's hello (secret, name, rank, size,
//! listener address, host identity, proposed generation) and answers each with the table of
//! all ranks, a fresh world id and the generation. It serves one formation and ends; a
//! stranger's connection costs it one descriptor until its hello grace passes.

use super::*;
use crate::sys::sync::{lock, Mutex};
use crate::sys::{Epoll, EventFd};
use std::collections::HashMap;

pub(super) const HELLO_MAGIC: u32 = 0x4D57_4231; // "MWB1"
pub(super) const PROTOCOL_VERSION: u32 = 4;

/// A connection must say hello within this time, or the root drops it.
pub(super) const HELLO_GRACE: Duration = Duration::from_secs(5);

/// The most ranks a world may have. Every size is checked against it before anything is sized
/// by it: a hello from a stranger that knows the secret must not make the root allocate what
/// it claims. The table of addresses of a world this large still fits one formation message.
pub(crate) const MAX_WORLD_SIZE: usize = 8192;

/// How long a root made by `UniqueId::new` waits for its first rank.
pub(super) const ROOT_IDLE_LIFETIME: Duration = Duration::from_secs(600);

/// A rank's hello to the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub secret: Vec<u8>,
    pub name: String,
    pub rank: u32,
    pub size: u32,
    pub generation: u32,
    pub addr: String,
    pub host: String,
    pub timeout_ms: u64,
    /// This rank's door (`door_address`), kept by its world for elastic calls.
    pub door: String,
    /// Non-zero: the formation this hello joins through a door (the root it is handed to).
    pub key: u64,
    /// What the rank is doing, in words (`"split of world 'w' by colour 1"`): a door root
    /// fails the formation for every rank when one says something else than its leader.
    pub agree: String,
    /// This rank's offer of lanes of its parent's links (`lanes::Offer`, encoded; empty: none).
    /// When every rank sent one the table carries them all and a second round follows.
    pub lanes: Vec<u8>,
}

impl Hello {
    pub(super) fn encode(&self) -> Vec<u8> {
        MsgWriter::new()
            .u32(HELLO_MAGIC)
            .u32(PROTOCOL_VERSION)
            .bytes(&self.secret)
            .str(&self.name)
            .u32(self.rank)
            .u32(self.size)
            .u32(self.generation)
            .str(&self.addr)
            .str(&self.host)
            .u64(self.timeout_ms)
            .str(&self.door)
            .u64(self.key)
            .str(&self.agree)
            .bytes(&self.lanes)
            .finish()
    }

    pub(super) fn decode(b: &[u8]) -> std::result::Result<Hello, String> {
        let mut r = MsgReader::new(b);
        if r.u32()? != HELLO_MAGIC {
            return Err("not a multiworld hello".into());
        }
        let v = r.u32()?;
        if v != PROTOCOL_VERSION {
            return Err(format!("protocol version {v}, expected {PROTOCOL_VERSION}"));
        }
        let h = Hello {
            secret: r.bytes()?.to_vec(),
            name: r.str()?.to_owned(),
            rank: r.u32()?,
            size: r.u32()?,
            generation: r.u32()?,
            addr: r.str()?.to_owned(),
            host: r.str()?.to_owned(),
            timeout_ms: r.u64()?,
            door: r.str()?.to_owned(),
            key: r.u64()?,
            agree: r.str()?.to_owned(),
            lanes: r.bytes()?.to_vec(),
        };
        r.end()?;
        Ok(h)
    }
}

/// What the root tells every rank once all are present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Table {
    pub generation: u32,
    pub world_id: u64,
    /// Listener address, host identity and door of each rank.
    pub peers: Vec<(String, String, String)>,
    /// Each rank's offer of lanes (`Hello::lanes`, empty where it made none), when one rank
    /// made one; else empty.
    pub lanes: Vec<Vec<u8>>,
}

pub(super) fn encode_table(t: &Table) -> Vec<u8> {
    let mut w = MsgWriter::new().u8(0).u32(t.generation).u64(t.world_id).u32(t.peers.len() as u32);
    for (a, h, d) in &t.peers {
        w = w.str(a).str(h).str(d);
    }
    w = w.u32(t.lanes.len() as u32);
    for l in &t.lanes {
        w = w.bytes(l);
    }
    w.finish()
}

/// A root's answer as read: what it says (or its refusal), or why it cannot be read.
pub(super) type RootReply<T> = std::result::Result<std::result::Result<T, Error>, String>;

/// The second round of a formation on lanes: each rank's code (`lanes::CODE_*`), in rank order.
pub(super) fn encode_codes(codes: &[u8]) -> Vec<u8> {
    MsgWriter::new().u8(0).bytes(codes).finish()
}

/// The answer to the second round: every rank's code, or the root's refusal.
pub(super) fn decode_codes(b: &[u8]) -> RootReply<Vec<u8>> {
    let mut r = MsgReader::new(b);
    match r.u8()? {
        0 => {
            let codes = r.bytes()?.to_vec();
            r.end()?;
            Ok(Ok(codes))
        }
        code => Ok(Err(refusal(code, &mut r)?)),
    }
}

/// A refusal's error, from its code and message.
fn refusal(code: u8, r: &mut MsgReader<'_>) -> std::result::Result<Error, String> {
    let kind = match code {
        1 => ErrorKind::InvalidArgument,
        2 => ErrorKind::InvalidUsage,
        3 => ErrorKind::Timeout,
        _ => ErrorKind::System,
    };
    Ok(Error::new(kind, r.str()?.to_owned()))
}

pub(super) fn encode_refusal(kind: ErrorKind, msg: &str) -> Vec<u8> {
    let code = match kind {
        ErrorKind::InvalidArgument => 1,
        ErrorKind::InvalidUsage => 2,
        ErrorKind::Timeout => 3,
        _ => 4,
    };
    MsgWriter::new().u8(code).str(msg).finish()
}

pub(super) fn decode_reply(b: &[u8]) -> RootReply<Table> {
    let mut r = MsgReader::new(b);
    match r.u8()? {
        0 => {
            let generation = r.u32()?;
            let world_id = r.u64()?;
            let n = r.u32()? as usize;
            if n > MAX_MESSAGE / 8 {
                return Err(format!("table of {n} ranks"));
            }
            let mut peers = Vec::with_capacity(n);
            for _ in 0..n {
                peers.push((r.str()?.to_owned(), r.str()?.to_owned(), r.str()?.to_owned()));
            }
            let m = r.u32()? as usize;
            if m != 0 && m != n {
                return Err(format!("table of {n} ranks with {m} lane offers"));
            }
            let mut lanes = Vec::with_capacity(m);
            for _ in 0..m {
                lanes.push(r.bytes()?.to_vec());
            }
            r.end()?;
            Ok(Ok(Table { generation, world_id, peers, lanes }))
        }
        code => Ok(Err(refusal(code, &mut r)?)),
    }
}

/// How a root behaves.
#[derive(Debug, Clone)]
pub(crate) struct RootConfig {
    secret: Vec<u8>,
    /// The world name and size the root serves, when known in advance (address form).
    expect: Option<(String, u32)>,
    /// Final deadline, when known in advance (address form); else the first rank's.
    deadline: Option<Instant>,
    /// The formation of the rank that runs this root (address form): abandoning it ends the
    /// root too.
    cancel: Option<Arc<AtomicBool>>,
    /// A root behind the process's door: the key its hellos carry, and what its leader does
    /// (every rank must say the same).
    door: Option<(u64, String)>,
}

impl RootConfig {
    pub(crate) fn for_id(secret: [u8; crate::api::id::SECRET_LEN]) -> RootConfig {
        RootConfig { secret: secret.to_vec(), expect: None, deadline: None, cancel: None, door: None }
    }

    pub(crate) fn for_address(secret: Vec<u8>, name: &str, size: u32, deadline: Instant) -> RootConfig {
        RootConfig { secret, expect: Some((name.to_owned(), size)), deadline: Some(deadline), cancel: None, door: None }
    }

    /// A root served behind the process's door, for hellos that carry `key` and `agree`.
    pub(crate) fn for_door(
        secret: Vec<u8>,
        name: &str,
        size: u32,
        deadline: Instant,
        key: u64,
        agree: &str,
    ) -> RootConfig {
        RootConfig { door: Some((key, agree.to_owned())), ..RootConfig::for_address(secret, name, size, deadline) }
    }

    pub(crate) fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> RootConfig {
        self.cancel = Some(cancel);
        self
    }
}

/// Starts a root on `listener` (or, with none, behind the process's door: see
/// [`door_address`]), served by the process's root thread (`mw-roots`, started with the first
/// root); it ends when the world has formed or its deadline passes.
pub(crate) fn spawn_root(listener: Option<TcpListener>, cfg: RootConfig) -> Result<RootHandle> {
    if let Some(l) = &listener {
        l.set_nonblocking(true).map_err(|e| Error::system("root listener", e))?;
    }
    let (done, rx) = std::sync::mpsc::channel();
    let root = Root::new(listener, cfg, done);
    let server = roots()?;
    lock(&server.inbox).push(root);
    server.wake.signal();
    Ok(RootHandle(rx))
}

/// The address of this process's **door** on `ip`: one listener per local address, opened
/// the first time a world is formed on it and kept for the life of the process, served by the
/// roots thread. Every rank tells its world its door; later, one rank of the world leads an
/// elastic formation (split, dup, shrink) by putting a root behind its door, and the others
/// reach it there, even once the world itself is broken. A connection that comes before its
/// root waits in the door's lobby.
pub(crate) fn door_address(ip: IpAddr) -> Result<SocketAddr> {
    static DOORS: std::sync::OnceLock<Mutex<HashMap<IpAddr, SocketAddr>>> = std::sync::OnceLock::new();
    let mut doors = lock(DOORS.get_or_init(|| Mutex::new(HashMap::new())));
    if let Some(a) = doors.get(&ip) {
        return Ok(*a);
    }
    let failed = |e| Error::system(format!("opening this process's door on {ip}"), e);
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).map_err(failed)?;
    listener.set_nonblocking(true).map_err(failed)?;
    let a = listener.local_addr().map_err(failed)?;
    let server = roots()?;
    lock(&server.doors).push(listener);
    server.wake.signal();
    doors.insert(ip, a);
    Ok(a)
}

/// Says when a root has ended (and closed its listener).
pub(crate) struct RootHandle(std::sync::mpsc::Receiver<()>);

impl RootHandle {
    /// Waits until the root has ended (it holds the sender until it is dropped, after its
    /// listener): a look every 2 ms, since a root ends once its table is out, within moments
    /// of the last rank's hello.
    pub(crate) async fn ended(self) {
        while matches!(self.0.try_recv(), Err(std::sync::mpsc::TryRecvError::Empty)) {
            exec::sleep_until(Instant::now() + Duration::from_millis(2)).await;
        }
    }
}

/// The roots of this process, all served by one thread: a root spends its life waiting for
/// hellos, so a thousand formations in flight need one thread, not a thousand.
struct Roots {
    inbox: Mutex<Vec<Root>>,
    /// New doors, for the thread to watch.
    doors: Mutex<Vec<TcpListener>>,
    wake: EventFd,
}

/// The key of the roots thread's own wake-up descriptor in its `epoll` set.
const WAKE_KEY: u64 = 0;

/// The roots thread, started with the first root (`sys::service`).
fn roots() -> Result<Arc<Roots>> {
    static ROOTS: std::sync::OnceLock<Mutex<Option<Arc<Roots>>>> = std::sync::OnceLock::new();
    sys::service(&ROOTS, WAKE_KEY, |wake, epoll| {
        let server = Arc::new(Roots { inbox: Mutex::new(Vec::new()), doors: Mutex::new(Vec::new()), wake });
        let me = server.clone();
        std::thread::Builder::new().name("mw-roots".into()).spawn(move || serve_roots(&me, epoll))?;
        Ok(server)
    })
    .map_err(|e| Error::system("starting the rendezvous thread", e))
}

/// The roots thread: every root's listener and connections in one `epoll` set, each under
/// its root's key, and the doors with their lobbies, each under a key with [`DOOR_BIT`]; a
/// root takes a turn when one of them reports or its time comes.
fn serve_roots(server: &Roots, epoll: Epoll) {
    let mut live: HashMap<u64, Root> = HashMap::new();
    let mut doors: Vec<Door> = Vec::new();
    // Door formations that failed, until their deadline: ranks still to come hear why.
    let mut failed: HashMap<u64, Failed> = HashMap::new();
    let mut next_key = WAKE_KEY;
    let mut keys = Vec::new();
    loop {
        for listener in lock(&server.doors).drain(..) {
            let key = DOOR_BIT | doors.len() as u64;
            let paused = (listener_watch_failed(&epoll, &listener, key)).then(|| Instant::now() + PAUSE);
            doors.push(Door { listener, lobby: Vec::new(), key, paused });
        }
        let mut fresh = false;
        for mut r in lock(&server.inbox).drain(..) {
            next_key += 1;
            r.key = next_key;
            if let Some(l) = &r.listener {
                if let Err(e) = epoll.watch(l.as_raw_fd(), libc::POLLIN, r.key) {
                    warn!("rendezvous: cannot watch a root's listener: {e}");
                    continue;
                }
            }
            // A new root looks at once: its listener may already hold connections, or a
            // door's lobby.
            keys.push(r.key);
            if let Some((dk, _)) = &r.cfg.door {
                // A new attempt under a key that failed before: its ranks wait for it.
                failed.remove(dk);
                fresh = true;
            }
            live.insert(r.key, r);
        }
        if fresh {
            doors.iter_mut().for_each(|d| d.hand_over(&mut live, &epoll, &mut keys));
        }
        let wake_at = live.values().map(|r| r.wake_at()).chain(doors.iter().map(|d| d.wake_at())).min();
        if keys.is_empty() {
            epoll.wait(&mut keys, wake_at);
        }
        server.wake.drain();
        let now = Instant::now();
        keys.extend(live.values().filter(|r| now >= r.wake_at()).map(|r| r.key));
        keys.extend(doors.iter().filter(|d| now >= d.wake_at()).map(|d| d.key));
        // Doors first: what they hand over is read in the same round.
        keys.sort_unstable_by_key(|k| (k & DOOR_BIT == 0, *k));
        keys.dedup();
        let mut i = 0;
        while i < keys.len() {
            let k = keys[i];
            i += 1;
            if k & DOOR_BIT != 0 {
                if let Some(d) = doors.get_mut((k & !DOOR_BIT) as usize) {
                    d.turn(&epoll);
                    d.hand_over(&mut live, &epoll, &mut keys);
                }
            } else if let Some(r) = live.get_mut(&k) {
                if r.turn(&epoll) {
                    if let (Some((dk, _)), Some((kind, msg))) = (&r.cfg.door, &r.failure) {
                        failed.insert(*dk, Failed { kind: *kind, msg: msg.clone(), until: r.deadline });
                    }
                    live.remove(&k);
                }
            }
        }
        keys.clear();
        if !failed.is_empty() {
            doors.iter_mut().for_each(|d| d.refuse_failed(&failed));
            failed.retain(|_, f| f.until > now);
        }
    }
}

/// Keys of doors in the roots thread's `epoll` set have this bit (roots count up from 1).
const DOOR_BIT: u64 = 1 << 63;
/// The most connections a door's lobby holds: beyond, the oldest that has not said a whole
/// hello yet is dropped (else the oldest).
const LOBBY_MAX: usize = 1024;
/// The largest hello a door reads: a hello's fields are short, but its `agree` names the ranks
/// a shrink excludes.
const DOOR_HELLO_MAX: usize = 64 << 10;
/// The longest a hello waits in a lobby for its root (its own deadline, if shorter): a rank
/// whose leader comes later than that can say hello again.
const LOBBY_WAIT_MAX: Duration = Duration::from_secs(120);
/// How long a listener whose accept failed (no descriptor to spare) is left unwatched.
const PAUSE: Duration = Duration::from_secs(1);

/// A door formation that failed: how to answer, and until when.
struct Failed {
    kind: ErrorKind,
    msg: String,
    until: Instant,
}

/// A complete hello in a lobby: the formation it joins, and until when it waits.
struct Waiting {
    key: u64,
    until: Instant,
}

/// One door: its listener and the connections whose root is not there yet.
struct Door {
    listener: TcpListener,
    lobby: Vec<(Conn, Option<Waiting>)>,
    key: u64,
    /// Accepting failed (no descriptor to spare): not watched until then.
    paused: Option<Instant>,
}

/// Watches a door's listener; true if that failed (then it is looked at again after a pause).
fn listener_watch_failed(epoll: &Epoll, listener: &TcpListener, key: u64) -> bool {
    match epoll.watch(listener.as_raw_fd(), libc::POLLIN, key) {
        Ok(()) => false,
        Err(e) => {
            warn!("rendezvous: cannot watch this process's door now ({e}); looking again in a moment");
            true
        }
    }
}

impl Door {
    fn wake_at(&self) -> Instant {
        let lobby = self.lobby.iter().map(|(c, w)| w.as_ref().map_or(c.since + HELLO_GRACE, |w| w.until)).min();
        match (self.paused, lobby) {
            (Some(p), Some(l)) => p.min(l),
            (p, l) => p.or(l).unwrap_or_else(|| Instant::now() + ROOT_IDLE_LIFETIME),
        }
    }

    /// Accepts and reads hellos; drops connections past their time.
    fn turn(&mut self, epoll: &Epoll) {
        let now = Instant::now();
        let mut paused = false;
        if self.paused.is_some_and(|p| now >= p) {
            // Back from a pause: watched again (added, if the first watch had failed).
            paused = epoll.rewatch(self.listener.as_raw_fd(), libc::POLLIN, self.key).is_err()
                && listener_watch_failed(epoll, &self.listener, self.key);
            self.paused = None;
        }
        if self.paused.is_none() && !paused {
            for c in accept_all(&self.listener, &mut paused, epoll, self.key) {
                if self.lobby.len() >= LOBBY_MAX {
                    let i = self.lobby.iter().position(|(_, w)| w.is_none()).unwrap_or(0);
                    let (old, _) = self.lobby.remove(i);
                    warn!("rendezvous: door lobby full, dropped {}", old.peer);
                }
                self.lobby.push((c, None));
            }
        }
        if paused {
            self.paused = Some(now + PAUSE);
        }
        self.lobby.retain_mut(|(c, waiting)| {
            if let Some(w) = waiting {
                if now >= w.until {
                    refuse(c, ErrorKind::Timeout, "nobody led this formation at this door in time");
                    return false;
                }
                // A hello waiting for its root: anything more from it is a hang-up or garbage.
                return matches!(read_message(c), Message::Pending);
            }
            if c.buf.len() > 4 + DOOR_HELLO_MAX {
                return false;
            }
            match read_message(c) {
                Message::Pending => c.since + HELLO_GRACE > now && c.buf.len() <= 4 + DOOR_HELLO_MAX,
                Message::Closed => false,
                Message::Complete => match Hello::decode(&c.buf[4..]) {
                    Ok(h) if h.key != 0 => {
                        let wait = Duration::from_millis(h.timeout_ms).min(LOBBY_WAIT_MAX);
                        *waiting = Some(Waiting { key: h.key, until: now + wait });
                        true
                    }
                    _ => {
                        warn!("rendezvous: the door refused {}: not a hello for a door", c.peer);
                        false
                    }
                },
            }
        });
    }

    /// Tells the lobby's ranks of a failed formation why it failed, and lets them go.
    fn refuse_failed(&mut self, failed: &HashMap<u64, Failed>) {
        self.lobby.retain(|(c, waiting)| match waiting.as_ref().and_then(|w| failed.get(&w.key)) {
            Some(f) => {
                refuse(c, f.kind, &f.msg);
                false
            }
            None => true,
        });
    }

    /// Gives every complete hello whose root is live to that root (whose key then takes a
    /// turn).
    fn hand_over(&mut self, live: &mut HashMap<u64, Root>, epoll: &Epoll, turn: &mut Vec<u64>) {
        let mut i = 0;
        while i < self.lobby.len() {
            let Some(k) = self.lobby[i].1.as_ref().map(|w| w.key) else {
                i += 1;
                continue;
            };
            let Some(r) = live.values_mut().find(|r| r.cfg.door.as_ref().is_some_and(|(dk, _)| *dk == k)) else {
                i += 1;
                continue;
            };
            let (c, _) = self.lobby.remove(i);
            if epoll.rewatch(c.s.as_raw_fd(), libc::POLLIN | libc::POLLRDHUP, r.key).is_ok() {
                r.conns.push(c);
                turn.push(r.key);
            }
        }
    }
}

pub(super) struct Conn {
    s: TcpStream,
    peer: String,
    buf: Vec<u8>,
    hello: Option<Hello>,
    since: Instant,
}

/// Accepts every connection waiting on `listener` and watches it under `key`. When accepting
/// fails (no descriptor to spare), the listener stays readable: it is not watched (`paused`)
/// until the next look, so as not to spin on it.
fn accept_all(listener: &TcpListener, paused: &mut bool, epoll: &Epoll, key: u64) -> Vec<Conn> {
    if *paused {
        *paused = epoll.rewatch(listener.as_raw_fd(), libc::POLLIN, key).is_err();
    }
    let mut conns = Vec::new();
    loop {
        match listener.accept() {
            Ok((s, a)) => {
                if s.set_nonblocking(true).is_ok()
                    && epoll.watch(s.as_raw_fd(), libc::POLLIN | libc::POLLRDHUP, key).is_ok()
                {
                    conns.push(Conn::new(s, a));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                warn!("rendezvous: cannot accept a connection now ({e}); looking again in a moment");
                *paused = epoll.rewatch(listener.as_raw_fd(), 0, key).is_ok();
                break;
            }
        }
    }
    conns
}

impl Conn {
    fn new(s: TcpStream, a: SocketAddr) -> Conn {
        Conn { s, peer: a.to_string(), buf: Vec::new(), hello: None, since: Instant::now() }
    }
}

pub(super) fn refuse(c: &Conn, kind: ErrorKind, msg: &str) {
    let _ = addr::send_now(&c.s, &encode_refusal(kind, msg));
}

/// What to do with a connection after reading from it.
pub(super) enum Outcome {
    Keep,
    Drop,
    /// The formation cannot succeed: tell everyone.
    FailAll(ErrorKind, String),
}

/// One rendezvous in progress: its listener, the connections that came, what it knows of the
/// world so far.
struct Root {
    /// None: behind the process's door.
    listener: Option<TcpListener>,
    cfg: RootConfig,
    conns: Vec<Conn>,
    deadline: Instant,
    expect: Option<(String, u32)>,
    /// Ranks that said hello and then went away before the world formed.
    left: Vec<u32>,
    /// When the last turn was taken plus the step between looks.
    next_look: Instant,
    /// Its key in the roots thread's `epoll` set.
    key: u64,
    /// Its listener is not watched (accepting failed) until its next turn.
    listener_paused: bool,
    /// Why it failed, if it did: a door root's ranks that come later are told the same.
    failure: Option<(ErrorKind, String)>,
    /// After a table with lane offers: each rank's code of the second round, as they come
    /// (those that offered none: "none" from the start); and how many connections (those of
    /// the ranks that offered) take part in it.
    codes: Option<Vec<Option<u8>>>,
    members: usize,
    /// Dropped last, after the listener: then [`RootHandle::join`] returns.
    _done: std::sync::mpsc::Sender<()>,
}

impl Root {
    fn new(listener: Option<TcpListener>, cfg: RootConfig, done: std::sync::mpsc::Sender<()>) -> Root {
        let deadline = cfg.deadline.unwrap_or_else(|| Instant::now() + ROOT_IDLE_LIFETIME);
        let expect = cfg.expect.clone();
        // A new root looks at once (its listener may already hold connections).
        let next_look = Instant::now();
        Root {
            listener,
            cfg,
            conns: Vec::new(),
            deadline,
            expect,
            left: Vec::new(),
            next_look,
            key: 0,
            listener_paused: false,
            failure: None,
            codes: None,
            members: 0,
            _done: done,
        }
    }

    /// When to look again with nothing reported: the deadline, or sooner to notice an
    /// abandoned formation or a connection past its hello grace.
    fn wake_at(&self) -> Instant {
        self.deadline.min(self.next_look)
    }

    fn fail_all(&mut self, kind: ErrorKind, msg: &str) {
        warn!("rendezvous failed: {msg}");
        self.failure = Some((kind, msg.to_owned()));
        // Also the hellos not read yet (a door hands a connection over with its hello whole).
        for c in self.conns.iter().filter(|c| c.hello.is_some() || message_complete(&c.buf)) {
            refuse(c, kind, msg);
        }
    }

    /// Accepts and reads what there is (new connections are watched in `epoll` under the
    /// root's key); true once the root is done (formed, failed, timed out or abandoned).
    fn turn(&mut self, epoll: &Epoll) -> bool {
        let now = Instant::now();
        let step = if self.cfg.cancel.is_some() { addr::CANCEL_CHECK } else { Duration::from_secs(1) };
        self.next_look = now + step;
        if addr::is_cancelled(self.cfg.cancel.as_deref()) {
            info!("rendezvous: the formation that runs this root was abandoned");
            return true;
        }
        if now >= self.deadline {
            let (name, size) = self.expect.clone().unwrap_or_default();
            let msg = match &self.codes {
                // The table went out: who did not answer the second round.
                Some(codes) => {
                    let late: Vec<usize> = (0..codes.len()).filter(|r| codes[*r].is_none()).collect();
                    format!("world '{name}' did not form in time: ranks {late:?} of {size} did not answer the second round (lanes)")
                }
                None => {
                    let present: Vec<u32> =
                        self.conns.iter().filter_map(|c| c.hello.as_ref().map(|h| h.rank)).collect();
                    missing_ranks(&name, size, &present, &self.left)
                }
            };
            self.fail_all(ErrorKind::Timeout, &msg);
            return true;
        }
        if self.codes.is_some() {
            return self.second_round(epoll);
        }
        if let Some(l) = &self.listener {
            self.conns.extend(accept_all(l, &mut self.listener_paused, epoll, self.key));
        }
        // Input from the connections (a few per root: reading one with nothing to say costs
        // a call that finds nothing).
        let mut i = 0;
        while i < self.conns.len() {
            let claimed: Vec<u32> = self
                .conns
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .filter_map(|(_, c)| c.hello.as_ref().map(|h| h.rank))
                .collect();
            let mut outcome = read_conn(&mut self.conns[i], &self.cfg, &self.expect, &claimed);
            let c = &self.conns[i];
            if matches!(outcome, Outcome::Keep) && c.hello.is_none() && c.since.elapsed() > HELLO_GRACE {
                warn!("rendezvous: dropped {} (no hello within {:?})", c.peer, HELLO_GRACE);
                outcome = Outcome::Drop;
            }
            match outcome {
                Outcome::Keep => {
                    if let Some(h) = &self.conns[i].hello {
                        if self.expect.is_none() {
                            // The first rank fixes name and size, and the deadline.
                            self.expect = Some((h.name.clone(), h.size));
                            self.deadline =
                                Instant::now() + Duration::from_millis(h.timeout_ms) + Duration::from_secs(1);
                        }
                    }
                    i += 1;
                }
                Outcome::Drop => {
                    if let Some(h) = &self.conns[i].hello {
                        self.left.push(h.rank);
                    }
                    self.conns.remove(i);
                }
                Outcome::FailAll(kind, msg) => {
                    self.fail_all(kind, &msg);
                    refuse(&self.conns[i], kind, &msg);
                    return true;
                }
            }
        }
        // Everyone here?
        let Some((name, size)) = &self.expect else { return false };
        let mut table: Vec<Option<&Hello>> = vec![None; *size as usize];
        for h in self.conns.iter().filter_map(|c| c.hello.as_ref()) {
            table[h.rank as usize] = Some(h);
        }
        if !table.iter().all(|t| t.is_some()) {
            return false;
        }
        let hellos: Vec<&Hello> = table.into_iter().flatten().collect();
        // One offer of lanes is enough for a second round: a `grow`'s newcomers have none, and
        // its members may still link to each other on lanes.
        let on_lanes = hellos.iter().any(|h| !h.lanes.is_empty());
        let t = Table {
            generation: hellos.iter().map(|h| h.generation).max().unwrap_or(1),
            world_id: sys::random_u64(),
            peers: hellos.iter().map(|h| (h.addr.clone(), h.host.clone(), h.door.clone())).collect(),
            lanes: if on_lanes { hellos.iter().map(|h| h.lanes.clone()).collect() } else { Vec::new() },
        };
        let msg = encode_table(&t);
        // The ranks that offered no lanes have no use for the offers (pids, descriptor numbers):
        // they get the table without them.
        let bare = if on_lanes { encode_table(&Table { lanes: Vec::new(), ..t.clone() }) } else { Vec::new() };
        for c in self.conns.iter() {
            let Some(h) = &c.hello else { continue };
            let m = if on_lanes && h.lanes.is_empty() { &bare } else { &msg };
            if let Err(e) = addr::send_now(&c.s, m) {
                warn!("rendezvous: world '{name}': the table did not go to {}: {e}", c.peer);
            }
        }
        info!("rendezvous: world '{name}' of {size} ranks formed, generation {}", t.generation);
        if on_lanes {
            // Only the ranks that offered lanes stay: each sends one byte, its code, and gets
            // them all. The others (a `grow`'s newcomers) have no part in it: their code is
            // "none", and they go on to connect their links at once.
            let mut codes = vec![None; *size as usize];
            for h in self.conns.iter().filter_map(|c| c.hello.as_ref()).filter(|h| h.lanes.is_empty()) {
                codes[h.rank as usize] = Some(super::lanes::CODE_NONE);
            }
            self.conns.retain(|c| c.hello.as_ref().is_some_and(|h| !h.lanes.is_empty()));
            self.members = self.conns.len();
            self.codes = Some(codes);
            // Nobody else joins now: an id root's listener closes (a connection left waiting on
            // it would report for ever while the round waits, keeping this thread busy).
            self.listener = None;
            return self.second_round(epoll);
        }
        true
    }

    /// The second round of a formation on lanes: reads each member's code (one byte; a member
    /// that went away counts as failed) and, once all are in, sends them all to every member.
    fn second_round(&mut self, epoll: &Epoll) -> bool {
        // A hello handed over by a door after the table (same key, a rank already present):
        // the world formed without it.
        for c in self.conns.drain(self.members.min(self.conns.len())..) {
            refuse(&c, ErrorKind::InvalidUsage, "this rank's place in the world is taken (it formed already)");
        }
        let Some(codes) = self.codes.as_mut() else { return true };
        for c in &self.conns {
            let Some(rank) = c.hello.as_ref().map(|h| h.rank as usize) else { continue };
            if codes.get(rank).is_none_or(|k| k.is_some()) {
                continue;
            }
            let mut b = [0u8; 1];
            match addr::recv_now(&c.s, &mut b) {
                Ok(1) => codes[rank] = Some(b[0]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
                _ => codes[rank] = Some(super::lanes::CODE_FAILED),
            }
            // Its code is in: the connection is not watched any more (level-triggered, a
            // closed one would report for ever), only written to once all are in.
            let _ = epoll.rewatch(c.s.as_raw_fd(), 0, self.key);
        }
        if codes.iter().any(Option::is_none) {
            return false;
        }
        let all: Vec<u8> = codes.iter().map(|k| k.unwrap_or(0)).collect();
        let msg = encode_codes(&all);
        for c in &self.conns {
            let _ = addr::send_now(&c.s, &msg);
        }
        true
    }
}

/// What the root says when its deadline passes: which ranks never came, and which came and
/// went away again.
pub(super) fn missing_ranks(name: &str, size: u32, present: &[u32], left: &[u32]) -> String {
    let missing: Vec<u32> = (0..size).filter(|r| !present.contains(r) && !left.contains(r)).collect();
    let mut gone: Vec<u32> = left.iter().copied().filter(|r| !present.contains(r)).collect();
    gone.sort_unstable();
    gone.dedup();
    let mut msg = format!("world '{name}' did not form in time:");
    if !missing.is_empty() {
        msg += &format!(" ranks {missing:?} of {size} never arrived");
    }
    if !gone.is_empty() {
        msg += &format!("{} ranks {gone:?} arrived and left", if missing.is_empty() { "" } else { ";" });
    }
    msg
}

/// Where reading one length-prefixed message from a connection stands.
enum Message {
    Pending,
    /// `buf` holds the whole message (and its length).
    Complete,
    /// Closed, or it sent too much: drop it.
    Closed,
}

fn message_complete(buf: &[u8]) -> bool {
    buf.len() >= 4 && buf.len() == 4 + u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

/// Reads what a connection has sent, up to one message.
fn read_message(c: &mut Conn) -> Message {
    let mut chunk = [0u8; 4096];
    loop {
        match (&c.s).read(&mut chunk) {
            Ok(0) => {
                if let Some(h) = &c.hello {
                    info!("rendezvous: rank {} of world '{}' left before the world formed", h.rank, h.name);
                } else if !c.buf.is_empty() {
                    warn!("rendezvous: refused {}: connection closed in the middle of its hello (truncated)", c.peer);
                }
                return Message::Closed;
            }
            Ok(n) => {
                if c.hello.is_some() || message_complete(&c.buf) {
                    warn!("rendezvous: refused {}: bytes after its hello", c.peer);
                    return Message::Closed;
                }
                c.buf.extend_from_slice(&chunk[..n]);
                if c.buf.len() >= 4 {
                    let len = u32::from_le_bytes([c.buf[0], c.buf[1], c.buf[2], c.buf[3]]) as usize;
                    if len > MAX_MESSAGE {
                        warn!("rendezvous: refused {}: oversized message ({len} bytes)", c.peer);
                        return Message::Closed;
                    }
                    if c.buf.len() > 4 + len {
                        warn!("rendezvous: refused {}: bytes after its hello", c.peer);
                        return Message::Closed;
                    }
                    if c.buf.len() == 4 + len {
                        return Message::Complete;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Message::Pending,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Message::Closed,
        }
    }
}

pub(super) fn read_conn(c: &mut Conn, cfg: &RootConfig, expect: &Option<(String, u32)>, claimed: &[u32]) -> Outcome {
    // A hello read by the door before it handed the connection over.
    if c.hello.is_none() && message_complete(&c.buf) {
        if let o @ (Outcome::Drop | Outcome::FailAll(..)) = accept_hello(c, cfg, expect, claimed) {
            return o;
        }
    }
    match read_message(c) {
        Message::Pending => Outcome::Keep,
        Message::Closed => Outcome::Drop,
        Message::Complete => accept_hello(c, cfg, expect, claimed),
    }
}

pub(super) fn accept_hello(c: &mut Conn, cfg: &RootConfig, expect: &Option<(String, u32)>, claimed: &[u32]) -> Outcome {
    let h = match Hello::decode(&c.buf[4..]) {
        Ok(h) => h,
        Err(why) => {
            warn!("rendezvous: refused {}: not a valid hello ({why})", c.peer);
            return Outcome::Drop;
        }
    };
    if h.secret != cfg.secret {
        warn!("rendezvous: refused {} (rank {} of '{}'): wrong secret", c.peer, h.rank, h.name);
        refuse(c, ErrorKind::InvalidUsage, "refused: wrong secret for this world");
        return Outcome::Drop;
    }
    if let Some((_, agree)) = &cfg.door {
        if h.agree != *agree {
            return Outcome::FailAll(
                ErrorKind::InvalidUsage,
                format!("the ranks disagree: the leading rank calls {agree}, rank {} calls {}", h.rank, h.agree),
            );
        }
    }
    if h.size == 0 || h.size as usize > MAX_WORLD_SIZE || h.rank >= h.size {
        warn!("rendezvous: refused {}: rank {} of a world of {} ranks", c.peer, h.rank, h.size);
        let msg = format!("rank {} of {} ranks: a world has 1 to {MAX_WORLD_SIZE} ranks", h.rank, h.size);
        refuse(c, ErrorKind::InvalidArgument, &msg);
        return Outcome::Drop;
    }
    if let Some((name, size)) = expect {
        if &h.name != name {
            warn!("rendezvous: refused {}: it joins world '{}', this root serves '{name}'", c.peer, h.name);
            refuse(c, ErrorKind::InvalidUsage, &format!("this root serves world '{name}', not '{}'", h.name));
            return Outcome::Drop;
        }
        if h.size != *size {
            return Outcome::FailAll(
                ErrorKind::InvalidUsage,
                format!("world '{name}': rank {} says the world has {} ranks, but it has {size}", h.rank, h.size),
            );
        }
    }
    if claimed.contains(&h.rank) {
        return Outcome::FailAll(
            ErrorKind::InvalidUsage,
            format!("world '{}': two processes claim rank {}", h.name, h.rank),
        );
    }
    debug!("rendezvous: rank {} of '{}' joined from {}", h.rank, h.name, c.peer);
    c.hello = Some(h);
    Outcome::Keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_rejects_garbage() {
        let h = Hello {
            secret: vec![1, 2, 3],
            name: "w".into(),
            rank: 1,
            size: 2,
            generation: 4,
            addr: "1.2.3.4:5".into(),
            host: "h".into(),
            timeout_ms: 100,
            door: "1.2.3.4:6".into(),
            key: 9,
            agree: "dup of world 'v'".into(),
            lanes: vec![7; 24],
        };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b.push(0);
        assert!(Hello::decode(&b).is_err());
        assert!(Hello::decode(&b[..7]).is_err());
        let mut rng = crate::testutil::Rng::new(3);
        for _ in 0..20_000 {
            let mut g = vec![0u8; rng.below(64) as usize];
            rng.fill(&mut g);
            let _ = Hello::decode(&g);
            let _ = decode_reply(&g);
        }
    }

    #[test]
    fn a_root_refuses_a_hello_that_claims_a_huge_world() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let secret = [7u8; crate::api::id::SECRET_LEN];
        spawn_root(Some(listener), RootConfig::for_id(secret)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        for size in [u32::MAX, MAX_WORLD_SIZE as u32 + 1] {
            let h = Hello {
                secret: secret.to_vec(),
                name: "w".into(),
                rank: 0,
                size,
                generation: 1,
                addr: "127.0.0.1:1".into(),
                host: "h".into(),
                timeout_ms: 1000,
                door: "127.0.0.1:2".into(),
                key: 0,
                agree: String::new(),
                lanes: Vec::new(),
            };
            let s = TcpStream::connect(addr).unwrap();
            exec::block_on(addr::send_msg(&s, &h.encode(), deadline, None)).unwrap();
            let e = decode_reply(&exec::block_on(addr::recv_msg(&s, deadline, None)).unwrap()).unwrap().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{}", e.message());
        }
    }

    #[test]
    fn a_timed_out_root_tells_missing_ranks_from_ranks_that_left() {
        assert_eq!(
            missing_ranks("w", 3, &[2], &[0]),
            "world 'w' did not form in time: ranks [1] of 3 never arrived; ranks [0] arrived and left"
        );
        assert_eq!(
            missing_ranks("w", 2, &[], &[0, 0]),
            "world 'w' did not form in time: ranks [1] of 2 never arrived; ranks [0] arrived and left"
        );
        // A rank that left and came back is present.
        assert_eq!(missing_ranks("w", 2, &[0], &[0]), "world 'w' did not form in time: ranks [1] of 2 never arrived");
    }

    #[test]
    fn table_round_trips() {
        let t = Table {
            generation: 2,
            world_id: 99,
            peers: vec![("a:1".into(), "h1".into(), "d:1".into()), ("b:2".into(), "h2".into(), "d:2".into())],
            lanes: Vec::new(),
        };
        assert_eq!(decode_reply(&encode_table(&t)).unwrap().unwrap(), t);
        let with_lanes = Table { lanes: vec![vec![1, 2, 3], vec![4]], ..t.clone() };
        assert_eq!(decode_reply(&encode_table(&with_lanes)).unwrap().unwrap(), with_lanes);
        assert_eq!(decode_codes(&encode_codes(&[1, 2, 0])).unwrap().unwrap(), vec![1, 2, 0]);
        let e = decode_codes(&encode_refusal(ErrorKind::InvalidUsage, "no")).unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidUsage);
        let e = decode_reply(&encode_refusal(ErrorKind::Timeout, "late")).unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert_eq!(e.message(), "late");
    }

    /// CPU time the `mw-roots` thread of this process has used, in clock ticks.
    fn roots_thread_ticks() -> u64 {
        let mut ticks = 0;
        for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == "mw-roots" {
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
                let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
                let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
                ticks += f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
            }
        }
        ticks
    }

    /// The second round of a door root: a member that answered and hung up does not keep the
    /// roots thread busy while another member is late, and both get every code; a hello for
    /// the same place after the table is refused.
    #[test]
    fn a_door_roots_second_round_waits_quietly_for_a_late_member() {
        let door = door_address("127.0.0.1".parse().unwrap()).unwrap();
        let secret = vec![7u8; 32];
        let deadline = Instant::now() + Duration::from_secs(20);
        let key = 0x5eed_0f1a;
        spawn_root(None, RootConfig::for_door(secret.clone(), "w", 2, deadline, key, "shrink")).unwrap();
        let hello = |rank: u32| Hello {
            name: "w".into(),
            size: 2,
            agree: "shrink".into(),
            lanes: vec![1; 24],
            ..test_hello(&secret, rank, Vec::new(), key, &door.to_string())
        };
        let (s0, s1) = (TcpStream::connect(door).unwrap(), TcpStream::connect(door).unwrap());
        exec::block_on(addr::send_msg(&s0, &hello(0).encode(), deadline, None)).unwrap();
        exec::block_on(addr::send_msg(&s1, &hello(1).encode(), deadline, None)).unwrap();
        for s in [&s0, &s1] {
            let t = decode_reply(&exec::block_on(addr::recv_msg(s, deadline, None)).unwrap()).unwrap().unwrap();
            assert_eq!(t.lanes, vec![vec![1; 24]; 2]);
        }
        let late = TcpStream::connect(door).unwrap();
        exec::block_on(addr::send_msg(&late, &hello(1).encode(), deadline, None)).unwrap();
        exec::block_on(addr::write_all(&s0, &[1], deadline, None)).unwrap();
        s0.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let before = roots_thread_ticks();
        std::thread::sleep(Duration::from_millis(1500));
        let used = roots_thread_ticks() - before;
        // A spinning thread would use about 150 ticks (100 per second) here.
        assert!(used < 50, "the roots thread used {used} ticks while it waited");
        exec::block_on(addr::write_all(&s1, &[2], deadline, None)).unwrap();
        for s in [&s0, &s1] {
            let codes = decode_codes(&exec::block_on(addr::recv_msg(s, deadline, None)).unwrap()).unwrap().unwrap();
            assert_eq!(codes, vec![1, 2]);
        }
        let e = decode_reply(&exec::block_on(addr::recv_msg(&late, deadline, None)).unwrap()).unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidUsage, "{}", e.message());
    }
    /// A hello of world "g" of three ranks, rank `rank`, with `lanes` (empty: none offered).
    fn test_hello(secret: &[u8], rank: u32, lanes: Vec<u8>, key: u64, door: &str) -> Hello {
        Hello {
            secret: secret.to_vec(),
            name: "g".into(),
            rank,
            size: 3,
            generation: 1,
            addr: "127.0.0.1:1".into(),
            host: "h".into(),
            timeout_ms: 20000,
            door: door.into(),
            key,
            agree: String::new(),
            lanes,
        }
    }

    /// One offer of lanes is enough for a second round, among the ranks that offered (a
    /// `grow`'s id root: the members offer, the newcomers do not and get the table without
    /// the offers). While the round waits for a late member, the root's listener is closed:
    /// a stray connection neither keeps the roots thread busy nor waits unanswered.
    #[test]
    fn one_offer_of_lanes_makes_a_second_round_among_the_ranks_that_offered() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let secret = [9u8; crate::api::id::SECRET_LEN];
        let deadline = Instant::now() + Duration::from_secs(20);
        spawn_root(Some(listener), RootConfig::for_id(secret)).unwrap();
        let conns: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(at).unwrap()).collect();
        for (r, s) in conns.iter().enumerate() {
            let lanes = if r < 2 { vec![r as u8 + 1; 8] } else { Vec::new() };
            let h = test_hello(&secret, r as u32, lanes, 0, "127.0.0.1:2");
            exec::block_on(addr::send_msg(s, &h.encode(), deadline, None)).unwrap();
        }
        for (r, s) in conns.iter().enumerate() {
            let t = decode_reply(&exec::block_on(addr::recv_msg(s, deadline, None)).unwrap()).unwrap().unwrap();
            let want = if r < 2 { vec![vec![1; 8], vec![2; 8], vec![]] } else { Vec::new() };
            assert_eq!(t.lanes, want, "rank {r}");
        }
        // The rank that offered nothing got the table only: its connection is closed.
        let e = exec::block_on(addr::recv_msg(&conns[2], deadline, None)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        exec::block_on(addr::write_all(&conns[0], &[1], deadline, None)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(TcpStream::connect(at).is_err(), "the listener is still open in the second round");
        let before = roots_thread_ticks();
        std::thread::sleep(Duration::from_millis(1500));
        let used = roots_thread_ticks() - before;
        assert!(used < 50, "the roots thread used {used} ticks while it waited");
        exec::block_on(addr::write_all(&conns[1], &[2], deadline, None)).unwrap();
        for s in &conns[..2] {
            let codes = decode_codes(&exec::block_on(addr::recv_msg(s, deadline, None)).unwrap()).unwrap().unwrap();
            assert_eq!(codes, vec![1, 2, 0]);
        }
    }

    /// A second round that times out names the ranks that did not answer it.
    #[test]
    fn a_second_round_past_its_deadline_names_who_did_not_answer() {
        let door = door_address("127.0.0.1".parse().unwrap()).unwrap();
        let secret = vec![3u8; 32];
        let deadline = Instant::now() + Duration::from_millis(1500);
        let key = 0x7a1e_5ec0;
        spawn_root(None, RootConfig::for_door(secret.clone(), "g", 3, deadline, key, "")).unwrap();
        let conns: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(door).unwrap()).collect();
        let wait = Instant::now() + Duration::from_secs(20);
        for (r, s) in conns.iter().enumerate() {
            let lanes = if r < 2 { vec![1; 8] } else { Vec::new() };
            let h = test_hello(&secret, r as u32, lanes, key, &door.to_string());
            exec::block_on(addr::send_msg(s, &h.encode(), wait, None)).unwrap();
        }
        for s in &conns {
            decode_reply(&exec::block_on(addr::recv_msg(s, wait, None)).unwrap()).unwrap().unwrap();
        }
        exec::block_on(addr::write_all(&conns[0], &[1], wait, None)).unwrap();
        let e = decode_codes(&exec::block_on(addr::recv_msg(&conns[0], wait, None)).unwrap()).unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.message().contains("ranks [1] of 3 did not answer the second round"), "{}", e.message());
    }
}
