//! The factory and configuration shell every KMS backend shares. A KMS backend implements
//! [`KmsSettings`] for its own settings and [`KmsAdapter`] (its name, how to open the
//! client), and registers `KmsFactory::<Adapter>::new()`; the shell does the rest: the server identity
//! (`key_identifier_file` / `key_identifier_value`), `endpoint`, the lifecycle schedule,
//! deprecation warnings, Validate's problems, the store identity, the run-time setting
//! classification, and opening the backend with its lifecycle.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;

use crate::admin::KeyOperator;
use crate::backend::{Backend, BackendError};
use crate::config::{
    BackendConfig, BackendFactory, CoreConfig, OnChange, Opened, OpenedBackend, SettingState,
    StoreIdentity,
};
use crate::kit::endpoint::{self, Endpoint};
use crate::kit::server_identity::ServerIdSource;
use crate::lifecycle::{KeyLifecycle, LifecycleSchedule, SCHEDULE_KEYS};
use crate::settings::{Settings, SettingsError};

/// The keys the shell reads for every KMS backend.
pub const COMMON_KEYS: &[&str] = &["key_identifier_file", "key_identifier_value", endpoint::KEY];

/// A KMS backend's own settings: what it parses, how it names its store, and what a change
/// to each setting means at run time.
pub trait KmsSettings: fmt::Debug + Clone + Send + Sync + Sized + 'static {
    /// The backend's own `plugin_data` keys (the shell's come on top).
    const SETTING_KEYS: &'static [&'static str];

    /// Takes the backend's own keys out of `settings`. Runs before the shell reads the
    /// server identity, so a deprecated key may be mapped onto `key_identifier_*` here
    /// (push the warning onto `warnings`). Secrets must be redacted in `Debug`.
    fn parse(settings: &mut Settings, warnings: &mut Vec<String>) -> Result<Self, SettingsError>;

    /// The backend's rule for `key_identifier_value` (charset, length).
    fn check_server_id(value: &str) -> Result<(), String>;

    /// Extra guidance when no server identity is set at all.
    fn missing_identity_hint(&self) -> Option<&'static str> {
        None
    }

    /// The store inside the backend, in words (`region us-east-1`); with the endpoint and
    /// the trust domain, it must not change at run time.
    fn store(&self) -> String;

    /// The other settings and what a change to each means at run time.
    fn describe(&self) -> Vec<SettingState>;

    /// The lifecycle schedule when `plugin_data` sets none (SPIRE's own defaults for the
    /// built-in this backend replaces).
    fn default_schedule() -> LifecycleSchedule {
        LifecycleSchedule::default()
    }

    /// Problems Validate reports, beyond the server identity's (no side effects).
    fn problems(&self) -> Vec<String> {
        Vec::new()
    }
}

/// What a KMS backend writes itself beyond its settings: its name and how it opens.
#[async_trait]
pub trait KmsAdapter:
    Backend<Config = KmsConfig<Self>>
    + KeyLifecycle<Handle = <Self as Backend>::Handle>
    + KeyOperator
    + Sized
{
    /// The backend's name in `plugin_data` (`aws_kms`).
    const NAME: &'static str;
    /// The backend's own settings.
    type Settings: KmsSettings;

    /// Connects: builds the client from `config` for the resolved `server_id`.
    async fn open(config: &KmsConfig<Self>, server_id: String) -> Result<Self, BackendError>;
}

/// Registers a KMS backend.
pub struct KmsFactory<A>(PhantomData<fn() -> A>);

impl<A> KmsFactory<A> {
    /// The factory.
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<A> Default for KmsFactory<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: KmsAdapter> BackendFactory for KmsFactory<A> {
    fn name(&self) -> &'static str {
        A::NAME
    }

    fn setting_keys(&self) -> Vec<&'static str> {
        let mut keys: Vec<&'static str> = A::Settings::SETTING_KEYS.to_vec();
        keys.extend_from_slice(COMMON_KEYS);
        keys.extend_from_slice(SCHEDULE_KEYS);
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    fn parse(
        &self,
        settings: &mut Settings,
        core: &CoreConfig,
    ) -> Result<Box<dyn BackendConfig>, SettingsError> {
        Ok(Box::new(self.parse_typed(settings, core)?))
    }
}

