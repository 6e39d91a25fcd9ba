//! The `shared_keys` block, one parser for every backend: the name template, the
//! extraction regex, which key ids are shared, the reuse window and the lock lease.

use std::time::Duration;

use super::template::NameTemplate;
use crate::settings::{Settings, SettingsError};

/// SPIRE's JWT signing keys (`JWT-Signer-A`, `JWT-Signer-B`): the keys shared by default.
pub const DEFAULT_SHARED_KEY_IDS: &str = "^JWT-Signer-";
/// A generation another server created less than this long ago is reused, not duplicated.
pub const DEFAULT_REUSE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// How long a rotation lock protects its holder before others may take it over.
pub const DEFAULT_LOCK_LEASE: Duration = Duration::from_secs(60);

/// Key ids the template and the regex are checked with: what one names, the other must find.
const SAMPLE_KEY_IDS: [&str; 3] = ["JWT-Signer-A", "x509-CA-B", "WIT-Signer-A"];

/// What differs between backends in the block.
#[derive(Clone, Copy, Debug)]
pub struct SharedKeysSpec {
    /// The template's key in the block (`crypto_key_template`, `alias_template`).
    pub template_key: &'static str,
    /// The template's fields, in the order the backend renders them.
    pub fields: &'static [&'static str],
    /// An example template, for the missing-key message.
    pub template_example: &'static str,
    /// An example regex matching the example template.
    pub regex_example: &'static str,
    /// What the template names ("CryptoKey id", "alias").
    pub names: &'static str,
    /// The shortest lease: one store call of the lock holder has to fit in it.
    pub min_lock_lease: Duration,
    /// The store, for messages ("Cloud KMS").
    pub store: &'static str,
}

impl SharedKeysSpec {
    /// Every key of the block, prefixed `shared_keys.`.
    pub fn setting_keys(&self) -> Vec<String> {
        [
            self.template_key,
            "key_id_extraction_regex",
            "shared_key_ids",
            "reuse_window",
            "lock_lease",
        ]
        .iter()
        .map(|k| format!("shared_keys.{k}"))
        .collect()
    }
}

/// The shared-keys mode: several servers use the same store keys for some key ids.
#[derive(Clone, Debug)]
pub struct SharedKeys {
    /// Names the store key of a shared key id.
    pub template: NameTemplate,
    /// Finds the SPIRE key id in a store name (one capturing group).
    pub key_id_regex: regex::Regex,
    /// Which SPIRE key ids are shared (the others stay per-server).
    pub shared_key_ids: regex::Regex,
    /// Reuse a generation created less than this long ago.
    pub reuse_window: Duration,
    /// Lease of the rotation lock.
    pub lock_lease: Duration,
}

impl PartialEq for SharedKeys {
    fn eq(&self, other: &Self) -> bool {
        self.template == other.template
            && self.key_id_regex.as_str() == other.key_id_regex.as_str()
            && self.shared_key_ids.as_str() == other.shared_key_ids.as_str()
            && self.reuse_window == other.reuse_window
            && self.lock_lease == other.lock_lease
    }
}

impl SharedKeys {
    /// Whether `key_id` is served from a shared key.
    pub fn is_shared(&self, key_id: &str) -> bool {
        self.shared_key_ids.is_match(key_id)
    }

    /// The SPIRE key id the extraction regex finds in `name`.
    pub fn key_id_in(&self, name: &str) -> Option<String> {
        extract_key_id(&self.key_id_regex, name)
    }

    /// The block as one comparable value (for the run-time change rules).
    pub fn summary(&self) -> (String, String, String, Duration, Duration) {
        (
            self.template.source().to_string(),
            self.key_id_regex.as_str().to_string(),
            self.shared_key_ids.as_str().to_string(),
            self.reuse_window,
            self.lock_lease,
        )
    }
}

/// The first capture of `regex` in `name`, if not empty.
pub fn extract_key_id(regex: &regex::Regex, name: &str) -> Option<String> {
    regex
        .captures(name)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().to_string())
        .filter(|id| !id.is_empty())
}

