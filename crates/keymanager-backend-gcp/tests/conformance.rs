//! The backend conformance suite on `gcp_kms`, against the project's Cloud KMS fake
//! (tests/peers/gcp_kms_fake.py; no Cloud KMS emulator that signs exists). The plugin
//! authenticates with a service account key generated here, as in production.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use keymanager_backend_gcp::GcpKmsFactory;
use keymanager_conformance::peers::{self, Peer};
use keymanager_conformance::proxy::RequestSummary;
use keymanager_conformance::suite::Subject;
use keymanager_engine::BackendFactory;
use keymanager_engine::kit::vocabulary as tags;

static FACTORY: GcpKmsFactory = GcpKmsFactory::new();
const KEY_RING: &str = "projects/conformance/locations/global/keyRings/spire";

/// The fake, its key ring, and a service account key file for the plugin.
struct Fake {
    peer: Peer,
    service_account_file: PathBuf,
}

static FAKE: OnceLock<Fake> = OnceLock::new();

fn fake() -> &'static Fake {
    FAKE.get_or_init(|| {
        let peer = peers::gcp_fake();
        let service_account_file = std::env::temp_dir().join(format!(
            "kms-keymanager-conformance-sa-{}.json",
            std::process::id()
        ));
        peers::gcp_service_account(
            &peer.url,
            "spire@conformance.iam.gserviceaccount.com",
            &service_account_file,
            Some(KEY_RING),
        );
        Fake {
            peer,
            service_account_file,
        }
    })
}

struct GcpSubject {
    fake: &'static Fake,
}

impl GcpSubject {
    /// The versions of `name` not scheduled for destruction.
    async fn live_versions(&self, name: &str) -> Vec<String> {
        let state = self.state().await;
        let Some(key) = state["cryptoKeys"]
            .as_array()
            .and_then(|keys| keys.iter().find(|k| k["name"] == name))
        else {
            return Vec::new();
        };
        key["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| !matches!(v["state"].as_str(), Some("DESTROY_SCHEDULED" | "DESTROYED")))
            .filter_map(|v| v["name"].as_str().map(str::to_string))
            .collect()
    }

    async fn state(&self) -> serde_json::Value {
        reqwest::Client::new()
            .get(format!(
                "{}/_fake/state?keyRing={KEY_RING}",
                self.fake.peer.url
            ))
            .send()
            .await
            .expect("fake state")
            .json()
            .await
            .expect("fake state JSON")
    }
}

#[async_trait]
impl Subject for GcpSubject {
    fn factory(&self) -> &'static dyn BackendFactory {
        &FACTORY
    }

    fn peer_url(&self) -> Option<String> {
        Some(self.fake.peer.url.clone())
    }

    fn plugin_data(&self, server_id: &str, endpoint: Option<&str>) -> String {
        format!(
            "backend = \"gcp_kms\"\nkey_ring = {KEY_RING:?}\nendpoint = {:?}\nservice_account_file = {:?}\nkey_identifier_value = {server_id:?}\n",
            endpoint.unwrap_or(&self.fake.peer.url),
            self.fake.service_account_file.display().to_string()
        )
    }

    fn is_read(&self, request: &RequestSummary) -> bool {
        request.method == "GET"
    }

    async fn live_keys(&self, _trust_domain: &str, server_id: &str, key_id: &str) -> Vec<String> {
        self.live_versions(&format!(
            "{KEY_RING}/cryptoKeys/spire-key-{server_id}-{key_id}"
        ))
        .await
    }
    fn shared_plugin_data(
        &self,
        server_id: &str,
        endpoint: Option<&str>,
        scope: &str,
    ) -> Option<String> {
        Some(format!(
            "{}clock_skew_allowance = \"1s\"\nshared_keys {{\n  crypto_key_template = \"sk-{scope}-{{{{ .KeyID }}}}\"\n  key_id_extraction_regex = \"^sk-{scope}-(.+)$\"\n  lock_lease = \"10s\"\n}}\n",
            self.plugin_data(server_id, endpoint)
        ))
    }

    /// Labels belong to the CryptoKey: a stamp cannot tell which version a server serves.
    fn stamps_each_shared_generation(&self) -> bool {
        false
    }

    async fn live_shared_keys(
        &self,
        _trust_domain: &str,
        scope: &str,
        key_id: &str,
    ) -> Vec<String> {
        self.live_versions(&format!("{KEY_RING}/cryptoKeys/sk-{scope}-{key_id}"))
            .await
    }

    /// A lock CryptoKey as a holder that crashed leaves it: its lease ends 12 s from now
    /// (whole seconds, so at least 11 s), the case expecting a takeover no sooner than the
    /// 10 s lease plus the 1 s skew after the plant.
    async fn plant_shared_lock(
        &self,
        trust_domain: &str,
        scope: &str,
        key_id: &str,
        _basis_locator: &str,
        basis: u64,
    ) -> bool {
        use keymanager_backend_gcp::naming;
        let crypto_key = format!("{KEY_RING}/cryptoKeys/sk-{scope}-{key_id}");
        let lock = naming::lock_crypto_key_id(&crypto_key, basis, 0);
        let expires = keymanager_engine::lifecycle::stamp_text(
            std::time::SystemTime::now() + std::time::Duration::from_secs(12),
        );
        let response = reqwest::Client::new()
            .post(format!(
                "{}/v1/{KEY_RING}/cryptoKeys?cryptoKeyId={lock}&skipInitialVersionCreation=true",
                self.fake.peer.url
            ))
            .json(&serde_json::json!({
                "purpose": "ASYMMETRIC_SIGN",
                "versionTemplate": { "algorithm": "EC_SIGN_P256_SHA256" },
                "labels": {
                    (naming::LABEL_TRUST_DOMAIN): naming::trust_domain_hash(trust_domain),
                    (naming::LABEL_LOCK): "true",
                    (naming::LABEL_LOCK_HOLDER): "crashed",
                    (naming::LABEL_LOCK_EXPIRES): expires,
                },
            }))
            .send()
            .await
            .expect("CreateCryptoKey of the planted lock");
        assert!(response.status().is_success(), "{response:?}");
        true
    }

    async fn set_stamp(&self, _trust_domain: &str, locator: &str, text: &str) -> bool {
        let crypto_key = locator
            .split_once("/cryptoKeyVersions/")
            .map_or(locator, |(key, _)| key);
        let client = reqwest::Client::new();
        let url = format!("{}/v1/{crypto_key}", self.fake.peer.url);
        let key: serde_json::Value = client
            .get(&url)
            .send()
            .await
            .expect("GetCryptoKey")
            .json()
            .await
            .expect("CryptoKey JSON");
        let mut labels = key["labels"].clone();
        labels[tags::LAST_UPDATE] = serde_json::Value::String(text.to_string());
        let response = client
            .patch(format!("{url}?updateMask=labels"))
            .json(&serde_json::json!({ "labels": labels }))
            .send()
            .await
            .expect("UpdateCryptoKey");
        assert!(
            response.status().is_success(),
            "{:?}",
            response.text().await
        );
        true
    }
}

keymanager_conformance::conformance_suite!(async {
    Arc::new(GcpSubject { fake: fake() }) as Arc<dyn Subject>
});
