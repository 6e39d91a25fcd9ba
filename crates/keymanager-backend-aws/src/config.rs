//! `plugin_data` of the `aws_kms` backend (the kit's shell reads `key_identifier_file`,
//! `key_identifier_value`, `endpoint` and the lifecycle schedule).
//!
//! SPIRE's keys, same meaning: `access_key_id`, `secret_access_key`, `region`,
//! `key_policy_file`, `key_tags`, `enable_tag_based_key_discovery`. Ours: `key_prefix` (the
//! older external plugin's per-server prefix, mapped onto `key_identifier_value`,
//! deprecated), `assume_role_arn`, `external_id`, `role_session_name`.

use std::collections::BTreeMap;
use std::time::Duration;

use keymanager_engine::kit::KmsSettings;
use keymanager_engine::kit::policy_file::PolicyFile;
use keymanager_engine::kit::server_identity::check_value_chars;
use keymanager_engine::kit::shared::{
    SHARED_MODE_IDENTITY_HINT, SharedKeys, SharedKeysSpec, parse_shared_keys,
};
use keymanager_engine::settings::{Secret, Settings, SettingsError, echo};
use keymanager_engine::{OnChange, SettingState};

use crate::naming;

/// The keys this backend reads itself.
pub const SETTING_KEYS: &[&str] = &[
    "access_key_id",
    "secret_access_key",
    "region",
    "key_policy_file",
    "key_tags",
    "enable_tag_based_key_discovery",
    "key_prefix",
    "assume_role_arn",
    "external_id",
    "role_session_name",
    "shared_keys",
];

/// A lease must outlast one KMS call of the holder (see `client::ATTEMPT_TIMEOUT`).
pub const MIN_LOCK_LEASE: Duration = Duration::from_secs(10);

/// The `shared_keys` block of `aws_kms`: the same block as `gcp_kms`'s, with the shared
/// key's alias named by `alias_template`.
pub const SHARED_KEYS: SharedKeysSpec = SharedKeysSpec {
    template_key: "alias_template",
    fields: naming::TEMPLATE_FIELDS,
    template_example: "alias/SPIRE_SHARED/{{ .TrustDomain }}/{{ .KeyID }}",
    regex_example: "^alias/SPIRE_SHARED/[^/]+/([^/]+)$",
    names: "alias",
    min_lock_lease: MIN_LOCK_LEASE,
    store: "AWS KMS",
};

/// Default STS session name when assuming a role.
pub const DEFAULT_ROLE_SESSION_NAME: &str = "kms-keymanager";

/// Where AWS credentials come from. `Debug` shows neither the secret key nor the full
/// access key id (the configuration is logged at Configure).
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// The SDK's default chain: environment, shared config/profile, web identity, ECS, EC2.
    DefaultChain,
    /// Static keys from `plugin_data` (both set). `Debug` redacts the secret.
    Static {
        /// The access key id (not secret on its own, but still not logged in full).
        access_key_id: String,
        /// The secret key.
        secret_access_key: Secret,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DefaultChain => f.write_str("DefaultChain"),
            Self::Static { access_key_id, .. } => {
                let shown: String = access_key_id.chars().take(4).collect();
                write!(
                    f,
                    "Static {{ access_key_id: \"{shown}…\", secret_access_key: <redacted> }}"
                )
            }
        }
    }
}

/// How the server finds its keys at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discovery {
    /// By alias prefix (`alias/SPIRE_SERVER/<td>/<server id>/`), SPIRE's default.
    Alias,
    /// By tags through the Resource Groups Tagging API.
    Tags,
}

/// Cross-account access through STS AssumeRole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssumeRole {
    /// The role ARN.
    pub role_arn: String,
    /// The external id the role's trust policy requires, if any.
    pub external_id: Option<Secret>,
    /// STS session name.
    pub session_name: String,
}

/// The `aws_kms` backend's own validated settings.
#[derive(Clone, Debug, PartialEq)]
pub struct AwsKmsSettings {
    /// The KMS region.
    pub region: String,
    /// Credentials.
    pub credentials: Credentials,
    /// A key policy from `key_policy_file`, replacing the default policy.
    pub key_policy: Option<PolicyFile>,
    /// User tags added to every key this server creates.
    pub key_tags: BTreeMap<String, String>,
    /// Discovery mode.
    pub discovery: Discovery,
    /// Cross-account role, if any.
    pub assume_role: Option<AssumeRole>,
    /// The shared-keys mode, if configured.
    pub shared: Option<SharedKeys>,
}

