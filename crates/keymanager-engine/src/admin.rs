//! What the operator CLI sees of a backend: the plugin's own discovery, listing, sweep rules
//! and deletion path, plus the few store operations only an operator runs by hand
//! ([`KeyOperator`]: enable, disable, a key's access policy, the store's own checks).
//!
//! Nothing here is backend-specific: [`KeyAdmin`] is built by the engine from a backend's
//! [`Backend`], [`KeyLifecycle`] and [`KeyOperator`], and [`inventory`] turns what they
//! return into the rows `keys list` prints. `keys prune` decides with the sweep's own
//! [`plan_sweep`], so its decisions are the plugin's.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::backend::{Backend, BackendError, BackendErrorKind, KeyHandle};
use crate::core::key::{Fingerprint, KeyId, KeyType};
use crate::core::private_key::PrivateKeyMaterial;
use crate::engine::{Engine, EngineOptions, Imported};
use crate::error::EngineError;
use crate::lifecycle::{
    KeyLifecycle, KeyRecord, StoreKeyState, SweepDecision, SweepPolicy, SweeperIdentity, plan_sweep,
};

/// Store operations an operator runs by hand, addressed by locator. Every method but
/// [`KeyOperator::public_key_at`] has a default for stores that lack the operation.
#[async_trait]
pub trait KeyOperator: Send + Sync + 'static {
    /// The type and DER public key of any key of the trust domain, by its locator.
    async fn public_key_at(&self, locator: &str) -> Result<(KeyType, Arc<[u8]>), BackendError>;

    /// Enables or disables a key without deleting it.
    async fn set_enabled(&self, _record: &KeyRecord, _enabled: bool) -> Result<(), BackendError> {
        Err(BackendError::new(
            BackendErrorKind::FailedPrecondition,
            "this store has no disabled state for keys",
        ))
    }

    /// What happens to a key put on the deletion path.
    fn deletion_window(&self) -> DeletionWindow {
        DeletionWindow::Immediate
    }

    /// Who may use the key (its key policy, IAM bindings), one line per statement or
    /// binding; empty where the store has no per-key policy.
    async fn access_summary(&self, _locator: &str) -> Result<Vec<String>, BackendError> {
        Ok(Vec::new())
    }

    /// A URL of the store whose HTTP `Date` header gives the store's clock (for `doctor`'s
    /// skew check); `None` for a store without one (a PKCS#11 token, a file).
    fn clock_url(&self) -> Option<String> {
        None
    }

    /// The store's own checks for `doctor`: where credentials came from, reachability and
    /// clock, the permissions the README lists. Read-only: never creates, signs or deletes.
    async fn checks(&self) -> Vec<Check> {
        Vec::new()
    }
}

/// When a key put on the deletion path is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeletionWindow {
    /// At once.
    Immediate,
    /// After a waiting period during which the deletion can be cancelled.
    Scheduled {
        /// The waiting period.
        after: Duration,
        /// The store's name for it (`PendingWindowInDays`).
        what: &'static str,
    },
}

impl fmt::Display for DeletionWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Immediate => f.write_str("deleted at once"),
            Self::Scheduled { after, what } => write!(
                f,
                "scheduled for deletion; gone in {} ({what}), cancellable until then",
                human_duration(*after)
            ),
        }
    }
}

/// One `doctor` check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Passed or not.
    pub outcome: CheckOutcome,
    /// What was found.
    pub detail: String,
    /// What to do when it failed.
    pub fix: Option<String>,
}

impl Check {
    /// A passed check.
    pub fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            outcome: CheckOutcome::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    /// A failed check with what to do.
    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            outcome: CheckOutcome::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// A finding that does not fail `doctor`.
    pub fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            outcome: CheckOutcome::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// A check from a call's result: ok with `detail`, or failed with the error and `fix`.
    pub fn from_result<T>(
        name: impl Into<String>,
        result: &Result<T, BackendError>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        match result {
            Ok(_) => Self::ok(name, detail),
            Err(error) => Self::fail(name, error.to_string(), fix),
        }
    }
}

