//! `CKA_LABEL` of this plugin's key objects: who owns the key and where it is in its
//! lifecycle, because a token has no tags.
//!
//! `<prefix>:<state>:<trust domain>:<server id>:<SPIRE key id>:<created, Unix ms>`, e.g.
//! `spire:live:example.org:srv-a:x509-CA-A:1764581234567`. States: `pending` (prepared,
//! not published: discovery skips it), `live`, `retired` (being destroyed: the intent,
//! written before the objects are destroyed). None of the parts can hold a `:` (trust
//! domains, server ids and SPIRE key ids are checked). The creation time orders several
//! live keys of one id, as a crash between a publish and a retire can leave them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where a key object is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Prepared; discovery does not find it yet.
    Pending,
    /// Published.
    Live,
    /// Replaced; being destroyed.
    Retired,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Live => "live",
            Self::Retired => "retired",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Live, Self::Retired]
            .into_iter()
            .find(|state| state.name() == s)
    }
}

/// A parsed label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    /// The lifecycle state.
    pub state: State,
    /// The trust domain.
    pub trust_domain: String,
    /// The server id.
    pub server_id: String,
    /// The SPIRE key id.
    pub key_id: String,
    /// When the key was generated.
    pub created: SystemTime,
}

impl Label {
    /// The label text under `prefix`.
    pub fn render(&self, prefix: &str) -> String {
        let ms = self
            .created
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!(
            "{prefix}:{}:{}:{}:{}:{ms}",
            self.state.name(),
            self.trust_domain,
            self.server_id,
            self.key_id
        )
    }

    /// The same key in another state.
    pub fn with_state(&self, state: State) -> Self {
        Self {
            state,
            ..self.clone()
        }
    }

    /// Parses a label written under `prefix`; `None` for anybody else's objects.
    pub fn parse(prefix: &str, text: &str) -> Option<Self> {
        let mut parts = text.strip_prefix(prefix)?.strip_prefix(':')?.split(':');
        let state = State::parse(parts.next()?)?;
        let trust_domain = parts.next()?.to_string();
        let server_id = parts.next()?.to_string();
        let key_id = parts.next()?.to_string();
        let ms: u64 = parts.next()?.parse().ok()?;
        if parts.next().is_some()
            || [&trust_domain, &server_id, &key_id]
                .iter()
                .any(|s| s.is_empty())
        {
            return None;
        }
        Some(Self {
            state,
            trust_domain,
            server_id,
            key_id,
            created: UNIX_EPOCH + Duration::from_millis(ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_foreign_labels_do_not_parse() {
        let label = Label {
            state: State::Pending,
            trust_domain: "example.org".into(),
            server_id: "srv-a".into(),
            key_id: "x509-CA-A".into(),
            created: UNIX_EPOCH + Duration::from_millis(1_764_581_234_567),
        };
        let text = label.render("spire");
        assert_eq!(
            text,
            "spire:pending:example.org:srv-a:x509-CA-A:1764581234567"
        );
        assert_eq!(Label::parse("spire", &text), Some(label.clone()));
        let live = label.with_state(State::Live).render("spire");
        assert_eq!(
            Label::parse("spire", &live).map(|l| l.state),
            Some(State::Live)
        );
        for foreign in [
            "spire-x509-CA-A",
            "other:live:example.org:srv-a:k:1",
            "spire:live:example.org:srv-a:k:1:extra",
            "spire:gone:example.org:srv-a:k:1",
            "spire:live:example.org::k:1",
            "spire:live:example.org:srv-a:k:soon",
        ] {
            assert_eq!(Label::parse("spire", foreign), None, "{foreign}");
        }
    }
}
