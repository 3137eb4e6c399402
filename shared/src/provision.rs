//! Idempotent creation of every stream, bucket and consumer comfyq needs.
//! Safe to run from every service at start and against an existing
//! deployment: each call creates what is missing and updates what changed.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store, stream};

use crate::config::{DispatchPriorityPolicy, NatsConfig};
use crate::ids::PoolName;
use crate::names::Names;

#[derive(Debug, thiserror::Error)]
#[error("provisioning {what} failed: {source}")]
pub struct ProvisionError {
    what: String,
    #[source]
    source: async_nats::Error,
}

fn failed(what: impl Into<String>) -> impl FnOnce(async_nats::Error) -> ProvisionError {
    let what = what.into();
    move |source| ProvisionError { what, source }
}

/// Handles to everything shared by the services.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // async-nats' ObjectStore has no Debug
pub struct Provisioned {
    pub jobs: kv::Store,
    pub scheduler: kv::Store,
    pub runners: kv::Store,
    pub idempotency: kv::Store,
    pub webhooks: kv::Store,
    pub dead_letters: kv::Store,
    pub media: object_store::ObjectStore,
}

/// Creates or updates all streams and buckets.
pub async fn provision(
    js: &jetstream::Context,
    names: &Names,
    config: &NatsConfig,
) -> Result<Provisioned, ProvisionError> {
    let replicas = config.replicas;
    let stream_configs = [
        stream::Config {
            name: names.jobs_stream(),
            description: Some(
                "comfyq: submissions, cancellations and runner reports for the scheduler"
                    .to_owned(),
            ),
            subjects: names.jobs_stream_subjects(),
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: Duration::from_secs(120),
            max_age: config.jobs_max_age,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: names.dispatch_stream(),
            description: Some(
                "comfyq: work for runners, one subject per pool and priority".to_owned(),
            ),
            subjects: names.dispatch_stream_subjects(),
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: Duration::from_secs(120),
            max_age: config.jobs_max_age,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: names.pending_stream(),
            description: Some(
                "comfyq: jobs held by the scheduler until a runner slot frees".to_owned(),
            ),
            subjects: names.pending_stream_subjects(),
            // Limits, not work-queue: the dispatcher reads it with an ordered
            // consumer (no acks) and deletes each job once dispatched.
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: Duration::from_secs(120),
            max_age: config.jobs_max_age,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: names.advisories_stream(),
            description: Some(
                "comfyq: max-deliveries advisories of the dispatch stream".to_owned(),
            ),
            subjects: names.advisories_stream_subjects(),
            retention: stream::RetentionPolicy::WorkQueue,
            max_age: config.jobs_max_age,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: names.webhooks_stream(),
            description: Some("comfyq: webhook redelivery requests for the notifier".to_owned()),
            subjects: names.webhooks_stream_subjects(),
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: Duration::from_secs(120),
            max_age: config.events_max_age,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: names.events_stream(),
            description: Some("comfyq: every job event".to_owned()),
            subjects: names.events_stream_subjects(),
            retention: stream::RetentionPolicy::Limits,
            max_age: config.events_max_age,
            allow_direct: true,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: names.previews_stream(),
            description: Some("comfyq: latest preview image per job".to_owned()),
            subjects: names.previews_stream_subjects(),
            retention: stream::RetentionPolicy::Limits,
            max_messages_per_subject: 1,
            max_age: Duration::from_secs(3600),
            storage: stream::StorageType::Memory,
            allow_direct: true,
            num_replicas: replicas,
            ..Default::default()
        },
    ];
    for config in stream_configs {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|e| failed(format!("stream {name}"))(e.into()))?;
    }

    // Every bucket keeps the latest value per key only; `None` means no age limit.
    let bucket = |name: String, description: &str, max_age: Option<Duration>| kv::Config {
        bucket: name,
        description: description.to_owned(),
        history: 1,
        max_age: max_age.unwrap_or_default(),
        num_replicas: replicas,
        ..Default::default()
    };
    let jobs = ensure_kv(
        js,
        bucket(
            names.jobs_bucket(),
            "comfyq: job records",
            Some(config.jobs_max_age),
        ),
    )
    .await?;
    let runners = ensure_kv(
        js,
        bucket(
            names.runners_bucket(),
            "comfyq: runner registrations (expire without heartbeat)",
            Some(config.runner_ttl),
        ),
    )
    .await?;
    let scheduler = ensure_kv(
        js,
        bucket(
            names.scheduler_bucket(),
            "comfyq: scheduler coordination (dispatcher lease)",
            None,
        ),
    )
    .await?;
    let idempotency = ensure_kv(
        js,
        bucket(
            names.idempotency_bucket(),
            "comfyq: idempotency keys",
            Some(Duration::from_secs(24 * 3600)),
        ),
    )
    .await?;
    let webhooks = ensure_kv(
        js,
        bucket(
            names.webhooks_bucket(),
            "comfyq: webhook deliveries and their attempts",
            Some(config.jobs_max_age),
        ),
    )
    .await?;
    let dead_letters = ensure_kv(
        js,
        bucket(
            names.dead_letters_bucket(),
            "comfyq: jobs whose attempts ran out, with their specs, for requeueing",
            Some(config.jobs_max_age),
        ),
    )
    .await?;

    let media =
        ensure_object_store(js, &names.media_bucket(), config.media_max_age, replicas).await?;
    Ok(Provisioned {
        jobs,
        scheduler,
        runners,
        idempotency,
        webhooks,
        dead_letters,
        media,
    })
}

