//! The benchmark run: one sandbox, server pods on both nodes, a client pod on node-a; for each scale the filler
//! Services are topped up through the apiserver, the measured Services are (re)created last, and every
//! configuration (direct pod IPs, then each proxy started on both nodes) is measured `repeats` times.
use crate::backend::{self, Backend, BackendChoice, LegacyShim};
use crate::cluster::{self, BENCH_NS};
use crate::load::{LoadResult, Mode};
use crate::probe;
use crate::results::{ConfigResult, ProgResult, RunResult, GONE_STREAK};
use anyhow::{bail, Context, Result};
use orca_sandbox::kubelet::{self, DeploymentSpec, Kubelet, PodInfo};
use orca_sandbox::pods;
use orca_sandbox::suite::proxy::{bpf_root, METRICS_PORT};
use orca_sandbox::suite::{Proxy, ProxyEnv, ProxyKind, StartOptions};
use orca_sandbox::{build, netns, Sandbox, SandboxOptions};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What is measured: pod IPs without any proxy, or a proxy on both nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Config {
    Direct,
    Proxy(ProxyKind),
    /// Orca eBPF with `--ebpf-bypass-netfilter` (not in `ALL`: `--config orca-ebpf-bypass`).
    EbpfBypass,
    /// Orca eBPF of an earlier build (`--baseline-proxy`; not in `ALL`: `--config orca-ebpf-before`).
    EbpfBefore,
}

