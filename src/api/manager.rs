//! [`WorldManager`]: one per process; the registry of its worlds and their events.
//!
//! Forming a world runs as a task of the process's formation thread (`bootstrap/exec.rs`), so
//! it never blocks the traffic of the process's other worlds; the blocking forms just wait for
//! it. The registry maps names to
//! worlds (one live world per name); a broken world's name can be used again, for a new world
//! with a larger generation. Events (ready, broken with cause, removed) queue up for a serving
//! loop to wait on or `.await`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::api::elastic::Lineage;
use crate::api::error::{BrokenCause, Error, Result};
use crate::api::id::UniqueId;
use crate::api::options::WorldOptions;
use crate::api::request::{Completion, Slot};
use crate::api::world::{World, WorldInner};
use crate::bootstrap::{self, JoinSpec};
use crate::driver::Driver;
use crate::engine::{Engine, EngineConfig};
use crate::sys::sync::{lock, wait_timeout, Arc, AtomicBool, AtomicU32, AtomicU64, Condvar, Mutex, Ordering};

/// How the ranks of a world find each other.
#[derive(Debug, Clone)]
pub enum Rendezvous {
    /// NCCL's way: an id made by [`UniqueId::new`] in one process and given to all ranks.
    Id(UniqueId),
    /// MultiWorld's way: rank 0 listens on this `host:port`; the others connect to it.
    Address(String),
}

impl From<UniqueId> for Rendezvous {
    fn from(id: UniqueId) -> Self {
        Rendezvous::Id(id)
    }
}

impl From<&UniqueId> for Rendezvous {
    fn from(id: &UniqueId) -> Self {
        Rendezvous::Id(id.clone())
    }
}

impl From<&str> for Rendezvous {
    fn from(addr: &str) -> Self {
        Rendezvous::Address(addr.to_owned())
    }
}

/// Something that happened to one of the manager's worlds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A world formed and is ready.
    Ready {
        /// Its name.
        name: String,
        /// Its generation.
        generation: u32,
    },
    /// A world broke; every operation on it fails from now on.
    Broken {
        /// Its name.
        name: String,
        /// Its generation.
        generation: u32,
        /// Why.
        cause: BrokenCause,
    },
    /// A world was removed from the manager.
    Removed {
        /// Its name.
        name: String,
        /// Its generation.
        generation: u32,
    },
    /// A member's registration of a world formed through etcd is gone: its process's lease
    /// expired (it died, or was cut off from etcd for the lease's TTL) or it removed the world.
    /// A second signal beside the world's own failure detection: the world is not broken by it.
    MemberGone {
        /// The world's name.
        name: String,
        /// Its generation.
        generation: u32,
        /// The member's rank.
        rank: usize,
    },
}

/// Where a manager's events go (shared by the C ABI's communicators, one queue per process).
#[derive(Default)]
pub(crate) struct EventQueue {
    queue: Mutex<(VecDeque<Event>, Vec<Waker>)>,
    cond: Condvar,
}

impl EventQueue {
    pub(crate) fn push(&self, e: Event) {
        let wakers = {
            let mut q = lock(&self.queue);
            q.0.push_back(e);
            std::mem::take(&mut q.1)
        };
        self.cond.notify_all();
        for w in wakers {
            w.wake();
        }
    }
}

enum Entry {
    /// Being formed; the flag, shared with the formation, says it was abandoned (and tells
    /// one formation of the name from the next).
    Forming(Arc<AtomicBool>),
    Ready(World),
}

impl Entry {
    fn is_formation(&self, cancel: &Arc<AtomicBool>) -> bool {
        matches!(self, Entry::Forming(c) if Arc::ptr_eq(c, cancel))
    }
}

pub(crate) struct Inner {
    defaults: WorldOptions,
    worlds: Mutex<HashMap<String, Entry>>,
    generations: Mutex<HashMap<String, u32>>,
    events: Arc<EventQueue>,
    closed: AtomicBool,
    /// Set by [`WorldManager::set_op_timeout`]: the operation deadline of every world, those
    /// still forming included (outer `None`: each world keeps its own options').
    op_timeout: Mutex<Option<Option<Duration>>>,
}

/// The registry of a process's worlds. Make one per process (more work, but share nothing).
/// Dropping the manager aborts and releases all its worlds.
pub struct WorldManager {
    inner: Arc<Inner>,
}

