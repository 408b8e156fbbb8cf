//! Connection tracking, modelled on the kernel's conntrack: per-state idle lifetimes (SYN sent, established,
//! closing, time-wait, reset; UDP single-packet and stream), entries that are never evicted to make room (a plain
//! hash map: when it is full, new flows are dropped and counted, established ones live on), expired entries
//! taken over by new flows and deleted by the agent's collector.
//!
//! A flow has up to three entries (`CT_DIR_*` in orca-common), each keyed by the packets that look it up and each
//! holding the whole flow, so that every packet needs one lookup and any entry can reach the others:
//! - `SERVICE` (client -> frontend, TC ingress): the backend chosen for the flow, and its masquerade address;
//! - `REPLY` (backend -> client or masquerade address, TC ingress): replies of masqueraded flows get their client
//!   back before the node's stack sees them (with netfilter bypassed: every reply is translated back whole here);
//! - `INNER` (client <-> backend, TC egress): what the stack forwarded gets its masquerade source (client side)
//!   or its frontend source back (backend side).
//!
//! Each entry is refreshed by the packets that hit it; it refreshes the flow's other entries (and re-creates a
//! missing one) at most once per tick and whenever the flow's state changes, so that all of them expire together
//! (a silent client of a streaming backend keeps its flow, and a masquerade port is held exactly as long as its
//! flow lives).

use aya_ebpf::helpers::bpf_get_prandom_u32;
use orca_common::{
    ct_tick, Backend, CtKey, CtValue, CT_DIR_INNER, CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT,
    CT_F_RST, CT_F_SEEN_REPLY, IPPROTO_TCP, REASON_CT_FULL, REASON_NO_SNAT_PORT,
};
use proxy_ebpf::hdr::{TCP_FIN, TCP_RST};

use crate::{
    cfg,
    fam::Fam,
    parse::{Flow, Tuple},
};

/// bpf_map_update_elem flags.
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;
const EEXIST: i32 = 17;
/// Source ports tried for a new masqueraded flow before it is dropped (the client retransmits).
const NAT_PORT_TRIES: u32 = 32;

/// The key of `flow` in the role `dir` (`CT_DIR_SERVICE` / `CT_DIR_REPLY`: the packet's own tuple; `CT_DIR_INNER`:
/// canonical).
#[inline(always)]
pub fn key<A: Fam>(flow: &Flow<A>, dir: u8) -> CtKey<A> {
    if dir == CT_DIR_INNER {
        return CtKey::inner(flow.saddr, flow.sport, flow.daddr, flow.dport, flow.proto);
    }
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

/// A live entry: a pointer into the map (no copy of the value: IPv6 values are 96 bytes of a 512-byte stack).
pub struct Hit<A: Fam> {
    ptr: *mut CtValue<A>,
}

impl<A: Fam> Hit<A> {
    /// The entry as it is now.
    #[inline(always)]
    pub fn value(&self) -> &CtValue<A> {
        // SAFETY: the pointer comes from a successful lookup and stays valid during the program (hash map values
        // are freed after an RCU grace period).
        unsafe { &*self.ptr }
    }
}

/// The live entry under `key`; an expired one is a miss (its packet starts a new flow, which takes it over).
#[inline(always)]
pub fn lookup<A: Fam>(key: &CtKey<A>, now_ns: u64) -> Option<Hit<A>> {
    let ptr = A::ct().get_ptr_mut(key)?;
    // SAFETY: as in `Hit::value`.
    if unsafe { (*ptr).expired(key.proto, now_ns, &cfg::timeouts()) } {
        return None;
    }
    Some(Hit { ptr })
}

/// Records a packet of the flow (sent by the client when `from_client`, else by the backend) in the entry it hit:
/// the time and the state it leads to; refreshes the flow's other entries when due.
#[inline(always)]
pub fn observe<A: Fam>(hit: &mut Hit<A>, dir: u8, flow: &Flow<A>, from_client: bool, now_ns: u64) {
    let (old_flags, old_tick) = {
        let v = hit.value();
        (v.flags, v.peer_refreshed)
    };
    let mut flags = old_flags;
    if !from_client {
        flags |= CT_F_SEEN_REPLY;
    }
    if flow.is_tcp() {
        if flow.tcp_flags & TCP_RST != 0 {
            flags |= CT_F_RST;
        } else if flow.tcp_flags & TCP_FIN != 0 {
            flags |= if from_client { CT_F_FIN_CLIENT } else { CT_F_FIN_BACKEND };
        }
    }
    let tick = ct_tick(now_ns);
    let refresh = flags != old_flags || old_tick != tick;
    // SAFETY: pointer from a successful lookup, valid during the program; a concurrent update from another CPU
    // is benign (both write the time of a packet of this flow, and state bits only accumulate).
    unsafe {
        (*hit.ptr).last_seen_ns = now_ns;
        (*hit.ptr).flags |= flags;
        if refresh {
            (*hit.ptr).peer_refreshed = tick;
        }
    }
    if refresh {
        refresh_peers(hit.value(), dir, flow.proto, now_ns);
    }
}

/// Keeps the flow's other entries alive with `v`'s time and state, re-creating a missing one. An entry that now
/// belongs to another flow (its tuple was taken over) is left alone.
#[inline(always)]
fn refresh_peers<A: Fam>(v: &CtValue<A>, own: u8, proto: u8, now_ns: u64) {
    let bypass = cfg::bypass_netfilter();
    if own != CT_DIR_SERVICE {
        touch(&v.service_key(proto), v, now_ns);
    }
    if own != CT_DIR_REPLY && (!v.nat_addr.is_zero() || bypass) {
        touch(&v.reply_key(proto), v, now_ns);
    }
    if own != CT_DIR_INNER && !bypass {
        touch(&v.inner_key(proto), v, now_ns);
    }
}

#[inline(always)]
fn touch<A: Fam>(key: &CtKey<A>, v: &CtValue<A>, now_ns: u64) {
    match A::ct().get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup, valid during the program.
        Some(p) => unsafe {
            if (*p).same_flow(v) {
                (*p).last_seen_ns = now_ns;
                (*p).flags |= v.flags;
            }
        },
        None => {
            // Deleted (by the collector, racing with this packet): re-created. A full map leaves it missing; the
            // next refresh tries again.
            let _ = A::ct().insert(key, v, BPF_NOEXIST);
        }
    }
}

