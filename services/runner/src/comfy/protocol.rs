//! Serde wire types of ComfyUI's HTTP and WebSocket JSON protocol.
//!
//! Modelled on ComfyUI 0.3.64 (`server.py`, `execution.py`) and its recordings in
//! `shared/comfyui-0.3.64`. Every type tolerates missing optional fields and unknown
//! extra fields, so older and newer servers (and custom nodes) do not break parsing.

use std::collections::BTreeMap;

use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

// ---------------------------------------------------------------------------
// WebSocket JSON messages
// ---------------------------------------------------------------------------

/// One JSON message received on `/ws` (`{"type": ..., "data": ...}`).
///
/// Known types are parsed into typed payloads; any other type (custom nodes send their
/// own, newer servers add some) becomes [`ServerMessage::Unknown`] and never fails.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// `status`: queue size, sent to every socket; the first one carries the `sid`.
    Status(StatusMessage),
    /// `execution_start`: the prompt left the queue and started.
    ExecutionStart(ExecutionStart),
    /// `execution_cached`: nodes whose outputs are served from cache.
    ExecutionCached(ExecutionCached),
    /// `executing`: a node starts (`node: Some`), or the prompt is done (`node: None`).
    Executing(Executing),
    /// `progress`: a node's step progress.
    Progress(Progress),
    /// `progress_state`: the state of every node of the running prompt.
    ProgressState(ProgressState),
    /// `executed`: a node finished with UI output.
    Executed(Executed),
    /// `execution_success`: every node ran; the history entry follows shortly.
    ExecutionSuccess(ExecutionSuccess),
    /// `execution_error`: a node raised.
    ExecutionError(ExecutionError),
    /// `execution_interrupted`: `/interrupt` stopped the prompt.
    ExecutionInterrupted(ExecutionInterrupted),
    /// `feature_flags`: the server's answer to the client's feature-flag handshake.
    FeatureFlags(Features),
    /// Any other message type, kept verbatim.
    Unknown {
        /// The `type` field.
        kind: String,
        /// The `data` field (`null` if absent).
        data: Value,
    },
}

impl ServerMessage {
    /// Parses one text frame.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The wire `type` of this message.
    pub fn kind(&self) -> &str {
        match self {
            Self::Status(_) => "status",
            Self::ExecutionStart(_) => "execution_start",
            Self::ExecutionCached(_) => "execution_cached",
            Self::Executing(_) => "executing",
            Self::Progress(_) => "progress",
            Self::ProgressState(_) => "progress_state",
            Self::Executed(_) => "executed",
            Self::ExecutionSuccess(_) => "execution_success",
            Self::ExecutionError(_) => "execution_error",
            Self::ExecutionInterrupted(_) => "execution_interrupted",
            Self::FeatureFlags(_) => "feature_flags",
            Self::Unknown { kind, .. } => kind,
        }
    }

    /// The prompt this message is about, when it names one.
    pub fn prompt_id(&self) -> Option<&str> {
        match self {
            Self::ExecutionStart(m) => Some(&m.prompt_id),
            Self::ExecutionCached(m) => m.prompt_id.as_deref(),
            Self::Executing(m) => m.prompt_id.as_deref(),
            Self::Progress(m) => m.prompt_id.as_deref(),
            Self::ProgressState(m) => m.prompt_id.as_deref(),
            Self::Executed(m) => m.prompt_id.as_deref(),
            Self::ExecutionSuccess(m) => Some(&m.prompt_id),
            Self::ExecutionError(m) => Some(&m.prompt_id),
            Self::ExecutionInterrupted(m) => Some(&m.prompt_id),
            Self::Status(_) | Self::FeatureFlags(_) | Self::Unknown { .. } => None,
        }
    }

    /// Builds the message of a given `type` from its `data`. Unknown types never fail;
    /// a known type whose data has the wrong shape is an error.
    pub fn from_parts(kind: &str, data: Value) -> Result<Self, serde_json::Error> {
        use serde_json::from_value as v;
        Ok(match kind {
            "status" => Self::Status(v(data)?),
            "execution_start" => Self::ExecutionStart(v(data)?),
            "execution_cached" => Self::ExecutionCached(v(data)?),
            "executing" => Self::Executing(v(data)?),
            "progress" => Self::Progress(v(data)?),
            "progress_state" => Self::ProgressState(v(data)?),
            "executed" => Self::Executed(v(data)?),
            "execution_success" => Self::ExecutionSuccess(v(data)?),
            "execution_error" => Self::ExecutionError(v(data)?),
            "execution_interrupted" => Self::ExecutionInterrupted(v(data)?),
            "feature_flags" => Self::FeatureFlags(v(data)?),
            other => Self::Unknown {
                kind: other.to_owned(),
                data,
            },
        })
    }

