//! The `disk` backend: software keys kept in a local JSON file.
//!
//! The file format is SPIRE's built-in `disk` KeyManager's (`{"keys": {"<id>": "<base64
//! PKCS#8 DER>"}}`), so an existing SPIRE keys file can be used as it is. Writes are atomic
//! (temporary file, fsync, rename, fsync of the directory) with mode 0600; a corrupt or
//! unreadable file is an error naming the path, never a silent fresh start.

mod config;
mod fast_signer;
mod keyfile;
mod software_key;

pub use config::{DiskConfig, DiskFactory};
pub use keyfile::KeyFile;
pub use software_key::SoftwareKey;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use keymanager_engine::{
    Backend, BackendError, BackendErrorKind, BackendKey, BackendSignature, Capabilities, Digest,
    KeyHandle, KeyId, KeyType, PssSaltSupport, SignatureScheme, SigningSupport,
};

const CAPABILITIES: Capabilities = Capabilities {
    key_types: &KeyType::ALL,
    signing: SigningSupport::Any,
    pss_salt: PssSaltSupport::Any,
    key_algorithm_name: None,
};

/// Software keys in a local file.
pub struct DiskBackend {
    file: KeyFile,
    /// Serialises writers; held across file I/O, never touched by signing.
    write_lock: tokio::sync::Mutex<()>,
}

impl DiskBackend {
    /// A backend over the keys file at `path` (which may not exist yet).
    pub fn new(path: PathBuf) -> Self {
        Self {
            file: KeyFile::new(path),
            write_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn backend_key(id: KeyId, key: SoftwareKey) -> Result<BackendKey, BackendError> {
        let spki_der = key.spki_der()?;
        let locator = format!("disk:{id}");
        Ok(BackendKey {
            id,
            key_type: key.key_type(),
            spki_der: Arc::from(spki_der),
            handle: KeyHandle::new(locator, key),
        })
    }
}

#[async_trait]
impl Backend for DiskBackend {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPABILITIES
    }

    async fn load_keys(&self) -> Result<Vec<BackendKey>, BackendError> {
        let file = self.file.clone();
        let entries = blocking(move || file.read()).await?;
        entries
            .into_iter()
            .map(|(id, pkcs8)| {
                let key = SoftwareKey::from_pkcs8_der(&pkcs8).map_err(|e| {
                    BackendError::new(
                        BackendErrorKind::Internal,
                        format!("keys file {}: key {id:?}: {e}", self.file.path().display()),
                    )
                })?;
                let id = KeyId::new(&id).map_err(|_| {
                    BackendError::new(
                        BackendErrorKind::Internal,
                        format!(
                            "keys file {} holds a key with an empty id",
                            self.file.path().display()
                        ),
                    )
                })?;
                Self::backend_key(id, key)
            })
            .collect()
    }

    async fn create_key(
        &self,
        id: &KeyId,
        key_type: KeyType,
        _replaces: Option<&BackendKey>,
    ) -> Result<BackendKey, BackendError> {
        // Key generation (seconds for RSA-4096) runs off the async workers and outside any lock.
        let key = blocking(move || SoftwareKey::generate(key_type)).await?;
        let pkcs8 = key.to_pkcs8_der()?;
        let _writer = self.write_lock.lock().await;
        let file = self.file.clone();
        let id_string = id.as_str().to_string();
        // Read-modify-write of the whole file: if the write fails, the file (and therefore
        // the previous key under this id) is untouched.
        blocking(move || {
            let mut entries = file.read()?;
            entries.insert(id_string, pkcs8);
            file.write(&entries)
        })
        .await?;
        Self::backend_key(id.clone(), key)
    }

    async fn sign(
        &self,
        key: &BackendKey,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<BackendSignature, BackendError> {
        let software = key.handle.get::<SoftwareKey>(self.name())?;
        if software.is_rsa() {
            // RSA private-key operations take milliseconds: keep them off the async workers.
            let software = software.clone();
            let digest = digest.clone();
            blocking(move || software.sign(&digest, scheme)).await
        } else {
            software.sign(digest, scheme)
        }
    }

    async fn retire_key(&self, replaced: &BackendKey) -> Result<(), BackendError> {
        // create_key already overwrote the entry in the file; the old private key lives on
        // only in memory until in-flight signatures finish with it.
        tracing::debug!(key_id = %replaced.id, "replaced disk key dropped from the keys file");
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        BackendError::with_source(BackendErrorKind::Internal, "disk backend task failed", e)
    })?
}

#[cfg(test)]
mod tests;
