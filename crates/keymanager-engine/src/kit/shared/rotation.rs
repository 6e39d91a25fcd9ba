//! One rotation of one shared key, over the narrow [`SharedOps`] interface and an injected
//! wall clock, so that it is tested with concurrent rotators, crashed holders and absurd
//! leases without a store; every wait in it is bounded by `budget`.
//!
//! A shared key has *generations* (Cloud KMS versions of one CryptoKey; AWS KMS keys behind
//! one alias), numbered upwards. Rotation must add exactly one however many servers rotate
//! at once, so its lock is a store *creation* that exactly one caller can win (a CryptoKey
//! id, an alias name): labels or tags written after a read are no compare-and-swap.
//!
//! 1. Reuse: if the newest live generation was created less than `reuse_window` ago and
//!    this process has not served it, adopt it (another server rotated moments ago).
//! 2. Lock: create the lock named after (`basis`, attempt), `basis` being the highest
//!    generation seen: everyone rotating from the same state contends for the same name.
//! 3. The winner checks again that no generation appeared, prepares one (invisible to
//!    others), and commits it with one store call; the others poll the generations until
//!    one newer than `basis` appears and adopt it.
//! 4. Lease: a holder never starts its commit call when less than one call timeout of its
//!    lease is left (by its own clock). A waiter takes over (the next attempt's lock) only
//!    once the lease has ended by *its* clock plus `skew`: the end the holder recorded, or,
//!    where the store keeps none ([`LockLease::Unrecorded`]), a full lease after the
//!    waiter first saw the lock. So a slow holder and its successor never both commit, as
//!    long as clocks disagree by less than the allowance.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::time::Instant;

use crate::backend::{BackendError, BackendErrorKind};
use crate::core::key::KeyType;

/// One generation of a shared key, as the rotation sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// The store's name for it (version resource name, key ARN).
    pub name: String,
    /// Its number: higher is newer.
    pub number: u64,
    /// Usable (or about to be: a version still being generated).
    pub live: bool,
    /// Its key type, when SPIRE can use it.
    pub key_type: Option<KeyType>,
    /// When the store created it.
    pub created: Option<SystemTime>,
}

/// What the store tells about a rotation lock's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockLease {
    /// The holder recorded that its lease ends then (by its clock).
    Until(SystemTime),
    /// The store keeps no lease end (an AWS alias has no tags): the lease counts from the
    /// moment this waiter first saw the lock, by its own monotonic clock.
    Unrecorded,
    /// Released, gone, or unreadable: the lease is over.
    Over,
}

/// A lock to create.
#[derive(Clone, Copy, Debug)]
pub struct LockRequest<'a> {
    /// Its name (from [`SharedOps::lock_name`]).
    pub name: &'a str,
    /// The generation being replaced (`None`: the shared key has none yet).
    pub basis: Option<&'a Generation>,
    /// The key type the rotation creates.
    pub key_type: KeyType,
    /// This server's id, recorded where the store can.
    pub holder: &'a str,
    /// When the lease ends by this server's clock, recorded where the store can.
    pub lease_end: SystemTime,
}

/// What a shared rotation needs from the store.
#[async_trait]
pub trait SharedOps: Send + Sync {
    /// What [`SharedOps::prepare`] made and [`SharedOps::commit`] publishes.
    type Prepared: Send;

    /// The lock's name for replacing generation `basis` (0: none yet), attempt `attempt`
    /// (bumped when an expired lease is taken over).
    fn lock_name(&self, basis: u64, attempt: u32) -> String;
    /// Every generation of the shared key (only the current one where that is all the
    /// store tells cheaply).
    async fn generations(&self) -> Result<Vec<Generation>, BackendError>;
    /// Creates the lock: `true` when this call created it, `false` when it exists already.
    async fn create_lock(&self, lock: LockRequest<'_>) -> Result<bool, BackendError>;
    /// The lease of an existing lock, and its holder where recorded.
    async fn lock_lease(&self, lock: &str) -> Result<(LockLease, Option<String>), BackendError>;
    /// Ends a lease early (best effort: the lease ends anyway).
    async fn release_lock(&self, lock: &str);
    /// Makes what the next generation needs, invisible to other servers.
    async fn prepare(&self, basis: u64, key_type: KeyType) -> Result<Self::Prepared, BackendError>;
    /// Undoes a preparation that will not be committed (best effort).
    async fn discard(&self, prepared: Self::Prepared);
    /// Publishes the prepared generation with one store call; returns it.
    async fn commit(&self, prepared: Self::Prepared) -> Result<Generation, BackendError>;
}

/// Wall-clock time, injected so that leases can be tested.
pub trait WallClock: Send + Sync {
    /// Now.
    fn now(&self) -> SystemTime;
}

/// The system clock.
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// When this process first saw each lock whose store records no lease end. Kept by the
/// backend across rotations: SPIRE abandons a GenerateKey after 30 s, and a lease plus the
/// skew allowance is longer, so a waiter that started counting afresh on every call would
/// never take over a crashed holder's lock. Never held across I/O.
#[derive(Debug, Default)]
pub struct LockSightings(Mutex<HashMap<String, Instant>>);

/// Sightings kept at most: older ones are forgotten first (a forgotten lock is counted
/// afresh, which only delays a takeover).
const MAX_SIGHTINGS: usize = 256;

impl LockSightings {
    /// When `lock` was first seen (now, if never before).
    pub fn first_seen(&self, lock: &str) -> Instant {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = seen.get(lock) {
            return *at;
        }
        if seen.len() >= MAX_SIGHTINGS
            && let Some(oldest) = seen
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone())
        {
            seen.remove(&oldest);
        }
        let now = Instant::now();
        seen.insert(lock.to_string(), now);
        now
    }
}

