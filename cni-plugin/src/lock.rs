//! One writer per netns at a time, across processes: the plugin's ADD, CHECK and DEL and
//! the node agent's repair each hold [`NetnsLock`] on the pod's netns while they write,
//! read back, probe and roll back. Without it, two ADDs into one netns (a runtime retrying
//! a slow ADD under another container ID) interleave: one's rollback deletes the rules the
//! other has just validated, and two probes race for the capture port.
//!
//! The lock is an open file description lock (`F_OFD_SETLK`, fcntl(2)) on one byte of a
//! single file, `<cni_agent_run_dir>/netns.lock`, at an offset made of the netns's device
//! and inode ([`lock_offset`]). So:
//! - it is keyed by the namespace itself, whatever path names it (`/var/run/netns/cni-…`,
//!   `/proc/<pid>/ns/net`, an inherited fd), in every mount namespace that sees the file
//!   (the chart mounts the host's run dir at the same path in the agent);
//! - it is released by the kernel when the holder exits or is killed, so no stale lock
//!   survives a crash, and no per-pod file is ever created or left behind;
//! - open file description locks exclude each other between threads of one process too
//!   (POSIX record locks would not), which the agent's concurrent repairs need;
//! - it does not touch the xtables lock (`XTABLES_LOCKFILE`, a `flock` on the netns file,
//!   taken by each iptables process we run), which is a separate kind of lock.
//!
//! Nothing in the pod can take it: the file is root's, `0600`, in a host directory that
//! only root can write.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg};

use crate::netns::NetnsId;

/// The lock file's name inside `cni_agent_run_dir`.
pub const LOCK_FILE: &str = "netns.lock";

/// How long ADD and CHECK wait for another invocation in the same netns. An ADD holds the
/// lock for milliseconds, and at most one probe timeout per family (2 s by default) plus
/// its writes (a second one when the first read-back disagrees);
/// 20 s lets a burst of retries queue up, and stays far below the runtime's own timeout
/// for the sandbox (kubelet's `--runtime-request-timeout`, 2 min).
pub const ADD_WAIT: Duration = Duration::from_secs(20);

/// How long DEL waits before it removes the rules without the lock: DEL must never block
/// a pod's teardown, and whatever it races with is being torn down with the pod anyway.
pub const DEL_WAIT: Duration = Duration::from_secs(5);

/// The lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file (or its directory) cannot be created or opened, or is not a regular
    /// file.
    #[error("cannot open the netns lock file {path}: {reason} (it lives in cni_agent_run_dir, which must be a directory root can write)")]
    Open {
        /// The lock file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Another holder kept the lock longer than the wait.
    #[error("another istio-cni operation on this netns (inode {ino}) has held it for over {waited:?}; try again later")]
    Busy {
        /// The netns's inode.
        ino: u64,
        /// How long this caller waited.
        waited: Duration,
    },
    /// `fcntl(F_OFD_SETLK)` failed for another reason than contention.
    #[error("cannot lock {path}: fcntl(F_OFD_SETLK): {source}")]
    Fcntl {
        /// The lock file.
        path: PathBuf,
        /// The errno.
        source: nix::Error,
    },
}

/// The lock on one netns; released when dropped (the file is closed).
#[derive(Debug)]
pub struct NetnsLock {
    _file: File,
}

/// The byte of the lock file that stands for the netns `id`: the inode in the low 32 bits
/// (nsfs inode numbers are 32-bit, `proc_inum`), the device's low 31 bits above it (every
/// namespace is on nsfs's one device, so in practice the inode alone decides). Always a
/// valid, non-negative `off_t`.
pub fn lock_offset(id: NetnsId) -> i64 {
    (((id.dev & 0x7fff_ffff) << 32) | (id.ino & 0xffff_ffff)) as i64
}

impl NetnsLock {
    /// Takes the lock for the netns `id` in `<dir>/netns.lock`, waiting at most `wait`
    /// (polling, 1 ms doubling to 20 ms). Creates `dir` (`0700`) and the file (`0600`)
    /// when missing; refuses a lock file that is a symlink or not a regular file.
    ///
    /// Errors: [`LockError::Open`], [`LockError::Busy`] after `wait`,
    /// [`LockError::Fcntl`].
    pub fn acquire(dir: &Path, id: NetnsId, wait: Duration) -> Result<NetnsLock, LockError> {
        Self::take(dir, id, wait, true)
    }

