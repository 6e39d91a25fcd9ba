//! The engine: public-key cache, request validation, key creation in two phases with its
//! compensation rules, signature normalisation.
//!
//! Locking rule: the key map is behind a short synchronous lock that is never held across
//! an `.await`, so a SignData never waits for a GenerateKey, a backend call, or a refresh.
//! GenerateKeys for the *same* id are serialised by a per-id async lock so that one id
//! never ends up with two freshly created keys; the per-id locks live only while in use.
//!
//! GenerateKey, and what is undone when a step fails (the only place these rules live):
//!
//! | step | on failure |
//! |---|---|
//! | `prepare` (never retried) | nothing to undo: the backend left nothing discovery finds |
//! | `public_key` (retried) | `abort` the prepared key |
//! | `publish` (retried) | ask the store (`find`): switched → keep the new key and go on; not switched → `abort`; no answer → undo nothing |
//! | `retire` | logged; the sweep finishes it |
//!
//! So after a failure or a crash at any step, discovery finds the old key or the new one,
//! never none and never one on its way out, and whichever key discovery does not find is a
//! leftover the sweep removes (`lifecycle::rules`, rule 5).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{
    Backend, BackendError, BackendErrorKind, BackendSignature, KeyHandle, PssSaltSupport, StoredKey,
};
use crate::config::BackendConfig;
use crate::core::algorithm::{Digest, SignatureScheme, SignerOpts};
use crate::core::ecdsa_der::{ecdsa_der_to_fixed, ecdsa_fixed_to_der};
use crate::core::key::{Fingerprint, KeyId, KeyType, PublicKey};
use crate::core::private_key::PrivateKeyMaterial;
use crate::error::EngineError;
use crate::lifecycle::{KeyLifecycle, KeyRecord, SweepPolicy, SweepReport, run_sweep};
use crate::resilience::{
    AdaptiveLimiter, CallStats, Gated, OperationStats, RateLimitDenied, RateLimiter, RetryPolicy,
    with_gated_retries, with_retries,
};
use crate::service::KeyService;
use crate::telemetry::{SignOutcome, Telemetry};

/// Engine settings that do not depend on the backend.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineOptions {
    /// Cap on distinct key ids (`None`: unlimited).
    pub max_keys: Option<usize>,
    /// Client-side limit on SignData calls per second (`None`: unlimited).
    pub max_signs_per_second: Option<f64>,
    /// Learn the store's signing quota from its throttling replies and pace signing calls
    /// below it ([`AdaptiveLimiter`]); a `max_signs_per_second` ceiling applies as well.
    pub adaptive_rate_limit: bool,
    /// Retries of transient failures of idempotent backend calls.
    pub retry: RetryPolicy,
}

impl Default for EngineOptions {
    /// No key cap, no fixed sign limit, adaptive rate control on, default retries.
    fn default() -> Self {
        Self {
            max_keys: None,
            max_signs_per_second: None,
            adaptive_rate_limit: true,
            retry: RetryPolicy::default(),
        }
    }
}

/// A signature and the fingerprint of the key instance that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// ECDSA as DER, RSA as the raw signature.
    pub bytes: Vec<u8>,
    /// Fingerprint of the key that actually signed.
    pub fingerprint: Fingerprint,
}

struct ManagedKey<H> {
    public: PublicKey,
    stored: StoredKey<H>,
}

struct Limiter {
    per_second: f64,
    bucket: RateLimiter,
}

/// The key engine for one backend.
pub struct Engine<B: Backend> {
    backend: Arc<B>,
    lifecycle: Option<Arc<dyn KeyLifecycle<Handle = B::Handle>>>,
    keys: RwLock<HashMap<KeyId, Arc<ManagedKey<B::Handle>>>>,
    /// Per-id GenerateKey locks, present only while a GenerateKey for the id runs or waits.
    generating: Mutex<HashMap<KeyId, Arc<tokio::sync::Mutex<()>>>>,
    /// 0 means unlimited.
    max_keys: AtomicUsize,
    sign_limiter: RwLock<Option<Arc<Limiter>>>,
    /// Paces every signing attempt (retries too) below the store's learned quota.
    adaptive: RwLock<Option<Arc<AdaptiveLimiter>>>,
    retry: RetryPolicy,
    stats: Arc<CallStats>,
    telemetry: Arc<Telemetry>,
}

