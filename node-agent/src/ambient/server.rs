//! The agent's ZDS server: the ambient pods it knows, and what each ztunnel connection is
//! told about them (istio/istio `cni/pkg/nodeagent/ztunnelserver_linux.go`, as behaviour).
//!
//! - ztunnel connects; the agent reads its hello, then sends a **snapshot**: one
//!   [`AddWorkload`] with the netns for every known pod that has one, one [`KeepWorkload`]
//!   for each known pod without (the agent could not find its netns after a restart), then
//!   [`SnapshotSent`], each acked before the next. ztunnel drops every pod the snapshot
//!   did not name.
//! - The snapshot is taken, and the connection becomes the newest one, under one lock, so a
//!   pod added meanwhile is either in the snapshot or sent after it, never lost and never
//!   sent twice.
//! - Afterwards **adds go to the newest connection** (an upgraded ztunnel takes over from
//!   the old one) and **deletes go to every connection**, each answered by one ack within
//!   the ack deadline.
//! - A connection is dropped when a request to it fails or times out, when ztunnel closes
//!   it, or when ztunnel sends anything unasked.
//!
//! Each connection is one task that owns its [`ZdsConn`]; the rest of the agent talks to
//! it over a channel, so requests to one connection never interleave.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use istio_cni::netns::Netns;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::zds::{
    AddWorkload, DelWorkload, KeepWorkload, PeerCred, Request, SnapshotSent, WorkloadInfo, ZdsConn,
    ZdsError,
};

/// How long ztunnel has to say hello on a new connection.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// An ambient pod as the agent knows it.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The pod's UID.
    pub uid: String,
    /// Its name, namespace and service account.
    pub info: WorkloadInfo,
    /// Its netns, open; `None` when the agent could not find it (sent as
    /// [`KeepWorkload`] in a snapshot, never as an add).
    pub netns: Option<Arc<Netns>>,
}

impl Workload {
    fn snapshot_request(&self) -> Request {
        match self.netns {
            Some(_) => Request::Add(AddWorkload {
                uid: self.uid.clone(),
                workload_info: Some(self.info.clone()),
            }),
            None => Request::Keep(KeepWorkload {
                uid: self.uid.clone(),
            }),
        }
    }
}

/// A request to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// No ztunnel is connected (or none has finished its snapshot).
    #[error("no ztunnel is connected to the ZDS socket; is ztunnel running on this node?")]
    NoZtunnel,
    /// A pod without a netns cannot be added.
    #[error("pod {0} has no netns to hand to ztunnel")]
    NoNetns(String),
    /// The exchange with ztunnel failed; the connection was dropped.
    #[error(transparent)]
    Zds(#[from] ZdsError),
    /// The connection's task ended before it answered.
    #[error("the ztunnel connection closed before answering")]
    Gone,
}

/// One request for a connection's task, and where its outcome goes.
struct Command {
    request: Request,
    netns: Option<Arc<Netns>>,
    reply: oneshot::Sender<Result<(), ZdsError>>,
}

/// A live connection, as the server sees it.
struct Connection {
    id: u64,
    peer: Option<PeerCred>,
    tx: mpsc::Sender<Command>,
    /// ztunnel acked its snapshot.
    synced: bool,
}

/// ztunnel's connections to the server, as counts (see [`ZdsServer::ztunnels`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ztunnels {
    /// Connections past their hello (upstream's `ztunnel_connected` gauge counts these).
    pub connected: usize,
    /// Of those, the connections whose ztunnel acked its snapshot: it serves the pods the
    /// server knows, and takes new ones.
    pub synced: usize,
}

#[derive(Default)]
struct State {
    pods: BTreeMap<String, Workload>,
    /// Oldest first; the last is the newest.
    connections: Vec<Connection>,
    next_id: u64,
}

/// The agent's ZDS server (see the module docs). Cheap to clone: clones share the state.
#[derive(Clone)]
pub struct ZdsServer {
    state: Arc<Mutex<State>>,
    ack_timeout: Duration,
    /// How many snapshots ztunnel connections have acked so far.
    snapshots: Arc<tokio::sync::watch::Sender<u64>>,
    /// The connections, counted; updated under the state lock.
    ztunnels: Arc<tokio::sync::watch::Sender<Ztunnels>>,
}

