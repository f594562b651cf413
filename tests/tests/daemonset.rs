//! `make e2e`: the chart's DaemonSet as rendered, run for real. This test plays kubelet
//! for the agent's own pod: it takes the pod template from the chart that Helm's engine
//! rendered (`ISTIO_CNI_CHART`, written by `charts/render.py`) and runs it through
//! containerd's CRI from the image that `make image` built (`ISTIO_CNI_IMAGE`), on a node
//! whose runtime is that same containerd.
//!
//! The node ([`istio_cni_e2e::node`]) is containerd as PID 1 of its own mount and PID
//! namespaces, with its own `/opt` and `/run` (tmpfs) and `/etc` (an overlay), so that
//! the template's hostPath volumes (`/opt/cni/bin`, `/etc/cni/net.d`,
//! `/var/run/istio-cni`, `/var/run/netns`, `/proc`) and the agent's `/host/proc/1/ns/mnt`
//! are the node's, and nothing of this machine is touched. The API server is the in-repo
//! fake, inside the node's network namespace, over HTTPS with a certificate signed by the
//! CA in the service account's `ca.crt`, as a cluster's: the pod's environment is exactly
//! what kubelet gives it.
//!
//! Steps, one line each with its timing: import the image → the agent installs the static
//! plugin and chains it into the primary config → the node is untainted only after the
//! host-side self-test → a meshed sandbox gets validated rules, a plain one none → SIGTERM
//! with the DaemonSet present (upgrade: the plugin stays, pods keep starting) → a new
//! agent pod → SIGTERM after the DaemonSet is deleted (uninstall: unchained, re-tainted).
//! A second test runs the same pod on a node without `iptables`: the agent says so on
//! `/readyz` and the node stays tainted.
//!
//! Needs root, containerd, runc, busybox-static and util-linux. Ignored by `cargo test`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use istio_cni::apply::Xtables;
use istio_cni::config::NetConf;
use istio_cni::netns::Netns;
use istio_cni::plan::{plan_for_pod, Plan};
use istio_cni::rules::Family;
use istio_cni_e2e::agent::{chained, get};
use istio_cni_e2e::chain::REFERENCE_PLUGIN_DIR;
use istio_cni_e2e::cri::{Containerd, ContainerdDirs, PodSandbox};
use istio_cni_e2e::fake_api::FakeApi;
use istio_cni_e2e::kubelet::unique_uid;
use istio_cni_e2e::net::{unique_name, TestNetns};
use istio_cni_e2e::node::NodeRoot;
use istio_cni_e2e::podtemplate::{Kubelet, PodIdentity};
use istio_cni_e2e::sandbox::{injected_pod, read_back_and_probe};
use k8s_cri::v1::PodSandboxConfig;
use serde_json::{json, Value};

const NODE: &str = "node-ds";
const IMAGE_NAME: &str = "docker.io/istio-cni/istio-cni-node-agent";
const PRIMARY: &str = "/etc/cni/net.d/10-k8s-pod-network.conflist";
const PLUGIN: &str = "/opt/cni/bin/istio-cni";

fn env_path(var: &str, what: &str) -> PathBuf {
    let p = PathBuf::from(std::env::var_os(var).unwrap_or_else(|| panic!("{var}: {what}")));
    assert!(p.is_file(), "{} not found: {what}", p.display());
    p
}

/// Prints one step with the time since the previous one.
struct Steps {
    last: Instant,
    n: usize,
}

impl Steps {
    fn new() -> Steps {
        Steps {
            last: Instant::now(),
            n: 0,
        }
    }

    fn done(&mut self, what: &str) {
        self.n += 1;
        eprintln!(
            "daemonset step {}: {what} ({} ms)",
            self.n,
            self.last.elapsed().as_millis()
        );
        self.last = Instant::now();
    }
}