impl Default for WorldManager {
    fn default() -> Self {
        WorldManager::new()
    }
}

impl WorldManager {
    /// A manager whose worlds use [`WorldOptions::default`] unless told otherwise. The first
    /// manager of a process raises its soft limit on open descriptors to the hard limit.
    pub fn new() -> WorldManager {
        WorldManager::with_defaults(WorldOptions::default())
    }

    /// A manager whose worlds use `defaults` unless told otherwise.
    pub fn with_defaults(defaults: WorldOptions) -> WorldManager {
        WorldManager::with_event_queue(defaults, Arc::new(EventQueue::default()))
    }

    /// A manager whose events go to `events` (shared with other managers).
    pub(crate) fn with_event_queue(defaults: WorldOptions, events: Arc<EventQueue>) -> WorldManager {
        crate::sys::log::start();
        crate::sys::raise_descriptor_limit();
        WorldManager {
            inner: Arc::new(Inner {
                defaults,
                worlds: Mutex::new(HashMap::new()),
                generations: Mutex::new(HashMap::new()),
                events,
                closed: AtomicBool::new(false),
                op_timeout: Mutex::new(None),
            }),
        }
    }

    /// The registry itself, for worlds made from other worlds (`api/elastic.rs`).
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// The options new worlds get by default.
    pub fn defaults(&self) -> &WorldOptions {
        &self.inner.defaults
    }

    /// Forms world `name` with NCCL's id: every rank calls this with the same id and size and
    /// its own rank. Blocks until the world is ready or formation fails.
    pub fn init_world(&self, name: &str, id: &UniqueId, rank: usize, size: usize) -> Result<World> {
        self.form(name, id.into(), rank, size, &self.inner.defaults).wait()
    }

    /// Forms world `name` by address: rank 0 listens on `addr` (`host:port`), the other ranks
    /// connect to it. Blocks until the world is ready or formation fails.
    pub fn init_world_at(&self, name: &str, addr: &str, rank: usize, size: usize) -> Result<World> {
        self.form(name, addr.into(), rank, size, &self.inner.defaults).wait()
    }

    /// Forms a world with explicit options. Blocks until ready or failed.
    pub fn init_world_with(
        &self,
        name: &str,
        rendezvous: Rendezvous,
        rank: usize,
        size: usize,
        options: &WorldOptions,
    ) -> Result<World> {
        self.form(name, rendezvous, rank, size, options).wait()
    }

    /// Starts forming a world and returns at once; the [`Formation`] is waited on, tested, or
    /// awaited. The process's other worlds keep running meanwhile.
    pub fn form(
        &self,
        name: &str,
        rendezvous: Rendezvous,
        rank: usize,
        size: usize,
        options: &WorldOptions,
    ) -> Formation {
        let rendezvous = match rendezvous {
            Rendezvous::Id(id) => bootstrap::Rendezvous::Id(id),
            Rendezvous::Address(a) => bootstrap::Rendezvous::Address(a),
        };
        let secret = options.secret.clone().unwrap_or_default();
        form_on(&self.inner, name, rendezvous, secret, rank, size, options)
    }
}

/// Starts forming a world registered with the manager `inner` (see [`WorldManager::form`]);
/// also how elastic calls (`api/elastic.rs`) form theirs.
pub(crate) fn form_on(
    inner: &Arc<Inner>,
    name: &str,
    rendezvous: bootstrap::Rendezvous,
    secret: Vec<u8>,
    rank: usize,
    size: usize,
    options: &WorldOptions,
) -> Formation {
    let f = Formation {
        completion: Completion::new(),
        slot: Slot::new(None),
        cancel: Arc::new(AtomicBool::new(false)),
        owner: (inner.clone(), name.to_owned(), rank),
    };
    if let Err(e) = start_formation(inner, name, rendezvous, secret, rank, size, options, &f) {
        f.completion.complete(Err(e));
    }
    f
}

/// The generation this process would propose for a new world named `name`.
pub(crate) fn next_generation(inner: &Inner, name: &str) -> u32 {
    lock(&inner.generations).get(name).copied().unwrap_or(0) + 1
}

