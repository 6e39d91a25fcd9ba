//! Telemetry of the real binary started as a plugin: `/metrics` counts exactly what 16
//! concurrent signers did, the audit log has one valid JSON line per request (none
//! interleaved) and follows a rotation, an unwritable audit path does not stop signing, and
//! `metrics_listen` binds, rebinds and refuses a port in use as documented.
//!
//! The scrape is also parsed by the Prometheus project's own parser in
//! `tests/spire/telemetry_test.go` (through SPIRE's KeyManager facade).

#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use keymanager_host::PluginProcess;
use keymanager_proto::keymanager::sign_data_request::SignerOpts;
use keymanager_proto::keymanager::{GenerateKeyRequest, HashAlgorithm, KeyType, SignDataRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_kms-keymanager");
const SIGNERS: usize = 16;
const SIGNS_PER_SIGNER: usize = 40;

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn hcl(keys: &Path, metrics: Option<SocketAddr>, audit: Option<&Path>) -> String {
    let mut text = format!("keys_path = {:?}\n", keys.display().to_string());
    if let Some(address) = metrics {
        text += &format!("metrics_listen = \"{address}\"\n");
    }
    if let Some(path) = audit {
        text += &format!("audit_log = {:?}\n", path.display().to_string());
    }
    text
}

async fn launch() -> PluginProcess {
    PluginProcess::launch(Path::new(BIN)).await.unwrap()
}

async fn generate(plugin: &PluginProcess, id: &str, key_type: KeyType) {
    plugin
        .key_manager()
        .generate_key(GenerateKeyRequest {
            key_id: id.into(),
            key_type: key_type as i32,
        })
        .await
        .unwrap();
}

fn sign_request(id: &str, n: usize) -> SignDataRequest {
    let mut digest = [0u8; 32];
    digest[..8].copy_from_slice(&(n as u64).to_le_bytes());
    SignDataRequest {
        key_id: id.into(),
        data: digest.to_vec(),
        signer_opts: Some(SignerOpts::HashAlgorithm(HashAlgorithm::Sha256 as i32)),
    }
}

/// `GET /metrics` as Prometheus sends it (text format 0.0.4).
async fn scrape(address: SocketAddr) -> Result<String, std::io::Error> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(
            b"GET /metrics HTTP/1.1\r\nHost: test\r\nAccept: text/plain;version=0.0.4\r\n\r\n",
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_default();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    Ok(body.to_string())
}

/// Sample lines as `name{labels}` → value (the exact parse is the Go test's job).
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(text.is_empty() || text.ends_with('\n'), "a line was cut");
    text.lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"))
        })
        .collect()
}

