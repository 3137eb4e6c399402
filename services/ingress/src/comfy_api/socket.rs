//! `GET /ws?clientId=`: ComfyUI's WebSocket for the prompts a client
//! submitted, wherever in the fleet they run.
//!
//! The socket follows the tenant's events (an ordered consumer from now)
//! and previews (core NATS). For the client's own prompts it forwards the
//! messages the runner's ComfyUI sent (`job.comfy` events) with the prompt
//! id and file names rewritten, and the previews as ComfyUI's binary frames
//! (event 4 after the client's `feature_flags` handshake, else event 1).
//! The end of a prompt (`execution_success`/`_error`/`_interrupted`, then
//! `executing {node: null}`) is held until the job's terminal state event,
//! so once the client hears it, `/history` and `/view` have the outputs.
//! `status` (the tenant's unfinished jobs) goes to every socket of the
//! tenant when a ComfyUI API prompt is queued, starts and ends. A client
//! that reconnects with the same `clientId` hears the rest of its running
//! prompts: the socket learns whose a job is from the job's record.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::DeliverPolicy;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use comfyq_shared::event::{
    ComfyMessage, Event, EventBody, PREVIEW_AFTER_HEADER, PREVIEW_METADATA_HEADER,
};
use comfyq_shared::ids::{JobId, TenantId};
use comfyq_shared::job::{ComfyPrompt, JobRecord, JobStatus};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ComfyTenant, Rewrite, queue_remaining};
use crate::problem::Problem;
use crate::state::AppState;
use crate::streams::{self, StoredEvent, Until};

#[derive(Debug, Deserialize)]
pub(crate) struct SocketQuery {
    #[serde(rename = "clientId")]
    client_id: Option<String>,
}

pub(crate) async fn connect(
    State(state): State<AppState>,
    ComfyTenant(tenant): ComfyTenant,
    Query(query): Query<SocketQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, Problem> {
    let sid = query
        .client_id
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| Uuid::new_v4().simple().to_string());
    // Both are open before the upgrade answers, so a prompt the client
    // submits once connected is heard from its first event.
    let events = streams::open(
        &state,
        state.names.tenant_events_filter(&tenant),
        DeliverPolicy::New,
        Until::Forever,
    )
    .await?;
    let previews = state
        .client
        .subscribe(state.names.tenant_previews_filter(&tenant))
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    let session = Session {
        state,
        tenant,
        sid,
        jobs: HashMap::new(),
        preview_metadata: false,
    };
    Ok(upgrade.on_upgrade(move |socket| session.run(socket, events, previews)))
}

/// What the socket knows of one job of the tenant.
#[derive(Debug)]
struct Tracked {
    prompt: ComfyPrompt,
    /// Whether the prompt is this socket's client's.
    mine: bool,
    /// The attempt's prompt id on its runner's ComfyUI, once heard.
    comfy_prompt_id: Option<String>,
    /// The end of the prompt, held until the job's terminal state.
    held: Vec<Value>,
    ending: bool,
    current_node: Option<String>,
    done: bool,
    /// The attempt's last `job.comfy` event heard (its `seq`), and its
    /// last `progress` message's.
    heard: u64,
    last_progress: u64,
    /// Previews that go after a message not yet heard.
    waiting_previews: Vec<WaitingPreview>,
    /// Previews of the attempt received, and messages that wait for the
    /// previews sent before them (with when they arrived).
    previews_seen: u64,
    queued: VecDeque<(Instant, ComfyMessage)>,
}

/// Longest a message waits for a preview sent before it (a preview can be
/// lost: previews are published without acknowledgement).
const PREVIEW_WAIT: Duration = Duration::from_millis(250);

/// A preview frame and where it goes: after the attempt's message number
/// `after`, and, when it was sent before its step's `progress` (ComfyUI's
/// order with preview metadata) but goes to a client without it, after
/// that `progress` too (ComfyUI's legacy order).
#[derive(Debug)]
struct WaitingPreview {
    after: u64,
    after_progress: bool,
    frame: Frame,
}

#[derive(Debug)]
enum Frame {
    Text(Value),
    Binary(Bytes),
    /// `status` with the queue count as it is when sent.
    Status,
}

struct Session {
    state: AppState,
    tenant: TenantId,
    sid: String,
    /// Jobs seen (`None`: not a ComfyUI API job).
    jobs: HashMap<JobId, Option<Tracked>>,
    preview_metadata: bool,
}

