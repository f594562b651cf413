//! The nftables backend (`native_nftables: true`) end to end in real network namespaces:
//! loopback, then bridge + host-local + istio-cni, as libcni runs them, against the fake
//! API server. Real TCP connections prove the redirection; CHECK reads back; DEL removes
//! the tables; a pod never holds both backends' rules. Needs root and `nft`.

use std::net::SocketAddr;
use std::path::PathBuf;

use istio_cni_e2e::sandbox::{
    connect_and_accept, injected_pod, listen_in, listen_transparent_in, original_dst, Options,
    Sandbox,
};
use serde_json::{json, Value};

fn nft() -> Options {
    Options {
        nftables: true,
        ..Options::default()
    }
}

fn meshed(name: &str) -> Value {
    injected_pod("default", name, json!({}), json!({}))
}

#[test]
fn a_meshed_pod_is_redirected_checked_and_cleaned_up_with_nftables() {
    let f = Sandbox::with(meshed("nft-web"), nft());
    let result = f.add().unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    assert_eq!(f.pod.istio_nft_tables(), ["istio-proxy-nat"]);
    assert!(f.pod.istio_rules(false).is_empty(), "no iptables rules");

    // Outbound: lands on 15001 with the original destination intact.
    let outbound = listen_in(&f.pod, "0.0.0.0:15001");
    let dst = SocketAddr::new(Sandbox::gateway(&result, false), 8080);
    let conn = connect_and_accept(&f.pod, dst, &outbound);
    assert_eq!(original_dst(&conn), dst);
    // Inbound: lands on 15006.
    let inbound = listen_in(&f.pod, "0.0.0.0:15006");
    let dst = SocketAddr::new(Sandbox::ip(&result, false), 8080);
    let conn = connect_and_accept(&f.host, dst, &inbound);
    assert_eq!(original_dst(&conn), dst);
    drop((outbound, inbound));

    // CHECK reads back; a flushed chain is found and named.
    let ours = f.ours();
    ours.check(&f.attachment, &result).unwrap();
    f.pod.exec(&[
        "nft",
        "flush",
        "chain",
        "inet",
        "istio-proxy-nat",
        "istio-output",
    ]);
    let err = ours.check(&f.attachment, &result).unwrap_err();
    assert_eq!(err.code(), Some(104), "{err:?}");
    assert!(err.msg().contains("istio-output"), "{}", err.msg());

    // A second ADD rewrites the whole table atomically; DEL removes it.
    ours.add_with_prev(&f.attachment, &result).unwrap();
    ours.check(&f.attachment, &result).unwrap();
    f.chain.del(&f.attachment, Some(&result)).unwrap();
    assert!(
        f.pod.istio_nft_tables().is_empty(),
        "DEL removes the tables"
    );
    f.chain.del(&f.attachment, Some(&result)).unwrap();
}

#[test]
fn a_dual_stack_tproxy_pod_is_validated_in_both_families() {
    let pod = injected_pod(
        "default",
        "nft-tproxy",
        json!({"sidecar.istio.io/interceptionMode": "TPROXY"}),
        json!({"env": [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"},
                       {"name": "INVALID_DROP", "value": "true"}]}),
    );
    let f = Sandbox::with(
        pod,
        Options {
            ipv6: true,
            ..nft()
        },
    );
    let result = f.add().unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    assert_eq!(
        f.pod.istio_nft_tables(),
        ["istio-proxy-mangle", "istio-proxy-nat", "istio-proxy-raw"]
    );
    // ADD probed both families. Inbound keeps its original destination and source
    // (TPROXY), into a transparent listener as the sidecar's.
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
    assert!(f
        .pod
        .exec(&["ip", "rule"])
        .contains("fwmark 0x539 lookup 133"));
    f.chain.del(&f.attachment, Some(&result)).unwrap();
    assert!(f.pod.istio_nft_tables().is_empty());
    assert!(
        !f.pod.exec(&["ip", "rule"]).contains("lookup 133"),
        "DEL removes the policy rule"
    );
}

#[test]
fn switching_backends_never_leaves_both_rule_sets() {
    switch_backends(Sandbox::new(meshed("switch")));
}

