//! The backend conformance suite on `pkcs11`, against two independent software tokens
//! initialised here: SoftHSM2 (C++, Debian's package) and kryoptic (Rust, on OpenSSL; built
//! by scripts/test-all.sh). Both modules are loaded in this one process. The store is read
//! back with cryptoki directly, not through the backend.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use keymanager_backend_pkcs11::Pkcs11Factory;
use keymanager_conformance::peers::{self, SoftToken};
use keymanager_conformance::suite::Subject;
use keymanager_engine::BackendFactory;

static FACTORY: Pkcs11Factory = Pkcs11Factory::new();

struct TokenSubject {
    token: &'static SoftToken,
}

impl TokenSubject {
    /// The label and RFC 7512 locator of every private key object on the token, read with
    /// cryptoki.
    fn private_keys(&self) -> Vec<(String, String)> {
        let token = self.token.clone();
        std::thread::spawn(move || {
            let context = Pkcs11::new(&token.module).expect("load the module");
            // The backend may have initialised it already in this process.
            let _ = context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
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
            let session = context.open_ro_session(slot).expect("session");
            let _ = session.login(UserType::User, Some(&AuthPin::from(token.pin.as_str())));
            session
                .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                .expect("find")
                .into_iter()
                .filter_map(|o| {
                    let (mut label, mut id) = (None, None);
                    for attribute in session
                        .get_attributes(o, &[AttributeType::Label, AttributeType::Id])
                        .ok()?
                    {
                        match attribute {
                            Attribute::Label(l) => label = String::from_utf8(l).ok(),
                            Attribute::Id(i) => id = Some(i),
                            _ => {}
                        }
                    }
                    let id: String = id?.iter().map(|b| format!("%{b:02x}")).collect();
                    Some((
                        label?,
                        format!("pkcs11:token={};id={id};type=private", token.label),
                    ))
                })
                .collect()
        })
        .join()
        .expect("reader thread")
    }
}

#[async_trait]
impl Subject for TokenSubject {
    fn factory(&self) -> &'static dyn BackendFactory {
        &FACTORY
    }

    fn peer_url(&self) -> Option<String> {
        None
    }

    fn plugin_data(&self, server_id: &str, _endpoint: Option<&str>) -> String {
        format!(
            "backend = \"pkcs11\"\nmodule = {:?}\ntoken_label = {:?}\npin = {:?}\nkey_identifier_value = {server_id:?}\n",
            self.token.module.display().to_string(),
            self.token.label,
            self.token.pin
        )
    }

    fn keeps_stamps(&self) -> bool {
        false
    }

    /// Every key object of the id, whatever its state: a pending or retired object that
    /// is still there counts (the sweep must finish it).
    async fn live_keys(&self, trust_domain: &str, server_id: &str, key_id: &str) -> Vec<String> {
        self.private_keys()
            .into_iter()
            .filter(|(label, _)| {
                let parts: Vec<&str> = label.split(':').collect();
                parts.len() == 6
                    && parts[0] == "spire"
                    && parts[2] == trust_domain
                    && parts[3] == server_id
                    && parts[4] == key_id
            })
            .map(|(_, locator)| locator)
            .collect()
    }
}

/// A token of `make`, made once per test binary (before its module is loaded here).
fn subject(token: &'static OnceLock<SoftToken>, make: fn(&str) -> SoftToken) -> Arc<dyn Subject> {
    let token = token.get_or_init(|| make(&format!("conformance-{}", std::process::id())));
    Arc::new(TokenSubject { token })
}

mod softhsm {
    use super::*;

    static TOKEN: OnceLock<SoftToken> = OnceLock::new();

    keymanager_conformance::conformance_suite!(async { subject(&TOKEN, peers::softhsm_token) });
}

mod kryoptic {
    use super::*;

    static TOKEN: OnceLock<SoftToken> = OnceLock::new();

    keymanager_conformance::conformance_suite!(async { subject(&TOKEN, peers::kryoptic_token) });
}
