//! Pods and the kubelet role against the real sandbox: pod servers answer from nodes and across nodes (with the
//! client addresses a user would expect), readiness flips reach the Pod's Ready condition and the real
//! EndpointSlice controller's endpoint conditions, a graceful delete keeps the pod serving during its grace
//! period and leaves nothing behind after it.
//!
//! Needs root and the control-plane binaries; skipped (with a message) when they are absent and
//! ORCA_REQUIRE_SANDBOX is unset, like the other sandbox tests.
use k8s_openapi::api::core::v1::{Pod as KPod, Service};
use kube::api::{Api, PostParams};
use orca_sandbox::kubelet::{service_endpoints, DeploymentSpec, EndpointInfo, Kubelet, ProbeSpec};
use orca_sandbox::pods::{self, ClientOutcome, NetError, PodNode};
use orca_sandbox::{build, netns, Sandbox, SandboxOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn should_run() -> bool {
    if std::env::var_os("ORCA_REQUIRE_SANDBOX").is_some() {
        return true;
    }
    if !build::binaries_present() {
        eprintln!(
            "SKIPPED: control-plane binaries absent in {} and ORCA_REQUIRE_SANDBOX unset",
            build::bin_dir().display()
        );
        return false;
    }
    true
}

fn testpod() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_orca-testpod"))
}

fn netns_exists(ns: &str) -> bool {
    netns::list_orca_netns().iter().any(|n| n == ns)
}

