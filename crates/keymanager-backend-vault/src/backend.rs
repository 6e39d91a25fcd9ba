//! The `hashicorp_vault` adapter: keys are Transit keys named as SPIRE's built-in names
//! them, found by this server's name prefix, and every signature is a Transit `sign` over
//! the digest with the key version whose public key the engine serves.
//!
//! Two-phase creation on Transit, where a key has exactly one flag a policy-limited server
//! can set, `deletion_allowed`:
//! - *prepare*: create the key, then set `deletion_allowed=true`: discovery skips such keys
//!   (they are being prepared or being retired). Creation and the flag are two calls; a
//!   crash between them leaves a complete key that discovery then finds as the newest of its
//!   id, which is still "the old key or the new one" (the other becomes a leftover);
//! - *publish*: `deletion_allowed=false`, one call: the newest live key of the id wins;
//! - *retire* / *abort*: `deletion_allowed=true` (the intent, recorded first), then DELETE.

use keymanager_engine::admin::KeyOperator;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use base64::Engine as _;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use keymanager_engine::kit::pem::public_key_der;
use keymanager_engine::kit::swap::Swap;
use keymanager_engine::kit::{KmsAdapter, KmsConfig};
use keymanager_engine::lifecycle::{KeyLifecycle, KeyRecord, StoreKeyState, SweeperIdentity};
use keymanager_engine::{
    Backend, BackendError, BackendErrorKind, BackendSignature, Capabilities, Digest, HashAlgorithm,
    KeyHandle, KeyId, KeyType, PssSaltSupport, SignatureScheme, SigningSupport, StoredKey,
};
use reqwest::Method;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::VaultSettings;
use crate::liveness::{Records, string_list};
use crate::naming;
use crate::session::Session;

/// Keys read at once during discovery and listing.
const CONCURRENCY: usize = 16;

const CAPABILITIES: Capabilities = Capabilities {
    key_types: &KeyType::ALL,
    signing: SigningSupport::CURVE_HASH_ECDSA_AND_RSA_SHA2,
    pss_salt: PssSaltSupport::Any,
    key_algorithm_name: None,
};

/// One Transit key, pinned to the version whose public key the engine serves.
#[derive(Clone, Debug)]
pub struct VaultKey {
    name: Arc<str>,
    /// `<mount>/keys/<name>`.
    locator: Arc<str>,
    version: u64,
}

impl KeyHandle for VaultKey {
    fn locator(&self) -> &str {
        &self.locator
    }
}

/// Transit's name for a key type.
fn transit_type(key_type: KeyType) -> &'static str {
    match key_type {
        KeyType::EcP256 => "ecdsa-p256",
        KeyType::EcP384 => "ecdsa-p384",
        KeyType::Rsa2048 => "rsa-2048",
        KeyType::Rsa4096 => "rsa-4096",
    }
}

fn key_type_of(transit: &str) -> Option<KeyType> {
    KeyType::ALL
        .into_iter()
        .find(|&t| transit_type(t) == transit)
}

fn hash_name(hash: HashAlgorithm) -> Option<&'static str> {
    match hash {
        HashAlgorithm::Sha256 => Some("sha2-256"),
        HashAlgorithm::Sha384 => Some("sha2-384"),
        HashAlgorithm::Sha512 => Some("sha2-512"),
        _ => None,
    }
}

/// A Transit key as `GET <mount>/keys/<name>` describes it.
#[derive(Clone, Debug)]
struct TransitKey {
    name: String,
    key_type: Option<KeyType>,
    /// When the name was created (its first version).
    created: Option<SystemTime>,
    /// Set: being prepared or retired; discovery skips it.
    deletion_allowed: bool,
    latest_version: u64,
    /// Version → PEM public key.
    public_keys: BTreeMap<u64, String>,
}

