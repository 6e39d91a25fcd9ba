//! The Cloud KMS calls this backend makes, on Google's official client (HTTP/JSON), with one
//! error mapping and the CRC32C integrity checks Google asks clients to do.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use google_cloud_gax::error::Error as GaxError;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::retry_policy::NeverRetry;
use google_cloud_iam_v1::model::{Binding, GetPolicyOptions, Policy};
use google_cloud_kms_v1::client::KeyManagementService;
use google_cloud_kms_v1::model::crypto_key::CryptoKeyPurpose;
use google_cloud_kms_v1::model::crypto_key_version::{
    CryptoKeyVersionAlgorithm as Algorithm, CryptoKeyVersionState as State,
};
use google_cloud_kms_v1::model::{
    CryptoKey, CryptoKeyVersion, CryptoKeyVersionTemplate, Digest as KmsDigest, ProtectionLevel,
};
use google_cloud_wkt::FieldMask;
use keymanager_engine::kit::classify;
use keymanager_engine::kit::paging::PageGuard;
use keymanager_engine::{BackendError, BackendErrorKind, Digest, HashAlgorithm, KeyType};

use crate::config;

/// One Cloud KMS call may take this long; the engine retries reads and signs.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(8);
/// Cloud KMS's largest page.
const PAGE_SIZE: i32 = 1000;
/// The role the default IAM policy grants (SPIRE's choice).
pub const SIGNER_ROLE: &str = "roles/cloudkms.signerVerifier";

/// The Cloud KMS algorithm SPIRE's `gcp_kms` creates for a key type. RSA keys use PKCS#1
/// v1.5 with SHA-256, what Go's x509 and SPIRE's RS256 JWTs sign with.
pub fn algorithm_for(key_type: KeyType) -> Algorithm {
    match key_type {
        KeyType::EcP256 => Algorithm::EcSignP256Sha256,
        KeyType::EcP384 => Algorithm::EcSignP384Sha384,
        KeyType::Rsa2048 => Algorithm::RsaSignPkcs12048Sha256,
        KeyType::Rsa4096 => Algorithm::RsaSignPkcs14096Sha256,
    }
}

/// The key type of a version SPIRE's plugin could have created, if any.
pub fn key_type_of(algorithm: &Algorithm) -> Option<KeyType> {
    match algorithm {
        Algorithm::EcSignP256Sha256 => Some(KeyType::EcP256),
        Algorithm::EcSignP384Sha384 => Some(KeyType::EcP384),
        Algorithm::RsaSignPkcs12048Sha256 => Some(KeyType::Rsa2048),
        Algorithm::RsaSignPkcs14096Sha256 => Some(KeyType::Rsa4096),
        _ => None,
    }
}

/// CRC32C (Castagnoli) as Cloud KMS's integrity fields carry it.
pub fn crc32c(data: &[u8]) -> i64 {
    i64::from(crc32c::crc32c(data))
}

fn protection_level(protection: config::ProtectionLevel) -> ProtectionLevel {
    match protection {
        config::ProtectionLevel::Software => ProtectionLevel::Software,
        config::ProtectionLevel::Hsm => ProtectionLevel::Hsm,
    }
}

/// The DER body of a PEM block.
fn pem_body(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| l.trim().chars())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()
        .filter(|der| !der.is_empty())
}

