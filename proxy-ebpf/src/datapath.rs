//! The per-packet flow at TC ingress (pod veths, uplinks):
//! 1. not IPv4 TCP/UDP: ICMP errors about tracked flows are translated like the flow (`icmp`); fragments and
//!    non-IPv4 pass untouched (counted);
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
    Backend, Frontend, CONFIG_SNAT_IPV4, CT_DIR_INNER, CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT,
    CT_F_RST, FRONTEND_F_DROP_WHEN_EMPTY, FRONTEND_F_SNAT_EXTERNAL, FRONTEND_F_SOURCE_RANGES, REASON_FRAGMENT,
    REASON_NOT_IPV4, REASON_NO_LOCAL_ENDPOINTS, REASON_REWRITE_FAILED, REASON_SOURCE_RANGE,
};

use crate::{
    affinity, cfg,
    ct::{self, Hit},
    fwd, icmp, lb, maps, nat,
    parse::{self, Flow, Skip},
    reject, stats,
};

/// Where the packet entered the node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From a local pod (host side of its veth).
    Pod,
    /// From a node uplink: another node or an external client.
    Netdev,
}

/// A packet that `parse` leaves alone: ICMP errors may belong to a tracked flow; the rest is counted where it
/// arrives (at ingress; the same packet is not counted again on its way out).
#[inline(always)]
fn skipped(ctx: &TcContext, why: Skip, egress: bool) -> i32 {
    match why {
        Skip::Other => icmp::handle(ctx, egress),
        _ if egress => TC_ACT_OK,
        Skip::Fragment => {
            stats::count(REASON_FRAGMENT);
            TC_ACT_OK
        }
        Skip::NotIpv4 => {
            stats::count(REASON_NOT_IPV4);
            TC_ACT_OK
        }
    }
}

