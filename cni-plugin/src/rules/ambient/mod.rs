//! Istio ambient mode's redirection rules, for both backends. Pure: no I/O. Golden-tested
//! against upstream Istio's outputs (`cni-plugin/tests/conformance/istio-ambient/`). Not
//! applied by any verb yet.
//!
//! In ambient mode a pod's traffic is redirected, inside the pod's netns, to ztunnel (which
//! runs in the node's netns but listens in the pod's): outbound TCP to 15001, inbound TCP to
//! 15006 (HBONE on 15008 goes straight through), DNS to 15053 when DNS capture is on.
//! ztunnel marks its own packets with [`INPOD_MARK`], so they are never captured, and the
//! connections it accepts carry [`INPOD_TPROXY_MARK`] as conntrack mark. In the node's
//! netns, kubelet's probes to a pod are SNATed to [`DEFAULT_HOST_PROBE_SNAT_V4`] (or `_V6`)
//! so that the in-pod rules can tell them from other node traffic and let them through.
//!
//! - [`iptables`]: both rule sets as `iptables-restore` input (upstream's
//!   `cni/pkg/iptables/iptables.go`);
//! - [`nftables`]: both as one `nft -f` transaction each (upstream's
//!   `cni/pkg/nftables/nftables.go`);
//! - this module: the constants both share, the node-wide settings ([`NodeSettings`]) and a
//!   pod's overrides from its annotations ([`PodOverrides`]).

pub mod iptables;
pub mod nftables;
mod overrides;

use std::net::{Ipv4Addr, Ipv6Addr};

pub use overrides::{
    DnsOverride, OverrideError, PodOverrides, ANNOTATIONS, ANNOT_BYPASS_INBOUND_CAPTURE,
    ANNOT_DNS_CAPTURE, ANNOT_REROUTE_VIRTUAL_INTERFACES,
};

/// Packet mark ztunnel sets on every packet it sends from a pod's netns (1337), so the
/// in-pod rules never capture them. Must match ztunnel's `PACKET_MARK`. Matched under
/// [`INPOD_MASK`]. Upstream: `InpodMark` in `cni/pkg/config/config.go`.
pub const INPOD_MARK: u32 = 0x539;
/// Mask of [`INPOD_MARK`] matches (`0x539/0xfff`): only the low 12 bits of the mark are
/// Istio's. Upstream: `InpodMask` in `cni/pkg/config/config.go`.
pub const INPOD_MASK: u32 = 0xfff;
/// Conntrack mark of connections that ztunnel accepted (set on packets that carry
/// [`INPOD_MARK`] on the way in), restored into the packet mark of their replies so they
/// leave uncaptured. Upstream: `InpodTProxyMark` in `cni/pkg/config/config.go`.
pub const INPOD_TPROXY_MARK: u32 = 0x111;
/// Mask of [`INPOD_TPROXY_MARK`] (`0x111/0xfff`). Upstream: `InpodTProxyMask` in
/// `cni/pkg/config/config.go`.
pub const INPOD_TPROXY_MASK: u32 = 0xfff;
/// The routing table of the in-pod policy rule. Upstream: `RouteTableInbound` in
/// `cni/pkg/config/config.go`.
pub const INPOD_ROUTE_TABLE: u32 = 100;
/// Priority (`pref`) of the in-pod policy rule. Upstream: `cni/pkg/iptables/iptables_linux.go`
/// (`forEachInpodMarkIPRule`).
pub const INPOD_RULE_PRIORITY: u32 = 32764;
/// The in-pod policy routing: replies of connections ztunnel accepted (mark
/// `0x111/0xfff`) are delivered locally, `ip rule add fwmark 0x111/0xfff pref 32764 lookup
/// 100` and `ip route add local default dev lo table 100` (upstream
/// `cni/pkg/iptables/iptables_linux.go`, `AddInpodMarkIPRule`, `AddLoopbackRoutes`).
pub const INPOD_DELIVERY: crate::rules::LocalDelivery = crate::rules::LocalDelivery {
    mark: INPOD_TPROXY_MARK,
    mask: Some(INPOD_TPROXY_MASK),
    table: INPOD_ROUTE_TABLE,
    priority: Some(INPOD_RULE_PRIORITY),
};
/// Both masks of the iptables `CONNMARK --restore-mark` (the whole mark is copied).
/// Upstream: `InpodRestoreMask` in `cni/pkg/config/config.go`.
pub const INPOD_RESTORE_MASK: u32 = 0xffff_ffff;

