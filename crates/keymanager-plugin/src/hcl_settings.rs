//! `plugin_data` text → [`Settings`].
//!
//! SPIRE re-prints `plugin_data` with the HCL **v1** printer (or passes `plugin_data_file`
//! verbatim); hcl-rs parses HCL2. The one difference that matters in practice is quoted
//! attribute names (`"keys_path" = "..."`, what HCL1 prints for a server config written in
//! JSON or with quoted keys), which HCL2 forbids. A small pre-pass unquotes them.
//!
//! `plugin_data` holds secrets (`secret_access_key`, `external_id`…), and its errors go to
//! SPIRE's log and `spire-server validate` output, so no error here quotes the text: a
//! syntax error names the line, the column and the key on that line, and a value that is
//! not a literal (HCL would evaluate it against variables and functions there are none of)
//! is refused naming only its key.

use std::collections::BTreeMap;

use hcl::{Expression, ObjectKey, Structure};
use keymanager_engine::settings::{SettingValue, Settings, SettingsError, echo};

/// Parses `plugin_data` HCL (v1 printer output or HCL2) into settings.
pub fn parse(text: &str) -> Result<Settings, SettingsError> {
    let normalised = unquote_attribute_names(text);
    let body = hcl::parse(&normalised).map_err(|e| syntax_error(&e, text, &normalised))?;
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
    let mut body = body;
    check_body(&mut body, "", 0)?;
    // The body holds literals only; hcl-rs's own messages quote values, so none is passed on.
    let value: hcl::Value = hcl::from_body(body)
        .map_err(|_| SettingsError::Syntax("it cannot be read as key = value settings".into()))?;
    match convert(value) {
        SettingValue::Map(map) => Ok(Settings::new(map)),
        SettingValue::Null => Ok(Settings::default()),
        _ => Err(SettingsError::Syntax(
            "plugin_data must be a block of key = value settings".into(),
        )),
    }
}

const NOT_LITERAL: &str =
    "must be a quoted string literal; expressions and variable references are not allowed";
const NOT_LITERAL_TEMPLATE: &str = "must be a quoted string literal; ${…} interpolations and \
     %{…} directives are not allowed (write $${ or %%{ for a literal ${ or %{)";
const NOT_LITERAL_KEY: &str =
    "object keys must be names or quoted string literals; expressions are not allowed";

/// How deep blocks (each label a level, as hcl-rs reads them), objects and lists may nest.
/// SPIRE's configurations nest three levels at most. hcl-rs converts a body recursively, so
/// an unbounded depth overflows the stack: fuzzing found a block with 12,000 labels.
const MAX_DEPTH: usize = 32;

fn too_deep(key: &str) -> SettingsError {
    SettingsError::invalid(
        key,
        format!("nests blocks, block labels, objects and lists more than {MAX_DEPTH} levels deep"),
    )
}

/// Refuses every value that is not a literal (null, boolean, number, string without
/// interpolation, heredoc without interpolation, or a list or object of those), naming the
/// key as `block.label.key`, `key.item` or `key[index]`, never the value. A heredoc becomes
/// the string it stands for (`$${` read as `${`). Refuses nesting deeper than [`MAX_DEPTH`],
/// naming the outermost key (a deeper path could be as long as the input).
fn check_body(body: &mut hcl::Body, path: &str, depth: usize) -> Result<(), SettingsError> {
    for structure in body.iter_mut() {
        match structure {
            Structure::Attribute(attribute) => {
                let key = join(path, attribute.key.as_str());
                check_expression(&mut attribute.expr, &key, depth)?;
            }
            Structure::Block(block) => {
                let depth = depth + 1 + block.labels.len();
                if depth > MAX_DEPTH {
                    return Err(too_deep(&join(path, block.identifier.as_str())));
                }
                let path = block
                    .labels
                    .iter()
                    .fold(join(path, block.identifier.as_str()), |path, label| {
                        join(&path, label.as_str())
                    });
                check_body(&mut block.body, &path, depth)?;
            }
        }
    }
    Ok(())
}

