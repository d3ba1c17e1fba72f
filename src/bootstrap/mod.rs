//! Forming a world: the rendezvous root, the join protocol, and the links between ranks.
//!
//! 1. Every rank opens a peer listener and connects to the world's **root** (a thread in the
//!    process that made the [`UniqueId`](crate::UniqueId), or in rank 0's process for the
//!    address form) with a hello: secret, world name, rank, size, listener address, host
//!    identity, and the generation it proposes.
//! 2. Once all ranks have said hello, the root answers each with the table of all ranks'
//!    addresses, the world instance id (random) and the generation (the largest proposed).
//!    Wrong secrets and garbage are refused with a log line; ranks that disagree on size, or
//!    claim the same rank, fail the formation for everyone with a message saying so.
//! 3. Each rank connects to every lower rank's listener and accepts from every higher rank;
//!    each connection opens with a link hello (world id, generation, secret, ranks) that the
//!    acceptor checks and acknowledges.
//!
//! Every step is bounded by the formation deadline; nothing here touches another world.

pub(crate) mod addr;
#[cfg(feature = "etcd")]
pub(crate) mod etcd;
pub(crate) mod exec;
pub(crate) mod lanes;
mod link;
mod root;

use link::*;
use root::{decode_codes, decode_reply, Hello, Table};
pub(crate) use root::{spawn_root, RootConfig, MAX_WORLD_SIZE};

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::api::error::{Error, ErrorKind, Result};
use crate::engine::wire::{MsgReader, MsgWriter};
use crate::sys;
use crate::sys::sync::{lock, Arc, AtomicBool};
use crate::transport::loopback::QueueLink;
use crate::transport::shm::{Segment, ShmLink};
use crate::transport::tcp::TcpLink;
use crate::transport::{Link, TransportKind};
use addr::MAX_MESSAGE;

/// How a rank finds its world's root.
#[derive(Debug, Clone)]
pub(crate) enum Rendezvous {
    Id(crate::UniqueId),
    Address(String),
    /// An elastic formation: through the door of the rank that leads it (`lead`: this one),
    /// for hellos that carry `key`; every rank's `agree` must be the leader's.
    Door {
        door: String,
        key: u64,
        lead: bool,
        agree: String,
        /// This rank's offer of lanes of the parent's links (`shrink`), if it makes one.
        lanes: Option<lanes::DoorLanesSlot>,
    },
    /// A member's part of a `grow`: through the id's root, as [`Rendezvous::Id`], with this
    /// rank's offer of lanes of the parent's links to the other members (the newcomers come
    /// with `Id` and link to everyone as in any formation).
    Grow {
        id: crate::UniqueId,
        lanes: Option<lanes::DoorLanesSlot>,
    },
    /// A world made from a world whose links are made already, on lanes of the parent's
    /// (`lanes.rs`): it is registered at once, on the caller's thread.
    Prepared(Prepared),
    /// Through etcd (`etcd/`): no root; the store holds the table.
    #[cfg(feature = "etcd")]
    Etcd(etcd::Target),
}

/// A rank's registration in etcd, kept for the life of its world (`etcd/lease.rs`); there is
/// none without the `etcd` feature.
#[cfg(feature = "etcd")]
pub(crate) use etcd::Registration;
#[cfg(not(feature = "etcd"))]
pub(crate) enum Registration {}

/// The links of a world formed on lanes, handed to its registration once.
#[derive(Clone)]
pub(crate) struct Prepared(pub Arc<crate::sys::sync::Mutex<Option<Formed>>>);

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("links made on lanes")
    }
}

/// What a rank needs to form a world.
#[derive(Debug, Clone)]
pub(crate) struct JoinSpec {
    pub name: String,
    pub rank: usize,
    pub size: usize,
    pub rendezvous: Rendezvous,
    pub secret: Vec<u8>,
    pub interface: Option<String>,
    /// The crate chooses each pair's transport (`TransportChoice::Auto`): shared memory on one
    /// host, RDMA across hosts where both ends can use it, TCP otherwise.
    pub auto: bool,
    /// Every peer must be reached by RDMA.
    pub rdma: bool,
    pub generation: u32,
    pub timeout: Duration,
    /// Set when the formation is abandoned: every step that waits looks at it.
    pub cancel: Arc<AtomicBool>,
    /// Socket buffer size of TCP links (`None`: the kernel's).
    pub socket_buffer: Option<usize>,
}

/// A formed world's connections.
pub(crate) struct Formed {
    pub generation: u32,
    pub world_id: u64,
    pub links: Vec<Option<Box<dyn Link>>>,
    /// Links to peers on this host that use TCP although shared memory was wanted.
    pub shm_fallbacks: u64,
    /// Links on lanes of a parent world's segments or channels of its sockets (`lanes.rs`).
    pub lane_links: u64,
    /// Each rank's door, for elastic formations later.
    pub doors: Vec<String>,
    /// The secret the ranks proved to the root.
    pub secret: Vec<u8>,
    /// This rank's registration, for a world formed through etcd.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub etcd: Option<Registration>,
}

