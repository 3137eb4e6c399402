//! Every NATS subject, stream, consumer, KV bucket and object-store bucket
//! name comfyq uses, built from one configurable prefix. Nothing else in the
//! code base writes a subject or a stream name inline.

use crate::event::EventKind;
use crate::ids::{JobId, PoolName, RunnerId, TenantId};
use crate::priority::Priority;

/// Names derived from the deployment prefix (default `comfyq`).
///
/// The prefix is a lower-case token; stream names use its upper-case form
/// because JetStream stream names are conventionally upper case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    prefix: String,
    upper: String,
}

#[derive(Debug, thiserror::Error)]
#[error("NATS prefix must be 1-32 characters of a-z, 0-9, '-' or '_' (got {0:?})")]
pub struct PrefixError(String);

impl Default for Names {
    fn default() -> Self {
        Self::new("comfyq").expect("the default prefix is valid")
    }
}

impl Names {
    pub fn new(prefix: &str) -> Result<Self, PrefixError> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 32
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            return Err(PrefixError(prefix.to_owned()));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            upper: prefix.to_ascii_uppercase().replace('-', "_"),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    // ---- streams -------------------------------------------------------

    /// Operators' and clients' commands for the scheduler: cancellations
    /// and requeues of dead letters.
    pub fn jobs_stream(&self) -> String {
        format!("{}_JOBS", self.upper)
    }
    pub fn jobs_stream_subjects(&self) -> Vec<String> {
        vec![format!("{}.jobs.>", self.prefix)]
    }

    /// Work handed to runners, one subject per pool, priority and tenant.
    pub fn dispatch_stream(&self) -> String {
        format!("{}_DISPATCH", self.upper)
    }
    pub fn dispatch_stream_subjects(&self) -> Vec<String> {
        vec![format!("{}.dispatch.>", self.prefix)]
    }

    /// Jobs waiting for a runner slot (work-queue: the dispatcher's
    /// acknowledgement removes a job once it is dispatched).
    pub fn pending_stream(&self) -> String {
        format!("{}_PENDING", self.upper)
    }
    pub fn pending_stream_subjects(&self) -> Vec<String> {
        vec![self.pending_filter()]
    }

