//! Liveness of one peer link: when to send a heartbeat and when to give up on the peer.
//!
//! A state machine without I/O or clock: the engine feeds it what happened and the current
//! time, and asks it what to do. Any byte from the peer counts as a sign of life; a heartbeat
//! frame goes out whenever nothing else did for one interval. The peer is declared
//! unresponsive when nothing arrived for the timeout *while we depend on it*: an idle world
//! still listens (peers always send heartbeats), but a link whose input we paused ourselves
//! (flow control) proves nothing by its silence.

use std::time::{Duration, Instant};

/// Heartbeat settings of a world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// How often a rank sends a heartbeat on a link that carried nothing else.
    pub interval: Duration,
    /// How long a peer may stay silent before the world is declared broken.
    pub timeout: Duration,
}

impl Default for Heartbeat {
    /// 1 s interval, 3 s timeout. A peer that is descheduled for up to two seconds on a loaded
    /// machine (timeout less interval) is not declared dead by mistake; a process that really
    /// dies is detected at once by its closed socket, not by this timer. The interval is what
    /// an idle world costs: one pass on each side per interval, which for a thousand idle
    /// worlds is about half a percent of a core (`docs/benchmarks.md`).
    fn default() -> Self {
        Heartbeat { interval: Duration::from_millis(1000), timeout: Duration::from_secs(3) }
    }
}

/// What the liveness machine asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing to do before the returned instant.
    Fine,
    /// Send a heartbeat now.
    SendHeartbeat,
    /// The peer has been silent for this long: give up on it.
    Unresponsive(Duration),
}

/// Liveness of one link.
#[derive(Debug, Clone)]
pub(crate) struct Liveness {
    cfg: Heartbeat,
    last_rx: Instant,
    last_tx: Instant,
}

impl Liveness {
    pub(crate) fn new(cfg: Heartbeat, now: Instant) -> Self {
        Liveness { cfg, last_rx: now, last_tx: now }
    }

    /// Bytes arrived from the peer.
    pub(crate) fn on_rx(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// Bytes went out to the peer.
    pub(crate) fn on_tx(&mut self, now: Instant) {
        self.last_tx = now;
    }

    /// What to do now. `listening` is false while we deliberately stopped reading the link.
    pub(crate) fn poll(&self, now: Instant, listening: bool) -> Verdict {
        let silent = now.saturating_duration_since(self.last_rx);
        if listening && silent > self.cfg.timeout {
            return Verdict::Unresponsive(silent);
        }
        if now.saturating_duration_since(self.last_tx) >= self.cfg.interval {
            return Verdict::SendHeartbeat;
        }
        Verdict::Fine
    }

    /// The next instant at which [`Liveness::poll`] may answer differently.
    pub(crate) fn next_deadline(&self, listening: bool) -> Instant {
        let hb = self.last_tx + self.cfg.interval;
        if listening {
            hb.min(self.last_rx + self.cfg.timeout + Duration::from_millis(1))
        } else {
            hb
        }
    }

    /// When a paused link starts being listened to again, its silence so far proves nothing.
    pub(crate) fn resume_listening(&mut self, now: Instant) {
        self.last_rx = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Heartbeat {
        Heartbeat { interval: Duration::from_millis(100), timeout: Duration::from_millis(1000) }
    }

    #[test]
    fn sends_heartbeats_only_when_idle() {
        let t0 = Instant::now();
        let mut l = Liveness::new(cfg(), t0);
        assert_eq!(l.poll(t0 + Duration::from_millis(50), true), Verdict::Fine);
        assert_eq!(l.poll(t0 + Duration::from_millis(100), true), Verdict::SendHeartbeat);
        l.on_tx(t0 + Duration::from_millis(90));
        assert_eq!(l.poll(t0 + Duration::from_millis(150), true), Verdict::Fine);
        assert_eq!(l.next_deadline(true), t0 + Duration::from_millis(190));
    }

    #[test]
    fn silence_while_listening_breaks_after_timeout() {
        let t0 = Instant::now();
        let mut l = Liveness::new(cfg(), t0);
        // Heartbeats keep arriving: never unresponsive.
        for i in 1..50 {
            let now = t0 + Duration::from_millis(100 * i);
            l.on_rx(now);
            l.on_tx(now);
            assert_eq!(l.poll(now, true), Verdict::Fine);
        }
        // Then the peer goes quiet.
        let last = t0 + Duration::from_millis(4900);
        assert_eq!(l.poll(last + Duration::from_millis(1000), true), Verdict::SendHeartbeat);
        match l.poll(last + Duration::from_millis(1001), true) {
            Verdict::Unresponsive(d) => assert_eq!(d, Duration::from_millis(1001)),
            v => panic!("expected unresponsive, got {v:?}"),
        }
    }

    #[test]
    fn paused_link_is_not_accused() {
        let t0 = Instant::now();
        let mut l = Liveness::new(cfg(), t0);
        let later = t0 + Duration::from_secs(10);
        l.on_tx(later);
        assert_eq!(l.poll(later, false), Verdict::Fine);
        l.resume_listening(later);
        assert_eq!(l.poll(later + Duration::from_millis(999), true), Verdict::SendHeartbeat);
        assert!(matches!(l.poll(later + Duration::from_millis(1001), true), Verdict::Unresponsive(_)));
    }
}
