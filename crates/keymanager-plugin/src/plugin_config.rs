//! The whole `plugin_data`: the keys every backend shares, then the backend's own keys.

use std::net::SocketAddr;
use std::path::PathBuf;

use keymanager_engine::settings::{Settings, SettingsError, echo};
use keymanager_engine::{BackendConfig, BackendFactory, CoreConfig, OnChange, SettingState};

use crate::hcl_settings;
use crate::logging::LogLevel;

/// Keys read by the runtime itself, whatever the backend.
pub const COMMON_KEYS: &[&str] = &[
    "backend",
    "log_level",
    "max_keys",
    "max_signs_per_second",
    "adaptive_rate_limit",
    "metrics_listen",
    "audit_log",
    "migrate_from",
];
/// The backend used when `plugin_data` names none: the embedded software default.
pub const DEFAULT_BACKEND: &str = "disk";

/// A validated plugin configuration.
#[derive(Debug)]
pub struct PluginConfig {
    /// SPIRE's core configuration.
    pub core: CoreConfig,
    /// The selected backend's name.
    pub backend_name: &'static str,
    /// Plugin log level.
    pub log_level: LogLevel,
    /// Cap on distinct key ids this server may hold (`None`: unlimited).
    pub max_keys: Option<usize>,
    /// Client-side SignData rate limit (`None`: unlimited).
    pub max_signs_per_second: Option<f64>,
    /// Adaptive sign-rate control (learned from the store's throttling); on unless `false`.
    pub adaptive_rate_limit: bool,
    /// Where `/metrics` is served (`None`: no endpoint).
    pub metrics_listen: Option<SocketAddr>,
    /// The audit log file (`None`: no audit log).
    pub audit_log: Option<PathBuf>,
    /// The backend's own settings.
    pub backend: Box<dyn BackendConfig>,
    /// Hand-over mode: the old store, served read-only for the ids the backend lacks.
    pub migrate_from: Option<MigrateFrom>,
}

/// The `migrate_from { backend = "…" … }` block: another backend's whole configuration.
#[derive(Debug)]
pub struct MigrateFrom {
    /// The old store's backend name.
    pub backend_name: &'static str,
    /// Its settings, parsed by its own factory.
    pub backend: Box<dyn BackendConfig>,
}

impl MigrateFrom {
    /// The block's state for re-Configure: any change applies at the next start (the
    /// running hand-over keeps the store it opened).
    fn setting(this: Option<&Self>) -> SettingState {
        let value = this.map(|m| {
            let settings: Vec<String> = m
                .backend
                .settings()
                .into_iter()
                .map(|s| format!("{}={}", s.key, s.value))
                .collect();
            format!("{} {}", m.backend.identity(), settings.join(" "))
        });
        SettingState::new("migrate_from", value, OnChange::NextStart)
    }
}

impl PluginConfig {
    /// Every setting with what a change at run time means: the runtime's own (all applied
    /// at once) and the backend's.
    pub fn settings(&self) -> Vec<SettingState> {
        let mut states = vec![
            SettingState::new("log_level", self.log_level, OnChange::Runtime),
            SettingState::new("max_keys", self.max_keys, OnChange::Runtime),
            SettingState::new(
                "max_signs_per_second",
                self.max_signs_per_second,
                OnChange::Runtime,
            ),
            SettingState::new(
                "adaptive_rate_limit",
                self.adaptive_rate_limit,
                OnChange::Runtime,
            ),
            SettingState::new("metrics_listen", self.metrics_listen, OnChange::Runtime),
            SettingState::new("audit_log", &self.audit_log, OnChange::Runtime),
        ];
        states.extend(self.backend.settings());
        states.push(MigrateFrom::setting(self.migrate_from.as_ref()));
        states
    }

    /// Problems Validate reports: the backend's, then the `migrate_from` store's.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = self.backend.problems();
        if let Some(old) = &self.migrate_from {
            problems.extend(
                old.backend
                    .problems()
                    .into_iter()
                    .map(|p| format!("migrate_from: {p}")),
            );
        }
        problems
    }

    /// The engine options this configuration asks for.
    pub fn engine_options(&self) -> keymanager_engine::EngineOptions {
        keymanager_engine::EngineOptions {
            max_keys: self.max_keys,
            max_signs_per_second: self.max_signs_per_second,
            adaptive_rate_limit: self.adaptive_rate_limit,
            ..keymanager_engine::EngineOptions::default()
        }
    }
}

