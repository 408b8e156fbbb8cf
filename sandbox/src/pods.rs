//! Pods without Kubernetes: a network namespace joined to its node, an IP from the node's pod CIDR, and the
//! `orca-testpod` server running inside; plus clients that talk from inside any namespace.
//!
//! # Pod network (Calico-style, no bridge, no address on the host side)
//!
//! ```text
//!   node netns (orca-node-a)                         pod netns (orca-pod-<name>)
//!   veth<11 hex> ── mac ee:ee:ee:ee:ee:ee ─────────── eth0  10.244.1.N/32
//!   route 10.244.1.N/32 dev veth<..> scope link      route 169.254.1.1 dev eth0 scope link
//!   proxy_arp=1 on veth<..>                          default via 169.254.1.1 dev eth0
//!                                                    neigh 169.254.1.1 lladdr ee:ee:ee:ee:ee:ee permanent
//! ```
//!
//! The pod's only next hop is the link-local 169.254.1.1, resolved by a permanent neighbour entry to the host
//! side's fixed MAC (so nothing depends on proxy ARP answering for an address the node has no route to; proxy_arp
//! is on anyway, as in Calico). The node reaches the pod by its /32 route; the node's own routes (set up by
//! [`crate::topology`]) carry traffic to the other node's pod CIDR. Pod IPs are allocated per node from `.2`
//! upwards (lowest free first) and freed when the pod is removed.
//!
//! Host-network pods ([`Pod::start_host_network`]) get no namespace, veth or IP of their own: their server runs
//! in the node's namespace and answers on the node's IP.
//!
//! Pod namespaces are named `orca-pod-<name>` for pods of the `default` Kubernetes namespace and
//! `orca-pod-<namespace>_<name>` otherwise (`_` cannot occur in Kubernetes names, so names never collide).
//!
//! # Clients
//!
//! [`http_request`], [`whoami`], [`udp_exchange`], [`tcp_connect`] open their socket inside a given network
//! namespace (a short-lived thread enters it with setns(2) and creates the socket; the socket keeps that
//! namespace for its life) and then run on the caller's tokio runtime. Errors are classified ([`NetError`]):
//! refused versus timed out versus reset, which Service scenarios assert on. For a real process in a namespace,
//! [`exec_in`] / the `orca-testpod get|post|udp|tcp-echo|tcp-sink` client ([`testpod_client`]).
use crate::netns;
use crate::topology::{Ipv4Cidr, Topology};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The fixed MAC of every host-side pod veth (what the pod's 169.254.1.1 neighbour entry points at).
pub const HOST_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The pod's gateway: link-local, never assigned to any interface.
pub const POD_GATEWAY: &str = "169.254.1.1";
/// The pod's IPv6 gateway: a link-local address with a permanent neighbour entry to [`HOST_VETH_MAC`].
pub const POD_GATEWAY_V6: &str = "fe80::1";
/// Interface name inside the pod.
pub const POD_IFACE: &str = "eth0";

/// Default ports of `orca-testpod serve`.
pub const DEFAULT_HTTP_PORT: u16 = 8080;
pub const DEFAULT_UDP_PORT: u16 = 8081;
pub const DEFAULT_TCP_ECHO_PORT: u16 = 9000;
pub const DEFAULT_TCP_SINK_PORT: u16 = 9001;

/// The network namespace of pod `name` in Kubernetes namespace `namespace`.
pub fn pod_netns_name(namespace: &str, name: &str) -> String {
    if namespace == "default" || namespace.is_empty() {
        format!("{}pod-{name}", netns::PREFIX)
    } else {
        format!("{}pod-{namespace}_{name}", netns::PREFIX)
    }
}

/// The host-side veth of a pod namespace: `veth` + 11 hex digits of a hash of the namespace name (15 bytes, the
/// kernel's limit).
pub fn host_veth_name(pod_netns: &str) -> String {
    // FNV-1a, 64 bit: stable across runs and Rust versions.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in pod_netns.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("veth{:011x}", h & 0xfff_ffff_ffff)
}

/// Where `orca-testpod` is: `$ORCA_TESTPOD_BIN` when set; else the first binary newer than its source
/// (`sandbox/src/bin/orca-testpod.rs`, which uses nothing else of this crate) among: next to the running
/// executable, its parent (test binaries live in `target/<profile>/deps`), `<repo>/target/{debug,release}`;
/// else what `cargo build -p orca-sandbox --bin orca-testpod` reports; else, when cargo fails, any binary found
/// (with a warning).
pub fn testpod_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("ORCA_TESTPOD_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("ORCA_TESTPOD_BIN={} is not a file", p.display());
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("orca-testpod"));
            if let Some(up) = dir.parent() {
                candidates.push(up.join("orca-testpod"));
            }
        }
    }
    let target = crate::repo_root().join("target");
    candidates.push(target.join("debug").join("orca-testpod"));
    candidates.push(target.join("release").join("orca-testpod"));
    candidates.retain(|p| p.is_file());
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let source = crate::repo_root().join("sandbox/src/bin/orca-testpod.rs");
    if let Some(src_time) = mtime(&source) {
        if let Some(p) = candidates.iter().find(|p| mtime(p).is_some_and(|t| t >= src_time)) {
            return Ok(p.clone());
        }
    }
    match build_testpod() {
        Ok(p) => Ok(p),
        Err(e) => match candidates.into_iter().next() {
            Some(p) => {
                tracing::warn!(
                    "could not build orca-testpod ({e:#}); using {}, which may be stale",
                    p.display()
                );
                Ok(p)
            }
            None => Err(e.context("no orca-testpod binary found and building it failed")),
        },
    }
}

