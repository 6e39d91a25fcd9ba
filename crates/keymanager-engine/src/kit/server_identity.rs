//! The server identity of the KMS backends (SPIRE's `key_identifier_file` /
//! `key_identifier_value`): which keys in a shared account or project belong to this server.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::backend::{BackendError, BackendErrorKind};
use crate::settings::{Settings, SettingsError};

/// The charset rule a backend puts on `key_identifier_value` when the id becomes part of
/// store names: at most `max` characters of ASCII letters, digits and `symbols`; `purpose`
/// (where the id goes) ends the message.
pub fn check_value_chars(
    value: &str,
    max: usize,
    symbols: &[char],
    purpose: Option<&str>,
) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "is {} characters long; the maximum is {max}",
            value.len()
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || symbols.contains(c)))
    {
        let quoted: Vec<String> = symbols.iter().map(|c| format!("'{c}'")).collect();
        let list = match quoted.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
            None => String::new(),
        };
        let purpose = purpose.map_or(String::new(), |p| format!(" ({p})"));
        return Err(format!(
            "contains {bad:?}; allowed are letters, digits, {list}{purpose}"
        ));
    }
    Ok(())
}

/// Where the server id comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerIdSource {
    /// A file holding a UUID; created with a fresh UUIDv4 (mode 0600) when missing.
    File(PathBuf),
    /// A fixed value from the configuration.
    Value(String),
}

impl ServerIdSource {
    /// Takes `key_identifier_file` / `key_identifier_value` (exactly one) out of `settings`.
    /// `check_value` applies the backend's own charset and length rules to a value.
    pub fn take_from(
        settings: &mut Settings,
        check_value: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Self, SettingsError> {
        let file = settings.take_nonempty_string("key_identifier_file")?;
        let value = settings.take_nonempty_string("key_identifier_value")?;
        match (file, value) {
            (Some(_), Some(_)) => Err(SettingsError::invalid(
                "key_identifier_value",
                "key_identifier_file and key_identifier_value are mutually exclusive; set one",
            )),
            (None, None) => Err(SettingsError::missing(
                "key_identifier_file",
                "set key_identifier_file (a file that holds this server's id) or key_identifier_value",
            )),
            (Some(file), None) => Ok(Self::File(PathBuf::from(file))),
            (None, Some(value)) => {
                check_value(&value)
                    .map_err(|reason| SettingsError::invalid("key_identifier_value", reason))?;
                Ok(Self::Value(value))
            }
        }
    }

    /// How the store identity names this source (`key_identifier_file /x`).
    pub fn describe(&self) -> String {
        match self {
            Self::File(path) => format!("key_identifier_file {}", path.display()),
            Self::Value(value) => format!("key_identifier_value {value:?}"),
        }
    }

    /// Reads (or, for a missing file, creates) the server id. A file that exists but does not
    /// hold a UUID is an error: silently replacing it would orphan every key of this server.
    pub fn resolve(&self) -> Result<String, BackendError> {
        let path = match self {
            Self::Value(value) => return Ok(value.clone()),
            Self::File(path) => path,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => parse_uuid(&text).ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::FailedPrecondition,
                    format!(
                        "key_identifier_file {} does not hold a UUID; fix or remove it (removing it orphans this server's keys)",
                        path.display()
                    ),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_id_file(path),
            Err(e) => Err(BackendError::with_source(
                BackendErrorKind::Internal,
                format!("cannot read key_identifier_file {}", path.display()),
                e,
            )),
        }
    }

    /// Problems `resolve` would hit, without side effects (for Validate).
    pub fn problems(&self) -> Vec<String> {
        let Self::File(path) = self else {
            return Vec::new();
        };
        match std::fs::read_to_string(path) {
            Ok(text) if parse_uuid(&text).is_none() => {
                vec![format!(
                    "key_identifier_file {} does not hold a UUID",
                    path.display()
                )]
            }
            Ok(_) => Vec::new(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => vec![format!(
                    "the directory {} of key_identifier_file does not exist",
                    dir.display()
                )],
                _ => Vec::new(),
            },
            Err(e) => vec![format!(
                "cannot read key_identifier_file {}: {e}",
                path.display()
            )],
        }
    }
}

fn parse_uuid(text: &str) -> Option<String> {
    uuid::Uuid::parse_str(text.trim())
        .ok()
        .map(|u| u.hyphenated().to_string())
}

/// Writes a new UUIDv4 with `create_new`, so two processes racing on the same path agree on
/// the winner's id instead of overwriting each other.
fn create_id_file(path: &std::path::Path) -> Result<String, BackendError> {
    let id = uuid::Uuid::new_v4().hyphenated().to_string();
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| {
            file.write_all(id.as_bytes())?;
            file.sync_all()
        });
    match created {
        Ok(()) => {
            tracing::info!(path = %path.display(), server_id = %id, "created a new server id");
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            ServerIdSource::File(path.to_path_buf()).resolve()
        }
        Err(e) => Err(BackendError::with_source(
            BackendErrorKind::Internal,
            format!("cannot create key_identifier_file {}", path.display()),
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::settings::SettingValue;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        Settings::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), SettingValue::String(v.to_string())))
                .collect(),
        )
    }

    fn any(_: &str) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn exactly_one_source_is_required() {
        let err = ServerIdSource::take_from(&mut settings(&[]), any).unwrap_err();
        assert!(
            err.to_string()
                .contains("key_identifier_file\" is required"),
            "{err}"
        );
        let err = ServerIdSource::take_from(
            &mut settings(&[("key_identifier_file", "/f"), ("key_identifier_value", "v")]),
            any,
        )
        .unwrap_err();
        assert!(err.to_string().contains("mutually exclusive"), "{err}");
        let err =
            ServerIdSource::take_from(&mut settings(&[("key_identifier_value", "bad")]), |_| {
                Err("must be lowercase".into())
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid \"key_identifier_value\": must be lowercase"
        );
    }

    #[test]
    fn a_missing_file_gets_a_fresh_uuid_that_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server_id");
        let source = ServerIdSource::File(path.clone());
        assert!(source.problems().is_empty());
        let id = source.resolve().unwrap();
        assert!(uuid::Uuid::parse_str(&id).is_ok());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            source.resolve().unwrap(),
            id,
            "the id is stable across restarts"
        );
    }

    #[test]
    fn a_file_without_a_uuid_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server_id");
        std::fs::write(&path, "not-a-uuid").unwrap();
        let source = ServerIdSource::File(path.clone());
        assert_eq!(source.problems().len(), 1);
        let err = source.resolve().unwrap_err();
        assert_eq!(err.kind, BackendErrorKind::FailedPrecondition);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "not-a-uuid",
            "never overwritten"
        );
        // Upper case and surrounding whitespace are canonicalised, as SPIRE does.
        std::fs::write(&path, " 3F2504E0-4F89-41D3-9A0C-0305E82C3301\n").unwrap();
        assert_eq!(
            source.resolve().unwrap(),
            "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
        );
    }
}
