//! Pod annotations and proxy settings → [`Redirect`], the parameters of the sidecar
//! redirection. Pure and strict: every value is parsed into a typed form, so no annotation
//! text ever reaches the rule text unparsed, and a bad value is an error naming the
//! annotation and the bad token.
//!
//! Sources: Istio annotations `sidecar.istio.io/interceptionMode`,
//! `traffic.sidecar.istio.io/{include,exclude}{Outbound,Inbound}{IPRanges,Ports}`,
//! `traffic.sidecar.istio.io/excludeInterfaces`, `istio.io/reroute-virtual-interfaces`
//! (deprecated alias `traffic.sidecar.istio.io/kubevirtInterfaces`); defaults as in upstream
//! Istio's `cni/pkg/plugin/sidecar_redirect.go`.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;

use crate::pod::{parse_go_bool, MeshedPod};

/// Annotation: `REDIRECT` (default) or `TPROXY`.
pub const ANNOT_INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
/// Annotation: outbound CIDRs to capture, `*` (default) for all.
pub const ANNOT_INCLUDE_OUTBOUND_IP_RANGES: &str =
    "traffic.sidecar.istio.io/includeOutboundIPRanges";
/// Annotation: outbound CIDRs never captured.
pub const ANNOT_EXCLUDE_OUTBOUND_IP_RANGES: &str =
    "traffic.sidecar.istio.io/excludeOutboundIPRanges";
/// Annotation: inbound ports to capture, `*` (default) for all.
pub const ANNOT_INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
/// Annotation: inbound ports never captured (always plus 15020, 15021, 15090).
pub const ANNOT_EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
/// Annotation: outbound ports captured even when their destination is excluded.
pub const ANNOT_INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
/// Annotation: outbound ports never captured (default 15020).
pub const ANNOT_EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
/// Annotation: interfaces whose traffic is never captured.
pub const ANNOT_EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
/// Annotation: virtual interfaces whose inbound traffic is treated as outbound.
pub const ANNOT_REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
/// Deprecated alias of [`ANNOT_REROUTE_VIRTUAL_INTERFACES`], read only when that is absent.
pub const ANNOT_KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";

/// Proxy env: capture DNS (port 53) to the agent on 15053.
pub const ENV_DNS_CAPTURE: &str = "ISTIO_META_DNS_CAPTURE";
/// Proxy env: program IPv6 rules even when the pod has no IPv6 address.
pub const ENV_DUAL_STACK: &str = "ISTIO_DUAL_STACK";
/// Proxy env: drop packets conntrack marks INVALID instead of letting them reset connections.
pub const ENV_INVALID_DROP: &str = "INVALID_DROP";

/// Every annotation [`Redirect::from_pod`] reads (for tests and fuzzing).
pub const ANNOTATIONS: [&str; 10] = [
    ANNOT_INTERCEPTION_MODE,
    ANNOT_INCLUDE_OUTBOUND_IP_RANGES,
    ANNOT_EXCLUDE_OUTBOUND_IP_RANGES,
    ANNOT_INCLUDE_INBOUND_PORTS,
    ANNOT_EXCLUDE_INBOUND_PORTS,
    ANNOT_INCLUDE_OUTBOUND_PORTS,
    ANNOT_EXCLUDE_OUTBOUND_PORTS,
    ANNOT_EXCLUDE_INTERFACES,
    ANNOT_REROUTE_VIRTUAL_INTERFACES,
    ANNOT_KUBEVIRT_INTERFACES,
];
/// Every `istio-proxy` env var [`Redirect::from_pod`] reads.
pub const PROXY_ENV: [&str; 3] = [ENV_DNS_CAPTURE, ENV_DUAL_STACK, ENV_INVALID_DROP];

/// The proxy's UID and GID when `runAsUser`/`runAsGroup` are absent or 0.
pub const DEFAULT_PROXY_ID: u32 = 1337;
/// Inbound ports excluded from capture for every pod: status (15020), health (15021),
/// Prometheus (15090).
pub const ALWAYS_EXCLUDED_INBOUND_PORTS: [u16; 3] = [15020, 15021, 15090];
/// Default of `excludeOutboundPorts`: the status port.
pub const DEFAULT_EXCLUDED_OUTBOUND_PORTS: [u16; 1] = [15020];

