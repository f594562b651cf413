//! The plugin never harms a node, whatever it is handed: hostile `CNI_NETNS`, annotations,
//! configurations and API answers, each run against the release-shaped binary in network
//! namespaces made by the test (never the machine's own). Needs root.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use istio_cni_e2e::chain::istio_cni_bin;
use istio_cni_e2e::net::TestNetns;
use istio_cni_e2e::sandbox::{injected_pod, Options, Sandbox};
use serde_json::{json, Value};

/// How long any single plugin run may take before the test calls it hung.
const HANG: Duration = Duration::from_secs(20);

/// Runs the plugin once with `env` and `stdin`, as `prefix` (e.g. `ip netns exec NS`),
/// killing it after [`HANG`]. Returns its output, or panics when it hung.
fn run_plugin(prefix: &[&str], env: &[(&str, &str)], stdin: &Value) -> Output {
    let bin = istio_cni_bin();
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the plugin");
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes());
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > HANG {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the plugin hung for {HANG:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The CNI error code on stdout, checking that stdout holds exactly one error object.
fn error_code(out: &Output) -> u64 {
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON value ({e}): {:?}; stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(!out.status.success(), "a CNI error exits non-zero: {v}");
    v["code"].as_u64().expect("code")
}

fn meshed(name: &str, annotations: Value) -> Value {
    injected_pod("default", name, annotations, json!({}))
}

/// A CNI environment for `verb` on pod default/web in `netns`.
fn cni_env<'a>(verb: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", verb),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

/// Our netconf reading pod default/web from a file (no API), with a prevResult.
fn local_conf(dir: &Path) -> Value {
    let pod = dir.join("pod.json");
    std::fs::write(&pod, meshed("web", json!({})).to_string()).unwrap();
    json!({"cniVersion": "1.0.0", "name": "k8s", "type": "istio-cni",
           "local_pod_file": pod, "validation": {"probe": false},
           "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                          "ips": [{"address": "10.66.0.2/24", "interface": 0}]}})
}

#[test]
fn annotations_that_read_as_iptables_options_are_refused_and_leave_nothing() {
    for (key, value) in [
        ("traffic.sidecar.istio.io/excludeInterfaces", "-j"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "--goto"),
        ("istio.io/reroute-virtual-interfaces", "-A"),
    ] {
        let f = Sandbox::new(meshed("web", json!({ key: value })));
        let e = f.add().expect_err("ADD must fail");
        assert_eq!(e.code(), Some(101), "{key}={value}: {e:?}");
        assert!(e.msg().contains(key), "the error names {key}: {}", e.msg());
        assert!(
            f.pod.istio_rules(false).is_empty(),
            "{key}={value}: rules left behind: {:?}",
            f.pod.istio_rules(false)
        );
    }
}

#[test]
fn all_address_ranges_validate_in_both_families() {
    for (key, value) in [
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "0.0.0.0/0,::/0",
        ),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "0.0.0.0/0,::/0",
        ),
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.0/8,::/0",
        ),
    ] {
        let f = Sandbox::with(
            meshed("web", json!({ key: value })),
            Options {
                ipv6: true,
                ..Options::default()
            },
        );
        let result = f
            .add()
            .unwrap_or_else(|e| panic!("{key}={value}: ADD failed: {e:?}"));
        assert!(!f.pod.istio_rules(false).is_empty());
        assert!(!f.pod.istio_rules(true).is_empty());
        f.ours().check(&f.attachment, &result).unwrap();
    }
}

#[test]
fn a_stale_pod_uid_fails_closed() {
    let mut f = Sandbox::new(meshed("web", json!({})));
    f.attachment
        .args
        .push_str(";K8S_POD_UID=0b5c6d8e-0000-4000-8000-000000000000");
    let e = f.add().expect_err("ADD must fail");
    assert_eq!(e.code(), Some(100), "{e:?}");
    assert!(e.msg().contains("another pod"), "{}", e.msg());
    assert!(f.pod.istio_rules(false).is_empty());
}

#[test]
fn del_succeeds_and_removes_the_rules_whatever_the_configuration() {
    for bad in [
        json!({"plugin_log_level": "trace"}),
        json!({"native_nftables": true}),
    ] {
        let f = Sandbox::new(meshed("web", json!({})));
        let result = f.add().unwrap();
        assert!(!f.pod.istio_rules(false).is_empty());
        let mut ours = f.ours();
        for (k, v) in bad.as_object().unwrap() {
            ours.plugins[0][k] = v.clone();
        }
        ours.del(&f.attachment, Some(&result))
            .unwrap_or_else(|e| panic!("DEL with {bad}: {e:?}"));
        assert!(f.pod.istio_rules(false).is_empty(), "DEL with {bad}");
    }
    // And without any usable configuration or environment at all.
    let ns = TestNetns::new("d");
    let netns = ns.path();
    for (env, stdin) in [
        (
            cni_env("DEL", netns.to_str().unwrap()),
            json!("not an object"),
        ),
        (
            vec![("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "-bad\nid")],
            json!({"cniVersion": "9.9.9"}),
        ),
    ] {
        let out = run_plugin(&["ip", "netns", "exec", &ns.name], &env, &stdin);
        assert!(
            out.status.success(),
            "DEL must succeed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "DEL prints nothing");
    }
}

/// The plugin runs in netns `own`, under a PID namespace whose PID 1 (a shell) sits in
/// netns `init`: `/proc/self/ns/net` is `own`, `/proc/1/ns/net` is `init`, both made by
/// the test. Neither may be written into, by any verb.
#[test]
fn never_writes_into_its_own_or_pid_1_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let init = TestNetns::new("i");
    let own = TestNetns::new("o");
    let conf = local_conf(dir.path());
    for target in [
        "/proc/self/ns/net",
        "/proc/thread-self/ns/net",
        "/proc/1/ns/net",
    ] {
        for verb in ["ADD", "CHECK", "DEL"] {
            let prefix = [
                "ip",
                "netns",
                "exec",
                &init.name,
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                "sh",
                "-c",
                "ip netns exec \"$0\" \"$1\"; exit $?",
                &own.name,
            ];
            let out = run_plugin(&prefix, &cni_env(verb, target), &conf);
            if verb == "DEL" {
                assert!(out.status.success(), "DEL {target} must exit 0");
            } else {
                assert_eq!(error_code(&out), 102, "{verb} {target}");
                let msg = String::from_utf8_lossy(&out.stdout);
                assert!(msg.contains("refusing network namespace"), "{msg}");
            }
            for ns in [&init, &own] {
                assert!(
                    ns.istio_rules(false).is_empty(),
                    "{verb} {target} wrote into {}",
                    ns.name
                );
            }
        }
    }
}

#[test]
fn a_fifo_as_netns_fails_fast_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("netns-fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let ns = TestNetns::new("f");
    let conf = local_conf(dir.path());
    for verb in ["ADD", "CHECK", "DEL"] {
        let out = run_plugin(
            &["ip", "netns", "exec", &ns.name],
            &cni_env(verb, fifo.to_str().unwrap()),
            &conf,
        );
        if verb == "DEL" {
            assert!(out.status.success());
        } else {
            assert_eq!(error_code(&out), 102, "{verb}");
        }
    }
}

/// A one-shot HTTP server on loopback that answers every request with `response`, then
/// (for an endless body) keeps writing `chunk` until the client goes away or 64 MiB went
/// out. Returns the kubeconfig path.
fn serve_http(dir: &Path, head: &'static str, body: Vec<u8>, endless: bool) -> std::path::PathBuf {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(64) {
            let Ok(mut conn) = conn else { return };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                if conn.write_all(head.as_bytes()).is_err() {
                    return;
                }
                if !endless {
                    let _ = conn.write_all(&body);
                    return;
                }
                let chunk = format!("{:x}\r\n", body.len());
                let mut sent = 0usize;
                while sent < 64 << 20 {
                    let ok = conn.write_all(chunk.as_bytes()).is_ok()
                        && conn.write_all(&body).is_ok()
                        && conn.write_all(b"\r\n").is_ok();
                    if !ok {
                        return;
                    }
                    sent += body.len();
                }
            });
        }
    });
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{addr}\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    path
}

