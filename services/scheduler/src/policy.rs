//! Which held job goes next, as pure functions over an in-memory view of one
//! pool's pending jobs. No I/O: the dispatcher feeds it what NATS says
//! (pending jobs, jobs in flight per tenant) and acts on its answer.
//!
//! The order, per pick:
//! 1. **Effective priority**, highest first. A job's priority rises one
//!    level per `ageing` waited, so `low` work always progresses.
//! 2. **Tenant fairness** within that level: the tenant with the fewest jobs
//!    in flight goes first, then the one served longest ago (round-robin),
//!    so one tenant's backlog delays another tenant's job by at most one job
//!    per busy slot.
//! 3. **FIFO**: the oldest head breaks ties. Within one priority and tenant,
//!    jobs leave in the order they were accepted (`created_at`, then stream
//!    sequence), whatever order concurrent submissions reached the stream in.
//!
//! Tenants at their running limit, and jobs the caller marks ineligible (no
//! capable runner), are skipped without blocking the others.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use comfyq_shared::ids::{JobId, TenantId};
use comfyq_shared::priority::Priority;
use time::OffsetDateTime;

/// One job waiting in the pending stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// Sequence in the pending stream: the handle to delete it, and the
    /// tie-break of equal acceptance times.
    pub seq: u64,
    pub job: JobId,
    pub tenant: TenantId,
    pub priority: Priority,
    /// When the job was accepted: its place in the FIFO and its age.
    pub enqueued_at: OffsetDateTime,
    /// What the job needs of a runner (node types, models, labels).
    pub needs: std::sync::Arc<comfyq_shared::capability::Needs>,
    /// The pending message's payload (the `SubmitJob`) as the ordered reader
    /// delivered it, kept while the dispatcher's payload budget lasts so the
    /// dispatch need not read the message back; `None`: read it by `seq`.
    pub payload: Option<bytes::Bytes>,
    /// Where to acknowledge the pending message (which removes it).
    pub ack: String,
}

/// The pending jobs of one pool, one FIFO lane per priority and tenant.
#[derive(Clone, Debug, Default)]
pub struct PoolQueue {
    lanes: BTreeMap<(Priority, TenantId), VecDeque<Pending>>,
    len: usize,
}

impl PoolQueue {
    /// Adds a job, keeping each lane in acceptance order; `false` if it
    /// was there already.
    pub fn push(&mut self, entry: Pending) -> bool {
        let lane = self
            .lanes
            .entry((entry.priority, entry.tenant.clone()))
            .or_default();
        if lane.iter().any(|e| e.seq == entry.seq) {
            return false;
        }
        let at = lane.partition_point(|e| (e.enqueued_at, e.seq) < (entry.enqueued_at, entry.seq));
        lane.insert(at, entry);
        self.len += 1;
        true
    }

    /// Removes the job with sequence `seq` from its lane.
    pub fn remove(&mut self, priority: Priority, tenant: &TenantId, seq: u64) -> Option<Pending> {
        let key = (priority, tenant.clone());
        let lane = self.lanes.get_mut(&key)?;
        let at = lane.iter().position(|e| e.seq == seq)?;
        let removed = lane.remove(at);
        if lane.is_empty() {
            self.lanes.remove(&key);
        }
        self.len -= 1;
        removed
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &Pending> {
        self.lanes.values().flatten()
    }

    /// Per priority: how many wait and since when the oldest does.
    pub fn depth(&self) -> BTreeMap<Priority, (usize, Option<OffsetDateTime>)> {
        let mut depth = BTreeMap::new();
        for ((priority, _), lane) in &self.lanes {
            let (count, oldest) = depth.entry(*priority).or_insert((0, None));
            *count += lane.len();
            if let Some(head) = lane.front() {
                *oldest = Some(oldest.map_or(head.enqueued_at, |o: OffsetDateTime| {
                    o.min(head.enqueued_at)
                }));
            }
        }
        depth
    }
}

/// Tunables of the policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Waiting this long raises a job one priority level; zero disables ageing.
    pub ageing: Duration,
    /// Jobs in flight per tenant, beyond which the tenant is skipped.
    pub max_running: HashMap<TenantId, usize>,
    /// The limit for tenants not in `max_running`; `None` is unlimited.
    pub default_max_running: Option<usize>,
}

