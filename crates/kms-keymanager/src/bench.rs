//! `kms-keymanager bench`: SignData through the plugin socket versus in-process signing with
//! the same key, side by side in one run.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keymanager_backend_disk::DiskBackend;
use keymanager_engine::{Engine, EngineOptions, HashAlgorithm, KeyId, KeyType, SignerOpts};
use keymanager_host::PluginProcess;
use keymanager_proto::keymanager::sign_data_request::SignerOpts as WireOpts;
use keymanager_proto::keymanager::{GenerateKeyRequest, SignDataRequest};

use crate::demo::ms;

/// Options of `bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Measuring time per (key type, path, concurrency) cell, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16])]
    concurrency: Vec<usize>,
    /// Launches used to measure the time from process start to the handshake line.
    #[arg(long, default_value_t = 10)]
    startup_runs: usize,
    /// Instead: SignData with telemetry (`metrics_listen` and `audit_log`) off and on, in
    /// process and through the plugin socket, in one run.
    #[arg(long, conflicts_with = "handover")]
    telemetry: bool,
    /// Instead: SignData in process, plain engine vs hand-over mode (`migrate_from`), with a
    /// key in the old store and a key in the target store, in one run.
    #[arg(long)]
    handover: bool,
}

pub(crate) struct Cell {
    pub p50: Duration,
    pub p99: Duration,
    pub throughput: f64,
    /// Requests made, warm-up included.
    pub requests: usize,
}

