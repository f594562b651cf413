//! The nftables backend's side effects (`native_nftables`), all over nfnetlink from a
//! thread inside the pod's netns, with no `nft` process: our transaction
//! ([`NftRuleset::transaction`], compiled by [`crate::rules::nft_compile`]) is committed as
//! one nf_tables batch ([`crate::nft_wire::write`]), so it applies atomically or not at
//! all; the read-back dumps our tables' chains and rules and compares every expression
//! with what was compiled; DEL deletes our tables in one batch. `nft` stays the
//! operator's tool (`render` prints the `nft -f` text, `nft list ruleset` shows the
//! result) and the tests' oracle.
//!
//! The kernel serialises transactions per netns (the nfnetlink commit mutex is per netns),
//! so ADDs of different pods never wait on each other. Two operations on the same netns
//! (a retried ADD, a repair) are serialised by the plugin's per-netns lock
//! ([`crate::lock`]), which also covers the read-back, the probe and the rollback.

use crate::apply::ApplyError;
use crate::netns::Inside;
use crate::nfnetlink::{
    nfnetlink_socket, push_attr, push_message, receive_batch, NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES, NLM_F_ACK, NLM_F_REQUEST,
};
use crate::nft_wire::{self, Expr, Transaction, WireRule, WireTable};
use crate::rules::nftables::NftRuleset;
use crate::validate::ValidateError;

/// Our tables of `ruleset`, compiled for netlink.
///
/// Errors: [`ApplyError::Netlink`] when a rule does not compile (a builder wrote what
/// the compiler does not know: a bug, reported rather than guessed).
fn compiled(ruleset: &NftRuleset) -> Result<Vec<WireTable>, ApplyError> {
    crate::rules::nft_compile::compile(&ruleset.transaction())
        .map_err(|e| ApplyError::Netlink(e.to_string()))
}

/// Writes `ruleset` in one transaction: our tables that it does not use are deleted (so
/// nothing of an earlier ADD with other settings stays), then each of its tables is
/// created if missing, flushed, and filled; a dormant one is deleted and made anew in
/// the same transaction. Returns the tables written (`ruleset` compiled), for the read-back.
///
/// Errors: [`ApplyError::Netlink`] with the kernel's answer; the netns is then unchanged.
pub fn apply(inside: &Inside<'_>, ruleset: &NftRuleset) -> Result<Vec<WireTable>, ApplyError> {
    let tables_out = compiled(ruleset)?;
    let existing =
        tables(inside).map_err(|e| ApplyError::Netlink(format!("listing tables: {e}")))?;
    let used = ruleset.table_names();
    // Deleting a table is the costly part of a transaction (the kernel waits for an RCU
    // grace period): only tables that exist are deleted.
    let mut delete: Vec<(u8, String)> = existing
        .iter()
        .filter(|t| t.is_ours() && !used.contains(&t.name.as_str()))
        .map(|t| (t.family, t.name.clone()))
        .collect();
    // A flush keeps a table's chains: one of ours that holds a chain we do not declare
    // (or declare with another hook) is deleted and made anew in the same transaction.
    let reused: Vec<&WireTable> = tables_out
        .iter()
        .filter(|w| {
            existing
                .iter()
                .any(|t| t.family == w.family && t.name == w.name)
        })
        .collect();
    if !reused.is_empty() {
        let chains = nft_wire::dump_chains(inside, NFPROTO_INET, None)
            .map_err(|e| ApplyError::Netlink(format!("listing chains: {e}")))?;
        for w in reused {
            let foreign = chains.iter().filter(|c| c.table == w.name).any(|c| {
                !w.chains
                    .iter()
                    .any(|d| d.name == c.name && d.hook == c.hook)
            });
            // Creating a table leaves an existing dormant one dormant, and the kernel
            // refuses a new base chain in a table whose flags the same transaction
            // changes (since the fix for CVE-2024-35900): a dormant one is made anew too.
            let dormant = existing
                .iter()
                .any(|t| t.family == w.family && t.name == w.name && t.is_dormant());
            if foreign || dormant {
                if dormant {
                    log::info!("table inet {} is dormant; making it anew", w.name);
                }
                delete.push((w.family, w.name.clone()));
            }
        }
    }
    let tx = Transaction {
        delete,
        tables: tables_out,
    };
    nft_wire::write(inside, &tx)
        .map_err(|e| ApplyError::Netlink(format!("writing tables {}: {e}", used.join(", "))))?;
    Ok(tx.tables)
}

