//! The API's answers for a person: this client's own view of the JSON it
//! reads (only the fields it shows; unknown ones are ignored, so a newer server
//! still works), aligned tables, and the details of one job.

use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct JobView {
    pub(crate) id: String,
    pub(crate) status: String,
    pub(crate) priority: String,
    pub(crate) pool: String,
    pub(crate) attempt: u32,
    pub(crate) created_at: String,
    pub(crate) queued_at: Option<String>,
    pub(crate) started_at: Option<String>,
    pub(crate) finished_at: Option<String>,
    pub(crate) queue_position: Option<u64>,
    pub(crate) waiting_reason: Option<String>,
    pub(crate) progress: Option<ProgressView>,
    pub(crate) runner: Option<String>,
    pub(crate) inputs: Vec<FileView>,
    pub(crate) outputs: Vec<OutputView>,
    pub(crate) error: Option<JobErrorView>,
    pub(crate) cancel_requested: bool,
    pub(crate) requeues: u32,
    pub(crate) webhook: Option<Value>,
    pub(crate) webhook_deliveries: Vec<DeliverySummary>,
}

impl JobView {
    pub(crate) fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ProgressView {
    pub(crate) node_id: Option<String>,
    pub(crate) node_type: Option<String>,
    pub(crate) value: Option<f64>,
    pub(crate) max: Option<f64>,
    pub(crate) fraction: f64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct FileView {
    pub(crate) name: String,
    pub(crate) content_type: String,
    pub(crate) size: u64,
    pub(crate) url: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct OutputView {
    pub(crate) node_id: String,
    pub(crate) name: String,
    pub(crate) content_type: String,
    pub(crate) size: u64,
    pub(crate) sha256: String,
    pub(crate) url: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct JobErrorView {
    pub(crate) kind: String,
    pub(crate) message: String,
    pub(crate) node_id: Option<String>,
    pub(crate) node_type: Option<String>,
    pub(crate) exception_type: Option<String>,
    pub(crate) traceback: Vec<String>,
}

impl JobErrorView {
    pub(crate) fn summary(&self) -> String {
        let mut text = format!("{}: {}", self.kind, self.message);
        if let Some(node) = &self.node_id {
            let _ = write!(text, " (node {node}");
            if let Some(node_type) = &self.node_type {
                let _ = write!(text, " {node_type}");
            }
            text.push(')');
        }
        text
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct DeliverySummary {
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    pub(crate) state: String,
    pub(crate) attempts: usize,
}

/// Columns padded to their widest cell; the last one is not padded.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 == widths.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<width$}  ", width = widths[i]);
            }
        }
        text.push_str(out.trim_end());
        text.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    text
}

/// `2026-11-27T12:55:07.123Z` → `2026-11-27 12:55:07`.
pub(crate) fn short_time(rfc3339: &str) -> String {
    match OffsetDateTime::parse(rfc3339, &Rfc3339) {
        Ok(time) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            time.year(),
            u8::from(time.month()),
            time.day(),
            time.hour(),
            time.minute(),
            time.second()
        ),
        Err(_) => rfc3339.to_owned(),
    }
}

/// Seconds from `from` to `to` (RFC 3339), when both parse.
pub(crate) fn seconds_between(from: &str, to: &str) -> Option<f64> {
    let from = OffsetDateTime::parse(from, &Rfc3339).ok()?;
    let to = OffsetDateTime::parse(to, &Rfc3339).ok()?;
    Some((to - from).as_seconds_f64())
}

/// `40 ms`, `3.2 s`, `4 min 10 s`, `2 h 5 min`.
pub(crate) fn duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0);
    if seconds < 1.0 {
        format!("{:.0} ms", seconds * 1000.0)
    } else if seconds < 60.0 {
        format!("{seconds:.1} s")
    } else if seconds < 3600.0 {
        format!(
            "{} min {} s",
            (seconds / 60.0) as u64,
            (seconds % 60.0) as u64
        )
    } else {
        format!(
            "{} h {} min",
            (seconds / 3600.0) as u64,
            ((seconds % 3600.0) / 60.0) as u64
        )
    }
}

/// How long ago an RFC 3339 time was.
pub(crate) fn ago(rfc3339: &str) -> String {
    match OffsetDateTime::parse(rfc3339, &Rfc3339) {
        Ok(time) => format!(
            "{} ago",
            duration((OffsetDateTime::now_utc() - time).as_seconds_f64())
        ),
        Err(_) => rfc3339.to_owned(),
    }
}

