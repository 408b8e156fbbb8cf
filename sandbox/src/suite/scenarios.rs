//! The scenarios. Each one deploys its pods and Services into its own namespace, asserts what a user would check,
//! and leaves the cleanup of its namespace to the runner.
use crate::kubelet::{DeploymentSpec, Placement, PodInfo, PortSpec, ProbeSpec};
use crate::pods::{self, NetError};
use crate::suite::ctx::{
    cluster_ip, cluster_ip6, eventually, expect_backends, expect_refused, expect_unanswered, health_check_node_port,
    names, node_port, sa, sample, Ctx, CONVERGE,
};
use crate::suite::dual_stack::v6_service;
use anyhow::{bail, ensure, Context, Result};
use futures::future::BoxFuture;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A scenario: a name (also its namespace prefix), what it checks, and its body.
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(Arc<Ctx>) -> BoxFuture<'static, Result<()>>,
}

/// A scenario that needs longer than the suite's per-scenario limit gets this much.
pub fn time_limit(name: &str) -> Option<Duration> {
    match name {
        "soak" => Some(Duration::from_secs(480)),
        "ipv6" | "ipv6-edges" | "dual-stack" => Some(Duration::from_secs(300)),
        _ => None,
    }
}

/// Every scenario, in the order the suite runs them.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "seed",
            about: "kuard, alpaca-prod x3, bandicoot-prod x2: spread, readiness flip, NodePort, LoadBalancer",
            run: |c| Box::pin(seed(c)),
        },
        Scenario {
            name: "no-endpoints",
            about: "a Service without endpoints refuses connections (ClusterIP and NodePort) instead of timing out",
            run: |c| Box::pin(no_endpoints(c)),
        },
        Scenario {
            name: "affinity",
            about: "sessionAffinity ClientIP sticks (ClusterIP and NodePort), switched off spreads, on again sticks",
            run: |c| Box::pin(affinity(c)),
        },
        Scenario {
            name: "affinity-timeout",
            about: "ClientIP affinity with timeoutSeconds 2: sticky within the window, re-balanced after pauses of 5s",
            run: |c| Box::pin(affinity_timeout(c)),
        },
        Scenario {
            name: "proxy-name",
            about: "a Service labelled service-proxy-name=foo-bar is ignored; removing the label serves it",
            run: |c| Box::pin(proxy_name(c)),
        },
        Scenario {
            name: "headless-label",
            about: "a hand-written EndpointSlice serves a selector-less Service until labelled service.kubernetes.io/headless",
            run: |c| Box::pin(headless_label(c)),
        },
        Scenario {
            name: "itp-local",
            about: "internalTrafficPolicy=Local: only node-local endpoints, nothing from a node without one",
            run: |c| Box::pin(itp_local(c)),
        },
        Scenario {
            name: "etp-local",
            about: "LoadBalancer with externalTrafficPolicy=Local: client IP preserved, no answer on a node without endpoints, healthCheckNodePort 200/503",
            run: |c| Box::pin(etp_local(c)),
        },
        Scenario {
            name: "source-ip",
            about: "the backend sees the client pod's IP through a ClusterIP (local and remote endpoints)",
            run: |c| Box::pin(source_ip(c)),
        },
        Scenario {
            name: "hairpin",
            about: "a pod reaches itself through its own Service",
            run: |c| Box::pin(hairpin(c)),
        },
        Scenario {
            name: "multiport",
            about: "two Service ports with named targetPorts resolving to different container ports per endpoint",
            run: |c| Box::pin(multiport(c)),
        },
        Scenario {
            name: "ports-update",
            about: "a port added to a Service answers; a removed one stops answering",
            run: |c| Box::pin(ports_update(c)),
        },
        Scenario {
            name: "recreate",
            about: "a deleted Service stops answering; recreated under the same name it answers again",
            run: |c| Box::pin(recreate(c)),
        },
        Scenario {
            name: "nodeport-release",
            about: "a NodePort freed by a delete is reusable by another Service, which then answers on it",
            run: |c| Box::pin(nodeport_release(c)),
        },
        Scenario {
            name: "publish-not-ready",
            about: "publishNotReadyAddresses: a not-ready pod answers through that Service, not through a plain one",
            run: |c| Box::pin(publish_not_ready(c)),
        },
        Scenario {
            name: "terminating",
            about: "with only a terminating (still serving) endpoint, traffic falls back to it: iTP Cluster, and iTP Local on its node only",
            run: |c| Box::pin(terminating(c)),
        },
        Scenario {
            name: "external-ip",
            about: "an externalIP assigned to no node answers from the client; removed, it stops",
            run: |c| Box::pin(external_ip(c)),
        },
        Scenario {
            name: "type-change",
            about: "ExternalName -> ClusterIP -> NodePort -> ClusterIP -> ExternalName, each answering (or not) as it should",
            run: |c| Box::pin(type_change(c)),
        },
        Scenario {
            name: "lb-source-ranges",
            about: "loadBalancerSourceRanges: the client is served while its IP is in the ranges, not after it is taken out",
            run: |c| Box::pin(lb_source_ranges(c)),
        },
        Scenario {
            name: "multi-slice",
            about: "one Service, two hand-written EndpointSlices: endpoints of both answer",
            run: |c| Box::pin(multi_slice(c)),
        },
        Scenario {
            name: "netfilter-forward",
            about: "a FORWARD DROP rule for the backend pod on the translating node blocks the ClusterIP and the \
                    NodePort (netfilter sees Service traffic), and removing it restores both",
            run: |c| Box::pin(netfilter_forward(c)),
        },
        Scenario {
            name: "shared-external-ip",
            about: "two Services claim the same externalIP:port; once the first is deleted the second serves it",
            run: |c| Box::pin(shared_external_ip(c)),
        },
        Scenario {
            name: "host-clients",
            about: "processes of each node's own namespace (in the node's cgroup) reach a ClusterIP and both nodes' \
                    NodePorts, and are refused by a Service without endpoints",
            run: |c| Box::pin(host_clients(c)),
        },
        Scenario {
            name: "agent-restart",
            about: "node-a's proxy killed with SIGKILL and started again 3 s later: long-lived TCP connections \
                    through a ClusterIP (from a pod) and a NodePort (from the client), over IPv4 and IPv6, and a steady \
                    UDP flow keep going, new connections of both families work during the outage, and the new agent \
                    follows an endpoint removed meanwhile",
            run: |c| Box::pin(agent_restart(c)),
        },
        Scenario {
            name: "soak",
            about: "from the client, 20,000 TCP connections within 60 s to a NodePort (eTP=Cluster, masqueraded, \
                    backend on the other node) and 2,000 more once their conntrack entries expired; meanwhile 200,000 \
                    UDP flows to a ClusterIP and a long-lived TCP connection that never breaks",
            run: |c| Box::pin(soak(c)),
        },
        Scenario {
            name: "udp-cycle",
            about: "UDP to a NodePort from a fixed source port reaches the new pod after the old one is deleted",
            run: |c| Box::pin(udp_cycle(c)),
        },
        Scenario {
            name: "ipv6",
            about: "SingleStack IPv6: spread and readiness flip on the ClusterIP, NodePort on both nodes and the \
                    LoadBalancer IP from the client, host-network clients, ClientIP affinity, source ranges",
            run: |c| Box::pin(crate::suite::dual_stack::ipv6(c)),
        },
        Scenario {
            name: "ipv6-edges",
            about: "SingleStack IPv6: no endpoints refused, eTP=Local keeps the client's address (health check \
                    200/503), hairpin, a UDP flow follows a replaced pod",
            run: |c| Box::pin(crate::suite::dual_stack::ipv6_edges(c)),
        },
        Scenario {
            name: "dual-stack",
            about: "RequireDualStack: both cluster IPs (source kept) and the NodePort in both families; \
                    SingleStack IPv4 upgraded to PreferDualStack gains a working IPv6 IP and loses it downgraded",
            run: |c| Box::pin(crate::suite::dual_stack::dual_stack(c)),
        },
    ]
}

/// A Deployment-like spec with a fast readiness probe (500 ms period, failure threshold 3).
pub fn spec(name: &str, replicas: usize) -> DeploymentSpec {
    DeploymentSpec::new(name, replicas).readiness(Some(ProbeSpec::with_period(Duration::from_millis(500))))
}

/// A ClusterIP Service JSON: `app=<app>` selector, port `port` to targetPort 8080.
pub(crate) fn simple_service(name: &str, app: &str, port: u16) -> serde_json::Value {
    json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": port, "targetPort": 8080, "protocol": "TCP"}]},
    })
}

/// The load-balancer ingress IP the seed writes (inside the topology's LB range, routed from the client).
pub const SEED_LB_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 10);

/// The seed's objects.
pub struct SeedApp {
    pub kuard: PodInfo,
    pub alpaca: Vec<PodInfo>,
    pub bandicoot: Vec<PodInfo>,
}

