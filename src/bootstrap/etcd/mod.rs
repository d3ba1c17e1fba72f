//! Forming a world through etcd (feature `etcd`): no process acts as the root, and the
//! store keeps a directory of the worlds (`docs/etcd.md`).
//!
//! An etcd address is `etcd://host:port[,host:port...]/prefix`. Under the prefix, world `name`
//! has (the name with `%` and `/` percent-encoded, generations as ten digits):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `<prefix>/worlds/<name>/gen` | the last generation allocated, in decimal | none: it only ever rises |
//! | `<prefix>/worlds/<name>/<gen>/meta` | `{"world_id", "secret", "size"}`, made by the rank that allocated the generation | that rank's |
//! | `<prefix>/worlds/<name>/<gen>/rank/<r>` | rank `r`'s listener, host identity, door, pid, host name and size | its process's |
//! | `<prefix>/worlds/<name>/<gen>/sealed` | `{"size"}`, once every rank was there | none |
//!
//! A rank registers in the lowest generation above the last sealed one whose size is its own,
//! that is not sealed and whose slot for its rank is free, with one transaction that checks
//! exactly that; if there is none, it allocates the next generation (a compare-and-swap on
//! `gen`, with the new `meta` in the same transaction) and tries again. So two sets of ranks
//! forming one name at once each fill a generation of their own, and a generation number is
//! never given twice. It then watches its generation until all `size` ranks are registered (or
//! the deadline passes), seals it, and the ranks connect their links as in any formation
//! (`link.rs`), with the generation's `world_id` and secret (or `WorldOptions::secret`).
//!
//! Each process keeps one lease per etcd cluster alive (`lease.rs`); its registrations vanish
//! with it, within the lease's TTL, when the process dies. The data path never depends on etcd.

mod client;
mod http;
mod lease;

pub(crate) use client::{CallError, Client};
pub(crate) use lease::Registration;

use std::net::{SocketAddr, UdpSocket};
use std::time::Instant;

use serde_json::{json, Value};

use super::root::{door_address, Table};
use super::{formation_err, linked, Formed, JoinSpec};
use crate::api::error::{Error, ErrorKind, Result};
use crate::sys;
use crate::sys::sync::Arc;
use client::{Cmp, Kv, Op};

/// Where a world forms through etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub client: Client,
    /// The key prefix, without a trailing `/`.
    pub prefix: String,
}

impl Target {
    /// Parses `etcd://host:port[,host:port...]/prefix` (host names are looked up here: call it on
    /// the caller's thread). An empty prefix is `multiworld`.
    pub(crate) fn parse(url: &str) -> Result<Target> {
        let bad = |why: &str| {
            Error::invalid_arg(format!(
                "'{url}' is not an etcd address ({why}): etcd://host:port[,host:port...]/prefix"
            ))
        };
        let rest = url.strip_prefix("etcd://").ok_or_else(|| bad("no etcd:// scheme"))?;
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if hosts.is_empty() {
            return Err(bad("no endpoint"));
        }
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            endpoints.push(super::addr::resolve(h.trim())?);
        }
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() { "multiworld".to_owned() } else { prefix.to_owned() };
        Ok(Target { client: Client::new(endpoints), prefix })
    }

    /// The target in words, for messages.
    pub(crate) fn describe(&self) -> String {
        let hosts: Vec<String> = self.client.endpoints.iter().map(|e| e.to_string()).collect();
        format!("etcd://{}/{}", hosts.join(","), self.prefix)
    }
}

/// True when `addr` names etcd rather than a root's `host:port`.
pub(crate) fn is_etcd(addr: &str) -> bool {
    addr.starts_with("etcd://")
}

/// A world name as a key segment: `%` and `/` percent-encoded.
pub(crate) fn key_name(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2F")
}

/// The inverse of [`key_name`].
pub(crate) fn name_of_key(seg: &str) -> String {
    seg.replace("%2F", "/").replace("%25", "%")
}

/// The keys of one world.
pub(crate) struct Keys {
    /// `<prefix>/worlds/<name>/`
    pub world: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, name: &str) -> Keys {
        Keys { world: format!("{prefix}/worlds/{}/", key_name(name)) }
    }
    fn counter(&self) -> String {
        format!("{}gen", self.world)
    }
    fn gen(&self, g: u32) -> String {
        format!("{}{g:010}/", self.world)
    }
    fn meta(&self, g: u32) -> String {
        format!("{}meta", self.gen(g))
    }
    fn sealed(&self, g: u32) -> String {
        format!("{}sealed", self.gen(g))
    }
    pub(crate) fn rank(&self, g: u32, r: usize) -> String {
        format!("{}rank/{r:06}", self.gen(g))
    }
}

