//! The `azure_key_vault` adapter: keys are Key Vault keys named and tagged as SPIRE's
//! built-in names and tags them, found by listing the vault and keeping the keys whose
//! `spire-server-td` and `spire-server-id` tags are ours.
//!
//! Two-phase creation with tags:
//! - *prepare*: create the key tagged `spire-pending-td=<trust domain>` and
//!   `spire-server-id`, but **without** `spire-server-td`: neither our discovery nor SPIRE's
//!   built-in (which needs both of its tags, and whose sweep only looks at keys with its
//!   trust-domain tag) sees it;
//! - *publish*: one PATCH replaces the tags with SPIRE's pair (idempotent);
//! - *retire* / *abort*: soft delete (DELETE; a 404 is done).
//!
//! Duplicates of one id (a crash between publish and retire, or SPIRE's built-in crashing
//! mid-rotation): the newest `created` wins, then the larger name, so every start and every
//! replica picks the same key; the others are listed as unpublished and the sweep deletes
//! them after the half-created grace. Creation times have one-second resolution, so a
//! rotation waits, if it must, until the clock is past the replaced key's creation second.
//!
//! A disabled winner is reported and its id treated as absent: the next GenerateKey makes
//! a new key (SPIRE's built-in fails Configure instead).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use keymanager_engine::admin::{Check, DeletionWindow, KeyOperator};
use keymanager_engine::kit::paging::PageGuard;
use keymanager_engine::kit::spki::{ec_spki, rsa_spki};
use keymanager_engine::kit::swap::Swap;
use keymanager_engine::kit::{KmsAdapter, KmsConfig};
use keymanager_engine::lifecycle::{
    KeyLifecycle, KeyRecord, StoreKeyState, SweeperIdentity, parse_stamp,
};
use keymanager_engine::{
    Backend, BackendError, BackendErrorKind, BackendSignature, Capabilities, Digest, HashAlgorithm,
    KeyHandle, KeyId, KeyType, PssSaltSupport, SignatureScheme, SigningSupport, StoredKey,
};
use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::client::{AzureError, Client};
use crate::config::{AzureSettings, Protection};
use crate::naming::{self, PENDING_TD, SERVER_ID, TRUST_DOMAIN};

/// Keys read at once during discovery.
const CONCURRENCY: usize = 16;

const CAPABILITIES: Capabilities = Capabilities {
    key_types: &KeyType::ALL,
    signing: SigningSupport::CURVE_HASH_ECDSA_AND_RSA_SHA2,
    // Key Vault's PS256/384/512 use a salt as long as the hash.
    pss_salt: PssSaltSupport::HashLengthOnly,
    key_algorithm_name: None,
};

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Base64url with or without padding (Key Vault sends none; be lenient).
fn unb64url(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .ok()
}

/// One Key Vault key, pinned to the version whose public key the engine serves.
#[derive(Clone, Debug)]
pub struct AzureKey {
    name: Arc<str>,
    version: Arc<str>,
    /// `<vault>/keys/<name>`: what listing shows, without a version.
    locator: Arc<str>,
    /// Creation time, Unix seconds.
    created: Option<u64>,
    /// The public key as creation returned it (a prepared key needs no extra read).
    public: Option<(KeyType, Arc<[u8]>)>,
}

impl KeyHandle for AzureKey {
    fn locator(&self) -> &str {
        &self.locator
    }
}

/// A key as listing shows it.
#[derive(Clone, Debug)]
struct Listed {
    name: String,
    tags: HashMap<String, String>,
    enabled: bool,
    created: Option<u64>,
    updated: Option<u64>,
}

impl Listed {
    fn parse(item: &Value) -> Option<Self> {
        let kid = item.get("kid")?.as_str()?;
        let name = kid.split("/keys/").nth(1)?.split('/').next()?.to_string();
        Some(Self {
            name,
            tags: tags_of(item),
            enabled: item
                .pointer("/attributes/enabled")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            created: item.pointer("/attributes/created").and_then(Value::as_u64),
            updated: item.pointer("/attributes/updated").and_then(Value::as_u64),
        })
    }

