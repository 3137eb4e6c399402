//! Notifier configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use comfyq_shared::config::{ConfigError, NatsConfig, Secret, Validate};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifierConfig {
    pub nats: NatsConfig,
    pub metrics_addr: Option<SocketAddr>,
    /// Signing secrets (`whsec_…`) per tenant; the first signs, all listed
    /// are sent, so a receiver can rotate by accepting either.
    pub tenant_secrets: BTreeMap<String, Vec<Secret>>,
    /// Secrets for tenants without their own.
    pub default_secrets: Vec<Secret>,
    /// Secrets per webhook: the longest URL prefix that matches the webhook's
    /// URL wins over the tenant's secrets.
    pub url_secrets: BTreeMap<String, Vec<Secret>>,
    /// Deliveries in flight to one host at once, so one slow receiver does
    /// not hold up the others.
    pub max_per_host: usize,
    /// At most one `job.progress` webhook per job this often.
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
    /// Per-attempt timeout.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Retries stop once an event is this old; it is then dead-lettered.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// First retry delay; doubles per attempt (with jitter), capped at `max_backoff`.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Allow loopback/private destinations (development and tests only).
    pub allow_private_destinations: bool,
    /// Base URL that output links in webhook bodies start with.
    pub public_base_url: Option<String>,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        Self {
            nats: NatsConfig::default(),
            metrics_addr: None,
            tenant_secrets: BTreeMap::new(),
            default_secrets: Vec::new(),
            url_secrets: BTreeMap::new(),
            max_per_host: 8,
            progress_interval: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(24 * 3600),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(3600),
            concurrency: 64,
            allow_private_destinations: false,
            public_base_url: None,
        }
    }
}

impl Validate for NotifierConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.nats.validate()?;
        let all = self
            .tenant_secrets
            .values()
            .flatten()
            .chain(&self.default_secrets);
        for secret in all {
            if standardwebhooks::Webhook::new(secret.expose()).is_err() {
                return Err(ConfigError::Invalid(
                    "webhook secrets must be `whsec_` followed by base64".to_owned(),
                ));
            }
        }
        if self.attempt_timeout < Duration::from_millis(100)
            || self.attempt_timeout > Duration::from_secs(300)
        {
            return Err(ConfigError::Invalid(
                "attempt_timeout must be 100ms to 300s".to_owned(),
            ));
        }
        if !(1..=1_000).contains(&self.max_per_host) {
            return Err(ConfigError::Invalid(
                "max_per_host must be 1 to 1000".to_owned(),
            ));
        }
        if !(1..=10_000).contains(&self.concurrency) {
            return Err(ConfigError::Invalid(
                "concurrency must be 1 to 10000".to_owned(),
            ));
        }
        if let Some(base) = &self.public_base_url
            && url::Url::parse(base).is_err()
        {
            return Err(ConfigError::Invalid(format!(
                "public_base_url is not a URL: {base:?}"
            )));
        }
        Ok(())
    }
}
