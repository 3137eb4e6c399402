//! `comfyq-ingress`: load configuration, bind, serve until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "comfyq-ingress", version, about = "comfyq REST API")]
struct Args {
    /// TOML configuration file (environment variables COMFYQ_* override it).
    #[arg(long, short, env = "COMFYQ_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    comfyq_shared::telemetry::init_tracing("info");
    let args = Args::parse();
    let config = match comfyq_shared::config::load::<comfyq_ingress::IngressConfig>(
        args.config.as_deref(),
    ) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("comfyq-ingress: {error}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(&config.http_addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "comfyq-ingress: cannot listen on {}: {error}",
                config.http_addr
            );
            return ExitCode::FAILURE;
        }
    };
    let shutdown = comfyq_shared::shutdown::on_signal();
    match comfyq_ingress::serve(config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("comfyq-ingress: {error}");
            ExitCode::FAILURE
        }
    }
}