    fn tag(&self, name: &str) -> Option<&str> {
        self.tags.get(name).map(String::as_str)
    }

    /// Newest first: creation time, then name, so every replica agrees.
    fn rank(&self) -> (Option<u64>, &str) {
        (self.created, &self.name)
    }
}

fn tags_of(item: &Value) -> HashMap<String, String> {
    item.get("tags")
        .and_then(Value::as_object)
        .map(|tags| {
            tags.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// The newest key of each group (SPIRE key id, or server and key id).
fn winners<'a, G: Eq + std::hash::Hash>(
    keys: impl IntoIterator<Item = (G, &'a Listed)>,
) -> HashMap<G, &'a Listed> {
    let mut best: HashMap<G, &Listed> = HashMap::new();
    for (group, key) in keys {
        match best.get(&group) {
            Some(b) if key.rank() <= b.rank() => {}
            _ => {
                best.insert(group, key);
            }
        }
    }
    best
}

/// The type and DER SubjectPublicKeyInfo of a JWK (`EC`/`EC-HSM` by curve, `RSA`/`RSA-HSM`
/// by modulus size).
fn jwk_public_key(jwk: &Value) -> Result<(KeyType, Vec<u8>), String> {
    let field = |name: &str| -> Result<Vec<u8>, String> {
        jwk.get(name)
            .and_then(Value::as_str)
            .and_then(unb64url)
            .ok_or_else(|| format!("the JWK has no base64url {name:?}"))
    };
    let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or_default();
    match kty {
        "EC" | "EC-HSM" => {
            let (key_type, len) = match jwk.get("crv").and_then(Value::as_str) {
                Some("P-256") => (KeyType::EcP256, 32),
                Some("P-384") => (KeyType::EcP384, 48),
                other => return Err(format!("unsupported curve {other:?}")),
            };
            let mut point = vec![0x04];
            for coordinate in [field("x")?, field("y")?] {
                if coordinate.len() > len {
                    return Err(format!(
                        "a coordinate of {} bytes for {key_type}",
                        coordinate.len()
                    ));
                }
                point.extend(std::iter::repeat_n(0, len - coordinate.len()));
                point.extend(coordinate);
            }
            Ok((key_type, ec_spki(key_type, &point)))
        }
        "RSA" | "RSA-HSM" => {
            let n = field("n")?;
            let e = field("e")?;
            let significant = n.iter().skip_while(|&&b| b == 0).count();
            let key_type = match significant {
                256 => KeyType::Rsa2048,
                512 => KeyType::Rsa4096,
                other => return Err(format!("unsupported RSA modulus of {} bits", other * 8)),
            };
            Ok((key_type, rsa_spki(&n, &e)))
        }
        other => Err(format!("unsupported key type {other:?}")),
    }
}

/// Key Vault's name of a signature scheme.
fn algorithm(scheme: SignatureScheme) -> Option<&'static str> {
    use HashAlgorithm::{Sha256, Sha384, Sha512};
    Some(match scheme {
        SignatureScheme::Ecdsa(Sha256) => "ES256",
        SignatureScheme::Ecdsa(Sha384) => "ES384",
        SignatureScheme::RsaPkcs1v15(Sha256) => "RS256",
        SignatureScheme::RsaPkcs1v15(Sha384) => "RS384",
        SignatureScheme::RsaPkcs1v15(Sha512) => "RS512",
        SignatureScheme::RsaPss { hash: Sha256, .. } => "PS256",
        SignatureScheme::RsaPss { hash: Sha384, .. } => "PS384",
        SignatureScheme::RsaPss { hash: Sha512, .. } => "PS512",
        _ => return None,
    })
}

fn at(secs: Option<u64>) -> Option<SystemTime> {
    secs.and_then(|s| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s)))
}

