//! `cargo xtask bench [--quick] [-- <orca-bench run flags>]`: builds orca-proxy, orca-testpod and orca-bench in
//! release mode, then runs `orca-bench run` (needs root: it brings the sandbox up). Results go to
//! `bench/results/<date>-<quick|full>.md` (+ `.json`, PNG charts).
use anyhow::{bail, Context, Result};
use clap::Args;
use orca_sandbox::{build, repo_root};
use std::process::Command;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Small scales (1 and 1,000 Services), short runs, 3 repeats: a few minutes.
    #[arg(long)]
    pub quick: bool,
    /// Only the TC program cost per packet on every path at 1, 1k, 10k and 30k Services (`orca-bench tc-cost`, with
    /// the extra flags): about a minute, no sandbox.
    #[arg(long, conflicts_with = "quick")]
    pub tc_cost: bool,
    /// More flags for `orca-bench run` (e.g. `-- --scales 1,1000,10000 --config direct --config orca-ebpf`).
    #[arg(last = true)]
    pub extra: Vec<String>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    println!("bench: control-plane binaries");
    build::ensure_k8s_binaries()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = repo_root();
    println!("bench: building orca-proxy, orca-testpod and orca-bench (release)");
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "orca-proxy",
            "-p",
            "orca-bench",
            "-p",
            "orca-sandbox",
            "--bin",
            "orca-proxy",
            "--bin",
            "orca-bench",
            "--bin",
            "orca-testpod",
        ])
        .status()
        .context("running cargo build --release")?;
    if !status.success() {
        bail!("cargo build --release failed ({status})");
    }
    let rel = root.join("target/release");
    let mut shown = String::from("cargo xtask bench");
    if args.quick {
        shown.push_str(" --quick");
    }
    if !args.extra.is_empty() {
        shown.push_str(" -- ");
        shown.push_str(&args.extra.join(" "));
    }
    if args.tc_cost {
        let status = Command::new(rel.join("orca-bench"))
            .current_dir(&root)
            .arg("tc-cost")
            .args(&args.extra)
            .status()
            .context("running orca-bench tc-cost")?;
        if !status.success() {
            bail!("orca-bench tc-cost failed ({status})");
        }
        return Ok(());
    }
    let mut cmd = Command::new(rel.join("orca-bench"));
    cmd.current_dir(&root)
        .env("ORCA_TESTPOD_BIN", rel.join("orca-testpod"))
        .env("ORCA_BENCH_COMMAND", &shown)
        .arg("run")
        .arg("--orca-proxy")
        .arg(rel.join("orca-proxy"));
    if args.quick {
        cmd.arg("--quick");
    }
    cmd.args(&args.extra);
    let status = cmd.status().context("running orca-bench")?;
    if !status.success() {
        bail!("orca-bench run failed ({status})");
    }
    Ok(())
}