/// `cargo build -p orca-sandbox --bin orca-testpod`, returning the `executable` cargo reports.
fn build_testpod() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = netns::run(std::process::Command::new(cargo).current_dir(crate::repo_root()).args([
        "build",
        "-p",
        "orca-sandbox",
        "--bin",
        "orca-testpod",
        "--message-format=json-render-diagnostics",
    ]))
    .context("building orca-testpod")?;
    executable_from_cargo_json(&String::from_utf8_lossy(&out.stdout))
        .context("cargo did not report an orca-testpod executable")
}

/// The `executable` of the `orca-testpod` compiler-artifact message in cargo's JSON output.
fn executable_from_cargo_json(text: &str) -> Option<PathBuf> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "orca-testpod")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
}

/// What SIGTERM does to the test server (see `orca-testpod --on-sigterm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnSigterm {
    /// Start failing `/ready`, keep serving until killed (a draining application). The default.
    #[default]
    FailReady,
    /// Keep `/ready` as it is and keep serving (an application with a long preStop; terminating endpoints stay
    /// serving).
    KeepReady,
    /// Exit at once.
    Exit,
}

impl OnSigterm {
    fn flag(self) -> &'static str {
        match self {
            OnSigterm::FailReady => "fail-ready",
            OnSigterm::KeepReady => "keep-ready",
            OnSigterm::Exit => "exit",
        }
    }
}

/// What the test server inside a pod listens on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    pub http_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
    /// `None`: no TCP echo.
    pub tcp_echo_port: Option<u16>,
    /// `None`: no TCP sink.
    pub tcp_sink_port: Option<u16>,
    /// Start with `/ready` failing.
    pub start_not_ready: bool,
    pub on_sigterm: OnSigterm,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http_ports: vec![DEFAULT_HTTP_PORT],
            udp_ports: vec![DEFAULT_UDP_PORT],
            tcp_echo_port: Some(DEFAULT_TCP_ECHO_PORT),
            tcp_sink_port: Some(DEFAULT_TCP_SINK_PORT),
            start_not_ready: false,
            on_sigterm: OnSigterm::FailReady,
        }
    }
}

impl ServerConfig {
    /// The port used to see that the server is up: the first HTTP port, else echo, else sink.
    fn check_port(&self) -> Option<u16> {
        self.http_ports
            .first()
            .copied()
            .or(self.tcp_echo_port)
            .or(self.tcp_sink_port)
    }

    fn args(&self, name: &str, namespace: &str, ip: Ipv4Addr, node: &str) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "serve".into(),
            "--name".into(),
            name.into(),
            "--namespace".into(),
            namespace.into(),
            "--pod-ip".into(),
            ip.to_string(),
            "--node".into(),
            node.into(),
            "--on-sigterm".into(),
            self.on_sigterm.flag().into(),
        ];
        for p in &self.http_ports {
            a.extend(["--http-port".into(), p.to_string()]);
        }
        if self.udp_ports.is_empty() {
            a.extend(["--udp-port".into(), "0".into()]);
        }
        for p in &self.udp_ports {
            a.extend(["--udp-port".into(), p.to_string()]);
        }
        a.extend(["--tcp-echo-port".into(), self.tcp_echo_port.unwrap_or(0).to_string()]);
        a.extend(["--tcp-sink-port".into(), self.tcp_sink_port.unwrap_or(0).to_string()]);
        if self.start_not_ready {
            a.push("--not-ready".into());
        }
        a
    }
}

/// A node as far as pods care: its name, namespace and pod CIDR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNode {
    pub name: String,
    pub netns: String,
    pub pod_cidr: Ipv4Cidr,
    /// The node's own address (the Pod's hostIP).
    pub ip: Ipv4Addr,
}

impl PodNode {
    /// The nodes of a sandbox topology.
    pub fn from_topology(t: &Topology) -> Vec<PodNode> {
        t.nodes
            .iter()
            .map(|n| PodNode {
                name: n.name.clone(),
                netns: n.netns.clone(),
                pod_cidr: n.pod_cidr,
                ip: n.ip,
            })
            .collect()
    }
}

/// Per-node pod IP allocation: `.2`, `.3`, ... lowest free first.
#[derive(Debug, Default)]
pub struct IpAllocator {
    used: HashMap<String, BTreeSet<Ipv4Addr>>,
}

