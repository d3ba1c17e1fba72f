//! Elastic worlds: new worlds made from a world that exists, as NCCL's `ncclCommSplit`,
//! `ncclCommShrink` and `ncclCommGrow` and MPI's `MPI_Comm_split`, `MPI_Comm_dup` and ULFM's
//! `MPIX_Comm_shrink` make communicators from communicators ([`World::split`],
//! [`World::dup`], [`World::shrink`], [`World::grow`]).
//!
//! Every new world is an ordinary world of the process's manager (its name reserved, its
//! events raised, `remove_world` releases it) and its own fault domain, with links, sequence
//! numbers, generation and failure state of its own: breaking it leaves the parent alone, and
//! the other way round. How it forms:
//!
//! - `split`, `dup` and `grow` are collective over the parent: the ranks first **agree** over
//!   it, with one all-gather of what each was asked (which call, the new name, colour and key,
//!   the new size and id), bounded by the formation deadline. Ranks that were asked different
//!   things all get the same `InvalidUsage` naming the difference, and the parent is as it was.
//! - `shrink` is called by the survivors only, maybe on a broken parent, so nothing is agreed
//!   over the parent: each survivor's hello carries what it was asked, and the new world's root
//!   fails the formation for everyone when one says something else than the rank leading it.
//! - `dup` and `split` then form the new world on **lanes** of the parent's shared-memory
//!   segments where every pair of its members has one (`bootstrap/lanes.rs`): what the
//!   agreement carried and one more all-gather settle it, with no connection made.
//! - Otherwise one rank leads, the lowest old rank of the new world: it puts a root behind its
//!   process's **door** (`bootstrap/root.rs`; every rank learned every other's door when the
//!   parent formed) and the others reach it there, arriving in any order, each within its own
//!   formation deadline. `grow` uses the `UniqueId` its newcomers use.
//! - `shrink` and `grow` still link on lanes where they can: the members' hellos carry their
//!   offers, the root returns them with the table, and a second round through the root
//!   settles which pairs of members are on lanes (for `grow`, the newcomers' pairs never are).
//!
//! The new world's secret is the parent's with the parent's instance id: only its members
//! know both.

use crate::api::error::{Error, Result};
use crate::api::id::UniqueId;
use crate::api::manager::{form_on, name_refusal, next_generation, Inner};
use crate::api::options::{TransportChoice, WorldOptions};
use crate::api::request::{Completion, KeepAlive};
use crate::api::world::World;
use crate::bootstrap::lanes::{self, Held, Offer};
use crate::bootstrap::{self, MAX_WORLD_SIZE};
use crate::sys::crc32c::crc32c;
use crate::sys::sync::{Arc, AtomicU32, Ordering, Weak};

/// What a world remembers of its formation for the worlds made from it.
pub(crate) struct Lineage {
    /// The manager it is registered with (new worlds are registered there too).
    pub manager: Weak<Inner>,
    pub options: WorldOptions,
    /// The world instance's random id (its members know it; strangers do not).
    pub world_id: u64,
    /// The secret its ranks proved at formation.
    pub secret: Vec<u8>,
    /// Each rank's door (`bootstrap::door_address`).
    pub doors: Vec<String>,
    /// Collective elastic calls agreed over this world so far: every member makes them in the
    /// same order, so the count tells one call's formation from the next.
    pub calls: AtomicU32,
    /// This rank's shrinks of this world so far: the survivors' n-th shrinks meet (a retry
    /// after a failed one is a formation of its own).
    pub shrinks: AtomicU32,
}

impl Lineage {
    /// The secret of a world made from this one: this one's secret with its instance id,
    /// which only its members know.
    fn child_secret(&self) -> Vec<u8> {
        let mut secret = self.secret.clone();
        secret.extend_from_slice(&self.world_id.to_le_bytes());
        secret
    }
}

