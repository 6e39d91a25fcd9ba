//! The conformance cases. Each takes a [`Harness`] (a backend's [`Subject`] with a fault
//! proxy in front of its peer) and drives the backend the way the plugin does: parsed from
//! `plugin_data` by its registered factory, opened, started as an engine.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use keymanager_engine::lifecycle::SweepPolicy;
use keymanager_engine::resilience::RetryPolicy;
use keymanager_engine::{
    BackendFactory, Capabilities, CoreConfig, EngineError, EngineOptions, HashAlgorithm, KeyId,
    KeyService, KeyType, PssSaltLength, PssSaltSupport, SignatureScheme, SignerOpts,
    SigningSupport,
};

use crate::proxy::{Fault, FaultProxy, Plan, RequestSummary};
use crate::verify;

/// A backend under test, with what the suite needs to know about its store.
#[async_trait]
pub trait Subject: Send + Sync + 'static {
    /// The backend's registration, as the binary registers it.
    fn factory(&self) -> &'static dyn BackendFactory;

    /// The test peer's URL, for the fault proxy; `None` for a backend without one.
    fn peer_url(&self) -> Option<String>;

    /// The test CA certificate and key of an HTTPS-only peer: the fault proxy then speaks TLS
    /// on both sides, with a certificate from that CA (see `FaultProxy::start_tls`).
    fn peer_tls(&self) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
        None
    }

    /// `plugin_data` for `server_id`, pointing at `endpoint` (the fault proxy) if there is a
    /// peer. Each call may use a fresh store location for a backend without a peer.
    fn plugin_data(&self, server_id: &str, endpoint: Option<&str>) -> String;

    /// Whether a request to the peer only reads.
    fn is_read(&self, _request: &RequestSummary) -> bool {
        false
    }

    /// The locators of the keys of `(trust_domain, server_id, key_id)` the store holds and
    /// has not put on the way out (pending deletion, destroy scheduled), read directly from
    /// the store.
    async fn live_keys(&self, trust_domain: &str, server_id: &str, key_id: &str) -> Vec<String>;

    /// How many store requests the backend's prepare step makes for a new id: a crash right
    /// after the last of them leaves an unpublished key. One for every store that can
    /// create a key hidden from discovery; two for Vault Transit, where a key is created
    /// visible and then marked.
    fn prepare_calls(&self) -> usize {
        1
    }

    /// Whether the peer implements what listing the trust domain's keys needs (LocalStack's
    /// tagging API does not see its KMS keys). Without it, the cases that list and sweep
    /// are skipped, and say so.
    fn peer_lists_keys(&self) -> bool {
        true
    }

    /// Whether the backend keeps liveness stamps (a PKCS#11 token has nowhere to keep them:
    /// its keys are per server, and only its own leftovers are swept). Without them the
    /// stamp cases are skipped, and say so.
    fn keeps_stamps(&self) -> bool {
        true
    }

    /// Whether the store keeps a replaced key listed with its rotation history (when it was
    /// replaced and by which key; AWS KMS tags it during the 7-day deletion window). Stores
    /// that remove a replaced key at once have no history to show: the case is skipped.
    fn records_replacement(&self) -> bool {
        false
    }

    /// Writes `text` as the liveness stamp of the key at `locator` in `trust_domain` (for
    /// stamp fuzzing). `false` for a backend without stamps.
    async fn set_stamp(&self, _trust_domain: &str, _locator: &str, _text: &str) -> bool {
        false
    }

    /// `plugin_data` for `server_id` with the shared-keys mode on for SPIRE's JWT keys (the
    /// default `shared_key_ids`), the shared names scoped by `scope` so that scenarios never
    /// share keys, a 10 s lock lease and a 1 s clock-skew allowance. `None` for a backend
    /// without the mode: the shared cases are skipped, and say so.
    fn shared_plugin_data(
        &self,
        _server_id: &str,
        _endpoint: Option<&str>,
        _scope: &str,
    ) -> Option<String> {
        None
    }

    /// The store keys (locators) of shared key `key_id` in `scope` that are not on the way
    /// out, read directly from the store.
    async fn live_shared_keys(
        &self,
        _trust_domain: &str,
        _scope: &str,
        _key_id: &str,
    ) -> Vec<String> {
        Vec::new()
    }

    /// Whether every generation of a shared key carries its own liveness stamp, so that a
    /// server still serving a superseded one keeps it (AWS: one KMS key per generation).
    /// Cloud KMS labels belong to the CryptoKey, not the version: there a superseded
    /// version's evidence is only when it was superseded.
    fn stamps_each_shared_generation(&self) -> bool {
        true
    }

    /// Leaves the rotation lock a holder that crashed right after taking it would leave,
    /// for replacing generation `basis` (at `basis_locator`) of shared key `key_id` in
    /// `scope`. `false` when the subject cannot.
    async fn plant_shared_lock(
        &self,
        _trust_domain: &str,
        _scope: &str,
        _key_id: &str,
        _basis_locator: &str,
        _basis: u64,
    ) -> bool {
        false
    }

    /// Starts (`true`) or ends a store outage, for a backend without a peer to put the
    /// proxy in front of. `false` when the backend cannot simulate one.
    async fn outage(&self, _server_id: &str, _on: bool) -> bool {
        false
    }
}

/// A subject and the fault proxy in front of its peer.
pub struct Harness {
    subject: Arc<dyn Subject>,
    proxy: Option<FaultProxy>,
}

/// Fast retries: a failing call gives up in milliseconds, not SPIRE's 20 s budget.
pub fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(2),
        max_backoff: Duration::from_millis(10),
        budget: Duration::from_secs(2),
    }
}

