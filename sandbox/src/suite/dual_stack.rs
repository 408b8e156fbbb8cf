//! The IPv6 and dual-stack scenarios: the behaviours the IPv4 scenarios check, for Services of the other family
//! (`ipFamilies: [IPv6]`) and for Services of both (`PreferDualStack`, `RequireDualStack`). Every sandbox address
//! has its IPv6 twin ([`crate::topology::v6`]): pods, nodes, the client and the load-balancer range.
use crate::kubelet::Placement;
use crate::pods::{self, NetError};
use crate::suite::ctx::{
    cluster_ip6, cluster_ips, eventually, expect_backends, expect_refused, expect_unanswered, health_check_node_port,
    names, node_port, sa, Ctx, CONVERGE,
};
use crate::suite::scenarios::{expect_sticky, simple_service, spec};
use crate::topology::v6;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Load-balancer IPs of these scenarios: the IPv6 twins of 10.250.0.30-32, routed from the client to node-a.
const V6_LB: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 30);
const V6_ETP_LB: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 31);
const V6_RANGES_LB: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 32);

/// `simple_service` as a single-stack IPv6 Service of `type_`.
pub fn v6_service(name: &str, app: &str, port: u16, type_: &str) -> Value {
    let mut s = simple_service(name, app, port);
    s["spec"]["type"] = json!(type_);
    s["spec"]["ipFamilyPolicy"] = json!("SingleStack");
    s["spec"]["ipFamilies"] = json!(["IPv6"]);
    s
}

/// The client's IPv6 address as a backend sees it.
fn client6(ctx: &Ctx) -> IpAddr {
    IpAddr::V6(v6(ctx.topo.client.ip))
}