/// Deploy the seed example: kuard, alpaca-prod (3, ver=1 app=alpaca env=prod), bandicoot-prod (2, ver=2
/// app=bandicoot env=prod) and ClusterIP Services for both deployments (port 8080, like `kubectl expose`).
pub async fn deploy_seed(ctx: &Ctx) -> Result<SeedApp> {
    let kuard = ctx
        .deploy(spec("kuard", 1).labels(&[("run", "kuard")]).on_node("node-a"))
        .await?
        .remove(0);
    let mut a = spec("alpaca-prod", 3).labels(&[("ver", "1"), ("app", "alpaca"), ("env", "prod")]);
    a.placement = Placement::Nodes(vec!["node-a".into(), "node-b".into()]);
    let alpaca = ctx.deploy(a).await?;
    let mut b = spec("bandicoot-prod", 2).labels(&[("ver", "2"), ("app", "bandicoot"), ("env", "prod")]);
    b.placement = Placement::Nodes(vec!["node-a".into(), "node-b".into()]);
    let bandicoot = ctx.deploy(b).await?;
    for (name, sel) in [
        ("alpaca-prod", json!({"ver": "1", "app": "alpaca", "env": "prod"})),
        ("bandicoot-prod", json!({"ver": "2", "app": "bandicoot", "env": "prod"})),
    ] {
        ctx.create_service(json!({
            "metadata": {"name": name, "labels": sel},
            "spec": {"selector": sel, "ports": [{"port": 8080, "targetPort": 8080, "protocol": "TCP"}]},
        }))
        .await?;
    }
    ctx.wait_endpoints("alpaca-prod", 3).await?;
    ctx.wait_endpoints("bandicoot-prod", 2).await?;
    Ok(SeedApp {
        kuard,
        alpaca,
        bandicoot,
    })
}

async fn seed(ctx: Arc<Ctx>) -> Result<()> {
    let app = deploy_seed(&ctx).await?;
    let a_ip = cluster_ip(&ctx.get_service("alpaca-prod").await?)?;
    let b_ip = cluster_ip(&ctx.get_service("bandicoot-prod").await?)?;
    let from = app.kuard.netns.as_str();
    let all_alpaca = names(&app.alpaca);
    let s = expect_backends(from, sa(a_ip, 8080), &all_alpaca).await?;
    ctx.step(format!("alpaca-prod {a_ip}:8080 from kuard: {s}"));
    let s = expect_backends(from, sa(b_ip, 8080), &names(&app.bandicoot)).await?;
    ctx.step(format!("bandicoot-prod {b_ip}:8080 from kuard: {s}"));

    // One alpaca pod fails its readiness probe: it leaves the answers, and comes back once it recovers.
    let victim = &app.alpaca[0];
    let rest: BTreeSet<String> = names(&app.alpaca[1..]);
    let t = Instant::now();
    ctx.kubelet.set_ready(&ctx.ns, &victim.name, false).await?;
    expect_backends(from, sa(a_ip, 8080), &rest)
        .await
        .with_context(|| format!("{} failing readiness should leave the answers", victim.name))?;
    ctx.step(format!(
        "{} failing /ready: out of the answers after {:.1}s",
        victim.name,
        t.elapsed().as_secs_f64()
    ));
    let t = Instant::now();
    ctx.kubelet.set_ready(&ctx.ns, &victim.name, true).await?;
    expect_backends(from, sa(a_ip, 8080), &all_alpaca)
        .await
        .with_context(|| format!("{} recovered should answer again", victim.name))?;
    ctx.step(format!(
        "{} recovered: back after {:.1}s",
        victim.name,
        t.elapsed().as_secs_f64()
    ));

    // NodePort: every node's IP answers from the external client, with every replica.
    let svc = ctx
        .patch_service("alpaca-prod", json!({"spec": {"type": "NodePort"}}))
        .await?;
    let np = node_port(&svc, None)?;
    for node in &ctx.topo.nodes {
        let s = expect_backends(ctx.client_ns(), sa(node.ip, np), &all_alpaca).await?;
        ctx.step(format!("NodePort {}:{np} from the client: {s}", node.ip));
    }

    // LoadBalancer: the harness writes the ingress IP; the client reaches it (routed to node-a).
    ctx.patch_service("alpaca-prod", json!({"spec": {"type": "LoadBalancer"}}))
        .await?;
    ctx.set_lb_ingress("alpaca-prod", SEED_LB_IP).await?;
    let s = expect_backends(ctx.client_ns(), sa(SEED_LB_IP, 8080), &all_alpaca).await?;
    ctx.step(format!("LoadBalancer {SEED_LB_IP}:8080 from the client: {s}"));
    Ok(())
}

async fn no_endpoints(ctx: Arc<Ctx>) -> Result<()> {
    let client = ctx.client_pod("client", "node-a").await?;
    let svc = ctx
        .create_service(json!({
            "metadata": {"name": "no-endpoints"},
            "spec": {"type": "NodePort", "selector": {"app": "nothing-matches-this"},
                     "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        }))
        .await?;
    let ip = cluster_ip(&svc)?;
    let np = node_port(&svc, None)?;
    expect_refused(&client.netns, sa(ip, 80)).await?;
    ctx.step(format!("ClusterIP {ip}:80 from a pod: refused"));
    for node in &ctx.topo.nodes {
        expect_refused(ctx.client_ns(), sa(node.ip, np)).await?;
        ctx.step(format!("NodePort {}:{np} from the client: refused", node.ip));
    }
    Ok(())
}

/// Poll until `n` requests from `from` to `addr` all land on one pod; returns it.
pub(crate) async fn expect_sticky(from: &str, addr: std::net::SocketAddr, n: usize) -> Result<String> {
    eventually(
        &format!("requests from {from} to {addr} sticking to one pod"),
        CONVERGE,
        || async {
            let s = sample(from, addr, n).await;
            if s.failed() == 0 && s.answers.len() == 1 {
                Ok(s.pods().into_iter().next().unwrap_or_default())
            } else {
                bail!("got {s}")
            }
        },
    )
    .await
}

async fn affinity(ctx: Arc<Ctx>) -> Result<()> {
    let backends = ctx.deploy(spec("affinity", 3)).await?;
    let all = names(&backends);
    let client = ctx.client_pod("client", "node-a").await?;
    let mut svc = simple_service("affinity", "affinity", 80);
    svc["spec"]["type"] = json!("NodePort");
    svc["spec"]["sessionAffinity"] = json!("ClientIP");
    let svc = ctx.create_service(svc).await?;
    let (ip, np) = (cluster_ip(&svc)?, node_port(&svc, None)?);
    ctx.wait_endpoints("affinity", 3).await?;
    let pod = expect_sticky(&client.netns, sa(ip, 80), 30).await?;
    ctx.step(format!(
        "ClusterIP with ClientIP affinity: 30 requests all answered by {pod}"
    ));
    let node_a = ctx.node("node-a")?.ip;
    let pod = expect_sticky(ctx.client_ns(), sa(node_a, np), 30).await?;
    ctx.step(format!(
        "NodePort with ClientIP affinity: 30 requests all answered by {pod}"
    ));

    ctx.patch_service(
        "affinity",
        json!({"spec": {"sessionAffinity": "None", "sessionAffinityConfig": null}}),
    )
    .await?;
    let s = expect_backends(&client.netns, sa(ip, 80), &all).await?;
    ctx.step(format!("affinity off, ClusterIP: {s}"));
    let s = expect_backends(ctx.client_ns(), sa(node_a, np), &all).await?;
    ctx.step(format!("affinity off, NodePort: {s}"));

    ctx.patch_service("affinity", json!({"spec": {"sessionAffinity": "ClientIP"}}))
        .await?;
    let pod = expect_sticky(&client.netns, sa(ip, 80), 30).await?;
    ctx.step(format!("affinity on again: all answered by {pod}"));
    Ok(())
}

async fn affinity_timeout(ctx: Arc<Ctx>) -> Result<()> {
    ctx.deploy(spec("sticky", 3)).await?;
    let client = ctx.client_pod("client", "node-a").await?;
    let mut svc = simple_service("sticky", "sticky", 80);
    svc["spec"]["sessionAffinity"] = json!("ClientIP");
    svc["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 2}});
    let svc = ctx.create_service(svc).await?;
    let addr = sa(cluster_ip(&svc)?, 80);
    ctx.wait_endpoints("sticky", 3).await?;
    let first = expect_sticky(&client.netns, addr, 10).await?;
    ctx.step(format!("sticky to {first}"));
    // After each pause longer than the timeout the affinity is gone and the next pick is random: across up to 8
    // rounds (each itself sticky) a second pod shows up unless the proxy never expires it (chance of a false
    // failure: (1/3)^8).
    let mut seen = BTreeSet::from([first.clone()]);
    for round in 1..=8 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let s = sample(&client.netns, addr, 5).await;
        ensure!(
            s.failed() == 0 && s.answers.len() == 1,
            "round {round}: 5 quick requests were not sticky: {s}"
        );
        seen.extend(s.pods());
        if seen.len() > 1 {
            ctx.step(format!(
                "after {round} pause(s) of 5s the affinity expired: now {:?}",
                s.pods()
            ));
            return Ok(());
        }
    }
    bail!("still sticky to {first} after 8 pauses longer than timeoutSeconds=2")
}

async fn proxy_name(ctx: Arc<Ctx>) -> Result<()> {
    let backends = ctx.deploy(spec("web", 2)).await?;
    let all = names(&backends);
    let client = ctx.client_pod("client", "node-a").await?;
    let mut other = simple_service("other-proxy", "web", 80);
    other["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "foo-bar"});
    let other = ctx.create_service(other).await?;
    let plain = ctx.create_service(simple_service("plain", "web", 80)).await?;
    ctx.wait_endpoints("plain", 2).await?;
    // Once the plain Service answers, the proxy has synced the Service created before it.
    let s = expect_backends(&client.netns, sa(cluster_ip(&plain)?, 80), &all).await?;
    ctx.step(format!("plain Service: {s}"));
    let ip = cluster_ip(&other)?;
    let errs = expect_unanswered(&client.netns, sa(ip, 80)).await?;
    ctx.step(format!(
        "Service labelled service-proxy-name=foo-bar ({ip}): not served ({})",
        errs[0]
    ));
    ctx.patch_service(
        "other-proxy",
        json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": null}}}),
    )
    .await?;
    let s = expect_backends(&client.netns, sa(ip, 80), &all).await?;
    ctx.step(format!("service-proxy-name label removed: {s}"));
    Ok(())
}

/// Like upstream's "should implement service.kubernetes.io/headless": a selector-less Service with a
/// hand-written EndpointSlice answers; once the slice carries the headless label, it stops.
async fn headless_label(ctx: Arc<Ctx>) -> Result<()> {
    let backend = ctx.deploy(spec("custom", 1)).await?.remove(0);
    let client = ctx.client_pod("client", "node-a").await?;
    let svc = ctx
        .create_service(json!({
            "metadata": {"name": "custom-endpoints"},
            "spec": {"ports": [{"name": "port80", "port": 80, "protocol": "TCP"}]},
        }))
        .await?;
    let ip = cluster_ip(&svc)?;
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "custom-slice", "labels": {
            "kubernetes.io/service-name": "custom-endpoints",
            "endpointslice.kubernetes.io/managed-by": "orca-suite",
        }},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [backend.ip.to_string()], "conditions": {"ready": true}}],
        "ports": [{"name": "port80", "port": 8080, "protocol": "TCP"}],
    }))?;
    slices
        .create(&PostParams::default(), &slice)
        .await
        .context("creating the EndpointSlice")?;
    let s = expect_backends(&client.netns, sa(ip, 80), &BTreeSet::from([backend.name.clone()])).await?;
    ctx.step(format!("selector-less Service with a hand-written EndpointSlice: {s}"));
    slices
        .patch(
            "custom-slice",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"service.kubernetes.io/headless": ""}}})),
        )
        .await
        .context("labelling the EndpointSlice headless")?;
    let errs = expect_unanswered(&client.netns, sa(ip, 80)).await?;
    ctx.step(format!(
        "slice labelled service.kubernetes.io/headless: not served ({})",
        errs[0]
    ));
    Ok(())
}

