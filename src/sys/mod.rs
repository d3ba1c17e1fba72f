//! The system layer: thin, checked wrappers over the few system calls the standard library
//! lacks (`poll`, `epoll`, `eventfd`, vectored `sendmsg` without `SIGPIPE`, `fallocate`, interface
//! addresses, host identity), raw views of user buffers (`buf`), the one source of atomics and
//! locks (`sync`) and the logger (`log`). Every `unsafe` block for these calls lives here.

#[macro_use]
pub(crate) mod log;
pub(crate) mod buf;
pub(crate) mod crc32c;
pub(crate) mod sync;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

/// `poll(2)` on `fds` until an event or `deadline`. Returns the number of ready descriptors
/// (0 on timeout). Interrupted calls are retried.
pub(crate) fn poll(fds: &mut [libc::pollfd], deadline: Option<Instant>) -> io::Result<usize> {
    loop {
        let timeout_ms: libc::c_int = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so that a wait never ends before its deadline.
                let ms = left.as_micros().div_ceil(1000);
                ms.min(i32::MAX as u128) as libc::c_int
            }
        };
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Gives bytes `at..at + len` of a file real storage (`posix_fallocate`). On tmpfs this takes
/// the pages now, so a full `/dev/shm` is an error here rather than a `SIGBUS` at the first
/// store into a mapping of it.
pub(crate) fn reserve(fd: RawFd, at: u64, len: u64) -> io::Result<()> {
    let bad = |_| io::Error::from(io::ErrorKind::InvalidInput);
    let (at, len) = (libc::off_t::try_from(at).map_err(bad)?, libc::off_t::try_from(len).map_err(bad)?);
    loop {
        // SAFETY: takes no pointers; `fd` is a descriptor the caller owns.
        let r = unsafe { libc::posix_fallocate(fd, at, len) };
        match r {
            0 => return Ok(()),
            libc::EINTR => continue,
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// Gives the pages of a shared file mapping real storage now (`MADV_POPULATE_WRITE`): an error
/// when the file system is full, never a `SIGBUS` later. `addr` is page-aligned.
///
/// # Safety
/// `addr..addr + len` lies in a writable shared mapping of this process.
pub(crate) unsafe fn populate(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: the caller's range is mapped; populating writes nothing the program can see.
    unsafe { advise(addr, len, libc::MADV_POPULATE_WRITE) }
}

/// Frees the pages of a shared file mapping (`MADV_REMOVE`, a hole punched in the file, for
/// every process that maps it); they read as zeros until written again.
///
/// # Safety
/// `addr..addr + len` lies in a writable shared mapping of this process, page-aligned, and
/// no one relies on its contents any more.
pub(crate) unsafe fn discard(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: as the caller promises.
    unsafe { advise(addr, len, libc::MADV_REMOVE) }
}

/// # Safety
/// As `populate` and `discard` require of their callers.
unsafe fn advise(addr: *mut u8, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: as the caller promises.
    match unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// True when this kernel can populate a mapping on request (`MADV_POPULATE_WRITE`, Linux
/// 5.14), the one safe way to give a shared mapping more memory later without its file.
pub(crate) fn can_populate() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| {
        // SAFETY: a fresh private anonymous page, advised and unmapped here, shared with no one.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return false;
            }
            let ok = libc::madvise(p, 4096, libc::MADV_POPULATE_WRITE) == 0;
            libc::munmap(p, 4096);
            ok
        }
    })
}

/// Raises this process's soft limit on open descriptors to its hard limit, once (as servers do:
/// every world holds a few descriptors, and the usual soft limit of 1024 stops a process at a
/// few hundred worlds).
pub(crate) fn raise_descriptor_limit() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `r` is a valid place for the result; setrlimit reads it.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
                r.rlim_cur = r.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            }
        }
    });
}

/// This process's soft limit on open descriptors, if it can be read.
pub(crate) fn descriptor_limit() -> Option<u64> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid place for the result.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0).then_some(r.rlim_cur)
}

