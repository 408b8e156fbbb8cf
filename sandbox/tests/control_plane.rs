//! Brings the real sandbox up (root, built control-plane binaries), checks the apiserver, the Nodes, the
//! controller-manager and the fabric, then tears down and checks nothing is left.
//!
//! Skipped (with a message) only when the binaries are absent and ORCA_REQUIRE_SANDBOX is unset; with
//! ORCA_REQUIRE_SANDBOX set it builds them if needed and fails rather than skips.
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use orca_sandbox::controlplane::NetnsConnector;
use orca_sandbox::{build, netns, Sandbox, SandboxOptions};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

fn should_run() -> bool {
    if std::env::var_os("ORCA_REQUIRE_SANDBOX").is_some() {
        return true;
    }
    if !build::binaries_present() {
        eprintln!(
            "SKIPPED: control-plane binaries absent in {} and ORCA_REQUIRE_SANDBOX unset; \
             run `cargo xtask sandbox build-k8s` (or set ORCA_REQUIRE_SANDBOX=1) to run this test",
            build::bin_dir().display()
        );
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_comes_up_answers_and_leaves_nothing_behind() {
    if !should_run() {
        return;
    }
    let sb = Sandbox::up(SandboxOptions::default()).await.expect("sandbox up");
    let topo = sb.topology().clone();
    let client = sb.admin_client();

    // The apiserver answers, with the pinned release.
    let version = client.apiserver_version().await.expect("version");
    assert_eq!(version.git_version, build::KUBERNETES_VERSION);

    // Both Nodes exist with their addresses, pod CIDRs, zones and Ready condition.
    let nodes: Api<Node> = Api::all(client.clone());
    for n in &topo.nodes {
        let node = nodes.get(&n.name).await.expect("node");
        let spec = node.spec.clone().unwrap_or_default();
        assert_eq!(spec.pod_cidr.as_deref(), Some(n.pod_cidr.to_string().as_str()));
        let labels = node.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("topology.kubernetes.io/zone").map(String::as_str),
            Some(n.zone.as_str())
        );
        let status = node.status.clone().unwrap_or_default();
        let internal: Vec<String> = status
            .addresses
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP")
            .map(|a| a.address)
            .collect();
        // Dual-stack: the IPv4 address first, then its IPv6 twin.
        assert_eq!(
            internal,
            vec![n.ip.to_string(), orca_sandbox::topology::v6(n.ip).to_string()]
        );
        let ready = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status);
        assert_eq!(ready.as_deref(), Some("True"), "node {}", n.name);
        assert!(node.spec.and_then(|s| s.taints).unwrap_or_default().is_empty());
    }

    // A Service gets a ClusterIP from the configured range, and a NodePort from the configured range.
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "sandbox-probe"},
        "spec": {"type": "NodePort", "selector": {"app": "none"},
                 "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }))
    .unwrap();
    let created = services.create(&PostParams::default(), &svc).await.expect("create svc");
    let spec = created.spec.unwrap_or_default();
    let ip: Ipv4Addr = spec.cluster_ip.as_deref().unwrap_or("").parse().expect("cluster ip");
    assert!(topo.service_cidr.contains(ip), "{ip} outside {}", topo.service_cidr);
    let node_port = spec.ports.unwrap_or_default()[0].node_port.expect("node port");
    let node_port = u16::try_from(node_port).expect("port");
    assert!((topo.node_port_range.0..=topo.node_port_range.1).contains(&node_port));
    services
        .delete("sandbox-probe", &DeleteParams::default())
        .await
        .expect("delete svc");

    // The real EndpointSlice controller (running as its own service account) turns a Service and a ready Pod
    // on node-a into a slice carrying the pod's IP, node and zone.
    let pod_ip = topo.nodes[0].pod_cidr.host(10).unwrap().to_string();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "probe-pod", "labels": {"app": "probe"}},
        "spec": {"nodeName": topo.nodes[0].name,
                 "containers": [{"name": "c", "image": "orca/none",
                                 "ports": [{"name": "http", "containerPort": 8080}]}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.expect("create pod");
    let now = serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap();
    let status = serde_json::json!({"status": {
        "phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
    }});
    pods.patch_status("probe-pod", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status");
    let probe_svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "probe"},
        "spec": {"selector": {"app": "probe"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &probe_svc)
        .await
        .expect("create probe svc");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let lp = ListParams::default().labels("kubernetes.io/service-name=probe");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let endpoint = loop {
        let list = slices.list(&lp).await.expect("list slices");
        let found = list.items.iter().find_map(|s| {
            let port = s.ports.as_ref()?.first()?.port?;
            let ep = s.endpoints.as_ref()?.iter().find(|e| e.addresses.contains(&pod_ip))?;
            Some((port, ep.clone()))
        });
        if let Some(f) = found {
            break f;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no EndpointSlice for probe: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(endpoint.0, 8080, "named targetPort resolved");
    let ep = endpoint.1;
    assert_eq!(ep.conditions.and_then(|c| c.ready), Some(true));
    assert_eq!(ep.node_name.as_deref(), Some(topo.nodes[0].name.as_str()));
    assert_eq!(ep.zone.as_deref(), Some(topo.nodes[0].zone.as_str()));

    // The apiserver's own Service is the first address of the range.
    let kube_svc = services.get("kubernetes").await.expect("kubernetes svc");
    assert_eq!(
        kube_svc.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some(topo.kubernetes_service_ip().to_string().as_str())
    );

    // The fabric works both ways: node-a reaches the apiserver (6443 on the cp IP), node-b reaches node-a, and
    // the root namespace has no route to the fabric (nothing was created there).
    let cp = topo.control_plane.ip.to_string();
    let a = &topo.nodes[0];
    let b = &topo.nodes[1];
    // Reachability over TCP from inside each namespace: a connection to the apiserver succeeds, one to a port
    // where nothing listens is refused (a RST came back, so the path works) rather than timing out.
    let reach = |ns: &str, ip: Ipv4Addr, port: u16| {
        let ns = ns.to_string();
        async move {
            let c = NetnsConnector::new(&ns).expect("connector");
            c.connect(SocketAddr::from((ip, port))).await.map(|_| ())
        }
    };
    let refused = |r: anyhow::Result<()>| match r {
        Ok(()) => panic!("expected connection refused, got a connection"),
        Err(e) => assert_eq!(
            e.root_cause()
                .downcast_ref::<std::io::Error>()
                .map(std::io::Error::kind),
            Some(std::io::ErrorKind::ConnectionRefused),
            "{e:#}"
        ),
    };
    reach(&a.netns, topo.control_plane.ip, 6443)
        .await
        .expect("node-a -> apiserver");
    refused(reach(&b.netns, a.ip, 9).await);
    refused(reach(&topo.client.netns, b.ip, 9).await);
    let routes = netns::exec(&a.netns, &["ip", "route"]).expect("routes");
    let routes = String::from_utf8_lossy(&routes.stdout).to_string();
    assert!(
        routes.contains(&format!("{} via {}", b.pod_cidr, b.ip)),
        "node-a routes: {routes}"
    );
    let fwd = netns::exec(&a.netns, &["sysctl", "-n", "net.ipv4.ip_forward"]).expect("sysctl");
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1");
    // A connection from the cp namespace to the apiserver port works (what the relay uses).
    sb.connect_from_cp(SocketAddr::from((topo.control_plane.ip, 6443)))
        .await
        .expect("cp connect");

    // The fabric kubeconfig points at the cp IP; the root-namespace one at loopback.
    let fabric = std::fs::read_to_string(sb.fabric_kubeconfig()).unwrap();
    assert!(fabric.contains(&format!("https://{cp}:6443")));

    let removed = tokio::task::spawn_blocking(move || sb.down())
        .await
        .unwrap()
        .expect("down");
    assert!(removed.iter().any(|r| r == "netns orca-cp"), "{removed:?}");
    assert!(netns::list_sandbox_netns().is_empty());
    // Nothing of ours still runs.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let procs = std::process::Command::new("ps").args(["-eo", "comm"]).output().unwrap();
    let procs = String::from_utf8_lossy(&procs.stdout).to_string();
    for name in ["etcd", "kube-apiserver", "kube-controller"] {
        assert!(
            !procs.lines().any(|l| l.trim() == name || l.trim().starts_with(name)),
            "{name} still running"
        );
    }
}