async fn itp_local(ctx: Arc<Ctx>) -> Result<()> {
    let backend = ctx.deploy(spec("backend", 1).on_node("node-b")).await?;
    let all = names(&backend);
    let ca = ctx.client_pod("client-a", "node-a").await?;
    let cb = ctx.client_pod("client-b", "node-b").await?;
    let svc = ctx.create_service(simple_service("itp", "backend", 80)).await?;
    let addr = sa(cluster_ip(&svc)?, 80);
    ctx.wait_endpoints("itp", 1).await?;
    expect_backends(&ca.netns, addr, &all).await?;
    expect_backends(&cb.netns, addr, &all).await?;
    ctx.step("internalTrafficPolicy Cluster: both nodes' pods reach the node-b backend");
    ctx.patch_service("itp", json!({"spec": {"internalTrafficPolicy": "Local"}}))
        .await?;
    let errs = expect_unanswered(&ca.netns, addr).await?;
    ctx.step(format!(
        "Local, from node-a (no local endpoint): not answered ({})",
        errs[0]
    ));
    let s = expect_backends(&cb.netns, addr, &all).await?;
    ctx.step(format!("Local, from node-b: {s}"));
    Ok(())
}

/// The load-balancer IP of the eTP=Local scenario (routed from the client to node-a).
pub const ETP_LB_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);

async fn etp_local(ctx: Arc<Ctx>) -> Result<()> {
    let backend = ctx.deploy(spec("backend", 1).on_node("node-a")).await?;
    let all = names(&backend);
    let mut svc = simple_service("etp", "backend", 80);
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    // A second port to the same pod port: the health check counts the backend's ip:port once (kube-proxy's
    // LocalReadyEndpoints), not once per service port.
    svc["spec"]["ports"]
        .as_array_mut()
        .context("the Service's ports")?
        .push(json!({"name": "alt", "port": 81, "targetPort": 8080, "protocol": "TCP"}));
    let svc = ctx.create_service(svc).await?;
    ctx.set_lb_ingress("etp", ETP_LB_IP).await?;
    let np = node_port(&svc, None)?;
    let hc = health_check_node_port(&svc)?;
    ctx.wait_endpoints("etp", 1).await?;
    let (a, b) = (ctx.node("node-a")?.ip, ctx.node("node-b")?.ip);
    let client_ip = IpAddr::V4(ctx.topo.client.ip);
    for (what, addr) in [
        ("NodePort on node-a", sa(a, np)),
        ("load-balancer IP (to node-a)", sa(ETP_LB_IP, 80)),
    ] {
        let s = expect_backends(ctx.client_ns(), addr, &all).await?;
        ensure!(
            s.sources == BTreeSet::from([client_ip]),
            "{what}: the backend saw {:?}, not the client's {client_ip}",
            s.sources
        );
        ctx.step(format!(
            "{what} {addr} (local endpoint): {s}, source {client_ip} preserved"
        ));
    }
    let errs = expect_unanswered(ctx.client_ns(), sa(b, np)).await?;
    ctx.step(format!(
        "NodePort on node-b (no local endpoint): not answered ({})",
        errs[0]
    ));
    for (ip, want) in [(a, 200u16), (b, 503u16)] {
        let body = eventually(
            &format!("healthCheckNodePort {ip}:{hc} answering {want}"),
            CONVERGE,
            || async {
                match pods::http_request(ctx.client_ns(), "GET", sa(ip, hc), "/", Duration::from_secs(2)).await {
                    Ok(r) if r.status == want => Ok(r.body),
                    Ok(r) => bail!("HTTP {} {}", r.status, r.body.trim()),
                    Err(e) => bail!("{e}"),
                }
            },
        )
        .await?;
        let compact: String = body.split_whitespace().collect();
        let v: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("the body {body:?}"))?;
        let local = if want == 200 { 1 } else { 0 };
        ensure!(
            v["localEndpoints"] == json!(local) && v["service"]["name"] == json!("etp"),
            "healthCheckNodePort {ip}:{hc}: localEndpoints {local} (one backend behind two ports) expected in {compact}"
        );
        ctx.step(format!("healthCheckNodePort {ip}:{hc}: {want} {compact}"));
    }
    Ok(())
}

async fn source_ip(ctx: Arc<Ctx>) -> Result<()> {
    let mut s = spec("echo-source", 2);
    s.placement = Placement::Nodes(vec!["node-a".into(), "node-b".into()]);
    let backends = ctx.deploy(s).await?;
    let client = ctx.client_pod("client", "node-a").await?;
    let svc = ctx
        .create_service(simple_service("echo-source", "echo-source", 80))
        .await?;
    ctx.wait_endpoints("echo-source", 2).await?;
    let s = expect_backends(&client.netns, sa(cluster_ip(&svc)?, 80), &names(&backends)).await?;
    let want = BTreeSet::from([IpAddr::V4(client.ip)]);
    ensure!(
        s.sources == want,
        "backends saw {:?}, not the client pod's {}",
        s.sources,
        client.ip
    );
    ctx.step(format!("{s}: every backend (node-a and node-b) saw {}", client.ip));
    Ok(())
}

async fn hairpin(ctx: Arc<Ctx>) -> Result<()> {
    let pod = ctx.deploy(spec("hairpin", 1)).await?.remove(0);
    let svc = ctx.create_service(simple_service("hairpin", "hairpin", 80)).await?;
    ctx.wait_endpoints("hairpin", 1).await?;
    let s = expect_backends(
        &pod.netns,
        sa(cluster_ip(&svc)?, 80),
        &BTreeSet::from([pod.name.clone()]),
    )
    .await?;
    ctx.step(format!(
        "{} through its own Service: {s}, source seen {:?}",
        pod.name, s.sources
    ));
    Ok(())
}

