//! HTTP routes of ComfyUI 0.3.64, each also under `/api/`, with its status codes, content
//! types and bodies.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use crate::nodes::{self, ComboSource};
use crate::pyfmt::{dumps, py_str};
use crate::queue::QueueItem;
use crate::server::{Core, ReceivedPrompt};
use crate::state::Instance;
use crate::storage::{DirKind, annotated_filepath, content_type, safe_join};
use crate::validation::{ValidationEnv, validate_prompt};

type St = State<Arc<Instance>>;

/// The router of one instance.
pub(crate) fn router(inst: Arc<Instance>) -> Router {
    let limit = usize::try_from(inst.core.config().max_upload_size).unwrap_or(usize::MAX);
    let r = Router::new()
        .route("/ws", get(crate::ws::handler))
        .route("/system_stats", get(system_stats))
        .route("/features", get(features))
        .route("/prompt", get(get_prompt).post(post_prompt))
        .route("/models", get(models))
        .route("/models/{folder}", get(models_in))
        .route("/embeddings", get(embeddings))
        .route("/extensions", get(embeddings))
        .route("/object_info", get(object_info))
        .route("/object_info/{class}", get(object_info_one))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/history", get(get_history).post(post_history))
        .route("/history/{id}", get(get_history_one))
        .route("/interrupt", post(interrupt))
        .route("/free", post(free))
        .route("/view", get(view))
        .route("/upload/image", post(upload_image))
        .layer(DefaultBodyLimit::max(limit.saturating_add(1 << 20)));
    Router::new()
        .merge(r.clone())
        .nest("/api", r)
        .with_state(inst)
}

/// `web.json_response`: Python's `json.dumps` layout and content type.
pub(crate) fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut r = (status, dumps(v)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn ok(v: &Value) -> Response {
    json_response(StatusCode::OK, v)
}

/// aiohttp's answer to an exception inside a handler.
fn internal_error() -> Response {
    let mut r = (
        StatusCode::INTERNAL_SERVER_ERROR,
        "500 Internal Server Error\n\nServer got itself in trouble",
    )
        .into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn parse(body: &Bytes) -> Result<Value, Box<Response>> {
    serde_json::from_slice(body).map_err(|_| Box::new(internal_error()))
}

struct Env<'a>(&'a Core);

impl ComboSource for Env<'_> {
    fn input_files(&self) -> Vec<String> {
        self.0.storage.list(DirKind::Input)
    }
    fn models(&self, folder: &str) -> Vec<String> {
        self.0
            .config()
            .models
            .get(folder)
            .cloned()
            .unwrap_or_default()
    }
}

impl ValidationEnv for Env<'_> {
    fn exists(&self, class: &str) -> bool {
        crate::nodes::exists(class)
    }
    fn is_output(&self, class: &str) -> bool {
        crate::nodes::is_output(class)
    }
    fn return_types(&self, class: &str) -> Vec<String> {
        crate::nodes::return_types(class)
    }
    fn input_types(&self, class: &str) -> Map<String, Value> {
        crate::nodes::input_types(class, self)
    }
    fn input_exists(&self, annotated: &str) -> bool {
        self.0.storage.input_exists(annotated)
    }
}

async fn system_stats() -> Response {
    ok(&json!({
        "system": {
            "os": "posix",
            "ram_total": 25_276_502_016u64,
            "ram_free": 24_134_852_608u64,
            "comfyui_version": "0.3.64",
            "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95",
            "python_version": "3.11.2 (main, Apr 28 2025, 14:11:48) [GCC 12.2.0]",
            "pytorch_version": "2.8.0+cpu",
            "embedded_python": false,
            "argv": ["main.py", "--cpu", "--listen", "127.0.0.1"]
        },
        "devices": [{
            "name": "cpu",
            "type": "cpu",
            "index": null,
            "vram_total": 25_276_502_016u64,
            "vram_free": 24_134_852_608u64,
            "torch_vram_total": 25_276_502_016u64,
            "torch_vram_free": 24_134_852_608u64
        }]
    }))
}

async fn features(State(inst): St) -> Response {
    let max = inst.core.config().max_upload_size;
    ok(&json!({"supports_preview_metadata": true, "max_upload_size": max}))
}

async fn get_prompt(State(inst): St) -> Response {
    let info = inst.lock().queue_info();
    ok(&info)
}

async fn models(State(inst): St) -> Response {
    let cfg = inst.core.config();
    let mut names: Vec<String> = crate::config::MODEL_FOLDERS
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    for k in cfg.models.keys() {
        if !names.contains(k) {
            names.push(k.clone());
        }
    }
    ok(&json!(names))
}

async fn models_in(State(inst): St, UrlPath(folder): UrlPath<String>) -> Response {
    let cfg = inst.core.config();
    if let Some(list) = cfg.models.get(&folder) {
        return ok(&json!(list));
    }
    if crate::config::MODEL_FOLDERS.contains(&folder.as_str()) {
        return ok(&json!([]));
    }
    StatusCode::NOT_FOUND.into_response()
}

