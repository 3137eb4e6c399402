//! Runner configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use comfyq_shared::config::{ConfigError, MediaConfig, NatsConfig, Validate};
use comfyq_shared::ids::{PoolName, RunnerId};
use serde::{Deserialize, Serialize};

use crate::managed::ManagedConfig;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunnerConfig {
    pub nats: NatsConfig,
    /// Where inputs and outputs live (`[media]`, `COMFYQ_MEDIA__URL`…).
    pub media: MediaConfig,
    /// The ComfyUI this runner drives (in managed mode: where the launched
    /// one listens, so its `args` must name the same port).
    pub comfyui_url: String,
    /// Set: launch and supervise ComfyUI (managed mode). Unset: attach to
    /// `comfyui_url`.
    pub managed: Option<ManagedConfig>,
    /// ComfyUI's directory (holding `input/`, `output/`, `temp/`). Set, the
    /// runner deletes a job's uploads and outputs from it once stored;
    /// ComfyUI has no API for that. Managed mode defaults to `working_dir`.
    pub comfyui_dir: Option<PathBuf>,
    /// At most one preview per job per this interval reaches NATS.
    #[serde(with = "humantime_serde")]
    pub preview_interval: Duration,
    /// Ask ComfyUI for previews with metadata (event 4, naming their prompt)
    /// instead of the legacy frames (event 1).
    pub preview_metadata: bool,
    /// Stable name (registration key, ComfyUI client id); random if unset.
    pub runner_id: Option<String>,
    pub pool: String,
    /// Free-form labels shown in the registration (GPU model, region…).
    pub labels: BTreeMap<String, String>,
    /// Jobs held at once: one executes in ComfyUI, the rest wait in its queue.
    pub slots: usize,
    /// Makes this a burst runner: it takes work only while at least this
    /// many dispatch messages of a priority wait unpulled (NATS `overflow`
    /// priority group; needs `nats.dispatch_priority_policy = "overflow"`).
    /// The scheduler counts its slots only while such a backlog builds.
    pub burst_min_pending: Option<usize>,
    /// No ComfyUI event for this long while a prompt runs → check history,
    /// and treat the prompt as stalled if ComfyUI cannot account for it.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// How often a held job's state is reconciled through `/history` and
    /// `/queue` while its events are missing.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// Polling interval for work when no wake-up arrives.
    #[serde(with = "humantime_serde")]
    pub idle_poll: Duration,
    /// On shutdown, how long running prompts may finish before being handed back.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Base delay before a retryable failure is redelivered (doubles per attempt).
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest wait for ComfyUI to answer at start.
    #[serde(with = "humantime_serde")]
    pub comfyui_ready_timeout: Duration,
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            nats: NatsConfig::default(),
            media: MediaConfig::default(),
            comfyui_url: "http://127.0.0.1:8188".to_owned(),
            managed: None,
            comfyui_dir: None,
            preview_interval: Duration::from_millis(250),
            preview_metadata: true,
            runner_id: None,
            pool: "default".to_owned(),
            labels: BTreeMap::new(),
            slots: 1,
            burst_min_pending: None,
            stall_timeout: Duration::from_secs(120),
            reconcile_interval: Duration::from_secs(2),
            idle_poll: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(30),
            retry_backoff: Duration::from_secs(2),
            comfyui_ready_timeout: Duration::from_secs(60),
            metrics_addr: None,
        }
    }
}

impl RunnerConfig {
    /// Where ComfyUI keeps its files, if the runner may clean them up.
    pub fn comfyui_dir(&self) -> Option<PathBuf> {
        self.comfyui_dir.clone().or_else(|| {
            self.managed
                .as_ref()
                .and_then(|managed| managed.working_dir.clone())
        })
    }

    pub fn pool(&self) -> Result<PoolName, ConfigError> {
        PoolName::new(self.pool.clone()).map_err(|e| ConfigError::Invalid(format!("pool: {e}")))
    }

    pub fn runner_id(&self) -> Result<RunnerId, ConfigError> {
        match &self.runner_id {
            Some(id) => RunnerId::new(id.clone())
                .map_err(|e| ConfigError::Invalid(format!("runner_id: {e}"))),
            None => Ok(RunnerId::random()),
        }
    }

    pub fn comfyui_url(&self) -> Result<url::Url, ConfigError> {
        let url = url::Url::parse(&self.comfyui_url).map_err(|e| {
            ConfigError::Invalid(format!("comfyui_url {:?}: {e}", self.comfyui_url))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError::Invalid(format!(
                "comfyui_url must be http(s) (got {:?})",
                self.comfyui_url
            )));
        }
        Ok(url)
    }
}

impl Validate for RunnerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.nats.validate()?;
        self.media.validate()?;
        self.pool()?;
        self.runner_id()?;
        self.comfyui_url()?;
        if self.burst_min_pending.is_some()
            && self.nats.dispatch_priority_policy
                != comfyq_shared::config::DispatchPriorityPolicy::Overflow
        {
            return Err(ConfigError::Invalid(
                "burst_min_pending needs nats.dispatch_priority_policy = \"overflow\"".to_owned(),
            ));
        }
        if self.burst_min_pending == Some(0) {
            return Err(ConfigError::Invalid(
                "burst_min_pending must be at least 1".to_owned(),
            ));
        }
        if !(1..=64).contains(&self.slots) {
            return Err(ConfigError::Invalid(format!(
                "slots must be 1 to 64 (got {})",
                self.slots
            )));
        }
        for (name, value) in [
            ("stall_timeout", self.stall_timeout),
            ("reconcile_interval", self.reconcile_interval),
            ("idle_poll", self.idle_poll),
        ] {
            if value < Duration::from_millis(10) {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be at least 10ms"
                )));
            }
        }
        if let Some(managed) = &self.managed
            && managed.command.as_os_str().is_empty()
        {
            return Err(ConfigError::Invalid(
                "managed.command must name ComfyUI's launcher".to_owned(),
            ));
        }
        Ok(())
    }
}
