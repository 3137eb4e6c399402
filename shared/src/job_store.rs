//! Job records as state events. Every change of a job is one message on
//! `…events.<tenant>.<job>.<status>` in the events stream carrying the whole
//! record ([`Event::for_state`]); the job's last state event is the record
//! as it stands, its stream sequence the record's revision. A write names
//! the revision it was computed from (`Nats-Expected-Last-Subject-Sequence`
//! over the job's state subjects, `…-Subject` giving the wildcard), so the
//! server refuses it if anyone wrote since: compare-and-set without a lock
//! and without a separate record store or event publish.
//!
//! Writes on a job's normal path are single messages: an atomic batch
//! (ADR-50) costs the server a staged store per batch (about 2.5 ms on a
//! file store here, against 0.15 ms for a publish), so batches are kept for
//! rare multi-state writes (a record rebuilt by a runner). A new job is written pending message first, then its
//! `accepted` and `queued` events: a job is never recorded without the
//! message that dispatches it, and a pending message whose record is
//! missing (ingress died in between) is repaired by the runner that pulls
//! it. An event a job's webhook wants is followed by its webhook work item
//! (`Nats-Msg-Id` = event and revision); whoever finds a job already in an
//! end state publishes its item again (deduplicated), so a writer that died
//! in between costs no webhook.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;

use crate::event::{Event, EventKind};
use crate::ids::{JobId, TenantId};
use crate::job::JobRecord;
use crate::machine::{self, Input, Transition};
use crate::messages::SubmitJob;
use crate::names::Names;

const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";
const BATCH_ID: &str = "Nats-Batch-Id";
const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
const BATCH_COMMIT: &str = "Nats-Batch-Commit";
/// The job a pending message is for (queue positions are counted by it).
pub const JOB_ID_HEADER: &str = "Comfyq-Job-Id";

