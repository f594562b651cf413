//! The routing side of a ruleset, over netlink (no `ip` binary), as upstream Istio's
//! `tools/common/tproxy` sets it up:
//!
//! - policy routing that delivers marked packets locally ([`LocalDelivery`]): for a
//!   sidecar in TPROXY mode, packets marked 1337 are looked up in table 133, whose only
//!   route delivers everything through `lo` (`ip rule add fwmark 1337 lookup 133`, `ip route
//!   add local 0.0.0.0/0 dev lo table 133`, and the same with `-6` and `::/0`); for
//!   ambient's in-pod rules, mark `0x111/0xfff`, `pref 32764`, table 100;
//! - with IPv6, the inbound passthrough address `::6/128` on `lo` (`ip -6 addr add ::6/128
//!   dev lo`): IPv4 has all of 127/8 on `lo`, IPv6 only `::1`.
//!
//! Call these from inside the pod netns (they take an [`Inside`] token): the netlink socket
//! binds to the calling thread's namespace when it is opened.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use std::net::{IpAddr, Ipv6Addr};

use crate::netns::Inside;
use crate::rules::{ambient::INPOD_DELIVERY, iptables::TPROXY_DELIVERY};
use crate::rules::{Family, LocalDelivery, RoutingNeeds, Ruleset};

/// A routing step failed: the request, as the `ip` command that would do the same, and the
/// errno or I/O error.
#[derive(Debug, thiserror::Error)]
#[error("{request}: {source}")]
pub struct RoutingError {
    /// What was asked, e.g. `ip rule add fwmark 1337 lookup 133 (IPv4)`.
    pub request: String,
    /// Why it failed (the kernel's errno for a refused request).
    #[source]
    pub source: std::io::Error,
}

impl RoutingError {
    fn new(request: impl Into<String>, source: std::io::Error) -> RoutingError {
        RoutingError {
            request: request.into(),
            source,
        }
    }
}

/// The IPv6 inbound passthrough address, `::6`.
pub const IPV6_PASSTHROUGH: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// Interface index of `lo`: always 1 in a network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Sets up what `ruleset` needs: `::6` on `lo` when it has IPv6 rules, and the TPROXY
/// rule and route of each family in TPROXY mode. Entries already present are fine.
///
/// Errors: [`RoutingError`] naming the request and the errno.
pub fn apply(inside: &Inside<'_>, ruleset: &Ruleset) -> Result<(), RoutingError> {
    apply_needs(inside, &ruleset.routing_needs())
}

/// [`apply`] for what a ruleset of either backend needs.
///
/// Errors: [`RoutingError`] naming the request and the errno.
pub fn apply_needs(_inside: &Inside<'_>, needs: &RoutingNeeds) -> Result<(), RoutingError> {
    let families = needs.families.clone();
    if !needs.ipv6_passthrough && needs.local_delivery.is_none() {
        return Ok(());
    }
    let sock = open()?;
    if needs.ipv6_passthrough {
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        request(
            &sock,
            RouteNetlinkMessage::NewAddress(passthrough_address()),
            flags,
            libc::EEXIST,
        )
        .map_err(|e| {
            RoutingError::new(format!("ip -6 addr add {IPV6_PASSTHROUGH}/128 dev lo"), e)
        })?;
    }
    let Some(d) = needs.local_delivery else {
        return Ok(());
    };
    for family in families {
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        request(
            &sock,
            RouteNetlinkMessage::NewRule(rule(family, &d)),
            flags,
            libc::EEXIST,
        )
        .map_err(|e| RoutingError::new(format!("ip rule add {} ({family})", describe(&d)), e))?;
        request(
            &sock,
            RouteNetlinkMessage::NewRoute(route(family, &d)),
            flags,
            libc::EEXIST,
        )
        .map_err(|e| {
            RoutingError::new(
                format!(
                    "ip route add local default dev lo table {} ({family})",
                    d.table
                ),
                e,
            )
        })?;
    }
    Ok(())
}

/// `fwmark M[/MASK] [pref P] lookup T`, as `ip rule` spells it.
fn describe(d: &LocalDelivery) -> String {
    let mut s = format!("fwmark {:#x}", d.mark);
    if let Some(mask) = d.mask {
        s.push_str(&format!("/{mask:#x}"));
    }
    if let Some(p) = d.priority {
        s.push_str(&format!(" pref {p}"));
    }
    s.push_str(&format!(" lookup {}", d.table));
    s
}