/// Why a formation of `name` would be refused here now (the manager shut down, the name
/// being formed or held by a working world), if it would.
pub(crate) fn name_refusal(inner: &Inner, name: &str) -> Option<Error> {
    if inner.closed.load(Ordering::Acquire) {
        return Some(Error::invalid_usage("the world manager is shut down"));
    }
    match lock(&inner.worlds).get(name) {
        Some(Entry::Forming(_)) => Some(Error::invalid_usage(format!("world '{name}' is already being formed"))),
        Some(Entry::Ready(w)) if w.inner.backend.broken().is_none() => Some(Error::invalid_usage(format!(
            "world '{name}' (generation {}) exists and works; remove it before forming another",
            w.generation()
        ))),
        _ => None,
    }
}

/// A world name is 1 to 255 bytes without NUL.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 || name.contains('\0') {
        return Err(Error::invalid_arg(format!("'{name}' is not a world name (1 to 255 bytes, no NUL)")));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn start_formation(
    inner: &Arc<Inner>,
    name: &str,
    rendezvous: bootstrap::Rendezvous,
    secret: Vec<u8>,
    rank: usize,
    size: usize,
    options: &WorldOptions,
    f: &Formation,
) -> Result<()> {
    check_name(name)?;
    // A host name is looked up here, on the caller's thread: the formation thread, which all
    // formations share, must never wait for a resolver.
    let rendezvous = match rendezvous {
        #[cfg(feature = "etcd")]
        bootstrap::Rendezvous::Address(a) if bootstrap::etcd::is_etcd(&a) => {
            bootstrap::Rendezvous::Etcd(bootstrap::etcd::Target::parse(&a)?)
        }
        #[cfg(not(feature = "etcd"))]
        bootstrap::Rendezvous::Address(a) if a.starts_with("etcd://") => {
            return Err(Error::invalid_arg(format!(
                "world '{name}': '{a}' is an etcd address, and this build has no etcd support (feature `etcd`)"
            )))
        }
        bootstrap::Rendezvous::Address(a) => bootstrap::Rendezvous::Address(bootstrap::addr::resolve(&a)?.to_string()),
        other => other,
    };
    if size == 0 || size > crate::bootstrap::MAX_WORLD_SIZE {
        return Err(Error::invalid_arg(format!(
            "world '{name}': {size} ranks; a world has 1 to {} ranks",
            crate::bootstrap::MAX_WORLD_SIZE
        )));
    }
    if rank >= size {
        return Err(Error::invalid_arg(format!(
            "world '{name}': rank {rank} is out of range for a world of {size} ranks"
        )));
    }
    if inner.closed.load(Ordering::Acquire) {
        return Err(Error::invalid_usage("the world manager is shut down"));
    }
    // The backend is settled here, once: the world keeps it for its whole life.
    let mut options = options.clone();
    options.backend = options.backend.effective();
    if options.backend == crate::api::options::BackendChoice::Nccl {
        nccl_usable(name)?;
    }
    if options.transport.effective() == crate::api::options::TransportChoice::Rdma {
        rdma_usable(name)?;
    }
    let options = &options;
    {
        let mut worlds = lock(&inner.worlds);
        match worlds.get(name) {
            Some(Entry::Forming(_)) => {
                return Err(Error::invalid_usage(format!("world '{name}' is already being formed")))
            }
            Some(Entry::Ready(w)) if w.inner.backend.broken().is_none() => {
                return Err(Error::invalid_usage(format!(
                    "world '{name}' (generation {}) exists and works; remove it before forming another",
                    w.generation()
                )))
            }
            Some(Entry::Ready(w)) => {
                // Broken: release it and reuse the name.
                let old = w.clone();
                worlds.insert(name.to_owned(), Entry::Forming(f.cancel.clone()));
                drop(worlds);
                release(inner, &old);
            }
            None => {
                worlds.insert(name.to_owned(), Entry::Forming(f.cancel.clone()));
            }
        }
    }
    let generation = next_generation(inner, name);
    let spec = JoinSpec {
        name: name.to_owned(),
        rank,
        size,
        rendezvous,
        secret,
        interface: options.interface.clone(),
        auto: options.transport.effective() == crate::api::options::TransportChoice::Auto,
        rdma: options.transport.effective() == crate::api::options::TransportChoice::Rdma,
        generation,
        timeout: options.timeout,
        cancel: f.cancel.clone(),
        socket_buffer: options.socket_buffer,
    };
    if let bootstrap::Rendezvous::Prepared(p) = &spec.rendezvous {
        // Links made already (lanes): nothing to wait for, so no task of the formation thread.
        let formed = crate::sys::sync::lock(&p.0).take();
        let r = match formed {
            Some(formed) => world_from(inner, &spec, options, formed, Instant::now()),
            None => Err(Error::internal("the links of a world on lanes were taken twice")),
        };
        settle_formation(inner, &spec, r, &f.completion, &f.slot, &f.cancel);
        return Ok(());
    }
    let owner = inner.clone();
    let options = options.clone();
    let (completion, slot, cancel) = (f.completion.clone(), f.slot.clone(), f.cancel.clone());
    let spawned = bootstrap::exec::spawn(async move {
        let r = bootstrap::exec::Guarded(form_world(&owner, &spec, &options)).await;
        settle_formation(&owner, &spec, r, &completion, &slot, &cancel);
    });
    if let Err(e) = spawned {
        lock(&inner.worlds).remove(name);
        return Err(e);
    }
    Ok(())
}

