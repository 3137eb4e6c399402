//! How many unfinished jobs each tenant has, for the `max_active_jobs`
//! limit. An unfinished job is either waiting (its pending message, on the
//! tenant's pending subjects) or handed to a runner (its dispatch message,
//! on the tenant's dispatch subjects, until the runner recorded its end and
//! acknowledged it), so the count is two subject-count requests, not a view
//! of every record. It is kept per tenant for [`FRESH_FOR`], plus the jobs
//! this ingress accepted since: several ingresses, or a burst within that
//! time, can overshoot the limit slightly.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use comfyq_shared::ids::TenantId;
use futures::StreamExt;

use crate::problem::Problem;
use crate::state::AppState;

/// How long a counted figure is used before it is counted again.
const FRESH_FOR: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct ActiveJobs {
    /// Per tenant: when counted, the count, and jobs accepted here since.
    counted: Mutex<HashMap<TenantId, (Instant, u64, u64)>>,
}

impl ActiveJobs {
    /// 429 `too-many-jobs` when the tenant has `limit` unfinished jobs.
    pub async fn check(
        &self,
        state: &AppState,
        tenant: &TenantId,
        limit: u64,
    ) -> Result<(), Problem> {
        if limit == 0 {
            return Ok(());
        }
        let known = self
            .counted
            .lock()
            .ok()
            .and_then(|c| c.get(tenant).copied())
            .filter(|(at, _, _)| at.elapsed() < FRESH_FOR)
            .map(|(_, base, since)| base + since);
        let count = match known {
            Some(count) => count,
            None => {
                let count = count(state, tenant).await?;
                if let Ok(mut counted) = self.counted.lock() {
                    counted.insert(tenant.clone(), (Instant::now(), count, 0));
                }
                count
            }
        };
        if count >= limit {
            return Err(Problem::too_many(
                "too-many-jobs",
                format!("{count} jobs are unfinished; at most {limit} allowed"),
                5,
            ));
        }
        Ok(())
    }

    /// A job of `tenant` was accepted here.
    pub fn accepted(&self, tenant: &TenantId) {
        if let Ok(mut counted) = self.counted.lock()
            && let Some((_, _, since)) = counted.get_mut(tenant)
        {
            *since += 1;
        }
    }
}

/// Waiting plus dispatched jobs of `tenant`, from the streams' subject counts.
pub(crate) async fn count(state: &AppState, tenant: &TenantId) -> Result<u64, Problem> {
    let unavailable = |e: &dyn std::error::Error| Problem::unavailable(e);
    let mut total = 0u64;
    for (stream, filter) in [
        (
            state.names.pending_stream(),
            state.names.tenant_pending_filter(tenant),
        ),
        (
            state.names.dispatch_stream(),
            state.names.tenant_dispatch_filter(tenant),
        ),
    ] {
        let stream = state
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| unavailable(&e))?;
        let mut subjects = stream
            .info_with_subjects(filter)
            .await
            .map_err(|e| unavailable(&e))?;
        while let Some(entry) = subjects.next().await {
            let (_, n) = entry.map_err(|e| unavailable(&e))?;
            total += n as u64;
        }
    }
    Ok(total)
}
