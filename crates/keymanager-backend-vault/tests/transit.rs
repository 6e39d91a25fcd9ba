//! What the `hashicorp_vault` backend does better than SPIRE's built-in, against a real
//! OpenBao: start-up reads only this server's keys, a key rotated inside Vault keeps
//! signing with the version SPIRE knows, and a digest of the wrong length never reaches
//! Vault (OpenBao would sign it).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use keymanager_backend_vault::VaultFactory;
use keymanager_conformance::peers::{self, OPENBAO_ROOT_TOKEN, Peer};
use keymanager_conformance::proxy::FaultProxy;
use keymanager_conformance::verify;
use keymanager_engine::settings::{SettingValue, Settings};
use keymanager_engine::{
    BackendConfig, CoreConfig, EngineOptions, HashAlgorithm, KeyId, KeyService, KeyType, SignerOpts,
};
use serde_json::{Value, json};

static BAO: OnceLock<Peer> = OnceLock::new();

fn bao() -> &'static Peer {
    BAO.get_or_init(peers::openbao)
}

async fn root(method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}/v1/{path}", bao().url))
        .header("X-Vault-Token", OPENBAO_ROOT_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("OpenBao answers");
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.json().await.unwrap_or(Value::Null)
}

async fn start(address: &str, server_id: &str) -> Arc<dyn KeyService> {
    let values: BTreeMap<String, SettingValue> = [
        ("vault_addr", SettingValue::String(address.into())),
        (
            "key_identifier_value",
            SettingValue::String(server_id.into()),
        ),
        (
            "token_auth",
            SettingValue::Map(
                [(
                    "token".to_string(),
                    SettingValue::String(OPENBAO_ROOT_TOKEN.into()),
                )]
                .into(),
            ),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let core = CoreConfig {
        trust_domain: "example.org".into(),
    };
    let config = VaultFactory::new()
        .parse_all(Settings::new(values), &core)
        .expect("valid plugin_data");
    config
        .open()
        .await
        .expect("open")
        .start(EngineOptions::default())
        .await
        .expect("start")
}

fn id(s: &str) -> KeyId {
    KeyId::new(s).expect("id")
}

async fn sign_and_verify(service: &dyn KeyService, key: &str) {
    verify::sign_and_verify(
        service,
        key,
        KeyType::EcP256,
        SignerOpts::Hash(HashAlgorithm::Sha256),
    )
    .await
    .expect("the signature verifies against the served public key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_reads_only_this_servers_keys() {
    // 40 keys of other servers in the same mount.
    for n in 0..40 {
        root(
            reqwest::Method::POST,
            &format!("transit/keys/other{n}-{}-x509-CA-A", uuid_v4()),
            Some(json!({"type": "ecdsa-p256"})),
        )
        .await;
    }
    let proxy = FaultProxy::start(&bao().url).await;
    let first = start(proxy.url(), "reads-mine").await;
    for key in ["x509-CA-A", "JWT-Signer-A"] {
        first
            .generate_key(id(key), KeyType::EcP256)
            .await
            .expect("generate");
    }
    drop(first);
    let before = proxy.count();
    let restarted = start(proxy.url(), "reads-mine").await;
    let requests: Vec<String> = proxy
        .since(before)
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    let key_reads: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("GET /v1/transit/keys/"))
        .collect();
    assert_eq!(key_reads.len(), 2, "{requests:#?}");
    assert!(
        key_reads.iter().all(|r| r.contains("/reads-mine-")),
        "{requests:#?}"
    );
    assert!(
        requests.len() <= 4,
        "lookup-self, one LIST and two reads: {requests:#?}"
    );
    sign_and_verify(&*restarted, "x509-CA-A").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_inside_vault_keeps_signing_with_the_served_version() {
    let service = start(&bao().url, "rotated-outside").await;
    service
        .generate_key(id("x509-CA-A"), KeyType::EcP256)
        .await
        .expect("generate");
    let served = service.public_key(&id("x509-CA-A")).expect("served");
    let names = root(reqwest::Method::GET, "transit/keys?list=true", None).await;
    let name = names["data"]["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(Value::as_str)
        .find(|n| n.starts_with("rotated-outside-"))
        .expect("our key")
        .to_string();
    root(
        reqwest::Method::POST,
        &format!("transit/keys/{name}/rotate"),
        Some(json!({})),
    )
    .await;
    // SPIRE's built-in would now get `vault:v2:` signatures from a key it does not know.
    sign_and_verify(&*service, "x509-CA-A").await;
    assert_eq!(
        service.public_key(&id("x509-CA-A")).expect("served"),
        served
    );
    // After a restart the newest version is served, and signs.
    drop(service);
    let restarted = start(&bao().url, "rotated-outside").await;
    assert_ne!(
        restarted
            .public_key(&id("x509-CA-A"))
            .expect("served")
            .fingerprint,
        served.fingerprint
    );
    sign_and_verify(&*restarted, "x509-CA-A").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_of_the_wrong_length_never_reaches_vault() {
    let proxy = FaultProxy::start(&bao().url).await;
    let service = start(proxy.url(), "short-digest").await;
    service
        .generate_key(id("k"), KeyType::EcP256)
        .await
        .expect("generate");
    let before = proxy.count();
    let error = service
        .sign(
            &id("k"),
            vec![7; 20],
            SignerOpts::Hash(HashAlgorithm::Sha256),
            None,
        )
        .await
        .expect_err("a 20-byte SHA-256 digest");
    assert!(error.to_string().contains("20"), "{error}");
    assert_eq!(proxy.count(), before, "no request reached Vault");
}

fn uuid_v4() -> String {
    // Random enough for distinct names; the format is what matters.
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let hex = format!("{n:032x}");
    format!(
        "{}-{}-4{}-8{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}