/// What a SignData learned on its way, for metrics and the audit line (also when it fails).
struct SignTrace<H> {
    key: Option<Arc<ManagedKey<H>>>,
    scheme: Option<SignatureScheme>,
    request_id: Option<String>,
}

impl<H> Default for SignTrace<H> {
    fn default() -> Self {
        Self {
            key: None,
            scheme: None,
            request_id: None,
        }
    }
}

impl<B: Backend> Engine<B> {
    /// Discovers the backend's keys and fills the cache.
    pub async fn start(
        backend: Arc<B>,
        lifecycle: Option<Arc<dyn KeyLifecycle<Handle = B::Handle>>>,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        Self::start_with(backend, lifecycle, options, None).await
    }

    /// [`Engine::start`]; with `read_only_telemetry`, for a store opened read-only (the old
    /// store of a hand-over): discovery without housekeeping, and signatures reported to
    /// the plugin's one telemetry instead of the engine's own.
    pub(crate) async fn start_with(
        backend: Arc<B>,
        lifecycle: Option<Arc<dyn KeyLifecycle<Handle = B::Handle>>>,
        options: EngineOptions,
        read_only_telemetry: Option<Arc<Telemetry>>,
    ) -> Result<Self, EngineError> {
        let stats = Arc::new(CallStats::default());
        let read_only = read_only_telemetry.is_some();
        let discovered = with_retries(options.retry, "discover", &stats, || async {
            if read_only {
                backend.discover_read_only().await
            } else {
                backend.discover().await
            }
        })
        .await?;
        let mut keys = HashMap::with_capacity(discovered.len());
        for stored in discovered {
            let managed = managed_key(stored);
            tracing::debug!(
                key_id = %managed.public.id,
                key_type = %managed.public.key_type,
                fingerprint = %managed.public.fingerprint,
                locator = managed.stored.locator(),
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
        let telemetry = match read_only_telemetry {
            // The owner of the shared telemetry counts the keys it serves.
            Some(shared) => shared,
            None => {
                let server_id = lifecycle.as_ref().map(|l| l.identity().server_id);
                let telemetry = Arc::new(Telemetry::new(backend.name(), server_id, stats.clone()));
                telemetry.keys_served(keys.len());
                telemetry
            }
        };
        let engine = Self {
            backend,
            lifecycle,
            keys: RwLock::new(keys),
            generating: Mutex::new(HashMap::new()),
            max_keys: AtomicUsize::new(0),
            sign_limiter: RwLock::new(None),
            adaptive: RwLock::new(None),
            retry: options.retry,
            stats,
            telemetry,
        };
        engine.apply_options(&options);
        Ok(engine)
    }

    fn apply_options(&self, options: &EngineOptions) {
        self.max_keys
            .store(options.max_keys.unwrap_or(0), Ordering::Relaxed);
        {
            // A limiter already running keeps what it learned.
            let mut adaptive = self
                .adaptive
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            match (adaptive.is_some(), options.adaptive_rate_limit) {
                (false, true) => *adaptive = Some(Arc::new(AdaptiveLimiter::default())),
                (true, false) => {
                    *adaptive = None;
                    self.telemetry.adaptive_rate(None);
                }
                _ => {}
            }
        }
        let mut limiter = self
            .sign_limiter
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let unchanged = match (&*limiter, options.max_signs_per_second) {
            (Some(current), Some(rate)) => current.per_second == rate,
            (None, None) => true,
            _ => false,
        };
        if !unchanged {
            *limiter = options.max_signs_per_second.map(|per_second| {
                // A burst of one second's worth: SPIRE's rotations sign a handful at once.
                Arc::new(Limiter {
                    per_second,
                    bucket: RateLimiter::new(
                        per_second,
                        per_second.ceil().clamp(1.0, 10_000.0) as u32,
                    ),
                })
            });
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The engine's metrics and audit log.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// Creates a new key under `id`, replacing any existing one, which is then retired.
    pub async fn generate_key(
        &self,
        id: KeyId,
        key_type: KeyType,
    ) -> Result<PublicKey, EngineError> {
        let started = tokio::time::Instant::now();
        let at = self.telemetry.audit_clock();
        let result = self.generate_key_traced(id.clone(), key_type).await;
        self.telemetry.generate_finished(
            &id,
            key_type,
            result.as_ref().map(|k| &k.fingerprint),
            started,
            at,
        );
        result
    }

    async fn generate_key_traced(
        &self,
        id: KeyId,
        key_type: KeyType,
    ) -> Result<PublicKey, EngineError> {
        self.check_key_type(key_type)?;
        let slot = self.claim_generate_slot(&id)?;
        let _serialised = slot.lock.lock().await;
        let current = self.read_keys().get(&id).cloned();
        self.create(id, key_type, Origin::Generate, current).await
    }

    fn check_key_type(&self, key_type: KeyType) -> Result<(), EngineError> {
        if self.backend.capabilities().key_types.contains(&key_type) {
            Ok(())
        } else {
            Err(EngineError::KeyTypeUnsupported {
                backend: self.backend.name(),
                key_type,
            })
        }
    }

    /// Imports `key` under `id` (`keys import`, `keys migrate`): the same two phases and
    /// compensation rules as [`Engine::generate_key`], with the store's public key checked
    /// against the imported key's before anything is published. A live key under `id` is
    /// replaced (and retired) only with `replace`; one with the same public key is left
    /// alone, so that a repeated import is a no-op.
    pub async fn import_key(
        &self,
        id: KeyId,
        key: &PrivateKeyMaterial,
        replace: bool,
    ) -> Result<Imported, EngineError> {
        if !self.backend.can_import() {
            return Err(EngineError::ImportUnsupported {
                backend: self.backend.name(),
            });
        }
        self.check_key_type(key.key_type())?;
        let slot = self.claim_generate_slot(&id)?;
        let _serialised = slot.lock.lock().await;
        let current = self.read_keys().get(&id).cloned();
        let replaced = match &current {
            Some(live) if &live.public.fingerprint == key.fingerprint() => {
                return Ok(Imported {
                    public: live.public.clone(),
                    locator: live.stored.locator().to_string(),
                    outcome: ImportOutcome::AlreadyServed,
                });
            }
            Some(live) if !replace => {
                return Err(EngineError::KeyExists {
                    id,
                    fingerprint: live.public.fingerprint.to_string(),
                });
            }
            Some(live) => Some(live.public.fingerprint.clone()),
            None => None,
        };
        let public = self
            .create(id.clone(), key.key_type(), Origin::Import(key), current)
            .await?;
        let locator = self
            .read_keys()
            .get(&id)
            .map(|k| k.stored.locator().to_string())
            .unwrap_or_default();
        Ok(Imported {
            public,
            locator,
            outcome: match replaced {
                Some(old) => ImportOutcome::Replaced(old),
                None => ImportOutcome::Imported,
            },
        })
    }

    /// The private keys of this server's keys, for `keys migrate`; `None` when the store's
    /// keys cannot leave it.
    pub fn export_keys(&self) -> Option<Result<Vec<(KeyId, PrivateKeyMaterial)>, BackendError>> {
        let keys = self.stored_keys();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            match self.backend.export(&key)? {
                Ok(material) => out.push((key.id.clone(), material)),
                Err(error) => return Some(Err(error)),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Some(Ok(out))
    }

    /// Creates (generates or imports) a key under `id` with the per-id lock held.
    async fn create(
        &self,
        id: KeyId,
        key_type: KeyType,
        origin: Origin<'_>,
        current: Option<Arc<ManagedKey<B::Handle>>>,
    ) -> Result<PublicKey, EngineError> {
        let replaces = current.as_ref().map(|k| &k.stored);
        let failed = |id: KeyId, kept: &'static str, source: BackendError| match origin {
            Origin::Generate => EngineError::Generate { id, kept, source },
            Origin::Import(_) => EngineError::Import { id, kept, source },
        };

        // Phase 1. Never retried: a lost response after a successful create would leave a
        // second key behind (inactive, so the sweep removes it).
        self.stats.record_call("prepare");
        let prepared = match origin {
            Origin::Generate => self.backend.prepare(&id, key_type, replaces).await,
            Origin::Import(key) => self.backend.prepare_import(&id, key, replaces).await,
        }
        .inspect(|_| self.stats.record_success("prepare"))
        .inspect_err(|e| self.stats.record_failure("prepare", e.kind))
        .map_err(|source| failed(id.clone(), kept(current.is_some()), source))?;
        crate::failpoint!("generate.after_prepare");

        let read = with_retries(self.retry, "public_key", &self.stats, || {
            self.backend.public_key(&prepared)
        })
        .await
        .and_then(|(created_type, spki_der)| {
            if created_type != key_type || spki_der.is_empty() {
                return Err(BackendError::new(
                    BackendErrorKind::Internal,
                    format!(
                        "backend created a {created_type} key ({} bytes of public key) when a {key_type} key was requested",
                        spki_der.len()
                    ),
                ));
            }
            if let Origin::Import(key) = origin
                && spki_der[..] != key.spki_der()[..]
            {
                return Err(BackendError::new(
                    BackendErrorKind::Internal,
                    format!(
                        "the store's public key for the imported key (fingerprint {}) is not the imported key's ({}); the import is undone",
                        Fingerprint::of_spki(&spki_der),
                        key.fingerprint()
                    ),
                ));
            }
            Ok(spki_der)
        });
        let spki_der = match read {
            Ok(spki) => spki,
            Err(source) => {
                let aborted = self.abort(&id, &prepared).await;
                return Err(failed(
                    id,
                    kept_after_abort(current.is_some(), aborted),
                    source,
                ));
            }
        };
        let new = StoredKey {
            id: id.clone(),
            key_type,
            spki_der,
            handle: prepared,
        };

        // Phase 2.
        let published = with_retries(self.retry, "publish", &self.stats, || {
            self.backend.publish(&new, replaces)
        })
        .await;
        if let Err(source) = published {
            match self.settle(&new, replaces).await {
                Settled::Switched => tracing::warn!(
                    key_id = %id,
                    error = %source,
                    "publishing the new key reported a failure, but discovery finds the new key: it is in service"
                ),
                Settled::NotSwitched => {
                    let aborted = self.abort(&id, &new.handle).await;
                    return Err(failed(
                        id,
                        kept_after_abort(current.is_some(), aborted),
                        source,
                    ));
                }
                Settled::Unknown => {
                    tracing::error!(
                        key_id = %id,
                        new = new.locator(),
                        "could not learn whether the new key was published; both keys are kept and the sweep removes the one discovery does not find"
                    );
                    return Err(failed(
                        id,
                        "the current key stays in service; whether the store switched to the new key is unknown, and the sweep removes whichever key it does not use",
                        source,
                    ));
                }
            }
        }

        crate::failpoint!("generate.after_publish");

        let managed = Arc::new(managed_key(new));
        let public = managed.public.clone();
        let (replaced, served) = {
            let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
            (keys.insert(id.clone(), managed.clone()), keys.len())
        };
        self.telemetry.keys_served(served);
        tracing::info!(
            key_id = %id,
            key_type = %key_type,
            fingerprint = %public.fingerprint,
            replaced = replaced.is_some(),
            "{}",
            match origin {
                Origin::Generate => "generated key",
                Origin::Import(_) => "imported key",
            }
        );
        if let Some(old) = replaced {
            // Phase 3. The new key is live; failing to retire the old one must not fail the
            // request: discovery no longer finds it, so the sweep finishes the job.
            self.stats.record_call("retire");
            match self.backend.retire(&old.stored, &managed.stored).await {
                Ok(()) => self.stats.record_success("retire"),
                Err(error) => {
                    self.stats.record_failure("retire", error.kind);
                    tracing::warn!(
                        key_id = %id,
                        fingerprint = %old.public.fingerprint,
                        locator = old.stored.locator(),
                        %error,
                        "could not retire the replaced key; the sweep removes it"
                    );
                }
            }
        }
        crate::failpoint!("generate.before_reply");
        Ok(public)
    }

    /// After a failed publish: does discovery find the new key now?
    async fn settle(
        &self,
        new: &StoredKey<B::Handle>,
        replaces: Option<&StoredKey<B::Handle>>,
    ) -> Settled {
        match with_retries(self.retry, "find", &self.stats, || {
            self.backend.find(&new.id)
        })
        .await
        {
            Ok(Some(found)) if found == new.locator() => Settled::Switched,
            Ok(None) if replaces.is_some() => {
                // Neither key is found: put the replaced key back rather than leave the id
                // without a key at the next start.
                if let Some(old) = replaces
                    && let Err(error) = with_retries(self.retry, "publish", &self.stats, || {
                        self.backend.publish(old, None)
                    })
                    .await
                {
                    tracing::error!(key_id = %new.id, %error, "discovery finds no key for this id and the current key could not be published again");
                }
                Settled::NotSwitched
            }
            Ok(_) => Settled::NotSwitched,
            Err(error) => {
                tracing::warn!(key_id = %new.id, %error, "could not ask the store which key it finds");
                Settled::Unknown
            }
        }
    }

    /// Removes a new key that is not to be used; `false` when that failed (the sweep
    /// removes it later).
    async fn abort(&self, id: &KeyId, prepared: &B::Handle) -> bool {
        match with_retries(self.retry, "abort", &self.stats, || {
            self.backend.abort(prepared)
        })
        .await
        {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(
                    key_id = %id,
                    locator = prepared.locator(),
                    %error,
                    "could not remove the new key; the sweep removes whichever key discovery does not find"
                );
                false
            }
        }
    }

    /// Takes the per-id lock slot, checking the key cap against keys held *and* new ids
    /// being created, under one lock so that concurrent GenerateKeys cannot overshoot it.
    fn claim_generate_slot(&self, id: &KeyId) -> Result<GenerateSlot<'_, B>, EngineError> {
        let mut generating = self
            .generating
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let limit = self.max_keys.load(Ordering::Relaxed);
        if limit > 0 {
            let keys = self.read_keys();
            if !keys.contains_key(id) && !generating.contains_key(id) {
                let new_in_flight = generating.keys().filter(|k| !keys.contains_key(*k)).count();
                let count = keys.len() + new_in_flight;
                if count >= limit {
                    return Err(EngineError::KeyLimitReached {
                        id: id.clone(),
                        count,
                        limit,
                    });
                }
            }
        }
        let lock = generating.entry(id.clone()).or_default().clone();
        Ok(GenerateSlot {
            engine: self,
            id: id.clone(),
            lock,
        })
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
        deadline: Option<Duration>,
    ) -> Result<Signature, EngineError> {
        let started = tokio::time::Instant::now();
        let at = self.telemetry.audit_clock();
        let mut trace = SignTrace::default();
        let result = self
            .sign_traced(id, digest, opts, deadline, started, &mut trace)
            .await;
        self.telemetry.sign_finished(
            SignOutcome {
                backend: self.backend.name(),
                id,
                key_type: trace.key.as_ref().map(|k| k.public.key_type),
                fingerprint: trace.key.as_ref().map(|k| &k.public.fingerprint),
                scheme: trace.scheme,
                request_id: trace.request_id,
                result: result.as_ref().map(|_| ()),
            },
            started,
            at,
        );
        result
    }

    async fn sign_traced(
        &self,
        id: &KeyId,
        digest: Vec<u8>,
        opts: SignerOpts,
        deadline: Option<Duration>,
        started: tokio::time::Instant,
        trace: &mut SignTrace<B::Handle>,
    ) -> Result<Signature, EngineError> {
        let key = self
            .read_keys()
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::KeyNotFound(id.clone()))?;
        trace.key = Some(key.clone());
        let key_type = key.public.key_type;
        let scheme = SignatureScheme::resolve(key_type, opts)?;
        trace.scheme = Some(scheme);
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
            let waiting = tokio::time::Instant::now();
            limiter
                .bucket
                .acquire(deadline)
                .await
                .map_err(|denied| match denied {
                    RateLimitDenied::PastDeadline { wait, deadline } => {
                        EngineError::rate_limited(limiter.per_second, wait, deadline)
                    }
                    RateLimitDenied::QueueFull { waiting } => EngineError::RateLimited {
                        per_second: limiter.per_second,
                        reason: format!("{waiting} calls are already waiting"),
                    },
                })?;
            self.telemetry.rate_limit_waited(waiting.elapsed());
        }
        // Retries stop early enough to answer inside the caller's deadline.
        let mut policy = self.retry;
        if let Some(deadline) = deadline {
            let left = deadline.saturating_sub(started.elapsed());
            policy.budget = policy.budget.min(left.mul_f64(0.8));
        }
        let adaptive = self
            .adaptive
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let adaptive = adaptive.as_deref();
        // Every attempt, retries included, is paced: a retry is as much load on the store.
        let gate = || async {
            let Some(limiter) = adaptive else {
                return Ok(None);
            };
            let left = deadline.map(|d| d.saturating_sub(started.elapsed()));
            let waiting = tokio::time::Instant::now();
            let permit = limiter.acquire(left).await?;
            if !waiting.elapsed().is_zero() {
                self.telemetry.rate_limit_waited(waiting.elapsed());
            }
            Ok(Some(permit))
        };
        let (key_ref, digest_ref) = (&key, &digest);
        let call = |permit| async move {
            let result = self
                .backend
                .sign_traced(&key_ref.stored, digest_ref, scheme)
                .await;
            if let (Some(limiter), Some(permit)) = (adaptive, permit) {
                let change = match &result {
                    Ok(_) => limiter.on_success(&permit),
                    Err(e) if e.kind == BackendErrorKind::ResourceExhausted => {
                        limiter.on_throttle(&permit)
                    }
                    Err(_) => None,
                };
                if let Some(change) = change {
                    self.telemetry.adaptive_rate_changed(change);
                }
            }
            result
        };
        let signed = match with_gated_retries(policy, "sign", &self.stats, gate, call).await {
            Ok(signed) => signed,
            Err(Gated::Failed(error)) => return Err(error.into()),
            Err(Gated::Refused(denied)) => return Err(EngineError::adaptive_rate_limited(denied)),
        };
        trace.request_id = signed.request_id;
        let bytes = normalise_signature(id, key_type, signed.signature)?;
        Ok(Signature {
            bytes,
            fingerprint: key.public.fingerprint.clone(),
        })
    }