impl TransitKey {
    fn parse(name: &str, data: &Value) -> Self {
        let mut public_keys = BTreeMap::new();
        let mut created: Option<SystemTime> = None;
        if let Some(versions) = data.get("keys").and_then(Value::as_object) {
            for (version, entry) in versions {
                let Ok(version) = version.parse::<u64>() else {
                    continue;
                };
                if let Some(pem) = entry.get("public_key").and_then(Value::as_str) {
                    public_keys.insert(version, pem.to_string());
                }
                let at = entry
                    .get("creation_time")
                    .and_then(Value::as_str)
                    .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
                    .map(SystemTime::from);
                created = match (created, at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        Self {
            name: name.to_string(),
            key_type: data
                .get("type")
                .and_then(Value::as_str)
                .and_then(key_type_of),
            created,
            deletion_allowed: data
                .get("deletion_allowed")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            latest_version: data
                .get("latest_version")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            public_keys,
        }
    }
}

/// The backend.
pub struct VaultBackend {
    /// Replaced whole by a re-Configure with new credentials or TLS trust.
    session: Swap<Arc<Session>>,
    /// `vault_addr` (for `doctor`'s clock check).
    address: String,
    transit: String,
    trust_domain: String,
    server_id: String,
    records: Option<Records>,
}

#[async_trait]
impl KmsAdapter for VaultBackend {
    const NAME: &'static str = "hashicorp_vault";
    type Settings = VaultSettings;

    async fn open(config: &KmsConfig<Self>, server_id: String) -> Result<Self, BackendError> {
        if let Some(endpoint) = &config.endpoint {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!(
                    "endpoint ({}) is not a hashicorp_vault setting; the address is vault_addr",
                    endpoint.as_str()
                ),
            ));
        }
        let settings = &config.backend;
        let session = Session::open(settings).await?;
        tracing::info!(
            vault = %settings.address,
            namespace = settings.namespace.as_deref().unwrap_or(""),
            mount = %settings.transit_path,
            auth = settings.auth.method(),
            server_id = %server_id,
            liveness = settings.liveness.as_ref().map_or("off".to_string(), |l| format!("{}/{}", l.mount, l.prefix)),
            "hashicorp_vault backend ready"
        );
        Ok(Self {
            session: Swap::new(session),
            address: settings.address.clone(),
            transit: settings.transit_path.clone(),
            trust_domain: config.trust_domain.clone(),
            server_id,
            records: settings
                .liveness
                .clone()
                .map(|store| Records::new(store, &config.trust_domain)),
        })
    }
}

impl VaultBackend {
    fn session(&self) -> Arc<Session> {
        (*self.session.get()).clone()
    }

    fn locator(&self, name: &str) -> String {
        format!("{}/keys/{name}", self.transit)
    }

    fn handle(&self, name: &str, version: u64) -> VaultKey {
        VaultKey {
            name: Arc::from(name),
            locator: Arc::from(self.locator(name)),
            version,
        }
    }

    /// Every key name in the mount (LIST; an empty mount answers 404).
    async fn list_names(&self) -> Result<Vec<String>, BackendError> {
        match self
            .session()
            .call(
                Method::GET,
                &format!("{}/keys?list=true", self.transit),
                None,
            )
            .await
        {
            Ok(answer) => Ok(string_list(answer.as_ref(), "/data/keys")),
            Err(e) if e.is_not_found() => Ok(Vec::new()),
            Err(e) => Err(e.error),
        }
    }

    /// One key, `None` when it is gone (deleted between LIST and read: an HA peer rotating).
    async fn read(&self, name: &str) -> Result<Option<TransitKey>, BackendError> {
        match self
            .session()
            .call(Method::GET, &format!("{}/keys/{name}", self.transit), None)
            .await
        {
            Ok(answer) => Ok(answer
                .as_ref()
                .and_then(|a| a.get("data"))
                .map(|data| TransitKey::parse(name, data))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.error),
        }
    }

