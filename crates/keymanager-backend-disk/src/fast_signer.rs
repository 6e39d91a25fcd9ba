//! A fast path for the signature schemes SPIRE uses in production, on aws-lc-rs.
//!
//! aws-lc-rs signs a pre-hashed digest only for the pairs it predefines: ECDSA P-256/SHA-256
//! and P-384/SHA-384, RSA PKCS#1 v1.5 and RSA-PSS (salt = hash length) with SHA-256/384/512.
//! Those cover X.509 CA and SVID signing, JWT/WIT (ES256, ES384, RS256) and TLS PSS. Any
//! other request (another hash, another PSS salt, P-256 with SHA-384 ...) returns `None` and
//! the RustCrypto implementation in `software_key` signs it.

use aws_lc_rs::digest;
use aws_lc_rs::signature::{self, EcdsaKeyPair, RsaKeyPair};
use keymanager_engine::{HashAlgorithm, SignatureScheme};

/// The same private key, loaded into aws-lc-rs.
pub(crate) enum FastSigner {
    /// P-256 with SHA-256.
    P256(EcdsaKeyPair),
    /// P-384 with SHA-384.
    P384(EcdsaKeyPair),
    /// RSA.
    Rsa(RsaKeyPair),
    /// aws-lc-rs rejected the key; every request takes the fallback.
    Unavailable,
}

impl FastSigner {
    pub(crate) fn p256(pkcs8: &[u8]) -> Self {
        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8)
            .map(Self::P256)
            .unwrap_or(Self::Unavailable)
    }

    pub(crate) fn p384(pkcs8: &[u8]) -> Self {
        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, pkcs8)
            .map(Self::P384)
            .unwrap_or(Self::Unavailable)
    }

    pub(crate) fn rsa(pkcs8: &[u8]) -> Self {
        RsaKeyPair::from_pkcs8(pkcs8)
            .map(Self::Rsa)
            .unwrap_or(Self::Unavailable)
    }

    /// Signs when this scheme is on the fast path; `None` means "use the fallback".
    /// ECDSA results are DER; RSA results are the raw signature.
    pub(crate) fn sign(&self, digest_bytes: &[u8], scheme: SignatureScheme) -> Option<Vec<u8>> {
        match (self, scheme) {
            (Self::P256(key), SignatureScheme::Ecdsa(HashAlgorithm::Sha256))
            | (Self::P384(key), SignatureScheme::Ecdsa(HashAlgorithm::Sha384)) => {
                let digest = import(digest_bytes, scheme.hash())?;
                key.sign_digest(&digest).ok().map(|s| s.as_ref().to_vec())
            }
            (Self::Rsa(key), SignatureScheme::RsaPkcs1v15(hash)) => {
                let encoding = match hash {
                    HashAlgorithm::Sha256 => &signature::RSA_PKCS1_SHA256,
                    HashAlgorithm::Sha384 => &signature::RSA_PKCS1_SHA384,
                    HashAlgorithm::Sha512 => &signature::RSA_PKCS1_SHA512,
                    _ => return None,
                };
                sign_rsa(key, encoding, digest_bytes, hash)
            }
            (Self::Rsa(key), SignatureScheme::RsaPss { hash, salt_len, .. })
                if salt_len == hash.output_len() =>
            {
                let encoding = match hash {
                    HashAlgorithm::Sha256 => &signature::RSA_PSS_SHA256,
                    HashAlgorithm::Sha384 => &signature::RSA_PSS_SHA384,
                    HashAlgorithm::Sha512 => &signature::RSA_PSS_SHA512,
                    _ => return None,
                };
                sign_rsa(key, encoding, digest_bytes, hash)
            }
            _ => None,
        }
    }
}

fn import(digest_bytes: &[u8], hash: HashAlgorithm) -> Option<digest::Digest> {
    let algorithm = match hash {
        HashAlgorithm::Sha256 => &digest::SHA256,
        HashAlgorithm::Sha384 => &digest::SHA384,
        HashAlgorithm::Sha512 => &digest::SHA512,
        _ => return None,
    };
    digest::Digest::import_less_safe(digest_bytes, algorithm).ok()
}

fn sign_rsa(
    key: &RsaKeyPair,
    encoding: &'static signature::RsaSignatureEncoding,
    digest_bytes: &[u8],
    hash: HashAlgorithm,
) -> Option<Vec<u8>> {
    let digest = import(digest_bytes, hash)?;
    let mut out = vec![0u8; key.public_modulus_len()];
    key.sign_digest(encoding, &digest, &mut out).ok()?;
    Some(out)
}