#[derive(Debug, thiserror::Error)]
pub enum JobStoreError {
    /// The record changed since it was read (or already exists on create).
    #[error("job record {0} was changed concurrently")]
    Conflict(String),
    #[error("job record {key} is not valid JSON for this version: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("job store: {0}")]
    Nats(#[from] async_nats::Error),
}

/// A record with the revision (stream sequence of its state event) it was read at.
#[derive(Clone, Debug)]
pub struct Versioned {
    pub record: JobRecord,
    pub revision: u64,
}

/// What applying an input to a record left.
#[derive(Clone, Debug)]
pub enum Applied {
    /// The record changed: it is written, at this revision.
    Changed(Versioned),
    /// The record already reflects the input (a redelivery, or a write of
    /// ours whose acknowledgement was lost).
    Already(Versioned),
    /// The input no longer applies (the job moved on or ended).
    Ignored(Versioned, &'static str),
    /// There is no such job (never created, or expired).
    Missing,
}

impl Applied {
    /// The record as it now stands, if the job exists.
    pub fn current(&self) -> Option<&Versioned> {
        match self {
            Applied::Changed(v) | Applied::Already(v) | Applied::Ignored(v, _) => Some(v),
            Applied::Missing => None,
        }
    }
}

/// The sequences a write stored its state events at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// Of each state event written, in order: the last is the new revision.
    pub revisions: Vec<u64>,
}

impl Written {
    pub fn revision(&self) -> u64 {
        self.revisions.last().copied().unwrap_or_default()
    }
}

#[derive(Clone, Debug)]
pub struct JobStore {
    js: jetstream::Context,
    client: async_nats::Client,
    events: stream::Stream,
    names: Names,
}

impl JobStore {
    /// `events` is the events stream (from provisioning).
    pub fn new(
        js: jetstream::Context,
        client: async_nats::Client,
        events: stream::Stream,
        names: Names,
    ) -> Self {
        Self {
            js,
            client,
            events,
            names,
        }
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The events stream the records live in.
    pub fn stream(&self) -> &stream::Stream {
        &self.events
    }

    /// The job's record: its last state event (one direct get).
    pub async fn get(
        &self,
        tenant: &TenantId,
        job: &JobId,
    ) -> Result<Option<Versioned>, JobStoreError> {
        let filter = self.names.job_state_filter(tenant, job);
        let message = match self
            .events
            .direct_get_last_for_subject(filter.clone())
            .await
        {
            Ok(message) => message,
            Err(error) if error.kind() == stream::DirectGetErrorKind::NotFound => {
                return self.get_from_leader(&filter).await;
            }
            Err(error) => return Err(JobStoreError::Nats(error.into())),
        };
        let record = decode(&filter, &message.payload)?;
        Ok(Some(Versioned {
            record,
            revision: message.sequence,
        }))
    }

    /// A "not found" from a direct get is confirmed by the stream leader:
    /// on a cluster any replica answers direct gets, and one that is behind
    /// (just back from a fault) does not have a new job yet. Acting on that
    /// answer (a runner dropping the job as expired) would lose the job.
    async fn get_from_leader(&self, filter: &str) -> Result<Option<Versioned>, JobStoreError> {
        match self.events.get_last_raw_message_by_subject(filter).await {
            Ok(message) => Ok(Some(Versioned {
                record: decode(filter, &message.payload)?,
                revision: message.sequence,
            })),
            Err(error) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(error) => Err(JobStoreError::Nats(error.into())),
        }
    }

    /// Creates a new job: its pending message first (so the spec is safe),
    /// then its `accepted` event (create-only: `Conflict` if the job exists)
    /// and, right behind it, its `queued` event, which the dispatcher waits
    /// for before it dispatches the job (so no runner writes the record
    /// before it is queued). `queued` is published without waiting for its
    /// ack (it guards its own subject: a second writer of the same job finds
    /// it taken); if it is lost, the dispatcher dispatches the job after a
    /// moment anyway, from the record as it stands, and whoever moves the
    /// job on from `accepted` writes its `queued` too ([`Self::advance`]).
    pub async fn create_queued(
        &self,
        accepted: &JobRecord,
        queued: &JobRecord,
        pending: &SubmitJob,
    ) -> Result<u64, JobStoreError> {
        let spec = &pending.spec;
        let key = self.names.job_state_filter(&spec.tenant, &spec.id);
        self.publish_pending(pending, &spec.id.to_string()).await?;
        let accepted_ack = self.send(accepted, expect_on(&key, 0)).await?;
        let mut own = HeaderMap::new();
        own.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        self.send_unacked(queued, own).await?;
        let accepted_revision = self.settle(&key, accepted_ack).await?;
        self.hook(accepted, accepted_revision).await?;
        // Its webhook item (if wanted) names the revision it most likely
        // has: right after `accepted` on this connection.
        self.hook(queued, accepted_revision + 1).await?;
        Ok(accepted_revision)
    }

    /// Puts a job in the queue of jobs waiting for a slot. `message_id`
    /// makes a resend after a lost ack (or a retried requeue) a no-op.
    pub async fn publish_pending(
        &self,
        pending: &SubmitJob,
        message_id: &str,
    ) -> Result<(), JobStoreError> {
        let spec = &pending.spec;
        let mut headers = HeaderMap::new();
        headers.insert(JOB_ID_HEADER, spec.id.to_string().as_str());
        headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id);
        let payload = serde_json::to_vec(pending).map_err(|source| JobStoreError::Corrupt {
            key: self.names.job_state_filter(&spec.tenant, &spec.id),
            source,
        })?;
        self.js
            .publish_with_headers(
                self.names
                    .pending_subject(&spec.pool, spec.priority, &spec.tenant),
                headers,
                payload.into(),
            )
            .await
            .map_err(|e| JobStoreError::Nats(e.into()))?
            .await
            .map_err(|e| JobStoreError::Nats(e.into()))?;
        Ok(())
    }

    /// A state event published without a reply subject: one message, no ack.
    async fn send_unacked(
        &self,
        record: &JobRecord,
        headers: HeaderMap,
    ) -> Result<(), JobStoreError> {
        let key = self.names.job_state_filter(&record.tenant, &record.id);
        let payload = serde_json::to_vec(&Event::for_state(record))
            .map_err(|source| JobStoreError::Corrupt { key, source })?;
        self.client
            .publish_with_headers(
                self.names.event_subject(
                    &record.tenant,
                    &record.id,
                    EventKind::State(record.status),
                ),
                headers,
                payload.into(),
            )
            .await
            .map_err(|e| JobStoreError::Nats(e.into()))
    }

    /// Writes one change of the record made from revision `expected`, then
    /// its webhook work item if the job's webhook wants it; returns the new
    /// revision. `Conflict` if the record moved on.
    pub async fn update(&self, record: &JobRecord, expected: u64) -> Result<u64, JobStoreError> {
        let key = self.names.job_state_filter(&record.tenant, &record.id);
        let ack = self.send(record, expect_on(&key, expected)).await?;
        let revision = self.settle(&key, ack).await?;
        self.hook(record, revision).await?;
        Ok(revision)
    }

