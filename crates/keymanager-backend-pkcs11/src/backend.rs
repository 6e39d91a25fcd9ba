//! The `pkcs11` adapter: keys are key pairs generated on the token (private, sensitive,
//! never extractable), found by their `CKA_LABEL` (see `labels`), and every signature is a
//! `C_Sign` on the token over the digest.
//!
//! Two-phase creation: *prepare* generates the pair labelled `pending` (discovery skips
//! it); *publish* relabels the private key `live` (one `C_SetAttributeValue`: the switch),
//! then the public one; *retire* relabels the replaced key `retired` (the intent) and
//! destroys both objects; *abort* destroys them. Several live keys of one id (a crash
//! between publish and retire) resolve to the newest.
//!
//! Tokens have no tags and no shared clock, so there are no liveness stamps: keys are
//! per server, and the sweep removes only this server's own leftovers (pending keys of
//! an interrupted GenerateKey, retired keys whose destruction was interrupted, older live
//! duplicates). Other servers' objects on the same token are never touched.

use keymanager_engine::admin::KeyOperator;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::SystemTime;

use async_trait::async_trait;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{
    Attribute, AttributeType, KeyType as TokenKeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::Session;
use keymanager_engine::kit::swap::Swap;
use keymanager_engine::kit::{KmsAdapter, KmsConfig};
use keymanager_engine::lifecycle::{KeyLifecycle, KeyRecord, StoreKeyState, SweeperIdentity};
use keymanager_engine::{
    Backend, BackendError, BackendErrorKind, BackendSignature, Capabilities, Digest, HashAlgorithm,
    KeyHandle, KeyId, KeyType, PssSaltSupport, SchemeFamily, SignatureScheme, SigningSupport,
    StoredKey,
};

use crate::config::{DEFAULT_MAX_SESSIONS, Pkcs11Settings};
use crate::der;
use crate::labels::{Label, State};
use crate::module::{Mechanisms, Module};
use crate::pool::Pool;

/// One key pair on the token, by its `CKA_ID` (shared by both objects).
#[derive(Clone, Debug)]
pub struct Pkcs11Key {
    id: Arc<[u8]>,
    label: Arc<Label>,
    /// The private key's object handle when last seen (looked up again if stale).
    object: ObjectHandle,
    /// `pkcs11:token=…;id=%..;type=private` (RFC 7512).
    locator: Arc<str>,
}

impl KeyHandle for Pkcs11Key {
    fn locator(&self) -> &str {
        &self.locator
    }
}

/// The backend.
pub struct Pkcs11Backend {
    /// Replaced by a re-Configure with another PIN.
    pool: Swap<Arc<Pool>>,
    module: Arc<Module>,
    slot: cryptoki::slot::Slot,
    token_label: String,
    max_sessions: usize,
    prefix: String,
    trust_domain: String,
    server_id: String,
    mechanisms: Mechanisms,
    capabilities: &'static Capabilities,
}

const HASHES: [HashAlgorithm; 3] = [
    HashAlgorithm::Sha256,
    HashAlgorithm::Sha384,
    HashAlgorithm::Sha512,
];

/// The signing table for what the token offers, built once per distinct offer.
fn capabilities(mechanisms: Mechanisms) -> &'static Capabilities {
    static TABLES: OnceLock<Mutex<HashMap<Mechanisms, &'static Capabilities>>> = OnceLock::new();
    let mut tables = TABLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    tables.entry(mechanisms).or_insert_with(|| {
        let mut signing = Vec::new();
        if mechanisms.ecdsa {
            signing.push((KeyType::EcP256, SchemeFamily::Ecdsa, HashAlgorithm::Sha256));
            signing.push((KeyType::EcP384, SchemeFamily::Ecdsa, HashAlgorithm::Sha384));
        }
        for key_type in [KeyType::Rsa2048, KeyType::Rsa4096] {
            for hash in HASHES {
                if mechanisms.rsa_pkcs {
                    signing.push((key_type, SchemeFamily::RsaPkcs1v15, hash));
                }
                if mechanisms.rsa_pss {
                    signing.push((key_type, SchemeFamily::RsaPss, hash));
                }
            }
        }
        Box::leak(Box::new(Capabilities {
            // Every type is declared: a token that cannot make one says so at GenerateKey,
            // naming the mechanism it lacks.
            key_types: &KeyType::ALL,
            signing: SigningSupport::Only(Box::leak(signing.into_boxed_slice())),
            pss_salt: PssSaltSupport::Any,
            key_algorithm_name: None,
        }))
    })
}

