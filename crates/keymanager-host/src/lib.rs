//! Launches a KeyManager plugin exactly as SPIRE's catalog (hashicorp/go-plugin's client)
//! does: same environment, handshake parsing, plaintext gRPC over the unix socket, broker
//! and stdio streams, Init, Configure, and on close Deinit → broker close → Shutdown → a 2 s
//! wait before a kill. Used by `kms-keymanager demo`, `bench` and the integration tests.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use keymanager_proto::config::config_client::ConfigClient;
use keymanager_proto::config::{
    ConfigureRequest, CoreConfiguration, ValidateRequest, ValidateResponse,
};
use keymanager_proto::goplugin::grpc_broker_client::GrpcBrokerClient;
use keymanager_proto::goplugin::grpc_controller_client::GrpcControllerClient;
use keymanager_proto::goplugin::grpc_stdio_client::GrpcStdioClient;
use keymanager_proto::goplugin::{ConnInfo, Empty};
use keymanager_proto::init::init_client::InitClient;
use keymanager_proto::init::{DeinitRequest, InitRequest};
use keymanager_proto::keymanager::key_manager_client::KeyManagerClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

/// SPIRE's go-plugin client waits this long for the handshake line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// ... and this long for the process to exit after Shutdown before killing it.
pub const EXIT_GRACE: Duration = Duration::from_secs(2);
/// SPIRE's Deinit deadline.
const DEINIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The host services SPIRE's server offers over the broker.
const HOST_SERVICES: &[&str] = &[
    "spire.hostservice.server.identityprovider.v1.IdentityProvider",
    "spire.hostservice.server.agentstore.v1.AgentStore",
    "spire.hostservice.common.metrics.v1.Metrics",
];

/// Why launching or talking to the plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The process could not be started.
    #[error("cannot start plugin {path}: {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No or a bad handshake line.
    #[error("plugin handshake failed: {0}")]
    Handshake(String),
    /// The socket could not be dialled.
    #[error("cannot connect to the plugin socket: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// An RPC failed.
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
    /// Waiting for the process failed.
    #[error("waiting for the plugin failed: {0}")]
    Wait(std::io::Error),
}

/// How the plugin ended.
#[derive(Debug)]
pub struct ExitReport {
    /// True when it exited by itself within the 2 s grace period after Shutdown.
    pub graceful: bool,
    /// Its exit status.
    pub status: Option<ExitStatus>,
    /// Time from the Shutdown call to process exit.
    pub exit_latency: Duration,
}

/// With `KMS_KEYMANAGER_TEST_LOG_DIR` set (the test runs), a file under its `rust/` that
/// receives a copy of the plugin's stderr, for the planted-secret scan
/// (`scripts/scan-secrets.py`).
fn stderr_log_file(child: Option<u32>) -> Option<std::fs::File> {
    let dir = PathBuf::from(std::env::var_os("KMS_KEYMANAGER_TEST_LOG_DIR")?).join("rust");
    std::fs::create_dir_all(&dir).ok()?;
    let name = format!(
        "plugin-stderr-{}-{}.log",
        std::process::id(),
        child.unwrap_or_default()
    );
    std::fs::File::create(dir.join(name)).ok()
}

/// A running plugin process and its gRPC clients.
pub struct PluginProcess {
    child: Child,
    channel: Channel,
    socket_path: PathBuf,
    handshake_latency: Duration,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout_after_handshake: Arc<Mutex<Vec<String>>>,
    broker: Option<tokio::sync::mpsc::Sender<ConnInfo>>,
}

impl PluginProcess {
    /// Starts `binary` the way SPIRE does and performs the handshake, broker set-up and Init.
    pub async fn launch(binary: &Path) -> Result<Self, HostError> {
        Self::launch_with_env(binary, &[]).await
    }

