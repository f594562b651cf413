//! `make bench`, ambient mode: wall time of the plugin's ADD of an ambient pod, end to end
//! (plugin → the node agent's plugin-event socket → the event's checks → in-pod rules
//! written and read back → ztunnel's ack → its listeners seen in the pod's netns → the
//! pod's annotation → the answer), against the sidecar ADD of the same plugin, measured
//! in the same run and interleaved (alternating which goes first) so that drift hits both
//! alike. Prints median and p99 of both and their ratio.
//!
//! Then restarts, with every ambient pod enrolled and reported running, each against the
//! same restart with no pod enrolled, measured first in the same run:
//! - the agent killed (SIGKILL) and started again → ztunnel has acknowledged the new
//!   agent's snapshot (its log says `received snapshot sent`): the new agent's start, its
//!   pod and namespace lists, finding each pod's netns, and ztunnel's reconnection;
//! - ztunnel killed and started again → `:15021/healthz/ready` answers 200, which ztunnel
//!   gives only once it has taken the agent's snapshot and started every pod's proxy.
//!
//! No timing is asserted.
//!
//! The agent (`istio-cni-node-agent run --ambient-enabled`), the fake API server and the
//! real ztunnel run in one node netns, as on a node; each pod is a fresh netns with its
//! address on `eth0`. The ztunnel is built from `../shared/peers/ztunnel/` (see
//! `istio_cni_e2e::ztunnel`); without it, this says so and exits 0.
//!
//! Usage: `istio-cni-ambient-bench [PODS]` (default 100). Needs root, iptables.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use istio_cni_e2e::agent::{chained, wait_for, Node, PRIMARY};
use istio_cni_e2e::chain::istio_cni_bin;
use istio_cni_e2e::fake_api::FakeApi;
use istio_cni_e2e::kubelet::unique_uid;
use istio_cni_e2e::net::TestNetns;
use istio_cni_e2e::sandbox::injected_pod;
use istio_cni_e2e::stats::{ms, quantile, timed_add};
use istio_cni_e2e::ztunnel::{self, LocalWorkload, Ztunnel};
use serde_json::{json, Value};

const NODE: &str = "bench-node";

