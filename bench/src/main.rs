//! `orca-bench`: Orca against upstream kube-proxy and against no proxy at all, on the sandbox.
//!
//! * `orca-bench run [--quick] ...` brings the sandbox up, measures every configuration at every scale and
//!   writes `bench/results/<date>-<quick|full>.{md,json}` and PNG charts (see `run` and `report`).
//! * `orca-bench load ...` is the load generator the run starts inside the client pod's network namespace.
//!
//! `cargo xtask bench [--quick]` builds everything in release mode and runs `orca-bench run`.
mod agentmem;
mod backend;
mod cluster;
mod load;
mod probe;
mod report;
mod results;
mod run;
mod tccost;
mod testrun;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use run::{Config, RunOpts};
use std::path::PathBuf;
use std::time::Duration;

#[global_allocator]
static ALLOC: agentmem::Counting = agentmem::Counting;

#[derive(Parser)]
#[command(about = "Packet-path and control-plane benchmarks: Orca vs kube-proxy vs direct pod IPs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole benchmark on a fresh sandbox (needs root).
    Run(RunArgs),
    /// The load generator (run inside a network namespace; prints one JSON line).
    Load(load::LoadArgs),
    /// TC program cost per packet on every path at each scale (BPF_PROG_TEST_RUN; needs root, no sandbox).
    TcCost(tccost::TcCostArgs),
    /// The agent's user-space memory per endpoint: synthetic Services and EndpointSlices through the change
    /// tracker and the eBPF programmer, in-process (no sandbox, no root).
    AgentMem(agentmem::AgentMemArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Small scales (1, 1000), short runs, 3 repeats.
    #[arg(long)]
    quick: bool,
    /// Scales (Service counts), comma-separated; default 1,1000 (quick) or 1,1000,10000,30000.
    #[arg(long, value_delimiter = ',')]
    scales: Vec<usize>,
    /// Repetitions of each configuration; default 3.
    #[arg(long)]
    repeats: Option<usize>,
    /// Configurations (repeatable): direct, orca-ebpf, orca-iptables, kube-proxy-iptables, kube-proxy-nftables.
    #[arg(long = "config")]
    configs: Vec<String>,
    /// Configurations measured at the first (smallest) scale only (default: all of --config), e.g. `direct,orca-ebpf`
    /// to get the eBPF(30k)/eBPF(1) ratio without measuring every proxy at 1 Service.
    #[arg(long, value_delimiter = ',')]
    first_scale_configs: Vec<String>,
    /// The orca-proxy binary (release build).
    #[arg(long)]
    orca_proxy: PathBuf,
    /// The orca-proxy binary of an earlier build, measured as `--config orca-ebpf-before` (`cargo xtask bench
    /// --baseline <git rev>` builds it).
    #[arg(long)]
    baseline_proxy: Option<PathBuf>,
    /// Where the results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Length of one load run in ms; default 1500 (quick) or 2000 (the full run at 1, 1k, 10k and 30k Services then
    /// takes about 45 minutes on a 2-core machine).
    #[arg(long)]
    duration_ms: Option<u64>,
    /// Op cap of one load run.
    #[arg(long, default_value_t = 40_000)]
    max_ops: u64,
    /// Concurrent load workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Endpoint changes for programming latency per proxy and scale; default 10 (quick) or 50.
    #[arg(long)]
    prog_changes: Option<usize>,
    /// Time limit of one configuration's programming-latency changes at one scale, seconds (a proxy whose syncs
    /// take many seconds reports fewer changes, and the report says so).
    #[arg(long, default_value_t = 400)]
    prog_budget_s: u64,
    /// Pause between programming-latency changes, ms (upstream's min-sync-period is 1 s).
    #[arg(long, default_value_t = 1100)]
    prog_gap_ms: u64,
    /// Backend of the iptables-mode proxies (Orca's and upstream's alike): auto = nft below 5,000 Services,
    /// legacy from there on (iptables-nft-restore is quadratic: minutes per sync at 10k Services).
    #[arg(long, value_enum, default_value_t = backend::BackendChoice::Auto)]
    iptables_backend: backend::BackendChoice,
    /// Profile the machine (`perf record -a`) during the first cross-node connect run of each configuration at
    /// the largest scale; the top symbols go into the report.
    #[arg(long)]
    profile: bool,
    /// Profile node-a's agent (`perf record -g -p`) during the programming-latency changes at the largest scale.
    #[arg(long)]
    profile_agent: bool,
    /// Concurrent apiserver requests while creating the filler Services.
    #[arg(long, default_value_t = cluster::FILL_CONCURRENCY)]
    fill_concurrency: usize,
    /// Endpoints of every filler Service (default: 2 to 10 in turn), e.g. 10 for 300,000 endpoints at 30,000
    /// Services.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
    filler_endpoints: Option<u16>,
    /// BPF_PROG_TEST_RUN repeat count.
    #[arg(long, default_value_t = 100_000)]
    tc_repeat: u32,
    /// File name stem of the results; default `<date>-<quick|full>`.
    #[arg(long)]
    name: Option<String>,
    /// How the run was started (for the report); default: this command line.
    #[arg(long, env = "ORCA_BENCH_COMMAND")]
    command: Option<String>,
}

