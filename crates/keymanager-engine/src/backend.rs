//! The seam every backend implements.
//!
//! A backend is a small adapter: it discovers this server's keys, creates a key in two
//! phases the engine drives (*prepare*: the key exists but discovery does not find it;
//! *publish*: discovery now finds it instead of the key it replaces), retires replaced keys,
//! and signs. Everything every backend needs (which requests are valid, retries, the
//! compensation rules when a step fails, the public-key cache) is the engine's.
//!
//! Handles are typed per backend ([`Backend::Handle`]): the engine is generic over the
//! backend, so a key of one backend can never reach another, and signing needs no downcast.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::core::algorithm::{Digest, HashAlgorithm, SignatureScheme};
use crate::core::key::{KeyId, KeyType};
use crate::core::private_key::PrivateKeyMaterial;

/// A backend's reference to exactly one key instance: an ARN, a version name, the key
/// material of a software key.
pub trait KeyHandle: Clone + fmt::Debug + Send + Sync + 'static {
    /// A printable, unique, non-secret name of this key instance, for logs, sweeps and
    /// operators (`arn:aws:kms:…`, `projects/…/cryptoKeyVersions/3`). Its `Debug` must not
    /// show key material either.
    fn locator(&self) -> &str;
}

/// A key as a backend stores it: its SPIRE id, type, public key and handle.
#[derive(Clone, Debug)]
pub struct StoredKey<H> {
    /// The SPIRE key id.
    pub id: KeyId,
    /// Its type.
    pub key_type: KeyType,
    /// DER SubjectPublicKeyInfo.
    pub spki_der: Arc<[u8]>,
    /// The backend's reference to exactly this key instance.
    pub handle: H,
}

impl<H: KeyHandle> StoredKey<H> {
    /// The handle's locator.
    pub fn locator(&self) -> &str {
        self.handle.locator()
    }
}

