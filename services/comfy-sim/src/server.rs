//! Process lifecycle: the accept loop, start-up delay, crash and restart, and the
//! in-process [`SimHandle`] tests use to steer the simulator.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Failure, SimConfig};
use crate::state::Instance;
use crate::storage::{DirKind, Storage};

/// A prompt accepted by `POST /prompt`.
#[derive(Debug, Clone)]
pub struct ReceivedPrompt {
    /// Its id.
    pub prompt_id: String,
    /// The `client_id` it was submitted with.
    pub client_id: Option<String>,
    /// When the request reached the simulator (before parsing).
    pub received_at: Instant,
    /// The same moment on the wall clock, to compare with timestamps other
    /// processes wrote (a job record's `created_at`).
    pub received_wall: std::time::SystemTime,
    /// The prompt's `extra_data`, as ComfyUI keeps it in the queue and history.
    pub extra_data: serde_json::Map<String, serde_json::Value>,
}

/// An `execution_success` message the simulator sent.
#[derive(Debug, Clone)]
pub struct SentSuccess {
    pub prompt_id: String,
    /// When it was handed to the client's socket.
    pub sent_at: Instant,
}

#[derive(Debug)]
enum Command {
    Crash { restart: bool },
    Restart,
}

/// State that survives simulated crashes (the "disk" and the test controls).
#[derive(Debug)]
pub(crate) struct Core {
    config: RwLock<SimConfig>,
    pub(crate) storage: Storage,
    failures: Mutex<VecDeque<Failure>>,
    received: Mutex<Vec<ReceivedPrompt>>,
    successes: Mutex<Vec<SentSuccess>>,
    cmd: mpsc::UnboundedSender<Command>,
    up: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Core {
    pub(crate) fn config(&self) -> SimConfig {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn take_failure(&self) -> Option<Failure> {
        lock(&self.failures).pop_front()
    }

    pub(crate) fn record(&self, p: ReceivedPrompt) {
        lock(&self.received).push(p);
    }

    pub(crate) fn record_success(&self, s: SentSuccess) {
        lock(&self.successes).push(s);
    }

    /// The process dies now: sockets and connections drop, the listener closes.
    pub(crate) fn crash_now(&self, inst: &Instance, auto_restart: bool) {
        inst.cancel.cancel();
        let restart = auto_restart && self.config().restart_on_crash;
        let _ = self.cmd.send(Command::Crash { restart });
    }
}

/// The simulator entry points.
#[derive(Debug)]
pub struct Simulator;

impl Simulator {
    /// Serve on an already-bound listener until `shutdown` is cancelled.
    pub async fn serve(
        listener: TcpListener,
        config: SimConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let (core, rx) = build_core(config)?;
        supervise(core, listener, shutdown, rx).await
    }

    /// Binds 127.0.0.1:0, serves in a background task and returns a handle.
    pub async fn start(config: SimConfig) -> anyhow::Result<SimHandle> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (core, rx) = build_core(config)?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(supervise(core.clone(), listener, shutdown.clone(), rx));
        Ok(SimHandle {
            addr,
            core,
            shutdown,
            task: Some(task),
        })
    }
}

fn build_core(config: SimConfig) -> anyhow::Result<(Arc<Core>, mpsc::UnboundedReceiver<Command>)> {
    let storage = Storage::new(config.data_dir.as_deref(), config.temp_parent.as_deref())?;
    let (tx, rx) = mpsc::unbounded_channel();
    let core = Arc::new(Core {
        failures: Mutex::new(config.failures.iter().cloned().collect()),
        config: RwLock::new(config),
        storage,
        received: Mutex::new(Vec::new()),
        successes: Mutex::new(Vec::new()),
        cmd: tx,
        up: watch::channel(false).0,
    });
    Ok((core, rx))
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(last.map_or_else(|| anyhow::anyhow!("bind failed"), anyhow::Error::from))
}

async fn supervise(
    core: Arc<Core>,
    listener: TcpListener,
    shutdown: CancellationToken,
    mut rx: mpsc::UnboundedReceiver<Command>,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let mut listener = Some(listener);
    loop {
        let delay = core.config().startup_delay_ms;
        if delay > 0 {
            listener = None;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(delay)) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        }
        let l = match listener.take() {
            Some(l) => l,
            None => bind(addr).await?,
        };
        let cancel = shutdown.child_token();
        let inst = Arc::new(Instance::new(core.clone(), cancel.clone()));
        let exec = tokio::spawn(crate::executor::run(inst.clone()));
        let acc = tokio::spawn(accept(l, inst.clone()));
        core.up.send_replace(true);
        tracing::info!(%addr, "comfy-sim listening");
        let restart = tokio::select! {
            () = shutdown.cancelled() => None,
            cmd = rx.recv() => match cmd {
                Some(Command::Crash { restart }) => Some(restart),
                Some(Command::Restart) => Some(true),
                None => None,
            },
        };
        cancel.cancel();
        core.up.send_replace(false);
        let _ = acc.await;
        let _ = exec.await;
        match restart {
            None => return Ok(()),
            Some(true) => {}
            Some(false) => loop {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    cmd = rx.recv() => match cmd {
                        Some(Command::Restart) => break,
                        Some(Command::Crash { .. }) => {}
                        None => return Ok(()),
                    },
                }
            },
        }
    }
}

