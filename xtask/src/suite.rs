//! `cargo xtask suite`: the Service behaviour suite — every scenario against every selected proxy on one sandbox,
//! then a scenario x proxy table with the reason for each failure.
//!
//! Exits non-zero when a scenario fails against upstream kube-proxy (then the scenario or the harness is wrong)
//! or against a proxy given with `--require`. Failures of other Orca modes are reported, not fatal, until the
//! lead adds them to `--require` (or `ORCA_SUITE_REQUIRE`, comma-separated).
use anyhow::{bail, Context, Result};
use clap::Args;
use orca_sandbox::repo_root;
use orca_sandbox::suite::{runner, ProxyKind, SuiteOptions};
use std::path::PathBuf;
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
    let status = crate::cargo()
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

/// Points `ORCA_TESTPOD_BIN` at the debug `orca-testpod`, so pods run the current test server.
fn use_testpod() {
    let bin = repo_root().join("target/debug/orca-testpod");
    // SAFETY (edition 2021: set_var is safe): called before any thread that reads the environment starts.
    std::env::set_var("ORCA_TESTPOD_BIN", &bin);
}

/// Builds `orca-testpod` and, when `with_orca`, `orca-proxy` with its eBPF programs: in one cargo invocation, so
/// the dependencies both share (kube, rustls, ring) are resolved with one feature set and built once (two separate
/// invocations resolve them differently, and each run rebuilt them). Returns orca-proxy's path, or the reason it did
/// not build (the text every Orca row then fails with); `ORCA_PROXY_BIN` names a prebuilt one.
pub fn build_binaries(what: &str, with_orca: bool) -> Result<std::result::Result<PathBuf, String>> {
    let prebuilt = std::env::var("ORCA_PROXY_BIN").ok().map(PathBuf::from);
    if !with_orca || prebuilt.is_some() {
        println!("{what}: building orca-testpod");
        cargo_build(&["-p", "orca-sandbox", "--bin", "orca-testpod"])?;
        use_testpod();
        return Ok(match prebuilt {
            None => Err("not needed".into()),
            Some(p) if p.is_file() => Ok(p),
            Some(p) => Err(format!("ORCA_PROXY_BIN={} is not a file", p.display())),
        });
    }
    println!("{what}: building orca-testpod and orca-proxy with its eBPF programs (first build: 2-4 min)");
    let both = [
        "-p",
        "orca-sandbox",
        "-p",
        "orca-proxy",
        "--bin",
        "orca-testpod",
        "--bin",
        "orca-proxy",
    ];
    match cargo_build(&both) {
        Ok(()) => {
            use_testpod();
            Ok(Ok(repo_root().join("target/debug/orca-proxy")))
        }
        Err(e) => {
            println!("{what}: orca-proxy did not build; building orca-testpod alone");
            cargo_build(&["-p", "orca-sandbox", "--bin", "orca-testpod"])?;
            use_testpod();
            Ok(Err(format!("{e:#}")))
        }
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

    crate::setup::run()?;
    let orca_proxy_bin = build_binaries("suite", proxies.iter().any(|p| !p.is_upstream()))?;
    if let Err(e) = &orca_proxy_bin {
        if e != "not needed" {
            println!("suite: orca-proxy did not build; its rows will fail: {e}");
        }
    }
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
