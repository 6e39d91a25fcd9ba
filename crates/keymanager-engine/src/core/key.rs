//! Key identity and public-key types.

use std::fmt;
use std::sync::Arc;

use sha2::Digest as _;

/// An empty key id. The text is what SPIRE's conformance suite expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("key id is required")]
pub struct EmptyKeyId;

/// A SPIRE key id such as `x509-CA-A` or `bundle-acme-acme_account+key`. Never empty.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(Arc<str>);

impl KeyId {
    /// Accepts any non-empty id; SPIRE ids may contain `.`, `+` and `_`, so backends with
    /// restricted naming encode ids themselves.
    pub fn new(id: &str) -> Result<Self, EmptyKeyId> {
        if id.is_empty() {
            return Err(EmptyKeyId);
        }
        Ok(Self(Arc::from(id)))
    }

    /// The id as SPIRE sent it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// The key types SPIRE's KeyManager v1 protocol knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// ECDSA on NIST P-256.
    EcP256,
    /// ECDSA on NIST P-384.
    EcP384,
    /// RSA with a 2048-bit modulus.
    Rsa2048,
    /// RSA with a 4096-bit modulus.
    Rsa4096,
}

impl KeyType {
    /// Every key type, in protocol order.
    pub const ALL: [KeyType; 4] = [Self::EcP256, Self::EcP384, Self::Rsa2048, Self::Rsa4096];

    /// SPIRE's configuration spelling (`ca_key_type`, `jwt_key_type`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::EcP384 => "ec-p384",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa4096 => "rsa-4096",
        }
    }

    /// Parses SPIRE's configuration spelling.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// True for RSA keys.
    pub fn is_rsa(self) -> bool {
        matches!(self, Self::Rsa2048 | Self::Rsa4096)
    }

    /// RSA modulus size in bits, or `None` for EC keys.
    pub fn rsa_bits(self) -> Option<usize> {
        match self {
            Self::Rsa2048 => Some(2048),
            Self::Rsa4096 => Some(4096),
            Self::EcP256 | Self::EcP384 => None,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo, as every SPIRE built-in computes it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint(Arc<str>);

impl Fingerprint {
    /// Fingerprint of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        Self(Arc::from(hex::encode(sha2::Sha256::digest(spki_der))))
    }

    /// The hex string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.0)
    }
}

/// A public key as SPIRE sees it: id, type, DER SubjectPublicKeyInfo and fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    /// The SPIRE key id.
    pub id: KeyId,
    /// The key type.
    pub key_type: KeyType,
    /// DER SubjectPublicKeyInfo.
    pub spki_der: Arc<[u8]>,
    /// SHA-256 fingerprint of `spki_der`.
    pub fingerprint: Fingerprint,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_key_id_is_rejected_with_spires_message() {
        let err = KeyId::new("").unwrap_err();
        assert_eq!(err.to_string(), "key id is required");
    }

    #[test]
    fn key_type_names_round_trip() {
        for t in KeyType::ALL {
            assert_eq!(KeyType::parse(t.as_str()), Some(t));
        }
        assert_eq!(KeyType::parse("ec-p521"), None);
    }

    #[test]
    fn fingerprint_is_lowercase_hex_sha256() {
        // SHA-256 of the empty string.
        assert_eq!(
            Fingerprint::of_spki(b"").as_str(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
