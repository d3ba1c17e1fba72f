//! Forming a world made from a world (`dup`, `split`) on lanes of its parent's links: no
//! rendezvous, no connection, no new segment (`transport/shm/lane.rs`), and on channels of its
//! parent's TCP sockets (`transport/tcp.rs`).
//!
//! 1. **Offer**, in the parent's agreement (`api/elastic.rs`): each rank says its pid, the
//!    generation it proposes for the name, and, per parent rank it has a shared-memory link
//!    to, the lanes it sees free there (the new link will share the pair's socket for its
//!    doorbells: `transport/shm/bell.rs`). Per parent rank it has a TCP link to, it says
//!    whether that socket takes one more channel ([`CHANNEL`]); a channel needs nothing else,
//!    its frames carry the new world's tag.
//! 2. Every rank sees every offer, so every rank decides alike whether a new world can form on
//!    lanes ([`possible`]: every pair of its members has a shared-memory link and a lane free on
//!    both sides, or a TCP link that takes a channel on both sides). If it can, each member
//!    **claims** the lowest lane free on both sides of each of its pairs, with a tag derived
//!    from the new world's id; on a TCP pair, each side opens the channel of the new world's
//!    tag.
//! 3. A second all-gather over the parent says which ranks succeeded. If all members of a new
//!    world did, its links are made and it is registered at once; otherwise its members let
//!    go of what they claimed and form it through the leader's door, as any world made from a
//!    world.

use crate::api::options::TransportChoice;
use crate::engine::wire::world_tag;
use crate::transport::loopback::QueueLink;
use crate::transport::shm::{self, LaneClaim, ShmLink};
use crate::transport::tcp::TcpLink;
use crate::transport::{Link, PairSource};

/// Parents larger than this offer no lanes (the offer grows with the parent's size).
pub(crate) const MAX_LANE_PARENT: usize = 64;
/// The bits of an offer's mask that name lanes of a segment (`shm::lane::LANES` of them)...
const LANE_BITS: u32 = (1 << shm::lane::LANES) - 1;
/// ...and the bit that says a TCP link takes one more channel.
pub(crate) const CHANNEL: u32 = 1 << 16;
const _: () = assert!(shm::lane::LANES <= 16);

/// The pairs a new world whose transport is `choice` may link on its parent's links: all for
/// `Auto`, TCP channels alone for `Tcp` (a world asked to use TCP gets no shared memory),
/// none for `Rdma`.
pub(crate) fn usable(mut sources: Vec<Option<PairSource>>, choice: TransportChoice) -> Vec<Option<PairSource>> {
    for s in &mut sources {
        if !matches!((choice, &*s), (TransportChoice::Auto, _) | (TransportChoice::Tcp, Some(PairSource::Tcp(_)))) {
            *s = None;
        }
    }
    sources
}

/// What a rank's agreement record carries for lanes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Offer {
    /// This rank's pid; 0 when it offers no lanes at all (its call is not blocking, its
    /// transport is forced, `MW_LANES=0`, a `grow`): then no rank forms on lanes, and no second
    /// round runs.
    pub pid: u32,
    pub generation: u32,
    /// Per parent rank: the lanes free toward it (and [`CHANNEL`]).
    pub peers: Vec<u32>,
}

/// An offer of no lanes (see [`Offer::pid`]).
pub(crate) fn no_offer(generation: u32) -> Offer {
    Offer { pid: 0, generation, peers: Vec::new() }
}

impl Offer {
    /// Bytes of an offer in a parent of `size` ranks (the same for every rank and every call,
    /// so that records of different calls still line up and their difference is reported).
    pub(crate) fn bytes(size: usize) -> usize {
        8 + if size <= MAX_LANE_PARENT { 4 * size } else { 0 }
    }

