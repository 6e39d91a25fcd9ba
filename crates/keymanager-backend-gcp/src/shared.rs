//! Shared-keys mode: several servers (in several regions too) sign with the same CryptoKeys.
//!
//! Rotation must create exactly one version however many servers rotate at once. Upstream's
//! draft writes a "lock" label, which is not compare-and-swap: two servers can both read it
//! free and both write it. Here the lock is a CryptoKey *creation*, which Cloud KMS makes
//! atomic (exactly one creator of an id succeeds, the others get ALREADY_EXISTS):
//!
//! 1. Reuse: if the newest live version of the shared CryptoKey was created less than
//!    `reuse_window` ago and this process has not served it, adopt it (versions carry no
//!    labels to record a creator, so "another server's" means "not served here").
//! 2. Lock: create `spire-lock-<sha1(key@basis)>-<attempt>`, where `basis` is the highest
//!    version number seen. Everyone rotating from the same state contends for the same id.
//! 3. The winner checks again that no version appeared, creates one, and releases the lock;
//!    the others poll the versions until the winner's appears and adopt it (step 1).
//! 4. Lease: the lock carries `spire-lock-expires`. A holder never starts its creation call
//!    when less than one call timeout of its lease is left (by its own clock); a waiter
//!    takes over only once the lease has ended by *its* clock plus `clock_skew_allowance`.
//!    So a slow holder and its successor cannot both create, as long as clocks disagree by
//!    less than the allowance.
//!
//! [`SharedRotation`] is the algorithm alone, over the narrow [`SharedOps`] interface and
//! an injected wall clock, so that it is tested with concurrent rotators, crashed holders
//! and absurd leases without a store; every wait in it is bounded by `budget`.
//!
//! Lock CryptoKeys never get versions (Cloud KMS bills versions, not keys) and cannot be
//! deleted (Cloud KMS never deletes CryptoKeys): one is left per shared rotation.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use google_cloud_kms_v1::model::crypto_key_version::CryptoKeyVersionAlgorithm as Algorithm;
use keymanager_engine::lifecycle::{parse_stamp, stamp_text};
use keymanager_engine::{BackendError, BackendErrorKind};
use tokio::time::Instant;

use crate::naming;

/// One version of the shared CryptoKey, as the rotation needs it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct VersionInfo {
    /// The version's resource name.
    pub name: String,
    /// Its number.
    pub number: u64,
    /// ENABLED or PENDING_GENERATION.
    pub live: bool,
    /// Its algorithm.
    pub algorithm: Algorithm,
    /// When Cloud KMS created it.
    pub created: Option<SystemTime>,
}

/// What a shared rotation needs from Cloud KMS.
#[async_trait]
pub(crate) trait SharedOps: Send + Sync {
    /// Every version of `crypto_key`.
    async fn versions(&self, crypto_key: &str) -> Result<Vec<VersionInfo>, BackendError>;
    /// Creates the lock CryptoKey `lock_id` with `labels`: `true` when this call created it,
    /// `false` when it exists already.
    async fn create_lock(
        &self,
        lock_id: &str,
        labels: HashMap<String, String>,
    ) -> Result<bool, BackendError>;
    /// The labels of an existing lock.
    async fn lock_labels(&self, lock_id: &str) -> Result<HashMap<String, String>, BackendError>;
    /// Ends a lease early (best effort: the lease ends anyway).
    async fn release_lock(&self, lock_id: &str);
    /// Sets the algorithm new versions of `crypto_key` get.
    async fn set_template_algorithm(
        &self,
        crypto_key: &str,
        algorithm: &Algorithm,
    ) -> Result<(), BackendError>;
    /// Creates a version of `crypto_key`; returns its name.
    async fn create_version(&self, crypto_key: &str) -> Result<String, BackendError>;
}

/// Wall-clock time, injected so that leases can be tested.
pub(crate) trait WallClock: Send + Sync {
    /// Now.
    fn now(&self) -> SystemTime;
}

