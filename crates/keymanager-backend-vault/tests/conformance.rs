//! The backend conformance suite on `hashicorp_vault`, against a real OpenBao dev server
//! (started here on 127.0.0.1), with liveness records in its KV v2 mount.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use keymanager_backend_vault::VaultFactory;
use keymanager_conformance::peers::{self, OPENBAO_ROOT_TOKEN, Peer};
use keymanager_conformance::proxy::RequestSummary;
use keymanager_conformance::suite::Subject;
use keymanager_engine::BackendFactory;
use serde_json::{Value, json};

static FACTORY: VaultFactory = VaultFactory::new();
static BAO: OnceLock<Peer> = OnceLock::new();

struct VaultSubject {
    bao: &'static Peer,
}

impl VaultSubject {
    /// A call with the root token, straight to OpenBao.
    async fn root(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = reqwest::Client::new()
            .request(method, format!("{}/v1/{path}", self.bao.url))
            .header("X-Vault-Token", OPENBAO_ROOT_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("OpenBao answers");
        let status = response.status();
        let text = response.text().await.expect("body");
        assert!(
            status.is_success() || status == reqwest::StatusCode::NOT_FOUND,
            "{path}: {status} {text}"
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    async fn transit_names(&self) -> Vec<String> {
        self.root(reqwest::Method::GET, "transit/keys?list=true", None)
            .await
            .pointer("/data/keys")
            .and_then(Value::as_array)
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The SPIRE key id of `name` if `server_id` owns it (`<server>-<36-char uuid>-<id>`).
fn key_id_of(name: &str, server_id: &str) -> Option<String> {
    let rest = name.strip_prefix(server_id)?.strip_prefix('-')?;
    (rest.as_bytes().get(36) == Some(&b'-'))
        .then(|| rest.get(37..).map(str::to_string))
        .flatten()
}

#[async_trait]
impl Subject for VaultSubject {
    fn factory(&self) -> &'static dyn BackendFactory {
        &FACTORY
    }

    fn peer_url(&self) -> Option<String> {
        Some(self.bao.url.clone())
    }

    fn plugin_data(&self, server_id: &str, endpoint: Option<&str>) -> String {
        format!(
            "backend = \"hashicorp_vault\"\nvault_addr = {:?}\ntoken_auth {{\n  token = {OPENBAO_ROOT_TOKEN:?}\n}}\nkey_identifier_value = {server_id:?}\nliveness_kv_mount = \"secret\"\n",
            endpoint.unwrap_or(&self.bao.url)
        )
    }

    fn is_read(&self, request: &RequestSummary) -> bool {
        request.method == "GET"
    }

    fn prepare_calls(&self) -> usize {
        2
    }

    /// Every Transit key of the id: Transit deletes at once, so a key that exists is live
    /// (a key marked `deletion_allowed` and not yet deleted still counts: the sweep must
    /// finish it).
    async fn live_keys(&self, _trust_domain: &str, server_id: &str, key_id: &str) -> Vec<String> {
        self.transit_names()
            .await
            .into_iter()
            .filter(|name| key_id_of(name, server_id).as_deref() == Some(key_id))
            .map(|name| format!("transit/keys/{name}"))
            .collect()
    }

    async fn set_stamp(&self, trust_domain: &str, locator: &str, text: &str) -> bool {
        let name = locator
            .strip_prefix("transit/keys/")
            .expect("a Transit locator");
        // The owner: the name up to its UUID segment.
        let server = (1..name.len())
            .filter(|&i| name.as_bytes()[i] == b'-')
            .map(|i| &name[..i])
            .find(|server| key_id_of(name, server).is_some())
            .expect("a SPIRE key name");
        self.root(
            reqwest::Method::POST,
            &format!("secret/data/kms-keymanager/{trust_domain}/{server}/{name}"),
            Some(json!({"data": {"stamp": text}})),
        )
        .await;
        true
    }
}

keymanager_conformance::conformance_suite!(async {
    Arc::new(VaultSubject {
        bao: BAO.get_or_init(peers::openbao),
    }) as Arc<dyn Subject>
});
