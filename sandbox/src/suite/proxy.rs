//! Proxies on every node: upstream kube-proxy (iptables, nftables) as the reference, Orca (iptables, eBPF).
//!
//! [`Proxy::start`] starts one process per node namespace (`ip netns exec orca-node-X ...`, output in
//! `.cache/sandbox/logs/proxy-<kind>-<node>.log`, pid recorded so the sandbox's teardown stops it) and waits until
//! every node's `/healthz` on `<node IP>:10256` answers 200. A process that exits before that fails the start with
//! the tail of its log, so "the iptables dataplane is not part of this build yet" reaches the summary table as the
//! reason rather than as a timeout.
//!
//! # Cleaning the nodes between proxies
//!
//! [`Proxy::stop`] sends SIGTERM (SIGKILL after 10 s), then runs the proxy's own cleanup in each node namespace
//! (`kube-proxy --cleanup`, `orca-proxy cleanup`) and records what that left (nft tables, legacy iptables chains,
//! TC filters) as notes. It then resets the node namespaces regardless, so the next proxy starts from a clean
//! kernel: `nft flush ruleset` (which also removes iptables-nft tables), a flush of the legacy iptables tables
//! when the namespace has any, removal of `clsact` qdiscs (TC programs) on every interface, `conntrack -F`, and
//! removal of the per-node eBPF pin directory. Recreating the node namespaces instead was not an option: the pods'
//! veths and routes live in them. Only the sandbox's own `orca-node-*` namespaces are touched.
use crate::netns;
use crate::pods;
use crate::topology::{Node, Topology};
use anyhow::{bail, Context, Result};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Port of every proxy's health server (kube-proxy's default).
pub const HEALTHZ_PORT: u16 = 10256;
/// Port of every proxy's metrics server (kube-proxy's default).
pub const METRICS_PORT: u16 = 10249;
/// `--cluster-cidr`: both nodes' pod CIDRs, in both families (IPv6: fd00:244:1::/64 and fd00:244:2::/64).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16,fd00:244::/32";

/// Which proxy runs on the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProxyKind {
    KubeProxyIptables,
    KubeProxyNftables,
    OrcaIptables,
    OrcaEbpf,
}

impl ProxyKind {
    pub const ALL: [ProxyKind; 4] = [
        ProxyKind::KubeProxyIptables,
        ProxyKind::KubeProxyNftables,
        ProxyKind::OrcaIptables,
        ProxyKind::OrcaEbpf,
    ];

    /// The name used on the command line and in the summary.
    pub fn name(self) -> &'static str {
        match self {
            ProxyKind::KubeProxyIptables => "kube-proxy-iptables",
            ProxyKind::KubeProxyNftables => "kube-proxy-nftables",
            ProxyKind::OrcaIptables => "orca-iptables",
            ProxyKind::OrcaEbpf => "orca-ebpf",
        }
    }

    /// A short tag for Kubernetes namespace names.
    pub fn short(self) -> &'static str {
        match self {
            ProxyKind::KubeProxyIptables => "kpi",
            ProxyKind::KubeProxyNftables => "kpn",
            ProxyKind::OrcaIptables => "oi",
            ProxyKind::OrcaEbpf => "oe",
        }
    }

    /// Upstream kube-proxy: the reference every scenario must pass against.
    pub fn is_upstream(self) -> bool {
        matches!(self, ProxyKind::KubeProxyIptables | ProxyKind::KubeProxyNftables)
    }

    fn mode(self) -> &'static str {
        match self {
            ProxyKind::KubeProxyIptables | ProxyKind::OrcaIptables => "iptables",
            ProxyKind::KubeProxyNftables => "nftables",
            ProxyKind::OrcaEbpf => "ebpf",
        }
    }
}

impl fmt::Display for ProxyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ProxyKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        ProxyKind::ALL.into_iter().find(|k| k.name() == s).with_context(|| {
            let names: Vec<&str> = ProxyKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown proxy {s:?}; one of {}", names.join(", "))
        })
    }
}

