//! A node's host, played by a process tree in its own mount and PID namespaces.
//!
//! The node agent's self-test enters the node's mount namespace (PID 1's) to run the
//! plugin as the runtime does; a test node must therefore be a mount namespace whose
//! PID 1 sees the node's files at the node's paths (`/opt/cni/bin`, `/etc/cni/net.d`,
//! `/var/run/istio-cni`) without touching this machine's. [`NodeRoot`] starts a command
//! (containerd, or a holder) in a new mount namespace (util-linux `unshare --mount`,
//! propagation private), if asked as PID 1 of a new PID namespace (`--pid --fork
//! --mount-proc`), after laying out:
//!
//! - tmpfs over whole directories (`/opt`, `/run`): empty, and gone with the namespace;
//! - writable overlays over directories that must keep their content (`/etc`), whose
//!   writes land in a tmpfs that is gone with the namespace;
//! - hidden files: overlay whiteouts (`mknod c 0 0` in the upper layer), so a file of this
//!   machine (say `/usr/sbin/iptables`) is absent from the node, as on a host without it.
//!
//! Nothing is mounted or written outside the namespace except a marker file in the
//! holder's temp dir. When PID 1 exits, the kernel kills the rest of the namespace and
//! its mounts go with it. Needs root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to lay out over this machine's root before the command starts.
#[derive(Debug, Default, Clone)]
pub struct NodeRoot {
    tmpfs: Vec<PathBuf>,
    writable: Vec<(PathBuf, Vec<String>)>,
    mkdirs: Vec<PathBuf>,
    pid_ns: bool,
}

impl NodeRoot {
    /// An empty layout: the node sees this machine's files.
    pub fn new() -> NodeRoot {
        NodeRoot::default()
    }

    /// Mounts an empty tmpfs over the existing directory `dir`.
    pub fn tmpfs(mut self, dir: &str) -> NodeRoot {
        self.tmpfs.push(dir.into());
        self
    }

    /// Makes the existing directory `dir` writable in the node only (an overlay), without
    /// the entries `hidden` (file names in `dir`; shell patterns such as `iptables*`).
    pub fn writable(mut self, dir: &str, hidden: &[&str]) -> NodeRoot {
        self.writable
            .push((dir.into(), hidden.iter().map(|s| s.to_string()).collect()));
        self
    }

    /// Runs the command as PID 1 of a new PID namespace with its own `/proc`, as a node's
    /// init: the node's `/proc/1` is then the command. Without it the node shares this
    /// machine's PIDs and `/proc`, so processes started outside the node (a test's) are
    /// visible in it.
    pub fn own_pid_namespace(mut self) -> NodeRoot {
        self.pid_ns = true;
        self
    }

    /// Creates `dir` (and its parents) in the node, after the mounts.
    pub fn mkdir(mut self, dir: &str) -> NodeRoot {
        self.mkdirs.push(dir.into());
        self
    }

    /// The shell script that lays out the root and then execs its arguments.
    fn script(&self) -> String {
        let q = |p: &Path| shell_quote(&p.display().to_string());
        let mut s = String::from(
            "set -eu\nd=$1; ready=$2; shift 2\nmount -t tmpfs -o mode=0700 istio-cni-test-node \"$d\"\n",
        );
        for (i, (dir, hidden)) in self.writable.iter().enumerate() {
            s += &format!("mkdir \"$d/up{i}\" \"$d/work{i}\"\n");
            for pattern in hidden {
                // Each name of this machine that matches becomes a whiteout.
                s += &format!(
                    "for f in {dir}/{pattern}; do [ -e \"$f\" ] || [ -L \"$f\" ] || continue; mknod \"$d/up{i}/${{f##*/}}\" c 0 0; done\n",
                    dir = q(dir),
                );
            }
            s += &format!(
                "mount -t overlay istio-cni-test-node -o \"lowerdir={dir},upperdir=$d/up{i},workdir=$d/work{i}\" {qdir}\n",
                dir = dir.display(),
                qdir = q(dir),
            );
        }
        for dir in &self.tmpfs {
            s += &format!(
                "mount -t tmpfs -o mode=0755 istio-cni-test-node {}\n",
                q(dir)
            );
        }
        for dir in &self.mkdirs {
            s += &format!("mkdir -p {}\n", q(dir));
        }
        // Shared, as on a systemd host: HostToContainer mounts of the node's dirs need it.
        s += "mount --make-rshared /\n: > \"$ready\"\nexec \"$@\"\n";
        s
    }

