//! Liveness stamps and the stale-key sweep, for backends whose keys outlive the server that
//! created them (every KMS). The backend provides three primitives through
//! [`KeyLifecycle`]; when to call them and what may be deleted is decided here, once.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::backend::{BackendError, BackendKey};
use crate::sweep::{KeyRecord, SweepDecision, SweepPolicy, SweeperIdentity, plan_sweep};

/// A liveness stamp as KMS tags and labels hold it: Unix seconds in decimal.
pub fn stamp_text(at: SystemTime) -> String {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        .to_string()
}

/// Reads a stamp written by [`stamp_text`]; anything else is no evidence.
pub fn parse_stamp(text: &str) -> Option<SystemTime> {
    text.parse::<u64>()
        .ok()
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The primitives a KMS backend provides for liveness and clean-up.
#[async_trait]
pub trait KeyLifecycle: Send + Sync {
    /// Who this server is, as the backend tags keys.
    fn identity(&self) -> SweeperIdentity;

    /// Refreshes the liveness stamp of keys this server serves.
    async fn stamp(&self, keys: &[BackendKey], now: SystemTime) -> Result<(), BackendError>;

    /// Every key of this trust domain (all servers), with the metadata the sweep needs.
    /// Must be scoped by trust domain: never a listing of the whole account.
    async fn list_trust_domain_keys(&self) -> Result<Vec<KeyRecord>, BackendError>;

    /// Puts a key on the deletion path, recording the intent first.
    async fn delete(&self, locator: &str) -> Result<(), BackendError>;
}

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

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Every decision, with its reason.
    pub decisions: Vec<SweepDecision>,
    /// Locators whose deletion failed (they are retried by the next sweep).
    pub failed: Vec<String>,
}

/// Runs one sweep: lists, decides with [`plan_sweep`], deletes. `in_use` holds the
/// locators the engine serves right now; they are never deleted.
pub async fn run_sweep(
    lifecycle: &dyn KeyLifecycle,
    in_use: &HashSet<String>,
    now: SystemTime,
    policy: SweepPolicy,
) -> Result<SweepReport, BackendError> {
    let records = lifecycle.list_trust_domain_keys().await?;
    let decisions = plan_sweep(now, &lifecycle.identity(), in_use, &records, policy);
    let mut failed = Vec::new();
    for decision in &decisions {
        match decision {
            SweepDecision::Delete { locator, reason } => match lifecycle.delete(locator).await {
                Ok(()) => {
                    tracing::info!(key = %locator, %reason, "stale key put on the deletion path")
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
    Ok(SweepReport { decisions, failed })
}

#[cfg(test)]
mod tests {
    #[test]
    fn stamps_round_trip_and_garbage_is_no_evidence() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_450_839);
        assert_eq!(super::stamp_text(at), "1795450839");
        assert_eq!(super::parse_stamp("1795450839"), Some(at));
        assert_eq!(super::parse_stamp("yesterday"), None);
    }

    use std::sync::Mutex;

    use super::*;
    use crate::backend::BackendErrorKind;
    use crate::sweep::StoreKeyState;

    struct FakeLifecycle {
        records: Vec<KeyRecord>,
        deleted: Mutex<Vec<String>>,
        fail_delete: Option<String>,
    }

    #[async_trait]
    impl KeyLifecycle for FakeLifecycle {
        fn identity(&self) -> SweeperIdentity {
            SweeperIdentity {
                trust_domain: "example.org".into(),
                server_id: "me".into(),
            }
        }
        async fn stamp(&self, _keys: &[BackendKey], _now: SystemTime) -> Result<(), BackendError> {
            Ok(())
        }
        async fn list_trust_domain_keys(&self) -> Result<Vec<KeyRecord>, BackendError> {
            Ok(self.records.clone())
        }
        async fn delete(&self, locator: &str) -> Result<(), BackendError> {
            if self.fail_delete.as_deref() == Some(locator) {
                return Err(BackendError::new(
                    BackendErrorKind::Unavailable,
                    "throttled",
                ));
            }
            self.deleted.lock().unwrap().push(locator.to_string());
            Ok(())
        }
    }

    fn record(locator: &str, server: &str, days_ago: u64) -> KeyRecord {
        KeyRecord {
            locator: locator.into(),
            trust_domain: Some("example.org".into()),
            server_id: Some(server.into()),
            state: StoreKeyState::Enabled,
            active: true,
            last_stamp: Some(
                SystemTime::UNIX_EPOCH + Duration::from_secs(100 * 86400 - days_ago * 86400),
            ),
            created: None,
            deletion_intent: false,
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
    }
}
