//! PKCS#11 return values → error kinds, once. Messages carry the function and the `CKR_`
//! name, never the library's paragraph-long descriptions, and never a PIN.

use cryptoki::error::{Error, RvError};
use keymanager_engine::{BackendError, BackendErrorKind};

/// The return value of a failed PKCS#11 call, if it was one.
pub fn return_value(error: &Error) -> Option<RvError> {
    match error {
        Error::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// A session (or the token behind it) that is gone: reopen, log in, and try once more.
pub fn is_session_lost(error: &Error) -> bool {
    matches!(
        return_value(error),
        Some(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn
        )
    )
}

/// The PIN was refused: never retried (a token locks after a few wrong PINs).
pub fn is_pin_refused(error: &Error) -> bool {
    matches!(
        return_value(error),
        Some(
            RvError::PinIncorrect
                | RvError::PinInvalid
                | RvError::PinLenRange
                | RvError::PinExpired
                | RvError::PinLocked
        )
    )
}

/// `"{doing}: {function} returned CKR_…"` with the kind that fits.
pub fn pkcs11_error(error: Error, doing: &str) -> BackendError {
    let Error::Pkcs11(rv, function) = error else {
        return BackendError::new(BackendErrorKind::Internal, format!("{doing}: {error}"));
    };
    use BackendErrorKind as K;
    let (kind, hint) = match rv {
        RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange => (
            K::Unauthenticated,
            " (the token refused the PIN; it was tried once and is not retried, so the token is not locked by this plugin)",
        ),
        RvError::PinExpired | RvError::PinLocked => (
            K::Unauthenticated,
            " (the user PIN is locked or expired: the token's security officer must reset it)",
        ),
        RvError::UserNotLoggedIn => (K::Unauthenticated, ""),
        RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::DeviceRemoved
        | RvError::TokenNotPresent
        | RvError::DeviceError
        | RvError::SessionCount => (K::Unavailable, ""),
        RvError::DeviceMemory | RvError::HostMemory => (K::ResourceExhausted, ""),
        RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => (
            K::NotFound,
            " (the key object is gone from the token: was the token re-initialised?)",
        ),
        RvError::MechanismInvalid
        | RvError::MechanismParamInvalid
        | RvError::KeySizeRange
        | RvError::DataLenRange
        | RvError::DataInvalid
        | RvError::TemplateInconsistent
        | RvError::AttributeValueInvalid => (K::InvalidArgument, ""),
        _ => (K::Internal, ""),
    };
    BackendError::new(
        kind,
        format!("{doing}: {function} returned {}{hint}", ckr_name(rv)),
    )
}

/// The specification's name of a return value: `PinIncorrect` → `CKR_PIN_INCORRECT`.
pub fn ckr_name(rv: RvError) -> String {
    let mut name = String::from("CKR_");
    for (i, c) in format!("{rv:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use cryptoki::context::Function;

    use super::*;

    #[test]
    fn errors_name_the_function_and_the_return_value() {
        let e = pkcs11_error(
            Error::Pkcs11(RvError::PinIncorrect, Function::Login),
            "logging in to token \"ca\"",
        );
        assert_eq!(e.kind, BackendErrorKind::Unauthenticated);
        assert!(
            e.message.starts_with("logging in to token \"ca\": "),
            "{}",
            e.message
        );
        assert!(e.message.contains("CKR_PIN_INCORRECT"), "{}", e.message);
        assert!(e.message.contains("not retried"), "{}", e.message);
        assert_eq!(
            ckr_name(RvError::CryptokiAlreadyInitialized),
            "CKR_CRYPTOKI_ALREADY_INITIALIZED"
        );
        assert!(is_session_lost(&Error::Pkcs11(
            RvError::DeviceRemoved,
            Function::Sign
        )));
        assert!(!is_session_lost(&Error::Pkcs11(
            RvError::PinIncorrect,
            Function::Login
        )));
        assert!(is_pin_refused(&Error::Pkcs11(
            RvError::PinLocked,
            Function::Login
        )));
    }
}
