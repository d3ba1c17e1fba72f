//! The bytes on the wire: frame headers between the ranks of a world, and the little codec that
//! bootstrap messages use. Pure functions, no I/O: every decoder takes untrusted bytes and
//! answers `Err` with a reason, never panics (fuzzed by the `wire` tests).

use crate::api::types::{DataType, ReduceOp};

/// Size of every frame header in bytes.
pub(crate) const HEADER_LEN: usize = 64;
/// "MWF1": marks the start of each frame header.
pub(crate) const FRAME_MAGIC: u32 = 0x4D57_4631;
/// Largest payload any transport may put in one frame. A header announcing more is refused
/// before anything is allocated.
pub(crate) const MAX_FRAME_PAYLOAD: usize = 4 << 20;

/// Bit of the kind byte that says the header carries the payload's CRC32C.
const CHECKSUMMED: u8 = 0x80;

/// The 32 bits of a world instance's random 64-bit id that its frames carry (with the
/// generation, they tell frames of one instance of a name from another's).
pub(crate) fn world_tag(id: u64) -> u32 {
    (id ^ (id >> 32)) as u32
}

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum FrameKind {
    /// Part of a message of an operation.
    Data = 1,
    /// "I am alive"; no payload.
    Heartbeat = 2,
    /// "I broke this world"; the payload is the reason as UTF-8 text.
    Abort = 3,
    /// "I am done with this world and leave"; sent after everything else.
    Close = 4,
    /// A TCP pair's own (`transport/tcp.rs`), never a world's: the world `world` took `count`
    /// more bytes of its frames, so its peer may send that much more on its channel.
    Credit = 5,
    /// A TCP pair's own: the world `world` closed its channel; nothing more comes on it.
    End = 6,
}

/// Which operation a frame belongs to; checked on receipt, so ranks that call different
/// operations are told so instead of computing garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub(crate) enum OpKind {
    /// `send`/`recv`.
    P2p = 1,
    Broadcast = 2,
    Reduce = 3,
    AllReduce = 4,
    AllGather = 5,
    ReduceScatter = 6,
    Gather = 7,
    Scatter = 8,
    AllToAll = 9,
    Barrier = 10,
}

impl OpKind {
    const ALL: [OpKind; 10] = [
        OpKind::P2p,
        OpKind::Broadcast,
        OpKind::Reduce,
        OpKind::AllReduce,
        OpKind::AllGather,
        OpKind::ReduceScatter,
        OpKind::Gather,
        OpKind::Scatter,
        OpKind::AllToAll,
        OpKind::Barrier,
    ];

    pub(crate) fn from_u8(v: u8) -> Option<OpKind> {
        OpKind::ALL.into_iter().find(|k| *k as u8 == v)
    }

    /// The user-facing name of the operation.
    pub(crate) fn name(self) -> &'static str {
        match self {
            OpKind::P2p => "send/recv",
            OpKind::Broadcast => "broadcast",
            OpKind::Reduce => "reduce",
            OpKind::AllReduce => "all_reduce",
            OpKind::AllGather => "all_gather",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::Gather => "gather",
            OpKind::Scatter => "scatter",
            OpKind::AllToAll => "all_to_all",
            OpKind::Barrier => "barrier",
        }
    }

    /// True for operations whose reduction op matters.
    pub(crate) fn reduces(self) -> bool {
        matches!(self, OpKind::Reduce | OpKind::AllReduce | OpKind::ReduceScatter)
    }

    /// True for operations with a root rank.
    pub(crate) fn rooted(self) -> bool {
        matches!(self, OpKind::Broadcast | OpKind::Reduce | OpKind::Gather | OpKind::Scatter)
    }
}

/// A frame header. Data frames describe their operation fully, so that each receiver checks
/// the sender's call against its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub kind: FrameKind,
    /// Operation; `None` on heartbeats and aborts.
    pub op: Option<OpKind>,
    pub dtype: u8,
    pub redop: u8,
    /// Generation of the world instance that sent the frame.
    pub generation: u32,
    /// Index of this message among the operation's messages from the sender to the receiver.
    pub msg: u32,
    /// The world instance's tag ([`world_tag`] of its random id, fixed at formation).
    pub world: u32,
    /// CRC32C of the payload, on links whose world checksums them (`WorldOptions::checksum`).
    pub crc: Option<u32>,
    /// Operation sequence number: collectives count per world, send/recv per pair.
    pub seq: u64,
    /// The operation's element count, as the sender called it.
    pub count: u64,
    /// Root rank for rooted operations, else 0.
    pub root: u32,
    /// Payload bytes that follow this header.
    pub len: u32,
    /// Offset of this payload within its message.
    pub offset: u64,
    /// Total bytes of the message.
    pub total: u64,
}