fn percent_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02x}")).collect()
}

fn token_uri_part(label: &str) -> String {
    label
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A signing mechanism as plain data (a `Mechanism` holds raw pointers, so it is built on
/// the blocking thread that uses it).
#[derive(Clone, Copy, Debug)]
enum SignMechanism {
    /// `CKM_ECDSA` on the digest.
    Ecdsa,
    /// `CKM_RSA_PKCS` on the DigestInfo.
    RsaPkcs,
    /// `CKM_RSA_PKCS_PSS` on the digest.
    Pss {
        hash_alg: MechanismType,
        mgf: PkcsMgfType,
        salt_len: u64,
    },
}

impl SignMechanism {
    fn build(self) -> Mechanism<'static> {
        match self {
            Self::Ecdsa => Mechanism::Ecdsa,
            Self::RsaPkcs => Mechanism::RsaPkcs,
            Self::Pss {
                hash_alg,
                mgf,
                salt_len,
            } => Mechanism::RsaPkcsPss(PkcsPssParams {
                hash_alg,
                mgf,
                s_len: salt_len.into(),
            }),
        }
    }
}

/// A private key object this plugin labelled.
struct Found {
    object: ObjectHandle,
    id: Vec<u8>,
    label: Label,
}

/// Every private key object on the token whose label parses under `prefix`.
fn labelled_keys(session: &Session, prefix: &str) -> cryptoki::error::Result<Vec<Found>> {
    let objects = session.find_objects(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Token(true),
    ])?;
    let mut found = Vec::new();
    for object in objects {
        let attributes =
            session.get_attributes(object, &[AttributeType::Label, AttributeType::Id])?;
        let mut label = None;
        let mut id = None;
        for attribute in attributes {
            match attribute {
                Attribute::Label(bytes) => label = String::from_utf8(bytes).ok(),
                Attribute::Id(bytes) => id = Some(bytes),
                _ => {}
            }
        }
        if let (Some(label), Some(id)) = (label.and_then(|l| Label::parse(prefix, &l)), id) {
            found.push(Found { object, id, label });
        }
    }
    Ok(found)
}

/// Both objects of the pair `id`.
fn objects_of(session: &Session, id: &[u8]) -> cryptoki::error::Result<Vec<ObjectHandle>> {
    session.find_objects(&[Attribute::Id(id.to_vec()), Attribute::Token(true)])
}

/// The private key of the pair `id`, if it is still there.
fn private_key(session: &Session, id: &[u8]) -> cryptoki::error::Result<Option<ObjectHandle>> {
    Ok(session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(id.to_vec()),
        ])?
        .into_iter()
        .next())
}

