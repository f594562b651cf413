//! Ambient mode end to end on one node: the real `istio-cni-node-agent run` with
//! `--ambient-enabled` (against the fake API server), the chained entry it installs, and
//! the real plugin's ADD for pods laid out as kubelet leaves them (a netns with the pod's
//! address, a process in a cgroup naming the pod UID). Needs root.
//!
//! In `make test`: ADD of an ambient pod fails with the agent's reason and leaves nothing
//! in the netns while no ztunnel captures it (none connected; one that acks without
//! listening), plain pods pass through, hostile plugin events are refused, and without
//! the agent ADD fails with code 11. With the real ztunnel (`make e2e`, `--ignored`): ADD
//! returns once ztunnel listens in the pod's netns, and the pod is annotated.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use istio_cni::pluginevent::{send_add, AddEvent, SendError};
use istio_cni_e2e::agent::{chained, wait_for, Daemon, Node, PRIMARY};
use std::io::{Read as _, Write as _};

use istio_cni_e2e::chain::{istio_cni_bin, Attachment, Chain, REFERENCE_PLUGIN_DIR};
use istio_cni_e2e::fake_api::FakeApi;
use istio_cni_e2e::kubelet::{Layout, NodePods, RunningPod};
use istio_cni_e2e::net::{unique_name, TestNetns};
use istio_cni_e2e::sandbox::{injected_pod, listen_in};
use istio_cni_e2e::ztunnel::{self, LocalWorkload, Ztunnel};
use istio_cni_node_agent::ambient::ipset::Set;
use serde_json::{json, Value};

const NODE: &str = "node-1";
const REDIRECTION: &str = "ambient.istio.io/redirection";

/// One test's node: its netns (where the agent, the API server, the plugin and ztunnel
/// run, as on a node with `hostNetwork`), agent dirs with a primary config, the API (with
/// namespace `default`), the pods' cgroups and netns, and a root-only dir for the ZDS
/// socket.
struct Setup {
    node_ns: TestNetns,
    node: Node,
    api: FakeApi,
    pods: NodePods,
    kubeconfig: PathBuf,
    ztunnel_dir: tempfile::TempDir,
    next_ip: u8,
    subnet: u8,
    /// The agent's `--native-nftables`.
    nft: bool,
    /// The repair loop on, sweeping every second with a 1 s cooldown.
    repair: bool,
    /// The node taint managed (`--taint-enabled`).
    taint: bool,
    /// More flags for the agent.
    extra: Vec<&'static str>,
    /// The test process's own netns's (the machine's) rules and policy routes at the
    /// start: nothing of a test may land there.
    host_before: Vec<String>,
}

/// The rules of ours (`ISTIO_*` chains, `istio-*` nft tables) and `0x111` policy routes in
/// the netns of the test process itself (the machine's).
fn host_istio_state() -> Vec<String> {
    let run = |cmd: &[&str]| {
        std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let mut out: Vec<String> = Vec::new();
    for cmd in [
        &["iptables-save"][..],
        &["ip6tables-save"],
        &["nft", "list", "tables"],
        &["ip", "rule", "show"],
    ] {
        out.extend(
            run(cmd)
                .lines()
                .filter(|l| l.contains("ISTIO") || l.contains("istio") || l.contains("0x111"))
                .map(str::to_owned),
        );
    }
    out
}

impl Drop for Setup {
    fn drop(&mut self) {
        let now = host_istio_state();
        if now == self.host_before {
            return;
        }
        if std::thread::panicking() {
            eprintln!("ALSO: rules of ours appeared in the machine's own netns: {now:?}");
        } else {
            assert_eq!(
                now, self.host_before,
                "rules of ours appeared in the machine's own netns"
            );
        }
    }
}

impl Setup {
    fn new(subnet: u8) -> Setup {
        let node_ns = TestNetns::new("amn");
        let node = Node::new("net.d");
        std::fs::create_dir(&node.net).unwrap();
        std::fs::write(node.conf(), PRIMARY).unwrap();
        let api = FakeApi::start_in(&node_ns);
        api.put(
            "namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
        );
        let kubeconfig = api.write_kubeconfig(node.dir.path());
        Setup {
            node_ns,
            node,
            api,
            pods: NodePods::new(),
            kubeconfig,
            ztunnel_dir: tempfile::Builder::new().prefix("zt-").tempdir().unwrap(),
            next_ip: 10,
            subnet,
            nft: false,
            repair: false,
            taint: false,
            extra: Vec::new(),
            host_before: host_istio_state(),
        }
    }

    fn uds(&self) -> PathBuf {
        self.ztunnel_dir.path().join("ztunnel.sock")
    }

    /// The agent, ambient on, until its entry is chained.
    fn agent(&self) -> Daemon {
        let uds = self.uds();
        // `ip netns` pins the test pods' netns in /var/run/netns, as containerd does.
        let netns_dirs = format!("/var/run/netns,{}", self.pods.netns_dir().display());
        let repair: &[&str] = if self.repair {
            &[
                "--repair-enabled",
                "true",
                "--repair-resync-seconds",
                "1",
                "--repair-cooldown-seconds",
                "1",
            ]
        } else {
            &["--repair-enabled", "false"]
        };
        let args = [
            "--node-name",
            NODE,
            "--taint-enabled",
            if self.taint { "true" } else { "false" },
            "--native-nftables",
            if self.nft { "true" } else { "false" },
        ];
        let args: Vec<&str> = args
            .iter()
            .chain(repair)
            .chain(&self.extra)
            .copied()
            .collect();
        let daemon =
            self.node
                .spawn_ambient(&self.node_ns, &self.kubeconfig, &netns_dirs, &uds, &args);
        wait_for("the agent to chain its entry", || {
            chained(&self.node.conf()).then_some(())
        });
        wait_for("the plugin-event socket", || {
            self.node
                .run
                .join(istio_cni::pluginevent::SOCKET_NAME)
                .exists()
                .then_some(())
        });
        daemon
    }

    /// The chain of our installed entry alone (the primary plugin's part is played by
    /// [`RunningPod::add`]'s prevResult), with the test's kubeconfig.
    fn chain(&self) -> Chain {
        let conf: Value =
            serde_json::from_slice(&std::fs::read(self.node.conf()).unwrap()).unwrap();
        let mut entry = conf["plugins"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(entry["ambient_enabled"], json!(true), "{entry}");
        // The agent's kubeconfig holds a service account token the fake API does not
        // check; the test's reaches it the same way over plain HTTP.
        entry["kubernetes"]["kubeconfig"] = json!(self.kubeconfig);
        Chain {
            name: "k8s-pod-network".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![entry],
            // The binary the agent installs; used from where it was built, since the agent
            // removes its copy when it stops.
            cni_path: vec![istio_cni_bin().parent().unwrap().to_owned()],
            runtime_netns: Some(self.node_ns.name.clone()),
            env: Vec::new(),
        }
    }

    /// The entries of the node's IPv4 probe set: (address, comment).
    fn probe_set(&self) -> Vec<(String, String)> {
        let set = Set {
            name: "istio-inpod-probes-v4".into(),
            ipv6: false,
        };
        self.node_ns
            .open()
            .run(|_| set.list())
            .unwrap()
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.ip.to_string(), e.comment.unwrap_or_default()))
            .collect()
    }

    /// The node's `nat` rules of ours (`ISTIO_POSTRT`).
    fn host_rules(&self) -> Vec<String> {
        self.node_ns
            .exec(&["iptables-save", "-t", "nat"])
            .lines()
            .filter(|l| l.contains("ISTIO_POSTRT"))
            .map(str::to_owned)
            .collect()
    }

    /// A pod laid out as `layout`, stored in the API as `labels` make it, as the API has
    /// it during ADD: scheduled, `Pending`, no address yet.
    fn pod(&mut self, name: &str, labels: Value, layout: Layout) -> RunningPod {
        self.next_ip += 1;
        let pod = self
            .pods
            .start(layout, Ipv4Addr::new(10, self.subnet, 0, self.next_ip));
        let mut object = pod.object(
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "default", "labels": labels},
                   "spec": {"serviceAccountName": name,
                            "containers": [{"name": "app", "image": "app"}]}}),
            NODE,
        );
        object["status"] = json!({"phase": "Pending"});
        self.api.put("pods", object);
        pod
    }

    /// A pod that has been running for a while: `Running`, its address in the API.
    fn running_pod(&mut self, name: &str, labels: Value) -> RunningPod {
        let pod = self.pod(name, labels, Layout::Systemd);
        let object = pod.object(self.api.get("pods", "default", name).unwrap(), NODE);
        self.api.put("pods", object);
        pod
    }

    fn label_namespace(&self, labels: Value) {
        let mut ns = self.api.get("namespaces", "", "default").unwrap();
        ns["metadata"]["labels"] = labels;
        self.api.put("namespaces", ns);
    }

    /// The real ztunnel `bin` in the node netns, serving `workloads` (name, address) of
    /// namespace `default`, once ready.
    fn start_ztunnel(&self, bin: &Path, workloads: &[(&str, Ipv4Addr)]) -> Ztunnel {
        let workloads: Vec<LocalWorkload> = workloads
            .iter()
            .map(|(name, ip)| LocalWorkload {
                name: (*name).into(),
                namespace: "default".into(),
                ip: (*ip).into(),
            })
            .collect();
        let dir = self.ztunnel_dir.path();
        std::fs::write(
            dir.join("local.yaml"),
            ztunnel::local_yaml(NODE, &workloads),
        )
        .unwrap();
        let zt = Ztunnel::start(bin, &self.node_ns, NODE, dir, &self.uds());
        wait_for("ztunnel ready", || {
            ztunnel::ready(&self.node_ns).then_some(())
        });
        zt
    }

    /// A running pod that an earlier agent enrolled: annotated `enabled` in the API (its
    /// netns holds no rules here).
    fn enrolled_before(&mut self, name: &str) -> RunningPod {
        let pod = self.running_pod(name, json!({}));
        let mut object = self.api.get("pods", "default", name).unwrap();
        object["metadata"]["annotations"] = json!({REDIRECTION: "enabled"});
        self.api.put("pods", object);
        pod
    }

    /// The node routes between its pods (`/proc/sys/net` is the writing thread's netns's).
    fn route_between_pods(&self) {
        self.node_ns
            .open()
            .run(|_| {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                std::fs::write("/proc/sys/net/ipv4/conf/all/rp_filter", "0")
            })
            .unwrap()
            .expect("the node netns's sysctls");
    }

    fn ambient_pod(&mut self, name: &str) -> RunningPod {
        self.pod(
            name,
            json!({"istio.io/dataplane-mode": "ambient"}),
            Layout::Systemd,
        )
    }

    fn annotation(&self, name: &str) -> Option<String> {
        self.api.get("pods", "default", name)?["metadata"]["annotations"][REDIRECTION]
            .as_str()
            .map(str::to_owned)
    }
}

