//! Delivering one job event to its webhook: build the body, sign it
//! (Standard Webhooks), POST it, and decide what the outcome means.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use comfyq_shared::consume::{Outcome, acknowledge};
use comfyq_shared::event::Event;
use comfyq_shared::job::{JobRecord, WebhookSpec};
use comfyq_shared::job_store::JobStore;
use serde::Serialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::config::NotifierConfig;
use crate::guard::{Refusal, check_destination};

/// The result of one POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered(u16),
    /// Worth another try, after at least `retry_after` if the receiver said so.
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Will never succeed (a 4xx other than 408/429, a refused destination).
    Permanent(String),
}

/// Classifies a receiver's answer.
pub fn classify(status: u16, retry_after: Option<&str>) -> Attempt {
    match status {
        200..=299 => Attempt::Delivered(status),
        408 | 429 | 500..=599 => Attempt::Retryable {
            reason: format!("receiver answered {status}"),
            retry_after: retry_after
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        },
        _ => Attempt::Permanent(format!("receiver answered {status}")),
    }
}

#[derive(Clone, Debug)]
pub struct Notifier {
    pub jobs: JobStore,
    pub config: Arc<NotifierConfig>,
}

#[derive(Serialize)]
struct WebhookBody {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    #[serde(with = "time::serde::rfc3339")]
    timestamp: OffsetDateTime,
    data: Value,
}

impl Notifier {
    pub async fn on_event(&self, message: Message) {
        let outcome = match serde_json::from_slice::<Event>(&message.payload) {
            Ok(event) => {
                let span = tracing::info_span!("webhook", job_id = %event.job_id, event = %event.type_name());
                let delivered = message.info().map(|i| i.delivered as u32).unwrap_or(1);
                self.deliver(&event, delivered).instrument(span).await
            }
            Err(error) => {
                tracing::error!(%error, "malformed event; skipped");
                Outcome::Reject
            }
        };
        acknowledge(&message, outcome).await;
    }

