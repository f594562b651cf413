//! Our nftables transactions compiled to nf_tables netlink expressions: the text our
//! builders produce ([`super::nftables`], [`super::ambient::nftables`]; what `render`
//! prints and upstream's goldens hold) becomes the tables, chains, rules and anonymous
//! sets that [`crate::nft_wire::write`] sends, so that ADD writes and reads back its rules
//! without an `nft` process. Pure: no I/O.
//!
//! The compiler knows exactly the statements those builders write and emits what `nft`
//! 1.0 emits for each (its `src/evaluate.c` and `src/netlink_linearize.c`): every
//! conformance case compiles to the expressions the kernel holds after `nft -f` of the
//! same text, byte for byte (`cni-plugin/tests/nft_wire.rs`). Anything else is refused
//! with [`CompileError`], never guessed. In particular:
//! - a header match gets the dependency `nft` adds when the rule has not matched it yet:
//!   `meta nfproto ipv4|ipv6` before `ip`/`ip6` fields and `tproxy`, `meta l4proto
//!   tcp|udp` before `tcp`/`udp` ports;
//! - a prefix is loaded only up to its last whole byte when it ends on a byte boundary,
//!   and otherwise masked with a bitwise (so `10.0.0.0/8` loads one byte);
//! - `(x & m) | v` is the bitwise `(x & (m & !v)) ^ v`;
//! - a port set `{ 53, 15008 }` is an anonymous constant set of the rule, looked up
//!   (inverted for `!=`);
//! - an `insert rule … [index N]` puts the rule before the chain's rule N (the first
//!   without an index), and [`crate::nft_wire::batch`] appends every rule in its final
//!   place.
//!
//! Registers are nft's: `reg 1` for data, `reg 0` for the verdict. Byte orders are the
//! kernel's: ports and addresses in network order, marks, UIDs, conntrack state and
//! zone in host order.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::nfnetlink::{NFPROTO_IPV4, NFPROTO_IPV6};
use crate::nft_wire::{
    AnonSet, Data, Expr, Hook, Imm, Verdict, WireChain, WireRule, WireTable, ANON_SET, HOOK_NAMES,
    NFPROTO_INET,
};

/// A transaction line this compiler does not know, or a statement it cannot express.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot compile nftables line `{line}` for netlink: {reason}")]
pub struct CompileError {
    /// The transaction's line.
    pub line: String,
    /// What in it is not supported.
    pub reason: String,
}

