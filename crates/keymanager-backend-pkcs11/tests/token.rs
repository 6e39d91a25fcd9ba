//! The `pkcs11` backend against two independent software tokens (SoftHSM2 and kryoptic),
//! as an operator would check it: keys are
//! sensitive and never extractable (asked of the token itself), concurrent signers all
//! succeed, a session lost behind the plugin's back costs no failed signature, and bad
//! configuration (wrong PIN, missing token, wrong module) fails Configure clearly — a
//! wrong PIN after exactly one login attempt.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use keymanager_backend_pkcs11::{Pkcs11Backend, Pkcs11Factory};
use keymanager_conformance::peers::{self, SoftToken};
use keymanager_conformance::verify;
use keymanager_engine::KeyHandle as _;
use keymanager_engine::kit::{KmsAdapter, KmsConfig};
use keymanager_engine::settings::{SettingValue, Settings};
use keymanager_engine::{
    BackendConfig, BackendErrorKind, CoreConfig, EngineOptions, HashAlgorithm, KeyId, KeyService,
    KeyType, SignerOpts,
};

/// Which token a case runs on.
#[derive(Clone, Copy)]
enum Peer {
    SoftHsm,
    Kryoptic,
}

impl Peer {
    /// A fresh token named `name` on this peer.
    fn token(self, name: &str) -> SoftToken {
        let label = format!("{name}-{}", std::process::id());
        match self {
            Self::SoftHsm => peers::softhsm_token(&label),
            Self::Kryoptic => peers::kryoptic_token(&label),
        }
    }

    /// The token the cases share on this peer.
    fn shared(self) -> &'static SoftToken {
        static SOFTHSM: OnceLock<SoftToken> = OnceLock::new();
        static KRYOPTIC: OnceLock<SoftToken> = OnceLock::new();
        match self {
            Self::SoftHsm => SOFTHSM.get_or_init(|| self.token("token-tests")),
            Self::Kryoptic => KRYOPTIC.get_or_init(|| self.token("token-tests")),
        }
    }
}

/// Tests that log in, log out or count logins run one at a time: login state is per
/// process and token.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(token: &SoftToken, pairs: &[(&str, &str)]) -> Result<KmsConfig<Pkcs11Backend>, String> {
    let mut values: BTreeMap<String, SettingValue> = [
        ("module", token.module.display().to_string()),
        ("token_label", token.label.clone()),
        ("pin", token.pin.clone()),
        ("key_identifier_value", "token-tests".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), SettingValue::String(v)))
    .collect();
    for (k, v) in pairs {
        values.insert(k.to_string(), SettingValue::String(v.to_string()));
    }
    let core = CoreConfig {
        trust_domain: "example.org".into(),
    };
    Pkcs11Factory::new()
        .parse_all(Settings::new(values), &core)
        .map_err(|e| e.to_string())
}

async fn start(token: &SoftToken, pairs: &[(&str, &str)]) -> Arc<dyn KeyService> {
    config(token, pairs)
        .expect("valid")
        .open()
        .await
        .expect("open")
        .start(EngineOptions::default())
        .await
        .expect("start")
}

fn id(s: &str) -> KeyId {
    KeyId::new(s).expect("id")
}

async fn sign_and_verify(service: &dyn KeyService, key: &str, key_type: KeyType, opts: SignerOpts) {
    verify::sign_and_verify(service, key, key_type, opts)
        .await
        .expect("the signature verifies against the served public key");
}

/// A session of the test's own on the token, logged in.
fn own_session(token: &SoftToken) -> (Pkcs11, Session) {
    let context = Pkcs11::new(&token.module).expect("module");
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("initialise: {e}"),
    }
    let slot = context
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            context
                .get_token_info(*s)
                .map(|i| i.label().trim_end() == token.label)
                .unwrap_or(false)
        })
        .expect("the token");
    let session = context.open_rw_session(slot).expect("session");
    match session.login(UserType::User, Some(&AuthPin::from(token.pin.as_str()))) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    (context, session)
}

async fn private_keys_are_sensitive_and_never_extractable(peer: Peer) {
    let _one = SERIAL.lock().await;
    let service = start(peer.shared(), &[("key_identifier_value", "attributes")]).await;
    for (key, key_type) in [("ec", KeyType::EcP256), ("rsa", KeyType::Rsa2048)] {
        service
            .generate_key(id(key), key_type)
            .await
            .expect("generate");
    }
    let (_context, session) = own_session(peer.shared());
    let private: Vec<_> = session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("find")
        .into_iter()
        .filter(|o| {
            session
                .get_attributes(*o, &[AttributeType::Label])
                .map(|a| matches!(&a[..], [Attribute::Label(l)] if String::from_utf8_lossy(l).contains(":attributes:")))
                .unwrap_or(false)
        })
        .collect();
    assert_eq!(private.len(), 2);
    for object in private {
        let attributes = session
            .get_attributes(
                object,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sign,
                    AttributeType::NeverExtractable,
                    AttributeType::AlwaysSensitive,
                ],
            )
            .expect("attributes");
        for attribute in &attributes {
            let ok = match attribute {
                Attribute::Sensitive(v)
                | Attribute::Token(v)
                | Attribute::Private(v)
                | Attribute::Sign(v)
                | Attribute::NeverExtractable(v)
                | Attribute::AlwaysSensitive(v) => *v,
                Attribute::Extractable(v) => !*v,
                _ => true,
            };
            assert!(ok, "{attribute:?} on a private key");
        }
        // The token refuses to hand out the private value.
        let value = session.get_attributes(
            object,
            &[AttributeType::Value, AttributeType::PrivateExponent],
        );
        assert!(
            value.map(|a| a.is_empty()).unwrap_or(true),
            "the private key's value must not be readable"
        );
    }
}

