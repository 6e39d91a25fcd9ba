//! The engine's error type. The plugin layer maps it to gRPC status codes in one place.

use std::time::Duration;

use crate::backend::{BackendError, BackendErrorKind};
use crate::core::algorithm::SchemeError;
use crate::core::key::{KeyId, KeyType};

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The signer options do not fit the key or the digest.
    #[error(transparent)]
    Scheme(#[from] SchemeError),
    /// The backend cannot create keys of this type.
    #[error("the {backend} backend does not support key type {key_type}")]
    KeyTypeUnsupported {
        /// Backend name.
        backend: &'static str,
        /// The requested type.
        key_type: KeyType,
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
    /// The live-key cap refuses another key.
    #[error(
        "refusing to create key {id:?}: this server already holds or is creating {count} keys (limit {limit})"
    )]
    KeyLimitReached {
        /// Requested id.
        id: KeyId,
        /// Keys held or being created.
        count: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The client-side sign rate limit cannot serve the call before its deadline.
    #[error(
        "sign rate limit (max_signs_per_second = {per_second}) reached: {reason}; the call was refused at once instead of timing out"
    )]
    RateLimited {
        /// The configured limit.
        per_second: f64,
        /// Why: queue full, or the wait exceeds the deadline.
        reason: String,
    },
    /// The store throttles signing and the adaptive pacing queue cannot serve the call
    /// before its deadline.
    #[error(
        "the key store is throttling signatures: at the learned rate of {per_second:.1} signs/s this call would wait {wait_ms} ms, more than it can within its remaining deadline of {deadline_ms} ms; refused at once instead of timing out (adaptive_rate_limit)"
    )]
    AdaptiveRateLimited {
        /// The learned rate.
        per_second: f64,
        /// The wait the call would need, in milliseconds.
        wait_ms: u128,
        /// The caller's remaining deadline, in milliseconds.
        deadline_ms: u128,
    },
    /// The backend returned a malformed signature.
    #[error("backend returned an invalid signature for key {id:?}: {reason}")]
    InvalidBackendSignature {
        /// Key id.
        id: KeyId,
        /// What was wrong.
        reason: String,
    },
    /// A GenerateKey failed; the current key (if any) stays in service.
    #[error("GenerateKey for {id:?} failed ({kept}): {source}")]
    Generate {
        /// Key id.
        id: KeyId,
        /// What the store holds now, in words.
        kept: &'static str,
        /// The backend failure.
        #[source]
        source: BackendError,
    },
    /// An import failed; the current key (if any) stays in service.
    #[error("importing key {id:?} failed ({kept}): {source}")]
    Import {
        /// Key id.
        id: KeyId,
        /// What the store holds now, in words.
        kept: &'static str,
        /// The backend failure.
        #[source]
        source: BackendError,
    },
    /// The backend has no import.
    #[error(
        "the {backend} backend cannot import key material: its keys are generated inside the store (import works for disk, aws_kms and gcp_kms)"
    )]
    ImportUnsupported {
        /// Backend name.
        backend: &'static str,
    },
    /// An import would replace a live key without `--replace`.
    #[error(
        "key {id:?} already has a live key (fingerprint {fingerprint}); pass --replace to retire it in favour of the imported key"
    )]
    KeyExists {
        /// Key id.
        id: KeyId,
        /// The live key's fingerprint.
        fingerprint: String,
    },
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// What kind of failure an [`EngineError`] is, decided once here: the plugin maps each class
/// to the gRPC code of the same name, and metrics and the audit log report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The request does not fit the key or the backend.
    InvalidArgument,
    /// No such key.
    NotFound,
    /// Credentials missing or rejected.
    Unauthenticated,
    /// Credentials lack a permission.
    PermissionDenied,
    /// A limit (key cap, sign rate, store throttling).
    ResourceExhausted,
    /// The store is unreachable.
    Unavailable,
    /// The key cannot be used in its state.
    FailedPrecondition,
    /// Anything else.
    Internal,
}

impl ErrorClass {
    /// Every class, in a fixed order ([`ErrorClass::index`]).
    pub const ALL: [ErrorClass; 8] = [
        Self::InvalidArgument,
        Self::NotFound,
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::ResourceExhausted,
        Self::Unavailable,
        Self::FailedPrecondition,
        Self::Internal,
    ];

    /// The gRPC code name (`ResourceExhausted`), as the audit log writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::InvalidArgument => "InvalidArgument",
            Self::NotFound => "NotFound",
            Self::Unauthenticated => "Unauthenticated",
            Self::PermissionDenied => "PermissionDenied",
            Self::ResourceExhausted => "ResourceExhausted",
            Self::Unavailable => "Unavailable",
            Self::FailedPrecondition => "FailedPrecondition",
            Self::Internal => "Internal",
        }
    }

    /// The metric label spelling (`resource_exhausted`).
    pub fn label(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
            Self::ResourceExhausted => "resource_exhausted",
            Self::Unavailable => "unavailable",
            Self::FailedPrecondition => "failed_precondition",
            Self::Internal => "internal",
        }
    }

    /// Position in [`ErrorClass::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The class of a backend failure.
    pub fn of_backend(kind: BackendErrorKind) -> Self {
        match kind {
            BackendErrorKind::InvalidArgument => Self::InvalidArgument,
            BackendErrorKind::NotFound => Self::NotFound,
            BackendErrorKind::Unauthenticated => Self::Unauthenticated,
            BackendErrorKind::PermissionDenied => Self::PermissionDenied,
            BackendErrorKind::ResourceExhausted => Self::ResourceExhausted,
            BackendErrorKind::Unavailable => Self::Unavailable,
            BackendErrorKind::FailedPrecondition => Self::FailedPrecondition,
            BackendErrorKind::Internal => Self::Internal,
        }
    }
}

impl EngineError {
    /// What kind of failure this is.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Scheme(_)
            | Self::KeyTypeUnsupported { .. }
            | Self::PssSaltUnsupported { .. }
            | Self::SchemeUnsupported { .. } => ErrorClass::InvalidArgument,
            Self::KeyNotFound(_) => ErrorClass::NotFound,
            Self::KeyLimitReached { .. }
            | Self::RateLimited { .. }
            | Self::AdaptiveRateLimited { .. } => ErrorClass::ResourceExhausted,
            Self::InvalidBackendSignature { .. } => ErrorClass::Internal,
            Self::ImportUnsupported { .. } | Self::KeyExists { .. } => {
                ErrorClass::FailedPrecondition
            }
            Self::Backend(e)
            | Self::Generate { source: e, .. }
            | Self::Import { source: e, .. } => ErrorClass::of_backend(e.kind),
        }
    }

    /// The backend failure behind this error, if there is one.
    pub fn backend_kind(&self) -> Option<BackendErrorKind> {
        match self {
            Self::Backend(e) | Self::Generate { source: e, .. } => Some(e.kind),
            _ => None,
        }
    }

    pub(crate) fn adaptive_rate_limited(denied: crate::resilience::AdaptiveDenied) -> Self {
        Self::AdaptiveRateLimited {
            per_second: denied.per_second,
            wait_ms: denied.wait.as_millis(),
            deadline_ms: denied.deadline.as_millis(),
        }
    }

    pub(crate) fn rate_limited(per_second: f64, wait: Duration, deadline: Duration) -> Self {
        Self::RateLimited {
            per_second,
            reason: format!(
                "the wait of {} ms exceeds the remaining deadline of {} ms",
                wait.as_millis(),
                deadline.as_millis()
            ),
        }
    }
}
