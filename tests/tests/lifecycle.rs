//! `make e2e`: the node lifecycle an operator lives through, on one node, with real parts
//! only: containerd's CRI with a bridge + host-local primary config, the real agent and
//! plugin binaries, real netns and iptables, and the fake API server as the cluster.
//!
//! join (tainted) → a pod that slipped in before the plugin → the agent installs,
//! untaints and repairs it → new pods get validated rules at ADD → the primary CNI
//! rewrites its config → a flushed pod is repaired → upgrade restart → uninstall → every
//! sandbox still tears down → nothing left behind. One line per step, with timings.
//!
//! With the real ztunnel (built from `../shared/peers/ztunnel/`; without it these parts
//! say so and are skipped), ambient mode is on and namespace `amb` is ambient, and each
//! step has an ambient pod too: one that slipped in before the plugin is enrolled by the
//! agent's watch once ztunnel is there (the taint does not wait for ztunnel); a new one is
//! enrolled at ADD; a flushed one is repaired; across the upgrade ztunnel keeps serving
//! them (the new agent's snapshot hands each over again, no `KeepWorkload`); uninstall
//! removes the node's probe rules, and their sandboxes tear down.
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
use istio_cni_e2e::ztunnel::{self, Ztunnel};
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
    /// The ztunnel binary, when the peer kit is there: ambient mode on.
    ztunnel: Option<PathBuf>,
    /// ztunnel's socket dir (root only) and working dir.
    ztunnel_dir: tempfile::TempDir,
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
        // kubelet writes the status only: what ADD wrote (an annotation) stays.
        let mut object = self.api.get("pods", &ns, &name).unwrap_or(object);
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
        // The netns dirs: containerd pins its pods' netns in /var/run/netns (where an
        // ambient ADD's netns must be); the repair loop finds pods by their processes.
        let netns_dirs = format!("{},/var/run/netns", self.empty_netns_dir.path().display());
        let uds = self.uds();
        let ambient: Vec<&str> = if self.ztunnel.is_some() {
            vec![
                "--ambient-enabled",
                "true",
                "--ztunnel-uds-address",
                uds.to_str().unwrap(),
                "--host-root",
                "/",
            ]
        } else {
            Vec::new()
        };
        let mut args = vec![
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
            &netns_dirs,
            "--repair-resync-seconds",
            "2",
            // The default grace: an upgraded agent's install and self-test must fit in
            // it, as on a node (a loaded CI machine took 2.4 s with the debug binary).
            "--taint-grace-seconds",
            "10",
        ];
        args.extend(ambient);
        self.node.spawn(
            Some(&self.host),
            &[
                ("KUBERNETES_SERVICE_HOST", "127.0.0.1".into()),
                ("KUBERNETES_SERVICE_PORT", port),
                ("KUBERNETES_SERVICE_PROTOCOL", "http".into()),
            ],
            &args,
        )
    }

    fn uds(&self) -> PathBuf {
        self.ztunnel_dir.path().join("ztunnel.sock")
    }

    /// The real ztunnel on the node, serving the ZDS socket, once ready.
    fn start_ztunnel(&self, bin: &std::path::Path) -> Ztunnel {
        let dir = self.ztunnel_dir.path();
        std::fs::write(dir.join("local.yaml"), ztunnel::local_yaml(NODE, &[])).unwrap();
        let zt = Ztunnel::start(bin, &self.host, NODE, dir, &self.uds());
        wait_for("ztunnel ready", || ztunnel::ready(&self.host).then_some(()));
        zt
    }

    /// Which of ztunnel's ports (15001, 15006, 15008) listen in the pod's netns.
    fn ztunnel_ports(&self, pod: &RunningPod) -> Vec<u16> {
        ztunnel::listening_ports(&Netns::open(&pod.sandbox.netns).unwrap())
    }

    /// The pod's `ambient.istio.io/redirection` annotation in the API.
    fn redirection(&self, pod: &RunningPod) -> Option<String> {
        let (ns, name) = (
            pod.object["metadata"]["namespace"].as_str().unwrap(),
            pod.object["metadata"]["name"].as_str().unwrap(),
        );
        self.api.get("pods", ns, name)?["metadata"]["annotations"]["ambient.istio.io/redirection"]
            .as_str()
            .map(str::to_owned)
    }

    /// Captured by ztunnel: enabled, its listeners in the netns, its rules redirecting to
    /// them.
    fn captured(&self, pod: &RunningPod) -> bool {
        self.redirection(pod).as_deref() == Some("enabled")
            && self.ztunnel_ports(pod) == [15001, 15006, 15008]
            && self
                .istio_lines(pod)
                .iter()
                .any(|l| l.contains("-j REDIRECT --to-ports 15001"))
    }

    /// The pod's iptables-save lines (v4) that mention an ISTIO chain.
    fn istio_lines(&self, pod: &RunningPod) -> Vec<String> {
        let ns = Netns::open(&pod.sandbox.netns).unwrap();
        let saved = ns
            .run(|inside| self.xt.binaries(Family::V4).unwrap().save_text(inside))
            .unwrap()
            .unwrap();
        saved
            .lines()
            .filter(|l| l.contains("ISTIO"))
            .map(str::to_owned)
            .collect()
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

/// A pod of the ambient namespace `amb`.
fn in_amb(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "amb"},
           "spec": {"containers": [{"name": "app", "image": "app"}]}})
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
    for (ns, labels) in [
        ("default", json!({})),
        ("kube-system", json!({})),
        ("amb", json!({"istio.io/dataplane-mode": "ambient"})),
    ] {
        api.put(
            "namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": ns, "labels": labels}}),
        );
    }
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
        ztunnel: ztunnel::binary(),
        ztunnel_dir: tempfile::Builder::new().prefix("zt-").tempdir().unwrap(),
    };
    let ambient = w.ztunnel.clone();
    if ambient.is_none() {
        println!("(no ../shared/peers/ztunnel: the ambient parts are skipped)");
    }
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
    let early_amb = ambient.as_ref().map(|_| {
        let p = w
            .pod(in_amb("early"))
            .expect("ambient sandbox before the plugin");
        assert!(w.no_rules(&p));
        println!("        ambient pod amb/early started without the plugin: no rules");
        p
    });

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
    // The taint went with no ztunnel on the node; ztunnel comes now, and the agent's
    // watch enrols the ambient pod that slipped in.
    let mut zt = None;
    if let (Some(bin), Some(p)) = (&ambient, &early_amb) {
        let t = Instant::now();
        zt = Some(w.start_ztunnel(bin));
        let (_, took) = wait_for("amb/early enrolled by the watch", || {
            w.captured(p).then_some(())
        });
        println!(
            "        untainted with no ztunnel; ztunnel ready {}, then amb/early enrolled by the watch {} later",
            secs(t.elapsed() - took),
            secs(took)
        );
    }

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
    let app = ambient.as_ref().map(|_| {
        let t = Instant::now();
        let p = w.pod(in_amb("app")).expect("ambient sandbox");
        assert!(w.captured(&p), "amb/app captured when its ADD returns");
        println!(
            "        ambient pod amb/app through CRI in {}: rules, ztunnel's listeners and `enabled` at ADD",
            secs(t.elapsed())
        );
        p
    });

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
    if let Some(p) = &app {
        let before = w.istio_lines(p);
        w.flush_nat(p);
        assert_ne!(w.istio_lines(p), before);
        let (_, took) = wait_for("amb/app repaired after the flush", || {
            (w.istio_lines(p) == before).then_some(())
        });
        wait_for("the IstioCNIRepaired event on amb/app", || {
            w.events("app")
                .contains(&"IstioCNIRepaired".to_owned())
                .then_some(())
        });
        println!(
            "        nat table flushed in amb/app: restored in {}",
            secs(took)
        );
    }

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
    if let (Some(zt), Some(app), Some(early_amb)) = (&zt, &app, &early_amb) {
        wait_for("ztunnel's snapshot from the new agent", || {
            (zt.snapshots_taken() >= 2).then_some(())
        });
        assert!(w.captured(app) && w.captured(early_amb));
        let log = zt.log_tail(100_000);
        assert!(!log.contains("pod keep received"), "{log}");
        println!(
            "        ambient pods still captured: the new agent's snapshot handed both over again"
        );
    }

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
    let host_nat = w.host.exec(&["iptables-save", "-t", "nat"]);
    assert!(!host_nat.contains("ISTIO_POSTRT"), "{host_nat}");
    let pods: Vec<RunningPod> = [early, web, plain_pod, system]
        .into_iter()
        .chain(early_amb)
        .chain(app)
        .collect();
    for p in &pods {
        w.teardown(p)
            .unwrap_or_else(|e| panic!("teardown after uninstall: {e}"));
    }
    println!("step 8: uninstall: entry, binary, kubeconfig and the node's probe rules removed, node tainted, {} sandboxes torn down ({})", pods.len(), secs(t.elapsed()));
    drop(zt);

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