/// The node's rules and routes: both families' iptables (counters left out; a table with
/// nothing but its built-in chains at their default policy is no state: writing into a
/// family loads its table), policy rules, routes of every table.
fn node_state(node: &TestNetns) -> Vec<String> {
    let mut out = Vec::new();
    for save in ["iptables-save", "ip6tables-save"] {
        let text = node.exec(&[save]);
        let mut table: Vec<String> = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let line = match line.find(" [") {
                Some(i) if line.starts_with(':') => &line[..i],
                _ => line,
            };
            table.push(line.to_owned());
            if line == "COMMIT" {
                let empty = table.iter().all(|l| {
                    l.starts_with('*')
                        || l == "COMMIT"
                        || (l.starts_with(':') && l.ends_with(" ACCEPT"))
                });
                if !empty {
                    out.append(&mut table);
                }
                table.clear();
            }
        }
    }
    for cmd in [
        &["ip", "rule", "show"][..],
        &["ip", "-6", "rule", "show"],
        &["ip", "route", "show", "table", "all"],
    ] {
        out.extend(node.exec(cmd).lines().map(str::to_owned));
    }
    out
}

/// Nothing of an enrolment in `netns`: no iptables rule of ours, no `0x111` policy route.
fn untouched(netns: &TestNetns) {
    assert!(
        netns.istio_rules(false).is_empty(),
        "{:?}",
        netns.istio_rules(false)
    );
    let rules = netns.exec(&["ip", "rule", "show"]);
    assert!(!rules.contains("0x111"), "{rules}");
}

/// ADD of an ambient pod fails, with the agent's reason and nothing left in the netns,
/// while no ztunnel captures it: none connected, then one that acks without listening
/// (istio/istio#57285). A plain pod passes through untouched. When the agent stops, ADD
/// fails with code 11 naming the socket. The node's probe SNAT is written at start, put
/// back after a flush, and removed at the end, and nothing else of the node's rules and
/// routes changes.
#[test]
fn an_ambient_add_fails_clean_unless_ztunnel_captures_the_pod() {
    let mut s = Setup::new(81);
    // Other software's rules and routes on the node, which the agent must leave alone:
    // a chain with our prefix, a jump to it in POSTROUTING, a rule on ztunnel's mark.
    for rule in [
        "iptables -t nat -N ISTIO_FOREIGN",
        "iptables -t nat -A ISTIO_FOREIGN -j RETURN",
        "iptables -t nat -A POSTROUTING -o lo -j ISTIO_FOREIGN",
        "iptables -t mangle -A OUTPUT -m mark --mark 0x539/0xfff -j ACCEPT",
        "ip rule add fwmark 0x111/0xfff pref 32764 lookup 100",
        "ip route add local default dev lo table 100",
    ] {
        s.node_ns.exec(&rule.split(' ').collect::<Vec<_>>());
    }
    let before = node_state(&s.node_ns);
    let mut agent = s.agent();
    let chain = s.chain();
    // The node's probe SNAT, as upstream writes it (here as iptables-save prints it),
    // before any pod is enrolled.
    assert_eq!(
        s.host_rules(),
        [
            ":ISTIO_POSTRT - [0:0]",
            "-A POSTROUTING -j ISTIO_POSTRT",
            "-A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127",
        ]
    );

    // With no ztunnel, ADD waits for one a few seconds, then fails with "try again later".
    let web = s.ambient_pod("web");
    let e = web.add(&chain, "default", "web").unwrap_err();
    assert_eq!(e.code(), Some(11), "{e:?}");
    assert!(
        e.msg().contains("no ztunnel is connected") && e.msg().contains("waited 5s"),
        "{}",
        e.msg()
    );
    untouched(&web.netns);
    assert_eq!(s.annotation("web"), None);

    let plain = s.pod("plain", json!({}), Layout::Systemd);
    let result = plain.add(&chain, "default", "plain").expect("plain pod");
    assert_eq!(
        result["ips"][0]["address"],
        json!(format!("{}/24", plain.ip))
    );
    untouched(&plain.netns);

    let _double = ztunnel::acking_double(&s.uds());
    let t = Instant::now();
    let e = loop {
        let e = web.add(&chain, "default", "web").unwrap_err();
        // Until the double's connection is served, the reason is still "no ztunnel".
        if !e.msg().contains("no ztunnel is connected") || t.elapsed() > Duration::from_secs(10) {
            break e;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(e.code(), Some(106), "{e:?}");
    assert!(
        e.msg()
            .contains("nothing listens on port(s) [15001, 15006, 15008]"),
        "{}",
        e.msg()
    );
    untouched(&web.netns);
    assert_eq!(s.annotation("web"), None);
    assert_eq!(s.probe_set(), []);

    // Something flushes the node's nat rules: the agent puts its own back.
    let ours = s.host_rules();
    s.node_ns
        .exec(&["iptables", "-t", "nat", "-F", "ISTIO_POSTRT"]);
    s.node_ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-D",
        "POSTROUTING",
        "-j",
        "ISTIO_POSTRT",
    ]);
    let (_, took) = wait_for("the node's probe rules back", || {
        (s.host_rules() == ours).then_some(())
    });
    eprintln!("the node's probe rules were back {took:?} after a flush");

    // Stopped for good (not an upgrade): the node's probe rules and sets go too, and
    // nothing else of the node changed.
    assert!(agent.sigterm().success());
    assert_eq!(s.host_rules(), Vec::<String>::new());
    assert_eq!(node_state(&s.node_ns), before);
    let sets = s.node_ns.open().run(|_| {
        Set {
            name: "istio-inpod-probes-v4".into(),
            ipv6: false,
        }
        .list()
    });
    assert!(sets.unwrap().is_err(), "the set is destroyed");
    let e = web.add(&chain, "default", "web").unwrap_err();
    assert_eq!(e.code(), Some(11), "{e:?}");
    assert!(e.msg().contains("pluginevent.sock"), "{}", e.msg());
    untouched(&web.netns);
}

