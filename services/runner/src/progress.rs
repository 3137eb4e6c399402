//! Turning ComfyUI's WebSocket messages into comfyq job events, with an
//! overall progress fraction (finished nodes plus the running node's share).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use comfyq_shared::event::{EventBody, NodeUpdate, OutputProduced, ProgressUpdate};

use crate::comfy::ServerMessage;
use comfyq_shared::workflow::Workflow;

#[derive(Debug, Clone)]
pub struct ProgressTracker {
    node_types: HashMap<String, String>,
    finished: HashSet<String>,
    current: Option<String>,
}

impl ProgressTracker {
    pub fn new(workflow: &Workflow) -> Self {
        let node_types = workflow
            .nodes()
            .map(|(id, node)| (id.to_owned(), node.class_type.clone()))
            .collect();
        Self {
            node_types,
            finished: HashSet::new(),
            current: None,
        }
    }

    /// The whole job's progress, 0.0 to 1.0.
    pub fn fraction(&self, running_share: f64) -> f64 {
        let total = self.node_types.len().max(1) as f64;
        ((self.finished.len() as f64 + running_share) / total).clamp(0.0, 1.0)
    }

    fn finish_current(&mut self) {
        if let Some(node) = self.current.take() {
            self.finished.insert(node);
        }
    }

    /// The job event a message becomes, if any.
    pub fn observe(&mut self, message: &ServerMessage) -> Option<EventBody> {
        match message {
            ServerMessage::ExecutionCached(cached) => {
                self.finished.extend(cached.nodes.iter().cloned());
                Some(EventBody::Node(NodeUpdate {
                    node_id: None,
                    node_type: None,
                    cached: cached.nodes.clone(),
                    fraction: self.fraction(0.0),
                }))
            }
            ServerMessage::Executing(executing) => {
                self.finish_current();
                let node = executing.node.clone()?;
                self.current = Some(node.clone());
                Some(EventBody::Node(NodeUpdate {
                    node_type: self.node_types.get(&node).cloned(),
                    node_id: Some(node),
                    cached: Vec::new(),
                    fraction: self.fraction(0.0),
                }))
            }
            ServerMessage::Progress(progress) => {
                let share = if progress.max > 0.0 {
                    (progress.value / progress.max).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let node_id = progress.node.clone().or_else(|| self.current.clone())?;
                Some(EventBody::Progress(ProgressUpdate {
                    node_id,
                    value: progress.value,
                    max: progress.max,
                    fraction: self.fraction(share),
                }))
            }
            ServerMessage::Executed(executed) => {
                self.finished.insert(executed.node.clone());
                if self.current.as_deref() == Some(executed.node.as_str()) {
                    self.current = None;
                }
                let output = executed.node_output().unwrap_or_default();
                Some(EventBody::Output(OutputProduced {
                    node_id: executed.node.clone(),
                    files: output.files.iter().map(|f| f.filename.clone()).collect(),
                    text: output.text,
                }))
            }
            _ => None,
        }
    }
}

/// Throttles a job's node and step progress events: each kind is held for
/// up to `interval` and only the newest one held goes out then (with the
/// time it arrived), so a burst of nodes ComfyUI runs in a millisecond is one
/// event. Output events go at once; a node's output supersedes its held node
/// and step events (they would say less than the output does).
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    node: Option<Held>,
    step: Option<Held>,
}

/// A held event, when it arrived, and when it is due.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub body: EventBody,
    pub arrived: time::OffsetDateTime,
    due: Instant,
}

fn node_of(body: &EventBody) -> Option<&str> {
    match body {
        EventBody::Node(node) => node.node_id.as_deref(),
        EventBody::Progress(progress) => Some(progress.node_id.as_str()),
        EventBody::Output(output) => Some(output.node_id.as_str()),
        _ => None,
    }
}

