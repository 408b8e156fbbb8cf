//! The per-packet flow at TC ingress (pod veths, uplinks), the same for IPv4 and IPv6 (each family with its own
//! maps and code, `fam`):
//! 1. not TCP/UDP: ICMP errors about tracked flows are translated like the flow (`icmp`, `icmp6`); fragments and
//!    non-IP frames pass untouched (counted);
//! 2. a reply of a masqueraded flow (reply-direction conntrack hit; with netfilter bypassed, of any translated
//!    flow): back to the client;
//! 3. not addressed to a frontend: pass;
//! 4. a tracked flow whose backend is still usable: to its backend, as recorded;
//! 5. no endpoints: reject (or drop, when only a Local policy leaves the frontend without any);
//! 6. otherwise choose a backend (affinity first, else random or Maglev), decide on masquerading, track the
//!    flow, and send the packet to the backend.
//!
//! By default the packet then goes on into the node's stack with its new destination: routing, and netfilter's
//! PREROUTING, FORWARD and POSTROUTING hooks see client -> backend, exactly what they see with kube-proxy after
//! its DNAT (so NetworkPolicy engines, host firewalls and kernel conntrack work as they do there), and the
//! translation completes at TC egress of the device the stack chose (`egress`): masqueraded packets get the
//! node's address as source, replies get their frontend back. With `--ebpf-bypass-netfilter` the programs
//! translate both halves here and forward the packet themselves (`fwd`), skipping the stack.
//!
//! Masquerading (SNAT to the node address from `ORCA_CONFIG`), as kube-proxy does: all traffic to frontends
//! flagged `FRONTEND_F_SNAT_EXTERNAL` (NodePorts, load-balancer and external IPs of Services with
//! externalTrafficPolicy Cluster — kube-proxy's KUBE-EXT chain marks every source for masquerade, local pods
//! included; with the Local policy pods get an unflagged cluster-wide entry instead), hairpin traffic (a pod
//! reaching itself through a Service), `--masquerade-all` and `--cluster-cidr`.

use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_ktime_get_ns, programs::TcContext};
use orca_common::{
    Backend, Frontend, In6, CT_DIR_INNER, CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT, CT_F_RST,
    FRONTEND_F_DROP_WHEN_EMPTY, FRONTEND_F_SNAT_EXTERNAL, FRONTEND_F_SOURCE_RANGES, PROG6_EGRESS, PROG6_FROM_NETDEV,
    PROG6_FROM_POD, REASON_FRAGMENT, REASON_NOT_IP, REASON_NO_LOCAL_ENDPOINTS, REASON_REWRITE_FAILED,
    REASON_SOURCE_RANGE,
};

use crate::{
    affinity, cfg,
    ct::{self, Hit},
    fam::Fam,
    lb, maps,
    parse::{self, Flow, Skip},
    stats,
};

/// Where the packet entered the node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From a local pod (host side of its veth).
    Pod,
    /// From a node uplink: another node or an external client.
    Netdev,
}

/// A packet that `parse` leaves alone: `NOT_A_FLOW` (the caller looks for an ICMP error about a tracked flow); the
/// rest is counted where it arrives (at ingress; the same packet is not counted again on its way out).
#[inline(always)]
fn skipped(why: Skip, egress: bool) -> i32 {
    match why {
        Skip::Other => NOT_A_FLOW,
        _ if egress => TC_ACT_OK,
        Skip::Fragment => {
            stats::count(REASON_FRAGMENT);
            TC_ACT_OK
        }
        Skip::NotIp => {
            stats::count(REASON_NOT_IP);
            TC_ACT_OK
        }
    }
}

