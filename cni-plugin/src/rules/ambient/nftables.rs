//! Ambient mode's rules as nftables transactions, in the order and spelling of upstream
//! Istio's `cni/pkg/nftables/nftables.go` (`AppendInpodRules`,
//! `CreateHostRulesForHealthChecks`), so that `nft -f` of
//! [`AmbientNftRuleset::transaction`] writes what upstream writes. Pure: no I/O.
//!
//! In a pod: three `inet` tables, each present only when it has rules, in this order:
//! [`NAT_TABLE`] (REDIRECT), [`MANGLE_TABLE`] (marks) and [`RAW_TABLE`] (DNS conntrack
//! zones). On the node: [`NAT_TABLE`] with one base chain, `postrouting`, for the probe
//! SNAT; the probe sets ([`PROBE_SET_V4`], [`PROBE_SET_V6`]) live in that table too, but
//! are created and filled by the node agent, not by this transaction. Each table is added
//! and then flushed in the same transaction (which keeps a table's sets and their
//! elements), so applying it replaces the rules an earlier run left, atomically. IPv4 and
//! IPv6 rules share the tables; the IPv6 ones are written with [`NodeSettings::ipv6`].
//!
//! The tables, chains and rules reuse the sidecar backend's types
//! ([`NftTable`], [`NftChain`], [`NftRule`]), and the transaction is printed the same way.

use super::{
    NodeSettings, PodOverrides, DNS_CAPTURE_PORT, DNS_CONNTRACK_ZONE, INPOD_MARK, INPOD_MASK,
    INPOD_TPROXY_MARK, INPOD_TPROXY_MASK, LOOPBACK_V4, LOOPBACK_V6, MANGLE_TABLE, NAT_TABLE,
    PROBE_SET_V4, PROBE_SET_V6, RAW_TABLE, ZTUNNEL_INBOUND_PLAINTEXT_PORT, ZTUNNEL_INBOUND_PORT,
    ZTUNNEL_OUTBOUND_PORT,
};
use crate::rules::nftables::{transaction_text, NftChain, NftRule, NftTable};

/// Every table the in-pod rules may have, in the order of the transaction.
pub const INPOD_TABLES: [&str; 3] = [NAT_TABLE, MANGLE_TABLE, RAW_TABLE];

/// Base chain hooked into prerouting (each in-pod table). Upstream: `PreroutingChain` in
/// `cni/pkg/nftables/nftables.go`.
pub const PREROUTING: &str = "prerouting";
/// Base chain hooked into output (each in-pod table). Upstream: `OutputChain` in
/// `cni/pkg/nftables/nftables.go`.
pub const OUTPUT: &str = "output";
/// Base chain hooked into postrouting (the node's table). Upstream: `PostroutingChain` in
/// `cni/pkg/nftables/nftables.go`.
pub const POSTROUTING: &str = "postrouting";
/// Regular chain of the in-pod prerouting rules, jumped to from [`PREROUTING`]. Upstream:
/// `IstioPreroutingChain` in `cni/pkg/nftables/nftables.go`.
pub const ISTIO_PREROUTING: &str = "istio-prerouting";
/// Regular chain of the in-pod output rules, jumped to from [`OUTPUT`]. Upstream:
/// `IstioOutputChain` in `cni/pkg/nftables/nftables.go`.
pub const ISTIO_OUTPUT: &str = "istio-output";

/// The ambient rules of one netns (a pod's, or the node's) as one nftables transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmbientNftRuleset {
    /// The tables that have rules, in transaction order.
    pub tables: Vec<NftTable>,
    /// Whether IPv6 rules are in.
    pub ipv6: bool,
}

impl AmbientNftRuleset {
    /// The whole transaction, one `nft` command per line, as `nft -f` takes it and as
    /// upstream's goldens print it: per table, `add table`, `flush table`, `add chain`,
    /// then `add rule` (`insert rule … index N` for a rule with an index; these builders
    /// make none).
    pub fn transaction(&self) -> String {
        transaction_text(&self.tables)
    }

    /// The names of the tables this transaction writes.
    pub fn table_names(&self) -> Vec<&'static str> {
        self.tables.iter().map(|t| t.name).collect()
    }

    /// In-pod rules as the ruleset the nftables backend's shared apply and read-back path
    /// takes: these tables, with ambient's policy routing ([`super::INPOD_DELIVERY`]) and
    /// no loopback probe (ztunnel's listeners prove the capture instead).
    pub fn ruleset(&self) -> crate::rules::nftables::NftRuleset {
        crate::rules::nftables::NftRuleset {
            tables: self.tables.clone(),
            local_delivery: Some(super::INPOD_DELIVERY),
            proxy_uid: 0,
            probe_port: None,
            ipv6: self.ipv6,
        }
    }
}

