//! The inputs of upstream's nftables conformance cases
//! (`tests/conformance/istio-nftables/cases.json`) as the plugin's `Redirect`, shared by
//! the conformance and read-back tests.

#![allow(dead_code)]

use std::path::PathBuf;

use ipnet::IpNet;
use istio_cni::redirect::{InterceptionMode, InterfaceName, IpRanges, PortSet, Redirect};
use serde_json::{Map, Value};

/// Cases whose configuration the CNI plugin never produces, and why.
pub const INEXPRESSIBLE: &[(&str, &str)] = &[
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

pub fn dir() -> PathBuf {
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
pub fn redirect_of(cfg: &Map<String, Value>) -> (Redirect, bool) {
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

/// Every expressible case: its name, `Redirect` and `EnableIPv6`.
pub fn expressible() -> Vec<(String, Redirect, bool)> {
    let cases: Value =
        serde_json::from_slice(&std::fs::read(dir().join("cases.json")).unwrap()).unwrap();
    let defaults = cases["defaults"].as_object().unwrap();
    let mut out = Vec::new();
    for (name, fields) in cases["cases"].as_object().unwrap() {
        if INEXPRESSIBLE.iter().any(|(n, _)| n == name) {
            continue;
        }
        let mut cfg = defaults.clone();
        for (k, v) in fields.as_object().unwrap() {
            cfg.insert(k.clone(), v.clone());
        }
        let (redirect, ipv6) = redirect_of(&cfg);
        out.push((name.clone(), redirect, ipv6));
    }
    out
}
