//! The sidecar redirection rules as one nftables transaction, in the order and spelling of
//! upstream Istio's native nftables backend (`tools/istio-nftables/pkg/capture/run.go`,
//! reached from the CNI plugin through `cni/pkg/plugin/sidecar_nftables_linux.go`), so
//! that `nft -f` of [`NftRuleset::transaction`] writes what upstream writes. Pure: no I/O.
//! Golden-tested against upstream's outputs (`cni-plugin/tests/conformance/istio-nftables/`).
//!
//! Three `inet` tables, each present only when it has rules: `istio-proxy-nat` (REDIRECT),
//! `istio-proxy-mangle` (TPROXY, marks, invalid drop) and `istio-proxy-raw` (DNS conntrack
//! zones). Each is added and then flushed in the same transaction, so applying it replaces
//! whatever an earlier ADD left, atomically. IPv4 and IPv6 rules share the tables; the
//! IPv6 ones are written when the pod has an IPv6 address (or asks for dual stack), as
//! upstream's `EnableIPv6`.
//!
//! CNI mode fixes the same knobs as for iptables (see [`super::iptables`]): DNS capture
//! means capture-all (upstream sets `RedirectDNS` and `CaptureAllDNS` together), one proxy
//! UID and GID, no owner-group filter, and the host loopback is `127.0.0.1/32`.

use std::fmt::Write as _;

use ipnet::IpNet;

use super::iptables::{
    probe_port, DNS_CAPTURE_PORT, INBOUND_CAPTURE_PORT, INBOUND_TUNNEL_PORT, OUTBOUND_CAPTURE_PORT,
    OUTBOUND_MARK, TPROXY_MARK,
};
use crate::redirect::{InterceptionMode, IpRanges, PortSet, Redirect};

/// Table of the REDIRECT rules.
pub const NAT_TABLE: &str = "istio-proxy-nat";
/// Table of the TPROXY rules, marks and the invalid-packet drop.
pub const MANGLE_TABLE: &str = "istio-proxy-mangle";
/// Table of the DNS conntrack zones.
pub const RAW_TABLE: &str = "istio-proxy-raw";
/// Every table this backend writes for a sidecar pod, in the order of the transaction.
pub const TABLES: [&str; 3] = [NAT_TABLE, MANGLE_TABLE, RAW_TABLE];

/// Every table of ours in a pod's netns: the sidecar tables ([`TABLES`]) and ambient's
/// in-pod tables ([`super::ambient::nftables::INPOD_TABLES`]). A write removes the ones
/// it does not use, so a pod never holds both.
pub const ALL_TABLES: [&str; 6] = [
    NAT_TABLE,
    MANGLE_TABLE,
    RAW_TABLE,
    super::ambient::NAT_TABLE,
    super::ambient::MANGLE_TABLE,
    super::ambient::RAW_TABLE,
];

/// Whether `inet <name>` is one of our tables ([`ALL_TABLES`]).
pub fn is_our_table(name: &str) -> bool {
    ALL_TABLES.contains(&name)
}

const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
const ISTIO_INBOUND: &str = "istio-inbound";
const ISTIO_REDIRECT: &str = "istio-redirect";
const ISTIO_IN_REDIRECT: &str = "istio-in-redirect";
const ISTIO_OUTPUT: &str = "istio-output";
const ISTIO_OUTPUT_DNS: &str = "istio-output-dns";
const ISTIO_DIVERT: &str = "istio-divert";
const ISTIO_TPROXY: &str = "istio-tproxy";
const ISTIO_DROP: &str = "istio-drop";

/// The host loopback as upstream's CNI configuration has it (`HostIPv4LoopbackCidr`).
const LOOPBACK_V4: &str = "127.0.0.1/32";
const LOOPBACK_V6: &str = "::1/128";

/// A chain of a table: regular, or a base chain hooked into netfilter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NftChain {
    /// The chain's name.
    pub name: &'static str,
    /// For a base chain, its `{ type … hook … priority … ; }` specification.
    pub base: Option<&'static str>,
}

impl NftChain {
    /// A base chain `name` with its `type … hook … priority …` specification.
    pub const fn base(name: &'static str, spec: &'static str) -> NftChain {
        NftChain {
            name,
            base: Some(spec),
        }
    }

    /// A regular chain `name`.
    pub const fn plain(name: &'static str) -> NftChain {
        NftChain { name, base: None }
    }
}

