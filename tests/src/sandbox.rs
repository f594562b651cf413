//! One pod sandbox wired the way a runtime wires it: a host-side netns holding the bridge
//! and the fake API server (on its loopback), a pod netns, and the chain
//! loopback, then bridge + host-local + istio-cni. Used by the end-to-end tests, the demo
//! and the benchmark.

// Plugin failures carry the whole plugin output for the report; their size does not matter.
#![allow(clippy::result_large_err)]

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};
use serde_json::{json, Value};

use crate::chain::{istio_cni_bin, Attachment, Chain, PluginFailure, REFERENCE_PLUGIN_DIR};
use crate::fake_api::FakeApi;
use crate::net::{unique_name, TestNetns};

/// How to build a [`Sandbox`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Give the pod an IPv6 address too.
    pub ipv6: bool,
    /// `kubernetes.api_timeout_ms` of the plugin.
    pub api_timeout_ms: u64,
    /// `validation.probe` of the plugin.
    pub probe: bool,
    /// `plugin_log_level` of the plugin.
    pub log_level: &'static str,
    /// Extra environment of the plugins, e.g. `FORCE_IPTABLES_BINARY`.
    pub env: Vec<(String, String)>,
    /// `native_nftables` of the plugin: the nftables backend.
    pub nftables: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ipv6: false,
            api_timeout_ms: 5000,
            probe: true,
            log_level: "debug",
            env: Vec::new(),
            nftables: false,
        }
    }
}

/// A pod sandbox; everything is removed on drop.
pub struct Sandbox {
    /// The host side: the bridge, the API server, and where the plugins run.
    pub host: TestNetns,
    /// The pod's netns.
    pub pod: TestNetns,
    /// The API server.
    pub api: FakeApi,
    /// The pod network chain.
    pub chain: Chain,
    /// The pod's attachment.
    pub attachment: Attachment,
    /// Holds the kubeconfig and the IPAM state.
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    /// A sandbox for `pod` (stored in the API), with default options.
    pub fn new(pod: Value) -> Sandbox {
        Sandbox::with(pod, Options::default())
    }

    /// A sandbox for `pod` (stored in the API).
    pub fn with(pod: Value, opts: Options) -> Sandbox {
        let dir = tempfile::tempdir().expect("temp dir");
        let host = TestNetns::new("h");
        let api = FakeApi::start_in(&host);
        let kubeconfig = api.write_kubeconfig(dir.path());
        let namespace = pod["metadata"]["namespace"]
            .as_str()
            .expect("namespace")
            .to_owned();
        let name = pod["metadata"]["name"].as_str().expect("name").to_owned();
        api.put("pods", pod);
        let pod_ns = TestNetns::bare("p");
        let mut ranges = vec![json!([{"subnet": "10.66.0.0/24"}])];
        let mut routes = vec![json!({"dst": "0.0.0.0/0"})];
        if opts.ipv6 {
            ranges.push(json!([{"subnet": "fd66::/64"}]));
            routes.push(json!({"dst": "::/0"}));
        }
        let chain = Chain {
            name: "k8s-pod-network".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![
                json!({"type": "bridge", "bridge": unique_name("br"), "isGateway": true,
                       "ipMasq": false,
                       "ipam": {"type": "host-local", "dataDir": dir.path().join("ipam"),
                                "ranges": ranges, "routes": routes}}),
                json!({"type": "istio-cni", "plugin_log_level": opts.log_level,
                       "exclude_namespaces": ["kube-system"],
                       "kubernetes": {"kubeconfig": kubeconfig,
                                      "api_timeout_ms": opts.api_timeout_ms},
                       "validation": {"probe": opts.probe},
                       "native_nftables": opts.nftables}),
            ],
            cni_path: vec![plugin_dir(), REFERENCE_PLUGIN_DIR.into()],
            runtime_netns: Some(host.name.clone()),
            env: opts.env.clone(),
        };
        let attachment = Attachment {
            container_id: unique_name("c"),
            netns: pod_ns.path(),
            ifname: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=x"
            ),
        };
        Sandbox {
            host,
            pod: pod_ns,
            api,
            chain,
            attachment,
            dir,
        }
    }

    /// ADD as a runtime does it: the loopback network, then the pod network chain.
    /// Returns the chain's result.
    pub fn add(&self) -> Result<Value, PluginFailure> {
        let lo = Attachment {
            ifname: "lo".into(),
            ..self.attachment.clone()
        };
        Chain::loopback().add(&lo)?;
        self.chain.add(&self.attachment)
    }

    /// The chain reduced to our plugin alone (to re-run ADD, CHECK or DEL on it).
    pub fn ours(&self) -> Chain {
        Chain {
            plugins: vec![self.chain.plugins[1].clone()],
            ..self.chain.clone()
        }
    }

    /// The pod's address of a family in an ADD result.
    pub fn ip(result: &Value, v6: bool) -> IpAddr {
        ips(result, "address", v6)
    }

    /// The gateway (the bridge on the host side) of a family in an ADD result.
    pub fn gateway(result: &Value, v6: bool) -> IpAddr {
        ips(result, "gateway", v6)
    }
}

