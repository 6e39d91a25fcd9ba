//! `plugin_data` of the `pkcs11` backend (the kit's shell reads `key_identifier_file`,
//! `key_identifier_value` and the lifecycle schedule). SPIRE has no built-in for PKCS#11,
//! so the keys are ours: `module`, one of `token_label` / `token_serial` / `slot_id`, one
//! of `pin` / `pin_file` (or `KMS_KEYMANAGER_PKCS11_PIN`), `max_sessions`,
//! `key_label_prefix`, or all of it as a smallstep-style `uri`.

use std::path::PathBuf;

use keymanager_engine::kit::KmsSettings;
use keymanager_engine::kit::server_identity::check_value_chars;
use keymanager_engine::settings::{Secret, Settings, SettingsError, echo};
use keymanager_engine::{OnChange, SettingState};

/// The keys this backend reads itself.
pub const SETTING_KEYS: &[&str] = &[
    "module",
    "token_label",
    "token_serial",
    "slot_id",
    "pin",
    "pin_file",
    "max_sessions",
    "key_label_prefix",
    "uri",
];

/// The environment variable a PIN may come from.
pub const PIN_VARIABLE: &str = "KMS_KEYMANAGER_PKCS11_PIN";
/// The label prefix of this plugin's key objects unless `key_label_prefix` says.
pub const DEFAULT_LABEL_PREFIX: &str = "spire";
/// Sessions opened at most, when the module sets no lower limit.
pub const DEFAULT_MAX_SESSIONS: usize = 16;

/// Which token holds the keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSelector {
    /// `CKA_LABEL` of the token (`token_label`, URI `token=`).
    Label(String),
    /// Its serial number (`token_serial`, URI `serial=`).
    Serial(String),
    /// A slot id (`slot_id`, URI `slot-id=`).
    Slot(u64),
}

impl std::fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Label(label) => write!(f, "token label {label:?}"),
            Self::Serial(serial) => write!(f, "token serial {serial:?}"),
            Self::Slot(slot) => write!(f, "slot {slot}"),
        }
    }
}

/// The `pkcs11` backend's own validated settings. `Debug` never shows the PIN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11Settings {
    /// The PKCS#11 library.
    pub module: PathBuf,
    /// The token.
    pub token: TokenSelector,
    /// The user PIN.
    pub pin: Secret,
    /// Sessions opened at most (`None`: sized to the module's limit).
    pub max_sessions: Option<usize>,
    /// The label prefix of this plugin's objects.
    pub label_prefix: String,
}

/// What a `uri` held, before it is merged with the separate keys.
#[derive(Debug, Default, PartialEq, Eq)]
struct UriParts {
    module: Option<String>,
    token: Option<TokenSelector>,
    pin: Option<Secret>,
    pin_file: Option<String>,
}

fn percent_decode(key: &str, value: &str) -> Result<String, SettingsError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| SettingsError::invalid(key, "a bad %-escape in the URI"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| SettingsError::invalid(key, "the URI is not UTF-8"))
}

