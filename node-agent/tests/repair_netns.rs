//! Repair writes only into the namespace it inspected: the handle found by `locate` is the
//! one `inspect` reads and `act` writes, and the pod's IP is checked again inside the same
//! `setns` as the write. Real pod netns bind-mounted as a runtime pins them. Needs root.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use istio_cni::netns::NetnsId;
use istio_cni::plugin::Tools;
use istio_cni_e2e::kubelet::{Layout, NodePods, RunningPod};
use istio_cni_e2e::net::run;
use istio_cni_e2e::sandbox::injected_pod;
use istio_cni_node_agent::config::Exclusions;
use istio_cni_node_agent::locate::{BindMounts, PodNetns};
use istio_cni_node_agent::repair::act::{repair_in_place, Owner, RepairError};
use istio_cni_node_agent::repair::inspect::{candidate, inspect, Candidate, Health};
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

/// The write alone: no `/proc` re-check (these pods have no process).
const NO_RECHECK: Owner<'static> = Owner {
    uid: "",
    host_proc: None,
};

/// A bind mount stacked on top of another; removed on drop. The target is made private
/// first, so the new mount does not propagate to its peers (`/var/run/netns/<pod>`).
struct Overmount(PathBuf);

impl Overmount {
    fn new(source: &Path, target: &Path) -> Overmount {
        run(Command::new("mount").arg("--make-private").arg(target));
        run(Command::new("mount").arg("--bind").arg(source).arg(target));
        Overmount(target.to_owned())
    }
}

impl Drop for Overmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A broken (rule-less) meshed pod `a`, found through the node's netns dir.
fn broken_pod(pods: &NodePods, a: &RunningPod) -> (Candidate, PodNetns) {
    let object = a.object(injected_pod("default", "a", json!({}), json!({})), "node-1");
    let pod: Pod = serde_json::from_value(object).unwrap();
    let exclusions = Exclusions {
        agent_namespace: "istio-system".into(),
        exclude_namespaces: Vec::new(),
    };
    let c = candidate(&pod, &exclusions, false).expect("a meshed running pod");
    let found = BindMounts::scan(&[pods.netns_dir().to_owned()], &[])
        .netns_of(&c.ips)
        .expect("the pod's netns file");
    let xt = Tools::detect();
    assert!(matches!(
        inspect(&found, &c, &xt).unwrap(),
        Health::Broken(_)
    ));
    (c, found)
}

/// The netns file in the node's netns dir that holds `pod`'s namespace.
fn file_of(pods: &NodePods, pod: &RunningPod) -> PathBuf {
    let id = NetnsId::of(&pod.netns.path()).unwrap();
    std::fs::read_dir(pods.netns_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| NetnsId::of(p).ok() == Some(id))
        .expect("the pod's bind mount")
}

#[test]
fn a_netns_file_replaced_after_inspection_is_not_written() {
    let pods = NodePods::new();
    let a = pods.start(Layout::BindMountOnly, Ipv4Addr::new(10, 78, 0, 5));
    let b = pods.start(Layout::BindMountOnly, Ipv4Addr::new(10, 78, 0, 6));
    let (c, found) = broken_pod(&pods, &a);
    let lock_dir = tempfile::tempdir().unwrap();
    // Between inspection and repair, the path now names another pod's namespace (a
    // runtime re-pinned it; for /proc/<pid>/ns/net, a reused PID).
    let _swap = Overmount::new(&b.netns.path(), &file_of(&pods, &a));
    repair_in_place(&found, &c, &Tools::detect(), lock_dir.path(), &NO_RECHECK).expect("repair");
    assert!(!a.rules().is_empty(), "the inspected pod was repaired");
    assert!(
        b.rules().is_empty(),
        "nothing was written into the pod now at that path: {:?}",
        b.rules()
    );
}

#[test]
fn a_netns_that_lost_the_pod_ip_is_not_written() {
    let pods = NodePods::new();
    let a = pods.start(Layout::BindMountOnly, Ipv4Addr::new(10, 78, 0, 7));
    let (c, found) = broken_pod(&pods, &a);
    let lock_dir = tempfile::tempdir().unwrap();
    a.netns
        .exec(&["ip", "addr", "del", "10.78.0.7/24", "dev", "eth0"]);
    let e =
        repair_in_place(&found, &c, &Tools::detect(), lock_dir.path(), &NO_RECHECK).unwrap_err();
    assert!(matches!(e, RepairError::PodIpGone { .. }), "{e}");
    assert!(a.rules().is_empty());
}
