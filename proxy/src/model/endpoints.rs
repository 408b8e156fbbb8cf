//! EndpointSlices -> endpoints per service port, merged across every slice of a Service.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{Endpoint, Hints, Protocol, ServiceName, ServicePortName, LABEL_SERVICE_NAME};

/// One parsed EndpointSlice: its ports and endpoints, before they are matched to service ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// Shared with the service port names built from it.
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    pub zone_hints: Hints,
    pub node_hints: Hints,
}

/// Why a slice is not used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SliceError {
    #[error("no {} label", LABEL_SERVICE_NAME)]
    NoServiceLabel,
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("address type {0} is not proxied")]
    UnsupportedAddressType(String),
}

/// The Service a slice belongs to and the slice's own name.
pub fn slice_key(slice: &EndpointSlice) -> Result<(ServiceName, String), SliceError> {
    let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
    let name = slice.metadata.name.as_deref().unwrap_or_default();
    if ns.is_empty() || name.is_empty() {
        return Err(SliceError::Malformed("missing namespace or name".into()));
    }
    let svc = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .filter(|s| !s.is_empty())
        .ok_or(SliceError::NoServiceLabel)?;
    Ok((ServiceName::new(ns, svc.as_str()), name.to_string()))
}

/// Parses a slice, dropping (with a warning each) the ports and endpoints kube-proxy would ignore.
pub fn parse_slice(slice: &EndpointSlice) -> Result<(SliceInfo, Vec<String>), SliceError> {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Err(SliceError::UnsupportedAddressType(slice.address_type.clone()));
    }
    let mut warnings = Vec::new();
    let mut ports = Vec::new();
    for p in slice.ports.as_deref().unwrap_or_default() {
        let name = p.name.clone().unwrap_or_default();
        let Some(raw) = p.port else {
            warnings.push(format!("ignoring endpoint port {name:?} without a port number"));
            continue;
        };
        let Some(port) = u16::try_from(raw).ok().filter(|p| *p != 0) else {
            warnings.push(format!("ignoring endpoint port {name:?}: {raw} out of range"));
            continue;
        };
        match Protocol::parse(p.protocol.as_deref()) {
            Ok(protocol) => ports.push(SlicePort {
                name: name.into(),
                protocol,
                port,
            }),
            Err(e) => warnings.push(format!("ignoring endpoint port {name:?}: {e}")),
        }
    }
    let mut endpoints = Vec::new();
    for ep in slice.endpoints.as_deref().unwrap_or_default() {
        let Some(addr) = ep.addresses.first() else {
            warnings.push("ignoring endpoint without addresses".into());
            continue;
        };
        let Ok(ip) = addr.parse::<IpAddr>() else {
            warnings.push(format!("ignoring endpoint with invalid address {addr:?}"));
            continue;
        };
        if ip.is_ipv4() != (slice.address_type == "IPv4") {
            warnings.push(format!(
                "ignoring endpoint {ip}: not of the slice's address type {}",
                slice.address_type
            ));
            continue;
        }
        let c = ep.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let serving = c.and_then(|c| c.serving).unwrap_or(true);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        let hints = ep.hints.as_ref();
        endpoints.push(SliceEndpoint {
            ip,
            ready,
            serving,
            terminating,
            node_name: ep.node_name.as_deref().map(Arc::from),
            zone: ep.zone.as_deref().map(Arc::from),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect())
                .unwrap_or_default(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .map(|n| n.iter().map(|n| n.name.clone()).collect())
                .unwrap_or_default(),
        });
    }
    // Kept for as long as the slice exists: no spare capacity.
    endpoints.shrink_to_fit();
    ports.shrink_to_fit();
    Ok((SliceInfo { ports, endpoints }, warnings))
}

/// Every slice of every Service, kept as parsed; the merged endpoints are computed per Service on demand.
#[derive(Debug, Default)]
pub struct EndpointSliceCache {
    node_name: String,
    /// Per Service, its slices sorted by name (most Services have one: a vector costs less than a map).
    slices: HashMap<ServiceName, Vec<(String, SliceInfo)>>,
    /// Node and zone names, one shared copy each for every endpoint that names them.
    names: HashSet<Arc<str>>,
    /// `names` is pruned of names no endpoint uses when it grows past this.
    names_limit: usize,
}

