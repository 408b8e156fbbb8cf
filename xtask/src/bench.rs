//! `cargo xtask bench [--quick] [-- <orca-bench run flags>]`: builds orca-proxy, orca-testpod and orca-bench in
//! release mode, then runs `orca-bench run` (needs root: it brings the sandbox up). Results go to
//! `bench/results/<date>-<quick|full>.md` (+ `.json`, PNG charts).
use anyhow::{bail, Context, Result};
use clap::Args;
use orca_sandbox::repo_root;
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
    /// Also measure this git revision ("before"), side by side in the same run: with --tc-cost its eBPF programs,
    /// otherwise its agent as the configuration `orca-ebpf-before` (add `-- --config orca-ebpf-before ...`).
    /// Built from `git archive <rev>` under target/baseline/.
    #[arg(long)]
    pub baseline: Option<String>,
    /// More flags for `orca-bench run` (e.g. `-- --scales 1,1000,10000 --config direct --config orca-ebpf`).
    #[arg(last = true)]
    pub extra: Vec<String>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    crate::setup::run()?;
    let root = repo_root();
    println!("bench: building orca-proxy, orca-testpod and orca-bench (release; first build: 3-6 min)");
    let status = crate::cargo()
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
    if let Some(rev) = &args.baseline {
        shown.push_str(&format!(" --baseline {rev}"));
    }
    if !args.extra.is_empty() {
        shown.push_str(" -- ");
        shown.push_str(&args.extra.join(" "));
    }
    if args.tc_cost {
        let mut cmd = Command::new(rel.join("orca-bench"));
        cmd.current_dir(&root).arg("tc-cost");
        if let Some(rev) = &args.baseline {
            let object = baseline_object(&unpack(&root, rev)?)?;
            cmd.arg("--baseline-object").arg(object).args(["--baseline-label", rev]);
        }
        let status = cmd.args(&args.extra).status().context("running orca-bench tc-cost")?;
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
    if let Some(rev) = &args.baseline {
        cmd.arg("--baseline-proxy")
            .arg(baseline_agent(&root, &unpack(&root, rev)?)?);
    }
    cmd.args(&args.extra);
    let status = cmd.status().context("running orca-bench")?;
    if !status.success() {
        bail!("orca-bench run failed ({status})");
    }
    Ok(())
}

/// The sources of git revision `rev`, unpacked (once) from `git archive` under target/baseline/<commit>/.
fn unpack(root: &std::path::Path, rev: &str) -> Result<std::path::PathBuf> {
    let git = |args: &[&str]| -> Result<Vec<u8>> {
        let out = Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .context("running git")?;
        if !out.status.success() {
            bail!(
                "git {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    };
    let commit = String::from_utf8(git(&["rev-parse", "--verify", &format!("{rev}^{{commit}}")])?)?
        .trim()
        .to_string();
    let dir = root.join("target/baseline").join(&commit);
    if dir.join("Cargo.toml").exists() {
        return Ok(dir);
    }
    println!("bench: unpacking {rev} ({commit}) for the baseline");
    std::fs::create_dir_all(&dir)?;
    let tar = git(&["archive", "--format=tar", &commit])?;
    let mut untar = Command::new("tar")
        .current_dir(&dir)
        .args(["-x", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running tar")?;
    {
        use std::io::Write as _;
        untar.stdin.take().context("tar stdin")?.write_all(&tar)?;
    }
    if !untar.wait()?.success() {
        bail!("unpacking {commit} failed");
    }
    Ok(dir)
}

/// Builds the eBPF programs of the unpacked sources in `dir` as the agent's build script does (aya-build's
/// flags); returns the object. Reused when already built.
fn baseline_object(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let object = dir.join("target/bpfel-unknown-none/release/orca-ebpf");
    if object.exists() {
        return Ok(object);
    }
    println!("bench: building the baseline's eBPF programs in {}", dir.display());
    let status = Command::new("rustup")
        .current_dir(dir.join("proxy-ebpf"))
        .args([
            "run",
            crate::setup::NIGHTLY,
            "cargo",
            "build",
            "--package",
            "proxy-ebpf",
            "--bins",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(dir.join("target"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .context("building the baseline eBPF programs")?;
    if !status.success() || !object.exists() {
        bail!("building the eBPF programs in {} failed ({status})", dir.display());
    }
    Ok(object)
}

/// Builds the agent (release) of the unpacked sources in `dir`, in a target directory shared by baselines.
fn baseline_agent(root: &std::path::Path, dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let target = root.join("target/baseline/target");
    println!(
        "bench: building the baseline's orca-proxy (release) in {}",
        dir.display()
    );
    let status = crate::cargo()
        .current_dir(dir)
        .args(["build", "--release", "-p", "orca-proxy", "--bin", "orca-proxy"])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .context("building the baseline agent")?;
    if !status.success() {
        bail!("building the baseline agent in {} failed ({status})", dir.display());
    }
    // One binary per baseline: the shared target directory holds the last one built.
    let bin = dir.join("orca-proxy");
    std::fs::copy(target.join("release/orca-proxy"), &bin)?;
    Ok(bin)
}
