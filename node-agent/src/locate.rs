//! Finding a running pod's network namespace from the host, without asking the runtime.
//!
//! 1. **Cgroups**: every process of a pod lives in a cgroup whose path names the pod UID.
//!    kubelet lays the path out in one of two ways, on cgroup v1 and v2 alike:
//!    - cgroupfs driver: `…/kubepods/<qos>/pod<uid>/<container>` (no `<qos>` for
//!      Guaranteed pods);
//!    - systemd driver: `…/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with
//!      '-' replaced by '_'>.slice/<container>.scope`.
//!
//!    [`ProcIndex::scan`] reads `<host proc>/*/cgroup` once and maps pod UIDs to PIDs; a
//!    PID's `ns/net` is the pod's netns.
//! 2. **Bind mounts**: a runtime without a process per pod sandbox (CRI-O with
//!    `drop_infra_ctr`) still pins the netns as a file under `/var/run/netns` or
//!    `/run/netns`. [`BindMounts::scan`] enters each once and maps the addresses on its
//!    interfaces to the file, so a pod is found by its IP.
//!
//! The host's own netns (`<host proc>/1/ns/net`, and `kthreadd`'s, readable where PID 1's
//! is not: [`istio_cni::netns::host_netns_ids`]) is never returned: a host-network pod, a
//! pod's process caught before it entered its netns, or a cgroup path that only looks
//! like a pod's, must not get pod rules.
//!
//! Nor is a netns that something says is another pod's: one in which a process of another
//! pod (by its cgroup's pod UID) lives ([`ProcIndex::other_pods_in`]). An IP alone proves
//! nothing: a pod that is `Running` in the API but has no process left on the node (its
//! sandbox died, the node restarted) may carry an IP that the runtime has since given to
//! another pod, whose pinned netns then holds it. Writing the first pod's rules there
//! would redirect the second pod's traffic. Such a pod is reported as "netns not found".

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use istio_cni::netns::{Netns, NetnsId};

/// How a pod's netns was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// Through this process in the pod's cgroup.
    Process(u32),
    /// Through a runtime's bind-mounted netns file holding the pod's IP.
    BindMount,
}

/// A pod's netns, as found from the host: an open handle, opened once from
/// `<host proc>/<pid>/ns/net` or the bind mount. Inspecting and repairing both enter this
/// handle, never the path again, so a PID reused or a mount replaced in between cannot
/// redirect the write into another namespace.
#[derive(Debug, Clone)]
pub struct PodNetns {
    /// The namespace (shared: a bind-mounted netns may hold several of a pod's IPs).
    pub netns: Arc<Netns>,
    /// How it was found.
    pub via: Via,
}

impl PodNetns {
    /// The path it was opened from (for messages).
    pub fn path(&self) -> &Path {
        self.netns.path()
    }
}

impl fmt::Display for PodNetns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.netns.id();
        match self.via {
            Via::Process(pid) => {
                write!(f, "{} (pid {pid}, inode {})", self.path().display(), id.ino)
            }
            Via::BindMount => write!(f, "{} (inode {})", self.path().display(), id.ino),
        }
    }
}

/// The pod UID named by one cgroup path, in either kubelet layout (see the module docs);
/// `None` when the path is not under `kubepods`.
///
/// ```
/// use istio_cni_node_agent::locate::pod_uid_from_cgroup_path as uid;
/// let u = "0b6f43d5-5e6c-4ed6-a3d5-3c2b2fb4a0a7";
/// assert_eq!(uid(&format!("/kubepods/burstable/pod{u}/abc")).as_deref(), Some(u));
/// assert_eq!(
///     uid("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b6f43d5_5e6c_4ed6_a3d5_3c2b2fb4a0a7.slice/cri-containerd-1.scope").as_deref(),
///     Some(u),
/// );
/// assert_eq!(uid("/system.slice/containerd.service"), None);
/// ```
pub fn pod_uid_from_cgroup_path(path: &str) -> Option<String> {
    let mut under_kubepods = false;
    for segment in path.split('/') {
        if let Some(slice) = segment.strip_suffix(".slice") {
            // systemd: kubepods-[<qos>-]pod<uid_>.slice; kind and others nest it under
            // e.g. kubelet-kubepods.slice, hence "contains".
            if slice.contains("kubepods") {
                under_kubepods = true;
                if let Some((_, uid)) = slice.rsplit_once("-pod") {
                    return normalize_uid(&uid.replace('_', "-"));
                }
            }
            continue;
        }
        if segment == "kubepods" || segment.ends_with("-kubepods") {
            under_kubepods = true;
        } else if under_kubepods {
            if let Some(uid) = segment.strip_prefix("pod") {
                return normalize_uid(uid);
            }
        }
    }
    None
}

