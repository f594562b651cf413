//! A real container runtime for tests: containerd (Debian `containerd` + `runc`) started
//! inside a test netns with its own root, state, socket and CNI directories, a pause image
//! built offline from Debian's `busybox-static`, and a CRI client over the unix socket
//! (`k8s-cri`, i.e. what kubelet speaks).
//!
//! Everything lives under one temp dir and is torn down on drop: sandboxes are stopped
//! and removed through CRI first (so no shim or netns outlives the test), then containerd
//! is stopped.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerStatusRequest, CreateContainerRequest, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListPodSandboxRequest, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopContainerRequest,
    StopPodSandboxRequest,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::net::TestNetns;
use crate::node::{Node, NodeRoot};

/// Name of the pause image the test imports.
pub const PAUSE_IMAGE: &str = "docker.io/istio-cni-test/pause:1";
/// The busybox binary the pause image is built from.
pub const BUSYBOX: &str = "/bin/busybox";
/// containerd's CRI namespace.
const CRI_NAMESPACE: &str = "k8s.io";

/// containerd's directories (config, CNI conf and bin dirs, state), before it starts:
/// a test fills the CNI dirs (by hand or with the node agent), then [`Self::start`]s it.
pub struct ContainerdDirs {
    dir: tempfile::TempDir,
}

impl ContainerdDirs {
    /// Creates the directory tree under a new temp dir.
    pub fn new() -> ContainerdDirs {
        let dir = tempfile::tempdir().expect("temp dir");
        for sub in ["bin", "net.d", "root", "state", "runc", "logs", "opt"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        ContainerdDirs { dir }
    }

    /// The CNI conf dir containerd reads (`/etc/cni/net.d` on a node).
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("net.d")
    }

    /// The CNI bin dir containerd execs plugins from (`/opt/cni/bin` on a node).
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    /// Links `bins` into the CNI bin dir.
    pub fn link_plugins(&self, bins: &[PathBuf]) {
        for bin in bins {
            let name = bin.file_name().expect("binary name");
            std::os::unix::fs::symlink(bin, self.bin_dir().join(name)).expect("link plugin");
        }
    }

    /// Writes a file into the CNI conf dir.
    pub fn write_conf(&self, name: &str, content: &str) {
        std::fs::write(self.conf_dir().join(name), content).expect("write CNI conf");
    }

    /// Starts containerd inside `netns` (its CNI plugins run there), then imports the
    /// pause image.
    ///
    /// Panics with containerd's log when it does not come up within 30 s.
    pub fn start(self, netns: &TestNetns) -> Containerd {
        Containerd::start_in(self.dir, netns, None)
    }

    /// Starts containerd as PID 1 of a node ([`crate::node`]) laid out as `root`, inside
    /// `netns`, with the node's own CNI dirs, `/opt/cni/bin` and `/etc/cni/net.d` (which
    /// `root` must provide), instead of this value's: the node's runtime, for a DaemonSet
    /// whose hostPath volumes and host mount namespace must be the node's. Then imports
    /// the pause image.
    ///
    /// Panics with containerd's log when it does not come up within 30 s.
    pub fn start_on_node(self, netns: &TestNetns, root: &NodeRoot) -> Containerd {
        Containerd::start_in(self.dir, netns, Some(root))
    }
}

impl Default for ContainerdDirs {
    fn default() -> Self {
        Self::new()
    }
}

/// A containerd instance with the CRI plugin.
pub struct Containerd {
    dir: tempfile::TempDir,
    process: Option<Process>,
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    /// Sandboxes' cgroups go below this (removed on drop), as kubelet's `kubepods` tree.
    cgroup_root: String,
}

/// How containerd runs: a child of the test, or PID 1 of a node.
enum Process {
    Child(Child),
    Node(Node),
}

/// A sandbox created through CRI.
#[derive(Debug, Clone)]
pub struct PodSandbox {
    /// The CRI sandbox ID.
    pub id: String,
    /// Its network namespace path, from the sandbox's runtime spec.
    pub netns: PathBuf,
    /// Its pod IP, from the sandbox status.
    pub ip: String,
}

