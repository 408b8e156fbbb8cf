//! Which endpoints a node uses for a service port: kube-proxy's CategorizeEndpoints, rule for rule.
//!
//! - Cluster endpoints: the ready ones (filtered by topology hints when the hints allow it); when none is ready
//!   anywhere, the serving-and-terminating ones.
//! - Local endpoints (for eTP/iTP=Local): the ready ones on this node; when none of those exists, this node's
//!   serving-and-terminating ones.
//! - Topology: PreferSameNode when every ready endpoint has a node hint and one names this node; else
//!   PreferSameZone when every ready endpoint has a zone hint and one names this node's zone; else none.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Endpoint, NodeInfo, ServicePort};

/// The topology mode chosen from the endpoints' hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyMode {
    None,
    PreferSameNode,
    PreferSameZone,
}

/// The result of categorising a service port's endpoints on one node.
///
/// The lists are shared (with each other and with the port's whole endpoint list) wherever they are equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Categorized {
    /// Endpoints for Cluster-policy traffic; empty when the port never uses Cluster policy.
    #[serde(serialize_with = "super::ser_slice")]
    pub cluster: Arc<[Endpoint]>,
    /// Endpoints for Local-policy traffic; empty when the port never uses Local policy.
    #[serde(serialize_with = "super::ser_slice")]
    pub local: Arc<[Endpoint]>,
    /// The union of the two: every endpoint some traffic from this node may reach.
    #[serde(serialize_with = "super::ser_slice")]
    pub all_reachable: Arc<[Endpoint]>,
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
    categorize_in(endpoints, None, svc, node)
}

/// [`categorize`] of a shared list: a category holding every endpoint shares `endpoints` instead of copying it
/// (the common case: all ready, no hints), and `all_reachable` shares the category it equals.
pub fn categorize_shared(endpoints: &Arc<[Endpoint]>, svc: &ServicePort, node: &NodeInfo) -> Categorized {
    categorize_in(endpoints, Some(endpoints), svc, node)
}

/// The endpoints of `all` that `keep`, shared with `whole` (which holds `all`) when that is every one of them.
fn pick(all: &[Endpoint], whole: Option<&Arc<[Endpoint]>>, keep: impl Fn(&Endpoint) -> bool) -> Arc<[Endpoint]> {
    let n = all.iter().filter(|e| keep(e)).count();
    match whole {
        Some(w) if n == all.len() => Arc::clone(w),
        _ if n == 0 => Arc::default(),
        _ => all.iter().filter(|e| keep(e)).cloned().collect(),
    }
}

