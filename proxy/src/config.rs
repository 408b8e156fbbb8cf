//! kube-proxy's configuration file (`kubeproxy.config.k8s.io/v1alpha1` KubeProxyConfiguration) plus an `orca`
//! section for what kube-proxy lacks. Every kube-proxy field is accepted; the ones Orca acts on are validated, an
//! unknown field or an invalid value stops the start with an error naming the field and the value.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;

use crate::cli::{parse_cidr, parse_duration, Flags, LogFormat};
use crate::dataplane::ProxyMode;
use crate::model::Cidr;

type Any = serde_yaml::Value;

// Fields Orca does not act on are still parsed, so a kube-proxy file is accepted as it is.
#[allow(dead_code)]
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileConfig {
    api_version: Option<String>,
    kind: Option<String>,
    feature_gates: Option<Any>,
    client_connection: Option<ClientConnection>,
    logging: Option<Logging>,
    hostname_override: Option<String>,
    bind_address: Option<String>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    bind_address_hard_fail: Option<bool>,
    enable_profiling: Option<bool>,
    show_hidden_metrics_for_version: Option<String>,
    mode: Option<String>,
    iptables: Option<RuleSync>,
    nftables: Option<RuleSync>,
    ipvs: Option<Any>,
    winkernel: Option<Any>,
    detect_local_mode: Option<String>,
    detect_local: Option<Any>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    node_port_addresses: Option<Vec<String>>,
    oom_score_adj: Option<i32>,
    conntrack: Option<ConntrackSection>,
    config_sync_period: Option<String>,
    port_range: Option<String>,
    windows_run_as_service: Option<bool>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
    ip_family_policy: Option<Any>,
    orca: Option<OrcaSection>,
}

