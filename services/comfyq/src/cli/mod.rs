//! The client subcommands of `comfyq`: everything goes through the public REST
//! API (`/v1/…`), exactly as any other client would use it.
//!
//! - [`client`]: the HTTP client (base URL, API key) and what its answers mean.
//! - [`error`]: [`CliError`], problem documents rendered for a person, and
//!   the exit codes.
//! - [`events`]: a job's Server-Sent Events, resumed with `Last-Event-ID`
//!   when the connection drops.
//! - [`submit`]: building the job body (API-format workflow or full job,
//!   `--input` files as multipart), and `--wait` with its progress bar.
//! - [`progress`]: the progress bar on a terminal, plain lines elsewhere.
//! - [`download`]: outputs saved to a directory, checked against their SHA-256.
//! - [`render`]: tables and the job's details for a person.
//! - [`commands`]: the read and operate commands (`jobs`, `job`, `watch`, …).

mod client;
mod commands;
mod download;
mod error;
mod events;
mod progress;
mod render;
mod submit;

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::{Args, Parser, Subcommand};

pub use error::ExitStatus;

/// `--help` text on exit codes (shown by `comfyq --help`).
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (submit --wait and watch: the job completed)
  1  the job failed or was cancelled
  2  bad usage or a local problem (arguments, workflow file, --input, --out)
  3  the API refused the request (invalid job, API key, conflict, limits)
  4  not found (no such job for this API key)
  5  the server is unreachable or failed (connection, 5xx, unexpected answer)
  130  interrupted (Ctrl-C) while following a job, which goes on";

/// Where the API is and how to talk to it; global, so they go before or after
/// the subcommand.
#[derive(Debug, Clone, Args)]
pub struct ClientOptions {
    /// Base URL of the comfyq API.
    #[arg(
        long,
        global = true,
        env = "COMFYQ_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// API key sent as `Authorization: Bearer` (with `up`: the key the API
    /// started there requires).
    #[arg(long, global = true, env = "COMFYQ_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the API's JSON on stdout instead of text for a person.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The subcommands that are clients of a running API.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Submit a workflow (ComfyUI API format, or a full `{"workflow": …}` job body).
    ///
    /// Prints the job's id (for scripts: `JOB=$(comfyq submit w.json)`), or with
    /// --wait follows it to the end and prints how it ended and the files saved.
    Submit(SubmitArgs),
    /// List jobs, newest first.
    Jobs(JobsArgs),
    /// Show one job: status, progress, inputs, outputs, error.
    Job(JobArg),
    /// Follow a job's events live until it ends (resumable with --after).
    Watch(WatchArgs),
    /// Cancel a job: a queued one never runs, a running one is interrupted.
    Cancel(JobArg),
    /// Requeue a dead-lettered job with a fresh attempt budget.
    Retry(JobArg),
    /// Download a job's outputs.
    Outputs(OutputsArgs),
    /// Queue depth, jobs in flight and oldest wait per pool and priority.
    Queue,
    /// Registered runners: slots, busy, ready, node types, models, last seen.
    Runners,
    /// Jobs whose attempts ran out (requeue one with `comfyq retry ID`).
    DeadLetters(DeadLettersArgs),
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// A JSON file: an API-format workflow (node id → {class_type, inputs}), or
    /// a job body with `workflow` and any other field of `POST /v1/jobs`.
    pub workflow: PathBuf,
    /// A file the workflow names (e.g. a LoadImage `image`): NAME=PATH uploads
    /// a local file, NAME=URL lets the server fetch it. Repeatable.
    #[arg(long = "input", value_name = "NAME=PATH|URL")]
    pub inputs: Vec<String>,
    /// Overrides the job's priority.
    #[arg(long, value_parser = ["high", "normal", "low"])]
    pub priority: Option<String>,
    /// Overrides the runner pool.
    #[arg(long)]
    pub pool: Option<String>,
    /// POST the job's terminal event to this URL (signed webhooks).
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// Follow the job until it ends, with a progress bar; exit 0 only if it completed.
    #[arg(long)]
    pub wait: bool,
    /// Save the outputs here once completed (implies --wait).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Only these states, comma separated (accepted, queued, dispatched,
    /// running, retrying, completed, failed, cancelled).
    #[arg(long)]
    pub status: Option<String>,
    /// Jobs per page (1 to 200).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// The next page: the cursor the previous page printed.
    #[arg(long)]
    pub cursor: Option<String>,
}

