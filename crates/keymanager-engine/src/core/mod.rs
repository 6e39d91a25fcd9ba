//! The core vocabulary: key ids and types, hashes, signer options, signature schemes,
//! digests and ECDSA encodings. Pure rules, with their own error types: nothing here knows
//! about backends, SPIRE's wire encoding or the engine's error type.

pub mod algorithm;
pub mod ecdsa_der;
pub mod key;
pub mod private_key;
