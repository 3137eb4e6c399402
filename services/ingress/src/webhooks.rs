//! `GET /v1/jobs/{id}/webhooks`: every delivery of the job's events with
//! every attempt; `POST /v1/jobs/{id}/webhooks/redeliver`: send dead ones again.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use comfyq_shared::job::SCHEMA_VERSION;
use comfyq_shared::webhook::{DeliveryRecord, DeliveryState, JobDeliveries, RedeliverWebhook};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::auth::Tenant;
use crate::problem::Problem;
use crate::routes::load_job;
use crate::state::AppState;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/jobs/{id}/webhooks", get(list_deliveries))
        .route("/v1/jobs/{id}/webhooks/redeliver", post(redeliver))
}

#[derive(Debug, Serialize)]
pub struct DeliveryView {
    pub event_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub url: String,
    pub state: DeliveryState,
    pub attempts: Vec<comfyq_shared::webhook::DeliveryAttempt>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
}

impl From<&DeliveryRecord> for DeliveryView {
    fn from(record: &DeliveryRecord) -> Self {
        Self {
            event_id: record.event.id.to_string(),
            event_type: record.event.type_name(),
            url: record.url.clone(),
            state: record.state,
            attempts: record.attempts.clone(),
            next_attempt_at: record.next_attempt_at,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct DeliveriesView {
    pub job_id: String,
    pub deliveries: Vec<DeliveryView>,
}

async fn deliveries(state: &AppState, key: &str) -> Result<JobDeliveries, Problem> {
    match state.webhooks.get(key).await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).map_err(|e| Problem::internal(&e)),
        Ok(None) => Ok(JobDeliveries::default()),
        Err(e) => Err(Problem::unavailable(&e)),
    }
}

async fn list_deliveries(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<DeliveriesView>, Problem> {
    let record = load_job(&state, &tenant, &id).await?;
    let key = state.names.job_key(&record.tenant, &record.id);
    let deliveries = deliveries(&state, &key).await?;
    Ok(Json(DeliveriesView {
        job_id: record.id.to_string(),
        deliveries: deliveries
            .deliveries
            .iter()
            .map(DeliveryView::from)
            .collect(),
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedeliverRequest {
    /// Only these events (ids); by default every dead delivery.
    #[serde(default)]
    pub event_ids: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RedeliverView {
    pub job_id: String,
    /// Event ids queued for redelivery.
    pub redelivering: Vec<String>,
}

async fn redeliver(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    body: Option<Json<RedeliverRequest>>,
) -> Result<(StatusCode, Json<RedeliverView>), Problem> {
    let request = body.map(|Json(r)| r).unwrap_or_default();
    let record = load_job(&state, &tenant, &id).await?;
    let key = state.names.job_key(&record.tenant, &record.id);
    let deliveries = deliveries(&state, &key).await?;
    let chosen: Vec<&DeliveryRecord> = if request.event_ids.is_empty() {
        deliveries
            .deliveries
            .iter()
            .filter(|d| d.state == DeliveryState::Dead)
            .collect()
    } else {
        let mut chosen = Vec::new();
        for event_id in &request.event_ids {
            match deliveries
                .deliveries
                .iter()
                .find(|d| d.event.id.to_string() == *event_id)
            {
                Some(delivery) => chosen.push(delivery),
                None => return Err(Problem::not_found(&format!("delivery of event {event_id}"))),
            }
        }
        chosen
    };
    let now = OffsetDateTime::now_utc();
    let mut redelivering = Vec::new();
    for delivery in chosen {
        let message = RedeliverWebhook {
            v: SCHEMA_VERSION,
            tenant: record.tenant.clone(),
            job_id: record.id,
            event: delivery.event.clone(),
            requested_at: now,
        };
        let payload = serde_json::to_vec(&message).map_err(|e| Problem::internal(&e))?;
        state
            .js
            .publish(state.names.webhook_redeliver_subject(), payload.into())
            .await
            .map_err(|e| Problem::unavailable(&e))?
            .await
            .map_err(|e| Problem::unavailable(&e))?;
        redelivering.push(delivery.event.id.to_string());
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(RedeliverView {
            job_id: record.id.to_string(),
            redelivering,
        }),
    ))
}