async fn multiport(ctx: Arc<Ctx>) -> Result<()> {
    let a = ctx
        .deploy(
            spec("multi-a", 1)
                .labels(&[("app", "multiport")])
                .ports(vec![PortSpec::http("web", 8080), PortSpec::http("alt", 9090)]),
        )
        .await?
        .remove(0);
    let b = ctx
        .deploy(
            spec("multi-b", 1)
                .labels(&[("app", "multiport")])
                .ports(vec![PortSpec::http("web", 8085), PortSpec::http("alt", 9095)]),
        )
        .await?
        .remove(0);
    let client = ctx.client_pod("client", "node-a").await?;
    let svc = ctx
        .create_service(json!({
            "metadata": {"name": "multiport"},
            "spec": {"selector": {"app": "multiport"}, "ports": [
                {"name": "p80", "port": 80, "targetPort": "web", "protocol": "TCP"},
                {"name": "p81", "port": 81, "targetPort": "alt", "protocol": "TCP"},
            ]},
        }))
        .await?;
    ctx.wait_endpoints("multiport", 2).await?;
    let ip = cluster_ip(&svc)?;
    let both = BTreeSet::from([a.name.clone(), b.name.clone()]);
    for (port, pa, pb) in [(80u16, 8080u16, 8085u16), (81, 9090, 9095)] {
        let s = expect_backends(&client.netns, sa(ip, port), &both).await?;
        for (pod, want) in [(&a, pa), (&b, pb)] {
            let got = s.ports.get(&pod.name).cloned().unwrap_or_default();
            ensure!(
                got == BTreeSet::from([want]),
                "service port {port} reached {} on ports {got:?}, expected its {want}",
                pod.name
            );
        }
        ctx.step(format!(
            "port {port}: {s}; {} answered on {pa}, {} on {pb}",
            a.name, b.name
        ));
    }
    Ok(())
}

async fn ports_update(ctx: Arc<Ctx>) -> Result<()> {
    let pod = ctx
        .deploy(spec("ports", 1).ports(vec![PortSpec::http("web", 8080), PortSpec::http("alt", 9090)]))
        .await?
        .remove(0);
    let only = BTreeSet::from([pod.name.clone()]);
    let client = ctx.client_pod("client", "node-a").await?;
    let svc = ctx
        .create_service(json!({
            "metadata": {"name": "ports"},
            "spec": {"selector": {"app": "ports"}, "ports": [{"name": "a", "port": 80, "targetPort": "web"}]},
        }))
        .await?;
    let ip = cluster_ip(&svc)?;
    ctx.wait_endpoints("ports", 1).await?;
    expect_backends(&client.netns, sa(ip, 80), &only).await?;
    ctx.step("port 80 answers");
    ctx.patch_service(
        "ports",
        json!({"spec": {"ports": [{"name": "a", "port": 80, "targetPort": "web"}, {"name": "b", "port": 81, "targetPort": "alt"}]}}),
    )
    .await?;
    let s = expect_backends(&client.netns, sa(ip, 81), &only).await?;
    ensure!(
        s.ports.get(&pod.name) == Some(&BTreeSet::from([9090])),
        "added port 81 reached {:?}, not 9090",
        s.ports
    );
    ctx.step("added port 81 answers (container port 9090)");
    ctx.patch_service(
        "ports",
        json!({"spec": {"ports": [{"name": "b", "port": 81, "targetPort": "alt"}]}}),
    )
    .await?;
    let errs = expect_unanswered(&client.netns, sa(ip, 80)).await?;
    ctx.step(format!("removed port 80: not answered ({})", errs[0]));
    expect_backends(&client.netns, sa(ip, 81), &only).await?;
    ctx.step("port 81 still answers");
    Ok(())
}

async fn recreate(ctx: Arc<Ctx>) -> Result<()> {
    let backends = ctx.deploy(spec("recreate", 2)).await?;
    let all = names(&backends);
    let client = ctx.client_pod("client", "node-a").await?;
    let svc = ctx.create_service(simple_service("recreate", "recreate", 80)).await?;
    let ip = cluster_ip(&svc)?;
    ctx.wait_endpoints("recreate", 2).await?;
    expect_backends(&client.netns, sa(ip, 80), &all).await?;
    ctx.delete_service("recreate").await?;
    let errs = expect_unanswered(&client.netns, sa(ip, 80)).await?;
    ctx.step(format!("deleted: {ip}:80 not answered ({})", errs[0]));
    let svc = ctx.create_service(simple_service("recreate", "recreate", 80)).await?;
    let ip2 = cluster_ip(&svc)?;
    ctx.wait_endpoints("recreate", 2).await?;
    let s = expect_backends(&client.netns, sa(ip2, 80), &all).await?;
    ctx.step(format!("recreated ({ip2}): {s}"));
    Ok(())
}

async fn nodeport_release(ctx: Arc<Ctx>) -> Result<()> {
    let first = ctx.deploy(spec("first", 1)).await?;
    let second = ctx.deploy(spec("second", 1)).await?;
    let mut svc = simple_service("np-first", "first", 80);
    svc["spec"]["type"] = json!("NodePort");
    let svc = ctx.create_service(svc).await?;
    let np = node_port(&svc, None)?;
    ctx.wait_endpoints("np-first", 1).await?;
    let a = ctx.node("node-a")?.ip;
    expect_backends(ctx.client_ns(), sa(a, np), &names(&first)).await?;
    ctx.delete_service("np-first").await?;
    let errs = expect_unanswered(ctx.client_ns(), sa(a, np)).await?;
    ctx.step(format!("deleted: NodePort {np} not answered ({})", errs[0]));
    let mut svc = simple_service("np-second", "second", 80);
    svc["spec"]["type"] = json!("NodePort");
    svc["spec"]["ports"][0]["nodePort"] = json!(np);
    ctx.create_service(svc)
        .await
        .with_context(|| format!("nodePort {np} was not released by the delete"))?;
    ctx.wait_endpoints("np-second", 1).await?;
    for node in &ctx.topo.nodes {
        let s = expect_backends(ctx.client_ns(), sa(node.ip, np), &names(&second)).await?;
        ctx.step(format!("NodePort {np} reused by np-second on {}: {s}", node.ip));
    }
    Ok(())
}

