//! Header offsets and constants (Ethernet, IPv4, TCP, UDP, ICMP).

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;

/// Offsets inside an IPv4 header.
pub const IP_TOT_LEN: usize = 2;
pub const IP_FRAG_OFF: usize = 6;
pub const IP_TTL: usize = 8;
pub const IP_PROTO: usize = 9;
pub const IP_CSUM: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;
/// More-fragments flag and fragment offset bits of `frag_off` (host order).
pub const IP_MF_OFFSET_MASK: u16 = 0x3fff;

/// Offsets inside TCP/UDP headers.
pub const L4_SPORT: usize = 0;
pub const L4_DPORT: usize = 2;
pub const TCP_FLAGS: usize = 13;
pub const TCP_CSUM: usize = 16;
pub const UDP_CSUM: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;

/// Size of the ICMP "port unreachable" frame the programs send back for a frontend without
/// endpoints: Ethernet, IPv4, ICMP, then the offending IPv4 header (no options) and the first
/// 8 bytes of its TCP/UDP header (RFC 792).
pub const REJECT_QUOTE_LEN: usize = IPV4_HLEN + 8;
pub const REJECT_FRAME_LEN: usize = ETH_HLEN + IPV4_HLEN + ICMP_HLEN + REJECT_QUOTE_LEN;

/// Builds the ICMP port-unreachable frame answering `eth` + `quote` (the offending IPv4 header
/// without options followed by 8 bytes of its L4 header). The reply goes from the offending
/// packet's destination to its source, with swapped MAC addresses, complete IPv4 and ICMP
/// checksums.
#[inline(always)]
pub fn build_port_unreachable(eth: &[u8; ETH_HLEN], quote: &[u8; REJECT_QUOTE_LEN]) -> [u8; REJECT_FRAME_LEN] {
    let mut f = [0u8; REJECT_FRAME_LEN];
    // Ethernet: swap destination and source.
    f[0..6].copy_from_slice(&eth[6..12]);
    f[6..12].copy_from_slice(&eth[0..6]);
    f[12..14].copy_from_slice(&eth[12..14]);
    // IPv4.
    let ip = ETH_HLEN;
    let tot_len = (IPV4_HLEN + ICMP_HLEN + REJECT_QUOTE_LEN) as u16;
    f[ip] = 0x45;
    f[ip + IP_TOT_LEN..ip + IP_TOT_LEN + 2].copy_from_slice(&tot_len.to_be_bytes());
    f[ip + 8] = 64; // TTL
    f[ip + IP_PROTO] = 1; // ICMP
    f[ip + IP_SADDR..ip + IP_SADDR + 4].copy_from_slice(&quote[IP_DADDR..IP_DADDR + 4]);
    f[ip + IP_DADDR..ip + IP_DADDR + 4].copy_from_slice(&quote[IP_SADDR..IP_SADDR + 4]);
    let ip_csum = crate::csum::checksum(&f[ip..ip + IPV4_HLEN]);
    f[ip + IP_CSUM..ip + IP_CSUM + 2].copy_from_slice(&ip_csum.to_be_bytes());
    // ICMP destination unreachable / port unreachable, then the quote.
    let icmp = ip + IPV4_HLEN;
    f[icmp] = ICMP_DEST_UNREACH;
    f[icmp + 1] = ICMP_PORT_UNREACH;
    f[icmp + ICMP_HLEN..].copy_from_slice(quote);
    let icmp_csum = crate::csum::checksum(&f[icmp..]);
    f[icmp + 2..icmp + 4].copy_from_slice(&icmp_csum.to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum::verify;

    #[test]
    fn port_unreachable_frame() {
        let eth = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0x08, 0x00];
        let mut quote = [0u8; REJECT_QUOTE_LEN];
        quote[0] = 0x45;
        quote[IP_PROTO] = 17;
        quote[IP_SADDR..IP_SADDR + 4].copy_from_slice(&[10, 0, 0, 5]);
        quote[IP_DADDR..IP_DADDR + 4].copy_from_slice(&[10, 96, 0, 10]);
        quote[20..24].copy_from_slice(&[0x30, 0x39, 0x00, 0x35]);
        let f = build_port_unreachable(&eth, &quote);
        assert_eq!(&f[0..6], &eth[6..12]);
        assert_eq!(&f[6..12], &eth[0..6]);
        assert_eq!(&f[14 + 12..14 + 16], &[10, 96, 0, 10]);
        assert_eq!(&f[14 + 16..14 + 20], &[10, 0, 0, 5]);
        assert!(verify(&f[14..34]));
        assert!(verify(&f[34..]));
        assert_eq!((f[34], f[35]), (3, 3));
        assert_eq!(&f[42..], &quote);
    }
}
