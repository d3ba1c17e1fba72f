//! How a world's link sleeps on a socket that other worlds' links share: a TCP socket carrying
//! channels (`tcp.rs`), or the doorbell socket of a shared-memory segment whose lanes several
//! worlds use (`shm/bell.rs`). Whichever link reads the shared socket takes what is meant for
//! another and wakes that one through its [`Wake`].

use std::io;
use std::os::fd::RawFd;

use crate::sys;

/// An event counter that the other links of the socket raise, in an `epoll` set with the
/// socket (one descriptor for the link's driver to sleep on), and, for the watch of an idle
/// world (`Link::hangup_fd`), a second counter raised only when the link's peer ended or the
/// socket failed, in a set of its own with the socket. The two are apart so that the watch never
/// takes a wake-up meant for a driver asleep on the first.
pub(crate) struct Wake {
    pub ev: sys::EventFd,
    pub ep: sys::Epoll,
    pub hup: sys::EventFd,
    pub idle: sys::Epoll,
}

impl Wake {
    /// A wake for a link of socket `sock`; both sets watch its hang-up (the caller changes the
    /// events with `rewatch`, key 1, before each sleep).
    pub(crate) fn new(sock: RawFd) -> io::Result<Wake> {
        let (ev, ep, hup, idle) = (sys::EventFd::new()?, sys::Epoll::new()?, sys::EventFd::new()?, sys::Epoll::new()?);
        ep.watch(ev.fd(), libc::POLLIN, 0)?;
        ep.watch(sock, libc::POLLRDHUP, 1)?;
        idle.watch(hup.fd(), libc::POLLIN, 0)?;
        idle.watch(sock, libc::POLLRDHUP, 1)?;
        Ok(Wake { ev, ep, hup, idle })
    }
}
