//! Packet parsing with direct packet access (bounds checked against data_end; IPv4 options
//! included), pulling non-linear heads into the linear area when needed.

use aya_ebpf::programs::TcContext;
use orca_common::{IPPROTO_TCP, IPPROTO_UDP};
use proxy_ebpf::hdr::{
    ETH_HLEN, ETH_P_IP, IPV4_HLEN, IP_DADDR, IP_FRAG_OFF, IP_MF_OFFSET_MASK, IP_PROTO, IP_SADDR, L4_SPORT, TCP_ACK,
    TCP_FLAGS, TCP_SYN,
};

/// An IPv4 TCP or UDP packet that is not a fragment.
#[derive(Clone, Copy)]
pub struct Flow {
    /// Addresses in packet order, ports in network byte order (as in the maps).
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// IPv4 header length in bytes (20 without options).
    pub ihl_len: usize,
    /// Offset of the TCP/UDP header.
    pub l4_off: usize,
}

impl Flow {
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == IPPROTO_TCP
    }

    /// A TCP SYN without ACK: the packet opens a connection.
    #[inline(always)]
    pub fn is_opening(&self) -> bool {
        self.is_tcp() && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    #[inline(always)]
    pub fn tuple(&self) -> Tuple {
        Tuple {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
        }
    }
}

/// Addresses (packet order) and ports (network byte order) of a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

/// Why `parse` found no flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not IPv4 (IPv6, ARP, ...).
    NotIpv4,
    /// An IPv4 fragment: its ports are unknown (or absent), it cannot be translated.
    Fragment,
    /// IPv4 of another protocol (ICMP, ...), or truncated.
    Other,
}

/// The flow of an IPv4 TCP or UDP packet; otherwise why not: non-IPv4, IPv4 fragments, protocols other than
/// TCP and UDP, truncated packets.
///
/// Headers are read straight from the packet (direct packet access: no helper call per field).
/// When they are not all in the linear part of the skb, it is pulled once and the read retried.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Flow, Skip> {
    match parse_direct(ctx) {
        Direct::Flow(f) => Ok(f),
        Direct::Skip(why) => Err(why),
        Direct::Short => {
            // Headers beyond the linear area (or a truncated packet): make the longest possible
            // header linear and look again.
            let want = (ETH_HLEN + 60 + 14).min(ctx.len() as usize) as u32;
            ctx.pull_data(want).map_err(|_| Skip::Other)?;
            match parse_direct(ctx) {
                Direct::Flow(f) => Ok(f),
                Direct::Skip(why) => Err(why),
                Direct::Short => Err(Skip::Other),
            }
        }
    }
}

enum Direct {
    Flow(Flow),
    /// Not ours (not IPv4 TCP/UDP, or a fragment).
    Skip(Skip),
    /// The linear area ends before the headers do.
    Short,
}

/// Bytes of the TCP header the programs read (ports and flags).
const TCP_NEEDED: usize = TCP_FLAGS + 1;
/// Bytes of the UDP header the programs read (ports).
const UDP_NEEDED: usize = 4;

#[inline(always)]
fn parse_direct(ctx: &TcContext) -> Direct {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + ETH_HLEN + IPV4_HLEN > end {
        return Direct::Short;
    }
    // SAFETY (every read below): the bounds were checked against data_end just before, so the
    // bytes lie inside the packet; unaligned reads, as packet data is not aligned.
    let (h_proto, ver_ihl, frag_off, proto, saddr, daddr) = unsafe {
        (
            ((start + 12) as *const u16).read_unaligned(),
            *((start + ETH_HLEN) as *const u8),
            ((start + ETH_HLEN + IP_FRAG_OFF) as *const u16).read_unaligned(),
            *((start + ETH_HLEN + IP_PROTO) as *const u8),
            ((start + ETH_HLEN + IP_SADDR) as *const u32).read_unaligned(),
            ((start + ETH_HLEN + IP_DADDR) as *const u32).read_unaligned(),
        )
    };
    if h_proto != ETH_P_IP.to_be() || ver_ihl >> 4 != 4 {
        return Direct::Skip(Skip::NotIpv4);
    }
    let ihl_len = usize::from(ver_ihl & 0x0f) * 4;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP || ihl_len < IPV4_HLEN {
        return Direct::Skip(Skip::Other);
    }
    if u16::from_be(frag_off) & IP_MF_OFFSET_MASK != 0 {
        return Direct::Skip(Skip::Fragment);
    }
    let l4_off = ETH_HLEN + ihl_len;
    let l4 = start + l4_off;
    // One bounds check per protocol, each with its constant: a single check against a length chosen by the protocol
    // leaves older verifiers (6.1) knowing only the shorter length, and the TCP flags read is then rejected.
    let (sport, dport, tcp_flags) = if proto == IPPROTO_TCP {
        if l4 + TCP_NEEDED > end {
            return Direct::Short;
        }
        // SAFETY: as above (l4 + TCP_NEEDED is within the packet).
        unsafe {
            (
                ((l4 + L4_SPORT) as *const u16).read_unaligned(),
                ((l4 + L4_SPORT + 2) as *const u16).read_unaligned(),
                *((l4 + TCP_FLAGS) as *const u8),
            )
        }
    } else {
        if l4 + UDP_NEEDED > end {
            return Direct::Short;
        }
        // SAFETY: as above (l4 + UDP_NEEDED is within the packet).
        unsafe {
            (
                ((l4 + L4_SPORT) as *const u16).read_unaligned(),
                ((l4 + L4_SPORT + 2) as *const u16).read_unaligned(),
                0,
            )
        }
    };
    Direct::Flow(Flow {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        tcp_flags,
        ihl_len,
        l4_off,
    })
}
