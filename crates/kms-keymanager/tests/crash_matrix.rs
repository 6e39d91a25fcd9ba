//! The crash matrix: for every backend × every failpoint (`keymanager_engine::failpoint`),
//! the real binary is driven to the step, aborts there (no destructors, no reply: a
//! `kill -9` at that step), and is started again. Checked with the store itself, through
//! the operator CLI's view (`keys list --all-servers --history --json`: what discovery
//! serves and every key the store holds for the trust domain, which is the cell's own):
//! - each key id serves the key SPIRE last got, or the key the crashed step created (a key
//!   the store did not hold before the step), and it signs verifiably (*ring*);
//! - no served key is on its way out of the store;
//! - whatever the crashed step left (a key discovery does not find) is gone after the next
//!   sweep: the store holds exactly the served keys;
//! - SPIRE can rotate again, and the store then holds exactly the new served keys.
//!
//! Prints the step × backend table of outcomes and checks that `docs/reliability.md`
//! holds it (`CRASH_MATRIX_UPDATE=1` rewrites it there).
//!
//! Needs the `failpoints` feature (`cargo test -p kms-keymanager --features failpoints
//! --test crash_matrix`) and the peers `scripts/test-all.sh` sets up.

#![cfg(feature = "failpoints")]
#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keymanager_conformance::peers::{self, AzureFake, Peer, SoftToken};
use keymanager_engine::failpoint;
use keymanager_host::PluginProcess;
use keymanager_proto::keymanager::sign_data_request::SignerOpts;
use keymanager_proto::keymanager::{
    GenerateKeyRequest, GetPublicKeysRequest, HashAlgorithm, KeyType, SignDataRequest,
};
use ring::signature::{self, UnparsedPublicKey};
use serde_json::Value;
use sha2::Digest as _;

const BIN: &str = env!("CARGO_BIN_EXE_kms-keymanager");
/// The key ids SPIRE holds in every cell; a rotation cell rotates the first (the second,
/// the shared id, in gcp_kms's shared-keys mode).
const IDS: [&str; 2] = ["x509-CA-A", "JWT-Signer-A"];
/// New ids whose GenerateKey crashes after prepare: the leftovers a sweep cell sweeps.
const LEFTOVER_IDS: [&str; 2] = ["x509-CA-B", "JWT-Signer-B"];
/// gcp_kms's shared-keys mode: the JWT keys live in one CryptoKey per trust domain and id;
/// the shortest lease a crashed rotation's lock can have, and a reuse window short enough
/// that a rotation a moment later makes a new version (within it, a version this process
/// has not served — one created before a restart too — is adopted instead).
const SHARED_KEYS: &str = "shared_keys {\n  crypto_key_template = \"s-{{ .TrustDomain }}-{{ .KeyID }}\"\n  key_id_extraction_regex = \"^s-[0-9a-f]+-(.+)$\"\n  lock_lease = \"10s\"\n  reuse_window = \"1s\"\n}\n";
const GCP_KEY_RING: &str = "projects/crash/locations/global/keyRings/spire";
/// How long a crash run may take to reach a stamp or sweep (both run every second).
const CRASH_WAIT: Duration = Duration::from_secs(20);
/// Concurrent cells (each runs at most one plugin or CLI process at a time).
const PARALLEL: usize = 6;
const DOC: &str = "docs/reliability.md";
const SECTION: &str = "## Crash at every step";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Backend {
    Disk,
    Aws,
    AwsTags,
    Gcp,
    GcpShared,
    Vault,
    Azure,
    Pkcs11,
}

impl Backend {
    const ALL: [Self; 8] = [
        Self::Disk,
        Self::Aws,
        Self::AwsTags,
        Self::Gcp,
        Self::GcpShared,
        Self::Vault,
        Self::Azure,
        Self::Pkcs11,
    ];