impl<A: KmsAdapter> KmsFactory<A> {
    /// [`BackendFactory::parse`] with the configuration's type kept (for tests and tools).
    /// Unknown keys are left in `settings` for the caller to refuse.
    pub fn parse_typed(
        &self,
        settings: &mut Settings,
        core: &CoreConfig,
    ) -> Result<KmsConfig<A>, SettingsError> {
        let mut warnings = Vec::new();
        let backend = A::Settings::parse(settings, &mut warnings)?;
        let server_id =
            ServerIdSource::take_from(settings, A::Settings::check_server_id).map_err(|error| {
                match (error, backend.missing_identity_hint()) {
                    (SettingsError::Missing { key, hint }, Some(extra)) => SettingsError::Missing {
                        key,
                        hint: format!("{hint} ({extra})"),
                    },
                    (error, _) => error,
                }
            })?;
        let endpoint = Endpoint::take_from(settings)?;
        let schedule =
            LifecycleSchedule::take_from_with(settings, A::Settings::default_schedule())?;
        Ok(KmsConfig::<A> {
            trust_domain: core.trust_domain.clone(),
            server_id,
            endpoint,
            schedule,
            warnings,
            backend,
        })
    }

    /// Parses every setting as the plugin does, refusing keys this backend does not know;
    /// the configuration's type is kept (for tests and tools).
    pub fn parse_all(
        &self,
        mut settings: Settings,
        core: &CoreConfig,
    ) -> Result<KmsConfig<A>, SettingsError> {
        let config = self.parse_typed(&mut settings, core)?;
        settings.finish(&self.setting_keys())?;
        Ok(config)
    }
}

/// A validated KMS backend configuration: the shell's settings and the backend's own.
pub struct KmsConfig<A: KmsAdapter> {
    /// The trust domain.
    pub trust_domain: String,
    /// Where this server's id comes from.
    pub server_id: ServerIdSource,
    /// `endpoint`, if set.
    pub endpoint: Option<Endpoint>,
    /// Stamps and sweeps.
    pub schedule: LifecycleSchedule,
    /// Deprecation notes.
    pub warnings: Vec<String>,
    /// The backend's own settings.
    pub backend: A::Settings,
}

impl<A: KmsAdapter> fmt::Debug for KmsConfig<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(A::NAME)
            .field("trust_domain", &self.trust_domain)
            .field("server_id", &self.server_id)
            .field("endpoint", &self.endpoint)
            .field("schedule", &self.schedule)
            .field("backend", &self.backend)
            .finish()
    }
}

#[async_trait]
impl<A: KmsAdapter> BackendConfig for KmsConfig<A> {
    fn identity(&self) -> StoreIdentity {
        let mut store = self.backend.store();
        if let Some(endpoint) = &self.endpoint {
            store.push_str(&format!(" at {}", endpoint.as_str()));
        }
        StoreIdentity {
            backend: A::NAME,
            store,
            trust_domain: self.trust_domain.clone(),
            server: Some(self.server_id.describe()),
        }
    }

    fn settings(&self) -> Vec<SettingState> {
        let mut states = vec![
            SettingState::new(
                "liveness_interval",
                self.schedule.stamp_every,
                OnChange::Runtime,
            ),
            SettingState::new(
                "sweep_interval",
                self.schedule.sweep_every,
                OnChange::Runtime,
            ),
            SettingState::new(
                "stale_key_age",
                self.schedule.policy.stale_after,
                OnChange::Runtime,
            ),
            SettingState::new(
                "clock_skew_allowance",
                self.schedule.policy.max_clock_skew,
                OnChange::Runtime,
            ),
        ];
        states.extend(self.backend.describe());
        states
    }

    fn lifecycle(&self) -> Option<LifecycleSchedule> {
        Some(self.schedule)
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = self.server_id.problems();
        problems.extend(self.backend.problems());
        problems
    }

    async fn open(&self) -> Result<Box<dyn OpenedBackend>, BackendError> {
        let server_id = self.server_id.resolve()?;
        let backend = Arc::new(A::open(self, server_id).await?);
        Ok(Opened::new(backend.clone())
            .with_lifecycle(backend.clone())
            .with_operator(backend)
            .boxed())
    }
}
