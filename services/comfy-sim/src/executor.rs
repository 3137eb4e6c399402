//! The prompt worker: takes queue items one at a time and runs them the way ComfyUI's
//! `PromptExecutor` does, with the same WebSocket messages in the same order, the output
//! cache, interrupts, injected failures and the history entry written last.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::config::{Failure, PreviewFormat};
use crate::frames;
use crate::media::{self, Frame};
use crate::queue::QueueItem;
use crate::server::SentSuccess;
use crate::state::{Cached, Instance, Out};
use crate::storage::{DirKind, save_path};
use crate::validation::id_order;

/// A value flowing between simulated nodes.
#[derive(Debug, Clone)]
pub(crate) enum Val {
    Image {
        w: u32,
        h: u32,
        batch: u32,
        color: u32,
    },
    Mask {
        w: u32,
        h: u32,
    },
    Latent {
        w: u32,
        h: u32,
        batch: u32,
    },
    Int(i64),
    Audio,
    Video {
        w: u32,
        h: u32,
        frames: u32,
    },
    UpscaleModel {
        scale: u32,
    },
    Opaque(&'static str),
}

impl Val {
    fn describe(&self) -> String {
        match self {
            Val::Image { w, h, batch, .. } => {
                format!("tensor(<image batch={batch} height={h} width={w} channels=3>)")
            }
            Val::Mask { w, h } => format!("tensor(<mask height={h} width={w}>)"),
            Val::Latent { w, h, batch } => {
                format!("{{'samples': tensor(<latent batch={batch} height={h} width={w}>)}}")
            }
            Val::Int(i) => i.to_string(),
            Val::Audio => "{'waveform': tensor(<audio>), 'sample_rate': 16000}".to_owned(),
            Val::Video { .. } => {
                "<comfy_api.latest._input_impl.video_types.VideoFromComponents object>".to_owned()
            }
            Val::UpscaleModel { .. } => "<spandrel.ImageModelDescriptor object>".to_owned(),
            Val::Opaque(t) => format!("<{t} object>"),
        }
    }
}

/// Why a node (or the prompt) stopped.
enum Stop {
    Exception {
        kind: String,
        message: String,
    },
    Interrupted,
    /// The process "died": stop without another message.
    Crashed,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const TRACEBACK_HEAD: [&str; 4] = [
    "  File \"/srv/ComfyUI/execution.py\", line 496, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n                                                              ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
    "  File \"/srv/ComfyUI/execution.py\", line 315, in get_output_data\n    return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n                    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
    "  File \"/srv/ComfyUI/execution.py\", line 289, in _async_map_node_over_list\n    await process_inputs(input_dict, i)\n",
    "  File \"/srv/ComfyUI/execution.py\", line 277, in process_inputs\n    result = f(**inputs)\n             ^^^^^^^^^^^\n",
];

/// Runs queue items until the instance is cancelled.
pub(crate) async fn run(inst: Arc<Instance>) {
    loop {
        let item = {
            let mut st = inst.lock();
            match st.pending.pop() {
                Some(item) => {
                    st.running = Some(item.clone());
                    st.queue_updated();
                    Some(item)
                }
                None => None,
            }
        };
        match item {
            Some(item) => {
                if !Prompt::new(&inst, item).execute().await {
                    return;
                }
            }
            None => {
                tokio::select! {
                    () = inst.wake.notified() => {}
                    () = inst.cancel.cancelled() => return,
                }
            }
        }
    }
}

struct Prompt<'a> {
    inst: &'a Arc<Instance>,
    item: QueueItem,
    client: Option<String>,
    progress: Map<String, Value>,
    messages: Vec<Value>,
    outputs_ui: Map<String, Value>,
    meta: Map<String, Value>,
    executed: Vec<String>,
    values: HashMap<String, Vec<Val>>,
}

impl<'a> Prompt<'a> {
    fn new(inst: &'a Arc<Instance>, item: QueueItem) -> Self {
        let client = item.client_id();
        Self {
            inst,
            item,
            client,
            progress: Map::new(),
            messages: Vec::new(),
            outputs_ui: Map::new(),
            meta: Map::new(),
            executed: Vec::new(),
            values: HashMap::new(),
        }
    }

