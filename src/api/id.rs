//! [`UniqueId`]: NCCL's way of forming a world. One process makes the id (which starts a
//! rendezvous root in that process), hands it to every rank by any channel — it is plain bytes,
//! printable as text for an environment variable or a file — and every rank joins with it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use crate::api::error::{Error, Result};
use crate::bootstrap::{self, addr};
use crate::sys;

const MAGIC: &[u8; 4] = b"MWID";
const VERSION: u8 = 1;
/// Bytes of the secret a joiner must present.
pub(crate) const SECRET_LEN: usize = 16;
/// Bytes of the binary form (the C ABI's `mwUniqueId` holds it in 128).
pub const UNIQUE_ID_BYTES: usize = 4 + 1 + 1 + 2 + 16 + SECRET_LEN;

/// Identifies one world formation: where its rendezvous root listens, and the secret that
/// admits a rank. Single use, like NCCL's: once the world has formed (or the root's deadline
/// has passed) the root is gone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UniqueId {
    pub(crate) root: SocketAddr,
    pub(crate) secret: [u8; SECRET_LEN],
}

impl UniqueId {
    /// Makes an id and starts its rendezvous root in this process, listening on the address
    /// of `MW_SOCKET_IFNAME` (interface name or IP) or else of the first non-loopback
    /// interface that is up.
    pub fn new() -> Result<UniqueId> {
        let ip = addr::default_ip(None)?;
        UniqueId::new_on(ip)
    }

    /// Like [`UniqueId::new`], with the root listening on `ip`.
    pub fn new_on(ip: IpAddr) -> Result<UniqueId> {
        let listener = addr::listen_any_port(ip)?;
        let root = listener.local_addr().map_err(|e| Error::system("root listener address", e))?;
        let mut secret = [0u8; SECRET_LEN];
        sys::random_bytes(&mut secret).map_err(|e| Error::system("getrandom", e))?;
        // The root runs detached: it ends once the world formed or its deadline passed.
        drop(bootstrap::spawn_root(Some(listener), bootstrap::RootConfig::for_id(secret))?);
        Ok(UniqueId { root, secret })
    }

    /// Where the rendezvous root listens.
    pub fn root_addr(&self) -> SocketAddr {
        self.root
    }

    /// The binary form, [`UNIQUE_ID_BYTES`] long.
    pub fn to_bytes(&self) -> [u8; UNIQUE_ID_BYTES] {
        let mut b = [0u8; UNIQUE_ID_BYTES];
        b[0..4].copy_from_slice(MAGIC);
        b[4] = VERSION;
        let ip16 = match self.root.ip() {
            IpAddr::V4(v4) => {
                b[5] = 4;
                v4.to_ipv6_mapped().octets()
            }
            IpAddr::V6(v6) => {
                b[5] = 6;
                v6.octets()
            }
        };
        b[6..8].copy_from_slice(&self.root.port().to_be_bytes());
        b[8..24].copy_from_slice(&ip16);
        b[24..24 + SECRET_LEN].copy_from_slice(&self.secret);
        b
    }

    /// Parses the binary form; extra trailing bytes (the C struct's padding) are ignored.
    pub fn from_bytes(b: &[u8]) -> Result<UniqueId> {
        if b.len() < UNIQUE_ID_BYTES || &b[0..4] != MAGIC {
            return Err(Error::invalid_arg("not a multiworld unique id"));
        }
        if b[4] != VERSION {
            return Err(Error::invalid_arg(format!("unique id version {} is not supported", b[4])));
        }
        let port = u16::from_be_bytes([b[6], b[7]]);
        let mut ip16 = [0u8; 16];
        ip16.copy_from_slice(&b[8..24]);
        let v6 = Ipv6Addr::from(ip16);
        let ip = match b[5] {
            4 => IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
            6 => IpAddr::V6(v6),
            f => return Err(Error::invalid_arg(format!("unique id has unknown address family {f}"))),
        };
        let mut secret = [0u8; SECRET_LEN];
        secret.copy_from_slice(&b[24..24 + SECRET_LEN]);
        Ok(UniqueId { root: SocketAddr::new(ip, port), secret })
    }
}

impl fmt::Display for UniqueId {
    /// Lower-case hex of the binary form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.to_bytes() {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for UniqueId {
    /// Shows the root but not the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UniqueId {{ root: {}, secret: <hidden> }}", self.root)
    }
}

impl FromStr for UniqueId {
    type Err = Error;

    /// Parses the hex text form (surrounding whitespace allowed).
    fn from_str(s: &str) -> Result<UniqueId> {
        let s = s.trim();
        if s.len() != 2 * UNIQUE_ID_BYTES || !s.is_ascii() {
            return Err(Error::invalid_arg(format!(
                "a unique id is {} hex digits, got {} characters",
                2 * UNIQUE_ID_BYTES,
                s.len()
            )));
        }
        let mut b = [0u8; UNIQUE_ID_BYTES];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| Error::invalid_arg("a unique id is hex digits only"))?;
        }
        UniqueId::from_bytes(&b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_bytes_round_trip() {
        for root in ["10.1.2.3:4567", "[fe80::1]:80"] {
            let id = UniqueId { root: root.parse().unwrap(), secret: [7; SECRET_LEN] };
            let text = id.to_string();
            assert_eq!(text.len(), 2 * UNIQUE_ID_BYTES);
            assert_eq!(text.parse::<UniqueId>().unwrap(), id);
            assert_eq!(UniqueId::from_bytes(&id.to_bytes()).unwrap(), id);
        }
        assert!(format!("{:?}", UniqueId { root: "1.2.3.4:5".parse().unwrap(), secret: [9; 16] }).contains("hidden"));
    }

    #[test]
    fn bad_text_is_refused() {
        assert!("".parse::<UniqueId>().is_err());
        assert!("zz".repeat(UNIQUE_ID_BYTES).parse::<UniqueId>().is_err());
        assert!("00".repeat(UNIQUE_ID_BYTES).parse::<UniqueId>().is_err());
        let mut b = UniqueId { root: "1.2.3.4:5".parse().unwrap(), secret: [1; 16] }.to_bytes();
        b[4] = 99;
        assert!(UniqueId::from_bytes(&b).unwrap_err().message().contains("version"));
    }
}
