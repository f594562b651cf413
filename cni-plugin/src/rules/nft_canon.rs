//! The nftables read-back's canonical form: what a ruleset means, statement by statement,
//! so that the rules we wrote ([`NftRuleset`]) and what `nft -j list table` prints back can
//! be compared.
//!
//! `nft` prints rules differently from its input; the canonical form absorbs exactly those
//! differences, each one a spelling of the same match or action (checked on real `nft`
//! output for every conformance case, `cni-plugin/tests/nft_canon.rs`):
//! - a `meta l4proto P` match is dropped when the rule also matches a `P` header field
//!   (`meta l4proto tcp tcp dport 53` is printed `tcp dport 53`: the port match implies
//!   the protocol);
//! - host prefixes lose their length (`127.0.0.1/32` → `127.0.0.1`, `::1/128` → `::1`),
//!   other prefixes are kept as network/length;
//! - `skuid`, `skgid`, `mark`, `iifname`, `oifname` are `meta` keys (`meta skuid 1337`);
//! - `ct state` values form an unordered set (`related,established`), and nft prints a
//!   state test as `in` where the input has the implicit `==`;
//! - `ct mark set mark` is `ct mark set meta mark`; marks are numbers, not `0x…`;
//! - base chains are compared by type, hook and numeric priority (`priority dstnat` is
//!   -100), with nft's default `policy accept`;
//! - counters are compared by presence, not value.
//!
//! JSON is read with `serde_json` into the few statement shapes this backend writes
//! (libnftables-json(5)); anything else is kept verbatim, so it shows up as a difference
//! instead of being ignored. The `nftables` crate models the whole schema, but a
//! statement it does not know fails the whole parse (its types have changed across
//! releases), and here only "what is in our three tables, in order" matters.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use serde_json::Value;

use super::nftables::NftRuleset;

/// One statement in canonical form, e.g. `match meta l4proto == tcp`, `counter`,
/// `jump istio-output`, `set meta mark 1337`.
pub type CanonStmt = String;

/// A chain: its base-chain hook (`type nat hook output priority -100`) or `None`, and its
/// rules in order, each a list of statements.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CanonChain {
    /// `type T hook H priority P` for a base chain.
    pub base: Option<String>,
    /// The rules, in the order the kernel runs them.
    pub rules: Vec<Vec<CanonStmt>>,
}

/// Table name → chain name → chain.
pub type CanonTables = BTreeMap<String, BTreeMap<String, CanonChain>>;

/// Why `nft -j` output could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read nft's JSON output: {0}")]
pub struct CanonError(String);

/// What `ruleset` leaves in the kernel: each table and chain it creates, and each chain's
/// rules in the order they end up in after the transaction's appends and inserts.
pub fn expected(ruleset: &NftRuleset) -> CanonTables {
    let mut out = CanonTables::new();
    for t in &ruleset.tables {
        let chains = out.entry(t.name.to_owned()).or_default();
        for c in &t.chains {
            chains.insert(
                c.name.to_owned(),
                CanonChain {
                    base: c.base.map(str::to_owned),
                    rules: Vec::new(),
                },
            );
        }
        for r in &t.rules {
            let rules = &mut chains.entry(r.chain.to_owned()).or_default().rules;
            let stmts = normalize(parse_expr(&r.expr));
            match r.index {
                Some(i) if i <= rules.len() => rules.insert(i, stmts),
                _ => rules.push(stmts),
            }
        }
    }
    out
}

