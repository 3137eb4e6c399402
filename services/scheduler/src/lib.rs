//! comfyq scheduler: the one writer of job records.
//!
//! - [`config`]: typed configuration.
//! - [`policy`]: which held job goes next (priority, ageing, fairness, limits), pure.
//! - [`service`]: command handlers (cancel, exhausted deliveries and dead
//!   letters, operators' requeues).
//! - [`dispatcher`]: decide-late dispatch of waiting jobs, by the lease holder.
//! - [`lease`]: the KV lease that elects one dispatching scheduler.
//!
//! The job state machine itself is `comfyq_shared::machine`: ingress and
//! runners write a job's record themselves, so the scheduler is off the
//! path of a job that meets no trouble, except for dispatching it.
//!
//! [`run`] provisions NATS, consumes the JOBS stream and the captured
//! advisories, and competes for the dispatcher lease, until shutdown.

pub mod config;
pub mod dispatcher;
pub mod lease;
pub mod policy;
pub mod service;

use async_nats::jetstream::consumer;
use comfyq_shared::config::Provisioning;
use comfyq_shared::connection;
use comfyq_shared::consume::run_consumer;
use comfyq_shared::job_store::JobStore;
use comfyq_shared::provision::{self, ensure_pull_consumer};
use std::sync::Arc;

use crate::dispatcher::Dispatcher;
use crate::lease::Lease;
use tokio_util::sync::CancellationToken;

use tokio_util::task::TaskTracker;

pub use config::SchedulerConfig;
pub use service::Scheduler;

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Config(#[from] comfyq_shared::config::ConfigError),
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    #[error(transparent)]
    Provision(#[from] provision::ProvisionError),
    #[error("metrics listener: {0}")]
    Metrics(#[from] std::io::Error),
}

/// The scheduler's durable consumers (cancel and retry commands, captured
/// advisories): created or updated, or looked up when `provisioning` is
/// check-only. `comfyq provision` runs it as the admin identity.
pub async fn provision_consumers(
    js: &async_nats::jetstream::Context,
    config: &SchedulerConfig,
    provisioning: Provisioning,
) -> Result<
    (
        consumer::PullConsumer,
        consumer::PullConsumer,
        consumer::PullConsumer,
    ),
    SchedulerError,
> {
    let names = config.nats.names()?;
    let consumer_for = |durable: String, filter: String| consumer::pull::Config {
        durable_name: Some(durable),
        filter_subject: filter,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.handler_ack_wait,
        max_ack_pending: 10_000,
        num_replicas: config.nats.replicas,
        ..Default::default()
    };
    let jobs_stream = names.jobs_stream();
    // Submissions and reports went through the scheduler before 0.2.
    if provisioning == Provisioning::CreateOrUpdate
        && let Ok(stream) = js.get_stream(&jobs_stream).await
    {
        for legacy in names.legacy_scheduler_consumers() {
            if stream.delete_consumer(&legacy).await.is_ok() {
                tracing::info!(consumer = %legacy, "deleted a consumer of an earlier version");
            }
        }
    }
    let cancel = ensure_pull_consumer(
        js,
        provisioning,
        &jobs_stream,
        consumer_for(names.scheduler_cancel_consumer(), names.cancel_subject()),
    )
    .await?;
    let retry = ensure_pull_consumer(
        js,
        provisioning,
        &jobs_stream,
        consumer_for(names.scheduler_retry_consumer(), names.retry_subject()),
    )
    .await?;
    let advisories = ensure_pull_consumer(
        js,
        provisioning,
        &names.advisories_stream(),
        consumer_for(
            names.scheduler_advisories_consumer(),
            names.max_deliveries_advisory_filter(),
        ),
    )
    .await?;
    Ok((cancel, retry, advisories))
}

/// Runs the scheduler until `shutdown` is cancelled; returns once every
/// message in flight has been handled.
pub async fn run(
    config: SchedulerConfig,
    shutdown: CancellationToken,
) -> Result<(), SchedulerError> {
    let names = config.nats.names()?;
    let client = connection::connect(&config.nats, "scheduler").await?;
    let js = connection::jetstream(client.clone());
    let shared = provision::provision(&js, &names, &config.nats).await?;
    if let Some(addr) = config.metrics_addr {
        comfyq_shared::telemetry::serve_metrics(addr, shutdown.clone()).await?;
    }

    let (cancel, retry, advisories) =
        provision_consumers(&js, &config, config.nats.provisioning()).await?;

    let instance = config
        .instance_id
        .clone()
        .unwrap_or_else(|| format!("scheduler-{}", comfyq_shared::JobId::new()));
    let config = Arc::new(config);
    let scheduler = Scheduler {
        js: js.clone(),
        client: client.clone(),
        jobs: JobStore::new(js.clone(), client.clone(), shared.events, names.clone()),
        dead_letters: shared.dead_letters,
        config: config.clone(),
        names: names.clone(),
    };
    let dispatcher = Dispatcher {
        scheduler: scheduler.clone(),
        runners: shared.runners,
        capabilities: shared.capabilities,
        lease: Lease {
            kv: shared.scheduler,
            key: names.dispatcher_lease_key(),
            holder: instance,
            ttl: config.lease_ttl,
        },
    };
    tracing::info!("scheduler running");

    let tasks = TaskTracker::new();
    let concurrency = config.concurrency;
    {
        let s = scheduler.clone();
        tasks.spawn(run_consumer(
            "scheduler-cancel",
            cancel,
            concurrency,
            shutdown.clone(),
            move |m| {
                let s = s.clone();
                async move { s.on_cancel(m).await }
            },
        ));
    }
    {
        let s = scheduler.clone();
        tasks.spawn(run_consumer(
            "scheduler-retry",
            retry,
            concurrency,
            shutdown.clone(),
            move |m| {
                let s = s.clone();
                async move { s.on_retry(m).await }
            },
        ));
    }
    {
        let s = scheduler.clone();
        tasks.spawn(run_consumer(
            "scheduler-advisories",
            advisories,
            concurrency,
            shutdown.clone(),
            move |m| {
                let s = s.clone();
                async move { s.on_max_deliveries(m).await }
            },
        ));
    }
    tasks.spawn(dispatcher.run(shutdown.clone()));
    tasks.close();
    tasks.wait().await;
    let _ = client.flush().await;
    tracing::info!("scheduler stopped");
    Ok(())
}