async fn sixteen_concurrent_signers_all_succeed(peer: Peer) {
    let service = start(peer.shared(), &[("key_identifier_value", "concurrent")]).await;
    service
        .generate_key(id("k"), KeyType::EcP256)
        .await
        .expect("generate");
    let mut tasks = Vec::new();
    for n in 0..16 {
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..20 {
                let digest =
                    verify::digest(HashAlgorithm::Sha256, format!("{n}/{round}").as_bytes());
                service
                    .sign(
                        &id("k"),
                        digest,
                        SignerOpts::Hash(HashAlgorithm::Sha256),
                        None,
                    )
                    .await
                    .expect("every concurrent signature succeeds");
            }
        }));
    }
    for task in tasks {
        task.await.expect("signer");
    }
    sign_and_verify(
        &*service,
        "k",
        KeyType::EcP256,
        SignerOpts::Hash(HashAlgorithm::Sha256),
    )
    .await;
}

async fn a_logout_behind_the_plugins_back_costs_no_failed_signature(peer: Peer) {
    let _one = SERIAL.lock().await;
    let service = start(peer.shared(), &[("key_identifier_value", "logged-out")]).await;
    service
        .generate_key(id("k"), KeyType::Rsa2048)
        .await
        .expect("generate");
    let opts = SignerOpts::Hash(HashAlgorithm::Sha256);
    sign_and_verify(&*service, "k", KeyType::Rsa2048, opts).await;
    // Login state is the application's: logging out one session logs out every session
    // of this process, the plugin's included (CKR_USER_NOT_LOGGED_IN on its next C_Sign).
    let (_context, session) = own_session(peer.shared());
    session.logout().expect("logout");
    sign_and_verify(&*service, "k", KeyType::Rsa2048, opts).await;
}

async fn a_wrong_pin_fails_configure_after_one_login_attempt(peer: Peer) {
    let _one = SERIAL.lock().await;
    // Log every session out first, so the plugin must log in.
    let (_context, session) = own_session(peer.shared());
    let _ = session.logout();
    drop(session);
    let wrong = config(
        peer.shared(),
        &[("pin", "00000000"), ("key_identifier_value", "wrong-pin")],
    )
    .expect("valid");
    let error = match Pkcs11Backend::open(&wrong, "wrong-pin".into()).await {
        Ok(_) => panic!("a wrong PIN must fail"),
        Err(e) => e,
    };
    assert_eq!(
        error.kind,
        BackendErrorKind::Unauthenticated,
        "{}",
        error.message
    );
    assert!(
        error.message.contains("CKR_PIN_INCORRECT"),
        "{}",
        error.message
    );
    assert!(!error.message.contains("00000000"), "{}", error.message);
    // One attempt: the token is not locked; the right PIN still works.
    let backend = Pkcs11Backend::open(
        &config(peer.shared(), &[]).expect("valid"),
        "right-pin".into(),
    )
    .await
    .expect("the right PIN works after one wrong attempt");
    assert!(backend.login_attempts() <= 1);
}

async fn a_missing_token_or_a_wrong_module_fails_configure_naming_it(peer: Peer) {
    let missing = config(peer.shared(), &[("token_label", "no-such-token")]).expect("valid");
    let error = match Pkcs11Backend::open(&missing, "x".into()).await {
        Ok(_) => panic!("no such token"),
        Err(e) => e,
    };
    assert_eq!(error.kind, BackendErrorKind::FailedPrecondition);
    assert!(error.message.contains("no-such-token"), "{}", error.message);
    assert!(
        error.message.contains(&peer.shared().label),
        "lists the tokens present: {}",
        error.message
    );

    let no_module =
        config(peer.shared(), &[("module", "/nonexistent/libpkcs11.so")]).expect("valid");
    let error = match Pkcs11Backend::open(&no_module, "x".into()).await {
        Ok(_) => panic!("no such module"),
        Err(e) => e,
    };
    assert_eq!(error.kind, BackendErrorKind::InvalidArgument);
    assert!(
        error.message.contains("/nonexistent/libpkcs11.so"),
        "{}",
        error.message
    );
    assert_eq!(
        no_module.problems(),
        vec!["module /nonexistent/libpkcs11.so does not exist or is not a file".to_string()]
    );
}

