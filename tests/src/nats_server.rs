//! A real `nats-server` with JetStream for tests.
//!
//! Every [`NatsServer`] listens on 127.0.0.1 with its own free port and its own
//! temporary store directory, so tests can run in parallel. [`NatsServer::stop`]
//! and [`NatsServer::restart`] simulate an outage: the restarted server uses the
//! same port and store, so clients reconnect and JetStream data survives.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Oldest supported nats-server (major, minor).
pub const MIN_VERSION: (u64, u64) = (2, 12);

/// How long a (re)started server may take to accept clients.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The command that installs the pinned nats-server into the workspace.
pub const INSTALL_HINT: &str = "bash deploy/dev.sh setup";

/// Attempts at finding a free port before giving up.
const PORT_ATTEMPTS: usize = 5;

/// Lines of the server log shown when something goes wrong.
const LOG_TAIL_LINES: usize = 40;

/// Configuration always written to the server's config file (flags given on the
/// command line take precedence). Mirrors `nats/dev.conf`.
const BASE_CONFIG: &str = "max_payload: 8MB\n";

/// A running (or stopped) nats-server owned by a test.
///
/// Dropping it kills the process and deletes the store and log.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    /// Monitoring port (cluster nodes only: leaders and health are read there).
    http_port: Option<u16>,
    /// A cluster node's whole configuration is its config file (generated
    /// from `nats/cluster/n1.conf`); a single server gets its port, store and
    /// name as flags.
    config_only: bool,
    name: String,
    binary: PathBuf,
    config_path: PathBuf,
    store_dir: PathBuf,
    log_path: PathBuf,
    // Last field: removed after the process is gone.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a JetStream-enabled server on a free 127.0.0.1 port and waits
    /// until it accepts clients.
    ///
    /// # Panics
    ///
    /// If the binary is missing or older than 2.12, or the server does not come up.
    pub async fn start() -> NatsServer {
        Self::start_with_config("").await
    }

    /// Like [`NatsServer::start`], with `extra` appended to the server's config
    /// file (nats-server config syntax, e.g. `"max_connections: 10"`). The port,
    /// host, JetStream and store dir are set by flags and cannot be overridden.
    pub async fn start_with_config(extra: &str) -> NatsServer {
        let binary = nats_server_binary().to_path_buf();
        let dir = tempfile::Builder::new()
            .prefix("comfyq-nats-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for nats-server: {e}"));
        let store_dir = dir.path().join("store");
        let log_path = dir.path().join("nats-server.log");
        let config_path = dir.path().join("nats-server.conf");
        std::fs::write(&config_path, format!("{BASE_CONFIG}{extra}\n"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));

        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "comfyq-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );

        let mut server = NatsServer {
            child: None,
            port: 0,
            http_port: None,
            config_only: false,
            name,
            binary,
            config_path,
            store_dir,
            log_path,
            dir,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            server.port = free_port();
            server.spawn();
            match server.wait_ready().await {
                Ok(()) => {
                    tracing::debug!(url = %server.url(), "nats-server ready");
                    return server;
                }
                Err(StartError::PortTaken) if attempt < PORT_ATTEMPTS => {
                    tracing::debug!(port = server.port, "port taken, retrying");
                    server.kill();
                }
                Err(e) => server.fail(&format!("nats-server did not start: {e}")),
            }
        }
        server.fail("nats-server did not start: no free port found")
    }

    /// A cluster node configured entirely by `config` (which names it
    /// `name` and listens on `port`), spawned but not yet waited for: the
    /// nodes of a cluster start together (see [`crate::cluster::NatsCluster`]).
    pub(crate) fn spawn_node(
        name: &str,
        port: u16,
        http_port: u16,
        config: &str,
        store_dir: PathBuf,
        dir: TempDir,
    ) -> NatsServer {
        let binary = nats_server_binary().to_path_buf();
        let log_path = dir.path().join("nats-server.log");
        let config_path = dir.path().join("nats-server.conf");
        std::fs::write(&config_path, format!("{BASE_CONFIG}{config}\n"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let mut server = NatsServer {
            child: None,
            port,
            http_port: Some(http_port),
            config_only: true,
            name: name.to_owned(),
            binary,
            config_path,
            store_dir,
            log_path,
            dir,
        };
        server.spawn();
        server
    }

    /// Starts a stopped node again without waiting (the nodes of a cluster
    /// restart together: none is ready before a quorum is back).
    pub(crate) fn respawn(&mut self) {
        self.kill();
        self.append_log_marker("restart");
        self.spawn();
    }

    /// Waits until a spawned node accepts clients.
    pub(crate) async fn wait_started(&mut self) -> Result<(), String> {
        self.wait_ready().await.map_err(|e| e.to_string())
    }

    /// The server name (unique per test process; a cluster node's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `http://127.0.0.1:<monitoring port>` of a cluster node.
    pub fn monitoring_url(&self) -> Option<String> {
        self.http_port
            .map(|port| format!("http://127.0.0.1:{port}"))
    }

    /// Freezes the process (SIGSTOP): it holds its connections and answers
    /// nothing, like a node stuck in a long GC pause or a hung disk.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen process go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let status = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status()
                .unwrap_or_else(|e| panic!("cannot run kill {signal} {pid}: {e}"));
            assert!(status.success(), "kill {signal} {pid} failed: {status}");
        }
    }

    /// The server's process id while it runs (for its RSS and CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `nats://127.0.0.1:<port>`; stays the same across [`NatsServer::restart`].
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (`-sd`).
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The file receiving the server's stdout and stderr (all runs appended).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the process is running (not stopped, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Connects a plain client with default options.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.unwrap_or_else(|e| {
            panic!("cannot connect to {}: {e}\n{}", self.url(), self.log_tail())
        })
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit. The
    /// port and store are kept for [`NatsServer::restart`]. No-op if stopped.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the server again on the same port with the same store (stopping it
    /// first if running) and waits until it accepts clients.
    ///
    /// # Panics
    ///
    /// If it does not come up, e.g. because another process took the port.
    pub async fn restart(&mut self) {
        self.kill();
        self.append_log_marker("restart");
        self.spawn();
        if let Err(e) = self.wait_ready().await {
            self.fail(&format!(
                "nats-server did not restart on port {}: {e}",
                self.port
            ));
        }
    }

    /// The last lines of the server log, for panic messages.
    pub fn log_tail(&self) -> String {
        log_tail_of(&self.log_path, LOG_TAIL_LINES)
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "nats-server already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone log handle: {e}"));
        let mut command = Command::new(&self.binary);
        command.arg("-c").arg(&self.config_path);
        if !self.config_only {
            command
                .args(["-js", "-a", "127.0.0.1", "-p"])
                .arg(self.port.to_string())
                .arg("-sd")
                .arg(&self.store_dir)
                .arg("-n")
                .arg(&self.name);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", self.binary.display()));
        self.child = Some(child);
    }

    /// Waits until the server on our port greets with an INFO carrying our
    /// server name (so a foreign process on a reused port is not mistaken for
    /// ours). The client listener opens only after JetStream has recovered its
    /// store, so "ready" includes JetStream.
    async fn wait_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let expected = format!("\"server_name\":\"{}\"", self.name);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                return Err(if log.contains("address already in use") {
                    StartError::PortTaken
                } else {
                    StartError::Exited(status.to_string())
                });
            }
            match read_info(self.port, deadline).await {
                Some(info) if info.contains(&expected) => return Ok(()),
                Some(_) => return Err(StartError::PortTaken),
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(StartError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean it already exited; wait() reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn append_log_marker(&self, what: &str) {
        use std::io::Write as _;
        if let Ok(mut f) = OpenOptions::new().append(true).open(&self.log_path) {
            let _ = writeln!(f, "==== comfyq-tests: {what} ====");
        }
    }

    fn fail(&mut self, message: &str) -> ! {
        self.kill();
        panic!(
            "{message}\nbinary: {}\nlog {}:\n{}",
            self.binary.display(),
            self.log_path.display(),
            self.log_tail()
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- nats-server {} ({}) log tail ----\n{}",
                self.url(),
                self.dir.path().display(),
                self.log_tail()
            );
        }
    }
}