/// Events that do not describe a pod of this node in its own netns are refused before the
/// agent acts, each with its reason: another pod's netns (its process lives there, or the
/// API gives its address to another pod), the host's netns, a path outside the runtime's
/// netns dirs, a symlink or a plain file in one, addresses not in the netns, a pod on
/// another node, a pod that is not ambient, a pod the API does not know. None leaves
/// anything.
#[test]
fn hostile_plugin_events_are_refused_with_the_reason() {
    let mut s = Setup::new(82);
    let _agent = s.agent();
    let socket = s.node.run.join(istio_cni::pluginevent::SOCKET_NAME);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    let web = s.ambient_pod("web");
    let other = s.pod("other", json!({}), Layout::Systemd);
    let elsewhere = s.ambient_pod("elsewhere");
    let pinned = s.pod("pinned", json!({}), Layout::BindMountOnly);
    let mut moved = s.api.get("pods", "default", "elsewhere").unwrap();
    moved["spec"]["nodeName"] = json!("node-2");
    s.api.put("pods", moved);
    let net = |ip: Ipv4Addr| vec![format!("{ip}/24").parse().unwrap()];
    let send = |netns: &Path, name: &str, ips: &[ipnet::IpNet]| {
        let event = AddEvent::new(&netns.to_string_lossy(), name, "default", ips);
        send_add(&s.node.run, &event, Duration::from_secs(30)).unwrap_err()
    };
    let refused = |e: SendError, status: u16, says: &str| match e {
        SendError::Refused {
            status: got,
            reason,
        } => {
            assert_eq!(got, status, "{reason}");
            assert!(reason.contains(says), "{reason:?} should say {says:?}");
        }
        e => panic!("{e}"),
    };
    refused(
        send(&other.netns.path(), "web", &net(other.ip)),
        409,
        "processes of other pod(s)",
    );
    refused(
        send(Path::new("/proc/1/ns/net"), "web", &net(web.ip)),
        422,
        "network namespace",
    );
    refused(
        send(Path::new("/etc/hostname"), "web", &net(web.ip)),
        422,
        "not a file in the runtime's netns directories",
    );
    // In a netns dir: a symlink (to the pod's own netns, even) is not followed, and a
    // plain file is no netns.
    let dir = s.pods.netns_dir().to_owned();
    std::os::unix::fs::symlink(web.netns.path(), dir.join("link")).unwrap();
    refused(
        send(&dir.join("link"), "web", &net(web.ip)),
        422,
        "not a namespace file",
    );
    std::fs::write(dir.join("plain"), "").unwrap();
    refused(
        send(&dir.join("plain"), "web", &net(web.ip)),
        422,
        "not a namespace file",
    );
    // A netns without processes whose address the API gives to another pod.
    let object = pinned.object(s.api.get("pods", "default", "pinned").unwrap(), NODE);
    s.api.put("pods", object);
    wait_for(
        "the agent's pod list to have the pinned pod's address",
        || {
            let e = send(&pinned.netns.path(), "web", &net(pinned.ip));
            matches!(&e, SendError::Refused { reason, .. } if reason.contains("is pod default/pinned's"))
            .then_some(())
        },
    );
    refused(
        send(&web.netns.path(), "web", &net(Ipv4Addr::new(10, 82, 9, 9))),
        409,
        "are not on its interfaces",
    );
    refused(
        send(&web.netns.path(), "web", &[]),
        409,
        "lists no pod address",
    );
    refused(
        send(&elsewhere.netns.path(), "elsewhere", &net(elsewhere.ip)),
        409,
        "scheduled to node \"node-2\"",
    );
    refused(
        send(&other.netns.path(), "other", &net(other.ip)),
        409,
        "not ambient",
    );
    refused(
        send(&web.netns.path(), "ghost", &net(web.ip)),
        503,
        "reading pod default/ghost",
    );
    // Once the API lists the pod's address, the event must carry it.
    let mut listed = s.api.get("pods", "default", "web").unwrap();
    listed["status"]["podIPs"] = json!([{"ip": "10.82.0.250"}]);
    s.api.put("pods", listed);
    refused(
        send(&web.netns.path(), "web", &net(web.ip)),
        409,
        "the API lists pod address 10.82.0.250, which the event does not",
    );
    for pod in [&web, &other, &elsewhere, &pinned] {
        untouched(&pod.netns);
    }
}

