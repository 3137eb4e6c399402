//! `comfyq submit`: the job body from a file and the flags, sent as JSON or,
//! with local `--input` files, as `multipart/form-data` (the `job` part first,
//! then one file part per input, streamed from disk); and `--wait`, which
//! follows the job over SSE with a progress bar and saves its outputs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use super::client::{Api, job_path};
use super::download::save_outputs;
use super::error::{CliError, ExitStatus};
use super::events::{EventFeed, JobEvent};
use super::progress::Progress;
use super::render::{self, JobView};
use super::{Console, SubmitArgs};

/// How often the queue position is read while the job waits (events do not
/// carry it).
const QUEUE_POLL: Duration = Duration::from_secs(1);

/// An `--input` file.
#[derive(Debug, PartialEq)]
enum InputArg {
    Local { name: String, path: PathBuf },
    Url { name: String, url: String },
}

fn parse_input(raw: &str) -> Result<InputArg, CliError> {
    let Some((name, source)) = raw.split_once('=') else {
        return Err(CliError::Usage(format!(
            "--input {raw:?}: expected NAME=PATH or NAME=URL (NAME as the workflow names the file)"
        )));
    };
    if name.is_empty() || source.is_empty() {
        return Err(CliError::Usage(format!(
            "--input {raw:?}: both NAME and PATH|URL are needed"
        )));
    }
    let name = name.to_owned();
    if source.starts_with("http://") || source.starts_with("https://") {
        Ok(InputArg::Url {
            name,
            url: source.to_owned(),
        })
    } else {
        Ok(InputArg::Local {
            name,
            path: PathBuf::from(source),
        })
    }
}

/// The job body from the file's JSON: a job (`{"workflow": …}`) as it is, an
/// API-format workflow wrapped in one. A UI-format workflow (what ComfyUI's
/// "Save" writes) is refused with what to do instead.
fn job_body(file: &Path, value: Value) -> Result<Value, CliError> {
    let Value::Object(object) = value else {
        return Err(CliError::Usage(format!(
            "{}: expected a JSON object (an API-format workflow or a job with \"workflow\")",
            file.display()
        )));
    };
    if object.get("workflow").is_some_and(Value::is_object) {
        return Ok(Value::Object(object));
    }
    if object.contains_key("nodes") && object.contains_key("links") {
        return Err(CliError::Usage(format!(
            "{}: this is a ComfyUI UI workflow; export it in API format \
             (ComfyUI: Workflow → Export (API)) and submit that",
            file.display()
        )));
    }
    Ok(json!({ "workflow": Value::Object(object) }))
}

/// The body with the flags applied, and the local files to upload.
fn build(args: &SubmitArgs) -> Result<(Value, Vec<(String, PathBuf)>), CliError> {
    let text = std::fs::read_to_string(&args.workflow)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", args.workflow.display())))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        CliError::Usage(format!(
            "{} is not valid JSON: {e}",
            args.workflow.display()
        ))
    })?;
    let mut body = job_body(&args.workflow, value)?;
    if let Some(priority) = &args.priority {
        body["priority"] = json!(priority);
    }
    if let Some(pool) = &args.pool {
        body["pool"] = json!(pool);
    }
    if let Some(url) = &args.webhook {
        body["webhook"] = json!({ "url": url });
    }
    let mut uploads = Vec::new();
    for raw in &args.inputs {
        match parse_input(raw)? {
            InputArg::Url { name, url } => {
                if !body["inputs"].is_array() {
                    body["inputs"] = json!([]);
                }
                if let Some(inputs) = body["inputs"].as_array_mut() {
                    inputs.push(json!({ "name": name, "url": url }));
                }
            }
            InputArg::Local { name, path } => {
                if !path.is_file() {
                    return Err(CliError::Usage(format!(
                        "--input {name}={}: no such file",
                        path.display()
                    )));
                }
                uploads.push((name, path));
            }
        }
    }
    Ok((body, uploads))
}