    fn pid(&self) -> &str {
        &self.item.prompt_id
    }

    /// A message only the submitting client gets (none without a client id).
    fn to_client(&self, event: &str, data: Value) {
        if let Some(c) = &self.client {
            self.inst.lock().send_json(event, data, Some(c));
        }
    }

    /// `add_message`: timestamped, kept for history, sent to the client.
    fn add_message(&mut self, event: &str, mut data: Map<String, Value>) {
        data.insert("timestamp".into(), json!(now_ms()));
        let data = Value::Object(data);
        self.messages.push(json!([event, data]));
        self.to_client(event, data);
    }

    fn send_progress_state(&self) {
        let data = json!({"prompt_id": self.pid(), "nodes": self.progress});
        self.inst
            .lock()
            .send_json("progress_state", data, self.client.as_deref());
    }

    fn progress_entry(&self, node: &str, value: Value, max: Value, state: &str) -> Value {
        json!({"value": value, "max": max, "state": state, "node_id": node, "prompt_id": self.pid(), "display_node_id": node, "parent_node_id": null, "real_node_id": node})
    }

    async fn sleep(&self, ms: u64) -> Result<(), Stop> {
        if ms == 0 {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(ms)) => Ok(()),
            () = self.inst.cancel.cancelled() => Err(Stop::Crashed),
        }
    }

    fn check_interrupt(&self) -> Result<(), Stop> {
        if self.inst.cancel.is_cancelled() {
            return Err(Stop::Crashed);
        }
        let mut st = self.inst.lock();
        if st.interrupt {
            st.interrupt = false;
            return Err(Stop::Interrupted);
        }
        Ok(())
    }

    /// Execution order: depth-first from each output, dependencies first.
    fn order(&self) -> Vec<String> {
        fn visit(
            id: &str,
            prompt: &Map<String, Value>,
            seen: &mut HashSet<String>,
            out: &mut Vec<String>,
        ) {
            if !seen.insert(id.to_owned()) {
                return;
            }
            if let Some(inputs) = prompt
                .get(id)
                .and_then(|n| n.get("inputs"))
                .and_then(Value::as_object)
            {
                for v in inputs.values() {
                    if let Some(up) = v.get(0).and_then(Value::as_str)
                        && v.as_array().is_some_and(|a| a.len() == 2)
                    {
                        visit(up, prompt, seen, out);
                    }
                }
            }
            out.push(id.to_owned());
        }
        let mut outputs = self.item.outputs.clone();
        outputs.sort_by(|a, b| id_order(a, b));
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for o in &outputs {
            visit(o, &self.item.prompt, &mut seen, &mut out);
        }
        out
    }