/// One node with its runtime, the cluster's API, and the chart.
struct Cluster {
    containerd: Containerd,
    api: FakeApi,
    host: TestNetns,
    kubelet: Kubelet,
    daemonset: Value,
    /// The taint key, effect and readiness port the chart configures.
    taint: (String, String),
    ready_port: u16,
    grace: Duration,
    _dir: tempfile::TempDir,
}

/// The agent's pod, as kubelet runs it.
struct AgentPod {
    sandbox: String,
    container: String,
    started: Instant,
}

impl Cluster {
    /// A node laid out as [`NodeRoot`] `extra` says on top of the usual, its containerd
    /// with a bridge + host-local primary config and the image imported, and the chart's
    /// objects in the API.
    fn new(steps: &mut Steps, hide: &[&str]) -> Cluster {
        let chart: Vec<Value> = serde_json::from_slice(
            &std::fs::read(env_path(
                "ISTIO_CNI_CHART",
                "run charts/render.py (make e2e)",
            ))
            .unwrap(),
        )
        .unwrap();
        let one = |kind: &str| {
            chart
                .iter()
                .find(|o| o["kind"] == kind)
                .unwrap_or_else(|| panic!("no {kind} in the chart"))
                .clone()
        };
        let (daemonset, config_map) = (one("DaemonSet"), one("ConfigMap"));
        let data: HashMap<String, String> =
            serde_json::from_value(config_map["data"].clone()).unwrap();
        let taint = (data["TAINT_KEY"].clone(), data["TAINT_EFFECT"].clone());

        let host = TestNetns::new("ds");
        let api = FakeApi::start_tls_in(&host);
        api.put(
            "nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
                   "spec": {"taints": [{"key": taint.0, "effect": taint.1}]},
                   "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        let daemonset = api.put("daemonsets", daemonset);

        let mut root = NodeRoot::new()
            .own_pid_namespace()
            .writable("/etc", &[])
            .tmpfs("/opt")
            .tmpfs("/run")
            .mkdir("/etc/cni/net.d")
            .mkdir("/opt/cni/bin");
        if !hide.is_empty() {
            root = root.writable("/usr/sbin", hide);
        }
        let containerd = ContainerdDirs::new().start_on_node(&host, &root);
        let node = containerd.node().expect("a node");
        let dir = tempfile::tempdir().unwrap();
        let primary = json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network",
            "plugins": [{"type": "bridge", "bridge": unique_name("dsbr"), "isGateway": true,
                         "ipam": {"type": "host-local", "dataDir": dir.path().join("ipam"),
                                  "ranges": [[{"subnet": "10.78.0.0/24"}]],
                                  "routes": [{"dst": "0.0.0.0/0"}]}}]
        });
        std::fs::write(node.path(PRIMARY), primary.to_string()).unwrap();
        for b in ["bridge", "host-local", "loopback"] {
            std::os::unix::fs::symlink(
                Path::new(REFERENCE_PLUGIN_DIR).join(b),
                node.path("/opt/cni/bin").join(b),
            )
            .unwrap();
        }
        let kubelet = Kubelet {
            node_root: node.path("/"),
            root: dir.path().join("kubelet"),
            config_maps: HashMap::from([(
                config_map["metadata"]["name"].as_str().unwrap().to_owned(),
                data,
            )]),
            service: ("127.0.0.1".into(), api.addr().port()),
            extra_env: Vec::new(),
            token: "daemonset-e2e-token".into(),
            ca_pem: api.ca_pem().to_owned(),
        };
        steps.done("node up: containerd as the node's PID 1, primary CNI config");

        let archive = env_path("ISTIO_CNI_IMAGE", "run make image (make e2e)");
        containerd.ctr(&[
            "images",
            "import",
            "--base-name",
            IMAGE_NAME,
            archive.to_str().unwrap(),
        ]);
        steps.done("image imported with ctr images import");

