//! `plugin_data` of the `azure_key_vault` backend (the kit's shell reads
//! `key_identifier_file`, `key_identifier_value` and the lifecycle schedule).
//!
//! SPIRE's keys, same meaning: `key_vault_uri`, and `tenant_id`, `subscription_id`,
//! `app_id`, `app_secret` (any set: all four required, a client-secret credential;
//! `subscription_id` is required but unused, as in SPIRE). SPIRE's removed `use_msi` and
//! `key_metadata_file` are accepted with a warning that they do nothing. Ours:
//! `protection_level`, `purge_deleted_keys`, `ca_cert_path`.

use std::path::PathBuf;
use std::time::Duration;

use keymanager_engine::kit::KmsSettings;
use keymanager_engine::lifecycle::LifecycleSchedule;
use keymanager_engine::settings::{Secret, Settings, SettingsError, echo};
use keymanager_engine::{OnChange, SettingState};

/// The keys this backend reads itself.
pub const SETTING_KEYS: &[&str] = &[
    "key_vault_uri",
    "tenant_id",
    "subscription_id",
    "app_id",
    "app_secret",
    "use_msi",
    "key_metadata_file",
    "protection_level",
    "purge_deleted_keys",
    "ca_cert_path",
];

/// The four client-secret keys, in the order SPIRE checks them.
const CLIENT_SECRET_KEYS: [&str; 4] = ["tenant_id", "subscription_id", "app_id", "app_secret"];

/// Where key material lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// Software-protected keys (`EC`, `RSA`): Key Vault Standard.
    Software,
    /// HSM-protected keys (`EC-HSM`, `RSA-HSM`): Key Vault Premium or Managed HSM.
    Hsm,
}

/// A client-secret credential from `plugin_data`. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSecret {
    /// The Entra tenant.
    pub tenant_id: String,
    /// The application (client) id.
    pub app_id: String,
    /// The secret.
    pub secret: Secret,
}

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSecret")
            .field("tenant_id", &self.tenant_id)
            .field("app_id", &self.app_id)
            .field("app_secret", &"<redacted>")
            .finish()
    }
}

/// The `azure_key_vault` backend's own validated settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AzureSettings {
    /// `https://<name>.vault.azure.net` or `https://<name>.managedhsm.azure.net`, without a
    /// trailing slash.
    pub vault_uri: String,
    /// The client secret of `plugin_data`; `None`: SPIRE's default chain (environment,
    /// workload identity, managed identity).
    pub client_secret: Option<ClientSecret>,
    /// Software or HSM keys.
    pub protection: Protection,
    /// Purge this server's soft-deleted keys at each sweep.
    pub purge_deleted_keys: bool,
    /// CA certificates trusted in addition to the system roots (PEM), and their file.
    pub ca_cert: Option<(PathBuf, Vec<u8>)>,
}

impl AzureSettings {
    /// Whether the URI names a Managed HSM (its keys are always HSM keys).
    pub fn is_managed_hsm(&self) -> bool {
        is_managed_hsm(&self.vault_uri)
    }
}

fn is_managed_hsm(uri: &str) -> bool {
    host_of(uri).is_some_and(|host| host.split('.').nth(1) == Some("managedhsm"))
}

/// The host (without port) of an `https://` URI.
pub fn host_of(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => authority,
    };
    (!host.is_empty()).then_some(host)
}

/// `key_vault_uri`: https, a host, no credentials, query or fragment; a trailing slash or
/// path is cut (the SDKs take the vault's root).
fn parse_vault_uri(text: &str) -> Result<String, String> {
    if !text.starts_with("https://") {
        return Err(format!(
            "{} must start with https:// (Key Vault refuses bearer tokens over plain http)",
            echo(text)
        ));
    }
    let authority = text["https://".len()..].split('/').next().unwrap_or("");
    if authority.contains('@')
        || text.contains('?')
        || text.contains('#')
        || text.chars().any(char::is_whitespace)
    {
        return Err(format!(
            "{} must be a plain https://host[:port] URI",
            echo(text)
        ));
    }
    if host_of(text).is_none() || authority.ends_with(':') {
        return Err(format!("{} has no valid host", echo(text)));
    }
    if let Some((_, port)) = authority.rsplit_once(':')
        && port.parse::<u16>().is_err()
    {
        return Err(format!("{} has an invalid port", echo(text)));
    }
    Ok(format!("https://{authority}"))
}

