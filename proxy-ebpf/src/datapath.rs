//! The per-packet flow:
//! 1. not IPv4 TCP/UDP, or a fragment: pass untouched, except ICMP errors about tracked flows,
//!    which `icmp` translates like the flow;
//! 2. a reply of a translated flow (reply-direction conntrack hit): reverse NAT, forward;
//! 3. not addressed to a frontend: pass;
//! 4. a tracked flow whose backend is still usable: DNAT (and SNAT) as recorded, forward;
//! 5. no endpoints: reject (or drop, when only a Local policy leaves the frontend without any);
//! 6. otherwise choose a backend (affinity first, else random), decide on masquerading, track the
//!    flow, DNAT (and SNAT), forward.
//!
//! "Forward" is `fwd::forward`: a FIB lookup and a redirect to the egress device.
//!
//! Masquerading (SNAT to the node address from `ORCA_CONFIG`), as kube-proxy does: all traffic to
//! frontends flagged `FRONTEND_F_SNAT_EXTERNAL` (NodePorts, load-balancer and external IPs of
//! Services with externalTrafficPolicy Cluster — kube-proxy's KUBE-EXT chain marks every source
//! for masquerade, local pods included; with the Local policy pods get an unflagged cluster-wide
//! entry instead), and hairpin traffic (a pod reaching itself through a Service).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use orca_common::{
    Backend, Frontend, CONFIG_SNAT_IPV4, FRONTEND_F_DROP_WHEN_EMPTY, FRONTEND_F_SNAT_EXTERNAL, FRONTEND_F_SOURCE_RANGES,
};
use proxy_ebpf::hdr::{TCP_ACK, TCP_SYN};

use crate::{
    affinity,
    ct::{self, Snat},
    fwd, icmp, lb, maps, nat,
    parse::{self, Flow},
    reject,
};

/// Where the packet entered the node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From a local pod (host side of its veth).
    Pod,
    /// From a node uplink: another node or an external client.
    Netdev,
}

#[inline(always)]
pub fn handle(ctx: &TcContext, origin: Origin) -> i32 {
    let Some(mut flow) = parse::parse(ctx) else {
        // ICMP errors about tracked flows are translated with them; the rest passes.
        return icmp::handle(ctx);
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };

    // A connection-opening SYN is never a reply (and a backend opening a connection to its client
    // must not be reverse-translated): only other packets look for a reply entry.
    let opening = flow.is_tcp() && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(hit) = (!opening).then(|| ct::lookup_reply(&flow, now)).flatten() {
        let rev = hit.value;
        // Keyed by the reply as it arrives, before any rewrite.
        if hit.refresh_peer {
            ct::touch_service(&flow, &rev, now);
        }
        let (daddr, dport) = if rev.nat_addr != 0 {
            (rev.nat_addr, rev.nat_port)
        } else {
            (flow.daddr, flow.dport)
        };
        let r = nat::rewrite(ctx, &mut flow, rev.addr, rev.port, daddr, dport);
        return deliver(ctx, &flow, r);
    }

    let Some(fe) = lb::lookup_frontend(&flow, origin == Origin::Netdev) else {
        return TC_ACT_OK;
    };

    if let Some(hit) = ct::lookup_service(&flow, now) {
        let tracked = hit.value;
        let backend = Backend {
            addr: tracked.addr,
            port: tracked.port,
            _pad: 0,
        };
        if keeps_backend(&flow, &fe, &backend) {
            let snat = (tracked.nat_addr != 0).then_some(Snat {
                addr: tracked.nat_addr,
                port: tracked.nat_port,
            });
            if hit.refresh_peer {
                ct::ensure_reply(&flow, &backend, fe.service_id, snat, now);
            }
            return translate(ctx, &mut flow, &backend, snat);
        }
    }

    // loadBalancerSourceRanges: new connections from other sources are dropped (kube-proxy's
    // KUBE-FW chain; tracked flows above keep going, as conntrack'd ones do there).
    if fe.flags & FRONTEND_F_SOURCE_RANGES != 0 && !lb::source_allowed(fe.service_id, flow.saddr) {
        return TC_ACT_SHOT;
    }

    let backend = match affinity::lookup(&fe, flow.saddr, now) {
        Some(b) => b,
        None => match lb::choose_backend(&fe, flow_hash(&flow)) {
            Some(b) => b,
            None if fe.flags & FRONTEND_F_DROP_WHEN_EMPTY != 0 => return TC_ACT_SHOT,
            None => return reject::reject(ctx, &flow),
        },
    };
    affinity::record(&fe, flow.saddr, &backend, now);
    let masquerade = fe.flags & FRONTEND_F_SNAT_EXTERNAL != 0
        || flow.saddr == backend.addr
        || masquerade_by_config(origin, &fe, flow.saddr);
    let snat_addr = if masquerade { snat_ipv4() } else { 0 };
    match ct::create(&flow, &backend, fe.service_id, snat_addr, now) {
        Ok(snat) => translate(ctx, &mut flow, &backend, snat),
        // No free source port: drop, the client retransmits.
        Err(()) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn translate(ctx: &TcContext, flow: &mut Flow, backend: &Backend, snat: Option<Snat>) -> i32 {
    let (saddr, sport) = snat.map_or((flow.saddr, flow.sport), |s| (s.addr, s.port));
    let r = nat::rewrite(ctx, flow, saddr, sport, backend.addr, backend.port);
    deliver(ctx, flow, r)
}

/// A translated packet goes straight to its egress device (see `fwd`); one whose rewrite failed
/// half-way would be corrupt and is dropped.
#[inline(always)]
fn deliver(ctx: &TcContext, flow: &Flow, r: Result<(), i64>) -> i32 {
    match r {
        Ok(()) => fwd::forward(ctx, flow),
        Err(_) => TC_ACT_SHOT,
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
fn keeps_backend(flow: &Flow, fe: &Frontend, backend: &Backend) -> bool {
    let new_tcp = flow.is_tcp() && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if flow.is_tcp() && !new_tcp {
        return true;
    }
    lb::is_member(fe.service_id, backend)
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