/// The backend.
pub struct AzureBackend {
    /// Replaced whole by a re-Configure with new credentials or TLS trust.
    client: Swap<Arc<Client>>,
    settings: Swap<AzureSettings>,
    trust_domain: String,
    server_id: String,
}

#[async_trait]
impl KmsAdapter for AzureBackend {
    const NAME: &'static str = "azure_key_vault";
    type Settings = AzureSettings;

    async fn open(config: &KmsConfig<Self>, server_id: String) -> Result<Self, BackendError> {
        if let Some(endpoint) = &config.endpoint {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!(
                    "endpoint ({}) is not an azure_key_vault setting; the vault's address is key_vault_uri",
                    endpoint.as_str()
                ),
            ));
        }
        let settings = &config.backend;
        let client = Client::new(settings)?;
        tracing::info!(
            vault = %settings.vault_uri,
            managed_hsm = settings.is_managed_hsm(),
            protection = ?settings.protection,
            purge_deleted_keys = settings.purge_deleted_keys,
            server_id = %server_id,
            "azure_key_vault backend ready"
        );
        Ok(Self {
            client: Swap::new(client),
            settings: Swap::new(settings.clone()),
            trust_domain: config.trust_domain.clone(),
            server_id,
        })
    }
}

impl AzureBackend {
    fn client(&self) -> Arc<Client> {
        (*self.client.get()).clone()
    }

    fn locator(&self, client: &Client, name: &str) -> String {
        format!("{}/keys/{name}", client.vault())
    }

