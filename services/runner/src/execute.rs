//! Executing one attempt of a job on ComfyUI: upload inputs, submit the
//! prompt, follow it (WebSocket, with `/history` and `/queue` reconciliation
//! when events go missing), store its outputs. Returns how the attempt ended;
//! acknowledging and reporting are the worker's business.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use comfyq_shared::event::{
    ComfyMessage, Event, EventBody, PREVIEW_AFTER_HEADER, PREVIEW_METADATA_HEADER, ProgressText,
};
use comfyq_shared::ids::JobId;
use comfyq_shared::job::{ComfyFileRef, ErrorKind, JobError, JobSpec, OutputFile};
use comfyq_shared::media::{COMFY_HISTORY_OBJECT, MediaError, MediaStore};
use comfyq_shared::names::Names;
use comfyq_shared::publisher::EventPublisher;
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::io::{ReaderStream, StreamReader};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::comfy::{
    BinaryFrame, ComfyClient, ComfyError, ExecutionError, HistoryEntry, ServerMessage, SubmitError,
    UploadImage,
};
use crate::config::RunnerConfig;
use crate::link::{ComfyLink, PromptEvent};
use crate::managed::ComfyHealth;
use crate::progress::{ProgressTracker, Throttle};
use comfyq_shared::workflow::Workflow;

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptEnd {
    Completed(Vec<OutputFile>),
    Failed(JobError),
    Cancelled,
}

/// Why following a prompt stopped.
#[derive(Debug)]
enum PromptEnd {
    Done,
    Failed(JobError),
    Cancelled,
}

/// Everything an execution needs; cheap to clone.
#[derive(Clone, Debug)]
pub struct Executor {
    pub comfy: ComfyClient,
    pub link: ComfyLink,
    pub media: MediaStore,
    pub events: EventPublisher,
    pub client: async_nats::Client,
    pub names: Names,
    pub client_id: String,
    pub config: Arc<RunnerConfig>,
    /// Whether ComfyUI is up; a managed one that dies fails the prompts it held.
    pub health: ComfyHealth,
}

fn infrastructure(message: impl Into<String>) -> JobError {
    JobError::new(ErrorKind::Infrastructure, message)
}

/// An output over a media limit or with an unusable name fails the job
/// for good; a store or download failure is retried.
fn storing_failed(name: &str, error: MediaError) -> JobError {
    if error.is_client_error() {
        JobError::new(ErrorKind::Execution, format!("storing {name}: {error}"))
    } else {
        infrastructure(format!("storing {name}: {error}"))
    }
}

/// Reading an input or storing an output again while the media store
/// itself fails, for up to `store_retry_for` (see there).
struct StoreRetry {
    give_up: Instant,
    backoff: Duration,
}

impl StoreRetry {
    fn new(retry_for: Duration) -> Self {
        Self {
            give_up: Instant::now() + retry_for,
            backoff: Duration::from_millis(200),
        }
    }

    /// After a failed put: waits before the next try, or says why the
    /// attempt fails (any error but the store's own, or time is up).
    async fn after(&mut self, name: &str, error: MediaError) -> Result<(), JobError> {
        if self.wait(name, &error).await {
            Ok(())
        } else {
            Err(storing_failed(name, error))
        }
    }

    /// Whether to try `object` again after `error`, having waited for it.
    async fn wait(&mut self, object: &str, error: &MediaError) -> bool {
        if !matches!(error, MediaError::Store(_)) || Instant::now() + self.backoff >= self.give_up {
            return false;
        }
        tracing::warn!(%error, object, "the media store failed; retrying");
        metrics::counter!("comfyq_runner_media_retries_total").increment(1);
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        true
    }
}

fn comfy_failure(context: &str, error: &ComfyError) -> JobError {
    if error.is_retryable() {
        infrastructure(format!("{context}: {error}"))
    } else {
        JobError::new(ErrorKind::Internal, format!("{context}: {error}"))
    }
}