    fn signatures(&self) -> HashMap<String, String> {
        fn sig(
            id: &str,
            prompt: &Map<String, Value>,
            inst: &Instance,
            memo: &mut HashMap<String, String>,
            depth: usize,
        ) -> String {
            if let Some(s) = memo.get(id) {
                return s.clone();
            }
            let node = prompt.get(id).cloned().unwrap_or(Value::Null);
            let class = node.get("class_type").cloned().unwrap_or(Value::Null);
            let mut h = Sha256::new();
            h.update(class.to_string());
            // The probe nodes are not idempotent (IS_CHANGED returns NaN): never cached.
            if matches!(class.as_str(), Some("PeerSlowProgress" | "PeerFail")) {
                h.update(uuid::Uuid::new_v4().as_bytes());
            }
            if let Some(inputs) = node.get("inputs").and_then(Value::as_object) {
                let mut keys: Vec<&String> = inputs.keys().collect();
                keys.sort();
                for k in keys {
                    let v = &inputs[k];
                    h.update(k.as_bytes());
                    match (v.as_array(), v.get(0).and_then(Value::as_str)) {
                        (Some(a), Some(up)) if a.len() == 2 && depth < 10_000 => {
                            h.update(sig(up, prompt, inst, memo, depth + 1));
                            h.update(a[1].to_string());
                        }
                        _ => h.update(v.to_string()),
                    }
                    if matches!(k.as_str(), "image" | "audio")
                        && let Some(name) = v.as_str()
                        && let Some(p) = inst.core.storage.input_path(name)
                        && let Ok(m) = std::fs::metadata(p)
                    {
                        h.update(format!("{}:{:?}", m.len(), m.modified().ok()));
                    }
                }
            }
            let s = format!("{:x}", h.finalize());
            memo.insert(id.to_owned(), s.clone());
            s
        }
        let mut memo = HashMap::new();
        for id in self.item.prompt.keys() {
            sig(id, &self.item.prompt, self.inst, &mut memo, 0);
        }
        memo
    }

