//! ComfyUI misbehaving and users changing their minds, against the real
//! stack: silent and dropped WebSockets, a crash mid-prompt, cancellation of
//! running and queued jobs, timeouts, several runners and graceful shutdown.

use std::time::Duration;

use comfy_sim::{DirKind, Failure, SimConfig};
use comfyq_tests::stack::{invert_workflow, slow_workflow};
use comfyq_tests::{StackOptions, TestStack, eventually, eventually_true};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// ComfyUI's own queue, as `GET /queue` reports it: (running, pending).
async fn comfy_queue(stack: &TestStack) -> Option<(usize, usize)> {
    let queue: Value = reqwest::get(format!("{}/queue", stack.sim.base_url()))
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

/// Output files ComfyUI wrote whose name starts with `comfyq/<prefix>`.
fn comfy_outputs(stack: &TestStack, prefix: &str) -> Vec<String> {
    stack
        .sim
        .files(DirKind::Output)
        .into_iter()
        .filter(|f| f.starts_with(&format!("comfyq/{prefix}")))
        .collect()
}

fn id_of(job: &Value) -> String {
    job["id"].as_str().expect("job id").to_owned()
}

async fn wait_running(stack: &TestStack, id: &str) {
    eventually(Duration::from_secs(10), "the job is running", async || {
        stack.assert_services_alive();
        (stack.job(id).await["status"] == "running").then_some(())
    })
    .await;
}

/// The `type`s of a job's state events, in order.
async fn state_types(stack: &TestStack, id: &str) -> Vec<String> {
    stack
        .state_events(id)
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn count(types: &[String], wanted: &str) -> usize {
    types.iter().filter(|t| *t == wanted).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_websocket_is_reconciled_through_history() {
    let stack = TestStack::start().await;
    stack.sim.inject(Failure::SilentWs, 1);
    let job = stack.submit(json!({"workflow": invert_workflow(8)})).await;
    let id = id_of(&job);
    let finished = stack.wait_finished(&id, Duration::from_secs(10)).await;
    assert_eq!(finished["status"], "completed", "{finished:#}");
    assert_eq!(
        finished["attempt"], 1,
        "reconciled, not retried: {finished:#}"
    );
    assert_eq!(finished["outputs"].as_array().map(Vec::len), Some(1));

    // The socket that went quiet must not poison the next job: one that runs
    // longer than the stall timeout (2 s) still completes at its first try.
    let next = stack
        .submit(json!({"workflow": slow_workflow(25, 100, "after-silence")}))
        .await;
    let next = stack
        .wait_finished(&id_of(&next), Duration::from_secs(10))
        .await;
    assert_eq!(next["status"], "completed", "{next:#}");
    assert_eq!(next["attempt"], 1, "{next:#}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_silent_on_a_fresh_socket_too_is_interrupted_as_stalled() {
    let stack = TestStack::start().await;
    // One eight-second step: ComfyUI says nothing while it runs. A new
    // socket hears only ComfyUI's replay of the running node, which is no
    // sign of progress, so the prompt is stalled after two stall timeouts.
    let job = stack
        .submit(json!({"workflow": slow_workflow(1, 8000, "hung")}))
        .await;
    let id = id_of(&job);
    eventually_true(Duration::from_secs(8), "a second attempt", async || {
        stack.job(&id).await["attempt"] == 2
    })
    .await;
    let events = stack.state_events(&id).await;
    let retrying = events
        .iter()
        .find(|e| e["type"] == "job.retrying")
        .unwrap_or_else(|| panic!("no job.retrying in {events:#?}"));
    assert_eq!(retrying["data"]["attempt"], 1);
    assert_eq!(retrying["data"]["error"]["kind"], "infrastructure");
    let message = retrying["data"]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("stalled"), "{message}");

    let (status, _) = stack.cancel(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let finished = stack.wait_finished(&id, Duration::from_secs(8)).await;
    assert_eq!(finished["status"], "cancelled", "{finished:#}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_websocket_mid_prompt_does_not_lose_the_job() {
    let stack = TestStack::start().await;
    stack.sim.inject(Failure::DropWs, 1);
    // The socket drops when the slow node starts; the prompt runs on for
    // about a second while the runner reconnects.
    let job = stack
        .submit(json!({"workflow": slow_workflow(10, 100, "dropped")}))
        .await;
    let id = id_of(&job);
    let finished = stack.wait_finished(&id, Duration::from_secs(10)).await;
    assert_eq!(finished["status"], "completed", "{finished:#}");
    assert_eq!(finished["attempt"], 1, "{finished:#}");
    assert_eq!(finished["outputs"].as_array().map(Vec::len), Some(1));
    assert_eq!(stack.sim.prompts_received().len(), 1, "no resubmission");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comfyui_crash_mid_prompt_is_retried_and_completes_once() {
    let stack = TestStack::start_with(StackOptions {
        sim: SimConfig {
            startup_delay_ms: 500,
            ..SimConfig::default()
        },
        ..StackOptions::default()
    })
    .await;
    stack.sim.inject(Failure::CrashMidPrompt, 1);
    let job = stack
        .submit(json!({
            "workflow": slow_workflow(3, 50, "crash"),
            "webhook": {"url": stack.webhooks.url("/crash")}
        }))
        .await;
    let id = id_of(&job);
    let finished = stack.wait_finished(&id, Duration::from_secs(10)).await;
    assert_eq!(finished["status"], "completed", "{finished:#}");
    assert_eq!(finished["attempt"], 2, "{finished:#}");
    assert_eq!(finished["outputs"].as_array().map(Vec::len), Some(1));
    assert!(finished["error"].is_null(), "{finished:#}");
    assert_eq!(stack.sim.prompts_received().len(), 2);

    let types = state_types(&stack, &id).await;
    assert_eq!(count(&types, "job.completed"), 1, "{types:?}");
    assert_eq!(count(&types, "job.retrying"), 1, "{types:?}");
    assert_eq!(count(&types, "job.failed"), 0, "{types:?}");
    let hooks = stack.webhooks.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(hooks.len(), 1, "one webhook for one ending");
    assert_eq!(hooks[0].json()["type"], "job.completed");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_interrupts_comfyui() {
    let stack = TestStack::start().await;
    // 100 steps of 100 ms: ten seconds unless interrupted.
    let job = stack
        .submit(json!({"workflow": slow_workflow(100, 100, "cancelled")}))
        .await;
    let id = id_of(&job);
    wait_running(&stack, &id).await;
    eventually_true(
        Duration::from_secs(5),
        "ComfyUI runs the prompt",
        async || comfy_queue(&stack).await == Some((1, 0)),
    )
    .await;

    let (status, body) = stack.cancel(&id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body:#}");
    // Asking twice changes nothing.
    let (status, _) = stack.cancel(&id).await;
    assert!(
        matches!(status, StatusCode::OK | StatusCode::ACCEPTED),
        "{status}"
    );

    let finished = stack.wait_finished(&id, Duration::from_secs(4)).await;
    assert_eq!(finished["status"], "cancelled", "{finished:#}");
    assert_eq!(finished["cancel_requested"], true);
    assert_eq!(finished["attempt"], 1);
    assert!(finished["outputs"].as_array().is_some_and(Vec::is_empty));
    // ComfyUI stopped the prompt well before its ten seconds.
    eventually_true(Duration::from_secs(3), "ComfyUI is idle", async || {
        comfy_queue(&stack).await == Some((0, 0))
    })
    .await;
    assert!(comfy_outputs(&stack, "cancelled").is_empty());

    // Cancelling an ended job answers it unchanged.
    let (status, again) = stack.cancel(&id).await;
    assert_eq!(status, StatusCode::OK, "{again:#}");
    assert_eq!(again["status"], "cancelled");
    assert_eq!(again["finished_at"], finished["finished_at"]);

    let types = state_types(&stack, &id).await;
    assert_eq!(count(&types, "job.cancelled"), 1, "{types:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_the_runner_did_not_hear_is_found_in_the_record() {
    let stack = TestStack::start().await;
    let job = stack
        .submit(json!({"workflow": slow_workflow(100, 100, "unheard")}))
        .await;
    let id = id_of(&job);
    wait_running(&stack, &id).await;

    // What the scheduler writes for a cancel, without its core-NATS nudge to
    // the runner (a message lost while the runner reconnects, say).
    let store = stack.job_store().await;
    let tenant = comfyq_shared::TenantId::new(comfyq_tests::stack::TENANT).expect("tenant");
    let job_id: comfyq_shared::JobId = id.parse().expect("job id");
    eventually(
        Duration::from_secs(5),
        "cancel_requested written",
        async || {
            let current = store.get(&tenant, &job_id).await.ok()??;
            let mut record = current.record;
            record.cancel_requested = true;
            store.update(&record, current.revision).await.ok()
        },
    )
    .await;

    let finished = stack.wait_finished(&id, Duration::from_secs(5)).await;
    assert_eq!(finished["status"], "cancelled", "{finished:#}");
    eventually_true(Duration::from_secs(3), "ComfyUI is idle", async || {
        comfy_queue(&stack).await == Some((0, 0))
    })
    .await;
    assert!(comfy_outputs(&stack, "unheard").is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_completed_job_changes_nothing() {
    let stack = TestStack::start().await;
    let job = stack.submit(json!({"workflow": invert_workflow(8)})).await;
    let id = id_of(&job);
    let finished = stack.wait_finished(&id, Duration::from_secs(10)).await;
    assert_eq!(finished["status"], "completed", "{finished:#}");

    let (status, answered) = stack.cancel(&id).await;
    assert_eq!(status, StatusCode::OK, "{answered:#}");
    assert_eq!(answered["status"], "completed");
    assert_eq!(answered["cancel_requested"], false);
    assert_eq!(answered["outputs"], finished["outputs"]);
    let after = stack.job(&id).await;
    assert_eq!(after["status"], "completed");
    assert_eq!(after["finished_at"], finished["finished_at"]);
    assert_eq!(after["outputs"], finished["outputs"]);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_cancelled_before_it_starts_never_reaches_comfyui() {
    let stack = TestStack::start().await; // one runner, one slot
    let first = stack
        .submit(json!({"workflow": slow_workflow(20, 100, "first")}))
        .await;
    let first = id_of(&first);
    wait_running(&stack, &first).await;

    let second = stack.submit(json!({"workflow": invert_workflow(8)})).await;
    let second = id_of(&second);
    eventually_true(Duration::from_secs(5), "the second job waits", async || {
        matches!(
            stack.job(&second).await["status"].as_str(),
            Some("queued" | "dispatched")
        )
    })
    .await;
    let (status, body) = stack.cancel(&second).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body:#}");
    let cancelled = stack.wait_finished(&second, Duration::from_secs(3)).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled:#}");
    assert!(cancelled["started_at"].is_null(), "{cancelled:#}");
    assert!(cancelled["runner"].is_null(), "{cancelled:#}");

    let done = stack.wait_finished(&first, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    // The runner took the cancelled job's dispatch message and dropped it.
    eventually_true(
        Duration::from_secs(5),
        "dispatch queue drained",
        async || stack.dispatch_backlog().await == 0,
    )
    .await;
    assert_eq!(
        stack.sim.prompts_received().len(),
        1,
        "ComfyUI saw only the first job"
    );
    let again = stack.job(&second).await;
    assert_eq!(again["status"], "cancelled");
    assert_eq!(again["finished_at"], cancelled["finished_at"]);
    let types = state_types(&stack, &second).await;
    assert_eq!(count(&types, "job.running"), 0, "{types:?}");
    assert_eq!(count(&types, "job.cancelled"), 1, "{types:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_time_limit_fails_without_retry() {
    let stack = TestStack::start().await;
    let job = stack
        .submit(json!({"workflow": slow_workflow(50, 100, "timeout"), "timeout_s": 1}))
        .await;
    let id = id_of(&job);
    let finished = stack.wait_finished(&id, Duration::from_secs(6)).await;
    assert_eq!(finished["status"], "failed", "{finished:#}");
    assert_eq!(finished["error"]["kind"], "timeout", "{finished:#}");
    assert_eq!(finished["attempt"], 1, "timeouts are not retried");
    // The prompt was stopped in ComfyUI, not left to run out.
    eventually_true(Duration::from_secs(3), "ComfyUI is idle", async || {
        comfy_queue(&stack).await == Some((0, 0))
    })
    .await;
    assert!(comfy_outputs(&stack, "timeout").is_empty());
    assert_eq!(stack.sim.prompts_received().len(), 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_share_the_work() {
    let stack = TestStack::start_with(StackOptions {
        runners: 2,
        ..StackOptions::default()
    })
    .await;
    let mut ids = Vec::new();
    for n in 0..6 {
        let job = stack
            .submit(json!({"workflow": slow_workflow(4, 50, &format!("shared-{n}"))}))
            .await;
        ids.push(id_of(&job));
    }
    let mut runners = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        let finished = stack.wait_finished(id, Duration::from_secs(15)).await;
        assert_eq!(finished["status"], "completed", "{finished:#}");
        assert_eq!(finished["attempt"], 1, "{finished:#}");
        let runner = finished["runner"].as_str().expect("runner").to_owned();
        *runners.entry(runner).or_default() += 1;
    }
    assert_eq!(
        runners.keys().map(String::as_str).collect::<Vec<_>>(),
        ["runner-0", "runner-1"],
        "{runners:?}"
    );
    assert_eq!(stack.sim.prompts_received().len(), 6);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_stack_lets_a_running_job_finish() {
    let mut stack = TestStack::start().await;
    let job = stack
        .submit(json!({"workflow": slow_workflow(10, 100, "graceful")}))
        .await;
    wait_running(&stack, &id_of(&job)).await;
    // Within the runner's shutdown grace (5 s) the prompt runs to its end
    // rather than being interrupted and handed back.
    stack.stop_services().await;
    assert_eq!(stack.sim.prompts_received().len(), 1);
    assert_eq!(comfy_outputs(&stack, "graceful").len(), 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_outlasting_the_shutdown_grace_is_handed_back() {
    let mut stack = TestStack::start_with(StackOptions {
        runner_shutdown_grace: Duration::from_millis(500),
        ..StackOptions::default()
    })
    .await;
    // Ten seconds of work: far beyond the grace.
    let job = stack
        .submit(json!({"workflow": slow_workflow(100, 100, "handed-back")}))
        .await;
    wait_running(&stack, &id_of(&job)).await;
    stack.stop_services().await;
    // The prompt was interrupted, and the job waits in the work queue for
    // the next runner instead of being lost or acknowledged.
    eventually_true(Duration::from_secs(3), "ComfyUI is idle", async || {
        comfy_queue(&stack).await == Some((0, 0))
    })
    .await;
    assert!(comfy_outputs(&stack, "handed-back").is_empty());
    assert_eq!(stack.dispatch_backlog().await, 1);
    stack.stop().await;
}

/// Ingress sends a job's `queued` without waiting for its ack; one flushed
/// late (after a reconnect) must not land on top of what the runner wrote
/// since, or the job reads `queued` for good although it ran to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_event_landing_after_the_job_moved_on_is_refused() {
    use comfyq_shared::job::JobStatus;
    use comfyq_shared::machine::{self, Input, Transition};
    use comfyq_shared::messages::SubmitJob;
    use comfyq_shared::{Event, EventKind, JobId, JobRecord, JobSpec, TenantId};

    let stack = TestStack::start().await;
    let store = stack.job_store().await;
    let names = stack.nats_config().names().expect("valid prefix");
    let spec = JobSpec {
        id: JobId::new(),
        tenant: TenantId::new(comfyq_tests::stack::TENANT).expect("tenant"),
        priority: Default::default(),
        pool: Default::default(),
        workflow: serde_json::from_value(invert_workflow(8)).expect("workflow"),
        inputs: vec![],
        webhook: None,
        metadata: None,
        timeout_s: 60,
        inline_outputs: false,
        runner_labels: Default::default(),
        every_progress_event: false,
        comfy: None,
        created_at: time::OffsetDateTime::now_utc(),
    };
    // What ingress stores of the job, with its `queued` not (yet) arrived.
    let pending = SubmitJob {
        v: comfyq_shared::job::SCHEMA_VERSION,
        spec: spec.clone(),
        attempt: 1,
        requeued_at: None,
    };
    store
        .publish_pending(&pending, &spec.id.to_string())
        .await
        .expect("pending message stored");
    let accepted = JobRecord::accepted(&spec);
    store
        .commit(std::slice::from_ref(&accepted), 0)
        .await
        .expect("accepted stored");

    let id = spec.id.to_string();
    let finished = stack.wait_finished(&id, Duration::from_secs(15)).await;
    assert_eq!(finished["status"], "completed", "{finished:#}");

    // Ingress's `queued` arrives now, as it sends it: guarding only its own
    // subject (no `queued` yet), no compare-and-set on the record.
    let Transition::Apply(queued) =
        machine::next(&accepted, &Input::Queue, time::OffsetDateTime::now_utc())
    else {
        panic!("an accepted job can be queued");
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let js = async_nats::jetstream::new(stack.nats.client().await);
    let late = js
        .publish_with_headers(
            names.event_subject(&spec.tenant, &spec.id, EventKind::State(JobStatus::Queued)),
            headers,
            serde_json::to_vec(&Event::for_state(&queued))
                .expect("event")
                .into(),
        )
        .await
        .expect("published")
        .await;
    assert!(late.is_err(), "the late queued event was stored: {late:?}");
    let record = store
        .get(&spec.tenant, &spec.id)
        .await
        .expect("record read")
        .expect("record exists");
    assert_eq!(record.record.status, JobStatus::Completed);
    assert_eq!(stack.job(&id).await["status"], "completed");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_the_media_store_refuses_for_a_while_is_stored_within_its_attempt() {
    let stack = TestStack::start().await;
    let names = stack.nats_config().names().expect("valid prefix");
    let js = async_nats::jetstream::new(stack.nats.client().await);
    let media_stream = format!("OBJ_{}", names.media_bucket());
    let set_max_msg_size = async |limit: i32| {
        let mut stream = js.get_stream(&media_stream).await.expect("media stream");
        let mut config = stream
            .info()
            .await
            .expect("media stream info")
            .config
            .clone();
        config.max_message_size = limit;
        js.update_stream(config)
            .await
            .expect("media stream updated");
    };

    let job = stack
        .submit(json!({"workflow": slow_workflow(10, 100, "refused")}))
        .await;
    let id = id_of(&job);
    wait_running(&stack, &id).await;
    // Every chunk of the output now fails to publish, as while NATS elects
    // a leader; the runner retries storing it without ending the attempt.
    set_max_msg_size(16).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let meanwhile = stack.job(&id).await;
    assert_eq!(meanwhile["status"], "running", "{meanwhile:#}");
    assert_eq!(meanwhile["attempt"], 1, "{meanwhile:#}");
    set_max_msg_size(-1).await;

    let finished = stack.wait_finished(&id, Duration::from_secs(20)).await;
    assert_eq!(finished["status"], "completed", "{finished:#}");
    assert_eq!(finished["attempt"], 1, "{finished:#}");
    assert_eq!(stack.sim.prompts_received().len(), 1, "the prompt ran once");
    let types = state_types(&stack, &id).await;
    assert_eq!(count(&types, "job.retrying"), 0, "{types:?}");
    stack.stop().await;
}
