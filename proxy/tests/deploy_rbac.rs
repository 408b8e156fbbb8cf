//! deploy/: the manifests against the agent and against a real kube-apiserver.
//!
//! * Without the sandbox: the manifest holds exactly the expected objects; the ConfigMap's KubeProxyConfiguration
//!   is accepted by the agent's config parser; the DaemonSet's command line is one orca-proxy accepts and its probes
//!   hit the healthz port the agent binds; the Dockerfile's pin extraction still finds the pins.
//! * With the sandbox: every object passes the apiserver's validation and admission (server-side apply, dry run);
//!   Bidirectional propagation on an unprivileged container is rejected (why the manifest uses HostToContainer);
//!   then the ServiceAccount, ClusterRole and binding are created for real, a token is requested for the
//!   ServiceAccount, and with that token `orca-proxy status` lists what it needs, the agent's watchers list and
//!   watch, the agent itself (the DaemonSet's command line and config file, iptables mode, in node-a) syncs, events
//!   can be recorded -- and secrets, pods, writes to Services, EndpointSlices and Nodes are Forbidden.
//!
//! The sandbox part needs root and the sandbox's control-plane binaries; it is skipped (with a message) only when the
//! binaries are absent and ORCA_REQUIRE_SANDBOX is unset.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use orca_proxy::cli::Cli;
use orca_proxy::dataplane::ProxyMode;
use orca_proxy::model::tracker::ChangeTracker;
use orca_proxy::model::NodeInfo;
use orca_proxy::settings::Settings;
use orca_proxy::watch::{self, WatchState};
use orca_sandbox::{build, Sandbox, SandboxOptions};
use serde::Deserialize;
use serde_json::{json, Value};

const FIELD_MANAGER: &str = "orca-deploy-test";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("proxy/ has a parent")
        .to_path_buf()
}

/// Every document of deploy/orca-proxy.yaml, as JSON (empty documents skipped).
fn manifests() -> Vec<Value> {
    let path = repo_root().join("deploy/orca-proxy.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if !v.is_null() {
            docs.push(v);
        }
    }
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/orca-proxy.yaml"))
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn should_run_sandbox() -> bool {
    if std::env::var_os("ORCA_REQUIRE_SANDBOX").is_some() || build::binaries_present() {
        return true;
    }
    eprintln!("SKIPPED: no control-plane binaries and ORCA_REQUIRE_SANDBOX unset; run `cargo xtask setup`");
    false
}

