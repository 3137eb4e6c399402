//! Delivering job events to webhooks: build the body, sign it (Standard
//! Webhooks), POST it, record the attempt, and decide what comes next.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{Message, kv};
use comfyq_shared::consume::{Outcome, acknowledge};
use comfyq_shared::event::{Event, EventKind};
use comfyq_shared::ids::JobId;
use comfyq_shared::job::{JobRecord, SCHEMA_VERSION, WebhookSpec};
use comfyq_shared::job_store::JobStore;
use comfyq_shared::names::Names;
use comfyq_shared::webhook::{
    DeliveryAttempt, DeliveryRecord, DeliveryState, JobDeliveries, RedeliverWebhook,
};
use serde::Serialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::config::NotifierConfig;
use crate::guard::{Refusal, check_destination};
use crate::hosts::HostLimits;

/// The result of one POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered(u16),
    /// Worth another try, after at least `retry_after` if the receiver said so.
    Retryable {
        status: Option<u16>,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Will never succeed (a 4xx other than 408/429, a redirect, a refused destination).
    Permanent {
        status: Option<u16>,
        reason: String,
    },
}

/// Classifies a receiver's answer.
pub fn classify(status: u16, retry_after: Option<&str>) -> Attempt {
    match status {
        200..=299 => Attempt::Delivered(status),
        408 | 429 | 500..=599 => Attempt::Retryable {
            status: Some(status),
            reason: format!("receiver answered {status}"),
            retry_after: retry_after
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        },
        300..=399 => Attempt::Permanent {
            status: Some(status),
            reason: format!("receiver answered {status}: redirects are not followed"),
        },
        _ => Attempt::Permanent {
            status: Some(status),
            reason: format!("receiver answered {status}"),
        },
    }
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

/// Per job: its webhook (if any) and when a progress webhook last went out.
type ProgressState = (Option<WebhookSpec>, Option<Instant>);

#[derive(Clone, Debug)]
pub struct Notifier {
    pub jobs: JobStore,
    pub deliveries: kv::Store,
    pub names: Names,
    pub config: Arc<NotifierConfig>,
    pub hosts: Arc<HostLimits>,
    pub progress: Arc<Mutex<HashMap<JobId, ProgressState>>>,
}

impl Notifier {
    pub fn new(
        jobs: JobStore,
        deliveries: kv::Store,
        names: Names,
        config: Arc<NotifierConfig>,
    ) -> Self {
        Self {
            jobs,
            deliveries,
            names,
            hosts: Arc::new(HostLimits::new(config.max_per_host)),
            config,
            progress: Arc::default(),
        }
    }

    /// Webhook work from the events stream: an event the job's webhook
    /// wants, written with the event itself.
    pub async fn on_event(&self, message: Message) {
        let outcome = match serde_json::from_slice::<Event>(&message.payload) {
            Ok(event) => {
                let span = tracing::info_span!("webhook", job_id = %event.job_id, event = %event.type_name());
                if event.kind() == EventKind::Progress {
                    self.progress_webhook(&event).instrument(span).await
                } else {
                    let attempt = message.info().map(|i| i.delivered as u32).unwrap_or(1);
                    self.deliver(&event, attempt, event.at, false)
                        .instrument(span)
                        .await
                }
            }
            Err(error) => {
                tracing::error!(%error, "malformed event; skipped");
                Outcome::Reject
            }
        };
        acknowledge(&message, outcome).await;
    }

    /// A redelivery request from ingress.
    pub async fn on_redeliver(&self, message: Message) {
        let outcome = match serde_json::from_slice::<RedeliverWebhook>(&message.payload) {
            Ok(request) => {
                let span = tracing::info_span!("redeliver", job_id = %request.job_id, event = %request.event.type_name());
                let attempt = message.info().map(|i| i.delivered as u32).unwrap_or(1);
                // The retry schedule restarts from the request, not the event.
                self.deliver(&request.event, attempt, request.requested_at, true)
                    .instrument(span)
                    .await
            }
            Err(error) => {
                tracing::error!(%error, "malformed redelivery request; skipped");
                Outcome::Reject
            }
        };
        acknowledge(&message, outcome).await;
    }

    async fn deliver(
        &self,
        event: &Event,
        attempt: u32,
        schedule_start: OffsetDateTime,
        redelivery: bool,
    ) -> Outcome {
        // A state event carries the record; a redelivery request may be of
        // an older event, and reads the job as it stands now.
        let record = match event.record.as_deref() {
            Some(record) if !redelivery => record.clone(),
            _ => match self.jobs.get(&event.tenant, &event.job_id).await {
                Ok(Some(versioned)) => versioned.record,
                Ok(None) => return Outcome::Ack, // expired or never existed: nobody to tell
                Err(error) => {
                    tracing::warn!(%error, "cannot read job record; will retry");
                    return Outcome::Retry(Some(Duration::from_secs(1)));
                }
            },
        };
        let Some(webhook) = record.webhook.clone() else {
            return Outcome::Ack;
        };
        if !redelivery && !webhook.wants(&event.type_name()) {
            return Outcome::Ack;
        }
        let key = self.names.job_key(&event.tenant, &event.job_id);
        let existing = match self.load(&key).await {
            Ok((deliveries, _)) => deliveries.find(&event.id).cloned(),
            Err(error) => {
                tracing::warn!(%error, "cannot read the delivery record; will retry");
                return Outcome::Retry(Some(Duration::from_secs(1)));
            }
        };
        let mut delivery = existing.unwrap_or_else(|| DeliveryRecord {
            v: SCHEMA_VERSION,
            event: event.clone(),
            url: webhook.url.clone(),
            state: DeliveryState::Retrying,
            attempts: Vec::new(),
            next_attempt_at: None,
        });
        // A message redelivered after a crash between POST and ack: done already.
        if delivery.state == DeliveryState::Delivered {
            return Outcome::Ack;
        }
        if delivery.state == DeliveryState::Dead && !redelivery {
            return Outcome::Reject;
        }

        let host = url::Url::parse(&webhook.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default();
        let Some(_slot) = self.hosts.acquire(&host, self.config.attempt_timeout).await else {
            // The host has enough in flight; try later without counting an attempt.
            return Outcome::Retry(Some(Duration::from_millis(500)));
        };
        let started = Instant::now();
        let result = self.post(&webhook, event, &record).await;
        let latency = started.elapsed();
        let label = match &result {
            Attempt::Delivered(_) => "delivered",
            Attempt::Retryable { .. } => "retryable",
            Attempt::Permanent { .. } => "permanent",
        };
        metrics::counter!("comfyq_webhook_attempts_total", "result" => label).increment(1);
        metrics::histogram!("comfyq_webhook_attempt_duration_seconds")
            .record(latency.as_secs_f64());

        let age = (OffsetDateTime::now_utc() - schedule_start).unsigned_abs();
        let (status, error) = match &result {
            Attempt::Delivered(status) => (Some(*status), None),
            Attempt::Retryable { status, reason, .. } | Attempt::Permanent { status, reason } => {
                (*status, Some(reason.clone()))
            }
        };
        delivery.attempts.push(DeliveryAttempt {
            at: OffsetDateTime::now_utc(),
            status,
            error,
            latency_ms: latency.as_millis() as u64,
        });
        let outcome = match result {
            Attempt::Delivered(status) => {
                tracing::info!(status, attempt, "webhook delivered");
                delivery.state = DeliveryState::Delivered;
                delivery.next_attempt_at = None;
                Outcome::Ack
            }
            Attempt::Retryable {
                reason,
                retry_after,
                ..
            } if age < self.config.max_age => {
                let delay = self.backoff(attempt).max(retry_after.unwrap_or_default());
                tracing::warn!(%reason, attempt, retry_in_ms = delay.as_millis() as u64, "webhook failed; will retry");
                delivery.state = DeliveryState::Retrying;
                delivery.next_attempt_at = Some(OffsetDateTime::now_utc() + delay);
                Outcome::Retry(Some(delay))
            }
            Attempt::Retryable { reason, .. } | Attempt::Permanent { reason, .. } => {
                metrics::counter!("comfyq_webhook_dead_letters_total").increment(1);
                tracing::error!(%reason, attempt, "webhook dead-lettered");
                delivery.state = DeliveryState::Dead;
                delivery.next_attempt_at = None;
                Outcome::Reject
            }
        };
        self.save(&key, delivery).await;
        outcome
    }

    async fn load(&self, key: &str) -> Result<(JobDeliveries, Option<u64>), async_nats::Error> {
        match self.deliveries.entry(key).await? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let deliveries = serde_json::from_slice(&entry.value).unwrap_or_default();
                Ok((deliveries, Some(entry.revision)))
            }
            _ => Ok((JobDeliveries::default(), None)),
        }
    }

    /// Writes `delivery` into the job's entry with compare-and-set: several
    /// events of one job may be delivered at once, by several notifiers.
    async fn save(&self, key: &str, delivery: DeliveryRecord) {
        for _ in 0..10 {
            let Ok((mut deliveries, revision)) = self.load(key).await else {
                continue;
            };
            deliveries.upsert(delivery.clone());
            let Ok(bytes) = serde_json::to_vec(&deliveries) else {
                return;
            };
            let written = match revision {
                Some(revision) => self
                    .deliveries
                    .update(key, bytes.into(), revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => self
                    .deliveries
                    .create(key, bytes.into())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            };
            match written {
                Ok(()) => return,
                Err(error) => {
                    tracing::debug!(%error, "delivery record changed meanwhile; retrying")
                }
            }
        }
        tracing::warn!("delivery record not saved after 10 tries");
    }

    /// Progress webhooks are best effort: at most one per job per
    /// `progress_interval`, one attempt, no record (the next one supersedes).
    async fn progress_webhook(&self, event: &Event) -> Outcome {
        let cached = self
            .progress
            .lock()
            .ok()
            .and_then(|p| p.get(&event.job_id).cloned());
        let (webhook, last_sent) = match cached {
            Some(state) => state,
            None => {
                let webhook = match self.jobs.get(&event.tenant, &event.job_id).await {
                    Ok(Some(versioned)) => {
                        versioned.record.webhook.filter(|w| w.wants("job.progress"))
                    }
                    Ok(None) => None,
                    Err(_) => return Outcome::Ack,
                };
                if let Ok(mut progress) = self.progress.lock() {
                    // Jobs end; a bounded cache is enough for the ones running now.
                    if progress.len() > 50_000 {
                        progress.clear();
                    }
                    progress.insert(event.job_id, (webhook.clone(), None));
                }
                (webhook, None)
            }
        };
        let Some(webhook) = webhook else {
            return Outcome::Ack;
        };
        if last_sent.is_some_and(|at| at.elapsed() < self.config.progress_interval) {
            return Outcome::Ack;
        }
        if let Ok(mut progress) = self.progress.lock() {
            progress.insert(event.job_id, (Some(webhook.clone()), Some(Instant::now())));
        }
        if let Ok(Some(versioned)) = self.jobs.get(&event.tenant, &event.job_id).await {
            let result = self.post(&webhook, event, &versioned.record).await;
            tracing::debug!(?result, "progress webhook");
        }
        Outcome::Ack
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

    /// The secrets that sign for this webhook: by URL prefix, else the
    /// tenant's, else the defaults. All of them sign (rotation).
    fn secrets_for(
        &self,
        webhook: &WebhookSpec,
        record: &JobRecord,
    ) -> Vec<standardwebhooks::Webhook> {
        let by_url = self
            .config
            .url_secrets
            .iter()
            .filter(|(prefix, _)| webhook.url.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, secrets)| secrets);
        let secrets = by_url
            .filter(|s| !s.is_empty())
            .or_else(|| {
                self.config
                    .tenant_secrets
                    .get(record.tenant.as_str())
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or(&self.config.default_secrets);
        secrets
            .iter()
            .filter_map(|s| standardwebhooks::Webhook::new(s.expose()).ok())
            .collect()
    }

    async fn post(&self, webhook: &WebhookSpec, event: &Event, record: &JobRecord) -> Attempt {
        let permanent = |reason: String| Attempt::Permanent {
            status: None,
            reason,
        };
        let retryable = |reason: String| Attempt::Retryable {
            status: None,
            reason,
            retry_after: None,
        };
        let url = match url::Url::parse(&webhook.url) {
            Ok(url) => url,
            Err(e) => return permanent(format!("invalid URL: {e}")),
        };
        let addrs = match check_destination(&url, self.config.allow_private_destinations).await {
            Ok(addrs) => addrs,
            Err(refusal @ Refusal::Unresolvable(_)) => return retryable(refusal.to_string()),
            Err(refusal) => return permanent(refusal.to_string()),
        };
        let body = WebhookBody {
            kind: event.type_name(),
            id: event.id.to_string(),
            timestamp: event.at,
            data: json!({ "job": self.summary(record, event) }),
        };
        let Ok(payload) = serde_json::to_vec(&body) else {
            return permanent("body not serializable".to_owned());
        };
        let message_id = event.id.to_string();
        let timestamp = OffsetDateTime::now_utc().unix_timestamp();
        let signatures: Vec<String> = self
            .secrets_for(webhook, record)
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
            Err(e) => return retryable(format!("HTTP client: {e}")),
        };
        let mut request = client
            .post(url)
            .header("content-type", "application/json")
            .header("user-agent", "comfyq-webhooks/1")
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
            Err(e) if e.is_timeout() => retryable(format!(
                "timed out after {} ms",
                self.config.attempt_timeout.as_millis()
            )),
            Err(e) => retryable(format!("request failed: {e}")),
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
        let rfc3339 = |t: OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        };
        let mut job = json!({
            "id": record.id,
            "tenant": record.tenant,
            "status": change.map(|c| c.status).unwrap_or(record.status),
            "priority": record.priority,
            "pool": record.pool,
            "attempt": change.map(|c| c.attempt).unwrap_or(record.attempt),
            "created_at": rfc3339(record.created_at),
            "finished_at": record.finished_at.and_then(rfc3339),
            "outputs": outputs,
            "error": change.and_then(|c| c.error.clone()).or_else(|| record.error.clone()),
            "metadata": record.metadata,
        });
        if let comfyq_shared::event::EventBody::Progress(progress) = &event.body {
            job["progress"] = serde_json::to_value(progress).unwrap_or(Value::Null);
        }
        job
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
        assert!(matches!(
            classify(429, Some("7")),
            Attempt::Retryable { retry_after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        assert!(matches!(classify(410, None), Attempt::Permanent { .. }));
        assert!(matches!(classify(302, None), Attempt::Permanent { .. }));
    }
}