/// SingleStack IPv6: spread over three pods on both nodes and a readiness flip through the IPv6 ClusterIP, the
/// NodePort on both nodes' IPv6 addresses and the IPv6 load-balancer IP from the external client, host-network
/// clients, ClientIP affinity, and source ranges of the family.
pub async fn ipv6(ctx: Arc<Ctx>) -> Result<()> {
    let mut sp = spec("web6", 3);
    sp.placement = Placement::Nodes(vec!["node-a".into(), "node-b".into()]);
    let backends = ctx.deploy(sp).await?;
    let all = names(&backends);
    let client = ctx.client_pod("client", "node-a").await?;
    let svc = ctx
        .create_service(v6_service("web6", "web6", 80, "LoadBalancer"))
        .await?;
    let ips = cluster_ips(&svc)?;
    ensure!(
        ips.len() == 1 && ips[0].is_ipv6(),
        "clusterIPs {ips:?}: one IPv6 address expected"
    );
    let ip = ips[0];
    ctx.wait_endpoints("web6", 3).await?;
    let s = expect_backends(&client.netns, sa(ip, 80), &all).await?;
    ctx.step(format!("[{ip}]:80 from a pod: {s}"));

    let victim = &backends[0];
    ctx.kubelet.set_ready(&ctx.ns, &victim.name, false).await?;
    let t = Instant::now();
    expect_backends(&client.netns, sa(ip, 80), &names(&backends[1..]))
        .await
        .with_context(|| format!("{} failing readiness should leave the IPv6 answers", victim.name))?;
    ctx.step(format!(
        "{} unready: out after {:.1}s",
        victim.name,
        t.elapsed().as_secs_f64()
    ));
    ctx.kubelet.set_ready(&ctx.ns, &victim.name, true).await?;
    expect_backends(&client.netns, sa(ip, 80), &all).await?;
    ctx.step(format!("{} ready again: back", victim.name));

    let np = node_port(&svc, None)?;
    for node in &ctx.topo.nodes {
        let s = expect_backends(ctx.client_ns(), sa(v6(node.ip), np), &all).await?;
        ctx.step(format!("NodePort [{}]:{np} from the client: {s}", v6(node.ip)));
    }
    // Host-network clients (a process of node-b, in its cgroup): the cluster IP and node-a's NodePort over IPv6.
    let b = ctx.node("node-b")?;
    for addr in [sa(ip, 80), sa(v6(ctx.node("node-a")?.ip), np)] {
        let s = expect_backends(&b.netns, addr, &all).await?;
        ctx.step(format!("{addr} from a process of node-b: {s}"));
    }
    // An IPv6-only Service has no IPv4 NodePort.
    let errs = expect_unanswered(ctx.client_ns(), sa(ctx.node("node-a")?.ip, np)).await?;
    ctx.step(format!("NodePort on node-a's IPv4 address: not answered ({})", errs[0]));
    let lb = v6(V6_LB);
    ctx.set_lb_ingress("web6", lb).await?;
    let s = expect_backends(ctx.client_ns(), sa(lb, 80), &all).await?;
    ctx.step(format!("LoadBalancer [{lb}]:80 from the client: {s}"));

    ctx.patch_service("web6", json!({"spec": {"sessionAffinity": "ClientIP"}}))
        .await?;
    let pod = expect_sticky(&client.netns, sa(ip, 80), 30).await?;
    ctx.step(format!("ClientIP affinity over IPv6: 30 requests answered by {pod}"));
    let pod = expect_sticky(ctx.client_ns(), sa(lb, 80), 30).await?;
    ctx.step(format!(
        "ClientIP affinity on the IPv6 load-balancer IP: all answered by {pod}"
    ));

    // Source ranges: the client's /128 lets it in; a range without it shuts it out.
    let ranged = ctx.deploy(spec("ranged6", 2)).await?;
    let mut r = v6_service("ranged6", "ranged6", 80, "LoadBalancer");
    let client_range = format!("{}/128", client6(&ctx));
    r["spec"]["loadBalancerSourceRanges"] = json!([client_range]);
    ctx.create_service(r).await?;
    let rlb = v6(V6_RANGES_LB);
    ctx.set_lb_ingress("ranged6", rlb).await?;
    ctx.wait_endpoints("ranged6", 2).await?;
    let s = expect_backends(ctx.client_ns(), sa(rlb, 80), &names(&ranged)).await?;
    ctx.step(format!("source ranges {client_range}: the client is answered: {s}"));
    ctx.patch_service(
        "ranged6",
        json!({"spec": {"loadBalancerSourceRanges": ["fd00:192::/64"]}}),
    )
    .await?;
    let errs = expect_unanswered(ctx.client_ns(), sa(rlb, 80)).await?;
    ctx.step(format!("source ranges fd00:192::/64 only: not answered ({})", errs[0]));
    Ok(())
}

