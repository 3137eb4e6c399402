//! `comfyq`: the whole stack in one process tree ([`comfyq::up`]) and a
//! client of a running API ([`comfyq::cli`]: `submit`, `jobs`, `job`,
//! `watch`, …).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use comfyq::{cli, up};

#[derive(Debug, Parser)]
#[command(
    name = "comfyq",
    version,
    about = "ComfyUI workflows as a production job API on NATS JetStream",
    after_help = cli::EXIT_CODES_HELP
)]
struct Cli {
    #[command(flatten)]
    client: cli::ClientOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run nats-server and all comfyq services in one process tree.
    Up(up::UpArgs),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Up(args) => args,
        Command::Client(command) => {
            let mut console = cli::Console::terminal();
            return ExitCode::from(cli::run(&cli.client, command, &mut console).await.code());
        }
    };
    comfyq_shared::telemetry::init_tracing("info");
    let shutdown = comfyq_shared::shutdown::on_signal();
    // `--api-key` (COMFYQ_API_KEY) is global: for `up` it is the key the API requires.
    match up::run(args, cli.client.api_key, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("comfyq: {error:#}");
            ExitCode::FAILURE
        }
    }
}
