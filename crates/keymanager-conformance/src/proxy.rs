//! A loopback HTTP proxy between a backend and its test peer that counts every request,
//! remembers what it was, and fails, loses or holds the request number N on demand:
//! the way to inject a failure — or a crash — at each store call of a GenerateKey. It can
//! also rewrite answers ([`Fault::Rewrite`], e.g. [`swap_public_key`]): a store that answers
//! with something other than what it holds.
//!
//! For an HTTPS-only peer (the Key Vault fake) the proxy speaks TLS on both sides
//! ([`FaultProxy::start_tls`]): it serves a 127.0.0.1 certificate issued from the peer's test
//! CA, so the backend trusts the proxy exactly as it trusts the peer, and forwards over TLS.
//! The `Host` header is passed on as the client sent it (the proxy's port): a peer that
//! builds URLs or challenges from it answers with the proxy's address.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What the proxy saw of one request.
#[derive(Clone, Debug)]
pub struct RequestSummary {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `X-Amz-Target` (AWS JSON protocols), if any.
    pub target: Option<String>,
    /// The body, as text (STS's form-encoded `Action=`, KMS's JSON).
    pub body: String,
    /// The access key id of an AWS SigV4 `Authorization` header.
    pub aws_access_key_id: Option<String>,
}

impl RequestSummary {
    /// A short name: the AWS target's operation, else method and path.
    pub fn name(&self) -> String {
        match &self.target {
            Some(target) => target.rsplit('.').next().unwrap_or(target).to_string(),
            None => format!("{} {}", self.method, self.path),
        }
    }
}

/// What happens to a request. (No `PartialEq`: function pointers do not compare reliably.)
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Answered 503 without reaching the peer.
    Fail,
    /// Forwarded (the store applies it), then the connection is dropped: a lost response.
    Lose,
    /// Held forever without reaching the peer: the caller is cancelled mid-call (a crash
    /// before the call takes effect).
    HoldBefore,
    /// Forwarded, then the response is held forever (a crash after the call took effect).
    HoldAfter,
    /// Forwarded; a successful (2xx) response body is replaced by what the function makes
    /// of it (it may return the body as it is for requests it does not target).
    Rewrite(fn(&RequestSummary, Bytes) -> Bytes),
}

/// Which requests a fault applies to.
#[derive(Clone, Copy, Debug)]
pub enum Plan {
    /// Every request passes.
    Pass,
    /// Only the `n`-th request from now (1-based).
    Once(usize, Fault),
    /// The `n`-th request from now and every later one (an outage).
    From(usize, Fault),
}

#[derive(Default)]
struct State {
    seen: Vec<RequestSummary>,
    plan: Option<(usize, Plan)>,
    held: usize,
    /// AWS operations answered AccessDeniedException (a missing IAM permission).
    denied: Vec<String>,
}

/// A running proxy; stops when dropped with its runtime.
#[derive(Clone)]
pub struct FaultProxy {
    url: String,
    state: Arc<Mutex<State>>,
    held: Arc<Notify>,
}

impl FaultProxy {
    /// Starts a proxy to `target` (`http://127.0.0.1:PORT`) on a free loopback port.
    pub async fn start(target: &str) -> Self {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        Self::serve(target, None, Arc::new(Forward::Plain(Box::new(client)))).await
    }

