//! ZDS, the protocol in which the node agent hands ztunnel the netns of each ambient pod
//! (istio/ztunnel at `62d8265`: `proto/zds.proto`, `src/inpod/protocol.rs`; istio/istio:
//! `cni/pkg/nodeagent/ztunnelserver_linux.go`).
//!
//! The wire, as upstream speaks it:
//! - a Unix socket of type `SOCK_SEQPACKET`, on which ztunnel connects to the agent;
//! - one protobuf message per packet, no framing of our own;
//! - ztunnel sends [`ZdsHello`] first;
//! - then the agent sends [`WorkloadRequest`]s, one at a time, each answered by one
//!   [`WorkloadResponse`] holding an [`Ack`] (a non-empty `error` is a refusal);
//! - an [`AddWorkload`] carries the pod's netns as exactly one file descriptor in
//!   `SCM_RIGHTS` ancillary data; no other message carries one.
//!
//! The message types are ours, deriving [`prost::Message`] at upstream's field numbers, so
//! the build needs no `protoc` and no copied `.proto`. This module knows packets and
//! descriptors; which pods to send, and when, is decided elsewhere.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use prost::Message as _;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The largest packet the agent reads from ztunnel. ztunnel sends a hello (2 bytes) and
/// acks (an error text at most); 64 KiB leaves room for any error message and bounds what
/// a hostile peer can make the agent hold.
pub const MAX_PACKET: usize = 64 * 1024;

/// `Version` of `zds.proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    /// The zero value; never sent by a correct peer.
    NotUsed = 0,
    /// The only version: what this agent speaks.
    V1 = 1,
}

/// ztunnel's first message on a new connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    /// The protocol version ztunnel speaks ([`Version`]).
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

/// Who the workload is, for ztunnel's identity and logs. Field 4 (`trust_domain`) is
/// reserved upstream and never sent.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct WorkloadInfo {
    /// The pod's name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The pod's namespace.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// The pod's service account.
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// Take this pod into the mesh; its netns travels beside the message in `SCM_RIGHTS`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    /// The pod's UID.
    #[prost(string, tag = "1")]
    pub uid: String,
    /// The pod's identity.
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// In a snapshot only: keep this pod if ztunnel has it, although the agent has no netns
/// for it (the agent could not find it after a restart).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    /// The pod's UID.
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// Take this pod out of the mesh: ztunnel stops its proxy.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    /// The pod's UID (field 2, as upstream numbers it).
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// The snapshot is complete: ztunnel drops every pod it was not sent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotSent {}

/// ztunnel's answer to one request; an empty `error` accepts it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    /// Why ztunnel refused the request; empty when it accepted it.
    #[prost(string, tag = "1")]
    pub error: String,
}

/// What the agent sends.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    /// One of the requests.
    #[prost(oneof = "Request", tags = "1, 5, 2, 3")]
    pub payload: Option<Request>,
}

/// The requests of [`WorkloadRequest`], at upstream's field numbers.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Request {
    /// [`AddWorkload`] (field 1).
    #[prost(message, tag = "1")]
    Add(AddWorkload),
    /// [`KeepWorkload`] (field 5).
    #[prost(message, tag = "5")]
    Keep(KeepWorkload),
    /// [`DelWorkload`] (field 2).
    #[prost(message, tag = "2")]
    Del(DelWorkload),
    /// [`SnapshotSent`] (field 3).
    #[prost(message, tag = "3")]
    SnapshotSent(SnapshotSent),
}

impl Request {
    /// The request's name and pod, for messages: `AddWorkload <uid>`.
    pub fn describe(&self) -> String {
        match self {
            Request::Add(a) => format!("AddWorkload {}", a.uid),
            Request::Keep(k) => format!("KeepWorkload {}", k.uid),
            Request::Del(d) => format!("DelWorkload {}", d.uid),
            Request::SnapshotSent(_) => "SnapshotSent".to_owned(),
        }
    }
}