impl Containerd {
    /// Starts containerd inside `netns` (its CNI plugins run there), with the CNI
    /// configuration files `conf_files` (name → content) and the plugin binaries `bins`
    /// (linked into its CNI bin dir), then imports the pause image.
    ///
    /// Panics with containerd's log when it does not come up within 30 s.
    pub fn start(netns: &TestNetns, conf_files: &[(&str, String)], bins: &[PathBuf]) -> Containerd {
        let dirs = ContainerdDirs::new();
        dirs.link_plugins(bins);
        for (name, content) in conf_files {
            dirs.write_conf(name, content);
        }
        dirs.start(netns)
    }

    fn start_in(dir: tempfile::TempDir, netns: &TestNetns, node: Option<&NodeRoot>) -> Containerd {
        let d = dir.path();
        let (bin, netd) = match node {
            Some(_) => ("/opt/cni/bin".into(), "/etc/cni/net.d".into()),
            None => (d.join("bin"), d.join("net.d")),
        };
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{netd}"
    max_conf_num = 1
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
            opt = d.join("opt").display(),
            runc = d.join("runc").display(),
            bin = bin.display(),
            netd = netd.display(),
        );
        std::fs::write(d.join("config.toml"), config).expect("write config");
        let config = d.join("config.toml");
        let process = match node {
            Some(root) => {
                let containerd = find_program("containerd");
                let config = config.to_str().expect("utf-8 path");
                Process::Node(
                    netns
                        .open()
                        .run(|_| {
                            root.start(
                                &containerd,
                                &["--config", config],
                                &d.join("containerd.log"),
                            )
                        })
                        .expect("enter netns"),
                )
            }
            None => {
                let log = std::fs::File::create(d.join("containerd.log")).expect("log file");
                Process::Child(
                    netns
                        .open()
                        .run(|_| {
                            Command::new("containerd")
                                .arg("--config")
                                .arg(&config)
                                .stdin(Stdio::null())
                                .stdout(log.try_clone().expect("log fd"))
                                .stderr(log)
                                .spawn()
                        })
                        .expect("enter netns")
                        .expect("spawn containerd (is the containerd package installed?)"),
                )
            }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let sock = d.join("containerd.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start:\n{}",
                std::fs::read_to_string(d.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let client = rt.block_on(connect(sock.clone()));
        let mut c = Containerd {
            dir,
            process: Some(process),
            rt,
            client,
            cgroup_root: format!("/istio-cni-test-{}", crate::net::unique_name("ctd")),
        };
        c.import_pause_image();
        c
    }

    /// The temp dir holding everything (config, log, state).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("containerd.log")).unwrap_or_default()
    }

    fn import_pause_image(&mut self) {
        let archive = self.dir().join("pause.tar");
        write_pause_image(&archive);
        self.ctr(&["images", "import", archive.to_str().expect("utf-8 path")]);
    }

    /// Runs `ctr` against this containerd in the CRI namespace (`k8s.io`) with `args`, and
    /// returns its stdout; panics when it fails.
    pub fn ctr(&self, args: &[&str]) -> String {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.dir().join("containerd.sock"))
            .args(["--namespace", CRI_NAMESPACE])
            .args(args)
            .output()
            .expect("run ctr");
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `RunPodSandbox` for a pod `namespace/name` with `uid`, in its own network namespace,
    /// its processes in the cgroup parent kubelet's cgroupfs driver would give it
    /// (`…/kubepods/besteffort/pod<uid>`, below this instance's own cgroup root).
    ///
    /// Errors: the CRI status (for example a CNI ADD failure) as text.
    pub fn run_pod_sandbox(
        &mut self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<PodSandbox, String> {
        let cgroup_parent = format!("{}/kubepods/besteffort/pod{uid}", self.cgroup_root);
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.dir().join("logs").display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: NamespaceMode::Pod as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                cgroup_parent,
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        };
        let id = self
            .rt
            .block_on(self.client.run_pod_sandbox(req))
            .map_err(|s| s.message().to_owned())?
            .into_inner()
            .pod_sandbox_id;
        let status = self
            .rt
            .block_on(self.client.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: true,
            }))
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        let ip = status
            .status
            .as_ref()
            .and_then(|s| s.network.as_ref())
            .map(|n| n.ip.clone())
            .unwrap_or_default();
        let info: Value =
            serde_json::from_str(status.info.get("info").map(String::as_str).unwrap_or("{}"))
                .map_err(|e| format!("sandbox info: {e}"))?;
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .ok_or_else(|| format!("no network namespace in sandbox info {info}"))?;
        Ok(PodSandbox {
            id,
            netns: netns.into(),
            ip,
        })
    }

    /// `StopPodSandbox` (runs CNI DEL).
    ///
    /// Errors: the CRI status as text.
    pub fn stop_pod_sandbox(&mut self, id: &str) -> Result<(), String> {
        self.rt
            .block_on(self.client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .map(drop)
            .map_err(|s| s.message().to_owned())
    }

    /// `RemovePodSandbox`.
    ///
    /// Errors: the CRI status as text.
    pub fn remove_pod_sandbox(&mut self, id: &str) -> Result<(), String> {
        self.rt
            .block_on(self.client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .map(drop)
            .map_err(|s| s.message().to_owned())
    }

    /// The node containerd runs as PID 1 of ([`ContainerdDirs::start_on_node`]).
    pub fn node(&self) -> Option<&Node> {
        match &self.process {
            Some(Process::Node(node)) => Some(node),
            _ => None,
        }
    }

    /// `RunPodSandbox` with a config the caller built (for example from a pod template),
    /// in this instance's cgroup tree as [`Containerd::run_pod_sandbox`] does.
    ///
    /// Errors: the CRI status as text.
    pub fn run_pod_sandbox_with(&mut self, mut config: PodSandboxConfig) -> Result<String, String> {
        let uid = config
            .metadata
            .as_ref()
            .map(|m| m.uid.clone())
            .unwrap_or_default();
        if let Some(linux) = config.linux.as_mut() {
            linux.cgroup_parent = format!("{}/kubepods/besteffort/pod{uid}", self.cgroup_root);
        }
        let req = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        };
        self.rt
            .block_on(self.client.run_pod_sandbox(req))
            .map(|r| r.into_inner().pod_sandbox_id)
            .map_err(|s| s.message().to_owned())
    }

    /// `CreateContainer` then `StartContainer` in sandbox `sandbox` (created from
    /// `sandbox_config`); returns the container ID.
    ///
    /// Errors: the CRI status as text.
    pub fn start_container(
        &mut self,
        sandbox: &str,
        sandbox_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String, String> {
        let id = self
            .rt
            .block_on(self.client.create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.into(),
                config: Some(config),
                sandbox_config: Some(sandbox_config.clone()),
            }))
            .map_err(|s| s.message().to_owned())?
            .into_inner()
            .container_id;
        self.rt
            .block_on(self.client.start_container(StartContainerRequest {
                container_id: id.clone(),
            }))
            .map_err(|s| s.message().to_owned())?;
        Ok(id)
    }

    /// `StopContainer`: SIGTERM (the image's stop signal), then SIGKILL after `grace`, as
    /// kubelet does with `terminationGracePeriodSeconds`. Returns the exit code.
    ///
    /// Errors: the CRI status as text.
    pub fn stop_container(&mut self, id: &str, grace: Duration) -> Result<i32, String> {
        self.rt
            .block_on(self.client.stop_container(StopContainerRequest {
                container_id: id.into(),
                timeout: grace.as_secs() as i64,
            }))
            .map_err(|s| s.message().to_owned())?;
        self.container_exit_code(id)
            .ok_or_else(|| format!("container {id} has no exit code after StopContainer"))
    }

    /// The exit code of container `id`, if it has exited.
    pub fn container_exit_code(&mut self, id: &str) -> Option<i32> {
        let status = self
            .rt
            .block_on(self.client.container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }))
            .ok()?
            .into_inner()
            .status?;
        (status.finished_at != 0).then_some(status.exit_code)
    }

    /// `RemoveContainer`.
    ///
    /// Errors: the CRI status as text.
    pub fn remove_container(&mut self, id: &str) -> Result<(), String> {
        self.rt
            .block_on(self.client.remove_container(RemoveContainerRequest {
                container_id: id.into(),
            }))
            .map(drop)
            .map_err(|s| s.message().to_owned())
    }

    /// IDs of every sandbox containerd knows.
    pub fn list_pod_sandboxes(&mut self) -> Vec<String> {
        self.rt
            .block_on(
                self.client
                    .list_pod_sandbox(ListPodSandboxRequest { filter: None }),
            )
            .map(|r| r.into_inner().items.into_iter().map(|s| s.id).collect())
            .unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in self.list_pod_sandboxes() {
            let _ = self.stop_pod_sandbox(&id);
            let _ = self.remove_pod_sandbox(&id);
        }
        if let Some(Process::Child(mut child)) = self.process.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // A node's PID 1 is containerd: dropping the node stops it and the kernel ends the
        // rest of the node's processes.
        drop(self.process.take());
        remove_cgroup_tree(&self.cgroup_root);
    }
}

