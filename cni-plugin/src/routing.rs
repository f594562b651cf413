//! The routing side of a ruleset, over netlink (no `ip` binary), as upstream Istio's
//! `tools/common/tproxy` sets it up:
//!
//! - TPROXY policy routing: packets marked 1337 are looked up in table 133, whose only
//!   route delivers everything locally through `lo` (`ip rule add fwmark 1337 lookup 133`,
//!   `ip route add local 0.0.0.0/0 dev lo table 133`, and the same with `-6` and `::/0`);
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
use crate::rules::iptables::{TPROXY_MARK, TPROXY_ROUTE_TABLE};
use crate::rules::{Family, Ruleset};

/// The IPv6 inbound passthrough address, `::6`.
pub const IPV6_PASSTHROUGH: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// Interface index of `lo`: always 1 in a network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Sets up what `ruleset` needs: `::6` on `lo` when it has IPv6 rules, and the TPROXY
/// rule and route of each family in TPROXY mode. Entries already present are fine.
///
/// Errors: a message naming the netlink request and the errno.
pub fn apply(_inside: &Inside<'_>, ruleset: &Ruleset) -> Result<(), String> {
    let families: Vec<Family> = ruleset.families.iter().map(|f| f.family).collect();
    if !families.contains(&Family::V6) && !ruleset.tproxy_routing {
        return Ok(());
    }
    let sock = open()?;
    if families.contains(&Family::V6) {
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        request(
            &sock,
            RouteNetlinkMessage::NewAddress(passthrough_address()),
            flags,
            libc::EEXIST,
        )
        .map_err(|e| format!("ip -6 addr add {IPV6_PASSTHROUGH}/128 dev lo: {e}"))?;
    }
    if !ruleset.tproxy_routing {
        return Ok(());
    }
    for family in families {
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        request(
            &sock,
            RouteNetlinkMessage::NewRule(rule(family)),
            flags,
            libc::EEXIST,
        )
        .map_err(|e| {
            format!("ip rule add fwmark {TPROXY_MARK} lookup {TPROXY_ROUTE_TABLE} ({family}): {e}")
        })?;
        request(
            &sock,
            RouteNetlinkMessage::NewRoute(route(family)),
            flags,
            libc::EEXIST,
        )
        .map_err(|e| {
            format!("ip route add local default dev lo table {TPROXY_ROUTE_TABLE} ({family}): {e}")
        })?;
    }
    Ok(())
}

/// Removes the TPROXY rule and route of both families. Missing entries are fine. The `::6`
/// address stays: it is harmless, and the pod's sidecar may be using it.
///
/// Errors: a message naming the netlink request and the errno.
pub fn remove(_inside: &Inside<'_>) -> Result<(), String> {
    let sock = open()?;
    for family in [Family::V4, Family::V6] {
        let flags = NLM_F_REQUEST | NLM_F_ACK;
        for msg in [
            RouteNetlinkMessage::DelRule(rule(family)),
            RouteNetlinkMessage::DelRoute(route(family)),
        ] {
            match request(&sock, msg, flags, libc::ENOENT) {
                Ok(()) => {}
                // Not there: ESRCH for a route in a table that does not exist;
                // EAFNOSUPPORT when IPv6 is disabled in this netns.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::EAFNOSUPPORT)) => {}
                Err(e) => return Err(format!("removing TPROXY routing ({family}): {e}")),
            }
        }
    }
    Ok(())
}

/// What of [`apply`]'s work is missing from the netns, one line per problem (empty when all
/// is in place): the TPROXY rule of each family in TPROXY mode.
///
/// Errors: a message naming the failed netlink dump.
pub fn check(_inside: &Inside<'_>, ruleset: &Ruleset) -> Result<Vec<String>, String> {
    let mut problems = Vec::new();
    if ruleset.tproxy_routing {
        for f in &ruleset.families {
            if !has_tproxy_rule(f.family)? {
                problems.push(format!(
                    "{} policy rule `fwmark {TPROXY_MARK} lookup {TPROXY_ROUTE_TABLE}` is missing",
                    f.family
                ));
            }
        }
    }
    Ok(problems)
}

