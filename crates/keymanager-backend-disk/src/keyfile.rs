//! The keys file: SPIRE's disk KeyManager JSON format, written atomically.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keymanager_engine::{BackendError, BackendErrorKind};

/// `{"keys": {"<id>": "<base64 PKCS#8 DER>"}}`; Go encodes `[]byte` as padded base64.
#[derive(serde::Serialize, serde::Deserialize)]
struct FileFormat {
    keys: BTreeMap<String, String>,
}

/// The keys file at one path.
#[derive(Clone, Debug)]
pub struct KeyFile {
    path: PathBuf,
}

impl KeyFile {
    /// A keys file at `path`; nothing is read until [`KeyFile::read`].
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads every entry (id → PKCS#8 DER). A missing file is empty; anything else that
    /// goes wrong is an error naming the path.
    pub fn read(&self) -> Result<BTreeMap<String, Vec<u8>>, BackendError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(self.error("cannot read keys file", e)),
        };
        let parsed: FileFormat = serde_json::from_slice(&bytes).map_err(|e| {
            BackendError::with_source(
                BackendErrorKind::Internal,
                format!(
                    "keys file {} is corrupt (refusing to start with an empty key set)",
                    self.path.display()
                ),
                e,
            )
        })?;
        parsed
            .keys
            .into_iter()
            .map(|(id, b64)| {
                STANDARD
                    .decode(b64.as_bytes())
                    .map(|der| (id.clone(), der))
                    .map_err(|e| {
                        BackendError::new(
                            BackendErrorKind::Internal,
                            format!(
                                "keys file {} is corrupt: key {id:?} is not base64: {e}",
                                self.path.display()
                            ),
                        )
                    })
            })
            .collect()
    }

    /// Replaces the file atomically: write a 0600 temporary file beside it, fsync, rename
    /// over the old one, fsync the directory. A crash leaves either the old or the new file.
    pub fn write(&self, entries: &BTreeMap<String, Vec<u8>>) -> Result<(), BackendError> {
        let format = FileFormat {
            keys: entries
                .iter()
                .map(|(id, der)| (id.clone(), STANDARD.encode(der)))
                .collect(),
        };
        let json = serde_json::to_vec(&format)
            .map_err(|e| self.error("cannot encode keys file", std::io::Error::other(e)))?;
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "keys".to_string());
        let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp, &self.path)?;
            File::open(&dir)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(self.error("unable to write keys file", e));
        }
        Ok(())
    }

    fn error(&self, what: &str, e: std::io::Error) -> BackendError {
        BackendError::with_source(
            BackendErrorKind::Internal,
            format!("{what} {}", self.path.display()),
            e,
        )
    }
}