    fn column(self) -> &'static str {
        match self {
            Self::Disk => "disk",
            Self::Aws => "aws_kms (moto)",
            Self::AwsTags => "aws_kms, tag discovery (moto)",
            Self::Gcp => "gcp_kms (fake)",
            Self::GcpShared => "gcp_kms, shared JWT keys (fake)",
            Self::Vault => "hashicorp_vault (OpenBao)",
            Self::Azure => "azure_key_vault (fake)",
            Self::Pkcs11 => "pkcs11 (SoftHSM2)",
        }
    }

    /// Why the backend has no such step, if it has none.
    fn lacks(self, point: &str) -> Option<&'static str> {
        let lifecycle = point.starts_with("stamp.") || point.starts_with("sweep.");
        match (self, point) {
            (Self::Disk, _) if lifecycle => Some("no stamps or sweeps"),
            (Self::Disk, "delete.after_intent" | "publish.after_alias") => Some("one file write"),
            (Self::Gcp | Self::GcpShared | Self::Azure, "delete.after_intent") => {
                Some("one store call")
            }
            (Self::Pkcs11, "stamp.after_key") => Some("no stamps on a token"),
            (
                Self::Gcp | Self::GcpShared | Self::Vault | Self::Azure | Self::Pkcs11,
                "publish.after_alias",
            ) => Some("one store call"),
            _ => None,
        }
    }
}

/// What drives a cell to its step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drive {
    /// A GenerateKey that rotates the cell's rotated id.
    Rotate,
    /// The stamper's next round.
    Stamp,
    /// The sweeper's next round, with two leftovers to delete.
    Sweep,
}

fn drive_of(point: &str) -> Drive {
    if point.starts_with("stamp.") {
        Drive::Stamp
    } else if point.starts_with("sweep.") {
        Drive::Sweep
    } else {
        Drive::Rotate
    }
}

/// The peers, started once and shared by every cell.
struct Peers {
    moto: Peer,
    gcp: Peer,
    gcp_account: PathBuf,
    bao: Peer,
    azure: AzureFake,
}

fn start_peers() -> Peers {
    std::thread::scope(|s| {
        let moto = s.spawn(peers::moto);
        let gcp = s.spawn(|| {
            let peer = peers::gcp_fake();
            let file = std::env::temp_dir().join(format!(
                "kms-keymanager-crash-sa-{}.json",
                std::process::id()
            ));
            peers::gcp_service_account(
                &peer.url,
                "spire@crash.iam.gserviceaccount.com",
                &file,
                Some(GCP_KEY_RING),
            );
            (peer, file)
        });
        let bao = s.spawn(peers::openbao);
        let azure = s.spawn(peers::azure_fake);
        let (gcp, gcp_account) = gcp.join().unwrap();
        Peers {
            moto: moto.join().unwrap(),
            gcp,
            gcp_account,
            bao: bao.join().unwrap(),
            azure: azure.join().unwrap(),
        }
    })
}

/// One cell: a backend, a failpoint, and a store of its own.
struct Cell {
    backend: Backend,
    point: &'static str,
    server_id: String,
    trust_domain: String,
    dir: tempfile::TempDir,
    token: Option<SoftToken>,
}

impl Cell {
    fn new(backend: Backend, point: &'static str, n: usize) -> Self {
        let tag = format!("c{n}-{}", std::process::id());
        let token =
            (backend == Backend::Pkcs11).then(|| peers::softhsm_token(&format!("crash-{tag}")));
        Self {
            backend,
            point,
            server_id: format!("crash-{tag}"),
            trust_domain: format!("{tag}.crash.test"),
            dir: tempfile::tempdir().unwrap(),
            token,
        }
    }

    fn kept_by_design(&self, key: &StoreKey) -> bool {
        self.backend == Backend::GcpShared && key.server_id.as_deref() == Some("<shared>")
    }

    /// Waits out gcp_kms's shared `reuse_window` (1 s here), so that the next rotation makes
    /// a version instead of adopting the newest.
    async fn past_reuse_window(&self) {
        if self.backend == Backend::GcpShared {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
    }

    /// The id a rotation cell rotates: the shared one in shared-keys mode.
    fn rotated(&self) -> &'static str {
        if self.backend == Backend::GcpShared {
            IDS[1]
        } else {
            IDS[0]
        }
    }

