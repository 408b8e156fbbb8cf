//! The watch path against the sandbox's real kube-apiserver: Services and EndpointSlices created, changed and
//! deleted reach the change tracker's desired state; skipped kinds stay out; the Node's zone is picked up.
//!
//! Needs root and the sandbox's control-plane binaries. Skipped (with a message) only when the binaries are absent
//! and ORCA_REQUIRE_SANDBOX is unset.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use orca_proxy::model::state::Snapshot;
use orca_proxy::model::tracker::ChangeTracker;
use orca_proxy::model::NodeInfo;
use orca_proxy::watch::{self, WatchState};
use orca_sandbox::{build, Sandbox, SandboxOptions};
use serde_json::json;

fn should_run() -> bool {
    if std::env::var_os("ORCA_REQUIRE_SANDBOX").is_some() || build::binaries_present() {
        return true;
    }
    eprintln!("SKIPPED: no control-plane binaries and ORCA_REQUIRE_SANDBOX unset; run `cargo xtask setup`");
    false
}

/// Takes diffs (as the sync runner does) until `pred` holds on the desired state, or panics after 20 s.
async fn wait_for(shared: &WatchState, what: &str, pred: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let snap = {
            let mut t = shared.lock();
            t.take_diff();
            t.desired().clone()
        };
        if pred(&snap) {
            return snap;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; desired state: {:#?}",
            snap.keys()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn slice(name: &str, svc: &str, ready: &[(&str, bool)]) -> EndpointSlice {
    let eps: Vec<_> = ready
        .iter()
        .map(|(ip, r)| json!({"addresses": [ip], "conditions": {"ready": r}, "nodeName": "node-a"}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps
    }))
    .unwrap()
}

fn service(name: &str, extra: serde_json::Value) -> Service {
    let mut v = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    });
    merge(&mut v, extra);
    serde_json::from_value(v).unwrap()
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn ready_count(s: &Snapshot, svc: &str) -> Option<usize> {
    s.iter()
        .find(|(k, _)| &*k.service.name == svc)
        .map(|(_, v)| v.internal_endpoints().len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_tracks_services_and_slices_on_a_real_apiserver() {
    if !should_run() {
        return;
    }
    let mut sb = Sandbox::up(SandboxOptions::default()).await.expect("sandbox up");
    let client = sb.admin_client();
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();

    // Objects that exist before the watch starts arrive through the initial list.
    svcs.create(&pp, &service("early", json!({}))).await.unwrap();
    slices
        .create(&pp, &slice("early-1", "early", &[("10.244.1.10", true)]))
        .await
        .unwrap();

    let shared = WatchState::new(ChangeTracker::new(NodeInfo {
        name: "node-a".into(),
        ..Default::default()
    }));
    let task = tokio::spawn(watch::run(client.clone(), "node-a".into(), shared.clone()));
    tokio::time::timeout(Duration::from_secs(20), shared.wait_synced())
        .await
        .expect("initial lists");
    wait_for(&shared, "the early Service with one endpoint", |s| {
        ready_count(s, "early") == Some(1)
    })
    .await;
    assert_eq!(
        shared.lock().node().zone.as_deref(),
        Some("zone-a"),
        "the Node's zone label is watched"
    );

    // Created, then changed (a second endpoint, then readiness lost), then deleted.
    svcs.create(&pp, &service("web", json!({}))).await.unwrap();
    slices
        .create(&pp, &slice("web-1", "web", &[("10.244.1.11", true)]))
        .await
        .unwrap();
    wait_for(&shared, "web with one endpoint", |s| ready_count(s, "web") == Some(1)).await;
    slices
        .replace("web-1", &pp, &{
            let mut s = slices.get("web-1").await.unwrap();
            s.endpoints = slice("x", "web", &[("10.244.1.11", true), ("10.244.1.12", true)]).endpoints;
            s
        })
        .await
        .unwrap();
    wait_for(&shared, "web with two endpoints", |s| ready_count(s, "web") == Some(2)).await;
    let patch = json!({"endpoints": [{"addresses": ["10.244.1.11"], "conditions": {"ready": false}, "nodeName": "node-a"},
                                     {"addresses": ["10.244.1.12"], "conditions": {"ready": true}, "nodeName": "node-a"}]});
    slices
        .patch("web-1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let snap = wait_for(&shared, "web with one ready endpoint", |s| {
        ready_count(s, "web") == Some(1)
    })
    .await;
    let web = snap.values().find(|v| &*v.port.name.service.name == "web").unwrap();
    assert_eq!(web.internal_endpoints()[0].ip.to_string(), "10.244.1.12");
    assert_eq!(
        web.endpoints.len(),
        2,
        "the unready endpoint is still known, just not selected"
    );

    // Skipped like kube-proxy: headless, ExternalName, another proxy's, and a slice without the service label.
    svcs.create(&pp, &service("headless", json!({"spec": {"clusterIP": "None"}})))
        .await
        .unwrap();
    svcs.create(
        &pp,
        &service(
            "extname",
            json!({"spec": {"type": "ExternalName", "externalName": "example.org"}}),
        ),
    )
    .await
    .unwrap();
    svcs.create(
        &pp,
        &service(
            "other",
            json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "x"}}}),
        ),
    )
    .await
    .unwrap();
    let mut orphan = slice("orphan-1", "nobody", &[("10.244.1.13", true)]);
    orphan.metadata.labels = None;
    slices.create(&pp, &orphan).await.unwrap();
    // A marker created last: once it shows up, the earlier objects have been seen too.
    svcs.create(&pp, &service("marker", json!({}))).await.unwrap();
    let snap = wait_for(&shared, "marker", |s| s.keys().any(|k| &*k.service.name == "marker")).await;
    for skipped in ["headless", "extname", "other"] {
        assert!(
            !snap.keys().any(|k| &*k.service.name == skipped),
            "{skipped} must not be proxied"
        );
    }

    // A label that hands the Service to another proxy removes it (the label selector turns it into a delete).
    let patch = json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "x"}}});
    svcs.patch("marker", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_for(&shared, "marker gone", |s| {
        !s.keys().any(|k| &*k.service.name == "marker")
    })
    .await;

    // Deletes.
    slices.delete("web-1", &DeleteParams::default()).await.unwrap();
    wait_for(&shared, "web without endpoints", |s| ready_count(s, "web") == Some(0)).await;
    svcs.delete("web", &DeleteParams::default()).await.unwrap();
    let snap = wait_for(&shared, "web gone", |s| ready_count(s, "web").is_none()).await;
    assert_eq!(ready_count(&snap, "early"), Some(1), "other Services are untouched");

    // The apiserver restarts mid-watch: the desired state is never flushed meanwhile, and changes made after it is
    // back arrive through the re-established watches.
    let before = shared.lock().desired().len();
    assert!(before > 0);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let monitor = {
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            let mut min = usize::MAX;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                {
                    let mut t = shared.lock();
                    t.take_diff();
                    min = min.min(t.desired().len());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            min
        })
    };
    sb.restart_apiserver(Duration::from_secs(3))
        .await
        .expect("apiserver restart");
    let client = sb.admin_client();
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    svcs.create(&pp, &service("after", json!({}))).await.unwrap();
    slices
        .create(&pp, &slice("after-1", "after", &[("10.244.1.20", true)]))
        .await
        .unwrap();
    slices.delete("early-1", &DeleteParams::default()).await.unwrap();
    let snap = wait_for(&shared, "changes after the restart", |s| {
        ready_count(s, "after") == Some(1) && ready_count(s, "early") == Some(0)
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let min = monitor.await.unwrap();
    assert_eq!(min, before, "the desired state shrank while the apiserver was away");
    assert_eq!(snap.len(), before + 1);

    task.abort();
    let left = sb.down().expect("teardown");
    eprintln!("teardown removed {} items", left.len());
}
