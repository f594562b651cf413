//! The agent's file access: bounded, non-blocking reads of regular files only, and atomic
//! replacement of the files it writes.
//!
//! **Reads.** Every file the agent reads (the service account token and CA, its own
//! kubeconfig and the files that names, the CNI configs, the plugin binary it installs)
//! goes through [`read_limited`] or [`open_regular`]: the path is opened with
//! `O_NONBLOCK | O_NOCTTY | O_CLOEXEC` (so that a FIFO never waits for a writer, and no
//! terminal becomes ours), `fstat`ed, and refused unless it is a regular file; then at
//! most the limit of its kind ([`Limit`]) is read, plus one byte to notice more. Symlinks
//! are followed: kubelet's projected volumes are `token -> ..data/token` links to regular
//! files. A device (`/dev/zero`), FIFO, socket or directory is refused with an error
//! naming the file and its type; a file beyond its limit with one naming the file and the
//! limit. Nothing the agent reads can block it or grow its memory without bound.
//!
//! **Writes.** [`write_atomic`]: a temp file in the same directory, fsync, rename, fsync of
//! the directory. A reader (the runtime reading the conf dir, kubelet exec'ing the binary)
//! sees the old file or the new one, never a partial one, even if the agent is killed with
//! SIGKILL at any point.
//!
//! **Temp files and other writers.** Two agents may write the same directories at once
//! (a rolling upgrade runs the old pod and the new one side by side), and two agents in
//! two pods may have the same PID. So a temp file is named with the PID and 64 random
//! bits ([`TEMP_PREFIX`]`<target>.<pid>.<random>`), and while it exists under that name
//! its writer holds a `flock` on it: the file is created unnamed (`O_TMPFILE`), locked,
//! and only then linked under its name. A writer only ever removes its own temp file.
//! The sweep of leftovers ([`remove_stale_temps`]) removes a temp file only when it can
//! take that lock itself, that is when its writer is gone (a lock dies with its
//! process): a live writer's file is never touched. Where the file system has no
//! `O_TMPFILE`, the file is created under its name with mode `000` and then locked; the
//! sweep leaves a mode-`000` file alone for [`UNLOCKED_TEMP_GRACE`], the time between
//! create and lock. Temp files of earlier agent versions ([`LEGACY_TEMP_PREFIX`], not
//! locked) are removed only once older than [`LEGACY_TEMP_MIN_AGE`], since such an agent
//! may still be writing one during an upgrade.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{
    FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{AtFlags, Flock, FlockArg};

/// Prefix of our temp files. With no `.conf`/`.conflist`/`.json` suffix (the name ends
/// with random hex digits), the runtime never reads one as a network configuration.
/// Distinct from [`LEGACY_TEMP_PREFIX`], so that an earlier agent's sweep (which removes
/// every file with its prefix) never removes ours.
pub const TEMP_PREFIX: &str = ".istio-cni-temp-";

/// Prefix of the temp files of earlier agent versions (`<prefix><target>-<pid>-<n>`),
/// which carry no lock.
pub const LEGACY_TEMP_PREFIX: &str = ".istio-cni-tmp-";

/// An earlier agent's temp file is removed once its last write is this old: far longer
/// than any write of it (milliseconds; seconds for a slow fsync), so it is a leftover.
pub const LEGACY_TEMP_MIN_AGE: Duration = Duration::from_secs(300);

/// Without `O_TMPFILE`, a temp file exists for a few system calls, with mode `000`, before
/// its writer locks it; the sweep leaves such a file alone until it is this old.
pub const UNLOCKED_TEMP_GRACE: Duration = Duration::from_secs(60);

/// The most bytes the agent reads from one kind of file, and what that kind is called in
/// error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// What the file is, for messages ("a service account token").
    pub what: &'static str,
    /// The most bytes read.
    pub bytes: u64,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.bytes >= 1 << 20 && self.bytes % (1 << 20) == 0 {
            write!(f, "{} MiB", self.bytes >> 20)
        } else {
            write!(f, "{} bytes", self.bytes)
        }
    }
}