impl Executor {
    /// Runs `spec` on ComfyUI until it ends, `cancel` fires, or its time is up.
    /// Runs `spec` on ComfyUI until it ends, `cancel` fires, or its time is
    /// up; `submitted` hears when ComfyUI accepted the prompt.
    pub async fn execute(
        &self,
        spec: &JobSpec,
        attempt: u32,
        cancel: &CancellationToken,
        submitted: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> AttemptEnd {
        let folder = attempt_folder(&spec.id, attempt);
        let end = self.attempt(spec, &folder, cancel, submitted).await;
        self.clean_up(&folder).await;
        end
    }

    async fn attempt(
        &self,
        spec: &JobSpec,
        folder: &str,
        cancel: &CancellationToken,
        submitted: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> AttemptEnd {
        let generation = self.health.state().generation;
        let mut workflow = match self.upload_inputs(spec, folder).await {
            Ok(workflow) => workflow,
            Err(error) => return AttemptEnd::Failed(error),
        };
        if self.config.comfyui_dir().is_some() {
            // The attempt's outputs are deleted after it, so no later prompt
            // (another job's, or this job's next attempt) may find them in
            // ComfyUI's cache: an identical prompt would get the deleted
            // files' names back from its cached save nodes.
            workflow.prefix_outputs(folder);
        }
        if cancel.is_cancelled() {
            return AttemptEnd::Cancelled;
        }

        let prompt_id = Uuid::new_v4();
        let mut events = self.link.follow(&prompt_id.to_string());
        let extra = serde_json::json!({ "comfyq_job_id": spec.id.to_string() });
        let accepted = match self
            .comfy
            .submit_prompt(&workflow, &self.client_id, prompt_id, Some(&extra))
            .await
        {
            Ok(accepted) => accepted,
            Err(SubmitError::Rejected(rejection)) => {
                let mut error = JobError::new(ErrorKind::Validation, rejection.to_string());
                error.details = serde_json::to_value(&rejection.node_errors).ok();
                return AttemptEnd::Failed(error);
            }
            Err(SubmitError::BadRequest { status, body }) => {
                let error = JobError::new(
                    ErrorKind::Validation,
                    format!("ComfyUI refused the prompt ({status}): {body}"),
                );
                return AttemptEnd::Failed(error);
            }
            Err(SubmitError::Comfy(error)) => {
                let error = comfy_failure("submitting the prompt", &error);
                return AttemptEnd::Failed(error);
            }
        };
        // Older ComfyUI versions choose their own prompt id.
        if accepted.prompt_id != prompt_id.to_string() {
            events = self.link.follow(&accepted.prompt_id);
        }
        let prompt_id = accepted.prompt_id;
        tracing::info!(%prompt_id, "prompt queued in ComfyUI");
        if let Some(submitted) = submitted {
            // The receiver may be gone (the worker stopped waiting): fine.
            let _ = submitted.send(());
        }

        let end = self
            .follow(spec, &prompt_id, &mut events.receiver, cancel, generation)
            .await;
        drop(events);
        let history = match self.comfy.history(&prompt_id).await {
            Ok(entry) => entry,
            Err(error) => {
                if matches!(end, PromptEnd::Done) {
                    let error = comfy_failure("reading history", &error);
                    return AttemptEnd::Failed(error);
                }
                None
            }
        };
        if spec.comfy.is_some()
            && let Some(entry) = &history
        {
            self.store_comfy_history(spec, entry).await;
        }
        let result = match end {
            PromptEnd::Done => match &history {
                Some(entry) => match self.collect_outputs(spec, entry).await {
                    Ok(outputs) => AttemptEnd::Completed(outputs),
                    Err(error) => AttemptEnd::Failed(error),
                },
                None => AttemptEnd::Failed(infrastructure(
                    "ComfyUI reported success but has no history for the prompt",
                )),
            },
            PromptEnd::Failed(error) => AttemptEnd::Failed(error),
            PromptEnd::Cancelled => AttemptEnd::Cancelled,
        };
        // ComfyUI keeps history in memory: drop what we have stored.
        if let Err(error) = self.comfy.delete_history(&[prompt_id.as_str()]).await {
            tracing::debug!(%error, "could not delete the prompt's history");
        }
        result
    }

    /// Deletes the attempt's uploads and outputs (its folders in `input/` and
    /// `output/`) from ComfyUI's disk (ComfyUI has no API for it), when
    /// `comfyui_dir` is known. Files a node wrote elsewhere (no
    /// `filename_prefix`; `temp/`, which ComfyUI empties when it starts)
    /// stay: ComfyUI's cache may hand them to a later identical prompt.
    /// Best effort: a file left behind costs disk, not correctness.
    async fn clean_up(&self, folder: &str) {
        let Some(root) = self.config.comfyui_dir() else {
            return;
        };
        for kind in ["input", "output"] {
            let folder = root.join(kind).join(folder);
            match tokio::fs::remove_dir_all(&folder).await {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(%error, path = %folder.display(), "cannot delete the job's files")
                }
            }
        }
    }

    /// Streams each input from the media store into ComfyUI's input folder
    /// (the attempt's subfolder) and rewrites the workflow's references to it.
    async fn upload_inputs(&self, spec: &JobSpec, folder: &str) -> Result<Workflow, JobError> {
        let mut workflow = spec.workflow.clone();
        if spec.inputs.is_empty() {
            return Ok(workflow);
        }
        let mut references = HashMap::new();
        for input in &spec.inputs {
            let key = self.media.input_key(&spec.tenant, &spec.id, &input.name);
            let mut retry = StoreRetry::new(self.config.store_retry_for);
            let (info, object) = loop {
                match self.media.get(&key).await {
                    Ok(found) => break found,
                    Err(MediaError::NotFound(_)) => {
                        return Err(JobError::new(
                            ErrorKind::Internal,
                            format!("input {} is missing", input.name),
                        ));
                    }
                    Err(error) if retry.wait(&input.name, &error).await => {}
                    Err(error) => {
                        return Err(infrastructure(format!(
                            "reading input {}: {error}",
                            input.name
                        )));
                    }
                }
            };
            let upload = UploadImage {
                name: input.name.clone(),
                subfolder: folder.to_owned(),
                overwrite: true,
                content_type: info.content_type.clone(),
                content_length: Some(info.size),
            };
            let body = reqwest::Body::wrap_stream(ReaderStream::new(object));
            let uploaded = self
                .comfy
                .upload_image(&upload, body)
                .await
                .map_err(|e| comfy_failure(&format!("uploading input {}", input.name), &e))?;
            references.insert(input.name.clone(), uploaded.input_reference());
        }
        workflow.rewrite_literals(&references);
        Ok(workflow)
    }

    async fn follow(
        &self,
        spec: &JobSpec,
        prompt_id: &str,
        events: &mut tokio::sync::mpsc::UnboundedReceiver<PromptEvent>,
        cancel: &CancellationToken,
        generation: u64,
    ) -> PromptEnd {
        // The time limit counts from when ComfyUI starts the prompt: with
        // several slots it may first wait behind this runner's other prompts.
        let limit = Duration::from_secs(spec.timeout_s);
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut deadline = far;
        let mut tracker = ProgressTracker::new(&spec.workflow);
        let mut last_event = Instant::now();
        let mut last_preview: Option<Instant> = None;
        // ComfyUI messages published for the ComfyUI API so far: numbers
        // them, and tells where each preview goes between them.
        let mut comfy_sent = 0u64;
        let mut comfy_previews = 0u64;
        let mut throttle = if spec.every_progress_event {
            Throttle::passthrough()
        } else {
            Throttle::new(self.config.progress_interval)
        };
        let mut reconcile = tokio::time::interval(self.config.reconcile_interval);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unreachable_since: Option<Instant> = None;
        // Whether the socket was replaced during the current silence.
        let mut socket_replaced = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.stop_prompt(prompt_id).await;
                    return PromptEnd::Cancelled;
                }
                _ = self.health.lost(generation) => {
                    return PromptEnd::Failed(infrastructure(
                        "ComfyUI exited while the prompt was queued or running",
                    ));
                }
                _ = tokio::time::sleep_until(throttle.due().unwrap_or(far)), if throttle.due().is_some() => {
                    for (body, at) in throttle.flush(Instant::now()) {
                        self.publish(spec, body, at).await;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.stop_prompt(prompt_id).await;
                    return PromptEnd::Failed(JobError::new(
                        ErrorKind::Timeout,
                        format!("the job ran longer than its {} s limit", spec.timeout_s),
                    ));
                }
                event = events.recv() => {
                    let Some(event) = event else {
                        return PromptEnd::Failed(infrastructure("the runner's ComfyUI link stopped"));
                    };
                    last_event = Instant::now();
                    // Progress proves the socket works again. ComfyUI's replay
                    // of the running node to a new socket names no prompt and
                    // proves nothing (a hung prompt would get it on every new
                    // socket and never be called stalled).
                    let progress = match &event {
                        PromptEvent::Message(message) => message.prompt_id() == Some(prompt_id),
                        PromptEvent::Frame(_) => true,
                        PromptEvent::SocketLost | PromptEvent::SocketRestored => false,
                    };
                    if progress {
                        socket_replaced = false;
                        if deadline == far {
                            deadline = Instant::now() + limit;
                        }
                    }
                    match event {
                        PromptEvent::Message(message) => {
                            if spec.comfy.is_some() && message.prompt_id() == Some(prompt_id) {
                                comfy_sent += 1;
                                let message = serde_json::to_value(&message).ok();
                                let place = (comfy_sent, comfy_previews);
                                self.publish_comfy(spec, prompt_id, place, message, None).await;
                            }
                            if let Some(body) = tracker.observe(&message) {
                                let now = (Instant::now(), time::OffsetDateTime::now_utc());
                                for (body, at) in throttle.offer(body, now.0, now.1) {
                                    self.publish(spec, body, at).await;
                                }
                            }
                            match message {
                                ServerMessage::Executing(executing) if executing.node.is_none() => return PromptEnd::Done,
                                ServerMessage::ExecutionError(error) => return PromptEnd::Failed(execution_failure(&error)),
                                ServerMessage::ExecutionInterrupted(_) => {
                                    return if cancel.is_cancelled() {
                                        PromptEnd::Cancelled
                                    } else {
                                        PromptEnd::Failed(infrastructure("ComfyUI interrupted the prompt (not comfyq)"))
                                    };
                                }
                                _ => {}
                            }
                        }
                        PromptEvent::Frame(BinaryFrame::Text { node_id, text }) if spec.comfy.is_some() => {
                            let text = ProgressText { node_id, text };
                            comfy_sent += 1;
                            let place = (comfy_sent, comfy_previews);
                            self.publish_comfy(spec, prompt_id, place, None, Some(text)).await;
                        }
                        PromptEvent::Frame(frame) => {
                            // ComfyUI API clients get every preview, as from ComfyUI.
                            let due = spec.comfy.is_some()
                                || last_preview.is_none_or(|at| at.elapsed() >= self.config.preview_interval);
                            if due && self.publish_preview(spec, &frame, comfy_sent).await {
                                last_preview = Some(Instant::now());
                                comfy_previews += 1;
                            }
                        }
                        PromptEvent::SocketLost => {}
                        // Whatever happened while the socket was down is only in history.
                        PromptEvent::SocketRestored => {
                            if let Some(end) = self.reconcile(prompt_id, false, &mut socket_replaced, &mut unreachable_since).await {
                                return end;
                            }
                        }
                    }
                }
                _ = reconcile.tick() => {
                    let quiet = last_event.elapsed() >= self.config.stall_timeout;
                    if deadline == far && (quiet || !self.link.is_connected())
                        && let Ok(queue) = self.comfy.queue().await
                        && queue.queue_running.iter().any(|item| item.prompt_id == prompt_id)
                    {
                        // Started while the socket was down.
                        deadline = Instant::now() + limit;
                    }
                    let silent = last_event.elapsed() >= self.config.stall_timeout;
                    let replaced_before = socket_replaced;
                    if (silent || !self.link.is_connected())
                        && let Some(end) = self.reconcile(prompt_id, silent, &mut socket_replaced, &mut unreachable_since).await
                    {
                        return end;
                    }
                    if socket_replaced && !replaced_before {
                        // The fresh socket gets a whole stall timeout of its own.
                        last_event = Instant::now();
                    }
                }
            }
        }
    }

    /// Asks ComfyUI where the prompt is when its events are missing.
    async fn reconcile(
        &self,
        prompt_id: &str,
        silent_too_long: bool,
        socket_replaced: &mut bool,
        unreachable_since: &mut Option<Instant>,
    ) -> Option<PromptEnd> {
        let history = match self.comfy.history(prompt_id).await {
            Ok(history) => {
                *unreachable_since = None;
                history
            }
            Err(error) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.config.stall_timeout {
                    return Some(PromptEnd::Failed(infrastructure(format!(
                        "ComfyUI unreachable: {error}"
                    ))));
                }
                return None;
            }
        };
        if let Some(entry) = history {
            return Some(history_end(&entry));
        }
        match self.comfy.queue().await {
            Ok(queue) if queue.queue_running.iter().any(|i| i.prompt_id == prompt_id) => {
                if silent_too_long && !*socket_replaced {
                    // ComfyUI says the prompt runs, so the silence may be our
                    // socket's: one can stay open (and answer pings) while
                    // ComfyUI no longer sends on it. Interrupting here would
                    // fail this prompt and, the socket staying deaf, every
                    // later one held by this runner. Replace the socket once
                    // and call the prompt stalled only if the new one stays
                    // silent too.
                    tracing::warn!(
                        prompt_id,
                        "prompt silent for too long; replacing the WebSocket"
                    );
                    *socket_replaced = true;
                    self.link.reconnect();
                    None
                } else if silent_too_long {
                    tracing::warn!(prompt_id, "prompt silent for too long; interrupting");
                    self.stop_prompt(prompt_id).await;
                    Some(PromptEnd::Failed(infrastructure(
                        "the prompt stalled: ComfyUI sent nothing for too long",
                    )))
                } else {
                    None
                }
            }
            Ok(queue) if queue.contains(prompt_id) => None,
            // In neither queue nor history: ComfyUI restarted and forgot it.
            Ok(_) => Some(PromptEnd::Failed(infrastructure(
                "ComfyUI lost the prompt (restarted while it was queued or running)",
            ))),
            Err(_) => None,
        }
    }

    async fn stop_prompt(&self, prompt_id: &str) {
        // Only one of these applies: queued prompts are deleted, the running
        // one is interrupted (a targeted interrupt spares other prompts).
        let _ = self.comfy.delete_queued(&[prompt_id]).await;
        let _ = self.comfy.interrupt(Some(prompt_id)).await;
    }

    async fn publish(&self, spec: &JobSpec, body: EventBody, at: time::OffsetDateTime) {
        let mut event = Event::new(spec.id, spec.tenant.clone(), body);
        event.at = at;
        if let Err(error) = self.events.publish_live(&event).await {
            tracing::debug!(%error, "progress event not published");
        }
        if matches!(event.body, EventBody::Progress(_))
            && spec
                .webhook
                .as_ref()
                .is_some_and(|w| w.wants("job.progress"))
            && let Err(error) = self.events.publish_progress_hook(&event).await
        {
            tracing::debug!(%error, "progress webhook work not published");
        }
    }

    /// ComfyUI's history entry of the attempt, as ComfyUI wrote it, for the
    /// ComfyUI API's `/history` (best effort: without it the API describes
    /// the job from its record).
    async fn store_comfy_history(&self, spec: &JobSpec, entry: &HistoryEntry) {
        let key = self
            .media
            .comfy_key(&spec.tenant, &spec.id, COMFY_HISTORY_OBJECT);
        let Ok(json) = serde_json::to_vec(&entry.raw) else {
            return;
        };
        if let Err(error) = self.media.put(&key, &mut json.as_slice(), 0, None).await {
            tracing::warn!(%error, "ComfyUI history entry not stored");
        }
    }

    /// One of ComfyUI's own messages about the prompt, for the ComfyUI API.
    async fn publish_comfy(
        &self,
        spec: &JobSpec,
        prompt_id: &str,
        (seq, previews): (u64, u64),
        message: Option<serde_json::Value>,
        progress_text: Option<ProgressText>,
    ) {
        let body = EventBody::Comfy(ComfyMessage {
            comfy_prompt_id: prompt_id.to_owned(),
            seq,
            previews,
            message,
            progress_text,
        });
        self.publish(spec, body, time::OffsetDateTime::now_utc())
            .await;
    }

    /// `comfy_sent`: ComfyUI API messages published before it (see
    /// [`PREVIEW_AFTER_HEADER`]).
    async fn publish_preview(&self, spec: &JobSpec, frame: &BinaryFrame, comfy_sent: u64) -> bool {
        let Some((image, mime)) = preview_image(frame) else {
            return false;
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", mime.as_str());
        headers.insert("Comfyq-Job-Id", spec.id.to_string().as_str());
        if spec.comfy.is_some() {
            headers.insert(PREVIEW_AFTER_HEADER, comfy_sent.to_string().as_str());
        }
        // The ComfyUI API rebuilds ComfyUI's event-4 frame from this.
        if let BinaryFrame::PreviewWithMetadata { metadata, .. } = frame
            && spec.comfy.is_some()
            && let Ok(json) = serde_json::to_string(metadata)
        {
            headers.insert(PREVIEW_METADATA_HEADER, json.as_str());
        }
        self.client
            .publish_with_headers(
                self.names.preview_subject(&spec.tenant, &spec.id),
                headers,
                image,
            )
            .await
            .is_ok()
    }

    /// `/view` of one output file as a reader, its first chunk awaited (so
    /// an error answer fails here, not half-way into the store).
    async fn download(
        &self,
        file: &crate::comfy::OutputFile,
    ) -> Result<impl tokio::io::AsyncRead + Unpin + use<>, JobError> {
        let failed =
            |error: &ComfyError| comfy_failure(&format!("downloading {}", file.filename), error);
        let view = self.comfy.view(file).await.map_err(|e| failed(&e))?;
        let mut stream = view.stream;
        let first = match stream.next().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(error)) => return Err(failed(&error)),
            None => Bytes::new(),
        };
        let rest = stream.map(|chunk| chunk.map_err(std::io::Error::other));
        Ok(StreamReader::new(
            futures::stream::iter([Ok(first)]).chain(rest),
        ))
    }

    /// Streams every file the prompt produced from `/view` into the media store.
    async fn collect_outputs(
        &self,
        spec: &JobSpec,
        entry: &HistoryEntry,
    ) -> Result<Vec<OutputFile>, JobError> {
        let mut outputs: Vec<OutputFile> = Vec::new();
        let mut taken = HashSet::new();
        // The job's media limit counts its inputs and the outputs so far.
        let inputs: u64 = spec.inputs.iter().map(|i| i.size).sum();
        let used = |outputs: &[OutputFile]| inputs + outputs.iter().map(|o| o.size).sum::<u64>();
        for (node_id, file) in entry.output_files() {
            let name = unique_name(&mut taken, node_id, &file.filename);
            let key = self.media.output_key(&spec.tenant, &spec.id, &name);
            let mut retry = StoreRetry::new(self.config.store_retry_for);
            let stored = loop {
                let mut reader = self.download(file).await?;
                match self
                    .media
                    .put(&key, &mut reader, used(&outputs), None)
                    .await
                {
                    Ok(stored) => break stored,
                    Err(error) => retry.after(&name, error).await?,
                }
            };
            outputs.push(OutputFile {
                node_id: node_id.to_owned(),
                name,
                kind: file.kind_key.clone(),
                content_type: stored.content_type,
                size: stored.size,
                sha256: stored.sha256,
                animated: file.animated,
                comfy: spec.comfy.as_ref().map(|_| ComfyFileRef {
                    filename: file.filename.clone(),
                    subfolder: file.subfolder.clone(),
                    folder_type: file.folder_type.clone(),
                }),
            });
        }
        for (node_id, output) in &entry.outputs {
            for (index, text) in output.text.iter().enumerate() {
                let name = unique_name(&mut taken, node_id, &format!("text_{index}.txt"));
                let key = self.media.output_key(&spec.tenant, &spec.id, &name);
                let mut retry = StoreRetry::new(self.config.store_retry_for);
                let stored = loop {
                    match self
                        .media
                        .put(&key, &mut text.as_bytes(), used(&outputs), None)
                        .await
                    {
                        Ok(stored) => break stored,
                        Err(error) => retry.after(&name, error).await?,
                    }
                };
                outputs.push(OutputFile {
                    node_id: node_id.clone(),
                    name,
                    kind: "text".to_owned(),
                    content_type: stored.content_type,
                    size: stored.size,
                    sha256: stored.sha256,
                    animated: false,
                    comfy: None,
                });
            }
        }
        Ok(outputs)
    }
}

