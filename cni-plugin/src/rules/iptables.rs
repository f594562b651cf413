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
/// Routing table of the TPROXY policy route.
pub const TPROXY_ROUTE_TABLE: u32 = 133;

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
        tproxy_routing: redirect.mode == InterceptionMode::Tproxy
            && redirect.include_inbound_ports != PortSet::List(Vec::new()),
        proxy_uid: redirect.proxy_uid,
    }
}

/// Whether `pod_ips` contains an IPv6 address.
pub fn has_ipv6(pod_ips: &[IpAddr]) -> bool {
    pod_ips.iter().any(IpAddr::is_ipv6)
}

macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$($a.to_string()),*] };
}

struct Builder {
    rules: Vec<Rule>,
}

impl Builder {
    fn append(&mut self, table: Table, chain: &str, args: Vec<String>) {
        self.rules.push(Rule {
            table,
            chain: chain.to_owned(),
            position: None,
            args,
        });
    }

    fn insert(&mut self, table: Table, chain: &str, position: u32, args: Vec<String>) {
        self.rules.push(Rule {
            table,
            chain: chain.to_owned(),
            position: Some(position),
            args,
        });
    }
}

fn in_family(net: &IpNet, family: Family) -> bool {
    matches!(
        (net, family),
        (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6)
    )
}