// `NFT_META_*`, `NFT_CT_*`, `NFT_CMP_*`, `NFT_PAYLOAD_*` (`linux/netfilter/nf_tables.h`).
const META_MARK: u32 = 3;
const META_IIFNAME: u32 = 6;
const META_OIFNAME: u32 = 7;
const META_SKUID: u32 = 10;
const META_SKGID: u32 = 11;
const META_NFPROTO: u32 = 15;
const META_L4PROTO: u32 = 16;
const CT_STATE: u32 = 0;
const CT_MARK: u32 = 3;
const CT_ZONE: u32 = 17;
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const NETWORK_HEADER: u32 = 1;
const TRANSPORT_HEADER: u32 = 2;
/// nft's data register 1 (`NFT_REG_1`) and the verdict register.
const REG: u32 = 1;
const VERDICT_REG: u32 = 0;
/// `NF_NAT_RANGE_PROTO_SPECIFIED`: a redirect to a port.
const NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
/// `NFT_LOOKUP_F_INV`.
const LOOKUP_INV: u32 = 0x1;
/// nft's `TYPE_INET_SERVICE`: the datatype of a port set's key.
const TYPE_INET_SERVICE: u32 = 13;
/// `IFNAMSIZ`: an interface name match compares this many bytes (the name, NUL-padded).
const IFNAMSIZ: usize = 16;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Compiles transaction `text` (one `nft` command per line: `add table inet T`, `flush
/// table inet T`, `add chain inet T C [{ type … hook … priority … ; }]`, `add rule inet T
/// C …`, `insert rule inet T C [index N] …`) into the tables it leaves: each table's
/// chains in the order added, and its rules chain by chain in the order the kernel runs
/// them. Every table of the text is flushed by it (our transactions always do), which is
/// what [`crate::nft_wire::batch`] does for every table.
///
/// Errors: [`CompileError`] naming the first line that is not one of the above, or a
/// rule with a statement the compiler does not know.
pub fn compile(text: &str) -> Result<Vec<WireTable>, CompileError> {
    // Per table: its chains, and each chain's rules in order.
    let mut tables: Vec<(WireTable, Vec<Vec<WireRule>>)> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fail = |reason: &str| CompileError {
            line: line.to_owned(),
            reason: reason.to_owned(),
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        let table = |tables: &mut Vec<(WireTable, Vec<Vec<WireRule>>)>, name: &str| {
            tables.iter().position(|(t, _)| t.name == name)
        };
        match words.as_slice() {
            ["add", "table", "inet", name] => {
                if table(&mut tables, name).is_none() {
                    tables.push((
                        WireTable {
                            family: NFPROTO_INET,
                            name: (*name).to_owned(),
                            chains: Vec::new(),
                            rules: Vec::new(),
                        },
                        Vec::new(),
                    ));
                }
            }
            ["flush", "table", "inet", name] => {
                let t = table(&mut tables, name).ok_or_else(|| fail("no such table"))?;
                tables[t].1.iter_mut().for_each(Vec::clear);
            }
            ["add", "chain", "inet", name, chain, spec @ ..] => {
                let t = table(&mut tables, name).ok_or_else(|| fail("no such table"))?;
                let hook = match spec {
                    [] => None,
                    ["{", "type", kind, "hook", hook, "priority", prio, ";", "}"] => {
                        Some(base_chain(kind, hook, prio).map_err(|r| fail(&r))?)
                    }
                    _ => return Err(fail("not a chain specification")),
                };
                let (wt, rules) = &mut tables[t];
                if let Some(c) = wt.chains.iter().find(|c| c.name == *chain) {
                    if c.hook != hook {
                        return Err(fail("the chain is declared twice, differently"));
                    }
                } else {
                    wt.chains.push(WireChain {
                        table: (*name).to_owned(),
                        name: (*chain).to_owned(),
                        hook,
                    });
                    rules.push(Vec::new());
                }
            }
            ["add", "rule", "inet", name, chain, stmts @ ..] => {
                let (wt, rules, c) = locate(&mut tables, name, chain).map_err(|r| fail(&r))?;
                let rule = rule(&wt.name, chain, stmts).map_err(|r| fail(&r))?;
                rules[c].push(rule);
            }
            ["insert", "rule", "inet", name, chain, rest @ ..] => {
                let (at, stmts) = match rest {
                    ["index", n, stmts @ ..] => {
                        (n.parse::<usize>().map_err(|_| fail("bad index"))?, stmts)
                    }
                    stmts => (0, stmts),
                };
                let (wt, rules, c) = locate(&mut tables, name, chain).map_err(|r| fail(&r))?;
                let rule = rule(&wt.name, chain, stmts).map_err(|r| fail(&r))?;
                // nft refuses an index past the chain's last rule (there is no rule N to
                // insert before). Index 0 is the head, of an empty chain too, as a plain
                // `insert` is.
                if at > 0 && at >= rules[c].len() {
                    return Err(fail("no rule at that index"));
                }
                rules[c].insert(at, rule);
            }
            _ => return Err(fail("not a command our transactions use")),
        }
    }
    Ok(tables
        .into_iter()
        .map(|(mut t, rules)| {
            t.rules = rules.into_iter().flatten().collect();
            t
        })
        .collect())
}