/// An agreement posted over the parent and not yet waited for; its buffers live until the
/// engine is done with them, whatever becomes of this.
struct Agreement {
    completion: Arc<Completion>,
    bufs: Arc<crate::api::request::Slot<(Vec<u8>, Vec<u8>)>>,
    ask: Ask,
    refused: Option<Error>,
    /// What this rank offered for lanes and holds until they are settled.
    held: Held,
}

/// What an agreement settled: every rank's ask and lane offer, the number of the call, and
/// what this rank holds for lanes.
struct Agreed {
    asks: Vec<Ask>,
    offers: Vec<Offer>,
    call: u32,
    held: Held,
}

impl Agreement {
    /// Waits for the agreement (driving the parent if nobody does) and judges it.
    fn finish(self, w: &World) -> Result<Agreed> {
        w.wait_for(std::slice::from_ref(&self.completion));
        self.completion.result().unwrap_or_else(|| Err(Error::internal("agreement ended without a result")))?;
        let n = w.lineage().calls.fetch_add(1, Ordering::AcqRel);
        if let Some(e) = self.refused {
            return Err(e);
        }
        let size = w.size();
        let (asks, offers): (Vec<Ask>, Vec<Offer>) = self
            .bufs
            .with(|(_, all)| {
                all.chunks(record_bytes(size))
                    .map(|r| (Ask::decode(&r[..RECORD]), Offer::decode(&r[RECORD..], size)))
                    .unzip()
            })
            .ok_or_else(|| Error::internal("agreement buffers"))?;
        let what = |d: String| {
            Error::invalid_usage(format!("{} of world '{}': {d}; nothing was formed", self.ask.what(), w.name()))
        };
        if let Some(r) = asks.iter().position(|a| a.refused) {
            return Err(what(format!("rank {r} refused its own arguments (it got InvalidArgument)")));
        }
        if let Some(d) = disagreement(&asks) {
            return Err(what(format!("the ranks disagree: {d}")));
        }
        Ok(Agreed { asks, offers, call: n, held: self.held })
    }
}

/// Bytes of one rank's agreement record in a parent of `size` ranks: its ask, then its offer.
fn record_bytes(size: usize) -> usize {
    RECORD + Offer::bytes(size)
}

/// Lanes are offered unless `MW_LANES=0` (to compare with links of their own, or to rule
/// lanes out when looking for a fault).
fn lanes_wanted() -> bool {
    std::env::var("MW_LANES").map_or(true, |v| v != "0")
}

/// A split whose agreement is posted: [`SplitStarted::finish`] waits for it and forms the
/// new world.
pub(crate) struct SplitStarted {
    agreement: Agreement,
    to: Target,
    name: String,
    color: Option<u32>,
}

impl SplitStarted {
    pub(crate) fn finish(self, w: &World) -> Result<Option<World>> {
        let agreed = self.agreement.finish(w)?;
        // Every new world, by colour: each rank computes all of them alike.
        let mut colors: Vec<u32> = agreed.asks.iter().filter_map(|a| a.color).collect();
        colors.sort_unstable();
        colors.dedup();
        let children: Vec<(u32, Vec<usize>)> = colors
            .into_iter()
            .map(|c| {
                let mut members: Vec<(u32, usize)> = agreed
                    .asks
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| a.color == Some(c))
                    .map(|(r, a)| (a.key, r))
                    .collect();
                members.sort_unstable();
                (c, members.into_iter().map(|m| m.1).collect())
            })
            .collect();
        let how = |c: u32| format!("split of world '{}' into '{}' by colour {c}", w.name(), self.name);
        w.form_made(&self.to, &self.name, Op::Split, agreed, &children, self.color, how)
    }
}

/// Where a new world is registered, and its options.
#[derive(Clone)]
pub(crate) struct Target {
    pub manager: Arc<Inner>,
    pub options: WorldOptions,
}

/// Which elastic call a rank makes (in its agreement record and door key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Split = 1,
    Dup = 2,
    Grow = 3,
    Shrink = 4,
}

