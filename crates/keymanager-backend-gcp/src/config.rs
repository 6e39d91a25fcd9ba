//! `plugin_data` of the `gcp_kms` backend.
//!
//! SPIRE's keys, same meaning: `key_ring`, `key_identifier_file`, `key_identifier_value`,
//! `key_policy_file`, `service_account_file`, and the `shared_keys` block of the shared-keys
//! mode (`crypto_key_template`, `key_id_extraction_regex`). Older SPIRE releases called the
//! identifier file `key_metadata_file`: accepted as a deprecated alias. Ours:
//! `protection_level`, `endpoint`, and in `shared_keys`: `shared_key_ids`, `reuse_window`,
//! `lock_lease`.

use std::path::PathBuf;
use std::time::Duration;

use keymanager_engine::kit::KmsSettings;
use keymanager_engine::kit::policy_file::PolicyFile;
use keymanager_engine::kit::shared::{
    SHARED_MODE_IDENTITY_HINT, SharedKeys, SharedKeysSpec, parse_shared_keys,
};
use keymanager_engine::settings::{Settings, SettingsError, echo};
use keymanager_engine::{OnChange, SettingState};

use crate::naming;

/// The keys this backend reads itself (the kit's shell reads `key_identifier_file`,
/// `key_identifier_value`, `endpoint` and the lifecycle schedule).
pub const SETTING_KEYS: &[&str] = &[
    "key_ring",
    "key_metadata_file",
    "key_policy_file",
    "service_account_file",
    "shared_keys",
    "protection_level",
];

/// A lease must outlast one KMS call of the holder (see `kms::ATTEMPT_TIMEOUT`).
pub const MIN_LOCK_LEASE: Duration = Duration::from_secs(10);

/// The `shared_keys` block of `gcp_kms`: SPIRE's `crypto_key_template`, the kit's rest.
pub const SHARED_KEYS: SharedKeysSpec = SharedKeysSpec {
    template_key: "crypto_key_template",
    fields: naming::TEMPLATE_FIELDS,
    template_example: "spire-key-{{ .TrustDomain }}-{{ .KeyID }}",
    regex_example: "^spire-key-[^-]+-(.+)$",
    names: "CryptoKey id",
    min_lock_lease: MIN_LOCK_LEASE,
    store: "Cloud KMS",
};

/// Where Cloud KMS keys are protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtectionLevel {
    /// Software keys (Cloud KMS default).
    Software,
    /// Cloud HSM (FIPS 140-2 Level 3).
    Hsm,
}

/// A service account key file: its path and a digest of its content, so that a rotated
/// key in the same file is noticed at re-Configure. Never holds the key itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountFile {
    /// The file.
    pub path: PathBuf,
    /// The key file's content, read at Configure, digested for comparison only.
    content_digest: SettingState,
}

/// The `gcp_kms` backend's own validated settings. Holds no secrets: credentials stay in
/// the files the paths name.
#[derive(Clone, Debug, PartialEq)]
pub struct GcpKmsSettings {
    /// `projects/<p>/locations/<l>/keyRings/<r>`.
    pub key_ring: String,
    /// An IAM policy (v3 JSON) from `key_policy_file`, replacing the default policy.
    pub key_policy: Option<(PolicyFile, serde_json::Value)>,
    /// A service account key file; else Application Default Credentials.
    pub service_account_file: Option<ServiceAccountFile>,
    /// The shared-keys mode, if configured.
    pub shared: Option<SharedKeys>,
    /// Protection level of created keys.
    pub protection_level: ProtectionLevel,
}