#[test]
fn manifests_agree_with_the_agent() {
    let docs = manifests();
    let mut kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "ServiceAccount"
        ],
        "the objects of deploy/orca-proxy.yaml"
    );
    for d in &docs {
        let namespaced = !matches!(d["kind"].as_str(), Some("ClusterRole" | "ClusterRoleBinding"));
        let ns = d["metadata"]["namespace"].as_str();
        if namespaced {
            assert_eq!(ns, Some("kube-system"), "{} lives in kube-system", d["kind"]);
        } else {
            assert_eq!(ns, None, "{} is cluster-scoped", d["kind"]);
        }
    }

    // The ConfigMap's file is one the agent accepts, in eBPF mode with the orca section read.
    let cm = find(&docs, "ConfigMap");
    let conf = cm["data"]["config.conf"].as_str().expect("ConfigMap data config.conf");
    let file = orca_proxy::config::parse(conf).unwrap_or_else(|e| panic!("config.conf rejected: {e:#}"));
    assert_eq!(file.mode, Some(ProxyMode::Ebpf));
    assert_eq!(file.bpf_root.as_deref(), Some(Path::new("/sys/fs/bpf/orca")));
    assert_eq!(file.no_fallback, Some(false));
    assert_eq!(file.cgroup_root.as_deref(), Some(Path::new("/run/orca/cgroupv2")));

    // The DaemonSet's command line parses, with the config file mounted where --config points.
    let ds = find(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let mount = c["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "config"))
        .expect("config mount");
    let mount_path = mount["mountPath"].as_str().expect("config mountPath");
    let mut argv = str_list(&c["command"]);
    let args = str_list(&c["args"]);
    assert!(
        args.contains(&format!("--config={mount_path}/config.conf")),
        "--config points into the ConfigMap mount: {args:?}"
    );
    assert!(
        args.contains(&"--hostname-override=$(NODE_NAME)".to_string()),
        "node name from the downward API: {args:?}"
    );
    let env = &c["env"][0];
    assert_eq!(env["name"], "NODE_NAME");
    assert_eq!(env["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    let tmp = TempDir::new("cfg");
    let conf_path = tmp.path().join("config.conf");
    std::fs::write(&conf_path, conf).unwrap();
    // The kubelet expands $(NODE_NAME); the ConfigMap is mounted at mount_path.
    argv.extend(args.iter().map(|a| {
        a.replace("$(NODE_NAME)", "node-a")
            .replace(&format!("{mount_path}/config.conf"), conf_path.to_str().unwrap())
    }));
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("orca-proxy rejects {argv:?}: {e}"));
    let settings = Settings::from_flags(&cli.flags).unwrap_or_else(|e| panic!("settings from {argv:?}: {e:#}"));
    assert_eq!(settings.node_name, "node-a");
    assert_eq!(settings.mode, ProxyMode::Ebpf);
    let healthz = settings.healthz.expect("healthz enabled");
    assert_eq!(healthz.port(), 10256);
    assert!(healthz.ip().is_unspecified(), "kubelet probes the node IP: {healthz}");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], healthz.port());
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], healthz.port());

    // How it runs on the node.
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "orca-proxy");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(str_list(&sc["capabilities"]["drop"]), ["ALL"]);
    let mut caps = str_list(&sc["capabilities"]["add"]);
    caps.sort();
    assert_eq!(caps, ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON", "SYS_RESOURCE"]);
    let volumes = pod["volumes"].as_array().expect("volumes");
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["hostPath"]["path"].as_str())
            .map(str::to_string)
    };
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    for (vol, path) in [
        ("bpffs", "/sys/fs/bpf"),
        ("xtables-lock", "/run/xtables.lock"),
        ("lib-modules", "/lib/modules"),
    ] {
        assert_eq!(host_path(vol).as_deref(), Some(path), "hostPath of {vol}");
        let m = mounts
            .iter()
            .find(|m| m["name"] == vol)
            .unwrap_or_else(|| panic!("no mount of {vol}"));
        assert_eq!(m["mountPath"], path);
    }
    let modules = mounts.iter().find(|m| m["name"] == "lib-modules").unwrap();
    assert_eq!(modules["readOnly"], true);
    // The host's cgroup2 root, where the agent's config points the socket hooks.
    assert_eq!(host_path("cgroupv2").as_deref(), Some("/sys/fs/cgroup"));
    let cg = mounts
        .iter()
        .find(|m| m["name"] == "cgroupv2")
        .expect("no mount of cgroupv2");
    assert_eq!(
        (&cg["mountPath"], &cg["mountPropagation"], &cg["readOnly"]),
        (&json!("/run/orca/cgroupv2"), &json!("HostToContainer"), &json!(true))
    );
}

