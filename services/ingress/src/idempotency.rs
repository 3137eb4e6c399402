//! `Idempotency-Key`: the first request with a key claims it in the
//! `comfyq_idempotency` bucket (create-only, 24 h) with the job id it will
//! use and its body's SHA-256. A later request with the same key and body
//! gets that job id; a different body is a 409.
//!
//! Two concurrent identical requests therefore submit the *same* job id, and
//! submission is idempotent per id (`Nats-Msg-Id` = job id, create-only
//! record, inputs stored under the job's prefix), so they make one job.

use async_nats::jetstream::kv;
use comfyq_shared::ids::{JobId, TenantId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::problem::Problem;
use crate::state::AppState;

pub const HEADER: &str = "idempotency-key";
const MAX_KEY_LEN: usize = 255;

#[derive(Debug, Serialize, Deserialize)]
struct Claimed {
    job_id: JobId,
    body_sha256: String,
}

/// Whose job a request makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First use of the key: submit this new job.
    New(JobId),
    /// The key was used with the same body: this is that request's job.
    Replay(JobId),
}

impl Claim {
    pub fn job_id(self) -> JobId {
        match self {
            Claim::New(id) | Claim::Replay(id) => id,
        }
    }
}

/// Checks the header value: 1 to 255 visible ASCII characters.
pub fn check_key(raw: &[u8]) -> Result<&str, Problem> {
    match std::str::from_utf8(raw) {
        Ok(key)
            if (1..=MAX_KEY_LEN).contains(&key.len())
                && key.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(key)
        }
        _ => Err(Problem::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"
        ))),
    }
}

pub async fn claim(
    state: &AppState,
    tenant: &TenantId,
    key: &str,
    proposed: JobId,
    body_sha256: &str,
) -> Result<Claim, Problem> {
    let entry_key = state
        .names
        .idempotency_key(tenant, &hex::encode(Sha256::digest(key.as_bytes())));
    let claimed = Claimed {
        job_id: proposed,
        body_sha256: body_sha256.to_owned(),
    };
    let value = serde_json::to_vec(&claimed).map_err(|e| Problem::internal(&e))?;
    // Twice: an entry can expire between a failed create and the read.
    for _ in 0..2 {
        match state
            .idempotency
            .create(&entry_key, value.clone().into())
            .await
        {
            Ok(_) => return Ok(Claim::New(claimed.job_id)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(Problem::unavailable(&e)),
        }
        let Some(existing) = state
            .idempotency
            .get(&entry_key)
            .await
            .map_err(|e| Problem::unavailable(&e))?
        else {
            continue;
        };
        let existing: Claimed =
            serde_json::from_slice(&existing).map_err(|e| Problem::internal(&e))?;
        if existing.body_sha256 != body_sha256 {
            return Err(Problem::conflict(
                "this Idempotency-Key was used with a different request body",
            ));
        }
        return Ok(Claim::Replay(existing.job_id));
    }
    Err(Problem::conflict(
        "this Idempotency-Key is being claimed concurrently; retry",
    ))
}
