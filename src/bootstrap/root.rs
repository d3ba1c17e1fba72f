//! The rendezvous root: collects every rank's hello (secret, name, rank, size,
//! listener address, host identity, proposed generation) and answers each with the table of
//! all ranks, a fresh world id and the generation. It serves one formation and ends; a
//! stranger's connection costs it one descriptor until its hello grace passes.

use super::*;
use crate::sys::sync::{lock, Mutex};
use crate::sys::{Epoll, EventFd};

pub(super) const HELLO_MAGIC: u32 = 0x4D57_4231; // "MWB1"
pub(super) const PROTOCOL_VERSION: u32 = 1;

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
    /// Listener address and host identity of each rank.
    pub peers: Vec<(String, String)>,
}

pub(super) fn encode_table(t: &Table) -> Vec<u8> {
    let mut w = MsgWriter::new().u8(0).u32(t.generation).u64(t.world_id).u32(t.peers.len() as u32);
    for (a, h) in &t.peers {
        w = w.str(a).str(h);
    }
    w.finish()
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

pub(super) fn decode_reply(b: &[u8]) -> std::result::Result<std::result::Result<Table, Error>, String> {
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
                peers.push((r.str()?.to_owned(), r.str()?.to_owned()));
            }
            r.end()?;
            Ok(Ok(Table { generation, world_id, peers }))
        }
        code => {
            let kind = match code {
                1 => ErrorKind::InvalidArgument,
                2 => ErrorKind::InvalidUsage,
                3 => ErrorKind::Timeout,
                _ => ErrorKind::System,
            };
            Ok(Err(Error::new(kind, r.str()?.to_owned())))
        }
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
}

impl RootConfig {
    pub(crate) fn for_id(secret: [u8; crate::api::id::SECRET_LEN]) -> RootConfig {
        RootConfig { secret: secret.to_vec(), expect: None, deadline: None, cancel: None }
    }

    pub(crate) fn for_address(secret: Vec<u8>, name: &str, size: u32, deadline: Instant) -> RootConfig {
        RootConfig { secret, expect: Some((name.to_owned(), size)), deadline: Some(deadline), cancel: None }
    }

    pub(crate) fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> RootConfig {
        self.cancel = Some(cancel);
        self
    }
}

/// Starts a root on `listener`, served by the process's root thread (`mw-roots`, started with
/// the first root); it ends when the world has formed or its deadline passes.
pub(crate) fn spawn_root(listener: TcpListener, cfg: RootConfig) -> Result<RootHandle> {
    listener.set_nonblocking(true).map_err(|e| Error::system("root listener", e))?;
    let (done, rx) = std::sync::mpsc::channel();
    let root = Root::new(listener, cfg, done);
    let server = roots()?;
    lock(&server.inbox).push(root);
    server.wake.signal();
    Ok(RootHandle(rx))
}

/// Says when a root has ended (and closed its listener).
pub(crate) struct RootHandle(std::sync::mpsc::Receiver<()>);

impl RootHandle {
    /// Waits until the root has ended.
    pub(crate) fn join(self) {
        // The root holds the sender until it is dropped: then this returns.
        let _ = self.0.recv();
    }
}

/// The roots of this process, all served by one thread: a root spends its life waiting for
/// hellos, so a thousand formations in flight need one thread, not a thousand.
struct Roots {
    inbox: Mutex<Vec<Root>>,
    wake: EventFd,
}

/// The key of the roots thread's own wake-up descriptor in its `epoll` set.
const WAKE_KEY: u64 = 0;

/// The roots thread, started with the first root. A failed start (no descriptor or thread to
/// spare) is not remembered: the next root tries again.
fn roots() -> Result<Arc<Roots>> {
    static ROOTS: std::sync::OnceLock<Mutex<Option<Arc<Roots>>>> = std::sync::OnceLock::new();
    let mut started = lock(ROOTS.get_or_init(|| Mutex::new(None)));
    if let Some(r) = &*started {
        return Ok(r.clone());
    }
    let failed = |e| Error::system("starting the rendezvous thread", e);
    let wake = EventFd::new().map_err(failed)?;
    let epoll = Epoll::new().map_err(failed)?;
    epoll.watch(wake.fd(), libc::POLLIN, WAKE_KEY).map_err(failed)?;
    let server = Arc::new(Roots { inbox: Mutex::new(Vec::new()), wake });
    let me = server.clone();
    std::thread::Builder::new().name("mw-roots".into()).spawn(move || serve_roots(&me, epoll)).map_err(failed)?;
    *started = Some(server.clone());
    Ok(server)
}

