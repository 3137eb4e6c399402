//! Each client subcommand: one or two API calls, then text for a person (or
//! the API's JSON with `--json`).

use std::io::Write;

use serde::Deserialize;
use serde_json::{Value, json};

use super::client::{Api, job_path};
use super::download::save_outputs;
use super::error::{CliError, ExitStatus};
use super::events::{EventFeed, JobEvent};
use super::render::{self, JobErrorView, JobView, table};
use super::submit::{print_json, submit};
use super::{ClientCommand, Console, DeadLettersArgs, JobsArgs, OutputsArgs, WatchArgs};

pub(crate) async fn dispatch(
    api: &Api,
    json_output: bool,
    command: ClientCommand,
    console: &mut Console,
) -> Result<ExitStatus, CliError> {
    match command {
        ClientCommand::Submit(args) => submit(api, json_output, args, console).await,
        ClientCommand::Jobs(args) => jobs(api, json_output, args, console).await,
        ClientCommand::Job(arg) => job(api, json_output, &arg.id, console).await,
        ClientCommand::Watch(args) => watch(api, json_output, args, console).await,
        ClientCommand::Cancel(arg) => cancel(api, json_output, &arg.id, console).await,
        ClientCommand::Retry(arg) => retry(api, json_output, &arg.id, console).await,
        ClientCommand::Outputs(args) => outputs(api, json_output, args, console).await,
        ClientCommand::Queue => queue(api, json_output, console).await,
        ClientCommand::Runners => runners(api, json_output, console).await,
        ClientCommand::DeadLetters(args) => dead_letters(api, json_output, args, console).await,
    }
}

fn write_out(console: &mut Console, text: &str) -> Result<(), CliError> {
    console
        .out
        .write_all(text.as_bytes())
        .map_err(|e| CliError::Local(format!("stdout: {e}")))
}

fn parse<T: for<'de> Deserialize<'de>>(value: &Value, what: &str) -> Result<T, CliError> {
    T::deserialize(value).map_err(|e| CliError::Protocol(format!("{what}: {e}")))
}

/// `?a=b&c=d` of the present values, URL-encoded.
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let mut serializer = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in pairs {
        if let Some(value) = value {
            serializer.append_pair(key, value);
        }
    }
    let encoded = serializer.finish();
    if encoded.is_empty() {
        encoded
    } else {
        format!("?{encoded}")
    }
}

async fn jobs(
    api: &Api,
    json_output: bool,
    args: JobsArgs,
    console: &mut Console,
) -> Result<ExitStatus, CliError> {
    let path = format!(
        "/v1/jobs{}",
        query(&[
            ("status", args.status),
            ("limit", Some(args.limit.to_string())),
            ("cursor", args.cursor),
        ])
    );
    let (_, page) = api.json(api.get(&path)).await?;
    if json_output {
        print_json(console, &page)?;
        return Ok(ExitStatus::Success);
    }
    #[derive(Deserialize)]
    struct Page {
        jobs: Vec<JobView>,
        next_cursor: Option<String>,
    }
    let page: Page = parse(&page, "job list")?;
    if page.jobs.is_empty() {
        write_out(console, "no jobs\n")?;
        return Ok(ExitStatus::Success);
    }
    let rows: Vec<Vec<String>> = page
        .jobs
        .iter()
        .map(|job| {
            let took = job
                .finished_at
                .as_deref()
                .and_then(|at| render::seconds_between(&job.created_at, at))
                .map(render::duration)
                .unwrap_or_default();
            vec![
                job.id.clone(),
                job.status.clone(),
                job.priority.clone(),
                job.pool.clone(),
                render::short_time(&job.created_at),
                took,
                job.outputs.len().to_string(),
            ]
        })
        .collect();
    let mut text = table(
        &[
            "ID", "STATUS", "PRIORITY", "POOL", "CREATED", "TOOK", "OUTPUTS",
        ],
        &rows,
    );
    if let Some(cursor) = page.next_cursor {
        text.push_str(&format!("more: comfyq jobs --cursor {cursor}\n"));
    }
    write_out(console, &text)?;
    Ok(ExitStatus::Success)
}

