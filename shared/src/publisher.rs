//! Publishing live job events (progress, node, output) on their subjects.
//! State events are the job records and are written by
//! [`crate::job_store::JobStore`].

use std::time::Duration;

use async_nats::jetstream;

use crate::event::{Event, EventKind};
use crate::names::Names;

#[derive(Debug, thiserror::Error)]
#[error("publishing event for job {job}: {source}")]
pub struct PublishError {
    job: String,
    #[source]
    source: async_nats::Error,
}

#[derive(Clone, Debug)]
pub struct EventPublisher {
    js: jetstream::Context,
    names: Names,
    /// How long live events stay in the stream (their per-message TTL).
    ttl: Duration,
}

/// How long a progress webhook's work item is kept: it is sent once, at
/// once, or never.
const PROGRESS_HOOK_TTL: Duration = Duration::from_secs(3600);

impl EventPublisher {
    pub fn new(js: jetstream::Context, names: Names, ttl: Duration) -> Self {
        Self { js, names, ttl }
    }

    /// Publishes a live event without waiting for the stream's ack: a lost
    /// one is superseded by the next, and latency matters more. It expires
    /// after `events_max_age` (the stream keeps state events longer).
    pub async fn publish_live(&self, event: &Event) -> Result<(), PublishError> {
        let subject = self
            .names
            .event_subject(&event.tenant, &event.job_id, event.kind());
        self.publish_unacked(event, subject, self.ttl).await
    }

    /// A progress webhook's work item, for a job whose webhook wants
    /// `job.progress` (best effort, like the event).
    pub async fn publish_progress_hook(&self, event: &Event) -> Result<(), PublishError> {
        let subject = self
            .names
            .hook_subject(&event.tenant, &event.job_id, EventKind::Progress);
        self.publish_unacked(event, subject, PROGRESS_HOOK_TTL)
            .await
    }

    async fn publish_unacked(
        &self,
        event: &Event,
        subject: String,
        ttl: Duration,
    ) -> Result<(), PublishError> {
        let fail = |source: async_nats::Error| PublishError {
            job: event.job_id.to_string(),
            source,
        };
        let payload = serde_json::to_vec(event).map_err(|e| fail(e.into()))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_TTL,
            ttl.as_secs().max(1).to_string().as_str(),
        );
        // A core publish without a reply subject: the stream stores it and
        // sends no acknowledgement (one message instead of two).
        self.js
            .client()
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| fail(e.into()))?;
        Ok(())
    }
}
