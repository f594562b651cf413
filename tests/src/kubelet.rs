//! Running pods as a kubelet and its runtime leave them on a node, for the repair loop's
//! tests: a netns with the pod IP on `eth0`, and either a process in a cgroup whose path
//! names the pod UID (in the systemd or the cgroupfs layout) or only a bind-mounted netns
//! file (a runtime without an infra container). Rules come from the real `istio-cni`
//! binary's ADD. Everything is removed on drop.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{json, Value};

use crate::chain::{Attachment, Chain, PluginFailure};
use crate::net::{run, unique_name, TestNetns};
use crate::sandbox::plugin_dir;

/// How the runtime left the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A process in `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`.
    Systemd,
    /// A process in `kubepods/burstable/pod<uid>/<id>`.
    Cgroupfs,
    /// No process: only the netns pinned as a file in the node's netns dir.
    BindMountOnly,
}

/// The node side: a private cgroup subtree and netns dir for this test's pods.
pub struct NodePods {
    cgroup_root: PathBuf,
    netns_dir: tempfile::TempDir,
}

static UIDS: AtomicU32 = AtomicU32::new(0);

/// A pod UID unique across concurrently running tests (pid, counter, clock).
pub fn unique_uid() -> String {
    let n = UIDS.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        std::process::id(),
        n & 0xffff,
        (n >> 16) & 0xfff,
        nanos & 0xfff,
        (nanos >> 12) & 0xffff_ffff_ffff
    )
}

/// The writable cgroup hierarchy to put test processes in: the cgroup2 mount, else a v1
/// hierarchy kubelet uses (`pids`, `memory`, `name=systemd`).
fn cgroup_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    let fields = |l: &str| -> Option<(String, String, String)> {
        let mut f = l.split_whitespace();
        let (_, dir, kind, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
        Some((dir.to_owned(), kind.to_owned(), opts.to_owned()))
    };
    let all: Vec<_> = mounts.lines().filter_map(fields).collect();
    all.iter()
        .find(|(_, kind, _)| kind == "cgroup2")
        .or_else(|| {
            all.iter().find(|(_, kind, opts)| {
                kind == "cgroup"
                    && opts
                        .split(',')
                        .any(|o| ["pids", "memory", "name=systemd"].contains(&o))
            })
        })
        .map(|(dir, _, _)| PathBuf::from(dir))
        .expect("a cgroup v2 or v1 hierarchy is mounted")
}

impl Default for NodePods {
    fn default() -> Self {
        Self::new()
    }
}

