//! A nats-server child process with JetStream and a data directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

#[derive(Debug)]
pub(crate) struct NatsProcess {
    child: Child,
    port: u16,
}

impl NatsProcess {
    pub(crate) async fn start(binary: &Path, port: u16, store: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(store).with_context(|| format!("creating {}", store.display()))?;
        let binary = resolve(binary)?;
        let store =
            std::path::absolute(store).with_context(|| format!("resolving {}", store.display()))?;
        // Settings without a command-line flag go in a generated config file.
        let config = store.join("comfyq-local.conf");
        let contents = format!(
            "server_name: comfyq-local\nlisten: \"127.0.0.1:{port}\"\nmax_payload: 8MB\njetstream {{\n  store_dir: {:?}\n}}\n",
            store.display().to_string()
        );
        std::fs::write(&config, contents)
            .with_context(|| format!("writing {}", config.display()))?;
        let child = Command::new(&binary)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            // Its own process group: Ctrl-C reaches comfyq, which stops the
            // services first and the server last.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {}", binary.display()))?;
        let mut process = Self { child, port };
        // Ready once it accepts connections (JetStream has loaded its store by then).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = process.child.try_wait()? {
                bail!("nats-server exited with {status} (is port {port} in use?)");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(process);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("nats-server did not accept connections on port {port} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGTERM lets the server flush its store; kill if it lingers.
    pub(crate) async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

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