    fn name_of<'a>(&self, locator: &'a str) -> Result<&'a str, BackendError> {
        locator
            .rsplit_once("/keys/")
            .map(|(_, name)| name)
            .filter(|name| !name.is_empty() && !name.contains('/'))
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::Internal,
                    format!("{locator} is not a Key Vault key locator"),
                )
            })
    }

    /// Every key (or deleted key) of the vault, following `nextLink`.
    async fn list_all(&self, what: &'static str) -> Result<Vec<Listed>, BackendError> {
        let client = self.client();
        // No maxresults: the vault's default page is its largest (25).
        let path = format!("/{what}");
        let mut guard = PageGuard::new(format!("the {what} of {}", client.vault()));
        let mut page = client
            .call("list", Method::GET, &path, "the vault's keys", None)
            .await?;
        let mut out = Vec::new();
        loop {
            if let Some(items) = page.get("value").and_then(Value::as_array) {
                out.extend(items.iter().filter_map(Listed::parse));
            }
            let link = page
                .get("nextLink")
                .and_then(Value::as_str)
                .unwrap_or_default();
            match guard.next(link)? {
                None => return Ok(out),
                Some(link) => {
                    page = client
                        .call_url("list", Method::GET, &link, "the vault's keys", None)
                        .await?;
                }
            }
        }
    }

    /// Published keys of this server: both of SPIRE's tags ours, a SPIRE key name.
    fn is_own_published(&self, key: &Listed) -> bool {
        key.tag(TRUST_DOMAIN) == Some(self.trust_domain.as_str())
            && key.tag(SERVER_ID) == Some(self.server_id.as_str())
            && naming::key_id_of(&key.name).is_some()
    }

    /// The winner of each of this server's key ids, disabled ones included.
    fn own_winners<'a>(&self, keys: &'a [Listed]) -> HashMap<&'a str, &'a Listed> {
        winners(
            keys.iter()
                .filter(|k| self.is_own_published(k))
                .filter_map(|k| naming::key_id_of(&k.name).map(|id| (id, k))),
        )
    }

    /// The latest version of `name`: its handle and public key.
    async fn read(&self, name: &str) -> Result<Option<AzureKey>, BackendError> {
        let client = self.client();
        let locator = self.locator(&client, name);
        let answer = match client
            .call(
                "get",
                Method::GET,
                &format!("/keys/{name}/"),
                &locator,
                None,
            )
            .await
        {
            Ok(answer) => answer,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.error),
        };
        self.handle_from(&client, &answer).map(Some)
    }

    /// A handle from a key bundle (`{key: JWK, attributes}`).
    fn handle_from(&self, client: &Client, bundle: &Value) -> Result<AzureKey, BackendError> {
        let bad = |why: String| {
            BackendError::new(
                BackendErrorKind::Internal,
                format!("Key Vault's key bundle: {why}"),
            )
        };
        let jwk = bundle.get("key").ok_or_else(|| bad("no key".to_string()))?;
        let kid = jwk
            .get("kid")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no kid".to_string()))?;
        let mut parts = kid.split("/keys/").nth(1).unwrap_or_default().split('/');
        let (name, version) = match (parts.next(), parts.next()) {
            (Some(n), Some(v)) if !n.is_empty() && !v.is_empty() => (n, v),
            _ => return Err(bad(format!("kid {kid:?} names no key version"))),
        };
        let (key_type, spki) = jwk_public_key(jwk).map_err(|why| bad(format!("{kid}: {why}")))?;
        Ok(AzureKey {
            name: Arc::from(name),
            version: Arc::from(version),
            locator: Arc::from(self.locator(client, name)),
            created: bundle
                .pointer("/attributes/created")
                .and_then(Value::as_u64),
            public: Some((key_type, Arc::from(spki))),
        })
    }

    /// Soft-deletes `name`; a key already gone is fine.
    async fn remove(&self, name: &str) -> Result<(), BackendError> {
        let client = self.client();
        let locator = self.locator(&client, name);
        match client
            .call(
                "delete",
                Method::DELETE,
                &format!("/keys/{name}"),
                &locator,
                None,
            )
            .await
        {
            Err(e) if !e.is_not_found() => Err(e.error),
            _ => Ok(()),
        }
    }

    fn tags(&self, published: bool) -> Value {
        let mut tags = Map::new();
        let td_tag = if published { TRUST_DOMAIN } else { PENDING_TD };
        tags.insert(td_tag.into(), json!(self.trust_domain));
        tags.insert(SERVER_ID.into(), json!(self.server_id));
        Value::Object(tags)
    }

    /// Purges this server's soft-deleted keys the vault allows purging.
    async fn purge_own_deleted(&self) -> Result<(), BackendError> {
        let client = self.client();
        for key in self.list_all("deletedkeys").await? {
            let td = key.tag(TRUST_DOMAIN).or(key.tag(PENDING_TD));
            if td != Some(self.trust_domain.as_str())
                || key.tag(SERVER_ID) != Some(self.server_id.as_str())
                || naming::key_id_of(&key.name).is_none()
            {
                continue;
            }
            let path = format!("/deletedkeys/{}", key.name);
            match client
                .call("purge", Method::DELETE, &path, &key.name, None)
                .await
            {
                Ok(_) => tracing::info!(key = %key.name, "purged a soft-deleted key"),
                // Still being deleted (409), purge protection (403), already purged (404).
                Err(AzureError { error, .. }) => {
                    tracing::debug!(key = %key.name, %error, "soft-deleted key not purged now")
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for AzureBackend {
    type Handle = AzureKey;
    type Config = KmsConfig<Self>;

    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPABILITIES
    }

    async fn discover(&self) -> Result<Vec<StoredKey<AzureKey>>, BackendError> {
        let keys = self.list_all("keys").await?;
        let live = self.own_winners(&keys);
        for key in keys.iter().filter(|k| self.is_own_published(k)) {
            let Some(id) = naming::key_id_of(&key.name) else {
                continue;
            };
            if live.get(id).is_some_and(|w| w.name != key.name) {
                tracing::warn!(key_id = id, key = %key.name, "an older key of this id is left from an interrupted rotation; the newest is used and the sweep removes this one");
            }
        }
        let mut serve = Vec::new();
        for (id, key) in &live {
            if !key.enabled {
                tracing::warn!(key_id = *id, key = %key.name, "this server's key is disabled in the vault; the id is treated as absent and the next GenerateKey makes a new key");
                continue;
            }
            if let Ok(id) = KeyId::new(id) {
                serve.push((id, key.name.clone()));
            }
        }
        let loaded: Vec<Option<StoredKey<AzureKey>>> = stream::iter(serve)
            .map(|(id, name)| async move {
                Ok::<_, BackendError>(self.read(&name).await?.and_then(|handle| {
                    let (key_type, spki_der) = handle.public.clone()?;
                    Some(StoredKey {
                        id,
                        key_type,
                        spki_der,
                        handle,
                    })
                }))
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        Ok(loaded.into_iter().flatten().collect())
    }

    async fn prepare(
        &self,
        id: &KeyId,
        key_type: KeyType,
        replaces: Option<&StoredKey<AzureKey>>,
    ) -> Result<AzureKey, BackendError> {
        naming::check_key_id(id.as_str())
            .map_err(|why| BackendError::new(BackendErrorKind::InvalidArgument, why))?;
        // The newest creation second wins among duplicates: be in a later second than the
        // key this one replaces (only a rotation right after a creation ever waits).
        if let Some(created) = replaces.and_then(|r| r.handle.created) {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            let target = Duration::from_secs(created + 1);
            if now < target {
                tokio::time::sleep(target - now + Duration::from_millis(20)).await;
            }
        }
        let hsm = self.settings.get().protection == Protection::Hsm;
        let mut body = json!({
            "key_ops": ["sign", "verify"],
            "attributes": {"enabled": true},
            "tags": self.tags(false),
        });
        match key_type {
            KeyType::EcP256 | KeyType::EcP384 => {
                body["kty"] = json!(if hsm { "EC-HSM" } else { "EC" });
                body["crv"] = json!(if key_type == KeyType::EcP256 {
                    "P-256"
                } else {
                    "P-384"
                });
            }
            KeyType::Rsa2048 | KeyType::Rsa4096 => {
                body["kty"] = json!(if hsm { "RSA-HSM" } else { "RSA" });
                body["key_size"] = json!(if key_type == KeyType::Rsa2048 {
                    2048
                } else {
                    4096
                });
            }
        }
        let name = naming::key_name(id.as_str());
        let client = self.client();
        let answer = client
            .call(
                "create",
                Method::POST,
                &format!("/keys/{name}/create"),
                &name,
                Some(&body),
            )
            .await
            .map_err(|e| e.error.context(format!("creating key {name} for {id}")))?;
        self.handle_from(&client, &answer)
    }

    async fn public_key(&self, prepared: &AzureKey) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        if let Some(public) = &prepared.public {
            return Ok(public.clone());
        }
        let client = self.client();
        let answer = client
            .call(
                "get",
                Method::GET,
                &format!("/keys/{}/{}", prepared.name, prepared.version),
                &prepared.locator,
                None,
            )
            .await?;
        self.handle_from(&client, &answer)?.public.ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Internal,
                format!("{} has no public key", prepared.locator),
            )
        })
    }

    async fn publish(
        &self,
        new: &StoredKey<AzureKey>,
        _replaces: Option<&StoredKey<AzureKey>>,
    ) -> Result<(), BackendError> {
        // One PATCH: the tags are replaced as a whole, so the pending marker goes as SPIRE's
        // trust-domain tag arrives.
        self.client()
            .call(
                "update",
                Method::PATCH,
                &format!("/keys/{}/{}", new.handle.name, new.handle.version),
                new.locator(),
                Some(&json!({"tags": self.tags(true)})),
            )
            .await
            .map_err(|e| e.error.context(format!("publishing {}", new.locator())))?;
        Ok(())
    }

    async fn find(&self, id: &KeyId) -> Result<Option<String>, BackendError> {
        let keys = self.list_all("keys").await?;
        let client = self.client();
        Ok(self
            .own_winners(&keys)
            .get(id.as_str())
            .filter(|key| key.enabled)
            .map(|key| self.locator(&client, &key.name)))
    }

    async fn abort(&self, prepared: &AzureKey) -> Result<(), BackendError> {
        self.remove(&prepared.name).await
    }

    async fn retire(
        &self,
        replaced: &StoredKey<AzureKey>,
        _replaced_by: &StoredKey<AzureKey>,
    ) -> Result<(), BackendError> {
        self.remove(&replaced.handle.name).await
    }

    async fn sign(
        &self,
        key: &StoredKey<AzureKey>,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<BackendSignature, BackendError> {
        let alg = algorithm(scheme).ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!("Key Vault cannot sign {}", scheme.describe()),
            )
        })?;
        let answer = self
            .client()
            .call(
                "sign",
                Method::POST,
                &format!("/keys/{}/{}/sign", key.handle.name, key.handle.version),
                key.locator(),
                Some(&json!({"alg": alg, "value": b64url(digest.as_bytes())})),
            )
            .await?;
        let signature = answer
            .get("value")
            .and_then(Value::as_str)
            .and_then(unb64url)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::Internal,
                    format!(
                        "Key Vault's {alg} signature from {} is not base64url",
                        key.locator()
                    ),
                )
            })?;
        Ok(if key.key_type.is_rsa() {
            BackendSignature::Rsa(signature)
        } else {
            BackendSignature::EcdsaFixed(signature)
        })
    }

    async fn reconfigure(&self, config: &KmsConfig<Self>) -> Result<(), BackendError> {
        let client = Client::new(&config.backend)?;
        self.client.set(client);
        self.settings.set(config.backend.clone());
        Ok(())
    }
}

