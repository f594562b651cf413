//! The one place that enters a network namespace.
//!
//! [`Netns::run`] runs a closure on a fresh thread that has `setns`'d into the namespace.
//! The thread ends with the closure, so no thread of the process ever goes back to other
//! work with the wrong namespace, and no caller calls `setns` by hand. Processes spawned
//! from the closure (iptables-restore) inherit the namespace; sockets opened there (the
//! probe, netlink) are bound to it for their whole life.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

/// A network namespace could not be opened or entered.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path does not exist (any more).
    #[error("network namespace {0} does not exist")]
    NotFound(PathBuf),
    /// The path exists but cannot be opened, or is not a namespace file.
    #[error("cannot open network namespace {path}: {reason}")]
    Open {
        /// The netns path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `setns(2)` failed (needs CAP_SYS_ADMIN).
    #[error("cannot enter network namespace {path}: setns: {source}")]
    Enter {
        /// The netns path.
        path: PathBuf,
        /// The errno.
        source: nix::Error,
    },
    /// The thread running inside the namespace panicked.
    #[error("the worker thread inside network namespace {0} panicked")]
    Panicked(PathBuf),
}

/// An open network namespace, e.g. the pod's `CNI_NETNS`.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace at `path` (a bind mount under `/var/run/netns`, or
    /// `/proc/<pid>/ns/net`) and checks that it is a namespace file.
    ///
    /// Errors: [`NetnsError::NotFound`] when the path is gone (DEL treats that as done),
    /// [`NetnsError::Open`] otherwise.
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => NetnsError::NotFound(path.into()),
            _ => NetnsError::Open {
                path: path.into(),
                reason: e.to_string(),
            },
        })?;
        let fs = fstatfs(file.as_fd()).map_err(|e| NetnsError::Open {
            path: path.into(),
            reason: e.to_string(),
        })?;
        if fs.filesystem_type() != NSFS_MAGIC {
            return Err(NetnsError::Open {
                path: path.into(),
                reason: "not a namespace file (nsfs)".into(),
            });
        }
        Ok(Netns {
            file,
            path: path.into(),
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a new thread inside the namespace and returns its result. `f` gets an
    /// [`Inside`] token: functions that must run inside a netns take one.
    ///
    /// Errors: [`NetnsError::Enter`] when `setns` fails (then `f` is not run),
    /// [`NetnsError::Panicked`] when `f` panics.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce(&Inside<'_>) -> T + Send,
    {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                    NetnsError::Enter {
                        path: self.path.clone(),
                        source,
                    }
                })?;
                Ok(f(&Inside { netns: self }))
            })
            .join()
            .unwrap_or_else(|_| Err(NetnsError::Panicked(self.path.clone())))
        })
    }
}

/// Proof that the current thread is inside a netns; only [`Netns::run`] makes one.
#[derive(Debug)]
pub struct Inside<'a> {
    netns: &'a Netns,
}

impl Inside<'_> {
    /// The path of the netns the thread is in.
    pub fn path(&self) -> &Path {
        &self.netns.path
    }
}

/// A network namespace created by this process for its own use (the node agent's
/// self-test), with `lo` up. It exists as long as this value: no bind mount pins it, so
/// nothing is left behind even if the process is killed. Other processes reach it through
/// [`ScratchNetns::path`] (`/proc/<pid>/fd/<fd>`) while it lives.
#[derive(Debug)]
pub struct ScratchNetns {
    netns: Netns,
}

impl ScratchNetns {
    /// Creates the namespace: a short-lived thread unshares a new netns and hands back
    /// its namespace file.
    ///
    /// Errors: [`NetnsError::Open`] when `unshare(CLONE_NEWNET)` fails (needs
    /// CAP_SYS_ADMIN) or `lo` cannot be brought up.
    pub fn create() -> Result<ScratchNetns, NetnsError> {
        let err = |reason: String| NetnsError::Open {
            path: PathBuf::from("(new scratch netns)"),
            reason,
        };
        let file = std::thread::spawn(|| -> Result<File, String> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
            File::open("/proc/thread-self/ns/net").map_err(|e| e.to_string())
        })
        .join()
        .map_err(|_| err("the thread creating it panicked".into()))?
        .map_err(err)?;
        let path = PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            file.as_raw_fd()
        ));
        let scratch = ScratchNetns {
            netns: Netns { file, path },
        };
        scratch
            .netns
            .run(crate::routing::loopback_up)?
            .map_err(err)?;
        Ok(scratch)
    }

    /// The namespace, to enter it.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// A path other processes can open while this value lives (`CNI_NETNS`).
    pub fn path(&self) -> &Path {
        &self.netns.path
    }
}