impl FrameHeader {
    /// A header for a frame that carries no operation (heartbeat, abort).
    pub(crate) fn control(kind: FrameKind, world: u32, generation: u32, len: u32) -> Self {
        FrameHeader {
            kind,
            op: None,
            dtype: 0,
            redop: 0,
            generation,
            msg: 0,
            world,
            crc: None,
            seq: 0,
            count: 0,
            root: 0,
            len,
            offset: 0,
            total: len as u64,
        }
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[4] = self.kind as u8 | if self.crc.is_some() { CHECKSUMMED } else { 0 };
        b[5] = self.op.map_or(0, |o| o as u8);
        b[6] = self.dtype;
        b[7] = self.redop;
        b[8..12].copy_from_slice(&self.generation.to_le_bytes());
        b[12..16].copy_from_slice(&self.msg.to_le_bytes());
        b[16..20].copy_from_slice(&self.world.to_le_bytes());
        b[20..24].copy_from_slice(&self.crc.unwrap_or(0).to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.count.to_le_bytes());
        b[40..44].copy_from_slice(&self.root.to_le_bytes());
        b[44..48].copy_from_slice(&self.len.to_le_bytes());
        b[48..56].copy_from_slice(&self.offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.total.to_le_bytes());
        b
    }

    /// Decodes and sanity-checks a header: magic, kind, operation code, payload length.
    pub(crate) fn decode(b: &[u8]) -> Result<FrameHeader, String> {
        if b.len() < HEADER_LEN {
            return Err(format!("short header: {} bytes", b.len()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let magic = u32_at(0);
        if magic != FRAME_MAGIC {
            return Err(format!("bad frame magic {magic:#010x}"));
        }
        let kind = match b[4] & !CHECKSUMMED {
            1 => FrameKind::Data,
            2 => FrameKind::Heartbeat,
            3 => FrameKind::Abort,
            4 => FrameKind::Close,
            5 => FrameKind::Credit,
            6 => FrameKind::End,
            k => return Err(format!("unknown frame kind {k}")),
        };
        let op = match (kind, b[5]) {
            (FrameKind::Data, v) => Some(OpKind::from_u8(v).ok_or_else(|| format!("unknown operation code {v}"))?),
            (_, 0) => None,
            (_, v) => return Err(format!("control frame with operation code {v}")),
        };
        let h = FrameHeader {
            kind,
            op,
            dtype: b[6],
            redop: b[7],
            generation: u32_at(8),
            msg: u32_at(12),
            world: u32_at(16),
            crc: (b[4] & CHECKSUMMED != 0).then(|| u32_at(20)),
            seq: u64_at(24),
            count: u64_at(32),
            root: u32_at(40),
            len: u32_at(44),
            offset: u64_at(48),
            total: u64_at(56),
        };
        if h.len as usize > MAX_FRAME_PAYLOAD {
            return Err(format!("frame payload of {} bytes exceeds the limit", h.len));
        }
        if matches!(kind, FrameKind::Heartbeat | FrameKind::Close | FrameKind::Credit | FrameKind::End) && h.len != 0 {
            return Err("heartbeat, close, credit or end frame with a payload".into());
        }
        if kind == FrameKind::Data {
            if DataType::from_code(h.dtype as u32).is_none() {
                return Err(format!("unknown data type {}", h.dtype));
            }
            if ReduceOp::from_code(h.redop as u32).is_none() {
                return Err(format!("unknown reduction {}", h.redop));
            }
            let end = h.offset.checked_add(h.len as u64);
            if end.is_none_or(|e| e > h.total) {
                return Err(format!("frame [{}, +{}) lies outside its message of {} bytes", h.offset, h.len, h.total));
            }
        }
        Ok(h)
    }
}

/// Builds a bootstrap message: fields appended in order, little endian, strings and byte
/// strings length-prefixed.
#[derive(Default)]
pub(crate) struct MsgWriter {
    buf: Vec<u8>,
}

impl MsgWriter {
    pub(crate) fn new() -> Self {
        MsgWriter::default()
    }
    pub(crate) fn u8(mut self, v: u8) -> Self {
        self.buf.push(v);
        self
    }
    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u64(mut self, v: u64) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn bytes(mut self, v: &[u8]) -> Self {
        self.buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(v);
        self
    }
    pub(crate) fn str(self, v: &str) -> Self {
        self.bytes(v.as_bytes())
    }
    pub(crate) fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads a bootstrap message written by [`MsgWriter`]; every read checks bounds.
pub(crate) struct MsgReader<'a> {
    buf: &'a [u8],
}

impl<'a> MsgReader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        MsgReader { buf }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err(format!("message truncated: need {n} bytes, have {}", self.buf.len()));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub(crate) fn str(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|_| "string is not UTF-8".to_string())
    }
    pub(crate) fn end(&self) -> Result<(), String> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected trailing bytes", self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_header() -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Data,
            op: Some(OpKind::AllReduce),
            dtype: DataType::F32 as u8,
            redop: ReduceOp::Sum as u8,
            generation: 3,
            msg: 2,
            world: 0x1234_5678,
            crc: Some(0x9abc_def0),
            seq: 17,
            count: 4097,
            root: 0,
            len: 1024,
            offset: 2048,
            total: 16388,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = data_header();
        assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        let c = FrameHeader::control(FrameKind::Heartbeat, 9, 1, 0);
        assert_eq!(FrameHeader::decode(&c.encode()).unwrap(), c);
        // Without a checksum the flag is off and the field reads as none.
        let plain = FrameHeader { crc: None, ..h };
        assert_eq!(FrameHeader::decode(&plain.encode()).unwrap().crc, None);
        assert_eq!(plain.encode()[4], FrameKind::Data as u8);
    }

