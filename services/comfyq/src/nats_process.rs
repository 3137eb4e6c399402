//! A nats-server child process with JetStream and a data directory.
//!
//! The child dies with `comfyq`: on Linux it gets SIGKILL when its parent
//! dies (`PR_SET_PDEATHSIG`), so a SIGKILLed `comfyq up` leaves no server
//! behind holding the port and the store. It is only used once it proves to
//! be the server answering on the port (its unique `server_name` in the INFO
//! line), so a foreign server is never mistaken for ours.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::watch;

/// How long the server may take to load its store and accept clients.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection may take to send its INFO line.
const INFO_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub(crate) struct NatsProcess {
    pid: Pid,
    port: u16,
    /// `true` once the child has exited (set before it is reaped, so a
    /// signal sent while this is `false` cannot reach a recycled pid).
    exited: Arc<Mutex<bool>>,
    status: watch::Receiver<Option<io::Result<ExitStatus>>>,
}

impl NatsProcess {
    pub(crate) async fn start(binary: &Path, port: u16, store: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(store).with_context(|| format!("creating {}", store.display()))?;
        let store =
            std::path::absolute(store).with_context(|| format!("resolving {}", store.display()))?;
        // Unique per start: how the readiness check tells our server from
        // another one answering on the same port.
        let server_name = format!(
            "comfyq-local-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        // Settings without a command-line flag go in a generated config file.
        let config = store.join("comfyq-local.conf");
        let contents = format!(
            "server_name: {server_name}\nlisten: \"127.0.0.1:{port}\"\nmax_payload: 8MB\njetstream {{\n  store_dir: {:?}\n}}\n",
            store.display().to_string()
        );
        std::fs::write(&config, contents)
            .with_context(|| format!("writing {}", config.display()))?;
        Self::launch(binary, port, &config, &server_name).await
    }

    /// Starts nats-server with the configuration file `config`, in which
    /// the server is named `server_name` and listens on `port`; ready once
    /// that server (and no other) accepts connections there.
    async fn launch(
        binary: &Path,
        port: u16,
        config: &Path,
        server_name: &str,
    ) -> anyhow::Result<Self> {
        let binary = resolve(binary)?;
        let mut command = Command::new(&binary);
        command
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            // Its own process group: Ctrl-C reaches comfyq, which stops the
            // services first and the server last.
            .process_group(0);
        die_with_parent(&mut command);
        let mut process =
            Self::spawn(command, port).with_context(|| format!("running {}", binary.display()))?;

        // Ready once our server accepts connections (JetStream has loaded its
        // store by then).
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = process.exit_status() {
                // Most often the port is taken; say by what, if it answers.
                return Err(match answering_server(port).await {
                    Some(name) => foreign_server(port, &name),
                    None => anyhow::anyhow!(
                        "nats-server exited with {status} (its log above says why; \
                         if port {port} is in use, stop what holds it or pass --nats-port)"
                    ),
                });
            }
            match answering_server(port).await {
                Some(name) if name == server_name => return Ok(process),
                Some(name) => {
                    process.stop().await;
                    return Err(foreign_server(port, &name));
                }
                None => {}
            }
            if tokio::time::Instant::now() > deadline {
                process.stop().await;
                bail!("nats-server did not accept connections on port {port} within 30 s");
            }
            tokio::select! {
                _ = process.status.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// Spawns and waits for the child on a thread of its own: the
    /// parent-death signal fires when the *thread* that forked exits, and
    /// this one lives exactly as long as the child.
    fn spawn(mut command: Command, port: u16) -> io::Result<Self> {
        let exited = Arc::new(Mutex::new(false));
        let (status_tx, status) = watch::channel(None);
        let (pid_tx, pid_rx) = std::sync::mpsc::channel();
        let waiter_exited = exited.clone();
        std::thread::Builder::new()
            .name("nats-server".to_owned())
            .spawn(move || {
                let mut child = match command.spawn() {
                    Ok(child) => child,
                    Err(error) => {
                        // The receiver is there until it hears from us.
                        let _ = pid_tx.send(Err(error));
                        return;
                    }
                };
                let pid = Pid::from_raw(child.id().cast_signed());
                let _ = pid_tx.send(Ok(pid));
                // Wait without reaping first, so the pid is still ours while
                // `exited` is false.
                let waited = nix::sys::wait::waitid(
                    nix::sys::wait::Id::Pid(pid),
                    nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT,
                );
                if let Err(error) = waited {
                    tracing::warn!(%error, "waiting for nats-server");
                }
                if let Ok(mut exited) = waiter_exited.lock() {
                    *exited = true;
                }
                // Nobody may be listening any more (comfyq is stopping).
                let _ = status_tx.send(Some(child.wait()));
            })?;
        let pid = pid_rx
            .recv()
            .map_err(|_| io::Error::other("the nats-server thread ended early"))??;
        Ok(Self {
            pid,
            port,
            exited,
            status,
        })
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn exit_status(&self) -> Option<String> {
        match &*self.status.borrow() {
            Some(Ok(status)) => Some(status.to_string()),
            Some(Err(error)) => Some(format!("an unknown status ({error})")),
            None => None,
        }
    }

    /// Sends `signal` unless the child is gone.
    fn signal(&self, signal: Signal) {
        let Ok(exited) = self.exited.lock() else {
            return;
        };
        if !*exited && let Err(error) = kill(self.pid, signal) {
            tracing::warn!(%error, ?signal, "signalling nats-server");
        }
    }

    /// SIGTERM lets the server flush its store; kill if it lingers.
    pub(crate) async fn stop(mut self) {
        self.signal(Signal::SIGTERM);
        let exited = self.status.wait_for(Option::is_some);
        if tokio::time::timeout(Duration::from_secs(10), exited)
            .await
            .is_err()
        {
            self.signal(Signal::SIGKILL);
        }
    }
}

impl Drop for NatsProcess {
    /// Never leave a server behind (like `kill_on_drop`): `up` failing
    /// half-way drops it without `stop`.
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

/// How long a started cluster may take until every node reports JetStream
/// healthy (a meta leader elected, its assets current).
const CLUSTER_HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);

/// The file in a cluster's directory naming its nodes (kept, see
/// [`LocalCluster::start`]).
const CLUSTER_ID_FILE: &str = "cluster-id";

/// `comfyq up --cluster N`: N nats-server children forming one JetStream
/// cluster on this machine, each configured from `nats/cluster/n1.conf`
/// ([`comfyq_shared::nats_cluster`], as the test harness and the load test
/// do), client ports `first_port`, `first_port + 1`, …; monitoring and
/// route ports free ones.
#[derive(Debug)]
pub(crate) struct LocalCluster {
    nodes: Vec<NatsProcess>,
    specs: Vec<comfyq_shared::nats_cluster::NodeSpec>,
}

impl LocalCluster {
    /// Starts the nodes with their stores under `root` and waits until the
    /// cluster is healthy.
    ///
    /// Node names come from an id kept in `root`: JetStream knows its peers
    /// by name, so a restarted cluster must reuse them to find its streams,
    /// while another data directory's cluster on the same ports is still
    /// told apart from ours.
    pub(crate) async fn start(
        binary: &Path,
        first_port: u16,
        nodes: u8,
        root: &Path,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let root =
            std::path::absolute(root).with_context(|| format!("resolving {}", root.display()))?;
        let id = cluster_id(&root)?;
        let mut ports = Vec::with_capacity(nodes.into());
        for index in 0..u16::from(nodes) {
            let client = first_port.checked_add(index).with_context(|| {
                format!("--nats-port {first_port} leaves no room for {nodes} client ports")
            })?;
            ports.push((client, free_port()?, free_port()?));
        }
        let specs = comfyq_shared::nats_cluster::local_cluster(
            &format!("comfyq-{id}-n"),
            &ports,
            &root,
            false,
        );
        let mut started = Vec::with_capacity(specs.len());
        for spec in &specs {
            std::fs::create_dir_all(&spec.store_dir)
                .with_context(|| format!("creating {}", spec.store_dir.display()))?;
            let config = root.join(format!("{}.conf", spec.server_name));
            std::fs::write(&config, comfyq_shared::nats_cluster::render(spec))
                .with_context(|| format!("writing {}", config.display()))?;
            // A failure drops (kills) the nodes started so far.
            started.push(
                NatsProcess::launch(binary, spec.client_port, &config, &spec.server_name)
                    .await
                    .with_context(|| format!("starting cluster node {}", spec.server_name))?,
            );
        }
        let cluster = Self {
            nodes: started,
            specs,
        };
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    /// Every node's client URL, comma separated (`nats.url`).
    pub(crate) fn urls(&self) -> String {
        comfyq_shared::nats_cluster::client_urls(&self.specs)
    }

    /// Nodes in the cluster.
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Waits until every node answers `/healthz` with 200.
    async fn wait_healthy(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = tokio::time::Instant::now() + CLUSTER_HEALTHY_TIMEOUT;
        loop {
            let mut unhealthy = Vec::new();
            for spec in &self.specs {
                let url = format!("http://127.0.0.1:{}/healthz", spec.http_port);
                let healthy = http
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|response| response.status().is_success());
                if !healthy {
                    unhealthy.push(spec.server_name.as_str());
                }
            }
            if unhealthy.is_empty() {
                return Ok(());
            }
            for node in &self.nodes {
                if let Some(status) = node.exit_status() {
                    bail!("a cluster node exited with {status} (its log above says why)");
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the NATS cluster is not healthy after {CLUSTER_HEALTHY_TIMEOUT:?}: {unhealthy:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every node (SIGTERM, each flushing its store).
    pub(crate) async fn stop(self) {
        futures::future::join_all(self.nodes.into_iter().map(NatsProcess::stop)).await;
    }
}

/// The id kept in `root`, made on first use.
fn cluster_id(root: &Path) -> anyhow::Result<String> {
    let path = root.join(CLUSTER_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    }
    let id = format!("{:08x}", rand::random::<u32>());
    std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// A port nothing listens on now (the node binds it a moment later).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("finding a free port for a cluster node")?;
    Ok(listener.local_addr()?.port())
}

fn foreign_server(port: u16, name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "another nats-server (server_name {name:?}) is on port {port}, not the one comfyq \
         started; stop it or pass --nats-port (or use it with --nats-url nats://127.0.0.1:{port})"
    )
}

/// The `server_name` of whatever NATS server answers on `port`, from the
/// INFO line it sends first; `None` if nothing answers (yet) like NATS.
async fn answering_server(port: u16) -> Option<String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(64 * 1024);
    tokio::time::timeout(INFO_TIMEOUT, reader.read_line(&mut line))
        .await
        .ok()?
        .ok()?;
    let info: serde_json::Value = serde_json::from_str(line.strip_prefix("INFO ")?.trim()).ok()?;
    // A server without a name is named by its id.
    info.get("server_name")
        .or_else(|| info.get("server_id"))
        .and_then(|name| name.as_str())
        .map(str::to_owned)
}

/// Asks the kernel to SIGKILL the child when this thread dies (Linux).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the hook runs between fork and exec, where only
    // async-signal-safe calls are allowed: prctl and getppid are plain
    // syscalls, and the error paths do not allocate.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have died before the signal was armed.
            if nix::unistd::getppid() != parent {
                return Err(nix::errno::Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

/// Elsewhere the server outlives a killed `comfyq`; Ctrl-C still stops it.
#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// The binary as given, or found in the project's `.tools` or on `PATH`.
fn resolve(binary: &Path) -> anyhow::Result<PathBuf> {
    if binary.components().count() > 1 {
        return if binary.exists() {
            Ok(binary.to_path_buf())
        } else {
            bail!(
                "{} does not exist; install it with `bash deploy/dev.sh setup`",
                binary.display()
            )
        };
    }
    let local = Path::new(".tools/nats/bin").join(binary);
    if local.exists() {
        return Ok(local);
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(binary))
                .find(|p| p.exists())
        })
        .unwrap_or_default();
    on_path.ok_or_else(|| {
        anyhow::anyhow!(
            "{} not found; install it with `bash deploy/dev.sh setup` or pass --nats-server PATH",
            binary.display()
        )
    })
}