impl KmsSettings for AwsKmsSettings {
    const SETTING_KEYS: &'static [&'static str] = SETTING_KEYS;

    /// Takes and validates this backend's keys from `settings`. Reads `key_policy_file`
    /// (reading is the only I/O; nothing is written). `key_prefix` is mapped onto
    /// `key_identifier_value` for the shell to read, with a warning.
    fn parse(settings: &mut Settings, warnings: &mut Vec<String>) -> Result<Self, SettingsError> {
        let region = settings.take_nonempty_string("region")?.ok_or_else(|| {
            SettingsError::missing(
                "region",
                "the AWS region of the KMS keys, e.g. \"us-east-1\"",
            )
        })?;
        if !region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(SettingsError::invalid(
                "region",
                format!(
                    "{} is not an AWS region name (lowercase letters, digits and '-')",
                    echo(&region)
                ),
            ));
        }

        let credentials = match (
            settings.take_nonempty_string("access_key_id")?,
            settings.take_secret("secret_access_key")?,
        ) {
            (None, None) => Credentials::DefaultChain,
            (Some(access_key_id), Some(secret_access_key)) => Credentials::Static {
                access_key_id,
                secret_access_key,
            },
            (Some(_), None) => {
                return Err(SettingsError::missing(
                    "secret_access_key",
                    "access_key_id and secret_access_key must be set together (or neither, for the default credential chain)",
                ));
            }
            (None, Some(_)) => {
                return Err(SettingsError::missing(
                    "access_key_id",
                    "access_key_id and secret_access_key must be set together (or neither, for the default credential chain)",
                ));
            }
        };

        if let Some(prefix) = settings.take_nonempty_string("key_prefix")? {
            if settings.contains("key_identifier_file") || settings.contains("key_identifier_value")
            {
                return Err(SettingsError::invalid(
                    "key_prefix",
                    "key_prefix is deprecated and cannot be combined with key_identifier_file or key_identifier_value; remove it",
                ));
            }
            let value = prefix.trim_end_matches('/').to_string();
            check_identifier_value(&value)
                .map_err(|reason| SettingsError::invalid("key_prefix", reason))?;
            warnings.push(format!(
                "key_prefix is deprecated: it is used as key_identifier_value = {value:?}; set that instead"
            ));
            settings.put_string("key_identifier_value", value);
        }

        let key_policy = PolicyFile::take_from(settings)?;

        let key_tags = settings.take_string_map("key_tags")?.unwrap_or_default();
        check_key_tags(&key_tags)?;

        let discovery = if settings
            .take_bool("enable_tag_based_key_discovery")?
            .unwrap_or(false)
        {
            Discovery::Tags
        } else {
            Discovery::Alias
        };

        let role_arn = settings.take_nonempty_string("assume_role_arn")?;
        let external_id = settings.take_secret("external_id")?;
        let session_name = settings.take_nonempty_string("role_session_name")?;
        let assume_role = match role_arn {
            None => {
                if external_id.is_some() || session_name.is_some() {
                    return Err(SettingsError::missing(
                        "assume_role_arn",
                        "external_id and role_session_name only apply together with assume_role_arn",
                    ));
                }
                None
            }
            Some(role_arn) => {
                check_role_arn(&role_arn)?;
                if let Some(external_id) = &external_id {
                    check_sts_string("external_id", external_id.expose(), 2, 1224, "+=,.@:/-")?;
                }
                let session_name =
                    session_name.unwrap_or_else(|| DEFAULT_ROLE_SESSION_NAME.to_string());
                check_sts_string("role_session_name", &session_name, 2, 64, "+=,.@-")?;
                Some(AssumeRole {
                    role_arn,
                    external_id,
                    session_name,
                })
            }
        };

        let shared = match settings.take_block("shared_keys")? {
            None => None,
            Some(block) => Some(parse_shared_keys(
                block,
                &SHARED_KEYS,
                |template, key_id| naming::render_shared(template, "example.org", &region, key_id),
            )?),
        };

        Ok(Self {
            region,
            credentials,
            key_policy,
            key_tags,
            discovery,
            assume_role,
            shared,
        })
    }

    fn check_server_id(value: &str) -> Result<(), String> {
        check_identifier_value(value)
    }

    fn missing_identity_hint(&self) -> Option<&'static str> {
        self.shared.is_some().then_some(SHARED_MODE_IDENTITY_HINT)
    }

    fn store(&self) -> String {
        format!("region {}", self.region)
    }

    /// Every setting with what a change at run time means. Credentials (static keys, the
    /// role to assume) and what new keys get (policy, tags) apply at once; the discovery
    /// mode at the next start; the region is the store itself (see the store identity).
    fn describe(&self) -> Vec<SettingState> {
        let credentials = match &self.credentials {
            Credentials::DefaultChain => SettingState::new(
                "access_key_id/secret_access_key",
                "default chain",
                OnChange::Runtime,
            ),
            Credentials::Static {
                access_key_id,
                secret_access_key,
            } => SettingState::secret(
                "access_key_id/secret_access_key",
                &[
                    access_key_id.as_bytes(),
                    secret_access_key.expose().as_bytes(),
                ],
                OnChange::Runtime,
            ),
        };
        let role = match &self.assume_role {
            None => SettingState::new(
                "assume_role_arn/external_id/role_session_name",
                "none",
                OnChange::Runtime,
            ),
            Some(role) => SettingState::secret(
                "assume_role_arn/external_id/role_session_name",
                &[
                    role.role_arn.as_bytes(),
                    role.external_id
                        .as_ref()
                        .map_or(&b""[..], |e| e.expose().as_bytes()),
                    role.session_name.as_bytes(),
                ],
                OnChange::Runtime,
            ),
        };
        vec![
            credentials,
            role,
            SettingState::secret(
                "key_policy_file",
                &[self
                    .key_policy
                    .as_ref()
                    .map_or(&b""[..], |p| p.text.as_bytes())],
                OnChange::Runtime,
            ),
            SettingState::new("key_tags", &self.key_tags, OnChange::Runtime),
            SettingState::new(
                "enable_tag_based_key_discovery",
                self.discovery,
                OnChange::NextStart,
            ),
            // Which aliases hold which keys: a change would strand keys in use.
            SettingState::new(
                "shared_keys",
                self.shared.as_ref().map(SharedKeys::summary),
                OnChange::Refused,
            ),
        ]
    }
}

