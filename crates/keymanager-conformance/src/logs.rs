//! Test logs and planted secrets (issue #14 §6).
//!
//! Every secret a test configures contains [`PLANTED`], or, where a peer dictates its form
//! (an RSA key, a token the peer issued), is registered with [`register_secret`]; after the
//! run `scripts/scan-secrets.py` fails if any of them shows up in a log the tests produced.
//! The logs go to `KMS_KEYMANAGER_TEST_LOG_DIR` (`scripts/test-all.sh` sets it; unset, nothing
//! is written): `rust/` for the backends' own tracing output during the conformance suite
//! ([`capture_tracing`]), plugin stderr (`keymanager-host`) and CLI output ([`keep_log`]),
//! `planted-secrets/` for the registry.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The marker in every planted secret.
pub const PLANTED: &str = "PLANTED-SECRET-";

/// The environment variable naming the directory the tests write their logs to.
pub const LOG_DIR_VAR: &str = "KMS_KEYMANAGER_TEST_LOG_DIR";

/// The planted AWS access key id every Rust test that talks to an AWS peer configures.
pub const AWS_ACCESS_KEY_ID: &str = "PLANTED-SECRET-aws-access-key-id";
/// The planted AWS secret access key.
pub const AWS_SECRET_ACCESS_KEY: &str = "PLANTED-SECRET-aws-secret-access-key";

/// The test log directory's `sub` directory (created), if the run has one.
pub fn log_dir(sub: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(LOG_DIR_VAR)?).join(sub);
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh file name `rust/<name>-<pid>-<n>.log` (name made file-safe), if the run has a log dir.
pub fn log_path(name: &str) -> Option<PathBuf> {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    Some(log_dir("rust")?.join(format!("{safe}-{}-{n}.log", std::process::id())))
}

/// Writes `text` (a CLI's output, a plugin's stderr) to a fresh log file for the scan.
pub fn keep_log(name: &str, text: &str) {
    if let Some(path) = log_path(name) {
        let _ = std::fs::write(path, text);
    }
}

/// Keeps a CLI run's command line, exit status and output (`kms-keymanager ARGS…`).
pub fn keep_cli_log(args: &[&str], output: &std::process::Output) {
    keep_log(
        "cli",
        &format!(
            "$ kms-keymanager {}\n--- {}, stdout:\n{}--- stderr:\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    );
}

/// Adds a secret a peer generated (or one that cannot carry the marker) to the scan's registry.
pub fn register_secret(label: &str, value: &str) {
    let Some(dir) = log_dir("planted-secrets") else {
        return;
    };
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let _ = std::fs::write(
        dir.join(format!("rust-{label}-{}-{n}", std::process::id())),
        value,
    );
}

/// Registers two base64 lines from the middle of a PEM private key (the first lines of every
/// PKCS#8 RSA key look alike): any copy of the key in a log holds them whole.
pub fn register_pem_key(label: &str, pem: &str) {
    let lines: Vec<&str> = pem.trim().lines().collect();
    if lines.len() >= 8 {
        register_secret(&format!("{label}-a"), lines[lines.len() / 2]);
        register_secret(&format!("{label}-b"), lines[lines.len() / 2 + 2]);
    }
}

/// Sends this test binary's tracing output (the project's crates at TRACE, others at WARN)
/// to `rust/tracing-<binary>-<pid>.log`, once per process, if the run has a log dir: the
/// backends' own log lines are scanned for planted secrets at their most verbose.
pub fn capture_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let binary = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "test".into());
        let Some(path) = log_path(&format!("tracing-{binary}")) else {
            return;
        };
        let Ok(file) = OpenOptions::new().create(true).append(true).open(path) else {
            return;
        };
        use tracing_subscriber::layer::SubscriberExt;
        let targets = tracing_subscriber::filter::Targets::new()
            .with_default(tracing::Level::WARN)
            .with_targets(
                [
                    "keymanager_engine",
                    "keymanager_plugin",
                    "keymanager_backend_aws",
                    "keymanager_backend_azure",
                    "keymanager_backend_disk",
                    "keymanager_backend_gcp",
                    "keymanager_backend_pkcs11",
                    "keymanager_backend_vault",
                    "kms_keymanager",
                ]
                .map(|t| (t, tracing::Level::TRACE)),
            );
        let subscriber = tracing_subscriber::registry().with(targets).with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(Mutex::new(file)),
        );
        // Another subscriber may already be installed (a test of logging itself): keep it.
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_constants_carry_the_marker() {
        for value in [AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY] {
            assert!(value.starts_with(PLANTED), "{value}");
        }
    }
}
