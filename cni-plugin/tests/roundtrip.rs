//! Property: for any valid pod settings, the rules ADD generates survive a real
//! `iptables-restore` / `iptables-save` round trip in a scratch netns and read back as
//! written (both families), through the same `program` that ADD runs. A handful of cases
//! per run, since each one writes real rules. Needs root and iptables.

use istio_cni::apply::Xtables;
use istio_cni::config::NetConf;
use istio_cni::plan::{plan_for_pod, Plan};
use istio_cni::scratch::ScratchNetns;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn port_list() -> impl Strategy<Value = String> {
    prop::collection::vec(1u16..=65535, 1..4).prop_map(|ps| {
        ps.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    })
}

fn cidr_list() -> impl Strategy<Value = String> {
    let v4 = (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| {
        let net = ipnet::Ipv4Net::new(a.into(), p).unwrap().trunc();
        net.to_string()
    });
    let v6 = (any::<[u16; 8]>(), 0u8..=128).prop_map(|(a, p)| {
        let net = ipnet::Ipv6Net::new(a.into(), p).unwrap().trunc();
        net.to_string()
    });
    prop::collection::vec(prop_oneof![v4, v6], 1..4).prop_map(|v| v.join(","))
}

fn interfaces() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z][a-z0-9]{0,6}\\+?", 1..3).prop_map(|v| v.join(","))
}

/// Valid annotations, each present or not, plus proxy env switches.
fn settings() -> impl Strategy<Value = (Map<String, Value>, Vec<Value>)> {
    let ann = (
        prop::option::of(prop_oneof![Just("REDIRECT"), Just("TPROXY")]),
        prop::option::of(prop_oneof![Just("*".to_owned()), cidr_list()]),
        prop::option::of(cidr_list()),
        prop::option::of(prop_oneof![Just("*".to_owned()), port_list()]),
        prop::option::of(port_list()),
        prop::option::of(port_list()),
        prop::option::of(port_list()),
        prop::option::of(interfaces()),
        prop::option::of(interfaces()),
    );
    let env = (any::<bool>(), any::<bool>());
    (ann, env).prop_map(
        |((mode, inc_ip, exc_ip, inc_in, exc_in, inc_out, exc_out, exc_if, vif), (dns, drop))| {
            let mut m = Map::new();
            m.insert("sidecar.istio.io/status".into(), json!("{}"));
            let pairs = [
                ("sidecar.istio.io/interceptionMode", mode.map(str::to_owned)),
                ("traffic.sidecar.istio.io/includeOutboundIPRanges", inc_ip),
                ("traffic.sidecar.istio.io/excludeOutboundIPRanges", exc_ip),
                ("traffic.sidecar.istio.io/includeInboundPorts", inc_in),
                ("traffic.sidecar.istio.io/excludeInboundPorts", exc_in),
                ("traffic.sidecar.istio.io/includeOutboundPorts", inc_out),
                ("traffic.sidecar.istio.io/excludeOutboundPorts", exc_out),
                ("traffic.sidecar.istio.io/excludeInterfaces", exc_if),
                ("istio.io/reroute-virtual-interfaces", vif),
            ];
            for (k, v) in pairs {
                if let Some(v) = v {
                    m.insert(k.into(), json!(v));
                }
            }
            let env = vec![
                json!({"name": "ISTIO_META_DNS_CAPTURE", "value": dns.to_string()}),
                json!({"name": "INVALID_DROP", "value": drop.to_string()}),
            ];
            (m, env)
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn generated_rules_read_back_as_written((annotations, env) in settings()) {
        let pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "annotations": annotations},
            "spec": {"containers": [{"name": "istio-proxy", "args": ["proxy", "sidecar"],
                                     "env": env}]}
        }))
        .unwrap();
        // An IPv6 address in prevResult: rules for both families.
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"10.1.0.2/24"},{"address":"fd01::2/64"}]}}"#,
        )
        .unwrap();
        let Plan::Redirect(ruleset) = plan_for_pod(&conf, &pod).unwrap() else {
            panic!("a meshed pod")
        };
        let xt = Xtables::detect().unwrap();
        let scratch = ScratchNetns::create().unwrap();
        let outcome = scratch
            .netns()
            .run(|inside| istio_cni::plugin::program(inside, &xt, &ruleset, None))
            .unwrap();
        prop_assert!(outcome.is_ok(), "{annotations:?}: {}", outcome.unwrap_err());
    }
}