/// The roots thread: every root's listener and connections in one `epoll` set, each under
/// its root's key; a root takes a turn when one of them reports or its time comes.
fn serve_roots(server: &Roots, epoll: Epoll) {
    let mut live: std::collections::HashMap<u64, Root> = std::collections::HashMap::new();
    let mut next_key = WAKE_KEY;
    let mut keys = Vec::new();
    loop {
        for mut r in lock(&server.inbox).drain(..) {
            next_key += 1;
            r.key = next_key;
            if let Err(e) = epoll.watch(r.listener.as_raw_fd(), libc::POLLIN, r.key) {
                warn!("rendezvous: cannot watch a root's listener: {e}");
                continue;
            }
            // A new root looks at once: its listener may already hold connections.
            keys.push(r.key);
            live.insert(r.key, r);
        }
        let wake_at = live.values().map(|r| r.wake_at()).min();
        if keys.is_empty() {
            epoll.wait(&mut keys, wake_at);
        }
        server.wake.drain();
        let now = Instant::now();
        keys.extend(live.values().filter(|r| now >= r.wake_at()).map(|r| r.key));
        keys.sort_unstable();
        keys.dedup();
        for k in keys.drain(..) {
            if let Some(r) = live.get_mut(&k) {
                if r.turn(&epoll) {
                    live.remove(&k);
                }
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

pub(super) fn refuse(c: &Conn, kind: ErrorKind, msg: &str) {
    let _ = addr::send_msg(&c.s, &encode_refusal(kind, msg), Instant::now() + Duration::from_millis(200));
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
    listener: TcpListener,
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
    /// Dropped last, after the listener: then [`RootHandle::join`] returns.
    _done: std::sync::mpsc::Sender<()>,
}

impl Root {
    fn new(listener: TcpListener, cfg: RootConfig, done: std::sync::mpsc::Sender<()>) -> Root {
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
            _done: done,
        }
    }

    /// When to look again with nothing reported: the deadline, or sooner to notice an
    /// abandoned formation or a connection past its hello grace.
    fn wake_at(&self) -> Instant {
        self.deadline.min(self.next_look)
    }

    fn fail_all(&self, kind: ErrorKind, msg: &str) {
        warn!("rendezvous failed: {msg}");
        for c in self.conns.iter().filter(|c| c.hello.is_some()) {
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
            let present: Vec<u32> = self.conns.iter().filter_map(|c| c.hello.as_ref().map(|h| h.rank)).collect();
            self.fail_all(ErrorKind::Timeout, &missing_ranks(&name, size, &present, &self.left));
            return true;
        }
        // New connections. When accepting fails (no descriptor to spare), the listener stays
        // readable: it is not watched until the next look, so as not to spin on it.
        if self.listener_paused {
            self.listener_paused = epoll.rewatch(self.listener.as_raw_fd(), libc::POLLIN, self.key).is_err();
        }
        loop {
            match self.listener.accept() {
                Ok((s, a)) => {
                    if s.set_nonblocking(true).is_ok()
                        && epoll.watch(s.as_raw_fd(), libc::POLLIN | libc::POLLRDHUP, self.key).is_ok()
                    {
                        self.conns.push(Conn {
                            s,
                            peer: a.to_string(),
                            buf: Vec::new(),
                            hello: None,
                            since: Instant::now(),
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("rendezvous: cannot accept a connection now ({e}); looking again in a moment");
                    self.listener_paused = epoll.rewatch(self.listener.as_raw_fd(), 0, self.key).is_ok();
                    break;
                }
            }
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
        let t = Table {
            generation: hellos.iter().map(|h| h.generation).max().unwrap_or(1),
            world_id: sys::random_u64(),
            peers: hellos.iter().map(|h| (h.addr.clone(), h.host.clone())).collect(),
        };
        let msg = encode_table(&t);
        for c in self.conns.iter().filter(|c| c.hello.is_some()) {
            let _ = addr::send_msg(&c.s, &msg, Instant::now() + Duration::from_secs(2));
        }
        info!("rendezvous: world '{name}' of {size} ranks formed, generation {}", t.generation);
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

pub(super) fn read_conn(c: &mut Conn, cfg: &RootConfig, expect: &Option<(String, u32)>, claimed: &[u32]) -> Outcome {
    let mut chunk = [0u8; 4096];
    loop {
        match (&c.s).read(&mut chunk) {
            Ok(0) => {
                if let Some(h) = &c.hello {
                    info!("rendezvous: rank {} of world '{}' left before the world formed", h.rank, h.name);
                } else if !c.buf.is_empty() {
                    warn!("rendezvous: refused {}: connection closed in the middle of its hello (truncated)", c.peer);
                }
                return Outcome::Drop;
            }
            Ok(n) => {
                if c.hello.is_some() {
                    warn!("rendezvous: refused {}: bytes after its hello", c.peer);
                    return Outcome::Drop;
                }
                c.buf.extend_from_slice(&chunk[..n]);
                if c.buf.len() >= 4 {
                    let len = u32::from_le_bytes([c.buf[0], c.buf[1], c.buf[2], c.buf[3]]) as usize;
                    if len > MAX_MESSAGE {
                        warn!("rendezvous: refused {}: oversized message ({len} bytes)", c.peer);
                        return Outcome::Drop;
                    }
                    if c.buf.len() > 4 + len {
                        warn!("rendezvous: refused {}: bytes after its hello", c.peer);
                        return Outcome::Drop;
                    }
                    if c.buf.len() == 4 + len {
                        return accept_hello(c, cfg, expect, claimed);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Keep,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Outcome::Drop,
        }
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
        spawn_root(listener, RootConfig::for_id(secret)).unwrap();
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
            };
            let s = TcpStream::connect(addr).unwrap();
            addr::send_msg(&s, &h.encode(), deadline).unwrap();
            let e = decode_reply(&addr::recv_msg(&s, deadline, None).unwrap()).unwrap().unwrap_err();
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
            peers: vec![("a:1".into(), "h1".into()), ("b:2".into(), "h2".into())],
        };
        assert_eq!(decode_reply(&encode_table(&t)).unwrap().unwrap(), t);
        let e = decode_reply(&encode_refusal(ErrorKind::Timeout, "late")).unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert_eq!(e.message(), "late");
    }
}