/// A store timestamp as `SystemTime`.
pub fn to_system_time(t: Option<&google_cloud_wkt::Timestamp>) -> Option<SystemTime> {
    let t = t?;
    u64::try_from(t.seconds())
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

/// The number of a version name (`…/cryptoKeyVersions/7` → 7).
pub fn version_number(name: &str) -> u64 {
    crate::naming::last_segment(name).parse().unwrap_or(0)
}

/// The CryptoKey of a version name.
pub fn crypto_key_of(version_name: &str) -> &str {
    version_name
        .split_once("/cryptoKeyVersions/")
        .map_or(version_name, |(key, _)| key)
}

/// True for a version that can sign or soon will.
pub fn is_live(state: &State) -> bool {
    matches!(state, State::Enabled | State::PendingGeneration)
}

/// What went wrong in a Cloud KMS call.
#[derive(Debug)]
pub struct KmsError {
    /// The status code, when the service answered.
    pub code: Option<Code>,
    /// For the engine.
    pub error: BackendError,
}

impl KmsError {
    /// A failure found on this side (not a service answer).
    pub fn local(error: BackendError) -> Self {
        Self { code: None, error }
    }

    fn is(&self, code: Code) -> bool {
        self.code == Some(code)
    }
    /// `ALREADY_EXISTS`.
    pub fn already_exists(&self) -> bool {
        self.is(Code::AlreadyExists)
    }
    /// `NOT_FOUND`.
    pub fn not_found(&self) -> bool {
        self.is(Code::NotFound)
    }
    /// `FAILED_PRECONDITION` (wrong version state).
    pub fn failed_precondition(&self) -> bool {
        self.is(Code::FailedPrecondition)
    }
}

impl From<KmsError> for BackendError {
    fn from(e: KmsError) -> Self {
        e.error
    }
}

type KmsResult<T> = Result<T, KmsError>;

/// Maps a client error once, naming the operation and the resource and keeping the whole
/// cause chain. Decided by the gRPC status when the service answered; otherwise credentials
/// (missing or refused: `Unauthenticated`, not retried) are told apart from transport.
fn map_error(operation: &str, resource: &str, error: GaxError) -> KmsError {
    let code = error.status().map(|s| s.code);
    let kind = match code {
        Some(Code::InvalidArgument | Code::OutOfRange) => BackendErrorKind::InvalidArgument,
        Some(Code::NotFound) => BackendErrorKind::NotFound,
        Some(Code::Unauthenticated) => BackendErrorKind::Unauthenticated,
        Some(Code::PermissionDenied) => BackendErrorKind::PermissionDenied,
        Some(Code::ResourceExhausted) => BackendErrorKind::ResourceExhausted,
        Some(Code::FailedPrecondition | Code::AlreadyExists) => {
            BackendErrorKind::FailedPrecondition
        }
        // Google documents INTERNAL, UNAVAILABLE and DEADLINE_EXCEEDED as retryable.
        Some(
            Code::Unavailable
            | Code::Internal
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Unknown
            | Code::Cancelled,
        ) => BackendErrorKind::Unavailable,
        Some(_) => BackendErrorKind::Internal,
        None if error.is_authentication() => credentials_kind(&error),
        None => match error.http_status_code() {
            Some(status) => classify::kind_for_http_status(status),
            // Timeouts, refused or dropped connections.
            None => classify::kind_for_transport(&error),
        },
    };
    let error = match error.status() {
        Some(status) => classify::service_failed(
            kind,
            "Cloud KMS",
            operation,
            resource,
            Some(status.code.name()),
            Some(&status.message),
            error.http_status_code(),
        ),
        None if error.is_timeout() => BackendError::new(
            kind,
            format!(
                "Cloud KMS {operation} on {resource} failed: timed out after {}s",
                ATTEMPT_TIMEOUT.as_secs()
            ),
        ),
        None => classify::call_failed(kind, "Cloud KMS", operation, resource, error),
    };
    KmsError { code, error }
}

/// Getting a token failed: transient (the token endpoint or metadata server did not answer)
/// or not (no credentials, a refused key).
fn credentials_kind(error: &(dyn std::error::Error + 'static)) -> BackendErrorKind {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(credentials) = e.downcast_ref::<google_cloud_auth::errors::CredentialsError>() {
            return if credentials.is_transient() {
                BackendErrorKind::Unavailable
            } else {
                BackendErrorKind::Unauthenticated
            };
        }
        current = e.source();
    }
    BackendErrorKind::Unauthenticated
}

fn integrity_error(what: &str, resource: &str) -> KmsError {
    KmsError {
        code: None,
        error: BackendError::new(
            BackendErrorKind::Unavailable,
            format!(
                "Cloud KMS {what} for {resource} failed its CRC32C integrity check (corrupted in transit); nothing was used"
            ),
        ),
    }
}