/// Waits until the writer thread has caught up (it runs behind the requests by design).
async fn wait_for_lines(path: &Path, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = audit_lines(path);
        if lines.len() >= count || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_signers_are_counted_exactly_and_audited_line_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let address = free_port();
    let plugin = launch().await;
    plugin
        .configure(
            "example.org",
            &hcl(&dir.path().join("keys.json"), Some(address), Some(&audit)),
        )
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(&audit).unwrap().permissions().mode() & 0o777,
        0o600,
        "the audit log is created private"
    );
    generate(&plugin, "ec", KeyType::EcP256).await;
    generate(&plugin, "rsa", KeyType::Rsa2048).await;

    let mut signers = Vec::new();
    for signer in 0..SIGNERS {
        let mut client = plugin.key_manager();
        signers.push(tokio::spawn(async move {
            let id = if signer % 2 == 0 { "ec" } else { "rsa" };
            for n in 0..SIGNS_PER_SIGNER {
                client
                    .sign_data(sign_request(id, signer * 1000 + n))
                    .await
                    .unwrap();
            }
        }));
    }
    for signer in signers {
        signer.await.unwrap();
    }
    let missing = plugin
        .key_manager()
        .sign_data(sign_request("missing", 0))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let per_key = (SIGNERS / 2 * SIGNS_PER_SIGNER) as f64;
    let metrics = samples(&scrape(address).await.unwrap());
    let value = |series: &str| {
        *metrics
            .get(series)
            .unwrap_or_else(|| panic!("{series} missing from {metrics:#?}"))
    };
    assert_eq!(
        value(r#"kms_keymanager_sign_total{backend="disk",key_type="ec-p256",result="ok"}"#),
        per_key
    );
    assert_eq!(
        value(r#"kms_keymanager_sign_total{backend="disk",key_type="rsa-2048",result="ok"}"#),
        per_key
    );
    assert_eq!(
        value(r#"kms_keymanager_sign_total{backend="disk",key_type="unknown",result="not_found"}"#),
        1.0
    );
    assert_eq!(
        value(r#"kms_keymanager_sign_duration_seconds_count{backend="disk"}"#),
        2.0 * per_key + 1.0
    );
    assert_eq!(
        value(r#"kms_keymanager_backend_calls_total{backend="disk",operation="sign",result="ok"}"#),
        2.0 * per_key
    );
    assert_eq!(
        value(r#"kms_keymanager_generate_key_total{result="ok"}"#),
        2.0
    );
    assert_eq!(value(r#"kms_keymanager_keys{state="active"}"#), 2.0);

    let total = 2 + SIGNERS * SIGNS_PER_SIGNER + 1;
    let lines = wait_for_lines(&audit, total).await;
    assert_eq!(lines.len(), total, "one line per request, none lost");
    let signs: Vec<_> = lines
        .iter()
        .filter(|l| l["operation"] == "SignData" && l["result"] == "ok")
        .collect();
    assert_eq!(signs.len(), SIGNERS * SIGNS_PER_SIGNER);
    for line in &signs {
        assert_eq!(line["backend"], "disk");
        assert_eq!(line["hash"], "SHA-256");
        assert!(line["fingerprint"].as_str().is_some_and(|f| f.len() == 64));
        assert!(
            line["time"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z') && t.len() == 24)
        );
        assert!(line["latency_us"].is_u64());
    }
    assert_eq!(
        signs.iter().filter(|l| l["scheme"] == "ECDSA").count(),
        SIGNERS / 2 * SIGNS_PER_SIGNER
    );
    let failed: Vec<_> = lines.iter().filter(|l| l["result"] == "error").collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["error_code"], "NotFound");
    assert_eq!(failed[0]["key_id"], "missing");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["operation"] == "GenerateKey")
            .count(),
        2
    );

    // Rotation: the file is renamed away; the next lines go to a new file at the path.
    let rotated = dir.path().join("audit.jsonl.1");
    std::fs::rename(&audit, &rotated).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    for n in 0..10 {
        plugin
            .key_manager()
            .sign_data(sign_request("ec", 90_000 + n))
            .await
            .unwrap();
    }
    let fresh = wait_for_lines(&audit, 10).await;
    assert_eq!(fresh.len(), 10, "the new file gets the next lines");
    assert_eq!(
        audit_lines(&rotated).len(),
        total,
        "the rotated file is left alone"
    );
    assert_eq!(
        std::fs::metadata(&audit).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let exit = plugin.shutdown().await.unwrap();
    assert!(exit.graceful);
    assert!(
        scrape(address).await.is_err(),
        "the endpoint stops with the plugin"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unwritable_audit_log_does_not_stop_signing_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let address = free_port();
    let plugin = launch().await;
    plugin
        .configure(
            "example.org",
            &hcl(
                &dir.path().join("keys.json"),
                Some(address),
                Some(&dir.path().join("no-such-dir").join("audit.jsonl")),
            ),
        )
        .await
        .unwrap();
    generate(&plugin, "ec", KeyType::EcP256).await;
    for n in 0..5 {
        plugin
            .key_manager()
            .sign_data(sign_request("ec", n))
            .await
            .unwrap();
    }
    // GenerateKey and 5 SignData: 6 lines lost, each counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let failures = loop {
        let metrics = samples(&scrape(address).await.unwrap());
        let failures = metrics
            .get(r#"kms_keymanager_audit_failures_total{reason="open"}"#)
            .copied()
            .unwrap_or_default();
        if failures >= 6.0 || Instant::now() > deadline {
            break failures;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(failures, 6.0);
    let stderr = plugin.stderr_lines().join("\n");
    assert!(
        stderr.contains("cannot open the audit log"),
        "the failure is logged: {stderr}"
    );
    plugin.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_listen_refuses_a_port_in_use_keeps_the_same_address_and_rebinds_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_address = busy.local_addr().unwrap();

    let refused = launch().await;
    let status = refused
        .configure("example.org", &hcl(&keys, Some(busy_address), None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("metrics_listen")
            && status.message().contains(&busy_address.to_string()),
        "{}",
        status.message()
    );
    refused.shutdown().await.unwrap();

    let plugin = launch().await;
    let first = free_port();
    plugin
        .configure("example.org", &hcl(&keys, Some(first), None))
        .await
        .unwrap();
    generate(&plugin, "ec", KeyType::EcP256).await;
    // The same address: the running endpoint (and its counts) stay.
    plugin
        .configure("example.org", &hcl(&keys, Some(first), None))
        .await
        .unwrap();
    assert!(
        scrape(first)
            .await
            .unwrap()
            .contains("kms_keymanager_generate_key_total{result=\"ok\"} 1")
    );
    // A new address: served there, the old port is freed.
    let second = free_port();
    plugin
        .configure("example.org", &hcl(&keys, Some(second), None))
        .await
        .unwrap();
    assert!(
        scrape(second)
            .await
            .unwrap()
            .contains("kms_keymanager_generate_key_total{result=\"ok\"} 1")
    );
    assert!(
        scrape(first).await.is_err(),
        "the old address is no longer served"
    );
    // A port in use at re-Configure: refused, the running endpoint stays.
    let status = plugin
        .configure("example.org", &hcl(&keys, Some(busy_address), None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("metrics_listen"),
        "{}",
        status.message()
    );
    assert!(scrape(second).await.is_ok());
    // Removed from the configuration: the endpoint stops.
    plugin
        .configure("example.org", &hcl(&keys, None, None))
        .await
        .unwrap();
    assert!(scrape(second).await.is_err());
    plugin.shutdown().await.unwrap();
    drop(busy);
}

/// aws_kms: each SignData line carries KMS's request id (the CloudTrail event's
/// `requestID`), and the line names this server's id. Against moto.
#[tokio::test(flavor = "multi_thread")]
async fn aws_audit_lines_carry_the_kms_request_id_and_the_server_id() {
    let moto = keymanager_conformance::peers::moto();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let plugin = launch().await;
    plugin
        .configure(
            "example.org",
            &format!(
                "backend = \"aws_kms\"\nregion = \"us-east-1\"\nendpoint = {:?}\naccess_key_id = \"PLANTED-SECRET-aws-access-key-id\"\nsecret_access_key = \"PLANTED-SECRET-aws-secret-access-key\"\nkey_identifier_value = \"audited-server\"\naudit_log = {:?}\n",
                moto.url,
                audit.display().to_string()
            ),
        )
        .await
        .unwrap();
    generate(&plugin, "x509-CA-A", KeyType::EcP256).await;
    for n in 0..3 {
        plugin
            .key_manager()
            .sign_data(sign_request("x509-CA-A", n))
            .await
            .unwrap();
    }
    let lines = wait_for_lines(&audit, 4).await;
    let signs: Vec<_> = lines
        .iter()
        .filter(|l| l["operation"] == "SignData")
        .collect();
    assert_eq!(signs.len(), 3);
    let mut ids = std::collections::HashSet::new();
    for line in signs {
        assert_eq!(line["backend"], "aws_kms");
        assert_eq!(line["server_id"], "audited-server");
        let id = line["request_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no request id: {line}"));
        assert!(!id.is_empty());
        ids.insert(id.to_string());
    }
    assert_eq!(ids.len(), 3, "one request id per KMS call");
    plugin.shutdown().await.unwrap();
}