fn main() {
    let pods: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("PODS is a number"))
        .unwrap_or(100);
    let Some(ztunnel_bin) = ztunnel::binary() else {
        println!("istio-cni ambient bench: skipped (no ../shared/peers/ztunnel; see above)");
        return;
    };
    let node_ns = TestNetns::new("abn");
    let api = FakeApi::start_in(&node_ns);
    api.put(
        "namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
    );
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).expect("conf dir");
    std::fs::write(node.conf(), PRIMARY).expect("primary config");
    let kubeconfig = api.write_kubeconfig(node.dir.path());
    let zt_dir = tempfile::Builder::new()
        .prefix("zt-")
        .tempdir()
        .expect("temp dir");
    let uds = zt_dir.path().join("ztunnel.sock");

    // Each pod's address, known to ztunnel's local config before it starts.
    let ip = |i: usize| Ipv4Addr::new(10, 93, (i / 250) as u8, (i % 250 + 2) as u8);
    let workloads: Vec<LocalWorkload> = (0..pods)
        .map(|i| LocalWorkload {
            name: format!("ambient-{i}"),
            namespace: "default".into(),
            ip: ip(i).into(),
        })
        .collect();
    std::fs::write(
        zt_dir.path().join("local.yaml"),
        ztunnel::local_yaml(NODE, &workloads),
    )
    .expect("local.yaml");
    for i in 0..pods {
        let name = format!("ambient-{i}");
        api.put(
            "pods",
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "default", "uid": unique_uid(),
                                "labels": {"istio.io/dataplane-mode": "ambient"}},
                   "spec": {"nodeName": NODE, "serviceAccountName": name,
                            "containers": [{"name": "app", "image": "app"}]},
                   "status": {"phase": "Pending"}}),
        );
        let mut sidecar = injected_pod("default", &format!("sidecar-{i}"), json!({}), json!({}));
        sidecar["spec"]["nodeName"] = json!(NODE);
        api.put("pods", sidecar);
    }

    let spawn_agent = || {
        node.spawn_ambient(
            &node_ns,
            &kubeconfig,
            "/var/run/netns",
            &uds,
            &[
                "--node-name",
                NODE,
                "--taint-enabled",
                "false",
                "--repair-enabled",
                "false",
            ],
        )
    };
    let mut agent = spawn_agent();
    wait_for("the agent to chain its entry", || {
        chained(&node.conf()).then_some(())
    });
    let mut zt = Ztunnel::start(&ztunnel_bin, &node_ns, NODE, zt_dir.path(), &uds);
    wait_for("ztunnel ready", || ztunnel::ready(&node_ns).then_some(()));
    let log = zt_dir.path().join("ztunnel.log");
    // The restarts with no pod enrolled: the floors.
    let restart_agent = |agent: istio_cni_e2e::agent::Daemon| {
        let before = ztunnel::snapshots_taken(&log);
        drop(agent);
        let t = Instant::now();
        let agent = spawn_agent();
        poll(|| ztunnel::snapshots_taken(&log) > before);
        (agent, t.elapsed())
    };
    let restart_ztunnel = |zt: Ztunnel| {
        drop(zt);
        let t = Instant::now();
        let zt = Ztunnel::start(&ztunnel_bin, &node_ns, NODE, zt_dir.path(), &uds);
        poll(|| ztunnel::ready(&node_ns));
        (zt, t.elapsed())
    };
    let agent_floor;
    (agent, agent_floor) = restart_agent(agent);
    let ztunnel_floor;
    (zt, ztunnel_floor) = restart_ztunnel(zt);

    let mut entry: Value = {
        let conf: Value =
            serde_json::from_slice(&std::fs::read(node.conf()).expect("conflist")).expect("json");
        conf["plugins"]
            .as_array()
            .and_then(|p| p.last())
            .cloned()
            .expect("our entry")
    };
    entry["kubernetes"]["kubeconfig"] = json!(kubeconfig);
    entry["plugin_log_level"] = json!("error");
    entry["cniVersion"] = json!("1.0.0");
    entry["name"] = json!("k8s-pod-network");
    let bin = istio_cni_bin();
    println!(
        "istio-cni ambient bench: {} and the node agent, with the real ztunnel ({pods} pods each)",
        bin.display()
    );

    let mut ambient = Vec::with_capacity(pods);
    let mut sidecar = Vec::with_capacity(pods);
    // The ambient pods' netns live on, as running pods' do (the restarts find them).
    let mut running = Vec::with_capacity(pods);
    for i in 0..pods {
        let runs = [("ambient", true), ("sidecar", false)];
        for k in 0..2 {
            let (prefix, is_ambient) = runs[(i + k) % 2];
            let pod_ns = pod_netns(ip(i));
            let mut conf = entry.clone();
            conf["prevResult"] = json!({"cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": pod_ns.path()}],
                "ips": [{"address": format!("{}/24", ip(i)), "interface": 0}]});
            // From the node's netns, as the runtime runs the plugin (the API is there).
            let (took, outcome) = node_ns
                .open()
                .run(|_| {
                    timed_add(
                        &bin,
                        &pod_ns.path(),
                        &format!("bench-{prefix}-{i}"),
                        &format!("{prefix}-{i}"),
                        &conf.to_string(),
                    )
                })
                .expect("enter the node netns");
            if let Err(e) = outcome {
                panic!("{prefix} ADD {i} failed: {e}");
            }
            if is_ambient {
                ambient.push(took);
                running.push(pod_ns);
            } else {
                sidecar.push(took);
            }
        }
    }
    // kubelet reports each pod running, with its address.
    for i in 0..pods {
        let name = format!("ambient-{i}");
        let mut pod = api.get("pods", "default", &name).expect("pod");
        pod["status"] = json!({"phase": "Running", "podIP": ip(i).to_string(),
                               "podIPs": [{"ip": ip(i).to_string()}]});
        api.put("pods", pod);
    }
    let (agent, agent_restart) = restart_agent(agent);
    let (zt, ztunnel_restart) = restart_ztunnel(zt);
    let kept = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("pod keep received")
        .count();

    let (a_med, a_p99) = (quantile(&mut ambient, 0.5), quantile(&mut ambient, 0.99));
    let (s_med, s_p99) = (quantile(&mut sidecar, 0.5), quantile(&mut sidecar, 0.99));
    println!(
        "ambient ADD (event, checks, rules, ztunnel ack, listeners, annotation), {pods} pods:"
    );
    println!("  median {}   p99 {}", ms(a_med), ms(a_p99));
    println!("sidecar ADD of the same plugin, interleaved with the above, {pods} pods:");
    println!("  median {}   p99 {}", ms(s_med), ms(s_p99));
    println!(
        "ratio ambient/sidecar ADD: median {:.2}x   p99 {:.2}x",
        a_med.as_secs_f64() / s_med.as_secs_f64(),
        a_p99.as_secs_f64() / s_p99.as_secs_f64()
    );
    println!("agent SIGKILLed and restarted -> ztunnel acknowledged its snapshot:");
    println!(
        "  {pods} ambient pods {}   no pod {}   ratio {:.2}x   (KeepWorkload sent: {kept})",
        ms(agent_restart),
        ms(agent_floor),
        agent_restart.as_secs_f64() / agent_floor.as_secs_f64()
    );
    println!("ztunnel killed and restarted -> ready (snapshot taken, every proxy up):");
    println!(
        "  {pods} ambient pods {}   no pod {}   ratio {:.2}x",
        ms(ztunnel_restart),
        ms(ztunnel_floor),
        ztunnel_restart.as_secs_f64() / ztunnel_floor.as_secs_f64()
    );
    drop(zt);
    drop(agent);
}

/// Polls `done` every 2 ms, for at most 60 s.
fn poll(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "not done within 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A pod netns with `ip`/24 on `eth0` (a veth kept inside) and `lo` up.
fn pod_netns(ip: Ipv4Addr) -> TestNetns {
    let ns = TestNetns::new("abp");
    ns.exec(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ]);
    ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    ns.exec(&["ip", "link", "set", "eth0", "up"]);
    ns.exec(&["ip", "link", "set", "peer0", "up"]);
    ns
}
