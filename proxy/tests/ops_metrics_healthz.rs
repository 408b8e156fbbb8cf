//! Operating orca-proxy like kube-proxy, in the sandbox: the agent runs inside node-a's network namespace with
//! kube-proxy's credentials, `--proxy-mode iptables` and healthz/metrics bound to node-a's address. After its first
//! sync, and after a Service and an EndpointSlice change, /metrics (scraped from inside node-a) carries kube-proxy's
//! metric names with the values a sync produces, plus `orca_dataplane_mode`; /healthz and /livez answer 200 with
//! kube-proxy's JSON body and headers.
//!
//! If the agent cannot start its dataplane the test fails with the agent's own message (it never passes without a
//! running agent). The agent is stopped and the sandbox torn down in every case (guards).
//!
//! Needs root and the sandbox's control-plane binaries; skipped (with a message) only when the binaries are absent
//! and ORCA_REQUIRE_SANDBOX is unset.

use std::net::Ipv4Addr;
use std::process::Child;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use orca_sandbox::{build, netns, Sandbox, SandboxOptions};
use serde_json::{json, Value};

const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;
const LOG_NAME: &str = "orca-proxy-node-a";

fn should_run() -> bool {
    if std::env::var_os("ORCA_REQUIRE_SANDBOX").is_some() || build::binaries_present() {
        return true;
    }
    eprintln!("SKIPPED: no control-plane binaries and ORCA_REQUIRE_SANDBOX unset; run `cargo xtask setup`");
    false
}

/// A proxy process; stopped (SIGTERM, then SIGKILL after 5 s) when dropped, also when the test panics.
struct Agent {
    child: Child,
    log: &'static str,
}

impl Agent {
    /// Fails with the process's log when it has exited.
    fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}); its log:\n{}", self.log, log_of(self.log));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        netns::terminate(&[self.child.id()], Duration::from_secs(5));
        let _ = self.child.wait();
    }
}

fn log_of(name: &str) -> String {
    let path = netns::log_dir().join(format!("{name}.log"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()))
}

fn agent_log() -> String {
    log_of(LOG_NAME)
}

/// orca-proxy in node-a's namespace `ns` with kube-proxy's `kubeconfig`, /healthz and /metrics bound to `healthz` and
/// `metrics`, the sandbox's cluster CIDR and `-v 2`, then `args` (at least `--proxy-mode`).
fn orca_command(ns: &str, kubeconfig: &str, healthz: &str, metrics: &str, args: &[&str]) -> std::process::Command {
    let mut argv = vec![
        "--hostname-override",
        "node-a",
        "--kubeconfig",
        kubeconfig,
        "--healthz-bind-address",
        healthz,
        "--metrics-bind-address",
        metrics,
        "--cluster-cidr",
        "10.244.0.0/16",
        "-v",
        "2",
    ];
    argv.extend_from_slice(args);
    netns::command_in(ns, env!("CARGO_BIN_EXE_orca-proxy"), &argv)
}

/// Starts `cmd` (from [`orca_command`]) as the agent, its output in the log `LOG_NAME`.
fn start_orca(cmd: &mut std::process::Command) -> Agent {
    Agent {
        child: netns::spawn_logged(cmd, LOG_NAME).expect("starting orca-proxy in node-a"),
        log: LOG_NAME,
    }
}

/// An HTTP answer: status code, headers (names lowercased), body.
type Answer = (u16, Vec<(String, String)>, String);

