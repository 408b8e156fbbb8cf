//! healthCheckNodePort servers for LoadBalancer Services with externalTrafficPolicy=Local, answering like
//! kube-proxy's: 200 when this node has local ready endpoints for the Service and the proxy is healthy, else 503,
//! with the same JSON body and headers, so cloud load balancers steer traffic only to nodes that can serve it.
//!
//! Also the proxy's own /healthz and /livez (port 10256), answered like kube-proxy's ProxyHealthServer
//! (pkg/proxy/healthcheck/proxy_health.go): /healthz is 503 when syncs stall (see [`SyncHealth`]) or when this node
//! is not eligible (being deleted, or tainted ToBeDeletedByClusterAutoscaler); /livez ignores node eligibility.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;
use serde::Serialize;

use crate::http::{self, Response};
use crate::metrics::{CodeLabels, Metrics};
use crate::model::state::{ServicePortState, Snapshot};
use crate::model::tracker::Diff;
use crate::model::{Cidr, ServiceName, ServicePortName};
use crate::sync::{HealthStatus, SyncHealth};

/// The taint the Cluster Autoscaler puts on a node it is about to delete (kube-proxy's ToBeDeletedTaint).
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// kube-proxy's NodeEligible: the Node has been seen, is not being deleted (no deletionTimestamp) and carries no
/// taint with the key [`TO_BE_DELETED_TAINT`] (whatever its value and effect).
pub fn node_eligible(node: Option<&Node>) -> bool {
    let Some(node) = node else {
        return false;
    };
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    !node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
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
/// Orca's one IP family once the sync loop has started.
pub fn proxy_health_body(status: &HealthStatus, node_eligible: Option<bool>) -> String {
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
                (
                    "IPv4",
                    ProxierHealthBody {
                        last_updated: l,
                        healthy: status.healthy,
                    },
                )
            })
            .into_iter()
            .collect(),
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
                    proxy_health_body(&status, Some(eligible)),
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
                    proxy_health_body(&status, None),
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

struct Server {
    service: ServiceName,
    local_endpoints: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// One listener per healthCheckNodePort, started and stopped as Services come and go.
pub struct HealthCheckServers {
    servers: HashMap<u16, Server>,
    /// Per healthCheckNodePort, the service ports naming it and their local ready endpoints.
    claims: HashMap<u16, BTreeMap<ServicePortName, usize>>,
    /// The healthCheckNodePort each service port names.
    claimed: HashMap<ServicePortName, u16>,
    /// Claimed ports whose listener could not be opened: retried on every sync.
    unserved: BTreeSet<u16>,
    health: Arc<SyncHealth>,
    health_timeout: Duration,
    nodeport_addresses: Vec<Cidr>,
    /// `--nodeport-addresses primary`: listen on the Node object's addresses.
    primary: bool,
}

/// kube-proxy's body (tab-indented JSON, no trailing newline).
pub fn body(svc: &ServiceName, local_endpoints: usize, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        svc.namespace, svc.name
    )
}

/// A service port's claim: the healthCheckNodePort it names and its local ready endpoints.
fn claim_of(st: &ServicePortState) -> Option<(u16, usize)> {
    let port = st.port.health_check_node_port?;
    Some((port, st.endpoints.iter().filter(|e| e.is_local && e.ready).count()))
}

/// The Service that owns a healthCheckNodePort, and its local endpoints: the first claimant in service port order
/// (as when the desired state is walked in order); claims by other Services are reported and ignored.
fn owner(port: u16, claims: &BTreeMap<ServicePortName, usize>) -> Option<(ServiceName, usize)> {
    let mut it = claims.iter();
    let (first, n) = it.next()?;
    let mut out = (first.service.clone(), *n);
    for (other, n) in it {
        if other.service == out.0 {
            out.1 += n;
        } else {
            tracing::warn!(port, first = %out.0, second = %other.service, "two Services claim one healthCheckNodePort");
        }
    }
    Some(out)
}

