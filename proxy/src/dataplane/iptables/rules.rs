//! The rule generator: desired state -> `iptables-restore` input for the `filter` and `nat` tables.
//!
//! It follows kube-proxy's iptables proxier (`pkg/proxy/iptables/proxier.go`) rule for rule, with Orca's chain
//! prefix (`ORCA-` instead of `KUBE-`): the same chains, the same matches in the same order, the same comments
//! (with `orca` instead of `kubernetes` in the fixed ones), the same probability formatting. One generator per IP
//! family, as kube-proxy runs one proxier per family: the IPv6 one writes `ip6tables-restore` input from the IPv6
//! addresses, endpoints and CIDRs alone (and never opens NodePorts on `::1`, as kube-proxy does not).
//!
//! Per service port (hash `H` of `namespace/name[:port]` + protocol, see [`super::hash`]):
//! - `ORCA-SVC-H`: Cluster-policy endpoints, `ORCA-SVL-H`: Local-policy endpoints;
//! - `ORCA-EXT-H`: every external destination (NodePort, external IPs, load-balancer IPs) lands here;
//! - `ORCA-FW-H`: loadBalancerSourceRanges, in front of `ORCA-EXT-H` for load-balancer IPs;
//! - `ORCA-SEP-H'`: one per endpoint (hash also over `ip:port`): hairpin mark, affinity `recent` set, DNAT.
//!
//! Dispatch chains `ORCA-SERVICES` / `ORCA-NODEPORTS` (nat) and every `filter` chain are rewritten whole on every
//! sync; the per-service-port chains only when the caller says the port changed (see [`Generator::generate`]).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use super::hash::hash16;
use crate::dataplane::DataplaneConfig;
use crate::model::state::{ServicePortState, Snapshot};
use crate::model::{Cidr, Endpoint, IpFamily, NodeInfo, Protocol, ServicePortName};

pub const PREFIX: &str = "ORCA-";
pub const SERVICES: &str = "ORCA-SERVICES";
pub const EXTERNAL_SERVICES: &str = "ORCA-EXTERNAL-SERVICES";
pub const NODEPORTS: &str = "ORCA-NODEPORTS";
pub const POSTROUTING: &str = "ORCA-POSTROUTING";
pub const MARK_MASQ: &str = "ORCA-MARK-MASQ";
/// The comment suffix of a ClusterIP rule in [`SERVICES`] (kube-proxy's "ns/svc:port cluster IP"); the read-back
/// ([`super::readback`]) finds the ClusterIP frontends by it.
pub const CLUSTER_IP_COMMENT: &str = "cluster IP";
pub const FORWARD: &str = "ORCA-FORWARD";
pub const PROXY_FIREWALL: &str = "ORCA-PROXY-FIREWALL";
pub const FIREWALL: &str = "ORCA-FIREWALL";
/// Only with several IPv4 `--cluster-cidr`s: returns for pod sources, marks everything else for masquerade
/// (one `! -s` match cannot name several ranges).
pub const MASQ_OFF_CLUSTER: &str = "ORCA-MASQ-OFF-CLUSTER";

/// The nat chains that exist whatever the services (besides [`MASQ_OFF_CLUSTER`] when needed).
pub const NAT_TOP_CHAINS: [&str; 4] = [SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ];
/// The filter chains, all rewritten on every sync.
pub const FILTER_CHAINS: [&str; 6] = [
    SERVICES,
    EXTERNAL_SERVICES,
    FORWARD,
    NODEPORTS,
    PROXY_FIREWALL,
    FIREWALL,
];

/// kube-proxy's threshold: above this many endpoints, per-endpoint rules carry no comment.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// A jump from a built-in chain to one of ours; checked with `-C` and inserted with `-I` on every sync.
#[derive(Debug, Clone, Copy)]
pub struct Jump {
    pub table: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    pub comment: &'static str,
    pub ctstate_new: bool,
}

impl Jump {
    /// The rule's arguments after `-t TABLE -X CHAIN`.
    pub fn args(&self) -> Vec<&'static str> {
        let mut a = Vec::with_capacity(10);
        if self.ctstate_new {
            a.extend(["-m", "conntrack", "--ctstate", "NEW"]);
        }
        a.extend(["-m", "comment", "--comment", self.comment, "-j", self.to]);
        a
    }
}

