//! Every parser of text a store hands back: liveness stamps, SPIRE's key names (AWS
//! aliases, Cloud KMS CryptoKey ids and templates, Key Vault and Vault Transit names),
//! PKCS#11 labels, PEM public keys, endpoints, gRPC timeouts. Anyone who may tag one key
//! of the account controls this text, so each parser must be total, and what it accepts
//! must round-trip through the writer.
//!
//! Input: a selector byte, then NUL-separated text fields.

use std::time::{Duration, UNIX_EPOCH};

use keymanager_backend_aws::naming as aws;
use keymanager_backend_azure::naming as azure;
use keymanager_backend_gcp::naming as gcp;
use keymanager_backend_pkcs11::labels::{Label, State};
use keymanager_backend_vault::naming as vault;
use keymanager_engine::kit::shared::{NameTemplate, extract_key_id};
use keymanager_engine::kit::{endpoint::Endpoint, pem, uuid_name};
use keymanager_engine::lifecycle::{parse_stamp, stamp_text};

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let fields = crate::fields(body);
    let field = |i: usize| fields.get(i).map_or("", String::as_str);
    match selector % 10 {
        0 => stamp(field(0)),
        1 => aws_alias(field(0), field(1), field(2)),
        2 => gcp_ids(field(0), field(1), field(2)),
        3 => gcp_template(field(0), field(1), field(2)),
        4 => azure_name(field(0), field(1)),
        5 => vault_name(field(0), &fields),
        6 => pkcs11_label(field(0), field(1)),
        7 => uuid_names(field(0), field(1)),
        8 => pem_public_key(field(0)),
        _ => {
            endpoint(field(0));
            let _ = keymanager_plugin::wire::grpc_timeout(field(1));
        }
    }
}

fn stamp(text: &str) {
    let Some(at) = parse_stamp(text) else {
        return;
    };
    let canonical = stamp_text(at);
    assert_eq!(parse_stamp(&canonical), Some(at));
    let trimmed = text.trim_start_matches('0');
    assert_eq!(
        canonical,
        if trimmed.is_empty() { "0" } else { trimmed },
        "a stamp reads as another number"
    );
}

/// KMS alias names: letters, digits, `/`, `_` and `-` only.
fn is_alias_text(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-'))
}

fn aws_alias(alias: &str, trust_domain: &str, server_id: &str) {
    if let Some(id) = aws::key_id_from_alias(alias, trust_domain, server_id) {
        assert!(!id.is_empty());
        // KMS never returns an alias longer than its limit, which alias_name refuses.
        if is_alias_text(alias) && alias.len() <= aws::MAX_ALIAS_LEN {
            assert_eq!(
                aws::alias_name(trust_domain, server_id, &id).as_deref(),
                Ok(alias),
                "an alias of this server does not round-trip through its key id"
            );
        }
    }
    // SPIRE key ids (letters, digits, `-`, `.`, `+`) round-trip through aliases.
    let id = alias;
    if !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '+'))
        && !server_id.contains('/')
        && !trust_domain.contains('/')
        && let Ok(name) = aws::alias_name(trust_domain, server_id, id)
    {
        assert!(name.len() <= aws::MAX_ALIAS_LEN);
        assert_eq!(
            aws::key_id_from_alias(&name, trust_domain, server_id).as_deref(),
            Some(id),
            "a key id does not round-trip through its alias"
        );
    }
}

fn gcp_ids(server_id: &str, key_id: &str, name: &str) {
    let _ = gcp::check_crypto_key_id(name);
    let server_ok = gcp::check_server_id(server_id).is_ok();
    let standard = gcp::standard_crypto_key_id(server_id, key_id);
    if server_ok && !key_id.is_empty() && gcp::check_crypto_key_id(&standard).is_ok() {
        assert_eq!(
            gcp::key_id_from_standard(&standard, server_id).as_deref(),
            Some(key_id)
        );
    }
    if let Some(id) = gcp::key_id_from_standard(name, server_id) {
        assert_eq!(gcp::standard_crypto_key_id(server_id, &id), name);
    }
    assert!(!gcp::last_segment(name).contains('/'));
    assert!(name.ends_with(gcp::last_segment(name)));
    assert_eq!(gcp::trust_domain_hash(name).len(), 40);
    let basis = u64::try_from(name.len()).unwrap_or(u64::MAX);
    let lock = gcp::lock_crypto_key_id(name, basis, u32::try_from(key_id.len()).unwrap_or(0));
    assert!(
        gcp::check_crypto_key_id(&lock).is_ok(),
        "lock id {lock:?} is not a valid CryptoKey id"
    );
}

