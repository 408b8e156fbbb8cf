//! Service ports -> map entries, with the update order that never exposes a half-written Service:
//! new backend slots (and members) first, then the frontend entries switch to them in one map
//! update each, then the old slots (and members that left) are freed.
//!
//! The logic runs over the [`MapOps`] trait: the kernel maps in production, an in-memory model in
//! the unit tests (which check the ordering invariant after every single map operation).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use orca_common::{
    Backend, BackendSlotKey, Frontend, FrontendKey, MemberKey, MAX_BACKENDS_PER_SERVICE, SCOPE_EXTERNAL,
};

use crate::dataplane::DataplaneConfig;
use crate::model::state::ServicePortState;
use crate::model::{NodeInfo, Protocol, ServicePortName};

/// The two halves of a service's slot space; a new backend set goes to the half not in use.
const SLOT_HALF: u32 = 1 << 16;

/// Map operations the programmer needs. Errors are strings with context (they end up in logs).
pub trait MapOps {
    fn put_frontend(&mut self, k: FrontendKey, v: Frontend) -> anyhow::Result<()>;
    fn del_frontend(&mut self, k: &FrontendKey) -> anyhow::Result<()>;
    fn put_slot(&mut self, k: BackendSlotKey, v: Backend) -> anyhow::Result<()>;
    fn del_slot(&mut self, k: &BackendSlotKey) -> anyhow::Result<()>;
    fn get_slot(&self, k: &BackendSlotKey) -> Option<Backend>;
    fn put_member(&mut self, k: MemberKey, slot: u32) -> anyhow::Result<()>;
    fn del_member(&mut self, k: &MemberKey) -> anyhow::Result<()>;
    fn frontends(&self) -> Vec<(FrontendKey, Frontend)>;
    fn slots(&self) -> Vec<BackendSlotKey>;
    fn members(&self) -> Vec<MemberKey>;
    fn put_maglev(&mut self, k: BackendSlotKey, offset: u32) -> anyhow::Result<()>;
    fn del_maglev(&mut self, k: &BackendSlotKey) -> anyhow::Result<()>;
    fn maglev_keys(&self) -> Vec<BackendSlotKey>;
    fn put_range(&mut self, r: SrcRange) -> anyhow::Result<()>;
    fn del_range(&mut self, r: &SrcRange) -> anyhow::Result<()>;
    fn ranges(&self) -> Vec<SrcRange>;
}

/// One allowed source range of a service id (loadBalancerSourceRanges).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRange {
    pub service_id: u32,
    /// Network address, packet order.
    pub addr: u32,
    pub prefix: u8,
}

/// Which endpoints a frontend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetKind {
    /// ClusterIPs: internal endpoints (iTP).
    Internal,
    /// NodePorts, load-balancer IPs, external IPs: external endpoints (eTP).
    External,
    /// The same external addresses for local pods when eTP=Local: cluster-wide endpoints.
    ClusterForPods,
}

/// A map entry an upsert created (taken back if the upsert fails).
enum NewEntry {
    Slot(BackendSlotKey),
    Member(MemberKey),
    Maglev(BackendSlotKey),
    Range(SrcRange),
    Frontend(FrontendKey),
}

/// Takes back what a failed upsert created. Best effort: what cannot be deleted now goes with the next full
/// sync's sweep.
fn take_back(maps: &mut dyn MapOps, written: Vec<NewEntry>) {
    for k in written.into_iter().rev() {
        let _ = match k {
            NewEntry::Slot(k) => maps.del_slot(&k),
            NewEntry::Member(k) => maps.del_member(&k),
            NewEntry::Maglev(k) => maps.del_maglev(&k),
            NewEntry::Range(r) => maps.del_range(&r),
            NewEntry::Frontend(k) => maps.del_frontend(&k),
        };
    }
}

/// A backend set as published in the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PublishedSet {
    id: u32,
    base: u32,
    backends: Vec<Backend>,
    /// Whether a Maglev table was written for it.
    maglev: bool,
}

#[derive(Debug, Default, Clone)]
struct PortEntry {
    sets: VecMap<SetKind, PublishedSet>,
    frontends: VecMap<FrontendKey, SetKind>,
    ranges: BTreeSet<SrcRange>,
}