    /// Writes `record`, the state that follows `from`: one compare-and-set
    /// message, except from `accepted`. Ingress sends a job's `queued` without
    /// waiting for its ack, so it may still land (flushed after a reconnect)
    /// once the job has moved on, and would then become the record: a job
    /// run to its end would read `queued` for good. From `accepted`, that
    /// `queued` is written first, in one atomic batch with `record`; the late
    /// one then finds its subject taken and is refused.
    pub async fn advance(
        &self,
        from: &Versioned,
        record: &JobRecord,
    ) -> Result<u64, JobStoreError> {
        use crate::job::JobStatus::{Accepted, Queued};
        if from.record.status == Accepted
            && !matches!(record.status, Accepted | Queued)
            && let Transition::Apply(queued) = machine::next(
                &from.record,
                &Input::Queue,
                record
                    .queued_at
                    .unwrap_or_else(time::OffsetDateTime::now_utc),
            )
        {
            let written = self
                .commit(&[*queued, record.clone()], from.revision)
                .await?;
            return Ok(written.revision());
        }
        self.update(record, from.revision).await
    }

    /// Publishes the webhook work item of the state event at `revision`, if
    /// the job's webhook wants it (again: the message id makes a repeat a
    /// no-op while the server remembers it, the notifier's delivery record
    /// after).
    pub async fn hook(&self, record: &JobRecord, revision: u64) -> Result<(), JobStoreError> {
        let event = Event::for_state(record);
        if !record
            .webhook
            .as_ref()
            .is_some_and(|w| w.wants(&event.type_name()))
        {
            return Ok(());
        }
        let key = self.names.job_state_filter(&record.tenant, &record.id);
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{}:{revision}", event.id).as_str(),
        );
        let payload = serde_json::to_vec(&event).map_err(|source| JobStoreError::Corrupt {
            key: key.clone(),
            source,
        })?;
        self.js
            .publish_with_headers(
                self.names.hook_subject(
                    &record.tenant,
                    &record.id,
                    EventKind::State(record.status),
                ),
                headers,
                payload.into(),
            )
            .await
            .map_err(|e| JobStoreError::Nats(e.into()))?
            .await
            .map_err(|e| JobStoreError::Nats(e.into()))?;
        Ok(())
    }