/// SPIRE's rule for `key_identifier_value`: at most 256 characters of `[A-Za-z0-9/_-]`, not
/// starting with `alias/aws/`. (SPIRE's regex class `[A-z]` also lets `[ \ ] ^ _` and a
/// backtick through; KMS rejects those in alias names, so they are refused here up front.)
pub fn check_identifier_value(value: &str) -> Result<(), String> {
    check_value_chars(value, 256, &['/', '_', '-'], None)?;
    if value.starts_with("alias/aws/") {
        return Err("must not start with \"alias/aws/\" (reserved for AWS managed keys)".into());
    }
    Ok(())
}

/// SPIRE's `key_tags` rules: at most 50 tags; keys 1–128 characters, values up to 256;
/// letters, digits, spaces and `+ - = . _ : / @`; no `aws:` or `spire-` prefix.
fn check_key_tags(tags: &BTreeMap<String, String>) -> Result<(), SettingsError> {
    if tags.len() > 50 {
        return Err(SettingsError::invalid(
            "key_tags",
            format!("{} tags given; KMS allows at most 50", tags.len()),
        ));
    }
    let allowed = |c: char| c.is_alphanumeric() || c == ' ' || "+-=._:/@".contains(c);
    for (key, value) in tags {
        let tag_key = format!("key_tags.{key}");
        let chars = key.chars().count();
        if !(1..=128).contains(&chars) {
            return Err(SettingsError::invalid(
                &tag_key,
                "tag keys must be 1 to 128 characters",
            ));
        }
        if value.chars().count() > 256 {
            return Err(SettingsError::invalid(
                &tag_key,
                "tag values must be at most 256 characters",
            ));
        }
        if let Some(bad) = key.chars().chain(value.chars()).find(|c| !allowed(*c)) {
            return Err(SettingsError::invalid(
                &tag_key,
                format!(
                    "contains {bad:?}; allowed are letters, digits, spaces and + - = . _ : / @"
                ),
            ));
        }
        let lower = key.to_lowercase();
        if lower.starts_with("aws:") || lower.starts_with("spire-") {
            return Err(SettingsError::invalid(
                &tag_key,
                "the prefixes \"aws:\" and \"spire-\" are reserved",
            ));
        }
    }
    Ok(())
}

