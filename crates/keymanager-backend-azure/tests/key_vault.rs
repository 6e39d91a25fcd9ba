//! What the `azure_key_vault` backend does beyond the conformance suite, against the
//! project's Key Vault fake (tests/peers/azure_keyvault_fake.py): duplicates resolved to the
//! newest key on every start, a disabled key, a key with the trust-domain tag but no
//! server-id tag, every credential source of SPIRE's chain, token expiry, throttling and
//! outages. Every signature is verified with an independent library.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use keymanager_backend_azure::credentials::set_test_environment;
use keymanager_backend_azure::{AzureBackend, AzureFactory};
use keymanager_conformance::peers::{self, AzureFake};
use keymanager_conformance::proxy::FaultProxy;
use keymanager_conformance::verify;
use keymanager_engine::kit::{KmsAdapter, KmsConfig};
use keymanager_engine::lifecycle::SweepPolicy;
use keymanager_engine::settings::{SettingValue, Settings};
use keymanager_engine::{
    Backend, BackendConfig, CoreConfig, EngineOptions, HashAlgorithm, KeyId, KeyService, KeyType,
    PssSaltLength, SignerOpts, StoredKey,
};
use serde_json::{Value, json};

const IDENTITY_HEADER: &str = "test-identity-header";
const APP: &str = "spire-app";
const APP_SECRET: &str = "PLANTED-SECRET-azure-app-secret";
const TD: &str = "example.org";

/// Environment variables a backend sees.
type Environment = Vec<(String, String)>;
/// Extra `plugin_data` keys.
type PluginData = Vec<(&'static str, &'static str)>;

static FAKE: OnceLock<AzureFake> = OnceLock::new();
/// A fake of its own for faults and token revocation, which are global to a fake.
static FAULTY: OnceLock<AzureFake> = OnceLock::new();
/// Tokens valid four seconds, with request counts no other test disturbs.
static SHORT_TOKENS: OnceLock<AzureFake> = OnceLock::new();

/// Pages of three keys, so that every listing follows `nextLink`s.
fn start_fake() -> AzureFake {
    peers::azure_fake_with(&[
        "--page-size",
        "3",
        "--identity-header",
        IDENTITY_HEADER,
        "--client",
        &format!("{APP}:{APP_SECRET}"),
    ])
}

fn fake() -> &'static AzureFake {
    FAKE.get_or_init(start_fake)
}

fn faulty() -> &'static AzureFake {
    FAULTY.get_or_init(start_fake)
}

fn app_service(fake: &AzureFake) -> Vec<(String, String)> {
    vec![
        ("IDENTITY_ENDPOINT".into(), fake.identity_endpoint()),
        ("IDENTITY_HEADER".into(), IDENTITY_HEADER.into()),
    ]
}

/// A vault URI of its own (a TLS proxy in front of the fake), so that each test has its own
/// credential environment.
async fn vault(fake: &AzureFake) -> FaultProxy {
    FaultProxy::start_tls(&fake.vault_url, &fake.ca_cert, &fake.ca_key).await
}

fn settings(fake: &AzureFake, vault: &str, server_id: &str, extra: &[(&str, &str)]) -> Settings {
    let mut values: BTreeMap<String, SettingValue> = [
        ("key_vault_uri", vault.to_string()),
        ("ca_cert_path", fake.ca_cert.display().to_string()),
        ("key_identifier_value", server_id.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), SettingValue::String(v)))
    .collect();
    for (k, v) in extra {
        let value = match *v {
            "true" => SettingValue::Bool(true),
            "false" => SettingValue::Bool(false),
            v => SettingValue::String(v.to_string()),
        };
        values.insert(k.to_string(), value);
    }
    Settings::new(values)
}

fn config(
    fake: &AzureFake,
    vault: &str,
    server_id: &str,
    env: &[(String, String)],
    extra: &[(&str, &str)],
) -> KmsConfig<AzureBackend> {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    set_test_environment(vault, &pairs);
    AzureFactory::new()
        .parse_all(
            settings(fake, vault, server_id, extra),
            &CoreConfig {
                trust_domain: TD.into(),
            },
        )
        .expect("valid plugin_data")
}

async fn try_start(
    fake: &AzureFake,
    vault: &str,
    server_id: &str,
    env: &[(String, String)],
    extra: &[(&str, &str)],
) -> Result<Arc<dyn KeyService>, String> {
    let opened = config(fake, vault, server_id, env, extra)
        .open()
        .await
        .map_err(|e| e.to_string())?;
    opened
        .start(EngineOptions::default())
        .await
        .map_err(|e| e.to_string())
}

