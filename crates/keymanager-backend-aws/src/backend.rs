//! The `aws_kms` adapter: keys are asymmetric SIGN_VERIFY KMS keys, found through this
//! server's aliases (or tags), and every signature is a KMS `Sign` over the digest.
//!
//! Two-phase creation on KMS:
//! - *prepare*: `CreateKey`, tagged `spire-active=false`: neither alias nor tag discovery
//!   finds it, and the sweep removes it if nothing follows;
//! - *publish*: point the alias at it (the switch for alias discovery, one atomic call),
//!   then tag it `spire-active=true` (the switch for tag discovery, where the newest active
//!   key of an id wins);
//! - *retire* / *abort*: tag the deletion intent and `spire-active=false` in one call, then
//!   `ScheduleKeyDeletion` (7 days).
//!
//! Shared keys (`shared_keys`): *prepare* rotates under the lock (see `shared`), which
//! publishes the new generation to every server at once; *retire* leaves the superseded
//! generation to the sweep, which deletes it once nobody has stamped it and it has been
//! superseded for longer than `stale_key_age`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::operation::RequestId as _;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{
    AlgorithmSpec, ExpirationModelType, KeyMetadata, KeySpec, KeyState, KeyUsageType, MessageType,
    OriginType, SigningAlgorithmSpec, Tag, WrappingKeySpec,
};
use futures_util::future::join_all;
use keymanager_engine::kit::shared::{LockSightings, SharedKeys, SharedRotation, SystemClock};
use keymanager_engine::kit::swap::Swap;
use keymanager_engine::kit::vocabulary as tags;
use keymanager_engine::kit::wrap;
use keymanager_engine::kit::{KmsAdapter, KmsConfig};
use keymanager_engine::lifecycle::{
    KeyLifecycle, KeyRecord, StoreKeyState, SweeperIdentity, parse_stamp, stamp_text,
};
use keymanager_engine::resilience::{CallStats, RetryPolicy, with_retries};
use keymanager_engine::{
    Backend, BackendError, BackendErrorKind, BackendSignature, Capabilities, Digest, HashAlgorithm,
    KeyHandle, KeyId, KeyType, PrivateKeyMaterial, PssSaltSupport, SchemeFamily, SignatureScheme,
    Signed, SigningSupport, StoredKey,
};

use crate::client::{ATTEMPT_TIMEOUT, Clients};
use crate::config::{AwsKmsSettings, Discovery};
use crate::errors::{Service, sdk_error};
use crate::naming;
use crate::policy::CallerRole;
use crate::shared::{self, AwsShared};

/// Keys described and loaded at once during discovery and listing.
const CONCURRENCY: usize = 16;
/// KMS's deletion window for replaced keys.
pub(crate) const DELETION_WINDOW_DAYS: i32 = 7;
/// The longest a shared rotation may take, waits for another server's included.
const SHARED_BUDGET: Duration = Duration::from_secs(5 * 60);
/// How often a server waiting for a shared rotation looks for the holder's key: one
/// `DescribeKey` per waiter per poll (KMS's DescribeKey quota is shared by the account).
const SHARED_POLL: Duration = Duration::from_millis(500);
/// The owner marker of shared keys in sweep records: no server owns them.
const SHARED_OWNER: &str = "<shared>";

const CAPABILITIES: Capabilities = Capabilities {
    key_types: &KeyType::ALL,
    signing: SigningSupport::CURVE_HASH_ECDSA_AND_RSA_SHA2,
    pss_salt: PssSaltSupport::HashLengthOnly,
    key_algorithm_name: None,
};

/// A KMS key, by ARN.
#[derive(Clone, Debug)]
pub struct AwsKey {
    arn: Arc<str>,
    /// The generation of a shared key (`shared_keys`); `None` for a per-server key.
    shared: Option<u64>,
}

impl AwsKey {
    fn new(arn: &str) -> Self {
        Self {
            arn: Arc::from(arn),
            shared: None,
        }
    }

    fn shared(arn: &str, generation: u64) -> Self {
        Self {
            arn: Arc::from(arn),
            shared: Some(generation),
        }
    }
}

impl KeyHandle for AwsKey {
    fn locator(&self) -> &str {
        &self.arn
    }
}

/// What keys created from now on get; replaced by a re-Configure.
#[derive(Debug)]
struct NewKeys {
    /// `key_policy_file`, else the least-privilege policy for an assumed role, else `None`
    /// (the account's default policy).
    policy: Option<String>,
    tags: BTreeMap<String, String>,
}

/// The backend.
pub struct AwsKmsBackend {
    /// Replaced whole by a re-Configure with rotated credentials; calls in flight finish on
    /// the clients they started with.
    clients: Swap<Clients>,
    pub(crate) trust_domain: String,
    pub(crate) server_id: String,
    pub(crate) discovery: Discovery,
    new_keys: Swap<NewKeys>,
    /// Where the credentials come from, in words (for `doctor`).
    pub(crate) credential_source: String,
    /// The KMS endpoint (for `doctor`'s clock check).
    pub(crate) service_url: String,
    /// The region (the `alias_template`'s `{{ .Region }}`).
    pub(crate) region: String,
    /// The shared-keys mode, if configured.
    pub(crate) shared: Option<SharedKeys>,
    /// `clock_skew_allowance`: also how long after a lock's lease a waiter takes over.
    skew: Duration,
    /// Per shared alias, the highest generation this process served from a GenerateKey:
    /// bounded by the number of shared keys. Never held across I/O.
    served: Mutex<HashMap<String, u64>>,
    /// When this process first saw each rotation lock (aliases record no lease end), kept
    /// across GenerateKey calls that SPIRE abandons after 30 s.
    sightings: LockSightings,
}

#[async_trait]
impl KmsAdapter for AwsKmsBackend {
    const NAME: &'static str = "aws_kms";
    type Settings = AwsKmsSettings;