fn run_cmd(a: RunArgs) -> Result<()> {
    let quick = a.quick;
    let scales = if a.scales.is_empty() {
        if quick {
            vec![1, 1000]
        } else {
            vec![1, 1000, 10_000, 30_000]
        }
    } else {
        a.scales.clone()
    };
    if scales.iter().any(|&s| s == 0 || s > 60_000) {
        bail!("scales must be 1..=60000 (the service CIDR is a /16): {scales:?}");
    }
    if scales.windows(2).any(|w| w[0] >= w[1]) {
        bail!("scales must grow: {scales:?} (fillers are only ever added)");
    }
    let configs = if a.configs.is_empty() {
        Config::ALL.to_vec()
    } else {
        a.configs.iter().map(|c| Config::parse(c)).collect::<Result<Vec<_>>>()?
    };
    if !a.orca_proxy.is_file()
        && configs.iter().any(|c| {
            matches!(c, Config::EbpfBypass | Config::EbpfBefore) || matches!(c, Config::Proxy(k) if !k.is_upstream())
        })
    {
        bail!("--orca-proxy {} is not a file", a.orca_proxy.display());
    }
    let first_scale_configs = if a.first_scale_configs.is_empty() {
        None
    } else {
        let f = a
            .first_scale_configs
            .iter()
            .map(|c| Config::parse(c))
            .collect::<Result<Vec<_>>>()?;
        if let Some(c) = f.iter().find(|c| !configs.contains(c)) {
            bail!("--first-scale-configs: {} is not one of the --config set", c.name());
        }
        Some(f)
    };
    let repeats = a.repeats.unwrap_or(3);
    if repeats == 0 || repeats > 50 {
        bail!("--repeats must be 1..=50");
    }
    let stem = a.name.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            &cluster::rfc3339_now()[..10],
            if quick { "quick" } else { "full" }
        )
    });
    let command = a
        .command
        .clone()
        .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    let o = RunOpts {
        quick,
        scales,
        repeats,
        configs,
        first_scale_configs,
        orca_proxy_bin: std::fs::canonicalize(&a.orca_proxy).unwrap_or(a.orca_proxy.clone()),
        baseline_proxy_bin: a.baseline_proxy.clone(),
        out_dir: a.out.clone(),
        duration_ms: a
            .duration_ms
            .unwrap_or(if quick { 1500 } else { 2000 })
            .clamp(100, 60_000),
        max_ops: a.max_ops.clamp(1, load::MAX_OPS_CAP),
        workers: a.workers.clamp(1, 64),
        prog_changes: a.prog_changes.unwrap_or(if quick { 10 } else { 50 }).clamp(1, 500),
        prog_gap: Duration::from_millis(a.prog_gap_ms.clamp(0, 10_000)),
        iptables_backend: a.iptables_backend,
        prog_budget: Duration::from_secs(a.prog_budget_s.clamp(1, 3600)),
        fill_concurrency: a.fill_concurrency.clamp(1, 512),
        filler_endpoints: a.filler_endpoints.map(usize::from),
        profile: a.profile,
        profile_agent: a.profile_agent,
        tc_repeat: a.tc_repeat.clamp(1, 10_000_000),
        command,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(run::run(&o))?;
    let md = report::write(&o.out_dir, &stem, &result)?;
    println!("\nbench: results in {}", md.display());
    println!("{}", std::fs::read_to_string(&md).context("reading the report back")?);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run_cmd(a),
        Cmd::TcCost(a) => tccost::run(a),
        Cmd::AgentMem(a) => agentmem::run(a),
        Cmd::Load(a) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(load::run(&a)))
            .and_then(|r| {
                println!("{}", serde_json::to_string(&r)?);
                Ok(())
            }),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orca-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
