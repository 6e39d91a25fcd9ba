//! One mapping from AWS SDK failures (KMS, the tagging API, STS: all share smithy's error
//! shape) to the engine's error kinds, keeping the whole cause chain.

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use keymanager_engine::kit::classify;
use keymanager_engine::{BackendError, BackendErrorKind};

/// The AWS service a call went to, named in messages.
#[derive(Clone, Copy, Debug)]
pub enum Service {
    /// AWS KMS.
    Kms,
    /// The Resource Groups Tagging API.
    Tagging,
    /// AWS STS.
    Sts,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Self::Kms => "KMS",
            Self::Tagging => "Resource Groups Tagging API",
            Self::Sts => "STS",
        }
    }
}

/// Maps an SDK failure of `operation` on `object`.
pub fn sdk_error<E>(
    service: Service,
    operation: &str,
    object: &str,
    error: SdkError<E, HttpResponse>,
) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let SdkError::ServiceError(failure) = &error {
        let code = failure.err().code();
        let status = failure.raw().status().as_u16();
        let kind = code
            .and_then(kind_for_code)
            .unwrap_or_else(|| classify::kind_for_http_status(status));
        return classify::service_failed(
            kind,
            service.name(),
            operation,
            object,
            code,
            failure.err().message(),
            Some(status),
        );
    }
    let kind = match credentials_failure(&error) {
        Some(kind) => kind,
        None => match &error {
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => BackendErrorKind::Unavailable,
            SdkError::DispatchFailure(_) => classify::kind_for_transport(&error),
            _ => BackendErrorKind::Internal,
        },
    };
    classify::call_failed(kind, service.name(), operation, object, error)
}

/// Whether the failure was getting credentials: missing or refused is `Unauthenticated`
/// (not retried: the fix is configuration); a provider that timed out or failed on its own
/// (IMDS, STS unreachable) is `Unavailable`.
fn credentials_failure(error: &(dyn std::error::Error + 'static)) -> Option<BackendErrorKind> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(credentials) = e.downcast_ref::<CredentialsError>() {
            return Some(match credentials {
                CredentialsError::CredentialsNotLoaded(_)
                | CredentialsError::InvalidConfiguration(_) => BackendErrorKind::Unauthenticated,
                CredentialsError::ProviderTimedOut(_) => BackendErrorKind::Unavailable,
                // An STS refusal (AccessDenied, ExpiredToken, InvalidClientTokenId) arrives
                // as a provider error: the chain's text says which.
                _ if mentions_refusal(e) => BackendErrorKind::Unauthenticated,
                _ => BackendErrorKind::Unavailable,
            });
        }
        current = e.source();
    }
    None
}

fn mentions_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    let chain = classify::describe(error);
    [
        "AccessDenied",
        "ExpiredToken",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
    ]
    .iter()
    .any(|code| chain.contains(code))
}

/// KMS error codes (and the AWS-wide ones KMS returns).
fn kind_for_code(code: &str) -> Option<BackendErrorKind> {
    Some(match code {
        "ThrottlingException"
        | "Throttling"
        | "LimitExceededException"
        | "RequestLimitExceeded" => BackendErrorKind::ResourceExhausted,
        "NotFoundException" => BackendErrorKind::NotFound,
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "ExpiredTokenException"
        | "ExpiredToken"
        | "InvalidClientTokenId"
        | "MissingAuthenticationToken" => BackendErrorKind::Unauthenticated,
        "AccessDeniedException" | "AccessDenied" => BackendErrorKind::PermissionDenied,
        "DisabledException" | "KMSInvalidStateException" | "AlreadyExistsException" => {
            BackendErrorKind::FailedPrecondition
        }
        "ValidationException"
        | "InvalidKeyUsageException"
        | "InvalidAliasNameException"
        | "InvalidParameterException"
        | "MalformedPolicyDocumentException" => BackendErrorKind::InvalidArgument,
        "KMSInternalException"
        | "DependencyTimeoutException"
        | "InternalFailure"
        | "InternalServiceException"
        | "ServiceUnavailable" => BackendErrorKind::Unavailable,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_and_permission_codes_are_not_transient() {
        for code in [
            "ExpiredTokenException",
            "UnrecognizedClientException",
            "InvalidSignatureException",
        ] {
            assert_eq!(kind_for_code(code), Some(BackendErrorKind::Unauthenticated));
        }
        assert_eq!(
            kind_for_code("AccessDeniedException"),
            Some(BackendErrorKind::PermissionDenied)
        );
        assert_eq!(
            kind_for_code("ThrottlingException"),
            Some(BackendErrorKind::ResourceExhausted)
        );
        assert_eq!(kind_for_code("SomethingNew"), None);
    }

    #[test]
    fn missing_credentials_are_unauthenticated_and_a_slow_provider_is_transient() {
        let missing = CredentialsError::not_loaded("no providers in chain provided credentials");
        assert_eq!(
            credentials_failure(&missing),
            Some(BackendErrorKind::Unauthenticated)
        );
        let slow = CredentialsError::provider_timed_out(std::time::Duration::from_secs(5));
        assert_eq!(
            credentials_failure(&slow),
            Some(BackendErrorKind::Unavailable)
        );
        let refused = CredentialsError::provider_error(std::io::Error::other(
            "AccessDenied: User is not authorized to perform: sts:AssumeRole",
        ));
        assert_eq!(
            credentials_failure(&refused),
            Some(BackendErrorKind::Unauthenticated)
        );
    }
}