fn api_conf(kubeconfig: &Path, timeout_ms: u64) -> Value {
    json!({"cniVersion": "1.0.0", "name": "k8s", "type": "istio-cni",
           "kubernetes": {"kubeconfig": kubeconfig, "api_timeout_ms": timeout_ms}})
}

#[test]
fn an_endless_api_answer_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let ns = TestNetns::new("e");
    let body = format!("{{\"kind\":\"Pod\",\"x\":\"{}", "a".repeat(60_000)).into_bytes();
    let kubeconfig = serve_http(
        dir.path(),
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        body,
        true,
    );
    let start = Instant::now();
    let netns = ns.path();
    let out = run_plugin(
        &[],
        &cni_env("ADD", netns.to_str().unwrap()),
        &api_conf(&kubeconfig, 10_000),
    );
    assert_eq!(error_code(&out), 100);
    let msg = String::from_utf8_lossy(&out.stdout);
    assert!(msg.contains("larger than"), "{msg}");
    assert!(start.elapsed() < HANG);
    assert!(ns.istio_rules(false).is_empty());
}

#[test]
fn a_failing_api_is_reported_with_its_status_not_as_a_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ns = TestNetns::new("s");
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "etcdserver: leader changed", "reason": "InternalError", "code": 500});
    let body = status.to_string().into_bytes();
    let head: &'static str = Box::leak(
        format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_boxed_str(),
    );
    let kubeconfig = serve_http(dir.path(), head, body, false);
    let netns = ns.path();
    let out = run_plugin(
        &[],
        &cni_env("ADD", netns.to_str().unwrap()),
        &api_conf(&kubeconfig, 1_000),
    );
    assert_eq!(error_code(&out), 11);
    let msg = String::from_utf8_lossy(&out.stdout);
    assert!(
        msg.contains("500") && msg.contains("leader changed"),
        "{msg}"
    );
}

