//! The dispatcher lease: one KV key that names the scheduler allowed to
//! dispatch. The holder renews it with compare-and-set; a standby takes it
//! over once it has seen the same revision for a whole `ttl` (measured on
//! its own clock, so clock skew between machines does not matter).
//!
//! The lease keeps dispatch single-threaded in the common case; it is not
//! what makes dispatch safe. A paused holder that wakes after losing the
//! lease can at worst publish a dispatch the new holder also publishes:
//! both carry `Nats-Msg-Id` = `<job>:1` (deduplicated) and the record's
//! compare-and-set lets only one `Dispatch` transition through.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, Operation};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct Lease {
    pub kv: kv::Store,
    pub key: String,
    /// This scheduler's name, written as the value.
    pub holder: String,
    pub ttl: Duration,
}

impl Lease {
    /// Waits until this scheduler holds the lease; returns its revision, or
    /// `None` on shutdown.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> Option<u64> {
        let mut seen: Option<(u64, Instant)> = None;
        loop {
            match self.try_acquire(&mut seen).await {
                Ok(Some(revision)) => return Some(revision),
                Ok(None) => {}
                Err(error) => tracing::debug!(%error, "lease not readable yet"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(self.ttl / 5) => {}
            }
        }
    }

    async fn try_acquire(
        &self,
        seen: &mut Option<(u64, Instant)>,
    ) -> Result<Option<u64>, async_nats::Error> {
        let entry = self.kv.entry(&self.key).await?;
        let free = entry
            .as_ref()
            .is_none_or(|e| matches!(e.operation, Operation::Delete | Operation::Purge));
        if free {
            return Ok(self
                .kv
                .create(&self.key, self.holder.clone().into())
                .await
                .ok());
        }
        let Some(entry) = entry else { return Ok(None) };
        let ours = entry.value.as_ref() == self.holder.as_bytes();
        let stale = match *seen {
            Some((revision, since)) if revision == entry.revision => since.elapsed() >= self.ttl,
            _ => {
                *seen = Some((entry.revision, Instant::now()));
                false
            }
        };
        if ours || stale {
            if !ours {
                tracing::warn!(previous = %String::from_utf8_lossy(&entry.value), "dispatcher lease not renewed; taking over");
            }
            return Ok(self
                .kv
                .update(&self.key, self.holder.clone().into(), entry.revision)
                .await
                .ok());
        }
        Ok(None)
    }

    /// Renews the lease every `ttl / 4` until `stop`; cancels `lost` (and
    /// returns) once it is taken over or cannot be renewed for `ttl / 2`,
    /// well before a standby may take it.
    pub async fn keep(&self, mut revision: u64, lost: CancellationToken, stop: CancellationToken) {
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.ttl / 4) => {}
            }
            match self
                .kv
                .update(&self.key, self.holder.clone().into(), revision)
                .await
            {
                Ok(next) => {
                    revision = next;
                    renewed = Instant::now();
                }
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!("dispatcher lease taken by another scheduler");
                    lost.cancel();
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "dispatcher lease not renewed");
                    if renewed.elapsed() >= self.ttl / 2 {
                        lost.cancel();
                        return;
                    }
                }
            }
        }
    }

    /// Gives the lease up at shutdown so a standby takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(entry)) = self.kv.entry(&self.key).await
            && entry.value.as_ref() == self.holder.as_bytes()
        {
            let _ = self
                .kv
                .delete_expect_revision(&self.key, Some(entry.revision))
                .await;
        }
    }
}
