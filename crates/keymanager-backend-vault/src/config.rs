//! `plugin_data` of the `hashicorp_vault` backend (the kit's shell reads
//! `key_identifier_file`, `key_identifier_value` and the lifecycle schedule).
//!
//! SPIRE's keys, same meaning: `vault_addr`, `namespace`, `transit_engine_path`,
//! `ca_cert_path`, `insecure_skip_verify` and exactly one of the blocks `token_auth`,
//! `cert_auth`, `approle_auth`, `k8s_auth`; an empty value falls back to SPIRE's environment
//! variables. One difference, on purpose: SPIRE lets a set environment variable override an
//! explicit value; here the explicit value wins and a warning names both. Ours:
//! `liveness_kv_mount` and `liveness_kv_prefix` (where liveness records live).

use std::path::PathBuf;

use keymanager_engine::kit::KmsSettings;
use keymanager_engine::kit::server_identity::check_value_chars;
use keymanager_engine::settings::{Secret, Settings, SettingsError, echo};
use keymanager_engine::{OnChange, SettingState};

/// The keys this backend reads itself.
pub const SETTING_KEYS: &[&str] = &[
    "vault_addr",
    "namespace",
    "transit_engine_path",
    "ca_cert_path",
    "insecure_skip_verify",
    "token_auth",
    "cert_auth",
    "approle_auth",
    "k8s_auth",
    "liveness_kv_mount",
    "liveness_kv_prefix",
];

/// The auth blocks; exactly one must be present.
const AUTH_BLOCKS: &[&str] = &["token_auth", "cert_auth", "approle_auth", "k8s_auth"];

/// SPIRE's default Transit mount.
pub const DEFAULT_TRANSIT_PATH: &str = "transit";
/// Where liveness records go under `liveness_kv_mount` unless `liveness_kv_prefix` says.
pub const DEFAULT_LIVENESS_PREFIX: &str = "kms-keymanager";

/// How this server logs in to Vault. `Debug` redacts every secret, and shows only the
/// start of an AppRole role id.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// A fixed token (`token_auth`): checked with `auth/token/lookup-self`, renewed when
    /// renewable; it cannot be replaced without a re-Configure.
    Token {
        /// The token.
        token: Secret,
    },
    /// `approle_auth`: `auth/<mount>/login {role_id, secret_id}`.
    AppRole {
        /// The auth mount.
        mount: String,
        /// The role id.
        role_id: String,
        /// The secret id.
        secret_id: Secret,
    },
    /// `cert_auth`: TLS client certificate, `auth/<mount>/login {name}`.
    Cert {
        /// The auth mount.
        mount: String,
        /// The role (`""`: any role whose CA matches).
        role: String,
        /// The client certificate chain and private key, PEM (read at Configure).
        identity: Secret,
        /// Where they were read from, for messages.
        paths: (PathBuf, PathBuf),
    },
    /// `k8s_auth`: `auth/<mount>/login {role, jwt}` with the service-account token read from
    /// `token_path` at every login (projected tokens rotate).
    Kubernetes {
        /// The auth mount.
        mount: String,
        /// The role.
        role: String,
        /// The token file.
        token_path: PathBuf,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token { .. } => f.write_str("Token { token: <redacted> }"),
            Self::AppRole { mount, role_id, .. } => {
                let shown: String = role_id.chars().take(4).collect();
                write!(
                    f,
                    "AppRole {{ mount: {mount:?}, role_id: \"{shown}…\", secret_id: <redacted> }}"
                )
            }
            Self::Cert {
                mount, role, paths, ..
            } => write!(
                f,
                "Cert {{ mount: {mount:?}, role: {role:?}, client_cert_path: {:?}, client_key_path: {:?} }}",
                paths.0, paths.1
            ),
            Self::Kubernetes {
                mount,
                role,
                token_path,
            } => write!(
                f,
                "Kubernetes {{ mount: {mount:?}, role: {role:?}, token_path: {token_path:?} }}"
            ),
        }
    }
}