impl KmsSettings for GcpKmsSettings {
    const SETTING_KEYS: &'static [&'static str] = SETTING_KEYS;

    /// Takes and validates this backend's keys from `settings`. Reads `key_policy_file` and
    /// `service_account_file` (reading is the only I/O; nothing is written). The deprecated
    /// `key_metadata_file` is mapped onto `key_identifier_file` for the shell to read.
    fn parse(settings: &mut Settings, warnings: &mut Vec<String>) -> Result<Self, SettingsError> {
        let key_ring = settings.take_nonempty_string("key_ring")?.ok_or_else(|| {
            SettingsError::missing(
                "key_ring",
                "the key ring of the keys, as projects/<project>/locations/<location>/keyRings/<ring>",
            )
        })?;
        check_key_ring(&key_ring).map_err(|reason| SettingsError::invalid("key_ring", reason))?;

        warnings.extend(settings.rename_deprecated(
            "key_metadata_file",
            "key_identifier_file",
            &["key_identifier_value"],
        )?);

        let key_policy = match PolicyFile::take_from(settings)? {
            None => None,
            Some(file) => {
                let policy = check_policy(&file)?;
                Some((file, policy))
            }
        };
        let service_account_file = match settings.take_nonempty_string("service_account_file")? {
            None => None,
            Some(path) => {
                let path = PathBuf::from(path);
                let content = std::fs::read(&path).map_err(|e| {
                    SettingsError::invalid(
                        "service_account_file",
                        format!("{} is not a readable file: {e}", path.display()),
                    )
                })?;
                Some(ServiceAccountFile {
                    path,
                    content_digest: SettingState::secret(
                        "service_account_file",
                        &[&content],
                        OnChange::Runtime,
                    ),
                })
            }
        };

        let protection_level = match settings.take_nonempty_string("protection_level")? {
            None => ProtectionLevel::Software,
            Some(level) => match level.to_ascii_lowercase().as_str() {
                "software" => ProtectionLevel::Software,
                "hsm" => ProtectionLevel::Hsm,
                _ => {
                    return Err(SettingsError::invalid(
                        "protection_level",
                        format!(
                            "{} is not allowed; use \"software\" or \"hsm\"",
                            echo(&level)
                        ),
                    ));
                }
            },
        };

        let shared = match settings.take_block("shared_keys")? {
            None => None,
            Some(block) => Some(parse_shared_keys(
                block,
                &SHARED_KEYS,
                |template, key_id| {
                    naming::render_shared(
                        template,
                        &naming::trust_domain_hash("example.org"),
                        key_id,
                    )
                },
            )?),
        };

        Ok(Self {
            key_ring,
            key_policy,
            service_account_file,
            shared,
            protection_level,
        })
    }

    fn check_server_id(value: &str) -> Result<(), String> {
        naming::check_server_id(value)
    }

    fn missing_identity_hint(&self) -> Option<&'static str> {
        self.shared.is_some().then_some(SHARED_MODE_IDENTITY_HINT)
    }

    fn store(&self) -> String {
        format!("key ring {}", self.key_ring)
    }

    /// Every setting with what a change at run time means: credentials, the policy and
    /// the protection level of new keys apply at once; the shared-keys mode decides which
    /// CryptoKeys hold the keys, so a change is refused; the key ring is the store.
    fn describe(&self) -> Vec<SettingState> {
        vec![
            match &self.service_account_file {
                Some(file) => file.content_digest.clone(),
                None => SettingState::new(
                    "service_account_file",
                    "application default credentials",
                    OnChange::Runtime,
                ),
            },
            SettingState::secret(
                "key_policy_file",
                &[self
                    .key_policy
                    .as_ref()
                    .map_or(&b""[..], |(f, _)| f.text.as_bytes())],
                OnChange::Runtime,
            ),
            SettingState::new("protection_level", self.protection_level, OnChange::Runtime),
            SettingState::new(
                "shared_keys",
                self.shared.as_ref().map(SharedKeys::summary),
                OnChange::Refused,
            ),
        ]
    }
}

/// `projects/<p>/locations/<l>/keyRings/<r>` with non-empty, slash-free parts.
fn check_key_ring(ring: &str) -> Result<(), String> {
    let parts: Vec<&str> = ring.split('/').collect();
    let shape_ok = parts.len() == 6
        && parts[0] == "projects"
        && parts[2] == "locations"
        && parts[4] == "keyRings"
        && [parts[1], parts[3], parts[5]].iter().all(|p| !p.is_empty());
    if !shape_ok {
        return Err(format!(
            "{ring:?} is not a key ring resource name; write projects/<project>/locations/<location>/keyRings/<ring>"
        ));
    }
    if !parts[5]
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "key ring id {:?} may only contain letters, digits, '_' and '-'",
            parts[5]
        ));
    }
    Ok(())
}