/// A key adapter: everything backend-specific, nothing that every backend needs.
///
/// The engine calls [`Backend::prepare`], [`Backend::public_key`], [`Backend::publish`] and
/// then [`Backend::retire`] for a GenerateKey, and decides alone what to undo when a step
/// fails (see `Engine::generate_key`). A backend keeps two promises that make those rules
/// sound:
/// - after `prepare`, discovery does not find the new key (created inactive, not behind the
///   alias, not in the file);
/// - `publish` switches discovery from the replaced key to the new one in one step of the
///   store (one alias update, one label, one rename) and is safe to repeat.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The backend's reference to one key instance.
    type Handle: KeyHandle;
    /// The configuration this backend is opened from (for settings changed at run time).
    type Config: crate::config::BackendConfig;

    /// The backend's name (`disk`, `aws_kms`, ...).
    fn name(&self) -> &'static str;

    /// What this backend can do.
    fn capabilities(&self) -> &Capabilities;

    /// This server's keys as discovery finds them (one per id).
    async fn discover(&self) -> Result<Vec<StoredKey<Self::Handle>>, BackendError>;

    /// [`Backend::discover`] for a store opened read-only (the old store of a hand-over):
    /// no housekeeping that writes (the `disk` backend skips removing temporary files
    /// left by crashed writers). Most stores' discovery only reads: the default.
    async fn discover_read_only(&self) -> Result<Vec<StoredKey<Self::Handle>>, BackendError> {
        self.discover().await
    }

    /// Phase 1: creates a key for `id` that discovery does not find yet. Never retried by
    /// the engine (a lost response would leave a second key); what a failure leaves behind
    /// must be inactive, so that the sweep removes it.
    async fn prepare(
        &self,
        id: &KeyId,
        key_type: KeyType,
        replaces: Option<&StoredKey<Self::Handle>>,
    ) -> Result<Self::Handle, BackendError>;

    /// Whether [`Backend::prepare_import`] is implemented; the engine refuses an import
    /// before any store call otherwise.
    fn can_import(&self) -> bool {
        false
    }

    /// Phase 1 of an import (`keys import`, `keys migrate`): like [`Backend::prepare`], but
    /// the new key holds `key`'s material. The same promises hold (discovery does not find
    /// it; a failure leaves nothing active), and the engine then runs the same
    /// `public_key` → `publish` → `retire` steps, checking that the store's public key is
    /// the imported key's.
    async fn prepare_import(
        &self,
        id: &KeyId,
        _key: &PrivateKeyMaterial,
        _replaces: Option<&StoredKey<Self::Handle>>,
    ) -> Result<Self::Handle, BackendError> {
        Err(BackendError::new(
            BackendErrorKind::FailedPrecondition,
            format!(
                "the {} backend cannot import key material (key {id})",
                self.name()
            ),
        ))
    }

    /// The private key of one of this server's keys, for `keys migrate` out of a software
    /// store; `None` for a store whose keys cannot leave it (every KMS and HSM).
    fn export(
        &self,
        _key: &StoredKey<Self::Handle>,
    ) -> Option<Result<PrivateKeyMaterial, BackendError>> {
        None
    }

    /// The type and DER public key of a prepared key. Idempotent (the engine retries it);
    /// waits for a key that is still being generated.
    async fn public_key(
        &self,
        prepared: &Self::Handle,
    ) -> Result<(KeyType, Arc<[u8]>), BackendError>;

    /// Phase 2: makes discovery find `new` for its id instead of `replaces`. Idempotent.
    async fn publish(
        &self,
        new: &StoredKey<Self::Handle>,
        replaces: Option<&StoredKey<Self::Handle>>,
    ) -> Result<(), BackendError>;

    /// The locator of the key discovery would find for `id` right now, if any. The engine
    /// asks when a publish failed, to learn whether the switch happened anyway.
    async fn find(&self, id: &KeyId) -> Result<Option<String>, BackendError>;

    /// Removes a prepared key that was never published (discovery does not find it).
    async fn abort(&self, prepared: &Self::Handle) -> Result<(), BackendError>;

    /// Phase 3: starts removing a key that was replaced under its id, recording the intent
    /// first where the store allows, so that a crash half-way still ends with the key gone.
    /// A store whose replaced keys stay listed for a while records the rotation history with
    /// the intent: when, and by which key (`replaced_by`; see README, "Rotation history").
    async fn retire(
        &self,
        replaced: &StoredKey<Self::Handle>,
        replaced_by: &StoredKey<Self::Handle>,
    ) -> Result<(), BackendError>;

    /// Signs `digest` with `key`. The engine has already checked the scheme against
    /// [`Capabilities`], the digest length, and that the scheme fits the key type.
    async fn sign(
        &self,
        key: &StoredKey<Self::Handle>,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<BackendSignature, BackendError>;

    /// [`Backend::sign`], plus the store's id for the call where it returns one (AWS's
    /// `x-amzn-RequestId`), which the audit log records so that a line can be matched to the
    /// store's own audit trail. The engine calls this; override it only to add the id.
    async fn sign_traced(
        &self,
        key: &StoredKey<Self::Handle>,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<Signed, BackendError> {
        Ok(Signed {
            signature: self.sign(key, digest, scheme).await?,
            request_id: None,
        })
    }

    /// Applies settings that may change at run time (rotated credentials, new key tags).
    /// Only called with a configuration of the same store (see `config::StoreIdentity`).
    async fn reconfigure(&self, _config: &Self::Config) -> Result<(), BackendError> {
        Ok(())
    }
}

/// A signature and the store's request id, if the store gave one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    /// The signature.
    pub signature: BackendSignature,
    /// The store's id for the call.
    pub request_id: Option<String>,
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
/// backend call.
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

impl SigningSupport {
    /// What AWS KMS and Vault Transit sign (as declared here): ECDSA only with the curve's
    /// own hash; RSA PKCS#1 v1.5 and PSS with SHA-256, SHA-384 and SHA-512.
    pub const CURVE_HASH_ECDSA_AND_RSA_SHA2: Self = Self::Only({
        use HashAlgorithm::{Sha256, Sha384, Sha512};
        use KeyType::{EcP256, EcP384, Rsa2048, Rsa4096};
        use SchemeFamily::{Ecdsa, RsaPkcs1v15 as Pkcs1, RsaPss as Pss};
        &[
            (EcP256, Ecdsa, Sha256),
            (EcP384, Ecdsa, Sha384),
            (Rsa2048, Pkcs1, Sha256),
            (Rsa2048, Pkcs1, Sha384),
            (Rsa2048, Pkcs1, Sha512),
            (Rsa2048, Pss, Sha256),
            (Rsa2048, Pss, Sha384),
            (Rsa2048, Pss, Sha512),
            (Rsa4096, Pkcs1, Sha256),
            (Rsa4096, Pkcs1, Sha384),
            (Rsa4096, Pkcs1, Sha512),
            (Rsa4096, Pss, Sha256),
            (Rsa4096, Pss, Sha384),
            (Rsa4096, Pss, Sha512),
        ]
    });
}

/// A scheme without its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

    /// The family's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ecdsa => "ECDSA",
            Self::RsaPkcs1v15 => "RSA-PKCS1v1.5",
            Self::RsaPss => "RSA-PSS",
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
                    .map(|&(_, f, h)| format!("{}/{h}", f.name()))
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendErrorKind {
    /// The request was malformed for this backend.
    InvalidArgument,
    /// The key or store object does not exist.
    NotFound,
    /// No usable credentials: missing, expired, or rejected as unknown. Not retried.
    Unauthenticated,
    /// The credentials work but lack a permission. Not retried.
    PermissionDenied,
    /// Quota or throttling. Retried.
    ResourceExhausted,
    /// The service is unreachable (transport) or failed transiently (5xx). Retried.
    Unavailable,
    /// The key exists but cannot be used in its state (disabled, pending deletion).
    FailedPrecondition,
    /// Anything else (I/O, corrupt data, bugs).
    Internal,
}

impl BackendErrorKind {
    /// Whether a call that failed this way may succeed if repeated.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Unavailable | Self::ResourceExhausted)
    }
}

