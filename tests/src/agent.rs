//! The node agent as tests run it: temp dirs laid out like its mounts, the real
//! `istio-cni-node-agent run` binary on free loopback ports, and helpers to poll it.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::chain::{istio_cni_bin, workspace_bin};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET over HTTP/1.0 on loopback: (status, body).
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Waits for `cond`, polling every 5 ms; panics with `what` after 20 s.
pub fn wait_for<T>(what: &str, mut cond: impl FnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = cond() {
            return (v, start.elapsed());
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running agent; killed on drop. Its log goes to `log`, printed if the test fails.
pub struct Daemon {
    /// The agent process.
    pub child: Child,
    /// Its stderr.
    pub log: PathBuf,
    /// Port of `/healthz` and `/readyz`.
    pub ready_port: u16,
    /// Port of `/metrics`.
    pub metrics_port: u16,
}

impl Daemon {
    /// GET /readyz.
    pub fn readyz(&self) -> Option<(u16, String)> {
        get(self.ready_port, "/readyz")
    }

    /// Waits for /readyz 200; returns how long it took.
    pub fn wait_ready(&self) -> Duration {
        wait_for("/readyz 200", || (self.readyz()?.0 == 200).then_some(())).1
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        wait_for("exit after SIGTERM", || self.child.try_wait().unwrap()).0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "agent log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// Temp dirs laid out like the agent's mounts, with a projected service account token.
pub struct Node {
    /// The temp dir holding everything.
    pub dir: tempfile::TempDir,
    /// The CNI conf dir (`--mounted-cni-net-dir`).
    pub net: PathBuf,
    /// The CNI bin dir.
    pub bin: PathBuf,
    /// The agent run dir.
    pub run: PathBuf,
    /// The service account dir.
    pub sa: PathBuf,
}

impl Node {
    /// `net_subdir` is the conf dir's path below the temp dir; it is not created.
    pub fn new(net_subdir: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let p = |s: &str| dir.path().join(s);
        let (net, bin, run, sa) = (p(net_subdir), p("bin"), p("run"), p("sa"));
        for d in [&bin, &run, &sa] {
            std::fs::create_dir(d).unwrap();
        }
        project_token(&sa, 1, "token-one");
        Node {
            dir,
            net,
            bin,
            run,
            sa,
        }
    }

    /// The primary CNI config's path.
    pub fn conf(&self) -> PathBuf {
        self.net.join("10-ptp.conflist")
    }

    /// Starts `istio-cni-node-agent run` for these dirs, with `extra` flags.
    pub fn daemon(&self, extra: &[&str]) -> Daemon {
        let (ready_port, metrics_port) = (free_port(), free_port());
        let log = self.dir.path().join("agent.log");
        let child = Command::new(workspace_bin("istio-cni-node-agent"))
            .arg("run")
            .args(["--bind-address", "127.0.0.1", "--log-level", "debug"])
            .args(["--readiness-port", &ready_port.to_string()])
            .args(["--monitoring-port", &metrics_port.to_string()])
            .arg("--mounted-cni-net-dir")
            .arg(&self.net)
            .arg("--cni-bin-dir")
            .arg(&self.bin)
            .arg("--cni-agent-run-dir")
            .arg(&self.run)
            .arg("--service-account-dir")
            .arg(&self.sa)
            .arg("--plugin-bin")
            .arg(istio_cni_bin())
            .args(extra)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon {
            child,
            log,
            ready_port,
            metrics_port,
        }
    }
}

/// Writes the service account files as a projected volume does: timestamped dir, `..data`
/// symlink swapped atomically, `token` and `ca.crt` linked through `..data`.
pub fn project_token(sa: &Path, generation: u32, token: &str) {
    let data = sa.join(format!("..gen_{generation}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("token"), token).unwrap();
    std::fs::write(
        data.join("ca.crt"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let tmp = sa.join("..data_tmp");
    std::os::unix::fs::symlink(data.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, sa.join("..data")).unwrap();
    for f in ["token", "ca.crt"] {
        if !sa.join(f).exists() {
            std::os::unix::fs::symlink(format!("..data/{f}"), sa.join(f)).unwrap();
        }
    }
}

/// Whether the config at `conf` ends with our plugin.
pub fn chained(conf: &Path) -> bool {
    std::fs::read(conf)
        .ok()
        .and_then(|c| serde_json::from_slice::<Value>(&c).ok())
        .and_then(|v| {
            v["plugins"]
                .as_array()?
                .last()?
                .get("type")?
                .as_str()
                .map(|t| t == "istio-cni")
        })
        .unwrap_or(false)
}

/// A primary CNI config (ptp + portmap).
pub const PRIMARY: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"ptp","ipam":{"type":"host-local","subnet":"10.1.0.0/24"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;