impl Op {
    fn from_u32(v: u32) -> Option<Op> {
        [Op::Split, Op::Dup, Op::Grow, Op::Shrink].into_iter().find(|o| *o as u32 == v)
    }

    fn word(self) -> &'static str {
        match self {
            Op::Split => "split",
            Op::Dup => "dup",
            Op::Grow => "grow",
            Op::Shrink => "shrink",
        }
    }
}

/// Bytes of one rank's agreement record.
const RECORD: usize = 64;
/// Bytes of the new name carried in a record (the rest is compared by its checksum).
const NAME_PREFIX: usize = 32;

/// What one rank was asked, as agreed over the parent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ask {
    op: u32,
    /// This rank refused its own arguments.
    refused: bool,
    color: Option<u32>,
    key: u32,
    /// `grow`: the new size.
    size: u64,
    /// `grow`: a checksum of the id.
    id: u32,
    name_sum: u32,
    /// The name's first bytes, for messages.
    name: String,
}

impl Ask {
    fn new(op: Op, name: &str) -> Ask {
        let mut cut = name.len().min(NAME_PREFIX);
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut shown = name[..cut].to_owned();
        if cut < name.len() {
            shown.push('…');
        }
        Ask {
            op: op as u32,
            refused: false,
            color: None,
            key: 0,
            size: 0,
            id: 0,
            name_sum: crc32c(name.as_bytes()),
            name: shown,
        }
    }

    fn encode(&self) -> [u8; RECORD] {
        let mut b = [0u8; RECORD];
        b[0..4].copy_from_slice(&self.op.to_le_bytes());
        b[4] = self.color.is_some() as u8;
        b[5] = self.refused as u8;
        b[8..12].copy_from_slice(&self.color.unwrap_or(0).to_le_bytes());
        b[12..16].copy_from_slice(&self.key.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..28].copy_from_slice(&self.id.to_le_bytes());
        b[28..32].copy_from_slice(&self.name_sum.to_le_bytes());
        let n = self.name.as_bytes();
        let n = &n[..n.len().min(NAME_PREFIX)];
        b[32..32 + n.len()].copy_from_slice(n);
        b
    }

    fn decode(b: &[u8]) -> Ask {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut size = [0u8; 8];
        size.copy_from_slice(&b[16..24]);
        let name = &b[32..RECORD];
        let end = name.iter().position(|c| *c == 0).unwrap_or(name.len());
        Ask {
            op: u32_at(0),
            refused: b[5] != 0,
            color: (b[4] != 0).then(|| u32_at(8)),
            key: u32_at(12),
            size: u64::from_le_bytes(size),
            id: u32_at(24),
            name_sum: u32_at(28),
            name: String::from_utf8_lossy(&name[..end]).into_owned(),
        }
    }

    fn what(&self) -> &'static str {
        Op::from_u32(self.op).map_or("an unknown call", Op::word)
    }
}

/// The first difference between what the ranks were asked, in words; `None` when they agree.
/// Colours and keys are each rank's own and may differ.
fn disagreement(asks: &[Ask]) -> Option<String> {
    let first = &asks[0];
    for (r, a) in asks.iter().enumerate().skip(1) {
        if a.op != first.op {
            return Some(format!("rank 0 calls {}, rank {r} calls {}", first.what(), a.what()));
        }
        if a.name_sum != first.name_sum {
            return Some(format!("rank 0 names the new world '{}', rank {r} names it '{}'", first.name, a.name));
        }
        if a.size != first.size {
            return Some(format!("rank 0 grows the world to {} ranks, rank {r} to {}", first.size, a.size));
        }
        if a.id != first.id {
            return Some(format!("rank 0 and rank {r} grow the world with different ids"));
        }
    }
    None
}

