//! Generated protobuf and tonic code for every service the plugin speaks.
//!
//! The `.proto` sources live in `proto/` at the workspace root; regenerate with
//! `cargo run -p xtask -- gen-proto`. The output is committed so that a build never needs
//! `protoc` or a protobuf compiler at all.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// hashicorp/go-plugin's internal services: broker, controller, stdio.
pub mod goplugin {
    include!("generated/plugin.rs");
}

/// SPIRE's private Init service.
pub mod init {
    include!("generated/spire.service.private.init.v1.rs");
}

/// SPIRE's common Config service.
pub mod config {
    include!("generated/spire.service.common.config.v1.rs");
}

/// SPIRE's server KeyManager v1 service.
pub mod keymanager {
    include!("generated/spire.plugin.server.keymanager.v1.rs");
}

/// Fully qualified gRPC service names, as advertised by Init.
pub mod service_names {
    /// The server KeyManager service (note the capital M: the proto comment's spelling is wrong).
    pub const KEY_MANAGER: &str = "spire.plugin.server.keymanager.v1.KeyManager";
    /// The common Config service.
    pub const CONFIG: &str = "spire.service.common.config.v1.Config";
}
