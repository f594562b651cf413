//! The ZDS socket ztunnel connects to (upstream `ZTUNNEL_UDS_ADDRESS`, by default
//! `/var/run/ztunnel/ztunnel.sock`), and the loop that accepts its connections; the checks
//! here serve the plugin-event socket too ([`super::pluginevents`]).
//!
//! The socket hands out the netns of every ambient pod to whoever connects, so:
//! - its directory must exist, be owned by root and writable by no one else (a directory
//!   another user could write is refused: they could replace the socket);
//! - a socket left at the path by an earlier agent is removed; anything else there is
//!   refused, never removed;
//! - the socket is `0600`: only root (ztunnel runs as root, as the agent) can connect;
//! - each peer's pid, uid and gid (`SO_PEERCRED`) are logged when it connects.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::server::ZdsServer;

/// The ZDS socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The directory is missing, or others than root could write it.
    #[error("socket directory {dir}: {reason} (it must be a directory owned by root that no one else can write)")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; not removing it (the path is the agent's socket's)")]
    NotASocket(PathBuf),
    /// A socket call failed.
    #[error("ZDS socket {path}: {call}: {source}")]
    Sys {
        /// The socket path.
        path: PathBuf,
        /// The call.
        call: &'static str,
        /// The errno.
        source: nix::Error,
    },
}

/// Creates the listening socket at `path` (see the module docs for the checks), mode
/// `0600`, non-blocking.
///
/// Errors: [`SocketError`].
pub fn bind_zds(path: &Path) -> Result<OwnedFd, SocketError> {
    prepare_path(path)?;
    let sys = |call, source| SocketError::Sys {
        path: path.into(),
        call,
        source,
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| sys("socket", e))?;
    let addr = UnixAddr::new(path).map_err(|e| sys("address", e))?;
    bind(fd.as_raw_fd(), &addr).map_err(|e| sys("bind", e))?;
    // Before listen: no connection can be made before the mode is right.
    restrict(path)?;
    listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN)).map_err(|e| sys("listen", e))?;
    Ok(fd)
}

/// Makes a bound socket's file `0600`.
///
/// Errors: [`SocketError::Sys`] (`chmod`).
pub fn restrict(path: &Path) -> Result<(), SocketError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        SocketError::Sys {
            path: path.into(),
            call: "chmod",
            source: nix::Error::from_raw(e.raw_os_error().unwrap_or(0)),
        }
    })
}

/// Checks that a socket may be bound at `path` as the module docs say: its directory is
/// root's and no one else can write it; a socket already there (an earlier agent's) is
/// removed; anything else there is refused.
///
/// Errors: [`SocketError::Dir`], [`SocketError::NotASocket`].
pub fn prepare_path(path: &Path) -> Result<(), SocketError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let dir_err = |reason: String| SocketError::Dir {
        dir: dir.into(),
        reason,
    };
    let meta = std::fs::metadata(dir).map_err(|e| dir_err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(dir_err("not a directory".into()));
    }
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(dir_err(format!(
            "owner uid {}, mode {:o}",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| dir_err(format!("removing the old socket: {e}")))?,
        Ok(_) => return Err(SocketError::NotASocket(path.into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(dir_err(e.to_string())),
    }
    Ok(())
}

/// Accepts ztunnel's connections on `listener` (from [`bind_zds`]) and serves each with
/// `server` on its own task, until the task running this is dropped.
///
/// Errors: the reactor registration or an `accept` error other than a transient one.
pub async fn accept_loop(listener: OwnedFd, server: ZdsServer) -> std::io::Result<()> {
    // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which alone owns it from here.
    let listener = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    loop {
        let mut guard = listener.readable().await?;
        match guard.try_io(|l| {
            accept4(
                l.get_ref().as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            )
            .map_err(std::io::Error::from)
        }) {
            Ok(Ok(raw)) => {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                let conn = unsafe { OwnedFd::from_raw_fd(raw) };
                let server = server.clone();
                tokio::spawn(async move {
                    server.serve_connection(conn).await;
                });
            }
            Ok(Err(e))
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNABORTED | libc::EINTR | libc::EMFILE | libc::ENFILE)
                ) =>
            {
                log::warn!("ZDS socket: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ambient::zds::{Ack, Response, WorkloadRequest, WorkloadResponse, ZdsHello};
    use prost::Message as _;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    #[test]
    fn refuses_what_it_must_not_replace_and_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ztunnel.sock");
        std::fs::write(&path, "x").unwrap();
        assert!(matches!(bind_zds(&path), Err(SocketError::NotASocket(_))));
        std::fs::remove_file(&path).unwrap();
        // A stale socket of an earlier agent.
        let stale = UnixDatagram::bind(&path).unwrap();
        drop(stale);
        let fd = bind_zds(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(fd);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind_zds(&path).unwrap_err();
        assert!(e.to_string().contains("no one else can write"), "{e}");
        assert!(matches!(
            bind_zds(&dir.path().join("missing/ztunnel.sock")),
            Err(SocketError::Dir { .. })
        ));
    }

    /// A client connects as ztunnel would, says hello and takes an empty snapshot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_connections() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.path().join("ztunnel.sock");
        let server = ZdsServer::new(Duration::from_secs(5));
        let listener = bind_zds(&path).unwrap();
        let task = tokio::spawn(accept_loop(listener, server.clone()));
        let client = std::thread::spawn(move || {
            let fd = socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            nix::sys::socket::connect(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
            let send = |b: &[u8]| {
                nix::sys::socket::send(fd.as_raw_fd(), b, nix::sys::socket::MsgFlags::empty())
                    .unwrap()
            };
            send(&ZdsHello { version: 1 }.encode_to_vec());
            let mut buf = [0u8; 64];
            let n = nix::sys::socket::recv(
                fd.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            )
            .unwrap();
            let req = WorkloadRequest::decode(&buf[..n]).unwrap();
            send(
                &WorkloadResponse {
                    payload: Some(Response::Ack(Ack::default())),
                }
                .encode_to_vec(),
            );
            (req, fd)
        });
        let (req, _fd) = tokio::task::spawn_blocking(move || client.join().unwrap())
            .await
            .unwrap();
        assert!(matches!(
            req.payload,
            Some(crate::ambient::zds::Request::SnapshotSent(_))
        ));
        for _ in 0..500 {
            if server.connections().await == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(server.connections().await, 1);
        task.abort();
    }
}