impl Formed {
    /// A formed world: its generation and id, the links to every peer (`lane_links` of them on
    /// lanes), each rank's door and the secret; no TCP fallback or etcd registration counted
    /// yet.
    pub(crate) fn new(
        generation: u32,
        world_id: u64,
        links: Vec<Option<Box<dyn Link>>>,
        lane_links: u64,
        doors: Vec<String>,
        secret: Vec<u8>,
    ) -> Formed {
        Formed { generation, world_id, links, shm_fallbacks: 0, lane_links, doors, secret, etcd: None }
    }
}

fn formation_err(name: &str, rank: usize, e: impl std::fmt::Display) -> String {
    format!("forming world '{name}' (rank {rank}): {e}")
}

/// Joins a world: hello to the root, table back, links to every peer. A task of the formation
/// thread (`exec.rs`), bounded by `spec.timeout`.
pub(crate) async fn join(spec: &JoinSpec) -> Result<Formed> {
    let deadline = Instant::now() + spec.timeout;
    let (name, rank, size) = (spec.name.as_str(), spec.rank, spec.size);
    // In the address form rank 0 runs the root; it is joined before this returns, so that the
    // address is free again for the next world formed there.
    let mut own_root = None;
    let (root, secret) = match &spec.rendezvous {
        Rendezvous::Id(id) | Rendezvous::Grow { id, .. } => (id.root, id.secret.to_vec()),
        Rendezvous::Door { door, key, lead, agree, .. } => {
            if *lead {
                let cfg = RootConfig::for_door(spec.secret.clone(), name, size as u32, deadline, *key, agree)
                    .with_cancel(spec.cancel.clone());
                // Not joined: it has no address to free, and ends once the table is out.
                drop(spawn_root(None, cfg)?);
            }
            (addr::resolve(door)?, spec.secret.clone())
        }
        Rendezvous::Prepared(_) => return Err(Error::internal("a world on lanes has nothing to join")),
        #[cfg(feature = "etcd")]
        Rendezvous::Etcd(t) => return etcd::join(spec, t).await,
        Rendezvous::Address(a) => {
            let root = addr::resolve(a)?;
            if rank == 0 {
                let listener = TcpListener::bind(root)
                    .map_err(|e| Error::system(formation_err(name, rank, format!("listening on {root}")), e))?;
                let cfg = RootConfig::for_address(spec.secret.clone(), name, size as u32, deadline)
                    .with_cancel(spec.cancel.clone());
                own_root = Some(spawn_root(Some(listener), cfg)?);
            }
            (root, spec.secret.clone())
        }
    };
    let r = join_root(spec, root, secret, deadline).await;
    if let Some(h) = own_root {
        h.ended().await;
    }
    r
}

async fn join_root(spec: &JoinSpec, root: SocketAddr, secret: Vec<u8>, deadline: Instant) -> Result<Formed> {
    let (name, rank, size) = (spec.name.as_str(), spec.rank, spec.size);
    let what = || formation_err(name, rank, "deadline passed while reaching the root");
    let cancel = Some(&*spec.cancel);
    let to_root = addr::connect_retry(root, deadline, cancel, &what).await?;
    let local_ip: IpAddr = match &spec.interface {
        Some(i) => addr::interface_ip(i)?,
        None => to_root.local_addr().map_err(|e| Error::system("local address", e))?.ip(),
    };
    let listener = addr::listen_any_port(local_ip)?;
    let my_addr = listener.local_addr().map_err(|e| Error::system("listener address", e))?;
    info!("world '{name}' rank {rank}: listening for peers on {my_addr}");
    let take = |l: &Option<lanes::DoorLanesSlot>| l.as_ref().and_then(|l| lock(&l.0).take());
    let (key, agree, door_lanes) = match &spec.rendezvous {
        Rendezvous::Door { key, agree, lanes, .. } => (*key, agree.clone(), take(lanes)),
        Rendezvous::Grow { lanes, .. } => (0, String::new(), take(lanes)),
        _ => (0, String::new(), None),
    };
    let hello = Hello {
        secret: secret.clone(),
        name: name.to_owned(),
        rank: rank as u32,
        size: size as u32,
        generation: spec.generation,
        addr: my_addr.to_string(),
        host: sys::host_identity(),
        timeout_ms: spec.timeout.as_millis() as u64,
        door: root::door_address(local_ip)?.to_string(),
        key,
        agree,
        lanes: door_lanes.as_ref().map(|l| l.offer.encode(l.parent_size)).unwrap_or_default(),
    };
    addr::send_msg(&to_root, &hello.encode(), deadline, cancel)
        .await
        .map_err(|e| Error::system(formation_err(name, rank, "sending hello to the root"), e))?;
    let reply = addr::recv_msg(&to_root, deadline, cancel).await;
    let table = root_answer(spec, reply, "arrive", decode_reply)?;
    if table.peers.len() != size {
        return Err(Error::internal(formation_err(name, rank, "the root sent a table of the wrong size")));
    }
    // This rank offered lanes (so the table carries them): it takes part in the second round.
    let mut links = None;
    if let (Some(mine), false) = (door_lanes, table.lanes.is_empty()) {
        links = on_lanes(spec, mine, &table, &to_root, deadline).await?;
    }
    drop(to_root);
    match links {
        // Every link on lanes (a shrink): nothing to connect.
        Some(l) if l.iter().all(Option::is_some) => {
            let lane_links = size as u64 - 1;
            let doors = table.peers.iter().map(|p| p.2.clone()).collect();
            Ok(Formed::new(table.generation, table.world_id, l, lane_links, doors, secret))
        }
        l => linked(spec, table, secret, link::Door::new(listener)?, deadline, l).await,
    }
}

