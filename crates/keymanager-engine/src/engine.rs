//! The engine: public-key cache, request validation, signature normalisation.
//!
//! Locking rule: the key map is behind a short synchronous lock that is never held across
//! an `.await`, so a SignData never waits for a GenerateKey, a backend call, or a refresh.
//! GenerateKeys for the *same* id are serialised by a per-id async lock so that one id
//! never ends up with two freshly created keys.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::algorithm::{Digest, SignatureScheme, SignerOpts};
use crate::backend::{Backend, BackendKey, BackendSignature, PssSaltSupport};
use crate::ecdsa_der::{ecdsa_der_to_fixed, ecdsa_fixed_to_der};
use crate::error::EngineError;
use crate::key::{Fingerprint, KeyId, KeyType, PublicKey};
use crate::resilience::{CallStats, OperationStats, RateLimiter, RetryPolicy, with_retries};

/// Engine settings that do not depend on the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineOptions {
    /// Cap on distinct key ids (`None`: unlimited).
    pub max_keys: Option<usize>,
    /// Client-side limit on SignData calls per second (`None`: unlimited).
    pub max_signs_per_second: Option<f64>,
    /// Retries of transient failures of idempotent backend calls.
    pub retry: RetryPolicy,
}

/// A signature and the fingerprint of the key instance that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// ECDSA as DER, RSA as the raw signature.
    pub bytes: Vec<u8>,
    /// Fingerprint of the key that actually signed.
    pub fingerprint: Fingerprint,
}

struct ManagedKey {
    public: PublicKey,
    backend_key: BackendKey,
}

/// The key engine for one configured backend.
pub struct Engine {
    backend: Arc<dyn Backend>,
    keys: RwLock<HashMap<KeyId, Arc<ManagedKey>>>,
    generating: Mutex<HashMap<KeyId, Arc<tokio::sync::Mutex<()>>>>,
    /// 0 means unlimited.
    max_keys: AtomicUsize,
    sign_limiter: RwLock<Option<Arc<RateLimiter>>>,
    retry: RetryPolicy,
    stats: CallStats,
}

impl Engine {
    /// Loads the backend's keys into the cache.
    pub async fn start(
        backend: Arc<dyn Backend>,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        let stats = CallStats::default();
        let loaded =
            with_retries(options.retry, "load_keys", &stats, || backend.load_keys()).await?;
        let mut keys = HashMap::with_capacity(loaded.len());
        for backend_key in loaded {
            let managed = managed_key(backend_key);
            tracing::debug!(
                key_id = %managed.public.id,
                key_type = %managed.public.key_type,
                fingerprint = %managed.public.fingerprint,
                locator = managed.backend_key.handle.locator(),
                "loaded key"
            );
            if let Some(previous) = keys.insert(managed.public.id.clone(), Arc::new(managed)) {
                tracing::warn!(key_id = %previous.public.id, "backend returned two keys for one id; the last one wins");
            }
        }
        tracing::info!(
            backend = backend.name(),
            keys = keys.len(),
            "key engine started"
        );
        Ok(Self {
            backend,
            keys: RwLock::new(keys),
            generating: Mutex::new(HashMap::new()),
            max_keys: AtomicUsize::new(options.max_keys.unwrap_or(0)),
            sign_limiter: RwLock::new(options.max_signs_per_second.map(limiter)),
            retry: options.retry,
            stats,
        })
    }

    /// Changes the cap on distinct key ids (`None`: unlimited); applies to later GenerateKeys.
    pub fn set_max_keys(&self, max_keys: Option<usize>) {
        self.max_keys
            .store(max_keys.unwrap_or(0), Ordering::Relaxed);
    }

    /// Changes the client-side SignData rate limit (`None`: unlimited).
    pub fn set_max_signs_per_second(&self, per_second: Option<f64>) {
        *self
            .sign_limiter
            .write()
            .unwrap_or_else(PoisonError::into_inner) = per_second.map(limiter);
    }