    /// plugin_data; `busy` stamps and sweeps every second (else never within a run).
    fn plugin_data(&self, peers: &Peers, busy: bool) -> String {
        let sid = &self.server_id;
        let schedule = if busy {
            "liveness_interval = \"1s\"\nsweep_interval = \"1s\"\nclock_skew_allowance = \"1s\"\n"
        } else {
            "liveness_interval = \"1h\"\nsweep_interval = \"2h\"\nclock_skew_allowance = \"1s\"\n"
        };
        let store = match self.backend {
            Backend::Disk => {
                return format!(
                    "keys_path = {:?}\n",
                    self.dir.path().join("keys.json").display().to_string()
                );
            }
            Backend::Aws | Backend::AwsTags => format!(
                "backend = \"aws_kms\"\nregion = \"us-east-1\"\nendpoint = {:?}\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nenable_tag_based_key_discovery = {}\n",
                peers.moto.url,
                self.backend == Backend::AwsTags
            ),
            Backend::Gcp | Backend::GcpShared => format!(
                "backend = \"gcp_kms\"\nkey_ring = {GCP_KEY_RING:?}\nendpoint = {:?}\nservice_account_file = {:?}\n{}",
                peers.gcp.url,
                peers.gcp_account.display().to_string(),
                if self.backend == Backend::GcpShared {
                    SHARED_KEYS
                } else {
                    ""
                }
            ),
            Backend::Vault => format!(
                "backend = \"hashicorp_vault\"\nvault_addr = {:?}\ntoken_auth {{\n  token = {:?}\n}}\nliveness_kv_mount = \"secret\"\n",
                peers.bao.url,
                peers::OPENBAO_ROOT_TOKEN
            ),
            Backend::Azure => format!(
                "backend = \"azure_key_vault\"\nkey_vault_uri = {:?}\nca_cert_path = {:?}\n",
                peers.azure.vault_url,
                peers.azure.ca_cert.display().to_string()
            ),
            Backend::Pkcs11 => {
                let token = self.token.as_ref().unwrap();
                format!(
                    "backend = \"pkcs11\"\nmodule = {:?}\ntoken_label = {:?}\npin = {:?}\n",
                    token.module.display().to_string(),
                    token.label,
                    token.pin
                )
            }
        };
        format!("{store}key_identifier_value = {sid:?}\n{schedule}")
    }

    /// The environment of every plugin and CLI process of the cell.
    fn env(&self, peers: &Peers) -> Vec<(String, String)> {
        let mut env = vec![(failpoint::GRACE_ENV.to_string(), "0".to_string())];
        if self.backend == Backend::Azure {
            env.push(("IDENTITY_ENDPOINT".into(), peers.azure.identity_endpoint()));
            env.push(("IDENTITY_HEADER".into(), "crash-matrix".into()));
        }
        env
    }

