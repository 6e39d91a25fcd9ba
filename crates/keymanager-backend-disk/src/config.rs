//! `plugin_data` for the disk backend: the same `keys_path` as SPIRE's disk KeyManager.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use keymanager_engine::settings::{Settings, SettingsError};
use keymanager_engine::{Backend, BackendConfig, BackendError, BackendFactory, CoreConfig};

use crate::{DiskBackend, KeyFile, SoftwareKey};

/// Registers the `disk` backend.
pub struct DiskFactory;

const KEYS: &[&str] = &["keys_path"];

impl BackendFactory for DiskFactory {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn setting_keys(&self) -> &'static [&'static str] {
        KEYS
    }

    fn parse(
        &self,
        settings: &mut Settings,
        _core: &CoreConfig,
    ) -> Result<Box<dyn BackendConfig>, SettingsError> {
        let keys_path = settings.take_nonempty_string("keys_path")?.ok_or_else(|| {
            SettingsError::missing("keys_path", "the path of the JSON file that holds the keys")
        })?;
        Ok(Box::new(DiskConfig {
            keys_path: PathBuf::from(keys_path),
        }))
    }
}

/// The validated disk configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The keys file. Relative paths resolve against SPIRE's working directory.
    pub keys_path: PathBuf,
}

#[async_trait]
impl BackendConfig for DiskConfig {
    fn store_identity(&self) -> String {
        format!("disk:{}", self.keys_path.display())
    }

    fn problems(&self) -> Vec<String> {
        match self.keys_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
                return vec![format!(
                    "the directory {} of keys_path does not exist; GenerateKey would fail",
                    dir.display()
                )];
            }
            _ => {}
        }
        // Reading is side-effect free: a file that Configure would refuse is a problem now.
        let entries = match KeyFile::new(self.keys_path.clone()).read() {
            Ok(entries) => entries,
            Err(error) => return vec![error.message],
        };
        entries
            .iter()
            .filter_map(|(id, der)| {
                SoftwareKey::from_pkcs8_der(der)
                    .err()
                    .map(|e| format!("keys file {}: key {id:?}: {e}", self.keys_path.display()))
            })
            .collect()
    }

    async fn open(&self) -> Result<Arc<dyn Backend>, BackendError> {
        Ok(Arc::new(DiskBackend::new(self.keys_path.clone())))
    }
}