#[allow(dead_code)]
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ClientConnection {
    kubeconfig: Option<String>,
    accept_content_types: Option<String>,
    content_type: Option<String>,
    qps: Option<f64>,
    burst: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Logging {
    format: Option<String>,
    verbosity: Option<u8>,
    #[serde(flatten)]
    _rest: std::collections::BTreeMap<String, Any>,
}

#[allow(dead_code)]
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleSync {
    masquerade_bit: Option<i64>,
    masquerade_all: Option<bool>,
    localhost_node_ports: Option<bool>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

/// kube-proxy's conntrack settings. In eBPF mode Orca's own conntrack uses the timeouts; the sizes of the kernel's
/// table (`maxPerCore`, `min`) and `tcpBeLiberal` are accepted and not used (`orca.conntrackMax` sizes Orca's).
#[allow(dead_code)]
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConntrackSection {
    max_per_core: Option<i64>,
    min: Option<i64>,
    tcp_established_timeout: Option<String>,
    tcp_close_wait_timeout: Option<String>,
    tcp_be_liberal: Option<bool>,
    udp_timeout: Option<String>,
    udp_stream_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OrcaSection {
    /// Refuse to fall back to iptables when eBPF cannot load.
    no_fallback: Option<bool>,
    /// Where eBPF objects are pinned.
    bpf_root: Option<String>,
    /// `random` or `maglev` (`--ebpf-load-balancing`).
    load_balancing: Option<String>,
    /// `--ebpf-pod-interface-prefixes`.
    pod_interface_prefixes: Option<Vec<String>>,
    /// `--ebpf-pod-interfaces`.
    pod_interfaces: Option<Vec<String>>,
    /// `--ebpf-uplinks`.
    uplinks: Option<Vec<String>>,
    /// `--ebpf-bypass-netfilter`.
    bypass_netfilter: Option<bool>,
    /// `--ebpf-cgroup-root` (a path, or `none`).
    cgroup_root: Option<String>,
    /// `--ebpf-conntrack-max` (flows).
    conntrack_max: Option<u32>,
    /// `--ebpf-snat-port-range` ("MIN-MAX").
    snat_port_range: Option<String>,
}

/// The values of a config file that Orca uses, validated.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileSettings {
    pub kubeconfig: Option<PathBuf>,
    pub hostname_override: Option<String>,
    pub mode: Option<ProxyMode>,
    pub cluster_cidrs: Vec<Cidr>,
    pub nodeport_addresses: Vec<crate::cli::NodePortAddress>,
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<u8>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub verbosity: Option<u8>,
    pub log_format: Option<LogFormat>,
    pub no_fallback: Option<bool>,
    pub bpf_root: Option<PathBuf>,
    pub load_balancing: Option<crate::model::LoadBalancing>,
    pub pod_interface_prefixes: Vec<String>,
    pub pod_interfaces: Vec<String>,
    pub uplinks: Vec<String>,
    pub bypass_netfilter: Option<bool>,
    pub cgroup_root: Option<PathBuf>,
    pub conntrack_max: Option<u32>,
    pub snat_port_range: Option<(u16, u16)>,
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
}

/// Interface names (or name prefixes): non-empty, at most IFNAMSIZ-1 bytes, no '/' or white space.
fn interfaces(field: &str, v: Option<&Vec<String>>) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for name in v.map(Vec::as_slice).unwrap_or_default() {
        if !crate::cli::valid_ifname(name) {
            bail!("{field}: invalid value {name:?}: not an interface name");
        }
        out.push(name.clone());
    }
    Ok(out)
}

fn duration(field: &str, v: &Option<String>) -> anyhow::Result<Option<Duration>> {
    v.as_deref()
        .map(|s| parse_duration(s).map_err(|e| anyhow!("{field}: invalid value {s:?}: {e}")))
        .transpose()
}

/// Parses and validates a KubeProxyConfiguration document.
pub fn parse(text: &str) -> anyhow::Result<FileSettings> {
    let f: FileConfig = serde_yaml::from_str(text).map_err(|e| anyhow!("{e}"))?;
    if let Some(k) = f.kind.as_deref().filter(|k| *k != "KubeProxyConfiguration") {
        bail!("kind: invalid value {k:?}: expected KubeProxyConfiguration");
    }
    if let Some(v) = f
        .api_version
        .as_deref()
        .filter(|v| *v != "kubeproxy.config.k8s.io/v1alpha1")
    {
        bail!("apiVersion: invalid value {v:?}: expected kubeproxy.config.k8s.io/v1alpha1");
    }
    let mode = match f.mode.as_deref() {
        None | Some("") => None,
        Some("ebpf") => Some(ProxyMode::Ebpf),
        Some("iptables") => Some(ProxyMode::Iptables),
        Some(other) => bail!("mode: invalid value {other:?}: Orca supports \"ebpf\" and \"iptables\""),
    };
    // The rule-sync section of the chosen mode (iptables, or nftables' values when only those are set); the
    // top-level syncPeriod/minSyncPeriod win over both.
    let rs = f.iptables.as_ref().or(f.nftables.as_ref());
    let masquerade_bit = match rs.and_then(|r| r.masquerade_bit) {
        None => None,
        Some(b @ 0..=31) => Some(b as u8),
        Some(b) => bail!("iptables.masqueradeBit: invalid value {b}: must be within 0..=31"),
    };
    let sync_period = match duration("syncPeriod", &f.sync_period)? {
        Some(d) => Some(d),
        None => duration("iptables.syncPeriod", &rs.and_then(|r| r.sync_period.clone()))?,
    };
    if sync_period == Some(Duration::ZERO) {
        bail!("syncPeriod: invalid value \"0\": must be greater than 0");
    }
    let min_sync_period = match duration("minSyncPeriod", &f.min_sync_period)? {
        Some(d) => Some(d),
        None => duration("iptables.minSyncPeriod", &rs.and_then(|r| r.min_sync_period.clone()))?,
    };
    let mut cluster_cidrs = Vec::new();
    for c in f
        .cluster_cidr
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        cluster_cidrs.push(parse_cidr(c).map_err(|e| anyhow!("clusterCIDR: invalid value {c:?}: {e}"))?);
    }
    let mut nodeport_addresses = Vec::new();
    for c in f.node_port_addresses.as_deref().unwrap_or_default() {
        nodeport_addresses.push(
            crate::cli::parse_nodeport_address(c)
                .map_err(|e| anyhow!("nodePortAddresses: invalid value {c:?}: {e}"))?,
        );
    }
    crate::cli::split_nodeport_addresses(&nodeport_addresses)
        .map_err(|e| anyhow!("nodePortAddresses: invalid value {nodeport_addresses:?}: {e}"))?;
    let log_format = match f.logging.as_ref().and_then(|l| l.format.as_deref()) {
        None | Some("text") => None,
        Some("json") => Some(LogFormat::Json),
        Some(other) => bail!("logging.format: invalid value {other:?}: expected text or json"),
    };
    if let Some(d) = f
        .detect_local_mode
        .as_deref()
        .filter(|d| !matches!(*d, "" | "ClusterCIDR"))
    {
        bail!("detectLocalMode: invalid value {d:?}: Orca supports ClusterCIDR");
    }
    let orca = f.orca.as_ref();
    let load_balancing = match f.orca.as_ref().and_then(|o| o.load_balancing.as_deref()) {
        None => None,
        Some(v) => Some(
            v.parse::<crate::model::LoadBalancing>()
                .map_err(|e| anyhow!("orca.loadBalancing: invalid value {v:?}: {e}"))?,
        ),
    };
    let ct = f.conntrack.as_ref();
    let conntrack_max = match orca.and_then(|o| o.conntrack_max) {
        Some(n) if !(512..=1 << 26).contains(&n) => {
            bail!("orca.conntrackMax: invalid value {n}: must be within 512..=67108864")
        }
        n => n,
    };
    let snat_port_range = match orca.and_then(|o| o.snat_port_range.as_deref()) {
        None => None,
        Some(r) => {
            Some(crate::cli::parse_port_range(r).map_err(|e| anyhow!("orca.snatPortRange: invalid value {r:?}: {e}"))?)
        }
    };
    Ok(FileSettings {
        bypass_netfilter: orca.and_then(|o| o.bypass_netfilter),
        conntrack_max,
        snat_port_range,
        tcp_established_timeout: duration(
            "conntrack.tcpEstablishedTimeout",
            &ct.and_then(|c| c.tcp_established_timeout.clone()),
        )?,
        tcp_close_wait_timeout: duration(
            "conntrack.tcpCloseWaitTimeout",
            &ct.and_then(|c| c.tcp_close_wait_timeout.clone()),
        )?,
        udp_timeout: duration("conntrack.udpTimeout", &ct.and_then(|c| c.udp_timeout.clone()))?,
        udp_stream_timeout: duration(
            "conntrack.udpStreamTimeout",
            &ct.and_then(|c| c.udp_stream_timeout.clone()),
        )?,
        kubeconfig: f
            .client_connection
            .as_ref()
            .and_then(|c| c.kubeconfig.clone())
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
        hostname_override: f.hostname_override.filter(|s| !s.is_empty()),
        mode,
        cluster_cidrs,
        nodeport_addresses,
        masquerade_all: rs.and_then(|r| r.masquerade_all),
        masquerade_bit,
        sync_period,
        min_sync_period,
        healthz_bind_address: f.healthz_bind_address,
        metrics_bind_address: f.metrics_bind_address,
        verbosity: f.logging.as_ref().and_then(|l| l.verbosity),
        log_format,
        no_fallback: f.orca.as_ref().and_then(|o| o.no_fallback),
        bpf_root: f.orca.as_ref().and_then(|o| o.bpf_root.clone()).map(PathBuf::from),
        cgroup_root: f.orca.as_ref().and_then(|o| o.cgroup_root.clone()).map(PathBuf::from),
        load_balancing,
        pod_interface_prefixes: interfaces(
            "orca.podInterfacePrefixes",
            orca.and_then(|o| o.pod_interface_prefixes.as_ref()),
        )?,
        pod_interfaces: interfaces("orca.podInterfaces", orca.and_then(|o| o.pod_interfaces.as_ref()))?,
        uplinks: interfaces("orca.uplinks", orca.and_then(|o| o.uplinks.as_ref()))?,
    })
}