fn gcp_template(source: &str, key_id: &str, pattern: &str) {
    if let Ok(template) = NameTemplate::parse(source, gcp::TEMPLATE_FIELDS) {
        assert_eq!(template.source(), source);
        let hash = gcp::trust_domain_hash("example.org");
        if let Ok(id) = gcp::render_shared(&template, &hash, key_id) {
            assert!(gcp::check_crypto_key_id(&id).is_ok());
            assert!(id.contains(key_id), "{id:?} lost the key id {key_id:?}");
        }
    }
    // The shared-keys extraction regex is the operator's; the CryptoKey id is anybody's.
    let compiled = regex::RegexBuilder::new(pattern)
        .size_limit(1 << 16)
        .nest_limit(16)
        .build();
    if let Ok(regex) = compiled
        && let Some(id) = extract_key_id(&regex, key_id)
    {
        assert!(!id.is_empty());
        assert!(key_id.contains(&id));
    }
}

fn azure_name(key_id: &str, name: &str) {
    if !key_id.is_empty() && azure::check_key_id(key_id).is_ok() {
        let made = azure::key_name(key_id);
        assert!(
            made.len() <= 127,
            "{made:?} is longer than Key Vault allows"
        );
        assert_eq!(azure::key_id_of(&made), Some(key_id));
    }
    if let Some(id) = azure::key_id_of(name) {
        assert!(!id.is_empty() && name.ends_with(id) && name.starts_with("spire-key-"));
    }
}

fn vault_name(name: &str, servers: &[String]) {
    let servers = servers.get(1..).unwrap_or_default();
    for server in servers {
        if let Some(id) = vault::key_id_of(name, server) {
            assert!(!id.is_empty() && name.starts_with(server.as_str()) && name.ends_with(id));
        }
        if !name.is_empty() {
            let made = vault::key_name(server, name);
            assert_eq!(vault::key_id_of(&made, server), Some(name));
        }
    }
    if let Some((server, id)) = vault::owner(name, servers) {
        assert_eq!(vault::key_id_of(name, server), Some(id.as_str()));
        assert!(
            servers
                .iter()
                .filter(|s| vault::key_id_of(name, s).is_some())
                .all(|s| s.len() <= server.len()),
            "a shorter server id claimed {name:?}"
        );
    }
    if let Some((server, id)) = vault::split(name) {
        assert_eq!(vault::key_id_of(name, server), Some(id));
    }
}

fn pkcs11_label(prefix: &str, text: &str) {
    if let Some(label) = Label::parse(prefix, text) {
        let rendered = label.render(prefix);
        assert_eq!(Label::parse(prefix, &rendered).as_ref(), Some(&label));
        for state in [State::Pending, State::Live, State::Retired] {
            let moved = label.with_state(state);
            assert_eq!(
                Label::parse(prefix, &moved.render(prefix)).as_ref(),
                Some(&moved)
            );
        }
    }
    // Labels this plugin writes parse back, whatever the (checked, colon-free) parts.
    let parts: Vec<&str> = text.split(':').collect();
    if let [td, server, id, ..] = parts[..]
        && ![prefix, td, server, id]
            .iter()
            .any(|p| p.is_empty() || p.contains(':'))
    {
        let label = Label {
            state: State::Live,
            trust_domain: td.into(),
            server_id: server.into(),
            key_id: id.into(),
            created: UNIX_EPOCH + Duration::from_millis(text.len() as u64 * 1_000_003),
        };
        assert_eq!(
            Label::parse(prefix, &label.render(prefix)).as_ref(),
            Some(&label)
        );
    }
}

fn uuid_names(name: &str, owner: &str) {
    if let Some(id) = uuid_name::key_id_of(name, owner) {
        assert!(!id.is_empty() && name.ends_with(id));
        assert_eq!(name.len(), owner.len() + 1 + 36 + 1 + id.len());
    }
}

fn pem_public_key(text: &str) {
    if let Some(der) = pem::public_key_der(text) {
        assert!(!der.is_empty());
        assert_eq!(
            pem::public_key_der(&pem::public_key_pem(&der)).as_deref(),
            Some(&der[..])
        );
    }
}

fn endpoint(text: &str) {
    if let Ok(endpoint) = Endpoint::parse(text) {
        let url = endpoint.as_str();
        assert!(url.starts_with("https://") || url.starts_with("http://"));
        assert!(!url.contains(['?', '#']));
        let rest = url.split_once("://").map_or("", |(_, rest)| rest);
        let authority = rest.split('/').next().unwrap_or_default();
        assert!(!authority.is_empty() && !authority.contains('@'), "{url:?}");
        assert_eq!(
            Endpoint::parse(url).as_ref(),
            Ok(&endpoint),
            "not idempotent"
        );
    }
}
