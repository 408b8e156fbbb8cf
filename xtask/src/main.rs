use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
    }
}
