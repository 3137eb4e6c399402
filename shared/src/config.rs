//! Typed, layered configuration: defaults, then an optional TOML file, then
//! `COMFYQ_`-prefixed environment variables (`__` separates nested keys, so
//! `COMFYQ_NATS__URL` sets `nats.url`). Validated before anything binds.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::names::Names;

pub const ENV_PREFIX: &str = "COMFYQ_";

/// `COMFYQ_` variables that are not settings: the configuration file's path,
/// the log format, and the command line's server and key.
const NOT_SETTINGS: [&str; 4] = ["config", "log_format", "url", "api_key"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        // figment's message names the key and where its value came from.
        ConfigError::Invalid(error.to_string())
    }
}

/// A configuration section that can check itself after loading.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Loads `T` from defaults, `file` (if given; it must exist) and the environment.
pub fn load<T>(file: Option<&Path>) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default + Validate,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(file) = file {
        if !file.exists() {
            return Err(ConfigError::MissingFile(file.display().to_string()));
        }
        figment = figment.merge(Toml::file(file));
    }
    let config: T = figment
        .merge(Env::prefixed(ENV_PREFIX).ignore(&NOT_SETTINGS).split("__"))
        .extract()?;
    config.validate()?;
    Ok(config)
}

/// Where job media (inputs and outputs) live, and how much of it a job may have.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Backend by URL: `nats://` (the prefix's `<prefix>_media` bucket) or
    /// `nats://<bucket>`, `s3://<bucket>/<prefix>` (credentials and endpoint
    /// from the standard `AWS_*` environment variables), `file:///<path>`,
    /// `memory://` (tests only: not shared between processes).
    pub url: String,
    /// Largest single object (input or output), in bytes.
    pub max_object_bytes: u64,
    /// Largest total of one job's inputs and outputs, in bytes.
    pub max_job_bytes: u64,
    /// With S3: answer output downloads with a `307` to a URL presigned for
    /// this long instead of streaming through ingress. Unset: stream.
    #[serde(with = "humantime_serde")]
    pub presign_ttl: Option<Duration>,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            url: "nats://".to_owned(),
            max_object_bytes: 2 * 1024 * 1024 * 1024,
            max_job_bytes: 8 * 1024 * 1024 * 1024,
            presign_ttl: None,
        }
    }
}

impl Validate for MediaConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        crate::media::MediaUrl::parse(&self.url)
            .map_err(|e| ConfigError::Invalid(format!("media.url: {e}")))?;
        if self.max_object_bytes == 0 || self.max_job_bytes < self.max_object_bytes {
            return Err(ConfigError::Invalid(
                "media.max_object_bytes must be at least 1 and at most media.max_job_bytes"
                    .to_owned(),
            ));
        }
        if self.presign_ttl.is_some_and(|t| t < Duration::from_secs(1)) {
            return Err(ConfigError::Invalid(
                "media.presign_ttl must be at least 1s".to_owned(),
            ));
        }
        Ok(())
    }
}

/// How to reach NATS and how to lay out what comfyq keeps there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma separated.
    pub url: String,
    /// Prefix of every subject, stream and bucket.
    pub prefix: String,
    /// Replicas of every stream and bucket (3 in a production cluster).
    pub replicas: usize,
    /// Optional credentials file (NATS decentralized auth).
    pub credentials_file: Option<String>,
    /// File holding this identity's nkey seed (`SU…`), as `comfyq
    /// nats-config` writes one per service for the server config it makes.
    pub nkey_seed_file: Option<String>,
    /// Prefix of this connection's reply subjects (`_INBOX` if unset). With
    /// least-privilege users each identity has its own, so no other
    /// identity may subscribe to its replies.
    pub inbox_prefix: Option<String>,
    /// Create or update streams, buckets and consumers at start (`true`), or
    /// only check that they exist (`false`: an identity without the rights
    /// to change them; `comfyq provision` creates them with the admin one).
    pub provision: bool,
    /// TLS to the server (also used when a URL is `tls://`).
    pub tls: NatsTlsConfig,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How often the client pings its server. A server that stops answering
    /// without closing the connection (frozen, partitioned) is left after
    /// about three intervals, for another node of the cluster.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long job events stay replayable.
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    /// How long job records stay readable.
    #[serde(with = "humantime_serde")]
    pub jobs_max_age: Duration,
    /// How long inputs and outputs are kept.
    #[serde(with = "humantime_serde")]
    pub media_max_age: Duration,
    /// How long a runner's registration lives without a heartbeat.
    #[serde(with = "humantime_serde")]
    pub runner_ttl: Duration,
    /// Redelivery deadline of a dispatched job without an in-progress ack.
    #[serde(with = "humantime_serde")]
    pub dispatch_ack_wait: Duration,
    /// Deliveries of one dispatch message before the job is dead-lettered.
    pub dispatch_max_deliver: i64,
    /// NATS priority-group policy of the dispatch consumers: `none`;
    /// `overflow` (server 2.11+) so burst runners (`burst_min_pending`) pull
    /// only while a backlog waits; or `prioritized` (server 2.12+) so the
    /// waiting runner with the lowest `dispatch_priority` is served first.
    /// Runners apply it to their pool's consumer, so all runners of a pool
    /// must agree.
    pub dispatch_priority_policy: DispatchPriorityPolicy,
}

