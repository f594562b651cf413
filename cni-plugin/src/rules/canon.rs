//! Canonical form of an iptables rule, so that a rule as we write it and the same rule as
//! `iptables-save` prints it compare equal.
//!
//! `iptables-save` (legacy and nft, 1.8.x) rewrites rules: base matches come out in a fixed
//! order (`-s -d -i -o -p`), implicit modules become explicit (`-p tcp --dport 80` →
//! `-p tcp -m tcp --dport 80`), marks are printed in hex with masks
//! (`--set-mark 1337` → `--set-xmark 0x539/0xffffffff`), aliases are resolved
//! (`--to-port` → `--to-ports`) and target defaults are spelled out (`TPROXY --on-ip
//! 0.0.0.0`, `CONNMARK --nfmask/--ctmask`). [`CanonRule`] undoes all of these.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::{Family, Table};

/// A rule in canonical form. Two rules are the same rule iff their canonical forms are
/// equal. The chain is part of the rule; an insert position is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonRule {
    /// The chain.
    pub chain: String,
    /// Base matches (`-s -d -i -o -p`) → (negated, canonical value).
    base: BTreeMap<&'static str, (bool, String)>,
    /// Match modules in order.
    matches: Vec<(String, MatchOptions)>,
    /// The target (`-j`) and its options.
    target: Option<(String, BTreeMap<String, Option<String>>)>,
}

/// A match module's options → (negated, value).
type MatchOptions = BTreeMap<String, (bool, Option<String>)>;

/// Targets after which a packet goes on to the next rule of the chain, and that change
/// nothing our rules match on (`iptables-extensions(8)`): logging and tracing, and header
/// or QoS edits (MSS, DSCP/TOS, TTL/HL, ECN, checksum, traffic class, security labels,
/// idle timers, LEDs, rate estimators, `TEE` copies). Not here: `MARK`/`CONNMARK` (our
/// rules match marks), `CT` (`--notrack` keeps NAT from seeing the connection), and
/// anything that ends the traversal.
pub const NON_TERMINATING_TARGETS: &[&str] = &[
    "LOG",
    "NFLOG",
    "TRACE",
    "AUDIT",
    "TCPMSS",
    "DSCP",
    "TOS",
    "TTL",
    "HL",
    "ECN",
    "CHECKSUM",
    "CLASSIFY",
    "SECMARK",
    "CONNSECMARK",
    "IDLETIMER",
    "LED",
    "RATEEST",
    "TEE",
];

/// A rule line that is not iptables rule syntax.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot read iptables rule {line:?}: {reason}")]
pub struct CanonError {
    /// The line.
    pub line: String,
    /// What could not be read.
    pub reason: String,
}

enum Ctx {
    Base,
    Match,
    Target,
}

