//! Retries, rate limiting and call counting around backend calls, written once.
//!
//! - [`RetryPolicy`]: transient failures (`Unavailable`, `ResourceExhausted`) are retried with
//!   jittered exponential backoff, bounded in total time (and attempts) so a call always ends
//!   inside SPIRE's 30-second RPC deadline.
//! - [`RateLimiter`]: a token bucket; a burst queues instead of becoming a throttling storm.
//!   The lock is held only to reserve a slot, never while waiting; the queue is bounded, a
//!   call that could not be served before its deadline is refused at once, and a caller that
//!   gives up returns its slot.
//! - [`AdaptiveLimiter`]: learns the store's quota from its throttling replies and paces
//!   signing calls below it (on by default; see [`adaptive`]).
//! - [`CallStats`]: backend calls, failures and throttles per operation, for logs, metrics
//!   and benchmarks.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::{BackendError, BackendErrorKind};

pub mod adaptive;

pub use adaptive::{AdaptiveDenied, AdaptiveLimiter, Permit, RateChange};

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
    /// 100 ms doubling to 5 s, within 20 s: well inside SPIRE's 30 s deadline. The time budget
    /// is the real bound; the attempt cap only stops a store that fails instantly from being
    /// hammered. Six attempts were too few: they could all fall inside a 1-second restart of
    /// the store (seen in the HA test), while twelve cover about 8 s of outage at the least.
    fn default() -> Self {
        Self {
            max_attempts: 12,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            budget: Duration::from_secs(20),
        }
    }
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
    let open = || std::future::ready(Ok::<(), Infallible>(()));
    match with_gated_retries(policy, operation, stats, open, |()| call()).await {
        Ok(value) => Ok(value),
        Err(Gated::Failed(error)) => Err(error),
        Err(Gated::Refused(never)) => match never {},
    }
}

/// Why [`with_gated_retries`] gave up.
#[derive(Debug)]
pub enum Gated<R> {
    /// The gate refused an attempt (e.g. the pacing queue could not meet the deadline).
    Refused(R),
    /// The last attempt failed.
    Failed(BackendError),
}

/// As [`with_retries`], with `gate` passed before every attempt (the first and each retry):
/// it may wait (pacing), refuse (no attempt is made; the refusal is returned), or let the
/// attempt through with a pass that `call` receives.
pub async fn with_gated_retries<T, P, R, G, GFut, F, Fut>(
    policy: RetryPolicy,
    operation: &'static str,
    stats: &CallStats,
    mut gate: G,
    mut call: F,
) -> Result<T, Gated<R>>
where
    G: FnMut() -> GFut,
    GFut: Future<Output = Result<P, R>>,
    F: FnMut(P) -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    let started = Instant::now();
    let mut attempt = 1;
    loop {
        let pass = gate().await.map_err(Gated::Refused)?;
        stats.record_call(operation);
        let error = match call(pass).await {
            Ok(value) => {
                stats.record_success(operation);
                return Ok(value);
            }
            Err(error) => error,
        };
        stats.record_failure(operation, error.kind);
        // A service that said when to come back (`Retry-After`) is not asked sooner.
        let backoff = jittered_backoff(policy, attempt).max(error.retry_after.unwrap_or_default());
        let out_of_budget = started.elapsed() + backoff > policy.budget;
        if !error.kind.is_transient() || attempt >= policy.max_attempts || out_of_budget {
            return Err(Gated::Failed(error));
        }
        tracing::warn!(
            operation,
            attempt,
            backoff_ms = backoff.as_millis() as u64,
            error = %error,
            "transient backend failure; retrying"
        );
        stats.record_retry(operation);
        tokio::time::sleep(backoff).await;
        attempt += 1;
    }
}

/// A backoff drawn uniformly from `[c/2, c]`, `c = min(max, initial * 2^(attempt-1))`
/// ("equal jitter"): callers are still spread out, but unlike full jitter the waits cannot
/// all come out near zero, so the retries reliably span an outage of several seconds.
fn jittered_backoff(policy: RetryPolicy, attempt: u32) -> Duration {
    let ceiling = policy
        .initial_backoff
        .saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1))
                .unwrap_or(u32::MAX),
        )
        .min(policy.max_backoff);
    let half = u64::try_from((ceiling / 2).as_nanos()).unwrap_or(u64::MAX);
    if half == 0 {
        return ceiling;
    }
    ceiling / 2 + Duration::from_nanos(random_u64() % (half + 1))
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

/// A token bucket: `rate` permits per second, bursts up to `burst`, and at most
/// `max_waiting` callers queued.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_waiting: usize,
    /// (tokens available, negative while callers wait for reserved slots; last refill)
    state: Mutex<(f64, Instant)>,
}