    pub(crate) fn encode(&self, size: usize) -> Vec<u8> {
        let mut b = Vec::with_capacity(Offer::bytes(size));
        b.extend_from_slice(&self.pid.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        if size <= MAX_LANE_PARENT {
            for r in 0..size {
                b.extend_from_slice(&self.peers.get(r).copied().unwrap_or(0).to_le_bytes());
            }
        }
        b
    }

    pub(crate) fn decode(b: &[u8], size: usize) -> Offer {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let peers = match size <= MAX_LANE_PARENT {
            true => (0..size).map(|r| word(8 + 4 * r)).collect(),
            false => Vec::new(),
        };
        Offer { pid: word(0), generation: word(4), peers }
    }

    fn lanes(&self, to: usize) -> u32 {
        self.peers.get(to).copied().unwrap_or(0)
    }
}

/// What a rank holds from its offer until the second round is over, whatever its outcome:
/// its parent's links' lane sources and sockets.
#[derive(Default)]
pub(crate) struct Held {
    sources: Vec<Option<PairSource>>,
}

/// Makes rank `rank`'s offer in a parent whose links give `sources` (empty: no lanes),
/// proposing `generation` for the new name.
pub(crate) fn offer(rank: usize, sources: Vec<Option<PairSource>>, generation: u32) -> (Offer, Held) {
    let size = sources.len();
    let mut offer = Offer { pid: std::process::id(), generation, peers: vec![0; size] };
    let held = Held { sources };
    if size > MAX_LANE_PARENT {
        return (offer, held);
    }
    for (r, src) in held.sources.iter().enumerate() {
        offer.peers[r] = match src.as_ref().filter(|_| r != rank) {
            // A lane's link shares the pair's socket: none while the first link sleeps on it
            // alone (`bell.rs`). A segment with no free lane leaves the socket unshared.
            Some(PairSource::Shm(s)) => match u32::from(s.free_lanes()) {
                free if free != 0 && s.bell.share() => free,
                _ => 0,
            },
            Some(PairSource::Tcp(t)) if t.can_open() => CHANNEL,
            _ => 0,
        };
    }
    (offer, held)
}

/// True when every rank offered lanes (none said [`no_offer`]): only then may any new world
/// of the call form on lanes, and the second round run.
pub(crate) fn offered(offers: &[Offer]) -> bool {
    offers.iter().all(|o| o.pid != 0)
}

/// True when a world of the parent ranks `members` can form on lanes, by every rank's offer:
/// every rank offered, and each pair has a lane free on both sides (or a channel).
pub(crate) fn possible(offers: &[Offer], members: &[usize]) -> bool {
    offered(offers) && pairs_have_lanes(offers, members)
}

/// Like [`possible`], for a world whose members alone offered (`shrink`: the excluded ranks
/// take no part): every member offered, and each pair has a lane (or a channel).
pub(crate) fn possible_among(offers: &[Offer], members: &[usize]) -> bool {
    members.iter().all(|m| offers.get(*m).is_some_and(|o| o.pid != 0)) && pairs_have_lanes(offers, members)
}

/// Each pair of `members` has a lane free on both sides, or a TCP link that takes a channel
/// on both sides.
fn pairs_have_lanes(offers: &[Offer], members: &[usize]) -> bool {
    members.iter().all(|&a| {
        members.iter().filter(|&&b| a < b).all(|&b| {
            let both = offers[a].lanes(b) & offers[b].lanes(a);
            both & LANE_BITS != 0 || both & CHANNEL != 0
        })
    })
}

/// A rank's code in the second round of a formation on lanes (over the parent for `dup` and
/// `split`, through the leader's root for `shrink`): no part in a world on lanes (for a shrink:
/// lanes are not possible, which every member decides alike, from the same offers).
pub(crate) const CODE_NONE: u8 = 0;
/// This rank claimed its lanes (and opened its channels).
pub(crate) const CODE_CLAIMED: u8 = 1;
/// This rank could not (or went away): every member forms links of its own instead.
pub(crate) const CODE_FAILED: u8 = 2;
/// The new world's name is in use here (`dup`, `split`): every member gets `InvalidUsage`.
pub(crate) const CODE_NAME_TAKEN: u8 = 3;

/// A rank's lanes for a world formed through a root: a `shrink`'s (behind the leader's door;
/// its parent may be broken, so that no round can run over it) or a `grow`'s (the id's root,
/// which the newcomers reach too). The root carries the offers and the second round.
pub(crate) struct DoorLanes {
    pub offer: Offer,
    pub held: Held,
    /// This rank in the parent, and the parent's size.
    pub parent_rank: usize,
    pub parent_size: usize,
    /// The parent ranks of the new world, in its rank order.
    pub members: Vec<usize>,
}

/// [`DoorLanes`] in a rendezvous, taken once by the formation.
#[derive(Clone)]
pub(crate) struct DoorLanesSlot(pub std::sync::Arc<crate::sys::sync::Mutex<Option<DoorLanes>>>);

impl std::fmt::Debug for DoorLanesSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DoorLanes")
    }
}