/// A check's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckOutcome {
    /// Passed.
    Ok,
    /// Worth a look; does not fail `doctor`.
    Warn,
    /// Failed.
    Fail,
}

/// A key this server's discovery finds: the key the plugin would serve for its id.
#[derive(Clone, Debug)]
pub struct ServedKey {
    /// The SPIRE key id.
    pub key_id: String,
    /// Its type.
    pub key_type: KeyType,
    /// DER SubjectPublicKeyInfo.
    pub spki_der: Arc<[u8]>,
    /// The backend's locator.
    pub locator: String,
}

/// The operator's view of one opened backend. Built by the engine; object safe.
#[async_trait]
pub trait KeyAdmin: Send + Sync {
    /// The backend's name.
    fn backend(&self) -> &'static str;

    /// This server's trust domain and server id as the store tags keys; `None` for a
    /// backend whose keys die with the server's store (`disk`).
    fn identity(&self) -> Option<SweeperIdentity>;

    /// This server's keys as discovery finds them.
    async fn served(&self) -> Result<Vec<ServedKey>, BackendError>;

    /// Every key of the trust domain with the sweep's metadata; `None` without a lifecycle.
    async fn records(&self) -> Result<Option<Vec<KeyRecord>>, BackendError>;

    /// A key's type and public key by locator.
    async fn public_key_at(&self, locator: &str) -> Result<(KeyType, Arc<[u8]>), BackendError>;

    /// Puts a key on the deletion path (the sweep's own deletion).
    async fn delete(&self, record: &KeyRecord) -> Result<(), BackendError>;

    /// Enables or disables a key.
    async fn set_enabled(&self, record: &KeyRecord, enabled: bool) -> Result<(), BackendError>;

    /// What a deletion does in this store.
    fn deletion_window(&self) -> DeletionWindow;

    /// A key's access policy, summarised.
    async fn access_summary(&self, locator: &str) -> Result<Vec<String>, BackendError>;

    /// The store's own `doctor` checks.
    async fn checks(&self) -> Vec<Check>;

    /// Where the store's clock can be read (see [`KeyOperator::clock_url`]).
    fn clock_url(&self) -> Option<String>;

    /// Whether the store can take imported key material.
    fn can_import(&self) -> bool;

    /// Imports each key under its id, in order, through one engine (one discovery, then
    /// the same two phases as GenerateKey for each; see `Engine::import_key`). The outer
    /// error is the engine's start; each import has its own result.
    async fn import(
        &self,
        keys: &[(KeyId, PrivateKeyMaterial)],
        replace: bool,
    ) -> Result<Vec<Result<Imported, EngineError>>, EngineError>;

    /// The private keys of this server's keys, sorted by id, for `keys migrate`; `None`
    /// when the store's keys cannot leave it.
    async fn export(&self) -> Result<Option<Vec<(KeyId, PrivateKeyMaterial)>>, EngineError>;
}

/// [`KeyAdmin`] for a backend `B`.
pub(crate) struct AdminOf<B: Backend> {
    pub(crate) backend: Arc<B>,
    pub(crate) lifecycle: Option<Arc<dyn KeyLifecycle<Handle = B::Handle>>>,
    pub(crate) operator: Option<Arc<dyn KeyOperator>>,
}

fn no_lifecycle(backend: &str, what: &str) -> BackendError {
    BackendError::new(
        BackendErrorKind::FailedPrecondition,
        format!(
            "the {backend} backend keeps only the keys it serves (no other servers' keys, no leftovers): {what} is not available; stop spire-server and edit its key store instead"
        ),
    )
}