impl HealthCheckServers {
    pub fn new(health: Arc<SyncHealth>, health_timeout: Duration, nodeport_addresses: Vec<Cidr>) -> Self {
        Self {
            servers: HashMap::new(),
            claims: HashMap::new(),
            claimed: HashMap::new(),
            unserved: BTreeSet::new(),
            health,
            health_timeout,
            nodeport_addresses,
            primary: false,
        }
    }

    /// `--nodeport-addresses primary`: the servers listen on the Node object's addresses only.
    pub fn with_primary(mut self, primary: bool) -> Self {
        self.primary = primary;
        self
    }

    /// Makes the listeners match the whole of `desired`. Must run inside the tokio runtime.
    pub fn sync(&mut self, desired: &Snapshot, node_addresses: &[IpAddr]) {
        self.claims.clear();
        self.claimed.clear();
        self.unserved.clear();
        for st in desired.values() {
            if let Some(claim) = claim_of(st) {
                self.set_claim(st.name(), Some(claim));
            }
        }
        let ports: BTreeSet<u16> = self.claims.keys().chain(self.servers.keys()).copied().collect();
        for port in ports {
            self.reconcile(port, node_addresses);
        }
    }

    /// Updates the listeners for what `diff` changed, in time proportional to the change (a partial sync must
    /// not walk every Service). Must run inside the tokio runtime, after [`Self::sync`] has seen a full state.
    pub fn apply(&mut self, diff: &Diff, node_addresses: &[IpAddr]) {
        let mut ports = std::mem::take(&mut self.unserved);
        for st in &diff.upserted {
            ports.extend(self.set_claim(st.name(), claim_of(st)));
        }
        for name in &diff.removed {
            ports.extend(self.set_claim(name, None));
        }
        for port in ports {
            self.reconcile(port, node_addresses);
        }
    }

    /// Records a service port's claim (or its absence); returns the healthCheckNodePorts whose owner or count may
    /// have changed.
    fn set_claim(&mut self, name: &ServicePortName, claim: Option<(u16, usize)>) -> Vec<u16> {
        let mut touched = Vec::new();
        if let Some(old) = self.claimed.remove(name) {
            if let Some(c) = self.claims.get_mut(&old) {
                c.remove(name);
                if c.is_empty() {
                    self.claims.remove(&old);
                }
            }
            touched.push(old);
        }
        if let Some((port, local)) = claim {
            self.claimed.insert(name.clone(), port);
            self.claims.entry(port).or_default().insert(name.clone(), local);
            touched.push(port);
        }
        touched
    }

    /// Makes the listener on one healthCheckNodePort match its claims.
    fn reconcile(&mut self, port: u16, node_addresses: &[IpAddr]) {
        let want = self.claims.get(&port).and_then(|c| owner(port, c));
        if let Some(s) = self.servers.get(&port) {
            match &want {
                Some((svc, count)) if *svc == s.service => {
                    s.local_endpoints.store(*count, Ordering::Relaxed);
                    return;
                }
                _ => {
                    s.task.abort();
                    self.servers.remove(&port);
                }
            }
        }
        let Some((svc, count)) = want else {
            return;
        };
        self.unserved.remove(&port);
        let local_endpoints = Arc::new(AtomicUsize::new(count));
        match self.listen(port, node_addresses) {
            Ok(listeners) => {
                let (health, timeout) = (self.health.clone(), self.health_timeout);
                let (svc2, count2) = (svc.clone(), local_endpoints.clone());
                let task = tokio::spawn(async move {
                    let mut tasks = Vec::new();
                    for l in listeners {
                        let (health, svc, count) = (health.clone(), svc2.clone(), count2.clone());
                        tasks.push(tokio::spawn(http::serve(l, move |_path| {
                            let n = count.load(Ordering::Relaxed);
                            let healthy = health.status(timeout).healthy;
                            let mut r = Response::new(
                                if n > 0 && healthy { 200 } else { 503 },
                                "application/json",
                                body(&svc, n, healthy),
                            );
                            r.headers.push(("X-Content-Type-Options", "nosniff".into()));
                            r.headers.push(("X-Load-Balancing-Endpoint-Weight", n.to_string()));
                            async move { r }
                        })));
                    }
                    // Aborting this task drops the handles without stopping them; stop them explicitly.
                    struct AbortAll(Vec<tokio::task::JoinHandle<()>>);
                    impl Drop for AbortAll {
                        fn drop(&mut self) {
                            for t in &self.0 {
                                t.abort();
                            }
                        }
                    }
                    let _guard = AbortAll(tasks);
                    std::future::pending::<()>().await;
                });
                self.servers.insert(
                    port,
                    Server {
                        service: svc,
                        local_endpoints,
                        task,
                    },
                );
            }
            Err(e) => {
                tracing::error!(port, service = %svc, error = %e, "cannot serve healthCheckNodePort");
                self.unserved.insert(port);
            }
        }
    }

