//! Crash safety of the `disk` backend with the real binary: SIGKILL while GenerateKey rotates
//! keys (during RSA-4096 generation and right while the keys file is being written), restart,
//! repeat. After a final restart no temporary file may remain beside the keys file, and no
//! private key may exist on disk that keys.json does not hold.
//!
//! The clean-up runs when the plugin loads the keys file (Configure), so this test needs the
//! `disk` backend to call `KeyFile::remove_leftovers()` at load.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keymanager_backend_disk::SoftwareKey;
use keymanager_host::PluginProcess;
use keymanager_proto::keymanager::sign_data_request::SignerOpts;
use keymanager_proto::keymanager::{
    GenerateKeyRequest, GetPublicKeysRequest, HashAlgorithm, KeyType, SignDataRequest,
};
use ring::signature::{self, UnparsedPublicKey};
use sha2::Digest as _;

const BIN: &str = env!("CARGO_BIN_EXE_kms-keymanager");
const ROUNDS: usize = 30;
const KEYS: &str = "keys.json";
/// The only other file the plugin keeps beside the keys file: the (empty) lock file.
const LOCK: &str = "keys.json.lock";

async fn start(keys: &Path) -> PluginProcess {
    let plugin = PluginProcess::launch(Path::new(BIN))
        .await
        .expect("plugin launches");
    let hcl = format!("keys_path = {:?}\n", keys.display().to_string());
    plugin
        .configure("example.org", &hcl)
        .await
        .unwrap_or_else(|e| panic!("Configure after a crash failed: {e}"));
    plugin
}

fn generate(id: &str, key_type: KeyType) -> GenerateKeyRequest {
    GenerateKeyRequest {
        key_id: id.into(),
        key_type: key_type as i32,
    }
}

fn sigkill(pid: u32) {
    let status = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -KILL {pid} failed");
}

/// Waits until the killed process no longer runs (gone or a zombie), so that nothing it
/// started can still touch the directory when the next plugin starts.
fn wait_dead(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            // The state follows the parenthesised command name.
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .unwrap()
                    .trim_start()
                    .starts_with('Z') =>
            {
                return;
            }
            Ok(_) => {}
        }
        assert!(Instant::now() < deadline, "process {pid} survived SIGKILL");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills the plugin and cleans up what the host would: the socket directory.
fn crash(plugin: PluginProcess) {
    let pid = plugin.pid().unwrap();
    let socket_dir = plugin.socket_path().parent().unwrap().to_path_buf();
    sigkill(pid);
    wait_dead(pid);
    drop(plugin);
    let _ = std::fs::remove_dir_all(socket_dir);
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The keys file's entries, id → base64 PKCS#8 as stored.
fn keys_json(dir: &Path) -> BTreeMap<String, String> {
    let bytes = std::fs::read(dir.join(KEYS)).unwrap();
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("keys.json does not parse after a crash: {e}"));
    value["keys"]
        .as_object()
        .expect("keys.json has a \"keys\" object")
        .iter()
        .map(|(id, b64)| (id.clone(), b64.as_str().unwrap().to_string()))
        .collect()
}

/// Every base64 run long enough to be (part of) a private key, in any file of `dir`. A file
/// cut short by the kill may end in the middle of one, so runs are compared as substrings.
fn key_material_not_in_keys_json(dir: &Path) -> Vec<(String, usize)> {
    let held: Vec<String> = keys_json(dir).into_values().collect();
    let mut orphans = Vec::new();
    for name in names_in(dir) {
        let path = dir.join(&name);
        if !std::fs::symlink_metadata(&path).unwrap().is_file() {
            orphans.push((format!("{name} (not a regular file)"), 0));
            continue;
        }
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
        let runs = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '='))
            .filter(|run| run.len() >= 64);
        let unknown = runs
            .filter(|run| !held.iter().any(|key| key.contains(run)))
            .count();
        if unknown > 0 {
            orphans.push((name, unknown));
        }
    }
    orphans
}

