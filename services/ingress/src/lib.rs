//! comfyq ingress: the REST API.
//!
//! - [`config`]: typed configuration (listen address, API keys, limits).
//! - [`auth`]: API keys → tenants.
//! - [`api`]: request/response bodies and edge validation.
//! - [`problem`]: RFC 9457 problem responses, the one HTTP error type.
//! - [`routes`]: handlers and the router.
//! - [`listing`]: `GET /v1/jobs` from the jobs bucket's keys.
//! - [`live`]: progress, queue position and `?wait` for one job.
//! - [`idempotency`]: `Idempotency-Key` claims.
//! - [`upload`]: multipart submissions streamed to the object store.
//! - [`fetch`]: `{name, url}` inputs and webhook URLs behind the SSRF guard.
//! - [`streams`]: SSE and WebSocket event streams from the EVENTS stream.
//! - [`catalog`]: runners, queue depth, node-type check.
//! - [`limits`]: per-tenant request rate limits.
//! - [`active`]: unfinished jobs per tenant, for the active-job limit.
//! - [`openapi`]: the generated OpenAPI document and docs page.
//! - `ui`: the web dashboard at `/ui` (embedded HTML and JavaScript over the REST API).
//! - [`state`]: what handlers share.
//! - `comfy_api`: ComfyUI 0.3.64's own HTTP and WebSocket API over the fleet.

pub mod active;
pub mod api;
pub mod auth;
pub mod catalog;
mod comfy_api;
pub mod config;
pub mod dead_letters;
pub mod fetch;
pub mod idempotency;
pub mod limits;
pub mod listing;
pub mod live;
pub mod openapi;
pub mod problem;
pub mod routes;
pub mod state;
pub mod streams;
mod ui;
pub mod upload;
pub mod webhooks;

use std::sync::Arc;

use axum::serve::ListenerExt;
use comfyq_shared::connection;
use comfyq_shared::job_store::JobStore;
use comfyq_shared::media::MediaStore;
use comfyq_shared::provision;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::IngressConfig;

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error(transparent)]
    Config(#[from] comfyq_shared::config::ConfigError),
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    #[error(transparent)]
    Provision(#[from] provision::ProvisionError),
    #[error(transparent)]
    Media(#[from] comfyq_shared::media::MediaError),
    #[error("HTTP server: {0}")]
    Serve(#[from] std::io::Error),
}

/// Serves the API on `listener` until `shutdown`, then drains requests.
pub async fn serve(
    config: IngressConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), IngressError> {
    let names = config.nats.names()?;
    let client = connection::connect(&config.nats, "ingress").await?;
    let js = connection::jetstream(client.clone());
    let shared = provision::provision(&js, &names, &config.nats).await?;
    let media = MediaStore::open(
        &config.media,
        &js,
        names.clone(),
        (config.nats.media_max_age, config.nats.replicas),
        config.nats.provisioning(),
    )
    .await?;
    let state = state::AppState {
        auth: Arc::new(auth::Authenticator::from_config(&config)),
        client: client.clone(),
        jobs: JobStore::new(js.clone(), client.clone(), shared.events, names.clone()),
        pending: shared.pending,
        media,
        idempotency: shared.idempotency,
        runners: shared.runners,
        capabilities: shared.capabilities,
        webhooks: shared.webhooks,
        dead_letters: shared.dead_letters,
        limiter: Arc::new(limits::RateLimiter::new(
            config.rate_limit_per_s,
            config.rate_limit_burst,
        )),
        js,
        names,
        config: Arc::new(config),
        shutdown: shutdown.clone(),
        active: Arc::new(active::ActiveJobs::default()),
        runner_directory: Arc::new(catalog::RunnerDirectory::default()),
        comfy_object_info: Arc::default(),
    };
    let directory = tokio::spawn({
        let directory = state.runner_directory.clone();
        let buckets = (state.runners.clone(), state.capabilities.clone());
        let shutdown = shutdown.clone();
        async move { directory.follow(buckets.0, buckets.1, shutdown).await }
    });
    tracing::info!(addr = %listener.local_addr()?, "ingress listening");
    // axum 0.8 leaves Nagle on: a response's head and a streamed body's
    // chunks are separate writes, and the second would wait for the client's
    // delayed ACK (about 40 ms on Linux).
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await?;
    shutdown.cancel();
    let _ = directory.await;
    let _ = client.flush().await;
    tracing::info!("ingress stopped");
    Ok(())
}
