//! The operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use sha2::Digest as _;

/// Keeps a SPIFFE trust domain's signing keys in a KMS or HSM and signs with them there.
///
/// Started by spire-server (as a KeyManager `plugin_cmd`), this binary serves the plugin
/// protocol. Run by hand, it is this CLI.
#[derive(Parser)]
#[command(name = "kms-keymanager", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the plugin end to end on the embedded `disk` backend: generate a CA key and a JWT
    /// key through SignData, mint a CA certificate, an X.509-SVID and a JWT-SVID, and verify
    /// them with an independent library.
    Demo(crate::demo::DemoArgs),
    /// Measure SignData latency and throughput through the plugin socket against in-process
    /// signing, plus idle memory and start-up time.
    Bench(crate::bench::BenchArgs),
    /// Print the SHA-256 of a plugin binary, for `plugin_checksum` in server.conf.
    Checksum {
        /// The binary (default: this one).
        path: Option<PathBuf>,
    },
    /// Inspect and manage the trust domain's keys in the store (list, inspect, prune,
    /// disable, enable, delete), configured from SPIRE's server.conf.
    #[command(subcommand)]
    Keys(crate::operator::keys::KeysCommand),
    /// Check the configuration, credentials, permissions and keys, read-only; exits 1 if a
    /// check fails.
    Doctor(crate::operator::doctor::DoctorArgs),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let operator = match cli.command {
        Command::Keys(command) => Some(operator(crate::operator::keys::run(command))),
        Command::Doctor(args) => Some(operator(crate::operator::doctor::run(args))),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "kms-keymanager",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        other => {
            return legacy(other);
        }
    };
    match operator {
        Some(Ok(())) | None => ExitCode::SUCCESS,
        Some(Err(failure)) => failure.report(),
    }
}

/// Runs an operator command with warnings (never secrets) on stderr.
fn operator(
    command: impl std::future::Future<Output = Result<(), crate::operator::Failure>>,
) -> Result<(), crate::operator::Failure> {
    init_cli_logging();
    runtime()
        .map_err(crate::operator::Failure::store_message)?
        .block_on(command)
}

/// Warnings and errors of the backends on stderr; `KMS_KEYMANAGER_LOG=debug` for more.
fn init_cli_logging() {
    let level = match std::env::var("KMS_KEYMANAGER_LOG").as_deref() {
        Ok("debug") => tracing::Level::DEBUG,
        Ok("info") => tracing::Level::INFO,
        Ok("error") => tracing::Level::ERROR,
        _ => tracing::Level::WARN,
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .try_init();
}

fn legacy(command: Command) -> ExitCode {
    let result = match command {
        Command::Demo(args) => runtime().and_then(|rt| rt.block_on(crate::demo::run(args))),
        Command::Bench(args) => runtime().and_then(|rt| rt.block_on(crate::bench::run(args))),
        Command::Checksum { path } => checksum(path),
        Command::Keys(_) | Command::Doctor(_) | Command::Completions { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn checksum(path: Option<PathBuf>) -> Result<(), String> {
    let path = match path {
        Some(path) => path,
        None => std::env::current_exe().map_err(|e| format!("cannot locate this binary: {e}"))?,
    };
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    println!("{}", hex::encode(sha2::Sha256::digest(&bytes)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
