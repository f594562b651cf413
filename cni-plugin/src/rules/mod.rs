//! [`Redirect`](crate::redirect::Redirect) → the rules ADD writes, per address family.
//! Pure: no I/O. Golden-tested against upstream Istio's outputs
//! (`cni-plugin/tests/conformance/istio-plugin/`).
//!
//! - [`iptables`] builds the rules in upstream's order;
//! - [`nftables`] builds the same redirection as one nftables transaction, as upstream's
//!   native nftables backend does (`native_nftables`);
//! - [`nft_compile`] compiles such a transaction into the netlink expressions `nft` would
//!   send for it, which ADD writes and reads back without an `nft` process;
//! - [`canon`] reads rules back from `iptables-save` in a canonical form, so that the
//!   validator can compare what the kernel holds with what we meant;
//! - [`ambient`] builds Istio ambient mode's in-pod and node probe rules for both backends
//!   (golden-tested against `cni-plugin/tests/conformance/istio-ambient/`).

pub mod ambient;
pub mod canon;
pub mod iptables;
pub mod nft_compile;
pub mod nftables;
pub mod reconcile;

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

/// Prefix of every chain this plugin owns. Chains without it are built-in.
pub const CHAIN_PREFIX: &str = "ISTIO_";

/// An address family: which of `iptables` / `ip6tables` the rules are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4, `iptables`.
    V4,
    /// IPv6, `ip6tables`.
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// A netfilter table this plugin writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `mangle`: TPROXY and marks.
    Mangle,
    /// `nat`: REDIRECT.
    Nat,
    /// `raw`: DNS conntrack zones.
    Raw,
}

impl Table {
    /// Every table, in the order upstream prints them (alphabetical).
    pub const ALL: [Table; 3] = [Table::Mangle, Table::Nat, Table::Raw];

    /// The table's name as iptables spells it.
    pub fn name(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Raw => "raw",
        }
    }

    /// Parses a table name; tables this plugin never writes give `None`.
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// One rule: where it goes and its match/target arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The table.
    pub table: Table,
    /// The chain the rule is added to.
    pub chain: String,
    /// `None` appends (`-A`); `Some(n)` inserts at 1-based position `n` (`-I chain n`).
    pub position: Option<u32>,
    /// The rule's arguments after the chain (and position), one token each.
    pub args: Vec<String>,
}

impl Rule {
    /// The jump target, if the rule ends in `-j TARGET`.
    pub fn jump_target(&self) -> Option<&str> {
        match self.args.as_slice() {
            [.., j, target] if j == "-j" => Some(target),
            _ => None,
        }
    }

    /// The rule as one `iptables-restore` line: `-A CHAIN ARGS` or `-I CHAIN N ARGS`.
    pub fn restore_line(&self) -> String {
        let mut s = match self.position {
            None => format!("-A {}", self.chain),
            Some(n) => format!("-I {} {n}", self.chain),
        };
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}

/// Whether `chain` is one of ours (as opposed to a built-in chain or target).
pub fn is_own_chain(chain: &str) -> bool {
    chain.starts_with(CHAIN_PREFIX)
}

/// The rules of one family, in the order they are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyRules {
    /// IPv4 or IPv6.
    pub family: Family,
    /// The rules, in order.
    pub rules: Vec<Rule>,
}

impl FamilyRules {
    /// The tables that have rules, in [`Table::ALL`] order.
    pub fn tables(&self) -> Vec<Table> {
        Table::ALL
            .into_iter()
            .filter(|t| self.rules.iter().any(|r| r.table == *t))
            .collect()
    }