/// Where the proxies' binaries and credentials are.
#[derive(Clone, Debug)]
pub struct ProxyEnv {
    pub topology: Topology,
    /// kube-proxy's kubeconfig (`system:kube-proxy`, apiserver on the fabric).
    pub kubeconfig: PathBuf,
    /// The upstream kube-proxy binary.
    pub kube_proxy_bin: PathBuf,
    /// The orca-proxy binary, or why there is none (a failed build).
    pub orca_proxy_bin: std::result::Result<PathBuf, String>,
}

/// Options of one start.
#[derive(Clone, Copy, Debug)]
pub struct StartOptions {
    /// Orca eBPF only: allow falling back to iptables (the demo); the suite forbids it so that "orca-ebpf" means
    /// the eBPF dataplane.
    pub allow_fallback: bool,
    /// How long to wait for every node's /healthz.
    pub ready_timeout: Duration,
    /// Orca eBPF only: `--ebpf-bypass-netfilter` (the bench measures it beside the default path).
    pub bypass_netfilter: bool,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            allow_fallback: false,
            ready_timeout: Duration::from_secs(45),
            bypass_netfilter: false,
        }
    }
}

/// The eBPF pin directory of a node's orca-proxy, on the sandbox's bpffs that outlives the agents (each node
/// needs its own: the bpffs is machine-wide).
pub fn bpf_root(node: &str) -> PathBuf {
    crate::hostfs::node_bpf_root(node)
}

fn log_name(kind: ProxyKind, node: &str) -> String {
    format!("proxy-{}-{node}", kind.name())
}

/// The last `n` lines of a sandbox log.
pub fn log_tail(name: &str, n: usize) -> String {
    let path = netns::log_dir().join(format!("{name}.log"));
    match std::fs::read_to_string(&path) {
        Ok(t) => {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(no log {}: {e})", path.display()),
    }
}

/// The error line(s) of a log, for a one-line reason: the last lines mentioning "error"/"fail", else the tail.
fn reason_from_log(name: &str) -> String {
    let tail = log_tail(name, 40);
    let interesting: Vec<&str> = tail
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("error") || l.contains("fail") || l.contains("not part of") || l.contains("unavailable")
        })
        .collect();
    let pick = if interesting.is_empty() {
        tail.lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
    } else {
        interesting[interesting.len().saturating_sub(2)..].to_vec()
    };
    pick.join(" | ")
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// The command line of `kind` on `node`.
pub fn command_line(kind: ProxyKind, env: &ProxyEnv, node: &Node, opts: &StartOptions) -> Result<Vec<String>> {
    let kubeconfig = path_str(&env.kubeconfig)?;
    let healthz = format!("{}:{HEALTHZ_PORT}", node.ip);
    let metrics = format!("{}:{METRICS_PORT}", node.ip);
    Ok(match kind {
        ProxyKind::KubeProxyIptables | ProxyKind::KubeProxyNftables => vec![
            path_str(&env.kube_proxy_bin)?,
            format!("--kubeconfig={kubeconfig}"),
            format!("--hostname-override={}", node.name),
            format!("--proxy-mode={}", kind.mode()),
            format!("--cluster-cidr={CLUSTER_CIDR}"),
            // Leave the machine-wide conntrack sysctls alone.
            "--conntrack-max-per-core=0".into(),
            "--conntrack-tcp-timeout-established=0".into(),
            "--conntrack-tcp-timeout-close-wait=0".into(),
            format!("--healthz-bind-address={healthz}"),
            format!("--metrics-bind-address={metrics}"),
            "-v=2".into(),
        ],
        ProxyKind::OrcaIptables | ProxyKind::OrcaEbpf => {
            let bin = match &env.orca_proxy_bin {
                Ok(b) => path_str(b)?,
                Err(why) => bail!("no orca-proxy binary: {why}"),
            };
            let mut v = vec![
                bin,
                "--kubeconfig".into(),
                kubeconfig,
                "--hostname-override".into(),
                node.name.clone(),
                "--proxy-mode".into(),
                kind.mode().into(),
                "--healthz-bind-address".into(),
                healthz,
                "--metrics-bind-address".into(),
                metrics,
                "--cluster-cidr".into(),
                CLUSTER_CIDR.into(),
                "--bpf-root".into(),
                path_str(&bpf_root(&node.name))?,
                "-v".into(),
                "2".into(),
            ];
            // The node's cgroup, where its host processes run (as the DaemonSet passes the host's cgroup2 root).
            let cgroup = crate::hostfs::node_cgroup(&node.name);
            if cgroup.is_dir() {
                v.extend(["--ebpf-cgroup-root".into(), path_str(&cgroup)?]);
            }
            if kind == ProxyKind::OrcaEbpf && !opts.allow_fallback {
                v.push("--no-fallback".into());
            }
            if kind == ProxyKind::OrcaEbpf && opts.bypass_netfilter {
                v.push("--ebpf-bypass-netfilter".into());
            }
            // Extra flags for both Orca modes, e.g. `ORCA_SUITE_ORCA_ARGS=--ebpf-bypass-netfilter` runs the suite
            // against the eBPF fast path that skips netfilter.
            if let Ok(extra) = std::env::var("ORCA_SUITE_ORCA_ARGS") {
                v.extend(extra.split_whitespace().map(String::from));
            }
            v
        }
    })
}