/// A public key as Cloud KMS returned it, integrity-checked.
pub struct FetchedPublicKey {
    /// DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// The version's algorithm.
    pub algorithm: Algorithm,
}

/// How the client authenticates.
pub enum Auth {
    /// A service account key file.
    ServiceAccountFile(std::path::PathBuf),
    /// Application Default Credentials.
    ApplicationDefault,
}

/// The Cloud KMS client and the principal it acts as.
pub struct Kms {
    client: KeyManagementService,
    principal: tokio::sync::OnceCell<String>,
    principal_source: Auth,
}

impl Kms {
    /// Builds the client. Retries are the engine's, so the client's own are off.
    pub async fn connect(auth: Auth, endpoint: Option<&str>) -> Result<Self, BackendError> {
        let credentials = match &auth {
            Auth::ServiceAccountFile(path) => {
                let json = read_service_account(path)?;
                google_cloud_auth::credentials::service_account::Builder::new(json)
                    .build()
                    .map_err(|e| {
                        BackendError::with_source(
                            BackendErrorKind::InvalidArgument,
                            format!("service_account_file {} is not a usable service account key", path.display()),
                            e,
                        )
                    })?
            }
            Auth::ApplicationDefault => google_cloud_auth::credentials::Builder::default()
                .build()
                .map_err(|e| {
                    BackendError::with_source(
                        BackendErrorKind::PermissionDenied,
                        "no Google credentials found (Application Default Credentials); set service_account_file or GOOGLE_APPLICATION_CREDENTIALS, or run where a metadata server is available",
                        e,
                    )
                })?,
        };
        let mut builder = KeyManagementService::builder()
            .with_credentials(credentials)
            .with_retry_policy(NeverRetry)
            .with_attempt_timeout(ATTEMPT_TIMEOUT);
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let client = builder.build().await.map_err(|e| {
            BackendError::with_source(
                BackendErrorKind::Internal,
                "cannot build the Cloud KMS client",
                e,
            )
        })?;
        Ok(Self {
            client,
            principal: tokio::sync::OnceCell::new(),
            principal_source: auth,
        })
    }

    /// The service account email the client authenticates as (for the default IAM policy).
    pub async fn principal(&self) -> Result<&str, BackendError> {
        self.principal
            .get_or_try_init(|| async {
                match &self.principal_source {
                    Auth::ServiceAccountFile(path) => read_service_account(path)?
                        .get("client_email")
                        .and_then(|e| e.as_str())
                        .map(str::to_string)
                        .ok_or_else(|| {
                            BackendError::new(
                                BackendErrorKind::InvalidArgument,
                                format!(
                                    "service_account_file {} has no client_email",
                                    path.display()
                                ),
                            )
                        }),
                    Auth::ApplicationDefault => {
                        let signer = google_cloud_auth::credentials::Builder::default()
                            .build_signer()
                            .map_err(|e| principal_unknown(e.to_string()))?;
                        signer
                            .client_email()
                            .await
                            .map_err(|e| principal_unknown(e.to_string()))
                    }
                }
            })
            .await
            .map(String::as_str)
    }

    /// Lists CryptoKeys of `key_ring` matching `filter`, every page.
    pub async fn list_crypto_keys(
        &self,
        key_ring: &str,
        filter: &str,
    ) -> KmsResult<Vec<CryptoKey>> {
        let mut keys = Vec::new();
        let mut token = String::new();
        let mut guard = PageGuard::new(format!("CryptoKeys of {key_ring}"));
        loop {
            let page = self
                .client
                .list_crypto_keys()
                .set_parent(key_ring)
                .set_filter(filter)
                .set_page_size(PAGE_SIZE)
                .set_page_token(token)
                .send()
                .await
                .map_err(|e| map_error("ListCryptoKeys", key_ring, e))?;
            keys.extend(page.crypto_keys);
            match guard.next(&page.next_page_token).map_err(KmsError::local)? {
                None => return Ok(keys),
                Some(next) => token = next,
            }
        }
    }

