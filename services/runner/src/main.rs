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
    let args = Args::parse();
    comfyq_shared::service::main(
        "comfyq-runner",
        args.config.as_deref(),
        |config: &mut comfyq_runner::RunnerConfig| {
            if let Some(url) = args.comfyui_url {
                config.comfyui_url = url;
            }
            if let Some(slots) = args.slots {
                config.slots = slots;
            }
            if let Some(pool) = args.pool {
                config.pool = pool;
            }
        },
        comfyq_runner::run,
    )
    .await
}