    async fn start(
        &self,
        peers: &Peers,
        busy: bool,
        armed: Option<&str>,
    ) -> Result<PluginProcess, String> {
        let mut env = self.env(peers);
        if let Some(point) = armed {
            env.push((failpoint::ENV.to_string(), point.to_string()));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let plugin = PluginProcess::launch_with_env(Path::new(BIN), &env)
            .await
            .map_err(|e| format!("launch: {e}"))?;
        plugin
            .configure(&self.trust_domain, &self.plugin_data(peers, busy))
            .await
            .map_err(|e| {
                format!(
                    "Configure: {e}; stderr:\n{}",
                    plugin.stderr_lines().join("\n")
                )
            })?;
        Ok(plugin)
    }

    /// The operator's view of this server's keys: `keys list --history --json`.
    async fn store_keys(&self, peers: &Peers) -> Result<Vec<StoreKey>, String> {
        let file = self.dir.path().join("plugin-data.hcl");
        std::fs::write(&file, self.plugin_data(peers, false)).unwrap();
        let mut command = tokio::process::Command::new(BIN);
        command
            // Every server's keys of the trust domain, which is the cell's own.
            .args(["keys", "list", "--all-servers", "--history", "--json"])
            .arg("--plugin-data")
            .arg(&file)
            .args(["--trust-domain", &self.trust_domain]);
        for (k, v) in self.env(peers) {
            command.env(k, v);
        }
        let output = command
            .output()
            .await
            .map_err(|e| format!("run CLI: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "keys list failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let json: Value =
            serde_json::from_slice(&output.stdout).map_err(|e| format!("keys list JSON: {e}"))?;
        Ok(json["keys"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|k| StoreKey {
                key_id: k["key_id"].as_str().unwrap_or_default().to_string(),
                server_id: k["server_id"].as_str().map(str::to_string),
                fingerprint: k["fingerprint"].as_str().map(str::to_string),
                locator: k["locator"].as_str().unwrap_or_default().to_string(),
                state: k["state"].as_str().unwrap_or_default().to_string(),
                served_here: k["served_here"].as_bool().unwrap_or(false),
            })
            .collect())
    }
}

impl Drop for Cell {
    /// A cell's SoftHSM2 token goes with it: the token directory is shared by the run.
    fn drop(&mut self) {
        if let Some(token) = &self.token {
            let _ = std::process::Command::new("softhsm2-util")
                .args(["--delete-token", "--token", &token.label])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// One row of `keys list`.
#[derive(Clone, Debug)]
struct StoreKey {
    key_id: String,
    server_id: Option<String>,
    fingerprint: Option<String>,
    locator: String,
    state: String,
    served_here: bool,
}

impl StoreKey {
    /// Still in the store and usable: not scheduled for deletion or destruction.
    fn live(&self) -> bool {
        self.state != "pending_deletion"
    }
}

/// Leftovers: keys the store holds that discovery does not serve, but for a superseded
/// gcp_kms shared version, which stays for `stale_key_age` by design (other servers may
/// still sign with it).
fn leftovers<'a>(cell: &Cell, keys: &'a [StoreKey]) -> Vec<&'a StoreKey> {
    keys.iter()
        .filter(|k| k.live() && !k.served_here && !cell.kept_by_design(k))
        .collect()
}

fn fingerprint(spki: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(spki))
}

/// Serves and signs: id → fingerprint of the key served, each checked by a signature
/// that verifies against the served public key.
async fn served(plugin: &PluginProcess) -> Result<BTreeMap<String, String>, String> {
    let mut km = plugin.key_manager();
    let keys = km
        .get_public_keys(GetPublicKeysRequest {})
        .await
        .map_err(|e| format!("GetPublicKeys: {e}"))?
        .into_inner()
        .public_keys;
    let mut out = BTreeMap::new();
    for key in keys {
        let message = format!("signed by {} after a crash", key.id);
        let response = km
            .sign_data(SignDataRequest {
                key_id: key.id.clone(),
                data: sha2::Sha256::digest(message.as_bytes()).to_vec(),
                signer_opts: Some(SignerOpts::HashAlgorithm(HashAlgorithm::Sha256 as i32)),
            })
            .await
            .map_err(|e| format!("SignData {}: {e}", key.id))?
            .into_inner();
        let (_, spki) = <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<
            '_,
            _,
        >>::from_der(&key.pkix_data)
        .map_err(|e| format!("{}: SPKI: {e}", key.id))?;
        UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_ASN1,
            spki.subject_public_key.data.as_ref(),
        )
        .verify(message.as_bytes(), &response.signature)
        .map_err(|_| format!("{}: the served key's signature does not verify", key.id))?;
        out.insert(key.id.clone(), fingerprint(&key.pkix_data));
    }
    Ok(out)
}

async fn generate(plugin: &PluginProcess, id: &str) -> Result<String, tonic::Status> {
    plugin
        .key_manager()
        .generate_key(GenerateKeyRequest {
            key_id: id.into(),
            key_type: KeyType::EcP256 as i32,
        })
        .await
        .map(|r| fingerprint(&r.into_inner().public_key.unwrap_or_default().pkix_data))
}

/// Waits for the armed plugin to abort at `point`; an error when it ended otherwise or not
/// at all.
async fn crashed(mut plugin: PluginProcess, point: &str, within: Duration) -> Result<(), String> {
    let status = plugin.wait_exit(within).await.map_err(|e| e.to_string())?;
    let socket_dir = plugin.socket_path().parent().map(Path::to_path_buf);
    // The host's stderr reader may lag the exit by a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stderr = plugin.stderr_lines();
    drop(plugin);
    if let Some(dir) = socket_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    let marker = format!("failpoint {point}@");
    match status {
        None => Err(format!("{point} was never reached within {within:?}")),
        Some(status) if status.signal() == Some(SIGABRT) => {
            if stderr.iter().any(|l| l.contains(&marker)) {
                Ok(())
            } else {
                Err(format!(
                    "aborted, but not at {point}; stderr:\n{}",
                    stderr.join("\n")
                ))
            }
        }
        Some(status) => Err(format!(
            "ended with {status} instead of aborting at {point}; stderr:\n{}",
            stderr.join("\n")
        )),
    }
}

/// `std::process::abort` ends the process with SIGABRT.
const SIGABRT: i32 = 6;

/// Waits until the plugin logged a finished sweep after `since` lines.
async fn swept(plugin: &PluginProcess, since: usize) -> Result<(), String> {
    let deadline = Instant::now() + CRASH_WAIT;
    loop {
        let lines = plugin.stderr_lines();
        if lines
            .iter()
            .skip(since)
            .any(|l| l.contains("stale-key sweep finished"))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no sweep finished within {CRASH_WAIT:?}; stderr:\n{}",
                lines.join("\n")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one cell observed, for the table.
struct Outcome {
    /// "SPIRE's key" or "the new key" for the rotated id.
    served: &'static str,
    /// Leftovers the crash left in the store (keys discovery does not serve).
    leftovers: usize,
    /// A shared id whose GenerateKey crashed is served.
    shared_extra: bool,
    /// A superseded shared version stays (for `stale_key_age`).
    kept_shared: bool,
}

impl Outcome {
    fn describe(&self, drive: Drive, lifecycle: bool) -> String {
        let served = match drive {
            Drive::Rotate => self.served,
            Drive::Stamp | Drive::Sweep => "SPIRE's keys",
        };
        let rest = match (self.leftovers, lifecycle) {
            (0, _) => "nothing left over".to_string(),
            (n, true) => format!("{n} leftover{} removed by the next sweep", plural(n)),
            (n, false) => format!("{n} leftover{}", plural(n)),
        };
        let extra = if self.shared_extra {
            "; the shared id whose GenerateKey crashed is served too"
        } else {
            ""
        };
        let kept = if self.kept_shared {
            "; SPIRE's superseded shared version stays for `stale_key_age`"
        } else {
            ""
        };
        format!("{served} served{extra}; {rest}{kept}")
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

async fn run_cell(cell: &Cell, peers: &Peers) -> Result<String, String> {
    let drive = drive_of(cell.point);
    let lifecycle = cell.backend != Backend::Disk;

    // SPIRE's keys, made without a crash.
    let plugin = cell.start(peers, false, None).await?;
    let mut spire = BTreeMap::new();
    for id in IDS {
        let fp = generate(&plugin, id)
            .await
            .map_err(|e| format!("GenerateKey {id}: {e}"))?;
        spire.insert(id.to_string(), fp);
    }
    plugin.shutdown().await.map_err(|e| e.to_string())?;

    if drive == Drive::Sweep {
        // Leftovers for the sweep to delete: two new ids whose GenerateKey crashed after
        // prepare.
        for id in LEFTOVER_IDS {
            let plugin = cell
                .start(peers, false, Some("generate.after_prepare"))
                .await?;
            let reply = generate(&plugin, id).await;
            if reply.is_ok() {
                return Err(format!("GenerateKey {id} answered despite the failpoint"));
            }
            crashed(plugin, "generate.after_prepare", CRASH_WAIT).await?;
        }
    }
    let before: BTreeSet<String> = cell
        .store_keys(peers)
        .await?
        .into_iter()
        .map(|k| k.locator)
        .collect();

    // The crash.
    let armed = match cell.point {
        // Half-way: after the first of two keys stamped or deleted.
        "stamp.after_key" | "sweep.after_delete" => format!("{}@1", cell.point),
        point => point.to_string(),
    };
    let plugin = cell
        .start(peers, drive != Drive::Rotate, Some(&armed))
        .await?;
    cell.past_reuse_window().await;
    if drive == Drive::Rotate
        && let Ok(fp) = generate(&plugin, cell.rotated()).await
    {
        return Err(format!(
            "the rotation answered ({fp}) despite the failpoint"
        ));
    }
    crashed(plugin, cell.point, CRASH_WAIT).await?;
    let after_crash = cell.store_keys(peers).await?;
    let left = leftovers(cell, &after_crash).len();
    let kept = after_crash
        .iter()
        .filter(|k| k.live() && !k.served_here && cell.kept_by_design(k))
        .count();

    // The restart.
    let plugin = cell.start(peers, true, None).await?;
    let since = plugin.stderr_lines().len();
    let now = served(&plugin).await?;
    // A shared id whose GenerateKey crashed after prepare is found by every server: the
    // shared CryptoKey exists (gcp_kms shared keys only).
    let extra: Vec<&String> = now.keys().filter(|id| !spire.contains_key(*id)).collect();
    let shared_extra = cell.backend == Backend::GcpShared
        && drive == Drive::Sweep
        && extra.iter().all(|id| *id == LEFTOVER_IDS[1]);
    if spire.keys().any(|id| !now.contains_key(id)) || (!extra.is_empty() && !shared_extra) {
        return Err(format!(
            "the restart serves ids {:?}, SPIRE holds {:?}",
            now.keys().collect::<Vec<_>>(),
            spire.keys().collect::<Vec<_>>()
        ));
    }
    let mut outcome = Outcome {
        served: "SPIRE's key",
        leftovers: left,
        shared_extra: !extra.is_empty(),
        kept_shared: kept > 0,
    };
    let store = cell.store_keys(peers).await?;
    for (id, fp) in &now {
        let row = store
            .iter()
            .find(|k| k.fingerprint.as_deref() == Some(fp.as_str()) && k.served_here)
            .ok_or_else(|| format!("{id}: the served key {fp} is not in the store's listing"))?;
        if !row.live() {
            return Err(format!(
                "{id}: the served key {} is {}",
                row.locator, row.state
            ));
        }
        let Some(spires) = spire.get(id) else {
            continue; // the shared id above
        };
        if fp != spires {
            // Only the rotated id may have moved on, and only to the key the crashed step
            // created.
            if drive != Drive::Rotate || id != cell.rotated() || before.contains(&row.locator) {
                return Err(format!(
                    "{id}: serves {fp}, neither SPIRE's key {spires} nor one the crashed step created"
                ));
            }
            outcome.served = "the new key";
        }
    }
    if lifecycle {
        swept(&plugin, since).await?;
    }
    let store = cell.store_keys(peers).await?;
    let rest = leftovers(cell, &store);
    if !rest.is_empty() {
        return Err(format!(
            "after the next sweep the store still holds keys nobody serves: {:?}",
            rest.iter()
                .map(|k| format!("{} {} ({})", k.key_id, k.locator, k.state))
                .collect::<Vec<_>>()
        ));
    }
    if cell.backend == Backend::Disk {
        let extra: Vec<String> = std::fs::read_dir(cell.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !["keys.json", "keys.json.lock", "plugin-data.hcl"].contains(&n.as_str()))
            .collect();
        if !extra.is_empty() {
            return Err(format!("files beside keys.json: {extra:?}"));
        }
    }
    // SPIRE can rotate again: the crash left nothing in the way (a lock, a second active
    // key), and the store again holds exactly the served keys.
    let previous = now[cell.rotated()].clone();
    cell.past_reuse_window().await;
    let rotated = generate(&plugin, cell.rotated())
        .await
        .map_err(|e| format!("GenerateKey {} after the restart: {e}", cell.rotated()))?;
    if rotated == previous {
        return Err(format!(
            "GenerateKey {} after the restart answered the key already served ({rotated})",
            cell.rotated()
        ));
    }
    let now = served(&plugin).await?;
    if now[cell.rotated()] != rotated {
        return Err(format!(
            "{} was rotated to {rotated} after the restart but serves {}",
            cell.rotated(),
            now[cell.rotated()]
        ));
    }
    let store = cell.store_keys(peers).await?;
    let live: BTreeSet<&str> = store
        .iter()
        .filter(|k| k.live() && (k.served_here || !cell.kept_by_design(k)))
        .filter_map(|k| k.fingerprint.as_deref())
        .collect();
    let wanted: BTreeSet<&str> = now.values().map(String::as_str).collect();
    if live != wanted || !leftovers(cell, &store).is_empty() {
        return Err(format!(
            "after a rotation following the restart the store's live keys are {live:?}, the served ones {wanted:?}"
        ));
    }
    let report = plugin.shutdown().await.map_err(|e| e.to_string())?;
    if !report.graceful {
        return Err("the restarted plugin did not shut down gracefully".into());
    }
    Ok(outcome.describe(drive, lifecycle))
}

fn table(results: &BTreeMap<(usize, Backend), String>) -> String {
    let mut out = String::from("| step |");
    for b in Backend::ALL {
        out.push_str(&format!(" {} |", b.column()));
    }
    out.push_str("\n|---|");
    for _ in Backend::ALL {
        out.push_str("---|");
    }
    out.push('\n');
    for (i, (point, _)) in failpoint::POINTS.iter().enumerate() {
        out.push_str(&format!("| `{point}` |"));
        for b in Backend::ALL {
            let cell = match b.lacks(point) {
                Some(why) => format!("— ({why})"),
                None => results[&(i, b)].clone(),
            };
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out
}

/// The table inside `docs/reliability.md`'s section (between its first and last table line).
fn documented_table(doc: &str) -> Option<String> {
    let section = &doc[doc.find(SECTION)?..];
    let end = section[SECTION.len()..]
        .find("\n## ")
        .map_or(section.len(), |i| i + SECTION.len());
    let lines: Vec<&str> = section[..end]
        .lines()
        .skip_while(|l| !l.starts_with("| step |"))
        .take_while(|l| l.starts_with('|'))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n") + "\n")
}

fn update_doc(path: &Path, table: &str) {
    let doc = std::fs::read_to_string(path).unwrap();
    let old = documented_table(&doc).expect("the section has a table to replace");
    std::fs::write(path, doc.replacen(&old, table, 1)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_at_every_step_of_every_backend_keeps_spires_keys_and_leaves_nothing() {
    let started = Instant::now();
    let peers = Arc::new(tokio::task::spawn_blocking(start_peers).await.unwrap());
    let peers_ready = started.elapsed();
    let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut tasks = Vec::new();
    let mut n = 0;
    for (i, (point, _)) in failpoint::POINTS.iter().enumerate() {
        for backend in Backend::ALL {
            if backend.lacks(point).is_some() {
                continue;
            }
            n += 1;
            let cell = Cell::new(backend, point, n);
            let peers = peers.clone();
            let limit = limit.clone();
            tasks.push(tokio::spawn(async move {
                let _slot = limit.acquire().await.unwrap();
                let t = Instant::now();
                let result = run_cell(&cell, &peers).await;
                eprintln!(
                    "{:>6.1?} {:<28} {:<24} {}",
                    t.elapsed(),
                    cell.point,
                    cell.backend.column(),
                    match &result {
                        Ok(outcome) => outcome.clone(),
                        Err(e) => format!("FAILED: {e}"),
                    }
                );
                ((i, backend), result)
            }));
        }
    }
    let mut results = BTreeMap::new();
    let mut failures = Vec::new();
    for task in tasks {
        let ((i, backend), result) = task.await.unwrap();
        match result {
            Ok(outcome) => {
                results.insert((i, backend), outcome);
            }
            Err(e) => failures.push(format!(
                "{} on {}: {e}",
                failpoint::POINTS[i].0,
                backend.column()
            )),
        }
    }
    let _ = std::fs::remove_file(&peers.gcp_account);
    eprintln!(
        "{n} cells in {:.1?} (peers ready after {:.1?})",
        started.elapsed(),
        peers_ready
    );
    assert!(
        failures.is_empty(),
        "{} of {n} cells failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    let table = table(&results);
    eprintln!("{table}");
    let doc = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(DOC);
    if std::env::var_os("CRASH_MATRIX_UPDATE").is_some() {
        update_doc(&doc, &table);
    }
    let text = std::fs::read_to_string(&doc).unwrap_or_default();
    assert_eq!(
        documented_table(&text).as_deref(),
        Some(table.as_str()),
        "{DOC} ({SECTION}) does not hold this run's table; rerun with CRASH_MATRIX_UPDATE=1 to write it"
    );
}