/// A proxy running on every node.
pub struct Proxy {
    pub kind: ProxyKind,
    agents: Agents,
    stopped: bool,
}

/// The proxy's processes, one per node, shared with the scenarios that kill and restart one
/// ([`Agents::kill_hard`], [`Agents::restart`]).
#[derive(Clone)]
pub struct Agents {
    pub kind: ProxyKind,
    env: ProxyEnv,
    opts: StartOptions,
    procs: Arc<Mutex<Vec<(Node, Child)>>>,
}

impl Agents {
    fn procs(&self) -> std::sync::MutexGuard<'_, Vec<(Node, Child)>> {
        self.procs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn spawn(&self, node: &Node) -> Result<()> {
        let argv = command_line(self.kind, &self.env, node, &self.opts)?;
        let name = log_name(self.kind, &node.name);
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let child = netns::spawn(&node.netns, &refs, &name)
            .with_context(|| format!("starting {} on {}", self.kind, node.name))?;
        self.procs().push((node.clone(), child));
        Ok(())
    }

    /// Waits until `nodes` answer `/healthz` with 200 (within the start options' limit).
    async fn wait_ready(&self, nodes: Vec<Node>) -> Result<()> {
        let deadline = Instant::now() + self.opts.ready_timeout;
        let mut pending = nodes;
        loop {
            self.check_alive()?;
            let mut still = Vec::new();
            for node in pending {
                let addr = SocketAddr::from((node.ip, HEALTHZ_PORT));
                match pods::http_request(&node.netns, "GET", addr, "/healthz", Duration::from_secs(2)).await {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => still.push((node, format!("HTTP {} {}", r.status, r.body.trim()))),
                    Err(e) => still.push((node, e.to_string())),
                }
            }
            if still.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let (node, why) = &still[0];
                bail!(
                    "{} on {}: /healthz not 200 after {:?} ({why}); log: {}",
                    self.kind,
                    node.name,
                    self.opts.ready_timeout,
                    reason_from_log(&log_name(self.kind, &node.name))
                );
            }
            pending = still.into_iter().map(|(n, _)| n).collect();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Fail when a node's proxy process has exited, with the reason from its log.
    pub fn check_alive(&self) -> Result<()> {
        for (node, child) in self.procs().iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{} on {} exited ({status}): {}",
                    self.kind,
                    node.name,
                    reason_from_log(&log_name(self.kind, &node.name))
                );
            }
        }
        Ok(())
    }

    /// SIGKILL to the proxy on `node`, as a node sees an OOM kill or a crash: nothing of it runs any more (its
    /// process is reaped) and nothing was cleaned up. Returns the pid it had.
    pub fn kill_hard(&self, node: &str) -> Result<u32> {
        let mut procs = self.procs();
        let i = procs
            .iter()
            .position(|(n, _)| n.name == node)
            .with_context(|| format!("no {} runs on {node}", self.kind))?;
        let (_, mut child) = procs.remove(i);
        let pid = child.id();
        child
            .kill()
            .with_context(|| format!("SIGKILL to {} on {node} (pid {pid})", self.kind))?;
        child.wait()?;
        Ok(pid)
    }

    /// Starts the proxy on `node` again (after [`Agents::kill_hard`]) with the same command line and waits for its
    /// `/healthz`.
    pub async fn restart(&self, node: &str) -> Result<()> {
        let n = self
            .env
            .topology
            .nodes
            .iter()
            .find(|n| n.name == node)
            .with_context(|| format!("no node {node}"))?
            .clone();
        if self.procs().iter().any(|(p, _)| p.name == node) {
            bail!("{} still runs on {node}", self.kind);
        }
        self.spawn(&n)?;
        self.wait_ready(vec![n]).await
    }
}

