//! The `aws_kms` backend, drop-in for SPIRE's built-in `aws_kms` KeyManager.
//!
//! - `config`: every `plugin_data` key of SPIRE's `aws_kms` with the same meaning and
//!   SPIRE's validation rules, plus `key_prefix`, `assume_role_arn`, `external_id` and
//!   `role_session_name` (the engine's KMS kit reads the server identity, `endpoint` and
//!   the lifecycle schedule);
//! - `naming`: SPIRE's aliases and descriptions, byte for byte;
//! - `policy`: the least-privilege default key policy for an assumed role;
//! - `client`: the SDK clients on credentials that can be rotated at run time;
//! - `errors`: SDK failures → error kinds, with the whole cause chain;
//! - `backend`: the KMS adapter behind the engine's `Backend` and `KeyLifecycle` traits;
//! - `operator`: what the operator CLI runs by hand (enable, disable, key policy, `doctor`);
//! - `shared`: the shared-keys mode's store side (generations behind an alias, the lock as
//!   a `CreateAlias`); the rotation itself is the kit's.

mod backend;
mod client;
pub mod config;
mod errors;
pub mod naming;
mod operator;
pub mod policy;
mod shared;

pub use backend::{AwsKey, AwsKmsBackend};
pub use config::{AwsKmsSettings, Credentials, Discovery};

/// Registers the `aws_kms` backend.
pub type AwsKmsFactory = keymanager_engine::kit::KmsFactory<AwsKmsBackend>;
