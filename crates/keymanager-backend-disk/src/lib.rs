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

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use keymanager_engine::{
    Backend, BackendError, BackendErrorKind, BackendSignature, Capabilities, Digest, Fingerprint,
    KeyHandle, KeyId, KeyType, PrivateKeyMaterial, PssSaltSupport, SignatureScheme, SigningSupport,
    StoredKey,
};
use zeroize::Zeroizing;

const CAPABILITIES: Capabilities = Capabilities {
    key_types: &KeyType::ALL,
    signing: SigningSupport::Any,
    pss_salt: PssSaltSupport::Any,
    key_algorithm_name: None,
};

/// A software key: its material and a locator naming the file, the id and the key.
#[derive(Clone)]
pub struct DiskKey {
    locator: Arc<str>,
    key: Arc<SoftwareKey>,
}

impl KeyHandle for DiskKey {
    fn locator(&self) -> &str {
        &self.locator
    }
}

impl fmt::Debug for DiskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key material is never printed.
        write!(f, "DiskKey({:?})", self.locator)
    }
}

/// Software keys in a local file.
///
/// Two-phase creation: `prepare` generates the key in memory only; `publish` writes it into
/// the file with one atomic rename (the switch); `abort` and `retire` have nothing left to
/// do, since the file never held the aborted key and no longer holds the replaced one.
pub struct DiskBackend {
    file: KeyFile,
    /// Serialises writers in this process (the file lock serialises processes); held
    /// across file I/O, never touched by signing.
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

    fn handle(&self, id: &KeyId, key: SoftwareKey) -> Result<DiskKey, BackendError> {
        let spki = key.spki_der()?;
        Ok(DiskKey {
            locator: Arc::from(locator(&self.file, id, &spki)),
            key: Arc::new(key),
        })
    }

    fn stored(&self, id: KeyId, key: SoftwareKey) -> Result<StoredKey<DiskKey>, BackendError> {
        let spki_der: Arc<[u8]> = Arc::from(key.spki_der()?);
        let key_type = key.key_type();
        let handle = DiskKey {
            locator: Arc::from(locator(&self.file, &id, &spki_der)),
            key: Arc::new(key),
        };
        Ok(StoredKey {
            id,
            key_type,
            spki_der,
            handle,
        })
    }

    /// Every entry of the file as software keys; errors name the path and the id.
    async fn read_all(&self) -> Result<Vec<(KeyId, SoftwareKey)>, BackendError> {
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
                Ok((id, key))
            })
            .collect()
    }
}

/// `<keys file>#<id>@<first 16 hex digits of the fingerprint>`: unique per key instance.
fn locator(file: &KeyFile, id: &KeyId, spki_der: &[u8]) -> String {
    let fingerprint = Fingerprint::of_spki(spki_der);
    format!(
        "{}#{id}@{}",
        file.path().display(),
        &fingerprint.as_str()[..16]
    )
}

#[async_trait]
impl Backend for DiskBackend {
    type Handle = DiskKey;
    type Config = DiskConfig;

