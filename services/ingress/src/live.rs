//! What a job record does not hold but a client wants to see: the latest
//! progress (its live events), the queue position (the pending and dispatch
//! subjects) and waiting for the end (a subscription to its state events).

use std::time::Duration;

use async_nats::jetstream::consumer;
use async_nats::jetstream::stream;
use comfyq_shared::event::{Event, EventBody, EventKind};
use comfyq_shared::job::{JobRecord, JobStatus};
use futures::StreamExt;

use crate::api::ProgressView;
use crate::problem::Problem;
use crate::state::AppState;

/// Scanning the own dispatch subject for the position stops here (one
/// message get each); the answer is then a lower bound.
const POSITION_SCAN_LIMIT: u64 = 1_000;

/// The latest progress of a running job: two direct gets of the last
/// message on the job's `node` and `progress` subjects (cheap, no consumer).
pub async fn progress(state: &AppState, record: &JobRecord) -> Option<ProgressView> {
    if record.status != JobStatus::Running {
        return None;
    }
    let stream = state.jobs.stream();
    let last = async |kind| {
        let subject = state.names.event_subject(&record.tenant, &record.id, kind);
        let message = stream.direct_get_last_for_subject(subject).await.ok()?;
        let event: Event = serde_json::from_slice(&message.payload).ok()?;
        // Progress of an earlier attempt says nothing about this one.
        let started = record.started_at?;
        (event.at >= started).then_some((message.sequence, event.body))
    };
    let node = last(EventKind::Node).await;
    let step = last(EventKind::Progress).await;
    let mut view = ProgressView::default();
    if let Some((_, EventBody::Node(node))) = &node {
        view.node_id = node.node_id.clone();
        view.node_type = node.node_type.clone();
        view.fraction = node.fraction;
    }
    if let Some((step_seq, EventBody::Progress(step))) = &step {
        let node_seq = node.as_ref().map_or(0, |(seq, _)| *seq);
        if *step_seq > node_seq || view.node_id.as_deref() == Some(step.node_id.as_str()) {
            view.node_id = Some(step.node_id.clone());
            view.value = Some(step.value);
            view.max = Some(step.max);
            view.fraction = view.fraction.max(step.fraction);
        }
    }
    (node.is_some() || step.is_some()).then_some(view)
}

/// About how many jobs of the job's pool start before it.
///
/// A queued job waits in PENDING, where the scheduler picks by priority
/// (with ageing) and tenant fairness: the estimate counts every pending job
/// of a higher priority plus those of its own priority submitted before it.
/// A dispatched job is counted from the DISPATCH stream: the messages of
/// its pool the dispatch consumer has not delivered yet, ahead of its own.
pub async fn queue_position(state: &AppState, record: &JobRecord) -> Option<u64> {
    match record.status {
        JobStatus::Queued => pending_position(state, record).await,
        JobStatus::Dispatched | JobStatus::Retrying => dispatch_position(state, record).await,
        _ => None,
    }
}

async fn pending_position(state: &AppState, record: &JobRecord) -> Option<u64> {
    let stream = &state.pending;
    let mut subjects = stream
        .info_with_subjects(state.names.pending_pool_filter(&record.pool))
        .await
        .ok()?;
    let mut ahead = 0;
    while let Some(Ok((subject, count))) = subjects.next().await {
        if let Some((_, priority, _)) = state.names.parse_pending_subject(&subject)
            && priority < record.priority
        {
            ahead += count as u64;
        }
    }
    let filter = state
        .names
        .pending_priority_filter(&record.pool, record.priority);
    Some(ahead + scan_ahead(stream, &filter, 1, record).await)
}

async fn dispatch_position(state: &AppState, record: &JobRecord) -> Option<u64> {
    let stream = state
        .js
        .get_stream(state.names.dispatch_stream())
        .await
        .ok()?;
    // One FIFO consumer per pool (the dispatcher publishes in priority
    // order): what is ahead is what it has not delivered yet before the job.
    let name = state.names.dispatch_consumer(&record.pool);
    let first = match stream.get_consumer::<consumer::pull::Config>(&name).await {
        Ok(mut consumer) => consumer
            .info()
            .await
            .map_or(1, |info| info.delivered.stream_sequence + 1),
        Err(_) => 1,
    };
    let filter = state.names.dispatch_pool_filter(&record.pool);
    Some(scan_ahead(&stream, &filter, first, record).await)
}

/// Messages on `filter` from sequence `first` before the job's own (named
/// by its headers), one message get each, capped.
async fn scan_ahead(stream: &stream::Stream, filter: &str, first: u64, record: &JobRecord) -> u64 {
    let job_prefix = record.id.to_string();
    let mut next = first;
    let mut scanned = 0;
    while scanned < POSITION_SCAN_LIMIT {
        let Ok(message) = stream.get_first_raw_message_by_subject(filter, next).await else {
            return scanned;
        };
        // Dispatch messages are named by their message id (`<job>:<attempt>`),
        // pending ones by a header of their own.
        let ours = [
            async_nats::header::NATS_MESSAGE_ID.as_ref(),
            comfyq_shared::job_store::JOB_ID_HEADER,
        ]
        .iter()
        .any(|name| {
            message
                .headers
                .get(*name)
                .is_some_and(|id| id.as_str().starts_with(&job_prefix))
        });
        if ours {
            return scanned;
        }
        scanned += 1;
        next = message.sequence + 1;
    }
    scanned
}

/// Waits until the job's record is terminal or `timeout` passes; the
/// terminal record, or `None` on timeout. Live state events come on a core
/// subscription (no consumer); the record is read once the subscription is
/// open, so an end written in between is not missed.
pub async fn wait_terminal(
    state: &AppState,
    record: &JobRecord,
    timeout: Duration,
) -> Result<Option<JobRecord>, Problem> {
    if record.status.is_terminal() {
        return Ok(Some(record.clone()));
    }
    let filter = state.names.job_state_filter(&record.tenant, &record.id);
    let mut changes = state
        .client
        .subscribe(filter.clone())
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    let wait = async {
        if let Ok(Some(current)) = state.jobs.get(&record.tenant, &record.id).await
            && current.record.status.is_terminal()
        {
            return Some(current.record);
        }
        while let Some(message) = changes.next().await {
            if let Ok(record) = comfyq_shared::job_store::decode(&filter, &message.payload)
                && record.status.is_terminal()
            {
                return Some(record);
            }
        }
        None
    };
    Ok(tokio::time::timeout(timeout, wait).await.ok().flatten())
}
