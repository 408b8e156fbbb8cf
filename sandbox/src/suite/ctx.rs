//! What a scenario works with: its own Kubernetes namespace, the kubelet role, Service helpers, and traffic
//! checks that say what a user would see (which pod answered, which source address it saw, refused versus timed
//! out), each polling for convergence up to a bound.
use crate::kubelet::{self, DeploymentSpec, Kubelet, PodInfo};
use crate::pods::{self, NetError, WhoAmI};
use crate::suite::proxy::ProxyKind;
use crate::topology::Topology;
use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a scenario waits for the cluster (controllers, proxies) to converge on a change.
pub const CONVERGE: Duration = Duration::from_secs(30);
/// How long pods get to become Ready.
pub const POD_READY: Duration = Duration::from_secs(30);
/// Time limit of one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);

/// One scenario's run against one proxy.
pub struct Ctx {
    pub client: Client,
    pub kubelet: Arc<Kubelet>,
    pub topo: Topology,
    /// The scenario's Kubernetes namespace (created by [`Ctx::setup`], deleted by [`Ctx::cleanup`]).
    pub ns: String,
    pub proxy: ProxyKind,
    /// The proxy's processes on the nodes (scenarios that kill and restart one).
    pub agents: Option<crate::suite::proxy::Agents>,
    pub scenario: String,
    started: Instant,
    /// Print steps as they happen.
    pub verbose: bool,
}

impl Ctx {
    pub fn new(
        client: Client,
        kubelet: Arc<Kubelet>,
        topo: Topology,
        scenario: &str,
        proxy: ProxyKind,
        verbose: bool,
    ) -> Ctx {
        Ctx {
            client,
            kubelet,
            topo,
            ns: format!("{scenario}-{}", proxy.short()),
            proxy,
            agents: None,
            scenario: scenario.to_string(),
            started: Instant::now(),
            verbose,
        }
    }

    /// With the handle on the proxy's processes.
    pub fn with_agents(mut self, agents: crate::suite::proxy::Agents) -> Ctx {
        self.agents = Some(agents);
        self
    }

    /// The proxy's processes (set by the runner).
    pub fn agents(&self) -> Result<&crate::suite::proxy::Agents> {
        self.agents
            .as_ref()
            .context("this run has no handle on the proxy's processes")
    }

    /// Print a step (with the time since the scenario started).
    pub fn step(&self, msg: impl AsRef<str>) {
        if self.verbose {
            println!("    {:>5.1}s  {}", self.started.elapsed().as_secs_f64(), msg.as_ref());
        }
    }

