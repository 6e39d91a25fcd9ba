//! The `gcp_kms` backend, drop-in for SPIRE's built-in `gcp_kms` KeyManager, with the
//! shared-keys mode of SPIRE's draft (spiffe/spire#6537) done with a real lock.
//!
//! - `config`: every `plugin_data` key of SPIRE's `gcp_kms` (both document versions) with
//!   the same meaning, plus `protection_level` (the engine's KMS kit reads the server
//!   identity, `endpoint` and the lifecycle schedule);
//! - `naming`: SPIRE's CryptoKey ids and labels, the shared-key template, lock ids;
//! - `kms`: the Cloud KMS calls on Google's official client, error mapping, CRC32C checks;
//! - `backend`: the adapter behind the engine's `Backend` and `KeyLifecycle` traits;
//! - `shared`: shared-key rotation under an atomic, leased lock;
//! - `operator`: what the operator CLI runs by hand (enable, disable, IAM, `doctor`).

mod backend;
pub mod config;
mod kms;
pub mod naming;
mod operator;
mod shared;

pub use backend::{GcpKey, GcpKmsBackend};
pub use config::{GcpKmsSettings, ProtectionLevel};
pub use keymanager_engine::kit::shared::SharedKeys;

/// Registers the `gcp_kms` backend.
pub type GcpKmsFactory = keymanager_engine::kit::KmsFactory<GcpKmsBackend>;
