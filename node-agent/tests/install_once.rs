//! `istio-cni-node-agent install --once` / `uninstall --once`, the real binary against temp
//! dirs laid out like the agent's mounts.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_istio-cni-node-agent");

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let node = Node {
            dir: tempfile::tempdir().unwrap(),
        };
        for d in ["net.d", "bin", "run", "sa"] {
            std::fs::create_dir(node.path(d)).unwrap();
        }
        std::fs::write(node.path("sa/token"), "header.payload.sig\n").unwrap();
        std::fs::write(
            node.path("sa/ca.crt"),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(node.path("istio-cni"), b"\x7fELF plugin build 1").unwrap();
        node
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn agent(&self, verb: &str, extra: &[&str]) -> Output {
        self.command(verb, extra).output().unwrap()
    }

    /// The agent command for one pass of `verb` on this node, self-test off.
    fn command(&self, verb: &str, extra: &[&str]) -> Command {
        self.command_with(verb, &self.path("istio-cni"), extra)
    }

    /// [`Node::command`] installing the plugin binary `plugin`.
    fn command_with(&self, verb: &str, plugin: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args([verb, "--once", "--self-test", "false"])
            .arg("--mounted-cni-net-dir")
            .arg(self.path("net.d"))
            .arg("--cni-bin-dir")
            .arg(self.path("bin"))
            .arg("--cni-agent-run-dir")
            .arg(self.path("run"))
            .arg("--plugin-bin")
            .arg(plugin)
            .arg("--service-account-dir")
            .arg(self.path("sa"))
            .args(extra)
            .env_clear()
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .env("KUBERNETES_SERVICE_PORT", "443");
        cmd
    }

    fn copy_conf(&self, name: &str) {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/testdata/conflist")
            .join(name);
        std::fs::copy(src, self.path("net.d").join(name)).unwrap();
    }

    fn json(&self, p: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.path(p)).unwrap()).unwrap()
    }
}

fn ok(out: &Output) -> String {
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "agent failed: {log}");
    assert!(out.stdout.is_empty(), "logs never go to stdout");
    log
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn install_chains_and_uninstall_restores() {
    let node = Node::new();
    node.copy_conf("10-calico.conflist");
    let original = node.json("net.d/10-calico.conflist");
    let log = ok(&node.agent("install", &["--exclude-namespaces", "kube-system,gated"]));
    assert!(log.contains("chained istio-cni into"), "{log}");

    let chained = node.json("net.d/10-calico.conflist");
    let last = chained["plugins"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["type"], "istio-cni");
    assert_eq!(
        last["exclude_namespaces"],
        serde_json::json!(["kube-system", "gated"])
    );
    assert_eq!(
        last["kubernetes"]["kubeconfig"],
        node.path("run/istio-cni-kubeconfig").display().to_string()
    );
    assert_eq!(last["validation"]["probe"], true);
    assert_eq!(
        std::fs::read(node.path("bin/istio-cni")).unwrap(),
        b"\x7fELF plugin build 1"
    );
    assert_eq!(mode(&node.path("bin/istio-cni")), 0o755);
    assert_eq!(mode(&node.path("run/istio-cni-kubeconfig")), 0o600);
    let kc = node.json("run/istio-cni-kubeconfig");
    assert_eq!(kc["users"][0]["user"]["token"], "header.payload.sig");
    assert_eq!(
        kc["clusters"][0]["cluster"]["server"],
        "https://10.96.0.1:443"
    );

    // A second pass changes nothing (no rewrite, so no event for the runtime).
    let inode =
        |p: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(node.path(p)).unwrap());
    let before = (
        inode("net.d/10-calico.conflist"),
        inode("bin/istio-cni"),
        inode("run/istio-cni-kubeconfig"),
    );
    let log = ok(&node.agent("install", &["--exclude-namespaces", "kube-system,gated"]));
    assert!(log.contains("nothing to change"), "{log}");
    assert_eq!(
        before,
        (
            inode("net.d/10-calico.conflist"),
            inode("bin/istio-cni"),
            inode("run/istio-cni-kubeconfig")
        )
    );

    // A new plugin build is installed; a rotated token rewrites the kubeconfig.
    std::fs::write(node.path("istio-cni"), b"\x7fELF plugin build 2").unwrap();
    std::fs::write(node.path("sa/token"), "rotated.token.sig").unwrap();
    ok(&node.agent("install", &[]));
    assert_eq!(
        std::fs::read(node.path("bin/istio-cni")).unwrap(),
        b"\x7fELF plugin build 2"
    );
    assert_eq!(
        node.json("run/istio-cni-kubeconfig")["users"][0]["user"]["token"],
        "rotated.token.sig"
    );

    let log = ok(&node.agent("uninstall", &[]));
    assert!(log.contains("removed istio-cni from"), "{log}");
    assert_eq!(node.json("net.d/10-calico.conflist"), original);
    assert!(!node.path("bin/istio-cni").exists());
    assert!(!node.path("run/istio-cni-kubeconfig").exists());
    let log = ok(&node.agent("uninstall", &[]));
    assert!(
        log.contains("nothing to change"),
        "uninstall is idempotent: {log}"
    );
}

