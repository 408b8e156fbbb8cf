//! Service ports -> map entries, with the update order that never exposes a half-written Service:
//! new backend slots (and members) first, then the frontend entries switch to them in one map
//! update each, then the old slots (and members that left) are freed.
//!
//! The logic runs over the [`MapOps`] trait: the kernel maps in production, an in-memory model in
//! the unit tests (which check the ordering invariant after every single map operation).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use orca_common::{
    Addr, Backend, BackendSlotKey, Frontend, FrontendKey, In6, MemberKey, MAX_BACKENDS_PER_SERVICE, SCOPE_EXTERNAL,
};

use crate::dataplane::DataplaneConfig;
use crate::model::selection::Categorized;
use crate::model::state::ServicePortState;
use crate::model::{IpFamily, NodeInfo, Protocol, ServicePortName};

/// The two halves of a service's slot space; a new backend set goes to the half not in use.
const SLOT_HALF: u32 = 1 << 16;

/// An address family as the programmer handles it: the map address type and how model addresses convert to it.
pub trait Family: Addr + aya::Pod + Send + Sync {
    const FAMILY: IpFamily;
    /// The address in this family, `None` for the other one.
    fn of(ip: &IpAddr) -> Option<Self>;
    fn to_ip(&self) -> IpAddr;
}

impl Family for u32 {
    const FAMILY: IpFamily = IpFamily::V4;
    fn of(ip: &IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(orca_common::addr_from_octets(a.octets())),
            IpAddr::V6(_) => None,
        }
    }
    fn to_ip(&self) -> IpAddr {
        IpAddr::from(orca_common::addr_octets(*self))
    }
}

impl Family for In6 {
    const FAMILY: IpFamily = IpFamily::V6;
    fn of(ip: &IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(In6::from_octets(a.octets())),
            IpAddr::V4(_) => None,
        }
    }
    fn to_ip(&self) -> IpAddr {
        IpAddr::from(self.octets())
    }
}

/// Map operations the programmer needs (one family's maps). Errors are strings with context (they end up in logs).
pub trait MapOps<A: Family = u32> {
    fn put_frontend(&mut self, k: FrontendKey<A>, v: Frontend) -> anyhow::Result<()>;
    fn del_frontend(&mut self, k: &FrontendKey<A>) -> anyhow::Result<()>;
    fn put_slot(&mut self, k: BackendSlotKey, v: Backend<A>) -> anyhow::Result<()>;
    fn del_slot(&mut self, k: &BackendSlotKey) -> anyhow::Result<()>;
    fn get_slot(&self, k: &BackendSlotKey) -> Option<Backend<A>>;
    fn put_member(&mut self, k: MemberKey<A>, slot: u32) -> anyhow::Result<()>;
    fn del_member(&mut self, k: &MemberKey<A>) -> anyhow::Result<()>;
    fn frontends(&self) -> Vec<(FrontendKey<A>, Frontend)>;
    fn slots(&self) -> Vec<BackendSlotKey>;
    fn members(&self) -> Vec<MemberKey<A>>;
    fn put_maglev(&mut self, k: BackendSlotKey, offset: u32) -> anyhow::Result<()>;
    fn del_maglev(&mut self, k: &BackendSlotKey) -> anyhow::Result<()>;
    fn maglev_keys(&self) -> Vec<BackendSlotKey>;
    fn put_range(&mut self, r: SrcRange<A>) -> anyhow::Result<()>;
    fn del_range(&mut self, r: &SrcRange<A>) -> anyhow::Result<()>;
    fn ranges(&self) -> Vec<SrcRange<A>>;
}

/// One allowed source range of a service id (loadBalancerSourceRanges).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRange<A = u32> {
    pub service_id: u32,
    /// Network address, packet order.
    pub addr: A,
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
enum NewEntry<A: Family> {
    Slot(BackendSlotKey),
    Member(MemberKey<A>),
    Maglev(BackendSlotKey),
    Range(SrcRange<A>),
    Frontend(FrontendKey<A>),
}

