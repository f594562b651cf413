//! nf_tables rules as the kernel holds them: the rule dump (`NFT_MSG_GETRULE`) decoded
//! into the expressions that our tables use (and the chain dump, `NFT_MSG_GETCHAIN`, into
//! base chains' hooks), and printed in libnftnl's debug format
//! (what `nft --debug=netlink` prints for a rule it sends), so that what the kernel holds
//! and what `nft` sent compare line for line. Message and attribute numbers are those of
//! `include/uapi/linux/netfilter/nf_tables.h`; the printed form follows libnftnl's
//! `src/expr/*.c` `snprintf` functions.
//!
//! And the write side: [`write()`] sends a [`Transaction`] (tables deleted; tables,
//! base chains, anonymous sets and rules made of those expressions, [`Expr::encode`]) as
//! one nfnetlink batch, all or nothing. What to write comes from our `nft` text through
//! [`crate::rules::nft_compile`].
//!
//! Decoding never panics on a hostile or truncated dump: every length is checked, and an
//! expression this module does not know is kept as [`Expr::Other`], which compares unequal
//! to anything we write (drift).

use std::fmt;

use crate::netns::Inside;
use crate::nfnetlink::{
    attrs, invalid, nfnetlink_socket, push_attr, push_message, receive, receive_batch, u16_at,
    NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES, NLA_F_NESTED, NLM_F_ACK,
    NLM_F_DUMP, NLM_F_REQUEST,
};

/// `NFT_MSG_GETRULE`.
const NFT_MSG_GETRULE: u16 = 7;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

pub use crate::nfnetlink::NFPROTO_INET;

/// The value of attribute `kind` in `b`, if present.
pub(crate) fn attr(b: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(b).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

/// The big-endian `u32` attribute `kind` of `b`.
pub(crate) fn be32(b: &[u8], kind: u16) -> Option<u32> {
    let v = attr(b, kind)?;
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

/// The big-endian `u64` attribute `kind` of `b`.
fn be64(b: &[u8], kind: u16) -> Option<u64> {
    let v = attr(b, kind)?;
    Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
}

/// A NUL-terminated string attribute.
pub(crate) fn string(v: &[u8]) -> String {
    let s = v.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(s).into_owned()
}

/// A register value (`NFTA_DATA_VALUE`): its bytes as the kernel holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data(pub Vec<u8>);

impl fmt::Display for Data {
    /// libnftnl's form: each 32-bit word (the last zero-padded), native-endian, as
    /// `0x%08x`, separated by spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, chunk) in self.0.chunks(4).enumerate() {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "0x{:08x}", u32::from_ne_bytes(word))?;
        }
        Ok(())
    }
}

/// A verdict (`NFTA_DATA_VERDICT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `NF_DROP`.
    Drop,
    /// `NF_ACCEPT`.
    Accept,
    /// `NFT_CONTINUE`.
    Continue,
    /// `NFT_BREAK`.
    Break,
    /// `NFT_JUMP` to a chain.
    Jump(String),
    /// `NFT_GOTO` to a chain.
    Goto(String),
    /// `NFT_RETURN`.
    Return,
    /// Any other code.
    Other(i32),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Drop => f.write_str("drop"),
            Verdict::Accept => f.write_str("accept"),
            Verdict::Continue => f.write_str("continue"),
            Verdict::Break => f.write_str("break"),
            Verdict::Jump(c) => write!(f, "jump -> {c}"),
            Verdict::Goto(c) => write!(f, "goto -> {c}"),
            Verdict::Return => f.write_str("return"),
            Verdict::Other(code) => write!(f, "verdict {code}"),
        }
    }
}

/// The data of `NFTA_IMMEDIATE_DATA` or `NFTA_CMP_DATA`: a value or a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imm {
    /// A value.
    Value(Data),
    /// A verdict.
    Verdict(Verdict),
}

fn data_of(v: &[u8]) -> Option<Imm> {
    if let Some(value) = attr(v, NFTA_DATA_VALUE) {
        return Some(Imm::Value(Data(value.to_vec())));
    }
    let verdict = attr(v, NFTA_DATA_VERDICT)?;
    let code = be32(verdict, NFTA_VERDICT_CODE)? as i32;
    let chain = || {
        attr(verdict, NFTA_VERDICT_CHAIN)
            .map(string)
            .unwrap_or_default()
    };
    Some(Imm::Verdict(match code {
        0 => Verdict::Drop,
        1 => Verdict::Accept,
        -1 => Verdict::Continue,
        -2 => Verdict::Break,
        -3 => Verdict::Jump(chain()),
        -4 => Verdict::Goto(chain()),
        -5 => Verdict::Return,
        other => Verdict::Other(other),
    }))
}