async fn job(
    api: &Api,
    json_output: bool,
    id: &str,
    console: &mut Console,
) -> Result<ExitStatus, CliError> {
    let (_, value) = api.json(api.get(&job_path(id, "")?)).await?;
    if json_output {
        print_json(console, &value)?;
    } else {
        let job: JobView = parse(&value, "job")?;
        write_out(console, &render::job_details(&job))?;
    }
    Ok(ExitStatus::Success)
}

async fn watch(
    api: &Api,
    json_output: bool,
    args: WatchArgs,
    console: &mut Console,
) -> Result<ExitStatus, CliError> {
    let mut feed = EventFeed::new(api, &args.id, args.after)?;
    let mut last = None;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let event = tokio::select! {
            _ = &mut interrupted => {
                let after = feed.last_seq().map(|seq| format!(" --after {seq}")).unwrap_or_default();
                return Err(CliError::Interrupted {
                    job: args.id.clone(),
                    resume: format!("comfyq watch {}{after}", args.id),
                });
            }
            event = feed.next() => event?,
        };
        let Some(event) = event else { break };
        if json_output {
            // One line per event, like the WebSocket frames: {"id", "event"}.
            let line = json!({"id": event.seq, "event": event.event});
            write_out(console, &format!("{line}\n"))?;
        } else {
            write_out(console, &format!("{}\n", event_line(&event)))?;
        }
        if event.is_terminal() {
            last = Some(event.kind.clone()); // The last one is how it ended.
        }
    }
    let status = match last {
        Some(kind) => kind,
        // Resumed after the last event: the job says how it ended.
        None => {
            let (_, job) = api.json(api.get(&job_path(&args.id, "")?)).await?;
            format!("job.{}", job["status"].as_str().unwrap_or("unknown"))
        }
    };
    if let Some(seq) = feed.last_seq()
        && !json_output
    {
        let _ = writeln!(
            console.err,
            "(resume with: comfyq watch {} --after {seq})",
            args.id
        );
    }
    Ok(if status == "job.completed" {
        ExitStatus::Success
    } else {
        ExitStatus::JobNotCompleted
    })
}

