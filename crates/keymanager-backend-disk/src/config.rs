//! `plugin_data` for the disk backend: the same `keys_path` as SPIRE's disk KeyManager.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use keymanager_engine::settings::{Settings, SettingsError, echo};
use keymanager_engine::{
    BackendConfig, BackendError, BackendErrorKind, BackendFactory, CoreConfig, Opened,
    OpenedBackend, SettingState, StoreIdentity,
};

use crate::{DiskBackend, KeyFile, SoftwareKey};

/// Registers the `disk` backend.
pub struct DiskFactory;

const KEYS: &[&str] = &["keys_path"];
/// Linux's PATH_MAX: a longer path cannot be opened, and must not flood error messages.
const MAX_PATH_BYTES: usize = 4096;

impl BackendFactory for DiskFactory {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn setting_keys(&self) -> Vec<&'static str> {
        KEYS.to_vec()
    }

    fn parse(
        &self,
        settings: &mut Settings,
        core: &CoreConfig,
    ) -> Result<Box<dyn BackendConfig>, SettingsError> {
        let keys_path = settings.take_nonempty_string("keys_path")?.ok_or_else(|| {
            SettingsError::missing("keys_path", "the path of the JSON file that holds the keys")
        })?;
        if keys_path.len() > MAX_PATH_BYTES {
            return Err(SettingsError::invalid(
                "keys_path",
                format!(
                    "{} is {} bytes long; paths are at most {MAX_PATH_BYTES} bytes",
                    echo(&keys_path),
                    keys_path.len()
                ),
            ));
        }
        Ok(Box::new(DiskConfig {
            keys_path: PathBuf::from(keys_path),
            trust_domain: core.trust_domain.clone(),
        }))
    }
}

/// The validated disk configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The keys file. Relative paths resolve against SPIRE's working directory.
    pub keys_path: PathBuf,
    /// The trust domain (part of the store identity).
    pub trust_domain: String,
}

impl DiskConfig {
    /// The keys file's directory, when it is named and does not exist.
    fn missing_directory(&self) -> Option<PathBuf> {
        match self.keys_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Some(dir.to_path_buf()),
            _ => None,
        }
    }
}

#[async_trait]
impl BackendConfig for DiskConfig {
    fn identity(&self) -> StoreIdentity {
        StoreIdentity {
            backend: "disk",
            store: format!("keys file {}", shown(&self.keys_path)),
            trust_domain: self.trust_domain.clone(),
            server: None,
        }
    }

    fn settings(&self) -> Vec<SettingState> {
        // keys_path is the store itself: a change is refused through the store identity.
        Vec::new()
    }

    fn problems(&self) -> Vec<String> {
        if let Some(dir) = self.missing_directory() {
            return vec![format!(
                "the directory {} of keys_path does not exist; GenerateKey would fail",
                shown(&dir)
            )];
        }
        // Reading is side-effect free: a file that Configure would refuse is a problem now.
        let entries = match KeyFile::new(self.keys_path.clone()).read() {
            Ok(entries) => entries,
            Err(error) => return vec![error.message],
        };
        entries
            .iter()
            .filter_map(|(id, der)| {
                SoftwareKey::from_pkcs8_der(der).err().map(|e| {
                    format!(
                        "keys file {}: key {}: {e}",
                        shown(&self.keys_path),
                        echo(id)
                    )
                })
            })
            .collect()
    }

    async fn open(&self) -> Result<Box<dyn OpenedBackend>, BackendError> {
        if let Some(dir) = self.missing_directory() {
            return Err(BackendError::new(
                BackendErrorKind::InvalidArgument,
                format!(
                    "invalid \"keys_path\": its directory {} does not exist; create it (mode 0700) or point keys_path elsewhere",
                    shown(&dir)
                ),
            ));
        }
        Ok(Opened::new(Arc::new(DiskBackend::new(self.keys_path.clone()))).boxed())
    }
}

/// A path quoted and bounded for messages.
fn shown(path: &std::path::Path) -> String {
    echo(&path.display().to_string())
}
