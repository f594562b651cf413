//! The real `istio-cni-node-agent run` against an API server that misbehaves, then recovers:
//! one that black-holes the agent's first requests (connections accepted, requests read,
//! never answered), and one that answers 500. What must hold is liveness, not speed: once
//! the API answers again, the node is untainted and a broken meshed pod is repaired within
//! one request timeout and a retry, not after a watch-length read timeout; and while the
//! node cannot be read, the metrics say that its taint state is unknown. Needs root.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use istio_cni_e2e::agent::{wait_for, Daemon, Kind, Node, PRIMARY};
use istio_cni_e2e::fake_api::{FakeApi, Fault};
use istio_cni_e2e::kubelet::{istio_chain, Layout, NodePods};
use istio_cni_e2e::sandbox::injected_pod;
use serde_json::json;

const NODE: &str = "node-1";
const TAINT: &str = "cni.istio.io/not-ready";

/// How long the API black-holes requests after the agent starts.
const OUTAGE: Duration = Duration::from_secs(3);

/// The liveness bound for "API back → done": the agent's request timeout (10 s), which a
/// request sent into the black hole has to run out, plus the retry's backoff and margin.
/// Not a performance assertion: the defect it catches is a wait of a watch-length timeout
/// (tens of seconds to minutes).
const BOUND: Duration = Duration::from_secs(15);

/// How long the tests wait before giving up, so that a slow agent's time is still
/// measured and printed (above [`BOUND`]).
const GIVE_UP: Duration = Duration::from_secs(60);

