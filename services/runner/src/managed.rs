//! Managed mode: the runner launches ComfyUI itself, waits until it answers,
//! copies its output into the runner's log line by line, restarts it when it
//! dies and stops it on shutdown. Attached mode has the same [`ComfyHealth`]
//! handle, which then never changes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::comfy::ComfyClient;

/// How to launch ComfyUI (e.g. `command = "python"`, `args = ["main.py",
/// "--port", "8188", "--use-sage-attention"]`, `working_dir = "/opt/ComfyUI"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagedConfig {
    /// The program (a path, or a name looked up on `PATH`).
    pub command: PathBuf,
    pub args: Vec<String>,
    /// Where it runs; also ComfyUI's directory for clean-up unless
    /// `comfyui_dir` says otherwise.
    pub working_dir: Option<PathBuf>,
    /// Extra environment variables (the runner's own are inherited).
    pub env: BTreeMap<String, String>,
    /// Launches tried before giving up at start (each waits `ready_timeout`).
    pub start_attempts: u32,
    /// How long one launch may take to answer `/system_stats`.
    #[serde(with = "humantime_serde")]
    pub ready_timeout: Duration,
    /// Pause after a failed launch; doubles per failure, up to 30 s.
    #[serde(with = "humantime_serde")]
    pub restart_backoff: Duration,
    /// After SIGTERM, how long ComfyUI may take to exit before SIGKILL.
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
}

impl Default for ManagedConfig {
    fn default() -> Self {
        Self {
            command: PathBuf::from("python"),
            args: vec!["main.py".to_owned()],
            working_dir: None,
            env: BTreeMap::new(),
            start_attempts: 3,
            ready_timeout: Duration::from_secs(120),
            restart_backoff: Duration::from_secs(2),
            stop_timeout: Duration::from_secs(10),
        }
    }
}

/// Whether ComfyUI can take work. `generation` grows each time a managed
/// ComfyUI dies, so a prompt submitted before can tell it is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ComfyState {
    pub generation: u64,
    pub ready: bool,
    /// The managed process, while it runs.
    pub pid: Option<u32>,
}

/// A cheap handle on [`ComfyState`].
#[derive(Clone, Debug)]
pub struct ComfyHealth {
    receiver: watch::Receiver<ComfyState>,
    /// Attached mode keeps its sender here, so waits never see it gone.
    _sender: Option<Arc<watch::Sender<ComfyState>>>,
}

impl ComfyHealth {
    /// An attached ComfyUI: always ready, never restarted by us.
    pub fn attached() -> Self {
        let (sender, receiver) = watch::channel(ComfyState {
            generation: 0,
            ready: true,
            pid: None,
        });
        Self {
            receiver,
            _sender: Some(Arc::new(sender)),
        }
    }

    pub fn state(&self) -> ComfyState {
        *self.receiver.borrow()
    }

    /// Waits until ComfyUI is ready (returns at once if it is).
    pub async fn ready(&self) {
        let mut receiver = self.receiver.clone();
        let _ = receiver.wait_for(|state| state.ready).await;
    }

