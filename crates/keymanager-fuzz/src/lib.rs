//! Fuzz targets: one function per target, called by the AFL binaries in `fuzz/` and by the
//! corpus regression test (`tests/corpus.rs`), so a crash found by a campaign is replayed by
//! CI from then on.
//!
//! Every target takes arbitrary bytes and panics only when a property fails (a panic in the
//! code under test is a failure too): parsers must refuse junk with an error, round trips
//! must hold, and requests SPIRE could send must be answered with the right gRPC code.

pub mod ecdsa_der;
pub mod key_file;
pub mod names;
pub mod plugin_data;
pub mod private_key;
pub mod request;
mod work_dir;

use keymanager_engine::BackendFactory;

/// A fuzz target: a name (its corpus directory under `fuzz/corpus/`) and its function.
pub struct Target {
    /// Name of the target, its AFL binary and its corpus directory.
    pub name: &'static str,
    /// Runs one input; panics when a property fails.
    pub run: fn(&[u8]),
}

/// Every target, in the order the campaign runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "plugin_data",
        run: plugin_data::run,
    },
    Target {
        name: "key_file",
        run: key_file::run,
    },
    Target {
        name: "private_key",
        run: private_key::run,
    },
    Target {
        name: "names",
        run: names::run,
    },
    Target {
        name: "request",
        run: request::run,
    },
    Target {
        name: "ecdsa_der",
        run: ecdsa_der::run,
    },
];

/// The backends the binary registers (`crates/kms-keymanager/src/main.rs`).
pub static BACKENDS: &[&'static dyn BackendFactory] = &[
    &keymanager_backend_disk::DiskFactory,
    &keymanager_backend_aws::AwsKmsFactory::new(),
    &keymanager_backend_gcp::GcpKmsFactory::new(),
    &keymanager_backend_vault::VaultFactory::new(),
    &keymanager_backend_azure::AzureFactory::new(),
    &keymanager_backend_pkcs11::Pkcs11Factory::new(),
];

/// Splits an input into text fields at NUL bytes (lossy UTF-8), for targets that take
/// several strings.
pub(crate) fn fields(data: &[u8]) -> Vec<String> {
    data.split(|&b| b == 0)
        .map(|field| String::from_utf8_lossy(field).into_owned())
        .collect()
}