/// `pkcs11:module-path=…;token=…?pin-source=…` (RFC 7512 attributes as smallstep's `kms`
/// reads them): `module-path`, `token`, `serial`, `slot-id`, `pin-value`, `pin-source`
/// (a file, optionally `file:`-prefixed). Other attributes are refused, not ignored.
fn parse_uri(uri: &str) -> Result<UriParts, SettingsError> {
    let rest = uri
        .strip_prefix("pkcs11:")
        .ok_or_else(|| SettingsError::invalid("uri", "must start with \"pkcs11:\""))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut parts = UriParts::default();
    let attributes = path
        .split(';')
        .chain(query.split('&'))
        .filter(|a| !a.is_empty());
    for attribute in attributes {
        let (name, value) = attribute.split_once('=').ok_or_else(|| {
            SettingsError::invalid("uri", format!("{} is not name=value", echo(attribute)))
        })?;
        let value = percent_decode("uri", value)?;
        let token = |t: TokenSelector, parts: &mut UriParts| {
            if parts.token.replace(t).is_some() {
                Err(SettingsError::invalid(
                    "uri",
                    "name the token once: token, serial or slot-id",
                ))
            } else {
                Ok(())
            }
        };
        match name {
            "module-path" => parts.module = Some(value),
            "token" => token(TokenSelector::Label(value), &mut parts)?,
            "serial" => token(TokenSelector::Serial(value), &mut parts)?,
            "slot-id" => {
                let slot = value.parse().map_err(|_| {
                    SettingsError::invalid(
                        "uri",
                        format!("slot-id {} is not a number", echo(&value)),
                    )
                })?;
                token(TokenSelector::Slot(slot), &mut parts)?;
            }
            "pin-value" => parts.pin = Some(Secret::new(value)),
            "pin-source" => {
                parts.pin_file = Some(value.strip_prefix("file:").unwrap_or(&value).to_string())
            }
            other => {
                return Err(SettingsError::invalid(
                    "uri",
                    format!(
                        "unsupported attribute {}; allowed: module-path, token, serial, slot-id, pin-value, pin-source",
                        echo(other)
                    ),
                ));
            }
        }
    }
    Ok(parts)
}

fn read_pin_file(key: &str, path: &str) -> Result<Secret, SettingsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SettingsError::invalid(key, format!("cannot read {}: {e}", echo(path))))?;
    let pin = text.trim_end_matches(['\r', '\n']);
    if pin.is_empty() {
        return Err(SettingsError::invalid(
            key,
            format!("{} is empty", echo(path)),
        ));
    }
    Ok(Secret::new(pin.to_string()))
}