#[derive(Debug, Args)]
pub struct JobArg {
    /// The job's id.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The job's id.
    pub id: String,
    /// Resume after this event id (the first column of each line).
    #[arg(long, value_name = "EVENT_ID")]
    pub after: Option<u64>,
}

#[derive(Debug, Args)]
pub struct OutputsArgs {
    /// The job's id.
    pub id: String,
    /// Where to save them.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    /// Dead letters per page (1 to 200).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// The next page: the cursor the previous page printed.
    #[arg(long)]
    pub cursor: Option<String>,
}

/// The client commands alone, as the tests parse them (the binary adds `up`).
#[derive(Debug, Parser)]
#[command(name = "comfyq", after_help = EXIT_CODES_HELP)]
pub struct ClientCli {
    #[command(flatten)]
    pub options: ClientOptions,
    #[command(subcommand)]
    pub command: ClientCommand,
}

/// Where a command writes: stdout for results, stderr for progress and errors.
pub struct Console {
    out: Box<dyn Write + Send>,
    err: Box<dyn Write + Send>,
    /// Draw progress bars (stderr is a terminal); plain lines otherwise.
    bars: bool,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").field("bars", &self.bars).finish()
    }
}

impl Console {
    /// The process's stdout and stderr.
    pub fn terminal() -> Self {
        Self {
            out: Box::new(std::io::stdout()),
            err: Box::new(std::io::stderr()),
            bars: std::io::stderr().is_terminal(),
        }
    }

    /// Writes into memory, for tests: returns the console and what it captured.
    pub fn captured() -> (Self, Captured) {
        let captured = Captured::default();
        let console = Self {
            out: Box::new(SharedBuffer(captured.out.clone())),
            err: Box::new(SharedBuffer(captured.err.clone())),
            bars: false,
        };
        (console, captured)
    }
}

/// What a [`Console::captured`] received.
#[derive(Debug, Default, Clone)]
pub struct Captured {
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
}

impl Captured {
    pub fn stdout(&self) -> String {
        Self::text(&self.out)
    }

    pub fn stderr(&self) -> String {
        Self::text(&self.err)
    }

    fn text(buffer: &Mutex<Vec<u8>>) -> String {
        buffer
            .lock()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut bytes) => {
                bytes.extend_from_slice(buf);
                Ok(buf.len())
            }
            Err(_) => Err(std::io::Error::other("capture buffer poisoned")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs one client command; errors are rendered on the console's stderr.
pub async fn run(
    options: &ClientOptions,
    command: ClientCommand,
    console: &mut Console,
) -> ExitStatus {
    let result = match client::Api::new(options) {
        Ok(api) => commands::dispatch(&api, options.json, command, console).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(status) => status,
        Err(error) => {
            // Nothing more useful to do if stderr itself is gone.
            let _ = writeln!(console.err, "{}", error.render());
            error.exit_status()
        }
    }
}

/// Parses `args` (starting with the program name) and runs the command, as
/// the binary does for its client subcommands.
pub async fn run_args<I, T>(args: I, console: &mut Console) -> ExitStatus
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match ClientCli::try_parse_from(args) {
        Ok(cli) => run(&cli.options, cli.command, console).await,
        Err(error) if error.use_stderr() => {
            let _ = write!(console.err, "{}", error.render());
            ExitStatus::Usage
        }
        Err(help) => {
            // --help, --version
            let _ = write!(console.out, "{}", help.render());
            ExitStatus::Success
        }
    }
}
