//! Command line: kube-proxy's flags where they exist, Orca's own where it needs more.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::dataplane::ProxyMode;
use crate::model::Cidr;

#[derive(Debug, Parser)]
#[command(
    name = "orca-proxy",
    version,
    about = "Orca: a kube-proxy replacement (eBPF and iptables dataplanes)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch the cluster and program this node (the default).
    Run,
    /// Remove every rule, program, map and pin Orca created, and exit.
    Cleanup,
    /// Show what the kernel holds per service port.
    Status {
        #[arg(long)]
        json: bool,
        /// Compare with the desired state from the apiserver; exit non-zero on drift.
        #[arg(long)]
        verify: bool,
    },
    /// Check that this kernel runs the eBPF dataplane: its version against the minimum, and every program through
    /// the verifier (nothing is pinned or attached).
    CheckKernel,
    /// Print the version.
    Version,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct Flags {
    /// Path to a kubeconfig file with authorization and master location.
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The address of the Kubernetes API server (overrides any value in kubeconfig).
    #[arg(long, global = true)]
    pub master: Option<String>,
    /// The name of this node, instead of the hostname.
    #[arg(long, global = true)]
    pub hostname_override: Option<String>,
    /// Which dataplane to use. Default ebpf; iptables when the kernel cannot run the eBPF programs.
    #[arg(long, global = true, value_enum)]
    pub proxy_mode: Option<ProxyMode>,
    /// Refuse to fall back to iptables when the eBPF dataplane cannot load.
    #[arg(long, global = true)]
    pub no_fallback: bool,
    /// How the eBPF dataplane picks backends: random (kube-proxy's behaviour) or maglev (consistent hashing:
    /// a backend change moves the fewest flows). A Service's `orca.dev/load-balancing` annotation overrides it.
    #[arg(long, global = true, value_enum)]
    pub ebpf_load_balancing: Option<crate::model::LoadBalancing>,
    /// eBPF: interfaces whose name starts with one of these (comma-separated) are the host side of pod veths and get
    /// the from-pod program as they come and go. Default: cali,veth,lxc,orca-p.
    #[arg(long, global = true, value_delimiter = ',', value_parser = parse_ifname)]
    pub ebpf_pod_interface_prefixes: Vec<String>,
    /// eBPF: pod interfaces named explicitly (comma-separated), besides the prefixes.
    #[arg(long, global = true, value_delimiter = ',', value_parser = parse_ifname)]
    pub ebpf_pod_interfaces: Vec<String>,
    /// eBPF: the node's uplinks (comma-separated), where NodePort, load-balancer and external-IP traffic arrives.
    /// Default: the interfaces holding one of the node's addresses, else those of a default route (IPv4 or IPv6).
    #[arg(long, global = true, value_delimiter = ',', value_parser = parse_ifname)]
    pub ebpf_uplinks: Vec<String>,
    /// eBPF: translated packets are forwarded by the programs themselves (FIB lookup and redirect), skipping the
    /// node's routing and netfilter: faster, but FORWARD/POSTROUTING rules (NetworkPolicy engines in iptables or
    /// nftables, host firewalls, the CNI's masquerade rules) and kernel conntrack never see Service traffic.
    /// Default off: DNAT at TC ingress, SNAT at TC egress, netfilter sees client -> backend as with kube-proxy.
    #[arg(long, global = true)]
    pub ebpf_bypass_netfilter: bool,
    /// eBPF: the cgroup v2 directory the socket hooks attach to, so that host-network processes (and hostNetwork
    /// pods) of the node reach ClusterIPs and NodePorts: the root of the host's cgroup2 hierarchy (the DaemonSet
    /// mounts it at /run/orca/cgroupv2), or `none`. Default: the cgroup v2 mount the agent sees, with a warning
    /// when there is none or it is a private cgroup namespace's.
    #[arg(long, global = true)]
    pub ebpf_cgroup_root: Option<PathBuf>,
    /// eBPF: how the TC programs attach: auto (TCX links on kernels >= 6.6, else clsact), tcx or clsact
    /// (direct-action filters at priority and handle 0x4f52, e.g. next to other clsact users).
    #[arg(long, global = true, value_enum)]
    pub ebpf_tc_attach: Option<crate::dataplane::ebpf::loader::TcAttach>,
    /// eBPF: flows the conntrack map holds (two map entries per flow, three when masqueraded; allocated on use).
    /// Default 1048576.
    #[arg(long, global = true, value_parser = clap::value_parser!(u32).range(512..=1 << 26))]
    pub ebpf_conntrack_max: Option<u32>,
    /// eBPF: masquerade source ports, MIN-MAX; the node's ephemeral range (net.ipv4.ip_local_port_range) is
    /// always left out. Default 1024-65535.
    #[arg(long, global = true, value_parser = parse_port_range)]
    pub ebpf_snat_port_range: Option<(u16, u16)>,
    /// Idle timeout of established TCP connections (kube-proxy's flag; in eBPF mode Orca's conntrack uses it,
    /// 0 keeps the default 24h).
    #[arg(long, global = true, value_parser = parse_duration)]
    pub conntrack_tcp_timeout_established: Option<Duration>,
    /// Idle timeout of TCP connections closed on one side (CLOSE_WAIT; eBPF mode, 0 keeps the default 1h).
    #[arg(long, global = true, value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close_wait: Option<Duration>,
    /// Idle timeout of UDP flows without replies (eBPF mode, 0 keeps the kernel's 30s).
    #[arg(long, global = true, value_parser = parse_duration)]
    pub conntrack_udp_timeout: Option<Duration>,
    /// Idle timeout of UDP flows with replies (eBPF mode, 0 keeps the kernel's 2m).
    #[arg(long, global = true, value_parser = parse_duration)]
    pub conntrack_udp_timeout_stream: Option<Duration>,
    /// The CIDR ranges of pods in the cluster (comma-separated); ClusterIP traffic from outside them is masqueraded.
    #[arg(long, global = true, value_delimiter = ',', value_parser = parse_cidr)]
    pub cluster_cidr: Vec<Cidr>,
    /// CIDR ranges of local addresses NodePorts answer on (comma-separated), or `primary` (the Node's own
    /// addresses, as kube-proxy); default every local address.
    #[arg(long, global = true, value_delimiter = ',', value_parser = parse_nodeport_address)]
    pub nodeport_addresses: Vec<NodePortAddress>,
    /// SNAT every packet sent to a ClusterIP.
    #[arg(long, global = true)]
    pub masquerade_all: bool,
    /// The fwmark bit used to mark packets for SNAT (iptables mode), 0..=31.
    #[arg(long, global = true, value_parser = clap::value_parser!(u8).range(0..=31))]
    pub iptables_masquerade_bit: Option<u8>,
    /// Minimum interval between syncs (Go duration, e.g. 1s, 500ms). Default 1s in iptables mode, 0 in eBPF mode.
    #[arg(long, global = true, value_parser = parse_duration)]
    pub min_sync_period: Option<Duration>,
    /// Maximum interval between full resyncs (Go duration). Default 30s.
    #[arg(long, global = true, value_parser = parse_duration)]
    pub sync_period: Option<Duration>,
    /// Address of the health check server (ip:port); empty disables it.
    #[arg(long, global = true)]
    pub healthz_bind_address: Option<String>,
    /// Address of the metrics server (ip:port); empty disables it.
    #[arg(long, global = true)]
    pub metrics_bind_address: Option<String>,
    /// A KubeProxyConfiguration file; flags override it.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Where eBPF maps and links are pinned.
    #[arg(long, global = true)]
    pub bpf_root: Option<PathBuf>,
    /// Log verbosity, as kube-proxy's -v: 0-1 info, 2-3 debug, 4+ trace.
    #[arg(short = 'v', long = "v", global = true)]
    pub verbosity: Option<u8>,
    /// Log format.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// kube-proxy's --cleanup: remove what Orca created and exit.
    #[arg(long)]
    pub cleanup: bool,
}

