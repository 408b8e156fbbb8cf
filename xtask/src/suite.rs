//! `cargo xtask suite`: the Service behaviour suite — every scenario against every selected proxy on one sandbox,
//! then a scenario x proxy table with the reason for each failure.
//!
//! Exits non-zero when a scenario fails against upstream kube-proxy (then the scenario or the harness is wrong)
//! or against a proxy given with `--require`. Failures of other Orca modes are reported, not fatal, until the
//! lead adds them to `--require` (or `ORCA_SUITE_REQUIRE`, comma-separated).
use anyhow::{bail, Context, Result};
use clap::Args;
use orca_sandbox::suite::{runner, ProxyKind, SuiteOptions};
use orca_sandbox::{build, repo_root};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct SuiteArgs {
    /// Proxies to run against (repeatable): kube-proxy-iptables, kube-proxy-nftables, orca-iptables, orca-ebpf.
    /// Default: all four.
    #[arg(long = "proxy", value_name = "NAME")]
    pub proxies: Vec<String>,
    /// Scenarios to run (repeatable); default: all. `--list` shows them.
    #[arg(long = "scenario", value_name = "NAME")]
    pub scenarios: Vec<String>,
    /// Orca modes whose failures fail the run, like upstream's (repeatable, or comma-separated in
    /// ORCA_SUITE_REQUIRE).
    #[arg(
        long = "require",
        value_name = "NAME",
        env = "ORCA_SUITE_REQUIRE",
        value_delimiter = ','
    )]
    pub require: Vec<String>,
    /// Time limit of one scenario, in seconds.
    #[arg(long, default_value_t = 180)]
    pub scenario_timeout: u64,
    /// Print only the outcome of each scenario, not its steps.
    #[arg(long)]
    pub quiet: bool,
    /// List the scenarios and exit.
    #[arg(long)]
    pub list: bool,
}

fn cargo_build(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(repo_root())
        .arg("build")
        .args(args)
        .status()
        .with_context(|| format!("running cargo build {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo build {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Build `orca-testpod` (and set `ORCA_TESTPOD_BIN` to it) so pods run the current test server.
pub fn build_testpod() -> Result<()> {
    cargo_build(&["-p", "orca-sandbox", "--bin", "orca-testpod"])?;
    let bin = repo_root().join("target/debug/orca-testpod");
    // SAFETY (edition 2021: set_var is safe): called before any thread that reads the environment starts.
    std::env::set_var("ORCA_TESTPOD_BIN", &bin);
    Ok(())
}

/// Build `orca-proxy`; the error text becomes the reason every Orca row fails with.
pub fn build_orca_proxy() -> std::result::Result<PathBuf, String> {
    if let Ok(p) = std::env::var("ORCA_PROXY_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("ORCA_PROXY_BIN={} is not a file", p.display()))
        };
    }
    match cargo_build(&["-p", "orca-proxy", "--bin", "orca-proxy"]) {
        Ok(()) => Ok(repo_root().join("target/debug/orca-proxy")),
        Err(e) => Err(format!("{e:#}")),
    }
}

fn parse_kinds(names: &[String]) -> Result<Vec<ProxyKind>> {
    let mut v = Vec::new();
    for n in names {
        let k: ProxyKind = n.trim().parse()?;
        if !v.contains(&k) {
            v.push(k);
        }
    }
    Ok(v)
}

pub fn run(args: SuiteArgs) -> Result<()> {
    if args.list {
        for s in orca_sandbox::suite::scenarios::all() {
            println!("{:<18} {}", s.name, s.about);
        }
        return Ok(());
    }
    let t0 = Instant::now();
    let mut proxies = parse_kinds(&args.proxies)?;
    if proxies.is_empty() {
        proxies = ProxyKind::ALL.to_vec();
    }
    let require: Vec<ProxyKind> = parse_kinds(
        &args
            .require
            .iter()
            .filter(|s| !s.trim().is_empty())
            .cloned()
            .collect::<Vec<_>>(),
    )?;
    // Validate scenario names before building anything.
    runner::select(&args.scenarios)?;

    println!("suite: control-plane binaries");
    build::ensure_k8s_binaries()?;
    println!("suite: building orca-testpod");
    build_testpod()?;
    let orca_proxy_bin = if proxies.iter().any(|p| !p.is_upstream()) {
        println!("suite: building orca-proxy");
        let b = build_orca_proxy();
        if let Err(e) = &b {
            println!("suite: orca-proxy did not build; its rows will fail: {e}");
        }
        b
    } else {
        Err("not needed".into())
    };
    let opts = SuiteOptions {
        proxies,
        scenarios: args.scenarios.clone(),
        orca_proxy_bin,
        scenario_timeout: Duration::from_secs(args.scenario_timeout),
        verbose: !args.quiet,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(runner::run(&opts))?;
    println!("\n{}", report.table());
    println!("(all of `cargo xtask suite` took {:.1}s)", t0.elapsed().as_secs_f64());

    let upstream: Vec<ProxyKind> = ProxyKind::ALL.into_iter().filter(|k| k.is_upstream()).collect();
    let bad_upstream = report.failures_for(&upstream);
    let bad_required = report.failures_for(&require);
    if !bad_upstream.is_empty() || !bad_required.is_empty() {
        let mut why = Vec::new();
        if !bad_upstream.is_empty() {
            why.push(format!(
                "{} scenario run(s) failed against upstream kube-proxy (a wrong scenario or harness)",
                bad_upstream.len()
            ));
        }
        if !bad_required.is_empty() {
            why.push(format!("{} failed against required Orca modes", bad_required.len()));
        }
        bail!("suite failed: {}", why.join("; "));
    }
    Ok(())
}