impl Auth {
    /// The method's name in messages.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Token { .. } => "token",
            Self::AppRole { .. } => "approle",
            Self::Cert { .. } => "cert",
            Self::Kubernetes { .. } => "kubernetes",
        }
    }

    /// Whether a new token can be had without the operator (every method but a fixed token).
    pub fn can_login(&self) -> bool {
        !matches!(self, Self::Token { .. })
    }
}

/// Where this server keeps its liveness record: a KV version 2 mount and a path prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LivenessStore {
    /// The KV v2 mount (`secret`).
    pub mount: String,
    /// The prefix under it (`kms-keymanager`).
    pub prefix: String,
}

/// The `hashicorp_vault` backend's own validated settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaultSettings {
    /// The Vault address (`https://vault.example:8200`).
    pub address: String,
    /// The Vault Enterprise / HCP namespace, sent as `X-Vault-Namespace`.
    pub namespace: Option<String>,
    /// The Transit mount.
    pub transit_path: String,
    /// The CA certificates that replace the system roots (PEM), and their file.
    pub ca_cert: Option<(PathBuf, Vec<u8>)>,
    /// Skip TLS verification (warned about).
    pub insecure_skip_verify: bool,
    /// How to log in.
    pub auth: Auth,
    /// Liveness records, if enabled.
    pub liveness: Option<LivenessStore>,
}

/// Reads an environment variable; tests pass their own.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// An explicit value, else the environment variable. When both are set and differ, the
/// explicit value is used and a warning says so (SPIRE's built-in would use the variable).
fn explicit_or_env(
    explicit: Option<String>,
    key: &str,
    variable: &str,
    secret: bool,
    env: Env<'_>,
    warnings: &mut Vec<String>,
) -> Option<String> {
    let from_env = env(variable).filter(|v| !v.is_empty());
    match (explicit, from_env) {
        (Some(explicit), Some(from_env)) => {
            if explicit != from_env {
                let shown = if secret {
                    String::new()
                } else {
                    format!(" ({})", echo(&explicit))
                };
                warnings.push(format!(
                    "{variable} is set and differs from {key}; {key}{shown} is used (SPIRE's built-in hashicorp_vault would use {variable})"
                ));
            }
            Some(explicit)
        }
        (explicit, from_env) => explicit.or(from_env),
    }
}

/// A mount or path segment: letters, digits and `_ - . /`, no empty or `..` segment.
fn check_mount(key: &str, value: &str) -> Result<String, SettingsError> {
    let trimmed = value.trim_matches('/');
    let ok = !trimmed.is_empty()
        && trimmed
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        && trimmed.split('/').all(|s| !s.is_empty() && s != "..");
    if !ok {
        return Err(SettingsError::invalid(
            key,
            format!(
                "{} is not a Vault mount path (letters, digits, '_', '-', '.', '/' between non-empty segments)",
                echo(value)
            ),
        ));
    }
    Ok(trimmed.to_string())
}

fn read_file(key: &str, path: &str) -> Result<Vec<u8>, SettingsError> {
    std::fs::read(path)
        .map_err(|e| SettingsError::invalid(key, format!("cannot read {}: {e}", echo(path))))
}

fn check_pem_certificates(key: &str, path: &str, pem: &[u8]) -> Result<(), SettingsError> {
    match reqwest::Certificate::from_pem_bundle(pem) {
        Ok(certs) if !certs.is_empty() => Ok(()),
        _ => Err(SettingsError::invalid(
            key,
            format!("{} holds no PEM certificate", echo(path)),
        )),
    }
}

impl VaultSettings {
    /// [`KmsSettings::parse`] with the environment given (tests pass their own).
    pub fn parse_with_env(
        settings: &mut Settings,
        warnings: &mut Vec<String>,
        env: Env<'_>,
    ) -> Result<Self, SettingsError> {
        let explicit = settings.take_nonempty_string("vault_addr")?;
        let address = explicit_or_env(explicit, "vault_addr", "VAULT_ADDR", false, env, warnings)
            .ok_or_else(|| {
            SettingsError::missing(
                "vault_addr",
                "the Vault address, e.g. \"https://vault.example.org:8200\" (or set VAULT_ADDR)",
            )
        })?;
        let address = address.trim_end_matches('/').to_string();
        match reqwest::Url::parse(&address) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => {
                return Err(SettingsError::invalid(
                    "vault_addr",
                    format!(
                        "{} is not an http:// or https:// URL with a host",
                        echo(&address)
                    ),
                ));
            }
        }

