//! The go-plugin handshake, server side: environment checks, the private unix socket and
//! the single stdout line the host reads.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The magic-cookie variable SPIRE sets for KeyManager plugins (server and agent alike).
pub const MAGIC_COOKIE_KEY: &str = "KeyManager";
/// Its value.
pub const MAGIC_COOKIE_VALUE: &str = "KeyManager";
/// go-plugin core protocol version.
const CORE_PROTOCOL_VERSION: u32 = 1;
/// SPIRE's plugin API version.
const APP_PROTOCOL_VERSION: u32 = 1;

/// Why the plugin cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Not started by a plugin host.
    #[error(
        "This binary is a SPIRE KeyManager plugin and is not meant to be executed directly \
         in plugin mode. Configure it as `plugin_cmd` of a KeyManager in spire-server's \
         configuration, or run `kms-keymanager --help` for the operator commands."
    )]
    NoMagicCookie,
    /// The host speaks no protocol version we do.
    #[error("the plugin host accepts protocol versions {0:?}; this plugin speaks version 1")]
    ProtocolVersion(String),
    /// Socket set-up failed.
    #[error("cannot set up the plugin socket in {dir}: {source}")]
    Socket {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing the handshake line failed.
    #[error("cannot write the handshake line to stdout: {0}")]
    Stdout(std::io::Error),
}

/// True when a go-plugin host (SPIRE) started this process.
pub fn is_launched_by_host() -> bool {
    std::env::var(MAGIC_COOKIE_KEY).is_ok_and(|v| v == MAGIC_COOKIE_VALUE)
}

pub(crate) fn check_environment() -> Result<(), HandshakeError> {
    if !is_launched_by_host() {
        return Err(HandshakeError::NoMagicCookie);
    }
    if let Ok(versions) = std::env::var("PLUGIN_PROTOCOL_VERSIONS") {
        let accepted = versions
            .split(',')
            .any(|v| v.trim().parse::<u32>() == Ok(APP_PROTOCOL_VERSION));
        if !accepted {
            return Err(HandshakeError::ProtocolVersion(versions));
        }
    }
    Ok(())
}

/// A unix socket in a fresh private directory, removed when dropped.
pub(crate) struct PluginSocket {
    dir: tempfile::TempDir,
    path: PathBuf,
    listener: Option<tokio::net::UnixListener>,
}

impl PluginSocket {
    /// Binds `<dir>/plugin.sock` in a new 0700 directory under `PLUGIN_UNIX_SOCKET_DIR`
    /// or the system temp directory. With `PLUGIN_UNIX_SOCKET_GROUP`, the socket is given
    /// to that group with mode 0660 (and the directory 0750), as go-plugin does.
    pub(crate) fn bind() -> Result<Self, HandshakeError> {
        let base = std::env::var_os("PLUGIN_UNIX_SOCKET_DIR")
            .map(PathBuf::from)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(std::env::temp_dir);
        let socket_error = |source| HandshakeError::Socket {
            dir: base.clone(),
            source,
        };
        let dir = tempfile::Builder::new()
            .prefix("kms-keymanager-")
            .tempdir_in(&base)
            .map_err(socket_error)?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(socket_error)?;
        let path = dir.path().join("plugin.sock");
        let listener = tokio::net::UnixListener::bind(&path).map_err(socket_error)?;
        if let Some(group) = std::env::var("PLUGIN_UNIX_SOCKET_GROUP")
            .ok()
            .filter(|g| !g.is_empty())
        {
            let gid = resolve_group(&group).ok_or_else(|| {
                socket_error(std::io::Error::other(format!(
                    "unknown group {group:?} in PLUGIN_UNIX_SOCKET_GROUP"
                )))
            })?;
            std::os::unix::fs::chown(&path, None, Some(gid)).map_err(socket_error)?;
            std::os::unix::fs::chown(dir.path(), None, Some(gid)).map_err(socket_error)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
                .map_err(socket_error)?;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750))
                .map_err(socket_error)?;
        }
        Ok(Self {
            dir,
            path,
            listener: Some(listener),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn take_listener(&mut self) -> Result<tokio::net::UnixListener, HandshakeError> {
        self.listener.take().ok_or_else(|| HandshakeError::Socket {
            dir: self.dir.path().to_path_buf(),
            source: std::io::Error::other("listener already taken"),
        })
    }
}

/// A numeric gid, or a group name looked up in /etc/group.
fn resolve_group(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse() {
        return Some(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == group).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

/// Prints `1|1|unix|<path>|grpc` as the first and only stdout line, flushed at once.
pub(crate) fn print_handshake_line(socket: &Path) -> Result<(), HandshakeError> {
    let line = format!(
        "{CORE_PROTOCOL_VERSION}|{APP_PROTOCOL_VERSION}|unix|{}|grpc\n",
        socket.display()
    );
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(line.as_bytes())
        .map_err(HandshakeError::Stdout)?;
    stdout.flush().map_err(HandshakeError::Stdout)
}

/// Resolves on SIGTERM.
pub(crate) async fn terminate_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut sigterm) => {
            sigterm.recv().await;
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
        }
    }
}

/// Swallows SIGINT, as go-plugin does: a Ctrl-C in SPIRE's terminal reaches the whole
/// process group, and SPIRE must still be able to deinitialise the plugin in order.
pub(crate) async fn ignore_interrupts() {
    use tokio::signal::unix::{SignalKind, signal};
    if let Ok(mut sigint) = signal(SignalKind::interrupt()) {
        while sigint.recv().await.is_some() {
            tracing::debug!("ignoring SIGINT; the host ends the plugin");
        }
    }
}
