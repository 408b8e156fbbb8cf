//! Packet parsing. Reads go through bpf_skb_load_bytes, so variable header lengths (IPv4 options)
//! need no packet-pointer bounds juggling.

use aya_ebpf::programs::TcContext;
use orca_common::{IPPROTO_TCP, IPPROTO_UDP};
use proxy_ebpf::hdr::{
    ETH_HLEN, ETH_P_IP, IP_DADDR, IP_FRAG_OFF, IP_MF_OFFSET_MASK, IP_PROTO, IP_SADDR, L4_SPORT, TCP_FLAGS,
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
}

/// `None` for everything the programs leave alone: non-IPv4, IPv4 fragments, protocols other than
/// TCP and UDP, truncated packets.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Flow> {
    let h_proto: u16 = ctx.load(12).ok()?;
    if h_proto != ETH_P_IP.to_be() {
        return None;
    }
    let ver_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
    if ver_ihl >> 4 != 4 {
        return None;
    }
    let ihl_len = usize::from(ver_ihl & 0x0f) * 4;
    if ihl_len < 20 {
        return None;
    }
    let frag_off: u16 = ctx.load(ETH_HLEN + IP_FRAG_OFF).ok()?;
    if u16::from_be(frag_off) & IP_MF_OFFSET_MASK != 0 {
        return None;
    }
    let proto: u8 = ctx.load(ETH_HLEN + IP_PROTO).ok()?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let saddr: u32 = ctx.load(ETH_HLEN + IP_SADDR).ok()?;
    let daddr: u32 = ctx.load(ETH_HLEN + IP_DADDR).ok()?;
    let l4_off = ETH_HLEN + ihl_len;
    let ports: [u16; 2] = ctx.load(l4_off + L4_SPORT).ok()?;
    let tcp_flags = if proto == IPPROTO_TCP {
        ctx.load(l4_off + TCP_FLAGS).ok()?
    } else {
        0
    };
    Some(Flow {
        saddr,
        daddr,
        sport: ports[0],
        dport: ports[1],
        proto,
        tcp_flags,
        ihl_len,
        l4_off,
    })
}