/// How inbound traffic reaches the proxy (`sidecar.istio.io/interceptionMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InterceptionMode {
    /// NAT `REDIRECT` (default). The proxy sees 127.0.0.1 as the destination.
    #[default]
    Redirect,
    /// Mangle `TPROXY` plus policy routing; preserves the original source address.
    Tproxy,
}

/// A set of inbound ports: all (`*`) or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSet {
    /// `*`: every port.
    All,
    /// These ports, in annotation order. Empty means none.
    List(Vec<u16>),
}

/// A set of outbound destinations: all (`*`) or a list of CIDRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpRanges {
    /// `*`: every destination.
    All,
    /// These CIDRs, in annotation order. Empty means none.
    List(Vec<IpNet>),
}

/// A network interface name that satisfies the kernel's rules (`dev_valid_name` in
/// `net/core/dev.c`: 1 to 15 bytes, not `.` or `..`, no `/`, `:` or whitespace), does not
/// start with `-` (iptables would read it as an option: `-i -j` parses), and contains no
/// character that iptables-restore would read specially (quotes, `\`, `#`, `!`).
/// Non-ASCII names are refused as well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceName(String);

impl InterfaceName {
    /// Validates `name`.
    ///
    /// Errors: a reason naming the bad character or length.
    pub fn parse(name: &str) -> Result<InterfaceName, String> {
        if name.is_empty() {
            return Err("empty interface name".into());
        }
        if name.len() > 15 {
            return Err(format!("interface name {name:?} is longer than 15 bytes"));
        }
        if name == "." || name == ".." {
            return Err(format!("{name:?} is not a valid interface name"));
        }
        if name.starts_with('-') {
            return Err(format!(
                "interface name {name:?} starts with '-', which iptables reads as an option"
            ));
        }
        if let Some(c) = name.chars().find(|c| {
            !c.is_ascii_graphic() || matches!(c, '/' | ':' | '"' | '\'' | '\\' | '#' | '!')
        }) {
            return Err(format!("interface name {name:?} contains {c:?}"));
        }
        Ok(InterfaceName(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A pod setting that failed strict parsing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid value of {source_name} ({value:?}): {reason}")]
pub struct RedirectError {
    /// The annotation or proxy env var, e.g. `traffic.sidecar.istio.io/excludeInboundPorts`.
    pub source_name: String,
    /// The whole value as given.
    pub value: String,
    /// What is wrong, naming the bad token.
    pub reason: String,
}

/// The redirection parameters of one pod. Produced only by [`Redirect::from_pod`], so every
/// field is already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// REDIRECT or TPROXY.
    pub mode: InterceptionMode,
    /// The proxy's UID: its traffic is never captured.
    pub proxy_uid: u32,
    /// The proxy's GID: its traffic is never captured.
    pub proxy_gid: u32,
    /// Outbound destinations to capture.
    pub include_outbound_ip_ranges: IpRanges,
    /// Outbound destinations never captured.
    pub exclude_outbound_ip_ranges: Vec<IpNet>,
    /// Inbound ports to capture.
    pub include_inbound_ports: PortSet,
    /// Inbound ports never captured (deduplicated, always-excluded ports appended).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports always captured.
    pub include_outbound_ports: Vec<u16>,
    /// Outbound ports never captured.
    pub exclude_outbound_ports: Vec<u16>,
    /// Interfaces whose traffic is never captured.
    pub exclude_interfaces: Vec<InterfaceName>,
    /// Virtual interfaces whose inbound traffic is sent to the outbound listener.
    pub reroute_virtual_interfaces: Vec<InterfaceName>,
    /// Capture DNS (proxy env `ISTIO_META_DNS_CAPTURE`).
    pub dns_capture: bool,
    /// Program IPv6 rules regardless of the pod's addresses (proxy env `ISTIO_DUAL_STACK`).
    pub dual_stack: bool,
    /// Drop conntrack-INVALID packets (proxy env `INVALID_DROP`).
    pub invalid_drop: bool,
}

impl Redirect {
    /// Builds the redirect of a pod that the decision put in the mesh.
    ///
    /// Errors: [`RedirectError`] for the first annotation or proxy env var whose value does
    /// not parse.
    pub fn from_pod(pod: &MeshedPod) -> Result<Redirect, RedirectError> {
        let a = Annotations(&pod.annotations);
        let mode = match a.get(ANNOT_INTERCEPTION_MODE) {
            None => InterceptionMode::Redirect,
            Some("REDIRECT") => InterceptionMode::Redirect,
            Some("TPROXY") => InterceptionMode::Tproxy,
            Some(other) => {
                return Err(a.error(
                    ANNOT_INTERCEPTION_MODE,
                    format!("{other:?} is not REDIRECT or TPROXY"),
                ))
            }
        };
        let include_outbound_ip_ranges = match a.get(ANNOT_INCLUDE_OUTBOUND_IP_RANGES) {
            None => IpRanges::All,
            Some(v) if v.trim() == "*" => IpRanges::All,
            Some(_) => IpRanges::List(a.cidrs(ANNOT_INCLUDE_OUTBOUND_IP_RANGES)?),
        };
        let include_inbound_ports = match a.get(ANNOT_INCLUDE_INBOUND_PORTS) {
            None => PortSet::All,
            Some(v) if v.trim() == "*" => PortSet::All,
            Some(_) => PortSet::List(a.ports(ANNOT_INCLUDE_INBOUND_PORTS)?),
        };
        let mut exclude_inbound_ports = a.ports(ANNOT_EXCLUDE_INBOUND_PORTS)?;
        exclude_inbound_ports.extend(ALWAYS_EXCLUDED_INBOUND_PORTS);
        dedup_in_order(&mut exclude_inbound_ports);
        let exclude_outbound_ports = match a.get(ANNOT_EXCLUDE_OUTBOUND_PORTS) {
            None => DEFAULT_EXCLUDED_OUTBOUND_PORTS.to_vec(),
            Some(_) => a.ports(ANNOT_EXCLUDE_OUTBOUND_PORTS)?,
        };
        let reroute_key = if a.get(ANNOT_REROUTE_VIRTUAL_INTERFACES).is_some() {
            ANNOT_REROUTE_VIRTUAL_INTERFACES
        } else {
            ANNOT_KUBEVIRT_INTERFACES
        };
        Ok(Redirect {
            mode,
            proxy_uid: nonzero_or_default(pod.proxy_uid),
            proxy_gid: nonzero_or_default(pod.proxy_gid),
            include_outbound_ip_ranges,
            exclude_outbound_ip_ranges: a.cidrs(ANNOT_EXCLUDE_OUTBOUND_IP_RANGES)?,
            include_inbound_ports,
            exclude_inbound_ports,
            include_outbound_ports: a.ports(ANNOT_INCLUDE_OUTBOUND_PORTS)?,
            exclude_outbound_ports,
            exclude_interfaces: a.interfaces(ANNOT_EXCLUDE_INTERFACES)?,
            reroute_virtual_interfaces: a.interfaces(reroute_key)?,
            dns_capture: env_bool(pod, ENV_DNS_CAPTURE)?,
            dual_stack: env_bool(pod, ENV_DUAL_STACK)?,
            invalid_drop: env_bool(pod, ENV_INVALID_DROP)?,
        })
    }
}

fn nonzero_or_default(id: Option<i64>) -> u32 {
    match id {
        Some(id) if id > 0 && id <= i64::from(u32::MAX) => id as u32,
        _ => DEFAULT_PROXY_ID,
    }
}

fn dedup_in_order<T: PartialEq + Copy>(v: &mut Vec<T>) {
    let mut seen = Vec::with_capacity(v.len());
    v.retain(|x| {
        if seen.contains(x) {
            false
        } else {
            seen.push(*x);
            true
        }
    });
}

/// Parses a boolean the way Go's `strconv.ParseBool` does (upstream reads these env vars
/// with it), but fails on anything else instead of silently using false.
fn env_bool(pod: &MeshedPod, name: &str) -> Result<bool, RedirectError> {
    let Some(value) = pod.proxy_env.get(name) else {
        return Ok(false);
    };
    parse_go_bool(value).ok_or_else(|| RedirectError {
        source_name: format!("istio-proxy env {name}"),
        value: value.clone(),
        reason: "expected true or false (also 1/0, t/f, TRUE/FALSE)".into(),
    })
}

struct Annotations<'a>(&'a BTreeMap<String, String>);

impl Annotations<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn error(&self, key: &str, reason: String) -> RedirectError {
        RedirectError {
            source_name: format!("annotation {key}"),
            value: self.get(key).unwrap_or_default().to_owned(),
            reason,
        }
    }

    /// The comma-separated tokens of `key`, trimmed; empty tokens are skipped.
    fn tokens(&self, key: &str) -> impl Iterator<Item = &str> {
        self.get(key)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
    }

    fn ports(&self, key: &str) -> Result<Vec<u16>, RedirectError> {
        self.tokens(key)
            .map(|t| match t.parse::<u16>() {
                Ok(p) if p > 0 && t.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
                _ if t == "*" => Err(self.error(key, "`*` is only allowed on its own".into())),
                _ => Err(self.error(key, format!("{t:?} is not a port (1-65535)"))),
            })
            .collect()
    }

    fn cidrs(&self, key: &str) -> Result<Vec<IpNet>, RedirectError> {
        self.tokens(key)
            .map(|t| {
                t.parse::<IpNet>().map_err(|_| {
                    let hint = if t == "*" {
                        "`*` is only allowed on its own in includeOutboundIPRanges".to_owned()
                    } else {
                        format!("{t:?} is not a CIDR such as 10.0.0.0/8 or fd00::/8")
                    };
                    self.error(key, hint)
                })
            })
            .collect()
    }

    fn interfaces(&self, key: &str) -> Result<Vec<InterfaceName>, RedirectError> {
        self.tokens(key)
            .map(|t| InterfaceName::parse(t).map_err(|reason| self.error(key, reason)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Values shaped like what people and attackers write: anything, lists of tokens, and
    /// tokens that read as iptables options.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            ".*",
            "[-a-zA-Z0-9,./:*+! ]{0,24}",
            "(-{1,2}[a-zA-Z]{1,6})(,[a-z0-9]{1,4})?",
            "([0-9]{1,3}\\.){3}[0-9]{1,3}/[0-9]{1,2}(,::/[0-9]{1,3})?",
        ]
    }

    proptest! {
        /// Any string in any annotation gives a redirect whose every rule the read-back can
        /// parse, or an error that names the annotation; never a panic.
        #[test]
        fn any_annotation_value_parses_or_names_the_annotation(
            key in proptest::sample::select(&ANNOTATIONS[..]),
            value in value(),
        ) {
            match Redirect::from_pod(&pod(&[(key, &value)])) {
                Ok(r) => {
                    let ruleset = crate::rules::iptables::build(&r, true);
                    for f in &ruleset.families {
                        for rule in &f.rules {
                            let line = rule.restore_line();
                            prop_assert!(
                                crate::rules::canon::CanonRule::parse(&line, f.family).is_ok(),
                                "{key}={value:?} generated {line:?}, which read-back cannot parse"
                            );
                        }
                    }
                }
                Err(e) => prop_assert!(e.source_name.ends_with(key), "{e} does not name {key}"),
            }
        }
    }

    fn pod(annotations: &[(&str, &str)]) -> MeshedPod {
        MeshedPod {
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..MeshedPod::default()
        }
    }

    #[test]
    fn defaults_match_upstream() {
        let r = Redirect::from_pod(&pod(&[])).unwrap();
        assert_eq!(r.mode, InterceptionMode::Redirect);
        assert_eq!((r.proxy_uid, r.proxy_gid), (1337, 1337));
        assert_eq!(r.include_outbound_ip_ranges, IpRanges::All);
        assert_eq!(r.include_inbound_ports, PortSet::All);
        assert_eq!(r.exclude_inbound_ports, [15020, 15021, 15090]);
        assert_eq!(r.exclude_outbound_ports, [15020]);
        assert!(r.include_outbound_ports.is_empty() && r.exclude_interfaces.is_empty());
        assert!(!r.dns_capture && !r.dual_stack && !r.invalid_drop);
    }

    #[test]
    fn parses_lists_and_dedups_excluded_inbound() {
        let r = Redirect::from_pod(&pod(&[
            (ANNOT_EXCLUDE_INBOUND_PORTS, " 15021, 8080,,8080 "),
            (ANNOT_INCLUDE_INBOUND_PORTS, ""),
            (ANNOT_INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8, fd00::/8"),
            (ANNOT_EXCLUDE_INTERFACES, "eth1,net-2"),
            (ANNOT_KUBEVIRT_INTERFACES, "k1"),
            (ANNOT_INTERCEPTION_MODE, "TPROXY"),
        ]))
        .unwrap();
        assert_eq!(r.exclude_inbound_ports, [15021, 8080, 15020, 15090]);
        assert_eq!(r.include_inbound_ports, PortSet::List(vec![]));
        assert_eq!(
            r.include_outbound_ip_ranges,
            IpRanges::List(vec![
                "10.0.0.0/8".parse().unwrap(),
                "fd00::/8".parse().unwrap()
            ])
        );
        assert_eq!(r.exclude_interfaces.len(), 2);
        assert_eq!(r.reroute_virtual_interfaces[0].as_str(), "k1");
        assert_eq!(r.mode, InterceptionMode::Tproxy);
        let r = Redirect::from_pod(&pod(&[
            (ANNOT_REROUTE_VIRTUAL_INTERFACES, "v1"),
            (ANNOT_KUBEVIRT_INTERFACES, "k1"),
        ]))
        .unwrap();
        assert_eq!(r.reroute_virtual_interfaces[0].as_str(), "v1");
    }

    #[test]
    fn proxy_ids_zero_or_absent_mean_1337() {
        let mut p = pod(&[]);
        p.proxy_uid = Some(0);
        p.proxy_gid = Some(1000670001);
        let r = Redirect::from_pod(&p).unwrap();
        assert_eq!((r.proxy_uid, r.proxy_gid), (1337, 1000670001));
    }

    #[test]
    fn hostile_values_are_refused_with_the_bad_token() {
        let cases: &[(&str, &str, &str)] = &[
            (ANNOT_EXCLUDE_INBOUND_PORTS, "80,8o", "\"8o\""),
            (ANNOT_EXCLUDE_INBOUND_PORTS, "0", "\"0\""),
            (ANNOT_EXCLUDE_INBOUND_PORTS, "65536", "\"65536\""),
            (ANNOT_EXCLUDE_INBOUND_PORTS, "+80", "\"+80\""),
            (
                ANNOT_EXCLUDE_OUTBOUND_PORTS,
                "80 -j ACCEPT",
                "\"80 -j ACCEPT\"",
            ),
            (ANNOT_INCLUDE_OUTBOUND_PORTS, "*", "`*`"),
            (ANNOT_INCLUDE_INBOUND_PORTS, "80,*", "`*`"),
            (ANNOT_EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.1", "\"10.0.0.1\""),
            (
                ANNOT_EXCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.0/33",
                "\"10.0.0.0/33\"",
            ),
            (
                ANNOT_INCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.0/8\nCOMMIT",
                "COMMIT",
            ),
            (ANNOT_EXCLUDE_INTERFACES, "eth0 -j DROP", "' '"),
            (
                ANNOT_EXCLUDE_INTERFACES,
                "averyveryverylongname",
                "15 bytes",
            ),
            (ANNOT_EXCLUDE_INTERFACES, "eth\"0", "'\"'"),
            (ANNOT_EXCLUDE_INTERFACES, "..", "\"..\""),
            (ANNOT_EXCLUDE_INTERFACES, "-j", "\"-j\""),
            (ANNOT_EXCLUDE_INTERFACES, "eth0,--goto", "\"--goto\""),
            (ANNOT_REROUTE_VIRTUAL_INTERFACES, "-A", "\"-A\""),
            (ANNOT_INTERCEPTION_MODE, "redirect", "\"redirect\""),
        ];
        for (key, value, token) in cases {
            let err = Redirect::from_pod(&pod(&[(key, value)])).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(key), "{msg}");
            assert!(msg.contains(token), "{key}={value:?}: {msg}");
        }
    }

    #[test]
    fn probe_port_avoids_excluded_ports() {
        use crate::rules::iptables::probe_port;
        assert_eq!(
            probe_port(&Redirect::from_pod(&pod(&[])).unwrap()),
            Some(15002)
        );
        let r = Redirect::from_pod(&pod(&[(ANNOT_EXCLUDE_OUTBOUND_PORTS, "15002,15003")])).unwrap();
        assert_eq!(probe_port(&r), Some(15004));
        let r = Redirect::from_pod(&pod(&[(ANNOT_EXCLUDE_INTERFACES, "eth1,lo")])).unwrap();
        assert_eq!(probe_port(&r), None, "nothing on lo is captured: no probe");
    }

    #[test]
    fn env_booleans_follow_go_parse_bool() {
        let mut p = pod(&[]);
        p.proxy_env.insert(ENV_DNS_CAPTURE.into(), "True".into());
        p.proxy_env.insert(ENV_INVALID_DROP.into(), "0".into());
        let r = Redirect::from_pod(&p).unwrap();
        assert!(r.dns_capture && !r.invalid_drop);
        p.proxy_env.insert(ENV_DUAL_STACK.into(), "yes".into());
        let e = Redirect::from_pod(&p).unwrap_err();
        assert!(e.to_string().contains("ISTIO_DUAL_STACK"), "{e}");
    }
}
