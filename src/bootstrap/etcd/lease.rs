//! The process's lease on each etcd cluster, and what hangs on it.
//!
//! A process holds one lease per cluster, granted at its first formation there with a TTL of
//! `MW_ETCD_TTL` seconds (default 5). A thread (`mw-etcd`, one per cluster, for the life of the
//! process) keeps it alive every third of the TTL. If the lease expired anyway (etcd or this
//! process was stopped longer than the TTL), it grants a new one and puts this process's
//! registrations again under it, so the directory shows them again and later formations work.
//! With etcd unreachable it keeps trying and the worlds go on: nothing on the data path waits
//! for it.
//!
//! On the same tick it looks at the registrations of the other members of each world formed
//! here: one that vanished (its process's lease expired: it died, or it was cut off from etcd
//! for the TTL; or it removed the world) raises `Event::MemberGone` on the world's manager,
//! once. That is a second signal beside the links' own failure detection, never a substitute
//! for it: the world is not broken by it. When a world formed here is removed (or its handles
//! are all gone), its registration is deleted.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::client::{CallError, Client};
use crate::api::manager::{Event, EventQueue};
use crate::api::world::WorldInner;
use crate::bootstrap::exec::block_on;
use crate::sys::sync::{lock, Arc, AtomicBool, Mutex, Ordering, Weak};

/// The lease's TTL in seconds: `MW_ETCD_TTL`, default 5 (etcd itself may round it up).
fn ttl() -> u64 {
    std::env::var("MW_ETCD_TTL").ok().and_then(|v| v.trim().parse().ok()).filter(|t| *t >= 1).unwrap_or(5)
}

/// A process's lease on one cluster.
pub(crate) struct Lease {
    client: Client,
    ttl: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The lease id (0: none yet).
    id: i64,
    keeper: bool,
    tracked: Vec<Tracked>,
}

/// A registration of a world formed here, watched by the keeper.
struct Tracked {
    reg: Registration,
    world: Weak<WorldInner>,
    events: Weak<EventQueue>,
    /// Members reported gone and not seen again since.
    gone: BTreeSet<usize>,
    /// The key must be put again (under the current lease, which replaced the one it was put
    /// under); retried every tick until it is.
    put_again: bool,
}

/// The lease of this process on `client`'s cluster (the same for any order of its endpoints).
pub(crate) fn for_cluster(client: &Client) -> Arc<Lease> {
    static LEASES: std::sync::OnceLock<Mutex<HashMap<Vec<std::net::SocketAddr>, Arc<Lease>>>> =
        std::sync::OnceLock::new();
    let mut key = client.endpoints.clone();
    key.sort();
    let mut all = lock(LEASES.get_or_init(|| Mutex::new(HashMap::new())));
    all.entry(key)
        .or_insert_with(|| Arc::new(Lease { client: client.clone(), ttl: ttl(), state: Mutex::new(State::default()) }))
        .clone()
}

/// A rank's registration in a formed world: its key and value, to put again under a new lease
/// and to delete when the world goes.
pub(crate) struct Registration {
    lease: Arc<Lease>,
    key: String,
    value: Vec<u8>,
    name: String,
    generation: u32,
    rank: usize,
    size: usize,
    /// `<prefix>/worlds/<name>/<gen>/`: where the other members' keys are.
    gen_dir: String,
}

impl Registration {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        lease: Arc<Lease>,
        key: String,
        value: Vec<u8>,
        name: &str,
        generation: u32,
        rank: usize,
        size: usize,
        gen_dir: String,
    ) -> Registration {
        Registration { lease, key, value, name: name.to_owned(), generation, rank, size, gen_dir }
    }

    /// Hands the registration to the keeper, for the life of `world`; member changes go to
    /// `events`.
    pub(crate) fn track(self, world: Weak<WorldInner>, events: Weak<EventQueue>) {
        let lease = self.lease.clone();
        let t = Tracked { reg: self, world, events, gone: BTreeSet::new(), put_again: false };
        lock(&lease.state).tracked.push(t);
    }
}

impl Lease {
    /// The lease's id, granted now if there is none yet (the first formation on the cluster,
    /// or after [`Lease::invalidate`]), which also starts its keeper.
    pub(crate) async fn id(self: &Arc<Self>, deadline: Instant, cancel: Option<&AtomicBool>) -> Result<i64, CallError> {
        let have = lock(&self.state).id;
        if have != 0 {
            return Ok(have);
        }
        let granted = self.client.grant(self.ttl, deadline, cancel).await?;
        let (id, start) = {
            let mut s = lock(&self.state);
            // Another formation may have granted one meanwhile: one lease per process (the
            // other expires unused).
            if s.id == 0 {
                s.id = granted;
            }
            (s.id, !std::mem::replace(&mut s.keeper, true))
        };
        if start {
            let me = Arc::downgrade(self);
            let spawned = std::thread::Builder::new().name("mw-etcd".into()).spawn(move || keep(me));
            if let Err(e) = spawned {
                lock(&self.state).keeper = false;
                warn!("etcd: cannot start the lease keeper ({e}); registrations expire after {} s", self.ttl);
            }
        }
        Ok(id)
    }

