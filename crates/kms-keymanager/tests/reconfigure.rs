//! Re-Configure never silently ignores a setting: every change is applied at once, refused
//! naming the setting, or applied at the next start with a warning. Rotated credentials take
//! effect without a restart. Driven through the plugin's own configuration state, against
//! moto, the Cloud KMS fake and OpenBao, with the fault proxy watching what reaches the store.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use keymanager_backend_aws::AwsKmsFactory;
use keymanager_backend_disk::DiskFactory;
use keymanager_backend_gcp::GcpKmsFactory;
use keymanager_backend_vault::VaultFactory;
use keymanager_conformance::peers::{self, Peer};
use keymanager_conformance::proxy::FaultProxy;
use keymanager_engine::{BackendFactory, CoreConfig, HashAlgorithm, KeyId, KeyType, SignerOpts};
use keymanager_plugin::PluginState;
use keymanager_plugin::logging::LogControl;
use tonic::Code;

static AWS: AwsKmsFactory = AwsKmsFactory::new();
static GCP: GcpKmsFactory = GcpKmsFactory::new();
static VAULT: VaultFactory = VaultFactory::new();
static BACKENDS: &[&dyn BackendFactory] = &[&DiskFactory, &AWS, &GCP, &VAULT];

fn core() -> Option<CoreConfig> {
    Some(CoreConfig {
        trust_domain: "example.org".into(),
    })
}

fn state() -> PluginState {
    PluginState::new(BACKENDS, LogControl::detached())
}

async fn sign(state: &PluginState, key: &str) {
    let service = state.service().expect("configured");
    service
        .sign(
            &KeyId::new(key).expect("id"),
            vec![7; 32],
            SignerOpts::Hash(HashAlgorithm::Sha256),
            None,
        )
        .await
        .expect("sign");
}

fn moto() -> &'static Peer {
    static PEER: OnceLock<Peer> = OnceLock::new();
    PEER.get_or_init(peers::moto)
}

fn aws(endpoint: &str, access_key_id: &str, extra: &str) -> String {
    format!(
        "backend = \"aws_kms\"\nregion = \"us-east-1\"\nendpoint = {endpoint:?}\naccess_key_id = {access_key_id:?}\nsecret_access_key = \"PLANTED-SECRET-aws-secret-of-{access_key_id}\"\nkey_identifier_value = \"reconfigured\"\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_credentials_and_new_key_settings_apply_at_once_and_store_changes_are_refused() {
    let proxy = FaultProxy::start(&moto().url).await;
    let state = state();
    state
        .configure(core(), &aws(proxy.url(), "PLANTED-SECRET-AKIAFIRST", ""))
        .await
        .expect("configure");
    let service = state.service().expect("configured");
    service
        .generate_key(KeyId::new("x509-CA-A").expect("id"), KeyType::EcP256)
        .await
        .expect("generate");
    let mark = proxy.count();
    sign(&state, "x509-CA-A").await;
    let used: Vec<_> = proxy
        .since(mark)
        .into_iter()
        .map(|r| r.aws_access_key_id)
        .collect();
    assert_eq!(used, [Some("PLANTED-SECRET-AKIAFIRST".to_string())]);

    // Rotated static keys and new key tags: applied without a restart, keys kept.
    state
        .configure(
            core(),
            &aws(
                proxy.url(),
                "PLANTED-SECRET-AKIASECOND",
                "key_tags = { team = \"pki\" }\n",
            ),
        )
        .await
        .expect("re-Configure with rotated credentials");
    let same = state.service().expect("configured");
    assert!(
        Arc::ptr_eq(&service, &same),
        "the engine and its keys are kept"
    );
    let mark = proxy.count();
    sign(&state, "x509-CA-A").await;
    same.generate_key(KeyId::new("JWT-Signer-A").expect("id"), KeyType::EcP256)
        .await
        .expect("generate");
    let seen = proxy.since(mark);
    assert!(
        seen.iter()
            .all(|r| r.aws_access_key_id.as_deref() == Some("PLANTED-SECRET-AKIASECOND")),
        "every call after the re-Configure uses the rotated key: {:?}",
        seen.iter()
            .map(|r| (r.name(), r.aws_access_key_id.clone()))
            .collect::<Vec<_>>()
    );
    let create = seen
        .iter()
        .find(|r| r.name() == "CreateKey")
        .expect("a CreateKey");
    assert!(
        create.body.contains("\"pki\""),
        "the new key got the new tag: {}",
        create.body
    );

    // The discovery mode applies at the next start: accepted (with a warning).
    state
        .configure(
            core(),
            &aws(
                proxy.url(),
                "PLANTED-SECRET-AKIASECOND",
                "key_tags = { team = \"pki\" }\nenable_tag_based_key_discovery = true\n",
            ),
        )
        .await
        .expect("a next-start setting is accepted");

    // What decides which keys exist is refused, naming it.
    let refused = |text: String, names: &'static str| {
        let state = &state;
        async move {
            let status = state.configure(core(), &text).await.expect_err("refused");
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(status.message().contains(names), "{}", status.message());
        }
    };
    refused(
        aws(proxy.url(), "PLANTED-SECRET-AKIASECOND", "")
            .replace("\"reconfigured\"", "\"another\""),
        "server identity",
    )
    .await;
    refused(
        aws(proxy.url(), "PLANTED-SECRET-AKIASECOND", "").replace("us-east-1", "eu-west-1"),
        "region",
    )
    .await;
    refused("keys_path = \"/tmp/k.json\"\n".to_string(), "backend").await;
    // Still serving after the refusals.
    sign(&state, "x509-CA-A").await;
}

