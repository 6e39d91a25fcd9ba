//! The backend conformance suite on `disk`. A "server" is a keys file of its own; a store
//! outage is the keys file's directory swapped for one nobody can write (sysfs).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use keymanager_backend_disk::{DiskFactory, KeyFile, SoftwareKey};
use keymanager_conformance::suite::Subject;
use keymanager_engine::{BackendFactory, Fingerprint};

struct DiskSubject {
    dir: tempfile::TempDir,
}

impl DiskSubject {
    fn server_dir(&self, server_id: &str) -> PathBuf {
        self.dir.path().join(server_id)
    }
}

#[async_trait]
impl Subject for DiskSubject {
    fn factory(&self) -> &'static dyn BackendFactory {
        &DiskFactory
    }

    fn peer_url(&self) -> Option<String> {
        None
    }

    fn plugin_data(&self, server_id: &str, _endpoint: Option<&str>) -> String {
        let dir = self.server_dir(server_id);
        std::fs::create_dir_all(&dir).expect("keys directory");
        format!(
            "keys_path = {:?}\n",
            dir.join("keys.json").display().to_string()
        )
    }

    async fn live_keys(&self, _trust_domain: &str, server_id: &str, key_id: &str) -> Vec<String> {
        let file = KeyFile::new(self.server_dir(server_id).join("keys.json"));
        let entries = file.read().expect("the keys file reads");
        entries
            .get(key_id)
            .map(|der| {
                let key = SoftwareKey::from_pkcs8_der(der).expect("a valid key");
                let spki = key.spki_der().expect("public key");
                vec![Fingerprint::of_spki(&spki).to_string()]
            })
            .unwrap_or_default()
    }

    async fn outage(&self, server_id: &str, on: bool) -> bool {
        let dir = self.server_dir(server_id);
        let away = dir.with_extension("away");
        if on {
            std::fs::rename(&dir, &away).expect("move the keys directory aside");
            std::os::unix::fs::symlink("/sys", &dir).expect("an unwritable directory");
        } else {
            std::fs::remove_file(&dir).expect("remove the symlink");
            std::fs::rename(&away, &dir).expect("put the keys directory back");
        }
        true
    }
}

keymanager_conformance::conformance_suite!(async {
    Arc::new(DiskSubject {
        dir: tempfile::tempdir().expect("temporary directory"),
    }) as Arc<dyn Subject>
});