        let explicit = settings.take_nonempty_string("namespace")?;
        let namespace = explicit_or_env(
            explicit,
            "namespace",
            "VAULT_NAMESPACE",
            false,
            env,
            warnings,
        )
        .map(|ns| check_mount("namespace", &ns))
        .transpose()?;

        let explicit = settings.take_nonempty_string("transit_engine_path")?;
        let transit_path = explicit_or_env(
            explicit,
            "transit_engine_path",
            "VAULT_TRANSIT_ENGINE_PATH",
            false,
            env,
            warnings,
        )
        .unwrap_or_else(|| DEFAULT_TRANSIT_PATH.to_string());
        let transit_path = check_mount("transit_engine_path", &transit_path)?;

        let explicit = settings.take_nonempty_string("ca_cert_path")?;
        let ca_cert = match explicit_or_env(
            explicit,
            "ca_cert_path",
            "VAULT_CACERT",
            false,
            env,
            warnings,
        ) {
            None => None,
            Some(path) => {
                let pem = read_file("ca_cert_path", &path)?;
                check_pem_certificates("ca_cert_path", &path, &pem)?;
                Some((PathBuf::from(path), pem))
            }
        };
        let insecure_skip_verify = settings.take_bool("insecure_skip_verify")?.unwrap_or(false);
        if insecure_skip_verify {
            warnings.push(
                "insecure_skip_verify = true: Vault's TLS certificate is not verified; anyone on the path can read the token and forge signatures".into(),
            );
        }

        let auth = parse_auth(settings, warnings, env)?;

        let liveness_prefix = settings.take_nonempty_string("liveness_kv_prefix")?;
        let liveness = match settings.take_nonempty_string("liveness_kv_mount")? {
            Some(mount) => Some(LivenessStore {
                mount: check_mount("liveness_kv_mount", &mount)?,
                prefix: check_mount(
                    "liveness_kv_prefix",
                    liveness_prefix
                        .as_deref()
                        .unwrap_or(DEFAULT_LIVENESS_PREFIX),
                )?,
            }),
            None if liveness_prefix.is_some() => {
                return Err(SettingsError::missing(
                    "liveness_kv_mount",
                    "liveness_kv_prefix only applies together with liveness_kv_mount",
                ));
            }
            None => None,
        };

        Ok(Self {
            address,
            namespace,
            transit_path,
            ca_cert,
            insecure_skip_verify,
            auth,
            liveness,
        })
    }
}