fn check_expression(
    expression: &mut Expression,
    key: &str,
    depth: usize,
) -> Result<(), SettingsError> {
    if matches!(expression, Expression::Array(_) | Expression::Object(_)) && depth >= MAX_DEPTH {
        return Err(too_deep(key));
    }
    match expression {
        Expression::Null | Expression::Bool(_) | Expression::Number(_) | Expression::String(_) => {
            Ok(())
        }
        Expression::Array(items) => items.iter_mut().enumerate().try_for_each(|(index, item)| {
            check_expression(item, &format!("{key}[{index}]"), depth + 1)
        }),
        Expression::Object(object) => object.iter_mut().try_for_each(|(name, value)| {
            let name = match name {
                ObjectKey::Identifier(name) => name.as_str(),
                ObjectKey::Expression(Expression::String(name)) => name.as_str(),
                _ => return Err(SettingsError::invalid(key, NOT_LITERAL_KEY)),
            };
            check_expression(value, &join(key, name), depth + 1)
        }),
        // hcl-rs keeps a quoted string as a template only when it has `${…}` or `%{…}`;
        // a heredoc is always one, so its parts are looked at.
        Expression::TemplateExpr(template) => {
            let text = hcl::Template::from_expr(template)
                .ok()
                .and_then(|template| {
                    template
                        .elements()
                        .iter()
                        .map(|element| match element {
                            hcl::template::Element::Literal(text) => Some(text.as_str()),
                            _ => None,
                        })
                        .collect::<Option<String>>()
                })
                .ok_or_else(|| SettingsError::invalid(key, NOT_LITERAL_TEMPLATE))?;
            *expression = Expression::String(text);
            Ok(())
        }
        // Variables, traversals, function calls, parentheses, operations, conditionals and
        // `for` expressions.
        _ => Err(SettingsError::invalid(key, NOT_LITERAL)),
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// A syntax error as line, column, the key on that line when one can be read safely, and
/// hcl-rs's description of what it expected. hcl-rs's own `Display` quotes the whole input
/// line (secrets included), so it is never used.
fn syntax_error(error: &hcl::Error, original: &str, normalised: &str) -> SettingsError {
    let hcl::Error::Parse(error) = error else {
        return SettingsError::Syntax("the text cannot be parsed".into());
    };
    let location = error.location();
    let line = location.line();
    let column = original_column(
        nth_line(original, line).unwrap_or(""),
        nth_line(normalised, line).unwrap_or(""),
        location.column(),
    );
    let place = match key_on_line(normalised, line) {
        Some(key) => format!("line {line}, column {column}, in {}", echo(key)),
        None => format!("line {line}, column {column}"),
    };
    SettingsError::Syntax(format!(
        "{place}: {} (the text is not shown, as it may hold secrets)",
        describe(error.message())
    ))
}

/// Line `number` (one-based) of `text`, without its line ending.
fn nth_line(text: &str, number: usize) -> Option<&str> {
    text.split('\n')
        .nth(number.checked_sub(1)?)
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
}

/// Maps a column of a normalised line back to the line as written: the pre-pass only ever
/// drops the two quotes around a name that follows the indentation.
fn original_column(original: &str, normalised: &str, column: usize) -> usize {
    if original == normalised {
        return column;
    }
    let indent = normalised.chars().take_while(|c| c.is_whitespace()).count();
    let name = normalised
        .chars()
        .skip(indent)
        .take_while(|c| is_name_char(*c))
        .count();
    if column <= indent {
        column
    } else if column <= indent + name {
        column + 1
    } else {
        column + 2
    }
}

/// The name before `=` on line `number`, if that line is `name = …` (identifier characters
/// only) and not part of a heredoc's text.
fn key_on_line(normalised: &str, number: usize) -> Option<&str> {
    if heredoc_text_lines(normalised).contains(&number) {
        return None;
    }
    let line = nth_line(normalised, number)?.trim_start();
    let name_len = line.find(|c: char| !is_name_char(c)).unwrap_or(line.len());
    let (name, rest) = line.split_at(name_len);
    let first = name.chars().next()?;
    let rest = rest.trim_start_matches([' ', '\t']);
    let assigns = rest.starts_with('=') && !rest.starts_with("==");
    ((first.is_ascii_alphabetic() || first == '_') && assigns).then_some(name)
}

/// The (one-based) numbers of the lines that are a heredoc's text or end marker.
fn heredoc_text_lines(text: &str) -> std::collections::BTreeSet<usize> {
    let mut lines = std::collections::BTreeSet::new();
    let mut heredoc_end: Option<String> = None;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if let Some(end) = &heredoc_end {
            lines.insert(index + 1);
            if line.trim() == end {
                heredoc_end = None;
            }
            continue;
        }
        heredoc_end = heredoc_start(line);
    }
    lines
}

/// The end marker of a heredoc that starts on `line`, if one does.
pub fn heredoc_start(line: &str) -> Option<String> {
    let marker = line.find("<<")?;
    let tag: String = line[marker + 2..]
        .trim_start_matches('-')
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!tag.is_empty()).then_some(tag)
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Words hcl-rs's parser builds its error descriptions from (fixed labels such as
/// "invalid attribute; expected `=`", and the standard number-parsing errors).
const DESCRIPTION_WORDS: &[&str] = &[
    "after",
    "and",
    "assignment",
    "at",
    "attribute",
    "binary",
    "block",
    "body",
    "cannot",
    "chained",
    "code",
    "delimiter",
    "depth",
    "digit",
    "empty",
    "end",
    "endfor",
    "endif",
    "eof",
    "escape",
    "expected",
    "expression",
    "fit",
    "float",
    "found",
    "from",
    "heredoc",
    "hex",
    "identifier",
    "in",
    "integer",
    "into",
    "invalid",
    "item",
    "key",
    "large",
    "letter",
    "levels",
    "literal",
    "most",
    "nested",
    "nesting",
    "newline",
    "number",
    "object",
    "operation",
    "operator",
    "operators",
    "or",
    "parse",
    "redefined",
    "sequence",
    "small",
    "string",
    "structure",
    "target",
    "to",
    "token",
    "too",
    "traversal",
    "type",
    "unexpected",
    "unicode",
    "unique",
    "unsigned",
    "value",
    "zero",
];

/// hcl-rs's description of a syntax error, if it is made only of its parser's fixed words
/// (so that no piece of the input can come through); otherwise a generic one.
fn describe(message: &str) -> String {
    let fixed = message.len() <= 200
        && message
            .split(|c: char| !c.is_ascii_alphanumeric())
            .all(|word| {
                word.len() <= 1
                    || word.bytes().all(|b| b.is_ascii_digit())
                    || DESCRIPTION_WORDS.contains(&word)
            });
    if fixed {
        message.to_string()
    } else {
        "invalid syntax".to_string()
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
        if let Some(tag) = heredoc_start(line) {
            heredoc_end = Some(tag);
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
        && name.chars().all(is_name_char);
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

    /// Runs `f` on a thread with the stack of a tokio worker (2 MiB), where Configure runs.
    fn on_worker_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn nesting_beyond_the_limit_is_refused_without_exhausting_the_stack() {
        // The fuzzer's input: a block with thousands of labels (each `""` is one), which
        // hcl-rs turns into as many nested objects and converted recursively.
        let labels = "\"\" ".repeat(12_000);
        let deep_labels = format!("backend = \"disk\"\nshared_keys {labels}{{\n  x = \"y\"\n}}\n");
        let deep_lists = format!(
            "key_tags = {}\"x\"{}\n",
            "[".repeat(5_000),
            "]".repeat(5_000)
        );
        let deep_objects = format!(
            "key_tags = {}\"x\"{}\n",
            "{a = ".repeat(5_000),
            "}".repeat(5_000)
        );
        let deep_blocks = format!(
            "{}x = \"y\"\n{}",
            "a {\n".repeat(2_000),
            "}\n".repeat(2_000)
        );
        for (what, text) in [
            ("labels", deep_labels),
            ("lists", deep_lists),
            ("objects", deep_objects),
            ("blocks", deep_blocks),
        ] {
            let error = on_worker_stack(move || parse(&text).map(|_| ()).unwrap_err());
            let message = error.to_string();
            assert!(
                message.contains("levels deep") || message.contains("line "),
                "{what}: {message}"
            );
            assert!(
                message.len() < 400,
                "{what}: the message is bounded: {message}"
            );
        }
    }

    #[test]
    fn nesting_up_to_the_limit_is_read() {
        let lists = format!(
            "key_tags = {}\"x\"{}\n",
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert!(parse(&lists).is_ok());
        let too_deep = format!(
            "key_tags = {}\"x\"{}\n",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        let message = parse(&too_deep).unwrap_err().to_string();
        assert!(message.contains("key_tags"), "{message}");
        assert!(message.contains("32 levels deep"), "{message}");
        let labels = format!("b {}{{\n  x = \"y\"\n}}\n", "\"l\" ".repeat(MAX_DEPTH - 1));
        assert!(parse(&labels).is_ok());
        let labels = format!("b {}{{\n  x = \"y\"\n}}\n", "\"l\" ".repeat(MAX_DEPTH));
        let message = parse(&labels).unwrap_err().to_string();
        assert!(message.contains("\"b\""), "{message}");
    }

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

    /// A made-up secret; no 5-character piece of it may show in an error.
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY";

    fn assert_no_secret(err: &str) {
        let chars: Vec<char> = SECRET.chars().collect();
        for window in chars.windows(5) {
            let piece: String = window.iter().collect();
            assert!(!err.contains(&piece), "{piece:?} of the secret in: {err}");
        }
    }

    #[test]
    fn syntax_errors_name_the_key_and_place_but_never_the_value() {
        // (text, key named in the error if it can be known, line, column)
        let cases = [
            // Two strings on the line.
            (
                format!("keys_path = \"/k\"\nsecret_access_key = \"{SECRET}\" \"other\"\n"),
                Some("secret_access_key"),
                2,
                65,
            ),
            // An unterminated string on the last line.
            (
                format!("access_key_id = \"AKIA\"\nsecret_access_key = \"{SECRET}"),
                Some("secret_access_key"),
                2,
                1,
            ),
            // A quoted key (HCL1 printer style) followed by junk.
            (
                format!("\"external_id\" = \"{SECRET}\" junk\n"),
                Some("external_id"),
                1,
                61,
            ),
            (format!("\"external_id\" \"{SECRET}\" junk\n"), None, 1, 1),
            // A secret in a nested block and in a nested object.
            (
                format!(
                    "aws {{\n  region = \"eu-west-1\"\n  secret_access_key = \"{SECRET}\" x\n}}\n"
                ),
                Some("secret_access_key"),
                3,
                67,
            ),
            (
                format!("aws = {{\n  external_id = \"{SECRET}\" \"x\"\n}}\n"),
                Some("external_id"),
                2,
                61,
            ),
        ];
        for (text, key, line, column) in cases {
            let err = parse(&text).unwrap_err();
            assert!(matches!(err, SettingsError::Syntax(_)), "{err:?}");
            let err = err.to_string();
            assert_no_secret(&err);
            assert!(
                err.contains(&format!("line {line}, column {column}")),
                "{err}"
            );
            match key {
                Some(key) => assert!(err.contains(&format!("\"{key}\"")), "{err}"),
                None => assert!(!err.contains("external_id"), "{err}"),
            }
            assert!(!err.contains("other") && !err.contains("junk"), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn syntax_errors_inside_heredocs_name_no_key() {
        let text = "note = <<EOT\nsecret_access_key = ${ ) }\nEOT\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("line 2, column 24:"), "{err}");
        assert!(!err.contains("secret_access_key"), "{err}");
    }

    #[test]
    fn descriptions_with_words_not_from_the_parser_are_replaced() {
        assert_eq!(
            describe("invalid attribute; expected `=`"),
            "invalid attribute; expected `=`"
        );
        assert_eq!(describe("expected `wJalrXUtnFEMI`"), "invalid syntax");
        assert_eq!(describe(&"invalid ".repeat(40)), "invalid syntax");
    }

    #[test]
    fn expressions_and_templates_are_refused_naming_the_key_only() {
        let cases = [
            ("secret_access_key = wJalrXUtnFEMI\n", "secret_access_key"),
            (
                "secret_access_key = var.wJalrXUtnFEMI\n",
                "secret_access_key",
            ),
            (
                "secret_access_key = upper(\"wJalrXUtnFEMI\")\n",
                "secret_access_key",
            ),
            ("secret_access_key = (wJalrXUtnFEMI)\n", "secret_access_key"),
            ("max_keys = wJalrXUtnFEMI + 1\n", "max_keys"),
            ("max_keys = true ? 1 : wJalrXUtnFEMI\n", "max_keys"),
            (
                "key_tags = { for k in wJalrXUtnFEMI : k => k }\n",
                "key_tags",
            ),
            ("external_id = \"wJalr${XUtnFEMI}\"\n", "external_id"),
            (
                "external_id = \"wJalr%{ if XUtnFEMI }x%{ endif }\"\n",
                "external_id",
            ),
            ("note = <<EOT\nwJalr ${XUtnFEMI}\nEOT\n", "note"),
            (
                "aws {\n  secret_access_key = wJalrXUtnFEMI\n}\n",
                "aws.secret_access_key",
            ),
            (
                "aws \"eu\" {\n  external_id = wJalrXUtnFEMI\n}\n",
                "aws.eu.external_id",
            ),
            ("key_tags = { team = wJalrXUtnFEMI }\n", "key_tags.team"),
            ("key_tags = { (wJalrXUtnFEMI) = \"x\" }\n", "key_tags"),
            ("key_tags = { 3 = \"x\" }\n", "key_tags"),
            ("regions = [\"a\", wJalrXUtnFEMI]\n", "regions[1]"),
        ];
        for (text, key) in cases {
            let err = match parse(text) {
                Ok(settings) => panic!("{text:?} accepted as {settings:?}"),
                Err(err) => err,
            };
            assert!(
                matches!(&err, SettingsError::Invalid { key: k, .. } if k == key),
                "{text:?}: {err:?}"
            );
            let err = err.to_string();
            assert!(!err.contains("wJalr") && !err.contains("XUtn"), "{err}");
            assert!(err.contains("literal"), "{err}");
        }
    }

    #[test]
    fn literal_values_stay_accepted() {
        let text = "a = -1\nb = 1.5\nc = true\nd = null\ne = \"q\\\"uote $${x} 100%%{y}\"\n\
                    f = [1, \"two\", [false], { g = \"h\" }]\n\
                    i = { \"j.k\" = \"l\", m = { n = 2 } }\n\
                    o = <<-EOT\n    plain $${text}\n    EOT\n\
                    p \"label\" {\n  q = \"r\"\n}\n";
        let mut s = parse(text).unwrap();
        assert!(s.take_u64("a").is_err(), "-1 is a number");
        assert!(s.take_bool("c").unwrap().unwrap());
        assert_eq!(s.take_string("d").unwrap(), None);
        assert_eq!(s.take_string("e").unwrap().unwrap(), "q\"uote ${x} 100%{y}");
        let i = s.take_block("i").unwrap().unwrap();
        assert!(i.contains("i.j.k") && i.contains("i.m"));
        assert_eq!(s.take_string("o").unwrap().unwrap(), "plain ${text}\n");
        let mut p = s.take_block("p").unwrap().unwrap();
        let mut label = p.take_block("p.label").unwrap().unwrap();
        assert_eq!(
            label.take_string("p.label.q").unwrap().as_deref(),
            Some("r")
        );
    }
}
