//! What every handler shares.

use async_nats::jetstream;
use comfyq_shared::job_store::JobStore;
use comfyq_shared::media::MediaStore;
use comfyq_shared::names::Names;
use comfyq_shared::publisher::EventPublisher;

use crate::auth::Authenticator;
use crate::config::IngressConfig;

#[derive(Clone, Debug)]
pub struct AppState {
    pub config: std::sync::Arc<IngressConfig>,
    pub auth: std::sync::Arc<Authenticator>,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
    pub jobs: JobStore,
    pub media: MediaStore,
    pub events: EventPublisher,
    /// Webhook delivery records (written by the notifier).
    pub webhooks: async_nats::jetstream::kv::Store,
}
