//! The backend conformance suite on `azure_key_vault`, against the project's Key Vault fake
//! (tests/peers/azure_keyvault_fake.py, HTTPS with its own test CA) through the TLS fault
//! proxy, with an App Service managed identity from the fake's token endpoint.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use async_trait::async_trait;
use keymanager_backend_azure::AzureFactory;
use keymanager_backend_azure::credentials::set_test_environment;
use keymanager_conformance::peers::{self, AzureFake};
use keymanager_conformance::proxy::RequestSummary;
use keymanager_conformance::suite::Subject;
use keymanager_engine::BackendFactory;
use serde_json::{Value, json};

static FACTORY: AzureFactory = AzureFactory::new();
static FAKE: OnceLock<AzureFake> = OnceLock::new();

fn fake() -> &'static AzureFake {
    FAKE.get_or_init(peers::azure_fake)
}

struct AzureSubject {
    fake: &'static AzureFake,
    /// The vault URI the backend was last given (the proxy's): locators start with it.
    endpoint: Mutex<Option<String>>,
}

/// A test control call to the fake (no authentication).
async fn control(
    fake: &AzureFake,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let pem = std::fs::read(&fake.ca_cert).expect("the fake's CA");
    let client = reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).expect("PEM"))
        .build()
        .expect("client");
    let mut request = client.request(method, format!("{}{path}", fake.vault_url));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("the fake answers");
    let status = response.status();
    let text = response.text().await.expect("body");
    assert!(status.is_success(), "{path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// The tags of a key's latest version in `/_fake/keys`.
fn latest_tags(entry: &Value) -> serde_json::Map<String, Value> {
    entry
        .get("versions")
        .and_then(Value::as_array)
        .and_then(|v| v.last())
        .and_then(|v| v.get("tags"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

#[async_trait]
impl Subject for AzureSubject {
    fn factory(&self) -> &'static dyn BackendFactory {
        &FACTORY
    }

    fn peer_url(&self) -> Option<String> {
        Some(self.fake.vault_url.clone())
    }

    fn peer_tls(&self) -> Option<(PathBuf, PathBuf)> {
        Some((self.fake.ca_cert.clone(), self.fake.ca_key.clone()))
    }

    fn plugin_data(&self, server_id: &str, endpoint: Option<&str>) -> String {
        let vault = endpoint.unwrap_or(&self.fake.vault_url).to_string();
        set_test_environment(
            &vault,
            &[
                ("IDENTITY_ENDPOINT", &self.fake.identity_endpoint()),
                ("IDENTITY_HEADER", "conformance"),
            ],
        );
        *self.endpoint.lock().unwrap_or_else(PoisonError::into_inner) = Some(vault.clone());
        format!(
            "backend = \"azure_key_vault\"\nkey_vault_uri = {vault:?}\nca_cert_path = {:?}\nkey_identifier_value = {server_id:?}\n",
            self.fake.ca_cert.display().to_string()
        )
    }

    fn is_read(&self, request: &RequestSummary) -> bool {
        request.method == "GET"
    }

    /// Keys of the id that are not soft-deleted, published or pending, read from the fake.
    async fn live_keys(&self, trust_domain: &str, server_id: &str, key_id: &str) -> Vec<String> {
        let vault = self
            .endpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| self.fake.vault_url.clone());
        let all = control(self.fake, reqwest::Method::GET, "/_fake/keys", None).await;
        all.get("keys")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|entry| {
                let name = entry
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let tags = latest_tags(entry);
                let tag = |k: &str| tags.get(k).and_then(Value::as_str);
                name.get(47..) == Some(key_id)
                    && tag("spire-server-id") == Some(server_id)
                    && (tag("spire-server-td") == Some(trust_domain)
                        || tag("spire-pending-td") == Some(trust_domain))
            })
            .filter_map(|entry| entry.get("name").and_then(Value::as_str))
            .map(|name| format!("{vault}/keys/{name}"))
            .collect()
    }

    /// The stamp is the key's `updated` time, an integer the store keeps: a decimal text
    /// goes in as that number (overflowing and negative ones too); anything else cannot be
    /// held by Key Vault, and becomes the most absurd number it can hold instead.
    async fn set_stamp(&self, _trust_domain: &str, locator: &str, text: &str) -> bool {
        let name = locator.rsplit('/').next().expect("a key locator");
        let digits = text.strip_prefix('-').unwrap_or(text);
        let value: Value = if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            serde_json::from_str(text).expect("a JSON number")
        } else {
            json!(u64::MAX)
        };
        control(
            self.fake,
            reqwest::Method::POST,
            &format!("/_fake/keys/{name}/attributes"),
            Some(json!({"updated": value})),
        )
        .await;
        true
    }
}

keymanager_conformance::conformance_suite!(async {
    Arc::new(AzureSubject {
        fake: fake(),
        endpoint: Mutex::new(None),
    }) as Arc<dyn Subject>
});