    /// Starts a TLS proxy to the HTTPS peer `target` (`https://127.0.0.1:PORT`) whose test CA
    /// is `ca_cert` with private key `ca_key` (PEM): the proxy serves a certificate for
    /// 127.0.0.1 issued by that CA and trusts only that CA towards the peer.
    pub async fn start_tls(target: &str, ca_cert: &Path, ca_key: &Path) -> Self {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("fault proxy: cannot read {}: {e}", path.display()))
        };
        let ca_key = rcgen::KeyPair::from_pem(&read(ca_key)).expect("the peer's CA key (PEM)");
        let issuer =
            rcgen::Issuer::from_ca_cert_pem(&read(ca_cert), ca_key).expect("the peer's CA (PEM)");
        let leaf_key = rcgen::KeyPair::generate().expect("a key for the proxy");
        let leaf =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("certificate parameters")
                .signed_by(&leaf_key, &issuer)
                .expect("the proxy's certificate");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .expect("the proxy's TLS configuration");
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_cert).expect("the peer's CA file") {
            roots
                .add(cert.expect("a PEM certificate"))
                .expect("a CA certificate");
        }
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let authority = target
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let forward = Forward::Tls {
            connector: TlsConnector::from(Arc::new(client)),
            authority,
        };
        Self::serve(
            target,
            Some(TlsAcceptor::from(Arc::new(server))),
            Arc::new(forward),
        )
        .await
    }

    async fn serve(target: &str, tls: Option<TlsAcceptor>, forward: Arc<Forward>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the fault proxy");
        let addr: SocketAddr = listener.local_addr().expect("proxy address");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let proxy = Self {
            url: format!("{scheme}://{addr}"),
            state: Arc::new(Mutex::new(State::default())),
            held: Arc::new(Notify::new()),
        };
        let target: Arc<str> = Arc::from(target.trim_end_matches('/'));
        let state = proxy.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (forward, target, state, tls) =
                    (forward.clone(), target.clone(), state.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let (forward, target, state) =
                            (forward.clone(), target.clone(), state.clone());
                        async move { state.handle(request, &forward, &target).await }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        proxy
    }

    /// The proxy's URL, for a backend's `endpoint`.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `plan` to the requests from now on, counting from 1.
    pub fn plan(&self, plan: Plan) {
        let mut state = self.state();
        let now = state.seen.len();
        state.plan = Some((now, plan));
        state.held = 0;
    }

    /// Every request passes again.
    pub fn clear(&self) {
        self.state().plan = None;
    }

    /// Answers the AWS operations listed (`GetPublicKey`, as [`RequestSummary::name`] gives
    /// it) the way AWS answers a caller without the IAM permission: 400
    /// `AccessDeniedException`. moto and LocalStack do not enforce IAM; this does. An empty
    /// list allows everything again.
    pub fn deny_aws(&self, operations: &[&str]) {
        self.state().denied = operations.iter().map(|o| o.to_string()).collect();
    }

    /// Requests seen so far.
    pub fn count(&self) -> usize {
        self.state().seen.len()
    }

    /// The requests seen since `start` (a [`FaultProxy::count`]).
    pub fn since(&self, start: usize) -> Vec<RequestSummary> {
        self.state().seen[start..].to_vec()
    }

    /// Waits until a request is being held (since the last [`FaultProxy::plan`]).
    pub async fn held(&self) {
        loop {
            let notified = self.held.notified();
            if self.state().held > 0 {
                return;
            }
            notified.await;
        }
    }

    async fn handle(
        &self,
        request: Request<Incoming>,
        forward: &Forward,
        target: &str,
    ) -> Result<Response<Full<Bytes>>, std::io::Error> {
        let (parts, body) = request.into_parts();
        let body = body
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        let summary = RequestSummary {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.to_string()),
            target: parts
                .headers
                .get("x-amz-target")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: String::from_utf8_lossy(&body).into_owned(),
            aws_access_key_id: parts
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split("Credential=").nth(1))
                .and_then(|v| v.split('/').next())
                .map(str::to_string),
        };
        let denied = self.state().denied.contains(&summary.name());
        if denied {
            self.state().seen.push(summary.clone());
            let body = format!(
                "{{\"__type\":\"AccessDeniedException\",\"message\":\"User: arn:aws:iam::000000000000:user/test is not authorized to perform: kms:{} because no identity-based policy allows the kms:{} action\"}}",
                summary.name(),
                summary.name()
            );
            return Ok(Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .header("content-type", "application/x-amz-json-1.1")
                .body(Full::new(Bytes::from(body)))
                .expect("static response"));
        }
        let fault = {
            let mut state = self.state();
            state.seen.push(summary.clone());
            let index = state.seen.len();
            match state.plan {
                Some((base, Plan::Once(n, fault))) if index == base + n => Some(fault),
                Some((base, Plan::From(n, fault))) if index >= base + n => Some(fault),
                _ => None,
            }
        };
        if matches!(fault, Some(Fault::Fail)) {
            return Ok(Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(b"{}")))
                .expect("static response"));
        }
        if matches!(fault, Some(Fault::HoldBefore)) {
            match self.hold().await {}
        }
        let uri = match forward {
            Forward::Plain(_) => format!("{target}{}", summary.path),
            // A connection of its own: the request line carries the path only.
            Forward::Tls { .. } => summary.path.clone(),
        };
        let mut request = Request::builder().method(parts.method).uri(uri);
        for (name, value) in &parts.headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(std::io::Error::other)?;
        let response = forward.send(request).await?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        match fault {
            Some(Fault::Lose) => Err(std::io::Error::other("response dropped by the fault proxy")),
            Some(Fault::HoldAfter) => match self.hold().await {},
            Some(Fault::Rewrite(rewrite)) if parts.status.is_success() => {
                let body = rewrite(&summary, body);
                let mut response = Response::from_parts(parts, Full::new(body.clone()));
                response
                    .headers_mut()
                    .insert(hyper::header::CONTENT_LENGTH, body.len().into());
                Ok(response)
            }
            _ => Ok(Response::from_parts(parts, Full::new(body))),
        }
    }

    async fn hold(&self) -> Infallible {
        self.state().held += 1;
        self.held.notify_waiters();
        std::future::pending().await
    }
}