/// One expression of a rule, as far as our tables use them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `meta load KEY => reg DREG`.
    MetaLoad {
        /// `NFT_META_*`.
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `meta set KEY with reg SREG`.
    MetaSet {
        /// `NFT_META_*`.
        key: u32,
        /// Source register.
        sreg: u32,
    },
    /// `cmp OP reg SREG DATA`.
    Cmp {
        /// `NFT_CMP_*`.
        op: u32,
        /// Source register.
        sreg: u32,
        /// The value compared with.
        data: Data,
    },
    /// `payload load LENb @ BASE header + OFFSET => reg DREG`.
    Payload {
        /// `NFT_PAYLOAD_*_HEADER`.
        base: u32,
        /// Offset in bytes.
        offset: u32,
        /// Length in bytes.
        len: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `bitwise reg DREG = ( reg SREG & MASK ) ^ XOR`.
    Bitwise {
        /// Source register.
        sreg: u32,
        /// Destination register.
        dreg: u32,
        /// The mask.
        mask: Data,
        /// The xor value.
        xor: Data,
    },
    /// `immediate reg DREG DATA` or a verdict.
    Immediate {
        /// Destination register (`0`: the verdict register).
        dreg: u32,
        /// The value or verdict.
        data: Imm,
    },
    /// `counter` (its counts are left out: they change).
    Counter,
    /// `ct load KEY => reg DREG`.
    CtLoad {
        /// `NFT_CT_*`.
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `ct set KEY with reg SREG`.
    CtSet {
        /// `NFT_CT_*`.
        key: u32,
        /// Source register.
        sreg: u32,
    },
    /// `redir proto_min reg R flags F`.
    Redir {
        /// Register with the port.
        proto_min: Option<u32>,
        /// Register with the last port of a range; `None` when it is `proto_min`'s (the
        /// kernel fills it in when only the first is given, and dumps it).
        proto_max: Option<u32>,
        /// `NF_NAT_RANGE_*` flags.
        flags: Option<u32>,
    },
    /// `tproxy FAMILY port reg R`.
    Tproxy {
        /// `NFPROTO_IPV4` or `NFPROTO_IPV6` (0: both).
        family: u32,
        /// Register with the address, if any.
        addr: Option<u32>,
        /// Register with the port, if any.
        port: Option<u32>,
    },
    /// `lookup reg SREG set NAME FLAGS`.
    Lookup {
        /// Source register.
        sreg: u32,
        /// The set's name (an anonymous set's is `__set<N>`).
        set: String,
        /// `NFT_LOOKUP_F_*` (`0x1`: inverted).
        flags: u32,
    },
    /// An expression this module does not decode: its name and raw data.
    Other {
        /// `NFTA_EXPR_NAME`.
        name: String,
        /// `NFTA_EXPR_DATA`, raw.
        data: Vec<u8>,
    },
}

fn meta_key(key: u32) -> String {
    // `NFT_META_*`, as libnftnl names them.
    const NAMES: [&str; 17] = [
        "len",
        "protocol",
        "priority",
        "mark",
        "iif",
        "oif",
        "iifname",
        "oifname",
        "iiftype",
        "oiftype",
        "skuid",
        "skgid",
        "nftrace",
        "rtclassid",
        "secmark",
        "nfproto",
        "l4proto",
    ];
    NAMES
        .get(key as usize)
        .map_or_else(|| format!("unknown({key})"), |n| (*n).to_owned())
}

fn ct_key(key: u32) -> String {
    // `NFT_CT_*`, as libnftnl names them.
    const NAMES: [&str; 18] = [
        "state",
        "direction",
        "status",
        "mark",
        "secmark",
        "expiration",
        "helper",
        "l3protocol",
        "src",
        "dst",
        "protocol",
        "proto_src",
        "proto_dst",
        "label",
        "packets",
        "bytes",
        "avgpkt",
        "zone",
    ];
    NAMES
        .get(key as usize)
        .map_or_else(|| format!("unknown({key})"), |n| (*n).to_owned())
}

fn cmp_op(op: u32) -> &'static str {
    ["eq", "neq", "lt", "lte", "gt", "gte"]
        .get(op as usize)
        .copied()
        .unwrap_or("unknown")
}

fn payload_base(base: u32) -> &'static str {
    ["link", "network", "transport", "inner"]
        .get(base as usize)
        .copied()
        .unwrap_or("unknown")
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::MetaLoad { key, dreg } => {
                write!(f, "meta load {} => reg {dreg}", meta_key(*key))
            }
            Expr::MetaSet { key, sreg } => write!(f, "meta set {} with reg {sreg}", meta_key(*key)),
            Expr::Cmp { op, sreg, data } => write!(f, "cmp {} reg {sreg} {data}", cmp_op(*op)),
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => write!(
                f,
                "payload load {len}b @ {} header + {offset} => reg {dreg}",
                payload_base(*base)
            ),
            Expr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
            } => write!(f, "bitwise reg {dreg} = ( reg {sreg} & {mask} ) ^ {xor}"),
            Expr::Immediate { dreg, data } => match data {
                Imm::Value(v) => write!(f, "immediate reg {dreg} {v}"),
                Imm::Verdict(v) => write!(f, "immediate reg {dreg} {v}"),
            },
            Expr::Counter => f.write_str("counter"),
            Expr::CtLoad { key, dreg } => write!(f, "ct load {} => reg {dreg}", ct_key(*key)),
            Expr::CtSet { key, sreg } => write!(f, "ct set {} with reg {sreg}", ct_key(*key)),
            Expr::Redir {
                proto_min,
                proto_max,
                flags,
            } => {
                f.write_str("redir")?;
                if let Some(r) = proto_min {
                    write!(f, " proto_min reg {r}")?;
                }
                if let Some(r) = proto_max {
                    write!(f, " proto_max reg {r}")?;
                }
                if let Some(fl) = flags {
                    write!(f, " flags 0x{fl:x}")?;
                }
                Ok(())
            }
            Expr::Tproxy { family, addr, port } => {
                f.write_str("tproxy")?;
                match family {
                    2 => f.write_str(" ip")?,
                    10 => f.write_str(" ip6")?,
                    _ => {}
                }
                if let Some(r) = addr {
                    write!(f, " addr reg {r}")?;
                }
                if let Some(r) = port {
                    write!(f, " port reg {r}")?;
                }
                Ok(())
            }
            Expr::Lookup { sreg, set, flags } => {
                write!(f, "lookup reg {sreg} set {set} 0x{flags:x}")
            }
            Expr::Other { name, data } => write!(f, "{name} (undecoded, {} bytes)", data.len()),
        }
    }
}