/// Deletes our tables (sidecar's and ambient's) that exist, in one transaction; none
/// there is fine, and then nothing is written. A table that goes between the listing and
/// the delete (another DEL of the same netns: DEL takes no lock) fails the transaction
/// with `ENOENT`, after which the tables are listed again, up to three times.
///
/// Errors: [`ApplyError::Netlink`] with the kernel's answer.
pub fn remove(inside: &Inside<'_>) -> Result<(), ApplyError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let existing =
            tables(inside).map_err(|e| ApplyError::Netlink(format!("listing tables: {e}")))?;
        let delete: Vec<(u8, String)> = existing
            .iter()
            .filter(|t| t.is_ours())
            .map(|t| (t.family, t.name.clone()))
            .collect();
        if delete.is_empty() {
            return Ok(());
        }
        let tx = Transaction {
            delete,
            tables: Vec::new(),
        };
        match nft_wire::write(inside, &tx) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && tries < 3 => continue,
            r => return r.map_err(|e| ApplyError::Netlink(format!("deleting our tables: {e}"))),
        }
    }
}

pub use crate::nfnetlink::{NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6};
/// `NFT_TABLE_F_DORMANT` (`linux/netfilter/nf_tables.h`): the table is registered but none
/// of its base chains is hooked, so none of its rules sees a packet.
pub const NFT_TABLE_F_DORMANT: u32 = 0x1;

/// One nftables table of a netns, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfTable {
    /// `NFPROTO_*` family ([`NFPROTO_INET`], [`NFPROTO_IPV4`], [`NFPROTO_IPV6`], …).
    pub family: u8,
    /// The table's name.
    pub name: String,
    /// `NFTA_TABLE_FLAGS` ([`NFT_TABLE_F_DORMANT`], owner, persist).
    pub flags: u32,
}

impl NfTable {
    /// Whether this is one of the nftables backend's tables (`inet istio-proxy-*`).
    pub fn is_ours(&self) -> bool {
        self.family == NFPROTO_INET && crate::rules::nftables::is_our_table(&self.name)
    }

    /// Whether it is an iptables-nft table (`ip`/`ip6` family).
    pub fn is_iptables(&self) -> bool {
        matches!(self.family, NFPROTO_IPV4 | NFPROTO_IPV6)
    }

    /// Whether the table is dormant: its rules take no effect.
    pub fn is_dormant(&self) -> bool {
        self.flags & NFT_TABLE_F_DORMANT != 0
    }

    /// `inet istio-proxy-nat`, `ip nat`: as nft names it.
    pub fn describe(&self) -> String {
        let family = match self.family {
            NFPROTO_INET => "inet",
            NFPROTO_IPV4 => "ip",
            NFPROTO_IPV6 => "ip6",
            _ => "family",
        };
        format!("{family} {}", self.name)
    }
}

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;

/// Every nftables table of the netns, with its flags: one `NFT_MSG_GETTABLE` dump
/// (`linux/netfilter/nf_tables.h`), microseconds and no process.
///
/// Errors: the socket's I/O error (a kernel without nf_tables answers EPROTONOSUPPORT or
/// similar; callers treat any error as "cannot tell").
pub fn tables(_inside: &Inside<'_>) -> std::io::Result<Vec<NfTable>> {
    nft_wire::dump(NFT_MSG_GETTABLE, 0, &[], |msg| {
        let body = msg.get(20..).unwrap_or_default();
        Ok(Some(NfTable {
            family: msg.get(16).copied().unwrap_or(0),
            name: nft_wire::attr(body, NFTA_TABLE_NAME)
                .map(nft_wire::string)
                .unwrap_or_default(),
            flags: nft_wire::be32(body, NFTA_TABLE_FLAGS).unwrap_or(0),
        }))
    })
}

