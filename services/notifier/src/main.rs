//! `comfyq-notifier`: load configuration, run until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "comfyq-notifier", version, about = "comfyq webhook delivery")]
struct Args {
    /// TOML configuration file (environment variables COMFYQ_* override it).
    #[arg(long, short, env = "COMFYQ_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    comfyq_shared::telemetry::init_tracing("info");
    let args = Args::parse();
    let config = match comfyq_shared::config::load::<comfyq_notifier::NotifierConfig>(
        args.config.as_deref(),
    ) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("comfyq-notifier: {error}");
            return ExitCode::from(2);
        }
    };
    let shutdown = comfyq_shared::shutdown::on_signal();
    match comfyq_notifier::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("comfyq-notifier: {error}");
            ExitCode::FAILURE
        }
    }
}
