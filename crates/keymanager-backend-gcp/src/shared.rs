//! `gcp_kms`'s side of the shared-keys mode; the rotation itself is the kit's
//! ([`keymanager_engine::kit::shared`]).
//!
//! A shared key is one CryptoKey; its generations are the CryptoKey's versions. The lock is
//! a CryptoKey *creation*, which Cloud KMS makes atomic (exactly one creator of an id
//! succeeds, the others get ALREADY_EXISTS): `spire-lock-<sha1(key@basis)>-<attempt>`,
//! labelled with its holder and lease end. Upstream's draft writes a "lock" label instead,
//! which is no compare-and-swap. Versions carry no labels to record a creator, so "another
//! server's version" means "not served here".
//!
//! Lock CryptoKeys never get versions (Cloud KMS bills versions, not keys) and cannot be
//! deleted (Cloud KMS never deletes CryptoKeys): one is left per shared rotation.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use google_cloud_kms_v1::model::crypto_key_version::CryptoKeyVersionAlgorithm as Algorithm;
use keymanager_engine::kit::shared::{Generation, LockLease, LockRequest, SharedOps};
use keymanager_engine::lifecycle::{parse_stamp, stamp_text};
use keymanager_engine::{BackendError, KeyType};

use crate::backend::GcpKmsBackend;
use crate::kms;
use crate::naming;

/// The lease value a holder writes to release its lock early.
pub(crate) const RELEASED: &str = "0";

/// One rotation's view of one shared CryptoKey.
pub(crate) struct GcpShared<'a> {
    pub backend: &'a GcpKmsBackend,
    /// The shared CryptoKey's resource name.
    pub crypto_key: &'a str,
    /// The trust domain label value.
    pub td_hash: &'a str,
    /// The algorithm the CryptoKey gives new versions now.
    pub template: Mutex<Algorithm>,
}

#[async_trait]
impl SharedOps for GcpShared<'_> {
    type Prepared = ();

    fn lock_name(&self, basis: u64, attempt: u32) -> String {
        naming::lock_crypto_key_id(self.crypto_key, basis, attempt)
    }

    async fn generations(&self) -> Result<Vec<Generation>, BackendError> {
        Ok(self
            .backend
            .kms()
            .list_versions(self.crypto_key, "")
            .await?
            .into_iter()
            .map(|v| Generation {
                number: kms::version_number(&v.name),
                live: kms::is_live(&v.state),
                created: kms::to_system_time(v.create_time.as_ref()),
                key_type: kms::key_type_of(&v.algorithm),
                name: v.name,
            })
            .collect())
    }

    async fn create_lock(&self, lock: LockRequest<'_>) -> Result<bool, BackendError> {
        let labels = HashMap::from([
            (naming::LABEL_TRUST_DOMAIN.into(), self.td_hash.to_string()),
            (naming::LABEL_LOCK.into(), "true".into()),
            (naming::LABEL_LOCK_HOLDER.into(), lock.holder.to_string()),
            (
                naming::LABEL_LOCK_EXPIRES.into(),
                stamp_text(lock.lease_end),
            ),
        ]);
        match self
            .backend
            .create_crypto_key(lock.name, Algorithm::EcSignP256Sha256, labels, true)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.already_exists() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn lock_lease(&self, lock: &str) -> Result<(LockLease, Option<String>), BackendError> {
        let labels = self
            .backend
            .kms()
            .get_crypto_key(&self.backend.crypto_key_name(lock))
            .await?
            .labels;
        let lease = labels
            .get(naming::LABEL_LOCK_EXPIRES)
            .and_then(|v| parse_stamp(v))
            .map_or(LockLease::Over, LockLease::Until);
        Ok((lease, labels.get(naming::LABEL_LOCK_HOLDER).cloned()))
    }

    async fn release_lock(&self, lock: &str) {
        let kms = self.backend.kms();
        let name = self.backend.crypto_key_name(lock);
        let released = async {
            let lock = kms.get_crypto_key(&name).await?;
            let mut labels = lock.labels.clone();
            labels.insert(naming::LABEL_LOCK_EXPIRES.into(), RELEASED.into());
            kms.set_labels(&lock, labels).await
        };
        if let Err(e) = released.await {
            tracing::debug!(lock = %name, error = %e.error, "could not release the rotation lock; its lease ends it");
        }
    }

    /// Points the CryptoKey's version template at the algorithm of `key_type`.
    async fn prepare(&self, _basis: u64, key_type: KeyType) -> Result<(), BackendError> {
        let algorithm = kms::algorithm_for(key_type);
        let current = self
            .template
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if current != algorithm {
            let kms = self.backend.kms();
            let key = kms.get_crypto_key(self.crypto_key).await?;
            kms.set_template_algorithm(&key, algorithm.clone()).await?;
            *self.template.lock().unwrap_or_else(PoisonError::into_inner) = algorithm;
        }
        Ok(())
    }

    async fn discard(&self, _prepared: ()) {}

    async fn commit(&self, _prepared: ()) -> Result<Generation, BackendError> {
        let version = self.backend.kms().create_version(self.crypto_key).await?;
        Ok(Generation {
            number: kms::version_number(&version.name),
            live: true,
            created: kms::to_system_time(version.create_time.as_ref()),
            key_type: kms::key_type_of(&version.algorithm),
            name: version.name,
        })
    }
}
