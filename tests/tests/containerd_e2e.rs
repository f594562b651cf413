//! Through a real container runtime: containerd's CRI creates pod sandboxes whose network
//! goes through the chain bridge + host-local + istio-cni (loopback first, as containerd
//! always does). The node agent installs the plugin binary, writes its kubeconfig from a
//! service account, and chains it into containerd's primary config, as on a node. A
//! meshed pod's sandbox netns must hold validated rules; a plain pod's none. No init
//! container is involved. Needs root, containerd, runc and busybox-static.

use std::path::PathBuf;

use istio_cni::apply::Xtables;
use istio_cni::config::NetConf;
use istio_cni::netns::Netns;
use istio_cni::plan::{plan_for_pod, plan_nft_for_pod, Plan};
use istio_cni::validate;
use istio_cni_e2e::chain::{istio_cni_bin, workspace_bin, REFERENCE_PLUGIN_DIR};
use istio_cni_e2e::cri::ContainerdDirs;
use istio_cni_e2e::fake_api::FakeApi;
use istio_cni_e2e::net::{unique_name, TestNetns};
use istio_cni_e2e::sandbox::{injected_pod, read_back_and_probe};
use serde_json::json;

#[test]
fn containerd_sandboxes_get_validated_rules_through_the_chain() {
    run_with(false);
}

/// The same with the nftables backend (`NATIVE_NFTABLES`).
#[test]
fn containerd_sandboxes_get_validated_nftables_rules_through_the_chain() {
    run_with(true);
}

fn run_with(nftables: bool) {
    let host = TestNetns::new("k");
    let api = FakeApi::start_in(&host);
    let dir = tempfile::tempdir().unwrap();
    let meshed = injected_pod("default", "web", json!({}), json!({}));
    // kubelet passes the pod's UID to the runtime (K8S_POD_UID), and the plugin checks it
    // against the API's answer: the sandboxes below use the UIDs the API gave the pods.
    let uid_of = |pod: serde_json::Value| pod["metadata"]["uid"].as_str().unwrap().to_owned();
    let web_uid = uid_of(api.put("pods", meshed.clone()));
    let plain_uid = uid_of(api.put(
        "pods",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "plain", "namespace": "default"},
               "spec": {"containers": [{"name": "app", "image": "app"}]}}),
    ));
    // The node's primary CNI: bridge + host-local, with the reference plugins installed.
    let dirs = ContainerdDirs::new();
    let primary = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [
            {"type": "bridge", "bridge": unique_name("cbr"), "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "dataDir": dir.path().join("ipam"),
                      "ranges": [[{"subnet": "10.77.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}
        ]
    });
    dirs.write_conf("10-k8s-pod-network.conflist", &primary.to_string());
    let reference: Vec<PathBuf> = ["bridge", "host-local", "loopback"]
        .iter()
        .map(|b| PathBuf::from(REFERENCE_PLUGIN_DIR).join(b))
        .collect();
    dirs.link_plugins(&reference);

    // The node agent installs istio-cni: binary, kubeconfig (from a service account whose
    // CA is the API server's), and the chained entry.
    let sa = dir.path().join("serviceaccount");
    std::fs::create_dir(&sa).unwrap();
    std::fs::write(sa.join("token"), "e2e-token").unwrap();
    std::fs::write(sa.join("ca.crt"), api.ca_pem()).unwrap();
    let out = std::process::Command::new(workspace_bin("istio-cni-node-agent"))
        .args(["install", "--once", "--plugin-log-level", "debug"])
        .args(["--native-nftables", if nftables { "true" } else { "false" }])
        .arg("--mounted-cni-net-dir")
        .arg(dirs.conf_dir())
        .arg("--cni-bin-dir")
        .arg(dirs.bin_dir())
        .arg("--cni-agent-run-dir")
        .arg(dir.path().join("run"))
        .arg("--plugin-bin")
        .arg(istio_cni_bin())
        .arg("--service-account-dir")
        .arg(&sa)
        .env_clear()
        // The agent runs on the host here: its own mount namespace is the node's.
        .env("HOST_MOUNT_NS", "")
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", api.addr().port().to_string())
        .env("KUBERNETES_SERVICE_PROTOCOL", "http")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "agent install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut containerd = dirs.start(&host);

    let web = containerd
        .run_pod_sandbox("default", "web", &web_uid)
        .unwrap_or_else(|e| panic!("RunPodSandbox(web): {e}\n{}", containerd.log()));
    let plain = containerd
        .run_pod_sandbox("default", "plain", &plain_uid)
        .unwrap_or_else(|e| panic!("RunPodSandbox(plain): {e}\n{}", containerd.log()));

    // The meshed sandbox holds exactly the rules ADD plans for it, and they redirect.
    let conf = NetConf::parse(
        json!({"cniVersion": "1.0.0", "native_nftables": nftables})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let pod = serde_json::from_value(meshed).unwrap();
    let xt = host.open().run(|_| Xtables::detect()).unwrap().unwrap();
    let web_ns = Netns::open(&web.netns).unwrap();
    if nftables {
        let Plan::Redirect(ruleset) = plan_nft_for_pod(&conf, &pod).unwrap() else {
            panic!("the meshed pod must be planned for redirection");
        };
        web_ns
            .run(|inside| istio_cni::nft::read_back(inside, &ruleset))
            .unwrap()
            .unwrap_or_else(|e| panic!("web sandbox: {e}"));
    } else {
        let Plan::Redirect(ruleset) = plan_for_pod(&conf, &pod).unwrap() else {
            panic!("the meshed pod must be planned for redirection");
        };
        web_ns
            .run(|inside| read_back_and_probe(inside, &xt, &ruleset, true))
            .unwrap()
            .unwrap_or_else(|e| panic!("web sandbox: {e}"));
    }
    // Either way the probe proves the redirect (ADD ran it too).
    web_ns
        .run(|inside| {
            validate::probe(
                inside,
                istio_cni::rules::Family::V4,
                1337,
                15002,
                std::time::Duration::from_secs(2),
            )
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("web sandbox probe: {e}"));

    // The plain sandbox has no rules of ours, with either backend.
    let plain_ns = Netns::open(&plain.netns).unwrap();
    let saved = plain_ns
        .run(|inside| {
            xt.binaries(istio_cni::rules::Family::V4)
                .unwrap()
                .save_text(inside)
        })
        .unwrap()
        .unwrap();
    assert!(!saved.contains("ISTIO"), "plain pod got rules:\n{saved}");
    let tables = plain_ns.run(istio_cni::nft::tables).unwrap().unwrap();
    assert!(
        !tables.iter().any(|t| t.is_ours()),
        "plain pod got tables: {tables:?}"
    );
    drop((web_ns, plain_ns));

    // Teardown through CRI runs DEL; it must not fail.
    for sb in [&web, &plain] {
        containerd
            .stop_pod_sandbox(&sb.id)
            .unwrap_or_else(|e| panic!("StopPodSandbox: {e}"));
        containerd
            .remove_pod_sandbox(&sb.id)
            .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}"));
        assert!(!sb.netns.exists(), "{} left behind", sb.netns.display());
    }
    assert!(containerd.list_pod_sandboxes().is_empty());
}
