//! The real ztunnel (istio/ztunnel, built from `../shared/peers/ztunnel/` by its
//! `build.sh` into `target/peers/`), run in in-pod mode without istiod, as the peer kit's
//! README describes: `PROXY_MODE=shared`, the agent's ZDS socket in `INPOD_UDS`,
//! `FAKE_CA=true`, no `XDS_ADDRESS`, and the workloads in a local file. Also a double that
//! acks without ever listening, for the tests that must not need the real one.
//!
//! Without `../shared` (the shared peer kit), [`binary`] says how to get it and returns
//! `None`: the tests that need it pass without running.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::net::TestNetns;

/// The workspace root (this crate's parent).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The ztunnel binary: built by the peer kit's `build.sh` into `target/peers/` when the
/// kit is there (cached: milliseconds when nothing changed); `None`, with the reason
/// printed, when it is not.
pub fn binary() -> Option<PathBuf> {
    let kit = workspace().join("../shared/peers/ztunnel/build.sh");
    if !kit.exists() {
        eprintln!(
            "SKIPPED: the real ztunnel is built from ../shared/peers/ztunnel/ (the shared peer \
             kit beside this repository), which is absent here; put the kit there (or run \
             where CI provides it) to run this test"
        );
        return None;
    }
    let out = workspace().join("target/peers");
    let status = Command::new("bash")
        .arg(&kit)
        .arg(&out)
        .status()
        .expect("run the ztunnel peer kit's build.sh");
    assert!(
        status.success(),
        "{} {} failed",
        kit.display(),
        out.display()
    );
    Some(out.join("ztunnel"))
}

/// A workload in ztunnel's local config (`LOCAL_XDS_PATH`).
#[derive(Debug, Clone)]
pub struct LocalWorkload {
    /// Pod name (also its service account).
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Its address.
    pub ip: IpAddr,
}

/// ztunnel's local config for `workloads` on node `node`: each an HBONE workload with its
/// address, no services, no policies.
pub fn local_yaml(node: &str, workloads: &[LocalWorkload]) -> String {
    let mut y = String::from("workloads:\n");
    for w in workloads {
        y.push_str(&format!(
            "- uid: cluster1//v1/Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  \
             serviceAccount: {name}\n  trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  \
             protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n",
            ns = w.namespace,
            name = w.name,
            ip = w.ip,
        ));
    }
    y.push_str("policies: []\nservices: []\n");
    y
}

/// ztunnel running in a node netns; killed on drop.
pub struct Ztunnel {
    child: Child,
    log: PathBuf,
}

impl Ztunnel {
    /// Starts `bin` in `node`, connecting to the ZDS socket `uds`, with `dir` as its
    /// working dir (its `local.yaml` there, its log in `ztunnel.log`).
    pub fn start(bin: &Path, node: &TestNetns, node_name: &str, dir: &Path, uds: &Path) -> Ztunnel {
        let log = dir.join("ztunnel.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("ztunnel log");
        let child = Command::new("ip")
            .args(["netns", "exec", &node.name])
            .arg(bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("PROXY_MODE", "shared")
            .env("INPOD_UDS", uds)
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("LOCAL_XDS_PATH", dir.join("local.yaml"))
            .env("NODE_NAME", node_name)
            .env("IPV6_ENABLED", "false")
            .env("RUST_LOG", "info")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("start ztunnel");
        Ztunnel { child, log }
    }

    /// The last `n` lines of its log, newest first.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    /// How many snapshots ztunnels logging to this one's log have taken
    /// (`received snapshot sent` lines; ztunnel writes its log asynchronously, so a line
    /// may follow the event by a moment).
    pub fn snapshots_taken(&self) -> usize {
        snapshots_taken(&self.log)
    }
}

/// How many snapshots the ztunnel log at `log` records (see [`Ztunnel::snapshots_taken`]).
pub fn snapshots_taken(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("received snapshot sent")
        .count()
}

/// Which of ztunnel's ports (15001, 15006, 15008) listen in `netns` (`ss -Htln` run in
/// it).
pub fn listening_ports(netns: &istio_cni::netns::Netns) -> Vec<u16> {
    let listening = netns
        .run(|_| Command::new("ss").arg("-Htln").output())
        .ok()
        .and_then(Result::ok)
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    [15001, 15006, 15008]
        .into_iter()
        .filter(|p| listening.contains(&format!(":{p} ")))
        .collect()
}

/// The last `n` lines of the ztunnel log in `dir`, newest first.
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(n).collect();
    tail.join("\n")
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// ztunnel's readiness (`:15021/healthz/ready` in the node netns) answers 200.
pub fn ready(node: &TestNetns) -> bool {
    node.open()
        .run(|_| {
            use std::io::{Read as _, Write as _};
            let Ok(mut s) = std::net::TcpStream::connect_timeout(
                &"127.0.0.1:15021".parse().expect("address"),
                Duration::from_millis(500),
            ) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req = "GET /healthz/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
            if s.write_all(req.as_bytes()).is_err() {
                return false;
            }
            let mut head = [0u8; 12];
            s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
        })
        .unwrap_or(false)
}

/// A ztunnel double that connects to `uds`, says hello and acks every request, but never
/// listens in any pod: what upstream would call enrolled (istio/istio#57285). Its thread
/// ends when the agent closes the connection.
pub fn acking_double(uds: &Path) -> std::thread::JoinHandle<()> {
    use nix::sys::socket::{
        connect, recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
    };
    use std::os::fd::AsRawFd as _;
    let uds = uds.to_owned();
    std::thread::spawn(move || {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        connect(fd.as_raw_fd(), &UnixAddr::new(&uds).expect("address")).expect("connect");
        // ZdsHello { version: V1 }, then Ack { error: "" } for every request.
        send(fd.as_raw_fd(), &[0x08, 0x01], MsgFlags::empty()).expect("hello");
        let mut buf = [0u8; 4096];
        while let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            if n == 0 || send(fd.as_raw_fd(), &[0x0a, 0x00], MsgFlags::empty()).is_err() {
                return;
            }
        }
    })
}