/// The system clock.
pub(crate) struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// One rotation of one shared CryptoKey.
pub(crate) struct SharedRotation<'a> {
    /// Cloud KMS.
    pub ops: &'a dyn SharedOps,
    /// The wall clock (leases and version ages).
    pub clock: &'a dyn WallClock,
    /// The shared CryptoKey's resource name.
    pub crypto_key: &'a str,
    /// The trust domain label value.
    pub td_hash: &'a str,
    /// This server's id, recorded on locks it takes.
    pub holder: &'a str,
    /// The lock lease (`shared_keys.lock_lease`).
    pub lease: Duration,
    /// How far clocks of servers may disagree (`clock_skew_allowance`).
    pub skew: Duration,
    /// Reuse a fresh version of another server (`shared_keys.reuse_window`).
    pub reuse_window: Duration,
    /// The longest a rotation may take, waits included.
    pub budget: Duration,
    /// The longest one Cloud KMS call may take.
    pub call_timeout: Duration,
    /// How often a waiter looks for the holder's version.
    pub poll: Duration,
    /// The highest version number of this key this process served from a GenerateKey.
    pub last_served: Option<u64>,
}

impl SharedRotation<'_> {
    /// Rotates to (or adopts) a version of `algorithm`; `template` is the algorithm the
    /// CryptoKey gives new versions now. Returns the version to serve.
    pub async fn rotate(
        &self,
        algorithm: &Algorithm,
        mut template: Algorithm,
    ) -> Result<String, BackendError> {
        let started = Instant::now();
        loop {
            self.check_budget(started)?;
            let versions = self.ops.versions(self.crypto_key).await?;
            if let Some(fresh) = self.reusable(&versions, algorithm) {
                tracing::info!(version = %fresh.name, "reusing a shared version another server created moments ago");
                return Ok(fresh.name.clone());
            }
            let basis = versions.iter().map(|v| v.number).max().unwrap_or(0);
            let mut attempt = 0u32;
            loop {
                self.check_budget(started)?;
                let lock_id = naming::lock_crypto_key_id(self.crypto_key, basis, attempt);
                let acquired_at = Instant::now();
                let expires = self.clock.now().checked_add(self.lease).ok_or_else(|| {
                    BackendError::new(BackendErrorKind::Internal, "lock lease out of range")
                })?;
                if self
                    .ops
                    .create_lock(&lock_id, self.lock_labels(expires))
                    .await?
                {
                    let created = self
                        .create_as_holder(basis, algorithm, &mut template, acquired_at)
                        .await;
                    self.ops.release_lock(&lock_id).await;
                    match created? {
                        Some(version) => {
                            tracing::info!(version = %version, lock = %lock_id, "created the shared version under the rotation lock");
                            return Ok(version);
                        }
                        // Someone created a version meanwhile: adopt it.
                        None => break,
                    }
                }
                let labels = self.ops.lock_labels(&lock_id).await?;
                if self.lease_expired(&labels) {
                    tracing::warn!(lock = %lock_id, holder = ?labels.get(naming::LABEL_LOCK_HOLDER), "rotation lock lease expired; taking over");
                    attempt += 1;
                    continue;
                }
                if self
                    .wait_for_new_version(basis, &lock_id, labels, started)
                    .await?
                {
                    break;
                }
                // The lease ran out without a version: contend for the next attempt.
                attempt += 1;
            }
        }
    }

    fn check_budget(&self, started: Instant) -> Result<(), BackendError> {
        if started.elapsed() > self.budget {
            return Err(BackendError::new(
                BackendErrorKind::Unavailable,
                format!(
                    "gave up rotating shared key {}: no version appeared within {}s",
                    self.crypto_key,
                    self.budget.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// The newest live version if it may be adopted: right algorithm, created inside the
    /// reuse window, and not one this process already served.
    fn reusable<'v>(
        &self,
        versions: &'v [VersionInfo],
        algorithm: &Algorithm,
    ) -> Option<&'v VersionInfo> {
        let newest = versions
            .iter()
            .filter(|v| v.live)
            .max_by_key(|v| v.number)?;
        let age = self
            .clock
            .now()
            .duration_since(newest.created?)
            .unwrap_or(Duration::ZERO);
        let served_here = self.last_served.is_some_and(|n| newest.number <= n);
        (&newest.algorithm == algorithm && age < self.reuse_window && !served_here)
            .then_some(newest)
    }

    /// The holder's part: check again, then create exactly one version. `None` when another
    /// version appeared since `basis` was read.
    async fn create_as_holder(
        &self,
        basis: u64,
        algorithm: &Algorithm,
        template: &mut Algorithm,
        acquired_at: Instant,
    ) -> Result<Option<String>, BackendError> {
        let versions = self.ops.versions(self.crypto_key).await?;
        if versions.iter().any(|v| v.number > basis) {
            return Ok(None);
        }
        if template != algorithm {
            self.ops
                .set_template_algorithm(self.crypto_key, algorithm)
                .await?;
            *template = algorithm.clone();
        }
        // By its own clock the lease ends at acquired_at + lease; waiters take over only
        // `skew` later by theirs. Starting the create call needs a full call timeout left.
        if acquired_at.elapsed() + self.call_timeout >= self.lease {
            return Err(BackendError::new(
                BackendErrorKind::Unavailable,
                format!(
                    "rotation lock of {} held too long to create a version safely; retry",
                    self.crypto_key
                ),
            ));
        }
        Ok(Some(self.ops.create_version(self.crypto_key).await?))
    }

    fn lock_labels(&self, expires: SystemTime) -> HashMap<String, String> {
        HashMap::from([
            (naming::LABEL_TRUST_DOMAIN.into(), self.td_hash.to_string()),
            (naming::LABEL_LOCK.into(), "true".into()),
            (naming::LABEL_LOCK_HOLDER.into(), self.holder.to_string()),
            (naming::LABEL_LOCK_EXPIRES.into(), stamp_text(expires)),
        ])
    }

    /// A lease without a readable end is over; one whose end plus the skew is out of range
    /// is not (the rotation's budget bounds the wait).
    fn lease_expired(&self, labels: &HashMap<String, String>) -> bool {
        let Some(expires) = labels
            .get(naming::LABEL_LOCK_EXPIRES)
            .and_then(|v| parse_stamp(v))
        else {
            return true;
        };
        expires
            .checked_add(self.skew)
            .is_some_and(|end| self.clock.now() > end)
    }

    /// Waits while the lock is held: true once a version newer than `basis` exists, false
    /// once the lease has run out (or was released) without one. Bounded by the budget.
    async fn wait_for_new_version(
        &self,
        basis: u64,
        lock_id: &str,
        mut labels: HashMap<String, String>,
        started: Instant,
    ) -> Result<bool, BackendError> {
        let mut checks = 0u32;
        loop {
            tokio::time::sleep(self.poll).await;
            let versions = self.ops.versions(self.crypto_key).await?;
            if versions.iter().any(|v| v.number > basis) {
                return Ok(true);
            }
            checks += 1;
            // Re-read the lease now and then: the holder may have released it empty-handed.
            if checks.is_multiple_of(5) {
                labels = self.ops.lock_labels(lock_id).await?;
            }
            if self.lease_expired(&labels) {
                tracing::debug!(lock = lock_id, holder = ?labels.get(naming::LABEL_LOCK_HOLDER), "rotation lock ended without a new version");
                return Ok(false);
            }
            self.check_budget(started)?;
        }
    }
}

/// The lease value a holder writes to release its lock early.
pub(crate) const RELEASED: &str = "0";

#[cfg(test)]
mod tests;