async fn embeddings() -> Response {
    ok(&json!([]))
}

async fn object_info(State(inst): St) -> Response {
    let env = Env(&inst.core);
    let mut out = Map::new();
    for class in nodes::classes() {
        if let Some(info) = nodes::object_info(class, &env) {
            out.insert(class.clone(), info);
        }
    }
    ok(&Value::Object(out))
}

async fn object_info_one(State(inst): St, UrlPath(class): UrlPath<String>) -> Response {
    let env = Env(&inst.core);
    let mut out = Map::new();
    if let Some(info) = nodes::object_info(&class, &env) {
        out.insert(class, info);
    }
    ok(&Value::Object(out))
}

async fn get_queue(State(inst): St) -> Response {
    let st = inst.lock();
    let running: Vec<Value> = st.running.iter().map(QueueItem::to_json).collect();
    let pending: Vec<Value> = st.pending.items().iter().map(QueueItem::to_json).collect();
    drop(st);
    ok(&json!({"queue_running": running, "queue_pending": pending}))
}

async fn post_queue(State(inst): St, body: Bytes) -> Response {
    let v = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let mut st = inst.lock();
    if v.get("clear").is_some_and(truthy) {
        st.pending.clear();
        st.queue_updated();
    }
    if let Some(ids) = v.get("delete").and_then(Value::as_array) {
        for id in ids {
            if st.pending.remove(&py_str(id)) {
                st.queue_updated();
            }
        }
    }
    StatusCode::OK.into_response()
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

async fn get_history(State(inst): St, Query(q): Query<HashMap<String, String>>) -> Response {
    let max = match q.get("max_items").map(|s| s.trim().parse::<usize>()) {
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return internal_error(),
        None => None,
    };
    let st = inst.lock();
    let skip = max.map_or(0, |m| st.history.len().saturating_sub(m));
    let mut out = Map::new();
    for (k, v) in st.history.iter().skip(skip) {
        out.insert(k.clone(), v.clone());
    }
    drop(st);
    ok(&Value::Object(out))
}

async fn get_history_one(State(inst): St, UrlPath(id): UrlPath<String>) -> Response {
    let st = inst.lock();
    let mut out = Map::new();
    if let Some(v) = st.history_get(&id) {
        out.insert(id, v.clone());
    }
    drop(st);
    ok(&Value::Object(out))
}

async fn post_history(State(inst): St, body: Bytes) -> Response {
    let v = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let mut st = inst.lock();
    if v.get("clear").is_some_and(truthy) {
        st.history.clear();
    }
    if let Some(ids) = v.get("delete").and_then(Value::as_array) {
        for id in ids {
            let id = py_str(id);
            st.history.retain(|(k, _)| *k != id);
        }
    }
    StatusCode::OK.into_response()
}

async fn interrupt(State(inst): St, body: Bytes) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or_else(|_| json!({}));
    let target = v.get("prompt_id").filter(|p| truthy(p)).map(py_str);
    let mut st = inst.lock();
    match target {
        Some(id) => {
            if st.running.as_ref().is_some_and(|r| r.prompt_id == id) {
                st.interrupt = true;
            }
        }
        None => st.interrupt = true,
    }
    StatusCode::OK.into_response()
}

async fn free(body: Bytes) -> Response {
    match parse(&body) {
        Ok(_) => StatusCode::OK.into_response(),
        Err(r) => *r,
    }
}

async fn post_prompt(State(inst): St, body: Bytes) -> Response {
    let received_at = Instant::now();
    let received_wall = std::time::SystemTime::now();
    let v = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let body = match v {
        Value::Object(o) => o,
        _ => Map::new(),
    };
    let number = match body.get("number") {
        Some(n) => {
            let f = match n {
                Value::Number(x) => x.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                Value::Bool(b) => Some(f64::from(u8::from(*b))),
                _ => None,
            };
            match f {
                Some(f) => json!(f),
                None => return internal_error(),
            }
        }
        None => {
            let mut st = inst.lock();
            let mut n = st.number;
            if body.get("front").is_some_and(truthy) {
                n = -n;
            }
            st.number += 1;
            json!(n)
        }
    };
    let Some(prompt) = body.get("prompt") else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}, "node_errors": {}}),
        );
    };
    let Value::Object(mut prompt) = prompt.clone() else {
        return internal_error();
    };
    let prompt_id = body
        .get("prompt_id")
        .map(py_str)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let partial: Option<Vec<String>> = body
        .get("partial_execution_targets")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(py_str).collect());
    let verdict = validate_prompt(&mut prompt, partial.as_deref(), &Env(&inst.core));
    let mut extra_data = body
        .get("extra_data")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(c) = body.get("client_id") {
        extra_data.insert("client_id".into(), c.clone());
    }
    match verdict {
        Ok(valid) => {
            for k in ["auth_token_comfy_org", "api_key_comfy_org"] {
                extra_data.remove(k);
            }
            let item = QueueItem {
                number: number.clone(),
                prompt_id: prompt_id.clone(),
                prompt,
                extra_data,
                outputs: valid.outputs,
            };
            let client_id = item.client_id();
            let recorded_extra = item.extra_data.clone();
            {
                let mut st = inst.lock();
                st.pending.push(item);
                st.queue_updated();
            }
            inst.wake.notify_one();
            inst.core.record(ReceivedPrompt {
                prompt_id: prompt_id.clone(),
                client_id,
                received_at,
                received_wall,
                extra_data: recorded_extra,
            });
            ok(&json!({"prompt_id": prompt_id, "number": number, "node_errors": valid.node_errors}))
        }
        Err(invalid) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": invalid.error, "node_errors": invalid.node_errors}),
        ),
    }
}

