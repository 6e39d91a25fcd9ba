//! The `gcp_kms` backend: one CryptoKey per SPIRE key id, rotation adds a CryptoKeyVersion,
//! every signature is a Cloud KMS `AsymmetricSign` over the digest.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use futures_util::future::join_all;
use google_cloud_kms_v1::model::crypto_key_version::{
    CryptoKeyVersionAlgorithm as Algorithm, CryptoKeyVersionState as State,
};
use google_cloud_kms_v1::model::{CryptoKey, CryptoKeyVersion};
use keymanager_engine::lifecycle::{KeyLifecycle, parse_stamp, stamp_text};
use keymanager_engine::settings::{Settings, SettingsError};
use keymanager_engine::sweep::{KeyRecord, StoreKeyState, SweeperIdentity};
use keymanager_engine::{
    Backend, BackendConfig, BackendError, BackendErrorKind, BackendFactory, BackendKey,
    BackendSignature, Capabilities, CoreConfig, Digest, HashAlgorithm, KeyHandle, KeyId, KeyType,
    PssSaltSupport, SchemeFamily, SignatureScheme, SigningSupport,
};

use crate::config::{GcpKmsConfig, SETTING_KEYS, SharedKeys};
use crate::kms::{self, Auth, ENABLED_FILTER, Kms, KmsError};
use crate::naming;

/// How long a new version may stay in PENDING_GENERATION (RSA-4096 and HSM keys take
/// minutes; SPIRE's ten quick tries give up, spiffe/spire#6923).
pub const GENERATION_BUDGET: Duration = Duration::from_secs(5 * 60);
const POLL_FIRST: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_secs(5);
/// The owner marker of shared keys in sweep records: no server owns them.
const SHARED_OWNER: &str = "<shared>";

/// A Cloud KMS version's algorithm fixes the hash: ECDSA with the curve's hash, RSA PKCS#1
/// v1.5 with SHA-256 (what this backend creates, like SPIRE's gcp_kms).
const SIGNING: &[(KeyType, SchemeFamily, HashAlgorithm)] = &[
    (KeyType::EcP256, SchemeFamily::Ecdsa, HashAlgorithm::Sha256),
    (KeyType::EcP384, SchemeFamily::Ecdsa, HashAlgorithm::Sha384),
    (
        KeyType::Rsa2048,
        SchemeFamily::RsaPkcs1v15,
        HashAlgorithm::Sha256,
    ),
    (
        KeyType::Rsa4096,
        SchemeFamily::RsaPkcs1v15,
        HashAlgorithm::Sha256,
    ),
];

const CAPABILITIES: Capabilities = Capabilities {
    key_types: &KeyType::ALL,
    signing: SigningSupport::Only(SIGNING),
    pss_salt: PssSaltSupport::HashLengthOnly,
    key_algorithm_name: Some(key_algorithm_name),
};

/// The Cloud KMS algorithm name a key type gets, for error messages.
fn key_algorithm_name(key_type: KeyType) -> &'static str {
    match key_type {
        KeyType::EcP256 => "EC_SIGN_P256_SHA256",
        KeyType::EcP384 => "EC_SIGN_P384_SHA384",
        KeyType::Rsa2048 => "RSA_SIGN_PKCS1_2048_SHA256",
        KeyType::Rsa4096 => "RSA_SIGN_PKCS1_4096_SHA256",
    }
}

/// Registers the `gcp_kms` backend.
pub struct GcpKmsFactory;

impl BackendFactory for GcpKmsFactory {
    fn name(&self) -> &'static str {
        "gcp_kms"
    }

    fn setting_keys(&self) -> &'static [&'static str] {
        SETTING_KEYS
    }

    fn manages_key_lifecycle(&self) -> bool {
        true
    }

    fn parse(
        &self,
        settings: &mut Settings,
        core: &CoreConfig,
    ) -> Result<Box<dyn BackendConfig>, SettingsError> {
        let config = GcpKmsConfig::parse(settings)?;
        Ok(Box::new(GcpBackendConfig {
            config,
            trust_domain: core.trust_domain.clone(),
        }))
    }
}