/// The door key of an elastic formation: the parent's instance id mixed with the call, so
/// that two formations led at one door never take each other's ranks. Each field goes through
/// the mix in turn (`sys::mix64`), so no two fields can cancel out.
fn door_key(world_id: u64, op: Op, call: u32, color: u32) -> u64 {
    let mut z = crate::sys::mix64(world_id);
    for field in [op as u64, call as u64, color as u64] {
        z = crate::sys::mix64(z.wrapping_add(0x9e37_79b9_7f4a_7c15) ^ field);
    }
    z | 1
}

impl World {
    /// Splits the world, collectively (NCCL's `ncclCommSplit`, MPI's `MPI_Comm_split`): every
    /// rank calls it with the same `name`; the ranks with the same `color` form a new world
    /// named `name`, ranked by `(key, old rank)`. A rank with colour `None` (NCCL's
    /// `NCCL_SPLIT_NOCOLOR`) takes part, joins nothing and gets `Ok(None)`. The parent is
    /// untouched. Bounded by the formation deadline of the world's options: a rank that does
    /// not call it in that time breaks the parent, as an operation deadline would.
    pub fn split(&self, name: &str, color: Option<u32>, key: u32) -> Result<Option<World>> {
        self.split_into(&self.target()?, name, color, key)
    }

    /// [`World::split`], the new world registered with `to` (the C API gives each
    /// communicator a manager of its own).
    pub(crate) fn split_into(&self, to: &Target, name: &str, color: Option<u32>, key: u32) -> Result<Option<World>> {
        self.split_start(to, name, color, key, true)?.finish(self)
    }

    /// Posts a split's agreement (in this thread's order of operations on the world) and
    /// returns what finishes it, maybe on another thread (the C API's non-blocking split).
    pub(crate) fn split_start(
        &self,
        to: &Target,
        name: &str,
        color: Option<u32>,
        key: u32,
        driven: bool,
    ) -> Result<SplitStarted> {
        let ask = Ask { color, key, ..Ask::new(Op::Split, name) };
        let agreement = self.agree_post(to, name, &ask, None, driven, true)?;
        Ok(SplitStarted { agreement, to: to.clone(), name: name.to_owned(), color })
    }

    /// A new world of the same ranks, collectively (NCCL's `ncclCommSplit` with one colour,
    /// MPI's `MPI_Comm_dup`): independent of this one in traffic and in failure.
    pub fn dup(&self, name: &str) -> Result<World> {
        let to = self.target()?;
        let agreed = self.agree_post(&to, name, &Ask::new(Op::Dup, name), None, true, true)?.finish(self)?;
        let all = [(0, (0..self.size()).collect())];
        let how = |_| format!("dup of world '{}' as '{name}'", self.name());
        let w = self.form_made(&to, name, Op::Dup, agreed, &all, Some(0), how)?;
        w.ok_or_else(|| Error::internal("a dup formed no world"))
    }

    /// A new world of every rank but `exclude` (NCCL's `ncclCommShrink`, ULFM's
    /// `MPIX_Comm_shrink`), called by those ranks only, on a working or a broken world (say,
    /// once a peer died): the survivors are renumbered in old-rank order. They may call it at
    /// different moments, each within its formation deadline; every survivor must name the
    /// same ranks and the same `name`, or all get `InvalidUsage`. The parent is untouched (an
    /// excluded live rank may go on using it until it is removed or breaks).
    pub fn shrink(&self, name: &str, exclude: &[usize]) -> Result<World> {
        self.shrink_into(&self.target()?, name, exclude)
    }

    /// [`World::shrink`], the new world registered with `to`.
    pub(crate) fn shrink_into(&self, to: &Target, name: &str, exclude: &[usize]) -> Result<World> {
        self.usable_for_elastic()?;
        let ex = self.excluded(exclude)?;
        let survivors: Vec<usize> = (0..self.size()).filter(|r| !ex.contains(r)).collect();
        let how = format!("shrink of world '{}' into '{name}' excluding ranks {ex:?}", self.name());
        let attempt = self.lineage().shrinks.fetch_add(1, Ordering::AcqRel);
        let lanes = self.door_lanes(to, name, &survivors);
        let key = door_key(self.lineage().world_id, Op::Shrink, attempt, 0);
        self.form_through_door(to, name, &survivors, key, how, lanes)
    }