const fn base(name: &'static str, spec: &'static str) -> NftChain {
    NftChain::base(name, spec)
}

const fn plain(name: &'static str) -> NftChain {
    NftChain::plain(name)
}

/// The chains a table may have, in the order upstream declares them (and so adds them),
/// with knftables' priorities: dstnat -100, mangle -150, raw -300, srcnat 100.
fn declared_chains(table: &str, host: bool) -> &'static [NftChain] {
    const NAT: &[NftChain] = &[
        base(PREROUTING, "type nat hook prerouting priority -100"),
        base(OUTPUT, "type nat hook output priority -100"),
        plain(ISTIO_PREROUTING),
        plain(ISTIO_OUTPUT),
    ];
    const MANGLE: &[NftChain] = &[
        base(PREROUTING, "type filter hook prerouting priority -150"),
        base(OUTPUT, "type route hook output priority -150"),
        plain(ISTIO_PREROUTING),
        plain(ISTIO_OUTPUT),
    ];
    const RAW: &[NftChain] = &[
        base(PREROUTING, "type filter hook prerouting priority -300"),
        base(OUTPUT, "type filter hook output priority -300"),
        plain(ISTIO_PREROUTING),
        plain(ISTIO_OUTPUT),
    ];
    const HOST: &[NftChain] = &[base(POSTROUTING, "type nat hook postrouting priority 100")];
    match (host, table) {
        (true, _) => HOST,
        (false, NAT_TABLE) => NAT,
        (false, MANGLE_TABLE) => MANGLE,
        _ => RAW,
    }
}

/// Collects rules per table in the order upstream adds them; `*6` variants only with
/// IPv6 (upstream's `AppendV6RuleIfSupported`).
struct Builder {
    ipv6: bool,
    host: bool,
    rules: [Vec<NftRule>; 3],
}

impl Builder {
    fn new(ipv6: bool, host: bool) -> Builder {
        Builder {
            ipv6,
            host,
            rules: Default::default(),
        }
    }

    fn append(&mut self, table: &str, chain: &'static str, expr: impl Into<String>) {
        let slot = INPOD_TABLES.iter().position(|t| *t == table).unwrap_or(2);
        self.rules[slot].push(NftRule {
            chain,
            index: None,
            expr: expr.into(),
        });
    }

    fn append6(&mut self, table: &str, chain: &'static str, expr: impl Into<String>) {
        if self.ipv6 {
            self.append(table, chain, expr);
        }
    }

    /// The tables with rules, each with its declared chains that have rules or are
    /// jumped to (upstream's `addIstioTableRules`).
    fn finish(self) -> AmbientNftRuleset {
        let mut tables = Vec::new();
        for (name, rules) in INPOD_TABLES.into_iter().zip(self.rules) {
            if rules.is_empty() {
                continue;
            }
            let jumped_to = |chain: &str| {
                rules.iter().any(|r| {
                    let words: Vec<&str> = r.expr.split_whitespace().collect();
                    words.windows(2).any(|w| w == ["jump", chain])
                })
            };
            let chains = declared_chains(name, self.host)
                .iter()
                .filter(|c| rules.iter().any(|r| r.chain == c.name) || jumped_to(c.name))
                .copied()
                .collect();
            tables.push(NftTable {
                name,
                chains,
                rules,
            });
        }
        AmbientNftRuleset {
            tables,
            ipv6: self.ipv6,
        }
    }
}