/// A sweep that removes every leftover at once: no grace, no skew.
fn eager_sweep() -> SweepPolicy {
    SweepPolicy {
        stale_after: Duration::from_secs(1),
        half_created_grace: Duration::ZERO,
        max_clock_skew: Duration::ZERO,
    }
}

static SCENARIO: AtomicUsize = AtomicUsize::new(0);

/// A fresh (trust domain, server id), so that scenarios never see each other's keys.
fn scenario(tag: &str) -> (String, String) {
    let n = SCENARIO.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id();
    (
        format!("{tag}-{pid}-{n}.conformance.test"),
        format!("{tag}{n}-{pid}"),
    )
}

impl Harness {
    /// Puts a fault proxy in front of the subject's peer, if it has one.
    pub async fn new(subject: Arc<dyn Subject>) -> Self {
        crate::logs::capture_tracing();
        let proxy = match (subject.peer_url(), subject.peer_tls()) {
            (Some(url), Some((ca_cert, ca_key))) => {
                Some(FaultProxy::start_tls(&url, &ca_cert, &ca_key).await)
            }
            (Some(url), None) => Some(FaultProxy::start(&url).await),
            (None, _) => None,
        };
        Self { subject, proxy }
    }

    /// Starts an engine for `server_id` in `trust_domain`, as the plugin does.
    pub async fn start(&self, trust_domain: &str, server_id: &str) -> Arc<dyn KeyService> {
        self.try_start(trust_domain, server_id)
            .await
            .unwrap_or_else(|e| panic!("starting {server_id}: {e}"))
    }

    /// Opens the subject's backend for `server_id` as the plugin (and the operator CLI) do,
    /// without starting an engine.
    pub async fn open(
        &self,
        trust_domain: &str,
        server_id: &str,
    ) -> Result<Box<dyn keymanager_engine::OpenedBackend>, String> {
        let text = self
            .subject
            .plugin_data(server_id, self.proxy.as_ref().map(|p| p.url()));
        self.open_text(trust_domain, &text).await
    }

    /// Starts an engine for `server_id` with the shared-keys mode on (names scoped by
    /// `scope`); `None` when the subject has no shared-keys mode.
    pub async fn start_shared(
        &self,
        trust_domain: &str,
        server_id: &str,
        scope: &str,
    ) -> Option<Arc<dyn KeyService>> {
        let text = self.subject.shared_plugin_data(
            server_id,
            self.proxy.as_ref().map(|p| p.url()),
            scope,
        )?;
        let opened = self
            .open_text(trust_domain, &text)
            .await
            .unwrap_or_else(|e| panic!("opening {server_id} in shared-keys mode: {e}"));
        Some(
            opened
                .start(EngineOptions {
                    retry: fast_retries(),
                    ..EngineOptions::default()
                })
                .await
                .unwrap_or_else(|e| panic!("starting {server_id} in shared-keys mode: {e}")),
        )
    }

    async fn open_text(
        &self,
        trust_domain: &str,
        text: &str,
    ) -> Result<Box<dyn keymanager_engine::OpenedBackend>, String> {
        let mut settings =
            keymanager_plugin::hcl_settings::parse(text).map_err(|e| e.to_string())?;
        let factory = self.subject.factory();
        // The runtime's own key; the backend's factory takes the rest.
        let named = settings
            .take_nonempty_string("backend")
            .map_err(|e| e.to_string())?;
        if named.is_some_and(|name| name != factory.name()) {
            return Err(format!(
                "plugin_data names another backend than {}",
                factory.name()
            ));
        }
        let core = CoreConfig {
            trust_domain: trust_domain.to_string(),
        };
        let config = factory
            .parse(&mut settings, &core)
            .map_err(|e| e.to_string())?;
        settings
            .finish(&factory.setting_keys())
            .map_err(|e| e.to_string())?;
        config.open().await.map_err(|e| e.to_string())
    }

    async fn try_start(
        &self,
        trust_domain: &str,
        server_id: &str,
    ) -> Result<Arc<dyn KeyService>, String> {
        self.open(trust_domain, server_id)
            .await?
            .start(EngineOptions {
                retry: fast_retries(),
                ..EngineOptions::default()
            })
            .await
            .map_err(|e| e.to_string())
    }

    fn proxy(&self) -> &FaultProxy {
        self.proxy.as_ref().expect("this case needs a test peer")
    }
}

fn id(s: &str) -> KeyId {
    KeyId::new(s).expect("non-empty id")
}

/// Every signer option the capabilities declare for `key_type`.
fn declared(capabilities: &Capabilities, key_type: KeyType) -> Vec<SignerOpts> {
    let mut out = Vec::new();
    for opts in every_option(key_type) {
        let Ok(scheme) = SignatureScheme::resolve(key_type, opts) else {
            continue;
        };
        if capabilities.supports(key_type, scheme) && salt_supported(capabilities, scheme) {
            out.push(opts);
        }
    }
    out
}

fn salt_supported(capabilities: &Capabilities, scheme: SignatureScheme) -> bool {
    match scheme {
        SignatureScheme::RsaPss { hash, salt_len, .. } => {
            capabilities.pss_salt == PssSaltSupport::Any || salt_len == hash.output_len()
        }
        _ => true,
    }
}

/// Every signer option SPIRE can send for a key type.
fn every_option(key_type: KeyType) -> Vec<SignerOpts> {
    let mut out: Vec<SignerOpts> = HashAlgorithm::ALL
        .into_iter()
        .map(SignerOpts::Hash)
        .collect();
    if key_type.is_rsa() {
        for hash in HashAlgorithm::ALL {
            for salt in [
                PssSaltLength::EqualsHash,
                PssSaltLength::Maximum,
                PssSaltLength::exact(20).expect("non-zero"),
            ] {
                out.push(SignerOpts::Pss { hash, salt });
            }
        }
    }
    out
}

