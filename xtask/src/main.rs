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

fn gen_proto() -> Result<(), String> {
    let root = workspace_root();
    let proto_dir = root.join("proto");
    let out_dir = root.join("crates/keymanager-proto/src/generated");
    let descriptors = protox::compile(PROTO_FILES, [&proto_dir]).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .out_dir(&out_dir)
        .compile_fds(descriptors)
        .map_err(|e| e.to_string())?;
    println!("generated code written to {}", out_dir.display());
    Ok(())
}
