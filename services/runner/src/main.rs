//! `comfyq-runner`: load configuration, run until SIGINT/SIGTERM; or
//! `comfyq-runner verify` to check ComfyUI against a workflow.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "comfyq-runner",
    version,
    about = "comfyq GPU runner: drives one ComfyUI"
)]
struct Args {
    /// TOML configuration file (environment variables COMFYQ_* override it).
    #[arg(long, short, env = "COMFYQ_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// The ComfyUI to drive (overrides `comfyui_url`).
    #[arg(long, global = true)]
    comfyui_url: Option<String>,
    /// Prompts staged in ComfyUI at once (overrides `slots`).
    #[arg(long)]
    slots: Option<usize>,
    /// Runner pool (overrides `pool`).
    #[arg(long)]
    pool: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that ComfyUI answers, list its node types and models, and
    /// check a workflow's node types and model files. Exits 1 on a gap,
    /// 3 if ComfyUI cannot be reached or the workflow cannot be read.
    /// It does not launch a managed ComfyUI: start it first.
    Verify {
        /// An API-format workflow (or a comfyq job body) to check.
        #[arg(long)]
        workflow: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Verify { workflow }) = &args.command {
        return verify(&args, workflow.as_deref()).await;
    }
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

async fn verify(args: &Args, workflow: Option<&std::path::Path>) -> ExitCode {
    const UNUSABLE: u8 = 3;
    let config =
        match comfyq_shared::config::load::<comfyq_runner::RunnerConfig>(args.config.as_deref()) {
            Ok(config) => config,
            Err(error) => {
                eprintln!("comfyq-runner verify: {error}");
                return ExitCode::from(comfyq_shared::service::EXIT_BAD_CONFIG);
            }
        };
    let url = args.comfyui_url.clone().unwrap_or(config.comfyui_url);
    let client = match url::Url::parse(&url)
        .map_err(|e| e.to_string())
        .and_then(|url| {
            comfyq_runner::comfy::ComfyClient::new(url, Default::default())
                .map_err(|e| e.to_string())
        }) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("comfyq-runner verify: ComfyUI URL {url:?}: {error}");
            return ExitCode::from(comfyq_shared::service::EXIT_BAD_CONFIG);
        }
    };
    let workflow = match workflow {
        None => None,
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
        {
            Ok(workflow) => Some(workflow),
            Err(error) => {
                eprintln!("comfyq-runner verify: {}: {error}", path.display());
                return ExitCode::from(UNUSABLE);
            }
        },
    };
    match comfyq_runner::verify::verify(&client, workflow.as_ref()).await {
        Ok(report) => {
            print!("{report}");
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("comfyq-runner verify: {error}");
            ExitCode::from(UNUSABLE)
        }
    }
}