/// A [`Fault::Rewrite`] that swaps the public key in a public-key read for a freshly
/// generated key of the same curve: AWS KMS `GetPublicKey` (`PublicKey`, base64 DER) and
/// Cloud KMS `cryptoKeyVersions.getPublicKey` (`pem` with its `pemCrc32c`, kept consistent so
/// that the answer passes the client's integrity check). Every other answer passes as it is.
/// EC keys only (P-256, P-384): generating an RSA key per answer would be slow, and a test
/// needs one swapped key, not every type.
pub fn swap_public_key(request: &RequestSummary, body: Bytes) -> Bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    let aws = request.name() == "GetPublicKey";
    let gcp = request.method == "GET"
        && request
            .path
            .split('?')
            .next()
            .unwrap_or_default()
            .ends_with("/publicKey");
    if !aws && !gcp {
        return body;
    }
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return body;
    };
    if aws {
        let Some(der) = json["PublicKey"]
            .as_str()
            .and_then(|b| STANDARD.decode(b).ok())
        else {
            return body;
        };
        json["PublicKey"] = STANDARD.encode(other_ec_key(&der)).into();
    } else {
        let Some(pem) = json["pem"].as_str() else {
            return body;
        };
        let base64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let Ok(der) = STANDARD.decode(base64) else {
            return body;
        };
        let encoded = STANDARD.encode(other_ec_key(&der));
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in encoded.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        // Cloud KMS sends int64 fields as JSON strings.
        json["pemCrc32c"] = crc32c::crc32c(pem.as_bytes()).to_string().into();
        json["pem"] = pem.into();
    }
    Bytes::from(json.to_string())
}

/// A new public key (DER SubjectPublicKeyInfo) on the curve of `spki`.
fn other_ec_key(spki: &[u8]) -> Vec<u8> {
    use p256::elliptic_curve::Generate;
    use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
    let der = if p256::PublicKey::from_public_key_der(spki).is_ok() {
        p256::ecdsa::SigningKey::generate()
            .verifying_key()
            .to_public_key_der()
    } else if p384::PublicKey::from_public_key_der(spki).is_ok() {
        p384::ecdsa::SigningKey::generate()
            .verifying_key()
            .to_public_key_der()
    } else {
        panic!("swap_public_key: only EC P-256 and P-384 public keys are swapped")
    };
    der.expect("encode a public key").as_bytes().to_vec()
}

/// How the proxy reaches the peer.
enum Forward {
    /// Plain HTTP through a pooled client.
    Plain(Box<Client<HttpConnector, Full<Bytes>>>),
    /// TLS, one connection per request (a lost response must not poison a pooled one).
    Tls {
        connector: TlsConnector,
        /// `127.0.0.1:PORT`.
        authority: String,
    },
}

impl Forward {
    async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, std::io::Error> {
        match self {
            Self::Plain(client) => client.request(request).await.map_err(std::io::Error::other),
            Self::Tls {
                connector,
                authority,
            } => {
                let tcp = TcpStream::connect(authority.as_str()).await?;
                let host = authority
                    .rsplit_once(':')
                    .map_or(authority.as_str(), |(host, _)| host)
                    .to_string();
                let name = ServerName::try_from(host).map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls))
                        .await
                        .map_err(std::io::Error::other)?;
                tokio::spawn(connection);
                sender
                    .send_request(request)
                    .await
                    .map_err(std::io::Error::other)
            }
        }
    }
}