/// The table, its per-chain rule lists and the index of `chain` in them.
fn locate<'t>(
    tables: &'t mut [(WireTable, Vec<Vec<WireRule>>)],
    name: &str,
    chain: &str,
) -> Result<(&'t WireTable, &'t mut Vec<Vec<WireRule>>, usize), String> {
    let (t, rules) = tables
        .iter_mut()
        .find(|(t, _)| t.name == name)
        .ok_or("no such table")?;
    let c = t
        .chains
        .iter()
        .position(|c| c.name == chain)
        .ok_or("no such chain")?;
    Ok((t, rules, c))
}

/// A base chain's `type KIND hook HOOK priority PRIO`, with the default policy accept.
fn base_chain(kind: &str, hook: &str, prio: &str) -> Result<Hook, String> {
    if !matches!(kind, "filter" | "nat" | "route") {
        return Err(format!("unknown chain type {kind}"));
    }
    // Our tables hook no `ingress` (a netdev-style hook, bound to a device).
    let hooknum = HOOK_NAMES[..5]
        .iter()
        .position(|h| *h == hook)
        .ok_or_else(|| format!("unknown hook {hook}"))?;
    let priority = prio
        .parse::<i32>()
        .map_err(|_| format!("priority {prio} is not a number"))?;
    Ok(Hook {
        kind: kind.to_owned(),
        hooknum: hooknum as u32,
        priority,
        policy: 1,
    })
}

/// One rule's statements, compiled.
fn rule(table: &str, chain: &str, stmts: &[&str]) -> Result<WireRule, String> {
    // `{ 53, 15008 }` arrives as `{`, `53,`, `15008`, `}`: commas become their own tokens.
    let mut toks = Vec::new();
    for w in stmts {
        match w.strip_suffix(',') {
            Some(head) if !head.is_empty() => toks.extend([head, ","]),
            _ => toks.push(w),
        }
    }
    let mut r = RuleCompiler {
        toks,
        pos: 0,
        exprs: Vec::new(),
        sets: Vec::new(),
        nfproto: None,
        l4proto: None,
    };
    r.statements()?;
    Ok(WireRule {
        family: NFPROTO_INET,
        table: table.to_owned(),
        chain: chain.to_owned(),
        handle: 0,
        exprs: r.exprs,
        sets: r.sets,
        source: stmts.join(" "),
    })
}

struct RuleCompiler<'a> {
    toks: Vec<&'a str>,
    pos: usize,
    exprs: Vec<Expr>,
    sets: Vec<AnonSet>,
    /// The network protocol the rule has matched so far (`meta nfproto`).
    nfproto: Option<u8>,
    /// The transport protocol the rule has matched so far (`meta l4proto`).
    l4proto: Option<u8>,
}

/// `==` (implicit or written) or `!=`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Neq,
}

impl Op {
    fn cmp(self) -> u32 {
        match self {
            Op::Eq => CMP_EQ,
            Op::Neq => CMP_NEQ,
        }
    }
}

fn number(tok: &str) -> Result<u32, String> {
    let parsed = match tok.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => tok.parse(),
    };
    parsed.map_err(|_| format!("{tok} is not a number"))
}

fn port(tok: &str) -> Result<u16, String> {
    tok.parse().map_err(|_| format!("{tok} is not a port"))
}