impl IpAllocator {
    pub fn allocate(&mut self, node: &PodNode) -> Result<Ipv4Addr> {
        let used = self.used.entry(node.name.clone()).or_default();
        let mut n = 2;
        while let Some(ip) = node.pod_cidr.host(n) {
            if !used.contains(&ip) {
                used.insert(ip);
                return Ok(ip);
            }
            n += 1;
        }
        bail!("node {}: pod CIDR {} is exhausted", node.name, node.pod_cidr)
    }

    pub fn free(&mut self, node: &str, ip: Ipv4Addr) {
        if let Some(s) = self.used.get_mut(node) {
            s.remove(&ip);
        }
    }
}

/// The network of one pod: its namespace and veth pair. [`PodNetwork::create`] builds it, [`PodNetwork::remove`]
/// (or `ip netns del`, which also removes the veth pair) tears it down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetwork {
    /// The pod's namespace; the node's for a host-network pod.
    pub netns: String,
    pub node_netns: String,
    /// Empty for a host-network pod.
    pub host_veth: String,
    pub ip: Ipv4Addr,
    /// A `hostNetwork: true` pod: no namespace of its own, the node's IP.
    pub host_network: bool,
}

/// The pod's neighbour entry for its gateway `gw`: the host veth's fixed MAC, permanent.
fn permanent_gateway(pod: &str, gw: &str) -> Result<()> {
    netns::ip(&[
        "-n",
        pod,
        "neigh",
        "replace",
        gw,
        "lladdr",
        HOST_VETH_MAC,
        "dev",
        POD_IFACE,
        "nud",
        "permanent",
    ])?;
    Ok(())
}

impl PodNetwork {
    /// Create namespace `pod_netns` with `ip` on eth0, joined to `node_netns`. On error, whatever was created is
    /// removed again.
    pub fn create(node_netns: &str, pod_netns: &str, ip: Ipv4Addr) -> Result<PodNetwork> {
        if !pod_netns.starts_with(netns::PREFIX) {
            bail!("pod namespace {pod_netns} lacks the {} prefix", netns::PREFIX);
        }
        let net = PodNetwork {
            netns: pod_netns.to_string(),
            node_netns: node_netns.to_string(),
            host_veth: host_veth_name(pod_netns),
            ip,
            host_network: false,
        };
        netns::ip(&["netns", "add", pod_netns]).with_context(|| format!("creating namespace {pod_netns}"))?;
        if let Err(e) = net.wire() {
            net.remove();
            return Err(e.context(format!("wiring pod namespace {pod_netns}")));
        }
        Ok(net)
    }

    /// The network of a host-network pod on `node`: the node's namespace and IP; nothing to create or remove.
    pub fn host(node: &PodNode) -> PodNetwork {
        PodNetwork {
            netns: node.netns.clone(),
            node_netns: node.netns.clone(),
            host_veth: String::new(),
            ip: node.ip,
            host_network: true,
        }
    }

    fn wire(&self) -> Result<()> {
        let (node, pod, veth) = (self.node_netns.as_str(), self.netns.as_str(), self.host_veth.as_str());
        let ip = self.ip.to_string();
        netns::ip(&["-n", pod, "link", "set", "lo", "up"])?;
        // Links moved in take the namespace's defaults: no duplicate address detection, addresses work at once.
        for k in ["all", "default"] {
            netns::exec(pod, &["sysctl", "-qw", &format!("net.ipv6.conf.{k}.accept_dad=0")])?;
        }
        netns::ip(&[
            "-n", node, "link", "add", veth, "type", "veth", "peer", "name", POD_IFACE, "netns", pod,
        ])?;
        netns::ip(&["-n", node, "link", "set", veth, "address", HOST_VETH_MAC])?;
        netns::ip(&["-n", node, "link", "set", veth, "up"])?;
        netns::exec(node, &["sysctl", "-qw", &format!("net.ipv4.conf.{veth}.proxy_arp=1")])?;
        netns::ip(&["-n", pod, "addr", "add", &format!("{ip}/32"), "dev", POD_IFACE])?;
        netns::ip(&["-n", pod, "link", "set", POD_IFACE, "up"])?;
        permanent_gateway(pod, POD_GATEWAY)?;
        netns::ip(&[
            "-n",
            pod,
            "route",
            "add",
            POD_GATEWAY,
            "dev",
            POD_IFACE,
            "scope",
            "link",
        ])?;
        netns::ip(&[
            "-n",
            pod,
            "route",
            "add",
            "default",
            "via",
            POD_GATEWAY,
            "dev",
            POD_IFACE,
        ])?;
        netns::ip(&[
            "-n",
            node,
            "route",
            "replace",
            &format!("{ip}/32"),
            "dev",
            veth,
            "scope",
            "link",
        ])?;
        // IPv6, the same way: the pod's /128, its gateway a permanent neighbour, the node's route to it.
        let ip6 = self.ip6().to_string();
        netns::ip(&[
            "-n",
            pod,
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            POD_IFACE,
            "nodad",
        ])?;
        permanent_gateway(pod, POD_GATEWAY_V6)?;
        netns::ip(&[
            "-n",
            pod,
            "-6",
            "route",
            "add",
            "default",
            "via",
            POD_GATEWAY_V6,
            "dev",
            POD_IFACE,
        ])?;
        netns::ip(&["-n", node, "-6", "route", "replace", &format!("{ip6}/128"), "dev", veth])?;
        Ok(())
    }