/// Removes the policy routing of the sidecar's TPROXY mode and of ambient's in-pod rules,
/// for both families. Missing entries are fine. The `::6` address stays: it is harmless,
/// and the pod's sidecar may be using it.
///
/// Errors: [`RoutingError`] naming the request and the errno.
pub fn remove(_inside: &Inside<'_>) -> Result<(), RoutingError> {
    let sock = open()?;
    for (family, d) in [Family::V4, Family::V6]
        .into_iter()
        .flat_map(|f| [(f, TPROXY_DELIVERY), (f, INPOD_DELIVERY)])
    {
        let flags = NLM_F_REQUEST | NLM_F_ACK;
        for msg in [
            RouteNetlinkMessage::DelRule(rule(family, &d)),
            RouteNetlinkMessage::DelRoute(route(family, &d)),
        ] {
            match request(&sock, msg, flags, libc::ENOENT) {
                Ok(()) => {}
                // Not there: ESRCH for a route in a table that does not exist;
                // EAFNOSUPPORT when IPv6 is disabled in this netns.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::EAFNOSUPPORT)) => {}
                Err(e) => {
                    return Err(RoutingError::new(
                        format!("ip rule del {} ({family})", describe(&d)),
                        e,
                    ))
                }
            }
        }
    }
    Ok(())
}

/// What of [`apply`]'s work is missing from the netns, one line per problem (empty when all
/// is in place): the policy rule of each family.
///
/// Errors: [`RoutingError`] for a failed netlink dump.
pub fn check(inside: &Inside<'_>, ruleset: &Ruleset) -> Result<Vec<String>, RoutingError> {
    check_needs(inside, &ruleset.routing_needs())
}

/// [`check`] for what a ruleset of either backend needs.
///
/// Errors: [`RoutingError`] for a failed netlink dump.
pub fn check_needs(
    _inside: &Inside<'_>,
    needs: &RoutingNeeds,
) -> Result<Vec<String>, RoutingError> {
    let mut problems = Vec::new();
    if let Some(d) = &needs.local_delivery {
        for family in &needs.families {
            if !has_rule(*family, d)? {
                problems.push(format!("{family} policy rule `{}` is missing", describe(d)));
            }
        }
    }
    Ok(problems)
}

/// The pod's own addresses in the netns (`ip addr show`, every interface but `lo`):
/// global unicast ones only, leaving out link-local and loopback addresses. Standalone
/// mode (multus) hands the plugin no `prevResult`, and these then decide whether IPv6
/// rules are written, as upstream's `istio-iptables` decides from the pod network
/// namespace's interfaces.
///
/// Errors: [`RoutingError`] naming the request and the errno.
pub fn pod_addresses(_inside: &Inside<'_>) -> Result<Vec<IpAddr>, RoutingError> {
    let sock = open()?;
    let mut found = Vec::new();
    sock.exchange(
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        NLM_F_REQUEST | netlink_packet_core::NLM_F_DUMP,
        |msg| {
            if let RouteNetlinkMessage::NewAddress(a) = msg {
                if a.header.index == LOOPBACK_IFINDEX {
                    return;
                }
                for attr in &a.attributes {
                    if let AddressAttribute::Address(ip) = attr {
                        if is_global_unicast(ip) && !found.contains(ip) {
                            found.push(*ip);
                        }
                    }
                }
            }
        },
    )
    .map_err(|e| RoutingError::new("ip addr show", e))?;
    Ok(found)
}

/// Not loopback, link-local, multicast or unspecified.
fn is_global_unicast(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_link_local() || v4.is_multicast() || v4.is_unspecified())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Brings `lo` up (`ip link set lo up`), as a runtime's loopback plugin does in a new
/// sandbox. For netns this process creates itself (the node agent's self-test).
///
/// Errors: [`RoutingError`] naming the request and the errno.
pub fn loopback_up(_inside: &Inside<'_>) -> Result<(), RoutingError> {
    let sock = open()?;
    let mut link = LinkMessage::default();
    link.header.index = LOOPBACK_IFINDEX;
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    request(
        &sock,
        RouteNetlinkMessage::SetLink(link),
        NLM_F_REQUEST | NLM_F_ACK,
        0,
    )
    .map_err(|e| RoutingError::new("ip link set lo up", e))
}