async fn multipart(body: &Value, uploads: Vec<(String, PathBuf)>) -> Result<Form, CliError> {
    let job = Part::text(body.to_string())
        .mime_str("application/json")
        .map_err(|e| CliError::Local(e.to_string()))?;
    let mut form = Form::new().part("job", job);
    for (name, path) in uploads {
        form = form
            .file(name.clone(), &path)
            .await
            .map_err(|e| CliError::Usage(format!("--input {name}={}: {e}", path.display())))?;
    }
    Ok(form)
}

pub(crate) async fn submit(
    api: &Api,
    json_output: bool,
    args: SubmitArgs,
    console: &mut Console,
) -> Result<ExitStatus, CliError> {
    let (body, uploads) = build(&args)?;
    let request = api.post("/v1/jobs");
    let request = if uploads.is_empty() {
        request.json(&body)
    } else {
        request.multipart(multipart(&body, uploads).await?)
    };
    let (_, job_json) = api.json(request).await?;
    let job: JobView = serde_json::from_value(job_json.clone())
        .map_err(|e| CliError::Protocol(format!("job: {e}")))?;
    if job.id.is_empty() {
        return Err(CliError::Protocol("the submitted job has no id".to_owned()));
    }
    if !(args.wait || args.out.is_some()) {
        if json_output {
            print_json(console, &job_json)?;
        } else {
            let _ = writeln!(console.out, "{}", job.id);
            let _ = writeln!(
                console.err,
                "submitted job {} ({}); follow it with `comfyq watch {}`",
                job.id,
                render::phase(&job),
                job.id
            );
        }
        return Ok(ExitStatus::Success);
    }
    let _ = writeln!(console.err, "submitted job {}", job.id);
    let finished = follow(api, &job.id, console).await?;
    let (final_json, final_job) = finished;
    let mut saved = Vec::new();
    if final_job.status == "completed"
        && let Some(dir) = &args.out
    {
        saved = save_outputs(api, &final_job.outputs, dir, console).await?;
    }
    if json_output {
        print_json(console, &final_json)?;
    } else {
        let took = final_job
            .finished_at
            .as_deref()
            .and_then(|at| render::seconds_between(&final_job.created_at, at))
            .map(|s| format!(" in {}", render::duration(s)))
            .unwrap_or_default();
        let _ = writeln!(
            console.out,
            "job {} {}{took}",
            final_job.id, final_job.status
        );
        if let Some(error) = &final_job.error {
            let _ = writeln!(console.out, "error: {}", error.summary());
        }
        for file in &saved {
            let _ = writeln!(
                console.out,
                "saved {} ({})",
                file.path.display(),
                render::bytes(file.size)
            );
        }
        if saved.is_empty() && args.out.is_none() {
            for output in &final_job.outputs {
                let _ = writeln!(console.out, "output {}{}", api.base(), output.url);
            }
        }
    }
    Ok(if final_job.status == "completed" {
        ExitStatus::Success
    } else {
        ExitStatus::JobNotCompleted
    })
}

pub(crate) fn print_json(console: &mut Console, value: &Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Local(e.to_string()))?;
    writeln!(console.out, "{text}").map_err(|e| CliError::Local(format!("stdout: {e}")))
}

/// Follows the job with a progress bar until it ends; returns its final view
/// (JSON and parsed).
async fn follow(api: &Api, id: &str, console: &mut Console) -> Result<(Value, JobView), CliError> {
    let mut progress = Progress::for_job(console);
    let mut feed = EventFeed::new(api, id, None)?;
    let mut started = false;
    // Progress events name the node only by id: its type comes from `job.node`.
    let mut node_types = std::collections::HashMap::new();
    let mut poll = tokio::time::interval(QUEUE_POLL);
    let job_path = job_path(id, "")?;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => {
                progress.abandon(console, "interrupted");
                return Err(CliError::Interrupted {
                    job: id.to_owned(),
                    resume: format!("comfyq watch {id}"),
                });
            }
            event = feed.next() => {
                let Some(event) = event? else { break };
                if matches!(event.kind.as_str(), "job.running" | "job.node" | "job.progress") {
                    started = true;
                }
                show_event(&mut progress, console, &event, &mut node_types);
            }
            // Until it runs, the queue position comes from the job itself.
            _ = poll.tick(), if !started => {
                let (_, job) = api.json(api.get(&job_path)).await?;
                if let Ok(job) = serde_json::from_value::<JobView>(job)
                    && matches!(job.status.as_str(), "accepted" | "queued" | "dispatched")
                {
                    progress.set(console, &render::phase(&job), true);
                }
            }
        }
    }
    let (_, final_json) = api.json(api.get(&job_path)).await?;
    let final_job: JobView = serde_json::from_value(final_json.clone())
        .map_err(|e| CliError::Protocol(format!("job: {e}")))?;
    match final_job.status.as_str() {
        "completed" => progress.finish(console, "completed"),
        other => {
            let reason = final_job
                .error
                .as_ref()
                .map(|e| format!(": {}", e.summary()))
                .unwrap_or_default();
            progress.abandon(console, &format!("{other}{reason}"));
        }
    }
    Ok((final_json, final_job))
}