/// IPv4, in the entry point itself (one program, no calls: what it was before IPv6); IPv6 frames go to the
/// family's own program by a tail call (`PROGS6`), which gets a 512-byte stack of its own for 16-byte addresses.
/// Should the slot be empty (an agent that has not filled it yet), IPv6 passes untouched.
#[inline(always)]
pub fn ingress(ctx: &TcContext, origin: Origin) -> i32 {
    if parse::ethertype(ctx) == parse::ETH_IPV6 {
        let slot = match origin {
            Origin::Pod => PROG6_FROM_POD,
            Origin::Netdev => PROG6_FROM_NETDEV,
        };
        return tail_call6(ctx, slot);
    }
    match parse::parse(ctx) {
        Ok(mut f) => ingress_flow(ctx, origin, &mut f),
        Err(Skip::Other) => <u32 as Fam>::icmp(ctx, false),
        Err(why) => skipped(why, false),
    }
}

// (On the host, where this crate only type-checks, the helper's result type is `()`.)
#[allow(clippy::let_unit_value)]
#[inline(always)]
fn tail_call6(ctx: &TcContext, slot: u32) -> i32 {
    // SAFETY: the slot holds one of this object's IPv6 programs of the same type (or nothing: the call falls through).
    let _ = unsafe { maps::PROGS6.tail_call(ctx, slot) };
    TC_ACT_OK
}

/// The IPv6 program at TC ingress (the tail of `ingress`). Its steps are BPF subprograms, siblings called from here
/// so that their stack frames never add up: `parse6` (the flow into the scratch slot), `ingress6` (replies and
/// tracked flows), `new_flow6` (a new flow), `icmp6` (ICMPv6 errors).
#[inline(always)]
pub fn ingress_v6(ctx: &TcContext, origin: Origin) -> i32 {
    match parse6(ctx, false) {
        PARSED => match ingress6(ctx, origin) {
            NEW_FLOW => new_flow6(ctx, origin),
            verdict => verdict,
        },
        NOT_A_FLOW => icmp6(ctx, false),
        verdict => verdict,
    }
}

/// The IPv6 program at TC egress (the tail of `egress`).
#[inline(always)]
pub fn egress_v6(ctx: &TcContext) -> i32 {
    match parse6(ctx, true) {
        PARSED => egress6(ctx),
        NOT_A_FLOW => icmp6(ctx, true),
        verdict => verdict,
    }
}

/// Parses an IPv6 packet into this CPU's scratch slot (its flow is eight address words: in registers they would
/// spill most of the stack). A subprogram of its own, so that the verifier walks the rest of the path once, not
/// once per way through the extension headers. Returns `PARSED`, `NOT_A_FLOW` (not TCP/UDP: maybe an ICMPv6
/// error), or the verdict for a packet that passes as it is (counted).
#[inline(never)]
fn parse6(ctx: &TcContext, egress: bool) -> i32 {
    match parse::parse6(ctx) {
        Ok(f) => match maps::SCRATCH6.get_ptr_mut(0) {
            Some(p) => {
                // SAFETY: this CPU's slot; TC programs do not nest on a CPU.
                unsafe { (*p).flow = f };
                PARSED
            }
            None => TC_ACT_OK,
        },
        Err(Skip::Other) => NOT_A_FLOW,
        Err(why) => skipped(why, egress),
    }
}

/// The IPv6 flow `parse6` left in this CPU's scratch slot.
#[inline(always)]
fn scratch_flow() -> Option<&'static mut Flow<In6>> {
    let p = maps::SCRATCH6.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, filled by `parse6` for this very packet just before.
    Some(unsafe { &mut (*p).flow })
}

#[inline(never)]
fn ingress6(ctx: &TcContext, origin: Origin) -> i32 {
    match scratch_flow() {
        Some(flow) => ingress_flow(ctx, origin, flow),
        None => TC_ACT_OK,
    }
}

/// `parse6` found a TCP/UDP flow (in the scratch slot).
const PARSED: i32 = -1002;

/// What the per-family subprograms return for a packet that is not TCP/UDP: the entry point then looks for an
/// ICMP error (`icmp4`/`icmp6`, sibling subprograms).
const NOT_A_FLOW: i32 = -1000;
/// What `ingress6` returns for the first packet of a new flow (its frontend stashed with the flow): the entry point
/// then calls `new_flow6`, a sibling with a stack frame of its own.
const NEW_FLOW: i32 = -1001;