/// Why the limiter refused a caller at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimitDenied {
    /// `waiting` callers are queued already.
    QueueFull {
        /// Callers ahead.
        waiting: usize,
    },
    /// The caller would have to wait `wait`, longer than its `deadline`.
    PastDeadline {
        /// The wait the slot would need.
        wait: Duration,
        /// What the caller has left.
        deadline: Duration,
    },
}

impl RateLimiter {
    /// A limiter allowing `per_second` permits per second with bursts of `burst`; the queue
    /// holds at most 30 seconds' worth of callers (SPIRE's RPC deadline).
    pub fn new(per_second: f64, burst: u32) -> Self {
        let rate = per_second.max(f64::MIN_POSITIVE);
        Self::with_queue(rate, burst, (rate * 30.0).ceil().clamp(1.0, 1e6) as usize)
    }

    /// As [`RateLimiter::new`] with an explicit queue bound.
    pub fn with_queue(per_second: f64, burst: u32, max_waiting: usize) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: per_second.max(f64::MIN_POSITIVE),
            burst,
            max_waiting: max_waiting.max(1),
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits for a permit, in arrival order. Refused at once when the queue is full or the
    /// wait would outlast `deadline`. A caller dropped while waiting returns its slot.
    pub async fn acquire(&self, deadline: Option<Duration>) -> Result<(), RateLimitDenied> {
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let refill = now.duration_since(state.1).as_secs_f64() * self.rate;
            state.0 = (state.0 + refill).min(self.burst);
            state.1 = now;
            if state.0 >= 1.0 {
                state.0 -= 1.0;
                return Ok(());
            }
            let waiting = (-state.0).max(0.0).ceil() as usize;
            if waiting >= self.max_waiting {
                return Err(RateLimitDenied::QueueFull { waiting });
            }
            let wait = Duration::from_secs_f64((1.0 - state.0) / self.rate);
            if let Some(deadline) = deadline
                && wait > deadline
            {
                return Err(RateLimitDenied::PastDeadline { wait, deadline });
            }
            state.0 -= 1.0;
            wait
        };
        let mut slot = Reservation {
            limiter: self,
            held: true,
        };
        tokio::time::sleep(wait).await;
        slot.held = false;
        Ok(())
    }
}

/// A reserved slot; returned to the bucket if its caller gives up before using it.
struct Reservation<'a> {
    limiter: &'a RateLimiter,
    held: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.held {
            let mut state = self
                .limiter
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            state.0 = (state.0 + 1.0).min(self.limiter.burst);
        }
    }
}

/// Counts backend calls per operation. Counting is on the signing path of every call: a
/// read lock to find the operation's counters (written once per operation name) and
/// atomic increments, so concurrent calls never wait for each other here.
#[derive(Default)]
pub struct CallStats {
    counters: RwLock<BTreeMap<&'static str, Counters>>,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    throttles: AtomicU64,
    retries: AtomicU64,
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
    /// Calls that succeeded (`calls - successes - failures` are in flight).
    pub successes: u64,
    /// Retries started after a transient failure.
    pub retries: u64,
}

impl CallStats {
    /// Records one backend call.
    pub fn record_call(&self, operation: &'static str) {
        self.with(operation, |c| {
            c.calls.fetch_add(1, Ordering::Relaxed);
        });
    }

    /// Records a call that succeeded.
    pub fn record_success(&self, operation: &'static str) {
        self.with(operation, |c| {
            c.successes.fetch_add(1, Ordering::Relaxed);
        });
    }

    /// Records that a failed call is about to be retried.
    pub fn record_retry(&self, operation: &'static str) {
        self.with(operation, |c| {
            c.retries.fetch_add(1, Ordering::Relaxed);
        });
    }