#[test]
fn dockerfile_pins_resolve() {
    // The Dockerfile reads the toolchain pins with sed; run its three extractions against the real files.
    let root = repo_root();
    let docker = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    let lines: Vec<&str> = docker
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("=$(sed -n "))
        .collect();
    assert_eq!(lines.len(), 3, "host, nightly and bpf-linker pins: {lines:?}");
    let script = format!(
        "set -eu\n{}\nprintf '%s\\n%s\\n%s\\n' \"$host\" \"$nightly\" \"$linker\"\n",
        lines.join("\n")
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = String::from_utf8_lossy(&out.stdout).to_string();
    let got: Vec<&str> = got.lines().collect();
    let toolchain = std::fs::read_to_string(root.join("rust-toolchain.toml")).unwrap();
    assert!(
        toolchain.contains(&format!("channel = \"{}\"", got[0])) && !got[0].is_empty(),
        "{got:?}"
    );
    let setup = std::fs::read_to_string(root.join("xtask/src/setup.rs")).unwrap();
    assert!(
        !got[1].is_empty() && setup.contains(&format!("NIGHTLY: &str = \"{}\"", got[1])),
        "{got:?}"
    );
    assert!(
        !got[2].is_empty() && setup.contains(&format!("BPF_LINKER_VERSION: &str = \"{}\"", got[2])),
        "{got:?}"
    );
    // The runtime stage carries the tools the dataplanes and cleanup run.
    let runtime = docker.rsplit("FROM ").next().unwrap();
    assert!(runtime.starts_with("debian:12-slim"), "{runtime}");
    for tool in ["iptables", "nftables", "conntrack", "iproute2"] {
        assert!(runtime.contains(tool), "runtime stage installs {tool}");
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!("orca-deploy-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The DaemonSet's command line for node-a, with the ConfigMap's file at `conf_path`.
fn daemonset_argv(docs: &[Value], conf_path: &Path) -> Vec<String> {
    let c = &find(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    let mount = c["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "config"))
        .and_then(|m| m["mountPath"].as_str())
        .expect("config mount");
    let mut argv = str_list(&c["command"]);
    argv.extend(str_list(&c["args"]).iter().map(|a| {
        a.replace("$(NODE_NAME)", "node-a")
            .replace(&format!("{mount}/config.conf"), conf_path.to_str().unwrap())
    }));
    argv
}

/// An agent process; stopped (SIGTERM, then SIGKILL) when dropped, also when the test panics.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        orca_sandbox::netns::terminate(&[self.0.id()], Duration::from_secs(5));
        let _ = self.0.wait();
    }
}

fn agent_log(name: &str) -> String {
    let path = orca_sandbox::netns::log_dir().join(format!("{name}.log"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()))
}

/// `curl` inside `ns`: (HTTP status, body); None when nothing answered. Bounded to 5 s.
fn curl(ns: &str, url: &str) -> Option<(u16, String)> {
    let out = orca_sandbox::netns::command_in(ns, "curl", &["-sS", "--max-time", "5", "-w", "\n%{http_code}", url])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_string()))
}

fn gvk_of(obj: &Value) -> GroupVersionKind {
    let api_version = obj["apiVersion"].as_str().expect("apiVersion");
    let kind = obj["kind"].as_str().expect("kind");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, kind)
}

/// Server-side apply of one manifest object; `dry_run` asks the apiserver to validate and admit it only.
async fn apply(client: &kube::Client, obj: &Value, dry_run: bool) -> Result<DynamicObject, kube::Error> {
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk_of(obj)).await?;
    let name = obj["metadata"]["name"].as_str().expect("metadata.name");
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            obj["metadata"]["namespace"].as_str().unwrap_or("default"),
            &ar,
        ),
        Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    let mut pp = PatchParams::apply(FIELD_MANAGER).force();
    if dry_run {
        pp = pp.dry_run();
    }
    api.patch(name, &pp, &Patch::Apply(obj)).await
}

fn code_of<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> Option<u16> {
    match r {
        Ok(_) => None,
        Err(kube::Error::Api(s)) => Some(s.code),
        Err(e) => panic!("expected an API error, got {e:?}"),
    }
}

async fn token_for(client: &kube::Client, sa: &str) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "kube-system");
    let req = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    };
    let tr = sas
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {sa}: {e}"));
    let token = tr.status.and_then(|s| s.token).unwrap_or_default();
    assert!(!token.is_empty(), "the TokenRequest returned a token");
    token
}