impl Proxy {
    /// Start `kind` on every node and wait until each answers `/healthz` with 200. On failure everything started
    /// is stopped and the nodes are reset; the error carries the proxy's own words.
    pub async fn start(kind: ProxyKind, env: &ProxyEnv, opts: StartOptions) -> Result<Proxy> {
        let mut p = Proxy {
            kind,
            agents: Agents {
                kind,
                env: env.clone(),
                opts,
                procs: Arc::default(),
            },
            stopped: false,
        };
        match p.start_all().await {
            Ok(()) => Ok(p),
            Err(e) => {
                let notes = p.stop_blocking();
                for n in notes {
                    tracing::info!("{kind}: {n}");
                }
                Err(e)
            }
        }
    }

    async fn start_all(&mut self) -> Result<()> {
        let nodes = self.agents.env.topology.nodes.clone();
        for node in &nodes {
            let name = log_name(self.kind, &node.name);
            let _ = std::fs::remove_file(netns::log_dir().join(format!("{name}.log")));
            self.agents.spawn(node)?;
        }
        self.agents.wait_ready(nodes).await
    }

    /// The handle scenarios use to kill and restart a node's proxy.
    pub fn agents(&self) -> Agents {
        self.agents.clone()
    }

    /// Fail when a node's proxy process has exited (or was killed and not restarted), with the reason from its log.
    pub fn check_alive(&mut self) -> Result<()> {
        self.agents.check_alive()?;
        let running: Vec<String> = self.agents.procs().iter().map(|(n, _)| n.name.clone()).collect();
        if let Some(n) = self
            .agents
            .env
            .topology
            .nodes
            .iter()
            .find(|n| !running.contains(&n.name))
        {
            bail!("{} on {} was killed and not started again", self.kind, n.name);
        }
        Ok(())
    }

    /// The log file of the proxy on `node`.
    pub fn log_path(&self, node: &str) -> PathBuf {
        netns::log_dir().join(format!("{}.log", log_name(self.kind, node)))
    }

    /// Stop the processes, run the proxy's own cleanup, then reset the nodes; returns notes on what the proxy's
    /// cleanup left or could not do.
    pub async fn stop(mut self) -> Vec<String> {
        tokio::task::spawn_blocking(move || self.stop_blocking())
            .await
            .unwrap_or_else(|e| vec![format!("stopping the proxy panicked: {e}")])
    }

    fn stop_blocking(&mut self) -> Vec<String> {
        if self.stopped {
            return Vec::new();
        }
        self.stopped = true;
        let mut procs = std::mem::take(&mut *self.agents.procs());
        let pids: Vec<u32> = procs.iter().map(|(_, c)| c.id()).collect();
        netns::terminate(&pids, Duration::from_secs(10));
        for (_, c) in &mut procs {
            let _ = c.wait();
        }
        let mut notes = Vec::new();
        let env = &self.agents.env;
        for node in &env.topology.nodes {
            if let Err(e) = own_cleanup(self.kind, env, node) {
                notes.push(format!("{}: own cleanup failed: {e:#}", node.name));
            }
            let left = leftovers(&node.netns);
            if !left.is_empty() {
                notes.push(format!("{}: own cleanup left {}", node.name, left.join(", ")));
            }
            if let Err(e) = reset_node(node) {
                notes.push(format!("{}: reset failed: {e:#}", node.name));
            }
        }
        notes
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for n in self.stop_blocking() {
            tracing::info!("{}: {n}", self.kind);
        }
    }
}

fn run_timeout(mut cmd: Command, timeout: Duration) -> Result<std::process::Output> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {desc}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{desc} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last: Vec<&str> = err.lines().rev().take(2).collect();
        bail!(
            "{} ({}): {}",
            desc,
            out.status,
            last.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    Ok(out)
}