/// A `pollfd` entry asking for `events` on `fd`.
pub(crate) fn pollfd(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

/// A Linux event counter used to wake a thread sleeping in `poll`.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the descriptor readable (wakes every poller) until [`EventFd::drain`].
    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64. A full counter (EAGAIN) is still readable,
        // which is all a signal needs, so the result is ignored.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter.
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN (nothing pending) is fine.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// An `epoll(7)` instance: how one progress thread watches the links of many worlds.
#[derive(Debug)]
pub(crate) struct Epoll(OwnedFd);

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: takes no pointers; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// `epoll_ctl(op)` for `fd` with the `poll` events `events` (`poll`'s event bits are
    /// `epoll`'s on Linux: IN, OUT, RDHUP, ...) and `flags`, reporting `key`.
    fn ctl(&self, op: libc::c_int, fd: RawFd, events: i16, flags: libc::c_int, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: events as u16 as u32 | flags as u32, u64: key };
        // SAFETY: `ev` is a valid event for the duration of the call.
        match unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// Watches `fd` for the `poll` events `events` for as long as it is open, reporting `key`.
    pub(crate) fn watch(&self, fd: RawFd, events: i16, key: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, 0, key)
    }

    /// Changes what a watched `fd` is watched for (no events: nothing but errors).
    pub(crate) fn rewatch(&self, fd: RawFd, events: i16, key: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, 0, key)
    }

    /// Watches `fd` for the `poll` events `events`, once (`EPOLLONESHOT`: after one report
    /// the descriptor is quiet until set again), reporting `key`. Adds it if it is not
    /// watched yet.
    pub(crate) fn watch_once(&self, fd: RawFd, events: i16, key: u64) -> io::Result<()> {
        match self.ctl(libc::EPOLL_CTL_MOD, fd, events, libc::EPOLLONESHOT, key) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                self.ctl(libc::EPOLL_CTL_ADD, fd, events, libc::EPOLLONESHOT, key)
            }
            r => r,
        }
    }

    /// The instance's own descriptor: readable while a watched descriptor reports, so that an
    /// `epoll` set can itself be waited for in another (a link that wakes for two things).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Stops watching `fd`.
    pub(crate) fn unwatch(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0, 0)
    }

    /// Waits until a watched descriptor reports or `deadline` passes; the keys of those that
    /// reported go to `keys`. Interrupted waits return with none.
    pub(crate) fn wait(&self, keys: &mut Vec<u64>, deadline: Option<Instant>) {
        const BATCH: usize = 256;
        let timeout_ms: libc::c_int = match deadline {
            None => -1,
            Some(d) => d.saturating_duration_since(Instant::now()).as_micros().div_ceil(1000).min(i32::MAX as u128)
                as libc::c_int,
        };
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        // SAFETY: `evs` is a valid, exclusively borrowed array of BATCH events.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), BATCH as libc::c_int, timeout_ms) };
        keys.extend(evs.iter().take(n.max(0) as usize).map(|e| e.u64));
    }
}

/// Starts connecting a non-blocking TCP socket to `addr`: the socket, and whether it is
/// already connected (else it reports writable once the connection is made or failed; then
/// [`socket_error`] says which).
pub(crate) fn connect_start(addr: std::net::SocketAddr) -> io::Result<(std::net::TcpStream, bool)> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let s = std::net::TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: zeroed sockaddr structs are valid; each is filled for its family below.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        std::net::SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sa = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage as *mut libc::sockaddr_in) };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = a.port().to_be();
            sa.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sa = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6) };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = a.port().to_be();
            sa.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sa.sin6_flowinfo = a.flowinfo();
            sa.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    loop {
        // SAFETY: `storage` holds a valid sockaddr of `len` bytes for the socket's family.
        let r = unsafe { libc::connect(fd, &storage as *const _ as *const libc::sockaddr, len as libc::socklen_t) };
        if r == 0 {
            return Ok((s, true));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINPROGRESS) => return Ok((s, false)),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// The pending error of a socket (`SO_ERROR`): how its non-blocking connect ended.
pub(crate) fn socket_error(fd: RawFd) -> io::Result<()> {
    match get_sockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR)? {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Runs `work` on a thread of its own named `name`, or, without a thread to spare, here:
/// slower for the caller, but nothing is left undone.
#[cfg(feature = "cuda")]
pub(crate) fn on_own_thread(name: &str, work: impl FnOnce() + Send + 'static) {
    let slot = sync::Arc::new(sync::Mutex::new(Some(work)));
    let theirs = slot.clone();
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        let work = sync::lock(&theirs).take();
        if let Some(w) = work {
            w();
        }
    });
    if let Err(e) = spawned {
        warn!("no thread for {name} ({e}): its work runs on the caller's thread");
        let work = sync::lock(&slot).take();
        if let Some(w) = work {
            w();
        }
    }
}

/// A process-wide service thread, started on first use. `start` gets an event descriptor and
/// an `epoll` set that watches it under `wake_key` (how the thread is woken), and makes what
/// the thread serves and the thread; every later call gets the same. A failed start (no
/// descriptor or thread to spare) is not remembered: the next call tries again.
pub(crate) fn service<T>(
    slot: &'static std::sync::OnceLock<sync::Mutex<Option<sync::Arc<T>>>>,
    wake_key: u64,
    start: impl FnOnce(EventFd, Epoll) -> io::Result<sync::Arc<T>>,
) -> io::Result<sync::Arc<T>> {
    let mut started = sync::lock(slot.get_or_init(|| sync::Mutex::new(None)));
    if let Some(s) = &*started {
        return Ok(s.clone());
    }
    let wake = EventFd::new()?;
    let epoll = Epoll::new()?;
    epoll.watch(wake.fd(), libc::POLLIN, wake_key)?;
    let s = start(wake, epoll)?;
    *started = Some(s.clone());
    Ok(s)
}

