//! `plugin_data` as SPIRE hands it over: HCL (v1 printer output, with quoted attribute
//! names, or HCL2), parsed into settings and validated by the runtime and every backend.
//!
//! Properties: no panic; quoting the attribute names (what SPIRE's HCL1 printer does)
//! changes nothing once the pre-pass has unquoted them; a configuration that parses never
//! shows a secret in its `Debug` (which is logged).

use keymanager_engine::CoreConfig;
use keymanager_plugin::{hcl_settings, parse_plugin_config};

use crate::BACKENDS;

/// Settings whose values are secrets (`Secret` in the backends' configurations).
const SECRET_KEYS: &[&str] = &[
    "secret_access_key",
    "external_id",
    "app_secret",
    "pin",
    "token",
    "approle_secret_id",
];

/// Runs one input.
pub fn run(data: &[u8]) {
    // SPIRE's plugin_data is a protobuf string: UTF-8 by construction.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let plain = hcl_settings::parse(text);
    let quoted_text = quote_attribute_names(text);
    let quoted = hcl_settings::parse(&quoted_text);
    assert_eq!(
        plain.as_ref().ok(),
        quoted.as_ref().ok(),
        "quoted attribute names read differently"
    );
    assert_eq!(
        plain.is_ok(),
        quoted.is_ok(),
        "quoting attribute names changed validity"
    );

    let core = CoreConfig {
        trust_domain: "example.org".into(),
    };
    match parse_plugin_config(BACKENDS, Some(core), text) {
        Ok(config) => {
            let shown = format!("{config:?}");
            for secret in secret_values(text) {
                assert!(
                    !shown.contains(&secret),
                    "a secret setting's value shows in the configuration's Debug"
                );
            }
            let _ = config.settings();
            let _ = config.problems();
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
}

/// What SPIRE's HCL1 printer does to a native `name = value` or `name {` line: quotes the
/// name. Lines inside a heredoc are text and stay as they are (the same rule as the
/// pre-pass's: a line with `<<TAG` opens one, a line that is `TAG` closes it).
pub fn quote_attribute_names(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut heredoc_end: Option<String> = None;
    for line in text.split_inclusive('\n') {
        if let Some(end) = &heredoc_end {
            if line.trim() == end {
                heredoc_end = None;
            }
            out.push_str(line);
            continue;
        }
        heredoc_end = keymanager_plugin::hcl_settings::heredoc_start(line);
        let rest = line.trim_start();
        let indent = &line[..line.len() - rest.len()];
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(rest.len());
        let (name, tail) = rest.split_at(name_len);
        let starts_well = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let next = tail.trim_start().chars().next();
        if starts_well && matches!(next, Some('=' | '{')) {
            out.push_str(&format!("{indent}\"{name}\"{tail}"));
        } else {
            out.push_str(line);
        }
    }
    out
}

/// The values of `secret = "value"` lines, where the value is a plain literal of at least
/// eight characters that appears nowhere else in the text (so it cannot show up for
/// another reason).
fn secret_values(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.split_once('=')?;
            let name = name.trim().trim_matches('"');
            SECRET_KEYS.contains(&name).then_some(())?;
            let value = value.trim().strip_prefix('"')?.strip_suffix('"')?;
            let plain = value.len() >= 8
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            (plain && text.matches(value).count() == 1).then(|| value.to_string())
        })
        .collect()
}
