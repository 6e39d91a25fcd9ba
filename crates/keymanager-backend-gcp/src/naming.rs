//! CryptoKey ids and labels, as SPIRE's `gcp_kms` writes them, plus the shared-keys mode's
//! template and the rotation lock's key ids.

use keymanager_engine::kit::shared::{KEY_ID_FIELD, NameTemplate};
use keymanager_engine::kit::vocabulary as tags;
use sha1::{Digest, Sha1};

/// Prefix of SPIRE's per-server CryptoKey ids: `spire-key-<server id>-<key id>`.
pub const CRYPTO_KEY_PREFIX: &str = "spire-key";
/// Cloud KMS caps CryptoKey ids at 63 characters.
pub const MAX_CRYPTO_KEY_ID_LEN: usize = 63;
/// The longest SPIRE key id (`JWT-Signer-A`, `WIT-Signer-B`) the server id must leave room for.
pub const MAX_SPIRE_KEY_ID_LEN: usize = 12;

/// SHA-1 of the trust domain (label values cannot hold dots).
pub const LABEL_TRUST_DOMAIN: &str = tags::TRUST_DOMAIN;
/// The owning server's id (per-server keys only).
pub const LABEL_SERVER_ID: &str = tags::SERVER_ID;
/// Unix seconds of the last liveness stamp.
pub const LABEL_LAST_UPDATE: &str = tags::LAST_UPDATE;
/// `true` once published (discovery uses it); `false` while being created and once its
/// versions are destroyed.
pub const LABEL_ACTIVE: &str = tags::ACTIVE;
/// `true` on the CryptoKeys of the shared-keys mode.
pub const LABEL_SHARED: &str = "spire-shared";
/// `true` on rotation-lock CryptoKeys (they never get versions).
pub const LABEL_LOCK: &str = "spire-lock";
/// The lock holder's server id.
pub const LABEL_LOCK_HOLDER: &str = "spire-lock-holder";
/// Unix seconds when the lock's lease ends.
pub const LABEL_LOCK_EXPIRES: &str = "spire-lock-expires";

/// The `spire-server-td` label value: hex SHA-1 of the trust domain name.
pub fn trust_domain_hash(trust_domain: &str) -> String {
    hex::encode(Sha1::digest(trust_domain.as_bytes()))
}

/// The longest server id that keeps `spire-key-<id>-<key id>` within 63 characters.
pub const MAX_SERVER_ID_LEN: usize =
    MAX_CRYPTO_KEY_ID_LEN - CRYPTO_KEY_PREFIX.len() - 2 - MAX_SPIRE_KEY_ID_LEN;

/// A server id must be a valid label value (lowercase letters, digits, `_`, `-`) and short
/// enough for the CryptoKey ids it goes into.
pub fn check_server_id(value: &str) -> Result<(), String> {
    if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    {
        return Err(format!(
            "{value:?} may only contain lowercase letters, digits, '_' and '-' (it is a Cloud KMS label value)"
        ));
    }
    if value.len() > MAX_SERVER_ID_LEN {
        return Err(format!(
            "{value:?} is {} characters; at most {MAX_SERVER_ID_LEN} keep CryptoKey ids (spire-key-<id>-<key id>) within 63",
            value.len()
        ));
    }
    Ok(())
}

/// A CryptoKey id must be 1–63 of `[a-zA-Z0-9_-]`.
pub fn check_crypto_key_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_CRYPTO_KEY_ID_LEN {
        return Err(format!(
            "CryptoKey id {id:?} must be 1 to {MAX_CRYPTO_KEY_ID_LEN} characters"
        ));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "CryptoKey id {id:?} may only contain letters, digits, '_' and '-'"
        ));
    }
    Ok(())
}

/// SPIRE's per-server CryptoKey id.
pub fn standard_crypto_key_id(server_id: &str, key_id: &str) -> String {
    format!("{CRYPTO_KEY_PREFIX}-{server_id}-{key_id}")
}