/// An ambient pod enrolled by an earlier agent (annotated `enabled`), whose netns lost its
/// rules, on a node whose ztunnel acks but never listens: the repair loop writes the rules
/// again (Event `IstioCNIRepaired`), hands the pod to ztunnel again since its listeners are
/// missing, and when ztunnel still does not listen in it, annotates it `pending` with a
/// Warning Event naming why: its traffic stays held by the rules, never let out uncaptured.
/// Meanwhile `/readyz` notes whether a ztunnel is connected, without turning not ready,
/// `ztunnel_connected` counts the connections, and the node's not-ready taint goes once
/// the plugin is ready, without waiting for ztunnel: sidecar and plain pods need none,
/// and ambient pods fail ADD with "try again later" until it comes.
#[test]
fn an_ambient_pod_that_ztunnel_does_not_take_again_is_repaired_then_pending() {
    let mut s = Setup::new(87);
    s.repair = true;
    s.taint = true;
    s.api.put(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
               "spec": {"taints": [{"key": "cni.istio.io/not-ready", "effect": "NoSchedule"}]}}),
    );
    s.label_namespace(json!({"istio.io/dataplane-mode": "ambient"}));
    let web = s.enrolled_before("web");
    assert!(web.rules().is_empty());

    let agent = s.agent();
    agent.wait_ready();
    let (status, body) = agent.readyz().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ambient: no ztunnel is connected"), "{body}");
    assert!(agent.metrics().contains("\nztunnel_connected 0\n"));
    wait_for("the node untainted with no ztunnel", || {
        let node = s.api.get("nodes", "", NODE)?;
        let taints = node["spec"]["taints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        taints.is_empty().then_some(())
    });

    let _double = ztunnel::acking_double(&s.uds());
    wait_for("/readyz without the note", || {
        let (status, body) = agent.readyz()?;
        (status == 200 && body == "ready\n").then_some(())
    });
    assert!(agent.metrics().contains("\nztunnel_connected 1\n"));
    let (_, took) = wait_for("the pod repaired, then pending", || {
        let reasons = s.api.event_reasons("web");
        (reasons.first().map(String::as_str) == Some("IstioCNIRepaired")
            && reasons.iter().any(|r| r == "IstioCNIAmbientPending")
            && s.annotation("web").as_deref() == Some("pending"))
        .then_some(())
    });
    eprintln!("rules repaired and the pod pending {took:?} after the agent was ready");
    let rules = web.rules();
    assert!(
        rules
            .iter()
            .any(|l| l.contains("-j REDIRECT --to-ports 15001")),
        "{rules:?}"
    );
    let pending = s
        .api
        .list("events")
        .into_iter()
        .find(|e| e["reason"] == "IstioCNIAmbientPending")
        .unwrap();
    let note = pending["note"].as_str().unwrap();
    assert!(
        note.contains("nothing listens on port(s) [15001, 15006, 15008]")
            && note.contains("held by the in-pod rules"),
        "{note}"
    );
    assert_eq!(pending["type"], "Warning");

    // Another tool removes the node's probe rule and destroys the probe set: both come
    // back, with the pending pod's entry.
    assert_eq!(s.probe_set(), [(web.ip.to_string(), web.uid.clone())]);
    let ours = s.host_rules();
    for cmd in [
        "iptables -t nat -D POSTROUTING -j ISTIO_POSTRT",
        "iptables -t nat -F ISTIO_POSTRT",
        "iptables -t nat -X ISTIO_POSTRT",
    ] {
        s.node_ns.exec(&cmd.split(' ').collect::<Vec<_>>());
    }
    let set = Set {
        name: "istio-inpod-probes-v4".into(),
        ipv6: false,
    };
    s.node_ns.open().run(|_| set.destroy()).unwrap().unwrap();
    assert_eq!(s.probe_set(), []);
    let (_, took) = wait_for("the probe rule, set and entry back", || {
        (s.host_rules() == ours && s.probe_set() == [(web.ip.to_string(), web.uid.clone())])
            .then_some(())
    });
    eprintln!("probe rule and set destroyed: back with the pod's entry {took:?} later");
}

/// In delete mode, an ambient pod whose rules are right but which ztunnel does not serve is
/// handed to ztunnel again and, when ztunnel still does not listen in it, annotated
/// `pending`: never deleted, since the failure is ztunnel's, not the pod's (a broken
/// ztunnel must not cost every ambient pod of the node its life). Restored with
/// `AMBIENT_RECONCILE_POD_RULES_ON_STARTUP`, its rules were rewritten at the agent's start.
#[test]
fn in_delete_mode_a_pod_ztunnel_does_not_serve_is_handed_over_not_deleted() {
    let mut s = Setup::new(91);
    s.repair = true;
    s.extra = vec![
        "--repair-mode",
        "delete",
        "--ambient-reconcile-pod-rules-on-startup",
        "true",
    ];
    s.label_namespace(json!({"istio.io/dataplane-mode": "ambient"}));
    let web = s.enrolled_before("web");
    let agent = s.agent();
    agent.wait_ready();
    wait_for("the restored pod's rules rewritten", || {
        (!web.rules().is_empty()).then_some(())
    });
    let _double = ztunnel::acking_double(&s.uds());
    wait_for("the pod handed over again, then pending", || {
        (s.api.event_reasons("web") == ["IstioCNIAmbientPending"]
            && s.annotation("web").as_deref() == Some("pending"))
        .then_some(())
    });
    // Another sweep or two (1 s each, 1 s cooldown): still there, never deleted.
    std::thread::sleep(Duration::from_secs(3));
    assert!(s.api.get("pods", "default", "web").is_some(), "not deleted");
    assert!(!s
        .api
        .event_reasons("web")
        .iter()
        .any(|r| r == "IstioCNIDeletedBrokenPod"));
    assert!(!web.rules().is_empty());
}

/// A pod whose process lives in a netns that does not hold the pod's API address (the API
/// and the node disagree: a stale object, a reused cgroup, a process caught before it
/// entered its pod's netns) never has that netns written or handed to ztunnel:
/// - enrolled before a restart, it goes into the snapshot as `KeepWorkload`, with a
///   Warning Event, and nothing is written there even with
///   `AMBIENT_RECONCILE_POD_RULES_ON_STARTUP`;
/// - running and made ambient by its namespace's label, the watch does not enrol it.
#[test]
fn pods_whose_netns_lacks_their_address_are_never_written() {
    let mut s = Setup::new(92);
    s.extra = vec!["--ambient-reconcile-pod-rules-on-startup", "true"];
    s.label_namespace(json!({"istio.io/dataplane-mode": "ambient"}));
    let web = s.enrolled_before("web");
    let other = s.running_pod("other", json!({}));
    for (name, ip) in [("web", "10.92.0.250"), ("other", "10.92.0.251")] {
        let mut object = s.api.get("pods", "default", name).unwrap();
        object["status"]["podIP"] = json!(ip);
        object["status"]["podIPs"] = json!([{ "ip": ip }]);
        s.api.put("pods", object);
    }
    let agent = s.agent();
    agent.wait_ready();
    wait_for("the Event on the kept pod", || {
        (s.api.event_reasons("web") == ["IstioCNIAmbientNetnsNotFound"]).then_some(())
    });
    wait_for("the watch to pass on the other pod", || {
        std::fs::read_to_string(&agent.log)
            .ok()?
            .contains("pod default/other is ambient, but no process of it")
            .then_some(())
    });
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("does not hold its address"), "{log}");
    assert!(web.rules().is_empty(), "nothing written: {:?}", web.rules());
    assert!(
        other.rules().is_empty(),
        "nothing written: {:?}",
        other.rules()
    );
    assert_eq!(s.annotation("other"), None);
}

/// Ports of ztunnel's listeners in `netns`, of 15001, 15006 and 15008.
fn ztunnel_ports(netns: &TestNetns) -> Vec<u16> {
    ztunnel::listening_ports(&netns.open())
}

