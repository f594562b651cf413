//! The nftables backend's side effects (`native_nftables`): one `nft -f -` per pod, run
//! from a thread inside the pod's netns, so the whole transaction is applied atomically or
//! not at all; one `nft -j list ruleset` for the read-back; deleting our tables for DEL;
//! and an nfnetlink table dump that tells, without a process, which tables exist.
//!
//! The kernel serialises transactions per netns (the nfnetlink commit mutex is per netns),
//! so ADDs of different pods never wait on each other. Two operations on the same netns
//! (a retried ADD, a repair) are serialised by the plugin's per-netns lock
//! ([`crate::lock`]), which also covers the read-back, the probe and the rollback.
//!
//! Besides `nft`, the kernel is asked directly over nfnetlink ([`tables`], [`wake`]): which
//! tables exist and with which flags, and to clear `dormant` on a table we write into.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::apply::ApplyError;
use crate::netns::Inside;
use crate::nfnetlink::{
    nfnetlink_socket, push_attr, push_message, receive, receive_batch, u16_at,
    NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use crate::rules::nft_canon::{self, CanonTables};
use crate::rules::nftables::{NftRuleset, ALL_TABLES};
use crate::validate::ValidateError;

/// The `nft` binary of this node.
#[derive(Debug, Clone)]
pub struct Nft {
    bin: PathBuf,
}

impl Nft {
    /// Finds `nft` in `PATH` and the usual sbin and bin dirs.
    ///
    /// Errors: [`ApplyError::NoNft`] when there is none.
    pub fn detect() -> Result<Nft, ApplyError> {
        crate::apply::find_binary("nft")
            .map(|bin| Nft { bin })
            .ok_or(ApplyError::NoNft)
    }

    /// The binary's path.
    pub fn path(&self) -> &Path {
        &self.bin
    }

    /// Whether this `nft` was built with JSON support, which the read-back needs (`nft -V`
    /// lists `json: yes`).
    ///
    /// Errors: [`ApplyError`] when `nft -V` cannot run.
    pub fn supports_json(&self) -> Result<bool, ApplyError> {
        let out = self.run(&["-V"], None)?;
        Ok(out
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["json:", "yes"]))
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, ApplyError> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        crate::apply::run_command(&mut cmd, &self.bin, stdin)
    }

    /// Writes `ruleset` in one transaction: our tables that it does not use are deleted
    /// (so nothing of an earlier ADD with other settings stays), then its own tables are
    /// added, flushed and filled ([`NftRuleset::transaction`]).
    ///
    /// Errors: [`ApplyError`] with nft's message; the netns is then unchanged.
    pub fn apply(&self, inside: &Inside<'_>, ruleset: &NftRuleset) -> Result<(), ApplyError> {
        let used = ruleset.table_names();
        // Deleting a table is the costly part of a transaction (the kernel waits for an
        // RCU grace period): only tables that exist are deleted, as the kernel says over
        // nfnetlink; when it cannot tell, every unused one is.
        let existing = tables(inside).ok();
        let mut text = String::new();
        for table in ALL_TABLES.iter().filter(|t| !used.contains(t)) {
            let exists = existing.as_ref().is_none_or(|all| {
                all.iter()
                    .any(|t| t.family == NFPROTO_INET && t.name.as_str() == *table)
            });
            if exists {
                text.push_str(&format!(
                    "add table inet {table}\ndelete table inet {table}\n"
                ));
            }
        }
        text.push_str(&ruleset.transaction());
        self.run(&["-f", "-"], Some(&text))?;
        // `add table` keeps a dormant table dormant: wake the ones we use.
        let dormant = existing.as_ref().is_none_or(|all| {
            all.iter()
                .any(|t| t.is_ours() && t.is_dormant() && used.contains(&t.name.as_str()))
        });
        if dormant {
            wake_dormant(inside, |t| t.is_ours() && used.contains(&t.name.as_str()))?;
        }
        Ok(())
    }

    /// Deletes our tables (sidecar's and ambient's), in one transaction; tables that are not there are fine
    /// (and when the kernel says over nfnetlink that none is there, nft is not run).
    ///
    /// Errors: [`ApplyError`] with nft's message.
    pub fn remove(&self, inside: &Inside<'_>) -> Result<(), ApplyError> {
        if matches!(has_our_tables(inside), Ok(false)) {
            return Ok(());
        }
        let text: String = ALL_TABLES
            .iter()
            .map(|t| format!("add table inet {t}\ndelete table inet {t}\n"))
            .collect();
        self.run(&["-f", "-"], Some(&text)).map(drop)
    }

    /// `nft -j list ruleset`: everything in the netns, in one run.
    ///
    /// Errors: [`ApplyError`] when `nft` fails.
    pub fn ruleset_json(&self, _inside: &Inside<'_>) -> Result<String, ApplyError> {
        self.run(&["-j", "list", "ruleset"], None)
    }

    /// Our tables that exist in the netns, in canonical form.
    ///
    /// Errors: [`ApplyError`] when `nft` fails, or prints what is not its JSON.
    pub fn list(&self, inside: &Inside<'_>) -> Result<CanonTables, ApplyError> {
        let text = self.ruleset_json(inside)?;
        nft_canon::from_json(&text).map_err(|e| self.bad(e))
    }

    fn bad(&self, e: nft_canon::CanonError) -> ApplyError {
        ApplyError::BadOutput {
            bin: self.bin.clone(),
            reason: e.to_string(),
        }
    }
}

