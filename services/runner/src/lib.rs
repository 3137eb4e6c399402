//! comfyq runner: drives one ComfyUI for the job queue.
//!
//! - [`comfy`]: ComfyUI's own protocol (HTTP, WebSocket, binary frames).
//! - [`config`]: typed configuration.
//! - [`link`]: the one WebSocket to ComfyUI, routing messages to jobs.
//! - [`progress`]: ComfyUI messages → job events with a progress fraction.
//! - [`execute`]: one attempt of a job, from inputs to stored outputs.
//! - [`worker`]: the pull loop, the job's record writes and acknowledgements.
//! - [`registration`]: the runner's capability and load entries.
//! - [`managed`]: launching and supervising ComfyUI (managed mode).
//! - [`verify`]: `comfyq-runner verify`, checking ComfyUI against a workflow.

pub mod comfy;
pub mod config;
pub mod execute;
pub mod link;
pub mod managed;
pub mod progress;
pub mod pull;
pub mod registration;
pub mod verify;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use comfyq_shared::connection;
use comfyq_shared::job_store::JobStore;
use comfyq_shared::media::MediaStore;
use comfyq_shared::provision::{self, ensure_dispatch_consumer};
use comfyq_shared::publisher::EventPublisher;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

pub use config::RunnerConfig;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Config(#[from] comfyq_shared::config::ConfigError),
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    #[error(transparent)]
    Provision(#[from] provision::ProvisionError),
    #[error(transparent)]
    Media(#[from] comfyq_shared::media::MediaError),
    #[error("ComfyUI at {url} did not become ready within {waited:?}: {last_error}")]
    ComfyNotReady {
        url: String,
        waited: Duration,
        last_error: String,
    },
    #[error(transparent)]
    Comfy(#[from] comfy::ComfyError),
    #[error(transparent)]
    Managed(#[from] managed::ManagedError),
    #[error("subscribing: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("metrics listener: {0}")]
    Metrics(#[from] std::io::Error),
}

/// Waits for ComfyUI to answer `/system_stats`, with backoff.
pub async fn wait_for_comfyui(
    comfy: &comfy::ComfyClient,
    timeout: Duration,
) -> Result<(), RunnerError> {
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match comfy.system_stats().await {
            Ok(_) => return Ok(()),
            Err(error) if started.elapsed() + delay > timeout => {
                return Err(RunnerError::ComfyNotReady {
                    url: comfy.base_url().to_string(),
                    waited: started.elapsed(),
                    last_error: error.to_string(),
                });
            }
            Err(error) => {
                tracing::info!(%error, "waiting for ComfyUI");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs the runner until `shutdown`; held jobs get `shutdown_grace` to
/// finish before they are handed back.
pub async fn run(config: RunnerConfig, shutdown: CancellationToken) -> Result<(), RunnerError> {
    let names = config.nats.names()?;
    let pool = config.pool()?;
    let runner = config.runner_id()?;
    let comfy = comfy::ComfyClient::new(config.comfyui_url()?, comfy::ClientConfig::default())?;
    // Stopped last, after held jobs are done with it.
    let comfy_stop = CancellationToken::new();
    let (managed, health) = match &config.managed {
        Some(managed) => {
            let process = tokio::select! {
                process = managed::ManagedComfy::start(managed.clone(), comfy.clone(), comfy_stop.clone()) => process?,
                _ = shutdown.cancelled() => {
                    comfy_stop.cancel();
                    return Ok(());
                }
            };
            let health = process.health();
            (Some(process), health)
        }
        None => {
            wait_for_comfyui(&comfy, config.comfyui_ready_timeout).await?;
            (None, managed::ComfyHealth::attached())
        }
    };

    let client = connection::connect(&config.nats, "runner").await?;
    let js = connection::jetstream(client.clone());
    let shared = provision::provision(&js, &names, &config.nats).await?;
    let consumer = ensure_dispatch_consumer(&js, &names, &config.nats, &pool).await?;
    let pull =
        pull::DispatchPull::new(consumer, &client, js.clone(), config.pull_options(&names)).await?;
    if let Some(addr) = config.metrics_addr {
        comfyq_shared::telemetry::serve_metrics(addr, shutdown.clone()).await?;
    }

    let config = Arc::new(config);
    let link_stop = CancellationToken::new();
    let link = link::ComfyLink::start(
        comfy.base_url().clone(),
        runner.to_string(),
        comfy::SocketConfig {
            preview_metadata: config.preview_metadata,
            ..comfy::SocketConfig::default()
        },
        link_stop.clone(),
    );
    let media = MediaStore::open(
        &config.media,
        &js,
        names.clone(),
        (config.nats.media_max_age, config.nats.replicas),
        config.nats.provisioning(),
    )
    .await?;
    let held = worker::HeldJobs::default();
    let executor = execute::Executor {
        comfy: comfy.clone(),
        link,
        media,
        events: EventPublisher::new(js.clone(), names.clone(), config.nats.events_max_age),
        client: client.clone(),
        names: names.clone(),
        client_id: runner.to_string(),
        config: config.clone(),
        health: health.clone(),
    };

    // Cancellations for jobs held here.
    let mut cancels = client.subscribe(names.runner_cancel_filter()).await?;
    let cancel_task = {
        let held = held.clone();
        tokio::spawn(async move {
            while let Some(message) = cancels.next().await {
                let job = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|id| id.parse().ok());
                if let Some(job) = job
                    && held.cancel(&job)
                {
                    tracing::info!(job_id = %job, "cancel requested; stopping the prompt");
                }
            }
        })
    };

    let registration = registration::Registration::discover(
        &comfy,
        runner.clone(),
        pool.clone(),
        config.labels.clone(),
        config.slots,
    )
    .await;
    let mut registration = registration;
    registration.load.burst_min_pending = config.burst_min_pending;
    registration.load.dispatch_priority = config.effective_dispatch_priority();
    let offer = registration.offer();
    let registration_stop = CancellationToken::new();
    let object_info_task = tokio::spawn(registration::publish_object_info(
        comfy.clone(),
        executor.media.clone(),
        runner.clone(),
        registration_stop.clone(),
    ));
    let registration_task = tokio::spawn(registration::maintain(
        registration::Buckets {
            load: shared.runners.clone(),
            capabilities: shared.capabilities.clone(),
        },
        comfy.clone(),
        registration,
        held.clone(),
        health.clone(),
        (config.nats.runner_ttl / 3).max(Duration::from_millis(100)),
        registration_stop.clone(),
    ));

    let worker = worker::Worker {
        executor,
        js: js.clone(),
        jobs: JobStore::new(js.clone(), client.clone(), shared.events, names.clone()),
        names,
        pool,
        runner: runner.clone(),
        held,
        runners: shared.runners,
        pause_until: Default::default(),
        offer: Arc::new(offer),
        config: config.clone(),
    };
    tracing::info!(%runner, pool = %worker.pool, slots = config.slots, "runner pulling work");

    let hand_back = CancellationToken::new();
    let grace = {
        let (shutdown, hand_back) = (shutdown.clone(), hand_back.clone());
        let grace = config.shutdown_grace;
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            hand_back.cancel();
        })
    };
    worker.run(pull, shutdown.clone(), hand_back).await;
    grace.abort();
    cancel_task.abort();
    registration_stop.cancel();
    let _ = registration_task.await;
    let _ = object_info_task.await;
    link_stop.cancel();
    comfy_stop.cancel();
    if let Some(process) = managed {
        process.stopped().await;
    }
    let _ = client.flush().await;
    tracing::info!(%runner, "runner stopped");
    Ok(())
}
