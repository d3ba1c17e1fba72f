//! Links between the ranks of a formed world: each rank connects to every lower rank's
//! listener and accepts every higher rank; a link hello (world id, generation, secret, ranks)
//! opens each connection, and the pair then picks its transport (shared memory on one host,
//! else TCP).

use super::*;

pub(super) const LINK_MAGIC: u32 = 0x4D57_4C31; // "MWL1"

pub(super) fn link_hello(world_id: u64, generation: u32, from: usize, to: usize, secret: &[u8]) -> Vec<u8> {
    MsgWriter::new()
        .u32(LINK_MAGIC)
        .u64(world_id)
        .u32(generation)
        .u32(from as u32)
        .u32(to as u32)
        .bytes(secret)
        .finish()
}

/// Connects to every lower rank and accepts every higher one. Lower ranks accept only after
/// their own connects are done, so the order has no cycle.
pub(super) fn connect_links(
    spec: &JoinSpec,
    t: &Table,
    secret: &[u8],
    listener: TcpListener,
    deadline: Instant,
    shm_fallbacks: &mut u64,
) -> Result<Vec<Option<Box<dyn Link>>>> {
    let (name, rank, size) = (spec.name.as_str(), spec.rank, spec.size);
    let mut links: Vec<Option<Box<dyn Link>>> = (0..size).map(|_| None).collect();
    links[rank] = Some(Box::new(QueueLink::loopback()));
    for (peer, (addr, _host)) in t.peers.iter().enumerate().take(rank) {
        let what = || formation_err(name, rank, format!("connecting to rank {peer}"));
        let a: SocketAddr = addr.parse().map_err(|_| Error::internal(what()))?;
        let s = addr::connect_once(a, deadline, &what)?;
        addr::send_msg(&s, &link_hello(t.world_id, t.generation, rank, peer, secret), deadline)
            .map_err(|e| Error::new(ErrorKind::WorldBroken, format!("{}: {e}", what())))?;
        let mut ack = [0u8; 1];
        s.set_read_timeout(Some(addr::left(deadline, &what)?)).map_err(|e| Error::system(what(), e))?;
        match (&s).read(&mut ack) {
            Ok(1) if ack[0] == 1 => {}
            Ok(_) => return Err(Error::new(ErrorKind::WorldBroken, format!("{}: refused or closed", what()))),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(Error::timeout(format!("{}: no answer before the deadline", what())))
            }
            Err(e) => return Err(Error::new(ErrorKind::WorldBroken, format!("{}: {e}", what()))),
        }
        s.set_read_timeout(None).map_err(|e| Error::system(what(), e))?;
        let same_host = t.peers[peer].1 == t.peers[rank].1;
        let want_shm = spec.shm && same_host;
        let link = offer_transport(s, want_shm, deadline).map_err(|e| Error::system(what(), e))?;
        *shm_fallbacks += u64::from(want_shm && link.kind() != TransportKind::Shm);
        links[peer] = Some(link);
    }
    let expected = size - rank - 1;
    let mut accepted = 0;
    listener.set_nonblocking(true).map_err(|e| Error::system("peer listener", e))?;
    while accepted < expected {
        let missing = || {
            let m: Vec<usize> = (rank + 1..size).filter(|r| links[*r].is_none()).collect();
            formation_err(name, rank, format!("ranks {m:?} did not connect before the deadline"))
        };
        addr::left(deadline, &missing)?;
        let mut fds = [sys::pollfd(listener.as_raw_fd(), libc::POLLIN)];
        let _ = sys::poll(&mut fds, Some(deadline));
        let (s, from_addr) = match listener.accept() {
            Ok(x) => x,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            Err(e) => return Err(Error::system(formation_err(name, rank, "accepting a peer"), e)),
        };
        let _ = s.set_nonblocking(false);
        // A peer must say who it is promptly; a silent or garbage connection is dropped.
        let hello_deadline = deadline.min(Instant::now() + HELLO_GRACE);
        let msg = match addr::recv_msg(&s, hello_deadline) {
            Ok(m) => m,
            Err(e) => {
                warn!("world '{name}' rank {rank}: refused link connection from {from_addr}: {e}");
                continue;
            }
        };
        let parsed = (|| -> std::result::Result<(u64, u32, u32, u32, Vec<u8>), String> {
            let mut r = MsgReader::new(&msg);
            if r.u32()? != LINK_MAGIC {
                return Err("not a multiworld link hello".into());
            }
            let v = (r.u64()?, r.u32()?, r.u32()?, r.u32()?, r.bytes()?.to_vec());
            r.end()?;
            Ok(v)
        })();
        let (wid, generation, from, to, sec) = match parsed {
            Ok(v) => v,
            Err(why) => {
                warn!("world '{name}' rank {rank}: refused link connection from {from_addr}: {why}");
                continue;
            }
        };
        let from = from as usize;
        if wid != t.world_id || generation != t.generation || sec != secret {
            warn!("world '{name}' rank {rank}: refused link connection from {from_addr}: wrong world, generation or secret");
            continue;
        }
        if to as usize != rank || from <= rank || from >= size || links[from].is_some() {
            warn!("world '{name}' rank {rank}: refused link connection from {from_addr}: unexpected rank {from}");
            continue;
        }
        let mut w = &s;
        if io::Write::write_all(&mut w, &[1]).is_err() {
            return Err(Error::new(
                ErrorKind::WorldBroken,
                formation_err(name, rank, format!("rank {from} went away while connecting")),
            ));
        }
        let same_host = t.peers[from].1 == t.peers[rank].1;
        let want_shm = spec.shm && same_host;
        let link = answer_transport(s, want_shm, deadline).map_err(|e| {
            Error::new(
                ErrorKind::WorldBroken,
                formation_err(name, rank, format!("setting up the link to rank {from}: {e}")),
            )
        })?;
        *shm_fallbacks += u64::from(want_shm && link.kind() != TransportKind::Shm);
        links[from] = Some(link);
        accepted += 1;
    }
    Ok(links)
}