/// An IAM policy: `"version": 3` and a non-empty `bindings` list of role + members.
fn check_policy(file: &PolicyFile) -> Result<serde_json::Value, SettingsError> {
    const KEY: &str = "key_policy_file";
    let path = &file.path;
    let policy = serde_json::Value::Object(file.json.clone());
    if policy.get("version").and_then(|v| v.as_i64()) != Some(3) {
        return Err(SettingsError::invalid(
            KEY,
            format!(
                "{} must be an IAM policy of version 3 (\"version\": 3)",
                path.display()
            ),
        ));
    }
    let bindings = policy.get("bindings").and_then(|b| b.as_array());
    let well_formed = bindings.is_some_and(|bindings| {
        !bindings.is_empty()
            && bindings.iter().all(|b| {
                b.get("role").and_then(|r| r.as_str()).is_some()
                    && b.get("members")
                        .and_then(|m| m.as_array())
                        .is_some_and(|m| !m.is_empty() && m.iter().all(|x| x.is_string()))
            })
    });
    if !well_formed {
        return Err(SettingsError::invalid(
            KEY,
            format!(
                "{} needs a non-empty \"bindings\" list whose entries have a \"role\" and a non-empty \"members\" list",
                path.display()
            ),
        ));
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use keymanager_engine::CoreConfig;
    use keymanager_engine::kit::KmsConfig;
    use keymanager_engine::kit::server_identity::ServerIdSource;
    use keymanager_engine::settings::SettingValue;

    use keymanager_engine::kit::shared::DEFAULT_REUSE_WINDOW;

    use super::*;
    use crate::GcpKmsBackend;

    fn s(v: &str) -> SettingValue {
        SettingValue::String(v.to_string())
    }

    fn parse(pairs: &[(&str, SettingValue)]) -> Result<KmsConfig<GcpKmsBackend>, String> {
        let mut values: BTreeMap<String, SettingValue> = BTreeMap::new();
        values.insert(
            "key_ring".into(),
            s("projects/p/locations/global/keyRings/spire"),
        );
        values.insert("key_identifier_value".into(), s("server-a"));
        for (k, v) in pairs {
            if matches!(v, SettingValue::Null) {
                values.remove(*k);
            } else {
                values.insert(k.to_string(), v.clone());
            }
        }
        let core = CoreConfig {
            trust_domain: "example.org".into(),
        };
        crate::GcpKmsFactory::new()
            .parse_all(Settings::new(values), &core)
            .map_err(|e| e.to_string())
    }

    fn shared(pairs: &[(&str, &str)]) -> SettingValue {
        SettingValue::Map(pairs.iter().map(|(k, v)| (k.to_string(), s(v))).collect())
    }

    const TEMPLATE: (&str, &str) = (
        "crypto_key_template",
        "spire-key-{{ .TrustDomain }}-{{ .KeyID }}",
    );
    const REGEX: (&str, &str) = ("key_id_extraction_regex", "^spire-key-[^-]+-(.+)$");

    #[test]
    fn minimal_standard_configuration() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.server_id, ServerIdSource::Value("server-a".into()));
        assert_eq!(config.backend.protection_level, ProtectionLevel::Software);
        assert!(config.backend.shared.is_none() && config.warnings.is_empty());
    }

    #[test]
    fn key_ring_is_required_and_must_be_a_resource_name() {
        let err = parse(&[("key_ring", SettingValue::Null)]).unwrap_err();
        assert!(err.starts_with("\"key_ring\" is required"), "{err}");
        let err = parse(&[("key_ring", s("projects/p/keyRings/r"))]).unwrap_err();
        assert!(
            err.contains("projects/<project>/locations/<location>/keyRings/<ring>"),
            "{err}"
        );
    }

    #[test]
    fn identifier_follows_gcp_label_rules_and_crypto_key_id_length() {
        let err = parse(&[("key_identifier_value", s("Server-A"))]).unwrap_err();
        assert!(err.contains("lowercase"), "{err}");
        let err = parse(&[("key_identifier_value", s(&"a".repeat(41)))]).unwrap_err();
        assert!(err.contains("at most"), "{err}");
        let err = parse(&[("key_identifier_value", SettingValue::Null)]).unwrap_err();
        assert!(err.contains("key_identifier_file"), "{err}");
    }

    #[test]
    fn key_metadata_file_is_a_deprecated_alias() {
        let config = parse(&[
            ("key_identifier_value", SettingValue::Null),
            ("key_metadata_file", s("/tmp/server_id")),
        ])
        .unwrap();
        assert_eq!(
            config.server_id,
            ServerIdSource::File(PathBuf::from("/tmp/server_id"))
        );
        assert!(config.warnings[0].contains("deprecated"));
        let err = parse(&[("key_metadata_file", s("/tmp/x"))]).unwrap_err();
        assert!(err.contains("set only one"), "{err}");
    }

    #[test]
    fn protection_level_and_endpoint_are_checked() {
        assert_eq!(
            parse(&[("protection_level", s("HSM"))])
                .unwrap()
                .backend
                .protection_level,
            ProtectionLevel::Hsm
        );
        let err = parse(&[("protection_level", s("external"))]).unwrap_err();
        assert!(err.contains("\"software\" or \"hsm\""), "{err}");
        let err = parse(&[("endpoint", s("127.0.0.1:8080"))]).unwrap_err();
        assert!(err.contains("https://"), "{err}");
    }

    #[test]
    fn policy_file_must_be_a_v3_policy_with_bindings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.json");
        std::fs::write(&path, r#"{"version": 1, "bindings": []}"#).unwrap();
        let err = parse(&[("key_policy_file", s(path.to_str().unwrap()))]).unwrap_err();
        assert!(err.contains("version 3"), "{err}");
        std::fs::write(
            &path,
            r#"{"version": 3, "bindings": [{"role": "roles/cloudkms.signerVerifier", "members": ["serviceAccount:a@p.iam.gserviceaccount.com"]}]}"#,
        )
        .unwrap();
        assert!(
            parse(&[("key_policy_file", s(path.to_str().unwrap()))])
                .unwrap()
                .backend
                .key_policy
                .is_some()
        );
    }

    #[test]
    fn shared_keys_block_is_validated() {
        let config = parse(&[("shared_keys", shared(&[TEMPLATE, REGEX]))]).unwrap();
        let shared_keys = config.backend.shared.unwrap();
        assert_eq!(shared_keys.reuse_window, DEFAULT_REUSE_WINDOW);
        assert!(shared_keys.shared_key_ids.is_match("JWT-Signer-A"));
        assert!(!shared_keys.shared_key_ids.is_match("x509-CA-A"));

        let err = parse(&[("shared_keys", shared(&[REGEX]))]).unwrap_err();
        assert!(err.contains("shared_keys.crypto_key_template"), "{err}");
        let err = parse(&[(
            "shared_keys",
            shared(&[
                TEMPLATE,
                ("key_id_extraction_regex", "^spire-key-([^-]+)-(.+)$"),
            ]),
        )])
        .unwrap_err();
        assert!(err.contains("has 2 capturing groups"), "{err}");
        let err = parse(&[(
            "shared_keys",
            shared(&[TEMPLATE, ("key_id_extraction_regex", "^spire-(key)-")]),
        )])
        .unwrap_err();
        assert!(err.contains("finds \"key\""), "{err}");
        let err = parse(&[(
            "shared_keys",
            shared(&[
                ("crypto_key_template", "spire-{{ .Region }}-{{ .KeyID }}"),
                REGEX,
            ]),
        )])
        .unwrap_err();
        assert!(err.contains(".Region"), "{err}");
        let err = parse(&[(
            "shared_keys",
            shared(&[TEMPLATE, REGEX, ("lock_lease", "1s")]),
        )])
        .unwrap_err();
        assert!(err.contains("at least 10s"), "{err}");
        let err =
            parse(&[("shared_keys", shared(&[TEMPLATE, REGEX, ("colour", "x")]))]).unwrap_err();
        assert!(err.contains("shared_keys.colour"), "{err}");
    }

    #[test]
    fn shared_mode_still_needs_an_identity_and_says_why() {
        let err = parse(&[
            ("key_identifier_value", SettingValue::Null),
            ("shared_keys", shared(&[TEMPLATE, REGEX])),
        ])
        .unwrap_err();
        assert!(
            err.contains("X509 CA and WIT keys stay per-server"),
            "{err}"
        );
    }
}