#[async_trait]
impl<B: Backend> KeyAdmin for AdminOf<B> {
    fn backend(&self) -> &'static str {
        self.backend.name()
    }

    fn identity(&self) -> Option<SweeperIdentity> {
        self.lifecycle.as_ref().map(|l| l.identity())
    }

    async fn served(&self) -> Result<Vec<ServedKey>, BackendError> {
        // Read-only discovery: listing never writes to the store (the old store of a
        // hand-over is listed the same way).
        let mut keys: Vec<ServedKey> = self
            .backend
            .discover_read_only()
            .await?
            .into_iter()
            .map(|k| ServedKey {
                key_id: k.id.as_str().to_string(),
                key_type: k.key_type,
                locator: k.handle.locator().to_string(),
                spki_der: k.spki_der,
            })
            .collect();
        keys.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        Ok(keys)
    }

    async fn records(&self) -> Result<Option<Vec<KeyRecord>>, BackendError> {
        match &self.lifecycle {
            Some(lifecycle) => lifecycle.list().await.map(Some),
            None => Ok(None),
        }
    }

    async fn public_key_at(&self, locator: &str) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        // One store read by locator; a full discovery per key would make listing quadratic.
        if let Some(operator) = &self.operator {
            return operator.public_key_at(locator).await;
        }
        self.served()
            .await?
            .into_iter()
            .find(|k| k.locator == locator)
            .map(|k| (k.key_type, k.spki_der))
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::NotFound,
                    format!("{locator} is not a key this server serves"),
                )
            })
    }

    async fn delete(&self, record: &KeyRecord) -> Result<(), BackendError> {
        match &self.lifecycle {
            Some(lifecycle) => lifecycle.delete(record).await,
            None => Err(no_lifecycle(self.backend.name(), "deleting a key by hand")),
        }
    }

    async fn set_enabled(&self, record: &KeyRecord, enabled: bool) -> Result<(), BackendError> {
        match &self.operator {
            Some(operator) => operator.set_enabled(record, enabled).await,
            None => Err(no_lifecycle(
                self.backend.name(),
                "enabling or disabling a key",
            )),
        }
    }

    fn deletion_window(&self) -> DeletionWindow {
        self.operator
            .as_ref()
            .map_or(DeletionWindow::Immediate, |o| o.deletion_window())
    }

    async fn access_summary(&self, locator: &str) -> Result<Vec<String>, BackendError> {
        match &self.operator {
            Some(operator) => operator.access_summary(locator).await,
            None => Ok(Vec::new()),
        }
    }

    async fn checks(&self) -> Vec<Check> {
        match &self.operator {
            Some(operator) => operator.checks().await,
            None => Vec::new(),
        }
    }

    fn clock_url(&self) -> Option<String> {
        self.operator.as_ref().and_then(|o| o.clock_url())
    }

    fn can_import(&self) -> bool {
        self.backend.can_import()
    }

    async fn import(
        &self,
        keys: &[(KeyId, PrivateKeyMaterial)],
        replace: bool,
    ) -> Result<Vec<Result<Imported, EngineError>>, EngineError> {
        let engine = self.engine().await?;
        let mut results = Vec::with_capacity(keys.len());
        for (id, key) in keys {
            results.push(engine.import_key(id.clone(), key, replace).await);
        }
        Ok(results)
    }

    async fn export(&self) -> Result<Option<Vec<(KeyId, PrivateKeyMaterial)>>, EngineError> {
        Ok(self.engine().await?.export_keys().transpose()?)
    }
}

impl<B: Backend> AdminOf<B> {
    /// An engine over the backend for one operator command: the plugin's own discovery and
    /// key-creation rules, nothing stamped or swept.
    async fn engine(&self) -> Result<Engine<B>, EngineError> {
        Engine::start(
            self.backend.clone(),
            self.lifecycle.clone(),
            EngineOptions::default(),
        )
        .await
    }
}