/// `orca-proxy status --verify` on `node` (Orca only): what the node's dataplane holds (the eBPF maps pinned under
/// the node's bpf root, else the iptables nat table) against what the apiserver says, retried for up to 10 s while
/// the agent catches up with changes (a scenario's namespace being deleted). Err carries the drift it reported.
pub fn verify(kind: ProxyKind, env: &ProxyEnv, node: &Node) -> Result<()> {
    if kind.is_upstream() {
        return Ok(());
    }
    let bin = match &env.orca_proxy_bin {
        Ok(b) => path_str(b)?,
        Err(why) => bail!("no orca-proxy binary: {why}"),
    };
    let (kubeconfig, root) = (path_str(&env.kubeconfig)?, path_str(&bpf_root(&node.name))?);
    let args = [
        "status",
        "--verify",
        "--kubeconfig",
        &kubeconfig,
        "--hostname-override",
        &node.name,
        "--bpf-root",
        &root,
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = netns::command_in(&node.netns, &bin, &args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running orca-proxy status --verify on {}", node.name))?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let text = String::from_utf8_lossy(&out.stdout);
            let drift: Vec<&str> = text.lines().filter(|l| l.starts_with("DRIFT")).collect();
            let err = String::from_utf8_lossy(&out.stderr);
            bail!(
                "orca-proxy status --verify on {} ({}): {}",
                node.name,
                out.status,
                if drift.is_empty() {
                    err.trim().to_string()
                } else {
                    drift.join("; ")
                }
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `kube-proxy --cleanup` / `orca-proxy cleanup` inside the node's namespace.
fn own_cleanup(kind: ProxyKind, env: &ProxyEnv, node: &Node) -> Result<()> {
    let argv: Vec<String> = match kind {
        ProxyKind::KubeProxyIptables | ProxyKind::KubeProxyNftables => {
            vec![path_str(&env.kube_proxy_bin)?, "--cleanup".into(), "-v=0".into()]
        }
        ProxyKind::OrcaIptables | ProxyKind::OrcaEbpf => match &env.orca_proxy_bin {
            Ok(b) => vec![
                path_str(b)?,
                "cleanup".into(),
                "--bpf-root".into(),
                path_str(&bpf_root(&node.name))?,
            ],
            Err(_) => return Ok(()),
        },
    };
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let (prog, args) = refs.split_first().context("empty cleanup command")?;
    run_timeout(netns::command_in(&node.netns, prog, args), Duration::from_secs(30))?;
    Ok(())
}

fn output_in(ns: &str, cmd: &[&str]) -> String {
    netns::exec(ns, cmd)
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

/// What a proxy may have left in a node namespace: proxy chains/tables and TC filters.
pub fn leftovers(ns: &str) -> Vec<String> {
    let mut left = Vec::new();
    let nft = output_in(ns, &["nft", "list", "ruleset"]);
    let mut chains = 0;
    let mut rules = 0;
    let mut tables = Vec::new();
    let mut table = String::new();
    for line in nft.lines() {
        let l = line.trim();
        if let Some(t) = l.strip_prefix("table ") {
            table = t.trim_end_matches(" {").to_string();
        }
        let lower = l.to_ascii_lowercase();
        if l.starts_with("chain ") && (lower.contains("kube") || lower.contains("orca")) {
            chains += 1;
        }
        if !l.starts_with("chain ")
            && !l.starts_with("table ")
            && !l.starts_with("type ")
            && !l.starts_with("policy")
            && l != "}"
            && !l.is_empty()
        {
            rules += 1;
        }
        if (table.contains("kube") || table.contains("orca")) && !tables.contains(&table) {
            tables.push(table.clone());
        }
    }
    if !tables.is_empty() {
        left.push(format!("nft tables {}", tables.join(", ")));
    }
    if chains > 0 {
        left.push(format!("{chains} kube/orca chains"));
    }
    if rules > 0 && tables.is_empty() && chains == 0 {
        left.push(format!("{rules} nft rules/sets"));
    }
    if has_legacy_tables(ns) {
        let save = output_in(ns, &["iptables-legacy-save"]);
        let rules = save.lines().filter(|l| l.starts_with("-A ")).count();
        let chains = save
            .lines()
            .filter(|l| l.starts_with(':') && (l.contains("KUBE") || l.to_ascii_uppercase().contains("ORCA")))
            .count();
        if rules > 0 || chains > 0 {
            left.push(format!(
                "{rules} legacy iptables rules, {chains} kube/orca legacy chains"
            ));
        }
    }
    for dev in links(ns) {
        let f = output_in(ns, &["tc", "filter", "show", "dev", &dev, "ingress"])
            + &output_in(ns, &["tc", "filter", "show", "dev", &dev, "egress"]);
        if !f.trim().is_empty() {
            left.push(format!("TC filters on {dev}"));
        }
    }
    left
}

fn has_legacy_tables(ns: &str) -> bool {
    !output_in(ns, &["cat", "/proc/net/ip_tables_names"]).trim().is_empty()
}

fn links(ns: &str) -> Vec<String> {
    output_in(ns, &["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n != "lo")
        .collect()
}

/// Reset a node namespace's packet-processing state: nft ruleset, legacy iptables, clsact qdiscs, conntrack,
/// the node's eBPF pin directory.
pub fn reset_node(node: &Node) -> Result<()> {
    let ns = node.netns.as_str();
    if !ns.starts_with(netns::PREFIX) {
        bail!("refusing to reset {ns}: not a sandbox namespace");
    }
    netns::exec(ns, &["nft", "flush", "ruleset"]).context("nft flush ruleset")?;
    if has_legacy_tables(ns) {
        for t in output_in(ns, &["cat", "/proc/net/ip_tables_names"]).split_whitespace() {
            let _ = netns::exec(ns, &["iptables-legacy", "-t", t, "-F"]);
            let _ = netns::exec(ns, &["iptables-legacy", "-t", t, "-X"]);
        }
    }
    for dev in links(ns) {
        if output_in(ns, &["tc", "qdisc", "show", "dev", &dev]).contains("clsact") {
            let _ = netns::exec(ns, &["tc", "qdisc", "del", "dev", &dev, "clsact"]);
        }
    }
    let _ = netns::exec(ns, &["conntrack", "-F"]);
    let pins = bpf_root(&node.name);
    if pins.exists() {
        std::fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_name() {
        for k in ProxyKind::ALL {
            assert_eq!(k.name().parse::<ProxyKind>().unwrap(), k);
        }
        assert!("kube-proxy".parse::<ProxyKind>().is_err());
        assert!(ProxyKind::KubeProxyNftables.is_upstream());
        assert!(!ProxyKind::OrcaEbpf.is_upstream());
    }

    #[test]
    fn command_lines() {
        let topo = Topology::default();
        let env = ProxyEnv {
            topology: topo.clone(),
            kubeconfig: "/k/kp.kubeconfig".into(),
            kube_proxy_bin: "/b/kube-proxy".into(),
            orca_proxy_bin: Ok("/b/orca-proxy".into()),
        };
        let node = &topo.nodes[0];
        let kp = command_line(ProxyKind::KubeProxyNftables, &env, node, &StartOptions::default())
            .unwrap()
            .join(" ");
        assert!(kp.contains("--proxy-mode=nftables"), "{kp}");
        assert!(kp.contains("--hostname-override=node-a"), "{kp}");
        assert!(kp.contains("--healthz-bind-address=10.240.0.11:10256"), "{kp}");
        assert!(kp.contains("--conntrack-max-per-core=0"), "{kp}");
        let oe = command_line(ProxyKind::OrcaEbpf, &env, node, &StartOptions::default())
            .unwrap()
            .join(" ");
        assert!(oe.contains("--proxy-mode ebpf") && oe.contains("--no-fallback"), "{oe}");
        assert!(oe.contains("--bpf-root /run/orca-sandbox/bpffs/node-a"), "{oe}");
        let demo = StartOptions {
            allow_fallback: true,
            ..StartOptions::default()
        };
        let oe = command_line(ProxyKind::OrcaEbpf, &env, node, &demo).unwrap().join(" ");
        assert!(!oe.contains("--no-fallback"), "{oe}");
        let env2 = ProxyEnv {
            orca_proxy_bin: Err("build failed".into()),
            ..env
        };
        let e = command_line(ProxyKind::OrcaIptables, &env2, node, &StartOptions::default()).unwrap_err();
        assert!(format!("{e}").contains("build failed"));
    }
}
