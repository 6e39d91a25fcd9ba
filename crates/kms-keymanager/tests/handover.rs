//! Hand-over mode (`migrate_from`) through the plugin's own configuration state, against real
//! peers: `disk` → `aws_kms` (moto) and `aws_kms` (moto) → `gcp_kms` (the Cloud KMS fake).
//! The old store serves the ids the new one lacks, GenerateKey creates in the new store, every
//! signature verifies with an independent library, and the old store is never written: the
//! keys file's bytes, and every request that reaches moto, are compared before and after.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use keymanager_conformance::peers::{self, Peer};
use keymanager_conformance::proxy::{FaultProxy, RequestSummary};
use keymanager_conformance::verify;
use keymanager_engine::lifecycle::SweepPolicy;
use keymanager_engine::{
    CoreConfig, HashAlgorithm, KeyService, KeyType, SignatureScheme, SignerOpts,
};
use sha2::Digest as _;

mod common;
use common::{id, run_on, state};

const IDS: [&str; 2] = ["x509-CA-A", "JWT-Signer-A"];

/// Each test has a trust domain of its own: the listings compared are per trust domain.
fn core(trust_domain: &str) -> Option<CoreConfig> {
    Some(CoreConfig {
        trust_domain: trust_domain.into(),
    })
}

fn moto() -> &'static Peer {
    static PEER: OnceLock<Peer> = OnceLock::new();
    PEER.get_or_init(peers::moto)
}

fn gcp_fake() -> &'static Peer {
    static PEER: OnceLock<Peer> = OnceLock::new();
    PEER.get_or_init(peers::gcp_fake)
}

const RING: &str = "projects/handover/locations/global/keyRings/spire";

fn aws(endpoint: &str, server: &str) -> String {
    format!(
        "backend = \"aws_kms\"\nregion = \"us-east-1\"\nendpoint = {endpoint:?}\naccess_key_id = \"PLANTED-SECRET-AKIAHANDOVER\"\nsecret_access_key = \"PLANTED-SECRET-handover-secret\"\nkey_identifier_value = {server:?}\n"
    )
}

fn gcp(endpoint: &str, service_account_file: &Path, server: &str) -> String {
    format!(
        "backend = \"gcp_kms\"\nkey_ring = {RING:?}\nendpoint = {endpoint:?}\nservice_account_file = {:?}\nkey_identifier_value = {server:?}\n",
        service_account_file.display().to_string()
    )
}

/// `text` as the body of a `migrate_from { … }` block.
fn migrate_from(text: &str) -> String {
    let body: String = text.lines().map(|l| format!("  {l}\n")).collect();
    format!("migrate_from {{\n{body}}}\n")
}

/// Fingerprints by id, as SPIRE sees them through GetPublicKeys.
fn fingerprints(service: &dyn KeyService) -> BTreeMap<String, String> {
    service
        .public_keys()
        .into_iter()
        .map(|k| {
            (
                k.id.as_str().to_string(),
                k.fingerprint.as_str().to_string(),
            )
        })
        .collect()
}

/// Signs a fresh message with `key` and checks the signature against the public key the
/// service reports for it, with an independent verifier.
async fn sign_and_verify(service: &dyn KeyService, key: &str) {
    let public = service.public_key(&id(key)).expect("public key");
    let message = format!("hand-over {key} {:?}", std::time::SystemTime::now());
    let digest = verify::digest(HashAlgorithm::Sha256, message.as_bytes());
    let signature = service
        .sign(
            &id(key),
            digest,
            SignerOpts::Hash(HashAlgorithm::Sha256),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("sign with {key}: {e}"));
    assert_eq!(signature.fingerprint, public.fingerprint);
    verify::verify(
        &public.spki_der,
        public.key_type,
        SignatureScheme::Ecdsa(HashAlgorithm::Sha256),
        message.as_bytes(),
        &signature.bytes,
    )
    .unwrap_or_else(|e| panic!("the signature by {key} does not verify: {e}"));
}

fn gauge(service: &dyn KeyService, backend: &str) -> String {
    let text = service.telemetry().metrics().encode_prometheus();
    let prefix = format!("kms_keymanager_migrate_from_keys{{backend=\"{backend}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no migrate_from gauge in\n{text}"))
        .to_string()
}

