//! Runner configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use comfyq_shared::config::{
    ConfigError, DispatchPriorityPolicy, MediaConfig, NatsConfig, Validate,
};
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
    /// At most one node or step progress event per job per this interval
    /// reaches NATS (the latest one held meanwhile wins; outputs always go).
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
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
    /// This runner's rank for the `prioritized` policy
    /// (`nats.dispatch_priority_policy`): among runners waiting for work,
    /// the server hands a job to the one with the lowest number, 0 to 9
    /// (e.g. 0 for runners holding a pool's models). Unset: 5, so some
    /// runners can be preferred and others kept for overflow.
    pub dispatch_priority: Option<u8>,
    /// A waiting pull request lives this long before it is renewed (an idle
    /// runner sends one per this interval; shutdown waits for the last one
    /// to end).
    #[serde(with = "humantime_serde")]
    pub pull_expires: Duration,
    /// After a retryable failure here, while another runner of the pool is
    /// free, this runner stops pulling for the retry's delay plus this
    /// long, so the free runner takes the retry.
    #[serde(with = "humantime_serde")]
    pub step_aside_pause: Duration,
    /// After handing back a job this runner cannot run, it stops pulling
    /// for the hand-back's delay plus this long, so a capable runner takes it.
    #[serde(with = "humantime_serde")]
    pub decline_pause: Duration,
    /// No ComfyUI event for this long while a prompt runs → check history,
    /// and treat the prompt as stalled if ComfyUI cannot account for it.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// How often a held job's state is reconciled through `/history` and
    /// `/queue` while its events are missing.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// On shutdown, how long running prompts may finish before being handed back.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Base delay before a retryable failure is redelivered (doubles per attempt).
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// How long reading an input or storing an output is retried within its
    /// attempt while the media store fails (NATS electing leaders, a node
    /// restarting): failing the attempt would spend a delivery of its
    /// budget and run the whole prompt again.
    #[serde(with = "humantime_serde")]
    pub store_retry_for: Duration,
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
            progress_interval: Duration::from_millis(25),
            preview_metadata: true,
            runner_id: None,
            pool: "default".to_owned(),
            labels: BTreeMap::new(),
            slots: 1,
            burst_min_pending: None,
            dispatch_priority: None,
            pull_expires: Duration::from_secs(10),
            step_aside_pause: Duration::from_secs(1),
            decline_pause: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(120),
            reconcile_interval: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(30),
            retry_backoff: Duration::from_secs(2),
            store_retry_for: Duration::from_secs(30),
            comfyui_ready_timeout: Duration::from_secs(60),
            metrics_addr: None,
        }
    }
}

/// `dispatch_priority` of a runner that sets none (see there).
pub const DEFAULT_DISPATCH_PRIORITY: u8 = 5;
/// The lowest rank NATS accepts on a pull request (0 is served first).
pub const MAX_DISPATCH_PRIORITY: u8 = 9;

impl RunnerConfig {
    /// How this runner's pull requests look under the configured policy.
    pub fn pull_options(&self, names: &comfyq_shared::names::Names) -> crate::pull::PullOptions {
        let group = match self.nats.dispatch_priority_policy {
            DispatchPriorityPolicy::None => None,
            DispatchPriorityPolicy::Overflow | DispatchPriorityPolicy::Prioritized => {
                Some(names.dispatch_priority_group())
            }
        };
        crate::pull::PullOptions {
            expires: self.pull_expires,
            group,
            min_pending: self.burst_min_pending,
            priority: self.effective_dispatch_priority().map(usize::from),
        }
    }

    /// The rank this runner's pulls carry (only under `prioritized`).
    pub fn effective_dispatch_priority(&self) -> Option<u8> {
        (self.nats.dispatch_priority_policy == DispatchPriorityPolicy::Prioritized)
            .then(|| self.dispatch_priority.unwrap_or(DEFAULT_DISPATCH_PRIORITY))
    }

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
            && self.nats.dispatch_priority_policy != DispatchPriorityPolicy::Overflow
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
        if self.dispatch_priority.is_some()
            && self.nats.dispatch_priority_policy != DispatchPriorityPolicy::Prioritized
        {
            return Err(ConfigError::Invalid(
                "dispatch_priority needs nats.dispatch_priority_policy = \"prioritized\""
                    .to_owned(),
            ));
        }
        if let Some(priority) = self.dispatch_priority
            && priority > MAX_DISPATCH_PRIORITY
        {
            return Err(ConfigError::Invalid(format!(
                "dispatch_priority must be 0 (served first) to {MAX_DISPATCH_PRIORITY} (got {priority})"
            )));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&self.pull_expires) {
            return Err(ConfigError::Invalid(format!(
                "pull_expires must be 100ms to 5m (got {:?})",
                self.pull_expires
            )));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn prioritized(priority: Option<u8>) -> RunnerConfig {
        let mut config = RunnerConfig {
            dispatch_priority: priority,
            ..RunnerConfig::default()
        };
        config.nats.dispatch_priority_policy = DispatchPriorityPolicy::Prioritized;
        config
    }

    #[test]
    fn dispatch_priority_is_checked_against_the_policy_and_range() {
        assert!(prioritized(Some(0)).validate().is_ok());
        assert!(prioritized(Some(9)).validate().is_ok());
        let error = prioritized(Some(10)).validate().expect_err("out of range");
        assert!(
            error.to_string().contains("dispatch_priority must be 0"),
            "{error}"
        );
        let mut no_policy = prioritized(Some(1));
        no_policy.nats.dispatch_priority_policy = DispatchPriorityPolicy::None;
        let error = no_policy.validate().expect_err("needs the policy");
        assert!(error.to_string().contains("prioritized"), "{error}");
        let error = RunnerConfig {
            pull_expires: Duration::from_millis(10),
            ..RunnerConfig::default()
        }
        .validate()
        .expect_err("too short");
        assert!(error.to_string().contains("pull_expires"), "{error}");
    }

    #[test]
    fn pulls_carry_the_group_fields_of_the_policy() {
        let names = comfyq_shared::names::Names::new("comfyq").expect("names");
        let plain = RunnerConfig::default().pull_options(&names);
        assert_eq!(
            (plain.group, plain.priority, plain.min_pending),
            (None, None, None)
        );
        let unset = prioritized(None).pull_options(&names);
        assert_eq!(unset.group.as_deref(), Some("runners"));
        assert_eq!(unset.priority, Some(usize::from(DEFAULT_DISPATCH_PRIORITY)));
        assert_eq!(prioritized(Some(0)).pull_options(&names).priority, Some(0));
        let mut burst = RunnerConfig {
            burst_min_pending: Some(3),
            ..RunnerConfig::default()
        };
        burst.nats.dispatch_priority_policy = DispatchPriorityPolicy::Overflow;
        let burst = burst.pull_options(&names);
        assert_eq!((burst.min_pending, burst.priority), (Some(3), None));
    }
}