    /// Like [`PluginProcess::launch`], with extra environment variables.
    pub async fn launch_with_env(
        binary: &Path,
        extra_env: &[(&str, &str)],
    ) -> Result<Self, HostError> {
        let started = Instant::now();
        let mut command = Command::new(binary);
        command
            .env("KeyManager", "KeyManager")
            .env("PLUGIN_PROTOCOL_VERSIONS", "1")
            .env("PLUGIN_MIN_PORT", "10000")
            .env("PLUGIN_MAX_PORT", "25000")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let mut child = command.spawn().map_err(|source| HostError::Spawn {
            path: binary.to_path_buf(),
            source,
        })?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(pipe) = child.stderr.take() {
            let sink = stderr.clone();
            let mut tee = stderr_log_file(child.id());
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(file) = tee.as_mut() {
                        let _ = writeln!(file, "{line}");
                    }
                    let mut sink = sink.lock().unwrap_or_else(PoisonError::into_inner);
                    if sink.len() < 100_000 {
                        sink.push(line);
                    }
                }
            });
        }
        let pipe = child
            .stdout
            .take()
            .ok_or_else(|| HostError::Handshake("no stdout pipe".into()))?;
        let mut stdout = BufReader::new(pipe).lines();
        let line = match tokio::time::timeout(HANDSHAKE_TIMEOUT, stdout.next_line()).await {
            Err(_) => {
                return Err(HostError::Handshake(
                    "timeout while waiting for plugin to start".into(),
                ));
            }
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                let status = child.wait().await.ok();
                tokio::time::sleep(Duration::from_millis(50)).await;
                let stderr = stderr
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .join("\n");
                return Err(HostError::Handshake(format!(
                    "plugin exited before we could connect ({status:?}); stderr: {stderr}"
                )));
            }
            Ok(Err(e)) => return Err(HostError::Handshake(format!("reading stdout: {e}"))),
        };
        let handshake_latency = started.elapsed();
        let socket_path = parse_handshake(&line)?;
        // Like go-plugin, later stdout lines are read and dropped; we keep them to assert on.
        let stdout_after_handshake = Arc::new(Mutex::new(Vec::new()));
        {
            let sink = stdout_after_handshake.clone();
            tokio::spawn(async move {
                while let Ok(Some(line)) = stdout.next_line().await {
                    sink.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(line);
                }
            });
        }
        let channel = connect(&socket_path).await?;

        // The broker stream: SPIRE announces its host-service listener (id 1) at once.
        let (broker_tx, broker_rx) = tokio::sync::mpsc::channel(4);
        let mut broker = GrpcBrokerClient::new(channel.clone());
        let outbound = tokio_stream::wrappers::ReceiverStream::new(broker_rx);
        broker_tx
            .send(ConnInfo {
                service_id: 1,
                network: "unix".into(),
                address: "/nonexistent/host-services.sock".into(),
                knock: None,
            })
            .await
            .map_err(|_| HostError::Handshake("broker channel closed".into()))?;
        let inbound = broker.start_stream(outbound).await?.into_inner();
        tokio::spawn(drain(inbound));
        let stdio = GrpcStdioClient::new(channel.clone())
            .stream_stdio(Empty {})
            .await?
            .into_inner();
        tokio::spawn(drain(stdio));

        let init = InitClient::new(channel.clone())
            .init(InitRequest {
                host_service_names: HOST_SERVICES.iter().map(|s| s.to_string()).collect(),
            })
            .await?
            .into_inner();
        let mut names = init.plugin_service_names;
        names.sort();
        if names
            != [
                "spire.plugin.server.keymanager.v1.KeyManager",
                "spire.service.common.config.v1.Config",
            ]
        {
            return Err(HostError::Handshake(format!(
                "unexpected plugin services {names:?}"
            )));
        }
        Ok(Self {
            child,
            channel,
            socket_path,
            handshake_latency,
            stderr,
            stdout_after_handshake,
            broker: Some(broker_tx),
        })
    }

    /// Calls Configure with SPIRE's core configuration and `plugin_data` text.
    pub async fn configure(&self, trust_domain: &str, hcl: &str) -> Result<(), tonic::Status> {
        ConfigClient::new(self.channel.clone())
            .configure(ConfigureRequest {
                core_configuration: Some(CoreConfiguration {
                    trust_domain: trust_domain.into(),
                }),
                hcl_configuration: hcl.into(),
            })
            .await
            .map(|_| ())
    }

    /// Calls Validate.
    pub async fn validate(
        &self,
        trust_domain: &str,
        hcl: &str,
    ) -> Result<ValidateResponse, tonic::Status> {
        ConfigClient::new(self.channel.clone())
            .validate(ValidateRequest {
                core_configuration: Some(CoreConfiguration {
                    trust_domain: trust_domain.into(),
                }),
                hcl_configuration: hcl.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// A KeyManager client (cheap to clone; calls are multiplexed on one connection).
    pub fn key_manager(&self) -> KeyManagerClient<Channel> {
        KeyManagerClient::new(self.channel.clone())
    }

    /// The raw channel.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The unix socket from the handshake line.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Time from spawn to the handshake line.
    pub fn handshake_latency(&self) -> Duration {
        self.handshake_latency
    }

    /// Every stderr line so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stdout lines after the handshake (there must be none).
    pub fn stdout_after_handshake(&self) -> Vec<String> {
        self.stdout_after_handshake
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits up to `timeout` for the process to end by itself (a crash); `None` while it
    /// still runs.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, HostError> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.map(Some).map_err(HostError::Wait),
            Err(_) => Ok(None),
        }
    }

    /// Unloads the plugin as SPIRE does: Deinit, close the broker, Shutdown, then wait
    /// [`EXIT_GRACE`] for the process to exit before killing it.
    pub async fn shutdown(mut self) -> Result<ExitReport, HostError> {
        let _ = tokio::time::timeout(
            DEINIT_TIMEOUT,
            InitClient::new(self.channel.clone()).deinit(DeinitRequest {}),
        )
        .await;
        self.broker.take();
        let started = Instant::now();
        // go-plugin ignores the Shutdown result; a dropped connection during it is normal.
        let _ = tokio::time::timeout(
            EXIT_GRACE,
            GrpcControllerClient::new(self.channel.clone()).shutdown(Empty {}),
        )
        .await;
        drop(self.channel);
        match tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
            Ok(status) => Ok(ExitReport {
                graceful: true,
                status: Some(status.map_err(HostError::Wait)?),
                exit_latency: started.elapsed(),
            }),
            Err(_) => {
                let _ = self.child.kill().await;
                Ok(ExitReport {
                    graceful: false,
                    status: self.child.wait().await.ok(),
                    exit_latency: started.elapsed(),
                })
            }
        }
    }
}

