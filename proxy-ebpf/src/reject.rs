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
//!
//! IPv6 gets ICMPv6 destination unreachable / port unreachable, as ip6tables' `REJECT` sends by default; packets
//! with extension headers are dropped (the 48 quoted bytes would not reach their ports).

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
    EbpfContext as _,
};
use orca_common::In6;
use proxy_ebpf::hdr::{
    build_port_unreachable, port_unreachable6_in_place, ETH_HLEN, IPV4_HLEN, IPV6_HLEN, REJECT6_FRAME_LEN,
    REJECT6_ORIGINAL_AT, REJECT_FRAME_LEN, REJECT_QUOTE_LEN, TCP_RST,
};

use orca_common::{REASON_NO_ENDPOINTS_DROPPED, REASON_NO_ENDPOINTS_REJECTED};

use crate::{maps, parse::Flow, stats};

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

/// The IPv6 `reject`.
#[inline(always)]
pub fn reject6(ctx: &TcContext, flow: &Flow<In6>) -> i32 {
    match answer6(ctx, flow) {
        Some(verdict) => {
            stats::count(REASON_NO_ENDPOINTS_REJECTED);
            verdict
        }
        None => stats::drop(REASON_NO_ENDPOINTS_DROPPED),
    }
}

#[inline(always)]
fn answer6(ctx: &TcContext, flow: &Flow<In6>) -> Option<i32> {
    if flow.ihl_len != IPV6_HLEN || (flow.is_tcp() && flow.tcp_flags & TCP_RST != 0) {
        return None;
    }
    let scratch = maps::SCRATCH6.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot (TC programs do not nest on a CPU).
    let frame = unsafe { &mut (*scratch).frame };
    let original = &mut frame[REJECT6_ORIGINAL_AT..];
    // SAFETY: the context's skb; `original` is REJECT6_FRAME_LEN - REJECT6_ORIGINAL_AT bytes of the scratch slot.
    if unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.as_ptr(),
            0,
            original.as_mut_ptr().cast(),
            (REJECT6_FRAME_LEN - REJECT6_ORIGINAL_AT) as u32,
        )
    } != 0
    {
        return None;
    }
    port_unreachable6_in_place(frame);
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: skb is this program's context.
    if unsafe { bpf_skb_change_tail(skb, REJECT6_FRAME_LEN as u32, 0) } != 0 {
        return None;
    }
    ctx.store(0, frame, 0).ok()?;
    // SAFETY: reading the context's ingress ifindex.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT.
    Some(unsafe { bpf_redirect(ifindex, 0) as i32 })
}