/// The service account token: 1 MiB. Projected tokens are 1–2 KiB, and nothing mounted
/// from a Secret or a projected volume exceeds 1 MiB (the API's object size limit).
pub const TOKEN_LIMIT: Limit = Limit {
    what: "a service account token",
    bytes: 1 << 20,
};

/// A CA bundle (`ca.crt`, `--kube-ca-file`, a kubeconfig's `certificate-authority`) and
/// a client certificate or key named by a kubeconfig: 1 MiB, the Secret size limit; the
/// largest public CA bundles are about 250 KiB.
pub const CA_LIMIT: Limit = Limit {
    what: "a CA bundle or client certificate",
    bytes: 1 << 20,
};

/// The agent's own kubeconfig (`--kubeconfig`): 1 MiB, as for anything mounted from a
/// Secret or ConfigMap.
pub const KUBECONFIG_LIMIT: Limit = Limit {
    what: "a kubeconfig",
    bytes: 1 << 20,
};

/// A CNI network configuration in the conf dir: 4 MiB, what the plugin itself accepts on
/// stdin (`MAX_STDIN_BYTES` in `cni-plugin/src/main.rs`); real ones are a few KiB.
pub const CONF_LIMIT: Limit = Limit {
    what: "a CNI network configuration",
    bytes: 4 << 20,
};

/// The plugin binary installed from `--plugin-bin`: 256 MiB, generous (a release build is
/// a few MiB, a debug build tens). It is copied in chunks, never held in memory.
pub const PLUGIN_BINARY_LIMIT: Limit = Limit {
    what: "the plugin binary",
    bytes: 256 << 20,
};

/// A file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Opening or reading failed (missing, no permission, I/O error).
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Not a regular file (nor a symlink to one).
    #[error(
        "refusing to read {}: it is a {kind}, not a regular file (it must be a regular file \
         or a symlink to one)",
        .path.display()
    )]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// Its type: "FIFO", "character device", "block device", "socket", "directory".
        kind: &'static str,
    },
    /// Larger than the limit of its kind.
    #[error(
        "refusing to read {}: it is larger than {limit}, the limit for {what}",
        .path.display(),
        what = .limit.what
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit it exceeds.
        limit: Limit,
    },
}

impl ReadError {
    /// The file that could not be read.
    pub fn path(&self) -> &Path {
        match self {
            ReadError::Io { path, .. }
            | ReadError::NotRegular { path, .. }
            | ReadError::TooLarge { path, .. } => path,
        }
    }

    /// Whether the file does not exist (it may have been removed while being read).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

fn kind_of(t: fs::FileType) -> &'static str {
    if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else if t.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

/// Opens `path` (following symlinks) for reading if it is a regular file of at most
/// `limit` bytes by its size. The type is checked by `stat` before opening (so that a
/// device is never opened, which for some devices has effects) and by `fstat` after
/// (so that a file swapped in between is refused too). The open is non-blocking, so a
/// FIFO swapped in between does not block either.
///
/// Errors: [`ReadError`] naming `path`.
pub fn open_regular(path: &Path, limit: Limit) -> Result<(File, fs::Metadata), ReadError> {
    let io_err = |source| ReadError::Io {
        path: path.into(),
        source,
    };
    let check = |m: &fs::Metadata| {
        if !m.is_file() {
            Err(ReadError::NotRegular {
                path: path.into(),
                kind: kind_of(m.file_type()),
            })
        } else if m.len() > limit.bytes {
            Err(ReadError::TooLarge {
                path: path.into(),
                limit,
            })
        } else {
            Ok(())
        }
    };
    check(&fs::metadata(path).map_err(io_err)?)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    check(&meta)?;
    Ok((file, meta))
}

/// Reads all of `path`, a regular file (or a symlink to one) of at most `limit` bytes.
/// At most `limit + 1` bytes are ever read, whatever the file claims its size is.
///
/// Errors: [`ReadError`] naming `path` (and the limit when it is exceeded).
pub fn read_limited(path: &Path, limit: Limit) -> Result<Vec<u8>, ReadError> {
    read_limited_meta(path, limit).map(|(content, _)| content)
}

/// [`read_limited`], also returning the file's metadata (as `fstat` saw it).
///
/// Errors: as [`read_limited`].
pub fn read_limited_meta(path: &Path, limit: Limit) -> Result<(Vec<u8>, fs::Metadata), ReadError> {
    let (file, meta) = open_regular(path, limit)?;
    let mut content = Vec::with_capacity(meta.len().min(limit.bytes) as usize);
    file.take(limit.bytes + 1)
        .read_to_end(&mut content)
        .map_err(|source| ReadError::Io {
            path: path.into(),
            source,
        })?;
    if content.len() as u64 > limit.bytes {
        return Err(ReadError::TooLarge {
            path: path.into(),
            limit,
        });
    }
    Ok((content, meta))
}

/// Copies `src` (opened by [`open_regular`]) into `out` in chunks, at most `limit` bytes;
/// `path` names `src` in errors. Returns the bytes copied.
///
/// Errors: the I/O error of a read or write; one of kind `FileTooLarge` wrapping
/// [`ReadError::TooLarge`] when `src` grew beyond `limit` since it was opened.
pub fn copy_limited(src: &mut File, out: &mut File, path: &Path, limit: Limit) -> io::Result<u64> {
    let copied = io::copy(&mut Read::take(&mut *src, limit.bytes + 1), out)?;
    if copied > limit.bytes {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            ReadError::TooLarge {
                path: path.into(),
                limit,
            },
        ));
    }
    Ok(copied)
}