    /// The `data` payload as JSON.
    pub fn data(&self) -> Result<Value, serde_json::Error> {
        use serde_json::to_value as v;
        match self {
            Self::Status(m) => v(m),
            Self::ExecutionStart(m) => v(m),
            Self::ExecutionCached(m) => v(m),
            Self::Executing(m) => v(m),
            Self::Progress(m) => v(m),
            Self::ProgressState(m) => v(m),
            Self::Executed(m) => v(m),
            Self::ExecutionSuccess(m) => v(m),
            Self::ExecutionError(m) => v(m),
            Self::ExecutionInterrupted(m) => v(m),
            Self::FeatureFlags(m) => v(m),
            Self::Unknown { data, .. } => Ok(data.clone()),
        }
    }
}

#[derive(Deserialize)]
struct RawMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

impl<'de> Deserialize<'de> for ServerMessage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawMessage::deserialize(deserializer)?;
        let kind = raw.kind;
        Self::from_parts(&kind, raw.data)
            .map_err(|e| de::Error::custom(format_args!("`{kind}` message: {e}")))
    }
}

impl Serialize for ServerMessage {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let data = self.data().map_err(serde::ser::Error::custom)?;
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("type", self.kind())?;
        map.serialize_entry("data", &data)?;
        map.end()
    }
}

/// `status` data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusMessage {
    /// `{exec_info: {queue_remaining}}`.
    #[serde(default)]
    pub status: Option<QueueStatus>,
    /// The socket's session id (the `clientId` it connected with), first message only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

impl StatusMessage {
    /// Prompts queued or running, as the server counts them.
    pub fn queue_remaining(&self) -> Option<u64> {
        self.status.as_ref().map(QueueStatus::queue_remaining)
    }
}

/// `{exec_info: {queue_remaining}}`, in `status` messages and from `GET /prompt`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueStatus {
    /// The execution info.
    #[serde(default)]
    pub exec_info: ExecInfo,
}

impl QueueStatus {
    /// Prompts queued or running.
    pub fn queue_remaining(&self) -> u64 {
        self.exec_info.queue_remaining
    }
}

/// `exec_info`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecInfo {
    /// Prompts queued or running.
    #[serde(default)]
    pub queue_remaining: u64,
}

/// `execution_start` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionStart {
    /// The prompt.
    pub prompt_id: String,
    /// Server time in ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
}

/// `execution_cached` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionCached {
    /// Nodes served from cache (every node on an identical resubmission).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// The prompt.
    #[serde(default)]
    pub prompt_id: Option<String>,
    /// Server time in ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
}

/// `executing` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Executing {
    /// The node starting; `None` once the prompt is finished (history is then ready).
    #[serde(default)]
    pub node: Option<String>,
    /// The node shown in the UI (differs inside subgraphs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_node: Option<String>,
    /// The prompt; absent in the message replayed to a socket that reconnects mid-prompt.
    #[serde(default)]
    pub prompt_id: Option<String>,
}

impl Executing {
    /// `executing {node: null}` for a prompt: it is done and its history is written.
    pub fn is_done(&self) -> bool {
        self.node.is_none()
    }
}

/// `progress` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Current step.
    pub value: f64,
    /// Total steps.
    pub max: f64,
    /// The prompt.
    #[serde(default)]
    pub prompt_id: Option<String>,
    /// The node reporting.
    #[serde(default)]
    pub node: Option<String>,
}

/// `progress_state` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressState {
    /// The prompt.
    #[serde(default)]
    pub prompt_id: Option<String>,
    /// State of every node seen so far, by node id.
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeProgress>,
}

