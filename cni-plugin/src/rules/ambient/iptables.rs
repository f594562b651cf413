//! Ambient mode's rules in iptables form, in the order and spelling of upstream Istio's
//! `cni/pkg/iptables/iptables.go` (`AppendInpodRules`, `AppendHostRules`), so that
//! `iptables-restore --noflush` of [`AmbientIptables`]'s restore text writes what upstream
//! writes. Pure: no I/O.
//!
//! The rules reuse the sidecar's types ([`Rule`], [`FamilyRules`]), so their restore text
//! is printed the same way: per table (`mangle`, `nat`, `raw`), `* table`, one `-N` per
//! chain of ours, the rules in order, `COMMIT`. The ambient chains (`ISTIO_PRERT`,
//! `ISTIO_OUTPUT`, `ISTIO_POSTRT`) carry the sidecar's `ISTIO_` prefix, so
//! [`is_own_chain`](crate::rules::is_own_chain) knows them.

use super::{
    NodeSettings, PodOverrides, CHAIN_HOST_POSTROUTING as POSTRT, CHAIN_INPOD_OUTPUT as OUTPUT,
    CHAIN_INPOD_PREROUTING as PRERT, DNS_CAPTURE_PORT, DNS_CONNTRACK_ZONE, INPOD_MARK, INPOD_MASK,
    INPOD_RESTORE_MASK, INPOD_TPROXY_MARK, INPOD_TPROXY_MASK, LOOPBACK_V4, LOOPBACK_V6,
    PROBE_SET_V4, PROBE_SET_V6, ZTUNNEL_INBOUND_PLAINTEXT_PORT, ZTUNNEL_INBOUND_PORT,
    ZTUNNEL_OUTBOUND_PORT,
};
use crate::rules::{Family, FamilyRules, Rule, Table};

/// The ambient rules of one netns (a pod's, or the node's): IPv4, and IPv6 when
/// [`NodeSettings::ipv6`] is on. Each family is one `iptables-restore` (`ip6tables-restore`)
/// input, as upstream runs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmbientIptables {
    /// The IPv4 rules.
    pub v4: FamilyRules,
    /// The IPv6 rules, when IPv6 is on.
    pub v6: Option<FamilyRules>,
}

impl AmbientIptables {
    /// The families, IPv4 first.
    pub fn families(&self) -> Vec<&FamilyRules> {
        std::iter::once(&self.v4).chain(&self.v6).collect()
    }

    /// In-pod rules as the ruleset the shared apply and read-back path takes: these
    /// families, with ambient's policy routing ([`super::INPOD_DELIVERY`]) and no loopback
    /// probe (ztunnel's listeners prove the capture instead).
    pub fn ruleset(&self) -> crate::rules::Ruleset {
        crate::rules::Ruleset {
            families: self.families().into_iter().cloned().collect(),
            local_delivery: Some(super::INPOD_DELIVERY),
            proxy_uid: 0,
            probe_port: None,
        }
    }

    /// The rules of `family`, if that family is programmed.
    pub fn family(&self, family: Family) -> Option<&FamilyRules> {
        self.families().into_iter().find(|f| f.family == family)
    }
}

/// Collects the rules of both families in order. Each rule is written as iptables text:
/// every interpolated value is a number, an address or an
/// [`InterfaceName`](crate::redirect::InterfaceName), none of which holds whitespace, so
/// splitting on whitespace yields exactly the tokens.
struct Builder {
    families: Vec<FamilyRules>,
}

impl Builder {
    fn new(ipv6: bool) -> Builder {
        let mut families = vec![Family::V4];
        if ipv6 {
            families.push(Family::V6);
        }
        Builder {
            families: families
                .into_iter()
                .map(|family| FamilyRules {
                    family,
                    rules: Vec::new(),
                })
                .collect(),
        }
    }

    fn push(&mut self, family: Family, rule: Rule) {
        if let Some(f) = self.families.iter_mut().find(|f| f.family == family) {
            f.rules.push(rule);
        }
    }

    /// Adds a rule to every family; its text may depend on the family (upstream's
    /// `AppendVersionedRule`, or `AppendRule` when it does not).
    fn each(
        &mut self,
        table: Table,
        chain: &str,
        position: Option<u32>,
        text: impl Fn(Family) -> String,
    ) {
        let families: Vec<Family> = self.families.iter().map(|f| f.family).collect();
        for family in families {
            let rule = Rule {
                table,
                chain: chain.to_owned(),
                position,
                args: text(family).split_whitespace().map(str::to_owned).collect(),
            };
            self.push(family, rule);
        }
    }

    /// Appends a rule that is the same in every family.
    fn append(&mut self, table: Table, chain: &str, text: &str) {
        self.each(table, chain, None, |_| text.to_owned());
    }