/// The DER SubjectPublicKeyInfo of the pair `id`, from its public object.
fn public_key(session: &Session, id: &[u8]) -> Result<(KeyType, Vec<u8>), BackendError> {
    let public = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Id(id.to_vec()),
        ])
        .map_err(|e| crate::errors::pkcs11_error(e, "finding a public key"))?
        .into_iter()
        .next()
        .ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::NotFound,
                format!("no public key object with CKA_ID {}", percent_encode(id)),
            )
        })?;
    let attributes = session
        .get_attributes(
            public,
            &[
                AttributeType::KeyType,
                AttributeType::EcParams,
                AttributeType::EcPoint,
                AttributeType::Modulus,
                AttributeType::PublicExponent,
            ],
        )
        .map_err(|e| crate::errors::pkcs11_error(e, "reading a public key"))?;
    let mut token_type = None;
    let (mut params, mut point, mut modulus, mut exponent) = (None, None, None, None);
    for attribute in attributes {
        match attribute {
            Attribute::KeyType(t) => token_type = Some(t),
            Attribute::EcParams(v) => params = Some(v),
            Attribute::EcPoint(v) => point = Some(v),
            Attribute::Modulus(v) => modulus = Some(v),
            Attribute::PublicExponent(v) => exponent = Some(v),
            _ => {}
        }
    }
    let bad = |what: &str| {
        BackendError::new(
            BackendErrorKind::Internal,
            format!("public key {}: {what}", percent_encode(id)),
        )
    };
    match token_type {
        Some(t) if t == TokenKeyType::EC => {
            let params = params.ok_or_else(|| bad("no CKA_EC_PARAMS"))?;
            let key_type = der::curve_of(&params).ok_or_else(|| bad("a curve SPIRE cannot use"))?;
            let point = der::ec_point(key_type, &point.ok_or_else(|| bad("no CKA_EC_POINT"))?)
                .ok_or_else(|| bad("a malformed CKA_EC_POINT"))?;
            Ok((key_type, der::ec_spki(key_type, &point)))
        }
        Some(t) if t == TokenKeyType::RSA => {
            let modulus = modulus.ok_or_else(|| bad("no CKA_MODULUS"))?;
            let exponent = exponent.ok_or_else(|| bad("no CKA_PUBLIC_EXPONENT"))?;
            let bits = der::bit_length(&modulus);
            let key_type = match bits {
                2048 => KeyType::Rsa2048,
                4096 => KeyType::Rsa4096,
                other => return Err(bad(&format!("a {other}-bit modulus SPIRE cannot use"))),
            };
            Ok((key_type, der::rsa_spki(&modulus, &exponent)))
        }
        _ => Err(bad("a key type SPIRE cannot use")),
    }
}

#[async_trait]
impl KmsAdapter for Pkcs11Backend {
    const NAME: &'static str = "pkcs11";
    type Settings = Pkcs11Settings;

    async fn open(config: &KmsConfig<Self>, server_id: String) -> Result<Self, BackendError> {
        if let Some(endpoint) = &config.endpoint {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!(
                    "endpoint ({}) is not a pkcs11 setting; the token is chosen by module and token_label, token_serial or slot_id",
                    endpoint.as_str()
                ),
            ));
        }
        let settings = config.backend.clone();
        let (module, slot, token_label, module_limit, mechanisms) =
            tokio::task::spawn_blocking(move || -> Result<_, BackendError> {
                let module = Module::load(&settings.module)?;
                let slot = module.find_slot(&settings.token)?;
                let info = module.context.get_token_info(slot).map_err(|e| {
                    crate::errors::pkcs11_error(e, "reading the token's information")
                })?;
                let limit = match info.max_session_count() {
                    cryptoki::slot::Limit::Max(n) => Some(n as usize),
                    _ => None,
                };
                let mechanisms = module.mechanisms(slot)?;
                Ok((
                    module,
                    slot,
                    info.label().trim_end().to_string(),
                    limit,
                    mechanisms,
                ))
            })
            .await
            .map_err(|e| BackendError::new(BackendErrorKind::Internal, e.to_string()))??;
        let max_sessions = config
            .backend
            .max_sessions
            .unwrap_or(DEFAULT_MAX_SESSIONS)
            .min(module_limit.unwrap_or(usize::MAX))
            .max(1);
        let pool = Pool::open(
            module.clone(),
            slot,
            token_label.clone(),
            config.backend.pin.clone(),
            max_sessions,
        )
        .await?;
        tracing::info!(
            module = %config.backend.module.display(),
            token = %token_label,
            slot = slot.id(),
            max_sessions,
            ?mechanisms,
            server_id = %server_id,
            "pkcs11 backend ready"
        );
        Ok(Self {
            pool: Swap::new(pool),
            module,
            slot,
            token_label,
            max_sessions,
            prefix: config.backend.label_prefix.clone(),
            trust_domain: config.trust_domain.clone(),
            server_id,
            mechanisms,
            capabilities: capabilities(mechanisms),
        })
    }
}

impl Pkcs11Backend {
    fn pool(&self) -> Arc<Pool> {
        (*self.pool.get()).clone()
    }