impl Jump {
    /// The rule as `iptables -S` / `iptables-save` print it.
    pub fn save_form(&self) -> String {
        let ct = if self.ctstate_new {
            " -m conntrack --ctstate NEW"
        } else {
            ""
        };
        format!(
            "-A {}{ct} -m comment --comment \"{}\" -j {}",
            self.from, self.comment, self.to
        )
    }
}

const fn jump(table: &'static str, to: &'static str, from: &'static str, comment: &'static str, new: bool) -> Jump {
    Jump {
        table,
        from,
        to,
        comment,
        ctstate_new: new,
    }
}

/// kube-proxy's iptablesJumpChains (plus the kubelet-duplicated firewall chain), in the same order.
pub const JUMPS: [Jump; 14] = [
    jump(
        "filter",
        EXTERNAL_SERVICES,
        "INPUT",
        "orca externally-visible service portals",
        true,
    ),
    jump(
        "filter",
        EXTERNAL_SERVICES,
        "FORWARD",
        "orca externally-visible service portals",
        true,
    ),
    jump("filter", NODEPORTS, "INPUT", "orca health check service ports", false),
    jump("filter", SERVICES, "FORWARD", "orca service portals", true),
    jump("filter", SERVICES, "OUTPUT", "orca service portals", true),
    jump("filter", FORWARD, "FORWARD", "orca forwarding rules", false),
    jump("filter", PROXY_FIREWALL, "INPUT", "orca load balancer firewall", true),
    jump("filter", PROXY_FIREWALL, "OUTPUT", "orca load balancer firewall", true),
    jump("filter", PROXY_FIREWALL, "FORWARD", "orca load balancer firewall", true),
    jump("nat", SERVICES, "OUTPUT", "orca service portals", false),
    jump("nat", SERVICES, "PREROUTING", "orca service portals", false),
    jump("nat", POSTROUTING, "POSTROUTING", "orca postrouting rules", false),
    jump("filter", FIREWALL, "INPUT", "orca localnet firewall", false),
    jump("filter", FIREWALL, "OUTPUT", "orca localnet firewall", false),
];

/// Facts about the host's iptables that change the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneratorOptions {
    /// `MASQUERADE --random-fully` is supported (iptables >= 1.6.2).
    pub random_fully: bool,
    /// `nf_conntrack_tcp_be_liberal` is set: no DROP rule for INVALID packets.
    pub conntrack_tcp_liberal: bool,
}

impl Default for GeneratorOptions {
    fn default() -> Self {
        Self {
            random_fully: true,
            conntrack_tcp_liberal: false,
        }
    }
}

/// Where NodePorts answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NodePortDest {
    /// Every local address (`-m addrtype --dst-type LOCAL`), loopback excluded unless `localhost`.
    All { localhost: bool },
    /// The local addresses inside `--nodeport-addresses`.
    Ips(Vec<IpAddr>),
}

/// Whether `--nodeport-addresses` asks for NodePorts on 127.0.0.1 (kube-proxy's ContainsIPv4Loopback); then
/// `route_localnet` must be set and the localnet firewall rule installed. Empty (the default) means no.
pub fn localhost_nodeports(cfg: &DataplaneConfig) -> bool {
    let loopback_start = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0));
    cfg.nodeport_addresses
        .iter()
        .filter(|c| c.is_ipv4())
        .any(|c| c.addr.is_loopback() || c.contains(loopback_start))
}

/// The output of one generation: the four parts of the restore input.
#[derive(Debug, Default, Clone)]
pub struct Ruleset {
    filter_chains: String,
    filter_rules: String,
    nat_chains: String,
    nat_rules: String,
    chain_lines: usize,
    /// The nat chains of every service port whose chains were written, by service port.
    pub port_chains: HashMap<ServicePortName, Vec<String>>,
    /// Whether [`MASQ_OFF_CLUSTER`] was written.
    pub masq_off_cluster: bool,
    /// Rules (`-A` lines) in the input.
    pub rules_written: usize,
    /// Every rule Orca owns after this sync (filter + nat, including per-service rules not rewritten).
    pub rules_total: usize,
    /// Whether 127.0.0.1 NodePorts are on (`route_localnet` must be 1).
    pub localhost_nodeports: bool,
}

