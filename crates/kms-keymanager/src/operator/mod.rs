//! The operator commands (`keys …`, `doctor`): the plugin's own configuration parser,
//! backends and engine rules, run by hand against the store.
//!
//! Exit codes: 0 ok; 1 a failure (the store refused or failed, a check failed, a key is
//! in use without `--force`); 2 a usage error (clap's own, a missing or ambiguous block in
//! server.conf, an unconfirmed deletion).

pub mod doctor;
pub mod keys;
mod output;
pub mod source;
pub mod transfer;

use std::process::ExitCode;
use std::sync::Arc;

use keymanager_engine::BackendError;
use keymanager_engine::admin::KeyAdmin;
use keymanager_engine::lifecycle::SweepPolicy;

use source::SourceArgs;

/// Why an operator command failed, and its exit code.
#[derive(Debug)]
pub struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    /// The store refused or failed.
    pub fn store(error: BackendError) -> Self {
        Self::store_message(error.to_string())
    }

    /// A failure, in words.
    pub fn store_message(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 1,
        }
    }

    /// A refusal to act on a key in use.
    pub fn refused(message: impl Into<String>) -> Self {
        Self::store_message(message)
    }

    /// No such key.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::store_message(message)
    }

    /// The command line or its configuration is wrong.
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 2,
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prints the message and gives the exit code.
    pub fn report(self) -> ExitCode {
        eprintln!("error: {}", self.message);
        ExitCode::from(self.code)
    }
}

/// An opened backend, its trust domain and sweep thresholds.
pub struct Opened {
    /// The operator's view of the backend.
    pub admin: Arc<dyn KeyAdmin>,
    /// The trust domain.
    pub trust_domain: String,
    /// `stale_key_age` and friends, as configured.
    pub policy: SweepPolicy,
    /// Hand-over mode: the `migrate_from` store, listed read-only.
    pub old: Option<OldStore>,
}

/// The `migrate_from` store of a hand-over, opened for listing only.
pub struct OldStore {
    /// Its operator view (only discovery is used: nothing is written).
    pub admin: Arc<dyn KeyAdmin>,
    /// The store in words.
    pub store: String,
}

/// Parses the configuration as Configure does and opens the backend (no engine: nothing is
/// stamped, swept or generated).
pub async fn open(source: &SourceArgs) -> Result<Opened, Failure> {
    let config = source.config().map_err(Failure::usage)?;
    for warning in config.backend.warnings() {
        eprintln!("warning: {warning}");
    }
    let policy = keys::policy_of(&config);
    let trust_domain = config.core.trust_domain.clone();
    let opened = config.backend.open().await.map_err(|e| {
        Failure::store_message(format!(
            "cannot open the {} backend: {e}",
            config.backend_name
        ))
    })?;
    let old = match &config.migrate_from {
        Some(old) => Some(open_old(old).await?),
        None => None,
    };
    Ok(Opened {
        admin: opened.admin(),
        trust_domain,
        policy,
        old,
    })
}

/// Opens the `migrate_from` store as the plugin does (its discovery only).
pub async fn open_old(old: &keymanager_plugin::MigrateFrom) -> Result<OldStore, Failure> {
    let store = old.backend.identity().to_string();
    let opened = old.backend.open().await.map_err(|e| {
        Failure::store_message(format!("cannot open the migrate_from store ({store}): {e}"))
    })?;
    Ok(OldStore {
        admin: opened.admin(),
        store,
    })
}