/// Forgets the flow `v` before a new flow takes its client tuple (a new connection reusing the 5-tuple of a
/// closed one, or a flow moving off a backend that left): its other entries go with it, as the kernel's conntrack
/// drops the whole entry when a SYN reopens a closed connection's tuple, so late packets of the old connection (its
/// backend's retransmitted FIN) are not translated into the new one; its masquerade port is given back at once.
#[inline(always)]
pub fn release<A: Fam>(v: &CtValue<A>, proto: u8) {
    let bypass = cfg::bypass_netfilter();
    if !v.nat_addr.is_zero() || bypass {
        forget(&v.reply_key(proto), v);
    }
    if !bypass {
        forget(&v.inner_key(proto), v);
    }
}

/// Deletes the entry under `key` if it is `v`'s flow's (not a newer flow's that took the tuple over).
#[inline(always)]
fn forget<A: Fam>(key: &CtKey<A>, v: &CtValue<A>) {
    // SAFETY: the value is compared at once.
    if unsafe { A::ct().get(key) }.is_some_and(|r| r.same_flow(v)) {
        let _ = A::ct().remove(key);
    }
}

/// Tracks the new flow `flow` (client -> frontend) to `backend`, masqueraded to `snat_addr` unless that is 0: a
/// masquerade port is allocated, then the entries are written. Returns what the packet becomes; `Err(reason)`
/// when the map is full or no port was free (the packet is dropped; the client retransmits).
// The value is passed by reference on purpose: `*v` would copy it (96 bytes for IPv6) onto the stack.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn create<A: Fam>(
    flow: &Flow<A>,
    backend: &Backend<A>,
    service_id: u32,
    snat_addr: A,
    now_ns: u64,
) -> Result<Tuple<A>, u32> {
    let mut local = CtValue::default();
    let Some(v) = A::ct_scratch(&mut local) else {
        return Err(REASON_CT_FULL);
    };
    *v = CtValue {
        client_addr: flow.saddr,
        frontend_addr: flow.daddr,
        backend_addr: backend.addr,
        nat_addr: A::default(),
        client_port: flow.sport,
        frontend_port: flow.dport,
        backend_port: backend.port,
        nat_port: 0,
        service_id,
        flags: 0,
        peer_refreshed: ct_tick(now_ns),
        _pad: 0,
        last_seen_ns: now_ns,
    };
    let proto = flow.proto;
    let bypass = cfg::bypass_netfilter();
    let ct = A::ct();
    if !snat_addr.is_zero() {
        allocate_port(v, proto, snat_addr, flow.is_opening(), now_ns)?;
    } else if bypass && ct.insert(v.reply_key(proto), &*v, BPF_ANY).is_err() {
        return Err(REASON_CT_FULL);
    }
    let has_reply = !snat_addr.is_zero() || bypass;
    if !bypass && ct.insert(v.inner_key(proto), &*v, BPF_ANY).is_err() {
        if has_reply {
            let _ = ct.remove(v.reply_key(proto));
        }
        return Err(REASON_CT_FULL);
    }
    if ct.insert(v.service_key(proto), &*v, BPF_ANY).is_err() {
        if has_reply {
            let _ = ct.remove(v.reply_key(proto));
        }
        if !bypass {
            let _ = ct.remove(v.inner_key(proto));
        }
        return Err(REASON_CT_FULL);
    }
    Ok(translation(CT_DIR_SERVICE, v, &flow.tuple()))
}

