//! The name template of the shared-keys mode: Go template syntax restricted to plain field
//! actions (`{{ .KeyID }}`), each backend choosing which fields exist and what they hold.

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// An index into the backend's field list.
    Field(usize),
}

/// The field every template must use: without it all key ids would share one name.
pub const KEY_ID_FIELD: &str = "KeyID";

/// A parsed template (`crypto_key_template`, `alias_template`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameTemplate {
    source: String,
    pieces: Vec<Piece>,
}

impl NameTemplate {
    /// Parses `source`; every action must be one of `fields` (written `.Name`), and
    /// [`KEY_ID_FIELD`] must appear. `fields` must contain [`KEY_ID_FIELD`].
    pub fn parse(source: &str, fields: &[&str]) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = source;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| format!("{source:?}: \"{{{{\" without a closing \"}}}}\""))?;
            let action = after[..end]
                .trim_start_matches('-')
                .trim_end_matches('-')
                .trim();
            let index = action
                .strip_prefix('.')
                .and_then(|name| fields.iter().position(|f| *f == name))
                .ok_or_else(|| {
                    let allowed: Vec<String> =
                        fields.iter().map(|f| format!("{{{{ .{f} }}}}")).collect();
                    format!(
                        "{source:?}: unsupported action {{{{ {action} }}}}; only {} are available",
                        allowed.join(", ")
                    )
                })?;
            pieces.push(Piece::Field(index));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        let key_id = fields.iter().position(|f| *f == KEY_ID_FIELD);
        if key_id.is_none_or(|i| !pieces.contains(&Piece::Field(i))) {
            return Err(format!(
                "{source:?} must contain {{{{ .{KEY_ID_FIELD} }}}}: without it every key id gets the same name"
            ));
        }
        Ok(Self {
            source: source.to_string(),
            pieces,
        })
    }

    /// The name for `values`, given in the order of the parse's `fields`. The backend
    /// checks the result against its store's naming rules.
    pub fn render(&self, values: &[&str]) -> String {
        self.pieces
            .iter()
            .map(|piece| match piece {
                Piece::Text(text) => text.as_str(),
                Piece::Field(i) => values.get(*i).copied().unwrap_or_default(),
            })
            .collect()
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: &[&str] = &["TrustDomain", "KeyID"];

    #[test]
    fn templates_render_their_fields_and_refuse_others() {
        let t = NameTemplate::parse("spire-key-{{ .TrustDomain }}-{{.KeyID}}", FIELDS).unwrap();
        assert_eq!(
            t.render(&["abc", "JWT-Signer-A"]),
            "spire-key-abc-JWT-Signer-A"
        );
        assert!(
            NameTemplate::parse("k-{{ .TrustDomain }}", FIELDS)
                .unwrap_err()
                .contains(".KeyID")
        );
        let err = NameTemplate::parse("k-{{ .KeyID | upper }}", FIELDS).unwrap_err();
        assert!(err.contains("unsupported"), "{err}");
        assert!(err.contains("{{ .TrustDomain }}, {{ .KeyID }}"), "{err}");
        assert!(
            NameTemplate::parse("k-{{ .Region }}-{{ .KeyID }}", FIELDS)
                .unwrap_err()
                .contains(".Region")
        );
        assert!(
            NameTemplate::parse("k-{{ .KeyID", FIELDS)
                .unwrap_err()
                .contains("closing")
        );
        let aws = NameTemplate::parse(
            "alias/spire/{{ .Region }}/{{- .KeyID -}}",
            &["TrustDomain", "Region", "KeyID"],
        )
        .unwrap();
        assert_eq!(
            aws.render(&["td", "eu-west-1", "JWT-Signer-B"]),
            "alias/spire/eu-west-1/JWT-Signer-B"
        );
    }
}
