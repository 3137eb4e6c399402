//! `comfyq-runner`: load configuration, run until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "comfyq-runner",
    version,
    about = "comfyq GPU runner: drives one ComfyUI"
)]
struct Args {
    /// TOML configuration file (environment variables COMFYQ_* override it).
    #[arg(long, short, env = "COMFYQ_CONFIG")]
    config: Option<PathBuf>,
    /// The ComfyUI to drive (overrides `comfyui_url`).
    #[arg(long)]
    comfyui_url: Option<String>,
    /// Prompts staged in ComfyUI at once (overrides `slots`).
    #[arg(long)]
    slots: Option<usize>,
    /// Runner pool (overrides `pool`).
    #[arg(long)]
    pool: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    comfyq_shared::telemetry::init_tracing("info");
    let args = Args::parse();
    let mut config =
        match comfyq_shared::config::load::<comfyq_runner::RunnerConfig>(args.config.as_deref()) {
            Ok(config) => config,
            Err(error) => {
                eprintln!("comfyq-runner: {error}");
                return ExitCode::from(2);
            }
        };
    if let Some(url) = args.comfyui_url {
        config.comfyui_url = url;
    }
    if let Some(slots) = args.slots {
        config.slots = slots;
    }
    if let Some(pool) = args.pool {
        config.pool = pool;
    }
    if let Err(error) = comfyq_shared::config::Validate::validate(&config) {
        eprintln!("comfyq-runner: {error}");
        return ExitCode::from(2);
    }
    let shutdown = comfyq_shared::shutdown::on_signal();
    match comfyq_runner::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("comfyq-runner: {error}");
            ExitCode::FAILURE
        }
    }
}