    async fn deliver(&self, event: &Event, attempt: u32) -> Outcome {
        let record = match self.jobs.get(&event.tenant, &event.job_id).await {
            Ok(Some(versioned)) => versioned.record,
            Ok(None) => return Outcome::Ack, // expired or never existed: nobody to tell
            Err(error) => {
                tracing::warn!(%error, "cannot read job record; will retry");
                return Outcome::Retry(Some(Duration::from_secs(1)));
            }
        };
        let Some(webhook) = record.webhook.as_ref() else {
            return Outcome::Ack;
        };
        let event_type = event.type_name();
        if !webhook.wants(&event_type) {
            return Outcome::Ack;
        }
        let started = std::time::Instant::now();
        let result = self.post(webhook, event, &record).await;
        let label = match &result {
            Attempt::Delivered(_) => "delivered",
            Attempt::Retryable { .. } => "retryable",
            Attempt::Permanent(_) => "permanent",
        };
        metrics::counter!("comfyq_webhook_attempts_total", "result" => label).increment(1);
        metrics::histogram!("comfyq_webhook_attempt_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let age = (OffsetDateTime::now_utc() - event.at).unsigned_abs();
        match result {
            Attempt::Delivered(status) => {
                tracing::info!(status, attempt, "webhook delivered");
                Outcome::Ack
            }
            Attempt::Retryable {
                reason,
                retry_after,
            } if age < self.config.max_age => {
                let delay = self.backoff(attempt).max(retry_after.unwrap_or_default());
                tracing::warn!(%reason, attempt, retry_in_ms = delay.as_millis() as u64, "webhook failed; will retry");
                Outcome::Retry(Some(delay))
            }
            Attempt::Retryable { reason, .. } | Attempt::Permanent(reason) => {
                metrics::counter!("comfyq_webhook_dead_letters_total").increment(1);
                tracing::error!(%reason, attempt, "webhook dead-lettered");
                Outcome::Reject
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(20);
        let base = self
            .config
            .initial_backoff
            .saturating_mul(1 << exponent)
            .min(self.config.max_backoff);
        base.mul_f64(rand::random_range(0.75..1.25))
    }

    fn secrets_for(&self, record: &JobRecord) -> Vec<standardwebhooks::Webhook> {
        let secrets = self
            .config
            .tenant_secrets
            .get(record.tenant.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or(&self.config.default_secrets);
        secrets
            .iter()
            .filter_map(|s| standardwebhooks::Webhook::new(s.expose()).ok())
            .collect()
    }

    async fn post(&self, webhook: &WebhookSpec, event: &Event, record: &JobRecord) -> Attempt {
        let url = match url::Url::parse(&webhook.url) {
            Ok(url) => url,
            Err(e) => return Attempt::Permanent(format!("invalid URL: {e}")),
        };
        let addrs = match check_destination(&url, self.config.allow_private_destinations).await {
            Ok(addrs) => addrs,
            Err(refusal @ Refusal::Unresolvable(_)) => {
                return Attempt::Retryable {
                    reason: refusal.to_string(),
                    retry_after: None,
                };
            }
            Err(refusal) => return Attempt::Permanent(refusal.to_string()),
        };
        let body = WebhookBody {
            kind: event.type_name(),
            id: event.id.to_string(),
            timestamp: event.at,
            data: json!({ "job": self.summary(record, event) }),
        };
        let Ok(payload) = serde_json::to_vec(&body) else {
            return Attempt::Permanent("body not serializable".to_owned());
        };
        let message_id = event.id.to_string();
        let timestamp = OffsetDateTime::now_utc().unix_timestamp();
        let signatures: Vec<String> = self
            .secrets_for(record)
            .iter()
            .filter_map(|w| w.sign(&message_id, timestamp, &payload).ok())
            .collect();

        // Connect to exactly the addresses that were checked; never follow
        // redirects (a redirect could point anywhere).
        let host = url.host_str().unwrap_or_default().to_owned();
        let client = match reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.config.attempt_timeout)
            .resolve_to_addrs(&host, &addrs)
            .build()
        {
            Ok(client) => client,
            Err(e) => {
                return Attempt::Retryable {
                    reason: format!("HTTP client: {e}"),
                    retry_after: None,
                };
            }
        };
        let mut request = client
            .post(url)
            .header("content-type", "application/json")
            .header(standardwebhooks::HEADER_WEBHOOK_ID, &message_id)
            .header(
                standardwebhooks::HEADER_WEBHOOK_TIMESTAMP,
                timestamp.to_string(),
            );
        if !signatures.is_empty() {
            request = request.header(
                standardwebhooks::HEADER_WEBHOOK_SIGNATURE,
                signatures.join(" "),
            );
        }
        match request.body(payload).send().await {
            Ok(response) => {
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                classify(response.status().as_u16(), retry_after.as_deref())
            }
            Err(e) if e.is_timeout() => Attempt::Retryable {
                reason: "timed out".to_owned(),
                retry_after: None,
            },
            Err(e) => Attempt::Retryable {
                reason: format!("request failed: {e}"),
                retry_after: None,
            },
        }
    }

    fn summary(&self, record: &JobRecord, event: &Event) -> Value {
        let base = self
            .config
            .public_base_url
            .as_deref()
            .unwrap_or("")
            .trim_end_matches('/');
        let change = event.body.state_change();
        let outputs: Vec<Value> = change
            .map(|c| c.outputs.as_slice())
            .unwrap_or(&record.outputs)
            .iter()
            .map(|o| {
                let mut value = serde_json::to_value(o).unwrap_or(Value::Null);
                value["url"] =
                    Value::String(format!("{base}/v1/jobs/{}/outputs/{}", record.id, o.name));
                value
            })
            .collect();
        json!({
            "id": record.id,
            "tenant": record.tenant,
            "status": change.map(|c| c.status).unwrap_or(record.status),
            "priority": record.priority,
            "pool": record.pool,
            "attempt": change.map(|c| c.attempt).unwrap_or(record.attempt),
            "created_at": record.created_at.format(&time::format_description::well_known::Rfc3339).ok(),
            "finished_at": record.finished_at.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
            "outputs": outputs,
            "error": change.and_then(|c| c.error.clone()).or_else(|| record.error.clone()),
            "metadata": record.metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified() {
        assert_eq!(classify(204, None), Attempt::Delivered(204));
        assert!(matches!(classify(503, None), Attempt::Retryable { .. }));
        assert!(matches!(classify(408, None), Attempt::Retryable { .. }));
        assert_eq!(
            classify(429, Some("7")),
            Attempt::Retryable {
                reason: "receiver answered 429".to_owned(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert!(matches!(classify(410, None), Attempt::Permanent(_)));
        assert!(matches!(classify(301, None), Attempt::Permanent(_)));
    }
}
