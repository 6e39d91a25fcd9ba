//! The Key Vault REST API, the few calls this backend makes, over reqwest with rustls.
//!
//! Authentication follows the SDKs' challenge flow: the first request goes without a token,
//! the vault answers 401 with `WWW-Authenticate: Bearer authorization="…", resource="…"`
//! (or `scope="…"`), and the scope is `<resource>/.default` — accepted only when the vault's
//! host ends with `"." + the resource's host`, so a vault impostor cannot obtain a token for
//! another resource. The scope is cached; a 401 on a call with a token refreshes the token
//! (and the scope) once.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keymanager_engine::kit::classify::{kind_for_http_status, kind_for_transport};
use keymanager_engine::{BackendError, BackendErrorKind};
use reqwest::header::{HeaderMap, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::config::{AzureSettings, host_of};
use crate::credentials::{self, Credential};

/// The REST API version (GA, supported by Key Vault and Managed HSM).
pub const API_VERSION: &str = "7.5";
/// One request may take this long; the engine's retries stay inside SPIRE's 30 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest `Retry-After` taken literally (the engine gives up when it is past its budget).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// A failed Key Vault call, before it becomes a [`BackendError`].
#[derive(Debug)]
pub struct AzureError {
    /// The HTTP status, if the vault answered.
    pub status: Option<StatusCode>,
    /// Key Vault's error code (`KeyNotFound`, `Forbidden`, …).
    pub code: Option<String>,
    /// The error as the engine sees it.
    pub error: BackendError,
}

impl AzureError {
    /// Whether the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.status == Some(StatusCode::NOT_FOUND)
    }
}

impl From<AzureError> for BackendError {
    fn from(e: AzureError) -> Self {
        e.error
    }
}

/// A client of one vault.
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    vault: String,
    credential: Credential,
    /// The token scope the vault's challenge named.
    scope: Mutex<Option<String>>,
}

/// The HTTP client: `ca_cert_path`'s certificates trusted on top of the system roots.
pub fn http_client(settings: &AzureSettings) -> Result<reqwest::Client, BackendError> {
    let mut builder = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("kms-keymanager/", env!("CARGO_PKG_VERSION")));
    if let Some((path, pem)) = &settings.ca_cert {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
            BackendError::with_source(
                BackendErrorKind::InvalidArgument,
                format!("ca_cert_path {} is not PEM", path.display()),
                e,
            )
        })?;
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().map_err(|e| {
        BackendError::with_source(
            BackendErrorKind::InvalidArgument,
            "building the Key Vault HTTP client",
            e,
        )
    })
}

impl Client {
    /// A client of the vault of `settings`, with SPIRE's credential chain.
    pub fn new(settings: &AzureSettings) -> Result<Arc<Self>, BackendError> {
        let http = http_client(settings)?;
        let chain = credentials::select_for(&settings.vault_uri, settings.client_secret.as_ref())?;
        tracing::info!(credential = %chain.source.describe(), "Azure credential chosen");
        Ok(Arc::new(Self {
            credential: Credential::new(chain, http.clone()),
            http,
            vault: settings.vault_uri.clone(),
            scope: Mutex::new(None),
        }))
    }

    /// The vault's URI.
    pub fn vault(&self) -> &str {
        &self.vault
    }

    /// Where the token comes from, in words (no secrets), for `doctor`.
    pub fn credential_source(&self) -> String {
        self.credential.chain().source.describe()
    }

    fn cached_scope(&self) -> Option<String> {
        self.scope
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_scope(&self, scope: String) {
        *self.scope.lock().unwrap_or_else(PoisonError::into_inner) = Some(scope);
    }

    /// The scope from the vault's challenge: one unauthenticated read.
    async fn scope(&self, operation: &str) -> Result<String, AzureError> {
        if let Some(scope) = self.cached_scope() {
            return Ok(scope);
        }
        let url = format!("{}/keys?api-version={API_VERSION}&maxresults=1", self.vault);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| transport(operation, "the vault", e))?;
        let status = response.status();
        if status != StatusCode::UNAUTHORIZED {
            let headers = response.headers().clone();
            let body = response.bytes().await.unwrap_or_default();
            let mut e = status_error(operation, "the vault", status, &headers, &body);
            if status.is_success() {
                e.error = BackendError::new(
                    BackendErrorKind::Internal,
                    format!(
                        "{} answered an unauthenticated request without a challenge; it is not a Key Vault",
                        self.vault
                    ),
                );
            }
            return Err(e);
        }
        let scope = self.scope_from(response.headers()).map_err(plain)?;
        self.set_scope(scope.clone());
        Ok(scope)
    }

    /// The scope a 401's challenge names, checked against the vault's host.
    fn scope_from(&self, headers: &HeaderMap) -> Result<String, BackendError> {
        let header = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        scope_from_challenge(header, &self.vault)
    }

