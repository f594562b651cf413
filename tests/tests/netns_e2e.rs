//! End to end in real network namespaces: loopback, then the chain bridge + host-local +
//! istio-cni, run the way libcni runs them, from a host-side netns, against the in-repo
//! fake API server; then real TCP connections prove the redirection. Needs root.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use istio_cni_e2e::chain::Attachment;
use istio_cni_e2e::fake_api::Fault;
use istio_cni_e2e::sandbox::{
    connect_and_accept, injected_pod, listen_in, listen_transparent_in, original_dst, Options,
    Sandbox,
};
use serde_json::{json, Value};

fn meshed(name: &str) -> Value {
    injected_pod("default", name, json!({}), json!({}))
}

#[test]
fn meshed_pod_outbound_and_inbound_are_redirected() {
    let f = Sandbox::new(meshed("web"));
    let result = f.add().unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    assert_eq!(result["cniVersion"], "1.0.0");
    assert!(!f.pod.istio_rules(false).is_empty());

    // Outbound: the app connects to the host side; the connection lands on 15001 with the
    // original destination intact.
    let outbound = listen_in(&f.pod, "0.0.0.0:15001");
    let dst = SocketAddr::new(Sandbox::gateway(&result, false), 8080);
    let conn = connect_and_accept(&f.pod, dst, &outbound);
    assert_eq!(original_dst(&conn), dst);

    // Inbound: the host side connects to the pod; it lands on 15006.
    let inbound = listen_in(&f.pod, "0.0.0.0:15006");
    let dst = SocketAddr::new(Sandbox::ip(&result, false), 8080);
    let conn = connect_and_accept(&f.host, dst, &inbound);
    assert_eq!(original_dst(&conn), dst);

    f.chain.del(&f.attachment, Some(&result)).unwrap();
    assert!(f.pod.istio_rules(false).is_empty(), "DEL removes the rules");
}

#[test]
fn excluded_namespace_and_plain_pods_get_no_rules_and_excluded_skips_the_api() {
    let f = Sandbox::new(injected_pod("kube-system", "coredns", json!({}), json!({})));
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
    let f = Sandbox::new(plain);
    f.add().unwrap();
    assert!(f.pod.istio_rules(false).is_empty());

    let not_injected = injected_pod(
        "default",
        "off",
        json!({"sidecar.istio.io/inject": "false"}),
        json!({}),
    );
    let f = Sandbox::new(not_injected);
    f.add().unwrap();
    assert!(f.pod.istio_rules(false).is_empty());
}

#[test]
fn tproxy_inbound_keeps_the_original_destination() {
    let p = injected_pod(
        "default",
        "tp",
        json!({"sidecar.istio.io/interceptionMode": "TPROXY"}),
        json!({}),
    );
    let f = Sandbox::new(p);
    let result = f.add().unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    let rules = f.pod.istio_rules(false);
    assert!(rules.iter().any(|r| r.contains("-j TPROXY")), "{rules:#?}");
    assert!(f
        .pod
        .exec(&["ip", "rule"])
        .contains("fwmark 0x539 lookup 133"));

    // A transparent listener on 15006 receives the connection addressed to the pod's port.
    let inbound = listen_transparent_in(&f.pod, "0.0.0.0:15006");
    let dst = SocketAddr::new(Sandbox::ip(&result, false), 8080);
    let conn = connect_and_accept(&f.host, dst, &inbound);
    assert_eq!(
        conn.local_addr().unwrap(),
        dst,
        "TPROXY keeps the destination"
    );
    assert_eq!(
        conn.peer_addr().unwrap().ip(),
        Sandbox::gateway(&result, false),
        "and the source"
    );

    f.chain.del(&f.attachment, Some(&result)).unwrap();
    assert!(f.pod.istio_rules(false).is_empty());
    let mangle = f.pod.exec(&["iptables-save", "-t", "mangle"]);
    assert!(
        !mangle.contains("0x539") && !mangle.contains("0x53a"),
        "DEL removes the mark rules too:\n{mangle}"
    );
    assert!(
        !f.pod.exec(&["ip", "rule"]).contains("lookup 133"),
        "DEL removes the policy rule"
    );
}

