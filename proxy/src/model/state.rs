//! The desired state of one service port on this node: what a dataplane programs.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use super::selection::{categorize, categorize_shared, Categorized};
use super::{Endpoint, IpFamily, NodeInfo, ServicePort, ServicePortName};

/// A service port together with its endpoints, categorised for this node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServicePortState {
    pub port: ServicePort,
    /// Every endpoint the slices list for this port, whatever its condition (sorted by address); shared with
    /// the categories of `selected` that hold all of them.
    #[serde(serialize_with = "super::ser_slice")]
    pub endpoints: Arc<[Endpoint]>,
    /// The endpoints this node uses, per traffic policy.
    pub selected: Categorized,
}

impl ServicePortState {
    /// The endpoints of `family` this node uses for that family's traffic (only that family's): [`Self::selected`]
    /// when every endpoint is of the family, else the family's endpoints categorised alone, as kube-proxy's per-family proxier does (a
    /// dual-stack Service's IPv4 and IPv6 slices).
    pub fn selected_in(&self, family: IpFamily, node: &NodeInfo) -> Cow<'_, Categorized> {
        if self.endpoints.iter().all(|e| family.matches(&e.ip)) {
            Cow::Borrowed(&self.selected)
        } else {
            let eps: Vec<Endpoint> = self
                .endpoints
                .iter()
                .filter(|e| family.matches(&e.ip))
                .cloned()
                .collect();
            Cow::Owned(categorize(&eps, &self.port, node))
        }
    }

    pub fn new(port: ServicePort, endpoints: Vec<Endpoint>, node: &NodeInfo) -> Self {
        let endpoints: Arc<[Endpoint]> = endpoints.into();
        let selected = categorize_shared(&endpoints, &port, node);
        Self {
            port,
            endpoints,
            selected,
        }
    }

    pub fn name(&self) -> &ServicePortName {
        &self.port.name
    }

    /// Endpoints for traffic from inside the cluster (ClusterIP): Local ones under iTP=Local, else Cluster.
    pub fn internal_endpoints(&self) -> &[Endpoint] {
        if self.port.internal_policy_local() {
            &self.selected.local
        } else {
            &self.selected.cluster
        }
    }

    /// Endpoints for traffic from outside (NodePort, load-balancer IPs, external IPs): Local ones under eTP=Local.
    pub fn external_endpoints(&self) -> &[Endpoint] {
        if self.port.external_policy_local() {
            &self.selected.local
        } else {
            &self.selected.cluster
        }
    }
}

/// The whole desired state, keyed by service port.
pub type Snapshot = BTreeMap<ServicePortName, Arc<ServicePortState>>;