    /// Records a failed call.
    pub fn record_failure(&self, operation: &'static str, kind: BackendErrorKind) {
        self.with(operation, |c| {
            c.failures.fetch_add(1, Ordering::Relaxed);
            if kind == BackendErrorKind::ResourceExhausted {
                c.throttles.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> BTreeMap<&'static str, OperationStats> {
        self.counters
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(operation, c)| {
                (
                    *operation,
                    OperationStats {
                        calls: c.calls.load(Ordering::Relaxed),
                        failures: c.failures.load(Ordering::Relaxed),
                        throttles: c.throttles.load(Ordering::Relaxed),
                        successes: c.successes.load(Ordering::Relaxed),
                        retries: c.retries.load(Ordering::Relaxed),
                    },
                )
            })
            .collect()
    }

    fn with(&self, operation: &'static str, f: impl Fn(&Counters)) {
        if let Some(counters) = self
            .counters
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(operation)
        {
            return f(counters);
        }
        f(self
            .counters
            .write()
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
        assert_eq!((sign.successes, sign.retries), (1, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn the_default_policy_rides_out_a_store_restart_of_several_seconds() {
        // The store refuses connections for 5 s (a restart), then answers. Whatever the
        // jitter draws, the retries must still be going when it is back.
        for _ in 0..200 {
            let stats = CallStats::default();
            let started = Instant::now();
            let result = with_retries(RetryPolicy::default(), "sign", &stats, || async {
                if started.elapsed() < Duration::from_secs(5) {
                    Err(BackendError::new(
                        BackendErrorKind::Unavailable,
                        "connection refused",
                    ))
                } else {
                    Ok(())
                }
            })
            .await;
            assert!(result.is_ok(), "gave up after {:?}", started.elapsed());
            assert!(started.elapsed() < Duration::from_secs(20));
        }
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

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_hint_is_waited_for_or_ends_the_retries() {
        let policy = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            budget: Duration::from_secs(10),
        };
        let stats = CallStats::default();
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let started = Instant::now();
        let result: Result<(), BackendError> = with_retries(policy, "sign", &stats, || {
            let n = attempts.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(transient().with_retry_after(Some(Duration::from_secs(3))))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert!(result.is_ok());
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "waited as asked"
        );
        // A wait past the budget is not waited for: the error comes back at once.
        let started = Instant::now();
        let result: Result<(), BackendError> = with_retries(policy, "sign", &stats, || async {
            Err(transient().with_retry_after(Some(Duration::from_secs(60))))
        })
        .await;
        assert!(result.is_err());
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_exponential_ceiling() {
        let policy = RetryPolicy::default();
        for attempt in 1..=40 {
            let ceiling =
                (policy.initial_backoff * 2u32.saturating_pow(attempt - 1)).min(policy.max_backoff);
            for _ in 0..50 {
                let backoff = jittered_backoff(policy, attempt);
                assert!(backoff <= ceiling && backoff >= ceiling / 2, "{backoff:?}");
            }
        }
        let no_backoff = RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            budget: Duration::ZERO,
        };
        assert_eq!(jittered_backoff(no_backoff, 3), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_lets_a_burst_through_then_paces_callers() {
        let limiter = Arc::new(RateLimiter::new(10.0, 5));
        let started = Instant::now();
        for _ in 0..5 {
            limiter.acquire(None).await.unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_millis(1),
            "the burst is immediate"
        );
        let mut waiters = Vec::new();
        for _ in 0..10 {
            let limiter = limiter.clone();
            waiters.push(tokio::spawn(async move { limiter.acquire(None).await }));
        }
        for waiter in waiters {
            waiter.await.unwrap().unwrap();
        }
        // 10 more permits at 10/s take about a second.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(990) && elapsed <= Duration::from_millis(1100),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_deadline_is_refused_at_once() {
        let limiter = RateLimiter::new(1.0, 1);
        limiter.acquire(None).await.unwrap();
        let started = Instant::now();
        let denied = limiter
            .acquire(Some(Duration::from_millis(500)))
            .await
            .unwrap_err();
        assert!(
            matches!(denied, RateLimitDenied::PastDeadline { .. }),
            "{denied:?}"
        );
        assert_eq!(started.elapsed(), Duration::ZERO, "refused without waiting");
        // The refused caller took no slot: the next one waits one interval, not two.
        limiter.acquire(Some(Duration::from_secs(2))).await.unwrap();
        assert!(started.elapsed() <= Duration::from_millis(1001));
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_is_bounded() {
        let limiter = Arc::new(RateLimiter::with_queue(1.0, 1, 3));
        limiter.acquire(None).await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..3 {
            let limiter = limiter.clone();
            waiters.push(tokio::spawn(async move { limiter.acquire(None).await }));
        }
        tokio::task::yield_now().await;
        assert_eq!(
            limiter.acquire(None).await,
            Err(RateLimitDenied::QueueFull { waiting: 3 })
        );
        for waiter in waiters {
            waiter.await.unwrap().unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_returns_its_slot() {
        let limiter = Arc::new(RateLimiter::with_queue(1.0, 1, 100));
        limiter.acquire(None).await.unwrap();
        let started = Instant::now();
        // Ten callers queue (10 s of slots) and give up after 100 ms, as SPIRE cancels.
        for _ in 0..10 {
            let limiter = limiter.clone();
            let _ = tokio::time::timeout(Duration::from_millis(100), async move {
                limiter.acquire(None).await
            })
            .await;
        }
        // Their slots came back: a new caller waits about one interval, not eleven.
        limiter.acquire(None).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
}
