//! ICMPv6 errors of translated flows (destination unreachable, packet too big, time exceeded, parameter
//! problem), translated like `icmp` does for IPv4 (read its documentation: the quote `b -> a` of a flow that
//! turns `a -> b` into `a' -> b'` becomes `b' -> a'`, the outer destination `b` becomes `b'`, an outer source `a`
//! becomes `a'`). The differences are IPv6's: no header checksums, and the ICMPv6 checksum covers a pseudo header,
//! so the outer addresses count in it too.
//!
//! Only errors without extension headers, quoting an IPv6 header without extension headers followed by TCP or UDP,
//! are translated; everything else passes untouched (neighbour discovery among it).

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use orca_common::{In6, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, REASON_REWRITE_FAILED};
use proxy_ebpf::{
    csum,
    hdr::{
        ETH_HLEN, ICMP6_DST_UNREACH, ICMP6_PACKET_TOO_BIG, ICMP6_PARAM_PROB, ICMP6_TIME_EXCEEDED, ICMP_HLEN, IP6_DADDR,
        IP6_NEXTHDR, IP6_SADDR, IPV6_HLEN, L4_DPORT, L4_SPORT, TCP_CSUM, UDP_CSUM,
    },
};

use crate::{
    cfg, ct, fwd, nat,
    parse::{Flow, Tuple},
    stats,
};

/// bpf_l4_csum_replace flag: the change is in the pseudo header.
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
/// Offset of the ICMPv6 header, and of its checksum.
const ICMP6: usize = ETH_HLEN + IPV6_HLEN;
const ICMP6_CSUM: usize = ICMP6 + 2;
/// Offset of the quoted IPv6 header.
const QUOTE: usize = ICMP6 + ICMP_HLEN;
const QUOTE_L4: usize = QUOTE + IPV6_HLEN;

#[inline(always)]
pub fn handle(ctx: &TcContext, egress: bool) -> i32 {
    match translate(ctx, egress) {
        Some(Ok(flow)) if cfg::bypass_netfilter() => fwd::forward6(ctx, &flow),
        Some(Ok(_)) | None => TC_ACT_OK,
        Some(Err(_)) => stats::drop(REASON_REWRITE_FAILED),
    }
}

#[inline(always)]
fn translate(ctx: &TcContext, egress: bool) -> Option<Result<Flow<In6>, i64>> {
    let nexthdr: u8 = ctx.load(ETH_HLEN + IP6_NEXTHDR).ok()?;
    if nexthdr != IPPROTO_ICMPV6 {
        return None;
    }
    let icmp_type: u8 = ctx.load(ICMP6).ok()?;
    if icmp_type != ICMP6_DST_UNREACH
        && icmp_type != ICMP6_PACKET_TOO_BIG
        && icmp_type != ICMP6_TIME_EXCEEDED
        && icmp_type != ICMP6_PARAM_PROB
    {
        return None;
    }
    let ver: u8 = ctx.load(QUOTE).ok()?;
    let proto: u8 = ctx.load(QUOTE + IP6_NEXTHDR).ok()?;
    if ver >> 4 != 6 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
    let q_saddr: In6 = ctx.load(QUOTE + IP6_SADDR).ok()?;
    let q_daddr: In6 = ctx.load(QUOTE + IP6_DADDR).ok()?;
    let ports: [u16; 2] = ctx.load(QUOTE_L4 + L4_SPORT).ok()?;
    let outer_saddr: In6 = ctx.load(ETH_HLEN + IP6_SADDR).ok()?;
    let outer_daddr: In6 = ctx.load(ETH_HLEN + IP6_DADDR).ok()?;

    let rev = Tuple {
        saddr: q_daddr,
        daddr: q_saddr,
        sport: ports[1],
        dport: ports[0],
    };
    let (dir, v) = ct::related(&rev, proto, egress)?;
    let new = ct::translation(dir, v.value(), &rev);
    Some(apply(ctx, proto, &rev, &new, outer_saddr, outer_daddr))
}

/// Rewrites the quote `b -> a` to `b' -> a'` (its TCP/UDP checksum too when the quote holds it) and the outer
/// addresses; the ICMPv6 checksum follows both. Returns the new outer header as a flow.
#[inline(always)]
fn apply(
    ctx: &TcContext,
    proto: u8,
    rev: &Tuple<In6>,
    new: &Tuple<In6>,
    mut saddr: In6,
    mut daddr: In6,
) -> Result<Flow<In6>, i64> {
    // The quote's source is `b` (rev.daddr) and becomes new.daddr; its destination `a` becomes new.saddr.
    let (q_src, q_dst) = (rev.daddr, rev.saddr);
    let (q_sport, q_dport) = (rev.dport, rev.sport);
    let mut body = 0u32;
    let mut l4_pseudo = 0u32;
    if q_src != new.daddr {
        ctx.store(QUOTE + IP6_SADDR, &new.daddr, 0)?;
        let d = nat::diff128(&q_src, &new.daddr);
        body = csum::add32(body, d);
        l4_pseudo = csum::add32(l4_pseudo, d);
    }
    if q_dst != new.saddr {
        ctx.store(QUOTE + IP6_DADDR, &new.saddr, 0)?;
        let d = nat::diff128(&q_dst, &new.saddr);
        body = csum::add32(body, d);
        l4_pseudo = csum::add32(l4_pseudo, d);
    }
    let mut ports = 0u32;
    if q_sport != new.dport {
        ctx.store(QUOTE_L4 + L4_SPORT, &new.dport, 0)?;
        ports = csum::add32(ports, csum::diff32(u32::from(q_sport), u32::from(new.dport)));
    }
    if q_dport != new.sport {
        ctx.store(QUOTE_L4 + L4_DPORT, &new.sport, 0)?;
        ports = csum::add32(ports, csum::diff32(u32::from(q_dport), u32::from(new.sport)));
    }
    body = csum::add32(body, ports);
    // The quote's own TCP/UDP checksum (when the quote reaches it, and UDP's is not "none").
    let at = QUOTE_L4 + if proto == IPPROTO_TCP { TCP_CSUM } else { UDP_CSUM };
    if let Ok(old) = ctx.load::<u16>(at) {
        if old != 0 {
            let folded = csum::fold32(csum::add32(csum::add32(l4_pseudo, ports), !u32::from(old)));
            let mut c = folded;
            if c == 0 && proto == IPPROTO_UDP {
                c = 0xffff;
            }
            if c != old {
                ctx.store(at, &c, 0)?;
                body = csum::add32(body, csum::diff32(u32::from(old), u32::from(c)));
            }
        }
    }
    if body != 0 {
        ctx.l4_csum_replace(ICMP6_CSUM, 0, u64::from(body), 0)?;
    }
    let mut outer = 0u32;
    if daddr == rev.daddr && daddr != new.daddr {
        ctx.store(ETH_HLEN + IP6_DADDR, &new.daddr, 0)?;
        outer = csum::add32(outer, nat::diff128(&daddr, &new.daddr));
        daddr = new.daddr;
    }
    if saddr == rev.saddr && saddr != new.saddr {
        ctx.store(ETH_HLEN + IP6_SADDR, &new.saddr, 0)?;
        outer = csum::add32(outer, nat::diff128(&saddr, &new.saddr));
        saddr = new.saddr;
    }
    if outer != 0 {
        ctx.l4_csum_replace(ICMP6_CSUM, 0, u64::from(outer), BPF_F_PSEUDO_HDR)?;
    }
    Ok(Flow {
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        proto: IPPROTO_ICMPV6,
        tcp_flags: 0,
        ihl_len: IPV6_HLEN,
        l4_off: ICMP6,
    })
}
