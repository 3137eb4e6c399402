//! Connecting to NATS with the options every service wants.

use crate::config::NatsConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
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
    let urls: Vec<&str> = config.url.split(',').map(str::trim).collect();
    options
        .connect(urls)
        .await
        .map_err(|source| ConnectError::Connect {
            url: config.url.clone(),
            source,
        })
}

/// A JetStream context with comfyq's timeouts.
pub fn jetstream(client: async_nats::Client) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(client)
}
