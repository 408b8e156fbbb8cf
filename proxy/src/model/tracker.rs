//! Change tracking: Kubernetes events in, per-Service diffs of the desired state out.
//!
//! Events only mark a Service as pending (with the time it was first seen, and the EndpointSlice trigger times);
//! the desired state of pending Services is recomputed once per sync and compared with what the dataplane was
//! last given, so a burst of events for one Service costs one recomputation.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::endpoints::{parse_slice, slice_key, EndpointSliceCache};
use super::service::{service_name, service_ports};
use super::state::{ServicePortState, Snapshot};
use super::{NodeInfo, ServiceName, ServicePort, ServicePortName};

/// EndpointSlice annotation the controller sets to the time of the change that triggered it.
pub const ANNOTATION_LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

#[derive(Debug, Clone)]
struct Pending {
    first_seen: Instant,
    trigger_times: Vec<SystemTime>,
    /// The Service object changed (kube-proxy's pending Service change).
    service: bool,
    /// EndpointSlice changes of the Service (kube-proxy counts each, not each Service).
    endpoint_changes: u64,
}

/// What made a Service pending.
#[derive(Debug, Clone, Copy)]
enum Changed {
    Service,
    Endpoints,
    /// The Node (zone, addresses): neither of kube-proxy's pending counts.
    Node,
}

/// Services with changes no sync has taken yet, as kube-proxy's `*_changes_pending` gauges count them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PendingChanges {
    /// Services whose Service object changed (kube-proxy's `ServiceChangeTracker` items).
    pub services: u64,
    /// EndpointSlice changes (kube-proxy increments its gauge once per slice change that needs a sync).
    pub endpoints: u64,
}

/// What changed since the last sync.
#[derive(Debug, Default, Clone)]
pub struct Diff {
    /// Service ports that are new or whose desired state changed.
    pub upserted: Vec<Arc<ServicePortState>>,
    /// Service ports that are gone.
    pub removed: Vec<ServicePortName>,
    /// Services whose state was recomputed (changed or not).
    pub services: Vec<ServiceName>,
    /// The earliest time a change in this diff was seen by the agent.
    pub oldest_change: Option<Instant>,
    /// The EndpointSlice controller's trigger times of the endpoint changes in this diff.
    pub trigger_times: Vec<SystemTime>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.removed.is_empty()
    }
}

/// Counters of accepted and rejected input, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub service_changes: u64,
    pub endpoint_changes: u64,
    /// Services (or some of their ports) ignored as invalid.
    pub invalid_services: u64,
    /// EndpointSlices (or some of their endpoints) ignored as invalid.
    pub invalid_slices: u64,
}

/// Turns events into diffs.
#[derive(Debug)]
pub struct ChangeTracker {
    node: NodeInfo,
    services: HashMap<ServiceName, Vec<ServicePort>>,
    slices: EndpointSliceCache,
    pending: HashMap<ServiceName, Pending>,
    /// Shared with the sync loop, which takes it once per sync: copy-on-write, so that costs a reference count
    /// instead of a copy of every service port (the loop drops its reference before the next `take_diff`).
    desired: Arc<Snapshot>,
    counters: Counters,
    /// The node's addresses changed since the last diff: NodePort states are re-applied even when unchanged.
    readdressed: bool,
}

fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let raw = slice
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_LAST_CHANGE_TRIGGER_TIME)?;
    let ts: k8s_openapi::jiff::Timestamp = raw.parse().ok()?;
    Some(SystemTime::from(ts))
}