#[derive(Debug)]
enum StartError {
    PortTaken,
    Exited(String),
    Timeout,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::PortTaken => f.write_str("port already in use"),
            StartError::Exited(status) => write!(f, "process exited ({status})"),
            StartError::Timeout => write!(f, "not ready after {READY_TIMEOUT:?}"),
        }
    }
}

/// Connects and reads the server's first line (`INFO {...}`), if any.
async fn read_info(port: u16, deadline: Instant) -> Option<String> {
    let attempt = async {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await.ok()?;
        line.starts_with("INFO ").then_some(line)
    };
    let limit = (Instant::now() + Duration::from_secs(2)).min(deadline);
    tokio::time::timeout_at(limit, attempt).await.ok().flatten()
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"))
}

fn log_tail_of(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let mut out = String::new();
            for line in &all[all.len().saturating_sub(lines)..] {
                let _ = writeln!(out, "  | {line}");
            }
            if out.is_empty() {
                out.push_str("  (empty)");
            }
            out
        }
        Err(e) => format!("  (no log: {e})"),
    }
}

/// The nats-server binary, resolved and version-checked once per process.
///
/// Order: `NATS_SERVER_BIN`, `<workspace>/.tools/nats/bin/nats-server`,
/// `nats-server` on `PATH`.
///
/// # Panics
///
/// If none is found or its version is older than [`MIN_VERSION`]; the message
/// names the install command.
pub fn nats_server_binary() -> &'static Path {
    match BINARY.get_or_init(|| find_binary().and_then(check_binary)) {
        Ok(path) => path,
        Err(message) => panic!("{message}"),
    }
}

