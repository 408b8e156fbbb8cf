//! Unit tests of the map programmer over an in-memory model of the maps that checks, after every
//! single map operation, that no frontend can reach a missing slot or a slot whose backend is not
//! a member: the "never a half-written Service" guarantee.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use orca_common::{addr_from_octets, Backend, BackendSlotKey, Frontend, FrontendKey, MemberKey};

use super::services::{MapOps, Programmer, SrcRange};
use crate::dataplane::DataplaneConfig;
use crate::model::state::ServicePortState;
use crate::model::{Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName, TrafficPolicy};

/// The key of a frontend's `i`-th slot (of its backends, or of its Maglev table).
fn slot_key(f: &Frontend, i: u32) -> BackendSlotKey {
    BackendSlotKey {
        service_id: f.service_id,
        slot: f.slot_base + i,
    }
}

#[derive(Default, Clone)]
struct FakeMaps {
    fe: BTreeMap<FrontendKey, Frontend>,
    slots: BTreeMap<BackendSlotKey, Backend>,
    members: BTreeSet<MemberKey>,
    ranges: BTreeSet<SrcRange>,
    maglev: BTreeMap<BackendSlotKey, u32>,
    ops: usize,
    /// Capacity of the slot map (None: unbounded); a new key beyond it fails as a full BPF map does.
    slot_cap: Option<usize>,
    /// The same for the frontend and source-range maps.
    fe_cap: Option<usize>,
    range_cap: Option<usize>,
}

impl FakeMaps {
    fn check(&self) {
        for (k, f) in &self.fe {
            if f.flags & orca_common::FRONTEND_F_SOURCE_RANGES != 0 {
                assert!(
                    self.ranges.iter().any(|r| r.service_id == f.service_id),
                    "op {}: frontend {k:?} restricted by source ranges it does not have",
                    self.ops
                );
            }
            if f.flags & orca_common::FRONTEND_F_MAGLEV != 0 {
                for i in 0..orca_common::MAGLEV_TABLE_SIZE {
                    let o = self
                        .maglev
                        .get(&slot_key(f, i))
                        .unwrap_or_else(|| panic!("op {}: frontend {k:?} uses a missing Maglev entry {i}", self.ops));
                    assert!(
                        *o < u32::from(f.backend_count),
                        "op {}: Maglev offset out of range",
                        self.ops
                    );
                }
            }
            for i in 0..u32::from(f.backend_count) {
                let sk = slot_key(f, i);
                let b = self
                    .slots
                    .get(&sk)
                    .unwrap_or_else(|| panic!("op {}: frontend {k:?} reaches missing slot {sk:?}", self.ops));
                assert!(
                    self.members.contains(&MemberKey::of(f.service_id, b)),
                    "op {}: slot {sk:?} holds a non-member",
                    self.ops
                );
            }
        }
    }
    fn op(&mut self) -> anyhow::Result<()> {
        self.ops += 1;
        self.check();
        Ok(())
    }
}

