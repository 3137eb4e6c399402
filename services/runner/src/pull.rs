//! Long-lived pull requests on the pool's dispatch consumer.
//!
//! A runner with a free slot keeps one pull request (one message, `expires`
//! = `pull_expires`) waiting at the server, renewed when it expires or
//! brings a message. Waiting requests are what NATS priority groups rank
//! (`prioritized`: lowest `priority` first; `overflow`: `min_pending`), and
//! an idle fleet costs one request per runner per `pull_expires`, not a
//! stream of no-wait fetches.
//!
//! A request is never abandoned while the server may still answer it: a
//! message it brings when the runner cannot take it (paused, ComfyUI not
//! ready, shutting down) goes back at once (`Nak`), so another waiting
//! runner gets it instead of it waiting out `ack_wait`. Each request has
//! its own reply subject, so a late status (408/409) of an earlier one is
//! told apart. On shutdown the reply subscription is drained: once the
//! server has seen the unsubscribe it drops the waiting request (no
//! interest left), and what it sent before that still arrives and goes
//! back, so stopping does not wait for the request's expiry.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::{self, AckKind, Message};
use async_nats::{StatusCode, Subscriber};
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Beyond a request's `expires`, how long to wait for the server's 408
/// before counting the request as gone (a reconnect drops it silently).
const EXPIRY_MARGIN: Duration = Duration::from_secs(2);
/// Pause before a new request after the server refused one (409/503…).
const REFUSED_BACKOFF: Duration = Duration::from_secs(1);
/// On shutdown, how long to wait for the server to confirm the drain (it
/// does within a round trip; a connection that is down never does).
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// How a pull request is shaped: the priority-group fields by policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PullOptions {
    pub expires: Duration,
    /// Set with a priority policy on the consumer.
    pub group: Option<String>,
    /// `overflow`: served only while this many messages wait unpulled.
    pub min_pending: Option<usize>,
    /// `prioritized`: 0 is served first.
    pub priority: Option<usize>,
}

/// What [`DispatchPull::next`] ended with.
#[derive(Debug)]
pub enum Pulled {
    Message(Box<Message>),
    /// The runner cannot take work now (and no request is outstanding).
    Blocked,
    /// Shutting down (and no request is outstanding).
    Stopped,
}

/// One runner's pull requests on its pool's dispatch consumer.
#[allow(missing_debug_implementations)] // PullConsumer has no Debug
pub struct DispatchPull {
    consumer: PullConsumer,
    context: jetstream::Context,
    replies: Subscriber,
    inbox_prefix: String,
    options: PullOptions,
    /// Requests sent so far (the last one's reply subject ends with it).
    sent: u64,
    /// While a request may still be answered: until when we wait for it.
    outstanding: Option<Instant>,
}

impl DispatchPull {
    pub async fn new(
        consumer: PullConsumer,
        client: &async_nats::Client,
        context: jetstream::Context,
        options: PullOptions,
    ) -> Result<Self, async_nats::SubscribeError> {
        let inbox_prefix = client.new_inbox();
        let replies = client.subscribe(format!("{inbox_prefix}.*")).await?;
        Ok(Self {
            consumer,
            context,
            replies,
            inbox_prefix,
            options,
            sent: 0,
            outstanding: None,
        })
    }

    fn current_inbox(&self) -> String {
        format!("{}.{}", self.inbox_prefix, self.sent)
    }

    /// Waits for a dispatch message with one request waiting at a time.
    /// `can_take` is asked before a request is sent and when a message
    /// arrives. On `shutdown` an outstanding request is withdrawn (what it
    /// brought goes back) before [`Pulled::Stopped`]; no request is sent
    /// after that.
    pub async fn next(
        &mut self,
        shutdown: &CancellationToken,
        can_take: impl Fn() -> bool,
    ) -> Pulled {
        loop {
            let stopping = shutdown.is_cancelled();
            let Some(deadline) = self.outstanding else {
                if stopping {
                    return Pulled::Stopped;
                }
                if !can_take() {
                    return Pulled::Blocked;
                }
                self.send().await;
                continue;
            };
            if stopping {
                self.withdraw(deadline).await;
                return Pulled::Stopped;
            }
            let reply = tokio::select! {
                _ = shutdown.cancelled() => continue,
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::debug!("pull request unanswered past its expiry; renewing");
                    self.outstanding = None;
                    continue;
                }
                reply = self.replies.next() => reply,
            };
            let Some(reply) = reply else {
                // The connection is closed for good: nothing more will come.
                self.outstanding = None;
                return Pulled::Stopped;
            };
            let current = reply.subject.as_str() == self.current_inbox();
            match reply.status {
                None | Some(StatusCode::OK) => {
                    // A message carries its stream subject, not the reply
                    // subject: it answers the outstanding request.
                    let current = self.outstanding.is_some();
                    let message = Message {
                        message: reply,
                        context: self.context.clone(),
                    };
                    if current {
                        // A request for one message is done once it brought one.
                        self.outstanding = None;
                    }
                    if current && !stopping && can_take() {
                        return Pulled::Message(Box::new(message));
                    }
                    // Another runner may be waiting for it.
                    if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
                        tracing::warn!(%error, "could not hand back a message pulled while unable to take it");
                    } else {
                        tracing::debug!("handed back a message pulled while unable to take it");
                    }
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(StatusCode::TIMEOUT) if current => self.outstanding = None,
                Some(status) if current => {
                    tracing::debug!(%status, description = ?reply.description, "pull request refused");
                    self.outstanding = None;
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(REFUSED_BACKOFF) => {}
                    }
                }
                // The end of an earlier request we had given up on.
                Some(_) => {}
            }
        }
    }

    /// Drains the reply subscription: the server drops the waiting request
    /// once it has processed the unsubscribe, and every message it sent
    /// before that is read here and handed back.
    async fn withdraw(&mut self, deadline: Instant) {
        self.outstanding = None;
        if let Err(error) = self.replies.drain().await {
            // The connection is gone, and the request with it.
            tracing::debug!(%error, "could not drain the pull subscription");
            return;
        }
        let limit = deadline.min(Instant::now() + DRAIN_LIMIT);
        loop {
            let reply = match tokio::time::timeout_at(limit, self.replies.next()).await {
                Ok(Some(reply)) => reply,
                // Drained (the server confirmed), or no confirmation in time.
                Ok(None) | Err(_) => return,
            };
            if matches!(reply.status, None | Some(StatusCode::OK)) {
                let message = Message {
                    message: reply,
                    context: self.context.clone(),
                };
                match message.ack_with(AckKind::Nak(None)).await {
                    Ok(()) => tracing::debug!("handed back a message pulled while stopping"),
                    Err(error) => {
                        tracing::warn!(%error, "could not hand back a message pulled while stopping");
                    }
                }
            }
        }
    }

    async fn send(&mut self) {
        self.sent += 1;
        let request = BatchConfig {
            batch: 1,
            expires: Some(self.options.expires),
            no_wait: false,
            max_bytes: 0,
            idle_heartbeat: Duration::ZERO,
            min_pending: self.options.min_pending,
            min_ack_pending: None,
            group: self.options.group.clone(),
            priority: self.options.priority,
        };
        // Counted as outstanding even if sending failed: a request the
        // client buffered may still reach the server.
        self.outstanding = Some(Instant::now() + self.options.expires + EXPIRY_MARGIN);
        if let Err(error) = self
            .consumer
            .request_batch(request, self.current_inbox().into())
            .await
        {
            tracing::warn!(%error, "pull request failed");
        }
    }
}