/// SingleStack IPv6 at the edges: no endpoints refuses, eTP=Local keeps the client's IPv6 address and answers its
/// health check, a pod reaches itself through its Service (hairpin), and a UDP flow follows a replaced pod.
pub async fn ipv6_edges(ctx: Arc<Ctx>) -> Result<()> {
    let client = ctx.client_pod("client", "node-a").await?;
    let svc = ctx
        .create_service(v6_service("empty6", "nothing-matches-this", 80, "NodePort"))
        .await?;
    let (ip, np) = (cluster_ip6(&svc)?, node_port(&svc, None)?);
    expect_refused(&client.netns, sa(ip, 80)).await?;
    ctx.step(format!("no endpoints: [{ip}]:80 from a pod refused"));
    for node in &ctx.topo.nodes {
        expect_refused(ctx.client_ns(), sa(v6(node.ip), np)).await?;
        ctx.step(format!("no endpoints: NodePort [{}]:{np} refused", v6(node.ip)));
    }

    let backend = ctx.deploy(spec("local6", 1).on_node("node-a")).await?;
    let mut etp = v6_service("etp6", "local6", 80, "LoadBalancer");
    etp["spec"]["externalTrafficPolicy"] = json!("Local");
    let svc = ctx.create_service(etp).await?;
    let lb = v6(V6_ETP_LB);
    ctx.set_lb_ingress("etp6", lb).await?;
    ctx.wait_endpoints("etp6", 1).await?;
    let (np, hc) = (node_port(&svc, None)?, health_check_node_port(&svc)?);
    let (a, b) = (ctx.node("node-a")?.ip, ctx.node("node-b")?.ip);
    let want = BTreeSet::from([client6(&ctx)]);
    for (what, addr) in [("NodePort on node-a", sa(v6(a), np)), ("load-balancer IP", sa(lb, 80))] {
        let s = expect_backends(ctx.client_ns(), addr, &names(&backend)).await?;
        ensure!(
            s.sources == want,
            "{what}: the backend saw {:?}, not {want:?}",
            s.sources
        );
        ctx.step(format!("eTP=Local {what} {addr}: {s}, client address preserved"));
    }
    let errs = expect_unanswered(ctx.client_ns(), sa(v6(b), np)).await?;
    ctx.step(format!(
        "eTP=Local NodePort on node-b (no local endpoint): not answered ({})",
        errs[0]
    ));
    // The IPv6 proxier serves the health check of an IPv6 Service, on the nodes' IPv6 addresses.
    for (ip, want) in [(v6(a), 200u16), (v6(b), 503u16)] {
        eventually(
            &format!("healthCheckNodePort {ip}:{hc} answering {want}"),
            CONVERGE,
            || async {
                match pods::http_request(ctx.client_ns(), "GET", sa(ip, hc), "/", Duration::from_secs(2)).await {
                    Ok(r) if r.status == want => Ok(()),
                    Ok(r) => bail!("HTTP {} {}", r.status, r.body.trim()),
                    Err(e) => bail!("{e}"),
                }
            },
        )
        .await?;
        ctx.step(format!("healthCheckNodePort [{ip}]:{hc}: {want}"));
    }

    let pod = ctx.deploy(spec("hairpin6", 1)).await?.remove(0);
    let svc = ctx
        .create_service(v6_service("hairpin6", "hairpin6", 80, "ClusterIP"))
        .await?;
    ctx.wait_endpoints("hairpin6", 1).await?;
    let s = expect_backends(
        &pod.netns,
        sa(cluster_ip6(&svc)?, 80),
        &BTreeSet::from([pod.name.clone()]),
    )
    .await?;
    ctx.step(format!(
        "{} through its own IPv6 Service: {s}, source seen {:?}",
        pod.name, s.sources
    ));

    udp_cycle6(&ctx).await
}