async fn start(fake: &AzureFake, vault: &str, server_id: &str) -> Arc<dyn KeyService> {
    try_start(fake, vault, server_id, &app_service(fake), &[])
        .await
        .unwrap_or_else(|e| panic!("start {server_id}: {e}"))
}

fn id(s: &str) -> KeyId {
    KeyId::new(s).expect("id")
}

fn unique(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
    )
}

/// A vault call straight to the fake with a managed-identity token (for planting keys).
async fn rest(fake: &AzureFake, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let pem = std::fs::read(&fake.ca_cert).expect("CA");
    let http = reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).expect("PEM"))
        .build()
        .expect("client");
    let token: Value = http
        .get(fake.identity_endpoint())
        .query(&[
            ("api-version", "2019-08-01"),
            ("resource", "https://vault.azure.net"),
        ])
        .header("X-IDENTITY-HEADER", IDENTITY_HEADER)
        .send()
        .await
        .expect("token endpoint")
        .json()
        .await
        .expect("token JSON");
    let token = token["access_token"].as_str().expect("a token").to_string();
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut request = http
        .request(
            method,
            format!("{}{path}{sep}api-version=7.5", fake.vault_url),
        )
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("the fake answers");
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "{path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// A test control call (`/_fake/...`).
async fn control(fake: &AzureFake, path: &str, body: Value) -> Value {
    let pem = std::fs::read(&fake.ca_cert).expect("CA");
    let http = reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).expect("PEM"))
        .build()
        .expect("client");
    let response = http
        .post(format!("{}{path}", fake.vault_url))
        .json(&body)
        .send()
        .await
        .expect("the fake answers");
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.json().await.unwrap_or(Value::Null)
}

/// The names of the keys (not soft-deleted) whose name ends with `-<key_id>` and whose
/// server-id tag is `server_id`.
async fn live_names(fake: &AzureFake, server_id: &str, key_id: &str) -> Vec<String> {
    let all = rest(fake, reqwest::Method::GET, "/keys?maxresults=25", None).await;
    let mut names = Vec::new();
    let mut page = all;
    loop {
        for item in page["value"].as_array().into_iter().flatten() {
            let name = item["kid"]
                .as_str()
                .and_then(|k| k.rsplit('/').next())
                .unwrap_or_default();
            if name.get(47..) == Some(key_id) && item["tags"]["spire-server-id"] == server_id {
                names.push(name.to_string());
            }
        }
        match page["nextLink"].as_str() {
            Some(link) if !link.is_empty() => {
                let path = link.split_once("/keys").map(|(_, p)| format!("/keys{p}"));
                page = rest(
                    fake,
                    reqwest::Method::GET,
                    &path.expect("a nextLink on the vault"),
                    None,
                )
                .await;
            }
            _ => return names,
        }
    }
}

fn eager() -> SweepPolicy {
    SweepPolicy {
        stale_after: Duration::from_secs(14 * 86400),
        half_created_grace: Duration::ZERO,
        max_clock_skew: Duration::ZERO,
    }
}

fn name_of(locator: &str) -> String {
    locator.rsplit('/').next().expect("locator").to_string()
}

async fn signs(service: &dyn KeyService, key: &str, key_type: KeyType) {
    let opts = if key_type.is_rsa() {
        SignerOpts::Pss {
            hash: HashAlgorithm::Sha256,
            salt: PssSaltLength::EqualsHash,
        }
    } else {
        SignerOpts::Hash(HashAlgorithm::Sha256)
    };
    verify::sign_and_verify(service, key, key_type, opts)
        .await
        .expect("the signature verifies");
}

