//! Whether ztunnel serves a pod: its listening sockets in the pod's netns. Upstream only
//! trusts ztunnel's ack (and has had pods annotated `enabled` with no listeners in their
//! netns, istio/istio#57285); the agent looks for them.
//!
//! In-pod mode, ztunnel opens in each pod's netns (peer kit README; ztunnel
//! `src/inpod/`): [`ZTUNNEL_OUTBOUND_PORT`] 15001, [`ZTUNNEL_INBOUND_PLAINTEXT_PORT`]
//! 15006 and [`ZTUNNEL_INBOUND_PORT`] 15008 (HBONE), plus DNS on 127.0.0.1:15053 when DNS
//! capture is on. They are read from `/proc/thread-self/net/tcp` and `tcp6`, which show the
//! sockets of the calling thread's netns: call these from inside it.

use std::collections::BTreeSet;

use istio_cni::netns::Inside;
use istio_cni::rules::ambient::{
    ZTUNNEL_INBOUND_PLAINTEXT_PORT, ZTUNNEL_INBOUND_PORT, ZTUNNEL_OUTBOUND_PORT,
};

/// The ports ztunnel listens on in every pod it serves.
pub const ZTUNNEL_PORTS: [u16; 3] = [
    ZTUNNEL_OUTBOUND_PORT,
    ZTUNNEL_INBOUND_PLAINTEXT_PORT,
    ZTUNNEL_INBOUND_PORT,
];

/// The largest `/proc/net/tcp*` file read: about 150 bytes a socket, so some 100 000
/// sockets; a pod with more is not one ztunnel serves.
const MAX_TABLE: u64 = 16 * 1024 * 1024;

/// `TCP_LISTEN` in the `st` column of `/proc/net/tcp` (`include/net/tcp_states.h`).
const TCP_LISTEN: &str = "0A";

/// The TCP ports with a listening socket in the calling thread's netns, IPv4 and IPv6.
/// A family the kernel does not have (no `tcp6`) counts as none.
///
/// Errors: reading `/proc/thread-self/net/tcp` fails, or it is over 16 MiB.
pub fn listening_ports(_inside: &Inside<'_>) -> std::io::Result<BTreeSet<u16>> {
    use std::io::Read as _;
    let mut ports = BTreeSet::new();
    for (file, required) in [("tcp", true), ("tcp6", false)] {
        let path = format!("/proc/thread-self/net/{file}");
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut text = String::new();
        f.take(MAX_TABLE + 1).read_to_string(&mut text)?;
        if text.len() as u64 > MAX_TABLE {
            return Err(std::io::Error::other(format!(
                "{path} is over {MAX_TABLE} bytes"
            )));
        }
        ports.extend(parse_listening(&text));
    }
    Ok(ports)
}

/// The listening ports of one `/proc/net/tcp`-format table: `local_address` is
/// `ADDR:PORT` in hex, `st` the state.
pub fn parse_listening(table: &str) -> impl Iterator<Item = u16> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let mut cols = line.split_whitespace();
        let local = cols.nth(1)?;
        let state = cols.nth(1)?;
        if state != TCP_LISTEN {
            return None;
        }
        let (_, port) = local.rsplit_once(':')?;
        u16::from_str_radix(port, 16).ok()
    })
}

/// Which of [`ZTUNNEL_PORTS`] have no listener in the calling thread's netns (empty: ztunnel
/// serves the pod).
///
/// Errors: as [`listening_ports`].
pub fn missing_ztunnel_listeners(inside: &Inside<'_>) -> std::io::Result<Vec<u16>> {
    let ports = listening_ports(inside)?;
    Ok(ZTUNNEL_PORTS
        .into_iter()
        .filter(|p| !ports.contains(p))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use istio_cni::scratch::ScratchNetns;

    #[test]
    fn reads_the_kernels_table_format() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:3AAE 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0\n\
   2: 0500000A:9C40 0600000A:3A99 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(parse_listening(table).collect::<Vec<_>>(), [15001, 15022]);
        assert_eq!(parse_listening("header only\n").count(), 0);
        assert_eq!(parse_listening("h\n garbage\n 0: x 0A\n").count(), 0);
    }

    /// Listeners seen from inside a netns are that netns's only. Needs root.
    #[test]
    fn sees_the_listeners_of_the_netns_it_is_in() {
        let scratch = ScratchNetns::create().unwrap();
        let missing = scratch
            .netns()
            .run(|inside| {
                let _a = std::net::TcpListener::bind("0.0.0.0:15001").unwrap();
                let _b = std::net::TcpListener::bind("[::]:15008").unwrap();
                missing_ztunnel_listeners(inside).unwrap()
            })
            .unwrap();
        assert_eq!(missing, [15006]);
        let none_here = scratch
            .netns()
            .run(|inside| missing_ztunnel_listeners(inside).unwrap())
            .unwrap();
        assert_eq!(
            none_here, ZTUNNEL_PORTS,
            "the listeners closed with their thread"
        );
    }
}
