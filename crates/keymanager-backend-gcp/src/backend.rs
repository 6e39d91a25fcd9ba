//! The `gcp_kms` adapter: one CryptoKey per SPIRE key id, rotation adds a CryptoKeyVersion,
//! every signature is a Cloud KMS `AsymmetricSign` over the digest.
//!
//! Two-phase creation on Cloud KMS:
//! - a new id: *prepare* creates the CryptoKey labelled `spire-active=false` (discovery
//!   filters on `spire-active = true`, so it is not found) with its first version; *publish*
//!   labels it active;
//! - a rotation: *prepare* adds a version. Cloud KMS cannot create a version that the
//!   newest-enabled rule ignores, so the version is found once ENABLED: publishing and
//!   preparing coincide, and *abort* (destroying the version) is what undoes it;
//! - shared keys: *prepare* rotates under the lock (`shared`), the version is everyone's.
//!
//! *retire* schedules the replaced version's destruction (shared versions are left to the
//! sweep, since other servers may still sign with them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::future::join_all;
use google_cloud_kms_v1::model::crypto_key_version::{
    CryptoKeyVersionAlgorithm as Algorithm, CryptoKeyVersionState as State,
};
use google_cloud_kms_v1::model::{CryptoKey, CryptoKeyVersion};
use keymanager_engine::kit::shared::{LockSightings, SharedKeys, SharedRotation, SystemClock};
use keymanager_engine::kit::swap::Swap;
use keymanager_engine::kit::wrap;
use keymanager_engine::kit::{KmsAdapter, KmsConfig};
use keymanager_engine::lifecycle::{
    KeyLifecycle, KeyRecord, StoreKeyState, SweeperIdentity, parse_stamp, stamp_text,
};
use keymanager_engine::{
    Backend, BackendError, BackendErrorKind, BackendSignature, Capabilities, Digest, HashAlgorithm,
    KeyHandle, KeyId, KeyType, PrivateKeyMaterial, PssSaltSupport, SchemeFamily, SignatureScheme,
    SigningSupport, StoredKey,
};

use crate::config::{GcpKmsSettings, ProtectionLevel};
use crate::kms::{self, ATTEMPT_TIMEOUT, Auth, ENABLED_FILTER, Kms, KmsError};
use crate::naming;
use crate::shared::GcpShared;

/// How long a new version may stay in PENDING_GENERATION (RSA-4096 and HSM keys take
/// minutes; SPIRE's ten quick tries give up, spiffe/spire#6923).
pub const GENERATION_BUDGET: Duration = Duration::from_secs(5 * 60);
const POLL_FIRST: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_secs(5);
/// How often a server waiting for a shared rotation looks for the holder's version.
const SHARED_POLL: Duration = Duration::from_millis(200);
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

/// Which version of which CryptoKey a SPIRE key is.
#[derive(Clone, Debug)]
pub struct GcpKey {
    version: Arc<str>,
    crypto_key: Arc<str>,
    algorithm: Algorithm,
    shared: bool,
    /// Prepared in a new CryptoKey, which publish labels active.
    activate: bool,
    /// The labels this process created that CryptoKey with (publish then needs no read).
    created_labels: Option<Arc<HashMap<String, String>>>,
}

impl GcpKey {
    fn new(version: &str, algorithm: Algorithm, shared: bool, activate: bool) -> Self {
        Self {
            version: Arc::from(version),
            crypto_key: Arc::from(kms::crypto_key_of(version)),
            algorithm,
            shared,
            activate,
            created_labels: None,
        }
    }
}

impl KeyHandle for GcpKey {
    fn locator(&self) -> &str {
        &self.version
    }
}

/// What keys created from now on get; replaced by a re-Configure.
#[derive(Debug)]
struct NewKeys {
    protection: ProtectionLevel,
    policy: Option<serde_json::Value>,
}

