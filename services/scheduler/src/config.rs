//! Scheduler configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use comfyq_shared::config::{ConfigError, NatsConfig, Validate};
use comfyq_shared::ids::TenantId;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    pub nats: NatsConfig,
    /// Where to serve Prometheus metrics; none when unset.
    pub metrics_addr: Option<SocketAddr>,
    /// Messages of one kind handled at once.
    pub concurrency: usize,
    /// Redelivery deadline of a JOBS message (submission, report, cancel)
    /// whose handler died with it.
    #[serde(with = "humantime_serde")]
    pub handler_ack_wait: Duration,
    /// Name written in the dispatcher lease; random if unset.
    pub instance_id: Option<String>,
    /// Dispatch messages a pool may hold beyond its runners' free slots.
    /// 0 decides every job as late as possible (a high job goes to the next
    /// free slot); a small window hides the dispatcher's round trip at the
    /// cost of that many lower jobs going first.
    pub dispatch_window: usize,
    /// A queued job's priority rises one level per this much waiting; 0 disables.
    #[serde(with = "humantime_serde")]
    pub ageing: Duration,
    /// A job still queued after this long fails with kind `timeout`.
    #[serde(with = "humantime_serde")]
    pub max_queue_time: Duration,
    /// A standby takes over the dispatcher after its lease went unrenewed this long.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often the dispatcher re-checks ageing, queue timeouts and capability
    /// without being prompted.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// What happens to a job no registered runner of its pool can run.
    pub unroutable: Unroutable,
    /// Limits for tenants not listed in `tenants`.
    pub default_limits: TenantLimits,
    /// Per-tenant limits, by tenant id.
    pub tenants: BTreeMap<String, TenantLimits>,
}

/// A job whose node types no runner of its pool has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unroutable {
    /// Keep it queued with `waiting_reason = waiting_for_capability`.
    #[default]
    Wait,
    /// Fail it with kind `rejected`.
    Reject,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimits {
    /// Jobs dispatched and not yet finished; more wait in the queue.
    pub max_running: Option<usize>,
    /// Jobs waiting in the queue; more are rejected (kind `rejected`).
    pub max_queued: Option<usize>,
}

impl SchedulerConfig {
    pub fn limits(&self, tenant: &TenantId) -> &TenantLimits {
        self.tenants
            .get(tenant.as_str())
            .unwrap_or(&self.default_limits)
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            nats: NatsConfig::default(),
            metrics_addr: None,
            concurrency: 64,
            handler_ack_wait: Duration::from_secs(30),
            instance_id: None,
            dispatch_window: 0,
            ageing: Duration::from_secs(300),
            max_queue_time: Duration::from_secs(24 * 3600),
            lease_ttl: Duration::from_secs(5),
            tick: Duration::from_millis(500),
            unroutable: Unroutable::Wait,
            default_limits: TenantLimits::default(),
            tenants: BTreeMap::new(),
        }
    }
}

impl Validate for SchedulerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.nats.validate()?;
        if !(1..=10_000).contains(&self.concurrency) {
            return Err(ConfigError::Invalid(format!(
                "concurrency must be 1 to 10000 (got {})",
                self.concurrency
            )));
        }
        for tenant in self.tenants.keys() {
            TenantId::new(tenant.clone())
                .map_err(|e| ConfigError::Invalid(format!("tenants.{tenant}: {e}")))?;
        }
        if self.lease_ttl < Duration::from_millis(500) {
            return Err(ConfigError::Invalid(
                "lease_ttl must be at least 500ms".to_owned(),
            ));
        }
        if self.tick < Duration::from_millis(10) || self.max_queue_time.is_zero() {
            return Err(ConfigError::Invalid(
                "tick must be at least 10ms and max_queue_time above 0".to_owned(),
            ));
        }
        Ok(())
    }
}
