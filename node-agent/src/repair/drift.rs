//! Drift seen when it happens: the kernel says when a pod's rules change, and the repair
//! loop checks that pod at once instead of at its next sweep.
//!
//! - **nf_tables** (the nftables backend, `iptables-nft`, and ambient's in-pod rules on
//!   either): one netlink socket per watched pod, opened inside its netns and subscribed
//!   to `NFNLGRP_NFTABLES` ([`nft_wire::subscribe`]), all on the agent's tokio reactor.
//!   Every commit in that netns is announced object by object, each naming its table,
//!   then ends with an `NFT_MSG_NEWGEN` naming its writer ([`nft_wire::notices`]). A
//!   commit counts when it touched one of our `inet` tables or any `ip`/`ip6` table
//!   (iptables-nft's), and was not written by our own code in-process (the thread name
//!   [`istio_cni::netns::THREAD_NAME`]: the plugin's and this agent's nftables writes;
//!   `iptables-restore`, which both run for the iptables backend, has its own name, so
//!   such a write costs one extra check). A counted commit, or a lost notification
//!   (`ENOBUFS`), makes the pod due after [`DEBOUNCE`], so that a burst of commits costs
//!   one check, and at most once per [`MIN_INTERVAL`]: a workload that rewrites its own
//!   `ip`/`ip6` tables (or ours) in a loop costs one check a second, not one per commit.
//!   Changes to a workload's own `inet`, `arp`, `bridge` or `netdev` tables cost nothing.
//! - **Legacy iptables** (x_tables) announces nothing. For a pod whose netns holds legacy
//!   tables, a raw socket in its netns is kept, and every [`LEGACY_POLL`] each of those
//!   tables' `IPT_SO_GET_INFO` (`IP6T_SO_GET_INFO` for IPv6; hooks, entry count, size: a few
//!   microseconds, `linux/netfilter_ipv4/ip_tables.h`) is compared with the last one; a
//!   difference makes the pod due. So a flush is seen within 1 s. A rewrite that keeps
//!   every table's entry count and size (one port number changed) is not: the sweep
//!   finds it. Only tables that exist when the watch starts are asked (asking for a
//!   missing one would make the kernel create it in the pod's netns). The calls run on
//!   tokio's blocking pool: they take x_tables' lock, which a table replace elsewhere
//!   on the node holds for an RCU grace period.
//!
//! A socket holds its netns alive. A pod's watch is closed when the pod is deleted, gets a
//! deletion timestamp or a terminal phase, stops being one the repair loop checks (it
//! left the mesh, or a sweep no longer lists it), or a check finds it in another netns
//! (its sandbox was recreated) or in none, so no netns outlives its pod because of us,
//! longer than until the next sweep. Watches are opened after the pass's repairs, and a
//! broken pod's legacy tables are listed again then: one a repair created gets polled
//! too (the pod's nf_tables watch stays as it was).
//! A netns with neither nf_tables nor legacy tables gets no watch. Only a
//! netns found through a process of the pod is watched: one found by its pinned file
//! alone may be a new pod's before its first process starts. A watch whose socket
//! failed is opened again by the next check. The periodic sweep stays, as the safety
//! net for everything above.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use istio_cni::netns::{Inside, Netns, NetnsId};
use istio_cni::nft_wire;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::ObjectRef;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// How long after a foreign commit the pod is checked: commits within it (a script of
/// several `nft` or `iptables` calls) are taken in the same check.
pub const DEBOUNCE: Duration = Duration::from_millis(10);

/// The shortest time between two checks a pod's nf_tables watch asks for: commits that
/// come sooner after one are taken by the next, [`MIN_INTERVAL`] after it. Bounds what a
/// workload that commits in a loop costs the agent (each check locates the pod's netns
/// and reads its rules back). The first change after a quiet second is still seen within
/// [`DEBOUNCE`].
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// How often a legacy-iptables pod's tables are asked whether they changed.
pub const LEGACY_POLL: Duration = Duration::from_secs(1);

/// The watches of this node's pods, owned by the repair loop; each runs as a task that
/// sends its pod on the channel when its rules may have changed.
pub struct DriftWatch {
    tx: mpsc::UnboundedSender<ObjectRef<Pod>>,
    watches: HashMap<String, Watch>,
}