    /// The pod's IPv6 address ([`crate::topology::v6`] of its IPv4 one; the node's for a host-network pod).
    pub fn ip6(&self) -> std::net::Ipv6Addr {
        crate::topology::v6(self.ip)
    }

    /// Delete the namespace (the veth pair and the node's /32 route go with it). Best effort: logs failures.
    /// Processes still inside the namespace keep it alive in the kernel; stop them first.
    pub fn remove(&self) {
        if self.host_network {
            return;
        }
        if let Err(e) = netns::ip(&["netns", "del", &self.netns]) {
            tracing::warn!("removing pod namespace {}: {e:#}", self.netns);
        }
        // If the pod namespace lingers (a process still holds it), the host veth would too: delete it directly.
        let _ = netns::ip(&["-n", &self.node_netns, "link", "del", &self.host_veth]);
    }
}

/// A running pod: its network and the test server process.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub network: PodNetwork,
    pub config: ServerConfig,
    child: Option<Child>,
    /// How many times the server was (re)started, minus one.
    pub restarts: u32,
    testpod_bin: PathBuf,
    node_ip: Ipv4Addr,
}

impl Pod {
    /// Create the pod's namespace and start its server; waits until the server accepts connections (from the
    /// node's namespace). On error everything created is removed.
    pub async fn start(
        testpod_bin: &Path,
        node: &PodNode,
        namespace: &str,
        name: &str,
        ip: Ipv4Addr,
        config: ServerConfig,
    ) -> Result<Pod> {
        let pod_netns = pod_netns_name(namespace, name);
        let node_netns = node.netns.clone();
        let pn = pod_netns.clone();
        let network = tokio::task::spawn_blocking(move || PodNetwork::create(&node_netns, &pn, ip)).await??;
        Pod::start_in(testpod_bin, node, namespace, name, network, config).await
    }

    /// Start a host-network pod: its server runs in the node's namespace and answers on the node's IP (ports
    /// must not clash with anything else listening there).
    pub async fn start_host_network(
        testpod_bin: &Path,
        node: &PodNode,
        namespace: &str,
        name: &str,
        config: ServerConfig,
    ) -> Result<Pod> {
        Pod::start_in(testpod_bin, node, namespace, name, PodNetwork::host(node), config).await
    }

    async fn start_in(
        testpod_bin: &Path,
        node: &PodNode,
        namespace: &str,
        name: &str,
        network: PodNetwork,
        config: ServerConfig,
    ) -> Result<Pod> {
        let mut pod = Pod {
            name: name.to_string(),
            namespace: namespace.to_string(),
            node: node.name.clone(),
            network,
            config,
            child: None,
            restarts: 0,
            testpod_bin: testpod_bin.to_path_buf(),
            node_ip: node.ip,
        };
        if let Err(e) = pod.start_server().await {
            pod.stop(Duration::ZERO).await;
            return Err(e);
        }
        pod.restarts = 0;
        Ok(pod)
    }

    /// The pod's IP.
    pub fn ip(&self) -> Ipv4Addr {
        self.network.ip
    }

    /// The pod's IPv6 address (its second podIP).
    pub fn ip6(&self) -> std::net::Ipv6Addr {
        self.network.ip6()
    }