impl MapOps for FakeMaps {
    fn put_frontend(&mut self, k: FrontendKey, v: Frontend) -> anyhow::Result<()> {
        if self.fe_cap.is_some_and(|cap| self.fe.len() >= cap) && !self.fe.contains_key(&k) {
            anyhow::bail!("`bpf_map_update_elem` failed: Argument list too long (os error 7)");
        }
        self.fe.insert(k, v);
        self.op()
    }
    fn del_frontend(&mut self, k: &FrontendKey) -> anyhow::Result<()> {
        self.fe.remove(k);
        self.op()
    }
    fn put_slot(&mut self, k: BackendSlotKey, v: Backend) -> anyhow::Result<()> {
        if self.slot_cap.is_some_and(|cap| self.slots.len() >= cap) && !self.slots.contains_key(&k) {
            anyhow::bail!("`bpf_map_update_elem` failed: Argument list too long (os error 7)");
        }
        self.slots.insert(k, v);
        self.op()
    }
    fn del_slot(&mut self, k: &BackendSlotKey) -> anyhow::Result<()> {
        self.slots.remove(k);
        self.op()
    }
    fn get_slot(&self, k: &BackendSlotKey) -> Option<Backend> {
        self.slots.get(k).copied()
    }
    fn put_member(&mut self, k: MemberKey, _slot: u32) -> anyhow::Result<()> {
        self.members.insert(k);
        self.op()
    }
    fn del_member(&mut self, k: &MemberKey) -> anyhow::Result<()> {
        self.members.remove(k);
        self.op()
    }
    fn frontends(&self) -> Vec<(FrontendKey, Frontend)> {
        self.fe.iter().map(|(k, v)| (*k, *v)).collect()
    }
    fn slots(&self) -> Vec<BackendSlotKey> {
        self.slots.keys().copied().collect()
    }
    fn members(&self) -> Vec<MemberKey> {
        self.members.iter().copied().collect()
    }
    fn put_maglev(&mut self, k: BackendSlotKey, offset: u32) -> anyhow::Result<()> {
        self.maglev.insert(k, offset);
        // Checking all frontends after each of the ~1000 table writes is slow; count only.
        self.ops += 1;
        Ok(())
    }
    fn del_maglev(&mut self, k: &BackendSlotKey) -> anyhow::Result<()> {
        self.maglev.remove(k);
        self.ops += 1;
        Ok(())
    }
    fn maglev_keys(&self) -> Vec<BackendSlotKey> {
        self.maglev.keys().copied().collect()
    }
    fn put_range(&mut self, r: SrcRange) -> anyhow::Result<()> {
        if self.range_cap.is_some_and(|cap| self.ranges.len() >= cap) && !self.ranges.contains(&r) {
            anyhow::bail!("`bpf_map_update_elem` failed: Argument list too long (os error 7)");
        }
        self.ranges.insert(r);
        self.op()
    }
    fn del_range(&mut self, r: &SrcRange) -> anyhow::Result<()> {
        self.ranges.remove(r);
        self.op()
    }
    fn ranges(&self) -> Vec<SrcRange> {
        self.ranges.iter().copied().collect()
    }
}

fn name(n: &str) -> ServicePortName {
    ServicePortName::new("ns", n, "http", Protocol::Tcp)
}

fn port(n: &str, vip: &str) -> ServicePort {
    ServicePort::new(name(n), vip.parse().unwrap(), 80)
}

/// A ready endpoint on port 8080, on this node (`node-a`) when `local`, else on `node-b`.
fn ep(ip: &str, local: bool) -> Endpoint {
    Endpoint::new(ip.parse().unwrap(), 8080).on_node(if local { "node-a" } else { "node-b" }, local)
}

fn node() -> NodeInfo {
    NodeInfo::new(
        "node-a",
        vec!["192.168.50.10".parse().unwrap(), "fd00::10".parse().unwrap()],
    )
}

fn state(p: ServicePort, eps: Vec<Endpoint>) -> ServicePortState {
    ServicePortState::new(p, eps, &node())
}

fn fk(ip: &str, port: u16) -> FrontendKey {
    let a: Ipv4Addr = ip.parse().unwrap();
    FrontendKey::new(a.octets(), port, orca_common::IPPROTO_TCP)
}