/// Polls `cond` every 20 ms until it holds (`Some(elapsed)`) or [`GIVE_UP`] passes (`None`).
fn time_until(mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < GIVE_UP {
        if cond() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The node, registered with our taint and kubelet's Ready condition.
fn registered_node(api: &FakeApi) {
    api.put(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
            "spec": {"taints": [{"key": TAINT, "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
}

fn tainted(api: &FakeApi) -> bool {
    api.get("nodes", "", NODE).unwrap()["spec"]["taints"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["key"] == TAINT)
}

/// Flags of an agent for [`NODE`] through `kubeconfig` (no self-test, grace 1 s).
fn agent_args<'a>(kubeconfig: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--self-test",
        "false",
        "--node-name",
        NODE,
        "--taint-grace-seconds",
        "1",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

fn spawn(node: &Node, args: &[&str]) -> Daemon {
    node.spawn(
        None,
        &[("KUBERNETES_SERVICE_HOST", "10.96.0.1".into())],
        args,
    )
}

/// The fake API itself: a request received during the black hole is never answered, even
/// after the fault is lifted; a request after it is served.
#[test]
fn the_fake_api_black_hole_holds_requests_and_then_serves_new_ones() {
    use std::io::{Read as _, Write as _};
    let api = FakeApi::start();
    registered_node(&api);
    let request =
        format!("GET /api/v1/nodes/{NODE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    api.set_fault(Fault::BlackHole);
    let mut held = std::net::TcpStream::connect(api.addr()).expect("the connection is accepted");
    held.write_all(request.as_bytes()).unwrap();
    wait_for("the request received", || {
        (api.requests() == 1).then_some(())
    });
    api.set_fault(Fault::None);
    held.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 64];
    let err = held
        .read(&mut buf)
        .expect_err("no answer, even after the fault is lifted");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    let mut fresh = std::net::TcpStream::connect(api.addr()).unwrap();
    fresh.write_all(request.as_bytes()).unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    fresh.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// The API black-holes every request for [`OUTAGE`] after the agent starts: the agent's
/// first node read and its pod list go unanswered. Once the API is back, the node is
/// untainted within [`BOUND`] (each request is bounded by the request timeout, and the
/// taint loop retries), where an agent whose requests wait for a watch-length read timeout
/// (or whose retries share one long timeout) leaves the node tainted for most of a minute.
#[test]
fn a_black_holed_api_at_start_delays_the_untaint_by_one_request_timeout_at_most() {
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    std::fs::write(node.conf(), PRIMARY).unwrap();
    let api = FakeApi::start();
    registered_node(&api);
    let kubeconfig = api.write_kubeconfig(node.dir.path());
    api.set_fault(Fault::BlackHole);
    let daemon = spawn(&node, &agent_args(&kubeconfig, &[]));
    daemon.wait_ready();
    wait_for("the agent's first requests, into the black hole", || {
        (api.requests() >= 1).then_some(())
    });
    std::thread::sleep(OUTAGE);
    assert!(
        tainted(&api),
        "nothing changes while the API is black-holed"
    );
    api.set_fault(Fault::None);
    let took = time_until(|| !tainted(&api));
    eprintln!("API back → node untainted: {took:?} (bound {BOUND:?})");
    let took = took.unwrap_or_else(|| panic!("still tainted {GIVE_UP:?} after the API came back"));
    assert!(
        took < BOUND,
        "untainted {took:?} after the API came back; bound {BOUND:?}"
    );
}

/// The same outage, met by the repair loop: its watcher's initial pod list goes into the
/// black hole. Once the API is back, the list is made again and a meshed pod whose rules
/// were flushed is repaired within [`BOUND`], instead of after the watch read timeout.
#[test]
fn a_black_holed_api_at_start_delays_the_repair_by_one_request_timeout_at_most() {
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    std::fs::write(node.conf(), PRIMARY).unwrap();
    let api = FakeApi::start();
    let kubeconfig = api.write_kubeconfig(node.dir.path());
    let pods = NodePods::new();
    let pod = pods.start(Layout::Systemd, Ipv4Addr::new(10, 78, 0, 11));
    let object = pod.object(injected_pod("default", "web", json!({}), json!({})), NODE);
    api.put("pods", object);
    pod.add(&istio_chain(&kubeconfig), "default", "web")
        .unwrap_or_else(|e| panic!("ADD: {e:?}"));
    let expected = pod.rules();
    assert!(!expected.is_empty(), "ADD wrote rules");
    pod.flush();
    assert_ne!(pod.rules(), expected);

    api.set_fault(Fault::BlackHole);
    let netns_dir = pods.netns_dir().to_str().unwrap().to_owned();
    let extra = [
        "--taint-enabled",
        "false",
        "--repair-resync-seconds",
        "3600",
        "--host-proc-dir",
        "/proc",
        "--netns-dirs",
        &netns_dir,
    ];
    let daemon = spawn(&node, &agent_args(&kubeconfig, &extra));
    daemon.wait_ready();
    wait_for("the pod list, into the black hole", || {
        (api.requests() >= 1).then_some(())
    });
    std::thread::sleep(OUTAGE);
    assert_ne!(pod.rules(), expected, "no repair without the pod list");
    api.set_fault(Fault::None);
    let took = time_until(|| pod.rules() == expected);
    eprintln!("API back → broken pod repaired: {took:?} (bound {BOUND:?})");
    let took = took.unwrap_or_else(|| panic!("not repaired {GIVE_UP:?} after the API came back"));
    assert!(
        took < BOUND,
        "repaired {took:?} after the API came back; bound {BOUND:?}"
    );
}

/// `istio_cni_node_taint_state_known` and `istio_cni_node_tainted`, as Prometheus parses
/// them.
fn taint_gauges(daemon: &Daemon) -> Option<(f64, f64)> {
    let m = daemon.scrape()?;
    let known = m.value("istio_cni_node_taint_state_known", Kind::Gauge, &[])?;
    let tainted = m.value("istio_cni_node_tainted", Kind::Gauge, &[])?;
    Some((known, tainted))
}

/// While the API answers 500, the node was never read: `istio_cni_node_taint_state_known`
/// is 0, so `istio_cni_node_tainted` 0 cannot be taken for "untainted". Once the node is
/// read, the state is known and `istio_cni_node_tainted` is what the node carries: 1 for
/// the taint it registered with (the agent not ready yet), 0 after the untaint.
#[test]
fn the_taint_state_is_unknown_until_the_node_is_read() {
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    let api = FakeApi::start();
    registered_node(&api);
    let kubeconfig = api.write_kubeconfig(node.dir.path());
    api.set_fault(Fault::Status(500));
    let daemon = spawn(&node, &agent_args(&kubeconfig, &[]));
    // Several reads of the node have failed (the taint loop retries from 200 ms on).
    let requests = api.requests();
    wait_for("failed reads of the node", || {
        (api.requests() >= requests + 3).then_some(())
    });
    let (gauges, _) = wait_for("the metrics", || taint_gauges(&daemon));
    assert_eq!(
        gauges,
        (0.0, 0.0),
        "(known, tainted) while the API answers 500"
    );
    let m = daemon.scrape().unwrap();
    assert_eq!(
        m.help("istio_cni_node_taint_state_known"),
        Some("1 once the agent has read its node, so that istio_cni_node_tainted is what the node carries; 0 before that and after a failed read")
    );

    // The API answers: the node is read, tainted as registered (the agent is not ready:
    // no primary CNI config yet).
    api.set_fault(Fault::None);
    let (gauges, took) = wait_for("the taint state known", || {
        taint_gauges(&daemon).filter(|(known, _)| *known == 1.0)
    });
    eprintln!("taint state known {took:?} after the API answered");
    assert_eq!(
        gauges,
        (1.0, 1.0),
        "(known, tainted) for the registered taint"
    );
    assert!(tainted(&api));

    // Ready: untainted, and the gauges say so.
    std::fs::write(node.conf(), PRIMARY).unwrap();
    daemon.wait_ready();
    wait_for("untainted", || (!tainted(&api)).then_some(()));
    wait_for("the gauges for the untainted node", || {
        (taint_gauges(&daemon) == Some((1.0, 0.0))).then_some(())
    });
}

/// A node read failing after it had been read once makes the state unknown again.
#[test]
fn a_failed_read_after_a_good_one_makes_the_taint_state_unknown_again() {
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    let api = FakeApi::start();
    registered_node(&api);
    let kubeconfig = api.write_kubeconfig(node.dir.path());
    let daemon = spawn(&node, &agent_args(&kubeconfig, &[]));
    wait_for("the taint state known", || {
        (taint_gauges(&daemon) == Some((1.0, 1.0))).then_some(())
    });
    // The agent turns ready while the API answers 500: its read for the untaint fails.
    api.set_fault(Fault::Status(500));
    std::fs::write(node.conf(), PRIMARY).unwrap();
    daemon.wait_ready();
    wait_for("the taint state unknown", || {
        taint_gauges(&daemon)
            .filter(|(known, _)| *known == 0.0)
            .map(|_| ())
    });
    api.set_fault(Fault::None);
    wait_for("untainted and known", || {
        (taint_gauges(&daemon) == Some((1.0, 0.0)) && !tainted(&api)).then_some(())
    });
}