    /// Backend calls, failures and throttles per operation since start.
    pub fn call_stats(&self) -> std::collections::BTreeMap<&'static str, OperationStats> {
        self.stats.snapshot()
    }

    /// True when the backend stamps and sweeps keys.
    pub fn has_lifecycle(&self) -> bool {
        self.backend.lifecycle().is_some()
    }

    /// Refreshes the liveness stamps of every key this server serves.
    pub async fn stamp_keys(&self) -> Result<(), EngineError> {
        let Some(lifecycle) = self.backend.lifecycle() else {
            return Ok(());
        };
        let keys: Vec<BackendKey> = self
            .read_keys()
            .values()
            .map(|k| k.backend_key.clone())
            .collect();
        self.stats.record_call("stamp");
        lifecycle
            .stamp(&keys, std::time::SystemTime::now())
            .await
            .inspect_err(|e| self.stats.record_failure("stamp", e.kind))?;
        tracing::debug!(keys = keys.len(), "liveness stamps refreshed");
        Ok(())
    }

    /// Sweeps the trust domain for stale and abandoned keys; keys this engine serves are
    /// never deleted. `None` for backends without a lifecycle.
    pub async fn sweep(
        &self,
        policy: crate::sweep::SweepPolicy,
    ) -> Result<Option<crate::lifecycle::SweepReport>, EngineError> {
        let Some(lifecycle) = self.backend.lifecycle() else {
            return Ok(None);
        };
        let in_use: std::collections::HashSet<String> = self
            .read_keys()
            .values()
            .map(|k| k.backend_key.handle.locator().to_string())
            .collect();
        self.stats.record_call("sweep");
        let report =
            crate::lifecycle::run_sweep(lifecycle, &in_use, std::time::SystemTime::now(), policy)
                .await
                .inspect_err(|e| self.stats.record_failure("sweep", e.kind))?;
        Ok(Some(report))
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Creates a new key under `id`, replacing any existing one, which is then retired.
    pub async fn generate_key(
        &self,
        id: KeyId,
        key_type: KeyType,
    ) -> Result<PublicKey, EngineError> {
        let capabilities = self.backend.capabilities();
        if !capabilities.key_types.contains(&key_type) {
            return Err(EngineError::KeyTypeUnsupported {
                backend: self.backend.name(),
                key_type,
            });
        }
        let id_lock = self.generate_lock(&id);
        let _serialised = id_lock.lock().await;

        let limit = self.max_keys.load(Ordering::Relaxed);
        if limit > 0 {
            let count = self.read_keys().len();
            if count >= limit && !self.read_keys().contains_key(&id) {
                return Err(EngineError::KeyLimitReached { id, count, limit });
            }
        }

        let current = self.read_keys().get(&id).cloned();
        // Never retried automatically: a lost response after a successful create would leave
        // a second key behind. Backends make creation idempotent themselves.
        self.stats.record_call("create_key");
        let created = self
            .backend
            .create_key(&id, key_type, current.as_ref().map(|k| &k.backend_key))
            .await
            .inspect_err(|e| {
                self.stats.record_failure("create_key", e.kind);
            })?;
        if created.key_type != key_type || created.id != id || created.spki_der.is_empty() {
            return Err(EngineError::Backend(crate::backend::BackendError::new(
                crate::backend::BackendErrorKind::Internal,
                format!(
                    "backend created {:?} of type {} when {id:?} of type {key_type} was requested",
                    created.id, created.key_type
                ),
            )));
        }
        let managed = Arc::new(managed_key(created));
        let public = managed.public.clone();
        let replaced = self
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), managed);
        tracing::info!(
            key_id = %id,
            key_type = %key_type,
            fingerprint = %public.fingerprint,
            replaced = replaced.is_some(),
            "generated key"
        );
        if let Some(old) = replaced {
            // The new key is live; failing to retire the old one must not fail the request.
            self.stats.record_call("retire_key");
            if let Err(error) = self.backend.retire_key(&old.backend_key).await {
                self.stats.record_failure("retire_key", error.kind);
                tracing::warn!(
                    key_id = %id,
                    fingerprint = %old.public.fingerprint,
                    locator = old.backend_key.handle.locator(),
                    %error,
                    "could not retire replaced key"
                );
            }
        }
        Ok(public)
    }

    /// The cached public key for `id`.
    pub fn public_key(&self, id: &KeyId) -> Result<PublicKey, EngineError> {
        self.read_keys()
            .get(id)
            .map(|k| k.public.clone())
            .ok_or_else(|| EngineError::KeyNotFound(id.clone()))
    }

    /// Every cached public key, sorted by id.
    pub fn public_keys(&self) -> Vec<PublicKey> {
        let mut keys: Vec<PublicKey> = self
            .read_keys()
            .values()
            .map(|k| k.public.clone())
            .collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        keys
    }

    /// Signs an already hashed digest with the key under `id`.
    pub async fn sign(
        &self,
        id: &KeyId,
        digest: Vec<u8>,
        opts: SignerOpts,
    ) -> Result<Signature, EngineError> {
        let key = self
            .read_keys()
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::KeyNotFound(id.clone()))?;
        let key_type = key.public.key_type;
        let scheme = SignatureScheme::resolve(key_type, opts)?;
        let digest = Digest::new(opts.hash(), digest)?;
        let capabilities = self.backend.capabilities();
        if !capabilities.supports(key_type, scheme) {
            return Err(EngineError::SchemeUnsupported {
                backend: self.backend.name(),
                id: id.clone(),
                key_type,
                scheme: scheme.describe(),
                supported: capabilities.describe_supported(key_type),
            });
        }
        if let SignatureScheme::RsaPss { hash, salt_len, .. } = scheme
            && capabilities.pss_salt == PssSaltSupport::HashLengthOnly
            && salt_len != hash.output_len()
        {
            return Err(EngineError::PssSaltUnsupported {
                backend: self.backend.name(),
                requested: salt_len,
                hash_len: hash.output_len(),
            });
        }
        let limiter = self
            .sign_limiter
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(limiter) = limiter {
            limiter.acquire().await;
        }
        let raw = with_retries(self.retry, "sign", &self.stats, || {
            self.backend.sign(&key.backend_key, &digest, scheme)
        })
        .await?;
        let bytes = normalise_signature(id, key_type, raw)?;
        Ok(Signature {
            bytes,
            fingerprint: key.public.fingerprint.clone(),
        })
    }

    fn read_keys(&self) -> std::sync::RwLockReadGuard<'_, HashMap<KeyId, Arc<ManagedKey>>> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn generate_lock(&self, id: &KeyId) -> Arc<tokio::sync::Mutex<()>> {
        self.generating
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.clone())
            .or_default()
            .clone()
    }
}