/// With the real ztunnel, on one node:
/// - ADD of an ambient pod returns once ztunnel listens in the pod's netns; the in-pod
///   rules are there and the pod is annotated `enabled`;
/// - labelling the namespace enrols a pod that was already running (no restart), and
///   removing the label unenrols it (rules, listeners and annotation gone);
/// - deleting a pod makes ztunnel drop it;
/// - with ztunnel stopped, ADD of the next ambient pod fails and leaves nothing, and a
///   sidecar pod still starts.
#[test]
#[ignore = "builds and runs the real ztunnel: make e2e"]
fn the_real_ztunnel_captures_pods_enrolled_at_add_and_by_label() {
    let Some(bin) = ztunnel::binary() else { return };
    let mut s = Setup::new(83);
    let _agent = s.agent();
    let chain = s.chain();
    let web = s.ambient_pod("web");
    let late = s.ambient_pod("late");
    let running = s.running_pod("running", json!({}));
    let zt = s.start_ztunnel(
        &bin,
        &[("web", web.ip), ("late", late.ip), ("running", running.ip)],
    );

    let t = Instant::now();
    let result = web
        .add(&chain, "default", "web")
        .unwrap_or_else(|e| panic!("{e:?}\nztunnel log:\n{}", zt.log_tail(30)));
    eprintln!(
        "ambient ADD (event, checks, rules, ztunnel ack, listeners, annotation) took {:?}",
        t.elapsed()
    );
    assert_eq!(result["ips"][0]["address"], json!(format!("{}/24", web.ip)));
    let rules = web.netns.istio_rules(false);
    assert!(
        rules
            .iter()
            .any(|l| l.contains("-j REDIRECT --to-ports 15001")),
        "{rules:?}"
    );
    assert_eq!(ztunnel_ports(&web.netns), [15001, 15006, 15008]);
    assert_eq!(s.annotation("web").as_deref(), Some("enabled"));
    assert_eq!(s.probe_set(), [(web.ip.to_string(), web.uid.clone())]);

    // A running pod joins with its namespace's label, and leaves without it.
    assert!(running.rules().is_empty());
    s.label_namespace(json!({"istio.io/dataplane-mode": "ambient"}));
    let (_, took) = wait_for("the running pod enrolled by its namespace's label", || {
        (ztunnel_ports(&running.netns).len() == 3
            && s.annotation("running").as_deref() == Some("enabled"))
        .then_some(())
    });
    eprintln!("namespace labelled: running pod enrolled in {took:?}");
    assert!(!running.rules().is_empty());
    assert!(s
        .probe_set()
        .contains(&(running.ip.to_string(), running.uid.clone())));
    s.label_namespace(json!({}));
    let (_, took) = wait_for("the running pod unenrolled", || {
        (ztunnel_ports(&running.netns).is_empty()
            && running.rules().is_empty()
            && s.annotation("running").is_none())
        .then_some(())
    });
    eprintln!("label removed: running pod unenrolled in {took:?}");
    assert!(!running
        .netns
        .exec(&["ip", "rule", "show"])
        .contains("0x111"));
    // The pod labelled itself stays.
    assert_eq!(ztunnel_ports(&web.netns), [15001, 15006, 15008]);

    // Deleted: ztunnel drops it; its netns is not entered (the rules stay with it).
    s.api.remove("pods", "default", "web");
    wait_for("ztunnel to drop the deleted pod", || {
        ztunnel_ports(&web.netns).is_empty().then_some(())
    });
    assert!(!web.rules().is_empty());
    wait_for("the deleted pod gone from the probe set", || {
        s.probe_set().is_empty().then_some(())
    });

    drop(zt);
    let t = Instant::now();
    let e = loop {
        match late.add(&chain, "default", "late") {
            // Until the agent sees the connection close, it may still hand the pod over
            // (and fail with 106 when ztunnel goes away midway).
            Err(e) if e.code() == Some(11) => break e,
            _ if t.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => panic!("ADD with ztunnel stopped: {other:?}"),
        }
    };
    assert!(e.msg().contains("no ztunnel is connected"), "{}", e.msg());
    untouched(&late.netns);
    // A sidecar pod still starts: its path needs no ztunnel.
    s.next_ip += 1;
    let sidecar = s
        .pods
        .start(Layout::Systemd, Ipv4Addr::new(10, s.subnet, 0, s.next_ip));
    let mut object = sidecar.object(
        injected_pod("default", "with-sidecar", json!({}), json!({})),
        NODE,
    );
    object["status"] = json!({"phase": "Pending"});
    s.api.put("pods", object);
    sidecar
        .add(&chain, "default", "with-sidecar")
        .expect("a sidecar pod's ADD with ztunnel stopped");
    assert!(sidecar.rules().iter().any(|l| l.contains("ISTIO_INBOUND")));
}

/// A pod created through the node's whole chain, as a runtime does it: `ptp` (a veth to
/// the node, a /32 route each way) with a static address, then our installed entry.
fn chained_pod(s: &Setup, name: &str, ip: Ipv4Addr, object: Value) -> (TestNetns, Value) {
    s.api.put("pods", object);
    let netns = TestNetns::new("amp");
    let mut chain = s.chain();
    chain.cni_path.insert(0, REFERENCE_PLUGIN_DIR.into());
    chain.plugins.insert(
        0,
        json!({"type": "ptp", "ipam": {"type": "static",
               "addresses": [{"address": format!("{ip}/24"),
                              "gateway": format!("{}.1", ip.to_string().rsplit_once('.').unwrap().0)}],
               "routes": [{"dst": "0.0.0.0/0"}]}}),
    );
    let attachment = Attachment {
        container_id: unique_name("c"),
        netns: netns.path(),
        ifname: "eth0".into(),
        args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"),
    };
    let result = chain
        .add(&attachment)
        .unwrap_or_else(|e| panic!("ADD of {name} through ptp and istio-cni: {e:?}"));
    (netns, result)
}

/// A pod object for the API, scheduled to this node, `Pending`.
fn pod_object(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "uid": istio_cni_e2e::kubelet::unique_uid(),
                        "labels": labels},
           "spec": {"nodeName": NODE, "serviceAccountName": name,
                    "containers": [{"name": "app", "image": "app"}]},
           "status": {"phase": "Pending"}})
}

