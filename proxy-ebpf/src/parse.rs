//! Packet parsing with direct packet access (bounds checked against data_end; IPv4 options and IPv6 extension
//! headers included), pulling non-linear heads into the linear area when needed.

use aya_ebpf::programs::TcContext;
use orca_common::{In6, IPPROTO_TCP, IPPROTO_UDP};
use proxy_ebpf::hdr::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IP6_DADDR, IP6_NEXTHDR, IP6_SADDR, IPV4_HLEN, IPV6_HLEN, IP_DADDR, IP_FRAG_OFF,
    IP_MF_OFFSET_MASK, IP_PROTO, IP_SADDR, L4_SPORT, NEXTHDR_AUTH, NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP,
    NEXTHDR_ROUTING, TCP_ACK, TCP_FLAGS, TCP_SYN,
};

/// The frame's EtherType (network byte order), 0 when the frame is too short to have one.
#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> u16 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN > end {
        return ctx.load::<u16>(12).unwrap_or(0);
    }
    // SAFETY: the 14 bytes of the Ethernet header are inside the packet (checked just above).
    unsafe { ((start + 12) as *const u16).read_unaligned() }
}

pub const ETH_IPV6: u16 = ETH_P_IPV6.to_be();

/// An IPv4 (`A` = `u32`) or IPv6 (`A` = `In6`) TCP or UDP packet that is not a fragment.
#[derive(Clone, Copy)]
pub struct Flow<A = u32> {
    /// Addresses in packet order, ports in network byte order (as in the maps).
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// IP header length in bytes: IPv4 20 without options; IPv6 40 plus its extension headers.
    pub ihl_len: usize,
    /// Offset of the TCP/UDP header.
    pub l4_off: usize,
}

impl<A: Copy> Flow<A> {
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
    pub fn tuple(&self) -> Tuple<A> {
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
pub struct Tuple<A = u32> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
}

/// Why `parse` found no flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not IP (ARP, ...).
    NotIp,
    /// A fragment: its ports are unknown (or absent), it cannot be translated.
    Fragment,
    /// IP of another protocol (ICMP, ...), or truncated.
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
        return Direct::Skip(Skip::NotIp);
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

// ---------------------------------------------------------------------------------------------------------------
// IPv6.

/// Extension headers skipped before giving up (each costs a load).
const MAX_EXT_HEADERS: usize = 6;
/// The TCP/UDP header must start within this many bytes of the frame (for the verifier, a bounded offset).
pub const MAX_L4_OFF: usize = 512;

/// The flow of an IPv6 TCP or UDP packet, after its extension headers (hop-by-hop, routing, destination options,
/// authentication: skipped, bounded); fragments (a fragment header) and other protocols are skipped.
#[inline(always)]
pub fn parse6(ctx: &TcContext) -> Result<Flow<In6>, Skip> {
    match parse6_direct(ctx) {
        Direct6::Flow(f) => Ok(f),
        Direct6::Skip(why) => Err(why),
        Direct6::Short => {
            let want = (ETH_HLEN + IPV6_HLEN + 64).min(ctx.len() as usize) as u32;
            ctx.pull_data(want).map_err(|_| Skip::Other)?;
            match parse6_direct(ctx) {
                Direct6::Flow(f) => Ok(f),
                Direct6::Skip(why) => Err(why),
                Direct6::Short => Err(Skip::Other),
            }
        }
    }
}

enum Direct6 {
    Flow(Flow<In6>),
    Skip(Skip),
    Short,
}

#[inline(always)]
fn parse6_direct(ctx: &TcContext) -> Direct6 {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + ETH_HLEN + IPV6_HLEN > end {
        return Direct6::Short;
    }
    let ip = start + ETH_HLEN;
    // SAFETY (every read below): inside the bounds checked just before; unaligned reads.
    let (h_proto, ver, mut nexthdr, saddr, daddr) = unsafe {
        (
            ((start + 12) as *const u16).read_unaligned(),
            *(ip as *const u8),
            *((ip + IP6_NEXTHDR) as *const u8),
            ((ip + IP6_SADDR) as *const In6).read_unaligned(),
            ((ip + IP6_DADDR) as *const In6).read_unaligned(),
        )
    };
    if h_proto != ETH_IPV6 || ver >> 4 != 6 {
        return Direct6::Skip(Skip::NotIp);
    }
    let mut l4_off = ETH_HLEN + IPV6_HLEN;
    if nexthdr != IPPROTO_TCP && nexthdr != IPPROTO_UDP {
        // Extension headers (rare): read with bpf_skb_load_bytes, whatever the linear area holds.
        let mut found = false;
        for _ in 0..MAX_EXT_HEADERS {
            match nexthdr {
                NEXTHDR_FRAGMENT => return Direct6::Skip(Skip::Fragment),
                NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH => {
                    let Ok(h) = ctx.load::<[u8; 2]>(l4_off) else {
                        return Direct6::Skip(Skip::Other);
                    };
                    let len = if nexthdr == NEXTHDR_AUTH {
                        (usize::from(h[1]) + 2) * 4
                    } else {
                        (usize::from(h[1]) + 1) * 8
                    };
                    nexthdr = h[0];
                    l4_off += len;
                    if l4_off > MAX_L4_OFF {
                        return Direct6::Skip(Skip::Other);
                    }
                }
                IPPROTO_TCP | IPPROTO_UDP => {
                    found = true;
                    break;
                }
                _ => return Direct6::Skip(Skip::Other),
            }
        }
        if !found {
            return Direct6::Skip(Skip::Other);
        }
    }
    if l4_off > MAX_L4_OFF {
        return Direct6::Skip(Skip::Other);
    }
    let l4 = start + l4_off;
    let (sport, dport, tcp_flags) = if nexthdr == IPPROTO_TCP {
        if l4 + TCP_NEEDED > end {
            return Direct6::Short;
        }
        // SAFETY: l4 + TCP_NEEDED is within the packet.
        unsafe {
            (
                ((l4 + L4_SPORT) as *const u16).read_unaligned(),
                ((l4 + L4_SPORT + 2) as *const u16).read_unaligned(),
                *((l4 + TCP_FLAGS) as *const u8),
            )
        }
    } else {
        if l4 + UDP_NEEDED > end {
            return Direct6::Short;
        }
        // SAFETY: l4 + UDP_NEEDED is within the packet.
        unsafe {
            (
                ((l4 + L4_SPORT) as *const u16).read_unaligned(),
                ((l4 + L4_SPORT + 2) as *const u16).read_unaligned(),
                0,
            )
        }
    };
    Direct6::Flow(Flow {
        saddr,
        daddr,
        sport,
        dport,
        proto: nexthdr,
        tcp_flags,
        ihl_len: l4_off - ETH_HLEN,
        l4_off,
    })
}
