//! Connection tracking. A translated flow has two entries in the LRU map: the service direction
//! (client -> frontend, value: backend), so later packets keep the backend chosen for the first
//! one, and the reply direction (backend -> client, value: frontend) for reverse NAT.

use orca_common::{Backend, CtKey, CtValue, CT_DIR_REPLY, CT_DIR_SERVICE};

use crate::{maps, parse::Flow};

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

/// The reply-direction key of the flow `flow` once translated to `backend`.
#[inline(always)]
fn reply_key(flow: &Flow, backend: &Backend) -> CtKey {
    CtKey {
        saddr: backend.addr,
        daddr: flow.saddr,
        sport: backend.port,
        dport: flow.sport,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    }
}

/// The service-direction entry of a packet sent to a frontend, refreshed.
#[inline(always)]
pub fn lookup_service(flow: &Flow, now_ns: u64) -> Option<CtValue> {
    lookup(&key(flow, CT_DIR_SERVICE), now_ns)
}

/// The reply-direction entry of a packet sent by a backend, refreshed.
#[inline(always)]
pub fn lookup_reply(flow: &Flow, now_ns: u64) -> Option<CtValue> {
    lookup(&key(flow, CT_DIR_REPLY), now_ns)
}

#[inline(always)]
fn lookup(key: &CtKey, now_ns: u64) -> Option<CtValue> {
    let ptr = maps::CT.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup and stays valid during the program;
    // a concurrent update of last_seen_ns from another CPU is benign.
    unsafe {
        (*ptr).last_seen_ns = now_ns;
        Some(*ptr)
    }
}

/// Records that `flow` (client -> frontend) is translated to `backend`: both directions.
#[inline(always)]
pub fn create(flow: &Flow, backend: &Backend, service_id: u32, now_ns: u64) {
    let service = CtValue {
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
        service_id,
        _pad2: 0,
        last_seen_ns: now_ns,
    };
    let reply = CtValue {
        addr: flow.daddr,
        port: flow.dport,
        _pad: 0,
        service_id,
        _pad2: 0,
        last_seen_ns: now_ns,
    };
    // Reply entry first: once the service entry exists, replies must find theirs. Inserts into an
    // LRU map evict the oldest entry when full; failures (memory pressure) leave the packet
    // translated but untracked, and the next packet tries again.
    let _ = maps::CT.insert(reply_key(flow, backend), reply, 0);
    let _ = maps::CT.insert(key(flow, CT_DIR_SERVICE), service, 0);
}

/// Recreates a missing reply entry of a tracked flow (the LRU may evict one direction only).
#[inline(always)]
pub fn ensure_reply(flow: &Flow, backend: &Backend, service_id: u32, now_ns: u64) {
    let rkey = reply_key(flow, backend);
    if maps::CT.get_ptr(rkey).is_some() {
        return;
    }
    let reply = CtValue {
        addr: flow.daddr,
        port: flow.dport,
        _pad: 0,
        service_id,
        _pad2: 0,
        last_seen_ns: now_ns,
    };
    let _ = maps::CT.insert(rkey, reply, 0);
}
