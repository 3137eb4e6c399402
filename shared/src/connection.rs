//! Connecting to NATS with the options every service wants.

use std::sync::{Arc, Mutex};

use async_nats::Statistics;

use crate::config::NatsConfig;

/// Every connection this process opened through [`connect`], by service, so
/// a load test running the services in-process can count the NATS messages
/// each service sends and receives per job.
static CONNECTIONS: Mutex<Vec<(String, Arc<Statistics>)>> = Mutex::new(Vec::new());

/// Messages sent and received by one service's connections (summed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageCounts {
    pub sent: u64,
    pub received: u64,
}

/// Messages so far per service (`ingress`, `scheduler`, `runner`, …) over
/// every connection this process opened, including closed ones.
pub fn message_counts() -> Vec<(String, MessageCounts)> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut totals: std::collections::BTreeMap<String, MessageCounts> = Default::default();
    if let Ok(connections) = CONNECTIONS.lock() {
        for (service, stats) in connections.iter() {
            let total = totals.entry(service.clone()).or_default();
            total.sent += stats.out_messages.load(Relaxed);
            total.received += stats.in_messages.load(Relaxed);
        }
    }
    totals.into_iter().collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the NATS nkey seed file {path}: {source}")]
    NkeySeed {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

/// Connects (reconnecting forever after the first success) and names the
/// connection after the service so it shows in the server's monitoring.
pub async fn connect(
    config: &NatsConfig,
    service: &str,
) -> Result<async_nats::Client, ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("comfyq-{service}"))
        .connection_timeout(config.connect_timeout)
        .ping_interval(config.ping_interval)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        });
    if let Some(path) = &config.credentials_file {
        options =
            options
                .credentials_file(path)
                .await
                .map_err(|source| ConnectError::Credentials {
                    path: path.clone(),
                    source,
                })?;
    }
    if let Some(path) = &config.nkey_seed_file {
        let seed = std::fs::read_to_string(path).map_err(|source| ConnectError::NkeySeed {
            path: path.clone(),
            source,
        })?;
        options = options.nkey(seed.trim().to_owned());
    }
    if let Some(prefix) = &config.inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    let tls = &config.tls;
    if tls.is_set() {
        crate::media::ensure_tls_provider();
        options = options.require_tls(true);
    }
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.into());
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        options = options.add_client_certificate(cert.into(), key.into());
    }
    let urls: Vec<&str> = config.url.split(',').map(str::trim).collect();
    let client = options
        .connect(urls)
        .await
        .map_err(|source| ConnectError::Connect {
            url: config.url.clone(),
            source,
        })?;
    if let Ok(mut connections) = CONNECTIONS.lock() {
        connections.push((service.to_owned(), client.statistics()));
    }
    Ok(client)
}

/// A JetStream context with comfyq's timeouts.
pub fn jetstream(client: async_nats::Client) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(client)
}
