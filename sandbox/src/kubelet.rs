//! The kubelet role: Pod objects backed by real pods ([`crate::pods`]), so the real EndpointSlice controller
//! writes real slices.
//!
//! [`Kubelet::deploy`] takes a Deployment-like [`DeploymentSpec`] (name, replicas, labels, placement, named
//! container ports, readiness probe) and for each replica:
//! 1. creates the Pod object (`spec.nodeName` set, the spec's labels, the container ports and readiness probe);
//! 2. creates the pod namespace on that node and starts `orca-testpod` in it;
//! 3. writes the status through the `pods/status` subresource: phase Running, hostIP(s), podIP(s), startTime,
//!    conditions PodScheduled / Initialized / ContainersReady / Ready, a container status;
//! 4. runs one background task per pod which probes readiness like the kubelet's prober does (HTTP GET on the
//!    probe path from the node's namespace, every `period`, Ready after `success_threshold` consecutive successes,
//!    not Ready after `failure_threshold` consecutive failures; without a probe the pod is Ready once started) and
//!    writes the Ready/ContainersReady conditions whenever the result changes. A server process that exits is
//!    restarted (restartPolicy Always; `restartCount` goes up, readiness starts over), and so is one that fails
//!    its optional liveness probe ([`DeploymentSpec::liveness`], e.g. `/healthy`) `failure_threshold` times.
//!
//! Termination, as the kubelet does it: the pod's task watches its Pod object. When a graceful delete sets
//! `deletionTimestamp` (from [`Kubelet::delete_pod`] or anyone else), the task sends SIGTERM to the server
//! (whose `--on-sigterm` decides: by default it starts failing `/ready`, so the probe turns Ready false after
//! `failure_threshold` periods), keeps probing and serving during `deletionGracePeriodSeconds`, then kills the
//! server, removes the namespace, frees the IP, writes a terminal status (phase Succeeded, Ready false) and
//! finalizes the delete with grace period 0 (UID precondition).
//!
//! A delete with grace period 0 (or any removal of the object) stops the server and removes the namespace at
//! once. [`DeploymentSpec::host_network`] pods run their server in the node's namespace on the node's IP.
//! Replicas of one deploy start concurrently (at most [`DEPLOY_CONCURRENCY`] at a time); two pods take about
//! 0.2 s from `deploy` to Running on the sandbox.
//!
//! Probe periods: the Pod object carries `periodSeconds` rounded up to whole seconds (the API's unit); the task
//! uses the exact [`ProbeSpec::period`], so tests may probe every few hundred milliseconds.
use crate::pods::{self, NetError, OnSigterm, Pod, PodNode, PodRuntime, ServerConfig};
use crate::topology::Topology;
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod as KPod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::Client;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How many pods of one [`Kubelet::deploy`] start at the same time.
pub const DEPLOY_CONCURRENCY: usize = 8;

/// The container name in every Pod object.
pub const CONTAINER_NAME: &str = "testpod";
/// The (never pulled) image name in every Pod object.
pub const IMAGE: &str = "orca.dev/testpod:local";

/// An HTTP readiness probe (like the seed's: `httpGet /ready`, period 2 s, failureThreshold 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    pub path: String,
    /// Port to probe; `None`: the first HTTP port.
    pub port: Option<u16>,
    pub period: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub initial_delay: Duration,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        ProbeSpec {
            path: "/ready".into(),
            port: None,
            period: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            failure_threshold: 3,
            success_threshold: 1,
            initial_delay: Duration::ZERO,
        }
    }
}

impl ProbeSpec {
    /// A liveness probe on `/healthy` like the seed's kuard (failureThreshold 3) with the given period.
    pub fn healthy(period: Duration) -> ProbeSpec {
        ProbeSpec {
            path: "/healthy".into(),
            ..ProbeSpec::with_period(period)
        }
    }

    /// The default probe with another period (tests use a short one).
    pub fn with_period(period: Duration) -> ProbeSpec {
        ProbeSpec {
            period,
            timeout: period.min(Duration::from_secs(1)),
            ..ProbeSpec::default()
        }
    }
}

/// What a container port serves in the test server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortKind {
    Http,
    Udp,
    TcpEcho,
    TcpSink,
}

/// A container port: optional name (for named targetPorts), number and what the test server runs on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub name: Option<String>,
    pub port: u16,
    pub kind: PortKind,
}

impl PortSpec {
    pub fn http(name: &str, port: u16) -> PortSpec {
        PortSpec::named(name, port, PortKind::Http)
    }
    pub fn udp(name: &str, port: u16) -> PortSpec {
        PortSpec::named(name, port, PortKind::Udp)
    }
    pub fn tcp_echo(name: &str, port: u16) -> PortSpec {
        PortSpec::named(name, port, PortKind::TcpEcho)
    }
    pub fn tcp_sink(name: &str, port: u16) -> PortSpec {
        PortSpec::named(name, port, PortKind::TcpSink)
    }
    fn named(name: &str, port: u16, kind: PortKind) -> PortSpec {
        PortSpec {
            name: (!name.is_empty()).then(|| name.to_string()),
            port,
            kind,
        }
    }
    fn protocol(&self) -> &'static str {
        match self.kind {
            PortKind::Udp => "UDP",
            _ => "TCP",
        }
    }
}

