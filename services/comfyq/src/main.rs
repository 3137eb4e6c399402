//! `comfyq`: the whole stack in one process tree ([`comfyq::up`]) and a
//! client of a running API ([`comfyq::cli`]: `submit`, `jobs`, `job`,
//! `watch`, …).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use comfyq::{cli, nats_auth, up};

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
    /// Write a nats-server account with one least-privilege user per service
    /// (and per tenant subscriber), their nkey seeds and settings.
    NatsConfig(nats_auth::NatsConfigArgs),
    /// Create or update every stream, bucket and consumer, as the admin
    /// identity (services with `nats.provision = false` only check them).
    Provision(nats_auth::ProvisionArgs),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Up(args) => args,
        Command::NatsConfig(args) => return nats_config(&args),
        Command::Provision(args) => {
            comfyq_shared::telemetry::init_tracing("warn");
            return match nats_auth::provision(&args).await {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("comfyq provision: {error:#}");
                    ExitCode::FAILURE
                }
            };
        }
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

fn nats_config(args: &nats_auth::NatsConfigArgs) -> ExitCode {
    match nats_auth::write_nats_config(args) {
        Ok(written) => {
            println!("wrote {}", written.auth_conf.display());
            for (identity, seed) in &written.identities {
                println!(
                    "  {:<20} seed {} (inbox prefix {})",
                    identity.user(),
                    seed.display(),
                    identity.inbox_prefix()
                );
            }
            println!(
                "include auth.conf in the nats-server config, run `comfyq provision` with \
                 admin.env, then each service with its <service>.env"
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("comfyq nats-config: {error:#}");
            ExitCode::from(2)
        }
    }
}
