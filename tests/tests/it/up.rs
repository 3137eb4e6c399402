//! `comfyq up`, the whole stack in one process tree: its nats-server dies
//! with it, a foreign server on the port is refused by name, development
//! webhooks are signed and never reach metadata addresses, an idle stack
//! stops at once on Ctrl-C, and `--cluster 3` runs jobs on three nodes with
//! every stream replicated (all three dying with it).
//!
//! Each test runs `comfyq up` as a process of its own (this test binary
//! re-run as [`up_as_a_process`]): it is killed and signalled like the real
//! one, and it reads `COMFYQ_` variables as the real one does, without the
//! harness's own (`COMFYQ_TEST_PYTHONPATH`) in its environment.

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use comfyq_tests::stack::invert_workflow;
use comfyq_tests::{NatsServer, WebhookSink, eventually, eventually_true};
use futures::TryStreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// Set to `up`'s arguments (one per line), it turns [`up_as_a_process`]
/// into `comfyq up`.
const CHILD_ARGS: &str = "UP_TEST_ARGS";

/// `comfyq up`'s arguments, as the binary parses them.
#[derive(Debug, Parser)]
struct UpCommand {
    #[command(flatten)]
    up: comfyq::up::UpArgs,
}

/// Not a test of its own: `comfyq up` for the tests below, which start this
/// binary again with [`CHILD_ARGS`] set.
#[test]
#[ignore = "comfyq up, started by the tests of this module"]
fn up_as_a_process() {
    let Ok(args) = std::env::var(CHILD_ARGS) else {
        return;
    };
    let command = match UpCommand::try_parse_from(std::iter::once("up").chain(args.lines())) {
        Ok(command) => command,
        Err(error) => error.exit(),
    };
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    // As `main` does: Ctrl-C and SIGTERM stop it.
    let result = runtime.block_on(async {
        let shutdown = comfyq_shared::shutdown::on_signal();
        comfyq::up::run(command.up, None, shutdown).await
    });
    let code = match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("comfyq: {error:#}");
            1
        }
    };
    std::process::exit(code);
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
}

/// A running `comfyq up` process.
struct Up {
    child: Child,
    api: String,
    nats_port: u16,
    stderr: Arc<Mutex<String>>,
    http: reqwest::Client,
}

impl Up {
    /// Starts `comfyq up` with `extra` arguments, on free ports, with its
    /// data in `data_dir`.
    fn spawn(data_dir: &Path, nats_port: u16, extra: &[&str]) -> Up {
        let http_port = free_port();
        let mut args = vec![
            "--http-addr".to_owned(),
            format!("127.0.0.1:{http_port}"),
            "--nats-port".to_owned(),
            nats_port.to_string(),
            "--nats-server".to_owned(),
            comfyq_tests::nats_server::nats_server_binary()
                .display()
                .to_string(),
            "--sim-port".to_owned(),
            free_port().to_string(),
            "--data-dir".to_owned(),
            data_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|&a| a.to_owned()));
        let mut command = Command::new(std::env::current_exe().expect("the test binary"));
        command
            .args(["up::up_as_a_process", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_ARGS, args.join("\n"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("COMFYQ_") {
                command.env_remove(name);
            }
        }
        let mut child = command.spawn().expect("comfyq up starts");
        // Read all along, so a full pipe never blocks it.
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let stderr = stderr.clone();
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buffer).await {
                    if let Ok(mut text) = stderr.lock() {
                        text.push_str(&String::from_utf8_lossy(&buffer[..n]));
                    }
                }
            });
        }
        Up {
            child,
            api: format!("http://127.0.0.1:{http_port}"),
            nats_port,
            stderr,
            http: reqwest::Client::new(),
        }
    }

    /// Starts it and waits until its API answers.
    async fn start(data_dir: &Path, extra: &[&str]) -> Up {
        Up::start_on(data_dir, free_port(), extra, Duration::from_secs(30)).await
    }

    /// [`Up::start`] with NATS on `nats_port`, ready within `ready_within`.
    async fn start_on(
        data_dir: &Path,
        nats_port: u16,
        extra: &[&str],
        ready_within: Duration,
    ) -> Up {
        let mut up = Up::spawn(data_dir, nats_port, extra);
        let deadline = Instant::now() + ready_within;
        loop {
            let ready = up
                .http
                .get(format!("{}/readyz", up.api))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return up;
            }
            if let Ok(Some(status)) = up.child.try_wait() {
                panic!("comfyq up exited with {status}: {}", up.stderr_digest());
            }
            assert!(
                Instant::now() < deadline,
                "comfyq up not ready: {}",
                up.stderr_digest()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What comfyq itself printed, then the last lines of its nats-servers'
    /// logs: a failure's cause must survive a CI log's truncation.
    fn stderr_digest(&self) -> String {
        let stderr = self.stderr();
        let is_nats_log = |line: &&str| {
            line.starts_with('[')
                && line
                    .split_once("] ")
                    .is_some_and(|(pid, _)| pid[1..].bytes().all(|b| b.is_ascii_digit()))
        };
        let (nats, own): (Vec<&str>, Vec<&str>) = stderr.lines().partition(is_nats_log);
        let tail = &nats[nats.len().saturating_sub(30)..];
        format!(
            "comfyq's own output:\n{}\n\nthe last nats-server log lines:\n{}",
            own.join("\n"),
            tail.join("\n")
        )
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn pid(&self) -> Pid {
        let pid = self.child.id().expect("comfyq up runs");
        Pid::from_raw(i32::try_from(pid).expect("a pid"))
    }

    async fn exit(&mut self, within: Duration) -> ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("comfyq up still runs after {within:?}: {}", self.stderr()))
            .expect("comfyq up is reaped")
    }

    /// Ctrl-C; returns how long it took to exit, having exited cleanly.
    async fn interrupt(&mut self) -> Duration {
        let started = Instant::now();
        kill(self.pid(), Signal::SIGINT).expect("SIGINT comfyq up");
        let status = self.exit(Duration::from_secs(30)).await;
        let took = started.elapsed();
        assert!(status.success(), "{status}: {}", self.stderr());
        took
    }

    async fn submit(&self, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/jobs", self.api))
            .json(&body)
            .send()
            .await
            .expect("POST /v1/jobs")
    }
}

