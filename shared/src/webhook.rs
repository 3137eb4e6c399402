//! Webhook deliveries as the notifier records them (KV `<prefix>_webhooks`),
//! and the redelivery request ingress sends it. Each record holds every
//! attempt, so a client can see why a webhook did not arrive.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::event::Event;
use crate::ids::{JobId, TenantId};

/// Where a delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not delivered yet; another attempt is scheduled.
    Retrying,
    Delivered,
    /// Given up: a permanent refusal, or retries exhausted. Redeliverable.
    Dead,
}

/// One POST (or a refusal to send one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryAttempt {
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: OffsetDateTime,
    /// The receiver's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why it failed without an answer (timeout, refused destination…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub latency_ms: u64,
}

/// Every attempt to deliver one event to one webhook.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub v: u32,
    /// The event, as sent: redelivery sends it again with the same `webhook-id`.
    pub event: Event,
    pub url: String,
    pub state: DeliveryState,
    pub attempts: Vec<DeliveryAttempt>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub next_attempt_at: Option<OffsetDateTime>,
}

/// Every delivery of one job's events: one KV entry per job (key as the
/// job record's), so the job's webhook history is one read.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobDeliveries {
    pub deliveries: Vec<DeliveryRecord>,
}

impl JobDeliveries {
    pub fn find(&self, event: &Uuid) -> Option<&DeliveryRecord> {
        self.deliveries.iter().find(|d| d.event.id == *event)
    }

    /// Replaces the delivery of the same event, or adds it.
    pub fn upsert(&mut self, delivery: DeliveryRecord) {
        match self
            .deliveries
            .iter_mut()
            .find(|d| d.event.id == delivery.event.id)
        {
            Some(existing) => *existing = delivery,
            None => self.deliveries.push(delivery),
        }
    }
}

/// ingress → notifier: deliver this event again (a redelivery starts a
/// fresh retry schedule; the `webhook-id` stays the event id).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RedeliverWebhook {
    pub v: u32,
    pub tenant: TenantId,
    pub job_id: JobId,
    pub event: Event,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
}