/// Decodes one `NFTA_LIST_ELEM` of `NFTA_RULE_EXPRESSIONS`.
fn decode_expr(elem: &[u8]) -> Expr {
    let name = attr(elem, NFTA_EXPR_NAME).map(string).unwrap_or_default();
    let d = attr(elem, NFTA_EXPR_DATA).unwrap_or_default();
    let decoded = match name.as_str() {
        "meta" => match (be32(d, 1), be32(d, 2), be32(d, 3)) {
            (Some(dreg), Some(key), None) => Some(Expr::MetaLoad { key, dreg }),
            (None, Some(key), Some(sreg)) => Some(Expr::MetaSet { key, sreg }),
            _ => None,
        },
        "cmp" => (|| {
            Some(Expr::Cmp {
                sreg: be32(d, 1)?,
                op: be32(d, 2)?,
                data: match data_of(attr(d, 3)?)? {
                    Imm::Value(v) => v,
                    Imm::Verdict(_) => return None,
                },
            })
        })(),
        "payload" if attr(d, 5).is_none() => (|| {
            Some(Expr::Payload {
                dreg: be32(d, 1)?,
                base: be32(d, 2)?,
                offset: be32(d, 3)?,
                len: be32(d, 4)?,
            })
        })(),
        "bitwise" if attr(d, 6).is_none_or(|op| op == [0, 0, 0, 0]) => (|| {
            let value = |kind| match data_of(attr(d, kind)?)? {
                Imm::Value(v) => Some(v),
                Imm::Verdict(_) => None,
            };
            Some(Expr::Bitwise {
                sreg: be32(d, 1)?,
                dreg: be32(d, 2)?,
                mask: value(4)?,
                xor: value(5)?,
            })
        })(),
        "immediate" => (|| {
            Some(Expr::Immediate {
                dreg: be32(d, 1)?,
                data: data_of(attr(d, 2)?)?,
            })
        })(),
        "counter" => Some(Expr::Counter),
        "ct" if attr(d, 3).is_none() => match (be32(d, 1), be32(d, 2), be32(d, 4)) {
            (Some(dreg), Some(key), None) => Some(Expr::CtLoad { key, dreg }),
            (None, Some(key), Some(sreg)) => Some(Expr::CtSet { key, sreg }),
            _ => None,
        },
        "redir" => {
            let (proto_min, proto_max) = (be32(d, 1), be32(d, 2));
            Some(Expr::Redir {
                proto_min,
                proto_max: proto_max.filter(|max| Some(*max) != proto_min),
                flags: be32(d, 3),
            })
        }
        "tproxy" => be32(d, 1).map(|family| Expr::Tproxy {
            family,
            addr: be32(d, 2),
            port: be32(d, 3),
        }),
        "lookup" if attr(d, 3).is_none() => (|| {
            Some(Expr::Lookup {
                set: string(attr(d, 1)?),
                sreg: be32(d, 2)?,
                flags: be32(d, 5).unwrap_or(0),
            })
        })(),
        _ => None,
    };
    decoded.unwrap_or_else(|| Expr::Other {
        name,
        data: d.to_vec(),
    })
}

/// A rule as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRule {
    /// `NFPROTO_*` of its table.
    pub family: u8,
    /// Its table.
    pub table: String,
    /// Its chain.
    pub chain: String,
    /// Its handle.
    pub handle: u64,
    /// Its expressions, in order.
    pub exprs: Vec<Expr>,
    /// The anonymous sets its lookups use, in the order of those lookups (each
    /// [`Expr::Lookup`] naming [`ANON_SET`]), created with the rule in the same batch.
    /// Empty in a decoded rule: the kernel's rule dump names the sets it created
    /// (`__set0`, …), whose elements [`dump_set_elements`] reads.
    pub sets: Vec<AnonSet>,
    /// The `nft` statements it was compiled from (`meta l4proto tcp counter return`),
    /// for messages; empty in a decoded rule.
    pub source: String,
}

/// The name a rule's new anonymous set is sent with; the kernel replaces `%d` with the
/// lowest free number (`nf_tables_set_alloc_name`).
pub const ANON_SET: &str = "__set%d";

/// `NFT_SET_ANONYMOUS | NFT_SET_CONSTANT`: a set bound to one rule, whose elements
/// cannot change after the transaction that creates it.
pub const ANON_CONST: u32 = 0x1 | 0x2;

/// An anonymous, constant set of keys (`tcp dport != { 53, 15008 }`), as `nft` creates it
/// for a rule: `NFT_MSG_NEWSET` then `NFT_MSG_NEWSETELEM`, both naming it by
/// [`ANON_SET`] and by a set id unique in the batch, which the rule's lookup names too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnonSet {
    /// nft's datatype of the key (`TYPE_INET_SERVICE` = 13 for ports), as `nft` stores
    /// it so that `nft list` prints the elements as ports.
    pub key_type: u32,
    /// The key's length in bytes.
    pub key_len: u32,
    /// The elements, each as the key's bytes.
    pub elements: Vec<Data>,
    /// `NFTA_SET_USERDATA`: what `nft` records for its own listing (the key's byte order
    /// and the expression it came from), opaque to the kernel.
    pub userdata: Vec<u8>,
}

impl WireRule {
    /// The expressions, one per line, as `nft --debug=netlink` prints them (`  [ … ]`),
    /// counters without their counts.
    pub fn lines(&self) -> Vec<String> {
        self.exprs.iter().map(|e| format!("  [ {e} ]")).collect()
    }
}

/// Decodes one `NFT_MSG_NEWRULE` message of a rule dump (`msg`: header included).
///
/// Errors: `InvalidData` when it is shorter than its headers, or lacks its table or
/// chain.
pub fn decode_rule(msg: &[u8]) -> std::io::Result<WireRule> {
    let family = *msg
        .get(16)
        .ok_or_else(|| invalid("short nf_tables message"))?;
    let body = msg
        .get(20..)
        .ok_or_else(|| invalid("short nf_tables message"))?;
    let table = attr(body, NFTA_RULE_TABLE)
        .map(string)
        .ok_or_else(|| invalid("rule without a table"))?;
    let chain = attr(body, NFTA_RULE_CHAIN)
        .map(string)
        .ok_or_else(|| invalid("rule without a chain"))?;
    let exprs = attr(body, NFTA_RULE_EXPRESSIONS)
        .map(|list| {
            attrs(list)
                .filter(|(k, _)| *k == NFTA_LIST_ELEM)
                .map(|(_, e)| decode_expr(e))
                .collect()
        })
        .unwrap_or_default();
    Ok(WireRule {
        family,
        table,
        chain,
        handle: be64(body, NFTA_RULE_HANDLE).unwrap_or(0),
        exprs,
        sets: Vec::new(),
        source: String::new(),
    })
}

