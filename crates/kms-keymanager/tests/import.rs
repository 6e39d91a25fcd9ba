//! `keys import` and `keys migrate` run as the real binary: keys made by the plugin on
//! `disk` moved into LocalStack's KMS (which really unwraps imported key material), then
//! served by the plugin on `aws_kms` with the same fingerprints, signatures checked with an
//! independent library against the disk key's public key. Refusals, idempotence, and a
//! store call failing at every step of a migration followed by a re-run.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use keymanager_backend_aws::AwsKmsFactory;
use keymanager_backend_disk::DiskFactory;
use keymanager_backend_gcp::GcpKmsFactory;
use keymanager_conformance::peers::{self, Peer};
use keymanager_conformance::proxy::{Fault, FaultProxy, Plan};
use keymanager_conformance::verify;
use keymanager_engine::{
    BackendFactory, CoreConfig, HashAlgorithm, KeyId, KeyService, KeyType, SignatureScheme,
    SignerOpts,
};
use keymanager_plugin::PluginState;
use keymanager_plugin::logging::LogControl;
use serde_json::Value;

static AWS: AwsKmsFactory = AwsKmsFactory::new();
static GCP: GcpKmsFactory = GcpKmsFactory::new();
static BACKENDS: &[&dyn BackendFactory] = &[&DiskFactory, &AWS, &GCP];

fn localstack() -> &'static Peer {
    static PEER: OnceLock<Peer> = OnceLock::new();
    PEER.get_or_init(peers::localstack)
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

