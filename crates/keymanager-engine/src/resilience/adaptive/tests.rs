//! The controller against a simulated store quota (a token bucket, as KMS quotas are), in
//! paused tokio time: minutes of load run in milliseconds and every figure is exact.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::backend::{BackendError, BackendErrorKind};
use crate::resilience::{CallStats, Gated, RetryPolicy, with_gated_retries};

/// The store's quota: `rate` calls per second, `burst` at once; beyond it, throttled.
struct Quota {
    state: Mutex<(f64, f64, f64, Instant)>,
}

impl Quota {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            state: Mutex::new((rate, burst, burst, Instant::now())),
        }
    }

    fn set_rate(&self, rate: f64) {
        self.take_refill();
        self.state.lock().unwrap().0 = rate;
    }

    fn take_refill(&self) {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        s.2 = (s.2 + now.duration_since(s.3).as_secs_f64() * s.0).min(s.1);
        s.3 = now;
    }

    fn take(&self) -> bool {
        self.take_refill();
        let mut s = self.state.lock().unwrap();
        if s.2 >= 1.0 {
            s.2 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What a load run saw.
#[derive(Default)]
struct Outcome {
    ok: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    throttled: AtomicU64,
}

/// One SignData as the engine makes it: paced attempts with retries.
async fn sign(limiter: &AdaptiveLimiter, quota: &Quota, outcome: &Outcome) -> bool {
    let stats = CallStats::default();
    let started = Instant::now();
    let deadline = Duration::from_secs(30);
    let result = with_gated_retries(
        RetryPolicy::default(),
        "sign",
        &stats,
        || limiter.acquire(Some(deadline.saturating_sub(started.elapsed()))),
        |permit| async move {
            // The store decides at arrival; a throttle comes back at once, a signature
            // after 20 ms (so throttles are often seen before the same round's successes).
            if quota.take() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                limiter.on_success(&permit);
                Ok(())
            } else {
                tokio::time::sleep(Duration::from_millis(2)).await;
                outcome.throttled.fetch_add(1, Ordering::Relaxed);
                limiter.on_throttle(&permit);
                Err(BackendError::new(
                    BackendErrorKind::ResourceExhausted,
                    "ThrottlingException",
                ))
            }
        },
    )
    .await;
    match result {
        Ok(()) => {
            outcome.ok.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(Gated::Refused(_)) => {
            outcome.refused.fetch_add(1, Ordering::Relaxed);
            false
        }
        Err(Gated::Failed(_)) => {
            outcome.failed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// `workers` callers, each asking once per `period` (a late caller asks again at once),
/// for `duration`. Returns each worker's successes.
async fn drive(
    limiter: &Arc<AdaptiveLimiter>,
    quota: &Arc<Quota>,
    outcome: &Arc<Outcome>,
    workers: usize,
    period: Duration,
    duration: Duration,
) -> Vec<u64> {
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (limiter, quota, outcome) = (limiter.clone(), quota.clone(), outcome.clone());
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut mine = 0;
            while Instant::now() < end {
                ticks.tick().await;
                if sign(&limiter, &quota, &outcome).await {
                    mine += 1;
                }
            }
            mine
        }));
    }
    let mut per_worker = Vec::new();
    for task in tasks {
        per_worker.push(task.await.unwrap());
    }
    per_worker
}

#[tokio::test(start_paused = true)]
async fn an_unthrottled_store_pays_nothing() {
    let limiter = AdaptiveLimiter::default();
    let started = Instant::now();
    for _ in 0..10_000 {
        let permit = limiter
            .acquire(Some(Duration::from_secs(30)))
            .await
            .unwrap();
        assert_eq!(limiter.on_success(&permit), None);
    }
    assert_eq!(started.elapsed(), Duration::ZERO, "no call waited");
    assert_eq!(limiter.rate(), None, "no quota learned without a throttle");
}

#[tokio::test(start_paused = true)]
async fn twice_the_quota_converges_near_it_without_failures() {
    let limiter = Arc::new(AdaptiveLimiter::default());
    let quota = Arc::new(Quota::new(50.0, 10.0));
    let outcome = Arc::new(Outcome::default());
    // 20 callers every 200 ms: 100 signs/s asked of a 50/s quota, for a minute.
    let warm_up = drive(
        &limiter,
        &quota,
        &outcome,
        20,
        Duration::from_millis(200),
        Duration::from_secs(10),
    )
    .await;
    let warm_ok: u64 = warm_up.iter().sum();
    let ok_before = outcome.ok.load(Ordering::Relaxed);
    assert_eq!(warm_ok, ok_before);
    let per_worker = drive(
        &limiter,
        &quota,
        &outcome,
        20,
        Duration::from_millis(200),
        Duration::from_secs(50),
    )
    .await;
    let served = per_worker.iter().sum::<u64>() as f64 / 50.0;
    assert!(
        served >= 0.95 * 50.0,
        "goodput {served:.1}/s of a 50/s quota"
    );
    // The store cannot serve more than its quota (callers still in flight at the end of the
    // 50 s finish a little later, and the store's burst may be spent once).
    assert!(served <= 52.0, "never above the quota: {served}");
    assert_eq!(
        outcome.failed.load(Ordering::Relaxed),
        0,
        "no SignData failed"
    );
    assert_eq!(
        outcome.refused.load(Ordering::Relaxed),
        0,
        "no SignData refused"
    );
    let rate = limiter.rate().expect("a quota was learned");
    assert!((40.0..=60.0).contains(&rate), "learned rate {rate}");
    // Throttles are the probing, not a storm: a few per second at most.
    let throttled = outcome.throttled.load(Ordering::Relaxed) as f64 / 60.0;
    assert!(throttled < 5.0, "{throttled:.1} throttles/s");
}

#[tokio::test(start_paused = true)]
async fn a_cold_start_at_twice_the_quota_converges_within_seconds() {
    let limiter = Arc::new(AdaptiveLimiter::default());
    let quota = Arc::new(Quota::new(50.0, 10.0));
    let outcome = Arc::new(Outcome::default());
    let per_worker = drive(
        &limiter,
        &quota,
        &outcome,
        20,
        Duration::from_millis(200),
        Duration::from_secs(10),
    )
    .await;
    let served = per_worker.iter().sum::<u64>() as f64 / 10.0;
    assert!(
        served >= 0.9 * 50.0,
        "goodput {served:.1}/s over the first 10 s"
    );
    assert_eq!(outcome.failed.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn no_caller_starves() {
    let limiter = Arc::new(AdaptiveLimiter::default());
    let quota = Arc::new(Quota::new(50.0, 10.0));
    let outcome = Arc::new(Outcome::default());
    // 64 callers signing back to back: far more demand than quota.
    let per_worker = drive(
        &limiter,
        &quota,
        &outcome,
        64,
        Duration::from_millis(1),
        Duration::from_secs(30),
    )
    .await;
    let mean = per_worker.iter().sum::<u64>() as f64 / per_worker.len() as f64;
    let least = *per_worker.iter().min().unwrap() as f64;
    assert!(
        least >= 0.7 * mean,
        "least served {least}, mean {mean}: {per_worker:?}"
    );
    assert_eq!(outcome.failed.load(Ordering::Relaxed), 0);
    assert_eq!(outcome.refused.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_raised_quota_is_found_again() {
    let limiter = Arc::new(AdaptiveLimiter::default());
    let quota = Arc::new(Quota::new(50.0, 10.0));
    let outcome = Arc::new(Outcome::default());
    // 40 callers every 100 ms: 400 signs/s of demand.
    drive(
        &limiter,
        &quota,
        &outcome,
        40,
        Duration::from_millis(100),
        Duration::from_secs(20),
    )
    .await;
    let rate = limiter.rate().unwrap();
    assert!(rate <= 60.0, "{rate}");
    quota.set_rate(200.0);
    drive(
        &limiter,
        &quota,
        &outcome,
        40,
        Duration::from_millis(100),
        Duration::from_secs(40),
    )
    .await;
    let before = outcome.ok.load(Ordering::Relaxed);
    drive(
        &limiter,
        &quota,
        &outcome,
        40,
        Duration::from_millis(100),
        Duration::from_secs(20),
    )
    .await;
    let served = (outcome.ok.load(Ordering::Relaxed) - before) as f64 / 20.0;
    assert!(
        served >= 0.9 * 200.0,
        "goodput {served:.1}/s after the quota rose to 200/s"
    );
    assert_eq!(outcome.failed.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_lowered_quota_is_followed_down() {
    let limiter = Arc::new(AdaptiveLimiter::default());
    let quota = Arc::new(Quota::new(200.0, 20.0));
    let outcome = Arc::new(Outcome::default());
    drive(
        &limiter,
        &quota,
        &outcome,
        40,
        Duration::from_millis(100),
        Duration::from_secs(10),
    )
    .await;
    quota.set_rate(20.0);
    drive(
        &limiter,
        &quota,
        &outcome,
        40,
        Duration::from_millis(100),
        Duration::from_secs(20),
    )
    .await;
    let rate = limiter.rate().unwrap();
    assert!(
        (15.0..=30.0).contains(&rate),
        "learned rate {rate} for a 20/s quota"
    );
    assert_eq!(outcome.failed.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_wait_past_the_deadline_is_refused_at_once() {
    let limiter = Arc::new(AdaptiveLimiter::default());
    let permit = limiter.acquire(None).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    // The store throttled three calls after serving nothing: the floor rate, 1/s.
    assert_eq!(
        limiter.on_throttle(&permit),
        None,
        "a lone throttle is left to retries"
    );
    assert_eq!(limiter.on_throttle(&permit), None);
    assert_eq!(limiter.on_throttle(&permit), Some(RateChange::Cut(1.0)));
    let started = Instant::now();
    let mut waiters = Vec::new();
    for _ in 0..10 {
        let limiter = limiter.clone();
        waiters.push(tokio::spawn(async move {
            let asked = Instant::now();
            let result = limiter.acquire(Some(Duration::from_secs(5))).await;
            (result, asked.elapsed())
        }));
    }
    let mut granted = 0;
    for waiter in waiters {
        let (result, waited) = waiter.await.unwrap();
        match result {
            Ok(_) => granted += 1,
            Err(denied) => {
                assert_eq!(waited, Duration::ZERO, "refused without waiting");
                assert!(denied.wait > Duration::from_millis(4500), "{denied:?}");
                assert_eq!(denied.per_second, 1.0);
            }
        }
    }
    // 1/s with 4.5 s of the 5 s deadline usable for waiting: 5 slots (0 s … 4 s).
    assert_eq!(granted, 5);
    assert!(started.elapsed() <= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_returns_its_slot() {
    let limiter = Arc::new(AdaptiveLimiter::default());
    let permit = limiter.acquire(None).await.unwrap();
    for _ in 0..3 {
        limiter.on_throttle(&permit);
    }
    let rate = limiter.rate().expect("paced");
    limiter.acquire(None).await.unwrap();
    let started = Instant::now();
    for _ in 0..10 {
        let limiter = limiter.clone();
        let _ = tokio::time::timeout(Duration::from_millis(10), async move {
            limiter.acquire(None).await
        })
        .await;
    }
    limiter.acquire(None).await.unwrap();
    // Their ten slots came back: the next caller waits about one interval, not eleven.
    let interval = Duration::from_secs_f64(1.0 / rate);
    assert!(
        started.elapsed() <= interval * 2,
        "{:?} at {rate}/s",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn throttles_of_calls_let_through_before_a_cut_do_not_cut_again() {
    let limiter = AdaptiveLimiter::default();
    let in_flight: Vec<Permit> = {
        let mut permits = Vec::new();
        for _ in 0..20 {
            permits.push(limiter.acquire(None).await.unwrap());
        }
        permits
    };
    tokio::time::advance(Duration::from_millis(500)).await;
    for permit in &in_flight[..10] {
        limiter.on_success(permit);
    }
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(limiter.on_throttle(&in_flight[10]), None);
    assert_eq!(limiter.on_throttle(&in_flight[11]), None);
    // 10 served over the last 500 ms: the quota estimate is 20/s, cut once to 18/s.
    assert_eq!(
        limiter.on_throttle(&in_flight[12]),
        Some(RateChange::Cut(18.0))
    );
    for permit in &in_flight[13..] {
        assert_eq!(limiter.on_throttle(permit), None);
    }
    assert_eq!(limiter.rate(), Some(18.0));
}
