//! The sidecar redirection rules in iptables form, in the same order and spelling as
//! upstream Istio's `istio-iptables` produces them in CNI mode (`tools/istio-iptables/pkg/
//! capture/run.go`), so that users can swap this plugin in and see identical rules.
//!
//! CNI mode fixes several upstream knobs: DNS capture means "capture all DNS" (no resolver
//! list), there are no owner-group filters, and the ports are Istio's well-known ones.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Family, FamilyRules, Rule, Ruleset, Table};
use crate::redirect::{InterceptionMode, IpRanges, PortSet, Redirect};

/// Outbound capture port (Envoy's virtual outbound listener).
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// Inbound capture port (Envoy's virtual inbound listener).
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// HBONE tunnel port, never captured inbound nor redirected back to inbound.
pub const INBOUND_TUNNEL_PORT: u16 = 15008;
/// The istio-agent DNS proxy port.
pub const DNS_CAPTURE_PORT: u16 = 15053;
/// Mark of TPROXY'd inbound packets, and the policy-routing fwmark.
pub const TPROXY_MARK: u32 = 1337;
/// Mark of packets from the proxy to the workload over `lo` in TPROXY mode.
pub const OUTBOUND_MARK: u32 = 1338;
/// Default destination port of the validation probe (upstream's `IPTABLES_PROBE_PORT`).
pub const DEFAULT_PROBE_PORT: u16 = 15002;
/// Routing table of the TPROXY policy route.
pub const TPROXY_ROUTE_TABLE: u32 = 133;

/// The sidecar's TPROXY policy routing: `ip rule add fwmark 1337 lookup 133` and a local
/// default route in table 133 (upstream `tools/common/tproxy`).
pub const TPROXY_DELIVERY: super::LocalDelivery = super::LocalDelivery {
    mark: TPROXY_MARK,
    mask: None,
    table: TPROXY_ROUTE_TABLE,
    priority: None,
};

/// Chain: inbound traffic classification.
pub const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
/// Chain: REDIRECT to the outbound capture port.
pub const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
/// Chain: REDIRECT to the inbound capture port.
pub const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
/// Chain: outbound traffic classification.
pub const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
/// Chain: DNS capture.
pub const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
/// Chain (TPROXY): mark and accept packets of established inbound connections.
pub const ISTIO_DIVERT: &str = "ISTIO_DIVERT";
/// Chain (TPROXY): TPROXY new inbound connections to the inbound capture port.
pub const ISTIO_TPROXY: &str = "ISTIO_TPROXY";
/// Chain: drop conntrack-INVALID packets.
pub const ISTIO_DROP: &str = "ISTIO_DROP";

/// Addresses that differ between the families.
#[derive(Debug, Clone, Copy)]
struct FamilyAddrs {
    /// The host loopback: `127.0.0.1/32` or `::1/128`.
    loopback: &'static str,
    /// Source of the inbound passthrough cluster: `127.0.0.6/32` or `::6/128`.
    passthrough: &'static str,
}

impl FamilyAddrs {
    fn of(family: Family) -> Self {
        match family {
            Family::V4 => FamilyAddrs {
                loopback: "127.0.0.1/32",
                passthrough: "127.0.0.6/32",
            },
            Family::V6 => FamilyAddrs {
                loopback: "::1/128",
                passthrough: "::6/128",
            },
        }
    }
}

/// Builds the ruleset of a pod. IPv6 rules are included when `ipv6` is set (the pod has an
/// IPv6 address) or the redirect asks for dual stack.
pub fn build(redirect: &Redirect, ipv6: bool) -> Ruleset {
    let mut families = vec![build_family(redirect, Family::V4)];
    if ipv6 || redirect.dual_stack {
        families.push(build_family(redirect, Family::V6));
    }
    Ruleset {
        families,
        // As upstream: no inbound capture, no TPROXY routing.
        local_delivery: (redirect.mode == InterceptionMode::Tproxy
            && redirect.include_inbound_ports != PortSet::List(Vec::new()))
        .then_some(TPROXY_DELIVERY),
        proxy_uid: redirect.proxy_uid,
        probe_port: probe_port(redirect),
    }
}

/// The port the validation probe connects to: upstream's `IPTABLES_PROBE_PORT` (15002),
/// or the next one up when the pod excludes it from outbound capture (then a connection
/// to it would rightly not be redirected). Never the tunnel port, which the owner rule
/// exempts, nor the DNS port with DNS capture.
///
/// `None` when no loopback probe can pass on correct rules: the pod excludes `lo`
/// (`traffic.sidecar.istio.io/excludeInterfaces`), so nothing on loopback is captured.
/// Validation is then read-back alone.
pub fn probe_port(r: &Redirect) -> Option<u16> {
    if r.exclude_interfaces.iter().any(|i| i.as_str() == "lo") {
        return None;
    }
    (DEFAULT_PROBE_PORT..=u16::MAX).find(|p| {
        !r.exclude_outbound_ports.contains(p)
            && *p != INBOUND_TUNNEL_PORT
            && !(r.dns_capture && *p == 53)
    })
}