#[test]
fn a_single_conf_becomes_a_conflist_with_its_mode() {
    let node = Node::new();
    node.copy_conf("10-bridge.conf");
    std::fs::set_permissions(
        node.path("net.d/10-bridge.conf"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    // An earlier version's temp file, left by a kill long ago (a fresh one may belong to
    // an earlier agent still running during an upgrade: left alone), and ours, left by a
    // killed writer (it holds no lock).
    let old = node.path("net.d/.istio-cni-tmp-10-bridge.conflist-1-0");
    std::fs::write(&old, b"{\"half").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
        .unwrap();
    std::fs::write(
        node.path("net.d/.istio-cni-temp-10-bridge.conflist.1.0123456789abcdef"),
        b"{\"half",
    )
    .unwrap();
    let log = ok(&node.agent("install", &[]));
    assert!(log.contains("removed stale temp file"), "{log}");
    assert!(
        !node.path("net.d/10-bridge.conf").exists(),
        "the .conf is replaced"
    );
    let list = node.json("net.d/10-bridge.conflist");
    assert_eq!(list["name"], "mynet");
    assert_eq!(list["cniVersion"], "1.0.0");
    assert_eq!(list["plugins"][0]["type"], "bridge");
    assert_eq!(
        mode(&node.path("net.d/10-bridge.conflist")),
        0o640,
        "the primary's mode is kept"
    );
    assert_eq!(std::fs::read_dir(node.path("net.d")).unwrap().count(), 1);
}

#[test]
fn standalone_mode_writes_its_own_config() {
    let node = Node::new();
    node.copy_conf("05-cilium.conflist");
    ok(&node.agent("install", &["--chained-cni-plugin", "false"]));
    let conf = node.json("net.d/YYY-istio-cni.conf");
    assert_eq!(conf["type"], "istio-cni");
    assert_eq!(conf["cniVersion"], "1.0.0");
    let cilium: Value = node.json("net.d/05-cilium.conflist");
    assert_eq!(
        cilium["plugins"].as_array().unwrap().len(),
        1,
        "the primary is untouched"
    );
    ok(&node.agent("uninstall", &["--chained-cni-plugin", "false"]));
    assert!(!node.path("net.d/YYY-istio-cni.conf").exists());
}

#[test]
fn clear_errors_when_it_cannot_install() {
    let node = Node::new();
    let out = node.agent("install", &[]);
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("no primary CNI config in") && log.contains("is the primary CNI installed?"),
        "{log}"
    );

    node.copy_conf("00-invalid.conflist");
    let log = String::from_utf8_lossy(&node.agent("install", &[]).stderr).into_owned();
    assert!(
        log.contains("00-invalid.conflist: not a JSON object"),
        "{log}"
    );

    // A read-only bin dir (a read-only tmpfs; needs root).
    node.copy_conf("10-flannel.conflist");
    let bin = node.path("bin");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(&bin)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a read-only tmpfs (needs root)");
    let out = node.agent("install", &[]);
    let _ = Command::new("umount").arg(&bin).status();
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("mounted read-only"), "{log}");

    let out = Command::new(BIN)
        .args([
            "install",
            "--once",
            "--self-test=false",
            "--service-account-dir",
            "/nonexistent",
        ])
        .env_clear()
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("KUBERNETES_SERVICE_HOST"));
}

