//! The sandbox's network layout: the one place its names and addresses are decided.
//!
//! ```text
//!                          orca-fabric (bridge br0, no addresses)
//!        ┌──────────────────┬──────────────┴──┬──────────────────┐
//!   orca-cp 10.240.0.2  orca-node-a 10.240.0.11  orca-node-b 10.240.0.12  orca-client 10.240.0.100
//!   etcd, apiserver,     pods 10.244.1.0/24   pods 10.244.2.0/24    external client
//!   controller-manager   zone-a               zone-b
//! ```
//!
//! * Fabric 10.240.0.0/24: each member namespace has `eth0` (the peer of a `v-<member>` port on the bridge).
//! * Pod CIDRs: node-a 10.244.1.0/24, node-b 10.244.2.0/24. Each node routes the other node's pod CIDR via that
//!   node's IP and has `net.ipv4.ip_forward=1`. The control plane routes both pod CIDRs (so the apiserver could
//!   reach pods). The client deliberately gets no pod routes: like a real external client it reaches the cluster
//!   only through node IPs, NodePorts, load-balancer and external IPs.
//! * Load-balancer / external IPs: [`Topology::lb_cidr`] 10.250.0.0/24 is routed from the client (and the control
//!   plane) via the first node, like an L2/BGP load balancer that delivers to one node; tests may re-route it
//!   with [`Topology::exec`].
//! * Services: ClusterIP range 10.96.0.0/16 (the `kubernetes` Service is 10.96.0.1), NodePorts 30000-32767.
//! * IPv6 beside every IPv4 address (dual-stack, unique local addresses): [`v6`] maps 10.a.b.c to fd00:a:b::c and
//!   a /24 to its /64 ([`Ipv4Cidr::v6`]): fabric fd00:240:0::/64, pods fd00:244:1::/64 and fd00:244:2::/64, load
//!   balancers fd00:250:0::/64, each routed like its IPv4 twin; Services also get [`SERVICE_CIDR_V6`]. Addresses
//!   skip duplicate address detection (the namespaces are ours) and the nodes forward IPv6 too.
//! * `lo` is up in every namespace. Nothing is created in the machine's own namespace.
//! * Names must match [`netns::SANDBOX_NETNS_PREFIXES`] (checked by [`Topology::validate`]) so that teardown
//!   finds them.
use crate::netns;
use anyhow::{bail, Context, Result};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Output};
use std::str::FromStr;

/// The IPv6 ClusterIP range beside [`Topology::service_cidr`] (the apiserver's second `--service-cluster-ip-range`).
pub const SERVICE_CIDR_V6: &str = "fd00:96::/112";

/// The IPv6 twin of a sandbox address: 10.a.b.c -> fd00:a:b::c (the decimal digits read as hex: 10.244.1.5 is
/// fd00:244:1::5).
pub fn v6(ip: Ipv4Addr) -> Ipv6Addr {
    let [_, a, b, c] = ip.octets();
    let hex = |d: u8| u16::from_str_radix(&d.to_string(), 16).unwrap_or(0);
    Ipv6Addr::new(0xfd00, hex(a), hex(b), 0, 0, 0, 0, hex(c))
}

/// An IPv4 prefix such as 10.244.1.0/24.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// A prefix; host bits of `addr` are cleared.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self> {
        if prefix > 32 {
            bail!("prefix length {prefix} is larger than 32");
        }
        let net = u32::from(addr) & Self::mask_bits(prefix);
        Ok(Ipv4Cidr {
            addr: Ipv4Addr::from(net),
            prefix,
        })
    }

    fn mask_bits(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.addr
    }

    /// The `n`-th address of the prefix (`host(1)` is 10.244.1.1 for 10.244.1.0/24); `None` outside the prefix
    /// or on the broadcast address.
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = if self.prefix == 0 {
            u64::from(u32::MAX) + 1
        } else {
            1u64 << (32 - u32::from(self.prefix))
        };
        if u64::from(n) >= size.saturating_sub(1) && self.prefix < 31 {
            return None;
        }
        u32::from(self.addr).checked_add(n).map(Ipv4Addr::from)
    }

    /// The IPv6 twin of a /24 (or longer) prefix: its [`v6`] network as a /64 (10.244.1.0/24 -> fd00:244:1::/64).
    pub fn v6(&self) -> String {
        format!("{}/64", v6(self.addr))
    }

    /// Whether `ip` lies inside the prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_bits(self.prefix) == u32::from(self.addr)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (a, p) = s
            .split_once('/')
            .with_context(|| format!("{s:?} is not a CIDR (no '/')"))?;
        let addr: Ipv4Addr = a.parse().with_context(|| format!("{s:?}: bad address {a:?}"))?;
        let prefix: u8 = p.parse().with_context(|| format!("{s:?}: bad prefix length {p:?}"))?;
        Ipv4Cidr::new(addr, prefix)
    }
}

