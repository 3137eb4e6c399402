//! A bound on deliveries in flight per destination host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct HostLimits {
    per_host: usize,
    // A std mutex: held only to find or create a semaphore, never across an await.
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl HostLimits {
    pub fn new(per_host: usize) -> Self {
        Self {
            per_host: per_host.max(1),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for `host`, or `None` if none frees within `wait`.
    pub async fn acquire(&self, host: &str, wait: Duration) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut hosts = self.hosts.lock().ok()?;
            // Forget idle hosts now and then so the map cannot grow without bound.
            if hosts.len() > 10_000 {
                hosts.retain(|_, s| s.available_permits() < self.per_host);
            }
            hosts
                .entry(host.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_host)))
                .clone()
        };
        tokio::time::timeout(wait, semaphore.acquire_owned())
            .await
            .ok()?
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_host_is_bounded_others_are_not() {
        let limits = HostLimits::new(2);
        let wait = Duration::from_millis(20);
        let a1 = limits.acquire("a", wait).await;
        let a2 = limits.acquire("a", wait).await;
        assert!(a1.is_some() && a2.is_some());
        assert!(
            limits.acquire("a", wait).await.is_none(),
            "third slot for a"
        );
        assert!(
            limits.acquire("b", wait).await.is_some(),
            "b is independent"
        );
        drop(a1);
        assert!(limits.acquire("a", wait).await.is_some());
    }
}
