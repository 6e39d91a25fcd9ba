//! Software private keys and the signature schemes over an already hashed digest.

use std::fmt;
use std::sync::Arc;

use keymanager_engine::{
    BackendError, BackendErrorKind, BackendSignature, Digest, HashAlgorithm, KeyType,
    SignatureScheme,
};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::elliptic_curve::Generate;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::{Pkcs1v15Sign, Pss};

use crate::fast_signer::FastSigner;

/// A private key held in process memory. Cheap to clone (shared); zeroised on drop by the
/// underlying crates. `Debug` never prints key material.
#[derive(Clone)]
pub struct SoftwareKey {
    material: KeyMaterial,
    fast: Arc<FastSigner>,
}

/// The key in RustCrypto form: generation, PKCS#8, and every scheme off the fast path.
#[derive(Clone)]
enum KeyMaterial {
    /// ECDSA P-256.
    P256(Arc<p256::ecdsa::SigningKey>),
    /// ECDSA P-384.
    P384(Arc<p384::ecdsa::SigningKey>),
    /// RSA 2048 or 4096.
    Rsa(Arc<rsa::PrivateKey>, KeyType),
}

impl fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SoftwareKey({})", self.key_type())
    }
}

impl SoftwareKey {
    /// Generates a fresh key from the operating system's RNG.
    pub fn generate(key_type: KeyType) -> Result<Self, BackendError> {
        let material = KeyMaterial::generate(key_type)?;
        let pkcs8 = material.to_pkcs8_der()?;
        Ok(Self::with_fast_path(material, &pkcs8))
    }

    /// Decodes a PKCS#8 DER private key (the format SPIRE's disk plugin stores).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, String> {
        Ok(Self::with_fast_path(KeyMaterial::from_pkcs8_der(der)?, der))
    }

    fn with_fast_path(material: KeyMaterial, pkcs8: &[u8]) -> Self {
        let fast = match &material {
            KeyMaterial::P256(_) => FastSigner::p256(pkcs8),
            KeyMaterial::P384(_) => FastSigner::p384(pkcs8),
            KeyMaterial::Rsa(..) => FastSigner::rsa(pkcs8),
        };
        Self {
            material,
            fast: Arc::new(fast),
        }
    }

    /// Encodes the key as PKCS#8 DER.
    pub fn to_pkcs8_der(&self) -> Result<Vec<u8>, BackendError> {
        self.material.to_pkcs8_der()
    }

    /// The public key as DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Result<Vec<u8>, BackendError> {
        self.material.spki_der()
    }

    /// The key type.
    pub fn key_type(&self) -> KeyType {
        self.material.key_type()
    }

    /// True for RSA keys.
    pub fn is_rsa(&self) -> bool {
        matches!(self.material, KeyMaterial::Rsa(..))
    }

    /// Signs `digest` (never hashed again) with `scheme`: the aws-lc-rs fast path when it
    /// covers the scheme, RustCrypto otherwise.
    pub fn sign(
        &self,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<BackendSignature, BackendError> {
        if let Some(signature) = self.fast.sign(digest.as_bytes(), scheme) {
            return Ok(if self.is_rsa() {
                BackendSignature::Rsa(signature)
            } else {
                BackendSignature::EcdsaDer(signature)
            });
        }
        self.material.sign(digest, scheme)
    }
}

