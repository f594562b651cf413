//! The one place that enters a network namespace.
//!
//! [`Netns::run`] runs a closure on a fresh thread that has `setns`'d into the namespace.
//! The thread ends with the closure, so no thread of the process ever goes back to other
//! work with the wrong namespace, and no caller calls `setns` by hand. Processes spawned
//! from the closure (iptables-restore) inherit the namespace; sockets opened there (the
//! probe, netlink) are bound to it for their whole life.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::sched::{setns, CloneFlags};
use nix::sys::stat::{fstat, stat, Mode};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

/// A network namespace could not be opened or entered.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path does not exist (any more).
    #[error("network namespace {0} does not exist")]
    NotFound(PathBuf),
    /// The path exists but cannot be opened, or is not a namespace file; or no thread
    /// could be started to enter it.
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
    /// The path names the namespace this process runs in, or the host's (that of PID 1,
    /// or of the kernel's threads): writing pod rules there would capture every host
    /// connection.
    #[error("refusing network namespace {path}: it is {which}, not a pod's (is CNI_NETNS wrong?)")]
    HostNamespace {
        /// The netns path.
        path: PathBuf,
        /// `"this process's own network namespace"` or `"the host's network namespace"`.
        which: &'static str,
    },
}

/// The name of every thread [`Netns::run`] starts, and so the writer's name (`comm`) that
/// the kernel gives for an nf_tables commit made by this code, in the plugin or the agent
/// ([`crate::nft_wire::Commit`]): the agent's drift watch skips its own writes by it.
pub const THREAD_NAME: &str = "istio-cni-netns";

/// Identity of a namespace: device and inode of its nsfs file (`stat -L`), as `ip netns
/// identify` and `/proc/<pid>/ns/net` links compare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetnsId {
    /// `st_dev` of the nsfs file.
    pub dev: u64,
    /// `st_ino` of the nsfs file: the namespace's inode number.
    pub ino: u64,
}

impl NetnsId {
    fn of_stat(st: &nix::sys::stat::FileStat) -> NetnsId {
        NetnsId {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }

    /// The identity of the namespace at `path` (`stat`, following links such as
    /// `/proc/<pid>/ns/net`).
    ///
    /// Errors: the `stat` error (the process exited, the file is gone).
    pub fn of(path: &Path) -> nix::Result<NetnsId> {
        stat(path).map(|st| NetnsId::of_stat(&st))
    }

    /// The identity of the namespace at `path`, or `None` when it cannot be read.
    fn of_path(path: &str) -> Option<NetnsId> {
        NetnsId::of(Path::new(path)).ok()
    }
}

/// The identities of the host's network namespace as the procfs mounted at `proc` shows
/// it, each when it can be read: that of PID 1, and that of `kthreadd` (PID 2 when its
/// `comm` is `kthreadd`). Kernel threads always run in the initial network namespace,
/// and their `ns/net` stays readable where PID 1's may not be (a PID 1 that is not
/// dumpable answers `EACCES` even to root): so the host's namespace is known even then.
/// Empty only when neither can be read (a `proc` of another PID namespace, without
/// access to either).
pub fn host_netns_ids(proc: &Path) -> Vec<NetnsId> {
    let mut ids = Vec::with_capacity(2);
    if let Ok(id) = NetnsId::of(&proc.join("1/ns/net")) {
        ids.push(id);
    }
    let kthreadd = std::fs::read_to_string(proc.join("2/comm"))
        .is_ok_and(|comm| comm.trim_end() == "kthreadd");
    if kthreadd {
        if let Ok(id) = NetnsId::of(&proc.join("2/ns/net")) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// An open network namespace, e.g. the pod's `CNI_NETNS`. Never the namespace of this
/// process or of PID 1 (see [`Netns::open`]).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    id: NetnsId,
}

impl Netns {
    /// Opens the namespace at `path` (a bind mount under `/var/run/netns`, or
    /// `/proc/<pid>/ns/net`), checks that it is a namespace file, and refuses the
    /// namespace this process runs in and the host's ([`host_netns_ids`] of `/proc`).
    ///
    /// The path is first opened with `O_PATH`, which never blocks (a FIFO) and has no side
    /// effect (a device file); only an nsfs file is then opened for real, through that
    /// descriptor, so the file checked is the file entered.
    ///
    /// Errors: [`NetnsError::NotFound`] when the path is gone (DEL treats that as done),
    /// [`NetnsError::HostNamespace`] for this process's or the host's namespace,
    /// [`NetnsError::Open`] otherwise.
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        let opath: OwnedFd =
            open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| match e {
                nix::Error::ENOENT => NetnsError::NotFound(path.into()),
                e => NetnsError::Open {
                    path: path.into(),
                    reason: e.desc().to_owned(),
                },
            })?;
        Netns::checked(opath, path)
    }

