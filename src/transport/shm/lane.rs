//! Lanes: the worlds made from a world (`dup`, `split`) reuse its pairs' segments.
//!
//! A pair's segment holds [`LANES`] lanes, each a control page and two rings laid out as the
//! first. The world that made the segment uses lane 0; a world made from it (or from any world
//! whose link uses this segment) claims a free lane for each of its pairs, and gets a link of
//! its own there: its own rings, sequence numbers and end words, so its traffic and its
//! failures stay its own; the doorbells of every lane go over the pair's one socket
//! (`bell.rs`). No connection, no new socket or file in `/dev/shm`, no handshake: the two
//! processes agree on the lane over the parent world (`api/elastic.rs`).
//!
//! The file is sparse: a lane's small rings are reserved when it is first claimed (as a new
//! segment's are), and stay reserved for the segment's life (a bit per lane in the word of lane
//! 0's state slot, which lane 0 itself does not use); its grown pages are punched out when it
//! is released.
//!
//! **The state word.** Each lane but lane 0 has a word in lane 0's control page: 0 when the
//! lane is free, else the tag of the world that holds it (62 bits, the same on both sides of
//! the pair) and one bit per side that still holds it. Both sides claim with the same tag:
//! the first turns a free word into its tag and its bit, the second adds its bit to a word with
//! that tag. A word with another tag, or with the tag but no holder (the lane being reset), is
//! not to be claimed: the claim fails, and the agreement's second round tells every rank so.
//! A side releases by clearing its bit; the one that clears the last bit resets the lane (its
//! grown pages punched out, its small pages zeroed) and only then frees the word, so a lane is
//! always clean when it is claimed. `loom_lane_*` below model the word.

use std::io;

use super::*;

/// Lanes per segment, lane 0 included: up to 15 worlds made from worlds share a pair's
/// segment at once; the sixteenth forms links of its own.
pub(crate) const LANES: usize = 16;

/// Bits of a state word that say which sides hold the lane.
const HOLDERS: u64 = 0b11;

/// Where a world's link lets worlds made from it claim lanes: its pair's segment and this
/// process's side of it.
#[derive(Clone)]
pub(crate) struct LaneSource {
    pub seg: Arc<Segment>,
    pub side: usize,
    /// The pair's socket, which the lanes' links share (`bell.rs`).
    pub bell: Arc<Bell>,
}

impl LaneSource {
    fn state(&self, lane: usize) -> &AtomicU64 {
        self.seg.word(LANE_STATE_AT + 8 * lane)
    }

    /// The lanes free now, as this process sees them (bit `i`: lane `i`); none of a segment
    /// whose first lane was reserved whole (a kernel that cannot populate on request).
    pub(crate) fn free_lanes(&self) -> u16 {
        if fixed_flag(&self.seg).load(Ordering::Acquire) == 1 {
            return 0;
        }
        (1..LANES).filter(|l| self.state(*l).load(Ordering::Acquire) == 0).fold(0, |m, l| m | 1 << l)
    }

    /// Claims lane `lane` for the world `tag` (both sides of the pair claim it with the same
    /// tag, which is never 0), reserves its small rings and makes the wake its link will sleep
    /// on: an error if another world holds the lane, `/dev/shm` is full or no descriptor is
    /// left.
    pub(crate) fn claim(&self, lane: usize, tag: u64) -> io::Result<LaneClaim> {
        if !(1..LANES).contains(&lane) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("no lane {lane}")));
        }
        // Reserved once per lane and segment, before the claim: a full `/dev/shm` then fails
        // here with nothing changed (populating writes nothing the program can see, so it is
        // harmless on a lane another world holds, and both sides may do it at once).
        let reserved = self.state(0);
        if reserved.load(Ordering::Acquire) & 1 << lane == 0 {
            for r in segment::small_parts(lane) {
                // SAFETY: the range lies in the segment's writable shared mapping, page-aligned
                // (`small_parts`).
                unsafe { crate::sys::populate(self.seg.ptr(r.start), r.len()) }?;
            }
            reserved.fetch_or(1 << lane, Ordering::AcqRel);
        }
        if !claim_word(self.state(lane), self.side, tag) {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("lane {lane} is held by another world")));
        }
        match self.bell.join(lane) {
            Ok(wake) => Ok(LaneClaim { source: self.clone(), lane, wake }),
            Err(e) => {
                // Let go as a claim does: the last side out resets the lane (the peer's side
                // may have written its end word before it let go).
                release_word(self.state(lane), self.side, || self.reset(lane));
                Err(e)
            }
        }
    }

    /// Makes lane `lane` as a new one: grown pages punched out, small pages zeroed.
    fn reset(&self, lane: usize) {
        let (seg, at) = (&self.seg, lane * LANE_BYTES);
        for ring in 0..2 {
            let part = grown_part(ring);
            // SAFETY: a page-aligned range of the segment's shared mapping that neither side
            // uses any more: both released the lane.
            let _ = unsafe { crate::sys::discard(seg.ptr(at + part.start), part.len()) };
        }
        // Only pages known to be reserved are written (an unbacked page of a full `/dev/shm`
        // would raise SIGBUS); a claim reserves them before it can hold the lane.
        if self.state(0).load(Ordering::Acquire) & 1 << lane != 0 {
            for r in segment::small_parts(lane) {
                // SAFETY: as above; these pages are reserved (the bit above).
                unsafe { std::ptr::write_bytes(seg.ptr(r.start), 0, r.len()) };
            }
        }
    }
}

