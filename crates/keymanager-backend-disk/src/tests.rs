use std::os::unix::fs::PermissionsExt;

use keymanager_engine::{Engine, EngineOptions, HashAlgorithm, PssSaltLength, SignerOpts};
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use sha2::Digest as _;

use super::*;

fn id(s: &str) -> KeyId {
    KeyId::new(s).unwrap()
}

fn digest_of(hash: HashAlgorithm, message: &[u8]) -> Vec<u8> {
    match hash {
        HashAlgorithm::Sha256 => sha2::Sha256::digest(message).to_vec(),
        HashAlgorithm::Sha384 => sha2::Sha384::digest(message).to_vec(),
        HashAlgorithm::Sha512 => sha2::Sha512::digest(message).to_vec(),
        other => panic!("no digest helper for {other}"),
    }
}

/// Signs through the engine and verifies with ring, an independent implementation.
async fn assert_verifies(
    engine: &Engine<DiskBackend>,
    key: &str,
    opts: SignerOpts,
    algorithm: &'static dyn VerificationAlgorithm,
) {
    let message = format!("message for {key} with {opts:?}");
    let digest = digest_of(opts.hash(), message.as_bytes());
    let signature = engine.sign(&id(key), digest, opts, None).await.unwrap();
    let public = engine.public_key(&id(key)).unwrap();
    assert_eq!(signature.fingerprint, public.fingerprint);
    let spki = x509_parser::prelude::FromDer::from_der(&public.spki_der);
    let (_, spki): (_, x509_parser::x509::SubjectPublicKeyInfo<'_>) = spki.unwrap();
    UnparsedPublicKey::new(algorithm, spki.subject_public_key.data.as_ref())
        .verify(message.as_bytes(), &signature.bytes)
        .unwrap_or_else(|_| panic!("{key} {opts:?}: signature does not verify"));
}

#[tokio::test]
async fn every_key_type_signs_verifiably_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let engine = Engine::start(
        Arc::new(DiskBackend::new(path.clone())),
        None,
        EngineOptions::default(),
    )
    .await
    .unwrap();
    for key_type in KeyType::ALL {
        engine
            .generate_key(id(key_type.as_str()), key_type)
            .await
            .unwrap();
    }
    let sha = SignerOpts::Hash;
    let pss = |hash| SignerOpts::Pss {
        hash,
        salt: PssSaltLength::EqualsHash,
    };
    use HashAlgorithm::*;
    assert_verifies(
        &engine,
        "ec-p256",
        sha(Sha256),
        &signature::ECDSA_P256_SHA256_ASN1,
    )
    .await;
    assert_verifies(
        &engine,
        "ec-p256",
        sha(Sha384),
        &signature::ECDSA_P256_SHA384_ASN1,
    )
    .await;
    assert_verifies(
        &engine,
        "ec-p384",
        sha(Sha384),
        &signature::ECDSA_P384_SHA384_ASN1,
    )
    .await;
    assert_verifies(
        &engine,
        "ec-p384",
        sha(Sha256),
        &signature::ECDSA_P384_SHA256_ASN1,
    )
    .await;
    for rsa in ["rsa-2048", "rsa-4096"] {
        assert_verifies(
            &engine,
            rsa,
            sha(Sha256),
            &signature::RSA_PKCS1_2048_8192_SHA256,
        )
        .await;
        assert_verifies(
            &engine,
            rsa,
            sha(Sha384),
            &signature::RSA_PKCS1_2048_8192_SHA384,
        )
        .await;
        assert_verifies(
            &engine,
            rsa,
            sha(Sha512),
            &signature::RSA_PKCS1_2048_8192_SHA512,
        )
        .await;
        assert_verifies(
            &engine,
            rsa,
            pss(Sha256),
            &signature::RSA_PSS_2048_8192_SHA256,
        )
        .await;
        assert_verifies(
            &engine,
            rsa,
            pss(Sha384),
            &signature::RSA_PSS_2048_8192_SHA384,
        )
        .await;
        assert_verifies(
            &engine,
            rsa,
            pss(Sha512),
            &signature::RSA_PSS_2048_8192_SHA512,
        )
        .await;
    }

    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "keys file must be private");

    let before = engine.public_keys();
    drop(engine);
    let reopened = Engine::start(
        Arc::new(DiskBackend::new(path)),
        None,
        EngineOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        reopened.public_keys(),
        before,
        "keys must survive a restart"
    );
    assert_verifies(
        &reopened,
        "ec-p256",
        sha(Sha256),
        &signature::ECDSA_P256_SHA256_ASN1,
    )
    .await;
}

#[tokio::test]
async fn file_uses_spires_disk_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let engine = Engine::start(
        Arc::new(DiskBackend::new(path.clone())),
        None,
        EngineOptions::default(),
    )
    .await
    .unwrap();
    engine
        .generate_key(id("x509-CA-A"), KeyType::EcP256)
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let encoded = json["keys"]["x509-CA-A"]
        .as_str()
        .expect("keys.<id> is a base64 string");
    let der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded).unwrap();
    // PKCS#8 PrivateKeyInfo starts with a SEQUENCE and carries the id-ecPublicKey OID.
    assert_eq!(der[0], 0x30);
    let ec_oid = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    assert!(der.windows(ec_oid.len()).any(|w| w == ec_oid));
}

