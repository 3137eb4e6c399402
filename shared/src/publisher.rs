//! Publishing job events on their subjects, awaiting the stream's ack.

use async_nats::jetstream;

use crate::event::Event;
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
}

impl EventPublisher {
    pub fn new(js: jetstream::Context, names: Names) -> Self {
        Self { js, names }
    }

    /// Publishes and waits until the EVENTS stream has stored the event.
    /// `Nats-Msg-Id` is the event id, so a retried publish is stored once.
    pub async fn publish(&self, event: &Event) -> Result<u64, PublishError> {
        let fail = |source: async_nats::Error| PublishError {
            job: event.job_id.to_string(),
            source,
        };
        let subject = self
            .names
            .event_subject(&event.tenant, &event.job_id, event.kind());
        let payload = serde_json::to_vec(event).map_err(|e| fail(e.into()))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            event.id.to_string().as_str(),
        );
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| fail(e.into()))?
            .await
            .map_err(|e| fail(e.into()))?;
        Ok(ack.sequence)
    }
}

impl EventPublisher {
    /// Publishes without waiting for the stream's ack: for progress events,
    /// where a lost one is superseded by the next and latency matters more.
    pub async fn publish_without_ack(&self, event: &Event) -> Result<(), PublishError> {
        let fail = |source: async_nats::Error| PublishError {
            job: event.job_id.to_string(),
            source,
        };
        let subject = self
            .names
            .event_subject(&event.tenant, &event.job_id, event.kind());
        let payload = serde_json::to_vec(event).map_err(|e| fail(e.into()))?;
        // Dropping the ack future does not cancel the publish, only the wait.
        let _ack = self
            .js
            .publish(subject, payload.into())
            .await
            .map_err(|e| fail(e.into()))?;
        Ok(())
    }
}