        let spec = &daemonset["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        let ready_port = c["readinessProbe"]["httpGet"]["port"]
            .as_u64()
            .expect("readiness port") as u16;
        let grace =
            Duration::from_secs(spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30));
        Cluster {
            containerd,
            api,
            host,
            kubelet,
            daemonset,
            taint,
            ready_port,
            grace,
            _dir: dir,
        }
    }

    fn template(&self) -> &Value {
        &self.daemonset["spec"]["template"]
    }

    /// Creates the agent's pod in the API (owned by the DaemonSet, as its controller does)
    /// and runs it through CRI.
    fn start_agent(&mut self) -> AgentPod {
        let ds_name = self.daemonset["metadata"]["name"].as_str().unwrap();
        let pod = PodIdentity {
            namespace: self.daemonset["metadata"]["namespace"]
                .as_str()
                .unwrap()
                .into(),
            name: format!("{ds_name}-{}", &unique_name("p")[..5].to_lowercase()),
            uid: unique_uid(),
            node_name: NODE.into(),
        };
        let mut object = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
                         "labels": self.template()["metadata"]["labels"],
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                             "name": ds_name, "uid": self.daemonset["metadata"]["uid"],
                             "controller": true}]},
            "spec": self.template()["spec"]});
        object["spec"]["nodeName"] = json!(NODE);
        self.api.put("pods", object);
        let sandbox_config: PodSandboxConfig = self.kubelet.sandbox_config(&pod, self.template());
        let name = self.template()["spec"]["containers"][0]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        let config = self.kubelet.container_config(&pod, self.template(), &name);
        let sandbox = self
            .containerd
            .run_pod_sandbox_with(sandbox_config.clone())
            .unwrap_or_else(|e| panic!("RunPodSandbox(agent): {e}\n{}", self.containerd.log()));
        let started = Instant::now();
        let container = self
            .containerd
            .start_container(&sandbox, &sandbox_config, config)
            .unwrap_or_else(|e| panic!("start the agent: {e}\n{}", self.containerd.log()));
        AgentPod {
            sandbox,
            container,
            started,
        }
    }

    /// The agent container's log so far.
    fn agent_log(&self) -> String {
        let mut out = String::new();
        for entry in walk(&self.kubelet.root.join("pods")) {
            if entry.extension().is_some_and(|e| e == "log") {
                out += &std::fs::read_to_string(&entry).unwrap_or_default();
            }
        }
        out
    }

    /// GET `/readyz` on the readiness port, in the node's network namespace.
    fn readyz(&self) -> Option<(u16, String)> {
        let port = self.ready_port;
        self.host.open().run(|_| get(port, "/readyz")).ok()?
    }

    fn tainted(&self) -> bool {
        self.api.get("nodes", "", NODE).unwrap()["spec"]["taints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["key"] == self.taint.0.as_str())
    }

    fn node_path(&self, path: &str) -> PathBuf {
        istio_cni_e2e::node::resolve_in(&self.kubelet.node_root, Path::new(path))
    }

    /// Waits for `cond`, printing the agent's log if it does not come.
    fn wait<T>(&self, what: &str, mut cond: impl FnMut(&Cluster) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = cond(self) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nagent log:\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kubelet stopping the agent's pod: StopContainer with the template's grace period,
    /// then the sandbox.
    fn stop_agent(&mut self, agent: &AgentPod) -> i32 {
        let code = self
            .containerd
            .stop_container(&agent.container, self.grace)
            .unwrap_or_else(|e| panic!("StopContainer(agent): {e}"));
        self.containerd.remove_container(&agent.container).unwrap();
        self.containerd.stop_pod_sandbox(&agent.sandbox).unwrap();
        self.containerd.remove_pod_sandbox(&agent.sandbox).unwrap();
        code
    }

    /// A pod of the cluster, created in the API and run through CRI (CNI ADD).
    fn app_pod(&mut self, object: Value) -> Result<PodSandbox, String> {
        let uid = unique_uid();
        let mut object = object;
        object["metadata"]["uid"] = json!(uid);
        object["spec"]["nodeName"] = json!(NODE);
        let ns = object["metadata"]["namespace"].as_str().unwrap().to_owned();
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        self.api.put("pods", object);
        self.containerd.run_pod_sandbox(&ns, &name, &uid)
    }

    /// Checks that `sandbox` (meshed) holds exactly the rules ADD plans and that they
    /// redirect, and returns its netns (the handle outlives the runtime's file).
    fn assert_redirected(&self, sandbox: &PodSandbox, object: &Value) -> Netns {
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0"}"#).unwrap();
        let pod = serde_json::from_value(object.clone()).unwrap();
        let Plan::Redirect(ruleset) = plan_for_pod(&conf, &pod).unwrap() else {
            panic!("the meshed pod must be planned for redirection");
        };
        let xt = self.xtables();
        let netns = Netns::open(&self.node_path(sandbox.netns.to_str().unwrap())).unwrap();
        netns
            .run(|inside| read_back_and_probe(inside, &xt, &ruleset, true))
            .unwrap()
            .unwrap_or_else(|e| panic!("meshed sandbox: {e}"));
        netns
    }

    /// The iptables backend of the node's network namespace.
    fn xtables(&self) -> Xtables {
        self.host
            .open()
            .run(|_| Xtables::detect())
            .unwrap()
            .unwrap()
    }

    fn istio_rules(&self, netns: &Netns) -> Vec<String> {
        let xt = self.xtables();
        netns
            .run(|inside| xt.binaries(Family::V4).unwrap().save_text(inside))
            .unwrap()
            .unwrap()
            .lines()
            .filter(|l| l.contains("ISTIO"))
            .map(str::to_owned)
            .collect()
    }
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// What this machine has at the node's paths, to show the test wrote none of it.
fn machine_paths() -> Vec<(PathBuf, bool)> {
    [
        "/opt/cni/bin/istio-cni",
        "/etc/cni/net.d",
        "/var/run/istio-cni",
    ]
    .iter()
    .map(|p| (PathBuf::from(p), Path::new(p).exists()))
    .collect()
}

#[test]
#[ignore = "needs the image and the rendered chart (make e2e runs it)"]
fn the_rendered_daemonset_installs_proves_and_uninstalls_on_a_node() {
    let before = machine_paths();
    let mut steps = Steps::new();
    let mut cluster = Cluster::new(&mut steps, &[]);

    // The agent's pod, from the template as rendered.
    let agent = cluster.start_agent();
    cluster.wait("the plugin installed and chained", |c| {
        (c.node_path(PLUGIN).is_file() && chained(&c.node_path(PRIMARY))).then_some(())
    });
    let installed = agent.started.elapsed();
    cluster.wait("/readyz 200", |c| (c.readyz()?.0 == 200).then_some(()));
    cluster.wait("the node untainted", |c| (!c.tainted()).then_some(()));
    let untainted = agent.started.elapsed();
    let file = istio_cni_e2e::net::run(
        std::process::Command::new("file")
            .arg("-b")
            .arg(cluster.node_path(PLUGIN)),
    );
    let file = String::from_utf8_lossy(&file.stdout).into_owned();
    assert!(file.contains("static"), "the installed plugin: {file}");
    let log = cluster.agent_log();
    assert!(log.contains("self-test passed"), "{log}");
    steps.done(&format!(
        "agent container started → plugin installed and chained in {} ms → self-test in the \
         node's mount namespace passed and node untainted {} ms after start",
        installed.as_millis(),
        untainted.as_millis()
    ));

    // Pods started by the same runtime go through the chained plugin.
    let meshed = injected_pod("default", "web", json!({}), json!({}));
    let web = cluster
        .app_pod(meshed.clone())
        .unwrap_or_else(|e| panic!("RunPodSandbox(web): {e}\n{}", cluster.containerd.log()));
    let web_ns = cluster.assert_redirected(&web, &meshed);
    let plain = cluster
        .app_pod(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "plain", "namespace": "default"},
            "spec": {"containers": [{"name": "app", "image": "app"}]}}))
        .unwrap_or_else(|e| panic!("RunPodSandbox(plain): {e}\n{}", cluster.containerd.log()));
    let plain_ns = Netns::open(&cluster.node_path(plain.netns.to_str().unwrap())).unwrap();
    assert_eq!(cluster.istio_rules(&plain_ns), Vec::<String>::new());
    for sb in [&web, &plain] {
        cluster.containerd.stop_pod_sandbox(&sb.id).unwrap();
        cluster.containerd.remove_pod_sandbox(&sb.id).unwrap();
    }
    assert_eq!(
        cluster.istio_rules(&web_ns),
        Vec::<String>::new(),
        "DEL leaves no rules"
    );
    drop((web_ns, plain_ns));
    steps.done("meshed sandbox validated and redirected, plain one untouched, both torn down");

    // Upgrade: SIGTERM while the DaemonSet exists keeps the plugin; pods keep starting.
    let code = cluster.stop_agent(&agent);
    assert_eq!(code, 0, "{}", cluster.agent_log());
    assert!(cluster.node_path(PLUGIN).is_file() && chained(&cluster.node_path(PRIMARY)));
    assert!(!cluster.tainted(), "an upgrade must not taint the node");
    let meshed2 = injected_pod("default", "web2", json!({}), json!({}));
    let web2 = cluster
        .app_pod(meshed2.clone())
        .unwrap_or_else(|e| panic!("RunPodSandbox(web2) without an agent: {e}"));
    drop(cluster.assert_redirected(&web2, &meshed2));
    cluster.containerd.stop_pod_sandbox(&web2.id).unwrap();
    cluster.containerd.remove_pod_sandbox(&web2.id).unwrap();
    steps.done("SIGTERM with the DaemonSet present: exit 0, plugin kept, a pod started meanwhile");

    // The next agent pod (the upgrade's new one) comes up on the installed node.
    let agent = cluster.start_agent();
    cluster.wait("/readyz 200 again", |c| {
        (c.readyz()?.0 == 200).then_some(())
    });
    steps.done(&format!(
        "new agent pod ready {} ms after start",
        agent.started.elapsed().as_millis()
    ));

    // Uninstall: the DaemonSet is gone, then SIGTERM.
    let ds = &cluster.daemonset["metadata"];
    assert!(cluster.api.remove(
        "daemonsets",
        ds["namespace"].as_str().unwrap(),
        ds["name"].as_str().unwrap()
    ));
    let code = cluster.stop_agent(&agent);
    assert_eq!(code, 0, "{}", cluster.agent_log());
    assert!(!chained(&cluster.node_path(PRIMARY)), "still chained");
    assert!(
        !cluster.node_path(PLUGIN).exists(),
        "plugin left on the node"
    );
    assert!(cluster.tainted(), "uninstall re-taints the node");
    steps.done("SIGTERM after the DaemonSet was deleted: unchained, plugin removed, node tainted");

    drop(cluster);
    assert_eq!(
        machine_paths(),
        before,
        "the test touched this machine's paths"
    );
    steps.done("torn down: containers, sandboxes, image store, node namespaces, dirs");
}

#[test]
#[ignore = "needs the image and the rendered chart (make e2e runs it)"]
fn a_node_without_iptables_keeps_its_taint_and_readyz_says_why() {
    let mut steps = Steps::new();
    let mut cluster = Cluster::new(&mut steps, &["iptables*", "ip6tables*", "xtables*"]);
    assert!(!cluster.node_path("/usr/sbin/iptables").exists());
    let agent = cluster.start_agent();
    let body = cluster.wait("/readyz to name the missing iptables", |c| {
        let (status, body) = c.readyz()?;
        (status != 200 && body.contains("iptables")).then_some(body)
    });
    assert!(body.contains("self-test"), "{body}");
    // Past the taint controller's first decisions: still tainted.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        cluster.tainted(),
        "a node without iptables must stay tainted"
    );
    steps.done(&format!(
        "no iptables on the node (the image has its own): not ready, tainted; /readyz says: {}",
        body.trim()
    ));
    cluster.stop_agent(&agent);
}