#[test]
fn an_endless_local_pod_file_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let ns = TestNetns::new("z");
    let mut conf = local_conf(dir.path());
    conf["local_pod_file"] = json!("/dev/zero");
    let netns = ns.path();
    let out = run_plugin(
        &["ip", "netns", "exec", &ns.name],
        &cni_env("ADD", netns.to_str().unwrap()),
        &conf,
    );
    assert_eq!(error_code(&out), 100);
    assert!(String::from_utf8_lossy(&out.stdout).contains("larger than"));
}

/// `conf` for `backend`: `FORCE_IPTABLES_BINARY` and `native_nftables` as the name says
/// (`legacy`, `nft`, `nftables`), the probe on, and the lock dir in `dir`.
fn conf_for_backend(dir: &Path, backend: &str) -> (Value, Vec<(&'static str, &'static str)>) {
    let mut conf = local_conf(dir);
    conf["validation"]["probe"] = json!(true);
    conf["cni_agent_run_dir"] = json!(dir);
    let env = match backend {
        "legacy" => vec![("FORCE_IPTABLES_BINARY", "legacy")],
        "nft" => vec![("FORCE_IPTABLES_BINARY", "nft")],
        _ => {
            conf["native_nftables"] = json!(true);
            Vec::new()
        }
    };
    (conf, env)
}

/// ADD, CHECK or DEL of pod default/web in `ns` with container ID `id` and `extra` env.
fn run_verb(verb: &str, ns: &TestNetns, id: &str, extra: &[(&str, &str)], conf: &Value) -> Output {
    let netns = ns.path();
    let mut env = cni_env(verb, netns.to_str().unwrap());
    env.retain(|(k, _)| *k != "CNI_CONTAINERID");
    env.push(("CNI_CONTAINERID", id));
    env.extend_from_slice(extra);
    run_plugin(&[], &env, conf)
}

