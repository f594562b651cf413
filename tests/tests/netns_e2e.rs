//! End to end in real network namespaces: the chain bridge + host-local + istio-cni, run
//! the way libcni runs it, from a host-side netns, against the in-repo fake API server;
//! then real TCP connections prove the redirection. Needs root.

// Plugin failures carry the whole plugin output for the report; their size does not matter.
#![allow(clippy::result_large_err)]

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use istio_cni_e2e::chain::{istio_cni_bin, Attachment, Chain, PluginFailure, REFERENCE_PLUGIN_DIR};
use istio_cni_e2e::fake_api::FakeApi;
use istio_cni_e2e::net::{unique_name, TestNetns};
use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use serde_json::{json, Value};

/// One pod sandbox wired like a runtime would: a host-side netns holding the bridge, a
/// pod netns, the fake API holding the pod, and the chain.
struct Fixture {
    host: TestNetns,
    pod: TestNetns,
    api: FakeApi,
    chain: Chain,
    attachment: Attachment,
    _dir: tempfile::TempDir,
}

struct Opts {
    ipv6: bool,
    api_timeout_ms: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            ipv6: false,
            api_timeout_ms: 5000,
        }
    }
}

impl Fixture {
    fn new(pod: Value) -> Fixture {
        Fixture::with(pod, Opts::default())
    }

    fn with(pod: Value, opts: Opts) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let host = TestNetns::new("h");
        // The plugins run in the host-side netns; so does the API server, on its loopback.
        let listener = host
            .open()
            .run(|_| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        let api = FakeApi::serve(listener);
        let kubeconfig = api.write_kubeconfig(dir.path());
        let namespace = pod["metadata"]["namespace"].as_str().unwrap().to_owned();
        let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
        api.put("pods", pod);
        let pod_ns = TestNetns::new("p");
        let mut ranges = vec![json!([{"subnet": "10.66.0.0/24"}])];
        let mut routes = vec![json!({"dst": "0.0.0.0/0"})];
        if opts.ipv6 {
            ranges.push(json!([{"subnet": "fd66::/64"}]));
            routes.push(json!({"dst": "::/0"}));
        }
        let chain = Chain {
            name: "e2e".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![
                json!({"type": "bridge", "bridge": unique_name("br"), "isGateway": true,
                       "ipMasq": false,
                       "ipam": {"type": "host-local", "dataDir": dir.path().join("ipam"),
                                "ranges": ranges, "routes": routes}}),
                json!({"type": "istio-cni", "plugin_log_level": "debug",
                       "exclude_namespaces": ["kube-system"],
                       "kubernetes": {"kubeconfig": kubeconfig,
                                      "api_timeout_ms": opts.api_timeout_ms}}),
            ],
            cni_path: vec![
                istio_cni_bin().parent().unwrap().to_path_buf(),
                REFERENCE_PLUGIN_DIR.into(),
            ],
            runtime_netns: Some(host.name.clone()),
        };
        let attachment = Attachment {
            container_id: unique_name("c"),
            netns: pod_ns.path(),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=x"),
        };
        Fixture {
            host,
            pod: pod_ns,
            api,
            chain,
            attachment,
            _dir: dir,
        }
    }

    fn add(&self) -> Result<Value, PluginFailure> {
        self.chain.add(&self.attachment)
    }

    fn ip(result: &Value, v6: bool) -> IpAddr {
        result["ips"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|ip| {
                ip["address"]
                    .as_str()?
                    .split('/')
                    .next()?
                    .parse::<IpAddr>()
                    .ok()
            })
            .find(|ip| ip.is_ipv6() == v6)
            .expect("pod address of the family")
    }

    fn gateway(result: &Value, v6: bool) -> IpAddr {
        result["ips"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|ip| ip["gateway"].as_str()?.parse::<IpAddr>().ok())
            .find(|ip| ip.is_ipv6() == v6)
            .expect("gateway of the family")
    }
}

fn pod(namespace: &str, name: &str, annotations: Value, proxy: Value) -> Value {
    let mut annotations = annotations;
    annotations["sidecar.istio.io/status"] = json!("{\"containers\":[\"istio-proxy\"]}");
    let mut proxy_c =
        json!({"name": "istio-proxy", "image": "proxyv2", "args": ["proxy", "sidecar"]});
    for (k, v) in proxy.as_object().unwrap() {
        proxy_c[k] = v.clone();
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
           "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app"}, proxy_c]}})
}

fn meshed(name: &str) -> Value {
    pod("default", name, json!({}), json!({}))
}

/// Connects from inside `from` to `dst` and returns the connection accepted by `listener`
/// (which lives in the pod netns), with the time budget of a test.
fn connect_and_accept(from: &TestNetns, dst: SocketAddr, listener: &TcpListener) -> TcpStream {
    let client = from
        .open()
        .run(|_| TcpStream::connect_timeout(&dst, Duration::from_secs(3)))
        .unwrap()
        .unwrap_or_else(|e| panic!("connect to {dst} from {}: {e}", from.name));
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let accepted = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!(
                "connection to {dst} did not arrive at {:?}: {e}",
                listener.local_addr()
            ),
        }
    };
    drop(client);
    accepted
}

