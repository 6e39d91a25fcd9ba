//! Stale-key sweep rules, written once for every KMS backend.
//!
//! A backend lists the keys of its trust domain with the metadata it keeps on them (tags,
//! labels), and [`plan_sweep`] decides which may be put on the deletion path. The rules are
//! deliberately conservative: **when in doubt, keep**. A leaked key costs money; a deleted
//! key that is still in use takes a trust domain's CA down.
//!
//! Rules, in order:
//! 1. Keys without this trust domain's marker, or without a server id, were not created by
//!    this plugin for this trust domain: never touched.
//! 2. Keys already pending deletion: nothing to do.
//! 3. Keys this server is using right now (in the engine's cache): kept, whatever their tags.
//! 4. Keys whose deletion intent was recorded (by this server or any other of the trust
//!    domain) are finished off: the intent survives crashes, so nothing leaks.
//! 5. This server's own keys that it is not using:
//!    - a key discovery does not find (never published: a GenerateKey crashed or failed
//!      before its publish step; or replaced: it crashed before its retire step) is a
//!      leftover, deleted once it is older than the half-created grace period (a GenerateKey
//!      may still be in flight);
//!    - a key discovery finds is this server id's current key: another replica with the same
//!      server id may be using it, so it is kept until its stamp is stale.
//! 6. Other servers' keys: deleted when their newest liveness evidence (stamp, else creation
//!    time) is older than the stale threshold plus the allowed clock skew.
//! 7. A key with no liveness evidence at all is kept and reported.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

/// Seconds in a day.
const DAY: u64 = 24 * 3600;

/// Thresholds of the sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SweepPolicy {
    /// A key whose liveness stamp is older than this belongs to a dead server.
    pub stale_after: Duration,
    /// Own keys never activated are abandoned after this long (a crashed GenerateKey).
    pub half_created_grace: Duration,
    /// Clocks of servers in one trust domain may disagree by this much.
    pub max_clock_skew: Duration,
}

impl Default for SweepPolicy {
    /// 14 days stale (SPIRE's KMS key managers), 1 hour grace, 10 minutes skew.
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(14 * DAY),
            half_created_grace: Duration::from_secs(3600),
            max_clock_skew: Duration::from_secs(600),
        }
    }
}

/// Who is sweeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweeperIdentity {
    /// The trust domain marker as the backend stores it (raw or hashed).
    pub trust_domain: String,
    /// This server's id.
    pub server_id: String,
}

/// A key's lifecycle state in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKeyState {
    /// Usable.
    Enabled,
    /// Disabled but not scheduled for deletion.
    Disabled,
    /// Created, but the store holds no key material for it yet (AWS `PendingImport`: an
    /// import interrupted before its material arrived). It never signed and cannot be
    /// enabled; unpublished, it is a leftover like any other.
    Incomplete,
    /// Already scheduled for deletion or destruction.
    PendingDeletion,
}

/// What a backend knows about one key in its store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// The backend's name for the key (ARN, resource name). Never secret.
    pub locator: String,
    /// Trust domain marker tag, if any.
    pub trust_domain: Option<String>,
    /// Server id tag, if any.
    pub server_id: Option<String>,
    /// The store's state.
    pub state: StoreKeyState,
    /// The SPIRE key id, when the store records it.
    pub key_id: Option<String>,
    /// Whether discovery finds this key for its id: the alias points at it, it is the newest
    /// enabled version of an active CryptoKey, it is the active key of its id. A key that is
    /// not published is a leftover of an interrupted GenerateKey (or a superseded version).
    pub published: bool,
    /// The newest liveness stamp, if any.
    pub last_stamp: Option<SystemTime>,
    /// When the store created the key, if known.
    pub created: Option<SystemTime>,
    /// A recorded intent to delete (the key was superseded).
    pub deletion_intent: bool,
    /// When the key was replaced under its id, where the store records it (the deletion
    /// intent's time, the next version's creation).
    pub replaced: Option<SystemTime>,
    /// The key that replaced it (its locator or the store's id for it), where the store
    /// records it (see README, "Rotation history").
    pub replaced_by: Option<String>,
}

/// What the sweep decided for one key, with the reason in words for logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SweepDecision {
    /// Put on the deletion path.
    Delete {
        /// The key.
        locator: String,
        /// Why.
        reason: String,
    },
    /// Left alone.
    Keep {
        /// The key.
        locator: String,
        /// Why.
        reason: String,
    },
}

impl SweepDecision {
    /// The key's locator.
    pub fn locator(&self) -> &str {
        match self {
            Self::Delete { locator, .. } | Self::Keep { locator, .. } => locator,
        }
    }

    /// True for a deletion.
    pub fn is_delete(&self) -> bool {
        matches!(self, Self::Delete { .. })
    }
}

/// Decides, for every record, whether it may be put on the deletion path. `in_use` holds the
/// locators this server's engine currently serves.
pub fn plan_sweep(
    now: SystemTime,
    me: &SweeperIdentity,
    in_use: &HashSet<String>,
    records: &[KeyRecord],
    policy: SweepPolicy,
) -> Vec<SweepDecision> {
    records
        .iter()
        .map(|record| decide(now, me, in_use, record, policy))
        .collect()
}

