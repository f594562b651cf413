//! Atomic file replacement: a temp file in the same directory, fsync, rename, fsync of the
//! directory. A reader (the runtime reading the conf dir, kubelet exec'ing the binary)
//! sees the old file or the new one, never a partial one, even if the agent is killed
//! with SIGKILL at any point.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of our temp files. With no `.conf`/`.conflist`/`.json` suffix, the runtime never
/// reads one as a network configuration.
pub const TEMP_PREFIX: &str = ".istio-cni-tmp-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Replaces `path` with `content` and permission bits `mode` (e.g. `0o644`), atomically.
///
/// Errors: the I/O error of the step that failed (create, write, fsync, chmod, rename);
/// the temp file is removed then, and `path` is unchanged.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(
        "{TEMP_PREFIX}{}-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(content)?;
        // The umask may have narrowed the mode at create time.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes temp files left in `dir` by an earlier agent that was killed mid-write.
/// Returns the files removed.
///
/// Errors: the I/O error of reading `dir`; files that cannot be removed are skipped.
pub fn remove_stale_temps(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX)
            && fs::remove_file(entry.path()).is_ok()
        {
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// Whether `path` holds exactly `content` (false when it cannot be read).
pub fn has_content(path: &Path, content: &[u8]) -> bool {
    match fs::metadata(path) {
        Ok(m) if m.len() == content.len() as u64 => fs::read(path).is_ok_and(|c| c == content),
        _ => false,
    }
}

/// The permission bits of `path`, if it exists.
pub fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_with_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("10-x.conflist");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), Some(0o644));
        assert!(has_content(&p, b"two") && !has_content(&p, b"one"));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
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
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "temp removed");
    }

    #[test]
    fn stale_temps_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(format!("{TEMP_PREFIX}10-x.conflist-1-0")),
            b"half",
        )
        .unwrap();
        fs::write(dir.path().join("10-x.conflist"), b"{}").unwrap();
        assert_eq!(remove_stale_temps(dir.path()).unwrap().len(), 1);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