/// One pod's watch: its netns, and its tasks (aborted, and their sockets closed, on drop).
struct Watch {
    netns: NetnsId,
    /// The nf_tables notifications' task.
    nftables: Option<AbortHandle>,
    /// Per family, the legacy tables polled and their task.
    legacy: Vec<(Family, Vec<String>, AbortHandle)>,
}

impl Watch {
    fn tasks(&self) -> impl Iterator<Item = &AbortHandle> {
        self.nftables
            .iter()
            .chain(self.legacy.iter().map(|(_, _, t)| t))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        for t in self.tasks() {
            t.abort();
        }
    }
}

/// What [`open`] opened in a pod's netns.
pub struct Sockets {
    /// Subscribed to nf_tables commits; `None` when the kernel has no nf_tables.
    nftables: Option<OwnedFd>,
    /// A raw socket per family with legacy tables, and those tables' names.
    legacy: Vec<(Family, OwnedFd, Vec<String>)>,
}

/// IPv4 (`ip_tables`) or IPv6 (`ip6_tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// Opens, from inside a pod's netns, what watching it needs: the nf_tables subscription,
/// and for each family whose legacy tables the netns holds
/// (`/proc/thread-self/net/ip{,6}_tables_names`) a raw socket to ask them.
///
/// Errors: the socket calls' (a raw socket needs `CAP_NET_RAW`).
pub fn open(inside: &Inside<'_>) -> std::io::Result<Sockets> {
    let nftables = match nft_wire::subscribe(inside) {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::debug!("repair: no nf_tables notifications in this netns: {e}");
            None
        }
    };
    let mut legacy = Vec::new();
    for (family, names, domain) in [
        (
            Family::V4,
            "ip_tables_names",
            nix::sys::socket::AddressFamily::Inet,
        ),
        (
            Family::V6,
            "ip6_tables_names",
            nix::sys::socket::AddressFamily::Inet6,
        ),
    ] {
        let tables: Vec<String> = std::fs::read_to_string(format!("/proc/thread-self/net/{names}"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty() && l.len() < TABLE_NAME_LEN)
            .collect();
        if tables.is_empty() {
            continue;
        }
        let fd = nix::sys::socket::socket(
            domain,
            nix::sys::socket::SockType::Raw,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            nix::sys::socket::SockProtocol::Raw,
        )?;
        legacy.push((family, fd, tables));
    }
    Ok(Sockets { nftables, legacy })
}

impl DriftWatch {
    /// No watches yet; due pods arrive on the returned receiver.
    pub fn new() -> (DriftWatch, mpsc::UnboundedReceiver<ObjectRef<Pod>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            DriftWatch {
                tx,
                watches: HashMap::new(),
            },
            rx,
        )
    }

    /// Whether pod `uid` is watched in `netns` already, with every task of its watch
    /// still running.
    pub fn watches(&self, uid: &str, netns: NetnsId) -> bool {
        self.watches
            .get(uid)
            .is_some_and(|w| w.netns == netns && !w.tasks().any(AbortHandle::is_finished))
    }

    /// How many pods are watched.
    pub fn watched(&self) -> usize {
        self.watches.len()
    }

    /// Starts watching pod `key` (`uid`) in `netns` with `sockets` ([`open`]).
    ///
    /// A watch of the pod in that netns whose tasks all run is kept, with its nf_tables
    /// task (and so its pace and whatever it has read): only a family whose legacy
    /// tables it does not poll yet (ones a repair just created) gets a new poll, and the
    /// pod is then made due once, since a change before the poll's first answer would
    /// not be seen. Any other watch of the pod is replaced. With nothing to watch (no
    /// nf_tables, no legacy table), the pod has no watch, and the next check tries
    /// again. Must run inside the tokio runtime.
    pub fn start(&mut self, key: ObjectRef<Pod>, uid: &str, netns: NetnsId, sockets: Sockets) {
        if let Some(w) = self.watches.get_mut(uid) {
            if w.netns == netns && !w.tasks().any(AbortHandle::is_finished) {
                let mut added = false;
                for (family, fd, tables) in sockets.legacy {
                    if w.legacy
                        .iter()
                        .any(|(f, t, _)| *f == family && *t == tables)
                    {
                        continue;
                    }
                    w.legacy.retain(|(f, _, task)| {
                        let keep = *f != family;
                        if !keep {
                            task.abort();
                        }
                        keep
                    });
                    let task = spawn_poll(&self.tx, fd, family, tables.clone(), &key);
                    w.legacy.push((family, tables, task));
                    added = true;
                }
                if added {
                    log::debug!("repair: {key}: polling its new legacy tables too");
                    let _ = self.tx.send(key);
                }
                return;
            }
        }
        self.watches.remove(uid);
        let mut nftables = None;
        if let Some(fd) = sockets.nftables {
            // SAFETY: the `OwnedFd` moves into the `AsyncFd` and stays open, the same
            // socket, until the `AsyncFd` (owned by the task) is dropped.
            match unsafe { AsyncFd::register(fd) } {
                Ok(fd) => {
                    let task = tokio::spawn(notifications(fd, key.clone(), self.tx.clone()));
                    nftables = Some(task.abort_handle());
                }
                Err(e) => log::warn!("repair: {key}: cannot watch nf_tables: {e}"),
            }
        }
        let legacy: Vec<_> = sockets
            .legacy
            .into_iter()
            .map(|(family, fd, tables)| {
                let task = spawn_poll(&self.tx, fd, family, tables.clone(), &key);
                (family, tables, task)
            })
            .collect();
        if nftables.is_none() && legacy.is_empty() {
            return;
        }
        log::debug!("repair: {key}: watching its rules for drift");
        self.watches.insert(
            uid.to_owned(),
            Watch {
                netns,
                nftables,
                legacy,
            },
        );
    }

    /// Stops watching pod `uid` and closes its sockets.
    pub fn forget(&mut self, uid: &str) {
        self.watches.remove(uid);
    }

    /// Keeps only the watches of pods `live` says are still there.
    pub fn retain(&mut self, live: impl Fn(&str) -> bool) {
        self.watches.retain(|uid, _| live(uid));
    }
}