fn decide(
    now: SystemTime,
    me: &SweeperIdentity,
    in_use: &HashSet<String>,
    record: &KeyRecord,
    policy: SweepPolicy,
) -> SweepDecision {
    let keep = |reason: &str| SweepDecision::Keep {
        locator: record.locator.clone(),
        reason: reason.to_string(),
    };
    let delete = |reason: String| SweepDecision::Delete {
        locator: record.locator.clone(),
        reason,
    };

    if record.trust_domain.as_deref() != Some(me.trust_domain.as_str()) {
        return keep("not a key of this trust domain");
    }
    let Some(owner) = record.server_id.as_deref().filter(|id| !id.is_empty()) else {
        return keep("no server id tag: not created by this plugin");
    };
    if record.state == StoreKeyState::PendingDeletion {
        return keep("already pending deletion");
    }
    if in_use.contains(&record.locator) {
        return keep("in use by this server");
    }
    if record.deletion_intent {
        return delete("deletion intent recorded when the key was superseded".into());
    }

    let evidence = record.last_stamp.or(record.created);
    let age = evidence.map(|t| now.duration_since(t).unwrap_or(Duration::ZERO));
    // Checked arithmetic throughout: thresholds come from configuration and evidence from
    // anyone who can tag a key; neither may overflow into a panic.
    let from_future = evidence.is_some_and(|t| {
        now.checked_add(policy.max_clock_skew)
            .is_none_or(|latest_fresh| t > latest_fresh)
    });
    let stale_after = policy.stale_after.saturating_add(policy.max_clock_skew);
    let grace = policy
        .half_created_grace
        .saturating_add(policy.max_clock_skew);

    if owner == me.server_id {
        if record.published {
            // Possibly served by a replica with the same server id: only a stale stamp
            // proves nobody uses it.
            return match age {
                Some(age) if !from_future && age > stale_after => delete(format!(
                    "own published key not in use and not stamped for {}",
                    days(age)
                )),
                _ => keep(
                    "own published key with a fresh stamp: another replica with this server id may use it",
                ),
            };
        }
        return match record
            .created
            .map(|c| now.duration_since(c).unwrap_or(Duration::ZERO))
        {
            Some(age) if age > grace => delete(format!(
                "own key that discovery does not find (left by an interrupted GenerateKey), created {} ago",
                minutes(age)
            )),
            Some(_) => keep("own unpublished key, but young: a GenerateKey may be in flight"),
            None => keep("own unpublished key without a creation time"),
        };
    }

    match age {
        None => keep("no liveness stamp or creation time: cannot tell whether it is in use"),
        Some(_) if from_future => {
            keep("liveness stamp is in the future beyond the allowed clock skew")
        }
        Some(age) if age > stale_after => delete(format!(
            "server {owner} has not stamped this key for {}",
            days(age)
        )),
        Some(_) => keep("another server's key with a fresh stamp"),
    }
}

fn days(d: Duration) -> String {
    format!("{:.1} days", d.as_secs_f64() / DAY as f64)
}