/// A map as a sorted vector: a port has one to a few sets and frontends, and a one-entry BTreeMap allocates a
/// whole node (eleven slots) for them; this is kept for every service port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VecMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<K: Ord, V> VecMap<K, V> {
    fn find(&self, k: &K) -> Result<usize, usize> {
        self.0.binary_search_by(|(x, _)| x.cmp(k))
    }
    fn get(&self, k: &K) -> Option<&V> {
        self.find(k).ok().map(|i| &self.0[i].1)
    }
    fn insert(&mut self, k: K, v: V) {
        match self.find(&k) {
            Ok(i) => self.0[i].1 = v,
            Err(i) => self.0.insert(i, (k, v)),
        }
    }
    fn remove(&mut self, k: &K) -> Option<V> {
        self.find(k).ok().map(|i| self.0.remove(i).1)
    }
    fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }
    fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }
}

impl<K: Ord, V> std::ops::Index<&K> for VecMap<K, V> {
    type Output = V;
    fn index(&self, k: &K) -> &V {
        self.get(k).expect("VecMap: no such key")
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for VecMap<K, V> {
    /// Later duplicates win, as in a BTreeMap.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(it: I) -> Self {
        let mut m = Self::default();
        for (k, v) in it {
            m.insert(k, v);
        }
        m.0.shrink_to_fit();
        m
    }
}

/// What a sync wrote, for stats.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub entries: usize,
}

/// The programmer: remembers what it published per service port.
#[derive(Debug, Default)]
pub struct Programmer {
    ports: HashMap<ServicePortName, PortEntry>,
    /// Who owns each frontend key (two ports could claim one address:port by misconfiguration).
    owners: HashMap<FrontendKey, ServicePortName>,
    /// Ports refused a frontend another port owns: when the owner lets it go, they are `released` to be
    /// applied again (kube-proxy's rules of the second Service serve the address as soon as the first is gone).
    waiting: HashMap<FrontendKey, BTreeSet<ServicePortName>>,
    released: BTreeSet<ServicePortName>,
    /// Frontends found in pinned maps at start-up, not yet claimed: their service ids and slot
    /// ranges are reused so a restarted agent keeps affinity and switches sets without a gap.
    adoptable: HashMap<FrontendKey, Frontend>,
    used_ids: BTreeSet<u32>,
    next_id: u32,
    /// Choose backends by Maglev consistent hashing instead of at random.
    maglev: bool,
}

impl Programmer {
    /// Starts from whatever the (possibly pinned) maps already hold.
    pub fn adopt(maps: &dyn MapOps) -> Self {
        let adoptable: HashMap<_, _> = maps.frontends().into_iter().collect();
        let max_id = adoptable.values().map(|f| f.service_id).max().unwrap_or(0);
        let max_slot_id = maps.slots().iter().map(|s| s.service_id).max().unwrap_or(0);
        Self {
            adoptable,
            next_id: max_id.max(max_slot_id) + 1,
            ..Self::default()
        }
    }

    /// Use Maglev consistent hashing for every service (new backend sets get a table).
    pub fn with_maglev(mut self, on: bool) -> Self {
        self.maglev = on;
        self
    }

    pub fn service_ports(&self) -> usize {
        self.ports.len()
    }

    fn alloc_id(&mut self) -> u32 {
        loop {
            let id = self.next_id.max(1);
            self.next_id = id.wrapping_add(1).max(1);
            if !self.used_ids.contains(&id) && !self.adoptable.values().any(|f| f.service_id == id) {
                self.used_ids.insert(id);
                return id;
            }
        }
    }

    /// Publishes (or updates) one service port.
    pub fn upsert(
        &mut self,
        maps: &mut dyn MapOps,
        st: &ServicePortState,
        node: &NodeInfo,
        cfg: &DataplaneConfig,
    ) -> anyhow::Result<Written> {
        let name = st.name().clone();
        self.stop_waiting(&name);
        let mut w = Written::default();
        let proto = match st.port.protocol {
            Protocol::Tcp => orca_common::IPPROTO_TCP,
            Protocol::Udp => orca_common::IPPROTO_UDP,
            Protocol::Sctp => {
                tracing::debug!(service = %name, "SCTP is not handled by the eBPF dataplane");
                return self.remove(maps, &name);
            }
        };
        let desired_frontends = frontends_of(st, proto, node, cfg);
        let affinity = st
            .port
            .session_affinity
            .map_or(0, |d| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX));
        // The Service's annotation wins over the agent-wide choice.
        let maglev = st
            .port
            .load_balancing
            .map_or(self.maglev, |lb| lb == crate::model::LoadBalancing::Maglev);
        let mut wanted_sets: BTreeMap<SetKind, Vec<Backend>> = BTreeMap::new();
        for kind in desired_frontends.values() {
            wanted_sets.entry(*kind).or_insert_with(|| {
                let eps = match kind {
                    SetKind::Internal => st.internal_endpoints(),
                    SetKind::External => st.external_endpoints(),
                    SetKind::ClusterForPods => &st.selected.cluster,
                };
                backends_of(&name, eps)
            });
        }

