//! Configuration seam: a backend registers a [`BackendFactory`], which parses `plugin_data`
//! into a [`BackendConfig`], which opens the backend.
//!
//! Re-Configure never silently ignores a setting: a configuration names its store in a
//! typed [`StoreIdentity`] (a change there is refused: it would drop keys in use) and lists
//! every other setting with what a change to it means ([`OnChange`]).

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::admin::{AdminOf, KeyAdmin, KeyOperator};
use crate::backend::{Backend, BackendError};
use crate::engine::{Engine, EngineOptions};
use crate::error::EngineError;
use crate::handover::{ReadOnlyEngine, ReadOnlyKeys};
use crate::lifecycle::{KeyLifecycle, LifecycleSchedule};
use crate::service::KeyService;
use crate::settings::{Settings, SettingsError};
use crate::telemetry::Telemetry;

/// What SPIRE tells every plugin at Configure time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreConfig {
    /// Bare trust domain name, e.g. `example.org`.
    pub trust_domain: String,
}

/// Builds a backend's configuration from `plugin_data`. One per backend, registered by name.
pub trait BackendFactory: Send + Sync {
    /// The backend's name as written in `plugin_data` (`backend = "disk"`).
    fn name(&self) -> &'static str;

    /// The `plugin_data` keys this backend understands, for error messages.
    fn setting_keys(&self) -> Vec<&'static str>;

    /// Parses and validates this backend's settings. Must have no side effects beyond
    /// reading files the settings name: it also serves SPIRE's `Validate`. Every recognised
    /// key must be taken out of `settings`.
    fn parse(
        &self,
        settings: &mut Settings,
        core: &CoreConfig,
    ) -> Result<Box<dyn BackendConfig>, SettingsError>;
}

/// A validated backend configuration that can open the backend.
#[async_trait]
pub trait BackendConfig: Any + fmt::Debug + Send + Sync {
    /// The store this configuration points at. A runtime re-Configure must keep it.
    fn identity(&self) -> StoreIdentity;

    /// Every other setting, with what a change to it at run time means.
    fn settings(&self) -> Vec<SettingState>;

    /// Liveness stamps and sweeps, for backends whose keys outlive the server.
    fn lifecycle(&self) -> Option<LifecycleSchedule> {
        None
    }

    /// Notes to log when the configuration is applied (deprecated keys and the like).
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// Problems that would make this configuration fail at run time, for
    /// `spire-server validate`. SPIRE reports **every** note as a validation error, so this
    /// lists problems only, never information. Must have no side effects.
    fn problems(&self) -> Vec<String> {
        Vec::new()
    }

    /// Connects to the store. May do I/O.
    async fn open(&self) -> Result<Box<dyn OpenedBackend>, BackendError>;
}

/// The key store a configuration points at. Keys live in exactly one store, so a running
/// plugin may not switch stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreIdentity {
    /// The backend (`aws_kms`).
    pub backend: &'static str,
    /// The store inside the backend, in the backend's words (`region us-east-1`,
    /// `key ring projects/p/locations/l/keyRings/r`, `keys file /var/keys.json`).
    pub store: String,
    /// The trust domain.
    pub trust_domain: String,
    /// Where this server's id comes from (`key_identifier_file /x`), for KMS backends.
    pub server: Option<String>,
}

impl StoreIdentity {
    /// What differs between two identities, in words, or `None` when they are the same.
    pub fn difference(&self, other: &StoreIdentity) -> Option<String> {
        if self.backend != other.backend {
            return Some(format!("backend {:?} → {:?}", self.backend, other.backend));
        }
        if self.store != other.store {
            return Some(format!("{} → {}", self.store, other.store));
        }
        if self.trust_domain != other.trust_domain {
            return Some(format!(
                "trust domain {:?} → {:?}",
                self.trust_domain, other.trust_domain
            ));
        }
        if self.server != other.server {
            return Some(format!(
                "server identity {} → {}",
                self.server.as_deref().unwrap_or("none"),
                other.server.as_deref().unwrap_or("none")
            ));
        }
        None
    }
}

impl fmt::Display for StoreIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (trust domain {}",
            self.backend, self.store, self.trust_domain
        )?;
        if let Some(server) = &self.server {
            write!(f, ", {server}")?;
        }
        f.write_str(")")
    }
}

/// One setting's current value, in a form that compares (secrets as a digest, never in
/// clear), and what a change to it at run time means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingState {
    /// The `plugin_data` key (or keys, `access_key_id/secret_access_key`).
    pub key: &'static str,
    /// A comparable rendering of the value. Secrets: use [`SettingState::secret`].
    pub value: String,
    /// What happens when it changes at run time.
    pub on_change: OnChange,
}

impl SettingState {
    /// A setting whose value may be shown.
    pub fn new(key: &'static str, value: impl fmt::Debug, on_change: OnChange) -> Self {
        Self {
            key,
            value: format!("{value:?}"),
            on_change,
        }
    }

    /// A secret setting: only a digest of the value is kept, to notice a rotation.
    pub fn secret(key: &'static str, parts: &[&[u8]], on_change: OnChange) -> Self {
        use sha2::Digest as _;
        let mut hasher = sha2::Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        Self {
            key,
            value: format!("sha256:{}", hex::encode(hasher.finalize())),
            on_change,
        }
    }
}

