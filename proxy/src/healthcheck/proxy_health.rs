//! The proxy's own /healthz and /livez (port 10256), answered like kube-proxy's ProxyHealthServer
//! (pkg/proxy/healthcheck/proxy_health.go): /healthz is 503 when syncs stall (see [`SyncHealth`]) or when this node
//! is not eligible (being deleted, or tainted ToBeDeletedByClusterAutoscaler; see
//! [`crate::watch::node_eligible`]); /livez ignores node eligibility.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::http::Response;
use crate::metrics::{CodeLabels, Metrics};
use crate::model::IpFamily;
use crate::watch::WatchState;

/// kube-proxy's ProxyHealthServer state (pkg/proxy/healthcheck/proxy_health.go), for the IP families the dataplane
/// programs together (one sync runs both, so they share it): when the dataplane was last updated, and since when a change has waited for a sync.
///
/// kube-proxy's rule: the proxy is healthy while it has never been updated, while nothing is queued, or while the
/// oldest queued change has waited less than the health timeout (2 x sync period). A change counts as queued from
/// the moment a watcher saw it -- also while a sync hangs, since the tracker is read directly at check time -- until
/// a sync that took it succeeds. Changes the first lists brought in are not counted (kube-proxy's initial sync is not
/// a queued update either).
#[derive(Default)]
pub struct SyncHealth {
    inner: Mutex<HealthInner>,
    /// The watchers' change tracker, when checks should see its pending changes.
    tracker: Option<WatchState>,
}

impl std::fmt::Debug for SyncHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncHealth")
            .field("inner", &*self.inner.lock().unwrap_or_else(|e| e.into_inner()))
            .field("tracker", &self.tracker.is_some())
            .finish()
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct HealthInner {
    last_updated: Option<SystemTime>,
    /// The oldest change taken by a sync (or queued) and not yet programmed.
    oldest_queued: Option<Instant>,
    /// When the caches synced (kube-proxy's "initialized"); the tracker's changes count only after that.
    initialized: Option<Instant>,
    /// A sync after `initialized` succeeded: the node's Services are programmed.
    first_synced: bool,
}

/// The outcome of a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthStatus {
    pub healthy: bool,
    /// The last successful sync (or the start of the sync loop); `None` before the loop started.
    pub last_updated: Option<SystemTime>,
    /// The time of the check.
    pub now: SystemTime,
}