/// One node in `progress_state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeProgress {
    /// Current step.
    #[serde(default)]
    pub value: f64,
    /// Total steps.
    #[serde(default)]
    pub max: f64,
    /// `pending`, `running`, `finished`, `error`.
    #[serde(default)]
    pub state: NodeState,
    /// The node.
    #[serde(default)]
    pub node_id: Option<String>,
    /// The prompt.
    #[serde(default)]
    pub prompt_id: Option<String>,
    /// The node shown in the UI.
    #[serde(default)]
    pub display_node_id: Option<String>,
    /// The subgraph parent, if any.
    #[serde(default)]
    pub parent_node_id: Option<String>,
    /// The node in the original graph.
    #[serde(default)]
    pub real_node_id: Option<String>,
}

/// A node's execution state in `progress_state`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Not started.
    Pending,
    /// Running.
    Running,
    /// Done.
    Finished,
    /// Failed.
    Error,
    /// A state this client does not know.
    #[default]
    #[serde(other)]
    Unknown,
}

/// `executed` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Executed {
    /// The node that finished.
    pub node: String,
    /// The node shown in the UI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_node: Option<String>,
    /// The node's UI output (`{images: [...], text: [...], ...}`), see [`NodeOutput`].
    #[serde(default)]
    pub output: Value,
    /// The prompt.
    #[serde(default)]
    pub prompt_id: Option<String>,
}

impl Executed {
    /// The output parsed like a history output; `None` if it is not a JSON object.
    pub fn node_output(&self) -> Option<NodeOutput> {
        match &self.output {
            Value::Object(map) => Some(NodeOutput::from_map(map)),
            _ => None,
        }
    }
}

/// `execution_success` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionSuccess {
    /// The prompt.
    pub prompt_id: String,
    /// Server time in ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
}

/// `execution_error` data: a node raised (a user error unless it is e.g. out of memory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionError {
    /// The prompt.
    pub prompt_id: String,
    /// The node that raised.
    #[serde(default)]
    pub node_id: String,
    /// Its class.
    #[serde(default)]
    pub node_type: String,
    /// Nodes that had run before.
    #[serde(default)]
    pub executed: Vec<String>,
    /// The exception's message.
    #[serde(default)]
    pub exception_message: String,
    /// The exception's Python type, e.g. `RuntimeError`, `torch.OutOfMemoryError`.
    #[serde(default)]
    pub exception_type: String,
    /// Traceback lines.
    #[serde(default)]
    pub traceback: Vec<String>,
    /// The node's inputs, as text.
    #[serde(default)]
    pub current_inputs: Value,
    /// Outputs computed so far.
    #[serde(default)]
    pub current_outputs: Value,
    /// Server time in ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
}

impl ExecutionError {
    /// Whether the exception looks like running out of (GPU) memory: an infrastructure
    /// condition rather than a mistake in the graph.
    pub fn is_out_of_memory(&self) -> bool {
        let t = self.exception_type.to_ascii_lowercase();
        let m = self.exception_message.to_ascii_lowercase();
        t.contains("outofmemory")
            || m.contains("out of memory")
            || m.contains("allocation on device")
    }
}

/// `execution_interrupted` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionInterrupted {
    /// The prompt.
    pub prompt_id: String,
    /// The node running when the interrupt took effect.
    #[serde(default)]
    pub node_id: String,
    /// Its class.
    #[serde(default)]
    pub node_type: String,
    /// Nodes that had run before.
    #[serde(default)]
    pub executed: Vec<String>,
    /// Server time in ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
}

/// Feature flags: the `feature_flags` message and `GET /features`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Features {
    /// Whether previews come as event 4 frames (after the client's handshake).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supports_preview_metadata: Option<bool>,
    /// Largest accepted upload, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_upload_size: Option<u64>,
    /// Other flags.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The handshake a client sends first on `/ws` to receive event 4 preview frames.
pub fn feature_flags_handshake() -> Value {
    serde_json::json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}})
}

// ---------------------------------------------------------------------------
// History
// ---------------------------------------------------------------------------

/// One entry of `GET /history/<prompt_id>` (which answers `{prompt_id: entry}`, or `{}`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HistoryEntry {
    /// The queued prompt: `[number, prompt_id, prompt, extra_data, outputs_to_execute]`
    /// (`None` if absent or of another shape).
    #[serde(default, deserialize_with = "lenient")]
    pub prompt: Option<QueueItem>,
    /// UI outputs by node id.
    #[serde(default)]
    pub outputs: BTreeMap<String, NodeOutput>,
    /// How the prompt ended.
    #[serde(default, deserialize_with = "lenient")]
    pub status: Option<HistoryStatus>,
    /// Node metadata by output node id (empty if of another shape).
    #[serde(default, deserialize_with = "lenient")]
    pub meta: BTreeMap<String, NodeMeta>,
    /// The entry as ComfyUI sent it (set by [`super::client::parse_history_response`]).
    #[serde(skip)]
    pub raw: Value,
}