/// Starts a watcher thread that SIGKILLs `pid` the moment a file other than the ones in
/// `known` appears in `dir` (the temporary file of a write in progress). Returns a flag
/// to stop it and its handle (true when it killed).
fn kill_on_new_file(
    dir: PathBuf,
    known: BTreeSet<String>,
    pid: u32,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<bool>) {
    let stop = Arc::new(AtomicBool::new(false));
    let handle = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let seen = std::fs::read_dir(&dir).unwrap().any(|entry| {
                    let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                    !known.contains(&name)
                });
                if seen {
                    sigkill(pid);
                    return true;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            false
        })
    };
    (stop, handle)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_generate_key_leaves_no_keys_beside_the_keys_file() {
    // Under the target directory rather than /tmp: a real disk makes the fsync window wide
    // enough for the watcher to see the temporary file.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let keys = dir.path().join(KEYS);

    // A warm-up run, not killed: it creates the keys to rotate and times RSA-4096 generation.
    let plugin = start(&keys).await;
    let mut km = plugin.key_manager();
    for id in ["JWT-Signer-A", "JWT-Signer-B"] {
        km.generate_key(generate(id, KeyType::EcP256))
            .await
            .unwrap();
    }
    let started = Instant::now();
    for id in ["x509-CA-A", "x509-CA-B"] {
        km.generate_key(generate(id, KeyType::Rsa4096))
            .await
            .unwrap();
    }
    let rsa_time = started.elapsed() / 2;
    assert!(plugin.shutdown().await.unwrap().graceful);

    let mut killed_while_writing = 0;
    let mut leftovers_seen = 0;
    for round in 0..ROUNDS {
        let plugin = start(&keys).await;
        let pid = plugin.pid().unwrap();
        let mut km = plugin.key_manager();
        // A completed rotation: the replaced private key must not survive anywhere on disk.
        km.generate_key(generate(
            ["JWT-Signer-A", "JWT-Signer-B"][round % 2],
            KeyType::EcP256,
        ))
        .await
        .unwrap();
        // The rotation the kill interrupts.
        let request = {
            let mut km = km.clone();
            let id = ["x509-CA-A", "x509-CA-B"][round % 2];
            tokio::spawn(async move { km.generate_key(generate(id, KeyType::Rsa4096)).await })
        };
        if round % 2 == 0 {
            // Kill right while the keys file is being written.
            let (stop, watcher) =
                kill_on_new_file(dir.path().to_path_buf(), names_in(dir.path()), pid);
            let _ = tokio::time::timeout(Duration::from_secs(120), request).await;
            stop.store(true, Ordering::Relaxed);
            if watcher.join().unwrap() {
                killed_while_writing += 1;
            }
        } else {
            // Kill somewhere in key generation or the write after it.
            let delay = rsa_time.mul_f64((round % 10) as f64 / 8.0);
            tokio::time::sleep(delay).await;
        }
        crash(plugin);
        let leftovers = names_in(dir.path())
            .into_iter()
            .filter(|name| name != KEYS && name != LOCK)
            .count();
        leftovers_seen += leftovers;
        eprintln!(
            "round {round}: {leftovers} file(s) beside keys.json after the kill; files with \
             key material keys.json does not hold: {:?}",
            key_material_not_in_keys_json(dir.path())
        );
    }
    assert!(
        killed_while_writing > 0,
        "no kill landed while the keys file was being written; the test did not exercise \
         the crash it is about"
    );
    eprintln!(
        "{killed_while_writing} kill(s) during a write; {leftovers_seen} leftover file(s) seen \
         after kills"
    );

    // The final restart cleans up.
    let plugin = start(&keys).await;
    let names = names_in(dir.path());
    let extra: Vec<&String> = names.iter().filter(|n| *n != KEYS && *n != LOCK).collect();
    assert!(
        extra.is_empty(),
        "files left beside the keys file after a restart: {extra:?} (the disk backend must \
         call KeyFile::remove_leftovers() when it loads the keys file)"
    );
    let orphans = key_material_not_in_keys_json(dir.path());
    assert!(
        orphans.is_empty(),
        "private key material on disk that keys.json does not hold: {orphans:?}"
    );

    // keys.json parses and the restarted plugin serves exactly its keys.
    let stored = keys_json(dir.path());
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        ["JWT-Signer-A", "JWT-Signer-B", "x509-CA-A", "x509-CA-B"]
    );
    let mut km = plugin.key_manager();
    let served = km
        .get_public_keys(GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .public_keys;
    assert_eq!(served.len(), stored.len());
    let message = b"signed after 30 crashes";
    let digest = sha2::Sha256::digest(message).to_vec();
    for key in served {
        let pkcs8 = STANDARD.decode(&stored[&key.id]).unwrap();
        let spki = SoftwareKey::from_pkcs8_der(&pkcs8)
            .unwrap()
            .spki_der()
            .unwrap();
        assert_eq!(
            key.pkix_data, spki,
            "{}: served public key is not keys.json's",
            key.id
        );
        let response = km
            .sign_data(SignDataRequest {
                key_id: key.id.clone(),
                data: digest.clone(),
                signer_opts: Some(SignerOpts::HashAlgorithm(HashAlgorithm::Sha256 as i32)),
            })
            .await
            .unwrap()
            .into_inner();
        let algorithm: &dyn signature::VerificationAlgorithm = if key.id.starts_with("JWT") {
            &signature::ECDSA_P256_SHA256_ASN1
        } else {
            &signature::RSA_PKCS1_2048_8192_SHA256
        };
        let (_, parsed) = <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<
            '_,
            _,
        >>::from_der(&key.pkix_data)
        .unwrap();
        UnparsedPublicKey::new(algorithm, parsed.subject_public_key.data.as_ref())
            .verify(message, &response.signature)
            .unwrap_or_else(|_| panic!("{}: signature does not verify", key.id));
    }
    assert!(plugin.shutdown().await.unwrap().graceful);
}