impl AzureSettings {
    fn parse_settings(
        settings: &mut Settings,
        warnings: &mut Vec<String>,
    ) -> Result<Self, SettingsError> {
        let vault_uri = settings
            .take_nonempty_string("key_vault_uri")?
            .ok_or_else(|| {
                SettingsError::missing(
                    "key_vault_uri",
                    "the Key Vault or Managed HSM URI, e.g. https://my-vault.vault.azure.net",
                )
            })?;
        let vault_uri = parse_vault_uri(&vault_uri)
            .map_err(|reason| SettingsError::invalid("key_vault_uri", reason))?;

        let tenant_id = settings.take_nonempty_string("tenant_id")?;
        let subscription_id = settings.take_nonempty_string("subscription_id")?;
        let app_id = settings.take_nonempty_string("app_id")?;
        let app_secret = settings.take_secret("app_secret")?;
        let any = tenant_id.is_some()
            || subscription_id.is_some()
            || app_id.is_some()
            || app_secret.is_some();
        let client_secret = if any {
            let present = [
                tenant_id.is_some(),
                subscription_id.is_some(),
                app_id.is_some(),
                app_secret.is_some(),
            ];
            if let Some(missing) = CLIENT_SECRET_KEYS
                .iter()
                .zip(present)
                .find_map(|(key, set)| (!set).then_some(*key))
            {
                return Err(SettingsError::missing(
                    missing,
                    "tenant_id, subscription_id, app_id and app_secret go together (a client-secret credential); set all four, or none to use the environment, workload identity or managed identity",
                ));
            }
            match (tenant_id, app_id, app_secret) {
                (Some(tenant_id), Some(app_id), Some(secret)) => Some(ClientSecret {
                    tenant_id,
                    app_id,
                    secret,
                }),
                _ => None,
            }
        } else {
            None
        };

        for removed in ["use_msi", "key_metadata_file"] {
            if settings.contains(removed) {
                // Taken whatever its type: SPIRE ignores it, so do we (with a word).
                let _ = settings.take_string(removed);
                let _ = settings.take_bool(removed);
                warnings.push(format!(
                    "{removed} was removed from SPIRE's azure_key_vault in 1.10 and does nothing; remove it (credentials come from tenant_id/app_id/app_secret or the environment's chain)"
                ));
            }
        }

        let managed_hsm = is_managed_hsm(&vault_uri);
        let protection = match settings
            .take_nonempty_string("protection_level")?
            .as_deref()
        {
            None if managed_hsm => Protection::Hsm,
            None | Some("software") if !managed_hsm => Protection::Software,
            Some("hsm") => Protection::Hsm,
            Some("software") => {
                return Err(SettingsError::invalid(
                    "protection_level",
                    "\"software\" is not possible on a Managed HSM (its keys are HSM keys); use \"hsm\" or leave it unset",
                ));
            }
            Some(other) => {
                return Err(SettingsError::invalid(
                    "protection_level",
                    format!("{} is not one of \"software\", \"hsm\"", echo(other)),
                ));
            }
            None => Protection::Software,
        };
        let purge_deleted_keys = settings.take_bool("purge_deleted_keys")?.unwrap_or(false);
        let ca_cert = match settings.take_nonempty_string("ca_cert_path")? {
            None => None,
            Some(path) => {
                let pem = std::fs::read(&path).map_err(|e| {
                    SettingsError::invalid("ca_cert_path", format!("cannot read {path}: {e}"))
                })?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(SettingsError::invalid(
                        "ca_cert_path",
                        format!("{path} holds no PEM certificate"),
                    ));
                }
                Some((PathBuf::from(path), pem))
            }
        };
        Ok(Self {
            vault_uri,
            client_secret,
            protection,
            purge_deleted_keys,
            ca_cert,
        })
    }
}