impl HistoryEntry {
    /// Every output file of every node, ordered by node id, key and index.
    pub fn output_files(&self) -> impl Iterator<Item = (&str, &OutputFile)> {
        self.outputs
            .iter()
            .flat_map(|(node, out)| out.files.iter().map(move |f| (node.as_str(), f)))
    }

    /// `status.status_str == "success"`.
    pub fn is_success(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.status_str == "success")
    }
}

/// Parses a field, falling back to its default when its shape is unexpected: parts of a
/// history entry that are not needed to collect outputs must not make it unreadable.
fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned + Default,
{
    Ok(serde_json::from_value(Value::deserialize(d)?).unwrap_or_default())
}

fn message_pairs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, Value)>, D::Error> {
    let Value::Array(items) = Value::deserialize(d)? else {
        return Ok(Vec::new());
    };
    Ok(items
        .into_iter()
        .filter_map(|item| serde_json::from_value::<(String, Value)>(item).ok())
        .collect())
}

/// `status` of a history entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HistoryStatus {
    /// `success` or `error` (errors and interrupts both).
    #[serde(default)]
    pub status_str: String,
    /// Whether the prompt ran to the end.
    #[serde(default)]
    pub completed: bool,
    /// The execution messages, `[type, data]` (entries of another shape are dropped).
    #[serde(default, deserialize_with = "message_pairs")]
    pub messages: Vec<(String, Value)>,
}

impl HistoryStatus {
    /// The execution messages parsed; malformed ones are skipped.
    pub fn parsed_messages(&self) -> impl Iterator<Item = ServerMessage> + '_ {
        self.messages
            .iter()
            .filter_map(|(kind, data)| ServerMessage::from_parts(kind, data.clone()).ok())
    }

    /// The `execution_error` message, if the prompt failed.
    pub fn execution_error(&self) -> Option<ExecutionError> {
        self.parsed_messages().find_map(|m| match m {
            ServerMessage::ExecutionError(e) => Some(e),
            _ => None,
        })
    }

    /// The `execution_interrupted` message, if the prompt was interrupted.
    pub fn execution_interrupted(&self) -> Option<ExecutionInterrupted> {
        self.parsed_messages().find_map(|m| match m {
            ServerMessage::ExecutionInterrupted(e) => Some(e),
            _ => None,
        })
    }
}

/// `meta` of one output node in a history entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// The node.
    #[serde(default)]
    pub node_id: Option<String>,
    /// The node shown in the UI.
    #[serde(default)]
    pub display_node: Option<String>,
    /// The subgraph parent, if any.
    #[serde(default)]
    pub parent_node: Option<String>,
    /// The node in the original graph.
    #[serde(default)]
    pub real_node_id: Option<String>,
}

/// One file a node produced: any `{filename, subfolder, type}` object in any output list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// The output key it was listed under: `images`, `audio`, `gifs`, `videos`, `3d`, ...
    pub kind_key: String,
    /// File name.
    pub filename: String,
    /// Subfolder below the folder type's directory (may be empty).
    pub subfolder: String,
    /// `output`, `temp` or `input`.
    pub folder_type: String,
    /// From the node's `animated` list (same index in `images`): animated WEBP/PNG, video.
    pub animated: bool,
    /// Other fields of the object (custom nodes add `format`, `frame_rate`, ...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
}

impl OutputFile {
    /// A temporary file (PreviewImage): deleted by ComfyUI, not a saved result.
    pub fn is_temp(&self) -> bool {
        self.folder_type == "temp"
    }
}

/// A node's UI output (`history.outputs[node]` or `executed.output`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeOutput {
    /// Every file, ordered by key then index.
    pub files: Vec<OutputFile>,
    /// `text` entries (PreviewAny, custom text nodes).
    pub text: Vec<String>,
    /// Every other key, verbatim (`animated` included).
    pub other: BTreeMap<String, Value>,
}

