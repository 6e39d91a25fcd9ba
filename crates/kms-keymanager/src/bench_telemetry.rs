//! `kms-keymanager bench --telemetry`: what `metrics_listen` and `audit_log` cost a SignData,
//! on the same keys, in one run — in process (the engine alone, where a difference of a
//! microsecond is visible) and through the plugin socket (what SPIRE sees).
//!
//! Off and on alternate (off, on, on, off; each half the cell's time) so that drift of the
//! machine during the run falls on both sides equally; each figure is the mean of its halves.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keymanager_backend_disk::DiskBackend;
use keymanager_engine::{Engine, EngineOptions, HashAlgorithm, KeyId, KeyType, SignerOpts};
use keymanager_host::PluginProcess;
use keymanager_proto::keymanager::sign_data_request::SignerOpts as WireOpts;
use keymanager_proto::keymanager::{GenerateKeyRequest, SignDataRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bench::{Cell, launch_configured, measure, us};

type SharedEngine = Arc<Engine<DiskBackend>>;

pub async fn run(concurrency: &[usize], duration: Duration) -> Result<(), String> {
    let binary = std::env::current_exe().map_err(|e| format!("cannot locate this binary: {e}"))?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let keys_path = dir.path().join("keys.json");
    let plugin_audit = dir.path().join("plugin-audit.jsonl");
    let engine_audit = dir.path().join("in-process-audit.jsonl");

    let off = launch_configured(&binary, &keys_path).await?;
    let key_types = [KeyType::EcP256, KeyType::Rsa2048];
    for key_type in key_types {
        off.key_manager()
            .generate_key(GenerateKeyRequest {
                key_id: key_type.as_str().into(),
                key_type: keymanager_plugin::wire::key_type_to_wire(key_type),
            })
            .await
            .map_err(|s| s.message().to_string())?;
    }
    // A second plugin on the same keys file, with both telemetry settings.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?;
    let on = PluginProcess::launch(&binary)
        .await
        .map_err(|e| e.to_string())?;
    on.configure(
        "example.org",
        &format!(
            "keys_path = {:?}\nmetrics_listen = \"{address}\"\naudit_log = {:?}\n",
            keys_path.display().to_string(),
            plugin_audit.display().to_string()
        ),
    )
    .await
    .map_err(|s| s.message().to_string())?;
    let engine = |audit: Option<&Path>| {
        let keys_path = keys_path.clone();
        let audit = audit.map(Path::to_path_buf);
        async move {
            let engine = Engine::start(
                Arc::new(DiskBackend::new(keys_path)),
                None,
                EngineOptions::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
            if let Some(audit) = audit {
                engine.telemetry().set_counting(true);
                engine.telemetry().set_audit_log(Some(&audit));
            }
            Ok::<_, String>(Arc::new(engine))
        }
    };
    let engine_off = engine(None).await?;
    let engine_on = engine(Some(&engine_audit)).await?;

    println!(
        "SignData on the disk backend, telemetry off vs on (metrics_listen + audit_log), same keys ({} ms per cell, halves alternated)\n",
        duration.as_millis()
    );
    println!("| key | concurrency | path | telemetry | p50 | p99 | throughput (signs/s) |");
    println!("|---|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    let (mut engine_requests, mut plugin_requests) = (0, 0);
    for key_type in key_types {
        for &c in concurrency {
            let half = duration / 2;
            let [a1, b1, b2, a2] = [
                in_process(&engine_off, key_type, c, half).await?,
                in_process(&engine_on, key_type, c, half).await?,
                in_process(&engine_on, key_type, c, half).await?,
                in_process(&engine_off, key_type, c, half).await?,
            ];
            engine_requests += b1.requests + b2.requests;
            let (in_off, in_on) = (mean(&a1, &a2), mean(&b1, &b2));
            let [a1, b1, b2, a2] = [
                via_plugin(&off, key_type, c, half).await?,
                via_plugin(&on, key_type, c, half).await?,
                via_plugin(&on, key_type, c, half).await?,
                via_plugin(&off, key_type, c, half).await?,
            ];
            plugin_requests += b1.requests + b2.requests;
            let (plug_off, plug_on) = (mean(&a1, &a2), mean(&b1, &b2));
            for (path, telemetry, cell) in [
                ("in-process", "off", &in_off),
                ("in-process", "on", &in_on),
                ("plugin", "off", &plug_off),
                ("plugin", "on", &plug_on),
            ] {
                println!(
                    "| {key_type} | {c} | {path} | {telemetry} | {} | {} | {:.0} |",
                    us(cell.p50),
                    us(cell.p99),
                    cell.throughput
                );
            }
            summary.push(format!(
                "{key_type} c={c}: telemetry adds {} at p50 in process ({:.1}% throughput change), {} through the plugin ({:.1}%)",
                delta_us(in_on.p50, in_off.p50),
                100.0 * (in_on.throughput / in_off.throughput - 1.0),
                delta_us(plug_on.p50, plug_off.p50),
                100.0 * (plug_on.throughput / plug_off.throughput - 1.0),
            ));
        }
    }
    println!();
    for line in summary {
        println!("- {line}");
    }

    // What telemetry recorded must match what was done.
    engine_on.telemetry().close_audit_log();
    let _ = off.shutdown().await;
    let scraped = scrape(address).await?;
    let signs_counted: f64 = scraped
        .lines()
        .filter(|l| l.starts_with("kms_keymanager_sign_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    let failures: f64 = scraped
        .lines()
        .filter(|l| l.starts_with("kms_keymanager_audit_failures_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    let _ = on.shutdown().await;
    let lines = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    println!(
        "\nchecks: plugin (telemetry on) made {plugin_requests} SignData; /metrics counted {signs_counted:.0}; its audit log has {} lines, {failures:.0} lost; in process {engine_requests} SignData, {} audit lines",
        lines(&plugin_audit),
        lines(&engine_audit),
    );
    Ok(())
}

/// `on - off` with a tenth of a microsecond: the in-process difference is that small.
fn delta_us(on: Duration, off: Duration) -> String {
    format!("{:+.1} µs", (on.as_secs_f64() - off.as_secs_f64()) * 1e6)
}

fn mean(a: &Cell, b: &Cell) -> Cell {
    Cell {
        p50: (a.p50 + b.p50) / 2,
        p99: (a.p99 + b.p99) / 2,
        throughput: (a.throughput + b.throughput) / 2.0,
        requests: a.requests + b.requests,
    }
}

async fn in_process(
    engine: &SharedEngine,
    key_type: KeyType,
    concurrency: usize,
    duration: Duration,
) -> Result<Cell, String> {
    let engine = engine.clone();
    measure(concurrency, duration, move |digest| {
        let engine = engine.clone();
        async move {
            let id = KeyId::new(key_type.as_str()).map_err(|e| e.to_string())?;
            engine
                .sign(&id, digest, SignerOpts::Hash(HashAlgorithm::Sha256), None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await
}

async fn via_plugin(
    plugin: &PluginProcess,
    key_type: KeyType,
    concurrency: usize,
    duration: Duration,
) -> Result<Cell, String> {
    let client = plugin.key_manager();
    measure(concurrency, duration, move |digest| {
        let mut client = client.clone();
        async move {
            client
                .sign_data(SignDataRequest {
                    key_id: key_type.as_str().into(),
                    data: digest,
                    signer_opts: Some(WireOpts::HashAlgorithm(
                        keymanager_plugin::wire::hash_algorithm_to_wire(HashAlgorithm::Sha256),
                    )),
                })
                .await
                .map(|_| ())
                .map_err(|s| s.message().to_string())
        }
    })
    .await
}

async fn scrape(address: SocketAddr) -> Result<String, String> {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| format!("scraping {address}: {e}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}
