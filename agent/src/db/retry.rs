//! Retries with capped exponential backoff and jitter, for retryable errors only.
//!
//! Used for every DDL on the source (so a lock timeout means "try again later",
//! never "queue the application behind us") and for transient connection loss.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::config::SourceLimits;

/// Errors that know whether trying again may help.
pub trait Retryable {
    /// True when the same operation may succeed on a later attempt.
    fn is_retryable(&self) -> bool;
}

impl Retryable for tokio_postgres::Error {
    fn is_retryable(&self) -> bool {
        crate::db::errors::is_retryable(self)
    }
}

/// How many attempts and how long to wait between them.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts after the first one.
    pub retries: u32,
    /// First backoff.
    pub base: Duration,
    /// Largest backoff.
    pub cap: Duration,
}

impl RetryPolicy {
    /// The policy for source DDL, from the configured limits.
    pub fn from_limits(limits: &SourceLimits) -> Self {
        Self {
            retries: limits.lock_retries,
            base: Duration::from_millis(100),
            cap: Duration::from_millis(limits.retry_max_backoff_ms),
        }
    }

    /// The wait before attempt `attempt` (1-based), with full jitter on the
    /// upper half so that several agents or tables do not retry in lockstep.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
        let ceiling = exp.min(self.cap);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

/// The outcome of [`retry`] when it gives up.
#[derive(Debug)]
pub enum Gave<E> {
    /// The last error, after all attempts or because it was not retryable.
    Up(E),
    /// Cancellation arrived while waiting between attempts.
    Cancelled,
}

/// Runs `op` until it succeeds, fails with a non-retryable error, runs out of
/// attempts, or `cancel` fires between attempts (never during one). Failures
/// and retries are counted under `kind` (one of `telemetry::KINDS`).
pub async fn retry<T, E, F, Fut>(
    policy: RetryPolicy,
    kind: &'static str,
    what: &str,
    cancel: &CancellationToken,
    mut op: F,
) -> Result<T, Gave<E>>
where
    E: Retryable + std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && attempt < policy.retries => {
                crate::telemetry::failed(kind);
                crate::telemetry::retried(kind);
                attempt += 1;
                let wait = policy.backoff(attempt);
                tracing::info!(what, attempt, wait_ms = wait.as_millis() as u64, error = %crate::db::errors::report(&e), "Retrying");
                tokio::select! {
                    () = cancel.cancelled() => return Err(Gave::Cancelled),
                    () = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => {
                crate::telemetry::failed(kind);
                return Err(Gave::Up(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            retries: 10,
            base: Duration::from_millis(100),
            cap: Duration::from_millis(1000),
        };
        for attempt in 1..30 {
            let d = p.backoff(attempt);
            assert!(d <= Duration::from_millis(1000), "{attempt}: {d:?}");
        }
        let first = p.backoff(1);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        assert!(p.backoff(10) >= Duration::from_millis(500));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("e")]
    struct E(bool);
    impl Retryable for E {
        fn is_retryable(&self) -> bool {
            self.0
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_only_retryable_errors() {
        let p = RetryPolicy {
            retries: 3,
            base: Duration::from_millis(10),
            cap: Duration::from_millis(20),
        };
        let cancel = CancellationToken::new();
        let mut calls = 0;
        let r: Result<(), _> = retry(p, "ddl", "t", &cancel, || {
            calls += 1;
            async { Err(E(true)) }
        })
        .await;
        assert!(matches!(r, Err(Gave::Up(E(true)))));
        assert_eq!(calls, 4);
        let mut calls = 0;
        let r: Result<(), _> = retry(p, "ddl", "t", &cancel, || {
            calls += 1;
            async { Err(E(false)) }
        })
        .await;
        assert!(matches!(r, Err(Gave::Up(E(false)))));
        assert_eq!(calls, 1);
    }
}