/// Every member's offer by parent rank (those of non-members: none), from the table's offers
/// in new-rank order, where the members come first (a `grow`'s newcomers follow them, with
/// no offer); `None` when one is malformed.
pub(crate) fn offers_by_parent(lanes: &DoorLanes, table: &[Vec<u8>]) -> Option<Vec<Offer>> {
    let mut offers = vec![no_offer(0); lanes.parent_size];
    let m = lanes.members.len();
    if table.len() < m || table[m..].iter().any(|b| !b.is_empty()) {
        return None;
    }
    for (blob, &p) in table.iter().zip(&lanes.members) {
        if blob.len() != Offer::bytes(lanes.parent_size) || p >= lanes.parent_size {
            return None;
        }
        offers[p] = Offer::decode(blob, lanes.parent_size);
    }
    Some(offers)
}

/// This rank's part of a new world on lanes, claimed and connected, until the second round
/// says whether every member got its part.
pub(crate) struct Claimed {
    /// Per member (new rank order); `None` for this rank.
    parts: Vec<Option<Part>>,
    me: usize,
}

/// This rank's part of one pair of a new world on its parent's links.
enum Part {
    /// A lane of the pair's segment.
    Lane(LaneClaim),
    /// A channel of the pair's TCP socket.
    Channel(TcpLink),
}

/// Claims this rank's lanes of the new world of parent ranks `members` (this rank among them)
/// with id `world_id`, and opens its channels. An error says what failed, in words.
pub(crate) fn claim(
    held: &mut Held,
    rank: usize,
    members: &[usize],
    offers: &[Offer],
    world_id: u64,
) -> std::result::Result<Claimed, String> {
    let me = members.iter().position(|&m| m == rank).ok_or("not a member")?;
    let mut parts = Vec::with_capacity(members.len());
    for &peer in members {
        if peer == rank {
            parts.push(None);
            continue;
        }
        let free = offers[rank].lanes(peer) & offers[peer].lanes(rank);
        let src = match held.sources.get(peer).and_then(|s| s.clone()) {
            Some(PairSource::Shm(s)) => s,
            Some(PairSource::Tcp(t)) if free & CHANNEL != 0 => {
                let link = t
                    .open(world_tag(world_id))
                    .map_err(|e| format!("opening a channel of the TCP link to rank {peer}: {e}"))?;
                parts.push(Some(Part::Channel(link)));
                continue;
            }
            _ => return Err("no shared-memory or TCP link to share".into()),
        };
        let lane = (free & LANE_BITS).trailing_zeros() as usize;
        let claim = src
            .claim(lane, shm::lane::tag(world_id, rank, peer))
            .map_err(|e| format!("claiming lane {lane} toward rank {peer}: {e}"))?;
        // Before the second round, so the peer can read it when its link starts.
        shm::publish_probe(&src.seg, lane * shm::LANE_BYTES, src.side);
        parts.push(Some(Part::Lane(claim)));
    }
    Ok(Claimed { parts, me })
}