fn minutes(d: Duration) -> String {
    format!("{} minutes", d.as_secs() / 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn ago(secs: u64) -> Option<SystemTime> {
        Some(now() - Duration::from_secs(secs))
    }

    fn me() -> SweeperIdentity {
        SweeperIdentity {
            trust_domain: "example.org".into(),
            server_id: "server-a".into(),
        }
    }

    fn record(server: &str) -> KeyRecord {
        KeyRecord {
            locator: format!("key/{server}"),
            trust_domain: Some("example.org".into()),
            server_id: Some(server.into()),
            state: StoreKeyState::Enabled,
            key_id: Some("x509-CA-A".into()),
            published: true,
            last_stamp: ago(H),
            created: ago(30 * DAY),
            deletion_intent: false,
            replaced: None,
            replaced_by: None,
        }
    }

    fn decide_one(record: KeyRecord, in_use: &[&str]) -> SweepDecision {
        let in_use = in_use.iter().map(|s| s.to_string()).collect();
        plan_sweep(now(), &me(), &in_use, &[record], SweepPolicy::default()).remove(0)
    }

    #[test]
    fn keys_in_use_are_never_deleted_whatever_their_tags_say() {
        let mut r = record("server-a");
        r.deletion_intent = true;
        r.last_stamp = ago(365 * DAY);
        r.published = false;
        assert!(!decide_one(r.clone(), &["key/server-a"]).is_delete());
        r.server_id = Some("server-b".into());
        r.locator = "key/server-b".into();
        assert!(!decide_one(r, &["key/server-b"]).is_delete());
    }

    #[test]
    fn foreign_and_untagged_keys_are_never_touched() {
        let mut r = record("server-b");
        r.last_stamp = ago(365 * DAY);
        r.trust_domain = Some("other.org".into());
        assert!(!decide_one(r.clone(), &[]).is_delete());
        r.trust_domain = None;
        assert!(!decide_one(r.clone(), &[]).is_delete());
        r.trust_domain = Some("example.org".into());
        r.server_id = None;
        assert!(!decide_one(r.clone(), &[]).is_delete());
        r.server_id = Some(String::new());
        assert!(!decide_one(r, &[]).is_delete());
    }

    #[test]
    fn recorded_deletion_intent_is_finished_after_a_crash() {
        let mut r = record("server-a");
        r.deletion_intent = true;
        assert!(decide_one(r.clone(), &[]).is_delete());
        r.state = StoreKeyState::PendingDeletion;
        assert!(
            !decide_one(r, &[]).is_delete(),
            "already on the deletion path"
        );
    }

    #[test]
    fn other_servers_keys_go_only_after_the_stale_threshold_plus_skew() {
        let policy = SweepPolicy::default();
        let mut r = record("server-b");
        r.last_stamp = ago(14 * DAY);
        assert!(
            !decide_one(r.clone(), &[]).is_delete(),
            "exactly 14 days is not stale"
        );
        r.last_stamp = ago(14 * DAY + policy.max_clock_skew.as_secs());
        assert!(
            !decide_one(r.clone(), &[]).is_delete(),
            "within the skew allowance"
        );
        r.last_stamp = ago(14 * DAY + policy.max_clock_skew.as_secs() + 1);
        assert!(decide_one(r.clone(), &[]).is_delete());
        r.state = StoreKeyState::Disabled;
        assert!(decide_one(r, &[]).is_delete(), "disabled stale keys go too");
    }

    #[test]
    fn missing_stamps_fall_back_to_creation_time_or_keep() {
        let mut r = record("server-b");
        r.last_stamp = None;
        r.created = ago(30 * DAY);
        assert!(decide_one(r.clone(), &[]).is_delete());
        r.created = ago(DAY);
        assert!(!decide_one(r.clone(), &[]).is_delete());
        r.created = None;
        let decision = decide_one(r, &[]);
        assert!(!decision.is_delete());
        assert!(
            matches!(decision, SweepDecision::Keep { reason, .. } if reason.contains("cannot tell"))
        );
    }

    #[test]
    fn absurd_thresholds_and_evidence_never_overflow() {
        let huge = SweepPolicy {
            stale_after: Duration::MAX,
            half_created_grace: Duration::MAX,
            max_clock_skew: Duration::MAX,
        };
        let mut r = record("server-b");
        r.last_stamp = Some(SystemTime::UNIX_EPOCH);
        let in_use = HashSet::new();
        let decisions = plan_sweep(now(), &me(), &in_use, &[r.clone()], huge);
        assert!(!decisions[0].is_delete());
        r.server_id = Some("server-a".into());
        r.published = false;
        let decisions = plan_sweep(now(), &me(), &in_use, &[r], huge);
        assert!(!decisions[0].is_delete());
    }

    #[test]
    fn stamps_from_the_future_keep_the_key() {
        let mut r = record("server-b");
        r.last_stamp = Some(now() + Duration::from_secs(2 * H));
        r.created = ago(365 * DAY);
        assert!(!decide_one(r.clone(), &[]).is_delete());
        // A small skew into the future is just a fresh stamp.
        r.last_stamp = Some(now() + Duration::from_secs(60));
        assert!(!decide_one(r, &[]).is_delete());
    }

    #[test]
    fn own_unpublished_keys_go_after_the_grace_period() {
        let mut r = record("server-a");
        r.published = false;
        r.last_stamp = None;
        r.created = ago(10 * 60);
        assert!(
            !decide_one(r.clone(), &[]).is_delete(),
            "a GenerateKey may still be running"
        );
        r.created = ago(2 * H);
        assert!(decide_one(r.clone(), &[]).is_delete());
        r.created = None;
        assert!(!decide_one(r, &[]).is_delete());
    }

    #[test]
    fn same_server_id_on_two_replicas_keeps_the_other_replicas_active_key() {
        // Replica 2 uses a key this replica does not have in its cache.
        let mut r = record("server-a");
        r.published = true;
        r.last_stamp = ago(6 * H);
        assert!(!decide_one(r.clone(), &[]).is_delete());
        // Once nobody has stamped it for longer than the threshold, it is abandoned.
        r.last_stamp = ago(20 * DAY);
        assert!(decide_one(r, &[]).is_delete());
    }

    #[test]
    fn a_server_whose_identity_changed_leaves_keys_that_others_remove() {
        // Server "server-old" became "server-a" (identity file lost): its keys are foreign
        // now and go once stale; keys that server-a uses stay.
        let mut old = record("server-old");
        old.last_stamp = ago(15 * DAY);
        let mut mine = record("server-a");
        mine.locator = "key/mine".into();
        let in_use: HashSet<String> = ["key/mine".to_string()].into();
        let decisions = plan_sweep(now(), &me(), &in_use, &[old, mine], SweepPolicy::default());
        assert!(decisions[0].is_delete());
        assert!(!decisions[1].is_delete());
        assert_eq!(decisions[1].locator(), "key/mine");
    }
}