/// `curl` from inside `ns`. Bounded to 5 s; Err when nothing answered.
fn curl(ns: &str, url: &str) -> Result<Answer, String> {
    let out = netns::command_in(ns, "curl", &["-sS", "-i", "--max-time", "5", url])
        .output()
        .map_err(|e| format!("running curl: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head in {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers, body.to_string()))
}

/// The value of the first sample of `series` (a metric name with an optional suffix such as `_count`), any labels.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        let bare = name.split('{').next()?;
        (bare == series).then(|| value.parse().ok()).flatten()
    })
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Scrapes /metrics until `pred` holds (or fails after 60 s, or when the agent exits).
fn scrape_until(agent: &mut Agent, ns: &str, url: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        agent.check_running();
        let last = match curl(ns, url) {
            Ok((200, _, body)) if pred(&body) => return body,
            Ok((200, _, body)) => body,
            Ok((code, _, body)) => format!("HTTP {code}: {body}"),
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last scrape:\n{last}\nagent log:\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_answer_like_kube_proxy() {
    if !should_run() {
        return;
    }
    let sb = Sandbox::up(SandboxOptions::default()).await.expect("sandbox up");
    let node = sb.topology().node("node-a").expect("node-a").clone();
    let ip: Ipv4Addr = node.ip;
    let kubeconfig = sb.kube_proxy_kubeconfig();
    let healthz = format!("{ip}:{HEALTHZ_PORT}");
    let metrics = format!("{ip}:{METRICS_PORT}");
    let kubeconfig = kubeconfig.to_str().expect("UTF-8 path");
    // Declared after `sb`: dropped (agent stopped) before the sandbox is torn down.
    let mut agent = start_orca(&mut orca_command(
        &node.netns,
        kubeconfig,
        &healthz,
        &metrics,
        &["--proxy-mode", "iptables"],
    ));
    let metrics_url = format!("http://{metrics}/metrics");
    let healthz_url = format!("http://{healthz}/healthz");

    // 1. The first (full) sync: its timestamp and duration are recorded.
    let text = tokio::task::block_in_place(|| {
        scrape_until(&mut agent, &node.netns, &metrics_url, "the first sync", |t| {
            sample(t, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").is_some_and(|v| v > 0.0)
        })
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = sample(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").unwrap();
    assert!(
        (now - last).abs() < 120.0,
        "last sync timestamp {last} is recent (now {now})"
    );
    assert!(sample(&text, "kubeproxy_sync_full_proxy_rules_duration_seconds_count").unwrap_or(0.0) >= 1.0);
    assert!(sample(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0) >= 1.0);

    // 2. A Service and its EndpointSlice (with the controller's trigger-time annotation): counted as changes,
    //    programmed by a partial sync, with the network programming latency observed.
    let admin = sb.admin_client();
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "ops-probe", "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    let cluster_ip = Api::<Service>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &svc)
        .await
        .expect("create Service")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a ClusterIP");
    let trigger = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "ops-probe-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "ops-probe"},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": trigger}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.2.50"], "conditions": {"ready": true}, "nodeName": "node-b"}]
    }))
    .unwrap();
    Api::<EndpointSlice>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &slice)
        .await
        .expect("create EndpointSlice");
    let text = tokio::task::block_in_place(|| {
        scrape_until(
            &mut agent,
            &node.netns,
            &metrics_url,
            "the Service and EndpointSlice changes to be synced",
            |t| {
                let at_least = |s: &str| sample(t, s).unwrap_or(0.0) >= 1.0;
                at_least("kubeproxy_sync_proxy_rules_service_changes_total")
                    && at_least("kubeproxy_sync_proxy_rules_endpoint_changes_total")
                    && at_least("kubeproxy_network_programming_duration_seconds_count")
                    && at_least("kubeproxy_sync_partial_proxy_rules_duration_seconds_count")
            },
        )
    });

    // What the metrics report was programmed: node-a's nat table (read only) holds the new ClusterIP.
    let nat = netns::exec(&node.netns, &["iptables-save", "-t", "nat"]).expect("iptables-save in node-a");
    let nat = String::from_utf8_lossy(&nat.stdout);
    assert!(
        nat.contains(&format!("{cluster_ip}/32")),
        "node-a's nat table has {cluster_ip}:\n{nat}"
    );

    // Every kube-proxy name (as a histogram, gauge or counter) and Orca's mode gauge.
    for (name, series) in [
        (
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        ),
        (
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket",
        ),
        (
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket",
        ),
        (
            "kubeproxy_network_programming_duration_seconds",
            "kubeproxy_network_programming_duration_seconds_bucket",
        ),
        (
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "kubeproxy_sync_proxy_rules_service_changes_total",
        ),
    ] {
        assert!(
            sample(&text, series).is_some(),
            "{name} ({series}) in /metrics:\n{text}"
        );
        let kind = if series.ends_with("_bucket") {
            "histogram"
        } else if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        // Prometheus' text format (kube-proxy's): a counter's TYPE line carries its `_total`.
        assert!(
            text.lines().any(|l| l == format!("# TYPE {name} {kind}")),
            "{name} is a {kind}:\n{text}"
        );
    }
    let mode_line = text
        .lines()
        .find(|l| l.starts_with("orca_dataplane_mode{"))
        .unwrap_or_else(|| panic!("orca_dataplane_mode in /metrics:\n{text}"));
    assert!(
        mode_line.contains("mode=\"iptables\"") && mode_line.ends_with(" 1"),
        "iptables is the active mode: {mode_line}"
    );
    let syncs = sample(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap();
    let full = sample(&text, "kubeproxy_sync_full_proxy_rules_duration_seconds_count").unwrap();
    let partial = sample(&text, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count").unwrap();
    assert!(
        syncs >= full + partial,
        "every full and partial sync is a sync: {syncs} {full} {partial}"
    );

    // 3. /healthz and /livez: 200 with kube-proxy's JSON body and headers.
    let (code, headers, body) = curl(&node.netns, &healthz_url).unwrap_or_else(|e| panic!("/healthz: {e}"));
    assert_eq!(code, 200, "/healthz after a sync: {body}");
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/healthz body {body:?}: {e}"));
    // Healthy: the top-level lastUpdated is the time of the answer (kube-proxy takes it just after currentTime),
    // the IPv4 proxier's is its last sync, no later than that.
    let (last, current, synced) = (
        time_of(&v, "/lastUpdated"),
        time_of(&v, "/currentTime"),
        time_of(&v, "/status/IPv4/lastUpdated"),
    );
    let second = k8s_openapi::jiff::SignedDuration::from_secs(1);
    assert!(last >= current && last.duration_since(current) < second, "{body}");
    assert!(synced <= current, "{body}");
    assert_eq!(
        (v["nodeEligible"].as_bool(), v["healthy"].as_bool()),
        (Some(true), Some(true)),
        "{body}"
    );
    let (code, _, body) = curl(&node.netns, &format!("http://{healthz}/livez")).unwrap();
    assert_eq!(code, 200, "/livez: {body}");
    // Other paths are not found.
    let (code, _, _) = curl(&node.netns, &format!("http://{healthz}/nope")).unwrap();
    assert_eq!(code, 404);

    agent.check_running();
    drop(agent);
    sb.down().expect("sandbox down");
}

// ---------------------------------------------------------------------------------------------------------------
// /healthz when syncs stall and when the node is leaving, side by side with upstream kube-proxy.
// ---------------------------------------------------------------------------------------------------------------

/// Sync period of both proxies: kube-proxy's health timeout is twice that.
const SYNC_PERIOD: Duration = Duration::from_secs(2);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(4);
const KUBE_PROXY_LOG: &str = "kube-proxy-node-b";
const TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// kube-proxy's gauges of changes no sync has taken yet.
const PENDING: [&str; 2] = [
    "kubeproxy_sync_proxy_rules_service_changes_pending",
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
];

/// How syncs are stalled: a directory put first on both proxies' PATH, holding `iptables-restore`,
/// `iptables-nft-restore` and `iptables-legacy-restore` wrappers. While the flag file exists a wrapper waits (as a
/// restore waits behind a held xtables lock or a wedged kernel) and appends "<netns> <tool>" to the stall log; once
/// the flag is gone it execs the real binary with the same arguments and stdin, so the blocked sync completes. The
/// wait is bounded (300 s), so nothing hangs for ever; the guard removes the flag (releasing any waiter) and the
/// directory, also when the test fails.
struct Stall {
    dir: std::path::PathBuf,
}

impl Stall {
    fn new() -> Stall {
        let dir = std::env::temp_dir().join(format!("orca-stall-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("creating the wrapper directory");
        let stall = Stall { dir };
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut wrapped = 0;
        for tool in ["iptables-restore", "iptables-nft-restore", "iptables-legacy-restore"] {
            let Some(real) = std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file()) else {
                continue;
            };
            let script = format!(
                "#!/bin/sh\n\
                 # orca test: waits while {flag} exists (at most 300 s), then runs the real {tool}.\n\
                 if [ -e '{flag}' ]; then\n\
                 \x20 echo \"$(ip netns identify 2>/dev/null) {tool}\" >> '{log}'\n\
                 \x20 i=0\n\
                 \x20 while [ -e '{flag}' ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done\n\
                 fi\n\
                 exec '{real}' \"$@\"\n",
                flag = stall.flag().display(),
                log = stall.log().display(),
                real = real.display(),
            );
            let w = bin.join(tool);
            std::fs::write(&w, script).expect("writing a wrapper");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            wrapped += 1;
        }
        assert!(wrapped > 0, "no iptables-restore on PATH to wrap");
        stall
    }

    fn flag(&self) -> std::path::PathBuf {
        self.dir.join("stalled")
    }

    fn log(&self) -> std::path::PathBuf {
        self.dir.join("stall.log")
    }

    /// PATH with the wrappers first.
    fn path(&self) -> String {
        let rest = std::env::var("PATH").unwrap_or_default();
        format!("{}:{rest}", self.dir.join("bin").display())
    }

    fn block(&self) {
        std::fs::write(self.flag(), b"").expect("creating the stall flag");
    }

    fn release(&self) {
        let _ = std::fs::remove_file(self.flag());
    }

    /// Whether a restore in netns `ns` has waited on the flag.
    fn blocked_in(&self, ns: &str) -> bool {
        std::fs::read_to_string(self.log()).is_ok_and(|l| l.lines().any(|l| l.split_whitespace().next() == Some(ns)))
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        self.release();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// GET `url` from inside `ns`: the status code and the body as JSON.
fn get_json(ns: &str, url: &str) -> Result<(u16, Value), String> {
    let (code, headers, body) = curl(ns, url)?;
    if header(&headers, "content-type") != Some("application/json") {
        return Err(format!("HTTP {code} without a JSON content type: {headers:?} {body}"));
    }
    let v = serde_json::from_str(&body).map_err(|e| format!("HTTP {code} body {body:?}: {e}"))?;
    Ok((code, v))
}

/// Polls `probe` (every 200 ms) until it returns Some, failing after `limit` or when a proxy has exited.
fn wait_for<T>(
    agents: &mut [&mut Agent],
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        for a in agents.iter_mut() {
            a.check_running();
        }
        let last = match probe() {
            Ok(v) => return v,
            Err(e) => e,
        };
        if Instant::now() > deadline {
            let logs: Vec<String> = agents
                .iter()
                .map(|a| format!("--- {}:\n{}", a.log, log_of(a.log)))
                .collect();
            panic!(
                "timed out ({limit:?}) waiting for {what}; last: {last}\n{}",
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The key names of a JSON object (sorted), of its `status` (the IP families: both on the dual-stack sandbox),
/// and of its `status.IPv4` object.
fn shape(v: &Value) -> (Vec<String>, Vec<String>, Vec<String>) {
    let keys = |o: &Value| {
        let mut k: Vec<String> = o.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        k.sort();
        k
    };
    (keys(v), keys(&v["status"]), keys(&v["status"]["IPv4"]))
}

fn time_of(v: &Value, field: &str) -> k8s_openapi::jiff::Timestamp {
    let s = v
        .pointer(field)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{field} in {v}"));
    s.parse()
        .unwrap_or_else(|e| panic!("{field} {s:?} is not RFC 3339: {e}"))
}

/// An expected health answer: status code, `healthy`, and `nodeEligible` (None: absent).
type Want = (u16, bool, Option<bool>);

/// Waits until `url` answers as `want`, returning the body.
fn wait_answer(agents: &mut [&mut Agent], who: &str, ns: &str, url: &str, want: Want, limit: Duration) -> Value {
    let (code, healthy, eligible) = want;
    wait_for(agents, &format!("{who} {url} -> {code}"), limit, || {
        let (c, v) = get_json(ns, url)?;
        // kube-proxy answers healthy before its proxiers have registered their families (no `status` yet): wait
        // for both per-family entries too (the sandbox is dual-stack), which both agents show from their first
        // sync on.
        let ok = c == code
            && v["healthy"].as_bool() == Some(healthy)
            && v.get("nodeEligible").and_then(Value::as_bool) == eligible
            && v.pointer("/status/IPv4").is_some()
            && v.pointer("/status/IPv6").is_some();
        if ok {
            Ok(v)
        } else {
            Err(format!("HTTP {c} {v}"))
        }
    })
}

/// Waits until Orca's `url` in namespace `ns` and then kube-proxy's answer as `want` (each `(ns, url)`), watching both
/// agents; returns Orca's body and kube-proxy's.
fn wait_both(
    orca: &mut Agent,
    kp: &mut Agent,
    (orca_ns, orca_url): (&str, &str),
    (kp_ns, kp_url): (&str, &str),
    want: Want,
    limit: Duration,
) -> (Value, Value) {
    let o = wait_answer(&mut [&mut *orca, &mut *kp], "orca", orca_ns, orca_url, want, limit);
    let k = wait_answer(&mut [orca, kp], "kube-proxy", kp_ns, kp_url, want, limit);
    (o, k)
}

/// The events.k8s.io Events in `default` regarding Node `node` from `controller` with `reason`, waiting up to 30 s
/// for at least one.
async fn node_events(admin: &kube::Client, node: &str, controller: &str, reason: &str) -> Vec<K8sEvent> {
    let api: Api<K8sEvent> = Api::namespaced(admin.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = api.list(&ListParams::default()).await.expect("listing Events");
        let found: Vec<K8sEvent> = all
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(node)
                    && e.reporting_controller.as_deref() == Some(controller)
                    && e.reason.as_deref() == Some(reason)
            })
            .collect();
        if !found.is_empty() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} Event from {controller} about Node {node}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// What must be equal between kube-proxy's and Orca's Event: type, reason, action, note, and the reference to the
/// Node (apiVersion, kind, namespace; the name differs).
fn event_shape(e: &K8sEvent) -> Value {
    let r = e.regarding.clone().unwrap_or_default();
    json!({
        "type": e.type_, "reason": e.reason, "action": e.action, "note": e.note,
        "regarding": {"apiVersion": r.api_version, "kind": r.kind, "namespace": r.namespace},
        "namespace": e.metadata.namespace,
    })
}

async fn set_taint(nodes: &Api<Node>, name: &str, on: bool) {
    let taints = if on {
        json!([{"key": TAINT, "value": "1700000000", "effect": "NoSchedule"}])
    } else {
        Value::Null
    };
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"taints": taints}})),
        )
        .await
        .unwrap_or_else(|e| panic!("tainting {name} ({on}): {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_unhealthy_when_syncs_stall_and_when_the_node_leaves_like_kube_proxy() {
    if !should_run() {
        return;
    }
    let sb = Sandbox::up(SandboxOptions::default()).await.expect("sandbox up");
    let (a, b) = (
        sb.topology().node("node-a").expect("node-a").clone(),
        sb.topology().node("node-b").expect("node-b").clone(),
    );
    let kubeconfig = sb.kube_proxy_kubeconfig().to_str().expect("UTF-8 path").to_string();
    let stall = Stall::new();
    let sync_period = format!("{}s", SYNC_PERIOD.as_secs());
    let (a_healthz, b_healthz) = (format!("{}:{HEALTHZ_PORT}", a.ip), format!("{}:{HEALTHZ_PORT}", b.ip));
    let (a_metrics, b_metrics) = (format!("{}:{METRICS_PORT}", a.ip), format!("{}:{METRICS_PORT}", b.ip));

    // Orca in node-a, upstream kube-proxy in node-b: same credentials, sync period, and wrapped PATH.
    let mut cmd = orca_command(
        &a.netns,
        &kubeconfig,
        &a_healthz,
        &a_metrics,
        &["--proxy-mode", "iptables", "--sync-period", &sync_period],
    );
    cmd.env("PATH", stall.path());
    let mut orca = start_orca(&mut cmd);
    let kp_bin = sb.bin_dir().join("kube-proxy");
    let kp_args = [
        format!("--kubeconfig={kubeconfig}"),
        "--hostname-override=node-b".into(),
        "--proxy-mode=iptables".into(),
        "--cluster-cidr=10.244.0.0/16".into(),
        // Leave the machine-wide conntrack sysctls alone.
        "--conntrack-max-per-core=0".into(),
        "--conntrack-tcp-timeout-established=0".into(),
        "--conntrack-tcp-timeout-close-wait=0".into(),
        format!("--iptables-sync-period={sync_period}"),
        format!("--healthz-bind-address={b_healthz}"),
        format!("--metrics-bind-address={b_metrics}"),
        "-v=2".into(),
    ];
    let kp_args: Vec<&str> = kp_args.iter().map(String::as_str).collect();
    let mut cmd = netns::command_in(&b.netns, kp_bin.to_str().expect("UTF-8 path"), &kp_args);
    cmd.env("PATH", stall.path());
    let mut kp = Agent {
        child: netns::spawn_logged(&mut cmd, KUBE_PROXY_LOG).expect("starting kube-proxy in node-b"),
        log: KUBE_PROXY_LOG,
    };
    let (a_hz, a_lz) = (
        format!("http://{a_healthz}/healthz"),
        format!("http://{a_healthz}/livez"),
    );
    let (b_hz, b_lz) = (
        format!("http://{b_healthz}/healthz"),
        format!("http://{b_healthz}/livez"),
    );
    let (orca_hz, kp_hz) = ((a.netns.as_str(), a_hz.as_str()), (b.netns.as_str(), b_hz.as_str()));
    // How long the agents have to reach their first healthy answer, and to follow a change after that.
    let (long, soon) = (Duration::from_secs(90), Duration::from_secs(30));

    tokio::task::block_in_place(|| {
        // 1. Both healthy after their first sync; the same fields in /healthz and in /livez (no nodeEligible).
        let (o, k) = wait_both(&mut orca, &mut kp, orca_hz, kp_hz, (200, true, Some(true)), long);
        assert_eq!(shape(&o), shape(&k), "/healthz fields: orca {o} kube-proxy {k}");
        assert_eq!(shape(&o).1, ["IPv4", "IPv6"], "status families in {o}");
        assert!(!shape(&o).2.is_empty(), "status.IPv4 in {o}");
        let (code_o, lo) = get_json(&a.netns, &a_lz).expect("orca /livez");
        let (code_k, lk) = get_json(&b.netns, &b_lz).expect("kube-proxy /livez");
        assert_eq!((code_o, code_k), (200, 200), "{lo} {lk}");
        assert_eq!(shape(&lo), shape(&lk), "/livez fields: orca {lo} kube-proxy {lk}");
        assert!(lo.get("nodeEligible").is_none(), "{lo}");
        // Healthy: the top-level lastUpdated is "now" (kube-proxy's compatibility rule), the family's the last sync.
        assert!(
            time_of(&o, "/lastUpdated") >= time_of(&o, "/status/IPv4/lastUpdated"),
            "{o}"
        );
    });

    // 1b. Both recorded kube-proxy's birth cry on their Node: the same Event but for the reporting controller.
    let admin = sb.admin_client();
    let ours = node_events(&admin, "node-a", "orca-proxy", "Starting").await;
    let theirs = node_events(&admin, "node-b", "kube-proxy", "Starting").await;
    assert_eq!(
        event_shape(&ours[0]),
        event_shape(&theirs[0]),
        "orca {:?}\nkube-proxy {:?}",
        ours[0],
        theirs[0]
    );
    assert_eq!(ours[0].type_.as_deref(), Some("Normal"));
    assert_eq!(ours[0].action.as_deref(), Some("StartKubeProxy"));
    assert!(
        ours[0]
            .reporting_instance
            .as_deref()
            .is_some_and(|i| i.starts_with("orca-proxy-")),
        "{:?}",
        ours[0]
    );

    // 2. Syncs stall with nothing queued: still healthy (kube-proxy's rule only counts queued changes).
    stall.block();
    tokio::task::block_in_place(|| {
        wait_for(
            &mut [&mut orca, &mut kp],
            "orca's periodic sync to block in iptables-restore",
            Duration::from_secs(20),
            || {
                stall
                    .blocked_in(&a.netns)
                    .then_some(())
                    .ok_or_else(|| "not yet".to_string())
            },
        );
        std::thread::sleep(HEALTH_TIMEOUT + Duration::from_secs(1));
        let (code, v) = get_json(&a.netns, &a_hz).expect("orca /healthz");
        assert_eq!(code, 200, "a stalled sync with nothing queued is healthy: {v}");
    });

    // 3. A change while syncs stall: healthy until it has waited the health timeout, then 503 (also /livez).
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "stall-probe", "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    let changed_at = Instant::now();
    let cluster_ip = Api::<Service>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &svc)
        .await
        .expect("create Service")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a ClusterIP");
    tokio::task::block_in_place(|| {
        std::thread::sleep(Duration::from_millis(500));
        let (code, v) = get_json(&a.netns, &a_hz).expect("orca /healthz");
        assert!(
            code == 200 || changed_at.elapsed() >= HEALTH_TIMEOUT,
            "queued but not yet late is healthy: {v}"
        );
        let o = wait_answer(
            &mut [&mut orca, &mut kp],
            "orca",
            &a.netns,
            &a_hz,
            (503, false, Some(true)),
            soon,
        );
        let waited = changed_at.elapsed();
        eprintln!("orca /healthz turned 503 {waited:?} after the change (health timeout {HEALTH_TIMEOUT:?})");
        assert!(
            waited >= HEALTH_TIMEOUT - Duration::from_millis(300),
            "503 only after the change waited the health timeout (2 x sync period); it came after {waited:?}"
        );
        let k = wait_answer(
            &mut [&mut orca, &mut kp],
            "kube-proxy",
            &b.netns,
            &b_hz,
            (503, false, Some(true)),
            soon,
        );
        assert!(
            stall.blocked_in(&b.netns),
            "kube-proxy's restore waited on the flag too"
        );
        eprintln!("stalled /healthz: orca {o}\n                  kube-proxy {k}");
        assert_eq!(
            shape(&o),
            shape(&k),
            "unhealthy /healthz fields: orca {o} kube-proxy {k}"
        );
        // Unhealthy: lastUpdated is the last successful sync, before the change, and equals the family's.
        assert_eq!(o["lastUpdated"], o["status"]["IPv4"]["lastUpdated"], "{o}");
        assert_eq!(o["status"]["IPv4"]["healthy"], false, "{o}");
        let (last, now) = (time_of(&o, "/lastUpdated"), time_of(&o, "/currentTime"));
        assert!(
            now.duration_since(last) >= k8s_openapi::jiff::SignedDuration::try_from(HEALTH_TIMEOUT).unwrap(),
            "the last sync is older than the timeout: {o}"
        );
        let (lc, lv) = get_json(&a.netns, &a_lz).expect("orca /livez");
        assert_eq!(
            (lc, lv["healthy"].as_bool()),
            (503, Some(false)),
            "/livez fails on a stall too: {lv}"
        );
        let (kc, _) = get_json(&b.netns, &b_lz).expect("kube-proxy /livez");
        assert_eq!(kc, 503, "kube-proxy's /livez fails on a stall");
        let (_, _, text) = curl(&a.netns, &format!("http://{a_metrics}/metrics")).expect("orca /metrics");
        assert!(
            text.lines()
                .any(|l| l.starts_with("kubeproxy_proxy_healthz_total{code=\"503\"} ")),
            "the 503s are counted:\n{text}"
        );
        // The Service no sync has taken is pending (it has no EndpointSlice). kube-proxy's gauge counts it until a
        // sync checks it out, as Orca's does; whether kube-proxy's own stalled sync started before or after the
        // change is a matter of timing, so only Orca's value is exact here.
        let (_, _, kp_text) = curl(&b.netns, &format!("http://{b_metrics}/metrics")).expect("kube-proxy /metrics");
        for series in PENDING {
            let want = Some(if series.contains("service") { 1.0 } else { 0.0 });
            assert_eq!(sample(&text, series), want, "orca's {series} while the Service waits");
            assert!(
                matches!(sample(&kp_text, series), Some(v) if v == 0.0 || v == 1.0),
                "kube-proxy exports {series} too"
            );
        }
    });

    // 4. Syncs resume: the blocked restore completes, both turn healthy, and the change is programmed.
    let released = k8s_openapi::jiff::Timestamp::now();
    stall.release();
    tokio::task::block_in_place(|| {
        let (o, _) = wait_both(&mut orca, &mut kp, orca_hz, kp_hz, (200, true, Some(true)), soon);
        assert!(
            time_of(&o, "/status/IPv4/lastUpdated") >= released,
            "a sync after the release: {o}"
        );
        let (code, _) = get_json(&a.netns, &a_lz).expect("orca /livez");
        assert_eq!(code, 200);
        // A Service without endpoints: its ClusterIP is rejected in the filter table, as kube-proxy does.
        let rules = netns::exec(&a.netns, &["iptables-save"]).expect("iptables-save in node-a");
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(
            rules.contains(&format!("-d {cluster_ip}/32")),
            "the stalled change reached node-a's rules:\n{rules}"
        );
        // Taken by a sync: nothing pending in either agent.
        let (_, _, text) = curl(&a.netns, &format!("http://{a_metrics}/metrics")).expect("orca /metrics");
        let (_, _, kp_text) = curl(&b.netns, &format!("http://{b_metrics}/metrics")).expect("kube-proxy /metrics");
        for series in PENDING {
            assert_eq!(
                (sample(&text, series), sample(&kp_text, series)),
                (Some(0.0), Some(0.0)),
                "{series} after the sync: orca, kube-proxy"
            );
        }
    });

    // 5. The Cluster Autoscaler's ToBeDeleted taint: /healthz 503 with nodeEligible false, /livez 200; untainted, 200.
    let nodes: Api<Node> = Api::all(admin.clone());
    set_taint(&nodes, "node-a", true).await;
    set_taint(&nodes, "node-b", true).await;
    tokio::task::block_in_place(|| {
        let (o, k) = wait_both(&mut orca, &mut kp, orca_hz, kp_hz, (503, true, Some(false)), soon);
        assert_eq!(
            shape(&o),
            shape(&k),
            "ineligible /healthz fields: orca {o} kube-proxy {k}"
        );
        for (ns, url) in [(&a.netns, &a_lz), (&b.netns, &b_lz)] {
            let (code, v) = get_json(ns, url).expect("/livez");
            assert_eq!(code, 200, "{url} ignores node eligibility: {v}");
            assert!(v.get("nodeEligible").is_none(), "{v}");
        }
    });
    set_taint(&nodes, "node-a", false).await;
    set_taint(&nodes, "node-b", false).await;
    tokio::task::block_in_place(|| {
        wait_both(&mut orca, &mut kp, orca_hz, kp_hz, (200, true, Some(true)), soon);
    });

    // 6. The Node is being deleted (a finalizer holds it with its deletionTimestamp set): the same as the taint.
    const HOLD: &str = "orca.dev/test-hold";
    for n in ["node-a", "node-b"] {
        nodes
            .patch(
                n,
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"finalizers": [HOLD]}})),
            )
            .await
            .unwrap_or_else(|e| panic!("finalizer on {n}: {e}"));
        nodes
            .delete(n, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("deleting {n}: {e}"));
    }
    tokio::task::block_in_place(|| {
        wait_both(&mut orca, &mut kp, orca_hz, kp_hz, (503, true, Some(false)), soon);
        let (code, _) = get_json(&a.netns, &a_lz).expect("orca /livez");
        assert_eq!(code, 200, "/livez ignores a Node being deleted");
    });
    // Let the deletion finish (kube-proxy exits when its Node is deleted; Orca stays unready without a Node).
    for n in ["node-a", "node-b"] {
        let _ = nodes
            .patch(
                n,
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"finalizers": null}})),
            )
            .await;
    }
    tokio::task::block_in_place(|| {
        wait_answer(
            &mut [&mut orca],
            "orca",
            &a.netns,
            &a_hz,
            (503, true, Some(false)),
            soon,
        );
    });

    orca.check_running();
    drop(orca);
    drop(kp);
    drop(stall);
    sb.down().expect("sandbox down");
}

