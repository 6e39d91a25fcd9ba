//! `plugin_data` text → [`Settings`].
//!
//! SPIRE re-prints `plugin_data` with the HCL **v1** printer (or passes `plugin_data_file`
//! verbatim); hcl-rs parses HCL2. The one difference that matters in practice is quoted
//! attribute names (`"keys_path" = "..."`, what HCL1 prints for a server config written in
//! JSON or with quoted keys), which HCL2 forbids. A small pre-pass unquotes them.

use std::collections::BTreeMap;

use keymanager_engine::settings::{SettingValue, Settings, SettingsError};

/// Parses `plugin_data` HCL (v1 printer output or HCL2) into settings.
pub fn parse(text: &str) -> Result<Settings, SettingsError> {
    let normalised = unquote_attribute_names(text);
    let body = hcl::parse(&normalised).map_err(|e| SettingsError::Syntax(e.to_string()))?;
    let mut seen = std::collections::BTreeSet::new();
    for name in body
        .attributes()
        .map(|a| a.key.as_str().to_string())
        .chain(body.blocks().map(|b| b.identifier.as_str().to_string()))
    {
        if !seen.insert(name.clone()) {
            return Err(SettingsError::Duplicate(name));
        }
    }
    let value: hcl::Value =
        hcl::from_body(body).map_err(|e| SettingsError::Syntax(e.to_string()))?;
    match convert(value) {
        SettingValue::Map(map) => Ok(Settings::new(map)),
        SettingValue::Null => Ok(Settings::default()),
        _ => Err(SettingsError::Syntax(
            "plugin_data must be a block of key = value settings".into(),
        )),
    }
}

fn convert(value: hcl::Value) -> SettingValue {
    match value {
        hcl::Value::Null => SettingValue::Null,
        hcl::Value::Bool(b) => SettingValue::Bool(b),
        hcl::Value::Number(n) => match n.as_i64() {
            Some(i) => SettingValue::Integer(i),
            None => SettingValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        hcl::Value::String(s) => SettingValue::String(s),
        hcl::Value::Array(items) => SettingValue::List(items.into_iter().map(convert).collect()),
        hcl::Value::Object(map) => SettingValue::Map(
            map.into_iter()
                .map(|(k, v)| (k, convert(v)))
                .collect::<BTreeMap<_, _>>(),
        ),
    }
}

/// Rewrites lines of the form `"ident" = ...` and `"ident" {` to their unquoted form,
/// leaving heredoc bodies and non-identifier keys (valid inside HCL2 objects) alone.
fn unquote_attribute_names(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut heredoc_end: Option<String> = None;
    for line in text.split_inclusive('\n') {
        if let Some(end) = &heredoc_end {
            if line.trim() == end {
                heredoc_end = None;
            }
            out.push_str(line);
            continue;
        }
        if let Some(marker) = line.find("<<") {
            let tag: String = line[marker + 2..]
                .trim_start_matches('-')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !tag.is_empty() {
                heredoc_end = Some(tag);
            }
        }
        out.push_str(&unquote_line(line));
    }
    out
}

fn unquote_line(line: &str) -> String {
    let indent_len = line.len() - line.trim_start().len();
    let (indent, rest) = line.split_at(indent_len);
    let Some(after_quote) = rest.strip_prefix('"') else {
        return line.to_string();
    };
    let Some(close) = after_quote.find('"') else {
        return line.to_string();
    };
    let name = &after_quote[..close];
    let tail = &after_quote[close + 1..];
    let is_identifier = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let next = tail.trim_start().chars().next();
    if is_identifier && matches!(next, Some('=') | Some('{')) {
        format!("{indent}{name}{tail}")
    } else {
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_native_hcl() {
        let mut s = parse("keys_path = \"/var/keys.json\"\nlog_level = \"debug\"\n").unwrap();
        assert_eq!(
            s.take_string("keys_path").unwrap().as_deref(),
            Some("/var/keys.json")
        );
        assert_eq!(
            s.take_string("log_level").unwrap().as_deref(),
            Some("debug")
        );
        s.finish(&[]).unwrap();
    }

    #[test]
    fn parses_hcl1_printer_output_with_quoted_keys_and_nested_maps() {
        // What SPIRE's HCL v1 printer emits for a JSON server config.
        let text = "\"keys_path\" = \"/tmp/keys.json\"\n\n\"key_tags\" = {\n  \"team\" = \"pki\"\n  \"app.kubernetes.io/name\" = \"spire\"\n}\n";
        let mut s = parse(text).unwrap();
        assert_eq!(
            s.take_string("keys_path").unwrap().as_deref(),
            Some("/tmp/keys.json")
        );
        let tags = s.take_string_map("key_tags").unwrap().unwrap();
        assert_eq!(tags["team"], "pki");
        assert_eq!(tags["app.kubernetes.io/name"], "spire");
    }

    #[test]
    fn block_style_maps_and_comments_work() {
        let mut s =
            parse("# comment\nkey_tags {\n  a = \"b\"\n}\n/* c */ max_keys = 20\n").unwrap();
        assert_eq!(s.take_string_map("key_tags").unwrap().unwrap()["a"], "b");
        assert_eq!(s.take_u64("max_keys").unwrap(), Some(20));
    }

    #[test]
    fn heredocs_are_left_alone() {
        let text = "note = <<EOT\n\"keys_path\" = \"x\"\nEOT\nkeys_path = \"/k\"\n";
        let mut s = parse(text).unwrap();
        assert_eq!(
            s.take_string("note").unwrap().as_deref(),
            Some("\"keys_path\" = \"x\"\n")
        );
    }

    #[test]
    fn empty_text_is_empty_settings() {
        assert_eq!(parse("").unwrap(), Settings::default());
        assert_eq!(parse("  \n").unwrap(), Settings::default());
    }

    #[test]
    fn syntax_errors_and_duplicates_are_reported() {
        assert!(matches!(
            parse("keys_path = "),
            Err(SettingsError::Syntax(_))
        ));
        assert!(matches!(
            parse("\"just a string\""),
            Err(SettingsError::Syntax(_))
        ));
        let err = parse("keys_path = \"a\"\nkeys_path = \"b\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("keys_path") && err.contains("redefined"),
            "{err}"
        );
        assert_eq!(
            parse("key_tags = {}\nkey_tags {\n}\n").unwrap_err(),
            SettingsError::Duplicate("key_tags".into())
        );
    }
}
