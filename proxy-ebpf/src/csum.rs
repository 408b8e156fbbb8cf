//! Internet checksum (RFC 1071) over bytes in packet order.

/// Adds `bytes` as big-endian 16-bit words to the unfolded one's complement sum `acc`.
/// An odd trailing byte is padded with zero, as the RFC requires.
#[inline(always)]
pub fn add_bytes(mut acc: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    if i < bytes.len() {
        acc += u32::from(bytes[i]) << 8;
    }
    acc
}

/// Folds the carries of an unfolded sum and complements it: the value to store in a checksum
/// field (as big-endian bytes).
#[inline(always)]
pub fn finish(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// Checksum of `bytes`, ready to store.
#[inline(always)]
pub fn checksum(bytes: &[u8]) -> u16 {
    finish(add_bytes(0, bytes))
}

/// True when `bytes` (with its checksum field filled in) sums to the all-ones value.
pub fn verify(bytes: &[u8]) -> bool {
    finish(add_bytes(0, bytes)) == 0
}

/// Unfolded sum of the IPv4 pseudo header of a TCP/UDP segment of `l4_len` bytes.
#[inline(always)]
pub fn pseudo_header(saddr: [u8; 4], daddr: [u8; 4], proto: u8, l4_len: u16) -> u32 {
    let mut acc = add_bytes(0, &saddr);
    acc = add_bytes(acc, &daddr);
    acc += u32::from(proto);
    acc + u32::from(l4_len)
}

/// RFC 1624 (eqn. 3): the checksum `hc` after covered bytes `old` became `new` (both in packet
/// order; `hc` as the big-endian value of the checksum field).
#[inline(always)]
pub fn update(hc: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut acc = u32::from(!hc);
    let mut i = 0;
    while i + 1 < old.len() {
        acc += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        i += 2;
    }
    finish(add_bytes(acc, new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (folded), checksum 220d.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), 0x220d);
    }

    #[test]
    fn known_ipv4_header() {
        // A real header (from Wikipedia's IPv4 checksum example): checksum b861.
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0xb861);
        hdr[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert!(verify(&hdr));
        hdr[15] ^= 1;
        assert!(!verify(&hdr));
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(checksum(&[0x12, 0x34, 0x56]), checksum(&[0x12, 0x34, 0x56, 0x00]));
    }

    #[test]
    fn incremental_update_matches_a_full_recomputation() {
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        for new in [
            [10u8, 96, 0, 10],
            [255, 255, 255, 255],
            [0, 0, 0, 0],
            [0x3f, 0x57, 0xc0, 0xa8],
        ] {
            let old: [u8; 4] = hdr[12..16].try_into().unwrap();
            let hc = u16::from_be_bytes([hdr[10], hdr[11]]);
            hdr[12..16].copy_from_slice(&new);
            hdr[10..12].copy_from_slice(&update(hc, &old, &new).to_be_bytes());
            assert!(verify(&hdr), "{new:?}");
        }
        let old = [hdr[0], hdr[1]];
        let hc = u16::from_be_bytes([hdr[10], hdr[11]]);
        hdr[0..2].copy_from_slice(&[0x46, 0x10]);
        hdr[10..12].copy_from_slice(&update(hc, &old, &[0x46, 0x10]).to_be_bytes());
        assert!(verify(&hdr));
    }
}