    /// Reads the keys of `names`, at most [`CONCURRENCY`] at a time.
    async fn read_all(&self, names: Vec<String>) -> Result<Vec<TransitKey>, BackendError> {
        let keys: Vec<Option<TransitKey>> = stream::iter(names)
            .map(|name| async move { self.read(&name).await })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        Ok(keys.into_iter().flatten().collect())
    }

    /// This server's keys, optionally of one id: only names with this server's prefix are
    /// read, so start-up costs do not grow with other servers' keys.
    async fn own_keys(
        &self,
        only: Option<&KeyId>,
    ) -> Result<Vec<(KeyId, TransitKey)>, BackendError> {
        let names: Vec<String> = self
            .list_names()
            .await?
            .into_iter()
            .filter(|name| match naming::key_id_of(name, &self.server_id) {
                Some(id) => only.is_none_or(|only| only.as_str() == id),
                None => false,
            })
            .collect();
        Ok(self
            .read_all(names)
            .await?
            .into_iter()
            .filter_map(|key| {
                let id = naming::key_id_of(&key.name, &self.server_id)?;
                KeyId::new(id).ok().map(|id| (id, key))
            })
            .collect())
    }

    fn stored(&self, id: KeyId, key: &TransitKey) -> Option<StoredKey<VaultKey>> {
        let Some(key_type) = key.key_type else {
            tracing::warn!(key = %self.locator(&key.name), "skipping a Transit key of a type SPIRE cannot use");
            return None;
        };
        let pem = key.public_keys.get(&key.latest_version)?;
        let Some(der) = public_key_der(pem) else {
            tracing::warn!(key = %self.locator(&key.name), "skipping a Transit key whose public key is not PEM");
            return None;
        };
        Some(StoredKey {
            id,
            key_type,
            spki_der: Arc::from(der),
            handle: self.handle(&key.name, key.latest_version),
        })
    }

    async fn set_deletion_allowed(&self, name: &str, allowed: bool) -> Result<(), BackendError> {
        self.session()
            .call(
                Method::POST,
                &format!("{}/keys/{name}/config", self.transit),
                Some(&json!({"deletion_allowed": allowed})),
            )
            .await
            .map_err(|e| e.error)?;
        Ok(())
    }

    /// Marks the key for deletion, then deletes it; a key already gone is fine.
    async fn remove(&self, name: &str) -> Result<(), BackendError> {
        match self.set_deletion_allowed(name, true).await {
            Err(e) if e.kind == BackendErrorKind::NotFound => return Ok(()),
            other => other?,
        }
        keymanager_engine::failpoint!("delete.after_intent");
        match self
            .session()
            .call(
                Method::DELETE,
                &format!("{}/keys/{name}", self.transit),
                None,
            )
            .await
        {
            Err(e) if !e.is_not_found() => Err(e.error),
            _ => Ok(()),
        }
    }
}

/// The live key of each id: the newest `creation_time` among keys not marked for deletion
/// (SPIRE's built-in's rule for duplicates); ties go to the larger name, so every replica
/// picks the same one.
/// Keys grouped by their SPIRE key id, for [`winners`].
fn by_id(keys: &[(KeyId, TransitKey)]) -> impl Iterator<Item = (&str, &TransitKey)> {
    keys.iter().map(|(id, key)| (id.as_str(), key))
}

fn winners<'a, G: Eq + std::hash::Hash>(
    keys: impl IntoIterator<Item = (G, &'a TransitKey)>,
) -> HashMap<G, &'a TransitKey> {
    let mut best: HashMap<G, &TransitKey> = HashMap::new();
    for (group, key) in keys.into_iter().filter(|(_, k)| !k.deletion_allowed) {
        match best.get(&group) {
            Some(b) if (key.created, &key.name) <= (b.created, &b.name) => {}
            _ => {
                best.insert(group, key);
            }
        }
    }
    best
}