/// ztunnel's outbound capture port: outbound TCP of the pod, and inbound TCP from a
/// rerouted virtual interface, is redirected here. Upstream: `ZtunnelOutboundPort` in
/// `cni/pkg/config/config.go`.
pub const ZTUNNEL_OUTBOUND_PORT: u16 = 15001;
/// ztunnel's inbound plaintext port: inbound TCP that is not HBONE is redirected here.
/// Upstream: `ZtunnelInboundPlaintextPort` in `cni/pkg/config/config.go`.
pub const ZTUNNEL_INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// ztunnel's HBONE port: inbound TCP to it is never redirected. Upstream:
/// `ZtunnelInboundPort` in `cni/pkg/config/config.go`.
pub const ZTUNNEL_INBOUND_PORT: u16 = 15008;
/// ztunnel's DNS proxy port: DNS (UDP and TCP port 53) is redirected here when DNS capture
/// is on. Upstream: `DNSCapturePort` in `cni/pkg/config/config.go`.
pub const DNS_CAPTURE_PORT: u16 = 15053;
/// Conntrack zone of the DNS exchanges between ztunnel and the upstream resolvers, kept
/// apart from the pod's own (upstream issue 33469). Upstream: the `--zone 1` / `ct zone set
/// 1` literals in `cni/pkg/iptables/iptables.go` and `cni/pkg/nftables/nftables.go`.
pub const DNS_CONNTRACK_ZONE: u16 = 1;

/// Prefix of the node's address sets of probed pod IPs; the sets are this plus `-v4` /
/// `-v6`. Upstream: `ProbeIPSet` in `cni/pkg/config/config.go`.
pub const PROBE_SET_PREFIX: &str = "istio-inpod-probes";
/// The node's set of IPv4 pod addresses whose probes are SNATed (an ipset for iptables, a
/// set of table [`NAT_TABLE`] for nftables). Upstream: `ipset.V4Name` applied to
/// `ProbeIPSet` (`cni/pkg/ipset/ipset.go`, `cni/pkg/iptables/iptables.go`), and
/// `cni/pkg/nftables/host_sets.go`.
pub const PROBE_SET_V4: &str = "istio-inpod-probes-v4";
/// The IPv6 counterpart of [`PROBE_SET_V4`]. Upstream: `ipset.V6Name` applied to
/// `ProbeIPSet` (`cni/pkg/ipset/ipset.go`), and `cni/pkg/nftables/host_sets.go`.
pub const PROBE_SET_V6: &str = "istio-inpod-probes-v6";

/// Default source address kubelet's IPv4 probes are SNATed to (node agent's
/// `HOST_PROBE_SNAT_IP`; any address of 169.254.0.0/16 may be configured instead).
/// Upstream: `DefaultHostProbeSNATIP` in `cni/pkg/nodeagent/options.go`.
pub const DEFAULT_HOST_PROBE_SNAT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// Default source address kubelet's IPv6 probes are SNATed to (node agent's
/// `HOST_PROBE_SNAT_IPV6`). Upstream: `DefaultHostProbeSNATIPV6` in
/// `cni/pkg/nodeagent/options.go`.
pub const DEFAULT_HOST_PROBE_SNAT_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// iptables chain of the in-pod output rules (in `mangle`, `nat` and `raw`). Upstream:
/// `ChainInpodOutput` in `cni/pkg/iptables/iptables.go`.
pub const CHAIN_INPOD_OUTPUT: &str = "ISTIO_OUTPUT";
/// iptables chain of the in-pod prerouting rules (in `mangle`, `nat` and `raw`). Upstream:
/// `ChainInpodPrerouting` in `cni/pkg/iptables/iptables.go`.
pub const CHAIN_INPOD_PREROUTING: &str = "ISTIO_PRERT";
/// iptables chain of the node's probe SNAT rules (in `nat`). Upstream:
/// `ChainHostPostrouting` in `cni/pkg/iptables/iptables.go`.
pub const CHAIN_HOST_POSTROUTING: &str = "ISTIO_POSTRT";

