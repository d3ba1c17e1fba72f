//! The protocol of a single-producer, single-consumer ring of slots, and its sleep/wake
//! handshake. The control block lives in memory shared by two processes (`transport/shm.rs`
//! places it in a mapped segment); the slots' contents are the caller's business, but for one
//! word per slot: its sequence word.
//!
//! - `head` counts slots the producer has filled and published; `tail` counts slots the
//!   consumer has finished with. Slot `i` lives at index `i % n`. The producer fills a slot
//!   only while `head - tail < n`, the consumer reads one only while it is published, so the
//!   two never touch the same slot at once.
//! - **Publishing** writes the slot's sequence word, `(i + 1) as u32`, with a release store
//!   after the slot's bytes; the consumer polls the word of slot `tail` with an acquire load
//!   and takes the slot when it reads `tail + 1`. So the consumer waits on the line it is about
//!   to read anyway (with the frame header beside the word), not on a counter on a line of its
//!   own: a small frame crosses cores in one or two cache lines instead of three or four. A
//!   word left from the lap before reads `tail + 1 - n`, never `tail + 1`. The producer still
//!   advances `head`, on its own line, for liveness and for the sleep handshake below.
//! - **Releasing** stores `tail`. The producer keeps the last `tail` it read and reads the
//!   shared one again only when that copy says the ring is full, so `tail`'s line crosses
//!   cores about once per lap, not once per frame.
//! - **Wraps.** The producer may end a lap early: it publishes a slot as a wrap (a tag of
//!   its choosing) and moves `head` to the first slot of the next lap; the consumer, reading
//!   the wrap, moves `tail` there too. So a ring can run on its first few slots alone (a small
//!   ring for an idle pair, whose other slots need no memory) and grow back to all of them
//!   at a lap's start, without the two sides ever agreeing on a size. A wrap is published only
//!   once the consumer has left every earlier lap, so `head - tail` stays within `n`.
//! - Either side spins briefly, then sleeps on a doorbell (a byte on a socket, in the shm
//!   transport). Before sleeping it raises its `sleeping` flag and looks once more; after
//!   publishing (or releasing) the other side looks at that flag and rings if it is raised.
//!   Both sides put a sequentially consistent fence between their store and their load, so at
//!   least one of them sees the other's store: either the sleeper sees the new slot and does
//!   not sleep, or the waker sees the flag and rings. No wake-up is lost (checked by the loom
//!   models below). The flag is raised with a swap, not a plain store: the same under the
//!   C++ memory model, but loom judges the fence argument soundly only then (with a store
//!   after the other side's swap had lowered the flag, loom reported a lost wake-up that the
//!   model forbids; a read-modify-write always reads the latest value). It costs nothing
//!   that matters: the flag is raised only on the way to sleep.
//!
//! A zeroed control block and zeroed slots are a valid empty ring.

use crate::sys::sync::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};

/// One cache line per field, so that producer and consumer do not false-share.
#[repr(C, align(64))]
struct Line<T>(T);

/// The shared control block of one ring.
#[repr(C)]
pub(crate) struct RingCtrl {
    head: Line<AtomicU64>,
    tail: Line<AtomicU64>,
    consumer_sleeping: Line<AtomicBool>,
    producer_sleeping: Line<AtomicBool>,
}

/// Bytes of a control block in shared memory.
pub(crate) const CTRL_BYTES: usize = std::mem::size_of::<RingCtrl>();

/// Where the sequence word of each slot is (the slots' layout is the caller's).
pub(crate) trait SlotWords {
    /// The sequence word of slot `slot` (any index: the ring is `slot % n`).
    fn word(&self, slot: u64) -> &AtomicU32;
}

/// Low bits of a sequence word that carry the caller's tag (`publish`); the rest count laps.
pub(crate) const TAG_BITS: u32 = 7;
const TAG_MASK: u32 = (1 << TAG_BITS) - 1;

