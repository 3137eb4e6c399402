//! Event streams for clients: Server-Sent Events and WebSocket, read from
//! the EVENTS stream with an ordered consumer, so a client can replay from
//! the start or resume after any stream sequence (`Last-Event-ID`).

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};

use crate::problem::Problem;
use crate::state::AppState;

/// SSE keep-alive comment interval.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// One stored event as a client receives it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// EVENTS stream sequence: the SSE `id`, to resume after.
    pub seq: u64,
    /// `job.<kind>`.
    pub kind: String,
    pub payload: Bytes,
    pub terminal: bool,
}

/// When a stream ends by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// After the job's terminal event (one job's stream).
    Terminal,
    /// After what is stored now (a finished job's replay).
    CaughtUp,
    /// Never (a tenant's live stream).
    Forever,
}

/// Where the stream starts: after `Last-Event-ID`, else from the start of
/// the filter (`from_start`) or with the next new event.
pub fn start_policy(last_event_id: Option<u64>, from_start: bool) -> DeliverPolicy {
    match last_event_id {
        Some(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
        None if from_start => DeliverPolicy::All,
        None => DeliverPolicy::New,
    }
}

/// Events on `filter` of the EVENTS stream.
pub async fn open(
    state: &AppState,
    filter: String,
    start: DeliverPolicy,
    until: Until,
) -> Result<BoxStream<'static, StoredEvent>, Problem> {
    let consumer = state
        .jobs
        .stream()
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: start,
            ..Default::default()
        })
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    if until == Until::CaughtUp && consumer.cached_info().num_pending == 0 {
        return Ok(futures::stream::empty().boxed());
    }
    let messages = consumer
        .messages()
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    let events = messages.filter_map(|message| async move {
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "event stream consumer");
                return None;
            }
        };
        let info = message.info().ok()?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        let token = message.subject.rsplit('.').next().unwrap_or_default();
        let terminal = matches!(token, "completed" | "failed" | "cancelled");
        Some((
            StoredEvent {
                seq,
                kind: format!("job.{token}"),
                payload: message.payload.clone(),
                terminal,
            },
            pending,
        ))
    });
    Ok(end_when(events, until)
        .take_until(state.shutdown.clone().cancelled_owned())
        .boxed())
}

/// Passes events through, ending after the one that satisfies `until`.
fn end_when(
    events: impl Stream<Item = (StoredEvent, u64)> + Send + 'static,
    until: Until,
) -> impl Stream<Item = StoredEvent> + Send + 'static {
    futures::stream::unfold(
        (Box::pin(events), false),
        move |(mut events, done)| async move {
            if done {
                return None;
            }
            let (event, pending) = events.next().await?;
            let last = match until {
                Until::Terminal => event.terminal,
                Until::CaughtUp => event.terminal || pending == 0,
                Until::Forever => false,
            };
            Some((event, (events, last)))
        },
    )
}