/// Makes `table` take effect again: one nf_tables transaction (a batch holding one
/// `NFT_MSG_NEWTABLE` for the existing table with its flags minus `dormant`), which
/// re-hooks its base chains; its rules, and other software's rules in it,
/// stay as they are. (`nft add table` cannot clear a flag: it leaves the flags out.)
///
/// Errors: the kernel's answer as an errno (EPERM for a table another process owns).
pub fn wake(_inside: &Inside<'_>, table: &NfTable) -> std::io::Result<()> {
    let sock = nfnetlink_socket()?;
    let mut attrs = Vec::new();
    let mut name = table.name.as_bytes().to_vec();
    name.push(0);
    push_attr(&mut attrs, NFTA_TABLE_NAME, &name);
    // Only `dormant` is cleared: the kernel refuses a change of the other flags (owner,
    // persist) with EOPNOTSUPP.
    let flags = table.flags & !NFT_TABLE_F_DORMANT;
    push_attr(&mut attrs, NFTA_TABLE_FLAGS, &flags.to_be_bytes());
    let mut batch = Vec::new();
    push_message(
        &mut batch,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        1,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE;
    push_message(
        &mut batch,
        kind,
        NLM_F_REQUEST | NLM_F_ACK,
        2,
        table.family,
        0,
        &attrs,
    );
    push_message(
        &mut batch,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        3,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    sock.send(&batch, 0)?;
    receive_batch(&sock, 1..=3, 2, |_| {})
}

/// Problems for every table in `tables` that `wanted` selects and that is dormant, for
/// the read-back: a dormant table's rules read back as written yet take no effect.
pub fn dormant_problems(tables: &[NfTable], wanted: impl Fn(&NfTable) -> bool) -> Vec<String> {
    tables
        .iter()
        .filter(|t| wanted(t) && t.is_dormant())
        .map(|t| {
            format!(
                "table {} is dormant (flags dormant): none of its rules takes effect",
                t.describe()
            )
        })
        .collect()
}

/// Wakes every table `wanted` selects that is dormant ([`wake`]); a write path calls it
/// so that what it writes takes effect. Cannot-tell (no nf_tables) is not an error.
///
/// Errors: [`ApplyError::Netlink`] naming the table that could not be woken.
pub fn wake_dormant(
    inside: &Inside<'_>,
    wanted: impl Fn(&NfTable) -> bool,
) -> Result<(), ApplyError> {
    let Ok(all) = tables(inside) else {
        return Ok(());
    };
    for t in all.iter().filter(|t| wanted(t) && t.is_dormant()) {
        log::info!(
            "table {} is dormant; making it take effect again",
            t.describe()
        );
        wake(inside, t).map_err(|e| {
            ApplyError::Netlink(format!("waking dormant table {}: {e}", t.describe()))
        })?;
    }
    Ok(())
}

/// A rule the kernel holds, as its expressions in libnftnl's words (`[ meta load
/// l4proto => reg 1 ] [ cmp eq reg 1 0x00000006 ] …`), which `nft --debug=netlink` prints
/// too.
fn held(r: &WireRule) -> String {
    let words: Vec<String> = r.exprs.iter().map(|e| format!("[ {e} ]")).collect();
    words.join(" ")
}

/// What differs between the rules `want` of one chain and the rules `got` there, in
/// words: the first rule that differs, by position, with the statements we wrote, and how
/// many rules each side has when that differs. `same` compares two rules.
fn chain_problems(
    chain: &str,
    want: &[&WireRule],
    got: &[&WireRule],
    same: impl Fn(&WireRule, &WireRule) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(i) = (0..want.len().max(got.len()))
        .find(|&i| !matches!((want.get(i), got.get(i)), (Some(w), Some(g)) if same(w, g)))
    {
        match (want.get(i), got.get(i)) {
            (Some(w), Some(g)) => out.push(format!(
                "chain {chain}: rule {} should be `{}`; the kernel holds {}",
                i + 1,
                w.source,
                held(g)
            )),
            (Some(w), None) => out.push(format!(
                "chain {chain}: rule {} `{}` is missing",
                i + 1,
                w.source
            )),
            (None, Some(g)) => out.push(format!(
                "chain {chain}: rule {} is not ours: {}",
                i + 1,
                held(g)
            )),
            (None, None) => {}
        }
        if want.len() != got.len() {
            out.push(format!(
                "chain {chain}: {} rules expected, {} found",
                want.len(),
                got.len()
            ));
        }
    }
    out
}

/// Compares what the netns holds with `ruleset`: each of its tables, chains (with their
/// hooks) and rules exactly as compiled, expression by expression, an anonymous set by
/// its elements; none of our other tables left over; none of our tables dormant; and the
/// routing the rules need. `existing` is the kernel's table list, `want` `ruleset`
/// compiled.
fn check(
    inside: &Inside<'_>,
    existing: &[NfTable],
    ruleset: &NftRuleset,
    want: &[WireTable],
) -> Result<(), ValidateError> {
    let read_err = |what: &str, e: std::io::Error| {
        ValidateError::ReadBack(ApplyError::Netlink(format!("{what}: {e}")))
    };
    let used = ruleset.table_names();
    let mut problems = Vec::new();
    for t in existing
        .iter()
        .filter(|t| t.is_ours() && !used.contains(&t.name.as_str()))
    {
        problems.push(format!("table {} is left over", t.describe()));
    }
    let present: Vec<&WireTable> = want
        .iter()
        .filter(|w| {
            let there = existing
                .iter()
                .any(|t| t.family == w.family && t.name == w.name);
            if !there {
                problems.push(format!("table inet {} is missing", w.name));
            }
            there
        })
        .collect();
    if !present.is_empty() {
        let chains = nft_wire::dump_chains(inside, NFPROTO_INET, None)
            .map_err(|e| read_err("listing chains", e))?;
        let rules = nft_wire::dump_rules(inside, NFPROTO_INET, None)
            .map_err(|e| read_err("listing rules", e))?;
        for w in present {
            for c in &w.chains {
                let name = format!("inet {} {}", w.name, c.name);
                match chains
                    .iter()
                    .find(|g| g.table == w.name && g.name == c.name)
                {
                    None => problems.push(format!("chain {name} is missing")),
                    Some(g) if g.hook != c.hook => problems.push(format!(
                        "chain {name} is hooked as {}, not as {}",
                        g.hook
                            .as_ref()
                            .map_or("a regular chain".into(), |h| h.to_string()),
                        c.hook
                            .as_ref()
                            .map_or("a regular chain".into(), |h| h.to_string()),
                    )),
                    Some(_) => {}
                }
                let mine = |r: &&WireRule| r.table == w.name && r.chain == c.name;
                let want_rules: Vec<&WireRule> = w.rules.iter().filter(mine).collect();
                let got_rules: Vec<&WireRule> = rules.iter().filter(mine).collect();
                let same = |a: &WireRule, b: &WireRule| same_rule(inside, a, b);
                problems.extend(chain_problems(&name, &want_rules, &got_rules, same));
            }
            // Chains of our table that we do not declare: a base chain there takes effect
            // (a `policy drop` hook, say) even without rules.
            for c in chains
                .iter()
                .filter(|c| c.table == w.name && !w.chains.iter().any(|d| d.name == c.name))
            {
                let n = rules
                    .iter()
                    .filter(|r| r.table == w.name && r.chain == c.name)
                    .count();
                problems.push(format!(
                    "chain inet {} {} is not ours ({}, {n} rules)",
                    w.name,
                    c.name,
                    c.hook
                        .as_ref()
                        .map_or("a regular chain".into(), |h| format!("hooked: {h}"))
                ));
            }
        }
    }
    problems.extend(dormant_problems(existing, |t| {
        t.is_ours() && used.contains(&t.name.as_str())
    }));
    problems.extend(
        crate::routing::check_needs(inside, &ruleset.routing_needs())
            .map_err(|e| ValidateError::ReadBack(ApplyError::Routing(e)))?,
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ValidateError::Mismatch(problems))
    }
}

/// Whether the kernel's rule `got` is the rule `want` we compiled: the same expressions,
/// where a lookup of one of `want`'s anonymous sets matches a lookup (same register and
/// flags) of an anonymous set that holds the same elements, in the same order.
fn same_rule(inside: &Inside<'_>, want: &WireRule, got: &WireRule) -> bool {
    if want.exprs.len() != got.exprs.len() {
        return false;
    }
    let mut sets = want.sets.iter();
    want.exprs
        .iter()
        .zip(&got.exprs)
        .all(|(w, g)| match (w, g) {
            (
                Expr::Lookup {
                    sreg: ws,
                    set: wname,
                    flags: wf,
                },
                Expr::Lookup {
                    sreg: gs,
                    set: gname,
                    flags: gf,
                },
            ) if wname == nft_wire::ANON_SET => {
                let Some(set) = sets.next() else {
                    return false;
                };
                ws == gs
                    && wf == gf
                    && gname.starts_with("__set")
                    && nft_wire::dump_set_elements(inside, got.family, &got.table, gname)
                        .is_ok_and(|elements| elements == set.elements)
            }
            (w, g) => w == g,
        })
}

/// The chains of the iptables backend (`ISTIO_*`) in iptables-nft's `ip`/`ip6` tables,
/// as `ip nat ISTIO_OUTPUT`; nothing is asked when `existing` has no such table.
///
/// Errors: the kernel's answer to the chain dump.
pub fn iptables_chains(inside: &Inside<'_>, existing: &[NfTable]) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for family in [NFPROTO_IPV4, NFPROTO_IPV6] {
        if !existing.iter().any(|t| t.family == family) {
            continue;
        }
        for c in nft_wire::dump_chains(inside, family, None)? {
            if c.name.starts_with(crate::rules::CHAIN_PREFIX) {
                let f = if family == NFPROTO_IPV4 { "ip" } else { "ip6" };
                out.push(format!("{f} {} {}", c.table, c.name));
            }
        }
    }
    Ok(out)
}