/// One rotation of one shared key.
pub struct SharedRotation<'a, O: SharedOps> {
    /// The store.
    pub ops: &'a O,
    /// The wall clock (leases and generation ages).
    pub clock: &'a dyn WallClock,
    /// The shared key's name, for messages.
    pub key: &'a str,
    /// This server's id, recorded on locks it takes.
    pub holder: &'a str,
    /// The lock lease (`shared_keys.lock_lease`).
    pub lease: Duration,
    /// How far clocks of servers may disagree (`clock_skew_allowance`).
    pub skew: Duration,
    /// Reuse a fresh generation of another server (`shared_keys.reuse_window`).
    pub reuse_window: Duration,
    /// The longest a rotation may take, waits included.
    pub budget: Duration,
    /// The longest one store call may take.
    pub call_timeout: Duration,
    /// How often a waiter looks for the holder's generation.
    pub poll: Duration,
    /// The highest generation of this key this process served from a GenerateKey.
    pub last_served: Option<u64>,
    /// First sightings of locks without a recorded lease, kept across rotations.
    pub sightings: &'a LockSightings,
}

/// How a lock holder's turn ended.
enum Held {
    Created(Generation),
    /// A generation newer than the basis appeared meanwhile (listed here).
    Superseded(Vec<Generation>),
}

/// How a wait for the holder ended.
enum Waited {
    /// A generation newer than the basis exists (listed here).
    NewGeneration(Vec<Generation>),
    /// The lease ran out (or was released) without one.
    LeaseOver,
}

