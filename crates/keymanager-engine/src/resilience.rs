//! Retries, rate limiting and call counting around backend calls, written once.
//!
//! - [`RetryPolicy`]: transient failures (`Unavailable`, `ResourceExhausted`) are retried with
//!   full-jitter exponential backoff, bounded in attempts and in total time so a call always
//!   ends inside SPIRE's 30-second RPC deadline.
//! - [`RateLimiter`]: a token bucket; a burst queues instead of becoming a throttling storm.
//!   The lock is held only to reserve a slot, never while waiting.
//! - [`CallStats`]: backend calls, failures and throttles per operation, for logs, metrics
//!   and benchmarks.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::{BackendError, BackendErrorKind};

/// How transient backend failures are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, including the first (1 = no retry).
    pub max_attempts: u32,
    /// Backoff ceiling before the first retry; doubles per retry.
    pub initial_backoff: Duration,
    /// Largest single backoff.
    pub max_backoff: Duration,
    /// No retry starts after this much time since the first attempt.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    /// 6 attempts, 100 ms doubling to 5 s, within 20 s: well inside SPIRE's 30 s deadline.
    fn default() -> Self {
        Self {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            budget: Duration::from_secs(20),
        }
    }
}

/// Whether a failure is worth retrying.
pub fn is_transient(kind: BackendErrorKind) -> bool {
    matches!(
        kind,
        BackendErrorKind::Unavailable | BackendErrorKind::ResourceExhausted
    )
}

/// Runs `call` until it succeeds, fails permanently, or the policy is exhausted. Only use it
/// for idempotent calls (signing, reads); never for key creation.
pub async fn with_retries<T, F, Fut>(
    policy: RetryPolicy,
    operation: &'static str,
    stats: &CallStats,
    mut call: F,
) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    let started = Instant::now();
    let mut attempt = 1;
    loop {
        stats.record_call(operation);
        let error = match call().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        stats.record_failure(operation, error.kind);
        let backoff = full_jitter(policy, attempt);
        let out_of_budget = started.elapsed() + backoff > policy.budget;
        if !is_transient(error.kind) || attempt >= policy.max_attempts || out_of_budget {
            return Err(error);
        }
        tracing::warn!(
            operation,
            attempt,
            backoff_ms = backoff.as_millis() as u64,
            error = %error,
            "transient backend failure; retrying"
        );
        tokio::time::sleep(backoff).await;
        attempt += 1;
    }
}

/// A uniformly random backoff in `[0, min(max, initial * 2^(attempt-1))]`.
fn full_jitter(policy: RetryPolicy, attempt: u32) -> Duration {
    let ceiling = policy
        .initial_backoff
        .saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1))
                .unwrap_or(u32::MAX),
        )
        .min(policy.max_backoff);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(random_u64() % (nanos + 1))
}

/// Jitter only needs to de-correlate callers, not resist prediction: hash the clock and a
/// per-process counter.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

/// A token bucket: `rate` permits per second, bursts up to `burst`.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    /// (tokens available, may go negative for reservations; when last refilled)
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A limiter allowing `per_second` permits per second with bursts of `burst`.
    pub fn new(per_second: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: per_second.max(f64::MIN_POSITIVE),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits for a permit. Callers are served in arrival order; the lock is released before
    /// waiting.
    pub async fn acquire(&self) {
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let refill = now.duration_since(state.1).as_secs_f64() * self.rate;
            state.0 = (state.0 + refill).min(self.burst);
            state.1 = now;
            state.0 -= 1.0;
            if state.0 >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-state.0 / self.rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Counts backend calls per operation.
#[derive(Default)]
pub struct CallStats {
    counters: Mutex<BTreeMap<&'static str, OperationStats>>,
}

/// Counts for one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OperationStats {
    /// Calls made to the backend (each retry counts).
    pub calls: u64,
    /// Calls that failed.
    pub failures: u64,
    /// Failures that were throttling (`ResourceExhausted`).
    pub throttles: u64,
}

impl CallStats {
    /// Records one backend call.
    pub fn record_call(&self, operation: &'static str) {
        self.with(operation, |s| s.calls += 1);
    }

    /// Records a failed call.
    pub fn record_failure(&self, operation: &'static str, kind: BackendErrorKind) {
        self.with(operation, |s| {
            s.failures += 1;
            if kind == BackendErrorKind::ResourceExhausted {
                s.throttles += 1;
            }
        });
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> BTreeMap<&'static str, OperationStats> {
        self.counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn with(&self, operation: &'static str, f: impl FnOnce(&mut OperationStats)) {
        f(self
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(operation)
            .or_default());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    use super::*;

    fn transient() -> BackendError {
        BackendError::new(BackendErrorKind::ResourceExhausted, "ThrottlingException")
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_until_success() {
        let stats = CallStats::default();
        let calls = AtomicU32::new(0);
        let result = with_retries(RetryPolicy::default(), "sign", &stats, || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                Err(transient())
            } else {
                Ok("signature")
            }
        })
        .await;
        assert_eq!(result.unwrap(), "signature");
        let sign = stats.snapshot()["sign"];
        assert_eq!((sign.calls, sign.failures, sign.throttles), (4, 3, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_are_not_retried() {
        let stats = CallStats::default();
        let err = with_retries(RetryPolicy::default(), "sign", &stats, || async {
            Err::<(), _>(BackendError::new(
                BackendErrorKind::PermissionDenied,
                "AccessDenied",
            ))
        })
        .await
        .unwrap_err();
        assert_eq!(err.kind, BackendErrorKind::PermissionDenied);
        assert_eq!(stats.snapshot()["sign"].calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_attempt_limit_and_inside_the_budget() {
        let stats = CallStats::default();
        let started = Instant::now();
        let policy = RetryPolicy::default();
        let err = with_retries(policy, "sign", &stats, || async {
            Err::<(), _>(transient())
        })
        .await
        .unwrap_err();
        assert_eq!(err.kind, BackendErrorKind::ResourceExhausted);
        assert!(stats.snapshot()["sign"].calls <= u64::from(policy.max_attempts));
        assert!(
            started.elapsed() <= policy.budget,
            "{:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "must end inside SPIRE's deadline"
        );
    }

    #[test]
    fn jitter_stays_under_the_exponential_ceiling() {
        let policy = RetryPolicy::default();
        for attempt in 1..=40 {
            let ceiling =
                (policy.initial_backoff * 2u32.saturating_pow(attempt - 1)).min(policy.max_backoff);
            for _ in 0..50 {
                assert!(full_jitter(policy, attempt) <= ceiling);
            }
        }
        let no_backoff = RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            budget: Duration::ZERO,
        };
        assert_eq!(full_jitter(no_backoff, 3), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_lets_a_burst_through_then_paces_callers() {
        let limiter = Arc::new(RateLimiter::new(10.0, 5));
        let started = Instant::now();
        for _ in 0..5 {
            limiter.acquire().await;
        }
        assert!(
            started.elapsed() < Duration::from_millis(1),
            "the burst is immediate"
        );
        let mut waiters = Vec::new();
        for _ in 0..10 {
            let limiter = limiter.clone();
            waiters.push(tokio::spawn(async move { limiter.acquire().await }));
        }
        for waiter in waiters {
            waiter.await.unwrap();
        }
        // 10 more permits at 10/s take about a second.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(990) && elapsed <= Duration::from_millis(1100),
            "{elapsed:?}"
        );
    }
}