fn original_dst(s: &TcpStream) -> SocketAddr {
    match s.local_addr().unwrap() {
        SocketAddr::V4(_) => {
            let a = getsockopt(s, sockopt::OriginalDst).unwrap();
            SocketAddr::new(
                std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            )
        }
        SocketAddr::V6(_) => {
            let a = getsockopt(s, sockopt::Ip6tOriginalDst).unwrap();
            SocketAddr::new(
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                u16::from_be(a.sin6_port),
            )
        }
    }
}

fn listen_in(ns: &TestNetns, addr: &str) -> TcpListener {
    ns.open().run(|_| TcpListener::bind(addr)).unwrap().unwrap()
}

#[test]
fn meshed_pod_outbound_and_inbound_are_redirected() {
    let f = Fixture::new(meshed("web"));
    let result = f.add().unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    assert_eq!(result["cniVersion"], "1.0.0");
    assert!(!f.pod.istio_rules(false).is_empty());

    // Outbound: the app connects to the host side; the connection lands on 15001 with the
    // original destination intact.
    let outbound = listen_in(&f.pod, "0.0.0.0:15001");
    let dst = SocketAddr::new(Fixture::gateway(&result, false), 8080);
    let conn = connect_and_accept(&f.pod, dst, &outbound);
    assert_eq!(original_dst(&conn), dst);

    // Inbound: the host side connects to the pod; it lands on 15006.
    let inbound = listen_in(&f.pod, "0.0.0.0:15006");
    let dst = SocketAddr::new(Fixture::ip(&result, false), 8080);
    let conn = connect_and_accept(&f.host, dst, &inbound);
    assert_eq!(original_dst(&conn), dst);

    f.chain.del(&f.attachment, Some(&result)).unwrap();
    assert!(f.pod.istio_rules(false).is_empty(), "DEL removes the rules");
}

#[test]
fn excluded_namespace_and_plain_pods_get_no_rules_and_excluded_skips_the_api() {
    let f = Fixture::new(pod("kube-system", "coredns", json!({}), json!({})));
    let before = f.api.requests();
    let result = f.add().unwrap();
    assert!(f.pod.istio_rules(false).is_empty());
    assert_eq!(
        f.api.requests(),
        before,
        "no API call for an excluded namespace"
    );
    assert!(
        result["ips"].as_array().is_some_and(|a| !a.is_empty()),
        "prevResult passed through"
    );

    let plain = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "plain", "namespace": "default"},
        "spec": {"containers": [{"name": "app", "image": "app"}]}});
    let f = Fixture::new(plain);
    f.add().unwrap();
    assert!(f.pod.istio_rules(false).is_empty());

    let not_injected = pod(
        "default",
        "off",
        json!({"sidecar.istio.io/inject": "false"}),
        json!({}),
    );
    let f = Fixture::new(not_injected);
    f.add().unwrap();
    assert!(f.pod.istio_rules(false).is_empty());
}

#[test]
fn tproxy_inbound_keeps_the_original_destination() {
    let p = pod(
        "default",
        "tp",
        json!({"sidecar.istio.io/interceptionMode": "TPROXY"}),
        json!({}),
    );
    let f = Fixture::new(p);
    let result = f.add().unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    let rules = f.pod.istio_rules(false);
    assert!(rules.iter().any(|r| r.contains("-j TPROXY")), "{rules:#?}");
    assert!(f
        .pod
        .exec(&["ip", "rule"])
        .contains("fwmark 0x539 lookup 133"));

    // A transparent listener on 15006 receives the connection addressed to the pod's port.
    let inbound = f
        .pod
        .open()
        .run(|_| {
            let l = TcpListener::bind("0.0.0.0:15006")?;
            setsockopt(&l, sockopt::IpTransparent, &true)?;
            std::io::Result::Ok(l)
        })
        .unwrap()
        .unwrap();
    let dst = SocketAddr::new(Fixture::ip(&result, false), 8080);
    let conn = connect_and_accept(&f.host, dst, &inbound);
    assert_eq!(
        conn.local_addr().unwrap(),
        dst,
        "TPROXY keeps the destination"
    );
    assert_eq!(
        conn.peer_addr().unwrap().ip(),
        Fixture::gateway(&result, false),
        "and the source"
    );

    f.chain.del(&f.attachment, Some(&result)).unwrap();
    assert!(f.pod.istio_rules(false).is_empty());
    assert!(
        !f.pod.exec(&["ip", "rule"]).contains("lookup 133"),
        "DEL removes the policy rule"
    );
}

