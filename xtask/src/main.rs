//! Developer tasks. `cargo run -p xtask -- gen-proto` regenerates the committed gRPC code
//! from `proto/` with the pure-Rust `protox` compiler, so no `protoc` is ever needed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const PROTO_FILES: &[&str] = &[
    "goplugin/goplugin.proto",
    "spire/init/init.proto",
    "spire/config/config.proto",
    "spire/keymanager/keymanager.proto",
];

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "gen-proto" => gen_proto(),
        _ => Err("usage: cargo run -p xtask -- gen-proto".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where the generated code is committed.
fn committed_dir() -> PathBuf {
    workspace_root().join("crates/keymanager-proto/src/generated")
}

fn gen_proto() -> Result<(), String> {
    let out_dir = committed_dir();
    generate_into(&out_dir)?;
    println!("generated code written to {}", out_dir.display());
    Ok(())
}

/// Compiles `proto/` and writes the Rust code into `out_dir`.
fn generate_into(out_dir: &Path) -> Result<(), String> {
    let proto_dir = workspace_root().join("proto");
    let descriptors = protox::compile(PROTO_FILES, [&proto_dir]).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(out_dir).map_err(|e| e.to_string())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .out_dir(out_dir)
        .compile_fds(descriptors)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI's check that nobody edited `proto/` without regenerating (run by `cargo test`, so
    /// it needs no build of its own).
    #[test]
    fn committed_generated_code_is_current() {
        let out = std::env::temp_dir().join(format!("xtask-gen-proto-{}", std::process::id()));
        generate_into(&out).expect("generation works");
        let mut names: Vec<_> = std::fs::read_dir(&out)
            .expect("generated files")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert!(!names.is_empty());
        for name in names {
            let fresh = std::fs::read_to_string(out.join(&name)).expect("fresh file");
            let committed = std::fs::read_to_string(committed_dir().join(&name))
                .unwrap_or_else(|_| panic!("{name:?} is generated but not committed"));
            assert!(
                fresh == committed,
                "{name:?} is out of date: run `cargo run -p xtask -- gen-proto`"
            );
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}
