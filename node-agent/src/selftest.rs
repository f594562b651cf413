//! The self-test: proof that the plugin works on this node. It runs the installed binary
//! for real, ADD then CHECK then DEL, in a scratch netns with a synthetic meshed pod read
//! from a local file (no API call, so the result does not depend on cluster state). ADD
//! itself writes, reads back and probes the rules, so a pass proves that this node's
//! kernel, iptables binaries and our binary work together. Afterwards no rule, netns or
//! file of the test is left.
//!
//! It runs the plugin as the node's runtime will ([`HostView`]): the binary at its path on
//! the host, in the host's mount namespace (so the host's root file system, libc and
//! `iptables`, not the image's), with a clean environment holding only the runtime's
//! `PATH` and the `CNI_*` variables (libcni's `invoke` passes the runtime's own environment
//! plus `CNI_*`: CNI spec, section "Parameters").

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write as _};
use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use istio_cni::apply::Xtables;
use istio_cni::rules::Family;
use istio_cni::scratch::ScratchNetns;
use serde_json::{json, Map, Value};

/// Namespace and name of the synthetic pod.
pub const POD_NAMESPACE: &str = "istio-cni-self-test";
/// See [`POD_NAMESPACE`].
pub const POD_NAME: &str = "self-test";

/// `PATH` that the self-test gives the plugin unless told otherwise: systemd's default for
/// services (`systemd.exec(5)`, "Environment variables in spawned processes"), which is
/// what a containerd or CRI-O started by systemd has and hands to its CNI plugins.
pub const DEFAULT_HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How much longer than the plugin's own validation probe timeout (`validation.timeout_ms`
/// of the entry, at most 60 s) one verb of the self-test may take before the plugin is
/// killed and the self-test fails: the probe is the only long wait of a verb, the rest
/// (reading the pod file, writing and reading back rules) takes milliseconds.
pub const VERB_TIMEOUT_MARGIN: Duration = Duration::from_secs(30);

/// How long one verb may take with `entry`: its validation probe timeout plus
/// [`VERB_TIMEOUT_MARGIN`].
pub fn verb_timeout(entry: &Map<String, Value>) -> Duration {
    let probe_ms = entry
        .get("validation")
        .and_then(|v| v.get("timeout_ms"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Duration::from_millis(probe_ms) + VERB_TIMEOUT_MARGIN
}

/// The longest a whole self-test with `entry` can take: three verbs of at most
/// [`verb_timeout`] each, and 30 s for the scratch netns and the leftover checks. Used as
/// its liveness bound: a self-test running longer is stuck.
pub fn time_limit(entry: &Map<String, Value>) -> Duration {
    3 * verb_timeout(entry) + Duration::from_secs(30)
}

/// The most bytes kept of the plugin's stdout or stderr (the rest is read and dropped).
const OUTPUT_LIMIT: u64 = 1 << 20;

/// How the node's runtime runs the plugin, which the self-test reproduces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// The node's mount namespace file (the host's `/proc/1/ns/mnt`, which the DaemonSet
    /// mounts as `/host/proc/1/ns/mnt`); `None` runs the plugin in the agent's own mount
    /// namespace, for an agent that runs on the host itself.
    pub mount_ns: Option<PathBuf>,
    /// The CNI bin dir as that mount namespace sees it (`/opt/cni/bin` on most nodes): the
    /// plugin is `istio-cni` there, and it is the plugin's `CNI_PATH`.
    pub cni_bin_dir: PathBuf,
    /// The runtime's `PATH`, in which the plugin looks for `iptables`.
    pub path: OsString,
}

impl HostView {
    /// The installed plugin's path in the node's mount namespace.
    pub fn plugin(&self) -> PathBuf {
        self.cni_bin_dir.join(crate::install::PLUGIN_BINARY)
    }
}

/// Why the self-test failed.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    /// The test could not be set up (netns, pod file).
    #[error("self-test setup: {0}")]
    Setup(String),
    /// The node's mount namespace cannot be opened.
    #[error("self-test: cannot open the node's mount namespace {path}: {reason}")]
    HostMountNs {
        /// The namespace file ([`HostView::mount_ns`]).
        path: PathBuf,
        /// Why, with what to check.
        reason: String,
    },
    /// A CNI verb failed.
    #[error("self-test {verb} failed (exit {exit}): {msg}")]
    Verb {
        /// ADD, CHECK or DEL.
        verb: &'static str,
        /// The plugin's exit code, or -1 when it was killed.
        exit: i32,
        /// The CNI error message, or the plugin's stderr.
        msg: String,
    },
    /// DEL left rules behind.
    #[error("self-test DEL left rules behind: {0}")]
    Leftover(String),
}