#[tokio::test]
async fn corrupt_or_unreadable_files_are_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    std::fs::write(&path, b"{\"keys\": {\"a\": \"not base64!\"}}").unwrap();
    let err = DiskBackend::new(path.clone()).discover().await.unwrap_err();
    assert!(
        err.message.contains(&path.display().to_string()),
        "{}",
        err.message
    );

    std::fs::write(&path, b"garbage").unwrap();
    let err = DiskBackend::new(path.clone()).discover().await.unwrap_err();
    assert!(err.message.contains("is corrupt"), "{}", err.message);
    assert!(err.message.contains(&path.display().to_string()));

    std::fs::write(&path, b"{\"keys\": {\"a\": \"AAAA\"}}").unwrap();
    let err = DiskBackend::new(path.clone()).discover().await.unwrap_err();
    assert!(err.message.contains("key \"a\""), "{}", err.message);

    // A directory where the file should be cannot be read.
    let err = DiskBackend::new(dir.path().to_path_buf())
        .discover()
        .await
        .unwrap_err();
    assert!(
        err.message.contains("cannot read keys file"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn failed_write_keeps_the_previous_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys_dir = dir.path().join("keys");
    std::fs::create_dir(&keys_dir).unwrap();
    let path = keys_dir.join("keys.json");
    let engine = Engine::start(
        Arc::new(DiskBackend::new(path.clone())),
        None,
        EngineOptions::default(),
    )
    .await
    .unwrap();
    let original = engine
        .generate_key(id("JWT-Signer-A"), KeyType::EcP256)
        .await
        .unwrap();

    // A directory in which nobody, root included, can create a file: root ignores directory
    // modes, so a mode-0500 directory would not stop it, but sysfs refuses new files to
    // everyone (EACCES; EROFS where it is mounted read-only). The keys directory is moved
    // aside and replaced by a symlink to /sys: the write fails creating its file there.
    let aside = dir.path().join("keys-aside");
    std::fs::rename(&keys_dir, &aside).unwrap();
    std::os::unix::fs::symlink("/sys", &keys_dir).unwrap();
    let err = engine
        .generate_key(id("JWT-Signer-A"), KeyType::EcP256)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("unable to write keys file"),
        "{err}"
    );
    assert_eq!(engine.public_key(&id("JWT-Signer-A")).unwrap(), original);
    std::fs::remove_file(&keys_dir).unwrap();
    std::fs::rename(&aside, &keys_dir).unwrap();
    // ... and the file still holds the previous key.
    let reopened = Engine::start(
        Arc::new(DiskBackend::new(path.clone())),
        None,
        EngineOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(reopened.public_key(&id("JWT-Signer-A")).unwrap(), original);
    drop(reopened);

    // Root ignores directory modes, so also break the write by replacing the directory.
    std::fs::remove_dir_all(&keys_dir).unwrap();
    let err = engine
        .generate_key(id("JWT-Signer-A"), KeyType::EcP256)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("unable to write keys file"),
        "{err}"
    );
    assert_eq!(engine.public_key(&id("JWT-Signer-A")).unwrap(), original);
}

#[test]
fn production_schemes_take_the_aws_lc_fast_path_and_the_rest_fall_back() {
    use crate::fast_signer::FastSigner;
    use keymanager_engine::{PssSaltLength, SignatureScheme};
    let ec = SoftwareKey::generate(KeyType::EcP256).unwrap();
    let fast = FastSigner::p256(&ec.to_pkcs8_der().unwrap());
    assert!(
        fast.sign(&[1; 32], SignatureScheme::Ecdsa(HashAlgorithm::Sha256))
            .is_some()
    );
    assert!(
        fast.sign(&[1; 48], SignatureScheme::Ecdsa(HashAlgorithm::Sha384))
            .is_none()
    );

    let rsa = SoftwareKey::generate(KeyType::Rsa2048).unwrap();
    let fast = FastSigner::rsa(&rsa.to_pkcs8_der().unwrap());
    let pss = |salt, salt_len| SignatureScheme::RsaPss {
        hash: HashAlgorithm::Sha256,
        salt,
        salt_len,
    };
    assert!(
        fast.sign(
            &[1; 32],
            SignatureScheme::RsaPkcs1v15(HashAlgorithm::Sha256)
        )
        .is_some()
    );
    assert!(
        fast.sign(&[1; 32], pss(PssSaltLength::EqualsHash, 32))
            .is_some()
    );
    assert!(
        fast.sign(&[1; 32], pss(PssSaltLength::exact(20).unwrap(), 20))
            .is_none()
    );
    assert!(
        fast.sign(
            &[1; 28],
            SignatureScheme::RsaPkcs1v15(HashAlgorithm::Sha224)
        )
        .is_none()
    );
    // A key aws-lc-rs cannot load still signs through the fallback.
    assert!(matches!(
        FastSigner::rsa(b"not a key"),
        FastSigner::Unavailable
    ));
}
