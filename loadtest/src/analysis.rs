//! Turns a run's [`Outcome`] into report rows: latencies, throughput, errors,
//! lost and duplicated jobs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Instant, UNIX_EPOCH};

use time::OffsetDateTime;

use crate::driver::{Outcome, lock_jobs};
use crate::hist::Latency;
use crate::report::Report;
use crate::target::Target;

pub(crate) const SUBMIT: &str = "submit (POST /v1/jobs → 202)";
pub(crate) const QUEUE_WAIT: &str = "queue wait (accepted → running)";
pub(crate) const DISPATCH: &str = "dispatch (accepted → ComfyUI has /prompt)";
pub(crate) const E2E_NATS: &str = "end to end (submit → completed, NATS)";
pub(crate) const E2E_SSE: &str = "end to end (submit → completed, SSE)";
pub(crate) const OUTPUTS: &str = "end to end (submit → outputs in hand)";
pub(crate) const WEBHOOK: &str = "webhook (completed on NATS → POST received)";

fn wall(t: std::time::SystemTime) -> Option<OffsetDateTime> {
    let since = t.duration_since(UNIX_EPOCH).ok()?;
    OffsetDateTime::from_unix_timestamp_nanos(i128::try_from(since.as_nanos()).ok()?).ok()
}

/// Figures derived from one run.
#[derive(Debug, Default)]
pub(crate) struct Derived {
    pub(crate) e2e_nats: Latency,
    pub(crate) dispatch: Latency,
    pub(crate) queue_wait: BTreeMap<String, Latency>,
    pub(crate) completed_per_s: f64,
    pub(crate) lost: u64,
}

/// Adds the rows of one run; `per_priority` splits the queue wait by priority.
pub(crate) fn add_job_rows(
    target: &Target,
    outcome: &Outcome,
    report: &mut Report,
    per_priority: bool,
) -> Derived {
    let mut derived = Derived::default();
    let accepted: HashSet<&str> = outcome.accepted.iter().map(String::as_str).collect();
    let created: HashMap<&str, OffsetDateTime> = outcome
        .finals
        .iter()
        .filter_map(|f| Some((f.id.as_str(), f.created_at?)))
        .collect();

    // Queue wait, from the records.
    let mut all_waits = Latency::new();
    for f in &outcome.finals {
        if let (Some(created), Some(started)) = (f.created_at, f.started_at) {
            let seconds = (started - created).as_seconds_f64();
            all_waits.record_secs(seconds);
            derived
                .queue_wait
                .entry(f.priority.clone())
                .or_default()
                .record_secs(seconds);
        }
    }

    // Dispatch and duplicate executions, from what the simulators received.
    let mut executions: HashMap<String, u32> = HashMap::new();
    let prompts = target.prompts();
    if let Some(prompts) = &prompts {
        for prompt in prompts {
            let Some(job) = prompt
                .extra_data
                .get("comfyq_job_id")
                .and_then(|v| v.as_str())
            else {
                continue;
            };
            if !accepted.contains(job) {
                continue;
            }
            let count = executions.entry(job.to_owned()).or_default();
            *count += 1;
            if *count == 1
                && let (Some(created), Some(received)) =
                    (created.get(job), wall(prompt.received_wall))
            {
                derived
                    .dispatch
                    .record_secs((received - *created).as_seconds_f64());
            }
        }
    }

    // End to end, from the NATS and SSE sightings.
    let mut e2e_sse = Latency::new();
    let mut duplicate_events = 0u64;
    let mut last_done: Option<Instant> = None;
    let mut nats_done: HashMap<String, Instant> = HashMap::new();
    {
        let jobs = lock_jobs(&outcome.tracker);
        for id in &outcome.accepted {
            let Some(track) = jobs.get(id) else { continue };
            let Some(planned) = track.planned else {
                continue;
            };
            if let Some(done) = track.nats_done {
                derived
                    .e2e_nats
                    .record(done.saturating_duration_since(planned));
                last_done = Some(last_done.map_or(done, |l| l.max(done)));
                nats_done.insert(id.clone(), done);
            }
            if let Some(done) = track.sse_done {
                e2e_sse.record(done.saturating_duration_since(planned));
            }
            duplicate_events += u64::from(track.nats_terminal_events.saturating_sub(1));
        }
    }

    // Webhooks, from the in-process receiver.
    let mut webhook = Latency::new();
    if let Some(stack) = &target.stack {
        for request in stack.webhooks.requests() {
            let body = request.json();
            if body["type"] != "job.completed" {
                continue;
            }
            if let Some(done) = body["data"]["job"]["id"]
                .as_str()
                .and_then(|id| nats_done.get(id))
            {
                webhook.record(request.received_at.saturating_duration_since(*done));
            }
        }
    }

    report.latency(SUBMIT, &outcome.submit);
    if per_priority {
        for (priority, waits) in &derived.queue_wait {
            report.latency(&format!("queue wait, priority {priority}"), waits);
        }
    } else {
        report.latency(QUEUE_WAIT, &all_waits);
    }
    if prompts.is_some() {
        report.latency(DISPATCH, &derived.dispatch);
    } else {
        report
            .note("dispatch latency needs the in-process simulators (not measured against --url)");
    }
    report.latency(E2E_NATS, &derived.e2e_nats);
    if e2e_sse.len() > 0 {
        report.latency_vs(E2E_SSE, &e2e_sse, E2E_NATS);
    }
    if outcome.outputs_in_hand.len() > 0 {
        report.latency(OUTPUTS, &outcome.outputs_in_hand);
    }
    if webhook.len() > 0 {
        report.latency(WEBHOOK, &webhook);
    }

    let terminal =
        |s: &Option<String>| matches!(s.as_deref(), Some("completed" | "failed" | "cancelled"));
    let finished = outcome
        .finals
        .iter()
        .filter(|f| terminal(&f.status))
        .count() as u64;
    let completed = outcome
        .finals
        .iter()
        .filter(|f| f.status.as_deref() == Some("completed"))
        .count() as u64;
    derived.lost = outcome.accepted.len() as u64 - finished;
    let errors: u64 = outcome.errors.values().sum();
    report.value("jobs submitted", outcome.submitted as f64, "jobs");
    report.value("jobs accepted (202)", outcome.accepted.len() as f64, "jobs");
    report.value("submit errors", errors as f64, "requests");
    for (error, n) in &outcome.errors {
        report.note(format!("submit error {error}: {n}"));
    }
    report.value("jobs completed", completed as f64, "jobs");
    report.value(
        "jobs failed or cancelled",
        (finished - completed) as f64,
        "jobs",
    );
    report.value(
        "LOST (accepted, not terminal at the end)",
        derived.lost as f64,
        "jobs",
    );
    report.value(
        "duplicate terminal events (NATS)",
        duplicate_events as f64,
        "events",
    );
    if prompts.is_some() {
        let duplicates: u64 = executions
            .values()
            .map(|n| u64::from(n.saturating_sub(1)))
            .sum();
        report.value(
            "duplicate executions (ComfyUI got a job twice)",
            duplicates as f64,
            "prompts",
        );
    }
    let phase = outcome.submit_phase.as_secs_f64();
    if phase > 0.0 {
        report.value(
            "accepted rate",
            outcome.accepted.len() as f64 / phase,
            "jobs/s",
        );
    }
    if let Some(last) = last_done {
        let span = last.duration_since(outcome.started).as_secs_f64();
        if span > 0.0 {
            derived.completed_per_s = completed as f64 / span;
            report.value(
                "completed rate (first submit → last completion)",
                derived.completed_per_s,
                "jobs/s",
            );
        }
    }
    derived
}

