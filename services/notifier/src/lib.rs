//! comfyq notifier: signed webhooks for job events.
//!
//! - [`config`]: typed configuration (secrets, timeouts, retry schedule).
//! - [`guard`]: refusing loopback, private and metadata destinations.
//! - [`delivery`]: building, signing and posting one event; its delivery record;
//!   the retry decision; throttled progress webhooks.
//! - [`hosts`]: a bound on deliveries in flight per destination host.
//!
//! Pending deliveries live in JetStream (a durable consumer on the webhook
//! work items of the events stream, written atomically with the state
//! events they are for, retried with delayed naks), so a restart loses none,
//! and a job without a webhook costs the notifier nothing.

pub mod config;
pub mod delivery;
pub use comfyq_shared::guard;
pub mod hosts;

use std::sync::Arc;

use async_nats::jetstream::consumer;
use comfyq_shared::config::Provisioning;
use comfyq_shared::connection;
use comfyq_shared::consume::run_consumer;
use comfyq_shared::job_store::JobStore;
use comfyq_shared::provision::{self, ensure_pull_consumer};
use tokio_util::sync::CancellationToken;

pub use config::NotifierConfig;

#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    #[error(transparent)]
    Config(#[from] comfyq_shared::config::ConfigError),
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    #[error(transparent)]
    Provision(#[from] provision::ProvisionError),
    #[error("metrics listener: {0}")]
    Metrics(#[from] std::io::Error),
}

/// The notifier's durable consumers (webhook work, redelivery requests):
/// created or updated, or looked up when `provisioning` is check-only.
/// `comfyq provision` runs it as the admin identity.
pub async fn provision_consumers(
    js: &async_nats::jetstream::Context,
    config: &NotifierConfig,
    provisioning: Provisioning,
) -> Result<(consumer::PullConsumer, consumer::PullConsumer), NotifierError> {
    let names = config.nats.names()?;
    let consumer = ensure_pull_consumer(
        js,
        provisioning,
        &names.events_stream(),
        consumer::pull::Config {
            durable_name: Some(names.notifier_consumer()),
            description: Some("comfyq notifier: webhook deliveries".to_owned()),
            // Only events some job's webhook wants: written beside them.
            filter_subjects: vec![names.hooks_filter()],
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.attempt_timeout * 3,
            deliver_policy: consumer::DeliverPolicy::New,
            max_ack_pending: 100_000,
            num_replicas: config.nats.replicas,
            ..Default::default()
        },
    )
    .await?;
    let redeliveries = ensure_pull_consumer(
        js,
        provisioning,
        &names.webhooks_stream(),
        consumer::pull::Config {
            durable_name: Some(names.notifier_redeliver_consumer()),
            description: Some("comfyq notifier: webhook redeliveries".to_owned()),
            filter_subject: names.webhook_redeliver_subject(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.attempt_timeout * 3,
            max_ack_pending: 10_000,
            num_replicas: config.nats.replicas,
            ..Default::default()
        },
    )
    .await?;
    Ok((consumer, redeliveries))
}

/// Delivers webhooks until `shutdown`; deliveries in flight finish first.
pub async fn run(config: NotifierConfig, shutdown: CancellationToken) -> Result<(), NotifierError> {
    let names = config.nats.names()?;
    let client = connection::connect(&config.nats, "notifier").await?;
    let js = connection::jetstream(client.clone());
    let shared = provision::provision(&js, &names, &config.nats).await?;
    if let Some(addr) = config.metrics_addr {
        comfyq_shared::telemetry::serve_metrics(addr, shutdown.clone()).await?;
    }
    let (consumer, redeliveries) =
        provision_consumers(&js, &config, config.nats.provisioning()).await?;
    let notifier = delivery::Notifier::new(
        JobStore::new(js.clone(), client.clone(), shared.events, names.clone()),
        shared.webhooks,
        names.clone(),
        Arc::new(config.clone()),
    );
    let redeliver_task = {
        let notifier = notifier.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            run_consumer(
                "notifier-redeliver",
                redeliveries,
                16,
                shutdown,
                move |message| {
                    let notifier = notifier.clone();
                    async move { notifier.on_redeliver(message).await }
                },
            )
            .await;
        })
    };
    tracing::info!("notifier running");
    run_consumer(
        "notifier",
        consumer,
        config.concurrency,
        shutdown,
        move |message| {
            let notifier = notifier.clone();
            async move { notifier.on_event(message).await }
        },
    )
    .await;
    let _ = redeliver_task.await;
    let _ = client.flush().await;
    tracing::info!("notifier stopped");
    Ok(())
}
