//! Adaptive sign-rate control: the engine learns the store's signing quota from its
//! throttling replies and paces itself, so that a burst queues briefly instead of turning
//! into a storm of `ThrottlingException`s and failed SignData calls.
//!
//! - Until the store first throttles, calls pass at once: an unthrottled store pays two
//!   short lock sections per call (noting the grant and the success) and no wait.
//! - When [`Tuning::min_throttles`] calls are throttled within [`Tuning::window`], the rate
//!   is cut to [`Tuning::decrease`] × the rate the store actually served over that window
//!   (what got through is the best estimate of the quota), but never by more than half. A
//!   lone throttle is left to the retries: it says the store is busy, not that this server
//!   asks too much. Attempts let through before a cut cannot cut again: one cut per round
//!   of feedback, not one per throttled call in flight.
//! - While callers are being paced (demand is above the rate) and calls succeed, the rate
//!   first climbs back quickly towards the rate at which the store throttled (closing the
//!   gap with time constant [`Tuning::recovery`]: a cut from a poor estimate costs well
//!   under a second), then grows by [`Tuning::increase`] × the rate per second, so the
//!   limiter keeps probing for a quota that rose; that step doubles every
//!   [`Tuning::step_doubling`] without a throttle, so a quota raised tenfold is found in
//!   well under a minute while the rate near a steady quota moves in small steps.
//! - After [`Tuning::release_after`] without a throttle while demand stays below the rate,
//!   the quota is forgotten (calls pass at once again).
//!
//! Pacing is a queue in arrival order: each caller takes a ticket whose slot follows from
//! the current rate, and a rate change moves every waiting slot without reordering them,
//! so no caller starves (waiters are woken when their slots move). The lock is held only
//! to compute a slot, never across a wait or a store call. A caller whose wait would not
//! leave it time to sign before its deadline is refused at once.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The controller's constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tuning {
    /// A throttle sets the rate to this fraction of the rate the store served.
    pub decrease: f64,
    /// Throttled calls within the window that make a cut.
    pub min_throttles: usize,
    /// Below the rate at which the store last throttled, the gap closes with this time
    /// constant.
    pub recovery: Duration,
    /// Increase per second of paced success, as a fraction of the rate.
    pub increase: f64,
    /// The additive step doubles after each such period without a throttle.
    pub step_doubling: Duration,
    /// The rate never drops below this (permits per second).
    pub min_rate: f64,
    /// Bursts the limiter lets through at once, as time at the current rate.
    pub burst: Duration,
    /// The window over which the served rate is measured.
    pub window: Duration,
    /// Without a throttle for this long and with demand below the rate, the limit is dropped.
    pub release_after: Duration,
    /// The part of a caller's deadline kept for the store call itself (at most 2 s).
    pub deadline_share_for_call: f64,
}

impl Default for Tuning {
    /// Cut to 90 % of the served rate, climb back by 5 % of it per second: the store's own
    /// burst allowance absorbs the short dip below the quota, so goodput stays near it.
    fn default() -> Self {
        Self {
            decrease: 0.9,
            min_throttles: 3,
            recovery: Duration::from_secs(1),
            increase: 0.05,
            step_doubling: Duration::from_secs(10),
            min_rate: 1.0,
            burst: Duration::from_millis(100),
            window: Duration::from_secs(1),
            release_after: Duration::from_secs(300),
            deadline_share_for_call: 0.1,
        }
    }
}

/// A permit to make one store call, and the rate it was paced at.
#[derive(Clone, Copy, Debug)]
pub struct Permit {
    /// The number of cuts before the permit was granted.
    epoch: u64,
}

/// Why a caller was refused at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveDenied {
    /// The learned rate, permits per second.
    pub per_second: f64,
    /// The wait the caller's slot would need.
    pub wait: Duration,
    /// What the caller had left.
    pub deadline: Duration,
}

/// A change of the learned rate, for metrics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RateChange {
    /// A throttle cut the rate to this many permits per second.
    Cut(f64),
    /// The rate rose to this many permits per second.
    Raised(f64),
    /// The learned limit was dropped: calls pass at once again.
    Released,
}