/// Takes back what a failed upsert created. Best effort: what cannot be deleted now goes with the next full
/// sync's sweep.
fn take_back<A: Family>(maps: &mut dyn MapOps<A>, written: Vec<NewEntry<A>>) {
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

/// How step 2 of an upsert failed: on a new key (take back what the upsert created) or on an existing one (keep).
enum Failed {
    TakeBack(anyhow::Error),
    Keep(anyhow::Error),
}

/// The backends each set kind the port's frontends use should hold, from `sel`: the port's IPv4 endpoints
/// categorised alone ([`ServicePortState::selected_in`]).
fn wanted_sets<A: Family>(
    st: &ServicePortState,
    sel: &Categorized,
    desired: &BTreeMap<FrontendKey<A>, SetKind>,
) -> BTreeMap<SetKind, Vec<Backend<A>>> {
    let local_or_cluster = |local: bool| if local { &sel.local } else { &sel.cluster };
    let mut wanted = BTreeMap::new();
    for kind in desired.values() {
        wanted.entry(*kind).or_insert_with(|| {
            let eps = match kind {
                SetKind::Internal => local_or_cluster(st.port.internal_policy_local()),
                SetKind::External => local_or_cluster(st.port.external_policy_local()),
                SetKind::ClusterForPods => &sel.cluster,
            };
            backends_of(st.name(), eps)
        });
    }
    wanted
}

/// Writes a set's Maglev table, slots and members (members of backends `current` already had are rewritten with
/// their new slot, not created).
fn write_set<A: Family>(
    maps: &mut dyn MapOps<A>,
    next: &PublishedSet<A>,
    current: Option<&PublishedSet<A>>,
    created: &mut Vec<NewEntry<A>>,
    w: &mut Written,
) -> anyhow::Result<()> {
    if next.maglev {
        let table = super::maglev::table(&next.backends, orca_common::MAGLEV_TABLE_SIZE);
        for (i, offset) in table.iter().enumerate() {
            let key = next.slot(i);
            maps.put_maglev(key, *offset)
                .map_err(|e| e.context("writing a Maglev table"))?;
            created.push(NewEntry::Maglev(key));
        }
        w.entries += table.len();
    }
    for (i, b) in next.backends.iter().enumerate() {
        let slot = next.slot(i);
        maps.put_slot(slot, *b)
            .map_err(|e| e.context("writing a backend slot"))?;
        created.push(NewEntry::Slot(slot));
        let member = MemberKey::of(next.id, b);
        let is_new = !current.is_some_and(|c| c.id == next.id && c.backends.contains(b));
        maps.put_member(member, i as u32)
            .map_err(|e| e.context("writing a backend member"))?;
        if is_new {
            created.push(NewEntry::Member(member));
        }
        w.entries += 2;
    }
    Ok(())
}

/// loadBalancerSourceRanges (IPv4), which restrict the load-balancer IP frontends. Like kube-proxy, when a range
/// holds the node's address, sources equal to the load-balancer IPs (traffic of this node looped back to a local
/// VIP) are allowed too.
struct LbSourceRanges<A: Family> {
    port_be: u16,
    lb_addrs: BTreeSet<A>,
    cidrs: Vec<(A, u8)>,
}

impl<A: Family> LbSourceRanges<A> {
    fn of(st: &ServicePortState, node: &NodeInfo) -> Self {
        let lb_addrs: BTreeSet<A> = st.port.load_balancer_ips.iter().filter_map(A::of).collect();
        let mut cidrs: Vec<(A, u8)> = st
            .port
            .load_balancer_source_ranges
            .iter()
            .filter_map(|c| A::of(&c.addr).map(|a| (a, c.prefix)))
            .collect();
        let allow_node = st
            .port
            .load_balancer_source_ranges
            .iter()
            .any(|c| node.addresses.iter().any(|a| A::of(a).is_some() && c.contains(*a)));
        if !cidrs.is_empty() && allow_node {
            cidrs.extend(lb_addrs.iter().map(|a| (*a, A::BITS as u8)));
        }
        Self {
            port_be: st.port.port.to_be(),
            lb_addrs,
            cidrs,
        }
    }

    /// Whether the ranges restrict frontend `fk` (a load-balancer IP frontend of a port with ranges).
    fn restricts(&self, fk: &FrontendKey<A>) -> bool {
        !self.cidrs.is_empty() && fk.port == self.port_be && self.lb_addrs.contains(&fk.addr)
    }

    /// The range entries the restricted frontends need, keyed by the id of the set each uses (ranges go in before
    /// the frontends that need them).
    fn ranges(&self, desired: &BTreeMap<FrontendKey<A>, SetKind>, entry: &PortEntry<A>) -> BTreeSet<SrcRange<A>> {
        let mut out = BTreeSet::new();
        for (fk, kind) in desired {
            if self.restricts(fk) {
                for (addr, prefix) in &self.cidrs {
                    out.insert(SrcRange {
                        service_id: entry.sets[kind].id,
                        addr: *addr,
                        prefix: *prefix,
                    });
                }
            }
        }
        out
    }
}

/// A frontend's flags: masquerade (external traffic unless externalTrafficPolicy is Local, as kube-proxy does),
/// drop when a selected Service has no endpoints, source ranges, Maglev, ClusterIP.
fn frontend_flags<A: Family>(
    st: &ServicePortState,
    has_any: bool,
    kind: SetKind,
    set: &PublishedSet<A>,
    restricted: bool,
) -> u16 {
    let mut flags = 0;
    if kind == SetKind::External && !st.port.external_policy_local() {
        flags |= orca_common::FRONTEND_F_SNAT_EXTERNAL;
    }
    if has_any {
        flags |= orca_common::FRONTEND_F_DROP_WHEN_EMPTY;
    }
    if restricted {
        flags |= orca_common::FRONTEND_F_SOURCE_RANGES;
    }
    if set.maglev {
        flags |= orca_common::FRONTEND_F_MAGLEV;
    }
    if kind == SetKind::Internal {
        flags |= orca_common::FRONTEND_F_CLUSTER_IP;
    }
    flags
}

/// A backend set as published in the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PublishedSet<A: Family> {
    id: u32,
    base: u32,
    backends: Vec<Backend<A>>,
    /// Whether a Maglev table was written for it.
    maglev: bool,
}