        let previous = self.ports.remove(&name);
        let mut entry = previous.clone().unwrap_or_default();
        // 1. New slots and members for every set whose backends changed. A failure here (a full map) takes back
        //    what this step wrote and leaves the port as it was: its frontends still use the old sets.
        let mut to_free: Vec<PublishedSet> = Vec::new();
        let mut written: Vec<NewEntry> = Vec::new();
        let mut failure: Option<anyhow::Error> = None;
        'sets: for (kind, backends) in &wanted_sets {
            let current = entry.sets.get(kind).cloned().or_else(|| {
                // A restarted agent: reuse the id and slot range a pinned frontend of this set uses.
                desired_frontends
                    .iter()
                    .filter(|(_, k)| *k == kind)
                    .find_map(|(fk, _)| self.adoptable.get(fk).copied())
                    .filter(|fe| !self.used_ids.contains(&fe.service_id))
                    .map(|fe| {
                        self.used_ids.insert(fe.service_id);
                        PublishedSet {
                            id: fe.service_id,
                            base: fe.slot_base,
                            backends: (0..u32::from(fe.backend_count))
                                .filter_map(|i| {
                                    maps.get_slot(&BackendSlotKey {
                                        service_id: fe.service_id,
                                        slot: fe.slot_base.wrapping_add(i),
                                    })
                                })
                                .collect(),
                            // Unknown: rewritten (with a table if wanted) on the first change.
                            maglev: fe.flags & orca_common::FRONTEND_F_MAGLEV != 0,
                        }
                    })
            });
            let next = match &current {
                Some(cur) if &cur.backends == backends && cur.maglev == (maglev && !backends.is_empty()) => {
                    entry.sets.insert(*kind, cur.clone());
                    continue;
                }
                Some(cur) => PublishedSet {
                    id: cur.id,
                    base: if cur.base == 0 { SLOT_HALF } else { 0 },
                    backends: backends.clone(),
                    maglev: maglev && !backends.is_empty(),
                },
                None => PublishedSet {
                    id: self.alloc_id(),
                    base: 0,
                    backends: backends.clone(),
                    maglev: maglev && !backends.is_empty(),
                },
            };
            if next.maglev {
                let table = super::maglev::table(&next.backends, orca_common::MAGLEV_TABLE_SIZE);
                for (i, offset) in table.iter().enumerate() {
                    let key = BackendSlotKey {
                        service_id: next.id,
                        slot: next.base + i as u32,
                    };
                    if let Err(e) = maps.put_maglev(key, *offset) {
                        failure = Some(e.context("writing a Maglev table"));
                        break 'sets;
                    }
                    written.push(NewEntry::Maglev(key));
                }
                w.entries += table.len();
            }
            for (i, b) in next.backends.iter().enumerate() {
                let slot = BackendSlotKey {
                    service_id: next.id,
                    slot: next.base + i as u32,
                };
                if let Err(e) = maps.put_slot(slot, *b) {
                    failure = Some(e.context("writing a backend slot"));
                    break 'sets;
                }
                written.push(NewEntry::Slot(slot));
                let member = MemberKey::of(next.id, b);
                let is_new = !current
                    .as_ref()
                    .is_some_and(|c| c.id == next.id && c.backends.contains(b));
                if let Err(e) = maps.put_member(member, i as u32) {
                    failure = Some(e.context("writing a backend member"));
                    break 'sets;
                }
                if is_new {
                    written.push(NewEntry::Member(member));
                }
                w.entries += 2;
            }
            if let Some(cur) = current {
                to_free.push(cur);
            }
            entry.sets.insert(*kind, next);
        }
        if let Some(e) = failure {
            take_back(maps, written);
            if let Some(p) = previous {
                self.ports.insert(name, p);
            }
            return Err(e);
        }

        // loadBalancerSourceRanges (IPv4) restrict the load-balancer IP frontends. Like kube-proxy,
        // when a range holds the node's address, sources equal to the load-balancer IPs (traffic
        // of this node looped back to a local VIP) are allowed too. Ranges go in before the
        // frontends that need them.
        let lb_addrs: BTreeSet<u32> = st
            .port
            .load_balancer_ips
            .iter()
            .filter_map(v4)
            .map(|a| orca_common::addr_from_octets(a.octets()))
            .collect();
        let mut cidrs: Vec<(u32, u8)> = st
            .port
            .load_balancer_source_ranges
            .iter()
            .filter_map(|c| v4(&c.addr).map(|a| (orca_common::addr_from_octets(a.octets()), c.prefix)))
            .collect();
        let allow_node = st
            .port
            .load_balancer_source_ranges
            .iter()
            .any(|c| node.addresses.iter().any(|a| a.is_ipv4() && c.contains(*a)));
        if !cidrs.is_empty() && allow_node {
            cidrs.extend(lb_addrs.iter().map(|a| (*a, 32)));
        }
        let is_lb = |fk: &FrontendKey| fk.port == st.port.port.to_be() && lb_addrs.contains(&fk.addr);
        let mut ranges = BTreeSet::new();
        if !cidrs.is_empty() {
            for (fk, kind) in &desired_frontends {
                if is_lb(fk) {
                    for (addr, prefix) in &cidrs {
                        ranges.insert(SrcRange {
                            service_id: entry.sets[kind].id,
                            addr: *addr,
                            prefix: *prefix,
                        });
                    }
                }
            }
        }
        // 2. New source ranges, then new frontends, then the port's existing frontends switch to the new sets. A
        //    full map refuses only new keys (an update of an existing key needs no room), so a failure among the
        //    new ones takes back everything this upsert created and leaves the port as it was; nothing leaks and
        //    a retry allocates nothing twice.
        for r in ranges.difference(&entry.ranges) {
            if let Err(e) = maps.put_range(*r) {
                take_back(maps, written);
                if let Some(p) = previous {
                    self.ports.insert(name, p);
                }
                return Err(e.context("writing a source range"));
            }
            written.push(NewEntry::Range(*r));
            w.entries += 1;
        }
        let mut plan: Vec<(FrontendKey, Frontend)> = Vec::with_capacity(desired_frontends.len());
        for (fk, kind) in &desired_frontends {
            let set = &entry.sets[kind];
            if let Some(owner) = self.owners.get(fk) {
                if owner != &name {
                    tracing::warn!(service = %name, owner = %owner, frontend = ?fk, "frontend already used by another service port");
                    self.waiting.entry(*fk).or_default().insert(name.clone());
                    continue;
                }
            }
            // kube-proxy masquerades external traffic unless externalTrafficPolicy is Local.
            let mut flags = if *kind == SetKind::External && !st.port.external_policy_local() {
                orca_common::FRONTEND_F_SNAT_EXTERNAL
            } else {
                0
            };
            if st.selected.has_any {
                flags |= orca_common::FRONTEND_F_DROP_WHEN_EMPTY;
            }
            if !cidrs.is_empty() && is_lb(fk) {
                flags |= orca_common::FRONTEND_F_SOURCE_RANGES;
            }
            if set.maglev {
                flags |= orca_common::FRONTEND_F_MAGLEV;
            }
            if *kind == SetKind::Internal {
                flags |= orca_common::FRONTEND_F_CLUSTER_IP;
            }
            let value = Frontend {
                service_id: set.id,
                backend_count: set.backends.len() as u16,
                flags,
                affinity_timeout: affinity,
                slot_base: set.base,
            };
            plan.push((*fk, value));
        }
        // New keys first (`false` sorts first); a key pinned by a previous agent counts as existing.
        plan.sort_by_key(|(fk, _)| entry.frontends.get(fk).is_some() || self.adoptable.contains_key(fk));
        for (fk, value) in plan {
            let existed = entry.frontends.get(&fk).is_some() || self.adoptable.contains_key(&fk);
            if let Err(e) = maps.put_frontend(fk, value) {
                if existed {
                    return Err(e.context("updating a frontend"));
                }
                take_back(maps, written);
                if let Some(p) = previous {
                    self.ports.insert(name, p);
                }
                return Err(e.context("writing a frontend"));
            }
            if !existed {
                written.push(NewEntry::Frontend(fk));
            }
            w.entries += 1;
        }
        for fk in desired_frontends.keys() {
            if self.owners.get(fk).is_none_or(|o| o == &name) {
                self.adoptable.remove(fk);
                self.owners.insert(*fk, name.clone());
            }
        }
        for fk in entry.frontends.keys() {
            if !desired_frontends.contains_key(fk) && self.owners.get(fk) == Some(&name) {
                maps.del_frontend(fk)?;
                self.owners.remove(fk);
                self.release(fk);
                w.entries += 1;
            }
        }
        entry.frontends = desired_frontends
            .into_iter()
            .filter(|(fk, _)| self.owners.get(fk) == Some(&name))
            .collect();

        for r in entry.ranges.difference(&ranges) {
            maps.del_range(r)?;
            w.entries += 1;
        }
        entry.ranges = ranges;

        // 3. Free old slot ranges and members that left; drop sets no frontend uses any more.
        for old in to_free {
            let keep: BTreeSet<MemberKey> = entry
                .sets
                .values()
                .filter(|s| s.id == old.id)
                .flat_map(|s| s.backends.iter().map(|b| MemberKey::of(s.id, b)))
                .collect();
            w.entries += free_set(maps, &old, &keep)?;
        }
        let unused: Vec<SetKind> = entry
            .sets
            .keys()
            .filter(|k| !wanted_sets.contains_key(k))
            .copied()
            .collect();
        for kind in unused {
            if let Some(set) = entry.sets.remove(&kind) {
                w.entries += free_set(maps, &set, &BTreeSet::new())?;
                self.used_ids.remove(&set.id);
            }
        }
        entry.sets.0.shrink_to_fit();
        self.ports.insert(name, entry);
        Ok(w)
    }

    /// Removes a service port: frontends first, then its slots and members.
    pub fn remove(&mut self, maps: &mut dyn MapOps, name: &ServicePortName) -> anyhow::Result<Written> {
        let mut w = Written::default();
        self.stop_waiting(name);
        let Some(entry) = self.ports.remove(name) else {
            return Ok(w);
        };
        for fk in entry.frontends.keys() {
            if self.owners.get(fk) == Some(name) {
                maps.del_frontend(fk)?;
                self.owners.remove(fk);
                self.release(fk);
                w.entries += 1;
            }
        }
        for r in &entry.ranges {
            maps.del_range(r)?;
            w.entries += 1;
        }
        for set in entry.sets.values() {
            w.entries += free_set(maps, set, &BTreeSet::new())?;
            self.used_ids.remove(&set.id);
        }
        Ok(w)
    }

    /// `name` no longer waits for any frontend (it is being applied again, or removed).
    fn stop_waiting(&mut self, name: &ServicePortName) {
        if !self.waiting.is_empty() {
            self.waiting.retain(|_, w| {
                w.remove(name);
                !w.is_empty()
            });
        }
    }

    /// The owner of `fk` let it go: the ports waiting for it are to be applied again.
    fn release(&mut self, fk: &FrontendKey) {
        if let Some(w) = self.waiting.remove(fk) {
            self.released.extend(w);
        }
    }

    /// Ports that were refused a frontend now free: apply them again (from the desired state).
    pub fn take_released(&mut self) -> BTreeSet<ServicePortName> {
        std::mem::take(&mut self.released)
    }

    pub fn names(&self) -> Vec<ServicePortName> {
        self.ports.keys().cloned().collect()
    }

    /// Deletes every entry no published service port accounts for: leftovers of a previous run
    /// (after `full_sync` has claimed what is still desired) or of a failed update.
    pub fn sweep(&mut self, maps: &mut dyn MapOps) -> anyhow::Result<Written> {
        let mut w = Written::default();
        for (fk, _) in maps.frontends() {
            if !self.owners.contains_key(&fk) {
                maps.del_frontend(&fk)?;
                w.entries += 1;
            }
        }
        self.adoptable.clear();
        let mut live_slots: BTreeSet<BackendSlotKey> = BTreeSet::new();
        let mut live_members: BTreeSet<MemberKey> = BTreeSet::new();
        for entry in self.ports.values() {
            for set in entry.sets.values() {
                for (i, b) in set.backends.iter().enumerate() {
                    live_slots.insert(BackendSlotKey {
                        service_id: set.id,
                        slot: set.base + i as u32,
                    });
                    live_members.insert(MemberKey::of(set.id, b));
                }
            }
        }
        for k in maps.slots() {
            if !live_slots.contains(&k) {
                maps.del_slot(&k)?;
                w.entries += 1;
            }
        }
        for k in maps.members() {
            if !live_members.contains(&k) {
                maps.del_member(&k)?;
                w.entries += 1;
            }
        }
        let mut live_tables: BTreeSet<(u32, u32)> = BTreeSet::new();
        for entry in self.ports.values() {
            for set in entry.sets.values().filter(|s| s.maglev) {
                live_tables.insert((set.id, set.base));
            }
        }
        for k in maps.maglev_keys() {
            let base = if k.slot >= SLOT_HALF { SLOT_HALF } else { 0 };
            if !live_tables.contains(&(k.service_id, base)) {
                maps.del_maglev(&k)?;
                w.entries += 1;
            }
        }
        let live_ranges: BTreeSet<SrcRange> = self.ports.values().flat_map(|e| e.ranges.iter().copied()).collect();
        for r in maps.ranges() {
            // The cluster CIDRs (CLUSTER_CIDR_ID) belong to the dataplane's configuration.
            if r.service_id != orca_common::CLUSTER_CIDR_ID && !live_ranges.contains(&r) {
                maps.del_range(&r)?;
                w.entries += 1;
            }
        }
        Ok(w)
    }
}