/// Every rule of family `family` in the netns `_inside` is in, of table `table` only when
/// one is given, in the kernel's order (table by table, chain by chain, each in rule
/// order): one `NFT_MSG_GETRULE` dump.
///
/// Errors: the socket's error, or the kernel's (`ENOENT` when the table does not exist),
/// or a malformed message.
pub fn dump_rules(
    _inside: &Inside<'_>,
    family: u8,
    table: Option<&str>,
) -> std::io::Result<Vec<WireRule>> {
    let mut attrs_out = Vec::new();
    if let Some(table) = table {
        put_string(&mut attrs_out, NFTA_RULE_TABLE, table);
    }
    dump(NFT_MSG_GETRULE, family, &attrs_out, |msg| {
        decode_rule(msg).map(Some)
    })
}

/// Dumps nf_tables objects with request `msg_type` (`NFT_MSG_GET*`) for family `family`
/// (`NFPROTO_*`, 0 for all) and request attributes `attrs`, in the calling thread's
/// netns, and decodes every answer (header included) with `decode`, keeping the ones it
/// returns.
///
/// Errors: the socket's error, the kernel's, or the first decoding error.
pub(crate) fn dump<T>(
    msg_type: u16,
    family: u8,
    attrs: &[u8],
    decode: impl Fn(&[u8]) -> std::io::Result<Option<T>>,
) -> std::io::Result<Vec<T>> {
    let seq: u32 = 1;
    let mut req = Vec::with_capacity(20 + attrs.len());
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | msg_type;
    push_message(
        &mut req,
        kind,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        0,
        attrs,
    );
    // A dump that a commit interrupted (`NLM_F_DUMP_INTR` on its messages) may mix the
    // rulesets before and after it: it is made again, a few times at most.
    const NLM_F_DUMP_INTR: u16 = 0x10;
    let mut tries = 0;
    loop {
        tries += 1;
        let sock = nfnetlink_socket()?;
        sock.send(&req, 0)?;
        let mut out = Vec::new();
        let mut failed = None;
        let mut interrupted = false;
        receive(&sock, seq, |msg| {
            interrupted |= u16_at(msg, 6).is_some_and(|f| f & NLM_F_DUMP_INTR != 0);
            match decode(msg) {
                Ok(Some(item)) => out.push(item),
                Ok(None) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        })?;
        if interrupted {
            if tries < 4 {
                continue;
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "the ruleset changed during each of 4 dumps (NLM_F_DUMP_INTR)",
            ));
        }
        return match failed {
            Some(e) => Err(e),
            None => Ok(out),
        };
    }
}

/// `NFT_MSG_GETCHAIN`.
const NFT_MSG_GETCHAIN: u16 = 4;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;

/// A base chain's hook: its type, hook and priority, and its policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// `filter`, `nat` or `route`.
    pub kind: String,
    /// `NF_INET_*` hook number.
    pub hooknum: u32,
    /// Its priority.
    pub priority: i32,
    /// `NF_DROP` (0) or `NF_ACCEPT` (1, the default).
    pub policy: u32,
}

/// nft's names of the `NF_INET_*` hooks, by number (`linux/netfilter.h`): a base
/// chain's `hook` word.
pub const HOOK_NAMES: [&str; 6] = [
    "prerouting",
    "input",
    "forward",
    "output",
    "postrouting",
    "ingress",
];

impl fmt::Display for Hook {
    /// nft's spelling of a base chain's specification, as our transactions write it:
    /// `type nat hook output priority -100 ;` (the policy only when it is `drop`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hook = HOOK_NAMES
            .get(self.hooknum as usize)
            .copied()
            .unwrap_or("unknown");
        write!(
            f,
            "type {} hook {hook} priority {} ;",
            self.kind, self.priority
        )?;
        if self.policy == 0 {
            f.write_str(" policy drop ;")?;
        }
        Ok(())
    }
}

/// A chain as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireChain {
    /// Its table.
    pub table: String,
    /// Its name.
    pub name: String,
    /// For a base chain, its hook.
    pub hook: Option<Hook>,
}

/// Decodes one `NFT_MSG_NEWCHAIN` message of a chain dump (`msg`: header included).
///
/// Errors: `InvalidData` when it is shorter than its headers, or lacks its table or name.
pub fn decode_chain(msg: &[u8]) -> std::io::Result<WireChain> {
    let body = msg
        .get(20..)
        .ok_or_else(|| invalid("short nf_tables message"))?;
    let table = attr(body, NFTA_CHAIN_TABLE)
        .map(string)
        .ok_or_else(|| invalid("chain without a table"))?;
    let name = attr(body, NFTA_CHAIN_NAME)
        .map(string)
        .ok_or_else(|| invalid("chain without a name"))?;
    let hook = attr(body, NFTA_CHAIN_HOOK).and_then(|h| {
        Some(Hook {
            kind: attr(body, NFTA_CHAIN_TYPE).map(string)?,
            hooknum: be32(h, NFTA_HOOK_HOOKNUM)?,
            priority: be32(h, NFTA_HOOK_PRIORITY)? as i32,
            policy: be32(body, NFTA_CHAIN_POLICY).unwrap_or(1),
        })
    });
    Ok(WireChain { table, name, hook })
}

/// Every chain of family `family`, of table `table` only when one is given, in the
/// kernel's order: one `NFT_MSG_GETCHAIN` dump. (The kernel dumps every table's chains;
/// the filter is applied here.)
///
/// Errors: as [`dump_rules`].
pub fn dump_chains(
    _inside: &Inside<'_>,
    family: u8,
    table: Option<&str>,
) -> std::io::Result<Vec<WireChain>> {
    dump(NFT_MSG_GETCHAIN, family, &[], |msg| {
        decode_chain(msg).map(|c| table.is_none_or(|t| c.table == t).then_some(c))
    })
}

