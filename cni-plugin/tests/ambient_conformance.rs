//! Ambient mode's rules must equal upstream Istio's for the same inputs: every golden of
//! `tests/conformance/istio-ambient/` (upstream's 28, byte-identical, see its `SOURCE.md`)
//! is rebuilt from the inputs upstream's test gave it, stated below under upstream's names.
//!
//! - iptables: the golden minus upstream's harness lines (`iptables-save`, `ip6tables-save`)
//!   is the `iptables-restore` input, IPv4 then IPv6; ours must equal it exactly.
//! - nftables: the golden is the transaction; ours must equal it line for line (and byte
//!   for byte).
//!
//! The golden directories are listed: a missing or an extra golden fails the test.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use istio_cni::redirect::InterfaceName;
use istio_cni::rules::ambient::{
    iptables, nftables, DnsOverride, NodeSettings, PodOverrides, ANNOT_BYPASS_INBOUND_CAPTURE,
    ANNOT_DNS_CAPTURE, ANNOT_REROUTE_VIRTUAL_INTERFACES,
};

/// `HostProbeSNATAddress` of upstream's `constructTestConfig` (both backends'
/// `*_test.go`), the default address too.
const TEST_HOST_PROBE_SNAT_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// `HostProbeV6SNATAddress` of upstream's `constructTestConfig`. Not the default
/// (`fd16:9254:7127:1337:ffff:ffff:ffff:ffff`): upstream's tests use this arbitrary address
/// for every in-pod case of both backends, and for the nftables host case, which does not
/// override it.
const TEST_HOST_PROBE_V6_SNAT_ADDRESS: Ipv6Addr = Ipv6Addr::new(
    0xe9ac, 0x1e77, 0x90ca, 0x399f, 0x4d6d, 0xece2, 0x2f9b, 0x3164,
);
/// `HostProbeV6SNATAddress` as upstream's `TestIptablesHostRules` (iptables only) sets it
/// for the host case, over `constructTestConfig`'s: the default address. Its nftables
/// twin, `TestNftablesHostRules`, does not, so the two `hostprobe_ipv6` goldens SNAT IPv6
/// probes to different addresses.
const IPTABLES_HOST_TEST_V6_SNAT_ADDRESS: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);
/// `HostProbeSNATAddress` as `TestIptablesHostRules` sets it: the same as
/// `constructTestConfig`'s.
const IPTABLES_HOST_TEST_SNAT_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// The kubelet UID of the nftables host case: `TestNftablesHostRules` replaces upstream's
/// `kubeletUIDProvider` (which reads `/proc`) with one returning `"1000"`. iptables needs
/// none (it matches `-m owner --socket-exists`).
const NFT_HOST_TEST_KUBELET_UID: u32 = 1000;

/// One case of upstream's `GetCommonInPodTestCases` (`cni/pkg/iptables/common_test.go`,
/// identical in `cni/pkg/nftables/common_test.go`), on top of `constructTestConfig`.
struct InPodCase {
    /// The test case's `name`, and the golden's name (plus `_ipv6` with `EnableIPv6`).
    name: &'static str,
    /// `cfg.RedirectDNS`, as the case's `config` function leaves it (`false` unless set).
    redirect_dns: bool,
    /// `podOverrides.IngressMode`.
    ingress_mode: bool,
    /// `podOverrides.VirtualInterfaces`.
    virtual_interfaces: &'static [&'static str],
    /// `podOverrides.DNSProxy` (`PodDNSUnset`, `PodDNSEnabled`, `PodDNSDisabled`).
    dns_proxy: DnsOverride,
    /// Pod annotations that give the same `podOverrides` (upstream's test supplies the
    /// overrides directly; this checks our parser reaches them).
    annotations: &'static [(&'static str, &'static str)],
}

