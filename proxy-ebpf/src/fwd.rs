//! With `--ebpf-bypass-netfilter` only: delivery of translated packets straight to their egress device
//! (bpf_fib_lookup, then bpf_redirect or bpf_redirect_neigh), as Cilium's BPF host routing does. The node's
//! routing and netfilter hooks (FORWARD, POSTROUTING: NetworkPolicy engines, host firewalls, the CNI's own
//! rules, kernel conntrack) never see these packets. By default the programs do not forward: DNAT at ingress,
//! SNAT at egress, the stack in between (see `datapath`).
//!
//! This is not only faster than handing the packet back to the node's stack: it is what makes
//! masquerading work at all when both halves are translated at TC ingress. A masqueraded packet carries the node's own address as
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
        __sk_buff, bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
    EbpfContext as _,
};
use orca_common::In6;
use proxy_ebpf::{
    csum,
    hdr::{ETH_HLEN, IP6_HOPLIMIT, IPV4_HLEN, IPV6_HLEN, IP_CSUM, IP_TTL},
};

use orca_common::REASON_FIB_DECLINED;

use crate::{parse::Flow, stats};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const FIB_PARAMS_WORDS: usize = core::mem::size_of::<FibParams>() / 8;
const _: () = assert!(core::mem::size_of::<FibParams>() == FIB_PARAMS_WORDS * 8);

/// Sends the (already translated) packet of `flow` out of the device the FIB routes it to, with
/// TC_ACT_REDIRECT; TC_ACT_OK (the stack takes it) when the FIB does not forward it here.
#[inline(always)]
pub fn forward(ctx: &TcContext, flow: &Flow) -> i32 {
    route(ctx, flow.proto, flow.sport, flow.dport, false, |p| {
        p.__bindgen_anon_3.ipv4_src = flow.saddr;
        p.__bindgen_anon_4.ipv4_dst = flow.daddr;
    })
}

/// The IPv6 `forward` (hop limit instead of TTL, no header checksum).
#[inline(always)]
pub fn forward6(ctx: &TcContext, flow: &Flow<In6>) -> i32 {
    route(ctx, flow.proto, flow.sport, flow.dport, true, |p| {
        p.__bindgen_anon_3.ipv6_src = flow.saddr.0;
        p.__bindgen_anon_4.ipv6_dst = flow.daddr.0;
    })
}

#[inline(always)]
fn route(ctx: &TcContext, proto: u8, sport: u16, dport: u16, v6: bool, addrs: impl FnOnce(&mut FibParams)) -> i32 {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // Zeroed with eight 8-byte stores: a zero-initialised struct literal compiles to calls of
    // aya-ebpf's byte-by-byte memset, which cost more than the FIB lookup itself.
    let mut raw = [0u64; FIB_PARAMS_WORDS];
    for i in 0..FIB_PARAMS_WORDS {
        // SAFETY: in bounds of `raw`; volatile so the stores are not merged back into a memset.
        unsafe { core::ptr::write_volatile(raw.as_mut_ptr().add(i), 0) };
    }
    // SAFETY: `raw` is 8-byte aligned (FibParams needs 4), exactly FibParams' size, and all-zero
    // is a valid FibParams (plain integers).
    let p = unsafe { &mut *raw.as_mut_ptr().cast::<FibParams>() };
    p.family = if v6 { AF_INET6 } else { AF_INET };
    p.l4_protocol = proto;
    p.sport = sport;
    p.dport = dport;
    // tot_len stays 0: the kernel then checks the skb itself against the egress MTU (GSO aware).
    // SAFETY: reading the context's ingress ifindex.
    p.ifindex = unsafe { (*skb).ifindex };
    addrs(p);
    // SAFETY: `p` lives on this stack frame for the call; the size is the struct's.
    let rc = unsafe { bpf_fib_lookup(skb.cast(), p, core::mem::size_of::<FibParams>() as i32, 0) };
    let rc = rc as u32;
    let decrement = |ctx| {
        if v6 {
            decrement_hop_limit(ctx)
        } else {
            decrement_ttl(ctx)
        }
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH || decrement(ctx).is_err() {
        stats::count(REASON_FIB_DECLINED);
        return TC_ACT_OK;
    }
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        // The FIB resolved the neighbour: write the Ethernet addresses (straight into the packet,
        // byte by byte: no helper call, no memcpy subprogram) and redirect.
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + 12 > end {
            stats::count(REASON_FIB_DECLINED);
            return TC_ACT_OK;
        }
        let eth = start as *mut u8;
        for i in 0..6 {
            // SAFETY: 12 bytes of packet checked above; `i` < 6 indexes the 6-byte arrays.
            unsafe {
                *eth.add(i) = p.dmac[i];
                *eth.add(6 + i) = p.smac[i];
            }
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
/// not be forwarded (TTL 1 or 0: the stack sends ICMP time exceeded). Direct packet access; the
/// checksum update is the kernel's `csum_replace2` (what bpf_l3_csum_replace runs).
#[inline(always)]
fn decrement_ttl(ctx: &TcContext) -> Result<(), i64> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + IPV4_HLEN > end {
        return Err(0);
    }
    let word_p = (start + ETH_HLEN + IP_TTL) as *mut u16;
    let sum_p = (start + ETH_HLEN + IP_CSUM) as *mut u16;
    // SAFETY: both fields lie inside the IPv4 header checked above; unaligned accesses. TTL and
    // protocol form one 16-bit word of the header checksum.
    unsafe {
        let old = word_p.read_unaligned();
        let mut bytes = old.to_ne_bytes();
        if bytes[0] <= 1 {
            return Err(0);
        }
        bytes[0] -= 1;
        let new = u16::from_ne_bytes(bytes);
        sum_p.write_unaligned(csum::replace2(sum_p.read_unaligned(), old, new));
        word_p.write_unaligned(new);
    }
    Ok(())
}

/// Decrements the IPv6 hop limit; `Err` when the packet must not be forwarded (the stack answers).
#[inline(always)]
fn decrement_hop_limit(ctx: &TcContext) -> Result<(), i64> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + IPV6_HLEN > end {
        return Err(0);
    }
    let p = (start + ETH_HLEN + IP6_HOPLIMIT) as *mut u8;
    // SAFETY: inside the IPv6 header checked above.
    unsafe {
        if *p <= 1 {
            return Err(0);
        }
        *p -= 1;
    }
    Ok(())
}