async fn accept(listener: TcpListener, inst: Arc<Instance>) {
    let router = crate::routes::router(inst.clone());
    loop {
        let (stream, _) = tokio::select! {
            () = inst.cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(router.clone());
        let cancel = inst.cancel.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                () = cancel.cancelled() => {}
            }
        });
    }
}

/// A running simulator. Dropping it stops the simulator.
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    core: Arc<Core>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl SimHandle {
    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://host:port/ws?clientId=<client_id>`.
    pub fn ws_url(&self, client_id: &str) -> String {
        format!("ws://{}/ws?clientId={client_id}", self.addr)
    }

    /// The current knobs.
    pub fn config(&self) -> SimConfig {
        self.core.config()
    }

    /// Replaces the knobs (`failures` are queued after pending ones).
    pub fn set_config(&self, config: SimConfig) {
        lock(&self.core.failures).extend(config.failures.iter().cloned());
        *self
            .core
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
    }

    /// Changes some knobs in place.
    pub fn update(&self, f: impl FnOnce(&mut SimConfig)) {
        let mut c = self.core.config();
        c.failures.clear();
        f(&mut c);
        self.set_config(c);
    }

    /// Applies `failure` to each of the next `count` executed prompts.
    pub fn inject(&self, failure: Failure, count: usize) {
        lock(&self.core.failures).extend(std::iter::repeat_n(failure, count));
    }

    /// Drops injected failures not yet used.
    pub fn clear_failures(&self) {
        lock(&self.core.failures).clear();
    }

    /// Prompts accepted so far (across restarts), in arrival order.
    pub fn prompts_received(&self) -> Vec<ReceivedPrompt> {
        lock(&self.core.received).clone()
    }

    /// `execution_success` messages sent so far (across restarts), in order.
    pub fn successes_sent(&self) -> Vec<SentSuccess> {
        lock(&self.core.successes).clone()
    }

    /// Files currently in a directory, as `subfolder/name`.
    pub fn files(&self, kind: DirKind) -> Vec<String> {
        self.core.storage.list(kind)
    }

    /// Whether the simulated process is up and listening.
    pub fn is_up(&self) -> bool {
        *self.core.up.borrow()
    }

    /// Waits until the process is listening (or the timeout passes).
    pub async fn wait_up(&self, timeout: Duration) -> bool {
        let mut rx = self.core.up.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|up| *up))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Simulates a process crash: every connection drops, HTTP is refused, the queue,
    /// history and cache are lost. It stays down until [`SimHandle::restart`].
    pub fn crash(&self) {
        let _ = self.core.cmd.send(Command::Crash { restart: false });
    }

    /// Starts the process again (crashing it first if it runs), after `startup_delay_ms`.
    pub fn restart(&self) {
        let _ = self.core.cmd.send(Command::Restart);
    }

    /// Stops the simulator and waits for it.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(t) => t.await?,
            None => Ok(()),
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