#[test]
fn ipv6_pod_gets_ip6tables_rules_and_is_redirected() {
    let f = Fixture::with(
        meshed("v6"),
        Opts {
            ipv6: true,
            ..Opts::default()
        },
    );
    let result = f.add().unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    assert!(!f.pod.istio_rules(true).is_empty(), "ip6tables rules");
    assert!(!f.pod.istio_rules(false).is_empty(), "and iptables rules");

    let outbound = listen_in(&f.pod, "[::]:15001");
    let dst = SocketAddr::new(Fixture::gateway(&result, true), 8080);
    let conn = connect_and_accept(&f.pod, dst, &outbound);
    assert_eq!(original_dst(&conn), dst);

    let inbound = listen_in(&f.pod, "[::]:15006");
    let dst = SocketAddr::new(Fixture::ip(&result, true), 8080);
    let conn = connect_and_accept(&f.host, dst, &inbound);
    assert_eq!(original_dst(&conn), dst);
}

#[test]
fn bad_annotation_fails_add_naming_it_and_writes_nothing() {
    let p = pod(
        "default",
        "bad",
        json!({"traffic.sidecar.istio.io/excludeInboundPorts": "80,8o80"}),
        json!({}),
    );
    let f = Fixture::new(p);
    let err = f.add().unwrap_err();
    assert_eq!(err.plugin, "istio-cni");
    assert_eq!(err.code(), Some(101), "{err:?}");
    assert!(
        err.msg()
            .contains("traffic.sidecar.istio.io/excludeInboundPorts"),
        "{}",
        err.msg()
    );
    assert!(err.msg().contains("\"8o80\""), "{}", err.msg());
    assert!(f.pod.istio_rules(false).is_empty());
}

#[test]
fn api_down_fails_closed_with_try_again_later() {
    let mut f = Fixture::with(
        meshed("down"),
        Opts {
            api_timeout_ms: 800,
            ..Opts::default()
        },
    );
    f.api.stop();
    let start = Instant::now();
    let err = f.add().unwrap_err();
    assert_eq!(err.code(), Some(11), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "bounded by the deadline"
    );
    assert!(f.pod.istio_rules(false).is_empty());
}

#[test]
fn api_errors_and_slowness() {
    use istio_cni_e2e::fake_api::Fault;
    // A 503 that persists past the deadline is "try again later".
    let f = Fixture::with(
        meshed("flaky"),
        Opts {
            api_timeout_ms: 600,
            ..Opts::default()
        },
    );
    f.api.set_fault(Fault::Status(503));
    assert_eq!(f.add().unwrap_err().code(), Some(11));
    // A slow but answering API is waited for.
    f.api.set_fault(Fault::Delay(Duration::from_millis(200)));
    f.chain.del(&f.attachment, None).unwrap();
    f.add()
        .unwrap_or_else(|e| panic!("ADD with a slow API: {e:?}"));
    assert!(!f.pod.istio_rules(false).is_empty());

    // A pod the API does not know is a definite error (100), not a pass-through.
    let f = Fixture::new(meshed("ghost"));
    assert!(f.api.remove("pods", "default", "ghost"));
    let err = f.add().unwrap_err();
    assert_eq!(err.code(), Some(100), "{err:?}");
}

#[test]
fn second_add_does_not_duplicate_and_del_is_idempotent() {
    let f = Fixture::new(meshed("twice"));
    let result = f.add().unwrap();
    let first = f.pod.istio_rules(false);
    // The runtime retries ADD for the same container: run our plugin again on its prevResult.
    let bridge_result = {
        let mut r = result.clone();
        r["cniVersion"] = json!("1.0.0");
        r
    };
    let ours = f.chain.plugins[1].clone();
    let again = Chain {
        plugins: vec![ours],
        ..f.chain.clone()
    };
    let second = again.add_with_prev(&f.attachment, &bridge_result).unwrap();
    assert_eq!(second, result);
    assert_eq!(f.pod.istio_rules(false), first, "same rules, no duplicates");

    f.chain.del(&f.attachment, Some(&result)).unwrap();
    f.chain.del(&f.attachment, Some(&result)).unwrap();
    // And once the netns is gone.
    let gone = Attachment {
        netns: "/var/run/netns/does-not-exist".into(),
        ..f.attachment.clone()
    };
    again.del(&gone, Some(&result)).unwrap();
}

#[test]
fn check_passes_then_fails_after_rules_are_flushed() {
    let f = Fixture::new(meshed("chk"));
    let result = f.add().unwrap();
    let ours = Chain {
        plugins: vec![f.chain.plugins[1].clone()],
        ..f.chain.clone()
    };
    ours.check(&f.attachment, &result).unwrap();
    f.pod.exec(&["iptables", "-t", "nat", "-F", "ISTIO_OUTPUT"]);
    let err = ours.check(&f.attachment, &result).unwrap_err();
    assert_eq!(err.code(), Some(104), "{err:?}");
    assert!(err.msg().contains("ISTIO_OUTPUT"), "{}", err.msg());
}

#[test]
fn failed_validation_removes_everything_it_wrote() {
    let f = Fixture::new(meshed("busy"));
    // Something already listens on the inbound capture port: the probe cannot run.
    let _squatter = listen_in(&f.pod, "127.0.0.1:15006");
    let err = f.add().unwrap_err();
    assert_eq!(err.code(), Some(104), "{err:?}");
    assert!(err.msg().contains("15006"), "{}", err.msg());
    assert!(f.pod.istio_rules(false).is_empty(), "no half-written rules");
}