/// The pod UID named by the contents of a `/proc/<pid>/cgroup` file (v1 lines
/// `ID:controllers:/path`, the v2 line `0::/path`); the first line that names one wins.
pub fn pod_uid_from_proc_cgroup(contents: &str) -> Option<String> {
    contents
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .find_map(pod_uid_from_cgroup_path)
}

/// A UID as the API writes it: 36 characters, lowercase hex in 8-4-4-4-12 groups. Static
/// pods' UIDs are 32 hex digits (a config hash) and are accepted as they are.
fn normalize_uid(raw: &str) -> Option<String> {
    let uid = raw.to_ascii_lowercase();
    let hex_or_dash = uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    let dashed = uid.len() == 36
        && uid
            .char_indices()
            .all(|(i, c)| (c == '-') == matches!(i, 8 | 13 | 18 | 23));
    let hash = uid.len() == 32 && !uid.contains('-');
    (hex_or_dash && (dashed || hash)).then_some(uid)
}

/// Pod UID → PIDs, and netns → pod UIDs with a process in it, from one pass over
/// `<host proc>/*/cgroup` (and a `stat` of each pod process's `ns/net`).
#[derive(Debug, Default)]
pub struct ProcIndex {
    host_proc: PathBuf,
    pods: HashMap<String, Vec<u32>>,
    owners: HashMap<NetnsId, Vec<String>>,
    host_netns: Vec<NetnsId>,
}

impl ProcIndex {
    /// Reads every process's cgroup file under `host_proc` (the host's `/proc` as mounted
    /// in the agent). Processes that exit meanwhile are skipped.
    ///
    /// Errors: `host_proc` cannot be listed.
    pub fn scan(host_proc: &Path) -> std::io::Result<ProcIndex> {
        let mut pods: HashMap<String, Vec<u32>> = HashMap::new();
        for entry in std::fs::read_dir(host_proc)? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(contents) = std::fs::read_to_string(entry.path().join("cgroup")) else {
                continue;
            };
            if let Some(uid) = pod_uid_from_proc_cgroup(&contents) {
                pods.entry(uid).or_default().push(pid);
            }
        }
        let mut owners: HashMap<NetnsId, Vec<String>> = HashMap::new();
        for (uid, pids) in pods.iter_mut() {
            pids.sort_unstable();
            for pid in pids.iter() {
                let Ok(id) = NetnsId::of(&host_proc.join(pid.to_string()).join("ns/net")) else {
                    continue;
                };
                let uids = owners.entry(id).or_default();
                if !uids.contains(uid) {
                    uids.push(uid.clone());
                }
            }
        }
        Ok(ProcIndex {
            host_proc: host_proc.to_owned(),
            pods,
            owners,
            host_netns: istio_cni::netns::host_netns_ids(host_proc),
        })
    }

    /// The UIDs of pods other than `uid` that have a process in the netns `id`: when there
    /// is any, the netns is not `uid`'s to write into.
    pub fn other_pods_in(&self, id: NetnsId, uid: &str) -> Vec<&str> {
        self.owners
            .get(&id)
            .into_iter()
            .flatten()
            .filter(|u| *u != uid)
            .map(String::as_str)
            .collect()
    }

    /// `found`, unless another pod's process lives in it (then logged, and `None`).
    pub fn unless_foreign(&self, uid: &str, found: PodNetns) -> Option<PodNetns> {
        let others = self.other_pods_in(found.netns.id(), uid);
        if others.is_empty() {
            return Some(found);
        }
        log::info!(
            "netns {found} is not pod {uid}'s: processes of pod(s) {} live in it; not touching it",
            others.join(", ")
        );
        None
    }

    /// The identities of the host's netns (PID 1's, `kthreadd`'s), those readable
    /// ([`istio_cni::netns::host_netns_ids`]).
    pub fn host_netns(&self) -> &[NetnsId] {
        &self.host_netns
    }

    /// Number of pods with at least one process.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Whether no pod process was found.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// The netns of pod `uid`, opened: that of its lowest PID (the sandbox's pause
    /// process, in practice) that is still alive and not in the host's netns; `None` as
    /// well when processes of another pod live in that netns.
    pub fn netns_of(&self, uid: &str) -> Option<PodNetns> {
        let found = self.pods.get(uid)?.iter().find_map(|&pid| {
            let path = self.host_proc.join(pid.to_string()).join("ns/net");
            let netns = Netns::open(&path).ok()?;
            (!self.host_netns.contains(&netns.id())).then(|| PodNetns {
                netns: Arc::new(netns),
                via: Via::Process(pid),
            })
        })?;
        self.unless_foreign(uid, found)
    }
}