    /// This rank's offer of lanes for a world of the parent ranks `members` formed through a
    /// root (`shrink`, `grow`): of its links to the other members that are alive and on shared
    /// memory or TCP, also in a broken world (a break leaves the segments and their other
    /// lanes alone, and the sockets and their other channels).
    fn door_lanes(&self, to: &Target, name: &str, members: &[usize]) -> Option<lanes::DoorLanesSlot> {
        let choice = to.options.transport.effective();
        if choice == TransportChoice::Rdma || !lanes_wanted() || self.size() > lanes::MAX_LANE_PARENT {
            return None;
        }
        let mut sources = lanes::usable(self.inner.backend.lane_sources(true), choice);
        sources.resize(self.size(), None);
        for (r, s) in sources.iter_mut().enumerate() {
            if !members.contains(&r) {
                *s = None;
            }
        }
        let (offer, held) = lanes::offer(self.rank(), sources, next_generation(&to.manager, name));
        let mine = lanes::DoorLanes {
            offer,
            held,
            parent_rank: self.rank(),
            parent_size: self.size(),
            members: members.to_vec(),
        };
        Some(lanes::DoorLanesSlot(Arc::new(crate::sys::sync::Mutex::new(Some(mine)))))
    }

    /// A larger world (NCCL's `ncclCommGrow`): every rank of this world calls it and keeps
    /// its rank; the newcomers call `manager.init_world(name, id, rank, new_size)` with ranks
    /// from this world's size up, before or after the members. Old rank 0 makes `id`
    /// ([`UniqueId::new`]) and gives it to the members (over this world, say with a
    /// broadcast of [`UniqueId::to_bytes`]) and to the newcomers. The parent is untouched.
    pub fn grow(&self, name: &str, id: &UniqueId, new_size: usize) -> Result<World> {
        self.grow_into(&self.target()?, name, id, new_size)
    }

    /// [`World::grow`], the new world registered with `to`.
    pub(crate) fn grow_into(&self, to: &Target, name: &str, id: &UniqueId, new_size: usize) -> Result<World> {
        self.usable_for_elastic()?;
        // A size this rank refuses still takes part in the agreement, so that the others hear
        // of it at once instead of at the deadline.
        let refused = (new_size <= self.size() || new_size > MAX_WORLD_SIZE).then(|| {
            Error::invalid_arg(format!(
                "growing world '{}' of {} ranks to {new_size}: the new size must be larger, and at most {MAX_WORLD_SIZE}",
                self.name(),
                self.size()
            ))
        });
        let ask = Ask { size: new_size as u64, id: crc32c(&id.to_bytes()), ..Ask::new(Op::Grow, name) };
        self.agree(to, name, &ask, refused)?;
        // The members' pairs may link on lanes of this world's segments: each member offers
        // them in its hello to the id's root (the newcomers offer none).
        let members: Vec<usize> = (0..self.size()).collect();
        let lanes = if self.size() > 1 { self.door_lanes(to, name, &members) } else { None };
        let rv = bootstrap::Rendezvous::Grow { id: id.clone(), lanes };
        form_on(&to.manager, name, rv, Vec::new(), self.rank(), new_size, &to.options).wait()
    }

    /// Where worlds made from this one go: its own manager, with its options.
    fn target(&self) -> Result<Target> {
        let lin = self.lineage();
        let manager = lin.manager.upgrade().ok_or_else(manager_gone)?;
        Ok(Target { manager, options: lin.options.clone() })
    }

