//! Built-in validation, the replacement for the `istio-validation` init container.
//!
//! 1. **Read-back** ([`read_back`]): `iptables-save` per family, and every expected rule
//!    must be there. Our chains must hold exactly the expected rules in order; in built-in
//!    chains our rules must appear in order (other software may have rules there too), and
//!    no rule of other software ahead of one of ours may be able to take traffic around it
//!    ([`CanonRule::can_divert`]). The tables we write into must not be dormant (the
//!    kernel's nf_tables table flags: iptables-save does not show them). The TPROXY policy
//!    rule must exist.
//! 2. **Loopback probe** ([`probe`]): listen on the inbound capture port (15006) on
//!    loopback, connect to `127.0.0.6:15002` (or `[::6]:15002`; the port moves up when the
//!    pod excludes 15002 from capture) from a socket created with
//!    the proxy's fsuid, and require the connection to arrive at the listener with
//!    `SO_ORIGINAL_DST` naming the probe port. This is the check upstream's init container
//!    makes (`tools/istio-iptables/pkg/validation`), done in milliseconds inside the CNI
//!    call; no packet leaves loopback.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6};
use nix::unistd::{setfsuid, Uid};

use crate::apply::{ApplyError, Xtables};
use crate::netns::Inside;
use crate::rules::canon::{CanonRule, SavedRule};
use crate::rules::iptables::INBOUND_CAPTURE_PORT;
use crate::rules::{is_own_chain, Family, FamilyRules, Ruleset};

/// Validation failed: the rules are not as ADD meant them.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// The rules could not be read back.
    #[error("cannot read the rules back: {0}")]
    ReadBack(#[source] ApplyError),
    /// Rules read back differ from the expected ones.
    #[error("read-back found {} problem(s): {}", .0.len(), .0.join("; "))]
    Mismatch(Vec<String>),
    /// The loopback probe did not see a redirected connection.
    #[error("loopback probe ({family}) failed: {reason}")]
    Probe {
        /// The family probed.
        family: Family,
        /// What went wrong.
        reason: String,
    },
}

/// Compares the netns's rules (and routing) with `ruleset`.
///
/// Errors: [`ValidateError::ReadBack`] when `iptables-save` fails,
/// [`ValidateError::Mismatch`] listing every missing or wrong rule.
pub fn read_back(
    inside: &Inside<'_>,
    xt: &Xtables,
    ruleset: &Ruleset,
) -> Result<(), ValidateError> {
    let mut problems = Vec::new();
    for f in &ruleset.families {
        let saved = xt
            .binaries(f.family)
            .and_then(|b| b.save(inside))
            .map_err(ValidateError::ReadBack)?;
        compare_family(f, &saved, &mut problems);
    }
    // Rules that read back as written take no effect in a dormant table (iptables-nft's
    // `ip nat` with `flags dormant`); iptables-save does not show the flag, the kernel
    // does. The legacy backend's rules live in x_tables: nothing there can be dormant.
    let legacy = xt.backend() == crate::apply::Backend::Legacy;
    if let Some(Ok(tables)) = (!legacy).then(|| crate::nft::tables(inside)) {
        problems.extend(crate::nft::dormant_problems(&tables, |t| {
            crate::apply::is_table_of(ruleset, t)
        }));
    }
    problems.extend(
        crate::routing::check(inside, ruleset)
            .map_err(|e| ValidateError::ReadBack(ApplyError::Routing(e)))?,
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ValidateError::Mismatch(problems))
    }
}

/// Appends to `problems` every difference between `expected` and `saved`.
fn compare_family(
    expected: &FamilyRules,
    saved: &crate::rules::canon::SavedTables,
    problems: &mut Vec<String>,
) {
    let family = expected.family;
    for ((table, chain), rules) in expected.final_chains() {
        let where_ = format!("{family} {}/{chain}", table.name());
        let mut want: Vec<(String, CanonRule)> = Vec::with_capacity(rules.len());
        for r in &rules {
            let line = r.restore_line();
            match CanonRule::parse(&line, family) {
                Ok(canon) => want.push((line, canon)),
                // Our own rule that the canonical form cannot read: a defect, reported as
                // a failed validation (and so rolled back), never a panic.
                Err(e) => problems.push(format!("{where_}: cannot compare our own rule: {e}")),
            }
        }
        if want.len() != rules.len() {
            continue;
        }
        let Some(got) = saved.chain(table, &chain) else {
            problems.push(format!("chain {where_} is missing"));
            continue;
        };
        if is_own_chain(&chain) {
            compare_exact(&where_, &want, got, problems);
        } else {
            compare_subsequence(&where_, &want, got, problems);
        }
    }
}

fn compare_exact(
    where_: &str,
    want: &[(String, CanonRule)],
    got: &[SavedRule],
    problems: &mut Vec<String>,
) {
    for (i, (line, canon)) in want.iter().enumerate() {
        match got.get(i) {
            Some(g) if g.canon.as_ref() == Some(canon) => {}
            Some(g) => {
                problems.push(format!(
                    "{where_} rule {}: found `{}`, expected `{line}`",
                    i + 1,
                    g.line
                ));
                return;
            }
            None => {
                problems.push(format!(
                    "{where_} has {} rule(s), expected {}; first missing: `{line}`",
                    got.len(),
                    want.len()
                ));
                return;
            }
        }
    }
    if let Some(extra) = got.get(want.len()) {
        problems.push(format!("{where_} has unexpected rule `{}`", extra.line));
    }
}