/// Finds a masquerade source port for `v` towards its backend and claims it by writing the flow's reply entry
/// (whose key is backend -> masquerade address and port): inserted when the tuple is free, or taken over when
/// its flow is over: expired, or a closed TCP connection of the same client address and port that this packet
/// opens again (the kernel's conntrack lets a SYN of the same tuple replace a TIME_WAIT entry, and never gives a
/// tuple still tracked to another flow: the backend may still hold the old connection in TIME_WAIT, and a late
/// segment of it would reach the new one). The client's own port is tried first (as the kernel's masquerade
/// does), then random ones.
// Key and value are passed by reference on purpose: copies would go on the stack on every try (and cost the verifier
// dearly in the IPv6 loop).
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn allocate_port<A: Fam>(v: &mut CtValue<A>, proto: u8, snat_addr: A, opening: bool, now_ns: u64) -> Result<(), u32> {
    let ports = cfg::nat_ports();
    let timeouts = cfg::timeouts();
    v.nat_addr = snat_addr;
    let own = u16::from_be(v.client_port);
    // The reply key (`CtValue::reply_key` of a masqueraded flow), built once; only its port changes per try.
    let mut key = CtKey {
        saddr: v.backend_addr,
        daddr: snat_addr,
        sport: v.backend_port,
        dport: 0,
        proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    for i in 0..NAT_PORT_TRIES {
        let port = if i == 0 && ports.contains(own) {
            own
        } else {
            // SAFETY: helper without arguments.
            ports.port(unsafe { bpf_get_prandom_u32() })
        };
        v.nat_port = port.to_be();
        key.dport = v.nat_port;
        // `&*v`: the value is passed where it lives (a copy would put it on the stack on every try).
        match A::ct().insert(&key, &*v, BPF_NOEXIST) {
            Ok(()) => return Ok(()),
            Err(e) if e == -EEXIST => {
                // SAFETY: the entry is only read, at once.
                let reusable = unsafe { A::ct().get(&key) }.is_some_and(|old| {
                    old.reclaimable(proto, now_ns, &timeouts)
                        || (opening
                            && proto == IPPROTO_TCP
                            && old.tcp_closed()
                            && old.client_addr == v.client_addr
                            && old.client_port == v.client_port)
                });
                if reusable && A::ct().insert(&key, &*v, BPF_EXIST).is_ok() {
                    return Ok(());
                }
            }
            Err(_) => return Err(REASON_CT_FULL),
        }
    }
    Err(REASON_NO_SNAT_PORT)
}

/// The flow an ICMP error is about, found as the packets of the flow are (the quote reversed, `rev`, is the tuple they
/// have at this hook): at ingress its service or reply entry, at egress its inner entry. The entry's role and hit.
#[inline(always)]
pub fn related<A: Fam>(rev: &Tuple<A>, proto: u8, egress: bool) -> Option<(u8, Hit<A>)> {
    // The clock is read only for ICMP errors (not for every other non-TCP/UDP frame).
    // SAFETY: helper without arguments.
    let now_ns = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    if egress {
        if cfg::bypass_netfilter() {
            return None;
        }
        let k = CtKey::inner(rev.saddr, rev.sport, rev.daddr, rev.dport, proto);
        return Some((CT_DIR_INNER, lookup(&k, now_ns)?));
    }
    let mut key = CtKey {
        saddr: rev.saddr,
        daddr: rev.daddr,
        sport: rev.sport,
        dport: rev.dport,
        proto,
        dir: CT_DIR_SERVICE,
        _pad: 0,
    };
    if let Some(hit) = lookup(&key, now_ns) {
        return Some((CT_DIR_SERVICE, hit));
    }
    key.dir = CT_DIR_REPLY;
    Some((CT_DIR_REPLY, lookup(&key, now_ns)?))
}

/// What a packet with `t` becomes through the flow `v` whose entry `dir` it hit (the same rule translates the
/// packets of the flow and the packets that ICMP errors quote):
/// - `SERVICE`: to the backend (and, with netfilter bypassed, from the masquerade address);
/// - `REPLY`: to the client (and, with netfilter bypassed, from the frontend);
/// - `INNER`: from the masquerade address when the client sent it, from the frontend when the backend did.
#[inline(always)]
pub fn translation<A: Fam>(dir: u8, v: &CtValue<A>, t: &Tuple<A>) -> Tuple<A> {
    let bypass = cfg::bypass_netfilter();
    let mut out = *t;
    if dir == CT_DIR_SERVICE {
        out.daddr = v.backend_addr;
        out.dport = v.backend_port;
        if bypass && !v.nat_addr.is_zero() {
            out.saddr = v.nat_addr;
            out.sport = v.nat_port;
        }
    } else if dir == CT_DIR_REPLY {
        out.daddr = v.client_addr;
        out.dport = v.client_port;
        if bypass {
            out.saddr = v.frontend_addr;
            out.sport = v.frontend_port;
        }
    } else if from_client(v, t) {
        if !v.nat_addr.is_zero() {
            out.saddr = v.nat_addr;
            out.sport = v.nat_port;
        }
    } else {
        out.saddr = v.frontend_addr;
        out.sport = v.frontend_port;
    }
    out
}

/// Whether a packet with `t` was sent by the flow's client (for `INNER` hits, which serve both directions).
#[inline(always)]
pub fn from_client<A: Fam>(v: &CtValue<A>, t: &Tuple<A>) -> bool {
    t.saddr == v.client_addr && t.sport == v.client_port
}