    /// `exclude` sorted, once checked: ranks of this world, none twice, not this rank.
    pub(crate) fn excluded(&self, exclude: &[usize]) -> Result<Vec<usize>> {
        let mut ex = exclude.to_vec();
        ex.sort_unstable();
        ex.dedup();
        let bad = |what: String| {
            Error::invalid_arg(format!("shrinking world '{}' (rank {}): {what}", self.name(), self.rank()))
        };
        if ex.len() != exclude.len() {
            return Err(bad(format!("ranks {exclude:?} name one rank twice")));
        }
        if let Some(r) = ex.iter().find(|r| **r >= self.size()) {
            return Err(bad(format!("rank {r} is out of range for a world of {} ranks", self.size())));
        }
        if ex.contains(&self.rank()) {
            return Err(bad("a rank cannot exclude itself (only the survivors call shrink)".into()));
        }
        Ok(ex)
    }

    fn lineage(&self) -> &Lineage {
        &self.inner.lineage
    }

    fn usable_for_elastic(&self) -> Result<()> {
        if self.inner.removed.load(Ordering::Acquire) {
            return Err(Error::invalid_usage(format!("world '{}' was removed", self.name())));
        }
        if self.lineage().manager.strong_count() == 0 {
            return Err(manager_gone());
        }
        Ok(())
    }

    /// Gathers what every rank was asked, over this world, within the formation deadline;
    /// the same `InvalidUsage` on every rank when they differ. A rank whose own arguments are
    /// bad (`refused`, or a bad name) takes part all the same, marked, and gets its
    /// `InvalidArgument`; the others get `InvalidUsage` naming it. Returns the asks and the
    /// number of this collective elastic call.
    fn agree(&self, to: &Target, name: &str, ask: &Ask, refused: Option<Error>) -> Result<Agreed> {
        self.agree_post(to, name, ask, refused, true, false)?.finish(self)
    }

    /// Posts the agreement of [`World::agree`] without waiting for it (a non-blocking C call
    /// posts it in the caller's order of operations, then finishes elsewhere).
    fn agree_post(
        &self,
        to: &Target,
        name: &str,
        ask: &Ask,
        refused: Option<Error>,
        driven: bool,
        lanes: bool,
    ) -> Result<Agreement> {
        self.usable_for_elastic()?;
        let refused = refused.or_else(|| crate::api::manager::check_name(name).err());
        let mut mine = Ask { refused: refused.is_some(), ..ask.clone() }.encode().to_vec();
        let generation = next_generation(&to.manager, name);
        // Lanes only for a blocking call (the second round is then posted in the caller's
        // order of operations on the parent; a non-blocking call finishes on another thread)
        // and for a new world that may use shared memory or TCP (then on TCP channels alone).
        // Any rank that offers none rules them out for the whole call, alike on every rank.
        let choice = to.options.transport.effective();
        let (offer, held) = match lanes && driven && choice != TransportChoice::Rdma && lanes_wanted() {
            true => {
                let mut sources = lanes::usable(self.inner.backend.lane_sources(false), choice);
                sources.resize(self.size(), None);
                lanes::offer(self.rank(), sources, generation)
            }
            false => (lanes::no_offer(generation), Held::default()),
        };
        mine.extend_from_slice(&offer.encode(self.size()));
        let (completion, bufs) = self.post_gather(mine, to.options.timeout, driven)?;
        Ok(Agreement { completion, bufs, ask: ask.clone(), refused, held })
    }

    /// Posts an all-gather of `mine` (the same length on every rank) over this world, bounded
    /// by `limit`; its buffers live until the engine is done with them.
    #[allow(clippy::type_complexity)]
    fn post_gather(
        &self,
        mine: Vec<u8>,
        limit: std::time::Duration,
        driven: bool,
    ) -> Result<(Arc<Completion>, Arc<crate::api::request::Slot<(Vec<u8>, Vec<u8>)>>)> {
        let all = vec![0u8; mine.len() * self.size()];
        let bufs = crate::api::request::Slot::new((mine, all));
        let call = bufs
            .with(|(mine, all)| self.all_gather_call(Some(&mine[..]), &mut all[..]))
            .ok_or_else(|| Error::internal("agreement buffers"))??;
        let keep: KeepAlive = bufs.clone();
        let completion = self.post_bounded(call, limit, Some(keep), driven)?;
        Ok((completion, bufs))
    }

