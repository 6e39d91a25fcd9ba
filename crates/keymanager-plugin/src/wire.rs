//! SPIRE's KeyManager wire values → the engine's types. The protocol's numbering and the
//! messages SPIRE's conformance suite compares live here, not in the engine.

use keymanager_engine::{EmptyKeyId, HashAlgorithm, KeyId, KeyType, PssSaltLength, SignerOpts};
use keymanager_proto::keymanager::sign_data_request::SignerOpts as WireSignerOpts;

/// A request field SPIRE's protocol does not allow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
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
    /// A negative salt length other than -1.
    #[error(
        "invalid PSS salt length {0}; use -1 (hash length), 0 (maximum) or a positive byte count"
    )]
    InvalidPssSaltLength(i32),
}

impl From<EmptyKeyId> for WireError {
    fn from(_: EmptyKeyId) -> Self {
        Self::KeyIdRequired
    }
}

/// A key id from a request.
pub fn key_id(id: &str) -> Result<KeyId, WireError> {
    Ok(KeyId::new(id)?)
}

/// Decodes the protocol's `KeyType` enum value.
pub fn key_type(value: i32) -> Result<KeyType, WireError> {
    match value {
        0 => Err(WireError::KeyTypeRequired),
        1 => Ok(KeyType::EcP256),
        2 => Ok(KeyType::EcP384),
        3 => Ok(KeyType::Rsa2048),
        4 => Ok(KeyType::Rsa4096),
        other => Err(WireError::UnknownKeyType(other)),
    }
}

/// The protocol's `KeyType` enum value.
pub fn key_type_to_wire(key_type: KeyType) -> i32 {
    match key_type {
        KeyType::EcP256 => 1,
        KeyType::EcP384 => 2,
        KeyType::Rsa2048 => 3,
        KeyType::Rsa4096 => 4,
    }
}

/// Decodes the raw hash value. SPIRE casts Go's `crypto.Hash` straight through, so values
/// outside the enum (3 = SHA-1 from TLS 1.2) arrive and must be refused cleanly.
pub fn hash_algorithm(value: i32) -> Result<HashAlgorithm, WireError> {
    match value {
        0 => Err(WireError::HashAlgorithmRequired),
        4 => Ok(HashAlgorithm::Sha224),
        5 => Ok(HashAlgorithm::Sha256),
        6 => Ok(HashAlgorithm::Sha384),
        7 => Ok(HashAlgorithm::Sha512),
        10 => Ok(HashAlgorithm::Sha3_224),
        11 => Ok(HashAlgorithm::Sha3_256),
        12 => Ok(HashAlgorithm::Sha3_384),
        13 => Ok(HashAlgorithm::Sha3_512),
        14 => Ok(HashAlgorithm::Sha512_224),
        15 => Ok(HashAlgorithm::Sha512_256),
        other => Err(WireError::UnknownHashAlgorithm(other)),
    }
}

/// The protocol's hash enum value (Go's `crypto.Hash`).
pub fn hash_algorithm_to_wire(hash: HashAlgorithm) -> i32 {
    match hash {
        HashAlgorithm::Sha224 => 4,
        HashAlgorithm::Sha256 => 5,
        HashAlgorithm::Sha384 => 6,
        HashAlgorithm::Sha512 => 7,
        HashAlgorithm::Sha3_224 => 10,
        HashAlgorithm::Sha3_256 => 11,
        HashAlgorithm::Sha3_384 => 12,
        HashAlgorithm::Sha3_512 => 13,
        HashAlgorithm::Sha512_224 => 14,
        HashAlgorithm::Sha512_256 => 15,
    }
}

/// Decodes the protocol's `salt_length` with Go's `rsa.PSSOptions` meanings.
pub fn pss_salt_length(value: i32) -> Result<PssSaltLength, WireError> {
    match value {
        -1 => Ok(PssSaltLength::EqualsHash),
        0 => Ok(PssSaltLength::Maximum),
        n => u16::try_from(n)
            .ok()
            .and_then(PssSaltLength::exact)
            .ok_or(WireError::InvalidPssSaltLength(value)),
    }
}

/// Decodes the signer options of a SignData request.
pub fn signer_opts(opts: Option<WireSignerOpts>) -> Result<SignerOpts, WireError> {
    match opts {
        None => Err(WireError::SignerOptsRequired),
        Some(WireSignerOpts::HashAlgorithm(hash)) => Ok(SignerOpts::Hash(hash_algorithm(hash)?)),
        Some(WireSignerOpts::PssOptions(pss)) => Ok(SignerOpts::Pss {
            hash: hash_algorithm(pss.hash_algorithm)?,
            salt: pss_salt_length(pss.salt_length)?,
        }),
    }
}

/// The deadline gRPC's `grpc-timeout` header carries (`30S`, `29999m`, `100u`…), if any.
pub fn grpc_timeout(header: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    if header.len() < 2 || header.len() > 9 {
        return None;
    }
    // A multi-byte last character is no unit (and no char boundary to split at).
    let (digits, unit) = header.split_at_checked(header.len() - 1)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_types_round_trip_and_unknown_values_are_refused() {
        for t in KeyType::ALL {
            assert_eq!(key_type(key_type_to_wire(t)).unwrap(), t);
        }
        assert_eq!(key_type(0), Err(WireError::KeyTypeRequired));
        assert_eq!(key_type(9), Err(WireError::UnknownKeyType(9)));
        assert_eq!(key_id("").unwrap_err().to_string(), "key id is required");
    }

    #[test]
    fn hash_values_round_trip_and_out_of_enum_values_are_refused() {
        for h in HashAlgorithm::ALL {
            assert_eq!(hash_algorithm(hash_algorithm_to_wire(h)).unwrap(), h);
        }
        assert_eq!(hash_algorithm(0), Err(WireError::HashAlgorithmRequired));
        // 3 is Go's crypto.SHA1, sent by TLS 1.2 ACME signing.
        let err = hash_algorithm(3).unwrap_err();
        assert!(
            err.to_string().contains("unsupported hash algorithm 3"),
            "{err}"
        );
        assert!(hash_algorithm(-7).is_err());
        assert!(hash_algorithm(16).is_err());
    }

    #[test]
    fn pss_salts_follow_go_semantics() {
        assert_eq!(pss_salt_length(-1), Ok(PssSaltLength::EqualsHash));
        assert_eq!(pss_salt_length(0), Ok(PssSaltLength::Maximum));
        assert_eq!(pss_salt_length(20), Ok(PssSaltLength::exact(20).unwrap()));
        for bad in [-2, i32::MIN, i32::MAX, 65_536] {
            assert_eq!(
                pss_salt_length(bad),
                Err(WireError::InvalidPssSaltLength(bad))
            );
        }
    }

    #[test]
    fn grpc_timeouts_parse_and_junk_is_ignored() {
        use std::time::Duration;
        assert_eq!(grpc_timeout("30S"), Some(Duration::from_secs(30)));
        assert_eq!(grpc_timeout("29999m"), Some(Duration::from_millis(29_999)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        for junk in [
            "",
            "S",
            "10",
            "10x",
            "-1S",
            "123456789S",
            "1 S",
            "1é",
            "30\u{1F600}",
        ] {
            assert_eq!(grpc_timeout(junk), None, "{junk:?}");
        }
    }
}
