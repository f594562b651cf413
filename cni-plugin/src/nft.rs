//! The nftables backend's side effects (`native_nftables`): one `nft -f -` per pod, run
//! from a thread inside the pod's netns, so the whole transaction is applied atomically or
//! not at all; `nft -j list table` for the read-back; deleting our tables for DEL.
//!
//! No lock is taken: each netns has its own nftables ruleset, and the kernel serialises
//! transactions (the nfnetlink commit mutex is per netns), so concurrent ADDs of different
//! pods never wait on each other, unlike the xtables lock of the iptables backend.

use std::io::Write as _;
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
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
            .map(|d| d.join("nft"))
            .find(|p| p.is_file())
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
        let spawn_err = |source| ApplyError::Spawn {
            bin: self.bin.clone(),
            source,
        };
        let mut child = Command::new(&self.bin)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            // If nft exits before reading all of it, its status and stderr say why.
            match pipe.write_all(input.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(spawn_err(e)),
                _ => {}
            }
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(ApplyError::Failed {
                bin: self.bin.clone(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes `ruleset` in one transaction: our tables that it does not use are deleted
    /// (so nothing of an earlier ADD with other settings stays), then its own tables are
    /// added, flushed and filled ([`NftRuleset::transaction`]).
    ///
    /// Errors: [`ApplyError`] with nft's message; the netns is then unchanged.
    pub fn apply(&self, _inside: &Inside<'_>, ruleset: &NftRuleset) -> Result<(), ApplyError> {
        let used = ruleset.table_names();
        let mut text = String::new();
        for table in TABLES.iter().filter(|t| !used.contains(t)) {
            text.push_str(&format!(
                "add table inet {table}\ndelete table inet {table}\n"
            ));
        }
        text.push_str(&ruleset.transaction());
        self.run(&["-f", "-"], Some(&text)).map(drop)
    }

    /// Deletes our three tables, in one transaction; tables that are not there are fine.
    ///
    /// Errors: [`ApplyError`] with nft's message.
    pub fn remove(&self, _inside: &Inside<'_>) -> Result<(), ApplyError> {
        let text: String = TABLES
            .iter()
            .map(|t| format!("add table inet {t}\ndelete table inet {t}\n"))
            .collect();
        self.run(&["-f", "-"], Some(&text)).map(drop)
    }

    /// Every table in the netns, as (family, name): ours, and for example the `ip nat` of
    /// iptables-nft.
    ///
    /// Errors: [`ApplyError`] when `nft` fails, or prints what is not its JSON.
    pub fn tables(&self, _inside: &Inside<'_>) -> Result<Vec<(String, String)>, ApplyError> {
        let text = self.run(&["-j", "list", "tables"], None)?;
        let doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ApplyError::BadOutput {
                bin: self.bin.clone(),
                reason: e.to_string(),
            })?;
        Ok(doc["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| {
                let t = o.get("table")?;
                Some((
                    t["family"].as_str()?.to_owned(),
                    t["name"].as_str()?.to_owned(),
                ))
            })
            .collect())
    }

    /// Our tables that exist in the netns, in canonical form.
    ///
    /// Errors: [`ApplyError`] when `nft` fails, or prints what is not its JSON.
    pub fn list(&self, inside: &Inside<'_>) -> Result<CanonTables, ApplyError> {
        let existing = self.tables(inside)?;
        let bad = |e: nft_canon::CanonError| ApplyError::BadOutput {
            bin: self.bin.clone(),
            reason: e.to_string(),
        };
        let mut text = String::new();
        for table in TABLES
            .iter()
            .filter(|t| existing.iter().any(|(f, n)| f == "inet" && n == **t))
        {
            text.push_str(&self.run(&["-j", "list", "table", "inet", table], None)?);
            text.push('\n');
        }
        nft_canon::from_json(&text).map_err(bad)
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
    let want = nft_canon::expected(ruleset);
    let mut problems = nft_canon::diff(&want, &got);
    for table in got.keys().filter(|t| !want.contains_key(*t)) {
        problems.push(format!("table inet {table} is left over"));
    }
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