fn free_set(maps: &mut dyn MapOps, set: &PublishedSet, keep: &BTreeSet<MemberKey>) -> anyhow::Result<usize> {
    let mut n = 0;
    if set.maglev {
        for i in 0..orca_common::MAGLEV_TABLE_SIZE {
            maps.del_maglev(&BackendSlotKey {
                service_id: set.id,
                slot: set.base + i,
            })?;
        }
        n += orca_common::MAGLEV_TABLE_SIZE as usize;
    }
    for (i, b) in set.backends.iter().enumerate() {
        maps.del_slot(&BackendSlotKey {
            service_id: set.id,
            slot: set.base + i as u32,
        })?;
        let mk = MemberKey::of(set.id, b);
        if !keep.contains(&mk) {
            maps.del_member(&mk)?;
        }
        n += 1;
    }
    Ok(n)
}

fn v4(ip: &IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    }
}

/// The frontends of a service port on this node (IPv4).
fn frontends_of(
    st: &ServicePortState,
    proto: u8,
    node: &NodeInfo,
    cfg: &DataplaneConfig,
) -> BTreeMap<FrontendKey, SetKind> {
    let p = &st.port;
    let mut out = BTreeMap::new();
    for ip in p.cluster_ips.iter().filter_map(v4) {
        out.insert(FrontendKey::new(ip.octets(), p.port, proto), SetKind::Internal);
    }
    let local = p.external_policy_local();
    let external = |out: &mut BTreeMap<FrontendKey, SetKind>, key: FrontendKey| {
        if local {
            // Outside clients: local endpoints; local pods: cluster-wide ones.
            out.insert(key.with_scope(SCOPE_EXTERNAL), SetKind::External);
            out.insert(key, SetKind::ClusterForPods);
        } else {
            out.insert(key, SetKind::External);
        }
    };
    for ip in p.load_balancer_ips.iter().chain(&p.external_ips).filter_map(v4) {
        external(&mut out, FrontendKey::new(ip.octets(), p.port, proto));
    }
    if let Some(np) = p.node_port {
        for ip in &node.addresses {
            let Some(a) = v4(ip) else { continue };
            let allowed = cfg.nodeport_addresses.is_empty() || cfg.nodeport_addresses.iter().any(|c| c.contains(*ip));
            if allowed {
                external(&mut out, FrontendKey::new(a.octets(), np, proto));
            }
        }
    }
    out
}

/// IPv4 endpoints as backends, deduplicated, at most `MAX_BACKENDS_PER_SERVICE`.
fn backends_of(name: &ServicePortName, eps: &[crate::model::Endpoint]) -> Vec<Backend> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for ep in eps {
        let Some(a) = v4(&ep.ip) else { continue };
        let b = Backend::new(a.octets(), ep.port);
        if seen.insert((b.addr, b.port)) {
            out.push(b);
        }
    }
    if out.len() > MAX_BACKENDS_PER_SERVICE as usize {
        tracing::warn!(service = %name, endpoints = out.len(), "too many endpoints; using the first {MAX_BACKENDS_PER_SERVICE}");
        out.truncate(MAX_BACKENDS_PER_SERVICE as usize);
    }
    out
}
