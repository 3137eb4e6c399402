//! `comfyq-loadtest`: load scenarios against comfyq, each next to the raw
//! JetStream, object store or direct-ComfyUI baseline measured in the same run.
//! See `loadtest/README.md`.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod analysis;
mod baseline;
mod chaos;
mod driver;
mod hist;
mod procstat;
mod report;
mod scenarios;
mod target;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "comfyq-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    #[command(flatten)]
    options: Options,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub(crate) enum Scenario {
    /// Fixed rate (default 100 jobs/s) of zero-work jobs: submit, dispatch, end to end
    /// (NATS, SSE, outputs in hand), webhooks; raw JetStream and `direct` baselines.
    Latency,
    /// As fast as it goes for the duration (default 60 s); nothing may be lost;
    /// raw pipelined JetStream baseline.
    Throughput,
    /// Dispatch latency with 10 runners, then with `--runners` (default 1,000) × 5 slots.
    Fleet,
    /// 64 MiB inputs and outputs; raw object store baseline; RSS growth.
    Media,
    /// Progress events to 100 SSE clients and 100 NATS subscribers.
    Fanout,
    /// A saturated pool: queue waits of high, normal and low jobs.
    Priority,
    /// A fixed rate for a long time (default 30 min): latency and RSS per interval.
    Soak,
    /// Only the baselines: raw JetStream latency and throughput, object store.
    Baseline,
    /// The fault suite's load (50 jobs/s) on services run as separate
    /// processes while random ones are killed with `kill -9` (and/or NATS
    /// nodes killed or frozen, `--faults`) for the duration (default 60 s);
    /// nothing may be lost or run twice.
    Chaos,
}

/// Options shared by the scenarios; each scenario has its own defaults for
/// those not given.
#[derive(Debug, Clone, Args)]
pub(crate) struct Options {
    /// Drive a running comfyq at this base URL instead of starting one in-process.
    #[arg(long, global = true)]
    pub(crate) url: Option<String>,
    /// NATS of the running comfyq (completions on NATS, baselines).
    #[arg(long, global = true)]
    pub(crate) nats_url: Option<String>,
    /// API key for `--url`.
    #[arg(long, global = true, env = "COMFYQ_API_KEY", default_value = "")]
    pub(crate) api_key: String,
    /// Subject prefix of the running comfyq.
    #[arg(long, global = true, default_value = "comfyq")]
    pub(crate) prefix: String,
    /// ComfyUI for the `direct` baseline with `--url`.
    #[arg(long, global = true)]
    pub(crate) comfyui_url: Option<String>,
    /// nats-server binary for the in-process stack (else `NATS_SERVER_BIN`,
    /// `.tools/nats/bin/nats-server`, `PATH`).
    #[arg(long, global = true)]
    pub(crate) nats_server: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Jobs per second; 0 = as fast as possible.
    #[arg(long, global = true)]
    pub(crate) rate: Option<f64>,
    /// How long to submit (e.g. `10s`, `30m`).
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Stop after this many jobs.
    #[arg(long, global = true)]
    pub(crate) jobs: Option<u64>,
    /// Requests in flight at most.
    #[arg(long, global = true)]
    pub(crate) concurrency: Option<usize>,
    /// Runners (in-process).
    #[arg(long, global = true)]
    pub(crate) runners: Option<usize>,
    /// Slots per runner.
    #[arg(long, global = true)]
    pub(crate) slots: Option<usize>,
    /// Simulated ComfyUI instances (runners spread over them).
    #[arg(long, global = true)]
    pub(crate) sims: Option<usize>,
    /// Priority mix, `name=weight,…`.
    #[arg(long, global = true)]
    pub(crate) priorities: Option<String>,
    /// Tenants to spread jobs over (in-process: up to 8).
    #[arg(long, global = true)]
    pub(crate) tenants: Option<usize>,
    /// Extra workflow JSON bytes per job.
    #[arg(long, global = true, default_value_t = 0)]
    pub(crate) workflow_bytes: usize,
    /// Input file bytes per job (multipart upload).
    #[arg(long, global = true)]
    pub(crate) input_bytes: Option<usize>,
    /// Output file bytes per job (the simulator pads its outputs).
    #[arg(long, global = true)]
    pub(crate) output_bytes: Option<u64>,
    /// Soak: report every this long.
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    pub(crate) interval: Option<Duration>,
    /// Keep the simulators' files in the system's temp dir (disk) instead of
    /// `/dev/shm` (tmpfs).
    #[arg(long, global = true)]
    pub(crate) sim_disk: bool,
    /// `latency`: first queue this many jobs in pool `backlog`, which has no
    /// runners, so the scheduler holds them (its view, every pass and sweep)
    /// while the measured jobs are dispatched.
    #[arg(long, global = true, default_value_t = 0)]
    pub(crate) backlog: usize,
    /// Skip the baselines.
    #[arg(long, global = true)]
    pub(crate) no_baseline: bool,
    /// Run NATS as a local cluster of this many nodes (three nats-server
    /// processes on free ports, every stream replicated on each); with
    /// `--url`, the replicas of the remote stack (for the baselines' streams).
    #[arg(long, global = true, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub(crate) cluster: Option<u8>,
    /// `chaos`: what to break, `services` (kill -9 a service process),
    /// `nats` (kill or freeze a NATS node; with `--cluster 3`), or both.
    #[arg(long, global = true, default_value = "services")]
    pub(crate) faults: String,
    /// `chaos`: the mean pause between faults (default 3 s).
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    pub(crate) every: Option<Duration>,
    /// `chaos`: the seed of the fault choices (random unless given).
    #[arg(long, global = true)]
    pub(crate) seed: Option<u64>,
    /// `chaos`: the services' `nats.dispatch_ack_wait` (default: the
    /// production default, 30 s; the suite's short form uses 3 s). A runner
    /// cut off from NATS longer than this has its job redelivered, which
    /// spends one of its deliveries.
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    pub(crate) dispatch_ack_wait: Option<Duration>,
}

impl Options {
    /// Replicas of every stream: the cluster's size.
    pub(crate) fn replicas(&self) -> usize {
        self.cluster.map_or(1, usize::from)
    }
}

fn main() -> std::process::ExitCode {
    // `chaos` starts its services as processes of this executable.
    if let Some(code) = comfyq_tests::service_process::run_if_asked() {
        std::process::exit(code);
    }
    let cli = Cli::parse();
    // Logs go to stderr: stdout is the report (`--json` is parsed by tools).
    let _already_installed = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    if let Some(path) = &cli.options.nats_server
        && let Err(error) = comfyq_tests::nats_server::use_nats_server_binary(path)
    {
        eprintln!("comfyq-loadtest: {error}");
        return std::process::ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("comfyq-loadtest: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // On Ctrl-C or SIGTERM the scenario is dropped, which stops the stack and
    // kills the nats-server child instead of orphaning it.
    let result = runtime.block_on(async {
        tokio::select! {
            result = scenarios::run(cli.scenario, &cli.options) => result,
            () = interrupted() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    match result {
        Ok(reports) => {
            if cli.options.json {
                match serde_json::to_string_pretty(&reports) {
                    Ok(json) => println!("{json}"),
                    Err(error) => {
                        eprintln!("comfyq-loadtest: {error}");
                        return std::process::ExitCode::FAILURE;
                    }
                }
            } else {
                for report in &reports {
                    report.print();
                }
            }
            if reports.iter().any(|report| !report.broken.is_empty()) {
                return std::process::ExitCode::FAILURE;
            }
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("comfyq-loadtest: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn interrupted() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