/// What an operator runs by hand (the CLI's `keys`): public keys by locator, enabling and
/// disabling (`attributes.enabled` on the latest version), and Key Vault's soft delete.
#[async_trait]
impl KeyOperator for AzureBackend {
    fn clock_url(&self) -> Option<String> {
        Some(self.client().vault().to_string())
    }

    async fn public_key_at(&self, locator: &str) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        self.read(self.name_of(locator)?)
            .await?
            .and_then(|key| key.public)
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::NotFound,
                    format!("{locator} is not in the vault"),
                )
            })
    }

    async fn set_enabled(&self, record: &KeyRecord, enabled: bool) -> Result<(), BackendError> {
        let name = self.name_of(&record.locator)?;
        let key = self.read(name).await?.ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::NotFound,
                format!("{} is not in the vault", record.locator),
            )
        })?;
        self.client()
            .call(
                "update",
                Method::PATCH,
                &format!("/keys/{}/{}", key.name, key.version),
                &record.locator,
                Some(&json!({"attributes": {"enabled": enabled}})),
            )
            .await
            .map(drop)
            .map_err(|e| e.error)
    }

    /// Credentials and the permissions README lists, by the reads the plugin makes: one page
    /// of the key listing (keys/list), then this server's keys (keys/get). Nothing is
    /// created, signed or deleted.
    async fn checks(&self) -> Vec<Check> {
        let client = self.client();
        let grant = |what: &str| {
            format!(
                "grant {what} on the vault to this identity (see README, azure_key_vault → required permissions)"
            )
        };
        let listed = client
            .call(
                "list",
                Method::GET,
                "/keys?maxresults=1",
                "the vault's keys",
                None,
            )
            .await;
        let mut checks = vec![match &listed {
            Ok(_) => Check::ok(
                "credentials and keys/list",
                format!(
                    "listed {} with a token from {}",
                    client.vault(),
                    client.credential_source()
                ),
            ),
            Err(e) => Check::fail(
                "credentials and keys/list",
                format!("{} (token from {})", e.error, client.credential_source()),
                grant(
                    "Keys: List, Get, Update, Create, Delete and Cryptographic Operations: Sign (e.g. the Key Vault Crypto User role)",
                ),
            ),
        }];
        if listed.is_ok() {
            let own = self.discover().await;
            checks.push(match own {
                Ok(keys) => Check::ok(
                    "keys/get",
                    format!("read {} key(s) of this server", keys.len()),
                ),
                Err(e) => Check::fail("keys/get", e.to_string(), grant("Keys: Get")),
            });
        }
        checks
    }

    fn deletion_window(&self) -> DeletionWindow {
        DeletionWindow::Scheduled {
            after: Duration::from_secs(90 * 86400),
            what: "Key Vault soft delete: recoverable for the vault's retention period, 7 to 90 days, 90 by default; RecoverDeletedKey undoes it",
        }
    }
}

