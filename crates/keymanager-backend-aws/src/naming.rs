//! How SPIRE's `aws_kms` names and tags keys; kept byte-for-byte so that a server switching
//! from the built-in plugin finds its existing keys.

use keymanager_engine::kit::shared::{KEY_ID_FIELD, NameTemplate};
use sha2::{Digest, Sha256};

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

/// Root of the rotation-lock aliases of the shared-keys mode. Outside `alias/SPIRE_SERVER/`:
/// SPIRE's built-in `aws_kms` deletes aliases there (and their keys) that it finds stale.
pub const LOCK_ALIAS_ROOT: &str = "alias/SPIRE_SHARED_LOCK/";
/// Prefix of a shared key's description (not SPIRE's `SPIRE_SERVER_KEY/`: SPIRE's orphan
/// sweep deletes keys with that description that no alias points at, which a superseded
/// shared key still in use by other servers is).
pub const SHARED_DESCRIPTION_ROOT: &str = "SPIRE_SHARED_KEY/";
/// `true` on the keys of the shared-keys mode.
pub const TAG_SHARED: &str = "spire-shared";
/// The alias a shared key was created for.
pub const TAG_SHARED_ALIAS: &str = "spire-shared-alias";
/// The shared key's generation under its alias (1, 2, …).
pub const TAG_GENERATION: &str = "spire-shared-generation";

/// The fields of an `alias_template`: `{{ .TrustDomain }}` (dots written `_`, as in
/// SPIRE's aliases), `{{ .Region }}` and `{{ .KeyID }}` (`.` and `+` encoded as in SPIRE's
/// aliases).
pub const TEMPLATE_FIELDS: &[&str] = &["TrustDomain", "Region", KEY_ID_FIELD];

/// The alias an `alias_template` gives a key id, checked against KMS's alias rules.
pub fn render_shared(
    template: &NameTemplate,
    trust_domain: &str,
    region: &str,
    key_id: &str,
) -> Result<String, String> {
    let alias = template.render(&[
        &alias_trust_domain(trust_domain),
        region,
        &encode_key_id(key_id),
    ]);
    let source = template.source();
    if !alias.starts_with("alias/") || alias.len() <= "alias/".len() {
        return Err(format!(
            "template {source:?} gives {alias:?}; an alias name starts with \"alias/\""
        ));
    }
    if alias.starts_with("alias/aws/") {
        return Err(format!(
            "template {source:?} gives {alias:?}; \"alias/aws/\" is reserved for AWS managed keys"
        ));
    }
    if alias.starts_with(ALIAS_ROOT) || alias.starts_with(LOCK_ALIAS_ROOT) {
        return Err(format!(
            "template {source:?} gives {alias:?}; {ALIAS_ROOT:?} holds per-server aliases (SPIRE's built-in sweeps stale ones there) and {LOCK_ALIAS_ROOT:?} the rotation locks: choose another prefix"
        ));
    }
    if let Some(bad) = alias
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "/_-".contains(*c)))
    {
        return Err(format!(
            "template {source:?} gives {alias:?}, which contains {bad:?}; alias names allow letters, digits, '/', '_' and '-'"
        ));
    }
    if alias.len() > MAX_ALIAS_LEN {
        return Err(format!(
            "template {source:?} gives an alias of {} characters; KMS allows {MAX_ALIAS_LEN}",
            alias.len()
        ));
    }
    Ok(alias)
}

/// The rotation lock's alias for replacing generation `basis` of the shared key behind
/// `alias`, attempt `attempt`. `CreateAlias` fails when the name exists: exactly one
/// creator wins.
pub fn lock_alias(trust_domain: &str, alias: &str, basis: u64, attempt: u32) -> String {
    let digest = hex::encode(Sha256::digest(format!("{alias}@{basis}").as_bytes()));
    format!(
        "{LOCK_ALIAS_ROOT}{}/{}-{attempt}",
        alias_trust_domain(trust_domain),
        &digest[..32]
    )
}

/// A shared key's description: `SPIRE_SHARED_KEY/<td>/<key id>/<generation>`.
pub fn shared_description(trust_domain: &str, key_id: &str, generation: u64) -> String {
    format!(
        "{SHARED_DESCRIPTION_ROOT}{}/{}/{generation}",
        alias_trust_domain(trust_domain),
        encode_key_id(key_id)
    )
}

/// The generation in a shared key's description, if it is a shared key of `trust_domain`.
pub fn shared_generation(description: &str, trust_domain: &str) -> Option<u64> {
    let rest = description.strip_prefix(&format!(
        "{SHARED_DESCRIPTION_ROOT}{}/",
        alias_trust_domain(trust_domain)
    ))?;
    let (_, generation) = rest.rsplit_once('/')?;
    generation.parse().ok().filter(|g| *g > 0)
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

    #[test]
    fn shared_aliases_are_checked_and_locks_differ_by_basis_and_attempt() {
        let t = NameTemplate::parse(
            "alias/spire/{{ .TrustDomain }}/{{ .Region }}/{{ .KeyID }}",
            TEMPLATE_FIELDS,
        )
        .unwrap();
        assert_eq!(
            render_shared(&t, "example.org", "eu-west-1", "a.b+c").unwrap(),
            "alias/spire/example_org/eu-west-1/a_2eb_2bc"
        );
        for (template, expected) in [
            ("spire/{{ .KeyID }}", "starts with \"alias/\""),
            ("alias/aws/{{ .KeyID }}", "reserved"),
            ("alias/SPIRE_SERVER/{{ .KeyID }}", "choose another prefix"),
            ("alias/a:b/{{ .KeyID }}", "':'"),
        ] {
            let t = NameTemplate::parse(template, TEMPLATE_FIELDS).unwrap();
            let err = render_shared(&t, "example.org", "us-east-1", "JWT-Signer-A").unwrap_err();
            assert!(err.contains(expected), "{template}: {err}");
        }
        let a = lock_alias("example.org", "alias/s/JWT-Signer-A", 3, 0);
        assert!(a.starts_with("alias/SPIRE_SHARED_LOCK/example_org/"), "{a}");
        assert_ne!(a, lock_alias("example.org", "alias/s/JWT-Signer-A", 4, 0));
        assert_ne!(a, lock_alias("example.org", "alias/s/JWT-Signer-A", 3, 1));
        assert_ne!(a, lock_alias("example.org", "alias/s/JWT-Signer-B", 3, 0));
        let d = shared_description("example.org", "JWT-Signer-A", 12);
        assert_eq!(d, "SPIRE_SHARED_KEY/example_org/JWT-Signer-A/12");
        assert_eq!(shared_generation(&d, "example.org"), Some(12));
        assert_eq!(shared_generation(&d, "other.org"), None);
        assert_eq!(
            shared_generation("SPIRE_SERVER_KEY/example_org/JWT-Signer-A", "example.org"),
            None
        );
    }
}
