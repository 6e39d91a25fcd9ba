//! A PKCS#11 module, loaded and initialised once per process (a module may be initialised
//! only once per process: a second Configure, a Validate, or another plugin instance reuses
//! it). `C_Finalize` runs when the last user drops it, and only if this process initialised
//! it (`CKR_CRYPTOKI_ALREADY_INITIALIZED` means someone else did).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::slot::Slot;
use keymanager_engine::{BackendError, BackendErrorKind};

use crate::config::TokenSelector;
use crate::errors::pkcs11_error;

/// A loaded module.
#[derive(Debug)]
pub struct Module {
    pub(crate) context: Pkcs11,
    path: PathBuf,
    finalize_on_drop: bool,
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<Module>>> {
    static REGISTRY: std::sync::OnceLock<Mutex<HashMap<PathBuf, Weak<Module>>>> =
        std::sync::OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

impl Module {
    /// The module at `path`, loading and initialising it if this process has not yet.
    pub fn load(path: &Path) -> Result<Arc<Self>, BackendError> {
        let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let mut modules = registry().lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(module) = modules.get(&key).and_then(Weak::upgrade) {
            return Ok(module);
        }
        let context = Pkcs11::new(&key).map_err(|e| {
            BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!(
                    "module {} cannot be loaded as a PKCS#11 library: {e}",
                    path.display()
                ),
            )
        })?;
        let finalize_on_drop =
            match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                Ok(()) => true,
                Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => false,
                Err(e) => {
                    return Err(pkcs11_error(
                        e,
                        &format!("initialising module {}", path.display()),
                    ));
                }
            };
        let module = Arc::new(Self {
            context,
            path: key.clone(),
            finalize_on_drop,
        });
        modules.insert(key, Arc::downgrade(&module));
        Ok(module)
    }

    /// The slot of the selected token; an error lists the tokens that are there.
    pub fn find_slot(&self, selector: &TokenSelector) -> Result<Slot, BackendError> {
        let slots = self
            .context
            .get_slots_with_token()
            .map_err(|e| pkcs11_error(e, "listing the module's slots"))?;
        let mut seen = Vec::new();
        for slot in slots {
            if let TokenSelector::Slot(id) = selector
                && slot.id() == *id
            {
                return Ok(slot);
            }
            let Ok(info) = self.context.get_token_info(slot) else {
                continue;
            };
            let matches = match selector {
                TokenSelector::Label(label) => info.label().trim_end() == label,
                TokenSelector::Serial(serial) => info.serial_number().trim_end() == serial,
                TokenSelector::Slot(_) => false,
            };
            if matches {
                return Ok(slot);
            }
            seen.push(format!(
                "slot {} label {:?} serial {:?}",
                slot.id(),
                info.label().trim_end(),
                info.serial_number().trim_end()
            ));
        }
        Err(BackendError::new(
            BackendErrorKind::FailedPrecondition,
            format!(
                "no {selector} in module {}; tokens present: {}",
                self.path.display(),
                if seen.is_empty() {
                    "none".to_string()
                } else {
                    seen.join("; ")
                }
            ),
        ))
    }

    /// The mechanisms the token in `slot` offers.
    pub fn mechanisms(&self, slot: Slot) -> Result<Mechanisms, BackendError> {
        let list = self
            .context
            .get_mechanism_list(slot)
            .map_err(|e| pkcs11_error(e, "listing the token's mechanisms"))?;
        let has = |m: MechanismType| list.contains(&m);
        let rsa_bits = if has(MechanismType::RSA_PKCS_KEY_PAIR_GEN) {
            self.context
                .get_mechanism_info(slot, MechanismType::RSA_PKCS_KEY_PAIR_GEN)
                .map(|i| (i.min_key_size(), i.max_key_size()))
                .ok()
        } else {
            None
        };
        Ok(Mechanisms {
            ec_generate: has(MechanismType::ECC_KEY_PAIR_GEN),
            rsa_generate: rsa_bits,
            ecdsa: has(MechanismType::ECDSA),
            rsa_pkcs: has(MechanismType::RSA_PKCS),
            rsa_pss: has(MechanismType::RSA_PKCS_PSS),
        })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if !self.finalize_on_drop {
            return;
        }
        match self.context.clone().finalize() {
            Ok(()) => {
                tracing::info!(module = %self.path.display(), "PKCS#11 module finalised (C_Finalize)")
            }
            Err(e) => {
                tracing::warn!(module = %self.path.display(), error = %e, "C_Finalize failed")
            }
        }
    }
}

/// What the token can do, as `C_GetMechanismList` / `C_GetMechanismInfo` report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mechanisms {
    /// `CKM_EC_KEY_PAIR_GEN`.
    pub ec_generate: bool,
    /// `CKM_RSA_PKCS_KEY_PAIR_GEN` and its key size range in bits.
    pub rsa_generate: Option<(usize, usize)>,
    /// `CKM_ECDSA` (on a digest).
    pub ecdsa: bool,
    /// `CKM_RSA_PKCS` (on a DigestInfo).
    pub rsa_pkcs: bool,
    /// `CKM_RSA_PKCS_PSS` (on a digest).
    pub rsa_pss: bool,
}