impl KeyMaterial {
    fn generate(key_type: KeyType) -> Result<Self, BackendError> {
        Ok(match key_type {
            KeyType::EcP256 => Self::P256(Arc::new(p256::ecdsa::SigningKey::generate())),
            KeyType::EcP384 => Self::P384(Arc::new(p384::ecdsa::SigningKey::generate())),
            KeyType::Rsa2048 | KeyType::Rsa4096 => {
                let bits = key_type.rsa_bits().unwrap_or(2048);
                let key = rsa::PrivateKey::new(&mut getrandom::SysRng, bits)
                    .map_err(|e| internal(format!("RSA-{bits} key generation failed: {e}")))?;
                Self::Rsa(Arc::new(key), key_type)
            }
        })
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<Self, String> {
        if let Ok(key) = p256::ecdsa::SigningKey::from_pkcs8_der(der) {
            return Ok(Self::P256(Arc::new(key)));
        }
        if let Ok(key) = p384::ecdsa::SigningKey::from_pkcs8_der(der) {
            return Ok(Self::P384(Arc::new(key)));
        }
        match rsa::PrivateKey::from_pkcs8_der(der) {
            Ok(key) => {
                let bits = key.size() * 8;
                let key_type = match bits {
                    2048 => KeyType::Rsa2048,
                    4096 => KeyType::Rsa4096,
                    other => {
                        return Err(format!(
                            "RSA-{other} keys are not supported; use rsa-2048 or rsa-4096"
                        ));
                    }
                };
                Ok(Self::Rsa(Arc::new(key), key_type))
            }
            Err(_) => Err("not a PKCS#8 P-256, P-384 or RSA private key".to_string()),
        }
    }

    fn to_pkcs8_der(&self) -> Result<Vec<u8>, BackendError> {
        let document = match self {
            Self::P256(key) => key.to_pkcs8_der(),
            Self::P384(key) => key.to_pkcs8_der(),
            Self::Rsa(key, _) => key.to_pkcs8_der(),
        }
        .map_err(|e| internal(format!("PKCS#8 encoding failed: {e}")))?;
        Ok(document.as_bytes().to_vec())
    }

    fn spki_der(&self) -> Result<Vec<u8>, BackendError> {
        let document = match self {
            Self::P256(key) => key.verifying_key().to_public_key_der(),
            Self::P384(key) => key.verifying_key().to_public_key_der(),
            Self::Rsa(key, _) => key.to_public_key().to_public_key_der(),
        }
        .map_err(|e| internal(format!("public key encoding failed: {e}")))?;
        Ok(document.as_bytes().to_vec())
    }

    fn key_type(&self) -> KeyType {
        match self {
            Self::P256(_) => KeyType::EcP256,
            Self::P384(_) => KeyType::EcP384,
            Self::Rsa(_, key_type) => *key_type,
        }
    }

    fn sign(
        &self,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<BackendSignature, BackendError> {
        let bytes = digest.as_bytes();
        match (self, scheme) {
            (Self::P256(key), SignatureScheme::Ecdsa(_)) => {
                let signature: p256::ecdsa::DerSignature = key
                    .sign_prehash(bytes)
                    .map_err(|e| internal(format!("ECDSA P-256 signing failed: {e}")))?;
                Ok(BackendSignature::EcdsaDer(signature.as_bytes().to_vec()))
            }
            (Self::P384(key), SignatureScheme::Ecdsa(_)) => {
                let signature: p384::ecdsa::DerSignature = key
                    .sign_prehash(bytes)
                    .map_err(|e| internal(format!("ECDSA P-384 signing failed: {e}")))?;
                Ok(BackendSignature::EcdsaDer(signature.as_bytes().to_vec()))
            }
            (Self::Rsa(key, _), SignatureScheme::RsaPkcs1v15(hash)) => key
                .sign(pkcs1v15_padding(hash), bytes)
                .map(BackendSignature::Rsa)
                .map_err(|e| internal(format!("RSA PKCS#1 v1.5 signing failed: {e}"))),
            (Self::Rsa(key, _), SignatureScheme::RsaPss { hash, salt_len, .. }) => {
                sign_pss(key, hash, salt_len, bytes)
                    .map(BackendSignature::Rsa)
                    .map_err(|e| internal(format!("RSA-PSS signing failed: {e}")))
            }
            (key, scheme) => Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!(
                    "{} cannot be used with {} key",
                    scheme.describe(),
                    key.key_type()
                ),
            )),
        }
    }
}

fn pkcs1v15_padding(hash: HashAlgorithm) -> Pkcs1v15Sign {
    match hash {
        HashAlgorithm::Sha224 => Pkcs1v15Sign::new::<sha2::Sha224>(),
        HashAlgorithm::Sha256 => Pkcs1v15Sign::new::<sha2::Sha256>(),
        HashAlgorithm::Sha384 => Pkcs1v15Sign::new::<sha2::Sha384>(),
        HashAlgorithm::Sha512 => Pkcs1v15Sign::new::<sha2::Sha512>(),
        HashAlgorithm::Sha512_224 => Pkcs1v15Sign::new::<sha2::Sha512_224>(),
        HashAlgorithm::Sha512_256 => Pkcs1v15Sign::new::<sha2::Sha512_256>(),
        HashAlgorithm::Sha3_224 => Pkcs1v15Sign::new::<sha3::Sha3_224>(),
        HashAlgorithm::Sha3_256 => Pkcs1v15Sign::new::<sha3::Sha3_256>(),
        HashAlgorithm::Sha3_384 => Pkcs1v15Sign::new::<sha3::Sha3_384>(),
        HashAlgorithm::Sha3_512 => Pkcs1v15Sign::new::<sha3::Sha3_512>(),
    }
}

fn sign_pss(
    key: &rsa::PrivateKey,
    hash: HashAlgorithm,
    salt_len: usize,
    digest: &[u8],
) -> rsa::Result<Vec<u8>> {
    match hash {
        HashAlgorithm::Sha224 => key.sign(Pss::<sha2::Sha224>::new_with_salt(salt_len), digest),
        HashAlgorithm::Sha256 => key.sign(Pss::<sha2::Sha256>::new_with_salt(salt_len), digest),
        HashAlgorithm::Sha384 => key.sign(Pss::<sha2::Sha384>::new_with_salt(salt_len), digest),
        HashAlgorithm::Sha512 => key.sign(Pss::<sha2::Sha512>::new_with_salt(salt_len), digest),
        HashAlgorithm::Sha512_224 => {
            key.sign(Pss::<sha2::Sha512_224>::new_with_salt(salt_len), digest)
        }
        HashAlgorithm::Sha512_256 => {
            key.sign(Pss::<sha2::Sha512_256>::new_with_salt(salt_len), digest)
        }
        HashAlgorithm::Sha3_224 => key.sign(Pss::<sha3::Sha3_224>::new_with_salt(salt_len), digest),
        HashAlgorithm::Sha3_256 => key.sign(Pss::<sha3::Sha3_256>::new_with_salt(salt_len), digest),
        HashAlgorithm::Sha3_384 => key.sign(Pss::<sha3::Sha3_384>::new_with_salt(salt_len), digest),
        HashAlgorithm::Sha3_512 => key.sign(Pss::<sha3::Sha3_512>::new_with_salt(salt_len), digest),
    }
}

fn internal(message: String) -> BackendError {
    BackendError::new(BackendErrorKind::Internal, message)
}