/// The test server's default ports: `http` 8080, `udp` 8081/UDP, `echo` 9000, `sink` 9001.
pub fn default_ports() -> Vec<PortSpec> {
    vec![
        PortSpec::http("http", pods::DEFAULT_HTTP_PORT),
        PortSpec::udp("udp", pods::DEFAULT_UDP_PORT),
        PortSpec::tcp_echo("echo", pods::DEFAULT_TCP_ECHO_PORT),
        PortSpec::tcp_sink("sink", pods::DEFAULT_TCP_SINK_PORT),
    ]
}

/// Where the replicas go.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Placement {
    /// Round-robin over every node (continuing across deployments of one kubelet).
    #[default]
    RoundRobin,
    /// All on one node.
    Node(String),
    /// Round-robin over these nodes, in order.
    Nodes(Vec<String>),
}

/// A Deployment-like spec.
#[derive(Clone, Debug)]
pub struct DeploymentSpec {
    pub name: String,
    pub namespace: String,
    pub replicas: usize,
    pub labels: BTreeMap<String, String>,
    pub placement: Placement,
    pub ports: Vec<PortSpec>,
    /// `None`: no readiness probe (Ready as soon as the server runs).
    pub readiness: Option<ProbeSpec>,
    /// `None` (the default): no liveness probe. With one, `failure_threshold` consecutive failures restart the
    /// server (restartCount goes up; a restarted server is healthy again and its readiness starts over).
    pub liveness: Option<ProbeSpec>,
    /// `terminationGracePeriodSeconds` (30 s, like Kubernetes, unless set); a delete may override it.
    pub grace_period: Duration,
    pub on_sigterm: OnSigterm,
    /// Start the server with `/ready` failing.
    pub start_not_ready: bool,
    /// `hostNetwork: true`: the server runs in the node's namespace and the pod's IP is the node's.
    pub host_network: bool,
}

impl DeploymentSpec {
    /// `replicas` pods labelled `app=<name>` in namespace `default`, default ports, the default probe.
    pub fn new(name: &str, replicas: usize) -> DeploymentSpec {
        DeploymentSpec {
            name: name.to_string(),
            namespace: "default".into(),
            replicas,
            labels: BTreeMap::from([("app".to_string(), name.to_string())]),
            placement: Placement::RoundRobin,
            ports: default_ports(),
            readiness: Some(ProbeSpec::default()),
            liveness: None,
            grace_period: Duration::from_secs(30),
            on_sigterm: OnSigterm::FailReady,
            start_not_ready: false,
            host_network: false,
        }
    }

    /// Replace the labels.
    pub fn labels(mut self, labels: &[(&str, &str)]) -> Self {
        self.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self
    }

    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.to_string();
        self
    }

    pub fn on_node(mut self, node: &str) -> Self {
        self.placement = Placement::Node(node.to_string());
        self
    }

    pub fn ports(mut self, ports: Vec<PortSpec>) -> Self {
        self.ports = ports;
        self
    }

    pub fn readiness(mut self, probe: Option<ProbeSpec>) -> Self {
        self.readiness = probe;
        self
    }

    pub fn liveness(mut self, probe: Option<ProbeSpec>) -> Self {
        self.liveness = probe;
        self
    }

    pub fn grace_period(mut self, g: Duration) -> Self {
        self.grace_period = g;
        self
    }

    pub fn host_network(mut self, on: bool) -> Self {
        self.host_network = on;
        self
    }

    pub fn on_sigterm(mut self, o: OnSigterm) -> Self {
        self.on_sigterm = o;
        self
    }

    /// Check names, ports and probe; returns the server configuration.
    fn server_config(&self) -> Result<ServerConfig> {
        if !is_dns_label(&self.name) || self.name.len() > 50 {
            bail!(
                "deployment name {:?} is not a DNS label of at most 50 characters",
                self.name
            );
        }
        if !is_dns_label(&self.namespace) {
            bail!("namespace {:?} is not a DNS label", self.namespace);
        }
        let mut cfg = ServerConfig {
            http_ports: Vec::new(),
            udp_ports: Vec::new(),
            tcp_echo_port: None,
            tcp_sink_port: None,
            start_not_ready: self.start_not_ready,
            on_sigterm: self.on_sigterm,
        };
        let mut seen = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for p in &self.ports {
            if p.port == 0 {
                bail!("port 0 in {:?}", p);
            }
            if !seen.insert((p.port, p.protocol())) {
                bail!("port {}/{} listed twice", p.port, p.protocol());
            }
            if let Some(n) = &p.name {
                if n.len() > 15 || !is_dns_label(n) || !n.chars().any(|c| c.is_ascii_lowercase()) {
                    bail!("port name {n:?} is not an IANA service name (≤15 lowercase alphanumerics and '-')");
                }
                if !names.insert(n.clone()) {
                    bail!("port name {n:?} listed twice");
                }
            }
            match p.kind {
                PortKind::Http => cfg.http_ports.push(p.port),
                PortKind::Udp => cfg.udp_ports.push(p.port),
                PortKind::TcpEcho if cfg.tcp_echo_port.is_none() => cfg.tcp_echo_port = Some(p.port),
                PortKind::TcpSink if cfg.tcp_sink_port.is_none() => cfg.tcp_sink_port = Some(p.port),
                _ => bail!("the test server runs one TCP echo and one TCP sink; {:?} is extra", p),
            }
        }
        if let Some(probe) = &self.liveness {
            let port = self.liveness_port()?;
            if !cfg.http_ports.contains(&port) {
                bail!("liveness probe port {port} is not an HTTP port of the spec");
            }
            if probe.period.is_zero() || probe.failure_threshold == 0 || probe.success_threshold != 1 {
                bail!("a liveness probe needs a period, failureThreshold above zero and successThreshold 1: {probe:?}");
            }
        }
        if let Some(probe) = &self.readiness {
            let port = self.probe_port()?;
            if !cfg.http_ports.contains(&port) {
                bail!("readiness probe port {port} is not an HTTP port of the spec");
            }
            if probe.period.is_zero() || probe.failure_threshold == 0 || probe.success_threshold == 0 {
                bail!("readiness probe needs a period and thresholds above zero: {probe:?}");
            }
        }
        Ok(cfg)
    }

    fn liveness_port(&self) -> Result<u16> {
        let first_http = self.ports.iter().find(|p| p.kind == PortKind::Http).map(|p| p.port);
        match self.liveness.as_ref().and_then(|p| p.port).or(first_http) {
            Some(p) => Ok(p),
            None => bail!("a liveness probe needs an HTTP port"),
        }
    }

    fn probe_port(&self) -> Result<u16> {
        let first_http = self.ports.iter().find(|p| p.kind == PortKind::Http).map(|p| p.port);
        match self.readiness.as_ref().and_then(|p| p.port).or(first_http) {
            Some(p) => Ok(p),
            None => bail!("a readiness probe needs an HTTP port"),
        }
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A pod the kubelet runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub deployment: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// The pod's network namespace.
    pub netns: String,
    /// The network namespace of its node.
    pub node_netns: String,
    pub uid: String,
    /// The first HTTP port (where `/`, `/ready` and the readiness toggles are), if any.
    pub http_port: Option<u16>,
}

