//! A private key brought in from outside (`keys import`, `keys migrate`): parsed once from
//! PEM or DER (PKCS#8, SEC1 or PKCS#1), limited to SPIRE's key types, and held as PKCS#8
//! DER in memory that is zeroed when dropped. `Debug` shows the type and fingerprint only.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use zeroize::Zeroizing;

use crate::core::key::{Fingerprint, KeyType};

/// Why a private key could not be taken in.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrivateKeyError {
    /// Not a key in any accepted encoding.
    #[error(
        "not a private key this tool reads: expected PEM or DER, PKCS#8 (\"PRIVATE KEY\"), SEC1 (\"EC PRIVATE KEY\") or PKCS#1 (\"RSA PRIVATE KEY\"), of type ec-p256, ec-p384, rsa-2048 or rsa-4096{0}"
    )]
    Unreadable(String),
    /// A PEM block this tool will not decrypt.
    #[error(
        "the key is encrypted (\"ENCRYPTED PRIVATE KEY\"); decrypt it first, e.g. `openssl pkey -in FILE -out PLAIN.pem`, and destroy the plain copy afterwards"
    )]
    Encrypted,
    /// A key of a type SPIRE does not use.
    #[error(
        "{0} keys cannot be used by SPIRE; allowed key types: ec-p256, ec-p384, rsa-2048, rsa-4096"
    )]
    UnsupportedType(String),
}

/// A parsed private key of one of SPIRE's key types.
pub struct PrivateKeyMaterial {
    key_type: KeyType,
    pkcs8: Zeroizing<Vec<u8>>,
    spki_der: Arc<[u8]>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for PrivateKeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PrivateKeyMaterial({}, {})",
            self.key_type, self.fingerprint
        )
    }
}

impl PrivateKeyMaterial {
    /// Parses a key file's bytes: PEM (the first private-key block; `EC PARAMETERS` blocks
    /// are skipped) or DER.
    pub fn parse(bytes: &[u8]) -> Result<Self, PrivateKeyError> {
        let text = std::str::from_utf8(bytes).ok();
        match text.filter(|t| t.contains("-----BEGIN ")) {
            Some(text) => {
                let (label, der) = pem_private_block(text)?;
                match label.as_str() {
                    "PRIVATE KEY" => Self::from_pkcs8_der(&der),
                    "EC PRIVATE KEY" => Self::from_sec1_der(&der),
                    "RSA PRIVATE KEY" => Self::from_pkcs1_der(&der),
                    _ => Err(PrivateKeyError::Unreadable(format!(
                        " (found a PEM block \"{label}\")"
                    ))),
                }
            }
            None => Self::from_pkcs8_der(bytes)
                .or_else(|_| Self::from_sec1_der(bytes))
                .or_else(|_| Self::from_pkcs1_der(bytes))
                .map_err(|e| match e {
                    PrivateKeyError::UnsupportedType(_) => e,
                    _ => PrivateKeyError::Unreadable(String::new()),
                }),
        }
    }

