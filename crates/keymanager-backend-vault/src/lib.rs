//! The `hashicorp_vault` backend: SPIRE's signing keys as HashiCorp Vault / OpenBao Transit
//! keys, named as SPIRE's built-in `hashicorp_vault` names them, signed inside Vault.

mod backend;
mod client;
pub mod config;
mod liveness;
/// Public for the fuzz targets (`crates/keymanager-fuzz`).
pub mod naming;
mod session;

pub use backend::{VaultBackend, VaultKey};
pub use config::VaultSettings;

/// Registers the backend: `backend = "hashicorp_vault"`.
pub type VaultFactory = keymanager_engine::kit::KmsFactory<VaultBackend>;
