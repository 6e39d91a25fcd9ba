//! The `aws_kms` backend: keys are asymmetric SIGN_VERIFY KMS keys, found through this
//! server's aliases, and every signature is a KMS `Sign` over the digest.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyState, KeyUsageType, MessageType, SigningAlgorithmSpec, Tag};
use futures_util::future::join_all;
use keymanager_engine::lifecycle::{KeyLifecycle, parse_stamp, stamp_text};
use keymanager_engine::server_identity::ServerIdSource;
use keymanager_engine::settings::{Settings, SettingsError};
use keymanager_engine::sweep::{KeyRecord, StoreKeyState, SweeperIdentity};
use keymanager_engine::{
    Backend, BackendConfig, BackendError, BackendErrorKind, BackendFactory, BackendKey,
    BackendSignature, Capabilities, CoreConfig, Digest, HashAlgorithm, KeyHandle, KeyId, KeyType,
    PssSaltSupport, SchemeFamily, SignatureScheme, SigningSupport,
};

use crate::config::{AwsKmsConfig, Credentials, Discovery, SETTING_KEYS};
use crate::naming;
use crate::policy::CallerRole;

/// Keys described and loaded at once during discovery.
const DISCOVERY_CONCURRENCY: usize = 16;
/// KMS's deletion window for replaced keys.
const DELETION_WINDOW_DAYS: i32 = 7;
/// One KMS call may take this long; the engine retries inside SPIRE's 30 s deadline.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(8);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What AWS KMS signs: ECDSA only with the curve's own hash; RSA PKCS#1 and PSS with
/// SHA-256/384/512; PSS always with a salt as long as the hash.
const SIGNING: &[(KeyType, SchemeFamily, HashAlgorithm)] = &[
    (KeyType::EcP256, SchemeFamily::Ecdsa, HashAlgorithm::Sha256),
    (KeyType::EcP384, SchemeFamily::Ecdsa, HashAlgorithm::Sha384),
    (
        KeyType::Rsa2048,
        SchemeFamily::RsaPkcs1v15,
        HashAlgorithm::Sha256,
    ),
    (
        KeyType::Rsa2048,
        SchemeFamily::RsaPkcs1v15,
        HashAlgorithm::Sha384,
    ),
    (
        KeyType::Rsa2048,
        SchemeFamily::RsaPkcs1v15,
        HashAlgorithm::Sha512,
    ),
    (
        KeyType::Rsa2048,
        SchemeFamily::RsaPss,
        HashAlgorithm::Sha256,
    ),
    (
        KeyType::Rsa2048,
        SchemeFamily::RsaPss,
        HashAlgorithm::Sha384,
    ),
    (
        KeyType::Rsa2048,
        SchemeFamily::RsaPss,
        HashAlgorithm::Sha512,
    ),
    (
        KeyType::Rsa4096,
        SchemeFamily::RsaPkcs1v15,
        HashAlgorithm::Sha256,
    ),
    (
        KeyType::Rsa4096,
        SchemeFamily::RsaPkcs1v15,
        HashAlgorithm::Sha384,
    ),
    (
        KeyType::Rsa4096,
        SchemeFamily::RsaPkcs1v15,
        HashAlgorithm::Sha512,
    ),
    (
        KeyType::Rsa4096,
        SchemeFamily::RsaPss,
        HashAlgorithm::Sha256,
    ),
    (
        KeyType::Rsa4096,
        SchemeFamily::RsaPss,
        HashAlgorithm::Sha384,
    ),
    (
        KeyType::Rsa4096,
        SchemeFamily::RsaPss,
        HashAlgorithm::Sha512,
    ),
];

const CAPABILITIES: Capabilities = Capabilities {
    key_types: &KeyType::ALL,
    signing: SigningSupport::Only(SIGNING),
    pss_salt: PssSaltSupport::HashLengthOnly,
    key_algorithm_name: None,
};

/// Registers the `aws_kms` backend.
pub struct AwsKmsFactory;

impl BackendFactory for AwsKmsFactory {
    fn name(&self) -> &'static str {
        "aws_kms"
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
        let config = AwsKmsConfig::parse(settings)?;
        Ok(Box::new(AwsBackendConfig {
            config,
            trust_domain: core.trust_domain.clone(),
        }))
    }
}

