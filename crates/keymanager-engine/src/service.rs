//! The engine as the plugin and the CLI see it: one object-safe interface over
//! `Engine<B>` for whichever backend the configuration chose.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::Capabilities;
use crate::config::BackendConfig;
use crate::core::algorithm::SignerOpts;
use crate::core::key::{KeyId, KeyType, PublicKey};
use crate::engine::{EngineOptions, Signature};
use crate::error::EngineError;
use crate::lifecycle::{KeyRecord, SweepPolicy, SweepReport};
use crate::resilience::OperationStats;
use crate::telemetry::Telemetry;

/// A running key engine, whatever its backend.
#[async_trait]
pub trait KeyService: Send + Sync + 'static {
    /// The backend's name.
    fn backend_name(&self) -> &'static str;

    /// What the backend can do.
    fn capabilities(&self) -> &Capabilities;

    /// Creates a new key under `id`, replacing (and then retiring) the current one.
    async fn generate_key(&self, id: KeyId, key_type: KeyType) -> Result<PublicKey, EngineError>;

    /// The cached public key for `id`.
    fn public_key(&self, id: &KeyId) -> Result<PublicKey, EngineError>;

    /// Every cached public key, sorted by id.
    fn public_keys(&self) -> Vec<PublicKey>;

    /// Signs an already hashed digest with the key under `id`. `deadline` is how long the
    /// caller waits (SPIRE's RPC deadline); a call that cannot finish in time fails early.
    async fn sign(
        &self,
        id: &KeyId,
        digest: Vec<u8>,
        opts: SignerOpts,
        deadline: Option<Duration>,
    ) -> Result<Signature, EngineError>;

    /// Backend calls, failures and throttles per operation since start.
    fn call_stats(&self) -> BTreeMap<&'static str, OperationStats>;

    /// The engine's metrics and audit log.
    fn telemetry(&self) -> &Arc<Telemetry>;

    /// Applies the engine options that may change at run time (key cap, sign rate).
    fn set_options(&self, options: &EngineOptions);

    /// Applies the backend's run-time settings from a new configuration of the same store.
    async fn reconfigure_backend(&self, config: &dyn BackendConfig) -> Result<(), EngineError>;

    /// True when the backend stamps and sweeps keys.
    fn has_lifecycle(&self) -> bool;

    /// Refreshes the liveness stamps of every key this server serves. `false` without a
    /// lifecycle.
    async fn stamp_keys(&self) -> Result<bool, EngineError>;

    /// Every key of the trust domain as the sweep sees it (reads only). `None` without a
    /// lifecycle.
    async fn list_records(&self) -> Result<Option<Vec<KeyRecord>>, EngineError>;

    /// Sweeps the trust domain for stale and abandoned keys; keys this engine serves are
    /// never deleted. `None` without a lifecycle.
    async fn sweep(&self, policy: SweepPolicy) -> Result<Option<SweepReport>, EngineError>;

    /// The locators of the keys this engine serves.
    fn in_use(&self) -> HashSet<String>;
}

/// A shared handle to a running engine.
pub type SharedKeyService = Arc<dyn KeyService>;