/// A duplicate of the key id (what a crash between publish and retire leaves, or SPIRE's
/// built-in crashing mid-rotation): the newest is served on every one of 20 starts, the
/// sweep removes the other, and the newest signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_resolve_to_the_newest_on_every_start() {
    let fake = fake();
    let proxy = vault(fake).await;
    let server = unique("dup");
    let service = start(fake, proxy.url(), &server).await;
    let first = service
        .generate_key(id("x509-CA-A"), KeyType::EcP256)
        .await
        .expect("generate");
    drop(service);
    // Plant a second published key of the id, created later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let config = config(fake, proxy.url(), &server, &app_service(fake), &[]);
    let backend = AzureBackend::open(&config, server.clone())
        .await
        .expect("open");
    let handle = backend
        .prepare(&id("x509-CA-A"), KeyType::EcP256, None)
        .await
        .expect("prepare");
    let (key_type, spki_der) = backend.public_key(&handle).await.expect("public key");
    let planted = StoredKey {
        id: id("x509-CA-A"),
        key_type,
        spki_der,
        handle,
    };
    backend.publish(&planted, None).await.expect("publish");
    assert_eq!(live_names(fake, &server, "x509-CA-A").await.len(), 2);

    let mut served = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let service = start(fake, proxy.url(), &server).await;
        let key = service.public_key(&id("x509-CA-A")).expect("a key");
        served.insert(key.fingerprint.to_string());
        assert_ne!(
            key.fingerprint, first.fingerprint,
            "the older key is never served"
        );
    }
    assert_eq!(served.len(), 1, "the same key on every start: {served:?}");

    let service = start(fake, proxy.url(), &server).await;
    signs(service.as_ref(), "x509-CA-A", KeyType::EcP256).await;
    let in_use = service.in_use();
    assert_eq!(in_use.len(), 1);
    let records = service
        .list_records()
        .await
        .expect("list")
        .expect("records");
    let mine: Vec<_> = records
        .iter()
        .filter(|r| r.server_id.as_deref() == Some(server.as_str()))
        .collect();
    assert_eq!(mine.len(), 2);
    assert_eq!(
        mine.iter().filter(|r| r.published).count(),
        1,
        "only the newest is published: {mine:?}"
    );
    service
        .sweep(eager())
        .await
        .expect("sweep")
        .expect("report");
    let left = live_names(fake, &server, "x509-CA-A").await;
    assert_eq!(
        left,
        vec![name_of(in_use.iter().next().expect("one"))],
        "the sweep leaves only the served key"
    );
}

/// A disabled key of this server is reported and its id treated as absent: start-up does
/// not fail (SPIRE's built-in would), and the next GenerateKey makes a key that signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_key_is_absent_and_regenerated() {
    let fake = fake();
    let proxy = vault(fake).await;
    let server = unique("disabled");
    let service = start(fake, proxy.url(), &server).await;
    service
        .generate_key(id("JWT-Signer-A"), KeyType::Rsa2048)
        .await
        .expect("generate");
    let locator = service.in_use().into_iter().next().expect("a key");
    drop(service);
    control(
        fake,
        &format!("/_fake/keys/{}/attributes", name_of(&locator)),
        json!({"enabled": false}),
    )
    .await;
    let service = start(fake, proxy.url(), &server).await;
    assert!(
        service.public_key(&id("JWT-Signer-A")).is_err(),
        "the id is absent"
    );
    service
        .generate_key(id("JWT-Signer-A"), KeyType::Rsa2048)
        .await
        .expect("regenerate");
    signs(service.as_ref(), "JWT-Signer-A", KeyType::Rsa2048).await;
    assert!(!service.in_use().contains(&locator));
}

/// A key with this trust domain's tag but no server-id tag (SPIRE's sweep dereferences the
/// missing tag and panics) is not ours: listed without a server, never deleted, even stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_a_server_id_tag_is_never_swept() {
    let fake = fake();
    let proxy = vault(fake).await;
    let name = format!("spire-key-{}-x509-CA-A", uuid::Uuid::new_v4());
    rest(
        fake,
        reqwest::Method::POST,
        &format!("/keys/{name}/create"),
        Some(json!({"kty": "EC", "crv": "P-256", "key_ops": ["sign", "verify"], "tags": {"spire-server-td": TD}})),
    )
    .await;
    control(
        fake,
        &format!("/_fake/keys/{name}/attributes"),
        json!({"created": 1000, "updated": 1000}),
    )
    .await;
    let service = start(fake, proxy.url(), &unique("sweeper")).await;
    let records = service
        .list_records()
        .await
        .expect("list")
        .expect("records");
    let record = records
        .iter()
        .find(|r| r.locator.ends_with(&name))
        .expect("listed");
    assert_eq!(record.server_id, None);
    let report = service
        .sweep(eager())
        .await
        .expect("no panic, no error")
        .expect("report");
    assert!(
        !report
            .decisions
            .iter()
            .any(|d| d.is_delete() && d.locator().ends_with(&name)),
        "{report:?}"
    );
    let all = rest(fake, reqwest::Method::GET, &format!("/keys/{name}/"), None).await;
    assert_eq!(all["attributes"]["enabled"], true, "still there");
}