/// The connecting (higher) rank of a pair proposes the transport: `T` for TCP, or `S` and the
/// path of a fresh shared-memory segment. The acceptor answers an `S` with one byte, 1 if it
/// mapped the segment; the connector then unlinks the file either way.
pub(super) fn offer_transport(s: TcpStream, shm: bool, deadline: Instant) -> io::Result<Box<dyn Link>> {
    if shm {
        match Segment::create() {
            Ok(mut seg) => {
                let path = seg.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
                addr::send_msg(&s, format!("S{path}").as_bytes(), deadline)?;
                s.set_read_timeout(Some(
                    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
                ))?;
                let mut ok = [0u8; 1];
                (&s).read_exact(&mut ok)?;
                s.set_read_timeout(None)?;
                seg.unlink();
                if ok[0] == 1 {
                    return Ok(Box::new(ShmLink::new(s, seg, true)?));
                }
                info!("shared memory refused by the peer; using TCP");
                return Ok(Box::new(TcpLink::new(s)?));
            }
            Err(e) => warn!("cannot create a shared-memory segment ({e}; is /dev/shm full?); using TCP"),
        }
    }
    addr::send_msg(&s, b"T", deadline)?;
    Ok(Box::new(TcpLink::new(s)?))
}

pub(super) fn answer_transport(s: TcpStream, shm: bool, deadline: Instant) -> io::Result<Box<dyn Link>> {
    let offer = addr::recv_msg(&s, deadline)?;
    match offer.split_first() {
        Some((b'T', [])) => Ok(Box::new(TcpLink::new(s)?)),
        Some((b'S', path)) => {
            let seg = if shm { std::str::from_utf8(path).ok().map(Segment::open) } else { None };
            let mut w = &s;
            match seg {
                Some(Ok(seg)) => {
                    io::Write::write_all(&mut w, &[1])?;
                    Ok(Box::new(ShmLink::new(s, seg, false)?))
                }
                other => {
                    if let Some(Err(e)) = other {
                        warn!("cannot map the peer's shared-memory segment ({e}); using TCP");
                    }
                    io::Write::write_all(&mut w, &[0])?;
                    Ok(Box::new(TcpLink::new(s)?))
                }
            }
        }
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "bad transport offer")),
    }
}
