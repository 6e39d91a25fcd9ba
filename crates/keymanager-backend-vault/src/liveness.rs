//! Liveness records in a KV version 2 mount. Transit keys carry no tags, so a server keeps
//! one small record per key it serves, `<kv mount>/data/<prefix>/<trust domain>/<server
//! id>/<key name>`, holding the Unix time of its last stamp.
//!
//! The records also scope the sweep to a trust domain: a server is known to this trust
//! domain only through its records here, so the keys of servers without one (SPIRE's
//! built-in servers, other trust domains sharing the mount) are never touched.
//!
//! Why KV v2 and not Transit: a Transit key has no free-form field, and a KV path is one a
//! Vault operator grants with a two-line policy (see README).

use std::collections::HashMap;
use std::time::SystemTime;

use keymanager_engine::lifecycle::{parse_stamp, stamp_text};
use keymanager_engine::{BackendError, BackendErrorKind};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::VaultError;
use crate::config::LivenessStore;
use crate::session::Session;

/// The records of one trust domain.
#[derive(Clone, Debug)]
pub struct Records {
    store: LivenessStore,
    trust_domain: String,
}

impl Records {
    /// The records of `trust_domain` in `store`.
    pub fn new(store: LivenessStore, trust_domain: &str) -> Self {
        Self {
            store,
            trust_domain: trust_domain.to_string(),
        }
    }

    /// `<mount>/<kind>/<prefix>/<trust domain>[/<rest>]`.
    fn path(&self, kind: &str, rest: &str) -> String {
        let base = format!(
            "{}/{kind}/{}/{}",
            self.store.mount, self.store.prefix, self.trust_domain
        );
        if rest.is_empty() {
            base
        } else {
            format!("{base}/{rest}")
        }
    }

    /// A refused record call names the policy the records need.
    fn failed(&self, e: VaultError, what: &str) -> BackendError {
        let mut error = e.error.context(what);
        if error.kind == BackendErrorKind::PermissionDenied {
            error.message.push_str(&format!(
                " (liveness records need create, read, update and delete on {m}/data/{p}/*, and list and delete on {m}/metadata/{p}/*)",
                m = self.store.mount,
                p = self.store.prefix
            ));
        }
        error
    }

    /// Writes the stamp of `key_name`, a key `server_id` serves.
    pub async fn stamp(
        &self,
        session: &Session,
        server_id: &str,
        key_name: &str,
        now: SystemTime,
    ) -> Result<(), BackendError> {
        let body = json!({"data": {"stamp": stamp_text(now)}});
        session
            .call(
                Method::POST,
                &self.path("data", &format!("{server_id}/{key_name}")),
                Some(&body),
            )
            .await
            .map_err(|e| self.failed(e, &format!("writing the liveness record of {key_name}")))?;
        Ok(())
    }

    /// Removes the record of a deleted key, with all its versions; a missing one is fine.
    pub async fn forget(
        &self,
        session: &Session,
        server_id: &str,
        key_name: &str,
    ) -> Result<(), BackendError> {
        match session
            .call(
                Method::DELETE,
                &self.path("metadata", &format!("{server_id}/{key_name}")),
                None,
            )
            .await
        {
            Err(e) if !e.is_not_found() => {
                Err(self.failed(e, &format!("removing the liveness record of {key_name}")))
            }
            _ => Ok(()),
        }
    }

    async fn list(&self, session: &Session, rest: &str) -> Result<Vec<String>, BackendError> {
        match session
            .call(
                Method::GET,
                &format!("{}?list=true", self.path("metadata", rest)),
                None,
            )
            .await
        {
            Ok(answer) => Ok(string_list(answer.as_ref(), "/data/keys")),
            Err(e) if e.is_not_found() => Ok(Vec::new()),
            Err(e) => Err(self.failed(e, "listing liveness records")),
        }
    }

    /// The server ids with records in this trust domain (reads only).
    pub async fn servers(&self, session: &Session) -> Result<Vec<String>, BackendError> {
        Ok(self
            .list(session, "")
            .await?
            .into_iter()
            .filter_map(|k| k.strip_suffix('/').map(str::to_string))
            .collect())
    }

    /// `server_id`'s stamps by key name; `None` for a record that holds no valid stamp (no
    /// evidence: the sweep then judges the key by its creation time). Reads only.
    pub async fn stamps(
        &self,
        session: &Session,
        server_id: &str,
    ) -> Result<HashMap<String, Option<SystemTime>>, BackendError> {
        let mut stamps = HashMap::new();
        for name in self.list(session, server_id).await? {
            if name.ends_with('/') {
                continue;
            }
            let stamp = match session
                .call(
                    Method::GET,
                    &self.path("data", &format!("{server_id}/{name}")),
                    None,
                )
                .await
            {
                Ok(answer) => answer
                    .as_ref()
                    .and_then(|a| a.pointer("/data/data/stamp"))
                    .and_then(Value::as_str)
                    .and_then(parse_stamp),
                Err(e) if e.is_not_found() => None,
                Err(e) => {
                    return Err(self.failed(e, &format!("reading the liveness record of {name}")));
                }
            };
            stamps.insert(name, stamp);
        }
        Ok(stamps)
    }
}

/// A list of strings at `pointer`, empty when absent.
pub fn string_list(answer: Option<&Value>, pointer: &str) -> Vec<String> {
    answer
        .and_then(|a| a.pointer(pointer))
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
