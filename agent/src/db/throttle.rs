//! Rate limits that leave the source its headroom: bytes per second for the
//! copy, rows per second for the drain, each shared by all workers of its
//! phase (the limit is the aggregate, not per worker).

use std::num::NonZeroU32;
use std::time::Instant;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// A shared rate limit, or none.
#[derive(Debug)]
pub struct Throttle {
    limiter: Option<(DefaultDirectRateLimiter, u32)>,
    kind: &'static str,
}

impl Throttle {
    /// At most `per_second` units a second (`None`: unlimited). The burst is
    /// a twentieth of a second's worth, so a run of a few seconds stays
    /// within a few percent of the limit.
    pub fn per_second(per_second: Option<u64>, kind: &'static str) -> Self {
        let limiter = per_second.and_then(|rate| {
            let rate = u32::try_from(rate).unwrap_or(u32::MAX);
            let burst = NonZeroU32::new((rate / 20).max(1))?;
            let quota = Quota::per_second(NonZeroU32::new(rate)?).allow_burst(burst);
            Some((RateLimiter::direct(quota), burst.get()))
        });
        Self { limiter, kind }
    }

    /// No limit.
    pub fn unlimited() -> Self {
        Self::per_second(None, "none")
    }

    /// Waits until `n` units may pass. Larger requests than the burst wait
    /// in burst-sized steps (governor refuses them whole).
    pub async fn take(&self, n: u64) {
        let Some((limiter, burst)) = &self.limiter else {
            return;
        };
        let started = Instant::now();
        let mut left = n;
        while left > 0 {
            let step = left.min(u64::from(*burst)) as u32;
            if let Some(step) = NonZeroU32::new(step) {
                // Cannot fail: step <= burst.
                let _ = limiter.until_n_ready(step).await;
            }
            left -= u64::from(step);
        }
        crate::telemetry::throttled(self.kind, started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_the_rate_within_a_few_percent() {
        let t = Throttle::per_second(Some(20_000), "copy");
        let started = Instant::now();
        for _ in 0..60 {
            t.take(1_000).await;
        }
        let rate = 60_000.0 / started.elapsed().as_secs_f64();
        assert!(rate <= 20_000.0 * 1.05, "{rate} units/s");
        assert!(rate >= 20_000.0 * 0.8, "{rate} units/s");
    }

    #[tokio::test]
    async fn requests_larger_than_the_burst_pass() {
        let t = Throttle::per_second(Some(100_000), "sync");
        t.take(50_000).await;
        Throttle::unlimited().take(u64::MAX).await;
    }
}