impl<A: Family> PublishedSet<A> {
    /// The key of its `i`th slot (backend, or Maglev table entry).
    fn slot(&self, i: usize) -> BackendSlotKey {
        BackendSlotKey {
            service_id: self.id,
            slot: self.base + i as u32,
        }
    }
}

#[derive(Debug, Clone)]
struct PortEntry<A: Family> {
    sets: VecMap<SetKind, PublishedSet<A>>,
    frontends: VecMap<FrontendKey<A>, SetKind>,
    ranges: BTreeSet<SrcRange<A>>,
}

impl<A: Family> Default for PortEntry<A> {
    fn default() -> Self {
        Self {
            sets: VecMap::default(),
            frontends: VecMap::default(),
            ranges: BTreeSet::new(),
        }
    }
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

/// The programmer of one family's maps: remembers what it published per service port.
#[derive(Debug)]
pub struct Programmer<A: Family = u32> {
    ports: HashMap<ServicePortName, PortEntry<A>>,
    /// Who owns each frontend key (two ports could claim one address:port by misconfiguration).
    owners: HashMap<FrontendKey<A>, ServicePortName>,
    /// Ports refused a frontend another port owns: when the owner lets it go, they are `released` to be
    /// applied again (kube-proxy's rules of the second Service serve the address as soon as the first is gone).
    waiting: HashMap<FrontendKey<A>, BTreeSet<ServicePortName>>,
    released: BTreeSet<ServicePortName>,
    /// Frontends found in pinned maps at start-up, not yet claimed: their service ids and slot
    /// ranges are reused so a restarted agent keeps affinity and switches sets without a gap.
    adoptable: HashMap<FrontendKey<A>, Frontend>,
    used_ids: BTreeSet<u32>,
    next_id: u32,
    /// Choose backends by Maglev consistent hashing instead of at random.
    maglev: bool,
}

impl<A: Family> Default for Programmer<A> {
    fn default() -> Self {
        Self {
            ports: HashMap::new(),
            owners: HashMap::new(),
            waiting: HashMap::new(),
            released: BTreeSet::new(),
            adoptable: HashMap::new(),
            used_ids: BTreeSet::new(),
            next_id: 0,
            maglev: false,
        }
    }
}

impl<A: Family> Programmer<A> {
    /// Starts from whatever the (possibly pinned) maps already hold.
    pub fn adopt(maps: &dyn MapOps<A>) -> Self {
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

    /// Publishes (or updates) one service port, in the order that never exposes a half-written Service:
    /// 1. [`Self::publish_sets`]: new slots and members for every backend set that changed;
    /// 2. [`Self::publish_frontends`]: new source ranges, new frontends, then the existing frontends switch sets;
    /// 3. [`Self::retire`]: what the port no longer uses is deleted.
    ///
    /// A full map refuses only new keys, so a failure in step 1 or among the new keys of step 2 takes back
    /// everything this upsert created and leaves the port as it was (nothing leaks; a retry allocates nothing
    /// twice).
    pub fn upsert(
        &mut self,
        maps: &mut dyn MapOps<A>,
        st: &ServicePortState,
        node: &NodeInfo,
        cfg: &DataplaneConfig,
    ) -> anyhow::Result<Written> {
        let name = st.name().clone();
        self.stop_waiting(&name);
        let proto = match st.port.protocol {
            Protocol::Tcp => orca_common::IPPROTO_TCP,
            Protocol::Udp => orca_common::IPPROTO_UDP,
            Protocol::Sctp => {
                tracing::debug!(service = %name, "SCTP is not handled by the eBPF dataplane");
                return self.remove(maps, &name);
            }
        };
        let desired = frontends_of::<A>(st, proto, node, cfg);
        if desired.is_empty() {
            // Nothing of this port in this family (an IPv4-only Service in the IPv6 maps): no entry at all.
            return self.remove(maps, &name);
        }
        // The Service's annotation wins over the agent-wide choice.
        let maglev = st
            .port
            .load_balancing
            .map_or(self.maglev, |lb| lb == crate::model::LoadBalancing::Maglev);
        // kube-proxy's per-family proxier sees that family's endpoints only.
        let sel = st.selected_in(A::FAMILY, node);
        let wanted = wanted_sets(st, &sel, &desired);
        let previous = self.ports.remove(&name);
        let mut entry = previous.clone().unwrap_or_default();
        let mut w = Written::default();
        let mut created: Vec<NewEntry<A>> = Vec::new();
        let step1 = self.publish_sets(maps, &mut entry, &wanted, &desired, maglev, &mut created, &mut w);
        let to_free = match step1 {
            Ok(to_free) => to_free,
            Err(e) => return Err(self.take_back(maps, created, name, previous, e)),
        };
        let sources = LbSourceRanges::of(st, node);
        let ranges = sources.ranges(&desired, &entry);
        let step2 = self.publish_frontends(
            maps,
            st,
            sel.has_any,
            &entry,
            &desired,
            &sources,
            &ranges,
            &mut created,
            &mut w,
        );
        match step2 {
            Ok(()) => {}
            Err(Failed::TakeBack(e)) => return Err(self.take_back(maps, created, name, previous, e)),
            // An existing frontend could not be switched: earlier ones may use the new sets already, so nothing
            // is taken back; the next full sync rewrites the port.
            Err(Failed::Keep(e)) => return Err(e),
        }
        self.retire(maps, &name, &mut entry, desired, ranges, to_free, &wanted, &mut w)?;
        entry.sets.0.shrink_to_fit();
        self.ports.insert(name, entry);
        Ok(w)
    }

    /// Takes back what a failed upsert created and restores the port's previous entry; returns the error.
    fn take_back(
        &mut self,
        maps: &mut dyn MapOps<A>,
        created: Vec<NewEntry<A>>,
        name: ServicePortName,
        previous: Option<PortEntry<A>>,
        e: anyhow::Error,
    ) -> anyhow::Error {
        take_back(maps, created);
        if let Some(p) = previous {
            self.ports.insert(name, p);
        }
        e
    }

    /// A set this port published before (or, after a restart, the set a pinned frontend of `kind` uses: its id and
    /// slot range are reused so affinity survives and the switch has no gap).
    fn current_set(
        &mut self,
        maps: &dyn MapOps<A>,
        entry: &PortEntry<A>,
        kind: &SetKind,
        desired: &BTreeMap<FrontendKey<A>, SetKind>,
    ) -> Option<PublishedSet<A>> {
        if let Some(set) = entry.sets.get(kind) {
            return Some(set.clone());
        }
        let fe = desired
            .iter()
            .filter(|(_, k)| *k == kind)
            .find_map(|(fk, _)| self.adoptable.get(fk).copied())
            .filter(|fe| !self.used_ids.contains(&fe.service_id))?;
        self.used_ids.insert(fe.service_id);
        Some(PublishedSet {
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
        })
    }

    /// Step 1: every set whose backends changed gets its new slots (in the slot half not in use), members and
    /// Maglev table; `entry` then names the new sets. Returns the sets they replace, freed in step 3.
    #[allow(clippy::too_many_arguments)]
    fn publish_sets(
        &mut self,
        maps: &mut dyn MapOps<A>,
        entry: &mut PortEntry<A>,
        wanted: &BTreeMap<SetKind, Vec<Backend<A>>>,
        desired: &BTreeMap<FrontendKey<A>, SetKind>,
        maglev: bool,
        created: &mut Vec<NewEntry<A>>,
        w: &mut Written,
    ) -> anyhow::Result<Vec<PublishedSet<A>>> {
        let mut to_free = Vec::new();
        for (kind, backends) in wanted {
            let current = self.current_set(maps, entry, kind, desired);
            let maglev = maglev && !backends.is_empty();
            let next = match &current {
                Some(cur) if &cur.backends == backends && cur.maglev == maglev => {
                    entry.sets.insert(*kind, cur.clone());
                    continue;
                }
                Some(cur) => PublishedSet {
                    id: cur.id,
                    base: if cur.base == 0 { SLOT_HALF } else { 0 },
                    backends: backends.clone(),
                    maglev,
                },
                None => PublishedSet {
                    id: self.alloc_id(),
                    base: 0,
                    backends: backends.clone(),
                    maglev,
                },
            };
            write_set(maps, &next, current.as_ref(), created, w)?;
            to_free.extend(current);
            entry.sets.insert(*kind, next);
        }
        Ok(to_free)
    }

    /// Step 2: the source ranges that are new, then every desired frontend this port may own (new keys first),
    /// pointing at `entry`'s sets. A frontend another port owns is refused and waits for it.
    #[allow(clippy::too_many_arguments)]
    fn publish_frontends(
        &mut self,
        maps: &mut dyn MapOps<A>,
        st: &ServicePortState,
        has_any: bool,
        entry: &PortEntry<A>,
        desired: &BTreeMap<FrontendKey<A>, SetKind>,
        sources: &LbSourceRanges<A>,
        ranges: &BTreeSet<SrcRange<A>>,
        created: &mut Vec<NewEntry<A>>,
        w: &mut Written,
    ) -> Result<(), Failed> {
        let name = st.name();
        for r in ranges.difference(&entry.ranges) {
            maps.put_range(*r)
                .map_err(|e| Failed::TakeBack(e.context("writing a source range")))?;
            created.push(NewEntry::Range(*r));
            w.entries += 1;
        }
        let affinity = st
            .port
            .session_affinity
            .map_or(0, |d| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX));
        let mut plan: Vec<(FrontendKey<A>, Frontend)> = Vec::with_capacity(desired.len());
        for (fk, kind) in desired {
            if let Some(owner) = self.owners.get(fk) {
                if owner != name {
                    tracing::warn!(service = %name, owner = %owner, frontend = ?fk, "frontend already used by another service port");
                    self.waiting.entry(*fk).or_default().insert(name.clone());
                    continue;
                }
            }
            let set = &entry.sets[kind];
            let value = Frontend {
                service_id: set.id,
                backend_count: set.backends.len() as u16,
                flags: frontend_flags(st, has_any, *kind, set, sources.restricts(fk)),
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
                return Err(if existed {
                    Failed::Keep(e.context("updating a frontend"))
                } else {
                    Failed::TakeBack(e.context("writing a frontend"))
                });
            }
            if !existed {
                created.push(NewEntry::Frontend(fk));
            }
            w.entries += 1;
        }
        Ok(())
    }