/// What ztunnel answers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    /// The answer.
    #[prost(oneof = "Response", tags = "1")]
    pub payload: Option<Response>,
}

/// The answers of [`WorkloadResponse`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Response {
    /// [`Ack`] (field 1).
    #[prost(message, tag = "1")]
    Ack(Ack),
}

/// A ZDS exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    /// The socket failed.
    #[error("ztunnel connection: {0}")]
    Io(#[from] std::io::Error),
    /// ztunnel closed the connection.
    #[error("ztunnel closed the connection")]
    Closed,
    /// A packet longer than [`MAX_PACKET`].
    #[error("ztunnel sent a packet over {MAX_PACKET} bytes")]
    Truncated,
    /// A packet that is not the expected protobuf message.
    #[error("ztunnel sent a packet that is not a {what}: {source}")]
    Decode {
        /// The message expected.
        what: &'static str,
        /// prost's error.
        source: prost::DecodeError,
    },
    /// ztunnel sent file descriptors, which it never should; they were closed.
    #[error("ztunnel sent {0} file descriptor(s) with a message; refused")]
    UnexpectedFds(usize),
    /// The hello named a version this agent does not speak.
    #[error("ztunnel speaks ZDS version {0}; this agent speaks V1")]
    Version(i32),
    /// No answer in time.
    #[error("ztunnel did not {what} within {timeout:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The deadline.
        timeout: Duration,
    },
    /// ztunnel refused a request.
    #[error("ztunnel refused {request}: {error}")]
    Nack {
        /// The request.
        request: String,
        /// ztunnel's message.
        error: String,
    },
    /// A packet while no request was waiting for an answer.
    #[error("ztunnel sent a message it was not asked for")]
    Unsolicited,
    /// A response without an answer in it.
    #[error("ztunnel answered {request} with an empty response")]
    EmptyResponse {
        /// The request.
        request: String,
    },
}

/// One ZDS connection with ztunnel: a connected, non-blocking `SOCK_SEQPACKET` socket on
/// the tokio reactor. Its owner sends requests one at a time, as the protocol wants: each
/// waits for its ack (the server gives each connection one task).
#[derive(Debug)]
pub struct ZdsConn {
    fd: AsyncFd<OwnedFd>,
}

/// The credentials of the peer process, from `SO_PEERCRED` at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// The peer's PID (in the agent's PID namespace; 0 when it is not visible there).
    pub pid: i32,
    /// The peer's UID.
    pub uid: u32,
    /// The peer's GID.
    pub gid: u32,
}

impl ZdsConn {
    /// Wraps a connected `SOCK_SEQPACKET` socket (accepted from the listener, or one end of
    /// a `socketpair` in tests); it is made non-blocking. Needs a tokio runtime.
    ///
    /// Errors: the `fcntl` or reactor registration error.
    pub fn new(fd: OwnedFd) -> Result<ZdsConn, ZdsError> {
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(std::io::Error::from)?;
        // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which alone owns it from here:
        // nothing can close or replace the descriptor while it is registered.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(std::io::Error::from)?;
        Ok(ZdsConn { fd })
    }

    /// Who is on the other end (`SO_PEERCRED`), for the connect log line.
    ///
    /// Errors: the `getsockopt` error.
    pub fn peer(&self) -> Result<PeerCred, ZdsError> {
        let c = nix::sys::socket::getsockopt(
            self.fd.get_ref(),
            nix::sys::socket::sockopt::PeerCredentials,
        )
        .map_err(std::io::Error::from)?;
        Ok(PeerCred {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        })
    }

    /// Waits at most `timeout` for ztunnel's [`ZdsHello`] and checks that it speaks V1.
    ///
    /// Errors: [`ZdsError::Timeout`], [`ZdsError::Version`], and those of a read.
    pub async fn hello(&self, timeout: Duration) -> Result<(), ZdsError> {
        let packet = within(timeout, "say hello", self.recv()).await?;
        decode_hello(&packet)
    }