/// Runs the self-test of the plugin installed as `host` sees it, with our chain `entry`,
/// keeping its pod file in `work_dir` while it runs. `work_dir` must be the same path on
/// the host and in the agent (the agent run dir is). Each verb that takes longer than
/// [`verb_timeout`] is killed and fails the test, so the whole takes at most
/// [`time_limit`]. The pod file and the container ID are unique to this run (PID and
/// random bits), so two agents self-testing at once (an upgrade) never share them.
/// Returns how long it took.
///
/// Errors: [`SelfTestError`] saying which step failed and why.
pub fn run(
    host: &HostView,
    entry: &Map<String, Value>,
    work_dir: &Path,
) -> Result<Duration, SelfTestError> {
    let start = Instant::now();
    let mount_ns = host.mount_ns.as_deref().map(open_mount_ns).transpose()?;
    let scratch = ScratchNetns::create().map_err(|e| SelfTestError::Setup(e.to_string()))?;
    let pod_file = PodFile::write(work_dir)?;
    let mut conf = entry.clone();
    conf.insert("cniVersion".into(), json!("1.0.0"));
    conf.insert("name".into(), json!("istio-cni-self-test"));
    conf.insert("exclude_namespaces".into(), json!([]));
    conf.insert("local_pod_file".into(), json!(pod_file.0));
    conf.insert(
        "prevResult".into(),
        json!({"cniVersion": "1.0.0", "ips": [{"address": "10.255.255.2/32"}]}),
    );
    let conf = Value::Object(conf).to_string();
    let runtime = Runtime {
        host,
        timeout: verb_timeout(entry),
        container_id: format!(
            "istio-cni-self-test-{}-{:016x}",
            std::process::id(),
            crate::install::fsutil::random_u64()
        ),
        mount_ns: mount_ns.as_ref().map(|f| f.as_raw_fd()),
        netns: scratch.netns().as_fd().as_raw_fd(),
    };
    for verb in ["ADD", "CHECK", "DEL"] {
        runtime.exec(verb, &conf)?;
    }
    // What DEL must have removed, with whichever backend's tools the agent has.
    let setup = |e: String| SelfTestError::Setup(e);
    if let Ok(xt) = Xtables::detect() {
        let left = scratch
            .netns()
            .run(|inside| xt.binaries(Family::V4).and_then(|b| b.save_text(inside)))
            .map_err(|e| setup(e.to_string()))?
            .map_err(|e| setup(e.to_string()))?;
        if let Some(line) = left.lines().find(|l| l.contains("ISTIO")) {
            return Err(SelfTestError::Leftover(line.to_owned()));
        }
    }
    // A kernel without nf_tables has none of our tables to leave.
    if let Ok(Ok(tables)) = scratch.netns().run(istio_cni::nft::tables) {
        if let Some(table) = tables.iter().find(|t| t.is_ours()) {
            return Err(SelfTestError::Leftover(format!(
                "table {}",
                table.describe()
            )));
        }
    }
    Ok(start.elapsed())
}

/// The synthetic pod: injected, with a sidecar, in a namespace of its own.
pub fn synthetic_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": POD_NAME, "namespace": POD_NAMESPACE,
                     "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"}},
        "spec": {"containers": [{"name": "app", "image": "self-test"},
                                {"name": "istio-proxy", "image": "self-test", "args": ["proxy", "sidecar"]}]}
    })
}

/// The pod file, removed on drop.
struct PodFile(PathBuf);

impl PodFile {
    /// A new file in `dir`, under a name no other writer uses (removed on drop, and only
    /// by us).
    fn write(dir: &Path) -> Result<PodFile, SelfTestError> {
        let path = dir.join(format!(
            ".istio-cni-self-test-{}-{:016x}.json",
            std::process::id(),
            crate::install::fsutil::random_u64()
        ));
        let fail =
            |e: std::io::Error| SelfTestError::Setup(format!("writing {}: {e}", path.display()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(fail)?;
        let pod = PodFile(path.clone());
        file.write_all(synthetic_pod().to_string().as_bytes())
            .map_err(fail)?;
        Ok(pod)
    }
}

impl Drop for PodFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Opens the mount namespace file `path` and checks that it is one.
fn open_mount_ns(path: &Path) -> Result<File, SelfTestError> {
    let fail = |reason: String| SelfTestError::HostMountNs {
        path: path.into(),
        reason,
    };
    // Non-blocking, so that a FIFO (or another odd file) named by the setting fails the
    // checks below instead of hanging the self-test.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            fail(format!(
                "{e} (the DaemonSet mounts the host's /proc at /host/proc; an agent run on \
                 the host itself sets HOST_MOUNT_NS to an empty value)"
            ))
        })?;
    // NS_GET_NSTYPE (linux/nsfs.h): the namespace type of an nsfs file, as a CLONE_NEW* flag.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without argument on a descriptor we own.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNS {
        return Err(fail("not a mount namespace file".into()));
    }
    Ok(file)
}

