//! comfyq services as OS processes of their own, each under a small
//! supervisor that restarts it when it dies, as systemd or Kubernetes would.
//!
//! A child is an executable that calls [`run_if_asked`] first thing (the
//! test binary through an ignored test, `comfyq-loadtest` in its `main`):
//! it finds its service and configuration in [`CONFIG_ENV`], runs that
//! service's library exactly as the service's own binary does (its `run`
//! or `serve`, stopped by SIGINT/SIGTERM), and dies with its parent
//! (`PR_SET_PDEATHSIG`), so a killed test leaves no service behind. Re-running
//! this process's own executable rather than `comfyq-ingress` & co. means the
//! children are always built from the code under test, whatever `cargo`
//! was asked to build.
//!
//! [`ServiceProcess::kill`] is `kill -9`: nothing is flushed, released or
//! handed back; the supervisor starts the service again after
//! [`ServiceProcess::restart_delay`].

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comfyq_ingress::IngressConfig;
use comfyq_notifier::NotifierConfig;
use comfyq_runner::RunnerConfig;
use comfyq_scheduler::SchedulerConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The child's configuration file (JSON [`ServiceConfig`]). Not `COMFYQ_`:
/// that prefix is the services' own settings.
pub const CONFIG_ENV: &str = "SERVICE_PROCESS_CONFIG";

/// The parent's pid, so a child whose parent died before it armed its
/// parent-death signal exits at once.
const PARENT_ENV: &str = "SERVICE_PROCESS_PARENT";

/// How long a stopping child may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// One service and its whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "service", content = "config")]
pub enum ServiceConfig {
    /// Listens on its `http_addr`.
    Ingress(Box<IngressConfig>),
    Scheduler(Box<SchedulerConfig>),
    Runner(Box<RunnerConfig>),
    Notifier(Box<NotifierConfig>),
}

impl ServiceConfig {
    /// `ingress`, `scheduler`, `runner` or `notifier`.
    pub fn service(&self) -> &'static str {
        match self {
            ServiceConfig::Ingress(_) => "ingress",
            ServiceConfig::Scheduler(_) => "scheduler",
            ServiceConfig::Runner(_) => "runner",
            ServiceConfig::Notifier(_) => "notifier",
        }
    }
}

/// How to start a child: an executable that calls [`run_if_asked`], and its
/// arguments.
#[derive(Debug, Clone)]
pub struct ProcessLauncher {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl ProcessLauncher {
    /// This process's own executable with `args` (for a test binary, the
    /// arguments that select the test calling [`run_if_asked`]).
    ///
    /// # Panics
    ///
    /// If the executable's path is unknown.
    pub fn this_executable(args: &[&str]) -> Self {
        Self {
            program: std::env::current_exe()
                .unwrap_or_else(|e| panic!("this executable's path: {e}")),
            args: args.iter().map(|&a| a.to_owned()).collect(),
        }
    }
}

/// In a child (with [`CONFIG_ENV`] set): runs its service until a signal
/// and returns the exit code. `None` in any other process.
pub fn run_if_asked() -> Option<i32> {
    let path = std::env::var_os(CONFIG_ENV)?;
    Some(run_child(Path::new(&path)))
}

fn run_child(path: &Path) -> i32 {
    if let Err(error) = die_with_parent() {
        eprintln!("service process: {error}");
        return 1;
    }
    comfyq_shared::telemetry::init_tracing("warn");
    let config: ServiceConfig = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(config) => config,
        Err(error) => {
            eprintln!("service process: {}: {error}", path.display());
            return comfyq_shared::service::EXIT_BAD_CONFIG.into();
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("service process: cannot start a runtime: {error}");
            return 1;
        }
    };
    let service = config.service();
    let result = runtime.block_on(async move {
        let shutdown = comfyq_shared::shutdown::on_signal();
        match config {
            ServiceConfig::Ingress(config) => {
                let listener = tokio::net::TcpListener::bind(&config.http_addr)
                    .await
                    .map_err(|e| format!("binding {}: {e}", config.http_addr))?;
                comfyq_ingress::serve(*config, listener, shutdown)
                    .await
                    .map_err(|e| e.to_string())
            }
            ServiceConfig::Scheduler(config) => comfyq_scheduler::run(*config, shutdown)
                .await
                .map_err(|e| e.to_string()),
            ServiceConfig::Runner(config) => comfyq_runner::run(*config, shutdown)
                .await
                .map_err(|e| e.to_string()),
            ServiceConfig::Notifier(config) => comfyq_notifier::run(*config, shutdown)
                .await
                .map_err(|e| e.to_string()),
        }
    });
    match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("service process {service}: {error}");
            1
        }
    }
}

/// SIGKILL when the parent dies; exits if it already has.
fn die_with_parent() -> Result<(), String> {
    #[cfg(target_os = "linux")]
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("cannot arm the parent-death signal: {e}"))?;
    let expected = std::env::var(PARENT_ENV).ok();
    let parent = nix::unistd::getppid().as_raw().to_string();
    if expected.is_some_and(|expected| expected != parent) {
        return Err("the parent exited before the child started".to_owned());
    }
    Ok(())
}

/// How one run of a child ended.
#[derive(Debug, Clone, Serialize)]
pub struct Exit {
    pub pid: u32,
    /// Since the supervisor started.
    pub at: Duration,
    /// `kill -9` by [`ServiceProcess::kill`] (else it exited on its own).
    pub killed: bool,
    pub status: String,
}

#[derive(Debug, Default)]
struct State {
    pid: Option<u32>,
    starts: u32,
    exits: Vec<Exit>,
}

