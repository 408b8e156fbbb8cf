//! ICMP errors of translated flows (destination unreachable, time exceeded, parameter problem),
//! translated like the kernel's conntrack NAT does for "related" packets: the quoted packet and
//! the outer header are rewritten so the receiver can match the error to its socket.
//!
//! An error quotes a packet that left this node; the reverse of the quote is the tuple the flow's packets
//! have when they arrive at the same hook, so it is looked up like them (at ingress its service or reply entry,
//! at egress its inner entry) and rewritten by the same rule (`ct::translation`): if the flow turns packets
//! `a -> b` into `a' -> b'`, the quote `b -> a` becomes `b' -> a'`, the outer destination `b` becomes `b'`, and
//! an outer source `a` (the endpoint itself reporting; a router on the way keeps its address) becomes `a'`.
//! So the node's stack and netfilter see errors that quote the client <-> backend flow they know (kernel
//! conntrack finds them RELATED), the client sees its frontend quoted, the backend its own flow:
//!
//! * Towards the client: a UDP client connected to a ClusterIP whose backend has no listener gets
//!   ECONNREFUSED, and path-MTU discovery works through Services.
//! * Towards the backend: errors the client side sends about replies.
//!
//! Only quotes with a 20-byte inner IPv4 header of TCP or UDP are translated; every other ICMP
//! packet passes untouched. The quote's IPv4 checksum is kept right, and its TCP/UDP checksum when
//! the quote holds it (the kernel ignores it, but tools do not); the ICMP checksum follows every
//! change through bpf_l4_csum_replace.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use orca_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, REASON_REWRITE_FAILED};
use proxy_ebpf::{
    csum,
    hdr::{
        ETH_HLEN, ETH_P_IP, ICMP_HLEN, IPV4_HLEN, IP_CSUM, IP_DADDR, IP_FRAG_OFF, IP_MF_OFFSET_MASK, IP_PROTO,
        IP_SADDR, L4_DPORT, L4_SPORT, TCP_CSUM, UDP_CSUM,
    },
};

