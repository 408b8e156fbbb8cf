//! Frontends without endpoints: answer with ICMP destination unreachable / port unreachable, sent
//! back out of the interface the packet came in on. This is what kube-proxy's `REJECT` rule does
//! (iptables' default `--reject-with icmp-port-unreachable`, for TCP and UDP alike): a TCP
//! connect() fails at once with ECONNREFUSED and a connected UDP socket gets ECONNREFUSED.
//!
//! The reply is built whole (complete checksums), which is right for every packet this path can
//! see: packets from local pods go back into the pod, whose stack trusts CHECKSUM_PARTIAL, and
//! packets from an uplink are never CHECKSUM_PARTIAL.
//!
//! Packets with IPv4 options (the RFC 792 quote would be longer) and TCP resets (which must never
//! be answered) are dropped instead.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
    EbpfContext as _,
};
use proxy_ebpf::hdr::{build_port_unreachable, ETH_HLEN, IPV4_HLEN, REJECT_FRAME_LEN, REJECT_QUOTE_LEN, TCP_RST};

use orca_common::{REASON_NO_ENDPOINTS_DROPPED, REASON_NO_ENDPOINTS_REJECTED};

use crate::{parse::Flow, stats};

/// Answers (or, where it cannot, drops) the packet; counted either way.
#[inline(always)]
pub fn reject(ctx: &TcContext, flow: &Flow) -> i32 {
    match answer(ctx, flow) {
        Some(verdict) => {
            stats::count(REASON_NO_ENDPOINTS_REJECTED);
            verdict
        }
        None => stats::drop(REASON_NO_ENDPOINTS_DROPPED),
    }
}

#[inline(always)]
fn answer(ctx: &TcContext, flow: &Flow) -> Option<i32> {
    if flow.ihl_len != IPV4_HLEN || (flow.is_tcp() && flow.tcp_flags & TCP_RST != 0) {
        return None;
    }
    let eth = ctx.load::<[u8; ETH_HLEN]>(0).ok()?;
    let quote = ctx.load::<[u8; REJECT_QUOTE_LEN]>(ETH_HLEN).ok()?;
    let frame = build_port_unreachable(&eth, &quote);
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: skb is this program's context.
    if unsafe { bpf_skb_change_tail(skb, REJECT_FRAME_LEN as u32, 0) } != 0 {
        return None;
    }
    ctx.store(0, &frame, 0).ok()?;
    // SAFETY: reading the context's ingress ifindex.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT.
    Some(unsafe { bpf_redirect(ifindex, 0) as i32 })
}