/// One service process under its supervisor; see the module docs.
#[derive(Debug)]
pub struct ServiceProcess {
    name: String,
    service: &'static str,
    state: Arc<Mutex<State>>,
    kills: mpsc::Sender<oneshot::Sender<Option<u32>>>,
    stop: CancellationToken,
    supervisor: Option<tokio::task::JoinHandle<()>>,
    log: PathBuf,
}

impl ServiceProcess {
    /// The pause before a dead child is started again.
    pub const fn restart_delay() -> Duration {
        Duration::from_secs(1)
    }

    /// Writes `config` to `<dir>/<name>.json` and starts the child, its
    /// stdout and stderr appended to `<dir>/<name>.log`.
    ///
    /// # Panics
    ///
    /// If the files cannot be written.
    pub fn start(
        launcher: &ProcessLauncher,
        name: &str,
        config: &ServiceConfig,
        dir: &Path,
    ) -> ServiceProcess {
        let config_path = dir.join(format!("{name}.json"));
        let json = serde_json::to_vec_pretty(config)
            .unwrap_or_else(|e| panic!("{name}'s configuration as JSON: {e}"));
        std::fs::write(&config_path, json)
            .unwrap_or_else(|e| panic!("writing {}: {e}", config_path.display()));
        let log = dir.join(format!("{name}.log"));
        let state = Arc::new(Mutex::new(State::default()));
        let (kills, kill_requests) = mpsc::channel(4);
        let stop = CancellationToken::new();
        let supervisor = tokio::spawn(supervise(
            launcher.clone(),
            config_path,
            log.clone(),
            state.clone(),
            kill_requests,
            stop.clone(),
        ));
        ServiceProcess {
            name: name.to_owned(),
            service: config.service(),
            state,
            kills,
            stop,
            supervisor: Some(supervisor),
            log,
        }
    }

    /// Its name (`ingress-0`, `runner-2`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ingress`, `scheduler`, `runner` or `notifier`.
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// The running child's pid, if one runs.
    pub fn pid(&self) -> Option<u32> {
        self.lock().pid
    }

    /// How often a child was started.
    pub fn starts(&self) -> u32 {
        self.lock().starts
    }

    /// Every exit so far.
    pub fn exits(&self) -> Vec<Exit> {
        self.lock().exits.clone()
    }

    /// Exits nobody asked for (a service that failed on its own).
    pub fn unexpected_exits(&self) -> Vec<Exit> {
        self.lock()
            .exits
            .iter()
            .filter(|exit| !exit.killed)
            .cloned()
            .collect()
    }

    /// The end of its log (evidence for a failure).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `kill -9` of the running child; the supervisor restarts it after
    /// [`ServiceProcess::restart_delay`]. Returns the killed pid (`None`
    /// if no child was running at that moment).
    pub async fn kill(&self) -> Option<u32> {
        let (reply, answer) = oneshot::channel();
        self.kills.send(reply).await.ok()?;
        answer.await.ok().flatten()
    }

    /// Stops the child with SIGTERM (SIGKILL after [`STOP_TIMEOUT`]) and
    /// the supervisor with it.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(supervisor) = self.supervisor.take() {
            let _ = supervisor.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        // The supervisor's child is `kill_on_drop`: aborting it kills the child.
        if let Some(supervisor) = self.supervisor.take() {
            supervisor.abort();
        }
    }
}

async fn supervise(
    launcher: ProcessLauncher,
    config: PathBuf,
    log: PathBuf,
    state: Arc<Mutex<State>>,
    mut kill_requests: mpsc::Receiver<oneshot::Sender<Option<u32>>>,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let mut child = match spawn(&launcher, &config, &log) {
            Ok(child) => child,
            Err(error) => {
                eprintln!("cannot start {}: {error}", config.display());
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(ServiceProcess::restart_delay()) => continue,
                }
            }
        };
        let pid = child.id().unwrap_or(0);
        {
            let mut state = lock();
            state.pid = Some(pid);
            state.starts += 1;
        }
        let mut killed = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                request = kill_requests.recv() => {
                    if let Some(reply) = request {
                        // tokio's kill is SIGKILL, and never reaches a
                        // reaped (possibly recycled) pid.
                        let sent = child.start_kill().is_ok();
                        killed |= sent;
                        let _ = reply.send(sent.then_some(pid));
                    }
                }
                () = stop.cancelled() => {
                    terminate(&mut child, pid).await;
                    lock().pid = None;
                    return;
                }
            }
        };
        {
            let mut state = lock();
            state.pid = None;
            state.exits.push(Exit {
                pid,
                at: started.elapsed(),
                killed,
                status: match status {
                    Ok(status) => status.to_string(),
                    Err(error) => error.to_string(),
                },
            });
        }
        // Kill requests while nothing runs are answered with `None`.
        let pause = tokio::time::sleep(ServiceProcess::restart_delay());
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                () = stop.cancelled() => return,
                request = kill_requests.recv() => {
                    if let Some(reply) = request {
                        let _ = reply.send(None);
                    }
                }
            }
        }
    }
}

fn spawn(
    launcher: &ProcessLauncher,
    config: &Path,
    log: &Path,
) -> std::io::Result<tokio::process::Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    tokio::process::Command::new(&launcher.program)
        .args(&launcher.args)
        .env(CONFIG_ENV, config)
        .env(PARENT_ENV, std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
}

/// SIGTERM, then SIGKILL if it outlives [`STOP_TIMEOUT`].
async fn terminate(child: &mut tokio::process::Child, pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(STOP_TIMEOUT, child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}
