//! Key names in the form SPIRE's `hashicorp_vault` and `azure_key_vault` built-ins use:
//! `<owner>-<uuid v4>-<SPIRE key id>`, a new UUID per GenerateKey (the owner is the server
//! id for Vault, `spire-key` for Key Vault).

/// A new name for `key_id` under `owner`.
pub fn new_name(owner: &str, key_id: &str) -> String {
    format!("{owner}-{}-{key_id}", uuid::Uuid::new_v4())
}

/// The SPIRE key id of `name` if it is `owner`, a UUID-shaped segment and a non-empty id.
pub fn key_id_of<'a>(name: &'a str, owner: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(owner)?.strip_prefix('-')?;
    let (uuid, key_id) = (rest.get(..36)?, rest.get(36..)?.strip_prefix('-')?);
    (is_uuid_shaped(uuid) && !key_id.is_empty()).then_some(key_id)
}

/// `8-4-4-4-12` hex digits.
fn is_uuid_shaped(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_junk_is_refused() {
        let name = new_name("srv", "x509-CA-A");
        assert_eq!(key_id_of(&name, "srv"), Some("x509-CA-A"));
        assert_eq!(key_id_of(&name, "sr"), None);
        assert_eq!(
            key_id_of("srv-not-a-uuid-at-all-xxxxxxxxxxxxxxxxxx-a", "srv"),
            None
        );
        assert_eq!(
            key_id_of("srv-0f8fad5b-d9cb-469f-a165-70867728950e-", "srv"),
            None
        );
        assert_eq!(
            key_id_of(
                "srv-0f8fad5b-d9cb-469f-a165-70867728950e-JWT-Signer-A",
                "srv"
            ),
            Some("JWT-Signer-A")
        );
    }
}