/// The backend.
pub struct GcpKmsBackend {
    kms: Swap<Kms>,
    /// The Cloud KMS endpoint (for `doctor`'s clock check).
    pub(crate) service_url: String,
    pub(crate) key_ring: String,
    td_hash: String,
    server_id: String,
    shared: Option<SharedKeys>,
    /// `clock_skew_allowance`: also how long after a lock's lease a waiter takes over.
    skew: Duration,
    new_keys: Swap<NewKeys>,
    /// Per shared CryptoKey, the highest version number this process served from a
    /// GenerateKey: bounded by the number of shared keys. Never held across I/O.
    served: Mutex<HashMap<String, u64>>,
    /// First sightings of rotation locks (only used where no lease end is recorded).
    sightings: LockSightings,
    /// The ImportJob the last import used, so the keys of one `keys migrate` share one
    /// lookup. Never held across I/O.
    import_job: Mutex<Option<CachedImportJob>>,
}

/// An ImportJob known to be ACTIVE, with its DER wrapping key.
#[derive(Clone)]
struct CachedImportJob {
    name: String,
    wrapping_key: Arc<[u8]>,
    protection: ProtectionLevel,
    /// Reused until then.
    until: SystemTime,
}

fn auth(settings: &GcpKmsSettings) -> Auth {
    match &settings.service_account_file {
        Some(file) => Auth::ServiceAccountFile(file.path.clone()),
        None => Auth::ApplicationDefault,
    }
}

#[async_trait]
impl KmsAdapter for GcpKmsBackend {
    const NAME: &'static str = "gcp_kms";
    type Settings = GcpKmsSettings;

    async fn open(config: &KmsConfig<Self>, server_id: String) -> Result<Self, BackendError> {
        let settings = &config.backend;
        let kms =
            Kms::connect(auth(settings), config.endpoint.as_ref().map(|e| e.as_str())).await?;
        tracing::info!(
            key_ring = %settings.key_ring,
            server_id = %server_id,
            shared_keys = settings.shared.as_ref().map(|s| s.template.source()).unwrap_or("off"),
            "gcp_kms backend ready"
        );
        Ok(Self {
            kms: Swap::new(kms),
            service_url: config.endpoint.as_ref().map_or_else(
                || "https://cloudkms.googleapis.com".to_string(),
                |e| e.as_str().to_string(),
            ),
            key_ring: settings.key_ring.clone(),
            td_hash: naming::trust_domain_hash(&config.trust_domain),
            server_id,
            shared: settings.shared.clone(),
            skew: config.schedule.policy.max_clock_skew,
            new_keys: Swap::new(NewKeys {
                protection: settings.protection_level,
                policy: settings.key_policy.as_ref().map(|(_, p)| p.clone()),
            }),
            served: Mutex::new(HashMap::new()),
            sightings: LockSightings::default(),
            import_job: Mutex::new(None),
        })
    }
}

impl GcpKmsBackend {
    pub(crate) fn kms(&self) -> Arc<Kms> {
        self.kms.get()
    }

    fn new_keys(&self) -> Arc<NewKeys> {
        self.new_keys.get()
    }

    /// True when `id` is served from a shared CryptoKey.
    fn is_shared(&self, id: &str) -> bool {
        self.shared.as_ref().is_some_and(|s| s.is_shared(id))
    }

    pub(crate) fn crypto_key_name(&self, crypto_key_id: &str) -> String {
        format!("{}/cryptoKeys/{crypto_key_id}", self.key_ring)
    }

