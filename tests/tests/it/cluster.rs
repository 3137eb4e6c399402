//! comfyq on a 3-node JetStream cluster (every stream R3) and under NATS
//! faults, each under a steady load (50 short jobs/s, mixed priorities, two
//! tenants, webhooks on): the meta leader and then the job records' stream
//! leader killed, a node frozen, all nodes killed at once, a single server
//! restarted. Each ends with the same checks (`fault_load::verify`: every
//! accepted job completed, none lost, no attempt executed twice, one
//! `webhook-id` per event, events replayable) and prints the longest submit
//! stall and the recovery time (`cargo nextest run … --no-capture`). These
//! are the short forms; `comfyq-loadtest chaos` runs the long one.

use std::time::{Duration, Instant};

use comfyq_tests::fault_load::{FaultLoad, LoadOutcome, Verdict, verify};
use comfyq_tests::stack::invert_workflow;
use comfyq_tests::{ClusterOptions, NatsCluster, StackOptions, TestStack};
use serde_json::json;

/// Jobs per second of every fault test (the floor).
const RATE: u32 = 50;

/// How long every accepted job may take to finish after the load stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

fn options(cluster: Option<ClusterOptions>) -> StackOptions {
    StackOptions {
        cluster,
        runners: 2,
        runner_slots: 8,
        // 50 jobs/s of two tenants: beyond the default per-tenant rate.
        configure_ingress: Some(|ingress| ingress.rate_limit_per_s = 0),
        ..StackOptions::default()
    }
}

async fn cluster_stack(sync_always: bool) -> TestStack {
    TestStack::start_with(options(Some(ClusterOptions {
        nodes: 3,
        sync_always,
    })))
    .await
}

async fn js(stack: &TestStack) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(stack.nats.client().await)
}

fn report(fault: &str, outcome: &LoadOutcome, verdict: &Verdict, recovered_in: Duration) {
    eprintln!(
        "fault: {fault}: accepted {} completed {} lost {} duplicated {} retried jobs {} \
         retried submits {} | longest submit stall {:?} (at {:?}) | recovered in {:?} | \
         drained in {:?}",
        verdict.accepted,
        verdict.completed,
        verdict.lost.len(),
        verdict.duplicated.len(),
        verdict.retried,
        outcome.retried,
        outcome.longest_submit_stall,
        outcome.longest_stall_at,
        recovered_in,
        verdict.drained_in,
    );
}

/// Waits until the cluster is healthy again: the recovery time of a fault.
async fn healthy(cluster: &NatsCluster, since: Instant) -> Duration {
    cluster
        .wait_healthy()
        .await
        .unwrap_or_else(|e| panic!("the cluster did not recover: {e}"));
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_node_cluster_runs_jobs_with_every_stream_replicated() {
    let stack = cluster_stack(false).await;
    let js = js(&stack).await;
    let names = stack.nats_config().names().expect("valid prefix");
    for stream in [
        names.events_stream(),
        names.pending_stream(),
        names.dispatch_stream(),
        names.webhooks_stream(),
    ] {
        let mut handle = js.get_stream(&stream).await.expect("stream exists");
        let info = handle.info().await.expect("stream info");
        assert_eq!(info.config.num_replicas, 3, "{stream}");
        let cluster = info.cluster.as_ref().expect("clustered stream");
        assert!(cluster.leader.is_some(), "{stream} has a leader");
        assert_eq!(cluster.replicas.len(), 2, "{stream}: two followers");
    }
    let job = stack
        .submit(
            json!({"workflow": invert_workflow(8), "webhook": {"url": stack.webhooks.url("/one")}}),
        )
        .await;
    let id = job["id"].as_str().expect("job id");
    let done = stack.wait_finished(id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "completed", "{done}");
    stack.webhooks.wait_for(1, Duration::from_secs(30)).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]

async fn killing_the_meta_leader_then_the_records_leader_under_load_loses_nothing() {
    let mut stack = cluster_stack(false).await;
    let js = js(&stack).await;
    let records = stack
        .nats_config()
        .names()
        .expect("valid prefix")
        .events_stream();
    let load = FaultLoad::start(&stack, RATE);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let meta = stack.nats.meta_leader().await.expect("a meta leader");
    let fault = Instant::now();
    stack.nats.node_mut(&meta).stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.nats.node_mut(&meta).restart().await;
    let meta_recovered = healthy(&stack.nats, fault).await;

    let leader = stack
        .nats
        .stream_leader(&js, &records)
        .await
        .expect("the records stream has a leader");
    let fault = Instant::now();
    stack.nats.node_mut(&leader).stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.nats.node_mut(&leader).restart().await;
    let records_recovered = healthy(&stack.nats, fault).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let outcome = load.finish().await;
    let verdict = verify(&stack, &outcome, DRAIN_TIMEOUT).await;
    report(
        &format!(
            "kill -9 meta leader {meta} (recovered in {meta_recovered:?}), then records leader {leader}"
        ),
        &outcome,
        &verdict,
        records_recovered,
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]

async fn a_node_frozen_for_20_s_loses_nothing() {
    let stack = cluster_stack(false).await;
    let load = FaultLoad::start(&stack, RATE);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The meta leader: the node whose silence costs most.
    let frozen = stack.nats.meta_leader().await.expect("a meta leader");
    let node = stack
        .nats
        .nodes
        .iter()
        .find(|node| node.name() == frozen)
        .expect("the leader is a node");
    let fault = Instant::now();
    node.freeze();
    tokio::time::sleep(Duration::from_secs(20)).await;
    node.thaw();
    let recovered = healthy(&stack.nats, fault).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcome = load.finish().await;
    let verdict = verify(&stack, &outcome, DRAIN_TIMEOUT).await;
    report(
        &format!("SIGSTOP {frozen} for 20 s"),
        &outcome,
        &verdict,
        recovered,
    );
    stack.stop().await;
}

/// Kills every NATS node of `stack` under load, restarts them, and checks
/// the suite's promises.
async fn restart_every_node_under_load(mut stack: TestStack, fault: &str) {
    let load = FaultLoad::start(&stack, RATE);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    stack.nats.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.nats.restart().await;
    let recovered = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcome = load.finish().await;
    let verdict = verify(&stack, &outcome, DRAIN_TIMEOUT).await;
    report(fault, &outcome, &verdict, recovered);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_three_nodes_killed_at_once_lose_nothing_acknowledged() {
    // sync_interval: always, so an acknowledged write is on disk on a quorum
    // before the ack: a crash of every node at once loses none of it.
    let stack = cluster_stack(true).await;
    restart_every_node_under_load(stack, "kill -9 all three nodes, restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_server_restarted_under_load_loses_nothing() {
    let stack = TestStack::start_with(options(None)).await;
    restart_every_node_under_load(stack, "single server kill -9, restart").await;
}