impl PodInfo {
    /// `ip:port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// The pod's IPv6 address (its second podIP).
    pub fn ip6(&self) -> std::net::Ipv6Addr {
        crate::topology::v6(self.ip)
    }

    /// `[ip6]:port`.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip6(), port))
    }
}

type PodKey = (String, String);

enum Stop {
    /// Kill the server, remove the namespace, delete the object with grace 0.
    Remove,
}

struct Worker {
    info: PodInfo,
    stop: Option<oneshot::Sender<Stop>>,
    task: JoinHandle<()>,
}

/// The kubelet role for every node of a sandbox. Dropping it aborts the pod tasks, which kills their servers and
/// removes their namespaces (the Pod objects stay); [`Kubelet::shutdown`] also deletes the objects.
pub struct Kubelet {
    client: Client,
    runtime: Arc<PodRuntime>,
    workers: Arc<Mutex<HashMap<PodKey, Worker>>>,
    round_robin: AtomicUsize,
    seq: AtomicU64,
}

impl Kubelet {
    /// A kubelet for the nodes of `topology`, using `orca-testpod` from [`pods::testpod_binary`].
    pub fn new(client: Client, topology: &Topology) -> Result<Kubelet> {
        Ok(Kubelet::with_binary(
            client,
            PodNode::from_topology(topology),
            pods::testpod_binary()?,
        ))
    }