impl<O: SharedOps> SharedRotation<'_, O> {
    /// Rotates to (or adopts) a generation of `key_type`; returns the generation to serve.
    pub async fn rotate(&self, key_type: KeyType) -> Result<Generation, BackendError> {
        let started = Instant::now();
        loop {
            self.check_budget(started)?;
            let generations = self.ops.generations().await?;
            if let Some(fresh) = self.reusable(&generations, key_type) {
                tracing::info!(key = self.key, generation = %fresh.name, "reusing a shared generation another server created moments ago");
                return Ok(fresh.clone());
            }
            let basis = generations.iter().max_by_key(|g| g.number).cloned();
            let basis_number = basis.as_ref().map_or(0, |g| g.number);
            let newer = self
                .contend(basis.as_ref(), basis_number, key_type, started)
                .await?;
            let newer = match newer {
                Held::Created(created) => return Ok(created),
                Held::Superseded(newer) => newer,
            };
            // Another server's generation: adopt it unless it has another key type, in
            // which case rotate again from it.
            if let Some(adopted) = newer
                .iter()
                .filter(|g| g.live && g.number > basis_number && g.key_type == Some(key_type))
                .max_by_key(|g| g.number)
            {
                tracing::info!(key = self.key, generation = %adopted.name, "adopting the shared generation another server created");
                return Ok(adopted.clone());
            }
        }
    }

    /// Contends for the locks of `basis` until this server created a generation or
    /// another one appeared.
    async fn contend(
        &self,
        basis: Option<&Generation>,
        basis_number: u64,
        key_type: KeyType,
        started: Instant,
    ) -> Result<Held, BackendError> {
        let mut attempt = 0u32;
        loop {
            self.check_budget(started)?;
            let lock = self.ops.lock_name(basis_number, attempt);
            let acquired_at = Instant::now();
            let lease_end = self.clock.now().checked_add(self.lease).ok_or_else(|| {
                BackendError::new(BackendErrorKind::Internal, "lock lease out of range")
            })?;
            let request = LockRequest {
                name: &lock,
                basis,
                key_type,
                holder: self.holder,
                lease_end,
            };
            if self.ops.create_lock(request).await? {
                let held = self.hold(basis_number, key_type, acquired_at).await;
                self.ops.release_lock(&lock).await;
                if let Ok(Held::Created(created)) = &held {
                    tracing::info!(key = self.key, generation = %created.name, lock = %lock, "created the shared generation under the rotation lock");
                }
                return held;
            }
            let first_seen = self.sightings.first_seen(&lock);
            let (lease, holder) = self.ops.lock_lease(&lock).await?;
            if self.lease_over(&lease, first_seen) {
                tracing::warn!(key = self.key, lock = %lock, holder = ?holder, "rotation lock lease expired; taking over");
                attempt += 1;
                continue;
            }
            match self
                .wait(basis_number, &lock, lease, first_seen, started)
                .await?
            {
                Waited::NewGeneration(generations) => return Ok(Held::Superseded(generations)),
                Waited::LeaseOver => attempt += 1,
            }
        }
    }

    fn check_budget(&self, started: Instant) -> Result<(), BackendError> {
        if started.elapsed() > self.budget {
            return Err(BackendError::new(
                BackendErrorKind::Unavailable,
                format!(
                    "gave up rotating shared key {}: no generation appeared within {}s",
                    self.key,
                    self.budget.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// The newest live generation if it may be adopted: right key type, created inside the
    /// reuse window, and not one this process already served.
    fn reusable<'g>(
        &self,
        generations: &'g [Generation],
        key_type: KeyType,
    ) -> Option<&'g Generation> {
        let newest = generations
            .iter()
            .filter(|g| g.live)
            .max_by_key(|g| g.number)?;
        let age = self
            .clock
            .now()
            .duration_since(newest.created?)
            .unwrap_or(Duration::ZERO);
        let served_here = self.last_served.is_some_and(|n| newest.number <= n);
        (newest.key_type == Some(key_type) && age < self.reuse_window && !served_here)
            .then_some(newest)
    }

    /// The holder's part: check again, prepare, and commit exactly one generation.
    async fn hold(
        &self,
        basis: u64,
        key_type: KeyType,
        acquired_at: Instant,
    ) -> Result<Held, BackendError> {
        let generations = self.ops.generations().await?;
        if generations.iter().any(|g| g.number > basis) {
            return Ok(Held::Superseded(generations));
        }
        let prepared = self.ops.prepare(basis, key_type).await?;
        // By its own clock the lease ends at acquired_at + lease; waiters take over only
        // `skew` later by theirs. Starting the commit call needs a full call timeout left.
        if acquired_at.elapsed() + self.call_timeout >= self.lease {
            self.ops.discard(prepared).await;
            return Err(BackendError::new(
                BackendErrorKind::Unavailable,
                format!(
                    "rotation lock of {} held too long to commit a generation safely; retry",
                    self.key
                ),
            ));
        }
        Ok(Held::Created(self.ops.commit(prepared).await?))
    }

    /// A lease without a readable end is over; one whose end plus the skew is out of range
    /// is not (the rotation's budget bounds the wait).
    fn lease_over(&self, lease: &LockLease, first_seen: Instant) -> bool {
        match lease {
            LockLease::Over => true,
            LockLease::Until(end) => end
                .checked_add(self.skew)
                .is_some_and(|end| self.clock.now() > end),
            LockLease::Unrecorded => first_seen.elapsed() > self.lease.saturating_add(self.skew),
        }
    }

    /// Waits while the lock is held: returns once a generation newer than `basis` exists,
    /// or once the lease has run out (or was released) without one. Bounded by the budget.
    async fn wait(
        &self,
        basis: u64,
        lock: &str,
        mut lease: LockLease,
        first_seen: Instant,
        started: Instant,
    ) -> Result<Waited, BackendError> {
        let mut checks = 0u32;
        loop {
            tokio::time::sleep(self.poll).await;
            let generations = self.ops.generations().await?;
            if generations.iter().any(|g| g.number > basis) {
                return Ok(Waited::NewGeneration(generations));
            }
            checks += 1;
            // Re-read the lease now and then: the holder may have released it empty-handed.
            if checks.is_multiple_of(5) {
                lease = self.ops.lock_lease(lock).await?.0;
            }
            if self.lease_over(&lease, first_seen) {
                tracing::debug!(
                    key = self.key,
                    lock,
                    "rotation lock ended without a new generation"
                );
                return Ok(Waited::LeaseOver);
            }
            self.check_budget(started)?;
        }
    }
}

#[cfg(test)]
mod tests;
