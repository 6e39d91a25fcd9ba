//! The `aws_kms` backend, drop-in for SPIRE's built-in `aws_kms` KeyManager.
//!
//! - `config`: every `plugin_data` key of SPIRE's `aws_kms` with the same meaning and
//!   SPIRE's validation rules, plus `key_prefix`, `assume_role_arn`, `external_id`,
//!   `role_session_name` and `endpoint`;
//! - `naming`: SPIRE's aliases, descriptions and tags, byte for byte;
//! - `policy`: the least-privilege default key policy for an assumed role;
//! - `backend`: the KMS adapter behind the engine's `Backend` and `KeyLifecycle` traits.

mod backend;
pub mod config;
pub mod naming;
pub mod policy;

pub use backend::{AwsKmsBackend, AwsKmsFactory};
pub use config::{AwsKmsConfig, Credentials, Discovery};
