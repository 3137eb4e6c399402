//! `comfyq-ingress`: configuration in, bind, serve until SIGINT/SIGTERM.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use comfyq_ingress::IngressConfig;

#[derive(Debug, Parser)]
#[command(name = "comfyq-ingress", version, about = "comfyq REST API")]
struct Args {
    /// TOML configuration file (environment variables COMFYQ_* override it).
    #[arg(long, short, env = "COMFYQ_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (overrides `http_addr`).
    #[arg(long)]
    http_addr: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    comfyq_shared::service::main(
        "comfyq-ingress",
        args.config.as_deref(),
        |config: &mut IngressConfig| {
            if let Some(addr) = args.http_addr {
                config.http_addr = addr;
            }
        },
        |config: IngressConfig, shutdown| async move {
            let listener = tokio::net::TcpListener::bind(&config.http_addr).await?;
            comfyq_ingress::serve(config, listener, shutdown).await
        },
    )
    .await
}
