//! The dataplane-agnostic service model.
//!
//! Kubernetes objects are turned into [`ServicePort`]s (one per port of a Service) and [`Endpoint`]s (merged from
//! every EndpointSlice of the Service). Nothing here knows about iptables or eBPF.

pub mod cidr;
pub mod endpoints;
pub mod selection;
pub mod service;
pub mod state;
pub mod tracker;

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

pub use cidr::Cidr;

/// Label that hands a Service to another proxy; kube-proxy ignores such Services.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label the control plane puts on headless Services' EndpointSlices; kube-proxy ignores them.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Orca's per-Service choice of backend selection in the eBPF dataplane: `random` or `maglev`
/// (overrides `--ebpf-load-balancing`; the iptables dataplane always chooses at random, as
/// kube-proxy does).
pub const ANNOTATION_LOAD_BALANCING: &str = "orca.dev/load-balancing";
/// Label linking an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The Node label giving its zone.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
/// The label selector kube-proxy puts on its Service and EndpointSlice informers.
pub const PROXY_LABEL_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

/// Transport protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling; `None` (unset) means TCP, as in the API defaults.
    pub fn parse(s: Option<&str>) -> Result<Self, ValueError> {
        match s {
            None | Some("TCP") => Ok(Protocol::Tcp),
            Some("UDP") => Ok(Protocol::Udp),
            Some("SCTP") => Ok(Protocol::Sctp),
            Some(other) => Err(ValueError::Protocol(other.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `namespace/name` of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ServiceName {
    /// Shared by every copy (the tracker, the desired state and the dataplanes each key by it).
    #[serde(serialize_with = "ser_str")]
    pub namespace: Arc<str>,
    #[serde(serialize_with = "ser_str")]
    pub name: Arc<str>,
}

impl ServiceName {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Identity of one port of one Service: `namespace/name:port-name/protocol`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ServicePortName {
    pub service: ServiceName,
    /// The port's name; empty for a single unnamed port.
    #[serde(serialize_with = "ser_str")]
    pub port: Arc<str>,
    pub protocol: Protocol,
}

impl ServicePortName {
    /// `namespace/name:port/protocol`; `port` is the port's name, empty for a single unnamed port.
    pub fn new(
        namespace: impl Into<Arc<str>>,
        name: impl Into<Arc<str>>,
        port: impl Into<Arc<str>>,
        protocol: Protocol,
    ) -> Self {
        Self {
            service: ServiceName::new(namespace, name),
            port: port.into(),
            protocol,
        }
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.service)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

/// An IP family. kube-proxy runs one proxier per family (behind its meta-proxier); so do Orca's dataplanes: each
/// programs the addresses, endpoints and CIDRs of its own family and leaves the other family's alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub const BOTH: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }

    pub fn matches(self, ip: &IpAddr) -> bool {
        IpFamily::of(*ip) == self
    }

    /// The addresses of `ips` in this family, in order.
    pub fn filter<'a>(self, ips: &'a [IpAddr]) -> impl Iterator<Item = IpAddr> + 'a {
        ips.iter().copied().filter(move |ip| self.matches(ip))
    }

    /// `IPv4` / `IPv6`, as the Kubernetes API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    /// The loopback range in iptables syntax (`127.0.0.0/8`, `::1/128`).
    pub fn loopback_cidr(self) -> &'static str {
        match self {
            IpFamily::V4 => "127.0.0.0/8",
            IpFamily::V6 => "::1/128",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ServicePort {
    /// Whether this port has a cluster IP of `family` (a dataplane of that family programs it).
    pub fn has_family(&self, family: IpFamily) -> bool {
        self.cluster_ips.iter().any(|ip| family.matches(ip))
    }
}

/// externalTrafficPolicy / internalTrafficPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// One port of one Service, with every frontend it is reachable on and the policies that govern it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    pub name: ServicePortName,
    /// spec.clusterIPs (both families; a dataplane takes the ones it serves).
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    pub protocol: Protocol,
    /// spec.ports[].nodePort, when allocated.
    pub node_port: Option<u16>,
    /// status.loadBalancer.ingress[].ip whose ipMode is VIP (or unset).
    pub load_balancer_ips: Vec<IpAddr>,
    /// spec.externalIPs.
    pub external_ips: Vec<IpAddr>,
    /// spec.loadBalancerSourceRanges (empty: every source is allowed).
    pub load_balancer_source_ranges: Vec<Cidr>,
    /// sessionAffinity ClientIP and its timeout; `None` for no affinity.
    pub session_affinity: Option<Duration>,
    /// The effective external policy: Local only when the port is externally accessible and eTP=Local.
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    /// spec.healthCheckNodePort, for LoadBalancer Services with eTP=Local.
    pub health_check_node_port: Option<u16>,
    /// spec.trafficDistribution, as written.
    pub traffic_distribution: Option<String>,
    /// The `orca.dev/load-balancing` annotation, when valid.
    pub load_balancing: Option<LoadBalancing>,
}

/// How the eBPF dataplane picks a backend for a new connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadBalancing {
    /// Uniformly at random (kube-proxy's behaviour).
    #[default]
    Random,
    /// Maglev consistent hashing of the 5-tuple: every node picks the same backend for a flow,
    /// and a backend change moves the fewest flows.
    Maglev,
}

impl std::str::FromStr for LoadBalancing {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        match s.trim() {
            "random" => Ok(Self::Random),
            "maglev" => Ok(Self::Maglev),
            other => Err(ValueError::LoadBalancing(other.to_string())),
        }
    }
}

/// A field value the model does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("unknown protocol {0:?}")]
    Protocol(String),
    #[error("unknown value {0:?} (expected \"random\" or \"maglev\")")]
    LoadBalancing(String),
}

impl ServicePort {
    /// A ClusterIP-only service port `name` on `cluster_ip:port`, its protocol taken from `name`, with everything
    /// else as the API server defaults it (and kube-proxy then treats it): no NodePort, no load-balancer or external
    /// IPs, no source ranges, no session affinity, external and internal traffic policy Cluster, no health check
    /// node port, no traffic distribution and no `orca.dev/load-balancing` annotation. Set the public fields for
    /// anything else (a second cluster IP for a dual-stack Service, a NodePort, ...).
    pub fn new(name: ServicePortName, cluster_ip: IpAddr, port: u16) -> Self {
        Self {
            protocol: name.protocol,
            name,
            cluster_ips: vec![cluster_ip],
            port,
            node_port: None,
            load_balancer_ips: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            session_affinity: None,
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            traffic_distribution: None,
            load_balancing: None,
        }
    }

    /// kube-proxy's ExternallyAccessible: a NodePort, a load-balancer VIP or an external IP.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some() || !self.load_balancer_ips.is_empty() || !self.external_ips.is_empty()
    }

    pub fn external_policy_local(&self) -> bool {
        self.external_policy == TrafficPolicy::Local
    }

    pub fn internal_policy_local(&self) -> bool {
        self.internal_policy == TrafficPolicy::Local
    }

    /// Whether some traffic to this port is served by cluster-wide endpoints.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local() || self.externally_accessible()
    }

    /// Whether some traffic to this port is served by node-local endpoints only.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local() || (self.external_policy_local() && self.externally_accessible())
    }
}