/// Whether `pod_ips` contains an IPv6 address.
pub fn has_ipv6(pod_ips: &[IpAddr]) -> bool {
    pod_ips.iter().any(IpAddr::is_ipv6)
}

/// A destination match, `-d NET`, written as iptables stores it: nothing at all for a
/// zero-length prefix (`0.0.0.0/0`, `::/0`), which matches every address, so that what
/// `iptables-save` prints back is what was written.
struct Dst<'a>(&'a IpNet);

impl std::fmt::Display for Dst<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.prefix_len() == 0 {
            Ok(())
        } else {
            write!(f, "-d {}", self.0)
        }
    }
}

/// Collects rules in order. Rules are written as iptables text: every interpolated value
/// is a validated type (port, UID, CIDR, [`InterfaceName`](crate::redirect::InterfaceName))
/// that contains no whitespace, so splitting on whitespace yields exactly the tokens.
struct Builder {
    rules: Vec<Rule>,
}

impl Builder {
    fn push(&mut self, table: Table, chain: &str, position: Option<u32>, text: &str) {
        self.rules.push(Rule {
            table,
            chain: chain.to_owned(),
            position,
            args: text.split_whitespace().map(str::to_owned).collect(),
        });
    }
}

/// `append!(builder, table, chain, "format", args…)`: `-A chain …`.
macro_rules! append {
    ($b:expr, $table:expr, $chain:expr, $($fmt:tt)+) => {
        $b.push($table, $chain, None, &format!($($fmt)+))
    };
}

/// `insert!(builder, table, chain, position, "format", args…)`: `-I chain position …`.
macro_rules! insert {
    ($b:expr, $table:expr, $chain:expr, $pos:expr, $($fmt:tt)+) => {
        $b.push($table, $chain, Some($pos), &format!($($fmt)+))
    };
}

fn in_family(net: &IpNet, family: Family) -> bool {
    matches!(
        (net, family),
        (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6)
    )
}