fn build_family(r: &Redirect, family: Family) -> FamilyRules {
    use Table::{Mangle, Nat};
    let addrs = FamilyAddrs::of(family);
    let tproxy = r.mode == InterceptionMode::Tproxy;
    let (uid, gid) = (r.proxy_uid, r.proxy_gid);
    let mut b = Builder { rules: Vec::new() };

    // Interfaces that are never captured.
    for i in &r.exclude_interfaces {
        b.append(Nat, "PREROUTING", args!["-i", i, "-j", "RETURN"]);
        b.append(Nat, "OUTPUT", args!["-o", i, "-j", "RETURN"]);
    }
    if tproxy {
        for i in &r.exclude_interfaces {
            b.append(Mangle, "PREROUTING", args!["-i", i, "-j", "RETURN"]);
            b.append(Mangle, "OUTPUT", args!["-o", i, "-j", "RETURN"]);
        }
    }
    // Virtual interfaces are not captured as inbound.
    for i in &r.reroute_virtual_interfaces {
        b.insert(Nat, "PREROUTING", 1, args!["-i", i, "-j", "RETURN"]);
    }
    if r.invalid_drop {
        b.append(
            Mangle,
            "PREROUTING",
            args!["-m", "conntrack", "--ctstate", "INVALID", "-j", ISTIO_DROP],
        );
        b.append(Mangle, ISTIO_DROP, args!["-j", "DROP"]);
    }

    let tunnel = INBOUND_TUNNEL_PORT;
    b.append(
        Nat,
        ISTIO_INBOUND,
        args!["-p", "tcp", "--dport", tunnel, "-j", "RETURN"],
    );
    b.append(
        Nat,
        ISTIO_REDIRECT,
        args![
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            OUTBOUND_CAPTURE_PORT
        ],
    );
    b.append(
        Nat,
        ISTIO_IN_REDIRECT,
        args![
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            INBOUND_CAPTURE_PORT
        ],
    );

    inbound(&mut b, r, addrs);

    // Outbound.
    b.append(Nat, "OUTPUT", args!["-j", ISTIO_OUTPUT]);
    for p in &r.exclude_outbound_ports {
        b.append(
            Nat,
            ISTIO_OUTPUT,
            args!["-p", "tcp", "--dport", p, "-j", "RETURN"],
        );
        b.append(
            Nat,
            ISTIO_OUTPUT,
            args!["-p", "udp", "--dport", p, "-j", "RETURN"],
        );
    }
    b.append(
        Nat,
        ISTIO_OUTPUT,
        args!["-o", "lo", "-s", addrs.passthrough, "-j", "RETURN"],
    );
    // Loopback destinations in includeOutboundIPRanges keep app→self traffic captured.
    let include_has_loopback = match &r.include_outbound_ip_ranges {
        IpRanges::All => false,
        IpRanges::List(nets) => nets.iter().any(|n| n.addr().is_loopback()),
    };
    let dns = r.dns_capture;
    // Proxy UID, then GID: app → VIP → proxy → proxy inbound → app goes to the inbound
    // listener; the app talking to itself on lo is left alone; the proxy's own traffic is
    // never captured.
    if dns {
        let not_dns_or_tunnel = format!("53,{tunnel}");
        b.append(
            Nat,
            ISTIO_OUTPUT,
            args![
                "-o",
                "lo",
                "!",
                "-d",
                addrs.loopback,
                "-p",
                "tcp",
                "-m",
                "multiport",
                "!",
                "--dports",
                not_dns_or_tunnel,
                "-m",
                "owner",
                "--uid-owner",
                uid,
                "-j",
                ISTIO_IN_REDIRECT
            ],
        );
    } else {
        b.append(
            Nat,
            ISTIO_OUTPUT,
            args![
                "-o",
                "lo",
                "!",
                "-d",
                addrs.loopback,
                "-p",
                "tcp",
                "!",
                "--dport",
                tunnel,
                "-m",
                "owner",
                "--uid-owner",
                uid,
                "-j",
                ISTIO_IN_REDIRECT
            ],
        );
    }
    lo_return_unless_owner(&mut b, include_has_loopback, dns, "--uid-owner", uid);
    b.append(
        Nat,
        ISTIO_OUTPUT,
        args!["-m", "owner", "--uid-owner", uid, "-j", "RETURN"],
    );
    b.append(
        Nat,
        ISTIO_OUTPUT,
        args![
            "-o",
            "lo",
            "!",
            "-d",
            addrs.loopback,
            "-p",
            "tcp",
            "!",
            "--dport",
            tunnel,
            "-m",
            "owner",
            "--gid-owner",
            gid,
            "-j",
            ISTIO_IN_REDIRECT
        ],
    );
    lo_return_unless_owner(&mut b, include_has_loopback, dns, "--gid-owner", gid);
    b.append(
        Nat,
        ISTIO_OUTPUT,
        args!["-m", "owner", "--gid-owner", gid, "-j", "RETURN"],
    );

    if dns {
        dns_capture(&mut b, uid, gid);
    }

    b.append(
        Nat,
        ISTIO_OUTPUT,
        args!["-d", addrs.loopback, "-j", "RETURN"],
    );
    for net in r
        .exclude_outbound_ip_ranges
        .iter()
        .filter(|n| in_family(n, family))
    {
        b.append(Nat, ISTIO_OUTPUT, args!["-d", net, "-j", "RETURN"]);
    }
    for p in &r.include_outbound_ports {
        b.append(
            Nat,
            ISTIO_OUTPUT,
            args!["-p", "tcp", "--dport", p, "-j", ISTIO_REDIRECT],
        );
    }
    match &r.include_outbound_ip_ranges {
        IpRanges::All => {
            b.append(Nat, ISTIO_OUTPUT, args!["-j", ISTIO_REDIRECT]);
            for i in &r.reroute_virtual_interfaces {
                b.insert(Nat, "PREROUTING", 1, args!["-i", i, "-j", ISTIO_REDIRECT]);
            }
        }
        IpRanges::List(nets) => {
            for net in nets.iter().filter(|n| in_family(n, family)) {
                for i in &r.reroute_virtual_interfaces {
                    b.insert(
                        Nat,
                        "PREROUTING",
                        1,
                        args!["-i", i, "-d", net, "-j", ISTIO_REDIRECT],
                    );
                }
                b.append(Nat, ISTIO_OUTPUT, args!["-d", net, "-j", ISTIO_REDIRECT]);
            }
        }
    }

    if tproxy {
        tproxy_marks(&mut b, addrs, uid, gid);
    }
    FamilyRules {
        family,
        rules: b.rules,
    }
}

