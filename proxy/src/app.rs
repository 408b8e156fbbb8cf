//! `orca-proxy run`: wires the watchers, the change tracker, the sync runner, the dataplane and the servers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::cli::{parse_bind, Flags, LogFormat};
use crate::dataplane::{DataplaneConfig, ProxyMode};
use crate::events::NodeEvents;
use crate::healthcheck::ProxyHealthServer;
use crate::http::{self, Response};
use crate::metrics::Metrics;
use crate::model::tracker::ChangeTracker;
use crate::model::NodeInfo;
use crate::sync::{SyncConfig, SyncHealth};
use crate::watch::{self, Shared};

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

pub fn init_logging(verbosity: u8, format: LogFormat) {
    let level = match verbosity {
        0 | 1 => "info",
        2 | 3 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},hyper=info,tower=info,rustls=info")));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.try_init(),
    };
}

/// A kube client from --kubeconfig / KUBECONFIG / in-cluster, with --master overriding the server.
pub async fn kube_client(s: &Settings) -> anyhow::Result<kube::Client> {
    let mut cfg = match &s.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .context("loading kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig and not in a cluster")?,
    };
    if let Some(m) = &s.master {
        cfg.cluster_url = m.parse().with_context(|| format!("--master {m:?}"))?;
    }
    kube::Client::try_from(cfg).context("building the Kubernetes client")
}

/// Starts the healthz and metrics servers. A server that cannot listen is logged and reported as a Warning Event
/// (kube-proxy's FailedToStartProxierHealthcheck / FailedToStartMetricServer); the agent goes on without it.
pub async fn start_servers(
    s: &Settings,
    proxy_health: ProxyHealthServer,
    metrics: Arc<Metrics>,
    events: Option<&NodeEvents>,
) {
    let failed = |metrics_server: bool, error: String| {
        tracing::error!(error = %error, "cannot listen");
        if let Some(ev) = events {
            ev.publish(crate::events::server_failed(metrics_server, &error));
        }
    };
    if let Some(addr) = s.healthz {
        match http::bind("proxy healthz", addr).await {
            Ok(l) => {
                tokio::spawn(http::serve(l, move |path| {
                    let r = proxy_health.respond(&path).unwrap_or_else(|| {
                        Response::new(404, "text/plain; charset=utf-8", "404 page not found\n".into())
                    });
                    async move { r }
                }));
            }
            Err(e) => failed(false, e),
        }
    }
    if let Some(addr) = s.metrics {
        match http::bind("metrics server", addr).await {
            Ok(l) => {
                tokio::spawn(http::serve(l, move |path| {
                    let metrics = metrics.clone();
                    async move {
                        match path.as_str() {
                            "/metrics" => {
                                Response::new(200, "text/plain; version=0.0.4; charset=utf-8", metrics.encode())
                            }
                            "/healthz" | "/livez" => Response::new(200, "text/plain; charset=utf-8", "ok".into()),
                            _ => Response::new(404, "text/plain; charset=utf-8", "404 page not found\n".into()),
                        }
                    }
                }));
            }
            Err(e) => failed(true, e),
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM. Kernel state stays in place on exit, as with kube-proxy, so traffic
/// keeps flowing while the agent restarts.
pub async fn run(s: Settings) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let (dataplane, fallback) = crate::dataplane::select::create(&s)?;
    let mode = dataplane.mode();
    let degraded = dataplane.degraded();
    for d in &degraded {
        metrics
            .degraded
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: d.reason.to_string(),
            })
            .set(1);
    }
    if let Some(source) = dataplane.datapath_source() {
        metrics.datapath.set_source(source);
    }
    metrics
        .mode
        .get_or_create(&crate::metrics::ModeLabels {
            mode: mode.to_string(),
            fallback_reason: fallback.clone().unwrap_or_default(),
        })
        .set(1);
    tracing::info!(node = %s.node_name, %mode, fallback = fallback.as_deref().unwrap_or(""), "starting orca-proxy");
    let client = kube_client(&s).await?;
    let events = NodeEvents::new(client.clone(), &s.node_name);
    if let Some(reason) = &fallback {
        events.publish(crate::events::dataplane_fallback(reason));
    }
    for d in &degraded {
        events.publish(crate::events::dataplane_degraded(d));
    }
    let shared = Shared::new(ChangeTracker::new(NodeInfo {
        name: s.node_name.clone(),
        ..Default::default()
    }));
    let health = Arc::new(SyncHealth::watching(shared.clone()));
    let proxy_health = ProxyHealthServer {
        health: health.clone(),
        timeout: s.sync.sync_period * 2,
        first_sync_timeout: crate::healthcheck::FIRST_SYNC_LIVENESS,
        node_eligible: shared.node_eligible.clone(),
        metrics: metrics.clone(),
    };
    start_servers(&s, proxy_health, metrics.clone(), Some(&events)).await;
    let watchers = tokio::spawn(watch::run(client, s.node_name.clone(), shared.clone()));
    // kube-proxy's birth cry, once its informers are started.
    events.publish(crate::events::starting());
    let hc = crate::healthcheck::HealthCheckServers::new(
        health.clone(),
        s.sync.sync_period * 2,
        s.dataplane.nodeport_addresses.clone(),
    )
    .with_primary(s.dataplane.nodeport_primary);
    let runner = tokio::spawn(crate::sync::run(shared, dataplane, s.sync, health, metrics, hc));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; exiting"),
        _ = term.recv() => tracing::info!("terminated; exiting"),
        r = runner => anyhow::bail!("sync runner stopped: {r:?}"),
    }
    watchers.abort();
    Ok(())
}