/// The chains each table may have, in the order upstream declares them (and so adds
/// them); only those with rules are created.
fn declared_chains(table: &str) -> &'static [NftChain] {
    const fn base(name: &'static str, spec: &'static str) -> NftChain {
        NftChain::base(name, spec)
    }
    const fn plain(name: &'static str) -> NftChain {
        NftChain::plain(name)
    }
    // Priorities as knftables spells them: dstnat -100, mangle -150, raw -300.
    const NAT: &[NftChain] = &[
        base(PREROUTING, "type nat hook prerouting priority -100"),
        base(OUTPUT, "type nat hook output priority -100"),
        plain(ISTIO_INBOUND),
        plain(ISTIO_REDIRECT),
        plain(ISTIO_IN_REDIRECT),
        plain(ISTIO_OUTPUT),
        plain(ISTIO_OUTPUT_DNS),
    ];
    const MANGLE: &[NftChain] = &[
        base(PREROUTING, "type filter hook prerouting priority -150"),
        base(OUTPUT, "type route hook output priority -150"),
        plain(ISTIO_DIVERT),
        plain(ISTIO_TPROXY),
        plain(ISTIO_INBOUND),
        plain(ISTIO_DROP),
    ];
    const RAW: &[NftChain] = &[
        base(PREROUTING, "type filter hook prerouting priority -300"),
        base(OUTPUT, "type filter hook output priority -300"),
        plain(ISTIO_INBOUND),
        plain(ISTIO_OUTPUT_DNS),
    ];
    match table {
        NAT_TABLE => NAT,
        MANGLE_TABLE => MANGLE,
        _ => RAW,
    }
}

/// One rule of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRule {
    /// The chain it goes to.
    pub chain: &'static str,
    /// `None` appends (`add rule`); `Some(i)` inserts before the rule at 0-based index `i`
    /// (`insert rule … index i`).
    pub index: Option<usize>,
    /// The rule's statements, as `nft` takes them (`meta l4proto tcp counter return`).
    pub expr: String,
}

/// One table: the chains that have rules, and the rules in transaction order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftTable {
    /// The table's name (family `inet`).
    pub name: &'static str,
    /// Its chains, in the order they are added.
    pub chains: Vec<NftChain>,
    /// Its rules, in the order they are added or inserted.
    pub rules: Vec<NftRule>,
}

/// What ADD writes for a pod with the nftables backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRuleset {
    /// The tables that have rules, in transaction order (nat, mangle, raw).
    pub tables: Vec<NftTable>,
    /// The policy routing the rules need (TPROXY's, or ambient's in-pod delivery), as for
    /// iptables.
    pub local_delivery: Option<super::LocalDelivery>,
    /// The proxy's UID (the probe connects as it).
    pub proxy_uid: u32,
    /// Where the validation probe connects; `None` when no loopback probe can pass.
    pub probe_port: Option<u16>,
    /// Whether IPv6 rules are in (and so the IPv6 probe and `::6` are needed).
    pub ipv6: bool,
}

impl NftRuleset {
    /// The whole transaction, one `nft` command per line, as `nft -f` takes it and as
    /// upstream's goldens print it: per table, `add table`, `flush table`, `add chain`,
    /// then `add rule` / `insert rule … index N`.
    pub fn transaction(&self) -> String {
        transaction_text(&self.tables)
    }

    /// What these rules need besides themselves (see [`crate::routing`]).
    pub fn routing_needs(&self) -> super::RoutingNeeds {
        let mut families = vec![super::Family::V4];
        if self.ipv6 {
            families.push(super::Family::V6);
        }
        super::RoutingNeeds {
            ipv6_passthrough: families.contains(&super::Family::V6)
                && self.local_delivery != Some(super::ambient::INPOD_DELIVERY),
            families,
            local_delivery: self.local_delivery,
        }
    }

    /// The names of the tables this ruleset writes.
    pub fn table_names(&self) -> Vec<&'static str> {
        self.tables.iter().map(|t| t.name).collect()
    }
}

/// Collects rules per table in the order upstream adds them; `*6` variants only when the
/// pod has IPv6.
struct Builder {
    ipv6: bool,
    rules: [Vec<NftRule>; 3],
}

impl Builder {
    fn slot(table: &str) -> usize {
        TABLES.iter().position(|t| *t == table).unwrap_or(2)
    }

    fn push(&mut self, table: &str, chain: &'static str, index: Option<usize>, expr: String) {
        self.rules[Self::slot(table)].push(NftRule { chain, index, expr });
    }