/// Our rules in a built-in chain (`where_`): they must appear in `got` in order, with other
/// software's rules around them; and none of those may sit ahead of one of ours and be
/// able to take packets away from it ([`CanonRule::can_divert`]; a rule we cannot read
/// counts as able). `iptables -t nat -I OUTPUT 1 -p tcp -j RETURN` is such a bypass: all
/// TCP would go around the sidecar while every rule of ours is still in place. One pass
/// over the chain, on the `iptables-save` output the read-back has anyway.
fn compare_subsequence(
    where_: &str,
    want: &[(String, CanonRule)],
    got: &[SavedRule],
    problems: &mut Vec<String>,
) {
    // Index in `got` of each of `want`, in order.
    let mut at = Vec::with_capacity(want.len());
    let mut next = 0;
    for (line, canon) in want {
        match got[next..]
            .iter()
            .position(|g| g.canon.as_ref() == Some(canon))
        {
            Some(k) => {
                at.push(next + k);
                next += k + 1;
            }
            None => {
                problems.push(format!("{where_} lacks `{line}` (or has it out of order)"));
                return;
            }
        }
    }
    for (i, g) in got.iter().enumerate() {
        let later: Vec<usize> = (0..want.len()).filter(|&j| at[j] > i).collect();
        let Some(&first_later) = later.first() else {
            break;
        };
        if at.contains(&i) {
            continue;
        }
        let diverts = match &g.canon {
            Some(c) => c.can_divert(&later.iter().map(|&j| &want[j].1).collect::<Vec<_>>()),
            None => true,
        };
        if diverts {
            problems.push(format!(
                "{where_}: `{}` comes before our `{}` and can take the pod's traffic around the sidecar",
                g.line, want[first_later].0
            ));
        }
    }
}

/// Runs the loopback probe for `family` inside the netns, as the proxy's UID would connect,
/// to `probe_port` (the ruleset's [`probe_port`](crate::rules::Ruleset::probe_port)),
/// waiting at most `timeout`.
///
/// Errors: [`ValidateError::Probe`] saying what failed: the listener, the connection (e.g.
/// refused: not redirected), a connection that did not arrive at the capture port, or an
/// original destination other than the probe target.
pub fn probe(
    _inside: &Inside<'_>,
    family: Family,
    proxy_uid: u32,
    probe_port: u16,
    timeout: Duration,
) -> Result<(), ValidateError> {
    let fail = |reason: String| ValidateError::Probe { family, reason };
    let (loopback, target): (IpAddr, IpAddr) = match family {
        Family::V4 => (
            Ipv4Addr::LOCALHOST.into(),
            Ipv4Addr::new(127, 0, 0, 6).into(),
        ),
        Family::V6 => (
            Ipv6Addr::LOCALHOST.into(),
            crate::routing::IPV6_PASSTHROUGH.into(),
        ),
    };
    let listen_addr = SocketAddr::new(loopback, INBOUND_CAPTURE_PORT);
    let listener = TcpListener::bind(listen_addr).map_err(|e| {
        fail(format!(
            "cannot listen on {listen_addr}: {e} (is the loopback interface up?)"
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(format!("listener: {e}")))?;
    let deadline = Instant::now() + timeout;
    let target = SocketAddr::new(target, probe_port);
    let client = connect_as(proxy_uid, SocketAddr::new(loopback, 0), target, timeout)
        .map_err(|e| fail(format!("connect to {target} as uid {proxy_uid}: {e}")))?;
    let accepted = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Err(fail(format!(
                    "the connection to {target} did not arrive at {listen_addr} within {timeout:?}: not redirected"
                )))
            }
            Err(e) => return Err(fail(format!("accept on {listen_addr}: {e}"))),
        }
    };
    let original =
        original_dst(&accepted, family).map_err(|e| fail(format!("SO_ORIGINAL_DST: {e}")))?;
    // Close the client first, with an RST, so that no TIME_WAIT is left on the capture port.
    drop(client);
    drop(accepted);
    if original != target {
        return Err(fail(format!(
            "the connection arrived with original destination {original}, expected {target}"
        )));
    }
    Ok(())
}

/// Connects from `bind` to `target` with a socket whose owner (the file credentials the
/// iptables owner match reads) is `uid`. The fsuid is changed only on this thread and only
/// while the socket is created.
fn connect_as(
    uid: u32,
    bind: SocketAddr,
    target: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let af = match target {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let previous = setfsuid(Uid::from_raw(uid));
    let fd = socket::socket(af, SockType::Stream, SockFlag::SOCK_CLOEXEC, None);
    setfsuid(previous);
    let fd = fd?;
    socket::setsockopt(
        &fd,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    socket::setsockopt(
        &fd,
        sockopt::SendTimeout,
        &nix::sys::time::TimeVal::from(libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        }),
    )?;
    match (bind, target) {
        (SocketAddr::V4(b), SocketAddr::V4(t)) => {
            socket::bind(fd.as_raw_fd(), &SockaddrIn::from(b))?;
            socket::connect(fd.as_raw_fd(), &SockaddrIn::from(t))?;
        }
        (SocketAddr::V6(b), SocketAddr::V6(t)) => {
            socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(b))?;
            socket::connect(fd.as_raw_fd(), &SockaddrIn6::from(t))?;
        }
        _ => {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                "mixed families",
            ))
        }
    }
    // SAFETY: `fd` is a connected TCP socket that we own; ownership moves to the stream.
    Ok(unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) })
}

/// The original destination of a REDIRECTed connection (`SO_ORIGINAL_DST`).
fn original_dst(s: &TcpStream, family: Family) -> nix::Result<SocketAddr> {
    match family {
        Family::V4 => {
            let a = socket::getsockopt(s, sockopt::OriginalDst)?;
            Ok(SocketAddr::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            ))
        }
        Family::V6 => {
            let a = socket::getsockopt(s, sockopt::Ip6tOriginalDst)?;
            Ok(SocketAddr::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                u16::from_be(a.sin6_port),
            ))
        }
    }
}
