//! The disk backend's keys file (SPIRE's `{"keys": {"<id>": "<base64 PKCS#8>"}}`), loaded
//! the way Configure loads it: factory, open, discovery, engine start. A file is either
//! served exactly as it reads (every entry, each public key matching its private key) or
//! refused with an error naming the file, never a panic or a silent empty start.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use keymanager_backend_disk::{DiskFactory, KeyFile};
use keymanager_engine::settings::{SettingValue, Settings};
use keymanager_engine::{BackendFactory, CoreConfig, EngineOptions, Fingerprint, KeyType};
use p256::pkcs8::DecodePublicKey;

use crate::work_dir;

struct Harness {
    runtime: tokio::runtime::Runtime,
    path: PathBuf,
}

static HARNESS: Mutex<Option<Harness>> = Mutex::new(None);

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut guard = HARNESS.lock().unwrap_or_else(PoisonError::into_inner);
    let harness = guard.get_or_insert_with(|| Harness {
        runtime: work_dir::runtime(),
        path: work_dir::fresh("key_file").join("keys.json"),
    });
    std::fs::write(&harness.path, data).expect("the scratch keys file can be written");
    let path = harness.path.display().to_string();

    let mut settings = Settings::new(BTreeMap::from([(
        "keys_path".to_string(),
        SettingValue::String(path.clone()),
    )]));
    let core = CoreConfig {
        trust_domain: "example.org".into(),
    };
    let config = DiskFactory
        .parse(&mut settings, &core)
        .expect("a keys_path setting parses");
    let started = harness.runtime.block_on(async {
        let opened = config.open().await.map_err(|e| e.to_string())?;
        opened
            .start(EngineOptions::default())
            .await
            .map_err(|e| e.to_string())
    });
    let service = match started {
        Ok(service) => service,
        Err(error) => {
            assert!(
                error.contains(&path),
                "a refused keys file is not named in the error: {error}"
            );
            return;
        }
    };
    let entries = KeyFile::new(harness.path.clone())
        .read()
        .expect("a keys file the backend loaded reads");
    let served = service.public_keys();
    let served_ids: Vec<&str> = served.iter().map(|k| k.id.as_str()).collect();
    let file_ids: Vec<&str> = entries.keys().map(String::as_str).collect();
    assert_eq!(served_ids, file_ids, "served keys differ from the file's");
    for key in &served {
        assert_eq!(key.fingerprint, Fingerprint::of_spki(&key.spki_der));
        let readable = match key.key_type {
            KeyType::EcP256 => p256::PublicKey::from_public_key_der(&key.spki_der).is_ok(),
            KeyType::EcP384 => p384::PublicKey::from_public_key_der(&key.spki_der).is_ok(),
            KeyType::Rsa2048 | KeyType::Rsa4096 => {
                rsa::PublicKey::from_public_key_der(&key.spki_der).is_ok()
            }
        };
        assert!(readable, "key {:?}: unreadable public key", key.id);
        // The import reader is a second parser of the same PKCS#8: both must agree.
        if let Ok(material) =
            keymanager_engine::PrivateKeyMaterial::from_pkcs8_der(&entries[key.id.as_str()])
        {
            assert_eq!(material.key_type(), key.key_type, "key {:?}", key.id);
            assert_eq!(
                &material.spki_der()[..],
                &key.spki_der[..],
                "key {:?}",
                key.id
            );
        }
    }
}
