//! A pair's shared-memory segment: a file in `/dev/shm` made with `O_EXCL` and mode 0600 by
//! the higher rank, opened by the lower rank without following links, and unlinked as soon as
//! both have mapped it. Every page that will be touched is reserved before it is touched (a
//! full `/dev/shm` is an error, never a `SIGBUS`): at set-up, the control page and the small
//! rings of lane 0; the rest of each ring only when its writer grows it (`ShmLink::grow`), and
//! the other lanes' small rings when a new world claims them (`lane.rs`). On a kernel that
//! cannot populate a mapping on request, lane 0 is reserved whole at set-up, its rings never
//! shrink (`FIXED_AT`), and no other lane is offered.

use super::*;

/// A mapped segment, and its file until it is unlinked.
pub(crate) struct Segment {
    pub(super) map: MmapMut,
    path: Option<PathBuf>,
}

impl Segment {
    /// Makes a new segment file only this user can open, with the pages of its small rings
    /// reserved and zeroed (a zeroed control block is an empty ring), and maps it. A full
    /// `/dev/shm` is an error.
    pub(crate) fn create() -> io::Result<Segment> {
        let name = format!("mw-{}-{:016x}", std::process::id(), crate::sys::random_u64());
        let path = Path::new("/dev/shm").join(name);
        let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
        // Pages are reserved before they are touched: an unbacked page of a full tmpfs would
        // raise SIGBUS at the first store and kill the whole process, every world with it.
        let on_demand = crate::sys::can_populate();
        let fd = file.as_raw_fd();
        let reserved = file.set_len(SEGMENT_BYTES as u64).and_then(|()| {
            if on_demand {
                small_parts(0).try_for_each(|r| crate::sys::reserve(fd, r.start as u64, r.len() as u64))
            } else {
                crate::sys::reserve(fd, 0, LANE_BYTES as u64)
            }
        });
        let seg = reserved.and_then(|()| map(&file));
        match seg {
            Ok(map) => {
                let seg = Segment { map, path: Some(path) };
                if !on_demand {
                    fixed_flag(&seg).store(1, Ordering::Release);
                }
                Ok(seg)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Maps the segment a peer made.
    pub(crate) fn open(path: &str) -> io::Result<Segment> {
        let path = Path::new(path);
        if path.parent() != Some(Path::new("/dev/shm")) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "segment outside /dev/shm"));
        }
        // The path comes from a peer: never follow a link out of /dev/shm, map only a plain file.
        let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "segment is not a plain file"));
        }
        if meta.len() != SEGMENT_BYTES as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "segment of the wrong size"));
        }
        Ok(Segment { map: map(&file)?, path: None })
    }

    /// Byte `at` of the mapping.
    pub(crate) fn ptr(&self, at: usize) -> *mut u8 {
        assert!(at < SEGMENT_BYTES);
        // SAFETY: `at` lies in the mapping (checked above).
        unsafe { self.map.as_ptr().add(at) as *mut u8 }
    }

    /// The 8-byte word at `at`, which must lie in a control page (the first page of a lane),
    /// 8-byte aligned.
    pub(crate) fn word(&self, at: usize) -> &AtomicU64 {
        assert!(at % 8 == 0 && at % LANE_BYTES < RINGS_AT);
        // SAFETY: the word lies in the mapping, in a lane's control page, 8-byte aligned; such
        // pages start zeroed and both sides only ever use their words atomically. An
        // AtomicU64 has the layout of a u64.
        unsafe { &*(self.ptr(at) as *const AtomicU64) }
    }

    /// The file's path, while it exists.
    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Removes the file; the mappings stay.
    pub(crate) fn unlink(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// The ranges of lane `lane`'s pages that its small rings use: its control page, each ring's
/// first slot and the line where it wraps (everything but the grown parts).
pub(super) fn small_parts(lane: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let at = lane * LANE_BYTES;
    let (a, b) = (grown_part(0), grown_part(1));
    [0..a.start, a.end..b.start, b.end..LANE_BYTES]
        .into_iter()
        .map(move |r| at + r.start..at + r.end)
        .filter(|r| !r.is_empty())
}

fn map(file: &File) -> io::Result<MmapMut> {
    // SAFETY: the file is a private 0600 segment of fixed size that only the two ranks of the
    // pair map; its contents are only read through the checked ring protocol below.
    unsafe { MmapMut::map_mut(file) }
}
