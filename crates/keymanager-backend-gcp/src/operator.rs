//! What an operator runs by hand on `gcp_kms` (the CLI's `keys` and `doctor`): enable and
//! disable a version, read a CryptoKey's IAM bindings, and check the permissions README
//! lists with Cloud KMS's own `testIamPermissions`. Nothing here creates, signs with or
//! destroys a key.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use keymanager_engine::admin::{Check, DeletionWindow, KeyOperator};
use keymanager_engine::lifecycle::KeyRecord;
use keymanager_engine::{Backend, BackendError, BackendErrorKind, KeyHandle, KeyType};

use crate::backend::GcpKmsBackend;
use crate::kms::{crypto_key_of, key_type_of};

/// What README lists for the key ring (tested on it: permissions granted there are
/// inherited by every CryptoKey in it).
const KEY_RING_PERMISSIONS: &[&str] = &[
    "cloudkms.cryptoKeys.create",
    "cloudkms.cryptoKeys.get",
    "cloudkms.cryptoKeys.list",
    "cloudkms.cryptoKeys.update",
    "cloudkms.cryptoKeys.getIamPolicy",
    "cloudkms.cryptoKeys.setIamPolicy",
    "cloudkms.cryptoKeyVersions.create",
    "cloudkms.cryptoKeyVersions.get",
    "cloudkms.cryptoKeyVersions.list",
    "cloudkms.cryptoKeyVersions.destroy",
    "cloudkms.cryptoKeyVersions.useToSign",
    "cloudkms.cryptoKeyVersions.viewPublicKey",
];

/// What signing and stamping need on each of this server's CryptoKeys.
const KEY_PERMISSIONS: &[&str] = &[
    "cloudkms.cryptoKeys.get",
    "cloudkms.cryptoKeys.update",
    "cloudkms.cryptoKeyVersions.useToSign",
    "cloudkms.cryptoKeyVersions.viewPublicKey",
];

/// Cloud KMS's default `destroy_scheduled_duration` (the plugin does not set another).
const DESTROY_SCHEDULED: Duration = Duration::from_secs(30 * 86400);

#[async_trait]
impl KeyOperator for GcpKmsBackend {
    async fn public_key_at(&self, locator: &str) -> Result<(KeyType, Arc<[u8]>), BackendError> {
        let fetched = self.kms().public_key(locator).await?;
        let key_type = key_type_of(&fetched.algorithm).ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::FailedPrecondition,
                format!("{locator} has an algorithm SPIRE cannot use"),
            )
        })?;
        Ok((key_type, Arc::from(fetched.spki_der)))
    }

    async fn set_enabled(&self, record: &KeyRecord, enabled: bool) -> Result<(), BackendError> {
        Ok(self
            .kms()
            .set_version_enabled(&record.locator, enabled)
            .await?)
    }

    fn deletion_window(&self) -> DeletionWindow {
        DeletionWindow::Scheduled {
            after: DESTROY_SCHEDULED,
            what: "Cloud KMS destroy_scheduled_duration; RestoreCryptoKeyVersion undoes it",
        }
    }

    async fn access_summary(&self, locator: &str) -> Result<Vec<String>, BackendError> {
        Ok(self.kms().iam_bindings(crypto_key_of(locator)).await?)
    }

    fn clock_url(&self) -> Option<String> {
        Some(self.service_url.clone())
    }

    async fn checks(&self) -> Vec<Check> {
        let kms = self.kms();
        let mut checks = vec![match kms.principal().await {
            Ok(principal) => Check::ok("credentials", format!("service account {principal}")),
            Err(e) => Check::warn(
                "credentials",
                e.to_string(),
                "set service_account_file or GOOGLE_APPLICATION_CREDENTIALS; without a known principal new keys cannot get the default IAM policy",
            ),
        }];
        let ring = self.key_ring.as_str();
        checks.push(
            match kms.granted(ring, KEY_RING_PERMISSIONS).await {
                Ok(granted) => {
                    let missing: Vec<&str> = KEY_RING_PERMISSIONS
                        .iter()
                        .copied()
                        .filter(|p| !granted.iter().any(|g| g == p))
                        .collect();
                    if missing.is_empty() {
                        Check::ok(
                            "permissions on the key ring",
                            format!("all {} granted on {ring}", KEY_RING_PERMISSIONS.len()),
                        )
                    } else {
                        Check::fail(
                            "permissions on the key ring",
                            format!("missing on {ring}: {}", missing.join(", ")),
                            "grant them to this server's service account (see README, gcp_kms → required permissions)",
                        )
                    }
                }
                Err(e) => Check::fail(
                    "permissions on the key ring",
                    BackendError::from(e).to_string(),
                    "check that key_ring exists and that the credentials can reach Cloud KMS",
                ),
            },
        );
        // This server's CryptoKeys, as discovery finds them.
        let mut own: Vec<String> = self
            .discover()
            .await
            .unwrap_or_default()
            .iter()
            .map(|k| crypto_key_of(k.handle.locator()).to_string())
            .collect();
        own.sort();
        own.dedup();
        let granted = join_all(own.iter().map(|key| kms.granted(key, KEY_PERMISSIONS))).await;
        for (crypto_key, granted) in own.iter().zip(granted) {
            let name = format!("permissions on {crypto_key}");
            checks.push(match granted {
                Ok(granted) => {
                    let missing: Vec<&str> = KEY_PERMISSIONS
                        .iter()
                        .copied()
                        .filter(|p| !granted.iter().any(|g| g == p))
                        .collect();
                    if missing.is_empty() {
                        Check::ok(name, "signing and stamping allowed")
                    } else {
                        Check::fail(
                            name,
                            format!("missing: {}", missing.join(", ")),
                            "grant roles/cloudkms.signerVerifier on the CryptoKey (the plugin's default policy) or the listed permissions",
                        )
                    }
                }
                Err(e) => Check::fail(
                    name,
                    BackendError::from(e).to_string(),
                    "check the CryptoKey's IAM policy",
                ),
            });
        }
        checks
    }
}
