//! Header offsets and constants (Ethernet, IPv4, IPv6, TCP, UDP, ICMP, ICMPv6).

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
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

/// IPv6: fixed header length and offsets inside it.
pub const IPV6_HLEN: usize = 40;
pub const IP6_PLEN: usize = 4;
pub const IP6_NEXTHDR: usize = 6;
pub const IP6_HOPLIMIT: usize = 7;
pub const IP6_SADDR: usize = 8;
pub const IP6_DADDR: usize = 24;
/// Extension headers a packet may carry before its TCP/UDP header (RFC 8200 4.1): hop-by-hop options, routing,
/// fragment, destination options, authentication.
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_DEST: u8 = 60;
/// ICMPv6 error types (RFC 4443).
pub const ICMP6_DST_UNREACH: u8 = 1;
pub const ICMP6_PACKET_TOO_BIG: u8 = 2;
pub const ICMP6_TIME_EXCEEDED: u8 = 3;
pub const ICMP6_PARAM_PROB: u8 = 4;
/// Destination unreachable code: port unreachable (ip6tables' default REJECT).
pub const ICMP6_PORT_UNREACH: u8 = 4;

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

/// The ICMPv6 port-unreachable frame answering an IPv6 packet without extension headers: Ethernet, IPv6, ICMPv6,
/// then the offending IPv6 header and the first 8 bytes of its TCP/UDP header (RFC 4443 asks for as much of the
/// packet as fits; these are what the receiver needs to find its socket).
pub const REJECT6_QUOTE_LEN: usize = IPV6_HLEN + 8;
pub const REJECT6_FRAME_LEN: usize = ETH_HLEN + IPV6_HLEN + ICMP_HLEN + REJECT6_QUOTE_LEN;

/// Where the offending packet's first bytes (Ethernet header, IPv6 header, 8 bytes of L4) go in the buffer
/// `port_unreachable6_in_place` turns into the answer: they end exactly where the frame ends, so the quote is
/// already in place.
pub const REJECT6_ORIGINAL_AT: usize = REJECT6_FRAME_LEN - ETH_HLEN - REJECT6_QUOTE_LEN;

/// Turns `f`, whose bytes from `REJECT6_ORIGINAL_AT` hold the offending packet's Ethernet header, IPv6 header
/// (without extension headers) and 8 bytes of its TCP/UDP header, into the ICMPv6 port-unreachable frame
/// answering it: from the offending packet's destination to its source, swapped MAC addresses, hop limit 64,
/// that IPv6 header and 8 bytes as the quote, the ICMPv6 checksum over its pseudo header complete. In place, so
/// the programs build it in a scratch map instead of on their small stack.
#[inline(always)]
pub fn port_unreachable6_in_place(f: &mut [u8; REJECT6_FRAME_LEN]) {
    let o = REJECT6_ORIGINAL_AT;
    let q = o + ETH_HLEN;
    // Ethernet (bytes 0..14 do not overlap the original's 48..62).
    for i in 0..6 {
        f[i] = f[o + 6 + i];
        f[6 + i] = f[o + i];
    }
    f[12] = f[o + 12];
    f[13] = f[o + 13];
    // IPv6 (14..54 overwrites only the original Ethernet header, read above).
    let ip = ETH_HLEN;
    let plen = (ICMP_HLEN + REJECT6_QUOTE_LEN) as u16;
    f[ip] = 0x60;
    f[ip + 1] = 0;
    f[ip + 2] = 0;
    f[ip + 3] = 0;
    f[ip + IP6_PLEN..ip + IP6_PLEN + 2].copy_from_slice(&plen.to_be_bytes());
    f[ip + IP6_NEXTHDR] = 58;
    f[ip + IP6_HOPLIMIT] = 64;
    for i in 0..16 {
        f[ip + IP6_SADDR + i] = f[q + IP6_DADDR + i];
        f[ip + IP6_DADDR + i] = f[q + IP6_SADDR + i];
    }
    let icmp = ip + IPV6_HLEN;
    f[icmp] = ICMP6_DST_UNREACH;
    f[icmp + 1] = ICMP6_PORT_UNREACH;
    for b in &mut f[icmp + 2..icmp + ICMP_HLEN] {
        *b = 0;
    }
    // Pseudo header: source, destination, upper-layer length (32 bits), next header (32 bits).
    let mut acc = crate::csum::add_bytes(0, &f[ip + IP6_SADDR..ip + IP6_DADDR + 16]);
    acc += u32::from(plen) + 58;
    acc = crate::csum::add_bytes(acc, &f[icmp..]);
    let sum = crate::csum::finish(acc);
    f[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
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

    #[test]
    fn port_unreachable6_frame() {
        let eth = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0x86, 0xdd];
        let mut quote = [0u8; REJECT6_QUOTE_LEN];
        quote[0] = 0x60;
        quote[IP6_NEXTHDR] = 6;
        let client = [0xfd, 0, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        let vip = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
        quote[IP6_SADDR..IP6_SADDR + 16].copy_from_slice(&client);
        quote[IP6_DADDR..IP6_DADDR + 16].copy_from_slice(&vip);
        quote[40..44].copy_from_slice(&[0x30, 0x39, 0x00, 0x50]);
        let mut f = [0xaau8; REJECT6_FRAME_LEN];
        f[REJECT6_ORIGINAL_AT..REJECT6_ORIGINAL_AT + ETH_HLEN].copy_from_slice(&eth);
        f[REJECT6_ORIGINAL_AT + ETH_HLEN..].copy_from_slice(&quote);
        port_unreachable6_in_place(&mut f);
        assert_eq!(&f[0..6], &eth[6..12]);
        assert_eq!(&f[6..12], &eth[0..6]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(&f[14..22], &[0x60, 0, 0, 0, 0, 56, 58, 64]);
        assert_eq!(&f[14 + 8..14 + 24], &vip);
        assert_eq!(&f[14 + 24..14 + 40], &client);
        assert_eq!((f[54], f[55]), (1, 4));
        assert_eq!(&f[62..], &quote);
        // Independent check: the pseudo header plus the message sums to all ones.
        let mut pseudo = std::vec::Vec::new();
        pseudo.extend_from_slice(&vip);
        pseudo.extend_from_slice(&client);
        pseudo.extend_from_slice(&(56u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(&f[54..]);
        assert!(verify(&pseudo));
    }
}