/// Reads an environment variable; tests pass their own.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Pkcs11Settings {
    /// [`KmsSettings::parse`] with the environment given.
    pub fn parse_with_env(settings: &mut Settings, env: Env<'_>) -> Result<Self, SettingsError> {
        let uri = match settings.take_nonempty_string("uri")? {
            Some(uri) => parse_uri(&uri)?,
            None => UriParts::default(),
        };
        let conflict =
            |key: &str| SettingsError::invalid(key, "is also given in uri; set it in one place");

        let module = match (settings.take_nonempty_string("module")?, uri.module) {
            (Some(_), Some(_)) => return Err(conflict("module")),
            (Some(m), None) | (None, Some(m)) => PathBuf::from(m),
            (None, None) => {
                return Err(SettingsError::missing(
                    "module",
                    "the path of the PKCS#11 library, e.g. \"/usr/lib/softhsm/libsofthsm2.so\"",
                ));
            }
        };

        let mut tokens = Vec::new();
        if let Some(label) = settings.take_nonempty_string("token_label")? {
            tokens.push(("token_label", TokenSelector::Label(label)));
        }
        if let Some(serial) = settings.take_nonempty_string("token_serial")? {
            tokens.push(("token_serial", TokenSelector::Serial(serial)));
        }
        if let Some(slot) = settings.take_u64("slot_id")? {
            tokens.push(("slot_id", TokenSelector::Slot(slot)));
        }
        let token = match (tokens.len(), uri.token) {
            (0, Some(token)) => token,
            (1, None) => tokens.remove(0).1,
            (0, None) => {
                return Err(SettingsError::missing(
                    "token_label",
                    "select the token with exactly one of token_label, token_serial or slot_id",
                ));
            }
            (_, Some(_)) => return Err(conflict(tokens[0].0)),
            _ => {
                return Err(SettingsError::invalid(
                    tokens[1].0,
                    format!(
                        "select the token with exactly one of token_label, token_serial or slot_id; found {}",
                        tokens
                            .iter()
                            .map(|(k, _)| *k)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        };

        let mut pins = Vec::new();
        if let Some(pin) = settings.take_secret("pin")? {
            pins.push(("pin", pin));
        }
        if let Some(path) = settings.take_nonempty_string("pin_file")? {
            pins.push(("pin_file", read_pin_file("pin_file", &path)?));
        }
        if let Some(pin) = uri.pin {
            pins.push(("uri", pin));
        }
        if let Some(path) = uri.pin_file {
            pins.push(("uri", read_pin_file("uri", &path)?));
        }
        let pin = match pins.len() {
            0 => env(PIN_VARIABLE)
                .filter(|p| !p.is_empty())
                .map(Secret::new)
                .ok_or_else(|| {
                    SettingsError::missing(
                        "pin",
                        "set pin or pin_file (or the environment variable KMS_KEYMANAGER_PKCS11_PIN)",
                    )
                })?,
            1 => pins.remove(0).1,
            _ => {
                return Err(SettingsError::invalid(
                    pins[1].0,
                    "give the PIN once: pin, pin_file, or the uri's pin-value / pin-source",
                ));
            }
        };

        let max_sessions = match settings.take_u64("max_sessions")? {
            None => None,
            Some(n @ 1..=1024) => Some(n as usize),
            Some(n) => {
                return Err(SettingsError::invalid(
                    "max_sessions",
                    format!("{n} is out of range; allowed are 1 to 1024"),
                ));
            }
        };

        let label_prefix = settings
            .take_nonempty_string("key_label_prefix")?
            .unwrap_or_else(|| DEFAULT_LABEL_PREFIX.to_string());
        if let Some(bad) = label_prefix
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(SettingsError::invalid(
                "key_label_prefix",
                format!("contains {bad:?}; allowed are letters, digits, '_', '-' and '.'"),
            ));
        }

        Ok(Self {
            module,
            token,
            pin,
            max_sessions,
            label_prefix,
        })
    }
}

/// Server ids go into object labels between `:` separators.
pub fn check_server_id(value: &str) -> Result<(), String> {
    check_value_chars(
        value,
        128,
        &['_', '-', '.'],
        Some("it is part of every key's CKA_LABEL"),
    )
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl KmsSettings for Pkcs11Settings {
    const SETTING_KEYS: &'static [&'static str] = SETTING_KEYS;

    fn parse(settings: &mut Settings, _warnings: &mut Vec<String>) -> Result<Self, SettingsError> {
        Self::parse_with_env(settings, &process_env)
    }

    fn check_server_id(value: &str) -> Result<(), String> {
        check_server_id(value)
    }

    fn store(&self) -> String {
        format!(
            "PKCS#11 module {} {} labels {}:",
            self.module.display(),
            self.token,
            self.label_prefix
        )
    }

    /// The PIN applies at the next login (a new session pool); the session count at the
    /// next start.
    fn describe(&self) -> Vec<SettingState> {
        vec![
            SettingState::secret("pin", &[self.pin.expose().as_bytes()], OnChange::Runtime),
            SettingState::new("max_sessions", self.max_sessions, OnChange::NextStart),
        ]
    }

    /// Without logging in: the module exists and loads, and the token is there.
    fn problems(&self) -> Vec<String> {
        if !self.module.is_file() {
            return vec![format!(
                "module {} does not exist or is not a file",
                self.module.display()
            )];
        }
        match crate::module::Module::load(&self.module) {
            Err(e) => vec![e.message],
            Ok(module) => match module.find_slot(&self.token) {
                Ok(_) => Vec::new(),
                Err(e) => vec![e.message],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use keymanager_engine::settings::SettingValue;

    use super::*;

    fn parse(pairs: &[(&str, &str)], env: &[(&str, &str)]) -> Result<Pkcs11Settings, String> {
        let values: BTreeMap<String, SettingValue> = pairs
            .iter()
            .map(|(k, v)| {
                let value = match v.parse::<i64>() {
                    Ok(n) if *k == "slot_id" || *k == "max_sessions" => SettingValue::Integer(n),
                    _ => SettingValue::String(v.to_string()),
                };
                (k.to_string(), value)
            })
            .collect();
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| env.get(name).cloned();
        let mut settings = Settings::new(values);
        let parsed =
            Pkcs11Settings::parse_with_env(&mut settings, &lookup).map_err(|e| e.to_string())?;
        settings.finish(SETTING_KEYS).map_err(|e| e.to_string())?;
        Ok(parsed)
    }

    #[test]
    fn separate_keys_and_a_uri_mean_the_same() {
        let keys = parse(
            &[
                ("module", "/usr/lib/softhsm/libsofthsm2.so"),
                ("token_label", "spire ca"),
                ("pin", "1234"),
            ],
            &[],
        )
        .expect("keys");
        let uri = parse(
            &[(
                "uri",
                "pkcs11:module-path=/usr/lib/softhsm/libsofthsm2.so;token=spire%20ca?pin-value=1234",
            )],
            &[],
        )
        .expect("uri");
        assert_eq!(keys, uri);
        assert_eq!(keys.label_prefix, "spire");
        assert_eq!(keys.max_sessions, None);
        assert!(!format!("{keys:?}").contains("1234"), "the PIN is redacted");
    }

    #[test]
    fn the_pin_comes_from_one_place() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("pin");
        std::fs::write(&file, "5678\n").expect("pin file");
        let base = [("module", "/m.so"), ("slot_id", "3")];
        let from_file = parse(
            &[
                base[0],
                base[1],
                ("pin_file", file.to_str().expect("utf-8")),
            ],
            &[],
        )
        .expect("pin_file");
        assert_eq!(from_file.pin.expose(), "5678");
        assert_eq!(from_file.token, TokenSelector::Slot(3));
        let from_env = parse(&base, &[(PIN_VARIABLE, "9999")]).expect("env");
        assert_eq!(from_env.pin.expose(), "9999");
        let missing = parse(&base, &[]).expect_err("no PIN");
        assert!(missing.contains("KMS_KEYMANAGER_PKCS11_PIN"), "{missing}");
        let twice = parse(
            &[
                base[0],
                base[1],
                ("pin", "1"),
                ("pin_file", file.to_str().expect("utf-8")),
            ],
            &[],
        )
        .expect_err("two PINs");
        assert!(twice.contains("pin_file"), "{twice}");
        assert!(!twice.contains("5678"), "{twice}");
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("token_label", "t"), ("pin", "1")], "module"),
            (&[("module", "/m.so"), ("pin", "1")], "token_label"),
            (
                &[
                    ("module", "/m.so"),
                    ("token_label", "t"),
                    ("slot_id", "1"),
                    ("pin", "1"),
                ],
                "exactly one of token_label, token_serial or slot_id",
            ),
            (
                &[
                    ("module", "/m.so"),
                    ("token_label", "t"),
                    ("pin", "1"),
                    ("max_sessions", "0"),
                ],
                "max_sessions",
            ),
            (
                &[
                    ("module", "/m.so"),
                    ("token_label", "t"),
                    ("pin", "1"),
                    ("key_label_prefix", "a:b"),
                ],
                "key_label_prefix",
            ),
            (
                &[
                    ("uri", "pkcs11:token=t;object=x?pin-value=1"),
                    ("module", "/m.so"),
                ],
                "object",
            ),
            (&[("uri", "pkcs:token=t")], "pkcs11:"),
            (
                &[
                    ("uri", "pkcs11:module-path=/m.so;token=t?pin-value=1"),
                    ("module", "/m.so"),
                ],
                "module",
            ),
        ];
        for (pairs, wanted) in cases {
            let error = parse(pairs, &[]).expect_err(wanted);
            assert!(error.contains(wanted), "{wanted}: {error}");
        }
        assert!(check_server_id("srv-a_1.x").is_ok());
        assert!(check_server_id("a:b").unwrap_err().contains("':'"));
    }
}
