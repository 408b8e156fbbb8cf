//! The eBPF dataplane's options: where the pins live, which interfaces get the programs, and the conntrack's
//! capacity, lifetimes and masquerade ports.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

use orca_common::{CtTimeouts, NatPorts};

use super::loader;

/// Where and on which interfaces the programs go.
#[derive(Debug, Clone)]
pub struct EbpfOptions {
    /// bpffs directory for pins; mounted when it is not on a bpffs.
    pub bpf_root: PathBuf,
    /// Interfaces whose name starts with one of these are pod veths (host side).
    pub pod_interface_prefixes: Vec<String>,
    /// Explicit pod interfaces (in addition to the prefixes).
    pub pod_interfaces: Vec<String>,
    /// Node uplinks; empty means the interfaces holding one of the node's addresses, else the
    /// ones carrying a default route (either family).
    pub uplinks: Vec<String>,
    /// cgroup (v2) whose processes get socket-level translation when they run in the agent's
    /// network namespace (host processes, hostNetwork pods): the agent passes the root of the host's cgroup v2
    /// hierarchy ([`loader::choose_cgroup`]). `None` (the default) disables the hooks.
    pub cgroup: Option<PathBuf>,
    /// Why host-network clients will not all be translated, found while choosing `cgroup`.
    pub cgroup_warning: Option<crate::dataplane::Degraded>,
    /// Choose backends by Maglev consistent hashing instead of at random.
    pub maglev: bool,
    /// Translated packets are forwarded by the programs (FIB lookup and redirect) instead of going through the
    /// node's routing and netfilter (`--ebpf-bypass-netfilter`).
    pub bypass_netfilter: bool,
    pub conntrack: ConntrackOptions,
    /// TCX or clsact (`--ebpf-tc-attach`).
    pub tc_attach: loader::TcAttach,
}

/// The eBPF conntrack's capacity, lifetimes and masquerade ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackOptions {
    /// Flows the conntrack map holds (`--ebpf-conntrack-max`); the map has two entries per flow (a masqueraded
    /// flow takes three).
    pub max_flows: u32,
    pub timeouts: CtTimeouts,
    /// Masquerade source ports (inclusive), before the node's ephemeral range is cut out.
    pub snat_ports: (u16, u16),
}

impl Default for ConntrackOptions {
    fn default() -> Self {
        Self {
            max_flows: DEFAULT_CONNTRACK_MAX,
            timeouts: CtTimeouts::DEFAULT,
            snat_ports: (orca_common::NAT_PORT_MIN, orca_common::NAT_PORT_MAX),
        }
    }
}

/// Default `--ebpf-conntrack-max`: a million flows.
pub const DEFAULT_CONNTRACK_MAX: u32 = 1 << 20;

impl ConntrackOptions {
    /// Entries of the conntrack map.
    pub fn entries(&self) -> u32 {
        self.max_flows.saturating_mul(2).max(1024)
    }

    /// The masquerade ports without the ephemeral range of the calling thread's network namespace
    /// (`net.ipv4.ip_local_port_range`), so the node's own connections never pick a port a masqueraded flow
    /// holds.
    pub fn nat_ports(&self) -> Result<NatPorts> {
        let eph = ephemeral_ports();
        let (lo, hi) = self.snat_ports;
        NatPorts::new(lo, hi, eph).with_context(|| {
            format!(
                "no masquerade source port left: the range {lo}-{hi} lies inside the node's ephemeral ports {eph:?} \
                 (net.ipv4.ip_local_port_range)"
            )
        })
    }
}

/// `net.ipv4.ip_local_port_range` of the calling thread's network namespace.
pub fn ephemeral_ports() -> Option<(u16, u16)> {
    let s = crate::netns::sysctl_get("net.ipv4.ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Some((a, b)),
        _ => None,
    }
}

impl Default for EbpfOptions {
    fn default() -> Self {
        Self {
            bpf_root: PathBuf::from("/sys/fs/bpf/orca"),
            // Calico, plain veth CNIs (bridge/ptp: veth*), Cilium-style lxc*, the sandbox's pods.
            pod_interface_prefixes: ["cali", "veth", "lxc", "orca-p"].map(String::from).to_vec(),
            pod_interfaces: vec![],
            uplinks: vec![],
            cgroup: None,
            cgroup_warning: None,
            maglev: false,
            bypass_netfilter: false,
            conntrack: ConntrackOptions::default(),
            tc_attach: loader::TcAttach::Auto,
        }
    }
}