async fn udp_cycle(ctx: Arc<Ctx>) -> Result<()> {
    let a = ctx
        .deploy(spec("udp-a", 1).labels(&[("app", "udp-server")]).on_node("node-b"))
        .await?
        .remove(0);
    let svc = ctx
        .create_service(json!({
            "metadata": {"name": "udp"},
            "spec": {"type": "NodePort", "selector": {"app": "udp-server"},
                     "ports": [{"name": "udp", "port": 8081, "targetPort": 8081, "protocol": "UDP"}]},
        }))
        .await?;
    let np = node_port(&svc, None)?;
    ctx.wait_endpoints("udp", 1).await?;
    let target = sa(ctx.node("node-a")?.ip, np);
    let local = sa(ctx.topo.client.ip, 40_001);
    let client_ns = ctx.client_ns().to_string();
    let first = eventually(
        &format!("UDP {target} from {local} answered by {}", a.name),
        CONVERGE,
        || async {
            match pods::udp_exchange(&client_ns, Some(local), target, "ping", Duration::from_secs(1)).await {
                Ok(r) if r.pod == a.name => Ok(r),
                Ok(r) => bail!("answered by {}", r.pod),
                Err(e) => bail!("{e}"),
            }
        },
    )
    .await?;
    ctx.step(format!("UDP from {local} to {target}: answered by {}", first.pod));
    let b = ctx
        .deploy(spec("udp-b", 1).labels(&[("app", "udp-server")]).on_node("node-a"))
        .await?
        .remove(0);
    ctx.wait_endpoints("udp", 2).await?;
    // The flow keeps going to the first pod (conntrack) while it exists.
    let r = pods::udp_exchange(&client_ns, Some(local), target, "ping", Duration::from_secs(1)).await;
    ctx.step(format!(
        "second pod {} ready; the flow is answered by {}",
        b.name,
        match &r {
            Ok(r) => r.pod.clone(),
            Err(e) => e.to_string(),
        }
    ));
    let t = Instant::now();
    ctx.kubelet.delete_pod(&ctx.ns, &a.name, Some(Duration::ZERO)).await?;
    ctx.kubelet.wait_gone(&ctx.ns, &a.name, Duration::from_secs(30)).await?;
    let r = eventually(
        &format!("UDP flow from {local} answered by {}", b.name),
        CONVERGE,
        || async {
            match pods::udp_exchange(&client_ns, Some(local), target, "ping", Duration::from_millis(700)).await {
                Ok(r) if r.pod == b.name => Ok(r),
                Ok(r) => bail!("answered by {}", r.pod),
                Err(NetError::Timeout) => bail!("timed out (stale conntrack entry to the deleted pod?)"),
                Err(e) => bail!("{e}"),
            }
        },
    )
    .await?;
    ctx.step(format!(
        "{} deleted: the same flow reached {} after {:.1}s",
        a.name,
        r.pod,
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

async fn publish_not_ready(ctx: Arc<Ctx>) -> Result<()> {
    let pods = ctx.deploy(spec("pnr", 2)).await?;
    let (ready, unready) = (&pods[0], &pods[1]);
    let client = ctx.client_pod("client", "node-a").await?;
    ctx.kubelet.set_ready(&ctx.ns, &unready.name, false).await?;
    ctx.kubelet.wait_ready(&ctx.ns, &unready.name, false, CONVERGE).await?;
    ctx.step(format!("{} is not Ready", unready.name));
    let plain = ctx.create_service(simple_service("pnr-plain", "pnr", 80)).await?;
    let mut published = simple_service("pnr-published", "pnr", 80);
    published["spec"]["publishNotReadyAddresses"] = json!(true);
    let published = ctx.create_service(published).await?;
    let s = expect_backends(
        &client.netns,
        sa(cluster_ip(&plain)?, 80),
        &BTreeSet::from([ready.name.clone()]),
    )
    .await?;
    ctx.step(format!("plain Service: {s}"));
    let s = expect_backends(&client.netns, sa(cluster_ip(&published)?, 80), &names(&pods)).await?;
    ctx.step(format!("publishNotReadyAddresses Service: {s}"));
    Ok(())
}

async fn terminating(ctx: Arc<Ctx>) -> Result<()> {
    let pod = ctx
        .deploy(
            spec("term", 1)
                .on_node("node-a")
                .on_sigterm(pods::OnSigterm::KeepReady)
                .grace_period(Duration::from_secs(20)),
        )
        .await?
        .remove(0);
    let only = BTreeSet::from([pod.name.clone()]);
    let ca = ctx.client_pod("client-a", "node-a").await?;
    let cb = ctx.client_pod("client-b", "node-b").await?;
    let svc = ctx.create_service(simple_service("term", "term", 80)).await?;
    let addr = sa(cluster_ip(&svc)?, 80);
    ctx.wait_endpoints("term", 1).await?;
    expect_backends(&ca.netns, addr, &only).await?;
    ctx.kubelet.delete_pod(&ctx.ns, &pod.name, None).await?;
    eventually("the endpoint terminating, serving, not ready", CONVERGE, || async {
        let eps = crate::kubelet::service_endpoints(&ctx.client, &ctx.ns, "term").await?;
        match eps.as_slice() {
            [e] if e.terminating == Some(true) && e.serving == Some(true) && e.ready == Some(false) => Ok(()),
            other => bail!("endpoints {other:?}"),
        }
    })
    .await?;
    ctx.step(format!(
        "{} deleted (grace 20s, keeps serving): endpoint terminating + serving",
        pod.name
    ));
    let s = expect_backends(&ca.netns, addr, &only).await?;
    ctx.step(format!("iTP Cluster, only a terminating endpoint, from node-a: {s}"));
    let s = expect_backends(&cb.netns, addr, &only).await?;
    ctx.step(format!("iTP Cluster, from node-b: {s}"));
    ctx.patch_service("term", json!({"spec": {"internalTrafficPolicy": "Local"}}))
        .await?;
    let errs = expect_unanswered(&cb.netns, addr).await?;
    ctx.step(format!(
        "iTP Local, from node-b (no local endpoint): not answered ({})",
        errs[0]
    ));
    let s = expect_backends(&ca.netns, addr, &only).await?;
    ctx.step(format!("iTP Local, from node-a (local terminating endpoint): {s}"));
    Ok(())
}

/// The externalIP of the external-ip scenario: in the LB range (routed from the client to node-a), on no node.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 20);

async fn external_ip(ctx: Arc<Ctx>) -> Result<()> {
    let backends = ctx.deploy(spec("ext", 2)).await?;
    let mut svc = simple_service("ext", "ext", 80);
    svc["spec"]["externalIPs"] = json!([EXTERNAL_IP.to_string()]);
    ctx.create_service(svc).await?;
    ctx.wait_endpoints("ext", 2).await?;
    let s = expect_backends(ctx.client_ns(), sa(EXTERNAL_IP, 80), &names(&backends)).await?;
    ctx.step(format!("externalIP {EXTERNAL_IP}:80 from the client: {s}"));
    ctx.patch_service("ext", json!({"spec": {"externalIPs": null}})).await?;
    let errs = expect_unanswered(ctx.client_ns(), sa(EXTERNAL_IP, 80)).await?;
    ctx.step(format!("externalIP removed: not answered ({})", errs[0]));
    Ok(())
}

/// The externalIP two Services of the shared-external-ip scenario both claim (LB range, routed to node-a).
pub const SHARED_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 21);

async fn shared_external_ip(ctx: Arc<Ctx>) -> Result<()> {
    let first = ctx.deploy(spec("first", 1)).await?;
    let second = ctx.deploy(spec("second", 1)).await?;
    let addr = sa(SHARED_EXTERNAL_IP, 80);
    for name in ["first", "second"] {
        let mut svc = simple_service(name, name, 80);
        svc["spec"]["externalIPs"] = json!([SHARED_EXTERNAL_IP.to_string()]);
        ctx.create_service(svc).await?;
        ctx.wait_endpoints(name, 1).await?;
    }
    let either: BTreeSet<String> = names(&first).union(&names(&second)).cloned().collect();
    let s = eventually(&format!("{addr} answered"), CONVERGE, || async {
        let s = sample(ctx.client_ns(), addr, 12).await;
        if s.failed() == 0 && s.pods().is_subset(&either) {
            Ok(s)
        } else {
            bail!("got {s}")
        }
    })
    .await?;
    ctx.step(format!("both Services claim {addr}: answered by {s}"));
    ctx.delete_service("first").await?;
    let s = expect_backends(ctx.client_ns(), addr, &names(&second)).await?;
    ctx.step(format!("first deleted: {addr} answered by the second's pod: {s}"));
    Ok(())
}

async fn type_change(ctx: Arc<Ctx>) -> Result<()> {
    let backends = ctx.deploy(spec("typed", 2)).await?;
    let all = names(&backends);
    let client = ctx.client_pod("client", "node-a").await?;
    ctx.create_service(json!({
        "metadata": {"name": "typed"},
        "spec": {"type": "ExternalName", "externalName": "typed.example.com"},
    }))
    .await?;
    let svc = ctx
        .patch_service(
            "typed",
            json!({"spec": {"type": "ClusterIP", "externalName": null, "selector": {"app": "typed"},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
        )
        .await?;
    let ip = cluster_ip(&svc)?;
    ctx.wait_endpoints("typed", 2).await?;
    let s = expect_backends(&client.netns, sa(ip, 80), &all).await?;
    ctx.step(format!("ExternalName -> ClusterIP {ip}: {s}"));
    let svc = ctx
        .patch_service("typed", json!({"spec": {"type": "NodePort"}}))
        .await?;
    let np = node_port(&svc, None)?;
    let a = ctx.node("node-a")?.ip;
    let s = expect_backends(ctx.client_ns(), sa(a, np), &all).await?;
    ctx.step(format!("ClusterIP -> NodePort {np}: {s}"));
    ctx.patch_service(
        "typed",
        json!({"spec": {"type": "ClusterIP",
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
    )
    .await?;
    let errs = expect_unanswered(ctx.client_ns(), sa(a, np)).await?;
    ctx.step(format!(
        "NodePort -> ClusterIP: nodePort {np} not answered ({})",
        errs[0]
    ));
    expect_backends(&client.netns, sa(ip, 80), &all).await?;
    ctx.patch_service(
        "typed",
        json!({"spec": {"type": "ExternalName", "externalName": "typed.example.com",
                "clusterIP": null, "clusterIPs": null, "selector": null}}),
    )
    .await?;
    let errs = expect_unanswered(&client.netns, sa(ip, 80)).await?;
    ctx.step(format!("ClusterIP -> ExternalName: {ip}:80 not answered ({})", errs[0]));
    Ok(())
}

/// The load-balancer IP of the lb-source-ranges scenario.
pub const RANGES_LB_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 12);

async fn lb_source_ranges(ctx: Arc<Ctx>) -> Result<()> {
    let backends = ctx.deploy(spec("ranged", 2)).await?;
    let client_range = format!("{}/32", ctx.topo.client.ip);
    let mut svc = simple_service("ranged", "ranged", 80);
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["loadBalancerSourceRanges"] = json!([client_range]);
    ctx.create_service(svc).await?;
    ctx.set_lb_ingress("ranged", RANGES_LB_IP).await?;
    ctx.wait_endpoints("ranged", 2).await?;
    let s = expect_backends(ctx.client_ns(), sa(RANGES_LB_IP, 80), &names(&backends)).await?;
    ctx.step(format!("client {client_range} inside the source ranges: {s}"));
    ctx.patch_service(
        "ranged",
        json!({"spec": {"loadBalancerSourceRanges": ["192.0.2.0/24"]}}),
    )
    .await?;
    let errs = expect_unanswered(ctx.client_ns(), sa(RANGES_LB_IP, 80)).await?;
    ctx.step(format!(
        "source ranges 192.0.2.0/24 only: the client is not answered ({})",
        errs[0]
    ));
    Ok(())
}

async fn multi_slice(ctx: Arc<Ctx>) -> Result<()> {
    let mut sp = spec("sliced", 2);
    sp.placement = Placement::Nodes(vec!["node-a".into(), "node-b".into()]);
    let backends = ctx.deploy(sp).await?;
    let client = ctx.client_pod("client", "node-a").await?;
    let svc = ctx
        .create_service(json!({
            "metadata": {"name": "sliced"},
            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
        }))
        .await?;
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    for (i, pod) in backends.iter().enumerate() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": format!("sliced-{i}"), "labels": {
                "kubernetes.io/service-name": "sliced",
                "endpointslice.kubernetes.io/managed-by": "orca-suite",
            }},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [pod.ip.to_string()], "conditions": {"ready": true}, "nodeName": pod.node}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))?;
        slices
            .create(&PostParams::default(), &slice)
            .await
            .with_context(|| format!("creating EndpointSlice sliced-{i}"))?;
    }
    let s = expect_backends(&client.netns, sa(cluster_ip(&svc)?, 80), &names(&backends)).await?;
    ctx.step(format!("two EndpointSlices, one endpoint each: {s}"));
    slices
        .delete("sliced-1", &Default::default())
        .await
        .context("deleting EndpointSlice sliced-1")?;
    let s = expect_backends(
        &client.netns,
        sa(cluster_ip(&svc)?, 80),
        &BTreeSet::from([backends[0].name.clone()]),
    )
    .await?;
    ctx.step(format!("second slice deleted: {s}"));
    Ok(())
}

/// A rule in a node's `FORWARD` chain (iptables, whichever backend the node's `iptables` is), deleted when dropped
/// so that a failing scenario leaves nothing behind (the runner also resets the nodes between proxies).
struct ForwardRule<'a> {
    ctx: &'a Ctx,
    netns: String,
    spec: Vec<String>,
}