/// Inbound capture: PREROUTING → ISTIO_INBOUND → (REDIRECT | TPROXY).
fn inbound(b: &mut Builder, r: &Redirect, addrs: FamilyAddrs) {
    use Table::{Mangle, Nat};
    if r.include_inbound_ports == PortSet::List(Vec::new()) {
        return;
    }
    let tproxy = r.mode == InterceptionMode::Tproxy;
    let table = if tproxy {
        b.append(
            Mangle,
            ISTIO_DIVERT,
            args!["-j", "MARK", "--set-mark", TPROXY_MARK],
        );
        b.append(Mangle, ISTIO_DIVERT, args!["-j", "ACCEPT"]);
        let mark = format!("{TPROXY_MARK}/0xffffffff");
        b.append(
            Mangle,
            ISTIO_TPROXY,
            args![
                "!",
                "-d",
                addrs.loopback,
                "-p",
                "tcp",
                "-j",
                "TPROXY",
                "--tproxy-mark",
                mark,
                "--on-port",
                INBOUND_CAPTURE_PORT
            ],
        );
        Mangle
    } else {
        Nat
    };
    b.append(table, "PREROUTING", args!["-p", "tcp", "-j", ISTIO_INBOUND]);
    let established = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"];
    match &r.include_inbound_ports {
        PortSet::All => {
            for p in &r.exclude_inbound_ports {
                b.append(
                    table,
                    ISTIO_INBOUND,
                    args!["-p", "tcp", "--dport", p, "-j", "RETURN"],
                );
            }
            if tproxy {
                let mut a = args!["-p", "tcp"];
                a.extend(established.iter().map(|s| s.to_string()));
                a.extend(args!["-j", ISTIO_DIVERT]);
                b.append(Mangle, ISTIO_INBOUND, a);
                b.append(
                    Mangle,
                    ISTIO_INBOUND,
                    args!["-p", "tcp", "-j", ISTIO_TPROXY],
                );
            } else {
                b.append(
                    Nat,
                    ISTIO_INBOUND,
                    args!["-p", "tcp", "-j", ISTIO_IN_REDIRECT],
                );
            }
        }
        PortSet::List(ports) => {
            for p in ports {
                if tproxy {
                    let mut a = args!["-p", "tcp", "--dport", p];
                    a.extend(established.iter().map(|s| s.to_string()));
                    a.extend(args!["-j", ISTIO_DIVERT]);
                    b.append(Mangle, ISTIO_INBOUND, a);
                    b.append(
                        Mangle,
                        ISTIO_INBOUND,
                        args!["-p", "tcp", "--dport", p, "-j", ISTIO_TPROXY],
                    );
                } else {
                    b.append(
                        Nat,
                        ISTIO_INBOUND,
                        args!["-p", "tcp", "--dport", p, "-j", ISTIO_IN_REDIRECT],
                    );
                }
            }
        }
    }
}

/// `-o lo` traffic not from the proxy is the app talking to itself: leave it alone, unless
/// the include list names a loopback range. With DNS capture, TCP port 53 is still captured.
fn lo_return_unless_owner(b: &mut Builder, include_loopback: bool, dns: bool, flag: &str, id: u32) {
    if include_loopback {
        return;
    }
    let a = if dns {
        args![
            "-o", "lo", "-p", "tcp", "!", "--dport", "53", "-m", "owner", "!", flag, id, "-j",
            "RETURN"
        ]
    } else {
        args!["-o", "lo", "-m", "owner", "!", flag, id, "-j", "RETURN"]
    };
    b.append(Table::Nat, ISTIO_OUTPUT, a);
}

