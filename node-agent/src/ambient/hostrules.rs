//! The node's side of kubelet's probes of ambient pods (upstream
//! `cni/pkg/iptables/iptables.go` `CreateHostRulesForHealthChecks`, and the host ipset of
//! `cni/pkg/nodeagent/net_linux.go`).
//!
//! Inside an ambient pod, traffic from outside goes to ztunnel, except traffic from the
//! node's probe address (`169.254.7.127`, IPv6 `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`),
//! which the in-pod rules let through. kubelet's probes come from the node, so on the node
//! `nat POSTROUTING` jumps to `ISTIO_POSTRT`, which SNATs TCP from a local socket to an
//! address in the probe set to that address. The sets (`istio-inpod-probes-v4`, and `-v6`
//! with IPv6) hold the addresses of this node's ambient pods, each entry commented with
//! its pod's UID, so that an address reused by a later pod is never removed with the
//! earlier one.
//!
//! Everything here runs in the agent's own netns, which is the node's (`hostNetwork`),
//! where other software keeps its own rules: the sets go over netlink
//! ([`super::ipset`]); the rules are written with one `iptables-restore --noflush` per
//! family that touches nothing but our chain `ISTIO_POSTRT` and our jump to it (no other
//! chain, no routing), under the node's own xtables lock, and are read back with
//! `iptables-save -t nat`. Uninstalling removes exactly those.

use std::collections::HashSet;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use istio_cni::apply::{Backend, Binaries, Xtables};
use istio_cni::rules::ambient::{self, NodeSettings};
use istio_cni::rules::canon::{CanonRule, SavedTables};
use istio_cni::rules::{FamilyRules, Table};

use super::ipset::{IpsetError, Set};

/// Our chain on the node (upstream's `ISTIO_POSTRT`).
const CHAIN: &str = "ISTIO_POSTRT";

/// The host rules or sets could not be written.
#[derive(Debug, thiserror::Error)]
pub enum HostRulesError {
    /// An ipset call failed.
    #[error(transparent)]
    Ipset(#[from] IpsetError),
    /// An iptables tool failed.
    #[error("the node's probe rules (nat {CHAIN}): {0}")]
    Rules(String),
    /// No iptables on the node.
    #[error("the node's probe rules need iptables: {0}")]
    NoIptables(String),
}

/// The node's probe sets and rules. Clones share one lock, which every change of the
/// sets takes, so that a removal (list, then delete) never races an add.
#[derive(Debug, Clone)]
pub struct HostProbes {
    node: NodeSettings,
    xt: Xtables,
    sets_lock: Arc<Mutex<()>>,
}

impl HostProbes {
    /// The probe rules of `node`'s settings, written with `xt`.
    pub fn new(node: NodeSettings, xt: Xtables) -> HostProbes {
        HostProbes {
            node,
            xt,
            sets_lock: Arc::default(),
        }
    }

    /// The node's iptables, as detected in the agent's netns.
    ///
    /// Errors: [`HostRulesError::NoIptables`].
    pub fn detect(node: NodeSettings) -> Result<HostProbes, HostRulesError> {
        let xt = Xtables::detect().map_err(|e| HostRulesError::NoIptables(e.to_string()))?;
        Ok(HostProbes::new(node, xt))
    }

    /// The sets, by family (IPv6 only with the `ipv6` setting).
    pub fn sets(&self) -> Vec<Set> {
        let mut sets = vec![Set {
            name: ambient::PROBE_SET_V4.into(),
            ipv6: false,
        }];
        if self.node.ipv6 {
            sets.push(Set {
                name: ambient::PROBE_SET_V6.into(),
                ipv6: true,
            });
        }
        sets
    }

    /// The rules per family, as upstream writes them
    /// ([`ambient::iptables::build_host_probe`]).
    pub fn rules(&self) -> Vec<FamilyRules> {
        ambient::iptables::build_host_probe(&self.node)
            .families()
            .into_iter()
            .cloned()
            .collect()
    }

    /// Creates the sets (kept, with their entries, when they exist), then makes the rules
    /// exactly ours when they are not: at the head of `nat POSTROUTING` one jump to
    /// `ISTIO_POSTRT`, and in it the SNAT rule; read back after a write. Run at start;
    /// idempotent; nothing else on the node is touched.
    ///
    /// Errors: [`HostRulesError`].
    pub fn install(&self) -> Result<(), HostRulesError> {
        for set in self.sets() {
            set.create()?;
        }
        for family in self.rules() {
            let bins = self.binaries(&family)?;
            let saved = save(bins)?;
            if problems(&saved, &family).is_empty() {
                continue;
            }
            let mut script = String::from("*nat\n");
            script.push_str(&format!(":{CHAIN} - [0:0]\n-F {CHAIN}\n"));
            for _ in 0..jumps(&saved) {
                script.push_str(&format!("-D POSTROUTING -j {CHAIN}\n"));
            }
            for rule in &family.rules {
                script.push_str(&rule.restore_line());
                script.push('\n');
            }
            script.push_str("COMMIT\n");
            log::info!(
                "the node's probe rules ({}, nat {CHAIN}) were missing or changed; writing them",
                family.family
            );
            restore(bins, &script)?;
            let left = problems(&save(bins)?, &family);
            if !left.is_empty() {
                return Err(HostRulesError::Rules(format!(
                    "read back after the write ({}): {}",
                    family.family,
                    left.join("; ")
                )));
            }
        }
        Ok(())
    }