#[async_trait]
impl KeyLifecycle for AzureBackend {
    type Handle = AzureKey;

    fn identity(&self) -> SweeperIdentity {
        SweeperIdentity {
            trust_domain: self.trust_domain.clone(),
            server_id: self.server_id.clone(),
        }
    }

    /// SPIRE's stamp: a no-op update of `key_ops` that bumps the key's `updated` time, so
    /// SPIRE's built-in servers sweeping the same vault see the key as alive (and ours read
    /// theirs the same way). Tags are not sent, so nothing else changes.
    async fn stamp(
        &self,
        keys: &[StoredKey<AzureKey>],
        _now: SystemTime,
    ) -> Result<(), BackendError> {
        let client = self.client();
        for key in keys {
            match client
                .call(
                    "update",
                    Method::PATCH,
                    &format!("/keys/{}/{}", key.handle.name, key.handle.version),
                    key.locator(),
                    Some(&json!({"key_ops": ["sign", "verify"]})),
                )
                .await
            {
                Err(e) if e.is_not_found() => {
                    tracing::warn!(key = %key.locator(), "a served key is gone from the vault; not stamped");
                }
                Err(e) => return Err(e.error.context("refreshing the liveness stamp")),
                Ok(_) => {}
            }
            keymanager_engine::failpoint!("stamp.after_key");
        }
        Ok(())
    }

