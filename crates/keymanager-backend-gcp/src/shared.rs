//! Shared-keys mode: several servers (in several regions too) sign with the same CryptoKeys.
//!
//! Rotation must create exactly one version however many servers rotate at once. Upstream's
//! draft writes a "lock" label, which is not compare-and-swap: two servers can both read it
//! free and both write it. Here the lock is a CryptoKey *creation*, which Cloud KMS makes
//! atomic (exactly one creator of an id succeeds, the others get ALREADY_EXISTS):
//!
//! 1. Reuse: if the newest live version of the shared CryptoKey was created less than
//!    `reuse_window` ago by another server, adopt it. "Another server" means: not a version
//!    this process has served from a GenerateKey (versions only found at start-up count as
//!    another server's), since Cloud KMS versions carry no labels to record a creator.
//! 2. Lock: create `spire-lock-<sha1(key@basis)>-<attempt>`, where `basis` is the highest
//!    version number seen. Everyone rotating from the same state contends for the same id.
//! 3. The winner checks again that no version appeared, creates one, and releases the lock;
//!    the others poll the versions until the winner's appears and adopt it (step 1).
//! 4. Lease: the lock carries `spire-lock-expires`. A holder that crashed before creating
//!    its version blocks nobody for longer: after the lease, the next `attempt` id is free.
//!    A holder never starts its creation call when less than one call timeout of its lease
//!    is left, so a slow holder and its successor cannot both create.
//!
//! Lock CryptoKeys never get versions (Cloud KMS bills versions, not keys) and cannot be
//! deleted (Cloud KMS never deletes CryptoKeys): one is left per shared rotation.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use google_cloud_kms_v1::model::CryptoKeyVersion;
use google_cloud_kms_v1::model::crypto_key_version::CryptoKeyVersionAlgorithm as Algorithm;
use keymanager_engine::lifecycle::{parse_stamp, stamp_text};
use keymanager_engine::{BackendError, BackendErrorKind, BackendKey, KeyId, KeyType};

use crate::backend::{GENERATION_BUDGET, GcpKmsBackend, VersionRef};
use crate::kms::{self, ATTEMPT_TIMEOUT};
use crate::naming;

/// How often a waiting server looks for the lock holder's version.
const WAIT_POLL: Duration = Duration::from_millis(200);
/// Clocks of servers may disagree: a lease counts as expired only this long after its end.
const LEASE_SKEW: Duration = Duration::from_secs(2);

