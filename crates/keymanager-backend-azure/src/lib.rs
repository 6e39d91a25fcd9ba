//! The `azure_key_vault` backend: SPIRE's signing keys as Azure Key Vault (or Managed HSM)
//! keys, named and tagged as SPIRE's built-in `azure_key_vault` names and tags them, signed
//! inside the vault.
//!
//! The client is plain reqwest (rustls) against the vault's REST API rather than Azure's
//! Rust SDK crates: reqwest with rustls is already in the build for the Vault and Cloud KMS
//! backends; the surface SPIRE needs is about eight calls (create, get, update, list, delete,
//! sign, and the token endpoints); and `azure_identity` 1.0 has neither
//! `DefaultAzureCredential` nor `EnvironmentCredential`, so SPIRE's credential chain would
//! have to be assembled by hand either way (see [`credentials`]).

mod backend;
mod client;
pub mod config;
pub mod credentials;
pub mod naming;

pub use backend::{AzureBackend, AzureKey};
pub use config::AzureSettings;

/// Registers the backend: `backend = "azure_key_vault"`.
pub type AzureFactory = keymanager_engine::kit::KmsFactory<AzureBackend>;
