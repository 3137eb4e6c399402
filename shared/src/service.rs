//! What every service binary does around its library's `run`: tracing,
//! configuration (file + `COMFYQ_` environment, validated), a shutdown token
//! tied to SIGINT/SIGTERM, and an exit code that tells how it ended.

use std::path::Path;
use std::process::ExitCode;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Validate};

/// Exit code for a configuration the service refused (before anything ran).
pub const EXIT_BAD_CONFIG: u8 = 2;

/// Loads `C`, lets `adjust` apply command-line overrides, validates, then
/// runs `run` until a signal. `name` prefixes every message on stderr.
pub async fn main<C, E, Fut>(
    name: &str,
    config_file: Option<&Path>,
    adjust: impl FnOnce(&mut C),
    run: impl FnOnce(C, CancellationToken) -> Fut,
) -> ExitCode
where
    C: DeserializeOwned + Serialize + Default + Validate,
    E: std::fmt::Display,
    Fut: Future<Output = Result<(), E>>,
{
    crate::telemetry::init_tracing("info");
    let mut config = match config::load::<C>(config_file) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{name}: {error}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    adjust(&mut config);
    if let Err(error) = config.validate() {
        eprintln!("{name}: {error}");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let shutdown = crate::shutdown::on_signal();
    match run(config, shutdown).await {
        Ok(()) => {
            tracing::info!("{name} exited cleanly");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "{name} failed");
            eprintln!("{name}: {error}");
            ExitCode::FAILURE
        }
    }
}
