//! Connection tracking. A translated flow has two entries in the LRU map: the service direction
//! (client -> frontend, value: backend and, for masqueraded flows, the source to use), so later
//! packets keep the backend chosen for the first one, and the reply direction (backend -> client,
//! or backend -> node for masqueraded flows; value: the frontend and the client) for reverse NAT.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use orca_common::{
    ct_tick, Backend, CtKey, CtValue, CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_FIN, CT_F_RST, NAT_PORT_MAX, NAT_PORT_MIN,
};
use proxy_ebpf::hdr::{TCP_FIN, TCP_RST};

use crate::{maps, parse::Flow};

/// bpf_map_update_elem flag: fail when the key exists.
const BPF_NOEXIST: u64 = 1;
/// Random source ports tried before a masqueraded flow gives up (the packet is dropped and the
/// client retransmits).
const NAT_PORT_TRIES: u32 = 16;

/// Source rewrite of a masqueraded flow: (address, port), packet order / network byte order.
#[derive(Clone, Copy)]
pub struct Snat {
    pub addr: u32,
    pub port: u16,
}

#[inline(always)]
fn key(flow: &Flow, dir: u8) -> CtKey {
    CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        dir,
        _pad: 0,
    }
}

/// The reply-direction key of `flow` once translated to `backend` (and masqueraded to `snat`).
#[inline(always)]
fn reply_key(flow: &Flow, backend: &Backend, snat: Option<Snat>) -> CtKey {
    let (daddr, dport) = match snat {
        Some(s) => (s.addr, s.port),
        None => (flow.saddr, flow.sport),
    };
    CtKey {
        saddr: backend.addr,
        daddr,
        sport: backend.port,
        dport,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    }
}

#[inline(always)]
fn reply_value(flow: &Flow, service_id: u32, snat: Option<Snat>, now_ns: u64) -> CtValue {
    let (nat_addr, nat_port) = match snat {
        Some(_) => (flow.saddr, flow.sport),
        None => (0, 0),
    };
    CtValue {
        addr: flow.daddr,
        port: flow.dport,
        nat_port,
        service_id,
        nat_addr,
        flags: 0,
        peer_refreshed: ct_tick(now_ns),
        last_seen_ns: now_ns,
    }
}

/// A live conntrack entry, refreshed by the packet that found it.
pub struct Hit {
    pub value: CtValue,
    /// The other direction's entry is due for its refresh (see `CtValue::peer_refreshed`).
    pub refresh_peer: bool,
}

/// The live service-direction entry of a packet sent to a frontend, refreshed.
#[inline(always)]
pub fn lookup_service(flow: &Flow, now_ns: u64) -> Option<Hit> {
    lookup(flow, &key(flow, CT_DIR_SERVICE), now_ns)
}

/// The live reply-direction entry of a packet sent by a backend, refreshed.
#[inline(always)]
pub fn lookup_reply(flow: &Flow, now_ns: u64) -> Option<Hit> {
    lookup(flow, &key(flow, CT_DIR_REPLY), now_ns)
}

/// An entry idle for longer than its lifetime is dead (as an expired conntrack entry): the packet
/// is treated as untracked and a new flow overwrites it. TCP FIN/RST shorten the lifetime (and
/// are passed on to the other direction at once).
#[inline(always)]
fn lookup(flow: &Flow, key: &CtKey, now_ns: u64) -> Option<Hit> {
    let ptr = maps::CT.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup and stays valid during the program;
    // concurrent updates of last_seen_ns / flags from another CPU are benign.
    unsafe {
        let v = &mut *ptr;
        if now_ns.saturating_sub(v.last_seen_ns) > v.lifetime_ns(flow.proto) {
            return None;
        }
        v.last_seen_ns = now_ns;
        let closing = flow.tcp_flags & (TCP_RST | TCP_FIN) != 0;
        if flow.tcp_flags & TCP_RST != 0 {
            v.flags |= CT_F_RST;
        } else if flow.tcp_flags & TCP_FIN != 0 {
            v.flags |= CT_F_FIN;
        }
        let tick = ct_tick(now_ns);
        let refresh_peer = closing || v.peer_refreshed != tick;
        if refresh_peer {
            v.peer_refreshed = tick;
        }
        Some(Hit {
            value: *v,
            refresh_peer,
        })
    }
}