    /// Sends `request` (with `netns` in `SCM_RIGHTS` for an add) and waits at most
    /// `timeout` for ztunnel's ack.
    ///
    /// Errors: [`ZdsError::Nack`] with ztunnel's reason, [`ZdsError::Timeout`],
    /// [`ZdsError::EmptyResponse`], and those of a write or read.
    pub async fn request(
        &self,
        request: Request,
        netns: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<(), ZdsError> {
        let name = request.describe();
        let packet = WorkloadRequest {
            payload: Some(request),
        }
        .encode_to_vec();
        self.send(&packet, netns).await?;
        let packet = within(timeout, &format!("acknowledge {name}"), self.recv()).await?;
        decode_ack(&packet, &name)
    }

    /// Waits until ztunnel sends something it was not asked for, which ends the
    /// connection: returns [`ZdsError::Closed`] when ztunnel hangs up, the read's error,
    /// or [`ZdsError::Unsolicited`] for a packet. Cancel-safe: the idle loop races it with
    /// the next request.
    pub async fn unsolicited(&self) -> ZdsError {
        match self.recv().await {
            Ok(_) => ZdsError::Unsolicited,
            Err(e) => e,
        }
    }

    /// Writes one packet, with `fd` as `SCM_RIGHTS` when given.
    async fn send(&self, packet: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        let fds: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
        loop {
            let mut guard = self.fd.writable().await?;
            let sent = guard.try_io(|inner| {
                let iov = [IoSlice::new(packet)];
                let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() {
                    &[]
                } else {
                    &[ControlMessage::ScmRights(&fds)]
                };
                sendmsg::<UnixAddr>(
                    inner.get_ref().as_raw_fd(),
                    &iov,
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) => {
                    return Err(ZdsError::Closed)
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads one packet. Any descriptor that came with it is closed and the packet
    /// refused; so is a packet over [`MAX_PACKET`].
    async fn recv(&self) -> Result<Vec<u8>, ZdsError> {
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            let mut guard = self.fd.readable().await?;
            let got = guard.try_io(|inner| read_packet(inner.get_ref().as_fd(), &mut buf));
            match got {
                Ok(Ok(Ok(n))) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        }
    }
}

/// ztunnel's hello, from one packet: a [`ZdsHello`] naming [`Version::V1`].
///
/// Errors: [`ZdsError::Decode`], [`ZdsError::Version`].
pub fn decode_hello(packet: &[u8]) -> Result<(), ZdsError> {
    let hello = ZdsHello::decode(packet).map_err(|source| ZdsError::Decode {
        what: "ZdsHello",
        source,
    })?;
    if hello.version != Version::V1 as i32 {
        return Err(ZdsError::Version(hello.version));
    }
    Ok(())
}

/// ztunnel's answer to the request described as `request`, from one packet: `Ok` for an
/// ack with no error.
///
/// Errors: [`ZdsError::Decode`], [`ZdsError::Nack`] with ztunnel's reason,
/// [`ZdsError::EmptyResponse`].
pub fn decode_ack(packet: &[u8], request: &str) -> Result<(), ZdsError> {
    let response = WorkloadResponse::decode(packet).map_err(|source| ZdsError::Decode {
        what: "WorkloadResponse",
        source,
    })?;
    match response.payload {
        Some(Response::Ack(Ack { error })) if error.is_empty() => Ok(()),
        Some(Response::Ack(Ack { error })) => Err(ZdsError::Nack {
            request: request.to_owned(),
            error,
        }),
        None => Err(ZdsError::EmptyResponse {
            request: request.to_owned(),
        }),
    }
}

/// One `recvmsg` into `buf`: the packet's length, or what is wrong with the packet. An
/// I/O error (`WouldBlock` among them, so that the reactor's `try_io` waits again) is the
/// outer error.
fn read_packet(fd: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<Result<usize, ZdsError>> {
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = match recvmsg::<UnixAddr>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    ) {
        Ok(msg) => msg,
        // ztunnel went away with requests of ours unread.
        Err(nix::Error::ECONNRESET) => return Ok(Err(ZdsError::Closed)),
        Err(e) => return Err(e.into()),
    };
    let mut fds = 0;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(received) = c {
                for raw in received {
                    // SAFETY: the kernel just installed this descriptor in our table for
                    // us; nothing else owns it. It is closed at once.
                    drop(unsafe { OwnedFd::from_raw_fd(raw) });
                    fds += 1;
                }
            }
        }
    }
    if msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
    {
        return Ok(Err(ZdsError::Truncated));
    }
    if fds > 0 {
        return Ok(Err(ZdsError::UnexpectedFds(fds)));
    }
    let n = msg.bytes;
    if n == 0 {
        // SOCK_SEQPACKET: a zero-length read is the peer's orderly shutdown.
        return Ok(Err(ZdsError::Closed));
    }
    Ok(Ok(n))
}

/// `fut`, or [`ZdsError::Timeout`] after `timeout`.
async fn within<T>(
    timeout: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, ZdsError>>,
) -> Result<T, ZdsError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(ZdsError::Timeout {
                what: what.to_owned(),
                timeout,
            })
        })
}

/// A connected `SOCK_SEQPACKET` pair, as the agent's and ztunnel's ends (tests).
#[cfg(test)]
pub(crate) fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        seqpacket_pair()
    }

    /// The bytes upstream's peers put on the wire (the peer kit's README: `ZdsHello{V1}` is
    /// `08 01`, an empty ack `0a 00`, `SnapshotSent` `1a 00`; `DelWorkload` uses field 2).
    #[test]
    fn encodings_match_upstreams_wire() {
        assert_eq!(ZdsHello { version: 1 }.encode_to_vec(), [0x08, 0x01]);
        let ack = WorkloadResponse {
            payload: Some(Response::Ack(Ack::default())),
        };
        assert_eq!(ack.encode_to_vec(), [0x0a, 0x00]);
        let snap = WorkloadRequest {
            payload: Some(Request::SnapshotSent(SnapshotSent {})),
        };
        assert_eq!(snap.encode_to_vec(), [0x1a, 0x00]);
        let del = WorkloadRequest {
            payload: Some(Request::Del(DelWorkload { uid: "u".into() })),
        };
        // field 2 (del), length 3: DelWorkload{ field 2 (uid), length 1, "u" }.
        assert_eq!(del.encode_to_vec(), [0x12, 0x03, 0x12, 0x01, b'u']);
        let keep = WorkloadRequest {
            payload: Some(Request::Keep(KeepWorkload { uid: "u".into() })),
        };
        assert_eq!(keep.encode_to_vec(), [0x2a, 0x03, 0x0a, 0x01, b'u']);
        let add = WorkloadRequest {
            payload: Some(Request::Add(AddWorkload {
                uid: "u".into(),
                workload_info: Some(WorkloadInfo {
                    name: "n".into(),
                    namespace: "s".into(),
                    service_account: "a".into(),
                }),
            })),
        };
        let decoded = WorkloadRequest::decode(add.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, add);
    }

    /// A fake ztunnel end: reads one packet (and its descriptors), answers with `answer`.
    fn ztunnel_reads(fd: &OwnedFd) -> (Vec<u8>, Vec<OwnedFd>) {
        let mut buf = vec![0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<UnixAddr>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())
            .unwrap();
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(r) = c {
                // SAFETY: descriptors the kernel just installed for this test; owned here.
                fds.extend(r.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        let n = msg.bytes;
        (buf[..n].to_vec(), fds)
    }

    fn ztunnel_sends(fd: &OwnedFd, bytes: &[u8], with_fd: Option<RawFd>) {
        let iov = [IoSlice::new(bytes)];
        let fds: Vec<RawFd> = with_fd.into_iter().collect();
        let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&fds)]
        };
        sendmsg::<UnixAddr>(fd.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None).unwrap();
    }

    #[tokio::test]
    async fn hello_add_with_the_netns_fd_and_ack() {
        let (agent, ztunnel) = pair();
        let conn = ZdsConn::new(agent).unwrap();
        assert_eq!(conn.peer().unwrap().pid, std::process::id() as i32);
        ztunnel_sends(&ztunnel, &[0x08, 0x01], None);
        conn.hello(Duration::from_secs(5)).await.unwrap();
        let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let side = std::thread::spawn(move || {
            let (bytes, fds) = ztunnel_reads(&ztunnel);
            ztunnel_sends(&ztunnel, &[0x0a, 0x00], None);
            (bytes, fds, ztunnel)
        });
        let add = Request::Add(AddWorkload {
            uid: "uid-1".into(),
            workload_info: None,
        });
        conn.request(add.clone(), Some(netns.as_fd()), Duration::from_secs(5))
            .await
            .unwrap();
        let (bytes, fds, _ztunnel) = side.join().unwrap();
        assert_eq!(
            WorkloadRequest::decode(bytes.as_slice()).unwrap().payload,
            Some(add)
        );
        assert_eq!(fds.len(), 1, "exactly one descriptor, the netns");
        let same = |a: &std::fs::File, b: &OwnedFd| {
            let (x, y) = (
                nix::sys::stat::fstat(a).unwrap(),
                nix::sys::stat::fstat(b).unwrap(),
            );
            (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)
        };
        assert!(same(&netns, &fds[0]), "the descriptor is the netns sent");
    }

    #[tokio::test]
    async fn nack_timeout_close_and_hostile_packets() {
        // A refusal carries ztunnel's reason.
        let (agent, ztunnel) = pair();
        let conn = ZdsConn::new(agent).unwrap();
        let nack = WorkloadResponse {
            payload: Some(Response::Ack(Ack {
                error: "no such netns".into(),
            })),
        }
        .encode_to_vec();
        let side = std::thread::spawn(move || {
            ztunnel_reads(&ztunnel);
            ztunnel_sends(&ztunnel, &nack, None);
            ztunnel
        });
        let del = Request::Del(DelWorkload { uid: "u".into() });
        let e = conn
            .request(del.clone(), None, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ZdsError::Nack { error, .. } if error == "no such netns"),
            "{e}"
        );
        let ztunnel = side.join().unwrap();

        // No answer: a timeout that names the request.
        let e = conn
            .request(del.clone(), None, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("acknowledge DelWorkload u"), "{e}");

        // A descriptor from ztunnel is closed and refused.
        let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
        ztunnel_sends(&ztunnel, &[0x0a, 0x00], Some(netns.as_raw_fd()));
        let e = conn.hello(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(e, ZdsError::UnexpectedFds(1)), "{e}");

        // Garbage, an oversized packet, a wrong version.
        ztunnel_sends(&ztunnel, &[0xff, 0xff, 0xff], None);
        assert!(matches!(
            conn.hello(Duration::from_secs(5)).await,
            Err(ZdsError::Decode { .. })
        ));
        ztunnel_sends(&ztunnel, &vec![0u8; MAX_PACKET + 1], None);
        assert!(matches!(
            conn.hello(Duration::from_secs(5)).await,
            Err(ZdsError::Truncated)
        ));
        ztunnel_sends(&ztunnel, &[0x08, 0x02], None);
        assert!(matches!(
            conn.hello(Duration::from_secs(5)).await,
            Err(ZdsError::Version(2))
        ));

        // ztunnel goes away.
        drop(ztunnel);
        assert!(matches!(
            conn.hello(Duration::from_secs(5)).await,
            Err(ZdsError::Closed)
        ));
        assert!(matches!(
            conn.request(del, None, Duration::from_secs(5)).await,
            Err(ZdsError::Closed)
        ));
    }
}
