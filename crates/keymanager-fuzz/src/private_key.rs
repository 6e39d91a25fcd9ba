//! The private-key reader of `keys import` / `keys migrate`: PEM or DER, PKCS#8, SEC1 or
//! PKCS#1. Junk is an error; a key read is one of SPIRE's types and survives a round trip
//! through the PKCS#8 it is stored as, with a public key RustCrypto reads.

use keymanager_engine::{KeyType, PrivateKeyMaterial};
use p256::pkcs8::DecodePublicKey;

/// Runs one input.
pub fn run(data: &[u8]) {
    let key = match PrivateKeyMaterial::parse(data) {
        Ok(key) => key,
        Err(error) => {
            assert!(!error.to_string().is_empty());
            return;
        }
    };
    let again = PrivateKeyMaterial::from_pkcs8_der(key.pkcs8_der())
        .expect("the PKCS#8 a key is stored as reads back");
    assert_eq!(again.key_type(), key.key_type());
    assert_eq!(again.fingerprint(), key.fingerprint());
    assert_eq!(again.spki_der(), key.spki_der());
    key.check_fingerprint(key.fingerprint().as_str())
        .expect("a key matches its own fingerprint");
    let spki = key.spki_der();
    let readable = match key.key_type() {
        KeyType::EcP256 => p256::PublicKey::from_public_key_der(spki).is_ok(),
        KeyType::EcP384 => p384::PublicKey::from_public_key_der(spki).is_ok(),
        KeyType::Rsa2048 | KeyType::Rsa4096 => {
            use rsa::traits::PublicKeyParts;
            let bits = if key.key_type() == KeyType::Rsa2048 {
                2048
            } else {
                4096
            };
            rsa::PublicKey::from_public_key_der(spki).is_ok_and(|k| k.size() * 8 == bits)
        }
    };
    assert!(
        readable,
        "the public key of a {} key is unreadable",
        key.key_type()
    );
}
