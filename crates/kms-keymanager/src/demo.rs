//! `kms-keymanager demo`: the quickstart, end to end through the real plugin protocol.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keymanager_backend_disk::SoftwareKey;
use keymanager_engine::KeyType;
use keymanager_host::PluginProcess;
use keymanager_proto::keymanager::{GenerateKeyRequest, GetPublicKeyRequest, PublicKey};

use crate::svid;

/// Options of `demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Keys file for the disk backend (default: a fresh temporary directory, removed after).
    #[arg(long)]
    keys_path: Option<PathBuf>,
    /// Trust domain.
    #[arg(long, default_value = "example.org")]
    trust_domain: String,
    /// Print the plugin's own log lines (JSON, as SPIRE receives them).
    #[arg(long)]
    show_plugin_logs: bool,
}

pub async fn run(args: DemoArgs) -> Result<(), String> {
    let temp =
        tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let keys_path = args
        .keys_path
        .clone()
        .unwrap_or_else(|| temp.path().join("keys.json"));
    let td = args.trust_domain.as_str();
    let spiffe_id = format!("spiffe://{td}/demo");
    let binary = std::env::current_exe().map_err(|e| format!("cannot locate this binary: {e}"))?;

    println!(
        "kms-keymanager demo: the plugin launched as SPIRE launches it, on the disk backend\n"
    );
    let plugin = PluginProcess::launch(&binary)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "  plugin      pid {} socket {}",
        plugin.pid().unwrap_or(0),
        plugin.socket_path().display()
    );
    println!("  handshake   {}", ms(plugin.handshake_latency()));
    let hcl = format!("keys_path = {:?}\n", keys_path.display().to_string());
    let started = Instant::now();
    plugin
        .configure(td, &hcl)
        .await
        .map_err(|s| format!("Configure failed: {}", s.message()))?;
    println!(
        "  configure   {} (keys_path = {})",
        ms(started.elapsed()),
        keys_path.display()
    );

    let result = demo_steps(&plugin, td, &spiffe_id).await;

    if args.show_plugin_logs || result.is_err() {
        println!("\nplugin log (stderr, hclog JSON):");
        for line in plugin.stderr_lines() {
            println!("  {line}");
        }
    }
    let exit = plugin.shutdown().await.map_err(|e| e.to_string())?;
    let outcome = result?;
    println!(
        "\n  shutdown    plugin exited {} in {} ({})",
        if exit.graceful {
            "on its own"
        } else {
            "only when killed"
        },
        ms(exit.exit_latency),
        exit.status.map(|s| s.to_string()).unwrap_or_default()
    );
    println!("\n{outcome}");
    if !exit.graceful {
        return Err("the plugin did not exit within 2 s of Shutdown".into());
    }
    Ok(())
}

async fn demo_steps(plugin: &PluginProcess, td: &str, spiffe_id: &str) -> Result<String, String> {
    let mut km = plugin.key_manager();
    let mut generated = Vec::new();
    for (id, key_type) in [
        ("x509-CA-A", KeyType::EcP256),
        ("JWT-Signer-A", KeyType::EcP256),
    ] {
        let started = Instant::now();
        let key = km
            .generate_key(GenerateKeyRequest {
                key_id: id.into(),
                key_type: keymanager_plugin::wire::key_type_to_wire(key_type),
            })
            .await
            .map_err(|s| format!("GenerateKey({id}) failed: {}", s.message()))?
            .into_inner()
            .public_key
            .ok_or("GenerateKey returned no key")?;
        println!(
            "  GenerateKey {:<13} {} in {}  fingerprint {}",
            id,
            key_type,
            ms(started.elapsed()),
            &key.fingerprint
        );
        generated.push(key);
    }
    let started = Instant::now();
    let ca_public: PublicKey = km
        .get_public_key(GetPublicKeyRequest {
            key_id: "x509-CA-A".into(),
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner()
        .public_key
        .ok_or("GetPublicKey returned no key")?;
    let get_latency = started.elapsed();
    if ca_public != generated[0] {
        return Err("GetPublicKey disagrees with GenerateKey".into());
    }
    let jwt_public = &generated[1];

    let ca_key = svid::RemoteP256Key::new(km.clone(), "x509-CA-A", &ca_public.pkix_data)?;
    let jwt_key = svid::RemoteP256Key::new(km.clone(), "JWT-Signer-A", &jwt_public.pkix_data)?;
    let ca_params = svid::ca_params(td)?;
    let ca_der = svid::self_signed_ca(&ca_params, &ca_key)?;
    let workload = SoftwareKey::generate(KeyType::EcP256).map_err(|e| e.to_string())?;
    let workload_public =
        svid::LocalP256PublicKey::from_spki(&workload.spki_der().map_err(|e| e.to_string())?)?;
    let svid_der = svid::x509_svid(spiffe_id, &workload_public, ca_params, &ca_key)?;
    let jwt = svid::jwt_svid(spiffe_id, "demo", &jwt_public.fingerprint, &jwt_key).await?;

    let verified = svid::verify_x509(&ca_der, &svid_der, &ca_public.pkix_data, spiffe_id)?;
    svid::verify_jwt(&jwt, &jwt_public.pkix_data, spiffe_id)?;

    let mut signs: Vec<Duration> = Vec::new();
    for key in [&ca_key, &jwt_key] {
        signs.extend(
            key.sign_latencies
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default(),
        );
    }
    signs.sort();
    let median = signs.get(signs.len() / 2).copied().unwrap_or_default();
    Ok(format!(
        "Verified with independent libraries (x509-parser + ring, not the signer's):\n  \
         CA certificate   self-signed by x509-CA-A through SignData, key matches GetPublicKey ({} bytes DER)\n  \
         X.509-SVID       {} chains to the CA ({} bytes DER)\n  \
         JWT-SVID         ES256 by JWT-Signer-A, kid {}…, sub {}\n\n\
         Latency: GetPublicKey {}, SignData median {} over {} calls",
        ca_der.len(),
        verified.spiffe_id,
        svid_der.len(),
        &jwt_public.fingerprint[..16],
        spiffe_id,
        us(get_latency),
        us(median),
        signs.len()
    ))
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}