fn parse_auth(
    settings: &mut Settings,
    warnings: &mut Vec<String>,
    env: Env<'_>,
) -> Result<Auth, SettingsError> {
    let mut blocks = Vec::new();
    for name in AUTH_BLOCKS {
        if let Some(block) = settings.take_block(name)? {
            blocks.push((*name, block));
        }
    }
    let (name, mut block) = match blocks.len() {
        1 => blocks.remove(0),
        0 => {
            return Err(SettingsError::missing(
                "token_auth",
                "configure exactly one authentication block: token_auth, cert_auth, approle_auth or k8s_auth",
            ));
        }
        _ => {
            let names: Vec<&str> = blocks.iter().map(|(n, _)| *n).collect();
            return Err(SettingsError::invalid(
                names[1],
                format!(
                    "only one authentication block may be configured; found {}",
                    names.join(", ")
                ),
            ));
        }
    };
    let key = |k: &str| format!("{name}.{k}");
    let auth = match name {
        "token_auth" => {
            let explicit = block.take_secret(&key("token"))?;
            let token = explicit_or_env(
                explicit.map(|t| t.expose().to_string()),
                "token_auth.token",
                "VAULT_TOKEN",
                true,
                env,
                warnings,
            )
            .ok_or_else(|| {
                SettingsError::missing("token_auth.token", "set token or VAULT_TOKEN")
            })?;
            block.finish(&[&key("token")])?;
            Auth::Token {
                token: Secret::new(token),
            }
        }
        "approle_auth" => {
            let mount = block
                .take_nonempty_string(&key("approle_auth_mount_point"))?
                .unwrap_or_else(|| "approle".into());
            let explicit = block.take_nonempty_string(&key("approle_id"))?;
            let role_id = explicit_or_env(
                explicit,
                "approle_auth.approle_id",
                "VAULT_APPROLE_ID",
                false,
                env,
                warnings,
            )
            .ok_or_else(|| {
                SettingsError::missing("approle_auth.approle_id", "set it or VAULT_APPROLE_ID")
            })?;
            let explicit = block.take_secret(&key("approle_secret_id"))?;
            let secret_id = explicit_or_env(
                explicit.map(|t| t.expose().to_string()),
                "approle_auth.approle_secret_id",
                "VAULT_APPROLE_SECRET_ID",
                true,
                env,
                warnings,
            )
            .ok_or_else(|| {
                SettingsError::missing(
                    "approle_auth.approle_secret_id",
                    "set it or VAULT_APPROLE_SECRET_ID",
                )
            })?;
            block.finish(&[
                &key("approle_auth_mount_point"),
                &key("approle_id"),
                &key("approle_secret_id"),
            ])?;
            Auth::AppRole {
                mount: check_mount(&key("approle_auth_mount_point"), &mount)?,
                role_id,
                secret_id: Secret::new(secret_id),
            }
        }
        "cert_auth" => {
            let mount = block
                .take_nonempty_string(&key("cert_auth_mount_point"))?
                .unwrap_or_else(|| "cert".into());
            let role = block
                .take_string(&key("cert_auth_role_name"))?
                .unwrap_or_default();
            let explicit = block.take_nonempty_string(&key("client_cert_path"))?;
            let cert = explicit_or_env(
                explicit,
                "cert_auth.client_cert_path",
                "VAULT_CLIENT_CERT",
                false,
                env,
                warnings,
            );
            let explicit = block.take_nonempty_string(&key("client_key_path"))?;
            let private_key = explicit_or_env(
                explicit,
                "cert_auth.client_key_path",
                "VAULT_CLIENT_KEY",
                false,
                env,
                warnings,
            );
            block.finish(&[
                &key("cert_auth_mount_point"),
                &key("cert_auth_role_name"),
                &key("client_cert_path"),
                &key("client_key_path"),
            ])?;
            let (Some(cert), Some(private_key)) = (cert, private_key) else {
                return Err(SettingsError::missing(
                    "cert_auth.client_cert_path",
                    "cert auth needs client_cert_path and client_key_path (or VAULT_CLIENT_CERT and VAULT_CLIENT_KEY)",
                ));
            };
            let mut identity = read_file("cert_auth.client_cert_path", &cert)?;
            check_pem_certificates("cert_auth.client_cert_path", &cert, &identity)?;
            identity.push(b'\n');
            identity.extend(read_file("cert_auth.client_key_path", &private_key)?);
            let identity = String::from_utf8(identity).map_err(|_| {
                SettingsError::invalid("cert_auth.client_key_path", "is not a PEM file")
            })?;
            if reqwest::Identity::from_pem(identity.as_bytes()).is_err() {
                return Err(SettingsError::invalid(
                    "cert_auth.client_key_path",
                    format!(
                        "{} holds no PEM private key that reqwest can use with the certificate",
                        echo(&private_key)
                    ),
                ));
            }
            Auth::Cert {
                mount: check_mount(&key("cert_auth_mount_point"), &mount)?,
                role,
                identity: Secret::new(identity),
                paths: (PathBuf::from(cert), PathBuf::from(private_key)),
            }
        }
        _ => {
            let mount = block
                .take_nonempty_string(&key("k8s_auth_mount_point"))?
                .unwrap_or_else(|| "kubernetes".into());
            let role = block
                .take_nonempty_string(&key("k8s_auth_role_name"))?
                .ok_or_else(|| {
                    SettingsError::missing(
                        "k8s_auth.k8s_auth_role_name",
                        "the Vault role to log in as",
                    )
                })?;
            let token_path = block
                .take_nonempty_string(&key("token_path"))?
                .ok_or_else(|| {
                    SettingsError::missing(
                        "k8s_auth.token_path",
                        "the service account token file, e.g. /var/run/secrets/tokens/vault",
                    )
                })?;
            block.finish(&[
                &key("k8s_auth_mount_point"),
                &key("k8s_auth_role_name"),
                &key("token_path"),
            ])?;
            Auth::Kubernetes {
                mount: check_mount(&key("k8s_auth_mount_point"), &mount)?,
                role,
                token_path: PathBuf::from(token_path),
            }
        }
    };
    Ok(auth)
}