    /// Runs the prompt; `false` when the process crashed.
    async fn execute(mut self) -> bool {
        let failure = self.inst.core.take_failure();
        {
            let mut st = self.inst.lock();
            st.client_id = self.client.clone();
            st.interrupt = false;
        }
        let mut start = Map::new();
        start.insert("prompt_id".into(), json!(self.pid()));
        self.add_message("execution_start", start);

        let sigs = self.signatures();
        let order = self.order();
        let cached: HashMap<String, Cached> = {
            let mut st = self.inst.lock();
            let keep: HashSet<&String> = sigs.values().collect();
            st.cache.retain(|k, _| keep.contains(k));
            self.item
                .prompt
                .keys()
                .filter_map(|id| {
                    let c = st.cache.get(sigs.get(id)?)?;
                    Some((id.clone(), c.clone()))
                })
                .collect()
        };
        let cached_ids: Vec<&String> = self
            .item
            .prompt
            .keys()
            .filter(|id| cached.contains_key(*id))
            .collect();
        let mut c = Map::new();
        c.insert("nodes".into(), json!(cached_ids));
        c.insert("prompt_id".into(), json!(self.pid()));
        self.add_message("execution_cached", c);

        let to_run: Vec<&String> = order.iter().filter(|n| !cached.contains_key(*n)).collect();
        let trigger = to_run.get(to_run.len() / 2).map(|s| (*s).clone());
        let mut failure = failure;

        let mut result: Result<(), (String, Stop)> = Ok(());
        for node in &order {
            if let Some(hit) = cached.get(node) {
                self.values.insert(node.clone(), hit.outputs.clone());
                if let Some(ui) = &hit.ui {
                    self.to_client(
                        "executed",
                        json!({"node": node, "display_node": node, "output": ui, "prompt_id": self.pid()}),
                    );
                    self.outputs_ui.insert(node.clone(), ui.clone());
                    self.meta.insert(node.clone(), meta_of(node));
                    let e = self.progress_entry(node, json!(1), json!(1), "finished");
                    self.progress.insert(node.clone(), e);
                    self.send_progress_state();
                }
                continue;
            }
            let e = self.progress_entry(node, json!(0.0), json!(1.0), "running");
            self.progress.insert(node.clone(), e);
            self.send_progress_state();
            self.to_client(
                "executing",
                json!({"node": node, "display_node": node, "prompt_id": self.pid()}),
            );
            self.inst.lock().last_node_id = Some(node.clone());
            if let Err(stop) = self.check_interrupt() {
                result = Err((node.clone(), stop));
                break;
            }
            if trigger.as_ref() == Some(node)
                && let Some(f) = failure.take()
                && let Err(stop) = self.apply_failure(f)
            {
                result = Err((node.clone(), stop));
                break;
            }
            match self.run_node(node).await {
                Ok((outs, ui)) => {
                    if let Some(ui) = &ui {
                        self.to_client(
                            "executed",
                            json!({"node": node, "display_node": node, "output": ui, "prompt_id": self.pid()}),
                        );
                        self.outputs_ui.insert(node.clone(), ui.clone());
                        self.meta.insert(node.clone(), meta_of(node));
                    }
                    if let Some(p) = self.progress.get_mut(node) {
                        let max = p["max"].clone();
                        p["value"] = max;
                        p["state"] = json!("finished");
                    }
                    self.send_progress_state();
                    self.executed.push(node.clone());
                    if let Some(sig) = sigs.get(node) {
                        self.inst.lock().cache.insert(
                            sig.clone(),
                            Cached {
                                ui,
                                outputs: outs.clone(),
                            },
                        );
                    }
                    self.values.insert(node.clone(), outs);
                }
                Err(stop) => {
                    result = Err((node.clone(), stop));
                    break;
                }
            }
        }
        if result.is_ok()
            && let Some(f) = failure.take()
            && let Err(stop) = self.apply_failure(f)
        {
            let node = order.last().cloned().unwrap_or_default();
            result = Err((node, stop));
        }

        let status_str = match result {
            Ok(()) => {
                let mut m = Map::new();
                m.insert("prompt_id".into(), json!(self.pid()));
                self.add_message("execution_success", m);
                self.inst.core.record_success(SentSuccess {
                    prompt_id: self.pid().to_owned(),
                    sent_at: std::time::Instant::now(),
                });
                "success"
            }
            Err((_, Stop::Crashed)) => return false,
            Err((node, Stop::Interrupted)) => {
                let mut m = Map::new();
                m.insert("prompt_id".into(), json!(self.pid()));
                m.insert("node_id".into(), json!(node));
                m.insert("node_type".into(), json!(self.class_of(&node)));
                m.insert("executed".into(), json!(self.executed));
                self.add_message("execution_interrupted", m);
                "error"
            }
            Err((node, Stop::Exception { kind, message })) => {
                let class = self.class_of(&node);
                let mut tb: Vec<Value> = TRACEBACK_HEAD.iter().map(|s| json!(s)).collect();
                tb.push(json!(format!(
                    "  File \"/srv/ComfyUI/nodes.py\", line 1, in {}\n    raise {kind}(message)\n",
                    class
                )));
                let tips = if kind == "torch.OutOfMemoryError" {
                    "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."
                } else {
                    ""
                };
                let mut m = Map::new();
                m.insert("prompt_id".into(), json!(self.pid()));
                m.insert("node_id".into(), json!(node));
                m.insert("node_type".into(), json!(class));
                m.insert("executed".into(), json!(self.executed));
                m.insert(
                    "exception_message".into(),
                    json!(format!("{message}\n{tips}")),
                );
                m.insert("exception_type".into(), json!(kind));
                m.insert("traceback".into(), json!(tb));
                m.insert("current_inputs".into(), self.current_inputs(&node));
                m.insert(
                    "current_outputs".into(),
                    json!(self.item.prompt.keys().collect::<Vec<_>>()),
                );
                self.add_message("execution_error", m);
                "error"
            }
        };
        let entry = json!({
            "prompt": self.item.to_json(),
            "outputs": self.outputs_ui,
            "status": {"status_str": status_str, "completed": status_str == "success", "messages": self.messages},
            "meta": self.meta,
        });
        let mut st = self.inst.lock();
        st.running = None;
        let id = self.item.prompt_id.clone();
        st.history.retain(|(k, _)| *k != id);
        st.history.push((id, entry));
        if st.history.len() > 10_000 {
            st.history.remove(0);
        }
        st.queue_updated();
        if let Some(c) = &self.client {
            st.send_json(
                "executing",
                json!({"node": null, "prompt_id": self.pid()}),
                Some(c),
            );
        }
        st.last_node_id = None;
        true
    }