    /// Our chains of `table`, in the order upstream declares them: chains that rules are
    /// added to, in order of first appearance, then chains that are only jumped to.
    pub fn own_chains(&self, table: Table) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let in_table = || self.rules.iter().filter(move |r| r.table == table);
        let chains = in_table().map(|r| r.chain.as_str());
        let targets = in_table().filter_map(Rule::jump_target);
        for c in chains.chain(targets) {
            if is_own_chain(c) && !out.contains(&c) {
                out.push(c);
            }
        }
        out
    }

    /// The rules in `iptables-restore` form, exactly as upstream's builder prints them
    /// (`* table`, `-N` lines, rules, `COMMIT`). This is what `istio-cni render` shows and
    /// what the conformance vectors hold.
    pub fn restore_text(&self) -> String {
        let mut out = String::new();
        for table in self.tables() {
            let _ = writeln!(out, "* {}", table.name());
            for chain in self.own_chains(table) {
                let _ = writeln!(out, "-N {chain}");
            }
            for r in self.rules.iter().filter(|r| r.table == table) {
                out.push_str(&r.restore_line());
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    /// What each chain holds once the rules are written into empty chains: `-A` appends,
    /// `-I n` inserts at `n`. For built-in chains this is the relative order of our rules
    /// (other software may hold rules there too).
    pub fn final_chains(&self) -> BTreeMap<(Table, String), Vec<&Rule>> {
        let mut chains: BTreeMap<(Table, String), Vec<&Rule>> = BTreeMap::new();
        for r in &self.rules {
            let chain = chains.entry((r.table, r.chain.clone())).or_default();
            match r.position {
                None => chain.push(r),
                Some(n) => {
                    let at = (n as usize).saturating_sub(1).min(chain.len());
                    chain.insert(at, r);
                }
            }
        }
        chains
    }
}

/// The whole ruleset of a pod: IPv4 always, IPv6 when the pod has an IPv6 address or
/// dual stack is on, and whether TPROXY policy routing is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// Per family, IPv4 first.
    pub families: Vec<FamilyRules>,
    /// The policy routing the rules need, for each family (see [`crate::routing`]):
    /// [`iptables::TPROXY_DELIVERY`] in TPROXY mode with inbound capture,
    /// [`ambient::INPOD_DELIVERY`] for ambient's in-pod rules, else none.
    pub local_delivery: Option<LocalDelivery>,
    /// The proxy's UID, exempt from capture; the validation probe connects as it.
    pub proxy_uid: u32,
    /// The destination port of the validation probe: one these rules redirect. `None`
    /// when the rules leave loopback alone, so only read-back can validate them.
    pub probe_port: Option<u16>,
}

/// Policy routing that delivers marked packets locally: packets whose firewall mark is
/// `mark` (under `mask`) are looked up in `table`, whose one route delivers everything
/// through `lo` (`ip rule add fwmark MARK[/MASK] [pref PRIORITY] lookup TABLE`, `ip route
/// add local default dev lo table TABLE`, per family). TPROXY needs it, so that a
/// transparently intercepted packet reaches the local listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalDelivery {
    /// The firewall mark.
    pub mark: u32,
    /// The mask the mark is compared under; `None`: all bits.
    pub mask: Option<u32>,
    /// The routing table.
    pub table: u32,
    /// The rule's priority (`pref`); `None`: the kernel picks one.
    pub priority: Option<u32>,
}

/// What a ruleset needs besides its rules (see [`crate::routing`]): `::6` on `lo` for a
/// sidecar with IPv6 rules, and the policy routing of each family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingNeeds {
    /// The families programmed, IPv4 first.
    pub families: Vec<Family>,
    /// The policy routing, if any.
    pub local_delivery: Option<LocalDelivery>,
    /// `::6/128` on `lo`: the sidecar's IPv6 inbound passthrough address.
    pub ipv6_passthrough: bool,
}

impl Ruleset {
    /// What these rules need besides themselves.
    pub fn routing_needs(&self) -> RoutingNeeds {
        let families: Vec<Family> = self.families.iter().map(|f| f.family).collect();
        RoutingNeeds {
            ipv6_passthrough: families.contains(&Family::V6)
                && self.local_delivery != Some(ambient::INPOD_DELIVERY),
            families,
            local_delivery: self.local_delivery,
        }
    }

    /// The rules of `family`, if that family is programmed.
    pub fn family(&self, family: Family) -> Option<&FamilyRules> {
        self.families.iter().find(|f| f.family == family)
    }

    /// Every family's restore text, IPv4 first, each preceded by a comment line naming the
    /// family (`istio-cni render` output).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let tool = match f.family {
                Family::V4 => "iptables",
                Family::V6 => "ip6tables",
            };
            let _ = writeln!(out, "# {} rules ({tool}-restore --noflush)", f.family);
            out.push_str(&f.restore_text());
        }
        out
    }
}
