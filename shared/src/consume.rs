//! Running a durable pull consumer: one handler call per message, its
//! outcome mapped to exactly one acknowledgement, the pull stream recreated
//! after errors (for example while the NATS server restarts).

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message, consumer::PullConsumer};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// What to tell JetStream about a handled message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done; never deliver again.
    Ack,
    /// Not now; deliver again after the delay (immediately when `None`).
    Retry(Option<Duration>),
    /// Cannot ever be handled (malformed); stop delivering it.
    Reject,
}

impl From<Outcome> for AckKind {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Ack => AckKind::Ack,
            Outcome::Retry(delay) => AckKind::Nak(delay),
            Outcome::Reject => AckKind::Term,
        }
    }
}

/// Feeds every message of `consumer` to `handle`, up to `concurrency` at a
/// time, until `shutdown`. Messages in flight at shutdown are finished first.
pub async fn run_consumer<F, Fut>(
    name: &str,
    consumer: PullConsumer,
    concurrency: usize,
    shutdown: CancellationToken,
    handle: F,
) where
    F: Fn(Message) -> Fut + Clone,
    Fut: Future<Output = ()>,
{
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(consumer = name, %error, "cannot open pull stream; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let handle = handle.clone();
        messages
            .take_until(shutdown.cancelled())
            .filter_map(|message| async move {
                match message {
                    Ok(message) => Some(message),
                    Err(error) => {
                        tracing::debug!(consumer = name, %error, "pull stream error");
                        None
                    }
                }
            })
            .for_each_concurrent(concurrency, handle)
            .await;
    }
}

/// Sends the acknowledgement for `outcome`; a failure only means the message
/// will be redelivered, which every handler tolerates.
pub async fn acknowledge(message: &Message, outcome: Outcome) {
    if let Err(error) = message.ack_with(outcome.into()).await {
        tracing::warn!(%error, subject = %message.subject, "acknowledgement failed; message will be redelivered");
    }
}