    async fn open(config: &KmsConfig<Self>, server_id: String) -> Result<Self, BackendError> {
        if config.backend.key_policy.is_none() && config.backend.assume_role.is_none() {
            tracing::debug!(
                "no key_policy_file: new keys get a policy derived from the caller identity"
            );
        }
        let clients = Clients::connect(&config.backend, config.endpoint.as_ref()).await;
        let policy = key_policy(&config.backend, &clients).await?;
        tracing::info!(
            region = %config.backend.region,
            endpoint = config.endpoint.as_ref().map_or("default", |e| e.as_str()),
            server_id = %server_id,
            alias_prefix = %naming::alias_prefix(&config.trust_domain, &server_id),
            discovery = ?config.backend.discovery,
            shared_keys = config.backend.shared.as_ref().map_or("off", |s| s.template.source()),
            "aws_kms backend ready"
        );
        Ok(Self {
            clients: Swap::new(clients),
            trust_domain: config.trust_domain.clone(),
            server_id,
            discovery: config.backend.discovery,
            new_keys: Swap::new(NewKeys {
                policy,
                tags: config.backend.key_tags.clone(),
            }),
            credential_source: crate::operator::credential_source(&config.backend),
            service_url: config.endpoint.as_ref().map_or_else(
                || format!("https://kms.{}.amazonaws.com", config.backend.region),
                |e| e.as_str().to_string(),
            ),
            region: config.backend.region.clone(),
            shared: config.backend.shared.clone(),
            skew: config.schedule.policy.max_clock_skew,
            served: Mutex::new(HashMap::new()),
            sightings: LockSightings::default(),
        })
    }
}

/// The key policy new keys get: `key_policy_file`; else, when this server runs as an
/// assumed role, a least-privilege policy for it; else the account default (`None`). The
/// caller identity comes from STS, retried: a transient failure must not silently downgrade
/// the policy of every key this process creates.
async fn key_policy(
    settings: &AwsKmsSettings,
    clients: &Clients,
) -> Result<Option<String>, BackendError> {
    if let Some(policy) = &settings.key_policy {
        return Ok(Some(policy.text.clone()));
    }
    let identity = with_retries(RetryPolicy::default(), "sts", &CallStats::default(), || async {
        clients
            .sts
            .get_caller_identity()
            .send()
            .await
            .map_err(|e| sdk_error(Service::Sts, "GetCallerIdentity", "this server's credentials", e))
    })
    .await
    .map_err(|e| {
        e.context("cannot tell which role this server runs as, which the default key policy of new keys needs (set key_policy_file to choose the policy yourself)")
    })?;
    Ok(match identity.arn().and_then(CallerRole::from_caller_arn) {
        Some(role) => {
            tracing::info!(role = %role.role_arn(), "new keys get a least-privilege key policy for this server's role");
            Some(role.key_policy())
        }
        None => {
            tracing::warn!(
                caller = identity.arn().unwrap_or("unknown"),
                "not running as an assumed role and no key_policy_file: new keys get the account's default key policy"
            );
            None
        }
    })
}

impl AwsKmsBackend {
    fn alias(&self, id: &KeyId) -> Result<String, BackendError> {
        naming::alias_name(&self.trust_domain, &self.server_id, id.as_str())
            .map_err(|reason| BackendError::new(BackendErrorKind::InvalidArgument, reason))
    }

    pub(crate) fn clients(&self) -> Arc<Clients> {
        self.clients.get()
    }

    fn new_keys(&self) -> Arc<NewKeys> {
        self.new_keys.get()
    }

    /// `DescribeKey` of a key or alias; `None` when it does not exist.
    pub(crate) async fn describe_key(
        &self,
        key: &str,
    ) -> Result<Option<KeyMetadata>, BackendError> {
        self.describe(key).await
    }

    /// False (and says so) for a per-server key of an id that is shared now.
    fn not_shared_now(&self, id: &str) -> bool {
        if self.shared_for(id).is_some() {
            tracing::info!(
                key_id = id,
                "per-server key of a key id that is shared now; not used"
            );
            return false;
        }
        true
    }

    /// The shared-keys configuration, when `id` is served from a shared key.
    fn shared_for(&self, id: &str) -> Option<&SharedKeys> {
        self.shared.as_ref().filter(|s| s.is_shared(id))
    }

    /// The alias of a shared key id.
    fn shared_alias(&self, shared: &SharedKeys, id: &str) -> Result<String, BackendError> {
        naming::render_shared(&shared.template, &self.trust_domain, &self.region, id)
            .map_err(|reason| BackendError::new(BackendErrorKind::InvalidArgument, reason))
    }

    async fn describe(&self, key: &str) -> Result<Option<KeyMetadata>, BackendError> {
        match self.clients().kms.describe_key().key_id(key).send().await {
            Ok(out) => Ok(out.key_metadata),
            Err(e) if e.code() == Some("NotFoundException") => Ok(None),
            Err(e) => Err(sdk_error(Service::Kms, "DescribeKey", key, e)),
        }
    }

