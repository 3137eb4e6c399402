//! What every handler shares.

use async_nats::jetstream::{self, kv};
use comfyq_shared::job_store::JobStore;
use comfyq_shared::media::MediaStore;
use comfyq_shared::names::Names;

use crate::auth::Authenticator;
use crate::config::IngressConfig;
use crate::limits::RateLimiter;

#[derive(Clone, Debug)]
pub struct AppState {
    pub config: std::sync::Arc<IngressConfig>,
    pub auth: std::sync::Arc<Authenticator>,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
    pub jobs: JobStore,
    /// Jobs waiting for a runner slot (for queue depths and positions).
    pub pending: async_nats::jetstream::stream::Stream,
    pub media: MediaStore,
    pub idempotency: kv::Store,
    /// Runners' load entries.
    pub runners: kv::Store,
    /// Runners' capability entries.
    pub capabilities: kv::Store,
    /// Webhook delivery records (written by the notifier).
    pub webhooks: kv::Store,
    /// Dead letters (written by the scheduler).
    pub dead_letters: kv::Store,
    pub limiter: std::sync::Arc<RateLimiter>,
    pub active: std::sync::Arc<crate::active::ActiveJobs>,
    pub runner_directory: std::sync::Arc<crate::catalog::RunnerDirectory>,
    /// The ComfyUI API's copy of each runner's `object_info`.
    pub(crate) comfy_object_info: std::sync::Arc<crate::comfy_api::info::ObjectInfoCache>,
    /// Cancelled at shutdown: open event streams end so the server can drain.
    pub shutdown: tokio_util::sync::CancellationToken,
}
