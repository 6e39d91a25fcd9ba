//! The operator CLI (`keys …`, `doctor`) run as the real binary against keys the plugin made:
//! on moto (aws_kms), the Cloud KMS fake (gcp_kms) and a keys file (disk). What a user
//! checks: the listed fingerprints are the plugin's, prune decides as the plugin's own sweep,
//! keys in use are refused, and doctor names a missing permission.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use keymanager_conformance::peers::{self, Peer};
use keymanager_conformance::proxy::FaultProxy;
use keymanager_engine::KeyType;
use keymanager_engine::lifecycle::{SweepDecision, SweepPolicy};
use serde_json::Value;

mod common;
use common::{Run, id, run_on, server};

fn moto() -> &'static Peer {
    static PEER: OnceLock<Peer> = OnceLock::new();
    PEER.get_or_init(peers::moto)
}

/// Runs the CLI on `plugin_data` (written to a file in `dir`) for trust domain `td`.
fn cli(dir: &Path, plugin_data: &str, td: &str, args: &[&str]) -> Run {
    let file = dir.join(format!("plugin-data-{}.hcl", rand_suffix()));
    std::fs::write(&file, plugin_data).expect("write plugin data");
    run_on(&file, td, args)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

fn fingerprints(keys: &Value) -> BTreeSet<(String, String)> {
    keys.as_array()
        .expect("keys array")
        .iter()
        .map(|k| {
            (
                k["key_id"].as_str().unwrap_or_default().to_string(),
                k["fingerprint"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn aws_data(endpoint: &str, server_id: &str, extra: &str) -> String {
    format!(
        "backend = \"aws_kms\"\nregion = \"us-east-1\"\nendpoint = {endpoint:?}\naccess_key_id = \"PLANTED-SECRET-aws-access-key-id\"\nsecret_access_key = \"PLANTED-SECRET-secret-never-logged\"\nkey_identifier_value = {server_id:?}\n{extra}"
    )
}

/// Thresholds for the CLI's view: anything unstamped for 2 s (+1 s skew) is stale.
const SHORT: &str =
    "stale_key_age = \"2s\"\nliveness_interval = \"1s\"\nclock_skew_allowance = \"1s\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn aws_alias_discovery_keys_list_prune_change_and_doctor_agree_with_the_plugin() {
    aws_scenario("alias", "").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_tag_discovery_keys_list_prune_change_and_doctor_agree_with_the_plugin() {
    aws_scenario("tags", "enable_tag_based_key_discovery = true\n").await;
}

async fn aws_scenario(mode: &str, discovery: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let td = format!("operator-{mode}-{}.test", std::process::id());
    let endpoint = &moto().url;
    let (_a_state, a) = server(&td, &aws_data(endpoint, "server-a", discovery)).await;
    a.generate_key(id("x509-CA-A"), KeyType::EcP256)
        .await
        .expect("generate");
    a.generate_key(id("x509-CA-A"), KeyType::EcP256)
        .await
        .expect("rotate");
    a.generate_key(id("JWT-Signer-A"), KeyType::EcP384)
        .await
        .expect("generate");
    {
        let (_b_state, b) = server(&td, &aws_data(endpoint, "server-b", discovery)).await;
        b.generate_key(id("x509-CA-A"), KeyType::EcP256)
            .await
            .expect("generate on b");
    }
    let served: BTreeSet<(String, String)> = a
        .public_keys()
        .iter()
        .map(|k| (k.id.as_str().to_string(), k.fingerprint.to_string()))
        .collect();

    // keys list: exactly the plugin's keys and fingerprints.
    let cli_data = aws_data(endpoint, "server-a", &format!("{discovery}{SHORT}"));
    let list = cli(dir.path(), &cli_data, &td, &["keys", "list", "--json"]);
    assert_eq!(list.code, 0, "{}", list.stderr);
    let json = list.json();
    assert_eq!(json["backend"], "aws_kms");
    assert_eq!(fingerprints(&json["keys"]), served);
    assert!(
        json["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["state"] == "active" && k["served_here"] == true)
    );

    // --all-servers --history: server-b's key and the replaced x509 key too.
    let all = cli(
        dir.path(),
        &cli_data,
        &td,
        &["keys", "list", "--all-servers", "--history", "--json"],
    )
    .json();
    let keys = all["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 4, "{all:#}");
    let b_key = keys
        .iter()
        .find(|k| k["server_id"] == "server-b")
        .expect("server-b's key listed");
    assert_eq!(b_key["state"], "active");
    assert_eq!(
        b_key["fingerprint"].as_str().map(str::len),
        Some(64),
        "other servers' fingerprints are read from the store"
    );
    assert!(
        keys.iter().any(|k| k["server_id"] == "server-a"
            && k["key_id"] == "x509-CA-A"
            && k["state"] == "pending_deletion"
            && k["replaced"].as_str().is_some_and(|t| t.ends_with('Z'))),
        "the replaced key shows in --history with when it was replaced: {all:#}"
    );
    // Rotation history: the replaced key names the key that replaced it (its ARN).
    let current_ca = keys
        .iter()
        .find(|k| {
            k["server_id"] == "server-a" && k["key_id"] == "x509-CA-A" && k["state"] == "active"
        })
        .expect("server-a's current x509-CA-A");
    let replaced_ca = keys
        .iter()
        .find(|k| {
            k["server_id"] == "server-a"
                && k["key_id"] == "x509-CA-A"
                && k["state"] == "pending_deletion"
        })
        .expect("server-a's replaced x509-CA-A");
    assert_eq!(replaced_ca["replaced_by"], current_ca["locator"], "{all:#}");
    assert_eq!(current_ca["replaced_by"], Value::Null);
    assert!(keys.iter().all(|k| k["store"] == "target"));

    // inspect: the public key PEM and the key policy.
    let inspect = cli(
        dir.path(),
        &cli_data,
        &td,
        &["keys", "inspect", "JWT-Signer-A", "--json"],
    );
    assert_eq!(inspect.code, 0, "{}", inspect.stderr);
    let inspect = inspect.json();
    let pem = inspect["public_key_pem"].as_str().expect("pem");
    let der = keymanager_engine::kit::pem::public_key_der(pem).expect("PEM decodes");
    assert_eq!(
        keymanager_engine::Fingerprint::of_spki(&der).to_string(),
        a.public_key(&id("JWT-Signer-A"))
            .unwrap()
            .fingerprint
            .to_string()
    );

    // delete / disable of a key in use: refused, nothing changed.
    let refused = cli(
        dir.path(),
        &cli_data,
        &td,
        &["keys", "delete", "JWT-Signer-A", "--yes"],
    );
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.contains("refusing to delete"),
        "{}",
        refused.stderr
    );
    let refused = cli(
        dir.path(),
        &cli_data,
        &td,
        &["keys", "disable", "x509-CA-A", "--server-id", "server-b"],
    );
    assert_eq!(refused.code, 1, "{}", refused.stderr);

    // After the short stale age, prune's dry run plans server-b's key only, as the sweep does.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let dry = cli(dir.path(), &cli_data, &td, &["keys", "prune", "--json"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    let dry = dry.json();
    assert_eq!(dry["applied"], false);
    let planned: BTreeSet<(String, String, String)> = dry["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["locator"].as_str().unwrap().to_string(),
                d["action"].as_str().unwrap().to_string(),
                d["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let deletions: Vec<&(String, String, String)> =
        planned.iter().filter(|d| d.1 == "delete").collect();
    assert_eq!(deletions.len(), 1, "{dry:#}");
    assert_eq!(deletions[0].0, b_key["locator"].as_str().unwrap());
    // The plugin's own sweep, same thresholds, same state: the same decisions.
    let policy = SweepPolicy {
        stale_after: Duration::from_secs(2),
        half_created_grace: SweepPolicy::default().half_created_grace,
        max_clock_skew: Duration::from_secs(1),
    };
    let records = a.list_records().await.unwrap().unwrap();
    let sweep = keymanager_engine::lifecycle::plan_sweep(
        std::time::SystemTime::now(),
        &keymanager_engine::lifecycle::SweeperIdentity {
            trust_domain: td.clone(),
            server_id: "server-a".into(),
        },
        &a.in_use(),
        &records,
        policy,
    );
    let swept: BTreeSet<(String, String, String)> = sweep
        .iter()
        .map(|d| match d {
            SweepDecision::Delete { locator, reason } => {
                (locator.clone(), "delete".to_string(), reason.clone())
            }
            SweepDecision::Keep { locator, reason } => {
                (locator.clone(), "keep".to_string(), reason.clone())
            }
        })
        .collect();
    assert_eq!(
        planned
            .iter()
            .map(|d| (&d.0, &d.1))
            .collect::<BTreeSet<_>>(),
        swept.iter().map(|d| (&d.0, &d.1)).collect::<BTreeSet<_>>()
    );

    // disable / enable a stale key of another server (forced: it is that server's current key).
    let disable = cli(
        dir.path(),
        &cli_data,
        &td,
        &[
            "keys",
            "disable",
            "x509-CA-A",
            "--server-id",
            "server-b",
            "--force",
            "--json",
        ],
    );
    assert_eq!(disable.code, 0, "{}", disable.stderr);
    let listed = cli(
        dir.path(),
        &cli_data,
        &td,
        &["keys", "list", "--all-servers", "--json"],
    )
    .json();
    assert!(
        listed["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["server_id"] == "server-b" && k["state"] == "disabled"),
        "{listed:#}"
    );
    let enable = cli(
        dir.path(),
        &cli_data,
        &td,
        &["keys", "enable", "x509-CA-A", "--server-id", "server-b"],
    );
    assert_eq!(enable.code, 0, "{}", enable.stderr);

    // prune --apply deletes exactly what it planned; server-a's keys still sign.
    let applied = cli(
        dir.path(),
        &cli_data,
        &td,
        &["keys", "prune", "--apply", "--yes", "--json"],
    );
    assert_eq!(applied.code, 0, "{}", applied.stderr);
    let applied = applied.json();
    let results: Vec<&Value> = applied["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["action"] == "delete")
        .collect();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["result"], "deleted");
    let after = cli(
        dir.path(),
        &cli_data,
        &td,
        &["keys", "list", "--all-servers", "--history", "--json"],
    )
    .json();
    assert!(
        after["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["server_id"] == "server-b" && k["state"] == "pending_deletion"),
        "{after:#}"
    );
    for key in ["x509-CA-A", "JWT-Signer-A"] {
        a.sign(
            &id(key),
            vec![1; if key.starts_with("JWT") { 48 } else { 32 }],
            keymanager_engine::SignerOpts::Hash(if key.starts_with("JWT") {
                keymanager_engine::HashAlgorithm::Sha384
            } else {
                keymanager_engine::HashAlgorithm::Sha256
            }),
            None,
        )
        .await
        .expect("server-a still signs");
    }

    // doctor: passes; then names the missing permission when the store denies it.
    let doctor = cli(dir.path(), &cli_data, &td, &["doctor", "--json"]);
    assert_eq!(doctor.code, 0, "{}\n{}", doctor.stdout, doctor.stderr);
    assert_eq!(doctor.json()["ok"], true);
    let proxy = FaultProxy::start(endpoint).await;
    proxy.deny_aws(&["GetPublicKey"]);
    let denied_data = aws_data(proxy.url(), "server-a", &format!("{discovery}{SHORT}"));
    let doctor = cli(dir.path(), &denied_data, &td, &["doctor"]);
    assert_eq!(doctor.code, 1, "{}", doctor.stdout);
    assert!(
        doctor
            .stdout
            .lines()
            .any(|l| l.starts_with("[FAIL] permission kms:GetPublicKey")
                && l.contains("AccessDeniedException")),
        "{}",
        doctor.stdout
    );
    assert!(
        doctor.stdout.contains("grant kms:GetPublicKey"),
        "{}",
        doctor.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_keys_list_shows_the_keys_file_and_refuses_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys_path: PathBuf = dir.path().join("keys.json");
    let data = format!("keys_path = {:?}\n", keys_path.display().to_string());
    let (_state, disk) = server("example.org", &data).await;
    disk.generate_key(id("x509-CA-A"), KeyType::Rsa2048)
        .await
        .expect("generate");
    let list = cli(
        dir.path(),
        &data,
        "example.org",
        &["keys", "list", "--json"],
    );
    assert_eq!(list.code, 0, "{}", list.stderr);
    let served: BTreeSet<(String, String)> = disk
        .public_keys()
        .iter()
        .map(|k| (k.id.as_str().to_string(), k.fingerprint.to_string()))
        .collect();
    assert_eq!(fingerprints(&list.json()["keys"]), served);
    let delete = cli(
        dir.path(),
        &data,
        "example.org",
        &["keys", "delete", "x509-CA-A", "--yes"],
    );
    assert_eq!(delete.code, 1);
    assert!(delete.stderr.contains("refusing"), "{}", delete.stderr);
    let prune = cli(dir.path(), &data, "example.org", &["keys", "prune"]);
    assert_eq!(prune.code, 0);
    assert!(prune.stdout.contains("nothing is ever left to prune"));
    let missing = cli(
        dir.path(),
        &data,
        "example.org",
        &["keys", "inspect", "JWT-Signer-Z"],
    );
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("no key JWT-Signer-Z"),
        "{}",
        missing.stderr
    );
    let bad = cli(
        dir.path(),
        "backend = \"nope\"\n",
        "example.org",
        &["keys", "list"],
    );
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("unknown backend"), "{}", bad.stderr);
    let doctor = cli(
        dir.path(),
        "backend = \"nope\"\n",
        "example.org",
        &["doctor"],
    );
    assert_eq!(doctor.code, 1);
    assert!(
        doctor.stdout.contains("[FAIL] configuration"),
        "{}",
        doctor.stdout
    );
}