/// A namespace joined to the fabric: its netns name, its address on the fabric and its veth names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Short name ("cp", "node-a", "client").
    pub name: String,
    /// Network namespace ("orca-cp").
    pub netns: String,
    /// Address on the fabric (eth0 inside `netns`).
    pub ip: Ipv4Addr,
    /// Name of the bridge port in the fabric namespace (peer of eth0).
    pub fabric_port: String,
}

/// A node: a fabric member with a pod CIDR and a zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The Node object's name ("node-a") and its netns is `orca-<name>`.
    pub name: String,
    pub netns: String,
    /// InternalIP of the Node object, eth0 inside `netns`.
    pub ip: Ipv4Addr,
    pub pod_cidr: Ipv4Cidr,
    /// Value of the `topology.kubernetes.io/zone` label.
    pub zone: String,
    pub fabric_port: String,
}

impl Node {
    fn member(&self) -> Member {
        Member {
            name: self.name.clone(),
            netns: self.netns.clone(),
            ip: self.ip,
            fabric_port: self.fabric_port.clone(),
        }
    }
}

/// Interface name of the fabric side inside every member namespace.
pub const MEMBER_IFACE: &str = "eth0";
/// Name of the bridge inside the fabric namespace.
pub const BRIDGE: &str = "br0";

/// The layout; [`Topology::default`] is the documented one, [`Topology::create`] builds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Namespace holding the bridge.
    pub fabric_netns: String,
    pub fabric_cidr: Ipv4Cidr,
    pub control_plane: Member,
    pub client: Member,
    pub nodes: Vec<Node>,
    /// ClusterIP range (`--service-cluster-ip-range`).
    pub service_cidr: Ipv4Cidr,
    /// NodePort range (`--service-node-port-range`), inclusive.
    pub node_port_range: (u16, u16),
    /// Range for load-balancer ingress and external IPs, routed from the client via the first node.
    pub lb_cidr: Ipv4Cidr,
}

fn cidr(s: &str) -> Ipv4Cidr {
    // Only called on the literals below, covered by the unit tests.
    s.parse().unwrap_or_else(|e| panic!("bad built-in CIDR {s}: {e}"))
}

impl Default for Topology {
    fn default() -> Self {
        let member = |name: &str, last: u8| Member {
            name: name.to_string(),
            netns: format!("{}{name}", netns::PREFIX),
            ip: Ipv4Addr::new(10, 240, 0, last),
            fabric_port: format!("v-{name}"),
        };
        let node = |name: &str, last: u8, pods: &str, zone: &str| Node {
            name: name.to_string(),
            netns: format!("{}{name}", netns::PREFIX),
            ip: Ipv4Addr::new(10, 240, 0, last),
            pod_cidr: cidr(pods),
            zone: zone.to_string(),
            fabric_port: format!("v-{name}"),
        };
        Topology {
            fabric_netns: format!("{}fabric", netns::PREFIX),
            fabric_cidr: cidr("10.240.0.0/24"),
            control_plane: member("cp", 2),
            client: member("client", 100),
            nodes: vec![
                node("node-a", 11, "10.244.1.0/24", "zone-a"),
                node("node-b", 12, "10.244.2.0/24", "zone-b"),
            ],
            service_cidr: cidr("10.96.0.0/16"),
            node_port_range: (30000, 32767),
            lb_cidr: cidr("10.250.0.0/24"),
        }
    }
}

