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
//! Everything here runs in the agent's own netns, which is the node's (`hostNetwork`):
//! the sets over netlink ([`super::ipset`]), the rules with iptables-restore, read back as
//! the pod rules are.

use std::collections::HashSet;
use std::net::IpAddr;

use istio_cni::apply::Xtables;
use istio_cni::netns::Netns;
use istio_cni::rules::ambient::{self, NodeSettings};
use istio_cni::rules::Ruleset;

use super::ipset::{IpsetError, Set};

/// The host rules or sets could not be written.
#[derive(Debug, thiserror::Error)]
pub enum HostRulesError {
    /// The node's netns could not be entered.
    #[error(transparent)]
    Netns(#[from] istio_cni::netns::NetnsError),
    /// An ipset call failed.
    #[error(transparent)]
    Ipset(#[from] IpsetError),
    /// The iptables rules could not be written or read back.
    #[error("the node's probe rules (nat ISTIO_POSTRT): {0}")]
    Rules(#[source] Box<istio_cni::Error>),
    /// No iptables on the node.
    #[error("the node's probe rules need iptables: {0}")]
    NoIptables(String),
}

/// The node's probe sets and rules.
#[derive(Debug, Clone)]
pub struct HostProbes {
    node: NodeSettings,
    xt: Xtables,
}

impl HostProbes {
    /// The probe rules of `node`'s settings, written with `xt`.
    pub fn new(node: NodeSettings, xt: Xtables) -> HostProbes {
        HostProbes { node, xt }
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

    /// The rules, as upstream writes them ([`ambient::iptables::build_host_probe`]).
    pub fn ruleset(&self) -> Ruleset {
        ambient::iptables::build_host_probe(&self.node).ruleset()
    }

    /// Creates the sets (kept, with their entries, when they exist) and writes the rules
    /// (read back), in the node's netns. Run at start; idempotent.
    ///
    /// Errors: [`HostRulesError`].
    pub fn install(&self) -> Result<(), HostRulesError> {
        for set in self.sets() {
            set.create()?;
        }
        let ruleset = self.ruleset();
        Netns::current()?
            .run(|inside| istio_cni::plugin::reprogram(inside, &self.xt, &ruleset))?
            .map_err(|e| HostRulesError::Rules(Box::new(e)))
    }

    /// Removes the rules, then the sets (the agent is uninstalled).
    ///
    /// Errors: the first failure; the rest is still removed.
    pub fn uninstall(&self) -> Result<(), HostRulesError> {
        let ruleset = self.ruleset();
        let removed = Netns::current()?
            .run(|inside| istio_cni::apply::remove(inside, &self.xt, Some(&ruleset)))?
            .map_err(|e| HostRulesError::Rules(Box::new(e.into())));
        let mut first = removed.err();
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
        for set in self.sets() {
            for entry in set.list()? {
                if doomed(entry.comment.as_deref()) {
                    set.del(entry.ip)?;
                }
            }
        }
        Ok(())
    }
}