    fn read_keys(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<KeyId, Arc<ManagedKey<B::Handle>>>> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn stored_keys(&self) -> Vec<StoredKey<B::Handle>> {
        self.read_keys()
            .values()
            .map(|k| k.stored.clone())
            .collect()
    }
}

#[async_trait]
impl<B: Backend> KeyService for Engine<B> {
    fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    fn capabilities(&self) -> &crate::backend::Capabilities {
        self.backend.capabilities()
    }

    async fn generate_key(&self, id: KeyId, key_type: KeyType) -> Result<PublicKey, EngineError> {
        Engine::generate_key(self, id, key_type).await
    }

    fn public_key(&self, id: &KeyId) -> Result<PublicKey, EngineError> {
        Engine::public_key(self, id)
    }

    fn public_keys(&self) -> Vec<PublicKey> {
        Engine::public_keys(self)
    }

    async fn sign(
        &self,
        id: &KeyId,
        digest: Vec<u8>,
        opts: SignerOpts,
        deadline: Option<Duration>,
    ) -> Result<Signature, EngineError> {
        Engine::sign(self, id, digest, opts, deadline).await
    }

    fn call_stats(&self) -> BTreeMap<&'static str, OperationStats> {
        self.stats.snapshot()
    }

    fn telemetry(&self) -> &Arc<Telemetry> {
        Engine::telemetry(self)
    }

