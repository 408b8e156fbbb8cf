//! Address/port rewriting with incremental checksum updates.
//!
//! The new addresses and ports, and the IPv4 header checksum, are written with direct packet
//! access: the header checksum covers only the header, so its update is plain arithmetic
//! (`csum::replace4`, the kernel's own `csum_replace4` that bpf_l3_csum_replace runs). The TCP/UDP
//! checksum goes through bpf_l4_csum_replace, which also keeps CHECKSUM_PARTIAL (offloaded) and
//! CHECKSUM_COMPLETE packets right: one call for the address changes (with BPF_F_PSEUDO_HDR, as
//! they belong to the pseudo header) and one for the port changes (without it), each with the
//! summed difference of its words (field size 0), as Cilium's NAT does.

use aya_ebpf::programs::TcContext;
use orca_common::In6;
use proxy_ebpf::{
    csum,
    hdr::{
        ETH_HLEN, IP6_DADDR, IP6_SADDR, IPV4_HLEN, IPV6_HLEN, IP_CSUM, IP_DADDR, IP_SADDR, L4_DPORT, L4_SPORT,
        TCP_CSUM, UDP_CSUM,
    },
};

use crate::parse::{Flow, Tuple, MAX_L4_OFF};

/// bpf_l4_csum_replace flags (uapi/linux/bpf.h).
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Rewrites the packet of `flow` to come from `saddr`:`sport` and go to `daddr`:`dport` (packet
/// order / network byte order), fixing the IPv4 header and TCP/UDP checksums, and updates `flow`
/// to match the packet. Unchanged fields are left alone.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, flow: &mut Flow, saddr: u32, sport: u16, daddr: u32, dport: u16) -> Result<(), i64> {
    let (csum_off, extra) = if flow.is_tcp() {
        (flow.l4_off + TCP_CSUM, 0)
    } else {
        // A zero UDP checksum means "none" and must stay zero; a computed zero becomes 0xffff.
        (flow.l4_off + UDP_CSUM, BPF_F_MARK_MANGLED_0)
    };
    let addrs_changed = flow.saddr != saddr || flow.daddr != daddr;
    let ports_changed = flow.sport != sport || flow.dport != dport;
    let (start, end) = (ctx.data(), ctx.data_end());
    // parse() saw these bytes in the linear area; checked again for the verifier (and in case).
    if start + ETH_HLEN + IPV4_HLEN > end || start + flow.l4_off + L4_DPORT + 2 > end {
        return Err(-1);
    }
    let ip = start + ETH_HLEN;
    let l4 = start + flow.l4_off;
    let mut addr_diff = 0u32;
    if addrs_changed {
        // SAFETY (all accesses below): inside the bounds checked above; unaligned, as packet data
        // is not aligned. The program writes packet data directly, so the verifier's prologue
        // has made the linear area private (unclone) before it runs.
        unsafe {
            let sum_p = (ip + IP_CSUM) as *mut u16;
            let mut sum = sum_p.read_unaligned();
            if flow.saddr != saddr {
                sum = csum::replace4(sum, flow.saddr, saddr);
                addr_diff = csum::add32(addr_diff, csum::diff32(flow.saddr, saddr));
                ((ip + IP_SADDR) as *mut u32).write_unaligned(saddr);
            }
            if flow.daddr != daddr {
                sum = csum::replace4(sum, flow.daddr, daddr);
                addr_diff = csum::add32(addr_diff, csum::diff32(flow.daddr, daddr));
                ((ip + IP_DADDR) as *mut u32).write_unaligned(daddr);
            }
            sum_p.write_unaligned(sum);
        }
    }
    let mut port_diff = 0u32;
    if ports_changed {
        // SAFETY: as above.
        unsafe {
            if flow.sport != sport {
                port_diff = csum::add32(port_diff, csum::diff32(u32::from(flow.sport), u32::from(sport)));
                ((l4 + L4_SPORT) as *mut u16).write_unaligned(sport);
            }
            if flow.dport != dport {
                port_diff = csum::add32(port_diff, csum::diff32(u32::from(flow.dport), u32::from(dport)));
                ((l4 + L4_DPORT) as *mut u16).write_unaligned(dport);
            }
        }
    }
    // The checksum helpers may move the packet: no packet pointer is used after them.
    if addrs_changed {
        ctx.l4_csum_replace(csum_off, 0, u64::from(addr_diff), BPF_F_PSEUDO_HDR | extra)?;
    }
    if ports_changed {
        ctx.l4_csum_replace(csum_off, 0, u64::from(port_diff), extra)?;
    }
    flow.saddr = saddr;
    flow.sport = sport;
    flow.daddr = daddr;
    flow.dport = dport;
    Ok(())
}