/// Starts polling `tables` of `family` through `fd` for pod `key` ([`poll_legacy`]).
fn spawn_poll(
    tx: &mpsc::UnboundedSender<ObjectRef<Pod>>,
    fd: OwnedFd,
    family: Family,
    tables: Vec<String>,
    key: &ObjectRef<Pod>,
) -> AbortHandle {
    tokio::spawn(poll_legacy(fd, family, tables, key.clone(), tx.clone())).abort_handle()
}

/// Waits for nf_tables commits on `fd` and sends `key` after each burst of commits that
/// are not our own, at most once per [`MIN_INTERVAL`].
async fn notifications(
    fd: AsyncFd<OwnedFd>,
    key: ObjectRef<Pod>,
    tx: mpsc::UnboundedSender<ObjectRef<Pod>>,
) {
    // Commit ends (`NFT_MSG_NEWGEN`) are small, and each notification is a datagram of
    // its own: a longer one (a big rule) is cut short, which loses nothing needed here.
    let mut buf = vec![0u8; 8 * 1024];
    let mut filter = CommitFilter::default();
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        match drain(&fd, &mut buf, &mut filter).await {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                log::warn!("repair: {key}: nf_tables notifications lost: {e}; the sweep remains");
                return;
            }
        }
        // Let the burst end, and keep to the pace: what came meanwhile is part of this
        // check, except a commit still being announced, whose end counts on its own.
        let now = tokio::time::Instant::now();
        let pace = last_sent.map_or(now, |t| t + MIN_INTERVAL);
        tokio::time::sleep_until(pace.max(now + DEBOUNCE)).await;
        while let Ok(n) = nix::sys::socket::recv(
            fd.get_ref().as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            filter.absorb(nft_wire::notices(&buf[..n]));
        }
        log::debug!("repair: {key}: its netns's nf_tables changed; checking it");
        last_sent = Some(tokio::time::Instant::now());
        if tx.send(key.clone()).is_err() {
            return;
        }
    }
}

/// Which of a netns's nf_tables commits call for a check, read from its notifications
/// ([`nft_wire::notices`]): each object a commit touched is announced first, naming its
/// table, then the commit's end (`NFT_MSG_NEWGEN`) naming its writer. A commit counts
/// when it touched a table that [`matters`] and its writer is not our own code
/// ([`istio_cni::netns::THREAD_NAME`]). A commit's announcement may span two reads.
#[derive(Debug, Default)]
struct CommitFilter {
    /// Whether the commit being announced has touched a table that matters so far.
    touched: bool,
}