/// Create, sign, rotate (the replaced key leaves the store), restart (the same keys are
/// found), and another server id sees none of them.
pub async fn lifecycle(h: &Harness) {
    let (td, server) = scenario("life");
    let service = h.start(&td, &server).await;
    let capabilities = service.capabilities().clone();
    let mut created = BTreeSet::new();
    for key_type in capabilities.key_types.iter().copied() {
        let key = format!("key-{key_type}");
        let public = service
            .generate_key(id(&key), key_type)
            .await
            .expect("generate");
        assert_eq!(public.key_type, key_type);
        let opts = *declared(&capabilities, key_type)
            .first()
            .unwrap_or_else(|| panic!("{key_type} is creatable but declares no signing"));
        verify::sign_and_verify(service.as_ref(), &key, key_type, opts)
            .await
            .expect("a fresh key signs verifiably");
        created.insert((key, public.fingerprint.to_string()));
    }
    let first_type = capabilities.key_types[0];
    let rotated_id = format!("key-{first_type}");
    let before = service.public_key(&id(&rotated_id)).expect("key");
    let live_before = h.subject.live_keys(&td, &server, &rotated_id).await;
    assert_eq!(
        live_before.len(),
        1,
        "one live key in the store before rotation: {live_before:?}"
    );
    let after = service
        .generate_key(id(&rotated_id), first_type)
        .await
        .expect("rotate");
    assert_ne!(
        before.fingerprint, after.fingerprint,
        "rotation makes a new key"
    );
    let live_after = h.subject.live_keys(&td, &server, &rotated_id).await;
    assert_eq!(
        live_after.len(),
        1,
        "the replaced key left the store: {live_after:?}"
    );
    assert_ne!(live_after, live_before);
    created.remove(&(rotated_id.clone(), before.fingerprint.to_string()));
    created.insert((rotated_id, after.fingerprint.to_string()));

    drop(service);
    let restarted = h.start(&td, &server).await;
    let found: BTreeSet<_> = restarted
        .public_keys()
        .into_iter()
        .map(|k| (k.id.to_string(), k.fingerprint.to_string()))
        .collect();
    assert_eq!(found, created, "a restart finds exactly the current keys");
    let other = h.start(&td, &format!("{server}-other")).await;
    assert!(
        other.public_keys().is_empty(),
        "another server id finds none of them"
    );
}