/// The value of ztunnel's `istio_tcp_connections_opened_total` series whose labels
/// include all of `labels` (`key="value"`), summed, from `:15020/metrics` in `node`.
fn ztunnel_connections(node: &TestNetns, labels: &[&str]) -> f64 {
    let body = node
        .open()
        .run(|_| istio_cni_e2e::agent::get(15020, "/metrics"))
        .unwrap()
        .map(|(_, b)| b)
        .unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// With the real ztunnel, pods created through the node's chain (`ptp`, then istio-cni):
/// - an ambient client's connection to an ambient server's port arrives, through ztunnel
///   over HBONE (ztunnel's metrics count it between both identities, its access log names
///   both workloads and the server's 15008), with the client's address;
/// - a kubelet-style probe from the node to the server's port arrives from the probe
///   address `169.254.7.127`: the node's SNAT, which the server's in-pod rules let through;
/// - a sidecar pod on the same node gets its sidecar rules, not ambient's.
#[test]
#[ignore = "builds and runs the real ztunnel: make e2e"]
fn ambient_traffic_goes_through_ztunnel_and_probes_through_the_snat() {
    traffic(false);
}

/// [`ambient_traffic_goes_through_ztunnel_and_probes_through_the_snat`] on the native
/// nftables backend: the in-pod rules are the `inet istio-ambient-*` tables (upstream's
/// nftables rules), the sidecar pod gets `inet istio-proxy-*`.
#[test]
#[ignore = "builds and runs the real ztunnel: make e2e"]
fn with_native_nftables_ambient_traffic_goes_through_ztunnel_too() {
    traffic(true);
}

fn traffic(nft: bool) {
    let Some(bin) = ztunnel::binary() else { return };
    let mut s = Setup::new(if nft { 86 } else { 84 });
    s.nft = nft;
    let subnet = s.subnet;
    s.route_between_pods();
    let _agent = s.agent();
    let (client_ip, server_ip) = (
        Ipv4Addr::new(10, subnet, 0, 2),
        Ipv4Addr::new(10, subnet, 0, 3),
    );
    let zt = s.start_ztunnel(&bin, &[("client", client_ip), ("server", server_ip)]);

    let ambient = json!({"istio.io/dataplane-mode": "ambient"});
    let (server, _) = chained_pod(
        &s,
        "server",
        server_ip,
        pod_object("server", ambient.clone()),
    );
    let (client, _) = chained_pod(&s, "client", client_ip, pod_object("client", ambient));
    assert_eq!(ztunnel_ports(&server), [15001, 15006, 15008]);
    assert_eq!(ztunnel_ports(&client), [15001, 15006, 15008]);
    // The backend the node asked for, and only that one.
    if nft {
        assert_eq!(
            server.istio_nft_tables(),
            [
                "istio-ambient-mangle",
                "istio-ambient-nat",
                "istio-ambient-raw"
            ]
        );
        assert!(server.istio_rules(false).is_empty());
    } else {
        assert!(server.istio_nft_tables().is_empty());
        assert!(!server.istio_rules(false).is_empty());
    }

    let listener = listen_in(&server, "0.0.0.0:8080");
    listener.set_nonblocking(true).unwrap();
    // One connection within 15 s (never a hang when the client fails): the peer's address.
    let serve = |listener: &std::net::TcpListener| -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let (mut conn, peer) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => return None,
            }
        };
        conn.set_nonblocking(false).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).ok()?;
        conn.write_all(b"pong").ok()?;
        (&buf == b"ping").then(|| peer.ip().to_string())
    };
    let ping = |from: &TestNetns| {
        let target = std::net::SocketAddr::from((server_ip, 8080));
        from.open()
            .run(move |_| -> std::io::Result<String> {
                let mut c = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(10))?;
                c.set_read_timeout(Some(Duration::from_secs(10)))?;
                c.write_all(b"ping")?;
                let mut buf = [0u8; 4];
                c.read_exact(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf).into_owned())
            })
            .unwrap()
    };

    let server_side = std::thread::scope(|scope| {
        let accepted = scope.spawn(|| serve(&listener));
        let reply = ping(&client);
        (reply, accepted.join().unwrap())
    });
    let reply = server_side.0.unwrap_or_else(|e| {
        panic!(
            "client -> server:8080: {e}\nztunnel log:\n{}",
            zt.log_tail(30)
        )
    });
    assert_eq!(reply, "pong");
    assert_eq!(
        server_side.1,
        Some(client_ip.to_string()),
        "the server sees the client's address"
    );
    let (_, took) = wait_for("ztunnel's metrics to show the connection", || {
        (ztunnel_connections(
            &s.node_ns,
            &[
                "reporter=\"destination\"",
                "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
                "destination_principal=\"spiffe://cluster.local/ns/default/sa/server\"",
            ],
        ) > 0.0)
            .then_some(())
    });
    eprintln!("client -> server went through ztunnel (its metrics, {took:?} later)");
    // ztunnel's access log (written when the connection closes): both workloads, over
    // HBONE (the server's 15008).
    wait_for("ztunnel's access log of the connection", || {
        zt.log_tail(200)
            .lines()
            .any(|l| {
                l.contains("connection complete")
                    && l.contains("src.workload=\"client\"")
                    && l.contains("dst.workload=\"server\"")
                    && l.contains(&format!("dst.addr={server_ip}:15008"))
                    && l.contains("direction=\"inbound\"")
            })
            .then_some(())
    });

    // kubelet probes from the node: SNATed to the probe address, let through by the pod.
    let probed_from = std::thread::scope(|scope| {
        let accepted = scope.spawn(|| serve(&listener));
        let reply = ping(&s.node_ns);
        (reply, accepted.join().unwrap())
    });
    assert_eq!(probed_from.0.expect("node -> server:8080"), "pong");
    assert_eq!(probed_from.1.as_deref(), Some("169.254.7.127"));

    // A sidecar pod on the same node keeps the sidecar path.
    let sidecar_ip = Ipv4Addr::new(10, subnet, 0, 4);
    let mut object = injected_pod("default", "with-sidecar", json!({}), json!({}));
    object["spec"]["nodeName"] = json!(NODE);
    object["metadata"]["labels"] = json!({"istio.io/dataplane-mode": "ambient"});
    let (sidecar, _) = chained_pod(&s, "with-sidecar", sidecar_ip, object);
    if nft {
        let tables = sidecar.istio_nft_tables();
        assert!(
            tables.iter().all(|t| t.starts_with("istio-proxy-")) && !tables.is_empty(),
            "{tables:?}"
        );
    } else {
        let rules = sidecar.istio_rules(false);
        assert!(
            rules.iter().any(|l| l.contains("ISTIO_INBOUND")),
            "sidecar rules: {rules:?}"
        );
    }
    assert!(!sidecar.exec(&["ip", "rule", "show"]).contains("0x111"));
    assert!(ztunnel_ports(&sidecar).is_empty());
    assert!(!s
        .probe_set()
        .iter()
        .any(|(ip, _)| *ip == sidecar_ip.to_string()));
}

/// With the real ztunnel:
/// - an agent that dies (SIGKILL) and starts again restores the pods enrolled before into
///   ztunnel's first snapshot, each with its netns (`AddWorkload`, no `KeepWorkload`), so
///   ztunnel keeps serving them (it drops every pod a snapshot does not name); that
///   includes a pod whose ADD is done but which the API does not yet show running or
///   with an address, whose probe-set entry is kept too (istio/istio PR #60469);
/// - a running pod enrolled by its namespace's label while ztunnel is away keeps its rules
///   and is annotated `pending`; the next ztunnel takes it, and it becomes `enabled`.
#[test]
#[ignore = "builds and runs the real ztunnel: make e2e"]
fn a_restarted_agent_keeps_its_pods_and_a_late_ztunnel_takes_pending_ones() {
    let Some(bin) = ztunnel::binary() else { return };
    let mut s = Setup::new(85);
    let agent = s.agent();
    let chain = s.chain();
    let web = s.ambient_pod("web");
    let fresh = s.ambient_pod("fresh");
    let running = s.running_pod("running", json!({}));
    let pods = [
        ("web", web.ip),
        ("fresh", fresh.ip),
        ("running", running.ip),
    ];
    let zt = s.start_ztunnel(&bin, &pods);
    web.add(&chain, "default", "web").expect("ADD");
    // Its ADD done, kubelet has not reported it yet: `Pending`, no address in the API.
    fresh.add(&chain, "default", "fresh").expect("ADD");
    // kubelet starts the pod: Running, its address in the API.
    let object = web.object(s.api.get("pods", "default", "web").unwrap(), NODE);
    s.api.put("pods", object);
    assert_eq!(ztunnel_ports(&web.netns), [15001, 15006, 15008]);

    // The agent dies and comes back: ztunnel's next snapshot still names the pod.
    drop(agent);
    let agent = s.agent();
    let (_, took) = wait_for("ztunnel's snapshot from the new agent", || {
        (zt.snapshots_taken() >= 2).then_some(())
    });
    eprintln!("agent restarted: ztunnel took the restored snapshot {took:?} later");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        ztunnel_ports(&web.netns),
        [15001, 15006, 15008],
        "ztunnel dropped the pod:\n{}",
        zt.log_tail(20)
    );
    assert_eq!(s.annotation("web").as_deref(), Some("enabled"));
    assert_eq!(ztunnel_ports(&fresh.netns), [15001, 15006, 15008]);
    let snapshot = snapshot_log(&zt, 2);
    assert_eq!(
        snapshot.matches("pod received, starting proxy").count(),
        2,
        "an AddWorkload for web and fresh:\n{snapshot}"
    );
    assert!(!snapshot.contains("pod keep received"), "{snapshot}");
    let mut set = s.probe_set();
    set.sort();
    let mut want = vec![
        (web.ip.to_string(), web.uid.clone()),
        (fresh.ip.to_string(), fresh.uid.clone()),
    ];
    want.sort();
    assert_eq!(set, want, "no entry pruned");

    // ztunnel away: a pod joining by label is held for it (rules kept), pending.
    drop(zt);
    s.label_namespace(json!({"istio.io/dataplane-mode": "ambient"}));
    wait_for("the running pod pending", || {
        (s.annotation("running").as_deref() == Some("pending")).then_some(())
    });
    assert!(!running.rules().is_empty());
    assert!(ztunnel_ports(&running.netns).is_empty());
    let zt = s.start_ztunnel(&bin, &pods);
    let (_, took) = wait_for("the pending pod enabled once ztunnel is back", || {
        (s.annotation("running").as_deref() == Some("enabled")).then_some(())
    });
    eprintln!("ztunnel back: the pending pod enabled {took:?} later");
    assert_eq!(ztunnel_ports(&running.netns), [15001, 15006, 15008]);
    assert_eq!(ztunnel_ports(&web.netns), [15001, 15006, 15008]);
    assert_eq!(ztunnel_ports(&fresh.netns), [15001, 15006, 15008]);
    drop(zt);
    drop(agent);
}

