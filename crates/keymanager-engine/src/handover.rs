//! Hand-over mode (`migrate_from`): a running server moves from one key store to another
//! without a new CA and without a gap.
//!
//! The plugin serves each key id from the new (target) store when it has the id, and
//! otherwise from the old store, which it only reads and signs with. Every GenerateKey
//! creates its key in the target store, so SPIRE's own rotation moves each id over within
//! one CA lifetime; no key material moves, which is why any pair of backends works.
//!
//! The old store is held as [`ReadOnlyKeys`]: a trait with no way to create, stamp, sweep,
//! retire or delete a key, implemented by an engine started without a lifecycle. Whoever
//! holds it cannot write to the old store, by type.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{Backend, Capabilities};
use crate::config::BackendConfig;
use crate::core::algorithm::SignerOpts;
use crate::core::key::{KeyId, KeyType, PublicKey};
use crate::engine::{Engine, EngineOptions, Signature};
use crate::error::EngineError;
use crate::lifecycle::{KeyRecord, SweepPolicy, SweepReport};
use crate::resilience::OperationStats;
use crate::service::KeyService;
use crate::telemetry::Telemetry;

/// A key store the plugin may only read keys from and sign with: the old store of a
/// hand-over. Nothing here writes to the store.
#[async_trait]
pub trait ReadOnlyKeys: Send + Sync + 'static {
    /// The backend's name.
    fn backend_name(&self) -> &'static str;

    /// The public key discovery found for `id` at start.
    fn public_key(&self, id: &KeyId) -> Result<PublicKey, EngineError>;

    /// Every key discovery found at start, sorted by id.
    fn public_keys(&self) -> Vec<PublicKey>;

    /// Signs with the key under `id` (see [`KeyService::sign`]).
    async fn sign(
        &self,
        id: &KeyId,
        digest: Vec<u8>,
        opts: SignerOpts,
        deadline: Option<Duration>,
    ) -> Result<Signature, EngineError>;

    /// The store's locators of the keys found.
    fn locators(&self) -> HashSet<String>;

    /// Calls made to the store since start.
    fn call_stats(&self) -> BTreeMap<&'static str, OperationStats>;

    /// Applies the sign rate limit (the key cap does not apply: nothing is created here).
    fn set_options(&self, options: &EngineOptions);
}

/// An engine over a store opened read-only: discovery at start, then signing only. It has
/// no lifecycle, and its GenerateKey cannot be reached: the engine is private and only the
/// [`ReadOnlyKeys`] face is given out.
pub struct ReadOnlyEngine<B: Backend> {
    engine: Engine<B>,
}

impl<B: Backend> ReadOnlyEngine<B> {
    /// Discovers the store's keys, reporting signatures to `telemetry` (the plugin's).
    pub async fn start(
        backend: Arc<B>,
        options: EngineOptions,
        telemetry: Arc<Telemetry>,
    ) -> Result<Self, EngineError> {
        let engine = Engine::start_with(backend, None, options, Some(telemetry)).await?;
        Ok(Self { engine })
    }
}

#[async_trait]
impl<B: Backend> ReadOnlyKeys for ReadOnlyEngine<B> {
    fn backend_name(&self) -> &'static str {
        self.engine.backend().name()
    }

    fn public_key(&self, id: &KeyId) -> Result<PublicKey, EngineError> {
        self.engine.public_key(id)
    }

    fn public_keys(&self) -> Vec<PublicKey> {
        self.engine.public_keys()
    }

    async fn sign(
        &self,
        id: &KeyId,
        digest: Vec<u8>,
        opts: SignerOpts,
        deadline: Option<Duration>,
    ) -> Result<Signature, EngineError> {
        self.engine.sign(id, digest, opts, deadline).await
    }

    fn locators(&self) -> HashSet<String> {
        KeyService::in_use(&self.engine)
    }

    fn call_stats(&self) -> BTreeMap<&'static str, OperationStats> {
        KeyService::call_stats(&self.engine)
    }

    fn set_options(&self, options: &EngineOptions) {
        KeyService::set_options(&self.engine, options);
    }
}

/// The plugin in hand-over mode: the target store's engine, and the old store for the ids
/// the target does not have yet.
pub struct HandOver {
    target: Arc<dyn KeyService>,
    old: Arc<dyn ReadOnlyKeys>,
    /// The old store in words, for logs.
    old_store: String,
    /// Ids served from the old store: found there and not (yet) in the target. Only shrinks.
    from_old: RwLock<HashSet<KeyId>>,
    /// Whether "the block can be removed" was logged.
    announced: AtomicBool,
}