/// A validated configuration plus the trust domain.
#[derive(Debug)]
pub struct AwsBackendConfig {
    config: AwsKmsConfig,
    trust_domain: String,
}

#[async_trait]
impl BackendConfig for AwsBackendConfig {
    fn store_identity(&self) -> String {
        let server = match &self.config.server_id {
            ServerIdSource::File(path) => format!("file:{}", path.display()),
            ServerIdSource::Value(value) => format!("value:{value}"),
        };
        format!(
            "aws_kms:{}:{}:{}:{server}",
            self.config.region,
            self.config
                .endpoint
                .as_deref()
                .unwrap_or("default-endpoint"),
            self.trust_domain
        )
    }

    fn problems(&self) -> Vec<String> {
        self.config.server_id.problems()
    }

    async fn open(&self) -> Result<Arc<dyn Backend>, BackendError> {
        for warning in &self.config.warnings {
            tracing::warn!("{warning}");
        }
        let server_id = self.config.server_id.resolve()?;
        let (client, tagging, sts) = clients(&self.config).await;
        let key_policy = match &self.config.key_policy {
            Some(policy) => Some(policy.clone()),
            None => default_key_policy(&sts).await,
        };
        tracing::info!(
            region = %self.config.region,
            endpoint = self.config.endpoint.as_deref().unwrap_or("default"),
            server_id = %server_id,
            alias_prefix = %naming::alias_prefix(&self.trust_domain, &server_id),
            "aws_kms backend ready"
        );
        Ok(Arc::new(AwsKmsBackend {
            client,
            tagging,
            trust_domain: self.trust_domain.clone(),
            server_id,
            key_policy,
            config: self.config.clone(),
        }))
    }
}

/// The KMS client and the Resource Groups Tagging client, sharing credentials.
async fn clients(
    config: &AwsKmsConfig,
) -> (
    aws_sdk_kms::Client,
    aws_sdk_resourcegroupstagging::Client,
    aws_sdk_sts::Client,
) {
    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    use aws_config::{BehaviorVersion, Region};

    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(config.region.clone()))
        // The engine retries idempotent calls within SPIRE's deadline; SDK retries on top
        // would multiply attempts (and would retry CreateKey).
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        );
    if let Some(endpoint) = &config.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Credentials::Static {
        access_key_id,
        secret_access_key,
    } = &config.credentials
    {
        loader = loader.credentials_provider(aws_sdk_kms::config::Credentials::new(
            access_key_id,
            secret_access_key.expose(),
            None,
            None,
            "plugin_data",
        ));
    }
    let sdk_config = loader.load().await;
    let mut kms_config = aws_sdk_kms::config::Builder::from(&sdk_config);
    let mut tagging_config = aws_sdk_resourcegroupstagging::config::Builder::from(&sdk_config);
    let mut sts_config = aws_sdk_sts::config::Builder::from(&sdk_config);
    if let Some(role) = &config.assume_role {
        let mut provider = aws_config::sts::AssumeRoleProvider::builder(&role.role_arn)
            .session_name(&role.session_name)
            .configure(&sdk_config);
        if let Some(external_id) = &role.external_id {
            provider = provider.external_id(external_id.expose());
        }
        let shared = aws_sdk_kms::config::SharedCredentialsProvider::new(provider.build().await);
        kms_config = kms_config.credentials_provider(shared.clone());
        tagging_config = tagging_config.credentials_provider(shared.clone());
        sts_config = sts_config.credentials_provider(shared);
    }
    (
        aws_sdk_kms::Client::from_conf(kms_config.build()),
        aws_sdk_resourcegroupstagging::Client::from_conf(tagging_config.build()),
        aws_sdk_sts::Client::from_conf(sts_config.build()),
    )
}

/// The least-privilege policy when this server runs as an assumed role; `None` (the account
/// default, with a warning) otherwise or when STS cannot tell.
async fn default_key_policy(sts: &aws_sdk_sts::Client) -> Option<String> {
    match sts.get_caller_identity().send().await {
        Ok(identity) => match identity.arn().and_then(CallerRole::from_caller_arn) {
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
        },
        Err(error) => {
            tracing::warn!(
                error = %aws_sdk_sts::error::DisplayErrorContext(&error),
                "cannot determine the caller identity; new keys get the account's default key policy"
            );
            None
        }
    }
}