fn ips(result: &Value, field: &str, v6: bool) -> IpAddr {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| {
            ip[field]
                .as_str()?
                .split('/')
                .next()?
                .parse::<IpAddr>()
                .ok()
        })
        .find(|ip| ip.is_ipv6() == v6)
        .unwrap_or_else(|| panic!("no IPv{} {field} in {result}", if v6 { 6 } else { 4 }))
}

/// The directory that holds the `istio-cni` binary under test.
pub fn plugin_dir() -> PathBuf {
    istio_cni_bin().parent().expect("bin dir").to_path_buf()
}

/// A pod as the injector leaves it: `sidecar.istio.io/status` set, an `istio-proxy`
/// container running `proxy sidecar`. `annotations` are added; `proxy` fields are merged
/// into the proxy container.
pub fn injected_pod(namespace: &str, name: &str, annotations: Value, proxy: Value) -> Value {
    let mut annotations = annotations;
    annotations["sidecar.istio.io/status"] = json!("{\"containers\":[\"istio-proxy\"]}");
    let mut proxy_c =
        json!({"name": "istio-proxy", "image": "proxyv2", "args": ["proxy", "sidecar"]});
    for (k, v) in proxy.as_object().expect("proxy fields") {
        proxy_c[k] = v.clone();
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
           "spec": {"nodeName": "node-1",
                    "containers": [{"name": "app", "image": "app"}, proxy_c]}})
}

/// Binds a TCP listener inside `ns` (the socket stays in that netns).
pub fn listen_in(ns: &TestNetns, addr: &str) -> TcpListener {
    ns.open()
        .run(|_| TcpListener::bind(addr))
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("listen on {addr} in {}: {e}", ns.name))
}

/// A listener on `addr` inside `ns` with `IP_TRANSPARENT`, as a sidecar's TPROXY inbound
/// listener: it receives connections addressed to other local addresses and ports.
pub fn listen_transparent_in(ns: &TestNetns, addr: &str) -> TcpListener {
    ns.open()
        .run(|_| {
            let l = TcpListener::bind(addr)?;
            nix::sys::socket::setsockopt(&l, nix::sys::socket::sockopt::IpTransparent, &true)?;
            std::io::Result::Ok(l)
        })
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("transparent listen on {addr} in {}: {e}", ns.name))
}

/// Connects from inside `from` to `dst` and returns the connection as accepted by
/// `listener`, or panics after 3 s.
pub fn connect_and_accept(from: &TestNetns, dst: SocketAddr, listener: &TcpListener) -> TcpStream {
    let client = from
        .open()
        .run(|_| TcpStream::connect_timeout(&dst, Duration::from_secs(3)))
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("connect to {dst} from {}: {e}", from.name));
    listener.set_nonblocking(true).expect("nonblocking");
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

/// The original destination of a REDIRECTed connection (`SO_ORIGINAL_DST`).
pub fn original_dst(s: &TcpStream) -> SocketAddr {
    match s.local_addr().expect("local addr") {
        SocketAddr::V4(_) => {
            let a = getsockopt(s, sockopt::OriginalDst).expect("SO_ORIGINAL_DST");
            SocketAddr::new(
                std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            )
        }
        SocketAddr::V6(_) => {
            let a = getsockopt(s, sockopt::Ip6tOriginalDst).expect("IP6T_SO_ORIGINAL_DST");
            SocketAddr::new(
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                u16::from_be(a.sin6_port),
            )
        }
    }
}

/// What ADD's validation proves, checked again by a test inside a pod's netns: the
/// read-back of `ruleset` and, with `probe`, the IPv4 loopback probe to its probe port.
///
/// Errors: the first check that fails.
pub fn read_back_and_probe(
    inside: &istio_cni::netns::Inside<'_>,
    xt: &istio_cni::apply::Xtables,
    ruleset: &istio_cni::rules::Ruleset,
    probe: bool,
) -> Result<(), istio_cni::validate::ValidateError> {
    istio_cni::validate::read_back(inside, xt, ruleset)?;
    if probe {
        istio_cni::validate::probe(
            inside,
            istio_cni::rules::Family::V4,
            ruleset.proxy_uid,
            ruleset.probe_port.expect("a probe port"),
            std::time::Duration::from_secs(2),
        )?;
    }
    Ok(())
}
