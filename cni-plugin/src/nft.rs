//! The nftables backend's side effects (`native_nftables`): one `nft -f -` per pod, run
//! from a thread inside the pod's netns, so the whole transaction is applied atomically or
//! not at all; one `nft -j list ruleset` for the read-back; deleting our tables for DEL;
//! and an nfnetlink table dump that tells, without a process, which tables exist.
//!
//! No lock is taken: each netns has its own nftables ruleset, and the kernel serialises
//! transactions (the nfnetlink commit mutex is per netns), so concurrent ADDs of different
//! pods never wait on each other, unlike the xtables lock of the iptables backend.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::apply::ApplyError;
use crate::netns::Inside;
use crate::rules::nft_canon::{self, CanonTables};
use crate::rules::nftables::{NftRuleset, TABLES};
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
    pub fn apply(&self, _inside: &Inside<'_>, ruleset: &NftRuleset) -> Result<(), ApplyError> {
        let used = ruleset.table_names();
        // Deleting a table is the costly part of a transaction (the kernel waits for an
        // RCU grace period): only tables that exist are deleted, as the kernel says over
        // nfnetlink; when it cannot tell, every unused one is.
        let existing = table_names().ok();
        let mut text = String::new();
        for table in TABLES.iter().filter(|t| !used.contains(t)) {
            let exists = existing.as_ref().is_none_or(|names| {
                names
                    .iter()
                    .any(|(f, n)| *f == NFPROTO_INET && n.as_str() == *table)
            });
            if exists {
                text.push_str(&format!(
                    "add table inet {table}\ndelete table inet {table}\n"
                ));
            }
        }
        text.push_str(&ruleset.transaction());
        self.run(&["-f", "-"], Some(&text)).map(drop)
    }

    /// Deletes our three tables, in one transaction; tables that are not there are fine
    /// (and when the kernel says over nfnetlink that none is there, nft is not run).
    ///
    /// Errors: [`ApplyError`] with nft's message.
    pub fn remove(&self, inside: &Inside<'_>) -> Result<(), ApplyError> {
        if matches!(has_our_tables(inside), Ok(false)) {
            return Ok(());
        }
        let text: String = TABLES
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
pub fn has_our_tables(_inside: &Inside<'_>) -> std::io::Result<bool> {
    Ok(table_names()?
        .iter()
        .any(|(family, name)| *family == NFPROTO_INET && TABLES.contains(&name.as_str())))
}

/// `NFPROTO_INET` (`linux/netfilter.h`).
const NFPROTO_INET: u8 = 1;

/// Every nftables table of the calling thread's netns, as (family, name).
fn table_names() -> std::io::Result<Vec<(u8, String)>> {
    use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
    // NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE; NLM_F_REQUEST | NLM_F_DUMP.
    const GETTABLE: u16 = (10 << 8) | 1;
    const FLAGS: u16 = 0x1 | 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NFTA_TABLE_NAME: u16 = 1;
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    nix::sys::socket::setsockopt(
        &std::os::fd::AsFd::as_fd(&sock),
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(5, 0),
    )?;
    let seq: u32 = 1;
    // nlmsghdr (16 bytes) + nfgenmsg (family AF_UNSPEC, version 0, res_id 0).
    let mut req = Vec::with_capacity(20);
    req.extend_from_slice(&20u32.to_ne_bytes());
    req.extend_from_slice(&GETTABLE.to_ne_bytes());
    req.extend_from_slice(&FLAGS.to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[0, 0, 0, 0]);
    sock.send(&req, 0)?;
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|x| u16::from_ne_bytes([x[0], x[1]]));
    let u32_at = |b: &[u8], i: usize| {
        b.get(i..i + 4)
            .map(|x| u32::from_ne_bytes([x[0], x[1], x[2], x[3]]))
    };
    let mut out = Vec::new();
    loop {
        let (buf, _) = sock.recv_from_full()?;
        let mut off = 0;
        while off + 16 <= buf.len() {
            let len = u32_at(&buf, off).ok_or_else(|| invalid("short header"))? as usize;
            let kind = u16_at(&buf, off + 4).ok_or_else(|| invalid("short header"))?;
            let msg_seq = u32_at(&buf, off + 8).ok_or_else(|| invalid("short header"))?;
            if len < 16 || off + len > buf.len() {
                return Err(invalid("bad netlink message length"));
            }
            let msg = &buf[off..off + len];
            off += (len + 3) & !3;
            if msg_seq != seq {
                continue;
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = u32_at(msg, 16).map_or(0, |c| c as i32);
                    if code == 0 {
                        return Ok(out);
                    }
                    return Err(std::io::Error::from_raw_os_error(-code));
                }
                _ => {}
            }
            let family = msg.get(16).copied().unwrap_or(0);
            let mut a = 20;
            while a + 4 <= msg.len() {
                let alen = u16_at(msg, a).unwrap_or(0) as usize;
                let atype = u16_at(msg, a + 2).unwrap_or(0) & 0x3fff;
                if alen < 4 || a + alen > msg.len() {
                    break;
                }
                if atype == NFTA_TABLE_NAME {
                    let name = &msg[a + 4..a + alen];
                    let name = name.split(|b| *b == 0).next().unwrap_or_default();
                    out.push((family, String::from_utf8_lossy(name).into_owned()));
                }
                a += (alen + 3) & !3;
            }
        }
    }
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
                let names = table_names().unwrap();
                assert!(names.contains(&(2, "nat".to_owned())), "{names:?}");
            })
            .unwrap();
    }

    const RAW_TABLE_NAME: &str = crate::rules::nftables::RAW_TABLE;
}