/// A UDP flow from a fixed source port to an IPv6 NodePort reaches the new pod once the old one is gone (its
/// conntrack entry is deleted).
async fn udp_cycle6(ctx: &Ctx) -> Result<()> {
    let a = ctx
        .deploy(spec("udp6-a", 1).labels(&[("app", "udp6")]).on_node("node-b"))
        .await?
        .remove(0);
    let mut svc = v6_service("udp6", "udp6", 8081, "NodePort");
    svc["spec"]["ports"] = json!([{"name": "udp", "port": 8081, "targetPort": 8081, "protocol": "UDP"}]);
    let svc = ctx.create_service(svc).await?;
    ctx.wait_endpoints("udp6", 1).await?;
    let target = sa(v6(ctx.node("node-a")?.ip), node_port(&svc, None)?);
    let local = sa(client6(ctx), 40_061);
    let ns = ctx.client_ns().to_string();
    let answered_by = |pod: String, per_try: Duration| {
        let ns = ns.clone();
        async move {
            match pods::udp_exchange(&ns, Some(local), target, "ping", per_try).await {
                Ok(r) if r.pod == pod => Ok(()),
                Ok(r) => bail!("answered by {}", r.pod),
                Err(NetError::Timeout) => bail!("timed out (stale conntrack entry to a deleted pod?)"),
                Err(e) => bail!("{e}"),
            }
        }
    };
    eventually(
        &format!("UDP {target} from {local} answered by {}", a.name),
        CONVERGE,
        || answered_by(a.name.clone(), Duration::from_secs(1)),
    )
    .await?;
    ctx.step(format!("UDP from {local} to {target}: answered by {}", a.name));
    let b = ctx
        .deploy(spec("udp6-b", 1).labels(&[("app", "udp6")]).on_node("node-a"))
        .await?
        .remove(0);
    ctx.wait_endpoints("udp6", 2).await?;
    let t = Instant::now();
    ctx.kubelet.delete_pod(&ctx.ns, &a.name, Some(Duration::ZERO)).await?;
    ctx.kubelet.wait_gone(&ctx.ns, &a.name, Duration::from_secs(30)).await?;
    eventually(
        &format!("UDP flow from {local} answered by {}", b.name),
        CONVERGE,
        || answered_by(b.name.clone(), Duration::from_millis(700)),
    )
    .await?;
    ctx.step(format!(
        "{} deleted: the same IPv6 flow reached {} after {:.1}s",
        a.name,
        b.name,
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Dual-stack Services: RequireDualStack answers on both cluster IPs (the pod's own address of each family seen,
/// no masquerade) and on its NodePort in both families; a SingleStack IPv4 Service upgraded to PreferDualStack
/// gains an IPv6 cluster IP that answers, and loses it again when downgraded.
pub async fn dual_stack(ctx: Arc<Ctx>) -> Result<()> {
    let mut sp = spec("both", 2);
    sp.placement = Placement::Nodes(vec!["node-a".into(), "node-b".into()]);
    let backends = ctx.deploy(sp).await?;
    let all = names(&backends);
    let client = ctx.client_pod("client", "node-a").await?;
    let mut svc = simple_service("both", "both", 80);
    svc["spec"]["type"] = json!("NodePort");
    svc["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
    svc["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    let svc = ctx.create_service(svc).await?;
    let ips = cluster_ips(&svc)?;
    ensure!(
        ips.len() == 2 && ips[0].is_ipv4() && ips[1].is_ipv6(),
        "clusterIPs {ips:?}: IPv4 then IPv6 expected"
    );
    // One EndpointSlice per family: two endpoints each.
    ctx.wait_endpoints("both", 4).await?;
    for (ip, src) in [(ips[0], IpAddr::V4(client.ip)), (ips[1], IpAddr::V6(client.ip6()))] {
        let s = expect_backends(&client.netns, sa(ip, 80), &all).await?;
        ensure!(
            s.sources == BTreeSet::from([src]),
            "{ip}: backends saw {:?}, not the client pod's {src}",
            s.sources
        );
        ctx.step(format!("cluster IP {ip} from a pod: {s}, source {src}"));
    }
    let np = node_port(&svc, None)?;
    let a = ctx.node("node-a")?.ip;
    for addr in [sa(a, np), sa(v6(a), np)] {
        let s = expect_backends(ctx.client_ns(), addr, &all).await?;
        ctx.step(format!("NodePort {addr} from the client: {s}"));
    }

    ctx.create_service(simple_service("upgrade", "both", 80)).await?;
    ctx.wait_endpoints("upgrade", 2).await?;
    let svc = ctx
        .patch_service("upgrade", json!({"spec": {"ipFamilyPolicy": "PreferDualStack"}}))
        .await?;
    let ips = cluster_ips(&svc)?;
    ensure!(
        ips.len() == 2,
        "PreferDualStack on a dual-stack cluster: clusterIPs {ips:?}"
    );
    ctx.wait_endpoints("upgrade", 4).await?;
    for ip in &ips {
        let s = expect_backends(&client.netns, sa(*ip, 80), &all).await?;
        ctx.step(format!("upgraded to PreferDualStack: {ip} answers: {s}"));
    }
    ctx.patch_service(
        "upgrade",
        json!({"spec": {"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv4"], "clusterIPs": [ips[0].to_string()]}}),
    )
    .await?;
    let errs = expect_unanswered(&client.netns, sa(ips[1], 80)).await?;
    ctx.step(format!(
        "downgraded to SingleStack IPv4: {} not answered ({})",
        ips[1], errs[0]
    ));
    let s = expect_backends(&client.netns, sa(ips[0], 80), &all).await?;
    ctx.step(format!("{} still answers: {s}", ips[0]));
    Ok(())
}
