//! Address/port rewriting with incremental checksum updates (bpf_l3_csum_replace /
//! bpf_l4_csum_replace), which also keep CHECKSUM_PARTIAL (offloaded) and CHECKSUM_COMPLETE
//! packets right.

use aya_ebpf::programs::TcContext;
use proxy_ebpf::hdr::{ETH_HLEN, IP_CSUM, IP_DADDR, IP_SADDR, L4_DPORT, L4_SPORT, TCP_CSUM, UDP_CSUM};

use crate::parse::Flow;

/// bpf_l4_csum_replace flags (uapi/linux/bpf.h).
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites the source or destination address and port of `flow`'s packet to `addr`:`port`
/// (packet order / network byte order), fixing the IPv4 header and TCP/UDP checksums, and updates
/// `flow` to match the packet.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, flow: &mut Flow, end: End, addr: u32, port: u16) -> Result<(), i64> {
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Source => (flow.saddr, flow.sport, IP_SADDR, L4_SPORT),
        End::Destination => (flow.daddr, flow.dport, IP_DADDR, L4_DPORT),
    };
    let (csum_off, extra) = if flow.is_tcp() {
        (flow.l4_off + TCP_CSUM, 0)
    } else {
        // A zero UDP checksum means "none" and must stay zero; a computed zero becomes 0xffff.
        (flow.l4_off + UDP_CSUM, BPF_F_MARK_MANGLED_0)
    };
    if old_addr != addr {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_addr),
            u64::from(addr),
            BPF_F_PSEUDO_HDR | extra | 4,
        )?;
        ctx.l3_csum_replace(ETH_HLEN + IP_CSUM, u64::from(old_addr), u64::from(addr), 4)?;
        ctx.store(ETH_HLEN + addr_off, &addr, 0)?;
    }
    if old_port != port {
        ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(port), extra | 2)?;
        ctx.store(flow.l4_off + port_off, &port, 0)?;
    }
    match end {
        End::Source => {
            flow.saddr = addr;
            flow.sport = port;
        }
        End::Destination => {
            flow.daddr = addr;
            flow.dport = port;
        }
    }
    Ok(())
}
