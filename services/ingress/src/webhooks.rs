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
use utoipa::ToSchema;

use crate::auth::Tenant;
use crate::problem::Problem;
use crate::routes::load_job;
use crate::state::AppState;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/jobs/{id}/webhooks", get(list_deliveries))
        .route("/v1/jobs/{id}/webhooks/redeliver", post(redeliver))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    pub event_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub url: String,
    pub state: DeliveryState,
    pub attempts: Vec<comfyq_shared::webhook::DeliveryAttempt>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
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

#[derive(Debug, Serialize, ToSchema)]
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

/// The job's deliveries in brief, for the job view (empty if unreadable).
pub(crate) async fn summaries(
    state: &AppState,
    tenant: &comfyq_shared::TenantId,
    job: &comfyq_shared::JobId,
) -> Vec<crate::api::WebhookDeliverySummary> {
    let key = state.names.job_key(tenant, job);
    let Ok(deliveries) = deliveries(state, &key).await else {
        return Vec::new();
    };
    deliveries
        .deliveries
        .iter()
        .map(|d| crate::api::WebhookDeliverySummary {
            event_type: d.event.type_name(),
            state: serde_json::to_value(d.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            attempts: d.attempts.len(),
        })
        .collect()
}

/// Every webhook delivery of the job's events, with every attempt.
#[utoipa::path(get, path = "/v1/jobs/{id}/webhooks", tag = "webhooks",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job's deliveries", body = DeliveriesView),
        (status = 404, description = "No such job for this tenant", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_deliveries(
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

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RedeliverRequest {
    /// Only these events (ids); by default every dead delivery.
    #[serde(default)]
    pub event_ids: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RedeliverView {
    pub job_id: String,
    /// Event ids queued for redelivery.
    pub redelivering: Vec<String>,
}

/// Sends dead deliveries (or the given events) again, same `webhook-id`.
#[utoipa::path(post, path = "/v1/jobs/{id}/webhooks/redeliver", tag = "webhooks",
    params(("id" = String, Path, description = "Job id")),
    request_body(content = Option<RedeliverRequest>, description = "Events to redeliver; by default every dead delivery"),
    responses(
        (status = 202, description = "Redeliveries queued", body = RedeliverView),
        (status = 400, description = "Malformed body", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such job, or no delivery of a named event", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn redeliver(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<RedeliverView>), Problem> {
    // The body is optional: empty means every dead delivery.
    let request: RedeliverRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RedeliverRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Problem::bad_request(format!("invalid JSON body: {e}")))?
    };
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
