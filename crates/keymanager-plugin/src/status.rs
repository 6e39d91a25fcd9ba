//! The single place where errors become gRPC status codes.

use keymanager_engine::settings::SettingsError;
use keymanager_engine::{BackendErrorKind, EngineError};
use tonic::{Code, Status};

/// Maps an engine error to the status SPIRE expects (InvalidArgument for bad requests,
/// NotFound for unknown keys, the backend's kind otherwise).
pub fn engine_error_to_status(error: &EngineError) -> Status {
    let code = match error {
        EngineError::KeyIdRequired
        | EngineError::KeyTypeRequired
        | EngineError::UnknownKeyType(_)
        | EngineError::KeyTypeUnsupported { .. }
        | EngineError::SignerOptsRequired
        | EngineError::HashAlgorithmRequired
        | EngineError::UnknownHashAlgorithm(_)
        | EngineError::DigestLength { .. }
        | EngineError::PssOnEcKey(_)
        | EngineError::InvalidPssSaltLength(_)
        | EngineError::PssSaltTooLong { .. }
        | EngineError::PssSaltUnsupported { .. }
        | EngineError::SchemeUnsupported { .. } => Code::InvalidArgument,
        EngineError::KeyNotFound(_) => Code::NotFound,
        EngineError::NotConfigured => Code::FailedPrecondition,
        EngineError::KeyLimitReached { .. } => Code::ResourceExhausted,
        EngineError::InvalidBackendSignature { .. } => Code::Internal,
        EngineError::Backend(backend) => match backend.kind {
            BackendErrorKind::InvalidArgument => Code::InvalidArgument,
            BackendErrorKind::NotFound => Code::NotFound,
            BackendErrorKind::PermissionDenied => Code::PermissionDenied,
            BackendErrorKind::ResourceExhausted => Code::ResourceExhausted,
            BackendErrorKind::Unavailable => Code::Unavailable,
            BackendErrorKind::FailedPrecondition => Code::FailedPrecondition,
            BackendErrorKind::Internal => Code::Internal,
        },
        _ => Code::Internal,
    };
    Status::new(code, error.to_string())
}

/// Configuration errors are always InvalidArgument.
pub(crate) fn settings_error_to_status(error: &SettingsError) -> Status {
    Status::invalid_argument(error.to_string())
}
