//! Where the operator commands get their configuration: SPIRE's own server.conf (HCL or
//! JSON, as spire-server reads it) or a plugin_data file plus a trust domain. Either way the
//! plugin's own parser validates it, with the same rules as Configure.

use std::path::{Path, PathBuf};

use clap::Args;
use keymanager_engine::CoreConfig;
use keymanager_plugin::{PluginConfig, parse_plugin_config};

/// The configuration source every operator command takes.
#[derive(Args, Clone, Debug)]
pub struct SourceArgs {
    /// SPIRE's server.conf (HCL or JSON): its trust_domain and the KeyManager block that
    /// runs this binary (plugin_cmd), with plugin_data inline or in plugin_data_file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["plugin_data", "trust_domain"])]
    pub server_conf: Option<PathBuf>,
    /// A file holding the plugin_data text (HCL), instead of --server-conf.
    #[arg(long, value_name = "FILE", requires = "trust_domain")]
    pub plugin_data: Option<PathBuf>,
    /// The trust domain, with --plugin-data.
    #[arg(long, value_name = "TD", requires = "plugin_data")]
    pub trust_domain: Option<String>,
}

/// plugin_data text and the trust domain, as SPIRE would hand them to the plugin.
#[derive(Debug, PartialEq, Eq)]
pub struct PluginSource {
    /// The trust domain.
    pub trust_domain: String,
    /// The plugin_data text.
    pub plugin_data: String,
    /// Where it came from, for messages.
    pub origin: String,
}

impl SourceArgs {
    /// Reads the source the arguments name.
    pub fn load(&self) -> Result<PluginSource, String> {
        match (&self.server_conf, &self.plugin_data, &self.trust_domain) {
            (Some(conf), _, _) => from_server_conf(conf),
            (None, Some(data), Some(td)) => Ok(PluginSource {
                trust_domain: td.clone(),
                plugin_data: read(data)?,
                origin: data.display().to_string(),
            }),
            _ => Err(
                "say where the configuration is: --server-conf FILE, or --plugin-data FILE --trust-domain TD"
                    .into(),
            ),
        }
    }