fn build_family(r: &Redirect, family: Family) -> FamilyRules {
    use Table::{Mangle, Nat};
    let FamilyAddrs {
        loopback: lo,
        passthrough,
    } = FamilyAddrs::of(family);
    let tproxy = r.mode == InterceptionMode::Tproxy;
    let tunnel = INBOUND_TUNNEL_PORT;
    let mut b = Builder { rules: Vec::new() };

    // Interfaces that are never captured.
    for i in &r.exclude_interfaces {
        append!(b, Nat, "PREROUTING", "-i {i} -j RETURN");
        append!(b, Nat, "OUTPUT", "-o {i} -j RETURN");
    }
    if tproxy {
        for i in &r.exclude_interfaces {
            append!(b, Mangle, "PREROUTING", "-i {i} -j RETURN");
            append!(b, Mangle, "OUTPUT", "-o {i} -j RETURN");
        }
    }
    // Virtual interfaces are not captured as inbound.
    for i in &r.reroute_virtual_interfaces {
        insert!(b, Nat, "PREROUTING", 1, "-i {i} -j RETURN");
    }
    if r.invalid_drop {
        append!(
            b,
            Mangle,
            "PREROUTING",
            "-m conntrack --ctstate INVALID -j {ISTIO_DROP}"
        );
        append!(b, Mangle, ISTIO_DROP, "-j DROP");
    }

    append!(b, Nat, ISTIO_INBOUND, "-p tcp --dport {tunnel} -j RETURN");
    append!(
        b,
        Nat,
        ISTIO_REDIRECT,
        "-p tcp -j REDIRECT --to-ports {OUTBOUND_CAPTURE_PORT}"
    );
    append!(
        b,
        Nat,
        ISTIO_IN_REDIRECT,
        "-p tcp -j REDIRECT --to-ports {INBOUND_CAPTURE_PORT}"
    );

    inbound(&mut b, r, lo);

    // Outbound.
    append!(b, Nat, "OUTPUT", "-j {ISTIO_OUTPUT}");
    for p in &r.exclude_outbound_ports {
        append!(b, Nat, ISTIO_OUTPUT, "-p tcp --dport {p} -j RETURN");
        append!(b, Nat, ISTIO_OUTPUT, "-p udp --dport {p} -j RETURN");
    }
    append!(b, Nat, ISTIO_OUTPUT, "-o lo -s {passthrough} -j RETURN");
    // Loopback destinations in includeOutboundIPRanges keep app→self traffic captured.
    let include_has_loopback = match &r.include_outbound_ip_ranges {
        IpRanges::All => false,
        IpRanges::List(nets) => nets.iter().any(|n| n.addr().is_loopback()),
    };
    let dns = r.dns_capture;
    // For the proxy's UID, then its GID: app → VIP → proxy → proxy's inbound → app goes to
    // the inbound listener; the app talking to itself over lo is left alone (with DNS
    // capture, except TCP 53); the proxy's own traffic is never captured. As upstream, the
    // port-53 exception of the first rule applies to the UID match only.
    for (owner, id) in [("--uid-owner", r.proxy_uid), ("--gid-owner", r.proxy_gid)] {
        if dns && owner == "--uid-owner" {
            append!(b, Nat, ISTIO_OUTPUT,
                "-o lo ! -d {lo} -p tcp -m multiport ! --dports 53,{tunnel} -m owner {owner} {id} -j {ISTIO_IN_REDIRECT}");
        } else {
            append!(b, Nat, ISTIO_OUTPUT,
                "-o lo ! -d {lo} -p tcp ! --dport {tunnel} -m owner {owner} {id} -j {ISTIO_IN_REDIRECT}");
        }
        if !include_has_loopback {
            if dns {
                append!(
                    b,
                    Nat,
                    ISTIO_OUTPUT,
                    "-o lo -p tcp ! --dport 53 -m owner ! {owner} {id} -j RETURN"
                );
            } else {
                append!(
                    b,
                    Nat,
                    ISTIO_OUTPUT,
                    "-o lo -m owner ! {owner} {id} -j RETURN"
                );
            }
        }
        append!(b, Nat, ISTIO_OUTPUT, "-m owner {owner} {id} -j RETURN");
    }

    if dns {
        dns_capture(&mut b, r.proxy_uid, r.proxy_gid);
    }

    append!(b, Nat, ISTIO_OUTPUT, "-d {lo} -j RETURN");
    for net in r
        .exclude_outbound_ip_ranges
        .iter()
        .filter(|n| in_family(n, family))
    {
        append!(b, Nat, ISTIO_OUTPUT, "{} -j RETURN", Dst(net));
    }
    for p in &r.include_outbound_ports {
        append!(
            b,
            Nat,
            ISTIO_OUTPUT,
            "-p tcp --dport {p} -j {ISTIO_REDIRECT}"
        );
    }
    match &r.include_outbound_ip_ranges {
        IpRanges::All => {
            append!(b, Nat, ISTIO_OUTPUT, "-j {ISTIO_REDIRECT}");
            for i in &r.reroute_virtual_interfaces {
                insert!(b, Nat, "PREROUTING", 1, "-i {i} -j {ISTIO_REDIRECT}");
            }
        }
        IpRanges::List(nets) => {
            for net in nets.iter().filter(|n| in_family(n, family)) {
                for i in &r.reroute_virtual_interfaces {
                    insert!(
                        b,
                        Nat,
                        "PREROUTING",
                        1,
                        "-i {i} {} -j {ISTIO_REDIRECT}",
                        Dst(net)
                    );
                }
                append!(b, Nat, ISTIO_OUTPUT, "{} -j {ISTIO_REDIRECT}", Dst(net));
            }
        }
    }

    if tproxy {
        tproxy_marks(&mut b, lo, passthrough, r.proxy_uid, r.proxy_gid);
    }
    FamilyRules {
        family,
        rules: b.rules,
    }
}