/// Builds the transaction written inside a pod's netns: upstream's `AppendInpodRules`
/// (`cni/pkg/nftables/nftables.go`), for the node's settings and the pod's overrides. The
/// same redirection as [`super::iptables::build_inpod`].
///
/// Two rules keep a doubled space where upstream's fragments have a trailing space
/// (`mark and 0xfff  != 0x539` in the IPv4 inbound redirect, `|  0x111` in the mangle
/// rule), so that the transaction equals upstream's line for line; nft reads them as with
/// one space.
pub fn build_inpod(node: &NodeSettings, pod: &PodOverrides) -> AmbientNftRuleset {
    let (nat, mangle, raw) = (NAT_TABLE, MANGLE_TABLE, RAW_TABLE);
    let dns = node.dns_capture_for(pod);
    let (v4, v6) = (node.host_probe_snat_v4, node.host_probe_snat_v6);
    let (mark, mask) = (format!("{INPOD_MARK:#x}"), format!("{INPOD_MASK:#x}"));
    let (conn_mark, conn_mask) = (
        format!("{INPOD_TPROXY_MARK:#x}"),
        format!("{INPOD_TPROXY_MASK:#x}"),
    );
    let zone = DNS_CONNTRACK_ZONE;
    let mut b = Builder::new(node.ipv6, false);

    // Jumps from the base chains into ours.
    b.append(mangle, PREROUTING, format!("jump {ISTIO_PREROUTING}"));
    b.append(mangle, OUTPUT, format!("jump {ISTIO_OUTPUT}"));
    b.append(nat, OUTPUT, format!("jump {ISTIO_OUTPUT}"));
    if dns {
        b.append(raw, PREROUTING, format!("jump {ISTIO_PREROUTING}"));
        b.append(raw, OUTPUT, format!("jump {ISTIO_OUTPUT}"));
    }
    b.append(nat, PREROUTING, format!("jump {ISTIO_PREROUTING}"));

    // Virtual interfaces first: their inbound TCP is outbound traffic.
    for i in &pod.virtual_interfaces {
        b.append(
            nat,
            ISTIO_PREROUTING,
            format!("iifname {i} meta l4proto tcp counter redirect to :{ZTUNNEL_OUTBOUND_PORT}"),
        );
        b.append(
            nat,
            ISTIO_PREROUTING,
            format!("iifname {i} meta l4proto tcp counter return"),
        );
    }

    b.append(
        mangle,
        ISTIO_PREROUTING,
        format!(
            "meta mark & {mask} == {mark} counter ct mark set ct mark & {:#x} |  {conn_mark}",
            !INPOD_TPROXY_MASK
        ),
    );
    // Kubelet's probes, SNATed on the node, and their replies are never captured.
    if !pod.ingress_mode {
        b.append(
            nat,
            ISTIO_PREROUTING,
            format!("meta l4proto tcp ip saddr {v4} counter accept"),
        );
        b.append6(
            nat,
            ISTIO_PREROUTING,
            format!("meta l4proto tcp ip6 saddr {v6} counter accept"),
        );
    }
    b.append(
        nat,
        ISTIO_OUTPUT,
        format!("meta l4proto tcp ip daddr {v4} counter accept"),
    );
    b.append6(
        nat,
        ISTIO_OUTPUT,
        format!("meta l4proto tcp ip6 daddr {v6} counter accept"),
    );
    if !pod.ingress_mode {
        let (hbone, inbound) = (ZTUNNEL_INBOUND_PORT, ZTUNNEL_INBOUND_PLAINTEXT_PORT);
        b.append(nat, ISTIO_PREROUTING, format!(
            "ip daddr != {LOOPBACK_V4} tcp dport != {hbone} mark and {mask}  != {mark} counter redirect to :{inbound}"));
        b.append6(nat, ISTIO_PREROUTING, format!(
            "ip6 daddr != {LOOPBACK_V6} tcp dport != {hbone} mark and {mask} != {mark} counter redirect to :{inbound}"));
    }
    b.append(
        mangle,
        ISTIO_OUTPUT,
        format!("ct mark and {conn_mask} == {conn_mark} counter meta mark set ct mark"),
    );

    if dns {
        let port = DNS_CAPTURE_PORT;
        b.append(
            nat,
            ISTIO_OUTPUT,
            format!(
                "oifname != lo mark and {mask} != {mark} udp dport 53 counter redirect to :{port}"
            ),
        );
        b.append(nat, ISTIO_OUTPUT, format!(
            "ip daddr != {LOOPBACK_V4} tcp dport 53 mark and {mask} != {mark} counter redirect to :{port}"));
        b.append6(nat, ISTIO_OUTPUT, format!(
            "ip6 daddr != {LOOPBACK_V6} tcp dport 53 mark and {mask} != {mark} counter redirect to :{port}"));
        b.append(
            raw,
            ISTIO_OUTPUT,
            format!("udp dport 53 meta mark and {mask} == {mark} counter ct zone set {zone}"),
        );
        b.append(
            raw,
            ISTIO_PREROUTING,
            format!("udp sport 53 meta mark and {mask} != {mark} counter ct zone set {zone}"),
        );
    }

    b.append(
        nat,
        ISTIO_OUTPUT,
        format!("meta l4proto tcp mark and {conn_mask} == {conn_mark} counter accept"),
    );
    // The pod calling itself over lo on one of its own addresses.
    b.append(
        nat,
        ISTIO_OUTPUT,
        format!("oifname lo ip daddr != {LOOPBACK_V4} counter accept"),
    );
    b.append6(
        nat,
        ISTIO_OUTPUT,
        format!("oifname lo ip6 daddr != {LOOPBACK_V6} counter accept"),
    );
    let outbound = ZTUNNEL_OUTBOUND_PORT;
    b.append(nat, ISTIO_OUTPUT, format!(
        "meta l4proto tcp ip daddr != {LOOPBACK_V4} mark and {mask} != {mark} counter redirect to :{outbound}"));
    b.append6(nat, ISTIO_OUTPUT, format!(
        "meta l4proto tcp ip6 daddr != {LOOPBACK_V6} mark and {mask} != {mark} counter redirect to :{outbound}"));
    b.finish()
}

