//! Headless Chromium driven over the DevTools protocol, for the dashboard
//! test: launch, open a page, evaluate JavaScript, wait for a condition,
//! take a screenshot.
//!
//! A small client of our own over `tokio-tungstenite` (already a dependency)
//! rather than a WebDriver crate: the handful of CDP commands needed here
//! cost less than a second ICU stack (the `webdriver` crate's) and a
//! `chromedriver` process. Chromium is Debian's `chromium`
//! (`deploy/dev.sh setup` installs it), found as `CHROMIUM_BIN` or on `PATH`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

use crate::eventually;

type Sink = futures::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

/// The Chromium binary: `CHROMIUM_BIN`, else `chromium`, `chromium-browser`
/// or `google-chrome` on `PATH`; `None` when there is none.
pub fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM_BIN") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| {
            ["chromium", "chromium-browser", "google-chrome"].map(|name| dir.join(name))
        })
        .find(|candidate| candidate.is_file())
}

/// Where screenshots go: `<target dir>/ui-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("ui-screenshots")
}

/// The browser's one DevTools connection: replies routed to their callers
/// by id, page errors collected.
struct Connection {
    sink: tokio::sync::Mutex<Sink>,
    next_id: AtomicU64,
    // Std mutexes: held only to insert or take an entry, never across an await.
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>,
    errors: Mutex<Vec<String>>,
}

impl Connection {
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, reply);
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.sink
            .lock()
            .await
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("send a DevTools command");
        match tokio::time::timeout(Duration::from_secs(30), answer).await {
            Ok(Ok(Ok(result))) => result,
            Ok(Ok(Err(error))) => panic!("DevTools {method} failed: {error}"),
            Ok(Err(_)) => panic!("the browser closed its DevTools connection during {method}"),
            Err(_) => panic!("DevTools {method} got no answer within 30 s"),
        }
    }

    fn receive(&self, text: &str) {
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            return;
        };
        if let Some(id) = message["id"].as_u64() {
            let reply = self.pending.lock().expect("pending lock").remove(&id);
            if let Some(reply) = reply {
                let result = match message.get("error") {
                    Some(error) => Err(error.to_string()),
                    None => Ok(message["result"].clone()),
                };
                let _ = reply.send(result); // The caller may have timed out.
            }
            return;
        }
        let params = &message["params"];
        let error = match message["method"].as_str() {
            Some("Runtime.exceptionThrown") => Some(format!(
                "uncaught: {}",
                params["exceptionDetails"]["exception"]["description"]
                    .as_str()
                    .or(params["exceptionDetails"]["text"].as_str())
                    .unwrap_or_default()
            )),
            Some("Runtime.consoleAPICalled") if params["type"] == "error" => {
                Some(format!("console.error: {}", params["args"]))
            }
            // CSP violations and the like; failed requests (a 401 the page
            // handles) are the network's and expected.
            Some("Log.entryAdded")
                if params["entry"]["level"] == "error"
                    && params["entry"]["source"] != "network" =>
            {
                Some(format!("log: {}", params["entry"]["text"]))
            }
            _ => None,
        };
        if let Some(error) = error {
            self.errors.lock().expect("errors lock").push(error);
        }
    }
}

/// A headless Chromium with its own temporary profile, killed on drop.
pub struct Browser {
    child: tokio::process::Child,
    _profile: tempfile::TempDir,
    connection: Arc<Connection>,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser").finish_non_exhaustive()
    }
}

impl Browser {
    pub async fn launch(binary: &Path) -> Self {
        let profile = tempfile::tempdir().expect("browser profile directory");
        let child = tokio::process::Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()) // D-Bus and GPU chatter.
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        // Chromium writes the port it chose and the browser's path there.
        let active_port = profile.path().join("DevToolsActivePort");
        let endpoint = eventually(
            Duration::from_secs(30),
            "Chromium's DevTools port",
            async || {
                let text = std::fs::read_to_string(&active_port).ok()?;
                let mut lines = text.lines();
                let port = lines.next()?.trim().parse::<u16>().ok()?;
                let path = lines.next()?.trim().to_owned();
                Some(format!("ws://127.0.0.1:{port}{path}"))
            },
        )
        .await;
        let (socket, _) = tokio_tungstenite::connect_async(&endpoint)
            .await
            .expect("connect to Chromium's DevTools");
        let (sink, mut stream) = socket.split();
        let connection = Arc::new(Connection {
            sink: tokio::sync::Mutex::new(sink),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            errors: Mutex::new(Vec::new()),
        });
        let reader = tokio::spawn({
            let connection = connection.clone();
            async move {
                while let Some(Ok(message)) = stream.next().await {
                    if let Message::Text(text) = message {
                        connection.receive(&text);
                    }
                }
                // Closed: fail whoever still waits (dropping their senders).
                connection.pending.lock().expect("pending lock").clear();
            }
        });
        Self {
            child,
            _profile: profile,
            connection,
            reader,
        }
    }

    /// A new tab of `width`×`height` CSS pixels.
    pub async fn new_page(&self, width: u32, height: u32) -> Page {
        let target = self
            .connection
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = self
            .connection
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        let session = attached["sessionId"]
            .as_str()
            .expect("a DevTools session id")
            .to_owned();
        let page = Page {
            connection: self.connection.clone(),
            session,
        };
        for domain in ["Runtime.enable", "Page.enable", "Log.enable"] {
            page.call(domain, json!({})).await;
        }
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        page
    }

    /// Script errors seen on any page: uncaught exceptions, `console.error`,
    /// and browser errors such as Content-Security-Policy refusals.
    pub fn errors(&self) -> Vec<String> {
        self.connection.errors.lock().expect("errors lock").clone()
    }

    /// Closes the browser and waits for it to exit.
    pub async fn close(mut self) {
        // The answer may not come: the browser closes the socket as it quits.
        let connection = self.connection.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::spawn(async move { connection.call(None, "Browser.close", json!({})).await }),
        )
        .await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await; // It did not quit: drop takes it down anyway.
        }
        self.reader.abort();
    }
}

/// One tab.
#[derive(Clone)]
pub struct Page {
    connection: Arc<Connection>,
    session: String,
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page")
            .field("session", &self.session)
            .finish()
    }
}

impl Page {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.connection
            .call(Some(&self.session), method, params)
            .await
    }

    /// Loads `url` and waits for the document (and its deferred scripts).
    pub async fn goto(&self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        // Until the new document replaced the old one and finished loading.
        self.wait_for(
            &format!("{url} loaded"),
            &format!(
                "location.href.startsWith({}) && document.readyState === 'complete'",
                json!(url)
            ),
            Duration::from_secs(20),
        )
        .await;
    }

    /// The value of a JavaScript expression (promises awaited); panics on an
    /// exception.
    pub async fn eval(&self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("evaluating `{expression}` threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is neither null, undefined nor false;
    /// returns its value.
    pub async fn wait_for(&self, what: &str, expression: &str, timeout: Duration) -> Value {
        eventually(timeout, what, async || {
            let value = self.eval(expression).await;
            (!value.is_null() && value != Value::Bool(false)).then_some(value)
        })
        .await
    }

    /// A PNG of the whole page (up to 2,400 CSS pixels tall) at `path`.
    pub async fn screenshot(&self, path: &Path) {
        let metrics = self.call("Page.getLayoutMetrics", json!({})).await;
        let size = &metrics["cssContentSize"];
        let width = size["width"].as_f64().unwrap_or(1280.0);
        let height = size["height"].as_f64().unwrap_or(900.0).min(2400.0);
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
                }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        std::fs::write(path, png).expect("write screenshot");
    }
}
