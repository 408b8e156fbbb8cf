use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod kernels;
#[cfg(test)]
mod layout;
mod sandbox;
mod setup;
mod suite;
mod test;

#[derive(Parser)]
#[command(about = "Orca's build, setup, sandbox, demo, test and bench entry points")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything the build, tests and demo need (idempotent).
    Setup,
    /// Run the whole test suite, set-up included (what CI runs).
    Test {
        /// Skip the Service behaviour suite (unit and integration tests only).
        #[arg(long)]
        no_suite: bool,
        /// Skip the kernel matrix (`cargo xtask kernels`).
        #[arg(long)]
        no_kernels: bool,
    },
    /// The sandbox cluster: `up` (until Ctrl-C), `down`, `build-k8s`.
    Sandbox {
        #[command(subcommand)]
        cmd: sandbox::SandboxCmd,
    },
    /// The Service behaviour suite: every scenario against every proxy on one sandbox, with a summary table.
    Suite(suite::SuiteArgs),
    /// The demo: the sandbox, orca-proxy on every node, the seed example's traffic; torn down at the end.
    Demo(demo::DemoArgs),
    /// The eBPF programs and dataplane tests on Debian's 5.10, 6.1 and 6.12 kernels, each booted in qemu.
    Kernels(kernels::KernelArgs),
    /// Benchmarks against upstream kube-proxy and direct pod IPs (`--quick`: a few minutes); results in bench/results.
    Bench(bench::BenchArgs),
}

/// A `cargo` command for a build or test xtask runs, in the environment a shell would give it.
///
/// `cargo run` (the `xtask` alias) hands xtask `CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME` and the like of the xtask
/// package. Build scripts that declare `rerun-if-env-changed` on them (ring's does) would then see a different value
/// than in a `cargo build` from a shell, so cargo reruns them and rebuilds ring, rustls and kube, and the next
/// build from a shell rebuilds them again. Removing them lets every build find the artifacts of the last one.
pub fn cargo() -> std::process::Command {
    let mut c = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let injected = k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("CARGO_BIN_")
            || matches!(&*k, "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR");
        if injected {
            c.env_remove(&key);
        }
    }
    c
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test { no_suite, no_kernels } => test::run(no_suite, no_kernels),
        Cmd::Sandbox { cmd } => sandbox::run(cmd),
        Cmd::Suite(args) => suite::run(args),
        Cmd::Demo(args) => demo::run(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Kernels(args) => kernels::run(args),
    }
}