async fn ensure_kv(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, ProvisionError> {
    let bucket = config.bucket.clone();
    js.create_or_update_key_value(config)
        .await
        .map_err(|e| failed(format!("KV bucket {bucket}"))(e.into()))
}

/// The object store's backing stream is created with the same settings
/// async-nats uses, but through create-or-update so a changed age limit is
/// applied to an existing deployment.
pub async fn ensure_object_store(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<object_store::ObjectStore, ProvisionError> {
    js.create_or_update_stream(stream::Config {
        name: format!("OBJ_{bucket}"),
        description: Some("comfyq: job inputs and outputs".to_owned()),
        subjects: vec![format!("$O.{bucket}.C.>"), format!("$O.{bucket}.M.>")],
        max_age,
        num_replicas: replicas,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .map_err(|e| failed(format!("object store {bucket}"))(e.into()))?;
    js.get_object_store(bucket)
        .await
        .map_err(|e| failed(format!("object store {bucket}"))(e.into()))
}

/// A durable pull consumer with the given filter; created or updated.
pub async fn ensure_pull_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    config: consumer::pull::Config,
) -> Result<consumer::PullConsumer, ProvisionError> {
    let name = config.durable_name.clone().unwrap_or_default();
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| failed(format!("stream {stream_name}"))(e.into()))?;
    let what = || format!("consumer {name} on {stream_name}");
    match stream.create_consumer(config.clone()).await {
        Ok(consumer) => Ok(consumer),
        // An existing consumer with different settings: bring it up to date.
        Err(_) => stream
            .update_consumer(config)
            .await
            .map_err(|e| failed(what())(e.into())),
    }
}

/// Waiting pull requests one dispatch consumer accepts: every idle runner
/// of a pool keeps one waiting (the server's default is 512; the value
/// cannot be changed on an existing consumer).
const DISPATCH_MAX_WAITING: i64 = 10_000;

/// The dispatch consumer shared by every runner of `pool`. The per-priority
/// consumers of earlier versions are deleted first: their filters overlap
/// this one's, which a work-queue stream refuses (their runners must be
/// stopped before the upgrade; messages they held are delivered again).
pub async fn ensure_dispatch_consumer(
    js: &jetstream::Context,
    names: &Names,
    config: &NatsConfig,
    pool: &PoolName,
) -> Result<consumer::PullConsumer, ProvisionError> {
    let stream_name = names.dispatch_stream();
    let stream = js
        .get_stream(&stream_name)
        .await
        .map_err(|e| failed(format!("stream {stream_name}"))(e.into()))?;
    for legacy in names.legacy_dispatch_consumers(pool) {
        match stream.delete_consumer(&legacy).await {
            Ok(_) => tracing::info!(consumer = %legacy, "deleted a per-priority dispatch consumer"),
            Err(error)
                if matches!(
                    error.kind(),
                    jetstream::stream::ConsumerErrorKind::JetStream(ref e)
                        if e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
                ) => {}
            Err(error) => return Err(failed(format!("consumer {legacy}"))(error.into())),
        }
    }
    let (priority_policy, priority_groups) = match config.dispatch_priority_policy {
        DispatchPriorityPolicy::None => (consumer::PriorityPolicy::None, Vec::new()),
        DispatchPriorityPolicy::Overflow => (
            consumer::PriorityPolicy::Overflow,
            vec![names.dispatch_priority_group()],
        ),
        DispatchPriorityPolicy::Prioritized => (
            consumer::PriorityPolicy::Prioritized,
            vec![names.dispatch_priority_group()],
        ),
    };
    ensure_pull_consumer(
        js,
        &stream_name,
        consumer::pull::Config {
            durable_name: Some(names.dispatch_consumer(pool)),
            description: Some(format!("comfyq runners of pool {pool}")),
            filter_subject: names.dispatch_pool_filter(pool),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.dispatch_ack_wait,
            max_deliver: config.dispatch_max_deliver,
            max_ack_pending: 10_000,
            max_waiting: DISPATCH_MAX_WAITING,
            num_replicas: config.replicas,
            priority_policy,
            priority_groups,
            ..Default::default()
        },
    )
    .await
}