/// The adaptive limiter of one engine's signing calls.
pub struct AdaptiveLimiter {
    tuning: Tuning,
    state: Mutex<State>,
    /// Wakes waiting callers when their slots moved: the rate rose enough to move them
    /// earlier, or a cut moved them later.
    raised: Notify,
}

struct State {
    /// Permits per second; `None` until the store throttles (or after a release).
    rate: Option<f64>,
    /// Cuts so far: a throttle of a permit granted before the last cut is old news.
    epoch: u64,
    /// The rate at which the store last throttled (what the quick recovery climbs to).
    throttled_at: f64,
    last_cut: Option<Instant>,
    last_increase: Instant,
    /// The schedule: ticket `n` may go at `base_time + (n - base_ticket) / rate - burst`.
    /// Callers queue by ticket, so order is kept when the rate changes under them.
    base_time: Instant,
    base_ticket: f64,
    next_ticket: u64,
    /// One past the highest ticket granted.
    served_ticket: u64,
    /// When the last caller had to wait: the limit is what holds demand back.
    last_wait: Option<Instant>,
    /// Successes within the window, oldest first.
    successes: VecDeque<Instant>,
    /// Throttles since the last cut within the window, oldest first.
    throttles: VecDeque<Instant>,
    /// Every permit granted within the window, oldest first: the rate asked of the store.
    attempts: VecDeque<Instant>,
    /// The last rate logged, so that a steady climb logs every 10 %, not every call.
    logged: f64,
    /// The rate waiting callers last computed their slots with (woken 5 % above it).
    announced: f64,
}

impl State {
    /// When ticket `n` may go at `rate`.
    fn slot(&self, n: u64, rate: f64, burst: Duration) -> Instant {
        let offset = (n as f64 - self.base_ticket) / rate - burst.as_secs_f64();
        if offset >= 0.0 {
            self.base_time + Duration::from_secs_f64(offset)
        } else {
            self.base_time
                .checked_sub(Duration::from_secs_f64(-offset))
                .unwrap_or(self.base_time)
        }
    }

    /// Moves the schedule's base to `now` at the old rate, before the rate changes.
    fn rebase(&mut self, now: Instant) {
        if let Some(rate) = self.rate {
            self.base_ticket += now.saturating_duration_since(self.base_time).as_secs_f64() * rate;
        }
        self.base_time = now;
    }

    fn set_rate(&mut self, rate: Option<f64>, now: Instant) {
        self.rebase(now);
        self.rate = rate;
    }
}

/// The most successes remembered: far above any store's quota over one window.
const MAX_REMEMBERED: usize = 100_000;

impl Default for AdaptiveLimiter {
    fn default() -> Self {
        Self::new(Tuning::default())
    }
}

impl AdaptiveLimiter {
    /// A limiter that has learned no quota yet.
    pub fn new(tuning: Tuning) -> Self {
        let now = Instant::now();
        Self {
            tuning,
            state: Mutex::new(State {
                rate: None,
                epoch: 0,
                throttled_at: 0.0,
                last_cut: None,
                last_increase: now,
                base_time: now,
                base_ticket: 0.0,
                next_ticket: 0,
                served_ticket: 0,
                last_wait: None,
                successes: VecDeque::new(),
                throttles: VecDeque::new(),
                attempts: VecDeque::new(),
                logged: 0.0,
                announced: 0.0,
            }),
            raised: Notify::new(),
        }
    }

    /// The learned rate (`None`: no quota learned, calls are not paced).
    pub fn rate(&self) -> Option<f64> {
        self.lock().rate
    }

