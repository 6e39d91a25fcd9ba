//! SPIRE's credential chain, built from its parts: `plugin_data`'s client secret, else
//! `DefaultAzureCredential`'s order as SPIRE gets it from azidentity:
//! 1. environment: `AZURE_TENANT_ID` + `AZURE_CLIENT_ID` + `AZURE_CLIENT_SECRET`;
//! 2. workload identity: `AZURE_FEDERATED_TOKEN_FILE` + `AZURE_CLIENT_ID` + `AZURE_TENANT_ID`
//!    (the file is re-read at every token fetch: the kubelet rotates it);
//! 3. managed identity: App Service (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`), else IMDS
//!    (`AZURE_POD_IDENTITY_AUTHORITY_HOST` overrides its address, as in the SDKs);
//!    `AZURE_CLIENT_ID` selects a user-assigned identity.
//!
//! `AZURE_AUTHORITY_HOST` (sovereign clouds, tests) is honoured and must be https. The
//! chain is chosen once from the environment; the sources passed over are kept, so that a
//! failure says what was tried. Tokens are cached per scope and refreshed before they
//! expire; they never reach a log or an error message.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use keymanager_engine::kit::classify::{kind_for_http_status, kind_for_transport};
use keymanager_engine::settings::Secret;
use keymanager_engine::{BackendError, BackendErrorKind};
use serde_json::Value;

use crate::config::ClientSecret;