#[inline(always)]
pub fn ingress(ctx: &TcContext, origin: Origin) -> i32 {
    let mut flow = match parse::parse(ctx) {
        Ok(f) => f,
        Err(why) => return skipped(ctx, why, false),
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let bypass = cfg::bypass_netfilter();

    // A connection-opening SYN is never a reply (and a backend opening a connection to its client must not be
    // reverse-translated). Replies of masqueraded flows are addressed to the node; with netfilter bypassed every
    // reply is translated here.
    if !flow.is_opening() {
        let snat = snat_ipv4();
        if bypass || (snat != 0 && flow.daddr == snat) {
            if let Some(mut hit) = ct::lookup(&ct::key(&flow, CT_DIR_REPLY), now) {
                ct::observe(&mut hit, CT_DIR_REPLY, &flow, false, now);
                return apply(ctx, &mut flow, CT_DIR_REPLY, &hit);
            }
        }
    }

    let Some(fe) = lb::lookup_frontend(&flow, origin == Origin::Netdev) else {
        return TC_ACT_OK;
    };

    if let Some(mut hit) = ct::lookup(&ct::key(&flow, CT_DIR_SERVICE), now) {
        let v = hit.value;
        let backend = Backend {
            addr: v.backend_addr,
            port: v.backend_port,
            _pad: 0,
        };
        // A SYN on a closing or closed connection's tuple opens a new connection, as in the kernel's conntrack;
        // any other SYN on a live entry is a retransmission and keeps the flow (and its masquerade port).
        let reopened = flow.is_opening() && v.flags & (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND | CT_F_RST) != 0;
        if !reopened && keeps_backend(&flow, v.service_id, &backend) {
            ct::observe(&mut hit, CT_DIR_SERVICE, &flow, true, now);
            return apply(ctx, &mut flow, CT_DIR_SERVICE, &hit);
        }
        ct::release(&v, flow.proto);
    }

    // loadBalancerSourceRanges: new connections from other sources are dropped (kube-proxy's KUBE-FW chain;
    // tracked flows above keep going, as conntrack'd ones do there).
    if fe.flags & FRONTEND_F_SOURCE_RANGES != 0 && !lb::source_allowed(fe.service_id, flow.saddr) {
        return stats::drop(REASON_SOURCE_RANGE);
    }

    let backend = match affinity::lookup(&fe, flow.saddr, now) {
        Some(b) => b,
        None => match lb::choose_backend(&fe, flow_hash(&flow)) {
            Some(b) => b,
            None if fe.flags & FRONTEND_F_DROP_WHEN_EMPTY != 0 => return stats::drop(REASON_NO_LOCAL_ENDPOINTS),
            None => return reject::reject(ctx, &flow),
        },
    };
    affinity::record(&fe, flow.saddr, &backend, now);
    let masquerade = fe.flags & FRONTEND_F_SNAT_EXTERNAL != 0
        || flow.saddr == backend.addr
        || masquerade_by_config(origin, &fe, flow.saddr);
    let snat_addr = if masquerade { snat_ipv4() } else { 0 };
    match ct::create(&flow, &backend, fe.service_id, snat_addr, now) {
        Ok(v) => {
            let t = ct::translation(CT_DIR_SERVICE, &v, &flow.tuple());
            deliver(ctx, &mut flow, t)
        }
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
    let mut flow = match parse::parse(ctx) {
        Ok(f) => f,
        Err(why) => return skipped(ctx, why, true),
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(mut hit) = ct::lookup(&ct::key(&flow, CT_DIR_INNER), now) else {
        return TC_ACT_OK;
    };
    let from_client = ct::from_client(&hit.value, &flow.tuple());
    ct::observe(&mut hit, CT_DIR_INNER, &flow, from_client, now);
    apply(ctx, &mut flow, CT_DIR_INNER, &hit)
}

/// Translates the packet as its conntrack entry says.
#[inline(always)]
fn apply(ctx: &TcContext, flow: &mut Flow, dir: u8, hit: &Hit) -> i32 {
    let t = ct::translation(dir, &hit.value, &flow.tuple());
    deliver(ctx, flow, t)
}

/// Rewrites the packet to `t`; with netfilter bypassed, forwards it (`fwd`). A packet whose rewrite failed
/// half-way would be corrupt and is dropped.
#[inline(always)]
fn deliver(ctx: &TcContext, flow: &mut Flow, t: parse::Tuple) -> i32 {
    if nat::rewrite(ctx, flow, t.saddr, t.sport, t.daddr, t.dport).is_err() {
        return stats::drop(REASON_REWRITE_FAILED);
    }
    if cfg::bypass_netfilter() {
        fwd::forward(ctx, flow)
    } else {
        TC_ACT_OK
    }
}

/// The node address masqueraded flows get; 0 when the agent has not configured one.
#[inline(always)]
fn snat_ipv4() -> u32 {
    maps::CONFIG.get(CONFIG_SNAT_IPV4).copied().unwrap_or(0)
}

/// A tracked flow keeps its backend, except that UDP flows and new TCP connections (a SYN reusing
/// an old 5-tuple) move off a backend that left the service, as kube-proxy's conntrack cleanup
/// does. Established TCP connections keep theirs whatever the backend set becomes.
#[inline(always)]
fn keeps_backend(flow: &Flow, service_id: u32, backend: &Backend) -> bool {
    if flow.is_tcp() && !flow.is_opening() {
        return true;
    }
    lb::is_member(service_id, backend)
}

#[inline(always)]
fn flow_hash(flow: &Flow) -> u32 {
    orca_common::flow_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto)
}

/// kube-proxy's `--masquerade-all`, and `--cluster-cidr`: ClusterIP traffic from outside the node
/// whose source is not a pod is masqueraded, so replies of remote backends come back here.
#[inline(always)]
fn masquerade_by_config(origin: Origin, fe: &Frontend, saddr: u32) -> bool {
    let flags = maps::CONFIG.get(orca_common::CONFIG_FLAGS).copied().unwrap_or(0);
    if flags & orca_common::CONFIG_F_MASQUERADE_ALL != 0 {
        return true;
    }
    origin == Origin::Netdev
        && flags & orca_common::CONFIG_F_CLUSTER_CIDR != 0
        && fe.flags & orca_common::FRONTEND_F_CLUSTER_IP != 0
        && !lb::source_allowed(orca_common::CLUSTER_CIDR_ID, saddr)
}