/// Parses and validates `plugin_data` without side effects.
pub fn parse_plugin_config(
    backends: &[&'static dyn BackendFactory],
    core: Option<CoreConfig>,
    hcl_text: &str,
) -> Result<PluginConfig, SettingsError> {
    let core = validate_core(core)?;
    let mut settings = hcl_settings::parse(hcl_text)?;
    let backend_name = settings
        .take_nonempty_string("backend")?
        .unwrap_or_else(|| DEFAULT_BACKEND.to_string());
    let factory = backends
        .iter()
        .find(|f| f.name() == backend_name)
        .ok_or_else(|| {
            let names: Vec<&str> = backends.iter().map(|f| f.name()).collect();
            SettingsError::invalid(
                "backend",
                format!(
                    "unknown backend {}; available: {}",
                    echo(&backend_name),
                    names.join(", ")
                ),
            )
        })?;
    let log_level = match settings.take_nonempty_string("log_level")? {
        None => LogLevel::Info,
        Some(name) => LogLevel::parse(&name).ok_or_else(|| {
            SettingsError::invalid(
                "log_level",
                format!("{} is not one of {}", echo(&name), LogLevel::NAMES),
            )
        })?,
    };
    let max_keys = match settings.take_u64("max_keys")? {
        None | Some(0) => None,
        Some(n) => {
            Some(usize::try_from(n).map_err(|_| SettingsError::invalid("max_keys", "too large"))?)
        }
    };
    let max_signs_per_second = match settings.take_u64("max_signs_per_second")? {
        None | Some(0) => None,
        Some(n) if n > 1_000_000 => {
            return Err(SettingsError::invalid(
                "max_signs_per_second",
                format!("{n} is above the maximum of 1000000 (use 0 for no limit)"),
            ));
        }
        Some(n) => Some(n as f64),
    };
    let adaptive_rate_limit = settings.take_bool("adaptive_rate_limit")?.unwrap_or(true);
    let metrics_listen = match settings.take_nonempty_string("metrics_listen")? {
        None => None,
        Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
            SettingsError::invalid(
                "metrics_listen",
                format!(
                    "{} is not an IP address and port, e.g. \"127.0.0.1:9988\" or \"[::1]:9988\"",
                    echo(&text)
                ),
            )
        })?),
    };
    let audit_log = match settings.take_nonempty_string("audit_log")? {
        None => None,
        Some(text) => {
            let path = PathBuf::from(&text);
            if !path.is_absolute() || text.ends_with('/') {
                return Err(SettingsError::invalid(
                    "audit_log",
                    format!(
                        "{} must be the absolute path of a file, e.g. \"/var/log/spire/kms-audit.jsonl\"",
                        echo(&text)
                    ),
                ));
            }
            Some(path)
        }
    };
    let nested = settings.take_nested("migrate_from")?;
    let backend = factory.parse(&mut settings, &core)?;
    let migrate_from = match nested {
        Some(nested) => Some(parse_migrate_from(
            backends,
            nested,
            &core,
            backend.as_ref(),
        )?),
        None => None,
    };
    let mut allowed: Vec<&str> = COMMON_KEYS.to_vec();
    allowed.extend(factory.setting_keys());
    settings.finish(&allowed)?;
    Ok(PluginConfig {
        core,
        backend_name: factory.name(),
        log_level,
        max_keys,
        max_signs_per_second,
        adaptive_rate_limit,
        metrics_listen,
        audit_log,
        backend,
        migrate_from,
    })
}

const MIGRATE_FROM: &str = "migrate_from";