    fn apply_failure(&self, f: Failure) -> Result<(), Stop> {
        match f {
            Failure::NodeException {
                exception_type,
                message,
            } => Err(Stop::Exception {
                kind: exception_type,
                message,
            }),
            Failure::CrashMidPrompt => {
                self.inst.core.crash_now(self.inst, true);
                Err(Stop::Crashed)
            }
            Failure::SilentWs => {
                if let Some(c) = &self.client
                    && let Some(s) = self.inst.lock().sockets.get_mut(c)
                {
                    s.silent = true;
                }
                Ok(())
            }
            Failure::DropWs => {
                if let Some(c) = &self.client
                    && let Some(s) = self.inst.lock().sockets.remove(c)
                {
                    let _ = s.tx.send(Out::Drop);
                }
                Ok(())
            }
        }
    }

    fn class_of(&self, node: &str) -> String {
        self.item
            .prompt
            .get(node)
            .and_then(|n| n.get("class_type"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }

    fn inputs_of(&self, node: &str) -> Map<String, Value> {
        self.item
            .prompt
            .get(node)
            .and_then(|n| n.get("inputs"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    }

    fn linked(&self, v: &Value) -> Option<&Val> {
        let a = v.as_array().filter(|a| a.len() == 2)?;
        let up = a[0].as_str()?;
        let slot = usize::try_from(a[1].as_i64()?).ok()?;
        self.values.get(up)?.get(slot)
    }

    fn current_inputs(&self, node: &str) -> Value {
        let mut out = Map::new();
        for (k, v) in self.inputs_of(node) {
            let s = match self.linked(&v) {
                Some(val) => val.describe(),
                None => crate::pyfmt::py_str(&v),
            };
            out.insert(k, json!([s]));
        }
        Value::Object(out)
    }

    /// One progress hook call: interrupt check, progress_state, preview, progress.
    async fn steps(
        &mut self,
        node: &str,
        n: u32,
        delay_ms: u64,
        preview: Option<PreviewFormat>,
    ) -> Result<(), Stop> {
        for i in 1..=n {
            self.sleep(delay_ms).await?;
            self.check_interrupt()?;
            let e = self.progress_entry(node, json!(i), json!(n), "running");
            self.progress.insert(node.to_owned(), e);
            self.send_progress_state();
            let (fmt, image, mime) = match preview {
                Some(PreviewFormat::Png) => (2u32, media::preview_png(), "image/png"),
                _ => (1u32, media::preview_jpeg(), "image/jpeg"),
            };
            let progress = json!({"value": i, "max": n, "prompt_id": self.pid(), "node": node});
            let client = self.client.clone();
            let mut st = self.inst.lock();
            let metadata = st.supports_metadata(client.as_deref());
            if preview.is_some() && metadata {
                let meta = json!({"node_id": node, "prompt_id": self.pid(), "display_node_id": node, "parent_node_id": null, "real_node_id": node, "image_type": mime});
                st.send_bytes(
                    frames::preview_with_metadata(&meta, image),
                    client.as_deref(),
                );
            }
            st.send_json("progress", progress, client.as_deref());
            if preview.is_some() && !metadata {
                if client.is_some() {
                    st.send_bytes(frames::preview(fmt, image), client.as_deref());
                } else {
                    let meta = json!({"node_id": node, "prompt_id": self.pid(), "display_node_id": node, "parent_node_id": null, "real_node_id": node, "image_type": mime});
                    st.send_preview(
                        None,
                        frames::preview(fmt, image),
                        frames::preview_with_metadata(&meta, image),
                    );
                }
            }
        }
        Ok(())
    }

    fn image_in(&self, inputs: &Map<String, Value>, name: &str) -> (u32, u32, u32, u32) {
        match inputs.get(name).and_then(|v| self.linked(v)) {
            Some(Val::Image { w, h, batch, color }) => (*w, *h, *batch, *color),
            Some(Val::Video { w, h, frames }) => (*w, *h, *frames, 0x808080),
            _ => (64, 64, 1, 0),
        }
    }

    async fn run_node(&mut self, node: &str) -> Result<(Vec<Val>, Option<Value>), Stop> {
        let class = self.class_of(node);
        let inputs = self.inputs_of(node);
        let cfg = self.inst.core.config();
        let int = |k: &str| inputs.get(k).and_then(Value::as_i64).unwrap_or(0);
        let float = |k: &str| inputs.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        let string = |k: &str| inputs.get(k).map(crate::pyfmt::py_str).unwrap_or_default();
        let dim = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
        let previews = cfg.previews.then_some(cfg.preview_format);
        let sampler_like = matches!(
            class.as_str(),
            "KSampler" | "ImageUpscaleWithModel" | "PeerSlowProgress"
        );
        if !sampler_like {
            self.sleep(cfg.node_delay_ms).await?;
        }
        let (w, h, batch, color) = self.image_in(&inputs, "image");
        let out = match class.as_str() {
            "EmptyImage" => (
                vec![Val::Image {
                    w: dim(int("width")),
                    h: dim(int("height")),
                    batch: dim(int("batch_size")),
                    color: dim(int("color")),
                }],
                None,
            ),
            "LoadImage" => {
                let name = string("image");
                let path = self.inst.core.storage.input_path(&name);
                let Some(path) = path.filter(|p| p.is_file()) else {
                    return Err(Stop::Exception {
                        kind: "FileNotFoundError".into(),
                        message: format!("[Errno 2] No such file or directory: '{name}'"),
                    });
                };
                let (w, h) = media::png_size(&path).unwrap_or((64, 64));
                (
                    vec![
                        Val::Image {
                            w,
                            h,
                            batch: 1,
                            color: 0x808080,
                        },
                        Val::Mask { w, h },
                    ],
                    None,
                )
            }
            "LoadAudio" => (vec![Val::Audio], None),
            "ImageToMask" => (vec![Val::Mask { w, h }], None),
            "ImageInvert" => (
                vec![Val::Image {
                    w,
                    h,
                    batch,
                    color: color ^ 0xff_ffff,
                }],
                None,
            ),
            "ImageBlur" => (vec![Val::Image { w, h, batch, color }], None),
            "PeerFail" => {
                return Err(Stop::Exception {
                    kind: "ValueError".into(),
                    message: string("message"),
                });
            }
            "ImageScale" => {
                let (mut nw, mut nh) = (dim(int("width")), dim(int("height")));
                if nw == 0 && nh == 0 {
                    (nw, nh) = (w, h);
                } else if nw == 0 {
                    nw = ((u64::from(w) * u64::from(nh)) / u64::from(h.max(1))) as u32;
                } else if nh == 0 {
                    nh = ((u64::from(h) * u64::from(nw)) / u64::from(w.max(1))) as u32;
                }
                (
                    vec![Val::Image {
                        w: nw,
                        h: nh,
                        batch,
                        color,
                    }],
                    None,
                )
            }
            "ImageScaleBy" => {
                let s = float("scale_by");
                let nw = (f64::from(w) * s).round() as u32;
                let nh = (f64::from(h) * s).round() as u32;
                if nw == 0 || nh == 0 {
                    return Err(Stop::Exception {
                        kind: "RuntimeError".into(),
                        message: format!(
                            "Input and output sizes should be greater than 0, but got input (H: {h}, W: {w}) output (H: {nh}, W: {nw})"
                        ),
                    });
                }
                (
                    vec![Val::Image {
                        w: nw,
                        h: nh,
                        batch,
                        color,
                    }],
                    None,
                )
            }
            "GetImageSize" => {
                let text = format!("width: {w}, height: {h}\n batch size: {batch}");
                self.inst.lock().send_bytes(frames::text(node, &text), None);
                (
                    vec![
                        Val::Int(i64::from(w)),
                        Val::Int(i64::from(h)),
                        Val::Int(i64::from(batch)),
                    ],
                    None,
                )
            }
            "PreviewAny" => {
                let text = match inputs.get("source") {
                    Some(v) => match self.linked(v) {
                        Some(val) => val.describe(),
                        None => crate::pyfmt::py_str(v),
                    },
                    None => String::new(),
                };
                (vec![], Some(json!({"text": [text]})))
            }
            "UpscaleModelLoader" => (vec![Val::UpscaleModel { scale: 2 }], None),
            "ImageUpscaleWithModel" => {
                let scale = match inputs.get("upscale_model").and_then(|v| self.linked(v)) {
                    Some(Val::UpscaleModel { scale }) => *scale,
                    _ => 2,
                };
                self.steps(node, cfg.steps.unwrap_or(4), cfg.step_delay_ms, previews)
                    .await?;
                (
                    vec![Val::Image {
                        w: w.saturating_mul(scale),
                        h: h.saturating_mul(scale),
                        batch,
                        color,
                    }],
                    None,
                )
            }
            "PeerSlowProgress" => {
                let fmt = if string("preview_format") == "PNG" {
                    PreviewFormat::Png
                } else {
                    PreviewFormat::Jpeg
                };
                let send = inputs
                    .get("send_previews")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                let steps = dim(int("steps")).max(1);
                let step_ms = u64::try_from(int("step_ms")).unwrap_or(0);
                self.steps(node, steps, step_ms, send.then_some(fmt))
                    .await?;
                (vec![Val::Image { w, h, batch, color }], None)
            }
            "CheckpointLoaderSimple" => (
                vec![
                    Val::Opaque("MODEL"),
                    Val::Opaque("CLIP"),
                    Val::Opaque("VAE"),
                ],
                None,
            ),
            "CLIPTextEncode" => (vec![Val::Opaque("CONDITIONING")], None),
            "EmptyLatentImage" => (
                vec![Val::Latent {
                    w: dim(int("width")),
                    h: dim(int("height")),
                    batch: dim(int("batch_size")),
                }],
                None,
            ),
            "KSampler" => {
                let latent = inputs
                    .get("latent_image")
                    .and_then(|v| self.linked(v))
                    .cloned()
                    .unwrap_or(Val::Latent {
                        w: 512,
                        h: 512,
                        batch: 1,
                    });
                let steps = cfg.steps.unwrap_or(dim(int("steps")).max(1));
                self.steps(node, steps, cfg.step_delay_ms, previews).await?;
                (vec![latent], None)
            }
            "VAEDecode" => {
                let (w, h, batch) = match inputs.get("samples").and_then(|v| self.linked(v)) {
                    Some(Val::Latent { w, h, batch }) => (*w, *h, *batch),
                    _ => (512, 512, 1),
                };
                (
                    vec![Val::Image {
                        w,
                        h,
                        batch,
                        color: 0x7f7f7f,
                    }],
                    None,
                )
            }
            "VAEEncode" => {
                let (w, h, batch, _) = self.image_in(&inputs, "pixels");
                (vec![Val::Latent { w, h, batch }], None)
            }
            "CreateVideo" => (
                vec![Val::Video {
                    w,
                    h,
                    frames: batch,
                }],
                None,
            ),
            "SaveImage" | "PreviewImage" | "SaveAnimatedWEBP" | "SaveAnimatedPNG" | "SaveVideo"
            | "SaveAudio" => {
                let ui = self.save(&class, &inputs).await?;
                (vec![], Some(ui))
            }
            other => {
                return Err(Stop::Exception {
                    kind: "NotImplementedError".into(),
                    message: format!("comfy-sim does not simulate {other}"),
                });
            }
        };
        Ok(out)
    }

    async fn save(&mut self, class: &str, inputs: &Map<String, Value>) -> Result<Value, Stop> {
        let core = self.inst.core.clone();
        let target = core.config().output_bytes;
        let (w, h, batch, color) = match class {
            "SaveVideo" => self.image_in(inputs, "video"),
            _ => self.image_in(inputs, "images"),
        };
        let (kind, prefix) = if class == "PreviewImage" {
            let suffix: String = {
                let mut rng = rand::rng();
                let chars = b"abcdefghijklmnopqrstupvxyz";
                (0..5)
                    .map(|_| chars[rng.random_range(0..chars.len())] as char)
                    .collect()
            };
            (DirKind::Temp, format!("ComfyUI_temp_{suffix}"))
        } else {
            let default = if class == "SaveAudio" {
                "audio/ComfyUI"
            } else {
                "ComfyUI"
            };
            let p = inputs
                .get("filename_prefix")
                .map(crate::pyfmt::py_str)
                .unwrap_or_else(|| default.to_owned());
            (DirKind::Output, p)
        };
        let fps = inputs.get("fps").and_then(Value::as_f64).unwrap_or(6.0);
        let prompt_text = Value::Object(self.item.prompt.clone()).to_string();
        let base = core.storage.dir(kind);
        let class = class.to_owned();
        let res = tokio::task::spawn_blocking(move || -> Result<Value, String> {
            let (folder, filename, counter, subfolder) = save_path(&base, &prefix)?;
            std::fs::create_dir_all(&folder).map_err(|e| e.to_string())?;
            let entry = |name: &str| json!({"filename": name, "subfolder": subfolder, "type": kind.as_str()});
            let frame = Frame {
                width: w,
                height: h,
                color,
            };
            let io = |e: std::io::Error| e.to_string();
            match class.as_str() {
                "SaveImage" | "PreviewImage" => {
                    let mut images = Vec::new();
                    for i in 0..batch.max(1) {
                        let name = format!("{filename}_{:05}_.png", counter + i);
                        media::write_png(&folder.join(&name), &[frame], fps, Some(&prompt_text), target)?;
                        images.push(entry(&name));
                    }
                    Ok(json!({"images": images}))
                }
                "SaveAnimatedPNG" => {
                    let name = format!("{filename}_{counter:05}_.png");
                    let frames = vec![frame; batch.max(1) as usize];
                    media::write_png(&folder.join(&name), &frames, fps, Some(&prompt_text), target)?;
                    Ok(json!({"images": [entry(&name)], "animated": [batch != 1]}))
                }
                "SaveAnimatedWEBP" => {
                    let name = format!("{filename}_{counter:05}_.webp");
                    media::write_webp(&folder.join(&name), target).map_err(io)?;
                    Ok(json!({"images": [entry(&name)], "animated": [batch != 1]}))
                }
                "SaveVideo" => {
                    let name = format!("{filename}_{counter:05}_.mp4");
                    media::write_mp4(&folder.join(&name), target).map_err(io)?;
                    Ok(json!({"images": [entry(&name)], "animated": [true]}))
                }
                _ => {
                    let name = format!("{filename}_{counter:05}_.flac");
                    media::write_flac(&folder.join(&name), target).map_err(io)?;
                    Ok(json!({"audio": [entry(&name)]}))
                }
            }
        })
        .await;
        match res {
            Ok(Ok(ui)) => Ok(ui),
            Ok(Err(message)) => Err(Stop::Exception {
                kind: "Exception".into(),
                message,
            }),
            Err(e) => Err(Stop::Exception {
                kind: "RuntimeError".into(),
                message: e.to_string(),
            }),
        }
    }
}

fn meta_of(node: &str) -> Value {
    json!({"node_id": node, "display_node": node, "parent_node": null, "real_node_id": node})
}