/// Brings `lo` up (`ip link set lo up`), as a runtime's loopback plugin does in a new
/// sandbox. For netns this process creates itself (the node agent's self-test).
///
/// Errors: a message naming the request and the errno.
pub fn loopback_up(_inside: &Inside<'_>) -> Result<(), String> {
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
    .map_err(|e| format!("ip link set lo up: {e}"))
}

fn has_tproxy_rule(family: Family) -> Result<bool, String> {
    let sock = open()?;
    let mut query = RuleMessage::default();
    query.header.family = address_family(family);
    let mut msg = NetlinkMessage::new(
        netlink_header(NLM_F_REQUEST | netlink_packet_core::NLM_F_DUMP),
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetRule(query)),
    );
    msg.finalize();
    send(&sock, &msg).map_err(|e| format!("dumping ip rules: {e}"))?;
    let mut found = false;
    loop {
        let (buf, _) = sock
            .recv_from_full()
            .map_err(|e| format!("dumping ip rules: {e}"))?;
        let mut offset = 0;
        while let Some(rest) = buf.get(offset..).filter(|r| !r.is_empty()) {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                .map_err(|e| format!("decoding ip rule dump: {e}"))?;
            let len = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => {
                    return Err(format!("dumping ip rules: {}", e.to_io()));
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRule(r)) => {
                    let attrs = &r.attributes;
                    found |= attrs.contains(&RuleAttribute::FwMark(TPROXY_MARK))
                        && attrs.contains(&RuleAttribute::Table(TPROXY_ROUTE_TABLE));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
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

fn rule(family: Family) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = address_family(family);
    msg.header.action = RuleAction::ToTable;
    msg.header.table = TPROXY_ROUTE_TABLE as u8;
    msg.attributes = vec![
        RuleAttribute::FwMark(TPROXY_MARK),
        RuleAttribute::Table(TPROXY_ROUTE_TABLE),
    ];
    msg
}

fn route(family: Family) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = address_family(family);
    msg.header.table = TPROXY_ROUTE_TABLE as u8;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.scope = RouteScope::Host;
    msg.header.kind = RouteType::Local;
    msg.attributes = vec![
        RouteAttribute::Table(TPROXY_ROUTE_TABLE),
        RouteAttribute::Oif(LOOPBACK_IFINDEX),
    ];
    msg
}

fn open() -> Result<Socket, String> {
    let mut sock =
        Socket::new(NETLINK_ROUTE).map_err(|e| format!("cannot open a netlink socket: {e}"))?;
    sock.bind_auto()
        .map_err(|e| format!("cannot bind a netlink socket: {e}"))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|e| format!("cannot connect a netlink socket: {e}"))?;
    Ok(sock)
}

fn netlink_header(flags: u16) -> NetlinkHeader {
    let mut h = NetlinkHeader::default();
    h.flags = flags;
    h.sequence_number = 1;
    h
}

fn send(sock: &Socket, msg: &NetlinkMessage<RouteNetlinkMessage>) -> std::io::Result<()> {
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    sock.send(&buf, 0).map(drop)
}

/// Sends one request and waits for its ACK. An errno equal to `ok_errno` counts as success.
fn request(
    sock: &Socket,
    inner: RouteNetlinkMessage,
    flags: u16,
    ok_errno: i32,
) -> std::io::Result<()> {
    let mut msg = NetlinkMessage::new(netlink_header(flags), NetlinkPayload::InnerMessage(inner));
    msg.finalize();
    send(sock, &msg)?;
    let (buf, _) = sock.recv_from_full()?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) if -code.get() == ok_errno => Ok(()),
            Some(_) => Err(e.to_io()),
        },
        _ => Ok(()),
    }
}
