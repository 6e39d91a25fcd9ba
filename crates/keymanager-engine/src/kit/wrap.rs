//! Wrapping a private key for a KMS import, done locally (never by shelling out) with
//! aws-lc-rs, which the workspace already builds:
//! - [`rsa_oaep_sha256`]: the key encrypted directly with the store's RSA wrapping key
//!   (RSAES-OAEP, SHA-256 and MGF1-SHA-256, no label): AWS's `RSAES_OAEP_SHA_256`, which
//!   fits an EC PKCS#8 but not an RSA one;
//! - [`rsa_aes_key_wrap_sha256`]: a fresh AES-256 key encrypted that way, followed by the
//!   key wrapped with it by AES key wrap with padding (RFC 5649): AWS's
//!   `RSA_AES_KEY_WRAP_SHA_256` and Cloud KMS's `RSA_OAEP_*_SHA256_AES_256`, for any key.

use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrapPadded};
use aws_lc_rs::rsa::{OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey};
use zeroize::Zeroizing;

use crate::backend::{BackendError, BackendErrorKind};

fn wrapping_key(spki_der: &[u8]) -> Result<OaepPublicEncryptingKey, BackendError> {
    PublicEncryptingKey::from_der(spki_der)
        .ok()
        .and_then(|key| OaepPublicEncryptingKey::new(key).ok())
        .ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Internal,
                "the store's wrapping public key is not a usable RSA SubjectPublicKeyInfo",
            )
        })
}

/// RSAES-OAEP with SHA-256 (and MGF1-SHA-256) under the store's wrapping key.
pub fn rsa_oaep_sha256(
    wrapping_spki_der: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, BackendError> {
    let key = wrapping_key(wrapping_spki_der)?;
    let limit = key.max_plaintext_size(&OAEP_SHA256_MGF1SHA256);
    if plaintext.len() > limit {
        return Err(BackendError::new(
            BackendErrorKind::InvalidArgument,
            format!(
                "{} bytes do not fit RSA-OAEP under a {}-bit wrapping key (at most {limit}); an RSA private key needs the RSA + AES key wrap algorithm",
                plaintext.len(),
                key.key_size_bits()
            ),
        ));
    }
    let mut out = vec![0u8; key.ciphertext_size()];
    let written = key
        .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, None)
        .map_err(|_| BackendError::new(BackendErrorKind::Internal, "RSA-OAEP encryption failed"))?
        .len();
    out.truncate(written);
    Ok(out)
}

/// A fresh AES-256 key under RSA-OAEP-SHA-256, then `plaintext` under that key by AES key
/// wrap with padding (RFC 5649), concatenated in that order.
pub fn rsa_aes_key_wrap_sha256(
    wrapping_spki_der: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, BackendError> {
    let mut aes_key = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(aes_key.as_mut_slice()).map_err(|_| {
        BackendError::new(BackendErrorKind::Internal, "no randomness for the AES key")
    })?;
    let mut out = rsa_oaep_sha256(wrapping_spki_der, aes_key.as_slice())?;
    let kek = AesKek::new(&AES_256, aes_key.as_slice())
        .map_err(|_| BackendError::new(BackendErrorKind::Internal, "AES-256 key setup failed"))?;
    // RFC 5649: the padded plaintext plus one 8-byte block.
    let mut wrapped = vec![0u8; plaintext.len().div_ceil(8) * 8 + 8];
    let written = kek
        .wrap_with_padding(plaintext, &mut wrapped)
        .map_err(|_| BackendError::new(BackendErrorKind::Internal, "AES key wrap failed"))?
        .len();
    out.extend_from_slice(&wrapped[..written]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::{KeySize, OaepPrivateDecryptingKey, PrivateDecryptingKey};

    #[test]
    fn wrapped_lengths_follow_rfc5649() {
        // RFC 5649: the plaintext padded to 8 bytes plus one 8-byte block (a plaintext of
        // at most 8 bytes becomes exactly 16). Its published vectors use a 192-bit KEK,
        // which aws-lc-rs does not offer; the round trip below and LocalStack's own unwrap
        // (crates/kms-keymanager/tests) check the contents.
        for (len, wrapped_len) in [(20usize, 32usize), (7, 16), (138, 152), (1216, 1224)] {
            let kek = AesKek::new(&AES_256, &[7u8; 32]).unwrap();
            let mut out = vec![0u8; len.div_ceil(8) * 8 + 8];
            let got = kek
                .wrap_with_padding(&vec![1u8; len], &mut out)
                .unwrap()
                .len();
            assert_eq!(got, wrapped_len, "{len}");
        }
    }

    fn unwrap_with(private: &PrivateDecryptingKey, wrapped: &[u8]) -> Vec<u8> {
        let rsa_len = private.key_size_bytes();
        let oaep = OaepPrivateDecryptingKey::new(private.clone()).unwrap();
        let mut aes_key = vec![0u8; rsa_len];
        let aes_key = oaep
            .decrypt(
                &OAEP_SHA256_MGF1SHA256,
                &wrapped[..rsa_len],
                &mut aes_key,
                None,
            )
            .unwrap()
            .to_vec();
        assert_eq!(aes_key.len(), 32);
        let kek = AesKek::new(&AES_256, &aes_key).unwrap();
        let mut out = vec![0u8; wrapped.len()];
        kek.unwrap_with_padding(&wrapped[rsa_len..], &mut out)
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_wrapped_key_unwraps_with_the_private_wrapping_key() {
        let private = PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap();
        let spki = private.public_key().as_der().unwrap();
        let secret: Vec<u8> = (0..1216u32).map(|i| (i * 7) as u8).collect();
        let wrapped = rsa_aes_key_wrap_sha256(spki.as_ref(), &secret).unwrap();
        assert_eq!(unwrap_with(&private, &wrapped), secret);
        // A fresh AES key every time.
        let again = rsa_aes_key_wrap_sha256(spki.as_ref(), &secret).unwrap();
        assert_ne!(wrapped, again);

        let small = b"an EC PKCS#8 is about this long, well under 190 bytes";
        let direct = rsa_oaep_sha256(spki.as_ref(), small).unwrap();
        let oaep = OaepPrivateDecryptingKey::new(private.clone()).unwrap();
        let mut out = vec![0u8; 256];
        assert_eq!(
            oaep.decrypt(&OAEP_SHA256_MGF1SHA256, &direct, &mut out, None)
                .unwrap(),
            small
        );
        let too_big = rsa_oaep_sha256(spki.as_ref(), &secret).unwrap_err();
        assert_eq!(too_big.kind, BackendErrorKind::InvalidArgument);
        assert!(rsa_oaep_sha256(b"junk", small).is_err());
    }
}