/// Parses `1|1|unix|<path>|grpc[|...]`.
pub fn parse_handshake(line: &str) -> Result<PathBuf, HostError> {
    let parts: Vec<&str> = line.trim().split('|').collect();
    let bad = |why: &str| HostError::Handshake(format!("{why}: {line:?}"));
    if parts.len() < 4 {
        return Err(bad("Unrecognized remote plugin message"));
    }
    if parts[0] != "1" {
        return Err(bad("incompatible core API version with plugin"));
    }
    if parts[1] != "1" {
        return Err(bad("incompatible API version with plugin"));
    }
    if parts[2] != "unix" {
        return Err(bad("expected a unix socket"));
    }
    if parts.get(4).copied() != Some("grpc") {
        return Err(bad("unsupported plugin protocol"));
    }
    if parts.get(5).is_some_and(|cert| cert.len() > 50) {
        return Err(bad(
            "a server certificate would crash SPIRE (AutoMTLS is off)",
        ));
    }
    Ok(PathBuf::from(parts[3]))
}

async fn connect(socket: &Path) -> Result<Channel, HostError> {
    let socket = socket.to_path_buf();
    // The URI is unused for a unix socket; go-plugin dials with authority "unused" too.
    let endpoint = Endpoint::try_from("http://unused")?;
    Ok(endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?)
}

async fn drain<T>(mut stream: tonic::Streaming<T>) {
    while let Ok(Some(_)) = stream.message().await {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_lines_are_parsed_like_go_plugin() {
        assert_eq!(
            parse_handshake("1|1|unix|/tmp/x/plugin.sock|grpc\n").unwrap(),
            PathBuf::from("/tmp/x/plugin.sock")
        );
        assert!(parse_handshake("1|1|unix|/tmp/x.sock|grpc|").is_ok());
        assert!(parse_handshake("1|1|unix").is_err());
        assert!(parse_handshake("2|1|unix|/s|grpc").is_err());
        assert!(parse_handshake("1|2|unix|/s|grpc").is_err());
        assert!(
            parse_handshake("1|1|unix|/s").is_err(),
            "netrpc is rejected"
        );
        assert!(parse_handshake(&format!("1|1|unix|/s|grpc|{}", "A".repeat(60))).is_err());
    }
}