/// The attempt's own folder in ComfyUI's `input/` (its uploads) and, with
/// clean-up, `output/` (what its save nodes write): `comfyq-<job>-<attempt>`.
/// Per attempt, not per job: two attempts of one job may meet on one
/// ComfyUI (a runner cut off from NATS past `dispatch_ack_wait` still runs
/// attempt n when n+1 is delivered; a killed runner's prompt runs on), and
/// neither may delete the other's files, nor may the later prompt be the
/// same as the earlier one, whose cached save nodes ComfyUI would answer
/// with the names of files already deleted.
fn attempt_folder(job: &JobId, attempt: u32) -> String {
    format!("comfyq-{job}-{attempt}")
}

/// How a finished prompt ended, according to its history entry.
fn history_end(entry: &HistoryEntry) -> PromptEnd {
    if let Some(status) = &entry.status {
        if let Some(error) = status.execution_error() {
            return PromptEnd::Failed(execution_failure(&error));
        }
        if status.execution_interrupted().is_some() {
            return PromptEnd::Failed(infrastructure("ComfyUI interrupted the prompt"));
        }
    }
    PromptEnd::Done
}

/// A node's exception is the workflow's fault, except running out of GPU
/// memory, which another runner or a later try may not hit.
fn execution_failure(error: &ExecutionError) -> JobError {
    let kind = if error.is_out_of_memory() {
        ErrorKind::OutOfMemory
    } else {
        ErrorKind::Execution
    };
    JobError {
        kind,
        message: format!(
            "{}: {}",
            error.exception_type,
            error.exception_message.trim()
        ),
        node_id: Some(error.node_id.clone()),
        node_type: Some(error.node_type.clone()),
        exception_type: Some(error.exception_type.clone()),
        traceback: error.traceback.clone(),
        details: None,
    }
}