    fn append(&mut self, table: &str, chain: &'static str, expr: impl Into<String>) {
        self.push(table, chain, None, expr.into());
    }

    fn append6(&mut self, table: &str, chain: &'static str, expr: impl Into<String>) {
        if self.ipv6 {
            self.append(table, chain, expr);
        }
    }

    fn insert(&mut self, table: &str, chain: &'static str, index: usize, expr: impl Into<String>) {
        self.push(table, chain, Some(index), expr.into());
    }

    fn insert6(&mut self, table: &str, chain: &'static str, index: usize, expr: impl Into<String>) {
        if self.ipv6 {
            self.insert(table, chain, index, expr);
        }
    }

    /// The tables with rules, each with the chains that have rules, and inserts that nft
    /// would refuse turned into appends: an insert into an empty chain, or at an index at
    /// or past the chain's end (upstream's `addIstioTableRules`).
    fn finish(self) -> Vec<NftTable> {
        let mut tables = Vec::new();
        for (name, rules) in TABLES.into_iter().zip(self.rules) {
            if rules.is_empty() {
                continue;
            }
            let chains = declared_chains(name)
                .iter()
                .filter(|c| rules.iter().any(|r| r.chain == c.name))
                .copied()
                .collect();
            let mut count: Vec<(&str, usize)> = Vec::new();
            let rules = rules
                .into_iter()
                .map(|mut r| {
                    let n = match count.iter_mut().find(|(c, _)| *c == r.chain) {
                        Some((_, n)) => n,
                        None => {
                            count.push((r.chain, 0));
                            &mut count.last_mut().expect("just pushed").1
                        }
                    };
                    if r.index.is_some_and(|i| *n == 0 || i >= *n) {
                        r.index = None;
                    }
                    *n += 1;
                    r
                })
                .collect();
            tables.push(NftTable {
                name,
                chains,
                rules,
            });
        }
        tables
    }
}

fn is_v4(net: &IpNet) -> bool {
    matches!(net, IpNet::V4(_))
}