fn has_rule(family: Family, d: &LocalDelivery) -> Result<bool, RoutingError> {
    let sock = open()?;
    let mut query = RuleMessage::default();
    query.header.family = address_family(family);
    let mut found = false;
    sock.exchange(
        RouteNetlinkMessage::GetRule(query),
        NLM_F_REQUEST | netlink_packet_core::NLM_F_DUMP,
        |msg| {
            if let RouteNetlinkMessage::NewRule(r) = msg {
                let attrs = &r.attributes;
                found |= attrs.contains(&RuleAttribute::FwMark(d.mark))
                    && attrs.contains(&RuleAttribute::Table(d.table))
                    && d.mask
                        .is_none_or(|m| attrs.contains(&RuleAttribute::FwMask(m)));
            }
        },
    )
    .map_err(|e| RoutingError::new(format!("ip rule show ({family})"), e))?;
    Ok(found)
}

fn address_family(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

fn passthrough_address() -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet6;
    msg.header.prefix_len = 128;
    msg.header.index = LOOPBACK_IFINDEX;
    let addr = IpAddr::V6(IPV6_PASSTHROUGH);
    msg.attributes = vec![
        AddressAttribute::Local(addr),
        AddressAttribute::Address(addr),
    ];
    msg
}

fn rule(family: Family, d: &LocalDelivery) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = address_family(family);
    msg.header.action = RuleAction::ToTable;
    msg.header.table = d.table as u8;
    msg.attributes = vec![RuleAttribute::FwMark(d.mark), RuleAttribute::Table(d.table)];
    if let Some(mask) = d.mask {
        msg.attributes.push(RuleAttribute::FwMask(mask));
    }
    if let Some(p) = d.priority {
        msg.attributes.push(RuleAttribute::Priority(p));
    }
    msg
}

fn route(family: Family, d: &LocalDelivery) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = address_family(family);
    msg.header.table = d.table as u8;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.scope = RouteScope::Host;
    msg.header.kind = RouteType::Local;
    msg.attributes = vec![
        RouteAttribute::Table(d.table),
        RouteAttribute::Oif(LOOPBACK_IFINDEX),
    ];
    msg
}

/// How long a netlink answer may take before the request counts as failed (the kernel
/// answers at once; this only bounds a broken netns).
const NETLINK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A route netlink socket of the current thread's netns, numbering its requests: every
/// request gets the next sequence number, and only replies that carry it (and come from
/// the kernel) are taken as its answer.
struct Netlink {
    sock: Socket,
    next_seq: std::cell::Cell<u32>,
}

fn open() -> Result<Netlink, RoutingError> {
    let mut sock =
        Socket::new(NETLINK_ROUTE).map_err(|e| RoutingError::new("opening a netlink socket", e))?;
    sock.bind_auto()
        .map_err(|e| RoutingError::new("binding a netlink socket", e))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|e| RoutingError::new("connecting a netlink socket", e))?;
    nix::sys::socket::setsockopt(
        &std::os::fd::AsFd::as_fd(&sock),
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(NETLINK_TIMEOUT.as_secs() as i64, 0),
    )
    .map_err(|e| RoutingError::new("setting a netlink timeout", e.into()))?;
    Ok(Netlink {
        sock,
        next_seq: std::cell::Cell::new(1),
    })
}

impl Netlink {
    /// Sends `inner` with `flags` and reads every reply to it until the request is done:
    /// the ACK (an error message with code 0) of a plain request, or `NLMSG_DONE` of a
    /// dump. Each data message of the answer goes to `each`. Replies with another sequence
    /// number (a stale answer) are skipped.
    ///
    /// Errors: the errno the kernel answered with, a timeout, or undecodable data.
    fn exchange(
        &self,
        inner: RouteNetlinkMessage,
        flags: u16,
        mut each: impl FnMut(RouteNetlinkMessage),
    ) -> std::io::Result<()> {
        let seq = self.next_seq.get();
        self.next_seq.set(seq.wrapping_add(1));
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        loop {
            let (buf, from) = self.sock.recv_from_full()?;
            if from.port_number() != 0 {
                continue; // not from the kernel
            }
            let mut offset = 0;
            while let Some(rest) = buf.get(offset..).filter(|r| !r.is_empty()) {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                    .map_err(|e| invalid(e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(invalid("a netlink message of length 0".into()));
                }
                offset += len;
                if reply.header.sequence_number != seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(_) => Err(e.to_io()),
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::InnerMessage(m) => each(m),
                    _ => {}
                }
            }
        }
    }
}

