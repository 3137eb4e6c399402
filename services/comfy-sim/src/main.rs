//! `comfy-sim`: serve a simulated ComfyUI 0.3.64.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use comfy_sim::{PreviewFormat, SimConfig, Simulator};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use tokio_util::sync::CancellationToken;

/// Serve a ComfyUI 0.3.64 protocol simulator.
#[derive(Debug, Parser)]
#[command(name = "comfy-sim", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8188")]
    listen: SocketAddr,
    /// TOML file with SimConfig knobs; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    step_delay_ms: Option<u64>,
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    node_delay_ms: Option<u64>,
    #[arg(long)]
    previews: Option<bool>,
    #[arg(long, value_enum)]
    preview_format: Option<PreviewFormat>,
    #[arg(long)]
    startup_delay_ms: Option<u64>,
    #[arg(long)]
    output_bytes: Option<u64>,
    #[arg(long)]
    slow_view_ms: Option<u64>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn load(args: &Args) -> anyhow::Result<SimConfig> {
    let mut fig = Figment::from(Serialized::defaults(SimConfig::default()));
    if let Some(path) = &args.config {
        fig = fig.merge(Toml::file_exact(path));
    }
    let mut c: SimConfig = fig.extract().context("invalid comfy-sim configuration")?;
    if let Some(v) = args.step_delay_ms {
        c.step_delay_ms = v;
    }
    if args.steps.is_some() {
        c.steps = args.steps;
    }
    if let Some(v) = args.node_delay_ms {
        c.node_delay_ms = v;
    }
    if let Some(v) = args.previews {
        c.previews = v;
    }
    if let Some(v) = args.preview_format {
        c.preview_format = v;
    }
    if let Some(v) = args.startup_delay_ms {
        c.startup_delay_ms = v;
    }
    if let Some(v) = args.output_bytes {
        c.output_bytes = v;
    }
    if let Some(v) = args.slow_view_ms {
        c.slow_view_ms = v;
    }
    if args.data_dir.is_some() {
        c.data_dir.clone_from(&args.data_dir);
    }
    Ok(c)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = load(&args)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        stop.cancel();
    });
    let result = Simulator::serve(listener, config, shutdown).await;
    match &result {
        Ok(()) => tracing::info!("comfy-sim stopped"),
        Err(e) => tracing::error!(error = %e, "comfy-sim failed"),
    }
    result
}