impl Claimed {
    /// The world these lanes make, once every member claimed its part: `generation`, `world_id`,
    /// each member's door and the world's secret.
    pub(crate) fn formed(self, generation: u32, world_id: u64, doors: Vec<String>, secret: Vec<u8>) -> super::Formed {
        let size = self.parts.len();
        super::Formed::new(generation, world_id, self.links(size), size as u64 - 1, doors, secret)
    }

    /// The links of a new world of `size` ranks whose first ranks are the members, in its rank
    /// order: on lanes toward the members, loopback for this rank, `None` beyond the members
    /// (a `grow`'s newcomers, linked as in any formation).
    pub(crate) fn links(self, size: usize) -> Vec<Option<Box<dyn Link>>> {
        let me = self.me;
        let mut links: Vec<Option<Box<dyn Link>>> = self
            .parts
            .into_iter()
            .enumerate()
            .map(|(r, p)| -> Option<Box<dyn Link>> {
                match p {
                    Some(Part::Lane(claim)) => Some(Box::new(ShmLink::on_lane(claim))),
                    Some(Part::Channel(link)) => Some(Box::new(link)),
                    None if r == me => Some(Box::new(QueueLink::loopback())),
                    None => None,
                }
            })
            .collect();
        links.resize_with(size.max(links.len()), || None);
        links
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_round_trip_and_decide_alike() {
        let o = Offer { pid: 77, generation: 3, peers: vec![0, 0b110, 0b10 | CHANNEL] };
        assert_eq!(Offer::decode(&o.encode(3), 3), o);
        assert_eq!(o.encode(3).len(), Offer::bytes(3));
        // Beyond the limit, no per-peer part.
        let big = Offer { pid: 1, generation: 1, peers: vec![] };
        assert_eq!(big.encode(MAX_LANE_PARENT + 1).len(), 8);
        assert_eq!(Offer::decode(&big.encode(MAX_LANE_PARENT + 1), MAX_LANE_PARENT + 1), big);

        let offers = vec![
            Offer { pid: 1, generation: 1, peers: vec![0, 0b10, 0b100] },
            Offer { pid: 2, generation: 1, peers: vec![0b110, 0, 0b10] },
            Offer { pid: 3, generation: 1, peers: vec![0b100, 0b10, 0] },
        ];
        assert!(possible(&offers, &[0, 1, 2]));
        assert!(possible(&offers, &[2]));
        // One rank that offers nothing rules lanes out for every new world of the call.
        let mut one_out = offers.clone();
        one_out[2] = no_offer(1);
        assert!(!offered(&one_out) && !possible(&one_out, &[0, 1]));
        let mut no_common = offers.clone();
        no_common[1].peers[0] = 0b1000;
        assert!(!possible(&no_common, &[0, 1]));
        assert!(possible(&no_common, &[0, 2]));
        // A side that offers no lane toward its peer (its socket not shared this time).
        let mut one_side = offers;
        one_side[0].peers[2] = 0;
        assert!(!possible(&one_side, &[0, 2]) && possible(&one_side, &[0, 1]));

        // TCP pairs: a channel on both sides; one side that offers none (its socket failed, or
        // carries 64 worlds) rules the pair out.
        let tcp = vec![
            Offer { pid: 1, generation: 1, peers: vec![0, CHANNEL, 0b10] },
            Offer { pid: 2, generation: 1, peers: vec![CHANNEL, 0, CHANNEL] },
            Offer { pid: 3, generation: 1, peers: vec![0b10, CHANNEL, 0] },
        ];
        assert_eq!(Offer::decode(&tcp[1].encode(3), 3), tcp[1]);
        assert!(possible(&tcp, &[0, 1, 2]));
        let mut one_full = tcp.clone();
        one_full[2].peers[1] = 0;
        assert!(!possible(&one_full, &[1, 2]) && possible(&one_full, &[0, 1]));
        // A lane bit on one side and a channel bit on the other is no pair.
        let mut mixed = tcp;
        mixed[0].peers[1] = 0b10;
        assert!(!possible(&mixed, &[0, 1]));
    }
}