    /// `C_Login` calls made by the current pool (tests check a wrong PIN is tried once).
    pub fn login_attempts(&self) -> u64 {
        self.pool().login_attempts()
    }

    fn locator(&self, id: &[u8]) -> String {
        format!(
            "pkcs11:token={};id={};type=private",
            token_uri_part(&self.token_label),
            percent_encode(id)
        )
    }

    fn handle(&self, found: Found) -> Pkcs11Key {
        Pkcs11Key {
            locator: Arc::from(self.locator(&found.id)),
            id: Arc::from(found.id),
            label: Arc::new(found.label),
            object: found.object,
        }
    }

    /// This server's key objects (optionally of one id), in any state.
    async fn own(&self, only: Option<&KeyId>) -> Result<Vec<Found>, BackendError> {
        let prefix = self.prefix.clone();
        let found = self
            .pool()
            .run("listing key objects".into(), move |session| {
                labelled_keys(session, &prefix)
            })
            .await?;
        Ok(found
            .into_iter()
            .filter(|f| {
                f.label.trust_domain == self.trust_domain
                    && f.label.server_id == self.server_id
                    && only.is_none_or(|id| id.as_str() == f.label.key_id)
            })
            .collect())
    }

    /// Relabels the private key (the switch), then the public key.
    async fn relabel(&self, key: &Pkcs11Key, state: State) -> Result<(), BackendError> {
        let id = key.id.clone();
        let label = key.label.with_state(state).render(&self.prefix);
        self.pool()
            .run(format!("relabelling {}", key.locator), move |session| {
                let mut objects = objects_of(session, &id)?;
                // The private key first: it is what discovery reads.
                let private = private_key(session, &id)?;
                objects.sort_by_key(|o| Some(*o) != private);
                for object in objects {
                    session.update_attributes(
                        object,
                        &[Attribute::Label(label.clone().into_bytes())],
                    )?;
                }
                Ok(())
            })
            .await
    }

    async fn destroy(&self, id: Arc<[u8]>, locator: &str) -> Result<(), BackendError> {
        self.pool()
            .run(format!("destroying {locator}"), move |session| {
                for object in objects_of(session, &id)? {
                    session.destroy_object(object)?;
                }
                Ok(())
            })
            .await
    }
}

/// How the token makes `key_type`: (RSA?, modulus bits), or an error naming the mechanism
/// it lacks.
fn generation(
    mechanisms: Mechanisms,
    key_type: KeyType,
    token: &str,
) -> Result<(bool, usize), BackendError> {
    let cannot = |why: String| {
        BackendError::new(
            BackendErrorKind::InvalidArgument,
            format!("token {token:?} cannot generate {key_type} keys: {why}"),
        )
    };
    match key_type.rsa_bits() {
        None if mechanisms.ec_generate => Ok((false, 0)),
        None => Err(cannot("it offers no CKM_EC_KEY_PAIR_GEN".into())),
        Some(bits) => match mechanisms.rsa_generate {
            Some((min, max)) if (min..=max).contains(&bits) => Ok((true, bits)),
            Some((min, max)) => Err(cannot(format!(
                "its CKM_RSA_PKCS_KEY_PAIR_GEN makes {min} to {max} bits"
            ))),
            None => Err(cannot("it offers no CKM_RSA_PKCS_KEY_PAIR_GEN".into())),
        },
    }
}

/// The live key of each id: the newest.
fn newest_live(found: &[Found]) -> HashMap<&str, &Found> {
    let mut best: HashMap<&str, &Found> = HashMap::new();
    for f in found.iter().filter(|f| f.label.state == State::Live) {
        let newer = best
            .get(f.label.key_id.as_str())
            .is_none_or(|b| (f.label.created, &f.id) > (b.label.created, &b.id));
        if newer {
            best.insert(&f.label.key_id, f);
        }
    }
    best
}

#[async_trait]
impl Backend for Pkcs11Backend {
    type Handle = Pkcs11Key;
    type Config = KmsConfig<Self>;

    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn capabilities(&self) -> &Capabilities {
        self.capabilities
    }