    fn listen(&self, port: u16, node_addresses: &[IpAddr]) -> std::io::Result<Vec<tokio::net::TcpListener>> {
        let addrs: Vec<IpAddr> = if self.primary {
            node_addresses.to_vec()
        } else if self.nodeport_addresses.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            node_addresses
                .iter()
                .copied()
                .filter(|a| self.nodeport_addresses.iter().any(|c| c.contains(*a)))
                .collect()
        };
        addrs
            .into_iter()
            .map(|a| {
                let l = std::net::TcpListener::bind(SocketAddr::new(a, port))?;
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .collect()
    }

    /// Per claimed healthCheckNodePort: the Service that owns it and its local endpoints (served or not).
    pub fn owners(&self) -> BTreeMap<u16, (ServiceName, usize)> {
        self.claims
            .iter()
            .filter_map(|(p, c)| Some((*p, owner(*p, c)?)))
            .collect()
    }

    /// Per served healthCheckNodePort: its Service and the local endpoint count it answers with.
    pub fn served(&self) -> BTreeMap<u16, (ServiceName, usize)> {
        self.servers
            .iter()
            .map(|(p, s)| (*p, (s.service.clone(), s.local_endpoints.load(Ordering::Relaxed))))
            .collect()
    }

    pub fn ports(&self) -> Vec<u16> {
        let mut p: Vec<u16> = self.servers.keys().copied().collect();
        p.sort();
        p
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for s in self.servers.values() {
            s.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::state::ServicePortState;
    use crate::model::{Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName, TrafficPolicy};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An eTP=Local NodePort Service whose health check node port is `port`, with `local_ready` ready endpoints on
    /// this node and one on another.
    fn state(port: u16, local_ready: usize) -> Snapshot {
        let name = ServicePortName::new("ns", "lb", "", Protocol::Tcp);
        let mut sp = ServicePort::new(name.clone(), "10.96.0.9".parse().unwrap(), 80);
        sp.node_port = Some(30080);
        sp.external_policy = TrafficPolicy::Local;
        sp.health_check_node_port = Some(port);
        let eps = (0..local_ready + 1)
            .map(|i| Endpoint {
                is_local: i < local_ready,
                ..Endpoint::new(format!("10.244.1.{}", i + 2).parse().unwrap(), 8080)
            })
            .collect();
        let node = NodeInfo {
            name: "node-a".into(),
            ..Default::default()
        };
        [(name, Arc::new(ServicePortState::new(sp, eps, &node)))].into()
    }

    async fn get(port: u16) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_200_with_local_endpoints_and_503_without() {
        // A free port on loopback (bind 0, read it, release it).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let health = Arc::new(SyncHealth::default());
        let mut hc = HealthCheckServers::new(
            health.clone(),
            Duration::from_secs(60),
            vec!["127.0.0.0/8".parse().unwrap()],
        );
        let lo = ["127.0.0.1".parse().unwrap()];
        hc.sync(&state(port, 2), &lo);
        assert_eq!(hc.ports(), vec![port]);
        let r = get(port).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("X-Load-Balancing-Endpoint-Weight: 2"), "{r}");
        assert!(r.contains("Content-Type: application/json"));
        assert!(r.ends_with(&body(&ServiceName::new("ns", "lb"), 2, true)), "{r}");
        hc.sync(&state(port, 0), &lo);
        let r = get(port).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("\"localEndpoints\": 0"), "{r}");
        // Unhealthy proxy: 503 even with endpoints.
        hc.sync(&state(port, 1), &lo);
        health.updated();
        health.queued();
        let mut hc2 = HealthCheckServers::new(health, Duration::ZERO, vec!["127.0.0.0/8".parse().unwrap()]);
        drop(std::mem::replace(
            &mut hc,
            HealthCheckServers::new(Arc::new(SyncHealth::default()), Duration::ZERO, vec![]),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        hc2.sync(&state(port, 1), &lo);
        let r = get(port).await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("\"serviceProxyHealthy\": false"),
            "{r}"
        );
        // The Service goes away: the port closes.
        hc2.sync(&Snapshot::new(), &lo);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err());
    }

    /// An eTP=Local service port `ns/svc:port_name` naming healthCheckNodePort `hc` with `local` local ready
    /// endpoints.
    fn claim(svc: &str, port_name: &str, hc: u16, local: usize) -> Arc<ServicePortState> {
        let name = ServicePortName::new("ns", svc, port_name, Protocol::Tcp);
        let mut sp = ServicePort::new(name, "10.96.0.9".parse().unwrap(), 80);
        sp.external_policy = TrafficPolicy::Local;
        sp.health_check_node_port = Some(hc);
        let eps = (0..local)
            .map(|i| Endpoint {
                is_local: true,
                ..Endpoint::new(format!("10.244.1.{}", i + 2).parse().unwrap(), 8080)
            })
            .collect();
        Arc::new(ServicePortState::new(sp, eps, &NodeInfo::new("node-a", vec![])))
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn changes_applied_one_by_one_serve_what_a_full_sync_serves() {
        let (p1, p2, p3) = (free_port(), free_port(), free_port());
        let lo = ["127.0.0.1".parse().unwrap()];
        let new = |cidrs: Vec<Cidr>| HealthCheckServers::new(Arc::new(SyncHealth::default()), Duration::ZERO, cidrs);
        let mut desired = Snapshot::new();
        let mut hc = new(vec![]);
        let step = |hc: &mut HealthCheckServers,
                    desired: &mut Snapshot,
                    up: Vec<Arc<ServicePortState>>,
                    gone: Vec<ServicePortName>| {
            for st in &up {
                desired.insert(st.name().clone(), st.clone());
            }
            for n in &gone {
                desired.remove(n);
            }
            let diff = Diff {
                upserted: up,
                removed: gone,
                ..Default::default()
            };
            hc.apply(&diff, &lo);
            // The reference serves no address (its node has none in its nodePortAddresses), so it binds nothing.
            let mut full = new(vec!["192.0.2.0/24".parse().unwrap()]);
            full.sync(desired, &lo);
            assert_eq!(hc.owners(), full.served());
            hc.owners()
        };
        let a = |n| ServiceName::new("ns", n);
        // Two ports of Service a share p1 (counts add up); b serves p2.
        let s = step(
            &mut hc,
            &mut desired,
            vec![
                claim("a", "http", p1, 2),
                claim("a", "https", p1, 1),
                claim("b", "", p2, 1),
            ],
            vec![],
        );
        assert_eq!(s, [(p1, (a("a"), 3)), (p2, (a("b"), 1))].into());
        // a loses its local endpoints on one port.
        let s = step(&mut hc, &mut desired, vec![claim("a", "http", p1, 0)], vec![]);
        assert_eq!(s[&p1], (a("a"), 1));
        // b moves to p3: p2 closes.
        let s = step(&mut hc, &mut desired, vec![claim("b", "", p3, 4)], vec![]);
        assert_eq!(s, [(p1, (a("a"), 1)), (p3, (a("b"), 4))].into());
        // c also claims p1: a keeps it.
        let s = step(&mut hc, &mut desired, vec![claim("c", "", p1, 5)], vec![]);
        assert_eq!(s[&p1], (a("a"), 1));
        // a goes away: c takes p1 over.
        let gone = vec![
            ServicePortName::new("ns", "a", "http", Protocol::Tcp),
            ServicePortName::new("ns", "a", "https", Protocol::Tcp),
        ];
        let s = step(&mut hc, &mut desired, vec![], gone);
        assert_eq!(s, [(p1, (a("c"), 5)), (p3, (a("b"), 4))].into());
        // c's listener may have found p1 still bound by a's aborted one; a later sync, even with no change, retries.
        tokio::time::sleep(Duration::from_millis(50)).await;
        hc.apply(&Diff::default(), &lo);
        assert_eq!(hc.served(), hc.owners());
        assert!(get(p1).await.contains("\"name\": \"c\""));
    }

    fn node(v: serde_json::Value) -> Node {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn node_eligibility_is_kube_proxys() {
        assert!(!node_eligible(None), "a Node not seen yet is not eligible");
        assert!(node_eligible(Some(&node(
            serde_json::json!({"metadata": {"name": "a"}})
        ))));
        let other = node(serde_json::json!({"metadata": {"name": "a"},
            "spec": {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}));
        assert!(node_eligible(Some(&other)), "other taints do not matter");
        for effect in ["NoSchedule", "PreferNoSchedule", "NoExecute"] {
            let tainted = node(serde_json::json!({"metadata": {"name": "a"},
                "spec": {"taints": [{"key": "x", "effect": "NoSchedule"},
                                    {"key": TO_BE_DELETED_TAINT, "value": "1700000000", "effect": effect}]}}));
            assert!(!node_eligible(Some(&tainted)), "{effect}");
        }
        let deleting = node(serde_json::json!({"metadata": {"name": "a",
            "deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["example.com/hold"]}}));
        assert!(!node_eligible(Some(&deleting)));
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
            proxy_health_body(&unhealthy, Some(true)),
            r#"{"lastUpdated":"2023-11-14T22:13:20.000005Z","currentTime":"2023-11-14T22:14:50.000005Z","nodeEligible":true,"healthy":false,"status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:20.000005Z","healthy":false}}}"#
        );
        // /livez: no nodeEligible.
        assert_eq!(
            proxy_health_body(&unhealthy, None),
            r#"{"lastUpdated":"2023-11-14T22:13:20.000005Z","currentTime":"2023-11-14T22:14:50.000005Z","healthy":false,"status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:20.000005Z","healthy":false}}}"#
        );
        // Healthy: the top-level lastUpdated is the time of the answer, the family's stays the last update.
        let healthy = HealthStatus {
            healthy: true,
            ..unhealthy
        };
        let v: serde_json::Value = serde_json::from_str(&proxy_health_body(&healthy, Some(true))).unwrap();
        let top: k8s_openapi::jiff::Timestamp = v["lastUpdated"].as_str().unwrap().parse().unwrap();
        assert!(top > k8s_openapi::jiff::Timestamp::try_from(now).unwrap());
        assert_eq!(v["status"]["IPv4"]["lastUpdated"], "2023-11-14T22:13:20.000005Z");
        assert_eq!(v["healthy"], true);
        // Healthy proxy on a node being deleted: lastUpdated is the last update (the answer is 503).
        let v: serde_json::Value = serde_json::from_str(&proxy_health_body(&healthy, Some(false))).unwrap();
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
        let v: serde_json::Value = serde_json::from_str(&proxy_health_body(&fresh, Some(false))).unwrap();
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

    #[test]
    fn body_matches_kube_proxy() {
        assert_eq!(
            body(&ServiceName::new("default", "web"), 3, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 3,\n\t\"serviceProxyHealthy\": true\n}"
        );
    }
}