/// A backend failure: a kind, a message for the operator that ends with the whole cause
/// chain, and the underlying cause.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// The failure kind.
    pub kind: BackendErrorKind,
    /// What happened, naming the object involved and every cause. Never contains secrets.
    pub message: String,
    /// The underlying error, if any.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
    /// How long the service asked us to wait before trying again (`Retry-After`); the
    /// engine's retries wait at least this long, or give up when it outlasts their budget.
    pub retry_after: Option<std::time::Duration>,
}

impl BackendError {
    /// A new error without a cause.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
            retry_after: None,
        }
    }

    /// A new error with a cause; the cause and everything behind it is appended to the
    /// message, so an operator reads the whole story in one line.
    pub fn with_source(
        kind: BackendErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let message = format!("{}: {}", message.into(), error_chain(&source));
        Self {
            kind,
            message,
            source: Some(Box::new(source)),
            retry_after: None,
        }
    }

    /// The same error with the wait the service asked for (`Retry-After`).
    pub fn with_retry_after(mut self, wait: Option<std::time::Duration>) -> Self {
        self.retry_after = wait;
        self
    }

    /// The same error with more context in front (`"creating key x509-CA-A: …"`).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

/// An error and all its causes, joined with `": "`. A cause whose text its parent already
/// contains is skipped (many libraries repeat their source in their own message); an empty
/// text is shown as the error's type-free placeholder so a colon is never left dangling.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        let text = e.to_string();
        let text = text.trim();
        if !text.is_empty() && !parts.last().is_some_and(|last| last.contains(text)) {
            parts.push(text.to_string());
        }
        current = e.source();
    }
    if parts.is_empty() {
        "no detail given by the library".to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);
    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn the_whole_cause_chain_reaches_the_message() {
        let cause = Layer(
            "dispatch failure",
            Some(Box::new(Layer(
                "io error",
                Some(Box::new(Layer("connection refused (os error 111)", None))),
            ))),
        );
        let error = BackendError::with_source(BackendErrorKind::Unavailable, "KMS Sign", cause);
        assert_eq!(
            error.message,
            "KMS Sign: dispatch failure: io error: connection refused (os error 111)"
        );
    }

    #[test]
    fn empty_and_repeated_causes_leave_no_dangling_colon() {
        let cause = Layer(
            "",
            Some(Box::new(Layer(
                "timed out",
                Some(Box::new(Layer("timed out", None))),
            ))),
        );
        assert_eq!(error_chain(&cause), "timed out");
        assert_eq!(
            error_chain(&Layer("", None)),
            "no detail given by the library"
        );
    }

    #[test]
    fn only_throttling_and_unavailability_are_transient() {
        use BackendErrorKind::*;
        for kind in [
            InvalidArgument,
            NotFound,
            Unauthenticated,
            PermissionDenied,
            FailedPrecondition,
            Internal,
        ] {
            assert!(!kind.is_transient(), "{kind:?}");
        }
        assert!(ResourceExhausted.is_transient() && Unavailable.is_transient());
    }
}