pub fn load(path: &Path) -> anyhow::Result<FileSettings> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    parse(&text).with_context(|| format!("config file {}", path.display()))
}

/// Fills every flag that was not given from the file: flags override the file.
pub fn merge(flags: &Flags, file: FileSettings) -> Flags {
    let mut f = flags.clone();
    f.kubeconfig = f.kubeconfig.or(file.kubeconfig);
    f.hostname_override = f.hostname_override.or(file.hostname_override);
    f.proxy_mode = f.proxy_mode.or(file.mode);
    if f.cluster_cidr.is_empty() {
        f.cluster_cidr = file.cluster_cidrs;
    }
    if f.nodeport_addresses.is_empty() {
        f.nodeport_addresses = file.nodeport_addresses;
    }
    f.masquerade_all = f.masquerade_all || file.masquerade_all.unwrap_or(false);
    f.iptables_masquerade_bit = f.iptables_masquerade_bit.or(file.masquerade_bit);
    f.sync_period = f.sync_period.or(file.sync_period);
    f.min_sync_period = f.min_sync_period.or(file.min_sync_period);
    f.healthz_bind_address = f.healthz_bind_address.or(file.healthz_bind_address);
    f.metrics_bind_address = f.metrics_bind_address.or(file.metrics_bind_address);
    f.verbosity = f.verbosity.or(file.verbosity);
    f.log_format = f.log_format.or(file.log_format);
    f.no_fallback = f.no_fallback || file.no_fallback.unwrap_or(false);
    f.bpf_root = f.bpf_root.or(file.bpf_root);
    f.ebpf_cgroup_root = f.ebpf_cgroup_root.or(file.cgroup_root);
    f.ebpf_load_balancing = f.ebpf_load_balancing.or(file.load_balancing);
    f.ebpf_bypass_netfilter = f.ebpf_bypass_netfilter || file.bypass_netfilter.unwrap_or(false);
    f.ebpf_conntrack_max = f.ebpf_conntrack_max.or(file.conntrack_max);
    f.ebpf_snat_port_range = f.ebpf_snat_port_range.or(file.snat_port_range);
    f.conntrack_tcp_timeout_established = f.conntrack_tcp_timeout_established.or(file.tcp_established_timeout);
    f.conntrack_tcp_timeout_close_wait = f.conntrack_tcp_timeout_close_wait.or(file.tcp_close_wait_timeout);
    f.conntrack_udp_timeout = f.conntrack_udp_timeout.or(file.udp_timeout);
    f.conntrack_udp_timeout_stream = f.conntrack_udp_timeout_stream.or(file.udp_stream_timeout);
    for (flag, from_file) in [
        (&mut f.ebpf_pod_interface_prefixes, file.pod_interface_prefixes),
        (&mut f.ebpf_pod_interfaces, file.pod_interfaces),
        (&mut f.ebpf_uplinks, file.uplinks),
    ] {
        if flag.is_empty() {
            *flag = from_file;
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const FULL: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
  burst: 10
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 15m0s
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpEstablishedTimeout: 24h0m0s
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
iptables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
ipvs:
  scheduler: ""
metricsBindAddress: 127.0.0.1:10249
mode: iptables
nodePortAddresses: null
oomScoreAdj: -999
portRange: ""
logging:
  format: text
  verbosity: 2
orca:
  noFallback: true
  bpfRoot: /sys/fs/bpf/orca-test
  loadBalancing: maglev
  podInterfacePrefixes: [cali, eni]
  uplinks: [bond0]
  conntrackMax: 262144
  snatPortRange: 20000-30000
"#;

    #[test]
    fn kubeadm_style_file_parses() {
        let s = parse(FULL).unwrap();
        assert_eq!(s.mode, Some(ProxyMode::Iptables));
        assert_eq!(s.cluster_cidrs, vec!["10.244.0.0/16".parse().unwrap()]);
        assert_eq!(s.sync_period, Some(Duration::from_secs(30)));
        assert_eq!(s.min_sync_period, Some(Duration::from_secs(1)));
        assert_eq!(s.masquerade_bit, Some(14));
        assert_eq!(s.kubeconfig, Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf")));
        assert_eq!(s.hostname_override, None);
        assert_eq!(s.verbosity, Some(2));
        assert_eq!(s.no_fallback, Some(true));
        assert_eq!(s.bpf_root, Some(PathBuf::from("/sys/fs/bpf/orca-test")));
        assert_eq!(s.load_balancing, Some(crate::model::LoadBalancing::Maglev));
        assert_eq!(s.pod_interface_prefixes, ["cali", "eni"]);
        assert!(s.pod_interfaces.is_empty());
        assert_eq!(s.uplinks, ["bond0"]);
        assert_eq!(s.conntrack_max, Some(262_144));
        assert_eq!(s.snat_port_range, Some((20_000, 30_000)));
        assert_eq!(s.tcp_established_timeout, Some(Duration::from_secs(86_400)));
        assert_eq!(s.bypass_netfilter, None);
    }

    #[test]
    fn errors_name_field_and_value() {
        let e = parse("mode: ipvs").unwrap_err().to_string();
        assert!(e.contains("mode") && e.contains("ipvs"), "{e}");
        let e = parse("bogusField: 1").unwrap_err().to_string();
        assert!(e.contains("bogusField"), "{e}");
        let e = parse("iptables:\n  syncPeriod: soon").unwrap_err().to_string();
        assert!(e.contains("iptables.syncPeriod") && e.contains("soon"), "{e}");
        let e = parse("clusterCIDR: 10.0.0.0/99").unwrap_err().to_string();
        assert!(e.contains("clusterCIDR") && e.contains("10.0.0.0/99"), "{e}");
        let e = parse("iptables:\n  masqueradeBit: 40").unwrap_err().to_string();
        assert!(e.contains("masqueradeBit") && e.contains("40"), "{e}");
        let e = parse("kind: Pod").unwrap_err().to_string();
        assert!(e.contains("kind") && e.contains("Pod"), "{e}");
        let e = parse("orca:\n  nope: 1").unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let e = parse("orca:\n  loadBalancing: roundrobin").unwrap_err().to_string();
        assert!(e.contains("orca.loadBalancing") && e.contains("roundrobin"), "{e}");
        let e = parse("orca:\n  conntrackMax: 10").unwrap_err().to_string();
        assert!(e.contains("orca.conntrackMax") && e.contains("10"), "{e}");
        let e = parse("orca:\n  snatPortRange: 9-2").unwrap_err().to_string();
        assert!(e.contains("orca.snatPortRange") && e.contains("9-2"), "{e}");
        let e = parse("conntrack:\n  udpTimeout: forever").unwrap_err().to_string();
        assert!(e.contains("conntrack.udpTimeout") && e.contains("forever"), "{e}");
        let e = parse("conntrack:\n  tcpTimeout: 1s").unwrap_err().to_string();
        assert!(e.contains("tcpTimeout"), "{e}");
        let e = parse("orca:\n  uplinks: [\"eth0\", \"a/b\"]").unwrap_err().to_string();
        assert!(e.contains("orca.uplinks") && e.contains("a/b"), "{e}");
        let e = parse("nodePortAddresses: [primary, 10.0.0.0/8]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nodePortAddresses") && e.contains("primary"), "{e}");
    }

    #[test]
    fn node_port_addresses_primary_reaches_the_dataplane() {
        use crate::cli::NodePortAddress;
        let s = parse("nodePortAddresses: [primary]").unwrap();
        assert_eq!(s.nodeport_addresses, [NodePortAddress::Primary]);
        let path = std::env::temp_dir().join(format!("orca-config-primary-{}.yaml", std::process::id()));
        std::fs::write(&path, "nodePortAddresses: [primary]").unwrap();
        let cli = crate::cli::Cli::try_parse_from(["orca-proxy", "--config", path.to_str().unwrap()]).unwrap();
        let settings = crate::settings::Settings::from_flags(&cli.flags).unwrap();
        assert!(settings.dataplane.nodeport_primary);
        assert!(settings.dataplane.nodeport_addresses.is_empty());
        // A flag overrides the file.
        let cli = crate::cli::Cli::try_parse_from([
            "orca-proxy",
            "--config",
            path.to_str().unwrap(),
            "--nodeport-addresses",
            "10.0.0.0/8",
        ])
        .unwrap();
        let settings = crate::settings::Settings::from_flags(&cli.flags).unwrap();
        assert!(!settings.dataplane.nodeport_primary);
        assert_eq!(settings.dataplane.nodeport_addresses.len(), 1);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse(FULL).unwrap();
        let cli =
            crate::cli::Cli::try_parse_from(["orca-proxy", "--proxy-mode", "ebpf", "--sync-period", "10s"]).unwrap();
        let merged = merge(&cli.flags, file);
        assert_eq!(merged.proxy_mode, Some(ProxyMode::Ebpf));
        assert_eq!(merged.sync_period, Some(Duration::from_secs(10)));
        assert_eq!(merged.min_sync_period, Some(Duration::from_secs(1)));
        assert_eq!(merged.cluster_cidr.len(), 1);
        assert!(merged.no_fallback);
        assert_eq!(merged.ebpf_load_balancing, Some(crate::model::LoadBalancing::Maglev));
        let cli = crate::cli::Cli::try_parse_from(["orca-proxy", "--ebpf-load-balancing", "random"]).unwrap();
        let merged = merge(&cli.flags, parse(FULL).unwrap());
        assert_eq!(merged.ebpf_load_balancing, Some(crate::model::LoadBalancing::Random));
        assert_eq!(merged.ebpf_uplinks, ["bond0"]);
        let cli = crate::cli::Cli::try_parse_from(["orca-proxy", "--ebpf-uplinks", "eth1,eth2"]).unwrap();
        let merged = merge(&cli.flags, parse(FULL).unwrap());
        assert_eq!(merged.ebpf_uplinks, ["eth1", "eth2"]);
        assert_eq!(merged.ebpf_pod_interface_prefixes, ["cali", "eni"]);
    }
}