#[test]
fn sigkill_at_any_point_never_leaves_a_partial_file() {
    let node = Node::new();
    node.copy_conf("10-bridge.conf");
    // A big binary, so that kills land inside its copy too.
    let big: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(node.path("istio-cni"), &big).unwrap();
    let mut seed = 0x2545_f491_u64;
    for round in 0..40 {
        // Alternate the entry so that every pass has something to write.
        let ns = if round % 2 == 0 {
            "kube-system"
        } else {
            "kube-system,other"
        };
        let mut child = node
            .command("install", &["--exclude-namespaces", ns])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(std::time::Duration::from_micros(seed % 3000));
        let _ = child.kill();
        let _ = child.wait();

        // The runtime's view: a valid primary config is always there.
        let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(node.path("net.d"))
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        let picked = istio_cni_node_agent::install::conflist::pick_primary(&files, None);
        assert!(
            picked.as_ref().is_ok_and(|(_, skipped)| skipped.is_empty()),
            "round {round}: {picked:?}"
        );
        // The binary is absent or whole.
        if let Ok(installed) = std::fs::read(node.path("bin/istio-cni")) {
            assert_eq!(installed.len(), big.len(), "round {round}: partial binary");
        }
    }
    // A final pass repairs whatever a kill interrupted, temp files included.
    ok(&node.agent("install", &[]));
    let names: Vec<String> = std::fs::read_dir(node.path("net.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["10-bridge.conflist"]);
    assert_eq!(std::fs::read(node.path("bin/istio-cni")).unwrap(), big);
}

/// The conf dir's files and their bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Every setting that reaches the plugin's entry or the agent's clocks, with a bad value:
/// refused before anything is written, with a message naming the variable.
#[test]
fn bad_settings_are_refused_before_anything_is_written() {
    let node = Node::new();
    node.copy_conf("10-flannel.conflist");
    let before = snapshot(&node.path("net.d"));
    let install_cases = [
        ("PLUGIN_LOG_LEVEL", "trace"),
        ("VALIDATION_TIMEOUT_MS", "0"),
        ("VALIDATION_TIMEOUT_MS", "60001"),
        ("VALIDATION_TIMEOUT_MS", "18446744073709551616"),
        ("VALIDATION_PROBE", "maybe"),
        ("CNI_CONF_NAME", "../x.conf"),
        ("CNI_CONF_NAME", "x.txt"),
        ("LOG_LEVEL", "loud"),
        ("KUBECONFIG_MODE", "999"),
    ];
    for (var, value) in install_cases {
        let out = node
            .command("install", &[])
            .env(var, value)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} was accepted: {log}");
        assert!(
            log.contains(var),
            "{var}={value}: the message names it: {log}"
        );
        assert_eq!(snapshot(&node.path("net.d")), before, "{var}={value} wrote");
        assert!(
            !node.path("bin/istio-cni").exists(),
            "{var}={value} installed"
        );
    }
    let run_cases = [
        ("RESYNC_SECONDS", "18446744073709551615"),
        ("RESYNC_SECONDS", "0"),
        ("TAINT_GRACE_SECONDS", "86401"),
        ("REPAIR_RESYNC_SECONDS", "18446744073709551615"),
        ("REPAIR_COOLDOWN_SECONDS", "18446744073709551615"),
        ("REPAIR_MAX_DELETES_PER_MINUTE", "0"),
        ("TAINT_KEY", "bad key!"),
        ("TAINT_EFFECT", "PreferNoSchedule"),
        ("REPAIR_MODE", "fix"),
    ];
    for (var, value) in run_cases {
        let out = Command::new(BIN)
            .args(["run", "--print-config"])
            .env_clear()
            .env(var, value)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} was accepted");
        assert!(log.contains(var), "{var}={value}: {log}");
    }
}