impl WorldManager {
    /// The world registered under `name`, if any.
    pub fn world(&self, name: &str) -> Option<World> {
        match lock(&self.inner.worlds).get(name) {
            Some(Entry::Ready(w)) => Some(w.clone()),
            _ => None,
        }
    }

    /// All formed worlds, sorted by name.
    pub fn worlds(&self) -> Vec<World> {
        let mut v: Vec<World> = lock(&self.inner.worlds)
            .values()
            .filter_map(|e| match e {
                Entry::Ready(w) => Some(w.clone()),
                Entry::Forming(_) => None,
            })
            .collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    /// Sets the operation deadline (`None`: none) of every world of this manager, now and
    /// formed later, overriding their options: an operation not done in that time fails with
    /// `Timeout` and breaks its world. The one knob that catches a peer whose process lives but
    /// never makes the matching call (see `docs/fault-model.md`). Per world:
    /// [`World::set_op_timeout`].
    pub fn set_op_timeout(&self, t: Option<Duration>) {
        let worlds: Vec<World> = {
            let worlds = lock(&self.inner.worlds);
            *lock(&self.inner.op_timeout) = Some(t);
            worlds
                .values()
                .filter_map(|e| match e {
                    Entry::Ready(w) => Some(w.clone()),
                    Entry::Forming(_) => None,
                })
                .collect()
        };
        for w in worlds {
            w.set_op_timeout(t);
        }
    }

    /// Removes world `name`: aborts it if it still runs, releases its sockets and threads, and
    /// frees the name for a new world. Handles to it keep failing with `InvalidUsage`.
    pub fn remove_world(&self, name: &str) -> Result<()> {
        let w = {
            let mut worlds = lock(&self.inner.worlds);
            match worlds.get(name) {
                Some(Entry::Ready(w)) => {
                    let w = w.clone();
                    worlds.remove(name);
                    w
                }
                Some(Entry::Forming(_)) => {
                    return Err(Error::invalid_usage(format!(
                        "world '{name}' is still forming (abort its Formation to abandon it)"
                    )))
                }
                None => return Err(Error::invalid_arg(format!("there is no world named '{name}'"))),
            }
        };
        release(&self.inner, &w);
        Ok(())
    }

    /// The next event, if one is queued; never blocks.
    pub fn try_next_event(&self) -> Option<Event> {
        lock(&self.inner.events.queue).0.pop_front()
    }

    /// Waits up to `timeout` (forever with `None`) for the next event.
    pub fn next_event(&self, timeout: Option<Duration>) -> Option<Event> {
        self.inner.events.next(timeout)
    }

    /// A future of the next event, for async serving loops (no runtime needed).
    pub fn event(&self) -> NextEvent {
        NextEvent { events: self.inner.events.clone() }
    }
}

impl EventQueue {
    /// Waits up to `timeout` (forever with `None`) for the next event.
    pub(crate) fn next(&self, timeout: Option<Duration>) -> Option<Event> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let ev = self;
        let mut q = lock(&ev.queue);
        loop {
            if let Some(e) = q.0.pop_front() {
                return Some(e);
            }
            let step = match deadline {
                None => Duration::from_secs(3600),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    d - now
                }
            };
            q = wait_timeout(&ev.cond, q, step);
        }
    }
}

impl Drop for WorldManager {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        let worlds: Vec<World> = lock(&self.inner.worlds)
            .drain()
            .filter_map(|(_, e)| match e {
                Entry::Ready(w) => Some(w),
                Entry::Forming(_) => None,
            })
            .collect();
        for w in worlds {
            w.inner.removed.store(true, Ordering::Release);
            w.inner.backend.close();
        }
    }
}