/// Inbound capture: PREROUTING → ISTIO_INBOUND → (REDIRECT | TPROXY).
fn inbound(b: &mut Builder, r: &Redirect, lo: &str) {
    use Table::{Mangle, Nat};
    if r.include_inbound_ports == PortSet::List(Vec::new()) {
        return;
    }
    let tproxy = r.mode == InterceptionMode::Tproxy;
    let table = if tproxy {
        append!(b, Mangle, ISTIO_DIVERT, "-j MARK --set-mark {TPROXY_MARK}");
        append!(b, Mangle, ISTIO_DIVERT, "-j ACCEPT");
        append!(b, Mangle, ISTIO_TPROXY,
            "! -d {lo} -p tcp -j TPROXY --tproxy-mark {TPROXY_MARK}/0xffffffff --on-port {INBOUND_CAPTURE_PORT}");
        Mangle
    } else {
        Nat
    };
    append!(b, table, "PREROUTING", "-p tcp -j {ISTIO_INBOUND}");
    let established = "-m conntrack --ctstate RELATED,ESTABLISHED";
    match &r.include_inbound_ports {
        PortSet::All => {
            for p in &r.exclude_inbound_ports {
                append!(b, table, ISTIO_INBOUND, "-p tcp --dport {p} -j RETURN");
            }
            if tproxy {
                append!(
                    b,
                    Mangle,
                    ISTIO_INBOUND,
                    "-p tcp {established} -j {ISTIO_DIVERT}"
                );
                append!(b, Mangle, ISTIO_INBOUND, "-p tcp -j {ISTIO_TPROXY}");
            } else {
                append!(b, Nat, ISTIO_INBOUND, "-p tcp -j {ISTIO_IN_REDIRECT}");
            }
        }
        PortSet::List(ports) => {
            for p in ports {
                if tproxy {
                    append!(
                        b,
                        Mangle,
                        ISTIO_INBOUND,
                        "-p tcp --dport {p} {established} -j {ISTIO_DIVERT}"
                    );
                    append!(
                        b,
                        Mangle,
                        ISTIO_INBOUND,
                        "-p tcp --dport {p} -j {ISTIO_TPROXY}"
                    );
                } else {
                    append!(
                        b,
                        Nat,
                        ISTIO_INBOUND,
                        "-p tcp --dport {p} -j {ISTIO_IN_REDIRECT}"
                    );
                }
            }
        }
    }
}

/// DNS capture to the agent on 15053, with the proxy's upstream queries and the agent's
/// answers in separate conntrack zones (1 and 2) to avoid UDP conntrack races.
fn dns_capture(b: &mut Builder, uid: u32, gid: u32) {
    use Table::{Nat, Raw};
    let dns = DNS_CAPTURE_PORT;
    append!(b, Raw, "OUTPUT", "-j {ISTIO_OUTPUT_DNS}");
    append!(b, Nat, ISTIO_OUTPUT, "-j {ISTIO_OUTPUT_DNS}");
    append!(
        b,
        Nat,
        ISTIO_OUTPUT_DNS,
        "-p tcp --dport 53 -j REDIRECT --to-ports {dns}"
    );
    // Upstream spells this one `--to-port`; iptables accepts both.
    append!(
        b,
        Nat,
        ISTIO_OUTPUT_DNS,
        "-p udp --dport 53 -j REDIRECT --to-port {dns}"
    );
    for (owner, id) in [("--uid-owner", uid), ("--gid-owner", gid)] {
        append!(
            b,
            Raw,
            ISTIO_OUTPUT_DNS,
            "-p udp --dport 53 -m owner {owner} {id} -j CT --zone 1"
        );
        append!(
            b,
            Raw,
            ISTIO_OUTPUT_DNS,
            "-p udp --sport {dns} -m owner {owner} {id} -j CT --zone 2"
        );
    }
    append!(b, Raw, "PREROUTING", "-j {ISTIO_INBOUND}");
    append!(b, Raw, ISTIO_OUTPUT_DNS, "-p udp --dport 53 -j CT --zone 2");
    append!(b, Raw, ISTIO_INBOUND, "-p udp --sport 53 -j CT --zone 1");
}

/// TPROXY marks: keep the original-source mark on the connection, mark the proxy's
/// packets to the workload, and keep those out of ISTIO_INBOUND.
fn tproxy_marks(b: &mut Builder, lo: &str, passthrough: &str, uid: u32, gid: u32) {
    use Table::Mangle;
    let (mark, outbound) = (TPROXY_MARK, OUTBOUND_MARK);
    append!(
        b,
        Mangle,
        "PREROUTING",
        "-p tcp -m mark --mark {mark} -j CONNMARK --save-mark"
    );
    append!(
        b,
        Mangle,
        "OUTPUT",
        "-p tcp -o lo -m mark --mark {mark} -j RETURN"
    );
    for (owner, id) in [("--uid-owner", uid), ("--gid-owner", gid)] {
        append!(
            b,
            Mangle,
            "OUTPUT",
            "! -d {lo} -p tcp -o lo -m owner {owner} {id} -j MARK --set-mark {outbound}"
        );
    }
    append!(
        b,
        Mangle,
        "OUTPUT",
        "-p tcp -m connmark --mark {mark} -j CONNMARK --restore-mark"
    );
    insert!(
        b,
        Mangle,
        ISTIO_INBOUND,
        1,
        "-p tcp -m mark --mark {mark} -j RETURN"
    );
    insert!(
        b,
        Mangle,
        ISTIO_INBOUND,
        2,
        "-p tcp -s {passthrough} -i lo -j RETURN"
    );
    insert!(
        b,
        Mangle,
        ISTIO_INBOUND,
        3,
        "-p tcp -i lo -m mark ! --mark {outbound} -j RETURN"
    );
}
