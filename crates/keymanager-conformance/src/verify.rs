//! Signature checks with libraries independent of the code under test: `ring` wherever it
//! has the combination (it verifies the message itself), RustCrypto's verifiers for the
//! rest (SHA-224 and SHA-3 digests, PSS salts other than the hash length). The KMS backends
//! sign inside their peers (Python `cryptography`), so every check here is independent of
//! them; the `disk` backend signs the production schemes with aws-lc-rs (checked by ring)
//! and the rest with RustCrypto (checked by RustCrypto's verifiers here and by Go's crypto in
//! the SPIRE tests).

use keymanager_engine::{HashAlgorithm, KeyId, KeyService, KeyType, SignatureScheme, SignerOpts};
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};

/// The digest of `message` under `hash`.
pub fn digest(hash: HashAlgorithm, message: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    match hash {
        HashAlgorithm::Sha224 => sha2::Sha224::digest(message).to_vec(),
        HashAlgorithm::Sha256 => sha2::Sha256::digest(message).to_vec(),
        HashAlgorithm::Sha384 => sha2::Sha384::digest(message).to_vec(),
        HashAlgorithm::Sha512 => sha2::Sha512::digest(message).to_vec(),
        HashAlgorithm::Sha512_224 => sha2::Sha512_224::digest(message).to_vec(),
        HashAlgorithm::Sha512_256 => sha2::Sha512_256::digest(message).to_vec(),
        HashAlgorithm::Sha3_224 => sha3::Sha3_224::digest(message).to_vec(),
        HashAlgorithm::Sha3_256 => sha3::Sha3_256::digest(message).to_vec(),
        HashAlgorithm::Sha3_384 => sha3::Sha3_384::digest(message).to_vec(),
        HashAlgorithm::Sha3_512 => sha3::Sha3_512::digest(message).to_vec(),
    }
}

/// Checks `signature` (ECDSA as DER, RSA raw) over `message` against the DER
/// SubjectPublicKeyInfo `spki`; `Err` says which library refused it.
pub fn verify(
    spki: &[u8],
    key_type: KeyType,
    scheme: SignatureScheme,
    message: &[u8],
    signature: &[u8],
) -> Result<&'static str, String> {
    if let Some(algorithm) = ring_algorithm(key_type, scheme) {
        let key =
            subject_public_key(spki).ok_or("the public key is not a DER SubjectPublicKeyInfo")?;
        return UnparsedPublicKey::new(algorithm, key)
            .verify(message, signature)
            .map(|()| "ring")
            .map_err(|_| format!("ring refuses the {} signature", scheme.describe()));
    }
    let hashed = digest(scheme.hash(), message);
    rustcrypto(spki, key_type, scheme, &hashed, signature).map(|()| "RustCrypto")
}

/// Checks `signature` over an already hashed `digest` (what SPIRE's SignData carries),
/// with RustCrypto's verifiers; `Err` says why it was refused.
pub fn verify_digest(
    spki: &[u8],
    key_type: KeyType,
    scheme: SignatureScheme,
    digest: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    rustcrypto(spki, key_type, scheme, digest, signature)
}

