//! The seam every backend implements.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::algorithm::{Digest, HashAlgorithm, SignatureScheme};
use crate::key::{KeyId, KeyType};
use crate::settings::{Settings, SettingsError};

/// What SPIRE tells every plugin at Configure time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreConfig {
    /// Bare trust domain name, e.g. `example.org`.
    pub trust_domain: String,
}

/// Builds a backend's configuration from `plugin_data`. One per backend, registered by name.
pub trait BackendFactory: Send + Sync {
    /// The backend's name as written in `plugin_data` (`backend = "disk"`).
    fn name(&self) -> &'static str;

    /// The `plugin_data` keys this backend understands, for error messages.
    fn setting_keys(&self) -> &'static [&'static str];

    /// True when the backend stamps and sweeps keys (see [`Backend::lifecycle`]), so the
    /// schedule settings apply to it.
    fn manages_key_lifecycle(&self) -> bool {
        false
    }

    /// Parses and validates this backend's settings. Must have no side effects: it also
    /// serves SPIRE's `Validate`. Every recognised key must be taken out of `settings`.
    fn parse(
        &self,
        settings: &mut Settings,
        core: &CoreConfig,
    ) -> Result<Box<dyn BackendConfig>, SettingsError>;
}

/// A validated backend configuration that can open the backend.
#[async_trait]
pub trait BackendConfig: fmt::Debug + Send + Sync {
    /// Identifies the key store this configuration points at (e.g. `disk:/var/keys.json`).
    /// A runtime re-Configure may only keep the same store, so keys are never dropped.
    fn store_identity(&self) -> String;

    /// Problems that would make this configuration fail at run time, for
    /// `spire-server validate`. SPIRE reports **every** note as a validation error, so this
    /// lists problems only, never information. Must have no side effects.
    fn problems(&self) -> Vec<String> {
        Vec::new()
    }

    /// Connects to the store. May do I/O.
    async fn open(&self) -> Result<Arc<dyn Backend>, BackendError>;
}

/// A key adapter: everything backend-specific, nothing that every backend needs.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The backend's name (`disk`, `aws_kms`, ...).
    fn name(&self) -> &'static str;

    /// What this backend can do.
    fn capabilities(&self) -> &Capabilities;

    /// This server's keys, found when the engine starts (discovery, not creation).
    async fn load_keys(&self) -> Result<Vec<BackendKey>, BackendError>;

    /// Creates a fresh key for `id`. When it returns, the store maps `id` to the new key;
    /// the key it replaced (`replaces`, the one this server serves now, if any) is handed to
    /// [`Backend::retire_key`] afterwards.
    async fn create_key(
        &self,
        id: &KeyId,
        key_type: KeyType,
        replaces: Option<&BackendKey>,
    ) -> Result<BackendKey, BackendError>;

    /// Signs `digest` with `key`. The engine has already checked the scheme against
    /// [`Capabilities`], the digest length, and that the scheme fits the key type.
    async fn sign(
        &self,
        key: &BackendKey,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<BackendSignature, BackendError>;

    /// Starts removing a key that was replaced under its id. Backends with a deletion
    /// window schedule it; the engine calls this only after the new key is live.
    async fn retire_key(&self, replaced: &BackendKey) -> Result<(), BackendError>;

    /// Liveness stamps and stale-key sweeps, for backends whose keys outlive the server
    /// (every KMS). `None` for backends without shared key stores (disk).
    fn lifecycle(&self) -> Option<&dyn crate::lifecycle::KeyLifecycle> {
        None
    }
}

/// A key as a backend knows it.
#[derive(Clone, Debug)]
pub struct BackendKey {
    /// The SPIRE key id.
    pub id: KeyId,
    /// Its type.
    pub key_type: KeyType,
    /// DER SubjectPublicKeyInfo.
    pub spki_der: Arc<[u8]>,
    /// The backend's own reference to exactly this key instance.
    pub handle: KeyHandle,
}

/// A backend's opaque reference to one key instance: a KMS ARN, a resource name, or the
/// key material itself for software keys. The engine passes it back without looking inside.
#[derive(Clone)]
pub struct KeyHandle {
    locator: Arc<str>,
    inner: Arc<dyn Any + Send + Sync>,
}

impl KeyHandle {
    /// Wraps backend-specific state. `locator` is a printable, non-secret name for logs.
    pub fn new<T: Any + Send + Sync>(locator: impl Into<Arc<str>>, inner: T) -> Self {
        Self {
            locator: locator.into(),
            inner: Arc::new(inner),
        }
    }

    /// The printable locator (never key material).
    pub fn locator(&self) -> &str {
        &self.locator
    }

    /// The backend's state, if it is of type `T`.
    pub fn downcast<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.inner.downcast_ref::<T>()
    }

    /// The backend's state as `T`, or an Internal error naming `backend` (a handle from
    /// another backend reached it: a bug, never user input).
    pub fn get<T: Any + Send + Sync>(&self, backend: &str) -> Result<&T, BackendError> {
        self.downcast::<T>().ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Internal,
                format!(
                    "key handle {:?} does not belong to the {backend} backend",
                    self.locator
                ),
            )
        })
    }
}

