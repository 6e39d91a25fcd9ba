//! The engine's error type. The plugin layer maps it to gRPC status codes in one place.

use crate::algorithm::HashAlgorithm;
use crate::backend::BackendError;
use crate::key::{KeyId, KeyType};

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The request carried an empty key id. The text is compared exactly by SPIRE's suite.
    #[error("key id is required")]
    KeyIdRequired,
    /// The key type was left unspecified.
    #[error("key type is required")]
    KeyTypeRequired,
    /// A key type value outside the protocol enum.
    #[error(
        "unknown key type {0}; supported: ec-p256 (1), ec-p384 (2), rsa-2048 (3), rsa-4096 (4)"
    )]
    UnknownKeyType(i32),
    /// The backend cannot create keys of this type.
    #[error("the {backend} backend does not support key type {key_type}")]
    KeyTypeUnsupported {
        /// Backend name.
        backend: &'static str,
        /// The requested type.
        key_type: KeyType,
    },
    /// No signer options were sent.
    #[error("signer opts is required")]
    SignerOptsRequired,
    /// The hash algorithm was left unspecified.
    #[error("hash algorithm is required")]
    HashAlgorithmRequired,
    /// A hash value this key manager does not implement (e.g. 3 = SHA-1).
    #[error(
        "unsupported hash algorithm {0}; supported: SHA224 (4), SHA256 (5), SHA384 (6), SHA512 (7), \
         SHA3_224 (10), SHA3_256 (11), SHA3_384 (12), SHA3_512 (13), SHA512_224 (14), SHA512_256 (15)"
    )]
    UnknownHashAlgorithm(i32),
    /// The digest length does not match its hash.
    #[error("digest is {actual} bytes but {hash} digests are {expected} bytes")]
    DigestLength {
        /// Declared hash.
        hash: HashAlgorithm,
        /// Its output length.
        expected: usize,
        /// What was sent.
        actual: usize,
    },
    /// PSS options for an EC key.
    #[error("RSA-PSS options cannot be used with {0} key")]
    PssOnEcKey(KeyType),
    /// A negative salt length other than -1.
    #[error(
        "invalid PSS salt length {0}; use -1 (hash length), 0 (maximum) or a positive byte count"
    )]
    InvalidPssSaltLength(i32),
    /// The requested salt does not fit the modulus.
    #[error(
        "PSS salt length {salt} is too long for a {modulus_bits}-bit key with {hash}; the maximum is {max}"
    )]
    PssSaltTooLong {
        /// Requested salt length in bytes.
        salt: usize,
        /// The largest salt that fits.
        max: usize,
        /// The hash.
        hash: HashAlgorithm,
        /// Modulus size.
        modulus_bits: usize,
    },
    /// The backend only supports PSS salts equal to the hash length.
    #[error(
        "the {backend} backend only signs RSA-PSS with a salt as long as the hash (salt length -1 or {hash_len}); got {requested}"
    )]
    PssSaltUnsupported {
        /// Backend name.
        backend: &'static str,
        /// The salt length that was requested, in bytes.
        requested: usize,
        /// The hash length.
        hash_len: usize,
    },
    /// The backend cannot use this scheme with this key.
    #[error(
        "the {backend} backend cannot sign {scheme} with {key_type} key {id:?}; supported: {supported}"
    )]
    SchemeUnsupported {
        /// Backend name.
        backend: &'static str,
        /// Key id.
        id: KeyId,
        /// Key type.
        key_type: KeyType,
        /// The scheme, e.g. `ECDSA/SHA-384`.
        scheme: String,
        /// What the key can do instead.
        supported: String,
    },
    /// No key under this id.
    #[error("key {0:?} not found")]
    KeyNotFound(KeyId),
    /// A KeyManager RPC arrived before Configure.
    #[error("not configured")]
    NotConfigured,
    /// The live-key cap refuses another key.
    #[error(
        "refusing to create key {id:?}: this server already holds {count} keys (limit {limit})"
    )]
    KeyLimitReached {
        /// Requested id.
        id: KeyId,
        /// Keys held.
        count: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The backend returned a malformed signature.
    #[error("backend returned an invalid signature for key {id:?}: {reason}")]
    InvalidBackendSignature {
        /// Key id.
        id: KeyId,
        /// What was wrong.
        reason: String,
    },
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}