impl CanonRule {
    /// Reads one rule line (`-A CHAIN …` or `-I CHAIN [N] …`) of `family`.
    ///
    /// Errors: [`CanonError`] when the line has no chain, an unknown base option, or an
    /// address that does not parse.
    pub fn parse(line: &str, family: Family) -> Result<CanonRule, CanonError> {
        let err = |reason: String| CanonError {
            line: line.to_owned(),
            reason,
        };
        let tokens = tokenize(line);
        let mut rule = CanonRule {
            chain: String::new(),
            base: BTreeMap::new(),
            matches: Vec::new(),
            target: None,
        };
        let mut ctx = Ctx::Base;
        let mut negate = false;
        let mut i = 0;
        let value_at = |i: usize| -> Option<String> {
            tokens
                .get(i)
                .filter(|t| !t.starts_with('-') && *t != "!")
                .cloned()
        };
        while let Some(tok) = tokens.get(i).map(String::as_str) {
            i += 1;
            match tok {
                "!" => {
                    negate = true;
                    continue;
                }
                "-A" | "--append" | "-I" | "--insert" => {
                    rule.chain = value_at(i).ok_or_else(|| err("no chain after -A/-I".into()))?;
                    i += 1;
                    let is_insert = tok == "-I" || tok == "--insert";
                    if is_insert
                        && tokens
                            .get(i)
                            .is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit()))
                    {
                        i += 1;
                    }
                }
                "-s" | "--source" | "-d" | "--destination" | "-i" | "--in-interface" | "-o"
                | "--out-interface" | "-p" | "--protocol" => {
                    let key = base_key(tok);
                    let v = value_at(i).ok_or_else(|| err(format!("{tok} needs a value")))?;
                    i += 1;
                    let v = match key {
                        "-s" | "-d" => canon_net(&v, family).map_err(err)?,
                        "-p" => v.to_ascii_lowercase(),
                        _ => v,
                    };
                    rule.base.insert(key, (negate, v));
                }
                "-m" | "--match" => {
                    let name = value_at(i).ok_or_else(|| err("-m needs a module".into()))?;
                    i += 1;
                    rule.matches.push((name, BTreeMap::new()));
                    ctx = Ctx::Match;
                }
                "-j" | "--jump" => {
                    let name = value_at(i).ok_or_else(|| err("-j needs a target".into()))?;
                    i += 1;
                    rule.target = Some((name, BTreeMap::new()));
                    ctx = Ctx::Target;
                }
                opt if opt.starts_with("--") => {
                    let mut value = value_at(i);
                    if value.is_some() {
                        i += 1;
                    }
                    // `-m set --match-set NAME FLAGS`: the one option with two values.
                    if opt == "--match-set" {
                        if let (Some(name), Some(flags)) = (&value, value_at(i)) {
                            value = Some(format!("{name} {flags}"));
                            i += 1;
                        }
                    }
                    match ctx {
                        Ctx::Base => {
                            // `-p tcp --dport N`: the protocol's module is loaded implicitly.
                            let proto = rule
                                .base
                                .get("-p")
                                .map(|(_, p)| p.clone())
                                .filter(|p| p == "tcp" || p == "udp")
                                .ok_or_else(|| err(format!("option {opt} outside a module")))?;
                            rule.matches.push((proto, BTreeMap::new()));
                            ctx = Ctx::Match;
                            add_match_opt(&mut rule, opt, negate, value);
                        }
                        Ctx::Match => add_match_opt(&mut rule, opt, negate, value),
                        Ctx::Target => {
                            if let Some((_, opts)) = rule.target.as_mut() {
                                let (k, v) = canon_target_opt(opt, value);
                                opts.insert(k, v);
                            }
                        }
                    }
                }
                other => return Err(err(format!("unexpected token {other:?}"))),
            }
            negate = false;
        }
        if rule.chain.is_empty() {
            return Err(err("no -A/-I chain".into()));
        }
        fill_target_defaults(&mut rule, family);
        Ok(rule)
    }

    /// The target (`-j`) name, if any.
    pub fn target_name(&self) -> Option<&str> {
        self.target.as_ref().map(|(n, _)| n.as_str())
    }

    /// The protocol the rule is limited to (`-p tcp`), as a name; `None` when it matches
    /// every protocol (no `-p`, `-p all`, or a negated `! -p X`).
    pub fn protocol(&self) -> Option<&str> {
        let (negated, p) = self.base.get("-p")?;
        let name = match p.as_str() {
            "all" | "0" => return None,
            "6" => "tcp",
            "17" => "udp",
            "132" => "sctp",
            other => other,
        };
        (!negated).then_some(name)
    }

    /// Whether this rule, of other software, placed ahead of `later` (our rules that follow
    /// it in the same built-in chain), can keep packets from reaching them, so that they
    /// bypass the sidecar. It can unless:
    /// - it has no target (a counter) or one of [`NON_TERMINATING_TARGETS`], after which
    ///   the packet goes on to the next rule;
    /// - it jumps to one of our chains;
    /// - it is limited to a protocol that none of `later` captures (`-p udp` ahead of
    ///   `-p tcp -j ISTIO_INBOUND`; `-p icmp` ahead of anything, since our chains redirect
    ///   only TCP, and UDP for DNS capture).
    ///
    /// Every other target can end the traversal for what it matches (`RETURN`, `ACCEPT`,
    /// `DROP`, `REJECT`, NAT targets, `MARK`/`CONNMARK` that change what our mark matches
    /// see, and a jump to another chain, which may end in any of those). A rule that cannot
    /// be read at all (`-g`, unknown syntax) is not a [`CanonRule`]; callers count it too.
    pub fn can_divert(&self, later: &[&CanonRule]) -> bool {
        let Some(target) = self.target_name() else {
            return false;
        };
        if NON_TERMINATING_TARGETS.contains(&target) || super::is_own_chain(target) {
            return false;
        }
        match self.protocol() {
            // What ours capture: their protocol, or, for a jump without one, what our
            // chains redirect (TCP, and UDP for DNS capture).
            Some(p) => later
                .iter()
                .any(|r| r.protocol().map_or(p == "tcp" || p == "udp", |q| q == p)),
            None => true,
        }
    }

    /// Whether a match or the target uses firewall mark `mark` (any mask), e.g. `-m mark
    /// --mark 1337`, `-j MARK --set-mark 1338`, `-j TPROXY --tproxy-mark 1337/…`.
    pub fn uses_mark(&self, mark: u32) -> bool {
        let prefix = format!("{mark:#x}/");
        let is_mark = |v: &Option<String>| v.as_deref().is_some_and(|v| v.starts_with(&prefix));
        let in_matches = self
            .matches
            .iter()
            .any(|(_, opts)| opts.iter().any(|(k, (_, v))| k == "--mark" && is_mark(v)));
        let in_target = self.target.as_ref().is_some_and(|(_, opts)| {
            opts.iter()
                .any(|(k, v)| matches!(k.as_str(), "--set-xmark" | "--tproxy-mark") && is_mark(v))
        });
        in_matches || in_target
    }
}

