//! Writes the generated part of the seed corpus (`fuzz/corpus/{names,request,ecdsa_der}`):
//! real SPIRE requests, names and stamps in each target's input format. Run once by hand:
//! `cargo test -p keymanager-fuzz --test seeds -- --ignored`.

use std::path::Path;

use keymanager_proto::keymanager::sign_data_request::{PssOptions, SignerOpts};
use keymanager_proto::keymanager::{GenerateKeyRequest, GetPublicKeyRequest, SignDataRequest};
use prost::Message;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("the corpus directory can be created");
    std::fs::write(dir.join(name), bytes).expect("a seed can be written");
}

fn with_selector(selector: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![selector];
    out.extend_from_slice(body);
    out
}

fn fields(selector: u8, fields: &[&str]) -> Vec<u8> {
    with_selector(selector, fields.join("\0").as_bytes())
}

#[test]
#[ignore = "writes the seed corpus"]
fn write_generated_seeds() {
    // request: selector 0 GenerateKey, 1 GetPublicKey, 2 SignData (SPIRE's key ids).
    for (name, id, key_type) in [
        ("generate-x509-ca-a", "x509-CA-A", 1),
        ("generate-jwt-signer-a", "JWT-Signer-A", 2),
        ("generate-acme", "bundle-acme-acme_account+key", 1),
        ("generate-rsa", "x509-CA-B", 3),
        ("generate-no-type", "x509-CA-A", 0),
        ("generate-no-id", "", 1),
    ] {
        let request = GenerateKeyRequest {
            key_id: id.into(),
            key_type,
        };
        write("request", name, &with_selector(0, &request.encode_to_vec()));
    }
    for (name, id) in [
        ("get-ec256", "fuzz-ec256"),
        ("get-unknown", "x509-CA-A"),
        ("get-empty", ""),
    ] {
        let request = GetPublicKeyRequest { key_id: id.into() };
        write("request", name, &with_selector(1, &request.encode_to_vec()));
    }
    let signs = [
        (
            "sign-ec256-sha256",
            "fuzz-ec256",
            32,
            SignerOpts::HashAlgorithm(5),
        ),
        (
            "sign-ec384-sha384",
            "fuzz-ec384",
            48,
            SignerOpts::HashAlgorithm(6),
        ),
        (
            "sign-rsa-pkcs1-sha256",
            "fuzz-rsa2048",
            32,
            SignerOpts::HashAlgorithm(5),
        ),
        (
            "sign-rsa-pss-sha256",
            "fuzz-rsa2048",
            32,
            SignerOpts::PssOptions(PssOptions {
                salt_length: -1,
                hash_algorithm: 5,
            }),
        ),
        ("sign-sha1", "fuzz-ec256", 20, SignerOpts::HashAlgorithm(3)),
        (
            "sign-short-digest",
            "fuzz-ec256",
            31,
            SignerOpts::HashAlgorithm(5),
        ),
        (
            "sign-unknown-key",
            "x509-CA-A",
            32,
            SignerOpts::HashAlgorithm(5),
        ),
    ];
    for (name, id, len, opts) in signs {
        let request = SignDataRequest {
            key_id: id.into(),
            data: (0..len).map(|i| i as u8).collect(),
            signer_opts: Some(opts),
        };
        write("request", name, &with_selector(2, &request.encode_to_vec()));
    }
    let no_opts = SignDataRequest {
        key_id: "fuzz-ec256".into(),
        data: vec![7; 32],
        signer_opts: None,
    };
    write(
        "request",
        "sign-no-opts",
        &with_selector(2, &no_opts.encode_to_vec()),
    );

    // names: selector, then NUL-separated fields (see keymanager_fuzz::names).
    let td_hash = "5d0c3e7e1bfb7e30d0e5a4f9ea5c3a7f2f1f2d52";
    let uuid = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let seeds: &[(&str, u8, &[&str])] = &[
        ("stamp", 0, &["1795450839"]),
        ("stamp-max", 0, &["253402300799"]),
        ("stamp-u64-max", 0, &["18446744073709551615"]),
        (
            "aws-alias",
            1,
            &[
                "alias/SPIRE_SERVER/example_org/srv-a/x509-CA-A",
                "example.org",
                "srv-a",
            ],
        ),
        (
            "aws-alias-acme",
            1,
            &[
                "alias/SPIRE_SERVER/example_org/srv-a/bundle-acme-acme_account_2bkey_2eorg",
                "example.org",
                "srv-a",
            ],
        ),
        (
            "gcp-ids",
            2,
            &["srv-a", "x509-CA-A", "spire-key-srv-a-x509-CA-A"],
        ),
        (
            "gcp-resource",
            2,
            &[
                "srv_1",
                "JWT-Signer-A",
                "projects/p/locations/global/keyRings/r/cryptoKeys/spire-key-srv_1-JWT-Signer-A",
            ],
        ),
        (
            "gcp-template",
            3,
            &[
                "spire-key-{{ .TrustDomain }}-{{ .KeyID }}",
                "JWT-Signer-A",
                "^spire-key-[^-]+-(.+)$",
            ],
        ),
        ("gcp-template-bad", 3, &["{{ .Foo }}", "x", "("]),
        (
            "azure-name",
            4,
            &["x509-CA-A", &format!("spire-key-{uuid}-x509-CA-A")],
        ),
        (
            "vault-name",
            5,
            &[
                &format!("srv-a-{uuid}-JWT-Signer-A"),
                "srv-a",
                "srv",
                "srv-a-b",
            ],
        ),
        (
            "pkcs11-label",
            6,
            &[
                "spire",
                "spire:live:example.org:srv-a:x509-CA-A:1764581234567",
            ],
        ),
        (
            "pkcs11-label-retired",
            6,
            &["spire", "spire:retired:example.org:srv-a:JWT-Signer-B:0"],
        ),
        ("uuid-name", 7, &[&format!("srv-{uuid}-x509-CA-A"), "srv"]),
        (
            "pem-public-key",
            8,
            &[
                "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n",
            ],
        ),
        (
            "endpoint",
            9,
            &["https://kms.us-east-1.amazonaws.com/", "30S"],
        ),
        ("endpoint-ipv6", 9, &["http://[::1]:4566", "29999m"]),
        ("gcp-hash", 2, &["srv-a", "JWT-Signer-A", td_hash]),
    ];
    for (name, selector, parts) in seeds {
        write("names", name, &fields(*selector, parts));
    }

    // ecdsa_der: selector 0 fixed → DER, 1/4/7 DER → fixed (32/48/66), 2 EC point (P-256),
    // 130 EC point (P-384).
    let mut fixed = vec![0u8; 64];
    fixed[0] = 0x80;
    fixed[31] = 1;
    fixed[34] = 0x7f;
    write("ecdsa_der", "fixed-p256", &with_selector(0, &fixed));
    let fixed384: Vec<u8> = (0u8..96).map(|i| i.wrapping_mul(37) | 0x80).collect();
    write("ecdsa_der", "fixed-p384", &with_selector(0, &fixed384));
    let der = keymanager_engine::ecdsa_fixed_to_der(&fixed).expect("a fixed signature encodes");
    write("ecdsa_der", "der-p256", &with_selector(1, &der));
    let der384 =
        keymanager_engine::ecdsa_fixed_to_der(&fixed384).expect("a fixed signature encodes");
    write("ecdsa_der", "der-p384", &with_selector(4, &der384));
    write(
        "ecdsa_der",
        "der-negative",
        &with_selector(1, &[0x30, 0x06, 0x02, 0x01, 0x81, 0x02, 0x01, 0x01]),
    );
    let point = {
        use p256::elliptic_curve::sec1::ToSec1Point;
        let key = p256::SecretKey::from_slice(&[0x11; 32]).expect("a scalar in range");
        key.public_key().to_sec1_point(false).as_bytes().to_vec()
    };
    write("ecdsa_der", "ec-point-raw", &with_selector(2, &point));
    let mut wrapped = vec![0x04, 65];
    wrapped.extend_from_slice(&point);
    write("ecdsa_der", "ec-point-wrapped", &with_selector(2, &wrapped));
}
