use clap::{Parser, Subcommand};

mod sandbox;
mod setup;

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
    /// The sandbox cluster: `up` (until Ctrl-C), `down`, `build-k8s`.
    Sandbox {
        #[command(subcommand)]
        cmd: sandbox::SandboxCmd,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Sandbox { cmd } => sandbox::run(cmd),
    }
}
