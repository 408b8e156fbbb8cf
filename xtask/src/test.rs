//! `cargo xtask test`: the whole test suite, set-up included (what `.ci/run` runs).
//!
//! 1. `cargo xtask setup` (idempotent);
//! 2. `cargo build --workspace` (the agent with its eBPF programs embedded);
//! 3. `cargo test --workspace -- --test-threads=1`: unit tests, then the integration tests that need root, the
//!    kernel inside network namespaces and the sandbox's real kube-apiserver (one at a time: they share names);
//! 4. `cargo xtask suite --require orca-iptables,orca-ebpf`: the Service behaviour suite against upstream kube-proxy
//!    and both of Orca's modes; a failure against any of them fails the run;
//! 5. `cargo xtask kernels`: the eBPF programs and dataplane tests on Debian's 5.10, 6.1 and 6.12 kernels in qemu.

use std::time::Instant;

use anyhow::{bail, Context, Result};

fn cargo(args: &[&str]) -> Result<()> {
    let started = Instant::now();
    println!("test: cargo {} ...", args.join(" "));
    let status = crate::cargo()
        .args(args)
        .env("ORCA_REQUIRE_SANDBOX", "1")
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    println!(
        "test: cargo {} finished in {:.1}s: {status}",
        args.join(" "),
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn run(skip_suite: bool, skip_kernels: bool) -> Result<()> {
    let started = Instant::now();
    crate::setup::run()?;
    cargo(&["build", "--workspace", "--bins"])?;
    cargo(&["test", "--workspace", "--no-fail-fast", "--", "--test-threads=1"])?;
    if !skip_suite {
        // Upstream kube-proxy (both modes) is always required, and so are both of Orca's modes.
        cargo(&[
            "run",
            "--quiet",
            "--package",
            "xtask",
            "--",
            "suite",
            "--require",
            "orca-iptables,orca-ebpf",
        ])?;
    }
    if !skip_kernels {
        cargo(&["run", "--quiet", "--package", "xtask", "--", "kernels"])?;
    }
    println!("test: everything passed in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
