//! Spawns the real binary the way SPIRE does (through `keymanager-host`) and drives every
//! RPC, including the error cases, bad HCL, a second Configure and Shutdown.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::path::Path;
use std::time::Duration;

use keymanager_host::PluginProcess;
use keymanager_proto::keymanager::sign_data_request::{PssOptions, SignerOpts};
use keymanager_proto::keymanager::{
    GenerateKeyRequest, GetPublicKeyRequest, GetPublicKeysRequest, HashAlgorithm, KeyType,
    SignDataRequest,
};
use ring::signature::{self, UnparsedPublicKey};
use sha2::Digest as _;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_kms-keymanager");

async fn launch() -> PluginProcess {
    PluginProcess::launch(Path::new(BIN))
        .await
        .expect("plugin launches")
}

fn hcl(keys_path: &Path) -> String {
    format!("keys_path = {:?}\n", keys_path.display().to_string())
}

fn sign_request(key_id: &str, data: Vec<u8>, opts: SignerOpts) -> SignDataRequest {
    SignDataRequest {
        key_id: key_id.into(),
        data,
        signer_opts: Some(opts),
    }
}

fn spki_key_bits(spki: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).unwrap();
    parsed.subject_public_key.data.to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn handshake_is_the_only_stdout_line_and_socket_is_private_and_removed() {
    use std::os::unix::fs::PermissionsExt;
    let plugin = launch().await;
    let socket = plugin.socket_path().to_path_buf();
    let dir = socket.parent().unwrap().to_path_buf();
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // The health service reports `plugin` as SERVING, as go-plugin requires.
    let mut health = tonic_health::pb::health_client::HealthClient::new(plugin.channel());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "plugin".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let stdout_lines = plugin.stdout_after_handshake();
    let stderr = plugin.stderr_lines();
    let exit = plugin.shutdown().await.unwrap();
    assert!(
        exit.graceful,
        "plugin must exit on Shutdown without being killed"
    );
    assert!(exit.status.unwrap().success());
    assert!(
        stdout_lines.is_empty(),
        "nothing may follow the handshake on stdout: {stdout_lines:?}"
    );
    assert!(
        !dir.exists(),
        "socket directory {} must be removed at exit",
        dir.display()
    );
    for line in stderr {
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        for key in ["@level", "@message", "@timestamp"] {
            assert!(value[key].is_string(), "{key} must be a string in {line}");
        }
        let ts = value["@timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-11-23T13:45:06.000042Z".len(), "{ts}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_magic_cookie_it_refuses_plugin_mode() {
    // No subcommand and no cookie: the CLI prints usage to stderr and fails.
    let output = std::process::Command::new(BIN).output().unwrap();
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    // Cookie with a wrong protocol version: a clear error, exit 1, nothing on stdout.
    let output = std::process::Command::new(BIN)
        .env("KeyManager", "KeyManager")
        .env("PLUGIN_PROTOCOL_VERSIONS", "2,3")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    assert!(String::from_utf8_lossy(&output.stderr).contains("speaks version 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let plugin = launch().await;
    let mut km = plugin.key_manager();

    // Before Configure.
    let err = km
        .generate_key(GenerateKeyRequest {
            key_id: "a".into(),
            key_type: KeyType::EcP256 as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), "not configured");

    // Bad configuration: InvalidArgument naming the key; nothing is configured.
    for (text, expect) in [
        ("keys_path = ", "plugin_data is not valid HCL"),
        ("", "\"keys_path\" is required"),
        ("keys_path = \"/x\"\nfoo = 1\n", "unknown key \"foo\""),
        (
            "keys_path = true\n",
            "\"keys_path\" must be a string, got a boolean",
        ),
        (
            "keys_path = \"/x\"\nmax_keys = -3\n",
            "\"max_keys\": must not be negative",
        ),
    ] {
        let err = plugin.configure("example.org", text).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{text}");
        assert!(err.message().contains(expect), "{text}: {}", err.message());
    }
    let err = plugin.configure("", &hcl(&keys)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("trust_domain"));

    // Validate checks without side effects. SPIRE prints every note as a validation error,
    // so a good configuration has none.
    let validated = plugin.validate("example.org", &hcl(&keys)).await.unwrap();
    assert!(validated.valid, "{:?}", validated.notes);
    assert!(validated.notes.is_empty(), "{:?}", validated.notes);
    assert!(!keys.exists(), "Validate must not create anything");
    let missing_dir = dir.path().join("no-such-dir/keys.json");
    let validated = plugin
        .validate("example.org", &hcl(&missing_dir))
        .await
        .unwrap();
    assert!(!validated.valid);
    assert!(
        validated.notes[0].contains("does not exist"),
        "{:?}",
        validated.notes
    );
    let validated = plugin
        .validate("example.org", "keys_pth = \"x\"")
        .await
        .unwrap();
    assert!(!validated.valid);

    plugin.configure("example.org", &hcl(&keys)).await.unwrap();

    // GenerateKey for every type; GetPublicKey(s) agree; fingerprints are SHA-256 of the DER.
    let mut generated = Vec::new();
    for (id, key_type) in [
        ("ec-p256", KeyType::EcP256),
        ("ec-p384", KeyType::EcP384),
        ("rsa-2048", KeyType::Rsa2048),
        ("rsa-4096", KeyType::Rsa4096),
    ] {
        let key = km
            .generate_key(GenerateKeyRequest {
                key_id: id.into(),
                key_type: key_type as i32,
            })
            .await
            .unwrap()
            .into_inner()
            .public_key
            .unwrap();
        assert_eq!(key.id, id);
        assert_eq!(key.r#type, key_type as i32);
        assert_eq!(
            key.fingerprint,
            hex::encode(sha2::Sha256::digest(&key.pkix_data))
        );
        let fetched = km
            .get_public_key(GetPublicKeyRequest { key_id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .public_key
            .unwrap();
        assert_eq!(fetched, key);
        generated.push(key);
    }
    let all = km
        .get_public_keys(GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .public_keys;
    assert_eq!(all.len(), 4);

    // Signatures verify with ring, and carry the fingerprint of the key that signed.
    let message = b"signed through the plugin";
    let sha256 = sha2::Sha256::digest(message).to_vec();
    let sha384 = sha2::Sha384::digest(message).to_vec();
    let cases: [(
        &str,
        Vec<u8>,
        SignerOpts,
        &'static dyn signature::VerificationAlgorithm,
    ); 5] = [
        (
            "ec-p256",
            sha256.clone(),
            SignerOpts::HashAlgorithm(HashAlgorithm::Sha256 as i32),
            &signature::ECDSA_P256_SHA256_ASN1,
        ),
        (
            "ec-p384",
            sha384.clone(),
            SignerOpts::HashAlgorithm(HashAlgorithm::Sha384 as i32),
            &signature::ECDSA_P384_SHA384_ASN1,
        ),
        (
            "rsa-2048",
            sha256.clone(),
            SignerOpts::HashAlgorithm(HashAlgorithm::Sha256 as i32),
            &signature::RSA_PKCS1_2048_8192_SHA256,
        ),
        (
            "rsa-4096",
            sha384.clone(),
            SignerOpts::PssOptions(PssOptions {
                salt_length: -1,
                hash_algorithm: HashAlgorithm::Sha384 as i32,
            }),
            &signature::RSA_PSS_2048_8192_SHA384,
        ),
        (
            "rsa-2048",
            sha256.clone(),
            SignerOpts::PssOptions(PssOptions {
                salt_length: 32,
                hash_algorithm: HashAlgorithm::Sha256 as i32,
            }),
            &signature::RSA_PSS_2048_8192_SHA256,
        ),
    ];
    for (id, digest, opts, algorithm) in cases {
        let response = km
            .sign_data(sign_request(id, digest, opts))
            .await
            .unwrap()
            .into_inner();
        let key = generated.iter().find(|k| k.id == id).unwrap();
        assert_eq!(response.key_fingerprint, key.fingerprint);
        UnparsedPublicKey::new(algorithm, spki_key_bits(&key.pkix_data))
            .verify(message, &response.signature)
            .unwrap_or_else(|_| panic!("{id} {opts:?} does not verify"));
    }

    // Error cases, each with its code and a message that names the problem.
    let sha = |h: HashAlgorithm| SignerOpts::HashAlgorithm(h as i32);
    let failures: Vec<(SignDataRequest, Code, &str)> = vec![
        (
            sign_request("", sha256.clone(), sha(HashAlgorithm::Sha256)),
            Code::InvalidArgument,
            "key id is required",
        ),
        (
            sign_request("nope", sha256.clone(), sha(HashAlgorithm::Sha256)),
            Code::NotFound,
            "key \"nope\" not found",
        ),
        (
            SignDataRequest {
                key_id: "ec-p256".into(),
                data: sha256.clone(),
                signer_opts: None,
            },
            Code::InvalidArgument,
            "signer opts is required",
        ),
        (
            sign_request("ec-p256", sha256.clone(), SignerOpts::HashAlgorithm(0)),
            Code::InvalidArgument,
            "hash algorithm is required",
        ),
        (
            sign_request("ec-p256", vec![0; 20], SignerOpts::HashAlgorithm(3)),
            Code::InvalidArgument,
            "unsupported hash algorithm 3",
        ),
        (
            sign_request("ec-p256", vec![0; 20], SignerOpts::HashAlgorithm(99)),
            Code::InvalidArgument,
            "unsupported hash algorithm 99",
        ),
        (
            sign_request("ec-p256", sha384.clone(), sha(HashAlgorithm::Sha256)),
            Code::InvalidArgument,
            "digest is 48 bytes but SHA-256 digests are 32 bytes",
        ),
        (
            sign_request(
                "ec-p256",
                sha256.clone(),
                SignerOpts::PssOptions(PssOptions {
                    salt_length: -1,
                    hash_algorithm: HashAlgorithm::Sha256 as i32,
                }),
            ),
            Code::InvalidArgument,
            "RSA-PSS options cannot be used with ec-p256 key",
        ),
        (
            sign_request(
                "rsa-2048",
                sha256.clone(),
                SignerOpts::PssOptions(PssOptions {
                    salt_length: -5,
                    hash_algorithm: HashAlgorithm::Sha256 as i32,
                }),
            ),
            Code::InvalidArgument,
            "invalid PSS salt length -5",
        ),
    ];
    for (request, code, message) in failures {
        let err = km.sign_data(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{request:?}: {}", err.message());
        assert!(
            err.message().contains(message),
            "{request:?}: {}",
            err.message()
        );
    }
    let err = km
        .generate_key(GenerateKeyRequest {
            key_id: "".into(),
            key_type: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "key id is required")
    );
    let err = km
        .generate_key(GenerateKeyRequest {
            key_id: "x".into(),
            key_type: 7,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("unknown key type 7"));
    let err = km
        .get_public_key(GetPublicKeyRequest { key_id: "".into() })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "key id is required")
    );
    let err = km
        .get_public_key(GetPublicKeyRequest {
            key_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "key \"nope\" not found")
    );

    // A second Configure keeps every key and serves signatures throughout. A sign rate limit
    // keeps 60 signatures in flight (queued in the plugin, 20 a second) while the second
    // Configure arrives, so the two really overlap.
    plugin
        .configure(
            "example.org",
            &format!("{}max_signs_per_second = 20\n", hcl(&keys)),
        )
        .await
        .unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let signers: Vec<_> = (0..60)
        .map(|_| {
            let mut km = km.clone();
            let digest = sha256.clone();
            let done = done.clone();
            tokio::spawn(async move {
                km.sign_data(sign_request("ec-p256", digest, sha(HashAlgorithm::Sha256)))
                    .await
                    .expect("signing must not fail during a reconfigure");
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        })
        .collect();
    while done.load(std::sync::atomic::Ordering::SeqCst) < 5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    plugin
        .configure(
            "example.org",
            &format!("{}log_level = \"debug\"\n", hcl(&keys)),
        )
        .await
        .unwrap();
    let finished_at_reconfigure = done.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        finished_at_reconfigure < 60,
        "the second Configure must overlap in-flight signatures ({finished_at_reconfigure} of 60 had finished)"
    );
    for signer in signers {
        signer.await.unwrap();
    }
    assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 60);
    assert_eq!(
        km.get_public_keys(GetPublicKeysRequest {})
            .await
            .unwrap()
            .into_inner()
            .public_keys,
        all
    );
    // ... but refuses to switch key stores under SPIRE's feet.
    let err = plugin
        .configure("example.org", &hcl(&dir.path().join("other.json")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("cannot switch the key store at run time")
    );
    assert_eq!(
        km.get_public_keys(GetPublicKeysRequest {})
            .await
            .unwrap()
            .into_inner()
            .public_keys,
        all
    );

    // Overwriting a key id changes the fingerprint; the file holds the new key.
    let replaced = km
        .generate_key(GenerateKeyRequest {
            key_id: "ec-p256".into(),
            key_type: KeyType::Rsa2048 as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .public_key
        .unwrap();
    assert_ne!(replaced.fingerprint, generated[0].fingerprint);

    let exit = plugin.shutdown().await.unwrap();
    assert!(exit.graceful);
    assert!(exit.exit_latency < Duration::from_secs(2));

    // Keys survive a restart of the plugin.
    let plugin = launch().await;
    plugin.configure("example.org", &hcl(&keys)).await.unwrap();
    let after = plugin
        .key_manager()
        .get_public_keys(GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .public_keys;
    assert_eq!(after.len(), 4);
    assert!(after.contains(&replaced));
    assert!(plugin.shutdown().await.unwrap().graceful);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_keys_file_fails_configure_and_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    std::fs::write(&keys, b"{\"keys\": {\"x509-CA-A\": ").unwrap();
    let plugin = launch().await;
    let err = plugin
        .configure("example.org", &hcl(&keys))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(
        err.message().contains(&keys.display().to_string()),
        "{}",
        err.message()
    );
    assert_eq!(
        std::fs::read(&keys).unwrap(),
        b"{\"keys\": {\"x509-CA-A\": "
    );
    assert!(plugin.shutdown().await.unwrap().graceful);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_also_exits_cleanly() {
    let plugin = launch().await;
    let pid = plugin.pid().unwrap();
    let socket_dir = plugin.socket_path().parent().unwrap().to_path_buf();
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    for _ in 0..50 {
        if !socket_dir.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(
        !socket_dir.exists(),
        "SIGTERM must remove the socket directory"
    );
    // SIGINT is ignored (go-plugin semantics): the host shuts the plugin down in order.
    let plugin = launch().await;
    std::process::Command::new("kill")
        .arg("-INT")
        .arg(plugin.pid().unwrap().to_string())
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        plugin.socket_path().exists(),
        "SIGINT must not stop the plugin"
    );
    assert!(plugin.shutdown().await.unwrap().graceful);
}
