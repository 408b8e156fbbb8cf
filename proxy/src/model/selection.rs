//! Which endpoints a node uses for a service port: kube-proxy's CategorizeEndpoints, rule for rule.
//!
//! - Cluster endpoints: the ready ones (filtered by topology hints when the hints allow it); when none is ready
//!   anywhere, the serving-and-terminating ones.
//! - Local endpoints (for eTP/iTP=Local): the ready ones on this node; when none of those exists, this node's
//!   serving-and-terminating ones.
//! - Topology: PreferSameNode when every ready endpoint has a node hint and one names this node; else
//!   PreferSameZone when every ready endpoint has a zone hint and one names this node's zone; else none.

use std::collections::BTreeMap;

use super::{Endpoint, NodeInfo, ServicePort};

/// The topology mode chosen from the endpoints' hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyMode {
    None,
    PreferSameNode,
    PreferSameZone,
}

/// The result of categorising a service port's endpoints on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Categorized {
    /// Endpoints for Cluster-policy traffic; empty when the port never uses Cluster policy.
    pub cluster: Vec<Endpoint>,
    /// Endpoints for Local-policy traffic; empty when the port never uses Local policy.
    pub local: Vec<Endpoint>,
    /// The union of the two: every endpoint some traffic from this node may reach.
    pub all_reachable: Vec<Endpoint>,
    /// Whether the port has a usable endpoint anywhere in the cluster (even if none is reachable from here).
    pub has_any: bool,
}

pub fn topology_mode(endpoints: &[Endpoint], node: &NodeInfo) -> TopologyMode {
    let zone = node.zone.as_deref().unwrap_or("");
    let mut any_ready = false;
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for ep in endpoints.iter().filter(|e| e.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.contains(&node.name) {
            for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if ep.zone_hints.contains(zone) {
            for_zone = true;
        }
    }
    if !any_ready {
        return TopologyMode::None;
    }
    if all_node_hints && for_node {
        return TopologyMode::PreferSameNode;
    }
    if all_zone_hints && for_zone {
        return TopologyMode::PreferSameZone;
    }
    if all_zone_hints {
        tracing::debug!(node = %node.name, zone, "ignoring same-zone topology hints: none for this node's zone");
    }
    TopologyMode::None
}

fn available_for_topology(ep: &Endpoint, mode: TopologyMode, node: &NodeInfo) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => ep.node_hints.contains(&node.name),
        TopologyMode::PreferSameZone => ep.zone_hints.contains(node.zone.as_deref().unwrap_or("")),
    }
}

fn serving_terminating(ep: &Endpoint) -> bool {
    ep.serving && ep.terminating
}

