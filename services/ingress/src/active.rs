//! How many unfinished jobs each tenant has, for the `max_active_jobs`
//! limit: a view kept from a watch on the jobs bucket (every record's
//! latest value once at start, then each change). It is derived state, not
//! truth: until the first replay finishes the limit is not enforced, and
//! jobs accepted in the last moments may not be counted yet, so a burst can
//! overshoot the limit slightly.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::jetstream::kv;
use comfyq_shared::ids::{JobId, TenantId};
use comfyq_shared::job::JobRecord;
use tokio_util::sync::CancellationToken;

use crate::problem::Problem;

#[derive(Debug, Default)]
pub struct ActiveJobs {
    by_tenant: Mutex<HashMap<TenantId, HashSet<JobId>>>,
    ready: AtomicBool,
}

impl ActiveJobs {
    /// Keeps the view up to date until `shutdown`; re-watches after errors.
    pub async fn follow(&self, jobs: kv::Store, shutdown: CancellationToken) {
        comfyq_shared::kv_view::follow(
            jobs,
            "job records for active-job counts",
            shutdown,
            |entry| self.apply(entry),
            || self.ready.store(true, Ordering::Relaxed),
        )
        .await;
    }

    fn apply(&self, entry: &kv::Entry) {
        let Some((tenant, job)) = entry.key.split_once('.') else {
            return;
        };
        let (Ok(tenant), Ok(job)) = (TenantId::new(tenant), job.parse::<JobId>()) else {
            return;
        };
        let active = entry.operation == kv::Operation::Put
            && serde_json::from_slice::<JobRecord>(&entry.value)
                .is_ok_and(|record| !record.status.is_terminal());
        let Ok(mut by_tenant) = self.by_tenant.lock() else {
            return;
        };
        let jobs = by_tenant.entry(tenant).or_default();
        if active {
            jobs.insert(job);
        } else {
            jobs.remove(&job);
        }
    }

    pub fn count(&self, tenant: &TenantId) -> u64 {
        self.by_tenant
            .lock()
            .map(|m| m.get(tenant).map_or(0, |jobs| jobs.len() as u64))
            .unwrap_or(0)
    }

    /// 429 `too-many-jobs` when the tenant has `limit` unfinished jobs.
    pub fn check(&self, tenant: &TenantId, limit: u64) -> Result<(), Problem> {
        if limit == 0 || !self.ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let count = self.count(tenant);
        if count >= limit {
            return Err(Problem::too_many(
                "too-many-jobs",
                format!("{count} jobs are unfinished; at most {limit} allowed"),
                5,
            ));
        }
        Ok(())
    }
}
