//! The agent's settings: flags and the config file (`--config`, kube-proxy's KubeProxyConfiguration with an
//! `orca:` section) resolved into what `run`, `status` and `cleanup` need.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::{parse_bind, Flags, LogFormat};
use crate::dataplane::{DataplaneConfig, ProxyMode};
use crate::sync::SyncConfig;

/// Everything `run` needs, resolved from flags (and the config file).
#[derive(Debug, Clone)]
pub struct Settings {
    pub kubeconfig: Option<PathBuf>,
    pub master: Option<String>,
    pub node_name: String,
    pub mode: ProxyMode,
    pub allow_fallback: bool,
    pub dataplane: DataplaneConfig,
    pub sync: SyncConfig,
    pub healthz: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub bpf_root: PathBuf,
    /// The eBPF dataplane's backend choice for Services without the `orca.dev/load-balancing` annotation.
    pub load_balancing: crate::model::LoadBalancing,
    /// eBPF interface selection; empty means the defaults of `EbpfOptions`.
    pub pod_interface_prefixes: Vec<String>,
    pub pod_interfaces: Vec<String>,
    pub uplinks: Vec<String>,
    pub bypass_netfilter: bool,
    /// `--ebpf-cgroup-root`: where the socket hooks attach (`none`: nowhere); unset, the cgroup v2 mount found.
    pub cgroup_root: Option<PathBuf>,
    /// `--ebpf-tc-attach`.
    pub tc_attach: crate::dataplane::ebpf::loader::TcAttach,
    pub conntrack: crate::dataplane::ebpf::ConntrackOptions,
    pub verbosity: u8,
    pub log_format: LogFormat,
}

pub const DEFAULT_HEALTHZ: &str = "0.0.0.0:10256";
pub const DEFAULT_METRICS: &str = "127.0.0.1:10249";
pub const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf/orca";

/// This machine's hostname, lowercased, as kube-proxy derives the node name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_default()
}

impl Settings {
    pub fn from_flags(flags: &Flags) -> anyhow::Result<Self> {
        let merged;
        let f = match &flags.config {
            Some(path) => {
                merged = crate::config::merge(flags, crate::config::load(path)?);
                &merged
            }
            None => flags,
        };
        let mode = f.proxy_mode.unwrap_or(ProxyMode::Ebpf);
        let node_name = f
            .hostname_override
            .clone()
            .map(|s| s.trim().to_lowercase())
            .unwrap_or_else(hostname);
        anyhow::ensure!(
            !node_name.is_empty(),
            "cannot determine the node name; set --hostname-override"
        );
        let default_min = if mode == ProxyMode::Iptables {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        };
        let sync = SyncConfig {
            min_sync_period: f.min_sync_period.unwrap_or(default_min),
            sync_period: f.sync_period.unwrap_or(Duration::from_secs(30)),
        };
        anyhow::ensure!(!sync.sync_period.is_zero(), "--sync-period must be greater than 0");
        let (nodeport_cidrs, nodeport_primary) = crate::cli::split_nodeport_addresses(&f.nodeport_addresses)
            .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}"))?;
        let healthz = parse_bind(f.healthz_bind_address.as_deref().unwrap_or(DEFAULT_HEALTHZ), 10256)
            .map_err(|e| anyhow::anyhow!("--healthz-bind-address: {e}"))?;
        let metrics = parse_bind(f.metrics_bind_address.as_deref().unwrap_or(DEFAULT_METRICS), 10249)
            .map_err(|e| anyhow::anyhow!("--metrics-bind-address: {e}"))?;
        Ok(Settings {
            kubeconfig: f.kubeconfig.clone(),
            master: f.master.clone(),
            node_name,
            mode,
            allow_fallback: !f.no_fallback,
            dataplane: DataplaneConfig {
                cluster_cidrs: f.cluster_cidr.clone(),
                nodeport_addresses: nodeport_cidrs,
                nodeport_primary,
                masquerade_all: f.masquerade_all,
                masquerade_bit: f.iptables_masquerade_bit.unwrap_or(14),
            },
            sync,
            healthz,
            metrics,
            bpf_root: f.bpf_root.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_BPF_ROOT)),
            load_balancing: f.ebpf_load_balancing.unwrap_or_default(),
            pod_interface_prefixes: f.ebpf_pod_interface_prefixes.clone(),
            pod_interfaces: f.ebpf_pod_interfaces.clone(),
            uplinks: f.ebpf_uplinks.clone(),
            bypass_netfilter: f.ebpf_bypass_netfilter,
            cgroup_root: f.ebpf_cgroup_root.clone(),
            tc_attach: f.ebpf_tc_attach.unwrap_or_default(),
            conntrack: conntrack_options(f),
            verbosity: f.verbosity.unwrap_or(0),
            log_format: f.log_format.unwrap_or(LogFormat::Text),
        })
    }
}

/// Sets up tracing with kube-proxy-like verbosity levels; RUST_LOG overrides.
/// The eBPF conntrack from kube-proxy's conntrack flags and Orca's own (a zero timeout keeps the default, as
/// kube-proxy leaves the kernel's value then).
fn conntrack_options(f: &Flags) -> crate::dataplane::ebpf::ConntrackOptions {
    let mut c = crate::dataplane::ebpf::ConntrackOptions::default();
    if let Some(n) = f.ebpf_conntrack_max {
        c.max_flows = n;
    }
    if let Some(r) = f.ebpf_snat_port_range {
        c.snat_ports = r;
    }
    let t = &mut c.timeouts;
    for (flag, field) in [
        (f.conntrack_tcp_timeout_established, &mut t.tcp_established_ns),
        (f.conntrack_tcp_timeout_close_wait, &mut t.tcp_close_wait_ns),
        (f.conntrack_udp_timeout, &mut t.udp_ns),
        (f.conntrack_udp_timeout_stream, &mut t.udp_stream_ns),
    ] {
        if let Some(d) = flag.filter(|d| !d.is_zero()) {
            *field = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        }
    }
    c
}
