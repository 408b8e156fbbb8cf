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

/// The kernel's `csum_add` (include/net/checksum.h): 32-bit one's complement addition of raw
/// partial sums (values as loaded from memory, in the machine's byte order).
#[inline(always)]
pub fn add32(a: u32, b: u32) -> u32 {
    let (r, carry) = a.overflowing_add(b);
    r.wrapping_add(u32::from(carry))
}

/// The kernel's `csum_fold`: folds a raw 32-bit partial sum and complements it.
#[inline(always)]
pub fn fold32(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The raw partial-sum difference of a 32-bit word changing from `from` to `to` (raw values), as
/// bpf_csum_diff computes it and bpf_l3/l4_csum_replace take it with a field size of 0.
#[inline(always)]
pub fn diff32(from: u32, to: u32) -> u32 {
    add32(!from, to)
}

/// The kernel's `csum_replace4`, bit for bit (what bpf_l3_csum_replace does with size 4): the raw
/// checksum field `sum` after the covered raw 32-bit word `from` became `to`.
#[inline(always)]
pub fn replace4(sum: u16, from: u32, to: u32) -> u16 {
    fold32(add32(add32(!u32::from(sum), !from), to))
}

#[inline(always)]
fn add16(a: u16, b: u16) -> u16 {
    let r = a.wrapping_add(b);
    r.wrapping_add(u16::from(r < b))
}

/// The kernel's `csum_replace2`, bit for bit (what bpf_l3_csum_replace does with size 2): the raw
/// checksum field `sum` after the covered raw 16-bit word `from` became `to`.
#[inline(always)]
pub fn replace2(sum: u16, from: u16, to: u16) -> u16 {
    !add16(add16(!sum, !from), to)
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

    /// Raw (machine order) field of a big-endian checksum, and back: how the programs see them.
    fn raw16(be: u16) -> u16 {
        u16::from_ne_bytes(be.to_be_bytes())
    }

    #[test]
    fn kernel_replace_helpers_keep_headers_valid() {
        let mut hdr = [
            0x45u8, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0,
            0xa8, 0x00, 0xc7,
        ];
        assert!(verify(&hdr));
        let mut seed = 0x1234_5678u32;
        for _ in 0..20_000 {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let off = if seed & 0x100 != 0 { 12 } else { 16 };
            let from = u32::from_ne_bytes(hdr[off..off + 4].try_into().unwrap());
            let to = if seed & 0x200 != 0 { seed } else { !from };
            let sum = u16::from_ne_bytes([hdr[10], hdr[11]]);
            let new = replace4(sum, from, to);
            hdr[off..off + 4].copy_from_slice(&to.to_ne_bytes());
            hdr[10..12].copy_from_slice(&new.to_ne_bytes());
            assert!(verify(&hdr), "{hdr:x?}");
            // TTL/protocol word, as the forwarding path changes it.
            let from = u16::from_ne_bytes([hdr[8], hdr[9]]);
            let to = u16::from_ne_bytes([(seed >> 24) as u8, hdr[9]]);
            let sum = u16::from_ne_bytes([hdr[10], hdr[11]]);
            let new = replace2(sum, from, to);
            hdr[8..10].copy_from_slice(&to.to_ne_bytes());
            hdr[10..12].copy_from_slice(&new.to_ne_bytes());
            assert!(verify(&hdr), "{hdr:x?}");
        }
    }

    #[test]
    fn replace4_matches_rfc1624() {
        let sum = 0xb861u16;
        let (old, new) = ([0xc0u8, 0xa8, 0x00, 0x01], [10u8, 96, 0, 10]);
        let raw = replace4(raw16(sum), u32::from_ne_bytes(old), u32::from_ne_bytes(new));
        assert_eq!(u16::from_be_bytes(raw.to_ne_bytes()), update(sum, &old, &new));
    }

    #[test]
    fn combined_diffs_equal_sequential_replacements() {
        // One size-0 update with the summed diffs of two words gives the same checksum (up to the
        // +0/-0 representation, which both verify) as two sequential replacements.
        let mut seed = 99u32;
        for _ in 0..20_000 {
            let mut next = || {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                seed
            };
            let (sum, a0, a1, b0, b1) = (next() as u16, next(), next(), next(), next());
            let seq = replace4(replace4(sum, a0, a1), b0, b1);
            let diff = add32(diff32(a0, a1), diff32(b0, b1));
            let by_diff = fold32(add32(diff, !u32::from(sum)));
            assert!(
                seq == by_diff || (seq | by_diff == 0xffff && seq & by_diff == 0),
                "{seq:x} {by_diff:x}"
            );
        }
    }
}