    /// `method <vault><path>?api-version=…` with a bearer token; the JSON answer (`Null` when
    /// empty). `path` starts with `/`; `object` names what it acts on, for messages.
    pub async fn call(
        &self,
        operation: &'static str,
        method: Method,
        path: &str,
        object: &str,
        body: Option<&Value>,
    ) -> Result<Value, AzureError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}api-version={API_VERSION}", self.vault);
        self.call_url(operation, method, &url, object, body).await
    }

    /// As [`Client::call`] with a full URL (a `nextLink`), which must be on this vault.
    pub async fn call_url(
        &self,
        operation: &'static str,
        method: Method,
        url: &str,
        object: &str,
        body: Option<&Value>,
    ) -> Result<Value, AzureError> {
        if !on_vault(url, &self.vault) {
            // Never send the vault's token elsewhere (a nextLink is the vault's word).
            return Err(plain(BackendError::new(
                BackendErrorKind::Internal,
                format!("Key Vault {operation}: refusing to follow {url} off the vault"),
            )));
        }
        let mut scope = self.scope(operation).await?;
        let mut refreshed = false;
        loop {
            let token = self.credential.token(&scope).await.map_err(plain)?;
            let mut request = self
                .http
                .request(method.clone(), url)
                .bearer_auth(token.expose());
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request
                .send()
                .await
                .map_err(|e| transport(operation, object, e))?;
            let status = response.status();
            let headers = response.headers().clone();
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                // An expired or revoked token, or a vault that moved to another resource:
                // once more with a fresh token for the scope it names now.
                self.credential.invalidate(&scope);
                if let Ok(new_scope) = self.scope_from(&headers) {
                    self.set_scope(new_scope.clone());
                    scope = new_scope;
                }
                refreshed = true;
                continue;
            }
            let bytes = response
                .bytes()
                .await
                .map_err(|e| transport(operation, object, e))?;
            if status.is_success() {
                if bytes.is_empty() {
                    return Ok(Value::Null);
                }
                return serde_json::from_slice(&bytes).map_err(|e| {
                    plain(BackendError::with_source(
                        BackendErrorKind::Internal,
                        format!("Key Vault {operation} on {object}: the answer is not JSON"),
                        e,
                    ))
                });
            }
            return Err(status_error(operation, object, status, &headers, &bytes));
        }
    }
}

/// Whether `url` is on `vault` (same host and port; Key Vault's `nextLink`s spell out the
/// default port, `https://v.vault.azure.net:443/keys?…`).
fn on_vault(url: &str, vault: &str) -> bool {
    let origin = |u: &str| -> Option<String> {
        let rest = u.strip_prefix("https://")?;
        let authority = rest.split(['/', '?']).next()?.to_ascii_lowercase();
        Some(match authority.strip_suffix(":443") {
            Some(host) => host.to_string(),
            None => authority,
        })
    };
    let path = url
        .strip_prefix("https://")
        .and_then(|rest| rest.find('/').map(|i| &rest[i..]));
    origin(url).is_some() && origin(url) == origin(vault) && path.is_some()
}

fn plain(error: BackendError) -> AzureError {
    AzureError {
        status: None,
        code: None,
        error,
    }
}

fn transport(operation: &str, object: &str, e: reqwest::Error) -> AzureError {
    plain(BackendError::with_source(
        kind_for_transport(&e),
        format!("Key Vault {operation} on {object} failed"),
        e,
    ))
}

