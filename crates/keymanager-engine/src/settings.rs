//! `plugin_data` settings, already parsed from HCL, with typed accessors whose errors name
//! the key and what it allows. Each layer takes its keys out; whatever is left is unknown.

use std::collections::BTreeMap;
use std::fmt;

/// One configuration value.
#[derive(Clone, Debug, PartialEq)]
pub enum SettingValue {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Integer(i64),
    /// A non-integer number.
    Float(f64),
    /// A string.
    String(String),
    /// A list.
    List(Vec<SettingValue>),
    /// An object or block.
    Map(BTreeMap<String, SettingValue>),
}

impl SettingValue {
    fn kind(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "a boolean",
            Self::Integer(_) | Self::Float(_) => "a number",
            Self::String(_) => "a string",
            Self::List(_) => "a list",
            Self::Map(_) => "a map",
        }
    }
}

/// How many characters of a value [`echo`] shows.
pub const ECHO_MAX_CHARS: usize = 120;

/// A piece of user input (a key name, a path, a duration…) as error messages show it:
/// quoted and escaped like `{:?}`, and, past [`ECHO_MAX_CHARS`] characters, cut with an
/// ellipsis and the original length, so that a huge value cannot flood an error, a log
/// line or `spire-server validate` output. Never use it for secrets: those are not echoed
/// at all.
pub fn echo(value: &str) -> String {
    match value.char_indices().nth(ECHO_MAX_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!(
            "{:?}… ({} characters)",
            &value[..cut],
            value.chars().count()
        ),
    }
}

/// A configuration error that names the key and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The text is not valid HCL.
    #[error("plugin_data is not valid HCL: {0}")]
    Syntax(String),
    /// A key nobody recognised.
    #[error("unknown key {} in plugin_data; allowed keys: {allowed}", echo(.key))]
    UnknownKey {
        /// The key.
        key: String,
        /// The keys that are allowed.
        allowed: String,
    },
    /// A key given more than once.
    #[error("key {} is set more than once in plugin_data", echo(.0))]
    Duplicate(String),
    /// A value of the wrong type.
    #[error("{} must be {expected}, got {found}", echo(.key))]
    WrongType {
        /// The key.
        key: String,
        /// What it must be.
        expected: &'static str,
        /// What it was.
        found: &'static str,
    },
    /// A required key is missing.
    #[error("{} is required{hint}", echo(.key))]
    Missing {
        /// The key.
        key: String,
        /// Extra guidance, starting with `: ` or empty.
        hint: String,
    },
    /// A value of the right type but not allowed.
    #[error("invalid {}: {reason}", echo(.key))]
    Invalid {
        /// The key.
        key: String,
        /// Why, including what is allowed.
        reason: String,
    },
    /// Missing core configuration from SPIRE.
    #[error("{0}")]
    Core(String),
}

impl SettingsError {
    /// The same error for a key inside the block `block` (`keys_path` → `migrate_from.keys_path`).
    pub fn within(self, block: &str) -> Self {
        let path = |key: String| format!("{block}.{key}");
        match self {
            Self::UnknownKey { key, allowed } => Self::UnknownKey {
                key: path(key),
                allowed: allowed
                    .split(", ")
                    .map(|k| path(k.to_string()))
                    .collect::<Vec<_>>()
                    .join(", "),
            },
            Self::Duplicate(key) => Self::Duplicate(path(key)),
            Self::WrongType {
                key,
                expected,
                found,
            } => Self::WrongType {
                key: path(key),
                expected,
                found,
            },
            Self::Missing { key, hint } => Self::Missing {
                key: path(key),
                hint,
            },
            Self::Invalid { key, reason } => Self::Invalid {
                key: path(key),
                reason,
            },
            other => other,
        }
    }

    /// A value that failed validation.
    pub fn invalid(key: &str, reason: impl fmt::Display) -> Self {
        Self::Invalid {
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    /// A required key that is missing.
    pub fn missing(key: &str, hint: &str) -> Self {
        Self::Missing {
            key: key.to_string(),
            hint: if hint.is_empty() {
                String::new()
            } else {
                format!(": {hint}")
            },
        }
    }
}

/// A secret setting (access key, token, PIN). Its `Debug` and `Display` never show the
/// value, so a configuration struct holding one can be logged with `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value, for the one place that hands it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The top-level `plugin_data` keys, consumed as each layer reads them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    values: BTreeMap<String, SettingValue>,
}

impl Settings {
    /// Wraps parsed values.
    pub fn new(values: BTreeMap<String, SettingValue>) -> Self {
        Self { values }
    }