#[async_trait]
impl Backend for VaultBackend {
    type Handle = VaultKey;
    type Config = KmsConfig<Self>;

    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPABILITIES
    }

    async fn discover(&self) -> Result<Vec<StoredKey<VaultKey>>, BackendError> {
        let keys = self.own_keys(None).await?;
        let live = winners(by_id(&keys));
        for (id, key) in &keys {
            if !key.deletion_allowed && live.get(id.as_str()).is_some_and(|w| w.name != key.name) {
                tracing::warn!(key_id = %id, key = %self.locator(&key.name), "an older key of this id is left from an interrupted rotation; the sweep removes it");
            }
        }
        Ok(keys
            .iter()
            .filter(|(id, key)| live.get(id.as_str()).is_some_and(|w| w.name == key.name))
            .filter_map(|(id, key)| self.stored(id.clone(), key))
            .collect())
    }

    async fn prepare(
        &self,
        id: &KeyId,
        key_type: KeyType,
        _replaces: Option<&StoredKey<VaultKey>>,
    ) -> Result<VaultKey, BackendError> {
        let name = naming::key_name(&self.server_id, id.as_str());
        self.session()
            .call(
                Method::POST,
                &format!("{}/keys/{name}", self.transit),
                Some(&json!({
                    "type": transit_type(key_type),
                    "exportable": false,
                    "auto_rotate_period": 0,
                })),
            )
            .await
            .map_err(|e| e.error.context(format!("creating Transit key {name}")))?;
        self.set_deletion_allowed(&name, true).await.map_err(|e| {
            e.context(format!(
                "marking new Transit key {name} as not yet published (a restart may find it as the newest key of {id})"
            ))
        })?;
        Ok(self.handle(&name, 1))
    }

    async fn public_key(&self, prepared: &VaultKey) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        let key = self.read(&prepared.name).await?.ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::NotFound,
                format!("Transit key {} is gone", prepared.locator),
            )
        })?;
        let key_type = key.key_type.ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Internal,
                format!("Transit key {} has an unexpected type", prepared.locator),
            )
        })?;
        let der = key
            .public_keys
            .get(&prepared.version)
            .and_then(|pem| public_key_der(pem))
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::Internal,
                    format!(
                        "Transit key {} has no public key for version {}",
                        prepared.locator, prepared.version
                    ),
                )
            })?;
        Ok((key_type, Arc::from(der)))
    }

    async fn publish(
        &self,
        new: &StoredKey<VaultKey>,
        _replaces: Option<&StoredKey<VaultKey>>,
    ) -> Result<(), BackendError> {
        self.set_deletion_allowed(&new.handle.name, false)
            .await
            .map_err(|e| e.context(format!("publishing Transit key {}", new.locator())))
    }

    async fn find(&self, id: &KeyId) -> Result<Option<String>, BackendError> {
        let keys = self.own_keys(Some(id)).await?;
        Ok(winners(by_id(&keys))
            .get(id.as_str())
            .map(|key| self.locator(&key.name)))
    }

    async fn abort(&self, prepared: &VaultKey) -> Result<(), BackendError> {
        self.remove(&prepared.name).await
    }

    async fn retire(
        &self,
        replaced: &StoredKey<VaultKey>,
        _replaced_by: &StoredKey<VaultKey>,
    ) -> Result<(), BackendError> {
        self.remove(&replaced.handle.name).await?;
        if let Some(records) = &self.records {
            records
                .forget(&self.session(), &self.server_id, &replaced.handle.name)
                .await?;
        }
        Ok(())
    }

    async fn sign(
        &self,
        key: &StoredKey<VaultKey>,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<BackendSignature, BackendError> {
        let hash = hash_name(scheme.hash()).ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!("Vault Transit cannot sign {}", scheme.describe()),
            )
        })?;
        let mut body = json!({
            "input": base64::engine::general_purpose::STANDARD.encode(digest.as_bytes()),
            "prehashed": true,
            "marshaling_algorithm": "asn1",
            "key_version": key.handle.version,
        });
        match scheme {
            SignatureScheme::Ecdsa(_) => {}
            SignatureScheme::RsaPkcs1v15(_) => {
                body["signature_algorithm"] = json!("pkcs1v15");
            }
            SignatureScheme::RsaPss { salt_len, .. } => {
                body["signature_algorithm"] = json!("pss");
                body["salt_length"] = json!(salt_len.to_string());
            }
        }
        let answer = self
            .session()
            .call(
                Method::POST,
                &format!("{}/sign/{}/{hash}", self.transit, key.handle.name),
                Some(&body),
            )
            .await
            .map_err(|e| e.error)?
            .unwrap_or_default();
        let text = answer
            .pointer("/data/signature")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let signature = parse_signature(text, key.handle.version).map_err(|reason| {
            BackendError::new(
                BackendErrorKind::Internal,
                format!("Transit signature from {}: {reason}", key.locator()),
            )
        })?;
        Ok(if key.key_type.is_rsa() {
            BackendSignature::Rsa(signature)
        } else {
            BackendSignature::EcdsaDer(signature)
        })
    }

    async fn reconfigure(&self, config: &KmsConfig<Self>) -> Result<(), BackendError> {
        // A new login with the new credentials before anything is replaced: a bad secret
        // fails the re-Configure and the running session keeps working.
        let session = Session::open(&config.backend).await?;
        self.session.set(session);
        Ok(())
    }
}

