//! CRC32C (Castagnoli) of frame payloads, for links whose transport does not protect the bytes
//! end to end (`WorldOptions::checksum`).
//!
//! TCP's own 16-bit checksum lets some corruptions through (a NIC or middlebox that rewrites
//! bytes after the kernel checksummed them, or memory errors in a host on the way), and a
//! collective then computes a wrong result silently. With the switch on, every data frame's
//! header carries the CRC32C of its payload and the receiver checks it before using a byte of
//! it. On x86-64 with SSE4.2 the `crc32` instruction does the work (several GB/s per core);
//! elsewhere a table does, a byte at a time.

const POLY: u32 = 0x82F6_3B78; // CRC32C, reflected.

static TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// The CRC32C of `data`.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE4.2 (checked just above).
        return unsafe { crc32c_sse42(data) };
    }
    crc32c_table(data)
}

fn crc32c_table(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for b in data {
        c = TABLE[((c ^ *b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42(data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut c = !0u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        c = _mm_crc32_u64(c, v);
    }
    let mut c = c as u32;
    for b in words.remainder() {
        c = _mm_crc32_u8(c, *b);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_and_both_ways_agree() {
        // Check values of CRC-32C (RFC 3720, B.4; and the catalogue's "123456789").
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32u8).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        assert_eq!(crc32c(&[]), 0);
        let mut rng = crate::testutil::Rng::new(11);
        for n in [1usize, 7, 8, 9, 63, 64, 65, 4095, 70_000] {
            let mut b = vec![0u8; n];
            rng.fill(&mut b);
            assert_eq!(crc32c(&b), crc32c_table(&b), "{n} bytes");
            // Any one flipped bit changes it.
            let before = crc32c(&b);
            let at = rng.below(n as u64) as usize;
            b[at] ^= 1 << rng.below(8);
            assert_ne!(crc32c(&b), before, "{n} bytes, bit flipped at {at}");
        }
    }
}