/// A lane this process holds; released when dropped (with the link that uses it).
pub(crate) struct LaneClaim {
    source: LaneSource,
    lane: usize,
    /// What the lane's link sleeps on, known to the pair's bell from the claim on.
    pub(crate) wake: Arc<Wake>,
}

impl LaneClaim {
    pub(crate) fn source(&self) -> &LaneSource {
        &self.source
    }

    pub(crate) fn lane(&self) -> usize {
        self.lane
    }
}

impl Drop for LaneClaim {
    fn drop(&mut self) {
        // This side's end, for the lane's link, or for a claim that no link took over (its
        // formation failed after the claim): a peer that made its link learns of it at once.
        say_end(&self.source.seg, &self.source.bell, self.lane, self.source.side);
        self.source.bell.leave(self.lane, &self.wake);
        release_word(self.source.state(self.lane), self.source.side, || self.source.reset(self.lane));
    }
}

/// Adds side `side` to the holders of the lane whose state word is `w`, for world `tag`.
fn claim_word(w: &AtomicU64, side: usize, tag: u64) -> bool {
    let (mine, tagged) = (1u64 << side, tag << 2);
    let mut cur = w.load(Ordering::Acquire);
    loop {
        let next = if cur == 0 {
            tagged | mine
        } else if cur & !HOLDERS == tagged && cur & HOLDERS != 0 && cur & mine == 0 {
            cur | mine
        } else {
            return false;
        };
        match w.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
    }
}

/// Takes side `side` off the holders; the last one out runs `reset` and then frees the word.
fn release_word(w: &AtomicU64, side: usize, reset: impl FnOnce()) {
    let before = w.fetch_and(!(1u64 << side), Ordering::AcqRel);
    if before & HOLDERS == 1 << side {
        reset();
        w.store(0, Ordering::Release);
    }
}

/// A lane's tag for the new world `world_id` and the pair of processes with old ranks `a` and
/// `b`: the same on both sides, never 0, different for every pair of one world.
pub(crate) fn tag(world_id: u64, a: usize, b: usize) -> u64 {
    let (lo, hi) = (a.min(b) as u64, a.max(b) as u64);
    (crate::sys::mix64(world_id ^ (lo << 32 | hi).wrapping_mul(0x9e37_79b9_7f4a_7c15)) >> 2) | 1
}

#[cfg(loom)]
mod loom_models {
    use super::*;
    use loom::sync::atomic::AtomicUsize;

