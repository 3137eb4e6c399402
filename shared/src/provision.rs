//! Idempotent creation of every stream, bucket and consumer comfyq needs.
//! Safe to run from every service at start and against an existing
//! deployment: each call creates what is missing and updates what changed.
//! With least-privilege credentials only the admin identity (`comfyq
//! provision`) creates; the services run [`Provisioning::CheckOnly`]: they
//! look everything up and fail clearly when something is missing.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store, stream};

use crate::config::{DispatchPriorityPolicy, NatsConfig, Provisioning};
use crate::ids::PoolName;
use crate::names::Names;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("provisioning {what} failed: {source}")]
    Failed {
        what: String,
        #[source]
        source: async_nats::Error,
    },
    /// Check-only mode found something missing (or not readable by this identity).
    #[error(
        "{what} is missing or not visible to this NATS identity ({source}); this service only \
         checks (nats.provision = false): create everything first with `comfyq provision` \
         as the admin identity"
    )]
    Missing {
        what: String,
        #[source]
        source: async_nats::Error,
    },
}

fn failed(what: impl Into<String>) -> impl FnOnce(async_nats::Error) -> ProvisionError {
    let what = what.into();
    move |source| ProvisionError::Failed { what, source }
}

fn missing(what: impl Into<String>) -> impl FnOnce(async_nats::Error) -> ProvisionError {
    let what = what.into();
    move |source| ProvisionError::Missing { what, source }
}

/// Handles to everything shared by the services.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // async-nats' ObjectStore has no Debug
pub struct Provisioned {
    /// The events stream: job records (state events), live events,
    /// pending jobs, webhook work.
    pub events: stream::Stream,
    /// Jobs waiting for a runner slot.
    pub pending: stream::Stream,
    pub scheduler: kv::Store,
    /// Runners' load entries (expire without a heartbeat).
    pub runners: kv::Store,
    /// Runners' capability entries.
    pub capabilities: kv::Store,
    pub idempotency: kv::Store,
    pub webhooks: kv::Store,
    pub dead_letters: kv::Store,
    pub media: object_store::ObjectStore,
}

/// Attempts of [`provision`] when the server does not answer in time (or a
/// cluster node is not back yet).
const PROVISION_ATTEMPTS: u32 = 6;

