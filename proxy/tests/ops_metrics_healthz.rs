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

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
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

/// The agent process; stopped (SIGTERM, then SIGKILL after 5 s) when dropped, also when the test panics.
struct Agent {
    child: Child,
}

impl Agent {
    /// Fails with the agent's log when it has exited.
    fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("orca-proxy exited ({status}) in node-a; its log:\n{}", agent_log());
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        netns::terminate(&[self.child.id()], Duration::from_secs(5));
        let _ = self.child.wait();
    }
}

fn agent_log() -> String {
    let path = netns::log_dir().join(format!("{LOG_NAME}.log"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()))
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
    let bin = env!("CARGO_BIN_EXE_orca-proxy");
    let argv = [
        bin,
        "--proxy-mode",
        "iptables",
        "--hostname-override",
        "node-a",
        "--kubeconfig",
        kubeconfig.to_str().expect("UTF-8 path"),
        "--healthz-bind-address",
        &healthz,
        "--metrics-bind-address",
        &metrics,
        "--cluster-cidr",
        "10.244.0.0/16",
        "-v",
        "2",
    ];
    // Declared after `sb`: dropped (agent stopped) before the sandbox is torn down.
    let mut agent = Agent {
        child: netns::spawn(&node.netns, &argv, LOG_NAME).expect("starting orca-proxy in node-a"),
    };
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
    let last_updated = v["lastUpdated"].as_str().expect("lastUpdated");
    assert!(
        !last_updated.starts_with("0001-"),
        "lastUpdated is the last sync: {body}"
    );
    let parsed: k8s_openapi::jiff::Timestamp = last_updated.parse().expect("lastUpdated is RFC 3339");
    let current: k8s_openapi::jiff::Timestamp = v["currentTime"].as_str().expect("currentTime").parse().unwrap();
    assert!(parsed <= current, "{body}");
    assert_eq!(v["nodeEligible"], true, "{body}");
    let (code, _, body) = curl(&node.netns, &format!("http://{healthz}/livez")).unwrap();
    assert_eq!(code, 200, "/livez: {body}");
    // Other paths are not found.
    let (code, _, _) = curl(&node.netns, &format!("http://{healthz}/nope")).unwrap();
    assert_eq!(code, 404);

    agent.check_running();
    drop(agent);
    sb.down().expect("sandbox down");
}