/// Pod IP → bind-mounted netns, opened once in one pass over the runtime's netns dirs.
#[derive(Debug, Default)]
pub struct BindMounts {
    by_ip: HashMap<IpAddr, Arc<Netns>>,
}

impl BindMounts {
    /// Enters every file in `dirs` (missing dirs are skipped) and records the addresses on
    /// its interfaces. Files that are not netns, and the host's netns (`host_netns`), are
    /// skipped.
    pub fn scan(dirs: &[PathBuf], host_netns: &[NetnsId]) -> BindMounts {
        let mut by_ip = HashMap::new();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let netns = match Netns::open(&path) {
                    Ok(n) if host_netns.contains(&n.id()) => continue,
                    Ok(n) => Arc::new(n),
                    Err(e) => {
                        log::debug!("netns file {}: {e}", path.display());
                        continue;
                    }
                };
                match addresses_in(&netns) {
                    Ok(ips) => {
                        for ip in ips {
                            by_ip.entry(ip).or_insert_with(|| netns.clone());
                        }
                    }
                    Err(e) => log::debug!("netns file {}: {e}", path.display()),
                }
            }
        }
        BindMounts { by_ip }
    }

    /// The netns holding one of `ips`.
    pub fn netns_of(&self, ips: &[IpAddr]) -> Option<PodNetns> {
        ips.iter().find_map(|ip| {
            self.by_ip.get(ip).map(|netns| PodNetns {
                netns: netns.clone(),
                via: Via::BindMount,
            })
        })
    }
}

/// The addresses on the interfaces of `netns` (loopback's left out).
///
/// Errors: a message when the netns cannot be entered or its addresses read.
pub fn addresses_in(netns: &Netns) -> Result<Vec<IpAddr>, String> {
    netns
        .run(|_inside| local_addresses())
        .map_err(|e| e.to_string())?
}

/// The addresses on the current netns's interfaces, loopback's left out.
///
/// Errors: a message when `getifaddrs` fails.
pub fn local_addresses() -> Result<Vec<IpAddr>, String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("getifaddrs: {e}"))?;
    Ok(addrs
        .filter_map(|a| {
            let sa = a.address?;
            let ip: IpAddr = if let Some(v4) = sa.as_sockaddr_in() {
                v4.ip().into()
            } else {
                sa.as_sockaddr_in6()?.ip().into()
            };
            (!ip.is_loopback()).then_some(ip)
        })
        .collect())
}

/// Where to look for netns: built once per batch of checks.
pub struct Finder<'a> {
    procs: &'a ProcIndex,
    bind_mounts: std::sync::OnceLock<BindMounts>,
    netns_dirs: &'a [std::path::PathBuf],
}