fn ring_algorithm(
    key_type: KeyType,
    scheme: SignatureScheme,
) -> Option<&'static dyn VerificationAlgorithm> {
    use HashAlgorithm::{Sha256, Sha384, Sha512};
    use SignatureScheme::{Ecdsa, RsaPkcs1v15, RsaPss};
    Some(match (key_type, scheme) {
        (KeyType::EcP256, Ecdsa(Sha256)) => &signature::ECDSA_P256_SHA256_ASN1,
        (KeyType::EcP256, Ecdsa(Sha384)) => &signature::ECDSA_P256_SHA384_ASN1,
        (KeyType::EcP384, Ecdsa(Sha256)) => &signature::ECDSA_P384_SHA256_ASN1,
        (KeyType::EcP384, Ecdsa(Sha384)) => &signature::ECDSA_P384_SHA384_ASN1,
        (KeyType::Rsa2048 | KeyType::Rsa4096, RsaPkcs1v15(Sha256)) => {
            &signature::RSA_PKCS1_2048_8192_SHA256
        }
        (KeyType::Rsa2048 | KeyType::Rsa4096, RsaPkcs1v15(Sha384)) => {
            &signature::RSA_PKCS1_2048_8192_SHA384
        }
        (KeyType::Rsa2048 | KeyType::Rsa4096, RsaPkcs1v15(Sha512)) => {
            &signature::RSA_PKCS1_2048_8192_SHA512
        }
        // ring verifies PSS with a salt as long as the hash only.
        (KeyType::Rsa2048 | KeyType::Rsa4096, RsaPss { hash, salt_len, .. })
            if salt_len == hash.output_len() =>
        {
            match hash {
                Sha256 => &signature::RSA_PSS_2048_8192_SHA256,
                Sha384 => &signature::RSA_PSS_2048_8192_SHA384,
                Sha512 => &signature::RSA_PSS_2048_8192_SHA512,
                _ => return None,
            }
        }
        _ => return None,
    })
}

fn rustcrypto(
    spki: &[u8],
    key_type: KeyType,
    scheme: SignatureScheme,
    hashed: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    use p256::pkcs8::DecodePublicKey;
    let refused = |e: String| {
        format!(
            "RustCrypto refuses the {} signature: {e}",
            scheme.describe()
        )
    };
    match (key_type, scheme) {
        (KeyType::EcP256, SignatureScheme::Ecdsa(_)) => {
            let key = p256::ecdsa::VerifyingKey::from_public_key_der(spki)
                .map_err(|e| refused(e.to_string()))?;
            let sig =
                p256::ecdsa::Signature::from_der(signature).map_err(|e| refused(e.to_string()))?;
            key.verify_prehash(hashed, &sig)
                .map_err(|e| refused(e.to_string()))
        }
        (KeyType::EcP384, SignatureScheme::Ecdsa(_)) => {
            let key = p384::ecdsa::VerifyingKey::from_public_key_der(spki)
                .map_err(|e| refused(e.to_string()))?;
            let sig =
                p384::ecdsa::Signature::from_der(signature).map_err(|e| refused(e.to_string()))?;
            key.verify_prehash(hashed, &sig)
                .map_err(|e| refused(e.to_string()))
        }
        (_, SignatureScheme::RsaPkcs1v15(hash)) => {
            let key = rsa_key(spki).map_err(refused)?;
            key.verify(pkcs1v15(hash), hashed, signature)
                .map_err(|e| refused(e.to_string()))
        }
        (_, SignatureScheme::RsaPss { hash, salt_len, .. }) => {
            let key = rsa_key(spki).map_err(refused)?;
            verify_pss(&key, hash, salt_len, hashed, signature).map_err(|e| refused(e.to_string()))
        }
        _ => Err(refused(format!("no verifier for a {key_type} key"))),
    }
}

fn rsa_key(spki: &[u8]) -> Result<rsa::PublicKey, String> {
    use rsa::pkcs8::DecodePublicKey;
    rsa::PublicKey::from_public_key_der(spki).map_err(|e| e.to_string())
}