/// Whether `path` is a regular file holding exactly `content` (false when it is not, or
/// cannot be read). Reads at most `content.len()` bytes.
pub fn has_content(path: &Path, content: &[u8]) -> bool {
    let limit = Limit {
        what: "a file to compare",
        bytes: content.len() as u64,
    };
    match open_regular(path, limit) {
        Ok((file, meta)) if meta.len() == content.len() as u64 => {
            same_bytes(file, &mut io::Cursor::new(content)).unwrap_or(false)
        }
        _ => false,
    }
}

/// Whether `path` is a regular file with the same bytes as `src` (read from its current
/// position to its end, `src_len` bytes). Compares in chunks; false when `path` cannot be
/// read or differs.
///
/// Errors: the I/O error of reading `src`.
pub fn same_as(path: &Path, src: &mut File, src_len: u64) -> io::Result<bool> {
    let limit = Limit {
        what: "a file to compare",
        bytes: src_len,
    };
    match open_regular(path, limit) {
        Ok((file, meta)) if meta.len() == src_len => same_bytes(file, src),
        _ => Ok(false),
    }
}

/// Whether `a` and `b` hold the same bytes to their ends. Errors reading `a` count as a
/// difference; errors reading `b` are returned.
fn same_bytes(mut a: impl Read, b: &mut impl Read) -> io::Result<bool> {
    let (mut buf_a, mut buf_b) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    loop {
        let n = match a.read(&mut buf_a) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Ok(false),
        };
        let m = read_full(b, &mut buf_b[..n.max(1)])?;
        if n == 0 {
            return Ok(m == 0);
        }
        if m != n || buf_a[..n] != buf_b[..n] {
            return Ok(false);
        }
    }
}

/// Reads into `buf` until it is full or the end: the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The permission bits of `path`, if it exists.
pub fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// 64 bits that no other writer picks: SipHash, under this process's random keys (std's
/// `RandomState`, seeded from the OS's random source), of a counter and the time.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A name no other writer uses, for a temp file of ours standing for `target`.
fn temp_name(target: &str) -> String {
    // Keep the name well under NAME_MAX (255 bytes) whatever the target's length.
    let mut end = target.len().min(128);
    while !target.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{TEMP_PREFIX}{}.{}.{:016x}",
        &target[..end],
        std::process::id(),
        random_u64()
    )
}

/// Our temp file's name while it exists: removed on drop unless [`OwnTemp::disarm`]ed.
/// Only ever the name this writer created.
struct OwnTemp(Option<PathBuf>);