impl NodeOutput {
    /// Interprets an output object: lists of `{filename, ...}` objects become files under
    /// any key, `text` becomes strings, `animated: [bool]` marks `images` by index.
    pub fn from_map(map: &Map<String, Value>) -> Self {
        let mut out = Self::default();
        let animated: Vec<bool> = match map.get("animated") {
            Some(Value::Array(items)) => {
                items.iter().map(|v| v.as_bool().unwrap_or(false)).collect()
            }
            Some(Value::Bool(b)) => vec![*b],
            _ => Vec::new(),
        };
        for (key, value) in map {
            if key == "text" {
                match value {
                    Value::Array(items) => out.text.extend(items.iter().map(value_to_text)),
                    Value::String(s) => out.text.push(s.clone()),
                    other => {
                        out.other.insert(key.clone(), other.clone());
                    }
                }
                continue;
            }
            if key != "animated"
                && let Some(files) = file_list(key, value, &animated)
            {
                out.files.extend(files);
                continue;
            }
            out.other.insert(key.clone(), value.clone());
        }
        out
    }
}

fn value_to_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `Some(files)` if `value` is a non-empty list whose every item is a file object.
fn file_list(key: &str, value: &Value, animated: &[bool]) -> Option<Vec<OutputFile>> {
    let items = value.as_array()?;
    if items.is_empty() {
        return None;
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let obj = item.as_object()?;
            let filename = obj.get("filename")?.as_str()?.to_owned();
            let subfolder = obj
                .get("subfolder")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let folder_type = obj
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("output")
                .to_owned();
            let extra = obj
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "filename" | "subfolder" | "type"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Some(OutputFile {
                kind_key: key.to_owned(),
                filename,
                subfolder,
                folder_type,
                animated: key == "images" && animated.get(i).copied().unwrap_or(false),
                extra,
            })
        })
        .collect()
}

impl<'de> Deserialize<'de> for NodeOutput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::Object(map) => Ok(Self::from_map(&map)),
            Value::Null => Ok(Self::default()),
            // Not an object: nothing to collect, but keep it visible.
            other => Ok(Self {
                other: BTreeMap::from([(String::new(), other)]),
                ..Self::default()
            }),
        }
    }
}

// ---------------------------------------------------------------------------
// Queue
// ---------------------------------------------------------------------------

/// A queued prompt as ComfyUI lists it: `[number, prompt_id, prompt, extra_data,
/// outputs_to_execute, ...]` (in `/queue` and as `history.prompt`).
#[derive(Debug, Clone, PartialEq)]
pub struct QueueItem {
    /// Queue position key (may be a float, or negative with `front`).
    pub number: f64,
    /// The prompt id.
    pub prompt_id: String,
    /// The prompt graph.
    pub prompt: Value,
    /// `extra_data` (holds `client_id`).
    pub extra_data: Value,
    /// Output nodes to execute.
    pub outputs_to_execute: Vec<String>,
}

impl QueueItem {
    /// `extra_data.client_id`.
    pub fn client_id(&self) -> Option<&str> {
        self.extra_data.get("client_id").and_then(Value::as_str)
    }
}

impl<'de> Deserialize<'de> for QueueItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let items = Vec::<Value>::deserialize(deserializer)?;
        let mut it = items.into_iter();
        let number = it
            .next()
            .and_then(|v| v.as_f64())
            .ok_or_else(|| de::Error::custom("queue item: missing number"))?;
        let prompt_id = match it.next() {
            Some(Value::String(s)) => s,
            _ => return Err(de::Error::custom("queue item: missing prompt_id")),
        };
        let prompt = it.next().unwrap_or(Value::Null);
        let extra_data = it.next().unwrap_or(Value::Null);
        let outputs_to_execute = match it.next() {
            Some(Value::Array(a)) => a.iter().map(value_to_text).collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            number,
            prompt_id,
            prompt,
            extra_data,
            outputs_to_execute,
        })
    }
}

/// `GET /queue`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct QueueState {
    /// The running prompt (zero or one).
    #[serde(default)]
    pub queue_running: Vec<QueueItem>,
    /// Pending prompts, in no particular order (ComfyUI sorts by `number` when running).
    #[serde(default)]
    pub queue_pending: Vec<QueueItem>,
}

impl QueueState {
    /// Whether `prompt_id` is running or pending.
    pub fn contains(&self, prompt_id: &str) -> bool {
        self.queue_running
            .iter()
            .chain(&self.queue_pending)
            .any(|i| i.prompt_id == prompt_id)
    }
}

