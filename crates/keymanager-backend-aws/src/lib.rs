//! The `aws_kms` backend, drop-in for SPIRE's built-in `aws_kms` KeyManager.
//!
//! This crate currently holds the configuration (every `plugin_data` key of SPIRE's
//! `aws_kms` with the same meaning and SPIRE's validation rules, plus `key_prefix`,
//! `assume_role_arn`, `external_id`, `role_session_name` and `endpoint`) and the key naming
//! (aliases, descriptions, tags). The KMS client and the `Backend` implementation come next;
//! until then the backend is not registered in the binary.

mod backend;
pub mod config;
pub mod naming;
pub mod policy;

pub use backend::{AwsKmsBackend, AwsKmsFactory};
pub use config::{AwsKmsConfig, Credentials, Discovery};