    pub(crate) async fn read_public_key(
        &self,
        arn: &str,
    ) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        let out = self
            .clients()
            .kms
            .get_public_key()
            .key_id(arn)
            .send()
            .await
            .map_err(|e| sdk_error(Service::Kms, "GetPublicKey", arn, e))?;
        let key_type = match out.key_spec() {
            Some(KeySpec::EccNistP256) => KeyType::EcP256,
            Some(KeySpec::EccNistP384) => KeyType::EcP384,
            Some(KeySpec::Rsa2048) => KeyType::Rsa2048,
            Some(KeySpec::Rsa4096) => KeyType::Rsa4096,
            other => {
                return Err(BackendError::new(
                    BackendErrorKind::FailedPrecondition,
                    format!("KMS key {arn} has key spec {other:?}, which SPIRE cannot use"),
                ));
            }
        };
        let spki = out
            .public_key()
            .map(|b| b.as_ref().to_vec())
            .unwrap_or_default();
        if spki.is_empty() {
            return Err(BackendError::new(
                BackendErrorKind::Internal,
                format!("KMS returned no public key for {arn}"),
            ));
        }
        Ok((key_type, Arc::from(spki)))
    }

    /// A usable key of `id` at `arn`, or `None` when it is not enabled (reported: SPIRE
    /// regenerates the key when it needs it).
    async fn load(&self, id: &str, arn: &str) -> Result<Option<StoredKey<AwsKey>>, BackendError> {
        let Some(metadata) = self.describe(arn).await? else {
            return Ok(None);
        };
        let arn = metadata.arn().unwrap_or(arn).to_string();
        if metadata.key_state() != Some(&KeyState::Enabled) {
            tracing::warn!(key_id = id, key = %arn, state = ?metadata.key_state(), "skipping a key that is not enabled");
            return Ok(None);
        }
        let Ok(id) = KeyId::new(id) else {
            return Ok(None);
        };
        let (key_type, spki_der) = self.read_public_key(&arn).await?;
        Ok(Some(StoredKey {
            id,
            key_type,
            spki_der,
            handle: AwsKey::new(&arn),
        }))
    }

    /// A key of `id` at a known ARN with one GetPublicKey; `None` (reported) when KMS says
    /// the key is not usable (disabled, pending deletion).
    async fn load_by_arn(
        &self,
        id: &str,
        arn: &str,
    ) -> Result<Option<StoredKey<AwsKey>>, BackendError> {
        let Ok(key_id) = KeyId::new(id) else {
            return Ok(None);
        };
        match self.read_public_key(arn).await {
            Ok((key_type, spki_der)) => Ok(Some(StoredKey {
                id: key_id,
                key_type,
                spki_der,
                handle: AwsKey::new(arn),
            })),
            Err(error) if error.kind == BackendErrorKind::FailedPrecondition => {
                tracing::warn!(key_id = id, key = arn, %error, "skipping a key that is not usable");
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Every alias of this trust domain: (alias name, target key id).
    pub(crate) async fn trust_domain_aliases(&self) -> Result<Vec<(String, String)>, BackendError> {
        let root = format!(
            "{}{}/",
            naming::ALIAS_ROOT,
            naming::alias_trust_domain(&self.trust_domain)
        );
        self.aliases(|name| name.starts_with(&root)).await
    }

    /// Every alias whose name `keep` accepts: (alias name, target key id).
    async fn aliases(
        &self,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, String)>, BackendError> {
        let mut found = Vec::new();
        // 100 is KMS's largest page (the default is 50). The paginator stops on a repeated
        // token.
        let mut aliases = self
            .clients()
            .kms
            .list_aliases()
            .limit(100)
            .into_paginator()
            .items()
            .send();
        while let Some(alias) = aliases.next().await {
            let alias =
                alias.map_err(|e| sdk_error(Service::Kms, "ListAliases", "this account", e))?;
            if let (Some(name), Some(target)) = (alias.alias_name(), alias.target_key_id())
                && keep(name)
            {
                found.push((name.to_string(), target.to_string()));
            }
        }
        Ok(found)
    }

    /// KMS keys whose tags match every (key, value) pair, with all their tags, through the
    /// Resource Groups Tagging API (never a listing of the whole account).
    pub(crate) async fn tagged_keys(
        &self,
        filters: &[(&str, &str)],
    ) -> Result<Vec<(String, BTreeMap<String, String>)>, BackendError> {
        use aws_sdk_resourcegroupstagging::types::TagFilter;
        let filters = filters
            .iter()
            .map(|(key, value)| TagFilter::builder().key(*key).values(*value).build())
            .collect();
        let mut pages = self
            .clients()
            .tagging
            .get_resources()
            .resource_type_filters("kms:key")
            .set_tag_filters(Some(filters))
            .into_paginator()
            .items()
            .send();
        let mut out = Vec::new();
        while let Some(mapping) = pages.next().await {
            let mapping = mapping.map_err(|e| {
                sdk_error(
                    Service::Tagging,
                    "GetResources",
                    "keys of this trust domain",
                    e,
                )
            })?;
            let Some(arn) = mapping.resource_arn() else {
                continue;
            };
            let tags = mapping
                .tags()
                .iter()
                .map(|t| (t.key().to_string(), t.value().to_string()))
                .collect();
            out.push((arn.to_string(), tags));
        }
        Ok(out)
    }

    /// The current key of `(server, key id)` among several enabled keys tagged active
    /// (they coexist between a publish and a retire, or after a crash in between): the one
    /// the alias points at, since publish switches the alias first; else the newest.
    async fn current_of(
        &self,
        server_id: &str,
        key_id: &str,
        candidates: &[(String, Option<KeyMetadata>)],
    ) -> Result<Option<String>, BackendError> {
        let enabled: Vec<&(String, Option<KeyMetadata>)> = candidates
            .iter()
            .filter(|(_, m)| {
                m.as_ref()
                    .is_some_and(|m| m.key_state() == Some(&KeyState::Enabled))
            })
            .collect();
        if enabled.len() <= 1 {
            return Ok(enabled.first().map(|(arn, _)| arn.clone()));
        }
        if let Ok(alias) = naming::alias_name(&self.trust_domain, server_id, key_id)
            && let Some(target) = self.describe(&alias).await?
            && let Some(found) = enabled
                .iter()
                .find(|(_, m)| m.as_ref().is_some_and(|m| m.key_id() == target.key_id()))
        {
            return Ok(Some(found.0.clone()));
        }
        Ok(enabled
            .iter()
            .max_by_key(|(_, m)| {
                m.as_ref()
                    .and_then(|m| m.creation_date())
                    .map(|d| (d.secs(), d.subsec_nanos()))
            })
            .map(|(arn, _)| arn.clone()))
    }

    /// `current_of` for ARNs not described yet.
    async fn current_among(
        &self,
        key_id: &str,
        arns: &[String],
    ) -> Result<Option<String>, BackendError> {
        let mut described = Vec::with_capacity(arns.len());
        for (arn, metadata) in arns
            .iter()
            .zip(join_all(arns.iter().map(|arn| self.describe(arn))).await)
        {
            described.push((arn.clone(), metadata?));
        }
        self.current_of(&self.server_id, key_id, &described).await
    }

    /// This server's active keys by tag, grouped by SPIRE key id.
    async fn active_by_tags(
        &self,
        key_id: Option<&str>,
    ) -> Result<BTreeMap<String, Vec<String>>, BackendError> {
        let mut filters = vec![
            (tags::TRUST_DOMAIN, self.trust_domain.as_str()),
            (tags::SERVER_ID, self.server_id.as_str()),
            (tags::ACTIVE, "true"),
        ];
        if let Some(key_id) = key_id {
            filters.push((tags::KEY_ID, key_id));
        }
        let mut by_id: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (arn, key_tags) in self.tagged_keys(&filters).await? {
            if let Some(id) = key_tags.get(tags::KEY_ID) {
                by_id.entry(id.clone()).or_default().push(arn);
            }
        }
        Ok(by_id)
    }

    async fn tag(&self, arn: &str, pairs: &[(&str, &str)]) -> Result<(), BackendError> {
        let tags = pairs
            .iter()
            .map(|(k, v)| tag(k, v))
            .collect::<Result<Vec<_>, _>>()?;
        self.clients()
            .kms
            .tag_resource()
            .key_id(arn)
            .set_tags(Some(tags))
            .send()
            .await
            .map(drop)
            .map_err(|e| sdk_error(Service::Kms, "TagResource", arn, e))
    }

    /// Points `alias` at `arn`: UpdateAlias when this server already serves a key under
    /// the id, CreateAlias otherwise, each falling back to the other when the store
    /// disagrees (an alias left by a crashed start, or deleted by hand). Repeatable.
    async fn point_alias(&self, alias: &str, arn: &str, exists: bool) -> Result<(), BackendError> {
        let clients = self.clients();
        let kms = &clients.kms;
        let update = || {
            kms.update_alias()
                .alias_name(alias)
                .target_key_id(arn)
                .send()
        };
        let create = || {
            kms.create_alias()
                .alias_name(alias)
                .target_key_id(arn)
                .send()
        };
        if exists {
            match update().await {
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some("NotFoundException") => create()
                    .await
                    .map(drop)
                    .map_err(|e| sdk_error(Service::Kms, "CreateAlias", alias, e)),
                Err(e) => Err(sdk_error(Service::Kms, "UpdateAlias", alias, e)),
            }
        } else {
            match create().await {
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some("AlreadyExistsException") => update()
                    .await
                    .map(drop)
                    .map_err(|e| sdk_error(Service::Kms, "UpdateAlias", alias, e)),
                Err(e) => Err(sdk_error(Service::Kms, "CreateAlias", alias, e)),
            }
        }
    }

    /// `CreateKey` for `id`, tagged inactive: neither discovery finds it until publish.
    async fn create_key(
        &self,
        id: &KeyId,
        key_type: KeyType,
        origin: OriginType,
    ) -> Result<AwsKey, BackendError> {
        self.alias(id)?; // refuse an id whose alias would be too long before creating anything
        let now = stamp_text(SystemTime::now());
        let ours = [
            (tags::TRUST_DOMAIN, self.trust_domain.as_str()),
            (tags::SERVER_ID, self.server_id.as_str()),
            (tags::KEY_ID, id.as_str()),
            // Inactive until published: neither discovery finds it, the sweep removes it
            // if the GenerateKey never gets that far.
            (tags::ACTIVE, "false"),
            (tags::LAST_UPDATE, now.as_str()),
        ];
        let description = naming::description(&self.trust_domain, id.as_str());
        let arn = self
            .create_kms_key(id.as_str(), key_type, origin, description, &ours)
            .await?;
        Ok(AwsKey::new(&arn))
    }

    /// A new generation of the shared key behind `alias`: no server id (every server uses
    /// it), tagged active at once (a crash before the alias moves leaves a key the sweep
    /// removes once stale, never one it could take for unpublished while it is in use).
    pub(crate) async fn create_shared_key(
        &self,
        alias: &str,
        id: &KeyId,
        key_type: KeyType,
        generation: u64,
    ) -> Result<String, BackendError> {
        let now = stamp_text(SystemTime::now());
        let generation_text = generation.to_string();
        let ours = [
            (tags::TRUST_DOMAIN, self.trust_domain.as_str()),
            (tags::KEY_ID, id.as_str()),
            (naming::TAG_SHARED, "true"),
            (naming::TAG_SHARED_ALIAS, alias),
            (naming::TAG_GENERATION, generation_text.as_str()),
            (tags::ACTIVE, "true"),
            (tags::LAST_UPDATE, now.as_str()),
        ];
        let description = naming::shared_description(&self.trust_domain, id.as_str(), generation);
        self.create_kms_key(
            id.as_str(),
            key_type,
            OriginType::AwsKms,
            description,
            &ours,
        )
        .await
    }

    /// `CreateKey` with this backend's tags plus the configured ones; returns the ARN.
    async fn create_kms_key(
        &self,
        what: &str,
        key_type: KeyType,
        origin: OriginType,
        description: String,
        ours: &[(&str, &str)],
    ) -> Result<String, BackendError> {
        let spec = match key_type {
            KeyType::EcP256 => KeySpec::EccNistP256,
            KeyType::EcP384 => KeySpec::EccNistP384,
            KeyType::Rsa2048 => KeySpec::Rsa2048,
            KeyType::Rsa4096 => KeySpec::Rsa4096,
        };
        let new_keys = self.new_keys();
        let key_tags = ours
            .iter()
            .map(|(k, v)| tag(k, v))
            .chain(new_keys.tags.iter().map(|(k, v)| tag(k, v)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut request = self
            .clients()
            .kms
            .create_key()
            .key_spec(spec)
            .key_usage(KeyUsageType::SignVerify)
            // Only imports say so: a generated key keeps CreateKey's default request.
            .set_origin((origin == OriginType::External).then_some(origin))
            .description(description)
            .set_tags(Some(key_tags));
        if let Some(policy) = &new_keys.policy {
            request = request.policy(policy);
        }
        let created = request
            .send()
            .await
            .map_err(|e| sdk_error(Service::Kms, "CreateKey", what, e))?;
        created
            .key_metadata()
            .and_then(|m| m.arn())
            .map(str::to_string)
            .ok_or_else(|| {
                BackendError::new(BackendErrorKind::Internal, "CreateKey returned no key ARN")
            })
    }

    /// Shared mode: rotate (or adopt) under the lock; the key returned is published to every
    /// server already.
    async fn prepare_shared(
        &self,
        shared: &SharedKeys,
        id: &KeyId,
        key_type: KeyType,
    ) -> Result<AwsKey, BackendError> {
        let alias = self.shared_alias(shared, id.as_str())?;
        let last_served = self
            .served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&alias)
            .copied();
        let ops = AwsShared {
            backend: self,
            alias: &alias,
            key_id: id,
            published_first: Mutex::new(None),
        };
        let rotation = SharedRotation {
            ops: &ops,
            clock: &SystemClock,
            key: &alias,
            holder: &self.server_id,
            lease: shared.lock_lease,
            skew: self.skew,
            reuse_window: shared.reuse_window,
            budget: SHARED_BUDGET,
            call_timeout: ATTEMPT_TIMEOUT,
            poll: SHARED_POLL,
            last_served,
            sightings: &self.sightings,
        };
        let generation = rotation.rotate(key_type).await?;
        let mut served = self.served.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = served.entry(alias).or_insert(generation.number);
        *entry = (*entry).max(generation.number);
        Ok(AwsKey::shared(&generation.name, generation.number))
    }

    /// The current generation of a shared key id, if it has one and it is enabled.
    async fn load_shared(
        &self,
        id: &str,
        alias: &str,
    ) -> Result<Option<StoredKey<AwsKey>>, BackendError> {
        let Some(metadata) = self.describe(alias).await? else {
            return Ok(None);
        };
        let generation = shared::generation_of(&metadata, alias, &self.trust_domain)?;
        if !generation.live {
            tracing::warn!(key_id = id, key = %generation.name, state = ?metadata.key_state(), "skipping a shared key that is not enabled");
            return Ok(None);
        }
        let Ok(key_id) = KeyId::new(id) else {
            return Ok(None);
        };
        let (key_type, spki_der) = self.read_public_key(&generation.name).await?;
        // Not recorded as served here: a server starting with an empty SPIRE journal asks for
        // this id at once and must adopt the generation another server has just made, not add
        // one (the HA test starts three servers a second apart). Only GenerateKey records.
        Ok(Some(StoredKey {
            id: key_id,
            key_type,
            spki_der,
            handle: AwsKey::shared(&generation.name, generation.number),
        }))
    }

    /// Shared discovery: the aliases this configuration names, found by the regex.
    async fn discover_shared(
        &self,
        shared: &SharedKeys,
    ) -> Result<Vec<StoredKey<AwsKey>>, BackendError> {
        let found: Vec<(String, String)> = self
            .aliases(|name| shared.key_id_in(name).is_some())
            .await?
            .into_iter()
            .filter_map(|(alias, _)| {
                let id = naming::decode_key_id(&shared.key_id_in(&alias)?);
                // Only what this configuration would name itself: same template, same ids.
                let named = self.shared_alias(shared, &id).ok()?;
                if named != alias || !shared.is_shared(&id) {
                    tracing::debug!(alias = %alias, "shared alias not named by this configuration; ignored");
                    return None;
                }
                Some((id, alias))
            })
            .collect();
        let mut keys = Vec::with_capacity(found.len());
        for batch in found.chunks(CONCURRENCY) {
            let loaded =
                join_all(batch.iter().map(|(id, alias)| self.load_shared(id, alias))).await;
            for key in loaded {
                keys.extend(key?);
            }
        }
        Ok(keys)
    }

    /// Sweep records of the shared keys among `described` (tagged `spire-shared`): the
    /// alias's target is published; a superseded generation's liveness evidence is the
    /// later of its own stamp (every server serving it stamps it) and the moment it was
    /// superseded (the next generation's creation), so the sweep deletes it only once it
    /// has been superseded for longer than `stale_key_age` *and* nobody has stamped it for
    /// as long.
    async fn shared_records(
        &self,
        described: &[(String, BTreeMap<String, String>, KeyMetadata)],
    ) -> Result<Vec<KeyRecord>, BackendError> {
        let mut by_alias: BTreeMap<&str, Vec<SharedEntry<'_>>> = BTreeMap::new();
        for (arn, key_tags, metadata) in described {
            if key_tags.get(naming::TAG_SHARED).map(String::as_str) != Some("true") {
                continue;
            }
            let (Some(alias), Some(generation)) = (
                key_tags.get(naming::TAG_SHARED_ALIAS),
                key_tags
                    .get(naming::TAG_GENERATION)
                    .and_then(|g| g.parse::<u64>().ok()),
            ) else {
                continue;
            };
            by_alias.entry(alias.as_str()).or_default().push((
                generation,
                arn.as_str(),
                key_tags,
                metadata,
            ));
        }
        let mut records = Vec::new();
        for (alias, mut keys) in by_alias {
            let current = self.describe(alias).await?.map(|m| m.key_id().to_string());
            keys.sort_by_key(|(generation, ..)| *generation);
            for (generation, arn, key_tags, metadata) in &keys {
                let tag = |key: &str| key_tags.get(key).cloned();
                let published = current.as_deref() == Some(metadata.key_id());
                let successor = (!published)
                    .then(|| {
                        keys.iter()
                            .filter(|(g, ..)| g > generation)
                            .filter_map(|(_, arn, _, m)| Some((created_at(m)?, *arn)))
                            .min()
                    })
                    .flatten();
                let stamp = tag(tags::LAST_UPDATE).and_then(|v| parse_stamp(&v));
                let superseded = successor.map(|(at, _)| at);
                records.push(KeyRecord {
                    locator: arn.to_string(),
                    trust_domain: tag(tags::TRUST_DOMAIN),
                    server_id: Some(SHARED_OWNER.to_string()),
                    key_id: tag(tags::KEY_ID),
                    state: store_state(metadata),
                    published,
                    last_stamp: stamp.max(superseded),
                    created: created_at(metadata),
                    deletion_intent: tag(tags::DELETE_INTENT).is_some(),
                    replaced: superseded,
                    replaced_by: tag(tags::REPLACED_BY)
                        .or_else(|| successor.map(|(_, arn)| arn.to_string())),
                });
            }
        }
        Ok(records)
    }

    /// `GetParametersForImport`, the wrapping, `ImportKeyMaterial` (no expiry).
    async fn import_material(
        &self,
        arn: &str,
        key: &PrivateKeyMaterial,
    ) -> Result<(), BackendError> {
        // An EC PKCS#8 (≤ 185 bytes) fits RSA-OAEP under a 4096-bit key directly; an RSA
        // PKCS#8 does not and needs the AES key wrap, as AWS documents for RSA key material.
        let algorithm = if key.key_type().is_rsa() {
            AlgorithmSpec::RsaAesKeyWrapSha256
        } else {
            AlgorithmSpec::RsaesOaepSha256
        };
        let clients = self.clients();
        let params = clients
            .kms
            .get_parameters_for_import()
            .key_id(arn)
            .wrapping_algorithm(algorithm.clone())
            .wrapping_key_spec(WrappingKeySpec::Rsa4096)
            .send()
            .await
            .map_err(|e| sdk_error(Service::Kms, "GetParametersForImport", arn, e))?;
        let (Some(wrapping_key), Some(token)) = (params.public_key(), params.import_token()) else {
            return Err(BackendError::new(
                BackendErrorKind::Internal,
                format!(
                    "GetParametersForImport for {arn} returned no wrapping key or import token"
                ),
            ));
        };
        let wrapped = match algorithm {
            AlgorithmSpec::RsaAesKeyWrapSha256 => {
                wrap::rsa_aes_key_wrap_sha256(wrapping_key.as_ref(), key.pkcs8_der())?
            }
            _ => wrap::rsa_oaep_sha256(wrapping_key.as_ref(), key.pkcs8_der())?,
        };
        clients
            .kms
            .import_key_material()
            .key_id(arn)
            .import_token(token.clone())
            .encrypted_key_material(Blob::new(wrapped))
            .expiration_model(ExpirationModelType::KeyMaterialDoesNotExpire)
            .send()
            .await
            .map_err(|e| sdk_error(Service::Kms, "ImportKeyMaterial", arn, e))?;
        tracing::info!(
            key = arn,
            algorithm = algorithm.as_str(),
            "key material imported"
        );
        Ok(())
    }

    /// Records the deletion intent and marks the key inactive (one call), then schedules
    /// its deletion. If the process dies in between, the next sweep finishes the job.
    /// Records the intent (and, for a key replaced under its id, which key replaced it: the
    /// rotation history) in one TagResource, then schedules the deletion.
    pub(crate) async fn schedule_deletion(
        &self,
        arn: &str,
        replaced_by: Option<&str>,
    ) -> Result<(), BackendError> {
        let now = stamp_text(SystemTime::now());
        let mut new_tags = vec![(tags::DELETE_INTENT, now.as_str()), (tags::ACTIVE, "false")];
        if let Some(by) = replaced_by {
            new_tags.push((tags::REPLACED_BY, by));
        }
        if let Err(error) = self.tag(arn, &new_tags).await {
            tracing::warn!(key = arn, %error, "could not record the deletion intent; scheduling the deletion anyway");
        }
        keymanager_engine::failpoint!("delete.after_intent");
        match self
            .clients()
            .kms
            .schedule_key_deletion()
            .key_id(arn)
            .pending_window_in_days(DELETION_WINDOW_DAYS)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(
                    key = arn,
                    days = DELETION_WINDOW_DAYS,
                    "KMS key scheduled for deletion"
                );
                Ok(())
            }
            Err(e)
                if e.code() == Some("KMSInvalidStateException")
                    || e.code() == Some("NotFoundException") =>
            {
                Ok(())
            }
            Err(e) => Err(sdk_error(Service::Kms, "ScheduleKeyDeletion", arn, e)),
        }
    }
}

#[async_trait]
impl Backend for AwsKmsBackend {
    type Handle = AwsKey;
    type Config = KmsConfig<Self>;

    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPABILITIES
    }

    async fn discover(&self) -> Result<Vec<StoredKey<AwsKey>>, BackendError> {
        let found: Vec<(String, String)> = match self.discovery {
            // (key id, target key id): DescribeKey tells the ARN and the state.
            Discovery::Alias => self
                .trust_domain_aliases()
                .await?
                .into_iter()
                .filter_map(|(alias, target)| {
                    naming::key_id_from_alias(&alias, &self.trust_domain, &self.server_id)
                        .map(|id| (id, target))
                })
                .filter(|(id, _)| self.not_shared_now(id))
                .collect(),
            // The tagging API gives ARNs: one GetPublicKey per key, which also refuses a key
            // that is not enabled. Several active keys of one id are resolved first.
            Discovery::Tags => {
                let mut single = Vec::new();
                let mut resolved = Vec::new();
                for (id, arns) in self.active_by_tags(None).await? {
                    if !self.not_shared_now(&id) {
                        continue;
                    }
                    match arns.as_slice() {
                        [arn] => single.push((id, arn.clone())),
                        _ => {
                            tracing::warn!(key_id = %id, keys = ?arns, "several active keys for one id (an interrupted rotation); using the one the alias points at");
                            if let Some(arn) = self.current_among(&id, &arns).await? {
                                resolved.push((id, arn));
                            }
                        }
                    }
                }
                single.extend(resolved);
                let mut keys = Vec::with_capacity(single.len());
                for batch in single.chunks(CONCURRENCY) {
                    let loaded =
                        join_all(batch.iter().map(|(id, arn)| self.load_by_arn(id, arn))).await;
                    for key in loaded {
                        keys.extend(key?);
                    }
                }
                if let Some(shared) = &self.shared {
                    keys.extend(self.discover_shared(shared).await?);
                }
                return Ok(keys);
            }
        };
        let mut keys = Vec::with_capacity(found.len());
        for batch in found.chunks(CONCURRENCY) {
            let loaded = join_all(batch.iter().map(|(id, key)| self.load(id, key))).await;
            for key in loaded {
                keys.extend(key?);
            }
        }
        if let Some(shared) = &self.shared {
            keys.extend(self.discover_shared(shared).await?);
        }
        Ok(keys)
    }

    async fn prepare(
        &self,
        id: &KeyId,
        key_type: KeyType,
        _replaces: Option<&StoredKey<AwsKey>>,
    ) -> Result<AwsKey, BackendError> {
        if let Some(shared) = self.shared_for(id.as_str()) {
            return self.prepare_shared(shared, id, key_type).await;
        }
        self.create_key(id, key_type, OriginType::AwsKms).await
    }

    fn can_import(&self) -> bool {
        true
    }

    /// `CreateKey` with `Origin=EXTERNAL` (tagged inactive, as `prepare` does), the
    /// wrapping key from `GetParametersForImport`, the key wrapped here, then
    /// `ImportKeyMaterial` without expiry. A failure after the key exists puts it on the
    /// deletion path at once (it is inactive either way, so the sweep would too).
    async fn prepare_import(
        &self,
        id: &KeyId,
        key: &PrivateKeyMaterial,
        _replaces: Option<&StoredKey<AwsKey>>,
    ) -> Result<AwsKey, BackendError> {
        if self.shared_for(id.as_str()).is_some() {
            return Err(BackendError::new(
                BackendErrorKind::FailedPrecondition,
                format!(
                    "key {id} is a shared key (shared_keys), which every server rotates under a lock: import is not supported there"
                ),
            ));
        }
        let created = self
            .create_key(id, key.key_type(), OriginType::External)
            .await?;
        if let Err(error) = self.import_material(&created.arn, key).await {
            if let Err(cleanup) = self.schedule_deletion(&created.arn, None).await {
                tracing::warn!(key = %created.arn, error = %cleanup, "could not delete the key whose import failed; the sweep removes it");
            }
            return Err(error.context(format_args!("importing key {id} into {}", created.arn)));
        }
        Ok(created)
    }

    async fn public_key(&self, prepared: &AwsKey) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        self.read_public_key(&prepared.arn).await
    }

    async fn publish(
        &self,
        new: &StoredKey<AwsKey>,
        replaces: Option<&StoredKey<AwsKey>>,
    ) -> Result<(), BackendError> {
        if new.handle.shared.is_some() {
            // The rotation moved the shared alias already: every server sees it.
            return Ok(());
        }
        let alias = self.alias(&new.id)?;
        self.point_alias(&alias, &new.handle.arn, replaces.is_some())
            .await?;
        keymanager_engine::failpoint!("publish.after_alias");
        self.tag(&new.handle.arn, &[(tags::ACTIVE, "true")]).await
    }

    async fn find(&self, id: &KeyId) -> Result<Option<String>, BackendError> {
        if let Some(shared) = self.shared_for(id.as_str()) {
            let alias = self.shared_alias(shared, id.as_str())?;
            return Ok(self
                .describe(&alias)
                .await?
                .filter(|m| m.key_state() == Some(&KeyState::Enabled))
                .and_then(|m| m.arn().map(str::to_string)));
        }
        match self.discovery {
            Discovery::Alias => {
                let alias = self.alias(id)?;
                Ok(self
                    .describe(&alias)
                    .await?
                    .filter(|m| m.key_state() == Some(&KeyState::Enabled))
                    .and_then(|m| m.arn().map(str::to_string)))
            }
            Discovery::Tags => {
                let arns = self
                    .active_by_tags(Some(id.as_str()))
                    .await?
                    .remove(id.as_str())
                    .unwrap_or_default();
                self.current_among(id.as_str(), &arns).await
            }
        }
    }

    async fn abort(&self, prepared: &AwsKey) -> Result<(), BackendError> {
        if prepared.shared.is_some() {
            // Published to (and maybe adopted by) other servers: the sweep retires it.
            return Ok(());
        }
        self.schedule_deletion(&prepared.arn, None).await
    }

    async fn retire(
        &self,
        replaced: &StoredKey<AwsKey>,
        replaced_by: &StoredKey<AwsKey>,
    ) -> Result<(), BackendError> {
        if replaced.handle.shared.is_some() {
            // Other servers may still sign with it; the sweep deletes it once it has been
            // superseded for longer than stale_key_age and nobody stamps it any more.
            tracing::debug!(key = %replaced.handle.arn, "superseded shared key kept for other servers");
            return Ok(());
        }
        self.schedule_deletion(&replaced.handle.arn, Some(&replaced_by.handle.arn))
            .await
    }

    async fn sign(
        &self,
        key: &StoredKey<AwsKey>,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<BackendSignature, BackendError> {
        self.sign_traced(key, digest, scheme)
            .await
            .map(|signed| signed.signature)
    }

    /// Adds KMS's request id (`x-amzn-RequestId`, the `requestID` of the CloudTrail event).
    async fn sign_traced(
        &self,
        key: &StoredKey<AwsKey>,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<Signed, BackendError> {
        use SigningAlgorithmSpec as Spec;
        let algorithm = match (SchemeFamily::of(scheme), scheme.hash()) {
            (SchemeFamily::Ecdsa, HashAlgorithm::Sha256) => Spec::EcdsaSha256,
            (SchemeFamily::Ecdsa, HashAlgorithm::Sha384) => Spec::EcdsaSha384,
            (SchemeFamily::RsaPkcs1v15, HashAlgorithm::Sha256) => Spec::RsassaPkcs1V15Sha256,
            (SchemeFamily::RsaPkcs1v15, HashAlgorithm::Sha384) => Spec::RsassaPkcs1V15Sha384,
            (SchemeFamily::RsaPkcs1v15, HashAlgorithm::Sha512) => Spec::RsassaPkcs1V15Sha512,
            (SchemeFamily::RsaPss, HashAlgorithm::Sha256) => Spec::RsassaPssSha256,
            (SchemeFamily::RsaPss, HashAlgorithm::Sha384) => Spec::RsassaPssSha384,
            (SchemeFamily::RsaPss, HashAlgorithm::Sha512) => Spec::RsassaPssSha512,
            _ => {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidArgument,
                    format!("AWS KMS cannot sign {}", scheme.describe()),
                ));
            }
        };
        let out = self
            .clients()
            .kms
            .sign()
            .key_id(&*key.handle.arn)
            .message(Blob::new(digest.as_bytes()))
            .message_type(MessageType::Digest)
            .signing_algorithm(algorithm)
            .send()
            .await
            .map_err(|e| sdk_error(Service::Kms, "Sign", &key.handle.arn, e))?;
        let request_id = out.request_id().map(str::to_string);
        let signature = out
            .signature()
            .map(|b| b.as_ref().to_vec())
            .unwrap_or_default();
        Ok(Signed {
            signature: if key.key_type.is_rsa() {
                BackendSignature::Rsa(signature)
            } else {
                BackendSignature::EcdsaDer(signature)
            },
            request_id,
        })
    }

    async fn reconfigure(&self, config: &KmsConfig<Self>) -> Result<(), BackendError> {
        let clients = Clients::connect(&config.backend, config.endpoint.as_ref()).await;
        let policy = key_policy(&config.backend, &clients).await?;
        self.clients.set(clients);
        self.new_keys.set(NewKeys {
            policy,
            tags: config.backend.key_tags.clone(),
        });
        tracing::info!("aws_kms credentials, key policy and key tags reloaded");
        Ok(())
    }
}