    fn set_options(&self, options: &EngineOptions) {
        self.apply_options(options);
    }

    async fn reconfigure_backend(&self, config: &dyn BackendConfig) -> Result<(), EngineError> {
        let any: &dyn std::any::Any = config;
        let Some(config) = any.downcast_ref::<B::Config>() else {
            return Err(EngineError::Backend(BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!(
                    "the new configuration is not for the running {} backend",
                    self.backend.name()
                ),
            )));
        };
        self.backend.reconfigure(config).await?;
        Ok(())
    }

    fn has_lifecycle(&self) -> bool {
        self.lifecycle.is_some()
    }

    async fn stamp_keys(&self) -> Result<bool, EngineError> {
        let Some(lifecycle) = &self.lifecycle else {
            return Ok(false);
        };
        let keys = self.stored_keys();
        crate::failpoint!("stamp.before");
        self.stats.record_call("stamp");
        let now = std::time::SystemTime::now();
        lifecycle
            .stamp(&keys, now)
            .await
            .inspect_err(|e| self.stats.record_failure("stamp", e.kind))?;
        self.stats.record_success("stamp");
        self.telemetry.stamped(now);
        Ok(true)
    }

    async fn list_records(&self) -> Result<Option<Vec<KeyRecord>>, EngineError> {
        let Some(lifecycle) = &self.lifecycle else {
            return Ok(None);
        };
        let records = with_retries(self.retry, "list", &self.stats, || lifecycle.list()).await?;
        Ok(Some(records))
    }

    async fn sweep(&self, policy: SweepPolicy) -> Result<Option<SweepReport>, EngineError> {
        let Some(lifecycle) = &self.lifecycle else {
            return Ok(None);
        };
        let in_use = self.in_use();
        self.stats.record_call("sweep");
        let now = std::time::SystemTime::now();
        let report = run_sweep(lifecycle.as_ref(), &in_use, now, policy)
            .await
            .inspect_err(|e| self.stats.record_failure("sweep", e.kind))?;
        self.stats.record_success("sweep");
        self.telemetry.swept(now, &report);
        Ok(Some(report))
    }

    fn in_use(&self) -> HashSet<String> {
        self.read_keys()
            .values()
            .map(|k| k.stored.locator().to_string())
            .collect()
    }
}

