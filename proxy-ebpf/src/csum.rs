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
}