/// `NLM_F_CREATE`.
const NLM_F_CREATE: u16 = 0x400;
/// `NLM_F_APPEND`: a new rule goes at the end of its chain.
const NLM_F_APPEND: u16 = 0x800;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFTA_TABLE_NAME: u16 = 1;

fn put_be32(out: &mut Vec<u8>, kind: u16, v: u32) {
    push_attr(out, kind, &v.to_be_bytes());
}

fn put_nested(out: &mut Vec<u8>, kind: u16, inner: &[u8]) {
    push_attr(out, kind | NLA_F_NESTED, inner);
}

fn put_string(out: &mut Vec<u8>, kind: u16, s: &str) {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    push_attr(out, kind, &v);
}

fn put_value(out: &mut Vec<u8>, kind: u16, data: &Data) {
    let mut inner = Vec::new();
    push_attr(&mut inner, NFTA_DATA_VALUE, &data.0);
    put_nested(out, kind, &inner);
}

impl Verdict {
    fn code(&self) -> i32 {
        match self {
            Verdict::Drop => 0,
            Verdict::Accept => 1,
            Verdict::Continue => -1,
            Verdict::Break => -2,
            Verdict::Jump(_) => -3,
            Verdict::Goto(_) => -4,
            Verdict::Return => -5,
            Verdict::Other(code) => *code,
        }
    }
}

impl Expr {
    /// The expression as one `NFTA_LIST_ELEM` of `NFTA_RULE_EXPRESSIONS`: its name and
    /// its data attributes, as `nf_tables.h` numbers them (what [`decode_rule`] reads).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(None)
    }

    /// [`Expr::encode`], a lookup naming the set of the batch with id `set_id`
    /// (`NFTA_LOOKUP_SET_ID`) when one is given.
    fn encode_with(&self, set_id: Option<u32>) -> Vec<u8> {
        let mut d = Vec::new();
        let name = match self {
            Expr::MetaLoad { key, dreg } => {
                put_be32(&mut d, 1, *dreg);
                put_be32(&mut d, 2, *key);
                "meta"
            }
            Expr::MetaSet { key, sreg } => {
                put_be32(&mut d, 2, *key);
                put_be32(&mut d, 3, *sreg);
                "meta"
            }
            Expr::Cmp { op, sreg, data } => {
                put_be32(&mut d, 1, *sreg);
                put_be32(&mut d, 2, *op);
                put_value(&mut d, 3, data);
                "cmp"
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                put_be32(&mut d, 1, *dreg);
                put_be32(&mut d, 2, *base);
                put_be32(&mut d, 3, *offset);
                put_be32(&mut d, 4, *len);
                "payload"
            }
            Expr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
            } => {
                put_be32(&mut d, 1, *sreg);
                put_be32(&mut d, 2, *dreg);
                put_be32(&mut d, 3, mask.0.len() as u32);
                put_value(&mut d, 4, mask);
                put_value(&mut d, 5, xor);
                "bitwise"
            }
            Expr::Immediate { dreg, data } => {
                put_be32(&mut d, 1, *dreg);
                match data {
                    Imm::Value(v) => put_value(&mut d, 2, v),
                    Imm::Verdict(v) => {
                        let mut verdict = Vec::new();
                        put_be32(&mut verdict, NFTA_VERDICT_CODE, v.code() as u32);
                        if let Verdict::Jump(chain) | Verdict::Goto(chain) = v {
                            put_string(&mut verdict, NFTA_VERDICT_CHAIN, chain);
                        }
                        let mut data = Vec::new();
                        put_nested(&mut data, NFTA_DATA_VERDICT, &verdict);
                        put_nested(&mut d, 2, &data);
                    }
                }
                "immediate"
            }
            Expr::Counter => {
                push_attr(&mut d, 1, &0u64.to_be_bytes());
                push_attr(&mut d, 2, &0u64.to_be_bytes());
                "counter"
            }
            Expr::CtLoad { key, dreg } => {
                put_be32(&mut d, 1, *dreg);
                put_be32(&mut d, 2, *key);
                "ct"
            }
            Expr::CtSet { key, sreg } => {
                put_be32(&mut d, 2, *key);
                put_be32(&mut d, 4, *sreg);
                "ct"
            }
            Expr::Redir {
                proto_min,
                proto_max,
                flags,
            } => {
                for (kind, v) in [(1, proto_min), (2, proto_max), (3, flags)] {
                    if let Some(v) = v {
                        put_be32(&mut d, kind, *v);
                    }
                }
                "redir"
            }
            Expr::Tproxy { family, addr, port } => {
                put_be32(&mut d, 1, *family);
                for (kind, v) in [(2, addr), (3, port)] {
                    if let Some(v) = v {
                        put_be32(&mut d, kind, *v);
                    }
                }
                "tproxy"
            }
            Expr::Lookup { sreg, set, flags } => {
                put_string(&mut d, 1, set);
                put_be32(&mut d, 2, *sreg);
                if let Some(id) = set_id {
                    put_be32(&mut d, 4, id);
                }
                put_be32(&mut d, 5, *flags);
                "lookup"
            }
            Expr::Other { name, data } => {
                d.extend_from_slice(data);
                name.as_str()
            }
        };
        let mut elem = Vec::new();
        put_string(&mut elem, NFTA_EXPR_NAME, name);
        put_nested(&mut elem, NFTA_EXPR_DATA, &d);
        let mut out = Vec::new();
        put_nested(&mut out, NFTA_LIST_ELEM, &elem);
        out
    }
}

/// One table to write: its family and name, its chains, and its rules (each in the order
/// it is to be appended to its chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireTable {
    /// `NFPROTO_*`.
    pub family: u8,
    /// Its name.
    pub name: String,
    /// Its chains, in order.
    pub chains: Vec<WireChain>,
    /// Its rules, in order.
    pub rules: Vec<WireRule>,
}