    /// Step 3: the port owns its desired frontends; frontends, source ranges and sets it no longer uses are
    /// deleted, and old slot ranges and members that left are freed.
    #[allow(clippy::too_many_arguments)]
    fn retire(
        &mut self,
        maps: &mut dyn MapOps<A>,
        name: &ServicePortName,
        entry: &mut PortEntry<A>,
        desired: BTreeMap<FrontendKey<A>, SetKind>,
        ranges: BTreeSet<SrcRange<A>>,
        to_free: Vec<PublishedSet<A>>,
        wanted: &BTreeMap<SetKind, Vec<Backend<A>>>,
        w: &mut Written,
    ) -> anyhow::Result<()> {
        for fk in desired.keys() {
            if self.owners.get(fk).is_none_or(|o| o == name) {
                self.adoptable.remove(fk);
                self.owners.insert(*fk, name.clone());
            }
        }
        for fk in entry.frontends.keys() {
            if !desired.contains_key(fk) && self.owners.get(fk) == Some(name) {
                maps.del_frontend(fk)?;
                self.owners.remove(fk);
                self.release(fk);
                w.entries += 1;
            }
        }
        entry.frontends = desired
            .into_iter()
            .filter(|(fk, _)| self.owners.get(fk) == Some(name))
            .collect();
        for r in entry.ranges.difference(&ranges) {
            maps.del_range(r)?;
            w.entries += 1;
        }
        entry.ranges = ranges;
        for old in to_free {
            let keep: BTreeSet<MemberKey<A>> = entry
                .sets
                .values()
                .filter(|s| s.id == old.id)
                .flat_map(|s| s.backends.iter().map(|b| MemberKey::of(s.id, b)))
                .collect();
            w.entries += free_set(maps, &old, &keep)?;
        }
        let unused: Vec<SetKind> = entry.sets.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for kind in unused {
            if let Some(set) = entry.sets.remove(&kind) {
                w.entries += free_set(maps, &set, &BTreeSet::new())?;
                self.used_ids.remove(&set.id);
            }
        }
        Ok(())
    }