/// With the real ztunnel and the repair loop on (sweeps every second):
/// - an ambient pod whose in-pod rules are flushed gets them back, with an Event;
/// - when ztunnel's listeners in a pod are gone (destroyed with `ss -K`, as a crashed
///   proxy would leave it), the agent hands the pod to ztunnel again and they come back;
///   the pod stays `enabled`.
#[test]
#[ignore = "builds and runs the real ztunnel: make e2e"]
fn flushed_rules_and_lost_listeners_of_an_ambient_pod_are_repaired() {
    let Some(bin) = ztunnel::binary() else { return };
    let mut s = Setup::new(88);
    s.repair = true;
    let agent = s.agent();
    agent.wait_ready();
    let chain = s.chain();
    let web = s.ambient_pod("web");
    let zt = s.start_ztunnel(&bin, &[("web", web.ip)]);
    web.add(&chain, "default", "web")
        .unwrap_or_else(|e| panic!("{e:?}\nztunnel log:\n{}", zt.log_tail(30)));
    let object = web.object(s.api.get("pods", "default", "web").unwrap(), NODE);
    s.api.put("pods", object);
    let expected = web.rules();

    web.netns.exec(&["iptables", "-t", "nat", "-F"]);
    web.netns.exec(&["iptables", "-t", "mangle", "-F"]);
    assert_ne!(web.rules(), expected);
    let (_, took) = wait_for("the flushed rules back", || {
        (web.rules() == expected).then_some(())
    });
    eprintln!("ambient pod: flush -> rules back in {took:?} (resync 1 s)");
    wait_for("the repair's Event", || {
        (s.api.event_reasons("web") == ["IstioCNIRepaired"]).then_some(())
    });

    web.netns.exec(&[
        "ss",
        "-K",
        "-tl",
        "( sport = :15001 or sport = :15006 or sport = :15008 )",
    ]);
    assert!(
        ztunnel_ports(&web.netns).len() < 3,
        "ss -K destroyed the listeners"
    );
    let (_, took) = wait_for("ztunnel's listeners back in the pod", || {
        (ztunnel_ports(&web.netns) == [15001, 15006, 15008]).then_some(())
    });
    eprintln!("ambient pod: listeners destroyed -> back in {took:?}");
    wait_for("the re-send's Event", || {
        (s.api.event_reasons("web") == ["IstioCNIRepaired", "IstioCNIRepaired"]).then_some(())
    });
    assert_eq!(s.annotation("web").as_deref(), Some("enabled"));
    assert_eq!(web.rules(), expected);
    drop(zt);
}

/// Serves `listener` on its own thread until `stop`: each connection answers every
/// 4-byte message with `pong`, on its own thread.
fn echo_server(
    listener: std::net::TcpListener,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            std::thread::spawn(move || {
                conn.set_nonblocking(false).ok();
                conn.set_read_timeout(Some(Duration::from_secs(120))).ok();
                let mut buf = [0u8; 4];
                while conn.read_exact(&mut buf).is_ok() {
                    if conn.write_all(b"pong").is_err() {
                        return;
                    }
                }
            });
        }
    })
}

/// A TCP connection from inside `netns` to `to`.
fn connect_in(netns: &TestNetns, to: std::net::SocketAddr) -> std::net::TcpStream {
    let conn = netns
        .open()
        .run(move |_| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10)))
        .unwrap()
        .unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn
}