    /// Removes our jumps and chain, then the sets (the agent is uninstalled).
    ///
    /// Errors: the first failure; the rest is still removed.
    pub fn uninstall(&self) -> Result<(), HostRulesError> {
        let mut first = None;
        for family in self.rules() {
            let removed = self.binaries(&family).and_then(|bins| {
                let saved = save(bins)?;
                let mut script = String::from("*nat\n");
                for _ in 0..jumps(&saved) {
                    script.push_str(&format!("-D POSTROUTING -j {CHAIN}\n"));
                }
                if saved.chain(Table::Nat, CHAIN).is_some() {
                    script.push_str(&format!("-F {CHAIN}\n-X {CHAIN}\n"));
                }
                if script.lines().count() == 1 {
                    return Ok(());
                }
                script.push_str("COMMIT\n");
                restore(bins, &script)
            });
            if let Err(e) = removed {
                first.get_or_insert(e);
            }
        }
        let _guard = self.lock();
        for set in self.sets() {
            if let Err(e) = set.destroy() {
                first.get_or_insert(e.into());
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Adds pod `uid`'s addresses `ips` (those of a family without a set are skipped).
    ///
    /// Errors: [`HostRulesError::Ipset`].
    pub fn add(&self, uid: &str, ips: &[IpAddr]) -> Result<(), HostRulesError> {
        let _guard = self.lock();
        for set in self.sets() {
            for ip in ips.iter().filter(|ip| ip.is_ipv6() == set.ipv6) {
                set.add(*ip, uid)?;
            }
        }
        Ok(())
    }

    /// Removes every entry commented with `uid`.
    ///
    /// Errors: [`HostRulesError::Ipset`].
    pub fn remove(&self, uid: &str) -> Result<(), HostRulesError> {
        self.remove_where(|comment| comment == Some(uid))
    }

    /// Removes every entry whose comment is not one of `live` (pods that are gone, or
    /// entries that are not ours).
    ///
    /// Errors: [`HostRulesError::Ipset`].
    pub fn retain(&self, live: &HashSet<String>) -> Result<(), HostRulesError> {
        self.remove_where(|comment| comment.is_none_or(|c| !live.contains(c)))
    }

    fn remove_where(&self, doomed: impl Fn(Option<&str>) -> bool) -> Result<(), HostRulesError> {
        let _guard = self.lock();
        for set in self.sets() {
            for entry in set.list()? {
                if doomed(entry.comment.as_deref()) {
                    set.del(entry.ip)?;
                }
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.sets_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn binaries(&self, family: &FamilyRules) -> Result<&Binaries, HostRulesError> {
        self.xt
            .binaries(family.family)
            .map_err(|e| HostRulesError::NoIptables(e.to_string()))
    }
}

/// How many jumps to our chain `nat POSTROUTING` holds.
fn jumps(saved: &SavedTables) -> usize {
    saved
        .chain(Table::Nat, "POSTROUTING")
        .unwrap_or_default()
        .iter()
        .filter(|r| r.canon.as_ref().and_then(|c| c.target_name()) == Some(CHAIN))
        .count()
}

/// What differs between the node's `nat` table and `family`'s rules: our jump must be
/// `POSTROUTING`'s first rule, and the only one; our chain must hold exactly our rules.
fn problems(saved: &SavedTables, family: &FamilyRules) -> Vec<String> {
    let mut out = Vec::new();
    let ours = |chain: &str| -> Vec<CanonRule> {
        family
            .rules
            .iter()
            .filter(|r| r.chain == chain)
            .filter_map(|r| CanonRule::parse(&r.restore_line(), family.family).ok())
            .collect()
    };
    let postrouting = saved.chain(Table::Nat, "POSTROUTING").unwrap_or_default();
    let jump = ours("POSTROUTING");
    if postrouting.first().and_then(|r| r.canon.as_ref()) != jump.first() {
        out.push(format!(
            "nat POSTROUTING does not start with the jump to {CHAIN}"
        ));
    }
    if jumps(saved) > 1 {
        out.push(format!("nat POSTROUTING jumps to {CHAIN} more than once"));
    }
    match saved.chain(Table::Nat, CHAIN) {
        None => out.push(format!("chain nat {CHAIN} is missing")),
        Some(rules) => {
            let got: Vec<Option<&CanonRule>> = rules.iter().map(|r| r.canon.as_ref()).collect();
            let want = ours(CHAIN);
            if got != want.iter().map(Some).collect::<Vec<_>>() {
                out.push(format!(
                    "chain nat {CHAIN} holds {}",
                    rules
                        .iter()
                        .map(|r| r.line.as_str())
                        .collect::<Vec<_>>()
                        .join(" | ")
                ));
            }
        }
    }
    out
}

/// `…-save -t nat` of the node.
fn save(bins: &Binaries) -> Result<SavedTables, HostRulesError> {
    let text = run(Command::new(&bins.save).args(["-t", "nat"]), None)?;
    Ok(SavedTables::parse(&text, bins.family))
}

/// `…-restore --noflush` of `script` on the node, under the node's xtables lock (legacy
/// waits up to 10 s for it; kube-proxy holds it while it writes).
fn restore(bins: &Binaries, script: &str) -> Result<(), HostRulesError> {
    let mut cmd = Command::new(&bins.restore);
    cmd.arg("--noflush");
    if bins.backend == Backend::Legacy {
        cmd.arg("--wait=10");
    }
    run(&mut cmd, Some(script)).map(drop)
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<String, HostRulesError> {
    let fail = |e: String| HostRulesError::Rules(e);
    let name = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("{name}: {e}")))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| fail(format!("{name}: writing its input: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("{name}: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