const IN_POD_CASES: [InPodCase; 6] = [
    InPodCase {
        name: "default",
        redirect_dns: true,
        ingress_mode: false,
        virtual_interfaces: &[],
        dns_proxy: DnsOverride::Unset,
        annotations: &[],
    },
    InPodCase {
        name: "ingress",
        redirect_dns: false,
        ingress_mode: true,
        virtual_interfaces: &[],
        dns_proxy: DnsOverride::Unset,
        annotations: &[(ANNOT_BYPASS_INBOUND_CAPTURE, "true")],
    },
    InPodCase {
        name: "virtual_interfaces",
        redirect_dns: false,
        ingress_mode: false,
        virtual_interfaces: &["fake1s0f0", "fake1s0f1"],
        dns_proxy: DnsOverride::Unset,
        annotations: &[(ANNOT_REROUTE_VIRTUAL_INTERFACES, "fake1s0f0,fake1s0f1")],
    },
    InPodCase {
        name: "ingress_and_virtual_interfaces",
        redirect_dns: false,
        ingress_mode: true,
        virtual_interfaces: &["fake1s0f0", "fake1s0f1"],
        dns_proxy: DnsOverride::Unset,
        annotations: &[
            (ANNOT_BYPASS_INBOUND_CAPTURE, "true"),
            (ANNOT_REROUTE_VIRTUAL_INTERFACES, "fake1s0f0, fake1s0f1"),
        ],
    },
    InPodCase {
        name: "dns_pod_enabled_and_off_globally",
        redirect_dns: false,
        ingress_mode: false,
        virtual_interfaces: &[],
        dns_proxy: DnsOverride::Enabled,
        annotations: &[(ANNOT_DNS_CAPTURE, "true")],
    },
    InPodCase {
        name: "dns_pod_disabled_and_on_globally",
        redirect_dns: true,
        ingress_mode: false,
        virtual_interfaces: &[],
        dns_proxy: DnsOverride::Disabled,
        annotations: &[(ANNOT_DNS_CAPTURE, "false")],
    },
];

/// The one case of upstream's `GetCommonHostTestCases`: `hostprobe`, whose `config` sets
/// `RedirectDNS` (which the host rules do not read).
const HOST_CASE: &str = "hostprobe";
const HOST_CASE_REDIRECT_DNS: bool = true;

impl InPodCase {
    /// `constructTestConfig`, `EnableIPv6`, then the case's `config`.
    fn node(&self, enable_ipv6: bool) -> NodeSettings {
        NodeSettings {
            redirect_dns: self.redirect_dns,
            ipv6: enable_ipv6,
            host_probe_snat_v4: TEST_HOST_PROBE_SNAT_ADDRESS,
            host_probe_snat_v6: TEST_HOST_PROBE_V6_SNAT_ADDRESS,
        }
    }

    fn overrides(&self) -> PodOverrides {
        PodOverrides {
            ingress_mode: self.ingress_mode,
            dns: self.dns_proxy,
            virtual_interfaces: self
                .virtual_interfaces
                .iter()
                .map(|n| InterfaceName::parse(n).unwrap())
                .collect(),
        }
    }
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/istio-ambient")
}

/// Every golden name each backend must have: each case without and with IPv6.
fn expected_goldens() -> BTreeSet<String> {
    IN_POD_CASES
        .iter()
        .map(|c| c.name)
        .chain([HOST_CASE])
        .flat_map(|n| [format!("{n}.golden"), format!("{n}_ipv6.golden")])
        .collect()
}