fn limiter(per_second: f64) -> Arc<RateLimiter> {
    // A burst of one second's worth: SPIRE's rotations sign a handful of documents at once.
    Arc::new(RateLimiter::new(
        per_second,
        per_second.ceil().clamp(1.0, 10_000.0) as u32,
    ))
}

fn managed_key(backend_key: BackendKey) -> ManagedKey {
    let public = PublicKey {
        id: backend_key.id.clone(),
        key_type: backend_key.key_type,
        spki_der: backend_key.spki_der.clone(),
        fingerprint: Fingerprint::of_spki(&backend_key.spki_der),
    };
    ManagedKey {
        public,
        backend_key,
    }
}

fn scalar_len(key_type: KeyType) -> Option<usize> {
    match key_type {
        KeyType::EcP256 => Some(32),
        KeyType::EcP384 => Some(48),
        KeyType::Rsa2048 | KeyType::Rsa4096 => None,
    }
}

/// Puts every backend's output into the form Go's `crypto.Signer` returns.
fn normalise_signature(
    id: &KeyId,
    key_type: KeyType,
    raw: BackendSignature,
) -> Result<Vec<u8>, EngineError> {
    let invalid = |reason: String| EngineError::InvalidBackendSignature {
        id: id.clone(),
        reason,
    };
    match (scalar_len(key_type), key_type.rsa_bits(), raw) {
        (Some(len), _, BackendSignature::EcdsaDer(der)) => {
            ecdsa_der_to_fixed(&der, len)
                .ok_or_else(|| invalid("ECDSA signature is not well-formed DER".into()))?;
            Ok(der)
        }
        (Some(len), _, BackendSignature::EcdsaFixed(fixed)) => {
            if fixed.len() != 2 * len {
                return Err(invalid(format!(
                    "ECDSA signature is {} bytes, expected {}",
                    fixed.len(),
                    2 * len
                )));
            }
            ecdsa_fixed_to_der(&fixed)
                .ok_or_else(|| invalid("ECDSA signature could not be encoded".into()))
        }
        (_, Some(bits), BackendSignature::Rsa(sig)) => {
            if sig.len() != bits / 8 {
                return Err(invalid(format!(
                    "RSA signature is {} bytes, expected {}",
                    sig.len(),
                    bits / 8
                )));
            }
            Ok(sig)
        }
        (_, _, other) => Err(invalid(format!(
            "signature kind {other:?} does not match a {key_type} key"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::algorithm::{HashAlgorithm, PssSaltLength};
    use crate::backend::{
        BackendError, BackendErrorKind, Capabilities, KeyHandle, SchemeFamily, SigningSupport,
    };

    /// A backend with fake key material: "public keys" are counters, "signatures" are
    /// fixed-width byte strings. `create_key` can be held open to prove locking rules.
    struct FakeBackend {
        capabilities: Capabilities,
        created: AtomicUsize,
        retired: Mutex<Vec<String>>,
        hold_create: tokio::sync::Mutex<()>,
        /// The next this-many sign/create calls fail with ThrottlingException-like errors.
        transient_sign_failures: AtomicUsize,
        transient_create_failures: AtomicUsize,
    }

    impl FakeBackend {
        fn new(capabilities: Capabilities) -> Arc<Self> {
            Arc::new(Self {
                capabilities,
                created: AtomicUsize::new(0),
                retired: Mutex::new(Vec::new()),
                hold_create: tokio::sync::Mutex::new(()),
                transient_sign_failures: AtomicUsize::new(0),
                transient_create_failures: AtomicUsize::new(0),
            })
        }
    }

    #[async_trait]
    impl Backend for FakeBackend {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn capabilities(&self) -> &Capabilities {
            &self.capabilities
        }
        async fn load_keys(&self) -> Result<Vec<BackendKey>, BackendError> {
            Ok(Vec::new())
        }
        async fn create_key(
            &self,
            id: &KeyId,
            key_type: KeyType,
            _replaces: Option<&BackendKey>,
        ) -> Result<BackendKey, BackendError> {
            let _held = self.hold_create.lock().await;
            if take_failure(&self.transient_create_failures) {
                return Err(BackendError::new(
                    BackendErrorKind::Unavailable,
                    "connection reset",
                ));
            }
            let n = self.created.fetch_add(1, Ordering::SeqCst);
            Ok(BackendKey {
                id: id.clone(),
                key_type,
                spki_der: Arc::from(format!("spki-{n}").into_bytes()),
                handle: KeyHandle::new(format!("fake/{n}"), n),
            })
        }
        async fn sign(
            &self,
            key: &BackendKey,
            _digest: &Digest,
            _scheme: SignatureScheme,
        ) -> Result<BackendSignature, BackendError> {
            if take_failure(&self.transient_sign_failures) {
                return Err(BackendError::new(
                    BackendErrorKind::ResourceExhausted,
                    "ThrottlingException",
                ));
            }
            Ok(match key.key_type {
                KeyType::EcP256 => BackendSignature::EcdsaFixed(vec![1; 64]),
                KeyType::EcP384 => BackendSignature::EcdsaFixed(vec![1; 96]),
                KeyType::Rsa2048 => BackendSignature::Rsa(vec![2; 256]),
                KeyType::Rsa4096 => BackendSignature::Rsa(vec![2; 512]),
            })
        }
        async fn retire_key(&self, replaced: &BackendKey) -> Result<(), BackendError> {
            self.retired
                .lock()
                .unwrap()
                .push(replaced.handle.locator().to_string());
            Ok(())
        }
    }

    fn take_failure(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn any_capabilities() -> Capabilities {
        Capabilities {
            key_types: &KeyType::ALL,
            signing: SigningSupport::Any,
            pss_salt: PssSaltSupport::Any,
            key_algorithm_name: None,
        }
    }

    fn id(s: &str) -> KeyId {
        KeyId::new(s).unwrap()
    }

    async fn sign_sha256(engine: &Engine, key: &str) -> Result<Signature, EngineError> {
        engine
            .sign(
                &id(key),
                vec![0; 32],
                SignerOpts::Hash(HashAlgorithm::Sha256),
            )
            .await
    }

    #[tokio::test]
    async fn regenerating_changes_fingerprint_and_retires_the_old_key() {
        let backend = FakeBackend::new(any_capabilities());
        let engine = Engine::start(backend.clone(), EngineOptions::default())
            .await
            .unwrap();
        let first = engine
            .generate_key(id("x509-CA-A"), KeyType::EcP256)
            .await
            .unwrap();
        let second = engine
            .generate_key(id("x509-CA-A"), KeyType::Rsa2048)
            .await
            .unwrap();
        assert_ne!(first.fingerprint, second.fingerprint);
        assert_eq!(engine.public_key(&id("x509-CA-A")).unwrap(), second);
        assert_eq!(*backend.retired.lock().unwrap(), vec!["fake/0".to_string()]);
        let signature = sign_sha256(&engine, "x509-CA-A").await.unwrap();
        assert_eq!(signature.fingerprint, second.fingerprint);
    }

    #[tokio::test]
    async fn sign_does_not_wait_for_a_generate_key_in_progress() {
        let backend = FakeBackend::new(any_capabilities());
        let engine = Arc::new(
            Engine::start(backend.clone(), EngineOptions::default())
                .await
                .unwrap(),
        );
        engine
            .generate_key(id("JWT-Signer-A"), KeyType::EcP256)
            .await
            .unwrap();

        // Hold the backend inside create_key for another id.
        let held = backend.hold_create.lock().await;
        let generating = {
            let engine = engine.clone();
            tokio::spawn(async move {
                engine
                    .generate_key(id("JWT-Signer-B"), KeyType::EcP256)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!generating.is_finished());

        let signed = tokio::time::timeout(
            Duration::from_secs(1),
            engine.sign(
                &id("JWT-Signer-A"),
                vec![0; 32],
                SignerOpts::Hash(HashAlgorithm::Sha256),
            ),
        )
        .await
        .expect("sign must not wait for GenerateKey")
        .unwrap();
        assert!(!signed.bytes.is_empty());
        assert_eq!(
            engine.public_keys().len(),
            1,
            "B is not visible until created"
        );

        drop(held);
        generating.await.unwrap().unwrap();
        assert_eq!(engine.public_keys().len(), 2);
    }

    #[tokio::test]
    async fn fixed_ecdsa_output_is_returned_as_der() {
        let engine = Engine::start(
            FakeBackend::new(any_capabilities()),
            EngineOptions::default(),
        )
        .await
        .unwrap();
        engine.generate_key(id("k"), KeyType::EcP384).await.unwrap();
        let signature = engine
            .sign(
                &id("k"),
                vec![0; 64],
                SignerOpts::Hash(HashAlgorithm::Sha512),
            )
            .await
            .unwrap();
        assert_eq!(signature.bytes[0], 0x30);
        assert_eq!(
            ecdsa_der_to_fixed(&signature.bytes, 48).unwrap(),
            vec![1; 96]
        );
    }

    #[tokio::test]
    async fn invalid_requests_are_refused_before_the_backend() {
        const ONLY: &[(KeyType, SchemeFamily, HashAlgorithm)] = &[
            (KeyType::EcP256, SchemeFamily::Ecdsa, HashAlgorithm::Sha256),
            (
                KeyType::Rsa2048,
                SchemeFamily::RsaPss,
                HashAlgorithm::Sha256,
            ),
        ];
        let engine = Engine::start(
            FakeBackend::new(Capabilities {
                key_types: &[KeyType::EcP256, KeyType::Rsa2048],
                signing: SigningSupport::Only(ONLY),
                pss_salt: PssSaltSupport::HashLengthOnly,
                key_algorithm_name: None,
            }),
            EngineOptions::default(),
        )
        .await
        .unwrap();
        assert!(matches!(
            engine.generate_key(id("k"), KeyType::EcP384).await,
            Err(EngineError::KeyTypeUnsupported { .. })
        ));
        engine
            .generate_key(id("ec"), KeyType::EcP256)
            .await
            .unwrap();
        engine
            .generate_key(id("rsa"), KeyType::Rsa2048)
            .await
            .unwrap();

        let err = engine
            .sign(
                &id("ec"),
                vec![0; 48],
                SignerOpts::Hash(HashAlgorithm::Sha384),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the fake backend cannot sign ECDSA/SHA-384 with ec-p256 key \"ec\"; supported: ECDSA/SHA-256"
        );
        let err = engine
            .sign(
                &id("ec"),
                vec![0; 31],
                SignerOpts::Hash(HashAlgorithm::Sha256),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::DigestLength { .. }));
        let pss = |salt| SignerOpts::Pss {
            hash: HashAlgorithm::Sha256,
            salt,
        };
        assert!(
            engine
                .sign(&id("rsa"), vec![0; 32], pss(PssSaltLength::EqualsHash))
                .await
                .is_ok()
        );
        assert!(
            engine
                .sign(&id("rsa"), vec![0; 32], pss(PssSaltLength::Exact(32)))
                .await
                .is_ok()
        );
        let err = engine
            .sign(&id("rsa"), vec![0; 32], pss(PssSaltLength::Maximum))
            .await
            .unwrap_err();
        assert!(
            matches!(err, EngineError::PssSaltUnsupported { requested: 222, .. }),
            "{err}"
        );
        let err = engine
            .sign(&id("missing"), vec![0; 32], pss(PssSaltLength::EqualsHash))
            .await;
        assert_eq!(err.unwrap_err().to_string(), "key \"missing\" not found");
    }

    #[tokio::test]
    async fn key_limit_refuses_new_ids_but_allows_rotation() {
        let engine = Engine::start(
            FakeBackend::new(any_capabilities()),
            EngineOptions {
                max_keys: Some(2),
                ..EngineOptions::default()
            },
        )
        .await
        .unwrap();
        engine.generate_key(id("a"), KeyType::EcP256).await.unwrap();
        engine.generate_key(id("b"), KeyType::EcP256).await.unwrap();
        engine.generate_key(id("a"), KeyType::EcP256).await.unwrap();
        let err = engine
            .generate_key(id("c"), KeyType::EcP256)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            EngineError::KeyLimitReached {
                count: 2,
                limit: 2,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn throttled_signs_are_retried_and_counted_but_creation_is_not_retried() {
        let backend = FakeBackend::new(any_capabilities());
        let engine = Engine::start(backend.clone(), EngineOptions::default())
            .await
            .unwrap();
        engine.generate_key(id("k"), KeyType::EcP256).await.unwrap();

        backend.transient_sign_failures.store(2, Ordering::SeqCst);
        let signed = sign_sha256(&engine, "k").await.unwrap();
        assert!(!signed.bytes.is_empty());
        let stats = engine.call_stats();
        assert_eq!((stats["sign"].calls, stats["sign"].throttles), (3, 2));

        backend.transient_create_failures.store(1, Ordering::SeqCst);
        let err = engine
            .generate_key(id("k2"), KeyType::EcP256)
            .await
            .unwrap_err();
        assert!(
            matches!(err, EngineError::Backend(ref e) if e.kind == BackendErrorKind::Unavailable)
        );
        let stats = engine.call_stats();
        assert_eq!(
            (stats["create_key"].calls, stats["create_key"].failures),
            (2, 1)
        );
        assert_eq!(
            backend.created.load(Ordering::SeqCst),
            1,
            "no second key was created"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sign_rate_limit_paces_a_burst() {
        let engine = Arc::new(
            Engine::start(
                FakeBackend::new(any_capabilities()),
                EngineOptions {
                    max_signs_per_second: Some(5.0),
                    ..EngineOptions::default()
                },
            )
            .await
            .unwrap(),
        );
        engine.generate_key(id("k"), KeyType::EcP256).await.unwrap();
        let started = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..15 {
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move { sign_sha256(&engine, "k").await }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        // A burst of 5, then 10 more at 5/s.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1990) && elapsed <= Duration::from_millis(2100),
            "{elapsed:?}"
        );
        engine.set_max_signs_per_second(None);
        let started = tokio::time::Instant::now();
        for _ in 0..50 {
            sign_sha256(&engine, "k").await.unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_millis(10),
            "limit removed at run time"
        );
    }
}
