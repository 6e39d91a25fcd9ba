//! The key engine shared by every backend.
//!
//! Everything a backend would otherwise re-implement lives here:
//! - [`core`]: key ids and types, hashes, signer options, schemes, digests, ECDSA encodings
//!   (pure rules, no knowledge of backends or SPIRE's wire format);
//! - [`Backend`]: the seam (two-phase key creation, typed key handles, declared
//!   [`Capabilities`]);
//! - [`Engine`]: the public-key cache, request validation, the compensation rules of key
//!   creation, retries and rate limiting ([`resilience`]); [`KeyService`] is its
//!   object-safe face for the plugin and the CLI;
//! - [`config`]: factories, configurations, store identity and run-time setting changes;
//! - [`lifecycle`]: liveness stamps, sweep rules, the sweep and the background loops;
//! - [`handover`]: the `migrate_from` hand-over mode (serving an old store read-only
//!   until SPIRE's rotation has moved every key id to the target store);
//! - [`admin`]: the operator CLI's view of a backend (listing, pruning with the sweep's
//!   rules, per-key operations, store checks);
//! - [`telemetry`]: Prometheus metrics, the `/metrics` endpoint and the audit log;
//! - [`kit`]: what every KMS backend needs (configuration shell, endpoint, policy files,
//!   tag vocabulary, error classification, paging guards).

pub mod admin;
pub mod backend;
pub mod config;
pub mod core;
mod engine;
mod error;
pub mod failpoint;
pub mod handover;
pub mod kit;
pub mod lifecycle;
pub mod resilience;
mod service;
pub mod settings;
pub mod telemetry;

pub use backend::{
    Backend, BackendError, BackendErrorKind, BackendSignature, Capabilities, KeyHandle,
    PssSaltSupport, SchemeFamily, Signed, SigningSupport, StoredKey,
};
pub use config::{
    BackendConfig, BackendFactory, CoreConfig, OnChange, Opened, OpenedBackend, SettingState,
    StoreIdentity,
};
pub use core::algorithm::{
    Digest, HashAlgorithm, PssSaltLength, SchemeError, SignatureScheme, SignerOpts,
};
pub use core::ecdsa_der::{ecdsa_der_to_fixed, ecdsa_fixed_to_der};
pub use core::key::{EmptyKeyId, Fingerprint, KeyId, KeyType, PublicKey};
pub use core::private_key::{PrivateKeyError, PrivateKeyMaterial};
pub use engine::{Engine, EngineOptions, ImportOutcome, Imported, Signature};
pub use error::{EngineError, ErrorClass};
pub use service::{KeyService, SharedKeyService};
