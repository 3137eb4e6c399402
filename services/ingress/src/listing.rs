//! `GET /v1/jobs`: one tenant's jobs, newest first.
//!
//! Job ids are UUIDv7, so ids sort by creation time and carry it. Every job
//! has exactly one `accepted` state event, so listing reads the subjects of
//! those — a headers-only ordered consumer filtered to
//! `…events.<tenant>.*.accepted` (no bodies travel) — sorts the ids, applies
//! the cursor and time bounds from the ids alone, and then reads records only
//! for the page (plus those a status filter skips). No index to keep in step.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use comfyq_shared::ids::{JobId, TenantId};
use comfyq_shared::job::JobStatus;
use comfyq_shared::job_store::JobStoreError;
use futures::StreamExt;
use time::OffsetDateTime;

use crate::api::{JobPage, JobView, ListQuery};
use crate::problem::{InvalidParam, Problem};
use crate::state::AppState;

pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 200;
/// Records read concurrently while filling a page.
const READ_AHEAD: usize = 16;

/// A checked `ListQuery`.
#[derive(Debug)]
struct Filter {
    statuses: Option<HashSet<JobStatus>>,
    after: Option<OffsetDateTime>,
    before: Option<OffsetDateTime>,
    limit: usize,
    cursor: Option<JobId>,
}

fn parse(query: &ListQuery) -> Result<Filter, Problem> {
    let mut errors = Vec::new();
    let mut fail = |pointer: &str, message: String| {
        errors.push(InvalidParam {
            pointer: pointer.to_owned(),
            message,
        })
    };
    let statuses = query.status.as_deref().map(|raw| {
        raw.split(',')
            .filter_map(|s| {
                let parsed = serde_json::from_value::<JobStatus>(s.trim().into());
                if parsed.is_err() {
                    fail(
                        "/status",
                        format!(
                            "unknown status {s:?}; known: {}",
                            JobStatus::ALL.map(JobStatus::as_str).join(", ")
                        ),
                    );
                }
                parsed.ok()
            })
            .collect()
    });
    let mut time = |name: &str, raw: &Option<String>| {
        raw.as_deref().and_then(|raw| {
            OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
                .map_err(|e| fail(&format!("/{name}"), format!("not an RFC 3339 time: {e}")))
                .ok()
        })
    };
    let after = time("created_after", &query.created_after);
    let before = time("created_before", &query.created_before);
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        fail("/limit", format!("must be 1 to {MAX_LIMIT}"));
    }
    let cursor = query.cursor.as_deref().and_then(|raw| {
        raw.parse::<JobId>()
            .map_err(|_| fail("/cursor", "not a cursor from a previous page".to_owned()))
            .ok()
    });
    if errors.is_empty() {
        Ok(Filter {
            statuses,
            after,
            before,
            limit,
            cursor,
        })
    } else {
        Err(Problem::validation(errors))
    }
}

fn created_at(id: &JobId) -> Option<OffsetDateTime> {
    let (seconds, nanos) = id.as_uuid().get_timestamp()?.to_unix();
    OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(seconds) * 1_000_000_000 + i128::from(nanos),
    )
    .ok()
}

/// The ids of every job the tenant has, unordered.
pub(crate) async fn tenant_job_ids(
    state: &AppState,
    tenant: &TenantId,
) -> Result<Vec<JobId>, Problem> {
    let filter = state.names.tenant_accepted_filter(tenant);
    let names = state.names.clone();
    job_ids_in(
        state,
        &state.names.events_stream(),
        filter,
        move |subject| names.parse_event_subject(subject).map(|(_, job)| job),
    )
    .await
}

/// The job ids among the live keys of a bucket's stream under `filter`
/// (`$KV.<bucket>.<tenant>.*`), unordered, read from headers only.
pub(crate) async fn job_ids_in_bucket(
    state: &AppState,
    kv_stream: &str,
    filter: String,
) -> Result<Vec<JobId>, Problem> {
    let key_prefix = filter.trim_end_matches('*').to_owned();
    job_ids_in(state, kv_stream, filter, move |subject| {
        subject
            .strip_prefix(&key_prefix)
            .and_then(|raw| raw.parse::<JobId>().ok())
    })
    .await
}

/// The job ids `id_of` reads from the subjects of the last message of each
/// subject under `filter` in `stream`, unordered, from headers only.
async fn job_ids_in(
    state: &AppState,
    stream: &str,
    filter: String,
    id_of: impl Fn(&str) -> Option<JobId>,
) -> Result<Vec<JobId>, Problem> {
    let kv_stream = stream;
    let stream = state
        .js
        .get_stream(kv_stream)
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::LastPerSubject,
            headers_only: true,
            ..Default::default()
        })
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    let total = consumer.cached_info().num_pending;
    let mut ids = Vec::with_capacity(total as usize);
    if total == 0 {
        return Ok(ids);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    loop {
        let message = match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(Problem::unavailable(&e)),
            Ok(None) | Err(_) => {
                return Err(Problem::unavailable(&std::io::Error::other(
                    "listing a bucket's keys stalled",
                )));
            }
        };
        // A deleted or purged key leaves a marker with this header.
        let removed = message
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|op| op.as_str() != "PUT");
        if !removed && let Some(id) = id_of(message.subject.as_str()) {
            ids.push(id);
        }
        if message.info().map_or(0, |info| info.pending) == 0 {
            return Ok(ids);
        }
    }
}

pub async fn list(
    state: &AppState,
    tenant: &TenantId,
    query: &ListQuery,
) -> Result<JobPage, Problem> {
    let filter = parse(query)?;
    let mut ids = tenant_job_ids(state, tenant).await?;
    ids.sort_unstable_by(|a, b| b.cmp(a));
    let candidates: Vec<JobId> = ids
        .into_iter()
        .filter(|id| filter.cursor.is_none_or(|cursor| *id < cursor))
        .filter(|id| {
            let created = created_at(id);
            filter.after.is_none_or(|after| created >= Some(after))
                && filter.before.is_none_or(|before| created < Some(before))
        })
        .collect();
    let remaining = candidates.len();
    let mut records = futures::stream::iter(candidates)
        .map(|id| async move { state.jobs.get(tenant, &id).await })
        .buffered(READ_AHEAD);
    let mut jobs = Vec::new();
    let mut read = 0;
    while let Some(result) = records.next().await {
        read += 1;
        let record = match result {
            Ok(Some(versioned)) => versioned.record,
            Ok(None) => continue,
            Err(JobStoreError::Nats(e)) => return Err(Problem::unavailable(&*e)),
            Err(e) => return Err(Problem::internal(&e)),
        };
        if filter
            .statuses
            .as_ref()
            .is_none_or(|wanted| wanted.contains(&record.status))
        {
            jobs.push(JobView::from_record(record));
            if jobs.len() == filter.limit {
                break;
            }
        }
    }
    let next_cursor = (jobs.len() == filter.limit && read < remaining)
        .then(|| jobs.last().map(|job| job.id.to_string()))
        .flatten();
    Ok(JobPage { jobs, next_cursor })
}