/// Sends one request and waits for its ACK. An errno equal to `ok_errno` counts as success.
fn request(
    sock: &Netlink,
    inner: RouteNetlinkMessage,
    flags: u16,
    ok_errno: i32,
) -> std::io::Result<()> {
    match sock.exchange(inner, flags, |_| {}) {
        Err(e) if ok_errno != 0 && e.raw_os_error() == Some(ok_errno) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::ScratchNetns;

    /// Many requests on one socket, each answered and matched by its own sequence number:
    /// adds, an add that exists (EEXIST), a dump, deletes, a delete of what is gone
    /// (ENOENT), and a request the kernel refuses, in between. Needs root.
    /// A netns with a veth holding an IPv4 and an IPv6 address (plus the kernel's
    /// link-local one): both pod addresses are found, nothing of `lo`. Needs root.
    #[test]
    fn pod_addresses_are_the_global_ones_off_lo() {
        let scratch = ScratchNetns::create().unwrap();
        let held = scratch.netns();
        held.run(|_| {
            let ip = |args: &[&str]| {
                let out = std::process::Command::new("ip")
                    .args(args)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "ip {args:?}: {out:?}");
            };
            ip(&[
                "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
            ]);
            ip(&["addr", "add", "10.9.0.2/24", "dev", "veth0"]);
            ip(&["addr", "add", "fd00:9::2/64", "dev", "veth0", "nodad"]);
            ip(&["addr", "add", "fe80::2/64", "dev", "veth0", "nodad"]);
            ip(&["link", "set", "veth0", "up"]);
        })
        .unwrap();
        let found = held.run(pod_addresses).unwrap().unwrap();
        assert_eq!(
            found,
            vec![
                "10.9.0.2".parse::<IpAddr>().unwrap(),
                "fd00:9::2".parse().unwrap()
            ]
        );
    }

    /// Ambient's in-pod policy routing, as `ip` shows upstream's: `32764: from all fwmark
    /// 0x111/0xfff lookup 100` and a local default route in table 100, for both families;
    /// checked, then removed. Needs root.
    #[test]
    fn ambient_inpod_policy_routing() {
        let scratch = ScratchNetns::create().unwrap();
        let needs = RoutingNeeds {
            families: vec![Family::V4, Family::V6],
            local_delivery: Some(INPOD_DELIVERY),
            ipv6_passthrough: false,
        };
        scratch
            .netns()
            .run(|inside| {
                apply_needs(inside, &needs).unwrap();
                apply_needs(inside, &needs).unwrap();
                assert!(check_needs(inside, &needs).unwrap().is_empty());
                let ip = |args: &[&str]| {
                    let out = std::process::Command::new("ip")
                        .args(args)
                        .output()
                        .unwrap();
                    String::from_utf8_lossy(&out.stdout).into_owned()
                };
                for v in ["-4", "-6"] {
                    let rules = ip(&[v, "rule", "show"]);
                    assert!(
                        rules.contains("32764:\tfrom all fwmark 0x111/0xfff lookup 100"),
                        "{rules}"
                    );
                    let routes = ip(&[v, "route", "show", "table", "100"]);
                    assert!(routes.starts_with("local default dev lo"), "{routes}");
                }
                assert!(!ip(&["-6", "addr", "show", "dev", "lo"]).contains("::6"));
                remove(inside).unwrap();
                assert_eq!(check_needs(inside, &needs).unwrap().len(), 2);
            })
            .unwrap();
    }

    #[test]
    fn every_request_gets_its_own_answer() {
        let scratch = ScratchNetns::create().unwrap();
        scratch
            .netns()
            .run(|_inside| {
                let sock = open().unwrap();
                let add = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
                for _ in 0..2 {
                    request(
                        &sock,
                        RouteNetlinkMessage::NewRule(rule(Family::V4, &TPROXY_DELIVERY)),
                        add,
                        libc::EEXIST,
                    )
                    .unwrap();
                }
                // A link that does not exist: refused, and the next request still gets
                // its own answer.
                let mut link = LinkMessage::default();
                link.header.index = 999_999;
                let e = request(
                    &sock,
                    RouteNetlinkMessage::SetLink(link),
                    NLM_F_REQUEST | NLM_F_ACK,
                    0,
                )
                .unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
                assert!(has_rule(Family::V4, &TPROXY_DELIVERY).unwrap());
                for _ in 0..2 {
                    request(
                        &sock,
                        RouteNetlinkMessage::DelRule(rule(Family::V4, &TPROXY_DELIVERY)),
                        NLM_F_REQUEST | NLM_F_ACK,
                        libc::ENOENT,
                    )
                    .unwrap();
                }
                assert!(!has_rule(Family::V4, &TPROXY_DELIVERY).unwrap());
                assert_eq!(
                    sock.next_seq.get(),
                    6,
                    "five requests, five sequence numbers"
                );
            })
            .unwrap();
    }
}
