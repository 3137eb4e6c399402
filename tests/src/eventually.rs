//! Polling with a deadline: the replacement for `sleep` in tests.

use std::time::Duration;

use tokio::time::Instant;

/// Interval between two polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Some`, and returns the
/// value. Panics with `what` and the elapsed time if `timeout` passes first
/// (an attempt still running at the deadline is abandoned).
///
/// ```no_run
/// # async fn demo(sink: &comfyq_tests::WebhookSink) {
/// use std::time::Duration;
/// let first = comfyq_tests::eventually(Duration::from_secs(5), "a webhook", async || {
///     sink.requests().into_iter().next()
/// })
/// .await;
/// # }
/// ```
pub async fn eventually<F, T>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: AsyncFnMut() -> Option<T>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut attempts: u64 = 0;
    loop {
        attempts += 1;
        match tokio::time::timeout_at(deadline, f()).await {
            Ok(Some(value)) => return value,
            Ok(None) => {}
            Err(_elapsed) => break,
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep_until((now + POLL_INTERVAL).min(deadline)).await;
    }
    panic!(
        "timed out waiting for {what} after {:?} ({attempts} attempts, timeout {timeout:?})",
        start.elapsed()
    );
}

/// Polls the boolean condition `f` until it is true; see [`eventually`].
pub async fn eventually_true<F>(timeout: Duration, what: &str, mut f: F)
where
    F: AsyncFnMut() -> bool,
{
    eventually(timeout, what, async || f().await.then_some(())).await;
}

/// Waits until a boolean expression (which may contain `.await`) is true,
/// panicking with the expression's text after the timeout.
///
/// ```no_run
/// # async fn demo(sink: &comfyq_tests::WebhookSink) {
/// use std::time::Duration;
/// comfyq_tests::assert_eventually!(Duration::from_secs(5), sink.requests().len() == 2);
/// comfyq_tests::assert_eventually!(Duration::from_secs(5), sink.requests().len() == 2, "two webhooks");
/// # }
/// ```
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $cond:expr $(,)?) => {
        $crate::eventually::eventually_true($timeout, ::core::stringify!($cond), async || $cond)
            .await
    };
    ($timeout:expr, $cond:expr, $what:expr $(,)?) => {
        $crate::eventually::eventually_true($timeout, $what, async || $cond).await
    };
}