impl Policy {
    pub fn running_limit(&self, tenant: &TenantId) -> Option<usize> {
        self.max_running
            .get(tenant)
            .copied()
            .or(self.default_max_running)
    }
}

/// The priority a job competes at after waiting `waited`.
pub fn effective_priority(priority: Priority, waited: Duration, ageing: Duration) -> Priority {
    if ageing.is_zero() {
        return priority;
    }
    let steps = (waited.as_secs_f64() / ageing.as_secs_f64()).floor();
    let level = match priority {
        Priority::High => 0.0,
        Priority::Normal => 1.0,
        Priority::Low => 2.0,
    };
    match (level - steps).max(0.0) as u8 {
        0 => Priority::High,
        1 => Priority::Normal,
        _ => Priority::Low,
    }
}

/// What the policy knows of tenants beyond their queued jobs.
#[derive(Clone, Debug, Default)]
pub struct Tenants {
    /// Jobs in flight (dispatched, not finished) per tenant.
    pub running: HashMap<TenantId, usize>,
    /// When each tenant was last picked, as a pick counter.
    pub last_served: HashMap<TenantId, u64>,
    picks: u64,
}

impl Tenants {
    pub fn new(running: HashMap<TenantId, usize>, last_served: HashMap<TenantId, u64>) -> Self {
        let picks = last_served.values().copied().max().unwrap_or(0);
        Self {
            running,
            last_served,
            picks,
        }
    }

    /// Records that `tenant` got a slot.
    pub fn served(&mut self, tenant: &TenantId) {
        self.picks += 1;
        *self.running.entry(tenant.clone()).or_insert(0) += 1;
        self.last_served.insert(tenant.clone(), self.picks);
    }
}