/// Entra ID's public-cloud authority.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The instance metadata service.
pub const DEFAULT_IMDS: &str = "http://169.254.169.254";
/// A token is refreshed this long before it expires (or at half its life if shorter).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// Reads an environment variable; tests pass their own.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Where tokens come from. `Debug` never shows a secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    /// A client secret, from `plugin_data` or the environment.
    ClientSecret {
        /// `https://login.microsoftonline.com` or `AZURE_AUTHORITY_HOST`.
        authority: String,
        /// The tenant.
        tenant: String,
        /// The application (client) id.
        client_id: String,
        /// The secret.
        secret: Secret,
        /// `plugin_data` or `environment`.
        origin: &'static str,
    },
    /// A federated token in a file, exchanged as a client assertion.
    WorkloadIdentity {
        /// The authority.
        authority: String,
        /// The tenant.
        tenant: String,
        /// The application (client) id.
        client_id: String,
        /// The projected service-account token.
        token_file: PathBuf,
    },
    /// App Service / Functions / Container Apps managed identity.
    AppService {
        /// `IDENTITY_ENDPOINT`.
        endpoint: String,
        /// `IDENTITY_HEADER`.
        header: Secret,
        /// A user-assigned identity's client id.
        client_id: Option<String>,
    },
    /// Virtual machine (IMDS) managed identity.
    Imds {
        /// The IMDS base address.
        endpoint: String,
        /// A user-assigned identity's client id.
        client_id: Option<String>,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Source {
    /// The source in words, without secrets.
    pub fn describe(&self) -> String {
        match self {
            Self::ClientSecret {
                authority,
                tenant,
                client_id,
                origin,
                ..
            } => format!(
                "client secret from {origin} (tenant {tenant}, client {client_id}, authority {authority})"
            ),
            Self::WorkloadIdentity {
                tenant,
                client_id,
                token_file,
                ..
            } => format!(
                "workload identity (tenant {tenant}, client {client_id}, token file {})",
                token_file.display()
            ),
            Self::AppService {
                endpoint,
                client_id,
                ..
            } => format!(
                "managed identity via App Service at {endpoint}{}",
                client_id
                    .as_ref()
                    .map_or(String::new(), |c| format!(" (client {c})"))
            ),
            Self::Imds {
                endpoint,
                client_id,
            } => format!(
                "managed identity via IMDS at {endpoint}{}",
                client_id
                    .as_ref()
                    .map_or(String::new(), |c| format!(" (client {c})"))
            ),
        }
    }
}

/// The chosen source and why the ones before it were passed over.
#[derive(Clone, Debug)]
pub struct Chain {
    /// The source used.
    pub source: Source,
    /// `"environment: AZURE_CLIENT_SECRET not set"`, … in chain order.
    pub skipped: Vec<String>,
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Environments for tests, by vault URI: a test cannot change the process environment
/// safely (tests run in parallel threads), so it registers the variables a backend of its
/// vault should see instead. Never used unless a test registers one.
static TEST_ENVIRONMENTS: Mutex<BTreeMap<String, HashMap<String, String>>> =
    Mutex::new(BTreeMap::new());

/// Makes backends of `vault_uri` read `variables` instead of the process environment (for
/// tests; see [`TEST_ENVIRONMENTS`]).
pub fn set_test_environment(vault_uri: &str, variables: &[(&str, &str)]) {
    TEST_ENVIRONMENTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(
            vault_uri.trim_end_matches('/').to_string(),
            variables
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
}

/// The chain for a backend of `vault_uri`, from the process environment (or a test's).
pub fn select_for(vault_uri: &str, config: Option<&ClientSecret>) -> Result<Chain, BackendError> {
    let test = TEST_ENVIRONMENTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(vault_uri)
        .cloned();
    match test {
        Some(variables) => select(config, &|name| variables.get(name).cloned()),
        None => select(config, &process_env),
    }
}

/// The authority host: `AZURE_AUTHORITY_HOST` (https only) or Entra's public cloud.
fn authority(env: Env<'_>) -> Result<String, BackendError> {
    match env("AZURE_AUTHORITY_HOST").filter(|v| !v.is_empty()) {
        None => Ok(DEFAULT_AUTHORITY.to_string()),
        Some(host) if host.starts_with("https://") => Ok(host.trim_end_matches('/').to_string()),
        Some(host) => Err(BackendError::new(
            BackendErrorKind::InvalidArgument,
            format!(
                "AZURE_AUTHORITY_HOST={host:?} must start with https:// (client secrets and assertions are never sent over plain http)"
            ),
        )),
    }
}

/// Chooses the source as SPIRE would: the client secret of `plugin_data`, else the first of
/// environment, workload identity and managed identity whose variables are set.
pub fn select(config: Option<&ClientSecret>, env: Env<'_>) -> Result<Chain, BackendError> {
    let get = |name: &str| env(name).filter(|v| !v.is_empty());
    let authority = authority(env)?;
    if let Some(c) = config {
        return Ok(Chain {
            source: Source::ClientSecret {
                authority,
                tenant: c.tenant_id.clone(),
                client_id: c.app_id.clone(),
                secret: c.secret.clone(),
                origin: "plugin_data",
            },
            skipped: Vec::new(),
        });
    }
    let missing = |names: &[&str]| -> Vec<String> {
        names
            .iter()
            .filter(|n| get(n).is_none())
            .map(|n| n.to_string())
            .collect()
    };
    let mut skipped = Vec::new();

    let env_vars = ["AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"];
    let absent = missing(&env_vars);
    if absent.is_empty() {
        return Ok(Chain {
            source: Source::ClientSecret {
                authority,
                tenant: get("AZURE_TENANT_ID").unwrap_or_default(),
                client_id: get("AZURE_CLIENT_ID").unwrap_or_default(),
                secret: Secret::new(get("AZURE_CLIENT_SECRET").unwrap_or_default()),
                origin: "environment",
            },
            skipped,
        });
    }
    skipped.push(format!("environment: {} not set", absent.join(", ")));

    let wi_vars = [
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
    ];
    let absent = missing(&wi_vars);
    if absent.is_empty() {
        return Ok(Chain {
            source: Source::WorkloadIdentity {
                authority,
                tenant: get("AZURE_TENANT_ID").unwrap_or_default(),
                client_id: get("AZURE_CLIENT_ID").unwrap_or_default(),
                token_file: PathBuf::from(get("AZURE_FEDERATED_TOKEN_FILE").unwrap_or_default()),
            },
            skipped,
        });
    }
    skipped.push(format!("workload identity: {} not set", absent.join(", ")));

    let client_id = get("AZURE_CLIENT_ID");
    let source = match (get("IDENTITY_ENDPOINT"), get("IDENTITY_HEADER")) {
        (Some(endpoint), Some(header)) => Source::AppService {
            endpoint,
            header: Secret::new(header),
            client_id,
        },
        _ => {
            skipped.push(
                "managed identity via App Service: IDENTITY_ENDPOINT, IDENTITY_HEADER not set"
                    .to_string(),
            );
            Source::Imds {
                endpoint: get("AZURE_POD_IDENTITY_AUTHORITY_HOST")
                    .unwrap_or_else(|| DEFAULT_IMDS.to_string())
                    .trim_end_matches('/')
                    .to_string(),
                client_id,
            }
        }
    };
    Ok(Chain { source, skipped })
}

#[derive(Clone)]
struct Token {
    value: Secret,
    refresh_at: Instant,
}

/// Fetches and caches tokens from one [`Chain`].
pub struct Credential {
    chain: Chain,
    http: reqwest::Client,
    cache: Mutex<HashMap<String, Token>>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("source", &self.chain.source)
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// A credential fetching tokens from `chain` with `http`.
    pub fn new(chain: Chain, http: reqwest::Client) -> Self {
        Self {
            chain,
            http,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The chain in use.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Token>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A token for `scope` (`https://vault.azure.net/.default`), from the cache while it is
    /// fresh. The cache lock is never held across the fetch.
    pub async fn token(&self, scope: &str) -> Result<Secret, BackendError> {
        if let Some(token) = self.cache().get(scope)
            && Instant::now() < token.refresh_at
        {
            return Ok(token.value.clone());
        }
        let (value, lifetime) = self.fetch(scope).await.map_err(|e| self.explain(e))?;
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        self.cache().insert(
            scope.to_string(),
            Token {
                value: value.clone(),
                refresh_at: Instant::now() + lifetime.saturating_sub(margin),
            },
        );
        Ok(value)
    }

    /// Forgets the token of `scope` (the vault refused it).
    pub fn invalidate(&self, scope: &str) {
        self.cache().remove(scope);
    }

    /// Names the source and what was passed over before it.
    fn explain(&self, error: BackendError) -> BackendError {
        let mut context = format!(
            "getting an Azure token with {}",
            self.chain.source.describe()
        );
        if !self.chain.skipped.is_empty() {
            context.push_str(&format!(
                " (passed over: {})",
                self.chain.skipped.join("; ")
            ));
        }
        error.context(context)
    }

    async fn fetch(&self, scope: &str) -> Result<(Secret, Duration), BackendError> {
        let resource = scope.strip_suffix("/.default").unwrap_or(scope);
        let request = match &self.chain.source {
            Source::ClientSecret {
                authority,
                tenant,
                client_id,
                secret,
                ..
            } => self
                .http
                .post(format!("{authority}/{tenant}/oauth2/v2.0/token"))
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    ("client_secret", secret.expose()),
                    ("scope", scope),
                ]),
            Source::WorkloadIdentity {
                authority,
                tenant,
                client_id,
                token_file,
            } => {
                let assertion = std::fs::read_to_string(token_file).map_err(|e| {
                    BackendError::with_source(
                        BackendErrorKind::Unauthenticated,
                        format!(
                            "cannot read AZURE_FEDERATED_TOKEN_FILE {}",
                            token_file.display()
                        ),
                        e,
                    )
                })?;
                self.http
                    .post(format!("{authority}/{tenant}/oauth2/v2.0/token"))
                    .form(&[
                        ("grant_type", "client_credentials"),
                        ("client_id", client_id),
                        (
                            "client_assertion_type",
                            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                        ),
                        ("client_assertion", assertion.trim()),
                        ("scope", scope),
                    ])
            }
            Source::AppService {
                endpoint,
                header,
                client_id,
            } => {
                let mut query = vec![("api-version", "2019-08-01"), ("resource", resource)];
                if let Some(c) = client_id {
                    query.push(("client_id", c));
                }
                self.http
                    .get(endpoint)
                    .query(&query)
                    .header("X-IDENTITY-HEADER", header.expose())
            }
            Source::Imds {
                endpoint,
                client_id,
            } => {
                let mut query = vec![("api-version", "2018-02-01"), ("resource", resource)];
                if let Some(c) = client_id {
                    query.push(("client_id", c));
                }
                self.http
                    .get(format!("{endpoint}/metadata/identity/oauth2/token"))
                    .query(&query)
                    .header("Metadata", "true")
            }
        };
        let response = request.send().await.map_err(|e| {
            BackendError::with_source(
                kind_for_transport(&e),
                "the token endpoint is unreachable",
                e,
            )
        })?;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            // Entra's error_description and the identity endpoints' messages carry no secret.
            let detail = ["error_description", "error", "message"]
                .iter()
                .find_map(|k| body.get(*k).and_then(Value::as_str))
                .unwrap_or("no error description")
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            let kind = match status {
                400 | 401 | 403 => BackendErrorKind::Unauthenticated,
                s => kind_for_http_status(s),
            };
            return Err(BackendError::new(
                kind,
                format!("the token endpoint answered HTTP {status}: {detail}"),
            ));
        }
        parse_token(&body).ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Unauthenticated,
                "the token endpoint's answer has no access_token with an expiry",
            )
        })
    }
}