/// The KMS key behind a [`KeyHandle`].
struct KmsKeyRef {
    arn: String,
}

/// The backend.
pub struct AwsKmsBackend {
    client: aws_sdk_kms::Client,
    tagging: aws_sdk_resourcegroupstagging::Client,
    /// `key_policy_file`, else the least-privilege policy for an assumed role, else `None`
    /// (the account's default policy).
    key_policy: Option<String>,
    trust_domain: String,
    server_id: String,
    config: AwsKmsConfig,
}

impl AwsKmsBackend {
    async fn public_key(&self, id: KeyId, arn: &str) -> Result<BackendKey, BackendError> {
        let out = self
            .client
            .get_public_key()
            .key_id(arn)
            .send()
            .await
            .map_err(|e| map_sdk_error("GetPublicKey", arn, e))?;
        let spec = out.key_spec().cloned();
        let key_type = match spec {
            Some(KeySpec::EccNistP256) => KeyType::EcP256,
            Some(KeySpec::EccNistP384) => KeyType::EcP384,
            Some(KeySpec::Rsa2048) => KeyType::Rsa2048,
            Some(KeySpec::Rsa4096) => KeyType::Rsa4096,
            other => {
                return Err(BackendError::new(
                    BackendErrorKind::FailedPrecondition,
                    format!(
                        "KMS key {arn} for {id:?} has key spec {other:?}, which SPIRE cannot use"
                    ),
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
        Ok(BackendKey {
            id,
            key_type,
            spki_der: Arc::from(spki),
            handle: KeyHandle::new(
                arn.to_string(),
                KmsKeyRef {
                    arn: arn.to_string(),
                },
            ),
        })
    }

    fn tags(&self, id: &KeyId) -> Result<Vec<Tag>, BackendError> {
        let now = stamp_text(SystemTime::now());
        let ours = [
            (naming::TAG_TRUST_DOMAIN, self.trust_domain.as_str()),
            (naming::TAG_SERVER_ID, self.server_id.as_str()),
            (naming::TAG_KEY_ID, id.as_str()),
            // Activated only once the alias points at it: a key left behind by a crash
            // half-way through GenerateKey stays inactive, and the sweep removes it.
            (naming::TAG_ACTIVE, "false"),
            (naming::TAG_LAST_UPDATE, now.as_str()),
        ];
        ours.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain(
                self.config
                    .key_tags
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            )
            .map(|(k, v)| tag(&k, &v))
            .collect()
    }

    /// Points `alias` at `arn`: UpdateAlias when this server already serves a key under
    /// the id (rotation), CreateAlias otherwise, each falling back to the other when the
    /// store disagrees (an alias left by a crashed start, or deleted by hand).
    async fn point_alias(&self, alias: &str, arn: &str, exists: bool) -> Result<(), BackendError> {
        let update = || {
            self.client
                .update_alias()
                .alias_name(alias)
                .target_key_id(arn)
                .send()
        };
        let create = || {
            self.client
                .create_alias()
                .alias_name(alias)
                .target_key_id(arn)
                .send()
        };
        if exists {
            match update().await {
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some("NotFoundException") => create()
                    .await
                    .map(|_| ())
                    .map_err(|e| map_sdk_error("CreateAlias", alias, e)),
                Err(e) => Err(map_sdk_error("UpdateAlias", alias, e)),
            }
        } else {
            match create().await {
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some("AlreadyExistsException") => update()
                    .await
                    .map(|_| ())
                    .map_err(|e| map_sdk_error("UpdateAlias", alias, e)),
                Err(e) => Err(map_sdk_error("CreateAlias", alias, e)),
            }
        }
    }

    /// Alias discovery (SPIRE's default): pages through the account's aliases.
    async fn load_by_alias(&self) -> Result<Vec<BackendKey>, BackendError> {
        // This server's aliases first; then DescribeKey + GetPublicKey per key, a few at a
        // time, so start-up costs a handful of round trips rather than two per key.
        let mut mine = Vec::new();
        // 100 is KMS's largest page (the default is 50).
        let mut aliases = self
            .client
            .list_aliases()
            .limit(100)
            .into_paginator()
            .items()
            .send();
        while let Some(alias) = aliases.next().await {
            let alias = alias.map_err(|e| map_sdk_error("ListAliases", "aliases", e))?;
            let (Some(name), Some(target)) = (alias.alias_name(), alias.target_key_id()) else {
                continue;
            };
            if let Some(key_id) =
                naming::key_id_from_alias(name, &self.trust_domain, &self.server_id)
            {
                mine.push((name.to_string(), target.to_string(), key_id));
            }
        }
        let mut keys = Vec::with_capacity(mine.len());
        for batch in mine.chunks(DISCOVERY_CONCURRENCY) {
            let loaded = batch
                .iter()
                .map(|(alias, target, key_id)| self.load_one(alias, target, key_id));
            for result in join_all(loaded).await {
                if let Some(key) = result? {
                    keys.push(key);
                }
            }
        }
        Ok(keys)
    }

    /// Tag discovery: asks the tagging API for this server's active keys only, so start-up
    /// cost does not grow with the other keys in the account. One GetPublicKey per key.
    async fn load_by_tags(&self) -> Result<Vec<BackendKey>, BackendError> {
        let tagged = self
            .tagged_keys(&[
                (naming::TAG_TRUST_DOMAIN, self.trust_domain.as_str()),
                (naming::TAG_SERVER_ID, self.server_id.as_str()),
                (naming::TAG_ACTIVE, "true"),
            ])
            .await?;
        // Newest stamp wins when a crash left two active keys for one id.
        let mut newest: std::collections::BTreeMap<String, (u64, String)> =
            std::collections::BTreeMap::new();
        for (arn, tags) in tagged {
            let Some(key_id) = tags.get(naming::TAG_KEY_ID).cloned() else {
                continue;
            };
            let stamp = tags
                .get(naming::TAG_LAST_UPDATE)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            match newest.get(&key_id) {
                Some((existing, other)) if *existing >= stamp => {
                    tracing::warn!(key_id = %key_id, kept = %other, ignored = %arn, "two active keys for one id; keeping the newest")
                }
                _ => {
                    newest.insert(key_id, (stamp, arn));
                }
            }
        }
        let found: Vec<(String, String)> =
            newest.into_iter().map(|(id, (_, arn))| (id, arn)).collect();
        let mut keys = Vec::with_capacity(found.len());
        for batch in found.chunks(DISCOVERY_CONCURRENCY) {
            let loaded = batch.iter().map(|(key_id, arn)| async move {
                let Ok(id) = KeyId::new(key_id) else {
                    return Ok(None);
                };
                match self.public_key(id, arn).await {
                    Ok(key) => Ok(Some(key)),
                    // Disabled or pending deletion: reported, regenerated when SPIRE asks.
                    Err(error) if error.kind == BackendErrorKind::FailedPrecondition => {
                        tracing::warn!(key = %arn, %error, "skipping a key that is not usable");
                        Ok(None)
                    }
                    Err(error) => Err(error),
                }
            });
            for result in join_all(loaded).await {
                if let Some(key) = result? {
                    keys.push(key);
                }
            }
        }
        Ok(keys)
    }

    /// Marks a key active once its alias points at it.
    async fn activate(&self, arn: &str) -> Result<(), BackendError> {
        let active = tag(naming::TAG_ACTIVE, "true")?;
        self.client
            .tag_resource()
            .key_id(arn)
            .tags(active)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| map_sdk_error("TagResource", arn, e))
    }

    /// KMS keys whose tags match every (key, value) pair, with all their tags, through the
    /// Resource Groups Tagging API (never a listing of the whole account).
    async fn tagged_keys(
        &self,
        filters: &[(&str, &str)],
    ) -> Result<Vec<(String, std::collections::BTreeMap<String, String>)>, BackendError> {
        use aws_sdk_resourcegroupstagging::types::TagFilter;
        let filters = filters
            .iter()
            .map(|(key, value)| TagFilter::builder().key(*key).values(*value).build())
            .collect();
        let mut pages = self
            .tagging
            .get_resources()
            .resource_type_filters("kms:key")
            .set_tag_filters(Some(filters))
            .into_paginator()
            .items()
            .send();
        let mut out = Vec::new();
        while let Some(mapping) = pages.next().await {
            let mapping = mapping.map_err(|e| map_sdk_error("GetResources", "tagging API", e))?;
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

    /// Describes and loads one aliased key; `None` for a key that is not usable now.
    async fn load_one(
        &self,
        alias: &str,
        target: &str,
        key_id: &str,
    ) -> Result<Option<BackendKey>, BackendError> {
        let described = self
            .client
            .describe_key()
            .key_id(target)
            .send()
            .await
            .map_err(|e| map_sdk_error("DescribeKey", target, e))?;
        let Some(metadata) = described.key_metadata() else {
            return Ok(None);
        };
        let arn = metadata.arn().unwrap_or(target).to_string();
        if metadata.key_state() != Some(&KeyState::Enabled) {
            // Reported, not fatal: SPIRE regenerates the key when it needs it.
            tracing::warn!(alias, key = %arn, state = ?metadata.key_state(), "skipping a key that is not enabled");
            return Ok(None);
        }
        let Ok(id) = KeyId::new(key_id) else {
            return Ok(None);
        };
        self.public_key(id, &arn).await.map(Some)
    }

    async fn schedule_deletion(&self, arn: &str) -> Result<(), BackendError> {
        let now = stamp_text(SystemTime::now());
        // The intent is recorded in KMS first: if the process dies before the schedule call,
        // the next sweep still finds and finishes it.
        let intent = tag(naming::TAG_DELETE_INTENT, &now)?;
        // Inactive in the same call: tag discovery then never finds a replaced key.
        let inactive = tag(naming::TAG_ACTIVE, "false")?;
        if let Err(error) = self
            .client
            .tag_resource()
            .key_id(arn)
            .tags(intent)
            .tags(inactive)
            .send()
            .await
        {
            tracing::warn!(key = arn, error = %map_sdk_error("TagResource", arn, error), "could not record deletion intent");
        }
        match self
            .client
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
                    "replaced KMS key scheduled for deletion"
                );
                Ok(())
            }
            Err(e)
                if e.code() == Some("KMSInvalidStateException")
                    || e.code() == Some("NotFoundException") =>
            {
                Ok(())
            }
            Err(e) => Err(map_sdk_error("ScheduleKeyDeletion", arn, e)),
        }
    }
}

#[async_trait]
impl Backend for AwsKmsBackend {
    fn name(&self) -> &'static str {
        "aws_kms"
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPABILITIES
    }

    async fn load_keys(&self) -> Result<Vec<BackendKey>, BackendError> {
        match self.config.discovery {
            Discovery::Alias => self.load_by_alias().await,
            Discovery::Tags => self.load_by_tags().await,
        }
    }

    async fn create_key(
        &self,
        id: &KeyId,
        key_type: KeyType,
        replaces: Option<&BackendKey>,
    ) -> Result<BackendKey, BackendError> {
        let alias = naming::alias_name(&self.trust_domain, &self.server_id, id.as_str())
            .map_err(|reason| BackendError::new(BackendErrorKind::InvalidArgument, reason))?;
        let spec = match key_type {
            KeyType::EcP256 => KeySpec::EccNistP256,
            KeyType::EcP384 => KeySpec::EccNistP384,
            KeyType::Rsa2048 => KeySpec::Rsa2048,
            KeyType::Rsa4096 => KeySpec::Rsa4096,
        };
        let mut request = self
            .client
            .create_key()
            .key_spec(spec)
            .key_usage(KeyUsageType::SignVerify)
            .description(naming::description(&self.trust_domain, id.as_str()))
            .set_tags(Some(self.tags(id)?));
        if let Some(policy) = &self.key_policy {
            request = request.policy(policy);
        }
        let created = request
            .send()
            .await
            .map_err(|e| map_sdk_error("CreateKey", id.as_str(), e))?;
        let arn = created
            .key_metadata()
            .and_then(|m| m.arn())
            .ok_or_else(|| {
                BackendError::new(BackendErrorKind::Internal, "CreateKey returned no key ARN")
            })?
            .to_string();
        let finish = async {
            let key = self.public_key(id.clone(), &arn).await?;
            self.point_alias(&alias, &arn, replaces.is_some()).await?;
            self.activate(&arn).await?;
            Ok::<_, BackendError>(key)
        };
        match finish.await {
            Ok(key) => Ok(key),
            Err(error) => {
                // The key exists but is not reachable under its alias: never leave it behind.
                if let Err(cleanup) = self.schedule_deletion(&arn).await {
                    tracing::warn!(key = %arn, error = %cleanup, "could not schedule the half-created key for deletion; the sweep will");
                }
                Err(error)
            }
        }
    }

    async fn sign(
        &self,
        key: &BackendKey,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<BackendSignature, BackendError> {
        let key_ref = key.handle.get::<KmsKeyRef>(self.name())?;
        let algorithm = match (scheme, scheme.hash()) {
            (SignatureScheme::Ecdsa(_), HashAlgorithm::Sha256) => SigningAlgorithmSpec::EcdsaSha256,
            (SignatureScheme::Ecdsa(_), HashAlgorithm::Sha384) => SigningAlgorithmSpec::EcdsaSha384,
            (SignatureScheme::RsaPkcs1v15(_), HashAlgorithm::Sha256) => {
                SigningAlgorithmSpec::RsassaPkcs1V15Sha256
            }
            (SignatureScheme::RsaPkcs1v15(_), HashAlgorithm::Sha384) => {
                SigningAlgorithmSpec::RsassaPkcs1V15Sha384
            }
            (SignatureScheme::RsaPkcs1v15(_), HashAlgorithm::Sha512) => {
                SigningAlgorithmSpec::RsassaPkcs1V15Sha512
            }
            (SignatureScheme::RsaPss { .. }, HashAlgorithm::Sha256) => {
                SigningAlgorithmSpec::RsassaPssSha256
            }
            (SignatureScheme::RsaPss { .. }, HashAlgorithm::Sha384) => {
                SigningAlgorithmSpec::RsassaPssSha384
            }
            (SignatureScheme::RsaPss { .. }, HashAlgorithm::Sha512) => {
                SigningAlgorithmSpec::RsassaPssSha512
            }
            (scheme, _) => {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidArgument,
                    format!("AWS KMS cannot sign {}", scheme.describe()),
                ));
            }
        };
        let out = self
            .client
            .sign()
            .key_id(&key_ref.arn)
            .message(Blob::new(digest.as_bytes()))
            .message_type(MessageType::Digest)
            .signing_algorithm(algorithm)
            .send()
            .await
            .map_err(|e| map_sdk_error("Sign", &key_ref.arn, e))?;
        let signature = out
            .signature()
            .map(|b| b.as_ref().to_vec())
            .unwrap_or_default();
        Ok(if key.key_type.is_rsa() {
            BackendSignature::Rsa(signature)
        } else {
            BackendSignature::EcdsaDer(signature)
        })
    }