    /// Lists the versions of `crypto_key` (optionally filtered), every page.
    pub async fn list_versions(
        &self,
        crypto_key: &str,
        filter: &str,
    ) -> KmsResult<Vec<CryptoKeyVersion>> {
        let mut versions = Vec::new();
        let mut token = String::new();
        let mut guard = PageGuard::new(format!("versions of {crypto_key}"));
        loop {
            let page = self
                .client
                .list_crypto_key_versions()
                .set_parent(crypto_key)
                .set_filter(filter)
                .set_page_size(PAGE_SIZE)
                .set_page_token(token)
                .send()
                .await
                .map_err(|e| map_error("ListCryptoKeyVersions", crypto_key, e))?;
            versions.extend(page.crypto_key_versions);
            match guard.next(&page.next_page_token).map_err(KmsError::local)? {
                None => return Ok(versions),
                Some(next) => token = next,
            }
        }
    }

    /// Gets a CryptoKey.
    pub async fn get_crypto_key(&self, name: &str) -> KmsResult<CryptoKey> {
        self.client
            .get_crypto_key()
            .set_name(name)
            .send()
            .await
            .map_err(|e| map_error("GetCryptoKey", name, e))
    }

    /// Creates an ASYMMETRIC_SIGN CryptoKey (with version 1 unless `skip_initial_version`).
    pub async fn create_crypto_key(
        &self,
        key_ring: &str,
        crypto_key_id: &str,
        algorithm: Algorithm,
        protection: config::ProtectionLevel,
        labels: HashMap<String, String>,
        skip_initial_version: bool,
    ) -> KmsResult<CryptoKey> {
        let protection = protection_level(protection);
        self.client
            .create_crypto_key()
            .set_parent(key_ring)
            .set_crypto_key_id(crypto_key_id)
            .set_skip_initial_version_creation(skip_initial_version)
            .set_crypto_key(
                CryptoKey::new()
                    .set_purpose(CryptoKeyPurpose::AsymmetricSign)
                    .set_version_template(
                        CryptoKeyVersionTemplate::new()
                            .set_algorithm(algorithm)
                            .set_protection_level(protection),
                    )
                    .set_labels(labels),
            )
            .send()
            .await
            .map_err(|e| map_error("CreateCryptoKey", crypto_key_id, e))
    }

    /// Replaces the labels of a CryptoKey (the update mask replaces the whole map).
    pub async fn set_labels(
        &self,
        key: &CryptoKey,
        labels: HashMap<String, String>,
    ) -> KmsResult<()> {
        self.client
            .update_crypto_key()
            .set_crypto_key(CryptoKey::new().set_name(&key.name).set_labels(labels))
            .set_update_mask(FieldMask::default().set_paths(["labels"]))
            .send()
            .await
            .map(drop)
            .map_err(|e| map_error("UpdateCryptoKey(labels)", &key.name, e))
    }

    /// Changes the algorithm new versions get.
    pub async fn set_template_algorithm(
        &self,
        key: &CryptoKey,
        algorithm: Algorithm,
    ) -> KmsResult<()> {
        let template = key
            .version_template
            .clone()
            .unwrap_or_default()
            .set_algorithm(algorithm);
        self.client
            .update_crypto_key()
            .set_crypto_key(
                CryptoKey::new()
                    .set_name(&key.name)
                    .set_version_template(template),
            )
            .set_update_mask(FieldMask::default().set_paths(["version_template.algorithm"]))
            .send()
            .await
            .map(drop)
            .map_err(|e| map_error("UpdateCryptoKey(algorithm)", &key.name, e))
    }

    /// Adds a version (it starts in PENDING_GENERATION).
    pub async fn create_version(&self, crypto_key: &str) -> KmsResult<CryptoKeyVersion> {
        self.client
            .create_crypto_key_version()
            .set_parent(crypto_key)
            .set_crypto_key_version(CryptoKeyVersion::new())
            .send()
            .await
            .map_err(|e| map_error("CreateCryptoKeyVersion", crypto_key, e))
    }