    /// Removes a service port: frontends first, then its slots and members.
    pub fn remove(&mut self, maps: &mut dyn MapOps<A>, name: &ServicePortName) -> anyhow::Result<Written> {
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
    fn release(&mut self, fk: &FrontendKey<A>) {
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

    pub fn names_iter(&self) -> impl Iterator<Item = &ServicePortName> {
        self.ports.keys()
    }

    /// Whether `name` is programmed in this family.
    pub fn has(&self, name: &ServicePortName) -> bool {
        self.ports.contains_key(name)
    }

    /// Deletes every entry no published service port accounts for: leftovers of a previous run
    /// (after `full_sync` has claimed what is still desired) or of a failed update.
    pub fn sweep(&mut self, maps: &mut dyn MapOps<A>) -> anyhow::Result<Written> {
        let mut w = Written::default();
        for (fk, _) in maps.frontends() {
            if !self.owners.contains_key(&fk) {
                maps.del_frontend(&fk)?;
                w.entries += 1;
            }
        }
        self.adoptable.clear();
        let mut live_slots: BTreeSet<BackendSlotKey> = BTreeSet::new();
        let mut live_members: BTreeSet<MemberKey<A>> = BTreeSet::new();
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
        let live_ranges: BTreeSet<SrcRange<A>> = self.ports.values().flat_map(|e| e.ranges.iter().copied()).collect();
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

fn free_set<A: Family>(
    maps: &mut dyn MapOps<A>,
    set: &PublishedSet<A>,
    keep: &BTreeSet<MemberKey<A>>,
) -> anyhow::Result<usize> {
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

/// The frontends of a service port on this node, in family `A`.
fn frontends_of<A: Family>(
    st: &ServicePortState,
    proto: u8,
    node: &NodeInfo,
    cfg: &DataplaneConfig,
) -> BTreeMap<FrontendKey<A>, SetKind> {
    let p = &st.port;
    let mut out = BTreeMap::new();
    for ip in p.cluster_ips.iter().filter_map(A::of) {
        out.insert(FrontendKey::of(ip, p.port, proto), SetKind::Internal);
    }
    let local = p.external_policy_local();
    let external = |out: &mut BTreeMap<FrontendKey<A>, SetKind>, key: FrontendKey<A>| {
        if local {
            // Outside clients: local endpoints; local pods: cluster-wide ones.
            out.insert(key.with_scope(SCOPE_EXTERNAL), SetKind::External);
            out.insert(key, SetKind::ClusterForPods);
        } else {
            out.insert(key, SetKind::External);
        }
    };
    for ip in p.load_balancer_ips.iter().chain(&p.external_ips).filter_map(A::of) {
        external(&mut out, FrontendKey::of(ip, p.port, proto));
    }
    if let Some(np) = p.node_port {
        for ip in &node.addresses {
            let Some(a) = A::of(ip) else { continue };
            let allowed = cfg.nodeport_addresses.is_empty() || cfg.nodeport_addresses.iter().any(|c| c.contains(*ip));
            if allowed {
                external(&mut out, FrontendKey::of(a, np, proto));
            }
        }
    }
    out
}

/// The family's endpoints as backends, deduplicated, at most `MAX_BACKENDS_PER_SERVICE`.
fn backends_of<A: Family>(name: &ServicePortName, eps: &[crate::model::Endpoint]) -> Vec<Backend<A>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for ep in eps {
        let Some(a) = A::of(&ep.ip) else { continue };
        let b = Backend {
            addr: a,
            port: ep.port.to_be(),
            _pad: 0,
        };
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