/// What ADD does with the nftables backend after the write: removes the iptables
/// backend's rules if iptables-nft's tables hold any (`remove`, a node that switched
/// backends), then compares our tables with `ruleset` (`written`: what [`apply`]
/// returned) and checks the routing.
///
/// Errors: [`ValidateError::ReadBack`] when a dump fails or `remove` does,
/// [`ValidateError::Mismatch`] listing every difference.
pub fn settle_and_read_back(
    inside: &Inside<'_>,
    ruleset: &NftRuleset,
    written: &[WireTable],
    remove: impl FnOnce() -> Result<(), ApplyError>,
) -> Result<(), ValidateError> {
    let read_err = |what: &str, e: std::io::Error| {
        ValidateError::ReadBack(ApplyError::Netlink(format!("{what}: {e}")))
    };
    let mut existing = tables(inside).map_err(|e| read_err("listing tables", e))?;
    let foreign = iptables_chains(inside, &existing).map_err(|e| read_err("listing chains", e))?;
    if !foreign.is_empty() {
        log::info!(
            "removing the iptables backend's rules ({}) after writing nftables",
            foreign.join(", ")
        );
        remove().map_err(ValidateError::ReadBack)?;
        existing = tables(inside).map_err(|e| read_err("listing tables", e))?;
    }
    check(inside, &existing, ruleset, written)
}

