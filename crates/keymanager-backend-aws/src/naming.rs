//! How SPIRE's `aws_kms` names and tags keys; kept byte-for-byte so that a server switching
//! from the built-in plugin finds its existing keys.

/// Prefix of every alias SPIRE's aws_kms creates.
pub const ALIAS_ROOT: &str = "alias/SPIRE_SERVER/";
/// KMS limits alias names to 256 characters.
pub const MAX_ALIAS_LEN: usize = 256;

/// The trust domain as it appears in aliases: `.` becomes `_`.
pub fn alias_trust_domain(trust_domain: &str) -> String {
    trust_domain.replace('.', "_")
}

/// `alias/SPIRE_SERVER/<td>/<server id>/` — every alias of this server starts with it.
pub fn alias_prefix(trust_domain: &str, server_id: &str) -> String {
    format!(
        "{ALIAS_ROOT}{}/{server_id}/",
        alias_trust_domain(trust_domain)
    )
}

/// The alias for a SPIRE key id, or an error when it would exceed KMS's 256 characters.
pub fn alias_name(trust_domain: &str, server_id: &str, key_id: &str) -> Result<String, String> {
    let alias = format!(
        "{}{}",
        alias_prefix(trust_domain, server_id),
        encode_key_id(key_id)
    );
    if alias.len() > MAX_ALIAS_LEN {
        return Err(format!(
            "alias for key {key_id:?} would be {} characters; KMS allows {MAX_ALIAS_LEN}",
            alias.len()
        ));
    }
    Ok(alias)
}

/// The SPIRE key id behind an alias of this server, or `None` for any other alias.
pub fn key_id_from_alias(alias: &str, trust_domain: &str, server_id: &str) -> Option<String> {
    alias
        .strip_prefix(&alias_prefix(trust_domain, server_id))
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
        .map(decode_key_id)
}

/// KMS key description, as SPIRE's code writes it.
pub fn description(trust_domain: &str, key_id: &str) -> String {
    format!(
        "SPIRE_SERVER_KEY/{}/{key_id}",
        alias_trust_domain(trust_domain)
    )
}

/// SPIRE key ids may contain `.` and `+` (ACME ids), which aliases cannot: SPIRE encodes
/// them as `_2e` and `_2b`.
pub fn encode_key_id(key_id: &str) -> String {
    key_id.replace('.', "_2e").replace('+', "_2b")
}

/// The inverse of [`encode_key_id`].
pub fn decode_key_id(encoded: &str) -> String {
    encoded.replace("_2e", ".").replace("_2b", "+")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_match_spires_aws_kms() {
        // The example in SPIRE's aws_kms tests.
        assert_eq!(
            alias_name("test.example.org", "abcd-fghi", "bundle-acme-foo.bar+rsa").unwrap(),
            "alias/SPIRE_SERVER/test_example_org/abcd-fghi/bundle-acme-foo_2ebar_2brsa"
        );
        assert_eq!(
            description("example.org", "x509-CA-A"),
            "SPIRE_SERVER_KEY/example_org/x509-CA-A"
        );
    }

    #[test]
    fn key_ids_round_trip_through_aliases() {
        for id in [
            "x509-CA-A",
            "JWT-Signer-B",
            "WIT-Signer-A",
            "bundle-acme-acme_account+key",
            "a.b+c",
        ] {
            let alias = alias_name("example.org", "srv", id).unwrap();
            assert_eq!(
                key_id_from_alias(&alias, "example.org", "srv").as_deref(),
                Some(id)
            );
        }
    }

    #[test]
    fn aliases_of_other_servers_and_trust_domains_are_not_ours() {
        let alias = alias_name("example.org", "srv-a", "x509-CA-A").unwrap();
        assert_eq!(key_id_from_alias(&alias, "example.org", "srv-b"), None);
        assert_eq!(key_id_from_alias(&alias, "other.org", "srv-a"), None);
        assert_eq!(
            key_id_from_alias(
                "alias/SPIRE_SERVER/example_org/srv-a/",
                "example.org",
                "srv-a"
            ),
            None
        );
        assert_eq!(
            key_id_from_alias("alias/aws/kms", "example.org", "srv-a"),
            None
        );
    }

    #[test]
    fn overlong_aliases_are_refused() {
        let long_id = "k".repeat(250);
        assert!(
            alias_name("example.org", "srv", &long_id)
                .unwrap_err()
                .contains("256")
        );
    }
}