    async fn discover(&self) -> Result<Vec<StoredKey<Pkcs11Key>>, BackendError> {
        // Live keys of each id, newest first: a pair whose public object is missing (a
        // token killed mid-write can leave one) is skipped with a warning and the next live
        // key of the id is used, instead of failing Configure for every key.
        let mut live: Vec<Found> = self
            .own(None)
            .await?
            .into_iter()
            .filter(|f| f.label.state == State::Live)
            .collect();
        live.sort_by(|a, b| {
            (&b.label.key_id, b.label.created, &b.id).cmp(&(
                &a.label.key_id,
                a.label.created,
                &a.id,
            ))
        });
        let mut keys: Vec<StoredKey<Pkcs11Key>> = Vec::new();
        for f in live {
            let Ok(id) = KeyId::new(f.label.key_id.as_str()) else {
                continue;
            };
            if keys.iter().any(|k| k.id == id) {
                continue;
            }
            let handle = self.handle(f);
            match self.public_key(&handle).await {
                Ok((key_type, spki)) => keys.push(StoredKey {
                    id,
                    key_type,
                    spki_der: spki,
                    handle,
                }),
                Err(error) if error.kind == BackendErrorKind::NotFound => {
                    tracing::warn!(key_id = %id, key = %handle.locator, error = %error.message, "skipping a key pair without its public object (a token interrupted mid-write); destroy it with the token's tools");
                }
                Err(error) => return Err(error),
            }
        }
        Ok(keys)
    }