impl CommitFilter {
    /// Reads `notices` (of one datagram); returns whether a commit that counts ended in
    /// them.
    fn feed(&mut self, notices: Vec<nft_wire::Notice>) -> bool {
        let mut counted = false;
        for notice in notices {
            match notice {
                nft_wire::Notice::Touched { family, table } => {
                    self.touched |= matters(family, &table);
                }
                nft_wire::Notice::Commit(c) => {
                    counted |= self.touched && c.name != istio_cni::netns::THREAD_NAME;
                    self.touched = false;
                }
            }
        }
        counted
    }

    /// Reads `notices` as part of a burst already counted: the commits that end in them
    /// are taken by the check under way, and only one still being announced carries on.
    fn absorb(&mut self, notices: Vec<nft_wire::Notice>) {
        self.feed(notices);
    }

    /// Some notifications were lost (`ENOBUFS`): what was being announced is unknown.
    fn lost(&mut self) {
        self.touched = false;
    }
}

/// Whether a change to table `table` of family `family` may touch a pod's redirection:
/// one of our `inet` tables, or an `ip`/`ip6` table (iptables-nft's, where the iptables
/// backend's rules live and a bypass ahead of them would be).
fn matters(family: u8, table: &str) -> bool {
    match family {
        istio_cni::nft::NFPROTO_INET => istio_cni::rules::nftables::is_our_table(table),
        istio_cni::nft::NFPROTO_IPV4 | istio_cni::nft::NFPROTO_IPV6 => true,
        _ => false,
    }
}

/// Reads everything `fd` has once it is readable. Returns whether any of it ends a
/// commit that counts ([`CommitFilter`]), or is a loss (`ENOBUFS`: the socket's buffer
/// overflowed, so such a commit may be among what was dropped).
///
/// Errors: any other socket error.
async fn drain(
    fd: &AsyncFd<OwnedFd>,
    buf: &mut [u8],
    filter: &mut CommitFilter,
) -> std::io::Result<bool> {
    let mut guard = fd.readable().await?;
    let mut changed = false;
    loop {
        let got = guard.try_io(|fd| {
            nix::sys::socket::recv(
                fd.as_raw_fd(),
                buf,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            )
            .map_err(std::io::Error::from)
        });
        match got {
            Ok(Ok(n)) => changed |= filter.feed(nft_wire::notices(&buf[..n])),
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                filter.lost();
                changed = true;
            }
            Ok(Err(e)) => return Err(e),
            // Would block: all read.
            Err(_) => return Ok(changed),
        }
    }
}

/// `IPT_SO_GET_INFO` / `IP6T_SO_GET_INFO` (`IPT_BASE_CTL`).
const SO_GET_INFO: libc::c_int = 64;
/// `XT_TABLE_MAXNAMELEN`.
const TABLE_NAME_LEN: usize = 32;
/// `NF_INET_NUMHOOKS`.
const NUMHOOKS: usize = 5;

/// `struct ipt_getinfo` (and `ip6t_getinfo`, the same layout).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
struct GetInfo {
    name: [u8; TABLE_NAME_LEN],
    valid_hooks: u32,
    hook_entry: [u32; NUMHOOKS],
    underflow: [u32; NUMHOOKS],
    num_entries: u32,
    size: u32,
}

/// One legacy table's `GET_INFO` through `fd` (a raw socket in the pod's netns).
///
/// Errors: the call's (`ENOENT` when the table is gone).
fn get_info(fd: &OwnedFd, family: Family, table: &str) -> std::io::Result<GetInfo> {
    let mut info = GetInfo {
        name: [0; TABLE_NAME_LEN],
        valid_hooks: 0,
        hook_entry: [0; NUMHOOKS],
        underflow: [0; NUMHOOKS],
        num_entries: 0,
        size: 0,
    };
    let n = table.len().min(TABLE_NAME_LEN - 1);
    info.name[..n].copy_from_slice(&table.as_bytes()[..n]);
    let level = match family {
        Family::V4 => libc::SOL_IP,
        Family::V6 => libc::SOL_IPV6,
    };
    let mut len = std::mem::size_of::<GetInfo>() as libc::socklen_t;
    // SAFETY: `info` is a live `ipt_getinfo` of `len` bytes, which the kernel reads the
    // table name from and fills in.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            SO_GET_INFO,
            (&mut info as *mut GetInfo).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}