    /// Waits for this caller's slot, in arrival order. Refused at once when the slot would
    /// not leave time to sign before `deadline` (SPIRE's 30 s when none is given). A caller
    /// dropped while waiting gives its slot back.
    pub async fn acquire(&self, deadline: Option<Duration>) -> Result<Permit, AdaptiveDenied> {
        let deadline = deadline.unwrap_or(Duration::from_secs(30));
        let kept = deadline
            .mul_f64(self.tuning.deadline_share_for_call)
            .min(Duration::from_secs(2));
        let usable = deadline.saturating_sub(kept);
        let asked = Instant::now();
        let ticket = {
            let mut state = self.lock();
            let window = self.tuning.window;
            remember(&mut state.attempts, asked, window);
            let Some(rate) = state.rate else {
                return Ok(Permit { epoch: state.epoch });
            };
            let ticket = state.next_ticket;
            // An idle limiter starts a fresh schedule: a burst's worth goes at once.
            if state.slot(ticket, rate, Duration::ZERO) < asked {
                state.base_time = asked;
                state.base_ticket = ticket as f64;
            }
            let wait = state
                .slot(ticket, rate, self.tuning.burst)
                .saturating_duration_since(asked);
            if wait > usable {
                state.attempts.pop_back();
                return Err(AdaptiveDenied {
                    per_second: rate,
                    wait,
                    deadline,
                });
            }
            state.next_ticket += 1;
            if wait.is_zero() {
                state.served_ticket = state.served_ticket.max(ticket + 1);
                return Ok(Permit { epoch: state.epoch });
            }
            state.last_wait = Some(asked);
            ticket
        };
        let mut slot = Slot {
            limiter: self,
            held: true,
        };
        loop {
            let raised = self.raised.notified();
            tokio::pin!(raised);
            raised.as_mut().enable();
            let until = {
                let mut state = self.lock();
                let now = Instant::now();
                let Some(rate) = state.rate else {
                    slot.held = false;
                    return Ok(Permit { epoch: state.epoch });
                };
                let at = state.slot(ticket, rate, self.tuning.burst);
                if at <= now {
                    slot.held = false;
                    state.served_ticket = state.served_ticket.max(ticket + 1);
                    return Ok(Permit { epoch: state.epoch });
                }
                // A cut while waiting moved the slot: still refused rather than timing out.
                if at.saturating_duration_since(asked) > usable {
                    return Err(AdaptiveDenied {
                        per_second: rate,
                        wait: at.saturating_duration_since(asked),
                        deadline,
                    });
                }
                at
            };
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                () = raised => {}
            }
        }
    }

    /// Records a store call made under `permit` that succeeded.
    pub fn on_success(&self, permit: &Permit) -> Option<RateChange> {
        let change = self.record_success(permit);
        if let Some(RateChange::Released) = change {
            self.raised.notify_waiters();
        } else if let Some(RateChange::Raised(rate)) = change {
            let wake = {
                let mut state = self.lock();
                let wake = rate >= state.announced * 1.05;
                if wake {
                    state.announced = rate;
                }
                wake
            };
            if wake {
                self.raised.notify_waiters();
            }
        }
        change
    }

    fn record_success(&self, permit: &Permit) -> Option<RateChange> {
        let mut state = self.lock();
        let now = Instant::now();
        let window = self.tuning.window;
        remember(&mut state.successes, now, window);
        let rate = state.rate?;
        let elapsed = now.saturating_duration_since(state.last_increase);
        state.last_increase = now;
        let paced = state
            .last_wait
            .is_some_and(|at| now.saturating_duration_since(at) <= self.tuning.window);
        if !paced {
            let calm = state
                .last_cut
                .is_none_or(|at| now.saturating_duration_since(at) >= self.tuning.release_after);
            if calm {
                state.set_rate(None, now);
                tracing::debug!(
                    previous = rate,
                    "adaptive sign rate: no throttling for a while and demand below the rate; limit dropped"
                );
                return Some(RateChange::Released);
            }
            return None;
        }
        // Attempts let through before the last cut say nothing about the rate after it.
        if permit.epoch != state.epoch {
            return None;
        }
        let calm_periods = state.last_cut.map_or(0, |cut| {
            (now.saturating_duration_since(cut).as_secs_f64()
                / self
                    .tuning
                    .step_doubling
                    .as_secs_f64()
                    .max(f64::MIN_POSITIVE)) as i32
        });
        let elapsed = elapsed.min(self.tuning.window).as_secs_f64();
        let raised = if rate < 0.95 * state.throttled_at {
            let closing = 1.0 - (-elapsed / self.tuning.recovery.as_secs_f64().max(1e-3)).exp();
            rate + (state.throttled_at - rate) * closing
        } else {
            let step = (self.tuning.increase * rate).max(self.tuning.min_rate)
                * 2f64.powi(calm_periods.min(20));
            rate + step * elapsed
        };
        state.set_rate(Some(raised), now);
        if raised >= state.logged * 1.1 {
            state.logged = raised;
            tracing::debug!(
                per_second = raised,
                "adaptive sign rate raised: calls keep succeeding"
            );
        }
        Some(RateChange::Raised(raised))
    }

    /// Records a store call made under `permit` that the store throttled.
    pub fn on_throttle(&self, permit: &Permit) -> Option<RateChange> {
        let change = self.record_throttle(permit);
        if change.is_some() {
            // Waiting callers look at their slots again now: one that no longer fits its
            // deadline is refused at the cut, not when its old slot comes.
            self.raised.notify_waiters();
        }
        change
    }

    fn record_throttle(&self, permit: &Permit) -> Option<RateChange> {
        let mut state = self.lock();
        let now = Instant::now();
        if permit.epoch != state.epoch {
            return None;
        }
        let window = self.tuning.window;
        let recent = |at: &Instant| now.saturating_duration_since(*at) <= window;
        state.throttles.retain(recent);
        state.throttles.push_back(now);
        if state.throttles.len() < self.tuning.min_throttles.max(1) {
            return None;
        }
        state.throttles.clear();
        state.successes.retain(recent);
        // The served rate over the span the window saw (a burst that began 100 ms ago
        // served its count in 100 ms, not in a whole window).
        let per_second = |events: &VecDeque<Instant>| {
            let span = events
                .front()
                .map_or(window, |oldest| now.saturating_duration_since(*oldest))
                .clamp(window / 10, window);
            events.len() as f64 / span.as_secs_f64()
        };
        let served = per_second(&state.successes);
        // Where the throttling began: the paced rate, or the rate permits were granted at
        // while unpaced.
        let asked = state.rate.unwrap_or_else(|| per_second(&state.attempts));
        // Throttles often come back before the same round's successes, so `served` can be
        // far too low: a cut never goes below half the asked rate (classic AIMD), and a
        // few rounds close in on a quota that dropped far.
        let cut = (asked.min(served) * self.tuning.decrease)
            .max(asked * 0.5)
            .max(self.tuning.min_rate);
        state.throttled_at = asked.max(cut);
        tracing::debug!(
            previous = state.rate,
            served_per_second = served,
            per_second = cut,
            "adaptive sign rate cut: the store throttled"
        );
        state.rate = Some(cut);
        // Waiting callers keep their order; the first of them goes now, then one per
        // interval at the new rate.
        state.base_time = now;
        state.base_ticket = state.served_ticket as f64 - self.tuning.burst.as_secs_f64() * cut;
        state.epoch += 1;
        state.logged = cut;
        state.announced = cut;
        state.last_cut = Some(now);
        state.last_increase = now;
        Some(RateChange::Cut(cut))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Appends `now` to `events`, forgetting those older than `window`.
fn remember(events: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while events
        .front()
        .is_some_and(|at| now.saturating_duration_since(*at) > window)
        || events.len() >= MAX_REMEMBERED
    {
        events.pop_front();
    }
    events.push_back(now);
}

/// A reserved slot; handed back if its caller gives up before using it (the callers behind
/// it move up by one interval).
struct Slot<'a> {
    limiter: &'a AdaptiveLimiter,
    held: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.held {
            self.limiter.lock().base_ticket += 1.0;
        }
    }
}

#[cfg(test)]
mod tests;
