//! Transit key names, exactly as SPIRE's built-in `hashicorp_vault` makes them:
//! `<server id>-<uuid v4>-<SPIRE key id>`, a new UUID per GenerateKey. Ownership is the
//! server id prefix followed by a UUID-shaped segment.

use keymanager_engine::kit::uuid_name;

/// A new key name for `key_id` of `server_id`.
pub fn key_name(server_id: &str, key_id: &str) -> String {
    uuid_name::new_name(server_id, key_id)
}

/// The SPIRE key id in `name` if the key belongs to `server_id`.
pub fn key_id_of<'a>(name: &'a str, server_id: &str) -> Option<&'a str> {
    uuid_name::key_id_of(name, server_id)
}

/// Which of `servers` owns `name`: the longest server id that matches, so that a server
/// id which is a prefix of another (`a` and `a-b`) never claims the other's keys.
pub fn owner<'a>(name: &str, servers: &'a [String]) -> Option<(&'a str, String)> {
    servers
        .iter()
        .filter_map(|server| key_id_of(name, server).map(|id| (server.as_str(), id.to_string())))
        .max_by_key(|(server, _)| server.len())
}

/// The server id and SPIRE key id of any name in SPIRE's format, split at the first
/// UUID-shaped segment (for servers this one has no other knowledge of).
pub fn split(name: &str) -> Option<(&str, &str)> {
    name.char_indices()
        .filter(|&(i, c)| c == '-' && i > 0)
        .find_map(|(i, _)| {
            let server = &name[..i];
            key_id_of(name, server).map(|id| (server, id))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_foreign_names_do_not_match() {
        let name = key_name("srv-a", "x509-CA-A");
        assert_eq!(key_id_of(&name, "srv-a"), Some("x509-CA-A"));
        assert_eq!(key_id_of(&name, "srv"), None);
        assert_eq!(key_id_of(&name, "srv-a-"), None);
        assert_eq!(key_id_of("srv-a-not-a-uuid-x509-CA-A", "srv-a"), None);
        assert_eq!(
            key_id_of("srv-a-0a1b2c3d-0000-4000-8000-00000000000f-", "srv-a"),
            None
        );
        // SPIRE's own name for the same id parses the same.
        assert_eq!(
            key_id_of(
                "srv-a-0a1b2c3d-0000-4000-8000-00000000000f-JWT-Signer-A",
                "srv-a"
            ),
            Some("JWT-Signer-A")
        );
    }

    #[test]
    fn the_longest_matching_server_id_owns_a_name() {
        let servers = vec![
            "a".to_string(),
            "a-0a1b2c3d-0000-4000-8000-00000000000f".to_string(),
        ];
        let uuid = "11111111-2222-4333-8444-555555555555";
        let nested = format!("a-0a1b2c3d-0000-4000-8000-00000000000f-{uuid}-k");
        assert_eq!(
            owner(&nested, &servers),
            Some((servers[1].as_str(), "k".to_string()))
        );
        assert_eq!(owner("b-x", &servers), None);
        // Without knowing the servers, an ambiguous name splits at its first UUID.
        assert_eq!(
            split(&nested),
            Some(("a", "11111111-2222-4333-8444-555555555555-k"))
        );
        let uuid_server = "0a1b2c3d-0000-4000-8000-00000000000f";
        let name = key_name(uuid_server, "x509-CA-A");
        assert_eq!(split(&name), Some((uuid_server, "x509-CA-A")));
        assert_eq!(split("no-uuid-here"), None);
    }
}
