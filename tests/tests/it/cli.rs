//! The `comfyq` command line against the in-process stack: the same code the
//! binary runs (`comfyq::cli::run_args`), its output captured. `submit --wait`
//! with outputs written, every subcommand, a dead letter retried, errors
//! rendered for a person with their exit codes, an unreachable server.

use std::path::Path;
use std::time::Duration;

use comfyq::cli::{Captured, Console, ExitStatus, run_args};
use comfyq_tests::stack::{self, API_KEY, invert_workflow, slow_workflow};
use comfyq_tests::{TestStack, eventually};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// What one run printed and how it exited.
#[derive(Debug)]
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// `comfyq --url <stack> --api-key <key> ARGS…`.
async fn comfyq(api: &str, key: &str, args: &[&str]) -> Run {
    let (console, captured) = Console::captured();
    comfyq_on(console, &captured, api, key, args).await
}

/// The same, on a console the caller watches while it runs.
async fn comfyq_on(
    mut console: Console,
    captured: &Captured,
    api: &str,
    key: &str,
    args: &[&str],
) -> Run {
    let mut argv = vec!["comfyq", "--url", api, "--api-key", key];
    argv.extend_from_slice(args);
    let status = run_args(argv, &mut console).await;
    Run {
        status,
        stdout: captured.stdout(),
        stderr: captured.stderr(),
    }
}

fn write_json(dir: &Path, name: &str, value: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, value.to_string()).expect("write workflow file");
    path.display().to_string()
}