impl Topology {
    /// The address of the `kubernetes` Service: the first address of the service CIDR.
    pub fn kubernetes_service_ip(&self) -> Ipv4Addr {
        self.service_cidr.host(1).unwrap_or(self.service_cidr.addr)
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Every namespace of the layout (fabric first).
    pub fn netns_names(&self) -> Vec<String> {
        let mut v = vec![self.fabric_netns.clone(), self.control_plane.netns.clone()];
        v.extend(self.nodes.iter().map(|n| n.netns.clone()));
        v.push(self.client.netns.clone());
        v
    }

    fn members(&self) -> Vec<Member> {
        let mut v = vec![self.control_plane.clone()];
        v.extend(self.nodes.iter().map(Node::member));
        v.push(self.client.clone());
        v
    }

    /// Run `cmd` inside `ns` (`ip netns exec`), waiting for it; a non-zero exit is an error with its stderr.
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Result<Output> {
        netns::exec(ns, cmd)
    }

    /// Start `cmd` inside `ns` with its output in `.cache/sandbox/logs/<log_name>.log`; its pid is recorded so
    /// teardown stops it.
    pub fn spawn(&self, ns: &str, cmd: &[&str], log_name: &str) -> Result<Child> {
        netns::spawn(ns, cmd, log_name)
    }

    /// Check the layout is coherent (unique names and addresses, members inside the fabric, disjoint ranges).
    pub fn validate(&self) -> Result<()> {
        let members = self.members();
        let mut names: Vec<&str> = members.iter().map(|m| m.netns.as_str()).collect();
        names.push(&self.fabric_netns);
        for n in &names {
            if !netns::is_sandbox_netns(n) {
                bail!(
                    "namespace {n} is not named like a sandbox namespace ({:?}), teardown would miss it",
                    netns::SANDBOX_NETNS_PREFIXES
                );
            }
            if n.len() > 64 {
                bail!("namespace name {n} is too long");
            }
        }
        for m in &members {
            if m.fabric_port.len() > 15 {
                bail!("interface name {} is longer than 15 bytes", m.fabric_port);
            }
            if !self.fabric_cidr.contains(m.ip) {
                bail!("{} ({}) is outside the fabric {}", m.name, m.ip, self.fabric_cidr);
            }
        }
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != names.len() {
            bail!("duplicate namespace names in {names:?}");
        }
        let mut ips: Vec<Ipv4Addr> = members.iter().map(|m| m.ip).collect();
        ips.sort_unstable();
        ips.dedup();
        if ips.len() != members.len() {
            bail!("duplicate fabric addresses");
        }
        let mut ranges = vec![self.fabric_cidr, self.service_cidr, self.lb_cidr];
        ranges.extend(self.nodes.iter().map(|n| n.pod_cidr));
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                if a.contains(b.addr) || b.contains(a.addr) {
                    bail!("address ranges {a} and {b} overlap");
                }
            }
        }
        if self.nodes.is_empty() {
            bail!("a topology needs at least one node");
        }
        if self.node_port_range.0 > self.node_port_range.1 {
            bail!("empty NodePort range {:?}", self.node_port_range);
        }
        Ok(())
    }

    /// Create every namespace, the bridge, the veth pairs, addresses, routes and sysctls. Expects that no
    /// `orca-*` namespace exists (call [`netns::teardown`] first); on error, whatever was created stays for the
    /// caller's teardown.
    pub fn create(&self) -> Result<()> {
        self.validate()?;
        let fabric = self.fabric_netns.as_str();
        for ns in self.netns_names() {
            netns::ip(&["netns", "add", &ns])?;
            netns::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            // No duplicate address detection on links made later (the pods' veths): addresses work at once.
            for k in ["all", "default"] {
                netns::exec(&ns, &["sysctl", "-qw", &format!("net.ipv6.conf.{k}.accept_dad=0")])?;
            }
        }
        netns::ip(&["-n", fabric, "link", "add", BRIDGE, "type", "bridge"])?;
        netns::ip(&["-n", fabric, "link", "set", BRIDGE, "up"])?;
        let fabric_len = self.fabric_cidr.prefix.to_string();
        for m in self.members() {
            netns::ip(&[
                "-n",
                fabric,
                "link",
                "add",
                &m.fabric_port,
                "type",
                "veth",
                "peer",
                "name",
                MEMBER_IFACE,
                "netns",
                &m.netns,
            ])?;
            netns::ip(&["-n", fabric, "link", "set", &m.fabric_port, "master", BRIDGE, "up"])?;
            let addr = format!("{}/{fabric_len}", m.ip);
            netns::ip(&["-n", &m.netns, "addr", "add", &addr, "dev", MEMBER_IFACE])?;
            let addr6 = format!("{}/64", v6(m.ip));
            netns::ip(&["-n", &m.netns, "addr", "add", &addr6, "dev", MEMBER_IFACE, "nodad"])?;
            netns::ip(&["-n", &m.netns, "link", "set", MEMBER_IFACE, "up"])?;
        }
        // Each route twice: IPv4, and its IPv6 twin.
        let route = |ns: &str, dst: Ipv4Cidr, via: Ipv4Addr| -> Result<()> {
            netns::ip(&["-n", ns, "route", "add", &dst.to_string(), "via", &via.to_string()])?;
            netns::ip(&["-n", ns, "-6", "route", "add", &dst.v6(), "via", &v6(via).to_string()])?;
            Ok(())
        };
        for n in &self.nodes {
            netns::exec(&n.netns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            netns::exec(&n.netns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            for other in self.nodes.iter().filter(|o| o.name != n.name) {
                route(&n.netns, other.pod_cidr, other.ip)?;
            }
        }
        for other in &self.nodes {
            route(&self.control_plane.netns, other.pod_cidr, other.ip)?;
        }
        for ns in [&self.client.netns, &self.control_plane.netns] {
            route(ns, self.lb_cidr, self.nodes[0].ip)?;
        }
        let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        crate::hostfs::create(&names)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_is_the_documented_one() {
        let t = Topology::default();
        t.validate().unwrap();
        assert_eq!(t.control_plane.ip, Ipv4Addr::new(10, 240, 0, 2));
        assert_eq!(t.client.ip, Ipv4Addr::new(10, 240, 0, 100));
        let a = t.node("node-a").unwrap();
        assert_eq!(
            (a.ip, a.pod_cidr.to_string(), a.zone.as_str(), a.netns.as_str()),
            (
                Ipv4Addr::new(10, 240, 0, 11),
                "10.244.1.0/24".into(),
                "zone-a",
                "orca-node-a"
            )
        );
        let b = t.node("node-b").unwrap();
        assert_eq!(b.pod_cidr.to_string(), "10.244.2.0/24");
        assert_eq!(t.kubernetes_service_ip(), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(t.node_port_range, (30000, 32767));
        assert!(t.netns_names().iter().all(|n| netns::is_sandbox_netns(n)));
    }

    #[test]
    fn ipv6_twins() {
        assert_eq!(v6(Ipv4Addr::new(10, 244, 1, 5)).to_string(), "fd00:244:1::5");
        assert_eq!(v6(Ipv4Addr::new(10, 240, 0, 100)).to_string(), "fd00:240::100");
        assert_eq!(v6(Ipv4Addr::new(10, 250, 0, 255)).to_string(), "fd00:250::255");
        let c: Ipv4Cidr = "10.244.2.0/24".parse().unwrap();
        assert_eq!(c.v6(), "fd00:244:2::/64");
    }

    #[test]
    fn cidr_parsing_and_hosts() {
        let c: Ipv4Cidr = "10.244.1.77/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.244.1.0/24");
        assert_eq!(c.host(1), Some(Ipv4Addr::new(10, 244, 1, 1)));
        assert_eq!(c.host(254), Some(Ipv4Addr::new(10, 244, 1, 254)));
        assert_eq!(c.host(255), None);
        assert!(c.contains(Ipv4Addr::new(10, 244, 1, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 244, 2, 1)));
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/24", "10.0.0/8"] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn validate_rejects_overlaps_and_duplicates() {
        let mut t = Topology::default();
        t.nodes[1].pod_cidr = "10.244.1.128/25".parse().unwrap();
        assert!(t.validate().is_err());
        let mut t = Topology::default();
        t.client.ip = t.control_plane.ip;
        assert!(t.validate().is_err());
        let mut t = Topology::default();
        t.client.netns = "client".into();
        assert!(t.validate().is_err());
        let mut t = Topology::default();
        t.nodes[0].ip = Ipv4Addr::new(192, 168, 0, 1);
        assert!(t.validate().is_err());
    }
}