/// `doctor`'s clock check: this machine's time against the store's `Date` header (RFC 7231
/// IMF-fixdate, one-second resolution). Stamps and sweeps compare times across servers and
/// the store; more skew than `clock_skew_allowance` fails.
pub fn clock_check(
    url: &str,
    date_header: Option<&str>,
    local: SystemTime,
    allowance: Duration,
) -> Check {
    let name = "clock";
    let Some(date) = date_header else {
        return Check::warn(
            name,
            format!("{url} sent no Date header; the clock could not be compared"),
            "check the machine's clock with NTP",
        );
    };
    let Some(remote) = parse_http_date(date) else {
        return Check::warn(
            name,
            format!("{url} sent an unreadable Date header"),
            "check the machine's clock with NTP",
        );
    };
    let (skew, ahead) = match local.duration_since(remote) {
        Ok(d) => (d, true),
        Err(e) => (e.duration(), false),
    };
    // The header has one-second resolution: up to a second is no evidence of skew.
    let skew = skew.saturating_sub(Duration::from_secs(1));
    let words = format!(
        "this machine is {}{} {} the store ({url})",
        skew.as_secs(),
        " s",
        if ahead { "ahead of" } else { "behind" }
    );
    if skew > allowance {
        Check::fail(
            name,
            format!(
                "{words}, more than clock_skew_allowance ({} s)",
                allowance.as_secs()
            ),
            "synchronise the clock (NTP): liveness stamps and the stale-key sweep compare times across servers",
        )
    } else {
        Check::ok(name, words)
    }
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` → time.
fn parse_http_date(text: &str) -> Option<SystemTime> {
    let mut parts = text.split_whitespace().skip(1);
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next()? != "GMT" || h > 23 || m > 59 || s > 60 || !(1..=31).contains(&day) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::try_from(day).ok()? - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days).ok()? * 86400 + h * 3600 + m * 60 + s;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// A key's state as `keys list` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryState {
    /// Discovery finds it for its id: the key SPIRE gets.
    Active,
    /// The store has it disabled: signing with it fails until it is enabled, or the next
    /// GenerateKey replaces it.
    Disabled,
    /// Discovery does not find it: a replaced key, or one an interrupted GenerateKey left.
    Inactive,
    /// Superseded, with a recorded intent to delete it: the next sweep deletes it.
    DeletionIntent,
    /// Scheduled for deletion or destruction in the store.
    PendingDeletion,
}

impl EntryState {
    /// The stable name used in JSON output and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Disabled => "disabled",
            Self::Inactive => "inactive",
            Self::DeletionIntent => "deletion_intent",
            Self::PendingDeletion => "pending_deletion",
        }
    }

    /// Whether the key is (or would be) served for its id.
    pub fn is_current(self) -> bool {
        matches!(self, Self::Active | Self::Disabled)
    }
}

/// One row of `keys list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    /// The SPIRE key id, when the store records it.
    pub key_id: Option<String>,
    /// The server id tag (`None` for `disk`, which has no server ids).
    pub server_id: Option<String>,
    /// The key type, when known.
    pub key_type: Option<KeyType>,
    /// Lowercase hex SHA-256 of the DER public key, as the plugin reports it.
    pub fingerprint: Option<String>,
    /// The store's locator (ARN, resource name, file).
    pub locator: String,
    /// When the store created the key.
    pub created: Option<SystemTime>,
    /// The newest liveness stamp.
    pub last_stamp: Option<SystemTime>,
    /// When it was replaced under its id, where the store records it.
    pub replaced: Option<SystemTime>,
    /// The key that replaced it, where the store records it.
    pub replaced_by: Option<String>,
    /// Served from the `migrate_from` store (hand-over mode), not the configured one.
    pub old_store: bool,
    /// Its state.
    pub state: EntryState,
    /// Whether a live server stamps it (a stamp within `stale_key_age` plus the skew).
    pub stamped_live: bool,
    /// Whether this server's discovery finds it (what the plugin would serve now).
    pub served_here: bool,
    /// The record it came from (for prune, delete and friends); `None` for `disk`.
    pub record: Option<KeyRecord>,
}

impl KeyEntry {
    /// A row for a key discovery serves that no store listing describes (a store without a
    /// lifecycle, a listing that lags, the old store of a hand-over).
    fn served(key: &ServedKey, server_id: Option<String>, old_store: bool) -> Self {
        Self {
            key_id: Some(key.key_id.clone()),
            server_id,
            key_type: Some(key.key_type),
            fingerprint: Some(Fingerprint::of_spki(&key.spki_der).as_str().to_string()),
            locator: key.locator.clone(),
            created: None,
            last_stamp: None,
            replaced: None,
            replaced_by: None,
            old_store,
            state: EntryState::Active,
            stamped_live: false,
            served_here: true,
            record: None,
        }
    }
}