fn pkcs1v15(hash: HashAlgorithm) -> rsa::Pkcs1v15Sign {
    use rsa::Pkcs1v15Sign;
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

fn verify_pss(
    key: &rsa::PublicKey,
    hash: HashAlgorithm,
    salt_len: usize,
    hashed: &[u8],
    signature: &[u8],
) -> rsa::Result<()> {
    use rsa::Pss;
    match hash {
        HashAlgorithm::Sha224 => key.verify(
            Pss::<sha2::Sha224>::new_with_salt(salt_len),
            hashed,
            signature,
        ),
        HashAlgorithm::Sha256 => key.verify(
            Pss::<sha2::Sha256>::new_with_salt(salt_len),
            hashed,
            signature,
        ),
        HashAlgorithm::Sha384 => key.verify(
            Pss::<sha2::Sha384>::new_with_salt(salt_len),
            hashed,
            signature,
        ),
        HashAlgorithm::Sha512 => key.verify(
            Pss::<sha2::Sha512>::new_with_salt(salt_len),
            hashed,
            signature,
        ),
        HashAlgorithm::Sha512_224 => key.verify(
            Pss::<sha2::Sha512_224>::new_with_salt(salt_len),
            hashed,
            signature,
        ),
        HashAlgorithm::Sha512_256 => key.verify(
            Pss::<sha2::Sha512_256>::new_with_salt(salt_len),
            hashed,
            signature,
        ),
        HashAlgorithm::Sha3_224 => key.verify(
            Pss::<sha3::Sha3_224>::new_with_salt(salt_len),
            hashed,
            signature,
        ),
        HashAlgorithm::Sha3_256 => key.verify(
            Pss::<sha3::Sha3_256>::new_with_salt(salt_len),
            hashed,
            signature,
        ),
        HashAlgorithm::Sha3_384 => key.verify(
            Pss::<sha3::Sha3_384>::new_with_salt(salt_len),
            hashed,
            signature,
        ),
        HashAlgorithm::Sha3_512 => key.verify(
            Pss::<sha3::Sha3_512>::new_with_salt(salt_len),
            hashed,
            signature,
        ),
    }
}

/// The BIT STRING of a DER SubjectPublicKeyInfo (what ring takes): the EC point or the
/// PKCS#1 RSAPublicKey.
fn subject_public_key(spki: &[u8]) -> Option<&[u8]> {
    let (tag, body, rest) = tlv(spki)?;
    if tag != 0x30 || !rest.is_empty() {
        return None;
    }
    let (algorithm_tag, _, rest) = tlv(body)?;
    let (bits_tag, bits, rest) = tlv(rest)?;
    if algorithm_tag != 0x30 || bits_tag != 0x03 || !rest.is_empty() {
        return None;
    }
    match bits.split_first() {
        Some((0, key)) => Some(key),
        _ => None,
    }
}

fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[count..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Signs a message under `opts` with the key `key` through the engine (as SPIRE would) and
/// checks the signature independently against the public key the engine serves, and that
/// the key that signed is the one published.
pub async fn sign_and_verify(
    service: &dyn KeyService,
    key: &str,
    key_type: KeyType,
    opts: SignerOpts,
) -> Result<(), String> {
    let id = KeyId::new(key).map_err(|e| e.to_string())?;
    let message = format!("conformance message for {key} with {opts:?}");
    let hashed = digest(opts.hash(), message.as_bytes());
    let signature = service
        .sign(&id, hashed, opts, None)
        .await
        .map_err(|e| format!("{key} {opts:?}: {e}"))?;
    let public = service.public_key(&id).map_err(|e| e.to_string())?;
    if signature.fingerprint != public.fingerprint {
        return Err(format!(
            "{key}: signed by another key than the one published"
        ));
    }
    let scheme = SignatureScheme::resolve(key_type, opts).map_err(|e| e.to_string())?;
    verify(
        &public.spki_der,
        key_type,
        scheme,
        message.as_bytes(),
        &signature.bytes,
    )
    .map(drop)
    .map_err(|e| format!("{key} {opts:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_signature_verifies_and_a_flipped_bit_does_not() {
        use ring::rand::SystemRandom;
        use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        // SPKI for a P-256 point: the fixed algorithm prefix and the point.
        let mut spki = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        spki.extend_from_slice(pair.public_key().as_ref());
        let message = b"conformance";
        let signature = pair.sign(&rng, message).unwrap();
        let scheme = SignatureScheme::Ecdsa(HashAlgorithm::Sha256);
        assert_eq!(
            verify(&spki, KeyType::EcP256, scheme, message, signature.as_ref()),
            Ok("ring")
        );
        let mut bad = signature.as_ref().to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(verify(&spki, KeyType::EcP256, scheme, message, &bad).is_err());
        // The same signature checked by RustCrypto's prehash verifier (SHA-224 has no ring
        // algorithm, so force the fallback with the SHA-256 digest).
        let hashed = digest(HashAlgorithm::Sha256, message);
        assert!(rustcrypto(&spki, KeyType::EcP256, scheme, &hashed, signature.as_ref()).is_ok());
    }
}