impl ChangeTracker {
    pub fn new(node: NodeInfo) -> Self {
        Self {
            slices: EndpointSliceCache::new(node.name.clone()),
            node,
            services: HashMap::new(),
            pending: HashMap::new(),
            desired: Arc::new(Snapshot::new()),
            counters: Counters::default(),
            readdressed: false,
        }
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    fn mark(&mut self, svc: ServiceName, trigger: Option<SystemTime>, what: Changed) {
        let p = self.pending.entry(svc).or_insert_with(|| Pending {
            first_seen: Instant::now(),
            trigger_times: vec![],
            service: false,
            endpoint_changes: 0,
        });
        p.trigger_times.extend(trigger);
        match what {
            Changed::Service => p.service = true,
            Changed::Endpoints => p.endpoint_changes += 1,
            Changed::Node => {}
        }
    }

    /// The pending changes as kube-proxy's gauges count them; a sync's `take_diff` checks them out.
    pub fn pending_changes(&self) -> PendingChanges {
        let mut c = PendingChanges::default();
        for p in self.pending.values() {
            c.services += u64::from(p.service);
            c.endpoints += p.endpoint_changes;
        }
        c
    }

    /// A Service was added or modified.
    pub fn service_updated(&mut self, svc: &Service) {
        let name = match service_name(svc) {
            Ok(n) => n,
            Err(e) => {
                self.counters.invalid_services += 1;
                tracing::warn!(error = %e, "ignoring Service");
                return;
            }
        };
        let ports = match service_ports(svc) {
            Ok((ports, warnings)) => {
                for w in &warnings {
                    tracing::warn!(service = %name, "{w}");
                }
                self.counters.invalid_services += u64::from(!warnings.is_empty());
                ports
            }
            Err(skip) => {
                tracing::debug!(service = %name, reason = %skip, "not proxying Service");
                Vec::new()
            }
        };
        // One shared copy of the name for the key and every port.
        let name = ports.first().map_or(name, |p| p.name.service.clone());
        let old = if ports.is_empty() {
            self.services.remove(&name)
        } else {
            self.services.insert(name.clone(), ports.clone())
        };
        if old.as_deref().unwrap_or_default() != ports.as_slice() {
            self.counters.service_changes += 1;
            self.mark(name, None, Changed::Service);
        }
    }

    /// A Service was deleted.
    pub fn service_deleted(&mut self, svc: &Service) {
        if let Ok(name) = service_name(svc) {
            if self.services.remove(&name).is_some() {
                self.counters.service_changes += 1;
                self.mark(name, None, Changed::Service);
            }
        }
    }

    /// An EndpointSlice was added or modified.
    pub fn slice_updated(&mut self, slice: &EndpointSlice) {
        let (svc, name) = match slice_key(slice) {
            Ok(k) => k,
            Err(e) => {
                self.counters.invalid_slices += 1;
                tracing::debug!(slice = ?slice.metadata.name, error = %e, "ignoring EndpointSlice");
                return;
            }
        };
        match parse_slice(slice) {
            Ok((info, warnings)) => {
                for w in &warnings {
                    tracing::warn!(service = %svc, slice = %name, "{w}");
                }
                self.counters.invalid_slices += u64::from(!warnings.is_empty());
                // Share the Service's copy of its name when the Service is known.
                let svc = self.services.get_key_value(&svc).map_or(svc, |(k, _)| k.clone());
                if self.slices.upsert(svc.clone(), name, info) {
                    self.counters.endpoint_changes += 1;
                    self.mark(svc, trigger_time(slice), Changed::Endpoints);
                }
            }
            Err(e) => {
                tracing::debug!(service = %svc, slice = %name, error = %e, "ignoring EndpointSlice");
                if self.slices.remove(&svc, &name) {
                    self.counters.endpoint_changes += 1;
                    self.mark(svc, trigger_time(slice), Changed::Endpoints);
                }
            }
        }
    }

    /// An EndpointSlice was deleted.
    pub fn slice_deleted(&mut self, slice: &EndpointSlice) {
        if let Ok((svc, name)) = slice_key(slice) {
            if self.slices.remove(&svc, &name) {
                self.counters.endpoint_changes += 1;
                self.mark(svc, None, Changed::Endpoints);
            }
        }
    }

    /// After a re-list: forget every Service and slice not in the listed sets (their delete events were missed).
    pub fn retain_services(&mut self, listed: &std::collections::HashSet<ServiceName>) {
        let gone: Vec<ServiceName> = self.services.keys().filter(|n| !listed.contains(n)).cloned().collect();
        for name in gone {
            self.services.remove(&name);
            self.counters.service_changes += 1;
            self.mark(name, None, Changed::Service);
        }
    }

    /// After a re-list: forget every slice not in `listed` (service, slice name).
    pub fn retain_slices(&mut self, listed: &std::collections::HashSet<(ServiceName, String)>) {
        let svcs: Vec<ServiceName> = self.slices.services().cloned().collect();
        for svc in svcs {
            for slice in self.slices.slice_names(&svc) {
                if !listed.contains(&(svc.clone(), slice.clone())) && self.slices.remove(&svc, &slice) {
                    self.counters.endpoint_changes += 1;
                    self.mark(svc.clone(), None, Changed::Endpoints);
                }
            }
        }
    }

    /// The node object changed: a new zone changes topology for every Service; new addresses (filled in late by
    /// a cloud controller, or changed) change every NodePort's frontends, although no Service state changes, so
    /// the next diff re-applies the NodePort Services.
    pub fn node_updated(&mut self, node: NodeInfo) {
        if node == self.node {
            return;
        }
        let zone_changed = node.zone != self.node.zone;
        let addresses_changed = node.addresses != self.node.addresses;
        self.node = node;
        let affected: Vec<ServiceName> = self
            .services
            .iter()
            .filter(|(_, ports)| zone_changed || (addresses_changed && ports.iter().any(|p| p.node_port.is_some())))
            .map(|(name, _)| name.clone())
            .collect();
        for s in affected {
            self.mark(s, None, Changed::Node);
        }
        self.readdressed |= addresses_changed;
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The time the oldest pending change was seen.
    pub fn oldest_pending(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.first_seen).min()
    }

    /// Recomputes every pending Service and returns what changed against the previous desired state.
    pub fn take_diff(&mut self) -> Diff {
        let mut diff = Diff::default();
        let pending = std::mem::take(&mut self.pending);
        let readdressed = std::mem::take(&mut self.readdressed);
        if pending.is_empty() {
            return diff;
        }
        // Taken out while `compute` borrows self; a sync still holding the previous one makes this a copy.
        let mut shared = std::mem::take(&mut self.desired);
        let desired = Arc::make_mut(&mut shared);
        let mut names: Vec<&ServiceName> = pending.keys().collect();
        names.sort();
        for svc in names {
            let p = &pending[svc];
            diff.oldest_change = Some(diff.oldest_change.map_or(p.first_seen, |o| o.min(p.first_seen)));
            diff.trigger_times.extend(p.trigger_times.iter().copied());
            diff.services.push(svc.clone());
            let new_states = self.compute(svc);
            let old_names: Vec<ServicePortName> = desired.range(port_range(svc)).map(|(k, _)| k.clone()).collect();
            for old in old_names {
                if !new_states.contains_key(&old) {
                    desired.remove(&old);
                    diff.removed.push(old);
                }
            }
            for (name, state) in new_states {
                let unchanged = desired.get(&name).map(|s| s.as_ref()) == Some(&state);
                if !unchanged || (readdressed && state.port.node_port.is_some()) {
                    let state = Arc::new(state);
                    desired.insert(name, state.clone());
                    diff.upserted.push(state);
                }
            }
        }
        self.desired = shared;
        diff
    }

    fn compute(&self, svc: &ServiceName) -> BTreeMap<ServicePortName, ServicePortState> {
        let Some(ports) = self.services.get(svc) else {
            return BTreeMap::new();
        };
        let mut endpoints = self.slices.endpoints(svc);
        ports
            .iter()
            .map(|p| {
                let eps = endpoints.remove(&p.name).unwrap_or_default();
                (p.name.clone(), ServicePortState::new(p.clone(), eps, &self.node))
            })
            .collect()
    }

    /// The desired state as of the last `take_diff`.
    pub fn desired(&self) -> &Snapshot {
        &self.desired
    }

    /// The same, shared (O(1); see the field).
    pub fn desired_shared(&self) -> Arc<Snapshot> {
        Arc::clone(&self.desired)
    }
}

/// The range of snapshot keys that belong to one Service.
fn port_range(svc: &ServiceName) -> std::ops::RangeInclusive<ServicePortName> {
    use super::Protocol;
    let lo = ServicePortName {
        service: svc.clone(),
        port: Arc::from(""),
        protocol: Protocol::Tcp,
    };
    // Port names are DNS labels (lowercase ASCII); U+10FFFF sorts after every one of them.
    let hi = ServicePortName {
        service: svc.clone(),
        port: "\u{10FFFF}".into(),
        protocol: Protocol::Sctp,
    };
    lo..=hi
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tracker() -> ChangeTracker {
        ChangeTracker::new(NodeInfo {
            name: "node-a".into(),
            zone: Some("zone-a".into()),
            addresses: vec![],
        })
    }

    fn svc(name: &str, ip: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": name},
                                       "spec": {"clusterIP": ip, "ports": ports}}))
        .unwrap()
    }

    fn slice(svc: &str, name: &str, ips: &[(&str, bool)]) -> EndpointSlice {
        let eps: Vec<_> = ips
            .iter()
            .map(|(ip, ready)| json!({"addresses": [ip], "conditions": {"ready": ready}, "nodeName": "node-b"}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": name, "labels": {"kubernetes.io/service-name": svc},
                         "annotations": {ANNOTATION_LAST_CHANGE_TRIGGER_TIME: "2026-11-26T10:00:00Z"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": eps}))
        .unwrap()
    }

    #[test]
    fn the_sync_loop_shares_the_desired_state_instead_of_copying_it() {
        let mut t = tracker();
        for i in 0..2_000u32 {
            let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
            t.service_updated(&svc(&format!("s{i}"), &ip, json!([{"name": "http", "port": 80}])));
            t.slice_updated(&slice(&format!("s{i}"), &format!("s{i}-a"), &[("10.244.2.1", true)]));
        }
        t.take_diff();
        let held = t.desired_shared();
        // Nothing pending: the same snapshot, not a copy.
        t.take_diff();
        assert!(Arc::ptr_eq(&held, &t.desired_shared()));
        // A change while the previous sync still holds its snapshot: copied once, the old one untouched.
        t.slice_updated(&slice("s7", "s7-a", &[("10.244.2.9", true)]));
        let d = t.take_diff();
        assert_eq!(d.upserted.len(), 1);
        let now = t.desired_shared();
        assert!(!Arc::ptr_eq(&held, &now));
        assert_eq!((held.len(), now.len()), (2_000, 2_000));
        let name = d.upserted[0].port.name.clone();
        assert_ne!(held[&name], now[&name], "the held snapshot must not see the change");
        // Once the sync dropped its reference, changes are made in place.
        drop(held);
        let before = Arc::as_ptr(&now);
        drop(now);
        t.slice_updated(&slice("s8", "s8-a", &[("10.244.2.9", true)]));
        t.take_diff();
        assert_eq!(Arc::as_ptr(&t.desired_shared()), before);
    }

    #[test]
    fn add_change_remove() {
        let mut t = tracker();
        assert!(t.take_diff().is_empty());
        t.service_updated(&svc("web", "10.96.0.5", json!([{"name": "http", "port": 80}])));
        t.slice_updated(&slice("web", "web-abc", &[("10.244.2.1", true), ("10.244.2.2", false)]));
        assert!(t.has_pending());
        let d = t.take_diff();
        assert_eq!(d.upserted.len(), 1);
        assert!(d.removed.is_empty());
        assert_eq!(d.trigger_times.len(), 1);
        assert!(d.oldest_change.is_some());
        let st = &d.upserted[0];
        assert_eq!(st.name().to_string(), "ns/web:http/TCP");
        assert_eq!(st.endpoints.len(), 2);
        assert_eq!(st.internal_endpoints().len(), 1);
        assert!(!t.has_pending());
        assert!(t.take_diff().is_empty());

        // The same slice again: no change at all.
        t.slice_updated(&slice("web", "web-abc", &[("10.244.2.1", true), ("10.244.2.2", false)]));
        assert!(!t.has_pending());

        // Readiness flips: one upsert with the new endpoint set.
        t.slice_updated(&slice("web", "web-abc", &[("10.244.2.1", true), ("10.244.2.2", true)]));
        let d = t.take_diff();
        assert_eq!(d.upserted.len(), 1);
        assert_eq!(d.upserted[0].internal_endpoints().len(), 2);

        // A port is added, then the old one is removed.
        t.service_updated(&svc(
            "web",
            "10.96.0.5",
            json!([{"name": "http", "port": 80}, {"name": "x", "port": 81}]),
        ));
        let d = t.take_diff();
        assert_eq!(d.upserted.len(), 1);
        assert_eq!(&*d.upserted[0].name().port, "x");
        t.service_updated(&svc("web", "10.96.0.5", json!([{"name": "x", "port": 81}])));
        let d = t.take_diff();
        assert!(d.upserted.is_empty());
        assert_eq!(d.removed.len(), 1);
        assert_eq!(&*d.removed[0].port, "http");

        // Deleting the Service removes what is left.
        t.service_deleted(&svc("web", "10.96.0.5", json!([])));
        let d = t.take_diff();
        assert_eq!(d.removed.len(), 1);
        assert!(t.desired().is_empty());
        assert_eq!(t.counters().service_changes, 4);
        assert_eq!(t.counters().endpoint_changes, 2);
    }

    #[test]
    fn node_address_changes_reapply_node_ports() {
        let mut t = tracker();
        let np: Service = serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "np"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.7", "ports": [{"port": 80, "nodePort": 30080}]}}))
        .unwrap();
        t.service_updated(&np);
        t.service_updated(&svc("plain", "10.96.0.8", json!([{"port": 80}])));
        t.take_diff();
        // The Node's address is filled in late: no Service changed, but the NodePort must be re-applied with it.
        let mut node = t.node().clone();
        node.addresses = vec!["192.168.1.10".parse().unwrap()];
        t.node_updated(node.clone());
        let d = t.take_diff();
        assert_eq!(d.upserted.len(), 1, "{d:?}");
        assert_eq!(&*d.upserted[0].name().service.name, "np");
        // Nothing changed since: nothing to apply.
        t.node_updated(node);
        assert!(t.take_diff().is_empty());
    }

    #[test]
    fn other_services_untouched_and_skips_remove() {
        let mut t = tracker();
        t.service_updated(&svc("a", "10.96.0.1", json!([{"port": 80}])));
        t.service_updated(&svc("ab", "10.96.0.2", json!([{"port": 80}])));
        t.take_diff();
        // "a" turns headless: its port goes away, "ab" (a name with "a" as prefix) stays.
        t.service_updated(&svc("a", "None", json!([{"port": 80}])));
        let d = t.take_diff();
        assert_eq!(d.removed.len(), 1);
        assert_eq!(&*d.removed[0].service.name, "a");
        assert_eq!(t.desired().len(), 1);
    }

    #[test]
    fn relist_drops_missed_deletes() {
        let mut t = tracker();
        t.service_updated(&svc("a", "10.96.0.1", json!([{"name": "http", "port": 80}])));
        t.slice_updated(&slice("a", "a-1", &[("10.244.2.1", true)]));
        t.take_diff();
        let listed: std::collections::HashSet<_> = [ServiceName::new("ns", "a")].into();
        t.retain_services(&listed);
        t.retain_slices(&Default::default());
        let d = t.take_diff();
        assert_eq!(d.upserted.len(), 1);
        assert!(d.upserted[0].endpoints.is_empty());
    }

    #[test]
    fn pending_changes_count_services_and_endpoints_until_a_sync_takes_them() {
        let mut t = tracker();
        t.service_updated(&svc("a", "10.96.0.1", json!([{"name": "http", "port": 80}])));
        t.service_updated(&svc("b", "10.96.0.2", json!([{"name": "http", "port": 80}])));
        t.slice_updated(&slice("a", "a-1", &[("10.244.2.1", true)]));
        t.slice_updated(&slice("a", "a-1", &[("10.244.2.1", false)]));
        assert_eq!(
            t.pending_changes(),
            PendingChanges {
                services: 2,
                endpoints: 2
            }
        );
        t.take_diff();
        assert_eq!(t.pending_changes(), PendingChanges::default());
        t.slice_updated(&slice("b", "b-1", &[("10.244.2.2", true)]));
        assert_eq!(
            t.pending_changes(),
            PendingChanges {
                services: 0,
                endpoints: 1
            }
        );
    }

    #[test]
    fn malformed_input_is_counted_not_fatal() {
        let mut t = tracker();
        let bad: EndpointSlice = serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "x"},
                                                               "addressType": "IPv4", "endpoints": []}))
        .unwrap();
        t.slice_updated(&bad);
        assert_eq!((t.counters().invalid_services, t.counters().invalid_slices), (0, 1));
        assert!(!t.has_pending());
    }
}