impl ZdsServer {
    /// A server whose requests must each be acked within `ack_timeout`.
    pub fn new(ack_timeout: Duration) -> ZdsServer {
        ZdsServer {
            state: Arc::new(Mutex::new(State::default())),
            ack_timeout,
            snapshots: Arc::new(tokio::sync::watch::Sender::new(0)),
            ztunnels: Arc::new(tokio::sync::watch::Sender::new(Ztunnels::default())),
        }
    }

    /// Serves one accepted connection (a `SOCK_SEQPACKET` socket) until it ends: hello,
    /// snapshot, then the requests the server routes to it. Returns why it ended.
    pub async fn serve_connection(&self, fd: OwnedFd) -> ZdsError {
        let conn = match ZdsConn::new(fd) {
            Ok(c) => c,
            Err(e) => return e,
        };
        let peer = conn.peer().ok();
        match peer {
            Some(p) => log::info!(
                "ztunnel connected to the ZDS socket (pid {}, uid {}, gid {})",
                p.pid,
                p.uid,
                p.gid
            ),
            None => log::info!("ztunnel connected to the ZDS socket (peer unknown)"),
        }
        if let Err(e) = conn.hello(HELLO_TIMEOUT).await {
            return e;
        }
        // Snapshot and registration under one lock: see the module docs.
        let (tx, mut rx) = mpsc::channel::<Command>(64);
        let (id, snapshot) = {
            let mut st = self.state.lock().await;
            st.next_id += 1;
            let id = st.next_id;
            st.connections.push(Connection {
                id,
                peer,
                tx,
                synced: false,
            });
            self.count(&st);
            (id, st.pods.values().cloned().collect::<Vec<_>>())
        };
        let ended = self.run(id, &conn, &snapshot, &mut rx).await;
        {
            let mut st = self.state.lock().await;
            st.connections.retain(|c| c.id != id);
            self.count(&st);
        }
        // Whatever was queued for this connection learns that it is gone.
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            let _ = cmd.reply.send(Err(ZdsError::Closed));
        }
        log::info!("ztunnel connection {id} ended: {ended}");
        ended
    }

    /// The snapshot, then the routed requests, until something fails.
    async fn run(
        &self,
        id: u64,
        conn: &ZdsConn,
        snapshot: &[Workload],
        rx: &mut mpsc::Receiver<Command>,
    ) -> ZdsError {
        for w in snapshot {
            let netns = w.netns.as_ref().map(|n| n.as_fd());
            if let Err(e) = conn
                .request(w.snapshot_request(), netns, self.ack_timeout)
                .await
            {
                return e;
            }
        }
        if let Err(e) = conn
            .request(
                Request::SnapshotSent(SnapshotSent {}),
                None,
                self.ack_timeout,
            )
            .await
        {
            return e;
        }
        log::info!("ztunnel took the snapshot ({} pod(s))", snapshot.len());
        {
            let mut st = self.state.lock().await;
            if let Some(c) = st.connections.iter_mut().find(|c| c.id == id) {
                c.synced = true;
            }
            self.count(&st);
        }
        self.snapshots.send_modify(|n| *n += 1);
        loop {
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return ZdsError::Closed };
                    let netns = cmd.netns.as_ref().map(|n| n.as_fd());
                    let outcome = conn.request(cmd.request, netns, self.ack_timeout).await;
                    // A refused request leaves the connection usable; any other failure
                    // leaves it in an unknown state (an ack may still be on its way).
                    let end = match &outcome {
                        Ok(()) | Err(ZdsError::Nack { .. }) => None,
                        Err(ZdsError::Closed) => Some(ZdsError::Closed),
                        Err(e) => Some(ZdsError::Io(std::io::Error::other(e.to_string()))),
                    };
                    let _ = cmd.reply.send(outcome);
                    if let Some(end) = end {
                        return end;
                    }
                }
                e = conn.unsolicited() => return e,
            }
        }
    }

    /// Records `pod` and hands it to the newest ztunnel connection, waiting for the ack.
    /// Without a connection the pod stays recorded, and the next connection gets it in its
    /// snapshot.
    ///
    /// Errors: [`ServerError::NoNetns`] for a pod without a netns, [`ServerError::NoZtunnel`]
    /// when none is connected, [`ServerError::Zds`] when ztunnel refuses or does not answer
    /// in time, [`ServerError::Gone`].
    pub async fn add(&self, pod: Workload) -> Result<(), ServerError> {
        let Some(netns) = pod.netns.clone() else {
            return Err(ServerError::NoNetns(pod.uid));
        };
        let request = pod.snapshot_request();
        // The channel is written outside the lock: a connection task that is ending
        // takes the lock to deregister, and must never wait for a sender that waits for it.
        let newest = {
            let mut st = self.state.lock().await;
            st.pods.insert(pod.uid.clone(), pod);
            st.connections.last().map(|c| c.tx.clone())
        };
        let newest = newest.ok_or(ServerError::NoZtunnel)?;
        let (reply, answer) = oneshot::channel();
        let cmd = Command {
            request,
            netns: Some(netns),
            reply,
        };
        newest.send(cmd).await.map_err(|_| ServerError::Gone)?;
        answer.await.map_err(|_| ServerError::Gone)??;
        Ok(())
    }

    /// Forgets the pod and tells every connection to drop it. The netns is not touched.
    ///
    /// Errors: the first connection's failure ([`ServerError::Zds`], [`ServerError::Gone`]);
    /// the others are still told.
    pub async fn del(&self, uid: &str) -> Result<(), ServerError> {
        let senders: Vec<mpsc::Sender<Command>> = {
            let mut st = self.state.lock().await;
            st.pods.remove(uid);
            st.connections.iter().map(|c| c.tx.clone()).collect()
        };
        let mut answers = Vec::new();
        for tx in senders {
            let (reply, answer) = oneshot::channel();
            let cmd = Command {
                request: Request::Del(DelWorkload {
                    uid: uid.to_owned(),
                }),
                netns: None,
                reply,
            };
            if tx.send(cmd).await.is_ok() {
                answers.push(answer);
            }
        }
        let mut first = None;
        for a in answers {
            let outcome = match a.await {
                Ok(r) => r.map_err(ServerError::from),
                Err(_) => Err(ServerError::Gone),
            };
            if let Err(e) = outcome {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// How many ztunnel connections are live (registered after their hello).
    pub async fn connections(&self) -> usize {
        self.state.lock().await.connections.len()
    }

    /// ztunnel's connections, counted, as they change: for the `ztunnel_connected` gauge,
    /// `/readyz`'s note, and waiting for a ztunnel ([`ZdsServer::wait_for_ztunnel`]).
    pub fn ztunnels(&self) -> tokio::sync::watch::Receiver<Ztunnels> {
        self.ztunnels.subscribe()
    }

    /// Waits up to `wait` for a ztunnel that has taken its snapshot (at once when one
    /// has). Returns whether there is one.
    pub async fn wait_for_ztunnel(&self, wait: Duration) -> bool {
        let mut rx = self.ztunnels.subscribe();
        tokio::time::timeout(wait, rx.wait_for(|z| z.synced > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Publishes the counts of `st`'s connections (called with the state lock held, so
    /// that updates are ordered).
    fn count(&self, st: &State) {
        let now = Ztunnels {
            connected: st.connections.len(),
            synced: st.connections.iter().filter(|c| c.synced).count(),
        };
        self.ztunnels
            .send_if_modified(|z| std::mem::replace(z, now) != now);
    }

    /// The peers of the live connections, oldest first, for `/readyz` and logs.
    pub async fn peers(&self) -> Vec<Option<PeerCred>> {
        let st = self.state.lock().await;
        st.connections.iter().map(|c| c.peer).collect()
    }

    /// Records `pod` without sending it: the next connection gets it in its snapshot (a pod
    /// enrolled before the agent restarted, restored before ztunnel is served).
    pub async fn remember(&self, pod: Workload) {
        self.state.lock().await.pods.insert(pod.uid.clone(), pod);
    }

    /// A counter of the snapshots ztunnel connections have acked: it changes each time a
    /// ztunnel takes the pods the server knows.
    pub fn snapshots(&self) -> tokio::sync::watch::Receiver<u64> {
        self.snapshots.subscribe()
    }

    /// How many snapshots ztunnel connections have acked so far (the value
    /// [`ZdsServer::snapshots`] follows).
    pub fn snapshot_count(&self) -> u64 {
        *self.snapshots.borrow()
    }

    /// Whether the server knows pod `uid` (enrolled, pending, or restored).
    pub async fn knows(&self, uid: &str) -> bool {
        self.state.lock().await.pods.contains_key(uid)
    }

    /// The UIDs of the pods the server knows.
    pub async fn pods(&self) -> Vec<String> {
        self.state.lock().await.pods.keys().cloned().collect()
    }

    /// The netns handle recorded for pod `uid`, if the server knows the pod with one.
    pub async fn netns_of(&self, uid: &str) -> Option<Arc<Netns>> {
        self.state.lock().await.pods.get(uid)?.netns.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ambient::zds::{Ack, Response, WorkloadRequest, WorkloadResponse, ZdsHello};
    use nix::sys::socket::{recvmsg, sendmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    use prost::Message as _;
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::{AsRawFd, FromRawFd, RawFd};

    /// A scripted ztunnel on the other end of a socketpair, on its own thread: says hello,
    /// then answers each request with `answer(request)` (`None`: no answer), recording
    /// what it got and how many descriptors came with it.
    struct FakeZtunnel {
        seen: std::sync::mpsc::Receiver<(Request, usize)>,
        _thread: std::thread::JoinHandle<()>,
    }

    fn fake_ztunnel(
        fd: OwnedFd,
        answer: impl Fn(&Request) -> Option<String> + Send + 'static,
    ) -> FakeZtunnel {
        let (tx, seen) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let hello = ZdsHello { version: 1 }.encode_to_vec();
            let iov = [IoSlice::new(&hello)];
            sendmsg::<UnixAddr>(fd.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).unwrap();
            loop {
                let mut buf = vec![0u8; 4096];
                let mut cmsg = nix::cmsg_space!([RawFd; 4]);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let Ok(msg) = recvmsg::<UnixAddr>(
                    fd.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::empty(),
                ) else {
                    return;
                };
                let mut fds = 0;
                for c in msg.cmsgs().unwrap() {
                    if let ControlMessageOwned::ScmRights(r) = c {
                        for f in r {
                            // SAFETY: installed for this thread by the kernel; closed here.
                            drop(unsafe { OwnedFd::from_raw_fd(f) });
                            fds += 1;
                        }
                    }
                }
                let n = msg.bytes;
                if n == 0 {
                    return;
                }
                let req = WorkloadRequest::decode(&buf[..n]).unwrap().payload.unwrap();
                let reply = answer(&req);
                if tx.send((req, fds)).is_err() {
                    return;
                }
                if let Some(error) = reply {
                    let ack = WorkloadResponse {
                        payload: Some(Response::Ack(Ack { error })),
                    }
                    .encode_to_vec();
                    let iov = [IoSlice::new(&ack)];
                    if sendmsg::<UnixAddr>(fd.as_raw_fd(), &iov, &[], MsgFlags::empty(), None)
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        FakeZtunnel {
            seen,
            _thread: thread,
        }
    }

    fn ack_all(_: &Request) -> Option<String> {
        Some(String::new())
    }

    fn pair() -> (OwnedFd, OwnedFd) {
        crate::ambient::zds::seqpacket_pair()
    }

    /// A netns of the test's own (gone with the last handle): only its descriptor travels.
    fn own_netns() -> Arc<Netns> {
        let scratch = istio_cni::scratch::ScratchNetns::create().unwrap();
        Arc::new(Netns::open(scratch.path()).unwrap())
    }

    fn workload(uid: &str, netns: Option<Arc<Netns>>) -> Workload {
        Workload {
            uid: uid.into(),
            info: WorkloadInfo {
                name: format!("pod-{uid}"),
                namespace: "default".into(),
                service_account: "default".into(),
            },
            netns,
        }
    }

    async fn wait_connections(server: &ZdsServer, n: usize) {
        for _ in 0..500 {
            if server.connections().await == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{n} connection(s) never registered");
    }

    fn next(z: &FakeZtunnel) -> (Request, usize) {
        z.seen
            .recv_timeout(Duration::from_secs(5))
            .expect("a request")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshot_then_adds_and_deletes_in_order() {
        let server = ZdsServer::new(Duration::from_secs(5));
        // Known before ztunnel connects: one with a netns, one without.
        assert!(matches!(
            server.add(workload("a", Some(own_netns()))).await,
            Err(ServerError::NoZtunnel)
        ));
        {
            let mut st = server.state.lock().await;
            st.pods.insert("b".into(), workload("b", None));
        }
        let (agent, zt) = pair();
        let z = fake_ztunnel(zt, ack_all);
        let s = server.clone();
        tokio::spawn(async move { s.serve_connection(agent).await });
        let (r, fds) = next(&z);
        assert!(
            matches!(&r, Request::Add(a) if a.uid == "a") && fds == 1,
            "{r:?}"
        );
        let (r, fds) = next(&z);
        assert!(
            matches!(&r, Request::Keep(k) if k.uid == "b") && fds == 0,
            "{r:?}"
        );
        assert!(matches!(next(&z).0, Request::SnapshotSent(_)));
        wait_connections(&server, 1).await;
        server.add(workload("c", Some(own_netns()))).await.unwrap();
        let (r, fds) = next(&z);
        assert!(
            matches!(&r, Request::Add(a) if a.uid == "c") && fds == 1,
            "{r:?}"
        );
        server.del("a").await.unwrap();
        assert!(matches!(next(&z).0, Request::Del(d) if d.uid == "a"));
        assert_eq!(server.pods().await, ["b", "c"]);
        assert!(matches!(
            server.add(workload("d", None)).await,
            Err(ServerError::NoNetns(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn adds_go_to_the_newest_and_deletes_to_all() {
        let server = ZdsServer::new(Duration::from_secs(5));
        let (a1, z1) = pair();
        let old = fake_ztunnel(z1, ack_all);
        let s = server.clone();
        tokio::spawn(async move { s.serve_connection(a1).await });
        assert!(matches!(next(&old).0, Request::SnapshotSent(_)));
        wait_connections(&server, 1).await;
        server.add(workload("p", Some(own_netns()))).await.unwrap();
        assert!(matches!(next(&old).0, Request::Add(_)));
        // A second ztunnel (an upgrade): it gets the snapshot, then the adds.
        let (a2, z2) = pair();
        let new = fake_ztunnel(z2, ack_all);
        let s = server.clone();
        tokio::spawn(async move { s.serve_connection(a2).await });
        assert!(matches!(next(&new).0, Request::Add(a) if a.uid == "p"));
        assert!(matches!(next(&new).0, Request::SnapshotSent(_)));
        wait_connections(&server, 2).await;
        server.add(workload("q", Some(own_netns()))).await.unwrap();
        assert!(matches!(next(&new).0, Request::Add(a) if a.uid == "q"));
        assert!(
            old.seen.try_recv().is_err(),
            "the old connection got no add"
        );
        server.del("p").await.unwrap();
        assert!(matches!(next(&old).0, Request::Del(d) if d.uid == "p"));
        assert!(matches!(next(&new).0, Request::Del(d) if d.uid == "p"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_nack_keeps_the_connection_and_a_silent_ztunnel_loses_it() {
        let server = ZdsServer::new(Duration::from_millis(200));
        let (a, z) = pair();
        let zt = fake_ztunnel(z, |r| match r {
            Request::Add(a) if a.uid == "refused" => Some("no room".into()),
            Request::Add(a) if a.uid == "ignored" => None,
            _ => Some(String::new()),
        });
        let s = server.clone();
        let ended = tokio::spawn(async move { s.serve_connection(a).await });
        assert!(matches!(next(&zt).0, Request::SnapshotSent(_)));
        wait_connections(&server, 1).await;
        let e = server
            .add(workload("refused", Some(own_netns())))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no room"), "{e}");
        assert_eq!(
            server.connections().await,
            1,
            "a refusal keeps the connection"
        );
        let e = server
            .add(workload("ignored", Some(own_netns())))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("within"), "{e}");
        let why = ended.await.unwrap();
        assert!(why.to_string().contains("acknowledge"), "{why}");
        assert_eq!(
            server.connections().await,
            0,
            "a timed-out connection is dropped"
        );
        assert!(matches!(
            server.add(workload("later", Some(own_netns()))).await,
            Err(ServerError::NoZtunnel)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_connection_is_dropped_while_idle() {
        let server = ZdsServer::new(Duration::from_secs(5));
        let (a, z) = pair();
        let s = server.clone();
        let ended = tokio::spawn(async move { s.serve_connection(a).await });
        // Hello, take the snapshot's ack, then hang up.
        let hello = ZdsHello { version: 1 }.encode_to_vec();
        sendmsg::<UnixAddr>(
            z.as_raw_fd(),
            &[IoSlice::new(&hello)],
            &[],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut buf = [0u8; 64];
        let mut iov = [IoSliceMut::new(&mut buf)];
        recvmsg::<UnixAddr>(z.as_raw_fd(), &mut iov, None, MsgFlags::empty()).unwrap();
        let ack = WorkloadResponse {
            payload: Some(Response::Ack(Ack::default())),
        }
        .encode_to_vec();
        sendmsg::<UnixAddr>(
            z.as_raw_fd(),
            &[IoSlice::new(&ack)],
            &[],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        wait_connections(&server, 1).await;
        drop(z);
        let why = tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("noticed without a request")
            .unwrap();
        assert!(matches!(why, ZdsError::Closed), "{why}");
        assert_eq!(server.connections().await, 0);
    }
}