    /// After the agreement of a `dup` or `split`: forms this rank's new world (colour `mine`;
    /// `None` joins none) among `children`, every new world's colour and members (parent
    /// ranks in new order), on lanes where every rank's offer allows it, else through its
    /// leader's door. Whether a second round runs over the parent, every rank decides alike,
    /// from the offers.
    #[allow(clippy::too_many_arguments)]
    fn form_made(
        &self,
        to: &Target,
        name: &str,
        op: Op,
        agreed: Agreed,
        children: &[(u32, Vec<usize>)],
        mine: Option<u32>,
        how: impl Fn(u32) -> String,
    ) -> Result<Option<World>> {
        let Agreed { offers, call, mut held, .. } = agreed;
        let key = |c: u32| door_key(self.lineage().world_id, op, call, c);
        let me = mine.and_then(|c| children.iter().find(|(cc, _)| *cc == c));
        let on_lanes = |m: &[usize]| lanes::possible(&offers, m);
        if !children.iter().any(|(_, m)| on_lanes(m)) {
            drop(held);
            return match me {
                Some((c, m)) => self.form_from(to, name, m, key(*c), how(*c)).map(Some),
                None => Ok(None),
            };
        }
        // This rank's part (`lanes::CODE_*`).
        let (mut code, mut claimed, mut refusal) = (lanes::CODE_NONE, None, None);
        if let Some((c, m)) = me.filter(|(_, m)| on_lanes(m)) {
            if let Some(e) = name_refusal(&to.manager, name) {
                (code, refusal) = (lanes::CODE_NAME_TAKEN, Some(e));
            } else {
                match lanes::claim(&mut held, self.rank(), m, &offers, key(*c)) {
                    Ok(cl) => (code, claimed) = (lanes::CODE_CLAIMED, Some(cl)),
                    Err(why) => {
                        info!("{}: no lanes ({why}); forming links of its own", how(*c));
                        code = lanes::CODE_FAILED;
                    }
                }
            }
        }
        let codes = self.post_gather(vec![code], to.options.timeout, true).and_then(|(c, bufs)| {
            self.wait_for(std::slice::from_ref(&c));
            c.result().unwrap_or_else(|| Err(Error::internal("lane round ended without a result")))?;
            bufs.with(|(_, all)| all.clone()).ok_or_else(|| Error::internal("lane round buffers"))
        });
        // What the offer held (the parent's links' sources) is not needed past the round.
        drop(held);
        let codes = codes?;
        let Some((c, m)) = me else { return Ok(None) };
        if !on_lanes(m) {
            return self.form_from(to, name, m, key(*c), how(*c)).map(Some);
        }
        if let Some(e) = refusal {
            return Err(e);
        }
        if let Some(r) = m.iter().find(|r| codes[**r] == lanes::CODE_NAME_TAKEN) {
            return Err(Error::invalid_usage(format!(
                "{}: rank {r} cannot take the name (it has a working world '{name}', one being formed, or its manager is shut down); nothing was formed",
                how(*c)
            )));
        }
        let Some(claimed) = claimed.filter(|_| m.iter().all(|r| codes[*r] == lanes::CODE_CLAIMED)) else {
            return self.form_from(to, name, m, key(*c), how(*c)).map(Some);
        };
        let lin = self.lineage();
        let secret = lin.child_secret();
        let generation = m.iter().map(|r| offers[*r].generation).max().unwrap_or(1);
        let doors = m.iter().map(|r| lin.doors[*r].clone()).collect();
        let formed = claimed.formed(generation, key(*c), doors, secret.clone());
        let new_rank = m.iter().position(|r| *r == self.rank()).ok_or_else(|| Error::internal("not a member"))?;
        let rv =
            bootstrap::Rendezvous::Prepared(bootstrap::Prepared(Arc::new(crate::sys::sync::Mutex::new(Some(formed)))));
        form_on(&to.manager, name, rv, secret, new_rank, m.len(), &to.options).wait().map(Some)
    }