#[test]
fn cni_conf_name_follows_the_conflist_it_became() {
    let node = Node::new();
    node.copy_conf("10-bridge.conf");
    node.copy_conf("10-flannel.conflist");
    let name = ["--cni-conf-name", "10-bridge.conf"];
    ok(&node.agent("install", &name));
    assert!(!node.path("net.d/10-bridge.conf").exists());
    assert_eq!(
        node.json("net.d/10-bridge.conflist")["plugins"][1]["type"],
        "istio-cni"
    );
    // The next pass finds the .conflist that the named .conf became.
    let log = ok(&node.agent("install", &name));
    assert!(!log.contains("no primary"), "{log}");
    assert_eq!(
        node.json("net.d/10-flannel.conflist")["plugins"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "the other config is untouched"
    );

    let out = node.agent("install", &["--cni-conf-name", "99-missing.conf"]);
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("CNI_CONF_NAME=99-missing.conf: no such file")
            && log.contains("99-missing.conflist"),
        "{log}"
    );
}

/// `LOG_AS_JSON` (upstream's `global.logAsJson`): every log line is one JSON object with
/// time, level, scope and message.
#[test]
fn log_as_json_writes_one_json_object_per_line() {
    let node = Node::new();
    node.copy_conf("10-calico.conflist");
    let out = node
        .command("install", &[])
        .env("LOG_AS_JSON", "true")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(v["scope"], "istio-cni", "{line}");
        assert!(["info", "warn", "error", "debug"].contains(&v["level"].as_str().unwrap()));
        assert!(v["time"].is_string() && v["msg"].is_string(), "{line}");
    }
}

/// How a bounded run of the agent ended.
struct Bounded {
    /// Whether it exited with status 0.
    success: bool,
    /// Its log.
    log: String,
    /// Its peak resident memory, in KiB (`ru_maxrss`).
    max_rss_kib: i64,
}

