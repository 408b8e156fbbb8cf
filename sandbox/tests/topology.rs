//! The network topology alone (no control plane): namespaces, bridge, addresses, routes, sysctls, reachability,
//! and a teardown that leaves nothing, also of processes started inside the namespaces. Needs root.
use orca_sandbox::controlplane::NetnsConnector;
use orca_sandbox::netns::{self, SandboxLock};
use orca_sandbox::Topology;
use std::net::SocketAddr;
use std::time::Duration;

fn stdout(o: std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_is_created_reachable_and_torn_down() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (network namespaces)");
    }
    let lock = SandboxLock::acquire(Duration::from_secs(600)).expect("lock");
    netns::teardown();
    let topo = Topology::default();
    let created = topo.create();
    // Tear down whatever happens below.
    struct Guard;
    impl Drop for Guard {
        fn drop(&mut self) {
            netns::teardown();
        }
    }
    let _guard = Guard;
    created.expect("create topology");

    let mut names = netns::list_sandbox_netns();
    names.sort();
    let mut want = topo.netns_names();
    want.sort();
    assert_eq!(names, want);

    for node in &topo.nodes {
        let addrs = stdout(topo.exec(&node.netns, &["ip", "-4", "-o", "addr"]).unwrap());
        assert!(addrs.contains(&format!("{}/24", node.ip)), "{addrs}");
        assert!(addrs.contains("127.0.0.1/8"), "lo is not up: {addrs}");
        let fwd = stdout(
            topo.exec(&node.netns, &["sysctl", "-n", "net.ipv4.ip_forward"])
                .unwrap(),
        );
        assert_eq!(fwd.trim(), "1");
        let routes = stdout(topo.exec(&node.netns, &["ip", "route"]).unwrap());
        for other in topo.nodes.iter().filter(|o| o.name != node.name) {
            assert!(
                routes.contains(&format!("{} via {}", other.pod_cidr, other.ip)),
                "{}: {routes}",
                node.name
            );
        }
    }
    let client_routes = stdout(topo.exec(&topo.client.netns, &["ip", "route"]).unwrap());
    assert!(
        client_routes.contains(&format!("{} via {}", topo.lb_cidr, topo.nodes[0].ip)),
        "{client_routes}"
    );
    assert!(
        !client_routes.contains("10.244."),
        "the client must not route pod CIDRs: {client_routes}"
    );

    // A connect to a closed port proves the path: the peer's kernel answers with a RST (ConnectionRefused).
    let client = NetnsConnector::new(&topo.client.netns).unwrap();
    for node in &topo.nodes {
        let err = client
            .connect(SocketAddr::from((node.ip, 9)))
            .await
            .expect_err("nothing listens on port 9");
        assert_eq!(
            err.root_cause()
                .downcast_ref::<std::io::Error>()
                .map(std::io::Error::kind),
            Some(std::io::ErrorKind::ConnectionRefused),
            "client -> {}: {err:#}",
            node.name
        );
    }
    // Addresses outside the fabric are unreachable from the client (no default route): fails fast.
    let err = client
        .connect("10.244.1.1:80".parse().unwrap())
        .await
        .expect_err("no route to pod CIDRs from the client");
    let kind = err
        .root_cause()
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind);
    assert_eq!(kind, Some(std::io::ErrorKind::NetworkUnreachable), "{err:#}");

    // A process started inside a namespace (recorded) and one started behind the sandbox's back (not recorded)
    // are both gone after teardown.
    let mut recorded = topo
        .spawn(&topo.nodes[1].netns, &["sleep", "300"], "test-sleep")
        .unwrap();
    let mut unrecorded = netns::command_in(&topo.nodes[0].netns, "sleep", &["301"])
        .spawn()
        .unwrap();
    drop(client);
    let removed = netns::teardown();
    assert!(netns::list_sandbox_netns().is_empty(), "{removed:?}");
    let st = recorded.wait().unwrap();
    assert!(!st.success());
    let st = unrecorded.wait().unwrap();
    assert!(!st.success());
    drop(lock);
}
