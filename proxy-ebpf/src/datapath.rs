//! The per-packet flow:
//! 1. not IPv4 TCP/UDP, or a fragment: pass untouched;
//! 2. a reply of a translated flow (reply-direction conntrack hit): reverse NAT, pass;
//! 3. not addressed to a frontend: pass;
//! 4. a tracked flow whose backend is still usable: DNAT to it;
//! 5. no endpoints: reject;
//! 6. otherwise choose a backend (affinity first, else random), track the flow, DNAT.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use orca_common::{Backend, Frontend};
use proxy_ebpf::hdr::{TCP_ACK, TCP_SYN};

use crate::{
    affinity, ct, lb,
    nat::{self, End},
    parse::{self, Flow},
    reject,
};

#[inline(always)]
pub fn handle(ctx: &TcContext) -> i32 {
    let Some(flow) = parse::parse(ctx) else {
        return TC_ACT_OK;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };

    if let Some(rev) = ct::lookup_reply(&flow, now) {
        return verdict(nat::rewrite(ctx, &flow, End::Source, rev.addr, rev.port));
    }

    let Some(fe) = lb::lookup_frontend(&flow) else {
        return TC_ACT_OK;
    };

    if let Some(tracked) = ct::lookup_service(&flow, now) {
        let backend = Backend {
            addr: tracked.addr,
            port: tracked.port,
            _pad: 0,
        };
        if keeps_backend(&flow, &fe, &backend) {
            ct::ensure_reply(&flow, &backend, fe.service_id, now);
            return verdict(nat::rewrite(ctx, &flow, End::Destination, backend.addr, backend.port));
        }
    }

    let backend = match affinity::lookup(&fe, flow.saddr, now) {
        Some(b) => b,
        None => match lb::choose_backend(&fe) {
            Some(b) => b,
            None => return reject::reject(ctx, &flow),
        },
    };
    affinity::record(&fe, flow.saddr, &backend, now);
    ct::create(&flow, &backend, fe.service_id, now);
    verdict(nat::rewrite(ctx, &flow, End::Destination, backend.addr, backend.port))
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
fn verdict(r: Result<(), i64>) -> i32 {
    match r {
        Ok(()) => TC_ACT_OK,
        // A rewrite that failed half-way would send a corrupt packet: drop it.
        Err(_) => TC_ACT_SHOT,
    }
}
