//! ClientIP session affinity: a client's new connections to a service go to the backend its
//! previous connection used, while that backend is still a member and the previous connection is
//! younger than the timeout (kube-proxy's `recent` match semantics: the timestamp is refreshed on
//! every new connection).

use orca_common::{AffinityKey, AffinityValue, Backend, Frontend};

use crate::{fam::Fam, lb};

#[inline(always)]
pub fn lookup<A: Fam>(fe: &Frontend, client: A, now_ns: u64) -> Option<Backend<A>> {
    if fe.affinity_timeout == 0 {
        return None;
    }
    let key = AffinityKey {
        service_id: fe.service_id,
        client_addr: client,
    };
    // SAFETY: copied out at once.
    let v = unsafe { A::affinity().get(key) }.copied()?;
    let age = now_ns.saturating_sub(v.last_used_ns());
    if age > u64::from(fe.affinity_timeout) * 1_000_000_000 {
        return None;
    }
    if !lb::is_member(fe.service_id, &v.backend) {
        return None;
    }
    Some(v.backend)
}

#[inline(always)]
pub fn record<A: Fam>(fe: &Frontend, client: A, backend: &Backend<A>, now_ns: u64) {
    if fe.affinity_timeout == 0 {
        return;
    }
    let key = AffinityKey {
        service_id: fe.service_id,
        client_addr: client,
    };
    let value = AffinityValue::new(*backend, now_ns);
    // A full LRU map evicts its oldest entry; an insert can only fail on memory pressure, and then
    // the connection still works, only without affinity.
    let _ = A::affinity().insert(key, value, 0);
}