/// Which keys `keys list` shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListScope {
    /// Every server's keys in the trust domain, not only this server's.
    pub all_servers: bool,
    /// Replaced and pending keys too, not only each id's current key.
    pub history: bool,
}

/// Builds `keys list`'s rows from what discovery serves and what the store lists.
/// `public_keys` holds the public keys already fetched by locator (served keys need none).
pub fn inventory(
    now: SystemTime,
    me: Option<&SweeperIdentity>,
    policy: SweepPolicy,
    served: &[ServedKey],
    records: Option<&[KeyRecord]>,
    public_keys: &HashMap<String, (KeyType, Arc<[u8]>)>,
    scope: ListScope,
) -> Vec<KeyEntry> {
    let served_by_locator: HashMap<&str, &ServedKey> =
        served.iter().map(|k| (k.locator.as_str(), k)).collect();
    let Some(records) = records else {
        // No lifecycle (disk): the store holds exactly the served keys.
        return served
            .iter()
            .map(|key| KeyEntry::served(key, None, false))
            .collect();
    };
    let stale_after = policy.stale_after.saturating_add(policy.max_clock_skew);
    let mut entries: Vec<KeyEntry> = records
        .iter()
        .filter(|record| {
            me.is_none_or(|me| record.trust_domain.as_deref() == Some(me.trust_domain.as_str()))
        })
        .filter(|record| {
            // A key this server serves is its own even when the store files it under
            // another owner (gcp_kms shared keys).
            scope.all_servers
                || served_by_locator.contains_key(record.locator.as_str())
                || me.is_none_or(|me| record.server_id.as_deref() == Some(me.server_id.as_str()))
        })
        .map(|record| {
            let served = served_by_locator.get(record.locator.as_str());
            let state = entry_state(record, served.is_some());
            let public = served
                .map(|k| (k.key_type, k.spki_der.clone()))
                .or_else(|| public_keys.get(&record.locator).cloned());
            KeyEntry {
                key_id: record
                    .key_id
                    .clone()
                    .or_else(|| served.map(|k| k.key_id.clone())),
                server_id: record.server_id.clone(),
                key_type: public.as_ref().map(|(t, _)| *t),
                fingerprint: public
                    .as_ref()
                    .map(|(_, der)| Fingerprint::of_spki(der).as_str().to_string()),
                locator: record.locator.clone(),
                created: record.created,
                last_stamp: record.last_stamp,
                replaced: record.replaced,
                replaced_by: record.replaced_by.clone(),
                old_store: false,
                state,
                stamped_live: record.last_stamp.is_some_and(|stamp| {
                    now.duration_since(stamp)
                        .map_or(true, |age| age <= stale_after)
                }),
                served_here: served.is_some(),
                record: Some(record.clone()),
            }
        })
        .filter(|entry| scope.history || entry.state.is_current())
        .collect();
    // A served key the listing missed (a store whose listing lags): still shown.
    let listed: HashSet<&str> = records.iter().map(|r| r.locator.as_str()).collect();
    for key in served
        .iter()
        .filter(|k| !listed.contains(k.locator.as_str()))
    {
        entries.push(KeyEntry::served(
            key,
            me.map(|me| me.server_id.clone()),
            false,
        ));
    }
    // Per server and id: the current key first, then the newest.
    entries.sort_by(|a, b| {
        (&a.server_id, &a.key_id, a.state)
            .cmp(&(&b.server_id, &b.key_id, b.state))
            .then_with(|| b.created.cmp(&a.created))
            .then_with(|| a.locator.cmp(&b.locator))
    });
    entries
}

/// Hand-over mode (`migrate_from`): rows for the keys the old store serves, one per id the
/// target store's discovery does not find (`target_served`); the target's key wins an id.
pub fn hand_over_entries(target_served: &[ServedKey], old_served: &[ServedKey]) -> Vec<KeyEntry> {
    let target_ids: HashSet<&str> = target_served.iter().map(|k| k.key_id.as_str()).collect();
    old_served
        .iter()
        .filter(|k| !target_ids.contains(k.key_id.as_str()))
        .map(|key| KeyEntry::served(key, None, true))
        .collect()
}