fn number(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// `access_token` and its lifetime from `expires_in` (Entra, IMDS) or `expires_on` (App
/// Service: Unix seconds).
fn parse_token(body: &Value) -> Option<(Secret, Duration)> {
    let token = body.get("access_token")?.as_str()?.to_string();
    if token.is_empty() {
        return None;
    }
    let lifetime = match number(body.get("expires_in")) {
        Some(secs) => secs,
        None => {
            let on = number(body.get("expires_on"))?;
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            on.saturating_sub(now)
        }
    };
    Some((Secret::new(token), Duration::from_secs(lifetime)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn plugin_data_wins_over_the_environment() {
        let config = ClientSecret {
            tenant_id: "t".into(),
            app_id: "a".into(),
            secret: Secret::new("s3cret".into()),
        };
        let chain = select(
            Some(&config),
            &env(&[("AZURE_CLIENT_SECRET", "other"), ("IDENTITY_ENDPOINT", "x")]),
        )
        .unwrap();
        assert!(matches!(
            chain.source,
            Source::ClientSecret {
                origin: "plugin_data",
                ..
            }
        ));
        assert!(!format!("{:?}", chain.source).contains("s3cret"));
    }

    #[test]
    fn the_chain_goes_environment_workload_identity_app_service_imds() {
        let chain = select(
            None,
            &env(&[
                ("AZURE_TENANT_ID", "t"),
                ("AZURE_CLIENT_ID", "c"),
                ("AZURE_CLIENT_SECRET", "s"),
                ("AZURE_FEDERATED_TOKEN_FILE", "/f"),
            ]),
        )
        .unwrap();
        assert!(matches!(
            chain.source,
            Source::ClientSecret {
                origin: "environment",
                ..
            }
        ));

        let chain = select(
            None,
            &env(&[
                ("AZURE_TENANT_ID", "t"),
                ("AZURE_CLIENT_ID", "c"),
                ("AZURE_FEDERATED_TOKEN_FILE", "/f"),
                ("IDENTITY_ENDPOINT", "http://x"),
                ("IDENTITY_HEADER", "h"),
            ]),
        )
        .unwrap();
        assert!(
            matches!(&chain.source, Source::WorkloadIdentity { token_file, .. } if token_file == &PathBuf::from("/f"))
        );
        assert_eq!(
            chain.skipped,
            vec!["environment: AZURE_CLIENT_SECRET not set"]
        );

        let chain = select(
            None,
            &env(&[
                ("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi/token"),
                ("IDENTITY_HEADER", "h"),
                ("AZURE_CLIENT_ID", "user-assigned"),
            ]),
        )
        .unwrap();
        assert!(
            matches!(&chain.source, Source::AppService { client_id: Some(c), .. } if c == "user-assigned")
        );
        assert_eq!(chain.skipped.len(), 2);

        let chain = select(None, &env(&[])).unwrap();
        assert_eq!(
            chain.source,
            Source::Imds {
                endpoint: DEFAULT_IMDS.into(),
                client_id: None
            }
        );
        assert_eq!(chain.skipped.len(), 3, "{:?}", chain.skipped);
        let chain = select(
            None,
            &env(&[("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://127.0.0.1:9/")]),
        )
        .unwrap();
        assert!(
            matches!(&chain.source, Source::Imds { endpoint, .. } if endpoint == "http://127.0.0.1:9")
        );
    }

    #[test]
    fn the_authority_host_must_be_https() {
        let err = select(
            None,
            &env(&[("AZURE_AUTHORITY_HOST", "http://login.local")]),
        )
        .unwrap_err();
        assert_eq!(err.kind, BackendErrorKind::InvalidArgument);
        assert!(err.message.contains("AZURE_AUTHORITY_HOST"), "{err}");
        let chain = select(
            None,
            &env(&[
                ("AZURE_AUTHORITY_HOST", "https://127.0.0.1:8443/"),
                ("AZURE_TENANT_ID", "t"),
                ("AZURE_CLIENT_ID", "c"),
                ("AZURE_CLIENT_SECRET", "s"),
            ]),
        )
        .unwrap();
        assert!(
            matches!(&chain.source, Source::ClientSecret { authority, .. } if authority == "https://127.0.0.1:8443")
        );
    }

    #[test]
    fn tokens_parse_from_every_endpoint_shape() {
        let (t, life) =
            parse_token(&serde_json::json!({"access_token": "x", "expires_in": 3599})).unwrap();
        assert_eq!((t.expose(), life), ("x", Duration::from_secs(3599)));
        let (_, life) =
            parse_token(&serde_json::json!({"access_token": "x", "expires_in": "60"})).unwrap();
        assert_eq!(life, Duration::from_secs(60));
        let later = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let (_, life) =
            parse_token(&serde_json::json!({"access_token": "x", "expires_on": later.to_string()}))
                .unwrap();
        assert!(life > Duration::from_secs(590) && life <= Duration::from_secs(600));
        assert!(parse_token(&serde_json::json!({"access_token": "", "expires_in": 1})).is_none());
        assert!(parse_token(&serde_json::json!({"access_token": "x"})).is_none());
    }

    #[tokio::test]
    async fn an_unreachable_imds_names_everything_tried() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let endpoint: &'static str = Box::leak(format!("http://127.0.0.1:{port}").into_boxed_str());
        let pairs: &'static [(&'static str, &'static str)] =
            Box::leak(vec![("AZURE_POD_IDENTITY_AUTHORITY_HOST", endpoint)].into_boxed_slice());
        let chain = select(None, &env(pairs)).unwrap();
        let credential = Credential::new(chain, reqwest::Client::new());
        let err = credential
            .token("https://vault.azure.net/.default")
            .await
            .unwrap_err();
        for part in ["IMDS", "environment:", "workload identity:", "App Service:"] {
            assert!(err.message.contains(part), "{part}: {err}");
        }
    }
}