use crate::{
    cfg, ct, fwd,
    parse::{Flow, Tuple},
    stats,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
/// Offset of the checksum in the ICMP header.
const ICMP_CSUM: usize = 2;

/// Translates the packet if it is an ICMP error about a tracked flow (at TC ingress, or egress when `egress`);
/// TC_ACT_OK (untouched) for everything else.
#[inline(always)]
pub fn handle(ctx: &TcContext, egress: bool) -> i32 {
    match translate(ctx, egress) {
        Some(Ok(flow)) if cfg::bypass_netfilter() => fwd::forward(ctx, &flow),
        Some(Ok(_)) | None => TC_ACT_OK,
        // A rewrite failed half-way: the packet would be corrupt.
        Some(Err(_)) => stats::drop(REASON_REWRITE_FAILED),
    }
}

/// The quoted packet.
struct Quote {
    ip: usize,
    l4: usize,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    /// Offset of the quote's TCP/UDP checksum when the quote holds a non-zero one.
    l4_csum: Option<usize>,
}

/// `None`: not an ICMP error about a tracked flow. `Some(Ok(outer))`: translated, with the new
/// outer addresses.
#[inline(always)]
fn translate(ctx: &TcContext, egress: bool) -> Option<Result<Flow, i64>> {
    let h_proto: u16 = ctx.load(12).ok()?;
    if h_proto != ETH_P_IP.to_be() {
        return None;
    }
    let ver_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
    if ver_ihl >> 4 != 4 || ver_ihl & 0x0f < 5 {
        return None;
    }
    let ihl_len = usize::from(ver_ihl & 0x0f) * 4;
    let proto: u8 = ctx.load(ETH_HLEN + IP_PROTO).ok()?;
    let frag_off: u16 = ctx.load(ETH_HLEN + IP_FRAG_OFF).ok()?;
    if proto != IPPROTO_ICMP || u16::from_be(frag_off) & IP_MF_OFFSET_MASK != 0 {
        return None;
    }
    let icmp = ETH_HLEN + ihl_len;
    let icmp_type: u8 = ctx.load(icmp).ok()?;
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED && icmp_type != ICMP_PARAMETERPROB {
        return None;
    }
    let q = quote(ctx, icmp + ICMP_HLEN)?;
    let outer_saddr: u32 = ctx.load(ETH_HLEN + IP_SADDR).ok()?;
    let outer_daddr: u32 = ctx.load(ETH_HLEN + IP_DADDR).ok()?;

    // The quoted packet travelled in the opposite direction of the flow's packets arriving here.
    let rev = Tuple {
        saddr: q.daddr,
        daddr: q.saddr,
        sport: q.dport,
        dport: q.sport,
    };
    let (dir, v) = ct::related(&rev, q.proto, egress)?;
    let new = ct::translation(dir, v.value(), &rev);
    Some(apply(
        ctx,
        icmp + ICMP_CSUM,
        &q,
        &rev,
        &new,
        [outer_saddr, outer_daddr],
        ihl_len,
    ))
}

/// Rewrites the quote `b -> a` (the reverse of `rev` = `a -> b`) to `b' -> a'` and the outer addresses (see the
/// module's documentation). Returns the new outer header.
#[inline(always)]
fn apply(
    ctx: &TcContext,
    csum_off: usize,
    q: &Quote,
    rev: &Tuple,
    new: &Tuple,
    outer_addrs: [u32; 2],
    ihl_len: usize,
) -> Result<Flow, i64> {
    rewrite_quote(ctx, csum_off, q, End::Src, new.daddr, new.dport)?;
    rewrite_quote(ctx, csum_off, q, End::Dst, new.saddr, new.sport)?;
    let [mut saddr, mut daddr] = outer_addrs;
    if daddr == rev.daddr && daddr != new.daddr {
        rewrite_outer(ctx, IP_DADDR, daddr, new.daddr)?;
        daddr = new.daddr;
    }
    if saddr == rev.saddr && saddr != new.saddr {
        rewrite_outer(ctx, IP_SADDR, saddr, new.saddr)?;
        saddr = new.saddr;
    }
    Ok(outer(saddr, daddr, ihl_len))
}

/// The outer header as a flow, for forwarding.
#[inline(always)]
fn outer(saddr: u32, daddr: u32, ihl_len: usize) -> Flow {
    Flow {
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        proto: IPPROTO_ICMP,
        tcp_flags: 0,
        ihl_len,
        l4_off: ETH_HLEN + ihl_len,
    }
}

#[inline(always)]
fn quote(ctx: &TcContext, ip: usize) -> Option<Quote> {
    let ver_ihl: u8 = ctx.load(ip).ok()?;
    if ver_ihl != 0x45 {
        return None;
    }
    let proto: u8 = ctx.load(ip + IP_PROTO).ok()?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let l4 = ip + IPV4_HLEN;
    let ports: [u16; 2] = ctx.load(l4 + L4_SPORT).ok()?;
    let csum_at = l4 + if proto == IPPROTO_TCP { TCP_CSUM } else { UDP_CSUM };
    // A TCP checksum lies beyond the 8 bytes every error quotes; a zero UDP checksum means none.
    let l4_csum = match ctx.load::<u16>(csum_at) {
        Ok(c) if c != 0 => Some(csum_at),
        _ => None,
    };
    Some(Quote {
        ip,
        l4,
        saddr: ctx.load(ip + IP_SADDR).ok()?,
        daddr: ctx.load(ip + IP_DADDR).ok()?,
        sport: ports[0],
        dport: ports[1],
        proto,
        l4_csum,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Src,
    Dst,
}

/// Stores `new` (2 or 4 bytes, packet order) over `old` at `off` inside the ICMP message and
/// follows the change in the ICMP checksum.
#[inline(always)]
fn store_in_icmp<T: Copy>(
    ctx: &TcContext,
    csum_off: usize,
    off: usize,
    old: u64,
    new: T,
    new_raw: u64,
) -> Result<(), i64> {
    ctx.store(off, &new, 0)?;
    ctx.l4_csum_replace(csum_off, old, new_raw, core::mem::size_of::<T>() as u64)?;
    Ok(())
}

/// Rewrites one end (address and port) of the quoted packet, with its IPv4 and TCP/UDP checksums.
#[inline(always)]
fn rewrite_quote(ctx: &TcContext, csum_off: usize, q: &Quote, end: End, addr: u32, port: u16) -> Result<(), i64> {
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Src => (q.saddr, q.sport, IP_SADDR, L4_SPORT),
        End::Dst => (q.daddr, q.dport, IP_DADDR, L4_DPORT),
    };
    let (oa, na) = (old_addr.to_ne_bytes(), addr.to_ne_bytes());
    let (op, np) = (old_port.to_ne_bytes(), port.to_ne_bytes());
    if old_addr != addr {
        store_in_icmp(
            ctx,
            csum_off,
            q.ip + addr_off,
            u64::from(old_addr),
            addr,
            u64::from(addr),
        )?;
        let ip_csum: u16 = ctx.load(q.ip + IP_CSUM)?;
        let new_ip_csum = csum::update(u16::from_be(ip_csum), &oa, &na).to_be();
        store_in_icmp(
            ctx,
            csum_off,
            q.ip + IP_CSUM,
            u64::from(ip_csum),
            new_ip_csum,
            u64::from(new_ip_csum),
        )?;
    }
    if old_port != port {
        store_in_icmp(
            ctx,
            csum_off,
            q.l4 + port_off,
            u64::from(old_port),
            port,
            u64::from(port),
        )?;
    }
    if let Some(at) = q.l4_csum {
        // The TCP/UDP checksum covers the pseudo header (the addresses) and the ports.
        let old: u16 = ctx.load(at)?;
        let mut c = csum::update(u16::from_be(old), &oa, &na);
        c = csum::update(c, &op, &np);
        if c == 0 && q.proto == IPPROTO_UDP {
            c = 0xffff;
        }
        let c = c.to_be();
        if c != old {
            store_in_icmp(ctx, csum_off, at, u64::from(old), c, u64::from(c))?;
        }
    }
    Ok(())
}

/// Rewrites an outer address (the ICMP checksum has no pseudo header).
#[inline(always)]
fn rewrite_outer(ctx: &TcContext, off: usize, old: u32, new: u32) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.l3_csum_replace(ETH_HLEN + IP_CSUM, u64::from(old), u64::from(new), 4)?;
    ctx.store(ETH_HLEN + off, &new, 0)?;
    Ok(())
}