    async fn prepare(
        &self,
        id: &KeyId,
        key_type: KeyType,
        _replaces: Option<&StoredKey<Pkcs11Key>>,
    ) -> Result<Pkcs11Key, BackendError> {
        if id.as_str().contains(':') {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!(
                    "key id {id:?} contains ':', which the pkcs11 backend's labels use as a separator"
                ),
            ));
        }
        // (RSA?, bits): a `Mechanism` holds raw pointers and is built on the blocking thread.
        let (rsa, bits) = generation(self.mechanisms, key_type, &self.token_label)?;
        let mut object_id = vec![0u8; 16];
        getrandom::fill(&mut object_id).map_err(|e| {
            BackendError::new(
                BackendErrorKind::Internal,
                format!("no randomness for CKA_ID: {e}"),
            )
        })?;
        let label = Label {
            state: State::Pending,
            trust_domain: self.trust_domain.clone(),
            server_id: self.server_id.clone(),
            key_id: id.as_str().to_string(),
            created: SystemTime::now(),
        };
        let text = label.render(&self.prefix).into_bytes();
        let mut public = vec![
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Label(text.clone()),
            Attribute::Id(object_id.clone()),
        ];
        match key_type {
            KeyType::EcP256 | KeyType::EcP384 => {
                public.push(Attribute::EcParams(der::curve_oid(key_type).to_vec()));
            }
            _ => {
                public.push(Attribute::ModulusBits((bits as u64).into()));
                public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
            }
        }
        let private = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(text),
            Attribute::Id(object_id.clone()),
        ];
        let object = self
            .pool()
            .run(
                format!("generating a {key_type} key for {id}"),
                move |session| {
                    let mechanism = if rsa {
                        Mechanism::RsaPkcsKeyPairGen
                    } else {
                        Mechanism::EccKeyPairGen
                    };
                    session
                        .generate_key_pair(&mechanism, &public, &private)
                        .map(|(_, private)| private)
                },
            )
            .await?;
        Ok(self.handle(Found {
            object,
            id: object_id,
            label,
        }))
    }

    async fn public_key(&self, prepared: &Pkcs11Key) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        let id = prepared.id.clone();
        let (key_type, spki) = self
            .pool()
            .run(format!("reading {}", prepared.locator), move |session| {
                Ok(public_key(session, &id))
            })
            .await??;
        Ok((key_type, Arc::from(spki)))
    }

    async fn publish(
        &self,
        new: &StoredKey<Pkcs11Key>,
        _replaces: Option<&StoredKey<Pkcs11Key>>,
    ) -> Result<(), BackendError> {
        self.relabel(&new.handle, State::Live).await
    }

    async fn find(&self, id: &KeyId) -> Result<Option<String>, BackendError> {
        let found = self.own(Some(id)).await?;
        Ok(newest_live(&found)
            .get(id.as_str())
            .map(|f| self.locator(&f.id)))
    }

    async fn abort(&self, prepared: &Pkcs11Key) -> Result<(), BackendError> {
        self.destroy(prepared.id.clone(), &prepared.locator).await
    }

    async fn retire(
        &self,
        replaced: &StoredKey<Pkcs11Key>,
        _replaced_by: &StoredKey<Pkcs11Key>,
    ) -> Result<(), BackendError> {
        self.relabel(&replaced.handle, State::Retired).await?;
        keymanager_engine::failpoint!("delete.after_intent");
        self.destroy(replaced.handle.id.clone(), replaced.locator())
            .await
    }

    async fn sign(
        &self,
        key: &StoredKey<Pkcs11Key>,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<BackendSignature, BackendError> {
        let (mechanism, data) = match scheme {
            SignatureScheme::Ecdsa(_) => (SignMechanism::Ecdsa, digest.as_bytes().to_vec()),
            SignatureScheme::RsaPkcs1v15(_) => (SignMechanism::RsaPkcs, digest.pkcs1_digest_info()),
            SignatureScheme::RsaPss { hash, salt_len, .. } => {
                let (hash_alg, mgf) = match hash {
                    HashAlgorithm::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
                    HashAlgorithm::Sha384 => (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384),
                    HashAlgorithm::Sha512 => (MechanismType::SHA512, PkcsMgfType::MGF1_SHA512),
                    other => {
                        return Err(BackendError::new(
                            BackendErrorKind::InvalidArgument,
                            format!(
                                "the pkcs11 backend signs PSS with SHA-256/384/512, not {other}"
                            ),
                        ));
                    }
                };
                (
                    SignMechanism::Pss {
                        hash_alg,
                        mgf,
                        salt_len: salt_len as u64,
                    },
                    digest.as_bytes().to_vec(),
                )
            }
        };
        let id = key.handle.id.clone();
        let cached = key.handle.object;
        let signature = self
            .pool()
            .run(format!("signing with {}", key.locator()), move |session| {
                let mechanism = mechanism.build();
                match session.sign(&mechanism, cached, &data) {
                    Ok(signature) => Ok(signature),
                    Err(e) if crate::errors::is_session_lost(&e) => Err(e),
                    // The cached handle may be stale (the token reloaded its objects), or the
                    // key gone (the token was re-initialised: some tokens then answer
                    // CKR_GENERAL_ERROR): ask the token for the key by its CKA_ID.
                    Err(e) => match private_key(session, &id)? {
                        Some(object) if object != cached => session.sign(&mechanism, object, &data),
                        Some(_) => Err(e),
                        None => Err(cryptoki::error::Error::Pkcs11(
                            cryptoki::error::RvError::KeyHandleInvalid,
                            cryptoki::context::Function::Sign,
                        )),
                    },
                }
            })
            .await?;
        Ok(if key.key_type.is_rsa() {
            BackendSignature::Rsa(signature)
        } else {
            BackendSignature::EcdsaFixed(signature)
        })
    }

    async fn reconfigure(&self, config: &KmsConfig<Self>) -> Result<(), BackendError> {
        // A new PIN: a new pool, logged in before it replaces the old one.
        let pool = Pool::open(
            self.module.clone(),
            self.slot,
            self.token_label.clone(),
            config.backend.pin.clone(),
            self.max_sessions,
        )
        .await?;
        self.pool.set(pool);
        Ok(())
    }
}

#[async_trait]
impl KeyLifecycle for Pkcs11Backend {
    type Handle = Pkcs11Key;

    fn identity(&self) -> SweeperIdentity {
        SweeperIdentity {
            trust_domain: self.trust_domain.clone(),
            server_id: self.server_id.clone(),
        }
    }