    /// The CryptoKey that holds `id`, and whether it is shared.
    fn crypto_key_for(&self, id: &KeyId) -> Result<(String, bool), BackendError> {
        if let Some(shared) = self.shared.as_ref().filter(|_| self.is_shared(id.as_str())) {
            let crypto_key_id = naming::render_shared(&shared.template, &self.td_hash, id.as_str())
                .map_err(|reason| BackendError::new(BackendErrorKind::InvalidArgument, reason))?;
            return Ok((self.crypto_key_name(&crypto_key_id), true));
        }
        let crypto_key_id = naming::standard_crypto_key_id(&self.server_id, id.as_str());
        naming::check_crypto_key_id(&crypto_key_id).map_err(|reason| {
            BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!("key id {:?} cannot name a CryptoKey: {reason}", id.as_str()),
            )
        })?;
        Ok((self.crypto_key_name(&crypto_key_id), false))
    }

    /// Labels of a per-server CryptoKey; `active` is false until publish.
    fn standard_labels(&self, now: SystemTime, active: bool) -> HashMap<String, String> {
        HashMap::from([
            (naming::LABEL_TRUST_DOMAIN.into(), self.td_hash.clone()),
            (naming::LABEL_SERVER_ID.into(), self.server_id.clone()),
            (naming::LABEL_ACTIVE.into(), active.to_string()),
            (naming::LABEL_LAST_UPDATE.into(), stamp_text(now)),
        ])
    }

    /// Labels of a shared CryptoKey: no owner, any server using it stamps it.
    fn shared_labels(&self, now: SystemTime) -> HashMap<String, String> {
        HashMap::from([
            (naming::LABEL_TRUST_DOMAIN.into(), self.td_hash.clone()),
            (naming::LABEL_SHARED.into(), "true".into()),
            (naming::LABEL_ACTIVE.into(), "true".into()),
            (naming::LABEL_LAST_UPDATE.into(), stamp_text(now)),
        ])
    }

    /// Whether a CryptoKey's labels say it is this server's (or a shared key of this trust
    /// domain): the guard before any label write.
    fn owns(&self, labels: &HashMap<String, String>) -> bool {
        let label = |name: &str| labels.get(name).map(String::as_str);
        label(naming::LABEL_TRUST_DOMAIN) == Some(self.td_hash.as_str())
            && (label(naming::LABEL_SERVER_ID) == Some(self.server_id.as_str())
                || label(naming::LABEL_SHARED) == Some("true"))
            && label(naming::LABEL_LOCK).is_none()
    }

    async fn ensure_policy(&self, crypto_key: &str) -> Result<(), BackendError> {
        let policy = self.new_keys().policy.clone();
        self.kms().ensure_policy(crypto_key, policy.as_ref()).await
    }

    pub(crate) async fn create_crypto_key(
        &self,
        crypto_key_id: &str,
        algorithm: Algorithm,
        labels: HashMap<String, String>,
        skip_initial_version: bool,
    ) -> Result<CryptoKey, KmsError> {
        let protection = self.new_keys().protection;
        self.kms()
            .create_crypto_key(
                &self.key_ring,
                crypto_key_id,
                algorithm,
                protection,
                labels,
                skip_initial_version,
            )
            .await
    }

    /// Waits until `version` leaves PENDING_GENERATION (time-based backoff inside
    /// [`GENERATION_BUDGET`]) and returns its public key.
    async fn await_key(&self, version: &str) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        let kms = self.kms();
        let started = tokio::time::Instant::now();
        let mut pause = POLL_FIRST;
        loop {
            match kms.public_key(version).await {
                Ok(public) => return key_type_and_spki(version, public),
                Err(e) if e.failed_precondition() => {}
                Err(e) => return Err(e.into()),
            }
            // ENABLED between the two calls: the next public-key read succeeds (after the
            // pause, so a service answering inconsistently is not hammered).
            let state = kms.get_version(version).await?.state;
            match state {
                State::PendingGeneration | State::PendingImport | State::Enabled => {}
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

    /// The newest ENABLED version of a CryptoKey that a SPIRE key type can use.
    async fn newest_enabled(
        &self,
        crypto_key: &str,
    ) -> Result<Option<CryptoKeyVersion>, BackendError> {
        let versions = self.kms().list_versions(crypto_key, ENABLED_FILTER).await?;
        Ok(versions
            .into_iter()
            .filter(|v| v.state == State::Enabled && kms::key_type_of(&v.algorithm).is_some())
            .max_by_key(|v| kms::version_number(&v.name)))
    }

    /// The newest ENABLED version of a CryptoKey, as a key of `id`.
    async fn load_newest(
        &self,
        id: KeyId,
        crypto_key: &str,
        shared: bool,
    ) -> Result<Option<StoredKey<GcpKey>>, BackendError> {
        let Some(newest) = self.newest_enabled(crypto_key).await? else {
            return Ok(None);
        };
        let public = self.kms().public_key(&newest.name).await?;
        let algorithm = public.algorithm.clone();
        let (key_type, spki_der) = key_type_and_spki(&newest.name, public)?;
        Ok(Some(StoredKey {
            id,
            key_type,
            spki_der,
            handle: GcpKey::new(&newest.name, algorithm, shared, false),
        }))
    }

    /// Standard mode: the first version of a new (inactive) CryptoKey, or a new version of
    /// the existing one.
    async fn prepare_standard(
        &self,
        name: &str,
        key_type: KeyType,
        replaces: Option<&GcpKey>,
    ) -> Result<GcpKey, BackendError> {
        let kms = self.kms();
        let algorithm = kms::algorithm_for(key_type);
        if let Some(current) = replaces
            && *current.crypto_key == *name
        {
            if current.algorithm != algorithm {
                let key = kms.get_crypto_key(name).await?;
                kms.set_template_algorithm(&key, algorithm.clone()).await?;
            }
            let version = kms.create_version(name).await?;
            return Ok(GcpKey::new(&version.name, algorithm, false, false));
        }
        let crypto_key_id = naming::last_segment(name);
        let labels = self.standard_labels(SystemTime::now(), false);
        match self
            .create_crypto_key(crypto_key_id, algorithm.clone(), labels.clone(), false)
            .await
        {
            Ok(key) => {
                self.ensure_policy(&key.name).await?;
                let version = format!("{}/cryptoKeyVersions/1", key.name);
                let mut prepared = GcpKey::new(&version, algorithm, false, true);
                prepared.created_labels = Some(Arc::new(labels));
                Ok(prepared)
            }
            Err(e) if e.already_exists() => {
                // Left by an earlier run (inactive, no enabled version, or a crash after
                // creation), or SPIRE's built-in's: take it over with a fresh version.
                let key = kms.get_crypto_key(name).await?;
                let active =
                    key.labels.get(naming::LABEL_ACTIVE).map(String::as_str) == Some("true");
                if !active {
                    let mut merged = key.labels.clone();
                    merged.extend(self.standard_labels(SystemTime::now(), false));
                    kms.set_labels(&key, merged).await?;
                }
                if key.version_template.as_ref().map(|t| &t.algorithm) != Some(&algorithm) {
                    kms.set_template_algorithm(&key, algorithm.clone()).await?;
                }
                self.ensure_policy(name).await?;
                let version = kms.create_version(name).await?;
                Ok(GcpKey::new(&version.name, algorithm, false, !active))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Shared mode: rotate (or adopt) under the lock.
    async fn prepare_shared(&self, name: &str, key_type: KeyType) -> Result<GcpKey, BackendError> {
        let Some(shared) = &self.shared else {
            return Err(BackendError::new(
                BackendErrorKind::Internal,
                "shared rotation without shared_keys",
            ));
        };
        let algorithm = kms::algorithm_for(key_type);
        let template = self.ensure_shared_key(name, algorithm.clone()).await?;
        let last_served = self
            .served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .copied();
        let ops = GcpShared {
            backend: self,
            crypto_key: name,
            td_hash: &self.td_hash,
            template: Mutex::new(template),
        };
        let rotation = SharedRotation {
            ops: &ops,
            clock: &SystemClock,
            key: name,
            holder: &self.server_id,
            lease: shared.lock_lease,
            skew: self.skew,
            reuse_window: shared.reuse_window,
            budget: GENERATION_BUDGET,
            call_timeout: ATTEMPT_TIMEOUT,
            poll: SHARED_POLL,
            last_served,
            sightings: &self.sightings,
        };
        let version = rotation.rotate(key_type).await?;
        let mut served = self.served.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = served.entry(name.to_string()).or_insert(version.number);
        *entry = (*entry).max(version.number);
        Ok(GcpKey::new(&version.name, algorithm, true, false))
    }

    /// Makes sure the shared CryptoKey exists (created without a version: versions are only
    /// ever created under the lock) and returns the algorithm its template gives versions.
    async fn ensure_shared_key(
        &self,
        name: &str,
        algorithm: Algorithm,
    ) -> Result<Algorithm, BackendError> {
        let kms = self.kms();
        let key = match kms.get_crypto_key(name).await {
            Ok(key) => key,
            Err(e) if e.not_found() => {
                match self
                    .create_crypto_key(
                        naming::last_segment(name),
                        algorithm.clone(),
                        self.shared_labels(SystemTime::now()),
                        true,
                    )
                    .await
                {
                    Ok(key) => {
                        self.ensure_policy(&key.name).await?;
                        key
                    }
                    Err(e) if e.already_exists() => kms.get_crypto_key(name).await?,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        Ok(key
            .version_template
            .map(|t| t.algorithm)
            .unwrap_or(algorithm))
    }

    /// Marks a CryptoKey inactive when none of its versions is enabled any more.
    async fn deactivate_if_empty(&self, crypto_key: &str) -> Result<(), BackendError> {
        let kms = self.kms();
        let enabled = kms.list_versions(crypto_key, ENABLED_FILTER).await?;
        if enabled.iter().any(|v| v.state == State::Enabled) {
            return Ok(());
        }
        let key = kms.get_crypto_key(crypto_key).await?;
        // The sweep empties other servers' keys too: the trust domain is the guard here.
        let ours = key.labels.get(naming::LABEL_TRUST_DOMAIN) == Some(&self.td_hash)
            && !key.labels.contains_key(naming::LABEL_LOCK);
        if !ours || key.labels.get(naming::LABEL_ACTIVE).map(String::as_str) == Some("false") {
            return Ok(());
        }
        let mut labels = key.labels.clone();
        labels.insert(naming::LABEL_ACTIVE.into(), "false".into());
        kms.set_labels(&key, labels).await?;
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
        let keys = self.kms().list_crypto_keys(&self.key_ring, &filter).await?;
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
        let keys = self.kms().list_crypto_keys(&self.key_ring, &filter).await?;
        Ok(keys
            .into_iter()
            .filter_map(|key| {
                let crypto_key_id = naming::last_segment(&key.name);
                let id = shared.key_id_in(crypto_key_id)?;
                // Only what this configuration would name itself: same template, same key ids.
                let named = naming::render_shared(&shared.template, &self.td_hash, &id).ok()?;
                if named != crypto_key_id || !shared.is_shared(&id) {
                    tracing::debug!(crypto_key = %key.name, "shared CryptoKey not named by this configuration; ignored");
                    return None;
                }
                KeyId::new(&id).ok().map(|id| (id, key.name))
            })
            .collect())
    }
}

fn key_type_and_spki(
    version: &str,
    public: kms::FetchedPublicKey,
) -> Result<(KeyType, Arc<[u8]>), BackendError> {
    let key_type = kms::key_type_of(&public.algorithm).ok_or_else(|| {
        BackendError::new(
            BackendErrorKind::FailedPrecondition,
            format!(
                "CryptoKeyVersion {version} has algorithm {:?}, which no SPIRE key type uses",
                public.algorithm
            ),
        )
    })?;
    Ok((key_type, public.spki_der.into()))
}

#[async_trait]
impl Backend for GcpKmsBackend {
    type Handle = GcpKey;
    type Config = KmsConfig<Self>;

    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPABILITIES
    }

    async fn discover(&self) -> Result<Vec<StoredKey<GcpKey>>, BackendError> {
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
            keys.extend(result?);
        }
        Ok(keys)
    }

    async fn prepare(
        &self,
        id: &KeyId,
        key_type: KeyType,
        replaces: Option<&StoredKey<GcpKey>>,
    ) -> Result<GcpKey, BackendError> {
        let (name, shared) = self.crypto_key_for(id)?;
        if shared {
            self.prepare_shared(&name, key_type).await
        } else {
            self.prepare_standard(&name, key_type, replaces.map(|k| &k.handle))
                .await
        }
    }

    async fn public_key(&self, prepared: &GcpKey) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        self.await_key(&prepared.version).await
    }

    fn can_import(&self) -> bool {
        true
    }

    /// The CryptoKey as `prepare` would make it (a new one created without a version and
    /// labelled inactive, or the replaced key's), an ImportJob, then
    /// `importCryptoKeyVersion` with the key wrapped for the job
    /// (`RSA_OAEP_4096_SHA256_AES_256`).
    async fn prepare_import(
        &self,
        id: &KeyId,
        key: &PrivateKeyMaterial,
        replaces: Option<&StoredKey<GcpKey>>,
    ) -> Result<GcpKey, BackendError> {
        let (name, shared) = self.crypto_key_for(id)?;
        if shared {
            return Err(BackendError::new(
                BackendErrorKind::FailedPrecondition,
                format!(
                    "key {id} lives in a shared CryptoKey (shared_keys), which every server rotates under a lock: import is not supported there"
                ),
            ));
        }
        let algorithm = kms::algorithm_for(key.key_type());
        let kms = self.kms();
        let (activate, created_labels) = if replaces.is_some_and(|k| *k.handle.crypto_key == *name)
        {
            (false, None)
        } else {
            let labels = self.standard_labels(SystemTime::now(), false);
            match self
                .create_crypto_key(
                    naming::last_segment(&name),
                    algorithm.clone(),
                    labels.clone(),
                    true,
                )
                .await
            {
                Ok(created) => {
                    self.ensure_policy(&created.name).await?;
                    (true, Some(Arc::new(labels)))
                }
                Err(e) if e.already_exists() => {
                    // Left by an earlier run (inactive, or a crash after creation): take it
                    // over as prepare does.
                    let existing = kms.get_crypto_key(&name).await?;
                    let active = existing
                        .labels
                        .get(naming::LABEL_ACTIVE)
                        .map(String::as_str)
                        == Some("true");
                    if !active {
                        let mut merged = existing.labels.clone();
                        merged.extend(self.standard_labels(SystemTime::now(), false));
                        kms.set_labels(&existing, merged).await?;
                    }
                    self.ensure_policy(&name).await?;
                    (!active, None)
                }
                Err(e) => return Err(e.into()),
            }
        };
        let protection = self.new_keys().protection;
        let cached = self
            .import_job
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .filter(|c| c.protection == protection && c.until > SystemTime::now());
        let (job, wrapping_key) = match cached {
            Some(cached) => (cached.name, cached.wrapping_key),
            None => {
                let (job, der) = kms
                    .import_job(&self.key_ring, protection, GENERATION_BUDGET)
                    .await?;
                let wrapping_key: Arc<[u8]> = Arc::from(der);
                // The job had more than an hour left when chosen: reuse it for half that.
                let cached = CachedImportJob {
                    name: job.clone(),
                    wrapping_key: wrapping_key.clone(),
                    protection,
                    until: SystemTime::now() + Duration::from_secs(1800),
                };
                *self
                    .import_job
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(cached);
                (job, wrapping_key)
            }
        };
        let wrapped = wrap::rsa_aes_key_wrap_sha256(&wrapping_key, key.pkcs8_der())?;
        let version = kms
            .import_version(&name, algorithm.clone(), &job, wrapped)
            .await?;
        tracing::info!(key_id = %id, version = %version.name, import_job = %job, "key material imported");
        let mut prepared = GcpKey::new(&version.name, algorithm, false, activate);
        prepared.created_labels = created_labels;
        Ok(prepared)
    }

    async fn publish(
        &self,
        new: &StoredKey<GcpKey>,
        _replaces: Option<&StoredKey<GcpKey>>,
    ) -> Result<(), BackendError> {
        if !new.handle.activate {
            return Ok(());
        }
        let kms = self.kms();
        if let Some(created) = &new.handle.created_labels {
            // Created by this process moments ago: the labels are known.
            let mut labels = (**created).clone();
            labels.insert(naming::LABEL_ACTIVE.into(), "true".into());
            let key = CryptoKey::new().set_name(&*new.handle.crypto_key);
            return Ok(kms.set_labels(&key, labels).await?);
        }
        let key = kms.get_crypto_key(&new.handle.crypto_key).await?;
        if key.labels.get(naming::LABEL_ACTIVE).map(String::as_str) == Some("true") {
            return Ok(());
        }
        if !self.owns(&key.labels) {
            return Err(BackendError::new(
                BackendErrorKind::FailedPrecondition,
                format!(
                    "CryptoKey {} no longer carries this server's labels; not publishing into it",
                    key.name
                ),
            ));
        }
        let mut labels = key.labels.clone();
        labels.insert(naming::LABEL_ACTIVE.into(), "true".into());
        Ok(kms.set_labels(&key, labels).await?)
    }

    async fn find(&self, id: &KeyId) -> Result<Option<String>, BackendError> {
        let (name, _) = self.crypto_key_for(id)?;
        let key = match self.kms().get_crypto_key(&name).await {
            Ok(key) => key,
            Err(e) if e.not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if key.labels.get(naming::LABEL_ACTIVE).map(String::as_str) != Some("true") {
            return Ok(None);
        }
        Ok(self.newest_enabled(&name).await?.map(|v| v.name))
    }

    async fn abort(&self, prepared: &GcpKey) -> Result<(), BackendError> {
        if prepared.shared {
            // Other servers may have adopted it: the sweep retires it once superseded.
            return Ok(());
        }
        match self.kms().destroy_version(&prepared.version).await {
            Ok(_) => Ok(()),
            Err(e) if e.not_found() || e.failed_precondition() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn retire(
        &self,
        replaced: &StoredKey<GcpKey>,
        _replaced_by: &StoredKey<GcpKey>,
    ) -> Result<(), BackendError> {
        let version = &replaced.handle;
        if version.shared {
            // Other servers may still sign with it; the sweep destroys superseded shared
            // versions once they have been superseded for longer than the stale threshold.
            tracing::debug!(version = %version.version, "shared version kept for other servers");
            return Ok(());
        }
        match self.kms().destroy_version(&version.version).await {
            Ok(destroyed) => {
                tracing::info!(version = %version.version, destroy_time = ?destroyed.destroy_time.map(|t| t.seconds()), "replaced CryptoKeyVersion scheduled for destruction");
                Ok(())
            }
            Err(e) if e.not_found() || e.failed_precondition() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn sign(
        &self,
        key: &StoredKey<GcpKey>,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<BackendSignature, BackendError> {
        let signature = self.kms().sign(&key.handle.version, digest).await?;
        Ok(match scheme {
            SignatureScheme::Ecdsa(_) => BackendSignature::EcdsaDer(signature),
            SignatureScheme::RsaPkcs1v15(_) | SignatureScheme::RsaPss { .. } => {
                BackendSignature::Rsa(signature)
            }
        })
    }

    async fn reconfigure(&self, config: &KmsConfig<Self>) -> Result<(), BackendError> {
        let settings = &config.backend;
        // A new client reads the (possibly rotated) service account key; calls in flight
        // finish on the old one.
        let kms =
            Kms::connect(auth(settings), config.endpoint.as_ref().map(|e| e.as_str())).await?;
        self.kms.set(kms);
        self.new_keys.set(NewKeys {
            protection: settings.protection_level,
            policy: settings.key_policy.as_ref().map(|(_, p)| p.clone()),
        });
        tracing::info!("gcp_kms credentials, key policy and protection level reloaded");
        Ok(())
    }
}

#[async_trait]
impl KeyLifecycle for GcpKmsBackend {
    type Handle = GcpKey;

    fn identity(&self) -> SweeperIdentity {
        SweeperIdentity {
            trust_domain: self.td_hash.clone(),
            server_id: self.server_id.clone(),
        }
    }

    async fn stamp(&self, keys: &[StoredKey<GcpKey>], now: SystemTime) -> Result<(), BackendError> {
        let mut crypto_keys: Vec<&str> = keys.iter().map(|k| &*k.handle.crypto_key).collect();
        crypto_keys.sort_unstable();
        crypto_keys.dedup();
        let stamp = stamp_text(now);
        let kms = self.kms();
        for name in crypto_keys {
            // Cloud KMS CryptoKeys have no etag and the update mask replaces the whole label
            // map: read, check the key is still ours and active, change the stamp only.
            let key = kms.get_crypto_key(name).await?;
            let active = key.labels.get(naming::LABEL_ACTIVE).map(String::as_str) == Some("true");
            if !self.owns(&key.labels) || !active {
                tracing::warn!(
                    crypto_key = name,
                    "not stamping a CryptoKey that is no longer this server's active key"
                );
                continue;
            }
            let mut labels = key.labels.clone();
            labels.insert(naming::LABEL_LAST_UPDATE.into(), stamp.clone());
            kms.set_labels(&key, labels).await?;
            keymanager_engine::failpoint!("stamp.after_key");
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<KeyRecord>, BackendError> {
        let kms = self.kms();
        let filter = format!("labels.{} = {}", naming::LABEL_TRUST_DOMAIN, self.td_hash);
        let keys: Vec<CryptoKey> = kms
            .list_crypto_keys(&self.key_ring, &filter)
            .await?
            .into_iter()
            .filter(|key| !key.labels.contains_key(naming::LABEL_LOCK))
            .collect();
        let versions = join_all(
            keys.iter()
                .map(|key| kms.list_versions(&key.name, ENABLED_FILTER)),
        )
        .await;
        let mut records = Vec::new();
        for (key, versions) in keys.iter().zip(versions) {
            let mut enabled: Vec<CryptoKeyVersion> = versions?
                .into_iter()
                .filter(|v| v.state == State::Enabled)
                .collect();
            enabled.sort_by_key(|v| kms::version_number(&v.name));
            records.extend(version_records(key, &enabled));
        }
        Ok(records)
    }

    async fn delete(&self, record: &KeyRecord) -> Result<(), BackendError> {
        match self.kms().destroy_version(&record.locator).await {
            Ok(_) => {}
            Err(e) if e.not_found() || e.failed_precondition() => {}
            Err(e) => return Err(e.into()),
        }
        self.deactivate_if_empty(kms::crypto_key_of(&record.locator))
            .await
    }
}

/// Sweep records for the enabled versions of one CryptoKey (sorted oldest first). The newest
/// of an active CryptoKey is what discovery finds; a superseded version is not published,
/// and its liveness evidence is the moment it was superseded (the next version's creation).
fn version_records(key: &CryptoKey, enabled: &[CryptoKeyVersion]) -> Vec<KeyRecord> {
    let label = |name: &str| key.labels.get(name).cloned();
    let shared = label(naming::LABEL_SHARED).as_deref() == Some("true");
    let owner = if shared {
        Some(SHARED_OWNER.to_string())
    } else {
        label(naming::LABEL_SERVER_ID)
    };
    let stamp = label(naming::LABEL_LAST_UPDATE).and_then(|v| parse_stamp(&v));
    let key_id = label(naming::LABEL_SERVER_ID)
        .and_then(|server| naming::key_id_from_standard(naming::last_segment(&key.name), &server));
    enabled
        .iter()
        .enumerate()
        .map(|(i, version)| {
            let next = enabled.get(i + 1);
            KeyRecord {
                locator: version.name.clone(),
                trust_domain: label(naming::LABEL_TRUST_DOMAIN),
                server_id: owner.clone(),
                key_id: key_id.clone(),
                state: StoreKeyState::Enabled,
                published: next.is_none() && label(naming::LABEL_ACTIVE).as_deref() == Some("true"),
                last_stamp: match next {
                    None => stamp,
                    Some(next) => kms::to_system_time(next.create_time.as_ref()),
                },
                created: kms::to_system_time(version.create_time.as_ref()),
                deletion_intent: false,
                replaced: next.and_then(|n| kms::to_system_time(n.create_time.as_ref())),
                // Labels are per CryptoKey, not per version: the history is the versions'
                // order, the next version being the one that replaced this one.
                replaced_by: next.map(|n| n.name.clone()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use google_cloud_wkt::Timestamp;
    use keymanager_engine::lifecycle::{SweepPolicy, plan_sweep};

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