/// One generation as the store shows it.
#[derive(Debug, Default, Clone)]
pub(crate) struct Generation {
    pub meta: Option<Value>,
    pub sealed: bool,
    /// Registered ranks and their values.
    pub ranks: std::collections::BTreeMap<usize, Value>,
}

impl Generation {
    pub(crate) fn size(&self) -> Option<usize> {
        let from = |v: &Value| v.get("size").and_then(Value::as_u64).map(|s| s as usize);
        self.meta.as_ref().and_then(from).or_else(|| self.ranks.values().next().and_then(from))
    }
}

/// A world's keys, read: the generation counter (and its revision) and each generation.
#[derive(Debug, Default)]
pub(crate) struct View {
    pub counter: u32,
    pub counter_rev: i64,
    pub gens: std::collections::BTreeMap<u32, Generation>,
}

impl View {
    /// Reads the keys of a world (`kvs` of a range over `keys.world`).
    pub(crate) fn parse(keys: &Keys, kvs: &[Kv]) -> View {
        let mut v = View::default();
        for kv in kvs {
            let Some(rest) = kv.key.strip_prefix(&keys.world) else { continue };
            if rest == "gen" {
                v.counter = String::from_utf8_lossy(&kv.value).trim().parse().unwrap_or(0);
                v.counter_rev = kv.mod_revision;
                continue;
            }
            let Some((g, what)) = rest.split_once('/') else { continue };
            let Ok(g) = g.parse::<u32>() else { continue };
            let entry = v.gens.entry(g).or_default();
            let value = || serde_json::from_slice::<Value>(&kv.value).unwrap_or(Value::Null);
            match what {
                "meta" => entry.meta = Some(value()),
                "sealed" => entry.sealed = true,
                _ => {
                    if let Some(r) = what.strip_prefix("rank/").and_then(|r| r.parse().ok()) {
                        entry.ranks.insert(r, value());
                    }
                }
            }
        }
        v
    }

    /// The last sealed generation (0: none).
    pub(crate) fn last_sealed(&self) -> u32 {
        self.gens.iter().filter(|(_, g)| g.sealed).map(|(n, _)| *n).max().unwrap_or(0)
    }

    /// The generation rank `rank` of a world of `size` may register in, if any.
    fn open_for(&self, rank: usize, size: usize) -> Option<u32> {
        let floor = self.last_sealed();
        self.gens
            .iter()
            .filter(|(n, g)| **n > floor && !g.sealed && g.meta.is_some())
            .filter(|(_, g)| g.size() == Some(size) && !g.ranks.contains_key(&rank))
            .map(|(n, _)| *n)
            .next()
    }
}