/// Every file in `dir` with the SHA-256 of its bytes.
fn directory_state(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|entry| {
            let entry = entry.expect("entry");
            let bytes = std::fs::read(entry.path()).expect("read");
            (
                entry.file_name().to_string_lossy().into_owned(),
                hex::encode(sha2::Sha256::digest(bytes)),
            )
        })
        .collect()
}

/// Runs the operator CLI on a plugin_data file; its JSON output.
fn cli(plugin_data: &Path, trust_domain: &str, args: &[&str]) -> serde_json::Value {
    run_on(plugin_data, trust_domain, args).json()
}

/// The store calls a read-only old store may make: reads (STS's GetCallerIdentity at
/// open among them) and signatures.
fn is_read_or_sign(request: &RequestSummary) -> bool {
    let name = request.name();
    ["Describe", "List", "Get", "Sign"]
        .iter()
        .any(|read| name.starts_with(read))
        || request.body.contains("Action=GetCallerIdentity")
}

/// Runs SPIRE's rotation through the hand-over: the ids move one by one, signatures verify
/// all along, and the hand-over reports when it is done.
async fn rotate_every_id(service: &dyn KeyService, old_backend: &str) {
    assert_eq!(gauge(service, old_backend), IDS.len().to_string());
    for (moved, key) in IDS.iter().enumerate() {
        let before = service
            .public_key(&id(key))
            .expect("public key")
            .fingerprint;
        let new = service
            .generate_key(id(key), KeyType::EcP256)
            .await
            .unwrap_or_else(|e| panic!("GenerateKey {key}: {e}"));
        assert_ne!(new.fingerprint, before, "{key} got a new key");
        assert_eq!(service.public_key(&id(key)).expect("public key"), new);
        for other in IDS {
            sign_and_verify(service, other).await;
        }
        assert_eq!(
            gauge(service, old_backend),
            (IDS.len() - moved - 1).to_string()
        );
    }
    // The lifecycle runs on the new store only.
    service.stamp_keys().await.expect("stamp");
    service.sweep(SweepPolicy::default()).await.expect("sweep");
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_to_aws_kms_serves_the_keys_file_until_every_id_has_moved_and_never_writes_it() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let keys_path = dir.path().join("keys.json");
    let disk = format!(
        "backend = \"disk\"\nkeys_path = {:?}\n",
        keys_path.display().to_string()
    );

    // A server on disk, as before the migration.
    let before = state();
    before
        .configure(core("disk-to-aws.handover.test"), &disk)
        .await
        .expect("configure disk");
    let service = before.service().expect("configured");
    for key in IDS {
        service
            .generate_key(id(key), KeyType::EcP256)
            .await
            .expect("generate on disk");
    }
    let bundle = fingerprints(service.as_ref());
    before.close().await;
    drop((service, before));
    let disk_before = directory_state(dir.path());

    // Restarted on aws_kms with the disk store behind it.
    let proxy = FaultProxy::start(&moto().url).await;
    let server = format!("handover-disk-{}", std::process::id());
    let after = state();
    after
        .configure(
            core("disk-to-aws.handover.test"),
            &format!("{}{}", aws(proxy.url(), &server), migrate_from(&disk)),
        )
        .await
        .expect("configure the hand-over");
    let service = after.service().expect("configured");
    assert_eq!(
        fingerprints(service.as_ref()),
        bundle,
        "the same keys at once"
    );
    let mark = proxy.count();
    for key in IDS {
        sign_and_verify(service.as_ref(), key).await;
    }
    assert!(
        proxy.since(mark).iter().all(|r| r.name() != "Sign"),
        "the disk keys sign locally"
    );

    // The operator CLI with the same configuration: which store serves each id.
    let data_dir = tempfile::tempdir().expect("temporary directory");
    let data = data_dir.path().join("plugin-data.hcl");
    std::fs::write(
        &data,
        format!("{}{}", aws(proxy.url(), &server), migrate_from(&disk)),
    )
    .expect("write plugin data");
    let list = cli(
        &data,
        "disk-to-aws.handover.test",
        &["keys", "list", "--json"],
    );
    let stores: BTreeMap<String, String> = list["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            (
                k["key_id"].as_str().unwrap_or("?").to_string(),
                k["store"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    assert_eq!(
        stores,
        IDS.iter()
            .map(|id| (id.to_string(), "migrate_from".to_string()))
            .collect(),
        "{list:#}"
    );
    assert_eq!(list["migrate_from"]["serving"], 2, "{list:#}");

    let mark = proxy.count();
    rotate_every_id(service.as_ref(), "disk").await;
    let list = cli(
        &data,
        "disk-to-aws.handover.test",
        &["keys", "list", "--json"],
    );
    assert!(
        list["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .all(|k| k["store"] == "target"),
        "{list:#}"
    );
    assert_eq!(list["migrate_from"]["serving"], 0, "{list:#}");
    let doctor = cli(&data, "disk-to-aws.handover.test", &["doctor", "--json"]);
    let check = doctor["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "hand-over")
        .unwrap_or_else(|| panic!("no hand-over check: {doctor:#}"))
        .clone();
    assert_eq!(check["outcome"], "warn", "{check:#}");
    assert!(
        check["fix"]
            .as_str()
            .unwrap_or_default()
            .contains("remove the migrate_from block"),
        "{check:#}"
    );
    let names: Vec<String> = proxy.since(mark).iter().map(|r| r.name()).collect();
    assert_eq!(
        names.iter().filter(|n| *n == "CreateKey").count(),
        IDS.len(),
        "every moved id was created in KMS: {names:?}"
    );
    assert!(names.iter().any(|n| n == "Sign"), "KMS signs the moved ids");
    assert_eq!(
        directory_state(dir.path()),
        disk_before,
        "the keys file and its directory are untouched"
    );
    after.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_kms_to_gcp_kms_signs_in_aws_until_every_id_has_moved_and_never_writes_there() {
    let proxy = FaultProxy::start(&moto().url).await;
    let server = format!("handover-aws-{}", std::process::id());
    let old = aws(proxy.url(), &server);

    let before = state();
    before
        .configure(core("aws-to-gcp.handover.test"), &old)
        .await
        .expect("configure aws");
    let service = before.service().expect("configured");
    for key in IDS {
        service
            .generate_key(id(key), KeyType::EcP256)
            .await
            .expect("generate in aws");
    }
    let bundle = fingerprints(service.as_ref());
    let records_before = service
        .list_records()
        .await
        .expect("list")
        .expect("records");
    before.close().await;
    drop((service, before));

    let fake = gcp_fake();
    let sa = tempfile::tempdir().expect("temporary directory");
    let sa_file = sa.path().join("sa.json");
    peers::gcp_service_account(
        &fake.url,
        "spire@handover.iam.gserviceaccount.com",
        &sa_file,
        Some(RING),
    );
    let mark = proxy.count();
    let after = state();
    after
        .configure(
            core("aws-to-gcp.handover.test"),
            &format!(
                "{}{}",
                gcp(&fake.url, &sa_file, &server),
                migrate_from(&old)
            ),
        )
        .await
        .expect("configure the hand-over");
    let service = after.service().expect("configured");
    assert_eq!(
        fingerprints(service.as_ref()),
        bundle,
        "the same keys at once"
    );
    for key in IDS {
        sign_and_verify(service.as_ref(), key).await;
    }
    rotate_every_id(service.as_ref(), "aws_kms").await;
    let requests = proxy.since(mark);
    let calls: Vec<String> = requests.iter().map(|r| r.name()).collect();
    assert!(
        requests.iter().all(is_read_or_sign),
        "the old store got a write: {calls:?}"
    );
    assert!(
        calls.iter().any(|n| n == "Sign"),
        "the old keys signed in AWS"
    );
    after.close().await;

    // The old store as its own configuration lists it: the same keys, tags and states.
    let check = state();
    check
        .configure(core("aws-to-gcp.handover.test"), &old)
        .await
        .expect("configure aws again");
    let records_after = check
        .service()
        .expect("configured")
        .list_records()
        .await
        .expect("list")
        .expect("records");
    assert_eq!(records_after, records_before, "the old store is as it was");
    check.close().await;
}
