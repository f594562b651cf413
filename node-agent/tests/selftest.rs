//! The self-test with the real plugin binary: it passes on this machine and leaves nothing
//! behind; a broken plugin makes it fail with the plugin's own message. Needs root.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use istio_cni_node_agent::selftest;
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

#[test]
fn passes_with_the_real_plugin_and_leaves_nothing() {
    let run = tempfile::tempdir().unwrap();
    let bin_dir = plugin().parent().unwrap().to_path_buf();
    let took = selftest::run(&plugin(), &bin_dir, &entry(run.path()), run.path())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(took.as_secs() < 30);
    assert_eq!(
        std::fs::read_dir(run.path()).unwrap().count(),
        0,
        "the pod file is removed"
    );
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
    let err = selftest::run(&fake, run.path(), &entry(run.path()), run.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("ADD failed (exit 104): validation failed: probe"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_dir(run.path()).unwrap().count(),
        1,
        "only the fake binary is left"
    );
}