#[test]
fn ipv6_pod_gets_ip6tables_rules_and_is_redirected() {
    let f = Sandbox::with(
        meshed("v6"),
        Options {
            ipv6: true,
            ..Options::default()
        },
    );
    let result = f.add().unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    assert!(!f.pod.istio_rules(true).is_empty(), "ip6tables rules");
    assert!(!f.pod.istio_rules(false).is_empty(), "and iptables rules");

    let outbound = listen_in(&f.pod, "[::]:15001");
    let dst = SocketAddr::new(Sandbox::gateway(&result, true), 8080);
    let conn = connect_and_accept(&f.pod, dst, &outbound);
    assert_eq!(original_dst(&conn), dst);

    let inbound = listen_in(&f.pod, "[::]:15006");
    let dst = SocketAddr::new(Sandbox::ip(&result, true), 8080);
    let conn = connect_and_accept(&f.host, dst, &inbound);
    assert_eq!(original_dst(&conn), dst);
}

#[test]
fn bad_annotation_fails_add_naming_it_and_writes_nothing() {
    let p = injected_pod(
        "default",
        "bad",
        json!({"traffic.sidecar.istio.io/excludeInboundPorts": "80,8o80"}),
        json!({}),
    );
    let f = Sandbox::new(p);
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
    let mut f = Sandbox::with(
        meshed("down"),
        Options {
            api_timeout_ms: 800,
            ..Options::default()
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
    // A 503 that persists past the deadline is "try again later".
    let f = Sandbox::with(
        meshed("flaky"),
        Options {
            api_timeout_ms: 600,
            ..Options::default()
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
    let f = Sandbox::new(meshed("ghost"));
    assert!(f.api.remove("pods", "default", "ghost"));
    let err = f.add().unwrap_err();
    assert_eq!(err.code(), Some(100), "{err:?}");
}

#[test]
fn second_add_does_not_duplicate_and_del_is_idempotent() {
    let f = Sandbox::new(meshed("twice"));
    let result = f.add().unwrap();
    let first = f.pod.istio_rules(false);
    // The runtime retries ADD for the same container: run our plugin again on its prevResult.
    let bridge_result = {
        let mut r = result.clone();
        r["cniVersion"] = json!("1.0.0");
        r
    };
    let again = f.ours();
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
    let f = Sandbox::new(meshed("chk"));
    let result = f.add().unwrap();
    let ours = f.ours();
    ours.check(&f.attachment, &result).unwrap();
    f.pod.exec(&["iptables", "-t", "nat", "-F", "ISTIO_OUTPUT"]);
    let err = ours.check(&f.attachment, &result).unwrap_err();
    assert_eq!(err.code(), Some(104), "{err:?}");
    assert!(err.msg().contains("ISTIO_OUTPUT"), "{}", err.msg());
}

#[test]
fn failed_validation_removes_everything_it_wrote() {
    let f = Sandbox::new(meshed("busy"));
    // Something already listens on the inbound capture port: the probe cannot run.
    let _squatter = listen_in(&f.pod, "127.0.0.1:15006");
    let err = f.add().unwrap_err();
    assert_eq!(err.code(), Some(104), "{err:?}");
    assert!(err.msg().contains("15006"), "{}", err.msg());
    assert!(f.pod.istio_rules(false).is_empty(), "no half-written rules");
}

#[test]
fn legacy_backend_never_takes_the_hosts_xtables_lock() {
    // Hold the host's global xtables lock, as a busy kube-proxy might. iptables-legacy
    // would wait for it and fail; our per-netns lock lets ADD go through.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/xtables.lock")
        .unwrap();
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let opts = Options {
        env: vec![("FORCE_IPTABLES_BINARY".into(), "legacy".into())],
        ..Options::default()
    };
    let f = Sandbox::with(meshed("legacy"), opts);
    let result = f
        .add()
        .unwrap_or_else(|e| panic!("ADD with the legacy backend: {e:?}"));
    let legacy = f.pod.exec(&["iptables-legacy-save", "-t", "nat"]);
    assert!(
        legacy.contains("-A ISTIO_OUTPUT"),
        "rules are in the legacy tables:\n{legacy}"
    );
    let outbound = listen_in(&f.pod, "0.0.0.0:15001");
    let dst = SocketAddr::new(Sandbox::gateway(&result, false), 8080);
    assert_eq!(
        original_dst(&connect_and_accept(&f.pod, dst, &outbound)),
        dst
    );
    f.chain.del(&f.attachment, Some(&result)).unwrap();
    let legacy = f.pod.exec(&["iptables-legacy-save", "-t", "nat"]);
    assert!(!legacy.contains("ISTIO"), "DEL removes them:\n{legacy}");
}

#[test]
fn a_pod_excluding_the_probe_port_still_validates() {
    // 15002 is the probe's default port; excluding it must not make a correct ADD fail.
    let p = injected_pod(
        "default",
        "noprobe",
        json!({"traffic.sidecar.istio.io/excludeOutboundPorts": "15002,15020"}),
        json!({}),
    );
    let f = Sandbox::new(p);
    f.add().unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    let rules = f.pod.istio_rules(false);
    assert!(
        rules.iter().any(|r| r.contains("--dport 15002 -j RETURN")),
        "{rules:#?}"
    );
}

#[test]
fn a_pod_excluding_loopback_is_validated_by_read_back_alone() {
    // With `lo` excluded nothing on loopback is captured, so the loopback probe cannot
    // pass and must not run; the rules are still read back.
    let p = injected_pod(
        "default",
        "nolo",
        json!({"traffic.sidecar.istio.io/excludeInterfaces": "lo"}),
        json!({}),
    );
    let f = Sandbox::new(p);
    let result = f.add().unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    let nat = f.pod.exec(&["iptables-save", "-t", "nat"]);
    assert!(nat.contains("-A OUTPUT -o lo -j RETURN"), "{nat}");
    f.ours()
        .check(&f.attachment, &result)
        .expect("CHECK reads the rules back");
}

/// Standalone mode (multus, OpenShift): istio-cni runs as a network of its own, so ADD
/// gets no `prevResult`. The pod's address families then come from the addresses in its
/// netns, as upstream reads them: a dual-stack pod gets IPv6 rules too, validated.
#[test]
fn standalone_add_takes_the_families_from_the_netns() {
    let sb = Sandbox::with(
        meshed("dual"),
        Options {
            ipv6: true,
            ..Options::default()
        },
    );
    // The primary network alone (bridge + host-local, both families), as multus runs it.
    let lo = istio_cni_e2e::chain::Attachment {
        ifname: "lo".into(),
        ..sb.attachment.clone()
    };
    istio_cni_e2e::chain::Chain::loopback().add(&lo).unwrap();
    let primary = istio_cni_e2e::chain::Chain {
        plugins: vec![sb.chain.plugins[0].clone()],
        ..sb.chain.clone()
    };
    primary.add(&sb.attachment).unwrap();
    assert!(sb.pod.istio_rules(false).is_empty() && sb.pod.istio_rules(true).is_empty());

    // Then istio-cni as its own network: first in its list, no prevResult.
    let standalone = istio_cni_e2e::chain::Chain {
        name: "istio-cni".into(),
        ..sb.ours()
    };
    standalone
        .add(&sb.attachment)
        .unwrap_or_else(|e| panic!("standalone ADD: {e:?}"));
    assert!(!sb.pod.istio_rules(false).is_empty(), "IPv4 rules");
    assert!(
        !sb.pod.istio_rules(true).is_empty(),
        "IPv6 rules for the pod's IPv6 address in its netns"
    );
}