/// Builds the nftables ruleset of a pod. IPv6 rules are included when `ipv6` is set (the
/// pod has an IPv6 address) or the redirect asks for dual stack.
pub fn build(r: &Redirect, ipv6: bool) -> NftRuleset {
    use self::{MANGLE_TABLE as MANGLE, NAT_TABLE as NAT};
    let ipv6 = ipv6 || r.dual_stack;
    let mut b = Builder {
        ipv6,
        rules: Default::default(),
    };
    let tproxy = r.mode == InterceptionMode::Tproxy;
    let tunnel = INBOUND_TUNNEL_PORT;
    let (uid, gid) = (r.proxy_uid, r.proxy_gid);
    let dns = r.dns_capture;

    // Interfaces that are never captured, and virtual interfaces not captured as inbound.
    for i in &r.exclude_interfaces {
        b.append(NAT, PREROUTING, format!("iifname {i} counter return"));
        b.append(NAT, OUTPUT, format!("oifname {i} counter return"));
    }
    if tproxy {
        for i in &r.exclude_interfaces {
            b.append(MANGLE, PREROUTING, format!("iifname {i} counter return"));
            b.append(MANGLE, OUTPUT, format!("oifname {i} counter return"));
        }
    }
    for i in &r.reroute_virtual_interfaces {
        b.insert(NAT, PREROUTING, 0, format!("iifname {i} counter return"));
    }
    if r.invalid_drop {
        b.append(
            MANGLE,
            PREROUTING,
            format!("meta l4proto tcp ct state invalid counter jump {ISTIO_DROP}"),
        );
        b.append(MANGLE, ISTIO_DROP, "counter drop");
    }

    b.append(
        NAT,
        ISTIO_INBOUND,
        format!("meta l4proto tcp tcp dport {tunnel} counter return"),
    );
    b.append(
        NAT,
        ISTIO_REDIRECT,
        format!("meta l4proto tcp counter redirect to :{OUTBOUND_CAPTURE_PORT}"),
    );
    b.append(
        NAT,
        ISTIO_IN_REDIRECT,
        format!("meta l4proto tcp counter redirect to :{INBOUND_CAPTURE_PORT}"),
    );
    inbound(&mut b, r);

    // Outbound.
    b.append(NAT, OUTPUT, format!("counter jump {ISTIO_OUTPUT}"));
    for p in &r.exclude_outbound_ports {
        b.append(NAT, ISTIO_OUTPUT, format!("tcp dport {p} counter return"));
        b.append(NAT, ISTIO_OUTPUT, format!("udp dport {p} counter return"));
    }
    b.append(
        NAT,
        ISTIO_OUTPUT,
        "oifname lo ip saddr 127.0.0.6/32 counter return",
    );
    b.append6(
        NAT,
        ISTIO_OUTPUT,
        "oifname lo ip6 saddr ::6/128 counter return",
    );
    let include_has_loopback = match &r.include_outbound_ip_ranges {
        IpRanges::All => false,
        IpRanges::List(nets) => nets.iter().any(|n| n.addr().is_loopback()),
    };
    // For the proxy's UID, then its GID (see the iptables builder); as upstream, the port
    // 53 exception of the redirect back to inbound applies to the UID match only.
    for (owner, id) in [("skuid", uid), ("skgid", gid)] {
        let dports = if dns && owner == "skuid" {
            format!("{{ 53, {tunnel} }}")
        } else {
            tunnel.to_string()
        };
        b.append(NAT, ISTIO_OUTPUT, format!(
            "oifname lo meta l4proto tcp ip daddr != {LOOPBACK_V4} tcp dport != {dports} {owner} {id} counter jump {ISTIO_IN_REDIRECT}"));
        b.append6(NAT, ISTIO_OUTPUT, format!(
            "oifname lo meta l4proto tcp ip6 daddr != {LOOPBACK_V6} tcp dport != {dports} {owner} {id} counter jump {ISTIO_IN_REDIRECT}"));
        if !include_has_loopback {
            if dns {
                b.append(
                    NAT,
                    ISTIO_OUTPUT,
                    format!("oifname lo meta l4proto tcp tcp dport != 53 {owner} != {id} counter return"),
                );
            } else {
                b.append(
                    NAT,
                    ISTIO_OUTPUT,
                    format!("oifname lo {owner} != {id} counter return"),
                );
            }
        }
        b.append(NAT, ISTIO_OUTPUT, format!("{owner} {id} counter return"));
    }
    if dns {
        dns_capture(&mut b, uid, gid);
    }

    b.append(
        NAT,
        ISTIO_OUTPUT,
        format!("ip daddr {LOOPBACK_V4} counter return"),
    );
    b.append6(
        NAT,
        ISTIO_OUTPUT,
        format!("ip6 daddr {LOOPBACK_V6} counter return"),
    );
    let (v4, v6): (Vec<&IpNet>, Vec<&IpNet>) =
        r.exclude_outbound_ip_ranges.iter().partition(|n| is_v4(n));
    for net in v4 {
        b.append(NAT, ISTIO_OUTPUT, format!("ip daddr {net} counter return"));
    }
    for net in v6 {
        b.append6(NAT, ISTIO_OUTPUT, format!("ip6 daddr {net} counter return"));
    }
    for p in &r.include_outbound_ports {
        b.append(
            NAT,
            ISTIO_OUTPUT,
            format!("tcp dport {p} counter jump {ISTIO_REDIRECT}"),
        );
    }
    match &r.include_outbound_ip_ranges {
        IpRanges::All => {
            b.append(NAT, ISTIO_OUTPUT, format!("counter jump {ISTIO_REDIRECT}"));
            for i in &r.reroute_virtual_interfaces {
                b.insert(
                    NAT,
                    PREROUTING,
                    0,
                    format!("iifname {i} counter jump {ISTIO_REDIRECT}"),
                );
            }
        }
        IpRanges::List(nets) => {
            let (v4, v6): (Vec<&IpNet>, Vec<&IpNet>) = nets.iter().partition(|n| is_v4(n));
            for net in v4 {
                for i in &r.reroute_virtual_interfaces {
                    b.insert(
                        NAT,
                        PREROUTING,
                        0,
                        format!("iifname {i} ip daddr {net} counter jump {ISTIO_REDIRECT}"),
                    );
                }
                b.append(
                    NAT,
                    ISTIO_OUTPUT,
                    format!("ip daddr {net} counter jump {ISTIO_REDIRECT}"),
                );
            }
            for net in v6 {
                for i in &r.reroute_virtual_interfaces {
                    b.insert6(
                        NAT,
                        PREROUTING,
                        0,
                        format!("iifname {i} ip6 daddr {net} counter jump {ISTIO_REDIRECT}"),
                    );
                }
                b.append6(
                    NAT,
                    ISTIO_OUTPUT,
                    format!("ip6 daddr {net} counter jump {ISTIO_REDIRECT}"),
                );
            }
        }
    }

    if tproxy {
        tproxy_marks(&mut b, uid, gid);
    }
    NftRuleset {
        tables: b.finish(),
        local_delivery: (tproxy && r.include_inbound_ports != PortSet::List(Vec::new()))
            .then_some(super::iptables::TPROXY_DELIVERY),
        proxy_uid: uid,
        probe_port: probe_port(r),
        ipv6,
    }
}

