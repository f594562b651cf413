//! The node agent as tests run it: temp dirs laid out like its mounts, the real
//! `istio-cni-node-agent run` binary on free loopback ports, and helpers to poll it.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::chain::{istio_cni_bin, workspace_bin};
use crate::net::TestNetns;

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
    /// The netns it runs in, when not the caller's.
    pub netns: Option<PathBuf>,
}

impl Daemon {
    /// GET `path` on the agent's `port`, from the agent's netns.
    pub fn get(&self, port: u16, path: &str) -> Option<(u16, String)> {
        match &self.netns {
            None => get(port, path),
            Some(ns) => istio_cni::netns::Netns::open(ns)
                .ok()?
                .run(|_| get(port, path))
                .ok()?,
        }
    }

    /// GET /readyz.
    pub fn readyz(&self) -> Option<(u16, String)> {
        self.get(self.ready_port, "/readyz")
    }

    /// GET /metrics: the text.
    pub fn metrics(&self) -> String {
        self.get(self.metrics_port, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// GET /metrics, parsed as OpenMetrics text (what the agent serves, and what Prometheus
    /// parses); `None` when the endpoint does not answer or the text does not parse.
    pub fn scrape(&self) -> Option<Scrape> {
        let (_, body) = self.get(self.metrics_port, "/metrics")?;
        openmetrics_parser::openmetrics::parse_openmetrics(&body)
            .ok()
            .map(Scrape)
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

/// A parsed `/metrics` answer.
pub struct Scrape(
    pub  openmetrics_parser::MetricsExposition<
        openmetrics_parser::OpenMetricsType,
        openmetrics_parser::OpenMetricsValue,
    >,
);

/// What a metric family is, as the exposition declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `# TYPE … counter`.
    Counter,
    /// `# TYPE … gauge`.
    Gauge,
}

impl Scrape {
    /// The value of the sample of family `family` (the name without `_total`) with exactly
    /// the labels `labels`; panics when the family exists with another type than `kind`.
    pub fn value(&self, family: &str, kind: Kind, labels: &[(&str, &str)]) -> Option<f64> {
        use openmetrics_parser::{OpenMetricsType, OpenMetricsValue};
        let f = self.0.families.get(family)?;
        let declared = match f.family_type {
            OpenMetricsType::Counter => Some(Kind::Counter),
            OpenMetricsType::Gauge => Some(Kind::Gauge),
            _ => None,
        };
        assert_eq!(
            declared,
            Some(kind),
            "{family} is declared {}",
            f.family_type
        );
        f.iter_samples()
            .find(|s| {
                let Ok(set) = s.get_labelset() else {
                    return false;
                };
                labels.len() == f.get_label_names().len()
                    && labels
                        .iter()
                        .all(|(k, v)| set.get_label_value(k) == Some(*v))
            })
            .map(|s| match &s.value {
                OpenMetricsValue::Counter(c) => c.value.as_f64(),
                OpenMetricsValue::Gauge(g) => g.as_f64(),
                other => panic!("{family}: unexpected value {other:?}"),
            })
    }

    /// The HELP text of family `family`, without the final period that prometheus-client
    /// adds to every HELP line.
    pub fn help(&self, family: &str) -> Option<&str> {
        self.0
            .families
            .get(family)
            .map(|f| f.help.trim_end_matches('.'))
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

    /// Agent dirs around an existing CNI conf dir `net` and bin dir `bin` (a runtime's).
    pub fn with_cni_dirs(net: PathBuf, bin: PathBuf) -> Node {
        let node = Node::new("unused-net.d");
        Node { net, bin, ..node }
    }

    /// The primary CNI config's path.
    pub fn conf(&self) -> PathBuf {
        self.net.join("10-ptp.conflist")
    }

    /// Starts `istio-cni-node-agent run` for these dirs, with `extra` flags.
    pub fn daemon(&self, extra: &[&str]) -> Daemon {
        self.spawn(
            None,
            &[("KUBERNETES_SERVICE_HOST", "10.96.0.1".into())],
            extra,
        )
    }

    /// Starts an ambient node agent inside `netns`, a test node whose API server is
    /// `kubeconfig`'s: ztunnel's socket at `uds`, pods' netns found by this machine's own
    /// `/proc` and in `netns_dirs` (comma-separated), no self-test, and `extra` flags
    /// after these (the taint, repair and backend flags, which differ per caller).
    pub fn spawn_ambient(
        &self,
        netns: &TestNetns,
        kubeconfig: &Path,
        netns_dirs: &str,
        uds: &Path,
        extra: &[&str],
    ) -> Daemon {
        let (kubeconfig, uds) = (kubeconfig.to_string_lossy(), uds.to_string_lossy());
        let mut args = vec![
            "--self-test",
            "false",
            "--kubeconfig",
            &kubeconfig,
            "--host-proc-dir",
            "/proc",
            "--host-root",
            "/",
            "--netns-dirs",
            netns_dirs,
            "--ambient-enabled",
            "true",
            "--ztunnel-uds-address",
            &uds,
        ];
        args.extend_from_slice(extra);
        self.spawn(
            Some(netns),
            &[("KUBERNETES_SERVICE_HOST", "10.96.0.1".into())],
            &args,
        )
    }

    /// Starts `istio-cni-node-agent run` for these dirs inside `netns` (or here), with
    /// `env` (besides `PATH`) and `extra` flags. Each start logs to a new file.
    pub fn spawn(
        &self,
        netns: Option<&TestNetns>,
        env: &[(&str, String)],
        extra: &[&str],
    ) -> Daemon {
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // In a netns of its own, ports below the kernel's ephemeral range (32768 and up),
        // distinct per start: a free port of this netns may be the local port of a socket
        // there (a killed agent's connection to the API, closing), which a listener
        // cannot take.
        let (ready_port, metrics_port) = match netns {
            Some(_) => {
                let base = 20_000 + (n % 5_000) as u16 * 2;
                (base, base + 1)
            }
            None => (free_port(), free_port()),
        };
        let log = self.dir.path().join(format!("agent-{n}.log"));
        let mut cmd = Command::new(workspace_bin("istio-cni-node-agent"));
        cmd.arg("run")
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
            .arg(&self.sa);
        if !extra.contains(&"--plugin-bin") {
            cmd.arg("--plugin-bin").arg(istio_cni_bin());
        }
        cmd.args(extra)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            // The agent runs on the host here: its own mount namespace is the node's.
            .env("HOST_MOUNT_NS", "")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = match netns {
            None => cmd.spawn(),
            Some(ns) => ns.open().run(|_| cmd.spawn()).expect("enter netns"),
        }
        .expect("spawn the agent");
        Daemon {
            child,
            log,
            ready_port,
            metrics_port,
            netns: netns.map(TestNetns::path),
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

/// The agent's pod (`istio-system/istio-cni-node-x7k2p`), owned by DaemonSet
/// `istio-cni-node`, and that DaemonSet, in the API: with `--pod-name
/// istio-cni-node-x7k2p`, SIGTERM is an upgrade while the DaemonSet exists. Returns the
/// DaemonSet.
pub fn register_agent_pod(api: &crate::fake_api::FakeApi) -> Value {
    let ds = api.put(
        "daemonsets",
        serde_json::json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "istio-cni-node", "namespace": "istio-system"},
            "spec": {"selector": {"matchLabels": {"k8s-app": "istio-cni-node"}},
                     "template": {"metadata": {"labels": {"k8s-app": "istio-cni-node"}},
                                  "spec": {"containers": [{"name": "install-cni", "image": "agent"}]}}}}),
    );
    api.put(
        "pods",
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": AGENT_POD, "namespace": "istio-system",
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                              "name": "istio-cni-node", "uid": ds["metadata"]["uid"],
                                              "controller": true}]},
            "spec": {"containers": [{"name": "install-cni", "image": "agent"}]}}),
    );
    ds
}

/// Name of the agent's pod registered by [`register_agent_pod`].
pub const AGENT_POD: &str = "istio-cni-node-x7k2p";