/// What a running plugin does when a setting changes at re-Configure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnChange {
    /// Applied at once (credentials, tags of new keys, schedules).
    Runtime,
    /// Applied at the next start; the plugin warns and names the setting.
    NextStart,
    /// Refused with InvalidArgument naming the setting (it would change which keys exist).
    Refused,
}

/// A backend that is open and can start its engine.
#[async_trait]
pub trait OpenedBackend: Send {
    /// Discovers the backend's keys and starts the engine.
    async fn start(
        self: Box<Self>,
        options: EngineOptions,
    ) -> Result<Arc<dyn KeyService>, EngineError>;

    /// The operator's view of the backend (the CLI's `keys` and `doctor`), without an
    /// engine: nothing is stamped, swept or generated.
    fn admin(self: Box<Self>) -> Arc<dyn KeyAdmin>;

    /// Discovers the backend's keys for signing only: the old store of a hand-over
    /// (`migrate_from`). No lifecycle, no GenerateKey: nothing is ever written to the store.
    /// Signatures are reported to `telemetry`, the plugin's.
    async fn start_read_only(
        self: Box<Self>,
        options: EngineOptions,
        telemetry: Arc<Telemetry>,
    ) -> Result<Arc<dyn ReadOnlyKeys>, EngineError>;
}

/// An opened backend with its optional lifecycle, ready to start; what
/// [`BackendConfig::open`] returns.
pub struct Opened<B: Backend> {
    backend: Arc<B>,
    lifecycle: Option<Arc<dyn KeyLifecycle<Handle = B::Handle>>>,
    operator: Option<Arc<dyn KeyOperator>>,
}

impl<B: Backend> Opened<B> {
    /// A backend without a lifecycle (its keys die with the server's store, like `disk`).
    pub fn new(backend: Arc<B>) -> Self {
        Self {
            backend,
            lifecycle: None,
            operator: None,
        }
    }

    /// Adds the backend's lifecycle primitives (usually the backend itself).
    pub fn with_lifecycle(mut self, lifecycle: Arc<dyn KeyLifecycle<Handle = B::Handle>>) -> Self {
        self.lifecycle = Some(lifecycle);
        self
    }

    /// Adds the store operations only an operator runs (usually the backend itself).
    pub fn with_operator(mut self, operator: Arc<dyn KeyOperator>) -> Self {
        self.operator = Some(operator);
        self
    }

    /// Erased, for [`BackendConfig::open`].
    pub fn boxed(self) -> Box<dyn OpenedBackend> {
        Box::new(self)
    }
}

#[async_trait]
impl<B: Backend> OpenedBackend for Opened<B> {
    async fn start(
        self: Box<Self>,
        options: EngineOptions,
    ) -> Result<Arc<dyn KeyService>, EngineError> {
        let engine = Engine::start(self.backend, self.lifecycle, options).await?;
        Ok(Arc::new(engine))
    }

    async fn start_read_only(
        self: Box<Self>,
        options: EngineOptions,
        telemetry: Arc<Telemetry>,
    ) -> Result<Arc<dyn ReadOnlyKeys>, EngineError> {
        // The lifecycle and the operator are dropped here: the old store is never stamped,
        // swept or changed.
        let engine = ReadOnlyEngine::start(self.backend, options, telemetry).await?;
        Ok(Arc::new(engine))
    }

    fn admin(self: Box<Self>) -> Arc<dyn KeyAdmin> {
        Arc::new(AdminOf {
            backend: self.backend,
            lifecycle: self.lifecycle,
            operator: self.operator,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> StoreIdentity {
        StoreIdentity {
            backend: "aws_kms",
            store: "region us-east-1".into(),
            trust_domain: "example.org".into(),
            server: Some("key_identifier_value \"a\"".into()),
        }
    }

    #[test]
    fn identity_differences_are_named() {
        let a = identity();
        assert_eq!(a.difference(&a.clone()), None);
        let mut b = a.clone();
        b.store = "region eu-west-1".into();
        assert_eq!(
            a.difference(&b).as_deref(),
            Some("region us-east-1 → region eu-west-1")
        );
        let mut c = a.clone();
        c.server = Some("key_identifier_value \"b\"".into());
        assert!(a.difference(&c).unwrap().starts_with("server identity"));
    }

    #[test]
    fn secrets_compare_by_digest_and_never_show() {
        let one = SettingState::secret(
            "secret_access_key",
            &[b"AKIA", b"s3cr3t"],
            OnChange::Runtime,
        );
        let same = SettingState::secret(
            "secret_access_key",
            &[b"AKIA", b"s3cr3t"],
            OnChange::Runtime,
        );
        let rotated =
            SettingState::secret("secret_access_key", &[b"AKIA", b"n3w"], OnChange::Runtime);
        // Parts are length-prefixed: moving a byte between parts is a change.
        let shifted = SettingState::secret(
            "secret_access_key",
            &[b"AKIAs", b"3cr3t"],
            OnChange::Runtime,
        );
        assert_eq!(one, same);
        assert_ne!(one, rotated);
        assert_ne!(one, shifted);
        assert!(!format!("{one:?}").contains("s3cr3t"));
    }
}