#[inline(never)]
fn new_flow6(ctx: &TcContext, origin: Origin) -> i32 {
    let Some(p) = maps::SCRATCH6.get_ptr_mut(0) else {
        return TC_ACT_OK;
    };
    // SAFETY: this CPU's slot, filled by `ingress6` for this very packet just before.
    let (flow, fe) = unsafe { (&mut (*p).flow, (*p).fe) };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    new_flow(ctx, origin, flow, &fe, now)
}

#[inline(never)]
fn icmp6(ctx: &TcContext, egress: bool) -> i32 {
    <In6 as Fam>::icmp(ctx, egress)
}

#[inline(always)]
fn ingress_flow<A: Fam>(ctx: &TcContext, origin: Origin, flow: &mut Flow<A>) -> i32 {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let bypass = cfg::bypass_netfilter();
    // Read once (an IPv6 flow lives in a map: every read of it would be a new unknown to the verifier).
    let opening = flow.is_opening();

    // A connection-opening SYN is never a reply (and a backend opening a connection to its client must not be
    // reverse-translated). Replies of masqueraded flows are addressed to the node; with netfilter bypassed every
    // reply is translated here.
    if !opening {
        let snat = A::snat();
        if bypass || (!snat.is_zero() && flow.daddr == snat) {
            if let Some(mut hit) = ct::lookup(&ct::key(flow, CT_DIR_REPLY), now) {
                ct::observe(&mut hit, CT_DIR_REPLY, flow, false, now);
                return apply(ctx, flow, CT_DIR_REPLY, &hit);
            }
        }
    }

    let Some(fe) = lb::lookup_frontend(flow, origin == Origin::Netdev) else {
        return TC_ACT_OK;
    };

    if let Some(mut hit) = ct::lookup(&ct::key(flow, CT_DIR_SERVICE), now) {
        let v = hit.value();
        let backend = Backend {
            addr: v.backend_addr,
            port: v.backend_port,
            _pad: 0,
        };
        // A SYN on a closing or closed connection's tuple opens a new connection, as in the kernel's conntrack;
        // any other SYN on a live entry is a retransmission and keeps the flow (and its masquerade port).
        let reopened = opening && v.flags & (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND | CT_F_RST) != 0;
        if !reopened && keeps_backend(flow.is_tcp(), opening, v.service_id, &backend) {
            ct::observe(&mut hit, CT_DIR_SERVICE, flow, true, now);
            return apply(ctx, flow, CT_DIR_SERVICE, &hit);
        }
        ct::release(v, flow.proto);
    }

    if A::stash_new_flow(&fe) {
        return NEW_FLOW;
    }
    new_flow(ctx, origin, flow, &fe, now)
}

/// A new flow to frontend `fe`: choose its backend, track it, translate the packet.
#[inline(always)]
fn new_flow<A: Fam>(ctx: &TcContext, origin: Origin, flow: &mut Flow<A>, fe: &Frontend, now: u64) -> i32 {
    // loadBalancerSourceRanges: new connections from other sources are dropped (kube-proxy's KUBE-FW chain;
    // tracked flows above keep going, as conntrack'd ones do there).
    if fe.flags & FRONTEND_F_SOURCE_RANGES != 0 && !lb::source_allowed(fe.service_id, flow.saddr) {
        return stats::drop(REASON_SOURCE_RANGE);
    }

    let backend = match affinity::lookup(fe, flow.saddr, now) {
        Some(b) => b,
        None => match lb::choose_backend::<A>(fe, flow_hash(flow)) {
            Some(b) => b,
            None if fe.flags & FRONTEND_F_DROP_WHEN_EMPTY != 0 => return stats::drop(REASON_NO_LOCAL_ENDPOINTS),
            None => return A::reject(ctx, flow),
        },
    };
    affinity::record(fe, flow.saddr, &backend, now);
    let masquerade = fe.flags & FRONTEND_F_SNAT_EXTERNAL != 0
        || flow.saddr == backend.addr
        || masquerade_by_config(origin, fe, flow.saddr);
    let snat_addr = if masquerade { A::snat() } else { A::default() };
    match ct::create(flow, &backend, fe.service_id, snat_addr, now) {
        Ok(t) => deliver(ctx, flow, t),
        Err(reason) => stats::drop(reason),
    }
}