/// A flag (or config file) value that does not parse; clap and the config loader print it with the flag's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{0:?} is not MIN-MAX")]
    NotARange(String),
    #[error("{range:?}: bad port {port:?}")]
    BadPort { range: String, port: String },
    #[error("{0:?}: need 1 <= MIN <= MAX")]
    RangeOrder(String),
    #[error(transparent)]
    Cidr(#[from] crate::model::cidr::CidrError),
    #[error("\"primary\" cannot be combined with CIDRs")]
    PrimaryWithCidrs,
    #[error("{0:?} is not an interface name (1-15 bytes, no '/', ':' or spaces)")]
    Ifname(String),
    #[error("empty duration")]
    EmptyDuration,
    #[error("invalid duration {0:?}")]
    Duration(String),
    #[error("missing unit in duration {0:?}")]
    MissingUnit(String),
    #[error("unknown unit {unit:?} in duration {duration:?}")]
    UnknownUnit { unit: String, duration: String },
    #[error("invalid bind address {0:?}")]
    Bind(String),
}

/// `MIN-MAX` (inclusive), 1 <= MIN <= MAX <= 65535.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), ValueError> {
    let (a, b) = s.split_once('-').ok_or_else(|| ValueError::NotARange(s.into()))?;
    let port = |p: &str| {
        p.trim().parse::<u16>().map_err(|_| ValueError::BadPort {
            range: s.into(),
            port: p.into(),
        })
    };
    let (a, b) = (port(a)?, port(b)?);
    if a == 0 || a > b {
        return Err(ValueError::RangeOrder(s.into()));
    }
    Ok((a, b))
}

