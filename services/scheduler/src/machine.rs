//! The job state machine, as a pure function: given a record and what just
//! happened, the record that should follow, if any. Positions only move
//! forward (attempt, then state rank), so a redelivered message, a late
//! report or a second scheduler can never move a job backwards.

use comfyq_shared::job::{ErrorKind, JobError, JobRecord, JobStatus};
use comfyq_shared::messages::{AttemptOutcome, RunnerReport};
use time::OffsetDateTime;

/// Something that happened to a job.
#[derive(Debug, Clone)]
pub enum Input<'a> {
    /// The scheduler took the submission into its queue.
    Queue,
    /// Attempt `attempt` was handed to the dispatch stream.
    Dispatch { attempt: u32 },
    /// A runner said what became of an attempt.
    Report(&'a RunnerReport),
    /// A client asked to stop the job.
    Cancel,
    /// The dispatch stream gave up redelivering attempt `attempt`.
    Exhausted { attempt: u32 },
    /// The dispatcher explains why a queued job waits (or that it no longer
    /// waits for anything but a slot: `None`).
    Wait { reason: Option<&'a str> },
    /// The job ends before it ever ran: a quota, no capable runner, or too
    /// long in the queue.
    FailQueued { kind: ErrorKind, message: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Write this record.
    Apply(Box<JobRecord>),
    /// The record already reflects the input (a redelivery): nothing to write,
    /// but the current state's event may be re-published.
    AlreadyApplied,
    /// The input no longer applies (the job moved on or ended).
    Ignore(&'static str),
}

pub fn next(record: &JobRecord, input: &Input<'_>, now: OffsetDateTime) -> Transition {
    use JobStatus::*;
    let mut new = record.clone();
    new.updated_at = now;
    let position = record.position();

    if record.status.is_terminal() {
        return match input {
            Input::Report(report) if terminal_matches(record.status, &report.outcome) => {
                Transition::AlreadyApplied
            }
            _ => Transition::Ignore("job already ended"),
        };
    }

    match input {
        Input::Queue => match record.status {
            Accepted => {
                new.status = Queued;
                new.queued_at = Some(now);
                Transition::Apply(Box::new(new))
            }
            _ => Transition::AlreadyApplied,
        },
        Input::Dispatch { attempt } => {
            let target = (*attempt, Dispatched.rank());
            if position >= target {
                return Transition::AlreadyApplied;
            }
            if !matches!(record.status, Accepted | Queued | Retrying) {
                return Transition::Ignore("job is not waiting for dispatch");
            }
            new.status = Dispatched;
            new.attempt = *attempt;
            new.queued_at.get_or_insert(now);
            new.waiting_reason = None;
            Transition::Apply(Box::new(new))
        }
        Input::Wait { reason } => {
            if !matches!(record.status, Accepted | Queued) {
                return Transition::Ignore("job is not waiting");
            }
            if record.waiting_reason.as_deref() == *reason {
                return Transition::AlreadyApplied;
            }
            new.waiting_reason = reason.map(str::to_owned);
            Transition::Apply(Box::new(new))
        }
        Input::FailQueued { kind, message } => {
            if !matches!(record.status, Accepted | Queued) {
                return Transition::Ignore("job already left the queue");
            }
            new.status = Failed;
            new.finished_at = Some(now);
            new.waiting_reason = None;
            new.error = Some(JobError::new(*kind, message.clone()));
            Transition::Apply(Box::new(new))
        }
        Input::Cancel => match record.status {
            Running => {
                if record.cancel_requested {
                    Transition::AlreadyApplied
                } else {
                    new.cancel_requested = true;
                    Transition::Apply(Box::new(new))
                }
            }
            // Not running anywhere: it ends now; a runner that pulls it later
            // finds the record ended and drops it.
            _ => {
                new.status = Cancelled;
                new.cancel_requested = true;
                new.finished_at = Some(now);
                Transition::Apply(Box::new(new))
            }
        },
        Input::Exhausted { attempt } => {
            if *attempt < record.attempt {
                return Transition::Ignore("a later attempt exists");
            }
            new.status = Failed;
            new.finished_at = Some(now);
            new.error = Some(JobError::new(
                ErrorKind::AttemptsExhausted,
                format!(
                    "gave up after {attempt} deliveries: the runners holding the job stopped answering"
                ),
            ));
            Transition::Apply(Box::new(new))
        }
        Input::Report(report) => {
            if report.attempt < record.attempt {
                return Transition::Ignore("report of an earlier attempt");
            }
            new.attempt = report.attempt;
            new.runner = Some(report.runner.clone());
            match &report.outcome {
                AttemptOutcome::Started => {
                    if position >= (report.attempt, Running.rank()) {
                        return Transition::AlreadyApplied;
                    }
                    new.status = Running;
                    new.started_at.get_or_insert(report.at);
                    new.error = None;
                }
                AttemptOutcome::Completed { outputs } => {
                    new.status = Completed;
                    new.outputs = outputs.clone();
                    new.error = None;
                    new.finished_at = Some(report.at);
                }
                AttemptOutcome::Failed { error, retrying } => {
                    new.error = Some(error.clone());
                    if *retrying && !record.cancel_requested {
                        if position >= (report.attempt, Retrying.rank()) {
                            return Transition::AlreadyApplied;
                        }
                        new.status = Retrying;
                    } else {
                        new.status = Failed;
                        new.finished_at = Some(report.at);
                    }
                }
                AttemptOutcome::Cancelled => {
                    new.status = Cancelled;
                    new.finished_at = Some(report.at);
                }
            }
            Transition::Apply(Box::new(new))
        }
    }
}

fn terminal_matches(status: JobStatus, outcome: &AttemptOutcome) -> bool {
    matches!(
        (status, outcome),
        (JobStatus::Completed, AttemptOutcome::Completed { .. })
            | (
                JobStatus::Failed,
                AttemptOutcome::Failed {
                    retrying: false,
                    ..
                }
            )
            | (JobStatus::Cancelled, AttemptOutcome::Cancelled)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use comfyq_shared::ids::{JobId, PoolName, RunnerId, TenantId};
    use comfyq_shared::job::JobSpec;
    use comfyq_shared::priority::Priority;
    use proptest::prelude::*;

    fn accepted() -> JobRecord {
        JobRecord::accepted(&JobSpec {
            id: JobId::new(),
            tenant: TenantId::new("t").expect("valid"),
            priority: Priority::Normal,
            pool: PoolName::default(),
            workflow: serde_json::json!({}),
            inputs: vec![],
            webhook: None,
            metadata: None,
            timeout_s: 60,
            inline_outputs: false,
            created_at: OffsetDateTime::UNIX_EPOCH,
        })
    }

    fn report(record: &JobRecord, attempt: u32, outcome: AttemptOutcome) -> RunnerReport {
        RunnerReport {
            v: 1,
            tenant: record.tenant.clone(),
            job_id: record.id,
            attempt,
            runner: RunnerId::new("r1").expect("valid"),
            at: OffsetDateTime::UNIX_EPOCH,
            outcome,
        }
    }

    fn apply(record: &JobRecord, input: Input<'_>) -> JobRecord {
        match next(record, &input, OffsetDateTime::UNIX_EPOCH) {
            Transition::Apply(new) => *new,
            other => panic!("expected a transition for {input:?}, got {other:?}"),
        }
    }

    #[test]
    fn happy_path() {
        let record = accepted();
        let record = apply(&record, Input::Queue);
        assert_eq!(record.status, JobStatus::Queued);
        let record = apply(&record, Input::Dispatch { attempt: 1 });
        assert_eq!((record.status, record.attempt), (JobStatus::Dispatched, 1));
        let started = report(&record, 1, AttemptOutcome::Started);
        let record = apply(&record, Input::Report(&started));
        assert_eq!(record.status, JobStatus::Running);
        let done = report(&record, 1, AttemptOutcome::Completed { outputs: vec![] });
        let record = apply(&record, Input::Report(&done));
        assert_eq!(record.status, JobStatus::Completed);
        assert_eq!(
            next(&record, &Input::Report(&done), OffsetDateTime::UNIX_EPOCH),
            Transition::AlreadyApplied
        );
        assert!(matches!(
            next(&record, &Input::Cancel, OffsetDateTime::UNIX_EPOCH),
            Transition::Ignore(_)
        ));
    }

    #[test]
    fn retry_then_success_on_a_later_attempt() {
        let record = apply(
            &apply(&accepted(), Input::Queue),
            Input::Dispatch { attempt: 1 },
        );
        let started = report(&record, 1, AttemptOutcome::Started);
        let record = apply(&record, Input::Report(&started));
        let failed = report(
            &record,
            1,
            AttemptOutcome::Failed {
                error: JobError::new(ErrorKind::Infrastructure, "runner died"),
                retrying: true,
            },
        );
        let record = apply(&record, Input::Report(&failed));
        assert_eq!(record.status, JobStatus::Retrying);
        let again = report(&record, 2, AttemptOutcome::Started);
        let record = apply(&record, Input::Report(&again));
        assert_eq!((record.status, record.attempt), (JobStatus::Running, 2));
        // A late report of attempt 1 changes nothing.
        assert!(matches!(
            next(&record, &Input::Report(&failed), OffsetDateTime::UNIX_EPOCH),
            Transition::Ignore(_)
        ));
    }

    #[test]
    fn a_queued_job_can_wait_with_a_reason_and_fail_before_running() {
        let record = apply(&accepted(), Input::Queue);
        let record = apply(
            &record,
            Input::Wait {
                reason: Some("waiting_for_capability"),
            },
        );
        assert_eq!(
            record.waiting_reason.as_deref(),
            Some("waiting_for_capability")
        );
        let failed = apply(
            &record,
            Input::FailQueued {
                kind: ErrorKind::Timeout,
                message: "queued too long".to_owned(),
            },
        );
        assert_eq!(failed.status, JobStatus::Failed);
        assert_eq!(failed.error.map(|e| e.kind), Some(ErrorKind::Timeout));
        let dispatched = apply(&record, Input::Dispatch { attempt: 1 });
        assert_eq!(dispatched.waiting_reason, None);
        assert!(matches!(
            next(
                &dispatched,
                &Input::FailQueued {
                    kind: ErrorKind::Timeout,
                    message: "x".to_owned()
                },
                OffsetDateTime::UNIX_EPOCH
            ),
            Transition::Ignore(_)
        ));
    }

    #[test]
    fn cancel_of_a_running_job_waits_for_the_runner() {
        let record = apply(
            &apply(&accepted(), Input::Queue),
            Input::Dispatch { attempt: 1 },
        );
        let started = report(&record, 1, AttemptOutcome::Started);
        let record = apply(&record, Input::Report(&started));
        let record = apply(&record, Input::Cancel);
        assert_eq!(record.status, JobStatus::Running);
        assert!(record.cancel_requested);
        let cancelled = report(&record, 1, AttemptOutcome::Cancelled);
        assert_eq!(
            apply(&record, Input::Report(&cancelled)).status,
            JobStatus::Cancelled
        );
    }

    fn any_input(record: &JobRecord) -> impl Strategy<Value = (u8, u32)> + use<> {
        let _ = record;
        (0u8..10, 1u32..4)
    }

    proptest! {
        /// Whatever arrives in whatever order, a job never moves backwards
        /// and a terminal state never changes.
        #[test]
        fn positions_only_move_forward(steps in proptest::collection::vec(any_input(&accepted()), 1..40)) {
            let mut record = accepted();
            for (kind, attempt) in steps {
                let outcome = match kind {
                    0 => None,
                    1 => Some(AttemptOutcome::Started),
                    2 => Some(AttemptOutcome::Completed { outputs: vec![] }),
                    3 => Some(AttemptOutcome::Failed { error: JobError::new(ErrorKind::Infrastructure, "x"), retrying: true }),
                    4 => Some(AttemptOutcome::Failed { error: JobError::new(ErrorKind::Execution, "x"), retrying: false }),
                    5 => Some(AttemptOutcome::Cancelled),
                    _ => None,
                };
                let runner_report = outcome.map(|o| report(&record, attempt, o));
                let input = match (kind, &runner_report) {
                    (_, Some(r)) => Input::Report(r),
                    (0, None) => Input::Dispatch { attempt },
                    (6, None) => Input::Cancel,
                    (8, None) => Input::Wait { reason: (attempt % 2 == 0).then_some("waiting_for_capability") },
                    (9, None) => Input::FailQueued { kind: ErrorKind::Timeout, message: "x".to_owned() },
                    _ => Input::Queue,
                };
                if let Transition::Apply(new) = next(&record, &input, OffsetDateTime::UNIX_EPOCH) {
                    let new = *new;
                    prop_assert!(!record.status.is_terminal(), "terminal state changed");
                    let same_position_note = new.position() == record.position()
                        && ((new.cancel_requested && !record.cancel_requested)
                            || new.waiting_reason != record.waiting_reason);
                    let moved_forward = new.position() > record.position() || same_position_note;
                    prop_assert!(moved_forward, "{:?} -> {:?}", record.position(), new.position());
                    record = new;
                }
            }
        }
    }
}