/// `Retry-After` in seconds (Key Vault sends seconds).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Key Vault's `{"error": {"code", "message"}}` in the message, with what to grant on 403.
fn status_error(
    operation: &str,
    object: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> AzureError {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let code = parsed
        .pointer("/error/code")
        .and_then(Value::as_str)
        .map(str::to_string);
    let message = parsed
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(|m| m.lines().next().unwrap_or_default().to_string());
    let mut detail = [code.clone(), message]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(": ");
    if detail.is_empty() {
        detail = String::from_utf8_lossy(body).chars().take(200).collect();
    }
    let kind = kind_for_http_status(status.as_u16());
    let mut text = format!(
        "Key Vault {operation} on {object} failed: HTTP {}: {detail}",
        status.as_u16()
    );
    match status {
        StatusCode::UNAUTHORIZED => text.push_str(
            " (the vault refused a fresh token: check the credential's tenant and that it is valid for this vault)",
        ),
        StatusCode::FORBIDDEN if !detail.contains("disabled") => text.push_str(&format!(
            " (the identity needs the Key Vault permission for {operation}: see the README's azure_key_vault permissions)"
        )),
        _ => {}
    }
    AzureError {
        status: Some(status),
        code,
        error: BackendError::new(kind, text).with_retry_after(retry_after(headers)),
    }
}

/// The token scope a `WWW-Authenticate: Bearer …` challenge names, if the vault may ask
/// for it: `scope="…"` as is, else `resource="…"` + `/.default`; the vault's host must end
/// with `"." + the resource's host` (the SDKs' `verify_challenge_resource`, kept on).
pub fn scope_from_challenge(header: &str, vault: &str) -> Result<String, BackendError> {
    let refuse = |why: String| {
        BackendError::new(
            BackendErrorKind::Unauthenticated,
            format!("Key Vault {vault}: {why}"),
        )
    };
    let params = header
        .trim()
        .strip_prefix("Bearer")
        .ok_or_else(|| refuse(format!("no Bearer challenge in its 401 ({header:?})")))?;
    let mut resource = None;
    let mut scope = None;
    for part in params.split(',') {
        let Some((key, value)) = part.trim().split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"').to_string();
        match key.trim() {
            "resource" => resource = Some(value),
            "scope" => scope = Some(value),
            _ => {}
        }
    }
    let scope = match (scope, resource) {
        (Some(scope), _) if !scope.is_empty() => scope,
        (_, Some(resource)) if !resource.is_empty() => {
            format!("{}/.default", resource.trim_end_matches('/'))
        }
        _ => return Err(refuse("its challenge names no resource or scope".into())),
    };
    let resource = scope.trim_end_matches("/.default");
    let resource_host = host_of(resource).ok_or_else(|| {
        refuse(format!(
            "the challenge's resource {resource:?} is not https"
        ))
    })?;
    let vault_host = host_of(vault).unwrap_or_default();
    if !vault_host.ends_with(&format!(".{resource_host}")) {
        return Err(refuse(format!(
            "the challenge asks for a token for {resource}, which {vault_host} is not part of; refused (a vault impostor could otherwise obtain a token for another resource)"
        )));
    }
    Ok(scope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_give_a_scope_only_for_the_vaults_own_resource() {
        let azure = r#"Bearer authorization="https://login.microsoftonline.com/72f988bf", resource="https://vault.azure.net""#;
        assert_eq!(
            scope_from_challenge(azure, "https://my.vault.azure.net").unwrap(),
            "https://vault.azure.net/.default"
        );
        let hsm = r#"Bearer authorization="https://login.microsoftonline.com/t", scope="https://managedhsm.azure.net/.default""#;
        assert_eq!(
            scope_from_challenge(hsm, "https://h.managedhsm.azure.net").unwrap(),
            "https://managedhsm.azure.net/.default"
        );
        // The test fake's trick: 127.0.0.1 ends with .0.0.1.
        let fake = r#"Bearer authorization="https://127.0.0.1:1/t", resource="https://0.0.1:8443""#;
        assert_eq!(
            scope_from_challenge(fake, "https://127.0.0.1:8443").unwrap(),
            "https://0.0.1:8443/.default"
        );
        for (header, vault) in [
            (azure, "https://evil.example.com"),
            (azure, "https://vault.azure.net"),
            (
                r#"Bearer resource="https://graph.microsoft.com""#,
                "https://my.vault.azure.net",
            ),
            (r#"Basic realm="x""#, "https://my.vault.azure.net"),
            ("Bearer authorization=\"x\"", "https://my.vault.azure.net"),
            ("", "https://my.vault.azure.net"),
        ] {
            let err = scope_from_challenge(header, vault).unwrap_err();
            assert_eq!(err.kind, BackendErrorKind::Unauthenticated, "{header}");
        }
    }

    #[test]
    fn next_links_must_stay_on_the_vault() {
        let vault = "https://v.vault.azure.net";
        for ok in [
            "https://v.vault.azure.net:443/keys?api-version=7.5&$skiptoken=x&maxresults=25",
            "https://V.vault.azure.net/keys?$skiptoken=x",
        ] {
            assert!(on_vault(ok, vault), "{ok}");
        }
        for bad in [
            "https://v.vault.azure.net.evil.com/keys",
            "https://evil.com/keys",
            "http://v.vault.azure.net/keys",
            "https://v.vault.azure.net:8443/keys",
            "https://v.vault.azure.net",
        ] {
            assert!(!on_vault(bad, vault), "{bad}");
        }
        assert!(on_vault(
            "https://127.0.0.1:8443/keys?x",
            "https://127.0.0.1:8443"
        ));
    }

    #[test]
    fn errors_carry_kind_code_and_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        let e = status_error(
            "sign",
            "k",
            StatusCode::TOO_MANY_REQUESTS,
            &headers,
            br#"{"error":{"code":"Throttled","message":"Too many requests"}}"#,
        );
        assert_eq!(e.error.kind, BackendErrorKind::ResourceExhausted);
        assert_eq!(e.error.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(e.code.as_deref(), Some("Throttled"));
        assert!(
            e.error
                .message
                .contains("HTTP 429: Throttled: Too many requests"),
            "{}",
            e.error.message
        );
        let e = status_error("sign", "k", StatusCode::FORBIDDEN, &HeaderMap::new(), b"{}");
        assert_eq!(e.error.kind, BackendErrorKind::PermissionDenied);
        assert!(
            e.error.message.contains("permission for sign"),
            "{}",
            e.error.message
        );
        let e = status_error(
            "get",
            "k",
            StatusCode::SERVICE_UNAVAILABLE,
            &HeaderMap::new(),
            b"",
        );
        assert_eq!(e.error.kind, BackendErrorKind::Unavailable);
        assert!(e.error.retry_after.is_none());
    }
}
