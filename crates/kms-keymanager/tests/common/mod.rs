//! What the binary's integration tests share: the backends the plugin is built with, a
//! plugin configured in-process, and the CLI run as the real binary with its output kept
//! for the planted-secret scan and checked for secrets and key material.

#![allow(dead_code, reason = "each test binary uses the part it needs")]

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use keymanager_backend_aws::AwsKmsFactory;
use keymanager_backend_disk::DiskFactory;
use keymanager_backend_gcp::GcpKmsFactory;
use keymanager_engine::{BackendFactory, CoreConfig, KeyId, KeyService};
use keymanager_plugin::PluginState;
use keymanager_plugin::logging::LogControl;
use serde_json::Value;

static AWS: AwsKmsFactory = AwsKmsFactory::new();
static GCP: GcpKmsFactory = GcpKmsFactory::new();
/// The backends these tests configure (the binary has more; these need no extra peer set-up).
pub static BACKENDS: &[&dyn BackendFactory] = &[&DiskFactory, &AWS, &GCP];

/// The plugin's state before Configure.
pub fn state() -> PluginState {
    PluginState::new(BACKENDS, LogControl::detached())
}

/// A plugin configured for trust domain `td` with `plugin_data`, and its KeyManager service.
pub async fn server(td: &str, plugin_data: &str) -> (PluginState, Arc<dyn KeyService>) {
    let state = state();
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

pub fn id(s: &str) -> KeyId {
    KeyId::new(s).expect("key id")
}

/// The CLI's outcome: exit code, stdout (JSON when asked), stderr.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs `kms-keymanager ARGS` as the real binary.
pub fn run(args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_kms-keymanager"))
        .args(args)
        .output()
        .expect("run kms-keymanager");
    keymanager_conformance::logs::keep_cli_log(args, &output);
    checked(output)
}

/// [`run`] with `--plugin-data FILE --trust-domain TD` appended.
pub fn run_on(plugin_data: &Path, trust_domain: &str, args: &[&str]) -> Run {
    let file = plugin_data.display().to_string();
    let mut all = args.to_vec();
    all.extend(["--plugin-data", &file, "--trust-domain", trust_domain]);
    run(&all)
}

/// The outcome, checked: no planted secret and no private key printed.
pub fn checked(output: Output) -> Run {
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