    /// The node's IP (the Pod's hostIP).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.node_ip
    }

    /// The pod's network namespace.
    pub fn netns(&self) -> &str {
        &self.network.netns
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_name(&self) -> String {
        format!("pod-{}-{}", self.namespace, self.name)
    }

    /// (Re)start the server process and wait until it listens.
    pub async fn start_server(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c, Duration::ZERO).await;
        }
        let args = self.config.args(&self.name, &self.namespace, self.ip(), &self.node);
        let bin = self
            .testpod_bin
            .to_str()
            .with_context(|| format!("{} is not UTF-8", self.testpod_bin.display()))?
            .to_string();
        let mut argv: Vec<&str> = vec![&bin];
        argv.extend(args.iter().map(String::as_str));
        let child = netns::spawn(self.netns(), &argv, &self.log_name())?;
        self.child = Some(child);
        self.restarts += 1;
        let Some(port) = self.config.check_port() else {
            // UDP only: nothing to connect to; give it a moment to bind.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return self.check_running();
        };
        let addr = SocketAddr::from((self.ip(), port));
        let deadline = Instant::now() + Duration::from_secs(15);
        // With an HTTP port, the answer must come from this server (a host-network pod's port could be held by
        // another process); otherwise accepting connections is enough.
        let http = !self.config.http_ports.is_empty();
        loop {
            self.check_running()?;
            let up = if http {
                match whoami(&self.network.node_netns, addr, Duration::from_secs(1)).await {
                    Ok(w) if w.pod == self.name && w.namespace == self.namespace => Ok(()),
                    Ok(w) => Err(NetError::Other(format!(
                        "{addr} is answered by pod {}/{}",
                        w.namespace, w.pod
                    ))),
                    Err(e) => Err(e),
                }
            } else {
                tcp_connect(&self.network.node_netns, addr, Duration::from_secs(1))
                    .await
                    .map(|_| ())
            };
            match up {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "pod {}: server not reachable at {addr} from {} after 15s: {e}",
                        self.name,
                        self.network.node_netns
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Fail if the server process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.as_mut() {
            None => bail!("pod {}: server not started", self.name),
            Some(c) => match c.try_wait()? {
                Some(status) => bail!(
                    "pod {}: server exited ({status}); see {}",
                    self.name,
                    netns::log_dir().join(format!("{}.log", self.log_name())).display()
                ),
                None => Ok(()),
            },
        }
    }

    /// Whether the server process is still running.
    pub fn running(&mut self) -> bool {
        self.check_running().is_ok()
    }

    /// Send SIGTERM to the server (what a kubelet does at the start of a graceful delete).
    pub fn sigterm(&self) {
        if let Some(pid) = self.pid().and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: kill(2) on our own child, which we have not reaped yet (so the pid is not recycled).
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }

    /// Stop the server (SIGTERM, then SIGKILL after `grace`) and remove the namespace.
    pub async fn stop(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c, grace).await;
        }
        let net = self.network.clone();
        let _ = tokio::task::spawn_blocking(move || net.remove()).await;
    }

    /// Run a command inside the pod's namespace.
    pub fn exec(&self, cmd: &[&str]) -> Result<Output> {
        netns::exec(self.netns(), cmd)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.network.remove();
        }
    }
}