/// A kubeconfig with a bearer token and the sandbox's CA; the server is the root-namespace relay (from the admin
/// kubeconfig) unless `server` is given (the fabric address, for processes inside the sandbox's namespaces).
fn token_kubeconfig(sb: &Sandbox, token: &str, path: &Path, server: Option<&str>) {
    let admin = kube::config::Kubeconfig::read_from(sb.kubeconfig()).expect("admin kubeconfig");
    let cluster = admin.clusters[0].cluster.clone().expect("cluster");
    let server = match server {
        Some(s) => s.to_string(),
        None => cluster.server.expect("server"),
    };
    let ca = cluster.certificate_authority.expect("certificate-authority");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: sandbox\n  cluster:\n    server: {server}\n    \
         certificate-authority: {ca}\nusers:\n- name: orca-proxy\n  user:\n    token: {token}\ncontexts:\n- name: \
         sandbox\n  context:\n    cluster: sandbox\n    user: orca-proxy\ncurrent-context: sandbox\n"
    );
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// `orca-proxy status --json` as node-a with `kubeconfig`; (success, stdout, stderr). Bounded to 60 s.
async fn orca_status(kubeconfig: &Path) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_orca-proxy"));
    cmd.args(["status", "--json", "--hostname-override", "node-a", "--kubeconfig"])
        .arg(kubeconfig)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("orca-proxy status finished within 60 s")
        .expect("running orca-proxy status");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_accepted_and_the_rbac_is_enough_and_no_more() {
    if !should_run_sandbox() {
        return;
    }
    let sb = Sandbox::up(SandboxOptions::default()).await.expect("sandbox up");
    let admin = sb.admin_client();
    let docs = manifests();

    // 1. Every object passes validation and admission (server-side dry run) -- and nothing is created.
    for d in &docs {
        let what = format!("{} {}", d["kind"], d["metadata"]["name"]);
        let got = apply(&admin, d, true)
            .await
            .unwrap_or_else(|e| panic!("the apiserver rejects {what}: {e}"));
        assert_eq!(got.metadata.name.as_deref(), d["metadata"]["name"].as_str(), "{what}");
    }
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), "kube-system");
    assert!(
        sas.get_opt("orca-proxy").await.unwrap().is_none(),
        "a dry run creates nothing"
    );
    // The DaemonSet's defaults were filled in by the server, so it really went through the apps/v1 schema.
    let ds = find(&docs, "DaemonSet");
    let served = apply(&admin, ds, true).await.unwrap();
    let served_pod = &served.data["spec"]["template"]["spec"];
    assert_eq!(
        served_pod["containers"][0]["terminationMessagePath"],
        "/dev/termination-log"
    );
    // The priority class the pods will ask for exists (the apiserver creates it at start).
    let pcs: Api<k8s_openapi::api::scheduling::v1::PriorityClass> = Api::all(admin.clone());
    let pc_name = served_pod["priorityClassName"].as_str().expect("priorityClassName");
    assert_eq!(pcs.get(pc_name).await.unwrap().value, Some(2000001000), "{pc_name}");
    // Bidirectional propagation needs a privileged container: the apiserver refuses it.
    let mut bidi = ds.clone();
    for m in bidi["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
    {
        if m["name"] == "bpffs" {
            m["mountPropagation"] = json!("Bidirectional");
        }
    }
    let err = apply(&admin, &bidi, true)
        .await
        .expect_err("Bidirectional on an unprivileged container");
    assert!(err.to_string().contains("Bidirectional"), "{err}");

    // 2. The ServiceAccount, ClusterRole and binding for real.
    for kind in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"] {
        apply(&admin, find(&docs, kind), false)
            .await
            .unwrap_or_else(|e| panic!("creating the {kind}: {e}"));
    }
    // The Pod the DaemonSet controller would create on node-a passes Pod admission (ServiceAccount, Priority)
    // and validation: dry run.
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "orca-proxy-dry-run", "namespace": "kube-system"},
        "spec": ds["spec"]["template"]["spec"].clone(),
    });
    pod["metadata"]["labels"] = ds["spec"]["template"]["metadata"]["labels"].clone();
    pod["spec"]["nodeName"] = json!("node-a");
    let pod: Pod = serde_json::from_value(pod).expect("the template is a Pod spec");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "kube-system");
    let admitted = pods
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &pod,
        )
        .await
        .unwrap_or_else(|e| panic!("the DaemonSet's Pod is rejected: {e}"));
    let spec = admitted.spec.expect("spec");
    assert_eq!(spec.priority, Some(2000001000), "system-node-critical resolved");
    assert!(
        spec.volumes
            .unwrap_or_default()
            .iter()
            .any(|v| v.name.starts_with("kube-api-access-")),
        "the ServiceAccount's token is projected into the Pod"
    );
    assert!(pods.get_opt("orca-proxy-dry-run").await.unwrap().is_none());
    // Something for status to show: a Service with one ready endpoint on node-b.
    let svcs: Api<Service> = Api::namespaced(admin.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "rbac-probe"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    svcs.create(&PostParams::default(), &svc).await.unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), "default");
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "rbac-probe-1", "labels": {"kubernetes.io/service-name": "rbac-probe"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.2.77"], "conditions": {"ready": true}, "nodeName": "node-b"}]
    }))
    .unwrap();
    slices.create(&PostParams::default(), &slice).await.unwrap();

    // 3. With the ServiceAccount's token, `orca-proxy status` lists Services and EndpointSlices and gets its Node.
    let tmp = TempDir::new("rbac");
    let kc = tmp.path().join("orca-proxy.kubeconfig");
    let token = token_for(&admin, "orca-proxy").await;
    token_kubeconfig(&sb, &token, &kc, None);
    let (ok, stdout, stderr) = orca_status(&kc).await;
    assert!(
        ok,
        "orca-proxy status with the ServiceAccount's token failed:\n{stderr}"
    );
    let state: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("status --json: {e}\n{stdout}"));
    let ports = state.as_array().expect("status --json is a list");
    assert!(
        ports
            .iter()
            .any(|p| p.to_string().contains("rbac-probe") && p.to_string().contains("10.244.2.77")),
        "status shows the probe Service with its endpoint: {stdout}"
    );

    // The same command with a ServiceAccount that has no binding fails: the token is what is being tested.
    let unbound: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "orca-proxy-unbound", "namespace": "kube-system"}}))
            .unwrap();
    sas.create(&PostParams::default(), &unbound).await.unwrap();
    let kc_unbound = tmp.path().join("unbound.kubeconfig");
    token_kubeconfig(&sb, &token_for(&admin, "orca-proxy-unbound").await, &kc_unbound, None);
    let (ok, _, stderr) = orca_status(&kc_unbound).await;
    assert!(!ok, "status without RBAC must fail");
    assert!(stderr.to_lowercase().contains("forbidden"), "{stderr}");

    // 4. The agent's own watchers (list + watch of Services, EndpointSlices and its Node) sync with the token.
    let client = orca_sandbox::controlplane::client_from_kubeconfig(&kc).await.unwrap();
    let shared = WatchState::new(ChangeTracker::new(NodeInfo {
        name: "node-a".into(),
        ..Default::default()
    }));
    let watchers = tokio::spawn(watch::run(client.clone(), "node-a".into(), shared.clone()));
    let synced = tokio::time::timeout(Duration::from_secs(20), shared.wait_synced()).await;
    if synced.is_err() {
        watchers.abort();
        panic!("the watchers did not sync with the ServiceAccount's token");
    }
    assert_eq!(
        shared.lock().node().zone.as_deref(),
        Some("zone-a"),
        "the Node was read with the token"
    );
    // Changes after the initial lists arrive through watches: a new Service with its slice, and the Node's zone.
    let mut watched = svc.clone();
    watched.metadata.name = Some("rbac-watch".into());
    svcs.create(&PostParams::default(), &watched).await.unwrap();
    let mut watched_slice = slice.clone();
    watched_slice.metadata.name = Some("rbac-watch-1".into());
    watched_slice
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("kubernetes.io/service-name".into(), "rbac-watch".into());
    slices.create(&PostParams::default(), &watched_slice).await.unwrap();
    Api::<Node>::all(admin.clone())
        .patch(
            "node-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"topology.kubernetes.io/zone": "zone-x"}}})),
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (seen, zone) = {
            let mut t = shared.lock();
            t.take_diff();
            let seen = t
                .desired()
                .iter()
                .any(|(k, v)| &*k.service.name == "rbac-watch" && v.internal_endpoints().len() == 1);
            (seen, t.node().zone.clone())
        };
        if seen && zone.as_deref() == Some("zone-x") {
            break;
        }
        if std::time::Instant::now() > deadline {
            watchers.abort();
            panic!("watch events with the token: Service and slice seen: {seen}, node zone: {zone:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watchers.abort();

    // The agent itself, with the DaemonSet's command line and the ConfigMap's file, in node-a, with the token
    // (fabric address). iptables mode: eBPF would pin under the host's /sys/fs/bpf, outside the sandbox.
    let conf = find(&docs, "ConfigMap")["data"]["config.conf"]
        .as_str()
        .unwrap()
        .to_string();
    let conf_path = tmp.path().join("config.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let kc_fabric = tmp.path().join("orca-proxy-fabric.kubeconfig");
    token_kubeconfig(&sb, &token, &kc_fabric, Some(&sb.apiserver_url()));
    let node = sb.topology().node("node-a").expect("node-a").clone();
    let mut argv = daemonset_argv(&docs, &conf_path);
    let healthz = format!("{}:10256", node.ip);
    let metrics = format!("{}:10249", node.ip);
    argv.extend(
        [
            "--proxy-mode",
            "iptables",
            "--kubeconfig",
            kc_fabric.to_str().unwrap(),
            "--healthz-bind-address",
            &healthz,
            "--metrics-bind-address",
            &metrics,
        ]
        .map(String::from),
    );
    argv[0] = env!("CARGO_BIN_EXE_orca-proxy").to_string();
    let log_name = "orca-proxy-rbac";
    let argv_ref: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut agent = Agent(orca_sandbox::netns::spawn(&node.netns, &argv_ref, log_name).expect("starting the agent"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(st)) = agent.0.try_wait() {
            panic!(
                "the agent exited ({st}) with the ServiceAccount's token:\n{}",
                agent_log(log_name)
            );
        }
        let health = curl(&node.netns, &format!("http://{healthz}/healthz"));
        let ports = curl(&node.netns, &format!("http://{metrics}/metrics")).and_then(|(_, m)| {
            m.lines()
                .find_map(|l| l.strip_prefix("orca_service_ports "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        // kubernetes, rbac-probe and rbac-watch, programmed (healthz reports the sync).
        let synced = health
            .as_ref()
            .is_some_and(|(code, body)| *code == 200 && !body.contains("0001-01-01"));
        if synced && ports.is_some_and(|p| p >= 3.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not sync with the token: healthz {health:?}, service ports {ports:?}\n{}",
            agent_log(log_name)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let probe_ip = svcs
        .get("rbac-probe")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.cluster_ip)
        .unwrap();
    let nat = orca_sandbox::netns::exec(&node.netns, &["iptables-save", "-t", "nat"]).unwrap();
    assert!(
        String::from_utf8_lossy(&nat.stdout).contains(&format!("{probe_ip}/32")),
        "node-a's nat table holds rbac-probe's ClusterIP"
    );
    drop(agent);
    let log = agent_log(log_name);
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the agent was denied something:\n{log}"
    );

    // Events can be recorded, through both APIs.
    let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .unwrap();
    let ev2: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "orca-proxy-test.1", "namespace": "default"},
        "eventTime": now.clone(), "reportingController": "orca.dev/orca-proxy", "reportingInstance": "orca-proxy-node-a",
        "action": "StartOrcaProxy", "reason": "Starting", "type": "Normal", "note": "rbac test",
        "regarding": {"kind": "Node", "name": "node-a", "apiVersion": "v1"}
    }))
    .unwrap();
    let (ar, _) = kube::discovery::pinned_kind(&client, &GroupVersionKind::gvk("events.k8s.io", "v1", "Event"))
        .await
        .unwrap();
    let events2: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    events2
        .create(&PostParams::default(), &ev2)
        .await
        .unwrap_or_else(|e| panic!("creating an events.k8s.io Event with the token: {e}"));
    // What an event recorder patches: the series of a repeated event.
    let merge = Patch::Merge(json!({"series": {"count": 2, "lastObservedTime": now}}));
    events2
        .patch("orca-proxy-test.1", &PatchParams::default(), &merge)
        .await
        .unwrap_or_else(|e| panic!("patching an events.k8s.io Event with the token: {e}"));
    let core_events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    let ev1: k8s_openapi::api::core::v1::Event = serde_json::from_value(json!({
        "metadata": {"name": "orca-proxy-test.2", "namespace": "default"},
        "involvedObject": {"kind": "Node", "name": "node-a"},
        "reason": "Starting", "message": "rbac test", "type": "Normal",
        "source": {"component": "orca-proxy", "host": "node-a"}
    }))
    .unwrap();
    core_events
        .create(&PostParams::default(), &ev1)
        .await
        .unwrap_or_else(|e| panic!("creating a core Event with the token: {e}"));

    // 5. No more than needed: everything else is Forbidden.
    let lp = ListParams::default();
    let pp = PostParams::default();
    let forbidden: Vec<(&str, Option<u16>)> = vec![
        (
            "list secrets (all namespaces)",
            code_of(Api::<Secret>::all(client.clone()).list(&lp).await),
        ),
        (
            "list secrets in kube-system",
            code_of(Api::<Secret>::namespaced(client.clone(), "kube-system").list(&lp).await),
        ),
        (
            "list the kube-system ConfigMaps",
            code_of(
                Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
                    .list(&lp)
                    .await,
            ),
        ),
        ("list pods", code_of(Api::<Pod>::all(client.clone()).list(&lp).await)),
        (
            "get one Service",
            code_of(
                Api::<Service>::namespaced(client.clone(), "default")
                    .get("rbac-probe")
                    .await,
            ),
        ),
        (
            "create a Service",
            code_of(
                Api::<Service>::namespaced(client.clone(), "default")
                    .create(&pp, &{
                        let mut s = svc.clone();
                        s.metadata.name = Some("rbac-denied".into());
                        s
                    })
                    .await,
            ),
        ),
        (
            "delete a Service",
            code_of(
                Api::<Service>::namespaced(client.clone(), "default")
                    .delete("rbac-probe", &DeleteParams::default())
                    .await,
            ),
        ),
        (
            "create an EndpointSlice",
            code_of(
                Api::<EndpointSlice>::namespaced(client.clone(), "default")
                    .create(&pp, &{
                        let mut s = slice.clone();
                        s.metadata.name = Some("rbac-denied".into());
                        s
                    })
                    .await,
            ),
        ),
        (
            "patch a Node",
            code_of(
                Api::<Node>::all(client.clone())
                    .patch(
                        "node-a",
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
                    )
                    .await,
            ),
        ),
        (
            "delete an Event",
            code_of(core_events.delete("orca-proxy-test.2", &DeleteParams::default()).await),
        ),
        (
            "request a token",
            code_of(
                Api::<ServiceAccount>::namespaced(client.clone(), "kube-system")
                    .create_token_request("orca-proxy", &pp, &TokenRequest::default())
                    .await,
            ),
        ),
    ];
    let wrong: Vec<_> = forbidden.iter().filter(|(_, code)| *code != Some(403)).collect();
    assert!(
        wrong.is_empty(),
        "with the orca-proxy token these must be Forbidden (403): {wrong:?}"
    );
    // The admin still sees the probe Service: the denied delete did nothing.
    assert!(svcs.get_opt("rbac-probe").await.unwrap().is_some());
    drop(tmp);
    let removed = sb.down().expect("sandbox down");
    assert!(!removed.is_empty());
}