/// Rotates (or first creates) the shared key `id`.
pub(crate) async fn rotate(
    backend: &GcpKmsBackend,
    id: &KeyId,
    key_type: KeyType,
    replaces: Option<&VersionRef>,
) -> Result<BackendKey, BackendError> {
    let Some(shared) = &backend.shared else {
        return Err(BackendError::new(
            BackendErrorKind::Internal,
            "shared rotation without shared_keys",
        ));
    };
    let crypto_key_id = shared
        .template
        .render(&backend.td_hash, id.as_str())
        .map_err(|reason| BackendError::new(BackendErrorKind::InvalidArgument, reason))?;
    let name = backend.crypto_key_name(&crypto_key_id);
    let algorithm = kms::algorithm_for(key_type);
    let mut template_algorithm =
        ensure_shared_key(backend, &crypto_key_id, &name, algorithm.clone()).await?;
    let started = Instant::now();
    tracing::debug!(crypto_key = %name, replacing = ?replaces.map(|r| &r.version), "rotating shared key");

    loop {
        let versions = backend.kms.list_versions(&name, "").await?;
        // A version found at start-up but never served from a GenerateKey here counts as
        // another server's, even when it is the one `replaces` points at.
        let served_here = |name: &str| backend.generated_here(name);
        if let Some(fresh) = reusable(&versions, &algorithm, served_here, shared.reuse_window) {
            tracing::info!(version = %fresh.name, "reusing a shared version another server created moments ago");
            let key = backend.await_key(id, &fresh.name, true).await?;
            backend.remember_generated(&fresh.name);
            return Ok(key);
        }
        let basis = versions
            .iter()
            .map(|v| kms::version_number(&v.name))
            .max()
            .unwrap_or(0);

        let mut attempt = 0;
        loop {
            if started.elapsed() > GENERATION_BUDGET {
                return Err(BackendError::new(
                    BackendErrorKind::Unavailable,
                    format!(
                        "gave up rotating shared key {name}: no version appeared within {}s",
                        GENERATION_BUDGET.as_secs()
                    ),
                ));
            }
            let lock_id = naming::lock_crypto_key_id(&name, basis, attempt);
            let acquired_at = Instant::now();
            let expires = SystemTime::now() + shared.lock_lease;
            match backend
                .create_crypto_key(
                    &lock_id,
                    Algorithm::EcSignP256Sha256,
                    lock_labels(backend, expires),
                    true,
                )
                .await
            {
                Ok(lock) => {
                    let created = create_as_holder(
                        backend,
                        &name,
                        basis,
                        algorithm.clone(),
                        &mut template_algorithm,
                        acquired_at,
                        shared.lock_lease,
                    )
                    .await;
                    release(backend, &lock).await;
                    match created? {
                        Some(version) => {
                            tracing::info!(version = %version, lock = %lock_id, "created the shared version under the rotation lock");
                            let key = backend.await_key(id, &version, true).await?;
                            backend.remember_generated(&version);
                            return Ok(key);
                        }
                        // Someone created a version meanwhile: adopt it.
                        None => break,
                    }
                }
                Err(e) if e.already_exists() => {
                    let lock_name = backend.crypto_key_name(&lock_id);
                    let lock = backend.kms.get_crypto_key(&lock_name).await?;
                    if lease_expired(&lock.labels) {
                        tracing::warn!(lock = %lock_name, holder = ?lock.labels.get(naming::LABEL_LOCK_HOLDER), "rotation lock lease expired; taking over");
                        attempt += 1;
                        continue;
                    }
                    if wait_for_new_version(backend, &name, basis, &lock_name, lock.labels).await? {
                        break;
                    }
                    // The lease ran out without a version: contend for the next attempt.
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Makes sure the shared CryptoKey exists (created without a version: versions are only ever
/// created under the lock) and returns the algorithm its template gives new versions.
async fn ensure_shared_key(
    backend: &GcpKmsBackend,
    crypto_key_id: &str,
    name: &str,
    algorithm: Algorithm,
) -> Result<Algorithm, BackendError> {
    let key = match backend.kms.get_crypto_key(name).await {
        Ok(key) => key,
        Err(e) if e.not_found() => {
            match backend
                .create_crypto_key(
                    crypto_key_id,
                    algorithm.clone(),
                    backend.shared_labels(SystemTime::now()),
                    true,
                )
                .await
            {
                Ok(key) => {
                    backend.ensure_policy(&key.name).await?;
                    key
                }
                Err(e) if e.already_exists() => backend.kms.get_crypto_key(name).await?,
                Err(e) => return Err(e.into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    Ok(key
        .version_template
        .map(|t| t.algorithm)
        .unwrap_or(algorithm))
}

/// The newest live version if it may be adopted: right algorithm, created inside the reuse
/// window, and not one this server already served.
fn reusable<'a>(
    versions: &'a [CryptoKeyVersion],
    algorithm: &Algorithm,
    served_here: impl Fn(&str) -> bool,
    window: Duration,
) -> Option<&'a CryptoKeyVersion> {
    let newest = versions
        .iter()
        .filter(|v| kms::is_live(&v.state))
        .max_by_key(|v| kms::version_number(&v.name))?;
    let created = kms::to_system_time(newest.create_time.as_ref())?;
    let age = SystemTime::now()
        .duration_since(created)
        .unwrap_or(Duration::ZERO);
    (&newest.algorithm == algorithm && age < window && !served_here(&newest.name)).then_some(newest)
}

/// The holder's part: check again, then create exactly one version. `None` when another
/// version appeared since `basis` was read.
async fn create_as_holder(
    backend: &GcpKmsBackend,
    name: &str,
    basis: u64,
    algorithm: Algorithm,
    template_algorithm: &mut Algorithm,
    acquired_at: Instant,
    lease: Duration,
) -> Result<Option<String>, BackendError> {
    let versions = backend.kms.list_versions(name, "").await?;
    if versions
        .iter()
        .any(|v| kms::version_number(&v.name) > basis)
    {
        return Ok(None);
    }
    if *template_algorithm != algorithm {
        let key = backend.kms.get_crypto_key(name).await?;
        backend
            .kms
            .set_template_algorithm(&key, algorithm.clone())
            .await?;
        *template_algorithm = algorithm;
    }
    if acquired_at.elapsed() + ATTEMPT_TIMEOUT + LEASE_SKEW >= lease {
        return Err(BackendError::new(
            BackendErrorKind::Unavailable,
            format!("rotation lock of {name} held too long to create a version safely; retry"),
        ));
    }
    let version = backend.kms.create_version(name).await?;
    Ok(Some(version.name))
}

fn lock_labels(backend: &GcpKmsBackend, expires: SystemTime) -> HashMap<String, String> {
    HashMap::from([
        (naming::LABEL_TRUST_DOMAIN.into(), backend.td_hash.clone()),
        (naming::LABEL_LOCK.into(), "true".into()),
        (naming::LABEL_LOCK_HOLDER.into(), backend.server_id.clone()),
        (naming::LABEL_LOCK_EXPIRES.into(), stamp_text(expires)),
    ])
}

fn lease_expired(labels: &HashMap<String, String>) -> bool {
    let Some(expires) = labels
        .get(naming::LABEL_LOCK_EXPIRES)
        .and_then(|v| parse_stamp(v))
    else {
        return true;
    };
    SystemTime::now() > expires + LEASE_SKEW
}

/// Ends the lease early so waiters need not sit it out (best effort: the lease ends anyway).
async fn release(backend: &GcpKmsBackend, lock: &google_cloud_kms_v1::model::CryptoKey) {
    let mut labels = lock.labels.clone();
    labels.insert(naming::LABEL_LOCK_EXPIRES.into(), "0".into());
    if let Err(e) = backend.kms.set_labels(lock, labels).await {
        tracing::debug!(lock = %lock.name, error = %e.error, "could not release the rotation lock; its lease ends it");
    }
}

/// Waits while the lock is held: true once a version newer than `basis` exists, false once
/// the lease has run out (or was released) without one.
async fn wait_for_new_version(
    backend: &GcpKmsBackend,
    name: &str,
    basis: u64,
    lock_name: &str,
    lock_labels: HashMap<String, String>,
) -> Result<bool, BackendError> {
    let mut labels = lock_labels;
    let mut checks = 0u32;
    loop {
        tokio::time::sleep(WAIT_POLL).await;
        let versions = backend.kms.list_versions(name, "").await?;
        if versions
            .iter()
            .any(|v| kms::version_number(&v.name) > basis)
        {
            return Ok(true);
        }
        checks += 1;
        // Re-read the lease now and then: the holder may have released it empty-handed.
        if checks.is_multiple_of(5) {
            labels = backend.kms.get_crypto_key(lock_name).await?.labels;
        }
        if lease_expired(&labels) {
            tracing::debug!(lock = lock_name, holder = ?labels.get(naming::LABEL_LOCK_HOLDER), "rotation lock ended without a new version");
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use google_cloud_kms_v1::model::crypto_key_version::CryptoKeyVersionState as State;
    use google_cloud_wkt::Timestamp;

    use super::*;

    fn version(n: u64, age: Duration, state: State) -> CryptoKeyVersion {
        let created = SystemTime::now() - age;
        let secs = created
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        CryptoKeyVersion::new()
            .set_name(format!("k/cryptoKeyVersions/{n}"))
            .set_state(state)
            .set_algorithm(Algorithm::EcSignP256Sha256)
            .set_create_time(Timestamp::clamp(secs, 0))
    }

    fn replacing(n: u64) -> VersionRef {
        VersionRef {
            crypto_key: "k".into(),
            version: format!("k/cryptoKeyVersions/{n}"),
            algorithm: Algorithm::EcSignP256Sha256,
            shared: true,
        }
    }

    const WINDOW: Duration = Duration::from_secs(15 * 60);
    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_fresh_version_of_another_server_is_reused() {
        let versions = [
            version(1, 60 * MIN, State::Enabled),
            version(2, MIN, State::PendingGeneration),
        ];
        let found = reusable(
            &versions,
            &Algorithm::EcSignP256Sha256,
            |n: &str| n == replacing(1).version,
            WINDOW,
        );
        assert_eq!(
            found.map(|v| v.name.as_str()),
            Some("k/cryptoKeyVersions/2")
        );
    }

    #[test]
    fn the_version_being_replaced_old_versions_and_other_algorithms_are_not() {
        let versions = [version(1, MIN, State::Enabled)];
        assert!(
            reusable(
                &versions,
                &Algorithm::EcSignP256Sha256,
                |n: &str| n == replacing(1).version,
                WINDOW
            )
            .is_none()
        );
        let versions = [version(1, 20 * MIN, State::Enabled)];
        assert!(
            reusable(
                &versions,
                &Algorithm::EcSignP256Sha256,
                |_: &str| false,
                WINDOW
            )
            .is_none()
        );
        let versions = [version(1, MIN, State::Enabled)];
        assert!(
            reusable(
                &versions,
                &Algorithm::EcSignP384Sha384,
                |_: &str| false,
                WINDOW
            )
            .is_none()
        );
        let versions = [version(1, MIN, State::DestroyScheduled)];
        assert!(
            reusable(
                &versions,
                &Algorithm::EcSignP256Sha256,
                |_: &str| false,
                WINDOW
            )
            .is_none()
        );
    }

    #[test]
    fn leases_expire_after_their_end_plus_skew() {
        let labels = |t: SystemTime| {
            HashMap::from([(naming::LABEL_LOCK_EXPIRES.to_string(), stamp_text(t))])
        };
        assert!(!lease_expired(&labels(SystemTime::now() + MIN)));
        assert!(lease_expired(&labels(SystemTime::now() - MIN)));
        assert!(lease_expired(&HashMap::new()));
    }
}
