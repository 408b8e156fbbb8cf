//! `cargo xtask sandbox up|down|build-k8s`: the sandbox cluster from the command line.
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use orca_sandbox::{build, netns, Sandbox, SandboxOptions};
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum SandboxCmd {
    /// Bring the sandbox up (building the control plane on first use) and keep it up until Ctrl-C.
    Up {
        /// Tear down by itself after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        hold_secs: Option<u64>,
    },
    /// Tear down a running sandbox (asks its owner to stop) and remove whatever an earlier run left.
    Down {
        /// Also remove every other `orca-*` namespace (left by crashed dataplane tests) and its processes.
        #[arg(long)]
        all: bool,
    },
    /// Build (or confirm the cache of) etcd, kube-apiserver, kube-controller-manager and kube-proxy.
    BuildK8s,
}

pub fn run(cmd: SandboxCmd) -> Result<()> {
    match cmd {
        SandboxCmd::BuildK8s => {
            let t = Instant::now();
            let dir = build::ensure_k8s_binaries()?;
            println!(
                "control-plane binaries ({}) in {} ({:.1}s)",
                build::binary_names().collect::<Vec<_>>().join(", "),
                dir.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        SandboxCmd::Down { all } => down(all),
        SandboxCmd::Up { hold_secs } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(up(hold_secs))
        }
    }
}

async fn up(hold_secs: Option<u64>) -> Result<()> {
    let t = Instant::now();
    let mut sb = Sandbox::up(SandboxOptions::default()).await?;
    let topo = sb.topology().clone();
    let nodes: Api<Node> = Api::all(sb.admin_client());
    let n_nodes = nodes
        .list(&ListParams::default().labels("orca.dev/sandbox=true"))
        .await
        .context("listing nodes")?
        .items
        .len();
    println!(
        "sandbox up in {:.1}s ({n_nodes} nodes registered)\n",
        t.elapsed().as_secs_f64()
    );
    println!("  admin kubeconfig (root namespace, via the relay while this command runs):");
    println!("    {}", sb.kubeconfig().display());
    println!("  admin kubeconfig for processes inside the namespaces:");
    println!("    {}", sb.fabric_kubeconfig().display());
    println!("  kube-proxy kubeconfig (system:kube-proxy):");
    println!("    {}", sb.kube_proxy_kubeconfig().display());
    println!("  apiserver: {} (inside the sandbox)", sb.apiserver_url());
    println!("  binaries:  {}", sb.bin_dir().display());
    println!("  logs:      {}", netns::log_dir().display());
    println!("\n  namespaces:");
    println!("    {:<14} bridge {}", topo.fabric_netns, topo.fabric_cidr);
    println!(
        "    {:<14} {}  (etcd, kube-apiserver, kube-controller-manager)",
        topo.control_plane.netns, topo.control_plane.ip
    );
    for n in &topo.nodes {
        println!(
            "    {:<14} {}  node {} pods {} zone {}",
            n.netns, n.ip, n.name, n.pod_cidr, n.zone
        );
    }
    println!("    {:<14} {}  external client", topo.client.netns, topo.client.ip);
    println!(
        "\n  services {}  nodeports {}-{}  load-balancer/external IPs {} (client routes them via {})",
        topo.service_cidr, topo.node_port_range.0, topo.node_port_range.1, topo.lb_cidr, topo.nodes[0].ip
    );
    println!("\n  e.g.: ip netns exec {} <cmd>", topo.nodes[0].netns);
    match hold_secs {
        Some(s) => println!("\n  tearing down in {s}s (or on Ctrl-C)"),
        None => println!("\n  Ctrl-C tears it down"),
    }
    let deadline = hold_secs.map(|s| Instant::now() + Duration::from_secs(s));
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Err(e) = sb.check_alive() {
            eprintln!("control plane failed: {e:#}");
            let _ = sb.down();
            bail!("the sandbox's control plane stopped");
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    let removed = sb.down()?;
    println!("sandbox down ({} items removed)", removed.len());
    Ok(())
}

fn down(all: bool) -> Result<()> {
    if let Some(owner) = netns::lock_owner() {
        let cmdline = std::fs::read(format!("/proc/{owner}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim().to_string())
            .unwrap_or_default();
        println!("asking the running sandbox (pid {owner}: {cmdline}) to stop");
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(owner as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && netns::lock_owner() == Some(owner) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let removed = if all { netns::teardown_all() } else { netns::teardown() };
    if removed.is_empty() {
        println!("nothing to remove");
    } else {
        for r in &removed {
            println!("removed {r}");
        }
    }
    let left = if all {
        netns::list_orca_netns()
    } else {
        netns::list_sandbox_netns()
    };
    if !left.is_empty() {
        bail!("namespaces still present: {left:?}");
    }
    Ok(())
}