/// Copies from address `addr` of process `pid` into `dst` with `process_vm_readv(2)` (the
/// single copy of large shared-memory frames; needs the right to trace `pid`). Returns the
/// bytes copied, which may be fewer than asked on a partial read.
pub(crate) fn read_process(pid: i32, addr: u64, dst: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec { iov_base: dst.as_mut_ptr() as *mut libc::c_void, iov_len: dst.len() };
    let remote = libc::iovec { iov_base: addr as usize as *mut libc::c_void, iov_len: dst.len() };
    loop {
        // SAFETY: `local` describes `dst`, a live and exclusively borrowed buffer; the remote
        // range is only read, in the other process, by the kernel, which checks it.
        let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `recv(2)` that takes what is there and never waits, whatever the socket's mode.
pub(crate) fn recv_nowait(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, exclusively borrowed buffer of the given length.
    let r = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), libc::MSG_DONTWAIT) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Frames up to this many bytes are copied into one buffer and sent with one plain `send`.
const SEND_GATHER_MAX: usize = 512;
/// Sends never block (the caller waits in `poll`) and never raise `SIGPIPE`.
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;

/// Runs a sending system call until it is not interrupted: how many bytes went.
fn sent(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let r = call();
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes `bufs` in order with one non-blocking `sendmsg` (one `send` when they are one slice
/// or small), without raising `SIGPIPE` on a closed peer (the process may be a C program that
/// did not ignore it). Returns the bytes written.
pub(crate) fn send_vectored(fd: RawFd, bufs: &[&[u8]]) -> io::Result<usize> {
    let mut parts: [&[u8]; 2] = [&[], &[]];
    for (slot, b) in parts.iter_mut().zip(bufs.iter().filter(|b| !b.is_empty())) {
        *slot = b;
    }
    let total = parts[0].len() + parts[1].len();
    if parts[1].is_empty() {
        return send_nowait(fd, parts[0]);
    }
    if total <= SEND_GATHER_MAX {
        // A small frame (a header and a short payload) is gathered into one buffer first: one
        // plain `send` costs less than the kernel walking a vector.
        let mut one = [0u8; SEND_GATHER_MAX];
        one[..parts[0].len()].copy_from_slice(parts[0]);
        one[parts[0].len()..total].copy_from_slice(parts[1]);
        return send_nowait(fd, &one[..total]);
    }
    let mut iov = parts.map(|b| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() });
    // SAFETY: a zeroed msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = 2;
    // SAFETY: msg points at two iovecs describing live, readable slices.
    sent(|| unsafe { libc::sendmsg(fd, &msg, SEND_FLAGS) })
}

/// A connected pair of Unix stream sockets, non-blocking and closed on exec (tests: the two
/// ends of a pair's doorbell socket in one process).
#[cfg(test)]
pub(crate) fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    let kind = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// One `send(2)` that never waits and never raises `SIGPIPE` (a doorbell byte, a small frame);
/// none for an empty slice.
pub(crate) fn send_nowait(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    // SAFETY: buf is a live, readable slice of buf.len() bytes.
    sent(|| unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), SEND_FLAGS) })
}

/// Sets an integer socket option.
pub(crate) fn set_sockopt(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(fd, level, name, (&value as *const i32).cast(), std::mem::size_of::<i32>() as libc::socklen_t)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `getsockopt(2)` of an `int` option (tests read socket settings with it).
pub(crate) fn get_sockopt(fd: RawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: passes a pointer to a live c_int and its size.
    let r = unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut i32).cast(), &mut len) };
    if r == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One address of a network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IfAddr {
    pub name: String,
    pub addr: IpAddr,
    pub up: bool,
    pub loopback: bool,
}

/// The IPv4 and IPv6 addresses of this host's interfaces.
pub(crate) fn interface_addrs() -> io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned by getifaddrs, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        // SAFETY: ifa_addr is non-null and points at a sockaddr of the family it states.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        let addr = match family {
            libc::AF_INET => {
                // SAFETY: family AF_INET means the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: family AF_INET6 means the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        let flags = ifa.ifa_flags as i32;
        out.push(IfAddr { name, addr, up: flags & libc::IFF_UP != 0, loopback: flags & libc::IFF_LOOPBACK != 0 });
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// A string that is the same for two processes exactly when they share a kernel and a network
/// namespace, i.e. when they can use same-host transports; `MW_HOST_ID` replaces it (tests that
/// play several hosts on one, or processes an operator wants kept off each other's memory).
pub(crate) fn host_identity() -> String {
    if let Some(id) = std::env::var("MW_HOST_ID").ok().filter(|v| !v.is_empty()) {
        return id;
    }
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let netns = std::fs::read_link("/proc/self/ns/net").map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{}/{}", boot.trim(), netns)
}

/// `n` bytes from the kernel's random source (secrets, world ids).
pub(crate) fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most `len - done` bytes into the live tail of `buf`.
        let r = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += r as usize;
    }
    Ok(())
}

/// splitmix64's finalizer: every input bit moves every output bit. Keys and tags made of
/// several fields mix each in turn, so that no two fields can cancel out.
pub(crate) fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A random 64-bit number from the kernel's source.
pub(crate) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if random_bytes(&mut b).is_err() {
        // Never reached on Linux ≥ 3.17; fall back to something that still differs per call.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        let t = now.map_or(0, |d| d.as_nanos() as u64) ^ std::process::id() as u64;
        return t.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    u64::from_le_bytes(b)
}
