//! `orca-proxy run`: wires the watchers, the change tracker, the sync runner, the dataplane and the servers.

use anyhow::Context;
use std::sync::Arc;

use crate::cli::LogFormat;
use crate::events::NodeEvents;
use crate::healthcheck::ProxyHealthServer;
use crate::healthcheck::SyncHealth;
use crate::http::{self, Response};
use crate::metrics::Metrics;
use crate::model::tracker::ChangeTracker;
use crate::model::NodeInfo;
use crate::settings::Settings;
use crate::watch::{self, WatchState};

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
    let failed = |metrics_server: bool, error: http::BindError| {
        let error = error.to_string();
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
        metrics.datapath.source.set(source);
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
    let shared = WatchState::new(ChangeTracker::new(NodeInfo {
        name: s.node_name.clone(),
        ..Default::default()
    }));
    let health = Arc::new(SyncHealth::watching(shared.clone()));
    let pending = shared.clone();
    metrics
        .pending
        .source
        .set(Box::new(move || pending.lock().pending_changes()));
    let proxy_health = ProxyHealthServer {
        health: health.clone(),
        timeout: s.sync.sync_period * 2,
        first_sync_timeout: crate::healthcheck::FIRST_SYNC_LIVENESS,
        node_eligible: shared.node_eligible.clone(),
        metrics: metrics.clone(),
        families: dataplane.families(),
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
