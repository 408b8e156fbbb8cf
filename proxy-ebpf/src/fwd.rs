//! Delivery of translated packets straight to their egress device (bpf_fib_lookup, then
//! bpf_redirect or bpf_redirect_neigh), as Cilium's BPF host routing does.
//!
//! This is not only faster than handing the packet back to the node's stack: it is what makes
//! masquerading work at all at TC ingress. A masqueraded packet carries the node's own address as
//! its source, and so does the reverse-translated reply of a NodePort; the stack's input routing
//! drops such packets as martians (`fib_validate_source`: a source address that is local to the
//! receiving node). kube-proxy's iptables rules rewrite the source after routing (POSTROUTING), so
//! they never meet that check; forwarding from here skips it in the same way.
//!
//! The forwarding the stack would have done is kept: the FIB decides the device and the next hop
//! (with `ip_forward` honoured: `BPF_FIB_LKUP_RET_FWD_DISABLED` passes the packet to the stack),
//! the TTL is decremented, and packets the FIB does not forward (local destinations, no route,
//! too big for the egress MTU, TTL about to expire) go to the stack unchanged, which then answers
//! or drops them as it would have anyway.

use aya_ebpf::{
    bindings::{
        __sk_buff, bpf_fib_lookup as FibParams, bpf_fib_lookup__bindgen_ty_1, bpf_fib_lookup__bindgen_ty_2,
        bpf_fib_lookup__bindgen_ty_3, bpf_fib_lookup__bindgen_ty_4, bpf_fib_lookup__bindgen_ty_5,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
    EbpfContext as _,
};
use proxy_ebpf::hdr::{ETH_HLEN, IP_CSUM, IP_TTL};

use crate::parse::Flow;

const AF_INET: u8 = 2;

/// Sends the (already translated) packet of `flow` out of the device the FIB routes it to, with
/// TC_ACT_REDIRECT; TC_ACT_OK (the stack takes it) when the FIB does not forward it here.
#[inline(always)]
pub fn forward(ctx: &TcContext, flow: &Flow) -> i32 {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // Every byte written (the unions through their widest member), without a memset call.
    let mut p = FibParams {
        family: AF_INET,
        l4_protocol: flow.proto,
        sport: flow.sport,
        dport: flow.dport,
        // tot_len 0: the kernel then checks the skb itself against the egress MTU (GSO aware).
        __bindgen_anon_1: bpf_fib_lookup__bindgen_ty_1 { tot_len: 0 },
        // SAFETY: reading the context's ingress ifindex.
        ifindex: unsafe { (*skb).ifindex },
        __bindgen_anon_2: bpf_fib_lookup__bindgen_ty_2 { rt_metric: 0 },
        // ipv4_src / ipv4_dst are the first word of these.
        __bindgen_anon_3: bpf_fib_lookup__bindgen_ty_3 {
            ipv6_src: [flow.saddr, 0, 0, 0],
        },
        __bindgen_anon_4: bpf_fib_lookup__bindgen_ty_4 {
            ipv6_dst: [flow.daddr, 0, 0, 0],
        },
        __bindgen_anon_5: bpf_fib_lookup__bindgen_ty_5 { tbid: 0 },
        smac: [0; 6],
        dmac: [0; 6],
    };
    // SAFETY: `p` lives on this stack frame for the call; the size is the struct's.
    let rc = unsafe { bpf_fib_lookup(skb.cast(), &mut p, core::mem::size_of::<FibParams>() as i32, 0) };
    let rc = rc as u32;
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return TC_ACT_OK;
    }
    if decrement_ttl(ctx).is_err() {
        return TC_ACT_OK;
    }
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        // The FIB resolved the neighbour: write the Ethernet addresses and redirect.
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&p.dmac);
        macs[6..].copy_from_slice(&p.smac);
        if ctx.store(0, &macs, 0).is_err() {
            return TC_ACT_OK;
        }
        // SAFETY: plain helper call; returns TC_ACT_REDIRECT.
        return unsafe { bpf_redirect(p.ifindex, 0) as i32 };
    }
    // No neighbour entry yet: let the neighbour subsystem resolve the next hop (and queue the packet
    // meanwhile).
    // SAFETY: plain helper call without parameters; returns TC_ACT_REDIRECT.
    unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Decrements the IPv4 TTL (with its checksum), as forwarding does; `Err` when the packet must
/// not be forwarded (TTL 1 or 0: the stack sends ICMP time exceeded).
#[inline(always)]
fn decrement_ttl(ctx: &TcContext) -> Result<(), i64> {
    // TTL and protocol form one 16-bit word of the header checksum.
    let old: u16 = ctx.load(ETH_HLEN + IP_TTL)?;
    let ttl = old.to_ne_bytes()[0];
    if ttl <= 1 {
        return Err(0);
    }
    let mut bytes = old.to_ne_bytes();
    bytes[0] = ttl - 1;
    let new = u16::from_ne_bytes(bytes);
    ctx.l3_csum_replace(ETH_HLEN + IP_CSUM, u64::from(old), u64::from(new), 2)?;
    ctx.store(ETH_HLEN + IP_TTL, &new, 0)?;
    Ok(())
}
