//! `kms-keymanager bench --handover`: what hand-over mode (`migrate_from`) costs a SignData,
//! in process on disk keys (where a microsecond is visible), in one run: the plain engine,
//! the hand-over serving the key from the old store, and the hand-over serving a key from
//! the target store. Halves alternate (plain, hand-over, hand-over, plain) so that drift of
//! the machine falls on both sides.

use std::sync::Arc;
use std::time::Duration;

use keymanager_backend_disk::DiskBackend;
use keymanager_engine::handover::{HandOver, ReadOnlyEngine};
use keymanager_engine::{
    Engine, EngineOptions, HashAlgorithm, KeyId, KeyService, KeyType, SignerOpts,
};

use crate::bench::{Cell, measure, us};

pub async fn run(concurrency: &[usize], duration: Duration) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let old_path = dir.path().join("old.json");
    let target_path = dir.path().join("target.json");
    let key_types = [KeyType::EcP256, KeyType::Rsa2048];
    let engine = |path: &std::path::Path| {
        let path = path.to_path_buf();
        async move {
            Engine::start(
                Arc::new(DiskBackend::new(path)),
                None,
                EngineOptions::default(),
            )
            .await
            .map_err(|e| e.to_string())
        }
    };
    let key = |key_type: KeyType, store: &str| {
        KeyId::new(&format!("{store}-{}", key_type.as_str())).map_err(|e| e.to_string())
    };
    // The old store holds the "old-…" keys, the target the "target-…" keys.
    let setup = engine(&old_path).await?;
    for key_type in key_types {
        setup
            .generate_key(key(key_type, "old")?, key_type)
            .await
            .map_err(|e| e.to_string())?;
    }
    drop(setup);
    let target = engine(&target_path).await?;
    for key_type in key_types {
        target
            .generate_key(key(key_type, "target")?, key_type)
            .await
            .map_err(|e| e.to_string())?;
    }
    let target: Arc<dyn KeyService> = Arc::new(target);
    let old = ReadOnlyEngine::start(
        Arc::new(DiskBackend::new(old_path.clone())),
        EngineOptions::default(),
        target.telemetry().clone(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let handover: Arc<dyn KeyService> = Arc::new(HandOver::new(
        target,
        Arc::new(old),
        "bench old store".into(),
    ));
    let plain: Arc<dyn KeyService> = Arc::new(engine(&old_path).await?);

    println!(
        "SignData on disk keys in process: plain engine vs hand-over mode ({} ms per cell, halves alternated)\n",
        duration.as_millis()
    );
    println!("| key | concurrency | mode | p50 | p99 | throughput (signs/s) |");
    println!("|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for key_type in key_types {
        for &c in concurrency {
            let half = duration / 2;
            let old_id = key(key_type, "old")?;
            let target_id = key(key_type, "target")?;
            let [a1, b1, t1, t2, b2, a2] = [
                signing(&plain, &old_id, c, half).await?,
                signing(&handover, &old_id, c, half).await?,
                signing(&handover, &target_id, c, half).await?,
                signing(&handover, &target_id, c, half).await?,
                signing(&handover, &old_id, c, half).await?,
                signing(&plain, &old_id, c, half).await?,
            ];
            let (plain_cell, old_cell, target_cell) =
                (mean(&a1, &a2), mean(&b1, &b2), mean(&t1, &t2));
            for (mode, cell) in [
                ("plain", &plain_cell),
                ("hand-over, key in the old store", &old_cell),
                ("hand-over, key in the target store", &target_cell),
            ] {
                println!(
                    "| {key_type} | {c} | {mode} | {} | {} | {:.0} |",
                    us(cell.p50),
                    us(cell.p99),
                    cell.throughput
                );
            }
            summary.push(format!(
                "{key_type} c={c}: hand-over adds {} at p50 for a key in the old store ({:+.1}% throughput), {} for a key in the target ({:+.1}%)",
                delta_us(old_cell.p50, plain_cell.p50),
                100.0 * (old_cell.throughput / plain_cell.throughput - 1.0),
                delta_us(target_cell.p50, plain_cell.p50),
                100.0 * (target_cell.throughput / plain_cell.throughput - 1.0),
            ));
        }
    }
    println!();
    for line in summary {
        println!("- {line}");
    }
    Ok(())
}

fn delta_us(a: Duration, b: Duration) -> String {
    format!("{:+.1} µs", (a.as_secs_f64() - b.as_secs_f64()) * 1e6)
}

fn mean(a: &Cell, b: &Cell) -> Cell {
    Cell {
        p50: (a.p50 + b.p50) / 2,
        p99: (a.p99 + b.p99) / 2,
        throughput: (a.throughput + b.throughput) / 2.0,
        requests: a.requests + b.requests,
    }
}

async fn signing(
    service: &Arc<dyn KeyService>,
    id: &KeyId,
    concurrency: usize,
    duration: Duration,
) -> Result<Cell, String> {
    let service = service.clone();
    let id = id.clone();
    measure(concurrency, duration, move |digest| {
        let service = service.clone();
        let id = id.clone();
        async move {
            service
                .sign(&id, digest, SignerOpts::Hash(HashAlgorithm::Sha256), None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await
}
