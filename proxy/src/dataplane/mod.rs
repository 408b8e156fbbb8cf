//! The dataplane interface: one implementation per kernel mechanism (iptables, eBPF) applies the model's diffs.

pub mod dual;
pub mod ebpf;
pub mod iptables;

use std::fmt;

use crate::model::state::Snapshot;
use crate::model::tracker::Diff;
use crate::model::{Cidr, NodeInfo};

/// Which dataplane programs the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    Ebpf,
    Iptables,
}

impl fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyMode::Ebpf => "ebpf",
            ProxyMode::Iptables => "iptables",
        })
    }
}

/// Settings every dataplane honours (kube-proxy's flags of the same names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// `--cluster-cidr`: traffic to a ClusterIP from outside these ranges is masqueraded.
    pub cluster_cidrs: Vec<Cidr>,
    /// `--nodeport-addresses`: the local addresses NodePorts answer on; empty means every local address (unless
    /// `nodeport_primary`).
    pub nodeport_addresses: Vec<Cidr>,
    /// `--nodeport-addresses primary`: NodePorts answer on the Node object's addresses only.
    pub nodeport_primary: bool,
    /// `--masquerade-all`: masquerade every packet sent to a ClusterIP.
    pub masquerade_all: bool,
    /// `--iptables-masquerade-bit` (0..=31): the fwmark bit that asks for SNAT.
    pub masquerade_bit: u8,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            cluster_cidrs: vec![],
            nodeport_addresses: vec![],
            nodeport_primary: false,
            masquerade_all: false,
            masquerade_bit: 14,
        }
    }
}

/// What one sync did, for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    /// Rules (iptables) or map entries (eBPF) written.
    pub objects_written: usize,
    /// Service ports programmed after the sync.
    pub service_ports: usize,
    /// Service ports the dataplane could not program (e.g. a full BPF map): left as they were, retried on every
    /// later sync, while every other Service is programmed.
    pub failed_service_ports: usize,
    /// The stale UDP conntrack entries could not be deleted (retried on the next sync).
    pub conntrack_cleanup_failed: bool,
}

/// A dataplane: turns the desired state into kernel state.
///
/// `apply` gets the diff since the previous sync together with the complete desired state after it; `full_sync`
/// reprograms everything and removes whatever Orca owns that is not desired (start-up and `--sync-period`). An
/// error from `apply` makes the runner fall back to `full_sync` on the next round.
pub trait Dataplane: Send {
    fn mode(&self) -> ProxyMode;

    fn full_sync(&mut self, desired: &Snapshot, node: &NodeInfo) -> anyhow::Result<SyncStats>;

    fn apply(&mut self, diff: &Diff, desired: &Snapshot, node: &NodeInfo) -> anyhow::Result<SyncStats>;

    /// Removes every rule, program, map and pin this dataplane owns.
    fn cleanup(&mut self) -> anyhow::Result<()>;

    /// The ClusterIP frontends this dataplane has programmed, with the backends each sends to, read back from the
    /// kernel (never from its own memory) by the module that writes them: what `status --verify` compares with
    /// [`crate::verify::desired_cluster_frontends`].
    fn cluster_frontends(&self, desired: &Snapshot, node: &NodeInfo) -> anyhow::Result<crate::verify::FrontendMap>;

    /// A reader of the datapath's own counters for the metrics (the eBPF dataplane's drops, map occupancy).
    fn datapath_source(&self) -> Option<ebpf::DatapathSource> {
        None
    }

    /// The IP families this dataplane programs (IPv4 unless it runs one per family).
    fn families(&self) -> Vec<crate::model::IpFamily> {
        vec![crate::model::IpFamily::V4]
    }

    /// What the dataplane runs without, found at start (the agent logs each, records a Warning Event and sets
    /// `orca_dataplane_degraded{reason}`).
    fn degraded(&self) -> Vec<Degraded> {
        Vec::new()
    }
}

/// Something the dataplane needs from the node and runs without: the agent keeps serving, but an admin must know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Degraded {
    /// A CamelCase reason (Event reason suffix and metric label).
    pub reason: &'static str,
    pub message: String,
}

impl Degraded {
    /// The bpffs holding the pins dies with the agent: a restart drops every Service until the new agent runs.
    pub const BPFFS_NOT_PERSISTENT: &'static str = "BpffsNotPersistent";
    /// No cgroup v2 hierarchy: no socket hooks, so host-network clients get no translation.
    pub const NO_CGROUP2: &'static str = "NoCgroup2";
    /// The cgroup v2 mount is a private cgroup namespace's: only processes below it get translation.
    pub const CGROUP_NOT_ROOT: &'static str = "CgroupNotRoot";
    /// The kernel cannot load the socket hooks (before 5.18).
    pub const KERNEL_WITHOUT_SOCKET_HOOKS: &'static str = "KernelWithoutSocketHooks";

    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

pub mod select;

/// `orca-proxy status`'s read-back, without a running dataplane: the pinned eBPF maps under `bpf_root` when they
/// exist, else the iptables rules of the calling process's namespace. The first value names what was read.
pub fn read_back_cluster_frontends(
    bpf_root: &std::path::Path,
    desired: &Snapshot,
    node: &NodeInfo,
) -> anyhow::Result<(String, crate::verify::FrontendMap)> {
    let maps_dir = ebpf::pinned_maps_dir(bpf_root);
    match ebpf::dump(bpf_root) {
        // Both families' frontends: the eBPF maps hold IPv4 and IPv6 Services.
        Ok(views) => Ok((
            format!("ebpf maps in {}", maps_dir.display()),
            ebpf::dump::cluster_frontends(&views, desired, &node.addresses),
        )),
        Err(e) => {
            eprintln!(
                "no eBPF state found in {} ({e:#}); reading iptables instead (if the agent runs in eBPF mode, \
                 pass its --bpf-root and run this in the node's mount namespace)",
                maps_dir.display()
            );
            Ok((
                "iptables and ip6tables nat and filter tables".to_string(),
                iptables::readback::read_cluster_frontends(None)?,
            ))
        }
    }
}
