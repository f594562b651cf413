//! A pod's ambient-mode annotations → [`PodOverrides`], strictly: a value that is not one
//! the annotation takes is an error naming the annotation and the value, never ignored.
//!
//! Upstream reads the same three annotations in `getPodLevelTrafficOverrides`
//! (`cni/pkg/nodeagent/net.go`), with the booleans parsed by Go's `strconv.ParseBool`
//! (`CheckBooleanAnnotation`, `cni/pkg/util/podutil.go`). Upstream ignores a bad boolean
//! (with a warning) and takes any text as an interface name; here both are errors, and an
//! interface name must be one the kernel and iptables accept ([`InterfaceName`]).

use std::collections::BTreeMap;

use crate::pod::parse_go_bool;
use crate::redirect::InterfaceName;

/// Annotation: a Go boolean; `true` disables inbound capture for the pod ("ingress mode",
/// for workloads that receive only traffic from outside the mesh); outbound is still
/// captured. istio/api: `AmbientBypassInboundCapture`.
pub const ANNOT_BYPASS_INBOUND_CAPTURE: &str = "ambient.istio.io/bypass-inbound-capture";
/// Annotation: a Go boolean; whether the pod's DNS (UDP and TCP port 53) is captured to
/// ztunnel's DNS proxy, whatever the node-wide setting. istio/api: `AmbientDnsCapture`.
pub const ANNOT_DNS_CAPTURE: &str = "ambient.istio.io/dns-capture";
/// Annotation: comma-separated interfaces whose inbound TCP is treated as outbound
/// (redirected to ztunnel's outbound port): kubeVirt, VMs, docker-in-docker. istio/api:
/// `IoIstioRerouteVirtualInterfaces`. Ambient mode reads only this name, not the sidecar's
/// deprecated alias `traffic.sidecar.istio.io/kubevirtInterfaces`.
pub const ANNOT_REROUTE_VIRTUAL_INTERFACES: &str =
    crate::redirect::ANNOT_REROUTE_VIRTUAL_INTERFACES;

/// Every annotation [`PodOverrides::from_annotations`] reads.
pub const ANNOTATIONS: [&str; 3] = [
    ANNOT_BYPASS_INBOUND_CAPTURE,
    ANNOT_DNS_CAPTURE,
    ANNOT_REROUTE_VIRTUAL_INTERFACES,
];

/// The pod's DNS capture setting (upstream `PodDNSOverride`, `cni/pkg/config/config.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DnsOverride {
    /// No `ambient.istio.io/dns-capture`: the node-wide setting applies
    /// (upstream `PodDNSUnset`).
    #[default]
    Unset,
    /// `ambient.istio.io/dns-capture: "true"` (upstream `PodDNSEnabled`).
    Enabled,
    /// `ambient.istio.io/dns-capture: "false"` (upstream `PodDNSDisabled`).
    Disabled,
}

/// What a pod's annotations change in its in-pod rules (upstream `PodLevelOverrides`,
/// `cni/pkg/config/config.go`). The default is a pod without any of [`ANNOTATIONS`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodOverrides {
    /// No inbound capture (upstream `IngressMode`), from [`ANNOT_BYPASS_INBOUND_CAPTURE`].
    pub ingress_mode: bool,
    /// DNS capture for this pod (upstream `DNSProxy`), from [`ANNOT_DNS_CAPTURE`].
    pub dns: DnsOverride,
    /// Interfaces whose inbound TCP goes to ztunnel's outbound port, in the annotation's
    /// order (upstream `VirtualInterfaces`), from [`ANNOT_REROUTE_VIRTUAL_INTERFACES`].
    pub virtual_interfaces: Vec<InterfaceName>,
}

/// An ambient-mode annotation whose value the annotation does not take.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OverrideError {
    /// A boolean annotation holds something other than Go's `strconv.ParseBool` values.
    #[error(
        "invalid value of annotation {annotation} ({value:?}): expected true or false \
         (also 1/0, t/f, T/F, TRUE/FALSE, True/False)"
    )]
    NotABool {
        /// The annotation, e.g. [`ANNOT_DNS_CAPTURE`].
        annotation: &'static str,
        /// Its whole value, as given.
        value: String,
    },
    /// An interface list names something that is not a valid interface name.
    #[error("invalid value of annotation {annotation} ({value:?}): {reason}")]
    BadInterface {
        /// The annotation, [`ANNOT_REROUTE_VIRTUAL_INTERFACES`].
        annotation: &'static str,
        /// Its whole value, as given.
        value: String,
        /// What is wrong, naming the bad name.
        reason: String,
    },
}