fn preview_image(frame: &BinaryFrame) -> Option<(Bytes, String)> {
    match frame {
        BinaryFrame::Preview { format, image } => Some((image.clone(), format.mime()?.to_owned())),
        BinaryFrame::PreviewWithMetadata { metadata, image } => Some((
            image.clone(),
            metadata
                .image_type
                .clone()
                .unwrap_or_else(|| "image/jpeg".to_owned()),
        )),
        _ => None,
    }
}

/// Output names are unique within a job: the file name, or the node id
/// before it when two nodes produce the same name.
fn unique_name(taken: &mut HashSet<String>, node_id: &str, filename: &str) -> String {
    let base = filename.rsplit(['/', '\\']).next().unwrap_or(filename);
    let mut name = base.to_owned();
    if name.is_empty() || name.contains("..") || !taken.insert(name.clone()) {
        let mut n = 0;
        loop {
            name = if n == 0 {
                format!("{node_id}_{base}")
            } else {
                format!("{node_id}_{n}_{base}")
            };
            if taken.insert(name.clone()) {
                break;
            }
            n += 1;
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn save_nodes_write_into_the_job_folder_and_inputs_are_referenced() {
        let mut workflow = Workflow::parse(
            json!({
                "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "comfyq/x"}},
                "3": {"class_type": "VHS_VideoCombine", "inputs": {"filename_prefix": "clip"}},
                "4": {"class_type": "Odd", "inputs": {"filename_prefix": ["1", 0]}},
                "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "photo.png of a cat"}}
            }),
            100,
        )
        .expect("valid");
        workflow.rewrite_literals(&HashMap::from([(
            "photo.png".to_owned(),
            "comfyq-j/photo.png".to_owned(),
        )]));
        workflow.prefix_outputs("comfyq-j");
        let workflow = serde_json::to_value(&workflow).expect("json");
        assert_eq!(workflow["1"]["inputs"]["image"], "comfyq-j/photo.png");
        assert_eq!(workflow["5"]["inputs"]["text"], "photo.png of a cat");
        assert_eq!(
            workflow["2"]["inputs"]["filename_prefix"],
            "comfyq-j/comfyq/x"
        );
        assert_eq!(workflow["3"]["inputs"]["filename_prefix"], "comfyq-j/clip");
        assert_eq!(workflow["4"]["inputs"]["filename_prefix"], json!(["1", 0]));
        assert_eq!(workflow["2"]["inputs"]["images"], json!(["1", 0]));
    }

    #[test]
    fn each_attempt_of_a_job_has_a_folder_of_its_own() {
        let job: JobId = "01a242ad-a4de-72d3-aa59-d70fb38aa344"
            .parse()
            .expect("a job id");
        let (first, second) = (attempt_folder(&job, 1), attempt_folder(&job, 2));
        assert_eq!(first, "comfyq-01a242ad-a4de-72d3-aa59-d70fb38aa344-1");
        assert_ne!(first, second);
        // Each is deleted with `remove_dir_all` of its own path: neither
        // contains the other.
        assert!(!second.starts_with(&format!("{first}/")));
    }

    #[test]
    fn output_names_stay_unique_and_safe() {
        let mut taken = HashSet::new();
        assert_eq!(unique_name(&mut taken, "3", "a.png"), "a.png");
        assert_eq!(unique_name(&mut taken, "4", "a.png"), "4_a.png");
        assert_eq!(unique_name(&mut taken, "4", "a.png"), "4_1_a.png");
        assert_eq!(unique_name(&mut taken, "5", "sub/../b.png"), "b.png");
    }
}
