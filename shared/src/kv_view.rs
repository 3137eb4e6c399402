//! Keeping an in-memory view of a KV bucket: one long-lived watch (history
//! first, then live changes), re-opened after errors, until shutdown.

use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Calls `apply` with every entry of `bucket` (the latest of each key, then
/// every change) until `shutdown`; `caught_up` once the history is replayed.
/// Reading a view kept this way costs nothing, where listing the bucket per
/// request would open a consumer per request.
pub async fn follow(
    bucket: kv::Store,
    what: &str,
    shutdown: CancellationToken,
    mut apply: impl FnMut(&kv::Entry),
    mut caught_up: impl FnMut(),
) {
    while !shutdown.is_cancelled() {
        let watch = match bucket.watch_with_history(">").await {
            Ok(watch) => watch,
            Err(error) => {
                tracing::warn!(%error, "cannot watch {what}; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut watch = std::pin::pin!(watch.take_until(shutdown.cancelled()));
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else { break };
            apply(&entry);
            if entry.delta == 0 {
                caught_up();
            }
        }
    }
}