#[async_trait]
impl KeyLifecycle for AwsKmsBackend {
    type Handle = AwsKey;

    fn identity(&self) -> SweeperIdentity {
        SweeperIdentity {
            trust_domain: self.trust_domain.clone(),
            server_id: self.server_id.clone(),
        }
    }

    async fn stamp(&self, keys: &[StoredKey<AwsKey>], now: SystemTime) -> Result<(), BackendError> {
        let stamp = stamp_text(now);
        for key in keys {
            self.tag(&key.handle.arn, &[(tags::LAST_UPDATE, &stamp)])
                .await?;
            keymanager_engine::failpoint!("stamp.after_key");
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<KeyRecord>, BackendError> {
        let tagged = self
            .tagged_keys(&[(tags::TRUST_DOMAIN, self.trust_domain.as_str())])
            .await?;
        // What discovery would find, to tell current keys from leftovers.
        let alias_targets: HashSet<String> = match self.discovery {
            Discovery::Alias => self
                .trust_domain_aliases()
                .await?
                .into_iter()
                .map(|(_, target)| target)
                .collect(),
            Discovery::Tags => HashSet::new(),
        };
        let mut described = Vec::with_capacity(tagged.len());
        for batch in tagged.chunks(CONCURRENCY) {
            let metadata = join_all(batch.iter().map(|(arn, _)| self.describe(arn))).await;
            for ((arn, key_tags), metadata) in batch.iter().zip(metadata) {
                if let Some(metadata) = metadata? {
                    described.push((arn.clone(), key_tags.clone(), metadata));
                }
            }
        }
        // Tag discovery: the current one among the enabled active keys of each (server, key
        // id), as `discover` would choose it.
        let mut active: BTreeMap<(String, String), Vec<(String, Option<KeyMetadata>)>> =
            BTreeMap::new();
        for (arn, key_tags, metadata) in &described {
            if key_tags.get(tags::ACTIVE).map(String::as_str) == Some("true")
                && let (Some(server), Some(id)) =
                    (key_tags.get(tags::SERVER_ID), key_tags.get(tags::KEY_ID))
            {
                active
                    .entry((server.clone(), id.clone()))
                    .or_default()
                    .push((arn.clone(), Some(metadata.clone())));
            }
        }
        let mut newest: HashSet<String> = HashSet::new();
        if self.discovery == Discovery::Tags {
            for ((server, id), candidates) in &active {
                newest.extend(self.current_of(server, id, candidates).await?);
            }
        }
        let mut records = self.shared_records(&described).await?;
        records.extend(
            described
                .iter()
                .filter(|(_, key_tags, _)| !key_tags.contains_key(naming::TAG_SHARED))
                .map(|(arn, key_tags, metadata)| {
                    let tag = |key: &str| key_tags.get(key).cloned();
                    let published = match self.discovery {
                        Discovery::Alias => alias_targets.contains(metadata.key_id()),
                        Discovery::Tags => newest.contains(arn),
                    };
                    KeyRecord {
                        locator: arn.clone(),
                        trust_domain: tag(tags::TRUST_DOMAIN),
                        server_id: tag(tags::SERVER_ID),
                        key_id: tag(tags::KEY_ID),
                        state: store_state(metadata),
                        published,
                        last_stamp: tag(tags::LAST_UPDATE).and_then(|v| parse_stamp(&v)),
                        created: created_at(metadata),
                        deletion_intent: tag(tags::DELETE_INTENT).is_some(),
                        replaced: tag(tags::DELETE_INTENT).and_then(|v| parse_stamp(&v)),
                        replaced_by: tag(tags::REPLACED_BY),
                    }
                }),
        );
        Ok(records)
    }

    async fn delete(&self, record: &KeyRecord) -> Result<(), BackendError> {
        self.schedule_deletion(&record.locator, None).await
    }
}

/// A shared key while the sweep records are built: generation, ARN, tags, metadata.
type SharedEntry<'a> = (u64, &'a str, &'a BTreeMap<String, String>, &'a KeyMetadata);

/// The sweep's view of a KMS key state.
fn store_state(metadata: &KeyMetadata) -> StoreKeyState {
    match metadata.key_state() {
        Some(KeyState::Enabled) => StoreKeyState::Enabled,
        Some(KeyState::PendingDeletion | KeyState::PendingReplicaDeletion) => {
            StoreKeyState::PendingDeletion
        }
        // Not a disabled key: one an interrupted import left without material (`keys
        // enable` cannot help it; the sweep removes it).
        Some(KeyState::PendingImport) => StoreKeyState::Incomplete,
        _ => StoreKeyState::Disabled,
    }
}

/// When KMS created a key.
fn created_at(metadata: &KeyMetadata) -> Option<SystemTime> {
    metadata
        .creation_date()
        .and_then(|d| u64::try_from(d.secs()).ok())
        .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
}

/// A KMS tag.
fn tag(key: &str, value: &str) -> Result<Tag, BackendError> {
    Tag::builder()
        .tag_key(key)
        .tag_value(value)
        .build()
        .map_err(|e| BackendError::with_source(BackendErrorKind::Internal, "building KMS tags", e))
}
