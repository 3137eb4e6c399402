//! The job state machine, as a pure function: given a record and what just
//! happened, the record that should follow, if any. Positions only move
//! forward (attempt, then state rank), so a redelivered message, a late
//! report or a second scheduler can never move a job backwards.

use crate::job::{ErrorKind, JobError, JobRecord, JobStatus};
use crate::messages::{AttemptOutcome, RunnerReport};
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
    /// An operator put the failed job back in the queue; `from` is the
    /// record's `requeues` they saw.
    Requeue { from: u32 },
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

    if let Input::Requeue { from } = input {
        return if record.requeues > *from {
            Transition::AlreadyApplied
        } else if record.status == Failed && record.requeues == *from {
            new.status = Queued;
            new.requeues += 1;
            new.queued_at = Some(now);
            new.started_at = None;
            new.finished_at = None;
            new.error = None;
            new.outputs.clear();
            new.cancel_requested = false;
            new.waiting_reason = None;
            Transition::Apply(Box::new(new))
        } else {
            Transition::Ignore("only a failed job can be requeued")
        };
    }
    // After a requeue the record is queued at its last attempt: whatever is
    // still said about that attempt or earlier ones is stale.
    let stale = |attempt: u32| {
        attempt < record.attempt
            || (attempt == record.attempt && matches!(record.status, Accepted | Queued))
    };
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
        Input::Requeue { .. } => Transition::Ignore("handled above"),
        Input::Dispatch { attempt } => {
            let target = (record.requeues, *attempt, Dispatched.rank());
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
            if stale(*attempt) {
                return Transition::Ignore("a later attempt exists");
            }
            if record.status == Running {
                note_failed_runner(&mut new, record.runner.as_ref());
            }
            new.attempt = (*attempt).max(record.attempt);
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
            if stale(report.attempt) {
                return Transition::Ignore("report of an earlier attempt");
            }
            new.attempt = report.attempt;
            new.runner = Some(report.runner.clone());
            match &report.outcome {
                AttemptOutcome::Started => {
                    if position >= (record.requeues, report.attempt, Running.rank()) {
                        return Transition::AlreadyApplied;
                    }
                    // The previous attempt's runner went silent (died): a
                    // redelivery started elsewhere without a failure report.
                    if report.attempt > record.attempt && record.status == Running {
                        note_failed_runner(&mut new, record.runner.as_ref());
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
                    if error.kind.is_retryable() {
                        note_failed_runner(&mut new, Some(&report.runner));
                    }
                    if *retrying && !record.cancel_requested {
                        if position >= (record.requeues, report.attempt, Retrying.rank()) {
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

/// Remembers a runner an attempt failed on (infrastructure trouble), so a
/// retry can prefer another one. Bounded: the oldest are forgotten.
fn note_failed_runner(record: &mut JobRecord, runner: Option<&crate::ids::RunnerId>) {
    const KEEP: usize = 8;
    let Some(runner) = runner else { return };
    if !record.failed_runners.contains(runner) {
        record.failed_runners.push(runner.clone());
        if record.failed_runners.len() > KEEP {
            record.failed_runners.remove(0);
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
pub(crate) mod tests {
    use super::*;
    use crate::ids::{JobId, PoolName, RunnerId, TenantId};
    use crate::job::JobSpec;
    use crate::priority::Priority;
    use proptest::prelude::*;

    pub(crate) fn accepted() -> JobRecord {
        JobRecord::accepted(&JobSpec {
            id: JobId::new(),
            tenant: TenantId::new("t").expect("valid"),
            priority: Priority::Normal,
            pool: PoolName::default(),
            workflow: Default::default(),
            inputs: vec![],
            webhook: None,
            metadata: None,
            timeout_s: 60,
            inline_outputs: false,
            runner_labels: Default::default(),
            every_progress_event: false,
            comfy: None,
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

    #[test]
    fn a_failed_job_requeued_runs_again_and_ignores_stale_reports() {
        let record = apply(
            &apply(&accepted(), Input::Queue),
            Input::Dispatch { attempt: 1 },
        );
        let started = report(&record, 1, AttemptOutcome::Started);
        let record = apply(&record, Input::Report(&started));
        let record = apply(&record, Input::Exhausted { attempt: 1 });
        assert_eq!(record.status, JobStatus::Failed);
        assert_eq!(record.failed_runners.len(), 1, "the silent runner is noted");
        assert!(matches!(
            next(
                &record,
                &Input::Requeue { from: 1 },
                OffsetDateTime::UNIX_EPOCH
            ),
            Transition::Ignore(_)
        ));
        let queued = apply(&record, Input::Requeue { from: 0 });
        assert_eq!(
            (queued.status, queued.requeues, queued.attempt),
            (JobStatus::Queued, 1, 1)
        );
        assert_eq!(queued.error, None);
        // The same request again is a no-op; so is news of attempt 1.
        assert_eq!(
            next(
                &queued,
                &Input::Requeue { from: 0 },
                OffsetDateTime::UNIX_EPOCH
            ),
            Transition::AlreadyApplied
        );
        assert!(matches!(
            next(
                &queued,
                &Input::Report(&started),
                OffsetDateTime::UNIX_EPOCH
            ),
            Transition::Ignore(_)
        ));
        assert!(matches!(
            next(
                &queued,
                &Input::Exhausted { attempt: 1 },
                OffsetDateTime::UNIX_EPOCH
            ),
            Transition::Ignore(_)
        ));
        let dispatched = apply(&queued, Input::Dispatch { attempt: 2 });
        let again = report(&dispatched, 2, AttemptOutcome::Started);
        let running = apply(&dispatched, Input::Report(&again));
        assert_eq!((running.status, running.attempt), (JobStatus::Running, 2));
        assert!(running.position() > record.position());
        // A requeue applies to failed jobs only.
        assert!(matches!(
            next(
                &running,
                &Input::Requeue { from: 1 },
                OffsetDateTime::UNIX_EPOCH
            ),
            Transition::Ignore(_)
        ));
    }

    fn any_input(record: &JobRecord) -> impl Strategy<Value = (u8, u32)> + use<> {
        let _ = record;
        (0u8..11, 1u32..4)
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
                    (10, None) => Input::Requeue { from: record.requeues },
                    _ => Input::Queue,
                };
                if let Transition::Apply(new) = next(&record, &input, OffsetDateTime::UNIX_EPOCH) {
                    let new = *new;
                    let requeue = matches!(input, Input::Requeue { .. });
                    prop_assert!(!record.status.is_terminal() || (requeue && record.status == JobStatus::Failed), "terminal state changed");
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