    async fn send(
        &self,
        record: &JobRecord,
        headers: HeaderMap,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, JobStoreError> {
        let key = self.names.job_state_filter(&record.tenant, &record.id);
        let payload = serde_json::to_vec(&Event::for_state(record))
            .map_err(|source| JobStoreError::Corrupt { key, source })?;
        self.js
            .publish_with_headers(
                self.names.event_subject(
                    &record.tenant,
                    &record.id,
                    EventKind::State(record.status),
                ),
                headers,
                payload.into(),
            )
            .await
            .map_err(|e| JobStoreError::Nats(e.into()))
    }

    async fn settle(
        &self,
        key: &str,
        ack: async_nats::jetstream::context::PublishAckFuture,
    ) -> Result<u64, JobStoreError> {
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                Err(JobStoreError::Conflict(key.to_owned()))
            }
            Err(e) => Err(JobStoreError::Nats(e.into())),
        }
    }

    /// Writes `records` (successive states of one job, made from revision
    /// `expected`; 0 for a new job) as one atomic batch, each state event a
    /// job's webhook wants with its webhook work item. For rare writes only
    /// (a batch costs the server a staged store).
    pub async fn commit(
        &self,
        records: &[JobRecord],
        expected: u64,
    ) -> Result<Written, JobStoreError> {
        let Some(first) = records.first() else {
            return Ok(Written {
                revisions: Vec::new(),
            });
        };
        let key = self.names.job_state_filter(&first.tenant, &first.id);
        let corrupt = |source| JobStoreError::Corrupt {
            key: key.clone(),
            source,
        };
        let mut messages: Vec<(String, HeaderMap, Bytes)> = Vec::with_capacity(records.len() + 2);
        let mut hooks = Vec::new();
        for record in records {
            let event = Event::for_state(record);
            let payload = Bytes::from(serde_json::to_vec(&event).map_err(corrupt)?);
            let kind = EventKind::State(record.status);
            if record
                .webhook
                .as_ref()
                .is_some_and(|w| w.wants(&event.type_name()))
            {
                hooks.push((
                    self.names.hook_subject(&record.tenant, &record.id, kind),
                    HeaderMap::new(),
                    payload.clone(),
                ));
            }
            messages.push((
                self.names.event_subject(&record.tenant, &record.id, kind),
                HeaderMap::new(),
                payload,
            ));
        }
        // Webhook work last: the state events' sequences are then the first.
        let hook_count = hooks.len() as u64;
        messages.extend(hooks);
        if let Some((_, headers, _)) = messages.first_mut() {
            headers.insert(
                EXPECTED_LAST_SUBJECT_SEQUENCE,
                expected.to_string().as_str(),
            );
            headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT, key.as_str());
        }

        let last = if messages.len() == 1 {
            let (subject, headers, payload) = messages.remove(0);
            self.publish(&key, subject, headers, payload).await?
        } else {
            let batch = uuid::Uuid::new_v4().simple().to_string();
            let count = messages.len();
            let mut last = 0;
            for (index, (subject, mut headers, payload)) in messages.into_iter().enumerate() {
                headers.insert(BATCH_ID, batch.as_str());
                headers.insert(BATCH_SEQUENCE, (index + 1).to_string().as_str());
                if index + 1 == count {
                    headers.insert(BATCH_COMMIT, "1");
                    last = self.publish(&key, subject, headers, payload).await?;
                } else {
                    // Only the commit is answered (once the whole batch is
                    // stored, or refused).
                    self.client
                        .publish_with_headers(subject, headers, payload)
                        .await
                        .map_err(|e| JobStoreError::Nats(e.into()))?;
                }
            }
            last
        };
        // A batch is stored contiguously, its last message at `last`.
        let state_end = last - hook_count;
        let states = records.len() as u64;
        Ok(Written {
            revisions: (state_end + 1 - states..=state_end).collect(),
        })
    }

    async fn publish(
        &self,
        key: &str,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<u64, JobStoreError> {
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| JobStoreError::Nats(e.into()))?
            .await;
        match ack {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                Err(JobStoreError::Conflict(key.to_owned()))
            }
            Err(e) => Err(JobStoreError::Nats(e.into())),
        }
    }

    /// Applies `input` to the job's record until the write wins or the
    /// input no longer applies. `known` is a record the caller holds (it
    /// wrote it or just read it), saving a read; a stale one only costs a
    /// failed compare-and-set and a read. A decision not to write is only
    /// taken from a fresh read.
    pub async fn apply(
        &self,
        tenant: &TenantId,
        job: &JobId,
        input: &Input<'_>,
        mut known: Option<Versioned>,
    ) -> Result<Applied, JobStoreError> {
        loop {
            let (current, fresh) = match known.take() {
                Some(current) => (current, false),
                None => match self.get(tenant, job).await? {
                    Some(current) => (current, true),
                    None => return Ok(Applied::Missing),
                },
            };
            match machine::next(&current.record, input, time::OffsetDateTime::now_utc()) {
                Transition::Apply(new) => match self.advance(&current, &new).await {
                    Ok(revision) => {
                        metrics::counter!("comfyq_job_transitions_total", "status" => new.status.as_str())
                            .increment(1);
                        return Ok(Applied::Changed(Versioned {
                            record: *new,
                            revision,
                        }));
                    }
                    Err(JobStoreError::Conflict(_)) => continue,
                    Err(error) => return Err(error),
                },
                _ if !fresh => continue,
                Transition::AlreadyApplied => return Ok(Applied::Already(current)),
                Transition::Ignore(reason) => return Ok(Applied::Ignored(current, reason)),
            }
        }
    }
}

/// The compare-and-set headers of a write made from revision `expected`.
fn expect_on(key: &str, expected: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        EXPECTED_LAST_SUBJECT_SEQUENCE,
        expected.to_string().as_str(),
    );
    headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT, key);
    headers
}

/// The record a state event carries.
pub fn decode(key: &str, payload: &[u8]) -> Result<JobRecord, JobStoreError> {
    let event: Event =
        serde_json::from_slice(payload).map_err(|source| JobStoreError::Corrupt {
            key: key.to_owned(),
            source,
        })?;
    event.into_record().ok_or_else(|| JobStoreError::Corrupt {
        key: key.to_owned(),
        source: serde::de::Error::custom("a state event without its record"),
    })
}
