//! Crash safety of the `pkcs11` backend with the real binary, on SoftHSM2 and kryoptic:
//! SIGKILL while GenerateKey rotates a key (at a different moment each round: during key
//! generation, around the publish relabel, during the retire), restart, repeat. Every
//! restart must find a key for the id (the old or the new one, never none), and that key
//! must sign with a signature that verifies (*ring*) against the public key served.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::path::Path;
use std::time::Duration;

use keymanager_conformance::peers::{self, SoftToken};
use keymanager_host::PluginProcess;
use keymanager_proto::keymanager::sign_data_request::SignerOpts;
use keymanager_proto::keymanager::{
    GenerateKeyRequest, GetPublicKeyRequest, HashAlgorithm, KeyType, SignDataRequest,
};
use ring::signature::{self, UnparsedPublicKey};
use sha2::Digest as _;

const BIN: &str = env!("CARGO_BIN_EXE_kms-keymanager");
const ROUNDS: u64 = 12;
const ID: &str = "x509-CA-A";

async fn start(token: &SoftToken) -> PluginProcess {
    let plugin = PluginProcess::launch(Path::new(BIN))
        .await
        .expect("plugin launches");
    let hcl = format!(
        "backend = \"pkcs11\"\nmodule = {:?}\ntoken_label = {:?}\npin = {:?}\nkey_identifier_value = \"crash\"\n",
        token.module.display().to_string(),
        token.label,
        token.pin
    );
    plugin
        .configure("example.org", &hcl)
        .await
        .unwrap_or_else(|e| panic!("Configure after a crash failed: {e}"));
    plugin
}

fn rotate() -> GenerateKeyRequest {
    GenerateKeyRequest {
        key_id: ID.into(),
        key_type: KeyType::Rsa2048 as i32,
    }
}

fn crash(plugin: PluginProcess) {
    let pid = plugin.pid().unwrap();
    let status = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let socket_dir = plugin.socket_path().parent().unwrap().to_path_buf();
    drop(plugin);
    let _ = std::fs::remove_dir_all(socket_dir);
}

/// The id's key as served, checked by a signature that verifies against it.
async fn signs(plugin: &PluginProcess, round: u64) -> Vec<u8> {
    let mut km = plugin.key_manager();
    let key = km
        .get_public_key(GetPublicKeyRequest { key_id: ID.into() })
        .await
        .unwrap()
        .into_inner()
        .public_key
        .unwrap_or_else(|| panic!("round {round}: a restart finds no key for {ID}"));
    let message = format!("signed after crash {round}");
    let response = km
        .sign_data(SignDataRequest {
            key_id: ID.into(),
            data: sha2::Sha256::digest(message.as_bytes()).to_vec(),
            signer_opts: Some(SignerOpts::HashAlgorithm(HashAlgorithm::Sha256 as i32)),
        })
        .await
        .unwrap()
        .into_inner();
    let (_, spki) = <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<
        '_,
        _,
    >>::from_der(&key.pkix_data)
    .unwrap();
    UnparsedPublicKey::new(
        &signature::RSA_PKCS1_2048_8192_SHA256,
        spki.subject_public_key.data.as_ref(),
    )
    .verify(message.as_bytes(), &response.signature)
    .unwrap_or_else(|_| panic!("round {round}: the key found does not sign"));
    key.pkix_data
}

async fn sigkill_during_rotation_always_leaves_a_key(token: SoftToken) {
    let plugin = start(&token).await;
    let started = std::time::Instant::now();
    plugin.key_manager().generate_key(rotate()).await.unwrap();
    // Kill moments spread over twice what a whole GenerateKey takes on this machine right
    // now (RSA generation on a loaded machine can take far longer than usual), so that the
    // late rounds let rotations complete.
    let step = Duration::from_millis(25).max(started.elapsed() * 2 / ROUNDS as u32);
    crash(plugin);
    let mut distinct = Vec::new();
    for round in 1..=ROUNDS {
        // Never none: whatever the last kill interrupted, a key is found and signs.
        let plugin = start(&token).await;
        let found = signs(&plugin, round).await;
        if !distinct.contains(&found) {
            distinct.push(found);
        }
        let mut km = plugin.key_manager();
        let rotation = tokio::spawn(async move { km.generate_key(rotate()).await });
        // A different moment of the rotation each round.
        tokio::time::sleep(step * round as u32).await;
        crash(plugin);
        let _ = rotation.await;
    }
    let plugin = start(&token).await;
    signs(&plugin, ROUNDS + 1).await;
    assert!(plugin.shutdown().await.unwrap().graceful);
    // Some kills came after a rotation was published: the key did change over the rounds.
    assert!(
        distinct.len() > 1,
        "no rotation ever completed: the kills came too early"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_rotation_always_leaves_a_key_softhsm() {
    let token = peers::softhsm_token(&format!("crash-{}", std::process::id()));
    sigkill_during_rotation_always_leaves_a_key(token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_rotation_always_leaves_a_key_kryoptic() {
    let token = peers::kryoptic_token(&format!("crash-{}", std::process::id()));
    sigkill_during_rotation_always_leaves_a_key(token).await;
}
