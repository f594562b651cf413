//! `make e2e`: the node lifecycle an operator lives through, on one node, with real parts
//! only: containerd's CRI with a bridge + host-local primary config, the real agent and
//! plugin binaries, real netns and iptables, and the fake API server as the cluster.
//!
//! join (tainted) → a pod that slipped in before the plugin → the agent installs,
//! untaints and repairs it → new pods get validated rules at ADD → the primary CNI
//! rewrites its config → a flushed pod is repaired → upgrade restart → uninstall → every
//! sandbox still tears down → nothing left behind. One line per step, with timings.
//!
//! Needs root, containerd, runc and busybox-static. Ignored by `cargo test`; run with
//! `make e2e`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use istio_cni::apply::Xtables;
use istio_cni::netns::Netns;
use istio_cni::plan::{plan_for_running_pod, Plan};
use istio_cni::rules::{Family, Ruleset};
use istio_cni_e2e::agent::{register_agent_pod, wait_for, Daemon, Node, AGENT_POD};
use istio_cni_e2e::chain::REFERENCE_PLUGIN_DIR;
use istio_cni_e2e::cri::{Containerd, ContainerdDirs, PodSandbox};
use istio_cni_e2e::fake_api::FakeApi;
use istio_cni_e2e::kubelet::unique_uid;
use istio_cni_e2e::net::{unique_name, TestNetns};
use istio_cni_e2e::sandbox::{injected_pod, read_back_and_probe};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

const NODE: &str = "node-1";
const TAINT: &str = "cni.istio.io/not-ready";

/// The node: its netns (where containerd, the agent and the API live), the API, containerd
/// and the agent's dirs.
struct World {
    host: TestNetns,
    api: FakeApi,
    containerd: Containerd,
    node: Node,
    primary: String,
    conf: PathBuf,
    xt: Xtables,
    empty_netns_dir: tempfile::TempDir,
}

/// A pod as kubelet runs it: the API object (scheduled, then Running with its IP) and its
/// sandbox.
struct RunningPod {
    object: Value,
    sandbox: PodSandbox,
}