impl fmt::Debug for KeyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The inner state may hold private key material: print the locator only.
        write!(f, "KeyHandle({:?})", self.locator)
    }
}

/// A signature as a backend produced it; the engine normalises ECDSA to DER.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSignature {
    /// ECDSA as ASN.1 DER.
    EcdsaDer(Vec<u8>),
    /// ECDSA as fixed-width `r || s` (PKCS#11, Azure Key Vault).
    EcdsaFixed(Vec<u8>),
    /// An RSA signature (PKCS#1 v1.5 or PSS).
    Rsa(Vec<u8>),
}

/// What a backend can do, declared once so that the engine refuses the rest before any
/// network call.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// Key types the backend can create.
    pub key_types: &'static [KeyType],
    /// Which (key type, scheme, hash) combinations it can sign.
    pub signing: SigningSupport,
    /// Which PSS salt lengths it can produce.
    pub pss_salt: PssSaltSupport,
    /// The store's own name for the algorithm a key type gets (Cloud KMS fixes the hash per
    /// key: `EC_SIGN_P256_SHA256`), for error messages.
    pub key_algorithm_name: Option<fn(KeyType) -> &'static str>,
}

/// Signing combinations a backend supports.
#[derive(Clone, Copy, Debug)]
pub enum SigningSupport {
    /// Every scheme and hash (a software backend).
    Any,
    /// Only the listed (key type, scheme family, hash) triples.
    Only(&'static [(KeyType, SchemeFamily, HashAlgorithm)]),
}

/// A scheme without its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemeFamily {
    /// ECDSA.
    Ecdsa,
    /// RSASSA-PKCS1-v1_5.
    RsaPkcs1v15,
    /// RSASSA-PSS.
    RsaPss,
}

impl SchemeFamily {
    /// The family of a scheme.
    pub fn of(scheme: SignatureScheme) -> Self {
        match scheme {
            SignatureScheme::Ecdsa(_) => Self::Ecdsa,
            SignatureScheme::RsaPkcs1v15(_) => Self::RsaPkcs1v15,
            SignatureScheme::RsaPss { .. } => Self::RsaPss,
        }
    }
}

/// PSS salt lengths a backend can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PssSaltSupport {
    /// Any salt that fits the modulus.
    Any,
    /// Only a salt as long as the hash (every cloud KMS).
    HashLengthOnly,
}

impl Capabilities {
    /// Whether the backend can sign `scheme` with a key of `key_type`.
    pub fn supports(&self, key_type: KeyType, scheme: SignatureScheme) -> bool {
        match self.signing {
            SigningSupport::Any => true,
            SigningSupport::Only(list) => list.iter().any(|&(t, f, h)| {
                t == key_type && f == SchemeFamily::of(scheme) && h == scheme.hash()
            }),
        }
    }

    /// The combinations supported for a key type, for error messages.
    pub fn describe_supported(&self, key_type: KeyType) -> String {
        match self.signing {
            SigningSupport::Any => "any scheme".to_string(),
            SigningSupport::Only(list) => {
                let items: Vec<String> = list
                    .iter()
                    .filter(|(t, _, _)| *t == key_type)
                    .map(|&(_, f, h)| {
                        let family = match f {
                            SchemeFamily::Ecdsa => "ECDSA",
                            SchemeFamily::RsaPkcs1v15 => "RSA-PKCS1v1.5",
                            SchemeFamily::RsaPss => "RSA-PSS",
                        };
                        format!("{family}/{h}")
                    })
                    .collect();
                let supported = if items.is_empty() {
                    "nothing".to_string()
                } else {
                    items.join(", ")
                };
                match self.key_algorithm_name {
                    Some(name) => format!("{supported} (the key is {})", name(key_type)),
                    None => supported,
                }
            }
        }
    }
}

/// What kind of failure a backend hit; decides the gRPC code and whether to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// The request was malformed for this backend.
    InvalidArgument,
    /// The key or store object does not exist.
    NotFound,
    /// Credentials lack a permission.
    PermissionDenied,
    /// Quota or throttling.
    ResourceExhausted,
    /// The service is unreachable or failed transiently.
    Unavailable,
    /// The key exists but cannot be used in its state (disabled, pending deletion).
    FailedPrecondition,
    /// Anything else (I/O, corrupt data, bugs).
    Internal,
}

/// A backend failure: a kind, a message for the operator, and the underlying cause.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// The failure kind.
    pub kind: BackendErrorKind,
    /// What happened, naming the object involved. Never contains secrets.
    pub message: String,
    /// The underlying error, if any.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl BackendError {
    /// A new error without a cause.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A new error with a cause; the cause's text is appended to the message.
    pub fn with_source(
        kind: BackendErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let message = format!("{}: {source}", message.into());
        Self {
            kind,
            message,
            source: Some(Box::new(source)),
        }
    }
}