async fn keys_gone_with_a_reinitialised_token_are_not_found_clearly(peer: Peer) {
    let _one = SERIAL.lock().await;
    let token = peer.token("reinit");
    let service = start(&token, &[("key_identifier_value", "reinit")]).await;
    service
        .generate_key(id("k"), KeyType::EcP256)
        .await
        .expect("generate");
    // The security officer re-initialises the token: every object on it is gone.
    token.reinitialise();
    let error = service
        .sign(
            &id("k"),
            vec![1; 32],
            SignerOpts::Hash(HashAlgorithm::Sha256),
            None,
        )
        .await
        .expect_err("the key is gone");
    let text = error.to_string();
    assert!(text.contains("gone from the token"), "{text}");
}

async fn the_sweep_destroys_this_servers_unpublished_leftovers_only(peer: Peer) {
    use keymanager_engine::Backend as _;
    use keymanager_engine::lifecycle::SweepPolicy;
    let token = peer.shared();
    // A GenerateKey that died after its prepare step: a pending pair on the token.
    let leftover_config = config(token, &[("key_identifier_value", "leftovers")]).expect("valid");
    let backend = Pkcs11Backend::open(&leftover_config, "leftovers".into())
        .await
        .expect("open");
    let leftover = backend
        .prepare(&id("k"), KeyType::EcP256, None)
        .await
        .expect("prepare");
    // Another server's pending pair on the same token.
    let other_config = config(token, &[("key_identifier_value", "someone-else")]).expect("valid");
    let other = Pkcs11Backend::open(&other_config, "someone-else".into())
        .await
        .expect("open");
    other
        .prepare(&id("k"), KeyType::EcP256, None)
        .await
        .expect("prepare");
    let count = |server: &'static str| {
        let (_context, session) = own_session(token);
        session
            .find_objects(&[])
            .expect("find")
            .into_iter()
            .filter(|o| {
                session
                    .get_attributes(*o, &[AttributeType::Label])
                    .map(|a| matches!(&a[..], [Attribute::Label(l)] if String::from_utf8_lossy(l).contains(&format!(":{server}:"))))
                    .unwrap_or(false)
            })
            .count()
    };
    assert_eq!(count("leftovers"), 2, "a private and a public object");
    let service = start(token, &[("key_identifier_value", "leftovers")]).await;
    assert!(
        service.public_key(&id("k")).is_err(),
        "discovery skips a pending key"
    );
    let report = service
        .sweep(SweepPolicy {
            half_created_grace: Duration::ZERO,
            max_clock_skew: Duration::ZERO,
            ..SweepPolicy::default()
        })
        .await
        .expect("sweep")
        .expect("a report");
    assert_eq!(report.deleted(), 1, "{report:?}");
    assert!(
        report
            .decisions
            .iter()
            .any(|d| d.locator() == leftover.locator())
    );
    assert_eq!(
        count("leftovers"),
        0,
        "both objects of the leftover are destroyed"
    );
    assert_eq!(
        count("someone-else"),
        2,
        "another server's objects are never touched"
    );
}

async fn a_key_pair_missing_its_public_object_does_not_fail_configure(peer: Peer) {
    let _one = SERIAL.lock().await;
    let token = peer.shared();
    let server = [("key_identifier_value", "half-written")];
    let service = start(token, &server).await;
    service
        .generate_key(id("a"), KeyType::EcP256)
        .await
        .expect("generate");
    service
        .generate_key(id("b"), KeyType::EcP256)
        .await
        .expect("generate");
    drop(service);
    // A token killed mid-write: key "a"'s public object is gone.
    let (_context, session) = own_session(token);
    let public: Vec<_> = session
        .find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY)])
        .expect("find")
        .into_iter()
        .filter(|o| {
            session
                .get_attributes(*o, &[AttributeType::Label])
                .map(|a| matches!(&a[..], [Attribute::Label(l)] if String::from_utf8_lossy(l).contains(":half-written:a:")))
                .unwrap_or(false)
        })
        .collect();
    assert_eq!(public.len(), 1);
    session.destroy_object(public[0]).expect("destroy");
    let restarted = start(token, &server).await;
    assert!(
        restarted.public_key(&id("a")).is_err(),
        "the broken pair is skipped"
    );
    sign_and_verify(
        &*restarted,
        "b",
        KeyType::EcP256,
        SignerOpts::Hash(HashAlgorithm::Sha256),
    )
    .await;
}

macro_rules! on_both_tokens {
    ($($case:ident),* $(,)?) => {
        mod softhsm {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::Peer::SoftHsm).await
                }
            )*
        }
        mod kryoptic {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::Peer::Kryoptic).await
                }
            )*
        }
    };
}

on_both_tokens!(
    private_keys_are_sensitive_and_never_extractable,
    sixteen_concurrent_signers_all_succeed,
    a_logout_behind_the_plugins_back_costs_no_failed_signature,
    a_wrong_pin_fails_configure_after_one_login_attempt,
    a_missing_token_or_a_wrong_module_fails_configure_naming_it,
    keys_gone_with_a_reinitialised_token_are_not_found_clearly,
    the_sweep_destroys_this_servers_unpublished_leftovers_only,
    a_key_pair_missing_its_public_object_does_not_fail_configure,
);