    /// Appends a rule to one family only (upstream's `AppendRuleV4` / `AppendRuleV6`); a
    /// no-op for a family that is not programmed.
    fn append_to(&mut self, family: Family, table: Table, chain: &str, text: &str) {
        let rule = Rule {
            table,
            chain: chain.to_owned(),
            position: None,
            args: text.split_whitespace().map(str::to_owned).collect(),
        };
        self.push(family, rule);
    }

    fn finish(self) -> AmbientIptables {
        let mut families = self.families.into_iter();
        let v4 = families.next().unwrap_or(FamilyRules {
            family: Family::V4,
            rules: Vec::new(),
        });
        AmbientIptables {
            v4,
            v6: families.next(),
        }
    }
}

fn loopback(family: Family) -> &'static str {
    match family {
        Family::V4 => LOOPBACK_V4,
        Family::V6 => LOOPBACK_V6,
    }
}

fn probe_snat(node: &NodeSettings, family: Family) -> String {
    match family {
        Family::V4 => node.host_probe_snat_v4.to_string(),
        Family::V6 => node.host_probe_snat_v6.to_string(),
    }
}

/// Builds the rules written inside a pod's netns: upstream's `AppendInpodRules`
/// (`cni/pkg/iptables/iptables.go`), for the node's settings and the pod's overrides.
///
/// In `mangle`: packets with ztunnel's mark give their connection the accepted-connection
/// mark, and replies on such connections get it back as packet mark. In `nat`: probes from
/// the node's SNAT address are let through, and everything else inbound that is not HBONE
/// goes to 15006 (both skipped in ingress mode); rerouted virtual interfaces go to 15001
/// first; outbound DNS goes to 15053 (with DNS capture), connections ztunnel accepted and
/// loopback traffic to the pod's own addresses are let through, and other outbound TCP
/// goes to 15001. In `raw` (with DNS capture): ztunnel's DNS exchanges with the resolvers
/// get conntrack zone 1.
pub fn build_inpod(node: &NodeSettings, pod: &PodOverrides) -> AmbientIptables {
    use Table::{Mangle, Nat, Raw};
    let dns = node.dns_capture_for(pod);
    let mark = format!("{INPOD_MARK:#x}/{INPOD_MASK:#x}");
    let conn_mark = format!("{INPOD_TPROXY_MARK:#x}/{INPOD_TPROXY_MASK:#x}");
    let mut b = Builder::new(node.ipv6);

    // Jumps from the built-in chains into ours.
    b.append(Mangle, "PREROUTING", &format!("-j {PRERT}"));
    b.append(Mangle, "OUTPUT", &format!("-j {OUTPUT}"));
    b.append(Nat, "OUTPUT", &format!("-j {OUTPUT}"));
    if dns {
        b.append(Raw, "PREROUTING", &format!("-j {PRERT}"));
        b.append(Raw, "OUTPUT", &format!("-j {OUTPUT}"));
    }
    b.append(Nat, "PREROUTING", &format!("-j {PRERT}"));

    // Virtual interfaces first: their inbound TCP is outbound traffic, to ztunnel's
    // outbound port, and then leaves our chain.
    for i in &pod.virtual_interfaces {
        b.append(
            Nat,
            PRERT,
            &format!("-i {i} -p tcp -j REDIRECT --to-ports {ZTUNNEL_OUTBOUND_PORT}"),
        );
        b.append(Nat, PRERT, &format!("-i {i} -p tcp -j RETURN"));
    }

    b.append(
        Mangle,
        PRERT,
        &format!("-m mark --mark {mark} -j CONNMARK --set-xmark {conn_mark}"),
    );
    // Kubelet's probes, SNATed on the node, and their replies are never captured.
    if !pod.ingress_mode {
        b.each(Nat, PRERT, None, |f| {
            format!("-s {} -p tcp -m tcp -j ACCEPT", probe_snat(node, f))
        });
    }
    b.each(Nat, OUTPUT, None, |f| {
        format!("-d {} -p tcp -m tcp -j ACCEPT", probe_snat(node, f))
    });
    if !pod.ingress_mode {
        b.each(Nat, PRERT, None, |f| {
            format!(
                "! -d {} -p tcp ! --dport {ZTUNNEL_INBOUND_PORT} -m mark ! --mark {mark} \
                 -j REDIRECT --to-ports {ZTUNNEL_INBOUND_PLAINTEXT_PORT}",
                loopback(f)
            )
        });
    }
    b.append(
        Mangle,
        OUTPUT,
        &format!(
            "-m connmark --mark {conn_mark} -j CONNMARK --restore-mark \
             --nfmask {INPOD_RESTORE_MASK:#x} --ctmask {INPOD_RESTORE_MASK:#x}"
        ),
    );

    if dns {
        // Upstream spells this one `--to-port`, the others `--to-ports`; iptables takes
        // both.
        b.append(
            Nat,
            OUTPUT,
            &format!(
                "! -o lo -p udp -m mark ! --mark {mark} -m udp --dport 53 \
                 -j REDIRECT --to-port {DNS_CAPTURE_PORT}"
            ),
        );
        b.each(Nat, OUTPUT, None, |f| {
            format!(
                "! -d {} -p tcp --dport 53 -m mark ! --mark {mark} \
                 -j REDIRECT --to-ports {DNS_CAPTURE_PORT}",
                loopback(f)
            )
        });
        b.append(
            Raw,
            OUTPUT,
            &format!(
                "-p udp -m mark --mark {mark} -m udp --dport 53 -j CT --zone {DNS_CONNTRACK_ZONE}"
            ),
        );
        b.append(
            Raw,
            PRERT,
            &format!(
                "-p udp -m mark ! --mark {mark} -m udp --sport 53 -j CT --zone {DNS_CONNTRACK_ZONE}"
            ),
        );
    }

    b.append(
        Nat,
        OUTPUT,
        &format!("-p tcp -m mark --mark {conn_mark} -j ACCEPT"),
    );
    // The pod calling itself over lo on one of its own addresses.
    b.each(Nat, OUTPUT, None, |f| {
        format!("! -d {} -o lo -j ACCEPT", loopback(f))
    });
    b.each(Nat, OUTPUT, None, |f| {
        format!(
            "! -d {} -p tcp -m mark ! --mark {mark} -j REDIRECT --to-ports {ZTUNNEL_OUTBOUND_PORT}",
            loopback(f)
        )
    });
    b.finish()
}

