//! Memory held for early frames (frames that arrived before their receive was posted), counted
//! across every world of the process. Each world caps what it holds per peer
//! ([`super::UNEXPECTED_CAP`]); this caps the sum, so that slow receivers on many worlds, or
//! one world with many peers, cannot take the process's memory: a world that would go over it
//! stops reading that link, its peer's sends wait, and nothing is lost. The cap is 256 MiB,
//! or `MW_EARLY_FRAMES_MAX_MB` mebibytes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Bytes held by every [`Early`] alive in the process.
static HELD: AtomicUsize = AtomicUsize::new(0);

fn cap() -> usize {
    static CAP: OnceLock<usize> = OnceLock::new();
    *CAP.get_or_init(|| {
        let mb = std::env::var("MW_EARLY_FRAMES_MAX_MB").ok().and_then(|v| v.trim().parse::<usize>().ok());
        mb.unwrap_or(256).saturating_mul(1 << 20)
    })
}

/// True when `len` more bytes of early frames fit under the process's cap.
pub(crate) fn room_for(len: usize) -> bool {
    HELD.load(Ordering::Relaxed).saturating_add(len) <= cap()
}

/// An early frame's payload, counted in the process's total for as long as it lives (however
/// it goes: delivered, or dropped with its world).
#[derive(Debug)]
pub(crate) struct Early(Vec<u8>);

impl Early {
    pub(crate) fn new(payload: Vec<u8>) -> Early {
        HELD.fetch_add(payload.len(), Ordering::Relaxed);
        Early(payload)
    }
}

impl std::ops::Deref for Early {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Early {
    fn drop(&mut self) {
        HELD.fetch_sub(self.0.len(), Ordering::Relaxed);
    }
}