/// The value of slot `slot`'s sequence word once it is published with `tag`: the slot's
/// number plus one (modulo 2^25, far more than the slots of a ring), then the tag.
fn published_word(slot: u64, tag: u32) -> u32 {
    ((slot.wrapping_add(1) as u32) << TAG_BITS) | (tag & TAG_MASK)
}

/// A word that reads as slot `slot`'s (an old number, so never the one the consumer expects
/// next), for a slot that a growing ring brings back into use.
pub(crate) fn invalid_word(slot: u64) -> u32 {
    published_word(slot, 0)
}

/// The number of the first slot of the lap after `slot`'s.
fn next_lap(slot: u64, n: u64) -> u64 {
    slot - slot % n + n
}

/// What the ring's counters say, when they cannot be right (a peer wrote nonsense into shared
/// memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Corrupt;

impl RingCtrl {
    #[cfg(any(test, loom))]
    pub(crate) fn new() -> RingCtrl {
        RingCtrl {
            head: Line(AtomicU64::new(0)),
            tail: Line(AtomicU64::new(0)),
            consumer_sleeping: Line(AtomicBool::new(false)),
            producer_sleeping: Line(AtomicBool::new(false)),
        }
    }

    fn in_flight(&self, head: u64, tail: u64, n: u64) -> Result<u64, Corrupt> {
        let d = head.wrapping_sub(tail);
        if d > n {
            Err(Corrupt)
        } else {
            Ok(d)
        }
    }

    /// Producer: the number of the next free slot, if one is free. `seen_tail` is the
    /// producer's copy of `tail`, read again only when the copy says the ring is full.
    pub(crate) fn free_slot(&self, n: u64, seen_tail: &mut u64) -> Result<Option<u64>, Corrupt> {
        let head = self.head.0.load(Ordering::Relaxed);
        // A stale copy may be more than a lap behind (after a wrap moved `head`): only the
        // shared value itself can be judged inconsistent.
        if matches!(self.in_flight(head, *seen_tail, n), Ok(d) if d < n) {
            return Ok(Some(head));
        }
        *seen_tail = self.tail.0.load(Ordering::Acquire);
        Ok((self.in_flight(head, *seen_tail, n)? < n).then_some(head))
    }

    /// Producer: publishes slot `slot` (as returned by `free_slot`, now filled) through its
    /// word, with a tag of [`TAG_BITS`] bits for the consumer. True when the consumer sleeps
    /// and must be woken.
    pub(crate) fn publish(&self, slot: u64, tag: u32, slots: &impl SlotWords) -> bool {
        slots.word(slot).store(published_word(slot, tag), Ordering::Release);
        self.head.0.store(slot.wrapping_add(1), Ordering::Release);
        fence(Ordering::SeqCst);
        self.consumer_sleeping.0.load(Ordering::Relaxed) && self.consumer_sleeping.0.swap(false, Ordering::AcqRel)
    }

    /// Producer: true when `slot` (as returned by `free_slot`) may be published as a wrap: the
    /// consumer has left every lap before the slot's.
    pub(crate) fn can_wrap(&self, slot: u64, n: u64, seen_tail: &mut u64) -> bool {
        let lap = slot - slot % n;
        let done = |t: u64| (t.wrapping_sub(lap) as i64) >= 0;
        if done(*seen_tail) {
            return true;
        }
        *seen_tail = self.tail.0.load(Ordering::Acquire);
        done(*seen_tail)
    }

    /// Producer: publishes slot `slot` (free, and `can_wrap`) as a wrap with `tag`: `head`
    /// moves to the first slot of the next lap. True when the consumer sleeps and must be woken.
    pub(crate) fn publish_wrap(&self, slot: u64, n: u64, tag: u32, slots: &impl SlotWords) -> bool {
        slots.word(slot).store(published_word(slot, tag), Ordering::Release);
        self.head.0.store(next_lap(slot, n), Ordering::Release);
        fence(Ordering::SeqCst);
        self.consumer_sleeping.0.load(Ordering::Relaxed) && self.consumer_sleeping.0.swap(false, Ordering::AcqRel)
    }