    /// Forgets lease `id`, which etcd no longer knows (it expired while etcd or this process
    /// was stopped): the next [`Lease::id`] grants a new one, and the keeper puts this
    /// process's registrations again under it.
    pub(crate) fn invalidate(&self, id: i64) {
        let mut s = lock(&self.state);
        if s.id == id {
            s.id = 0;
            s.tracked.iter_mut().for_each(|t| t.put_again = true);
        }
    }
}

/// True when etcd refused a request because its lease is gone.
pub(crate) fn lease_gone(e: &CallError) -> bool {
    matches!(e, CallError::Refused(m) if m.contains("lease not found"))
}

/// How soon the keeper tries again after a keep-alive that got no answer.
const KEEP_RETRY: Duration = Duration::from_millis(200);

/// The keeper's loop: keep the lease alive, re-register after an expiry, drop what was
/// removed, report members gone.
fn keep(lease: Weak<Lease>) {
    let mut complained = false;
    let mut failed = false;
    loop {
        let Some(l) = lease.upgrade() else { return };
        let period = Duration::from_millis((l.ttl * 1000 / 3).max(200));
        // After a keep-alive that got no answer, again soon: the lease's time runs on.
        std::thread::sleep(if failed { KEEP_RETRY.min(period) } else { period });
        failed = true;
        let deadline = Instant::now() + period;
        let id = lock(&l.state).id;
        let alive = match id {
            0 => Ok(0),
            id => block_on(l.client.keepalive(id, deadline)),
        };
        match alive {
            Ok(ttl) if ttl > 0 => (complained, failed) = (false, false),
            Ok(_) => {
                if id != 0 {
                    warn!("etcd: this process's lease expired (etcd or this process was stopped); taking a new one");
                }
                l.invalidate(id);
                if block_on(l.id(deadline, None)).is_err() {
                    continue;
                }
                failed = false;
            }
            Err(e) => {
                if !complained {
                    warn!("etcd: cannot keep this process's lease alive ({e}); the worlds go on, formations through etcd wait");
                    complained = true;
                }
                continue;
            }
        }
        put_again(&l, deadline);
        tend(&l, deadline);
    }
}

/// Puts the registrations whose lease was replaced again, under the current one.
fn put_again(l: &Lease, deadline: Instant) {
    let (id, todo): (i64, Vec<(String, Vec<u8>)>) = {
        let s = lock(&l.state);
        (s.id, s.tracked.iter().filter(|t| t.put_again).map(|t| (t.reg.key.clone(), t.reg.value.clone())).collect())
    };
    for (k, v) in todo {
        if block_on(l.client.put(&k, &v, id, deadline, None)).is_ok() {
            let mut s = lock(&l.state);
            if s.id == id {
                s.tracked.iter_mut().filter(|t| t.reg.key == k).for_each(|t| t.put_again = false);
            }
        }
    }
}

/// Deletes the registrations of worlds gone (those whose delete fails stay for the next tick),
/// and reports members whose registration vanished.
fn tend(l: &Lease, deadline: Instant) {
    let (gone, alive): (Vec<Tracked>, Vec<Tracked>) = std::mem::take(&mut lock(&l.state).tracked)
        .into_iter()
        .partition(|t| t.world.upgrade().is_none_or(|w| w.removed.load(Ordering::Acquire)));
    lock(&l.state).tracked.extend(alive);
    for t in gone {
        if block_on(l.client.delete(&t.reg.key, deadline, None)).is_err() {
            lock(&l.state).tracked.push(t);
        }
    }
    let dirs: Vec<String> = lock(&l.state)
        .tracked
        .iter()
        .filter(|t| t.world.upgrade().is_some_and(|w| !w.removed.load(Ordering::Acquire)))
        .map(|t| t.reg.gen_dir.clone())
        .collect();
    for dir in dirs {
        let Ok((_, kvs)) = block_on(l.client.range_prefix(&format!("{dir}rank/"), deadline, None)) else { continue };
        let present: BTreeSet<usize> =
            kvs.iter().filter_map(|kv| kv.key.rsplit('/').next().and_then(|r| r.parse().ok())).collect();
        let mut st = lock(&l.state);
        for t in st.tracked.iter_mut().filter(|t| t.reg.gen_dir == dir) {
            // A member seen again (its process re-registered after an expiry) may go again.
            t.gone.retain(|r| !present.contains(r));
            let newly: Vec<usize> =
                (0..t.reg.size).filter(|r| *r != t.reg.rank && !present.contains(r) && !t.gone.contains(r)).collect();
            for r in newly {
                t.gone.insert(r);
                if let Some(ev) = t.events.upgrade() {
                    ev.push(Event::MemberGone { name: t.reg.name.clone(), generation: t.reg.generation, rank: r });
                }
            }
        }
    }
}