/// 20 ADDs at once into one netns under different container IDs, as a runtime retrying a
/// slow ADD does: each one that reports success leaves the pod redirected (CHECK passes
/// after all of them). Write, validate and rollback are serialised per netns, so no
/// loser's rollback removes a winner's validated rules, and no two probes race for the
/// capture port. With each backend.
#[test]
fn concurrent_adds_into_one_netns_all_leave_the_rules() {
    for backend in ["legacy", "nft", "nftables"] {
        let ns = TestNetns::new("cc");
        let dir = tempfile::tempdir().unwrap();
        let (conf, env) = conf_for_backend(dir.path(), backend);
        let outs: Vec<Output> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..20)
                .map(|i| {
                    let (ns, conf, env) = (&ns, &conf, &env);
                    s.spawn(move || run_verb("ADD", ns, &format!("retry{i}"), env, conf))
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        for (i, out) in outs.iter().enumerate() {
            assert!(
                out.status.success(),
                "{backend}: ADD {i} failed: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let check = run_verb("CHECK", &ns, "retry0", &env, &conf);
        assert!(
            check.status.success(),
            "{backend}: every ADD succeeded, so the rules must be there: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
}

/// Lines of `<tool>-save` (`iptables-legacy`, `iptables-nft`) in `ns` that name an ISTIO
/// chain.
fn istio_lines(ns: &TestNetns, tool: &str) -> usize {
    ns.exec(&[&format!("{tool}-save")])
        .lines()
        .filter(|l| l.contains("ISTIO"))
        .count()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// "Never two backends' rules" covers the two iptables variants: an ADD with one removes
/// the other's Istio rules, whichever came first, and DEL with either removes both.
#[test]
fn iptables_legacy_and_nft_never_both_hold_rules() {
    for (first, second) in [("legacy", "nft"), ("nft", "legacy")] {
        let ns = TestNetns::new("xv");
        let dir = tempfile::tempdir().unwrap();
        let (conf1, env1) = conf_for_backend(dir.path(), first);
        let (conf2, env2) = conf_for_backend(dir.path(), second);
        assert_ok(&run_verb("ADD", &ns, "c1", &env1, &conf1), "first ADD");
        assert!(istio_lines(&ns, &format!("iptables-{first}")) > 0);
        assert_ok(&run_verb("ADD", &ns, "c2", &env2, &conf2), "second ADD");
        assert!(istio_lines(&ns, &format!("iptables-{second}")) > 0);
        assert_eq!(
            istio_lines(&ns, &format!("iptables-{first}")),
            0,
            "ADD with {second} removed the rules {first} wrote"
        );
        assert_ok(&run_verb("CHECK", &ns, "c2", &env2, &conf2), "CHECK");
        // Both variants hold rules again (written behind the plugin's back); DEL with
        // either removes both.
        assert_ok(&run_verb("ADD", &ns, "c3", &env1, &conf1), "ADD again");
        assert_ok(&run_verb("ADD", &ns, "c4", &env2, &conf2), "ADD again");
        ns.exec(&[
            &format!("iptables-{first}"),
            "-t",
            "nat",
            "-N",
            "ISTIO_OUTPUT",
        ]);
        ns.exec(&[
            &format!("iptables-{first}"),
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-j",
            "ISTIO_OUTPUT",
        ]);
        assert_ok(&run_verb("DEL", &ns, "c4", &env2, &conf2), "DEL");
        for tool in ["iptables-legacy", "iptables-nft"] {
            assert_eq!(istio_lines(&ns, tool), 0, "{tool} rules left after DEL");
        }
    }
}

/// A dormant table keeps every rule in it from taking effect, although the rules read back
/// as written: CHECK reports it (for iptables-nft's `ip nat` and for the nftables
/// backend's own table), and a new write wakes the table.
#[test]
fn a_dormant_table_is_drift_and_a_write_wakes_it() {
    for (backend, table) in [("nft", "ip nat"), ("nftables", "inet istio-proxy-nat")] {
        let ns = TestNetns::new("dm");
        let dir = tempfile::tempdir().unwrap();
        let (conf, env) = conf_for_backend(dir.path(), backend);
        assert_ok(&run_verb("ADD", &ns, "c1", &env, &conf), "ADD");
        let (family, name) = table.split_once(' ').unwrap();
        ns.exec(&["nft", "add", "table", family, name, "{ flags dormant; }"]);
        let check = run_verb("CHECK", &ns, "c1", &env, &conf);
        assert_eq!(
            error_code(&check),
            104,
            "{backend}: CHECK must see the dormant table"
        );
        let msg = String::from_utf8_lossy(&check.stdout);
        assert!(msg.contains("dormant") && msg.contains(table), "{msg}");
        assert_ok(&run_verb("ADD", &ns, "c2", &env, &conf), "ADD wakes it");
        assert!(!ns
            .exec(&["nft", "list", "table", family, name])
            .contains("dormant"));
        assert_ok(
            &run_verb("CHECK", &ns, "c2", &env, &conf),
            "CHECK after the wake",
        );
    }
}

/// A rule of other software placed ahead of our jump in a built-in chain, that can take the
/// pod's TCP around the sidecar (`iptables -t nat -I OUTPUT 1 -p tcp -j RETURN`), is drift:
/// CHECK fails naming it. Shapes that cannot (a log, a counter, ICMP) pass. A
/// new write (ADD, or the agent's repair, which shares it) puts ours back at the head.
#[test]
fn a_bypass_ahead_of_our_jump_is_drift() {
    let ns = TestNetns::new("by");
    let dir = tempfile::tempdir().unwrap();
    let (conf, env) = conf_for_backend(dir.path(), "nft");
    assert_ok(&run_verb("ADD", &ns, "c1", &env, &conf), "ADD");
    let insert = |args: &[&str]| {
        let mut cmd = vec!["iptables-nft", "-t", "nat", "-I", "OUTPUT", "1"];
        cmd.extend_from_slice(args);
        ns.exec(&cmd);
    };
    for harmless in [
        &["-j", "LOG"][..],
        &["-p", "icmp", "-j", "RETURN"],
        &["-p", "tcp"],
    ] {
        insert(harmless);
        assert_ok(&run_verb("CHECK", &ns, "c1", &env, &conf), "harmless");
    }
    for bypass in [
        &["-p", "tcp", "-j", "RETURN"][..],
        &["-d", "10.0.0.0/8", "-j", "ACCEPT"],
    ] {
        ns.exec(&["iptables-nft", "-t", "nat", "-F", "OUTPUT"]);
        assert_ok(&run_verb("ADD", &ns, "c2", &env, &conf), "ADD again");
        insert(bypass);
        let check = run_verb("CHECK", &ns, "c2", &env, &conf);
        assert_eq!(error_code(&check), 104, "{bypass:?} must be seen");
        let msg = String::from_utf8_lossy(&check.stdout);
        assert!(msg.contains("comes before our"), "{msg}");
        // A new write leaves the foreign rule, but after ours.
        assert_ok(
            &run_verb("ADD", &ns, "c3", &env, &conf),
            "ADD puts ours first",
        );
        let output: Vec<String> = ns
            .exec(&["iptables-nft-save", "-t", "nat"])
            .lines()
            .filter(|l| l.starts_with("-A OUTPUT"))
            .map(str::to_owned)
            .collect();
        assert!(output[0].contains("ISTIO_OUTPUT"), "{output:?}");
        assert!(output.len() >= 2, "the foreign rule stays: {output:?}");
        assert_ok(&run_verb("CHECK", &ns, "c3", &env, &conf), "CHECK after");
    }
}

/// A run dir that cannot hold the lock file (here a directory sits where the file
/// belongs) does not stop pods: ADD runs without the lock, with a warning, and STATUS
/// names the problem. DEL never creates the run dir or the lock file.
#[test]
fn a_broken_lock_file_degrades_to_unlocked_and_del_creates_nothing() {
    let ns = TestNetns::new("lk");
    let dir = tempfile::tempdir().unwrap();
    let (mut conf, env) = conf_for_backend(dir.path(), "nft");
    std::fs::create_dir(dir.path().join("netns.lock")).unwrap();
    let add = run_verb("ADD", &ns, "c1", &env, &conf);
    assert_ok(&add, "ADD without the lock");
    assert!(
        String::from_utf8_lossy(&add.stderr).contains("without the per-netns lock"),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let mut status_conf = conf.clone();
    status_conf["cniVersion"] = json!("1.1.0");
    let status = run_verb("STATUS", &ns, "c1", &env, &status_conf);
    assert_eq!(error_code(&status), 50);
    assert!(String::from_utf8_lossy(&status.stdout).contains("netns.lock"));
    let gone = dir.path().join("gone");
    conf["cni_agent_run_dir"] = json!(gone);
    assert_ok(&run_verb("DEL", &ns, "c1", &env, &conf), "DEL");
    assert!(!gone.exists(), "DEL created {}", gone.display());
    assert!(
        ns.istio_rules(false).is_empty(),
        "DEL still removed the rules"
    );
}
