//! The doorbell socket of a pair's segment, shared by every lane's link in this process.
//!
//! A pair of processes has one socket between them (the TCP connection of the segment's first
//! link), whatever number of worlds use lanes of the segment (`lane.rs`): a world made from a
//! world opens no socket. A doorbell is one byte naming the lane it is for ([`Bell::ring`]);
//! whichever link of this process reads the socket ([`Bell::drain`]) wakes the link of the
//! lane named, through that link's [`Wake`], so no link sleeps through a doorbell another one
//! read. A lane whose world ends says so in the segment (its end word, `mod.rs`) and rings with
//! [`END`] set, which also wakes its peer's watch of an idle world. The socket closes when the
//! last link of the pair in this process (and the last source for new lanes) lets go of it: its
//! end then tells the peer that this process is gone, for every lane at once.
//!
//! **Alone, and shared.** While the segment's first link is the only one here, it sleeps on the
//! bare socket and reads it without a lock or a lookup, as a pair without lanes always did.
//! Offering lanes ([`Bell::share`]) turns the bell shared for good: from then on every link
//! sleeps on its own [`Wake`], with the socket in the same set. The switch is refused while the
//! first link sleeps on the bare socket ([`Bell::sleep_bare`]): another link could otherwise
//! read a doorbell meant for it, and it would sleep on. `loom_bell_*` below model the switch.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::sys::sync::{lock, Arc, AtomicU32, Mutex, Ordering};
use crate::transport::wake::Wake;

/// A doorbell byte's lane bits...
const LANE_MASK: u8 = 0x3f;
/// ...and the bit that says the lane's link ended.
pub(crate) const END: u8 = 0x40;
const _: () = assert!(super::lane::LANES <= LANE_MASK as usize + 1);

/// [`Bell::mode`]: the first link sleeps on the bare socket...
const BARE: u32 = 1;
/// ...or the bell is shared (every link sleeps on its own wake).
const SHARED: u32 = 2;

pub(crate) struct Bell {
    sock: OwnedFd,
    mode: AtomicU32,
    /// The wakes of this process's links on the segment, by lane, once the bell is shared.
    wakes: Mutex<Vec<(usize, Arc<Wake>)>>,
}

impl Bell {
    pub(crate) fn new(sock: OwnedFd) -> Arc<Bell> {
        Arc::new(Bell { sock, mode: AtomicU32::new(0), wakes: Mutex::new(Vec::new()) })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Rings the link of lane `lane` on the peer's side (`end`: this side's link there ended).
    /// An error only when the socket is gone (the peer process left or died); a full socket
    /// already holds doorbells enough.
    pub(crate) fn ring(&self, lane: usize, end: bool) -> io::Result<()> {
        let b = lane as u8 & LANE_MASK | if end { END } else { 0 };
        match crate::sys::send_nowait(self.fd(), &[b]) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads every doorbell there, for the link of lane `me`, and wakes the links of the other
    /// lanes named; true once the socket reports its end (the peer process is gone).
    pub(crate) fn drain(&self, me: usize) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match crate::sys::recv_nowait(self.fd(), &mut buf) {
                Ok(0) => return true,
                Ok(n) => self.hand_on(me, &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }

    /// Wakes the links named by `bytes` other than `me`'s.
    fn hand_on(&self, me: usize, bytes: &[u8]) {
        if bytes.iter().all(|b| usize::from(b & LANE_MASK) == me) {
            return;
        }
        let wakes = lock(&self.wakes);
        for b in bytes.iter().filter(|b| usize::from(*b & LANE_MASK) != me) {
            // A lane with no link here (its world ended, or has not started its link yet) needs
            // no wake: a link looks at its ring before it first sleeps.
            if let Some((_, w)) = wakes.iter().find(|(l, _)| *l == usize::from(b & LANE_MASK)) {
                w.ev.signal();
                if b & END != 0 {
                    w.hup.signal();
                }
            }
        }
    }

    /// Turns the bell shared, so that links of other lanes may use it: false while the first
    /// link sleeps on the bare socket (then no lane is offered this time).
    pub(crate) fn share(&self) -> bool {
        share(&self.mode)
    }

    pub(crate) fn shared(&self) -> bool {
        self.mode.load(Ordering::Acquire) & SHARED != 0
    }

    /// The first link, alone, is about to sleep on the bare socket: false once the bell is
    /// shared (it sleeps on its wake instead).
    pub(crate) fn sleep_bare(&self) -> bool {
        sleep_bare(&self.mode)
    }

    /// The first link woke from the bare socket (or ended).
    pub(crate) fn woke(&self) {
        woke(&self.mode)
    }

    /// A wake for the link of lane `lane`, known to whoever drains the socket.
    pub(crate) fn join(&self, lane: usize) -> io::Result<Arc<Wake>> {
        let w = Arc::new(Wake::new(self.fd())?);
        let mut wakes = lock(&self.wakes);
        wakes.retain(|(l, _)| *l != lane);
        wakes.push((lane, w.clone()));
        Ok(w)
    }

    /// The link of lane `lane` ended: no wake for it any more.
    pub(crate) fn leave(&self, lane: usize, wake: &Arc<Wake>) {
        lock(&self.wakes).retain(|(l, w)| *l != lane || !Arc::ptr_eq(w, wake));
    }
}

impl Drop for Bell {
    fn drop(&mut self) {
        // Read what is left, so that closing sends the peer an end, not a reset.
        let mut buf = [0u8; 256];
        while matches!(crate::sys::recv_nowait(self.fd(), &mut buf), Ok(n) if n > 0) {}
    }
}

fn share(mode: &AtomicU32) -> bool {
    mode.fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| (m & BARE == 0).then_some(m | SHARED)).is_ok()
}

fn sleep_bare(mode: &AtomicU32) -> bool {
    mode.fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| (m & SHARED == 0).then_some(m | BARE)).is_ok()
}

fn woke(mode: &AtomicU32) {
    if mode.load(Ordering::Relaxed) & BARE != 0 {
        mode.fetch_and(!BARE, Ordering::AcqRel);
    }
}

#[cfg(loom)]
mod loom_models {
    use super::*;
    use loom::sync::atomic::AtomicBool;

    /// The first link sleeps on the bare socket (twice) while lanes are offered: the bell never
    /// turns shared while it sleeps there, where another link could read its doorbell.
    #[test]
    fn loom_bell_never_shared_while_the_first_link_sleeps_bare() {
        loom::model(|| {
            let mode = std::sync::Arc::new(AtomicU32::new(0));
            let bare = std::sync::Arc::new(AtomicBool::new(false));
            let (m1, b1) = (mode.clone(), bare.clone());
            let first = loom::thread::spawn(move || {
                for _ in 0..2 {
                    if sleep_bare(&m1) {
                        b1.store(true, Ordering::SeqCst);
                        b1.store(false, Ordering::SeqCst);
                        woke(&m1);
                    }
                }
            });
            let (m2, b2) = (mode.clone(), bare.clone());
            let offer = loom::thread::spawn(move || {
                if share(&m2) {
                    assert!(!b2.load(Ordering::SeqCst), "shared while the first link sleeps bare");
                    // And from now on it never sleeps there.
                    assert!(!sleep_bare(&m2));
                }
            });
            first.join().unwrap();
            offer.join().unwrap();
        });
    }
}
