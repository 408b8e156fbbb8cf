use clap::Parser;
use orca_proxy::app::init_logging;
use orca_proxy::cli::{Cli, Command};
use orca_proxy::settings::Settings;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let command = if cli.flags.cleanup {
        Command::Cleanup
    } else {
        cli.command.unwrap_or(Command::Run)
    };
    if let Command::Version = command {
        println!("orca-proxy {}", env!("CARGO_PKG_VERSION"));
        return std::process::ExitCode::SUCCESS;
    }
    if let Command::CheckKernel = command {
        return match orca_proxy::kernel_check::run() {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("orca-proxy: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let settings = match Settings::from_flags(&cli.flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("orca-proxy: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(settings.verbosity, settings.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("orca-proxy: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match command {
            Command::Run => orca_proxy::app::run(settings).await,
            Command::Cleanup => orca_proxy::dataplane::select::cleanup_all(&settings),
            Command::Status { json, verify } => orca_proxy::status::run(&settings, json, verify).await,
            Command::Version | Command::CheckKernel => Ok(()),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("orca-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