// ---------------------------------------------------------------------------
// POST /prompt
// ---------------------------------------------------------------------------

/// `POST /prompt` answered 200.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PromptAccepted {
    /// The prompt id (ours, echoed).
    pub prompt_id: String,
    /// Queue number.
    #[serde(default)]
    pub number: f64,
    /// Outputs that failed validation and will not run (the others do).
    #[serde(default, deserialize_with = "map_or_empty_list")]
    pub node_errors: BTreeMap<String, NodeErrors>,
}

/// `POST /prompt` answered 400: the prompt is invalid (a user error).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PromptRejection {
    /// The overall error.
    #[serde(deserialize_with = "prompt_error_or_string")]
    pub error: PromptError,
    /// Errors per node.
    #[serde(default, deserialize_with = "map_or_empty_list")]
    pub node_errors: BTreeMap<String, NodeErrors>,
}

impl std::fmt::Display for PromptRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error.kind, self.error.message)?;
        if !self.error.details.is_empty() {
            write!(f, " ({})", self.error.details)?;
        }
        for (node, errs) in &self.node_errors {
            for e in &errs.errors {
                write!(
                    f,
                    "; node {node} ({}): {} {}",
                    errs.class_type, e.message, e.details
                )?;
            }
        }
        Ok(())
    }
}

/// The `error` object of a rejected prompt (and each entry of `node_errors[].errors`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptError {
    /// `invalid_prompt`, `prompt_no_outputs`, `prompt_outputs_failed_validation`,
    /// `value_not_in_list`, ...
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Human message.
    #[serde(default)]
    pub message: String,
    /// Details.
    #[serde(default)]
    pub details: String,
    /// Structured extra info (`input_name`, `received_value`, ...).
    #[serde(default)]
    pub extra_info: Value,
}

/// Validation errors of one node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeErrors {
    /// The errors.
    #[serde(default)]
    pub errors: Vec<PromptError>,
    /// Output nodes that depend on this node and so will not run.
    #[serde(default)]
    pub dependent_outputs: Vec<String>,
    /// The node's class.
    #[serde(default)]
    pub class_type: String,
}

/// Old servers sent `node_errors: []` when empty.
fn map_or_empty_list<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, NodeErrors>, D::Error> {
    match Value::deserialize(d)? {
        Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| Ok((k, serde_json::from_value(v).map_err(de::Error::custom)?)))
            .collect(),
        Value::Null => Ok(BTreeMap::new()),
        Value::Array(a) if a.is_empty() => Ok(BTreeMap::new()),
        other => Err(de::Error::custom(format_args!(
            "node_errors: expected an object, got {other}"
        ))),
    }
}

/// Old servers sent `error: "no prompt"`.
fn prompt_error_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<PromptError, D::Error> {
    match Value::deserialize(d)? {
        Value::String(message) => Ok(PromptError {
            message,
            ..PromptError::default()
        }),
        v @ Value::Object(_) => serde_json::from_value(v).map_err(de::Error::custom),
        other => Err(de::Error::custom(format_args!(
            "error: expected an object or a string, got {other}"
        ))),
    }
}

// ---------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------

/// `POST /upload/image` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadedFile {
    /// The stored name (may differ: `name (1).png` when the name was taken).
    pub name: String,
    /// Subfolder.
    #[serde(default)]
    pub subfolder: String,
    /// Folder type (`input`).
    #[serde(rename = "type", default)]
    pub folder_type: String,
}

impl UploadedFile {
    /// How a `LoadImage` input names this file: `subfolder/name` or `name`.
    pub fn input_reference(&self) -> String {
        if self.subfolder.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.subfolder, self.name)
        }
    }
}

// ---------------------------------------------------------------------------
// System stats and object info
// ---------------------------------------------------------------------------

/// `GET /system_stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemStats {
    /// Host and versions.
    #[serde(default)]
    pub system: SystemInfo,
    /// Compute devices.
    #[serde(default)]
    pub devices: Vec<Device>,
}