async fn view(State(inst): St, Query(q): Query<HashMap<String, String>>) -> Response {
    let slow = inst.core.config().slow_view_ms;
    if slow > 0 {
        tokio::time::sleep(Duration::from_millis(slow)).await;
    }
    let Some(filename) = q.get("filename") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (filename, annotated) = annotated_filepath(filename);
    if filename.is_empty() {
        return internal_error();
    }
    if filename.starts_with('/') || filename.contains("..") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let kind = match annotated {
        Some(k) => k,
        None => match DirKind::parse(q.get("type").map_or("output", String::as_str)) {
            Some(k) => k,
            None => return StatusCode::BAD_REQUEST.into_response(),
        },
    };
    let mut dir = inst.core.storage.dir(kind);
    if let Some(sub) = q.get("subfolder") {
        match safe_join(&dir, sub) {
            Some(d) => dir = d,
            None => return StatusCode::FORBIDDEN.into_response(),
        }
    }
    let base = Path::new(filename)
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = dir.join(&base);
    let Ok(meta) = tokio::fs::metadata(&path).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if !meta.is_file() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let Ok(file) = tokio::fs::File::open(&path).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&base)),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.len()));
    if let Ok(v) = HeaderValue::from_str(&format!("filename=\"{base}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

fn same_content(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    if ma.len() != mb.len() {
        return false;
    }
    let (Ok(mut fa), Ok(mut fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else {
        return false;
    };
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let Ok(n) = fa.read(&mut ba) else {
            return false;
        };
        if n == 0 {
            return true;
        }
        if fb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return false;
        }
    }
}

async fn upload_image(State(inst): St, mut mp: Multipart) -> Response {
    let staging = inst
        .core
        .storage
        .staging()
        .join(uuid::Uuid::new_v4().simple().to_string());
    let mut filename: Option<String> = None;
    let mut fields: HashMap<String, String> = HashMap::new();
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(_) => return internal_error(),
        };
        let name = field.name().unwrap_or_default().to_owned();
        if name == "image" && field.file_name().is_some() {
            filename = field.file_name().map(str::to_owned);
            if write_field(field, &staging).await.is_err() {
                let _ = tokio::fs::remove_file(&staging).await;
                return internal_error();
            }
        } else {
            let text = field.text().await.unwrap_or_default();
            fields.insert(name, text);
        }
    }
    let resp = finish_upload(&inst.core, &staging, filename, &fields);
    let _ = tokio::fs::remove_file(&staging).await;
    resp
}

async fn write_field(
    mut field: axum::extract::multipart::Field<'_>,
    path: &Path,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut f = tokio::fs::File::create(path).await?;
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
    {
        f.write_all(&chunk).await?;
    }
    f.flush().await
}

fn finish_upload(
    core: &Core,
    staging: &Path,
    filename: Option<String>,
    fields: &HashMap<String, String>,
) -> Response {
    let kind = match fields.get("type").map(String::as_str) {
        None => DirKind::Input,
        Some(t) => match DirKind::parse(t) {
            Some(k) => k,
            None => return internal_error(),
        },
    };
    let Some(mut filename) = filename.filter(|f| !f.is_empty()) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let subfolder = fields.get("subfolder").cloned().unwrap_or_default();
    let base = core.storage.dir(kind);
    let Some(folder) = safe_join(&base, &subfolder) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Some(mut path) = safe_join(&folder, &filename) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if std::fs::create_dir_all(&folder).is_err() {
        return internal_error();
    }
    let overwrite = matches!(
        fields.get("overwrite").map(String::as_str),
        Some("true" | "1")
    );
    let mut duplicate = false;
    if !overwrite {
        let (stem, ext) = match filename.rfind('.') {
            Some(i) if i > 0 => (filename[..i].to_owned(), filename[i..].to_owned()),
            _ => (filename.clone(), String::new()),
        };
        let mut i = 1;
        while path.exists() {
            if same_content(&path, staging) {
                duplicate = true;
                break;
            }
            filename = format!("{stem} ({i}){ext}");
            path = folder.join(&filename);
            i += 1;
        }
    }
    if !duplicate {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if std::fs::rename(staging, &path).is_err() {
            return internal_error();
        }
    }
    ok(&json!({"name": filename, "subfolder": subfolder, "type": kind.as_str()}))
}