impl OwnTemp {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for OwnTemp {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

fn lock_shared(file: File) -> io::Result<Flock<File>> {
    Flock::lock(file, FlockArg::LockShared).map_err(|(_, e)| io::Error::from(e))
}

/// Replaces `path` with `content` and permission bits `mode` (e.g. `0o644`), atomically.
///
/// Errors: the I/O error of the step that failed (create, write, fsync, chmod, rename);
/// our temp file is removed then, and `path` is unchanged.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_with(path, mode, |f| f.write_all(content))
}

/// Replaces `path` atomically with what `fill` writes into a fresh temp file (beside
/// `path`, locked and named as the module docs say), with permission bits `mode`.
///
/// Errors: the I/O error of `fill` or of the step that failed (create, fsync, chmod,
/// rename); our temp file is removed then, and `path` is unchanged.
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    write_atomic_impl(path, mode, fill, true)
}

/// [`write_atomic_with`]; `tmpfile` false takes the path of file systems without
/// `O_TMPFILE` (for tests).
fn write_atomic_impl(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
    tmpfile: bool,
) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let target = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?
        .to_string_lossy()
        .into_owned();
    let dir_fd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(dir)?;
    let mut own = OwnTemp(None);
    // Unnamed until locked, so that no sweep ever sees it unlocked.
    let unnamed = if tmpfile {
        OpenOptions::new()
            .read(true)
            .write(true)
            .mode(mode)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .open(dir)
    } else {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    };
    let mut writer = match unnamed {
        Ok(f) => lock_shared(f)?,
        Err(e) if tmpfile_unsupported(&e) => {
            let (f, name) = create_named_temp(dir, &target)?;
            own.0 = Some(name);
            let f = lock_shared(f)?;
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            f
        }
        Err(e) => return Err(e),
    };
    fill(&mut writer)?;
    // The umask may have narrowed the mode at create time.
    writer.set_permissions(fs::Permissions::from_mode(mode))?;
    writer.sync_all()?;
    if own.0.is_none() {
        own.0 = Some(link_unnamed(&writer, &dir_fd, dir, &target)?);
    }
    let tmp = own.0.clone().unwrap_or_default();
    // Keep the lock through a read-only descriptor and close the writable one before the
    // rename: exec'ing a file that some process holds open for writing fails with
    // ETXTBSY, and the runtime may exec the plugin binary the moment it is in place.
    let reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&tmp)?;
    let (r, w) = (reader.metadata()?, writer.metadata()?);
    if (r.dev(), r.ino()) != (w.dev(), w.ino()) {
        return Err(io::Error::other(format!(
            "temp file {} was replaced while being written",
            tmp.display()
        )));
    }
    let _lock = lock_shared(reader)?;
    drop(writer);
    fs::rename(&tmp, path)?;
    own.disarm();
    dir_fd.sync_all()
}

/// Whether `open(O_TMPFILE)` failed because the kernel or file system lacks it.
fn tmpfile_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
    )
}