/// `   42  12:55:07  job.progress    node 3 step 4/20 (45%)`.
fn event_line(event: &JobEvent) -> String {
    let data = event.data();
    let time = event.event["at"]
        .as_str()
        .map(render::short_time)
        .and_then(|t| t.split_once(' ').map(|(_, time)| time.to_owned()))
        .unwrap_or_default();
    let str_of = |key: &str| data[key].as_str().unwrap_or_default().to_owned();
    let fraction = data["fraction"]
        .as_f64()
        .map(|f| format!(" ({:.0}%)", f * 100.0))
        .unwrap_or_default();
    let detail = match event.kind.as_str() {
        "job.running" => format!("on {} attempt {}", str_of("runner"), data["attempt"]),
        "job.node" => {
            let cached = data["cached"].as_array().map_or(0, Vec::len);
            if data["node_id"].is_string() {
                format!(
                    "node {} {}{fraction}",
                    str_of("node_id"),
                    str_of("node_type")
                )
            } else {
                format!("{cached} node(s) from cache{fraction}")
            }
        }
        "job.progress" => format!(
            "node {} step {}/{}{fraction}",
            str_of("node_id"),
            data["value"],
            data["max"]
        ),
        "job.output" => format!(
            "node {}: {}",
            str_of("node_id"),
            data["files"]
                .as_array()
                .map(|files| files
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        ),
        "job.completed" => {
            let outputs = data["outputs"].as_array().map_or(0, Vec::len);
            format!("{outputs} output(s)")
        }
        "job.failed" | "job.retrying" => {
            let error: JobErrorView =
                serde_json::from_value(data["error"].clone()).unwrap_or_default();
            error.summary()
        }
        _ => format!("attempt {}", data["attempt"]),
    };
    format!("{:>5}  {time}  {:<15} {detail}", event.seq, event.kind)
}

async fn cancel(
    api: &Api,
    json_output: bool,
    id: &str,
    console: &mut Console,
) -> Result<ExitStatus, CliError> {
    let (status, value) = api.json(api.post(&job_path(id, "/cancel")?)).await?;
    if json_output {
        print_json(console, &value)?;
        return Ok(ExitStatus::Success);
    }
    let job: JobView = parse(&value, "job")?;
    let text = if status == reqwest::StatusCode::OK {
        format!("job {} had already ended: {}\n", job.id, job.status)
    } else {
        format!(
            "cancellation of job {} requested (was {})\n",
            job.id, job.status
        )
    };
    write_out(console, &text)?;
    Ok(ExitStatus::Success)
}

async fn retry(
    api: &Api,
    json_output: bool,
    id: &str,
    console: &mut Console,
) -> Result<ExitStatus, CliError> {
    let (_, value) = api.json(api.post(&job_path(id, "/retry")?)).await?;
    if json_output {
        print_json(console, &value)?;
    } else {
        let job: JobView = parse(&value, "job")?;
        write_out(
            console,
            &format!(
                "job {} requeued (requeue {}); follow it with `comfyq watch {}`\n",
                job.id,
                job.requeues.max(1),
                job.id
            ),
        )?;
    }
    Ok(ExitStatus::Success)
}

async fn outputs(
    api: &Api,
    json_output: bool,
    args: OutputsArgs,
    console: &mut Console,
) -> Result<ExitStatus, CliError> {
    let (_, value) = api.json(api.get(&job_path(&args.id, "")?)).await?;
    let job: JobView = parse(&value, "job")?;
    if job.outputs.is_empty() {
        return Err(CliError::Usage(format!(
            "job {} has no outputs ({})",
            job.id,
            render::phase(&job)
        )));
    }
    let saved = save_outputs(api, &job.outputs, &args.out, console).await?;
    if json_output {
        let files: Vec<Value> = saved
            .iter()
            .map(|s| json!({"path": s.path, "size": s.size}))
            .collect();
        print_json(console, &json!({ "saved": files }))?;
    } else {
        for file in &saved {
            write_out(
                console,
                &format!(
                    "saved {} ({})\n",
                    file.path.display(),
                    render::bytes(file.size)
                ),
            )?;
        }
    }
    Ok(ExitStatus::Success)
}

async fn queue(
    api: &Api,
    json_output: bool,
    console: &mut Console,
) -> Result<ExitStatus, CliError> {
    let (_, value) = api.json(api.get("/v1/queue")).await?;
    if json_output {
        print_json(console, &value)?;
        return Ok(ExitStatus::Success);
    }
    #[derive(Deserialize)]
    struct Level {
        pool: String,
        priority: String,
        depth: u64,
        in_flight: u64,
        oldest_wait_s: Option<f64>,
    }
    #[derive(Deserialize)]
    struct Queue {
        levels: Vec<Level>,
    }
    let queue: Queue = parse(&value, "queue")?;
    if queue.levels.is_empty() {
        write_out(console, "no pools yet (no runner has registered)\n")?;
        return Ok(ExitStatus::Success);
    }
    let rows: Vec<Vec<String>> = queue
        .levels
        .iter()
        .map(|level| {
            vec![
                level.pool.clone(),
                level.priority.clone(),
                level.depth.to_string(),
                level.in_flight.to_string(),
                level
                    .oldest_wait_s
                    .map(render::duration)
                    .unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    write_out(
        console,
        &table(
            &["POOL", "PRIORITY", "WAITING", "IN FLIGHT", "OLDEST WAIT"],
            &rows,
        ),
    )?;
    Ok(ExitStatus::Success)
}

async fn runners(
    api: &Api,
    json_output: bool,
    console: &mut Console,
) -> Result<ExitStatus, CliError> {
    let (_, value) = api.json(api.get("/v1/runners")).await?;
    if json_output {
        print_json(console, &value)?;
        return Ok(ExitStatus::Success);
    }
    #[derive(Deserialize)]
    struct Runner {
        runner: String,
        pool: String,
        #[serde(default)]
        ready: bool,
        #[serde(default)]
        slots: usize,
        #[serde(default)]
        busy: usize,
        #[serde(default)]
        comfyui_version: Option<String>,
        #[serde(default)]
        node_types: Vec<String>,
        #[serde(default)]
        models: Value,
        #[serde(default)]
        labels: std::collections::BTreeMap<String, String>,
        updated_at: String,
    }
    #[derive(Deserialize)]
    struct Runners {
        runners: Vec<Runner>,
    }
    let list: Runners = parse(&value, "runners")?;
    if list.runners.is_empty() {
        write_out(console, "no runners registered\n")?;
        return Ok(ExitStatus::Success);
    }
    let rows: Vec<Vec<String>> = list
        .runners
        .iter()
        .map(|r| {
            let models: usize = r
                .models
                .as_object()
                .map(|folders| {
                    folders
                        .values()
                        .filter_map(Value::as_array)
                        .map(Vec::len)
                        .sum()
                })
                .unwrap_or_default();
            let labels = r
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            vec![
                r.runner.clone(),
                r.pool.clone(),
                if r.ready { "yes" } else { "no" }.to_owned(),
                format!("{}/{}", r.busy, r.slots),
                r.comfyui_version.clone().unwrap_or_else(|| "-".to_owned()),
                r.node_types.len().to_string(),
                models.to_string(),
                if labels.is_empty() {
                    "-".to_owned()
                } else {
                    labels
                },
                render::ago(&r.updated_at),
            ]
        })
        .collect();
    write_out(
        console,
        &table(
            &[
                "RUNNER",
                "POOL",
                "READY",
                "BUSY",
                "COMFYUI",
                "NODE TYPES",
                "MODELS",
                "LABELS",
                "LAST SEEN",
            ],
            &rows,
        ),
    )?;
    Ok(ExitStatus::Success)
}

async fn dead_letters(
    api: &Api,
    json_output: bool,
    args: DeadLettersArgs,
    console: &mut Console,
) -> Result<ExitStatus, CliError> {
    let path = format!(
        "/v1/dead-letters{}",
        query(&[
            ("limit", Some(args.limit.to_string())),
            ("cursor", args.cursor)
        ])
    );
    let (_, value) = api.json(api.get(&path)).await?;
    if json_output {
        print_json(console, &value)?;
        return Ok(ExitStatus::Success);
    }
    #[derive(Deserialize)]
    struct Letter {
        job_id: String,
        pool: String,
        priority: String,
        attempts: u32,
        #[serde(default)]
        error: Option<JobErrorView>,
        failed_at: String,
    }
    #[derive(Deserialize)]
    struct Page {
        dead_letters: Vec<Letter>,
        next_cursor: Option<String>,
    }
    let page: Page = parse(&value, "dead letters")?;
    if page.dead_letters.is_empty() {
        write_out(console, "no dead letters\n")?;
        return Ok(ExitStatus::Success);
    }
    let rows: Vec<Vec<String>> = page
        .dead_letters
        .iter()
        .map(|l| {
            vec![
                l.job_id.clone(),
                l.pool.clone(),
                l.priority.clone(),
                l.attempts.to_string(),
                render::short_time(&l.failed_at),
                l.error
                    .as_ref()
                    .map(JobErrorView::summary)
                    .unwrap_or_default(),
            ]
        })
        .collect();
    let mut text = table(
        &["JOB", "POOL", "PRIORITY", "ATTEMPTS", "FAILED", "ERROR"],
        &rows,
    );
    text.push_str("requeue one with: comfyq retry JOB\n");
    if let Some(cursor) = page.next_cursor {
        text.push_str(&format!("more: comfyq dead-letters --cursor {cursor}\n"));
    }
    write_out(console, &text)?;
    Ok(ExitStatus::Success)
}