fn run(args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_kms-keymanager"))
        .args(args)
        .output()
        .expect("run kms-keymanager");
    keymanager_conformance::logs::keep_cli_log(args, &output);
    let run = Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert!(
        !run.stderr.contains("secret-never-logged") && !run.stdout.contains("secret-never-logged"),
        "a secret was printed: {}{}",
        run.stdout,
        run.stderr
    );
    assert!(
        !run.stderr.contains("PRIVATE KEY") && !run.stdout.contains("PRIVATE KEY"),
        "key material was printed"
    );
    run
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn aws_data(endpoint: &str, server_id: &str) -> String {
    format!(
        "backend = \"aws_kms\"\nregion = \"us-east-1\"\nendpoint = {endpoint:?}\naccess_key_id = \"PLANTED-SECRET-aws-access-key-id\"\nsecret_access_key = \"PLANTED-SECRET-secret-never-logged\"\nkey_identifier_value = {server_id:?}\n"
    )
}

fn disk_data(keys: &Path) -> String {
    format!("keys_path = {:?}\n", keys.display().to_string())
}

async fn server(td: &str, plugin_data: &str) -> (PluginState, Arc<dyn KeyService>) {
    let state = PluginState::new(BACKENDS, LogControl::detached());
    state
        .configure(
            Some(CoreConfig {
                trust_domain: td.into(),
            }),
            plugin_data,
        )
        .await
        .expect("configure");
    let service = state.service().expect("service");
    (state, service)
}

fn id(s: &str) -> KeyId {
    KeyId::new(s).unwrap()
}

/// SPIRE's four keys (two CAs, two JWT signers) on disk; their fingerprints by id.
async fn disk_server_keys(td: &str, keys: &Path) -> BTreeMap<String, (KeyType, Arc<[u8]>)> {
    let (_state, disk) = server(td, &disk_data(keys)).await;
    for (key_id, key_type) in [
        ("x509-CA-A", KeyType::EcP256),
        ("x509-CA-B", KeyType::Rsa2048),
        ("JWT-Signer-A", KeyType::EcP384),
        ("JWT-Signer-B", KeyType::EcP256),
    ] {
        disk.generate_key(id(key_id), key_type).await.unwrap();
    }
    disk.public_keys()
        .into_iter()
        .map(|k| (k.id.as_str().to_string(), (k.key_type, k.spki_der)))
        .collect()
}

fn fingerprint(spki: &[u8]) -> String {
    keymanager_engine::Fingerprint::of_spki(spki).to_string()
}

/// Every key the target serves signs, and the signature verifies (ring / RustCrypto)
/// against the public key the disk key had.
async fn assert_target_serves(
    target: &Arc<dyn KeyService>,
    expected: &BTreeMap<String, (KeyType, Arc<[u8]>)>,
) {
    let served: BTreeMap<String, String> = target
        .public_keys()
        .iter()
        .map(|k| (k.id.as_str().to_string(), k.fingerprint.to_string()))
        .collect();
    let wanted: BTreeMap<String, String> = expected
        .iter()
        .map(|(k, (_, spki))| (k.clone(), fingerprint(spki)))
        .collect();
    assert_eq!(
        served, wanted,
        "the target serves the disk keys' fingerprints"
    );
    for (key_id, (key_type, spki)) in expected {
        let hash = if *key_type == KeyType::EcP384 {
            HashAlgorithm::Sha384
        } else {
            HashAlgorithm::Sha256
        };
        let message = format!("signed by {key_id} after the migration");
        let digest = verify::digest(hash, message.as_bytes());
        let signature = target
            .sign(&id(key_id), digest, SignerOpts::Hash(hash), None)
            .await
            .unwrap();
        let scheme = if key_type.is_rsa() {
            SignatureScheme::RsaPkcs1v15(hash)
        } else {
            SignatureScheme::Ecdsa(hash)
        };
        verify::verify(
            spki,
            *key_type,
            scheme,
            message.as_bytes(),
            &signature.bytes,
        )
        .unwrap_or_else(|e| panic!("{key_id}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_to_aws_kms_migration_keeps_every_public_key_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let td = format!("migrate-{}.test", std::process::id());
    let keys = dir.path().join("keys.json");
    let expected = disk_server_keys(&td, &keys).await;
    let from = write(dir.path(), "from.hcl", &disk_data(&keys));
    let to = write(
        dir.path(),
        "to.hcl",
        &aws_data(&localstack().url, "server-a"),
    );
    let args = |extra: &[&'static str]| {
        let mut v: Vec<String> = [
            "keys",
            "migrate",
            "--from-plugin-data",
            &from,
            "--to-plugin-data",
            &to,
            "--trust-domain",
            &td,
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let call = |extra: &[&'static str]| {
        let v = args(extra);
        run(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // --dry-run: the plan, nothing changed.
    let plan = call(&["--dry-run"]);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    let plan = plan.json();
    assert_eq!(plan["keys"].as_array().unwrap().len(), 4);
    assert!(
        plan["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["step"] == "import")
    );
    {
        let (_s, target) = server(&td, &aws_data(&localstack().url, "server-a")).await;
        assert!(target.public_keys().is_empty(), "a dry run changes nothing");
    }

    let done = call(&[]);
    assert_eq!(done.code, 0, "{}", done.stderr);
    let json = done.json();
    assert_eq!(json["imported"].as_array().unwrap().len(), 4, "{json:#}");
    assert!(done.stderr.contains("shred -u"), "{}", done.stderr);
    for item in json["imported"].as_array().unwrap() {
        assert!(
            item["locator"]
                .as_str()
                .unwrap()
                .starts_with("arn:aws:kms:")
        );
    }

    // The plugin on aws_kms serves exactly the disk keys, and they sign.
    let (_s, target) = server(&td, &aws_data(&localstack().url, "server-a")).await;
    assert_target_serves(&target, &expected).await;

    // Again: nothing to do, nothing imported twice.
    let again = call(&[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    let json = again.json();
    assert_eq!(json["imported"].as_array().unwrap().len(), 0);
    assert_eq!(json["skipped"], 4);
    // A KMS source is refused, pointing to the hand-over mode.
    let refused = run(&[
        "keys",
        "migrate",
        "--from-plugin-data",
        &to,
        "--to-plugin-data",
        &from,
        "--trust-domain",
        &td,
    ]);
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.contains("cannot leave it") && refused.stderr.contains("migrate_from"),
        "{}",
        refused.stderr
    );
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../keymanager-engine/src/core/private_key/testdata")
        .join(name)
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_import_into_aws_kms_every_format_and_every_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let td = format!("import-{}.test", std::process::id());
    let proxy = FaultProxy::start(&localstack().url).await;
    let data = write(dir.path(), "aws.hcl", &aws_data(proxy.url(), "server-i"));
    let import = |key_id: &str, file: &Path, extra: &[&str]| {
        let file = file.display().to_string();
        let mut v = vec![
            "keys",
            "import",
            "--key-id",
            key_id,
            "--key",
            &file,
            "--plugin-data",
            &data,
            "--trust-domain",
            &td,
            "--json",
        ];
        v.extend_from_slice(extra);
        run(&v)
    };
    let spki = |name: &str| std::fs::read(fixture(name)).unwrap();

    // RSA (PKCS#1 PEM: RSA_AES_KEY_WRAP_SHA_256) and EC (SEC1 DER: RSAES_OAEP_SHA_256).
    let rsa = import("x509-CA-A", &fixture("rsa2048.pkcs1.pem"), &[]);
    assert_eq!(rsa.code, 0, "{}", rsa.stderr);
    assert_eq!(
        rsa.json()["fingerprint"],
        fingerprint(&spki("rsa2048.spki.der"))
    );
    assert_eq!(rsa.json()["outcome"], "imported");
    let rsa_locator = rsa.json()["locator"].as_str().unwrap().to_string();
    assert!(rsa.stderr.contains("shred -u"), "{}", rsa.stderr);
    let start = proxy.count();
    let ec = import(
        "JWT-Signer-A",
        &fixture("p384.sec1.der"),
        &[
            "--expect-fingerprint",
            &fingerprint(&spki("p384.spki.der")).to_uppercase(),
        ],
    );
    assert_eq!(ec.code, 0, "{}", ec.stderr);
    let calls: Vec<String> = proxy.since(start).iter().map(|r| r.name()).collect();
    for op in [
        "CreateKey",
        "GetParametersForImport",
        "ImportKeyMaterial",
        "GetPublicKey",
    ] {
        assert!(calls.iter().any(|c| c == op), "{op} missing from {calls:?}");
    }
    assert!(
        proxy
            .since(start)
            .iter()
            .any(|r| r.name() == "CreateKey" && r.body.contains("EXTERNAL")),
        "CreateKey with Origin=EXTERNAL"
    );
    assert!(
        proxy
            .since(start)
            .iter()
            .any(|r| r.name() == "GetParametersForImport" && r.body.contains("RSAES_OAEP_SHA_256")),
        "an EC key is OAEP-wrapped directly"
    );

    // The plugin serves both and they sign.
    let (_s, target) = server(&td, &aws_data(&localstack().url, "server-i")).await;
    let expected: BTreeMap<String, (KeyType, Arc<[u8]>)> = [
        (
            "x509-CA-A".to_string(),
            (KeyType::Rsa2048, Arc::from(spki("rsa2048.spki.der"))),
        ),
        (
            "JWT-Signer-A".to_string(),
            (KeyType::EcP384, Arc::from(spki("p384.spki.der"))),
        ),
    ]
    .into();
    assert_target_serves(&target, &expected).await;

    // Refusals. A fingerprint mismatch: before any store call.
    let start = proxy.count();
    let wrong = import(
        "x509-CA-B",
        &fixture("p256.pkcs8.pem"),
        &["--expect-fingerprint", &"ab".repeat(32)],
    );
    assert_eq!(wrong.code, 1);
    assert!(
        wrong.stderr.contains("not the expected"),
        "{}",
        wrong.stderr
    );
    assert_eq!(
        proxy.count(),
        start,
        "no store call for a fingerprint mismatch"
    );
    // A key type SPIRE cannot use.
    let rsa3072 = import("x509-CA-B", &fixture("rsa3072.pkcs8.pem"), &[]);
    assert_eq!(rsa3072.code, 2);
    assert!(rsa3072.stderr.contains("RSA-3072"), "{}", rsa3072.stderr);
    assert_eq!(proxy.count(), start);
    // An id with a live key, without --replace.
    let live = import("x509-CA-A", &fixture("p256.pkcs8.pem"), &[]);
    assert_eq!(live.code, 1);
    assert!(live.stderr.contains("--replace"), "{}", live.stderr);
    // The same key again: nothing to do.
    let same = import("x509-CA-A", &fixture("rsa2048.pkcs8.der"), &[]);
    assert_eq!(same.code, 0, "{}", same.stderr);
    assert_eq!(same.json()["outcome"], "already_served");
    // --server-id guard.
    let other = import(
        "x509-CA-B",
        &fixture("p256.pkcs8.pem"),
        &["--server-id", "someone-else"],
    );
    assert_eq!(other.code, 2);
    // --replace: the old key is retired through the engine (scheduled for deletion).
    let replaced = import("x509-CA-A", &fixture("p256.pkcs8.pem"), &["--replace"]);
    assert_eq!(replaced.code, 0, "{}", replaced.stderr);
    let json = replaced.json();
    assert_eq!(json["outcome"], "replaced");
    assert_eq!(
        json["replaced_fingerprint"],
        fingerprint(&spki("rsa2048.spki.der"))
    );
    assert_eq!(json["fingerprint"], fingerprint(&spki("p256.spki.der")));
    // The replaced key was retired through the engine: KMS deletion scheduled on its ARN.
    assert!(
        proxy
            .since(start)
            .iter()
            .any(|r| r.name() == "ScheduleKeyDeletion" && r.body.contains(rsa_locator.as_str())),
        "the replaced key is scheduled for deletion"
    );
}

/// A store call fails at each step of a migration in turn (without effect, or with its
/// response lost after it took effect); a plain re-run then completes, with one served key
/// per id and the disk keys' fingerprints (leftovers are inactive: never served).
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_failing_at_any_store_call_completes_on_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let td = format!("migrate-crash-{}.test", std::process::id());
    let keys = dir.path().join("keys.json");
    let (_state, disk) = server(&td, &disk_data(&keys)).await;
    disk.generate_key(id("x509-CA-A"), KeyType::EcP256)
        .await
        .unwrap();
    disk.generate_key(id("JWT-Signer-A"), KeyType::Rsa2048)
        .await
        .unwrap();
    let expected: BTreeMap<String, (KeyType, Arc<[u8]>)> = disk
        .public_keys()
        .into_iter()
        .map(|k| (k.id.as_str().to_string(), (k.key_type, k.spki_der)))
        .collect();
    let proxy = FaultProxy::start(&localstack().url).await;
    let from = write(dir.path(), "from.hcl", &disk_data(&keys));
    let mut step: usize = 1;
    let mut interrupted = 0;
    loop {
        // A fresh server id per attempt: each starts from an empty target.
        let server_id = format!("crash-{step}");
        let to = write(
            dir.path(),
            &format!("to-{step}.hcl"),
            &aws_data(proxy.url(), &server_id),
        );
        let migrate = || {
            run(&[
                "keys",
                "migrate",
                "--from-plugin-data",
                &from,
                "--to-plugin-data",
                &to,
                "--trust-domain",
                &td,
                "--json",
            ])
        };
        let fault = if step.is_multiple_of(2) {
            Fault::Lose
        } else {
            Fault::Fail
        };
        let n = step.div_ceil(2);
        let start = proxy.count();
        proxy.plan(Plan::Once(n, fault));
        let first = migrate();
        let calls = proxy.count() - start;
        proxy.clear();
        if first.code != 0 {
            interrupted += 1;
        }
        let rerun = migrate();
        assert_eq!(rerun.code, 0, "step {n} ({fault:?}): {}", rerun.stderr);
        let (_s, target) = server(&td, &aws_data(&localstack().url, &server_id)).await;
        assert_target_serves(&target, &expected).await;
        // Stop once the fault lands past the last call of a clean run.
        if first.code == 0 && n > calls {
            break;
        }
        step += 1;
        assert!(step < 200, "the migration never finished cleanly");
    }
    println!("{step} runs, {interrupted} interrupted by the fault");
    assert!(interrupted > 0, "no fault ever made a migration fail");
}

/// One control request with a JSON body to the Cloud KMS fake (plain HTTP/1.0).
async fn control(fake: &Peer, method: &str, path: &str, body: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = fake.url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(url).await.unwrap();
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.0\r\nHost: fake\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap_or_default())
        .unwrap_or(Value::Null)
}

fn gcp_data(endpoint: &str, ring: &str, service_account: &Path, server_id: &str) -> String {
    format!(
        "backend = \"gcp_kms\"\nkey_ring = {ring:?}\nendpoint = {endpoint:?}\nservice_account_file = {:?}\nkey_identifier_value = {server_id:?}\n",
        service_account.display().to_string()
    )
}

fn migrate_args<'a>(from: &'a str, to: &'a str, td: &'a str) -> Vec<&'a str> {
    vec![
        "keys",
        "migrate",
        "--from-plugin-data",
        from,
        "--to-plugin-data",
        to,
        "--trust-domain",
        td,
        "--json",
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_to_gcp_kms_migration_keeps_every_public_key_and_is_idempotent() {
    let fake = peers::gcp_fake();
    let dir = tempfile::tempdir().unwrap();
    let ring = "projects/import/locations/global/keyRings/spire";
    let sa = dir.path().join("sa.json");
    peers::gcp_service_account(
        &fake.url,
        "importer@import.iam.gserviceaccount.com",
        &sa,
        Some(ring),
    );
    let td = format!("migrate-gcp-{}.test", std::process::id());
    let keys = dir.path().join("keys.json");
    let expected = disk_server_keys(&td, &keys).await;
    let from = write(dir.path(), "from.hcl", &disk_data(&keys));
    let target = gcp_data(&fake.url, ring, &sa, "server-g");
    let to = write(dir.path(), "to.hcl", &target);

    let done = run(&migrate_args(&from, &to, &td));
    assert_eq!(done.code, 0, "{}", done.stderr);
    let json = done.json();
    assert_eq!(json["imported"].as_array().unwrap().len(), 4, "{json:#}");
    let calls = control(&fake, "GET", "/_fake/calls", "").await;
    assert!(
        calls["cryptoKeyVersions.import"].as_u64().unwrap_or(0) >= 4,
        "{calls}"
    );
    assert!(
        calls["importJobs.create"].as_u64().unwrap_or(0) >= 1,
        "{calls}"
    );

    let (_s, served) = server(&td, &target).await;
    assert_target_serves(&served, &expected).await;

    let again = run(&migrate_args(&from, &to, &td));
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.json()["skipped"], 4);
    assert_eq!(again.json()["imported"].as_array().unwrap().len(), 0);

    // keys import --replace on Cloud KMS: a new version of the same CryptoKey.
    let p256 = fixture("p256.pkcs8.pem").display().to_string();
    let replaced = run(&[
        "keys",
        "import",
        "--key-id",
        "x509-CA-A",
        "--key",
        &p256,
        "--replace",
        "--json",
        "--plugin-data",
        &to,
        "--trust-domain",
        &td,
    ]);
    assert_eq!(replaced.code, 0, "{}", replaced.stderr);
    let json = replaced.json();
    assert_eq!(json["outcome"], "replaced");
    assert!(
        json["locator"]
            .as_str()
            .unwrap()
            .ends_with("/cryptoKeyVersions/2"),
        "{json}"
    );
    let (_s, served) = server(&td, &target).await;
    assert_eq!(
        served
            .public_key(&id("x509-CA-A"))
            .unwrap()
            .fingerprint
            .to_string(),
        fingerprint(&std::fs::read(fixture("p256.spki.der")).unwrap())
    );
}

/// Calls and wall time of a 4-key migration and of one import with 25 ms per Cloud KMS call
/// (the fake's latency control); `cargo test -p kms-keymanager --test import -- --ignored
/// --nocapture bench_`. Figures go to docs/benchmarks.md.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run by hand"]
async fn bench_migration_and_import_with_25ms_per_call() {
    let fake = peers::gcp_fake();
    let dir = tempfile::tempdir().unwrap();
    let ring = "projects/bench/locations/global/keyRings/spire";
    let sa = dir.path().join("sa.json");
    peers::gcp_service_account(
        &fake.url,
        "bench@bench.iam.gserviceaccount.com",
        &sa,
        Some(ring),
    );
    let td = "bench.test";
    let keys = dir.path().join("keys.json");
    let _expected = disk_server_keys(td, &keys).await;
    let from = write(dir.path(), "from.hcl", &disk_data(&keys));
    control(&fake, "POST", "/_fake/latency", "{\"seconds\": 0.025}").await;
    let mut report = Vec::new();
    for (what, server_id) in [
        ("migrate 4 keys (first ImportJob created)", "bench-a"),
        ("migrate 4 keys (ImportJob reused)", "bench-b"),
    ] {
        let to = write(
            dir.path(),
            &format!("{server_id}.hcl"),
            &gcp_data(&fake.url, ring, &sa, server_id),
        );
        control(&fake, "POST", "/_fake/calls/reset", "").await;
        let started = std::time::Instant::now();
        let done = run(&migrate_args(&from, &to, td));
        let wall = started.elapsed();
        assert_eq!(done.code, 0, "{}", done.stderr);
        let calls = control(&fake, "GET", "/_fake/calls", "").await;
        let total: u64 = calls
            .as_object()
            .unwrap()
            .values()
            .filter_map(Value::as_u64)
            .sum();
        report.push(format!(
            "{what}: {total} calls, {} ms wall: {calls}",
            wall.as_millis()
        ));
    }
    let to = write(
        dir.path(),
        "one.hcl",
        &gcp_data(&fake.url, ring, &sa, "bench-one"),
    );
    let p256 = fixture("p256.pkcs8.pem").display().to_string();
    control(&fake, "POST", "/_fake/calls/reset", "").await;
    let started = std::time::Instant::now();
    let one = run(&[
        "keys",
        "import",
        "--key-id",
        "x509-CA-A",
        "--key",
        &p256,
        "--plugin-data",
        &to,
        "--trust-domain",
        td,
    ]);
    let wall = started.elapsed();
    assert_eq!(one.code, 0, "{}", one.stderr);
    let calls = control(&fake, "GET", "/_fake/calls", "").await;
    let total: u64 = calls
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_u64)
        .sum();
    report.push(format!(
        "import 1 key: {total} calls, {} ms wall: {calls}",
        wall.as_millis()
    ));
    control(&fake, "POST", "/_fake/latency", "{\"seconds\": 0}").await;
    for line in report {
        println!("BENCH {line}");
    }
}