/// `doctor`'s hand-over check: which ids the old store still serves, or that the
/// `migrate_from` block can be removed.
pub fn hand_over_check(old_store: &str, from_old: &[KeyEntry]) -> Check {
    let name = "hand-over";
    if from_old.is_empty() {
        return Check::warn(
            name,
            format!(
                "no key is served from the migrate_from store ({old_store}) any more: every key id has moved"
            ),
            "remove the migrate_from block from plugin_data; it takes effect at the next start of spire-server",
        );
    }
    let ids: Vec<&str> = from_old
        .iter()
        .filter_map(|e| e.key_id.as_deref())
        .collect();
    Check::ok(
        name,
        format!(
            "{} key id(s) still served from the migrate_from store ({old_store}), read-only: {}; SPIRE's rotation moves each to the target store within one CA lifetime",
            ids.len(),
            ids.join(", ")
        ),
    )
}

fn entry_state(record: &KeyRecord, served_here: bool) -> EntryState {
    match record.state {
        StoreKeyState::PendingDeletion => EntryState::PendingDeletion,
        _ if record.deletion_intent => EntryState::DeletionIntent,
        // Shown whether or not discovery picks it (tag discovery skips disabled keys).
        StoreKeyState::Disabled => EntryState::Disabled,
        _ if record.published || served_here => EntryState::Active,
        _ => EntryState::Inactive,
    }
}

/// `keys prune`'s plan: the sweep's decision for every record, with this server's served
/// keys as the keys in use (what the running plugin would hold in its cache).
pub fn plan_prune(
    now: SystemTime,
    me: &SweeperIdentity,
    policy: SweepPolicy,
    served: &[ServedKey],
    records: &[KeyRecord],
) -> Vec<(KeyRecord, SweepDecision)> {
    let in_use: HashSet<String> = served.iter().map(|k| k.locator.clone()).collect();
    let decisions = plan_sweep(now, me, &in_use, records, policy);
    records.iter().cloned().zip(decisions).collect()
}

/// Why an operator may not disable or delete `entry` without `--force`, if so.
pub fn in_use_reason(entry: &KeyEntry) -> Option<String> {
    if entry.stamped_live {
        return Some(
            "a live server stamped it within stale_key_age: SPIRE is probably signing with it"
                .into(),
        );
    }
    if entry.served_here {
        return Some(
            "it is the key this server's discovery finds for its id: spire-server serves it".into(),
        );
    }
    if entry.state.is_current() {
        return Some(format!(
            "it is server {}'s current key for its id",
            entry.server_id.as_deref().unwrap_or("?")
        ));
    }
    None
}