impl NodePods {
    /// A fresh cgroup subtree (`<mount>/istio-cni-test-<unique>`) and netns dir.
    pub fn new() -> NodePods {
        let cgroup_root = cgroup_mount().join(format!("istio-cni-test-{}", unique_name("cg")));
        std::fs::create_dir(&cgroup_root)
            .unwrap_or_else(|e| panic!("create {}: {e}", cgroup_root.display()));
        NodePods {
            cgroup_root,
            netns_dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// The dir holding bind-mounted netns files (the agent's `--netns-dirs`).
    pub fn netns_dir(&self) -> &Path {
        self.netns_dir.path()
    }

    /// Starts a pod with address `ip`/24 on `eth0` and `lo` up, laid out as `layout`.
    pub fn start(&self, layout: Layout, ip: Ipv4Addr) -> RunningPod {
        let uid = unique_uid();
        let netns = TestNetns::new("rp");
        // A veth pair kept inside the netns (no dummy module needed): eth0 and its peer.
        netns.exec(&[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ]);
        netns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        netns.exec(&["ip", "link", "set", "eth0", "up"]);
        netns.exec(&["ip", "link", "set", "peer0", "up"]);
        let container = unique_name("ctr");
        let mut pod = RunningPod {
            uid: uid.clone(),
            ip,
            ipv6: None,
            netns,
            holder: None,
            cgroup_dirs: Vec::new(),
            bind_mount: None,
        };
        let leaf = match layout {
            Layout::Systemd => {
                let pod_dir = self
                    .cgroup_root
                    .join("kubepods.slice/kubepods-besteffort.slice")
                    .join(format!(
                        "kubepods-besteffort-pod{}.slice",
                        uid.replace('-', "_")
                    ));
                pod.cgroup_dirs.push(pod_dir.clone());
                Some(pod_dir.join(format!("cri-containerd-{container}.scope")))
            }
            Layout::Cgroupfs => {
                let pod_dir = self
                    .cgroup_root
                    .join("kubepods/burstable")
                    .join(format!("pod{uid}"));
                pod.cgroup_dirs.push(pod_dir.clone());
                Some(pod_dir.join(&container))
            }
            Layout::BindMountOnly => None,
        };
        match leaf {
            Some(leaf) => start_process(&mut pod, leaf),
            None => self.pin(&mut pod),
        }
        pod
    }

    /// Starts the first process of a pod that had none (`Layout::BindMountOnly`), as the
    /// runtime starts a new sandbox's pause process a moment after its netns got its IP:
    /// in a systemd-layout cgroup naming the pod's UID, in the pod's netns.
    pub fn start_first_process(&self, pod: &mut RunningPod) {
        let pod_dir = self
            .cgroup_root
            .join("kubepods.slice/kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                pod.uid.replace('-', "_")
            ));
        pod.cgroup_dirs.push(pod_dir.clone());
        start_process(
            pod,
            pod_dir.join(format!("cri-containerd-{}.scope", unique_name("ctr"))),
        );
    }
}

/// The "pause" process: sleeps in the pod's netns, in cgroup `leaf` (created).
fn start_process(pod: &mut RunningPod, leaf: PathBuf) {
    std::fs::create_dir_all(&leaf)
        .unwrap_or_else(|e| panic!("create cgroup {}: {e}", leaf.display()));
    pod.cgroup_dirs.insert(0, leaf.clone());
    let child = Command::new("ip")
        .args(["netns", "exec", &pod.netns.name, "sleep", "3600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the pod's process");
    let pid = child.id();
    pod.holder = Some(child);
    std::fs::write(leaf.join("cgroup.procs"), pid.to_string())
        .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", leaf.display()));
}

impl NodePods {
    /// Pins `pod`'s netns as a file in the node's netns dir too, as a runtime with an
    /// infra container also does (removed with the pod).
    pub fn pin(&self, pod: &mut RunningPod) {
        let file = self.netns_dir.path().join(unique_name("ns"));
        std::fs::write(&file, "").expect("netns mount point");
        run(Command::new("mount")
            .arg("--bind")
            .arg(pod.netns.path())
            .arg(&file));
        pod.bind_mount = Some(file);
    }
}

impl Drop for NodePods {
    fn drop(&mut self) {
        rmdir_tree(&self.cgroup_root);
    }
}

/// One running pod on the node.
pub struct RunningPod {
    /// `metadata.uid`, as named by its cgroup.
    pub uid: String,
    /// Its IPv4 address, on `eth0`.
    pub ip: Ipv4Addr,
    /// Its IPv6 address, on `eth0`, for a dual-stack pod ([`RunningPod::with_ipv6`]).
    pub ipv6: Option<Ipv6Addr>,
    /// Its netns.
    pub netns: TestNetns,
    holder: Option<Child>,
    cgroup_dirs: Vec<PathBuf>,
    bind_mount: Option<PathBuf>,
}

impl RunningPod {
    /// Makes the pod dual-stack: `ip`/64 on `eth0` too (DAD is off in test netns).
    pub fn with_ipv6(mut self, ip: Ipv6Addr) -> RunningPod {
        self.netns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{ip}/64"),
            "dev",
            "eth0",
        ]);
        self.ipv6 = Some(ip);
        self
    }

