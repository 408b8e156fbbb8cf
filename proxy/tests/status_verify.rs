//! `orca-proxy status --verify` against the sandbox: an agent in node-a programs a ClusterIP; verify agrees with
//! the apiserver; a rule deleted by hand is reported as drift with a non-zero exit.
//!
//! Needs root and the sandbox's control-plane binaries (skipped with a message only when both the binaries and
//! ORCA_REQUIRE_SANDBOX are absent).

use std::process::{Child, Output};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use orca_sandbox::{build, netns, Sandbox, SandboxOptions};
use serde_json::json;

const LOG_NAME: &str = "orca-proxy-verify-node-a";

fn should_run() -> bool {
    if std::env::var_os("ORCA_REQUIRE_SANDBOX").is_some() || build::binaries_present() {
        return true;
    }
    eprintln!("SKIPPED: no control-plane binaries and ORCA_REQUIRE_SANDBOX unset; run `cargo xtask setup`");
    false
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        netns::terminate(&[self.0.id()], Duration::from_secs(5));
        let _ = self.0.wait();
        // Leave node-a's tables as we found them for the next test on this sandbox.
        let _ = netns::exec(
            "orca-node-a",
            &[
                env!("CARGO_BIN_EXE_orca-proxy"),
                "cleanup",
                "--bpf-root",
                "/nonexistent",
            ],
        );
    }
}

fn verify(kubeconfig: &str) -> Output {
    netns::command_in(
        "orca-node-a",
        env!("CARGO_BIN_EXE_orca-proxy"),
        &[
            "status",
            "--verify",
            "--kubeconfig",
            kubeconfig,
            "--hostname-override",
            "node-a",
            "--bpf-root",
            "/nonexistent",
        ],
    )
    .output()
    .expect("running orca-proxy status")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_a_rule_deleted_by_hand() {
    if !should_run() {
        return;
    }
    let sb = Sandbox::up(SandboxOptions::default()).await.expect("sandbox up");
    let client = sb.admin_client();
    let kubeconfig = sb.kube_proxy_kubeconfig();
    let kubeconfig = kubeconfig.to_str().unwrap();
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "verify-me", "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    let svc = svcs.create(&PostParams::default(), &svc).await.unwrap();
    let cluster_ip = svc.spec.unwrap().cluster_ip.unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "verify-me-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "verify-me"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["10.244.1.50"], "nodeName": "node-a"}, {"addresses": ["10.244.2.50"], "nodeName": "node-b"}]
    }))
    .unwrap();
    slices.create(&PostParams::default(), &slice).await.unwrap();

    // A long sync period: the agent must not repair the hand-made damage before verify looks.
    let argv = [
        env!("CARGO_BIN_EXE_orca-proxy"),
        "--proxy-mode",
        "iptables",
        "--hostname-override",
        "node-a",
        "--kubeconfig",
        kubeconfig,
        "--healthz-bind-address",
        "",
        "--metrics-bind-address",
        "",
        "--sync-period",
        "1h",
    ];
    let _agent = Agent(netns::spawn("orca-node-a", &argv, LOG_NAME).expect("orca-proxy in node-a"));

    // Wait until verify agrees (the agent has synced the Service with both endpoints).
    let deadline = Instant::now() + Duration::from_secs(60);
    let ok = loop {
        let o = tokio::task::block_in_place(|| verify(kubeconfig));
        if o.status.success() {
            break o;
        }
        assert!(Instant::now() < deadline, "verify never agreed: {}", text(&o));
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(text(&ok).contains("match the desired state"), "{}", text(&ok));

    // Delete the ClusterIP's dispatch rule by hand.
    let save = netns::exec("orca-node-a", &["iptables-save", "-t", "nat"]).expect("iptables-save");
    let save = String::from_utf8_lossy(&save.stdout).to_string();
    let rule = save
        .lines()
        .find(|l| l.starts_with("-A ORCA-SERVICES") && l.contains(&format!("{cluster_ip}/32")))
        .unwrap_or_else(|| panic!("no ORCA-SERVICES rule for {cluster_ip} in:\n{save}"));
    let mut del = vec!["iptables", "-w", "-t", "nat", "-D"];
    let spec = rule.trim_start_matches("-A ").to_string();
    let words = shell_words(&spec);
    del.extend(words.iter().map(String::as_str));
    let out = netns::exec("orca-node-a", &del).expect("iptables -D");
    assert!(
        out.status.success(),
        "deleting {rule}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let o = tokio::task::block_in_place(|| verify(kubeconfig));
    assert!(
        !o.status.success(),
        "verify must fail after a rule was deleted: {}",
        text(&o)
    );
    assert!(
        text(&o).contains(&format!("{cluster_ip}:80/TCP: missing from the kernel")),
        "{}",
        text(&o)
    );
    drop(_agent);
    sb.down().expect("teardown");
}

/// Splits an iptables-save rule into words, keeping quoted comments whole (without the quotes).
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}