/// A free port followed by `more` free ones.
fn free_ports_in_a_row(more: u16) -> u16 {
    loop {
        let first = free_port();
        let rest_free = (1..=more).all(|offset| {
            first
                .checked_add(offset)
                .is_some_and(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok())
        });
        if rest_free {
            return first;
        }
    }
}

/// Whether something answers on 127.0.0.1:`port`.
async fn answers(port: u16) -> bool {
    tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .is_ok()
}

/// `pid (comm) state ppid …` of a process; comm may hold spaces.
fn stat_after_comm(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.trim_start().to_owned())
}

/// The children of `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            stat_after_comm(pid)
                .and_then(|rest| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(parent)
        })
        .collect()
}

/// Gone, or a zombie nobody has reaped yet (a container's init may not).
fn is_dead(pid: u32) -> bool {
    stat_after_comm(pid).is_none_or(|rest| rest.starts_with(['Z', 'X']))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_up_takes_its_nats_server_along() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut up = Up::spawn(data_dir.path(), free_port(), &[]);
    let up_pid = up.pid().as_raw().cast_unsigned();
    let nats_port = up.nats_port;
    let nats_pid = eventually(
        Duration::from_secs(20),
        "comfyq up's nats-server answers",
        async || {
            let child = children_of(up_pid).first().copied()?;
            answers(nats_port).await.then_some(child)
        },
    )
    .await;

    kill(up.pid(), Signal::SIGKILL).expect("SIGKILL comfyq up");
    up.exit(Duration::from_secs(5)).await;

    eventually_true(
        Duration::from_secs(5),
        "the nats-server is gone and its port free",
        async || is_dead(nats_pid) && !answers(nats_port).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_nats_server_on_the_port_is_refused_with_what_to_do() {
    let foreign = NatsServer::start().await;
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut up = Up::spawn(data_dir.path(), foreign.port(), &[]);
    let status = up.exit(Duration::from_secs(20)).await;
    let stderr = up.stderr();
    assert!(!status.success(), "{status}: {stderr}");
    let port = foreign.port();
    assert!(
        stderr.contains("another nats-server (server_name"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("is on port {port}")), "{stderr}");
    assert!(stderr.contains("stop it or pass --nats-port"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_webhooks_are_signed_and_never_go_to_metadata_addresses() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let webhooks = WebhookSink::start().await;
    let mut up = Up::start(data_dir.path(), &["--sim"]).await;

    // Loopback receivers stay allowed in development; metadata never is.
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://[fe80::1]:8080/hook",
    ] {
        let response = up
            .submit(json!({"workflow": invert_workflow(8), "webhook": {"url": url}}))
            .await;
        assert_eq!(response.status().as_u16(), 422, "{url}");
        let content_type = response.headers()["content-type"].clone();
        assert_eq!(content_type, "application/problem+json", "{url}");
        let problem: Value = response.json().await.expect("problem JSON");
        assert_eq!(
            problem["errors"][0]["pointer"], "/webhook/url",
            "{problem:#}"
        );
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains("never allowed")),
            "{problem:#}"
        );
    }

    let response = up
        .submit(json!({"workflow": invert_workflow(8), "webhook": {"url": webhooks.url("/dev")}}))
        .await;
    assert!(response.status().is_success(), "{response:?}");
    let request = webhooks
        .wait_for(1, Duration::from_secs(20))
        .await
        .remove(0);
    let path = data_dir.path().join("webhook-secret");
    let secret = std::fs::read_to_string(&path).expect("the secret is kept in the data dir");
    let secret = secret.trim();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("secret file").permissions();
        assert_eq!(mode.mode() & 0o777, 0o600, "only the owner reads it");
    }
    standardwebhooks::Webhook::new(secret)
        .expect("a whsec_ secret")
        .verify(&request.body, &request.headers)
        .expect("the webhook is signed with the kept secret");
    assert!(up.stderr().contains(secret), "printed when made");
    up.interrupt().await;

    // A later start signs with the same secret, and does not print it again.
    let mut again = Up::start(data_dir.path(), &[]).await;
    again.interrupt().await;
    assert_eq!(std::fs::read_to_string(&path).expect("kept").trim(), secret);
    assert!(!again.stderr().contains(secret), "{}", again.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_up_stops_at_once() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut up = Up::start(data_dir.path(), &["--sim"]).await;
    // Only a stop with the runner's long-poll waiting at the server tells.
    let nats = async_nats::connect(format!("nats://127.0.0.1:{}", up.nats_port))
        .await
        .expect("comfyq up's NATS");
    let js = async_nats::jetstream::new(nats);
    eventually_true(
        Duration::from_secs(20),
        "the runner's pull waits",
        async || {
            let Ok(stream) = js.get_stream("COMFYQ_DISPATCH").await else {
                return false;
            };
            stream
                .consumers()
                .try_collect::<Vec<_>>()
                .await
                .is_ok_and(|all| all.iter().any(|c| c.num_waiting > 0))
        },
    )
    .await;
    let took = up.interrupt().await;
    // Generous for a noisy machine (a waiting pull used to hold it for up
    // to its 10 s expiry); the figures are in the change's notes.
    assert!(took < Duration::from_secs(2), "stopping took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_a_three_node_cluster_replicates_every_stream_and_takes_the_nodes_along() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let first_port = free_ports_in_a_row(2);
    let mut up = Up::start_on(
        data_dir.path(),
        first_port,
        &["--sim", "--cluster", "3"],
        Duration::from_secs(90),
    )
    .await;
    let urls: Vec<String> = (0..3)
        .map(|node| format!("nats://127.0.0.1:{}", first_port + node))
        .collect();
    assert!(
        up.stderr().contains(&format!(
            "NATS cluster of 3 nodes at {}, every stream on 3 replicas",
            urls.join(",")
        )),
        "{}",
        up.stderr()
    );

    // Three servers, each a process of its own.
    let nodes = children_of(up.pid().as_raw().cast_unsigned());
    assert_eq!(nodes.len(), 3, "nats-server children: {nodes:?}");
    let nats = async_nats::connect(urls.clone())
        .await
        .expect("the cluster");
    let js = async_nats::jetstream::new(nats);
    for stream in [
        "COMFYQ_EVENTS",
        "COMFYQ_PENDING",
        "COMFYQ_DISPATCH",
        "COMFYQ_JOBS",
        "COMFYQ_WEBHOOKS",
    ] {
        let mut handle = js.get_stream(stream).await.expect("stream exists");
        let info = handle.info().await.expect("stream info");
        assert_eq!(info.config.num_replicas, 3, "{stream}");
        let cluster = info.cluster.as_ref().expect("a clustered stream");
        assert!(cluster.leader.is_some(), "{stream} has a leader");
        assert_eq!(cluster.replicas.len(), 2, "{stream}: two followers");
    }

    let response = up.submit(json!({"workflow": invert_workflow(8)})).await;
    assert_eq!(response.status().as_u16(), 202, "{response:?}");
    let job: Value = response.json().await.expect("job JSON");
    let id = job["id"].as_str().expect("job id").to_owned();
    let url = format!("{}/v1/jobs/{id}", up.api);
    eventually(Duration::from_secs(30), "the job completed", async || {
        let job: Value = up.http.get(&url).send().await.ok()?.json().await.ok()?;
        (job["status"] == "completed").then_some(())
    })
    .await;

    // Stopped and started again on the same data directory, the nodes keep
    // their names, so JetStream finds its peers and streams: the job is there.
    up.interrupt().await;
    let mut up = Up::start_on(
        data_dir.path(),
        first_port,
        &["--sim", "--cluster", "3"],
        Duration::from_secs(90),
    )
    .await;
    let job: Value = up
        .http
        .get(format!("{}/v1/jobs/{id}", up.api))
        .send()
        .await
        .expect("GET the job")
        .json()
        .await
        .expect("job JSON");
    assert_eq!(job["status"], "completed", "{job}");

    let nodes = children_of(up.pid().as_raw().cast_unsigned());
    assert_eq!(nodes.len(), 3, "nats-server children: {nodes:?}");
    kill(up.pid(), Signal::SIGKILL).expect("SIGKILL comfyq up");
    up.exit(Duration::from_secs(5)).await;
    eventually_true(
        Duration::from_secs(5),
        "every node gone, every client port free",
        async || {
            let mut free = true;
            for port in first_port..first_port + 3 {
                free &= !answers(port).await;
            }
            nodes.iter().all(|&pid| is_dead(pid)) && free
        },
    )
    .await;
}