/// Inbound capture: prerouting → istio-inbound → (redirect | TPROXY).
fn inbound(b: &mut Builder, r: &Redirect) {
    use self::{MANGLE_TABLE as MANGLE, NAT_TABLE as NAT};
    if r.include_inbound_ports == PortSet::List(Vec::new()) {
        return;
    }
    if r.mode == InterceptionMode::Tproxy {
        b.append(
            MANGLE,
            ISTIO_DIVERT,
            format!("counter meta mark set {TPROXY_MARK}"),
        );
        b.append(MANGLE, ISTIO_DIVERT, "counter accept");
        b.append(MANGLE, ISTIO_TPROXY, format!(
            "meta l4proto tcp ip daddr != {LOOPBACK_V4} tproxy ip to :{INBOUND_CAPTURE_PORT} meta mark set {TPROXY_MARK} counter accept"));
        b.append6(MANGLE, ISTIO_TPROXY, format!(
            "meta l4proto tcp ip6 daddr != {LOOPBACK_V6} tproxy ip6 to :{INBOUND_CAPTURE_PORT} meta mark set {TPROXY_MARK} counter accept"));
        b.append(
            MANGLE,
            PREROUTING,
            format!("meta l4proto tcp counter jump {ISTIO_INBOUND}"),
        );
        match &r.include_inbound_ports {
            PortSet::All => {
                for p in &r.exclude_inbound_ports {
                    b.append(
                        MANGLE,
                        ISTIO_INBOUND,
                        format!("meta l4proto tcp tcp dport {p} counter return"),
                    );
                }
                b.append(
                    MANGLE,
                    ISTIO_INBOUND,
                    format!(
                        "meta l4proto tcp ct state related,established counter jump {ISTIO_DIVERT}"
                    ),
                );
                b.append(
                    MANGLE,
                    ISTIO_INBOUND,
                    format!("meta l4proto tcp counter jump {ISTIO_TPROXY}"),
                );
            }
            PortSet::List(ports) => {
                for p in ports {
                    b.append(MANGLE, ISTIO_INBOUND, format!(
                        "meta l4proto tcp ct state related,established tcp dport {p} counter jump {ISTIO_DIVERT}"));
                    b.append(
                        MANGLE,
                        ISTIO_INBOUND,
                        format!("meta l4proto tcp tcp dport {p} counter jump {ISTIO_TPROXY}"),
                    );
                }
            }
        }
        return;
    }
    b.append(
        NAT,
        PREROUTING,
        format!("meta l4proto tcp counter jump {ISTIO_INBOUND}"),
    );
    match &r.include_inbound_ports {
        PortSet::All => {
            for p in &r.exclude_inbound_ports {
                b.append(
                    NAT,
                    ISTIO_INBOUND,
                    format!("meta l4proto tcp tcp dport {p} counter return"),
                );
            }
            b.append(
                NAT,
                ISTIO_INBOUND,
                format!("meta l4proto tcp counter jump {ISTIO_IN_REDIRECT}"),
            );
        }
        PortSet::List(ports) => {
            for p in ports {
                b.append(
                    NAT,
                    ISTIO_INBOUND,
                    format!("meta l4proto tcp tcp dport {p} counter jump {ISTIO_IN_REDIRECT}"),
                );
            }
        }
    }
}