/// Compares the netns's nftables rules (and routing) with `ruleset`: each of its tables,
/// chains and rules exactly as written, and none of our other tables left over.
///
/// Errors: [`ValidateError::ReadBack`] when a dump fails, [`ValidateError::Mismatch`]
/// listing every difference.
pub fn read_back(inside: &Inside<'_>, ruleset: &NftRuleset) -> Result<(), ValidateError> {
    let want = compiled(ruleset).map_err(ValidateError::ReadBack)?;
    let existing = tables(inside).map_err(|e| {
        ValidateError::ReadBack(ApplyError::Netlink(format!("listing tables: {e}")))
    })?;
    check(inside, &existing, ruleset, &want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::ScratchNetns;

    fn has_our_tables(inside: &Inside<'_>) -> std::io::Result<bool> {
        Ok(tables(inside)?.iter().any(NfTable::is_ours))
    }

    fn nft(args: &[&str]) {
        let bin = crate::apply::find_binary("nft").expect("nft (install nftables)");
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(out.status.success(), "nft {args:?}: {out:?}");
    }

    /// The netlink table dump sees our tables exactly when they exist (and only ours
    /// count), and `remove` deletes exactly ours. Needs root and `nft`.
    #[test]
    fn netlink_sees_and_removes_our_tables() {
        let scratch = ScratchNetns::create().unwrap();
        scratch
            .netns()
            .run(|inside| {
                assert!(!has_our_tables(inside).unwrap(), "a new netns has none");
                remove(inside).unwrap();
                nft(&["add", "table", "ip", "nat"]);
                nft(&["add", "table", "inet", "other"]);
                assert!(!has_our_tables(inside).unwrap(), "not ours");
                nft(&["add", "table", "inet", crate::rules::nftables::RAW_TABLE]);
                assert!(has_our_tables(inside).unwrap());
                remove(inside).unwrap();
                assert!(!has_our_tables(inside).unwrap(), "removed");
                let all = tables(inside).unwrap();
                assert!(
                    all.iter()
                        .any(|t| t.family == NFPROTO_IPV4 && t.name == "nat")
                        && all
                            .iter()
                            .any(|t| t.family == NFPROTO_INET && t.name == "other"),
                    "{all:?}"
                );
            })
            .unwrap();
    }

    /// A pod's ruleset with DNS capture (so a rule with an anonymous port set).
    fn dns_ruleset() -> NftRuleset {
        let pod = crate::pod::MeshedPod {
            proxy_env: [(
                crate::redirect::ENV_DNS_CAPTURE.to_owned(),
                "true".to_owned(),
            )]
            .into(),
            ..Default::default()
        };
        let r = crate::redirect::Redirect::from_pod(&pod).unwrap();
        crate::rules::nftables::build(&r, false)
    }

    fn mismatch(inside: &Inside<'_>, ruleset: &NftRuleset) -> String {
        match read_back(inside, ruleset) {
            Err(ValidateError::Mismatch(p)) => p.join("; "),
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }

    /// The write reads back as written, twice in a row (the flush replaces everything);
    /// every kind of drift is seen and said in words: a flushed chain, a port set with
    /// other elements, a rule that is not ours, a table left over. Needs root and `nft`.
    #[test]
    fn what_is_written_reads_back_and_drift_is_named() {
        let ruleset = dns_ruleset();
        assert!(ruleset.transaction().contains("{ 53, 15008 }"));
        let scratch = ScratchNetns::create().unwrap();
        scratch
            .netns()
            .run(|inside| {
                apply(inside, &ruleset).unwrap();
                read_back(inside, &ruleset).unwrap();
                apply(inside, &ruleset).unwrap();
                read_back(inside, &ruleset).unwrap();

                nft(&["flush", "chain", "inet", "istio-proxy-nat", "istio-redirect"]);
                let m = mismatch(inside, &ruleset);
                assert!(
                    m.contains("chain inet istio-proxy-nat istio-redirect: rule 1 `meta l4proto tcp counter redirect to :15001` is missing"),
                    "{m}"
                );
                apply(inside, &ruleset).unwrap();

                // The set rule replaced by one whose set holds 54: only its elements differ.
                let text = ruleset.transaction();
                let line = text
                    .lines()
                    .find(|l| l.contains("{ 53, 15008 }"))
                    .unwrap()
                    .replace("{ 53, 15008 }", "{ 54, 15008 }");
                nft(&["flush", "table", "inet", "istio-proxy-nat"]);
                let others: Vec<&str> = text
                    .lines()
                    .skip_while(|l| !l.starts_with("add rule inet istio-proxy-nat"))
                    .filter(|l| l.contains("istio-proxy-nat"))
                    .collect();
                for l in others {
                    let l = if l.contains("{ 53, 15008 }") { line.as_str() } else { l };
                    let args: Vec<&str> = l.split_whitespace().collect();
                    nft(&args);
                }
                let m = mismatch(inside, &ruleset);
                assert!(m.contains("istio-output: rule") && m.contains("should be"), "{m}");
                assert!(!m.contains("expected"), "only that rule differs: {m}");
                apply(inside, &ruleset).unwrap();

                nft(&["add", "rule", "inet", "istio-proxy-nat", "output", "counter", "accept"]);
                let m = mismatch(inside, &ruleset);
                assert!(m.contains("is not ours"), "{m}");
                apply(inside, &ruleset).unwrap();

                // A chain of someone else's in our table, even empty, is drift; the next
                // write makes the table anew without it.
                nft(&[
                    "add", "chain", "inet", "istio-proxy-nat", "extra",
                    "{ type filter hook output priority 0 ; policy drop ; }",
                ]);
                let m = mismatch(inside, &ruleset);
                assert!(m.contains("chain inet istio-proxy-nat extra is not ours"), "{m}");
                apply(inside, &ruleset).unwrap();
                read_back(inside, &ruleset).unwrap();

                // A dormant table of ours: its rules read back as written but take no
                // effect. The next write makes it anew, awake, in one transaction; also
                // when it lacks one of our base chains (which the kernel would refuse to
                // add to a table whose flags the same transaction changes).
                nft(&["add", "table", "inet", "istio-proxy-nat", "{ flags dormant; }"]);
                let m = mismatch(inside, &ruleset);
                assert!(m.contains("table inet istio-proxy-nat is dormant"), "{m}");
                apply(inside, &ruleset).unwrap();
                read_back(inside, &ruleset).unwrap();
                nft(&["flush", "table", "inet", "istio-proxy-nat"]);
                nft(&["delete", "chain", "inet", "istio-proxy-nat", "prerouting"]);
                nft(&["add", "table", "inet", "istio-proxy-nat", "{ flags dormant; }"]);
                apply(inside, &ruleset).unwrap();
                read_back(inside, &ruleset).unwrap();

                nft(&["add", "table", "inet", crate::rules::ambient::NAT_TABLE]);
                let m = mismatch(inside, &ruleset);
                assert!(m.contains("is left over"), "{m}");
                // The next write deletes it.
                apply(inside, &ruleset).unwrap();
                read_back(inside, &ruleset).unwrap();
                remove(inside).unwrap();
                assert!(!has_our_tables(inside).unwrap());
            })
            .unwrap();
    }
}
