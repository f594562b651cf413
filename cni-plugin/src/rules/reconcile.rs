//! The `iptables-restore --noflush` script that takes a netns from what it holds now to
//! exactly the desired rules, in one run per family. Pure.
//!
//! Per table the script declares every chain of ours (`:ISTIO_X - [0:0]` creates a missing
//! chain and flushes an existing one, on both the legacy and the nft backend), deletes our
//! earlier rules from built-in chains (`-D`), appends the desired rules, and removes chains
//! of ours that are no longer wanted (`-X`). In a built-in chain that keeps rules of other
//! software, ours are inserted at its head, in order (`-I CHAIN 1`, `-I CHAIN 2`, …), so
//! that none of those rules can take traffic around the sidecar (see
//! [`CanonRule::can_divert`]). On a fresh netns this is upstream's text with
//! `:X - [0:0]` in place of `-N X`; on a netns that already has rules (a second ADD, a
//! repair) nothing is duplicated. Each table commits atomically.

use std::fmt::Write as _;

use super::canon::{CanonRule, SavedTables};
use super::iptables::{OUTBOUND_MARK, TPROXY_MARK};
use super::{is_own_chain, FamilyRules, Rule, Table};

/// Builds the script that replaces our rules in `current` with `desired`.
///
/// `also_ours` lists further rules to recognise as ours in built-in chains (for example the
/// rules of a ruleset being rolled back). Always recognised as ours: rules that jump to an
/// `ISTIO_*` chain, and rules in the mangle table that use Istio's TPROXY marks (1337,
/// 1338), which TPROXY mode puts in built-in chains; so DEL, which has no ruleset, still
/// removes everything ADD wrote. Returns an empty string when there is nothing to change.
pub fn script(desired: &FamilyRules, also_ours: &[Rule], current: &SavedTables) -> String {
    let family = desired.family;
    let known: Vec<(Table, CanonRule)> = desired
        .rules
        .iter()
        .chain(also_ours)
        .filter(|r| !is_own_chain(&r.chain))
        .filter_map(|r| Some((r.table, CanonRule::parse(&r.restore_line(), family).ok()?)))
        .collect();
    let mut out = String::new();
    for table in Table::ALL {
        let wanted = desired.own_chains(table);
        let stale: Vec<&str> = current
            .chains(table)
            .map(|(c, _)| c)
            .filter(|c| is_own_chain(c) && !wanted.contains(c))
            .collect();
        let mut deletions = Vec::new();
        // Built-in chains that keep rules of other software: ours go to their head.
        let mut shared: Vec<&str> = Vec::new();
        for (chain, rules) in current.chains(table).filter(|(c, _)| !is_own_chain(c)) {
            for r in rules {
                let ours = match &r.canon {
                    Some(c) => {
                        c.target_name().is_some_and(is_own_chain)
                            || (table == Table::Mangle
                                && (c.uses_mark(TPROXY_MARK) || c.uses_mark(OUTBOUND_MARK)))
                            || known.iter().any(|(t, k)| *t == table && k == c)
                    }
                    None => false,
                };
                if ours {
                    let spec = r.line.strip_prefix("-A ").unwrap_or(&r.line);
                    debug_assert!(spec.starts_with(chain));
                    deletions.push(format!("-D {spec}"));
                } else if !shared.contains(&chain) {
                    shared.push(chain);
                }
            }
        }
        let rules: Vec<&Rule> = desired.rules.iter().filter(|r| r.table == table).collect();
        if wanted.is_empty() && stale.is_empty() && deletions.is_empty() && rules.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{}", table.name());
        for chain in wanted.iter().chain(&stale) {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for d in deletions {
            let _ = writeln!(out, "{d}");
        }
        // Ours in a shared built-in chain go to its head, in the order the chain would
        // hold them when written alone (`final_chains`, which honours upstream's own
        // `-I CHAIN 1` inserts), whatever each rule's position says.
        let finals = desired.final_chains();
        for r in &rules {
            if !shared.contains(&r.chain.as_str()) {
                let _ = writeln!(out, "{}", r.restore_line());
            }
        }
        for chain in &shared {
            let Some(ours) = finals.get(&(table, (*chain).to_owned())) else {
                continue;
            };
            for (n, r) in ours.iter().enumerate() {
                let at_head = Rule {
                    position: Some(n as u32 + 1),
                    ..(*r).clone()
                };
                let _ = writeln!(out, "{}", at_head.restore_line());
            }
        }
        for chain in stale {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::MeshedPod;
    use crate::redirect::Redirect;
    use crate::rules::{iptables, Family};

    fn ruleset(annotations: &[(&str, &str)]) -> FamilyRules {
        let pod = MeshedPod {
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let r = Redirect::from_pod(&pod).unwrap();
        iptables::build(&r, false).families.remove(0)
    }

    #[test]
    fn fresh_netns_gets_upstream_rules_with_declarations() {
        let desired = ruleset(&[]);
        let s = script(&desired, &[], &SavedTables::default());
        let expected = desired
            .restore_text()
            .replace("* nat", "*nat")
            .replace("-N ", ":");
        let expected: Vec<String> = expected
            .lines()
            .map(|l| {
                if l.starts_with(':') {
                    format!("{l} - [0:0]")
                } else {
                    l.to_owned()
                }
            })
            .collect();
        assert_eq!(s.lines().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn second_apply_replaces_instead_of_duplicating() {
        let desired = ruleset(&[]);
        let saved =
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_INBOUND - [0:0]\n\
            :ISTIO_OLD - [0:0]\n-A PREROUTING -p tcp -j ISTIO_INBOUND\n-A PREROUTING -j KUBE-X\n\
            -A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_INBOUND -j RETURN\nCOMMIT\n";
        let s = script(&desired, &[], &SavedTables::parse(saved, Family::V4));
        assert!(s.contains("-D PREROUTING -p tcp -j ISTIO_INBOUND\n"), "{s}");
        assert!(s.contains("-D OUTPUT -j ISTIO_OUTPUT\n"), "{s}");
        assert!(!s.contains("KUBE-X"), "foreign rules are left alone: {s}");
        assert!(
            s.contains(":ISTIO_OLD - [0:0]\n") && s.trim_end().ends_with("-X ISTIO_OLD\nCOMMIT")
        );
    }

    #[test]
    fn ours_go_to_the_head_of_chains_shared_with_other_software() {
        let desired = ruleset(&[]);
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
            -A OUTPUT -p tcp -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n";
        let s = script(&desired, &[], &SavedTables::parse(saved, Family::V4));
        assert!(s.contains("-D OUTPUT -j ISTIO_OUTPUT\n"), "{s}");
        assert!(s.contains("-I OUTPUT 1 -j ISTIO_OUTPUT\n"), "{s}");
        assert!(!s.contains("-A OUTPUT"), "{s}");
        // A chain with nothing foreign keeps upstream's append.
        assert!(s.contains("-A PREROUTING -p tcp -j ISTIO_INBOUND\n"), "{s}");
    }

    #[test]
    fn cleanup_removes_everything_of_ours() {
        let applied = ruleset(&[("sidecar.istio.io/interceptionMode", "TPROXY")]);
        let empty = FamilyRules {
            family: Family::V4,
            rules: vec![],
        };
        let saved = "*mangle\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_DIVERT - [0:0]\n\
            -A PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff\n\
            -A PREROUTING -p tcp -j ISTIO_INBOUND\n-A ISTIO_DIVERT -j ACCEPT\nCOMMIT\n";
        let current = SavedTables::parse(saved, Family::V4);
        let s = script(&empty, &applied.rules, &current);
        assert!(
            s.contains("-D PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK"),
            "{s}"
        );
        assert!(s.contains("-X ISTIO_DIVERT"), "{s}");
        assert_eq!(script(&empty, &[], &SavedTables::default()), "");
    }
}
