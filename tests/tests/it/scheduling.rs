//! The scheduler's decisions against the real stack: decide-late priority,
//! tenant fairness and limits, capability waits and queue timeouts, two
//! schedulers with one killed, and a restart with 1,000 jobs pending.

use std::collections::BTreeMap;
use std::time::Duration;

use comfyq_scheduler::SchedulerConfig;
use comfyq_scheduler::config::TenantLimits;
use comfyq_shared::job::{JobRecord, WAITING_FOR_CAPABILITY};
use comfyq_shared::{JobId, TenantId};
use comfyq_tests::stack::{OTHER_API_KEY, OTHER_TENANT, TENANT, invert_workflow, slow_workflow};
use comfyq_tests::{IsolatedScheduler, StackOptions, TestStack, eventually, eventually_true};
use serde_json::{Value, json};

fn id_of(job: &Value) -> String {
    job["id"].as_str().expect("job id").to_owned()
}

async fn record(stack: &TestStack, tenant: &str, id: &str) -> JobRecord {
    let store = stack.job_store().await;
    let tenant = TenantId::new(tenant).expect("tenant");
    let job: JobId = id.parse().expect("job id");
    store
        .get(&tenant, &job)
        .await
        .expect("record readable")
        .expect("record exists")
        .record
}

async fn wait_running(stack: &TestStack, id: &str) {
    eventually(Duration::from_secs(10), "the job is running", async || {
        stack.assert_services_alive();
        (stack.job(id).await["status"] == "running").then_some(())
    })
    .await;
}

/// Records of finished jobs of one tenant, in the order given.
async fn finished(stack: &TestStack, tenant: &str, ids: &[String]) -> Vec<JobRecord> {
    let mut records = Vec::new();
    for id in ids {
        stack.wait_finished(id, Duration::from_secs(60)).await;
        records.push(record(stack, tenant, id).await);
    }
    records
}