/// The address this host reaches `to` from (no packet is sent): where to listen for peers.
fn local_ip_toward(to: SocketAddr) -> Option<std::net::IpAddr> {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0".parse().ok()? } else { "[::]:0".parse().ok()? };
    let s = UdpSocket::bind(any).ok()?;
    s.connect(to).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the live buffer.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

/// How one attempt at a generation ended, short of forming.
enum Attempt {
    /// Try again in another generation, if time is left: this one cannot form (a later one
    /// was sealed, its maker or this rank's registration vanished, a peer could not be
    /// reached once it was sealed).
    Again(Error),
    Fail(Error),
}

/// The error of an etcd call during the formation of `name` by `rank`.
fn call_error(name: &str, rank: usize, at: &str, e: CallError) -> Error {
    let msg = formation_err(name, rank, format!("through {at}: {e}"));
    match e {
        CallError::Unreachable(_) => Error::timeout(msg),
        CallError::Abandoned | CallError::Refused(_) => Error::new(ErrorKind::System, msg),
    }
}

/// Where to listen for peers: the configured interface (`WorldOptions::interface`,
/// `MW_SOCKET_IFNAME`), else the address this host reaches etcd from, unless that is loopback
/// (a local etcd or proxy says nothing of how peers reach this host), else the first
/// interface that is up.
fn listen_ip(spec: &JoinSpec, client: &Client) -> Result<std::net::IpAddr> {
    if let Some(ip) = super::addr::configured_ip(spec.interface.as_deref()) {
        return ip;
    }
    match client.endpoints.first().and_then(|e| local_ip_toward(*e)) {
        Some(ip) if !ip.is_loopback() => Ok(ip),
        _ => super::addr::default_ip(None),
    }
}

/// Joins a world through etcd (`Rendezvous::Etcd`): registration, the wait for every rank,
/// then links as in any formation; again in a later generation when one cannot form. A task
/// of the formation thread, bounded by `spec.timeout`.
pub(crate) async fn join(spec: &JoinSpec, target: &Target) -> Result<Formed> {
    let deadline = Instant::now() + spec.timeout;
    let (name, rank) = (spec.name.as_str(), spec.rank);
    let cancel = Some(&*spec.cancel);
    let at = target.describe();
    let lease = lease::for_cluster(&target.client);
    let ip = listen_ip(spec, &target.client)?;
    let keys = Keys::new(&target.prefix, name);
    loop {
        let listener = super::addr::listen_any_port(ip)?;
        let my_addr = listener.local_addr().map_err(|e| Error::system("listener address", e))?;
        let door = super::link::Door::new(listener)?;
        // The nonce tells this attempt's registration from any other with the same rank.
        let me = json!({
            "addr": my_addr.to_string(),
            "host": sys::host_identity(),
            "door": door_address(ip)?.to_string(),
            "pid": std::process::id(),
            "hostname": hostname(),
            "size": spec.size,
            "nonce": sys::random_u64().to_string(),
        })
        .to_string();
        let (gen, key) = register(spec, target, &keys, &lease, me.as_bytes(), deadline).await?;
        info!("world '{name}' rank {rank}: registered in generation {gen} at {at}");
        let attempt = wait_and_link(spec, target, &keys, gen, me.as_bytes(), door, deadline).await;
        match attempt {
            Ok(mut formed) => {
                let dir = keys.gen(gen);
                formed.etcd =
                    Some(Registration::new(lease.clone(), key, me.into_bytes(), name, gen, rank, spec.size, dir));
                return Ok(formed);
            }
            Err(a) => {
                // Leave the generation (best effort, and only this attempt's key): a rank that
                // gave up must not be counted.
                unregister(&target.client, &key, me.as_bytes()).await;
                match a {
                    Attempt::Again(e) if Instant::now() < deadline && !super::addr::is_cancelled(cancel) => {
                        info!("world '{name}' rank {rank}: forming again in another generation ({e})");
                    }
                    Attempt::Again(e) | Attempt::Fail(e) => return Err(e),
                }
            }
        }
    }
}

/// Deletes `key` if it still holds `value` (this attempt's registration, not a later one's).
async fn unregister(client: &Client, key: &str, value: &[u8]) {
    let quick = Instant::now() + std::time::Duration::from_secs(1);
    let _ = client.txn(&[Cmp::Value(key, value)], &[Op::Delete(key)], quick, None).await;
}

/// Registers this rank (value `me`) in an open generation, or allocates the next one with its
/// registration in it; the generation and the key.
async fn register(
    spec: &JoinSpec,
    target: &Target,
    keys: &Keys,
    lease: &Arc<lease::Lease>,
    me: &[u8],
    deadline: Instant,
) -> Result<(u32, String)> {
    let (name, rank, size) = (spec.name.as_str(), spec.rank, spec.size);
    let cancel = Some(&*spec.cancel);
    let (client, at) = (&target.client, target.describe());
    let fail = |e| call_error(name, rank, &at, e);
    let nonce = serde_json::from_slice::<Value>(me).ok().and_then(|v| v.get("nonce").cloned());
    let mut lease_id = lease.id(deadline, cancel).await.map_err(fail)?;
    loop {
        let (_, kvs) = client.range_prefix(&keys.world, deadline, cancel).await.map_err(fail)?;
        let view = View::parse(keys, &kvs);
        // A transaction that was applied although its answer was lost (the call retried it).
        if let Some((g, _)) =
            view.gens.iter().find(|(_, g)| g.ranks.get(&rank).and_then(|v| v.get("nonce")) == nonce.as_ref())
        {
            return Ok((*g, keys.rank(*g, rank)));
        }
        let (g, key, r) = match view.open_for(rank, size) {
            Some(g) => {
                let (sealed, mine, meta) = (keys.sealed(g), keys.rank(g, rank), keys.meta(g));
                let cmps = [Cmp::Absent(&sealed), Cmp::Absent(&mine), Cmp::Present(&meta)];
                let r = client.txn(&cmps, &[Op::Put(&mine, me, lease_id)], deadline, cancel).await;
                (g, mine, r)
            }
            None => {
                // The next generation, with its meta and this rank in it, by compare-and-swap
                // on the counter.
                let next = view.counter + 1;
                let mut secret = [0u8; 32];
                sys::random_bytes(&mut secret).map_err(|e| Error::system("random secret", e))?;
                let meta = json!({ "world_id": sys::random_u64().to_string(), "secret": hex(&secret), "size": size });
                let meta = meta.to_string();
                let (counter, meta_key, mine, text) =
                    (keys.counter(), keys.meta(next), keys.rank(next, rank), next.to_string());
                let ops = [
                    Op::Put(&counter, text.as_bytes(), 0),
                    Op::Put(&meta_key, meta.as_bytes(), lease_id),
                    Op::Put(&mine, me, lease_id),
                ];
                let r = client.txn(&[Cmp::ModRevision(&counter, view.counter_rev)], &ops, deadline, cancel).await;
                (next, mine, r)
            }
        };
        match r {
            Ok(true) => return Ok((g, key)),
            Ok(false) => continue,
            // The lease expired while etcd or this process was stopped: take a new one.
            Err(e) if lease::lease_gone(&e) => {
                lease.invalidate(lease_id);
                lease_id = lease.id(deadline, cancel).await.map_err(fail)?;
            }
            Err(e) => {
                // The transaction may have been applied: take back what it may have put.
                unregister(client, &key, me).await;
                return Err(fail(e));
            }
        }
    }
}

/// The world id and secret of generation `g`, from its meta key (the secret from
/// `WorldOptions::secret` where one is given), if usable.
fn world_of(g: &Generation, spec: &JoinSpec) -> Option<(u64, Vec<u8>)> {
    let meta = g.meta.as_ref()?;
    let world_id: u64 = meta.get("world_id").and_then(Value::as_str).and_then(|s| s.parse().ok()).unwrap_or(0);
    let secret = if spec.secret.is_empty() {
        meta.get("secret").and_then(Value::as_str).and_then(unhex).unwrap_or_default()
    } else {
        spec.secret.clone()
    };
    (world_id != 0 && !secret.is_empty()).then_some((world_id, secret))
}

/// Waits until every rank of generation `gen` registered, seals it, and connects the links.
async fn wait_and_link(
    spec: &JoinSpec,
    target: &Target,
    keys: &Keys,
    gen: u32,
    me: &[u8],
    mut door: super::link::Door,
    deadline: Instant,
) -> std::result::Result<Formed, Attempt> {
    let (name, rank, size) = (spec.name.as_str(), spec.rank, spec.size);
    let cancel = Some(&*spec.cancel);
    let at = target.describe();
    let client = &target.client;
    let fail = |e| Attempt::Fail(call_error(name, rank, &at, e));
    let again = |why: String| Attempt::Again(Error::new(ErrorKind::System, formation_err(name, rank, why)));
    let mine: Option<Value> = serde_json::from_slice(me).ok();
    let mut watch = None;
    let g = loop {
        let (rev, kvs) = client.range_prefix(&keys.world, deadline, cancel).await.map_err(fail)?;
        let view = View::parse(keys, &kvs);
        let g = view.gens.get(&gen).cloned().unwrap_or_default();
        if g.ranks.get(&rank) != mine.as_ref() {
            return Err(again(format!("this rank's registration in generation {gen} at {at} vanished")));
        }
        if !g.sealed && view.last_sealed() > gen {
            return Err(again(format!("generation {} of '{name}' formed after generation {gen}", view.last_sealed())));
        }
        if g.meta.is_none() && !g.sealed {
            return Err(again(format!("generation {gen} at {at} lost its maker before it formed")));
        }
        if let Some((r, v)) = g.ranks.iter().find(|(_, v)| v.get("size").and_then(Value::as_u64) != Some(size as u64)) {
            return Err(Attempt::Fail(Error::invalid_usage(formation_err(
                name,
                rank,
                format!(
                    "rank {r} asks for a world of {} ranks, this rank for {size}",
                    v.get("size").unwrap_or(&Value::Null)
                ),
            ))));
        }
        if (0..size).all(|r| g.ranks.contains_key(&r)) {
            break g;
        }
        // Wait for the next change under the world's keys (or the deadline), answering this
        // rank's listener meanwhile: a peer that reached it by mistake (a dead rank's address,
        // its port now this listener's) is refused at once; a link hello of this generation,
        // from a rank that saw it complete first, is held for the links.
        if watch.is_none() {
            watch = Some(client.watch_prefix(&keys.world, rev + 1, deadline, cancel).await.map_err(fail)?);
        }
        let w = watch.as_mut().expect("opened above");
        let (world_id, secret) = world_of(&g, spec).unwrap_or_default();
        let expect =
            super::link::Expect { name, world_id, generation: gen, secret: &secret, rank, size, listeners: &[] };
        let next = loop {
            door.serve(&expect, None, deadline, cancel).await.map_err(Attempt::Fail)?;
            match w.next(deadline.min(Instant::now() + super::link::DOOR_TICK), cancel).await {
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut && Instant::now() < deadline => {}
                other => break other,
            }
        };
        match next {
            Ok(Some(_)) => {}
            Ok(None) => watch = None,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                let missing: Vec<usize> = (0..size).filter(|r| !g.ranks.contains_key(r)).collect();
                let others: Vec<String> = view
                    .gens
                    .iter()
                    .filter(|(n, o)| {
                        **n != gen && !o.sealed && !o.ranks.is_empty() && o.size().is_some_and(|s| s != size)
                    })
                    .map(|(n, o)| format!("generation {n} asks for {} ranks", o.size().unwrap_or(0)))
                    .collect();
                let hint = if others.is_empty() { String::new() } else { format!(" ({})", others.join(", ")) };
                return Err(Attempt::Fail(Error::timeout(formation_err(
                    name,
                    rank,
                    format!("ranks {missing:?} of {size} did not register in generation {gen} at {at} before the deadline{hint}"),
                ))));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                return Err(Attempt::Fail(Error::system(formation_err(name, rank, "etcd watch"), e)))
            }
            // A broken watch: look again with a new one.
            Err(_) => watch = None,
        }
    };
    drop(watch);
    let sealed = keys.sealed(gen);
    let seal = json!({ "size": size }).to_string();
    client
        .txn(&[Cmp::Absent(&sealed)], &[Op::Put(&sealed, seal.as_bytes(), 0)], deadline, cancel)
        .await
        .map_err(fail)?;
    let Some((world_id, secret)) = world_of(&g, spec) else {
        return Err(again(format!("generation {gen} at {at} has no usable meta key")));
    };
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    let peers: Vec<(String, String, String)> =
        (0..size).map(|r| &g.ranks[&r]).map(|v| (text(v, "addr"), text(v, "host"), text(v, "door"))).collect();
    let table = Table { generation: gen, world_id, peers, lanes: Vec::new() };
    match linked(spec, table, secret, door, deadline, None).await {
        Ok(formed) => Ok(formed),
        // A member registered but unreachable (its process died, and its registration waits
        // out its lease): the others try again in a later generation.
        Err(e) if e.kind() != ErrorKind::Timeout => Err(Attempt::Again(e)),
        Err(e) => Err(Attempt::Fail(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_endpoints_and_a_prefix() {
        let t = Target::parse("etcd://127.0.0.1:2379,127.0.0.1:2380/team/a/").unwrap();
        assert_eq!(t.client.endpoints.len(), 2);
        assert_eq!(t.prefix, "team/a");
        assert_eq!(Target::parse("etcd://127.0.0.1:2379").unwrap().prefix, "multiworld");
        for bad in ["etcd:///p", "http://127.0.0.1:2379/p", "etcd://nohostport/p"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(name_of_key(&key_name("a/b%c")), "a/b%c");
        assert!(!key_name("a/b").contains('/'));
    }

    fn kv(key: &str, value: &str) -> Kv {
        Kv { key: key.into(), value: value.as_bytes().to_vec(), create_revision: 1, mod_revision: 3, lease: 0 }
    }

    #[test]
    fn a_rank_joins_the_lowest_open_generation_of_its_size_above_the_last_sealed() {
        let k = Keys::new("p", "w");
        let meta = |n: usize| format!("{{\"size\":{n},\"world_id\":\"1\",\"secret\":\"00\"}}");
        let rank = |n: usize| format!("{{\"size\":{n}}}");
        let kvs = vec![
            kv(&k.counter(), "5"),
            kv(&k.meta(1), &meta(2)), // below the last sealed: never joined again
            kv(&k.sealed(2), "{}"),
            kv(&k.meta(3), &meta(2)),
            kv(&k.rank(3, 0), &rank(2)),
            kv(&k.meta(4), &meta(3)), // another size
            kv(&k.meta(5), &meta(2)),
        ];
        let v = View::parse(&k, &kvs);
        assert_eq!((v.counter, v.counter_rev), (5, 3));
        assert_eq!(v.open_for(1, 2), Some(3));
        assert_eq!(v.open_for(0, 2), Some(5), "rank 0's slot of generation 3 is taken");
        assert_eq!(v.open_for(0, 3), Some(4));
        assert_eq!(v.open_for(0, 4), None);
        assert_eq!(unhex(&hex(&[0, 1, 254, 255])).unwrap(), [0, 1, 254, 255]);
    }
}