    /// Opens the namespace file `name` of directory `dir`, not following a symlink at
    /// `name` (`O_NOFOLLOW`): for a path that untrusted input names, confined to one
    /// directory (the node agent's netns dirs). Otherwise as [`Netns::open`].
    ///
    /// Errors: as [`Netns::open`]; a `name` that is not one file name, or a symlink, is
    /// [`NetnsError::Open`].
    pub fn open_in(dir: &Path, name: &str) -> Result<Netns, NetnsError> {
        let path = dir.join(name);
        let fail = |reason: &str| NetnsError::Open {
            path: path.clone(),
            reason: reason.to_owned(),
        };
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(fail("not a file name in the netns directory"));
        }
        let dirfd = open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail(e.desc()))?;
        let opath = nix::fcntl::openat(
            &dirfd,
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            nix::Error::ENOENT => NetnsError::NotFound(path.clone()),
            e => fail(e.desc()),
        })?;
        Netns::checked(opath, &path)
    }

    /// The checks of [`Netns::open`] on an `O_PATH` descriptor of `path`.
    fn checked(opath: OwnedFd, path: &Path) -> Result<Netns, NetnsError> {
        let fail = |reason: String| NetnsError::Open {
            path: path.into(),
            reason,
        };
        let fs = fstatfs(&opath).map_err(|e| fail(e.desc().to_owned()))?;
        if fs.filesystem_type() != NSFS_MAGIC {
            return Err(fail("not a namespace file (nsfs)".into()));
        }
        let file = File::open(format!("/proc/self/fd/{}", opath.as_raw_fd()))
            .map_err(|e| fail(e.to_string()))?;
        let id = NetnsId::of_stat(&fstat(&file).map_err(|e| fail(e.desc().to_owned()))?);
        for own in ["/proc/thread-self/ns/net", "/proc/self/ns/net"] {
            if NetnsId::of_path(own) == Some(id) {
                return Err(NetnsError::HostNamespace {
                    path: path.into(),
                    which: "this process's own network namespace",
                });
            }
        }
        if host_netns_ids(Path::new("/proc")).contains(&id) {
            return Err(NetnsError::HostNamespace {
                path: path.into(),
                which: "the host's network namespace",
            });
        }
        Ok(Netns {
            file,
            path: path.into(),
            id,
        })
    }

    /// The namespace's identity (device and inode).
    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a new thread inside the namespace, named [`THREAD_NAME`], and returns
    /// its result. `f` gets an
    /// [`Inside`] token: functions that must run inside a netns take one.
    ///
    /// Errors: [`NetnsError::Enter`] when `setns` fails (then `f` is not run),
    /// [`NetnsError::Panicked`] when `f` panics, [`NetnsError::Open`] when no thread can
    /// be started (the process's thread limit).
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce(&Inside<'_>) -> T + Send,
    {
        std::thread::scope(|s| {
            let worker = std::thread::Builder::new()
                .name(THREAD_NAME.into())
                .spawn_scoped(s, || {
                    setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                        NetnsError::Enter {
                            path: self.path.clone(),
                            source,
                        }
                    })?;
                    Ok(f(&Inside { netns: self }))
                });
            match worker {
                Ok(w) => w
                    .join()
                    .unwrap_or_else(|_| Err(NetnsError::Panicked(self.path.clone()))),
                Err(e) => Err(NetnsError::Open {
                    path: self.path.clone(),
                    reason: format!("cannot start a thread to enter it: {e}"),
                }),
            }
        })
    }
}

impl AsFd for Netns {
    /// The open namespace file: a handle other processes can inherit to reach it.
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
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

impl Netns {
    /// Creates a new, empty network namespace that only this value holds: a short-lived
    /// thread unshares it and hands back its namespace file. No bind mount pins it, so it
    /// goes when this value is dropped, even if the process is killed; other processes
    /// reach it through [`Netns::path`] (`/proc/<pid>/fd/<fd>`) while it lives. Its `lo`
    /// is down, as in any new netns ([`crate::scratch::ScratchNetns`] brings it up).
    ///
    /// Errors: [`NetnsError::Open`] when `unshare(CLONE_NEWNET)` fails (needs
    /// CAP_SYS_ADMIN).
    pub(crate) fn create_unpinned() -> Result<Netns, NetnsError> {
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
        let id = NetnsId::of_stat(&fstat(&file).map_err(|e| err(e.to_string()))?);
        Ok(Netns { file, path, id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's threads run in the host's netns: it is known, and refused, even where
    /// PID 1's `ns/net` cannot be read (this machine's PID 1 answers `EACCES`).
    #[test]
    fn the_kernel_threads_netns_is_the_hosts_and_is_refused() {
        let kthreadd =
            std::fs::read_to_string("/proc/2/comm").is_ok_and(|comm| comm.trim_end() == "kthreadd");
        let Ok(id) = NetnsId::of(Path::new("/proc/2/ns/net")) else {
            eprintln!("skipped: /proc/2/ns/net is not readable here");
            return;
        };
        if !kthreadd {
            eprintln!("skipped: PID 2 is not kthreadd here");
            return;
        }
        assert!(host_netns_ids(Path::new("/proc")).contains(&id));
        // Refused as the host's, or (when this test runs in it) as this process's own.
        match Netns::open(Path::new("/proc/2/ns/net")) {
            Err(NetnsError::HostNamespace { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