    /// Max-deliveries advisories of the dispatch stream, kept so an
    /// exhausted job is failed even if no scheduler was up when it fired.
    pub fn advisories_stream(&self) -> String {
        format!("{}_ADVISORIES", self.upper)
    }
    pub fn advisories_stream_subjects(&self) -> Vec<String> {
        vec![self.max_deliveries_advisory_filter()]
    }
    /// The server's advisory subject for exhausted dispatch deliveries (any consumer).
    pub fn max_deliveries_advisory_filter(&self) -> String {
        format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
            self.dispatch_stream()
        )
    }

    /// The job log: every job's state events (which are its records: the
    /// last one is the job as it stands), its live events (progress, nodes,
    /// outputs), and the webhook work those events make.
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.upper)
    }
    pub fn events_stream_subjects(&self) -> Vec<String> {
        vec![
            format!("{}.events.>", self.prefix),
            format!("{}.hooks.>", self.prefix),
        ]
    }

    /// Latest preview image per job.
    pub fn previews_stream(&self) -> String {
        format!("{}_PREVIEWS", self.upper)
    }
    pub fn previews_stream_subjects(&self) -> Vec<String> {
        vec![format!("{}.previews.>", self.prefix)]
    }

    /// Webhook redelivery requests for the notifier.
    pub fn webhooks_stream(&self) -> String {
        format!("{}_WEBHOOKS", self.upper)
    }
    pub fn webhooks_stream_subjects(&self) -> Vec<String> {
        vec![format!("{}.webhooks.>", self.prefix)]
    }

    // ---- subjects ------------------------------------------------------

    pub fn cancel_subject(&self) -> String {
        format!("{}.jobs.cancel", self.prefix)
    }
    /// An operator's request to requeue a dead-lettered job.
    pub fn retry_subject(&self) -> String {
        format!("{}.jobs.retry", self.prefix)
    }

    pub fn webhook_redeliver_subject(&self) -> String {
        format!("{}.webhooks.redeliver", self.prefix)
    }

    /// One attempt's dispatch message. The tenant token lets the scheduler
    /// count a tenant's jobs in flight from the stream's subject counts.
    pub fn dispatch_subject(
        &self,
        pool: &PoolName,
        priority: Priority,
        tenant: &TenantId,
    ) -> String {
        format!("{}.dispatch.{pool}.{priority}.{tenant}", self.prefix)
    }
    /// Everything dispatched to one pool and not yet acknowledged (the
    /// pool's dispatch consumer's filter).
    pub fn dispatch_pool_filter(&self, pool: &PoolName) -> String {
        format!("{}.dispatch.{pool}.>", self.prefix)
    }
    /// Reads the pool back from its dispatch consumer's filter.
    pub fn parse_dispatch_pool_filter(&self, filter: &str) -> Option<PoolName> {
        let pool = filter
            .strip_prefix(&self.prefix)?
            .strip_prefix(".dispatch.")?
            .strip_suffix(".>")?;
        PoolName::new(pool).ok()
    }
    /// Reads `(pool, priority, tenant)` back from a dispatch subject.
    pub fn parse_dispatch_subject(&self, subject: &str) -> Option<(PoolName, Priority, TenantId)> {
        let rest = subject
            .strip_prefix(&self.prefix)?
            .strip_prefix(".dispatch.")?;
        let mut tokens = rest.split('.');
        let pool = PoolName::new(tokens.next()?).ok()?;
        let priority = tokens.next()?.parse().ok()?;
        let tenant = TenantId::new(tokens.next()?).ok()?;
        tokens.next().is_none().then_some((pool, priority, tenant))
    }
    /// Everything dispatched to one tenant and not yet acknowledged.
    pub fn tenant_dispatch_filter(&self, tenant: &TenantId) -> String {
        format!("{}.dispatch.*.*.{tenant}", self.prefix)
    }
    /// Every acknowledgement of every dispatch message.
    pub fn dispatch_acks_filter(&self) -> String {
        format!("$JS.ACK.{}.>", self.dispatch_stream())
    }
    /// Every acknowledgement of the dispatch messages of `pool` (core NATS
    /// sees them on the consumer's ack subjects).
    pub fn dispatch_ack_filter(&self, pool: &PoolName) -> String {
        format!(
            "$JS.ACK.{}.{}.>",
            self.dispatch_stream(),
            self.dispatch_consumer(pool)
        )
    }

    /// Jobs waiting for a runner slot (`Nats-Msg-Id` = job id). The tenant
    /// token lets quotas and fairness count a tenant's waiting jobs from
    /// subject counts.
    pub fn pending_subject(
        &self,
        pool: &PoolName,
        priority: Priority,
        tenant: &TenantId,
    ) -> String {
        format!("{}.pending.{pool}.{priority}.{tenant}", self.prefix)
    }
    /// Every waiting job, all pools.
    pub fn pending_filter(&self) -> String {
        format!("{}.pending.>", self.prefix)
    }
    /// Every waiting job of one tenant, in any pool and priority.
    pub fn tenant_pending_filter(&self, tenant: &TenantId) -> String {
        format!("{}.pending.*.*.{tenant}", self.prefix)
    }
    /// Reads `(pool, priority, tenant)` back from a pending subject.
    pub fn parse_pending_subject(&self, subject: &str) -> Option<(PoolName, Priority, TenantId)> {
        let rest = subject
            .strip_prefix(&self.prefix)?
            .strip_prefix(".pending.")?;
        let mut tokens = rest.split('.');
        let pool = PoolName::new(tokens.next()?).ok()?;
        let priority = tokens.next()?.parse().ok()?;
        let tenant = TenantId::new(tokens.next()?).ok()?;
        tokens.next().is_none().then_some((pool, priority, tenant))
    }
    /// Every job waiting in one pool, all priorities and tenants.
    pub fn pending_pool_filter(&self, pool: &PoolName) -> String {
        format!("{}.pending.{pool}.>", self.prefix)
    }
    /// The jobs waiting in one pool at one priority, all tenants.
    pub fn pending_priority_filter(&self, pool: &PoolName, priority: Priority) -> String {
        format!("{}.pending.{pool}.{priority}.*", self.prefix)
    }

    /// An event of a job: a state event (the job's record after a change)
    /// on `…events.<tenant>.<job>.<status>`, a live event (progress, node,
    /// output) on `…events.<tenant>.<job>.live.<kind>`. Live events have one
    /// token more, so [`Self::job_state_filter`] never matches them.
    pub fn event_subject(&self, tenant: &TenantId, job: &JobId, kind: EventKind) -> String {
        match kind {
            EventKind::State(_) => {
                format!("{}.events.{tenant}.{job}.{}", self.prefix, kind.token())
            }
            _ => format!(
                "{}.events.{tenant}.{job}.live.{}",
                self.prefix,
                kind.token()
            ),
        }
    }
    /// Every state event of one job: the last one is the job's record.
    pub fn job_state_filter(&self, tenant: &TenantId, job: &JobId) -> String {
        format!("{}.events.{tenant}.{job}.*", self.prefix)
    }
    /// Every event of one job, state and live.
    pub fn job_events_filter(&self, tenant: &TenantId, job: &JobId) -> String {
        format!("{}.events.{tenant}.{job}.>", self.prefix)
    }
    /// Every event of one tenant.
    pub fn tenant_events_filter(&self, tenant: &TenantId) -> String {
        format!("{}.events.{tenant}.>", self.prefix)
    }
    /// The first state event of each of a tenant's jobs (one per job: the
    /// index `GET /v1/jobs` lists from).
    pub fn tenant_accepted_filter(&self, tenant: &TenantId) -> String {
        format!(
            "{}.events.{tenant}.*.{}",
            self.prefix,
            crate::job::JobStatus::Accepted
        )
    }
    /// Reads `(tenant, job)` back from an event subject.
    pub fn parse_event_subject(&self, subject: &str) -> Option<(TenantId, JobId)> {
        let rest = subject
            .strip_prefix(&self.prefix)?
            .strip_prefix(".events.")?;
        let mut tokens = rest.split('.');
        let tenant = TenantId::new(tokens.next()?).ok()?;
        let job = tokens.next()?.parse().ok()?;
        Some((tenant, job))
    }
    /// One kind of event across all tenants and jobs.
    pub fn event_kind_filter(&self, kind: EventKind) -> String {
        match kind {
            EventKind::State(_) => format!("{}.events.*.*.{}", self.prefix, kind.token()),
            _ => format!("{}.events.*.*.live.{}", self.prefix, kind.token()),
        }
    }

    /// Webhook work: an event a job's webhook wants, written with the event.
    pub fn hook_subject(&self, tenant: &TenantId, job: &JobId, kind: EventKind) -> String {
        format!("{}.hooks.{tenant}.{job}.{}", self.prefix, kind.token())
    }
    /// All webhook work (the notifier's filter).
    pub fn hooks_filter(&self) -> String {
        format!("{}.hooks.>", self.prefix)
    }

    pub fn preview_subject(&self, tenant: &TenantId, job: &JobId) -> String {
        format!("{}.previews.{tenant}.{job}", self.prefix)
    }
    /// Every preview of one tenant's jobs.
    pub fn tenant_previews_filter(&self, tenant: &TenantId) -> String {
        format!("{}.previews.{tenant}.*", self.prefix)
    }

    /// Cancellation fan-out to runners and the dispatcher (core NATS: only a
    /// live holder can act on it; the job record is the durable truth).
    pub fn runner_cancel_subject(&self, job: &JobId) -> String {
        format!("{}.control.cancel.{job}", self.prefix)
    }
    pub fn runner_cancel_filter(&self) -> String {
        format!("{}.control.cancel.*", self.prefix)
    }
    /// Reads the job back from a cancel nudge's subject.
    pub fn parse_runner_cancel_subject(&self, subject: &str) -> Option<JobId> {
        subject
            .strip_prefix(&self.prefix)?
            .strip_prefix(".control.cancel.")?
            .parse()
            .ok()
    }

    /// The JetStream API request that deletes one message of `stream`
    /// (relative to the API prefix, as `Context::request` takes it).
    pub fn message_delete_api(&self, stream: &str) -> String {
        format!("STREAM.MSG.DELETE.{stream}")
    }

    // ---- consumers -----------------------------------------------------

    /// Consumers of earlier versions that provisioning removes.
    pub fn legacy_scheduler_consumers(&self) -> [String; 2] {
        ["scheduler-submit".to_owned(), "scheduler-report".to_owned()]
    }
    pub fn scheduler_cancel_consumer(&self) -> String {
        "scheduler-cancel".to_owned()
    }
    pub fn scheduler_retry_consumer(&self) -> String {
        "scheduler-retry".to_owned()
    }
    /// The one dispatch consumer of a pool, shared by its runners (FIFO:
    /// the dispatcher publishes in priority order).
    pub fn dispatch_consumer(&self, pool: &PoolName) -> String {
        format!("dispatch-{pool}")
    }
    /// The per-priority dispatch consumers of earlier versions, deleted at
    /// provisioning (a work-queue stream refuses overlapping consumers).
    pub fn legacy_dispatch_consumers(&self, pool: &PoolName) -> [String; 3] {
        Priority::ALL.map(|priority| format!("dispatch-{pool}-{priority}"))
    }
    /// The one priority group of the dispatch consumers (when a policy is set).
    pub fn dispatch_priority_group(&self) -> String {
        "runners".to_owned()
    }
    /// The dispatcher's consumer of waiting jobs (the lease holder's; a new
    /// holder recreates it to see every job not yet dispatched).
    pub fn dispatcher_consumer(&self) -> String {
        "dispatcher".to_owned()
    }
    pub fn scheduler_advisories_consumer(&self) -> String {
        "scheduler-advisories".to_owned()
    }
    pub fn notifier_consumer(&self) -> String {
        "notifier".to_owned()
    }
    pub fn notifier_redeliver_consumer(&self) -> String {
        "notifier-redeliver".to_owned()
    }

    // ---- KV and object store ---------------------------------------------

    /// Runners' load entries (slots, busy, ready): small, refreshed often,
    /// expiring without a heartbeat (the bucket's age limit is the TTL).
    pub fn runners_bucket(&self) -> String {
        format!("{}_runners", self.prefix)
    }
    /// Runners' capability entries (node types, models, labels): written
    /// when they change, read with the load entry of the same key.
    pub fn capabilities_bucket(&self) -> String {
        format!("{}_capabilities", self.prefix)
    }
    /// The scheduler's own state: the dispatcher lease.
    pub fn scheduler_bucket(&self) -> String {
        format!("{}_scheduler", self.prefix)
    }
    /// Key of the lease held by the one scheduler that dispatches.
    pub fn dispatcher_lease_key(&self) -> String {
        "dispatcher-lease".to_owned()
    }
    pub fn idempotency_bucket(&self) -> String {
        format!("{}_idempotency", self.prefix)
    }
    /// Webhook delivery records (every attempt), one entry per job.
    pub fn webhooks_bucket(&self) -> String {
        format!("{}_webhooks", self.prefix)
    }
    /// Dead letters (jobs whose attempts ran out), keyed like job records.
    pub fn dead_letters_bucket(&self) -> String {
        format!("{}_dead_letters", self.prefix)
    }
    /// The stream behind the dead-letters bucket.
    pub fn dead_letters_kv_stream(&self) -> String {
        format!("KV_{}", self.dead_letters_bucket())
    }
    /// One tenant's dead letters in that stream.
    pub fn tenant_dead_letters_kv_subjects(&self, tenant: &TenantId) -> String {
        format!(
            "$KV.{}.{}",
            self.dead_letters_bucket(),
            self.tenant_jobs_key_filter(tenant)
        )
    }
    pub fn media_bucket(&self) -> String {
        format!("{}_media", self.prefix)
    }

    /// Key of a job's entry in the per-job buckets (dead letters, webhook
    /// deliveries): tenant first, so one tenant's entries can be listed.
    pub fn job_key(&self, tenant: &TenantId, job: &JobId) -> String {
        format!("{tenant}.{job}")
    }
    pub fn tenant_jobs_key_filter(&self, tenant: &TenantId) -> String {
        format!("{tenant}.*")
    }
    /// Key of an idempotency entry: tenant, then the hex SHA-256 of the
    /// client's key (any bytes a client sends become a safe KV token).
    pub fn idempotency_key(&self, tenant: &TenantId, key_sha256: &str) -> String {
        format!("{tenant}.{key_sha256}")
    }

    pub fn input_object(&self, tenant: &TenantId, job: &JobId, name: &str) -> String {
        format!("{tenant}/{job}/inputs/{name}")
    }
    pub fn output_object(&self, tenant: &TenantId, job: &JobId, name: &str) -> String {
        format!("{tenant}/{job}/outputs/{name}")
    }
    pub fn comfy_object(&self, tenant: &TenantId, job: &JobId, name: &str) -> String {
        format!("{tenant}/{job}/comfy/{name}")
    }
    /// What a runner tells the ComfyUI API about its ComfyUI (`object_info.json`).
    pub fn runner_object(&self, runner: &RunnerId, name: &str) -> String {
        format!("_runners/{runner}/comfy/{name}")
    }
    /// Beside the tenant's job folders (`uploads` is never a job id).
    pub fn upload_object(&self, tenant: &TenantId, name: &str) -> String {
        format!("{tenant}/uploads/inputs/{name}")
    }
}