/// The SPIRE key id inside a per-server CryptoKey id, if it is this server's.
pub fn key_id_from_standard(crypto_key_id: &str, server_id: &str) -> Option<String> {
    crypto_key_id
        .strip_prefix(&format!("{CRYPTO_KEY_PREFIX}-{server_id}-"))
        .filter(|id| !id.is_empty())
        .map(str::to_string)
}

/// The last path segment of a resource name.
pub fn last_segment(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// The rotation lock's CryptoKey id for replacing version `basis` (0: no version yet) of
/// `crypto_key`, attempt `attempt` (bumped when an expired lease is taken over). Creating a
/// CryptoKey is atomic in Cloud KMS: exactly one creator of an id succeeds.
pub fn lock_crypto_key_id(crypto_key: &str, basis: u64, attempt: u32) -> String {
    let digest = Sha1::digest(format!("{crypto_key}@{basis}").as_bytes());
    format!("spire-lock-{}-{attempt}", &hex::encode(digest)[..24])
}

/// The fields of a `crypto_key_template`, as SPIRE documents them: `{{ .TrustDomain }}`
/// (the SHA-1 hex of the trust domain, as in labels) and `{{ .KeyID }}`.
pub const TEMPLATE_FIELDS: &[&str] = &["TrustDomain", KEY_ID_FIELD];

/// The CryptoKey id a `crypto_key_template` gives a key id, checked against Cloud KMS's id
/// rules.
pub fn render_shared(
    template: &NameTemplate,
    trust_domain_hash: &str,
    key_id: &str,
) -> Result<String, String> {
    let id = template.render(&[trust_domain_hash, key_id]);
    check_crypto_key_id(&id).map_err(|e| format!("template {:?} gives {e}", template.source()))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domain_hash_is_sha1_hex() {
        // SHA-1("example.org"), computed independently with `printf example.org | sha1sum`.
        assert_eq!(
            trust_domain_hash("example.org"),
            "20116dfd6774a9e7b32eddfea3f6cb094e38fc3f"
        );
        assert_ne!(trust_domain_hash("a.org"), trust_domain_hash("b.org"));
    }

    #[test]
    fn standard_names_round_trip_and_stay_within_63_characters() {
        let server = uuid::Uuid::new_v4().hyphenated().to_string();
        let id = standard_crypto_key_id(&server, "JWT-Signer-A");
        assert!(id.len() <= MAX_CRYPTO_KEY_ID_LEN, "{id}");
        assert_eq!(
            key_id_from_standard(&id, &server).as_deref(),
            Some("JWT-Signer-A")
        );
        assert_eq!(key_id_from_standard(&id, "other"), None);
        assert!(check_server_id(&server).is_ok());
        assert!(check_server_id(&"a".repeat(MAX_SERVER_ID_LEN + 1)).is_err());
    }

    #[test]
    fn shared_names_are_checked_against_crypto_key_id_rules() {
        let t = NameTemplate::parse("spire-key-{{ .TrustDomain }}-{{.KeyID}}", TEMPLATE_FIELDS)
            .unwrap();
        assert_eq!(
            render_shared(&t, "abc", "JWT-Signer-A").unwrap(),
            "spire-key-abc-JWT-Signer-A"
        );
        let long = NameTemplate::parse(
            &format!("{}-{{{{ .KeyID }}}}", "x".repeat(60)),
            TEMPLATE_FIELDS,
        )
        .unwrap();
        assert!(
            render_shared(&long, "t", "JWT-Signer-A")
                .unwrap_err()
                .contains("1 to 63")
        );
    }

    #[test]
    fn lock_ids_depend_on_key_basis_and_attempt() {
        let a = lock_crypto_key_id("projects/p/locations/l/keyRings/r/cryptoKeys/k", 3, 0);
        assert!(check_crypto_key_id(&a).is_ok());
        assert_ne!(
            a,
            lock_crypto_key_id("projects/p/locations/l/keyRings/r/cryptoKeys/k", 4, 0)
        );
        assert_ne!(
            a,
            lock_crypto_key_id("projects/p/locations/l/keyRings/r/cryptoKeys/k", 3, 1)
        );
        assert_ne!(
            a,
            lock_crypto_key_id("projects/p/locations/l/keyRings/r/cryptoKeys/j", 3, 0)
        );
    }
}
