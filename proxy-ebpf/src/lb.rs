//! Load balancing: frontend lookup, backend choice (random, or Maglev) over the frontend's slot range, and
//! backend membership (is this backend still part of the service?).

use aya_ebpf::{helpers::bpf_get_prandom_u32, maps::lpm_trie::Key};
use orca_common::{
    Backend, BackendSlotKey, Frontend, FrontendKey, MemberKey, SrcRangeKey, FRONTEND_F_MAGLEV, MAGLEV_TABLE_SIZE,
    SCOPE_ANY, SCOPE_EXTERNAL,
};

use crate::{fam::Fam, parse::Flow};

/// The frontend the packet is addressed to, if any. Traffic from outside the node prefers a
/// `SCOPE_EXTERNAL` entry.
#[inline(always)]
pub fn lookup_frontend<A: Fam>(flow: &Flow<A>, external: bool) -> Option<Frontend> {
    let mut key = FrontendKey {
        addr: flow.daddr,
        port: flow.dport,
        proto: flow.proto,
        scope: SCOPE_EXTERNAL,
    };
    if external {
        // SAFETY: the value is copied out at once; hash map values stay valid during the program.
        if let Some(fe) = unsafe { A::frontends().get(key) } {
            return Some(*fe);
        }
    }
    key.scope = SCOPE_ANY;
    // SAFETY: as above.
    unsafe { A::frontends().get(key) }.copied()
}

/// A backend of the frontend's current set: uniformly random, or by the Maglev table for
/// `flow_hash` when the frontend asks for it; `None` when it has none or a slot is
/// missing (the agent writes slots before it publishes their count, so that means a bug or a race
/// with a deletion; the caller then treats the frontend as having no endpoints).
#[inline(always)]
pub fn choose_backend<A: Fam>(fe: &Frontend, flow_hash: u32) -> Option<Backend<A>> {
    if fe.backend_count == 0 {
        return None;
    }
    let offset = if fe.flags & FRONTEND_F_MAGLEV != 0 {
        let key = BackendSlotKey {
            service_id: fe.service_id,
            slot: fe.slot_base.wrapping_add(flow_hash % MAGLEV_TABLE_SIZE),
        };
        // SAFETY: copied out at once. A missing table (the agent is writing it) falls back to a
        // random choice rather than failing the connection.
        match unsafe { A::maglev().get(key) }.copied() {
            Some(o) => o,
            // SAFETY: helper without arguments.
            None => (unsafe { bpf_get_prandom_u32() }) % u32::from(fe.backend_count),
        }
    } else {
        // SAFETY: helper without arguments.
        (unsafe { bpf_get_prandom_u32() }) % u32::from(fe.backend_count)
    };
    if offset >= u32::from(fe.backend_count) {
        return None;
    }
    let slot = fe.slot_base.wrapping_add(offset);
    let key = BackendSlotKey {
        service_id: fe.service_id,
        slot,
    };
    // SAFETY: copied out at once.
    unsafe { A::backends().get(key) }.copied()
}

/// Whether `backend` is part of the service's current backend set.
#[inline(always)]
pub fn is_member<A: Fam>(service_id: u32, backend: &Backend<A>) -> bool {
    let key = MemberKey::of(service_id, backend);
    // SAFETY: only presence is checked.
    unsafe { A::members().get(key) }.is_some()
}

/// Whether `saddr` may connect to a frontend of `service_id` restricted by source ranges.
#[inline(always)]
pub fn source_allowed<A: Fam>(service_id: u32, saddr: A) -> bool {
    let key = Key::new(
        32 + A::BITS,
        SrcRangeKey {
            service_id,
            addr: saddr,
        },
    );
    A::src_ranges().get(key).is_some()
}