/// The old store's configuration: its own `backend` key and that backend's settings, read
/// by the backend's own factory with the same rules as a top-level configuration.
fn parse_migrate_from(
    backends: &[&'static dyn BackendFactory],
    mut settings: Settings,
    core: &CoreConfig,
    target: &dyn BackendConfig,
) -> Result<MigrateFrom, SettingsError> {
    if settings.contains(MIGRATE_FROM) {
        return Err(SettingsError::invalid(
            "migrate_from.migrate_from",
            "migrate_from cannot be nested: a hand-over serves one old store; finish one hand-over (remove its block), then start the next",
        ));
    }
    let within = |e: SettingsError| e.within(MIGRATE_FROM);
    let name = settings
        .take_nonempty_string("backend")
        .map_err(within)?
        .ok_or_else(|| {
            SettingsError::missing(
                "migrate_from.backend",
                "the old store's backend (e.g. \"disk\"), with its settings as they were in plugin_data",
            )
        })?;
    let factory = backends.iter().find(|f| f.name() == name).ok_or_else(|| {
        let names: Vec<&str> = backends.iter().map(|f| f.name()).collect();
        SettingsError::invalid(
            "migrate_from.backend",
            format!(
                "unknown backend {}; available: {}",
                echo(&name),
                names.join(", ")
            ),
        )
    })?;
    let backend = factory.parse(&mut settings, core).map_err(within)?;
    let mut allowed = vec!["backend"];
    allowed.extend(factory.setting_keys());
    settings.finish(&allowed).map_err(within)?;
    // Identity alone cannot tell two AWS accounts in one region apart; the credentials in
    // the settings can.
    if backend.identity().difference(&target.identity()).is_none()
        && backend.settings() == target.settings()
    {
        return Err(SettingsError::invalid(
            MIGRATE_FROM,
            format!(
                "it names the store the plugin already uses ({}); a hand-over moves keys from another store: point migrate_from at the old store, or remove the block",
                target.identity()
            ),
        ));
    }
    Ok(MigrateFrom {
        backend_name: factory.name(),
        backend,
    })
}

fn validate_core(core: Option<CoreConfig>) -> Result<CoreConfig, SettingsError> {
    let core =
        core.ok_or_else(|| SettingsError::Core("server core configuration is required".into()))?;
    let td = core.trust_domain.as_str();
    if td.is_empty() {
        return Err(SettingsError::Core(
            "server core configuration must contain trust_domain".into(),
        ));
    }
    let valid = td
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
    if !valid {
        return Err(SettingsError::Core(format!(
            "trust domain {td:?} is malformed: only lowercase letters, digits, '.', '-' and '_' are allowed"
        )));
    }
    Ok(core)
}

#[cfg(test)]
mod tests {
    use keymanager_backend_disk::DiskFactory;

    use super::*;

    const BACKENDS: &[&'static dyn BackendFactory] = &[&DiskFactory];

    fn core() -> Option<CoreConfig> {
        Some(CoreConfig {
            trust_domain: "example.org".into(),
        })
    }

    #[test]
    fn defaults_to_disk_and_reads_common_keys() {
        let config = parse_plugin_config(
            BACKENDS,
            core(),
            "keys_path = \"/k.json\"\nlog_level = \"DEBUG\"\n",
        )
        .unwrap();
        assert_eq!(config.backend_name, "disk");
        assert_eq!(config.log_level, LogLevel::Debug);
        assert_eq!(config.backend.identity().store, "keys file \"/k.json\"");
        assert_eq!(config.max_signs_per_second, None);
        let limited = parse_plugin_config(
            BACKENDS,
            core(),
            "keys_path = \"/k\"\nmax_signs_per_second = 50\nmax_keys = 12\n",
        )
        .unwrap();
        assert_eq!(limited.max_signs_per_second, Some(50.0));
        assert_eq!(limited.max_keys, Some(12));
        assert!(config.adaptive_rate_limit, "on by default");
        let fixed_only = parse_plugin_config(
            BACKENDS,
            core(),
            "keys_path = \"/k\"\nadaptive_rate_limit = false\n",
        )
        .unwrap();
        assert!(!fixed_only.engine_options().adaptive_rate_limit);
        assert_eq!(
            parse_plugin_config(
                BACKENDS,
                core(),
                "keys_path = \"/k\"\nadaptive_rate_limit = \"on\"\n"
            )
            .unwrap_err()
            .to_string(),
            "\"adaptive_rate_limit\" must be a boolean (true or false), got a string"
        );
        let err = parse_plugin_config(
            BACKENDS,
            core(),
            "keys_path = \"/k\"\nmax_signs_per_second = \"fast\"\n",
        );
        assert_eq!(
            err.unwrap_err().to_string(),
            "\"max_signs_per_second\" must be a non-negative integer, got a string"
        );
    }

    #[test]
    fn errors_name_the_key_and_the_allowed_values() {
        let err = |text: &str| {
            parse_plugin_config(BACKENDS, core(), text)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(""),
            "\"keys_path\" is required: the path of the JSON file that holds the keys"
        );
        assert_eq!(
            err("keys_path = \"/k\"\nkey_path = \"/k\"\n"),
            "unknown key \"key_path\" in plugin_data; allowed keys: backend, log_level, max_keys, max_signs_per_second, adaptive_rate_limit, metrics_listen, audit_log, migrate_from, keys_path"
        );
        assert_eq!(
            err("keys_path = 7\n"),
            "\"keys_path\" must be a string, got a number"
        );
        assert_eq!(
            err("keys_path = \"/k\"\nlog_level = \"verbose\"\n"),
            "invalid \"log_level\": \"verbose\" is not one of trace, debug, info, warn, error"
        );
        assert_eq!(
            err("backend = \"hsm\"\n"),
            "invalid \"backend\": unknown backend \"hsm\"; available: disk"
        );
        assert!(err("keys_path = {").starts_with("plugin_data is not valid HCL"));
    }

    #[test]
    fn telemetry_keys_are_parsed_and_bad_values_named() {
        let config = parse_plugin_config(
            BACKENDS,
            core(),
            "keys_path = \"/k\"\nmetrics_listen = \"127.0.0.1:9988\"\naudit_log = \"/var/log/spire/kms-audit.jsonl\"\n",
        )
        .unwrap();
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9988".parse().unwrap())
        );
        assert_eq!(
            config.audit_log.as_deref(),
            Some(std::path::Path::new("/var/log/spire/kms-audit.jsonl"))
        );
        let off = parse_plugin_config(BACKENDS, core(), "keys_path = \"/k\"\n").unwrap();
        assert_eq!((off.metrics_listen, off.audit_log), (None, None));
        let err = |text: &str| {
            parse_plugin_config(BACKENDS, core(), text)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("keys_path = \"/k\"\nmetrics_listen = \"localhost:9988\"\n"),
            "invalid \"metrics_listen\": \"localhost:9988\" is not an IP address and port, e.g. \"127.0.0.1:9988\" or \"[::1]:9988\""
        );
        assert_eq!(
            err("keys_path = \"/k\"\naudit_log = \"audit.jsonl\"\n"),
            "invalid \"audit_log\": \"audit.jsonl\" must be the absolute path of a file, e.g. \"/var/log/spire/kms-audit.jsonl\""
        );
    }

    #[test]
    fn migrate_from_is_a_whole_backend_configuration_checked_at_configure() {
        let config = parse_plugin_config(
            BACKENDS,
            core(),
            "keys_path = \"/new.json\"\nmigrate_from {\n  backend = \"disk\"\n  keys_path = \"/old.json\"\n}\n",
        )
        .unwrap();
        let old = config.migrate_from.as_ref().unwrap();
        assert_eq!(old.backend_name, "disk");
        assert_eq!(old.backend.identity().store, "keys file \"/old.json\"");
        assert!(
            config
                .settings()
                .iter()
                .any(|s| s.key == "migrate_from" && s.on_change == OnChange::NextStart)
        );
        let err = |text: &str| {
            parse_plugin_config(BACKENDS, core(), text)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("keys_path = \"/new\"\nmigrate_from {\n  keys_path = \"/old\"\n}\n"),
            "\"migrate_from.backend\" is required: the old store's backend (e.g. \"disk\"), with its settings as they were in plugin_data"
        );
        assert_eq!(
            err("keys_path = \"/new\"\nmigrate_from {\n  backend = \"hsm\"\n}\n"),
            "invalid \"migrate_from.backend\": unknown backend \"hsm\"; available: disk"
        );
        assert_eq!(
            err("keys_path = \"/new\"\nmigrate_from {\n  backend = \"disk\"\n}\n"),
            "\"migrate_from.keys_path\" is required: the path of the JSON file that holds the keys"
        );
        assert_eq!(
            err(
                "keys_path = \"/new\"\nmigrate_from {\n  backend = \"disk\"\n  keys_path = \"/old\"\n  log_level = \"debug\"\n}\n"
            ),
            "unknown key \"migrate_from.log_level\" in plugin_data; allowed keys: migrate_from.backend, migrate_from.keys_path"
        );
        assert!(
            err("keys_path = \"/new\"\nmigrate_from {\n  backend = \"disk\"\n  keys_path = \"/old\"\n  migrate_from {\n    backend = \"disk\"\n    keys_path = \"/older\"\n  }\n}\n")
                .contains("migrate_from cannot be nested")
        );
        let same = err(
            "keys_path = \"/k.json\"\nmigrate_from {\n  backend = \"disk\"\n  keys_path = \"/k.json\"\n}\n",
        );
        assert!(
            same.starts_with(
                "invalid \"migrate_from\": it names the store the plugin already uses"
            ),
            "{same}"
        );
        assert_eq!(
            err("keys_path = \"/new\"\nmigrate_from = \"disk\"\n"),
            "\"migrate_from\" must be a block of settings, got a string"
        );
    }

    #[test]
    fn core_configuration_is_checked() {
        assert!(parse_plugin_config(BACKENDS, None, "keys_path = \"/k\"").is_err());
        let bad = Some(CoreConfig {
            trust_domain: "Example.org".into(),
        });
        assert!(parse_plugin_config(BACKENDS, bad, "keys_path = \"/k\"").is_err());
    }
}