/// Events: a Normal Starting Event at start, and a Warning DataplaneFallback Event with the reason when eBPF cannot
/// run. eBPF is made to fail for real, without touching anything: `--bpf-root` lies below a regular file, so the
/// agent cannot create its pin directory and falls back to iptables (in node-a's namespace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_on_start_and_on_dataplane_fallback() {
    if !should_run() {
        return;
    }
    let sb = Sandbox::up(SandboxOptions::default()).await.expect("sandbox up");
    let node = sb.topology().node("node-a").expect("node-a").clone();
    let kubeconfig = sb.kube_proxy_kubeconfig().to_str().expect("UTF-8 path").to_string();
    struct RemoveFile(std::path::PathBuf);
    impl Drop for RemoveFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let file = RemoveFile(std::env::temp_dir().join(format!("orca-not-a-dir-{}", std::process::id())));
    std::fs::write(&file.0, b"a regular file, so no bpffs pins can go below it\n").expect("writing the file");
    let bpf_root = file.0.join("bpf");
    let (healthz, metrics) = (
        format!("{}:{HEALTHZ_PORT}", node.ip),
        format!("{}:{METRICS_PORT}", node.ip),
    );
    let started = k8s_openapi::jiff::Timestamp::now();
    let mut agent = start_orca(&mut orca_command(
        &node.netns,
        &kubeconfig,
        &healthz,
        &metrics,
        &[
            "--proxy-mode",
            "ebpf",
            "--bpf-root",
            bpf_root.to_str().expect("UTF-8 path"),
        ],
    ));
    let admin = sb.admin_client();

    // The fallback, with its reason, as a Warning Event and in the mode metric.
    let fallback = node_events(&admin, "node-a", "orca-proxy", "DataplaneFallback").await;
    agent.check_running();
    let e = &fallback[0];
    assert_eq!(e.type_.as_deref(), Some("Warning"), "{e:?}");
    assert_eq!(e.action.as_deref(), Some("StartKubeProxy"), "{e:?}");
    let note = e.note.as_deref().unwrap_or_default();
    assert!(
        note.starts_with("eBPF dataplane unavailable, using iptables: ") && note.contains(bpf_root.to_str().unwrap()),
        "the note names the failure: {note:?}"
    );
    let text = tokio::task::block_in_place(|| {
        scrape_until(
            &mut agent,
            &node.netns,
            &format!("http://{metrics}/metrics"),
            "the first sync",
            |t| sample(t, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").is_some_and(|v| v > 0.0),
        )
    });
    let mode = text
        .lines()
        .find(|l| l.starts_with("orca_dataplane_mode{"))
        .unwrap_or_else(|| panic!("orca_dataplane_mode in:\n{text}"));
    assert!(
        mode.contains("mode=\"iptables\"") && mode.contains(bpf_root.to_str().unwrap()) && mode.ends_with(" 1"),
        "{mode}"
    );

    // The birth cry, regarding the Node as kube-proxy's does, recorded by this run.
    let starting = node_events(&admin, "node-a", "orca-proxy", "Starting").await;
    let e = &starting[0];
    let r = e.regarding.clone().unwrap_or_default();
    assert_eq!(
        (r.api_version.as_deref(), r.kind.as_deref(), r.namespace.as_deref()),
        (Some("v1"), Some("Node"), None),
        "{e:?}"
    );
    assert_eq!((e.type_.as_deref(), e.note.as_deref()), (Some("Normal"), None), "{e:?}");
    let at = e.event_time.as_ref().map(|t| t.0).expect("eventTime");
    assert!(at >= started - k8s_openapi::jiff::SignedDuration::from_secs(1), "{e:?}");
    assert_eq!(e.metadata.namespace.as_deref(), Some("default"));

    agent.check_running();
    drop(agent);
    drop(file);
    sb.down().expect("sandbox down");
}