/// Does `subject` match the NATS `filter` (`*` one token, `>` the rest)?
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut filter_tokens = filter.split('.');
    let mut subject_tokens = subject.split('.');
    loop {
        match (filter_tokens.next(), subject_tokens.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(f), Some(s)) if f == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobStatus;
    use proptest::prelude::*;

    fn any_token() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_-]{1,20}"
    }

    proptest! {
        #[test]
        fn every_subject_lands_in_its_stream(tenant in any_token(), pool in any_token(), prefix in "[a-z0-9_-]{1,12}") {
            let names = Names::new(&prefix).expect("valid prefix");
            let tenant = TenantId::new(tenant).expect("valid tenant");
            let pool = PoolName::new(pool).expect("valid pool");
            let job = JobId::new();
            let in_stream = |subject: &str, subjects: Vec<String>| subjects.iter().any(|f| subject_matches(f, subject));

            prop_assert!(in_stream(&names.cancel_subject(), names.jobs_stream_subjects()));
            prop_assert!(in_stream(&names.retry_subject(), names.jobs_stream_subjects()));
            for priority in Priority::ALL {
                let subject = names.dispatch_subject(&pool, priority, &tenant);
                prop_assert!(in_stream(&subject, names.dispatch_stream_subjects()));
                prop_assert!(subject_matches(&names.dispatch_pool_filter(&pool), &subject));
                prop_assert!(subject_matches(&names.tenant_dispatch_filter(&tenant), &subject));
                prop_assert_eq!(names.parse_dispatch_subject(&subject), Some((pool.clone(), priority, tenant.clone())));
                let pending = names.pending_subject(&pool, priority, &tenant);
                prop_assert!(in_stream(&pending, names.pending_stream_subjects()));
                prop_assert!(!in_stream(&pending, names.events_stream_subjects()));
                prop_assert!(subject_matches(&names.pending_filter(), &pending));
                prop_assert!(subject_matches(&names.pending_pool_filter(&pool), &pending));
                prop_assert!(subject_matches(&names.pending_priority_filter(&pool, priority), &pending));
                prop_assert!(subject_matches(&names.tenant_pending_filter(&tenant), &pending));
                prop_assert_eq!(names.parse_pending_subject(&pending), Some((pool.clone(), priority, tenant.clone())));
                prop_assert!(!subject_matches(&names.job_state_filter(&tenant, &job), &pending));
            }
            for kind in EventKind::all() {
                let subject = names.event_subject(&tenant, &job, kind);
                prop_assert!(in_stream(&subject, names.events_stream_subjects()));
                prop_assert!(subject_matches(&names.job_events_filter(&tenant, &job), &subject));
                prop_assert!(subject_matches(&names.tenant_events_filter(&tenant), &subject));
                prop_assert!(subject_matches(&names.event_kind_filter(kind), &subject));
                prop_assert_eq!(names.parse_event_subject(&subject), Some((tenant.clone(), job)));
                // Only state events are the record.
                let state = matches!(kind, EventKind::State(_));
                prop_assert_eq!(subject_matches(&names.job_state_filter(&tenant, &job), &subject), state);
                let accepted = kind == EventKind::State(JobStatus::Accepted);
                prop_assert_eq!(subject_matches(&names.tenant_accepted_filter(&tenant), &subject), accepted);
                let hook = names.hook_subject(&tenant, &job, kind);
                prop_assert!(in_stream(&hook, names.events_stream_subjects()));
                prop_assert!(subject_matches(&names.hooks_filter(), &hook));
                prop_assert!(!subject_matches(&names.tenant_events_filter(&tenant), &hook));
            }
            prop_assert_eq!(names.parse_runner_cancel_subject(&names.runner_cancel_subject(&job)), Some(job));
            let ack = format!("$JS.ACK.{}.{}.1.2.3.4.5", names.dispatch_stream(), names.dispatch_consumer(&pool));
            prop_assert!(subject_matches(&names.dispatch_ack_filter(&pool), &ack));
            prop_assert!(in_stream(&names.preview_subject(&tenant, &job), names.previews_stream_subjects()));
            prop_assert!(subject_matches(&names.runner_cancel_filter(), &names.runner_cancel_subject(&job)));
            prop_assert!(in_stream(&names.webhook_redeliver_subject(), names.webhooks_stream_subjects()));
        }
    }

    #[test]
    fn filters_do_not_leak_across_jobs_or_tenants() {
        let names = Names::default();
        let tenant = TenantId::new("a").expect("valid");
        let other = TenantId::new("b").expect("valid");
        let job = JobId::new();
        let subject = names.event_subject(&other, &job, EventKind::State(JobStatus::Completed));
        assert!(!subject_matches(
            &names.tenant_events_filter(&tenant),
            &subject
        ));
        assert!(!subject_matches(
            &names.job_events_filter(&tenant, &job),
            &subject
        ));
    }

    #[test]
    fn prefix_is_validated() {
        assert!(Names::new("comfyq").is_ok());
        assert!(Names::new("bad.prefix").is_err());
        assert!(Names::new("").is_err());
        assert_eq!(
            Names::new("my-app").expect("valid").jobs_stream(),
            "MY_APP_JOBS"
        );
    }
}