    /// A kubelet for `nodes`, with an explicit `orca-testpod` binary.
    pub fn with_binary(client: Client, nodes: Vec<PodNode>, testpod_bin: PathBuf) -> Kubelet {
        Kubelet {
            client,
            runtime: Arc::new(PodRuntime::new(nodes, testpod_bin)),
            workers: Arc::new(Mutex::new(HashMap::new())),
            round_robin: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn nodes(&self) -> &[PodNode] {
        self.runtime.nodes()
    }

    fn pick_node(&self, placement: &Placement, i: usize) -> Result<String> {
        let names: Vec<String> = match placement {
            Placement::RoundRobin => self.nodes().iter().map(|n| n.name.clone()).collect(),
            Placement::Node(n) => vec![n.clone()],
            Placement::Nodes(v) => v.clone(),
        };
        if names.is_empty() {
            bail!("no node to place pods on");
        }
        for n in &names {
            if self.runtime.node(n).is_none() {
                bail!("unknown node {n:?}");
            }
        }
        let idx = match placement {
            Placement::RoundRobin => self.round_robin.fetch_add(1, Ordering::Relaxed),
            _ => i,
        };
        Ok(names[idx % names.len()].clone())
    }

    fn pod_name(&self, deployment: &str) -> String {
        // Five base-36 characters from a counter mixed with the clock and the pid: unique within the kubelet,
        // and unlikely to repeat across runs.
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut h = seq
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(u64::from(nanos))
            .wrapping_add(u64::from(std::process::id()) << 32);
        h ^= h >> 29;
        let alphabet = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut s = String::new();
        for _ in 0..5 {
            s.push(alphabet[(h % 36) as usize] as char);
            h /= 36;
        }
        format!("{deployment}-{s}")
    }

    /// Create the spec's replicas and start them. Returns once every pod runs and has its status written (not
    /// necessarily Ready: see [`Kubelet::wait_ready`]).
    pub async fn deploy(&self, spec: &DeploymentSpec) -> Result<Vec<PodInfo>> {
        spec.server_config()?;
        let mut plan = Vec::new();
        for i in 0..spec.replicas {
            plan.push((self.pick_node(&spec.placement, i)?, self.pod_name(&spec.name)));
        }
        // Up to DEPLOY_CONCURRENCY pods start at once; the results keep the plan's order. On an error the pods
        // that did start keep running (and are listed by `pods()`), like a partially rolled-out Deployment.
        let results: Vec<Result<PodInfo>> = futures::stream::iter(plan.into_iter().map(|(node, name)| async move {
            self.run_pod(spec, &name, &node)
                .await
                .with_context(|| format!("starting pod {name} of {} on {node}", spec.name))
        }))
        .buffered(DEPLOY_CONCURRENCY)
        .collect()
        .await;
        results.into_iter().collect()
    }

    /// Create one pod of `spec` called `name` on `node`.
    pub async fn run_pod(&self, spec: &DeploymentSpec, name: &str, node: &str) -> Result<PodInfo> {
        let cfg = spec.server_config()?;
        let key = (spec.namespace.clone(), name.to_string());
        if self.lock_workers().contains_key(&key) {
            bail!("pod {}/{name} already runs", spec.namespace);
        }
        let node_info = self
            .runtime
            .node(node)
            .with_context(|| format!("unknown node {node:?}"))?
            .clone();
        let api: Api<KPod> = Api::namespaced(self.client.clone(), &spec.namespace);
        let obj = pod_object(spec, name, node)?;
        let created = create_with_retry(&api, &obj).await?;
        let uid = created.metadata.uid.clone().unwrap_or_default();
        let started = if spec.host_network {
            self.runtime
                .start_host_network(node, &spec.namespace, name, cfg.clone())
                .await
        } else {
            self.runtime.start(node, &spec.namespace, name, cfg.clone()).await
        };
        let pod = match started {
            Ok(p) => p,
            Err(e) => {
                let _ = delete_now(&api, name, &uid).await;
                return Err(e);
            }
        };
        let info = PodInfo {
            name: name.to_string(),
            namespace: spec.namespace.clone(),
            deployment: spec.name.clone(),
            node: node.to_string(),
            ip: pod.ip(),
            netns: pod.netns().to_string(),
            node_netns: node_info.netns.clone(),
            uid: uid.clone(),
            http_port: cfg.http_ports.first().copied(),
        };
        let probe = match &spec.readiness {
            Some(p) => Some((p.clone(), spec.probe_port()?)),
            None => None,
        };
        let liveness = match &spec.liveness {
            Some(p) => Some((p.clone(), spec.liveness_port()?)),
            None => None,
        };
        let mut state = PodState::new(probe.is_none());
        if let Err(e) = write_status(&api, name, &pod, &state).await {
            self.runtime.stop(pod, Duration::ZERO).await;
            let _ = delete_now(&api, name, &uid).await;
            return Err(e);
        }
        state.status_written = true;
        let (stop_tx, stop_rx) = oneshot::channel();
        let ctx = WorkerCtx {
            api,
            runtime: self.runtime.clone(),
            workers: self.workers.clone(),
            key: key.clone(),
            uid,
            probe,
            liveness,
        };
        // Spawn under the lock: a task that ends at once (object already deleted) removes its entry only after
        // it was inserted.
        let mut workers = self.lock_workers();
        let task = tokio::spawn(pod_task(ctx, pod, state, stop_rx));
        workers.insert(
            key,
            Worker {
                info: info.clone(),
                stop: Some(stop_tx),
                task,
            },
        );
        Ok(info)
    }

    fn lock_workers(&self) -> std::sync::MutexGuard<'_, HashMap<PodKey, Worker>> {
        // A panic while holding the lock cannot leave the map inconsistent (single inserts/removes).
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every pod this kubelet runs (terminating ones included, until they are gone).
    pub fn pods(&self) -> Vec<PodInfo> {
        let mut v: Vec<PodInfo> = self.lock_workers().values().map(|w| w.info.clone()).collect();
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        v
    }

    /// The pods of one deployment.
    pub fn pods_of(&self, namespace: &str, deployment: &str) -> Vec<PodInfo> {
        self.pods()
            .into_iter()
            .filter(|p| p.namespace == namespace && p.deployment == deployment)
            .collect()
    }

    /// The pod `namespace/name`, while the kubelet runs it.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        self.lock_workers()
            .get(&(namespace.to_string(), name.to_string()))
            .map(|w| w.info.clone())
    }

    fn require(&self, namespace: &str, name: &str) -> Result<PodInfo> {
        self.pod(namespace, name)
            .with_context(|| format!("the kubelet runs no pod {namespace}/{name}"))
    }

    /// Flip the test server's `/ready` (POST `/ready/ok` or `/ready/fail` from the pod's node).
    pub async fn set_ready(&self, namespace: &str, name: &str, ready: bool) -> Result<()> {
        self.post_toggle(namespace, name, if ready { "/ready/ok" } else { "/ready/fail" })
            .await
    }

    /// Flip the test server's `/healthy`.
    pub async fn set_healthy(&self, namespace: &str, name: &str, healthy: bool) -> Result<()> {
        self.post_toggle(namespace, name, if healthy { "/healthy/ok" } else { "/healthy/fail" })
            .await
    }

    async fn post_toggle(&self, namespace: &str, name: &str, path: &str) -> Result<()> {
        let p = self.require(namespace, name)?;
        let port = p.http_port.with_context(|| format!("pod {name} has no HTTP port"))?;
        let r = pods::http_request(&p.node_netns, "POST", p.addr(port), path, Duration::from_secs(3))
            .await
            .with_context(|| format!("POST {path} to pod {name}"))?;
        if r.status != 200 {
            bail!("POST {path} to pod {name}: HTTP {} {}", r.status, r.body);
        }
        Ok(())
    }

    /// Wait until the Pod object's Ready condition is `want`; returns how long it took.
    pub async fn wait_ready(&self, namespace: &str, name: &str, want: bool, timeout: Duration) -> Result<Duration> {
        let api: Api<KPod> = Api::namespaced(self.client.clone(), namespace);
        let t0 = Instant::now();
        loop {
            let got = api
                .get_opt(name)
                .await
                .with_context(|| format!("reading pod {namespace}/{name}"))?
                .map(|p| pod_ready(&p));
            if got == Some(want) {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() >= timeout {
                bail!("pod {namespace}/{name}: Ready is {got:?}, not {want}, after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until every pod of a deployment is Ready.
    pub async fn wait_deployment_ready(&self, namespace: &str, deployment: &str, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        for p in self.pods_of(namespace, deployment) {
            let left = timeout.saturating_sub(t0.elapsed());
            self.wait_ready(namespace, &p.name, true, left).await?;
        }
        Ok(())
    }

    /// Delete a pod gracefully (`gracePeriodSeconds`: `grace`, or the pod's terminationGracePeriodSeconds). The
    /// pod's task then terminates it (see the module docs); returns without waiting. [`Kubelet::wait_gone`]
    /// waits for the end.
    pub async fn delete_pod(&self, namespace: &str, name: &str, grace: Option<Duration>) -> Result<()> {
        let api: Api<KPod> = Api::namespaced(self.client.clone(), namespace);
        let dp = DeleteParams {
            grace_period_seconds: grace.map(|g| u32::try_from(g.as_secs()).unwrap_or(u32::MAX)),
            ..DeleteParams::default()
        };
        api.delete(name, &dp)
            .await
            .with_context(|| format!("deleting pod {namespace}/{name}"))?;
        Ok(())
    }

    /// Bring a deployment to `replicas` pods: start new ones (placed by the spec), or delete pods (last
    /// by name first) gracefully (with the spec's grace period; returns without waiting for them to go). Terminating pods do not
    /// count. Returns the pods that now make up the deployment.
    pub async fn scale(&self, spec: &DeploymentSpec, replicas: usize) -> Result<Vec<PodInfo>> {
        let api: Api<KPod> = Api::namespaced(self.client.clone(), &spec.namespace);
        let mut live = Vec::new();
        for p in self.pods_of(&spec.namespace, &spec.name) {
            let terminating = api
                .get_opt(&p.name)
                .await?
                .is_none_or(|o| o.metadata.deletion_timestamp.is_some());
            if !terminating {
                live.push(p);
            }
        }
        if live.len() < replicas {
            let more = DeploymentSpec {
                replicas: replicas - live.len(),
                ..spec.clone()
            };
            live.extend(self.deploy(&more).await?);
        }
        while live.len() > replicas {
            let Some(p) = live.pop() else { break };
            self.delete_pod(&p.namespace, &p.name, Some(spec.grace_period)).await?;
        }
        Ok(live)
    }

    /// Delete every pod of a deployment gracefully.
    pub async fn delete_deployment(&self, namespace: &str, deployment: &str, grace: Option<Duration>) -> Result<()> {
        for p in self.pods_of(namespace, deployment) {
            self.delete_pod(namespace, &p.name, grace).await?;
        }
        Ok(())
    }

    /// Wait until the kubelet has finished pod `namespace/name`: server stopped, namespace removed, object gone.
    pub async fn wait_gone(&self, namespace: &str, name: &str, timeout: Duration) -> Result<Duration> {
        let key = (namespace.to_string(), name.to_string());
        let api: Api<KPod> = Api::namespaced(self.client.clone(), namespace);
        let t0 = Instant::now();
        loop {
            let running = self.lock_workers().contains_key(&key);
            if !running && api.get_opt(name).await?.is_none() {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() >= timeout {
                bail!("pod {namespace}/{name} still there after {timeout:?} (task running: {running})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stop every pod: kill the servers, remove the namespaces, delete the objects (grace 0). Waits for the
    /// pod tasks.
    pub async fn shutdown(&self) -> Result<()> {
        let workers: Vec<(PodKey, Worker)> = self.lock_workers().drain().collect();
        let mut errors = Vec::new();
        for (key, mut w) in workers {
            if let Some(tx) = w.stop.take() {
                let _ = tx.send(Stop::Remove);
            }
            match tokio::time::timeout(Duration::from_secs(20), &mut w.task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("{}/{}: task failed: {e}", key.0, key.1)),
                Err(_) => {
                    w.task.abort();
                    errors.push(format!("{}/{}: task did not stop", key.0, key.1));
                }
            }
        }
        if !errors.is_empty() {
            bail!("kubelet shutdown: {}", errors.join("; "));
        }
        Ok(())
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        // Aborting drops each task's `Pod`, whose Drop kills the server and removes the namespace.
        for (_, w) in self.lock_workers().drain() {
            w.task.abort();
        }
    }
}

/// Whether a Pod's Ready condition is True.
pub fn pod_ready(p: &KPod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

fn pod_object(spec: &DeploymentSpec, name: &str, node: &str) -> Result<KPod> {
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .map(|p| {
            let mut v = json!({"containerPort": p.port, "protocol": p.protocol()});
            if let Some(n) = &p.name {
                v["name"] = json!(n);
            }
            v
        })
        .collect();
    let mut container = json!({
        "name": CONTAINER_NAME,
        "image": IMAGE,
        "imagePullPolicy": "Never",
        "ports": ports,
    });
    if let Some(p) = &spec.readiness {
        let secs = |d: Duration| d.as_secs_f64().ceil().max(1.0) as u64;
        container["readinessProbe"] = json!({
            "httpGet": {"path": p.path, "port": spec.probe_port()?},
            "periodSeconds": secs(p.period),
            "timeoutSeconds": secs(p.timeout),
            "failureThreshold": p.failure_threshold,
            "successThreshold": p.success_threshold,
            "initialDelaySeconds": p.initial_delay.as_secs(),
        });
    }
    if let Some(p) = &spec.liveness {
        let secs = |d: Duration| d.as_secs_f64().ceil().max(1.0) as u64;
        container["livenessProbe"] = json!({
            "httpGet": {"path": p.path, "port": spec.liveness_port()?},
            "periodSeconds": secs(p.period),
            "timeoutSeconds": secs(p.timeout),
            "failureThreshold": p.failure_threshold,
            "successThreshold": 1,
            "initialDelaySeconds": p.initial_delay.as_secs(),
        });
    }
    let labels: serde_json::Map<String, Value> = spec.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": spec.namespace, "labels": labels},
        "spec": {
            "nodeName": node,
            "hostNetwork": spec.host_network,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": spec.grace_period.as_secs(),
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "containers": [container],
        },
    }))?)
}

/// Create, retrying while the namespace's `default` ServiceAccount does not exist yet (admission refuses pods
/// until the serviceaccount controller made it).
async fn create_with_retry(api: &Api<KPod>, obj: &KPod) -> Result<KPod> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match api.create(&PostParams::default(), obj).await {
            Ok(p) => return Ok(p),
            Err(e) if e.to_string().contains("service account") && Instant::now() < deadline => {
                tracing::debug!("pod create waits for the service account: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("creating pod {}", obj.metadata.name.as_deref().unwrap_or("?")))
            }
        }
    }
}

/// Delete with grace 0, only the object with this UID; a missing object is fine.
async fn delete_now(api: &Api<KPod>, name: &str, uid: &str) -> Result<()> {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: (!uid.is_empty()).then(|| Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("finalizing the delete of pod {name}")),
    }
}

fn now() -> Value {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or(Value::Null)
}

/// What the kubelet knows about one pod's readiness.
struct PodState {
    ready: bool,
    successes: u32,
    failures: u32,
    started_at: Value,
    ready_changed_at: Value,
    terminated: bool,
    status_written: bool,
}

impl PodState {
    fn new(ready: bool) -> PodState {
        let t = now();
        PodState {
            ready,
            successes: 0,
            failures: 0,
            started_at: t.clone(),
            ready_changed_at: t,
            terminated: false,
            status_written: false,
        }
    }

    /// Feed one probe result; true when Ready changed.
    fn observe(&mut self, ok: bool, probe: &ProbeSpec) -> bool {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.ready && self.successes >= probe.success_threshold {
                self.set_ready(true);
                return true;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.ready && self.failures >= probe.failure_threshold {
                self.set_ready(false);
                return true;
            }
        }
        false
    }

    fn set_ready(&mut self, ready: bool) {
        self.ready = ready;
        self.ready_changed_at = now();
    }
}

fn status_body(pod: &Pod, st: &PodState) -> Value {
    let cond = |t: &str, ok: bool, since: &Value| {
        let mut c = json!({"type": t, "status": if ok { "True" } else { "False" }, "lastTransitionTime": since});
        if !ok && (t == "Ready" || t == "ContainersReady") {
            c["reason"] = json!(if st.terminated {
                "PodCompleted"
            } else {
                "ContainersNotReady"
            });
            c["message"] = json!(format!("containers with unready status: [{CONTAINER_NAME}]"));
        }
        c
    };
    let ready = st.ready && !st.terminated;
    let state = if st.terminated {
        json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": st.started_at, "finishedAt": now()}})
    } else {
        json!({"running": {"startedAt": st.started_at}})
    };
    let (ip, host) = (pod.ip().to_string(), pod.host_ip().to_string());
    let (ip6, host6) = (pod.ip6().to_string(), crate::topology::v6(pod.host_ip()).to_string());
    json!({"status": {
        "phase": if st.terminated { "Succeeded" } else { "Running" },
        "hostIP": host,
        "hostIPs": [{"ip": host}, {"ip": host6}],
        "podIP": ip,
        "podIPs": [{"ip": ip}, {"ip": ip6}],
        "startTime": st.started_at,
        "conditions": [
            cond("PodScheduled", true, &st.started_at),
            cond("Initialized", true, &st.started_at),
            cond("ContainersReady", ready, &st.ready_changed_at),
            cond("Ready", ready, &st.ready_changed_at),
        ],
        "containerStatuses": [{
            "name": CONTAINER_NAME,
            "image": IMAGE,
            "imageID": IMAGE,
            "containerID": format!("orca://{}", pod.netns()),
            "ready": ready,
            "started": !st.terminated,
            "restartCount": pod.restarts,
            "state": state,
        }],
    }})
}

async fn write_status(api: &Api<KPod>, name: &str, pod: &Pod, st: &PodState) -> Result<()> {
    let body = status_body(pod, st);
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .with_context(|| format!("writing the status of pod {name}"))?;
    Ok(())
}

struct WorkerCtx {
    api: Api<KPod>,
    runtime: Arc<PodRuntime>,
    workers: Arc<Mutex<HashMap<PodKey, Worker>>>,
    key: PodKey,
    uid: String,
    probe: Option<(ProbeSpec, u16)>,
    liveness: Option<(ProbeSpec, u16)>,
}

async fn probe_once(pod: &Pod, probe: &ProbeSpec, port: u16) -> bool {
    let addr = SocketAddr::from((pod.ip(), port));
    match pods::http_request(&pod.network.node_netns, "GET", addr, &probe.path, probe.timeout).await {
        Ok(r) => (200..400).contains(&r.status),
        Err(NetError::Timeout) | Err(_) => false,
    }
}

/// Restart the server in place (restartCount + 1); readiness starts over when there is a readiness probe.
async fn restart(pod: &mut Pod, st: &mut PodState, has_readiness: bool, period: Duration) {
    if let Err(e) = pod.start_server().await {
        tracing::warn!("pod {}: restart failed (next try in {period:?}): {e:#}", pod.name);
    }
    st.successes = 0;
    st.failures = 0;
    if has_readiness && st.ready {
        st.set_ready(false);
    }
    st.status_written = false;
}

/// One pod's life: probe, watch for deletion, terminate, finalize.
async fn pod_task(ctx: WorkerCtx, mut pod: Pod, mut st: PodState, mut stop: oneshot::Receiver<Stop>) {
    let name = ctx.key.1.clone();
    let mut watch = watcher::watch_object(ctx.api.clone(), &name).boxed();
    let period = ctx
        .probe
        .as_ref()
        .map(|(p, _)| p.period)
        .unwrap_or(Duration::from_secs(1));
    let first = Instant::now() + ctx.probe.as_ref().map(|(p, _)| p.initial_delay).unwrap_or_default();
    let mut ticker = tokio::time::interval_at(first, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (live_period, live_first) = match &ctx.liveness {
        Some((p, _)) => (p.period, Instant::now() + p.initial_delay),
        None => (Duration::from_secs(3600), Instant::now() + Duration::from_secs(3600)),
    };
    let mut live_ticker = tokio::time::interval_at(live_first, live_period);
    live_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut live_failures = 0u32;
    let mut deadline: Option<Instant> = None;
    let mut remove_object = false;
    let mut watch_ok = true;
    loop {
        let term_sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            s = &mut stop => {
                // A dropped sender (kubelet gone) means the same as an explicit stop.
                let (Ok(Stop::Remove) | Err(_)) = s;
                remove_object = true;
                break;
            }
            _ = term_sleep => {
                tracing::debug!("pod {name}: grace period over");
                remove_object = true;
                break;
            }
            _ = ticker.tick() => {
                if !pod.running() {
                    if deadline.is_some() {
                        tracing::debug!("pod {name}: server exited during termination");
                        remove_object = true;
                        break;
                    }
                    tracing::warn!("pod {name}: server exited; restarting it");
                    restart(&mut pod, &mut st, ctx.probe.is_some(), period).await;
                    live_failures = 0;
                } else if let Some((probe, port)) = &ctx.probe {
                    let ok = probe_once(&pod, probe, *port).await;
                    if st.observe(ok, probe) {
                        tracing::debug!("pod {name}: Ready -> {}", st.ready);
                        st.status_written = false;
                    }
                }
                // A failed write is retried on the next tick, so the API catches up with what the probe saw.
                if !st.status_written {
                    match write_status(&ctx.api, &name, &pod, &st).await {
                        Ok(()) => st.status_written = true,
                        Err(e) => tracing::warn!("{e:#} (retrying in {period:?})"),
                    }
                }
            }
            _ = live_ticker.tick(), if ctx.liveness.is_some() && deadline.is_none() => {
                let Some((probe, port)) = &ctx.liveness else { continue };
                if !pod.running() {
                    continue; // the readiness tick restarts it
                }
                if probe_once(&pod, probe, *port).await {
                    live_failures = 0;
                    continue;
                }
                live_failures += 1;
                if live_failures >= probe.failure_threshold {
                    tracing::info!("pod {name}: liveness failed {live_failures} times; restarting the server");
                    live_failures = 0;
                    restart(&mut pod, &mut st, ctx.probe.is_some(), period).await;
                    match write_status(&ctx.api, &name, &pod, &st).await {
                        Ok(()) => st.status_written = true,
                        Err(e) => tracing::warn!("{e:#} (retrying in {period:?})"),
                    }
                }
            }
            ev = watch.next(), if watch_ok => {
                match ev {
                    Some(Ok(Some(obj))) => {
                        if obj.metadata.uid.as_deref() != Some(ctx.uid.as_str()) {
                            tracing::debug!("pod {name}: replaced by another object; stopping");
                            break;
                        }
                        if deadline.is_none() && obj.metadata.deletion_timestamp.is_some() {
                            let grace = obj.metadata.deletion_grace_period_seconds.unwrap_or(0).max(0);
                            let grace = Duration::from_secs(u64::try_from(grace).unwrap_or(0));
                            tracing::debug!("pod {name}: terminating, grace {grace:?}");
                            pod.sigterm();
                            deadline = Some(Instant::now() + grace);
                        }
                    }
                    Some(Ok(None)) => {
                        tracing::debug!("pod {name}: object deleted");
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::debug!("pod {name}: watch error: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    None => {
                        tracing::warn!("pod {name}: watch ended");
                        watch_ok = false;
                    }
                }
            }
        }
    }
    // Finalize: stop the server, remove the namespace, free the IP, report a terminal status, delete.
    let pod_netns = pod.netns().to_string();
    let (node, ip) = (pod.node.clone(), pod.ip());
    st.terminated = true;
    pod.stop(Duration::ZERO).await;
    drop(pod);
    ctx.runtime.release_ip(&node, ip);
    if remove_object {
        let body = json!({"status": {
            "phase": "Succeeded",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": st.started_at},
                {"type": "Initialized", "status": "True", "lastTransitionTime": st.started_at},
                {"type": "ContainersReady", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now()},
                {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now()},
            ],
        }});
        if let Err(e) = ctx
            .api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            tracing::debug!("pod {name}: terminal status not written: {e}");
        }
        if let Err(e) = delete_now(&ctx.api, &name, &ctx.uid).await {
            tracing::warn!("{e:#}");
        }
    }
    tracing::debug!("pod {name}: gone ({pod_netns} removed)");
    let mut w = ctx.workers.lock().unwrap_or_else(|p| p.into_inner());
    if w.get(&ctx.key).is_some_and(|w| w.info.uid == ctx.uid) {
        w.remove(&ctx.key);
    }
}

/// One endpoint of an EndpointSlice, flattened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub slice: String,
    /// `targetRef.name` (the pod).
    pub pod: Option<String>,
    pub addresses: Vec<String>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// The slice's ports: (name, port, protocol); a port the controller could not resolve has port 0.
    pub ports: Vec<(String, u16, String)>,
}

/// Every endpoint of the EndpointSlices of Service `namespace/service` (label `kubernetes.io/service-name`).
pub async fn service_endpoints(client: &Client, namespace: &str, service: &str) -> Result<Vec<EndpointInfo>> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let slices = api
        .list(&lp)
        .await
        .with_context(|| format!("listing EndpointSlices of {namespace}/{service}"))?;
    let mut out = Vec::new();
    for s in slices {
        let slice = s.metadata.name.clone().unwrap_or_default();
        let ports: Vec<(String, u16, String)> = s
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                (
                    p.name.unwrap_or_default(),
                    p.port.and_then(|n| u16::try_from(n).ok()).unwrap_or(0),
                    p.protocol.unwrap_or_default(),
                )
            })
            .collect();
        for e in s.endpoints.unwrap_or_default() {
            let c = e.conditions.unwrap_or_default();
            out.push(EndpointInfo {
                slice: slice.clone(),
                pod: e.target_ref.and_then(|r| r.name),
                addresses: e.addresses,
                ready: c.ready,
                serving: c.serving,
                terminating: c.terminating,
                node: e.node_name,
                zone: e.zone,
                ports: ports.clone(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_state_follows_thresholds() {
        let probe = ProbeSpec {
            failure_threshold: 3,
            success_threshold: 2,
            ..ProbeSpec::default()
        };
        let mut st = PodState::new(false);
        assert!(!st.observe(true, &probe));
        assert!(st.observe(true, &probe), "ready after 2 successes");
        assert!(st.ready);
        assert!(!st.observe(false, &probe));
        assert!(!st.observe(false, &probe));
        assert!(!st.observe(true, &probe), "a success resets the failure count");
        assert!(!st.observe(false, &probe));
        assert!(!st.observe(false, &probe));
        assert!(st.observe(false, &probe), "not ready after 3 failures in a row");
        assert!(!st.ready);
    }

    #[test]
    fn spec_validation() {
        let ok = DeploymentSpec::new("alpaca-prod", 3);
        let cfg = ok.server_config().unwrap();
        assert_eq!(cfg.http_ports, vec![8080]);
        assert_eq!(cfg.tcp_sink_port, Some(9001));
        assert!(DeploymentSpec::new("Bad_Name", 1).server_config().is_err());
        let dup = DeploymentSpec::new("x", 1).ports(vec![PortSpec::http("a", 80), PortSpec::http("b", 80)]);
        assert!(dup.server_config().is_err());
        let dup_name = DeploymentSpec::new("x", 1).ports(vec![PortSpec::http("web", 80), PortSpec::http("web", 81)]);
        assert!(dup_name.server_config().is_err());
        let long_name = DeploymentSpec::new("x", 1).ports(vec![PortSpec::http("a-very-long-port-name", 80)]);
        assert!(long_name.server_config().is_err());
        let no_http = DeploymentSpec::new("x", 1).ports(vec![PortSpec::udp("u", 53)]);
        assert!(no_http.server_config().is_err(), "probe needs an HTTP port");
        assert!(no_http.clone().readiness(None).server_config().is_ok());
        let live = DeploymentSpec::new("x", 1).liveness(Some(ProbeSpec::healthy(Duration::from_secs(1))));
        assert!(live.server_config().is_ok());
        let bad_live = DeploymentSpec::new("x", 1).liveness(Some(ProbeSpec {
            success_threshold: 2,
            ..ProbeSpec::healthy(Duration::from_secs(1))
        }));
        assert!(bad_live.server_config().is_err(), "liveness successThreshold must be 1");
        let two_echo = DeploymentSpec::new("x", 1)
            .readiness(None)
            .ports(vec![PortSpec::tcp_echo("a", 1), PortSpec::tcp_echo("b", 2)]);
        assert!(two_echo.server_config().is_err());
    }

    #[test]
    fn pod_objects_carry_spec() {
        let spec = DeploymentSpec::new("alpaca-prod", 1)
            .labels(&[("app", "alpaca"), ("env", "prod")])
            .readiness(Some(ProbeSpec::with_period(Duration::from_millis(300))));
        let p = pod_object(&spec, "alpaca-prod-abcde", "node-b").unwrap();
        let s = p.spec.unwrap();
        assert_eq!(s.node_name.as_deref(), Some("node-b"));
        let c = &s.containers[0];
        let rp = c.readiness_probe.as_ref().unwrap();
        assert_eq!(rp.period_seconds, Some(1), "sub-second periods are written as 1");
        assert_eq!(rp.failure_threshold, Some(3));
        let ports = c.ports.as_ref().unwrap();
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));
        assert_eq!(p.metadata.labels.unwrap()["env"], "prod");
    }
}