/// Records that `flow` (client -> frontend) is translated to `backend`, both directions.
/// For a masqueraded flow (`snat_addr` != 0) a free source port is allocated atomically (the reply
/// entry is inserted with BPF_NOEXIST); `None` when no port was free.
#[inline(always)]
pub fn create(
    flow: &Flow,
    backend: &Backend,
    service_id: u32,
    snat_addr: u32,
    now_ns: u64,
) -> Result<Option<Snat>, ()> {
    let snat = if snat_addr != 0 {
        let mut found = None;
        for _ in 0..NAT_PORT_TRIES {
            // SAFETY: helper without arguments.
            let r = unsafe { bpf_get_prandom_u32() };
            let span = u32::from(NAT_PORT_MAX - NAT_PORT_MIN) + 1;
            let port = (NAT_PORT_MIN as u32 + r % span) as u16;
            let s = Snat {
                addr: snat_addr,
                port: port.to_be(),
            };
            let value = reply_value(flow, service_id, Some(s), now_ns);
            if maps::CT
                .insert(reply_key(flow, backend, Some(s)), value, BPF_NOEXIST)
                .is_ok()
            {
                found = Some(s);
                break;
            }
        }
        match found {
            Some(s) => Some(s),
            None => return Err(()),
        }
    } else {
        // Reply entry first: once the service entry exists, replies must find theirs. Inserts
        // into an LRU map evict the oldest entry when full; a failure (memory pressure) leaves
        // the packet translated but untracked, and the next packet tries again.
        let _ = maps::CT.insert(
            reply_key(flow, backend, None),
            reply_value(flow, service_id, None, now_ns),
            0,
        );
        None
    };
    let (nat_addr, nat_port) = snat.map_or((0, 0), |s| (s.addr, s.port));
    let service = CtValue {
        addr: backend.addr,
        port: backend.port,
        nat_port,
        service_id,
        nat_addr,
        flags: 0,
        peer_refreshed: ct_tick(now_ns),
        last_seen_ns: now_ns,
    };
    let _ = maps::CT.insert(key(flow, CT_DIR_SERVICE), service, 0);
    Ok(snat)
}

/// Recreates a missing reply entry of a tracked flow (the LRU may evict one direction only).
#[inline(always)]
pub fn ensure_reply(flow: &Flow, backend: &Backend, service_id: u32, snat: Option<Snat>, now_ns: u64) {
    let rkey = reply_key(flow, backend, snat);
    if let Some(ptr) = maps::CT.get_ptr_mut(rkey) {
        // Traffic in either direction keeps both entries alive, as one conntrack entry would be.
        // SAFETY: pointer from a successful lookup, valid during the program.
        unsafe { (*ptr).last_seen_ns = now_ns };
        return;
    }
    let _ = maps::CT.insert(rkey, reply_value(flow, service_id, snat, now_ns), 0);
}

/// A reply keeps its flow's service-direction entry alive (a silent client of a streaming
/// backend must not lose its backend).
#[inline(always)]
pub fn touch_service(flow: &Flow, rev: &CtValue, now_ns: u64) {
    let (client, client_port) = if rev.nat_addr != 0 {
        (rev.nat_addr, rev.nat_port)
    } else {
        (flow.daddr, flow.dport)
    };
    let skey = CtKey {
        saddr: client,
        daddr: rev.addr,
        sport: client_port,
        dport: rev.port,
        proto: flow.proto,
        dir: CT_DIR_SERVICE,
        _pad: 0,
    };
    if let Some(ptr) = maps::CT.get_ptr_mut(skey) {
        // SAFETY: pointer from a successful lookup, valid during the program.
        unsafe {
            (*ptr).last_seen_ns = now_ns;
            if flow.tcp_flags & TCP_RST != 0 {
                (*ptr).flags |= CT_F_RST;
            } else if flow.tcp_flags & TCP_FIN != 0 {
                (*ptr).flags |= CT_F_FIN;
            }
        }
    }
}