/// `ping` over `conn`, and its answer.
fn ping_over(conn: &mut std::net::TcpStream) -> std::io::Result<String> {
    conn.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// ztunnel's log of its `k`th snapshot (1-based): the lines the connection that carried
/// it logged before `received snapshot sent`.
fn snapshot_log(zt: &Ztunnel, k: usize) -> String {
    let text = zt.log_tail(100_000);
    let lines: Vec<&str> = text.lines().rev().collect();
    let mut taken = 0;
    let mut current: Vec<&str> = Vec::new();
    for l in lines {
        if l.contains("handling new stream") {
            current.clear();
        }
        current.push(l);
        if l.contains("received snapshot sent") {
            taken += 1;
            if taken == k {
                return current.join("\n");
            }
            current.clear();
        }
    }
    panic!("ztunnel took fewer than {k} snapshots:\n{text}")
}

/// With the real ztunnel and two ambient pods talking through it (the node's chain: `ptp`,
/// then istio-cni):
/// - the agent upgraded (SIGTERM while its DaemonSet exists, then a new agent), then
///   killed (SIGKILL) and started again: each time a connection opened before keeps
///   working while no agent runs and after (ztunnel keeps its proxies), the node's probe
///   rules stay, and the new agent's snapshot gives ztunnel every pod with its netns
///   (`AddWorkload`, no `KeepWorkload`);
/// - ztunnel killed and started again: the agent replays its snapshot to the new one,
///   which reports ready only after it, and new connections go through it again; a pod
///   deleted while ztunnel was away is not in that snapshot (ztunnel drops it).
#[test]
#[ignore = "builds and runs the real ztunnel: make e2e"]
fn connections_survive_an_agent_restart_and_traffic_resumes_after_a_ztunnel_restart() {
    let Some(bin) = ztunnel::binary() else { return };
    let mut s = Setup::new(89);
    // The agent's DaemonSet exists: a SIGTERM is an upgrade, not an uninstall.
    istio_cni_e2e::agent::register_agent_pod(&s.api);
    s.extra = vec!["--pod-name", istio_cni_e2e::agent::AGENT_POD];
    s.route_between_pods();
    let mut agent = s.agent();
    let (client_ip, server_ip) = (Ipv4Addr::new(10, 89, 0, 2), Ipv4Addr::new(10, 89, 0, 3));
    let gone_ip = Ipv4Addr::new(10, 89, 0, 4);
    let workloads = [
        ("client", client_ip),
        ("server", server_ip),
        ("gone", gone_ip),
    ];
    let zt = s.start_ztunnel(&bin, &workloads);
    let ambient = json!({"istio.io/dataplane-mode": "ambient"});
    let (_gone, _) = chained_pod(&s, "gone", gone_ip, pod_object("gone", ambient.clone()));
    let (server, _) = chained_pod(
        &s,
        "server",
        server_ip,
        pod_object("server", ambient.clone()),
    );
    let (client, _) = chained_pod(&s, "client", client_ip, pod_object("client", ambient));
    // kubelet reports them running, with their addresses. (These netns have no process:
    // the restarted agent finds them as the repair loop does, by their pinned files.)
    for (name, ip) in workloads {
        let mut object = s.api.get("pods", "default", name).unwrap();
        object["status"] = json!({"phase": "Running", "podIP": ip.to_string(),
                                  "podIPs": [{"ip": ip.to_string()}]});
        s.api.put("pods", object);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let echo = echo_server(listen_in(&server, "0.0.0.0:8080"), stop.clone());
    let to = std::net::SocketAddr::from((server_ip, 8080));
    let mut long_lived = connect_in(&client, to);
    assert_eq!(ping_over(&mut long_lived).unwrap(), "pong");

    // A rolling upgrade (SIGTERM, then the new agent), then a crash (SIGKILL, then a
    // new agent): each time the connection works with no agent and after, and ztunnel's
    // next snapshot hands every pod over again.
    let probe_rules = s.host_rules();
    for (n, how) in [(2, "upgrade"), (3, "SIGKILL")] {
        if how == "upgrade" {
            assert!(agent.sigterm().success());
            let log = std::fs::read_to_string(&agent.log).unwrap();
            assert!(log.contains("keeping the plugin installed"), "{log}");
            assert_eq!(s.host_rules(), probe_rules, "the probe rules stay");
        }
        drop(agent);
        assert_eq!(
            ping_over(&mut long_lived)
                .unwrap_or_else(|e| panic!("the connection, with no agent running ({how}): {e}")),
            "pong"
        );
        agent = s.agent();
        let (_, took) = wait_for("ztunnel's snapshot from the new agent", || {
            (zt.snapshots_taken() >= n).then_some(())
        });
        eprintln!(
            "agent restarted ({how}): ztunnel took the new snapshot {took:?} after its start"
        );
        assert_eq!(
            ping_over(&mut long_lived)
                .unwrap_or_else(|e| panic!("the connection, after the agent's {how}: {e}")),
            "pong"
        );
        let snapshot = snapshot_log(&zt, n);
        assert_eq!(
            snapshot.matches("pod received, starting proxy").count(),
            3,
            "an AddWorkload for each pod ({how}):\n{snapshot}"
        );
        assert!(!snapshot.contains("pod keep received"), "{snapshot}");
    }

    drop(zt);
    // While ztunnel is away, a pod is deleted: the agent forgets it.
    assert!(s.api.remove("pods", "default", "gone"));
    wait_for("the agent to forget the deleted pod", || {
        std::fs::read_to_string(&agent.log)
            .ok()?
            .contains("pod default/gone is gone")
            .then_some(())
    });
    let t = Instant::now();
    let zt = s.start_ztunnel(&bin, &workloads);
    eprintln!("ztunnel restarted: ready {:?} after its start", t.elapsed());
    // ztunnel writes its log asynchronously: wait for the lines, then check their order
    // (the new ztunnel marked itself ready after it took the snapshot).
    wait_for("ztunnel's log of the new snapshot", || {
        (zt.snapshots_taken() >= 4).then_some(())
    });
    let chronological: Vec<String> = zt
        .log_tail(100_000)
        .lines()
        .rev()
        .map(str::to_owned)
        .collect();
    let snapshot_at = chronological
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("received snapshot sent"))
        .nth(3)
        .map(|(i, _)| i)
        .unwrap();
    let ready_at = wait_for("ztunnel's log of its readiness", || {
        zt.log_tail(100_000)
            .lines()
            .rev()
            .enumerate()
            .filter(|(_, l)| l.contains("'workload proxy manager' complete"))
            .map(|(i, _)| i)
            .last()
            .filter(|i| *i > snapshot_at)
    })
    .0;
    assert!(
        ready_at > snapshot_at,
        "ready only once it took the snapshot"
    );
    let third = snapshot_log(&zt, 4);
    assert_eq!(
        third.matches("pod received, starting proxy").count(),
        2,
        "{third}"
    );
    assert!(!third.contains("name=\"gone\""), "{third}");
    let mut again = connect_in(&client, to);
    assert_eq!(
        ping_over(&mut again).unwrap_or_else(|e| panic!(
            "client -> server after ztunnel's restart: {e}\nztunnel log:\n{}",
            zt.log_tail(30)
        )),
        "pong"
    );
    assert_eq!(ztunnel_ports(&server), [15001, 15006, 15008]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    echo.join().unwrap();
    drop(agent);
}

/// istio/istio#60882: the primary CNI rewrites its config (a reboot, an upgrade of it) and
/// drops our chained entry; an ambient pod the runtime creates in that window gets no ADD
/// of ours and starts uncaptured. Here the agent chains its entry again, and its pod watch
/// enrols the pod as soon as the API shows it running: rules, ztunnel's listeners, and the
/// annotation, with no restart of the pod.
#[test]
#[ignore = "builds and runs the real ztunnel: make e2e"]
fn a_pod_started_while_the_primary_config_lacked_our_entry_is_enrolled_by_the_watch() {
    let Some(bin) = ztunnel::binary() else { return };
    let mut s = Setup::new(90);
    let _agent = s.agent();
    s.label_namespace(json!({"istio.io/dataplane-mode": "ambient"}));
    // The address `running_pod` gives the next pod.
    let ip = Ipv4Addr::new(10, 90, 0, s.next_ip + 1);
    let zt = s.start_ztunnel(&bin, &[("window", ip)]);

    // The primary CNI writes its own config again, without our entry.
    std::fs::write(s.node.conf(), PRIMARY).unwrap();
    // The runtime creates the pod with that config: no ADD of ours; kubelet reports it.
    let pod = s.running_pod("window", json!({}));
    assert_eq!(pod.ip, ip);
    let (_, took) = wait_for("our entry chained again", || {
        chained(&s.node.conf()).then_some(())
    });
    eprintln!("primary config rewritten: our entry back {took:?} later");
    let (_, took) = wait_for("the pod enrolled by the watch", || {
        (ztunnel_ports(&pod.netns) == [15001, 15006, 15008]
            && s.annotation("window").as_deref() == Some("enabled"))
        .then_some(())
    });
    eprintln!("the uncaptured pod was enrolled {took:?} after that");
    let rules = pod.rules();
    assert!(
        rules
            .iter()
            .any(|l| l.contains("-j REDIRECT --to-ports 15001")),
        "{rules:?}\nztunnel log:\n{}",
        zt.log_tail(20)
    );
    assert!(s.probe_set().contains(&(ip.to_string(), pod.uid.clone())));
}
