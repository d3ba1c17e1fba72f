//! The directory of worlds formed through etcd (feature `etcd`; `mw-worlds` prints it): what
//! the store says about each world under a prefix, read without joining anything.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::api::error::{Error, Result};
use crate::bootstrap::etcd::{name_of_key, CallError, Keys, Target, View};
use crate::bootstrap::exec::block_on;

/// A world generation registered in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldEntry {
    /// The world's name.
    pub name: String,
    /// Its generation.
    pub generation: u32,
    /// Its ranks.
    pub size: usize,
    /// Where it stands, as the store shows it.
    pub state: EntryState,
    /// The members registered now, by rank.
    pub members: Vec<Member>,
}

/// Where a world generation stands in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// Ranks are registering; not every rank is there yet.
    Forming,
    /// Every rank registered and the world formed; all are still registered.
    Formed,
    /// It formed, and some members' registrations are gone since (their processes died or left).
    Partial,
}

impl EntryState {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            EntryState::Forming => "forming",
            EntryState::Formed => "formed",
            EntryState::Partial => "partial",
        }
    }
}

/// One member of a world generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its rank.
    pub rank: usize,
    /// The host name of its process's machine.
    pub host: String,
    /// Its process id there.
    pub pid: u32,
    /// The address it listens on for its peers.
    pub addr: String,
}

fn call_err(t: &Target, e: CallError) -> Error {
    let msg = format!("reading the worlds at {}: {e}", t.describe());
    match e {
        CallError::Unreachable(_) => Error::timeout(msg),
        _ => Error::new(crate::ErrorKind::System, msg),
    }
}

/// Every world generation with members registered under the prefix of `url`
/// (`etcd://host:port[,host:port...]/prefix`), sorted by name and generation; etcd is given
/// `timeout` to answer.
pub fn list(url: &str, timeout: Duration) -> Result<Vec<WorldEntry>> {
    let t = Target::parse(url)?;
    read(&t, Instant::now() + timeout).map(|(_, w)| w)
}

/// Calls `on_change` with the worlds under `url`'s prefix now, then again after every change
/// to them, until it returns false; etcd is given `timeout` to answer each request (not to
/// have changes: a quiet directory is waited on for ever).
pub fn watch(url: &str, timeout: Duration, mut on_change: impl FnMut(&[WorldEntry]) -> bool) -> Result<()> {
    let t = Target::parse(url)?;
    loop {
        let (rev, worlds) = read(&t, Instant::now() + timeout)?;
        if !on_change(&worlds) {
            return Ok(());
        }
        let root = format!("{}/worlds/", t.prefix);
        let mut w = block_on(t.client.watch_prefix(&root, rev + 1, Instant::now() + timeout, None))
            .map_err(|e| call_err(&t, e))?;
        // Wait for a change (the watch's own notice carries none).
        loop {
            let far = Instant::now() + Duration::from_secs(3600);
            match block_on(w.next(far, None)) {
                Ok(Some(changes)) if changes.is_empty() => continue,
                Ok(Some(_)) => break,
                Ok(None) => break,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
                Err(e) => return Err(Error::system(format!("watching the worlds at {}", t.describe()), e)),
            }
        }
    }
}

/// The store's revision and its worlds.
fn read(t: &Target, deadline: Instant) -> Result<(i64, Vec<WorldEntry>)> {
    let root = format!("{}/worlds/", t.prefix);
    let (rev, kvs) = block_on(t.client.range_prefix(&root, deadline, None)).map_err(|e| call_err(t, e))?;
    let mut names: Vec<String> =
        kvs.iter().filter_map(|kv| kv.key.strip_prefix(&root)?.split('/').next().map(str::to_owned)).collect();
    names.dedup();
    let mut out = Vec::new();
    for seg in names {
        let name = name_of_key(&seg);
        let view = View::parse(&Keys::new(&t.prefix, &name), &kvs);
        for (g, gen) in &view.gens {
            if gen.ranks.is_empty() {
                continue;
            }
            let size = gen.size().unwrap_or(0);
            let state = match (gen.sealed, gen.ranks.len() == size) {
                (false, _) => EntryState::Forming,
                (true, true) => EntryState::Formed,
                (true, false) => EntryState::Partial,
            };
            let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
            let members = gen
                .ranks
                .iter()
                .map(|(r, v)| Member {
                    rank: *r,
                    host: text(v, "hostname"),
                    pid: v.get("pid").and_then(Value::as_u64).unwrap_or(0) as u32,
                    addr: text(v, "addr"),
                })
                .collect();
            out.push(WorldEntry { name: name.clone(), generation: *g, size, state, members });
        }
    }
    Ok((rev, out))
}