/// TLS settings of the NATS connection. TLS is used when any is set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsTlsConfig {
    /// Refuse a server that does not offer TLS.
    pub required: bool,
    /// PEM file of the CA(s) that signed the server's certificate (the
    /// system's roots when unset).
    pub ca_file: Option<String>,
    /// PEM client certificate, for a server that verifies clients (with `key_file`).
    pub cert_file: Option<String>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<String>,
}

impl NatsTlsConfig {
    /// Whether any TLS setting is given.
    pub fn is_set(&self) -> bool {
        self.required || self.ca_file.is_some() || self.cert_file.is_some()
    }
}

/// See [`NatsConfig::provision`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provisioning {
    /// Create what is missing, update what changed.
    CreateOrUpdate,
    /// Only look up what must exist; fail clearly when it does not.
    CheckOnly,
}

/// See [`NatsConfig::dispatch_priority_policy`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchPriorityPolicy {
    #[default]
    None,
    Overflow,
    Prioritized,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            prefix: "comfyq".to_owned(),
            replicas: 1,
            credentials_file: None,
            nkey_seed_file: None,
            inbox_prefix: None,
            provision: true,
            tls: NatsTlsConfig::default(),
            connect_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(2),
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            jobs_max_age: Duration::from_secs(30 * 24 * 3600),
            media_max_age: Duration::from_secs(7 * 24 * 3600),
            runner_ttl: Duration::from_secs(30),
            dispatch_ack_wait: Duration::from_secs(30),
            dispatch_max_deliver: 5,
            dispatch_priority_policy: DispatchPriorityPolicy::None,
        }
    }
}

impl NatsConfig {
    pub fn names(&self) -> Result<Names, ConfigError> {
        Names::new(&self.prefix).map_err(|e| ConfigError::Invalid(format!("nats.prefix: {e}")))
    }

    /// What this identity does with streams and consumers at start.
    pub fn provisioning(&self) -> Provisioning {
        if self.provision {
            Provisioning::CreateOrUpdate
        } else {
            Provisioning::CheckOnly
        }
    }
}

impl Validate for NatsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.names()?;
        if self.url.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "nats.url must not be empty".to_owned(),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(ConfigError::Invalid(format!(
                "nats.replicas must be 1 to 5 (got {})",
                self.replicas
            )));
        }
        if self.dispatch_ack_wait < Duration::from_secs(2) {
            return Err(ConfigError::Invalid(
                "nats.dispatch_ack_wait must be at least 2s".to_owned(),
            ));
        }
        if self.dispatch_max_deliver < 1 {
            return Err(ConfigError::Invalid(
                "nats.dispatch_max_deliver must be at least 1".to_owned(),
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(ConfigError::Invalid(
                "nats.tls.cert_file and nats.tls.key_file go together".to_owned(),
            ));
        }
        for (name, file) in [
            ("nkey_seed_file", &self.nkey_seed_file),
            ("credentials_file", &self.credentials_file),
            ("tls.ca_file", &self.tls.ca_file),
            ("tls.cert_file", &self.tls.cert_file),
            ("tls.key_file", &self.tls.key_file),
        ] {
            if let Some(file) = file
                && !Path::new(file).is_file()
            {
                return Err(ConfigError::Invalid(format!(
                    "nats.{name}: {file} is not a readable file"
                )));
            }
        }
        if let Some(prefix) = &self.inbox_prefix
            && (prefix.is_empty()
                || prefix.contains(['*', '>', ' '])
                || prefix.split('.').any(str::is_empty))
        {
            return Err(ConfigError::Invalid(format!(
                "nats.inbox_prefix must be a subject without wildcards (got {prefix:?})"
            )));
        }
        for (name, age) in [
            ("events_max_age", self.events_max_age),
            ("jobs_max_age", self.jobs_max_age),
            ("media_max_age", self.media_max_age),
            ("runner_ttl", self.runner_ttl),
        ] {
            if age < Duration::from_secs(1) {
                return Err(ConfigError::Invalid(format!(
                    "nats.{name} must be at least 1s"
                )));
            }
        }
        Ok(())
    }
}