impl World {
    fn pod(&mut self, base: Value) -> Result<RunningPod, String> {
        let uid = unique_uid();
        let mut object = base;
        object["metadata"]["uid"] = json!(uid);
        object["spec"]["nodeName"] = json!(NODE);
        object["status"] = json!({"phase": "Pending"});
        let ns = object["metadata"]["namespace"].as_str().unwrap().to_owned();
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        self.api.put("pods", object.clone());
        let sandbox = self.containerd.run_pod_sandbox(&ns, &name, &uid)?;
        object["status"] = json!({"phase": "Running", "podIP": sandbox.ip,
            "podIPs": [{"ip": sandbox.ip}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0,
                                   "image": "app", "imageID": "", "started": true}]});
        let object = self.api.put("pods", object);
        Ok(RunningPod { object, sandbox })
    }

    fn agent(&self) -> Daemon {
        let port = self.api.addr().port().to_string();
        let kubeconfig = self.node.dir.path().join("kubeconfig");
        self.node.spawn(
            Some(&self.host),
            &[
                ("KUBERNETES_SERVICE_HOST", "127.0.0.1".into()),
                ("KUBERNETES_SERVICE_PORT", port),
                ("KUBERNETES_SERVICE_PROTOCOL", "http".into()),
            ],
            &[
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--node-name",
                NODE,
                "--pod-name",
                AGENT_POD,
                "--plugin-log-level",
                "debug",
                "--host-proc-dir",
                "/proc",
                "--netns-dirs",
                self.empty_netns_dir.path().to_str().unwrap(),
                "--repair-resync-seconds",
                "2",
                // The default grace: an upgraded agent's install and self-test must fit in
                // it, as on a node (a loaded CI machine took 2.4 s with the debug binary).
                "--taint-grace-seconds",
                "10",
            ],
        )
    }

    fn tainted(&self) -> bool {
        self.api.get("nodes", "", NODE).unwrap()["spec"]["taints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["key"] == TAINT)
    }

    fn chained(&self) -> bool {
        std::fs::read_to_string(&self.conf).is_ok_and(|c| c.contains("\"istio-cni\""))
    }

    fn events(&self, name: &str) -> Vec<String> {
        self.api.event_reasons(name)
    }

    /// The ruleset the plugin plans for `pod`, if it is meshed.
    fn ruleset(&self, pod: &RunningPod) -> Option<Ruleset> {
        let p: Pod = serde_json::from_value(pod.object.clone()).unwrap();
        match plan_for_running_pod(&p, "istio-system", &["kube-system".to_owned()]).unwrap() {
            Plan::Redirect(r) => Some(*r),
            Plan::Skip(_) => None,
        }
    }

    /// Read-back of the pod's planned rules in its netns (and the probe, with `probe`).
    fn validated(&self, pod: &RunningPod, probe: bool) -> Result<(), String> {
        let ruleset = self.ruleset(pod).expect("a meshed pod");
        let ns = Netns::open(&pod.sandbox.netns).map_err(|e| e.to_string())?;
        ns.run(|inside| read_back_and_probe(inside, &self.xt, &ruleset, probe))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Whether the pod's netns has no ISTIO rules at all.
    fn no_rules(&self, pod: &RunningPod) -> bool {
        let ns = Netns::open(&pod.sandbox.netns).unwrap();
        let saved = ns
            .run(|inside| self.xt.binaries(Family::V4).unwrap().save_text(inside))
            .unwrap()
            .unwrap();
        !saved.contains("ISTIO")
    }

    fn flush_nat(&self, pod: &RunningPod) {
        let save = self.xt.binaries(Family::V4).unwrap().save.clone();
        let iptables = save.with_file_name(
            save.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .replace("-save", ""),
        );
        let ns = Netns::open(&pod.sandbox.netns).unwrap();
        let out = ns
            .run(|_| {
                std::process::Command::new(&iptables)
                    .args(["-t", "nat", "-F"])
                    .output()
            })
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn teardown(&mut self, pod: &RunningPod) -> Result<(), String> {
        self.containerd.stop_pod_sandbox(&pod.sandbox.id)?;
        self.containerd.remove_pod_sandbox(&pod.sandbox.id)
    }
}

fn meshed(namespace: &str, name: &str) -> Value {
    injected_pod(namespace, name, json!({}), json!({}))
}

fn plain(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
           "spec": {"containers": [{"name": "app", "image": "app"}]}})
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

#[test]
#[ignore = "the node lifecycle acceptance test: run with `make e2e`"]
fn node_lifecycle() {
    let started = Instant::now();
    // 1. The node registers tainted; containerd runs with the primary CNI config only.
    let host = TestNetns::new("lc");
    let api = FakeApi::start_in(&host);
    api.put(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
               "spec": {"taints": [{"key": TAINT, "effect": "NoSchedule"}]},
               "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    register_agent_pod(&api);
    let dirs = ContainerdDirs::new();
    let ipam = tempfile::tempdir().unwrap();
    let primary = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network",
        "plugins": [{"type": "bridge", "bridge": unique_name("lbr"), "isGateway": true, "ipMasq": false,
                     "ipam": {"type": "host-local", "dataDir": ipam.path(),
                              "ranges": [[{"subnet": "10.79.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]
    })
    .to_string();
    dirs.write_conf("10-k8s-pod-network.conflist", &primary);
    dirs.link_plugins(
        &["bridge", "host-local", "loopback"].map(|b| PathBuf::from(REFERENCE_PLUGIN_DIR).join(b)),
    );
    let (conf_dir, bin_dir) = (dirs.conf_dir(), dirs.bin_dir());
    let conf = conf_dir.join("10-k8s-pod-network.conflist");
    let containerd = dirs.start(&host);
    let node = Node::with_cni_dirs(conf_dir, bin_dir.clone());
    std::fs::write(node.sa.join("ca.crt"), api.ca_pem()).unwrap();
    api.write_kubeconfig(node.dir.path());
    let xt = host.open().run(|_| Xtables::detect()).unwrap().unwrap();
    let mut w = World {
        host,
        api,
        containerd,
        node,
        primary,
        conf,
        xt,
        empty_netns_dir: tempfile::tempdir().unwrap(),
    };
    assert!(w.tainted() && !w.chained() && !bin_dir.join("istio-cni").exists());
    println!("step 1: node registered tainted, containerd up with bridge + host-local, no istio-cni ({} in)", secs(started.elapsed()));

    // 2. A meshed pod starts before the plugin is there (the taint was bypassed).
    let early = w
        .pod(meshed("default", "early"))
        .expect("sandbox before the plugin");
    assert!(w.no_rules(&early), "no plugin yet, so no rules");
    println!(
        "step 2: meshed pod default/early started without the plugin: no rules ({})",
        early.sandbox.ip
    );

    // 3. The agent: install, self-test, untaint, repair the early pod in place.
    let t0 = Instant::now();
    let mut agent = w.agent();
    let ready = agent.wait_ready();
    let (_, untainted) = wait_for("the node untainted", || (!w.tainted()).then_some(()));
    let (_, repaired) = wait_for("default/early repaired", || w.validated(&early, false).ok());
    wait_for("the IstioCNIRepaired event on default/early", || {
        w.events("early")
            .contains(&"IstioCNIRepaired".to_owned())
            .then_some(())
    });
    assert!(w.chained() && bin_dir.join("istio-cni").exists());
    let since = t0.elapsed();
    println!(
        "step 3: agent ready {} after start, untainted {} later, repaired 1 pod {} after untaint ({} in all)",
        secs(ready),
        secs(untainted),
        secs(repaired),
        secs(since)
    );

    // 4. New pods: meshed ones get validated rules at ADD; plain and kube-system ones none.
    let t = Instant::now();
    let web = w.pod(meshed("default", "web")).expect("meshed sandbox");
    w.validated(&web, true)
        .expect("web: rules read back and probed");
    let plain_pod = w.pod(plain("plain")).expect("plain sandbox");
    let system = w
        .pod(meshed("kube-system", "dns"))
        .expect("kube-system sandbox");
    assert!(w.no_rules(&plain_pod) && w.no_rules(&system));
    println!("step 4: 3 pods through CRI in {}: meshed validated at ADD, plain and kube-system without rules", secs(t.elapsed()));

    // 5. The primary CNI rewrites its config without our entry: re-chained, pods still
    // get rules.
    let t = Instant::now();
    std::fs::write(&w.conf, &w.primary).unwrap();
    let (_, rechained) = wait_for("re-chained", || w.chained().then_some(()));
    let web2 = w
        .pod(meshed("default", "web2"))
        .expect("sandbox after re-chain");
    w.validated(&web2, true)
        .expect("web2: rules after the re-chain");
    println!(
        "step 5: primary config rewritten: re-chained in {}, next pod validated ({} in all)",
        secs(rechained),
        secs(t.elapsed())
    );

    // 6. Someone flushes the nat table in a running meshed pod: the repair loop restores it.
    w.flush_nat(&web);
    assert!(w.validated(&web, false).is_err());
    let (_, restored) = wait_for("default/web repaired after the flush", || {
        w.validated(&web, false).ok()
    });
    println!(
        "step 6: nat table flushed in default/web: restored in {} (resync 2s)",
        secs(restored)
    );

    // 7. Upgrade: SIGTERM while the DaemonSet exists. The plugin stays, the taint stays
    // off, teardown works while no agent runs, and the new agent takes over.
    let t = Instant::now();
    assert!(agent.sigterm().success());
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("keeping the plugin installed"), "{log}");
    assert!(w.chained() && bin_dir.join("istio-cni").exists() && !w.tainted());
    w.teardown(&web2).expect("teardown while the agent is away");
    let agent2 = w.agent();
    let ready2 = agent2.wait_ready();
    assert!(!w.tainted(), "no taint during an upgrade");
    assert!(!w.events(NODE).contains(&"IstioCNITaintAdded".to_owned()));
    println!("step 7: upgrade restart: plugin kept, node never tainted, a pod torn down meanwhile, new agent ready in {} ({} in all)", secs(ready2), secs(t.elapsed()));
    drop(agent);

    // 8. Uninstall: the DaemonSet is gone, SIGTERM removes everything and taints the node;
    // every earlier sandbox still tears down.
    let t = Instant::now();
    let mut agent2 = agent2;
    assert!(w.api.remove("daemonsets", "istio-system", "istio-cni-node"));
    assert!(agent2.sigterm().success());
    assert!(!w.chained(), "entry removed");
    assert!(!bin_dir.join("istio-cni").exists(), "binary removed");
    assert!(
        !w.node.run.join("istio-cni-kubeconfig").exists(),
        "kubeconfig removed"
    );
    assert!(w.tainted(), "node tainted again");
    let pods = [early, web, plain_pod, system];
    for p in &pods {
        w.teardown(p)
            .unwrap_or_else(|e| panic!("teardown after uninstall: {e}"));
    }
    println!("step 8: uninstall: entry, binary and kubeconfig removed, node tainted, 4 sandboxes torn down ({})", secs(t.elapsed()));

    // 9. Nothing left behind.
    assert!(w.containerd.list_pod_sandboxes().is_empty());
    for p in pods.iter().chain([&web2]) {
        assert!(
            !p.sandbox.netns.exists(),
            "{} left behind",
            p.sandbox.netns.display()
        );
    }
    drop(agent2);
    drop(w);
    println!(
        "step 9: cleaned up: no sandbox, netns, containerd state or cgroup left ({} in all)",
        secs(started.elapsed())
    );
}