pub fn parse_cidr(s: &str) -> Result<Cidr, crate::model::cidr::CidrError> {
    s.parse()
}

/// One `--nodeport-addresses` / `nodePortAddresses` value: a CIDR, or kube-proxy's `primary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePortAddress {
    /// The Node object's addresses (kube-proxy: the node's primary IP of each family).
    Primary,
    Cidr(Cidr),
}

pub fn parse_nodeport_address(s: &str) -> Result<NodePortAddress, ValueError> {
    if s == "primary" {
        Ok(NodePortAddress::Primary)
    } else {
        Ok(NodePortAddress::Cidr(parse_cidr(s)?))
    }
}

/// Splits a `--nodeport-addresses` list into (CIDRs, primary); `primary` must stand alone, as kube-proxy's
/// validation requires.
pub fn split_nodeport_addresses(list: &[NodePortAddress]) -> Result<(Vec<Cidr>, bool), ValueError> {
    let primary = list.contains(&NodePortAddress::Primary);
    if primary && list.len() > 1 {
        return Err(ValueError::PrimaryWithCidrs);
    }
    let cidrs = list
        .iter()
        .filter_map(|a| match a {
            NodePortAddress::Cidr(c) => Some(*c),
            NodePortAddress::Primary => None,
        })
        .collect();
    Ok((cidrs, primary))
}

/// A Linux interface name (or a prefix of one): 1 to 15 bytes, no '/', ':' or white space.
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty() && s.len() < 16 && !s.contains(['/', ':']) && !s.chars().any(char::is_whitespace)
}

fn parse_ifname(s: &str) -> Result<String, ValueError> {
    if valid_ifname(s) {
        Ok(s.to_string())
    } else {
        Err(ValueError::Ifname(s.into()))
    }
}

/// Parses a Go duration: a sequence of decimal numbers with units ns, us, µs, ms, s, m, h ("1m30s", "0.5s", "0").
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(ValueError::EmptyDuration);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return Err(ValueError::Duration(s.into()));
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| ValueError::Duration(s.into()))?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(ValueError::MissingUnit(s.into())),
            u => {
                return Err(ValueError::UnknownUnit {
                    unit: u.into(),
                    duration: s.into(),
                })
            }
        };
        total += n * factor;
        rest = &rest[unit_end..];
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parses an `ip:port` bind address; an empty string disables the server. A bare IP gets `default_port`.
pub fn parse_bind(s: &str, default_port: u16) -> Result<Option<SocketAddr>, ValueError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(Some(a));
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(Some(SocketAddr::new(ip, default_port)));
    }
    Err(ValueError::Bind(s.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("1h0m0s").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn bind_addresses() {
        assert_eq!(
            parse_bind("0.0.0.0:10256", 1).unwrap(),
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert_eq!(
            parse_bind("127.0.0.1", 10249).unwrap(),
            Some("127.0.0.1:10249".parse().unwrap())
        );
        assert_eq!(parse_bind("", 1).unwrap(), None);
        assert!(parse_bind("nope", 1).is_err());
    }

    #[test]
    fn flags_parse_like_kube_proxy() {
        let cli = Cli::try_parse_from([
            "orca-proxy",
            "--proxy-mode",
            "iptables",
            "--cluster-cidr",
            "10.244.0.0/16,fd00::/48",
            "--min-sync-period",
            "0s",
            "--hostname-override",
            "node-a",
            "-v",
            "4",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.flags.proxy_mode, Some(ProxyMode::Iptables));
        assert_eq!(cli.flags.cluster_cidr.len(), 2);
        assert_eq!(cli.flags.min_sync_period, Some(Duration::ZERO));
        assert_eq!(cli.flags.verbosity, Some(4));
        assert!(Cli::try_parse_from(["orca-proxy", "--proxy-mode", "ipvs"]).is_err());
        assert!(Cli::try_parse_from(["orca-proxy", "--cluster-cidr", "10.0.0.0/40"]).is_err());
        let st = Cli::try_parse_from(["orca-proxy", "status", "--json"]).unwrap();
        assert!(matches!(
            st.command,
            Some(Command::Status {
                json: true,
                verify: false
            })
        ));
    }
}