    /// Loads and validates the configuration with the plugin's own parser.
    pub fn config(&self) -> Result<PluginConfig, String> {
        let source = self.load()?;
        parse_plugin_config(
            crate::BACKENDS,
            Some(CoreConfig {
                trust_domain: source.trust_domain,
            }),
            &source.plugin_data,
        )
        .map_err(|e| format!("{}: invalid plugin_data: {e}", source.origin))
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The trust domain and our KeyManager block's plugin_data from a server.conf.
pub fn from_server_conf(path: &Path) -> Result<PluginSource, String> {
    let text = read(path)?;
    let shown = path.display().to_string();
    let base = path.parent().unwrap_or(Path::new("."));
    let parsed = if text.trim_start().starts_with('{') {
        from_json(&text)
    } else {
        from_hcl(&text)
    }
    .map_err(|e| format!("{shown}: {e}"))?;
    let plugin_data = match parsed.plugin_data {
        PluginData::Inline(text) => text,
        PluginData::File(file) => {
            let file = if Path::new(&file).is_absolute() {
                PathBuf::from(file)
            } else {
                base.join(file)
            };
            read(&file)?
        }
        PluginData::None => String::new(),
    };
    Ok(PluginSource {
        trust_domain: parsed.trust_domain,
        plugin_data,
        origin: format!("{shown} (KeyManager \"{}\")", parsed.plugin_name),
    })
}

enum PluginData {
    Inline(String),
    File(String),
    None,
}

struct Parsed {
    trust_domain: String,
    plugin_name: String,
    plugin_data: PluginData,
}

/// One KeyManager block: its name, whether it runs an external binary, its data.
struct Candidate {
    name: String,
    external: bool,
    data: Result<PluginData, String>,
}

fn choose(trust_domain: Option<String>, candidates: Vec<Candidate>) -> Result<Parsed, String> {
    let trust_domain =
        trust_domain.ok_or("no server { trust_domain = \"…\" } in the file".to_string())?;
    let names = |list: &[&Candidate]| {
        list.iter()
            .map(|c| format!("\"{}\"", c.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let external: Vec<&Candidate> = candidates.iter().filter(|c| c.external).collect();
    match external.as_slice() {
        [] if candidates.is_empty() => Err("no plugins { KeyManager \"…\" { … } } block".into()),
        [] => Err(format!(
            "no KeyManager block with plugin_cmd (this binary run as an external plugin); found only built-in {}",
            names(&candidates.iter().collect::<Vec<_>>())
        )),
        [one] => {
            let name = one.name.clone();
            let index = candidates
                .iter()
                .position(|c| c.external)
                .unwrap_or_default();
            let chosen = candidates.into_iter().nth(index).ok_or("internal error")?;
            Ok(Parsed {
                trust_domain,
                plugin_name: name,
                plugin_data: chosen.data?,
            })
        }
        several => Err(format!(
            "several KeyManager blocks with plugin_cmd ({}); SPIRE loads one KeyManager: keep one",
            names(several)
        )),
    }
}

fn from_hcl(text: &str) -> Result<Parsed, String> {
    let body: hcl::Body =
        hcl::from_str(&one_block_per_line(text)).map_err(|e| format!("not valid HCL: {e}"))?;
    let mut trust_domain = None;
    let mut candidates = Vec::new();
    for block in body.blocks() {
        match block.identifier() {
            "server" => {
                if let Some(hcl::Expression::String(td)) = attribute(&block.body, "trust_domain") {
                    trust_domain = Some(td.clone());
                }
            }
            "plugins" => {
                for plugin in block.body.blocks() {
                    if plugin.identifier() != "KeyManager" {
                        continue;
                    }
                    let name = plugin
                        .labels()
                        .first()
                        .map(|l| l.as_str().to_string())
                        .unwrap_or_default();
                    candidates.push(Candidate {
                        name,
                        external: attribute(&plugin.body, "plugin_cmd").is_some(),
                        data: hcl_plugin_data(&plugin.body),
                    });
                }
            }
            _ => {}
        }
    }
    choose(trust_domain, candidates)
}

/// SPIRE reads server.conf with HCL 1, which accepts nested blocks on one line
/// (`DataStore "sql" { plugin_data { … } }`); HCL 2 wants a line break after `{` and before
/// `}`. Adds them outside strings, comments and heredocs; nothing else changes.
fn one_block_per_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut heredoc: Option<String> = None;
    for line in text.lines() {
        if let Some(end) = &heredoc {
            if line.trim() == end {
                heredoc = None;
            }
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut in_string = false;
        let mut escaped = false;
        let mut chars = line.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if in_string {
                out.push(c);
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => {
                    in_string = true;
                    out.push(c);
                }
                '#' => {
                    out.push_str(&line[i..]);
                    break;
                }
                '/' if matches!(chars.peek(), Some((_, '/'))) => {
                    out.push_str(&line[i..]);
                    break;
                }
                '<' if line[i..].starts_with("<<") => {
                    let marker = line[i + 2..].trim_start_matches('-').trim();
                    heredoc = Some(marker.to_string());
                    out.push_str(&line[i..]);
                    break;
                }
                '{' => out.push_str("{\n"),
                '}' => out.push_str("\n}"),
                _ => out.push(c),
            }
        }
        out.push('\n');
    }
    out
}

fn attribute<'a>(body: &'a hcl::Body, key: &str) -> Option<&'a hcl::Expression> {
    body.attributes().find(|a| a.key() == key).map(|a| a.expr())
}

fn hcl_plugin_data(body: &hcl::Body) -> Result<PluginData, String> {
    if let Some(block) = body.blocks().find(|b| b.identifier() == "plugin_data") {
        return hcl::to_string(&block.body)
            .map(PluginData::Inline)
            .map_err(|e| format!("cannot re-encode plugin_data: {e}"));
    }
    match attribute(body, "plugin_data") {
        Some(hcl::Expression::Object(object)) => {
            let mut inner = hcl::Body::builder();
            for (key, value) in object {
                let key = match key {
                    hcl::ObjectKey::Identifier(id) => id.to_string(),
                    hcl::ObjectKey::Expression(hcl::Expression::String(s)) => s.clone(),
                    other => format!("{other:?}"),
                };
                inner = inner.add_attribute((key, value.clone()));
            }
            return hcl::to_string(&inner.build())
                .map(PluginData::Inline)
                .map_err(|e| format!("cannot re-encode plugin_data: {e}"));
        }
        Some(hcl::Expression::String(s)) => return Ok(PluginData::Inline(s.clone())),
        Some(_) => return Err("plugin_data must be a block or an object".into()),
        None => {}
    }
    match attribute(body, "plugin_data_file") {
        Some(hcl::Expression::String(file)) => Ok(PluginData::File(file.clone())),
        Some(_) => Err("plugin_data_file must be a string".into()),
        None => Ok(PluginData::None),
    }
}

fn from_json(text: &str) -> Result<Parsed, String> {
    use serde_json::Value;
    let root: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    // HCL's JSON form allows a block to be an object or a list of objects.
    fn items(value: Option<&Value>) -> Vec<&Value> {
        match value {
            Some(Value::Array(list)) => list.iter().collect(),
            Some(other) => vec![other],
            None => Vec::new(),
        }
    }
    let trust_domain = items(root.get("server"))
        .into_iter()
        .find_map(|s| s.get("trust_domain").and_then(Value::as_str))
        .map(str::to_string);
    let mut candidates = Vec::new();
    for plugins in items(root.get("plugins")) {
        for managers in items(plugins.get("KeyManager")) {
            let Some(map) = managers.as_object() else {
                continue;
            };
            for (name, blocks) in map {
                for block in items(Some(blocks)) {
                    let data = match (
                        items(block.get("plugin_data")).into_iter().next(),
                        block.get("plugin_data_file"),
                    ) {
                        (Some(Value::Object(data)), _) => hcl::to_string(data)
                            .map(PluginData::Inline)
                            .map_err(|e| format!("cannot re-encode plugin_data: {e}")),
                        (Some(Value::String(s)), _) => Ok(PluginData::Inline(s.clone())),
                        (Some(_), _) => Err("plugin_data must be an object".into()),
                        (None, Some(Value::String(file))) => Ok(PluginData::File(file.clone())),
                        (None, Some(_)) => Err("plugin_data_file must be a string".into()),
                        (None, None) => Ok(PluginData::None),
                    };
                    candidates.push(Candidate {
                        name: name.clone(),
                        external: block.get("plugin_cmd").is_some(),
                        data,
                    });
                }
            }
        }
    }
    choose(trust_domain, candidates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, text: &str) -> Result<PluginSource, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::write(dir.path().join("data.hcl"), "backend = \"disk\"\n").unwrap();
        from_server_conf(&path)
    }

    const HCL: &str = r#"
server {
  bind_address = "127.0.0.1"
  trust_domain = "example.org"
}
plugins {
  DataStore "sql" { plugin_data { database_type = "sqlite3" } }
  KeyManager "kms" {
    plugin_cmd = "/usr/bin/kms-keymanager"
    plugin_data {
      backend = "aws_kms"
      region = "us-east-1"
      key_identifier_value = "server-a"
      key_tags = { team = "pki" }
    }
  }
}
"#;

    #[test]
    fn hcl_server_conf_gives_the_trust_domain_and_our_plugin_data() {
        let source = parse("server.conf", HCL).unwrap();
        assert_eq!(source.trust_domain, "example.org");
        let settings = keymanager_plugin::hcl_settings::parse(&source.plugin_data).unwrap();
        assert!(settings.contains("region") && settings.contains("key_tags"));
        assert!(source.origin.contains("KeyManager \"kms\""));
    }

    #[test]
    fn json_server_conf_and_plugin_data_file_work() {
        let json = r#"{"server": {"trust_domain": "example.org"},
            "plugins": {"KeyManager": [{"kms": {"plugin_cmd": "/bin/kms-keymanager",
                                                 "plugin_data_file": "data.hcl"}}]}}"#;
        let source = parse("server.json", json).unwrap();
        assert_eq!(source.plugin_data, "backend = \"disk\"\n");
        let inline = r#"{"server": [{"trust_domain": "td"}],
            "plugins": {"KeyManager": {"kms": {"plugin_cmd": "x",
                "plugin_data": {"backend": "disk", "keys_path": "/k.json"}}}}}"#;
        let source = parse("server.json", inline).unwrap();
        let settings = keymanager_plugin::hcl_settings::parse(&source.plugin_data).unwrap();
        assert!(settings.contains("keys_path"));
    }

    #[test]
    fn hcl1_layouts_are_accepted_without_touching_strings_or_heredocs() {
        let text = "a { b { c = \"{x}\" } } # {\nd = <<EOF\n{ y }\nEOF\n";
        let out = one_block_per_line(text);
        assert!(out.contains("c = \"{x}\""), "{out}");
        assert!(out.contains("\n{ y }\nEOF"), "{out}");
        assert!(hcl::from_str::<hcl::Body>(&out).is_ok(), "{out}");
    }

    #[test]
    fn missing_or_ambiguous_blocks_are_named() {
        let builtin = "server { trust_domain = \"td\" }\nplugins { KeyManager \"disk\" { plugin_data { keys_path = \"/k\" } } }";
        let err = parse("a.conf", builtin).unwrap_err();
        assert!(
            err.contains("no KeyManager block with plugin_cmd") && err.contains("\"disk\""),
            "{err}"
        );
        let two = "server { trust_domain = \"td\" }\nplugins {\nKeyManager \"a\" { plugin_cmd = \"x\" }\nKeyManager \"b\" { plugin_cmd = \"y\" }\n}";
        let err = parse("b.conf", two).unwrap_err();
        assert!(
            err.contains("several") && err.contains("\"a\", \"b\""),
            "{err}"
        );
        let err = parse("c.conf", "plugins {}").unwrap_err();
        assert!(err.contains("trust_domain"), "{err}");
        let err = parse("d.conf", "server {").unwrap_err();
        assert!(err.contains("not valid HCL"), "{err}");
    }
}