/// The bytes of `vault:v<N>:<base64>`, refusing any version but the one the engine serves:
/// a key rotated inside Vault must never yield a signature SPIRE cannot verify.
fn parse_signature(text: &str, expected_version: u64) -> Result<Vec<u8>, String> {
    let rest = text.strip_prefix("vault:v").ok_or_else(|| {
        format!(
            "{:?} does not start with vault:v",
            text.get(..12).unwrap_or(text)
        )
    })?;
    let (version, b64) = rest
        .split_once(':')
        .ok_or_else(|| "no ':' after the version".to_string())?;
    let version: u64 = version
        .parse()
        .map_err(|_| format!("version {version:?} is not a number"))?;
    if version != expected_version {
        return Err(format!(
            "signed with version {version}, but the served public key is version {expected_version}"
        ));
    }
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("bad base64: {e}"))
        .and_then(|bytes| {
            if bytes.is_empty() {
                Err("empty signature".to_string())
            } else {
                Ok(bytes)
            }
        })
}

/// Operators: Transit has no disabled state and deletes at once (the defaults); public keys
/// of any key of the mount by locator.
#[async_trait]
impl KeyOperator for VaultBackend {
    fn clock_url(&self) -> Option<String> {
        Some(format!(
            "{}/v1/sys/health",
            self.address.trim_end_matches('/')
        ))
    }

    async fn public_key_at(&self, locator: &str) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        let name = locator
            .strip_prefix(&format!("{}/keys/", self.transit))
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::NotFound,
                    format!("{locator} is not a key of this mount"),
                )
            })?;
        let version = self
            .read(name)
            .await?
            .map(|key| key.latest_version)
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::NotFound,
                    format!("Transit key {locator} does not exist"),
                )
            })?;
        self.public_key(&self.handle(name, version)).await
    }
}

#[async_trait]
impl KeyLifecycle for VaultBackend {
    type Handle = VaultKey;

    fn identity(&self) -> SweeperIdentity {
        SweeperIdentity {
            trust_domain: self.trust_domain.clone(),
            server_id: self.server_id.clone(),
        }
    }