pub async fn run(args: BenchArgs) -> Result<(), String> {
    if args.telemetry {
        return crate::bench_telemetry::run(
            &args.concurrency,
            Duration::from_millis(args.duration_ms),
        )
        .await;
    }
    if args.handover {
        return crate::bench_handover::run(
            &args.concurrency,
            Duration::from_millis(args.duration_ms),
        )
        .await;
    }
    let binary = std::env::current_exe().map_err(|e| format!("cannot locate this binary: {e}"))?;
    let duration = Duration::from_millis(args.duration_ms);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let keys_path = dir.path().join("keys.json");

    let plugin = launch_configured(&binary, &keys_path).await?;
    let key_types = [KeyType::EcP256, KeyType::Rsa2048];
    for key_type in key_types {
        plugin
            .key_manager()
            .generate_key(GenerateKeyRequest {
                key_id: key_type.as_str().into(),
                key_type: keymanager_plugin::wire::key_type_to_wire(key_type),
            })
            .await
            .map_err(|s| s.message().to_string())?;
    }
    // The same keys, loaded in this process from the plugin's keys file.
    let engine = Arc::new(
        Engine::start(
            Arc::new(DiskBackend::new(keys_path.clone())),
            None,
            EngineOptions::default(),
        )
        .await
        .map_err(|e| e.to_string())?,
    );

    println!(
        "SignData on the disk backend: plugin socket vs in-process, same key ({} ms per cell)\n",
        args.duration_ms
    );
    println!("| key | concurrency | path | p50 | p99 | throughput (signs/s) |");
    println!("|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for key_type in key_types {
        for &concurrency in &args.concurrency {
            let in_process = measure(concurrency, duration, {
                let engine = engine.clone();
                move |digest| {
                    let engine = engine.clone();
                    async move {
                        let id = KeyId::new(key_type.as_str()).map_err(|e| e.to_string())?;
                        engine
                            .sign(&id, digest, SignerOpts::Hash(HashAlgorithm::Sha256), None)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    }
                }
            })
            .await?;
            let via_plugin = measure(concurrency, duration, {
                let client = plugin.key_manager();
                move |digest| {
                    let mut client = client.clone();
                    async move {
                        client
                            .sign_data(SignDataRequest {
                                key_id: key_type.as_str().into(),
                                data: digest,
                                signer_opts: Some(WireOpts::HashAlgorithm(
                                    keymanager_plugin::wire::hash_algorithm_to_wire(
                                        HashAlgorithm::Sha256,
                                    ),
                                )),
                            })
                            .await
                            .map(|_| ())
                            .map_err(|s| s.message().to_string())
                    }
                }
            })
            .await?;
            for (path, cell) in [("in-process", &in_process), ("plugin", &via_plugin)] {
                println!(
                    "| {key_type} | {concurrency} | {path} | {} | {} | {:.0} |",
                    us(cell.p50),
                    us(cell.p99),
                    cell.throughput
                );
            }
            summary.push(format!(
                "{key_type} c={concurrency}: plugin adds {} at p50; plugin reaches {:.0}% of in-process throughput",
                signed_us(via_plugin.p50.as_secs_f64() - in_process.p50.as_secs_f64()),
                100.0 * via_plugin.throughput / in_process.throughput
            ));
        }
    }
    // An RPC without crypto: the protocol round trip on its own.
    let rpc_only = measure(1, duration, {
        let client = plugin.key_manager();
        move |_digest| {
            let mut client = client.clone();
            async move {
                client
                    .get_public_key(keymanager_proto::keymanager::GetPublicKeyRequest {
                        key_id: "ec-p256".into(),
                    })
                    .await
                    .map(|_| ())
                    .map_err(|s| s.message().to_string())
            }
        }
    })
    .await?;
    println!(
        "| ec-p256 | 1 | plugin GetPublicKey (no signing) | {} | {} | {:.0} |",
        us(rpc_only.p50),
        us(rpc_only.p99),
        rpc_only.throughput
    );
    println!();
    for line in summary {
        println!("- {line}");
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = plugin.pid().and_then(rss_kib);
    let exit = plugin.shutdown().await.map_err(|e| e.to_string())?;
    println!(
        "\nplugin idle RSS after generating 2 keys and the runs above: {}",
        rss.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_else(|| "unknown".into())
    );
    let fresh_rss = idle_rss_fresh(&binary, &keys_path).await?;
    println!(
        "plugin idle RSS, freshly configured with those 2 keys: {}",
        fresh_rss
            .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_else(|| "unknown".into())
    );
    let mut startups = Vec::new();
    for _ in 0..args.startup_runs {
        let p = PluginProcess::launch(&binary)
            .await
            .map_err(|e| e.to_string())?;
        startups.push(p.handshake_latency());
        let _ = p.shutdown().await;
    }
    startups.sort();
    println!(
        "process start → handshake line: median {}, max {} over {} launches",
        ms(startups[startups.len() / 2]),
        ms(*startups.last().unwrap_or(&Duration::ZERO)),
        startups.len()
    );
    println!(
        "Shutdown → process exit: {} (graceful: {})",
        ms(exit.exit_latency),
        exit.graceful
    );
    Ok(())
}

/// Runs `concurrency` workers signing random SHA-256 digests for `duration`.
pub(crate) async fn measure<F, Fut>(
    concurrency: usize,
    duration: Duration,
    sign: F,
) -> Result<Cell, String>
where
    F: Fn(Vec<u8>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    // Warm-up.
    for i in 0..20u8 {
        sign(vec![i; 32]).await?;
    }
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let sign = sign.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n: u64 = 0;
            while started.elapsed() < duration {
                let mut digest = [0u8; 32];
                digest[..8].copy_from_slice(&n.to_le_bytes());
                digest[8] = worker as u8;
                n += 1;
                let t = Instant::now();
                sign(digest.to_vec()).await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, String>(latencies)
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.map_err(|e| e.to_string())??);
    }
    let elapsed = started.elapsed();
    let requests = all.len() + 20;
    all.sort();
    let pick = |q: f64| {
        all.get(((all.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    Ok(Cell {
        p50: pick(0.50),
        p99: pick(0.99),
        throughput: all.len() as f64 / elapsed.as_secs_f64(),
        requests,
    })
}

/// A plugin launched as SPIRE launches it, configured on the disk backend at `keys_path`.
pub(crate) async fn launch_configured(
    binary: &Path,
    keys_path: &Path,
) -> Result<PluginProcess, String> {
    let plugin = PluginProcess::launch(binary)
        .await
        .map_err(|e| e.to_string())?;
    plugin
        .configure(
            "example.org",
            &format!("keys_path = {:?}\n", keys_path.display().to_string()),
        )
        .await
        .map_err(|s| s.message().to_string())?;
    Ok(plugin)
}

async fn idle_rss_fresh(binary: &Path, keys_path: &Path) -> Result<Option<u64>, String> {
    let plugin = launch_configured(binary, keys_path).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = plugin.pid().and_then(rss_kib);
    let _ = plugin.shutdown().await;
    Ok(rss)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub(crate) fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn signed_us(seconds: f64) -> String {
    format!("{:+.0} µs", seconds * 1e6)
}