    /// [`NetnsLock::acquire`] for DEL, which writes nothing on the node: neither the
    /// directory nor the file is created (then no ADD can hold the lock either).
    ///
    /// Errors: as [`NetnsLock::acquire`]; [`LockError::Open`] when the file is missing.
    pub fn acquire_existing(
        dir: &Path,
        id: NetnsId,
        wait: Duration,
    ) -> Result<NetnsLock, LockError> {
        Self::take(dir, id, wait, false)
    }

    /// Checks that the lock file can be opened (created if need be) as ADD opens it, for
    /// STATUS: a node whose run dir cannot hold it runs ADD without the lock.
    ///
    /// Errors: [`LockError::Open`].
    pub fn check(dir: &Path) -> Result<(), LockError> {
        Self::open(dir, true).map(drop)
    }

    fn take(dir: &Path, id: NetnsId, wait: Duration, create: bool) -> Result<NetnsLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let file = Self::open(dir, create)?;
        Self::lock(file, path, id, wait)
    }

    fn open(dir: &Path, create: bool) -> Result<File, LockError> {
        let path = dir.join(LOCK_FILE);
        let open_err = |reason: String| LockError::Open {
            path: path.clone(),
            reason,
        };
        if create && !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| open_err(format!("creating {}: {e}", dir.display())))?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
            .map_err(|e| open_err(e.to_string()))?;
        let meta = file.metadata().map_err(|e| open_err(e.to_string()))?;
        if !meta.is_file() {
            return Err(open_err("not a regular file".into()));
        }
        Ok(file)
    }

    fn lock(
        file: File,
        path: PathBuf,
        id: NetnsId,
        wait: Duration,
    ) -> Result<NetnsLock, LockError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            // SAFETY: `flock` is plain data; every field is set below.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            fl.l_start = lock_offset(id);
            fl.l_len = 1;
            match fcntl(&file, FcntlArg::F_OFD_SETLK(&fl)) {
                Ok(_) => return Ok(NetnsLock { _file: file }),
                Err(nix::Error::EAGAIN | nix::Error::EACCES | nix::Error::EINTR) => {}
                Err(source) => return Err(LockError::Fcntl { path, source }),
            }
            let waited = start.elapsed();
            if waited >= wait {
                return Err(LockError::Busy {
                    ino: id.ino,
                    waited,
                });
            }
            std::thread::sleep(pause.min(wait - waited));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ino: u64) -> NetnsId {
        NetnsId { dev: 4, ino }
    }

    #[test]
    fn one_holder_per_netns_also_between_threads() {
        let dir = tempfile::tempdir().unwrap();
        let held = NetnsLock::acquire(dir.path(), id(4026532001), ADD_WAIT).unwrap();
        let other = std::thread::scope(|s| {
            s.spawn(|| NetnsLock::acquire(dir.path(), id(4026532001), Duration::from_millis(30)))
                .join()
                .unwrap()
        });
        assert!(matches!(other, Err(LockError::Busy { .. })), "{other:?}");
        // Another netns is independent.
        NetnsLock::acquire(dir.path(), id(4026532002), Duration::ZERO).unwrap();
        drop(held);
        NetnsLock::acquire(dir.path(), id(4026532001), Duration::ZERO).unwrap();
    }

    #[test]
    fn a_waiter_gets_it_when_the_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let held = NetnsLock::acquire(dir.path(), id(7), ADD_WAIT).unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| NetnsLock::acquire(dir.path(), id(7), ADD_WAIT));
            std::thread::sleep(Duration::from_millis(50));
            drop(held);
            waiter.join().unwrap().unwrap();
        });
    }

    #[test]
    fn the_lock_file_must_be_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/null", dir.path().join(LOCK_FILE)).unwrap();
        let e = NetnsLock::acquire(dir.path(), id(1), Duration::ZERO).unwrap_err();
        assert!(matches!(e, LockError::Open { .. }), "{e}");
        std::fs::remove_file(dir.path().join(LOCK_FILE)).unwrap();
        nix::unistd::mkfifo(&dir.path().join(LOCK_FILE), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = NetnsLock::acquire(dir.path(), id(1), Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn offsets_are_distinct_and_valid() {
        assert_ne!(lock_offset(id(1)), lock_offset(id(2)));
        assert!(
            lock_offset(NetnsId {
                dev: u64::MAX,
                ino: u64::MAX
            }) >= 0
        );
    }
}
