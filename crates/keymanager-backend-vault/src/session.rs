//! A logged-in connection to Vault: the token, its renewal, and a fresh login when Vault
//! stops accepting it.
//!
//! - A login method (AppRole, cert, Kubernetes) logs in at open; a fixed token is checked
//!   with `lookup-self`.
//! - A renewable token is renewed at two thirds of its TTL by a background task that ends
//!   with the session; when renewal fails, or the lease is capped short, a login method
//!   logs in again.
//! - A 403 on any call with a login method leads to one fresh login (shared by every call
//!   that saw the same token fail) and one retry: a revoked token costs no failed SignData.
//! - The token lives behind a lock that is never held across I/O; logins are serialised by
//!   an async mutex so a burst of 403s makes one login, not one per call.

use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use keymanager_engine::settings::Secret;
use keymanager_engine::{BackendError, BackendErrorKind};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::client::{Connection, VaultError, field};
use crate::config::{Auth, VaultSettings};

/// A token and what Vault said about its lifetime.
#[derive(Debug)]
struct Token {
    token: Secret,
    /// Bumped at every login, so concurrent 403s of one token make one login.
    generation: u64,
    renewable: bool,
    /// `None`: the token does not expire (a root or periodic-less token with TTL 0).
    ttl: Option<Duration>,
    obtained: Instant,
}

/// A Vault connection with a live token.
#[derive(Debug)]
pub struct Session {
    connection: Connection,
    auth: Auth,
    token: RwLock<Arc<Token>>,
    logins: tokio::sync::Mutex<()>,
}