/// SPIRE's rule for `key_identifier_value`: at most 256 characters (it becomes a tag value,
/// whose limit is 256).
pub fn check_server_id(value: &str) -> Result<(), String> {
    if value.chars().count() > 256 {
        return Err(format!(
            "is {} characters long; the maximum is 256 (it is stored in the spire-server-id tag)",
            value.chars().count()
        ));
    }
    Ok(())
}

impl KmsSettings for AzureSettings {
    const SETTING_KEYS: &'static [&'static str] = SETTING_KEYS;

    fn parse(settings: &mut Settings, warnings: &mut Vec<String>) -> Result<Self, SettingsError> {
        Self::parse_settings(settings, warnings)
    }

    fn check_server_id(value: &str) -> Result<(), String> {
        check_server_id(value)
    }

    /// SPIRE's `azure_key_vault`: stamp every 6 hours, sweep every 48, stale after 14 days.
    fn default_schedule() -> LifecycleSchedule {
        LifecycleSchedule {
            sweep_every: Duration::from_secs(48 * 3600),
            ..LifecycleSchedule::default()
        }
    }

    fn store(&self) -> String {
        format!("Key Vault {}", self.vault_uri)
    }

    /// Credentials and TLS trust apply at once (a new client); the protection level to the
    /// next key created; purging at the next sweep.
    fn describe(&self) -> Vec<SettingState> {
        let credential: Vec<&[u8]> = match &self.client_secret {
            Some(c) => vec![
                c.tenant_id.as_bytes(),
                c.app_id.as_bytes(),
                c.secret.expose().as_bytes(),
            ],
            None => vec![b"default chain"],
        };
        vec![
            SettingState::secret(
                "tenant_id/subscription_id/app_id/app_secret",
                &credential,
                OnChange::Runtime,
            ),
            SettingState::secret(
                "ca_cert_path",
                &[self.ca_cert.as_ref().map_or(&[][..], |(_, pem)| pem)],
                OnChange::Runtime,
            ),
            SettingState::new("protection_level", self.protection, OnChange::Runtime),
            SettingState::new(
                "purge_deleted_keys",
                self.purge_deleted_keys,
                OnChange::Runtime,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use keymanager_engine::CoreConfig;
    use keymanager_engine::settings::SettingValue;

    use super::*;

    fn settings(pairs: &[(&str, SettingValue)]) -> Settings {
        Settings::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    fn s(v: &str) -> SettingValue {
        SettingValue::String(v.to_string())
    }

    fn parse(pairs: &[(&str, SettingValue)]) -> Result<(AzureSettings, Vec<String>), String> {
        let mut warnings = Vec::new();
        AzureSettings::parse_settings(&mut settings(pairs), &mut warnings)
            .map(|s| (s, warnings))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_vault_uri_is_required_and_must_be_https() {
        let err = parse(&[]).unwrap_err();
        assert!(err.contains("key_vault_uri"), "{err}");
        for bad in [
            "http://v.vault.azure.net",
            "v.vault.azure.net",
            "https://",
            "https://u:p@v.vault.azure.net",
            "https://v.vault.azure.net/?x",
            "https://v.vault.azure.net:port",
        ] {
            assert!(parse(&[("key_vault_uri", s(bad))]).is_err(), "{bad}");
        }
        let (ok, _) = parse(&[("key_vault_uri", s("https://v.vault.azure.net/"))]).unwrap();
        assert_eq!(ok.vault_uri, "https://v.vault.azure.net");
        assert_eq!(ok.protection, Protection::Software);
        assert!(!ok.purge_deleted_keys);
        let (ok, _) = parse(&[("key_vault_uri", s("https://127.0.0.1:8443"))]).unwrap();
        assert_eq!(ok.vault_uri, "https://127.0.0.1:8443");
    }

    #[test]
    fn a_managed_hsm_implies_hsm_keys() {
        let (hsm, _) = parse(&[("key_vault_uri", s("https://h.managedhsm.azure.net"))]).unwrap();
        assert!(hsm.is_managed_hsm());
        assert_eq!(hsm.protection, Protection::Hsm);
        let err = parse(&[
            ("key_vault_uri", s("https://h.managedhsm.azure.net")),
            ("protection_level", s("software")),
        ])
        .unwrap_err();
        assert!(err.contains("protection_level"), "{err}");
        let (premium, _) = parse(&[
            ("key_vault_uri", s("https://v.vault.azure.net")),
            ("protection_level", s("hsm")),
        ])
        .unwrap();
        assert_eq!(premium.protection, Protection::Hsm);
        let err = parse(&[
            ("key_vault_uri", s("https://v.vault.azure.net")),
            ("protection_level", s("HSM!")),
        ])
        .unwrap_err();
        assert!(err.contains("\"software\", \"hsm\""), "{err}");
    }

    #[test]
    fn the_four_client_secret_keys_go_together_and_the_secret_is_redacted() {
        let uri = ("key_vault_uri", s("https://v.vault.azure.net"));
        let err = parse(&[uri.clone(), ("app_id", s("a"))]).unwrap_err();
        assert!(err.contains("\"tenant_id\" is required"), "{err}");
        let err = parse(&[
            uri.clone(),
            ("tenant_id", s("t")),
            ("app_id", s("a")),
            ("app_secret", s("hunter2")),
        ])
        .unwrap_err();
        assert!(err.contains("subscription_id"), "{err}");
        assert!(!err.contains("hunter2"));
        let (ok, _) = parse(&[
            uri,
            ("tenant_id", s("t")),
            ("subscription_id", s("sub")),
            ("app_id", s("a")),
            ("app_secret", s("hunter2")),
        ])
        .unwrap();
        let c = ok.client_secret.clone().expect("client secret");
        assert_eq!((c.tenant_id.as_str(), c.app_id.as_str()), ("t", "a"));
        assert_eq!(c.secret.expose(), "hunter2");
        let shown = format!("{ok:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn removed_keys_are_accepted_with_a_warning() {
        let (_, warnings) = parse(&[
            ("key_vault_uri", s("https://v.vault.azure.net")),
            ("use_msi", SettingValue::Bool(true)),
            ("key_metadata_file", s("/x")),
        ])
        .unwrap();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().all(|w| w.contains("does nothing")));
    }

    #[test]
    fn the_server_id_and_the_schedule_follow_spire() {
        assert!(check_server_id(&"x".repeat(256)).is_ok());
        assert!(check_server_id(&"x".repeat(257)).is_err());
        let config = crate::AzureFactory::new()
            .parse_all(
                settings(&[
                    ("key_vault_uri", s("https://v.vault.azure.net")),
                    ("key_identifier_value", s("srv a/with any chars")),
                ]),
                &CoreConfig {
                    trust_domain: "example.org".into(),
                },
            )
            .expect("valid");
        assert_eq!(config.schedule.stamp_every, Duration::from_secs(6 * 3600));
        assert_eq!(config.schedule.sweep_every, Duration::from_secs(48 * 3600));
        assert_eq!(
            config.schedule.policy.stale_after,
            Duration::from_secs(14 * 86400)
        );
    }

    #[test]
    fn ca_cert_path_must_hold_pem() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "nothing").unwrap();
        let err = parse(&[
            ("key_vault_uri", s("https://v.vault.azure.net")),
            ("ca_cert_path", s(&bad.display().to_string())),
        ])
        .unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
    }
}
