//! Per-tenant request rate limits (GCRA, from `governor`): each tenant has
//! its own bucket of `rate_limit_burst` requests refilled at
//! `rate_limit_per_s`. Limits are per ingress process.

use std::num::NonZeroU32;

use comfyq_shared::ids::TenantId;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::problem::Problem;

#[derive(Debug)]
pub struct RateLimiter {
    limiter: Option<DefaultKeyedRateLimiter<TenantId>>,
    clock: DefaultClock,
}

impl RateLimiter {
    /// `per_s == 0` means no limit.
    pub fn new(per_s: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(per_s).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            limiter,
            clock: DefaultClock::default(),
        }
    }

    /// `Ok` if the tenant may make one more request now, else a 429 with
    /// `Retry-After`.
    pub fn check(&self, tenant: &TenantId) -> Result<(), Problem> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(tenant).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            Problem::too_many(
                "rate-limited",
                format!(
                    "request rate limit exceeded; retry in {} ms",
                    wait.as_millis()
                ),
                wait.as_secs_f64().ceil() as u64,
            )
        })?;
        // Forget idle tenants now and then so the map stays small.
        if limiter.len() > 10_000 {
            limiter.retain_recent();
        }
        Ok(())
    }
}
