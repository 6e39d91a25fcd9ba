//! The key engine shared by every backend.
//!
//! Everything a backend would otherwise re-implement lives here: the key and algorithm
//! types ([`KeyType`], [`HashAlgorithm`], [`SignatureScheme`]), the rules that decide which
//! signing requests are valid, ECDSA signature normalisation, fingerprints, and the
//! in-memory public-key cache ([`Engine`]). A backend is a small adapter behind
//! [`Backend`]: create a key, sign with it, list its keys, retire a replaced key, and
//! declare what it can do through [`Capabilities`]. [`sweep`] holds the stale-key rules
//! every KMS backend applies.

mod algorithm;
mod backend;
mod ecdsa_der;
mod engine;
mod error;
mod key;
pub mod lifecycle;
pub mod resilience;
pub mod server_identity;
pub mod settings;
pub mod sweep;

pub use algorithm::{Digest, HashAlgorithm, PssSaltLength, SignatureScheme, SignerOpts};
pub use backend::{
    Backend, BackendConfig, BackendError, BackendErrorKind, BackendFactory, BackendKey,
    BackendSignature, Capabilities, CoreConfig, KeyHandle, PssSaltSupport, SchemeFamily,
    SigningSupport,
};
pub use ecdsa_der::{ecdsa_der_to_fixed, ecdsa_fixed_to_der};
pub use engine::{Engine, EngineOptions, Signature};
pub use error::EngineError;
pub use key::{Fingerprint, KeyId, KeyType, PublicKey};