impl<'a> ForwardRule<'a> {
    fn insert(ctx: &'a Ctx, netns: &str, spec: &[&str]) -> Result<Self> {
        let mut cmd = vec!["iptables", "-w", "5", "-I", "FORWARD", "1"];
        cmd.extend_from_slice(spec);
        ctx.topo.exec(netns, &cmd).context("inserting the FORWARD rule")?;
        Ok(ForwardRule {
            ctx,
            netns: netns.to_string(),
            spec: spec.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// Packets the rule matched so far.
    fn packets(&self) -> Result<u64> {
        let out = self.ctx.topo.exec(
            &self.netns,
            &["iptables", "-w", "5", "-L", "FORWARD", "1", "-v", "-n", "-x"],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("reading the rule's counter from {text:?}"))
    }

    fn delete(&mut self) -> Result<()> {
        if self.spec.is_empty() {
            return Ok(());
        }
        let mut cmd = vec!["iptables", "-w", "5", "-D", "FORWARD"];
        cmd.extend(self.spec.iter().map(String::as_str));
        self.ctx
            .topo
            .exec(&self.netns, &cmd)
            .context("deleting the FORWARD rule")?;
        self.spec.clear();
        Ok(())
    }
}

impl Drop for ForwardRule<'_> {
    fn drop(&mut self) {
        let _ = self.delete();
    }
}

/// What a NetworkPolicy engine or a host firewall in netfilter does: with kube-proxy the packet is DNATed in
/// PREROUTING, so `FORWARD` sees it going to the backend pod, and a DROP there blocks the Service. A proxy that
/// forwards translated packets around netfilter would silently bypass it.
async fn host_clients(ctx: Arc<Ctx>) -> Result<()> {
    let pods = ctx.deploy(spec("hosted", 2)).await?;
    let all = names(&pods);
    let mut svc = simple_service("hosted", "hosted", 80);
    svc["spec"]["type"] = json!("NodePort");
    let svc = ctx.create_service(svc).await?;
    let empty = ctx
        .create_service(json!({
            "metadata": {"name": "hosted-empty"},
            "spec": {"selector": {"app": "nothing-matches-this"},
                     "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        }))
        .await?;
    ctx.wait_endpoints("hosted", 2).await?;
    let np = node_port(&svc, None)?;
    let vip = sa(cluster_ip(&svc)?, 80);
    let gone = sa(cluster_ip(&empty)?, 80);
    for client in &ctx.topo.nodes {
        // Each request is an `orca-testpod get` process started in the node's namespace and cgroup
        // (pods::host_whoami).
        let from = client.netns.as_str();
        let s = expect_backends(from, vip, &all).await?;
        ctx.step(format!("ClusterIP {vip} from a process of {}: {s}", client.name));
        for node in &ctx.topo.nodes {
            let addr = sa(node.ip, np);
            let s = expect_backends(from, addr, &all).await?;
            ctx.step(format!(
                "NodePort {addr} ({}) from a process of {}: {s}",
                node.name, client.name
            ));
        }
        eventually(
            &format!("{gone} (no endpoints) refused to a process of {}", client.name),
            CONVERGE,
            || async {
                for _ in 0..3 {
                    match pods::whoami(from, gone, Duration::from_secs(2)).await {
                        Err(NetError::Refused) => {}
                        Err(e) => bail!("{e} instead of connection refused"),
                        Ok(w) => bail!("answered by {}", w.pod),
                    }
                }
                Ok(())
            },
        )
        .await?;
        ctx.step(format!(
            "ClusterIP {gone} without endpoints from a process of {}: refused",
            client.name
        ));
    }
    Ok(())
}

async fn agent_restart(ctx: Arc<Ctx>) -> Result<()> {
    use crate::load::Heartbeat;
    let agents = ctx.agents()?.clone();
    // Every backend on node-b, so that node-a translates (and, for the client's NodePort traffic, masquerades).
    let pods = ctx.deploy(spec("steady", 3).on_node("node-b")).await?;
    ctx.deploy(spec("steady-echo", 1).on_node("node-b")).await?;
    let client = ctx.client_pod("client", "node-a").await?;
    let mut web = simple_service("steady", "steady", 80);
    web["spec"]["type"] = json!("NodePort");
    web["spec"]["ports"]
        .as_array_mut()
        .context("ports")?
        .push(json!({"name": "dns", "port": 53, "targetPort": 8081, "protocol": "UDP"}));
    let web = ctx.create_service(web).await?;
    let echo = ctx
        .create_service(json!({
            "metadata": {"name": "steady-echo"},
            "spec": {"type": "NodePort", "selector": {"app": "steady-echo"},
                     "ports": [{"name": "tcp", "port": 9000, "targetPort": 9000, "protocol": "TCP"},
                               {"name": "udp", "port": 53, "targetPort": 8081, "protocol": "UDP"}]},
        }))
        .await?;
    // The same through IPv6 (in eBPF mode the IPv6 programs are reached through a pinned program array, which
    // must outlive the agent).
    let web6 = ctx
        .create_service(v6_service("steady6", "steady", 80, "NodePort"))
        .await?;
    let mut echo6 = v6_service("steady-echo6", "steady-echo", 9000, "NodePort");
    echo6["spec"]["ports"][0]["targetPort"] = json!(9000);
    let echo6 = ctx.create_service(echo6).await?;
    ctx.wait_endpoints("steady", 3).await?;
    ctx.wait_endpoints("steady-echo", 1).await?;
    ctx.wait_endpoints("steady6", 3).await?;
    ctx.wait_endpoints("steady-echo6", 1).await?;
    let node_a = ctx.node("node-a")?.clone();
    let node_a6 = crate::topology::v6(node_a.ip);
    let vip6 = sa(cluster_ip6(&web6)?, 80);
    let np6 = sa(node_a6, node_port(&web6, None)?);
    let echo_vip6 = sa(cluster_ip6(&echo6)?, 9000);
    let echo_np6 = sa(node_a6, node_port(&echo6, None)?);
    let vip = sa(cluster_ip(&web)?, 80);
    let np = sa(node_a.ip, node_port(&web, Some("http"))?);
    let web_udp = sa(cluster_ip(&web)?, 53);
    let echo_vip = sa(cluster_ip(&echo)?, 9000);
    let echo_np = sa(node_a.ip, node_port(&echo, Some("tcp"))?);
    let udp_vip = sa(cluster_ip(&echo)?, 53);
    let all = names(&pods);
    expect_backends(&client.netns, vip, &all).await?;
    expect_backends(ctx.client_ns(), np, &all).await?;
    expect_backends(&client.netns, vip6, &all).await?;
    expect_backends(ctx.client_ns(), np6, &all).await?;
    // node-a translates both: the pod's ClusterIP traffic (its node), the client's NodePort traffic (masqueraded,
    // since every backend is on node-b).
    let beat = Duration::from_millis(200);
    let from_pod = Heartbeat::start(&client.netns, echo_vip, beat, Duration::from_secs(2))?;
    let from_client = Heartbeat::start(ctx.client_ns(), echo_np, beat, Duration::from_secs(2))?;
    let from_pod6 = Heartbeat::start(&client.netns, echo_vip6, beat, Duration::from_secs(2))?;
    let from_client6 = Heartbeat::start(ctx.client_ns(), echo_np6, beat, Duration::from_secs(2))?;
    // A steady UDP flow: one exchange every 200 ms from one source address and port (one conntrack flow).
    let udp_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let udp_flow = {
        let (ns, stop) = (client.netns.clone(), udp_stop.clone());
        let local = std::net::SocketAddr::from((client.ip, 40_053));
        tokio::spawn(async move {
            let mut outcomes: Vec<(Instant, Result<String, NetError>)> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = pods::udp_exchange(&ns, Some(local), udp_vip, "steady", Duration::from_secs(1)).await;
                outcomes.push((Instant::now(), r.map(|r| r.pod)));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            outcomes
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = (from_pod.report().exchanges, from_client.report().exchanges);
    let before6 = (from_pod6.report().exchanges, from_client6.report().exchanges);
    ensure!(
        before.0 > 0 && before.1 > 0 && before6.0 > 0 && before6.1 > 0,
        "long-lived connections did not start: {:?} {:?} {:?} {:?}",
        from_pod.report(),
        from_client.report(),
        from_pod6.report(),
        from_client6.report()
    );

    // A UDP flow (one source port) to the three-pod Service: conntrack pins it to one pod, the one removed below.
    let pinned_from = std::net::SocketAddr::from((client.ip, 40_054));
    let udp_once = || {
        pods::udp_exchange(
            &client.netns,
            Some(pinned_from),
            web_udp,
            "pinned",
            Duration::from_secs(1),
        )
    };
    let pinned = udp_once()
        .await
        .map_err(|e| anyhow::anyhow!("UDP {pinned_from} -> {web_udp}: {e}"))?
        .pod;
    ensure!(
        udp_once().await.map(|r| r.pod).ok().as_ref() == Some(&pinned),
        "the UDP flow {pinned_from} -> {web_udp} is not pinned to {pinned}"
    );

    let pid = agents.kill_hard("node-a")?;
    let killed = Instant::now();
    ctx.step(format!(
        "SIGKILL to {} on node-a (pid {pid}); heartbeats so far: pod {} and client {} exchanges",
        ctx.proxy, before.0, before.1
    ));
    // While no agent runs: new connections from a pod, from the client, from a process of node-a.
    let s = expect_backends(&client.netns, vip, &all).await?;
    ctx.step(format!("agent down: ClusterIP {vip} from a pod on node-a: {s}"));
    let s = expect_backends(ctx.client_ns(), np, &all).await?;
    ctx.step(format!("agent down: NodePort {np} from the client: {s}"));
    let s = expect_backends(&node_a.netns, vip, &all).await?;
    ctx.step(format!("agent down: ClusterIP {vip} from a process of node-a: {s}"));
    let s = expect_backends(&client.netns, vip6, &all).await?;
    ctx.step(format!("agent down: ClusterIP {vip6} from a pod on node-a: {s}"));
    let s = expect_backends(ctx.client_ns(), np6, &all).await?;
    ctx.step(format!("agent down: NodePort {np6} from the client: {s}"));
    // An endpoint goes away while no agent watches on node-a.
    let removed = pinned.clone();
    ctx.kubelet.delete_pod(&ctx.ns, &removed, Some(Duration::ZERO)).await?;
    ctx.wait_endpoints("steady", 2).await?;
    let left = tokio::time::Duration::from_secs(3).saturating_sub(killed.elapsed());
    tokio::time::sleep(left).await;
    ctx.step(format!(
        "agent down {:.1}s, pod {removed} deleted meanwhile",
        killed.elapsed().as_secs_f64()
    ));

    agents.restart("node-a").await?;
    ctx.step(format!("{} on node-a started again and healthy", ctx.proxy));
    let remaining: BTreeSet<String> = all.iter().filter(|p| **p != removed).cloned().collect();
    let s = expect_backends(&client.netns, vip, &remaining).await?;
    ctx.step(format!("after the restart: ClusterIP from a pod: {s}"));
    let s = expect_backends(ctx.client_ns(), np, &remaining).await?;
    ctx.step(format!("after the restart: NodePort from the client: {s}"));
    let s = expect_backends(&client.netns, vip6, &remaining).await?;
    ctx.step(format!("after the restart: IPv6 ClusterIP from a pod: {s}"));
    let s = expect_backends(ctx.client_ns(), np6, &remaining).await?;
    ctx.step(format!("after the restart: IPv6 NodePort from the client: {s}"));
    // The UDP flow pinned to the removed pod: its conntrack entry must go, so the same flow reaches another pod.
    let restarted = Instant::now();
    let now = eventually(
        &format!("the UDP flow {pinned_from} -> {web_udp}, pinned to {removed}, answered by another pod"),
        CONVERGE,
        || async {
            match udp_once().await {
                Ok(r) if r.pod != removed => Ok(r.pod),
                Ok(r) => bail!("answered by {}", r.pod),
                Err(e) => bail!("{e}"),
            }
        },
    )
    .await?;
    ctx.step(format!(
        "the UDP flow {pinned_from} -> {web_udp} pinned to {removed}: answered by {now} {:.1}s after the restart",
        restarted.elapsed().as_secs_f64()
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    udp_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let udp = udp_flow.await?;
    let (hp, hc) = (from_pod.finish(), from_client.finish());
    let (hp6, hc6) = (from_pod6.finish(), from_client6.finish());
    let failed: Vec<String> = udp
        .iter()
        .filter_map(|(at, r)| {
            r.as_ref()
                .err()
                .map(|e| format!("{e} {:+.1}s after the kill", at.duration_since(killed).as_secs_f64()))
        })
        .collect();
    let answered_after = udp.iter().filter(|(at, r)| *at > killed && r.is_ok()).count();
    ctx.step(format!(
        "steady UDP flow from {}:40053 to {udp_vip}: {} exchanges, {answered_after} answered after the kill, \
         failed: {failed:?}",
        client.ip,
        udp.len(),
    ));
    ensure!(
        failed.len() <= 1 && answered_after >= 10,
        "the steady UDP flow was not answered across the restart: {failed:?}"
    );
    for (who, hb, first) in [
        ("pod -> ClusterIP", &hp, before.0),
        ("client -> NodePort", &hc, before.1),
        ("pod -> IPv6 ClusterIP", &hp6, before6.0),
        ("client -> IPv6 NodePort", &hc6, before6.1),
    ] {
        ensure!(hb.error.is_none(), "the long-lived connection {who} broke: {hb:?}");
        ctx.step(format!(
            "long-lived {who} ({:?}): {} exchanges, {} after the kill, slowest {:?}",
            hb.local,
            hb.exchanges,
            hb.exchanges.saturating_sub(first),
            hb.max_rtt,
        ));
    }
    Ok(())
}

async fn netfilter_forward(ctx: Arc<Ctx>) -> Result<()> {
    let backend = ctx.deploy(spec("guarded", 1).on_node("node-b")).await?.remove(0);
    let client = ctx.client_pod("client", "node-a").await?;
    let all = BTreeSet::from([backend.name.clone()]);
    let mut svc = simple_service("guarded", "guarded", 80);
    svc["spec"]["type"] = json!("NodePort");
    let svc = ctx.create_service(svc).await?;
    ctx.wait_endpoints("guarded", 1).await?;
    let vip = sa(cluster_ip(&svc)?, 80);
    let node_a = ctx.node("node-a")?;
    let np = sa(node_a.ip, node_port(&svc, None)?);
    expect_backends(&client.netns, vip, &all).await?;
    expect_backends(ctx.client_ns(), np, &all).await?;
    ctx.step(format!(
        "ClusterIP {vip} from a pod on node-a and NodePort {np} from the client: answered"
    ));

    // The translating node is node-a for both: the client pod's node, and the node whose IP the client used.
    let ip = backend.ip.to_string();
    let mut rule = ForwardRule::insert(&ctx, &node_a.netns, &["-d", &ip, "-j", "DROP"])?;
    let errs = expect_unanswered(&client.netns, vip).await?;
    ctx.step(format!(
        "FORWARD -d {ip} -j DROP on node-a: ClusterIP not answered ({})",
        errs[0]
    ));
    let errs = expect_unanswered(ctx.client_ns(), np).await?;
    ctx.step(format!("... and the NodePort not answered ({})", errs[0]));
    let dropped = rule.packets()?;
    ensure!(dropped > 0, "the FORWARD rule matched no packet");
    ctx.step(format!("the rule dropped {dropped} packets"));

    rule.delete()?;
    expect_backends(&client.netns, vip, &all).await?;
    expect_backends(ctx.client_ns(), np, &all).await?;
    ctx.step("rule removed: both answer again");
    Ok(())
}

/// How many flows the node that translates the soak's traffic (node-a) tracks: the kernel's conntrack table, and
/// for Orca eBPF its own conntrack map and the masquerade ports it holds (from the agent's metrics).
#[derive(Clone, Copy, Debug, Default)]
struct Tracked {
    kernel: u64,
    orca: Option<(u64, u64)>,
}

impl Tracked {
    fn max(self, o: Tracked) -> Tracked {
        Tracked {
            kernel: self.kernel.max(o.kernel),
            orca: match (self.orca, o.orca) {
                (Some((e1, p1)), Some((e2, p2))) => Some((e1.max(e2), p1.max(p2))),
                (a, b) => a.or(b),
            },
        }
    }
}

impl std::fmt::Display for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} kernel conntrack entries", self.kernel)?;
        if let Some((entries, ports)) = self.orca {
            write!(
                f,
                "; Orca eBPF: {entries} conntrack map entries, {ports} masquerade ports held"
            )?;
        }
        Ok(())
    }
}

/// The body of a node's proxy metrics (`/metrics`).
async fn node_metrics(ctx: &Ctx, name: &str) -> Result<String> {
    let node = ctx.node(name)?;
    let addr = sa(node.ip, crate::suite::proxy::METRICS_PORT);
    pods::http_request(&node.netns, "GET", addr, "/metrics", Duration::from_secs(3))
        .await
        .map(|r| r.body)
        .map_err(|e| anyhow::anyhow!("metrics of {name}: {e}"))
}

/// Orca eBPF: a node's non-zero datapath drop and pass counters (`orca_datapath_*_total{reason}`), as text.
async fn datapath_counters(ctx: &Ctx, node: &str) -> String {
    match node_metrics(ctx, node).await {
        Ok(body) => body
            .lines()
            .filter(|l| l.starts_with("orca_datapath_") && !l.ends_with(" 0"))
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("{e:#}"),
    }
}

/// The non-zero TCP counters of namespace `ns` that tell why connections failed.
fn tcp_counters(ctx: &Ctx, ns: &str) -> String {
    const NAMES: &[&str] = &[
        "TcpAttemptFails",
        "TcpRetransSegs",
        "TcpOutRsts",
        "TcpExtListenOverflows",
        "TcpExtListenDrops",
        "TcpExtPAWSEstab",
        "TcpExtTWRecycled",
        "TcpExtTCPTimeWaitOverflow",
        "TcpExtTCPChallengeACK",
        "TcpExtTCPSYNChallenge",
        "TcpExtTCPTimeouts",
        "TcpExtTCPSynRetrans",
    ];
    let mut cmd = vec!["nstat", "-as"];
    cmd.extend_from_slice(NAMES);
    match ctx.topo.exec(ns, &cmd) {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some(format!("{} {}", it.next()?, it.next()?))
            })
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("{e:#}"),
    }
}

async fn tracked_flows(ctx: &Ctx) -> Result<Tracked> {
    let node = ctx.node("node-a")?;
    let out = ctx
        .topo
        .exec(&node.netns, &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
        .context("reading node-a's conntrack count")?;
    let kernel = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    if ctx.proxy != crate::suite::proxy::ProxyKind::OrcaEbpf {
        return Ok(Tracked { kernel, orca: None });
    }
    let body = node_metrics(ctx, "node-a").await?;
    let metric = |name: &str| -> Result<u64> {
        body.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .with_context(|| format!("no {name} in node-a's metrics"))
    };
    Ok(Tracked {
        kernel,
        orca: Some((
            metric("orca_map_entries{map=\"ORCA_CT4\"}")?,
            metric("orca_snat_ports_in_use")?,
        )),
    })
}

async fn soak(ctx: Arc<Ctx>) -> Result<()> {
    use crate::load;
    const TCP_FIRST: usize = 20_000;
    const TCP_LATER: usize = 2_000;
    const UDP_SOURCES: usize = 4;
    const UDP_PER_SOURCE: u16 = 50_000;
    let backend = ctx.deploy(spec("soak", 1).on_node("node-b")).await?.remove(0);
    let all = BTreeSet::from([backend.name.clone()]);
    let heart = ctx.client_pod("heart", "node-a").await?;
    let mut udp_clients = Vec::new();
    for i in 0..UDP_SOURCES {
        udp_clients.push(ctx.client_pod(&format!("udp-{i}"), "node-a").await?.netns);
    }
    let mut web = simple_service("soak-web", "soak", 80);
    web["spec"]["type"] = json!("NodePort");
    let web = ctx.create_service(web).await?;
    let udp = ctx
        .create_service(json!({
            "metadata": {"name": "soak-udp"},
            "spec": {"selector": {"app": "soak"}, "ports": [{"port": 53, "targetPort": 8081, "protocol": "UDP"}]},
        }))
        .await?;
    let echo = ctx
        .create_service(json!({
            "metadata": {"name": "soak-echo"},
            "spec": {"selector": {"app": "soak"}, "ports": [{"port": 9000, "targetPort": 9000, "protocol": "TCP"}]},
        }))
        .await?;
    ctx.wait_endpoints("soak-web", 1).await?;
    let np = sa(ctx.node("node-a")?.ip, node_port(&web, None)?);
    let udp_vip = sa(cluster_ip(&udp)?, 53);
    let echo_vip = sa(cluster_ip(&echo)?, 9000);
    expect_backends(ctx.client_ns(), np, &all).await?;
    let before = tracked_flows(&ctx).await?;
    ctx.step(format!("before: {before}"));

    // soak-echo was created just now: the long-lived connection is opened once the proxy has programmed it (a
    // connect before that times out under the load about to start, which is not what this scenario is about).
    let heartbeat = eventually(
        "the echo Service answers the long-lived connection",
        CONVERGE,
        || async {
            let hb = load::Heartbeat::start(
                &heart.netns,
                echo_vip,
                Duration::from_millis(200),
                Duration::from_secs(2),
            )?;
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let r = hb.report();
                if r.exchanges > 0 {
                    return Ok(hb);
                }
                if r.error.is_some() {
                    break;
                }
            }
            let r = hb.finish();
            bail!("no exchange yet: {r:?}")
        },
    )
    .await?;
    let client_ns = ctx.client_ns().to_string();
    let tcp = tokio::task::spawn_blocking(move || {
        load::tcp_connections(
            &client_ns,
            np,
            TCP_FIRST,
            16,
            Duration::from_secs(50),
            Duration::from_secs(60),
        )
    });
    let udp_sources = udp_clients.clone();
    let udp = tokio::task::spawn_blocking(move || {
        load::udp_flows(
            &udp_sources,
            10_000..10_000 + UDP_PER_SOURCE,
            udp_vip,
            2,
            Duration::from_millis(500),
            Duration::from_secs(50),
            Duration::from_secs(120),
        )
    });
    // Sample the occupancy while the load runs.
    let mut peak = before;
    while !(tcp.is_finished() && udp.is_finished()) {
        if let Ok(t) = tracked_flows(&ctx).await {
            peak = peak.max(t);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let tcp = tcp.await??;
    let udp = udp.await??;
    let first_done = Instant::now();
    ctx.step(format!("{TCP_FIRST} TCP connections to the NodePort {np}: {tcp}"));
    ctx.step(format!(
        "{} UDP flows to {udp_vip}: {udp}",
        UDP_SOURCES * usize::from(UDP_PER_SOURCE)
    ));
    // The TCP connections' entries stay for TIME_WAIT (120 s) after the load: one more sample at the end.
    peak = peak.max(tracked_flows(&ctx).await?);
    ctx.step(format!("peak (each count's maximum, sampled every 2 s): {peak}"));
    if ctx.proxy == crate::suite::proxy::ProxyKind::OrcaEbpf {
        for node in ["node-a", "node-b"] {
            ctx.step(format!(
                "{node} datapath counters: [{}]",
                datapath_counters(&ctx, node).await
            ));
        }
    }
    if tcp.ok != TCP_FIRST {
        // What the kernels saw of the failed connections: listen-queue drops, segments refused by TIME_WAIT or PAWS.
        for (who, ns) in [("the backend", backend.netns.as_str()), ("the client", ctx.client_ns())] {
            ctx.step(format!("{who}'s TCP counters: {}", tcp_counters(&ctx, ns)));
        }
    }
    ensure!(
        tcp.ok == TCP_FIRST && tcp.elapsed <= Duration::from_secs(60),
        "TCP connections: {tcp}"
    );
    let udp_total = UDP_SOURCES * usize::from(UDP_PER_SOURCE);
    ensure!(
        udp.ok + udp.failed() == udp_total && udp.ok * 100 >= udp_total * 99,
        "UDP flows: {udp} (fewer than 99% answered)"
    );
    let hb = heartbeat.report();
    ensure!(
        hb.error.is_none(),
        "the long-lived connection broke during the load: {hb:?}"
    );

    // The first connections' entries expire: closed TCP after 120 s (TIME_WAIT), UDP streams after 120 s. Orca
    // eBPF's collector then gives their masquerade ports back; the kernel's conntrack deletes its entries.
    let expired_after = Duration::from_secs(130);
    let mut after = tracked_flows(&ctx).await?;
    loop {
        let waited = first_done.elapsed();
        let released = after.orca.is_none_or(|(_, ports)| ports < 100);
        if waited >= expired_after && released {
            break;
        }
        ensure!(
            waited < expired_after + Duration::from_secs(60),
            "60 s after the lifetimes the entries are still held: {after}"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        after = tracked_flows(&ctx).await?;
    }
    ctx.step(format!(
        "{:.0}s after the load: {after}",
        first_done.elapsed().as_secs_f64()
    ));
    let client_ns = ctx.client_ns().to_string();
    let later = tokio::task::spawn_blocking(move || {
        load::tcp_connections(
            &client_ns,
            np,
            TCP_LATER,
            8,
            Duration::from_secs(10),
            Duration::from_secs(30),
        )
    })
    .await??;
    ctx.step(format!("{TCP_LATER} more TCP connections: {later}"));
    ensure!(later.ok == TCP_LATER, "TCP connections after the expiry: {later}");
    let hb = heartbeat.finish();
    ctx.step(format!(
        "long-lived connection {:?} -> {echo_vip}: {} exchanges every 200 ms, max round trip {:?}, {}",
        hb.local,
        hb.exchanges,
        hb.max_rtt,
        hb.error.as_deref().unwrap_or("never broke")
    ));
    ensure!(hb.error.is_none(), "the long-lived connection broke: {hb:?}");
    Ok(())
}