/// Builds the rules written in the node's netns for kubelet's probes: upstream's
/// `AppendHostRules` (`cni/pkg/iptables/iptables.go`). TCP from a local socket (`-m owner
/// --socket-exists`) to a pod address in the probe set ([`PROBE_SET_V4`], and
/// [`PROBE_SET_V6`] with IPv6) is SNATed to the node's probe address, in chain
/// `ISTIO_POSTRT`, which is jumped to from the head of `nat POSTROUTING`.
pub fn build_host_probe(node: &NodeSettings) -> AmbientIptables {
    let mut b = Builder::new(node.ipv6);
    b.each(Table::Nat, "POSTROUTING", Some(1), |_| {
        format!("-j {POSTRT}")
    });
    for (family, set, addr) in [
        (
            Family::V4,
            PROBE_SET_V4,
            node.host_probe_snat_v4.to_string(),
        ),
        (
            Family::V6,
            PROBE_SET_V6,
            node.host_probe_snat_v6.to_string(),
        ),
    ] {
        b.append_to(
            family,
            Table::Nat,
            POSTRT,
            &format!(
                "-m owner --socket-exists -p tcp -m set --match-set {set} dst \
                 -j SNAT --to-source {addr}"
            ),
        );
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redirect::InterfaceName;
    use crate::rules::is_own_chain;

    #[test]
    fn ipv6_rules_only_with_ipv6() {
        let pod = PodOverrides::default();
        for dns in [false, true] {
            assert!(build_inpod(&NodeSettings::new(dns, false), &pod)
                .v6
                .is_none());
            let both = build_inpod(&NodeSettings::new(dns, true), &pod);
            assert_eq!(both.families().len(), 2);
            assert_eq!(both.family(Family::V6).unwrap().family, Family::V6);
        }
        assert!(build_host_probe(&NodeSettings::new(true, false))
            .v6
            .is_none());
    }

    #[test]
    fn every_chain_is_ours_or_built_in() {
        let pod = PodOverrides {
            ingress_mode: false,
            dns: crate::rules::ambient::DnsOverride::Enabled,
            virtual_interfaces: vec![InterfaceName::parse("v0").unwrap()],
        };
        let node = NodeSettings::new(true, true);
        let built_in = ["PREROUTING", "OUTPUT", "POSTROUTING"];
        for set in [build_inpod(&node, &pod), build_host_probe(&node)] {
            for f in set.families() {
                for r in &f.rules {
                    assert!(
                        is_own_chain(&r.chain) || built_in.contains(&r.chain.as_str()),
                        "{}",
                        r.chain
                    );
                    assert!(r.args.iter().all(|a| !a.is_empty()));
                }
            }
        }
    }

    #[test]
    fn the_probe_addresses_are_inputs() {
        let mut node = NodeSettings::new(false, true);
        node.host_probe_snat_v4 = "169.254.1.2".parse().unwrap();
        node.host_probe_snat_v6 = "fd00::7".parse().unwrap();
        let host = build_host_probe(&node);
        assert!(host.v4.restore_text().contains("--to-source 169.254.1.2\n"));
        assert!(host
            .v6
            .unwrap()
            .restore_text()
            .contains("--to-source fd00::7\n"));
        let pod = build_inpod(&node, &PodOverrides::default());
        assert!(pod.v4.restore_text().contains("-s 169.254.1.2 -p tcp"));
        assert!(pod.v6.unwrap().restore_text().contains("-d fd00::7 -p tcp"));
    }
}