/// A TPROXY pod switched from iptables-nft (whose rules show in nft's listing, so they
/// are removed after the nftables write): it keeps the policy routing its nftables rules
/// need, and CHECK passes.
#[test]
fn switching_a_tproxy_pod_keeps_its_routing() {
    let pod = injected_pod(
        "default",
        "switch-tproxy",
        json!({"sidecar.istio.io/interceptionMode": "TPROXY"}),
        json!({}),
    );
    // iptables-nft: its rules show up in nft's listing, after the nftables write.
    let f = Sandbox::with(
        pod,
        Options {
            env: vec![("FORCE_IPTABLES_BINARY".into(), "nft".into())],
            ..Options::default()
        },
    );
    let result = f.add().unwrap();
    let mut ours = f.ours();
    ours.plugins[0]["native_nftables"] = json!(true);
    ours.add_with_prev(&f.attachment, &result)
        .unwrap_or_else(|e| panic!("ADD with nftables: {e:?}"));
    assert!(iptables_rules(&f).is_empty(), "iptables rules removed");
    assert!(f
        .pod
        .exec(&["ip", "rule"])
        .contains("fwmark 0x539 lookup 133"));
    ours.check(&f.attachment, &result).unwrap();
}

/// The same from iptables-legacy, whose tables nft does not see.
#[test]
fn switching_from_legacy_iptables_never_leaves_both_rule_sets() {
    switch_backends(Sandbox::with(
        meshed("switch-legacy"),
        Options {
            env: vec![("FORCE_IPTABLES_BINARY".into(), "legacy".into())],
            ..Options::default()
        },
    ));
}

/// Lines of ours in either iptables backend (nft-based and legacy).
fn iptables_rules(f: &Sandbox) -> Vec<String> {
    ["iptables-save", "iptables-legacy-save"]
        .iter()
        .flat_map(|save| {
            f.pod
                .exec(&[save])
                .lines()
                .filter(|l| l.contains("ISTIO"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn switch_backends(f: Sandbox) {
    let result = f.add().unwrap();
    assert!(!iptables_rules(&f).is_empty());

    // The node switches to nftables: ADD again replaces the iptables rules.
    let mut ours = f.ours();
    ours.plugins[0]["native_nftables"] = json!(true);
    ours.add_with_prev(&f.attachment, &result).unwrap();
    assert!(iptables_rules(&f).is_empty(), "iptables rules removed");
    assert_eq!(f.pod.istio_nft_tables(), ["istio-proxy-nat"]);

    // And back to iptables.
    ours.plugins[0]["native_nftables"] = json!(false);
    ours.add_with_prev(&f.attachment, &result).unwrap();
    assert!(
        f.pod.istio_nft_tables().is_empty(),
        "nftables tables removed"
    );
    assert!(!iptables_rules(&f).is_empty());
}

/// Every pod of the iptables conformance set applies under nftables, passes the probe
/// (ADD runs it), reads back, and is gone after DEL.
#[test]
fn every_conformance_pod_applies_under_nftables() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../cni-plugin/tests/conformance/istio-plugin");
    let mut pods: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".pod.json"))
        .collect();
    pods.sort();
    assert!(pods.len() >= 5);
    for path in pods {
        let mut pod: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        // The sandbox's pod lives in "default" under its own name.
        let name = format!(
            "nft-{}",
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches(".pod.json")
        );
        pod["metadata"]["name"] = json!(name);
        pod["metadata"]["namespace"] = json!("default");
        let f = Sandbox::with(pod, nft());
        let result = f
            .add()
            .unwrap_or_else(|e| panic!("{}: ADD under nftables: {e:?}", path.display()));
        f.ours().check(&f.attachment, &result).unwrap();
        f.chain.del(&f.attachment, Some(&result)).unwrap();
        assert!(f.pod.istio_nft_tables().is_empty(), "{}", path.display());
    }
}

#[test]
fn a_failed_validation_leaves_no_tables() {
    let f = Sandbox::with(meshed("nft-busy"), nft());
    // Something already listens on the inbound capture port: the probe cannot run.
    let _squatter = listen_in(&f.pod, "127.0.0.1:15006");
    let err = f.add().unwrap_err();
    assert_eq!(err.code(), Some(104), "{err:?}");
    assert!(
        f.pod.istio_nft_tables().is_empty(),
        "no half-written tables"
    );
    assert!(f.pod.istio_rules(false).is_empty());
}
