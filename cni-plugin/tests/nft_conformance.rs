//! The nftables transaction must equal upstream Istio's for the same input: every case of
//! `tests/conformance/istio-nftables/` (upstream's 28 goldens and their inputs,
//! byte-identical, see its `SOURCE.md`) that the plugin's configuration can express is
//! turned into a `Redirect` and built; the output must match the golden line for line.
//! The cases it cannot express are listed in [`INEXPRESSIBLE`] with the reason, and the
//! test fails if that list and the cases disagree in either direction.

mod common;

use std::path::PathBuf;

use common::nft_cases::{dir, redirect_of, INEXPRESSIBLE};
use istio_cni::rules::nftables;
use serde_json::Value;

#[test]
fn every_expressible_upstream_case_matches_line_for_line() {
    let cases: Value =
        serde_json::from_slice(&std::fs::read(dir().join("cases.json")).unwrap()).unwrap();
    let defaults = cases["defaults"].as_object().unwrap();
    let mut matched = Vec::new();
    let mut failures = Vec::new();
    let names: Vec<&String> = cases["cases"].as_object().unwrap().keys().collect();
    for name in &names {
        if INEXPRESSIBLE.iter().any(|(n, _)| n == name) {
            continue;
        }
        let mut cfg = defaults.clone();
        for (k, v) in cases["cases"][name.as_str()].as_object().unwrap() {
            cfg.insert(k.clone(), v.clone());
        }
        let (redirect, ipv6) = redirect_of(&cfg);
        let got = nftables::build(&redirect, ipv6).transaction();
        let want = std::fs::read_to_string(dir().join(format!("{name}.golden"))).unwrap();
        if got.lines().collect::<Vec<_>>() == want.lines().collect::<Vec<_>>() {
            matched.push(name.to_string());
        } else {
            failures.push(format!("--- {name}: want\n{want}--- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The list of left-out cases names only cases that exist.
    for (n, _) in INEXPRESSIBLE {
        assert!(names.iter().any(|c| c == n), "{n} is not an upstream case");
    }
    assert_eq!(matched.len() + INEXPRESSIBLE.len(), names.len());
    assert_eq!(names.len(), 28, "upstream's 28 goldens");
    eprintln!(
        "{} of {} upstream nftables cases match",
        matched.len(),
        names.len()
    );
}

/// Pod level: every pod of the iptables conformance set (`istio-plugin/`) gets the same
/// decision under `native_nftables` as under iptables, and a meshed one a transaction in
/// upstream's shape (the nat table first, added then flushed; one `counter` per rule).
#[test]
fn every_conformance_pod_renders_under_nftables() {
    use istio_cni::config::NetConf;
    use istio_cni::plan::{plan_for_pod, plan_nft_for_pod, Plan};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/istio-plugin");
    let mut netconf: Value =
        serde_json::from_slice(&std::fs::read(dir.join("netconf.json")).unwrap()).unwrap();
    let ipt = NetConf::parse(netconf.to_string().as_bytes()).unwrap();
    netconf["native_nftables"] = Value::Bool(true);
    let nft = NetConf::parse(netconf.to_string().as_bytes()).unwrap();
    assert!(nft.native_nftables);
    let mut rendered = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".pod.json") {
            continue;
        }
        let pod = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        match (plan_for_pod(&ipt, &pod), plan_nft_for_pod(&nft, &pod)) {
            (Ok(Plan::Skip(a)), Ok(Plan::Skip(b))) => assert_eq!(a, b),
            (Ok(Plan::Redirect(a)), Ok(Plan::Redirect(b))) => {
                let text = b.transaction();
                let lines: Vec<&str> = text.lines().collect();
                assert_eq!(
                    lines[..2],
                    [
                        "add table inet istio-proxy-nat",
                        "flush table inet istio-proxy-nat"
                    ],
                    "{}",
                    path.display()
                );
                for rule in lines.iter().filter(|l| l.contains(" rule ")) {
                    assert_eq!(rule.matches(" counter").count(), 1, "{rule}");
                }
                istio_cni::rules::nft_compile::compile(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(
                    (a.proxy_uid, a.probe_port, a.local_delivery.is_some()),
                    (b.proxy_uid, b.probe_port, b.local_delivery.is_some())
                );
                rendered += 1;
            }
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            (a, b) => panic!("{}: iptables {a:?} but nftables {b:?}", path.display()),
        }
    }
    assert!(rendered >= 5, "{rendered} meshed pods");
}