/// The job to dispatch next, or `None` if nothing may go now.
///
/// `eligible` says whether a job may go at all (a capable runner exists).
pub fn pick<'a>(
    queue: &'a PoolQueue,
    now: OffsetDateTime,
    policy: &Policy,
    tenants: &Tenants,
    eligible: impl Fn(&Pending) -> bool,
) -> Option<&'a Pending> {
    type Key = (Priority, usize, u64, OffsetDateTime, u64);
    let mut best: Option<(Key, &Pending)> = None;
    for ((_, tenant), lane) in &queue.lanes {
        let in_flight = tenants.running.get(tenant).copied().unwrap_or(0);
        if policy
            .running_limit(tenant)
            .is_some_and(|limit| in_flight >= limit)
        {
            continue;
        }
        let Some(head) = lane.iter().find(|e| eligible(e)) else {
            continue;
        };
        let waited = (now - head.enqueued_at)
            .try_into()
            .unwrap_or(Duration::ZERO);
        let key = (
            effective_priority(head.priority, waited, policy.ageing),
            in_flight,
            tenants.last_served.get(tenant).copied().unwrap_or(0),
            head.enqueued_at,
            head.seq,
        );
        if best.as_ref().is_none_or(|(k, _)| key < *k) {
            best = Some((key, head));
        }
    }
    best.map(|(_, head)| head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TENANTS: [&str; 3] = ["a", "b", "c"];

    fn tenant(i: usize) -> TenantId {
        TenantId::new(TENANTS[i % TENANTS.len()]).expect("valid")
    }

    fn priority(i: u8) -> Priority {
        Priority::ALL[usize::from(i) % 3]
    }

    fn entry(seq: u64, t: usize, p: u8, age_s: i64, now: OffsetDateTime) -> Pending {
        Pending {
            seq,
            job: JobId::new(),
            tenant: tenant(t),
            priority: priority(p),
            enqueued_at: now - time::Duration::seconds(age_s),
            needs: Default::default(),
            payload: None,
            ack: String::new(),
        }
    }

    fn policy(ageing_s: u64) -> Policy {
        Policy {
            ageing: Duration::from_secs(ageing_s),
            max_running: HashMap::new(),
            default_max_running: None,
        }
    }

    fn any_queue() -> impl Strategy<Value = Vec<(usize, u8, i64)>> {
        proptest::collection::vec((0usize..3, 0u8..3, 0i64..1000), 0..60)
    }

    fn build(specs: &[(usize, u8, i64)], now: OffsetDateTime) -> PoolQueue {
        let mut queue = PoolQueue::default();
        for (seq, (t, p, age)) in specs.iter().enumerate() {
            queue.push(entry(seq as u64 + 1, *t, *p, *age, now));
        }
        queue
    }

    #[test]
    fn a_high_job_after_many_low_ones_goes_first() {
        let now = OffsetDateTime::now_utc();
        let mut queue = PoolQueue::default();
        for seq in 1..=1000 {
            queue.push(entry(seq, 0, 2, 1, now));
        }
        queue.push(entry(1001, 0, 0, 0, now));
        let next = pick(&queue, now, &policy(300), &Tenants::default(), |_| true);
        assert_eq!(next.map(|e| e.seq), Some(1001));
    }

    #[test]
    fn ageing_promotes_one_level_per_period() {
        let ageing = Duration::from_secs(60);
        let p = |waited| effective_priority(Priority::Low, Duration::from_secs(waited), ageing);
        assert_eq!(p(59), Priority::Low);
        assert_eq!(p(60), Priority::Normal);
        assert_eq!(p(120), Priority::High);
        assert_eq!(
            effective_priority(Priority::Low, Duration::from_secs(10_000), Duration::ZERO),
            Priority::Low
        );
    }

    /// With one slot that frees between picks (nothing in flight at each
    /// pick), tenants alternate instead of the oldest backlog winning.
    #[test]
    fn tenants_take_turns_when_nothing_is_in_flight() {
        let now = OffsetDateTime::now_utc();
        let mut queue = PoolQueue::default();
        for seq in 1..=10 {
            queue.push(entry(seq, 0, 1, 100, now));
        }
        queue.push(entry(11, 1, 1, 0, now));
        queue.push(entry(12, 1, 1, 0, now));
        let mut tenants = Tenants::default();
        let mut order = Vec::new();
        for _ in 0..5 {
            let next = pick(&queue, now, &policy(0), &tenants, |_| true)
                .cloned()
                .expect("work");
            tenants.served(&next.tenant);
            tenants.running.clear(); // the slot freed again
            queue.remove(next.priority, &next.tenant, next.seq);
            order.push(next.tenant.as_str().to_owned());
        }
        assert_eq!(order, ["a", "b", "a", "b", "a"]);
    }

    proptest! {
        /// Nothing eligible with a higher effective priority is passed over.
        #[test]
        fn strict_priority_after_ageing(specs in any_queue(), ageing in 0u64..400) {
            let now = OffsetDateTime::now_utc();
            let queue = build(&specs, now);
            let policy = policy(ageing);
            let picked = pick(&queue, now, &policy, &Tenants::default(), |_| true);
            prop_assert_eq!(picked.is_some(), !queue.is_empty());
            if let Some(picked) = picked {
                let effective = |e: &Pending| effective_priority(e.priority, (now - e.enqueued_at).try_into().unwrap_or(Duration::ZERO), policy.ageing);
                // Only lane heads compete: FIFO within priority and tenant.
                let heads: Vec<&Pending> = queue.lanes.values().filter_map(|l| l.front()).collect();
                prop_assert!(heads.iter().any(|h| h.seq == picked.seq), "picked a job behind its lane's head");
                for head in heads {
                    prop_assert!(effective(head) >= effective(picked), "{:?} passed over for {:?}", head, picked);
                }
            }
        }

        /// Draining the queue one pick at a time keeps FIFO order in every
        /// lane, and every job leaves (no starvation) even with ageing off.
        #[test]
        fn draining_keeps_fifo_per_lane(specs in any_queue()) {
            let now = OffsetDateTime::now_utc();
            let mut queue = build(&specs, now);
            let total = queue.len();
            let mut last: HashMap<(Priority, TenantId), (OffsetDateTime, u64)> = HashMap::new();
            for _ in 0..total {
                let picked = pick(&queue, now, &policy(0), &Tenants::default(), |_| true).cloned();
                let Some(picked) = picked else { prop_assert!(false, "queue not drained"); return Ok(()); };
                let key = (picked.priority, picked.tenant.clone());
                let order = (picked.enqueued_at, picked.seq);
                prop_assert!(last.get(&key).is_none_or(|o| *o < order), "FIFO broken in a lane");
                last.insert(key, order);
                queue.remove(picked.priority, &picked.tenant, picked.seq);
            }
            prop_assert!(queue.is_empty());
        }

        /// A low job waiting two ageing periods beats fresh high jobs.
        #[test]
        fn aged_low_work_is_not_starved(highs in 1usize..50, ageing in 1u64..100) {
            let now = OffsetDateTime::now_utc();
            let mut queue = PoolQueue::default();
            queue.push(entry(1, 0, 2, (2 * ageing) as i64, now));
            for i in 0..highs {
                queue.push(entry(2 + i as u64, 1, 0, 0, now));
            }
            let picked = pick(&queue, now, &policy(ageing), &Tenants::default(), |_| true);
            prop_assert_eq!(picked.map(|e| e.seq), Some(1));
        }

        /// Within a priority, the tenant with fewer jobs in flight goes
        /// first, whatever the other's backlog; limits are never exceeded.
        #[test]
        fn tenants_share_slots_fairly(backlog in 1usize..200, busy in 0usize..10, limit in proptest::option::of(1usize..5)) {
            let now = OffsetDateTime::now_utc();
            let mut queue = PoolQueue::default();
            for i in 0..backlog {
                queue.push(entry(1 + i as u64, 0, 1, 100, now));
            }
            // Tenant b's single job arrived last.
            queue.push(entry(1 + backlog as u64, 1, 1, 0, now));
            let mut tenants = Tenants::new([(tenant(0), busy)].into(), HashMap::new());
            let mut policy = policy(0);
            policy.default_max_running = limit;
            let picked = pick(&queue, now, &policy, &tenants, |_| true).expect("b may run");
            if busy > 0 {
                prop_assert_eq!(&picked.tenant, &tenant(1));
            }
            // Simulate slots freeing: b's job leaves within two picks.
            let mut picks = 0;
            while let Some(next) = pick(&queue, now, &policy, &tenants, |_| true).cloned() {
                picks += 1;
                tenants.served(&next.tenant);
                if let Some(limit) = limit {
                    prop_assert!(tenants.running[&next.tenant] <= limit.max(busy));
                }
                queue.remove(next.priority, &next.tenant, next.seq);
                if next.tenant == tenant(1) { break; }
            }
            // b goes at once, or right after one job of a when neither had
            // anything in flight (then the older head went first).
            prop_assert!(picks <= 2, "b waited {} picks", picks);
        }

        /// Ineligible jobs are skipped without blocking the rest of their lane.
        #[test]
        fn ineligible_jobs_do_not_block(specs in any_queue(), blocked_mod in 2u64..5) {
            let now = OffsetDateTime::now_utc();
            let queue = build(&specs, now);
            let eligible = |e: &Pending| !e.seq.is_multiple_of(blocked_mod);
            let picked = pick(&queue, now, &policy(0), &Tenants::default(), eligible);
            prop_assert_eq!(picked.is_some(), queue.iter().any(eligible));
            if let Some(p) = picked { prop_assert!(eligible(p)); }
        }
    }
}
