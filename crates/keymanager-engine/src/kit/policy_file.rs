//! `key_policy_file`: a JSON policy document that replaces a KMS backend's default key
//! policy (an AWS key policy, a Cloud KMS IAM policy, ...). Read once at Configure, so a
//! broken file fails Configure, not the first GenerateKey.

use std::path::{Path, PathBuf};

use crate::settings::{Settings, SettingsError};

/// The setting's name.
pub const KEY: &str = "key_policy_file";
/// Larger files are refused unread (AWS allows 32 KiB key policies).
pub const MAX_BYTES: u64 = 64 * 1024;

/// A policy document: where it came from, its text, and its JSON object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyFile {
    /// The file.
    pub path: PathBuf,
    /// The text as read.
    pub text: String,
    /// The parsed top-level object.
    pub json: serde_json::Map<String, serde_json::Value>,
}

impl PolicyFile {
    /// Reads and parses `path` as a JSON object; errors name the setting and the file.
    pub fn read(path: &Path) -> Result<Self, SettingsError> {
        let fail = |why: String| SettingsError::invalid(KEY, format!("{}: {why}", path.display()));
        let size = std::fs::metadata(path)
            .map_err(|e| fail(format!("cannot read it: {e}")))?
            .len();
        if size > MAX_BYTES {
            return Err(fail(format!(
                "{size} bytes is larger than the {MAX_BYTES}-byte limit"
            )));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| fail(format!("not JSON: {e}")))?;
        let serde_json::Value::Object(json) = value else {
            return Err(fail("must hold a JSON object".into()));
        };
        Ok(Self {
            path: path.to_path_buf(),
            text,
            json,
        })
    }

    /// Takes `key_policy_file` from `settings` and reads it.
    pub fn take_from(settings: &mut Settings) -> Result<Option<Self>, SettingsError> {
        settings
            .take_nonempty_string(KEY)?
            .map(|path| Self::read(Path::new(&path)))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_read_and_the_rest_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.json");
        std::fs::write(&good, r#"{"Version":"2012-10-17"}"#).unwrap();
        assert_eq!(
            PolicyFile::read(&good).unwrap().json["Version"],
            "2012-10-17"
        );
        for (name, text) in [("list.json", "[1]"), ("junk.json", "{")] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let err = PolicyFile::read(&path).unwrap_err().to_string();
            assert!(err.contains(KEY) && err.contains(name), "{err}");
        }
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; (MAX_BYTES + 1) as usize]).unwrap();
        assert!(
            PolicyFile::read(&big)
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
        assert!(PolicyFile::read(&dir.path().join("missing")).is_err());
    }
}
