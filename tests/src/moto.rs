//! A real S3-compatible server for the media tests: moto's `moto_server`
//! (PyPI `moto[server]`, installed into `.tools/moto` by
//! `bash deploy/dev.sh setup`), on a free port, killed on drop.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    port: u16,
}

/// `MOTO_SERVER_BIN`, else `<workspace>/.tools/moto/bin/moto_server`.
pub fn moto_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("MOTO_SERVER_BIN").filter(|p| !p.is_empty()) {
        return Some(path.into());
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let local = workspace.join(".tools/moto/bin/moto_server");
    local.exists().then_some(local)
}

impl MotoServer {
    /// Starts moto; `None` when it is not installed (the caller says it
    /// skipped). Under CI (`CI` set) a missing moto is a failure.
    pub async fn start() -> Option<Self> {
        let Some(binary) = moto_binary() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "moto_server not installed: run `bash deploy/dev.sh setup`"
            );
            return None;
        };
        let port = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let server = Self { child, port };
        let url = server.endpoint();
        crate::eventually(Duration::from_secs(30), "moto_server answers", async || {
            reqwest::get(&url).await.ok().map(|_| ())
        })
        .await;
        Some(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates `bucket` (moto accepts unsigned requests).
    pub async fn create_bucket(&self, bucket: &str) {
        let response = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint()))
            .send()
            .await
            .expect("create bucket");
        assert!(
            response.status().is_success(),
            "create bucket: {}",
            response.status()
        );
    }

    pub fn stop(&mut self) {
        let _ = self.child.start_kill();
    }
}