/// Key names are `<server id>-<uuid>-<key id>`: the id becomes part of a URL path.
pub fn check_server_id(value: &str) -> Result<(), String> {
    check_value_chars(
        value,
        256,
        &['_', '-', '.'],
        Some("it starts every Transit key name"),
    )
}

impl KmsSettings for VaultSettings {
    const SETTING_KEYS: &'static [&'static str] = SETTING_KEYS;

    fn parse(settings: &mut Settings, warnings: &mut Vec<String>) -> Result<Self, SettingsError> {
        Self::parse_with_env(settings, warnings, &process_env)
    }

    fn check_server_id(value: &str) -> Result<(), String> {
        check_server_id(value)
    }

    fn store(&self) -> String {
        match &self.namespace {
            Some(ns) => format!(
                "Vault {} namespace {ns} Transit mount {}",
                self.address, self.transit_path
            ),
            None => format!("Vault {} Transit mount {}", self.address, self.transit_path),
        }
    }

    /// Credentials and TLS trust apply at once (a new client logs in); where liveness
    /// records live at the next start.
    fn describe(&self) -> Vec<SettingState> {
        let auth = match &self.auth {
            Auth::Token { token } => vec![token.expose().as_bytes().to_vec()],
            Auth::AppRole {
                mount,
                role_id,
                secret_id,
            } => vec![
                mount.as_bytes().to_vec(),
                role_id.as_bytes().to_vec(),
                secret_id.expose().as_bytes().to_vec(),
            ],
            Auth::Cert {
                mount,
                role,
                identity,
                ..
            } => vec![
                mount.as_bytes().to_vec(),
                role.as_bytes().to_vec(),
                identity.expose().as_bytes().to_vec(),
            ],
            Auth::Kubernetes {
                mount,
                role,
                token_path,
            } => vec![
                mount.as_bytes().to_vec(),
                role.as_bytes().to_vec(),
                token_path.to_string_lossy().as_bytes().to_vec(),
            ],
        };
        let mut parts: Vec<&[u8]> = vec![self.auth.method().as_bytes()];
        parts.extend(auth.iter().map(Vec::as_slice));
        vec![
            SettingState::secret(
                "token_auth/cert_auth/approle_auth/k8s_auth",
                &parts,
                OnChange::Runtime,
            ),
            SettingState::secret(
                "ca_cert_path",
                &[self.ca_cert.as_ref().map_or(&b""[..], |(_, pem)| pem)],
                OnChange::Runtime,
            ),
            SettingState::new(
                "insecure_skip_verify",
                self.insecure_skip_verify,
                OnChange::Runtime,
            ),
            SettingState::new(
                "liveness_kv_mount/liveness_kv_prefix",
                &self.liveness,
                OnChange::NextStart,
            ),
        ]
    }

    fn problems(&self) -> Vec<String> {
        match &self.auth {
            Auth::Kubernetes { token_path, .. } if !token_path.is_file() => vec![format!(
                "k8s_auth.token_path {} does not exist (it is read at every login)",
                token_path.display()
            )],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use keymanager_engine::CoreConfig;
    use keymanager_engine::kit::KmsConfig;
    use keymanager_engine::kit::server_identity::ServerIdSource;
    use keymanager_engine::settings::SettingValue;

    use super::*;
    use crate::VaultBackend;

    fn s(v: &str) -> SettingValue {
        SettingValue::String(v.into())
    }

    fn block(pairs: &[(&str, &str)]) -> SettingValue {
        SettingValue::Map(pairs.iter().map(|(k, v)| (k.to_string(), s(v))).collect())
    }

    fn settings(pairs: &[(&str, SettingValue)]) -> Settings {
        Settings::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    fn parse_env(
        pairs: &[(&str, SettingValue)],
        env: &[(&str, &str)],
    ) -> Result<(VaultSettings, Vec<String>), String> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| env.get(name).cloned();
        let mut warnings = Vec::new();
        let mut settings = settings(pairs);
        let parsed = VaultSettings::parse_with_env(&mut settings, &mut warnings, &lookup)
            .map_err(|e| e.to_string())?;
        settings.finish(SETTING_KEYS).map_err(|e| e.to_string())?;
        Ok((parsed, warnings))
    }

    fn token_auth() -> (&'static str, SettingValue) {
        ("token_auth", block(&[("token", "s.secret-token")]))
    }

    /// Through the registered factory, as the plugin parses.
    fn parse_all(pairs: &[(&str, SettingValue)]) -> Result<KmsConfig<VaultBackend>, String> {
        let core = CoreConfig {
            trust_domain: "example.org".into(),
        };
        crate::VaultFactory::new()
            .parse_all(settings(pairs), &core)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn spires_keys_parse_with_their_defaults() {
        let config = parse_all(&[
            ("vault_addr", s("https://vault.example.org:8200/")),
            ("key_identifier_value", s("server-a")),
            token_auth(),
        ])
        .expect("valid");
        let vault = &config.backend;
        assert_eq!(vault.address, "https://vault.example.org:8200");
        assert_eq!(vault.transit_path, "transit");
        assert_eq!(vault.namespace, None);
        assert_eq!(vault.liveness, None);
        assert!(!vault.insecure_skip_verify);
        assert_eq!(config.server_id, ServerIdSource::Value("server-a".into()));
        assert!(matches!(vault.auth, Auth::Token { .. }));
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let (parsed, _) = parse_env(
            &[
                ("vault_addr", s("http://127.0.0.1:8200")),
                (
                    "approle_auth",
                    block(&[
                        ("approle_id", "role-1"),
                        ("approle_secret_id", "very-secret-id"),
                    ]),
                ),
            ],
            &[],
        )
        .expect("valid");
        let shown = format!("{parsed:?}");
        assert!(!shown.contains("very-secret-id"), "{shown}");
        assert!(
            !shown.contains("role-1"),
            "only the role id's start: {shown}"
        );
        let (parsed, _) = parse_env(
            &[("vault_addr", s("http://127.0.0.1:8200")), token_auth()],
            &[],
        )
        .expect("valid");
        assert!(!format!("{parsed:?}").contains("s.secret-token"));
    }

    #[test]
    fn exactly_one_auth_block_is_accepted() {
        let addr = ("vault_addr", s("http://127.0.0.1:8200"));
        let none = parse_env(std::slice::from_ref(&addr), &[]).expect_err("no auth");
        assert!(
            none.contains("token_auth, cert_auth, approle_auth or k8s_auth"),
            "{none}"
        );
        let two = parse_env(
            &[
                addr.clone(),
                token_auth(),
                (
                    "approle_auth",
                    block(&[("approle_id", "r"), ("approle_secret_id", "x")]),
                ),
            ],
            &[],
        )
        .expect_err("two blocks");
        assert!(two.contains("only one authentication block"), "{two}");
        assert!(two.contains("token_auth, approle_auth"), "{two}");
        let unknown = parse_env(
            &[
                addr,
                ("token_auth", block(&[("token", "t"), ("tokn", "x")])),
            ],
            &[],
        )
        .expect_err("unknown key in a block");
        assert!(unknown.contains("token_auth.tokn"), "{unknown}");
    }

    #[test]
    fn empty_blocks_read_spires_environment_variables() {
        let (parsed, warnings) = parse_env(
            &[("token_auth", block(&[]))],
            &[
                ("VAULT_ADDR", "https://env.example:8200"),
                ("VAULT_TOKEN", "env-token"),
                ("VAULT_NAMESPACE", "team-a"),
                ("VAULT_TRANSIT_ENGINE_PATH", "spire-transit"),
            ],
        )
        .expect("valid");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(parsed.address, "https://env.example:8200");
        assert_eq!(parsed.namespace.as_deref(), Some("team-a"));
        assert_eq!(parsed.transit_path, "spire-transit");
        assert_eq!(
            parsed.auth,
            Auth::Token {
                token: Secret::new("env-token".into())
            }
        );
        let (parsed, _) = parse_env(
            &[
                ("vault_addr", s("http://v:8200")),
                ("approle_auth", block(&[])),
            ],
            &[
                ("VAULT_APPROLE_ID", "env-role"),
                ("VAULT_APPROLE_SECRET_ID", "env-secret"),
            ],
        )
        .expect("valid");
        assert!(matches!(
            parsed.auth,
            Auth::AppRole { ref mount, ref role_id, .. } if mount == "approle" && role_id == "env-role"
        ));
        let missing = parse_env(
            &[
                ("vault_addr", s("http://v:8200")),
                ("token_auth", block(&[])),
            ],
            &[],
        )
        .expect_err("no token anywhere");
        assert!(missing.contains("token_auth.token"), "{missing}");
    }

    #[test]
    fn explicit_values_win_over_the_environment_with_a_warning_that_hides_secrets() {
        let (parsed, warnings) = parse_env(
            &[("vault_addr", s("https://explicit:8200")), token_auth()],
            &[
                ("VAULT_ADDR", "https://env:8200"),
                ("VAULT_TOKEN", "env-token-value"),
            ],
        )
        .expect("valid");
        assert_eq!(parsed.address, "https://explicit:8200");
        assert_eq!(
            parsed.auth,
            Auth::Token {
                token: Secret::new("s.secret-token".into())
            }
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("VAULT_ADDR is set and differs from vault_addr"));
        assert!(warnings[0].contains("https://explicit:8200"));
        assert!(warnings[1].contains("VAULT_TOKEN"));
        assert!(
            warnings
                .iter()
                .all(|w| !w.contains("s.secret-token") && !w.contains("env-token-value")),
            "{warnings:?}"
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let cases: Vec<(Vec<(&str, SettingValue)>, &str)> = vec![
            (vec![token_auth()], "vault_addr"),
            (
                vec![("vault_addr", s("vault:8200")), token_auth()],
                "not an http:// or https:// URL",
            ),
            (
                vec![
                    ("vault_addr", s("http://v")),
                    ("transit_engine_path", s("a/../b")),
                    token_auth(),
                ],
                "transit_engine_path",
            ),
            (
                vec![
                    ("vault_addr", s("http://v")),
                    ("liveness_kv_prefix", s("p")),
                    token_auth(),
                ],
                "liveness_kv_mount",
            ),
            (
                vec![
                    ("vault_addr", s("http://v")),
                    ("ca_cert_path", s("/nonexistent/ca.pem")),
                    token_auth(),
                ],
                "ca_cert_path",
            ),
            (
                vec![
                    ("vault_addr", s("http://v")),
                    ("k8s_auth", block(&[("token_path", "/t")])),
                ],
                "k8s_auth.k8s_auth_role_name",
            ),
            (
                vec![("vault_addr", s("http://v")), ("cert_auth", block(&[]))],
                "cert_auth.client_cert_path",
            ),
        ];
        for (pairs, wanted) in cases {
            let error = parse_env(&pairs, &[]).expect_err(wanted);
            assert!(error.contains(wanted), "{wanted}: {error}");
        }
        assert!(check_server_id("srv-a_1.x").is_ok());
        assert!(check_server_id("srv/a").unwrap_err().contains("'/'"));
    }

    #[test]
    fn liveness_records_default_their_prefix() {
        let (parsed, _) = parse_env(
            &[
                ("vault_addr", s("http://v")),
                ("liveness_kv_mount", s("/secret/")),
                token_auth(),
            ],
            &[],
        )
        .expect("valid");
        assert_eq!(
            parsed.liveness,
            Some(LivenessStore {
                mount: "secret".into(),
                prefix: DEFAULT_LIVENESS_PREFIX.into()
            })
        );
    }
}
