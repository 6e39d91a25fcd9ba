//! A guard for list loops over a paged API: a service that repeats a page token (a bug, or
//! a hostile proxy) must not keep a sweep or a start-up looping forever.

use crate::backend::{BackendError, BackendErrorKind};

/// More pages than this is treated as a loop (1,000 keys a page: a billion keys).
pub const MAX_PAGES: usize = 1_000_000;

/// Tracks the page tokens one listing has seen.
#[derive(Debug)]
pub struct PageGuard {
    what: String,
    seen: std::collections::HashSet<String>,
}

impl PageGuard {
    /// A guard for listing `what` (named in errors).
    pub fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            seen: std::collections::HashSet::new(),
        }
    }

    /// The next token to ask for: `Ok(None)` when the listing is complete (empty token),
    /// an error when the token was seen before or there are absurdly many pages.
    pub fn next(&mut self, token: &str) -> Result<Option<String>, BackendError> {
        if token.is_empty() {
            return Ok(None);
        }
        if !self.seen.insert(token.to_string()) {
            return Err(BackendError::new(
                BackendErrorKind::Unavailable,
                format!(
                    "listing {} returned a page token it had returned before; stopped instead of looping",
                    self.what
                ),
            ));
        }
        if self.seen.len() > MAX_PAGES {
            return Err(BackendError::new(
                BackendErrorKind::Internal,
                format!("listing {} did not end after {MAX_PAGES} pages", self.what),
            ));
        }
        Ok(Some(token.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_token_stops_the_listing() {
        let mut guard = PageGuard::new("CryptoKeys of r");
        assert_eq!(guard.next("a").unwrap().as_deref(), Some("a"));
        assert_eq!(guard.next("b").unwrap().as_deref(), Some("b"));
        let err = guard.next("a").unwrap_err();
        assert!(err.message.contains("CryptoKeys of r"), "{err}");
        assert_eq!(guard.next("").unwrap(), None);
    }
}