/// Future of [`WorldManager::event`].
pub struct NextEvent {
    events: Arc<EventQueue>,
}

impl Future for NextEvent {
    type Output = Event;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Event> {
        let mut q = lock(&self.events.queue);
        match q.0.pop_front() {
            Some(e) => Poll::Ready(e),
            None => {
                if !q.1.iter().any(|w| w.will_wake(cx.waker())) {
                    q.1.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

/// A world being formed (see [`WorldManager::form`]).
#[must_use = "a formation does nothing visible unless waited on"]
pub struct Formation {
    completion: Arc<Completion>,
    slot: Arc<Slot<Option<World>>>,
    /// Set when the formation is abandoned.
    cancel: Arc<AtomicBool>,
    /// The manager, the world's name and this rank.
    owner: (Arc<Inner>, String, usize),
}

impl Formation {
    fn take(&self) -> Result<World> {
        match self.completion.result() {
            Some(Ok(())) => self
                .slot
                .with(|s| s.take())
                .flatten()
                .ok_or_else(|| Error::invalid_usage("this formation's world was already taken")),
            Some(Err(e)) => Err(e),
            None => Err(Error::new(crate::ErrorKind::InProgress, "the world is still forming")),
        }
    }

    /// Blocks until the world is ready or formation fails.
    pub fn wait(self) -> Result<World> {
        self.completion.wait_until(None);
        self.take()
    }

    /// True once formation has finished (either way); never blocks.
    pub fn test(&self) -> bool {
        self.completion.is_done()
    }

    /// Abandons the formation, and returns at once (NCCL's `ncclCommAbort` on a communicator
    /// still initializing): the formation ends with `WorldBroken` (cause `LocalAbort`), the
    /// name is free for a new formation at once, and the formation's task stops at its next
    /// look (within about 50 ms) and releases what it had set up; peers that had already
    /// linked see the world break. If the formation had already finished, this does nothing:
    /// abort the [`World`] instead.
    pub fn abort(&self) {
        let (inner, name, rank) = &self.owner;
        let wakers = {
            let mut worlds = lock(&inner.worlds);
            if self.completion.is_done() {
                return;
            }
            self.cancel.store(true, Ordering::Release);
            if worlds.get(name).is_some_and(|e| e.is_formation(&self.cancel)) {
                worlds.remove(name);
            }
            self.completion.settle(Err(Error::broken(name, *rank, BrokenCause::LocalAbort, false)))
        };
        wakers.into_iter().for_each(|w| w.wake());
    }
}

impl Future for Formation {
    type Output = Result<World>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<World>> {
        if self.completion.is_done() || !self.completion.register(cx.waker()) {
            return Poll::Ready(self.take());
        }
        Poll::Pending
    }
}

/// Whether a world may ask for the NCCL backend: the feature is built and NCCL loads. Asked
/// before anything is formed, so that a missing library fails at once, with its reason.
fn nccl_usable(name: &str) -> Result<()> {
    #[cfg(feature = "nccl")]
    return crate::gpu::nccl::library()
        .map(|_| ())
        .map_err(|e| Error::new(e.kind(), format!("world '{name}': {}", e.message())));
    #[cfg(not(feature = "nccl"))]
    Err(Error::invalid_arg(format!(
        "world '{name}' asks for the NCCL backend, but this build of multiworld has no `nccl` feature"
    )))
}

/// Whether a world may ask for RDMA: the feature is built and this process has a provider.
fn rdma_usable(name: &str) -> Result<()> {
    #[cfg(feature = "rdma")]
    return crate::transport::rdma::usable()
        .map_err(|e| Error::invalid_usage(format!("world '{name}' asks for RDMA: {e}")));
    #[cfg(not(feature = "rdma"))]
    Err(Error::invalid_arg(format!("world '{name}' asks for RDMA, but this build of multiworld has no `rdma` feature")))
}

/// Marks a world removed, closes it and says so.
fn release(inner: &Inner, w: &World) {
    w.inner.removed.store(true, Ordering::Release);
    w.inner.backend.close();
    inner.events.push(Event::Removed { name: w.name().to_owned(), generation: w.generation() });
}

/// A task of the formation thread: join, build the engine and driver.
async fn form_world(inner: &Arc<Inner>, spec: &JoinSpec, options: &WorldOptions) -> Result<World> {
    let started = Instant::now();
    let formed = bootstrap::join(spec).await?;
    world_from(inner, spec, options, formed, started)
}

/// The world of a formation whose links are made: its engine, driver and handle.
fn world_from(
    inner: &Arc<Inner>,
    spec: &JoinSpec,
    options: &WorldOptions,
    formed: bootstrap::Formed,
    started: Instant,
) -> Result<World> {
    let name: Arc<str> = Arc::from(spec.name.as_str());
    let cfg = EngineConfig {
        name: name.clone(),
        rank: spec.rank,
        size: spec.size,
        world_id: formed.world_id,
        generation: formed.generation,
        heartbeat: options.heartbeat,
        checksum: options.checksum.effective(),
    };
    let mut engine = Engine::new(cfg, formed.links, Instant::now());
    engine.set_shm_fallbacks(formed.shm_fallbacks);
    engine.set_lane_links(formed.lane_links);
    let events = inner.events.clone();
    let (ev_name, generation) = (spec.name.clone(), formed.generation);
    engine.set_on_broken(Box::new(move |cause: &BrokenCause| {
        events.push(Event::Broken { name: ev_name.clone(), generation, cause: cause.clone() });
    }));
    let driver = Driver::start(name.clone(), engine)?;
    let world = World::new(WorldInner {
        name,
        rank: spec.rank,
        size: spec.size,
        generation: formed.generation,
        backend: driver,
        op_timeout_ms: AtomicU64::new(0),
        removed: AtomicBool::new(false),
        lineage: Lineage {
            manager: Arc::downgrade(inner),
            options: options.clone(),
            world_id: formed.world_id,
            secret: formed.secret,
            doors: formed.doors,
            calls: AtomicU32::new(0),
            shrinks: AtomicU32::new(0),
        },
    });
    world.set_op_timeout(options.op_timeout);
    #[cfg(feature = "etcd")]
    if let Some(reg) = formed.etcd {
        reg.track(Arc::downgrade(&world.inner), Arc::downgrade(&inner.events));
    }
    {
        let mut g = lock(&inner.generations);
        let e = g.entry(spec.name.clone()).or_insert(0);
        *e = (*e).max(formed.generation);
    }
    info!(
        "world '{}' rank {}/{} generation {} ready in {:?}",
        spec.name,
        spec.rank,
        spec.size,
        formed.generation,
        started.elapsed()
    );
    Ok(world)
}

/// Ends a formation: registers its world and completes it, unless it was abandoned (or the
/// manager shut down) meanwhile, in which case the world is closed again. Registry and
/// completion change under the registry's lock, so that [`Formation::abort`] sees either a
/// finished formation or one it may still abandon, never a half of each.
fn settle_formation(
    inner: &Arc<Inner>,
    spec: &JoinSpec,
    r: Result<World>,
    completion: &Completion,
    slot: &Slot<Option<World>>,
    cancel: &Arc<AtomicBool>,
) {
    let mut discard = None;
    let mut ready = None;
    let wakers = {
        let mut worlds = lock(&inner.worlds);
        let ours = worlds.get(&spec.name).is_some_and(|e| e.is_formation(cancel));
        let closed = inner.closed.load(Ordering::Acquire);
        match r {
            Ok(w) if ours && !closed => {
                if let Some(t) = *lock(&inner.op_timeout) {
                    w.set_op_timeout(t);
                }
                worlds.insert(spec.name.clone(), Entry::Ready(w.clone()));
                ready = Some(Event::Ready { name: spec.name.clone(), generation: w.generation() });
                slot.with(|s| *s = Some(w));
                completion.settle(Ok(()))
            }
            r => {
                if ours {
                    worlds.remove(&spec.name);
                }
                let e = match r {
                    Ok(w) => {
                        discard = Some(w);
                        if closed {
                            Error::invalid_usage("the world manager was shut down during formation")
                        } else {
                            Error::broken(&spec.name, spec.rank, BrokenCause::LocalAbort, false)
                        }
                    }
                    Err(e) => e,
                };
                completion.settle(Err(e))
            }
        }
    };
    if let Some(w) = discard {
        w.inner.removed.store(true, Ordering::Release);
        w.inner.backend.close();
    }
    if let Some(ev) = ready {
        inner.events.push(ev);
    }
    wakers.into_iter().for_each(|w| w.wake());
}
