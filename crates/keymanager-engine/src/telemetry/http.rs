//! The `/metrics` endpoint: a minimal HTTP/1.1 responder on tokio, enough for Prometheus
//! and curl (one request per connection, `Connection: close`). A full HTTP stack would add
//! a web framework to the plugin for one read-only page.
//!
//! Content negotiation as Prometheus's own clients do it: OpenMetrics text when the scraper's
//! `Accept` names `application/openmetrics-text`, the Prometheus text format 0.0.4 otherwise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::Telemetry;
use super::metrics::{OPENMETRICS_TEXT, PROMETHEUS_TEXT};

/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// A scraper that does not send its request within this time is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;

/// The running endpoint; dropping it stops it and frees the port.
pub struct MetricsServer {
    address: SocketAddr,
    accept: JoinHandle<()>,
}

impl MetricsServer {
    /// Serves `telemetry` on a bound listener. The listener is bound separately (see
    /// [`bind`]) so that a port in use is reported before the engine starts.
    pub fn serve(listener: TcpListener, telemetry: Arc<Telemetry>) -> std::io::Result<Self> {
        let address = listener.local_addr()?;
        let accept = tokio::spawn(accept_loop(listener, telemetry));
        tracing::info!(%address, "metrics endpoint serving /metrics");
        Ok(Self { address, accept })
    }

    /// The address actually bound (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops the listener: the port is free at once.
        self.accept.abort();
    }
}

/// Binds the endpoint's address; fails when it is in use or not local.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

async fn accept_loop(listener: TcpListener, telemetry: Arc<Telemetry>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(%error, "metrics endpoint cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = respond(stream, &telemetry).await {
                tracing::debug!(%error, "metrics request failed");
            }
        });
    }
}

async fn respond(mut stream: TcpStream, telemetry: &Telemetry) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let response = match parse(&head) {
        Some(Request {
            method,
            path,
            openmetrics,
        }) => {
            let path = path.split('?').next().unwrap_or(path);
            match (method, path) {
                ("GET" | "HEAD", "/metrics") => {
                    let (body, content_type) = if openmetrics {
                        (telemetry.metrics().encode_openmetrics(), OPENMETRICS_TEXT)
                    } else {
                        (telemetry.metrics().encode_prometheus(), PROMETHEUS_TEXT)
                    };
                    reply("200 OK", content_type, &body, method == "HEAD")
                }
                ("GET" | "HEAD", _) => reply(
                    "404 Not Found",
                    "text/plain; charset=utf-8",
                    "metrics are served on /metrics\n",
                    method == "HEAD",
                ),
                _ => reply(
                    "405 Method Not Allowed",
                    "text/plain; charset=utf-8",
                    "only GET and HEAD\n",
                    false,
                ),
            }
        }
        None => reply(
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "malformed request\n",
            false,
        ),
    };
    stream.write_all(&response).await?;
    stream.shutdown().await
}

/// Reads up to the end of the request head (the blank line) or [`MAX_HEAD`] bytes.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(head)
}

struct Request<'a> {
    method: &'a str,
    path: &'a str,
    openmetrics: bool,
}

fn parse(head: &[u8]) -> Option<Request<'_>> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut start = lines.next()?.split(' ');
    let method = start.next()?;
    let path = start.next()?;
    if !start.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let openmetrics = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("accept")
                && value.contains("application/openmetrics-text")
        })
    });
    Some(Request {
        method,
        path,
        openmetrics,
    })
}

fn reply(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::CallStats;

    async fn get(address: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(address)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        stream
            .write_all(request.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = String::new();
        stream
            .read_to_string(&mut out)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        out
    }

    #[tokio::test]
    async fn serves_both_formats_refuses_the_rest_and_frees_the_port_when_dropped() {
        let telemetry = Arc::new(Telemetry::new("disk", None, Arc::new(CallStats::default())));
        let listener = bind("127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let server = MetricsServer::serve(listener, telemetry).unwrap_or_else(|e| panic!("{e}"));
        let address = server.local_addr();

        let text = get(address, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("Content-Type: text/plain; version=0.0.4"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE kms_keymanager_swept_keys_total counter"),
            "{text}"
        );

        let open = get(
            address,
            "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
        )
        .await;
        assert!(open.contains("application/openmetrics-text"), "{open}");
        assert!(open.ends_with("# EOF\n"), "{open}");

        assert!(
            get(address, "GET / HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 404")
        );
        assert!(
            get(address, "POST /metrics HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 405")
        );
        assert!(
            get(address, "junk\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 400")
        );

        // A second bind of the same address fails while served, succeeds once dropped.
        assert!(bind(address).await.is_err());
        drop(server);
        tokio::task::yield_now().await;
        let mut rebound = None;
        for _ in 0..50 {
            if let Ok(listener) = bind(address).await {
                rebound = Some(listener);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(rebound.is_some(), "the port is freed when the server stops");
    }
}
