//! healthCheckNodePort servers for LoadBalancer Services with externalTrafficPolicy=Local, answering like
//! kube-proxy's: 200 when this node has local ready endpoints for the Service and the proxy is healthy, else 503,
//! with the same JSON body and headers, so cloud load balancers steer traffic only to nodes that can serve it.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::http::{self, Response};
use crate::model::state::Snapshot;
use crate::model::{Cidr, ServiceName};
use crate::sync::SyncHealth;

struct Server {
    service: ServiceName,
    local_endpoints: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// One listener per healthCheckNodePort, started and stopped as Services come and go.
pub struct HealthCheckServers {
    servers: HashMap<u16, Server>,
    health: Arc<SyncHealth>,
    health_timeout: Duration,
    nodeport_addresses: Vec<Cidr>,
}

/// kube-proxy's body (tab-indented JSON, no trailing newline).
pub fn body(svc: &ServiceName, local_endpoints: usize, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        svc.namespace, svc.name
    )
}

/// Per Service: its healthCheckNodePort and the number of local ready endpoints over its ports.
pub fn wanted(desired: &Snapshot) -> BTreeMap<u16, (ServiceName, usize)> {
    let mut out: BTreeMap<u16, (ServiceName, usize)> = BTreeMap::new();
    for st in desired.values() {
        let Some(port) = st.port.health_check_node_port else {
            continue;
        };
        let local = st.endpoints.iter().filter(|e| e.is_local && e.ready).count();
        let entry = out.entry(port).or_insert_with(|| (st.port.name.service.clone(), 0));
        if entry.0 == st.port.name.service {
            entry.1 += local;
        } else {
            tracing::warn!(port, first = %entry.0, second = %st.port.name.service, "two Services claim one healthCheckNodePort");
        }
    }
    out
}

impl HealthCheckServers {
    pub fn new(health: Arc<SyncHealth>, health_timeout: Duration, nodeport_addresses: Vec<Cidr>) -> Self {
        Self {
            servers: HashMap::new(),
            health,
            health_timeout,
            nodeport_addresses,
        }
    }

    /// Makes the listeners match `desired`. Must run inside the tokio runtime.
    pub fn sync(&mut self, desired: &Snapshot, node_addresses: &[IpAddr]) {
        let want = wanted(desired);
        self.servers.retain(|port, s| {
            let keep = want.get(port).is_some_and(|(svc, _)| *svc == s.service);
            if !keep {
                s.task.abort();
            }
            keep
        });
        for (port, (svc, count)) in want {
            if let Some(s) = self.servers.get(&port) {
                s.local_endpoints.store(count, Ordering::Relaxed);
                continue;
            }
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
                                let healthy = health.check(timeout).0;
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
                Err(e) => tracing::error!(port, service = %svc, error = %e, "cannot serve healthCheckNodePort"),
            }
        }
    }

    fn listen(&self, port: u16, node_addresses: &[IpAddr]) -> std::io::Result<Vec<tokio::net::TcpListener>> {
        let addrs: Vec<IpAddr> = if self.nodeport_addresses.is_empty() {
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

    fn state(port: u16, local_ready: usize) -> Snapshot {
        let name = ServicePortName {
            service: ServiceName::new("ns", "lb"),
            port: String::new(),
            protocol: Protocol::Tcp,
        };
        let sp = ServicePort {
            name: name.clone(),
            cluster_ips: vec!["10.96.0.9".parse().unwrap()],
            port: 80,
            protocol: Protocol::Tcp,
            node_port: Some(30080),
            load_balancer_ips: vec![],
            external_ips: vec![],
            load_balancer_source_ranges: vec![],
            session_affinity: None,
            external_policy: TrafficPolicy::Local,
            internal_policy: TrafficPolicy::Cluster,
            health_check_node_port: Some(port),
            traffic_distribution: None,
        };
        let eps = (0..local_ready + 1)
            .map(|i| Endpoint {
                ip: format!("10.244.1.{}", i + 2).parse().unwrap(),
                port: 8080,
                ready: true,
                serving: true,
                terminating: false,
                is_local: i < local_ready,
                node_name: None,
                zone: None,
                zone_hints: Default::default(),
                node_hints: Default::default(),
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

    #[test]
    fn body_matches_kube_proxy() {
        assert_eq!(
            body(&ServiceName::new("default", "web"), 3, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 3,\n\t\"serviceProxyHealthy\": true\n}"
        );
    }
}