    #[test]
    fn header_rejects_bad_fields() {
        let good = data_header().encode();
        let mut b = good;
        b[0] ^= 1;
        assert!(FrameHeader::decode(&b).unwrap_err().contains("magic"));
        let mut b = good;
        b[4] = 9;
        assert!(FrameHeader::decode(&b).unwrap_err().contains("kind"));
        let mut h = data_header();
        h.len = (MAX_FRAME_PAYLOAD + 1) as u32;
        h.total = u64::MAX;
        assert!(FrameHeader::decode(&h.encode()).unwrap_err().contains("limit"));
        let mut h = data_header();
        h.offset = u64::MAX;
        assert!(FrameHeader::decode(&h.encode()).unwrap_err().contains("outside"));
        let mut h = data_header();
        h.dtype = 42;
        assert!(FrameHeader::decode(&h.encode()).unwrap_err().contains("data type"));
        assert!(FrameHeader::decode(&good[..10]).unwrap_err().contains("short"));
    }

    /// Property test: random bytes and random mutations of valid headers never panic the
    /// decoder, and whatever it accepts re-encodes to the same bytes.
    #[test]
    fn header_decoder_survives_random_input() {
        let mut rng = crate::testutil::Rng::new(7);
        let good = data_header().encode();
        for i in 0..200_000 {
            let mut b = [0u8; HEADER_LEN];
            if i % 2 == 0 {
                rng.fill(&mut b);
            } else {
                b = good;
                for _ in 0..(1 + rng.below(4)) {
                    let at = rng.below(HEADER_LEN as u64) as usize;
                    b[at] = rng.next() as u8;
                }
            }
            let n = rng.below(HEADER_LEN as u64 + 1) as usize;
            if let Ok(h) = FrameHeader::decode(&b[..n]) {
                assert_eq!(h.encode(), b);
            }
        }
    }

    #[test]
    fn msg_codec_checks_bounds() {
        let m = MsgWriter::new().u8(1).u32(2).u64(3).str("abc").bytes(&[9, 9]).finish();
        let mut r = MsgReader::new(&m);
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(r.u32().unwrap(), 2);
        assert_eq!(r.u64().unwrap(), 3);
        assert_eq!(r.str().unwrap(), "abc");
        assert_eq!(r.bytes().unwrap(), &[9, 9]);
        r.end().unwrap();
        let mut rng = crate::testutil::Rng::new(1);
        for _ in 0..50_000 {
            let n = rng.below(40) as usize;
            let mut b = vec![0u8; n];
            rng.fill(&mut b);
            let mut r = MsgReader::new(&b);
            let _ = r.u8().and_then(|_| r.str()).and_then(|_| r.bytes()).and_then(|_| r.u64());
        }
    }
}