    async fn retire_key(&self, replaced: &BackendKey) -> Result<(), BackendError> {
        let key_ref = replaced.handle.get::<KmsKeyRef>(self.name())?;
        self.schedule_deletion(&key_ref.arn).await
    }

    fn lifecycle(&self) -> Option<&dyn KeyLifecycle> {
        Some(self)
    }
}

#[async_trait]
impl KeyLifecycle for AwsKmsBackend {
    fn identity(&self) -> SweeperIdentity {
        SweeperIdentity {
            trust_domain: self.trust_domain.clone(),
            server_id: self.server_id.clone(),
        }
    }

    async fn stamp(&self, keys: &[BackendKey], now: SystemTime) -> Result<(), BackendError> {
        let stamp = stamp_text(now);
        for key in keys {
            let Some(key_ref) = key.handle.downcast::<KmsKeyRef>() else {
                continue;
            };
            self.client
                .tag_resource()
                .key_id(&key_ref.arn)
                .tags(tag(naming::TAG_LAST_UPDATE, &stamp)?)
                .send()
                .await
                .map_err(|e| map_sdk_error("TagResource", &key_ref.arn, e))?;
        }
        Ok(())
    }

    async fn list_trust_domain_keys(&self) -> Result<Vec<KeyRecord>, BackendError> {
        let tagged = self
            .tagged_keys(&[(naming::TAG_TRUST_DOMAIN, self.trust_domain.as_str())])
            .await?;
        let mut records = Vec::new();
        for (arn, tags) in tagged {
            let arn = arn.as_str();
            let tag = |key: &str| tags.get(key).cloned();
            let described = match self.client.describe_key().key_id(arn).send().await {
                Ok(out) => out,
                Err(e) if e.code() == Some("NotFoundException") => continue,
                Err(e) => return Err(map_sdk_error("DescribeKey", arn, e)),
            };
            let Some(metadata) = described.key_metadata() else {
                continue;
            };
            let state = match metadata.key_state() {
                Some(KeyState::Enabled) => StoreKeyState::Enabled,
                Some(KeyState::PendingDeletion) | Some(KeyState::PendingReplicaDeletion) => {
                    StoreKeyState::PendingDeletion
                }
                _ => StoreKeyState::Disabled,
            };
            records.push(KeyRecord {
                locator: arn.to_string(),
                trust_domain: tag(naming::TAG_TRUST_DOMAIN),
                server_id: tag(naming::TAG_SERVER_ID),
                state,
                active: tag(naming::TAG_ACTIVE).as_deref() == Some("true"),
                last_stamp: tag(naming::TAG_LAST_UPDATE).and_then(|v| parse_stamp(&v)),
                created: metadata
                    .creation_date()
                    .and_then(|d| u64::try_from(d.secs()).ok())
                    .map(|secs| UNIX_EPOCH + Duration::from_secs(secs)),
                deletion_intent: tag(naming::TAG_DELETE_INTENT).is_some(),
            });
        }
        Ok(records)
    }

