//! `kms-keymanager`: a SPIRE server KeyManager plugin when SPIRE starts it (the
//! `KeyManager=KeyManager` magic cookie is set), an operator CLI otherwise.

mod bench;
mod bench_handover;
mod bench_telemetry;
mod cli;
mod demo;
mod operator;
mod svid;

use std::process::ExitCode;

use keymanager_backend_aws::AwsKmsFactory;
use keymanager_backend_azure::AzureFactory;
use keymanager_backend_disk::DiskFactory;
use keymanager_backend_gcp::GcpKmsFactory;
use keymanager_backend_pkcs11::Pkcs11Factory;
use keymanager_backend_vault::VaultFactory;
use keymanager_engine::BackendFactory;

// Every RPC allocates in hyper/h2/prost on both sides of the socket; mimalloc measurably
// shortens that path (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Every backend compiled into this binary, selected by `backend = "<name>"` in plugin_data.
pub const BACKENDS: &[&'static dyn BackendFactory] = &[
    &DiskFactory,
    &AwsKmsFactory::new(),
    &GcpKmsFactory::new(),
    &VaultFactory::new(),
    &AzureFactory::new(),
    &Pkcs11Factory::new(),
];

fn main() -> ExitCode {
    // A test build's crash point (see README, "Failpoints"); a typo must not pass silently.
    match keymanager_engine::failpoint::armed() {
        Ok(None) => {}
        Ok(Some(armed)) => eprintln!(
            "failpoint {}@{} armed: this process aborts there",
            armed.name, armed.nth
        ),
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    }
    if keymanager_plugin::is_launched_by_host() {
        return keymanager_plugin::serve(BACKENDS);
    }
    cli::run()
}