/// Whether the netns has any of our tables, asked of the kernel directly (an nfnetlink
/// `NFT_MSG_GETTABLE` dump, `linux/netfilter/nf_tables.h`): microseconds, no process, so
/// the iptables backend's ADD can make sure no nftables rules of ours are left without
/// paying for an `nft` run on every pod.
///
/// Errors: the socket's I/O error (a kernel without nf_tables answers EPROTONOSUPPORT or
/// similar; callers treat any error as "cannot tell").
pub fn has_our_tables(inside: &Inside<'_>) -> std::io::Result<bool> {
    Ok(tables(inside)?.iter().any(NfTable::is_ours))
}

/// `NFPROTO_INET` (`linux/netfilter.h`).
pub const NFPROTO_INET: u8 = 1;
/// `NFPROTO_IPV4`: the family of iptables-nft's IPv4 tables.
pub const NFPROTO_IPV4: u8 = 2;
/// `NFPROTO_IPV6`: the family of iptables-nft's IPv6 tables.
pub const NFPROTO_IPV6: u8 = 10;
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

/// `NFNL_SUBSYS_NFTABLES`: the high byte of every nf_tables message type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;

/// Every nftables table of the netns, with its flags: one `NFT_MSG_GETTABLE` dump.
///
/// Errors: as [`has_our_tables`].
pub fn tables(_inside: &Inside<'_>) -> std::io::Result<Vec<NfTable>> {
    let sock = nfnetlink_socket()?;
    let seq: u32 = 1;
    let mut req = Vec::with_capacity(20);
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE;
    push_message(&mut req, kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, 0, &[]);
    sock.send(&req, 0)?;
    let mut out = Vec::new();
    receive(&sock, seq, |msg| {
        let mut table = NfTable {
            family: msg.get(16).copied().unwrap_or(0),
            name: String::new(),
            flags: 0,
        };
        let mut a = 20;
        while a + 4 <= msg.len() {
            let alen = u16_at(msg, a).unwrap_or(0) as usize;
            let atype = u16_at(msg, a + 2).unwrap_or(0) & 0x3fff;
            if alen < 4 || a + alen > msg.len() {
                break;
            }
            let value = &msg[a + 4..a + alen];
            match atype {
                NFTA_TABLE_NAME => {
                    let name = value.split(|b| *b == 0).next().unwrap_or_default();
                    table.name = String::from_utf8_lossy(name).into_owned();
                }
                NFTA_TABLE_FLAGS if value.len() >= 4 => {
                    table.flags = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
                }
                _ => {}
            }
            a += (alen + 3) & !3;
        }
        out.push(table);
    })?;
    Ok(out)
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

/// Compares `got` (our tables, as listed) with `ruleset`: each of its tables and chains
/// exactly as written, and none of our other tables left over.
fn compare(got: &CanonTables, ruleset: &NftRuleset) -> Vec<String> {
    let want = nft_canon::expected(ruleset);
    let mut problems = nft_canon::diff(&want, got);
    for table in got.keys().filter(|t| !want.contains_key(*t)) {
        problems.push(format!("table inet {table} is left over"));
    }
    problems
}

/// What ADD does with the nftables backend after the write, from one `nft -j list
/// ruleset`: removes the iptables backend's rules if iptables-nft shows any (`remove`,
/// a node that switched backends), then compares our tables with `ruleset` and checks
/// the TPROXY routing.
///
/// Errors: [`ValidateError::ReadBack`] when nft fails or `remove` does,
/// [`ValidateError::Mismatch`] listing every difference.
pub fn settle_and_read_back(
    inside: &Inside<'_>,
    nft: &Nft,
    ruleset: &NftRuleset,
    remove: impl FnOnce() -> Result<(), ApplyError>,
) -> Result<(), ValidateError> {
    let text = nft.ruleset_json(inside).map_err(ValidateError::ReadBack)?;
    let foreign =
        nft_canon::iptables_chains(&text).map_err(|e| ValidateError::ReadBack(nft.bad(e)))?;
    if !foreign.is_empty() {
        log::info!(
            "removing the iptables backend's rules ({}) after writing nftables",
            foreign.join(", ")
        );
        remove().map_err(ValidateError::ReadBack)?;
    }
    let got = nft_canon::from_json(&text).map_err(|e| ValidateError::ReadBack(nft.bad(e)))?;
    check(inside, &got, ruleset)
}

fn check(
    inside: &Inside<'_>,
    got: &CanonTables,
    ruleset: &NftRuleset,
) -> Result<(), ValidateError> {
    let mut problems = compare(got, ruleset);
    // nft's JSON does not show table flags reliably (1.0.6 prints `dormant` as "nat"):
    // the kernel's table dump says whether our tables take effect.
    let tables = tables(inside).map_err(|e| {
        ValidateError::ReadBack(ApplyError::Netlink(format!("listing tables: {e}")))
    })?;
    let used = ruleset.table_names();
    problems.extend(dormant_problems(&tables, |t| {
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

/// Compares the netns's nftables rules (and TPROXY routing) with `ruleset`: each of its
/// tables and chains exactly as written, and none of our other tables left over.
///
/// Errors: [`ValidateError::ReadBack`] when nft fails, [`ValidateError::Mismatch`] listing
/// every difference.
pub fn read_back(
    inside: &Inside<'_>,
    nft: &Nft,
    ruleset: &NftRuleset,
) -> Result<(), ValidateError> {
    let got = nft.list(inside).map_err(ValidateError::ReadBack)?;
    check(inside, &got, ruleset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::ScratchNetns;

    /// The netlink table dump sees our tables exactly when they exist (and only ours
    /// count). Needs root and `nft`.
    #[test]
    fn netlink_sees_our_tables() {
        let nft = Nft::detect().expect("nft (install nftables)");
        let scratch = ScratchNetns::create().unwrap();
        scratch
            .netns()
            .run(|inside| {
                assert!(!has_our_tables(inside).unwrap(), "a new netns has none");
                nft.run(&["add", "table", "ip", "nat"], None).unwrap();
                nft.run(&["add", "table", "inet", "other"], None).unwrap();
                assert!(!has_our_tables(inside).unwrap(), "not ours");
                nft.run(&["add", "table", "inet", RAW_TABLE_NAME], None)
                    .unwrap();
                assert!(has_our_tables(inside).unwrap());
                nft.remove(inside).unwrap();
                assert!(!has_our_tables(inside).unwrap(), "removed");
                let all = tables(inside).unwrap();
                assert!(
                    all.iter()
                        .any(|t| t.family == NFPROTO_IPV4 && t.name == "nat"),
                    "{all:?}"
                );
            })
            .unwrap();
    }

    const RAW_TABLE_NAME: &str = crate::rules::nftables::RAW_TABLE;
}