/// TC egress on uplinks and pod veths (not attached when netfilter is bypassed): the second half of the
/// translation of what the stack forwarded (or sent) between a client and a backend, found by one lookup of the
/// flow's inner entry.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    if cfg::bypass_netfilter() {
        return TC_ACT_OK;
    }
    if parse::ethertype(ctx) == parse::ETH_IPV6 {
        return tail_call6(ctx, PROG6_EGRESS);
    }
    match parse::parse(ctx) {
        Ok(mut f) => egress_flow(ctx, &mut f),
        Err(Skip::Other) => <u32 as Fam>::icmp(ctx, true),
        Err(why) => skipped(why, true),
    }
}

#[inline(never)]
fn egress6(ctx: &TcContext) -> i32 {
    match scratch_flow() {
        Some(flow) => egress_flow(ctx, flow),
        None => TC_ACT_OK,
    }
}

#[inline(always)]
fn egress_flow<A: Fam>(ctx: &TcContext, flow: &mut Flow<A>) -> i32 {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(mut hit) = ct::lookup(&ct::key(flow, CT_DIR_INNER), now) else {
        return TC_ACT_OK;
    };
    let from_client = ct::from_client(hit.value(), &flow.tuple());
    ct::observe(&mut hit, CT_DIR_INNER, flow, from_client, now);
    apply(ctx, flow, CT_DIR_INNER, &hit)
}

/// Translates the packet as its conntrack entry says.
#[inline(always)]
fn apply<A: Fam>(ctx: &TcContext, flow: &mut Flow<A>, dir: u8, hit: &Hit<A>) -> i32 {
    let t = ct::translation(dir, hit.value(), &flow.tuple());
    deliver(ctx, flow, t)
}

/// Rewrites the packet to `t`; with netfilter bypassed, forwards it (`fwd`). A packet whose rewrite failed
/// half-way would be corrupt and is dropped.
#[inline(always)]
fn deliver<A: Fam>(ctx: &TcContext, flow: &mut Flow<A>, t: parse::Tuple<A>) -> i32 {
    if A::rewrite(ctx, flow, t).is_err() {
        return stats::drop(REASON_REWRITE_FAILED);
    }
    if cfg::bypass_netfilter() {
        A::forward(ctx, flow)
    } else {
        TC_ACT_OK
    }
}

/// A tracked flow keeps its backend, except that UDP flows and new TCP connections (a SYN reusing
/// an old 5-tuple) move off a backend that left the service, as kube-proxy's conntrack cleanup
/// does. Established TCP connections keep theirs whatever the backend set becomes.
#[inline(always)]
fn keeps_backend<A: Fam>(tcp: bool, opening: bool, service_id: u32, backend: &Backend<A>) -> bool {
    if tcp && !opening {
        return true;
    }
    lb::is_member(service_id, backend)
}

#[inline(always)]
fn flow_hash<A: Fam>(flow: &Flow<A>) -> u32 {
    orca_common::flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto)
}

/// kube-proxy's `--masquerade-all`, and `--cluster-cidr`: ClusterIP traffic from outside the node
/// whose source is not a pod is masqueraded, so replies of remote backends come back here.
#[inline(always)]
fn masquerade_by_config<A: Fam>(origin: Origin, fe: &Frontend, saddr: A) -> bool {
    let flags = maps::CONFIG.get(orca_common::CONFIG_FLAGS).copied().unwrap_or(0);
    if flags & orca_common::CONFIG_F_MASQUERADE_ALL != 0 {
        return true;
    }
    origin == Origin::Netdev
        && flags & A::CLUSTER_CIDR_FLAG != 0
        && fe.flags & orca_common::FRONTEND_F_CLUSTER_IP != 0
        && !lb::source_allowed(orca_common::CLUSTER_CIDR_ID, saddr)
}