/// A secret from configuration that never shows up in logs or debug output.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct Sample {
        nats: NatsConfig,
    }
    impl Validate for Sample {
        fn validate(&self) -> Result<(), ConfigError> {
            self.nats.validate()
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's test API returns its own error type
    fn file_then_env_and_bad_values_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[nats]\nurl = \"nats://file:4222\"\nreplicas = 3\n",
            )?;
            let loaded: Sample = load(Some(Path::new("c.toml"))).expect("loads");
            assert_eq!(loaded.nats.url, "nats://file:4222");
            assert_eq!(loaded.nats.replicas, 3);

            jail.set_env("COMFYQ_NATS__URL", "nats://env:4222");
            let loaded: Sample = load(Some(Path::new("c.toml"))).expect("loads");
            assert_eq!(loaded.nats.url, "nats://env:4222");

            jail.set_env("COMFYQ_NATS__REPLICAS", "9");
            let error = load::<Sample>(None).expect_err("replicas out of range");
            assert!(error.to_string().contains("nats.replicas"), "{error}");

            jail.set_env("COMFYQ_NATS__REPLICAS", "many");
            let error = load::<Sample>(None).expect_err("not a number");
            assert!(
                error.to_string().to_lowercase().contains("replicas"),
                "{error}"
            );
            Ok(())
        });
        assert!(matches!(
            load::<Sample>(Some(Path::new("/nonexistent.toml"))),
            Err(ConfigError::MissingFile(_))
        ));
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Strict {
        nats: NatsConfig,
    }
    impl Validate for Strict {
        fn validate(&self) -> Result<(), ConfigError> {
            self.nats.validate()
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's test API returns its own error type
    fn variables_that_are_not_settings_are_not_refused() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("COMFYQ_CONFIG", "/etc/comfyq/ingress.toml");
            jail.set_env("COMFYQ_LOG_FORMAT", "json");
            jail.set_env("COMFYQ_URL", "http://127.0.0.1:8080");
            jail.set_env("COMFYQ_API_KEY", "k");
            let loaded: Strict = load(None).expect("loads");
            assert_eq!(loaded.nats.prefix, "comfyq");
            jail.set_env("COMFYQ_NO_SUCH_SETTING", "1");
            assert!(
                load::<Strict>(None).is_err(),
                "an unknown setting is refused"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's test API returns its own error type
    fn credentials_and_tls_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("ca.pem", "pem")?;
            jail.create_file("runner.nk", "SU")?;
            jail.set_env("COMFYQ_NATS__TLS__CA_FILE", "ca.pem");
            jail.set_env("COMFYQ_NATS__NKEY_SEED_FILE", "runner.nk");
            jail.set_env("COMFYQ_NATS__INBOX_PREFIX", "_INBOX_runner");
            jail.set_env("COMFYQ_NATS__PROVISION", "false");
            let loaded: Strict = load(None).expect("loads");
            assert!(loaded.nats.tls.is_set());
            assert_eq!(loaded.nats.provisioning(), Provisioning::CheckOnly);
            assert_eq!(loaded.nats.inbox_prefix.as_deref(), Some("_INBOX_runner"));

            jail.set_env("COMFYQ_NATS__TLS__CERT_FILE", "ca.pem");
            let error = load::<Strict>(None).expect_err("a certificate without its key");
            assert!(error.to_string().contains("key_file"), "{error}");
            jail.set_env("COMFYQ_NATS__TLS__KEY_FILE", "missing.pem");
            let error = load::<Strict>(None).expect_err("a missing key file");
            assert!(error.to_string().contains("missing.pem"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(***)");
    }
}