/// `system_stats.system`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemInfo {
    /// `posix`, `nt`.
    #[serde(default)]
    pub os: Option<String>,
    /// RAM in bytes.
    #[serde(default)]
    pub ram_total: Option<u64>,
    /// Free RAM in bytes.
    #[serde(default)]
    pub ram_free: Option<u64>,
    /// e.g. `0.3.64`.
    #[serde(default)]
    pub comfyui_version: Option<String>,
    /// Python version string.
    #[serde(default)]
    pub python_version: Option<String>,
    /// PyTorch version string.
    #[serde(default)]
    pub pytorch_version: Option<String>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One entry of `system_stats.devices`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Device name.
    #[serde(default)]
    pub name: String,
    /// `cuda`, `cpu`, `mps`, ...
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Device index.
    #[serde(default)]
    pub index: Option<u32>,
    /// VRAM in bytes.
    #[serde(default)]
    pub vram_total: Option<u64>,
    /// Free VRAM in bytes.
    #[serde(default)]
    pub vram_free: Option<u64>,
    /// Torch-reserved VRAM in bytes.
    #[serde(default)]
    pub torch_vram_total: Option<u64>,
    /// Torch-reserved free VRAM in bytes.
    #[serde(default)]
    pub torch_vram_free: Option<u64>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `GET /object_info`: node classes and their input specs, kept as JSON per class.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ObjectInfo(pub BTreeMap<String, Value>);

/// A combo input whose choices are model files (e.g. `CheckpointLoaderSimple.ckpt_name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInput {
    /// The node class.
    pub class_type: String,
    /// The input name.
    pub input_name: String,
    /// The files the instance offers.
    pub choices: Vec<String>,
}

/// File extensions of model weights.
const MODEL_EXTENSIONS: &[&str] = &[
    ".safetensors",
    ".ckpt",
    ".pt",
    ".pth",
    ".bin",
    ".gguf",
    ".onnx",
    ".sft",
    ".pt2",
    ".pkl",
];

/// Input names that always name model files, even when no file is installed yet.
const MODEL_INPUT_NAMES: &[&str] = &[
    "ckpt_name",
    "lora_name",
    "vae_name",
    "unet_name",
    "clip_name",
    "clip_name1",
    "clip_name2",
    "clip_name3",
    "control_net_name",
    "model_name",
    "style_model_name",
    "gligen_name",
    "hypernetwork_name",
    "upscale_model",
    "config_name",
];

impl ObjectInfo {
    /// Node class names.
    pub fn class_names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Whether the instance has this node class.
    pub fn has_class(&self, class_type: &str) -> bool {
        self.0.contains_key(class_type)
    }

    /// Combo inputs (`required`, `optional`) of a class with their choices. Handles both
    /// spellings: `[[choices...], {...}]` and `["COMBO", {"options": [choices...]}]`.
    pub fn combo_inputs(&self, class_type: &str) -> Vec<(String, Vec<String>)> {
        let Some(inputs) = self.0.get(class_type).and_then(|c| c.get("input")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for section in ["required", "optional"] {
            let Some(Value::Object(map)) = inputs.get(section) else {
                continue;
            };
            for (name, spec) in map {
                if let Some(choices) = combo_choices(spec) {
                    out.push((name.clone(), choices));
                }
            }
        }
        out
    }

    /// Every combo input across all classes that names model files: its name is a known
    /// model input (`ckpt_name`, `lora_name`, ...) or one of its choices is a weights file.
    pub fn model_inputs(&self) -> Vec<ModelInput> {
        let mut out = Vec::new();
        for class_type in self.0.keys() {
            for (input_name, choices) in self.combo_inputs(class_type) {
                let named = MODEL_INPUT_NAMES.contains(&input_name.as_str());
                let files = choices.iter().any(|c| {
                    let c = c.to_ascii_lowercase();
                    MODEL_EXTENSIONS.iter().any(|ext| c.ends_with(ext))
                });
                if named || files {
                    out.push(ModelInput {
                        class_type: class_type.clone(),
                        input_name,
                        choices,
                    });
                }
            }
        }
        out
    }
}

fn combo_choices(spec: &Value) -> Option<Vec<String>> {
    let spec = spec.as_array()?;
    let strings = |a: &Vec<Value>| a.iter().map(value_to_text).collect::<Vec<_>>();
    match spec.first()? {
        Value::Array(choices) => Some(strings(choices)),
        Value::String(t) if t == "COMBO" => {
            let options = spec.get(1)?.get("options")?.as_array()?;
            Some(strings(options))
        }
        _ => None,
    }
}