/// One nf_tables transaction: tables to delete, then tables whose rules are replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transaction {
    /// Tables to delete, as (`NFPROTO_*`, name); each must exist.
    pub delete: Vec<(u8, String)>,
    /// Tables to write: each is created if missing, its rules flushed (its chains and
    /// sets kept, as `nft flush table` does), its chains created if missing, and its
    /// rules appended.
    pub tables: Vec<WireTable>,
}

const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;

/// The nfnetlink batch of `tx`, the last message asking for an acknowledgement (the
/// kernel answers a failing one in any case), sequence numbers from 1 (the batch's
/// begin) up: `NFT_MSG_DELTABLE` for each table to delete;
/// per table `NFT_MSG_NEWTABLE`, `NFT_MSG_DELRULE` naming only the table (the flush),
/// `NFT_MSG_NEWCHAIN` per chain, and per rule its anonymous sets (`NFT_MSG_NEWSET`,
/// `NFT_MSG_NEWSETELEM`) then `NFT_MSG_NEWRULE` appended. Returns the bytes and the
/// sequence number of the last message before the batch's end.
///
/// This is the message sequence `nft -f` sends for the same transaction, with one
/// difference: a rule `nft` inserts (`insert rule … index N`) is appended here in its
/// final place, so the chain ends up the same without naming another rule's handle.
pub fn batch(tx: &Transaction) -> (Vec<u8>, u32) {
    let mut out = Vec::new();
    let mut seq = 1;
    push_message(
        &mut out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    // Only the last message asks for an acknowledgement (set below): the kernel reports
    // every failing message anyway, and acks for hundreds of messages could overflow
    // the socket's receive buffer after a commit that succeeded.
    let ack = NLM_F_REQUEST;
    let create = ack | NLM_F_CREATE;
    let mut last_at = None;
    // The next nf_tables message of the batch.
    let mut next = |out: &mut Vec<u8>, kind: u16, flags: u16, family: u8, attrs: &[u8]| {
        seq += 1;
        last_at = Some(out.len());
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | kind;
        push_message(out, kind, flags, seq, family, 0, attrs);
    };
    for (family, name) in &tx.delete {
        let mut a = Vec::new();
        put_string(&mut a, NFTA_TABLE_NAME, name);
        next(&mut out, NFT_MSG_DELTABLE, ack, *family, &a);
    }
    let mut set_id = 0;
    for t in &tx.tables {
        let mut a = Vec::new();
        put_string(&mut a, NFTA_TABLE_NAME, &t.name);
        next(&mut out, NFT_MSG_NEWTABLE, create, t.family, &a);
        let mut a = Vec::new();
        put_string(&mut a, NFTA_RULE_TABLE, &t.name);
        next(&mut out, NFT_MSG_DELRULE, ack, t.family, &a);
        for c in &t.chains {
            let mut a = Vec::new();
            put_string(&mut a, NFTA_CHAIN_TABLE, &t.name);
            put_string(&mut a, NFTA_CHAIN_NAME, &c.name);
            if let Some(h) = &c.hook {
                let mut hook = Vec::new();
                put_be32(&mut hook, NFTA_HOOK_HOOKNUM, h.hooknum);
                put_be32(&mut hook, NFTA_HOOK_PRIORITY, h.priority as u32);
                put_nested(&mut a, NFTA_CHAIN_HOOK, &hook);
                put_be32(&mut a, NFTA_CHAIN_POLICY, h.policy);
                put_string(&mut a, NFTA_CHAIN_TYPE, &h.kind);
            }
            next(&mut out, NFT_MSG_NEWCHAIN, create, t.family, &a);
        }
        for r in &t.rules {
            let mut ids = Vec::with_capacity(r.sets.len());
            for set in &r.sets {
                set_id += 1;
                ids.push(set_id);
                let mut a = Vec::new();
                put_string(&mut a, NFTA_SET_TABLE, &t.name);
                put_string(&mut a, NFTA_SET_NAME, ANON_SET);
                put_be32(&mut a, NFTA_SET_FLAGS, ANON_CONST);
                put_be32(&mut a, NFTA_SET_KEY_TYPE, set.key_type);
                put_be32(&mut a, NFTA_SET_KEY_LEN, set.key_len);
                put_be32(&mut a, NFTA_SET_ID, set_id);
                let mut desc = Vec::new();
                put_be32(&mut desc, NFTA_SET_DESC_SIZE, set.elements.len() as u32);
                put_nested(&mut a, NFTA_SET_DESC, &desc);
                if !set.userdata.is_empty() {
                    push_attr(&mut a, NFTA_SET_USERDATA, &set.userdata);
                }
                next(&mut out, NFT_MSG_NEWSET, create, t.family, &a);
                let mut a = Vec::new();
                put_string(&mut a, NFTA_SET_ELEM_LIST_TABLE, &t.name);
                put_string(&mut a, NFTA_SET_ELEM_LIST_SET, ANON_SET);
                put_be32(&mut a, NFTA_SET_ELEM_LIST_SET_ID, set_id);
                let mut list = Vec::new();
                for key in &set.elements {
                    let mut elem = Vec::new();
                    put_value(&mut elem, NFTA_SET_ELEM_KEY, key);
                    put_nested(&mut list, NFTA_LIST_ELEM, &elem);
                }
                put_nested(&mut a, NFTA_SET_ELEM_LIST_ELEMENTS, &list);
                next(&mut out, NFT_MSG_NEWSETELEM, create, t.family, &a);
            }
            let mut a = Vec::new();
            put_string(&mut a, NFTA_RULE_TABLE, &t.name);
            put_string(&mut a, NFTA_RULE_CHAIN, &r.chain);
            let mut ids = ids.into_iter();
            let exprs: Vec<u8> = r
                .exprs
                .iter()
                .flat_map(|e| match e {
                    Expr::Lookup { set, .. } if set == ANON_SET => e.encode_with(ids.next()),
                    _ => e.encode(),
                })
                .collect();
            put_nested(&mut a, NFTA_RULE_EXPRESSIONS, &exprs);
            next(
                &mut out,
                NFT_MSG_NEWRULE,
                create | NLM_F_APPEND,
                t.family,
                &a,
            );
        }
    }
    if let Some(at) = last_at {
        // `nlmsg_flags`, after the length and the type.
        let flags = u16::from_ne_bytes([out[at + 6], out[at + 7]]) | NLM_F_ACK;
        out[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
    }
    let last = seq;
    push_message(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq + 1,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    (out, last)
}

/// Commits `tx` ([`batch`]) as one nf_tables transaction in the netns `_inside` is in:
/// all of it, or (the kernel refusing any message) none of it.
///
/// Errors: the socket's error, or the kernel's answer to the first message it refused, as
/// an errno (`ENOENT` for a table to delete that is not there).
pub fn write(_inside: &Inside<'_>, tx: &Transaction) -> std::io::Result<()> {
    if tx.delete.is_empty() && tx.tables.is_empty() {
        return Ok(());
    }
    let (bytes, last) = batch(tx);
    let sock = nfnetlink_socket()?;
    // The batch goes in one datagram: a long one (many annotated ports or ranges) needs
    // a send buffer to match. `SO_SNDBUFFORCE` (CAP_NET_ADMIN, which writing rules needs
    // anyway) passes `wmem_max`; the kernel doubles the value for its bookkeeping.
    if bytes.len() > 64 * 1024 {
        let fd = std::os::fd::AsFd::as_fd(&sock);
        let want = bytes.len() + 4096;
        if nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBufForce, &want).is_err()
        {
            nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBuf, &want)?;
        }
    }
    sock.send(&bytes, 0)?;
    receive_batch(&sock, 1..=last + 1, last, |_| {})
}

/// The elements of set `set` of table `table` (family `family`), each as its key's bytes,
/// in the kernel's order: one `NFT_MSG_GETSETELEM` dump.
///
/// Errors: as [`dump_rules`] (`ENOENT` when the set does not exist).
pub fn dump_set_elements(
    _inside: &Inside<'_>,
    family: u8,
    table: &str,
    set: &str,
) -> std::io::Result<Vec<Data>> {
    let mut a = Vec::new();
    put_string(&mut a, NFTA_SET_ELEM_LIST_TABLE, table);
    put_string(&mut a, NFTA_SET_ELEM_LIST_SET, set);
    let lists = dump(NFT_MSG_GETSETELEM, family, &a, |msg| {
        Ok(Some(decode_set_elements(msg)))
    })?;
    Ok(lists.into_iter().flatten().collect())
}

/// The keys of one `NFT_MSG_NEWSETELEM` message of a set element dump (`msg`: header
/// included); an element without a key is left out.
pub fn decode_set_elements(msg: &[u8]) -> Vec<Data> {
    let Some(list) = msg
        .get(20..)
        .and_then(|body| attr(body, NFTA_SET_ELEM_LIST_ELEMENTS))
    else {
        return Vec::new();
    };
    attrs(list)
        .filter(|(k, _)| *k == NFTA_LIST_ELEM)
        .filter_map(|(_, e)| {
            let key = attr(e, NFTA_SET_ELEM_KEY)?;
            match data_of(key)? {
                Imm::Value(v) => Some(v),
                Imm::Verdict(_) => None,
            }
        })
        .collect()
}

/// `NFT_MSG_GETGEN`.
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;

/// The ruleset generation of the calling thread's netns (`NFT_MSG_GETGEN`, read-only): it
/// changes with every commit. STATUS asks it to learn whether the kernel speaks
/// nf_tables at all.
///
/// Errors: the socket's, or the kernel's (`EPROTONOSUPPORT`/`ENOENT` without nf_tables).
pub fn generation() -> std::io::Result<u32> {
    let seq: u32 = 1;
    let mut req = Vec::with_capacity(20);
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN;
    push_message(&mut req, kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0, 0, &[]);
    let sock = nfnetlink_socket()?;
    sock.send(&req, 0)?;
    let mut gen = None;
    receive(&sock, seq, |msg| {
        if let Some(body) = msg.get(20..) {
            gen = gen.or(be32(body, NFTA_GEN_ID));
        }
    })?;
    gen.ok_or_else(|| invalid("no generation in the kernel's answer"))
}

/// `NFNLGRP_NFTABLES`: the multicast group on which the kernel announces every nf_tables
/// commit of a netns (`linux/netfilter/nfnetlink.h`), whoever made it (`nft`,
/// `iptables-nft`, us).
pub const NFNLGRP_NFTABLES: u32 = 7;
/// `NFT_MSG_NEWGEN`: sent once at the end of every commit, after the notifications of the
/// objects it changed.
const NFT_MSG_NEWGEN: u16 = 15;
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;

/// A non-blocking netfilter netlink socket in the netns `_inside` is in, subscribed to
/// [`NFNLGRP_NFTABLES`]. It keeps that netns alive for as long as it is open: whoever
/// holds it must close it when the pod goes.
///
/// Errors: the socket calls' (a kernel without nf_tables refuses the membership).
pub fn subscribe(_inside: &Inside<'_>) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
    let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.add_membership(NFNLGRP_NFTABLES)?;
    sock.set_non_blocking(true)?;
    // SAFETY: `into_raw_fd` hands over the socket's only descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(sock.into_raw_fd()) })
}

/// The end of one nf_tables commit, as its `NFT_MSG_NEWGEN` notification names the
/// writer: the ID of the thread that committed it (`task_pid_nr`) and that thread's name
/// (`comm`, at most 15 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// `NFTA_GEN_PROC_PID`.
    pub pid: u32,
    /// `NFTA_GEN_PROC_NAME`.
    pub name: String,
}

