//! Key names and tags, exactly as SPIRE's built-in `azure_key_vault` makes them: the name
//! `spire-key-<uuid v4>-<SPIRE key id>` (a new UUID per GenerateKey; SPIRE reads the key id
//! back from offset 47), the tags `spire-server-td` and `spire-server-id`.
//!
//! Ours on top: a key being prepared carries [`PENDING_TD`] instead of [`TRUST_DOMAIN`], so
//! that neither our discovery nor SPIRE's built-in (both need the trust-domain tag) sees it
//! until it is published.

use keymanager_engine::kit::uuid_name;

pub use keymanager_engine::kit::vocabulary::{SERVER_ID, TRUST_DOMAIN};

/// The trust domain of a key that is prepared but not yet published.
pub const PENDING_TD: &str = "spire-pending-td";

/// The fixed first part of SPIRE's Key Vault key names (`spire-key-<uuid>-<id>`).
const OWNER: &str = "spire-key";
/// `spire-key-` + 36-character UUID + `-`: where the SPIRE key id starts.
const KEY_ID_OFFSET: usize = OWNER.len() + 1 + 37;
/// Key Vault's longest key name.
const MAX_NAME: usize = 127;

/// Why a SPIRE key id cannot become a key name.
pub fn check_key_id(key_id: &str) -> Result<(), String> {
    if let Some(bad) = key_id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "key id {key_id:?} contains {bad:?}; Key Vault key names allow only letters, digits and '-'"
        ));
    }
    if KEY_ID_OFFSET + key_id.len() > MAX_NAME {
        return Err(format!(
            "key id {key_id:?} is {} characters long; at most {} fit a Key Vault key name",
            key_id.len(),
            MAX_NAME - KEY_ID_OFFSET
        ));
    }
    Ok(())
}

/// A new key name for `key_id`.
pub fn key_name(key_id: &str) -> String {
    uuid_name::new_name(OWNER, key_id)
}

/// The SPIRE key id of a name in SPIRE's format.
pub fn key_id_of(name: &str) -> Option<&str> {
    uuid_name::key_id_of(name, OWNER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_from_offset_47() {
        let name = key_name("x509-CA-A");
        assert_eq!(&name[47..], "x509-CA-A");
        assert_eq!(key_id_of(&name), Some("x509-CA-A"));
        assert_ne!(key_name("a"), key_name("a"), "a new name each time");
        assert_eq!(
            key_id_of("spire-key-0a1b2c3d-0000-4000-8000-00000000000f-JWT-Signer-A"),
            Some("JWT-Signer-A")
        );
        for foreign in [
            "spire-key-not-a-uuid-at-all-0000-000000000000-x",
            "spire-key-0a1b2c3d-0000-4000-8000-00000000000f-",
            "spire-key-0a1b2c3d-0000-4000-8000-00000000000f",
            "other-0a1b2c3d-0000-4000-8000-00000000000f-x",
            "",
        ] {
            assert_eq!(key_id_of(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn key_ids_key_vault_refuses_are_named() {
        assert!(check_key_id("x509-CA-A").is_ok());
        assert!(check_key_id(&"a".repeat(80)).is_ok());
        let err = check_key_id("JWT-Signer-EC_P256").unwrap_err();
        assert!(
            err.contains("'_'") && err.contains("JWT-Signer-EC_P256"),
            "{err}"
        );
        let err = check_key_id(&"a".repeat(81)).unwrap_err();
        assert!(err.contains("at most 80"), "{err}");
        assert_eq!(key_name(&"a".repeat(80)).len(), 127);
    }
}