    /// The pod's addresses, IPv4 first.
    fn addresses(&self) -> Vec<String> {
        std::iter::once(self.ip.to_string())
            .chain(self.ipv6.map(|ip| ip.to_string()))
            .collect()
    }

    /// The pod object for the API: `base` (e.g. from
    /// [`injected_pod`](crate::sandbox::injected_pod)) with this pod's UID, `node`, phase
    /// Running, its IP, and containers that have never restarted.
    pub fn object(&self, mut base: Value, node: &str) -> Value {
        base["metadata"]["uid"] = json!(self.uid);
        base["spec"]["nodeName"] = json!(node);
        let statuses: Vec<Value> = base["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| json!({"name": c["name"], "ready": true, "restartCount": 0, "image": c["image"], "imageID": "", "started": true}))
            .collect();
        base["status"] = json!({
            "phase": "Running",
            "podIP": self.ip.to_string(),
            "podIPs": self.addresses().iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "containerStatuses": statuses,
        });
        base
    }

    /// ADD through the real `istio-cni` binary (`chain` from [`istio_chain`]), with a
    /// prevResult giving this pod's address, as the primary plugin would.
    ///
    /// Errors: the plugin's failure.
    pub fn add(
        &self,
        chain: &Chain,
        namespace: &str,
        name: &str,
    ) -> Result<Value, Box<PluginFailure>> {
        let a = Attachment {
            container_id: unique_name("c"),
            netns: self.netns.path(),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
        };
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": self.netns.path()}],
            "ips": std::iter::once(format!("{}/24", self.ip))
                .chain(self.ipv6.map(|ip| format!("{ip}/64")))
                .map(|address| json!({"address": address, "interface": 0}))
                .collect::<Vec<_>>(),
        });
        chain.add_with_prev(&a, &prev).map_err(Box::new)
    }

    /// Lines of `iptables-save` in the pod that mention an ISTIO chain.
    pub fn rules(&self) -> Vec<String> {
        self.netns.istio_rules(false)
    }

    /// Lines of `ip6tables-save` in the pod that mention an ISTIO chain.
    pub fn rules_v6(&self) -> Vec<String> {
        self.netns.istio_rules(true)
    }

    /// Flushes the nat and mangle tables in the pod (rules gone, chains kept), as a
    /// careless admin or a runtime bug would; both families for a dual-stack pod.
    pub fn flush(&self) {
        self.netns.exec(&["iptables", "-t", "nat", "-F"]);
        self.netns.exec(&["iptables", "-t", "mangle", "-F"]);
        if self.ipv6.is_some() {
            self.netns.exec(&["ip6tables", "-t", "nat", "-F"]);
            self.netns.exec(&["ip6tables", "-t", "mangle", "-F"]);
        }
    }

    /// Flushes the IPv6 nat table only.
    pub fn flush_v6(&self) {
        self.netns.exec(&["ip6tables", "-t", "nat", "-F"]);
    }
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        if let Some(mut c) = self.holder.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.cgroup_dirs {
            let _ = std::fs::remove_dir(d);
        }
        if let Some(f) = &self.bind_mount {
            let _ = Command::new("umount").arg(f).status();
            let _ = std::fs::remove_file(f);
        }
    }
}

/// A chain holding only `istio-cni`, reading pods through `kubeconfig`, run in the
/// caller's netns (where the fake API listens).
pub fn istio_chain(kubeconfig: &Path) -> Chain {
    Chain {
        name: "k8s-pod-network".into(),
        cni_version: "1.0.0".into(),
        plugins: vec![json!({"type": "istio-cni", "plugin_log_level": "info",
            "exclude_namespaces": ["kube-system"],
            "kubernetes": {"kubeconfig": kubeconfig}})],
        cni_path: vec![plugin_dir()],
        runtime_netns: None,
        env: Vec::new(),
    }
}

/// Removes a cgroup dir and its sub-cgroups, deepest first (cgroup dirs go with rmdir
/// only). Best effort.
pub fn rmdir_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