/// Pruning of unused interned names starts at this many names.
const NAMES_MIN_LIMIT: usize = 1024;

/// Replaces `name` by the shared copy in `names`, adding it when new.
fn intern(names: &mut HashSet<Arc<str>>, name: &mut Option<Arc<str>>) {
    let Some(n) = name else { return };
    match names.get(n) {
        Some(shared) => *n = Arc::clone(shared),
        None => {
            names.insert(Arc::clone(n));
        }
    }
}

impl EndpointSliceCache {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            slices: HashMap::new(),
            names: HashSet::new(),
            names_limit: NAMES_MIN_LIMIT,
        }
    }

    /// Stores a slice; returns whether the Service's slices changed.
    pub fn upsert(&mut self, svc: ServiceName, slice_name: String, mut info: SliceInfo) -> bool {
        let per_svc = self.slices.entry(svc).or_default();
        let at = per_svc.binary_search_by(|(n, _)| n.as_str().cmp(&slice_name));
        if matches!(at, Ok(i) if per_svc[i].1 == info) {
            return false;
        }
        for e in &mut info.endpoints {
            intern(&mut self.names, &mut e.node_name);
            intern(&mut self.names, &mut e.zone);
        }
        match at {
            Ok(i) => per_svc[i].1 = info,
            Err(i) => per_svc.insert(i, (slice_name, info)),
        }
        if self.names.len() > self.names_limit.max(NAMES_MIN_LIMIT) {
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.names_limit = (2 * self.names.len()).max(NAMES_MIN_LIMIT);
        }
        true
    }

    /// Forgets a slice; returns whether anything was removed.
    pub fn remove(&mut self, svc: &ServiceName, slice_name: &str) -> bool {
        let Some(per_svc) = self.slices.get_mut(svc) else {
            return false;
        };
        let removed = match per_svc.binary_search_by(|(n, _)| n.as_str().cmp(slice_name)) {
            Ok(i) => {
                per_svc.remove(i);
                true
            }
            Err(_) => false,
        };
        if per_svc.is_empty() {
            self.slices.remove(svc);
        }
        removed
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceName> {
        self.slices.keys()
    }

    /// Names of the slices held for a Service.
    pub fn slice_names(&self, svc: &ServiceName) -> Vec<String> {
        self.slices
            .get(svc)
            .map(|m| m.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default()
    }

    /// The Service's endpoints per service port, merged over its slices and deduplicated by `ip:port`. Where
    /// two slices hold the same endpoint, the first (by slice name) wins unless a later one is on this node, as
    /// in kube-proxy. Each list is sorted by address.
    pub fn endpoints(&self, svc: &ServiceName) -> BTreeMap<ServicePortName, Vec<Endpoint>> {
        let mut by_port: BTreeMap<ServicePortName, BTreeMap<(IpAddr, u16), Endpoint>> = BTreeMap::new();
        let Some(per_svc) = self.slices.get(svc) else {
            return BTreeMap::new();
        };
        for (_, info) in per_svc {
            for p in &info.ports {
                let spn = ServicePortName {
                    service: svc.clone(),
                    port: p.name.clone(),
                    protocol: p.protocol,
                };
                let eps = by_port.entry(spn).or_default();
                for e in &info.endpoints {
                    let is_local = e.node_name.as_deref() == Some(self.node_name.as_str());
                    let key = (e.ip, p.port);
                    if eps.contains_key(&key) && !is_local {
                        continue;
                    }
                    eps.insert(
                        key,
                        Endpoint {
                            ip: e.ip,
                            port: p.port,
                            ready: e.ready,
                            serving: e.serving,
                            terminating: e.terminating,
                            is_local,
                            node_name: e.node_name.clone(),
                            zone: e.zone.clone(),
                            zone_hints: e.zone_hints.clone(),
                            node_hints: e.node_hints.clone(),
                        },
                    );
                }
            }
        }
        by_port
            .into_iter()
            .map(|(k, v)| (k, v.into_values().collect()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    fn add(cache: &mut EndpointSliceCache, v: serde_json::Value) -> Vec<String> {
        let s = slice(v);
        let (svc, name) = slice_key(&s).unwrap();
        let (info, warnings) = parse_slice(&s).unwrap();
        cache.upsert(svc, name, info);
        warnings
    }

    #[test]
    fn merges_slices_and_resolves_ports_per_slice() {
        let mut cache = EndpointSliceCache::new("node-a");
        // Two slices of one Service whose named port "http" resolves to different container ports.
        add(
            &mut cache,
            json!({"metadata": {"namespace": "ns", "name": "web-1", "labels": {LABEL_SERVICE_NAME: "web"}},
                   "addressType": "IPv4",
                   "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                   "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "node-a", "zone": "zone-a",
                                  "conditions": {"ready": true}},
                                 {"addresses": ["10.244.2.5"], "nodeName": "node-b",
                                  "conditions": {"ready": false, "serving": true, "terminating": true}}]}),
        );
        add(
            &mut cache,
            json!({"metadata": {"namespace": "ns", "name": "web-2", "labels": {LABEL_SERVICE_NAME: "web"}},
                   "addressType": "IPv4",
                   "ports": [{"name": "http", "port": 9090}],
                   "endpoints": [{"addresses": ["10.244.2.9"], "nodeName": "node-b",
                                  "hints": {"forZones": [{"name": "zone-b"}], "forNodes": [{"name": "node-b"}]}}]}),
        );
        let svc = ServiceName::new("ns", "web");
        let eps = cache.endpoints(&svc);
        let spn = ServicePortName::new("ns", "web", "http", Protocol::Tcp);
        let list = &eps[&spn];
        let got: Vec<String> = list.iter().map(|e| e.addr_string()).collect();
        assert_eq!(got, vec!["10.244.1.5:8080", "10.244.2.5:8080", "10.244.2.9:9090"]);
        assert!(list[0].is_local && list[0].ready && list[0].serving && !list[0].terminating);
        assert!(!list[1].is_local && !list[1].ready && list[1].serving && list[1].terminating);
        // Conditions default to ready and serving when unset.
        assert!(list[2].ready && list[2].serving && !list[2].terminating);
        assert!(list[2].zone_hints.contains("zone-b") && list[2].node_hints.contains("node-b"));

        assert!(cache.remove(&svc, "web-1"));
        assert_eq!(cache.endpoints(&svc)[&spn].len(), 1);
        assert!(cache.remove(&svc, "web-2"));
        assert!(cache.endpoints(&svc).is_empty());
        assert!(!cache.remove(&svc, "web-2"));
    }

    #[test]
    fn constructors_build_what_a_plain_slice_endpoint_merges_to() {
        let mut cache = EndpointSliceCache::new("node-a");
        add(
            &mut cache,
            json!({"metadata": {"namespace": "ns", "name": "c-1", "labels": {LABEL_SERVICE_NAME: "c"}},
                   "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "UDP"}],
                   "endpoints": [{"addresses": ["10.244.1.1"]},
                                 {"addresses": ["10.244.1.2"], "nodeName": "node-a"},
                                 {"addresses": ["10.244.1.3"], "nodeName": "node-b", "conditions": {"ready": true}}]}),
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let spn = ServicePortName::new("ns", "c", "http", Protocol::Udp);
        assert_eq!(
            cache.endpoints(&ServiceName::new("ns", "c")),
            BTreeMap::from([(
                spn,
                vec![
                    Endpoint::new(ip("10.244.1.1"), 8080),
                    Endpoint::new(ip("10.244.1.2"), 8080).on_node("node-a", true),
                    Endpoint::new(ip("10.244.1.3"), 8080).on_node("node-b", false),
                ]
            )])
        );
    }

    #[test]
    fn node_names_are_shared_and_slices_kept_in_name_order() {
        let mut cache = EndpointSliceCache::new("node-a");
        for (name, ip) in [("s-2", "10.0.0.2"), ("s-1", "10.0.0.1"), ("s-3", "10.0.0.3")] {
            add(
                &mut cache,
                json!({"metadata": {"namespace": "ns", "name": name, "labels": {LABEL_SERVICE_NAME: "x"}},
                       "addressType": "IPv4", "ports": [{"port": 80}],
                       "endpoints": [{"addresses": [ip], "nodeName": "node-b", "zone": "z"}]}),
            );
        }
        let svc = ServiceName::new("ns", "x");
        assert_eq!(cache.slice_names(&svc), ["s-1", "s-2", "s-3"]);
        let eps = cache.endpoints(&svc);
        let list = eps.values().next().unwrap();
        assert_eq!(list.len(), 3);
        let (a, b) = (list[0].node_name.as_ref().unwrap(), list[2].node_name.as_ref().unwrap());
        assert!(Arc::ptr_eq(a, b), "one copy of the node name");
        assert!(Arc::ptr_eq(
            list[0].zone.as_ref().unwrap(),
            list[1].zone.as_ref().unwrap()
        ));
        assert_eq!(&**a, "node-b");
        assert!(cache.remove(&svc, "s-2"));
        assert!(!cache.remove(&svc, "s-2"));
        assert_eq!(cache.slice_names(&svc), ["s-1", "s-3"]);
    }

    #[test]
    fn duplicate_endpoints_prefer_local() {
        let mut cache = EndpointSliceCache::new("node-a");
        for (name, node, ready) in [("a", "node-b", false), ("b", "node-a", true), ("c", "node-b", false)] {
            add(
                &mut cache,
                json!({"metadata": {"namespace": "ns", "name": name, "labels": {LABEL_SERVICE_NAME: "dup"}},
                       "addressType": "IPv4", "ports": [{"port": 80}],
                       "endpoints": [{"addresses": ["10.244.1.7"], "nodeName": node, "conditions": {"ready": ready}}]}),
            );
        }
        let svc = ServiceName::new("ns", "dup");
        let eps = cache.endpoints(&svc);
        let list = eps.values().next().unwrap();
        assert_eq!(list.len(), 1);
        assert!(list[0].is_local && list[0].ready);
    }

    #[test]
    fn unchanged_slice_is_not_a_change() {
        let mut cache = EndpointSliceCache::new("n");
        let v = json!({"metadata": {"namespace": "ns", "name": "s", "labels": {LABEL_SERVICE_NAME: "x"}},
                       "addressType": "IPv4", "ports": [{"port": 80}], "endpoints": [{"addresses": ["10.0.0.1"]}]});
        let s = slice(v);
        let (svc, name) = slice_key(&s).unwrap();
        let (info, _) = parse_slice(&s).unwrap();
        assert!(cache.upsert(svc.clone(), name.clone(), info.clone()));
        assert!(!cache.upsert(svc, name, info));
    }

    #[test]
    fn malformed_slices_and_parts() {
        let no_label = slice(
            json!({"metadata": {"namespace": "ns", "name": "s"}, "addressType": "IPv4",
                                    "endpoints": []}),
        );
        assert_eq!(slice_key(&no_label).unwrap_err(), SliceError::NoServiceLabel);
        let fqdn = slice(
            json!({"metadata": {"namespace": "ns", "name": "s", "labels": {LABEL_SERVICE_NAME: "x"}},
                                "addressType": "FQDN", "endpoints": []}),
        );
        assert!(matches!(
            parse_slice(&fqdn).unwrap_err(),
            SliceError::UnsupportedAddressType(_)
        ));
        let bad = slice(
            json!({"metadata": {"namespace": "ns", "name": "s", "labels": {LABEL_SERVICE_NAME: "x"}},
                               "addressType": "IPv4",
                               "ports": [{"name": "noport"}, {"name": "big", "port": 70000}, {"name": "ok", "port": 80}],
                               "endpoints": [{"addresses": []}, {"addresses": ["nope"]}, {"addresses": ["fd00::1"]},
                                             {"addresses": ["10.0.0.1", "10.0.0.2"]}]}),
        );
        let (info, warnings) = parse_slice(&bad).unwrap();
        assert_eq!(info.ports.len(), 1);
        assert_eq!(info.endpoints.len(), 1);
        assert_eq!(info.endpoints[0].ip, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(warnings.len(), 5, "{warnings:?}");
    }
}