    /// An ACTIVE ImportJob of `key_ring` for `RSA_OAEP_4096_SHA256_AES_256` at `protection`
    /// with at least an hour left, else a new one once Cloud KMS has generated its wrapping
    /// key. Jobs cannot be deleted (they expire after 3 days), so one is reused across
    /// imports rather than one made per key. Returns the job's name and DER wrapping key.
    pub async fn import_job(
        &self,
        key_ring: &str,
        protection: config::ProtectionLevel,
        budget: Duration,
    ) -> KmsResult<(String, Vec<u8>)> {
        use google_cloud_kms_v1::model::ImportJob;
        use google_cloud_kms_v1::model::import_job::{ImportJobState, ImportMethod};
        let protection = protection_level(protection);
        let usable = |job: &ImportJob| {
            job.state == ImportJobState::Active
                && job.import_method == ImportMethod::RsaOaep4096Sha256Aes256
                && job.protection_level == protection
                && to_system_time(job.expire_time.as_ref())
                    .is_some_and(|t| t > SystemTime::now() + Duration::from_secs(3600))
        };
        let wrapping_key = |job: &ImportJob| -> KmsResult<Vec<u8>> {
            let pem = job
                .public_key
                .as_ref()
                .map(|k| k.pem.as_str())
                .unwrap_or("");
            pem_body(pem).ok_or_else(|| {
                KmsError::local(BackendError::new(
                    BackendErrorKind::Internal,
                    format!("ImportJob {} has no readable wrapping public key", job.name),
                ))
            })
        };
        let mut token = String::new();
        let mut guard = PageGuard::new(format!("ImportJobs of {key_ring}"));
        loop {
            let page = self
                .client
                .list_import_jobs()
                .set_parent(key_ring)
                .set_page_size(PAGE_SIZE)
                .set_page_token(token)
                .send()
                .await
                .map_err(|e| map_error("ListImportJobs", key_ring, e))?;
            if let Some(job) = page.import_jobs.iter().find(|j| usable(j)) {
                return Ok((job.name.clone(), wrapping_key(job)?));
            }
            match guard.next(&page.next_page_token).map_err(KmsError::local)? {
                None => break,
                Some(next) => token = next,
            }
        }
        let job_id = format!(
            "spire-import-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let created = self
            .client
            .create_import_job()
            .set_parent(key_ring)
            .set_import_job_id(&job_id)
            .set_import_job(
                ImportJob::new()
                    .set_import_method(ImportMethod::RsaOaep4096Sha256Aes256)
                    .set_protection_level(protection),
            )
            .send()
            .await
            .map_err(|e| map_error("CreateImportJob", &job_id, e))?;
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(50);
        let mut job = created;
        while job.state != ImportJobState::Active {
            if job.state != ImportJobState::PendingGeneration || started.elapsed() > budget {
                return Err(KmsError::local(BackendError::new(
                    BackendErrorKind::Unavailable,
                    format!("ImportJob {} is {:?}, not ACTIVE", job.name, job.state),
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
            job = self
                .client
                .get_import_job()
                .set_name(&job.name)
                .send()
                .await
                .map_err(|e| map_error("GetImportJob", &job.name, e))?;
        }
        Ok((job.name.clone(), wrapping_key(&job)?))
    }

    /// `importCryptoKeyVersion`: a new version of `crypto_key` holding the wrapped key.
    pub async fn import_version(
        &self,
        crypto_key: &str,
        algorithm: Algorithm,
        import_job: &str,
        wrapped: Vec<u8>,
    ) -> KmsResult<CryptoKeyVersion> {
        self.client
            .import_crypto_key_version()
            .set_parent(crypto_key)
            .set_algorithm(algorithm)
            .set_import_job(import_job)
            .set_wrapped_key(bytes::Bytes::from(wrapped))
            .send()
            .await
            .map_err(|e| map_error("ImportCryptoKeyVersion", crypto_key, e))
    }

    /// Gets a version.
    pub async fn get_version(&self, name: &str) -> KmsResult<CryptoKeyVersion> {
        self.client
            .get_crypto_key_version()
            .set_name(name)
            .send()
            .await
            .map_err(|e| map_error("GetCryptoKeyVersion", name, e))
    }

    /// Schedules a version's destruction (Cloud KMS keeps it DESTROY_SCHEDULED for the key's
    /// destroy_scheduled_duration, restorable until then).
    pub async fn destroy_version(&self, name: &str) -> KmsResult<CryptoKeyVersion> {
        self.client
            .destroy_crypto_key_version()
            .set_name(name)
            .send()
            .await
            .map_err(|e| map_error("DestroyCryptoKeyVersion", name, e))
    }

    /// The public key of an ENABLED version, checked with `pem_crc32c`.
    pub async fn public_key(&self, version: &str) -> KmsResult<FetchedPublicKey> {
        let response = self
            .client
            .get_public_key()
            .set_name(version)
            .send()
            .await
            .map_err(|e| map_error("GetPublicKey", version, e))?;
        if response.pem_crc32c != Some(crc32c(response.pem.as_bytes())) {
            return Err(integrity_error("public key", version));
        }
        if !response.name.is_empty() && response.name != version {
            return Err(integrity_error("public key (wrong version name)", version));
        }
        let spki_der =
            keymanager_engine::kit::pem::public_key_der(&response.pem).ok_or_else(|| KmsError {
                code: None,
                error: BackendError::new(
                    BackendErrorKind::Internal,
                    format!("Cloud KMS returned an unreadable PEM public key for {version}"),
                ),
            })?;
        Ok(FetchedPublicKey {
            spki_der,
            algorithm: response.algorithm,
        })
    }

    /// Signs a digest; the digest's CRC32C goes with it, the signature's is checked, and the
    /// service must confirm it verified the digest's.
    pub async fn sign(&self, version: &str, digest: &Digest) -> KmsResult<Vec<u8>> {
        let bytes = bytes::Bytes::copy_from_slice(digest.as_bytes());
        let kms_digest = match digest.hash() {
            HashAlgorithm::Sha256 => KmsDigest::new().set_sha256(bytes),
            HashAlgorithm::Sha384 => KmsDigest::new().set_sha384(bytes),
            HashAlgorithm::Sha512 => KmsDigest::new().set_sha512(bytes),
            other => {
                return Err(KmsError {
                    code: None,
                    error: BackendError::new(
                        BackendErrorKind::InvalidArgument,
                        format!("Cloud KMS cannot sign a {} digest", other.name()),
                    ),
                });
            }
        };
        let response = self
            .client
            .asymmetric_sign()
            .set_name(version)
            .set_digest(kms_digest)
            .set_digest_crc32c(crc32c(digest.as_bytes()))
            .send()
            .await
            .map_err(|e| map_error("AsymmetricSign", version, e))?;
        if !response.verified_digest_crc32c {
            return Err(integrity_error(
                "signing request (digest not verified)",
                version,
            ));
        }
        if response.signature_crc32c != Some(crc32c(&response.signature)) {
            return Err(integrity_error("signature", version));
        }
        if !response.name.is_empty() && response.name != version {
            return Err(integrity_error("signature (wrong version name)", version));
        }
        Ok(response.signature.to_vec())
    }

    /// Enables or disables a version (the operator's `keys enable` / `keys disable`).
    pub async fn set_version_enabled(&self, name: &str, enabled: bool) -> KmsResult<()> {
        let state = if enabled {
            State::Enabled
        } else {
            State::Disabled
        };
        self.client
            .update_crypto_key_version()
            .set_crypto_key_version(CryptoKeyVersion::new().set_name(name).set_state(state))
            .set_update_mask(FieldMask::default().set_paths(["state"]))
            .send()
            .await
            .map(drop)
            .map_err(|e| map_error("UpdateCryptoKeyVersion", name, e))
    }

    /// A resource's IAM bindings, one `role: members` line each.
    pub async fn iam_bindings(&self, resource: &str) -> KmsResult<Vec<String>> {
        let policy = self
            .client
            .get_iam_policy()
            .set_resource(resource)
            .set_options(GetPolicyOptions::new().set_requested_policy_version(3))
            .send()
            .await
            .map_err(|e| map_error("GetIamPolicy", resource, e))?;
        Ok(policy
            .bindings
            .iter()
            .map(|b| format!("{}: {}", b.role, b.members.join(", ")))
            .collect())
    }

    /// Which of `permissions` the caller holds on `resource` (Cloud KMS's own test).
    pub async fn granted(&self, resource: &str, permissions: &[&str]) -> KmsResult<Vec<String>> {
        self.client
            .test_iam_permissions()
            .set_resource(resource)
            .set_permissions(permissions.iter().map(|p| p.to_string()))
            .send()
            .await
            .map(|r| r.permissions)
            .map_err(|e| map_error("TestIamPermissions", resource, e))
    }

    /// Gives a new CryptoKey its IAM policy: `custom` if set, else the signer role for the
    /// authenticated service account. A key that already has bindings is left alone.
    pub async fn ensure_policy(
        &self,
        crypto_key: &str,
        custom: Option<&serde_json::Value>,
    ) -> Result<(), BackendError> {
        let current = self
            .client
            .get_iam_policy()
            .set_resource(crypto_key)
            .set_options(GetPolicyOptions::new().set_requested_policy_version(3))
            .send()
            .await
            .map_err(|e| map_error("GetIamPolicy", crypto_key, e))?;
        if !current.bindings.is_empty() {
            tracing::warn!(
                crypto_key,
                "the CryptoKey already has an IAM policy; it is left as it is"
            );
            return Ok(());
        }
        let policy = match custom {
            Some(json) => serde_json::from_value::<Policy>(json.clone()).map_err(|e| {
                BackendError::with_source(
                    BackendErrorKind::InvalidArgument,
                    "key_policy_file is not an IAM policy",
                    e,
                )
            })?,
            None => {
                let email = self.principal().await?;
                Policy::new().set_version(3).set_bindings([Binding::new()
                    .set_role(SIGNER_ROLE)
                    .set_members([format!("serviceAccount:{email}")])])
            }
        };
        // The etag makes the write conditional: a concurrent writer wins, we do not clobber it.
        let policy = policy.set_etag(current.etag);
        self.client
            .set_iam_policy()
            .set_resource(crypto_key)
            .set_policy(policy)
            .send()
            .await
            .map(drop)
            .map_err(|e| map_error("SetIamPolicy", crypto_key, e).error)
    }
}

fn principal_unknown(detail: String) -> BackendError {
    BackendError::new(
        BackendErrorKind::FailedPrecondition,
        format!(
            "cannot tell which service account the credentials belong to ({detail}); the default IAM policy needs it: set key_policy_file or service_account_file"
        ),
    )
}

fn read_service_account(path: &Path) -> Result<serde_json::Value, BackendError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        BackendError::with_source(
            BackendErrorKind::InvalidArgument,
            format!("cannot read service_account_file {}", path.display()),
            e,
        )
    })?;
    serde_json::from_str(&text).map_err(|e| {
        BackendError::with_source(
            BackendErrorKind::InvalidArgument,
            format!("service_account_file {} is not JSON", path.display()),
            e,
        )
    })
}

/// The list filter for versions that can sign.
pub const ENABLED_FILTER: &str = "state = ENABLED";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // RFC 3720 B.4 / the CRC catalogue's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn algorithms_round_trip_through_key_types() {
        for key_type in KeyType::ALL {
            assert_eq!(key_type_of(&algorithm_for(key_type)), Some(key_type));
        }
        assert_eq!(key_type_of(&Algorithm::RsaSignPss2048Sha256), None);
    }

    #[test]
    fn version_names_split_into_key_and_number() {
        let v = "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/12";
        assert_eq!(version_number(v), 12);
        assert_eq!(
            crypto_key_of(v),
            "projects/p/locations/l/keyRings/r/cryptoKeys/k"
        );
    }
}