/// One notification of a [`subscribe`]d socket, as far as drift goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A change to an object (table, chain, rule, set, element, …) of the table `table`
    /// of family `family` (`NFPROTO_*`): every nf_tables object message names its table
    /// in attribute 1.
    Touched {
        /// `NFPROTO_*`.
        family: u8,
        /// The table's name.
        table: String,
    },
    /// The end of a commit, after the changes it made.
    Commit(Commit),
}

/// The notifications in `buf`, one or more netlink messages as a [`subscribe`]d socket
/// receives them. Never panics: a truncated or hostile buffer yields the notifications
/// before the damage.
pub fn notices(buf: &[u8]) -> Vec<Notice> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = crate::nfnetlink::u32_at(buf, off).unwrap_or(0) as usize;
        if len < 16 || off + len > buf.len() {
            break;
        }
        let msg = &buf[off..off + len];
        off += (len + 3) & !3;
        let kind = u16_at(msg, 4).unwrap_or(0);
        if kind >> 8 != NFNL_SUBSYS_NFTABLES {
            continue;
        }
        let body = msg.get(20..).unwrap_or_default();
        if kind & 0xff == NFT_MSG_NEWGEN {
            out.push(Notice::Commit(Commit {
                pid: be32(body, NFTA_GEN_PROC_PID).unwrap_or(0),
                name: attr(body, NFTA_GEN_PROC_NAME)
                    .map(string)
                    .unwrap_or_default(),
            }));
        } else if let Some(table) = attr(body, 1) {
            out.push(Notice::Touched {
                family: msg.get(16).copied().unwrap_or(0),
                table: string(table),
            });
        }
    }
    out
}