    /// Producer: `head`, the number of the next slot it will fill.
    pub(crate) fn head(&self) -> u64 {
        self.head.0.load(Ordering::Relaxed)
    }

    /// Producer, about to sleep until it can publish again: raises its flag and looks again
    /// (at the shared `tail`, which it copies into `seen_tail`). It can publish when a slot is
    /// free, and, if the next slot is at or past `limit` in its lap (where the producer wraps),
    /// when the consumer has left the earlier laps. True when it may sleep; false when it can
    /// publish after all (flag lowered). Any release by the consumer rings a sleeping producer.
    pub(crate) fn producer_may_sleep(&self, n: u64, limit: u64, seen_tail: &mut u64) -> bool {
        self.producer_sleeping.0.swap(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        *seen_tail = self.tail.0.load(Ordering::Acquire);
        let head = self.head.0.load(Ordering::Relaxed);
        let full = matches!(self.in_flight(head, *seen_tail, n), Ok(d) if d >= n);
        let wrap_waits = head % n >= limit && (seen_tail.wrapping_sub(head - head % n) as i64) < 0;
        if !full && !wrap_waits {
            self.producer_sleeping.0.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Producer: true once the consumer has released slot `slot` (and every slot before it).
    pub(crate) fn released(&self, slot: u64) -> bool {
        let tail = self.tail.0.load(Ordering::Acquire);
        (tail.wrapping_sub(slot.wrapping_add(1)) as i64) >= 0
    }

    /// Producer, about to sleep until the consumer releases `slot` (a frame whose payload the
    /// consumer reads from the producer's memory, which must stay put until then): raises its
    /// flag and looks again. True when it may sleep; false when the slot is released after all
    /// (flag lowered). The consumer's `release` rings when it sees the flag.
    pub(crate) fn producer_may_sleep_until_released(&self, slot: u64) -> bool {
        self.producer_sleeping.0.swap(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.released(slot) {
            self.producer_sleeping.0.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Consumer: the number of the oldest published slot not yet released, if any.
    pub(crate) fn full_slot(&self, slots: &impl SlotWords) -> Option<u64> {
        let tail = self.tail.0.load(Ordering::Relaxed);
        let word = slots.word(tail).load(Ordering::Acquire);
        (word & !TAG_MASK == published_word(tail, 0)).then_some(tail)
    }

    /// Consumer: the tag that slot `slot` (as returned by `full_slot`) was published with.
    pub(crate) fn tag(&self, slot: u64, slots: &impl SlotWords) -> u32 {
        slots.word(slot).load(Ordering::Relaxed) & TAG_MASK
    }

    /// Consumer: releases slot `slot` (as returned by `full_slot`, now read). True when the
    /// producer sleeps and must be woken.
    pub(crate) fn release(&self, slot: u64) -> bool {
        self.tail.0.store(slot.wrapping_add(1), Ordering::Release);
        fence(Ordering::SeqCst);
        self.producer_sleeping.0.load(Ordering::Relaxed) && self.producer_sleeping.0.swap(false, Ordering::AcqRel)
    }

    /// Consumer: releases slot `slot` (as returned by `full_slot`), a wrap: `tail` moves to
    /// the first slot of the next lap. True when the producer sleeps and must be woken.
    pub(crate) fn release_wrap(&self, slot: u64, n: u64) -> bool {
        self.tail.0.store(next_lap(slot, n), Ordering::Release);
        fence(Ordering::SeqCst);
        self.producer_sleeping.0.load(Ordering::Relaxed) && self.producer_sleeping.0.swap(false, Ordering::AcqRel)
    }

    /// Consumer, about to sleep until a slot is published: raises its flag and looks again.
    /// True when it may sleep; false when a slot arrived after all (flag lowered).
    pub(crate) fn consumer_may_sleep(&self, slots: &impl SlotWords) -> bool {
        self.consumer_sleeping.0.swap(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.full_slot(slots).is_some() {
            self.consumer_sleeping.0.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Consumer, about to sleep while it holds a frame it cannot deliver yet (its receive is
    /// not posted): raises its flag and looks again, so that the producer's next publication
    /// rings it, and it can move frames out of a ring that became full (the producer then
    /// waits on it). True when it may sleep; false when the ring is full already (flag
    /// lowered).
    pub(crate) fn consumer_may_sleep_until_full(&self, n: u64) -> bool {
        self.consumer_sleeping.0.swap(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.in_use(n) >= n {
            self.consumer_sleeping.0.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Slots published and not yet released (as the consumer sees it).
    pub(crate) fn in_use(&self, n: u64) -> u64 {
        let tail = self.tail.0.load(Ordering::Relaxed);
        let head = self.head.0.load(Ordering::Acquire);
        self.in_flight(head, tail, n).unwrap_or(n)
    }

    /// Slots published so far (for liveness: a moving counter is a living peer).
    pub(crate) fn published(&self) -> u64 {
        self.head.0.load(Ordering::Acquire)
    }
}

/// Sequence words of a ring of `n` slots, on their own (tests and loom models).
#[cfg(any(test, loom))]
pub(crate) struct Words(pub Vec<AtomicU32>);

#[cfg(any(test, loom))]
impl Words {
    pub(crate) fn new(n: u64) -> Words {
        Words((0..n).map(|_| AtomicU32::new(0)).collect())
    }
}

#[cfg(any(test, loom))]
impl SlotWords for Words {
    fn word(&self, slot: u64) -> &AtomicU32 {
        &self.0[(slot % self.0.len() as u64) as usize]
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn counts_and_refuses_nonsense() {
        let (r, w, mut seen) = (RingCtrl::new(), Words::new(2), 0);
        assert_eq!(r.full_slot(&w), None);
        let a = r.free_slot(2, &mut seen).unwrap().unwrap();
        assert!(!r.publish(a, 0, &w));
        let b = r.free_slot(2, &mut seen).unwrap().unwrap();
        r.publish(b, 0, &w);
        assert_eq!(r.free_slot(2, &mut seen), Ok(None));
        assert!(r.producer_may_sleep(2, 2, &mut seen));
        assert_eq!(r.full_slot(&w), Some(0));
        assert!(r.release(0), "the sleeping producer must be rung");
        assert!(!r.producer_may_sleep(2, 2, &mut seen));
        assert_eq!(r.full_slot(&w), Some(1));
        r.release(1);
        // Slot 0's word still says lap one: not published again until the producer writes it.
        assert_eq!(r.full_slot(&w), None);
        let c = r.free_slot(2, &mut seen).unwrap().unwrap();
        assert_eq!(c, 2);
        r.publish(c, 45, &w);
        assert_eq!(r.full_slot(&w), Some(2));
        assert_eq!(r.tag(2, &w), 45, "the tag comes through");
        // A peer that writes a tail far behind the head is caught, not trusted.
        r.tail.0.store(1000, Ordering::Relaxed);
        let mut stale = 0;
        r.head.0.store(2000, Ordering::Relaxed);
        assert_eq!(r.free_slot(2, &mut stale), Err(Corrupt));
    }

    #[test]
    fn the_producer_reads_the_shared_tail_only_when_its_copy_says_full() {
        let (r, w, mut seen) = (RingCtrl::new(), Words::new(4), 0);
        for _ in 0..4 {
            let s = r.free_slot(4, &mut seen).unwrap().unwrap();
            r.publish(s, 0, &w);
        }
        let s = r.full_slot(&w).unwrap();
        r.release(s);
        assert_eq!(seen, 0, "not read while the copy said there was room");
        assert_eq!(r.free_slot(4, &mut seen), Ok(Some(4)));
        assert_eq!(seen, 1, "read again once the copy said full");
    }

    /// A producer that uses only the first slot of each lap: every frame is followed by a wrap,
    /// the consumer follows the wraps, and neither side's counters stray more than a lap apart.
    #[test]
    fn a_small_ring_wraps_after_its_first_slot() {
        const WRAP: u32 = 64;
        let (r, w, mut seen) = (RingCtrl::new(), Words::new(4), 0);
        let a = r.free_slot(4, &mut seen).unwrap().unwrap();
        assert_eq!(a, 0);
        r.publish(a, 0, &w);
        // The next slot is past the limit: a wrap, which the consumer has not passed yet? It
        // has: it is in lap 0 already.
        let b = r.free_slot(4, &mut seen).unwrap().unwrap();
        assert!(r.can_wrap(b, 4, &mut seen));
        r.publish_wrap(b, 4, WRAP, &w);
        assert_eq!(r.head(), 4, "the next lap");
        // Lap 1's first slot is taken until the consumer releases lap 0's.
        assert_eq!(r.free_slot(4, &mut seen), Ok(None));
        assert!(r.producer_may_sleep(4, 1, &mut seen));
        assert_eq!(r.full_slot(&w), Some(0));
        assert!(r.release(0), "the sleeping producer is rung");
        // Slot 4 is free now; its wrap (slot 5) waits for the consumer to pass lap 0's wrap.
        let c = r.free_slot(4, &mut seen).unwrap().unwrap();
        assert_eq!(c, 4);
        r.publish(c, 0, &w);
        assert!(!r.can_wrap(5, 4, &mut seen), "the consumer is still in lap 0");
        assert!(r.producer_may_sleep(4, 1, &mut seen));
        assert_eq!(r.full_slot(&w), Some(1));
        assert_eq!(r.tag(1, &w), WRAP);
        assert!(r.release_wrap(1, 4), "the sleeping producer is rung");
        assert_eq!(r.free_slot(4, &mut seen), Ok(Some(5)));
        assert!(r.can_wrap(5, 4, &mut seen));
        assert!(!r.producer_may_sleep(4, 1, &mut seen));
        assert_eq!(r.full_slot(&w), Some(4));
    }

    #[test]
    fn a_producer_waits_for_the_release_of_one_slot() {
        let (r, w, mut seen) = (RingCtrl::new(), Words::new(4), 0);
        let a = r.free_slot(4, &mut seen).unwrap().unwrap();
        r.publish(a, 0, &w);
        let b = r.free_slot(4, &mut seen).unwrap().unwrap();
        r.publish(b, 0, &w);
        assert!(!r.released(a) && !r.released(b));
        // Free slots do not wake a producer that waits for `b` in particular.
        assert!(r.producer_may_sleep_until_released(b));
        // Any release rings a sleeping producer; it looks, and sleeps again for `b`.
        assert!(r.release(a));
        assert!(r.released(a) && !r.released(b));
        assert!(r.producer_may_sleep_until_released(b));
        assert!(r.release(b), "the sleeping producer must be rung");
        assert!(r.released(b));
        assert!(!r.producer_may_sleep_until_released(b));
    }

    #[test]
    fn control_block_is_four_cache_lines() {
        assert_eq!(CTRL_BYTES, 256);
    }
}

/// Loom models: run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::{Condvar, Mutex};
    use std::sync::Arc;

    /// A doorbell: a counting wake-up, like a byte on a socket that `poll` sees.
    #[derive(Default)]
    struct Bell {
        rung: Mutex<usize>,
        cond: Condvar,
    }

    impl Bell {
        fn ring(&self) {
            *self.rung.lock().unwrap() += 1;
            self.cond.notify_one();
        }
        fn sleep(&self) {
            let mut r = self.rung.lock().unwrap();
            while *r == 0 {
                r = self.cond.wait(r).unwrap();
            }
            *r -= 1;
        }
    }

    const N: u64 = 2;
    const ITEMS: u64 = 3;

    /// A single-copy frame: the producer publishes a descriptor and must not reuse its
    /// buffer until the consumer has released the slot; the consumer reads the buffer (in the
    /// producer's memory) before releasing. The producer sleeps until released, the consumer
    /// rings only when the producer sleeps: the producer is always woken, and never sees its
    /// slot released before the consumer read the buffer.
    #[test]
    fn loom_ring_single_copy_frame_is_released_after_it_is_read() {
        loom::model(|| {
            let ring = Arc::new(RingCtrl::new());
            let words = Arc::new(Words::new(N));
            let buffer = Arc::new(UnsafeCell::new(0u64));
            let (to_consumer, to_producer) = (Arc::new(Bell::default()), Arc::new(Bell::default()));
            let consumer = {
                let (ring, words, buffer, tc, tp) =
                    (ring.clone(), words.clone(), buffer.clone(), to_consumer.clone(), to_producer.clone());
                loom::thread::spawn(move || loop {
                    if let Some(s) = ring.full_slot(&*words) {
                        // SAFETY: the producer does not touch its buffer until released.
                        let got = buffer.with(|p| unsafe { *p });
                        assert_eq!(got, 7);
                        if ring.release(s) {
                            tp.ring();
                        }
                        break;
                    }
                    if ring.consumer_may_sleep(&*words) {
                        tc.sleep();
                    }
                })
            };
            // SAFETY: nobody reads the buffer before the slot is published.
            buffer.with_mut(|p| unsafe { *p = 7 });
            let s = ring.free_slot(N, &mut 0).unwrap().unwrap();
            if ring.publish(s, 0, &*words) {
                to_consumer.ring();
            }
            while !ring.released(s) {
                if ring.producer_may_sleep_until_released(s) {
                    to_producer.sleep();
                }
            }
            // Released: the buffer is the producer's again.
            // SAFETY: the consumer read it before releasing the slot.
            buffer.with_mut(|p| unsafe { *p = 0 });
            consumer.join().unwrap();
        });
    }

    /// A ring run on its first slot alone: the producer publishes a value in slot 0, wraps at
    /// slot 1 as a small ring does, then wraps at once again at the next lap's first slot, as
    /// a ring that shrinks does, which has to wait until the consumer followed the first wrap.
    /// The consumer must read the value and follow both wraps, and neither side may sleep
    /// through the other's progress (loom reports a deadlock if one does).
    #[test]
    fn loom_ring_wraps_without_lost_wakeups() {
        const WRAP: u32 = 64;
        const LIMIT: u64 = 1;
        loom::model(|| {
            let ring = Arc::new(RingCtrl::new());
            let words = Arc::new(Words::new(N));
            let slot0 = Arc::new(UnsafeCell::new(0u64));
            let (to_consumer, to_producer) = (Arc::new(Bell::default()), Arc::new(Bell::default()));
            let producer = {
                let (ring, words, slot0, tc, tp) =
                    (ring.clone(), words.clone(), slot0.clone(), to_consumer.clone(), to_producer.clone());
                loom::thread::spawn(move || {
                    let mut seen = 0;
                    let s = ring.free_slot(N, &mut seen).unwrap().unwrap();
                    // SAFETY: the ring protocol gives the producer this slot alone.
                    slot0.with_mut(|p| unsafe { *p = 7 });
                    if ring.publish(s, 0, &*words) {
                        tc.ring();
                    }
                    for limit in [LIMIT, 0] {
                        loop {
                            if let Some(s) = ring.free_slot(N, &mut seen).unwrap() {
                                if s % N >= limit && ring.can_wrap(s, N, &mut seen) {
                                    if ring.publish_wrap(s, N, WRAP, &*words) {
                                        tc.ring();
                                    }
                                    break;
                                }
                            }
                            if ring.producer_may_sleep(N, limit, &mut seen) {
                                tp.sleep();
                            }
                        }
                    }
                })
            };
            let mut wraps = 0;
            while wraps < 2 {
                if let Some(s) = ring.full_slot(&*words) {
                    if ring.tag(s, &*words) == WRAP {
                        assert_eq!(s % N, [LIMIT, 0][wraps]);
                        wraps += 1;
                        if ring.release_wrap(s, N) {
                            to_producer.ring();
                        }
                    } else {
                        assert_eq!(s, 0);
                        // SAFETY: the ring protocol gives the consumer this slot alone.
                        assert_eq!(slot0.with(|p| unsafe { *p }), 7);
                        if ring.release(s) {
                            to_producer.ring();
                        }
                    }
                    continue;
                }
                if ring.consumer_may_sleep(&*words) {
                    to_consumer.sleep();
                }
            }
            producer.join().unwrap();
        });
    }

    /// The consumer holds the first frame (its receive is not posted) and sleeps until the
    /// ring is full, then would move frames out; the producer fills the ring. The consumer
    /// must be woken by the publication that fills it (loom reports a deadlock otherwise).
    #[test]
    fn loom_ring_a_consumer_holding_a_frame_is_rung_when_the_ring_fills() {
        loom::model(|| {
            let ring = Arc::new(RingCtrl::new());
            let words = Arc::new(Words::new(N));
            let to_consumer = Arc::new(Bell::default());
            let producer = {
                let (ring, words, tc) = (ring.clone(), words.clone(), to_consumer.clone());
                loom::thread::spawn(move || {
                    let mut seen = 0;
                    for _ in 0..N {
                        let s = ring.free_slot(N, &mut seen).unwrap().unwrap();
                        if ring.publish(s, 0, &*words) {
                            tc.ring();
                        }
                    }
                })
            };
            // Holding the first frame once it is there.
            loop {
                if ring.full_slot(&*words).is_some() {
                    break;
                }
                if ring.consumer_may_sleep(&*words) {
                    to_consumer.sleep();
                }
            }
            while ring.consumer_may_sleep_until_full(N) {
                to_consumer.sleep();
            }
            assert_eq!(ring.in_use(N), N);
            producer.join().unwrap();
        });
    }

    /// The producer fills slots with 1, 2, 3; the consumer must read exactly those, in order,
    /// and neither may sleep through the other's progress (loom reports a deadlock if one
    /// does).
    #[test]
    fn loom_ring_delivers_in_order_without_lost_wakeups() {
        loom::model(|| {
            let ring = Arc::new(RingCtrl::new());
            let words = Arc::new(Words::new(N));
            let slots: Arc<Vec<UnsafeCell<u64>>> = Arc::new((0..N).map(|_| UnsafeCell::new(0)).collect());
            let (to_consumer, to_producer) = (Arc::new(Bell::default()), Arc::new(Bell::default()));
            let producer = {
                let (ring, words, slots, tc, tp) =
                    (ring.clone(), words.clone(), slots.clone(), to_consumer.clone(), to_producer.clone());
                loom::thread::spawn(move || {
                    // The producer's own copy of the tail.
                    let mut seen = 0;
                    for v in 1..=ITEMS {
                        loop {
                            if let Some(s) = ring.free_slot(N, &mut seen).unwrap() {
                                // SAFETY: the ring protocol gives the producer this slot alone.
                                slots[(s % N) as usize].with_mut(|p| unsafe { *p = v });
                                if ring.publish(s, 0, &*words) {
                                    tc.ring();
                                }
                                break;
                            }
                            if ring.producer_may_sleep(N, N, &mut seen) {
                                tp.sleep();
                            }
                        }
                    }
                })
            };
            for v in 1..=ITEMS {
                loop {
                    if let Some(s) = ring.full_slot(&*words) {
                        // SAFETY: the ring protocol gives the consumer this slot alone.
                        let got = slots[(s % N) as usize].with(|p| unsafe { *p });
                        assert_eq!(got, v);
                        if ring.release(s) {
                            to_producer.ring();
                        }
                        break;
                    }
                    if ring.consumer_may_sleep(&*words) {
                        to_consumer.sleep();
                    }
                }
            }
            producer.join().unwrap();
        });
    }
}