impl Ruleset {
    /// The nat chains this ruleset keeps that are not per service port.
    pub fn top_nat_chains(&self) -> Vec<&'static str> {
        let mut v = NAT_TOP_CHAINS.to_vec();
        if self.masq_off_cluster {
            v.push(MASQ_OFF_CLUSTER);
        }
        v
    }

    /// The complete `iptables-restore --noflush` input (`*filter ... COMMIT`, `*nat ... COMMIT`), flushing and
    /// deleting the `stale_*` chains at the end of each table, and its line count.
    pub fn restore_input(&self, stale_filter: &[String], stale_nat: &[String]) -> (String, usize) {
        let stale = stale_filter.len() + stale_nat.len();
        let mut t = String::with_capacity(
            self.filter_chains.len()
                + self.filter_rules.len()
                + self.nat_chains.len()
                + self.nat_rules.len()
                + 64 * stale
                + 32,
        );
        t.push_str("*filter\n");
        t.push_str(&self.filter_chains);
        for c in stale_filter {
            let _ = writeln!(t, ":{c} - [0:0]");
        }
        t.push_str(&self.filter_rules);
        for c in stale_filter {
            let _ = writeln!(t, "-X {c}");
        }
        t.push_str("COMMIT\n*nat\n");
        t.push_str(&self.nat_chains);
        for c in stale_nat {
            let _ = writeln!(t, ":{c} - [0:0]");
        }
        t.push_str(&self.nat_rules);
        for c in stale_nat {
            let _ = writeln!(t, "-X {c}");
        }
        t.push_str("COMMIT\n");
        (t, 4 + self.chain_lines + self.rules_written + 2 * stale)
    }
}

#[derive(Default)]
struct Buf {
    s: String,
    lines: usize,
}

impl Buf {
    fn with_capacity(n: usize) -> Self {
        Self {
            s: String::with_capacity(n),
            lines: 0,
        }
    }

    fn chain(&mut self, name: &str) {
        self.s.push(':');
        self.s.push_str(name);
        self.s.push_str(" - [0:0]\n");
        self.lines += 1;
    }

    /// One rule: `-A chain` and `args` (which start with a space) on a line of their own.
    fn rule(&mut self, chain: &str, args: std::fmt::Arguments<'_>) {
        self.rule_with(chain, |r| {
            let _ = r.write_fmt(args);
        });
    }

    /// One rule whose arguments `f` appends (for rules with optional parts).
    fn rule_with(&mut self, chain: &str, f: impl FnOnce(&mut String)) {
        self.s.push_str("-A ");
        self.s.push_str(chain);
        f(&mut self.s);
        self.s.push('\n');
        self.lines += 1;
    }
}

/// Everything about one service port the rules need, in the generator's family.
struct PortView<'a> {
    st: &'a ServicePortState,
    /// kube-proxy's name string, hashed into chain names.
    raw_name: String,
    /// The same, safe inside a quoted `--comment`.
    name: String,
    proto: &'static str,
    cluster_ip: IpAddr,
    external_ips: Vec<IpAddr>,
    lb_ips: Vec<IpAddr>,
    source_ranges: Vec<Cidr>,
    cluster: std::sync::Arc<[Endpoint]>,
    local: std::sync::Arc<[Endpoint]>,
    reachable: std::sync::Arc<[Endpoint]>,
    has_any: bool,
}