/// Poll the Service's endpoints until `pred` holds; returns them and the time it took.
async fn wait_endpoints(
    client: &kube::Client,
    svc: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&[EndpointInfo]) -> bool,
) -> (Vec<EndpointInfo>, Duration) {
    let t0 = Instant::now();
    loop {
        let eps = service_endpoints(client, "default", svc).await.expect("endpoints");
        if pred(&eps) {
            return (eps, t0.elapsed());
        }
        assert!(
            t0.elapsed() < timeout,
            "{what}: not reached after {timeout:?}; endpoints: {eps:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn endpoint<'a>(eps: &'a [EndpointInfo], pod: &str) -> Option<&'a EndpointInfo> {
    eps.iter().find(|e| e.pod.as_deref() == Some(pod))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_answer_across_nodes_and_follow_readiness_and_termination() {
    if !should_run() {
        return;
    }
    let sb = Sandbox::up(SandboxOptions::default()).await.expect("sandbox up");
    let topo = sb.topology().clone();
    let client = sb.admin_client();
    let kubelet = Kubelet::with_binary(client.clone(), PodNode::from_topology(&topo), testpod());
    let (node_a, node_b) = (&topo.nodes[0], &topo.nodes[1]);

    // Two replicas, one per node (round-robin), probed every 300 ms, not ready after 3 failures.
    let probe = ProbeSpec::with_period(Duration::from_millis(300));
    let spec = DeploymentSpec::new("web", 2)
        .labels(&[("app", "web"), ("env", "test")])
        .readiness(Some(probe));
    let t0 = Instant::now();
    let web = kubelet.deploy(&spec).await.expect("deploy");
    eprintln!("deployed 2 pods in {:?}", t0.elapsed());
    assert_eq!(web.len(), 2);
    let (pa, pb) = if web[0].node == node_a.name {
        (&web[0], &web[1])
    } else {
        (&web[1], &web[0])
    };
    assert_eq!(
        (pa.node.as_str(), pb.node.as_str()),
        (node_a.name.as_str(), node_b.name.as_str())
    );
    assert!(
        node_a.pod_cidr.contains(pa.ip) && node_b.pod_cidr.contains(pb.ip),
        "{pa:?} {pb:?}"
    );
    assert_eq!(pa.ip, node_a.pod_cidr.host(2).unwrap(), "first pod of a node gets .2");
    assert!(netns_exists(&pa.netns) && netns_exists(&pb.netns));
    kubelet
        .wait_deployment_ready("default", "web", Duration::from_secs(15))
        .await
        .expect("pods become Ready");

    // The Pod objects carry node, labels and IPs.
    let pods_api: Api<KPod> = Api::namespaced(client.clone(), "default");
    let obj = pods_api.get(&pa.name).await.unwrap();
    assert_eq!(
        obj.spec.as_ref().unwrap().node_name.as_deref(),
        Some(node_a.name.as_str())
    );
    assert_eq!(obj.metadata.labels.as_ref().unwrap()["env"], "test");
    let st = obj.status.unwrap();
    assert_eq!(st.pod_ip.as_deref(), Some(pa.ip.to_string().as_str()));
    assert_eq!(st.host_ip.as_deref(), Some(node_a.ip.to_string().as_str()));
    assert_eq!(st.phase.as_deref(), Some("Running"));

    let t = Duration::from_secs(3);
    // From node-a's namespace (a host-network client): the local pod and the remote pod answer, and both saw
    // node-a's IP (routed, no NAT).
    for p in [pa, pb] {
        let w = pods::whoami(&node_a.netns, p.addr(8080), t)
            .await
            .expect("whoami from node-a");
        assert_eq!((w.pod.as_str(), w.node.as_str()), (p.name.as_str(), p.node.as_str()));
        assert_eq!(w.pod_ip, p.ip.to_string());
        assert_eq!(w.client.ip(), node_a.ip, "source seen by {}", p.name);
        assert_eq!(w.server_port, 8080);
    }
    // Pod to pod across nodes: the server sees the client pod's IP.
    let w = pods::whoami(&pb.netns, pa.addr(8080), t).await.expect("pod b -> pod a");
    assert_eq!(
        (w.pod.as_str(), w.client.ip()),
        (pa.name.as_str(), std::net::IpAddr::V4(pb.ip))
    );
    let u = pods::udp_exchange(&pa.netns, None, pb.addr(8081), "ping", t)
        .await
        .expect("udp a -> b");
    assert_eq!((u.pod.as_str(), u.payload.as_str()), (pb.name.as_str(), "ping"));
    assert_eq!(u.client.ip(), std::net::IpAddr::V4(pa.ip));
    // A fixed source port is kept end to end.
    let from: SocketAddr = format!("{}:40123", pa.ip).parse().unwrap();
    let u = pods::udp_exchange(&pa.netns, Some(from), pb.addr(8081), "x", t)
        .await
        .expect("udp from port");
    assert_eq!(u.client, from);
    // Nothing listens on 8082: refused, not a timeout (TCP and UDP).
    assert_eq!(
        pods::tcp_connect(&pa.netns, pb.addr(8082), t).await.err(),
        Some(NetError::Refused)
    );
    let e = pods::udp_exchange(&pa.netns, None, pb.addr(8082), "x", t).await.err();
    assert_eq!(e, Some(NetError::Refused));
    // The external client has no route to pod IPs (it reaches the cluster only through node/LB addresses).
    assert!(
        pods::whoami(&topo.client.netns, pa.addr(8080), Duration::from_millis(500))
            .await
            .is_err()
    );
    // The orca-testpod client as a process: a host-network client on node-b; TCP echo and sink from a pod.
    let bin = testpod();
    let url = format!("http://{}:8080/", pa.ip);
    match pods::testpod_client(&bin, &node_b.netns, &["get", &url, "--timeout", "3"])
        .await
        .unwrap()
    {
        ClientOutcome::Ok(out) => {
            let body = out.split_once('\n').map(|(code, b)| {
                assert_eq!(code, "200");
                b
            });
            let w = pods::WhoAmI::parse(body.unwrap()).unwrap();
            assert_eq!(
                (w.pod.as_str(), w.client.ip()),
                (pa.name.as_str(), std::net::IpAddr::V4(node_b.ip))
            );
        }
        other => panic!("client process from node-b: {other:?}"),
    }
    let echo = format!("{}:9000", pa.ip);
    match pods::testpod_client(&bin, &pb.netns, &["tcp-echo", &echo, "abc"])
        .await
        .unwrap()
    {
        ClientOutcome::Ok(out) => assert_eq!(out.trim(), "abc"),
        other => panic!("tcp echo: {other:?}"),
    }
    let sink = format!("{}:9001", pa.ip);
    match pods::testpod_client(&bin, &pb.netns, &["tcp-sink", &sink, "--bytes", "10000000"])
        .await
        .unwrap()
    {
        ClientOutcome::Ok(out) => {
            assert!(out.contains("sent=10000000 acked=10000000"), "{out}");
            eprintln!("tcp sink pod b -> pod a across nodes: {}", out.trim());
        }
        other => panic!("tcp sink: {other:?}"),
    }
    let refused = format!("http://{}:7/", pa.ip);
    assert_eq!(
        pods::testpod_client(&bin, &pb.netns, &["get", &refused]).await.unwrap(),
        ClientOutcome::Failed(NetError::Refused)
    );

    // A Service over the pods: the real EndpointSlice controller lists both, ready.
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service");
    let (eps, _) = wait_endpoints(&client, "web", "both endpoints ready", Duration::from_secs(20), |e| {
        e.len() == 2 && e.iter().all(|e| e.ready == Some(true))
    })
    .await;
    let ea = endpoint(&eps, &pa.name).expect("endpoint of pod a");
    assert_eq!(ea.addresses, vec![pa.ip.to_string()]);
    assert_eq!(ea.node.as_deref(), Some(node_a.name.as_str()));
    assert_eq!(ea.zone.as_deref(), Some(node_a.zone.as_str()));

    // Readiness flip: pod a fails /ready -> Pod Ready false -> endpoint ready false; and back.
    let t0 = Instant::now();
    kubelet.set_ready("default", &pa.name, false).await.unwrap();
    let took = kubelet
        .wait_ready("default", &pa.name, false, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        took >= Duration::from_millis(500),
        "3 failures at 300 ms cannot take {took:?}"
    );
    wait_endpoints(&client, "web", "pod a not ready", Duration::from_secs(10), |e| {
        endpoint(e, &pa.name).is_some_and(|x| x.ready == Some(false) && x.serving == Some(false))
            && endpoint(e, &pb.name).is_some_and(|x| x.ready == Some(true))
    })
    .await;
    eprintln!("readiness failure -> endpoint not ready in {:?}", t0.elapsed());
    let t0 = Instant::now();
    kubelet.set_ready("default", &pa.name, true).await.unwrap();
    kubelet
        .wait_ready("default", &pa.name, true, Duration::from_secs(10))
        .await
        .unwrap();
    wait_endpoints(&client, "web", "pod a ready again", Duration::from_secs(10), |e| {
        endpoint(e, &pa.name).is_some_and(|x| x.ready == Some(true))
    })
    .await;
    eprintln!("readiness recovery -> endpoint ready in {:?}", t0.elapsed());

    // Graceful delete of pod b with a 4 s grace period: terminating at once, still serving (its server drains:
    // /ready fails, so it turns not ready/not serving), its namespace removed only after the grace period.
    let grace = Duration::from_secs(4);
    let t0 = Instant::now();
    kubelet.delete_pod("default", &pb.name, Some(grace)).await.unwrap();
    let (eps, _) = wait_endpoints(&client, "web", "pod b terminating", Duration::from_secs(5), |e| {
        endpoint(e, &pb.name).is_some_and(|x| x.terminating == Some(true) && x.ready == Some(false))
    })
    .await;
    assert!(t0.elapsed() < grace, "terminating only after {:?}", t0.elapsed());
    assert_eq!(endpoint(&eps, &pa.name).unwrap().ready, Some(true));
    let w = pods::whoami(&node_a.netns, pb.addr(8080), t)
        .await
        .expect("pod b serves during its grace period");
    assert_eq!(w.pod, pb.name);
    kubelet
        .wait_ready("default", &pb.name, false, Duration::from_secs(5))
        .await
        .expect("Ready turns false");
    wait_endpoints(&client, "web", "pod b not serving", Duration::from_secs(5), |e| {
        endpoint(e, &pb.name).is_some_and(|x| x.serving == Some(false) && x.terminating == Some(true))
    })
    .await;
    assert!(
        t0.elapsed() < grace,
        "the grace period is not over yet ({:?})",
        t0.elapsed()
    );
    assert!(netns_exists(&pb.netns), "namespace must stay during the grace period");
    let gone = kubelet
        .wait_gone("default", &pb.name, Duration::from_secs(15))
        .await
        .unwrap();
    let total = t0.elapsed();
    eprintln!("pod b gone {total:?} after the delete (grace {grace:?}, waited {gone:?})");
    assert!(total >= grace, "removed before the grace period ended: {total:?}");
    assert!(!netns_exists(&pb.netns), "namespace left after the grace period");
    assert!(pods_api.get_opt(&pb.name).await.unwrap().is_none());
    wait_endpoints(&client, "web", "pod b left the slice", Duration::from_secs(10), |e| {
        e.len() == 1 && endpoint(e, &pa.name).is_some()
    })
    .await;
    assert!(pods::whoami(&node_a.netns, pb.addr(8080), Duration::from_millis(500))
        .await
        .is_err());

    // A new pod on node-b reuses the freed address.
    let again = kubelet.deploy(&spec.clone().on_node(&node_b.name)).await.unwrap();
    assert_eq!(again.len(), 2);
    assert!(
        again.iter().any(|p| p.ip == pb.ip),
        "freed IP {} reused: {again:?}",
        pb.ip
    );

    // Shutdown removes every pod namespace and object.
    kubelet.shutdown().await.expect("kubelet shutdown");
    assert!(!netns::list_orca_netns().iter().any(|n| n.starts_with("orca-pod-")));
    let left = pods_api.list(&Default::default()).await.unwrap();
    assert!(
        left.items.is_empty(),
        "pods left: {:?}",
        left.items.iter().map(|p| &p.metadata.name).collect::<Vec<_>>()
    );
    sb.down().expect("teardown");
    assert!(netns::list_orca_netns().is_empty());
}

fn restart_count(p: &KPod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map(|c| c.restart_count)
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_restart_keep_serving_when_terminating_and_resolve_named_ports() {
    use k8s_openapi::api::core::v1::Namespace;
    use orca_sandbox::kubelet::PortSpec;
    use orca_sandbox::pods::OnSigterm;
    if !should_run() {
        return;
    }
    let sb = Sandbox::up(SandboxOptions::default()).await.expect("sandbox up");
    let topo = sb.topology().clone();
    let client = sb.admin_client();
    let node_a = &topo.nodes[0];
    let t = Duration::from_secs(3);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": "team"}})).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.expect("namespace");
    let kubelet = Kubelet::with_binary(client.clone(), PodNode::from_topology(&topo), testpod());

    // Two deployments behind one Service whose targetPort is the name "web": 8080 in one, 7070 in the other.
    // No readiness probe (Ready once started); the first keeps serving while terminating.
    let one = DeploymentSpec::new("multi", 1)
        .namespace("team")
        .labels(&[("app", "multi")])
        .on_node(&node_a.name)
        .ports(vec![PortSpec::http("web", 8080), PortSpec::http("alt", 9090)])
        .readiness(None)
        .on_sigterm(OnSigterm::KeepReady);
    let two = DeploymentSpec::new("multi-seven", 1)
        .namespace("team")
        .labels(&[("app", "multi")])
        .ports(vec![PortSpec::http("web", 7070)])
        .readiness(None)
        .grace_period(Duration::from_secs(1));
    let p1 = kubelet.deploy(&one).await.expect("deploy multi").remove(0);
    let p2 = kubelet.deploy(&two).await.expect("deploy multi-seven").remove(0);
    assert_eq!(p1.netns, "orca-pod-team_".to_string() + &p1.name);
    kubelet
        .wait_ready("team", &p1.name, true, Duration::from_secs(5))
        .await
        .unwrap();
    kubelet
        .wait_ready("team", &p2.name, true, Duration::from_secs(5))
        .await
        .unwrap();
    for (p, port) in [(&p1, 8080), (&p1, 9090), (&p2, 7070)] {
        let w = pods::whoami(&node_a.netns, p.addr(port), t).await.expect("whoami");
        assert_eq!(
            (w.pod.as_str(), w.namespace.as_str(), w.server_port),
            (p.name.as_str(), "team", port)
        );
    }
    let services: Api<Service> = Api::namespaced(client.clone(), "team");
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "multi"},
        "spec": {"selector": {"app": "multi"},
                 "ports": [{"name": "web", "port": 80, "targetPort": "web", "protocol": "TCP"}]},
    }))
    .unwrap();
    services.create(&PostParams::default(), &svc).await.expect("service");
    let t0 = Instant::now();
    let eps = loop {
        let eps = service_endpoints(&client, "team", "multi").await.unwrap();
        if eps.len() == 2 && eps.iter().all(|e| e.ready == Some(true)) {
            break eps;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "endpoints: {eps:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let port_of = |pod: &str| endpoint(&eps, pod).map(|e| e.ports.clone());
    assert_eq!(
        port_of(&p1.name),
        Some(vec![("web".to_string(), 8080, "TCP".to_string())])
    );
    assert_eq!(
        port_of(&p2.name),
        Some(vec![("web".to_string(), 7070, "TCP".to_string())])
    );
    assert_ne!(
        endpoint(&eps, &p1.name).unwrap().slice,
        endpoint(&eps, &p2.name).unwrap().slice
    );

    // The server dies: the kubelet restarts it in the same namespace, restartCount 1, same IP.
    let pods_api: Api<KPod> = Api::namespaced(client.clone(), "team");
    assert_eq!(restart_count(&pods_api.get(&p1.name).await.unwrap()), 0);
    let pids = netns::ip(&["netns", "pids", &p1.netns]).unwrap();
    let pids = String::from_utf8_lossy(&pids.stdout).to_string();
    assert_eq!(
        pids.split_whitespace().count(),
        1,
        "one server process in {}: {pids}",
        p1.netns
    );
    netns::terminate(&[pids.trim().parse().unwrap()], Duration::ZERO);
    let t0 = Instant::now();
    loop {
        let obj = pods_api.get(&p1.name).await.unwrap();
        if restart_count(&obj) == 1 && orca_sandbox::kubelet::pod_ready(&obj) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no restart seen: {:?}",
            obj.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let w = pods::whoami(&node_a.netns, p1.addr(8080), t)
        .await
        .expect("restarted server answers");
    assert_eq!(w.pod_ip, p1.ip.to_string());

    // Graceful delete of a pod that stays ready while terminating: serving + terminating, not ready, then gone.
    let grace = Duration::from_secs(3);
    let t0 = Instant::now();
    kubelet.delete_pod("team", &p1.name, Some(grace)).await.unwrap();
    loop {
        let eps = service_endpoints(&client, "team", "multi").await.unwrap();
        let e = endpoint(&eps, &p1.name).cloned();
        if e.as_ref().is_some_and(|e| e.terminating == Some(true)) {
            let e = e.unwrap();
            assert_eq!((e.ready, e.serving), (Some(false), Some(true)), "{e:?}");
            break;
        }
        assert!(t0.elapsed() < grace, "not terminating in time: {eps:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let w = pods::whoami(&node_a.netns, p1.addr(8080), t)
        .await
        .expect("serves while terminating");
    assert_eq!(w.pod, p1.name);
    let gone = kubelet
        .wait_gone("team", &p1.name, Duration::from_secs(15))
        .await
        .unwrap();
    assert!(
        t0.elapsed() >= grace,
        "gone before its grace period: {:?}",
        t0.elapsed()
    );
    assert!(!netns_exists(&p1.netns));
    eprintln!("keep-ready pod gone {:?} after delete ({gone:?} waiting)", t0.elapsed());

    // Scaling: up to 3 (new pods Ready, requests to each answered by that pod), down to 1 (two leave).
    let t0 = Instant::now();
    let three = kubelet.scale(&two, 3).await.expect("scale up");
    eprintln!("scaled 1 -> 3 pods in {:?}", t0.elapsed());
    assert_eq!(three.len(), 3);
    for p in &three {
        kubelet
            .wait_ready("team", &p.name, true, Duration::from_secs(5))
            .await
            .unwrap();
        let s = pods::spread(&node_a.netns, p.addr(7070), 5, t).await;
        assert_eq!((s.per_pod.get(&p.name), s.failed()), (Some(&5), 0), "{s:?}");
    }
    let s = pods::spread(&node_a.netns, three[0].addr(7071), 3, t).await;
    assert_eq!(
        (s.answered(), s.failures.get("connection refused")),
        (0, Some(&3)),
        "{s:?}"
    );
    let one_left = kubelet.scale(&two, 1).await.expect("scale down");
    assert_eq!(one_left.len(), 1);
    for p in three.iter().filter(|p| p.name != one_left[0].name) {
        kubelet
            .wait_gone("team", &p.name, Duration::from_secs(10))
            .await
            .expect("scaled-down pod leaves");
    }
    assert_eq!(kubelet.pods_of("team", "multi-seven"), one_left);

    // A host-network pod: answers on its node's IP from the other node, its endpoint address is the node IP.
    let node_b = &topo.nodes[1];
    let hostnet = DeploymentSpec::new("hostnet", 1)
        .namespace("team")
        .on_node(&node_b.name)
        .ports(vec![PortSpec::http("web", 8090)])
        .readiness(Some(ProbeSpec::with_period(Duration::from_millis(300))))
        .host_network(true)
        .grace_period(Duration::from_secs(1));
    let h = kubelet.deploy(&hostnet).await.expect("host-network pod").remove(0);
    assert_eq!((h.ip, h.netns.as_str()), (node_b.ip, node_b.netns.as_str()));
    kubelet
        .wait_ready("team", &h.name, true, Duration::from_secs(5))
        .await
        .unwrap();
    let w = pods::whoami(&node_a.netns, h.addr(8090), t)
        .await
        .expect("host-network pod from node-a");
    assert_eq!(
        (w.pod.as_str(), w.client.ip()),
        (h.name.as_str(), std::net::IpAddr::V4(node_a.ip))
    );
    let hsvc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hostnet"},
        "spec": {"selector": {"app": "hostnet"}, "ports": [{"port": 80, "targetPort": "web"}]},
    }))
    .unwrap();
    services.create(&PostParams::default(), &hsvc).await.expect("service");
    let t0 = Instant::now();
    loop {
        let eps = service_endpoints(&client, "team", "hostnet").await.unwrap();
        if let Some(e) = endpoint(&eps, &h.name) {
            assert_eq!(e.addresses, vec![node_b.ip.to_string()]);
            assert_eq!(e.ports, vec![(String::new(), 8090, "TCP".to_string())]);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no endpoint for the host-network pod: {eps:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A second host-network pod on the same port and node cannot start; its object is removed again.
    let clash = kubelet.deploy(&hostnet).await;
    let err = format!("{:#}", clash.expect_err("port clash must fail"));
    assert!(err.contains("exited") || err.contains("answered by"), "{err}");
    let left: Vec<String> = pods_api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .filter(|n| n.starts_with("hostnet-"))
        .collect();
    assert_eq!(left, vec![h.name.clone()], "only the running host-network pod remains");
    kubelet.delete_pod("team", &h.name, None).await.unwrap();
    kubelet
        .wait_gone("team", &h.name, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        netns_exists(&node_b.netns),
        "deleting a host-network pod keeps its node"
    );
    assert!(
        pods::tcp_connect(&node_a.netns, h.addr(8090), t).await.is_err(),
        "its server is gone"
    );

    // Liveness: /healthy failing 3 times in a row restarts the server, which comes back healthy and Ready.
    let live = DeploymentSpec::new("live", 1)
        .namespace("team")
        .on_node(&node_a.name)
        .ports(vec![PortSpec::http("web", 8080)])
        .readiness(Some(ProbeSpec::with_period(Duration::from_millis(300))))
        .liveness(Some(ProbeSpec::healthy(Duration::from_millis(300))))
        .grace_period(Duration::from_secs(1));
    let l = kubelet.deploy(&live).await.expect("liveness pod").remove(0);
    kubelet
        .wait_ready("team", &l.name, true, Duration::from_secs(5))
        .await
        .unwrap();
    kubelet.set_healthy("team", &l.name, false).await.unwrap();
    let t0 = Instant::now();
    loop {
        let obj = pods_api.get(&l.name).await.unwrap();
        if restart_count(&obj) == 1 && orca_sandbox::kubelet::pod_ready(&obj) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no liveness restart: {:?}",
            obj.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(600),
        "3 failures at 300 ms cannot take {took:?}"
    );
    let r = pods::http_request(&node_a.netns, "GET", l.addr(8080), "/healthy", t)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "the restarted server is healthy");
    eprintln!("liveness failure -> restarted and Ready in {took:?}");

    // Dropping the kubelet (no shutdown) still removes the pod namespaces.
    drop(kubelet);
    let t0 = Instant::now();
    while netns_exists(&p2.netns) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{} survived the kubelet",
            p2.netns
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sb.down().expect("teardown");
}

/// `testpod_binary` (what `Kubelet::new` uses outside this crate's tests) finds or builds a working binary.
#[test]
fn testpod_binary_is_found_and_runs() {
    let bin = pods::testpod_binary().expect("orca-testpod binary");
    let out = std::process::Command::new(&bin)
        .arg("--help")
        .output()
        .expect("run orca-testpod");
    assert!(out.status.success(), "{}: {out:?}", bin.display());
    assert!(String::from_utf8_lossy(&out.stdout).contains("orca-testpod serve"));
    let bad = std::process::Command::new(&bin)
        .args(["serve", "--http-port", "x"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1), "bad flags exit 1 without a panic: {bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a port number"));
}