/// Where a new key's material comes from.
#[derive(Clone, Copy)]
enum Origin<'a> {
    /// The store generates it.
    Generate,
    /// An imported private key.
    Import(&'a PrivateKeyMaterial),
}

/// What an import did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imported {
    /// The key now served under the id.
    pub public: PublicKey,
    /// The store's locator of that key.
    pub locator: String,
    /// Whether anything changed.
    pub outcome: ImportOutcome,
}

/// Whether an import changed the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImportOutcome {
    /// The key is now served under an id that had none.
    Imported,
    /// The key replaced the key with this fingerprint, which was retired.
    Replaced(Fingerprint),
    /// The id already served this very key: nothing was done.
    AlreadyServed,
}

enum Settled {
    Switched,
    NotSwitched,
    Unknown,
}

fn kept_after_abort(had_key: bool, aborted: bool) -> &'static str {
    match (had_key, aborted) {
        (true, true) => "the current key stays in service; the new key was removed",
        (false, true) => "the new key was removed; no key is in service under this id",
        (true, false) => {
            "the current key stays in service; the new key could not be removed, and the sweep removes whichever of the two discovery does not find"
        }
        (false, false) => {
            "the new key could not be removed; the sweep removes it unless discovery finds it"
        }
    }
}

/// Phase 1 failed. The store may hold a half-created key (an import whose material never
/// arrived), but by the backend's contract it is inactive and the sweep removes it.
fn kept(had_key: bool) -> &'static str {
    if had_key {
        "the current key stays in service"
    } else {
        "no key was put in service under this id (anything half-created is inactive and the sweep removes it)"
    }
}

