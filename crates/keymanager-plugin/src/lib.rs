//! The SPIRE server KeyManager plugin runtime.
//!
//! [`serve`] does what hashicorp/go-plugin's server side does for a Go plugin (magic-cookie
//! check, private unix socket, handshake line, broker/controller/stdio/health services) and
//! serves SPIRE's Init, Config and KeyManager services on top of the key engine. Backends
//! are passed in as [`BackendFactory`](keymanager_engine::BackendFactory)s, so this crate
//! knows none of them.

mod config_service;
mod goplugin;
mod handshake;
pub mod hcl_settings;
mod init_service;
mod keymanager_service;
pub mod logging;
mod plugin_config;
mod state;
mod status;
pub mod wire;

pub use handshake::{HandshakeError, MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE, is_launched_by_host};
pub use keymanager_service::KeyManagerService;
pub use plugin_config::{MigrateFrom, PluginConfig, parse_plugin_config};
pub use state::PluginState;
pub use status::{RequestError, engine_error_to_status, request_error_to_status};

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use keymanager_engine::BackendFactory;
use keymanager_proto::config::config_server::ConfigServer;
use keymanager_proto::goplugin::grpc_broker_server::GrpcBrokerServer;
use keymanager_proto::goplugin::grpc_controller_server::GrpcControllerServer;
use keymanager_proto::goplugin::grpc_stdio_server::GrpcStdioServer;
use keymanager_proto::init::init_server::InitServer;
use keymanager_proto::keymanager::key_manager_server::KeyManagerServer;
use tokio_stream::wrappers::UnixListenerStream;

/// How long the process may take to stop after Shutdown before it exits regardless.
/// go-plugin's host kills a plugin that is still alive 2 s after closing it.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// Runs the plugin until the host shuts it down. Must be called before anything writes to
/// stdout: the handshake line has to be the first line there.
pub fn serve(backends: &'static [&'static dyn BackendFactory]) -> ExitCode {
    let log_control = logging::init_plugin_logging();
    if let Err(error) = handshake::check_environment() {
        // Printed plainly, like go-plugin does when a plugin is run by hand.
        eprintln!("{error}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(backends, log_control)) {
        Ok(()) => {
            // Blocking tasks (an RSA key generation, say) must not hold the exit up.
            runtime.shutdown_timeout(Duration::from_millis(100));
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "plugin failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    backends: &'static [&'static dyn BackendFactory],
    log_control: logging::LogControl,
) -> Result<(), HandshakeError> {
    let mut socket = handshake::PluginSocket::bind()?;
    let shutdown = goplugin::ShutdownSignal::new();
    let state = Arc::new(PluginState::new(backends, log_control));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("plugin", tonic_health::ServingStatus::Serving)
        .await;

    let listener = socket.take_listener()?;
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(GrpcBrokerServer::new(goplugin::Broker::new(
            shutdown.clone(),
        )))
        .add_service(GrpcControllerServer::new(goplugin::Controller::new(
            shutdown.clone(),
        )))
        .add_service(GrpcStdioServer::new(goplugin::Stdio::new(shutdown.clone())))
        .add_service(InitServer::new(init_service::InitService::new(
            state.clone(),
        )))
        .add_service(ConfigServer::new(config_service::ConfigService::new(
            state.clone(),
        )))
        .add_service(KeyManagerServer::new(
            keymanager_service::KeyManagerService::new(state.clone()),
        ));

    // The socket is bound before the handshake line is printed, so the host can dial at once.
    handshake::print_handshake_line(socket.path())?;
    tracing::info!(
        socket = %socket.path().display(),
        version = env!("CARGO_PKG_VERSION"),
        "plugin serving"
    );
    tokio::spawn(handshake::ignore_interrupts());
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            handshake::terminate_signal().await;
            tracing::info!("SIGTERM received; exiting");
            shutdown.trigger();
        });
    }

    let graceful = server.serve_with_incoming_shutdown(UnixListenerStream::new(listener), {
        let shutdown = shutdown.clone();
        async move { shutdown.wait().await }
    });
    // In-flight calls get a short grace period; the host would SIGKILL us after 2 s anyway.
    let deadline = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.wait().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        }
    };
    tokio::select! {
        result = graceful => {
            if let Err(error) = result {
                tracing::error!(%error, "gRPC server error");
            }
        }
        () = deadline => tracing::warn!("in-flight calls did not finish within the shutdown grace period"),
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), state.close()).await;
    drop(socket); // removes the private socket directory
    Ok(())
}