    async fn delete(&self, locator: &str) -> Result<(), BackendError> {
        self.schedule_deletion(locator).await
    }
}

/// A KMS tag.
fn tag(key: &str, value: &str) -> Result<Tag, BackendError> {
    Tag::builder()
        .tag_key(key)
        .tag_value(value)
        .build()
        .map_err(|e| BackendError::with_source(BackendErrorKind::Internal, "building KMS tags", e))
}

/// Unix seconds, as the `spire-last-update` and intent tags hold them.
/// Maps an SDK failure (KMS or the tagging API: both share smithy's response type) to a
/// kind once, naming the operation and the object.
fn map_sdk_error<E>(
    operation: &str,
    object: &str,
    error: SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (kind, detail) = match &error {
        SdkError::TimeoutError(_) => (BackendErrorKind::Unavailable, "timed out".to_string()),
        SdkError::DispatchFailure(_) => (
            BackendErrorKind::Unavailable,
            "could not reach KMS".to_string(),
        ),
        SdkError::ResponseError(_) => (
            BackendErrorKind::Unavailable,
            "unreadable KMS response".to_string(),
        ),
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("unknown");
            let kind = match code {
                "ThrottlingException" | "LimitExceededException" => {
                    BackendErrorKind::ResourceExhausted
                }
                "NotFoundException" => BackendErrorKind::NotFound,
                "AccessDeniedException" | "AccessDenied" | "UnrecognizedClientException" => {
                    BackendErrorKind::PermissionDenied
                }
                "DisabledException" | "KMSInvalidStateException" => {
                    BackendErrorKind::FailedPrecondition
                }
                "ValidationException" | "InvalidKeyUsageException" => {
                    BackendErrorKind::InvalidArgument
                }
                "KMSInternalException"
                | "DependencyTimeoutException"
                | "InternalFailure"
                | "ServiceUnavailable" => BackendErrorKind::Unavailable,
                _ if service.raw().status().is_server_error() => BackendErrorKind::Unavailable,
                _ => BackendErrorKind::Internal,
            };
            (
                kind,
                format!("{code}: {}", service.err().message().unwrap_or("")),
            )
        }
        _ => (
            BackendErrorKind::Internal,
            "request could not be built".to_string(),
        ),
    };
    BackendError::new(
        kind,
        format!("KMS {operation} on {object} failed: {detail}"),
    )
}