/// An eBPF agent that runs without what it needs from the node says so at start: a log line, a Warning
/// DataplaneDegraded Event per missing piece and `orca_dataplane_degraded{reason} 1`. Started through `ip netns exec`
/// with its pins below `/sys/fs/bpf` (a fresh sysfs private to the agent: the bpffs it mounts there dies with it)
/// and no `--ebpf-cgroup-root` (the only cgroup2 mount it finds is the sandbox's node subtree, not the hierarchy's
/// root). Started as the sandbox (and the DaemonSet) runs it, with a bpffs that outlives it and the node's cgroup,
/// nothing is reported and `status` shows the socket hooks attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_without_a_persistent_bpffs_or_the_cgroup_root_warns_at_start() {
    if !should_run() {
        return;
    }
    let sb = Sandbox::up(SandboxOptions::default()).await.expect("sandbox up");
    let node = sb.topology().node("node-a").expect("node-a").clone();
    let kubeconfig = sb.kube_proxy_kubeconfig().to_str().expect("UTF-8 path").to_string();
    let (healthz, metrics) = (
        format!("{}:{HEALTHZ_PORT}", node.ip),
        format!("{}:{METRICS_PORT}", node.ip),
    );
    let admin = sb.admin_client();
    let mut agent = start_orca(&mut orca_command(
        &node.netns,
        &kubeconfig,
        &healthz,
        &metrics,
        &[
            "--proxy-mode",
            "ebpf",
            "--no-fallback",
            "--bpf-root",
            "/sys/fs/bpf/orca-private",
        ],
    ));
    // node_events waits for the first; the second may follow a moment later.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (events, notes) = loop {
        let all = node_events(&admin, "node-a", "orca-proxy", "DataplaneDegraded").await;
        let mut notes: Vec<String> = all.iter().filter_map(|e| e.note.clone()).collect();
        notes.sort();
        if notes.len() >= 2 || Instant::now() > deadline {
            break (all, notes);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        events.iter().all(|e| e.type_.as_deref() == Some("Warning")),
        "{events:?}"
    );
    assert_eq!(notes.len(), 2, "one Event per missing piece: {notes:?}");
    assert!(
        notes[0].starts_with("BpffsNotPersistent: ") && notes[0].contains("/sys/fs/bpf"),
        "{notes:?}"
    );
    assert!(
        notes[1].starts_with("CgroupNotRoot: ") && notes[1].contains("/run/orca-sandbox/cgroup2"),
        "{notes:?}"
    );
    let text = tokio::task::block_in_place(|| {
        scrape_until(
            &mut agent,
            &node.netns,
            &format!("http://{metrics}/metrics"),
            "the degraded gauges",
            |t| t.contains("orca_dataplane_degraded{"),
        )
    });
    let mut degraded: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("orca_dataplane_degraded{"))
        .collect();
    degraded.sort();
    assert_eq!(
        degraded,
        [
            "orca_dataplane_degraded{reason=\"BpffsNotPersistent\"} 1",
            "orca_dataplane_degraded{reason=\"CgroupNotRoot\"} 1"
        ],
        "{text}"
    );
    let log = agent_log();
    assert!(
        log.contains("BpffsNotPersistent") && log.contains("dies with it") && log.contains("CgroupNotRoot"),
        "{log}"
    );
    agent.check_running();
    drop(agent);

    // As the sandbox and the DaemonSet run it: nothing to report, and the hooks attached in the node's cgroup.
    let (root, cgroup) = (
        orca_sandbox::hostfs::node_bpf_root("node-a"),
        orca_sandbox::hostfs::node_cgroup("node-a"),
    );
    let (root, cgroup) = (root.to_str().unwrap(), cgroup.to_str().unwrap());
    let mut agent = start_orca(&mut orca_command(
        &node.netns,
        &kubeconfig,
        &healthz,
        &metrics,
        &[
            "--proxy-mode",
            "ebpf",
            "--no-fallback",
            "--bpf-root",
            root,
            "--ebpf-cgroup-root",
            cgroup,
        ],
    ));
    let text = tokio::task::block_in_place(|| {
        scrape_until(
            &mut agent,
            &node.netns,
            &format!("http://{metrics}/metrics"),
            "the first sync",
            |t| sample(t, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").is_some_and(|v| v > 0.0),
        )
    });
    assert!(!text.contains("orca_dataplane_degraded{"), "{text}");
    let out = netns::exec(
        &node.netns,
        &[
            env!("CARGO_BIN_EXE_orca-proxy"),
            "status",
            "--kubeconfig",
            &kubeconfig,
            "--hostname-override",
            "node-a",
            "--bpf-root",
            root,
        ],
    )
    .expect("orca-proxy status");
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("host clients\tsocket hooks attached (8 programs, cgroup id "),
        "{status}"
    );
    agent.check_running();
    drop(agent);
    let _ = netns::exec(
        &node.netns,
        &[env!("CARGO_BIN_EXE_orca-proxy"), "cleanup", "--bpf-root", root],
    );
    sb.down().expect("sandbox down");
}