/// A claimed per-id GenerateKey slot; removes the id's lock entry when the last user leaves,
/// so the map holds only ids being generated right now.
struct GenerateSlot<'a, B: Backend> {
    engine: &'a Engine<B>,
    id: KeyId,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl<B: Backend> Drop for GenerateSlot<'_, B> {
    fn drop(&mut self) {
        let mut generating = self
            .engine
            .generating
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Every clone is made under this lock: two strong references (the map's and ours)
        // mean nobody else holds or waits for the slot.
        if Arc::strong_count(&self.lock) == 2 {
            generating.remove(&self.id);
        }
    }
}

fn managed_key<H>(stored: StoredKey<H>) -> ManagedKey<H> {
    let public = PublicKey {
        id: stored.id.clone(),
        key_type: stored.key_type,
        spki_der: stored.spki_der.clone(),
        fingerprint: Fingerprint::of_spki(&stored.spki_der),
    };
    ManagedKey { public, stored }
}

fn scalar_len(key_type: KeyType) -> Option<usize> {
    match key_type {
        KeyType::EcP256 => Some(32),
        KeyType::EcP384 => Some(48),
        KeyType::Rsa2048 | KeyType::Rsa4096 => None,
    }
}

/// Puts every backend's output into the form Go's `crypto.Signer` returns.
pub(crate) fn normalise_signature(
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
            "signature kind {} does not match a {key_type} key",
            match other {
                BackendSignature::EcdsaDer(_) => "ECDSA (DER)",
                BackendSignature::EcdsaFixed(_) => "ECDSA (r||s)",
                BackendSignature::Rsa(_) => "RSA",
            }
        ))),
    }
}

#[cfg(test)]
mod tests;
