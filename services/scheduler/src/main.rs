//! `comfyq-scheduler`: load configuration, run until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "comfyq-scheduler", version, about = "comfyq job scheduler")]
struct Args {
    /// TOML configuration file (environment variables COMFYQ_* override it).
    #[arg(long, short, env = "COMFYQ_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    comfyq_shared::telemetry::init_tracing("info");
    let args = Args::parse();
    let config = match comfyq_shared::config::load::<comfyq_scheduler::SchedulerConfig>(
        args.config.as_deref(),
    ) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("comfyq-scheduler: {error}");
            return ExitCode::from(2);
        }
    };
    let shutdown = comfyq_shared::shutdown::on_signal();
    match comfyq_scheduler::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error, "scheduler failed");
            eprintln!("comfyq-scheduler: {error}");
            ExitCode::FAILURE
        }
    }
}
