//! Fixtures were made with OpenSSL (`genpkey`, then `ec`/`rsa -traditional`/`pkcs8 -topk8`
//! for the other encodings, `pkey -pubout` for the expected public keys): an independent
//! encoder, so every accepted form must give exactly OpenSSL's public key.

use super::*;

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!("testdata/", $name)).as_slice()
    };
}

#[test]
fn every_encoding_of_every_spire_key_type_gives_openssls_public_key() {
    let cases: &[(&[u8], KeyType, &[u8])] = &[
        (
            fixture!("p256.pkcs8.pem"),
            KeyType::EcP256,
            fixture!("p256.spki.der"),
        ),
        (
            fixture!("p256.pkcs8.der"),
            KeyType::EcP256,
            fixture!("p256.spki.der"),
        ),
        (
            fixture!("p256.sec1.pem"),
            KeyType::EcP256,
            fixture!("p256.spki.der"),
        ),
        (
            fixture!("p256.sec1.der"),
            KeyType::EcP256,
            fixture!("p256.spki.der"),
        ),
        (
            fixture!("p384.pkcs8.pem"),
            KeyType::EcP384,
            fixture!("p384.spki.der"),
        ),
        (
            fixture!("p384.pkcs8.der"),
            KeyType::EcP384,
            fixture!("p384.spki.der"),
        ),
        (
            fixture!("p384.sec1.pem"),
            KeyType::EcP384,
            fixture!("p384.spki.der"),
        ),
        (
            fixture!("p384.sec1.der"),
            KeyType::EcP384,
            fixture!("p384.spki.der"),
        ),
        (
            fixture!("rsa2048.pkcs8.pem"),
            KeyType::Rsa2048,
            fixture!("rsa2048.spki.der"),
        ),
        (
            fixture!("rsa2048.pkcs8.der"),
            KeyType::Rsa2048,
            fixture!("rsa2048.spki.der"),
        ),
        (
            fixture!("rsa2048.pkcs1.pem"),
            KeyType::Rsa2048,
            fixture!("rsa2048.spki.der"),
        ),
        (
            fixture!("rsa2048.pkcs1.der"),
            KeyType::Rsa2048,
            fixture!("rsa2048.spki.der"),
        ),
        (
            fixture!("rsa4096.pkcs8.der"),
            KeyType::Rsa4096,
            fixture!("rsa4096.spki.der"),
        ),
        (
            fixture!("rsa4096.pkcs1.der"),
            KeyType::Rsa4096,
            fixture!("rsa4096.spki.der"),
        ),
        // `openssl ecparam -genkey` writes an EC PARAMETERS block first.
        (fixture!("p256.ecparam.pem"), KeyType::EcP256, b""),
    ];
    for (i, (bytes, key_type, spki)) in cases.iter().enumerate() {
        let key = PrivateKeyMaterial::parse(bytes).unwrap_or_else(|e| panic!("case {i}: {e}"));
        assert_eq!(key.key_type(), *key_type, "case {i}");
        if !spki.is_empty() {
            assert_eq!(&key.spki_der()[..], *spki, "case {i}");
            assert_eq!(key.fingerprint(), &Fingerprint::of_spki(spki), "case {i}");
        }
        // Whatever came in, the stores get PKCS#8 of the same key.
        let again = PrivateKeyMaterial::from_pkcs8_der(key.pkcs8_der()).unwrap();
        assert_eq!(again.spki_der(), key.spki_der(), "case {i}");
    }
}

#[test]
fn keys_spire_cannot_use_are_refused_by_name() {
    for (bytes, named) in [
        (fixture!("rsa3072.pkcs8.pem"), "RSA-3072"),
        (fixture!("ed25519.pkcs8.pem"), "Ed25519"),
        (fixture!("k256.pkcs8.pem"), "EC keys on this curve"),
    ] {
        let error = PrivateKeyMaterial::parse(bytes).unwrap_err();
        assert_eq!(error, PrivateKeyError::UnsupportedType(named.into()));
        assert!(
            error
                .to_string()
                .contains("ec-p256, ec-p384, rsa-2048, rsa-4096")
        );
    }
}

#[test]
fn encrypted_garbage_and_public_keys_are_refused_clearly() {
    assert_eq!(
        PrivateKeyMaterial::parse(fixture!("p256.encrypted.pem")).unwrap_err(),
        PrivateKeyError::Encrypted
    );
    for bytes in [
        b"not a key".as_slice(),
        b"",
        fixture!("p256.spki.der"),
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        b"-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN PRIVATE KEY-----\nMIIB\n",
    ] {
        let error = PrivateKeyMaterial::parse(bytes).unwrap_err();
        assert!(
            matches!(error, PrivateKeyError::Unreadable(_)),
            "{bytes:?}: {error:?}"
        );
        assert!(error.to_string().contains("PKCS#8"), "{error}");
    }
}

#[test]
fn debug_shows_no_key_material_and_fingerprints_compare_loosely() {
    let key = PrivateKeyMaterial::parse(fixture!("p256.pkcs8.pem")).unwrap();
    let shown = format!("{key:?}");
    assert!(
        shown.contains("ec-p256") || shown.contains("EcP256") || shown.contains("p256"),
        "{shown}"
    );
    assert!(!shown.contains(&hex::encode(&key.pkcs8_der()[..16])));
    let fp = key.fingerprint().as_str().to_string();
    key.check_fingerprint(&fp).unwrap();
    let colons: Vec<String> = fp
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect();
    key.check_fingerprint(&colons.join(":")).unwrap();
    let wrong = key.check_fingerprint(&"0".repeat(64)).unwrap_err();
    assert!(wrong.contains(&fp) && wrong.contains("refusing"), "{wrong}");
}