impl<'a> RuleCompiler<'a> {
    fn next(&mut self) -> Result<&'a str, String> {
        let tok = self
            .toks
            .get(self.pos)
            .copied()
            .ok_or("the rule ends early")?;
        self.pos += 1;
        Ok(tok)
    }

    fn peek(&self) -> Option<&'a str> {
        self.toks.get(self.pos).copied()
    }

    fn expect(&mut self, word: &str) -> Result<(), String> {
        match self.next()? {
            w if w == word => Ok(()),
            w => Err(format!("expected {word}, found {w}")),
        }
    }

    /// An optional `==` or `!=`.
    fn op(&mut self) -> Op {
        match self.peek() {
            Some("!=") => {
                self.pos += 1;
                Op::Neq
            }
            Some("==") => {
                self.pos += 1;
                Op::Eq
            }
            _ => Op::Eq,
        }
    }

    fn push(&mut self, e: Expr) {
        self.exprs.push(e);
    }

    fn cmp(&mut self, op: Op, data: Vec<u8>) {
        self.push(Expr::Cmp {
            op: op.cmp(),
            sreg: REG,
            data: Data(data),
        });
    }

    fn verdict(&mut self, v: Verdict) {
        self.push(Expr::Immediate {
            dreg: VERDICT_REG,
            data: Imm::Verdict(v),
        });
    }

    fn immediate(&mut self, data: Vec<u8>) {
        self.push(Expr::Immediate {
            dreg: REG,
            data: Imm::Value(Data(data)),
        });
    }

    fn statements(&mut self) -> Result<(), String> {
        while let Some(tok) = self.peek() {
            self.pos += 1;
            match tok {
                "meta" => match self.next()? {
                    "l4proto" => self.l4proto_match()?,
                    "mark" if self.peek() == Some("set") => self.mark_set()?,
                    key @ ("mark" | "skuid" | "skgid" | "iifname" | "oifname") => {
                        self.meta_match(key)?
                    }
                    key => return Err(format!("meta {key} is not supported")),
                },
                "mark" | "skuid" | "skgid" | "iifname" | "oifname" => self.meta_match(tok)?,
                "ip" | "ip6" => self.address_match(tok)?,
                "tcp" | "udp" => self.port_match(tok)?,
                "ct" => self.ct()?,
                "counter" => self.push(Expr::Counter),
                "accept" => self.verdict(Verdict::Accept),
                "drop" => self.verdict(Verdict::Drop),
                "return" => self.verdict(Verdict::Return),
                "jump" => {
                    let chain = self.next()?;
                    self.verdict(Verdict::Jump(chain.to_owned()));
                }
                "redirect" => self.redirect()?,
                "tproxy" => self.tproxy()?,
                other => return Err(format!("statement {other} is not supported")),
            }
        }
        Ok(())
    }

    fn meta_load(&mut self, key: u32) {
        self.push(Expr::MetaLoad { key, dreg: REG });
    }

    /// `meta l4proto tcp|udp`.
    fn l4proto_match(&mut self) -> Result<(), String> {
        let op = self.op();
        let proto = match self.next()? {
            "tcp" => IPPROTO_TCP,
            "udp" => IPPROTO_UDP,
            p => return Err(format!("l4proto {p} is not supported")),
        };
        self.meta_load(META_L4PROTO);
        self.cmp(op, vec![proto]);
        if op == Op::Eq {
            self.l4proto = Some(proto);
        }
        Ok(())
    }

    /// `[meta] KEY [and|& MASK] [==|!=] VALUE` for a mark, UID, GID or interface name.
    fn meta_match(&mut self, key: &str) -> Result<(), String> {
        let code = match key {
            "mark" => META_MARK,
            "skuid" => META_SKUID,
            "skgid" => META_SKGID,
            "iifname" => META_IIFNAME,
            _ => META_OIFNAME,
        };
        self.meta_load(code);
        if code == META_IIFNAME || code == META_OIFNAME {
            let op = self.op();
            let name = self.next()?;
            let data = interface_name(name)?;
            self.cmp(op, data);
            return Ok(());
        }
        self.masked_u32_match()
    }

    /// `[and|& MASK] [==|!=] VALUE` of a 32-bit host-order value already in the register.
    fn masked_u32_match(&mut self) -> Result<(), String> {
        if matches!(self.peek(), Some("and" | "&")) {
            self.pos += 1;
            let mask = number(self.next()?)?;
            self.push(Expr::Bitwise {
                sreg: REG,
                dreg: REG,
                mask: Data(mask.to_ne_bytes().to_vec()),
                xor: Data(vec![0; 4]),
            });
        }
        let op = self.op();
        let value = number(self.next()?)?;
        self.cmp(op, value.to_ne_bytes().to_vec());
        Ok(())
    }

    /// The dependency `nft` adds before a header field, unless the rule has matched it
    /// already: `meta nfproto P` (`key` [`META_NFPROTO`]) before a network header field
    /// or `tproxy` in an `inet` table, `meta l4proto P` ([`META_L4PROTO`]) before a
    /// transport header field.
    fn need(&mut self, key: u32, proto: u8) -> Result<(), String> {
        let (matched, layer) = if key == META_NFPROTO {
            (&mut self.nfproto, "network")
        } else {
            (&mut self.l4proto, "transport")
        };
        match *matched {
            Some(p) if p == proto => return Ok(()),
            Some(_) => return Err(format!("the rule matches two {layer} protocols")),
            None => *matched = Some(proto),
        }
        self.meta_load(key);
        self.cmp(Op::Eq, vec![proto]);
        Ok(())
    }

    /// `ip|ip6 saddr|daddr [==|!=] ADDRESS[/LEN]`.
    fn address_match(&mut self, family: &str) -> Result<(), String> {
        let v6 = family == "ip6";
        let field = self.next()?;
        let (offset, len) = match (v6, field) {
            (false, "saddr") => (12, 4),
            (false, "daddr") => (16, 4),
            (true, "saddr") => (8, 16),
            (true, "daddr") => (24, 16),
            _ => return Err(format!("{family} {field} is not supported")),
        };
        let op = self.op();
        let tok = self.next()?;
        let net: IpNet = match tok.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => tok
                .parse::<IpAddr>()
                .map(IpNet::from)
                .map_err(|_| format!("{tok} is not an address or prefix"))?,
        };
        if net.addr().is_ipv6() != v6 {
            return Err(format!("{tok} is not an {family} address"));
        }
        self.need(META_NFPROTO, if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 })?;
        let bytes = match net.network() {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let plen = usize::from(net.prefix_len());
        let full = len * 8;
        if plen == full || (plen > 0 && plen % 8 == 0) {
            // A whole address, or a prefix ending on a byte boundary: load just it.
            let n = if plen == full { len } else { plen / 8 };
            self.push(Expr::Payload {
                base: NETWORK_HEADER,
                offset,
                len: n as u32,
                dreg: REG,
            });
            self.cmp(op, bytes[..n].to_vec());
        } else {
            self.push(Expr::Payload {
                base: NETWORK_HEADER,
                offset,
                len: len as u32,
                dreg: REG,
            });
            let mask = match net.netmask() {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            self.push(Expr::Bitwise {
                sreg: REG,
                dreg: REG,
                mask: Data(mask),
                xor: Data(vec![0; len]),
            });
            self.cmp(op, bytes);
        }
        Ok(())
    }

    /// `tcp|udp dport|sport [==|!=] PORT` or `… { PORT, PORT }`.
    fn port_match(&mut self, proto_name: &str) -> Result<(), String> {
        let proto = if proto_name == "tcp" {
            IPPROTO_TCP
        } else {
            IPPROTO_UDP
        };
        let field = self.next()?;
        let offset = match field {
            "sport" => 0,
            "dport" => 2,
            _ => return Err(format!("{proto_name} {field} is not supported")),
        };
        let op = self.op();
        self.need(META_L4PROTO, proto)?;
        self.push(Expr::Payload {
            base: TRANSPORT_HEADER,
            offset,
            len: 2,
            dreg: REG,
        });
        if self.peek() != Some("{") {
            let p = port(self.next()?)?;
            self.cmp(op, p.to_be_bytes().to_vec());
            return Ok(());
        }
        self.pos += 1;
        let mut elements = Vec::new();
        loop {
            let p = port(self.next()?)?;
            elements.push(Data(p.to_be_bytes().to_vec()));
            match self.next()? {
                "," => continue,
                "}" => break,
                other => return Err(format!("expected , or }} in a set, found {other}")),
            }
        }
        self.push(Expr::Lookup {
            sreg: REG,
            set: ANON_SET.to_owned(),
            flags: if op == Op::Neq { LOOKUP_INV } else { 0 },
        });
        self.sets.push(AnonSet {
            key_type: TYPE_INET_SERVICE,
            key_len: 2,
            elements,
            userdata: port_set_userdata(proto, offset),
        });
        Ok(())
    }

    /// `ct state …`, `ct mark [and M] [==|!=] V`, `ct mark set …`, `ct zone set N`.
    fn ct(&mut self) -> Result<(), String> {
        match (self.next()?, self.peek()) {
            ("state", _) => {
                let op = self.op();
                let mut bits = 0u32;
                for state in self.next()?.split(',') {
                    bits |= match state {
                        "invalid" => 1,
                        "established" => 2,
                        "related" => 4,
                        "new" => 8,
                        "untracked" => 64,
                        s => return Err(format!("unknown conntrack state {s}")),
                    };
                }
                self.push(Expr::CtLoad {
                    key: CT_STATE,
                    dreg: REG,
                });
                self.push(Expr::Bitwise {
                    sreg: REG,
                    dreg: REG,
                    mask: Data(bits.to_ne_bytes().to_vec()),
                    xor: Data(vec![0; 4]),
                });
                // Any of the states: the masked value is not zero.
                let op = if op == Op::Eq { Op::Neq } else { Op::Eq };
                self.cmp(op, vec![0; 4]);
                Ok(())
            }
            ("mark", Some("set")) => {
                self.pos += 1;
                self.mark_value()?;
                self.push(Expr::CtSet {
                    key: CT_MARK,
                    sreg: REG,
                });
                Ok(())
            }
            ("mark", _) => {
                self.push(Expr::CtLoad {
                    key: CT_MARK,
                    dreg: REG,
                });
                self.masked_u32_match()
            }
            ("zone", Some("set")) => {
                self.pos += 1;
                let zone = number(self.next()?)?;
                let zone = u16::try_from(zone).map_err(|_| format!("zone {zone} is too big"))?;
                self.immediate(zone.to_ne_bytes().to_vec());
                self.push(Expr::CtSet {
                    key: CT_ZONE,
                    sreg: REG,
                });
                Ok(())
            }
            (key, _) => Err(format!("ct {key} is not supported")),
        }
    }

    /// The value a mark is set to, into the register: a number, `mark` / `meta mark`,
    /// or `ct mark [and|& M or|| V]`.
    fn mark_value(&mut self) -> Result<(), String> {
        match self.next()? {
            "mark" => self.meta_load(META_MARK),
            "meta" => {
                self.expect("mark")?;
                self.meta_load(META_MARK);
            }
            "ct" => {
                self.expect("mark")?;
                self.push(Expr::CtLoad {
                    key: CT_MARK,
                    dreg: REG,
                });
                if matches!(self.peek(), Some("and" | "&")) {
                    self.pos += 1;
                    let mask = number(self.next()?)?;
                    let value = match self.peek() {
                        Some("or" | "|") => {
                            self.pos += 1;
                            number(self.next()?)?
                        }
                        _ => 0,
                    };
                    self.push(Expr::Bitwise {
                        sreg: REG,
                        dreg: REG,
                        mask: Data((mask & !value).to_ne_bytes().to_vec()),
                        xor: Data(value.to_ne_bytes().to_vec()),
                    });
                }
            }
            tok => {
                let value = number(tok)?;
                self.immediate(value.to_ne_bytes().to_vec());
            }
        }
        Ok(())
    }

    /// `meta mark set …`.
    fn mark_set(&mut self) -> Result<(), String> {
        self.expect("set")?;
        self.mark_value()?;
        self.push(Expr::MetaSet {
            key: META_MARK,
            sreg: REG,
        });
        Ok(())
    }

    /// `:PORT` of a redirect or tproxy.
    fn target_port(&mut self) -> Result<(), String> {
        self.expect("to")?;
        let tok = self.next()?;
        let p = port(
            tok.strip_prefix(':')
                .ok_or("only a port (`:P`) is supported")?,
        )?;
        self.immediate(p.to_be_bytes().to_vec());
        Ok(())
    }

    /// `redirect to :PORT`, after a transport protocol match.
    fn redirect(&mut self) -> Result<(), String> {
        if self.l4proto.is_none() {
            return Err("a redirect to a port needs a transport protocol match".into());
        }
        self.target_port()?;
        self.push(Expr::Redir {
            proto_min: Some(REG),
            proto_max: None,
            flags: Some(NAT_RANGE_PROTO_SPECIFIED),
        });
        Ok(())
    }

    /// `tproxy ip|ip6 to :PORT`, after a transport protocol match.
    fn tproxy(&mut self) -> Result<(), String> {
        let family = match self.next()? {
            "ip" => NFPROTO_IPV4,
            "ip6" => NFPROTO_IPV6,
            f => return Err(format!("tproxy {f} is not supported")),
        };
        if self.l4proto.is_none() {
            return Err("tproxy needs a transport protocol match".into());
        }
        self.need(META_NFPROTO, family)?;
        self.target_port()?;
        self.push(Expr::Tproxy {
            family: u32::from(family),
            addr: None,
            port: Some(REG),
        });
        Ok(())
    }
}

