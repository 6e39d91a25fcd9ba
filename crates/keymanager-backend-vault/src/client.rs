//! The Vault HTTP API, the few calls this backend makes, over reqwest with rustls: typed
//! errors that name the method and path, the token in `X-Vault-Token`, the namespace in
//! `X-Vault-Namespace`, writes as JSON.

use std::time::Duration;

use keymanager_engine::kit::classify::{kind_for_http_status, kind_for_transport};
use keymanager_engine::settings::Secret;
use keymanager_engine::{BackendError, BackendErrorKind};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::config::{Auth, VaultSettings};

/// One request may take this long; the engine's retries stay inside SPIRE's 30 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A failed Vault call, before it becomes a [`BackendError`]: whether it was a 403 decides
/// whether a fresh login is worth one retry.
#[derive(Debug)]
pub struct VaultError {
    /// The HTTP status, if Vault answered.
    pub status: Option<StatusCode>,
    /// The error as the engine sees it.
    pub error: BackendError,
}

impl VaultError {
    /// Whether Vault refused the token (Vault answers 403 both for a bad token and for a
    /// missing policy; only a fresh login tells them apart).
    pub fn is_forbidden(&self) -> bool {
        matches!(
            self.status,
            Some(StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED)
        )
    }

    /// Whether the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.status == Some(StatusCode::NOT_FOUND)
    }
}

impl From<VaultError> for BackendError {
    fn from(e: VaultError) -> Self {
        e.error
    }
}

/// A connection to one Vault: address, namespace, TLS trust and client identity.
#[derive(Debug)]
pub struct Connection {
    http: reqwest::Client,
    address: String,
    namespace: Option<String>,
}

impl Connection {
    /// Builds the HTTP client: `ca_cert_path` replaces the system roots, `cert_auth`'s
    /// certificate is presented on every connection, `insecure_skip_verify` is honoured.
    pub fn new(settings: &VaultSettings) -> Result<Self, BackendError> {
        let invalid = |what: &str, e: reqwest::Error| {
            BackendError::with_source(BackendErrorKind::InvalidArgument, what.to_string(), e)
        };
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("kms-keymanager/", env!("CARGO_PKG_VERSION")));
        if let Some((path, pem)) = &settings.ca_cert {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| invalid(&format!("ca_cert_path {} is not PEM", path.display()), e))?;
            builder = builder.tls_certs_only(certs);
        }
        if settings.insecure_skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        if let Auth::Cert {
            identity, paths, ..
        } = &settings.auth
        {
            let identity =
                reqwest::Identity::from_pem(identity.expose().as_bytes()).map_err(|e| {
                    invalid(
                        &format!(
                            "cert_auth client certificate {} / key {}",
                            paths.0.display(),
                            paths.1.display()
                        ),
                        e,
                    )
                })?;
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|e| invalid("building the Vault HTTP client", e))?;
        Ok(Self {
            http,
            address: settings.address.clone(),
            namespace: settings.namespace.clone(),
        })
    }

    /// Calls `method /v1/<path>`; `Ok(None)` for an empty answer (204).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&Secret>,
        body: Option<&Value>,
    ) -> Result<Option<Value>, VaultError> {
        let shown = format!("{method} {path}");
        let mut request = self
            .http
            .request(method, format!("{}/v1/{path}", self.address));
        if let Some(token) = token {
            request = request.header("X-Vault-Token", token.expose());
        }
        if let Some(namespace) = &self.namespace {
            request = request.header("X-Vault-Namespace", namespace);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| VaultError {
            status: None,
            error: transport_error(&shown, e),
        })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| VaultError {
            status: Some(status),
            error: transport_error(&shown, e),
        })?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(None);
            }
            return serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| VaultError {
                    status: Some(status),
                    error: BackendError::with_source(
                        BackendErrorKind::Internal,
                        format!("Vault {shown}: the answer is not JSON"),
                        e,
                    ),
                });
        }
        Err(VaultError {
            status: Some(status),
            error: status_error(&shown, status, &bytes),
        })
    }
}

fn transport_error(shown: &str, e: reqwest::Error) -> BackendError {
    let kind = kind_for_transport(&e);
    BackendError::with_source(kind, format!("Vault {shown} failed"), e)
}

/// Vault's `{"errors": [...]}` in the message; a sealed Vault and a missing policy said so.
fn status_error(shown: &str, status: StatusCode, body: &[u8]) -> BackendError {
    let errors: Vec<String> = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("errors").cloned())
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let mut detail = errors.join("; ");
    if detail.is_empty() {
        detail = String::from_utf8_lossy(body).chars().take(200).collect();
    }
    let kind = match status.as_u16() {
        // Vault answers 403 for a token it does not know as well as for a missing policy.
        403 => BackendErrorKind::PermissionDenied,
        s => kind_for_http_status(s),
    };
    let mut message = format!("Vault {shown} failed: HTTP {}: {detail}", status.as_u16());
    if status == StatusCode::FORBIDDEN {
        message.push_str(&format!(
            " (the token's policies must allow this path: {})",
            shown.split_once(' ').map_or(shown, |(_, p)| p)
        ));
    }
    if status == StatusCode::SERVICE_UNAVAILABLE && detail.contains("sealed") {
        message.push_str(" (Vault is sealed: unseal it; signing resumes by itself)");
    }
    BackendError::new(kind, message)
}

/// A string field of a JSON object, or an error naming it.
pub fn field<'a>(value: &'a Value, pointer: &str, what: &str) -> Result<&'a Value, BackendError> {
    value.pointer(pointer).ok_or_else(|| {
        BackendError::new(
            BackendErrorKind::Internal,
            format!("Vault's answer for {what} has no {pointer}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_errors_name_the_path_and_vaults_words() {
        let e = status_error(
            "POST transit/sign/k/sha2-256",
            StatusCode::FORBIDDEN,
            br#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#,
        );
        assert_eq!(e.kind, BackendErrorKind::PermissionDenied);
        assert!(e.message.contains("permission denied"), "{}", e.message);
        assert!(
            e.message
                .contains("policies must allow this path: transit/sign/k/sha2-256"),
            "{}",
            e.message
        );

        let e = status_error(
            "GET transit/keys/k",
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"errors":["Vault is sealed"]}"#,
        );
        assert_eq!(e.kind, BackendErrorKind::Unavailable);
        assert!(e.message.contains("Vault is sealed"), "{}", e.message);

        let e = status_error("GET x", StatusCode::TOO_MANY_REQUESTS, b"slow down");
        assert_eq!(e.kind, BackendErrorKind::ResourceExhausted);
        assert!(e.message.ends_with("HTTP 429: slow down"), "{}", e.message);
    }
}