/// Categorises `endpoints` of `svc` for `node`, exactly as kube-proxy's CategorizeEndpoints.
pub fn categorize(endpoints: &[Endpoint], svc: &ServicePort, node: &NodeInfo) -> Categorized {
    let mut out = Categorized::default();
    if endpoints.is_empty() {
        return out;
    }
    let mut mode = TopologyMode::None;
    if svc.uses_cluster_endpoints() {
        mode = topology_mode(endpoints, node);
        out.cluster = endpoints
            .iter()
            .filter(|e| e.ready && available_for_topology(e, mode, node))
            .cloned()
            .collect();
        if out.cluster.is_empty() {
            out.cluster = endpoints.iter().filter(|e| serving_terminating(e)).cloned().collect();
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !svc.uses_local_endpoints() {
        out.all_reachable = out.cluster.clone();
        return out;
    }

    let (mut local_ready, mut local_serving_terminating) = (false, false);
    for ep in endpoints {
        if ep.ready {
            out.has_any = true;
            local_ready |= ep.is_local;
        } else if serving_terminating(ep) {
            out.has_any = true;
            local_serving_terminating |= ep.is_local;
        }
    }
    let mut use_serving_terminating = false;
    if local_ready {
        out.local = endpoints.iter().filter(|e| e.is_local && e.ready).cloned().collect();
    } else if local_serving_terminating {
        use_serving_terminating = true;
        out.local = endpoints
            .iter()
            .filter(|e| e.is_local && serving_terminating(e))
            .cloned()
            .collect();
    }

    if !svc.uses_cluster_endpoints() {
        out.all_reachable = out.local.clone();
        return out;
    }
    if mode == TopologyMode::None && !use_serving_terminating {
        out.all_reachable = out.cluster.clone();
        return out;
    }
    let mut union: BTreeMap<String, Endpoint> = BTreeMap::new();
    for ep in out.cluster.iter().chain(out.local.iter()) {
        union.insert(ep.addr_string(), ep.clone());
    }
    out.all_reachable = union.into_values().collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServiceName, ServicePortName, TrafficPolicy};
    use std::collections::BTreeSet;

    /// A compact endpoint description: `ip`, readiness flags "r" / "s" / "t" (ready, serving, terminating),
    /// local or not, zone hints, node hints.
    struct E(
        &'static str,
        &'static str,
        bool,
        &'static [&'static str],
        &'static [&'static str],
    );

    fn eps(list: &[E]) -> Vec<Endpoint> {
        list.iter()
            .map(|E(ip, flags, local, zones, nodes)| Endpoint {
                ip: ip.parse().unwrap(),
                port: 80,
                ready: flags.contains('r'),
                serving: flags.contains('s'),
                terminating: flags.contains('t'),
                is_local: *local,
                node_name: Some(if *local { "node-a".into() } else { "node-b".into() }),
                zone: None,
                zone_hints: zones.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
                node_hints: nodes.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>(),
            })
            .collect()
    }

    fn port(itp_local: bool, etp_local: bool, external: bool) -> ServicePort {
        ServicePort {
            name: ServicePortName {
                service: ServiceName::new("ns", "s"),
                port: String::new(),
                protocol: Protocol::Tcp,
            },
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            port: 80,
            protocol: Protocol::Tcp,
            node_port: external.then_some(30080),
            load_balancer_ips: vec![],
            external_ips: vec![],
            load_balancer_source_ranges: vec![],
            session_affinity: None,
            external_policy: if etp_local && external {
                TrafficPolicy::Local
            } else {
                TrafficPolicy::Cluster
            },
            internal_policy: if itp_local {
                TrafficPolicy::Local
            } else {
                TrafficPolicy::Cluster
            },
            health_check_node_port: None,
            traffic_distribution: None,
            load_balancing: None,
        }
    }

    fn node(zone: Option<&str>) -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            zone: zone.map(String::from),
            addresses: vec![],
        }
    }

    fn ips(v: &[Endpoint]) -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|e| e.ip.to_string()).collect();
        v.sort();
        v
    }

    struct Case {
        name: &'static str,
        svc: ServicePort,
        node: NodeInfo,
        endpoints: Vec<Endpoint>,
        cluster: &'static [&'static str],
        local: &'static [&'static str],
        all: &'static [&'static str],
        has_any: bool,
    }

    #[test]
    fn categorize_table() {
        let cases = vec![
            Case {
                name: "no endpoints",
                svc: port(false, false, false),
                node: node(Some("zone-a")),
                endpoints: vec![],
                cluster: &[],
                local: &[],
                all: &[],
                has_any: false,
            },
            Case {
                name: "ready endpoints only, unready dropped",
                svc: port(false, false, false),
                node: node(Some("zone-a")),
                endpoints: eps(&[
                    E("10.0.0.1", "rs", true, &[], &[]),
                    E("10.0.0.2", "", false, &[], &[]),
                    E("10.0.0.3", "rs", false, &[], &[]),
                ]),
                cluster: &["10.0.0.1", "10.0.0.3"],
                local: &[],
                all: &["10.0.0.1", "10.0.0.3"],
                has_any: true,
            },
            Case {
                name: "no ready: serving terminating fallback for Cluster",
                svc: port(false, false, false),
                node: node(Some("zone-a")),
                endpoints: eps(&[
                    E("10.0.0.1", "st", false, &[], &[]),
                    E("10.0.0.2", "t", false, &[], &[]),
                    E("10.0.0.3", "", false, &[], &[]),
                ]),
                cluster: &["10.0.0.1"],
                local: &[],
                all: &["10.0.0.1"],
                has_any: true,
            },
            Case {
                name: "terminating ignored while one is ready",
                svc: port(false, false, false),
                node: node(None),
                endpoints: eps(&[
                    E("10.0.0.1", "st", false, &[], &[]),
                    E("10.0.0.2", "rs", false, &[], &[]),
                ]),
                cluster: &["10.0.0.2"],
                local: &[],
                all: &["10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "zone hints used when all hinted and zone present",
                svc: port(false, false, false),
                node: node(Some("zone-a")),
                endpoints: eps(&[
                    E("10.0.0.1", "rs", false, &["zone-a"], &[]),
                    E("10.0.0.2", "rs", false, &["zone-b"], &[]),
                    E("10.0.0.3", "rs", false, &["zone-a", "zone-b"], &[]),
                ]),
                cluster: &["10.0.0.1", "10.0.0.3"],
                local: &[],
                all: &["10.0.0.1", "10.0.0.3"],
                has_any: true,
            },
            Case {
                name: "zone hints ignored when some endpoint lacks hints",
                svc: port(false, false, false),
                node: node(Some("zone-a")),
                endpoints: eps(&[
                    E("10.0.0.1", "rs", false, &["zone-a"], &[]),
                    E("10.0.0.2", "rs", false, &[], &[]),
                ]),
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &[],
                all: &["10.0.0.1", "10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "zone hints ignored when the node has no zone label",
                svc: port(false, false, false),
                node: node(None),
                endpoints: eps(&[
                    E("10.0.0.1", "rs", false, &["zone-a"], &[]),
                    E("10.0.0.2", "rs", false, &["zone-b"], &[]),
                ]),
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &[],
                all: &["10.0.0.1", "10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "zone hints ignored when none is for this zone",
                svc: port(false, false, false),
                node: node(Some("zone-c")),
                endpoints: eps(&[
                    E("10.0.0.1", "rs", false, &["zone-a"], &[]),
                    E("10.0.0.2", "rs", false, &["zone-b"], &[]),
                ]),
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &[],
                all: &["10.0.0.1", "10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "hints of unready endpoints do not count",
                svc: port(false, false, false),
                node: node(Some("zone-a")),
                endpoints: eps(&[
                    E("10.0.0.1", "rs", false, &["zone-a"], &[]),
                    E("10.0.0.2", "rs", false, &["zone-b"], &[]),
                    E("10.0.0.3", "", false, &[], &[]),
                ]),
                cluster: &["10.0.0.1"],
                local: &[],
                all: &["10.0.0.1"],
                has_any: true,
            },
            Case {
                name: "node hints win over zone hints",
                svc: port(false, false, false),
                node: node(Some("zone-a")),
                endpoints: eps(&[
                    E("10.0.0.1", "rs", true, &["zone-a"], &["node-a"]),
                    E("10.0.0.2", "rs", false, &["zone-a"], &["node-b"]),
                ]),
                cluster: &["10.0.0.1"],
                local: &[],
                all: &["10.0.0.1"],
                has_any: true,
            },
            Case {
                name: "node hints not for this node fall back to zone hints",
                svc: port(false, false, false),
                node: node(Some("zone-a")),
                endpoints: eps(&[
                    E("10.0.0.1", "rs", false, &["zone-a"], &["node-c"]),
                    E("10.0.0.2", "rs", false, &["zone-b"], &["node-b"]),
                ]),
                cluster: &["10.0.0.1"],
                local: &[],
                all: &["10.0.0.1"],
                has_any: true,
            },
            Case {
                name: "iTP=Local: local ready endpoints only",
                svc: port(true, false, false),
                node: node(None),
                endpoints: eps(&[
                    E("10.0.0.1", "rs", true, &[], &[]),
                    E("10.0.0.2", "rs", false, &[], &[]),
                ]),
                cluster: &[],
                local: &["10.0.0.1"],
                all: &["10.0.0.1"],
                has_any: true,
            },
            Case {
                name: "iTP=Local with no local endpoint: nothing reachable, but endpoints exist",
                svc: port(true, false, false),
                node: node(None),
                endpoints: eps(&[E("10.0.0.2", "rs", false, &[], &[])]),
                cluster: &[],
                local: &[],
                all: &[],
                has_any: true,
            },
            Case {
                name: "iTP=Local falls back to local serving terminating",
                svc: port(true, false, false),
                node: node(None),
                endpoints: eps(&[
                    E("10.0.0.1", "st", true, &[], &[]),
                    E("10.0.0.2", "rs", false, &[], &[]),
                ]),
                cluster: &[],
                local: &["10.0.0.1"],
                all: &["10.0.0.1"],
                has_any: true,
            },
            Case {
                name: "eTP=Local: cluster for internal, local for external",
                svc: port(false, true, true),
                node: node(None),
                endpoints: eps(&[
                    E("10.0.0.1", "rs", true, &[], &[]),
                    E("10.0.0.2", "rs", false, &[], &[]),
                ]),
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &["10.0.0.1"],
                all: &["10.0.0.1", "10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "eTP=Local with only terminating local endpoints: union of ready cluster and local terminating",
                svc: port(false, true, true),
                node: node(None),
                endpoints: eps(&[
                    E("10.0.0.1", "st", true, &[], &[]),
                    E("10.0.0.2", "rs", false, &[], &[]),
                ]),
                cluster: &["10.0.0.2"],
                local: &["10.0.0.1"],
                all: &["10.0.0.1", "10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "eTP=Local with no local endpoints",
                svc: port(false, true, true),
                node: node(None),
                endpoints: eps(&[E("10.0.0.2", "rs", false, &[], &[])]),
                cluster: &["10.0.0.2"],
                local: &[],
                all: &["10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "eTP=Local with topology: local endpoints outside the zone stay reachable",
                svc: port(false, true, true),
                node: node(Some("zone-a")),
                endpoints: eps(&[
                    E("10.0.0.1", "rs", true, &["zone-b"], &[]),
                    E("10.0.0.2", "rs", false, &["zone-a"], &[]),
                ]),
                cluster: &["10.0.0.2"],
                local: &["10.0.0.1"],
                all: &["10.0.0.1", "10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "iTP=Local and eTP=Local, only unready endpoints: nothing anywhere",
                svc: port(true, true, true),
                node: node(None),
                endpoints: eps(&[E("10.0.0.1", "", true, &[], &[]), E("10.0.0.2", "t", false, &[], &[])]),
                cluster: &[],
                local: &[],
                all: &[],
                has_any: false,
            },
        ];
        for c in cases {
            let got = categorize(&c.endpoints, &c.svc, &c.node);
            assert_eq!(ips(&got.cluster), c.cluster, "{}: cluster", c.name);
            assert_eq!(ips(&got.local), c.local, "{}: local", c.name);
            assert_eq!(ips(&got.all_reachable), c.all, "{}: all reachable", c.name);
            assert_eq!(got.has_any, c.has_any, "{}: has_any", c.name);
        }
    }
}