    /// Takes part in a split whose arguments this rank refuses (the C API's checks), so that
    /// the others hear of it at once; returns `why` as this rank's error.
    pub(crate) fn split_refused(&self, to: &Target, name: &str, why: Error) -> Error {
        match self.agree(to, name, &Ask::new(Op::Split, name), Some(why)) {
            Err(e) => e,
            Ok(_) => Error::internal("a refused split was agreed"),
        }
    }

    /// Forms world `name` of the old ranks `members` (in their new order) through the door of
    /// the first of them.
    fn form_from(&self, to: &Target, name: &str, members: &[usize], key: u64, how: String) -> Result<World> {
        self.form_through_door(to, name, members, key, how, None)
    }

    /// [`World::form_from`], on lanes of the parent's links where every member offers them.
    fn form_through_door(
        &self,
        to: &Target,
        name: &str,
        members: &[usize],
        key: u64,
        how: String,
        lanes: Option<lanes::DoorLanesSlot>,
    ) -> Result<World> {
        let lin = self.lineage();
        let new_rank = members
            .iter()
            .position(|r| *r == self.rank())
            .ok_or_else(|| Error::internal(format!("rank {} is not among the members {members:?}", self.rank())))?;
        let leader = members[0];
        let secret = lin.child_secret();
        let rv = bootstrap::Rendezvous::Door {
            door: lin.doors[leader].clone(),
            key,
            lead: leader == self.rank(),
            agree: how,
            lanes,
        };
        form_on(&to.manager, name, rv, secret, new_rank, members.len(), &to.options).wait()
    }
}

fn manager_gone() -> Error {
    Error::invalid_usage("the world manager of this world is shut down")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_round_trip_and_disagreements_are_named() {
        let a = Ask { color: Some(7), key: 3, ..Ask::new(Op::Split, "tp-group") };
        assert_eq!(Ask::decode(&a.encode()), a);
        let none = Ask { color: None, key: 1, ..Ask::new(Op::Split, "tp-group") };
        assert_eq!(Ask::decode(&none.encode()), none);
        let long = "x".repeat(100);
        let l = Ask::decode(&Ask::new(Op::Dup, &long).encode());
        assert_eq!(l.name_sum, crc32c(long.as_bytes()));
        assert!(l.name.starts_with("xxxx"));

        // Colours and keys differ freely.
        assert_eq!(disagreement(&[a.clone(), none.clone()]), None);
        let other = Ask::new(Op::Split, "tp-grupo");
        assert_eq!(
            disagreement(&[a.clone(), none, other]).unwrap(),
            "rank 0 names the new world 'tp-group', rank 2 names it 'tp-grupo'"
        );
        assert_eq!(disagreement(&[a, Ask::new(Op::Dup, "tp-group")]).unwrap(), "rank 0 calls split, rank 1 calls dup");
        let g = |n| Ask { size: n, ..Ask::new(Op::Grow, "g") };
        assert_eq!(disagreement(&[g(4), g(5)]).unwrap(), "rank 0 grows the world to 4 ranks, rank 1 to 5");
    }

    #[test]
    fn door_keys_differ_by_call_and_colour() {
        let k = |op, call, color| door_key(42, op, call, color);
        let keys = [k(Op::Split, 0, 0), k(Op::Split, 0, 1), k(Op::Split, 1, 0), k(Op::Dup, 0, 0), k(Op::Shrink, 0, 0)];
        for (i, a) in keys.iter().enumerate() {
            assert_ne!(*a, 0);
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_ne!(door_key(43, Op::Dup, 0, 0), k(Op::Dup, 0, 0));
        // Fields that would overlap if they were packed into one word.
        assert_ne!(k(Op::Split, 0, 1 << 24), k(Op::Split, 1, 0));
    }
}