async fn connect(sock: PathBuf) -> RuntimeServiceClient<Channel> {
    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(sock).await?))
            }
        }))
        .await
        .expect("connect to the CRI socket");
    RuntimeServiceClient::new(channel)
}

/// Writes an OCI image archive (`oci-layout`, `index.json`, blobs) for [`PAUSE_IMAGE`]: one
/// uncompressed layer with busybox, whose shell waits for SIGTERM.
pub fn write_pause_image(path: &Path) {
    let busybox = std::fs::read(BUSYBOX)
        .unwrap_or_else(|e| panic!("{BUSYBOX}: {e} (install busybox-static)"));
    let mut layer = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(busybox.len() as u64);
    header.set_mode(0o755);
    header.set_cksum();
    layer
        .append_data(&mut header, "bin/busybox", busybox.as_slice())
        .expect("layer");
    let layer = layer.into_inner().expect("layer tar");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = json!({
        "architecture": arch, "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox", "sh", "-c",
            "trap 'exit 0' TERM INT; while :; do /bin/busybox sleep 3600 & wait $!; done"]},
        "rootfs": {"type": "layers", "diff_ids": [digest(&layer)]},
    })
    .to_string()
    .into_bytes();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(&layer), "size": layer.len()}],
    })
    .to_string()
    .into_bytes();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": digest(&manifest), "size": manifest.len(),
                       "annotations": {"io.containerd.image.name": PAUSE_IMAGE,
                                       "org.opencontainers.image.ref.name": "1"}}],
    })
    .to_string()
    .into_bytes();
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    for blob in [&layer, &config, &manifest] {
        let d = digest(blob);
        files.insert(
            format!("blobs/sha256/{}", &d["sha256:".len()..]),
            blob.clone(),
        );
    }
    files.insert("index.json".into(), index);
    files.insert(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    let mut archive = tar::Builder::new(std::fs::File::create(path).expect("archive"));
    for (name, data) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        archive
            .append_data(&mut h, name, data.as_slice())
            .expect("archive entry");
    }
    archive
        .into_inner()
        .expect("archive")
        .flush()
        .expect("flush");
}

/// `name`'s path in `PATH` (or the usual sbin and bin dirs).
fn find_program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found (is its package installed?)"))
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Removes the cgroup subtree `relative` (e.g. `/istio-cni-e2e-x`) from every mounted
/// cgroup hierarchy, deepest first; runtimes leave the parents they were given. Best
/// effort.
pub fn remove_cgroup_tree(relative: &str) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(_), Some(dir), Some(kind)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if kind == "cgroup" || kind == "cgroup2" {
            crate::kubelet::rmdir_tree(&Path::new(dir).join(relative.trim_start_matches('/')));
        }
    }
}