    fn name(&self) -> &'static str {
        "disk"
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPABILITIES
    }

    async fn discover(&self) -> Result<Vec<StoredKey<DiskKey>>, BackendError> {
        // Temporary files of writers that crashed mid-write may hold keys that were rotated
        // out since: they must not outlive their rotation on disk.
        let file = self.file.clone();
        let removed = blocking(move || file.remove_leftovers()).await?;
        if !removed.is_empty() {
            tracing::info!(
                files = removed.len(),
                "removed temporary files left beside the keys file by an interrupted write"
            );
        }
        self.read_all()
            .await?
            .into_iter()
            .map(|(id, key)| self.stored(id, key))
            .collect()
    }

    /// Reads the file only: leftovers of crashed writers stay for the server that owns it.
    async fn discover_read_only(&self) -> Result<Vec<StoredKey<DiskKey>>, BackendError> {
        self.read_all()
            .await?
            .into_iter()
            .map(|(id, key)| self.stored(id, key))
            .collect()
    }

    async fn prepare(
        &self,
        id: &KeyId,
        key_type: KeyType,
        _replaces: Option<&StoredKey<DiskKey>>,
    ) -> Result<DiskKey, BackendError> {
        // Key generation (seconds for RSA-4096) runs off the async workers and outside any
        // lock; the key exists in memory only until publish writes it.
        let key = blocking(move || SoftwareKey::generate(key_type)).await?;
        self.handle(id, key)
    }

    fn can_import(&self) -> bool {
        true
    }

    async fn prepare_import(
        &self,
        id: &KeyId,
        key: &PrivateKeyMaterial,
        _replaces: Option<&StoredKey<DiskKey>>,
    ) -> Result<DiskKey, BackendError> {
        // In memory only, like a generated key: publish writes the file.
        let software = SoftwareKey::from_pkcs8_der(key.pkcs8_der()).map_err(|e| {
            BackendError::new(BackendErrorKind::InvalidArgument, format!("key {id}: {e}"))
        })?;
        self.handle(id, software)
    }

    fn export(&self, key: &StoredKey<DiskKey>) -> Option<Result<PrivateKeyMaterial, BackendError>> {
        Some(key.handle.key.to_pkcs8_der().and_then(|der| {
            let der = Zeroizing::new(der);
            PrivateKeyMaterial::from_pkcs8_der(&der).map_err(|e| {
                BackendError::new(BackendErrorKind::Internal, format!("key {}: {e}", key.id))
            })
        }))
    }

    async fn public_key(&self, prepared: &DiskKey) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        Ok((prepared.key.key_type(), Arc::from(prepared.key.spki_der()?)))
    }

    async fn publish(
        &self,
        new: &StoredKey<DiskKey>,
        _replaces: Option<&StoredKey<DiskKey>>,
    ) -> Result<(), BackendError> {
        let pkcs8 = new.handle.key.to_pkcs8_der()?;
        let _writer = self.write_lock.lock().await;
        let file = self.file.clone();
        let id = new.id.as_str().to_string();
        // Read-modify-write of the whole file under the cross-process lock (another server
        // writing the same file cannot lose our keys, nor we theirs); the rename is the
        // switch. If the write fails, the file (and the previous key under this id) is
        // untouched.
        blocking(move || {
            file.update(|entries| {
                entries.insert(id, pkcs8);
                Ok(())
            })
        })
        .await
    }

    async fn find(&self, id: &KeyId) -> Result<Option<String>, BackendError> {
        Ok(self
            .read_all()
            .await?
            .into_iter()
            .find(|(found, _)| found == id)
            .map(|(id, key)| key.spki_der().map(|spki| locator(&self.file, &id, &spki)))
            .transpose()?)
    }

    async fn abort(&self, _prepared: &DiskKey) -> Result<(), BackendError> {
        // Never written: dropping the handle drops the key.
        Ok(())
    }

    async fn retire(
        &self,
        replaced: &StoredKey<DiskKey>,
        _replaced_by: &StoredKey<DiskKey>,
    ) -> Result<(), BackendError> {
        // publish already replaced the entry in the file; the old private key lives on only
        // in memory until in-flight signatures finish with it.
        tracing::debug!(key_id = %replaced.id, "replaced disk key dropped from the keys file");
        Ok(())
    }

    async fn sign(
        &self,
        key: &StoredKey<DiskKey>,
        digest: &Digest,
        scheme: SignatureScheme,
    ) -> Result<BackendSignature, BackendError> {
        let software = &key.handle.key;
        if software.is_rsa() {
            // RSA private-key operations take milliseconds: keep them off the async workers.
            let software = software.clone();
            let digest = digest.clone();
            blocking(move || software.sign(&digest, scheme)).await
        } else {
            software.sign(digest, scheme)
        }
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