    /// Resolves at the next change of state (never, attached).
    pub async fn changed(&mut self) {
        if self.receiver.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once the ComfyUI of `generation` is gone (never, attached).
    pub async fn lost(&self, generation: u64) {
        let mut receiver = self.receiver.clone();
        if receiver
            .wait_for(|state| state.generation != generation || !state.ready)
            .await
            .is_err()
        {
            std::future::pending::<()>().await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManagedError {
    #[error("ComfyUI did not start after {attempts} attempts: {last_error}")]
    StartFailed { attempts: u32, last_error: String },
}

/// The supervisor of a managed ComfyUI.
#[derive(Debug)]
pub struct ManagedComfy {
    health: ComfyHealth,
    task: tokio::task::JoinHandle<()>,
}

impl ManagedComfy {
    /// Launches ComfyUI and waits until it is ready (`start_attempts`
    /// launches at most), then supervises it until `stop`: a process that
    /// dies is launched again, with backoff, for as long as it takes.
    pub async fn start(
        config: ManagedConfig,
        comfy: ComfyClient,
        stop: CancellationToken,
    ) -> Result<Self, ManagedError> {
        let (sender, receiver) = watch::channel(ComfyState {
            generation: 0,
            ready: false,
            pid: None,
        });
        let attempts = config.start_attempts.max(1);
        let mut backoff = config.restart_backoff;
        let mut attempt = 0;
        let child = loop {
            attempt += 1;
            match launch(&config, &comfy, &stop).await {
                Ok(child) => break child,
                Err(error) if attempt >= attempts || stop.is_cancelled() => {
                    return Err(ManagedError::StartFailed {
                        attempts: attempt,
                        last_error: error,
                    });
                }
                Err(error) => {
                    tracing::warn!(attempt, %error, "ComfyUI did not start; trying again");
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        };
        sender.send_replace(ComfyState {
            generation: 0,
            ready: true,
            pid: child.id(),
        });
        let task = tokio::spawn(supervise(config, comfy, child, sender, stop));
        Ok(Self {
            health: ComfyHealth {
                receiver,
                _sender: None,
            },
            task,
        })
    }

    pub fn health(&self) -> ComfyHealth {
        self.health.clone()
    }

    /// Waits for the supervisor to have stopped ComfyUI (after `stop`).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

async fn supervise(
    config: ManagedConfig,
    comfy: ComfyClient,
    mut child: Child,
    state: watch::Sender<ComfyState>,
    stop: CancellationToken,
) {
    let mut generation = 0;
    loop {
        let pid = child.id();
        tokio::select! {
            _ = stop.cancelled() => {
                terminate(&mut child, pid, config.stop_timeout).await;
                state.send_replace(ComfyState { generation, ready: false, pid: None });
                return;
            }
            status = child.wait() => {
                generation += 1;
                state.send_replace(ComfyState { generation, ready: false, pid: None });
                metrics::counter!("comfyq_runner_comfyui_restarts_total").increment(1);
                tracing::error!(?status, "ComfyUI exited; starting it again");
            }
        }
        // Its process group may hold children of its own (custom nodes).
        terminate(&mut child, pid, Duration::ZERO).await;
        let mut backoff = config.restart_backoff;
        child = loop {
            match launch(&config, &comfy, &stop).await {
                Ok(child) => break child,
                Err(_) if stop.is_cancelled() => return,
                Err(error) => {
                    tracing::error!(%error, "ComfyUI did not come back; trying again");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        };
        tracing::info!(generation, "ComfyUI is back");
        state.send_replace(ComfyState {
            generation,
            ready: true,
            pid: child.id(),
        });
    }
}

/// Starts the process and waits for `/system_stats` to answer.
async fn launch(
    config: &ManagedConfig,
    comfy: &ComfyClient,
    stop: &CancellationToken,
) -> Result<Child, String> {
    let mut command = Command::new(&config.command);
    command
        .args(&config.args)
        .envs(&config.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: a terminal's Ctrl-C reaches the runner, which then
        // stops ComfyUI in order; and the whole group can be signalled.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &config.working_dir {
        command.current_dir(dir);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", config.command.display()))?;
    let pid = child.id();
    tracing::info!(?pid, command = %config.command.display(), args = ?config.args, "ComfyUI launched");
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(forward_lines(stdout, "stdout"));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(forward_lines(stderr, "stderr"));
    }

    let deadline = tokio::time::Instant::now() + config.ready_timeout;
    let mut delay = Duration::from_millis(100);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            terminate(&mut child, pid, Duration::ZERO).await;
            return Err(format!("ComfyUI exited during start-up ({status})"));
        }
        let last_error = match comfy.system_stats().await {
            Ok(_) => return Ok(child),
            Err(error) => error.to_string(),
        };
        if tokio::time::Instant::now() + delay > deadline || stop.is_cancelled() {
            terminate(&mut child, pid, Duration::ZERO).await;
            return Err(format!(
                "not ready within {:?}: {last_error}",
                config.ready_timeout
            ));
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// One tracing event per line ComfyUI prints.
async fn forward_lines(stream: impl AsyncRead + Unpin, name: &'static str) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "comfyui", stream = name, "{line}");
    }
}

/// SIGTERM to the process group of `pid` (the child's id, kept because
/// it is gone once the child is reaped), then SIGKILL after `grace`.
async fn terminate(child: &mut Child, pid: Option<u32>, grace: Duration) {
    if let Some(pid) = pid {
        if !grace.is_zero() {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{pid}")])
                .status()
                .await;
            if tokio::time::timeout(grace, child.wait()).await.is_ok() {
                return;
            }
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status()
            .await;
    }
    let _ = child.kill().await;
    let _ = child.wait().await;
}
