//! healthCheckNodePort servers for LoadBalancer Services with externalTrafficPolicy=Local, answering like
//! kube-proxy's (pkg/proxy/healthcheck/service_health.go): 200 when this node has local ready endpoints for the
//! Service and the proxy is healthy, else 503, with the same JSON body and headers, so cloud load balancers steer
//! traffic only to nodes that can serve it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::proxy_health::SyncHealth;
use crate::http::{self, Response};
use crate::model::state::{ServicePortState, Snapshot};
use crate::model::tracker::Diff;
use crate::model::{Cidr, ServiceName, ServicePortName};

struct Server {
    service: ServiceName,
    local_endpoints: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// One listener per healthCheckNodePort, started and stopped as Services come and go.
pub struct HealthCheckServers {
    servers: HashMap<u16, Server>,
    /// Per healthCheckNodePort, the service ports naming it and their local ready endpoints.
    claims: HashMap<u16, BTreeMap<ServicePortName, LocalEndpoints>>,
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

/// A service port's local ready endpoints, as `ip:port`.
type LocalEndpoints = BTreeSet<SocketAddr>;

/// A service port's claim: the healthCheckNodePort it names and its local ready endpoints of the Service's primary
/// family (its first cluster IP's): kube-proxy counts per family proxier, so a dual-stack pod counts once, not twice.
fn claim_of(st: &ServicePortState) -> Option<(u16, LocalEndpoints)> {
    let port = st.port.health_check_node_port?;
    let family = st.port.cluster_ips.first().map(|ip| crate::model::IpFamily::of(*ip));
    let local = st
        .endpoints
        .iter()
        .filter(|e| e.is_local && e.ready && family.is_none_or(|f| f.matches(&e.ip)))
        .map(|e| SocketAddr::new(e.ip, e.port))
        .collect();
    Some((port, local))
}

/// The Service that owns a healthCheckNodePort, and its local endpoints: the first claimant in service port order
/// (as when the desired state is walked in order); claims by other Services are reported and ignored. The count is
/// kube-proxy's `LocalReadyEndpoints`: the Service's distinct local ready `ip:port`s over all its ports, so a pod
/// behind two service ports to the same pod port counts once.
fn owner(port: u16, claims: &BTreeMap<ServicePortName, LocalEndpoints>) -> Option<(ServiceName, usize)> {
    let mut it = claims.iter();
    let (first, eps) = it.next()?;
    let service = first.service.clone();
    let mut local: BTreeSet<&SocketAddr> = eps.iter().collect();
    for (other, eps) in it {
        if other.service == service {
            local.extend(eps);
        } else {
            tracing::warn!(port, first = %service, second = %other.service, "two Services claim one healthCheckNodePort");
        }
    }
    Some((service, local.len()))
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
    fn set_claim(&mut self, name: &ServicePortName, claim: Option<(u16, LocalEndpoints)>) -> Vec<u16> {
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
        let bind = |a: SocketAddr| -> std::io::Result<tokio::net::TcpListener> {
            let l = std::net::TcpListener::bind(a)?;
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        };
        if !self.primary && self.nodeport_addresses.is_empty() {
            // Every address of both families (kube-proxy's IPv4 and IPv6 proxiers each listen on their wildcard):
            // `[::]` takes IPv4 as well; IPv4 alone on a node without IPv6.
            return match bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)) {
                Ok(l) => Ok(vec![l]),
                Err(e) if e.kind() != std::io::ErrorKind::AddrInUse => {
                    Ok(vec![bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))?])
                }
                Err(e) => Err(e),
            };
        }
        let addrs: Vec<IpAddr> = if self.primary {
            node_addresses.to_vec()
        } else {
            node_addresses
                .iter()
                .copied()
                .filter(|a| self.nodeport_addresses.iter().any(|c| c.contains(*a)))
                .collect()
        };
        addrs.into_iter().map(|a| bind(SocketAddr::new(a, port))).collect()
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
        // Two ports of Service a share p1: their local endpoints count once per ip:port (10.244.1.2:8080 is behind
        // both, so 2, not 3); b serves p2.
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
        assert_eq!(s, [(p1, (a("a"), 2)), (p2, (a("b"), 1))].into());
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

    #[test]
    fn body_matches_kube_proxy() {
        assert_eq!(
            body(&ServiceName::new("default", "web"), 3, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 3,\n\t\"serviceProxyHealthy\": true\n}"
        );
    }
}
