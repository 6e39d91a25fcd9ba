//! `k8s_auth` re-reads its token file at every login, as Kubernetes projected tokens rotate:
//! against a real OpenBao whose JWT auth mount accepts SPIRE's `{role, jwt}` login body.
//! The first token expires; the plugin's Vault token is revoked; the next signature must
//! log in again with the rotated file, or fail.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use keymanager_backend_vault::VaultFactory;
use keymanager_conformance::peers::{self, OPENBAO_ROOT_TOKEN};
use keymanager_conformance::verify;
use keymanager_engine::settings::{SettingValue, Settings};
use keymanager_engine::{
    BackendConfig, CoreConfig, EngineOptions, HashAlgorithm, KeyId, KeyType, SignatureScheme,
    SignerOpts,
};
use p256::ecdsa::signature::Signer as _;
use p256::elliptic_curve::Generate as _;
use p256::pkcs8::EncodePublicKey as _;
use serde_json::{Value, json};

async fn root(url: &str, path: &str, body: Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/{path}"))
        .header("X-Vault-Token", OPENBAO_ROOT_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("OpenBao answers");
    let status = response.status();
    assert!(
        status.is_success(),
        "{path}: {status} {:?}",
        response.text().await
    );
}

/// How many live tokens the JWT mount issued (logins by the plugin).
async fn mount_tokens(url: &str) -> usize {
    let client = reqwest::Client::new();
    let list: Value = client
        .get(format!("{url}/v1/auth/token/accessors?list=true"))
        .header("X-Vault-Token", OPENBAO_ROOT_TOKEN)
        .send()
        .await
        .expect("accessors")
        .json()
        .await
        .expect("JSON");
    let mut count = 0;
    for accessor in list["data"]["keys"].as_array().into_iter().flatten() {
        let lookup: Value = client
            .post(format!("{url}/v1/auth/token/lookup-accessor"))
            .header("X-Vault-Token", OPENBAO_ROOT_TOKEN)
            .json(&json!({"accessor": accessor}))
            .send()
            .await
            .expect("lookup")
            .json()
            .await
            .unwrap_or(Value::Null);
        if lookup["data"]["path"].as_str() == Some("auth/k8sjwt/login") {
            count += 1;
        }
    }
    count
}

/// An ES256 JWT for `sub`, valid for `lifetime`.
fn jwt(key: &p256::ecdsa::SigningKey, sub: &str, lifetime: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(
        json!({"sub": sub, "aud": "vault", "iat": now, "nbf": now - 1, "exp": now + lifetime.as_secs()})
            .to_string(),
    );
    let signed = format!("{header}.{claims}");
    let signature: p256::ecdsa::Signature = key.sign(signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_auth_reads_the_rotated_token_file_at_the_next_login() {
    let bao = peers::openbao();
    let issuer = p256::ecdsa::SigningKey::generate();
    let der = issuer
        .verifying_key()
        .to_public_key_der()
        .expect("public key DER");
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        STANDARD.encode(der.as_bytes())
    );
    root(&bao.url, "sys/auth/k8sjwt", json!({"type": "jwt"})).await;
    root(
        &bao.url,
        "auth/k8sjwt/config",
        json!({"jwt_validation_pubkeys": [pem]}),
    )
    .await;
    root(
        &bao.url,
        "sys/policies/acl/spire",
        json!({"policy": "path \"transit/*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\"] }"}),
    )
    .await;
    root(
        &bao.url,
        "auth/k8sjwt/role/spire",
        json!({"role_type": "jwt", "bound_audiences": ["vault"], "user_claim": "sub", "token_policies": ["spire"], "token_ttl": "1h"}),
    )
    .await;

    let dir = tempfile::tempdir().expect("dir");
    let token_path = dir.path().join("token");
    std::fs::write(
        &token_path,
        jwt(&issuer, "spire-server", Duration::from_secs(3)),
    )
    .expect("token file");
    let block: BTreeMap<String, SettingValue> = [
        ("k8s_auth_mount_point", "k8sjwt".to_string()),
        ("k8s_auth_role_name", "spire".to_string()),
        ("token_path", token_path.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), SettingValue::String(v)))
    .collect();
    let values: BTreeMap<String, SettingValue> = [
        ("vault_addr", SettingValue::String(bao.url.clone())),
        ("key_identifier_value", SettingValue::String("k8s".into())),
        ("k8s_auth", SettingValue::Map(block)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let core = CoreConfig {
        trust_domain: "example.org".into(),
    };
    let service = VaultFactory::new()
        .parse_all(Settings::new(values), &core)
        .expect("valid")
        .open()
        .await
        .expect("the first login, with the first token")
        .start(EngineOptions::default())
        .await
        .expect("start");
    let id = KeyId::new("x509-CA-A").expect("id");
    service
        .generate_key(id.clone(), KeyType::EcP256)
        .await
        .expect("generate");

    // The kubelet rotates the projected token; the first one expires.
    std::fs::write(
        &token_path,
        jwt(&issuer, "spire-server", Duration::from_secs(3600)),
    )
    .expect("rotated token file");
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Every token this mount issued is revoked: the plugin must log in again.
    assert_eq!(mount_tokens(&bao.url).await, 1, "the plugin logged in once");
    root(&bao.url, "sys/leases/revoke-prefix/auth/k8sjwt", json!({})).await;
    assert_eq!(
        mount_tokens(&bao.url).await,
        0,
        "the plugin's token is revoked"
    );

    let message = b"signed after a re-login with the rotated token";
    let opts = SignerOpts::Hash(HashAlgorithm::Sha256);
    let signature = service
        .sign(
            &id,
            verify::digest(HashAlgorithm::Sha256, message),
            opts,
            None,
        )
        .await
        .expect("a fresh login with the rotated token file");
    assert_eq!(
        mount_tokens(&bao.url).await,
        1,
        "the plugin logged in again"
    );
    let public = service.public_key(&id).expect("public key");
    verify::verify(
        &public.spki_der,
        KeyType::EcP256,
        SignatureScheme::resolve(KeyType::EcP256, opts).expect("scheme"),
        message,
        &signature.bytes,
    )
    .expect("verifies");
}