fn base_key(tok: &str) -> &'static str {
    match tok {
        "-s" | "--source" => "-s",
        "-d" | "--destination" => "-d",
        "-i" | "--in-interface" => "-i",
        "-o" | "--out-interface" => "-o",
        _ => "-p",
    }
}

fn add_match_opt(rule: &mut CanonRule, opt: &str, negate: bool, value: Option<String>) {
    let Some((_, opts)) = rule.matches.last_mut() else {
        return;
    };
    let value = match opt {
        "--mark" => value.map(|v| canon_mark(&v)),
        _ => value,
    };
    opts.insert(opt.to_owned(), (negate, value));
}

fn canon_target_opt(opt: &str, value: Option<String>) -> (String, Option<String>) {
    match opt {
        "--to-port" => ("--to-ports".into(), value),
        "--set-mark" => ("--set-xmark".into(), value.map(|v| canon_mark(&v))),
        "--set-xmark" | "--tproxy-mark" | "--nfmask" | "--ctmask" => {
            (opt.into(), value.map(|v| canon_mark(&v)))
        }
        _ => (opt.into(), value),
    }
}

/// Adds the options `iptables-save` always prints for a target.
fn fill_target_defaults(rule: &mut CanonRule, family: Family) {
    let Some((name, opts)) = rule.target.as_mut() else {
        return;
    };
    let all_ones = || Some(canon_mark("0xffffffff"));
    match name.as_str() {
        "TPROXY" => {
            let any = match family {
                Family::V4 => "0.0.0.0",
                Family::V6 => "::",
            };
            opts.entry("--on-ip".into())
                .or_insert_with(|| Some(any.into()));
        }
        "CONNMARK" if opts.contains_key("--save-mark") || opts.contains_key("--restore-mark") => {
            opts.entry("--nfmask".into()).or_insert_with(all_ones);
            opts.entry("--ctmask".into()).or_insert_with(all_ones);
        }
        _ => {}
    }
}

/// `V` or `V/M`, decimal or hex → `0xV/0xM` (mask defaults to all ones). Unparsable values
/// are kept as they are, so they still compare by text.
fn canon_mark(v: &str) -> String {
    let num = |s: &str| -> Option<u32> {
        match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        }
    };
    let (val, mask) = match v.split_once('/') {
        Some((a, b)) => (num(a), num(b)),
        None => (num(v), Some(u32::MAX)),
    };
    match (val, mask) {
        (Some(val), Some(mask)) => format!("{val:#x}/{mask:#x}"),
        _ => v.to_owned(),
    }
}

/// An address or CIDR → canonical CIDR with host bits cleared, as the kernel stores it.
fn canon_net(v: &str, family: Family) -> Result<String, String> {
    let net = match v.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => {
            let addr: std::net::IpAddr =
                v.parse().map_err(|_| format!("{v:?} is not an address"))?;
            IpNet::from(addr)
        }
    };
    let ok = matches!(
        (&net, family),
        (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6)
    );
    if !ok {
        return Err(format!("{v} is not an {family} address"));
    }
    Ok(net.trunc().to_string())
}