/// Reads the output of `nft -j list ruleset`, or of one or more `nft -j list table inet …`
/// runs (one JSON document per line, or several concatenated): the `inet` tables of this
/// backend (`istio-proxy-*`, and ambient's `istio-ambient-*`); other tables are not ours
/// and are left out.
///
/// Errors: [`CanonError`] when the text is not nft's JSON.
pub fn from_json(text: &str) -> Result<CanonTables, CanonError> {
    let mut out = CanonTables::new();
    let docs = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    for doc in docs {
        let doc = doc.map_err(|e| CanonError(e.to_string()))?;
        let objects = doc["nftables"]
            .as_array()
            .ok_or_else(|| CanonError("no \"nftables\" array".into()))?;
        for o in objects {
            let Some(body) = o.as_object().and_then(|m| m.values().next()) else {
                continue;
            };
            let table = body.get("table").or_else(|| body.get("name"));
            let ours = body["family"] == "inet"
                && table
                    .and_then(Value::as_str)
                    .is_some_and(super::nftables::is_our_table);
            if !ours {
                continue;
            }
            if let Some(c) = o.get("chain") {
                let (table, name) = (str_of(&c["table"])?, str_of(&c["name"])?);
                let base = match (c["type"].as_str(), c["hook"].as_str(), c["prio"].as_i64()) {
                    (Some(t), Some(h), Some(p)) => Some(format!("type {t} hook {h} priority {p}")),
                    _ => None,
                };
                out.entry(table).or_default().entry(name).or_default().base = base;
            } else if let Some(r) = o.get("rule") {
                let (table, chain) = (str_of(&r["table"])?, str_of(&r["chain"])?);
                let stmts = r["expr"]
                    .as_array()
                    .ok_or_else(|| CanonError("a rule without \"expr\"".into()))?
                    .iter()
                    .map(stmt_of_json)
                    .collect();
                out.entry(table)
                    .or_default()
                    .entry(chain)
                    .or_default()
                    .rules
                    .push(normalize(stmts));
            } else if let Some(t) = o.get("table") {
                out.entry(str_of(&t["name"])?).or_default();
            }
        }
    }
    Ok(out)
}

fn str_of(v: &Value) -> Result<String, CanonError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| CanonError(format!("expected a string, got {v}")))
}

/// Chains of iptables-nft (tables of family `ip` or `ip6`) named like ours (`ISTIO_…`), in
/// `nft -j list ruleset` output: the iptables backend's rules, seen through nftables.
///
/// Errors: [`CanonError`] when the text is not nft's JSON.
pub fn iptables_chains(text: &str) -> Result<Vec<String>, CanonError> {
    let doc: Value = serde_json::from_str(text).map_err(|e| CanonError(e.to_string()))?;
    Ok(doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| {
            let c = o.get("chain")?;
            let family = c["family"].as_str()?;
            let name = c["name"].as_str()?;
            (matches!(family, "ip" | "ip6") && name.starts_with(super::CHAIN_PREFIX)).then(|| {
                format!(
                    "{family} {} {name}",
                    c["table"].as_str().unwrap_or_default()
                )
            })
        })
        .collect())
}

/// The differences between what was meant and what is there, one line each; empty when
/// they agree.
pub fn diff(want: &CanonTables, got: &CanonTables) -> Vec<String> {
    let mut out = Vec::new();
    for (table, chains) in want {
        let Some(have) = got.get(table) else {
            out.push(format!("table inet {table} is missing"));
            continue;
        };
        for (chain, c) in chains {
            let Some(h) = have.get(chain) else {
                out.push(format!("chain {table} {chain} is missing"));
                continue;
            };
            if c.base != h.base {
                out.push(format!(
                    "chain {table} {chain}: hook {:?}, expected {:?}",
                    h.base, c.base
                ));
            }
            if c.rules != h.rules {
                out.push(format!(
                    "chain {table} {chain}: rules\n  [{}]\nexpected\n  [{}]",
                    Rules(&h.rules),
                    Rules(&c.rules)
                ));
            }
        }
        for chain in have.keys().filter(|k| !chains.contains_key(*k)) {
            out.push(format!("chain {table} {chain} is not ours"));
        }
    }
    out
}

struct Rules<'a>(&'a [Vec<CanonStmt>]);

impl fmt::Display for Rules<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(|r| r.join("; ")).collect();
        f.write_str(&lines.join("]\n  ["))
    }
}