/// "3 days", "2 hours", "45 seconds".
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (n, unit) = if (s >= 86400 && s.is_multiple_of(86400)) || s >= 2 * 86400 {
        (s / 86400, "day")
    } else if s >= 3600 {
        (s / 3600, "hour")
    } else if s >= 60 {
        (s / 60, "minute")
    } else {
        (s, "second")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86400;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(100 * DAY)
    }

    fn me() -> SweeperIdentity {
        SweeperIdentity {
            trust_domain: "example.org".into(),
            server_id: "me".into(),
        }
    }

    fn record(locator: &str, server: &str, published: bool, stamp_days_ago: u64) -> KeyRecord {
        KeyRecord {
            locator: locator.into(),
            trust_domain: Some("example.org".into()),
            server_id: Some(server.into()),
            state: StoreKeyState::Enabled,
            key_id: Some("x509-CA-A".into()),
            published,
            last_stamp: Some(now() - Duration::from_secs(stamp_days_ago * DAY)),
            created: Some(now() - Duration::from_secs(30 * DAY)),
            deletion_intent: false,
            replaced: None,
            replaced_by: None,
        }
    }

    fn served(locator: &str) -> ServedKey {
        ServedKey {
            key_id: "x509-CA-A".into(),
            key_type: KeyType::EcP256,
            spki_der: Arc::from(&b"spki"[..]),
            locator: locator.into(),
        }
    }

    #[test]
    fn list_scopes_to_this_server_and_current_keys_unless_asked() {
        let records = vec![
            record("mine", "me", true, 0),
            record("mine-old", "me", false, 20),
            record("other", "other", true, 1),
            KeyRecord {
                trust_domain: Some("elsewhere.org".into()),
                ..record("foreign", "x", true, 0)
            },
        ];
        let list = |scope| {
            inventory(
                now(),
                Some(&me()),
                SweepPolicy::default(),
                &[served("mine")],
                Some(&records),
                &HashMap::new(),
                scope,
            )
            .into_iter()
            .map(|e| (e.locator, e.state))
            .collect::<Vec<_>>()
        };
        assert_eq!(
            list(ListScope::default()),
            vec![("mine".to_string(), EntryState::Active)]
        );
        let all = list(ListScope {
            all_servers: true,
            history: true,
        });
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(all.contains(&("mine-old".to_string(), EntryState::Inactive)));
        assert!(!all.iter().any(|(l, _)| l == "foreign"));
    }

    /// An import killed between CreateKey and its material (AWS `PendingImport`) leaves a
    /// key that is neither current nor protected: not in `keys list`, not refused by `keys
    /// delete`, and swept once older than the grace period.
    #[test]
    fn a_key_without_material_is_a_leftover_not_a_disabled_current_key() {
        let incomplete = KeyRecord {
            state: StoreKeyState::Incomplete,
            last_stamp: None,
            created: Some(now() - Duration::from_secs(2 * 3600)),
            ..record("half-imported", "me", false, 0)
        };
        let records = vec![record("mine", "me", true, 0), incomplete.clone()];
        let entries = inventory(
            now(),
            Some(&me()),
            SweepPolicy::default(),
            &[served("mine")],
            Some(&records),
            &HashMap::new(),
            ListScope {
                all_servers: false,
                history: true,
            },
        );
        let left = entries
            .iter()
            .find(|e| e.locator == "half-imported")
            .unwrap();
        assert_eq!(left.state, EntryState::Inactive);
        assert_eq!(in_use_reason(left), None);
        let plan = plan_prune(
            now(),
            &me(),
            SweepPolicy::default(),
            &[served("mine")],
            &records,
        );
        assert!(
            plan.iter()
                .any(|(r, d)| r.locator == "half-imported" && d.is_delete()),
            "{plan:?}"
        );
    }

    #[test]
    fn entries_carry_the_plugins_fingerprint_and_liveness() {
        let entries = inventory(
            now(),
            Some(&me()),
            SweepPolicy::default(),
            &[served("mine")],
            Some(&[
                record("mine", "me", true, 1),
                record("dead", "other", true, 20),
            ]),
            &HashMap::new(),
            ListScope {
                all_servers: true,
                history: false,
            },
        );
        let mine = entries.iter().find(|e| e.locator == "mine").unwrap();
        assert_eq!(
            mine.fingerprint.as_deref(),
            Some(Fingerprint::of_spki(b"spki").as_str())
        );
        assert!(mine.stamped_live && mine.served_here);
        let dead = entries.iter().find(|e| e.locator == "dead").unwrap();
        assert!(!dead.stamped_live && !dead.served_here);
        assert_eq!(dead.fingerprint, None);
        assert!(in_use_reason(mine).is_some());
    }

    #[test]
    fn a_served_key_filed_under_another_owner_is_listed_as_this_servers() {
        let entries = inventory(
            now(),
            Some(&me()),
            SweepPolicy::default(),
            &[served("shared")],
            Some(&[record("shared", "-shared-", true, 0)]),
            &HashMap::new(),
            ListScope::default(),
        );
        assert_eq!(entries.len(), 1);
        assert!(entries[0].served_here);
    }

    #[test]
    fn a_hand_over_lists_the_old_stores_keys_for_the_ids_the_target_lacks() {
        let key = |id: &str, locator: &str| ServedKey {
            key_id: id.into(),
            key_type: KeyType::EcP256,
            spki_der: Arc::from(locator.as_bytes()),
            locator: locator.into(),
        };
        let target = [key("x509-CA-A", "arn:new-a")];
        let old = [
            key("x509-CA-A", "/k.json#a"),
            key("JWT-Signer-A", "/k.json#j"),
        ];
        let rows = hand_over_entries(&target, &old);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].key_id.as_deref(), Some("JWT-Signer-A"));
        assert!(rows[0].old_store && rows[0].served_here);
        let check = hand_over_check("disk keys file", &rows);
        assert_eq!(check.outcome, CheckOutcome::Ok);
        assert!(check.detail.contains("JWT-Signer-A"), "{}", check.detail);
        let done = hand_over_check("disk keys file", &hand_over_entries(&old, &old));
        assert_eq!(done.outcome, CheckOutcome::Warn);
        assert!(done.fix.unwrap().contains("remove the migrate_from block"));
    }

    #[test]
    fn disk_lists_what_it_serves() {
        let entries = inventory(
            now(),
            None,
            SweepPolicy::default(),
            &[served("/keys.json#x509-CA-A")],
            None,
            &HashMap::new(),
            ListScope::default(),
        );
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].state, EntryState::Active);
        assert!(in_use_reason(&entries[0]).is_some());
    }

    #[test]
    fn prune_never_deletes_a_served_key_and_agrees_with_the_sweep() {
        let records = vec![
            record("mine", "me", true, 40),
            record("dead", "other", true, 40),
            record("alive", "other", true, 1),
        ];
        let plan = plan_prune(
            now(),
            &me(),
            SweepPolicy::default(),
            &[served("mine")],
            &records,
        );
        let deleted: Vec<&str> = plan
            .iter()
            .filter(|(_, d)| d.is_delete())
            .map(|(r, _)| r.locator.as_str())
            .collect();
        assert_eq!(deleted, vec!["dead"]);
        let in_use: HashSet<String> = ["mine".to_string()].into();
        let sweep = plan_sweep(now(), &me(), &in_use, &records, SweepPolicy::default());
        assert_eq!(plan.into_iter().map(|(_, d)| d).collect::<Vec<_>>(), sweep);
    }

    #[test]
    fn clock_skew_is_read_from_the_date_header() {
        let store = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            store,
            SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)
        );
        let allowance = Duration::from_secs(600);
        let date = Some("Sun, 06 Nov 1994 08:49:37 GMT");
        let at = |offset: i64| {
            if offset >= 0 {
                store + Duration::from_secs(offset.unsigned_abs())
            } else {
                store - Duration::from_secs(offset.unsigned_abs())
            }
        };
        assert_eq!(
            clock_check("u", date, at(1), allowance).outcome,
            CheckOutcome::Ok
        );
        assert_eq!(
            clock_check("u", date, at(-300), allowance).outcome,
            CheckOutcome::Ok
        );
        let ahead = clock_check("u", date, at(3600), allowance);
        assert_eq!(ahead.outcome, CheckOutcome::Fail);
        assert!(ahead.detail.contains("3599 s ahead of"), "{}", ahead.detail);
        let behind = clock_check("u", date, at(-700), allowance);
        assert_eq!(behind.outcome, CheckOutcome::Fail);
        assert!(behind.detail.contains("behind"), "{}", behind.detail);
        assert_eq!(
            clock_check("u", None, at(0), allowance).outcome,
            CheckOutcome::Warn
        );
        assert_eq!(
            clock_check("u", Some("yesterday"), at(0), allowance).outcome,
            CheckOutcome::Warn
        );
    }

    #[test]
    fn deletion_windows_read_as_sentences() {
        assert_eq!(DeletionWindow::Immediate.to_string(), "deleted at once");
        let aws = DeletionWindow::Scheduled {
            after: Duration::from_secs(7 * DAY),
            what: "PendingWindowInDays",
        };
        assert!(aws.to_string().contains("7 days"), "{aws}");
        assert_eq!(human_duration(Duration::from_secs(3600)), "1 hour");
        assert_eq!(human_duration(Duration::from_secs(90)), "1 minute");
    }
}
