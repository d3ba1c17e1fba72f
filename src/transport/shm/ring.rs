//! The protocol of a single-producer, single-consumer ring of slots, and its sleep/wake
//! handshake. The control block lives in memory shared by two processes (`transport/shm.rs`
//! places it in a mapped segment); the slots' contents are the caller's business.
//!
//! - `head` counts slots the producer has filled and published; `tail` counts slots the
//!   consumer has finished with. Slot `i` lives at index `i % n`. The producer fills a slot
//!   only while `head - tail < n`, the consumer reads one only while `tail < head`, so the two
//!   never touch the same slot at once. Publishing is a release store, observing an acquire
//!   load, so a slot's bytes are visible before its index is.
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
//! A zeroed control block is a valid empty ring.

use crate::sys::sync::{fence, AtomicBool, AtomicU64, Ordering};

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

    /// Producer: the number of the next free slot, if one is free.
    pub(crate) fn free_slot(&self, n: u64) -> Result<Option<u64>, Corrupt> {
        let head = self.head.0.load(Ordering::Relaxed);
        let tail = self.tail.0.load(Ordering::Acquire);
        Ok((self.in_flight(head, tail, n)? < n).then_some(head))
    }

    /// Producer: publishes slot `slot` (as returned by `free_slot`, now filled). True when
    /// the consumer sleeps and must be woken.
    pub(crate) fn publish(&self, slot: u64) -> bool {
        self.head.0.store(slot.wrapping_add(1), Ordering::Release);
        fence(Ordering::SeqCst);
        self.consumer_sleeping.0.load(Ordering::Relaxed) && self.consumer_sleeping.0.swap(false, Ordering::AcqRel)
    }

    /// Producer, about to sleep until a slot frees: raises its flag and looks again. True when
    /// it may sleep; false when a slot is free after all (flag lowered).
    pub(crate) fn producer_may_sleep(&self, n: u64) -> bool {
        self.producer_sleeping.0.swap(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if matches!(self.free_slot(n), Ok(Some(_)) | Err(_)) {
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
    pub(crate) fn full_slot(&self, n: u64) -> Result<Option<u64>, Corrupt> {
        let tail = self.tail.0.load(Ordering::Relaxed);
        let head = self.head.0.load(Ordering::Acquire);
        Ok((self.in_flight(head, tail, n)? > 0).then_some(tail))
    }

    /// Consumer: releases slot `slot` (as returned by `full_slot`, now read). True when the
    /// producer sleeps and must be woken.
    pub(crate) fn release(&self, slot: u64) -> bool {
        self.tail.0.store(slot.wrapping_add(1), Ordering::Release);
        fence(Ordering::SeqCst);
        self.producer_sleeping.0.load(Ordering::Relaxed) && self.producer_sleeping.0.swap(false, Ordering::AcqRel)
    }

    /// Consumer, about to sleep until a slot is published: raises its flag and looks again.
    /// True when it may sleep; false when a slot arrived after all (flag lowered).
    pub(crate) fn consumer_may_sleep(&self, n: u64) -> bool {
        self.consumer_sleeping.0.swap(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if matches!(self.full_slot(n), Ok(Some(_)) | Err(_)) {
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn counts_and_refuses_nonsense() {
        let r = RingCtrl::new();
        assert_eq!(r.full_slot(2), Ok(None));
        let a = r.free_slot(2).unwrap().unwrap();
        assert!(!r.publish(a));
        let b = r.free_slot(2).unwrap().unwrap();
        r.publish(b);
        assert_eq!(r.free_slot(2), Ok(None));
        assert!(r.producer_may_sleep(2));
        assert_eq!(r.full_slot(2), Ok(Some(0)));
        assert!(r.release(0), "the sleeping producer must be rung");
        assert!(!r.producer_may_sleep(2));
        // A peer that writes a head far ahead of the tail is caught, not trusted.
        r.head.0.store(1000, Ordering::Relaxed);
        assert_eq!(r.full_slot(2), Err(Corrupt));
        assert_eq!(r.free_slot(2), Err(Corrupt));
    }

    #[test]
    fn a_producer_waits_for_the_release_of_one_slot() {
        let r = RingCtrl::new();
        let a = r.free_slot(4).unwrap().unwrap();
        r.publish(a);
        let b = r.free_slot(4).unwrap().unwrap();
        r.publish(b);
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
            let buffer = Arc::new(UnsafeCell::new(0u64));
            let (to_consumer, to_producer) = (Arc::new(Bell::default()), Arc::new(Bell::default()));
            let consumer = {
                let (ring, buffer, tc, tp) = (ring.clone(), buffer.clone(), to_consumer.clone(), to_producer.clone());
                loom::thread::spawn(move || loop {
                    if let Some(s) = ring.full_slot(N).unwrap() {
                        // SAFETY: the producer does not touch its buffer until released.
                        let got = buffer.with(|p| unsafe { *p });
                        assert_eq!(got, 7);
                        if ring.release(s) {
                            tp.ring();
                        }
                        break;
                    }
                    if ring.consumer_may_sleep(N) {
                        tc.sleep();
                    }
                })
            };
            // SAFETY: nobody reads the buffer before the slot is published.
            buffer.with_mut(|p| unsafe { *p = 7 });
            let s = ring.free_slot(N).unwrap().unwrap();
            if ring.publish(s) {
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

    /// The producer fills slots with 1, 2, 3; the consumer must read exactly those, in order,
    /// and neither may sleep through the other's progress (loom reports a deadlock if one
    /// does).
    #[test]
    fn loom_ring_delivers_in_order_without_lost_wakeups() {
        loom::model(|| {
            let ring = Arc::new(RingCtrl::new());
            let slots: Arc<Vec<UnsafeCell<u64>>> = Arc::new((0..N).map(|_| UnsafeCell::new(0)).collect());
            let (to_consumer, to_producer) = (Arc::new(Bell::default()), Arc::new(Bell::default()));
            let producer = {
                let (ring, slots, tc, tp) = (ring.clone(), slots.clone(), to_consumer.clone(), to_producer.clone());
                loom::thread::spawn(move || {
                    for v in 1..=ITEMS {
                        loop {
                            if let Some(s) = ring.free_slot(N).unwrap() {
                                // SAFETY: the ring protocol gives the producer this slot alone.
                                slots[(s % N) as usize].with_mut(|p| unsafe { *p = v });
                                if ring.publish(s) {
                                    tc.ring();
                                }
                                break;
                            }
                            if ring.producer_may_sleep(N) {
                                tp.sleep();
                            }
                        }
                    }
                })
            };
            for v in 1..=ITEMS {
                loop {
                    if let Some(s) = ring.full_slot(N).unwrap() {
                        // SAFETY: the ring protocol gives the consumer this slot alone.
                        let got = slots[(s % N) as usize].with(|p| unsafe { *p });
                        assert_eq!(got, v);
                        if ring.release(s) {
                            to_producer.ring();
                        }
                        break;
                    }
                    if ring.consumer_may_sleep(N) {
                        to_consumer.sleep();
                    }
                }
            }
            producer.join().unwrap();
        });
    }
}
