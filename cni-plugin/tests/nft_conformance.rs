//! The nftables transaction must equal upstream Istio's for the same input: every case of
//! `tests/conformance/istio-nftables/` (upstream's 28 goldens and their inputs,
//! byte-identical, see its `SOURCE.md`) that the plugin's configuration can express is
//! turned into a `Redirect` and built; the output must match the golden line for line.
//! The cases it cannot express are listed in [`INEXPRESSIBLE`] with the reason, and the
//! test fails if that list and the cases disagree in either direction.

use std::path::PathBuf;

use ipnet::IpNet;
use istio_cni::redirect::{InterceptionMode, InterfaceName, IpRanges, PortSet, Redirect};
use istio_cni::rules::nftables;
use serde_json::{Map, Value};

/// Cases whose configuration the CNI plugin never produces, and why.
const INEXPRESSIBLE: &[(&str, &str)] = &[
    (
        "ip-range",
        "several proxy UIDs and GIDs (\"3,4\", \"1,2\") and a DNS server list",
    ),
    (
        "tproxy",
        "DNS capture limited to a server list (CaptureAllDNS off); the plugin captures all DNS",
    ),
    ("ipv6-uid-gid", "several proxy UIDs and GIDs"),
    (
        "dns-uid-gid",
        "several proxy UIDs and GIDs, and DNS server lists",
    ),
    (
        "ipv6-dns-uid-gid",
        "several proxy UIDs and GIDs, and RedirectDNS without CaptureAllDNS",
    ),
    (
        "outbound-owner-groups",
        "owner-group filters (OwnerGroupsInclude)",
    ),
    (
        "outbound-owner-groups-exclude",
        "owner-group filters (OwnerGroupsExclude)",
    ),
    (
        "ipv6-dns-outbound-owner-groups",
        "owner-group filters, and RedirectDNS without CaptureAllDNS",
    ),
    (
        "ipv6-dns-outbound-owner-groups-exclude",
        "owner-group filters, and RedirectDNS without CaptureAllDNS",
    ),
    (
        "loopback-outbound-iprange",
        "several proxy UIDs and GIDs, and a DNS server list",
    ),
    (
        "host-ipv4-loopback-cidr",
        "a host loopback other than 127.0.0.1/32 (HostIPv4LoopbackCidr)",
    ),
];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/istio-nftables")
}

/// Upstream's `config.Split`: comma-separated, blanks dropped.
fn split(v: &Value) -> Vec<String> {
    v.as_str()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn ports(v: &Value) -> Vec<u16> {
    split(v).iter().map(|p| p.parse().unwrap()).collect()
}

fn nets(v: &Value) -> Vec<IpNet> {
    split(v).iter().map(|n| n.parse().unwrap()).collect()
}

fn interfaces(v: &Value) -> Vec<InterfaceName> {
    split(v)
        .iter()
        .map(|i| InterfaceName::parse(i).unwrap())
        .collect()
}

/// The `Redirect` (and `EnableIPv6`) of a case's configuration: upstream's fields as the
/// plugin maps them (`cni/pkg/plugin/sidecar_nftables_linux.go`).
fn redirect_of(cfg: &Map<String, Value>) -> (Redirect, bool) {
    let get = |k: &str| cfg.get(k).cloned().unwrap_or(Value::Null);
    let id = |k: &str| get(k).as_str().unwrap().parse::<u32>().unwrap();
    let include_ports = get("InboundPortsInclude");
    let include_ranges = get("OutboundIPRangesInclude");
    let redirect = Redirect {
        mode: if get("InboundInterceptionMode") == "TPROXY" {
            InterceptionMode::Tproxy
        } else {
            InterceptionMode::Redirect
        },
        proxy_uid: id("ProxyUID"),
        proxy_gid: id("ProxyGID"),
        include_outbound_ip_ranges: if include_ranges.as_str() == Some("*") {
            IpRanges::All
        } else {
            IpRanges::List(nets(&include_ranges))
        },
        exclude_outbound_ip_ranges: nets(&get("OutboundIPRangesExclude")),
        include_inbound_ports: if include_ports.as_str() == Some("*") {
            PortSet::All
        } else {
            PortSet::List(ports(&include_ports))
        },
        exclude_inbound_ports: ports(&get("InboundPortsExclude")),
        include_outbound_ports: ports(&get("OutboundPortsInclude")),
        exclude_outbound_ports: ports(&get("OutboundPortsExclude")),
        exclude_interfaces: interfaces(&get("ExcludeInterfaces")),
        reroute_virtual_interfaces: interfaces(&get("RerouteVirtualInterfaces")),
        dns_capture: get("RedirectDNS") == true,
        dual_stack: false,
        invalid_drop: get("DropInvalid") == true,
    };
    (redirect, get("EnableIPv6") == true)
}

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
                assert_eq!(
                    (a.proxy_uid, a.probe_port, a.tproxy_routing),
                    (b.proxy_uid, b.probe_port, b.tproxy_routing)
                );
                rendered += 1;
            }
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            (a, b) => panic!("{}: iptables {a:?} but nftables {b:?}", path.display()),
        }
    }
    assert!(rendered >= 5, "{rendered} meshed pods");
}