impl SyncHealth {
    /// A health state that also reads the pending changes of `shared`'s tracker.
    pub fn watching(shared: WatchState) -> Self {
        Self {
            inner: Mutex::default(),
            tracker: Some(shared),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// kube-proxy's QueuedUpdate: a change is waiting (kept if an older one is).
    pub fn queued(&self) {
        self.queued_at(Instant::now());
    }

    /// A change first seen at `at` is waiting. Changes seen before the caches synced are the initial state, not
    /// queued updates.
    pub fn queued_at(&self, at: Instant) {
        let mut g = self.lock();
        if g.initialized.is_some_and(|init| at < init) {
            return;
        }
        g.oldest_queued = Some(g.oldest_queued.map_or(at, |q| q.min(at)));
    }

    /// kube-proxy's Updated: the dataplane holds every change taken so far.
    pub fn updated(&self) {
        let mut g = self.lock();
        g.last_updated = Some(SystemTime::now());
        g.oldest_queued = None;
        g.first_synced |= g.initialized.is_some();
    }

    /// Whether a sync has programmed the node since the caches synced.
    pub fn first_synced(&self) -> bool {
        self.lock().first_synced
    }

    /// The caches synced: from now on the tracker's pending changes count as queued.
    pub fn initialized(&self) {
        self.lock().initialized.get_or_insert_with(Instant::now);
    }

    /// The health now, with `timeout` as kube-proxy's healthTimeout.
    pub fn status(&self, timeout: Duration) -> HealthStatus {
        let g = *self.lock();
        let pending = match (&self.tracker, g.initialized) {
            (Some(shared), Some(init)) => shared.lock().oldest_pending().filter(|p| *p >= init),
            _ => None,
        };
        let queued = match (g.oldest_queued, pending) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let healthy = match (g.last_updated, queued) {
            (None, _) | (_, None) => true,
            (Some(_), Some(q)) => q.elapsed() < timeout,
        };
        HealthStatus {
            healthy,
            last_updated: g.last_updated,
            now: SystemTime::now(),
        }
    }
}

/// Go's zero `time.Time` as JSON.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A time as Go's encoding/json writes a `time.Time` (RFC 3339 with nanoseconds, trailing zeros dropped), in UTC.
pub fn go_time(t: SystemTime) -> String {
    let Ok(ts) = k8s_openapi::jiff::Timestamp::try_from(t) else {
        return GO_ZERO_TIME.into();
    };
    let mut out = ts.strftime("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = ts.subsec_nanosecond();
    if nanos > 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// kube-proxy's ProxierHealth.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProxierHealthBody {
    last_updated: String,
    healthy: bool,
}

/// kube-proxy's ProxyHealth, field for field in Go's order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProxyHealthBody {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<&'static str, ProxierHealthBody>,
}

/// The body of /healthz (with `node_eligible`) or /livez (without). `lastUpdated` is the time of the answer when
/// healthy (kube-proxy keeps "recent when healthy" for old clients), else the last successful sync; `status` has
/// one entry per IP family the dataplane programs (`IPv4`, and `IPv6` when dual-stack, as kube-proxy's
/// proxiers report) once the sync loop has started.
pub fn proxy_health_body(status: &HealthStatus, node_eligible: Option<bool>, families: &[IpFamily]) -> String {
    let healthy_now = status.healthy && node_eligible.unwrap_or(true);
    let last = status.last_updated.map(go_time);
    let body = ProxyHealthBody {
        last_updated: if healthy_now {
            go_time(SystemTime::now())
        } else {
            last.clone().unwrap_or_else(|| GO_ZERO_TIME.into())
        },
        current_time: go_time(status.now),
        node_eligible,
        healthy: status.healthy,
        status: last
            .map(|l| {
                families
                    .iter()
                    .map(|f| {
                        (
                            f.as_str(),
                            ProxierHealthBody {
                                last_updated: l.clone(),
                                healthy: status.healthy,
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    serde_json::to_string(&body).unwrap_or_default()
}

/// How long changes may wait before /livez turns 503 while the first sync since start has not completed.
pub const FIRST_SYNC_LIVENESS: Duration = Duration::from_secs(15 * 60);

/// The proxy's /healthz and /livez.
#[derive(Clone)]
pub struct ProxyHealthServer {
    pub health: Arc<SyncHealth>,
    /// kube-proxy's healthTimeout: 2 x sync period.
    pub timeout: Duration,
    /// /livez before the first sync has completed: how long changes may wait ([`FIRST_SYNC_LIVENESS`]).
    pub first_sync_timeout: Duration,
    /// [`node_eligible`] of the latest Node object, kept by the Node watcher.
    pub node_eligible: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// The IP families the dataplane programs.
    pub families: Vec<IpFamily>,
}

impl ProxyHealthServer {
    /// The answer for `path`; `None` for paths it does not serve.
    pub fn respond(&self, path: &str) -> Option<Response> {
        let status = self.health.status(self.timeout);
        let (code, body, counter) = match path {
            "/healthz" => {
                let eligible = self.node_eligible.load(Ordering::Relaxed);
                let ok = status.healthy && eligible;
                (
                    ok,
                    proxy_health_body(&status, Some(eligible), &self.families),
                    &self.metrics.proxy_healthz_total,
                )
            }
            "/livez" => {
                // The first sync of a large cluster (iptables-nft at 10k+ Services) can take longer than the
                // health timeout while changes keep coming: /livez gives it FIRST_SYNC_LIVENESS before it tells a
                // liveness probe to restart the agent, which would only start that sync over. /healthz keeps
                // kube-proxy's rule: the node does not serve the changes yet.
                let status = if self.health.first_synced() {
                    status
                } else {
                    self.health.status(self.first_sync_timeout.max(self.timeout))
                };
                (
                    status.healthy,
                    proxy_health_body(&status, None, &self.families),
                    &self.metrics.proxy_livez_total,
                )
            }
            _ => return None,
        };
        let code = if code { 200 } else { 503 };
        counter.get_or_create(&CodeLabels { code: code.to_string() }).inc();
        let mut r = Response::new(code, "application/json", body);
        r.headers.push(("X-Content-Type-Options", "nosniff".into()));
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn health_follows_kube_proxys_rule() {
        let h = SyncHealth::default();
        // Never updated (the sync loop has not started): healthy, however long a change waits.
        h.queued();
        assert!(h.status(Duration::ZERO).healthy);
        assert_eq!(h.status(Duration::ZERO).last_updated, None);
        // Updated, nothing queued: healthy even with a zero timeout.
        h.updated();
        let s = h.status(Duration::ZERO);
        assert!(s.healthy && s.last_updated.is_some_and(|t| t <= s.now), "{s:?}");
        // Queued but not late: healthy; late: unhealthy, lastUpdated stays the last update.
        h.queued();
        assert!(h.status(LONG).healthy);
        let late = h.status(Duration::ZERO);
        assert!(!late.healthy);
        assert_eq!(late.last_updated, s.last_updated);
        // The oldest queued change counts: a newer one does not reset the clock.
        std::thread::sleep(Duration::from_millis(30));
        h.queued();
        assert!(!h.status(Duration::from_millis(20)).healthy);
        // A successful sync clears the queue.
        h.updated();
        assert!(h.status(Duration::ZERO).healthy);
    }

    fn service(name: &str) -> k8s_openapi::api::core::v1::Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        }))
        .unwrap()
    }

    #[test]
    fn health_sees_changes_the_watchers_queued_while_a_sync_hangs() {
        let shared = WatchState::new(crate::model::tracker::ChangeTracker::new(Default::default()));
        let h = SyncHealth::watching(shared.clone());
        h.updated();
        // What the first lists bring is the initial state, not a queued update (nor is a diff of it).
        shared.lock().service_updated(&service("before"));
        let before = shared.lock().oldest_pending().unwrap();
        h.initialized();
        assert!(h.status(Duration::ZERO).healthy);
        h.queued_at(before);
        assert!(h.status(Duration::ZERO).healthy);
        let _initial = shared.lock().take_diff();
        // A change after that, which no sync has taken (the sync loop is stuck in the dataplane): queued.
        std::thread::sleep(Duration::from_millis(5));
        shared.lock().service_updated(&service("after"));
        assert!(shared.lock().has_pending());
        assert!(h.status(LONG).healthy);
        assert!(!h.status(Duration::ZERO).healthy);
        // Taken by a sync that has not finished: still queued (through queued_at, as the runner does).
        let diff = shared.lock().take_diff();
        h.queued_at(diff.oldest_change.unwrap());
        assert!(!shared.lock().has_pending());
        assert!(!h.status(Duration::ZERO).healthy);
        // The sync succeeds.
        h.updated();
        assert!(h.status(Duration::ZERO).healthy);
    }

    #[test]
    fn go_time_is_rfc3339_nano_trimmed() {
        let at = |s: u64, n: u32| SystemTime::UNIX_EPOCH + Duration::new(s, n);
        assert_eq!(go_time(at(1_700_000_000, 0)), "2023-11-14T22:13:20Z");
        assert_eq!(go_time(at(1_700_000_000, 120_000_000)), "2023-11-14T22:13:20.12Z");
        assert_eq!(go_time(at(1_700_000_000, 1)), "2023-11-14T22:13:20.000000001Z");
    }

    #[test]
    fn proxy_health_body_has_kube_proxys_fields() {
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5_000);
        let now = at + Duration::from_secs(90);
        let unhealthy = HealthStatus {
            healthy: false,
            last_updated: Some(at),
            now,
        };
        assert_eq!(
            proxy_health_body(&unhealthy, Some(true), &[IpFamily::V4]),
            r#"{"lastUpdated":"2023-11-14T22:13:20.000005Z","currentTime":"2023-11-14T22:14:50.000005Z","nodeEligible":true,"healthy":false,"status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:20.000005Z","healthy":false}}}"#
        );
        // /livez: no nodeEligible.
        assert_eq!(
            proxy_health_body(&unhealthy, None, &[IpFamily::V4]),
            r#"{"lastUpdated":"2023-11-14T22:13:20.000005Z","currentTime":"2023-11-14T22:14:50.000005Z","healthy":false,"status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:20.000005Z","healthy":false}}}"#
        );
        // Healthy: the top-level lastUpdated is the time of the answer, the family's stays the last update.
        let healthy = HealthStatus {
            healthy: true,
            ..unhealthy
        };
        let v: serde_json::Value =
            serde_json::from_str(&proxy_health_body(&healthy, Some(true), &[IpFamily::V4])).unwrap();
        let top: k8s_openapi::jiff::Timestamp = v["lastUpdated"].as_str().unwrap().parse().unwrap();
        assert!(top > k8s_openapi::jiff::Timestamp::try_from(now).unwrap());
        assert_eq!(v["status"]["IPv4"]["lastUpdated"], "2023-11-14T22:13:20.000005Z");
        assert_eq!(v["healthy"], true);
        // Healthy proxy on a node being deleted: lastUpdated is the last update (the answer is 503).
        let v: serde_json::Value =
            serde_json::from_str(&proxy_health_body(&healthy, Some(false), &[IpFamily::V4])).unwrap();
        assert_eq!(v["lastUpdated"], "2023-11-14T22:13:20.000005Z");
        assert_eq!(
            (v["nodeEligible"].as_bool(), v["healthy"].as_bool()),
            (Some(false), Some(true))
        );
        // Before the sync loop started: no status map.
        let fresh = HealthStatus {
            healthy: true,
            last_updated: None,
            now,
        };
        let v: serde_json::Value =
            serde_json::from_str(&proxy_health_body(&fresh, Some(false), &[IpFamily::V4])).unwrap();
        assert_eq!(v["lastUpdated"], "0001-01-01T00:00:00Z");
        assert!(v.get("status").is_none());
    }

    #[test]
    fn healthz_needs_an_eligible_node_and_livez_does_not() {
        let metrics = Arc::new(Metrics::new());
        let server = ProxyHealthServer {
            health: Arc::new(SyncHealth::default()),
            timeout: Duration::from_secs(60),
            first_sync_timeout: Duration::ZERO,
            node_eligible: Arc::new(AtomicBool::new(true)),
            metrics: metrics.clone(),
            families: vec![IpFamily::V4, IpFamily::V6],
        };
        server.health.updated();
        let code = |p: &str| server.respond(p).map(|r| r.status);
        assert_eq!(
            (code("/healthz"), code("/livez"), code("/x")),
            (Some(200), Some(200), None)
        );
        server.node_eligible.store(false, Ordering::Relaxed);
        assert_eq!((code("/healthz"), code("/livez")), (Some(503), Some(200)));
        let r = server.respond("/healthz").unwrap();
        assert!(r.body.contains(r#""nodeEligible":false,"healthy":true"#), "{}", r.body);
        // Dual-stack: one status per family, as kube-proxy's two proxiers report.
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["status"]["IPv4"]["healthy"], true, "{}", r.body);
        assert_eq!(v["status"]["IPv6"], v["status"]["IPv4"], "{}", r.body);
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| *k == "X-Content-Type-Options" && v == "nosniff"));
        assert!(!server.respond("/livez").unwrap().body.contains("nodeEligible"));
        // A stalled sync fails both.
        server.node_eligible.store(true, Ordering::Relaxed);
        let stalled = ProxyHealthServer {
            timeout: Duration::ZERO,
            ..server.clone()
        };
        stalled.health.queued();
        assert_eq!(stalled.respond("/healthz").unwrap().status, 503);
        assert_eq!(stalled.respond("/livez").unwrap().status, 503);
        let text = metrics.encode();
        for line in [
            r#"kubeproxy_proxy_healthz_total{code="200"} 1"#,
            r#"kubeproxy_proxy_healthz_total{code="503"} 3"#,
            r#"kubeproxy_proxy_livez_total{code="200"} 3"#,
            r#"kubeproxy_proxy_livez_total{code="503"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn livez_gives_the_first_sync_longer() {
        let server = ProxyHealthServer {
            health: Arc::new(SyncHealth::default()),
            timeout: Duration::ZERO,
            first_sync_timeout: Duration::from_secs(60),
            node_eligible: Arc::new(AtomicBool::new(true)),
            metrics: Arc::new(Metrics::new()),
            families: vec![IpFamily::V4],
        };
        // The sync loop started, the caches synced, a change waits while the first sync runs.
        server.health.updated();
        server.health.initialized();
        server.health.queued();
        let codes = || {
            (
                server.respond("/healthz").unwrap().status,
                server.respond("/livez").unwrap().status,
            )
        };
        assert!(!server.health.first_synced());
        assert_eq!(codes(), (503, 200));
        // Once a sync has programmed the node, a waiting change counts with the health timeout for both.
        server.health.updated();
        assert!(server.health.first_synced());
        server.health.queued();
        assert_eq!(codes(), (503, 503));
    }
}