    /// One record per key (see `liveness`); nothing without `liveness_kv_mount`.
    async fn stamp(
        &self,
        keys: &[StoredKey<VaultKey>],
        now: SystemTime,
    ) -> Result<(), BackendError> {
        let Some(records) = &self.records else {
            return Ok(());
        };
        let session = self.session();
        for key in keys {
            records
                .stamp(&session, &self.server_id, &key.handle.name, now)
                .await?;
            keymanager_engine::failpoint!("stamp.after_key");
        }
        Ok(())
    }

    /// Every key in the mount named as SPIRE names keys. This server's keys and those of
    /// servers with liveness records in this trust domain are read and carry the trust
    /// domain; the others are listed from their names alone, without a trust domain, so
    /// the sweep never touches them. Reads only.
    async fn list(&self) -> Result<Vec<KeyRecord>, BackendError> {
        let session = self.session();
        let mut known = vec![self.server_id.clone()];
        let mut stamps: HashMap<String, HashMap<String, Option<SystemTime>>> = HashMap::new();
        if let Some(records) = &self.records {
            for server in records.servers(&session).await? {
                stamps.insert(server.clone(), records.stamps(&session, &server).await?);
                if server != self.server_id {
                    known.push(server);
                }
            }
        }
        let mut foreign = Vec::new();
        let mut owner_of: HashMap<String, String> = HashMap::new();
        for name in self.list_names().await? {
            if let Some((server, _)) = naming::owner(&name, &known) {
                owner_of.insert(name, server.to_string());
            } else if let Some((server, id)) = naming::split(&name) {
                foreign.push(KeyRecord {
                    locator: self.locator(&name),
                    trust_domain: None,
                    server_id: Some(server.to_string()),
                    state: StoreKeyState::Enabled,
                    key_id: Some(id.to_string()),
                    published: true,
                    last_stamp: None,
                    created: None,
                    deletion_intent: false,
                    replaced: None,
                    replaced_by: None,
                });
            }
        }
        let mut names: Vec<String> = owner_of.keys().cloned().collect();
        names.sort();
        let keys = self.read_all(names).await?;
        // Which key discovery finds for each (server, id).
        let published: HashSet<&str> = winners(keys.iter().filter_map(|key| {
            let server = owner_of[&key.name].as_str();
            naming::key_id_of(&key.name, server).map(|id| ((server, id), key))
        }))
        .into_values()
        .map(|k| k.name.as_str())
        .collect();
        let mut out: Vec<KeyRecord> = keys
            .iter()
            .map(|key| {
                let server = owner_of[&key.name].as_str();
                KeyRecord {
                    locator: self.locator(&key.name),
                    trust_domain: Some(self.trust_domain.clone()),
                    server_id: Some(server.to_string()),
                    state: StoreKeyState::Enabled,
                    key_id: naming::key_id_of(&key.name, server).map(str::to_string),
                    published: published.contains(key.name.as_str()),
                    last_stamp: stamps
                        .get(server)
                        .and_then(|s| s.get(&key.name))
                        .copied()
                        .flatten(),
                    created: key.created,
                    deletion_intent: false,
                    replaced: None,
                    replaced_by: None,
                }
            })
            .collect();
        out.extend(foreign);
        out.sort_by(|a, b| a.locator.cmp(&b.locator));
        Ok(out)
    }

