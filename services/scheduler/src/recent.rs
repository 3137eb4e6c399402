//! The records this scheduler wrote last, so the next input for a job (its
//! runner's reports, mostly) can start from them instead of reading the
//! record again. A record here may be stale (another scheduler, or ingress,
//! wrote since): a change computed from it fails its compare-and-set and is
//! redone from a fresh read, and a decision *not* to write is only taken
//! from a fresh read.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use comfyq_shared::ids::JobId;
use comfyq_shared::job_store::Versioned;

/// Bounded: the oldest entries go first.
#[derive(Debug)]
pub(crate) struct RecentRecords {
    capacity: usize,
    inner: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    by_job: HashMap<JobId, Versioned>,
    order: VecDeque<JobId>,
}

impl RecentRecords {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Entries::default()),
        }
    }

    pub(crate) fn get(&self, job: &JobId) -> Option<Versioned> {
        let entries = self.inner.lock().ok()?;
        entries.by_job.get(job).cloned()
    }

    pub(crate) fn remember(&self, versioned: Versioned) {
        let Ok(mut entries) = self.inner.lock() else {
            return;
        };
        let job = versioned.record.id;
        let terminal = versioned.record.status.is_terminal();
        if entries.by_job.insert(job, versioned).is_none() {
            entries.order.push_back(job);
        }
        // A terminal record takes few more inputs; let it go first.
        if terminal {
            entries.by_job.remove(&job);
        }
        while entries.order.len() > self.capacity
            || entries
                .order
                .front()
                .is_some_and(|front| !entries.by_job.contains_key(front))
        {
            let Some(oldest) = entries.order.pop_front() else {
                break;
            };
            entries.by_job.remove(&oldest);
        }
    }

    pub(crate) fn forget(&self, job: &JobId) {
        if let Ok(mut entries) = self.inner.lock() {
            entries.by_job.remove(job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::tests::accepted;
    use comfyq_shared::job::JobStatus;

    fn versioned(revision: u64) -> Versioned {
        Versioned {
            record: accepted(),
            revision,
        }
    }

    #[test]
    fn keeps_the_latest_write_of_each_job_and_drops_the_oldest_jobs() {
        let recent = RecentRecords::new(2);
        let (first, second, third) = (versioned(1), versioned(1), versioned(1));
        let (a, b, c) = (first.record.id, second.record.id, third.record.id);
        recent.remember(first.clone());
        recent.remember(Versioned {
            revision: 5,
            ..first
        });
        recent.remember(second);
        assert_eq!(recent.get(&a).map(|v| v.revision), Some(5));
        recent.remember(third);
        assert!(recent.get(&a).is_none(), "the oldest job went");
        assert!(recent.get(&b).is_some() && recent.get(&c).is_some());
        recent.forget(&b);
        assert!(recent.get(&b).is_none());
    }

    #[test]
    fn a_terminal_record_is_not_kept() {
        let recent = RecentRecords::new(8);
        let mut done = versioned(3);
        let job = done.record.id;
        recent.remember(done.clone());
        done.record.status = JobStatus::Completed;
        recent.remember(done);
        assert!(recent.get(&job).is_none());
    }
}