fn golden_name(case: &str, enable_ipv6: bool) -> String {
    if enable_ipv6 {
        format!("{case}_ipv6.golden")
    } else {
        format!("{case}.golden")
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn list(path: &Path) -> BTreeSet<String> {
    std::fs::read_dir(path)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", path.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

#[test]
fn the_golden_directories_hold_exactly_the_expected_goldens() {
    let expected = expected_goldens();
    assert_eq!(expected.len(), 14, "7 cases, each without and with IPv6");
    assert_eq!(
        list(&dir()),
        ["SOURCE.md", "iptables", "nftables"]
            .map(String::from)
            .into(),
        "{}",
        dir().display()
    );
    for backend in ["iptables", "nftables"] {
        let found = list(&dir().join(backend));
        let missing: Vec<_> = expected.difference(&found).collect();
        let extra: Vec<_> = found.difference(&expected).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{backend}: missing goldens {missing:?}, unexpected files {extra:?}"
        );
    }
}

/// The restore input of an iptables golden: upstream's harness lines (the state check's
/// `iptables-save` and `ip6tables-save`) must be exactly those two, and are dropped.
fn restore_input(golden: &str) -> &str {
    let start = golden
        .find("\n* ")
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("no `* table` line in\n{golden}"));
    let harness: Vec<&str> = golden[..start].lines().collect();
    assert_eq!(
        harness,
        ["iptables-save", "ip6tables-save"],
        "harness lines"
    );
    &golden[start..]
}

/// Our restore input as upstream's stub records it: IPv4's then IPv6's, joined, with no
/// trailing newline.
fn our_restore_input(rules: &iptables::AmbientIptables) -> String {
    let text: String = rules.families().iter().map(|f| f.restore_text()).collect();
    text.strip_suffix('\n').unwrap_or(&text).to_owned()
}

#[test]
fn every_iptables_golden_matches_upstreams_restore_input() {
    let mut matched = BTreeSet::new();
    let mut failures = Vec::new();
    for enable_ipv6 in [false, true] {
        let mut check = |name: String, got: String| {
            let golden = read(&dir().join("iptables").join(&name));
            let want = restore_input(&golden);
            if got == want {
                matched.insert(name);
            } else {
                failures.push(format!("--- {name}: want\n{want}\n--- got\n{got}"));
            }
        };
        for case in &IN_POD_CASES {
            let rules = iptables::build_inpod(&case.node(enable_ipv6), &case.overrides());
            check(
                golden_name(case.name, enable_ipv6),
                our_restore_input(&rules),
            );
        }
        // `TestIptablesHostRules`: `constructTestConfig`, `EnableIPv6`, both SNAT addresses
        // set explicitly, then the case's `config`.
        let node = NodeSettings {
            redirect_dns: HOST_CASE_REDIRECT_DNS,
            ipv6: enable_ipv6,
            host_probe_snat_v4: IPTABLES_HOST_TEST_SNAT_ADDRESS,
            host_probe_snat_v6: IPTABLES_HOST_TEST_V6_SNAT_ADDRESS,
        };
        let rules = iptables::build_host_probe(&node);
        check(
            golden_name(HOST_CASE, enable_ipv6),
            our_restore_input(&rules),
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(matched, expected_goldens(), "every iptables golden matched");
}

#[test]
fn every_nftables_golden_matches_upstreams_transaction() {
    let mut matched = BTreeSet::new();
    let mut failures = Vec::new();
    for enable_ipv6 in [false, true] {
        let mut check = |name: String, got: String| {
            let want = read(&dir().join("nftables").join(&name));
            if got.lines().eq(want.lines()) && got == want {
                matched.insert(name);
            } else {
                failures.push(format!("--- {name}: want\n{want}--- got\n{got}"));
            }
        };
        for case in &IN_POD_CASES {
            let rules = nftables::build_inpod(&case.node(enable_ipv6), &case.overrides());
            check(golden_name(case.name, enable_ipv6), rules.transaction());
        }
        // `TestNftablesHostRules`: `constructTestConfig` (so the IPv6 SNAT address is
        // `TEST_HOST_PROBE_V6_SNAT_ADDRESS`, unlike the iptables host case), `EnableIPv6`,
        // the case's `config`, and the mocked kubelet UID.
        let node = NodeSettings {
            redirect_dns: HOST_CASE_REDIRECT_DNS,
            ipv6: enable_ipv6,
            host_probe_snat_v4: TEST_HOST_PROBE_SNAT_ADDRESS,
            host_probe_snat_v6: TEST_HOST_PROBE_V6_SNAT_ADDRESS,
        };
        let rules = nftables::build_host_probe(&node, NFT_HOST_TEST_KUBELET_UID);
        check(golden_name(HOST_CASE, enable_ipv6), rules.transaction());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(matched, expected_goldens(), "every nftables golden matched");
}

/// The pod annotations each case stands for parse into exactly the case's `podOverrides`.
#[test]
fn the_cases_annotations_parse_into_their_overrides() {
    for case in &IN_POD_CASES {
        let annotations = case
            .annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            PodOverrides::from_annotations(&annotations).unwrap(),
            case.overrides(),
            "{}",
            case.name
        );
    }
}