impl Session {
    /// Connects and logs in once (a wrong secret is never retried: it could lock an
    /// account), then starts the renewal task.
    pub async fn open(settings: &VaultSettings) -> Result<Arc<Self>, BackendError> {
        let connection = Connection::new(settings)?;
        let token = first_token(&connection, &settings.auth).await?;
        let session = Arc::new(Self {
            connection,
            auth: settings.auth.clone(),
            token: RwLock::new(Arc::new(token)),
            logins: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(keep_alive(Arc::downgrade(&session)));
        Ok(session)
    }

    fn current(&self) -> Arc<Token> {
        self.token
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, token: Token) {
        *self.token.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(token);
    }

    /// Calls Vault with the current token; on a 403 with a login method, logs in again
    /// (once for all calls that saw this token fail) and retries once.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, VaultError> {
        let token = self.current();
        match self
            .connection
            .call(method.clone(), path, Some(&token.token), body)
            .await
        {
            Err(e) if e.is_forbidden() && self.auth.can_login() => {
                if let Err(login) = self.relogin(token.generation).await {
                    tracing::warn!(error = %login.message, "a fresh Vault login after a 403 failed");
                    return Err(e);
                }
                let token = self.current();
                self.connection
                    .call(method, path, Some(&token.token), body)
                    .await
            }
            other => other,
        }
    }

    /// Logs in again unless another call already did since `failed_generation`.
    async fn relogin(&self, failed_generation: u64) -> Result<(), BackendError> {
        let _one_login = self.logins.lock().await;
        let current = self.current();
        if current.generation != failed_generation {
            return Ok(());
        }
        let mut token = login(&self.connection, &self.auth).await?;
        token.generation = current.generation + 1;
        tracing::info!(method = self.auth.method(), "logged in to Vault again");
        self.replace(token);
        Ok(())
    }

    /// Renews the current token (`auth/token/renew-self`) and records its new lease.
    async fn renew(&self) -> Result<Duration, BackendError> {
        let current = self.current();
        let answer = self
            .connection
            .call(
                Method::POST,
                "auth/token/renew-self",
                Some(&current.token),
                Some(&json!({})),
            )
            .await?
            .unwrap_or_default();
        let lease = field(&answer, "/auth/lease_duration", "renew-self")?
            .as_u64()
            .unwrap_or(0);
        let ttl = Duration::from_secs(lease);
        self.replace(Token {
            token: current.token.clone(),
            generation: current.generation,
            renewable: current.renewable,
            ttl: (lease > 0).then_some(ttl),
            obtained: Instant::now(),
        });
        Ok(ttl)
    }
}

/// The token this session starts with: a login, or the fixed token checked by
/// `lookup-self` (SPIRE checks it the same way).
async fn first_token(connection: &Connection, auth: &Auth) -> Result<Token, BackendError> {
    match auth {
        Auth::Token { token } => {
            let answer = connection
                .call(Method::GET, "auth/token/lookup-self", Some(token), None)
                .await
                .map_err(|e| login_error("token_auth", e))?
                .unwrap_or_default();
            let ttl = answer
                .pointer("/data/ttl")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            Ok(Token {
                token: token.clone(),
                generation: 0,
                renewable: answer
                    .pointer("/data/renewable")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                ttl: (ttl > 0).then(|| Duration::from_secs(ttl)),
                obtained: Instant::now(),
            })
        }
        _ => login(connection, auth).await,
    }
}

/// One login with the configured method.
async fn login(connection: &Connection, auth: &Auth) -> Result<Token, BackendError> {
    let (mount, body, what) = match auth {
        Auth::Token { .. } => {
            return Err(BackendError::new(
                BackendErrorKind::Unauthenticated,
                "Vault no longer accepts token_auth's token and a fixed token cannot log in again: give the plugin a new token (re-Configure) or use a login method",
            ));
        }
        Auth::AppRole {
            mount,
            role_id,
            secret_id,
        } => (
            mount,
            json!({"role_id": role_id, "secret_id": secret_id.expose()}),
            "approle_auth",
        ),
        Auth::Cert { mount, role, .. } => (mount, json!({"name": role}), "cert_auth"),
        Auth::Kubernetes {
            mount,
            role,
            token_path,
        } => {
            // Re-read at every login: projected service-account tokens rotate.
            let jwt = std::fs::read_to_string(token_path).map_err(|e| {
                BackendError::with_source(
                    BackendErrorKind::Unauthenticated,
                    format!("cannot read k8s_auth.token_path {}", token_path.display()),
                    e,
                )
            })?;
            (mount, json!({"role": role, "jwt": jwt.trim()}), "k8s_auth")
        }
    };
    let answer = connection
        .call(
            Method::POST,
            &format!("auth/{mount}/login"),
            None,
            Some(&body),
        )
        .await
        .map_err(|e| login_error(what, e))?
        .unwrap_or_default();
    let token = field(&answer, "/auth/client_token", "a login")?
        .as_str()
        .unwrap_or_default()
        .to_string();
    if token.is_empty() {
        return Err(BackendError::new(
            BackendErrorKind::Unauthenticated,
            format!("Vault login with {what} at auth/{mount} returned no token"),
        ));
    }
    let lease = answer
        .pointer("/auth/lease_duration")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok(Token {
        token: Secret::new(token),
        generation: 0,
        renewable: answer
            .pointer("/auth/renewable")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        ttl: (lease > 0).then(|| Duration::from_secs(lease)),
        obtained: Instant::now(),
    })
}

/// A refused login is a credentials problem (not retried); anything else keeps its kind.
fn login_error(what: &str, e: VaultError) -> BackendError {
    let refused = e
        .status
        .is_some_and(|s| matches!(s.as_u16(), 400 | 401 | 403));
    let mut error = e.error.context(format!("Vault login with {what}"));
    if refused {
        error.kind = BackendErrorKind::Unauthenticated;
    }
    error
}

/// Renews (or replaces) the token at two thirds of its lease until the session is dropped.
async fn keep_alive(session: Weak<Session>) {
    loop {
        let wait = {
            let Some(session) = session.upgrade() else {
                return;
            };
            let token = session.current();
            let Some(ttl) = token.ttl else {
                return;
            };
            (token.obtained + ttl * 2 / 3).saturating_duration_since(Instant::now())
        };
        tokio::time::sleep(wait.max(Duration::from_millis(500))).await;
        let Some(session) = session.upgrade() else {
            return;
        };
        let token = session.current();
        let Some(ttl) = token.ttl else {
            continue;
        };
        let renewed = if token.renewable {
            match session.renew().await {
                // A lease capped by the token's max TTL: log in again while it still works.
                Ok(lease) if lease >= ttl / 3 => true,
                Ok(lease) => {
                    tracing::debug!(lease_s = lease.as_secs(), "Vault token near its max TTL");
                    false
                }
                Err(error) => {
                    tracing::warn!(error = %error.message, "renewing the Vault token failed");
                    false
                }
            }
        } else {
            false
        };
        if !renewed && session.auth.can_login() {
            if let Err(error) = session.relogin(token.generation).await {
                tracing::warn!(error = %error.message, "logging in to Vault again failed; the next call retries");
                // Do not spin: wait a little before the next attempt.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        } else if !renewed {
            tracing::warn!(
                "token_auth's token cannot be renewed; it expires and the plugin then needs a new token"
            );
            return;
        }
    }
}