/// An interface name as `meta iifname|oifname` compares it: the name NUL-padded to
/// [`IFNAMSIZ`], or for a wildcard `NAME*` just NAME's bytes.
fn interface_name(name: &str) -> Result<Vec<u8>, String> {
    let (stem, wildcard) = match name.strip_suffix('*') {
        Some(stem) => (stem, true),
        None => (name, false),
    };
    let ok = !stem.is_empty()
        && stem.len() < IFNAMSIZ
        && stem
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'*' | b'/' | b'{' | b'}'));
    if !ok {
        return Err(format!("{name:?} is not an interface name"));
    }
    let mut data = stem.as_bytes().to_vec();
    if !wildcard {
        data.resize(IFNAMSIZ, 0);
    }
    Ok(data)
}

/// What `nft` stores in a port set's `NFTA_SET_USERDATA` (libnftnl's `NFTNL_UDATA_SET_*`
/// TLVs, one byte type, one byte length): the key's byte order (big endian), and the
/// expression the key came from (`typeof tcp dport`: payload, protocol, field), so that
/// `nft list` prints the set as `nft` would.
fn port_set_userdata(proto: u8, offset: u32) -> Vec<u8> {
    // nft's `PROTO_DESC_UDP` / `PROTO_DESC_TCP`, and `TCPHDR_SPORT/DPORT` (1, 2), which
    // `UDPHDR_*` share.
    let desc: u8 = if proto == IPPROTO_TCP { 8 } else { 6 };
    let field: u8 = if offset == 0 { 1 } else { 2 };
    let u32le = |v: u8| [v, 0, 0, 0];
    let mut typeof_data = vec![0, 4];
    typeof_data.extend(u32le(desc));
    typeof_data.extend([1, 4]);
    typeof_data.extend(u32le(field));
    // `EXPR_PAYLOAD`.
    let mut typeof_key = vec![0, 4];
    typeof_key.extend(u32le(7));
    typeof_key.extend([1, typeof_data.len() as u8]);
    typeof_key.extend(typeof_data);
    // `BYTEORDER_BIG_ENDIAN`.
    let mut out = vec![0, 4];
    out.extend(u32le(2));
    out.extend([3, typeof_key.len() as u8]);
    out.extend(typeof_key);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        let tables = compile(text).unwrap();
        tables
            .iter()
            .flat_map(|t| &t.rules)
            .flat_map(|r| r.lines())
            .collect()
    }

    #[test]
    fn statements_compile_as_nft_sends_them() {
        let text = "add table inet t\nadd chain inet t c\n\
            add rule inet t c oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != { 53, 15008 } skuid 1337 counter jump d\n";
        assert_eq!(
            lines(text),
            [
                "  [ meta load oifname => reg 1 ]",
                "  [ cmp eq reg 1 0x00006f6c 0x00000000 0x00000000 0x00000000 ]",
                "  [ meta load l4proto => reg 1 ]",
                "  [ cmp eq reg 1 0x00000006 ]",
                "  [ meta load nfproto => reg 1 ]",
                "  [ cmp eq reg 1 0x00000002 ]",
                "  [ payload load 4b @ network header + 16 => reg 1 ]",
                "  [ cmp neq reg 1 0x0100007f ]",
                "  [ payload load 2b @ transport header + 2 => reg 1 ]",
                "  [ lookup reg 1 set __set%d 0x1 ]",
                "  [ meta load skuid => reg 1 ]",
                "  [ cmp eq reg 1 0x00000539 ]",
                "  [ counter ]",
                "  [ immediate reg 0 jump -> d ]",
            ]
        );
    }

    #[test]
    fn prefixes_load_whole_bytes_or_mask() {
        let text = "add table inet t\nadd chain inet t c\n\
            add rule inet t c ip daddr 10.0.0.0/8 return\n\
            add rule inet t c ip daddr 10.16.0.0/12 return\n";
        assert_eq!(
            lines(text),
            [
                "  [ meta load nfproto => reg 1 ]",
                "  [ cmp eq reg 1 0x00000002 ]",
                "  [ payload load 1b @ network header + 16 => reg 1 ]",
                "  [ cmp eq reg 1 0x0000000a ]",
                "  [ immediate reg 0 return ]",
                "  [ meta load nfproto => reg 1 ]",
                "  [ cmp eq reg 1 0x00000002 ]",
                "  [ payload load 4b @ network header + 16 => reg 1 ]",
                "  [ bitwise reg 1 = ( reg 1 & 0x0000f0ff ) ^ 0x00000000 ]",
                "  [ cmp eq reg 1 0x0000100a ]",
                "  [ immediate reg 0 return ]",
            ]
        );
    }

    #[test]
    fn inserts_land_before_the_indexed_rule() {
        let text = "add table inet t\nadd chain inet t c\n\
            add rule inet t c accept\nadd rule inet t c drop\n\
            insert rule inet t c index 1 return\ninsert rule inet t c counter\n";
        assert_eq!(
            lines(text),
            [
                "  [ counter ]",
                "  [ immediate reg 0 accept ]",
                "  [ immediate reg 0 return ]",
                "  [ immediate reg 0 drop ]",
            ]
        );
    }

    #[test]
    fn what_it_does_not_know_is_refused() {
        for bad in [
            "add rule inet t c snat to 10.0.0.1",
            "add rule inet t c ip daddr @probes accept",
            "add rule inet t c meta nftrace set 1",
            "add rule inet t c tcp dport != { 53, x }",
            "add rule inet t c redirect to :15001",
            "add rule inet t c ip daddr 10.0.0.1 ip6 daddr ::1 accept",
            "add rule inet t c iifname \"a b\" accept",
            "add rule inet t c oifname",
            "insert rule inet t c index 3 accept",
            "add rule inet t nochain accept",
            "delete table inet t",
            "add chain inet t d { type nat hook egress priority 0 ; }",
        ] {
            let text = format!("add table inet t\nadd chain inet t c\n{bad}\n");
            let err = compile(&text).unwrap_err();
            assert_eq!(err.line, bad, "{err}");
        }
    }

    #[test]
    fn hostile_text_never_panics() {
        let words = [
            "add", "rule", "inet", "t", "c", "{", "}", ",", "ip", "daddr", "!=", "tcp", "dport",
            "ct", "mark", "set", "and", "0x", "::", "/999", ":", "to", "redirect", "index", "9",
            "insert", "meta", "iifname", "*", "zone", "65536",
        ];
        let mut seed: u32 = 0x1234_5678;
        for _ in 0..3000 {
            let mut line = String::from("add table inet t\nadd chain inet t c\n");
            for _ in 0..(seed % 12) {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                line.push_str(words[(seed as usize) % words.len()]);
                line.push(' ');
            }
            let _ = compile(&line);
        }
    }
}