/// SIGTERM, wait up to `grace`, SIGKILL, reap.
async fn kill_child(c: &mut Child, grace: Duration) {
    if let Ok(pid) = libc::pid_t::try_from(c.id()) {
        if !grace.is_zero() && matches!(c.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// The pods of a set of nodes: IP allocation and start/stop. Shared by the kubelet role and by tests that need
/// pods without Kubernetes objects.
pub struct PodRuntime {
    nodes: Vec<PodNode>,
    testpod_bin: PathBuf,
    ips: Mutex<IpAllocator>,
}

impl PodRuntime {
    pub fn new(nodes: Vec<PodNode>, testpod_bin: PathBuf) -> PodRuntime {
        PodRuntime {
            nodes,
            testpod_bin,
            ips: Mutex::new(IpAllocator::default()),
        }
    }

    pub fn nodes(&self) -> &[PodNode] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> Option<&PodNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Start pod `namespace/name` on `node` with a fresh IP.
    pub async fn start(&self, node: &str, namespace: &str, name: &str, config: ServerConfig) -> Result<Pod> {
        let node = self.node(node).with_context(|| format!("no node {node:?}"))?.clone();
        let ip = self
            .ips
            .lock()
            .map_err(|_| anyhow!("IP allocator poisoned"))?
            .allocate(&node)?;
        match Pod::start(&self.testpod_bin, &node, namespace, name, ip, config).await {
            Ok(p) => Ok(p),
            Err(e) => {
                self.release_ip(&node.name, ip);
                Err(e)
            }
        }
    }

    /// Start host-network pod `namespace/name` on `node` (no IP allocated: it has the node's).
    pub async fn start_host_network(
        &self,
        node: &str,
        namespace: &str,
        name: &str,
        config: ServerConfig,
    ) -> Result<Pod> {
        let node = self.node(node).with_context(|| format!("no node {node:?}"))?.clone();
        Pod::start_host_network(&self.testpod_bin, &node, namespace, name, config).await
    }

    /// Stop a pod and free its IP.
    pub async fn stop(&self, mut pod: Pod, grace: Duration) {
        pod.stop(grace).await;
        self.release_ip(&pod.node, pod.ip());
    }

    /// Return a pod IP to the node's pool (after the pod's namespace was removed).
    pub fn release_ip(&self, node: &str, ip: Ipv4Addr) {
        // A host-network pod's IP (the node's) is outside the pod CIDR and never in the pool: freeing it is a
        // no-op.
        if let Ok(mut a) = self.ips.lock() {
            a.free(node, ip);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Clients inside namespaces

/// Why a request failed, as a user would tell: refused, timed out, reset, or something else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetError {
    Refused,
    Timeout,
    Reset,
    Other(String),
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::Refused => write!(f, "connection refused"),
            NetError::Timeout => write!(f, "timed out"),
            NetError::Reset => write!(f, "connection reset"),
            NetError::Other(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for NetError {}

impl NetError {
    pub fn io(e: std::io::Error) -> NetError {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => NetError::Refused,
            TimedOut | WouldBlock => NetError::Timeout,
            ConnectionReset | ConnectionAborted | BrokenPipe => NetError::Reset,
            _ => match e.raw_os_error() {
                Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => NetError::Other(format!("unreachable: {e}")),
                _ => NetError::Other(e.to_string()),
            },
        }
    }
}

/// Run `f` on a fresh thread that entered network namespace `ns` (only that thread changes namespace).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let path = PathBuf::from("/run/netns").join(ns);
    let file = std::fs::File::open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            // SAFETY: setns on a descriptor we own; it changes only this thread's network namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        })?
        .join()
        .map_err(|_| std::io::Error::other("netns thread panicked"))?
}

/// A TCP socket created inside `ns`, optionally bound to `local` (e.g. a fixed source port).
fn tcp_socket_in(ns: &str, local: Option<SocketAddr>, to: SocketAddr) -> Result<tokio::net::TcpSocket, NetError> {
    let std_sock = in_netns(ns, move || {
        let s = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        if let Some(l) = local {
            s.set_reuse_address(true)?;
            s.bind(&l.into())?;
        }
        Ok(std::net::TcpStream::from(s))
    })
    .map_err(|e| NetError::Other(format!("creating a socket in {ns}: {e}")))?;
    Ok(tokio::net::TcpSocket::from_std_stream(std_sock))
}

/// Connect to `addr` from inside `ns` within `timeout`.
pub async fn tcp_connect(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<tokio::net::TcpStream, NetError> {
    tcp_connect_from(ns, None, addr, timeout).await
}

/// Connect to `addr` from inside `ns`, from local address `local` when given.
pub async fn tcp_connect_from(
    ns: &str,
    local: Option<SocketAddr>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, NetError> {
    let sock = tcp_socket_in(ns, local, addr)?;
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Err(_) => Err(NetError::Timeout),
        Ok(Err(e)) => Err(NetError::io(e)),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// An HTTP response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request (`Connection: close`) from inside `ns`; the whole exchange must finish within `timeout`.
pub async fn http_request(
    ns: &str,
    method: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpReply, NetError> {
    let t0 = Instant::now();
    let mut s = tcp_connect(ns, addr, timeout).await?;
    let left = timeout.saturating_sub(t0.elapsed());
    let exchange = async {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(NetError::io)?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(NetError::io)?;
        parse_http_reply(&buf)
    };
    match tokio::time::timeout(left, exchange).await {
        Err(_) => Err(NetError::Timeout),
        Ok(r) => r,
    }
}

fn parse_http_reply(buf: &[u8]) -> Result<HttpReply, NetError> {
    let text = String::from_utf8_lossy(buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        if buf.is_empty() {
            return Err(NetError::Other("empty response (connection closed)".into()));
        }
        return Err(NetError::Other(format!("malformed HTTP response {text:?}")));
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| NetError::Other(format!("malformed status line in {head:?}")))?;
    Ok(HttpReply {
        status,
        body: body.to_string(),
    })
}

/// What `GET /` of the test server says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoAmI {
    pub pod: String,
    pub namespace: String,
    pub pod_ip: String,
    pub node: String,
    /// The client address the server saw (`ip:port`).
    pub client: SocketAddr,
    /// The local port that answered.
    pub server_port: u16,
}

impl WhoAmI {
    pub fn parse(body: &str) -> Result<WhoAmI> {
        let v: serde_json::Value = serde_json::from_str(body.trim()).with_context(|| format!("not JSON: {body:?}"))?;
        let s = |k: &str| -> Result<String> {
            v.get(k)
                .and_then(|x| x.as_str())
                .map(str::to_string)
                .with_context(|| format!("no string {k:?} in {body:?}"))
        };
        Ok(WhoAmI {
            pod: s("pod")?,
            namespace: s("namespace").unwrap_or_default(),
            pod_ip: s("podIP")?,
            node: s("node")?,
            client: s("client")?
                .parse()
                .with_context(|| format!("bad client address in {body:?}"))?,
            server_port: v
                .get("serverPort")
                .and_then(|x| x.as_u64())
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(0),
        })
    }
}

/// `GET /` on a test server (directly or through a Service) from inside `ns`. From a node's namespace the request
/// is a host process's ([`host_whoami`]).
pub async fn whoami(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<WhoAmI, NetError> {
    if crate::hostfs::node_of_netns(ns).is_some() {
        return host_whoami(ns, addr, timeout).await;
    }
    let r = http_request(ns, "GET", addr, "/", timeout).await?;
    if r.status != 200 {
        return Err(NetError::Other(format!("HTTP {}: {}", r.status, r.body)));
    }
    WhoAmI::parse(&r.body).map_err(|e| NetError::Other(format!("{e:#}")))
}

/// `GET /` from a process of the node whose namespace is `node_ns`: `orca-testpod get` started there, in the
/// node's cgroup, as host-network clients (kubelet probes, node agents, hostNetwork pods) run. The agent's socket
/// hooks see such a process; an in-process request from a thread of the test would not be in the node's cgroup.
pub async fn host_whoami(node_ns: &str, addr: SocketAddr, timeout: Duration) -> Result<WhoAmI, NetError> {
    let bin = testpod_binary().map_err(|e| NetError::Other(format!("{e:#}")))?;
    let bin = bin.to_string_lossy().into_owned();
    let url = format!("http://{addr}/");
    let secs = format!("{:.3}", timeout.as_secs_f64());
    let mut cmd = netns::command_in(node_ns, &bin, &["get", &url, "--timeout", &secs]);
    let mut cmd = tokio::process::Command::from(std::mem::replace(&mut cmd, std::process::Command::new("true")));
    let out = tokio::time::timeout(timeout + Duration::from_secs(5), cmd.kill_on_drop(true).output())
        .await
        .map_err(|_| NetError::Other(format!("orca-testpod get {url} in {node_ns} did not exit")))?
        .map_err(|e| NetError::Other(format!("starting orca-testpod in {node_ns}: {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match out.status.code() {
        Some(0) => {}
        Some(2) => return Err(NetError::Refused),
        Some(3) => return Err(NetError::Timeout),
        Some(4) => return Err(NetError::Reset),
        _ => {
            return Err(NetError::Other(format!(
                "orca-testpod get {url} ({}): {stderr}",
                out.status
            )))
        }
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (code, body) = text.split_once('\n').unwrap_or((&text, ""));
    if code.trim() != "200" {
        return Err(NetError::Other(format!("HTTP {}: {body}", code.trim())));
    }
    WhoAmI::parse(body).map_err(|e| NetError::Other(format!("{e:#}")))
}

/// The UDP echo's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpReply {
    pub pod: String,
    pub pod_ip: String,
    pub node: String,
    pub client: SocketAddr,
    pub payload: String,
}

/// Send `payload` to the UDP echo at `addr` from inside `ns` (from `local` when given, e.g. a fixed source port
/// to test conntrack) and wait for one reply. An ICMP port unreachable is [`NetError::Refused`].
pub async fn udp_exchange(
    ns: &str,
    local: Option<SocketAddr>,
    addr: SocketAddr,
    payload: &str,
    timeout: Duration,
) -> Result<UdpReply, NetError> {
    let bind = local.unwrap_or_else(|| match addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    });
    let std_sock = in_netns(ns, move || {
        let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&bind.into())?;
        s.set_nonblocking(true)?;
        Ok(std::net::UdpSocket::from(s))
    })
    .map_err(|e| NetError::Other(format!("creating a UDP socket in {ns}: {e}")))?;
    let sock = tokio::net::UdpSocket::from_std(std_sock).map_err(NetError::io)?;
    sock.connect(addr).await.map_err(NetError::io)?;
    let exchange = async {
        sock.send(payload.as_bytes()).await.map_err(NetError::io)?;
        let mut buf = vec![0u8; 65536];
        let n = sock.recv(&mut buf).await.map_err(NetError::io)?;
        Ok::<_, NetError>(String::from_utf8_lossy(&buf[..n]).to_string())
    };
    let text = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => return Err(NetError::Timeout),
        Ok(r) => r?,
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|_| NetError::Other(format!("UDP reply is not JSON: {text:?}")))?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    Ok(UdpReply {
        pod: s("pod"),
        pod_ip: s("podIP"),
        node: s("node"),
        client: s("client")
            .parse()
            .map_err(|_| NetError::Other(format!("bad client address in {text:?}")))?,
        payload: s("payload"),
    })
}

/// What `n` requests to one address returned: answers per pod, and failures by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spread {
    /// Pod name -> number of answers.
    pub per_pod: std::collections::BTreeMap<String, usize>,
    /// Failure (as text: "connection refused", "timed out", ...) -> count.
    pub failures: std::collections::BTreeMap<String, usize>,
    /// Every distinct client address the servers reported seeing.
    pub client_ips: BTreeSet<std::net::IpAddr>,
}

impl Spread {
    pub fn answered(&self) -> usize {
        self.per_pod.values().sum()
    }
    pub fn failed(&self) -> usize {
        self.failures.values().sum()
    }
}

/// `requests` sequential `GET /` to `addr` from inside `ns` (new connection each, so a load balancer picks again
/// every time), each within `timeout`: which pods answered how often. Bounded by `requests * timeout`.
pub async fn spread(ns: &str, addr: SocketAddr, requests: usize, timeout: Duration) -> Spread {
    let mut s = Spread::default();
    for _ in 0..requests {
        match whoami(ns, addr, timeout).await {
            Ok(w) => {
                *s.per_pod.entry(w.pod).or_default() += 1;
                s.client_ips.insert(w.client.ip());
            }
            Err(e) => *s.failures.entry(e.to_string()).or_default() += 1,
        }
    }
    s
}

/// Run a command inside any namespace (a node, the client, a pod): `ip netns exec <ns> ...`.
pub fn exec_in(ns: &str, cmd: &[&str]) -> Result<Output> {
    netns::exec(ns, cmd)
}

/// Outcome of an `orca-testpod` client process, by its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOutcome {
    /// Exit 0 and what it printed.
    Ok(String),
    Failed(NetError),
}

/// Run the `orca-testpod` client (`get URL`, `post URL`, `udp IP:PORT [PAYLOAD]`, `tcp-echo ...`,
/// `tcp-sink IP:PORT --bytes N`) as a process inside `ns`: a host-network client when `ns` is a node.
pub async fn testpod_client(testpod_bin: &Path, ns: &str, args: &[&str]) -> Result<ClientOutcome> {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(testpod_bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running orca-testpod {args:?} in {ns}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Ok(match out.status.code() {
        Some(0) => ClientOutcome::Ok(String::from_utf8_lossy(&out.stdout).to_string()),
        Some(2) => ClientOutcome::Failed(NetError::Refused),
        Some(3) => ClientOutcome::Failed(NetError::Timeout),
        Some(4) => ClientOutcome::Failed(NetError::Reset),
        _ => ClientOutcome::Failed(NetError::Other(format!("{}: {stderr}", out.status))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(pod_netns_name("default", "web-1"), "orca-pod-web-1");
        assert_eq!(pod_netns_name("team", "web-1"), "orca-pod-team_web-1");
        let v = host_veth_name("orca-pod-web-1");
        assert_eq!(v.len(), 15);
        assert!(v.starts_with("veth"));
        assert_eq!(v, host_veth_name("orca-pod-web-1"));
        assert_ne!(v, host_veth_name("orca-pod-web-2"));
    }

    #[test]
    fn cargo_json_executable() {
        let text = concat!(
            "{\"reason\":\"compiler-artifact\",\"target\":{\"name\":\"orca_sandbox\"},\"executable\":null}\n",
            "not json\n",
            "{\"reason\":\"compiler-artifact\",\"target\":{\"name\":\"orca-testpod\"},",
            "\"executable\":\"/t/debug/orca-testpod\"}\n",
            "{\"reason\":\"build-finished\",\"success\":true}\n",
        );
        assert_eq!(
            executable_from_cargo_json(text),
            Some(PathBuf::from("/t/debug/orca-testpod"))
        );
        assert_eq!(executable_from_cargo_json("{\"reason\":\"build-finished\"}"), None);
    }

    #[test]
    fn ip_allocation_is_lowest_free_per_node() {
        let node = |name: &str, cidr: &str| PodNode {
            name: name.into(),
            netns: format!("orca-{name}"),
            pod_cidr: cidr.parse().unwrap(),
            ip: Ipv4Addr::new(10, 240, 0, 11),
        };
        let (a, b) = (node("a", "10.244.1.0/24"), node("b", "10.244.2.0/24"));
        let mut al = IpAllocator::default();
        assert_eq!(al.allocate(&a).unwrap(), Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(al.allocate(&a).unwrap(), Ipv4Addr::new(10, 244, 1, 3));
        assert_eq!(al.allocate(&b).unwrap(), Ipv4Addr::new(10, 244, 2, 2));
        al.free("a", Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(al.allocate(&a).unwrap(), Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(al.allocate(&a).unwrap(), Ipv4Addr::new(10, 244, 1, 4));
        let tiny = node("t", "10.244.9.0/30");
        assert_eq!(al.allocate(&tiny).unwrap(), Ipv4Addr::new(10, 244, 9, 2));
        assert!(al.allocate(&tiny).is_err(), "a /30 has one pod address");
    }

    #[test]
    fn server_args() {
        let c = ServerConfig {
            http_ports: vec![8080, 9090],
            udp_ports: vec![],
            tcp_echo_port: None,
            ..ServerConfig::default()
        };
        let a = c.args("p", "default", Ipv4Addr::new(10, 244, 1, 2), "node-a");
        let s = a.join(" ");
        assert!(s.contains("--http-port 8080 --http-port 9090"), "{s}");
        assert!(s.contains("--udp-port 0"), "{s}");
        assert!(s.contains("--tcp-echo-port 0"), "{s}");
        assert!(s.contains("--tcp-sink-port 9001"), "{s}");
        assert!(s.contains("--on-sigterm fail-ready"), "{s}");
    }

    #[test]
    fn http_replies_and_whoami_parse() {
        let r = parse_http_reply(b"HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\nnot ready\n").unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "not ready\n"));
        assert!(parse_http_reply(b"").is_err());
        assert!(parse_http_reply(b"garbage").is_err());
        let w = WhoAmI::parse(
            r#"{"pod":"p","namespace":"default","podIP":"10.244.1.2","node":"node-a","client":"10.240.0.11:4000","serverPort":8080}"#,
        )
        .unwrap();
        assert_eq!(w.client, "10.240.0.11:4000".parse().unwrap());
        assert_eq!(w.server_port, 8080);
        assert!(WhoAmI::parse("{}").is_err());
        assert!(WhoAmI::parse("nope").is_err());
    }
}