async fn pending_backlog(stack: &TestStack) -> u64 {
    stack.pending_backlog().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_job_overtakes_queued_low_ones() {
    let stack = TestStack::start().await; // one runner, one slot
    let blocker = id_of(
        &stack
            .submit(json!({"workflow": slow_workflow(10, 50, "blocker")}))
            .await,
    );
    wait_running(&stack, &blocker).await;
    let mut lows = Vec::new();
    for _ in 0..10 {
        let job = stack
            .submit(json!({"workflow": invert_workflow(8), "priority": "low"}))
            .await;
        lows.push(id_of(&job));
    }
    let high = id_of(
        &stack
            .submit(json!({"workflow": invert_workflow(8), "priority": "high"}))
            .await,
    );
    // Decide late: the queued jobs wait in PENDING, not in the runners' queue.
    eventually_true(Duration::from_secs(5), "all queued", async || {
        pending_backlog(&stack).await == 11
    })
    .await;
    assert_eq!(
        stack.dispatch_backlog().await,
        1,
        "only the blocker is dispatched"
    );

    let high = finished(&stack, TENANT, &[high]).await.remove(0);
    let lows = finished(&stack, TENANT, &lows).await;
    let high_start = high.started_at.expect("high started");
    for low in &lows {
        assert!(high_start < low.started_at.expect("low started"), "{low:?}");
    }
    // FIFO within a priority and tenant.
    let starts: Vec<_> = lows.iter().map(|r| r.started_at).collect();
    assert!(starts.windows(2).all(|w| w[0] < w[1]), "{starts:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_job_is_not_stuck_behind_a_backlog() {
    let stack = TestStack::start().await; // one runner, one slot
    let blocker = id_of(
        &stack
            .submit(json!({"workflow": slow_workflow(10, 50, "fair")}))
            .await,
    );
    wait_running(&stack, &blocker).await;
    let mut backlog = Vec::new();
    for _ in 0..6 {
        backlog.push(id_of(
            &stack.submit(json!({"workflow": invert_workflow(8)})).await,
        ));
    }
    let other = TestStack::client_for(OTHER_API_KEY)
        .post(format!("{}/v1/jobs", stack.api))
        .json(&json!({"workflow": invert_workflow(8)}))
        .send()
        .await
        .expect("POST as the other tenant");
    assert_eq!(other.status(), reqwest::StatusCode::ACCEPTED);
    let other: Value = other.json().await.expect("job JSON");
    let other = id_of(&other);

    let backlog = finished(&stack, TENANT, &backlog).await;
    eventually(
        Duration::from_secs(10),
        "other tenant's job done",
        async || {
            let r = record(&stack, OTHER_TENANT, &other).await;
            r.status.is_terminal().then_some(())
        },
    )
    .await;
    let other = record(&stack, OTHER_TENANT, &other).await;
    let other_start = other.started_at.expect("started");
    // The backlog's tenant had a job in flight, the other none: the other
    // tenant's job takes the next free slot.
    for job in &backlog {
        assert!(other_start < job.started_at.expect("started"), "{job:?}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_limits_hold_jobs_back_and_reject_excess() {
    let mut options = StackOptions {
        runners: 2,
        ..StackOptions::default()
    };
    options.scheduler.tenants = BTreeMap::from([(
        TENANT.to_owned(),
        TenantLimits {
            max_running: Some(1),
            max_queued: Some(2),
        },
    )]);
    let stack = TestStack::start_with(options).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let job = stack
            .submit(json!({"workflow": slow_workflow(4, 50, &format!("limit-{n}"))}))
            .await;
        let id = id_of(&job);
        // One submission handled at a time: the quota is checked without a
        // lock, so concurrent ones may overshoot it (a known gap).
        eventually(Duration::from_secs(5), "submission handled", async || {
            (record(&stack, TENANT, &id).await.status != comfyq_shared::job::JobStatus::Accepted)
                .then_some(())
        })
        .await;
        ids.push(id);
    }
    let records = finished(&stack, TENANT, &ids).await;
    let rejected: Vec<_> = records
        .iter()
        .filter(|r| {
            r.error
                .as_ref()
                .is_some_and(|e| e.kind == comfyq_shared::ErrorKind::Rejected)
        })
        .collect();
    assert!(!rejected.is_empty(), "the queued limit rejected nothing");
    let mut ran: Vec<_> = records
        .iter()
        .filter(|r| r.status == comfyq_shared::job::JobStatus::Completed)
        .map(|r| {
            (
                r.started_at.expect("started"),
                r.finished_at.expect("finished"),
            )
        })
        .collect();
    assert_eq!(ran.len() + rejected.len(), 5, "{records:#?}");
    ran.sort();
    // Two free runners, but never two of this tenant's jobs at once.
    assert!(ran.windows(2).all(|w| w[0].1 <= w[1].0), "{ran:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_no_runner_can_run_waits_then_times_out() {
    let mut options = StackOptions::default();
    options.scheduler.max_queue_time = Duration::from_secs(2);
    // Ingress would refuse it outright; here the scheduler is to hold it.
    options.configure_ingress = Some(|ingress| ingress.reject_unrunnable = false);
    let stack = TestStack::start_with(options).await;
    let workflow = json!({
        "1": {"class_type": "NoSuchNode", "inputs": {}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    });
    let stuck = id_of(&stack.submit(json!({"workflow": workflow})).await);
    eventually(
        Duration::from_secs(5),
        "marked waiting_for_capability",
        async || {
            let r = record(&stack, TENANT, &stuck).await;
            (r.waiting_reason.as_deref() == Some(WAITING_FOR_CAPABILITY)).then_some(())
        },
    )
    .await;
    // The API shows why it waits, and the OpenAPI schema documents it.
    let view = stack.job(&stuck).await;
    assert_eq!(view["status"], "queued", "{view:#}");
    assert_eq!(view["waiting_reason"], WAITING_FOR_CAPABILITY, "{view:#}");
    let openapi: Value = stack
        .http
        .get(format!("{}/openapi.json", stack.api))
        .send()
        .await
        .expect("GET /openapi.json")
        .json()
        .await
        .expect("OpenAPI JSON");
    assert!(
        openapi["components"]["schemas"]["JobView"]["properties"]["waiting_reason"].is_object(),
        "waiting_reason in the JobView schema"
    );
    // It does not hold back work the pool can run.
    let fine = id_of(&stack.submit(json!({"workflow": invert_workflow(8)})).await);
    let fine = stack.wait_finished(&fine, Duration::from_secs(10)).await;
    assert_eq!(fine["status"], "completed", "{fine:#}");
    assert!(fine.get("waiting_reason").is_none(), "{fine:#}");

    let failed = stack.wait_finished(&stuck, Duration::from_secs(10)).await;
    assert_eq!(failed["status"], "failed", "{failed:#}");
    assert_eq!(failed["error"]["kind"], "timeout", "{failed:#}");
    assert!(failed["started_at"].is_null());
    assert_eq!(stack.sim.prompts_received().len(), 1);
    stack.stop().await;
}

fn isolated(stack: &TestStack, name: &str) -> IsolatedScheduler {
    IsolatedScheduler::start(SchedulerConfig {
        instance_id: Some(name.to_owned()),
        ..stack.scheduler.clone()
    })
}

async fn lease_holder(stack: &TestStack) -> Option<String> {
    let names = stack.nats_config().names().expect("names");
    let js = async_nats::jetstream::new(stack.nats.client().await);
    let kv = js.get_key_value(names.scheduler_bucket()).await.ok()?;
    let value = kv.get(names.dispatcher_lease_key()).await.ok()??;
    Some(String::from_utf8_lossy(&value).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_and_the_active_one_killed_run_every_job_once() {
    let stack = TestStack::start_with(StackOptions {
        schedulers: 0,
        runner_slots: 2,
        ..StackOptions::default()
    })
    .await;
    let mut schedulers = BTreeMap::from([
        ("sched-a".to_owned(), isolated(&stack, "sched-a")),
        ("sched-b".to_owned(), isolated(&stack, "sched-b")),
    ]);
    let mut ids = Vec::new();
    for _ in 0..15 {
        ids.push(id_of(
            &stack.submit(json!({"workflow": invert_workflow(8)})).await,
        ));
    }
    let active = eventually(Duration::from_secs(10), "a dispatcher", async || {
        lease_holder(&stack).await
    })
    .await;
    schedulers
        .remove(&active)
        .expect("the holder is one of ours")
        .kill();
    let killed_at = std::time::Instant::now();
    for _ in 0..15 {
        ids.push(id_of(
            &stack.submit(json!({"workflow": invert_workflow(8)})).await,
        ));
    }
    let records = finished(&stack, TENANT, &ids).await;
    let took_over = killed_at.elapsed();
    for r in &records {
        assert_eq!(r.status, comfyq_shared::job::JobStatus::Completed, "{r:?}");
        assert_eq!(r.attempt, 1, "{r:?}");
    }
    assert_eq!(stack.sim.prompts_received().len(), 30, "every job ran once");
    let survivor = lease_holder(&stack).await.expect("a holder");
    assert_ne!(survivor, active);
    assert!(took_over < Duration::from_secs(20), "{took_over:?}");
    drop(schedulers);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_scheduler_loses_no_pending_job_and_keeps_order() {
    const JOBS: usize = 1000;
    let mut stack = TestStack::start_with(StackOptions {
        schedulers: 0,
        runners: 0,
        // 1,000 submissions in a burst: beyond the default per-tenant rate.
        configure_ingress: Some(|ingress| ingress.rate_limit_per_s = 0),
        ..StackOptions::default()
    })
    .await;
    let first = isolated(&stack, "sched-first");
    let mut ids = Vec::new();
    for _ in 0..JOBS {
        ids.push(id_of(
            &stack.submit(json!({"workflow": invert_workflow(8)})).await,
        ));
    }
    eventually_true(Duration::from_secs(30), "all pending", async || {
        pending_backlog(&stack).await == JOBS as u64
    })
    .await;
    first.kill();
    let second = isolated(&stack, "sched-second");
    stack.add_runner("late-runner", 1).await;

    let records = finished(&stack, TENANT, &ids).await;
    assert!(
        records
            .iter()
            .all(|r| r.status == comfyq_shared::job::JobStatus::Completed)
    );
    let starts: Vec<_> = records.iter().map(|r| r.started_at).collect();
    assert!(starts.windows(2).all(|w| w[0] < w[1]), "FIFO order kept");
    assert_eq!(stack.sim.prompts_received().len(), JOBS);
    drop(second);
    stack.stop().await;
}

async fn dead_letters(stack: &TestStack) -> Value {
    let response = stack
        .http
        .get(format!("{}/v1/dead-letters", stack.api))
        .send()
        .await
        .expect("GET /v1/dead-letters");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    response.json().await.expect("page JSON")
}

async fn retry(stack: &TestStack, id: &str) -> (reqwest::StatusCode, Value) {
    let response = stack
        .http
        .post(format!("{}/v1/jobs/{id}/retry", stack.api))
        .send()
        .await
        .expect("POST retry");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_attempts_make_a_dead_letter_that_an_operator_requeues() {
    let stack = TestStack::start().await; // one runner; 5 deliveries per dispatch
    let max = stack.nats_config().dispatch_max_deliver as usize;
    stack.sim.inject(comfy_sim::Failure::oom(), max);
    let id = id_of(&stack.submit(json!({"workflow": invert_workflow(8)})).await);
    let failed = stack.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(failed["status"], "failed", "{failed:#}");
    assert_eq!(failed["error"]["kind"], "out_of_memory", "{failed:#}");
    assert_eq!(failed["attempt"], max, "{failed:#}");

    let page = eventually(Duration::from_secs(10), "a dead letter", async || {
        let page = dead_letters(&stack).await;
        (page["dead_letters"].as_array()?.len() == 1).then_some(page)
    })
    .await;
    let letter = &page["dead_letters"][0];
    assert_eq!(letter["job_id"], id.as_str(), "{page:#}");
    assert_eq!(letter["attempts"], max, "{page:#}");
    assert_eq!(letter["retry_url"], format!("/v1/jobs/{id}/retry"));
    // Tenant-scoped: the other tenant sees none of it.
    let theirs: Value = TestStack::client_for(OTHER_API_KEY)
        .get(format!("{}/v1/dead-letters", stack.api))
        .send()
        .await
        .expect("GET as the other tenant")
        .json()
        .await
        .expect("page JSON");
    assert_eq!(theirs["dead_letters"], json!([]), "{theirs:#}");

    // Only failed jobs are retried; unknown ones are 404.
    let done = id_of(&stack.submit(json!({"workflow": invert_workflow(8)})).await);
    stack.wait_finished(&done, Duration::from_secs(10)).await;
    let (status, problem) = retry(&stack, &done).await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{problem:#}");
    let (status, _) = retry(&stack, &JobId::new().to_string()).await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);

    let (status, job) = retry(&stack, &id).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{job:#}");
    let job = eventually(
        Duration::from_secs(20),
        "the requeued job completes",
        async || {
            let job = stack.job(&id).await;
            (job["status"] == "completed").then_some(job)
        },
    )
    .await;
    assert_eq!(job["attempt"], max + 1, "attempts keep counting: {job:#}");
    assert_eq!(job["requeues"], 1, "{job:#}");
    assert_eq!(dead_letters(&stack).await["dead_letters"], json!([]));
    // Now completed: a second retry is refused.
    let (status, _) = retry(&stack, &id).await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT);
    let runs = stack.sim.prompts_received().len();
    assert_eq!(
        runs,
        max + 2,
        "five failed attempts, the retry, the other job"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_job_is_not_starved_by_a_steady_high_load() {
    let mut options = StackOptions {
        configure_ingress: Some(|ingress| ingress.rate_limit_per_s = 0),
        ..StackOptions::default()
    }; // one runner, one slot
    options.scheduler.ageing = Duration::from_secs(1);
    let stack = TestStack::start_with(options).await;
    let high = || json!({"workflow": slow_workflow(2, 60, "high"), "priority": "high"});
    let mut highs = Vec::new();
    for _ in 0..3 {
        highs.push(id_of(&stack.submit(high()).await));
    }
    let low = id_of(
        &stack
            .submit(json!({"workflow": invert_workflow(8), "priority": "low"}))
            .await,
    );
    // High jobs keep arriving faster than the one slot runs them, until the
    // low job is done: without ageing it would never start.
    let mut submitted = Vec::new();
    let keep_arriving = async {
        loop {
            submitted.push(id_of(&stack.submit(high()).await));
            tokio::time::sleep(Duration::from_millis(80)).await;
        }
    };
    tokio::select! {
        _ = keep_arriving => unreachable!("the load never ends"),
        done = stack.wait_finished(&low, Duration::from_secs(20)) => {
            assert_eq!(done["status"], "completed", "{done:#}");
        }
    }
    highs.extend(submitted);
    let low = record(&stack, TENANT, &low).await;
    let low_start = low.started_at.expect("low started");
    let mut overtaken = 0;
    for id in &highs {
        let high = record(&stack, TENANT, id).await;
        if high.created_at < low_start && high.started_at.is_none_or(|s| s > low_start) {
            overtaken += 1;
        }
    }
    assert!(
        overtaken >= 2,
        "the low job started while high jobs still waited (overtook {overtaken} of {})",
        highs.len()
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_runner_is_killed_completes_once_on_another_runner() {
    let mut stack = TestStack::start_with(StackOptions {
        runners: 0,
        ..StackOptions::default()
    })
    .await;
    let doomed = comfyq_tests::IsolatedRunner::start(comfyq_tests::stack::runner_config(
        &stack.nats_config(),
        &stack.sim.base_url(),
        "runner-doomed",
        1,
    ));
    let id = id_of(
        &stack
            .submit(json!({"workflow": slow_workflow(10, 100, "doomed")}))
            .await,
    );
    wait_running(&stack, &id).await;
    assert_eq!(stack.job(&id).await["runner"], "runner-doomed");
    stack.add_runner("runner-survivor", 1).await;
    doomed.kill();

    // The dead runner's heartbeats stop; after the ack deadline the
    // dispatch message is redelivered, to the runner still alive.
    let done = stack.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(done["runner"], "runner-survivor", "{done:#}");
    assert_eq!(done["attempt"], 2, "{done:#}");
    let r = record(&stack, TENANT, &id).await;
    let failed: Vec<&str> = r.failed_runners.iter().map(|r| r.as_str()).collect();
    assert_eq!(failed, ["runner-doomed"], "{r:?}");
    let completed = stack
        .state_events(&id)
        .await
        .iter()
        .filter(|e| e["type"] == "job.completed")
        .count();
    assert_eq!(completed, 1, "completed exactly once");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_prefers_another_free_runner() {
    let stack = TestStack::start_with(StackOptions {
        runners: 2,
        ..StackOptions::default()
    })
    .await;
    stack.sim.inject(comfy_sim::Failure::oom(), 1);
    let id = id_of(&stack.submit(json!({"workflow": invert_workflow(8)})).await);
    let done = stack.wait_finished(&id, Duration::from_secs(15)).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(done["attempt"], 2, "{done:#}");
    let r = record(&stack, TENANT, &id).await;
    assert_eq!(r.failed_runners.len(), 1, "{r:?}");
    assert_ne!(
        r.runner.as_ref(),
        Some(&r.failed_runners[0]),
        "the retry ran on the runner that had not failed: {r:?}"
    );
    stack.stop().await;
}

/// A checkpoint loader and a save, loading `ckpt`.
fn checkpoint_workflow(ckpt: &str) -> Value {
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "ckpt"}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_loading_a_model_no_runner_has_is_rejected_when_so_configured() {
    let mut options = StackOptions::default();
    options.scheduler.unroutable = comfyq_scheduler::config::Unroutable::Reject;
    // Ingress would refuse it with 422 (below); here the scheduler decides.
    options.configure_ingress = Some(|ingress| ingress.reject_unrunnable = false);
    let stack = TestStack::start_with(options).await;
    // The simulator lists checkpoints/sim.safetensors.
    let present = id_of(
        &stack
            .submit(json!({"workflow": checkpoint_workflow("sim.safetensors")}))
            .await,
    );
    let missing = id_of(
        &stack
            .submit(json!({"workflow": checkpoint_workflow("absent.safetensors")}))
            .await,
    );
    let done = stack.wait_finished(&present, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    let refused = stack.wait_finished(&missing, Duration::from_secs(10)).await;
    assert_eq!(refused["status"], "failed", "{refused:#}");
    assert_eq!(refused["error"]["kind"], "rejected", "{refused:#}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("checkpoints/absent.safetensors"),
        "{message}"
    );
    assert_eq!(stack.sim.prompts_received().len(), 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_refuses_a_job_no_registered_runner_can_run_and_says_why() {
    let stack = TestStack::start().await;
    let refusal = async |body: Value| {
        let response = stack
            .http
            .post(format!("{}/v1/jobs", stack.api))
            .json(&body)
            .send()
            .await
            .expect("POST /v1/jobs");
        assert_eq!(response.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
        let problem: Value = response.json().await.expect("problem JSON");
        problem["errors"][0].clone()
    };
    let model = refusal(json!({"workflow": checkpoint_workflow("absent.safetensors")})).await;
    assert_eq!(model["pointer"], "/workflow", "{model:#}");
    let message = model["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("lacks model checkpoints/absent.safetensors"),
        "{message}"
    );
    let label =
        refusal(json!({"workflow": invert_workflow(8), "runner_labels": {"gpu": "h100"}})).await;
    assert_eq!(label["pointer"], "/runner_labels", "{label:#}");
    let message = label["message"].as_str().unwrap_or_default();
    assert!(message.contains("lacks label gpu=h100"), "{message}");
    // What some runner can run is accepted.
    let fine = id_of(
        &stack
            .submit(json!({"workflow": checkpoint_workflow("sim.safetensors")}))
            .await,
    );
    let fine = stack.wait_finished(&fine, Duration::from_secs(10)).await;
    assert_eq!(fine["status"], "completed", "{fine:#}");
    assert!(stack.sim.prompts_received().len() == 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_requiring_a_label_run_only_on_runners_carrying_it() {
    let stack = TestStack::start_with(StackOptions {
        runners: 2,
        runner_tweak: Some(comfyq_tests::RunnerTweak::new(|config| {
            if config.runner_id.as_deref() == Some("runner-1") {
                config.labels.insert("gpu".to_owned(), "a100".to_owned());
            }
        })),
        // The h100 job is for the scheduler to hold (ingress would refuse it).
        configure_ingress: Some(|ingress| ingress.reject_unrunnable = false),
        ..StackOptions::default()
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(id_of(
            &stack
                .submit(json!({"workflow": invert_workflow(8), "runner_labels": {"gpu": "a100"}}))
                .await,
        ));
    }
    let h100 = id_of(
        &stack
            .submit(json!({"workflow": invert_workflow(8), "runner_labels": {"gpu": "h100"}}))
            .await,
    );
    for id in &ids {
        let done = stack.wait_finished(id, Duration::from_secs(20)).await;
        assert_eq!(done["status"], "completed", "{done:#}");
        assert_eq!(done["runner"], "runner-1", "{done:#}");
    }
    let waiting = eventually(Duration::from_secs(5), "the h100 job waits", async || {
        let job = stack.job(&h100).await;
        (job["waiting_reason"] == WAITING_FOR_CAPABILITY).then_some(job)
    })
    .await;
    assert_eq!(waiting["status"], "queued", "{waiting:#}");
    // Bad labels are a 422 problem.
    let bad = stack
        .http
        .post(format!("{}/v1/jobs", stack.api))
        .json(&json!({"workflow": invert_workflow(8), "runner_labels": {"gpu": ""}}))
        .send()
        .await
        .expect("POST");
    assert_eq!(bad.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_runner_works_only_while_a_backlog_builds() {
    let stack = TestStack::start_with(StackOptions {
        runners: 2,
        configure_ingress: Some(|ingress| ingress.rate_limit_per_s = 0),
        runner_tweak: Some(comfyq_tests::RunnerTweak::new(|config| {
            config.nats.dispatch_priority_policy =
                comfyq_shared::config::DispatchPriorityPolicy::Overflow;
            if config.runner_id.as_deref() == Some("runner-1") {
                config.burst_min_pending = Some(2);
            }
        })),
        ..StackOptions::default()
    })
    .await;
    // A short queue: one job at a time, all on the regular runner.
    for _ in 0..4 {
        let id = id_of(&stack.submit(json!({"workflow": invert_workflow(8)})).await);
        let done = stack.wait_finished(&id, Duration::from_secs(10)).await;
        assert_eq!(done["status"], "completed", "{done:#}");
        assert_eq!(
            done["runner"], "runner-0",
            "the burst runner stays idle: {done:#}"
        );
    }
    // A backlog: the burst runner joins in.
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(id_of(
            &stack
                .submit(json!({"workflow": slow_workflow(3, 40, &format!("burst-{n}"))}))
                .await,
        ));
    }
    let records = finished(&stack, TENANT, &ids).await;
    let on_burst = records
        .iter()
        .filter(|r| r.runner.as_ref().is_some_and(|r| r.as_str() == "runner-1"))
        .count();
    assert!(
        records
            .iter()
            .all(|r| r.status == comfyq_shared::job::JobStatus::Completed),
        "{records:#?}"
    );
    assert!(on_burst >= 1, "the burst runner took none of the backlog");
    assert!(on_burst < records.len(), "the regular runner took none");
    stack.stop().await;
}

/// Pull requests waiting on the pool's dispatch consumer.
async fn waiting_pulls(stack: &TestStack) -> usize {
    let names = stack.nats_config().names().expect("names");
    let js = async_nats::jetstream::new(stack.nats.client().await);
    let pool = comfyq_shared::PoolName::new("default").expect("pool");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(names.dispatch_stream())
        .await
        .expect("dispatch stream")
        .get_consumer(&names.dispatch_consumer(&pool))
        .await
        .expect("dispatch consumer");
    consumer.info().await.expect("consumer info").num_waiting
}

async fn until_waiting_pulls(stack: &TestStack, n: usize) {
    eventually(
        Duration::from_secs(10),
        &format!("{n} pull requests wait"),
        async || (waiting_pulls(stack).await == n).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preferred_runner_takes_work_first_and_the_other_only_while_it_is_busy() {
    let stack = TestStack::start_with(StackOptions {
        runners: 2,
        sims: 2,
        configure_ingress: Some(|ingress| ingress.rate_limit_per_s = 0),
        runner_tweak: Some(comfyq_tests::RunnerTweak::new(|config| {
            config.nats.dispatch_priority_policy =
                comfyq_shared::config::DispatchPriorityPolicy::Prioritized;
            // runner-1 is preferred (0 is served first).
            config.dispatch_priority = Some(if config.runner_id.as_deref() == Some("runner-1") {
                0
            } else {
                7
            });
        })),
        ..StackOptions::default()
    })
    .await;
    // Both idle: every job goes to the preferred runner (without priorities
    // the server would alternate: a runner that just finished re-pulls last).
    for _ in 0..4 {
        until_waiting_pulls(&stack, 2).await;
        let id = id_of(&stack.submit(json!({"workflow": invert_workflow(8)})).await);
        let done = stack.wait_finished(&id, Duration::from_secs(10)).await;
        assert_eq!(done["status"], "completed", "{done:#}");
        assert_eq!(done["runner"], "runner-1", "{done:#}");
    }
    // The preferred runner busy (its one slot held, so no pull of its own
    // waits): the other one takes the next job.
    until_waiting_pulls(&stack, 2).await;
    let long = id_of(
        &stack
            .submit(json!({"workflow": slow_workflow(40, 100, "preferred-busy")}))
            .await,
    );
    wait_running(&stack, &long).await;
    until_waiting_pulls(&stack, 1).await;
    let next = id_of(&stack.submit(json!({"workflow": invert_workflow(8)})).await);
    let done = stack.wait_finished(&next, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(done["runner"], "runner-0", "{done:#}");
    assert_eq!(
        stack.job(&long).await["status"],
        "running",
        "the preferred runner was still busy"
    );
    let long = stack.wait_finished(&long, Duration::from_secs(20)).await;
    assert_eq!(long["runner"], "runner-1", "{long:#}");
    stack.stop().await;
}
