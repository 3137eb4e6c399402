//! Scheduler configuration.

use std::net::SocketAddr;

use comfyq_shared::config::{ConfigError, NatsConfig, Validate};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    pub nats: NatsConfig,
    /// Where to serve Prometheus metrics; none when unset.
    pub metrics_addr: Option<SocketAddr>,
    /// Messages of one kind handled at once.
    pub concurrency: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            nats: NatsConfig::default(),
            metrics_addr: None,
            concurrency: 64,
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
        Ok(())
    }
}