fn status_message(remaining: u64, sid: Option<&str>) -> Value {
    let mut data = json!({"status": {"exec_info": {"queue_remaining": remaining}}});
    if let Some(sid) = sid {
        data["sid"] = Value::String(sid.to_owned());
    }
    json!({"type": "status", "data": data})
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl Session {
    async fn run(
        mut self,
        mut socket: WebSocket,
        mut events: futures::stream::BoxStream<'static, StoredEvent>,
        mut previews: async_nats::Subscriber,
    ) {
        let hello = status_message(
            queue_remaining(&self.state, &self.tenant).await,
            Some(&self.sid),
        );
        if send(&mut socket, Frame::Text(hello)).await.is_err() {
            return;
        }
        let shutdown = self.state.shutdown.clone();
        let mut overdue = tokio::time::interval(PREVIEW_WAIT / 5);
        overdue.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let frames = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = overdue.tick() => self.release_overdue(),
                event = events.next() => match event {
                    Some(event) => self.on_event(&event).await,
                    None => break,
                },
                preview = previews.next() => match preview {
                    Some(message) => self.on_preview(message).await,
                    None => break,
                },
                incoming = socket.recv() => match incoming {
                    None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => return,
                    Some(Ok(WsMessage::Text(text))) => self.on_client_message(text.as_str()),
                    // Pings are answered by axum; ComfyUI ignores the rest.
                    Some(Ok(_)) => Vec::new(),
                },
            };
            for frame in frames {
                let frame = match frame {
                    Frame::Status => self.status().await,
                    other => other,
                };
                if send(&mut socket, frame).await.is_err() {
                    return;
                }
            }
        }
        // Ends only at shutdown or when the event stream stops.
        if let Err(error) = socket.send(WsMessage::Close(None)).await {
            tracing::debug!(%error, "closing a ComfyUI API socket");
        }
    }

    /// The client's feature-flag handshake: ComfyUI answers with its own.
    fn on_client_message(&mut self, text: &str) -> Vec<Frame> {
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            return Vec::new();
        };
        if message["type"] != "feature_flags" {
            return Vec::new();
        }
        self.preview_metadata = message["data"]["supports_preview_metadata"] == true;
        vec![Frame::Text(
            json!({"type": "feature_flags", "data": super::info::feature_flags(&self.state)}),
        )]
    }

    /// `status` with the tenant's queue count now.
    async fn status(&self) -> Frame {
        Frame::Text(status_message(
            queue_remaining(&self.state, &self.tenant).await,
            None,
        ))
    }

    /// The job's entry, read from its record the first time it is seen.
    async fn track(&mut self, job: JobId, record: Option<&JobRecord>) -> Option<&mut Tracked> {
        if !self.jobs.contains_key(&job) {
            let fetched;
            let from_event = record.is_some();
            let record = match record {
                Some(record) => Some(record),
                None => {
                    fetched = self
                        .state
                        .jobs
                        .get(&self.tenant, &job)
                        .await
                        .ok()
                        .flatten()
                        .map(|v| v.record);
                    fetched.as_ref()
                }
            };
            // A live event of a job whose record says it is over came late:
            // ignored. (A terminal state event itself is heard.)
            let over = !from_event && record.is_some_and(|r| r.status.is_terminal());
            let tracked = record.and_then(|r| r.comfy.clone()).map(|prompt| Tracked {
                mine: prompt.client_id.as_deref() == Some(self.sid.as_str()),
                prompt,
                comfy_prompt_id: None,
                held: Vec::new(),
                ending: false,
                current_node: None,
                done: over,
                heard: 0,
                last_progress: 0,
                waiting_previews: Vec::new(),
                previews_seen: 0,
                queued: VecDeque::new(),
            });
            self.jobs.insert(job, tracked);
        }
        self.jobs.get_mut(&job).and_then(Option::as_mut)
    }

    async fn on_event(&mut self, stored: &StoredEvent) -> Vec<Frame> {
        let Ok(event) = serde_json::from_slice::<Event>(&stored.payload) else {
            return Vec::new();
        };
        let job = event.job_id;
        match &event.body {
            EventBody::Comfy(message) => {
                let message = message.clone();
                match self.track(job, None).await {
                    Some(tracked) if tracked.mine && !tracked.done => {
                        tracked.queued.push_back((Instant::now(), message));
                        tracked.release(job, false)
                    }
                    // A prompt without a client id: ComfyUI tells every
                    // socket its `progress_state`.
                    Some(tracked) if tracked.prompt.client_id.is_none() && !tracked.done => {
                        tracked.broadcast(job, message)
                    }
                    _ => Vec::new(),
                }
            }
            body if body.state_change().is_some() => {
                let Some(record) = event.record.as_deref() else {
                    return Vec::new();
                };
                let status = record.status;
                if status.is_terminal() && record.comfy.is_none() {
                    // Not a ComfyUI API job: nothing more to know of it.
                    self.jobs.remove(&job);
                    return Vec::new();
                }
                let Some(tracked) = self.track(job, Some(record)).await else {
                    return Vec::new();
                };
                if tracked.done {
                    return Vec::new();
                }
                let mine = tracked.mine;
                match status {
                    JobStatus::Queued => vec![Frame::Status],
                    // The client's own prompt: `status` goes right before
                    // its `execution_start`, as ComfyUI sends it.
                    JobStatus::Running if !mine => vec![Frame::Status],
                    JobStatus::Retrying => {
                        tracked.held.clear();
                        tracked.ending = false;
                        tracked.heard = 0;
                        tracked.last_progress = 0;
                        tracked.waiting_previews.clear();
                        tracked.previews_seen = 0;
                        tracked.queued.clear();
                        Vec::new()
                    }
                    status if status.is_terminal() => {
                        // Its last event: the socket forgets it (its live
                        // events all came before).
                        let Some(Some(mut tracked)) = self.jobs.remove(&job) else {
                            return Vec::new();
                        };
                        if !mine {
                            return vec![self.status_after_end(record).await];
                        }
                        // Whatever still waits for a preview goes first.
                        let mut frames = tracked.release(job, true);
                        frames.extend(tracked.end(record));
                        let started =
                            tracked.comfy_prompt_id.is_some() || status == JobStatus::Failed;
                        let prompt_id = tracked.prompt.prompt_id.clone();
                        frames.push(self.status_after_end(record).await);
                        if started {
                            frames.push(Frame::Text(json!({"type": "executing",
                                "data": {"node": null, "prompt_id": prompt_id}})));
                        }
                        frames
                    }
                    _ => Vec::new(),
                }
            }
            _ => Vec::new(),
        }
    }

    /// `status` once `record`'s job has ended. Its runner acknowledges the
    /// dispatch message just after writing the end, so the count may still
    /// hold the job: if its message is still there after counting, it was
    /// counted and is taken off; if not, a second count cannot hold it.
    async fn status_after_end(&self, record: &JobRecord) -> Frame {
        let counted = queue_remaining(&self.state, &self.tenant).await;
        let remaining = if counted > 0 && self.still_dispatched(record).await {
            counted - 1
        } else if counted > 0 {
            queue_remaining(&self.state, &self.tenant).await
        } else {
            0
        };
        Frame::Text(status_message(remaining, None))
    }

    /// Whether the job's dispatch message is the last on its subject (a
    /// later one of the same tenant, pool and priority hides it: then no).
    async fn still_dispatched(&self, record: &JobRecord) -> bool {
        #[derive(Deserialize)]
        struct Dispatched {
            spec: DispatchedSpec,
        }
        #[derive(Deserialize)]
        struct DispatchedSpec {
            id: JobId,
        }
        let names = &self.state.names;
        let subject = names.dispatch_subject(&record.pool, record.priority, &record.tenant);
        let Ok(stream) = self
            .state
            .js
            .get_stream_no_info(names.dispatch_stream())
            .await
        else {
            return false;
        };
        let Ok(message) = stream.get_last_raw_message_by_subject(&subject).await else {
            return false;
        };
        serde_json::from_slice::<Dispatched>(&message.payload).is_ok_and(|d| d.spec.id == record.id)
    }

    /// Messages that waited too long for a preview.
    fn release_overdue(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        for (job, tracked) in &mut self.jobs {
            if let Some(tracked) = tracked
                && tracked
                    .queued
                    .front()
                    .is_some_and(|(at, _)| at.elapsed() >= PREVIEW_WAIT)
            {
                frames.extend(tracked.release(*job, true));
            }
        }
        frames
    }

    async fn on_preview(&mut self, message: async_nats::Message) -> Vec<Frame> {
        let Some((_, job)) = message.subject.rsplit_once('.') else {
            return Vec::new();
        };
        let Ok(job) = job.parse::<JobId>() else {
            return Vec::new();
        };
        let mut frames: Vec<Frame> = self.preview(job, message).await.into_iter().collect();
        if let Some(Some(tracked)) = self.jobs.get_mut(&job) {
            frames.extend(tracked.release(job, false));
        }
        frames
    }

    /// The preview as the client's frame, now or (`None`) once the message
    /// it follows is heard.
    async fn preview(&mut self, job: JobId, message: async_nats::Message) -> Option<Frame> {
        let headers = message.headers.as_ref();
        let content_type = headers
            .and_then(|h| h.get("Content-Type"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_else(|| "image/jpeg".to_owned());
        let metadata = headers
            .and_then(|h| h.get(PREVIEW_METADATA_HEADER))
            .and_then(|v| serde_json::from_str::<Value>(v.as_str()).ok());
        let after: u64 = headers
            .and_then(|h| h.get(PREVIEW_AFTER_HEADER))
            .and_then(|v| v.as_str().parse().ok())
            .unwrap_or(0);
        let with_metadata = self.preview_metadata;
        let metadata_sent = metadata.is_some();
        let tracked = self.track(job, None).await?;
        if !tracked.mine || tracked.done || tracked.ending {
            return None;
        }
        tracked.previews_seen += 1;
        let mut out = BytesMut::new();
        if with_metadata {
            let node = tracked.current_node.clone();
            let mut metadata = metadata.unwrap_or_else(|| {
                json!({"node_id": node, "display_node_id": node, "parent_node_id": null,
                    "real_node_id": node, "image_type": content_type})
            });
            metadata["prompt_id"] = Value::String(tracked.prompt.prompt_id.clone());
            let json = serde_json::to_vec(&metadata).ok()?;
            out.put_u32(4);
            out.put_u32(u32::try_from(json.len()).ok()?);
            out.put_slice(&json);
        } else {
            out.put_u32(1);
            // ComfyUI's image type codes: 1 JPEG, 2 PNG.
            out.put_u32(if content_type == "image/png" { 2 } else { 1 });
        }
        out.put_slice(&message.payload);
        let waiting = WaitingPreview {
            after,
            after_progress: metadata_sent && !with_metadata && tracked.last_progress <= after,
            frame: Frame::Binary(out.freeze()),
        };
        if tracked.heard >= after && !waiting.after_progress {
            return Some(waiting.frame);
        }
        tracked.waiting_previews.push(waiting);
        None
    }
}

impl Tracked {
    /// What every socket hears of a prompt submitted without a client id.
    fn broadcast(&mut self, job: JobId, message: ComfyMessage) -> Vec<Frame> {
        let Some(mut message) = message.message else {
            return Vec::new();
        };
        if message["type"] != "progress_state" {
            return Vec::new();
        }
        Rewrite {
            comfy_prompt_id: &message_prompt_id(&message, None),
            prompt: &self.prompt,
            job,
        }
        .apply(&mut message);
        vec![Frame::Text(message)]
    }

    /// The queued messages whose previews have all arrived (or every one,
    /// with `force`), as the client is to hear them.
    fn release(&mut self, job: JobId, force: bool) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some((arrived, message)) = self.queued.front() {
            let ready = force
                || message.previews <= self.previews_seen
                || arrived.elapsed() >= PREVIEW_WAIT;
            if !ready {
                break;
            }
            if let Some((_, message)) = self.queued.pop_front() {
                frames.extend(self.comfy_message(job, message));
            }
        }
        frames
    }

    /// A message of the runner's ComfyUI, as the client is to hear it (with
    /// the previews that came after it; a `status` before the prompt's
    /// start).
    fn comfy_message(&mut self, job: JobId, message: ComfyMessage) -> Vec<Frame> {
        let seq = message.seq;
        self.heard = self.heard.max(seq);
        let is_progress = message
            .message
            .as_ref()
            .is_some_and(|m| m["type"] == "progress");
        let (starts, mut frames) = self.comfy_frames(job, message);
        if starts {
            // ComfyUI's `status` as the prompt leaves its queue.
            frames.insert(0, Frame::Status);
        }
        if is_progress {
            self.last_progress = self.last_progress.max(seq);
            for waiting in &mut self.waiting_previews {
                if waiting.after < seq {
                    waiting.after_progress = false;
                }
            }
        }
        let heard = self.heard;
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting_previews)
            .into_iter()
            .partition(|w| w.after <= heard && !w.after_progress);
        self.waiting_previews = waiting;
        if !self.ending {
            frames.extend(due.into_iter().map(|w| w.frame));
        }
        frames
    }

    fn comfy_frames(&mut self, job: JobId, message: ComfyMessage) -> (bool, Vec<Frame>) {
        self.comfy_prompt_id = Some(message.comfy_prompt_id.clone());
        if let Some(text) = message.progress_text {
            if self.ending {
                return (false, Vec::new());
            }
            let mut out = BytesMut::new();
            out.put_u32(3);
            out.put_u32(u32::try_from(text.node_id.len()).unwrap_or(0));
            out.put_slice(text.node_id.as_bytes());
            out.put_slice(text.text.as_bytes());
            return (false, vec![Frame::Binary(out.freeze())]);
        }
        let Some(mut message) = message.message else {
            return (false, Vec::new());
        };
        Rewrite {
            comfy_prompt_id: &message_prompt_id(&message, self.comfy_prompt_id.as_deref()),
            prompt: &self.prompt,
            job,
        }
        .apply(&mut message);
        let kind = message["type"].as_str().unwrap_or_default().to_owned();
        if kind == "progress" {
            whole_numbers(&mut message["data"], &["value", "max"]);
        }
        if kind == "executing" {
            self.current_node = message["data"]["node"].as_str().map(str::to_owned);
        }
        let ends = matches!(
            kind.as_str(),
            "execution_success" | "execution_error" | "execution_interrupted"
        ) || (kind == "executing" && message["data"]["node"].is_null());
        if self.ending || ends {
            self.ending = true;
            self.held.push(message);
            return (false, Vec::new());
        }
        (kind == "execution_start", vec![Frame::Text(message)])
    }

    /// The held end of the prompt (or one made from the record when its
    /// ComfyUI never said it), without the final `executing`.
    fn end(&mut self, record: &JobRecord) -> Vec<Frame> {
        let held = std::mem::take(&mut self.held);
        let said_end = held.iter().any(|m| {
            matches!(
                m["type"].as_str(),
                Some("execution_success" | "execution_error" | "execution_interrupted")
            )
        });
        let mut frames: Vec<Frame> = held
            .into_iter()
            .filter(|m| m["type"] != "executing")
            .map(Frame::Text)
            .collect();
        if said_end {
            return frames;
        }
        let prompt_id = self.prompt.prompt_id.clone();
        match record.status {
            JobStatus::Failed => {
                let data = super::execution_error(&prompt_id, record.error.as_ref(), now_ms());
                frames.push(Frame::Text(
                    json!({"type": "execution_error", "data": data}),
                ));
            }
            JobStatus::Cancelled if self.comfy_prompt_id.is_some() => {
                let node = self.current_node.clone().unwrap_or_default();
                let data = super::execution_interrupted(&prompt_id, &node, now_ms());
                frames.push(Frame::Text(
                    json!({"type": "execution_interrupted", "data": data}),
                ));
            }
            _ => {}
        }
        frames
    }
}

/// The prompt id a message of the runner's ComfyUI names.
fn message_prompt_id(message: &Value, known: Option<&str>) -> String {
    message["data"]["prompt_id"]
        .as_str()
        .or(known)
        .unwrap_or_default()
        .to_owned()
}

/// ComfyUI sends step counters as integers; the runner's typed messages
/// carry them as floats.
fn whole_numbers(data: &mut Value, keys: &[&str]) {
    for key in keys {
        if let Some(number) = data[*key].as_f64()
            && number.fract() == 0.0
            && number.abs() < 9e15
        {
            data[*key] = json!(number as i64);
        }
    }
}

async fn send(socket: &mut WebSocket, frame: Frame) -> Result<(), axum::Error> {
    let message = match frame {
        Frame::Text(value) => WsMessage::Text(value.to_string().into()),
        Frame::Binary(bytes) => WsMessage::Binary(bytes),
        // Resolved by the session before sending; never sent as such.
        Frame::Status => return Ok(()),
    };
    socket.send(message).await
}
