//! The `endpoint` setting of every KMS backend (VPC endpoints, private endpoints, local test
//! peers), with one validation rule.

use crate::settings::{Settings, SettingsError, echo};

/// The setting's name.
pub const KEY: &str = "endpoint";

/// An endpoint URL: `http://` or `https://`, a host, an optional port and path; no
/// credentials, query or fragment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint(String);

impl Endpoint {
    /// Validates an endpoint URL.
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"))
            .ok_or_else(|| {
                format!(
                    "{} must start with https:// (or http:// for a local peer)",
                    echo(text)
                )
            })?;
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() {
            return Err(format!("{} has no host", echo(text)));
        }
        if authority.contains('@') {
            return Err(format!(
                "{} must not carry credentials; configure them with the backend's credential settings",
                echo(&text.replace(|c: char| c != '/' && c != ':' && c != '@', "*"))
            ));
        }
        if text.contains('?') || text.contains('#') || text.chars().any(char::is_whitespace) {
            return Err(format!(
                "{} must be a plain URL without query, fragment or spaces",
                echo(text)
            ));
        }
        if let Some((host, port)) = authority.rsplit_once(':')
            && !host.ends_with(']')
            && (host.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(format!("{} has an invalid host or port", echo(text)));
        }
        Ok(Self(text.trim_end_matches('/').to_string()))
    }

    /// The URL.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Takes and validates `endpoint` from `settings`.
    pub fn take_from(settings: &mut Settings) -> Result<Option<Self>, SettingsError> {
        settings
            .take_nonempty_string(KEY)?
            .map(|text| Self::parse(&text).map_err(|reason| SettingsError::invalid(KEY, reason)))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_a_host_are_accepted_and_the_rest_refused() {
        for good in [
            "https://kms.us-east-1.amazonaws.com",
            "http://127.0.0.1:4566",
            "http://127.0.0.1:4566/",
            "https://[::1]:8443/v1",
            "https://vpce-0123.kms.us-east-1.vpce.amazonaws.com",
        ] {
            assert!(Endpoint::parse(good).is_ok(), "{good}");
        }
        assert_eq!(
            Endpoint::parse("http://h:1/").unwrap().as_str(),
            "http://h:1"
        );
        for bad in [
            "127.0.0.1:4566",
            "ftp://host",
            "http://",
            "https:///path",
            "http://host:port",
            "http://host:99999",
            "http://:80",
            "https://user:pass@host",
            "https://host/?x=1",
            "https://host/#f",
            "https://ho st",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
        let err = Endpoint::parse("https://AKIA:s3cr3t@host").unwrap_err();
        assert!(!err.contains("s3cr3t") && !err.contains("AKIA"), "{err}");
    }
}
