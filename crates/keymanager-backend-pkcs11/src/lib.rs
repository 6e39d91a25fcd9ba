//! The `pkcs11` backend: SPIRE's signing keys on a PKCS#11 token (an HSM, or a software
//! token), generated there as sensitive, non-extractable key pairs and signed with there
//! through a pool of logged-in sessions.

mod backend;
pub mod config;
/// Public for the fuzz targets (`crates/keymanager-fuzz`).
pub mod der;
mod errors;
/// Public for the fuzz targets (`crates/keymanager-fuzz`).
pub mod labels;
mod module;
mod pool;

pub use backend::{Pkcs11Backend, Pkcs11Key};
pub use config::Pkcs11Settings;

/// Registers the backend: `backend = "pkcs11"`.
pub type Pkcs11Factory = keymanager_engine::kit::KmsFactory<Pkcs11Backend>;