/// What the root answered (a table, or the codes of the second round), or why there is no
/// answer: the other ranks did not all `come` before the deadline, the root went away, or it
/// refused.
fn root_answer<T>(
    spec: &JoinSpec,
    reply: io::Result<Vec<u8>>,
    come: &str,
    decode: fn(&[u8]) -> root::RootReply<T>,
) -> Result<T> {
    let (name, rank) = (spec.name.as_str(), spec.rank);
    let reply = reply.map_err(|e| {
        if e.kind() == io::ErrorKind::TimedOut {
            Error::timeout(formation_err(name, rank, format!("the other ranks did not all {come} before the deadline")))
        } else {
            Error::new(ErrorKind::System, formation_err(name, rank, format!("the root went away: {e}")))
        }
    })?;
    match decode(&reply) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(Error::new(e.kind(), formation_err(name, rank, e.message()))),
        Err(why) => Err(Error::internal(formation_err(name, rank, format!("bad reply from the root: {why}")))),
    }
}

/// The second round of a formation whose table carries lanes (a `shrink`, a `grow`), for a rank
/// that offered lanes (`mine`): claims its lanes where every member's offer allows it, tells
/// the root how that went, and hears how it went for all. If every rank that offered lanes
/// claimed them, this rank's links on lanes, in the new world's rank order (`None` for the
/// peers still to be linked: a `grow`'s newcomers); otherwise `None`, and every rank connects
/// links of its own with the same table.
async fn on_lanes(
    spec: &JoinSpec,
    mut mine: lanes::DoorLanes,
    table: &Table,
    to_root: &TcpStream,
    deadline: Instant,
) -> Result<Option<Vec<Option<Box<dyn Link>>>>> {
    let (name, rank, size) = (spec.name.as_str(), spec.rank, spec.size);
    let cancel = Some(&*spec.cancel);
    let (mut code, mut claimed) = (lanes::CODE_NONE, None);
    let offers = lanes::offers_by_parent(&mine, &table.lanes);
    if let Some(offers) = offers.filter(|o| lanes::possible_among(o, &mine.members)) {
        match lanes::claim(&mut mine.held, mine.parent_rank, &mine.members, &offers, table.world_id) {
            Ok(c) => (code, claimed) = (lanes::CODE_CLAIMED, Some(c)),
            Err(why) => {
                info!("world '{name}' rank {rank}: no lanes ({why}); forming links of its own");
                code = lanes::CODE_FAILED;
            }
        }
    }
    let round = async {
        addr::write_all(to_root, &[code], deadline, cancel).await?;
        addr::recv_msg(to_root, deadline, cancel).await
    };
    let reply = round.await;
    // What the offer held is not needed past the round.
    drop(mine);
    let codes = root_answer(spec, reply, "answer", decode_codes)?;
    let offered = table.lanes.iter().map(|l| !l.is_empty());
    let used = codes.len() == size && offered.zip(&codes).all(|(o, c)| !o || *c == lanes::CODE_CLAIMED);
    Ok(claimed.filter(|_| used).map(|c| c.links(size)))
}

/// A formation's end once every rank has the table (from a root, or from etcd): the links to
/// every peer, and what the world keeps.
/// `made`: links on lanes made already (in rank order), if any.
async fn linked(
    spec: &JoinSpec,
    table: Table,
    secret: Vec<u8>,
    door: link::Door,
    deadline: Instant,
    made: Option<Vec<Option<Box<dyn Link>>>>,
) -> Result<Formed> {
    let mut shm_fallbacks = 0;
    let lane_links = made.as_ref().map_or(0, |m| m.iter().filter(|l| l.is_some()).count().saturating_sub(1)) as u64;
    let links = connect_links(spec, &table, &secret, door, deadline, &mut shm_fallbacks, made).await?;
    let doors = table.peers.into_iter().map(|p| p.2).collect();
    let formed = Formed::new(table.generation, table.world_id, links, lane_links, doors, secret);
    Ok(Formed { shm_fallbacks, ..formed })
}