/// The raw partial-sum difference of an IPv6 address changing from `from` to `to`.
#[inline(always)]
pub fn diff128(from: &In6, to: &In6) -> u32 {
    let mut d = 0u32;
    for i in 0..4 {
        d = csum::add32(d, csum::diff32(from.0[i], to.0[i]));
    }
    d
}

/// The IPv6 `rewrite`: no header checksum; the addresses belong to the TCP/UDP pseudo header.
#[inline(always)]
pub fn rewrite6(ctx: &TcContext, flow: &mut Flow<In6>, t: Tuple<In6>) -> Result<(), i64> {
    let (csum_off, extra) = if flow.is_tcp() {
        (flow.l4_off + TCP_CSUM, 0)
    } else {
        // A zero UDP checksum is invalid over IPv6 but may arrive from a tunnel's inner packet; keep it zero.
        (flow.l4_off + UDP_CSUM, BPF_F_MARK_MANGLED_0)
    };
    let saddr_changed = flow.saddr != t.saddr;
    let daddr_changed = flow.daddr != t.daddr;
    let ports_changed = flow.sport != t.sport || flow.dport != t.dport;
    // The flow may live in a scratch map: bound its offset for the verifier (parse6 never yields more).
    let l4_off = flow.l4_off;
    if l4_off > MAX_L4_OFF {
        return Err(-1);
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + IPV6_HLEN > end || start + l4_off + L4_DPORT + 2 > end {
        return Err(-1);
    }
    let ip = start + ETH_HLEN;
    let l4 = start + l4_off;
    let mut addr_diff = 0u32;
    // SAFETY (all accesses below): inside the bounds checked above; unaligned.
    unsafe {
        if saddr_changed {
            addr_diff = csum::add32(addr_diff, diff128(&flow.saddr, &t.saddr));
            ((ip + IP6_SADDR) as *mut In6).write_unaligned(t.saddr);
        }
        if daddr_changed {
            addr_diff = csum::add32(addr_diff, diff128(&flow.daddr, &t.daddr));
            ((ip + IP6_DADDR) as *mut In6).write_unaligned(t.daddr);
        }
    }
    let mut port_diff = 0u32;
    if ports_changed {
        // SAFETY: as above.
        unsafe {
            if flow.sport != t.sport {
                port_diff = csum::add32(port_diff, csum::diff32(u32::from(flow.sport), u32::from(t.sport)));
                ((l4 + L4_SPORT) as *mut u16).write_unaligned(t.sport);
            }
            if flow.dport != t.dport {
                port_diff = csum::add32(port_diff, csum::diff32(u32::from(flow.dport), u32::from(t.dport)));
                ((l4 + L4_DPORT) as *mut u16).write_unaligned(t.dport);
            }
        }
    }
    if saddr_changed || daddr_changed {
        ctx.l4_csum_replace(csum_off, 0, u64::from(addr_diff), BPF_F_PSEUDO_HDR | extra)?;
    }
    if ports_changed {
        ctx.l4_csum_replace(csum_off, 0, u64::from(port_diff), extra)?;
    }
    flow.saddr = t.saddr;
    flow.sport = t.sport;
    flow.daddr = t.daddr;
    flow.dport = t.dport;
    Ok(())
}