fn categorize_in(
    endpoints: &[Endpoint],
    whole: Option<&Arc<[Endpoint]>>,
    svc: &ServicePort,
    node: &NodeInfo,
) -> Categorized {
    let mut out = Categorized::default();
    if endpoints.is_empty() {
        return out;
    }
    let mut mode = TopologyMode::None;
    if svc.uses_cluster_endpoints() {
        mode = topology_mode(endpoints, node);
        out.cluster = pick(endpoints, whole, |e| e.ready && available_for_topology(e, mode, node));
        if out.cluster.is_empty() {
            out.cluster = pick(endpoints, whole, serving_terminating);
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !svc.uses_local_endpoints() {
        out.all_reachable = Arc::clone(&out.cluster);
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
        out.local = pick(endpoints, whole, |e| e.is_local && e.ready);
    } else if local_serving_terminating {
        use_serving_terminating = true;
        out.local = pick(endpoints, whole, |e| e.is_local && serving_terminating(e));
    }

    if !svc.uses_cluster_endpoints() {
        out.all_reachable = Arc::clone(&out.local);
        return out;
    }
    if mode == TopologyMode::None && !use_serving_terminating {
        out.all_reachable = Arc::clone(&out.cluster);
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
    use crate::model::{Hints, Protocol, ServicePortName, TrafficPolicy};

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
                ready: flags.contains('r'),
                serving: flags.contains('s'),
                terminating: flags.contains('t'),
                zone_hints: zones.iter().map(|s| s.to_string()).collect::<Hints>(),
                node_hints: nodes.iter().map(|s| s.to_string()).collect::<Hints>(),
                ..Endpoint::new(ip.parse().unwrap(), 80).on_node(if *local { "node-a" } else { "node-b" }, *local)
            })
            .collect()
    }

    /// A ClusterIP port, with a NodePort when `external`; eTP=Local takes effect only on an external port.
    fn port(itp_local: bool, etp_local: bool, external: bool) -> ServicePort {
        let mut p = ServicePort::new(
            ServicePortName::new("ns", "s", "", Protocol::Tcp),
            "10.96.0.10".parse().unwrap(),
            80,
        );
        p.node_port = external.then_some(30080);
        if etp_local && external {
            p.external_policy = TrafficPolicy::Local;
        }
        if itp_local {
            p.internal_policy = TrafficPolicy::Local;
        }
        p
    }

    fn node(zone: Option<&str>) -> NodeInfo {
        NodeInfo {
            zone: zone.map(String::from),
            ..NodeInfo::new("node-a", vec![])
        }
    }

    fn ips(v: &[Endpoint]) -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|e| e.ip.to_string()).collect();
        v.sort();
        v
    }

    /// Expected endpoint IPs: cluster, local, all reachable; and `has_any`.
    type Want = (
        &'static [&'static str],
        &'static [&'static str],
        &'static [&'static str],
        bool,
    );

    /// Checks what `categorize` selects for a port `svc` on `node` from `endpoints` against `want`: the cluster,
    /// local and all-reachable endpoint IPs, and `has_any`.
    fn check(case: &str, svc: ServicePort, node: NodeInfo, endpoints: &[E], want: Want) {
        let (cluster, local, all, has_any) = want;
        let got = categorize(&eps(endpoints), &svc, &node);
        assert_eq!(ips(&got.cluster), cluster, "{case}: cluster");
        assert_eq!(ips(&got.local), local, "{case}: local");
        assert_eq!(ips(&got.all_reachable), all, "{case}: all reachable");
        assert_eq!(got.has_any, has_any, "{case}: has_any");
    }

    #[test]
    fn shared_lists_are_shared_only_when_equal() {
        let all: Arc<[Endpoint]> = eps(&[
            E("10.0.0.1", "rs", false, &[], &[]),
            E("10.0.0.2", "rs", true, &[], &[]),
        ])
        .into();
        let c = categorize_shared(&all, &port(false, false, false), &node(None));
        assert!(Arc::ptr_eq(&c.cluster, &all) && Arc::ptr_eq(&c.all_reachable, &all));
        assert!(c.local.is_empty());
        // One unready: the cluster list is its own (and equal to what the unshared path computes).
        let all: Arc<[Endpoint]> =
            eps(&[E("10.0.0.1", "rs", false, &[], &[]), E("10.0.0.2", "", true, &[], &[])]).into();
        let svc = port(false, true, true);
        let c = categorize_shared(&all, &svc, &node(None));
        assert!(!Arc::ptr_eq(&c.cluster, &all));
        assert_eq!(ips(&c.cluster), ["10.0.0.1"]);
        assert_eq!(c, categorize(&all, &svc, &node(None)));
    }

    #[test]
    fn categorize_table() {
        check(
            "no endpoints",
            port(false, false, false),
            node(Some("zone-a")),
            &[],
            (&[], &[], &[], false),
        );
        check(
            "ready endpoints only, unready dropped",
            port(false, false, false),
            node(Some("zone-a")),
            &[
                E("10.0.0.1", "rs", true, &[], &[]),
                E("10.0.0.2", "", false, &[], &[]),
                E("10.0.0.3", "rs", false, &[], &[]),
            ],
            (&["10.0.0.1", "10.0.0.3"], &[], &["10.0.0.1", "10.0.0.3"], true),
        );
        check(
            "no ready: serving terminating fallback for Cluster",
            port(false, false, false),
            node(Some("zone-a")),
            &[
                E("10.0.0.1", "st", false, &[], &[]),
                E("10.0.0.2", "t", false, &[], &[]),
                E("10.0.0.3", "", false, &[], &[]),
            ],
            (&["10.0.0.1"], &[], &["10.0.0.1"], true),
        );
        check(
            "terminating ignored while one is ready",
            port(false, false, false),
            node(None),
            &[
                E("10.0.0.1", "st", false, &[], &[]),
                E("10.0.0.2", "rs", false, &[], &[]),
            ],
            (&["10.0.0.2"], &[], &["10.0.0.2"], true),
        );
        check(
            "zone hints used when all hinted and zone present",
            port(false, false, false),
            node(Some("zone-a")),
            &[
                E("10.0.0.1", "rs", false, &["zone-a"], &[]),
                E("10.0.0.2", "rs", false, &["zone-b"], &[]),
                E("10.0.0.3", "rs", false, &["zone-a", "zone-b"], &[]),
            ],
            (&["10.0.0.1", "10.0.0.3"], &[], &["10.0.0.1", "10.0.0.3"], true),
        );
        check(
            "zone hints ignored when some endpoint lacks hints",
            port(false, false, false),
            node(Some("zone-a")),
            &[
                E("10.0.0.1", "rs", false, &["zone-a"], &[]),
                E("10.0.0.2", "rs", false, &[], &[]),
            ],
            (&["10.0.0.1", "10.0.0.2"], &[], &["10.0.0.1", "10.0.0.2"], true),
        );
        check(
            "zone hints ignored when the node has no zone label",
            port(false, false, false),
            node(None),
            &[
                E("10.0.0.1", "rs", false, &["zone-a"], &[]),
                E("10.0.0.2", "rs", false, &["zone-b"], &[]),
            ],
            (&["10.0.0.1", "10.0.0.2"], &[], &["10.0.0.1", "10.0.0.2"], true),
        );
        check(
            "zone hints ignored when none is for this zone",
            port(false, false, false),
            node(Some("zone-c")),
            &[
                E("10.0.0.1", "rs", false, &["zone-a"], &[]),
                E("10.0.0.2", "rs", false, &["zone-b"], &[]),
            ],
            (&["10.0.0.1", "10.0.0.2"], &[], &["10.0.0.1", "10.0.0.2"], true),
        );
        check(
            "hints of unready endpoints do not count",
            port(false, false, false),
            node(Some("zone-a")),
            &[
                E("10.0.0.1", "rs", false, &["zone-a"], &[]),
                E("10.0.0.2", "rs", false, &["zone-b"], &[]),
                E("10.0.0.3", "", false, &[], &[]),
            ],
            (&["10.0.0.1"], &[], &["10.0.0.1"], true),
        );
        check(
            "node hints win over zone hints",
            port(false, false, false),
            node(Some("zone-a")),
            &[
                E("10.0.0.1", "rs", true, &["zone-a"], &["node-a"]),
                E("10.0.0.2", "rs", false, &["zone-a"], &["node-b"]),
            ],
            (&["10.0.0.1"], &[], &["10.0.0.1"], true),
        );
        check(
            "node hints not for this node fall back to zone hints",
            port(false, false, false),
            node(Some("zone-a")),
            &[
                E("10.0.0.1", "rs", false, &["zone-a"], &["node-c"]),
                E("10.0.0.2", "rs", false, &["zone-b"], &["node-b"]),
            ],
            (&["10.0.0.1"], &[], &["10.0.0.1"], true),
        );
        check(
            "iTP=Local: local ready endpoints only",
            port(true, false, false),
            node(None),
            &[
                E("10.0.0.1", "rs", true, &[], &[]),
                E("10.0.0.2", "rs", false, &[], &[]),
            ],
            (&[], &["10.0.0.1"], &["10.0.0.1"], true),
        );
        check(
            "iTP=Local with no local endpoint: nothing reachable, but endpoints exist",
            port(true, false, false),
            node(None),
            &[E("10.0.0.2", "rs", false, &[], &[])],
            (&[], &[], &[], true),
        );
        check(
            "iTP=Local falls back to local serving terminating",
            port(true, false, false),
            node(None),
            &[
                E("10.0.0.1", "st", true, &[], &[]),
                E("10.0.0.2", "rs", false, &[], &[]),
            ],
            (&[], &["10.0.0.1"], &["10.0.0.1"], true),
        );
        check(
            "eTP=Local: cluster for internal, local for external",
            port(false, true, true),
            node(None),
            &[
                E("10.0.0.1", "rs", true, &[], &[]),
                E("10.0.0.2", "rs", false, &[], &[]),
            ],
            (
                &["10.0.0.1", "10.0.0.2"],
                &["10.0.0.1"],
                &["10.0.0.1", "10.0.0.2"],
                true,
            ),
        );
        check(
            "eTP=Local with only terminating local endpoints: union of ready cluster and local terminating",
            port(false, true, true),
            node(None),
            &[
                E("10.0.0.1", "st", true, &[], &[]),
                E("10.0.0.2", "rs", false, &[], &[]),
            ],
            (&["10.0.0.2"], &["10.0.0.1"], &["10.0.0.1", "10.0.0.2"], true),
        );
        check(
            "eTP=Local with no local endpoints",
            port(false, true, true),
            node(None),
            &[E("10.0.0.2", "rs", false, &[], &[])],
            (&["10.0.0.2"], &[], &["10.0.0.2"], true),
        );
        check(
            "eTP=Local with topology: local endpoints outside the zone stay reachable",
            port(false, true, true),
            node(Some("zone-a")),
            &[
                E("10.0.0.1", "rs", true, &["zone-b"], &[]),
                E("10.0.0.2", "rs", false, &["zone-a"], &[]),
            ],
            (&["10.0.0.2"], &["10.0.0.1"], &["10.0.0.1", "10.0.0.2"], true),
        );
        check(
            "iTP=Local and eTP=Local, only unready endpoints: nothing anywhere",
            port(true, true, true),
            node(None),
            &[E("10.0.0.1", "", true, &[], &[]), E("10.0.0.2", "t", false, &[], &[])],
            (&[], &[], &[], false),
        );
    }
}
