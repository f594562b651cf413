//! The ADD result of a chained plugin: `prevResult` passed through, converted to the
//! requested version (CNI spec 1.1.0, "Chained plugins" and "Success" result type).

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Map, Value};

use super::version::CniVersion;

/// Turns the incoming `prevResult` into this plugin's ADD result of version `version`.
///
/// Every field is kept as it came (key order included); only what differs between result
/// versions changes: `cniVersion` is set to `version`, and each `ips[]` entry gains the
/// `version` field ("4"/"6", derived from its address) for versions before 1.0.0, or loses
/// it from 1.0.0 on. With no `prevResult`, the result is the empty result of `version`.
pub fn chained_result(prev: Option<&Value>, version: CniVersion) -> Value {
    let mut out = match prev {
        Some(Value::Object(map)) => map.clone(),
        _ => {
            let mut m = Map::new();
            m.insert("cniVersion".into(), Value::Null);
            m.insert("ips".into(), json!([]));
            m.insert("dns".into(), json!({}));
            m
        }
    };
    out.insert("cniVersion".into(), Value::String(version.to_string()));
    if let Some(Value::Array(ips)) = out.get_mut("ips") {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            if version.has_ip_version_field() {
                if let Some(family) = ip_family(ip) {
                    ip.insert("version".into(), Value::String(family.into()));
                }
            } else {
                ip.remove("version");
            }
        }
    }
    Value::Object(out)
}

fn ip_family(ip: &Map<String, Value>) -> Option<&'static str> {
    let net: IpNet = ip.get("address")?.as_str()?.parse().ok()?;
    Some(match net {
        IpNet::V4(_) => "4",
        IpNet::V6(_) => "6",
    })
}

/// The pod's addresses listed in a `prevResult` (`ips[].address`, CIDR form), in order.
/// Entries that do not parse are skipped: the result is not ours to validate.
pub fn pod_ips(prev: Option<&Value>) -> Vec<IpAddr> {
    pod_nets(prev).iter().map(IpNet::addr).collect()
}

/// The pod's networks listed in a `prevResult` (`ips[].address` with their prefix), in
/// order; entries that do not parse are skipped, as in [`pod_ips`].
pub fn pod_nets(prev: Option<&Value>) -> Vec<IpNet> {
    prev.and_then(|p| p.get("ips"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str()?.parse::<IpNet>().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prev_v1() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
            "ips": [
                {"address": "10.0.0.2/24", "gateway": "10.0.0.1", "interface": 0},
                {"address": "fd00::2/64", "interface": 0}
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.96.0.10"]},
            "custom": {"kept": true}
        })
    }

    #[test]
    fn passes_through_and_downgrades() {
        let out = chained_result(Some(&prev_v1()), CniVersion::V0_3_1);
        assert_eq!(out["cniVersion"], "0.3.1");
        assert_eq!(out["ips"][0]["version"], "4");
        assert_eq!(out["ips"][1]["version"], "6");
        assert_eq!(out["custom"], json!({"kept": true}));
        assert_eq!(out["routes"], prev_v1()["routes"]);
        let keys: Vec<_> = out.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            ["cniVersion", "interfaces", "ips", "routes", "dns", "custom"]
        );
    }

    #[test]
    fn upgrades_by_dropping_ip_version() {
        let mut prev = chained_result(Some(&prev_v1()), CniVersion::V0_4_0);
        prev["cniVersion"] = "0.4.0".into();
        let out = chained_result(Some(&prev), CniVersion::V1_1_0);
        assert_eq!(out["cniVersion"], "1.1.0");
        assert!(out["ips"][0].get("version").is_none());
        assert_eq!(out["ips"][0]["gateway"], "10.0.0.1");
    }

    #[test]
    fn empty_result_without_prev() {
        let out = chained_result(None, CniVersion::V1_0_0);
        assert_eq!(out, json!({"cniVersion": "1.0.0", "ips": [], "dns": {}}));
    }

    #[test]
    fn pod_ips_from_prev() {
        let ips = pod_ips(Some(&prev_v1()));
        assert_eq!(
            ips,
            [
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        assert!(pod_ips(Some(&json!({"ips": [{"address": "junk"}]}))).is_empty());
        assert!(pod_ips(None).is_empty());
    }
}