    /// Keys on a token are per server: nothing to stamp.
    async fn stamp(
        &self,
        _keys: &[StoredKey<Pkcs11Key>],
        _now: SystemTime,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    /// This server's key objects only (reads only).
    async fn list(&self) -> Result<Vec<KeyRecord>, BackendError> {
        let found = self.own(None).await?;
        let winners = newest_live(&found);
        let mut records: Vec<KeyRecord> = found
            .iter()
            .map(|f| KeyRecord {
                locator: self.locator(&f.id),
                trust_domain: Some(f.label.trust_domain.clone()),
                server_id: Some(f.label.server_id.clone()),
                state: StoreKeyState::Enabled,
                key_id: Some(f.label.key_id.clone()),
                published: winners
                    .get(f.label.key_id.as_str())
                    .is_some_and(|w| w.id == f.id),
                last_stamp: None,
                created: Some(f.label.created),
                deletion_intent: f.label.state == State::Retired,
                replaced: None,
                replaced_by: None,
            })
            .collect();
        records.sort_by(|a, b| a.locator.cmp(&b.locator));
        Ok(records)
    }

    async fn delete(&self, record: &KeyRecord) -> Result<(), BackendError> {
        let id = object_id_of(&record.locator)?;
        self.destroy(Arc::from(id), &record.locator).await
    }
}

/// The CKA_ID in one of this backend's locators.
fn object_id_of(locator: &str) -> Result<Vec<u8>, BackendError> {
    locator
        .split(";id=")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(der::percent_decode_hex)
        .ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::NotFound,
                format!("{locator} is not a locator of this backend"),
            )
        })
}

/// Operators: a token has no disabled state here and destroys at once (the defaults).
#[async_trait]
impl KeyOperator for Pkcs11Backend {
    async fn public_key_at(&self, locator: &str) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        let id: Arc<[u8]> = Arc::from(object_id_of(locator)?);
        let (key_type, spki) = self
            .pool()
            .run(format!("reading {locator}"), move |session| {
                Ok(public_key(session, &id))
            })
            .await??;
        Ok((key_type, Arc::from(spki)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_type_the_token_cannot_make_names_the_mechanism() {
        let none = Mechanisms {
            ec_generate: false,
            rsa_generate: None,
            ecdsa: false,
            rsa_pkcs: false,
            rsa_pss: false,
        };
        let error = generation(none, KeyType::EcP384, "hsm").expect_err("no EC");
        assert_eq!(error.kind, BackendErrorKind::InvalidArgument);
        assert!(
            error.message.contains("CKM_EC_KEY_PAIR_GEN"),
            "{}",
            error.message
        );
        let error = generation(none, KeyType::Rsa2048, "hsm").expect_err("no RSA");
        assert!(
            error.message.contains("CKM_RSA_PKCS_KEY_PAIR_GEN"),
            "{}",
            error.message
        );
        let small = Mechanisms {
            rsa_generate: Some((1024, 2048)),
            ..none
        };
        assert_eq!(
            generation(small, KeyType::Rsa2048, "hsm").ok(),
            Some((true, 2048))
        );
        let error = generation(small, KeyType::Rsa4096, "hsm").expect_err("too big");
        assert!(
            error.message.contains("1024 to 2048 bits"),
            "{}",
            error.message
        );
    }

    #[test]
    fn signing_capabilities_follow_the_mechanisms() {
        let ec_only = Mechanisms {
            ec_generate: true,
            rsa_generate: None,
            ecdsa: true,
            rsa_pkcs: false,
            rsa_pss: false,
        };
        let caps = capabilities(ec_only);
        let sha256 = HashAlgorithm::Sha256;
        assert!(caps.supports(KeyType::EcP256, SignatureScheme::Ecdsa(sha256)));
        assert!(!caps.supports(KeyType::Rsa2048, SignatureScheme::RsaPkcs1v15(sha256)));
        let rsa = Mechanisms {
            rsa_generate: Some((1024, 4096)),
            rsa_pkcs: true,
            ..ec_only
        };
        let caps = capabilities(rsa);
        assert!(caps.supports(KeyType::Rsa4096, SignatureScheme::RsaPkcs1v15(sha256)));
        assert!(!caps.supports(
            KeyType::Rsa4096,
            SignatureScheme::RsaPss {
                hash: sha256,
                salt: keymanager_engine::PssSaltLength::EqualsHash,
                salt_len: 32
            }
        ));
    }
}