/// NATS messages the in-process services' connections sent and received.
pub(crate) type MessageSnapshot = Vec<(String, comfyq_shared::connection::MessageCounts)>;

pub(crate) fn nats_messages() -> MessageSnapshot {
    comfyq_shared::connection::message_counts()
}

/// Adds "NATS messages per job" rows (per service and in all) from two
/// snapshots around the measured run: what each job costs in NATS operations
/// (background traffic such as heartbeats, polls and ticks included).
pub(crate) fn add_message_rows(
    report: &mut Report,
    before: &MessageSnapshot,
    after: &MessageSnapshot,
    jobs: usize,
) {
    if jobs == 0 || after.is_empty() {
        return;
    }
    let (mut sent_all, mut received_all) = (0u64, 0u64);
    for (service, counts) in after {
        let earlier = before
            .iter()
            .find(|(s, _)| s == service)
            .map(|(_, c)| *c)
            .unwrap_or_default();
        let sent = counts.sent.saturating_sub(earlier.sent);
        let received = counts.received.saturating_sub(earlier.received);
        sent_all += sent;
        received_all += received;
        report.value(
            &format!("NATS messages per job, {service} (sent / received)"),
            (sent + received) as f64 / jobs as f64,
            &format!(
                "msgs ({:.1} / {:.1})",
                sent as f64 / jobs as f64,
                received as f64 / jobs as f64
            ),
        );
    }
    report.value(
        "NATS messages per job, all services (sent / received)",
        (sent_all + received_all) as f64 / jobs as f64,
        &format!(
            "msgs ({:.1} / {:.1})",
            sent_all as f64 / jobs as f64,
            received_all as f64 / jobs as f64
        ),
    );
}