/// Every source of SPIRE's chain gets a token from the fake and signs; a broken variant of
/// each fails with a message that names the source and never the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_credential_source_of_the_chain_works() {
    let fake = fake();
    let authority = fake.vault_url.clone();
    let dir = tempfile::tempdir().expect("dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJzcGlyZSJ9.c2ln").expect("write");
    let token_file = token_file.display().to_string();
    let s = |v: &str| v.to_string();
    let cases: Vec<(&str, Environment, PluginData)> = vec![
        (
            "client secret in plugin_data",
            vec![(s("AZURE_AUTHORITY_HOST"), authority.clone())],
            vec![
                ("tenant_id", "fake-tenant"),
                ("subscription_id", "unused"),
                ("app_id", APP),
                ("app_secret", APP_SECRET),
            ],
        ),
        (
            "client secret in the environment",
            vec![
                (s("AZURE_AUTHORITY_HOST"), authority.clone()),
                (s("AZURE_TENANT_ID"), s("fake-tenant")),
                (s("AZURE_CLIENT_ID"), s(APP)),
                (s("AZURE_CLIENT_SECRET"), s(APP_SECRET)),
            ],
            vec![],
        ),
        (
            "workload identity",
            vec![
                (s("AZURE_AUTHORITY_HOST"), authority.clone()),
                (s("AZURE_TENANT_ID"), s("fake-tenant")),
                (s("AZURE_CLIENT_ID"), s(APP)),
                (s("AZURE_FEDERATED_TOKEN_FILE"), token_file.clone()),
            ],
            vec![],
        ),
        ("App Service managed identity", app_service(fake), vec![]),
        (
            "IMDS managed identity",
            vec![(
                s("AZURE_POD_IDENTITY_AUTHORITY_HOST"),
                fake.token_url.clone(),
            )],
            vec![],
        ),
    ];
    for (what, env, extra) in cases {
        let proxy = vault(fake).await;
        let service = try_start(fake, proxy.url(), &unique("cred"), &env, &extra)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        service
            .generate_key(id("k"), KeyType::EcP384)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        verify::sign_and_verify(
            service.as_ref(),
            "k",
            KeyType::EcP384,
            SignerOpts::Hash(HashAlgorithm::Sha384),
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    }

    let broken: Vec<(&str, Environment, PluginData, &str)> = vec![
        (
            "a wrong client secret",
            vec![(s("AZURE_AUTHORITY_HOST"), authority.clone())],
            vec![
                ("tenant_id", "fake-tenant"),
                ("subscription_id", "unused"),
                ("app_id", APP),
                ("app_secret", "PLANTED-SECRET-azure-wrong-secret"),
            ],
            "client secret from plugin_data",
        ),
        (
            "a wrong identity header",
            vec![
                (s("IDENTITY_ENDPOINT"), fake.identity_endpoint()),
                (s("IDENTITY_HEADER"), s("wrong-header")),
            ],
            vec![],
            "App Service",
        ),
        (
            "no IMDS",
            vec![(
                s("AZURE_POD_IDENTITY_AUTHORITY_HOST"),
                format!("http://127.0.0.1:{}", peers::free_port()),
            )],
            vec![],
            "workload identity: AZURE_FEDERATED_TOKEN_FILE",
        ),
        (
            "an http authority",
            vec![
                (s("AZURE_AUTHORITY_HOST"), s("http://127.0.0.1:1")),
                (s("AZURE_TENANT_ID"), s("t")),
                (s("AZURE_CLIENT_ID"), s("c")),
                (
                    s("AZURE_CLIENT_SECRET"),
                    s("PLANTED-SECRET-azure-wrong-secret"),
                ),
            ],
            vec![],
            "AZURE_AUTHORITY_HOST",
        ),
    ];
    for (what, env, extra, named) in broken {
        let proxy = vault(fake).await;
        let err = match try_start(fake, proxy.url(), &unique("bad"), &env, &extra).await {
            Ok(_) => panic!("{what}: started"),
            Err(e) => e,
        };
        assert!(err.contains(named), "{what}: {err}");
        assert!(
            !err.contains("PLANTED-SECRET-azure-wrong-secret"),
            "{what}: the secret leaked: {err}"
        );
    }
}

