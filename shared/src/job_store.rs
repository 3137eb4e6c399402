//! Job records in the jobs KV bucket: read by anyone, written with
//! compare-and-set on the revision so concurrent writers never lose updates.

use async_nats::jetstream::kv;
use bytes::Bytes;

use crate::ids::{JobId, TenantId};
use crate::job::JobRecord;
use crate::names::Names;

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

/// A record with the KV revision it was read at.
#[derive(Clone, Debug)]
pub struct Versioned {
    pub record: JobRecord,
    pub revision: u64,
}

#[derive(Clone, Debug)]
pub struct JobStore {
    kv: kv::Store,
    names: Names,
}

impl JobStore {
    pub fn new(kv: kv::Store, names: Names) -> Self {
        Self { kv, names }
    }

    pub async fn get(
        &self,
        tenant: &TenantId,
        job: &JobId,
    ) -> Result<Option<Versioned>, JobStoreError> {
        let key = self.names.job_key(tenant, job);
        let Some(entry) = self
            .kv
            .entry(key.clone())
            .await
            .map_err(|e| JobStoreError::Nats(e.into()))?
        else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let record = serde_json::from_slice(&entry.value)
            .map_err(|source| JobStoreError::Corrupt { key, source })?;
        Ok(Some(Versioned {
            record,
            revision: entry.revision,
        }))
    }

    /// Creates the record; `Conflict` if one exists already.
    pub async fn create(&self, record: &JobRecord) -> Result<u64, JobStoreError> {
        let key = self.names.job_key(&record.tenant, &record.id);
        match self.kv.create(&key, encode(record)).await {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(JobStoreError::Conflict(key))
            }
            Err(e) => Err(JobStoreError::Nats(e.into())),
        }
    }

    /// Replaces the record if it is still at `revision`.
    pub async fn update(&self, record: &JobRecord, revision: u64) -> Result<u64, JobStoreError> {
        let key = self.names.job_key(&record.tenant, &record.id);
        match self.kv.update(&key, encode(record), revision).await {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(JobStoreError::Conflict(key))
            }
            Err(e) => Err(JobStoreError::Nats(e.into())),
        }
    }

    pub fn kv(&self) -> &kv::Store {
        &self.kv
    }
}

fn encode(record: &JobRecord) -> Bytes {
    // A record is plain data; serializing it cannot fail.
    Bytes::from(serde_json::to_vec(record).expect("job records serialize"))
}