/// Asks `tables` of `family` through `fd` every [`LEGACY_POLL`] and sends `key` when any
/// differs from the time before.
async fn poll_legacy(
    fd: OwnedFd,
    family: Family,
    tables: Vec<String>,
    key: ObjectRef<Pod>,
    tx: mpsc::UnboundedSender<ObjectRef<Pod>>,
) {
    let fd = Arc::new(fd);
    let tables = Arc::new(tables);
    // Off the async workers: the call takes x_tables' per-family lock.
    let ask = || {
        let (fd, tables) = (fd.clone(), tables.clone());
        tokio::task::spawn_blocking(move || -> Vec<Option<GetInfo>> {
            tables
                .iter()
                .map(|t| get_info(&fd, family, t).ok())
                .collect()
        })
    };
    let Ok(mut last) = ask().await else {
        return;
    };
    let mut tick = tokio::time::interval(LEGACY_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Ok(now) = ask().await else {
            return;
        };
        if now != last {
            last = now;
            log::debug!("repair: {key}: its legacy {family:?} tables changed; checking it");
            if tx.send(key.clone()).is_err() {
                return;
            }
        }
    }
}

/// Opens the watch sockets of each of `pods` (key, UID, netns), each from a thread inside
/// its netns. Blocking. A pod whose sockets cannot be opened is left to the sweep.
pub fn open_all(
    pods: Vec<(ObjectRef<Pod>, String, Arc<Netns>)>,
) -> Vec<(ObjectRef<Pod>, String, NetnsId, Sockets)> {
    pods.into_iter()
        .filter_map(|(key, uid, netns)| match netns.run(open) {
            Ok(Ok(sockets)) => Some((key, uid, netns.id(), sockets)),
            Ok(Err(e)) => {
                log::warn!("repair: {key}: cannot watch its rules: {e}; the sweep remains");
                None
            }
            Err(e) => {
                log::debug!("repair: {key}: cannot enter its netns to watch it: {e}");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use istio_cni::nft::{NFPROTO_INET, NFPROTO_IPV4};
    use istio_cni::rules::nftables::NAT_TABLE;
    use nft_wire::{Commit, Notice};

    fn touched(family: u8, table: &str) -> Notice {
        Notice::Touched {
            family,
            table: table.into(),
        }
    }

    fn end(writer: &str) -> Notice {
        Notice::Commit(Commit {
            pid: 4242,
            name: writer.into(),
        })
    }

    #[test]
    fn a_foreign_commit_to_tables_that_matter_counts_and_nothing_else_does() {
        let mut f = CommitFilter::default();
        // iptables-nft flushing the pod's nat table.
        assert!(f.feed(vec![touched(NFPROTO_IPV4, "nat"), end("iptables-nft")]));
        // `nft flush ruleset` over our inet table.
        assert!(f.feed(vec![touched(NFPROTO_INET, NAT_TABLE), end("nft")]));
        // A workload's own inet table, as often as it likes.
        for _ in 0..100 {
            assert!(!f.feed(vec![touched(NFPROTO_INET, "app"), end("nft")]));
        }
        // Our own writes, in the plugin or the agent.
        assert!(!f.feed(vec![
            touched(NFPROTO_INET, NAT_TABLE),
            end(istio_cni::netns::THREAD_NAME),
        ]));
        // A commit that touched nothing of a table (a generation bump alone).
        assert!(!f.feed(vec![end("nft")]));
    }

    #[test]
    fn a_commit_announced_over_two_reads_counts_once_at_its_end() {
        let mut f = CommitFilter::default();
        assert!(!f.feed(vec![touched(NFPROTO_IPV4, "nat")]));
        assert!(f.feed(vec![touched(NFPROTO_INET, "app"), end("iptables-nft")]));
        // The next commit starts clean.
        assert!(!f.feed(vec![touched(NFPROTO_INET, "app"), end("nft")]));
    }

    #[test]
    fn a_burst_already_counted_absorbs_its_commits_but_not_one_still_announced() {
        let mut f = CommitFilter::default();
        // Within the debounce: one whole commit (taken by the check under way), then the
        // start of another whose end comes after it.
        f.absorb(vec![
            touched(NFPROTO_IPV4, "nat"),
            end("iptables-nft"),
            touched(NFPROTO_IPV4, "filter"),
        ]);
        assert!(f.feed(vec![end("iptables-nft")]));
    }

    #[test]
    fn lost_notifications_forget_what_was_being_announced() {
        let mut f = CommitFilter::default();
        assert!(!f.feed(vec![touched(NFPROTO_IPV4, "nat")]));
        f.lost();
        assert!(!f.feed(vec![end("iptables-nft")]));
    }
}