fn check_role_arn(arn: &str) -> Result<(), SettingsError> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let valid = parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "iam"
        && parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].chars().all(|c| c.is_ascii_digit())
        && parts[5]
            .strip_prefix("role/")
            .is_some_and(|name| !name.is_empty());
    if valid {
        Ok(())
    } else {
        Err(SettingsError::invalid(
            "assume_role_arn",
            format!(
                "{} is not an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)",
                echo(arn)
            ),
        ))
    }
}

fn check_sts_string(
    key: &str,
    value: &str,
    min: usize,
    max: usize,
    symbols: &str,
) -> Result<(), SettingsError> {
    let len = value.chars().count();
    if !(min..=max).contains(&len) {
        return Err(SettingsError::invalid(
            key,
            format!("must be {min} to {max} characters"),
        ));
    }
    if value
        .chars()
        .any(|c| !(c.is_ascii_alphanumeric() || c == '_' || symbols.contains(c)))
    {
        return Err(SettingsError::invalid(
            key,
            format!("allowed are letters, digits and _{symbols}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use keymanager_engine::CoreConfig;
    use keymanager_engine::kit::KmsConfig;
    use keymanager_engine::kit::server_identity::ServerIdSource;
    use keymanager_engine::settings::SettingValue;

    use super::*;
    use crate::AwsKmsBackend;

    fn settings(pairs: &[(&str, SettingValue)]) -> Settings {
        Settings::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    fn s(v: &str) -> SettingValue {
        SettingValue::String(v.into())
    }

    fn base() -> Vec<(&'static str, SettingValue)> {
        vec![
            ("region", s("us-east-1")),
            ("key_identifier_value", s("server-a")),
        ]
    }

    /// Parses through the registered factory, as the plugin does.
    fn parse(extra: &[(&'static str, SettingValue)]) -> Result<KmsConfig<AwsKmsBackend>, String> {
        let mut pairs = base();
        pairs.extend_from_slice(extra);
        parse_all(settings(&pairs))
    }

    fn parse_all(settings: Settings) -> Result<KmsConfig<AwsKmsBackend>, String> {
        let core = CoreConfig {
            trust_domain: "example.org".into(),
        };
        crate::AwsKmsFactory::new()
            .parse_all(settings, &core)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_configuration_uses_the_default_chain_and_alias_discovery() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.backend.credentials, Credentials::DefaultChain);
        assert_eq!(config.backend.discovery, Discovery::Alias);
        assert_eq!(config.server_id, ServerIdSource::Value("server-a".into()));
        assert!(config.warnings.is_empty());
    }

    #[test]
    fn region_is_required_and_checked() {
        let err = parse_all(settings(&[("key_identifier_value", s("a"))])).unwrap_err();
        assert!(err.starts_with("\"region\" is required"), "{err}");
        assert!(
            parse(&[("region", s("US East"))])
                .unwrap_err()
                .contains("not an AWS region name")
        );
    }

    #[test]
    fn static_credentials_must_come_in_pairs_and_never_show_in_debug() {
        let err = parse(&[("access_key_id", s("AKIAEXAMPLE"))]).unwrap_err();
        assert!(err.contains("\"secret_access_key\" is required"), "{err}");
        let err = parse(&[("secret_access_key", s("wJalrXUtnFEMIK7MDENG"))]).unwrap_err();
        assert!(err.contains("\"access_key_id\" is required"), "{err}");
        let config = parse(&[
            ("access_key_id", s("AKIAEXAMPLE")),
            ("secret_access_key", s("wJalrXUtnFEMIK7MDENG")),
        ])
        .unwrap();
        assert!(matches!(
            config.backend.credentials,
            Credentials::Static { .. }
        ));
        assert!(
            !format!("{config:?}").contains("wJalr"),
            "secret must be redacted"
        );
        assert!(
            !format!("{config:?}").contains("AKIAEXAMPLE"),
            "the access key id is not logged in full"
        );
    }

    #[test]
    fn identifier_values_follow_spires_rules() {
        assert!(check_identifier_value("server/a_b-1").is_ok());
        assert!(
            check_identifier_value(&"a".repeat(257))
                .unwrap_err()
                .contains("256")
        );
        assert!(check_identifier_value("a^b").unwrap_err().contains("'^'"));
        assert!(
            check_identifier_value("alias/aws/x")
                .unwrap_err()
                .contains("reserved")
        );
    }

    #[test]
    fn key_prefix_is_deprecated_and_maps_onto_the_identity() {
        let mut pairs = vec![
            ("region", s("us-east-1")),
            ("key_prefix", s("SPIRE_SERVER_KEY/")),
        ];
        let config = parse_all(settings(&pairs)).unwrap();
        assert_eq!(
            config.server_id,
            ServerIdSource::Value("SPIRE_SERVER_KEY".into())
        );
        assert!(config.warnings[0].contains("deprecated"));
        pairs.push(("key_identifier_value", s("x")));
        let err = parse_all(settings(&pairs)).unwrap_err().to_string();
        assert!(err.contains("cannot be combined"), "{err}");
    }

    #[test]
    fn key_tags_follow_kms_and_spire_limits() {
        let tags = |pairs: &[(&str, &str)]| {
            SettingValue::Map(pairs.iter().map(|(k, v)| (k.to_string(), s(v))).collect())
        };
        assert!(
            parse(&[(
                "key_tags",
                tags(&[("team", "pki"), ("cost center", "a+b=c@d:e/f")])
            )])
            .is_ok()
        );
        assert!(
            parse(&[("key_tags", tags(&[("aws:x", "y")]))])
                .unwrap_err()
                .contains("reserved")
        );
        assert!(
            parse(&[("key_tags", tags(&[("Spire-x", "y")]))])
                .unwrap_err()
                .contains("reserved")
        );
        assert!(
            parse(&[("key_tags", tags(&[("a", "b!")]))])
                .unwrap_err()
                .contains("'!'")
        );
        let long_key = "k".repeat(129);
        assert!(
            parse(&[("key_tags", tags(&[(long_key.as_str(), "v")]))])
                .unwrap_err()
                .contains("1 to 128")
        );
        let many: Vec<(String, String)> = (0..51).map(|i| (format!("t{i}"), "v".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert!(
            parse(&[("key_tags", tags(&many))])
                .unwrap_err()
                .contains("at most 50")
        );
    }

    #[test]
    fn assume_role_settings_are_validated_together() {
        let config = parse(&[
            (
                "assume_role_arn",
                s("arn:aws:iam::123456789012:role/spire-kms"),
            ),
            ("external_id", s("tenant-42")),
        ])
        .unwrap();
        let role = config.backend.assume_role.unwrap();
        assert_eq!(role.session_name, DEFAULT_ROLE_SESSION_NAME);
        assert!(!format!("{role:?}").contains("tenant-42"));
        assert!(
            parse(&[("assume_role_arn", s("arn:aws:iam::12345:role/x"))])
                .unwrap_err()
                .contains("not an IAM role ARN")
        );
        assert!(
            parse(&[("external_id", s("x1"))])
                .unwrap_err()
                .contains("\"assume_role_arn\" is required")
        );
        assert!(
            parse(&[
                (
                    "assume_role_arn",
                    s("arn:aws-us-gov:iam::123456789012:role/a/b")
                ),
                ("role_session_name", s("bad name")),
            ])
            .unwrap_err()
            .contains("role_session_name")
        );
    }

    #[test]
    fn endpoint_and_discovery_and_unknown_keys() {
        let config = parse(&[
            ("endpoint", s("http://127.0.0.1:4566")),
            ("enable_tag_based_key_discovery", SettingValue::Bool(true)),
        ])
        .unwrap();
        assert_eq!(config.backend.discovery, Discovery::Tags);
        assert_eq!(
            config.endpoint.as_ref().map(|e| e.as_str()),
            Some("http://127.0.0.1:4566")
        );
        assert!(
            parse(&[("endpoint", s("127.0.0.1:4566"))])
                .unwrap_err()
                .contains("must start with https://")
        );
        assert!(
            parse(&[("enable_tag_based_key_discovery", s("yes"))])
                .unwrap_err()
                .contains("boolean")
        );
        assert!(
            parse(&[("regoin", s("x"))])
                .unwrap_err()
                .contains("unknown key \"regoin\"")
        );
    }

    #[test]
    fn key_policy_file_must_be_a_json_object() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.json");
        std::fs::write(&path, r#"{"Version": "2012-10-17", "Statement": []}"#).unwrap();
        let config = parse(&[("key_policy_file", s(path.to_str().unwrap()))]).unwrap();
        assert!(
            config
                .backend
                .key_policy
                .unwrap()
                .text
                .contains("2012-10-17")
        );
        std::fs::write(&path, "[1]").unwrap();
        assert!(
            parse(&[("key_policy_file", s(path.to_str().unwrap()))])
                .unwrap_err()
                .contains("JSON object")
        );
        std::fs::write(&path, "{").unwrap();
        assert!(
            parse(&[("key_policy_file", s(path.to_str().unwrap()))])
                .unwrap_err()
                .contains("not JSON")
        );
        let missing = dir.path().join("missing.json");
        assert!(
            parse(&[("key_policy_file", s(missing.to_str().unwrap()))])
                .unwrap_err()
                .contains("cannot read")
        );
    }

    fn shared(pairs: &[(&str, &str)]) -> SettingValue {
        SettingValue::Map(pairs.iter().map(|(k, v)| (k.to_string(), s(v))).collect())
    }

    const TEMPLATE: (&str, &str) = (
        "alias_template",
        "alias/SPIRE_SHARED/{{ .TrustDomain }}/{{ .KeyID }}",
    );
    const REGEX: (&str, &str) = (
        "key_id_extraction_regex",
        "^alias/SPIRE_SHARED/[^/]+/([^/]+)$",
    );

    #[test]
    fn shared_keys_block_is_the_kits_with_an_alias_template() {
        let config = parse(&[("shared_keys", shared(&[TEMPLATE, REGEX]))]).unwrap();
        let shared_keys = config.backend.shared.unwrap();
        assert!(shared_keys.is_shared("JWT-Signer-A"));
        assert!(!shared_keys.is_shared("x509-CA-A"));
        assert_eq!(
            shared_keys.lock_lease,
            keymanager_engine::kit::shared::DEFAULT_LOCK_LEASE
        );
        let region = parse(&[(
            "shared_keys",
            shared(&[
                ("alias_template", "alias/s/{{ .Region }}/{{ .KeyID }}"),
                ("key_id_extraction_regex", "^alias/s/us-east-1/(.+)$"),
                ("shared_key_ids", "^(JWT|WIT)-Signer-"),
                ("reuse_window", "5m"),
                ("lock_lease", "30s"),
            ]),
        )])
        .unwrap()
        .backend
        .shared
        .unwrap();
        assert!(region.is_shared("WIT-Signer-B"));
        assert_eq!(region.lock_lease, Duration::from_secs(30));
    }

    #[test]
    fn shared_keys_errors_name_the_key_and_what_is_allowed() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[REGEX], "\"shared_keys.alias_template\" is required"),
            (
                &[("alias_template", "alias/x/{{ .Env }}/{{ .KeyID }}"), REGEX],
                "{{ .TrustDomain }}, {{ .Region }}, {{ .KeyID }}",
            ),
            (
                &[("alias_template", "alias/SPIRE_SERVER/{{ .KeyID }}"), REGEX],
                "choose another prefix",
            ),
            (
                &[
                    TEMPLATE,
                    ("key_id_extraction_regex", "^alias/(SPIRE_SHARED)/"),
                ],
                "finds \"SPIRE_SHARED\"",
            ),
            (
                &[TEMPLATE, ("key_id_extraction_regex", "(")],
                "does not compile",
            ),
            (&[TEMPLATE, REGEX, ("lock_lease", "5s")], "at least 10s"),
            (
                &[TEMPLATE, REGEX, ("reuse_window", "soon")],
                "shared_keys.reuse_window",
            ),
            (
                &[TEMPLATE, REGEX, ("shared_key_ids", "[")],
                "shared_keys.shared_key_ids",
            ),
            (
                &[TEMPLATE, REGEX, ("jwt_key_alias_template", "x")],
                "shared_keys.alias_template",
            ),
        ];
        for (pairs, expected) in cases {
            let err = parse(&[("shared_keys", shared(pairs))]).unwrap_err();
            assert!(err.contains(expected), "{pairs:?}: {err}");
        }
        let err = parse_all(settings(&[
            ("region", s("us-east-1")),
            ("shared_keys", shared(&[TEMPLATE, REGEX])),
        ]))
        .unwrap_err();
        assert!(
            err.contains("X509 CA and WIT keys stay per-server"),
            "{err}"
        );
    }
}