/// DNS capture to the agent's port (capture-all, as in CNI mode), with the proxy's
/// upstream queries and the agent's answers in separate conntrack zones (1 and 2).
fn dns_capture(b: &mut Builder, uid: u32, gid: u32) {
    use self::{NAT_TABLE as NAT, RAW_TABLE as RAW};
    let dns = DNS_CAPTURE_PORT;
    b.append(RAW, OUTPUT, format!("counter jump {ISTIO_OUTPUT_DNS}"));
    b.append(
        NAT,
        ISTIO_OUTPUT,
        format!("counter jump {ISTIO_OUTPUT_DNS}"),
    );
    b.append(
        NAT,
        ISTIO_OUTPUT_DNS,
        format!("meta l4proto tcp tcp dport 53 counter redirect to :{dns}"),
    );
    b.append(
        NAT,
        ISTIO_OUTPUT_DNS,
        format!("udp dport 53 counter redirect to :{dns}"),
    );
    for (owner, id) in [("skuid", uid), ("skgid", gid)] {
        b.append(
            RAW,
            ISTIO_OUTPUT_DNS,
            format!("udp dport 53 meta {owner} {id} counter ct zone set 1"),
        );
        b.append(
            RAW,
            ISTIO_OUTPUT_DNS,
            format!("udp sport {dns} meta {owner} {id} counter ct zone set 2"),
        );
    }
    b.append(RAW, PREROUTING, format!("counter jump {ISTIO_INBOUND}"));
    b.append(RAW, ISTIO_OUTPUT_DNS, "udp dport 53 counter ct zone set 2");
    b.append(RAW, ISTIO_INBOUND, "udp sport 53 counter ct zone set 1");
}

/// TPROXY marks: keep the original-source mark on the connection, mark the proxy's
/// packets to the workload, and keep those out of istio-inbound.
fn tproxy_marks(b: &mut Builder, uid: u32, gid: u32) {
    use self::MANGLE_TABLE as MANGLE;
    b.append(
        MANGLE,
        PREROUTING,
        format!("meta l4proto tcp mark {TPROXY_MARK} counter ct mark set mark"),
    );
    b.append(
        MANGLE,
        OUTPUT,
        format!("oifname lo meta l4proto tcp mark {TPROXY_MARK} counter return"),
    );
    for (owner, id) in [("skuid", uid), ("skgid", gid)] {
        b.append(MANGLE, OUTPUT, format!(
            "oifname lo meta l4proto tcp ip daddr != {LOOPBACK_V4} {owner} {id} counter meta mark set {OUTBOUND_MARK}"));
        b.append6(MANGLE, OUTPUT, format!(
            "oifname lo meta l4proto tcp ip6 daddr != {LOOPBACK_V6} {owner} {id} counter meta mark set {OUTBOUND_MARK}"));
    }
    b.append(
        MANGLE,
        OUTPUT,
        format!("meta l4proto tcp ct mark {TPROXY_MARK} counter meta mark set ct mark"),
    );
    b.insert(
        MANGLE,
        ISTIO_INBOUND,
        0,
        format!("meta l4proto tcp mark {TPROXY_MARK} counter return"),
    );
    b.insert(
        MANGLE,
        ISTIO_INBOUND,
        1,
        "iifname lo meta l4proto tcp ip saddr 127.0.0.6/32 counter return",
    );
    b.insert6(
        MANGLE,
        ISTIO_INBOUND,
        1,
        "iifname lo meta l4proto tcp ip6 saddr ::6/128 counter return",
    );
    b.insert(
        MANGLE,
        ISTIO_INBOUND,
        2,
        format!("iifname lo meta l4proto tcp mark != {OUTBOUND_MARK} counter return"),
    );
}

/// `tables` as one `nft -f` transaction, one command per line, in upstream's order and
/// spelling: per table `add table`, `flush table` (which keeps the table's sets), `add
/// chain` (a base chain with its `{ type … hook … priority … ; }`), then `add rule`, or
/// `insert rule … index N` for a rule with an index. Shared by every builder of ours.
pub fn transaction_text(tables: &[NftTable]) -> String {
    let mut out = String::new();
    for t in tables {
        let name = t.name;
        let _ = writeln!(out, "add table inet {name}");
        let _ = writeln!(out, "flush table inet {name}");
        for c in &t.chains {
            match c.base {
                Some(spec) => {
                    let _ = writeln!(out, "add chain inet {name} {} {{ {spec} ; }}", c.name);
                }
                None => {
                    let _ = writeln!(out, "add chain inet {name} {}", c.name);
                }
            }
        }
        for r in &t.rules {
            match r.index {
                Some(i) => {
                    let _ = writeln!(
                        out,
                        "insert rule inet {name} {} index {i} {}",
                        r.chain, r.expr
                    );
                }
                None => {
                    let _ = writeln!(out, "add rule inet {name} {} {}", r.chain, r.expr);
                }
            }
        }
    }
    out
}