    /// Create the scenario's namespace (deleting a leftover of the same name first).
    pub async fn setup(&self) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let t0 = Instant::now();
        loop {
            match api.get_opt(&self.ns).await? {
                None => break,
                Some(_) if t0.elapsed() > Duration::from_secs(60) => {
                    bail!("namespace {} from an earlier run is still terminating", self.ns)
                }
                Some(n) => {
                    if n.metadata.deletion_timestamp.is_none() {
                        let _ = api.delete(&self.ns, &DeleteParams::default()).await;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": self.ns}}))?;
        api.create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {}", self.ns))?;
        Ok(())
    }

    /// Remove the scenario's pods (grace 0), then its namespace (not waiting for the namespace controller).
    pub async fn cleanup(&self) -> Result<()> {
        let pods: Vec<PodInfo> = self
            .kubelet
            .pods()
            .into_iter()
            .filter(|p| p.namespace == self.ns)
            .collect();
        let mut errors = Vec::new();
        for p in &pods {
            if let Err(e) = self.kubelet.delete_pod(&self.ns, &p.name, Some(Duration::ZERO)).await {
                errors.push(format!("{e:#}"));
            }
        }
        for p in &pods {
            if let Err(e) = self.kubelet.wait_gone(&self.ns, &p.name, Duration::from_secs(30)).await {
                errors.push(format!("{e:#}"));
            }
        }
        let api: Api<Namespace> = Api::all(self.client.clone());
        if let Err(e) = api.delete(&self.ns, &DeleteParams::default()).await {
            errors.push(format!("deleting namespace {}: {e}", self.ns));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("cleanup of {}: {}", self.ns, errors.join("; "))
        }
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&crate::topology::Node> {
        self.topo.node(name).with_context(|| format!("no node {name}"))
    }

    /// The external client's namespace.
    pub fn client_ns(&self) -> &str {
        &self.topo.client.netns
    }

    /// Deploy `spec` into the scenario's namespace and wait until every pod is Ready.
    pub async fn deploy(&self, spec: DeploymentSpec) -> Result<Vec<PodInfo>> {
        let spec = spec.namespace(&self.ns);
        let pods = self.kubelet.deploy(&spec).await?;
        for p in &pods {
            self.kubelet
                .wait_ready(&self.ns, &p.name, true, POD_READY)
                .await
                .with_context(|| format!("pod {} of {} never became Ready", p.name, spec.name))?;
        }
        self.step(format!(
            "deployed {} ({})",
            spec.name,
            pods.iter()
                .map(|p| format!("{} {} on {}", p.name, p.ip, p.node))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        Ok(pods)
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Create a Service from its JSON (metadata.namespace is filled in).
    pub async fn create_service(&self, mut v: Value) -> Result<Service> {
        v["apiVersion"] = json!("v1");
        v["kind"] = json!("Service");
        v["metadata"]["namespace"] = json!(self.ns);
        let name = v["metadata"]["name"].as_str().unwrap_or("?").to_string();
        let svc: Service = serde_json::from_value(v).context("service JSON")?;
        let s = self
            .services()
            .create(&PostParams::default(), &svc)
            .await
            .with_context(|| format!("creating service {name}"))?;
        self.step(format!(
            "service {name}: clusterIP {} ports {}",
            cluster_ip(&s).map(|i| i.to_string()).unwrap_or_else(|_| "-".into()),
            describe_ports(&s)
        ));
        Ok(s)
    }

    /// JSON-merge-patch a Service (lists such as `ports` are replaced whole).
    pub async fn patch_service(&self, name: &str, patch: Value) -> Result<Service> {
        let s = self
            .services()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("patching service {name} with {patch}"))?;
        self.step(format!(
            "patched service {name}: {patch} -> ports {}",
            describe_ports(&s)
        ));
        Ok(s)
    }

    /// Write `status.loadBalancer.ingress` (what a load-balancer controller does).
    pub async fn set_lb_ingress(&self, name: &str, ip: impl Into<IpAddr>) -> Result<Service> {
        let ip: IpAddr = ip.into();
        let patch = json!({"status": {"loadBalancer": {"ingress": [{"ip": ip.to_string(), "ipMode": "VIP"}]}}});
        let s = self
            .services()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("writing the load-balancer status of {name}"))?;
        self.step(format!("service {name}: load-balancer ingress {ip}"));
        Ok(s)
    }

    pub async fn get_service(&self, name: &str) -> Result<Service> {
        self.services()
            .get(name)
            .await
            .with_context(|| format!("reading service {name}"))
    }

    /// Delete a Service and wait until the object is gone.
    pub async fn delete_service(&self, name: &str) -> Result<()> {
        self.services()
            .delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting service {name}"))?;
        eventually(&format!("service {name} gone"), CONVERGE, || async {
            match self.services().get_opt(name).await? {
                None => Ok(()),
                Some(_) => bail!("still there"),
            }
        })
        .await?;
        self.step(format!("deleted service {name}"));
        Ok(())
    }

    /// Wait until the EndpointSlices of `service` list exactly `ready` ready endpoints (counting addresses).
    pub async fn wait_endpoints(&self, service: &str, ready: usize) -> Result<()> {
        eventually(&format!("{ready} ready endpoints for {service}"), CONVERGE, || async {
            let eps = kubelet::service_endpoints(&self.client, &self.ns, service).await?;
            let n: usize = eps
                .iter()
                .filter(|e| e.ready == Some(true))
                .map(|e| e.addresses.len())
                .sum();
            if n == ready {
                Ok(())
            } else {
                bail!("{n} ready endpoints")
            }
        })
        .await
    }

    /// Deploy pods which only act as clients (a test server runs in them anyway), on `node`.
    pub async fn client_pod(&self, name: &str, node: &str) -> Result<PodInfo> {
        let spec = DeploymentSpec::new(name, 1)
            .on_node(node)
            .labels(&[("role", "client")])
            .readiness(None);
        let mut pods = self.deploy(spec).await?;
        pods.pop().context("no client pod")
    }
}

/// `spec.clusterIP` of a Service.
pub fn cluster_ip(s: &Service) -> Result<Ipv4Addr> {
    let ip = s
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .context("service has no clusterIP")?;
    ip.parse().with_context(|| format!("clusterIP {ip:?}"))
}

/// `spec.clusterIPs` of a Service, in its order (the first is `spec.clusterIP`).
pub fn cluster_ips(s: &Service) -> Result<Vec<IpAddr>> {
    let ips = s.spec.as_ref().and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
    ips.iter()
        .map(|ip| ip.parse().with_context(|| format!("clusterIPs entry {ip:?}")))
        .collect()
}

/// The IPv6 cluster IP of a Service.
pub fn cluster_ip6(s: &Service) -> Result<IpAddr> {
    cluster_ips(s)?
        .into_iter()
        .find(IpAddr::is_ipv6)
        .context("service has no IPv6 clusterIP")
}

/// The nodePort of the Service port named `port_name` (or the first port when `None`).
pub fn node_port(s: &Service, port_name: Option<&str>) -> Result<u16> {
    let ports = s.spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default();
    let p = match port_name {
        Some(n) => ports.iter().find(|p| p.name.as_deref() == Some(n)),
        None => ports.first(),
    }
    .with_context(|| format!("no service port {port_name:?}"))?;
    let np = p.node_port.context("service port has no nodePort")?;
    u16::try_from(np).context("nodePort out of range")
}

/// `spec.healthCheckNodePort`.
pub fn health_check_node_port(s: &Service) -> Result<u16> {
    let p = s
        .spec
        .as_ref()
        .and_then(|s| s.health_check_node_port)
        .context("service has no healthCheckNodePort")?;
    u16::try_from(p).context("healthCheckNodePort out of range")
}

fn describe_ports(s: &Service) -> String {
    s.spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let mut d = format!("{}/{}", p.port, p.protocol.as_deref().unwrap_or("TCP"));
            if let Some(np) = p.node_port {
                d.push_str(&format!(" (nodePort {np})"));
            }
            d
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Run `f` until it succeeds, every 300 ms, for at most `timeout`; the error names `what` and the last failure.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let t0 = Instant::now();
    let mut tries = 0u32;
    loop {
        tries += 1;
        let err = match f().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if t0.elapsed() >= timeout {
            return Err(anyhow!(
                "{what}: not so after {:.0}s ({tries} tries); last: {err:#}",
                timeout.as_secs_f64()
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// What a series of requests saw.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    /// Answers per pod name.
    pub answers: BTreeMap<String, usize>,
    /// Source addresses the pods saw.
    pub sources: BTreeSet<IpAddr>,
    /// Server ports that answered, per pod.
    pub ports: BTreeMap<String, BTreeSet<u16>>,
    /// Failures by kind.
    pub errors: BTreeMap<String, usize>,
}

impl Sample {
    pub fn ok(&self) -> usize {
        self.answers.values().sum()
    }

    pub fn failed(&self) -> usize {
        self.errors.values().sum()
    }

    pub fn pods(&self) -> BTreeSet<String> {
        self.answers.keys().cloned().collect()
    }

    fn add(&mut self, r: &Result<WhoAmI, NetError>) {
        match r {
            Ok(w) => {
                *self.answers.entry(w.pod.clone()).or_default() += 1;
                self.sources.insert(w.client.ip());
                self.ports.entry(w.pod.clone()).or_default().insert(w.server_port);
            }
            Err(e) => *self.errors.entry(e.to_string()).or_default() += 1,
        }
    }
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self.answers.iter().map(|(p, n)| format!("{p}: {n}")).collect();
        parts.extend(self.errors.iter().map(|(e, n)| format!("{e}: {n}")));
        write!(f, "{{{}}}", parts.join(", "))
    }
}

/// `n` HTTP `GET /` requests from namespace `from` to `addr` (stops early after 3 failures).
pub async fn sample(from: &str, addr: SocketAddr, n: usize) -> Sample {
    let mut s = Sample::default();
    for _ in 0..n {
        let r = pods::whoami(from, addr, REQUEST_TIMEOUT).await;
        s.add(&r);
        if s.failed() >= 3 {
            break;
        }
    }
    s
}

/// Poll until every request from `from` to `addr` is answered and the answering pods are exactly `expected`
/// (enough requests that missing one of them by chance is below one in 10⁵). Returns the last sample.
pub async fn expect_backends(from: &str, addr: SocketAddr, expected: &BTreeSet<String>) -> Result<Sample> {
    let n = (expected.len() * 12).max(12);
    eventually(
        &format!("requests from {from} to {addr} answered by exactly {expected:?}"),
        CONVERGE,
        || async {
            let s = sample(from, addr, n).await;
            if s.failed() == 0 && &s.pods() == expected {
                Ok(s)
            } else {
                bail!("got {s}")
            }
        },
    )
    .await
}

/// Poll until five requests in a row from `from` to `addr` get no answer; returns the failures seen.
pub async fn expect_unanswered(from: &str, addr: SocketAddr) -> Result<Vec<NetError>> {
    eventually(
        &format!("requests from {from} to {addr} unanswered"),
        CONVERGE,
        || async {
            let mut errs = Vec::new();
            for _ in 0..5 {
                match pods::whoami(from, addr, Duration::from_millis(1000)).await {
                    Ok(w) => bail!("answered by {} after {} failures", w.pod, errs.len()),
                    Err(e) => errs.push(e),
                }
            }
            Ok(errs)
        },
    )
    .await
}

/// Poll until three TCP connects in a row from `from` to `addr` are refused (an RST or ICMP port unreachable,
/// not a timeout).
pub async fn expect_refused(from: &str, addr: SocketAddr) -> Result<()> {
    eventually(
        &format!("TCP connect from {from} to {addr} refused"),
        CONVERGE,
        || async {
            for _ in 0..3 {
                match pods::tcp_connect(from, addr, Duration::from_secs(2)).await {
                    Err(NetError::Refused) => {}
                    Err(e) => bail!("{e} instead of connection refused"),
                    Ok(_) => bail!("connected instead of refused"),
                }
            }
            Ok(())
        },
    )
    .await
}

/// Names of pods.
pub fn names(pods: &[PodInfo]) -> BTreeSet<String> {
    pods.iter().map(|p| p.name.clone()).collect()
}

/// `ip:port` (`[ip]:port` for IPv6).
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}