/// In shared-keys mode the identity is still needed (X509 CA and WIT keys stay
/// per-server); SPIRE's draft documentation calls it optional there, so say why.
pub const SHARED_MODE_IDENTITY_HINT: &str = "also in shared-keys mode: only the keys named by shared_keys.shared_key_ids are shared; X509 CA and WIT keys stay per-server";

/// Parses the `shared_keys` block. `sample` renders the name the backend would give a key
/// id (with example values for the other fields) and checks it against the store's rules.
pub fn parse_shared_keys(
    mut block: Settings,
    spec: &SharedKeysSpec,
    sample: impl Fn(&NameTemplate, &str) -> Result<String, String>,
) -> Result<SharedKeys, SettingsError> {
    let template_key = format!("shared_keys.{}", spec.template_key);
    const REGEX: &str = "shared_keys.key_id_extraction_regex";
    const IDS: &str = "shared_keys.shared_key_ids";
    let template_text = block.take_nonempty_string(&template_key)?.ok_or_else(|| {
        SettingsError::missing(
            &template_key,
            &format!(
                "a Go template naming the shared {}, e.g. {:?}",
                spec.names, spec.template_example
            ),
        )
    })?;
    let template = NameTemplate::parse(&template_text, spec.fields)
        .map_err(|e| SettingsError::invalid(&template_key, e))?;
    let regex_text = block.take_nonempty_string(REGEX)?.ok_or_else(|| {
        SettingsError::missing(
            REGEX,
            &format!(
                "a regular expression with one capturing group that finds the SPIRE key id in the {}, e.g. {:?}",
                spec.names, spec.regex_example
            ),
        )
    })?;
    let key_id_regex = regex::Regex::new(&regex_text).map_err(|e| {
        SettingsError::invalid(REGEX, format!("{regex_text:?} does not compile: {e}"))
    })?;
    let groups = key_id_regex.captures_len() - 1;
    if groups != 1 {
        return Err(SettingsError::invalid(
            REGEX,
            format!(
                "{regex_text:?} has {groups} capturing groups; it needs exactly one (the SPIRE key id)"
            ),
        ));
    }
    for key_id in SAMPLE_KEY_IDS {
        let name =
            sample(&template, key_id).map_err(|e| SettingsError::invalid(&template_key, e))?;
        match extract_key_id(&key_id_regex, &name) {
            Some(found) if found == key_id => {}
            Some(found) => {
                return Err(SettingsError::invalid(
                    REGEX,
                    format!(
                        "{regex_text:?} finds {found:?} in {name:?} (the template's {} for key id {key_id:?}); it must find {key_id:?}",
                        spec.names
                    ),
                ));
            }
            None => {
                return Err(SettingsError::invalid(
                    REGEX,
                    format!(
                        "{regex_text:?} does not match {name:?}, the {} the template gives key id {key_id:?}",
                        spec.names
                    ),
                ));
            }
        }
    }
    let ids_text = block
        .take_nonempty_string(IDS)?
        .unwrap_or_else(|| DEFAULT_SHARED_KEY_IDS.to_string());
    let shared_key_ids = regex::Regex::new(&ids_text)
        .map_err(|e| SettingsError::invalid(IDS, format!("{ids_text:?} does not compile: {e}")))?;
    let reuse_window = block
        .take_duration("shared_keys.reuse_window")?
        .unwrap_or(DEFAULT_REUSE_WINDOW);
    let lock_lease = block
        .take_duration("shared_keys.lock_lease")?
        .unwrap_or(DEFAULT_LOCK_LEASE);
    if lock_lease < spec.min_lock_lease {
        return Err(SettingsError::invalid(
            "shared_keys.lock_lease",
            format!(
                "must be at least {}s: the lease has to outlast one {} call of the lock holder",
                spec.min_lock_lease.as_secs(),
                spec.store
            ),
        ));
    }
    let allowed = spec.setting_keys();
    block.finish(&allowed.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(SharedKeys {
        template,
        key_id_regex,
        shared_key_ids,
        reuse_window,
        lock_lease,
    })
}