fn show_event(
    progress: &mut Progress,
    console: &mut Console,
    event: &JobEvent,
    node_types: &mut std::collections::HashMap<String, String>,
) {
    let data = event.data();
    let text = |key: &str| data[key].as_str().map(str::to_owned);
    match event.kind.as_str() {
        // Queued: the position poll says more ("queued, 3 ahead").
        "job.dispatched" => progress.set(console, "dispatched, waiting for a runner", true),
        "job.running" => {
            let runner = text("runner").unwrap_or_else(|| "a runner".to_owned());
            progress.set(console, &format!("running on {runner}"), true);
        }
        "job.node" => {
            if let Some(fraction) = data["fraction"].as_f64() {
                progress.set_fraction(fraction);
            }
            if let Some(node) = text("node_id") {
                let node_type = text("node_type").unwrap_or_default();
                progress.set(console, format!("node {node} {node_type}").trim_end(), true);
                node_types.insert(node, node_type);
            }
        }
        "job.progress" => {
            if let Some(fraction) = data["fraction"].as_f64() {
                progress.set_fraction(fraction);
            }
            let node = text("node_id").unwrap_or_default();
            let node = match node_types.get(&node) {
                Some(node_type) if !node_type.is_empty() => format!("{node} {node_type}"),
                _ => node,
            };
            let step = match (data["value"].as_f64(), data["max"].as_f64()) {
                (Some(value), Some(max)) => format!(" step {value}/{max}"),
                _ => String::new(),
            };
            // A line per step would flood a log: only the bar shows steps.
            progress.set(console, &format!("node {node}{step}"), false);
        }
        "job.retrying" => {
            let reason = data["error"]["message"].as_str().unwrap_or("failed");
            progress.set(
                console,
                &format!("attempt {} failed ({reason}); retrying", data["attempt"]),
                true,
            );
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_local_files_or_urls() {
        assert_eq!(
            parse_input("photo.png=./a=b.png").expect("parses"),
            InputArg::Local {
                name: "photo.png".to_owned(),
                path: PathBuf::from("./a=b.png")
            }
        );
        assert_eq!(
            parse_input("x.png=https://example.com/x.png").expect("parses"),
            InputArg::Url {
                name: "x.png".to_owned(),
                url: "https://example.com/x.png".to_owned()
            }
        );
        assert!(matches!(parse_input("photo.png"), Err(CliError::Usage(_))));
        assert!(matches!(parse_input("=x"), Err(CliError::Usage(_))));
    }

    #[test]
    fn workflows_and_job_bodies_are_both_accepted() {
        let path = Path::new("w.json");
        let workflow = json!({"1": {"class_type": "EmptyImage", "inputs": {}}});
        assert_eq!(
            job_body(path, workflow.clone()).expect("wraps"),
            json!({"workflow": workflow})
        );
        let job = json!({"workflow": workflow, "priority": "high"});
        assert_eq!(job_body(path, job.clone()).expect("as is"), job);
        let ui = json!({"nodes": [], "links": []});
        let error = job_body(path, ui).expect_err("UI format refused");
        assert!(error.to_string().contains("API format"), "{error}");
        assert!(job_body(path, json!([1])).is_err());
    }
}