fn gcp_fake() -> &'static Peer {
    static PEER: OnceLock<Peer> = OnceLock::new();
    PEER.get_or_init(peers::gcp_fake)
}

const RING: &str = "projects/reconfigure/locations/global/keyRings/spire";

fn gcp(endpoint: &str, service_account_file: &Path, extra: &str) -> String {
    format!(
        "backend = \"gcp_kms\"\nkey_ring = {RING:?}\nendpoint = {endpoint:?}\nservice_account_file = {:?}\nkey_identifier_value = \"reconfigured\"\n{extra}",
        service_account_file.display().to_string()
    )
}

/// One control request to the fake, as raw HTTP/1.0 (the fake speaks plain JSON).
async fn control(fake: &Peer, method: &str, path: &str) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = fake.url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(url).await.expect("connect");
    stream
        .write_all(
            format!("{method} {path} HTTP/1.0\r\nHost: fake\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// The identities that called the fake since the last call of this function.
async fn callers(fake: &Peer) -> Vec<String> {
    let seen = control(fake, "GET", "/_fake/callers").await;
    control(fake, "POST", "/_fake/calls/reset").await;
    let mut names: Vec<String> = seen
        .as_object()
        .map(|m| m.keys().filter(|k| !k.is_empty()).cloned().collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_service_account_key_is_used_without_a_restart_and_shared_mode_changes_are_refused()
 {
    let fake = gcp_fake();
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("sa.json");
    peers::gcp_service_account(
        &fake.url,
        "first@reconfigure.iam.gserviceaccount.com",
        &file,
        Some(RING),
    );
    let state = state();
    state
        .configure(core(), &gcp(&fake.url, &file, ""))
        .await
        .expect("configure");
    let service = state.service().expect("configured");
    service
        .generate_key(KeyId::new("x509-CA-A").expect("id"), KeyType::EcP256)
        .await
        .expect("generate");
    callers(fake).await;
    sign(&state, "x509-CA-A").await;
    assert_eq!(
        callers(fake).await,
        ["first@reconfigure.iam.gserviceaccount.com"]
    );

    // The same file with a new key in it (how service account keys are rotated).
    peers::gcp_service_account(
        &fake.url,
        "second@reconfigure.iam.gserviceaccount.com",
        &file,
        None,
    );
    state
        .configure(core(), &gcp(&fake.url, &file, ""))
        .await
        .expect("re-Configure after rotating the key file");
    assert!(Arc::ptr_eq(&service, &state.service().expect("configured")));
    sign(&state, "x509-CA-A").await;
    assert_eq!(
        callers(fake).await,
        ["second@reconfigure.iam.gserviceaccount.com"]
    );

    let status = state
        .configure(
            core(),
            &gcp(
                &fake.url,
                &file,
                "shared_keys {\n crypto_key_template = \"s-{{ .TrustDomain }}-{{ .KeyID }}\"\n key_id_extraction_regex = \"^s-[0-9a-f]+-(.+)$\"\n}\n",
            ),
        )
        .await
        .expect_err("turning on shared keys at run time is refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("shared_keys"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keys_path_in_a_missing_directory_fails_configure_naming_it() {
    let status = state()
        .configure(
            core(),
            "keys_path = \"/nonexistent-dir-for-test/keys.json\"\n",
        )
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("/nonexistent-dir-for-test"),
        "{}",
        status.message()
    );
}

/// Missing credentials say so: `Unauthenticated`, the cause named, and no retries (the
/// fix is configuration). Run as a plugin process with an environment that holds none.
#[tokio::test(flavor = "multi_thread")]
async fn missing_aws_credentials_fail_configure_as_unauthenticated_without_retries() {
    let binary = Path::new(env!("CARGO_BIN_EXE_kms-keymanager"));
    let plugin = keymanager_host::PluginProcess::launch_with_env(
        binary,
        &[
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials"),
            ("AWS_CONFIG_FILE", "/nonexistent/config"),
        ],
    )
    .await
    .expect("plugin launches");
    let started = std::time::Instant::now();
    let status = plugin
        .configure(
            "example.org",
            &format!(
                "backend = \"aws_kms\"\nregion = \"us-east-1\"\nendpoint = {:?}\nkey_identifier_value = \"nocreds\"\n",
                moto().url
            ),
        )
        .await
        .expect_err("no credentials anywhere");
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    assert!(
        status.message().contains("credentials"),
        "{}",
        status.message()
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "not retried as if transient: {:?}",
        started.elapsed()
    );
    plugin.shutdown().await.expect("clean exit");
}

fn vault(address: &str, token: &str, extra: &str) -> String {
    format!(
        "backend = \"hashicorp_vault\"\nvault_addr = {address:?}\nkey_identifier_value = \"reconfigured\"\ntoken_auth {{\n  token = {token:?}\n}}\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_vault_token_applies_at_once_a_bad_one_is_refused_and_the_mount_cannot_change() {
    static PEER: OnceLock<Peer> = OnceLock::new();
    let peer = PEER.get_or_init(peers::openbao);
    let first = peers::openbao_cli(peer, &["token", "create", "-field=token", "-ttl=1h"]);
    let second = peers::openbao_cli(peer, &["token", "create", "-field=token", "-ttl=1h"]);
    let state = state();
    state
        .configure(core(), &vault(&peer.url, &first, ""))
        .await
        .expect("configure");
    let service = state.service().expect("configured");
    service
        .generate_key(KeyId::new("x509-CA-A").expect("id"), KeyType::EcP256)
        .await
        .expect("generate");
    sign(&state, "x509-CA-A").await;

    // A new token: applied without a restart; the old one can then be revoked.
    state
        .configure(core(), &vault(&peer.url, &second, ""))
        .await
        .expect("re-Configure with a new token");
    assert!(Arc::ptr_eq(&service, &state.service().expect("configured")));
    peers::openbao_cli(peer, &["token", "revoke", &first]);
    sign(&state, "x509-CA-A").await;

    // A token Vault does not accept fails the re-Configure; signing goes on with the
    // working one.
    let status = state
        .configure(
            core(),
            &vault(&peer.url, "PLANTED-SECRET-not-a-vault-token", ""),
        )
        .await
        .expect_err("a bad token is refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    assert!(
        !status
            .message()
            .contains("PLANTED-SECRET-not-a-vault-token"),
        "{}",
        status.message()
    );
    sign(&state, "x509-CA-A").await;

    // Another Transit mount is another store: refused, naming it.
    let status = state
        .configure(
            core(),
            &vault(&peer.url, &second, "transit_engine_path = \"other\"\n"),
        )
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("transit"), "{}", status.message());
    sign(&state, "x509-CA-A").await;
}
