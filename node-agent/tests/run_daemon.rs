//! `istio-cni-node-agent run`, the real binary with the real plugin, against temp dirs laid
//! out like the agent's mounts: readiness goes 503 → 200 once a primary config appears and
//! the self-test passes; a rewrite by the primary CNI is re-chained; a token rotation
//! (projected volume `..data` swap) rewrites the kubeconfig; SIGTERM cleans up. Needs root.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use istio_cni_e2e::agent::{
    chained, get, project_token, register_agent_pod, wait_for, Daemon, Kind, Node, PRIMARY,
};

#[test]
fn daemon_installs_keeps_chained_and_cleans_up() {
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    let mut daemon = node.daemon(&[]);

    // No primary config yet: alive but not ready, saying why.
    let (body, _) = wait_for("/readyz 503", || match daemon.readyz() {
        Some((503, body)) if body.contains("no primary CNI config") => Some(body),
        _ => None,
    });
    assert!(body.contains("install:"), "{body}");
    assert_eq!(get(daemon.ready_port, "/healthz").unwrap().0, 200);
    // Upstream's gauge says not ready; waiting for the primary CNI is not a failed install
    // (upstream waits for it without counting).
    let m = daemon.scrape().expect("/metrics parses as OpenMetrics");
    assert_eq!(
        m.value("istio_cni_install_ready", Kind::Gauge, &[]),
        Some(0.0)
    );
    for result in ["SUCCESS", "CREATE_CNI_CONFIG_FAILURE"] {
        assert_eq!(
            m.value("istio_cni_installs", Kind::Counter, &[("result", result)]),
            None
        );
    }

    // The primary CNI writes its config: chained, self-tested, ready.
    let conf = node.conf();
    std::fs::write(&conf, PRIMARY).unwrap();
    eprintln!(
        "ready {:?} after the primary config appeared",
        daemon.wait_ready()
    );
    assert!(chained(&conf));
    assert!(node.bin.join("istio-cni").is_file());
    let kubeconfig = node.run.join("istio-cni-kubeconfig");
    let token = || -> Option<String> {
        let v: Value = serde_json::from_slice(&std::fs::read(&kubeconfig).ok()?).ok()?;
        v["users"][0]["user"]["token"].as_str().map(str::to_owned)
    };
    assert_eq!(token().as_deref(), Some("token-one"));

    // The primary CNI rewrites its file without our entry: re-chained.
    let mut rechain = Vec::new();
    for _ in 0..3 {
        std::fs::write(&conf, PRIMARY).unwrap();
        rechain.push(wait_for("re-chain", || chained(&conf).then_some(())).1);
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("re-chained after primary rewrites in {rechain:?}");

    // Token rotation through the projected volume's ..data swap.
    project_token(&node.sa, 2, "token-two");
    let (_, took) = wait_for("kubeconfig with the rotated token", || {
        (token()? == "token-two").then_some(())
    });
    eprintln!("kubeconfig rewritten {took:?} after the token rotated");

    let (_, metrics) = get(daemon.metrics_port, "/metrics").unwrap();
    assert!(metrics.contains("istio_cni_ready 1"), "{metrics}");
    assert!(
        metrics.contains("istio_cni_conflist_rewrites_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("istio_cni_self_test_runs_total{result=\"success\"}"),
        "{metrics}"
    );
    // Upstream Istio's series (cni/pkg/install/monitoring.go): names, types, labels and
    // help texts, parsed as Prometheus parses them.
    let m = daemon.scrape().expect("/metrics parses as OpenMetrics");
    assert!(
        m.value(
            "istio_cni_installs",
            Kind::Counter,
            &[("result", "SUCCESS")]
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    assert_eq!(
        m.value("istio_cni_install_ready", Kind::Gauge, &[]),
        Some(1.0)
    );
    assert_eq!(
        m.help("istio_cni_installs"),
        Some("Total number of CNI plugins installed by the Istio CNI installer")
    );
    assert_eq!(
        m.help("istio_cni_install_ready"),
        Some("Whether the CNI plugin installation is ready or not")
    );

    // SIGTERM: our entry, the kubeconfig and the binary are removed; the primary stays.
    assert!(daemon.sigterm().success());
    let left: Value = serde_json::from_slice(&std::fs::read(&conf).unwrap()).unwrap();
    assert_eq!(left, serde_json::from_str::<Value>(PRIMARY).unwrap());
    assert!(!kubeconfig.exists() && !node.bin.join("istio-cni").exists());
    let left: Vec<_> = std::fs::read_dir(&node.run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != istio_cni::lock::LOCK_FILE)
        .collect();
    assert!(
        left.is_empty(),
        "no self-test files, no log socket left (the empty lock file may stay): {left:?}"
    );
    // The plugin's own log lines reached the agent's log, tagged with the pod.
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        log.contains("plugin[ADD") && log.contains("istio-cni-self-test/self-test]: pod istio-cni-self-test/self-test: redirection rules written and validated"),
        "{log}"
    );
}

#[test]
fn a_fight_over_the_config_backs_off_and_shows_in_readiness() {
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    let conf = node.conf();
    std::fs::write(&conf, PRIMARY).unwrap();
    let mut daemon = node.daemon(&["--self-test", "false", "--cleanup-on-exit", "false"]);
    daemon.wait_ready();
    // Another writer keeps dropping our entry.
    let (body, _) = wait_for("conflict in /readyz", || {
        if chained(&conf) {
            std::fs::write(&conf, PRIMARY).unwrap();
        }
        match daemon.readyz() {
            Some((503, body)) if body.contains("conflict:") => Some(body),
            _ => None,
        }
    });
    assert!(
        body.contains("10-ptp.conflist") && body.contains("retrying in"),
        "{body}"
    );
    // The other writer stops: after the back-off our entry is back and the conflict clears.
    daemon.wait_ready();
    assert!(chained(&conf));

    // Without cleanup (an upgrade), SIGTERM leaves the plugin installed.
    assert!(daemon.sigterm().success());
    assert!(chained(&conf) && node.bin.join("istio-cni").exists());
}

#[test]
fn a_conf_dir_that_appears_late_is_picked_up() {
    let node = Node::new("cni/net.d");
    let daemon = node.daemon(&["--self-test", "false"]);
    wait_for(
        "/readyz 503 while the conf dir is missing",
        || match daemon.readyz() {
            Some((503, body)) if body.contains("install:") => Some(()),
            _ => None,
        },
    );
    // The primary CNI creates its dir and config (no resync needed: the resync is 60 s).
    std::fs::create_dir_all(&node.net).unwrap();
    std::fs::write(node.conf(), PRIMARY).unwrap();
    eprintln!(
        "ready {:?} after the conf dir appeared",
        daemon.wait_ready()
    );
    assert!(chained(&node.conf()));
}

#[test]
fn sigterm_keeps_the_plugin_during_an_upgrade_and_removes_it_on_uninstall() {
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    std::fs::write(node.conf(), PRIMARY).unwrap();
    let mut api = istio_cni_e2e::fake_api::FakeApi::start();
    let kubeconfig = api.write_kubeconfig(node.dir.path());
    register_agent_pod(&api);
    registered_node(&api);
    let kc = kubeconfig.to_str().unwrap();
    let in_cluster = [
        "--self-test",
        "false",
        "--kubeconfig",
        kc,
        "--pod-name",
        "istio-cni-node-x7k2p",
        "--node-name",
        "node-1",
    ];

    // Upgrade: the DaemonSet is still there, so the plugin stays for the next agent, and
    // the node stays untainted.
    let mut daemon = node.daemon(&in_cluster);
    daemon.wait_ready();
    wait_for("untainted", || {
        (!taint_keys(&api).contains(&TAINT.to_owned())).then_some(())
    });
    let (ready, _) = wait_for("IstioCNIReady=True", || {
        our_condition(&api).filter(|c| c["status"] == "True")
    });
    assert!(daemon.sigterm().success());
    assert!(
        !taint_keys(&api).contains(&TAINT.to_owned()),
        "no taint during an upgrade"
    );
    assert_eq!(
        our_condition(&api),
        Some(ready),
        "the condition is left as it was during an upgrade"
    );
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        log.contains(
            "keeping the plugin installed: DaemonSet istio-system/istio-cni-node still exists"
        ),
        "{log}"
    );
    assert!(chained(&node.conf()) && node.bin.join("istio-cni").exists());

    // The API cannot answer: the plugin stays too (safe for pod teardown).
    let mut daemon = node.daemon(&in_cluster);
    daemon.wait_ready();
    api.set_fault(istio_cni_e2e::fake_api::Fault::Status(503));
    assert!(daemon.sigterm().success());
    assert!(chained(&node.conf()));
    api.set_fault(istio_cni_e2e::fake_api::Fault::None);

    // Uninstall: the DaemonSet is deleted, so everything is removed.
    let mut daemon = node.daemon(&in_cluster);
    daemon.wait_ready();
    assert!(api.remove("daemonsets", "istio-system", "istio-cni-node"));
    assert!(daemon.sigterm().success());
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        log.contains("removing the plugin: DaemonSet istio-system/istio-cni-node is gone"),
        "{log}"
    );
    assert!(
        taint_keys(&api).contains(&TAINT.to_owned()),
        "an uninstall taints the node again"
    );
    assert_eq!(our_condition(&api).unwrap()["reason"], "Uninstalled");
    assert!(!chained(&node.conf()) && !node.bin.join("istio-cni").exists());
    api.stop();
}

#[test]
fn a_read_only_bin_dir_keeps_the_agent_not_ready_with_the_reason() {
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    std::fs::write(node.conf(), PRIMARY).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(&node.bin)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a read-only tmpfs (needs root)");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&node.bin);
    let daemon = node.daemon(&[]);
    let (body, _) = wait_for("/readyz 503 naming the read-only dir", || {
        match daemon.readyz() {
            Some((503, body)) if body.contains("mounted read-only") => Some(body),
            _ => None,
        }
    });
    assert!(body.contains(&node.bin.display().to_string()), "{body}");
}

const TAINT: &str = "cni.istio.io/not-ready";

/// A node registered with our taint and another one, and kubelet's Ready condition.
fn registered_node(api: &istio_cni_e2e::fake_api::FakeApi) {
    api.put(
        "nodes",
        serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
            "spec": {"taints": [{"key": "example.com/other", "effect": "NoSchedule"},
                                {"key": TAINT, "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
}

fn taint_keys(api: &istio_cni_e2e::fake_api::FakeApi) -> Vec<String> {
    api.get("nodes", "", "node-1").unwrap()["spec"]["taints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| t["key"].as_str().unwrap().to_owned())
        .collect()
}

fn our_condition(api: &istio_cni_e2e::fake_api::FakeApi) -> Option<Value> {
    api.get("nodes", "", "node-1").unwrap()["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "IstioCNIReady")
        .cloned()
}

/// A node registered tainted in a fake API, and an agent for it (grace 1 s, no self-test).
/// With `primary`, the primary CNI config is already there; with `api_down`, the API
/// answers 503 from the start.
fn taint_setup(primary: bool, api_down: bool) -> (Node, istio_cni_e2e::fake_api::FakeApi, Daemon) {
    taint_setup_with(primary, api_down, |_| {})
}

/// [`taint_setup`], with the registered node changed by `edit` before the agent starts.
fn taint_setup_with(
    primary: bool,
    api_down: bool,
    edit: impl FnOnce(&mut Value),
) -> (Node, istio_cni_e2e::fake_api::FakeApi, Daemon) {
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    if primary {
        std::fs::write(node.conf(), PRIMARY).unwrap();
    }
    let api = istio_cni_e2e::fake_api::FakeApi::start();
    registered_node(&api);
    let mut n = api.get("nodes", "", "node-1").unwrap();
    edit(&mut n);
    api.put("nodes", n);
    if api_down {
        api.set_fault(istio_cni_e2e::fake_api::Fault::Status(503));
    }
    let args = taint_args(&api.write_kubeconfig(node.dir.path()));
    let daemon = node.daemon(&args.iter().map(String::as_str).collect::<Vec<_>>());
    (node, api, daemon)
}

fn taint_args(kubeconfig: &Path) -> Vec<String> {
    [
        "--self-test",
        "false",
        "--node-name",
        "node-1",
        "--taint-grace-seconds",
        "1",
        "--kubeconfig",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([kubeconfig.display().to_string()])
    .collect()
}

#[test]
fn the_node_is_untainted_when_ready_keeping_other_taints_and_then_left_alone() {
    let (_node, api, daemon) = taint_setup(true, false);
    daemon.wait_ready();
    let ready_at = Instant::now();
    wait_for("untainted", || {
        (!taint_keys(&api).contains(&TAINT.to_owned())).then_some(())
    });
    eprintln!(
        "untainted {:?} after /readyz turned 200",
        ready_at.elapsed()
    );
    assert_eq!(
        taint_keys(&api),
        ["example.com/other"],
        "the other taint is kept"
    );
    let (cond, _) = wait_for("condition True", || {
        our_condition(&api).filter(|c| c["status"] == "True")
    });
    assert_eq!(cond["reason"], "Ready");
    let conditions = api.get("nodes", "", "node-1").unwrap()["status"]["conditions"].clone();
    assert!(
        conditions
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready"),
        "kubelet's condition kept"
    );
    let (events, _) = wait_for("the IstioCNITaintRemoved event", || {
        let events = api.list("events");
        events
            .iter()
            .any(|e| e["reason"] == "IstioCNITaintRemoved")
            .then_some(events)
    });
    assert!(
        events.iter().any(|e| e["reason"] == "IstioCNITaintRemoved"
            && e["regarding"]["name"] == "node-1"
            && e["reportingController"] == "istio-cni-node-agent"),
        "{events:?}"
    );

    // Steady state: no writes at all.
    let writes = api.writes();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(api.writes(), writes, "the steady state writes nothing");
}

#[test]
fn a_concurrent_taint_change_is_retried_not_clobbered() {
    let (node, api, daemon) = taint_setup(false, false);
    // Not ready (no primary config): the condition says so, the taint stays. Wait for the
    // final not-ready message, so that the next node patch is the taint removal.
    wait_for("condition False with the install error", || {
        our_condition(&api).filter(|c| {
            c["status"] == "False"
                && c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("no primary CNI config"))
        })
    });
    // Between the agent's read and its taint patch, another writer adds a taint.
    api.before_next_patch("nodes", "node-1", |n| {
        n["spec"]["taints"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"key": "late", "effect": "NoExecute"}));
    });
    std::fs::write(node.conf(), PRIMARY).unwrap();
    daemon.wait_ready();
    wait_for("untainted", || {
        (!taint_keys(&api).contains(&TAINT.to_owned())).then_some(())
    });
    assert_eq!(
        taint_keys(&api),
        ["example.com/other", "late"],
        "their change survives"
    );
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        log.contains("changed since read") && log.contains("422"),
        "the conflict path ran: {log}"
    );
}

#[test]
fn lost_readiness_retaints_after_the_grace_period_and_recovery_untaints() {
    let (node, api, daemon) = taint_setup(true, false);
    daemon.wait_ready();
    wait_for("untainted", || {
        (!taint_keys(&api).contains(&TAINT.to_owned())).then_some(())
    });

    // The primary config becomes unusable: not ready; after the 1 s grace, tainted again.
    std::fs::write(node.conf(), "{ broken").unwrap();
    let (_, took) = wait_for("re-tainted", || {
        taint_keys(&api).contains(&TAINT.to_owned()).then_some(())
    });
    eprintln!("re-tainted {took:?} after readiness was lost (grace 1 s)");
    assert!(our_condition(&api).unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("install:"));
    wait_for("the IstioCNITaintAdded event", || {
        api.list("events")
            .iter()
            .any(|e| e["reason"] == "IstioCNITaintAdded")
            .then_some(())
    });

    // Recovery.
    std::fs::write(node.conf(), PRIMARY).unwrap();
    daemon.wait_ready();
    wait_for("untainted again", || {
        (!taint_keys(&api).contains(&TAINT.to_owned())).then_some(())
    });
    assert_eq!(taint_keys(&api), ["example.com/other"]);
}

#[test]
fn an_unavailable_api_server_delays_but_does_not_stop_the_untaint() {
    let (_node, api, daemon) = taint_setup(true, true);
    daemon.wait_ready();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        taint_keys(&api).contains(&TAINT.to_owned()),
        "no change while the API is down"
    );
    assert_eq!(
        get(daemon.ready_port, "/healthz").unwrap().0,
        200,
        "no crash"
    );
    api.set_fault(istio_cni_e2e::fake_api::Fault::None);
    let (_, took) = wait_for("untainted once the API is back", || {
        (!taint_keys(&api).contains(&TAINT.to_owned())).then_some(())
    });
    eprintln!("untainted {took:?} after the API came back");
}

#[test]
fn an_invalid_plugin_setting_keeps_the_agent_not_ready_and_writes_nothing() {
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    std::fs::write(node.conf(), PRIMARY).unwrap();
    let daemon = node.daemon(&["--plugin-log-level", "trace"]);
    let (body, _) = wait_for("/readyz 503 naming PLUGIN_LOG_LEVEL", || {
        match daemon.readyz() {
            Some((503, body)) if body.contains("PLUGIN_LOG_LEVEL") => Some(body),
            _ => None,
        }
    });
    assert!(body.contains("trace"), "{body}");
    assert_eq!(std::fs::read_to_string(node.conf()).unwrap(), PRIMARY);
    assert!(!node.bin.join("istio-cni").exists());
}

/// A newer API server has taint and condition fields this build's `k8s-openapi` does not
/// know. The agent still removes its taint, and writes every other entry back as read.
#[test]
fn fields_this_build_does_not_know_survive_and_do_not_block_the_untaint() {
    let (_node, api, daemon) = taint_setup_with(true, false, |n| {
        n["spec"]["taints"][0]["futureField"] = serde_json::json!({"since": "v1.99"});
        n["status"]["conditions"][0]["futureField"] = serde_json::json!(7);
    });
    daemon.wait_ready();
    wait_for("untainted", || {
        (!taint_keys(&api).contains(&TAINT.to_owned())).then_some(())
    });
    let n = api.get("nodes", "", "node-1").unwrap();
    assert_eq!(
        n["spec"]["taints"],
        serde_json::json!([{"key": "example.com/other", "effect": "NoSchedule",
                            "futureField": {"since": "v1.99"}}])
    );
    wait_for("our condition", || our_condition(&api));
    let n = api.get("nodes", "", "node-1").unwrap();
    assert_eq!(n["status"]["conditions"][0]["futureField"], 7);
}

/// `istio_cni_self_test_runs_total{result="failure"}` from the agent's metrics.
fn failed_self_tests(daemon: &Daemon) -> u64 {
    metric(daemon, "istio_cni_self_test_runs_total{result=\"failure\"}")
}

/// A self-test that keeps failing is retried with exponential backoff, not in a loop
/// driven by the file events of its own runs (the plugin exec'd from the bin dir, the
/// config files read by each pass); and an idle agent does not run passes at all.
#[test]
fn a_failing_self_test_backs_off_and_an_idle_agent_stays_idle() {
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    std::fs::write(node.conf(), PRIMARY).unwrap();
    let broken = node.dir.path().join("broken-istio-cni");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho '{\"cniVersion\":\"1.0.0\",\"code\":104,\"msg\":\"validation failed\"}'\nexit 104\n",
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = node.daemon(&["--plugin-bin", broken.to_str().unwrap()]);
    wait_for("a failed self-test", || {
        (failed_self_tests(&daemon) >= 1).then_some(())
    });
    std::thread::sleep(Duration::from_secs(4));
    let runs = failed_self_tests(&daemon);
    assert!(
        (2..=5).contains(&runs),
        "{runs} self-tests in about 4 s: expected retries after 1, 2 and 4 s"
    );
    let (_, body) = daemon.readyz().unwrap();
    assert!(body.contains("self-test"), "{body}");
    drop(daemon);

    // Healthy and idle: no passes beyond the resync.
    let healthy = Node::new("net.d");
    std::fs::create_dir(&healthy.net).unwrap();
    std::fs::write(healthy.conf(), PRIMARY).unwrap();
    let daemon = healthy.daemon(&[]);
    daemon.wait_ready();
    let passes = || metric(&daemon, "istio_cni_install_attempts_total");
    let before = passes();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        passes() - before <= 1,
        "{} install passes in 2 s of idleness",
        passes() - before
    );
}

/// The sum of the samples in the agent's metrics whose line starts with `name` (a
/// counter, or one labelled sample of it).
fn metric(daemon: &Daemon, name: &str) -> u64 {
    daemon
        .metrics()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The agent watches its node: a taint of ours that someone puts back by hand is removed
/// at once (not at the next minute's poll), and an idle agent reads nothing.
#[test]
fn the_agent_watches_its_node() {
    let (_node, api, daemon) = taint_setup(true, false);
    daemon.wait_ready();
    wait_for("untainted", || {
        (!taint_keys(&api).contains(&TAINT.to_owned())).then_some(())
    });
    wait_for("IstioCNIReady=True", || {
        our_condition(&api).filter(|c| c["status"] == "True")
    });
    std::thread::sleep(Duration::from_millis(300));
    let requests = api.requests();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(api.requests(), requests, "an idle agent sends no requests");

    let mut n = api.get("nodes", "", "node-1").unwrap();
    n["spec"]["taints"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"key": TAINT, "effect": "NoSchedule"}));
    api.put("nodes", n);
    // Within wait_for's limit, well below the minute a poll would take.
    wait_for("untainted again, through the watch", || {
        (!taint_keys(&api).contains(&TAINT.to_owned())).then_some(())
    });
}

/// Upstream's `istio_cni_installs_total{result}` names the step that failed: the plugin
/// binary cannot be read (`COPY_BINARIES_FAILURE`), the service account has no token
/// (`CREATE_KUBECONFIG_FAILURE`).
#[test]
fn failed_installs_are_counted_by_upstream_step() {
    let installs = |daemon: &Daemon, result: &str| {
        daemon
            .scrape()?
            .value("istio_cni_installs", Kind::Counter, &[("result", result)])
            .filter(|n| *n >= 1.0)
    };
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    std::fs::write(node.conf(), PRIMARY).unwrap();
    let missing = node.dir.path().join("no-such-plugin");
    let daemon = node.daemon(&["--plugin-bin", missing.to_str().unwrap()]);
    wait_for("COPY_BINARIES_FAILURE counted", || {
        installs(&daemon, "COPY_BINARIES_FAILURE")
    });
    drop(daemon);

    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    std::fs::write(node.conf(), PRIMARY).unwrap();
    std::fs::remove_file(node.sa.join("token")).unwrap();
    let daemon = node.daemon(&[]);
    wait_for("CREATE_KUBECONFIG_FAILURE counted", || {
        installs(&daemon, "CREATE_KUBECONFIG_FAILURE")
    });
    assert_eq!(installs(&daemon, "SUCCESS"), None);
}
