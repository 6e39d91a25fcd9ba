//! One way to turn a failed store call into a [`BackendError`]: the kind decides retries and
//! the gRPC code; the message names the service, the operation, the object and every cause
//! in the chain, so an operator can act on it.
//!
//! Kinds, in the order a backend should test for them:
//! - credentials missing, expired or unknown to the service → `Unauthenticated` (not
//!   retried: the fix is configuration), unless fetching them timed out (→ `Unavailable`);
//! - the credentials lack a permission → `PermissionDenied`;
//! - throttling and quotas → `ResourceExhausted` (retried);
//! - transport: refused, reset, timed out, DNS → `Unavailable` (retried);
//! - service errors: 5xx → `Unavailable` (retried); 4xx by meaning.

use std::error::Error;

use crate::backend::{BackendError, BackendErrorKind, error_chain};

/// The kind for an HTTP status a service answered with, when its own error code says
/// nothing more specific.
pub fn kind_for_http_status(status: u16) -> BackendErrorKind {
    match status {
        400 | 413 | 422 => BackendErrorKind::InvalidArgument,
        401 => BackendErrorKind::Unauthenticated,
        403 => BackendErrorKind::PermissionDenied,
        404 | 410 => BackendErrorKind::NotFound,
        409 | 412 => BackendErrorKind::FailedPrecondition,
        429 => BackendErrorKind::ResourceExhausted,
        408 | 500..=599 => BackendErrorKind::Unavailable,
        _ => BackendErrorKind::Internal,
    }
}

/// The kind for a failure that never reached the service: an I/O error anywhere in the
/// chain is transport (`Unavailable`); so is anything else, since the request may succeed
/// when repeated.
pub fn kind_for_transport(error: &(dyn Error + 'static)) -> BackendErrorKind {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::PermissionDenied
        {
            // A local file (a credentials file, a socket) we may not read.
            return BackendErrorKind::Unauthenticated;
        }
        current = e.source();
    }
    BackendErrorKind::Unavailable
}

/// A failed call: `"{service} {operation} on {object} failed: {cause chain}"`.
pub fn call_failed(
    kind: BackendErrorKind,
    service: &str,
    operation: &str,
    object: &str,
    source: impl Error + Send + Sync + 'static,
) -> BackendError {
    let mut error = BackendError::with_source(
        kind,
        format!("{service} {operation} on {object} failed"),
        source,
    );
    if kind == BackendErrorKind::Unauthenticated {
        error.message.push_str(
            " (check the backend's credentials: missing, expired, or not valid for this service)",
        );
    }
    error
}

/// A failed call with a service error code and message, but no error value to chain:
/// `"{service} {operation} on {object} failed: {code}: {message}"`, never an empty tail.
pub fn service_failed(
    kind: BackendErrorKind,
    service: &str,
    operation: &str,
    object: &str,
    code: Option<&str>,
    message: Option<&str>,
    http_status: Option<u16>,
) -> BackendError {
    let mut detail: Vec<String> = Vec::new();
    if let Some(code) = code.filter(|c| !c.is_empty()) {
        detail.push(code.to_string());
    }
    if let Some(message) = message.filter(|m| !m.is_empty()) {
        detail.push(message.to_string());
    }
    if detail.is_empty() {
        detail.push(match http_status {
            Some(status) => format!("HTTP {status} without an error code or message"),
            None => "no error code or message".to_string(),
        });
    }
    BackendError::new(
        kind,
        format!(
            "{service} {operation} on {object} failed: {}",
            detail.join(": ")
        ),
    )
}

/// The whole chain of `error`, for logs.
pub fn describe(error: &(dyn Error + 'static)) -> String {
    error_chain(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_kinds() {
        assert_eq!(kind_for_http_status(401), BackendErrorKind::Unauthenticated);
        assert_eq!(
            kind_for_http_status(403),
            BackendErrorKind::PermissionDenied
        );
        assert_eq!(
            kind_for_http_status(429),
            BackendErrorKind::ResourceExhausted
        );
        assert_eq!(kind_for_http_status(503), BackendErrorKind::Unavailable);
        assert_eq!(kind_for_http_status(400), BackendErrorKind::InvalidArgument);
    }

    #[test]
    fn a_service_error_without_code_or_message_still_says_something() {
        let e = service_failed(
            BackendErrorKind::Internal,
            "KMS",
            "GetResources",
            "the tagging API",
            Some(""),
            None,
            Some(400),
        );
        assert_eq!(
            e.message,
            "KMS GetResources on the tagging API failed: HTTP 400 without an error code or message"
        );
        assert!(!e.message.ends_with(": "));
    }

    #[test]
    fn transport_failures_keep_their_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(kind_for_transport(&io), BackendErrorKind::Unavailable);
        let e = call_failed(BackendErrorKind::Unavailable, "KMS", "Sign", "arn:k", io);
        assert_eq!(e.message, "KMS Sign on arn:k failed: connection refused");
        let denied = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        assert_eq!(
            kind_for_transport(&denied),
            BackendErrorKind::Unauthenticated
        );
    }
}