    /// Starts `program args` in the node's new mount namespace (as PID 1 of a new PID
    /// namespace with [`NodeRoot::own_pid_namespace`]), in the caller's thread's network
    /// namespace, with stdout and stderr to `log`. Returns when the layout is in place.
    ///
    /// Panics with the log when the layout fails or takes over 10 s.
    pub fn start(&self, program: &Path, args: &[&str], log: &Path) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let mounts = dir.path().join("mounts");
        std::fs::create_dir(&mounts).expect("mkdir");
        let ready = dir.path().join("ready");
        let out = std::fs::File::create(log).expect("log file");
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private"]);
        if self.pid_ns {
            cmd.args(["--pid", "--fork", "--mount-proc"]);
        }
        let child = cmd
            .args(["--", "sh", "-c"])
            .arg(self.script())
            .arg("istio-cni-test-node")
            .arg(&mounts)
            .arg(&ready)
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("spawn unshare (util-linux)");
        let mut node = Node {
            unshare: child,
            init: 0,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            let exited = node.unshare.try_wait().expect("wait").is_some();
            assert!(
                !exited && Instant::now() < deadline,
                "the node's root was not laid out:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid = node.unshare.id();
        node.init = if self.pid_ns {
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .expect("unshare's children")
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .expect("unshare forked PID 1 of the node")
        } else {
            pid
        };
        node
    }
}

/// A running node: its first process (PID 1 of its own PID namespace, if asked) and the
/// `unshare` that runs or waits for it. Dropping it sends SIGTERM to that process, waits up
/// to 10 s, then kills it; with its own PID namespace, the kernel then kills every other
/// process of the node.
pub struct Node {
    unshare: Child,
    init: u32,
    _dir: tempfile::TempDir,
}

impl Node {
    /// The node's first process, as this machine numbers it.
    pub fn init_pid(&self) -> u32 {
        self.init
    }

    /// The node's mount namespace (what the agent's `HOST_MOUNT_NS` names).
    pub fn mount_ns(&self) -> PathBuf {
        format!("/proc/{}/ns/mnt", self.init).into()
    }

    /// `path` of the node, as this machine reaches it (through `/proc/<pid>/root`, with
    /// the node's symlinks followed inside the node: see [`resolve_in`]).
    pub fn path(&self, path: &str) -> PathBuf {
        resolve_in(
            Path::new(&format!("/proc/{}/root", self.init)),
            Path::new(path),
        )
    }

    /// Whether PID 1 still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.unshare.try_wait(), Ok(None))
    }

    /// Sends SIGTERM to PID 1 and waits for it (killing it after `grace`).
    pub fn stop(&mut self, grace: Duration) {
        let pid = nix::unistd::Pid::from_raw(self.init as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.unshare.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.unshare.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.running() {
            self.stop(Duration::from_secs(10));
        }
    }
}

/// `path` resolved inside `root` as a process whose root is `root` would resolve it:
/// symlinks are followed, and an absolute target (Debian's `/var/run` → `/run`) starts
/// again at `root` instead of at this machine's `/`. The last component is followed too
/// when it exists; up to 40 links (the kernel's limit).
pub fn resolve_in(root: &Path, path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .map(|c| c.as_os_str().to_owned())
        .collect();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        match Path::new(&part).components().next() {
            Some(Component::ParentDir) => {
                out.pop();
            }
            Some(Component::Normal(name)) => {
                let candidate = out.join(name);
                let full = root.join(&candidate);
                let is_link =
                    std::fs::symlink_metadata(&full).is_ok_and(|m| m.file_type().is_symlink());
                match std::fs::read_link(&full) {
                    Ok(target) if is_link && links < 40 => {
                        links += 1;
                        if target.is_absolute() {
                            out = PathBuf::new();
                        }
                        pending.extend(target.components().rev().map(|c| c.as_os_str().to_owned()));
                    }
                    _ => out = candidate,
                }
            }
            _ => {}
        }
    }
    root.join(out)
}

/// `s` in single quotes for `sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::resolve_in;

    #[test]
    fn absolute_links_resolve_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("run/netns")).unwrap();
        std::fs::create_dir(r.join("var")).unwrap();
        std::os::unix::fs::symlink("/run", r.join("var/run")).unwrap();
        std::os::unix::fs::symlink("../run", r.join("var/rel")).unwrap();
        assert_eq!(
            resolve_in(r, "/var/run/netns/x".as_ref()),
            r.join("run/netns/x")
        );
        assert_eq!(
            resolve_in(r, "/var/rel/netns".as_ref()),
            r.join("run/netns")
        );
        assert_eq!(resolve_in(r, "/../../etc".as_ref()), r.join("etc"));
        assert_eq!(resolve_in(r, "/".as_ref()), r.to_path_buf());
    }
}