/// `1.2 MiB`.
pub(crate) fn bytes(size: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if size < 1024 {
        return format!("{size} B");
    }
    let mut value = size as f64;
    let mut unit = "B";
    for next in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}

/// What a job is doing now, in a few words (`queued, 2 ahead`).
pub(crate) fn phase(job: &JobView) -> String {
    match job.status.as_str() {
        "accepted" | "queued" => {
            let mut text = "queued".to_owned();
            if let Some(position) = job.queue_position {
                let _ = write!(text, ", {position} ahead");
            }
            if let Some(reason) = &job.waiting_reason {
                let _ = write!(text, " ({})", reason.replace('_', " "));
            }
            text
        }
        "dispatched" => "dispatched, waiting for a runner to start it".to_owned(),
        "running" => {
            let mut text = format!("running on {}", job.runner.as_deref().unwrap_or("a runner"));
            if let Some(progress) = &job.progress {
                let _ = write!(text, ", {}", progress_text(progress));
            }
            text
        }
        "retrying" => format!("attempt {} failed, retrying", job.attempt),
        other => other.to_owned(),
    }
}

fn progress_text(progress: &ProgressView) -> String {
    let mut text = format!("{:.0}%", progress.fraction * 100.0);
    if let Some(node) = &progress.node_id {
        let _ = write!(text, " node {node}");
        if let Some(node_type) = &progress.node_type {
            let _ = write!(text, " {node_type}");
        }
    }
    if let (Some(value), Some(max)) = (progress.value, progress.max) {
        let _ = write!(text, " step {value}/{max}");
    }
    text
}

/// `comfyq job ID`: every part of the job a person looks for.
pub(crate) fn job_details(job: &JobView) -> String {
    let mut text = String::new();
    let mut field = |name: &str, value: &str| {
        let _ = writeln!(text, "{:<12}{value}", format!("{name}:"));
    };
    field("id", &job.id);
    field("status", &phase(job));
    field("priority", &format!("{} (pool {})", job.priority, job.pool));
    field("attempt", &job.attempt.to_string());
    if job.requeues > 0 {
        field("requeues", &job.requeues.to_string());
    }
    if let Some(runner) = &job.runner {
        field("runner", runner);
    }
    field("created", &short_time(&job.created_at));
    if let Some(at) = &job.queued_at {
        field("queued", &short_time(at));
    }
    if let Some(at) = &job.started_at {
        field("started", &short_time(at));
    }
    if let Some(at) = &job.finished_at {
        let took = seconds_between(&job.created_at, at)
            .map(|s| format!(" (after {})", duration(s)))
            .unwrap_or_default();
        field("finished", &format!("{}{took}", short_time(at)));
    }
    if job.cancel_requested && !job.is_terminal() {
        field("cancel", "requested");
    }
    if let Some(error) = &job.error {
        field("error", &error.summary());
        if let Some(exception) = &error.exception_type {
            field("exception", exception);
        }
        for line in &error.traceback {
            let _ = writeln!(text, "    {}", line.trim_end());
        }
    }
    for input in &job.inputs {
        let _ = writeln!(
            text,
            "input:      {} ({}, {}) {}",
            input.name,
            input.content_type,
            bytes(input.size),
            input.url
        );
    }
    for output in &job.outputs {
        let _ = writeln!(
            text,
            "output:     {} ({}, {}, node {}) {}",
            output.name,
            output.content_type,
            bytes(output.size),
            output.node_id,
            output.url
        );
    }
    if let Some(url) = job.webhook.as_ref().and_then(|w| w["url"].as_str()) {
        let _ = writeln!(text, "webhook:    {url}");
    }
    for delivery in &job.webhook_deliveries {
        let _ = writeln!(
            text,
            "delivery:   {} {} after {} attempt(s)",
            delivery.event_type, delivery.state, delivery.attempts
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let text = table(
            &["ID", "STATUS", "POOL"],
            &[
                vec!["a".to_owned(), "completed".to_owned(), "default".to_owned()],
                vec!["bbbb".to_owned(), "queued".to_owned(), "gpu".to_owned()],
            ],
        );
        assert_eq!(
            text,
            "ID    STATUS     POOL\na     completed  default\nbbbb  queued     gpu\n"
        );
    }

    #[test]
    fn sizes_and_times_for_people() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(short_time("2026-11-27T12:55:07.9Z"), "2026-11-27 12:55:07");
        assert_eq!(duration(75.0), "1 min 15 s");
        assert_eq!(duration(0.042), "42 ms");
    }
}