impl HandOver {
    /// Puts the old store behind the target; `old_store` names it in logs.
    pub fn new(target: Arc<dyn KeyService>, old: Arc<dyn ReadOnlyKeys>, old_store: String) -> Self {
        let from_old: HashSet<KeyId> = old
            .public_keys()
            .into_iter()
            .filter(|key| target.public_key(&key.id).is_err())
            .map(|key| key.id)
            .collect();
        let mut ids: Vec<&str> = from_old.iter().map(KeyId::as_str).collect();
        ids.sort_unstable();
        tracing::info!(
            target_backend = target.backend_name(),
            migrate_from = %old_store,
            served_from_old = %ids.join(", "),
            "hand-over mode: keys the target store lacks are served from the migrate_from store (read-only); GenerateKey creates every new key in the target store"
        );
        let handover = Self {
            target,
            old,
            old_store,
            from_old: RwLock::new(from_old),
            announced: AtomicBool::new(false),
        };
        handover.report();
        handover
    }

    /// The ids still served from the old store, sorted.
    pub fn served_from_old(&self) -> Vec<KeyId> {
        let mut ids: Vec<KeyId> = self.read_from_old().iter().cloned().collect();
        ids.sort();
        ids
    }

    /// True once no key is served from the old store: the `migrate_from` block can go.
    pub fn complete(&self) -> bool {
        self.read_from_old().is_empty()
    }

    fn read_from_old(&self) -> std::sync::RwLockReadGuard<'_, HashSet<KeyId>> {
        self.from_old.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn serves_from_old(&self, id: &KeyId) -> bool {
        self.read_from_old().contains(id)
    }

    /// Metrics, and the one-time notice that the block can be removed.
    fn report(&self) {
        let remaining = self.read_from_old().len();
        let telemetry = self.target.telemetry();
        telemetry.migrate_from_keys(self.old.backend_name(), remaining);
        telemetry.keys_served(self.target.public_keys().len() + remaining);
        if remaining == 0 && !self.announced.swap(true, Ordering::SeqCst) {
            tracing::info!(
                migrate_from = %self.old_store,
                "hand-over complete: no key is served from the migrate_from store any more; remove the migrate_from block from plugin_data (it takes effect at the next start)"
            );
        }
    }
}

#[async_trait]
impl KeyService for HandOver {
    fn backend_name(&self) -> &'static str {
        self.target.backend_name()
    }

    fn capabilities(&self) -> &Capabilities {
        self.target.capabilities()
    }

    async fn generate_key(&self, id: KeyId, key_type: KeyType) -> Result<PublicKey, EngineError> {
        let public = self.target.generate_key(id.clone(), key_type).await?;
        let moved = self
            .from_old
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        if moved {
            tracing::info!(
                key_id = %id,
                from = self.old.backend_name(),
                to = self.target.backend_name(),
                fingerprint = %public.fingerprint,
                "key id moved to the target store: its new key is served from there; the old key is left untouched in the migrate_from store"
            );
        }
        self.report();
        Ok(public)
    }

    fn public_key(&self, id: &KeyId) -> Result<PublicKey, EngineError> {
        if self.serves_from_old(id) {
            return self.old.public_key(id);
        }
        self.target.public_key(id)
    }

    fn public_keys(&self) -> Vec<PublicKey> {
        let mut keys = self.target.public_keys();
        let from_old = self.read_from_old();
        keys.extend(
            self.old
                .public_keys()
                .into_iter()
                .filter(|k| from_old.contains(&k.id)),
        );
        drop(from_old);
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        keys
    }

    async fn sign(
        &self,
        id: &KeyId,
        digest: Vec<u8>,
        opts: SignerOpts,
        deadline: Option<Duration>,
    ) -> Result<Signature, EngineError> {
        if self.serves_from_old(id) {
            return self.old.sign(id, digest, opts, deadline).await;
        }
        self.target.sign(id, digest, opts, deadline).await
    }

    fn call_stats(&self) -> BTreeMap<&'static str, OperationStats> {
        let mut stats = self.target.call_stats();
        for (operation, counts) in self.old.call_stats() {
            stats.insert(old_operation(operation), counts);
        }
        stats
    }

    fn telemetry(&self) -> &Arc<Telemetry> {
        self.target.telemetry()
    }

    fn set_options(&self, options: &EngineOptions) {
        self.target.set_options(options);
        self.old.set_options(options);
    }

    async fn reconfigure_backend(&self, config: &dyn BackendConfig) -> Result<(), EngineError> {
        self.target.reconfigure_backend(config).await
    }

    fn has_lifecycle(&self) -> bool {
        self.target.has_lifecycle()
    }

    /// Stamps the target store's keys only: the old store is never written.
    async fn stamp_keys(&self) -> Result<bool, EngineError> {
        self.target.stamp_keys().await
    }

    async fn list_records(&self) -> Result<Option<Vec<KeyRecord>>, EngineError> {
        self.target.list_records().await
    }

    /// Sweeps the target store only.
    async fn sweep(&self, policy: SweepPolicy) -> Result<Option<SweepReport>, EngineError> {
        self.target.sweep(policy).await
    }

    fn in_use(&self) -> HashSet<String> {
        let mut in_use = self.target.in_use();
        in_use.extend(self.old.locators());
        in_use
    }
}

/// The old store's operations in call statistics, apart from the target's.
fn old_operation(operation: &'static str) -> &'static str {
    match operation {
        "discover" => "migrate_from_discover",
        "sign" => "migrate_from_sign",
        _ => "migrate_from_other",
    }
}