/// Every declared (key type, scheme, hash, salt) signs, and the signature verifies with an
/// independent library.
pub async fn signs_every_declared_capability(h: &Harness) {
    let (td, server) = scenario("sign");
    let service = h.start(&td, &server).await;
    let capabilities = service.capabilities().clone();
    let mut failures = Vec::new();
    let mut checked = 0;
    for key_type in capabilities.key_types.iter().copied() {
        let key = format!("sign-{key_type}");
        service
            .generate_key(id(&key), key_type)
            .await
            .expect("generate");
        for opts in declared(&capabilities, key_type) {
            checked += 1;
            if let Err(e) = verify::sign_and_verify(service.as_ref(), &key, key_type, opts).await {
                failures.push(e);
            }
        }
    }
    assert!(checked > 0);
    assert!(
        failures.is_empty(),
        "{} of {checked} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Whatever the capabilities do not declare is refused before any backend call.
pub async fn refuses_undeclared_combinations_without_a_call(h: &Harness) {
    let (td, server) = scenario("refuse");
    let service = h.start(&td, &server).await;
    let capabilities = service.capabilities().clone();
    for key_type in capabilities.key_types.iter().copied() {
        service
            .generate_key(id(&format!("refuse-{key_type}")), key_type)
            .await
            .expect("generate");
    }
    let calls_before = service.call_stats().get("sign").map_or(0, |s| s.calls);
    let requests_before = h.proxy.as_ref().map(FaultProxy::count);
    let mut refused = 0;
    for key_type in capabilities.key_types.iter().copied() {
        let key = format!("refuse-{key_type}");
        let declared = declared(&capabilities, key_type);
        for opts in every_option(key_type)
            .into_iter()
            .filter(|o| !declared.contains(o))
        {
            let digest = vec![0u8; opts.hash().output_len()];
            match service.sign(&id(&key), digest, opts, None).await {
                Err(EngineError::Scheme(_))
                | Err(EngineError::SchemeUnsupported { .. })
                | Err(EngineError::PssSaltUnsupported { .. }) => refused += 1,
                other => panic!("{key} {opts:?}: expected a refusal, got {other:?}"),
            }
        }
        let undeclared_types: Vec<KeyType> = KeyType::ALL
            .into_iter()
            .filter(|t| !capabilities.key_types.contains(t))
            .collect();
        for t in undeclared_types {
            assert!(matches!(
                service.generate_key(id("never"), t).await,
                Err(EngineError::KeyTypeUnsupported { .. })
            ));
        }
    }
    if matches!(capabilities.signing, SigningSupport::Only(_)) {
        assert!(
            refused > 0,
            "a KMS declares limits, so something was refused"
        );
    }
    let calls_after = service.call_stats().get("sign").map_or(0, |s| s.calls);
    assert_eq!(
        calls_before, calls_after,
        "refusals made no backend sign call"
    );
    if let (Some(before), Some(proxy)) = (requests_before, &h.proxy) {
        assert_eq!(proxy.count(), before, "refusals sent nothing to the store");
    }
}

/// The GenerateKey scenarios: a new id, or a rotation of an existing key.
#[derive(Clone, Copy, Debug)]
enum Generate {
    NewId,
    Rotation,
}

/// A failure or a crash at every store call of GenerateKey: afterwards a restart finds the
/// old key or the new one (never none, never one on its way out), and the next sweep
/// leaves exactly that key in the store. For a backend without a peer, a store outage
/// during GenerateKey.
pub async fn survives_a_failure_or_crash_at_every_call(h: &Harness) {
    if h.proxy.is_none() {
        return survives_an_outage(h).await;
    }
    type Mode = (&'static str, fn(usize) -> Plan);
    let modes: [Mode; 5] = [
        ("fails once", |n| Plan::Once(n, Fault::Fail)),
        ("fails from then on", |n| Plan::From(n, Fault::Fail)),
        ("applied, responses lost from then on", |n| {
            Plan::From(n, Fault::Lose)
        }),
        ("crash before the call", |n| {
            Plan::Once(n, Fault::HoldBefore)
        }),
        ("crash after the call took effect", |n| {
            Plan::Once(n, Fault::HoldAfter)
        }),
    ];
    let mut checked = 0;
    for generate in [Generate::NewId, Generate::Rotation] {
        let calls = count_generate_calls(h, generate).await;
        assert!(calls > 0, "GenerateKey made no store call");
        for (mode, plan) in modes {
            for n in 1..=calls {
                fault_scenario(h, generate, mode, plan(n), n).await;
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} scenarios");
}

/// How many store requests one clean GenerateKey makes.
async fn count_generate_calls(h: &Harness, generate: Generate) -> usize {
    let (td, server) = scenario("count");
    let service = h.start(&td, &server).await;
    if let Generate::Rotation = generate {
        service
            .generate_key(id("k"), KeyType::EcP256)
            .await
            .expect("generate");
    }
    let start = h.proxy().count();
    service
        .generate_key(id("k"), KeyType::EcP256)
        .await
        .expect("generate");
    h.proxy().count() - start
}

async fn fault_scenario(h: &Harness, generate: Generate, mode: &str, plan: Plan, n: usize) {
    let (td, server) = scenario("fault");
    let case = format!("{generate:?}, call {n} {mode}");
    let service = h.start(&td, &server).await;
    let old = match generate {
        Generate::NewId => None,
        Generate::Rotation => Some(
            service
                .generate_key(id("k"), KeyType::EcP256)
                .await
                .expect("generate"),
        ),
    };
    let proxy = h.proxy();
    let start = proxy.count();
    proxy.plan(plan);
    let result = tokio::select! {
        result = service.generate_key(id("k"), KeyType::EcP256) => Some(result),
        () = proxy.held() => None, // a crash: the process is gone from here on
    };
    proxy.clear();
    let calls: Vec<String> = proxy
        .since(start)
        .iter()
        .map(RequestSummary::name)
        .collect();
    let case = format!("{case} (calls: {})", calls.join(", "));
    if let Some(result) = &result {
        // A running process never serves a key the store has put on its way out.
        let served = service.public_key(&id("k"));
        if let Ok(served) = &served {
            let live = h.subject.live_keys(&td, &server, "k").await;
            assert!(
                !live.is_empty(),
                "{case}: the process serves {} but the store holds no live key",
                served.fingerprint
            );
        }
        if result.is_err() {
            assert_eq!(
                served.ok().map(|k| k.fingerprint),
                old.as_ref().map(|k| k.fingerprint.clone()),
                "{case}: a failed GenerateKey keeps the current key in memory"
            );
        }
    }
    drop(service);

    let restarted = h.start(&td, &server).await;
    let found = restarted.public_key(&id("k")).ok();
    let new = result.as_ref().and_then(|r| r.as_ref().ok());
    match (&old, &found) {
        (Some(_), None) => panic!("{case}: a restart finds no key for the id"),
        (Some(_), Some(found)) => {
            // Only two keys exist for the id: the old one and the one being created. A
            // failed or interrupted GenerateKey may leave either (a store that cannot hide
            // a new key until published, like Cloud KMS versions, shows it once its undo
            // fails too); a successful one leaves the new one.
            if let Some(new) = new {
                assert_eq!(
                    found.fingerprint, new.fingerprint,
                    "{case}: a successful GenerateKey is durable"
                );
            }
        }
        (None, Some(found)) => {
            if let Some(new) = new {
                assert_eq!(
                    found.fingerprint, new.fingerprint,
                    "{case}: a successful GenerateKey is durable"
                );
            }
        }
        (None, None) => assert!(
            new.is_none(),
            "{case}: a created key is not found after a restart"
        ),
    }
    // Whatever the restart found is usable: not on its way out.
    if let Some(found) = &found {
        let live = h.subject.live_keys(&td, &server, "k").await;
        assert!(
            !live.is_empty(),
            "{case}: discovery found {} but the store holds no live key",
            found.fingerprint
        );
    }
    if !h.subject.peer_lists_keys() {
        return;
    }
    // The next sweep leaves exactly the key discovery finds.
    restarted
        .sweep(eager_sweep())
        .await
        .unwrap_or_else(|e| panic!("{case}: sweep failed: {e}"))
        .expect("a KMS backend sweeps");
    let live = h.subject.live_keys(&td, &server, "k").await;
    let in_use = restarted.in_use();
    match &found {
        Some(_) => {
            assert_eq!(
                live.len(),
                1,
                "{case}: the sweep leaves exactly the found key: {live:?}"
            );
            assert!(
                in_use.contains(&live[0]),
                "{case}: the key left is the one in use: {live:?}"
            );
        }
        None => assert!(
            live.is_empty(),
            "{case}: the sweep removes the unpublished key: {live:?}"
        ),
    }
}

/// A store outage during a rotation keeps the old key, in memory and after a restart.
async fn survives_an_outage(h: &Harness) {
    let (td, server) = scenario("outage");
    let service = h.start(&td, &server).await;
    let old = service
        .generate_key(id("k"), KeyType::EcP256)
        .await
        .expect("generate");
    if !h.subject.outage(&server, true).await {
        return;
    }
    let result = service.generate_key(id("k"), KeyType::EcP256).await;
    h.subject.outage(&server, false).await;
    assert!(result.is_err(), "GenerateKey must fail during an outage");
    assert_eq!(service.public_key(&id("k")).expect("key"), old);
    drop(service);
    let restarted = h.start(&td, &server).await;
    assert_eq!(
        restarted.public_key(&id("k")).expect("key").fingerprint,
        old.fingerprint
    );
}

/// Listing the trust domain's keys for the sweep only reads, and reads the same twice.
pub async fn listing_is_free_of_side_effects(h: &Harness) {
    if !h.subject.peer_lists_keys() {
        eprintln!("skipped: this test peer cannot list the trust domain's keys");
        return;
    }
    let (td, server) = scenario("list");
    let service = h.start(&td, &server).await;
    if !service.has_lifecycle() {
        assert!(service.list_records().await.expect("list").is_none());
        return;
    }
    service
        .generate_key(id("a"), KeyType::EcP256)
        .await
        .expect("generate");
    service
        .generate_key(id("a"), KeyType::EcP256)
        .await
        .expect("rotate");
    service
        .generate_key(id("b"), KeyType::EcP256)
        .await
        .expect("generate");
    let Some(proxy) = h.proxy.as_ref() else {
        // No proxy in front of this store (a PKCS#11 token): no crash leftover can be made
        // and writes are not observable; listing must still read the same twice.
        let first = service.list_records().await.expect("list");
        let second = service.list_records().await.expect("list");
        assert_eq!(first, second, "listing twice reads the same");
        eprintln!("partly skipped: no proxy in front of this store to observe writes");
        return;
    };
    // A leftover: a crash right after the prepare step.
    proxy.plan(Plan::Once(h.subject.prepare_calls(), Fault::HoldAfter));
    tokio::select! {
        _ = service.generate_key(id("c"), KeyType::EcP256) => panic!("the first call is held"),
        () = proxy.held() => {}
    }
    proxy.clear();
    let start = proxy.count();
    let first = service
        .list_records()
        .await
        .expect("list")
        .expect("records");
    let second = service
        .list_records()
        .await
        .expect("list")
        .expect("records");
    let writes: Vec<String> = proxy
        .since(start)
        .iter()
        .filter(|r| !h.subject.is_read(r))
        .map(RequestSummary::name)
        .collect();
    assert!(writes.is_empty(), "listing wrote to the store: {writes:?}");
    // Other cases run at the same time against the same store: compare this scenario's keys.
    let ours = |records: &[keymanager_engine::lifecycle::KeyRecord]| {
        records
            .iter()
            .filter(|r| r.server_id.as_deref() == Some(server.as_str()))
            .cloned()
            .collect::<Vec<_>>()
    };
    let (first, second) = (ours(&first), ours(&second));
    assert!(!first.is_empty(), "this scenario's keys are listed");
    assert_eq!(first, second, "listing twice reads the same");
    assert!(
        first.iter().any(|r| !r.published),
        "the leftover is listed as unpublished"
    );
}

/// Stamps written by a server read back as its liveness evidence.
pub async fn stamps_round_trip(h: &Harness) {
    if !h.subject.keeps_stamps() {
        eprintln!("skipped: this backend keeps no liveness stamps");
        return;
    }
    if !h.subject.peer_lists_keys() {
        eprintln!("skipped: this test peer cannot list the trust domain's keys");
        return;
    }
    let (td, server) = scenario("stamp");
    let service = h.start(&td, &server).await;
    if !service.has_lifecycle() {
        assert!(!service.stamp_keys().await.expect("stamp"));
        return;
    }
    service
        .generate_key(id("a"), KeyType::EcP256)
        .await
        .expect("generate");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = SystemTime::now() - Duration::from_secs(1);
    assert!(service.stamp_keys().await.expect("stamp"));
    let after = SystemTime::now() + Duration::from_secs(1);
    let in_use = service.in_use();
    let records = service
        .list_records()
        .await
        .expect("list")
        .expect("records");
    let mine: Vec<_> = records
        .iter()
        .filter(|r| in_use.contains(&r.locator))
        .collect();
    assert_eq!(mine.len(), 1);
    let stamp = mine[0].last_stamp.expect("the stamp reads back");
    assert!(
        stamp >= before && stamp <= after,
        "{stamp:?} not within [{before:?}, {after:?}]"
    );
}

/// Junk in a stamp (overflowing, negative, not a number) is no evidence: the sweep neither
/// panics nor fails, and a dead server's genuinely stale key is still removed.
pub async fn junk_stamps_are_no_evidence(h: &Harness) {
    if !h.subject.keeps_stamps() {
        eprintln!("skipped: this backend keeps no liveness stamps");
        return;
    }
    if !h.subject.peer_lists_keys() {
        eprintln!("skipped: this test peer cannot list the trust domain's keys");
        return;
    }
    let (td, server) = scenario("fuzz");
    let dead = h.start(&td, &format!("{server}-dead")).await;
    dead.generate_key(id("junk"), KeyType::EcP256)
        .await
        .expect("generate");
    dead.generate_key(id("stale"), KeyType::EcP256)
        .await
        .expect("generate");
    let dead_keys: Vec<(String, String)> = dead
        .in_use()
        .into_iter()
        .map(|locator| (locator, String::new()))
        .collect();
    drop(dead);
    let records_of = |records: &[keymanager_engine::lifecycle::KeyRecord], key: &str| {
        records
            .iter()
            .find(|r| r.key_id.as_deref() == Some(key))
            .cloned()
    };
    let sweeper = h.start(&td, &server).await;
    if !sweeper.has_lifecycle() {
        return;
    }
    let records = sweeper
        .list_records()
        .await
        .expect("list")
        .expect("records");
    let junk = records_of(&records, "junk").expect("listed").locator;
    let stale = records_of(&records, "stale").expect("listed").locator;
    assert!(dead_keys.iter().any(|(l, _)| *l == junk));
    assert!(
        h.subject.set_stamp(&td, &stale, "1000").await,
        "a backend with a lifecycle writes stamps"
    );
    for text in [
        "18446744073709551615",
        "99999999999999999999",
        "-1",
        "junk",
        "1e9",
    ] {
        assert!(h.subject.set_stamp(&td, &junk, text).await);
        let records = sweeper
            .list_records()
            .await
            .expect("list")
            .expect("records");
        let record = records_of(&records, "junk").expect("listed");
        assert_eq!(
            record.last_stamp, None,
            "stamp {text:?} must be no evidence"
        );
        assert!(
            records_of(&records, "stale")
                .and_then(|r| r.last_stamp)
                .is_some(),
            "a valid stamp reads back"
        );
    }
    // The stale key goes; the junk-stamped key is judged on its creation time instead.
    let policy = SweepPolicy {
        stale_after: Duration::from_secs(3600),
        half_created_grace: Duration::from_secs(3600),
        max_clock_skew: Duration::ZERO,
    };
    let report = sweeper
        .sweep(policy)
        .await
        .expect("the sweep survives junk stamps")
        .expect("report");
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(
        h.subject
            .live_keys(&td, &format!("{server}-dead"), "stale")
            .await
            .is_empty(),
        "the genuinely stale key of a dead server is removed"
    );
    assert_eq!(
        h.subject
            .live_keys(&td, &format!("{server}-dead"), "junk")
            .await
            .len(),
        1,
        "a key created minutes ago with a junk stamp is kept"
    );
}

/// The operator CLI's view of the store (`OpenedBackend::admin`) agrees with the engine:
/// discovery serves the engine's keys with the same fingerprints, each key reads back by its
/// locator, and the listing (where the backend lists) shows them published and this
/// server's.
pub async fn operator_view_matches_the_engine(h: &Harness) {
    let (td, server) = scenario("admin");
    let service = h.start(&td, &server).await;
    let key_type = service.capabilities().key_types[0];
    for key in ["x509-CA-A", "JWT-Signer-A", "x509-CA-A"] {
        service
            .generate_key(id(key), key_type)
            .await
            .unwrap_or_else(|e| panic!("GenerateKey {key}: {e}"));
    }
    let admin = h.open(&td, &server).await.expect("open").admin();
    let served = admin.served().await.expect("served");
    let engine: BTreeSet<(String, String)> = service
        .public_keys()
        .iter()
        .map(|k| (k.id.as_str().to_string(), k.fingerprint.to_string()))
        .collect();
    let seen: BTreeSet<(String, String)> = served
        .iter()
        .map(|k| {
            (
                k.key_id.clone(),
                keymanager_engine::Fingerprint::of_spki(&k.spki_der).to_string(),
            )
        })
        .collect();
    assert_eq!(
        seen, engine,
        "the operator's discovery serves the engine's keys"
    );
    let in_use = service.in_use();
    for key in &served {
        assert!(
            in_use.contains(&key.locator),
            "{} is not in use",
            key.locator
        );
        let (read_type, der) = admin
            .public_key_at(&key.locator)
            .await
            .unwrap_or_else(|e| panic!("public key of {}: {e}", key.locator));
        assert_eq!((read_type, &*der), (key.key_type, &*key.spki_der));
    }
    if !h.subject.peer_lists_keys() {
        eprintln!("skipped the listing part: the peer cannot list the trust domain's keys");
        return;
    }
    if let Some(records) = admin.records().await.expect("records") {
        let me = admin
            .identity()
            .expect("a lifecycle backend has an identity");
        assert_eq!(me.server_id, server);
        for key in &served {
            let record = records
                .iter()
                .find(|r| r.locator == key.locator)
                .unwrap_or_else(|| panic!("{} is not listed", key.locator));
            assert!(record.published, "{} is listed unpublished", key.locator);
            assert_eq!(record.server_id.as_deref(), Some(server.as_str()));
            assert_eq!(record.key_id.as_deref(), Some(key.key_id.as_str()));
        }
    }
}

/// A rotation leaves the replaced key listed with when it was replaced and by which key (the
/// new key's locator), for stores that record the history.
pub async fn rotation_history_is_recorded(h: &Harness) {
    if !h.subject.records_replacement() {
        eprintln!("skipped: this store removes a replaced key at once; it keeps no history");
        return;
    }
    if !h.subject.peer_lists_keys() {
        eprintln!("skipped: this test peer cannot list the trust domain's keys");
        return;
    }
    let (td, server) = scenario("history");
    let service = h.start(&td, &server).await;
    let key_type = service.capabilities().key_types[0];
    service
        .generate_key(id("x509-CA-A"), key_type)
        .await
        .expect("generate");
    let first = service.in_use();
    let before = SystemTime::now() - Duration::from_secs(1);
    service
        .generate_key(id("x509-CA-A"), key_type)
        .await
        .expect("rotate");
    let after = SystemTime::now() + Duration::from_secs(1);
    let second = service.in_use();
    let old = first.iter().next().expect("one key before the rotation");
    let new = second.iter().next().expect("one key after the rotation");
    assert_ne!(old, new, "the rotation made a new key");
    let records = service
        .list_records()
        .await
        .expect("list")
        .expect("records");
    let replaced = records
        .iter()
        .find(|r| &r.locator == old)
        .unwrap_or_else(|| panic!("the replaced key {old} is not listed: {records:#?}"));
    assert_eq!(replaced.replaced_by.as_deref(), Some(new.as_str()));
    let when = replaced.replaced.expect("when it was replaced");
    assert!(
        when >= before && when <= after,
        "{when:?} not within [{before:?}, {after:?}]"
    );
    let current = records
        .iter()
        .find(|r| &r.locator == new)
        .expect("the new key is listed");
    assert_eq!((current.replaced, &current.replaced_by), (None, &None));
    assert!(
        current.created.is_some(),
        "the new key's creation time is listed"
    );
}

/// Generates one `#[tokio::test]` per conformance case for a subject. `$make` is an async
/// expression yielding an `Arc<dyn Subject>`.
/// Shared-keys mode: the servers of one trust domain rotating a shared key at once create
/// exactly one store key per rotation, every server serves it, and the signatures verify;
/// per-server keys stay per server; a restarted server finds the shared key.
pub async fn shared_rotations_make_one_key_every_server_serves(h: &Harness) {
    let (td, scope) = scenario("shared");
    let servers = ["a", "b", "c"].map(|s| format!("{scope}-{s}"));
    let mut services = Vec::new();
    for server in &servers {
        match h.start_shared(&td, server, &scope).await {
            Some(service) => services.push(service),
            None => {
                eprintln!(
                    "skipped: {} has no shared-keys mode",
                    h.subject.factory().name()
                );
                return;
            }
        }
    }
    let jwt = "JWT-Signer-A";
    let key_type = services[0].capabilities().key_types[0];
    let mut previous = BTreeSet::new();
    for round in 1..=2usize {
        let generated = futures_util::future::join_all(
            services.iter().map(|s| s.generate_key(id(jwt), key_type)),
        )
        .await;
        let fingerprints: BTreeSet<String> = generated
            .into_iter()
            .map(|p| p.expect("shared rotation").fingerprint.to_string())
            .collect();
        assert_eq!(
            fingerprints.len(),
            1,
            "round {round}: every server serves the same key: {fingerprints:?}"
        );
        assert!(previous.is_disjoint(&fingerprints), "round {round} rotated");
        previous.extend(fingerprints);
        let live = h.subject.live_shared_keys(&td, &scope, jwt).await;
        eprintln!(
            "figure: round {round}: {} servers rotating at once, store keys of the shared id: {}",
            services.len(),
            live.len()
        );
        assert_eq!(
            live.len(),
            round,
            "round {round}: exactly one new store key per rotation (the superseded ones stay for the sweep): {live:?}"
        );
        for service in &services {
            let opts = *declared(service.capabilities(), key_type)
                .first()
                .expect("a declared scheme");
            verify::sign_and_verify(service.as_ref(), jwt, key_type, opts)
                .await
                .expect("every server signs verifiably with the shared key");
        }
    }
    // Per-server keys stay per server.
    let ca = "x509-CA-A";
    let mut ca_keys = BTreeSet::new();
    for service in &services {
        let public = service
            .generate_key(id(ca), key_type)
            .await
            .expect("CA key");
        ca_keys.insert(public.fingerprint.to_string());
    }
    assert_eq!(ca_keys.len(), services.len(), "X509 CA keys are per server");
    // A restarted server finds the current shared key; so does a new one.
    let current = services[0]
        .public_key(&id(jwt))
        .expect("served")
        .fingerprint;
    drop(services);
    for server in [servers[1].clone(), format!("{scope}-new")] {
        let restarted = h
            .start_shared(&td, &server, &scope)
            .await
            .expect("shared-keys mode");
        assert_eq!(
            restarted.public_key(&id(jwt)).expect("found").fingerprint,
            current,
            "{server} finds the shared key"
        );
    }
}

/// Shared-keys mode: a holder that took the rotation lock and crashed blocks others only
/// for its lease (plus the clock-skew allowance); then one server takes over and creates
/// exactly one key.
pub async fn a_crashed_shared_lock_holder_is_taken_over(h: &Harness) {
    let (td, scope) = scenario("sharedlock");
    let server = format!("{scope}-a");
    let Some(service) = h.start_shared(&td, &server, &scope).await else {
        eprintln!(
            "skipped: {} has no shared-keys mode",
            h.subject.factory().name()
        );
        return;
    };
    let jwt = "JWT-Signer-A";
    let key_type = service.capabilities().key_types[0];
    let first = service
        .generate_key(id(jwt), key_type)
        .await
        .expect("first");
    let live = h.subject.live_shared_keys(&td, &scope, jwt).await;
    assert_eq!(live.len(), 1, "{live:?}");
    if !h
        .subject
        .plant_shared_lock(&td, &scope, jwt, &live[0], 1)
        .await
    {
        eprintln!("skipped: the subject cannot plant a rotation lock");
        return;
    }
    let started = std::time::Instant::now();
    let second = service
        .generate_key(id(jwt), key_type)
        .await
        .expect("rotated after the lease");
    let waited = started.elapsed();
    eprintln!("figure: rotation behind a crashed holder's lock took {waited:?}");
    assert_ne!(first.fingerprint, second.fingerprint);
    // 10 s lease + 1 s skew allowance (see `Subject::shared_plugin_data`).
    assert!(
        waited >= Duration::from_secs(11),
        "took the lock over before its lease ended: {waited:?}"
    );
    assert!(waited < Duration::from_secs(30), "{waited:?}");
    let live = h.subject.live_shared_keys(&td, &scope, jwt).await;
    assert_eq!(live.len(), 2, "exactly one new key: {live:?}");
}

/// Shared-keys mode: a superseded shared key is swept only once it has been superseded for
/// longer than the stale age *and* no server has stamped it for as long; the current one
/// stays.
pub async fn superseded_shared_keys_go_only_when_stale_and_unstamped(h: &Harness) {
    let (td, scope) = scenario("sharedsweep");
    let mut services = Vec::new();
    for s in ["a", "b", "c"] {
        match h.start_shared(&td, &format!("{scope}-{s}"), &scope).await {
            Some(service) => services.push(service),
            None => {
                eprintln!(
                    "skipped: {} has no shared-keys mode",
                    h.subject.factory().name()
                );
                return;
            }
        }
    }
    if !h.subject.peer_lists_keys() {
        eprintln!("skipped: the peer cannot list the trust domain's keys");
        return;
    }
    let jwt = "JWT-Signer-A";
    let key_type = services[0].capabilities().key_types[0];
    for service in &services {
        service
            .generate_key(id(jwt), key_type)
            .await
            .expect("first");
    }
    let old = h.subject.live_shared_keys(&td, &scope, jwt).await;
    assert_eq!(old.len(), 1, "{old:?}");
    // a and b rotate; c keeps serving the superseded key.
    let (ra, rb) = tokio::join!(
        services[0].generate_key(id(jwt), key_type),
        services[1].generate_key(id(jwt), key_type)
    );
    assert_eq!(ra.expect("a").fingerprint, rb.expect("b").fingerprint);
    let policy = SweepPolicy {
        stale_after: Duration::from_secs(5),
        half_created_grace: Duration::ZERO,
        max_clock_skew: Duration::ZERO,
    };
    let live = |when: &'static str| {
        let (td, scope) = (td.clone(), scope.clone());
        async move {
            let live = h.subject.live_shared_keys(&td, &scope, jwt).await;
            eprintln!("{when}: {live:?}");
            live
        }
    };
    services[0].sweep(policy).await.expect("sweep");
    assert!(
        live("just superseded").await.contains(&old[0]),
        "superseded moments ago: kept"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    if h.subject.stamps_each_shared_generation() {
        assert!(services[2].stamp_keys().await.expect("stamp"));
        services[0].sweep(policy).await.expect("sweep");
        assert!(
            live("superseded long ago, stamped by c")
                .await
                .contains(&old[0]),
            "a server still serving the superseded key keeps it"
        );
        tokio::time::sleep(Duration::from_secs(6)).await;
    } else {
        eprintln!(
            "the store stamps no single generation: the stamped-by-another-server step is skipped"
        );
    }
    services[0].sweep(policy).await.expect("sweep");
    let after = live("superseded and unstamped").await;
    assert!(!after.contains(&old[0]), "stale and unstamped: swept");
    assert_eq!(after.len(), 1, "the current shared key stays: {after:?}");
}

/// Shared-keys mode under load (not in the macro: a long run behind an ignored test):
/// `servers` engines rotate a shared key at once, `rounds` times. Returns the store keys
/// of the shared id after each round and the seconds each round took; panics unless every
/// server serves the same key after each round.
pub async fn shared_rotation_rounds(
    h: &Harness,
    servers: usize,
    rounds: usize,
) -> Vec<(usize, f64)> {
    let (td, scope) = scenario("sharedload");
    let mut services = Vec::new();
    for n in 0..servers {
        services.push(
            h.start_shared(&td, &format!("{scope}-{n}"), &scope)
                .await
                .expect("a subject with the shared-keys mode"),
        );
    }
    let jwt = "JWT-Signer-B";
    let key_type = services[0].capabilities().key_types[0];
    let mut out = Vec::new();
    for round in 1..=rounds {
        let started = std::time::Instant::now();
        let generated = futures_util::future::join_all(
            services.iter().map(|s| s.generate_key(id(jwt), key_type)),
        )
        .await;
        let seconds = started.elapsed().as_secs_f64();
        let fingerprints: BTreeSet<String> = generated
            .into_iter()
            .map(|p| p.expect("shared rotation").fingerprint.to_string())
            .collect();
        assert_eq!(fingerprints.len(), 1, "round {round}: {fingerprints:?}");
        let keys = h.subject.live_shared_keys(&td, &scope, jwt).await.len();
        eprintln!("figure: round {round}: {servers} servers, {keys} store keys, {seconds:.2} s");
        out.push((keys, seconds));
    }
    out
}

#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        $crate::conformance_suite!(@case $make, lifecycle);
        $crate::conformance_suite!(@case $make, signs_every_declared_capability);
        $crate::conformance_suite!(@case $make, refuses_undeclared_combinations_without_a_call);
        $crate::conformance_suite!(@case $make, survives_a_failure_or_crash_at_every_call);
        $crate::conformance_suite!(@case $make, listing_is_free_of_side_effects);
        $crate::conformance_suite!(@case $make, stamps_round_trip);
        $crate::conformance_suite!(@case $make, junk_stamps_are_no_evidence);
        $crate::conformance_suite!(@case $make, operator_view_matches_the_engine);
        $crate::conformance_suite!(@case $make, rotation_history_is_recorded);
        $crate::conformance_suite!(@case $make, shared_rotations_make_one_key_every_server_serves);
        $crate::conformance_suite!(@case $make, a_crashed_shared_lock_holder_is_taken_over);
        $crate::conformance_suite!(@case $make, superseded_shared_keys_go_only_when_stale_and_unstamped);
    };
    (@case $make:expr, $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let harness = $crate::suite::Harness::new($make.await).await;
            $crate::suite::$case(&harness).await;
        }
    };
}
