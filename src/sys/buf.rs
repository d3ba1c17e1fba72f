//! Raw views of user buffers for operations in flight.
//!
//! An operation keeps pointers to its buffers from the call that posts it until it completes,
//! across threads (the caller, or a progress-pool thread, drives it). Rust's borrows
//! cannot span that, so the operation holds a [`RawBuf`] instead, and the crate upholds this
//! contract: a `RawBuf` is made only from a borrow that outlives the operation (a blocking call
//! holds the borrow until completion; a group holds it until `end`) or from memory the
//! operation owns (the `Vec` of a non-blocking request, scratch space), and nothing else
//! touches that memory until the operation completes. This module is the one place that turns
//! such pointers back into slices.

/// True when two address ranges `(start, len)` share at least one byte (empty ones share none).
pub(crate) fn ranges_overlap((a, alen): (usize, usize), (b, blen): (usize, usize)) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// A pointer and a length in bytes, of host memory that an operation in flight may use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawBuf {
    ptr: *mut u8,
    len: usize,
    writable: bool,
}

// SAFETY: a RawBuf is a plain pointer; the contract above (the memory outlives the operation
// and nobody else touches it meanwhile) is what makes using it from another thread sound.
unsafe impl Send for RawBuf {}
// SAFETY: as above; shared use only ever reads through `bytes`.
unsafe impl Sync for RawBuf {}

impl RawBuf {
    /// An empty buffer (null operations, unused send buffers).
    pub(crate) const EMPTY: RawBuf =
        RawBuf { ptr: std::ptr::NonNull::<u64>::dangling().as_ptr() as *mut u8, len: 0, writable: true };

    /// A read-only view of `s`.
    pub(crate) fn from_slice<T: bytemuck::Pod>(s: &[T]) -> RawBuf {
        let b: &[u8] = bytemuck::cast_slice(s);
        RawBuf { ptr: b.as_ptr() as *mut u8, len: b.len(), writable: false }
    }

    /// A writable view of `s`.
    pub(crate) fn from_mut<T: bytemuck::Pod>(s: &mut [T]) -> RawBuf {
        let b: &mut [u8] = bytemuck::cast_slice_mut(s);
        RawBuf { ptr: b.as_mut_ptr(), len: b.len(), writable: true }
    }

    /// A view of raw memory handed in through the C ABI (`len == 0` gives the empty view,
    /// whatever the pointer).
    ///
    /// # Safety
    /// Unless `len == 0`, `ptr` must be valid for reads (and writes, if `writable`) of `len`
    /// bytes for as long as the operation that uses the view runs.
    pub(crate) unsafe fn from_raw(ptr: *mut u8, len: usize, writable: bool) -> RawBuf {
        if len == 0 {
            return RawBuf::EMPTY;
        }
        RawBuf { ptr, len, writable }
    }

    /// The address of its first byte (to tell whether two views overlap).
    pub(crate) fn addr(&self) -> usize {
        self.ptr as usize
    }

    /// Bytes `[off, off + len)`, or `None` when out of range.
    ///
    /// # Safety
    /// The caller is the operation that owns this view (see the module contract), no mutable
    /// slice of the same bytes is alive, and the slice does not outlive the operation (the
    /// caller picks the lifetime `'a`).
    pub(crate) unsafe fn bytes<'a>(self, off: usize, len: usize) -> Option<&'a [u8]> {
        if off.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: in range of a region valid for reads by the module contract.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) })
    }

    /// Bytes `[off, off + len)` for writing, or `None` when out of range or read-only.
    ///
    /// # Safety
    /// As for [`RawBuf::bytes`], and no other slice of the same bytes is alive.
    pub(crate) unsafe fn bytes_mut<'a>(self, off: usize, len: usize) -> Option<&'a mut [u8]> {
        if !self.writable || off.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: in range of a region valid for writes by the module contract.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) })
    }
}

/// Copies `len` bytes from `src[soff..]` to `dst[doff..]` (overlap allowed). `None` when a
/// range is out of bounds or `dst` is read-only.
///
/// # Safety
/// The caller is the operation that owns both views (module contract), and no slice of the
/// destination bytes is alive.
pub(crate) unsafe fn copy_region(src: RawBuf, soff: usize, dst: RawBuf, doff: usize, len: usize) -> Option<()> {
    if !dst.writable || soff.checked_add(len)? > src.len || doff.checked_add(len)? > dst.len {
        return None;
    }
    // SAFETY: both ranges are in bounds of regions valid for the operation; `copy` is memmove.
    unsafe { std::ptr::copy(src.ptr.add(soff), dst.ptr.add(doff), len) };
    Some(())
}

/// Scratch memory owned by an operation, 16-byte aligned so that every element type fits.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    words: Vec<u128>,
    len: usize,
}

impl Scratch {
    pub(crate) fn new(len: usize) -> Scratch {
        Scratch { words: vec![0u128; len.div_ceil(16)], len }
    }

    /// Scratch space of `len` bytes in `spare`'s memory if it is large enough (its contents
    /// are whatever the last user left: plans write scratch before they read it), else new.
    /// Reusing it keeps large operations off the allocator, which may hand fresh pages to each
    /// one (every byte then costs a page fault) depending on what else the heap holds.
    pub(crate) fn reuse(spare: Option<Scratch>, len: usize) -> Scratch {
        match spare {
            Some(mut s) if s.words.len() * 16 >= len => {
                s.len = len;
                s
            }
            _ => Scratch::new(len),
        }
    }

    /// Bytes this scratch space can hold.
    pub(crate) fn capacity(&self) -> usize {
        self.words.len() * 16
    }

    /// A view for the operation that owns this scratch space.
    pub(crate) fn raw(&mut self) -> RawBuf {
        RawBuf { ptr: self.words.as_mut_ptr() as *mut u8, len: self.len, writable: true }
    }
}