impl Config {
    pub const ALL: [Config; 5] = [
        Config::Direct,
        Config::Proxy(ProxyKind::OrcaEbpf),
        Config::Proxy(ProxyKind::OrcaIptables),
        Config::Proxy(ProxyKind::KubeProxyIptables),
        Config::Proxy(ProxyKind::KubeProxyNftables),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Config::Direct => "direct",
            Config::Proxy(k) => k.name(),
            Config::EbpfBypass => "orca-ebpf-bypass",
            Config::EbpfBefore => "orca-ebpf-before",
        }
    }

    pub fn parse(s: &str) -> Result<Config> {
        if s == "direct" {
            return Ok(Config::Direct);
        }
        if s == "orca-ebpf-bypass" {
            return Ok(Config::EbpfBypass);
        }
        if s == "orca-ebpf-before" {
            return Ok(Config::EbpfBefore);
        }
        Ok(Config::Proxy(s.parse()?))
    }
}

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOpts {
    pub quick: bool,
    pub scales: Vec<usize>,
    pub repeats: usize,
    pub configs: Vec<Config>,
    /// Configurations measured at the first (smallest) scale, when not all of them.
    pub first_scale_configs: Option<Vec<Config>>,
    pub orca_proxy_bin: PathBuf,
    /// The agent of an earlier build, for `orca-ebpf-before`.
    pub baseline_proxy_bin: Option<PathBuf>,
    pub out_dir: PathBuf,
    /// Length and op cap of one load run.
    pub duration_ms: u64,
    pub max_ops: u64,
    pub workers: usize,
    /// Endpoint changes measured for programming latency, per proxy and scale.
    pub prog_changes: usize,
    /// Pause after a change was observed before the next one (upstream's default min-sync-period is 1 s).
    pub prog_gap: Duration,
    /// Time limit of one configuration's programming-latency changes at one scale (checked between changes).
    pub prog_budget: Duration,
    /// Backend of the iptables-mode proxies.
    pub iptables_backend: BackendChoice,
    /// Concurrent apiserver requests while creating fillers.
    pub fill_concurrency: usize,
    /// Endpoints of every filler Service (None: 2 to 10 in turn).
    pub filler_endpoints: Option<usize>,
    /// Profile (`perf record -a`) the first cross-node connect run of each configuration at the largest scale.
    pub profile: bool,
    /// Profile node-a's agent (`perf record -p`) during the programming-latency changes at the largest scale.
    pub profile_agent: bool,
    /// BPF_PROG_TEST_RUN repeat count.
    pub tc_repeat: u32,
    /// The command line that reproduces the run (for the report).
    pub command: String,
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn machine() -> Vec<(String, String)> {
    vec![
        ("nproc".into(), sh("nproc")),
        ("CPU".into(), sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-")),
        ("kernel".into(), sh("uname -srm")),
        ("free -h".into(), sh("free -h")),
        ("commit".into(), sh("git rev-parse --short HEAD")),
    ]
}

/// Run `orca-bench load` inside `ns`; the JSON line it prints.
async fn load(ns: &str, mode: Mode, addrs: &[SocketAddr], o: &RunOpts) -> Result<LoadResult> {
    let exe = std::env::current_exe().context("locating orca-bench")?;
    let exe = exe.to_str().context("non-UTF-8 path")?.to_string();
    let mut args: Vec<String> = vec![
        "load".into(),
        "--mode".into(),
        match mode {
            Mode::Connect => "connect",
            Mode::Rr => "rr",
            Mode::Stream => "stream",
        }
        .into(),
        "--workers".into(),
        o.workers.to_string(),
        "--duration-ms".into(),
        o.duration_ms.to_string(),
        "--max-ops".into(),
        o.max_ops.to_string(),
    ];
    for a in addrs {
        args.push("--addr".into());
        args.push(a.to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let cmd = netns::command_in(ns, &exe, &refs);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
    let limit = Duration::from_millis(o.duration_ms) + Duration::from_secs(30);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("load generator did not finish within {limit:?}"))?
        .context("running the load generator")?;
    if !out.status.success() {
        bail!(
            "load generator failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().context("load generator printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("load generator output {line:?}"))
}

/// One `GET /` from `ns` to `addr` on a new connection; the name of the pod that answered. Like the load
/// generator, the client closes with RST after the answer, so the server keeps no TIME_WAIT entry that a later
/// connection from the same port would collide with.
async fn whoami(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let t0 = Instant::now();
    let mut s = pods::tcp_connect(ns, addr, timeout).await.map_err(|e| e.to_string())?;
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    let left = timeout.saturating_sub(t0.elapsed());
    let exchange = async {
        s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let (ok, body) = crate::load::read_response(&mut s).await?;
        if !ok {
            return Err(format!("HTTP error: {}", String::from_utf8_lossy(&body)));
        }
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("answer is not JSON ({e})"))?;
        v["pod"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "answer without pod".to_string())
    };
    match tokio::time::timeout(left, exchange).await {
        Ok(r) => r,
        Err(_) => Err("timed out".into()),
    }
}

/// Bounded wait until every address answers `GET /` from `ns`.
async fn wait_answering(ns: &str, addrs: &[SocketAddr], limit: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    for a in addrs {
        loop {
            match whoami(ns, *a, Duration::from_millis(500)).await {
                Ok(_) => break,
                Err(e) if t0.elapsed() > limit => bail!("{a} not answering from {ns} after {limit:?}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    Ok(t0.elapsed())
}

struct Pods {
    client: PodInfo,
    srv_a: Vec<PodInfo>,
    srv_b: Vec<PodInfo>,
}

async fn deploy_pods(kubelet: &Kubelet) -> Result<Pods> {
    let dep = |name: &str, n: usize, node: &str| {
        DeploymentSpec::new(name, n)
            .namespace(BENCH_NS)
            .on_node(node)
            .readiness(None)
            .grace_period(Duration::ZERO)
    };
    let srv_b = kubelet.deploy(&dep("srv-b", 2, "node-b")).await?;
    let srv_a = kubelet.deploy(&dep("srv-a", 2, "node-a")).await?;
    let client = kubelet
        .deploy(&dep("client", 1, "node-a").labels(&[("role", "client")]))
        .await?
        .pop()
        .context("no client pod")?;
    for p in srv_a.iter().chain(&srv_b).chain(std::iter::once(&client)) {
        kubelet
            .wait_ready(BENCH_NS, &p.name, true, Duration::from_secs(60))
            .await?;
    }
    // The client opens tens of thousands of short connections: reuse TIME_WAIT ports and use a wide range
    // (sysctls of the pod's own namespace).
    netns::exec(
        &client.netns,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ],
    )
    .context("client pod sysctls")?;
    Ok(Pods { client, srv_a, srv_b })
}

async fn scrape(node: &orca_sandbox::topology::Node) -> Option<String> {
    let addr = SocketAddr::from((node.ip, METRICS_PORT));
    match pods::http_request(&node.netns, "GET", addr, "/metrics", Duration::from_secs(5)).await {
        Ok(r) if r.status == 200 => Some(r.body),
        _ => None,
    }
}

/// Probe `vip` from `ns` with new connections until `done` says so (or `limit`); returns (probe send time,
/// answering pod) pairs and the number of failed probes.
async fn probe_until(
    ns: &str,
    vip: SocketAddr,
    limit: Duration,
    mut done: impl FnMut(&[(Instant, String)]) -> bool,
) -> (Vec<(Instant, String)>, usize, bool) {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    let mut errors = 0;
    while t0.elapsed() < limit {
        let t = Instant::now();
        match whoami(ns, vip, Duration::from_millis(500)).await {
            Ok(pod) => seen.push((t, pod)),
            Err(_) => errors += 1,
        }
        if done(&seen) {
            return (seen, errors, true);
        }
    }
    (seen, errors, false)
}

/// Programming latency over `o.prog_changes` changes of `bench-prog`'s slice (three backends, two ready at a
/// time). Change k marks backend k mod 3 unready and the one change k−1 had marked unready ready again, in one
/// PATCH, so every change is one endpoint turning unready (plus one turning ready), i.e. one sync of the proxy.
/// The removal latency is from sending the PATCH to the first probe after the last one the unready backend
/// answered; the probing of a change ends after `GONE_STREAK` answers in a row without it (and once the
/// re-readied backend answered, which gives the coarse re-add latency).
async fn programming_latency(
    client: &kube::Client,
    ns: &str,
    vip: SocketAddr,
    backends: &[PodInfo],
    gap: Duration,
    o: &RunOpts,
) -> Result<ProgResult> {
    let mut r = ProgResult::default();
    let n = backends.len();
    if n < 2 {
        bail!("programming latency needs at least 2 backends, got {n}");
    }
    let mut back: Option<String> = None;
    let started = Instant::now();
    for k in 0..o.prog_changes {
        if k > 0 && started.elapsed() > o.prog_budget {
            r.budget_exhausted_s = Some(started.elapsed().as_secs_f64());
            break;
        }
        let victim = backends[k % n].name.clone();
        let eps: Vec<(Ipv4Addr, bool)> = backends.iter().map(|p| (p.ip, p.name != victim)).collect();
        let t0 = Instant::now();
        cluster::set_prog_endpoints(client, "bench-prog", &eps).await?;
        r.patch_rtt_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let want_back = back.clone();
        let (seen, errs, ok) = probe_until(ns, vip, Duration::from_secs(60), |s| {
            s.len() >= GONE_STREAK
                && s[s.len() - GONE_STREAK..].iter().all(|(_, p)| *p != victim)
                && want_back.as_ref().is_none_or(|b| s.iter().any(|(_, p)| p == b))
        })
        .await;
        r.probe_errors += errs;
        let last_hit = seen.iter().rposition(|(_, p)| *p == victim);
        let first_clean = last_hit.map(|i| i + 1).unwrap_or(0);
        let gone = seen.len() >= first_clean + GONE_STREAK;
        if gone {
            r.removal_ms
                .push(seen[first_clean].0.duration_since(t0).as_secs_f64() * 1e3);
        }
        if let Some(b) = &back {
            match seen.iter().find(|(_, p)| p == b) {
                Some((t, _)) => r.add_ms.push(t.duration_since(t0).as_secs_f64() * 1e3),
                None => r.add_timeouts += 1,
            }
        }
        if !ok && !gone {
            r.timeouts += 1;
        }
        back = Some(victim);
        tokio::time::sleep(gap).await;
    }
    // Leave every backend ready.
    let all: Vec<(Ipv4Addr, bool)> = backends.iter().map(|p| (p.ip, true)).collect();
    cluster::set_prog_endpoints(client, "bench-prog", &all).await?;
    Ok(r)
}

/// The measured Services' cluster IPs.
#[derive(Clone, Copy)]
struct Vips {
    remote: Ipv4Addr,
    local: Ipv4Addr,
    prog: Ipv4Addr,
    /// The IPv6 cluster IP of the cross-node Service.
    remote6: Ipv6Addr,
}

struct Targets {
    remote_http: Vec<SocketAddr>,
    /// The same backends over IPv6.
    remote_http6: Vec<SocketAddr>,
    local_http: Vec<SocketAddr>,
    remote_echo: Vec<SocketAddr>,
    remote_sink: SocketAddr,
}

fn is_iptables(cfg: Config) -> bool {
    matches!(
        cfg,
        Config::Proxy(ProxyKind::OrcaIptables) | Config::Proxy(ProxyKind::KubeProxyIptables)
    )
}

/// Measure one configuration; for an iptables mode on iptables-legacy, the node namespaces are marked legacy
/// before and flushed after (also when the measurement fails).
#[allow(clippy::too_many_arguments)]
async fn measure(
    sb: &Sandbox,
    env: &ProxyEnv,
    shim: Option<&LegacyShim>,
    pods: &Pods,
    vips: Vips,
    cfg: Config,
    scale: usize,
    o: &RunOpts,
) -> ConfigResult {
    let backend = is_iptables(cfg).then(|| Backend::choose(o.iptables_backend, scale));
    let mut env = env.clone();
    let mut res = ConfigResult {
        config: cfg.name().into(),
        scale,
        iptables_backend: backend.map(|b| b.name().to_string()),
        ..ConfigResult::default()
    };
    let nodes: Vec<String> = sb.topology().nodes.iter().map(|n| n.netns.clone()).collect();
    if backend == Some(Backend::Legacy) {
        let Some(shim) = shim else {
            res.errors
                .push("iptables-legacy requested but the legacy shim was not created".into());
            return res;
        };
        if cfg == Config::Proxy(ProxyKind::KubeProxyIptables) {
            env.kube_proxy_bin = shim.kube_proxy.clone();
        }
        if let (Config::Proxy(ProxyKind::OrcaIptables), Some(o)) = (cfg, &shim.orca_proxy) {
            env.orca_proxy_bin = Ok(o.clone());
        }
        for ns in &nodes {
            if let Err(e) = backend::mark_legacy(ns) {
                res.errors.push(format!("{e:#}"));
            }
        }
    }
    if cfg == Config::EbpfBefore {
        env.orca_proxy_bin = o
            .baseline_proxy_bin
            .clone()
            .ok_or_else(|| "orca-ebpf-before needs --baseline-proxy".to_string());
    }
    measure_inner(sb, &env, pods, vips, cfg, scale, backend, o, &mut res).await;
    if backend == Some(Backend::Legacy) {
        for ns in &nodes {
            if let Err(e) = backend::flush_legacy(ns) {
                res.errors.push(format!("{e:#}"));
            }
        }
    }
    res
}

#[allow(clippy::too_many_arguments)]
async fn measure_inner(
    sb: &Sandbox,
    env: &ProxyEnv,
    pods: &Pods,
    vips: Vips,
    cfg: Config,
    scale: usize,
    backend: Option<Backend>,
    o: &RunOpts,
    res: &mut ConfigResult,
) {
    let Vips {
        remote: remote_vip,
        local: local_vip,
        prog: prog_vip,
        remote6: remote_vip6,
    } = vips;
    let ns = pods.client.netns.clone();
    let topo = sb.topology().clone();
    let t0 = Instant::now();
    let proxy = match cfg {
        Config::Direct => None,
        Config::Proxy(_) | Config::EbpfBypass | Config::EbpfBefore => {
            let kind = match cfg {
                Config::Proxy(k) => k,
                _ => ProxyKind::OrcaEbpf,
            };
            let so = StartOptions {
                allow_fallback: false,
                ready_timeout: Duration::from_secs(60 + scale as u64 / 100),
                bypass_netfilter: cfg == Config::EbpfBypass,
            };
            match Proxy::start(kind, env, so).await {
                Ok(p) => Some(p),
                Err(e) => {
                    res.errors.push(format!("proxy did not start: {e:#}"));
                    return;
                }
            }
        }
    };
    let t = match cfg {
        Config::Direct => Targets {
            remote_http: pods.srv_b.iter().map(|p| p.addr(8080)).collect(),
            remote_http6: pods.srv_b.iter().map(|p| p.addr6(8080)).collect(),
            local_http: pods.srv_a.iter().map(|p| p.addr(8080)).collect(),
            remote_echo: pods.srv_b.iter().map(|p| p.addr(9000)).collect(),
            remote_sink: pods.srv_b[0].addr(9001),
        },
        Config::Proxy(_) | Config::EbpfBypass | Config::EbpfBefore => Targets {
            remote_http: vec![SocketAddr::from((remote_vip, 80))],
            // The baseline may predate dual-stack (it then leaves IPv6 Services alone): IPv4 only for it.
            remote_http6: if cfg == Config::EbpfBefore {
                Vec::new()
            } else {
                vec![SocketAddr::from((remote_vip6, 80))]
            },
            local_http: vec![SocketAddr::from((local_vip, 80))],
            remote_echo: vec![SocketAddr::from((remote_vip, 9000))],
            remote_sink: SocketAddr::from((remote_vip, 9001)),
        },
    };
    let mut check = t.remote_http.clone();
    check.extend(&t.local_http);
    check.extend(&t.remote_http6);
    if cfg != Config::Direct {
        check.push(SocketAddr::from((prog_vip, 80)));
    }
    match wait_answering(&ns, &check, Duration::from_secs(120 + scale as u64 / 50)).await {
        Ok(_) => {
            if cfg != Config::Direct {
                res.startup_s = Some(t0.elapsed().as_secs_f64());
            }
        }
        Err(e) => {
            res.errors.push(format!("{e:#}"));
            if let Some(p) = proxy {
                res.stop_notes = p.stop().await;
            }
            return;
        }
    }
    let a = &topo.nodes[0];
    if let (Some(b), Config::Proxy(kind)) = (backend, cfg) {
        let chain = if kind.is_upstream() {
            "KUBE-SERVICES"
        } else {
            "ORCA-SERVICES"
        };
        let nsa = a.netns.clone();
        match tokio::task::spawn_blocking(move || backend::position(&nsa, b, chain, remote_vip, 80)).await {
            Ok(Ok(p)) => {
                if p.index.is_none() {
                    res.errors.push(format!(
                        "{remote_vip}:80 not found in {chain} of iptables-{} ({} rules in nat): wrong backend?",
                        p.backend, p.nat_rules
                    ));
                }
                res.position = Some(p);
            }
            Ok(Err(e)) => res.errors.push(format!("chain position: {e:#}")),
            Err(e) => res.errors.push(format!("chain position task: {e}")),
        }
    }
    let before = scrape(a).await;
    let profile_now = o.profile && o.scales.last() == Some(&scale);
    for rep in 0..o.repeats {
        for (mode, addrs, slot) in [
            (Mode::Connect, t.remote_http.clone(), 0),
            (Mode::Connect, t.local_http.clone(), 1),
            (Mode::Rr, t.remote_echo.clone(), 2),
            (Mode::Stream, vec![t.remote_sink], 3),
            (Mode::Connect, t.remote_http6.clone(), 4),
        ] {
            if addrs.is_empty() {
                continue;
            }
            let prof = (profile_now && rep == 0 && slot == 0).then(|| {
                let secs = (o.duration_ms as f64 / 1000.0 * 0.8).clamp(0.2, 5.0);
                let out = std::env::temp_dir().join(format!("orca-bench-perf-{}.data", std::process::id()));
                tokio::task::spawn_blocking(move || probe::perf_profile(&out, secs))
            });
            let loaded = load(&ns, mode, &addrs, o).await;
            if let Some(p) = prof {
                match p.await {
                    Ok(Ok(text)) => res.profile = Some(text),
                    Ok(Err(e)) => res.errors.push(format!("perf profile: {e:#}")),
                    Err(e) => res.errors.push(format!("perf profile task: {e}")),
                }
            }
            match loaded {
                Ok(r) => {
                    if r.failed() > 0 {
                        res.errors.push(format!(
                            "rep {rep} {mode:?} {addrs:?}: {} failed ops {:?}",
                            r.failed(),
                            r.errors
                        ));
                    }
                    match slot {
                        0 => res.connect_remote.push(r),
                        1 => res.connect_local.push(r),
                        2 => res.rr.push(r),
                        4 => res.connect_remote6.push(r),
                        _ => res.stream.push(r),
                    }
                }
                Err(e) => res.errors.push(format!("rep {rep} {mode:?}: {e:#}")),
            }
        }
    }
    if let Some(mut proxy) = proxy {
        let mid = scrape(a).await;
        let log_path = proxy.log_path(&a.name);
        let log_from = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let prog_backends: Vec<PodInfo> = pods.srv_b.iter().chain(pods.srv_a.first()).cloned().collect();
        // `--profile-agent`: node-a's agent sampled with perf while the changes run (largest scale).
        let agent_perf = if o.profile_agent && o.scales.last() == Some(&scale) {
            let names = ["kube-proxy", "orca-proxy"];
            match probe::proxy_pids(&a.netns, &names).first() {
                Some((pid, _)) => {
                    let out = std::env::temp_dir().join(format!("orca-bench-agent-{}.data", std::process::id()));
                    match probe::AgentProfile::start(*pid, &out) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            res.errors.push(format!("agent profile: {e:#}"));
                            None
                        }
                    }
                }
                None => None,
            }
        } else {
            None
        };
        match programming_latency(
            &sb.admin_client(),
            &ns,
            SocketAddr::from((prog_vip, 80)),
            &prog_backends,
            o.prog_gap,
            o,
        )
        .await
        {
            Ok(p) => res.prog = Some(p),
            Err(e) => res.errors.push(format!("programming latency: {e:#}")),
        }
        let after = scrape(a).await;
        if let Some(p) = agent_perf {
            match tokio::task::spawn_blocking(move || p.finish()).await {
                Ok(Ok(text)) => res.agent_profile = Some(text),
                Ok(Err(e)) => res.errors.push(format!("agent profile: {e:#}")),
                Err(e) => res.errors.push(format!("agent profile task: {e}")),
            }
        }
        match probe::logged_syncs(&log_path, log_from) {
            Ok(l) => res.logged = Some(l),
            Err(e) => res.errors.push(format!("proxy log: {e:#}")),
        }
        if let (Some(m), Some(af)) = (&mid, &after) {
            // kube-proxy exports the histogram only after its first observation: absent before = empty.
            if let Some(h1) = probe::parse_histogram(af, probe::NETWORK_PROGRAMMING) {
                let h0 = probe::parse_histogram(m, probe::NETWORK_PROGRAMMING).unwrap_or_default();
                res.net_prog = Some(h1.since(&h0));
            }
            if let Some(h1) = probe::parse_histogram(af, probe::SYNC_PARTIAL) {
                let h0 = probe::parse_histogram(m, probe::SYNC_PARTIAL).unwrap_or_default();
                res.sync_partial = Some(h1.since(&h0));
            }
        }
        if let Some(af) = &after {
            res.sync_rules = probe::parse_histogram(af, probe::SYNC_RULES);
            res.sync_full = probe::parse_histogram(af, probe::SYNC_FULL);
        }
        if before.is_none() || after.is_none() {
            res.errors
                .push("metrics endpoint of node-a's proxy did not answer".into());
        }
        for node in &topo.nodes {
            for (pid, comm) in probe::proxy_pids(&node.netns, &["kube-proxy", "orca-proxy"]) {
                match probe::proc_stats(pid, &comm) {
                    Ok(s) => res.procs.push((node.name.clone(), s)),
                    Err(e) => res.errors.push(format!("/proc/{pid}: {e:#}")),
                }
            }
        }
        if cfg == Config::Proxy(ProxyKind::OrcaEbpf) {
            // `ip netns exec` gives the agent its own mount namespace, where it mounted bpffs when the host's
            // /sys/fs/bpf is not one: reach its pins through /proc/<pid>/root.
            let root = match probe::proxy_pids(&a.netns, &["orca-proxy"]).first() {
                Some((pid, _)) => PathBuf::from(format!("/proc/{pid}/root{}", bpf_root(&a.name).display())),
                None => bpf_root(&a.name),
            };
            let (client_ip, pod_ip, rep) = (pods.client.ip, pods.srv_b[0].ip, o.tc_repeat);
            let v6 = (pods.client.ip6(), remote_vip6);
            let tc =
                tokio::task::spawn_blocking(move || probe::tc_cost(&root, client_ip, remote_vip, 80, pod_ip, v6, rep))
                    .await;
            match tc {
                Ok(Ok(c)) => res.tc = Some(c),
                Ok(Err(e)) => res.errors.push(format!("TC test run: {e:#}")),
                Err(e) => res.errors.push(format!("TC test run task: {e}")),
            }
        }
        if let Err(e) = proxy.check_alive() {
            res.errors.push(format!("{e:#}"));
        }
        res.stop_notes = proxy.stop().await;
    }
}

/// Bring the sandbox up, run everything, tear it down (also on failure).
pub async fn run(o: &RunOpts) -> Result<RunResult> {
    let t0 = Instant::now();
    let mut out = RunResult {
        quick: o.quick,
        scales: o.scales.clone(),
        repeats: o.repeats,
        configs: o.configs.iter().map(|c| c.name().to_string()).collect(),
        load_start: loadavg(),
        started_utc: cluster::rfc3339_now(),
        filler_endpoints: o.filler_endpoints,
        command: o.command.clone(),
        machine: machine(),
        load_params: format!(
            "{} workers, {} ms or {} ops per load run, {} repeats; programming latency: {} changes, {} ms apart, \
             at most {} s per configuration and scale; \
             iptables backend {:?} (auto = legacy from {} Services); filler creation {} requests in flight",
            o.workers,
            o.duration_ms,
            o.max_ops,
            o.repeats,
            o.prog_changes,
            o.prog_gap.as_millis(),
            o.prog_budget.as_secs(),
            o.iptables_backend,
            backend::LEGACY_FROM,
            o.fill_concurrency
        ),
        ..RunResult::default()
    };
    println!(
        "bench: TC program cost per packet at {:?} Services (before the sandbox, on a quiet machine)",
        o.scales
    );
    let scales = o.scales.clone();
    match tokio::task::spawn_blocking(move || {
        crate::tccost::measure_scales(
            &scales,
            3000,
            &[crate::tccost::Variant::Netfilter, crate::tccost::Variant::Bypass],
        )
    })
    .await
    {
        Ok(Ok(rows)) => out.tc_cost = rows,
        Ok(Err(e)) => out.notes.push(format!("TC cost per packet not measured: {e:#}")),
        Err(e) => out.notes.push(format!("TC cost per packet not measured: {e}")),
    }
    println!("bench: control-plane binaries");
    build::ensure_k8s_binaries()?;
    println!("bench: bringing the sandbox up (load average {})", out.load_start);
    let sb = Sandbox::up(SandboxOptions::default()).await?;
    let r = run_on(&sb, o, &mut out).await;
    let down = sb.down();
    r?;
    if let Err(e) = down {
        out.notes.push(format!("teardown: {e:#}"));
    }
    out.load_end = loadavg();
    out.duration_s = t0.elapsed().as_secs_f64();
    Ok(out)
}

async fn run_on(sb: &Sandbox, o: &RunOpts, out: &mut RunResult) -> Result<()> {
    let env = ProxyEnv {
        topology: sb.topology().clone(),
        kubeconfig: sb.kube_proxy_kubeconfig(),
        kube_proxy_bin: sb.bin_dir().join("kube-proxy"),
        orca_proxy_bin: Ok(o.orca_proxy_bin.clone()),
    };
    let legacy_needed = o.configs.iter().any(|c| is_iptables(*c))
        && o.scales
            .iter()
            .any(|s| Backend::choose(o.iptables_backend, *s) == Backend::Legacy);
    let shim = if legacy_needed {
        Some(LegacyShim::create(
            &env.kube_proxy_bin,
            env.orca_proxy_bin.as_ref().ok().map(PathBuf::as_path),
        )?)
    } else {
        None
    };
    let client = sb.admin_client();
    cluster::ensure_namespace(&client, BENCH_NS).await?;
    let kubelet = Arc::new(Kubelet::new(client.clone(), sb.topology())?);
    let r = async {
        let pods = deploy_pods(&kubelet).await?;
        println!(
            "bench: client {} ({}) on node-a; servers {} on node-a, {} on node-b",
            pods.client.name,
            pods.client.ip,
            pods.srv_a
                .iter()
                .map(|p| p.ip.to_string())
                .collect::<Vec<_>>()
                .join(","),
            pods.srv_b
                .iter()
                .map(|p| p.ip.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        for &scale in &o.scales {
            let have = cluster::filler_count(&client).await?;
            let want = scale.saturating_sub(1);
            if want < have {
                out.notes.push(format!(
                    "scale {scale}: {have} fillers exist already (scales must grow)"
                ));
            }
            let t = Instant::now();
            let rate = cluster::create_fillers(&client, have, want, o.fill_concurrency, o.filler_endpoints).await?;
            if want > have {
                println!(
                    "bench: {} filler Services + slices created in {:.1}s ({rate:.0} objects/s)",
                    want - have,
                    t.elapsed().as_secs_f64()
                );
                out.fill_rate.push((scale, rate));
            }
            // The measured Services last (highest resourceVersion, newest ClusterIP).
            let (remote, remote6) = cluster::create_selector_service(&client, "bench-remote", "srv-b").await?;
            let (local, _) = cluster::create_selector_service(&client, "bench-local", "srv-a").await?;
            let prog_ips: Vec<Ipv4Addr> = pods.srv_b.iter().chain(pods.srv_a.first()).map(|p| p.ip).collect();
            let prog = cluster::create_prog_service(&client, "bench-prog", &prog_ips).await?;
            for svc in ["bench-remote", "bench-local"] {
                let t = Instant::now();
                loop {
                    let eps = kubelet::service_endpoints(&client, BENCH_NS, svc).await?;
                    // Two pods, one slice per family.
                    if eps.iter().filter(|e| e.ready == Some(true)).count() == 4 {
                        break;
                    }
                    if t.elapsed() > Duration::from_secs(60) {
                        bail!("{svc}: endpoints not ready after 60s: {eps:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            println!(
                "bench: scale {scale}: bench-remote {remote} and {remote6}, bench-local {local}, bench-prog {prog}"
            );
            let vips = Vips {
                remote,
                local,
                prog,
                remote6,
            };
            let cfgs = match &o.first_scale_configs {
                Some(f) if o.scales.first() == Some(&scale) => f.clone(),
                _ => o.configs.clone(),
            };
            for &cfg in &cfgs {
                println!("bench: scale {scale}: {} (load average {})", cfg.name(), loadavg());
                let r = measure(sb, &env, shim.as_ref(), &pods, vips, cfg, scale, o).await;
                crate::report::print_brief(&r);
                out.results.push(r);
            }
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if let Err(e) = kubelet.shutdown().await {
        out.notes.push(format!("kubelet shutdown: {e:#}"));
    }
    r
}