/// nftables table (family `inet`) of the REDIRECT rules in a pod, and of the probe SNAT
/// rules and probe sets on the node. Upstream: `AmbientNatTable` in
/// `cni/pkg/nftables/nftables.go`.
pub const NAT_TABLE: &str = "istio-ambient-nat";
/// nftables table (family `inet`) of the in-pod mark rules. Upstream: `AmbientMangleTable`
/// in `cni/pkg/nftables/nftables.go`.
pub const MANGLE_TABLE: &str = "istio-ambient-mangle";
/// nftables table (family `inet`) of the in-pod DNS conntrack zones. Upstream:
/// `AmbientRawTable` in `cni/pkg/nftables/nftables.go`.
pub const RAW_TABLE: &str = "istio-ambient-raw";

/// The host loopback each family's in-pod rules exempt.
const LOOPBACK_V4: &str = "127.0.0.1/32";
const LOOPBACK_V6: &str = "::1/128";

/// The node-wide settings of ambient mode: what upstream's node agent keeps in its
/// `AmbientConfig` (`cni/pkg/config/config.go`) and applies to every pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    /// Capture DNS to ztunnel's DNS proxy (upstream `RedirectDNS`, from the agent's
    /// `ambient-dns-capture` setting). A pod may override it ([`DnsOverride`]).
    pub redirect_dns: bool,
    /// Also write IPv6 rules (upstream `EnableIPv6`, from the agent's `ambient-ipv6`
    /// setting).
    pub ipv6: bool,
    /// Source address of kubelet's IPv4 probes after the node's SNAT (upstream
    /// `HostProbeSNATAddress`, env `HOST_PROBE_SNAT_IP`); the in-pod rules let traffic from
    /// and to it through.
    pub host_probe_snat_v4: Ipv4Addr,
    /// Source address of kubelet's IPv6 probes after the node's SNAT (upstream
    /// `HostProbeV6SNATAddress`, env `HOST_PROBE_SNAT_IPV6`); used only with
    /// [`ipv6`](Self::ipv6).
    pub host_probe_snat_v6: Ipv6Addr,
}

impl NodeSettings {
    /// Settings with the default probe SNAT addresses ([`DEFAULT_HOST_PROBE_SNAT_V4`],
    /// [`DEFAULT_HOST_PROBE_SNAT_V6`]).
    pub fn new(redirect_dns: bool, ipv6: bool) -> NodeSettings {
        NodeSettings {
            redirect_dns,
            ipv6,
            host_probe_snat_v4: DEFAULT_HOST_PROBE_SNAT_V4,
            host_probe_snat_v6: DEFAULT_HOST_PROBE_SNAT_V6,
        }
    }

    /// Whether DNS is captured for a pod with `pod`'s overrides: the pod's
    /// `ambient.istio.io/dns-capture` if set, else [`redirect_dns`](Self::redirect_dns).
    /// Upstream: the `switch podOverrides.DNSProxy` in `AppendInpodRules` of
    /// `cni/pkg/iptables/iptables.go` and `cni/pkg/nftables/nftables.go`.
    pub fn dns_capture_for(&self, pod: &PodOverrides) -> bool {
        match pod.dns {
            DnsOverride::Unset => self.redirect_dns,
            DnsOverride::Enabled => true,
            DnsOverride::Disabled => false,
        }
    }
}