impl Throttle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            node: None,
            step: None,
        }
    }

    /// A throttle that holds nothing: every event goes at once.
    pub fn passthrough() -> Self {
        Self::new(Duration::ZERO)
    }

    /// The events to publish now, in order, for `body` arriving at `now`.
    pub fn offer(
        &mut self,
        body: EventBody,
        now: Instant,
        arrived: time::OffsetDateTime,
    ) -> Vec<(EventBody, time::OffsetDateTime)> {
        if self.interval.is_zero() {
            return vec![(body, arrived)];
        }
        let lane = match &body {
            EventBody::Output(_) => {
                let node = node_of(&body).map(str::to_owned);
                let mut now_out = Vec::new();
                for held in [self.node.take(), self.step.take()].into_iter().flatten() {
                    if node_of(&held.body) != node.as_deref() {
                        now_out.push((held.body, held.arrived));
                    }
                }
                now_out.push((body, arrived));
                return now_out;
            }
            // Nothing to report: ComfyUI's start-of-prompt cache message
            // that names no cached node.
            EventBody::Node(node) if node.node_id.is_none() && node.cached.is_empty() => {
                return Vec::new();
            }
            EventBody::Node(_) => &mut self.node,
            EventBody::Progress(_) => &mut self.step,
            _ => return vec![(body, arrived)],
        };
        let due = lane.as_ref().map_or(now + self.interval, |held| held.due);
        *lane = Some(Held { body, arrived, due });
        Vec::new()
    }

    /// When the next held event is due, if one is held.
    pub fn due(&self) -> Option<Instant> {
        [&self.node, &self.step]
            .into_iter()
            .flatten()
            .map(|held| held.due)
            .min()
    }

    /// The held events due at `now`, node before step.
    pub fn flush(&mut self, now: Instant) -> Vec<(EventBody, time::OffsetDateTime)> {
        let mut out = Vec::new();
        for lane in [&mut self.node, &mut self.step] {
            if lane.as_ref().is_some_and(|held| held.due <= now)
                && let Some(held) = lane.take()
            {
                out.push((held.body, held.arrived));
            }
        }
        out
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::*;
    use comfyq_shared::event::{NodeUpdate, OutputProduced, ProgressUpdate};

    fn node(id: &str) -> EventBody {
        EventBody::Node(NodeUpdate {
            node_id: Some(id.to_owned()),
            node_type: None,
            cached: Vec::new(),
            fraction: 0.0,
        })
    }

    fn step(id: &str, value: f64) -> EventBody {
        EventBody::Progress(ProgressUpdate {
            node_id: id.to_owned(),
            value,
            max: 10.0,
            fraction: 0.0,
        })
    }

    fn output(id: &str) -> EventBody {
        EventBody::Output(OutputProduced {
            node_id: id.to_owned(),
            files: Vec::new(),
            text: Vec::new(),
        })
    }

    fn bodies(events: Vec<(EventBody, time::OffsetDateTime)>) -> Vec<EventBody> {
        events.into_iter().map(|(body, _)| body).collect()
    }

    #[test]
    fn a_burst_becomes_its_newest_event_per_kind_and_outputs_always_go() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        let wall = time::OffsetDateTime::UNIX_EPOCH;
        let mut throttle = Throttle::new(Duration::from_millis(25));
        // A zero-work prompt: three nodes and an output within a millisecond
        // are one event, the output.
        assert!(throttle.offer(node("1"), ms(0), wall).is_empty());
        assert!(throttle.offer(node("2"), ms(0), wall).is_empty());
        assert!(throttle.offer(node("3"), ms(1), wall).is_empty());
        assert_eq!(
            bodies(throttle.offer(output("3"), ms(1), wall)),
            vec![output("3")]
        );
        assert_eq!(throttle.due(), None);
        // A slow node: its start and its newest step go out when due, with
        // the time each arrived.
        let arrived = wall + time::Duration::milliseconds(10);
        assert!(throttle.offer(node("4"), ms(10), arrived).is_empty());
        assert!(throttle.offer(step("4", 1.0), ms(12), wall).is_empty());
        assert!(throttle.offer(step("4", 2.0), ms(20), wall).is_empty());
        assert_eq!(throttle.due(), Some(ms(35)));
        assert!(throttle.flush(ms(30)).is_empty());
        let flushed = throttle.flush(ms(37));
        assert_eq!(flushed[0], (node("4"), arrived));
        assert_eq!(bodies(flushed), vec![node("4"), step("4", 2.0)]);
        assert_eq!(throttle.due(), None);
        // Held events of another node go out before an output.
        assert!(throttle.offer(step("5", 1.0), ms(40), wall).is_empty());
        assert_eq!(
            bodies(throttle.offer(output("6"), ms(41), wall)),
            vec![step("5", 1.0), output("6")]
        );
        // An empty cache message says nothing.
        let empty = EventBody::Node(NodeUpdate {
            node_id: None,
            node_type: None,
            cached: Vec::new(),
            fraction: 0.0,
        });
        assert!(throttle.offer(empty, ms(200), wall).is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Every recorded run maps to events whose fraction never decreases.
    #[test]
    fn recorded_runs_progress_monotonically() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/comfyui-0.3.64/transcripts");
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("recordings missing at {}: {e}", dir.display()));
        let mut checked = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let history_path = path.with_extension("json");
            let history_path = history_path.parent().and_then(|p| p.parent()).map(|root| {
                root.join("history")
                    .join(history_path.file_name().unwrap_or_default())
            });
            let workflow = history_path
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|h| serde_json::from_str::<Value>(&h).ok())
                .and_then(|h| {
                    h.as_object()?
                        .values()
                        .next()?
                        .get("prompt")?
                        .get(2)
                        .cloned()
                });
            let Some(workflow) = workflow.and_then(|w| Workflow::parse(w, 10_000).ok()) else {
                continue;
            };
            let mut tracker = ProgressTracker::new(&workflow);
            let mut last = 0.0f64;
            let mut succeeded = false;
            for line in text.lines() {
                let Ok(record) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if record["kind"] != "text" {
                    continue;
                }
                let Ok(message) = ServerMessage::from_json(&record["msg"].to_string()) else {
                    continue;
                };
                if matches!(message, ServerMessage::ExecutionSuccess(_)) {
                    succeeded = true;
                }
                let fraction = match tracker.observe(&message) {
                    Some(EventBody::Progress(p)) => p.fraction,
                    Some(EventBody::Node(n)) => n.fraction,
                    _ => continue,
                };
                assert!(
                    fraction + 1e-9 >= last,
                    "{}: fraction went back {last} -> {fraction}",
                    path.display()
                );
                last = fraction;
            }
            if succeeded {
                assert!(
                    last > 0.0,
                    "{}: a successful run showed no progress",
                    path.display()
                );
            }
            checked += 1;
        }
        assert!(checked >= 10, "only {checked} recordings checked");
    }

    /// Every message type ComfyUI sends has a decided fate: node, progress
    /// and output messages become job events here; start, success, error
    /// and interruption end the attempt and become state events through the
    /// runner's report; the rest concern the queue or the socket.
    #[test]
    fn every_message_type_maps_to_an_event_or_is_accounted_for() {
        let workflow = serde_json::json!({
            "1": {"class_type": "EmptyImage", "inputs": {}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}
        });
        let p = "p1";
        let messages = [
            serde_json::json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}}}),
            serde_json::json!({"type": "execution_start", "data": {"prompt_id": p, "timestamp": 1}}),
            serde_json::json!({"type": "execution_cached", "data": {"nodes": ["1"], "prompt_id": p, "timestamp": 1}}),
            serde_json::json!({"type": "executing", "data": {"node": "2", "display_node": "2", "prompt_id": p}}),
            serde_json::json!({"type": "progress", "data": {"value": 1, "max": 2, "prompt_id": p, "node": "2"}}),
            serde_json::json!({"type": "progress_state", "data": {"prompt_id": p, "nodes": {}}}),
            serde_json::json!({"type": "executed", "data": {"node": "2", "display_node": "2", "prompt_id": p,
                "output": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}}}),
            serde_json::json!({"type": "executing", "data": {"node": null, "prompt_id": p}}),
            serde_json::json!({"type": "execution_success", "data": {"prompt_id": p, "timestamp": 1}}),
            serde_json::json!({"type": "execution_error", "data": {"prompt_id": p, "node_id": "2", "node_type": "SaveImage",
                "executed": [], "exception_message": "x", "exception_type": "ValueError", "traceback": [],
                "current_inputs": {}, "current_outputs": {}, "timestamp": 1}}),
            serde_json::json!({"type": "execution_interrupted", "data": {"prompt_id": p, "node_id": "2",
                "node_type": "SaveImage", "executed": [], "timestamp": 1}}),
            serde_json::json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}}),
            serde_json::json!({"type": "custom.thing", "data": {}}),
        ];
        let workflow = Workflow::parse(workflow, 100).expect("valid workflow");
        let mut tracker = ProgressTracker::new(&workflow);
        let mut kinds = Vec::new();
        for raw in messages {
            let message =
                ServerMessage::from_json(&raw.to_string()).unwrap_or_else(|e| panic!("{raw}: {e}"));
            let event = tracker.observe(&message);
            let expected = match &message {
                ServerMessage::ExecutionCached(_) => Some("job.node"),
                ServerMessage::Executing(e) if e.node.is_some() => Some("job.node"),
                ServerMessage::Progress(_) => Some("job.progress"),
                ServerMessage::Executed(_) => Some("job.output"),
                // The end of the prompt: the report makes it `job.completed`.
                ServerMessage::Executing(_) => None,
                // Become `job.running` / `completed` / `failed` via reports.
                ServerMessage::ExecutionStart(_)
                | ServerMessage::ExecutionSuccess(_)
                | ServerMessage::ExecutionError(_)
                | ServerMessage::ExecutionInterrupted(_) => None,
                // Queue and socket bookkeeping; the per-node picture is
                // already given by `executing`/`progress`.
                ServerMessage::Status(_)
                | ServerMessage::ProgressState(_)
                | ServerMessage::FeatureFlags(_)
                | ServerMessage::Unknown { .. } => None,
            };
            let got = event.as_ref().map(|body| match body {
                EventBody::Node(_) => "job.node",
                EventBody::Progress(_) => "job.progress",
                EventBody::Output(_) => "job.output",
                _ => "state",
            });
            assert_eq!(got, expected, "{}", message.kind());
            kinds.push(message.kind().to_owned());
        }
        assert_eq!(kinds.len(), 13);
        match tracker.observe(
            &ServerMessage::from_json(
                r#"{"type":"progress","data":{"value":2,"max":2,"prompt_id":"p1","node":"2"}}"#,
            )
            .unwrap_or_else(|e| panic!("{e}")),
        ) {
            Some(EventBody::Progress(p)) => {
                assert!(p.fraction <= 1.0 && p.fraction >= 0.5, "{p:?}")
            }
            other => panic!("{other:?}"),
        }
    }
}