    /// True when `key` is present with a non-null value (it is not taken).
    pub fn contains(&self, key: &str) -> bool {
        !matches!(self.values.get(key), None | Some(SettingValue::Null))
    }

    /// Takes a string value.
    pub fn take_string(&mut self, key: &str) -> Result<Option<String>, SettingsError> {
        match self.values.remove(key) {
            None | Some(SettingValue::Null) => Ok(None),
            Some(SettingValue::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(key, "a string", &other)),
        }
    }

    /// Takes a non-empty string value; an empty string counts as unset.
    pub fn take_nonempty_string(&mut self, key: &str) -> Result<Option<String>, SettingsError> {
        Ok(self.take_string(key)?.filter(|s| !s.is_empty()))
    }

    /// Takes a secret string; wrong-type errors never echo the value.
    pub fn take_secret(&mut self, key: &str) -> Result<Option<Secret>, SettingsError> {
        Ok(self.take_nonempty_string(key)?.map(Secret::new))
    }

    /// Takes a boolean value.
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, SettingsError> {
        match self.values.remove(key) {
            None | Some(SettingValue::Null) => Ok(None),
            Some(SettingValue::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(wrong_type(key, "a boolean (true or false)", &other)),
        }
    }

    /// Takes a non-negative integer value.
    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>, SettingsError> {
        match self.values.remove(key) {
            None | Some(SettingValue::Null) => Ok(None),
            Some(SettingValue::Integer(n)) => u64::try_from(n)
                .map(Some)
                .map_err(|_| SettingsError::invalid(key, format!("must not be negative, got {n}"))),
            Some(other) => Err(wrong_type(key, "a non-negative integer", &other)),
        }
    }

    /// Takes a duration written as a number and a unit: `90s`, `10m`, `6h`, `14d`.
    pub fn take_duration(
        &mut self,
        key: &str,
    ) -> Result<Option<std::time::Duration>, SettingsError> {
        let Some(text) = self.take_nonempty_string(key)? else {
            return Ok(None);
        };
        parse_duration(&text)
            .map(Some)
            .ok_or_else(|| {
                SettingsError::invalid(
                    key,
                    format!("{} is not a duration; write a whole number and a unit: s, m, h or d (e.g. \"6h\")", echo(&text)),
                )
            })
    }

    /// Takes a map of strings (HCL `key = { a = "b" }` or a `key { a = "b" }` block).
    pub fn take_string_map(
        &mut self,
        key: &str,
    ) -> Result<Option<BTreeMap<String, String>>, SettingsError> {
        match self.values.remove(key) {
            None | Some(SettingValue::Null) => Ok(None),
            Some(SettingValue::Map(map)) => map
                .into_iter()
                .map(|(k, v)| match v {
                    SettingValue::String(s) => Ok((k, s)),
                    other => Err(SettingsError::WrongType {
                        key: format!("{key}.{k}"),
                        expected: "a string",
                        found: other.kind(),
                    }),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(other) => Err(wrong_type(key, "a map of strings", &other)),
        }
    }

    /// Sets a string value (for a deprecated key mapped onto its replacement).
    pub fn put_string(&mut self, key: &str, value: String) {
        self.values
            .insert(key.to_string(), SettingValue::String(value));
    }

    /// Moves a deprecated key onto its replacement, returning the warning to log. Both set
    /// at once is an error naming both.
    pub fn rename_deprecated(
        &mut self,
        deprecated: &str,
        replacement: &str,
        conflicts: &[&str],
    ) -> Result<Option<String>, SettingsError> {
        let Some(value) = self.values.remove(deprecated) else {
            return Ok(None);
        };
        if matches!(value, SettingValue::Null) {
            return Ok(None);
        }
        if let Some(other) = std::iter::once(&replacement)
            .chain(conflicts)
            .find(|k| self.contains(k))
        {
            return Err(SettingsError::invalid(
                deprecated,
                format!(
                    "{deprecated} is the deprecated name of {replacement}; set only one of {deprecated} and {other}"
                ),
            ));
        }
        self.values.insert(replacement.to_string(), value);
        Ok(Some(format!(
            "{deprecated} is deprecated: it is used as {replacement}; rename it"
        )))
    }

    /// Takes a nested block (HCL `key { a = "b" }` or `key = { a = "b" }`) as settings of
    /// its own whose keys are named `key.a`, so errors name the full path.
    pub fn take_block(&mut self, key: &str) -> Result<Option<Settings>, SettingsError> {
        match self.values.remove(key) {
            None | Some(SettingValue::Null) => Ok(None),
            Some(SettingValue::Map(map)) => Ok(Some(Settings::new(
                map.into_iter()
                    .map(|(k, v)| (format!("{key}.{k}"), v))
                    .collect(),
            ))),
            Some(other) => Err(wrong_type(key, "a block of settings", &other)),
        }
    }

    /// Takes a nested block whose keys are read as top-level keys of their own (a whole
    /// backend configuration, `migrate_from { backend = "disk" … }`); errors from it name
    /// their keys without the prefix, so wrap them with [`SettingsError::within`].
    pub fn take_nested(&mut self, key: &str) -> Result<Option<Settings>, SettingsError> {
        match self.values.remove(key) {
            None | Some(SettingValue::Null) => Ok(None),
            Some(SettingValue::Map(map)) => Ok(Some(Settings::new(map))),
            // HCL 1 prints a block as a one-element list of objects.
            Some(SettingValue::List(mut items))
                if items.len() == 1 && matches!(items[0], SettingValue::Map(_)) =>
            {
                match items.pop() {
                    Some(SettingValue::Map(map)) => Ok(Some(Settings::new(map))),
                    _ => Ok(None),
                }
            }
            Some(other) => Err(wrong_type(key, "a block of settings", &other)),
        }
    }

    /// Fails on the first key nobody took, listing what is allowed.
    pub fn finish(self, allowed: &[&str]) -> Result<(), SettingsError> {
        match self.values.into_keys().next() {
            None => Ok(()),
            Some(key) => Err(SettingsError::UnknownKey {
                key,
                allowed: allowed.join(", "),
            }),
        }
    }
}

fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    if number == 0 {
        return None;
    }
    number
        .checked_mul(seconds)
        .map(std::time::Duration::from_secs)
}

fn wrong_type(key: &str, expected: &'static str, found: &SettingValue) -> SettingsError {
    SettingsError::WrongType {
        key: key.to_string(),
        expected,
        found: found.kind(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_become_settings_whose_errors_name_the_full_path() {
        let inner = BTreeMap::from([
            ("a".to_string(), SettingValue::String("x".into())),
            ("b".to_string(), SettingValue::Bool(true)),
        ]);
        let mut outer = settings(&[("block", SettingValue::Map(inner))]);
        let mut block = outer.take_block("block").unwrap().unwrap();
        assert_eq!(block.take_string("block.a").unwrap().as_deref(), Some("x"));
        let err = block.finish(&["block.a"]).unwrap_err().to_string();
        assert!(err.contains("\"block.b\""), "{err}");
        let mut outer = settings(&[("block", SettingValue::String("x".into()))]);
        let err = outer.take_block("block").unwrap_err().to_string();
        assert!(err.contains("a block of settings"), "{err}");
    }

    #[test]
    fn nested_settings_read_plain_keys_and_errors_get_the_block_path() {
        let inner = BTreeMap::from([
            ("backend".to_string(), SettingValue::String("disk".into())),
            ("keys_path".to_string(), SettingValue::Integer(3)),
        ]);
        let mut outer = settings(&[(
            "migrate_from",
            SettingValue::List(vec![SettingValue::Map(inner)]),
        )]);
        let mut nested = outer.take_nested("migrate_from").unwrap().unwrap();
        assert_eq!(
            nested.take_string("backend").unwrap().as_deref(),
            Some("disk")
        );
        let err = nested
            .take_string("keys_path")
            .unwrap_err()
            .within("migrate_from");
        assert_eq!(
            err.to_string(),
            "\"migrate_from.keys_path\" must be a string, got a number"
        );
        let err = SettingsError::UnknownKey {
            key: "x".into(),
            allowed: "backend, keys_path".into(),
        }
        .within("migrate_from");
        assert_eq!(
            err.to_string(),
            "unknown key \"migrate_from.x\" in plugin_data; allowed keys: migrate_from.backend, migrate_from.keys_path"
        );
        let mut outer = settings(&[("migrate_from", SettingValue::Bool(true))]);
        assert!(
            outer
                .take_nested("migrate_from")
                .unwrap_err()
                .to_string()
                .contains("a block of settings")
        );
    }

    fn settings(pairs: &[(&str, SettingValue)]) -> Settings {
        Settings::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    #[test]
    fn typed_accessors_name_the_key_on_wrong_type() {
        let mut s = settings(&[("keys_path", SettingValue::Integer(3))]);
        let err = s.take_string("keys_path").unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"keys_path\" must be a string, got a number"
        );
    }

    #[test]
    fn leftover_keys_are_unknown_and_list_the_allowed_ones() {
        let mut s = settings(&[
            ("keys_path", SettingValue::String("/x".into())),
            ("key_path", SettingValue::String("/y".into())),
        ]);
        assert_eq!(s.take_string("keys_path").unwrap().as_deref(), Some("/x"));
        let err = s.finish(&["backend", "keys_path"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown key \"key_path\" in plugin_data; allowed keys: backend, keys_path"
        );
    }

    #[test]
    fn string_maps_check_every_value() {
        let mut inner = BTreeMap::new();
        inner.insert("team".to_string(), SettingValue::Bool(true));
        let mut s = settings(&[("key_tags", SettingValue::Map(inner))]);
        let err = s.take_string_map("key_tags").unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"key_tags.team\" must be a string, got a boolean"
        );
    }

    #[test]
    fn secrets_never_show_in_debug_or_display() {
        let mut s = settings(&[(
            "secret_access_key",
            SettingValue::String("wJalrXUtnFEMI".into()),
        )]);
        let secret = s.take_secret("secret_access_key").unwrap().unwrap();
        assert_eq!(secret.expose(), "wJalrXUtnFEMI");
        assert!(!format!("{secret:?} {secret}").contains("wJalr"));
        #[derive(Debug)]
        #[allow(dead_code, reason = "only Debug output is inspected")]
        struct Config {
            secret: Secret,
        }
        assert_eq!(
            format!("{:?}", Config { secret }),
            "Config { secret: Secret(<redacted>) }"
        );
    }

    #[test]
    fn durations_need_a_number_and_a_unit() {
        let mut s = settings(&[
            ("a", SettingValue::String("6h".into())),
            ("b", SettingValue::String("14d".into())),
            ("c", SettingValue::String("6".into())),
            ("d", SettingValue::String("0s".into())),
            ("e", SettingValue::String("1w".into())),
        ]);
        assert_eq!(
            s.take_duration("a").unwrap(),
            Some(std::time::Duration::from_secs(6 * 3600))
        );
        assert_eq!(
            s.take_duration("b").unwrap(),
            Some(std::time::Duration::from_secs(14 * 86400))
        );
        for key in ["c", "d", "e"] {
            let err = s.take_duration(key).unwrap_err().to_string();
            assert!(err.contains("is not a duration"), "{err}");
        }
    }

    #[test]
    fn echo_quotes_short_input_and_cuts_long_input() {
        assert_eq!(echo("/var/keys.json"), "\"/var/keys.json\"");
        assert_eq!(echo("a\"b\n"), "\"a\\\"b\\n\"");
        let exact = "x".repeat(ECHO_MAX_CHARS);
        assert_eq!(echo(&exact), format!("{exact:?}"));
        let huge = "a".repeat(1 << 20);
        assert_eq!(
            echo(&huge),
            format!("\"{}\"… (1048576 characters)", "a".repeat(ECHO_MAX_CHARS))
        );
        // Cut on a character boundary, length counted in characters.
        let wide = "é".repeat(500);
        assert_eq!(
            echo(&wide),
            format!("\"{}\"… (500 characters)", "é".repeat(ECHO_MAX_CHARS))
        );
    }

    #[test]
    fn errors_bound_what_they_echo_from_input() {
        let huge = "a".repeat(1 << 20);
        let assert_bounded = |err: SettingsError| {
            let text = err.to_string();
            assert!(text.len() < 400, "{} bytes: {}…", text.len(), &text[..200]);
            assert!(text.contains("\"… (10485"), "{text}");
        };
        let mut s = settings(&[("rotate_after", SettingValue::String(huge.clone()))]);
        assert_bounded(s.take_duration("rotate_after").unwrap_err());
        let s = settings(&[(huge.as_str(), SettingValue::Bool(true))]);
        assert_bounded(s.finish(&["keys_path"]).unwrap_err());
        let inner = BTreeMap::from([(huge.clone(), SettingValue::Bool(true))]);
        let mut s = settings(&[("key_tags", SettingValue::Map(inner))]);
        assert_bounded(s.take_string_map("key_tags").unwrap_err());
        assert_bounded(SettingsError::Duplicate(huge.clone()));
        assert_bounded(SettingsError::invalid(&huge, "too long"));
    }

    #[test]
    fn negative_integers_are_refused_for_counts() {
        let mut s = settings(&[("max_keys", SettingValue::Integer(-1))]);
        assert!(
            s.take_u64("max_keys")
                .unwrap_err()
                .to_string()
                .contains("max_keys")
        );
    }
}