/// Builds the transaction written in the node's netns for kubelet's probes: upstream's
/// `CreateHostRulesForHealthChecks` (`cni/pkg/nftables/nftables.go`). TCP sent by a socket
/// of `kubelet_uid` (`skuid`; nftables has no `--socket-exists`) to a pod address in the
/// probe set ([`PROBE_SET_V4`], and [`PROBE_SET_V6`] with IPv6) is SNATed to the node's
/// probe address.
///
/// `kubelet_uid`: the UID kubelet runs as on this node (upstream finds it in `/proc`, in
/// `cni/pkg/nftables/kubeletuid_linux.go`).
pub fn build_host_probe(node: &NodeSettings, kubelet_uid: u32) -> AmbientNftRuleset {
    let (v4, v6) = (node.host_probe_snat_v4, node.host_probe_snat_v6);
    let mut b = Builder::new(node.ipv6, true);
    b.append(
        NAT_TABLE,
        POSTROUTING,
        format!(
            "meta l4proto tcp skuid {kubelet_uid} ip daddr @{PROBE_SET_V4} counter snat to {v4}"
        ),
    );
    b.append6(
        NAT_TABLE,
        POSTROUTING,
        format!(
            "meta l4proto tcp skuid {kubelet_uid} ip6 daddr @{PROBE_SET_V6} counter snat to {v6}"
        ),
    );
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::ambient::DnsOverride;

    #[test]
    fn tables_only_when_they_have_rules() {
        let no_dns = PodOverrides {
            dns: DnsOverride::Disabled,
            ..PodOverrides::default()
        };
        let node = NodeSettings::new(true, false);
        assert_eq!(
            build_inpod(&node, &PodOverrides::default()).table_names(),
            INPOD_TABLES
        );
        assert_eq!(
            build_inpod(&node, &no_dns).table_names(),
            [NAT_TABLE, MANGLE_TABLE]
        );
        assert_eq!(build_host_probe(&node, 0).table_names(), [NAT_TABLE]);
    }

    #[test]
    fn one_counter_per_rule_and_ipv6_rules_only_with_ipv6() {
        let pod = PodOverrides::default();
        for ipv6 in [false, true] {
            let node = NodeSettings::new(true, ipv6);
            for set in [build_inpod(&node, &pod), build_host_probe(&node, 7)] {
                let text = set.transaction();
                for rule in text.lines().filter(|l| l.starts_with("add rule ")) {
                    if !rule.contains(" jump ") {
                        assert_eq!(rule.matches(" counter ").count(), 1, "{rule}");
                    }
                }
                assert_eq!(text.contains(" ip6 "), ipv6, "{text}");
            }
        }
    }

    #[test]
    fn the_kubelet_uid_and_the_probe_addresses_are_inputs() {
        let mut node = NodeSettings::new(false, true);
        node.host_probe_snat_v4 = "169.254.1.2".parse().unwrap();
        node.host_probe_snat_v6 = "fd00::7".parse().unwrap();
        let text = build_host_probe(&node, 4242).transaction();
        assert!(text
            .contains("skuid 4242 ip daddr @istio-inpod-probes-v4 counter snat to 169.254.1.2\n"));
        assert!(
            text.contains("skuid 4242 ip6 daddr @istio-inpod-probes-v6 counter snat to fd00::7\n")
        );
    }
}