/// Creates or updates all streams and buckets, or with
/// [`Provisioning::CheckOnly`] (`nats.provision = false`) only binds to them.
///
/// On a cluster, several services provisioning at once (or a meta leader
/// election) can leave a request unanswered though it took effect, and a
/// cluster just started (or a node restarting) has no room for a replica
/// until every peer is known; every step is idempotent, so such a round is
/// simply run again.
pub async fn provision(
    js: &jetstream::Context,
    names: &Names,
    config: &NatsConfig,
) -> Result<Provisioned, ProvisionError> {
    let mut backoff = Duration::from_millis(250);
    for attempt in 1.. {
        let round = match config.provisioning() {
            Provisioning::CreateOrUpdate => provision_once(js, names, config).await,
            Provisioning::CheckOnly => bind(js, names).await,
        };
        match round {
            Err(error) if attempt < PROVISION_ATTEMPTS && error.is_transient() => {
                tracing::warn!(attempt, %error, "provisioning did not go through; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            result => return result,
        }
    }
    unreachable!("the loop returns on its last attempt")
}

impl ProvisionError {
    fn is_transient(&self) -> bool {
        let (Self::Failed { source, .. } | Self::Missing { source, .. }) = self;
        // The whole chain: async-nats wraps the server's answer.
        let mut text = String::new();
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
        while let Some(error) = cause {
            text.push_str(&error.to_string());
            cause = error.source();
        }
        // A cluster electing leaders after a restart answers 503 or "stream
        // is offline"; one still learning its peers finds no room for
        // replicas.
        [
            "timed out",
            "no responders",
            "peer offline",
            "temporarily unavailable",
            "is offline",
            "no suitable peers",
            "insufficient resources",
        ]
        .iter()
        .any(|transient| text.contains(transient))
    }
}

/// Every stream, bucket and object store looked up, none changed.
async fn bind(js: &jetstream::Context, names: &Names) -> Result<Provisioned, ProvisionError> {
    for stream in [
        names.jobs_stream(),
        names.dispatch_stream(),
        names.advisories_stream(),
        names.webhooks_stream(),
        names.previews_stream(),
    ] {
        js.get_stream(&stream)
            .await
            .map_err(|e| missing(format!("stream {stream}"))(e.into()))?;
    }
    let kv = async |bucket: String| {
        js.get_key_value(&bucket)
            .await
            .map_err(|e| missing(format!("KV bucket {bucket}"))(e.into()))
    };
    let media = names.media_bucket();
    Ok(Provisioned {
        events: js
            .get_stream(names.events_stream())
            .await
            .map_err(|e| missing(format!("stream {}", names.events_stream()))(e.into()))?,
        pending: js
            .get_stream(names.pending_stream())
            .await
            .map_err(|e| missing(format!("stream {}", names.pending_stream()))(e.into()))?,
        scheduler: kv(names.scheduler_bucket()).await?,
        runners: kv(names.runners_bucket()).await?,
        capabilities: kv(names.capabilities_bucket()).await?,
        idempotency: kv(names.idempotency_bucket()).await?,
        webhooks: kv(names.webhooks_bucket()).await?,
        dead_letters: kv(names.dead_letters_bucket()).await?,
        media: js
            .get_object_store(&media)
            .await
            .map_err(|e| missing(format!("object store {media}"))(e.into()))?,
    })
}

async fn provision_once(
    js: &jetstream::Context,
    names: &Names,
    config: &NatsConfig,
) -> Result<Provisioned, ProvisionError> {
    let replicas = config.replicas;
    let stream_configs = [
        stream::Config {
            name: names.jobs_stream(),
            description: Some("comfyq: cancellations and requeues for the scheduler".to_owned()),
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
                "comfyq: jobs waiting for a runner slot (removed once dispatched)".to_owned(),
            ),
            subjects: names.pending_stream_subjects(),
            retention: stream::RetentionPolicy::WorkQueue,
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
            description: Some(
                "comfyq: job records (state events), live events, webhook work".to_owned(),
            ),
            subjects: names.events_stream_subjects(),
            retention: stream::RetentionPolicy::Limits,
            // State events are the records and live as long as jobs do; live
            // events carry a shorter per-message TTL (`events_max_age`).
            max_age: config.jobs_max_age.max(config.events_max_age),
            allow_direct: true,
            allow_atomic_publish: true,
            allow_message_ttl: true,
            duplicate_window: Duration::from_secs(120),
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
    migrate_pending(js, names).await?;
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
    let runners = ensure_kv(
        js,
        bucket(
            names.runners_bucket(),
            "comfyq: runners' load (expires without heartbeat)",
            Some(config.runner_ttl),
        ),
    )
    .await?;
    let capabilities = ensure_kv(
        js,
        bucket(
            names.capabilities_bucket(),
            "comfyq: runners' node types, models and labels (rewritten on change)",
            Some(CAPABILITIES_MAX_AGE),
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

    let media = ensure_object_store(
        js,
        Provisioning::CreateOrUpdate,
        &names.media_bucket(),
        config.media_max_age,
        replicas,
    )
    .await?;
    let events = js
        .get_stream(names.events_stream())
        .await
        .map_err(|e| failed("the events stream")(e.into()))?;
    let pending = js
        .get_stream(names.pending_stream())
        .await
        .map_err(|e| failed("the pending stream")(e.into()))?;
    Ok(Provisioned {
        events,
        pending,
        scheduler,
        runners,
        capabilities,
        idempotency,
        webhooks,
        dead_letters,
        media,
    })
}

/// How long a capability entry lives unless rewritten: runners rewrite
/// theirs well within it ([`CAPABILITIES_REFRESH`]); a crashed runner's entry
/// goes by itself (readers ignore one without a live load entry anyway).
pub const CAPABILITIES_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// How often a runner rewrites its unchanged capability entry.
pub const CAPABILITIES_REFRESH: Duration = Duration::from_secs(6 * 3600);

/// Versions before 0.2 kept waiting jobs in a limits stream of the same
/// name, whose retention cannot be changed in place: an empty one is
/// recreated as a work queue; one still holding jobs is refused (drain it
/// with the version that queued them).
async fn migrate_pending(js: &jetstream::Context, names: &Names) -> Result<(), ProvisionError> {
    let name = names.pending_stream();
    let mut stream = match js.get_stream(&name).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(());
        }
        Err(e) => return Err(failed(format!("stream {name}"))(e.into())),
    };
    let info = stream
        .info()
        .await
        .map_err(|e| failed(format!("stream {name}"))(e.into()))?;
    if info.config.retention == stream::RetentionPolicy::WorkQueue {
        return Ok(());
    }
    let held = info.state.messages;
    if held > 0 {
        return Err(failed(format!("stream {name}"))(
            format!(
                "it still holds {held} jobs queued by a version before 0.2; drain them with that version first"
            )
            .into(),
        ));
    }
    match js.delete_stream(&name).await {
        Ok(_) => {
            tracing::info!(stream = %name, "removed the empty limits-retention pending stream of an earlier version");
            Ok(())
        }
        // Another service removed it at the same moment.
        Err(e)
            if matches!(e.kind(), jetstream::context::DeleteStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            Ok(())
        }
        Err(e) => Err(failed(format!("stream {name}"))(e.into())),
    }
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
    provisioning: Provisioning,
    bucket: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<object_store::ObjectStore, ProvisionError> {
    if provisioning == Provisioning::CheckOnly {
        return js
            .get_object_store(bucket)
            .await
            .map_err(|e| missing(format!("object store {bucket}"))(e.into()));
    }
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

/// A durable pull consumer with the given filter; created or updated, or
/// with [`Provisioning::CheckOnly`] looked up (its settings are then the
/// admin's: `comfyq provision` applies them).
pub async fn ensure_pull_consumer(
    js: &jetstream::Context,
    provisioning: Provisioning,
    stream_name: &str,
    config: consumer::pull::Config,
) -> Result<consumer::PullConsumer, ProvisionError> {
    let name = config.durable_name.clone().unwrap_or_default();
    let what = || format!("consumer {name} on {stream_name}");
    if provisioning == Provisioning::CheckOnly {
        return js
            .get_consumer_from_stream(&name, stream_name)
            .await
            .map_err(|e| missing(what())(e.into()));
    }
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| failed(format!("stream {stream_name}"))(e.into()))?;
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
    let provisioning = config.provisioning();
    if provisioning == Provisioning::CheckOnly {
        let name = names.dispatch_consumer(pool);
        return js
            .get_consumer_from_stream(&name, &stream_name)
            .await
            .map_err(|e| missing(format!("consumer {name} on {stream_name}"))(e.into()));
    }
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
        provisioning,
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