impl OverrideError {
    /// The annotation whose value was refused.
    pub fn annotation(&self) -> &'static str {
        match self {
            OverrideError::NotABool { annotation, .. }
            | OverrideError::BadInterface { annotation, .. } => annotation,
        }
    }

    /// The refused value, whole.
    pub fn value(&self) -> &str {
        match self {
            OverrideError::NotABool { value, .. } | OverrideError::BadInterface { value, .. } => {
                value
            }
        }
    }
}

impl PodOverrides {
    /// Reads a pod's overrides from its annotations (`metadata.annotations`); annotations
    /// other than [`ANNOTATIONS`] are ignored.
    ///
    /// - [`ANNOT_BYPASS_INBOUND_CAPTURE`], [`ANNOT_DNS_CAPTURE`]: `1 t T TRUE true True` or
    ///   `0 f F FALSE false False`, exactly (no surrounding spaces), as Go's
    ///   `strconv.ParseBool`.
    /// - [`ANNOT_REROUTE_VIRTUAL_INTERFACES`]: names separated by `,`, each trimmed of
    ///   whitespace; empty entries are skipped (so an empty value means none), as upstream.
    ///   Each must be a valid [`InterfaceName`]. Duplicates are kept, as upstream.
    ///
    /// Errors: [`OverrideError::NotABool`] for a boolean annotation with another value
    /// (also empty), [`OverrideError::BadInterface`] for an invalid interface name.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
    ) -> Result<PodOverrides, OverrideError> {
        let ingress_mode = boolean(annotations, ANNOT_BYPASS_INBOUND_CAPTURE)?.unwrap_or(false);
        let dns = match boolean(annotations, ANNOT_DNS_CAPTURE)? {
            None => DnsOverride::Unset,
            Some(true) => DnsOverride::Enabled,
            Some(false) => DnsOverride::Disabled,
        };
        let virtual_interfaces = match annotations.get(ANNOT_REROUTE_VIRTUAL_INTERFACES) {
            None => Vec::new(),
            Some(value) => value
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| {
                    InterfaceName::parse(t).map_err(|reason| OverrideError::BadInterface {
                        annotation: ANNOT_REROUTE_VIRTUAL_INTERFACES,
                        value: value.clone(),
                        reason,
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(PodOverrides {
            ingress_mode,
            dns,
            virtual_interfaces,
        })
    }
}

/// A boolean annotation: `None` when absent.
fn boolean(
    annotations: &BTreeMap<String, String>,
    annotation: &'static str,
) -> Result<Option<bool>, OverrideError> {
    let Some(value) = annotations.get(annotation) else {
        return Ok(None);
    };
    parse_go_bool(value)
        .map(Some)
        .ok_or_else(|| OverrideError::NotABool {
            annotation,
            value: value.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<PodOverrides, OverrideError> {
        let a = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PodOverrides::from_annotations(&a)
    }

    fn names(o: &PodOverrides) -> Vec<&str> {
        o.virtual_interfaces
            .iter()
            .map(InterfaceName::as_str)
            .collect()
    }

    #[test]
    fn no_annotations_override_nothing() {
        assert_eq!(parse(&[]).unwrap(), PodOverrides::default());
        // Other annotations, including the sidecar's alias of the interface list, are not
        // read in ambient mode (upstream reads only istio.io/reroute-virtual-interfaces).
        let o = parse(&[
            ("traffic.sidecar.istio.io/kubevirtInterfaces", "eth9"),
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
        ])
        .unwrap();
        assert_eq!(o, PodOverrides::default());
    }

    #[test]
    fn bypass_inbound_capture_takes_go_booleans() {
        for v in ["1", "t", "T", "TRUE", "true", "True"] {
            let o = parse(&[(ANNOT_BYPASS_INBOUND_CAPTURE, v)]).unwrap();
            assert!(o.ingress_mode, "{v}");
            assert_eq!(o.dns, DnsOverride::Unset);
        }
        for v in ["0", "f", "F", "FALSE", "false", "False"] {
            let o = parse(&[(ANNOT_BYPASS_INBOUND_CAPTURE, v)]).unwrap();
            assert_eq!(o, PodOverrides::default(), "{v}");
        }
    }

    #[test]
    fn dns_capture_is_three_valued() {
        let dns = |v| parse(&[(ANNOT_DNS_CAPTURE, v)]).unwrap().dns;
        assert_eq!(dns("true"), DnsOverride::Enabled);
        assert_eq!(dns("1"), DnsOverride::Enabled);
        assert_eq!(dns("false"), DnsOverride::Disabled);
        assert_eq!(dns("F"), DnsOverride::Disabled);
        assert_eq!(parse(&[]).unwrap().dns, DnsOverride::Unset);
    }

    #[test]
    fn the_pod_setting_wins_over_the_node_setting() {
        use super::super::NodeSettings;
        for node_dns in [false, true] {
            let node = NodeSettings::new(node_dns, false);
            let pod = |dns| PodOverrides {
                dns,
                ..PodOverrides::default()
            };
            assert_eq!(node.dns_capture_for(&pod(DnsOverride::Unset)), node_dns);
            assert!(node.dns_capture_for(&pod(DnsOverride::Enabled)));
            assert!(!node.dns_capture_for(&pod(DnsOverride::Disabled)));
        }
    }

    #[test]
    fn bad_booleans_name_the_annotation_and_the_value() {
        for annotation in [ANNOT_BYPASS_INBOUND_CAPTURE, ANNOT_DNS_CAPTURE] {
            // Upstream's own "various manglings" values, and near misses of Go's set.
            for v in [
                "tweedledum",
                "",
                " true",
                "true ",
                "yes",
                "on",
                "tRUE",
                "2",
                "-1",
            ] {
                let e = parse(&[(annotation, v)]).unwrap_err();
                assert_eq!(
                    e,
                    OverrideError::NotABool {
                        annotation,
                        value: v.to_owned()
                    }
                );
                assert_eq!((e.annotation(), e.value()), (annotation, v));
                let msg = e.to_string();
                assert!(msg.contains(annotation), "{msg}");
                assert!(msg.contains(&format!("{v:?}")), "{msg}");
            }
        }
    }

    #[test]
    fn virtual_interfaces_are_trimmed_and_kept_in_order() {
        // Upstream's test value.
        let o = parse(&[(ANNOT_REROUTE_VIRTUAL_INTERFACES, "en0ps1, en1ps1")]).unwrap();
        assert_eq!(names(&o), ["en0ps1", "en1ps1"]);
        assert!(!o.ingress_mode);
        let o = parse(&[(ANNOT_REROUTE_VIRTUAL_INTERFACES, " ,b0,, a0 ,\tb0\n,")]).unwrap();
        assert_eq!(names(&o), ["b0", "a0", "b0"]);
        for empty in ["", " ", ",", " , ,"] {
            let o = parse(&[(ANNOT_REROUTE_VIRTUAL_INTERFACES, empty)]).unwrap();
            assert!(o.virtual_interfaces.is_empty(), "{empty:?}");
        }
    }

    #[test]
    fn all_three_together() {
        // Upstream's "pod dns disabled, ingress mode enabled, two virt interfaces" case
        // (which, despite its name, enables DNS).
        let o = parse(&[
            (ANNOT_DNS_CAPTURE, "true"),
            (ANNOT_BYPASS_INBOUND_CAPTURE, "true"),
            (ANNOT_REROUTE_VIRTUAL_INTERFACES, "en0ps1, en1ps1"),
        ])
        .unwrap();
        assert!(o.ingress_mode);
        assert_eq!(o.dns, DnsOverride::Enabled);
        assert_eq!(names(&o), ["en0ps1", "en1ps1"]);
    }

    #[test]
    fn bad_interface_names_name_the_annotation_and_the_value() {
        for v in [
            // Upstream's "various manglings" value, which upstream accepts as a name.
            "asd^&&*$&*(#$&*(#&$*())),   ",
            "eth0,-j",
            "eth0 -j ACCEPT",
            "a\nflush ruleset",
            "toolonginterface0",
            "a/b",
            "x:1",
            "..",
            "n\u{e9}",
            "lo,\"q\"",
        ] {
            let e = parse(&[(ANNOT_REROUTE_VIRTUAL_INTERFACES, v)]).unwrap_err();
            let OverrideError::BadInterface {
                annotation,
                value,
                reason,
            } = &e
            else {
                panic!("{v:?}: {e:?}");
            };
            assert_eq!(*annotation, ANNOT_REROUTE_VIRTUAL_INTERFACES);
            assert_eq!(value, v);
            assert!(!reason.is_empty());
            assert!(e.to_string().contains(ANNOT_REROUTE_VIRTUAL_INTERFACES));
        }
    }

    #[test]
    fn the_first_bad_annotation_is_reported_and_nothing_else_is_returned() {
        let e = parse(&[
            (ANNOT_BYPASS_INBOUND_CAPTURE, "maybe"),
            (ANNOT_DNS_CAPTURE, "true"),
            (ANNOT_REROUTE_VIRTUAL_INTERFACES, "eth0"),
        ])
        .unwrap_err();
        assert_eq!(e.annotation(), ANNOT_BYPASS_INBOUND_CAPTURE);
        let e = parse(&[
            (ANNOT_DNS_CAPTURE, "true"),
            (ANNOT_REROUTE_VIRTUAL_INTERFACES, "ok0,bad!"),
        ])
        .unwrap_err();
        assert_eq!(e.annotation(), ANNOT_REROUTE_VIRTUAL_INTERFACES);
    }
}