/// A validated configuration plus the trust domain.
#[derive(Debug)]
pub struct GcpBackendConfig {
    config: GcpKmsConfig,
    trust_domain: String,
}

#[async_trait]
impl BackendConfig for GcpBackendConfig {
    fn store_identity(&self) -> String {
        format!("gcp_kms:{}", self.config.key_ring)
    }

    fn problems(&self) -> Vec<String> {
        self.config.server_id.problems()
    }

    async fn open(&self) -> Result<Arc<dyn Backend>, BackendError> {
        Ok(Arc::new(
            GcpKmsBackend::open(&self.config, &self.trust_domain).await?,
        ))
    }
}

/// Which version of which CryptoKey a SPIRE key is.
#[derive(Clone, Debug)]
pub(crate) struct VersionRef {
    pub crypto_key: String,
    pub version: String,
    pub algorithm: Algorithm,
    pub shared: bool,
}

/// The backend.
pub struct GcpKmsBackend {
    pub(crate) kms: Kms,
    pub(crate) key_ring: String,
    pub(crate) td_hash: String,
    pub(crate) server_id: String,
    pub(crate) shared: Option<SharedKeys>,
    protection: crate::config::ProtectionLevel,
    key_policy: Option<serde_json::Value>,
    /// Shared versions this process has served from a GenerateKey (never held across I/O).
    generated: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl GcpKmsBackend {
    /// Resolves the server id and builds the client (no KMS call yet).
    pub async fn open(config: &GcpKmsConfig, trust_domain: &str) -> Result<Self, BackendError> {
        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        let server_id = config.server_id.resolve()?;
        let auth = match &config.service_account_file {
            Some(path) => Auth::ServiceAccountFile(path.clone()),
            None => Auth::ApplicationDefault,
        };
        let kms = Kms::connect(auth, config.endpoint.as_deref()).await?;
        tracing::info!(
            key_ring = %config.key_ring,
            server_id = %server_id,
            shared_keys = config.shared.as_ref().map(|s| s.template.source()).unwrap_or("off"),
            "gcp_kms backend ready"
        );
        Ok(Self {
            kms,
            key_ring: config.key_ring.clone(),
            td_hash: naming::trust_domain_hash(trust_domain),
            server_id,
            shared: config.shared.clone(),
            protection: config.protection_level,
            key_policy: config.key_policy.clone(),
            generated: Default::default(),
        })
    }

    /// Whether this process served `version` from a GenerateKey.
    pub(crate) fn generated_here(&self, version: &str) -> bool {
        self.generated.lock().is_ok_and(|set| set.contains(version))
    }

    pub(crate) fn remember_generated(&self, version: &str) {
        if let Ok(mut set) = self.generated.lock() {
            set.insert(version.to_string());
        }
    }

    /// True when `id` is served from a shared CryptoKey.
    pub(crate) fn is_shared(&self, id: &str) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.shared_key_ids.is_match(id))
    }

    pub(crate) fn crypto_key_name(&self, crypto_key_id: &str) -> String {
        format!("{}/cryptoKeys/{crypto_key_id}", self.key_ring)
    }

    /// Labels of a per-server CryptoKey.
    fn standard_labels(&self, now: SystemTime) -> HashMap<String, String> {
        HashMap::from([
            (naming::LABEL_TRUST_DOMAIN.into(), self.td_hash.clone()),
            (naming::LABEL_SERVER_ID.into(), self.server_id.clone()),
            (naming::LABEL_ACTIVE.into(), "true".into()),
            (naming::LABEL_LAST_UPDATE.into(), stamp_text(now)),
        ])
    }

    /// Labels of a shared CryptoKey: no owner, any server using it stamps it.
    pub(crate) fn shared_labels(&self, now: SystemTime) -> HashMap<String, String> {
        HashMap::from([
            (naming::LABEL_TRUST_DOMAIN.into(), self.td_hash.clone()),
            (naming::LABEL_SHARED.into(), "true".into()),
            (naming::LABEL_ACTIVE.into(), "true".into()),
            (naming::LABEL_LAST_UPDATE.into(), stamp_text(now)),
        ])
    }

    pub(crate) async fn ensure_policy(&self, crypto_key: &str) -> Result<(), BackendError> {
        self.kms
            .ensure_policy(crypto_key, self.key_policy.as_ref())
            .await
    }

    pub(crate) async fn create_crypto_key(
        &self,
        crypto_key_id: &str,
        algorithm: Algorithm,
        labels: HashMap<String, String>,
        skip_initial_version: bool,
    ) -> Result<CryptoKey, KmsError> {
        self.kms
            .create_crypto_key(
                &self.key_ring,
                crypto_key_id,
                algorithm,
                self.protection,
                labels,
                skip_initial_version,
            )
            .await
    }

    /// Waits until `version` leaves PENDING_GENERATION (time-based backoff inside
    /// [`GENERATION_BUDGET`]) and returns it as a key of `id`.
    pub(crate) async fn await_key(
        &self,
        id: &KeyId,
        version: &str,
        shared: bool,
    ) -> Result<BackendKey, BackendError> {
        let started = Instant::now();
        let mut pause = POLL_FIRST;
        loop {
            match self.kms.public_key(version).await {
                Ok(public) => return self.key_from(id, version, public, shared),
                Err(e) if e.failed_precondition() => {}
                Err(e) => return Err(e.into()),
            }
            // ENABLED between the two calls: the next public-key read succeeds (after the
            // pause, so a service answering inconsistently is not hammered).
            let state = self.kms.get_version(version).await?.state;
            match state {
                State::PendingGeneration | State::Enabled => {}
                other => {
                    return Err(BackendError::new(
                        BackendErrorKind::FailedPrecondition,
                        format!("CryptoKeyVersion {version} is {other:?}, not ENABLED"),
                    ));
                }
            }
            if started.elapsed() + pause > GENERATION_BUDGET {
                return Err(BackendError::new(
                    BackendErrorKind::Unavailable,
                    format!(
                        "CryptoKeyVersion {version} is still PENDING_GENERATION after {}s",
                        started.elapsed().as_secs()
                    ),
                ));
            }
            tracing::debug!(
                version,
                wait_ms = pause.as_millis() as u64,
                "version still being generated"
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    fn key_from(
        &self,
        id: &KeyId,
        version: &str,
        public: kms::FetchedPublicKey,
        shared: bool,
    ) -> Result<BackendKey, BackendError> {
        let key_type = kms::key_type_of(&public.algorithm).ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::FailedPrecondition,
                format!(
                    "CryptoKeyVersion {version} has algorithm {:?}, which no SPIRE key type uses",
                    public.algorithm
                ),
            )
        })?;
        Ok(BackendKey {
            id: id.clone(),
            key_type,
            spki_der: public.spki_der.into(),
            handle: KeyHandle::new(
                version.to_string(),
                VersionRef {
                    crypto_key: kms::crypto_key_of(version).to_string(),
                    version: version.to_string(),
                    algorithm: public.algorithm,
                    shared,
                },
            ),
        })
    }

    /// The newest ENABLED version of a CryptoKey, as a key of `id`.
    async fn load_newest(
        &self,
        id: KeyId,
        crypto_key: &str,
        shared: bool,
    ) -> Result<Option<BackendKey>, BackendError> {
        let versions = self.kms.list_versions(crypto_key, ENABLED_FILTER).await?;
        let Some(newest) = versions
            .iter()
            .filter(|v| v.state == State::Enabled && kms::key_type_of(&v.algorithm).is_some())
            .max_by_key(|v| kms::version_number(&v.name))
        else {
            return Ok(None);
        };
        let public = self.kms.public_key(&newest.name).await?;
        self.key_from(&id, &newest.name, public, shared).map(Some)
    }

    /// Standard mode: a new CryptoKey, or a new version of the existing one.
    async fn create_standard(
        &self,
        id: &KeyId,
        key_type: KeyType,
        replaces: Option<&VersionRef>,
    ) -> Result<BackendKey, BackendError> {
        let crypto_key_id = naming::standard_crypto_key_id(&self.server_id, id.as_str());
        naming::check_crypto_key_id(&crypto_key_id).map_err(|reason| {
            BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!("key id {:?} cannot name a CryptoKey: {reason}", id.as_str()),
            )
        })?;
        let algorithm = kms::algorithm_for(key_type);
        let name = self.crypto_key_name(&crypto_key_id);
        if let Some(current) = replaces
            && current.crypto_key == name
        {
            if current.algorithm != algorithm {
                let key = self.kms.get_crypto_key(&name).await?;
                self.kms.set_template_algorithm(&key, algorithm).await?;
            }
            let version = self.kms.create_version(&name).await?;
            return self.await_key(id, &version.name, false).await;
        }
        let labels = self.standard_labels(SystemTime::now());
        match self
            .create_crypto_key(&crypto_key_id, algorithm.clone(), labels.clone(), false)
            .await
        {
            Ok(key) => {
                self.ensure_policy(&key.name).await?;
                let version = format!("{}/cryptoKeyVersions/1", key.name);
                self.await_key(id, &version, false).await
            }
            Err(e) if e.already_exists() => {
                // Left by an earlier run (inactive, no enabled version, or a crash after
                // creation): take it over with a fresh version.
                let key = self.kms.get_crypto_key(&name).await?;
                if key.labels.get(naming::LABEL_ACTIVE).map(String::as_str) != Some("true") {
                    let mut merged = key.labels.clone();
                    merged.extend(labels);
                    self.kms.set_labels(&key, merged).await?;
                }
                if key.version_template.as_ref().map(|t| &t.algorithm) != Some(&algorithm) {
                    self.kms.set_template_algorithm(&key, algorithm).await?;
                }
                self.ensure_policy(&name).await?;
                let version = self.kms.create_version(&name).await?;
                self.await_key(id, &version.name, false).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Marks a CryptoKey inactive when none of its versions is enabled any more.
    async fn deactivate_if_empty(&self, crypto_key: &str) -> Result<(), BackendError> {
        let enabled = self.kms.list_versions(crypto_key, ENABLED_FILTER).await?;
        if enabled.iter().any(|v| v.state == State::Enabled) {
            return Ok(());
        }
        let key = self.kms.get_crypto_key(crypto_key).await?;
        self.set_inactive(&key).await
    }

    async fn set_inactive(&self, key: &CryptoKey) -> Result<(), BackendError> {
        if key.labels.get(naming::LABEL_ACTIVE).map(String::as_str) == Some("false") {
            return Ok(());
        }
        let mut labels = key.labels.clone();
        labels.insert(naming::LABEL_ACTIVE.into(), "false".into());
        self.kms.set_labels(key, labels).await?;
        tracing::info!(crypto_key = %key.name, "CryptoKey has no enabled version: marked inactive");
        Ok(())
    }

    /// Standard discovery: this server's active CryptoKeys.
    async fn discover_standard(&self) -> Result<Vec<(KeyId, String)>, BackendError> {
        let filter = format!(
            "labels.{} = {} AND labels.{} = {} AND labels.{} = true",
            naming::LABEL_TRUST_DOMAIN,
            self.td_hash,
            naming::LABEL_SERVER_ID,
            self.server_id,
            naming::LABEL_ACTIVE
        );
        let keys = self.kms.list_crypto_keys(&self.key_ring, &filter).await?;
        Ok(keys
            .into_iter()
            .filter_map(|key| {
                let crypto_key_id = naming::last_segment(&key.name);
                let id = naming::key_id_from_standard(crypto_key_id, &self.server_id)?;
                if self.is_shared(&id) {
                    tracing::info!(crypto_key = %key.name, "per-server key of a key id that is shared now; not used");
                    return None;
                }
                KeyId::new(&id).ok().map(|id| (id, key.name))
            })
            .collect())
    }

    /// Shared discovery: active shared CryptoKeys of this trust domain, found by the regex.
    async fn discover_shared(
        &self,
        shared: &SharedKeys,
    ) -> Result<Vec<(KeyId, String)>, BackendError> {
        let filter = format!(
            "labels.{} = {} AND labels.{} = true AND labels.{} = true",
            naming::LABEL_TRUST_DOMAIN,
            self.td_hash,
            naming::LABEL_SHARED,
            naming::LABEL_ACTIVE
        );
        let keys = self.kms.list_crypto_keys(&self.key_ring, &filter).await?;
        Ok(keys
            .into_iter()
            .filter_map(|key| {
                let crypto_key_id = naming::last_segment(&key.name);
                let id = naming::extract_key_id(&shared.key_id_regex, crypto_key_id)?;
                // Only what this configuration would name itself: same template, same key ids.
                let named = shared.template.render(&self.td_hash, &id).ok()?;
                if named != crypto_key_id || !shared.shared_key_ids.is_match(&id) {
                    tracing::debug!(crypto_key = %key.name, "shared CryptoKey not named by this configuration; ignored");
                    return None;
                }
                KeyId::new(&id).ok().map(|id| (id, key.name))
            })
            .collect())
    }
}

#[async_trait]
impl Backend for GcpKmsBackend {
    fn name(&self) -> &'static str {
        "gcp_kms"
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPABILITIES
    }

    async fn load_keys(&self) -> Result<Vec<BackendKey>, BackendError> {
        let mut found: Vec<(KeyId, String, bool)> = self
            .discover_standard()
            .await?
            .into_iter()
            .map(|(id, key)| (id, key, false))
            .collect();
        if let Some(shared) = &self.shared {
            found.extend(
                self.discover_shared(shared)
                    .await?
                    .into_iter()
                    .map(|(id, key)| (id, key, true)),
            );
        }
        let loaded = join_all(
            found
                .into_iter()
                .map(|(id, key, shared)| async move { self.load_newest(id, &key, shared).await }),
        )
        .await;
        let mut keys = Vec::new();
        for result in loaded {
            if let Some(key) = result? {
                keys.push(key);
            }
        }
        Ok(keys)
    }

    async fn create_key(
        &self,
        id: &KeyId,
        key_type: KeyType,
        replaces: Option<&BackendKey>,
    ) -> Result<BackendKey, BackendError> {
        let current = match replaces {
            Some(key) => Some(key.handle.get::<VersionRef>(self.name())?),
            None => None,
        };
        if self.is_shared(id.as_str()) {
            crate::shared::rotate(self, id, key_type, current).await
        } else {
            self.create_standard(id, key_type, current).await
        }
    }

    async fn sign(
        &self,
        key: &BackendKey,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<BackendSignature, BackendError> {
        let version = key.handle.get::<VersionRef>(self.name())?;
        let signature = self.kms.sign(&version.version, digest).await?;
        Ok(match scheme {
            SignatureScheme::Ecdsa(_) => BackendSignature::EcdsaDer(signature),
            SignatureScheme::RsaPkcs1v15(_) | SignatureScheme::RsaPss { .. } => {
                BackendSignature::Rsa(signature)
            }
        })
    }

    async fn retire_key(&self, replaced: &BackendKey) -> Result<(), BackendError> {
        let version = replaced.handle.get::<VersionRef>(self.name())?;
        if version.shared {
            // Other servers may still sign with it; the sweep destroys superseded shared
            // versions once they have been superseded for longer than the stale threshold.
            tracing::debug!(version = %version.version, "shared version kept for other servers");
            return Ok(());
        }
        match self.kms.destroy_version(&version.version).await {
            Ok(destroyed) => {
                tracing::info!(version = %version.version, destroy_time = ?destroyed.destroy_time.map(|t| t.seconds()), "replaced CryptoKeyVersion scheduled for destruction");
                Ok(())
            }
            Err(e) if e.not_found() || e.failed_precondition() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn lifecycle(&self) -> Option<&dyn KeyLifecycle> {
        Some(self)
    }
}

#[async_trait]
impl KeyLifecycle for GcpKmsBackend {
    fn identity(&self) -> SweeperIdentity {
        SweeperIdentity {
            trust_domain: self.td_hash.clone(),
            server_id: self.server_id.clone(),
        }
    }

    async fn stamp(&self, keys: &[BackendKey], now: SystemTime) -> Result<(), BackendError> {
        let mut crypto_keys: Vec<&str> = keys
            .iter()
            .filter_map(|k| k.handle.downcast::<VersionRef>())
            .map(|v| v.crypto_key.as_str())
            .collect();
        crypto_keys.sort_unstable();
        crypto_keys.dedup();
        let stamp = stamp_text(now);
        for name in crypto_keys {
            // The update mask replaces the whole label map: read, change one label, write.
            let key = self.kms.get_crypto_key(name).await?;
            let mut labels = key.labels.clone();
            labels.insert(naming::LABEL_LAST_UPDATE.into(), stamp.clone());
            labels.insert(naming::LABEL_ACTIVE.into(), "true".into());
            self.kms.set_labels(&key, labels).await?;
        }
        Ok(())
    }

    async fn list_trust_domain_keys(&self) -> Result<Vec<KeyRecord>, BackendError> {
        let filter = format!("labels.{} = {}", naming::LABEL_TRUST_DOMAIN, self.td_hash);
        let keys = self.kms.list_crypto_keys(&self.key_ring, &filter).await?;
        let mut records = Vec::new();
        for key in keys {
            if key.labels.contains_key(naming::LABEL_LOCK) {
                continue;
            }
            let mut enabled: Vec<CryptoKeyVersion> = self
                .kms
                .list_versions(&key.name, ENABLED_FILTER)
                .await?
                .into_iter()
                .filter(|v| v.state == State::Enabled)
                .collect();
            if enabled.is_empty() {
                self.set_inactive(&key).await?;
                continue;
            }
            enabled.sort_by_key(|v| kms::version_number(&v.name));
            records.extend(version_records(&key, &enabled));
        }
        Ok(records)
    }

    async fn delete(&self, locator: &str) -> Result<(), BackendError> {
        match self.kms.destroy_version(locator).await {
            Ok(_) => {}
            Err(e) if e.not_found() || e.failed_precondition() => {}
            Err(e) => return Err(e.into()),
        }
        self.deactivate_if_empty(kms::crypto_key_of(locator)).await
    }
}

/// Sweep records for the enabled versions of one CryptoKey (sorted oldest first). The newest
/// carries the key's labels; a superseded version counts as inactive, and its liveness
/// evidence is the moment it was superseded (the next version's creation).
fn version_records(key: &CryptoKey, enabled: &[CryptoKeyVersion]) -> Vec<KeyRecord> {
    let label = |name: &str| key.labels.get(name).cloned();
    let shared = label(naming::LABEL_SHARED).as_deref() == Some("true");
    let owner = if shared {
        Some(SHARED_OWNER.to_string())
    } else {
        label(naming::LABEL_SERVER_ID)
    };
    let stamp = label(naming::LABEL_LAST_UPDATE).and_then(|v| parse_stamp(&v));
    enabled
        .iter()
        .enumerate()
        .map(|(i, version)| {
            let next = enabled.get(i + 1);
            KeyRecord {
                locator: version.name.clone(),
                trust_domain: label(naming::LABEL_TRUST_DOMAIN),
                server_id: owner.clone(),
                state: StoreKeyState::Enabled,
                active: next.is_none() && label(naming::LABEL_ACTIVE).as_deref() == Some("true"),
                last_stamp: match next {
                    None => stamp,
                    Some(next) => kms::to_system_time(next.create_time.as_ref()),
                },
                created: kms::to_system_time(version.create_time.as_ref()),
                deletion_intent: false,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use google_cloud_wkt::Timestamp;
    use keymanager_engine::sweep::{SweepPolicy, plan_sweep};

    use super::*;

    const DAY: i64 = 86_400;
    const NOW: i64 = 1_800_000_000;

    fn key(labels: &[(&str, &str)]) -> CryptoKey {
        CryptoKey::new()
            .set_name("projects/p/locations/l/keyRings/r/cryptoKeys/k")
            .set_labels(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    fn version(n: u64, created: i64) -> CryptoKeyVersion {
        CryptoKeyVersion::new()
            .set_name(format!(
                "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/{n}"
            ))
            .set_state(State::Enabled)
            .set_create_time(Timestamp::clamp(created, 0))
    }

    fn decide(key: &CryptoKey, versions: &[CryptoKeyVersion], me: &str) -> Vec<bool> {
        let records = version_records(key, versions);
        let identity = SweeperIdentity {
            trust_domain: "td".into(),
            server_id: me.into(),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW as u64);
        plan_sweep(
            now,
            &identity,
            &HashSet::new(),
            &records,
            SweepPolicy::default(),
        )
        .iter()
        .map(|d| d.is_delete())
        .collect()
    }

    #[test]
    fn another_servers_stale_key_is_destroyed_a_fresh_one_kept() {
        let stale = (NOW - 15 * DAY).to_string();
        let k = key(&[
            (naming::LABEL_TRUST_DOMAIN, "td"),
            (naming::LABEL_SERVER_ID, "other"),
            (naming::LABEL_ACTIVE, "true"),
            (naming::LABEL_LAST_UPDATE, &stale),
        ]);
        assert_eq!(decide(&k, &[version(1, NOW - 30 * DAY)], "me"), [true]);
        let fresh = (NOW - DAY).to_string();
        let k = key(&[
            (naming::LABEL_TRUST_DOMAIN, "td"),
            (naming::LABEL_SERVER_ID, "other"),
            (naming::LABEL_ACTIVE, "true"),
            (naming::LABEL_LAST_UPDATE, &fresh),
        ]);
        assert_eq!(decide(&k, &[version(1, NOW - 30 * DAY)], "me"), [false]);
    }

    #[test]
    fn shared_superseded_versions_live_until_superseded_for_the_stale_age() {
        let fresh = (NOW - 3600).to_string();
        let k = key(&[
            (naming::LABEL_TRUST_DOMAIN, "td"),
            (naming::LABEL_SHARED, "true"),
            (naming::LABEL_ACTIVE, "true"),
            (naming::LABEL_LAST_UPDATE, &fresh),
        ]);
        // v1 superseded 20 days ago, v2 superseded 2 days ago, v3 newest and stamped.
        let versions = [
            version(1, NOW - 40 * DAY),
            version(2, NOW - 20 * DAY),
            version(3, NOW - 2 * DAY),
        ];
        assert_eq!(decide(&k, &versions, "me"), [true, false, false]);
    }

    #[test]
    fn own_superseded_version_left_by_a_crash_is_cleaned_after_the_grace_period() {
        let fresh = (NOW - 3600).to_string();
        let k = key(&[
            (naming::LABEL_TRUST_DOMAIN, "td"),
            (naming::LABEL_SERVER_ID, "me"),
            (naming::LABEL_ACTIVE, "true"),
            (naming::LABEL_LAST_UPDATE, &fresh),
        ]);
        let versions = [version(1, NOW - 3 * DAY), version(2, NOW - 2 * DAY)];
        // The newest is the server's own active key with a fresh stamp: kept.
        assert_eq!(decide(&k, &versions, "me"), [true, false]);
    }
}