fn proto_lower(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// kube-proxy's ServicePortName.String(): `namespace/name` plus `:port` for a named port.
pub fn port_name_string(n: &ServicePortName) -> String {
    let mut s = String::with_capacity(n.service.namespace.len() + n.service.name.len() + n.port.len() + 2);
    s.push_str(&n.service.namespace);
    s.push('/');
    s.push_str(&n.service.name);
    if !n.port.is_empty() {
        s.push(':');
        s.push_str(&n.port);
    }
    s
}

/// `s` with everything but `[A-Za-z0-9._:/-]` replaced by `_`: safe inside a quoted `--comment` (Kubernetes names
/// never need more; a malformed object must not be able to break, or inject into, the restore input).
pub fn comment_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn port_chain(prefix: &str, name: &str, proto: &str) -> String {
    let mut c = String::with_capacity(prefix.len() + 16);
    c.push_str(prefix);
    c.push_str(&hash16(&[name.as_bytes(), proto.as_bytes()]));
    c
}

/// `ORCA-SVC-…` of a service port.
pub fn svc_chain(n: &ServicePortName) -> String {
    port_chain("ORCA-SVC-", &port_name_string(n), proto_lower(n.protocol))
}

/// `ORCA-SEP-…` of one endpoint (`ip:port`) of a service port.
pub fn sep_chain(n: &ServicePortName, endpoint: &str) -> String {
    sep_chain_of(&port_name_string(n), proto_lower(n.protocol), endpoint)
}

fn sep_chain_of(name: &str, proto: &str, endpoint: &str) -> String {
    let mut c = String::with_capacity(25);
    c.push_str("ORCA-SEP-");
    c.push_str(&hash16(&[name.as_bytes(), proto.as_bytes(), endpoint.as_bytes()]));
    c
}

/// The rule generator for one node.
pub struct Generator<'a> {
    cfg: &'a DataplaneConfig,
    node: &'a NodeInfo,
    opts: GeneratorOptions,
    family: IpFamily,
    masq_mark: String,
    /// The `--cluster-cidr`s of the family: the local-traffic detector.
    cluster_cidrs: Vec<Cidr>,
    node_ip: Option<IpAddr>,
    nodeports: NodePortDest,
    localhost_nodeports: bool,
    probabilities: Vec<String>,
}

impl<'a> Generator<'a> {
    /// `local_addrs` are the addresses of the node's interfaces (what `--nodeport-addresses` selects from);
    /// the node's own IP (for loadBalancerSourceRanges) is the first address of `node.addresses` in the family.
    pub fn new(cfg: &'a DataplaneConfig, node: &'a NodeInfo, local_addrs: &[IpAddr], opts: GeneratorOptions) -> Self {
        Self::for_family(IpFamily::V4, cfg, node, local_addrs, opts)
    }

    /// The generator of `family`'s rules (the IPv6 one feeds `ip6tables-restore`).
    pub fn for_family(
        family: IpFamily,
        cfg: &'a DataplaneConfig,
        node: &'a NodeInfo,
        local_addrs: &[IpAddr],
        opts: GeneratorOptions,
    ) -> Self {
        let bit = cfg.masquerade_bit.min(31);
        if bit != cfg.masquerade_bit {
            tracing::warn!(bit = cfg.masquerade_bit, "masquerade bit out of range 0..=31, using 31");
        }
        let masq_mark = format!("{:#08x}", 1u32 << bit);
        // NodePorts on localhost need route_localnet, which IPv6 does not have: never on ::1 (as kube-proxy).
        let localhost = family == IpFamily::V4 && localhost_nodeports(cfg);
        let np_cidrs: Vec<Cidr> = cfg
            .nodeport_addresses
            .iter()
            .filter(|c| c.family() == family)
            .copied()
            .collect();
        let nodeports = if cfg.nodeport_primary {
            // kube-proxy's `primary`: the Node's own addresses (those this node holds).
            let mut ips: Vec<IpAddr> = family
                .filter(&node.addresses)
                .filter(|ip| local_addrs.contains(ip))
                .collect();
            ips.dedup();
            if ips.is_empty() {
                tracing::warn!(addresses = ?node.addresses, %family, "--nodeport-addresses primary: the Node has no local address of the family yet; NodePorts answer nowhere on it");
            }
            NodePortDest::Ips(ips)
        } else if np_cidrs.is_empty() {
            NodePortDest::All { localhost: false }
        } else if np_cidrs.iter().any(|c| c.prefix == 0) {
            NodePortDest::All { localhost }
        } else {
            let mut ips = Vec::new();
            for ip in family.filter(local_addrs) {
                if !np_cidrs.iter().any(|c| c.contains(ip)) || ips.contains(&ip) {
                    continue;
                }
                ips.push(ip);
            }
            if ips.is_empty() {
                tracing::warn!(cidrs = ?np_cidrs, %family, "no local address matches --nodeport-addresses: NodePorts answer nowhere");
            }
            NodePortDest::Ips(ips)
        };
        Self {
            cfg,
            node,
            opts,
            family,
            masq_mark,
            cluster_cidrs: cfg
                .cluster_cidrs
                .iter()
                .filter(|c| c.family() == family)
                .copied()
                .collect(),
            node_ip: family.filter(&node.addresses).next(),
            nodeports,
            localhost_nodeports: localhost,
            probabilities: vec!["<bad value>".into()],
        }
    }

