//! The runner against ComfyUI: prompts staged across slots, managed mode
//! (a real `comfy-sim` process), `verify`, clean-up of ComfyUI's disk,
//! previews of both frame kinds on NATS, and a big output streamed with
//! bounded memory.

use comfyq_tests::memory::rss_bytes;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use comfy_sim::{DirKind, SimConfig, Simulator};
use comfyq_runner::comfy::{ClientConfig, ComfyClient};
use comfyq_runner::managed::{ManagedComfy, ManagedConfig, ManagedError};
use comfyq_tests::stack::{TENANT, invert_workflow, slow_workflow};
use comfyq_tests::{RunnerTweak, StackOptions, TestStack, eventually, eventually_true};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn id_of(job: &Value) -> String {
    job["id"].as_str().expect("job id").to_owned()
}

/// ComfyUI's own queue, as `GET /queue` reports it: (running, pending).
async fn comfy_queue(base: &str) -> Option<(usize, usize)> {
    let queue: Value = reqwest::get(format!("{base}/queue"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some((
        queue["queue_running"].as_array()?.len(),
        queue["queue_pending"].as_array()?.len(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_slots_the_next_prompt_is_staged_in_comfyui_and_a_third_job_waits() {
    let stack = TestStack::start_with(StackOptions {
        runner_slots: 2,
        ..StackOptions::default()
    })
    .await;
    let first = id_of(
        &stack
            .submit(json!({"workflow": slow_workflow(30, 100, "slot-1")}))
            .await,
    );
    let second = id_of(
        &stack
            .submit(json!({"workflow": slow_workflow(2, 10, "slot-2")}))
            .await,
    );
    let third = id_of(
        &stack
            .submit(json!({"workflow": slow_workflow(2, 10, "slot-3")}))
            .await,
    );
    // The second prompt reaches ComfyUI while the first still executes.
    eventually(
        Duration::from_secs(5),
        "two prompts in ComfyUI",
        async || (comfy_queue(&stack.sim.base_url()).await == Some((1, 1))).then_some(()),
    )
    .await;
    let first_status = stack.job(&first).await["status"].clone();
    assert_eq!(first_status, "running", "the first job is still running");
    assert_eq!(stack.sim.prompts_received().len(), 2);
    // Both slots are taken: the third job is not pulled.
    let third_status = stack.job(&third).await["status"].clone();
    assert!(
        third_status == "dispatched" || third_status == "queued",
        "{third_status}"
    );
    for id in [&first, &second, &third] {
        let job = stack.wait_finished(id, Duration::from_secs(20)).await;
        assert_eq!(job["status"], "completed", "{job:#}");
        assert_eq!(job["attempt"], 1, "{job:#}");
    }
    // ComfyUI ran them in order, the third only once a slot was free.
    let received = stack.sim.prompts_received();
    assert_eq!(received.len(), 3);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_outputs_are_deleted_from_comfyui_once_stored() {
    let disk = tempfile::tempdir().expect("temp dir");
    let root = disk.path().to_path_buf();
    let stack = TestStack::start_with(StackOptions {
        sim: SimConfig {
            data_dir: Some(root.clone()),
            ..SimConfig::default()
        },
        runner_tweak: Some(RunnerTweak::new(move |config| {
            config.comfyui_dir = Some(root.clone());
        })),
        ..StackOptions::default()
    })
    .await;
    // A real PNG, made by ComfyUI in a first job and read back from comfyq.
    let seed = stack.submit(json!({"workflow": invert_workflow(16)})).await;
    let seed = stack
        .wait_finished(&id_of(&seed), Duration::from_secs(20))
        .await;
    assert_eq!(seed["status"], "completed", "{seed:#}");
    assert!(
        stack.sim.files(DirKind::Output).is_empty(),
        "{:?}",
        stack.sim.files(DirKind::Output)
    );
    // The same prompt again: ComfyUI answers upstream nodes from its cache,
    // but its save node must not hand back the deleted file.
    let again = stack.submit(json!({"workflow": invert_workflow(16)})).await;
    let again = stack
        .wait_finished(&id_of(&again), Duration::from_secs(20))
        .await;
    assert_eq!(again["status"], "completed", "{again:#}");
    assert_eq!(again["outputs"][0]["name"], seed["outputs"][0]["name"]);
    assert!(stack.sim.files(DirKind::Output).is_empty());
    let name = seed["outputs"][0]["name"].as_str().expect("output name");
    let png = stack
        .http
        .get(format!(
            "{}/v1/jobs/{}/outputs/{name}",
            stack.api,
            id_of(&seed)
        ))
        .send()
        .await
        .expect("GET output")
        .bytes()
        .await
        .expect("output bytes");
    assert!(png.starts_with(b"\x89PNG"), "the output was stored first");

    use base64::Engine as _;
    let job = stack
        .submit(json!({
            "workflow": {
                "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
                "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "comfyq/cleaned"}}
            },
            "inputs": [{"name": "photo.png", "data": base64::engine::general_purpose::STANDARD.encode(&png)}]
        }))
        .await;
    let id = id_of(&job);
    let finished = stack.wait_finished(&id, Duration::from_secs(20)).await;
    assert_eq!(finished["status"], "completed", "{finished:#}");
    assert_eq!(finished["outputs"].as_array().map(Vec::len), Some(1));
    // ComfyUI did receive the upload, and it is gone now with the output.
    let uploaded = stack.sim.prompts_received().len();
    assert_eq!(uploaded, 3);
    let inputs = stack.sim.files(DirKind::Input);
    assert!(
        !inputs.iter().any(|f| f.contains(&format!("comfyq-{id}"))),
        "{inputs:?}"
    );
    assert!(
        !disk
            .path()
            .join("input")
            .join(format!("comfyq-{id}-1"))
            .exists(),
        "the job's upload folder is deleted"
    );
    let outputs = stack.sim.files(DirKind::Output);
    assert!(outputs.is_empty(), "{outputs:?}");
    stack.stop().await;
}

/// A node sending a preview at each of its `steps` steps.
fn previewing_workflow(steps: u32, step_ms: u64) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PeerSlowProgress", "inputs": {"image": ["1", 0], "steps": steps, "step_ms": step_ms, "send_previews": true, "preview_format": "JPEG"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "comfyq/previewed"}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_of_both_frame_kinds_reach_the_preview_subject_throttled() {
    for metadata in [true, false] {
        let stack = TestStack::start_with(StackOptions {
            runner_tweak: Some(RunnerTweak::new(move |config| {
                config.preview_metadata = metadata;
                config.preview_interval = Duration::from_millis(300);
            })),
            ..StackOptions::default()
        })
        .await;
        let client = stack.nats.client().await;
        let mut previews = client
            .subscribe(format!("comfyq.previews.{TENANT}.>"))
            .await
            .expect("subscribe to previews");
        // 20 previews over 2 s; at most one per 300 ms is forwarded.
        let job = stack
            .submit(json!({"workflow": previewing_workflow(20, 100)}))
            .await;
        let id = id_of(&job);
        let finished = stack.wait_finished(&id, Duration::from_secs(20)).await;
        assert_eq!(finished["status"], "completed", "{finished:#}");
        let mut received = Vec::new();
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_millis(200), previews.next()).await
        {
            received.push(message);
        }
        assert!(
            (2..=9).contains(&received.len()),
            "metadata={metadata}: {} previews",
            received.len()
        );
        for message in &received {
            assert!(
                message.subject.as_str().ends_with(&id),
                "{}",
                message.subject
            );
            let headers = message.headers.as_ref().expect("preview headers");
            assert_eq!(
                headers.get("Content-Type").map(|v| v.as_str()),
                Some("image/jpeg")
            );
            assert_eq!(
                headers.get("Comfyq-Job-Id").map(|v| v.as_str()),
                Some(id.as_str())
            );
            assert!(message.payload.starts_with(&[0xff, 0xd8]), "a JPEG");
        }
        stack.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_a_missing_node_type_and_a_missing_model() {
    let sim = Simulator::start(SimConfig::default())
        .await
        .expect("simulator");
    let comfy = ComfyClient::new(
        sim.base_url().parse().expect("url"),
        ClientConfig::default(),
    )
    .expect("client");
    let report = comfyq_runner::verify::verify(&comfy, None)
        .await
        .expect("report");
    assert!(report.ok());
    assert!(report.node_types > 10, "{report}");
    assert_eq!(
        report.models.get("checkpoints"),
        Some(&vec!["sim.safetensors".to_owned()])
    );

    let workflow = json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl_missing.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sim.safetensors"}},
        "3": {"class_type": "NoSuchNode", "inputs": {}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "x"}}
    });
    let report = comfyq_runner::verify::verify(&comfy, Some(&json!({"workflow": workflow})))
        .await
        .expect("report");
    assert!(!report.ok());
    assert_eq!(report.missing_nodes.len(), 1, "{report}");
    assert_eq!(report.missing_nodes[0].node_id, "3");
    assert_eq!(report.missing_nodes[0].class_type, "NoSuchNode");
    assert_eq!(report.missing_models.len(), 1, "{report}");
    assert_eq!(report.missing_models[0].node_id, "1");
    assert_eq!(report.missing_models[0].input, "ckpt_name");
    assert_eq!(report.missing_models[0].file, "sdxl_missing.safetensors");
    let text = report.to_string();
    assert!(
        text.contains("MISSING node type NoSuchNode (node 3)"),
        "{text}"
    );
    assert!(
        text.contains("MISSING model sdxl_missing.safetensors"),
        "{text}"
    );
    assert!(text.contains("FAILED"), "{text}");

    // The UI's saved format is refused with advice, not misread.
    let ui = json!({"nodes": [], "links": []});
    let error = comfyq_runner::verify::verify(&comfy, Some(&ui))
        .await
        .expect_err("UI format");
    assert!(error.to_string().contains("API"), "{error}");
    sim.shutdown().await.expect("simulator stops");
}

/// The `comfy-sim` binary, built beside this test binary (`cargo test`
/// builds it for comfy-sim's own tests; built here if it is missing).
fn comfy_sim_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let binary = dir.join("comfy-sim");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "comfy-sim", "--bin", "comfy-sim"])
            .status()
            .expect("cargo build comfy-sim");
        assert!(status.success(), "building comfy-sim failed");
    }
    assert!(binary.exists(), "{} missing", binary.display());
    binary
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn is_alive(pid: u32) -> bool {
    // A zombie is dead for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

fn managed_sim(port: u16, data: &Path, extra: &[&str]) -> ManagedConfig {
    let mut args = vec![
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--data-dir".to_owned(),
        data.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    ManagedConfig {
        command: comfy_sim_binary(),
        args,
        working_dir: Some(data.to_path_buf()),
        env: [("RUST_LOG".to_owned(), "info".to_owned())].into(),
        start_attempts: 3,
        ready_timeout: Duration::from_secs(20),
        restart_backoff: Duration::from_millis(100),
        stop_timeout: Duration::from_secs(5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_comfyui_starts_slowly_is_restarted_after_a_crash_and_stopped_with_the_runner() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    // Not listening for 700 ms after each start: readiness is retried.
    let managed = managed_sim(port, data.path(), &["--startup-delay-ms", "700"]);
    let url = format!("http://127.0.0.1:{port}");
    let runner_url = url.clone();
    let stack = TestStack::start_with(StackOptions {
        runner_tweak: Some(RunnerTweak::new(move |config| {
            config.comfyui_url = runner_url.clone();
            config.managed = Some(managed.clone());
        })),
        ..StackOptions::default()
    })
    .await;
    let first = stack.submit(json!({"workflow": invert_workflow(8)})).await;
    let first = stack
        .wait_finished(&id_of(&first), Duration::from_secs(20))
        .await;
    assert_eq!(first["status"], "completed", "{first:#}");
    // The managed ComfyUI is a real process; the data dir names it.
    let find_pid = || -> Option<u32> {
        let needle = data.path().display().to_string();
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .find_map(|entry| {
                let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
                (String::from_utf8_lossy(&cmdline).contains(&needle) && is_alive(pid))
                    .then_some(pid)
            })
    };
    let pid = find_pid().expect("the managed ComfyUI runs");

    // ComfyUI dies mid-prompt: the job is handed back, ComfyUI relaunched,
    // and the retry completes.
    let job = stack
        .submit(json!({"workflow": slow_workflow(30, 100, "managed")}))
        .await;
    let id = id_of(&job);
    eventually(Duration::from_secs(10), "the prompt runs", async || {
        (comfy_queue(&url).await.map(|q| q.0) == Some(1)).then_some(())
    })
    .await;
    // The runner's registration, entry by entry from now on.
    let js = async_nats::jetstream::new(stack.nats.client().await);
    let runners = js.get_key_value("comfyq_runners").await.expect("runners");
    let mut registrations = runners.watch("runner-0").await.expect("watch");
    let killed_at = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // Not ready at once (the periodic refresh is every 10 s here), so the
    // scheduler stops counting its slots; ready again once relaunched.
    let mut ready_after_kill = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ready_after_kill.last() != Some(&true) {
        let entry = tokio::time::timeout_at(deadline, registrations.next())
            .await
            .unwrap_or_else(|_| panic!("registrations after the kill: {ready_after_kill:?}"))
            .expect("watch open")
            .expect("entry");
        let registration: Value = serde_json::from_slice(&entry.value).expect("registration");
        let ready = registration["ready"].as_bool().expect("ready");
        if ready_after_kill.is_empty() && ready {
            continue; // written before the kill was seen
        }
        if ready_after_kill.is_empty() {
            let delay = killed_at.elapsed();
            assert!(delay < Duration::from_secs(1), "not ready after {delay:?}");
        }
        ready_after_kill.push(ready);
    }
    assert_eq!(
        ready_after_kill.first(),
        Some(&false),
        "{ready_after_kill:?}"
    );
    let finished = stack.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(finished["status"], "completed", "{finished:#}");
    assert_eq!(finished["attempt"], 2, "{finished:#}");
    let events = stack.state_events(&id).await;
    let retrying = events
        .iter()
        .find(|e| e["type"] == "job.retrying")
        .unwrap_or_else(|| panic!("no job.retrying in {events:#?}"));
    assert_eq!(retrying["data"]["error"]["kind"], "infrastructure");
    let relaunched = find_pid().expect("ComfyUI relaunched");
    assert_ne!(relaunched, pid);

    // Stopping the runner stops its ComfyUI.
    stack.stop().await;
    eventually_true(Duration::from_secs(10), "ComfyUI stopped", async || {
        !is_alive(relaunched)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_comfyui_that_cannot_start_fails_after_three_attempts() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    // An unknown flag: the process exits at once, every time.
    let config = managed_sim(port, data.path(), &["--no-such-flag"]);
    let comfy = ComfyClient::new(
        format!("http://127.0.0.1:{port}").parse().expect("url"),
        ClientConfig::default(),
    )
    .expect("client");
    let started = Instant::now();
    let error = ManagedComfy::start(config, comfy, CancellationToken::new())
        .await
        .expect_err("cannot start");
    let ManagedError::StartFailed {
        attempts,
        last_error,
    } = &error;
    assert_eq!(*attempts, 3, "{error}");
    assert!(last_error.contains("exited"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_output_is_streamed_with_bounded_memory() {
    // The 1 GiB: about 20 s in a debug build; the runner holds no
    // more than a few chunks of it at a time.
    const SIZE: u64 = 1 << 30;
    let stack = TestStack::start_with(StackOptions {
        sim: SimConfig {
            output_bytes: SIZE,
            ..SimConfig::default()
        },
        ..StackOptions::default()
    })
    .await;
    let before = rss_bytes();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let job = stack.submit(json!({"workflow": invert_workflow(8)})).await;
    let finished = stack
        .wait_finished(&id_of(&job), Duration::from_secs(180))
        .await;
    sampler.abort();
    assert_eq!(finished["status"], "completed", "{finished:#}");
    assert_eq!(finished["outputs"][0]["size"], SIZE);
    let growth = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    eprintln!("{SIZE} byte output: resident memory grew by {growth} bytes");
    assert!(
        growth < 64 << 20,
        "resident memory grew by {} MiB for a {} MiB output",
        growth >> 20,
        SIZE >> 20
    );
    stack.stop().await;
}
