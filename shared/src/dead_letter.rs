//! Dead letters: jobs whose deliveries or attempts ran out. The scheduler
//! writes one per job (KV `comfyq_dead_letters`, key `<tenant>.<job>`) with
//! the job's spec, so an operator can list them and put a job back in the
//! queue after the cause is fixed; the requeue deletes the entry.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::RunnerId;
use crate::job::{JobError, JobSpec};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub v: u32,
    /// Everything needed to run the job again.
    pub spec: JobSpec,
    /// The last attempt made.
    pub attempts: u32,
    /// The error the job failed with.
    pub error: Option<JobError>,
    /// The runner of the last attempt, if one reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerId>,
    /// Operator requeues before this failure (the record's `requeues`).
    #[serde(default)]
    pub requeues: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub failed_at: OffsetDateTime,
}
