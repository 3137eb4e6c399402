//! Ingress configuration.

use comfyq_shared::config::{ConfigError, MediaConfig, NatsConfig, Secret, Validate};
use comfyq_shared::ids::TenantId;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngressConfig {
    pub nats: NatsConfig,
    /// Where inputs and outputs live (`[media]`, `COMFYQ_MEDIA__URL`…).
    pub media: MediaConfig,
    /// Address to listen on (used by the binary; tests pass a listener).
    pub http_addr: String,
    /// API keys and the tenant each one acts for.
    pub api_keys: Vec<ApiKey>,
    /// Development only: requests without a key act as this tenant.
    pub open_tenant: Option<String>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Default and largest allowed `timeout_s` of a job.
    pub default_timeout_s: u64,
    pub max_timeout_s: u64,
    /// Refuse (422) a job that no registered runner of its pool can run:
    /// node types, model files its loaders name, `runner_labels`. Off:
    /// accept it, and the scheduler holds it as `waiting_for_capability`
    /// until such a runner registers (or fails it, per the scheduler's
    /// `unroutable` setting).
    pub reject_unrunnable: bool,
    /// Longest `?wait=N` honoured, in seconds.
    pub max_wait_s: u64,
    /// Most input files per job and most nodes per workflow.
    pub max_inputs: usize,
    pub max_nodes: usize,
    /// Largest input file (multipart part or fetched URL), in bytes.
    pub max_input_bytes: u64,
    /// Time limit of fetching one `{name, url}` input.
    #[serde(with = "humantime_serde")]
    pub input_fetch_timeout: std::time::Duration,
    /// Allow webhook URLs that resolve to loopback, private or link-local
    /// addresses (development only).
    pub allow_private_webhooks: bool,
    /// Same for input URLs the service fetches.
    pub allow_private_input_urls: bool,
    /// Requests per second per tenant (sustained), and the burst above it.
    /// 0 turns rate limiting off.
    pub rate_limit_per_s: u32,
    pub rate_limit_burst: u32,
    /// Jobs per tenant not yet finished before `POST /v1/jobs` answers 429.
    /// 0 means no limit.
    pub max_active_jobs: u64,
    /// Where ComfyUI's own API is served besides the root (and `/api`):
    /// `/comfyui` serves `/comfyui/prompt`, `/comfyui/ws`, … Empty: root only.
    pub comfy_api_prefix: String,
}

/// One API key. Configuration holds the SHA-256 of the key (hex) so a leaked
/// file does not leak keys; `key` (plain) is accepted for local development.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub tenant: String,
    #[serde(default)]
    pub key_sha256: Option<String>,
    #[serde(default)]
    pub key: Option<Secret>,
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            nats: NatsConfig::default(),
            media: MediaConfig::default(),
            http_addr: "127.0.0.1:8080".to_owned(),
            api_keys: Vec::new(),
            open_tenant: None,
            max_body_bytes: 64 * 1024 * 1024,
            default_timeout_s: 600,
            max_timeout_s: 24 * 3600,
            reject_unrunnable: true,
            max_wait_s: 300,
            max_inputs: 32,
            max_nodes: 5000,
            max_input_bytes: 512 * 1024 * 1024,
            input_fetch_timeout: std::time::Duration::from_secs(60),
            allow_private_webhooks: false,
            allow_private_input_urls: false,
            rate_limit_per_s: 50,
            rate_limit_burst: 200,
            max_active_jobs: 10_000,
            comfy_api_prefix: "/comfyui".to_owned(),
        }
    }
}

impl Validate for IngressConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.nats.validate()?;
        self.media.validate()?;
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.http_addr.parse::<std::net::SocketAddr>().is_err() {
            return invalid(format!(
                "http_addr is not a socket address: {:?}",
                self.http_addr
            ));
        }
        for (i, key) in self.api_keys.iter().enumerate() {
            if let Err(e) = TenantId::new(key.tenant.clone()) {
                return invalid(format!("api_keys[{i}].tenant: {e}"));
            }
            match (&key.key_sha256, &key.key) {
                (Some(hash), None)
                    if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {}
                (None, Some(key)) if key.expose().len() >= 16 => {}
                (None, Some(_)) => {
                    return invalid(format!("api_keys[{i}].key must be at least 16 characters"));
                }
                _ => {
                    return invalid(format!(
                        "api_keys[{i}] needs exactly one of key_sha256 (64 hex digits) or key"
                    ));
                }
            }
        }
        if let Some(tenant) = &self.open_tenant
            && let Err(e) = TenantId::new(tenant.clone())
        {
            return invalid(format!("open_tenant: {e}"));
        }
        let prefix = &self.comfy_api_prefix;
        let reserved = ["/v1", "/api", "/ui", "/docs"];
        if !prefix.is_empty()
            && (!prefix.starts_with('/')
                || prefix.ends_with('/')
                || prefix.contains("//")
                || prefix.contains(['{', '}', '*'])
                || reserved
                    .iter()
                    .any(|r| prefix == r || prefix.starts_with(&format!("{r}/"))))
        {
            return invalid(format!(
                "comfy_api_prefix must be empty or a path like /comfyui (not under /v1, /api, /ui, /docs): {prefix:?}"
            ));
        }
        if self.max_body_bytes < 1024 {
            return invalid("max_body_bytes must be at least 1024".to_owned());
        }
        if self.rate_limit_per_s > 0 && self.rate_limit_burst == 0 {
            return invalid("rate_limit_burst must be at least 1".to_owned());
        }
        if self.max_inputs == 0 || self.max_nodes == 0 {
            return invalid("max_inputs and max_nodes must be at least 1".to_owned());
        }
        if self.default_timeout_s == 0 || self.default_timeout_s > self.max_timeout_s {
            return invalid("default_timeout_s must be between 1 and max_timeout_s".to_owned());
        }
        Ok(())
    }
}
