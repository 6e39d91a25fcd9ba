//! `aws_kms`'s side of the shared-keys mode; the rotation itself is the kit's
//! ([`keymanager_engine::kit::shared`]).
//!
//! A shared key is an alias (named by `alias_template`); its generations are KMS keys, the
//! alias pointing at the current one. Each key records its generation in its description
//! (`SPIRE_SHARED_KEY/<td>/<key id>/<n>`, read with the alias in one `DescribeKey`) and in
//! tags (for the sweep).
//!
//! The compare-and-swap is `CreateAlias`, which fails with `AlreadyExistsException` when
//! the name exists:
//! - replacing generation n ≥ 1, the lock is the alias
//!   `alias/SPIRE_SHARED_LOCK/<td>/<sha256(alias@n)>-<attempt>`, pointed at generation n's
//!   key (an alias needs a target). Its holder creates generation n+1 (invisible: no alias
//!   points at it) and commits with `UpdateAlias`; lock aliases are never released or
//!   deleted (so a late contender cannot win a stale basis again) and go with their target
//!   key when KMS deletes it;
//! - the first generation has no key to point a lock at: each contender creates a key and
//!   `CreateAlias`es the shared alias itself, so winning the lock *is* publishing. The
//!   losers schedule their key's deletion at once: the only rotation where keys beyond the
//!   one kept are created (once per shared key id, when servers start on an empty store).
//!
//! An alias has neither tags nor (on moto) a creation date, so the lease end is not
//! recorded: a waiter counts the lease from the moment it first saw the lock
//! ([`LockLease::Unrecorded`]), which is later than the holder's start by its own clock.

use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::types::{KeyMetadata, KeySpec, KeyState};
use keymanager_engine::kit::shared::{Generation, LockLease, LockRequest, SharedOps};
use keymanager_engine::{BackendError, BackendErrorKind, KeyId, KeyType};

use crate::backend::AwsKmsBackend;
use crate::errors::{Service, sdk_error};
use crate::naming;

/// One rotation's view of one shared alias.
pub(crate) struct AwsShared<'a> {
    pub backend: &'a AwsKmsBackend,
    /// The shared key's alias.
    pub alias: &'a str,
    /// The SPIRE key id it holds.
    pub key_id: &'a KeyId,
    /// A first-generation key this process published by winning the alias.
    pub published_first: Mutex<Option<Generation>>,
}

/// A KMS key about to become a generation.
pub(crate) struct PreparedKey {
    arn: String,
    generation: u64,
    key_type: KeyType,
}

/// The key type of a KMS key spec SPIRE can use.
pub(crate) fn key_type_of(spec: Option<&KeySpec>) -> Option<KeyType> {
    match spec? {
        KeySpec::EccNistP256 => Some(KeyType::EcP256),
        KeySpec::EccNistP384 => Some(KeyType::EcP384),
        KeySpec::Rsa2048 => Some(KeyType::Rsa2048),
        KeySpec::Rsa4096 => Some(KeyType::Rsa4096),
        _ => None,
    }
}

/// The generation `metadata` (a shared key's) is, or an error naming the alias.
pub(crate) fn generation_of(
    metadata: &KeyMetadata,
    alias: &str,
    trust_domain: &str,
) -> Result<Generation, BackendError> {
    let arn = metadata.arn().unwrap_or(metadata.key_id());
    let number = metadata
        .description()
        .and_then(|d| naming::shared_generation(d, trust_domain))
        .ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::FailedPrecondition,
                format!(
                    "alias {alias} points at KMS key {arn}, which is not a shared key of trust domain {trust_domain} (its description is {:?}); point the alias back or change shared_keys.alias_template",
                    metadata.description().unwrap_or_default()
                ),
            )
        })?;
    Ok(Generation {
        name: arn.to_string(),
        number,
        live: metadata.key_state() == Some(&KeyState::Enabled),
        key_type: key_type_of(metadata.key_spec()),
        created: metadata
            .creation_date()
            .and_then(|d| u64::try_from(d.secs()).ok())
            .map(|secs| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)),
    })
}

impl AwsShared<'_> {
    async fn create_alias(&self, alias: &str, target: &str) -> Result<bool, BackendError> {
        match self
            .backend
            .clients()
            .kms
            .create_alias()
            .alias_name(alias)
            .target_key_id(target)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("AlreadyExistsException") => Ok(false),
            Err(e) => Err(sdk_error(Service::Kms, "CreateAlias", alias, e)),
        }
    }

    async fn create(
        &self,
        generation: u64,
        key_type: KeyType,
    ) -> Result<PreparedKey, BackendError> {
        let arn = self
            .backend
            .create_shared_key(self.alias, self.key_id, key_type, generation)
            .await?;
        Ok(PreparedKey {
            arn,
            generation,
            key_type,
        })
    }
}

#[async_trait]
impl SharedOps for AwsShared<'_> {
    type Prepared = PreparedKey;

    fn lock_name(&self, basis: u64, attempt: u32) -> String {
        if basis == 0 {
            return self.alias.to_string();
        }
        naming::lock_alias(&self.backend.trust_domain, self.alias, basis, attempt)
    }

    async fn generations(&self) -> Result<Vec<Generation>, BackendError> {
        let Some(metadata) = self.backend.describe_key(self.alias).await? else {
            // Eventual consistency: the first generation this process just published.
            return Ok(self
                .published_first
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .into_iter()
                .collect());
        };
        Ok(vec![generation_of(
            &metadata,
            self.alias,
            &self.backend.trust_domain,
        )?])
    }

    async fn create_lock(&self, lock: LockRequest<'_>) -> Result<bool, BackendError> {
        let Some(basis) = lock.basis else {
            // The first generation: the lock is the shared alias itself.
            let first = self.create(1, lock.key_type).await?;
            if self.create_alias(self.alias, &first.arn).await? {
                tracing::info!(alias = self.alias, key = %first.arn, "published the first generation of a shared key");
                *self
                    .published_first
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Generation {
                    name: first.arn,
                    number: 1,
                    live: true,
                    key_type: Some(first.key_type),
                    created: Some(SystemTime::now()),
                });
                return Ok(true);
            }
            self.discard(first).await;
            return Ok(false);
        };
        self.create_alias(lock.name, &basis.name).await
    }

    async fn lock_lease(&self, lock: &str) -> Result<(LockLease, Option<String>), BackendError> {
        Ok(match self.backend.describe_key(lock).await? {
            Some(_) => (LockLease::Unrecorded, None),
            None => (LockLease::Over, None),
        })
    }

    /// Lock aliases stay (see the module docs): the lease ends them.
    async fn release_lock(&self, _lock: &str) {}

    async fn prepare(&self, basis: u64, key_type: KeyType) -> Result<PreparedKey, BackendError> {
        self.create(basis + 1, key_type).await
    }

    async fn discard(&self, prepared: PreparedKey) {
        if let Err(error) = self.backend.schedule_deletion(&prepared.arn, None).await {
            tracing::warn!(key = %prepared.arn, %error, "could not delete an unused shared key candidate; the sweep removes it");
        }
    }

    async fn commit(&self, prepared: PreparedKey) -> Result<Generation, BackendError> {
        self.backend
            .clients()
            .kms
            .update_alias()
            .alias_name(self.alias)
            .target_key_id(&prepared.arn)
            .send()
            .await
            .map_err(|e| sdk_error(Service::Kms, "UpdateAlias", self.alias, e))?;
        Ok(Generation {
            name: prepared.arn,
            number: prepared.generation,
            live: true,
            key_type: Some(prepared.key_type),
            created: Some(SystemTime::now()),
        })
    }
}