/// The commits announced in `buf` ([`notices`] that end a commit).
pub fn commits(buf: &[u8]) -> Vec<Commit> {
    notices(buf)
        .into_iter()
        .filter_map(|n| match n {
            Notice::Commit(c) => Some(c),
            Notice::Touched { .. } => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(kind: u16, inner: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        push_attr(&mut out, kind | crate::nfnetlink::NLA_F_NESTED, inner);
        out
    }

    fn be(kind: u16, v: u32) -> Vec<u8> {
        let mut out = Vec::new();
        push_attr(&mut out, kind, &v.to_be_bytes());
        out
    }

    fn expr(name: &str, data: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        push_attr(&mut e, NFTA_EXPR_NAME, &n);
        e.extend(nested(NFTA_EXPR_DATA, data));
        nested(NFTA_LIST_ELEM, &e)
    }

    #[test]
    fn expressions_print_as_libnftnl_does() {
        let mut cmp = be(1, 1);
        cmp.extend(be(2, 0));
        let mut value = Vec::new();
        push_attr(&mut value, NFTA_DATA_VALUE, &[0x3a, 0xa0]);
        cmp.extend(nested(3, &value));
        let mut verdict = be(NFTA_VERDICT_CODE, (-3i32) as u32);
        push_attr(&mut verdict, NFTA_VERDICT_CHAIN, b"istio-output\0");
        let mut data = nested(NFTA_DATA_VERDICT, &verdict);
        let mut imm = be(1, 0);
        imm.extend(nested(2, &std::mem::take(&mut data)));
        let mut list = expr("cmp", &cmp);
        list.extend(expr("immediate", &imm));
        list.extend(expr("quota", &be(1, 5)));
        let mut body = Vec::new();
        push_attr(&mut body, NFTA_RULE_TABLE, b"istio-proxy-nat\0");
        push_attr(&mut body, NFTA_RULE_CHAIN, b"output\0");
        body.extend(nested(NFTA_RULE_EXPRESSIONS, &list));
        let mut msg = Vec::new();
        push_message(&mut msg, 0, 0, 1, NFPROTO_INET, 0, &body);
        let rule = decode_rule(&msg).unwrap();
        assert_eq!(
            (rule.table.as_str(), rule.chain.as_str()),
            ("istio-proxy-nat", "output")
        );
        assert_eq!(
            rule.lines(),
            [
                "  [ cmp eq reg 1 0x0000a03a ]",
                "  [ immediate reg 0 jump -> istio-output ]",
                "  [ quota (undecoded, 8 bytes) ]",
            ]
        );
    }

    #[test]
    fn every_expression_decodes_as_it_was_encoded() {
        let value = |b: &[u8]| Data(b.to_vec());
        let exprs = [
            Expr::MetaLoad { key: 16, dreg: 1 },
            Expr::MetaSet { key: 3, sreg: 1 },
            Expr::Cmp {
                op: 1,
                sreg: 1,
                data: value(b"lo\0\0\0\0\0\0\0\0\0\0\0\0\0\0"),
            },
            Expr::Payload {
                base: 2,
                offset: 2,
                len: 2,
                dreg: 1,
            },
            Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                mask: value(&[0xff, 0x0f, 0, 0]),
                xor: value(&[0, 0, 0, 0]),
            },
            Expr::Immediate {
                dreg: 1,
                data: Imm::Value(value(&[0x3a, 0x99])),
            },
            Expr::Immediate {
                dreg: 0,
                data: Imm::Verdict(Verdict::Jump("istio-output".into())),
            },
            Expr::Immediate {
                dreg: 0,
                data: Imm::Verdict(Verdict::Return),
            },
            Expr::Counter,
            Expr::CtLoad { key: 3, dreg: 1 },
            Expr::CtSet { key: 17, sreg: 1 },
            Expr::Redir {
                proto_min: Some(1),
                proto_max: None,
                flags: Some(2),
            },
            Expr::Tproxy {
                family: 10,
                addr: None,
                port: Some(1),
            },
            Expr::Lookup {
                sreg: 1,
                set: "__set0".into(),
                flags: 1,
            },
        ];
        for e in exprs {
            let elem = e.encode();
            let (_, inner) = attrs(&elem).next().unwrap();
            assert_eq!(decode_expr(inner), e);
        }
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let mut seed: u32 = 0x9e37_79b9;
        for n in 0..2000 {
            let len = (n % 97) + 1;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    (seed & 0xff) as u8
                })
                .collect();
            let _ = decode_rule(&bytes).map(|r| r.lines());
            let _ = decode_chain(&bytes).map(|c| c.hook.map(|h| h.to_string()));
            let _ = decode_expr(&bytes).to_string();
            let _ = decode_set_elements(&bytes);
            let _ = commits(&bytes);
        }
    }
}