    /// kube-proxy's probability string for the i-th of n remaining endpoints: `1/n` with 10 decimals.
    fn probability(&mut self, n: usize) -> &str {
        while self.probabilities.len() <= n {
            let k = self.probabilities.len();
            self.probabilities.push(format!("{:.10}", 1.0 / k as f64));
        }
        &self.probabilities[n]
    }

    fn view<'s>(&self, st: &'s ServicePortState) -> Option<PortView<'s>> {
        let p = &st.port;
        let family = self.family;
        let cluster_ip = family.filter(&p.cluster_ips).next()?;
        let s = st.selected_in(family, self.node);
        let (cluster, local, reachable, has_any) =
            (s.cluster.clone(), s.local.clone(), s.all_reachable.clone(), s.has_any);
        Some(PortView {
            st,
            raw_name: port_name_string(&p.name),
            name: comment_safe(&port_name_string(&p.name)),
            proto: proto_lower(p.protocol),
            cluster_ip,
            external_ips: family.filter(&p.external_ips).collect(),
            lb_ips: family.filter(&p.load_balancer_ips).collect(),
            source_ranges: p
                .load_balancer_source_ranges
                .iter()
                .filter(|c| c.family() == family)
                .copied()
                .collect(),
            cluster,
            local,
            reachable,
            has_any,
        })
    }

    /// Generates the restore input for `desired`.
    ///
    /// `write_port(name)` says whether a service port's own chains (SVC/SVL/EXT/FW/SEP) are written; those not
    /// written are left as they are in the kernel (`--noflush`), exactly like kube-proxy's partial sync.
    pub fn generate(&mut self, desired: &Snapshot, write_port: &dyn Fn(&ServicePortName) -> bool) -> Ruleset {
        let n = desired.len();
        let mut filter_chains = Buf::with_capacity(512);
        let mut filter_rules = Buf::with_capacity(4096 + n * 64);
        let mut nat_chains = Buf::with_capacity(1024 + n * 64);
        let mut nat_rules = Buf::with_capacity(4096 + n * 400);
        let mut own_rules = Buf::with_capacity(n * 400);
        let mut scratch_chains = Buf::with_capacity(1024);
        let mut scratch = Buf::with_capacity(4096);
        let mut port_chains = HashMap::new();
        let mut skipped_rules = 0usize;

        for c in FILTER_CHAINS {
            filter_chains.chain(c);
        }
        for c in NAT_TOP_CHAINS {
            nat_chains.chain(c);
        }
        let mark = self.masq_mark.clone();
        nat_rules.rule(POSTROUTING, format_args!(" -m mark ! --mark {mark}/{mark} -j RETURN"));
        nat_rules.rule(POSTROUTING, format_args!(" -j MARK --xor-mark {mark}"));
        let random = if self.opts.random_fully { " --random-fully" } else { "" };
        nat_rules.rule(
            POSTROUTING,
            format_args!(" -m comment --comment \"orca service traffic requiring SNAT\" -j MASQUERADE{random}"),
        );
        nat_rules.rule(MARK_MASQ, format_args!(" -j MARK --or-mark {mark}"));
        if self.cluster_cidrs.len() > 1 && !self.cfg.masquerade_all {
            nat_chains.chain(MASQ_OFF_CLUSTER);
            for c in &self.cluster_cidrs {
                nat_rules.rule(MASQ_OFF_CLUSTER, format_args!(" -s {c} -j RETURN"));
            }
            nat_rules.rule(MASQ_OFF_CLUSTER, format_args!(" -j {MARK_MASQ}"));
        }

        if self.localhost_nodeports {
            // kube-proxy's (and kubelet's) guard against the route_localnet hole (kubernetes issue 90259).
            filter_rules.rule(
                FIREWALL,
                format_args!(
                    " -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 \
                 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
                ),
            );
        }

        let total_endpoints: usize = desired.values().map(|s| s.endpoints.len()).sum();
        let large = total_endpoints > LARGE_CLUSTER_ENDPOINTS;

        for (pname, st) in desired {
            let Some(v) = self.view(st) else {
                tracing::trace!(service = %pname, family = %self.family, "no cluster IP of the family: not programmed by its iptables dataplane");
                continue;
            };
            let write = write_port(pname);
            let mut chains = Vec::new();
            if write {
                self.port_rules(
                    &v,
                    large,
                    &mut filter_rules,
                    &mut nat_rules,
                    &mut nat_chains,
                    &mut own_rules,
                    &mut chains,
                );
                port_chains.insert(pname.clone(), chains);
            } else {
                scratch_chains.s.clear();
                scratch.s.clear();
                scratch.lines = 0;
                self.port_rules(
                    &v,
                    large,
                    &mut filter_rules,
                    &mut nat_rules,
                    &mut scratch_chains,
                    &mut scratch,
                    &mut chains,
                );
                skipped_rules += scratch.lines;
            }
        }

        // Tail call to the NodePorts chain: must stay the last rule of ORCA-SERVICES.
        const NP_COMMENT: &str = "\"orca service nodeports; NOTE: this must be the last rule in this chain\"";
        match &self.nodeports {
            NodePortDest::All { localhost } => {
                let loopback = self.family.loopback_cidr();
                let not_loopback = if *localhost {
                    String::new()
                } else {
                    format!(" ! -d {loopback}")
                };
                nat_rules.rule(
                    SERVICES,
                    format_args!(
                        " -m comment --comment {NP_COMMENT} -m addrtype --dst-type LOCAL{not_loopback} -j {NODEPORTS}"
                    ),
                );
            }
            NodePortDest::Ips(ips) => {
                for ip in ips {
                    if ip.is_loopback() && !self.localhost_nodeports {
                        continue;
                    }
                    nat_rules.rule(
                        SERVICES,
                        format_args!(" -m comment --comment {NP_COMMENT} -d {ip} -j {NODEPORTS}"),
                    );
                }
            }
        }

        if !self.opts.conntrack_tcp_liberal {
            filter_rules.rule(FORWARD, format_args!(" -m conntrack --ctstate INVALID -j DROP"));
        }
        filter_rules.rule(
            FORWARD,
            format_args!(" -m comment --comment \"orca forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"),
        );
        filter_rules.rule(FORWARD, format_args!(" -m comment --comment \"orca forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"));

        nat_rules.s.push_str(&own_rules.s);
        nat_rules.lines += own_rules.lines;
        drop(own_rules);
        let rules_written = filter_rules.lines + nat_rules.lines;
        Ruleset {
            filter_chains: filter_chains.s,
            filter_rules: filter_rules.s,
            nat_chains: nat_chains.s,
            nat_rules: nat_rules.s,
            chain_lines: filter_chains.lines + nat_chains.lines,
            port_chains,
            masq_off_cluster: self.cluster_cidrs.len() > 1 && !self.cfg.masquerade_all,
            rules_written,
            rules_total: rules_written + skipped_rules,
            localhost_nodeports: self.localhost_nodeports,
        }
    }

    /// The rules of one service port: filter rules, dispatch rules into ORCA-SERVICES / ORCA-NODEPORTS (`nat`),
    /// and its own chains (`own_chains`, `own`). Its own chain names go to `chains`.
    #[allow(clippy::too_many_arguments)]
    fn port_rules(
        &mut self,
        v: &PortView<'_>,
        large: bool,
        filter: &mut Buf,
        nat: &mut Buf,
        nat_chains: &mut Buf,
        own: &mut Buf,
        chains: &mut Vec<String>,
    ) {
        let p = &v.st.port;
        let name = v.name.as_str();
        let raw = v.raw_name.as_str();
        let proto = v.proto;
        let port = p.port;
        let svc = port_chain("ORCA-SVC-", raw, proto);
        let svl = port_chain("ORCA-SVL-", raw, proto);
        let ext = port_chain("ORCA-EXT-", raw, proto);
        let fw = port_chain("ORCA-FW-", raw, proto);

        let uses_cluster_chain = !v.cluster.is_empty() && p.uses_cluster_endpoints();
        let uses_local_chain = !v.local.is_empty() && p.uses_local_endpoints();
        let has_endpoints = v.has_any;

        let mut internal_chain = &svc;
        let mut has_internal = has_endpoints;
        if p.internal_policy_local() {
            internal_chain = &svl;
            has_internal &= !v.local.is_empty();
        }
        let mut external_policy_chain = &svc;
        let mut has_external = has_endpoints;
        if p.external_policy_local() {
            external_policy_chain = &svl;
            has_external &= !v.local.is_empty();
        }
        let uses_ext_chain = has_endpoints && p.externally_accessible();
        let uses_fw_chain = has_endpoints && !v.lb_ips.is_empty() && !v.source_ranges.is_empty();
        let lb_chain = if uses_fw_chain { &fw } else { &ext };

        let (int_target, int_comment, ext_target, ext_comment) = if !has_endpoints {
            let c = format!("\"{name} has no endpoints\"");
            ("REJECT", c.clone(), "REJECT", c)
        } else {
            let c = format!("\"{name} has no local endpoints\"");
            ("DROP", c.clone(), "DROP", c)
        };

        // ClusterIP.
        if has_internal {
            nat.rule(SERVICES, format_args!(" -m comment --comment \"{name} {CLUSTER_IP_COMMENT}\" -m {proto} -p {proto} -d {} --dport {port} -j {internal_chain}",
                v.cluster_ip));
        } else {
            filter.rule(
                SERVICES,
                format_args!(
                    " -m comment --comment {int_comment} -m {proto} -p {proto} -d {} --dport {port} -j {int_target}",
                    v.cluster_ip
                ),
            );
        }

        // External IPs.
        for ip in &v.external_ips {
            if has_endpoints {
                nat.rule(SERVICES, format_args!(" -m comment --comment \"{name} external IP\" -m {proto} -p {proto} -d {ip} --dport {port} -j {ext}"));
            }
            if !has_external {
                filter.rule(EXTERNAL_SERVICES, format_args!(" -m comment --comment {ext_comment} -m {proto} -p {proto} -d {ip} --dport {port} -j {ext_target}"));
            }
        }

        // Load-balancer ingress IPs.
        for ip in &v.lb_ips {
            if has_endpoints {
                nat.rule(SERVICES, format_args!(" -m comment --comment \"{name} loadbalancer IP\" -m {proto} -p {proto} -d {ip} --dport {port} -j {lb_chain}"));
            }
            if uses_fw_chain {
                filter.rule(PROXY_FIREWALL, format_args!(" -m comment --comment \"{name} traffic not accepted by {fw}\" -m {proto} -p {proto} -d {ip} --dport {port} -j DROP"));
            }
        }
        if !has_external {
            for ip in &v.lb_ips {
                filter.rule(EXTERNAL_SERVICES, format_args!(" -m comment --comment {ext_comment} -m {proto} -p {proto} -d {ip} --dport {port} -j {ext_target}"));
            }
        }

        // NodePort.
        if let Some(np) = p.node_port {
            if has_endpoints {
                nat.rule(
                    NODEPORTS,
                    format_args!(" -m comment --comment {name} -m {proto} -p {proto} --dport {np} -j {ext}"),
                );
            }
            if !has_external {
                filter.rule(EXTERNAL_SERVICES, format_args!(" -m comment --comment {ext_comment} -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j {ext_target}"));
            }
        }

        // Health check NodePort: always accepted.
        if let Some(hc) = p.health_check_node_port {
            filter.rule(
                NODEPORTS,
                format_args!(
                    " -m comment --comment \"{name} health check node port\" -m tcp -p tcp --dport {hc} -j ACCEPT"
                ),
            );
        }

        // Everything below lives in the service port's own chains.
        let nat = own;

        if has_internal {
            let args = format!(
                " -m comment --comment \"{name} {CLUSTER_IP_COMMENT}\" -m {proto} -p {proto} -d {} --dport {port}",
                v.cluster_ip
            );
            if self.cfg.masquerade_all {
                nat.rule(internal_chain, format_args!("{args} -j {MARK_MASQ}"));
            } else if self.cluster_cidrs.len() == 1 {
                nat.rule(
                    internal_chain,
                    format_args!("{args} ! -s {} -j {MARK_MASQ}", self.cluster_cidrs[0]),
                );
            } else if self.cluster_cidrs.len() > 1 {
                nat.rule(internal_chain, format_args!("{args} -j {MASQ_OFF_CLUSTER}"));
            }
        }

        if uses_ext_chain {
            nat_chains.chain(&ext);
            chains.push(ext.clone());
            if !p.external_policy_local() {
                nat.rule(
                    &ext,
                    format_args!(
                        " -m comment --comment \"masquerade traffic for {name} external destinations\" -j {MARK_MASQ}"
                    ),
                );
            } else {
                if uses_cluster_chain {
                    for c in &self.cluster_cidrs {
                        nat.rule(&ext, format_args!(" -m comment --comment \"pod traffic for {name} external destinations\" -s {c} -j {svc}"));
                    }
                }
                nat.rule(&ext, format_args!(" -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {MARK_MASQ}"));
                if uses_cluster_chain {
                    nat.rule(&ext, format_args!(" -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {svc}"));
                }
            }
            if has_external {
                nat.rule(&ext, format_args!(" -j {external_policy_chain}"));
            }
        }

        if uses_fw_chain {
            nat_chains.chain(&fw);
            chains.push(fw.clone());
            let mut allow_from_node = false;
            for c in &v.source_ranges {
                nat.rule(
                    &fw,
                    format_args!(" -m comment --comment \"{name} loadbalancer IP\" -s {c} -j {ext}"),
                );
                if self.node_ip.is_some_and(|ip| c.contains(ip)) {
                    allow_from_node = true;
                }
            }
            if allow_from_node {
                for ip in &v.lb_ips {
                    nat.rule(
                        &fw,
                        format_args!(" -m comment --comment \"{name} loadbalancer IP\" -s {ip} -j {ext}"),
                    );
                }
            }
            nat.rule(
                &fw,
                format_args!(" -m comment --comment \"other traffic to {name} will be dropped by {PROXY_FIREWALL}\""),
            );
        }

        let affinity = p.session_affinity.map(|d| d.as_secs());
        if uses_cluster_chain {
            nat_chains.chain(&svc);
            chains.push(svc.clone());
            self.endpoint_dispatch(nat, (name, raw), proto, &svc, &v.cluster, affinity, large);
        }
        if uses_local_chain {
            nat_chains.chain(&svl);
            chains.push(svl.clone());
            self.endpoint_dispatch(nat, (name, raw), proto, &svl, &v.local, affinity, large);
        }

        let comment = if large {
            String::new()
        } else {
            format!(" -m comment --comment {name}")
        };
        for ep in v.reachable.iter() {
            let addr = ep.addr_string();
            let sep = sep_chain_of(raw, proto, &addr);
            nat_chains.chain(&sep);
            nat.rule(&sep, format_args!("{comment} -s {} -j {MARK_MASQ}", ep.ip));
            nat.rule_with(&sep, |r| {
                r.push_str(&comment);
                if affinity.is_some() {
                    let _ = write!(r, " -m recent --name {sep} --set");
                }
                let _ = write!(r, " -m {proto} -p {proto} -j DNAT --to-destination {addr}");
            });
            chains.push(sep);
        }
    }

    /// kube-proxy's writeServiceToEndpointRules: affinity checks first, then the random choice.
    #[allow(clippy::too_many_arguments)]
    fn endpoint_dispatch(
        &mut self,
        nat: &mut Buf,
        (name, raw): (&str, &str),
        proto: &str,
        chain: &str,
        eps: &[Endpoint],
        affinity: Option<u64>,
        large: bool,
    ) {
        let seps: Vec<(String, String)> = eps
            .iter()
            .map(|e| {
                let a = e.addr_string();
                (sep_chain_of(raw, proto, &a), a)
            })
            .collect();
        if let Some(secs) = affinity {
            for (sep, addr) in &seps {
                nat.rule_with(chain, |r| {
                    if !large {
                        let _ = write!(r, " -m comment --comment \"{name} -> {addr}\"");
                    }
                    let _ = write!(r, " -m recent --name {sep} --rcheck --seconds {secs} --reap -j {sep}");
                });
            }
        }
        let n = seps.len();
        for (i, (sep, addr)) in seps.iter().enumerate() {
            let prob = if i + 1 < n {
                Some(self.probability(n - i).to_string())
            } else {
                None
            };
            nat.rule_with(chain, |r| {
                if !large {
                    let _ = write!(r, " -m comment --comment \"{name} -> {addr}\"");
                }
                if let Some(prob) = prob {
                    let _ = write!(r, " -m statistic --mode random --probability {prob}");
                }
                let _ = write!(r, " -j {sep}");
            });
        }
    }
}