/// Without `O_TMPFILE`: a new temp file under a fresh name, mode `000` until locked.
fn create_named_temp(dir: &Path, target: &str) -> io::Result<(File, PathBuf)> {
    let mut last = None;
    for _ in 0..8 {
        let name = dir.join(temp_name(target));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o000)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&name)
        {
            Ok(f) => return Ok((f, name)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temp file name")))
}

/// Gives the unnamed (`O_TMPFILE`) `file` a fresh temp name in `dir`: `linkat` with
/// `AT_EMPTY_PATH` (needs CAP_DAC_READ_SEARCH), else through `/proc/self/fd`.
fn link_unnamed(file: &File, dir_fd: &File, dir: &Path, target: &str) -> io::Result<PathBuf> {
    let mut last = None;
    for _ in 0..8 {
        let name = temp_name(target);
        let linked = nix::unistd::linkat(file, "", dir_fd, name.as_str(), AtFlags::AT_EMPTY_PATH)
            .or_else(|e| {
                if matches!(e, nix::errno::Errno::EEXIST) {
                    return Err(e);
                }
                let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
                nix::unistd::linkat(
                    nix::fcntl::AT_FDCWD,
                    proc_path.as_str(),
                    dir_fd,
                    name.as_str(),
                    AtFlags::AT_SYMLINK_FOLLOW,
                )
            });
        match linked {
            Ok(()) => return Ok(dir.join(name)),
            Err(nix::errno::Errno::EEXIST) => {
                last = Some(io::Error::from(nix::errno::Errno::EEXIST))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temp file name")))
}

/// Removes leftover temp files in `dir`: ours whose writer is gone (we can take its
/// lock), and earlier versions' older than [`LEGACY_TEMP_MIN_AGE`]. A live writer's temp
/// file is never removed (see the module docs). Returns the files removed.
///
/// Errors: the I/O error of reading `dir`; files that cannot be checked or removed are
/// skipped.
pub fn remove_stale_temps(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        let gone = if name.starts_with(TEMP_PREFIX) {
            remove_if_abandoned(&path)
        } else if name.starts_with(LEGACY_TEMP_PREFIX) {
            remove_if_old(&path)
        } else {
            false
        };
        if gone {
            removed.push(path);
        }
    }
    Ok(removed)
}

fn age(meta: &fs::Metadata) -> Duration {
    meta.modified()
        .ok()
        .and_then(|t| t.elapsed().ok())
        .unwrap_or(Duration::ZERO)
}

/// Removes our temp file `path` if its writer is gone.
fn remove_if_abandoned(path: &Path) -> bool {
    let Ok(file) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
    else {
        return false;
    };
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    // Held (shared) by a live writer until its rename: then this fails.
    let Ok(_lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
        return false;
    };
    if meta.mode() & 0o7777 == 0 && age(&meta) < UNLOCKED_TEMP_GRACE {
        // Created without O_TMPFILE, maybe not locked by its writer yet.
        return false;
    }
    // Names are never reused, but be sure the name is still the file we locked.
    match fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == (meta.dev(), meta.ino()) => fs::remove_file(path).is_ok(),
        _ => false,
    }
}

/// Removes an earlier version's temp file `path` if it is a regular file not written for
/// [`LEGACY_TEMP_MIN_AGE`].
fn remove_if_old(path: &Path) -> bool {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() && age(&m) >= LEGACY_TEMP_MIN_AGE => fs::remove_file(path).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_with_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("10-x.conflist");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), Some(0o644));
        assert!(has_content(&p, b"two") && !has_content(&p, b"one"));
        assert_eq!(names(dir.path()), ["10-x.conflist"]);
    }

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a-dir");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), b"x").unwrap();
        // Renaming a file over a non-empty directory fails after the temp file was written.
        assert!(write_atomic(&target, b"new", 0o644).is_err());
        assert!(target.join("inside").exists());
        assert_eq!(names(dir.path()), ["a-dir"], "temp removed");
        // A failing fill leaves nothing either.
        let p = dir.path().join("f");
        let failed = write_atomic_with(&p, 0o644, |_| Err(io::Error::other("boom")));
        assert!(failed.is_err() && !p.exists());
        assert_eq!(names(dir.path()), ["a-dir"]);
    }

    #[test]
    fn a_live_writers_temp_file_is_never_swept() {
        // With O_TMPFILE (unnamed while being filled) and without (named, locked).
        for tmpfile in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("10-x.conflist");
            let (filling_tx, filling_rx) = std::sync::mpsc::channel();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let writer = std::thread::spawn({
                let p = p.clone();
                move || {
                    let fill = |f: &mut File| {
                        f.write_all(b"half")?;
                        filling_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                        f.write_all(b" and whole")
                    };
                    write_atomic_impl(&p, 0o644, fill, tmpfile)
                }
            });
            filling_rx.recv().unwrap();
            let temps = names(dir.path());
            assert_eq!(temps.len(), usize::from(!tmpfile), "{temps:?}");
            assert!(
                temps.iter().all(|t| t.starts_with(TEMP_PREFIX)),
                "{temps:?}"
            );
            assert!(remove_stale_temps(dir.path()).unwrap().is_empty());
            go_tx.send(()).unwrap();
            writer.join().unwrap().unwrap();
            assert_eq!(fs::read(&p).unwrap(), b"half and whole");
            assert_eq!(mode_of(&p), Some(0o644));
            assert_eq!(names(dir.path()), ["10-x.conflist"]);
        }
    }

    #[test]
    fn only_abandoned_or_old_temps_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, mode: u32| {
            let p = dir.path().join(name);
            fs::write(&p, b"half").unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        // A dead writer's (no lock held).
        file(&format!("{TEMP_PREFIX}10-x.conflist.7.00ff"), 0o644);
        // Created without O_TMPFILE a moment ago: its writer may not have locked it yet.
        file(&format!("{TEMP_PREFIX}10-x.conflist.7.0100"), 0o000);
        // A live writer's, locked.
        let locked = file(&format!("{TEMP_PREFIX}10-x.conflist.8.0200"), 0o644);
        let _held = lock_shared(File::open(&locked).unwrap()).unwrap();
        // An earlier version's, fresh (maybe being written) and old (a leftover).
        file(&format!("{LEGACY_TEMP_PREFIX}10-x.conflist-1-0"), 0o644);
        let old = file(&format!("{LEGACY_TEMP_PREFIX}10-x.conflist-1-1"), 0o644);
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(SystemTime::now() - LEGACY_TEMP_MIN_AGE - Duration::from_secs(1))
            .unwrap();
        fs::write(dir.path().join("10-x.conflist"), b"{}").unwrap();

        let mut removed: Vec<String> = remove_stale_temps(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        removed.sort();
        assert_eq!(
            removed,
            [
                format!("{TEMP_PREFIX}10-x.conflist.7.00ff"),
                format!("{LEGACY_TEMP_PREFIX}10-x.conflist-1-1"),
            ]
        );
        assert_eq!(names(dir.path()).len(), 4);
    }

    #[test]
    fn reads_are_bounded_and_regular_only() {
        let dir = tempfile::tempdir().unwrap();
        let small = Limit {
            what: "a test file",
            bytes: 4,
        };
        let p = dir.path().join("f");
        fs::write(&p, b"1234").unwrap();
        assert_eq!(read_limited(&p, small).unwrap(), b"1234");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("f", &link).unwrap();
        assert_eq!(read_limited(&link, small).unwrap(), b"1234");
        fs::write(&p, b"12345").unwrap();
        let e = read_limited(&p, small).unwrap_err();
        assert!(matches!(e, ReadError::TooLarge { .. }), "{e}");
        assert!(
            e.to_string().contains("4 bytes, the limit for a test file"),
            "{e}"
        );

        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = read_limited(&fifo, small).unwrap_err();
        assert!(e.to_string().contains("it is a FIFO"), "{e}");
        let e = read_limited(Path::new("/dev/zero"), TOKEN_LIMIT).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = read_limited(dir.path(), TOKEN_LIMIT).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        let e = read_limited(&dir.path().join("missing"), TOKEN_LIMIT).unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert_eq!(TOKEN_LIMIT.to_string(), "1 MiB");
    }

    #[test]
    fn streaming_comparison_and_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let content: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        fs::write(&a, &content).unwrap();
        let (mut src, meta) = open_regular(&a, PLUGIN_BINARY_LIMIT).unwrap();
        assert!(!same_as(&b, &mut src, meta.len()).unwrap());
        let (mut src, _) = open_regular(&a, PLUGIN_BINARY_LIMIT).unwrap();
        write_atomic_with(&b, 0o755, |out| {
            copy_limited(&mut src, out, &a, PLUGIN_BINARY_LIMIT).map(drop)
        })
        .unwrap();
        assert_eq!(fs::read(&b).unwrap(), content);
        let (mut src, meta) = open_regular(&a, PLUGIN_BINARY_LIMIT).unwrap();
        assert!(same_as(&b, &mut src, meta.len()).unwrap());
        let mut changed = content.clone();
        changed[150_000] ^= 1;
        fs::write(&b, &changed).unwrap();
        let (mut src, meta) = open_regular(&a, PLUGIN_BINARY_LIMIT).unwrap();
        assert!(!same_as(&b, &mut src, meta.len()).unwrap());

        let tiny = Limit {
            what: "a tiny file",
            bytes: 10,
        };
        let (mut src, _) = open_regular(&a, PLUGIN_BINARY_LIMIT).unwrap();
        let e = write_atomic_with(&b, 0o755, |out| {
            copy_limited(&mut src, out, &a, tiny).map(drop)
        })
        .unwrap_err();
        assert!(e.to_string().contains("the limit for a tiny file"), "{e}");
        assert_eq!(fs::read(&b).unwrap(), changed, "unchanged");
        assert_eq!(names(dir.path()), ["a", "b"]);
    }
}
