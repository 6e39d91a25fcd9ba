//! Key lifecycle for stores whose keys outlive the server that created them (every KMS):
//! liveness stamps, the stale-key sweep, and when each runs — in one module.
//!
//! - [`stamp`]: the stamp codec (total: junk is no evidence, never a panic);
//! - [`rules`]: which keys a sweep may delete, a pure function;
//! - [`run_sweep`]: one sweep (list without side effects, decide, delete);
//! - [`LifecycleSchedule`]: the `liveness_interval`, `sweep_interval`, `stale_key_age` and
//!   `clock_skew_allowance` settings;
//! - [`spawn_tasks`]: the stamper and sweeper loops, which survive errors and panics.
//!
//! A backend provides the store primitives through [`KeyLifecycle`]; everything else is here.

pub mod rules;
pub mod stamp;
mod tasks;

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

pub use rules::{
    KeyRecord, StoreKeyState, SweepDecision, SweepPolicy, SweeperIdentity, plan_sweep,
};
pub use stamp::{parse_stamp, stamp_text};
pub use tasks::{LifecycleTasks, spawn_tasks};

use crate::backend::{BackendError, KeyHandle, StoredKey};
use crate::settings::{Settings, SettingsError};

/// The store primitives a KMS backend provides for liveness and clean-up.
#[async_trait]
pub trait KeyLifecycle: Send + Sync + 'static {
    /// The backend's key handle.
    type Handle: KeyHandle;

    /// Who this server is, as the backend tags keys.
    fn identity(&self) -> SweeperIdentity;

    /// Refreshes the liveness stamp of keys this server serves. Changes nothing else on
    /// the key as it was read (does not re-activate it), and skips a key that is no longer
    /// this server's.
    async fn stamp(
        &self,
        keys: &[StoredKey<Self::Handle>],
        now: SystemTime,
    ) -> Result<(), BackendError>;

    /// Every key of this trust domain (all servers), with the metadata the sweep needs.
    /// Scoped by trust domain, never a listing of the whole account, and free of side
    /// effects: reads only.
    async fn list(&self) -> Result<Vec<KeyRecord>, BackendError>;

    /// Puts a key on the deletion path, recording the intent first where the store allows.
    async fn delete(&self, record: &KeyRecord) -> Result<(), BackendError>;

    /// Store housekeeping at the end of a sweep (Azure Key Vault: purging this server's
    /// soft-deleted keys when configured). A failure is logged; the sweep still counts.
    async fn after_sweep(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// The schedule settings every lifecycle backend accepts.
pub const SCHEDULE_KEYS: &[&str] = &[
    "liveness_interval",
    "sweep_interval",
    "stale_key_age",
    "clock_skew_allowance",
];

/// When stamps and sweeps run, and what counts as stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifecycleSchedule {
    /// How often this server stamps its keys.
    pub stamp_every: Duration,
    /// How often it sweeps the trust domain.
    pub sweep_every: Duration,
    /// The sweep's thresholds.
    pub policy: SweepPolicy,
}

impl Default for LifecycleSchedule {
    /// SPIRE's KMS key managers: stamp every 6 hours, sweep daily, 14 days stale.
    fn default() -> Self {
        Self {
            stamp_every: Duration::from_secs(6 * 3600),
            sweep_every: Duration::from_secs(24 * 3600),
            policy: SweepPolicy::default(),
        }
    }
}

impl LifecycleSchedule {
    /// Takes the [`SCHEDULE_KEYS`] out of `settings` (durations such as `"6h"`, `"14d"`).
    pub fn take_from(settings: &mut Settings) -> Result<Self, SettingsError> {
        Self::take_from_with(settings, Self::default())
    }

    /// As [`LifecycleSchedule::take_from`], starting from a backend's own defaults (SPIRE's
    /// `azure_key_vault` sweeps every 48 hours, not daily).
    pub fn take_from_with(settings: &mut Settings, defaults: Self) -> Result<Self, SettingsError> {
        let mut schedule = defaults;
        if let Some(every) = settings.take_duration("liveness_interval")? {
            schedule.stamp_every = every;
        }
        if let Some(every) = settings.take_duration("sweep_interval")? {
            schedule.sweep_every = every;
        }
        if let Some(age) = settings.take_duration("stale_key_age")? {
            schedule.policy.stale_after = age;
        }
        if let Some(skew) = settings.take_duration("clock_skew_allowance")? {
            schedule.policy.max_clock_skew = skew;
        }
        if let Some(grace) = crate::failpoint::half_created_grace() {
            schedule.policy.half_created_grace = grace;
        }
        if schedule.stamp_every >= schedule.policy.stale_after {
            return Err(SettingsError::invalid(
                "liveness_interval",
                format!(
                    "{:?} must be shorter than stale_key_age ({:?}), or other servers would sweep this server's live keys",
                    schedule.stamp_every, schedule.policy.stale_after
                ),
            ));
        }
        Ok(schedule)
    }
}

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Every decision, with its reason.
    pub decisions: Vec<SweepDecision>,
    /// Locators whose deletion failed (they are retried by the next sweep).
    pub failed: Vec<String>,
    /// The store's state of every key listed, as listed (before this sweep's deletions).
    pub store_states: Vec<StoreKeyState>,
}

impl SweepReport {
    /// Keys put on the deletion path.
    pub fn deleted(&self) -> usize {
        self.decisions.iter().filter(|d| d.is_delete()).count() - self.failed.len()
    }
}