static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Uses `path` as the nats-server binary of this process (a program's
/// `--nats-server` flag), after checking its version; fails if one was
/// already chosen.
pub fn use_nats_server_binary(path: &Path) -> Result<(), String> {
    let checked = check_binary(path.to_path_buf())?;
    BINARY
        .set(Ok(checked))
        .map_err(|_| "the nats-server binary was already chosen".to_owned())
}

fn check_binary(binary: PathBuf) -> Result<PathBuf, String> {
    let output = Command::new(&binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{} --version`: {e}", binary.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let version = parse_version(&text).ok_or_else(|| {
        format!(
            "cannot parse the version of {} from {:?}; install the pinned one with `{INSTALL_HINT}`",
            binary.display(),
            text.trim()
        )
    })?;
    if version < MIN_VERSION {
        return Err(format!(
            "{} is version {}.{}, comfyq needs nats-server >= {}.{}; run `{INSTALL_HINT}` \
             (and unset NATS_SERVER_BIN if it points to an old binary)",
            binary.display(),
            version.0,
            version.1,
            MIN_VERSION.0,
            MIN_VERSION.1
        ));
    }
    Ok(binary)
}

fn find_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "NATS_SERVER_BIN={} does not exist; unset it or run `{INSTALL_HINT}`",
                path.display()
            ))
        };
    }
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().unwrap_or(manifest_dir);
    let local = workspace.join(".tools/nats/bin/nats-server");
    if local.is_file() {
        return Ok(local);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(format!(
        "nats-server not found (looked at $NATS_SERVER_BIN, {}, $PATH); install it with:\n\n    {INSTALL_HINT}\n",
        local.display()
    ))
}

/// Parses `nats-server: v2.15.1` (or `2.12.0-RC.1`, …) into (major, minor).
fn parse_version(text: &str) -> Option<(u64, u64)> {
    text.split_whitespace().find_map(|word| {
        let word = word.strip_prefix('v').unwrap_or(word);
        let mut parts = word.split(['.', '-']);
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some((major, minor))
    })
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15)));
        assert_eq!(parse_version("nats-server: v2.12.0-RC.1"), Some((2, 12)));
        assert_eq!(parse_version("nats-server: v2.9.25"), Some((2, 9)));
        assert_eq!(parse_version("garbage"), None);
    }
}