/// Runs `cmd` with at most 1 GiB of address space (so that an unbounded read fails fast
/// instead of taking the machine's memory), for at most `limit`: panics naming `what`
/// when it is still running then (it hung).
fn run_bounded(mut cmd: Command, what: &str, limit: std::time::Duration) -> Bounded {
    use std::os::unix::process::CommandExt as _;
    let log_file = tempfile::NamedTempFile::new().unwrap();
    cmd.stdout(std::process::Stdio::null())
        .stderr(log_file.reopen().unwrap());
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Reaped below by wait4, which also gives its peak memory.
    #[allow(clippy::zombie_processes)]
    let pid = cmd.spawn().unwrap().id() as libc::pid_t;
    let start = std::time::Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: plain out-pointers to locals.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if reaped == pid {
            return Bounded {
                success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                log: std::fs::read_to_string(log_file.path()).unwrap(),
                max_rss_kib: usage.ru_maxrss,
            };
        }
        if start.elapsed() > limit {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            panic!(
                "{what}: still running after {limit:?} (hung); log:\n{}",
                std::fs::read_to_string(log_file.path()).unwrap()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn mkfifo(p: &Path) {
    let _ = std::fs::remove_file(p);
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// Defect 6: a FIFO where the agent reads a credential, a config or the plugin binary is
/// refused at once with a message naming the file and its type; it never waits for a
/// writer. A FIFO among the CNI configs is skipped like an invalid config.
#[test]
fn a_fifo_instead_of_a_file_fails_promptly_naming_it() {
    let secs = std::time::Duration::from_secs;
    for victim in ["sa/token", "sa/ca.crt", "istio-cni"] {
        let node = Node::new();
        node.copy_conf("10-calico.conflist");
        mkfifo(&node.path(victim));
        let out = run_bounded(node.command("install", &[]), victim, secs(10));
        assert!(!out.success, "{victim}: {}", out.log);
        let path = node.path(victim).display().to_string();
        assert!(
            out.log.contains(&path) && out.log.contains("FIFO"),
            "{victim}: the message names the file and its type: {}",
            out.log
        );
        assert!(!node.path("bin/istio-cni").exists() || victim != "istio-cni");
    }

    // The projected token through kubelet's `..data` symlinks, pointing at a FIFO.
    let node = Node::new();
    node.copy_conf("10-calico.conflist");
    std::fs::create_dir(node.path("sa/..gen_1")).unwrap();
    mkfifo(&node.path("sa/..gen_1/token"));
    std::os::unix::fs::symlink("..gen_1", node.path("sa/..data")).unwrap();
    std::fs::remove_file(node.path("sa/token")).unwrap();
    std::os::unix::fs::symlink("..data/token", node.path("sa/token")).unwrap();
    let out = run_bounded(node.command("install", &[]), "symlinked FIFO", secs(10));
    assert!(!out.success && out.log.contains("FIFO"), "{}", out.log);
    // A real token behind the same links works (symlinks to regular files are fine).
    std::fs::remove_file(node.path("sa/..gen_1/token")).unwrap();
    std::fs::write(node.path("sa/..gen_1/token"), "via.symlinks.sig").unwrap();
    let out = run_bounded(node.command("install", &[]), "symlinked token", secs(10));
    assert!(out.success, "{}", out.log);
    assert_eq!(
        node.json("run/istio-cni-kubeconfig")["users"][0]["user"]["token"],
        "via.symlinks.sig"
    );

    // A FIFO among the CNI configs is skipped (it sorts first), the real primary chained.
    mkfifo(&node.path("net.d/05-fifo.conflist"));
    std::fs::write(node.path("istio-cni"), b"\x7fELF plugin build 2").unwrap();
    let out = run_bounded(node.command("install", &[]), "FIFO config", secs(10));
    assert!(out.success, "{}", out.log);
    // Alone, it is named among the reasons no primary config was found.
    std::fs::remove_file(node.path("net.d/10-calico.conflist")).unwrap();
    let out = run_bounded(node.command("install", &[]), "FIFO config alone", secs(10));
    assert!(
        !out.success && out.log.contains("05-fifo.conflist") && out.log.contains("FIFO"),
        "{}",
        out.log
    );
}

/// Defect 7: `/dev/zero` as a credential is refused without reading it; a huge regular
/// file (sparse: all zeros) is read only up to the limit of its kind, and the message
/// names the file and that limit. Memory stays small throughout.
#[test]
fn dev_zero_and_huge_files_are_refused_with_bounded_memory() {
    let secs = std::time::Duration::from_secs;
    let max_rss_kib = 64 * 1024;
    for victim in ["sa/token", "sa/ca.crt"] {
        let node = Node::new();
        node.copy_conf("10-calico.conflist");
        let p = node.path(victim);
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        let out = run_bounded(node.command("install", &[]), victim, secs(10));
        assert!(!out.success, "{victim}: {}", out.log);
        assert!(
            out.log.contains(&p.display().to_string()) && out.log.contains("character device"),
            "{victim}: {}",
            out.log
        );
        assert!(
            out.max_rss_kib < max_rss_kib,
            "{victim}: {} KiB",
            out.max_rss_kib
        );

        std::fs::remove_file(&p).unwrap();
        std::fs::File::create(&p).unwrap().set_len(2 << 30).unwrap();
        let out = run_bounded(node.command("install", &[]), victim, secs(10));
        assert!(!out.success, "{victim}: {}", out.log);
        assert!(
            out.log.contains(&p.display().to_string()) && out.log.contains("1 MiB"),
            "{victim}: the message names the file and the limit: {}",
            out.log
        );
        assert!(
            out.max_rss_kib < max_rss_kib,
            "{victim}: {} KiB",
            out.max_rss_kib
        );
    }

    // A huge config: skipped like an invalid one, and named with the limit when it is
    // the only candidate.
    let node = Node::new();
    std::fs::File::create(node.path("net.d/05-huge.conflist"))
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let out = run_bounded(node.command("install", &[]), "huge config", secs(10));
    assert!(
        !out.success && out.log.contains("05-huge.conflist") && out.log.contains("4 MiB"),
        "{}",
        out.log
    );
    assert!(out.max_rss_kib < max_rss_kib, "{} KiB", out.max_rss_kib);
    node.copy_conf("10-calico.conflist");
    let out = run_bounded(
        node.command("install", &[]),
        "huge config skipped",
        secs(10),
    );
    assert!(out.success, "{}", out.log);

    // A plugin binary beyond its (generous) limit is refused before anything is copied;
    // the earlier binary stays.
    std::fs::File::create(node.path("istio-cni"))
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let out = run_bounded(node.command("install", &[]), "huge binary", secs(10));
    assert!(
        !out.success
            && out
                .log
                .contains(&node.path("istio-cni").display().to_string())
            && out.log.contains("256 MiB"),
        "{}",
        out.log
    );
    assert_eq!(
        std::fs::read(node.path("bin/istio-cni")).unwrap(),
        b"\x7fELF plugin build 1"
    );
    assert!(out.max_rss_kib < max_rss_kib, "{} KiB", out.max_rss_kib);
}

/// Defect 8: two agents installing at once (a rolling upgrade with changed settings)
/// never fail each other's passes: each removes only its own temp files, and a `.conf`
/// primary that the other agent already replaced is fine. No file is torn, the entry is
/// never chained twice, and no temp file is left.
#[test]
fn two_agents_installing_at_once_never_fail() {
    let node = Node::new();
    // Two plugin builds, big enough that their copies overlap: each pass rewrites the binary.
    let build = |n: u8| -> Vec<u8> { (0..4 << 20).map(|i: u32| (i % 251) as u8 ^ n).collect() };
    std::fs::write(node.path("istio-cni-a"), build(1)).unwrap();
    std::fs::write(node.path("istio-cni-b"), build(2)).unwrap();
    let agent = |which: &str| {
        let (ns, bin) = if which == "a" {
            ("kube-system", node.path("istio-cni-a"))
        } else {
            ("kube-system,other", node.path("istio-cni-b"))
        };
        let mut cmd = node.command_with("install", &bin, &["--exclude-namespaces", ns]);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    let check = |round: &str| {
        let files = snapshot(&node.path("net.d"));
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["10-bridge.conflist"], "{round}: temp files left?");
        let list: Value = serde_json::from_slice(&files[0].1).unwrap();
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "istio-cni"], "{round}");
        let bin = std::fs::read(node.path("bin/istio-cni")).unwrap();
        assert!(bin == build(1) || bin == build(2), "{round}: torn binary");
        let bins: Vec<_> = std::fs::read_dir(node.path("bin")).unwrap().collect();
        assert_eq!(bins.len(), 1, "{round}: temp files left in the bin dir");
    };

    // A `.conf` primary: both agents chain it at the same moment, both write the
    // `.conflist` and remove the `.conf`; one of them finds it already gone.
    for round in 0..30 {
        for f in std::fs::read_dir(node.path("net.d")).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        node.copy_conf("10-bridge.conf");
        let (a, b) = (agent("a").spawn().unwrap(), agent("b").spawn().unwrap());
        for (name, child) in [("a", a), ("b", b)] {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                ".conf round {round}, agent {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        check(&format!(".conf round {round}"));
    }

    // Then 60 passes each, free-running: every pass rewrites the entry and the binary.
    let loop_of = |which: &'static str| {
        let mut failures = Vec::new();
        for pass in 0..60 {
            let out = agent(which).output().unwrap();
            if !out.status.success() {
                failures.push(format!(
                    "agent {which}, pass {pass}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        failures
    };
    let failures: Vec<String> = std::thread::scope(|s| {
        let a = s.spawn(|| loop_of("a"));
        let b = s.spawn(|| loop_of("b"));
        let mut f = a.join().unwrap();
        f.extend(b.join().unwrap());
        f
    });
    assert!(
        failures.is_empty(),
        "{} failed passes:\n{}",
        failures.len(),
        failures.join("\n")
    );
    check("after the free-running passes");
}