/// DNS capture to the agent on 15053, with the proxy's upstream queries and the agent's
/// answers in separate conntrack zones (1 and 2) to avoid UDP conntrack races.
fn dns_capture(b: &mut Builder, uid: u32, gid: u32) {
    use Table::{Nat, Raw};
    b.append(Raw, "OUTPUT", args!["-j", ISTIO_OUTPUT_DNS]);
    b.append(Nat, ISTIO_OUTPUT, args!["-j", ISTIO_OUTPUT_DNS]);
    b.append(
        Nat,
        ISTIO_OUTPUT_DNS,
        args![
            "-p",
            "tcp",
            "--dport",
            "53",
            "-j",
            "REDIRECT",
            "--to-ports",
            DNS_CAPTURE_PORT
        ],
    );
    // Upstream spells this one `--to-port`; iptables accepts both.
    b.append(
        Nat,
        ISTIO_OUTPUT_DNS,
        args![
            "-p",
            "udp",
            "--dport",
            "53",
            "-j",
            "REDIRECT",
            "--to-port",
            DNS_CAPTURE_PORT
        ],
    );
    for (flag, id) in [("--uid-owner", uid), ("--gid-owner", gid)] {
        b.append(
            Raw,
            ISTIO_OUTPUT_DNS,
            args!["-p", "udp", "--dport", "53", "-m", "owner", flag, id, "-j", "CT", "--zone", 1],
        );
        b.append(
            Raw,
            ISTIO_OUTPUT_DNS,
            args![
                "-p",
                "udp",
                "--sport",
                DNS_CAPTURE_PORT,
                "-m",
                "owner",
                flag,
                id,
                "-j",
                "CT",
                "--zone",
                2
            ],
        );
    }
    b.append(Raw, "PREROUTING", args!["-j", ISTIO_INBOUND]);
    b.append(
        Raw,
        ISTIO_OUTPUT_DNS,
        args!["-p", "udp", "--dport", "53", "-j", "CT", "--zone", 2],
    );
    b.append(
        Raw,
        ISTIO_INBOUND,
        args!["-p", "udp", "--sport", "53", "-j", "CT", "--zone", 1],
    );
}

/// TPROXY marks: keep the original-source mark on the connection, mark the proxy's
/// packets to the workload, and keep those out of ISTIO_INBOUND.
fn tproxy_marks(b: &mut Builder, addrs: FamilyAddrs, uid: u32, gid: u32) {
    use Table::Mangle;
    b.append(
        Mangle,
        "PREROUTING",
        args![
            "-p",
            "tcp",
            "-m",
            "mark",
            "--mark",
            TPROXY_MARK,
            "-j",
            "CONNMARK",
            "--save-mark"
        ],
    );
    b.append(
        Mangle,
        "OUTPUT",
        args![
            "-p",
            "tcp",
            "-o",
            "lo",
            "-m",
            "mark",
            "--mark",
            TPROXY_MARK,
            "-j",
            "RETURN"
        ],
    );
    for (flag, id) in [("--uid-owner", uid), ("--gid-owner", gid)] {
        b.append(
            Mangle,
            "OUTPUT",
            args![
                "!",
                "-d",
                addrs.loopback,
                "-p",
                "tcp",
                "-o",
                "lo",
                "-m",
                "owner",
                flag,
                id,
                "-j",
                "MARK",
                "--set-mark",
                OUTBOUND_MARK
            ],
        );
    }
    b.append(
        Mangle,
        "OUTPUT",
        args![
            "-p",
            "tcp",
            "-m",
            "connmark",
            "--mark",
            TPROXY_MARK,
            "-j",
            "CONNMARK",
            "--restore-mark"
        ],
    );
    b.insert(
        Mangle,
        ISTIO_INBOUND,
        1,
        args![
            "-p",
            "tcp",
            "-m",
            "mark",
            "--mark",
            TPROXY_MARK,
            "-j",
            "RETURN"
        ],
    );
    b.insert(
        Mangle,
        ISTIO_INBOUND,
        2,
        args![
            "-p",
            "tcp",
            "-s",
            addrs.passthrough,
            "-i",
            "lo",
            "-j",
            "RETURN"
        ],
    );
    b.insert(
        Mangle,
        ISTIO_INBOUND,
        3,
        args![
            "-p",
            "tcp",
            "-i",
            "lo",
            "-m",
            "mark",
            "!",
            "--mark",
            OUTBOUND_MARK,
            "-j",
            "RETURN"
        ],
    );
}
