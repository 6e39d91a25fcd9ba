//! The single place where errors become gRPC status codes.

use keymanager_engine::settings::SettingsError;
use keymanager_engine::{EngineError, ErrorClass};
use tonic::{Code, Status};

use crate::wire::WireError;

/// Why a KeyManager request failed, before or inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A field SPIRE's protocol does not allow.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A KeyManager call arrived before Configure.
    #[error("not configured")]
    NotConfigured,
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Maps a request error to the status SPIRE expects (InvalidArgument for bad requests,
/// NotFound for unknown keys, the backend's kind otherwise).
pub fn request_error_to_status(error: &RequestError) -> Status {
    let code = match error {
        RequestError::Wire(_) => Code::InvalidArgument,
        RequestError::NotConfigured => Code::FailedPrecondition,
        RequestError::Engine(engine) => engine_code(engine),
    };
    Status::new(code, error.to_string())
}

/// Maps an engine error to a status.
pub fn engine_error_to_status(error: &EngineError) -> Status {
    Status::new(engine_code(error), error.to_string())
}

fn engine_code(error: &EngineError) -> Code {
    match error.class() {
        ErrorClass::InvalidArgument => Code::InvalidArgument,
        ErrorClass::NotFound => Code::NotFound,
        ErrorClass::Unauthenticated => Code::Unauthenticated,
        ErrorClass::PermissionDenied => Code::PermissionDenied,
        ErrorClass::ResourceExhausted => Code::ResourceExhausted,
        ErrorClass::Unavailable => Code::Unavailable,
        ErrorClass::FailedPrecondition => Code::FailedPrecondition,
        ErrorClass::Internal => Code::Internal,
    }
}

/// Configuration errors are always InvalidArgument.
pub(crate) fn settings_error_to_status(error: &SettingsError) -> Status {
    Status::invalid_argument(error.to_string())
}