/// One endpoint of a service port, merged from the Service's EndpointSlices.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node (nodeName equals the agent's node).
    pub is_local: bool,
    /// Shared by every endpoint on the same Node (interned by the slice cache).
    #[serde(serialize_with = "ser_name")]
    pub node_name: Option<Arc<str>>,
    #[serde(serialize_with = "ser_name")]
    pub zone: Option<Arc<str>>,
    pub zone_hints: Hints,
    pub node_hints: Hints,
}

impl Endpoint {
    /// A ready endpoint `ip:port` (so also serving, and not terminating), not on this node, with no node name, no
    /// zone and no topology hints. Set the public fields (or use [`Endpoint::on_node`]) for anything else.
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Self {
            ip,
            port,
            ready: true,
            serving: true,
            terminating: false,
            is_local: false,
            node_name: None,
            zone: None,
            zone_hints: Hints::default(),
            node_hints: Hints::default(),
        }
    }

    /// This endpoint placed on Node `node_name`; `is_local` says whether that is the agent's own node.
    pub fn on_node(self, node_name: impl Into<Arc<str>>, is_local: bool) -> Self {
        Self {
            node_name: Some(node_name.into()),
            is_local,
            ..self
        }
    }

    /// `ip:port`, bracketed for IPv6: the key endpoints are deduplicated by.
    pub fn addr_string(&self) -> String {
        std::net::SocketAddr::new(self.ip, self.port).to_string()
    }
}

/// Topology hints of an endpoint (zone or node names). Most endpoints have none: then this is one null pointer,
/// no allocation (and never an allocated empty set).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
// The box is the point: 8 bytes per endpoint copy instead of a 24-byte set inline.
#[allow(clippy::box_collection)]
pub struct Hints(Option<Box<BTreeSet<String>>>);

impl Hints {
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.as_ref().is_some_and(|s| s.contains(name))
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().flat_map(|s| s.iter().map(String::as_str))
    }
}

impl FromIterator<String> for Hints {
    fn from_iter<I: IntoIterator<Item = String>>(it: I) -> Self {
        let set: BTreeSet<String> = it.into_iter().collect();
        Self((!set.is_empty()).then(|| Box::new(set)))
    }
}

impl serde::Serialize for Hints {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// Serializes a shared string as the plain string it is.
fn ser_str<S: serde::Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

/// Serializes a shared name as the plain string it is.
fn ser_name<S: serde::Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&v.as_deref(), s)
}

/// Serializes a shared endpoint list as the plain list it is.
fn ser_slice<S: serde::Serializer>(v: &Arc<[Endpoint]>, s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&v[..], s)
}

/// Facts about the node the agent runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    pub name: String,
    /// `topology.kubernetes.io/zone`, when set.
    pub zone: Option<String>,
    pub addresses: Vec<IpAddr>,
}

impl NodeInfo {
    /// Node `name` with these addresses and no zone label.
    pub fn new(name: impl Into<String>, addresses: Vec<IpAddr>) -> Self {
        Self {
            name: name.into(),
            zone: None,
            addresses,
        }
    }
}
