//! `comfyq-notifier`: configuration in, run until SIGINT/SIGTERM.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let args = Args::parse();
    comfyq_shared::service::main(
        "comfyq-notifier",
        args.config.as_deref(),
        |_: &mut comfyq_notifier::NotifierConfig| {},
        comfyq_notifier::run,
    )
    .await
}