/// Drops `match meta l4proto == P` when the rule matches a `P` header field (see the
/// module docs).
fn normalize(stmts: Vec<CanonStmt>) -> Vec<CanonStmt> {
    let implied: Vec<String> = stmts
        .iter()
        .filter_map(|s| {
            let rest = s.strip_prefix("match ")?;
            let proto = rest.split(' ').next()?;
            matches!(proto, "tcp" | "udp").then(|| format!("match meta l4proto == {proto}"))
        })
        .collect();
    stmts.into_iter().filter(|s| !implied.contains(s)).collect()
}

/// An address or prefix in canonical form: hosts without length, prefixes as
/// network/length.
fn canon_addr(s: &str) -> String {
    match s.parse::<IpNet>() {
        Ok(net) if net.prefix_len() == net.max_prefix_len() => net.addr().to_string(),
        Ok(net) => net.trunc().to_string(),
        Err(_) => s.to_owned(),
    }
}

/// One of our rule texts as canonical statements. Our builder writes a small, fixed
/// grammar (see [`super::nftables`]); a token it does not know is kept verbatim.
fn parse_expr(expr: &str) -> Vec<CanonStmt> {
    let t: Vec<&str> = expr.split_whitespace().collect();
    let mut out = Vec::new();
    let mut i = 0;
    // An optional `!=` then the value at `i`; returns (op, value, next index).
    let operand = |i: usize| -> (&'static str, String, usize) {
        if t.get(i) == Some(&"!=") {
            (
                "!=",
                t.get(i + 1).map(|s| s.to_string()).unwrap_or_default(),
                i + 2,
            )
        } else {
            (
                "==",
                t.get(i).map(|s| s.to_string()).unwrap_or_default(),
                i + 1,
            )
        }
    };
    while i < t.len() {
        let w = t[i];
        match (w, t.get(i + 1).copied(), t.get(i + 2).copied()) {
            ("counter" | "return" | "accept" | "drop", ..) => {
                out.push(w.to_owned());
                i += 1;
            }
            ("jump", Some(target), _) => {
                out.push(format!("jump {target}"));
                i += 2;
            }
            ("redirect", Some("to"), Some(port)) => {
                out.push(format!("redirect {}", port.trim_start_matches(':')));
                i += 3;
            }
            ("tproxy", Some(fam), Some("to")) => {
                let port = t.get(i + 3).copied().unwrap_or_default();
                out.push(format!("tproxy {fam} {}", port.trim_start_matches(':')));
                i += 4;
            }
            ("meta", Some("mark"), Some("set")) => {
                let (value, n) = match (t.get(i + 3).copied(), t.get(i + 4).copied()) {
                    (Some("ct"), Some("mark")) => ("ct mark".to_owned(), 5),
                    (Some(v), _) => (v.to_owned(), 4),
                    (None, _) => (String::new(), 3),
                };
                out.push(format!("set meta mark {value}"));
                i += n;
            }
            // `ct mark set ct mark & MASK | VALUE` (ambient's in-pod mangle rule): nft keeps
            // it as `& (MASK | VALUE) | VALUE`, the same bits; canonical in that form.
            ("ct", Some("mark"), Some("set"))
                if t.get(i + 3) == Some(&"ct")
                    && t.get(i + 4) == Some(&"mark")
                    && matches!(t.get(i + 5), Some(&"&" | &"and")) =>
            {
                let mask = num(t.get(i + 6).copied().unwrap_or_default());
                let value = num(t.get(i + 8).copied().unwrap_or_default());
                match (mask, value) {
                    (Some(m), Some(v)) => {
                        out.push(format!("set ct mark ct mark & {} | {v}", m | v))
                    }
                    _ => out.push("unknown ct mark set".to_owned()),
                }
                i += 9;
            }
            ("ct", Some("mark"), Some("set")) => {
                let n = if t.get(i + 3) == Some(&"meta") { 5 } else { 4 };
                out.push("set ct mark meta mark".to_owned());
                i += n;
            }
            // `[meta|ct] mark and|& MASK [==|!=] VALUE`: a masked mark test.
            ("mark", Some("and" | "&"), _) | ("meta" | "ct", Some("mark"), Some("and" | "&")) => {
                let (key, at) = if w == "mark" {
                    ("meta", i + 2)
                } else {
                    (w, i + 3)
                };
                let mask = num(t.get(at).copied().unwrap_or_default());
                let (op, v, n) = match t.get(at + 1).copied() {
                    Some("==") => operand(at + 2),
                    _ => operand(at + 1),
                };
                match (mask, num(&v)) {
                    (Some(m), Some(v)) => out.push(format!("match {key} mark & {m} {op} {v}")),
                    _ => out.push(format!("unknown {key} mark mask")),
                }
                i = n;
            }
            ("ct", Some("zone"), Some("set")) => {
                out.push(format!(
                    "set ct zone {}",
                    t.get(i + 3).copied().unwrap_or_default()
                ));
                i += 4;
            }
            ("ct", Some("state"), _) => {
                let (op, v, n) = operand(i + 2);
                let mut states: Vec<&str> = v.split(',').collect();
                states.sort_unstable();
                out.push(format!("match ct state {op} {}", states.join(",")));
                i = n;
            }
            ("ct", Some("mark"), _) => {
                let (op, v, n) = operand(i + 2);
                out.push(format!("match ct mark {op} {v}"));
                i = n;
            }
            ("meta", Some(key), _) => {
                let (op, v, n) = operand(i + 2);
                out.push(format!("match meta {key} {op} {v}"));
                i = n;
            }
            ("skuid" | "skgid" | "mark" | "iifname" | "oifname", ..) => {
                let (op, v, n) = operand(i + 1);
                out.push(format!("match meta {w} {op} {v}"));
                i = n;
            }
            ("ip" | "ip6", Some(field @ ("saddr" | "daddr")), _) => {
                let (op, v, n) = operand(i + 2);
                out.push(format!("match {w} {field} {op} {}", canon_addr(&v)));
                i = n;
            }
            ("tcp" | "udp", Some(field @ ("dport" | "sport")), _) => {
                let (op, v, n) = operand(i + 2);
                if v == "{" {
                    // `{ 53, 15008 }`: the set's elements up to `}`.
                    let mut items = Vec::new();
                    let mut j = n;
                    while let Some(tok) = t.get(j) {
                        j += 1;
                        if *tok == "}" {
                            break;
                        }
                        items.push(tok.trim_end_matches(',').to_owned());
                    }
                    items.sort_by_key(|s| s.parse::<u32>().unwrap_or(u32::MAX));
                    out.push(format!("match {w} {field} {op} {{{}}}", items.join(",")));
                    i = j;
                } else {
                    out.push(format!("match {w} {field} {op} {v}"));
                    i = n;
                }
            }
            _ => {
                out.push(format!("unknown {w}"));
                i += 1;
            }
        }
    }
    out
}

