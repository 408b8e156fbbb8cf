//! `cargo xtask demo`: the sandbox with Orca on every node, and the seed example as a newcomer would try it.
//!
//! Brings the sandbox up (building the control plane on first use, with its progress), starts `orca-proxy` in
//! eBPF mode on every node (falling back to iptables as it does by itself; the reason is shown), deploys the
//! seed's kuard, alpaca-prod (3 replicas) and bandicoot-prod (2) with their Services, then shows:
//! * requests from the kuard pod spread across the replicas (count per pod);
//! * a readiness flip: one alpaca pod fails `/ready`, with the time until its Pod turned not-Ready and until it
//!   left the answers, then the same for its recovery;
//! * the Service as NodePort, from the external client to every node's IP;
//! * the Service as LoadBalancer, from the external client to the ingress IP.
//!
//! Everything is torn down at the end, on error, and on Ctrl-C (the sandbox's signal handler).
use anyhow::{bail, Context, Result};
use clap::Args;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::serde_json::json;
use kube::api::Api;
use orca_sandbox::kubelet::{pod_ready, Kubelet};
use orca_sandbox::pods::WhoAmI;
use orca_sandbox::suite::ctx::{cluster_ip, expect_backends, names, node_port, sa, sample, Ctx, Sample};
use orca_sandbox::suite::proxy::{Proxy, ProxyEnv, ProxyKind, StartOptions};
use orca_sandbox::suite::runner::default_routes;
use orca_sandbox::suite::scenarios::{deploy_seed, SEED_LB_IP};
use orca_sandbox::{Sandbox, SandboxOptions};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The proxy on the nodes: orca-ebpf (default; falls back to iptables when eBPF cannot run), orca-iptables,
    /// or upstream kube-proxy-iptables / kube-proxy-nftables for comparison.
    #[arg(long, default_value = "orca-ebpf")]
    pub proxy: String,
    /// Requests per spread measurement.
    #[arg(long, default_value_t = 60)]
    pub requests: usize,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let kind: ProxyKind = args.proxy.parse()?;
    if args.requests == 0 || args.requests > 10_000 {
        bail!("--requests must be between 1 and 10000");
    }
    let t0 = Instant::now();
    crate::setup::run()?;
    let orca_bin = crate::suite::build_binaries("demo", !kind.is_upstream())?;
    if let Err(e) = &orca_bin {
        if !kind.is_upstream() {
            bail!("orca-proxy did not build: {e}");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = rt.block_on(demo(kind, orca_bin, args.requests));
    println!("\ndemo: finished in {:.1}s", t0.elapsed().as_secs_f64());
    r
}

async fn demo(kind: ProxyKind, orca_bin: std::result::Result<std::path::PathBuf, String>, n: usize) -> Result<()> {
    let t = Instant::now();
    let sb = Sandbox::up(SandboxOptions::default()).await?;
    println!(
        "\n== sandbox up in {:.1}s (waiting for another sandbox on this machine included) ==",
        t.elapsed().as_secs_f64()
    );
    let topo = sb.topology().clone();
    println!(
        "   control plane {} | {} | client {}",
        topo.control_plane.ip,
        topo.nodes
            .iter()
            .map(|n| format!("{} {} (pods {})", n.name, n.ip, n.pod_cidr))
            .collect::<Vec<_>>()
            .join(" | "),
        topo.client.ip
    );
    let result = async {
        default_routes(&topo)?;
        let env = ProxyEnv {
            topology: topo.clone(),
            kubeconfig: sb.kube_proxy_kubeconfig(),
            kube_proxy_bin: sb.bin_dir().join("kube-proxy"),
            orca_proxy_bin: orca_bin,
        };
        let t = Instant::now();
        let opts = StartOptions {
            allow_fallback: true,
            ..StartOptions::default()
        };
        let proxy = Proxy::start(kind, &env, opts).await.context("starting the proxy")?;
        println!(
            "\n== {kind} running on every node, healthy after {:.1}s ==",
            t.elapsed().as_secs_f64()
        );
        for node in &topo.nodes {
            let log = std::fs::read_to_string(proxy.log_path(&node.name)).unwrap_or_default();
            if let Some(line) = log.lines().find(|l| l.contains("falling back")) {
                println!("   {}: {}", node.name, line.trim());
            }
            println!("   {} log: {}", node.name, proxy.log_path(&node.name).display());
        }
        let kubelet = Arc::new(Kubelet::new(sb.admin_client(), &topo)?);
        let ctx = Arc::new(Ctx::new(
            sb.admin_client(),
            kubelet.clone(),
            topo.clone(),
            "demo",
            kind,
            true,
        ));
        ctx.setup().await?;
        let r = show(&ctx, n).await;
        let _ = ctx.cleanup().await;
        let _ = kubelet.shutdown().await;
        for note in proxy.stop().await {
            println!("   proxy: {note}");
        }
        r
    }
    .await;
    let down = sb.down();
    println!("\n== sandbox torn down ==");
    result?;
    down.map(|_| ())
}

fn print_counts(s: &Sample, pods: &[orca_sandbox::kubelet::PodInfo]) {
    let max = s.answers.values().copied().max().unwrap_or(1).max(1);
    for p in pods {
        let c = s.answers.get(&p.name).copied().unwrap_or(0);
        let bar = "#".repeat(c * 40 / max);
        println!(
            "     {:<22} {:<12} {:<7} {c:>4}  {bar}",
            p.name,
            p.ip.to_string(),
            p.node
        );
    }
    for (pod, c) in &s.answers {
        if !pods.iter().any(|p| &p.name == pod) {
            println!("     {pod:<22} (unexpected)         {c:>4}");
        }
    }
    for (e, c) in &s.errors {
        println!("     failed: {e} x{c}");
    }
}

/// Flip `victim`'s `/ready` to `ready` and measure, from the flip, when its Pod's Ready condition follows and
/// when its presence in the answers of `addr` follows (polling every 100 ms, up to 30 s).
async fn flip(ctx: &Ctx, from: &str, addr: SocketAddr, victim: &str, ready: bool) -> Result<(Duration, Duration)> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let t = Instant::now();
    ctx.kubelet.set_ready(&ctx.ns, victim, ready).await?;
    let (mut condition, mut traffic) = (None, None);
    while t.elapsed() < Duration::from_secs(30) {
        if condition.is_none() && pod_ready(&pods.get(victim).await?) == ready {
            condition = Some(t.elapsed());
        }
        if traffic.is_none() {
            let s = sample(from, addr, 15).await;
            if s.failed() == 0 && s.pods().contains(victim) == ready {
                traffic = Some(t.elapsed());
            }
            // The round took a while: look at the condition again so its time is not rounded up to the next round.
            if condition.is_none() && pod_ready(&pods.get(victim).await?) == ready {
                condition = Some(t.elapsed());
            }
        }
        if let (Some(c), Some(tr)) = (condition, traffic) {
            return Ok((c, tr));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{victim}: Ready condition after {condition:?}, traffic after {traffic:?}; not both within 30s")
}

async fn show(ctx: &Ctx, n: usize) -> Result<()> {
    println!("\n== the seed example ==");
    let app = deploy_seed(ctx).await?;
    let a_ip = cluster_ip(&ctx.get_service("alpaca-prod").await?)?;
    let b_ip = cluster_ip(&ctx.get_service("bandicoot-prod").await?)?;
    let from = app.kuard.netns.as_str();
    let all = names(&app.alpaca);
    let mut failed = Vec::new();

    println!(
        "\n== {n} requests from the kuard pod ({}) to each Service ==",
        app.kuard.ip
    );
    let r: Result<()> = async {
        expect_backends(from, sa(a_ip, 8080), &all).await?;
        let s = sample(from, sa(a_ip, 8080), n).await;
        println!("   alpaca-prod {a_ip}:8080");
        print_counts(&s, &app.alpaca);
        expect_backends(from, sa(b_ip, 8080), &names(&app.bandicoot)).await?;
        let s = sample(from, sa(b_ip, 8080), n).await;
        println!("   bandicoot-prod {b_ip}:8080");
        print_counts(&s, &app.bandicoot);
        let w: WhoAmI = orca_sandbox::pods::whoami(from, sa(a_ip, 8080), Duration::from_secs(2))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        println!(
            "   the pod saw the request come from {} (the kuard pod's own IP)",
            w.client
        );
        Ok(())
    }
    .await;
    section("ClusterIP spread", r, &mut failed);

    let victim = &app.alpaca[0];
    println!(
        "\n== readiness flip: {} starts failing /ready (probe every 0.5s, failureThreshold 3) ==",
        victim.name
    );
    let r: Result<()> = async {
        let addr = sa(a_ip, 8080);
        let (cond, traffic) = flip(ctx, from, addr, &victim.name, false).await?;
        println!(
            "   Pod Ready=False after {:.1}s; out of the answers after {:.1}s",
            cond.as_secs_f64(),
            traffic.as_secs_f64()
        );
        let s = sample(from, addr, n).await;
        print_counts(&s, &app.alpaca);
        println!("   {} recovers (/ready answers 200 again)", victim.name);
        let (cond, traffic) = flip(ctx, from, addr, &victim.name, true).await?;
        println!(
            "   Pod Ready=True after {:.1}s; back in the answers after {:.1}s",
            cond.as_secs_f64(),
            traffic.as_secs_f64()
        );
        Ok(())
    }
    .await;
    section("readiness flip", r, &mut failed);

    println!(
        "\n== alpaca-prod as a NodePort, from the external client ({}) ==",
        ctx.topo.client.ip
    );
    let r: Result<()> = async {
        let svc = ctx
            .patch_service("alpaca-prod", json!({"spec": {"type": "NodePort"}}))
            .await?;
        let np = node_port(&svc, None)?;
        for node in &ctx.topo.nodes {
            println!("   {}:{np} ({})", node.ip, node.name);
            let r = expect_backends(ctx.client_ns(), sa(node.ip, np), &all).await;
            let s = sample(ctx.client_ns(), sa(node.ip, np), n).await;
            print_counts(&s, &app.alpaca);
            r?;
        }
        Ok(())
    }
    .await;
    section("NodePort", r, &mut failed);

    println!("\n== alpaca-prod as a LoadBalancer (ingress {SEED_LB_IP}, routed to node-a) ==");
    let r: Result<()> = async {
        ctx.patch_service("alpaca-prod", json!({"spec": {"type": "LoadBalancer"}}))
            .await?;
        ctx.set_lb_ingress("alpaca-prod", SEED_LB_IP).await?;
        println!("   {SEED_LB_IP}:8080");
        let r = expect_backends(ctx.client_ns(), sa(SEED_LB_IP, 8080), &all).await;
        let s = sample(ctx.client_ns(), sa(SEED_LB_IP, 8080), n).await;
        print_counts(&s, &app.alpaca);
        r.map(|_| ())
    }
    .await;
    section("LoadBalancer", r, &mut failed);

    if failed.is_empty() {
        println!("\n== every part of the demo worked ==");
        Ok(())
    } else {
        bail!("parts of the demo failed: {}", failed.join(", "))
    }
}

fn section(name: &str, r: Result<()>, failed: &mut Vec<String>) {
    if let Err(e) = r {
        println!("   FAILED ({name}): {e:#}");
        failed.push(name.to_string());
    }
}
