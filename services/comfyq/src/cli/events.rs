//! One job's events from `GET /v1/jobs/{id}/events` (Server-Sent Events). The
//! server closes the stream after a terminal event; a stream that ends
//! before it (a dropped connection, an ingress restart) is reopened with
//! `Last-Event-ID`, so no event is missed or repeated. A terminal event is
//! the end only if the job still ends there: a dead letter requeued by
//! `retry` has a `job.failed` and then a later attempt, so the feed reads on
//! after an old terminal event.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::Value;

use super::client::{Api, job_path};
use super::error::CliError;

/// Reconnections in a row without an event before giving up.
const MAX_RECONNECTS: u32 = 5;
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// One event: its position in the stream (the SSE `id`) and the event JSON.
#[derive(Debug, Clone)]
pub(crate) struct JobEvent {
    pub(crate) seq: u64,
    pub(crate) kind: String,
    pub(crate) event: Value,
}

impl JobEvent {
    /// `job.completed`, `job.failed`, `job.cancelled`.
    pub(crate) fn is_terminal(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "job.completed" | "job.failed" | "job.cancelled"
        )
    }

    pub(crate) fn data(&self) -> &Value {
        &self.event["data"]
    }
}

type SseStream = BoxStream<
    'static,
    Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>,
>;

pub(crate) struct EventFeed {
    api: Api,
    events_path: String,
    job_path: String,
    last_seq: Option<u64>,
    stream: Option<SseStream>,
    /// The last terminal event's (status, attempt), to check against the job.
    terminal_seen: Option<(String, u64)>,
    done: bool,
}

impl EventFeed {
    /// Events of job `id` from the start, or after event `after`.
    pub(crate) fn new(api: &Api, id: &str, after: Option<u64>) -> Result<Self, CliError> {
        Ok(Self {
            api: api.clone(),
            events_path: job_path(id, "/events")?,
            job_path: job_path(id, "")?,
            last_seq: after,
            stream: None,
            terminal_seen: None,
            done: false,
        })
    }

    /// The id to resume after (what `watch --after` takes).
    pub(crate) fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// The next event; `None` once the job has ended and every event was read.
    /// Cancel-safe between events (`select!` in `submit --wait`): an
    /// interrupted call loses no event.
    pub(crate) async fn next(&mut self) -> Result<Option<JobEvent>, CliError> {
        let mut reconnects = 0;
        if let Some((status, attempt)) = self.terminal_seen.take() {
            let job = self.job().await?;
            let ends_here = job["status"].as_str() == Some(status.as_str())
                && job["attempt"].as_u64() == Some(attempt);
            if ends_here {
                self.done = true;
            } else {
                self.stream = None; // Requeued: read on after the old ending.
            }
        }
        loop {
            if self.done {
                return Ok(None);
            }
            let stream = match &mut self.stream {
                Some(stream) => stream,
                None => {
                    match self.open().await {
                        Ok(stream) => self.stream = Some(stream),
                        // The server went away: try again, a few times.
                        Err(CliError::Unreachable { .. }) if reconnects < MAX_RECONNECTS => {
                            reconnects += 1;
                            tokio::time::sleep(RECONNECT_DELAY).await;
                            continue;
                        }
                        Err(error) => return Err(error),
                    }
                    continue;
                }
            };
            match stream.next().await {
                Some(Ok(message)) => {
                    let Ok(seq) = message.id.trim().parse::<u64>() else {
                        continue; // Not an event of the job stream.
                    };
                    let event: Value = serde_json::from_str(&message.data).map_err(|e| {
                        CliError::Protocol(format!("event {seq} is not JSON ({e})"))
                    })?;
                    self.last_seq = Some(seq);
                    let event = JobEvent {
                        seq,
                        kind: message.event,
                        event,
                    };
                    if event.is_terminal() {
                        let status = event.kind.trim_start_matches("job.").to_owned();
                        let attempt = event.data()["attempt"].as_u64().unwrap_or_default();
                        self.terminal_seen = Some((status, attempt));
                    }
                    return Ok(Some(event));
                }
                Some(Err(_)) | None => {
                    // Closed before the terminal event: if the job has ended
                    // (we resumed after its last event), stop; else reopen.
                    self.stream = None;
                    if self.job_has_ended().await? {
                        self.done = true;
                        return Ok(None);
                    }
                    reconnects += 1;
                    if reconnects > MAX_RECONNECTS {
                        return Err(CliError::Protocol(
                            "the event stream keeps closing before the job ends".to_owned(),
                        ));
                    }
                    tokio::time::sleep(RECONNECT_DELAY).await;
                }
            }
        }
    }

    async fn open(&self) -> Result<SseStream, CliError> {
        let mut request = self
            .api
            .get(&self.events_path)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(seq) = self.last_seq {
            request = request.header("Last-Event-ID", seq.to_string());
        }
        let response = self.api.send(request).await?;
        Ok(response.bytes_stream().eventsource().boxed())
    }

    async fn job(&self) -> Result<Value, CliError> {
        Ok(self.api.json(self.api.get(&self.job_path)).await?.1)
    }

    async fn job_has_ended(&self) -> Result<bool, CliError> {
        Ok(matches!(
            self.job().await?["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ))
    }
}