/// The backends a frontend currently resolves to, as "ip" strings.
fn resolve(m: &FakeMaps, k: &FrontendKey) -> Vec<String> {
    let f = m.fe.get(k).expect("frontend present");
    let mut v: Vec<String> = (0..u32::from(f.backend_count))
        .map(|i| {
            let b = m.slots[&slot_key(f, i)];
            Ipv4Addr::from(orca_common::addr_octets(b.addr)).to_string()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn endpoint_changes_switch_sets_without_ever_exposing_a_partial_one() {
    let mut m = FakeMaps::default();
    let mut p = Programmer::default();
    let cfg = DataplaneConfig::default();
    let vip = fk("10.96.0.10", 80);
    let steps: Vec<Vec<&str>> = vec![
        vec!["10.244.1.1", "10.244.1.2"],
        vec!["10.244.1.1", "10.244.1.2", "10.244.1.3"],
        vec!["10.244.1.3"],
        vec!["10.244.2.1", "10.244.2.2", "10.244.2.3", "10.244.2.4"],
        vec![],
        vec!["10.244.1.1"],
    ];
    for ips in steps {
        let eps = ips.iter().map(|ip| ep(ip, false)).collect();
        p.upsert(&mut m, &state(port("web", "10.96.0.10"), eps), &node(), &cfg)
            .unwrap();
        let mut want: Vec<String> = ips.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(resolve(&m, &vip), want);
        // Nothing stale is left: exactly one slot and one member per backend.
        assert_eq!(m.slots.len(), ips.len());
        assert_eq!(m.members.len(), ips.len());
    }
    assert_eq!(m.fe[&vip].backend_count, 1);
    p.remove(&mut m, &name("web")).unwrap();
    assert!(m.fe.is_empty() && m.slots.is_empty() && m.members.is_empty());
}

#[test]
fn frontends_per_kind_and_external_policy_local() {
    let mut m = FakeMaps::default();
    let mut p = Programmer::default();
    let mut sp = port("np", "10.96.0.20");
    sp.node_port = Some(30080);
    sp.external_ips = vec!["203.0.113.7".parse().unwrap()];
    sp.load_balancer_ips = vec!["198.51.100.9".parse().unwrap(), "2001:db8::9".parse().unwrap()];
    sp.external_policy = TrafficPolicy::Local;
    sp.session_affinity = Some(Duration::from_secs(600));
    let eps = vec![ep("10.244.1.1", true), ep("10.244.2.1", false)];
    p.upsert(&mut m, &state(sp, eps), &node(), &DataplaneConfig::default())
        .unwrap();
    // ClusterIP: every endpoint. NodePort on the node's IPv4 address, external and LB IPs: for
    // traffic from outside (SCOPE_EXTERNAL) local endpoints only (eTP=Local); for local pods
    // (SCOPE_ANY) every endpoint, as kube-proxy short-circuits pod traffic. IPv6 is not programmed.
    assert_eq!(resolve(&m, &fk("10.96.0.20", 80)), ["10.244.1.1", "10.244.2.1"]);
    for k in [
        fk("192.168.50.10", 30080),
        fk("203.0.113.7", 80),
        fk("198.51.100.9", 80),
    ] {
        let ext = k.with_scope(orca_common::SCOPE_EXTERNAL);
        assert_eq!(resolve(&m, &ext), ["10.244.1.1"], "{ext:?}");
        assert_eq!(resolve(&m, &k), ["10.244.1.1", "10.244.2.1"], "{k:?}");
        // eTP=Local: the client address is kept, no masquerade.
        assert_eq!(m.fe[&ext].flags & orca_common::FRONTEND_F_SNAT_EXTERNAL, 0);
    }
    assert_eq!(m.fe.len(), 7);
    assert!(m.fe.values().all(|f| f.affinity_timeout == 600));
    // Usable endpoints exist: an empty set would mean "none for this policy here", so drop.
    assert!(m
        .fe
        .values()
        .all(|f| f.flags & orca_common::FRONTEND_F_DROP_WHEN_EMPTY != 0));
    // Internal, external and cluster-for-pods sets have distinct ids.
    let ids: BTreeSet<u32> = m.fe.values().map(|f| f.service_id).collect();
    assert_eq!(ids.len(), 3);
}

#[test]
fn external_policy_cluster_masquerades_and_no_endpoints_rejects() {
    let mut m = FakeMaps::default();
    let mut p = Programmer::default();
    let mut sp = port("np", "10.96.0.22");
    sp.node_port = Some(30082);
    p.upsert(
        &mut m,
        &state(sp.clone(), vec![ep("10.244.2.1", false)]),
        &node(),
        &DataplaneConfig::default(),
    )
    .unwrap();
    let np = fk("192.168.50.10", 30082);
    assert_eq!(m.fe.len(), 2, "one ClusterIP and one NodePort entry, no scoped ones");
    assert_ne!(m.fe[&np].flags & orca_common::FRONTEND_F_SNAT_EXTERNAL, 0);
    assert_eq!(
        m.fe[&fk("10.96.0.22", 80)].flags & orca_common::FRONTEND_F_SNAT_EXTERNAL,
        0
    );
    // No endpoints at all: reject (no drop flag).
    p.upsert(&mut m, &state(sp, vec![]), &node(), &DataplaneConfig::default())
        .unwrap();
    assert!(m.fe.values().all(|f| f.backend_count == 0));
    assert!(m
        .fe
        .values()
        .all(|f| f.flags & orca_common::FRONTEND_F_DROP_WHEN_EMPTY == 0));
}

#[test]
fn a_dual_stack_port_without_ipv4_endpoints_rejects_on_ipv4() {
    // IPv6 endpoints only: kube-proxy's IPv4 proxier sees no endpoint and REJECTs; a drop would time out.
    let mut m = FakeMaps::default();
    let mut p = Programmer::default();
    let mut sp = port("ds", "10.96.0.23");
    sp.cluster_ips.push("fd00:96::23".parse().unwrap());
    let v6_only = state(sp.clone(), vec![ep("fd00:244:2::1", false)]);
    p.upsert(&mut m, &v6_only, &node(), &DataplaneConfig::default())
        .unwrap();
    let f = m.fe[&fk("10.96.0.23", 80)];
    assert_eq!(
        (f.backend_count, f.flags & orca_common::FRONTEND_F_DROP_WHEN_EMPTY),
        (0, 0)
    );
    // With an IPv4 endpoint as well, IPv4 traffic goes to it alone.
    let both = state(sp, vec![ep("10.244.2.1", false), ep("fd00:244:2::1", false)]);
    p.upsert(&mut m, &both, &node(), &DataplaneConfig::default()).unwrap();
    assert_eq!(resolve(&m, &fk("10.96.0.23", 80)), ["10.244.2.1"]);
}

#[test]
fn nodeport_addresses_restrict_node_port_frontends() {
    let mut m = FakeMaps::default();
    let mut p = Programmer::default();
    let mut sp = port("np", "10.96.0.21");
    sp.node_port = Some(30081);
    let n = NodeInfo {
        addresses: vec!["192.168.50.10".parse().unwrap(), "10.0.0.10".parse().unwrap()],
        ..node()
    };
    let cfg = DataplaneConfig {
        nodeport_addresses: vec![crate::model::Cidr::new("10.0.0.0".parse().unwrap(), 8).unwrap()],
        ..DataplaneConfig::default()
    };
    p.upsert(
        &mut m,
        &ServicePortState::new(sp, vec![ep("10.244.1.1", false)], &n),
        &n,
        &cfg,
    )
    .unwrap();
    assert!(m.fe.contains_key(&fk("10.0.0.10", 30081)));
    assert!(!m.fe.contains_key(&fk("192.168.50.10", 30081)));
}

#[test]
fn a_shared_external_ip_is_handed_over_when_its_owner_goes() {
    let mut m = FakeMaps::default();
    let mut p = Programmer::default();
    let cfg = DataplaneConfig::default();
    let mut a = port("first", "10.96.0.41");
    a.external_ips = vec!["203.0.113.9".parse().unwrap()];
    let mut b = port("second", "10.96.0.42");
    b.external_ips = vec!["203.0.113.9".parse().unwrap()];
    let sa = state(a, vec![ep("10.244.1.1", false)]);
    let sb = state(b, vec![ep("10.244.1.2", false)]);
    p.upsert(&mut m, &sa, &node(), &cfg).unwrap();
    p.upsert(&mut m, &sb, &node(), &cfg).unwrap();
    // The first claimant keeps the address; the second waits for it.
    assert_eq!(resolve(&m, &fk("203.0.113.9", 80)), ["10.244.1.1"]);
    assert!(p.take_released().is_empty());
    p.remove(&mut m, sa.name()).unwrap();
    let released = p.take_released();
    assert_eq!(released.iter().collect::<Vec<_>>(), [sb.name()]);
    p.upsert(&mut m, &sb, &node(), &cfg).unwrap();
    assert_eq!(resolve(&m, &fk("203.0.113.9", 80)), ["10.244.1.2"]);
    // A waiting port that went away is not handed anything.
    let mut c = port("third", "10.96.0.43");
    c.external_ips = vec!["203.0.113.9".parse().unwrap()];
    let sc = state(c, vec![ep("10.244.1.3", false)]);
    p.upsert(&mut m, &sc, &node(), &cfg).unwrap();
    p.remove(&mut m, sc.name()).unwrap();
    p.remove(&mut m, sb.name()).unwrap();
    assert!(p.take_released().is_empty());
    assert!(!m.fe.contains_key(&fk("203.0.113.9", 80)));
}

#[test]
fn a_node_address_change_moves_node_port_frontends() {
    let mut m = FakeMaps::default();
    let mut p = Programmer::default();
    let cfg = DataplaneConfig::default();
    let mut sp = port("np", "10.96.0.22");
    sp.node_port = Some(30082);
    let before = NodeInfo {
        addresses: vec!["192.168.50.10".parse().unwrap()],
        ..node()
    };
    let st = ServicePortState::new(sp.clone(), vec![ep("10.244.1.1", false)], &before);
    p.upsert(&mut m, &st, &before, &cfg).unwrap();
    assert!(m.fe.contains_key(&fk("192.168.50.10", 30082)));
    // The same state re-applied (what the tracker's diff does after the Node's addresses changed).
    let after = NodeInfo {
        addresses: vec!["192.168.50.11".parse().unwrap()],
        ..node()
    };
    p.upsert(&mut m, &st, &after, &cfg).unwrap();
    assert!(m.fe.contains_key(&fk("192.168.50.11", 30082)));
    assert!(
        !m.fe.contains_key(&fk("192.168.50.10", 30082)),
        "the old address's NodePort stayed"
    );
}

#[test]
fn a_restarted_programmer_adopts_ids_and_sweeps_leftovers() {
    let mut m = FakeMaps::default();
    let cfg = DataplaneConfig::default();
    let mut first = Programmer::default();
    first
        .upsert(
            &mut m,
            &state(port("a", "10.96.0.30"), vec![ep("10.244.1.1", false)]),
            &node(),
            &cfg,
        )
        .unwrap();
    first
        .upsert(
            &mut m,
            &state(port("gone", "10.96.0.31"), vec![ep("10.244.1.9", false)]),
            &node(),
            &cfg,
        )
        .unwrap();
    let id_a = m.fe[&fk("10.96.0.30", 80)].service_id;

    // A new agent: adopts the maps, the desired state only has "a", with one more endpoint.
    let mut second = Programmer::adopt(&m);
    let ops_before = m.ops;
    second
        .upsert(
            &mut m,
            &state(port("a", "10.96.0.30"), vec![ep("10.244.1.1", false)]),
            &node(),
            &cfg,
        )
        .unwrap();
    // Unchanged backends: only the frontend entry is rewritten (same id and slots).
    assert_eq!(m.ops - ops_before, 1);
    assert_eq!(m.fe[&fk("10.96.0.30", 80)].service_id, id_a);
    second
        .upsert(
            &mut m,
            &state(
                port("a", "10.96.0.30"),
                vec![ep("10.244.1.1", false), ep("10.244.1.2", false)],
            ),
            &node(),
            &cfg,
        )
        .unwrap();
    assert_eq!(m.fe[&fk("10.96.0.30", 80)].service_id, id_a);
    assert_eq!(resolve(&m, &fk("10.96.0.30", 80)), ["10.244.1.1", "10.244.1.2"]);
    // "gone" is still there until the sweep of the full sync removes it.
    assert!(m.fe.contains_key(&fk("10.96.0.31", 80)));
    second.sweep(&mut m).unwrap();
    assert!(!m.fe.contains_key(&fk("10.96.0.31", 80)));
    assert_eq!(m.slots.len(), 2);
    assert_eq!(m.members.len(), 2);
    // New ids never collide with adopted ones.
    second
        .upsert(
            &mut m,
            &state(port("b", "10.96.0.32"), vec![ep("10.244.1.3", false)]),
            &node(),
            &cfg,
        )
        .unwrap();
    assert_ne!(m.fe[&fk("10.96.0.32", 80)].service_id, id_a);
    assert_eq!(
        m.members
            .iter()
            .filter(|k| k.addr == addr_from_octets([10, 244, 1, 3]))
            .count(),
        1
    );
}

#[test]
fn load_balancer_source_ranges_restrict_only_load_balancer_frontends() {
    let mut m = FakeMaps::default();
    let mut p = Programmer::default();
    let mut sp = port("lb", "10.96.0.40");
    sp.node_port = Some(30040);
    sp.load_balancer_ips = vec!["198.51.100.40".parse().unwrap()];
    sp.load_balancer_source_ranges = vec![
        crate::model::Cidr::new("203.0.113.0".parse().unwrap(), 24).unwrap(),
        crate::model::Cidr::new("2001:db8::".parse().unwrap(), 32).unwrap(),
    ];
    let eps = vec![ep("10.244.1.1", false)];
    p.upsert(
        &mut m,
        &state(sp.clone(), eps.clone()),
        &node(),
        &DataplaneConfig::default(),
    )
    .unwrap();
    let lb = &m.fe[&fk("198.51.100.40", 80)];
    assert_ne!(lb.flags & orca_common::FRONTEND_F_SOURCE_RANGES, 0);
    for other in [fk("10.96.0.40", 80), fk("192.168.50.10", 30040)] {
        assert_eq!(
            m.fe[&other].flags & orca_common::FRONTEND_F_SOURCE_RANGES,
            0,
            "{other:?}"
        );
    }
    // The IPv4 range only; the node (192.168.50.10) is not in it, so no LB-IP source entry.
    let want = SrcRange {
        service_id: lb.service_id,
        addr: addr_from_octets([203, 0, 113, 0]),
        prefix: 24,
    };
    assert_eq!(m.ranges.iter().copied().collect::<Vec<_>>(), [want]);

    // A range holding the node address also lets the LB IP itself through (looped-back traffic).
    sp.load_balancer_source_ranges = vec![crate::model::Cidr::new("192.168.50.0".parse().unwrap(), 24).unwrap()];
    p.upsert(
        &mut m,
        &state(sp.clone(), eps.clone()),
        &node(),
        &DataplaneConfig::default(),
    )
    .unwrap();
    assert_eq!(m.ranges.len(), 2);
    assert!(m
        .ranges
        .iter()
        .any(|r| r.addr == addr_from_octets([198, 51, 100, 40]) && r.prefix == 32));

    // Ranges removed: the flag goes, then the entries.
    sp.load_balancer_source_ranges = vec![];
    p.upsert(&mut m, &state(sp, eps), &node(), &DataplaneConfig::default())
        .unwrap();
    assert_eq!(
        m.fe[&fk("198.51.100.40", 80)].flags & orca_common::FRONTEND_F_SOURCE_RANGES,
        0
    );
    assert!(m.ranges.is_empty());
}

#[test]
fn maglev_tables_switch_with_their_backend_sets() {
    let mut m = FakeMaps::default();
    let mut p = Programmer::default().with_maglev(true);
    let cfg = DataplaneConfig::default();
    let vip = fk("10.96.0.50", 80);
    for ips in [
        vec!["10.244.1.1", "10.244.1.2", "10.244.1.3"],
        vec!["10.244.1.1", "10.244.1.3"],
        vec![],
    ] {
        let eps = ips.iter().map(|ip| ep(ip, false)).collect();
        p.upsert(&mut m, &state(port("mg", "10.96.0.50"), eps), &node(), &cfg)
            .unwrap();
        m.check();
        let f = m.fe[&vip];
        let expect_table = !ips.is_empty();
        assert_eq!(f.flags & orca_common::FRONTEND_F_MAGLEV != 0, expect_table);
        // Exactly one table (the live one) remains.
        let want = if expect_table {
            orca_common::MAGLEV_TABLE_SIZE as usize
        } else {
            0
        };
        assert_eq!(m.maglev.len(), want);
    }
    p.remove(&mut m, &name("mg")).unwrap();
    assert!(m.maglev.is_empty());
}

#[test]
fn the_load_balancing_annotation_overrides_the_agent_default() {
    use crate::model::LoadBalancing;
    let cfg = DataplaneConfig::default();
    let eps = || vec![ep("10.244.1.1", false), ep("10.244.1.2", false)];
    let maglev_flag = |m: &FakeMaps, ip: &str| m.fe[&fk(ip, 80)].flags & orca_common::FRONTEND_F_MAGLEV != 0;
    for agent_maglev in [false, true] {
        let mut m = FakeMaps::default();
        let mut p = Programmer::default().with_maglev(agent_maglev);
        let mut annotated_maglev = port("a", "10.96.0.60");
        annotated_maglev.load_balancing = Some(LoadBalancing::Maglev);
        let mut annotated_random = port("b", "10.96.0.61");
        annotated_random.load_balancing = Some(LoadBalancing::Random);
        let plain = port("c", "10.96.0.62");
        for sp in [annotated_maglev, annotated_random, plain] {
            p.upsert(&mut m, &state(sp, eps()), &node(), &cfg).unwrap();
            m.check();
        }
        assert!(maglev_flag(&m, "10.96.0.60"), "agent maglev={agent_maglev}");
        assert!(!maglev_flag(&m, "10.96.0.61"), "agent maglev={agent_maglev}");
        assert_eq!(maglev_flag(&m, "10.96.0.62"), agent_maglev);
        let tables = if agent_maglev { 2 } else { 1 };
        assert_eq!(m.maglev.len(), tables * orca_common::MAGLEV_TABLE_SIZE as usize);

        // Removing the annotation falls back to the agent's choice (and frees or writes the table).
        let mut sp = port("a", "10.96.0.60");
        sp.load_balancing = None;
        p.upsert(&mut m, &state(sp, eps()), &node(), &cfg).unwrap();
        m.check();
        assert_eq!(maglev_flag(&m, "10.96.0.60"), agent_maglev);
        let tables = if agent_maglev { 2 } else { 0 };
        assert_eq!(m.maglev.len(), tables * orca_common::MAGLEV_TABLE_SIZE as usize);
    }
}

#[test]
fn a_full_map_fails_one_service_port_and_leaves_it_and_the_others_as_they_were() {
    let mut m = FakeMaps {
        slot_cap: Some(6),
        ..Default::default()
    };
    let mut p = Programmer::default();
    let mut failed = BTreeSet::new();
    let cfg = DataplaneConfig::default();
    let eps = |ips: &[&str]| ips.iter().map(|ip| ep(ip, false)).collect::<Vec<_>>();
    let a = |ips: &[&str]| state(port("a", "10.96.0.10"), eps(ips));
    let b = state(
        port("b", "10.96.0.11"),
        eps(&["10.244.2.1", "10.244.2.2", "10.244.2.3", "10.244.2.4", "10.244.2.5"]),
    );
    let c = state(
        port("c", "10.96.0.12"),
        eps(&["10.244.3.1", "10.244.3.2", "10.244.3.3"]),
    );
    let a3 = a(&["10.244.1.1", "10.244.1.2", "10.244.1.3"]);
    let up = |p: &mut Programmer, failed: &mut BTreeSet<ServicePortName>, m: &mut FakeMaps, st: &ServicePortState| {
        super::upsert_contained(p, failed, m, st, &node(), &cfg)
    };

    assert!(up(&mut p, &mut failed, &mut m, &a(&["10.244.1.1", "10.244.1.2"])) > 0);
    // b needs 5 slots, 4 are left: it fails, and what it wrote is taken back.
    assert_eq!(up(&mut p, &mut failed, &mut m, &b), 0);
    assert_eq!(
        failed.iter().map(|n| n.service.name.to_string()).collect::<Vec<_>>(),
        ["b"]
    );
    assert_eq!(m.slots.len(), 2, "b's partial writes were removed");
    assert!(!m.fe.contains_key(&fk("10.96.0.11", 80)));
    // c fits in what b gave back.
    assert!(up(&mut p, &mut failed, &mut m, &c) > 0);
    assert_eq!(resolve(&m, &fk("10.96.0.12", 80)).len(), 3);
    // a grows to 3 backends: its new set does not fit beside the old one, so a keeps its 2 backends.
    assert_eq!(up(&mut p, &mut failed, &mut m, &a3), 0);
    assert_eq!(resolve(&m, &fk("10.96.0.10", 80)), ["10.244.1.1", "10.244.1.2"]);
    assert_eq!(failed.len(), 2);
    m.check();
    // Room again (the map was resized, or other Services went away): the retries succeed.
    m.slot_cap = None;
    assert!(up(&mut p, &mut failed, &mut m, &b) > 0);
    assert!(up(&mut p, &mut failed, &mut m, &a3) > 0);
    assert!(failed.is_empty());
    assert_eq!(resolve(&m, &fk("10.96.0.11", 80)).len(), 5);
    assert_eq!(resolve(&m, &fk("10.96.0.10", 80)).len(), 3);
    // The slot map holds exactly the published sets (nothing of the failed attempts).
    assert_eq!(m.slots.len(), 3 + 5 + 3);
    assert_eq!(m.members.len(), 3 + 5 + 3);
}

#[test]
fn a_full_frontend_or_source_range_map_leaks_nothing_and_retries_allocate_nothing_twice() {
    let mut m = FakeMaps::default();
    let mut p = Programmer::default();
    let mut failed = BTreeSet::new();
    let cfg = DataplaneConfig::default();
    let up = |p: &mut Programmer, failed: &mut BTreeSet<ServicePortName>, m: &mut FakeMaps, st: &ServicePortState| {
        super::upsert_contained(p, failed, m, st, &node(), &cfg)
    };
    let a = state(port("a", "10.96.0.50"), vec![ep("10.244.1.1", false)]);
    assert!(up(&mut p, &mut failed, &mut m, &a) > 0);
    // b has a ClusterIP and two external IPs: three new frontends, one more than the map has room for.
    let mut bp = port("b", "10.96.0.51");
    bp.external_ips = vec!["203.0.113.1".parse().unwrap(), "203.0.113.2".parse().unwrap()];
    let b = state(bp, vec![ep("10.244.2.1", false), ep("10.244.2.2", false)]);
    m.fe_cap = Some(3);
    let (slots, members) = (m.slots.len(), m.members.len());
    for _ in 0..5 {
        // Every retry fails the same way and leaves the maps as they were.
        assert_eq!(up(&mut p, &mut failed, &mut m, &b), 0);
        assert_eq!(failed.len(), 1);
        assert_eq!((m.fe.len(), m.slots.len(), m.members.len()), (1, slots, members));
    }
    assert_eq!(resolve(&m, &fk("10.96.0.50", 80)), ["10.244.1.1"]);
    m.check();
    m.fe_cap = None;
    assert!(up(&mut p, &mut failed, &mut m, &b) > 0);
    assert!(failed.is_empty());
    assert_eq!(m.fe.len(), 4);
    assert_eq!(
        m.slots.len(),
        slots + 4,
        "an internal and an external set of 2 backends"
    );

    // A load balancer with source ranges whose range map is full: the same.
    let mut cp = port("c", "10.96.0.52");
    cp.load_balancer_ips = vec!["198.51.100.5".parse().unwrap()];
    cp.load_balancer_source_ranges = vec!["192.0.2.0/24".parse().unwrap(), "198.18.0.0/15".parse().unwrap()];
    let c = state(cp, vec![ep("10.244.3.1", false)]);
    m.range_cap = Some(1);
    let before = (m.fe.len(), m.slots.len(), m.members.len(), m.ranges.len());
    for _ in 0..3 {
        assert_eq!(up(&mut p, &mut failed, &mut m, &c), 0);
        assert_eq!((m.fe.len(), m.slots.len(), m.members.len(), m.ranges.len()), before);
    }
    m.range_cap = None;
    assert!(up(&mut p, &mut failed, &mut m, &c) > 0);
    assert!(failed.is_empty());
    m.check();
}