/// Revoked tokens (a plain expiry and a CAE claims challenge) are replaced without a failed
/// sign; 429 with Retry-After is waited out; 503s and dropped connections are retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_throttling_and_outages_do_not_fail_a_sign() {
    let fake = faulty();
    let proxy = vault(fake).await;
    let service = start(fake, proxy.url(), &unique("faults")).await;
    service
        .generate_key(id("k"), KeyType::EcP256)
        .await
        .expect("generate");
    signs(service.as_ref(), "k", KeyType::EcP256).await;

    for mode in ["plain", "cae"] {
        control(fake, "/_fake/tokens/expire", json!({"mode": mode})).await;
        let before = service.call_stats().get("sign").map_or(0, |s| s.failures);
        signs(service.as_ref(), "k", KeyType::EcP256).await;
        let after = service.call_stats().get("sign").map_or(0, |s| s.failures);
        assert_eq!(before, after, "{mode}: the refresh is inside one call");
    }

    control(
        fake,
        "/_fake/faults",
        json!([{"op": "sign", "status": 429, "retry_after": 2, "count": 1}]),
    )
    .await;
    let started = Instant::now();
    signs(service.as_ref(), "k", KeyType::EcP256).await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "Retry-After honoured: {:?}",
        started.elapsed()
    );

    control(
        fake,
        "/_fake/faults",
        json!([{"op": "sign", "status": 503, "count": 2}]),
    )
    .await;
    signs(service.as_ref(), "k", KeyType::EcP256).await;

    control(
        fake,
        "/_fake/faults",
        json!([{"op": "sign", "drop": true, "count": 1}]),
    )
    .await;
    signs(service.as_ref(), "k", KeyType::EcP256).await;

    // A response lost between the vault and us (the proxy drops it).
    proxy.plan(keymanager_conformance::proxy::Plan::Once(
        1,
        keymanager_conformance::proxy::Fault::Lose,
    ));
    signs(service.as_ref(), "k", KeyType::EcP256).await;
    proxy.clear();

    let stats = service.call_stats();
    assert!(
        stats.get("sign").map_or(0, |s| s.failures) >= 5,
        "{stats:?}"
    );
}

/// `purge_deleted_keys = true` purges this server's soft-deleted keys at the sweep, and only
/// its own; by default they stay soft-deleted (SPIRE's behaviour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deleted_keys_purges_only_this_servers_keys() {
    let fake = fake();
    let proxy = vault(fake).await;
    let keeper = unique("keeper");
    let purger = unique("purger");
    for (server, purge) in [(&keeper, "false"), (&purger, "true")] {
        let service = try_start(
            fake,
            proxy.url(),
            server,
            &app_service(fake),
            &[("purge_deleted_keys", purge)],
        )
        .await
        .expect("start");
        service
            .generate_key(id("k"), KeyType::EcP256)
            .await
            .expect("generate");
        service
            .generate_key(id("k"), KeyType::EcP256)
            .await
            .expect("rotate: the old key is soft-deleted");
        service
            .sweep(eager())
            .await
            .expect("sweep")
            .expect("report");
    }
    let deleted = rest(
        fake,
        reqwest::Method::GET,
        "/deletedkeys?maxresults=25",
        None,
    )
    .await;
    let mut page = deleted;
    let mut servers = Vec::new();
    loop {
        for item in page["value"].as_array().into_iter().flatten() {
            if let Some(s) = item["tags"]["spire-server-id"].as_str() {
                servers.push(s.to_string());
            }
        }
        match page["nextLink"].as_str() {
            Some(link) if !link.is_empty() => {
                let path = link
                    .split_once("/deletedkeys")
                    .map(|(_, p)| format!("/deletedkeys{p}"));
                page = rest(fake, reqwest::Method::GET, &path.expect("link"), None).await;
            }
            _ => break,
        }
    }
    assert!(
        servers.contains(&keeper),
        "the default keeps soft-deleted keys"
    );
    assert!(!servers.contains(&purger), "purged: {servers:?}");
}

async fn stats(fake: &AzureFake) -> Value {
    let pem = std::fs::read(&fake.ca_cert).expect("CA");
    reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).expect("PEM"))
        .build()
        .expect("client")
        .get(format!("{}/_fake/stats", fake.vault_url))
        .send()
        .await
        .expect("the fake answers")
        .json()
        .await
        .expect("JSON")
}

/// A token is refreshed before it expires: with four-second tokens, signing across three
/// lifetimes fetches new tokens and never meets a 401 after the first challenge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_before_they_expire() {
    let fake = SHORT_TOKENS.get_or_init(|| {
        peers::azure_fake_with(&[
            "--token-lifetime",
            "4",
            "--identity-header",
            IDENTITY_HEADER,
        ])
    });
    let proxy = vault(fake).await;
    let service = start(fake, proxy.url(), &unique("short")).await;
    service
        .generate_key(id("k"), KeyType::EcP256)
        .await
        .expect("generate");
    let before = stats(fake).await;
    for _ in 0..6 {
        signs(service.as_ref(), "k", KeyType::EcP256).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let after = stats(fake).await;
    let count = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    assert_eq!(
        count(&after, "unauthorized"),
        count(&before, "unauthorized"),
        "no request went out with an expired token: {after}"
    );
    assert!(
        count(&after, "token") >= count(&before, "token") + 2,
        "new tokens were fetched: {before} -> {after}"
    );
}