    /// Two sides claim one lane for the same world, use it and release it: both get it, and the
    /// reset runs once, after both are done with it.
    #[test]
    fn loom_lane_reset_runs_once_after_both_sides_release() {
        loom::model(|| {
            let word = std::sync::Arc::new(AtomicU64::new(0));
            let users = std::sync::Arc::new(AtomicUsize::new(0));
            let resets = std::sync::Arc::new(AtomicUsize::new(0));
            let side = |s: usize| {
                let (word, users, resets) = (word.clone(), users.clone(), resets.clone());
                loom::thread::spawn(move || {
                    if claim_word(&word, s, 7) {
                        users.fetch_add(1, Ordering::SeqCst);
                        users.fetch_sub(1, Ordering::SeqCst);
                        release_word(&word, s, || {
                            // Nobody may claim the lane while it is being reset, not even
                            // with this world's tag.
                            assert_eq!(users.load(Ordering::SeqCst), 0, "reset while a side uses the lane");
                            resets.fetch_add(1, Ordering::SeqCst);
                            assert_eq!(users.load(Ordering::SeqCst), 0, "claimed while it was reset");
                        });
                        true
                    } else {
                        false
                    }
                })
            };
            let (a, b) = (side(0), side(1));
            let (a, b) = (a.join().unwrap(), b.join().unwrap());
            assert_eq!(word.load(Ordering::SeqCst), 0, "the lane ends free");
            // A side that came after the other had released and reset gets the lane afresh;
            // one that came while the reset ran is refused. Every claim is released once.
            let expected = match (a, b) {
                (true, true) => (1..=2).contains(&resets.load(Ordering::SeqCst)),
                (false, false) => false,
                _ => resets.load(Ordering::SeqCst) == 1,
            };
            assert!(expected, "claims {a} {b}, resets {}", resets.load(Ordering::SeqCst));
        });
    }

    /// Two worlds race for one free lane: at most one holds it at any time.
    #[test]
    fn loom_lane_two_worlds_never_hold_one_lane() {
        loom::model(|| {
            let word = std::sync::Arc::new(AtomicU64::new(0));
            let holders = std::sync::Arc::new(AtomicUsize::new(0));
            let world = |tag: u64, side: usize| {
                let (word, holders) = (word.clone(), holders.clone());
                loom::thread::spawn(move || {
                    if claim_word(&word, side, tag) {
                        assert_eq!(holders.fetch_add(1, Ordering::SeqCst), 0, "two worlds hold the lane");
                        holders.fetch_sub(1, Ordering::SeqCst);
                        release_word(&word, side, || {});
                    }
                })
            };
            let (a, b) = (world(5, 0), world(9, 1));
            a.join().unwrap();
            b.join().unwrap();
            assert_eq!(word.load(Ordering::SeqCst), 0);
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn tags_are_symmetric_nonzero_and_differ_by_pair_and_world() {
        assert_eq!(tag(42, 1, 3), tag(42, 3, 1));
        assert_ne!(tag(42, 1, 3), tag(42, 1, 2));
        assert_ne!(tag(42, 1, 3), tag(43, 1, 3));
        for w in 0..100 {
            assert_ne!(tag(w, 0, 1), 0);
            assert_eq!(tag(w, 0, 1) >> 62, 0);
        }
    }

    #[test]
    fn a_lane_is_held_by_one_world_and_clean_when_claimed_again() {
        let seg = Arc::new(Segment::create().unwrap());
        let (sa, sb) = crate::sys::socket_pair().unwrap();
        let a = LaneSource { seg: seg.clone(), side: 0, bell: Bell::new(sa) };
        let b = LaneSource { seg: seg.clone(), side: 1, bell: Bell::new(sb) };
        assert_eq!(a.free_lanes(), 0xfffe);
        let ca = a.claim(3, 11).unwrap();
        let cb = b.claim(3, 11).unwrap();
        assert_eq!(a.free_lanes() & 1 << 3, 0);
        // Another world cannot take it, from either side.
        assert!(a.claim(3, 12).is_err() && b.claim(3, 12).is_err());
        let p = seg.ptr(3 * LANE_BYTES + 100);
        // SAFETY: a byte of the claimed lane's control page.
        unsafe { *p = 7 };
        drop(ca);
        // One side still holds it: not free, not reset.
        assert_eq!(b.free_lanes() & 1 << 3, 0);
        // SAFETY: as above.
        assert_eq!(unsafe { *p }, 7);
        drop(cb);
        assert_ne!(b.free_lanes() & 1 << 3, 0);
        // SAFETY: as above; the lane's pages stay mapped.
        assert_eq!(unsafe { *p }, 0, "a released lane is zeroed");
        let again = b.claim(3, 12).unwrap();
        assert!(a.claim(3, 11).is_err(), "an old tag no longer claims it");
        drop(again);
        assert!(a.claim(0, 1).is_err() && a.claim(LANES, 1).is_err());
    }
}
