//! The self-test with the real plugin binary: it passes on this machine and leaves nothing
//! behind; a broken plugin makes it fail with the plugin's own message. With a node's mount
//! namespace ([`istio_cni_e2e::node`]) it runs the plugin installed there, with the node's
//! `iptables`: a node without `iptables` fails it, whatever the agent has. Needs root.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use istio_cni_e2e::node::NodeRoot;
use istio_cni_node_agent::selftest::{self, HostView, SelfTestError, DEFAULT_HOST_PATH};
use serde_json::{json, Map, Value};

/// `istio-cni` from the cargo target dir this test was built in.
fn plugin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("istio-cni");
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build` first",
        bin.display()
    );
    bin
}

fn entry(run_dir: &std::path::Path) -> Map<String, Value> {
    json!({"type": "istio-cni", "name": "istio-cni", "plugin_log_level": "debug",
           "cni_agent_run_dir": run_dir, "exclude_namespaces": ["kube-system", "istio-cni-self-test"],
           "pod_namespace": "istio-system",
           "kubernetes": {"kubeconfig": run_dir.join("istio-cni-kubeconfig")},
           "validation": {"probe": true, "timeout_ms": 2000}})
    .as_object()
    .unwrap()
    .clone()
}

/// The agent's own view: the plugin in `bin_dir`, no mount namespace to enter.
fn own(bin_dir: &Path) -> HostView {
    HostView {
        mount_ns: None,
        cni_bin_dir: bin_dir.into(),
        path: DEFAULT_HOST_PATH.into(),
    }
}

/// How many files the self-test left in the run dir, besides the plugin's per-netns lock
/// file (`istio_cni::lock`), which is the node's for good (the agent removes it at
/// uninstall).
fn left_in(run: &Path) -> usize {
    std::fs::read_dir(run)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != istio_cni::lock::LOCK_FILE)
        .count()
}

#[test]
fn passes_with_the_real_plugin_and_leaves_nothing() {
    let run = tempfile::tempdir().unwrap();
    let bin_dir = plugin().parent().unwrap().to_path_buf();
    let took = selftest::run(&own(&bin_dir), &entry(run.path()), run.path())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(took.as_secs() < 30);
    assert_eq!(left_in(run.path()), 0, "the pod file is removed");
}

#[test]
fn passes_with_the_nftables_backend_and_leaves_nothing() {
    let run = tempfile::tempdir().unwrap();
    let bin_dir = plugin().parent().unwrap().to_path_buf();
    let mut e = entry(run.path());
    e.insert("native_nftables".into(), json!(true));
    selftest::run(&own(&bin_dir), &e, run.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(left_in(run.path()), 0);
}

#[test]
fn a_broken_plugin_fails_it_with_its_message() {
    let run = tempfile::tempdir().unwrap();
    let fake = run.path().join("istio-cni");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho '{\"cniVersion\":\"1.0.0\",\"code\":104,\"msg\":\"validation failed: probe\"}'\nexit 104\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = selftest::run(&own(run.path()), &entry(run.path()), run.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("ADD failed (exit 104): validation failed: probe"),
        "{msg}"
    );
    assert_eq!(left_in(run.path()), 1, "only the fake binary is left");
}

/// A node whose `/opt/cni/bin` holds the plugin and exists only in the node's mount
/// namespace, and whose `/usr/sbin` lacks `hidden`; its PID 1 just waits.
fn node_with_plugin(hidden: &[&str], log: &Path) -> istio_cni_e2e::node::Node {
    let node = NodeRoot::new()
        .tmpfs("/opt")
        .writable("/usr/sbin", hidden)
        .mkdir("/opt/cni/bin")
        .start(Path::new("/bin/sleep"), &["infinity"], log);
    std::fs::copy(plugin(), node.path("/opt/cni/bin/istio-cni")).unwrap();
    node
}

fn node_view(node: &istio_cni_e2e::node::Node) -> HostView {
    HostView {
        mount_ns: Some(node.mount_ns()),
        cni_bin_dir: "/opt/cni/bin".into(),
        path: DEFAULT_HOST_PATH.into(),
    }
}

#[test]
fn runs_the_plugin_installed_in_the_nodes_mount_namespace() {
    let run = tempfile::tempdir().unwrap();
    let node = node_with_plugin(&[], &run.path().join("node.log"));
    // The node's /opt is its own: the agent does not see the plugin there.
    assert!(
        !Path::new("/opt/cni/bin/istio-cni").exists() || {
            eprintln!("this machine has /opt/cni/bin/istio-cni: the check below proves less");
            true
        }
    );
    let took = selftest::run(&node_view(&node), &entry(run.path()), run.path())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(took.as_secs() < 30);

    // Not installed there: the node's path is named, with what to check.
    std::fs::remove_file(node.path("/opt/cni/bin/istio-cni")).unwrap();
    let err = selftest::run(&node_view(&node), &entry(run.path()), run.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("cannot run /opt/cni/bin/istio-cni in the mount namespace")
            && msg.contains("HOST_CNI_BIN_DIR"),
        "{msg}"
    );
}

#[test]
fn a_node_without_iptables_fails_it_whatever_the_agent_has() {
    let run = tempfile::tempdir().unwrap();
    let node = node_with_plugin(
        &["iptables*", "ip6tables*", "xtables*"],
        &run.path().join("node.log"),
    );
    assert!(!node.path("/usr/sbin/iptables-restore").exists());
    assert!(
        Path::new("/usr/sbin/iptables-restore").exists(),
        "the agent has iptables"
    );
    let err = selftest::run(&node_view(&node), &entry(run.path()), run.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, SelfTestError::Verb { verb: "ADD", .. })
            && msg.contains("no IPv4 iptables binaries found")
            && msg.contains("install iptables on the node"),
        "{msg}"
    );
    assert_eq!(left_in(run.path()), 1, "only the node's log is left");
}

#[test]
fn a_missing_mount_namespace_is_named_with_what_to_check() {
    let run = tempfile::tempdir().unwrap();
    let view = HostView {
        mount_ns: Some("/nonexistent/proc/1/ns/mnt".into()),
        cni_bin_dir: "/opt/cni/bin".into(),
        path: DEFAULT_HOST_PATH.into(),
    };
    let msg = selftest::run(&view, &entry(run.path()), run.path())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("/nonexistent/proc/1/ns/mnt") && msg.contains("/host/proc"),
        "{msg}"
    );
    // A file that is not a mount namespace is refused before anything runs.
    let view = HostView {
        mount_ns: Some("/proc/self/ns/net".into()),
        ..view
    };
    let msg = selftest::run(&view, &entry(run.path()), run.path())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a mount namespace"), "{msg}");
    // A FIFO is refused at once, not waited on.
    let fifo = run.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let view = HostView {
        mount_ns: Some(fifo),
        ..view
    };
    let msg = selftest::run(&view, &entry(run.path()), run.path())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a mount namespace"), "{msg}");
}
