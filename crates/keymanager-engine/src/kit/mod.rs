//! The KMS backend kit: what every KMS adapter needs and would otherwise write again.
//!
//! - the factory/configuration shell ([`KmsSettings`], [`KmsAdapter`], [`KmsFactory`],
//!   [`KmsConfig`]): server identity, endpoint, lifecycle schedule, store identity;
//! - [`server_identity`]: `key_identifier_file` / `key_identifier_value`;
//! - [`endpoint`]: the `endpoint` setting, one validation rule;
//! - [`policy_file`]: `key_policy_file`, read and checked at Configure;
//! - [`vocabulary`]: the tag and label names;
//! - [`classify`]: failed calls → error kinds and messages with their whole cause chain;
//! - [`paging`]: list loops that cannot loop forever;
//! - [`pem`]: public keys handed out as PEM;
//! - [`shared`]: the shared-keys mode (config block, name template, locked rotation);
//! - [`spki`]: public keys handed out as raw parts (EC point, RSA modulus);
//! - [`swap`]: values a re-Configure replaces while calls use them;
//! - [`uuid_name`]: `<owner>-<uuid>-<key id>` key names (Vault, Key Vault);
//! - [`wrap`]: a private key wrapped for a KMS import (RSA-OAEP, AES key wrap).

pub mod classify;
pub mod endpoint;
pub mod paging;
pub mod pem;
pub mod policy_file;
pub mod server_identity;
pub mod shared;
mod shell;
pub mod spki;
pub mod swap;
pub mod uuid_name;
pub mod vocabulary;
pub mod wrap;

pub use shell::{COMMON_KEYS, KmsAdapter, KmsConfig, KmsFactory, KmsSettings};