    async fn delete(&self, record: &KeyRecord) -> Result<(), BackendError> {
        let name = record
            .locator
            .strip_prefix(&format!("{}/keys/", self.transit))
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::Internal,
                    format!("{} is not a key of this mount", record.locator),
                )
            })?;
        self.remove(name).await?;
        if let (Some(records), Some(server)) = (&self.records, &record.server_id) {
            records.forget(&self.session(), server, name).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use keymanager_engine::CoreConfig;
    use keymanager_engine::settings::{SettingValue, Settings};

    use super::*;

    /// A key deleted between LIST and its read (an HA peer rotating) is gone, not an error
    /// and not a crash as in SPIRE's built-in: against a real OpenBao.
    #[tokio::test]
    async fn a_key_gone_between_list_and_read_is_skipped() {
        let peer = keymanager_conformance::peers::openbao();
        let values = [
            ("vault_addr", SettingValue::String(peer.url.clone())),
            ("key_identifier_value", SettingValue::String("gone".into())),
            (
                "token_auth",
                SettingValue::Map(
                    [(
                        "token".to_string(),
                        SettingValue::String(
                            keymanager_conformance::peers::OPENBAO_ROOT_TOKEN.into(),
                        ),
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
        let config = crate::VaultFactory::new()
            .parse_all(Settings::new(values), &core)
            .expect("valid");
        let backend = VaultBackend::open(&config, "gone".into())
            .await
            .expect("open");
        let id = KeyId::new("k").expect("id");
        let handle = backend
            .prepare(&id, KeyType::EcP256, None)
            .await
            .expect("prepare");
        let listed = vec![
            handle.name.to_string(),
            naming::key_name("gone", "vanished"),
        ];
        let read = backend
            .read_all(listed)
            .await
            .expect("a vanished key is no error");
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].name, *handle.name);
        assert!(read[0].deletion_allowed, "prepared keys are marked");
    }

    #[test]
    fn signatures_must_carry_the_served_version() {
        let b64 = base64::engine::general_purpose::STANDARD.encode([1u8, 2, 3]);
        assert_eq!(
            parse_signature(&format!("vault:v1:{b64}"), 1),
            Ok(vec![1, 2, 3])
        );
        assert_eq!(
            parse_signature(&format!("vault:v12:{b64}"), 12),
            Ok(vec![1, 2, 3])
        );
        for (text, version) in [
            (format!("vault:v2:{b64}"), 1),
            (format!("vault:{b64}"), 1),
            ("vault:v1:".to_string(), 1),
            ("vault:vx:AQID".to_string(), 1),
            ("vault:v1:!!".to_string(), 1),
            (String::new(), 1),
        ] {
            assert!(parse_signature(&text, version).is_err(), "{text:?}");
        }
    }

    fn key(name: &str, created: u64, deletion_allowed: bool) -> TransitKey {
        TransitKey {
            name: name.into(),
            key_type: Some(KeyType::EcP256),
            created: Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(created)),
            deletion_allowed,
            latest_version: 1,
            public_keys: BTreeMap::new(),
        }
    }

    #[test]
    fn the_newest_key_not_marked_for_deletion_wins() {
        let id = KeyId::new("x509-CA-A").expect("id");
        let keys = vec![
            (id.clone(), key("old", 10, false)),
            (id.clone(), key("newer", 20, false)),
            (id.clone(), key("prepared", 30, true)),
        ];
        assert_eq!(winners(by_id(&keys))["x509-CA-A"].name, "newer");
        let only_prepared = vec![(id, key("prepared", 30, true))];
        assert!(winners(by_id(&only_prepared)).is_empty());
    }

    #[test]
    fn key_reads_parse_versions_types_and_the_first_creation_time() {
        let data = json!({
            "type": "rsa-2048",
            "latest_version": 2,
            "deletion_allowed": true,
            "keys": {
                "1": {"public_key": "pem1", "creation_time": "2026-01-02T03:04:05.123456789Z"},
                "2": {"public_key": "pem2", "creation_time": "2026-02-02T03:04:05Z"}
            }
        });
        let key = TransitKey::parse("n", &data);
        assert_eq!(key.key_type, Some(KeyType::Rsa2048));
        assert_eq!(key.latest_version, 2);
        assert!(key.deletion_allowed);
        assert_eq!(key.public_keys[&2], "pem2");
        let first = OffsetDateTime::parse("2026-01-02T03:04:05.123456789Z", &Rfc3339)
            .map(SystemTime::from)
            .ok();
        assert_eq!(key.created, first);
        assert_eq!(
            TransitKey::parse("n", &json!({"type": "aes256-gcm96"})).key_type,
            None
        );
    }
}