    /// The trust domain's keys in SPIRE's naming: published ones (SPIRE's tags; the newest
    /// of each server's id is the published one) and prepared ones (our pending tag). A key
    /// with the trust-domain tag but no server-id tag carries no server id, so the rules
    /// never delete it. `updated` is the stamp. Reads only.
    async fn list(&self) -> Result<Vec<KeyRecord>, BackendError> {
        let keys = self.list_all("keys").await?;
        let client = self.client();
        let td = self.trust_domain.as_str();
        let in_td = |k: &Listed| {
            naming::key_id_of(&k.name).is_some()
                && (k.tag(TRUST_DOMAIN) == Some(td)
                    || (k.tag(TRUST_DOMAIN).is_none() && k.tag(PENDING_TD) == Some(td)))
        };
        let published: std::collections::HashSet<&str> = winners(
            keys.iter()
                .filter(|k| in_td(k) && k.tag(TRUST_DOMAIN) == Some(td))
                .filter_map(|k| {
                    let id = naming::key_id_of(&k.name)?;
                    Some(((k.tag(SERVER_ID).unwrap_or_default(), id), k))
                }),
        )
        .into_values()
        .map(|k| k.name.as_str())
        .collect();
        let mut out: Vec<KeyRecord> = keys
            .iter()
            .filter(|k| in_td(k))
            .map(|k| KeyRecord {
                locator: self.locator(&client, &k.name),
                trust_domain: Some(td.to_string()),
                server_id: k.tag(SERVER_ID).map(str::to_string),
                state: if k.enabled {
                    StoreKeyState::Enabled
                } else {
                    StoreKeyState::Disabled
                },
                key_id: naming::key_id_of(&k.name).map(str::to_string),
                published: published.contains(k.name.as_str()),
                // Junk (a year past 9999) is no evidence, as for every stamp.
                last_stamp: k.updated.and_then(|u| parse_stamp(&u.to_string())),
                created: at(k.created),
                deletion_intent: false,
                replaced: None,
                replaced_by: None,
            })
            .collect();
        out.sort_by(|a, b| a.locator.cmp(&b.locator));
        Ok(out)
    }