fn tiny_png() -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, 4, 4);
    encoder.set_color(png::ColorType::Rgb);
    encoder
        .write_header()
        .and_then(|mut w| w.write_image_data(&[90u8; 48]))
        .expect("png");
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_saves_outputs_and_every_subcommand_answers() {
    let stack = TestStack::start().await;
    let api = stack.api.as_str();
    let dir = tempfile::tempdir().expect("temp dir");
    let run = async |args: &[&str]| comfyq(api, API_KEY, args).await;

    // An API-format workflow (no "workflow" key) is wrapped into a job. Its
    // middle node takes a moment, so its start and steps are shown (the
    // nodes of a job done in a millisecond are one event, its output).
    let workflow = write_json(dir.path(), "steps.json", &slow_workflow(3, 30, "cli-steps"));
    let out = dir.path().join("out");
    let out_arg = out.display().to_string();
    let done = run(&[
        "submit",
        &workflow,
        "--priority",
        "high",
        "--wait",
        "--out",
        &out_arg,
    ])
    .await;
    assert_eq!(done.status, ExitStatus::Success, "{done:#?}");
    assert!(done.stdout.contains(" completed"), "{done:#?}");
    // Without a terminal, progress is one line per phase on stderr.
    for phase in [
        "submitted job",
        "running on runner-0",
        "node 2 PeerSlowProgress",
        "completed",
    ] {
        assert!(done.stderr.contains(phase), "no {phase:?} in {done:#?}");
    }
    let id = done
        .stderr
        .lines()
        .find_map(|line| line.strip_prefix("submitted job "))
        .expect("the job id on stderr")
        .trim()
        .to_owned();
    let job = stack.job(&id).await;
    assert_eq!(job["priority"], "high", "{job:#}");
    let output = &job["outputs"][0];
    let name = output["name"].as_str().expect("output name");
    let saved = std::fs::read(out.join(name)).expect("the output is saved under --out");
    assert_eq!(saved.len() as u64, output["size"].as_u64().expect("size"));
    assert_eq!(
        hex::encode(Sha256::digest(&saved)),
        output["sha256"].as_str().expect("sha")
    );
    assert!(saved.starts_with(b"\x89PNG"), "a PNG");
    assert!(
        done.stdout
            .contains(&format!("saved {}", out.join(name).display())),
        "{done:#?}"
    );
    assert_eq!(
        std::fs::read_dir(&out).expect("out dir").count(),
        1,
        "no partial file left beside the output"
    );

    // A full job body with a local input file: multipart, no --wait → the id.
    let photo = dir.path().join("photo.png");
    std::fs::write(&photo, tiny_png()).expect("write input");
    let body = write_json(
        dir.path(),
        "job.json",
        &json!({"workflow": {
            "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "comfyq/cli"}}
        }, "metadata": {"from": "cli"}}),
    );
    let input_arg = format!("photo.png={}", photo.display());
    let submitted = run(&["submit", &body, "--input", &input_arg, "--pool", "default"]).await;
    assert_eq!(submitted.status, ExitStatus::Success, "{submitted:#?}");
    let upload_id = submitted.stdout.trim().to_owned();
    assert!(submitted.stderr.contains("comfyq watch"), "{submitted:#?}");

    // `watch` follows it to the end and exits 0 for a completed job.
    let watched = run(&["watch", &upload_id]).await;
    assert_eq!(watched.status, ExitStatus::Success, "{watched:#?}");
    let kinds: Vec<&str> = watched
        .stdout
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .collect();
    assert_eq!(kinds.first(), Some(&"job.accepted"), "{watched:#?}");
    assert_eq!(kinds.last(), Some(&"job.completed"), "{watched:#?}");
    // Resumable: after the last event id there is nothing more, still exit 0.
    let last_seq = watched
        .stdout
        .lines()
        .last()
        .and_then(|line| line.split_whitespace().next())
        .expect("an event id")
        .to_owned();
    let resumed = run(&["watch", &upload_id, "--after", &last_seq]).await;
    assert_eq!(resumed.status, ExitStatus::Success, "{resumed:#?}");
    assert_eq!(
        resumed.stdout, "",
        "nothing after the last event: {resumed:#?}"
    );
    let middle = run(&["watch", &upload_id, "--after", "0", "--json"]).await;
    let lines: Vec<Value> = middle
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    assert_eq!(lines.len(), kinds.len(), "{middle:#?}");
    assert_eq!(
        lines.last().expect("events")["event"]["type"],
        "job.completed"
    );

    // `job`: the input it uploaded, the output, for a person and as JSON.
    let shown = run(&["job", &upload_id]).await;
    assert_eq!(shown.status, ExitStatus::Success, "{shown:#?}");
    for part in [
        "status:     completed",
        "input:      photo.png (image/png",
        "output:     cli_",
    ] {
        assert!(shown.stdout.contains(part), "no {part:?} in {shown:#?}");
    }
    let as_json = run(&["job", &upload_id, "--json"]).await.json();
    assert_eq!(as_json["metadata"], json!({"from": "cli"}));
    assert_eq!(as_json["inputs"][0]["size"], tiny_png().len());

    // `outputs` downloads into the directory given.
    let again = dir.path().join("again");
    let again_arg = again.display().to_string();
    let outputs = run(&["outputs", &upload_id, "--out", &again_arg]).await;
    assert_eq!(outputs.status, ExitStatus::Success, "{outputs:#?}");
    let saved_name = as_json["outputs"][0]["name"].as_str().expect("name");
    assert!(again.join(saved_name).is_file(), "{outputs:#?}");

    // `jobs`: both, newest first, filtered by status; JSON is the API's page.
    let listed = run(&["jobs", "--status", "completed", "--limit", "5"]).await;
    assert_eq!(listed.status, ExitStatus::Success, "{listed:#?}");
    let rows: Vec<&str> = listed.stdout.lines().collect();
    assert!(
        rows[0].starts_with("ID") && rows[0].contains("STATUS"),
        "{listed:#?}"
    );
    assert!(
        rows[1].starts_with(&upload_id) && rows[2].starts_with(&id),
        "{listed:#?}"
    );
    let page = run(&["jobs", "--limit", "1", "--json"]).await.json();
    assert_eq!(page["jobs"].as_array().map(Vec::len), Some(1), "{page:#}");
    let paged = run(&["jobs", "--limit", "1"]).await;
    assert!(
        paged.stdout.contains("more: comfyq jobs --cursor "),
        "{paged:#?}"
    );
    let none = run(&["jobs", "--status", "cancelled"]).await;
    assert_eq!(none.stdout, "no jobs\n", "{none:#?}");

    // `queue` and `runners`.
    let queue = run(&["queue"]).await;
    assert_eq!(queue.status, ExitStatus::Success, "{queue:#?}");
    assert!(queue.stdout.starts_with("POOL"), "{queue:#?}");
    for priority in ["high", "normal", "low"] {
        assert!(
            queue
                .stdout
                .lines()
                .any(|l| l.starts_with("default") && l.contains(priority)),
            "{queue:#?}"
        );
    }
    let runners = run(&["runners"]).await;
    let runner_row = runners
        .stdout
        .lines()
        .find(|l| l.starts_with("runner-0"))
        .unwrap_or_else(|| panic!("runner-0 listed: {runners:#?}"));
    assert!(
        runner_row.contains("default") && runner_row.contains("yes"),
        "{runners:#?}"
    );
    assert!(runner_row.contains("0/1"), "busy/slots: {runners:#?}");
    assert_eq!(
        run(&["runners", "--json"]).await.json()["runners"][0]["runner"],
        "runner-0"
    );

    // `cancel`: a running job is interrupted; `watch` then exits 1. While it
    // runs, `submit --wait` of another job shows its place in the queue.
    let slow = write_json(dir.path(), "slow.json", &slow_workflow(200, 50, "cli-slow"));
    let slow_id = run(&["submit", &slow]).await.stdout.trim().to_owned();
    eventually(Duration::from_secs(20), "the slow job runs", async || {
        (stack.job(&slow_id).await["status"] == "running").then_some(())
    })
    .await;
    let (console, behind) = Console::captured();
    let submit_args = ["submit", workflow.as_str(), "--wait"];
    let (queued, cancelled) = tokio::join!(
        comfyq_on(console, &behind, api, API_KEY, &submit_args),
        async {
            eventually(
                Duration::from_secs(20),
                "the queue position shown",
                async || behind.stderr().contains("queued, 0 ahead").then_some(()),
            )
            .await;
            run(&["cancel", &slow_id]).await
        }
    );
    assert_eq!(queued.status, ExitStatus::Success, "{queued:#?}");
    assert_eq!(cancelled.status, ExitStatus::Success, "{cancelled:#?}");
    assert!(
        cancelled.stdout.contains("cancellation of job"),
        "{cancelled:#?}"
    );
    let watched = run(&["watch", &slow_id]).await;
    assert_eq!(watched.status, ExitStatus::JobNotCompleted, "{watched:#?}");
    assert!(watched.stdout.contains("job.cancelled"), "{watched:#?}");
    let ended = run(&["cancel", &slow_id]).await;
    assert!(
        ended.stdout.contains("had already ended: cancelled"),
        "{ended:#?}"
    );

    // A job whose attempts run out: `submit --wait` exits 1 and says why;
    // `dead-letters` lists it, `retry` requeues it, `watch` sees it complete.
    let max = stack.nats_config().dispatch_max_deliver as usize;
    stack.sim.inject(comfy_sim::Failure::oom(), max);
    let failed = run(&["submit", &workflow, "--wait"]).await;
    assert_eq!(failed.status, ExitStatus::JobNotCompleted, "{failed:#?}");
    assert!(failed.stdout.contains(" failed"), "{failed:#?}");
    assert!(
        failed.stdout.contains("error: out_of_memory"),
        "{failed:#?}"
    );
    assert!(
        failed.stderr.contains("retrying"),
        "retries shown: {failed:#?}"
    );
    let dead_id = failed
        .stdout
        .split_whitespace()
        .nth(1)
        .expect("job id")
        .to_owned();
    let letters = eventually(Duration::from_secs(10), "a dead letter", async || {
        let letters = run(&["dead-letters"]).await;
        letters.stdout.contains(&dead_id).then_some(letters)
    })
    .await;
    assert!(letters.stdout.starts_with("JOB"), "{letters:#?}");
    assert!(letters.stdout.contains("out_of_memory"), "{letters:#?}");
    let retried = run(&["retry", &dead_id]).await;
    assert_eq!(retried.status, ExitStatus::Success, "{retried:#?}");
    assert!(retried.stdout.contains("requeued"), "{retried:#?}");
    // Its events hold the old `job.failed`, then the new attempt: `watch`
    // reads past the old ending to the new one.
    let watched = run(&["watch", &dead_id]).await;
    assert_eq!(watched.status, ExitStatus::Success, "{watched:#?}");
    assert!(watched.stdout.contains("job.failed"), "{watched:#?}");
    assert!(
        watched
            .stdout
            .trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.contains("job.completed")),
        "{watched:#?}"
    );
    assert_eq!(run(&["dead-letters"]).await.stdout, "no dead letters\n");

    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_rendered_for_a_person_with_their_exit_codes() {
    let stack = TestStack::start().await;
    let api = stack.api.as_str();
    let dir = tempfile::tempdir().expect("temp dir");
    let run = async |args: &[&str]| comfyq(api, API_KEY, args).await;
    let workflow = write_json(dir.path(), "invert.json", &invert_workflow(8));

    // Wrong API key: 401 as a sentence, with what to do.
    let refused = comfyq(api, "not-a-key", &["jobs"]).await;
    assert_eq!(refused.status, ExitStatus::Refused, "{refused:#?}");
    assert_eq!(
        refused.stderr,
        "error: Missing or unknown API key (HTTP 401): send `Authorization: Bearer <api key>`\n  \
         hint: pass --api-key or set COMFYQ_API_KEY\n"
    );
    assert_eq!(refused.stdout, "");

    // Validation problems: every pointer on its own line.
    let bad = write_json(
        dir.path(),
        "bad.json",
        &json!({"workflow": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}),
    );
    let invalid = run(&["submit", &bad]).await;
    assert_eq!(invalid.status, ExitStatus::Refused, "{invalid:#?}");
    assert!(
        invalid.stderr.starts_with(
            "error: Invalid request (HTTP 422)\n  /workflow/1/class_type: node type \"NoSuchNode\""
        ),
        "{invalid:#?}"
    );
    let bad_priority = write_json(
        dir.path(),
        "priority.json",
        &json!({"workflow": invert_workflow(8), "priority": "urgent"}),
    );
    let invalid = run(&["submit", &bad_priority]).await;
    assert!(invalid.stderr.contains("  /priority: "), "{invalid:#?}");

    // Unknown job: 404, exit 4; a retry of a completed job: 409, exit 3.
    let missing = run(&["job", &uuid::Uuid::now_v7().to_string()]).await;
    assert_eq!(missing.status, ExitStatus::NotFound, "{missing:#?}");
    assert_eq!(
        missing.stderr,
        "error: Not found (HTTP 404): job not found\n"
    );
    let done = run(&["submit", &workflow, "--wait"]).await;
    assert_eq!(done.status, ExitStatus::Success, "{done:#?}");
    let done_id = done
        .stdout
        .split_whitespace()
        .nth(1)
        .expect("id")
        .to_owned();
    let conflict = run(&["retry", &done_id]).await;
    assert_eq!(conflict.status, ExitStatus::Refused, "{conflict:#?}");
    assert!(
        conflict.stderr.starts_with("error: Conflict (HTTP 409): "),
        "{conflict:#?}"
    );

    // Local mistakes never reach the server: exit 2.
    let usage = |run: &Run, needle: &str| {
        assert_eq!(run.status, ExitStatus::Usage, "{run:#?}");
        assert!(run.stderr.contains(needle), "no {needle:?} in {run:#?}");
    };
    usage(&run(&["job", "../etc/passwd"]).await, "is not a job id");
    usage(
        &run(&["submit", "/no/such/workflow.json"]).await,
        "cannot read /no/such/workflow.json",
    );
    let ui = write_json(dir.path(), "ui.json", &json!({"nodes": [], "links": []}));
    usage(&run(&["submit", &ui]).await, "export it in API format");
    let not_json = dir.path().join("broken.json");
    std::fs::write(&not_json, "{").expect("write");
    usage(
        &run(&["submit", &not_json.display().to_string()]).await,
        "is not valid JSON",
    );
    usage(
        &run(&["submit", &workflow, "--input", "photo.png"]).await,
        "expected NAME=PATH or NAME=URL",
    );
    usage(
        &run(&["submit", &workflow, "--input", "photo.png=/no/such.png"]).await,
        "no such file",
    );
    usage(
        &run(&["submit", &workflow, "--priority", "urgent"]).await,
        "invalid value 'urgent'",
    );
    usage(&run(&["frobnicate"]).await, "unrecognized subcommand");
    let bad_url = comfyq("ftp://x", API_KEY, &["jobs"]).await;
    usage(&bad_url, "is not an http(s) URL");

    // --help lists the exit codes, on stdout, exit 0.
    let help = run(&["--help"]).await;
    assert_eq!(help.status, ExitStatus::Success, "{help:#?}");
    assert!(
        help.stdout.contains("Exit codes:") && help.stdout.contains("4  not found"),
        "{help:#?}"
    );

    stack.stop().await;
}

#[tokio::test]
async fn an_unreachable_server_is_named_with_what_to_do() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    drop(listener);
    let run = comfyq(&url, stack::API_KEY, &["queue"]).await;
    assert_eq!(run.status, ExitStatus::Server, "{run:#?}");
    assert!(
        run.stderr
            .starts_with(&format!("error: cannot reach the comfyq API at {url}: ")),
        "{run:#?}"
    );
    assert!(run.stderr.contains("Connection refused"), "{run:#?}");
    assert!(run.stderr.contains("comfyq up --sim"), "{run:#?}");
    assert_eq!(run.stdout, "");
}