    /// A PKCS#8 DER private key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, PrivateKeyError> {
        if let Ok(key) = p256::SecretKey::from_pkcs8_der(der) {
            return Self::p256(&key);
        }
        if let Ok(key) = p384::SecretKey::from_pkcs8_der(der) {
            return Self::p384(&key);
        }
        match rsa::PrivateKey::from_pkcs8_der(der) {
            Ok(key) => Self::rsa(&key),
            Err(_) => Err(unsupported_or_unreadable(der)),
        }
    }

    fn from_sec1_der(der: &[u8]) -> Result<Self, PrivateKeyError> {
        if let Ok(key) = p256::SecretKey::from_sec1_der(der) {
            return Self::p256(&key);
        }
        if let Ok(key) = p384::SecretKey::from_sec1_der(der) {
            return Self::p384(&key);
        }
        Err(PrivateKeyError::Unreadable(
            " (an SEC1 key, but not on P-256 or P-384)".into(),
        ))
    }

    fn from_pkcs1_der(der: &[u8]) -> Result<Self, PrivateKeyError> {
        rsa::PrivateKey::from_pkcs1_der(der)
            .map_err(|_| PrivateKeyError::Unreadable(String::new()))
            .and_then(|key| Self::rsa(&key))
    }

    fn p256(key: &p256::SecretKey) -> Result<Self, PrivateKeyError> {
        let pkcs8 = key.to_pkcs8_der().map_err(encoding)?;
        let spki = key.public_key().to_public_key_der().map_err(encoding)?;
        Ok(Self::new(
            KeyType::EcP256,
            pkcs8.as_bytes(),
            spki.as_bytes(),
        ))
    }

    fn p384(key: &p384::SecretKey) -> Result<Self, PrivateKeyError> {
        let pkcs8 = key.to_pkcs8_der().map_err(encoding)?;
        let spki = key.public_key().to_public_key_der().map_err(encoding)?;
        Ok(Self::new(
            KeyType::EcP384,
            pkcs8.as_bytes(),
            spki.as_bytes(),
        ))
    }

    fn rsa(key: &rsa::PrivateKey) -> Result<Self, PrivateKeyError> {
        let key_type = match key.size() * 8 {
            2048 => KeyType::Rsa2048,
            4096 => KeyType::Rsa4096,
            other => return Err(PrivateKeyError::UnsupportedType(format!("RSA-{other}"))),
        };
        // Re-encoded: a PKCS#1 input becomes PKCS#8, and every store gets one form.
        let pkcs8 = key.to_pkcs8_der().map_err(encoding)?;
        let spki = key.to_public_key().to_public_key_der().map_err(encoding)?;
        Ok(Self::new(key_type, pkcs8.as_bytes(), spki.as_bytes()))
    }

    fn new(key_type: KeyType, pkcs8: &[u8], spki: &[u8]) -> Self {
        Self {
            key_type,
            pkcs8: Zeroizing::new(pkcs8.to_vec()),
            spki_der: Arc::from(spki),
            fingerprint: Fingerprint::of_spki(spki),
        }
    }

    /// The key type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The private key as PKCS#8 DER (what every store's import takes). Never log it.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key as DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &Arc<[u8]> {
        &self.spki_der
    }

    /// The fingerprint SPIRE's plugin reports for this key.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// Checks `--expect-fingerprint` (hex, any case, `:` separators allowed).
    pub fn check_fingerprint(&self, expected: &str) -> Result<(), String> {
        let normalised: String = expected
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_ascii_lowercase();
        if normalised == self.fingerprint.as_str() {
            Ok(())
        } else {
            Err(format!(
                "the key's fingerprint is {}, not the expected {expected}: refusing to import it",
                self.fingerprint
            ))
        }
    }
}

fn encoding(e: impl fmt::Display) -> PrivateKeyError {
    PrivateKeyError::Unreadable(format!(" (re-encoding failed: {e})"))
}

/// Names an RSA key of the wrong size or an EC key on another curve when the PKCS#8
/// algorithm says so, rather than just "unreadable".
fn unsupported_or_unreadable(der: &[u8]) -> PrivateKeyError {
    if let Ok(key) = rsa::PrivateKey::from_pkcs8_der(der) {
        return PrivateKeyError::UnsupportedType(format!("RSA-{}", key.size() * 8));
    }
    // id-ecPublicKey with a curve other than P-256/P-384, or another algorithm (Ed25519).
    const ED25519_OID: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
    const EC_OID: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    if contains(der, ED25519_OID) {
        return PrivateKeyError::UnsupportedType("Ed25519".into());
    }
    if contains(der, EC_OID) {
        return PrivateKeyError::UnsupportedType("EC keys on this curve".into());
    }
    PrivateKeyError::Unreadable(String::new())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The first PEM block holding a private key: its label and decoded body.
fn pem_private_block(text: &str) -> Result<(String, Zeroizing<Vec<u8>>), PrivateKeyError> {
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + "-----BEGIN ".len()..];
        let Some(label_end) = after.find("-----") else {
            break;
        };
        let label = after[..label_end].to_string();
        let body_and_rest = &after[label_end + 5..];
        let end_marker = format!("-----END {label}-----");
        let Some(end) = body_and_rest.find(&end_marker) else {
            return Err(PrivateKeyError::Unreadable(format!(
                " (PEM block \"{label}\" has no END line)"
            )));
        };
        rest = &body_and_rest[end + end_marker.len()..];
        if label == "ENCRYPTED PRIVATE KEY" {
            return Err(PrivateKeyError::Encrypted);
        }
        if !label.ends_with("PRIVATE KEY") {
            continue; // EC PARAMETERS, a certificate beside the key, ...
        }
        let body = &body_and_rest[..end];
        if body.contains("Proc-Type:") {
            return Err(PrivateKeyError::Encrypted);
        }
        let b64: Zeroizing<String> =
            Zeroizing::new(body.chars().filter(|c| !c.is_whitespace()).collect());
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|_| {
                PrivateKeyError::Unreadable(format!(" (PEM block \"{label}\" is not base64)"))
            })?;
        return Ok((label, Zeroizing::new(der)));
    }
    Err(PrivateKeyError::Unreadable(
        " (no PEM block holding a private key)".into(),
    ))
}

#[cfg(test)]
mod tests;
