//! Turning ComfyUI's WebSocket messages into comfyq job events, with an
//! overall progress fraction (finished nodes plus the running node's share).

use std::collections::{HashMap, HashSet};

use comfyq_shared::event::{EventBody, NodeUpdate, OutputProduced, ProgressUpdate};
use serde_json::Value;

use crate::comfy::ServerMessage;

#[derive(Debug, Clone)]
pub struct ProgressTracker {
    node_types: HashMap<String, String>,
    finished: HashSet<String>,
    current: Option<String>,
}

impl ProgressTracker {
    pub fn new(workflow: &Value) -> Self {
        let node_types = workflow
            .as_object()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|(id, node)| {
                        Some((id.clone(), node.get("class_type")?.as_str()?.to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::*;

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
            let Some(workflow) = workflow else { continue };
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