/// A number as nft writes it (`0x539` or `1337`), as a number.
fn num(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// One statement of nft's JSON as a canonical statement.
fn stmt_of_json(s: &Value) -> CanonStmt {
    let Some((kind, body)) = s.as_object().and_then(|o| o.iter().next()) else {
        return format!("unknown {s}");
    };
    match kind.as_str() {
        "counter" | "return" | "accept" | "drop" => kind.clone(),
        "jump" => format!("jump {}", body["target"].as_str().unwrap_or_default()),
        "redirect" => format!("redirect {}", body["port"]),
        "tproxy" => format!(
            "tproxy {} {}",
            body["family"].as_str().unwrap_or_default(),
            body["port"]
        ),
        "mangle" => format!(
            "set {} {}",
            expr_of_json(&body["key"]),
            value_of_json(&body["value"])
        ),
        "match" => {
            let op = body["op"].as_str().unwrap_or_default();
            let left = expr_of_json(&body["left"]);
            let right = &body["right"];
            match (op, right) {
                // `ct state related,established`: a set of states, however spelled.
                ("in" | "==", Value::Array(items)) => {
                    let mut v: Vec<String> = items.iter().map(value_of_json).collect();
                    v.sort_unstable();
                    format!("match {left} == {}", v.join(","))
                }
                // `ct state invalid`: nft prints a flag test as `in`; with one value it is
                // the input's implicit `==`.
                ("in", _) => format!("match {left} == {}", value_of_json(right)),
                _ => format!("match {left} {op} {}", value_of_json(right)),
            }
        }
        _ => format!("unknown {s}"),
    }
}

/// The left side of a match or the key of a mangle: `meta l4proto`, `ct mark`, `ip daddr`.
fn expr_of_json(e: &Value) -> String {
    if let Some(m) = e.get("meta") {
        format!("meta {}", m["key"].as_str().unwrap_or_default())
    } else if let Some(c) = e.get("ct") {
        format!("ct {}", c["key"].as_str().unwrap_or_default())
    } else if let Some([a, b]) = e.get("&").and_then(Value::as_array).map(Vec::as_slice) {
        format!("{} & {}", value_of_json(a), value_of_json(b))
    } else if let Some([a, b]) = e.get("|").and_then(Value::as_array).map(Vec::as_slice) {
        format!("{} | {}", value_of_json(a), value_of_json(b))
    } else if let Some(p) = e.get("payload") {
        format!(
            "{} {}",
            p["protocol"].as_str().unwrap_or_default(),
            p["field"].as_str().unwrap_or_default()
        )
    } else {
        format!("unknown {e}")
    }
}

/// A value: number, name, address, prefix, set, or an expression (`meta mark`).
fn value_of_json(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => canon_addr(s),
        Value::Object(o) if o.contains_key("prefix") => {
            let p = &o["prefix"];
            canon_addr(&format!(
                "{}/{}",
                p["addr"].as_str().unwrap_or_default(),
                p["len"]
            ))
        }
        Value::Object(o) if o.contains_key("set") => {
            let mut items: Vec<String> = o["set"]
                .as_array()
                .into_iter()
                .flatten()
                .map(value_of_json)
                .collect();
            items.sort_by_key(|s| s.parse::<u32>().unwrap_or(u32::MAX));
            format!("{{{}}}", items.join(","))
        }
        Value::Object(_) => expr_of_json(v),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Ambient's masked mark tests and its ct mark update, as our builder writes them and
    /// as nft 1.0.6 prints them back in JSON (captured from a pod's netns), read the same.
    #[test]
    fn ambient_mark_statements_read_the_same_both_ways() {
        let cases = [
            (
                "mark and 0xfff  != 0x539 counter redirect to :15006",
                json!([{"match": {"op": "!=", "left": {"&": [{"meta": {"key": "mark"}}, 4095]}, "right": 1337}},
                       {"counter": {"packets": 0, "bytes": 0}}, {"redirect": {"port": 15006}}]),
            ),
            (
                "meta mark & 0xfff == 0x539 counter ct mark set ct mark & 0xfffff000 |  0x111",
                json!([{"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 4095]}, "right": 1337}},
                       {"counter": null},
                       {"mangle": {"key": {"ct": {"key": "mark"}},
                                   "value": {"|": [{"&": [{"ct": {"key": "mark"}}, 4294963473u64]}, 273]}}}]),
            ),
            (
                "ct mark and 0xfff == 0x111 counter meta mark set ct mark",
                json!([{"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, 4095]}, "right": 273}},
                       {"counter": null},
                       {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"ct": {"key": "mark"}}}}]),
            ),
        ];
        for (text, json) in cases {
            let from_text = normalize(parse_expr(text));
            let from_json: Vec<CanonStmt> =
                json.as_array().unwrap().iter().map(stmt_of_json).collect();
            assert_eq!(from_text, normalize(from_json), "{text}");
            assert!(
                !from_text.iter().any(|s| s.starts_with("unknown")),
                "{from_text:?}"
            );
        }
        // A different mask or value is a difference.
        assert_ne!(
            parse_expr("mark and 0xfff != 0x539"),
            parse_expr("mark and 0xff != 0x539")
        );
        assert_ne!(
            parse_expr("ct mark set ct mark & 0xfffff000 | 0x111"),
            parse_expr("ct mark set ct mark & 0xfffff000 | 0x112")
        );
    }
}