/// Runs one sweep: lists, decides with [`plan_sweep`], deletes. `in_use` holds the
/// locators the engine serves right now; they are never deleted.
pub async fn run_sweep<H: KeyHandle>(
    lifecycle: &dyn KeyLifecycle<Handle = H>,
    in_use: &HashSet<String>,
    now: SystemTime,
    policy: SweepPolicy,
) -> Result<SweepReport, BackendError> {
    let records = lifecycle.list().await?;
    let decisions = plan_sweep(now, &lifecycle.identity(), in_use, &records, policy);
    crate::failpoint!("sweep.after_list");
    let mut failed = Vec::new();
    for (decision, record) in decisions.iter().zip(&records) {
        match decision {
            SweepDecision::Delete { locator, reason } => match lifecycle.delete(record).await {
                Ok(()) => {
                    tracing::info!(key = %locator, %reason, "stale key put on the deletion path");
                    crate::failpoint!("sweep.after_delete");
                }
                Err(error) => {
                    tracing::warn!(key = %locator, %error, "could not delete a stale key; the next sweep retries");
                    failed.push(locator.clone());
                }
            },
            SweepDecision::Keep { locator, reason } => {
                tracing::debug!(key = %locator, %reason, "sweep keeps key")
            }
        }
    }
    if let Err(error) = lifecycle.after_sweep().await {
        tracing::warn!(%error, "housekeeping after the sweep failed; the next sweep retries");
    }
    Ok(SweepReport {
        decisions,
        failed,
        store_states: records.iter().map(|r| r.state).collect(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::backend::BackendErrorKind;
    use crate::settings::SettingValue;

    #[derive(Clone, Debug)]
    struct Locator(String);
    impl KeyHandle for Locator {
        fn locator(&self) -> &str {
            &self.0
        }
    }

    struct FakeLifecycle {
        records: Vec<KeyRecord>,
        deleted: Mutex<Vec<String>>,
        fail_delete: Option<String>,
    }

    #[async_trait]
    impl KeyLifecycle for FakeLifecycle {
        type Handle = Locator;
        fn identity(&self) -> SweeperIdentity {
            SweeperIdentity {
                trust_domain: "example.org".into(),
                server_id: "me".into(),
            }
        }
        async fn stamp(
            &self,
            _keys: &[StoredKey<Locator>],
            _now: SystemTime,
        ) -> Result<(), BackendError> {
            Ok(())
        }
        async fn list(&self) -> Result<Vec<KeyRecord>, BackendError> {
            Ok(self.records.clone())
        }
        async fn delete(&self, record: &KeyRecord) -> Result<(), BackendError> {
            if self.fail_delete.as_deref() == Some(record.locator.as_str()) {
                return Err(BackendError::new(
                    BackendErrorKind::Unavailable,
                    "throttled",
                ));
            }
            self.deleted.lock().unwrap().push(record.locator.clone());
            Ok(())
        }
    }

    fn record(locator: &str, server: &str, days_ago: u64) -> KeyRecord {
        KeyRecord {
            locator: locator.into(),
            trust_domain: Some("example.org".into()),
            server_id: Some(server.into()),
            state: StoreKeyState::Enabled,
            key_id: Some("x509-CA-A".into()),
            published: true,
            last_stamp: Some(
                SystemTime::UNIX_EPOCH + Duration::from_secs(100 * 86400 - days_ago * 86400),
            ),
            created: None,
            deletion_intent: false,
            replaced: None,
            replaced_by: None,
        }
    }

    #[tokio::test]
    async fn sweep_deletes_only_what_the_rules_allow_and_reports_failures() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100 * 86400);
        let lifecycle = FakeLifecycle {
            records: vec![
                record("stale-other", "other", 30),
                record("fresh-other", "other", 1),
                record("mine-in-use", "me", 30),
                record("stale-failing", "other", 30),
            ],
            deleted: Mutex::new(Vec::new()),
            fail_delete: Some("stale-failing".into()),
        };
        let in_use: HashSet<String> = ["mine-in-use".to_string()].into();
        let report = run_sweep(&lifecycle, &in_use, now, SweepPolicy::default())
            .await
            .unwrap();
        assert_eq!(
            *lifecycle.deleted.lock().unwrap(),
            vec!["stale-other".to_string()]
        );
        assert_eq!(report.failed, vec!["stale-failing".to_string()]);
        assert_eq!(report.decisions.iter().filter(|d| d.is_delete()).count(), 2);
        assert_eq!(report.deleted(), 1);
    }

    #[test]
    fn schedule_settings_parse_and_refuse_a_stamp_interval_past_the_stale_age() {
        let settings = |pairs: &[(&str, &str)]| {
            Settings::new(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), SettingValue::String(v.to_string())))
                    .collect(),
            )
        };
        let schedule = LifecycleSchedule::take_from(&mut settings(&[
            ("liveness_interval", "1h"),
            ("sweep_interval", "2h"),
            ("stale_key_age", "3d"),
            ("clock_skew_allowance", "30s"),
        ]))
        .unwrap();
        assert_eq!(schedule.stamp_every, Duration::from_secs(3600));
        assert_eq!(schedule.sweep_every, Duration::from_secs(7200));
        assert_eq!(schedule.policy.stale_after, Duration::from_secs(3 * 86400));
        assert_eq!(schedule.policy.max_clock_skew, Duration::from_secs(30));
        let err = LifecycleSchedule::take_from(&mut settings(&[("liveness_interval", "20d")]))
            .unwrap_err();
        assert!(err.to_string().contains("liveness_interval"), "{err}");
    }
}