    async fn delete(&self, record: &KeyRecord) -> Result<(), BackendError> {
        let name = self.name_of(&record.locator)?;
        self.remove(name).await
    }

    async fn after_sweep(&self) -> Result<(), BackendError> {
        if self.settings.get().purge_deleted_keys {
            self.purge_own_deleted().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(name: &str, created: u64) -> Listed {
        Listed {
            name: name.into(),
            tags: HashMap::new(),
            enabled: true,
            created: Some(created),
            updated: Some(created),
        }
    }

    #[test]
    fn the_newest_then_the_larger_name_wins() {
        let keys = [listed("a", 10), listed("c", 20), listed("b", 20)];
        let best = winners(keys.iter().map(|k| ("id", k)));
        assert_eq!(best["id"].name, "c");
        let reversed = [listed("b", 20), listed("c", 20), listed("a", 10)];
        assert_eq!(winners(reversed.iter().map(|k| ("id", k)))["id"].name, "c");
    }

    #[test]
    fn jwks_become_spkis_of_the_right_type() {
        let ec =
            json!({"kty": "EC-HSM", "crv": "P-256", "x": b64url(&[1; 32]), "y": b64url(&[2; 31])});
        let (t, spki) = jwk_public_key(&ec).unwrap();
        assert_eq!(t, KeyType::EcP256);
        assert_eq!(spki.len(), 91);
        let mut n = vec![0xc0];
        n.extend([7; 511]);
        let rsa = json!({"kty": "RSA", "n": b64url(&n), "e": b64url(&[1, 0, 1])});
        assert_eq!(jwk_public_key(&rsa).unwrap().0, KeyType::Rsa4096);
        for bad in [
            json!({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}),
            json!({"kty": "RSA", "n": b64url(&[1; 384]), "e": "AQAB"}),
            json!({"kty": "oct"}),
            json!({"kty": "EC", "crv": "P-256", "x": "!!", "y": "AA"}),
        ] {
            assert!(jwk_public_key(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn list_items_parse_name_tags_and_times() {
        let item = json!({
            "kid": "https://v.vault.azure.net/keys/spire-key-x",
            "attributes": {"enabled": false, "created": 5, "updated": 9},
            "tags": {"spire-server-td": "example.org", "n": 1}
        });
        let k = Listed::parse(&item).unwrap();
        assert_eq!(k.name, "spire-key-x");
        assert!(!k.enabled);
        assert_eq!((k.created, k.updated), (Some(5), Some(9)));
        assert_eq!(k.tag("spire-server-td"), Some("example.org"));
        assert_eq!(k.tags.len(), 1, "non-string tags are ignored");
    }

    #[test]
    fn every_declared_scheme_has_a_key_vault_name() {
        for (t, f, h) in match CAPABILITIES.signing {
            SigningSupport::Only(list) => list,
            SigningSupport::Any => unreachable!(),
        } {
            let scheme = match f {
                keymanager_engine::SchemeFamily::Ecdsa => SignatureScheme::Ecdsa(*h),
                keymanager_engine::SchemeFamily::RsaPkcs1v15 => SignatureScheme::RsaPkcs1v15(*h),
                keymanager_engine::SchemeFamily::RsaPss => SignatureScheme::RsaPss {
                    hash: *h,
                    salt: keymanager_engine::PssSaltLength::EqualsHash,
                    salt_len: h.output_len(),
                },
            };
            assert!(algorithm(scheme).is_some(), "{t} {scheme:?}");
        }
    }
}