impl<'a> Finder<'a> {
    /// A finder over one [`ProcIndex`] scan; the netns dirs are scanned only if a pod has
    /// no process.
    pub fn new(procs: &'a ProcIndex, netns_dirs: &'a [std::path::PathBuf]) -> Finder<'a> {
        Finder {
            procs,
            bind_mounts: std::sync::OnceLock::new(),
            netns_dirs,
        }
    }

    /// The netns of the pod `uid` with addresses `ips`: through its processes, else the
    /// netns file holding one of `ips`, but never a netns where another pod's processes
    /// live ([`ProcIndex::unless_foreign`]).
    pub fn find(&self, uid: &str, ips: &[IpAddr]) -> Option<PodNetns> {
        self.procs.netns_of(uid).or_else(|| {
            let pinned = self
                .bind_mounts
                .get_or_init(|| BindMounts::scan(self.netns_dirs, self.procs.host_netns()))
                .netns_of(ips)?;
            self.procs.unless_foreign(uid, pinned)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b6f43d5-5e6c-4ed6-a3d5-3c2b2fb4a0a7";
    const UID_: &str = "0b6f43d5_5e6c_4ed6_a3d5_3c2b2fb4a0a7";

    #[test]
    fn cgroupfs_layouts() {
        for path in [
            format!("/kubepods/burstable/pod{UID}/0123abcd"),
            format!("/kubepods/besteffort/pod{UID}/0123abcd"),
            format!("/kubepods/pod{UID}/0123abcd"),
            format!("/kubepods/pod{UID}"),
            // kind: kubelet nested under the node container's cgroup
            format!("/docker/8f1e/kubelet/kubepods/burstable/pod{UID}/c1"),
        ] {
            assert_eq!(
                pod_uid_from_cgroup_path(&path).as_deref(),
                Some(UID),
                "{path}"
            );
        }
    }

    #[test]
    fn systemd_layouts() {
        for path in [
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-abc.scope"),
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-abc.scope"),
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-abc.scope"),
            format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-abc.scope"),
        ] {
            assert_eq!(pod_uid_from_cgroup_path(&path).as_deref(), Some(UID), "{path}");
        }
    }

    #[test]
    fn paths_that_are_not_pods() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/kubepods.slice",
            "/kubepods/burstable",
            "/user.slice/user-0.slice/session-1.scope",
            // "pod" segments outside kubepods, and malformed UIDs inside
            &format!("/somewhere/pod{UID}/x"),
            "/kubepods/burstable/podnot-a-uid/c1",
            "/kubepods.slice/kubepods-podzzz.slice",
        ] {
            assert_eq!(pod_uid_from_cgroup_path(path), None, "{path}");
        }
    }

    #[test]
    fn proc_cgroup_files_v1_and_v2() {
        let v1 = format!(
            "12:pids:/kubepods/burstable/pod{UID}/abc\n4:memory:/kubepods/burstable/pod{UID}/abc\n1:name=systemd:/kubepods/burstable/pod{UID}/abc\n0::/\n"
        );
        let v2 = format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-abc.scope\n");
        let host = "12:pids:/system.slice/kubelet.service\n0::/system.slice/kubelet.service\n";
        assert_eq!(pod_uid_from_proc_cgroup(&v1).as_deref(), Some(UID));
        assert_eq!(pod_uid_from_proc_cgroup(&v2).as_deref(), Some(UID));
        assert_eq!(pod_uid_from_proc_cgroup(host), None);
    }

    #[test]
    fn static_pod_hash_uids_and_case() {
        let hash = "6f1d7a2b9c3e4f5a6b7c8d9e0f1a2b3c";
        assert_eq!(
            pod_uid_from_cgroup_path(&format!("/kubepods/burstable/pod{hash}/c")).as_deref(),
            Some(hash)
        );
        assert_eq!(
            pod_uid_from_cgroup_path(&format!("/kubepods/pod{}", UID.to_uppercase())).as_deref(),
            Some(UID)
        );
    }
}