/// Splits a rule line on whitespace, keeping double-quoted strings (as `iptables-save`
/// prints comments) as one token without the quotes.
fn tokenize(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_token = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    out.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            c => {
                cur.push(c);
                in_token = true;
            }
        }
    }
    if in_token {
        out.push(cur);
    }
    out
}

/// One rule as `iptables-save` printed it, with its canonical form when it parses.
#[derive(Debug, Clone)]
pub struct SavedRule {
    /// The line as printed (`-A CHAIN …`).
    pub line: String,
    /// Its canonical form; `None` for rules of other software that we cannot read.
    pub canon: Option<CanonRule>,
}

/// The rules of one family as `iptables-save` printed them: table → chain → rules, for the
/// tables this plugin writes ([`Table::ALL`]). Declared chains without rules are present
/// with no rules.
#[derive(Debug, Clone, Default)]
pub struct SavedTables {
    tables: BTreeMap<Table, BTreeMap<String, Vec<SavedRule>>>,
}

impl SavedTables {
    /// Parses `iptables-save` output of `family`. Tables we never write are skipped.
    pub fn parse(text: &str, family: Family) -> SavedTables {
        let mut out = SavedTables::default();
        let mut table: Option<Table> = None;
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                table = Table::from_name(name.trim());
                continue;
            }
            let Some(t) = table else { continue };
            let chains = out.tables.entry(t).or_default();
            if let Some(decl) = line.strip_prefix(':') {
                let chain = decl.split_whitespace().next().unwrap_or_default();
                chains.entry(chain.to_owned()).or_default();
            } else if line.starts_with("-A ") {
                let canon = CanonRule::parse(line, family).ok();
                let chain = line.split_whitespace().nth(1).unwrap_or_default();
                chains.entry(chain.to_owned()).or_default().push(SavedRule {
                    line: line.to_owned(),
                    canon,
                });
            }
        }
        out
    }

    /// The chains of `table` (empty when the table is not loaded).
    pub fn chains(&self, table: Table) -> impl Iterator<Item = (&str, &[SavedRule])> {
        self.tables
            .get(&table)
            .into_iter()
            .flatten()
            .map(|(c, r)| (c.as_str(), r.as_slice()))
    }

    /// The rules of `chain` in `table`, or `None` when the chain does not exist.
    pub fn chain(&self, table: Table, chain: &str) -> Option<&[SavedRule]> {
        self.tables.get(&table)?.get(chain).map(Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(ours: &str, saved: &str, family: Family) {
        let a = CanonRule::parse(ours, family).unwrap();
        let b = CanonRule::parse(saved, family).unwrap();
        assert_eq!(a, b, "\n ours:  {ours}\n saved: {saved}");
    }

    #[test]
    fn matches_what_iptables_save_prints() {
        use Family::*;
        same(
            "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
            V4,
        );
        same(
            "-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006",
            "-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff",
            V4,
        );
        same(
            "-A ISTIO_TPROXY ! -d ::1/128 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006",
            "-A ISTIO_TPROXY ! -d ::1/128 -p tcp -j TPROXY --on-port 15006 --on-ip :: --tproxy-mark 0x539/0xffffffff",
            V6,
        );
        same(
            "-A ISTIO_DIVERT -j MARK --set-mark 1337",
            "-A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff",
            V4,
        );
        same(
            "-A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark",
            "-A PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff",
            V4,
        );
        same(
            "-I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN",
            "-A ISTIO_INBOUND -i lo -p tcp -m mark ! --mark 0x53a -j RETURN",
            V4,
        );
        same(
            "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053",
            "-A ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053",
            V4,
        );
        same(
            "-A ISTIO_OUTPUT -d 10.1.2.3/8 -j RETURN",
            "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN",
            V4,
        );
        same(
            "-A X -s 127.0.0.6 -j RETURN",
            "-A X -s 127.0.0.6/32 -j RETURN",
            V4,
        );
    }

    #[test]
    fn differences_are_seen() {
        let p = |s| CanonRule::parse(s, Family::V4).unwrap();
        assert_ne!(
            p("-A X -p tcp --dport 1 -j RETURN"),
            p("-A X -p tcp ! --dport 1 -j RETURN")
        );
        assert_ne!(
            p("-A X -j MARK --set-mark 1337"),
            p("-A X -j MARK --set-mark 1338")
        );
        assert_ne!(p("-A X -j RETURN"), p("-A Y -j RETURN"));
        assert_ne!(
            p("-A X -m owner --uid-owner 1 -m mark --mark 1 -j RETURN"),
            p("-A X -m mark --mark 1 -m owner --uid-owner 1 -j RETURN")
        );
    }

    #[test]
    fn finds_marks_in_any_spelling() {
        let p = |s| CanonRule::parse(s, Family::V4).unwrap();
        assert!(
            p("-A OUTPUT -p tcp -m connmark --mark 0x539 -j CONNMARK --restore-mark")
                .uses_mark(1337)
        );
        assert!(p("-A OUTPUT -j MARK --set-mark 1338").uses_mark(1338));
        assert!(!p("-A OUTPUT -j MARK --set-mark 1338").uses_mark(1337));
        assert!(!p("-A OUTPUT -p tcp --dport 1337 -j RETURN").uses_mark(1337));
    }

    #[test]
    fn which_foreign_rules_can_divert() {
        let r = |l: &str| CanonRule::parse(l, Family::V4).unwrap();
        let jump = r("-A OUTPUT -p tcp -j ISTIO_OUTPUT");
        let later = [&jump];
        for diverts in [
            "-A OUTPUT -p tcp -j RETURN",
            "-A OUTPUT -j RETURN",
            "-A OUTPUT -j ACCEPT",
            "-A OUTPUT -d 10.0.0.0/8 -j RETURN",
            "-A OUTPUT -p tcp -j DNAT --to-destination 10.1.1.1",
            "-A OUTPUT -p tcp -j REDIRECT --to-ports 9999",
            "-A OUTPUT -j KUBE-SERVICES",
            "-A OUTPUT ! -p udp -j RETURN",
            "-A OUTPUT -p 6 -j RETURN",
            "-A OUTPUT -j MARK --set-mark 1",
        ] {
            assert!(r(diverts).can_divert(&later), "{diverts}");
        }
        for harmless in [
            "-A OUTPUT -p tcp",
            "-A OUTPUT -j LOG --log-prefix x",
            "-A OUTPUT -j NFLOG",
            "-A OUTPUT -p tcp -j TCPMSS --clamp-mss-to-pmtu",
            "-A OUTPUT -p udp -j RETURN",
            "-A OUTPUT -p icmp -j ACCEPT",
            "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
        ] {
            assert!(!r(harmless).can_divert(&later), "{harmless}");
        }
        // Ours matching every protocol: any terminating rule ahead diverts something.
        let all = r("-A OUTPUT -j ISTIO_OUTPUT");
        assert!(r("-A OUTPUT -p udp -j RETURN").can_divert(&[&all]));
        assert!(!r("-A OUTPUT -p icmp -j RETURN").can_divert(&[&all]));
    }

    /// The node's probe rule (upstream's `ISTIO_POSTRT`), as we write it and as
    /// iptables-save prints it.
    #[test]
    fn reads_the_probe_snat_rule() {
        same(
            "-A ISTIO_POSTRT -m owner --socket-exists -p tcp -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127",
            "-A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127",
            Family::V4,
        );
        let a = CanonRule::parse(
            "-A ISTIO_POSTRT -p tcp -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127",
            Family::V4,
        )
        .unwrap();
        let b = CanonRule::parse(
            "-A ISTIO_POSTRT -p tcp -m set --match-set istio-inpod-probes-v4 src -j SNAT --to-source 169.254.7.127",
            Family::V4,
        )
        .unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn refuses_garbage() {
        assert!(CanonRule::parse("-A X --dport 1 -j RETURN", Family::V4).is_err());
        assert!(CanonRule::parse("-p tcp -j RETURN", Family::V4).is_err());
        assert!(CanonRule::parse("-A X -d ::1/128 -j RETURN", Family::V4).is_err());
        assert!(CanonRule::parse("-A X junk", Family::V4).is_err());
    }

    #[test]
    fn quoted_comments() {
        assert_eq!(
            tokenize(r#"-A X -m comment --comment "a \"b\" c" -j RETURN"#)[5],
            r#"a "b" c"#
        );
    }
}