/// The plugin's execution as the runtime does it: see [`HostView`].
struct Runtime<'a> {
    host: &'a HostView,
    /// How long one verb may take (see [`verb_timeout`]).
    timeout: Duration,
    /// `CNI_CONTAINERID`, unique to this run.
    container_id: String,
    /// The node's mount namespace, entered by the child before exec.
    mount_ns: Option<RawFd>,
    /// The scratch netns, inherited by the plugin as `CNI_NETNS=/proc/self/fd/N`: that path
    /// names it in any mount namespace whose `/proc` shows the plugin, which the host's does.
    netns: RawFd,
}

impl Runtime<'_> {
    fn exec(&self, verb: &'static str, conf: &str) -> Result<(), SelfTestError> {
        let plugin = self.host.plugin();
        let spawn_err = |e: std::io::Error| {
            let hint = match (e.raw_os_error(), &self.host.mount_ns) {
                (Some(libc::ENOENT), Some(_)) => " (not at this path on the node: HOST_CNI_BIN_DIR must be the host's path of CNI_BIN_DIR)",
                (Some(libc::EPERM), Some(_)) => " (entering the node's mount namespace needs CAP_SYS_ADMIN and CAP_SYS_CHROOT)",
                _ => "",
            };
            let place = match &self.host.mount_ns {
                Some(ns) => format!(" in the mount namespace {}", ns.display()),
                None => String::new(),
            };
            SelfTestError::Verb {
                verb,
                exit: -1,
                msg: format!("cannot run {}{place}: {e}{hint}", plugin.display()),
            }
        };
        let mut cmd = Command::new(&plugin);
        cmd.env_clear()
            .env("PATH", &self.host.path)
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", format!("/proc/self/fd/{}", self.netns))
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME={POD_NAME}"),
            )
            .env("CNI_PATH", &self.host.cni_bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (mount_ns, netns) = (self.mount_ns, self.netns);
        // SAFETY: between fork and exec the closure makes only async-signal-safe syscalls
        // (setns, fcntl) on descriptors that stay open in the parent until the child exits.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = mount_ns {
                    if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Only this child's copy of the descriptor loses close-on-exec.
                if libc::fcntl(netns, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin that fails before reading its config closes stdin early: its exit
            // code and error output below say why, so a broken pipe here is not the error.
            match stdin.write_all(conf.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(spawn_err(e)),
                _ => {}
            }
        }
        // Read both pipes on threads, so that a chatty plugin never blocks on a full
        // pipe while we wait for it.
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.by_ref().take(OUTPUT_LIMIT).read_to_end(&mut kept);
                    let _ = std::io::copy(&mut pipe, &mut std::io::sink());
                }
                kept
            })
        };
        let stdout = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let stderr = drain(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait().map_err(spawn_err)? {
                Some(status) => break status,
                None if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    // The drain threads end when the plugin's children close the pipes.
                    return Err(SelfTestError::Verb {
                        verb,
                        exit: -1,
                        msg: format!(
                            "{} did not finish within {:?} (its validation timeout plus {:?}); killed it",
                            plugin.display(),
                            self.timeout,
                            VERB_TIMEOUT_MARGIN
                        ),
                    });
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        let msg = serde_json::from_slice::<Value>(&stdout)
            .ok()
            .and_then(|e| e.get("msg").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&stderr).trim().to_owned());
        Err(SelfTestError::Verb {
            verb,
            exit: status.code().unwrap_or(-1),
            msg,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_hung_plugin_is_killed_after_the_verb_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join(crate::install::PLUGIN_BINARY);
        std::fs::write(&plugin, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let host = HostView {
            mount_ns: None,
            cni_bin_dir: dir.path().into(),
            path: "/usr/bin:/bin".into(),
        };
        let netns = File::open("/dev/null").unwrap();
        let runtime = Runtime {
            host: &host,
            timeout: Duration::from_millis(300),
            container_id: "c".into(),
            mount_ns: None,
            netns: netns.as_raw_fd(),
        };
        let start = Instant::now();
        let e = runtime.exec("ADD", "{}").unwrap_err().to_string();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(
            e.contains("did not finish within 300ms") && e.contains("killed"),
            "{e}"
        );

        let entry = serde_json::json!({"validation": {"timeout_ms": 60000}});
        let entry = entry.as_object().unwrap();
        assert_eq!(verb_timeout(entry), Duration::from_secs(90));
        assert_eq!(time_limit(entry), Duration::from_secs(300));
    }
}
