//! The repair loop of the real `istio-cni-node-agent run`, against real pod netns laid out
//! as a kubelet leaves them (a process in a cgroup naming the pod UID, or only a
//! bind-mounted netns file), rules written by the real plugin's ADD, and the fake API
//! server's pod watch. Needs root.

use std::net::Ipv4Addr;
use std::time::Duration;

use istio_cni_e2e::agent::{get, wait_for, Daemon, Kind, Node, PRIMARY};
use istio_cni_e2e::fake_api::FakeApi;
use istio_cni_e2e::kubelet::{istio_chain, unique_uid, Layout, NodePods, RunningPod};
use istio_cni_e2e::sandbox::injected_pod;
use serde_json::{json, Value};

const NODE: &str = "node-1";

/// One test's node: agent dirs with a primary config, the API, the pods' cgroups and
/// netns dir.
struct Setup {
    node: Node,
    api: FakeApi,
    pods: NodePods,
    kubeconfig: std::path::PathBuf,
    next_ip: u8,
}

impl Setup {
    fn new() -> Setup {
        let node = Node::new("net.d");
        std::fs::create_dir(&node.net).unwrap();
        std::fs::write(node.conf(), PRIMARY).unwrap();
        let api = FakeApi::start();
        let kubeconfig = api.write_kubeconfig(node.dir.path());
        Setup {
            node,
            api,
            pods: NodePods::new(),
            kubeconfig,
            next_ip: 10,
        }
    }

    /// Starts a pod laid out as `layout`, on the next free address, with no ADD.
    fn start(&mut self, layout: Layout) -> RunningPod {
        self.next_ip += 1;
        self.pods
            .start(layout, Ipv4Addr::new(10, 77, 0, self.next_ip))
    }

    /// Starts a pod laid out as `layout`, stores `object` for it in the API, and gives it
    /// rules through the plugin's ADD when the plugin's decision says so.
    fn pod(&mut self, layout: Layout, object: Value) -> RunningPod {
        let pod = self.start(layout);
        let object = pod.object(object, NODE);
        let ns = object["metadata"]["namespace"].as_str().unwrap().to_owned();
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        self.api.put("pods", object);
        pod.add(&istio_chain(&self.kubeconfig), &ns, &name)
            .unwrap_or_else(|e| panic!("ADD for {ns}/{name}: {e:?}"));
        pod
    }

    fn agent(&self, extra: &[&str]) -> Daemon {
        self.agent_with_env(&[], extra)
    }

    /// [`Setup::agent`] with environment variables `env` besides the usual.
    fn agent_with_env(&self, env: &[(&str, &str)], extra: &[&str]) -> Daemon {
        let mut args = vec![
            "--self-test",
            "false",
            "--taint-enabled",
            "false",
            "--kubeconfig",
            self.kubeconfig.to_str().unwrap(),
            "--node-name",
            NODE,
            "--host-proc-dir",
            "/proc",
            "--netns-dirs",
            self.pods.netns_dir().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut vars = vec![("KUBERNETES_SERVICE_HOST", "10.96.0.1".to_owned())];
        vars.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
        self.node.spawn(None, &vars, &args)
    }

    /// Reasons of the Events recorded on pod `name`.
    fn events_for(&self, name: &str) -> Vec<String> {
        self.api.event_reasons(name)
    }
}

fn meshed(namespace: &str, name: &str) -> Value {
    injected_pod(namespace, name, json!({}), json!({}))
}

fn plain(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"containers": [{"name": "app", "image": "app"}]}})
}

fn metric(daemon: &Daemon, line_start: &str) -> Option<f64> {
    let (_, body) = get(daemon.metrics_port, "/metrics")?;
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The agent starts on a node where some pods lost their rules: it finds exactly those
/// without a timed sweep (the resync is an hour away; the initial list's `InitApply`
/// events and the check when the agent turns ready find them),
/// through each kubelet layout and the bind-mount fallback, and repairs them in place. A
/// `restartPolicy: Never` pod is repaired without a restart. Pods that must not be touched
/// are left alone.
#[test]
fn finds_exactly_the_broken_pods_and_repairs_them_in_place() {
    let mut s = Setup::new();
    let healthy = s.pod(Layout::Systemd, meshed("default", "healthy"));
    let broken_systemd = s.pod(Layout::Systemd, meshed("default", "broken-systemd"));
    let broken_cgroupfs = s.pod(Layout::Cgroupfs, meshed("default", "broken-cgroupfs"));
    let broken_no_process = s.pod(
        Layout::BindMountOnly,
        meshed("default", "broken-no-process"),
    );
    let mut never = meshed("default", "never-restarts");
    never["spec"]["restartPolicy"] = json!("Never");
    let broken_never = s.pod(Layout::Systemd, never);
    let not_injected = s.pod(Layout::Systemd, plain("not-injected"));
    let excluded = s.pod(Layout::Systemd, meshed("kube-system", "excluded"));
    let deleting = s.pod(Layout::Systemd, meshed("default", "deleting"));

    let expected = healthy.rules();
    assert!(!expected.is_empty(), "ADD wrote rules");
    assert!(not_injected.rules().is_empty() && excluded.rules().is_empty());
    for p in [
        &broken_systemd,
        &broken_cgroupfs,
        &broken_no_process,
        &broken_never,
        &deleting,
    ] {
        assert_eq!(
            p.rules(),
            expected,
            "ADD wrote the same rules for every meshed pod"
        );
        p.flush();
        assert_ne!(p.rules(), expected);
    }
    // A pod being deleted is left to its teardown.
    let mut d = s.api.get("pods", "default", "deleting").unwrap();
    d["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    s.api.put("pods", d);
    let writes_before = s.api.writes();

    let daemon = s.agent(&["--repair-resync-seconds", "3600"]);
    daemon.wait_ready();
    let repaired = [
        ("broken-systemd", &broken_systemd),
        ("broken-cgroupfs", &broken_cgroupfs),
        ("broken-no-process", &broken_no_process),
        ("never-restarts", &broken_never),
    ];
    let (_, took) = wait_for("the broken pods repaired", || {
        repaired
            .iter()
            .all(|(_, p)| p.rules() == expected)
            .then_some(())
    });
    eprintln!("4 broken pods repaired {took:?} after the agent became ready");
    wait_for("an IstioCNIRepaired event on each", || {
        repaired
            .iter()
            .all(|(name, _)| s.events_for(name) == ["IstioCNIRepaired"])
            .then_some(())
    });
    // The action is counted right after its event is recorded.
    wait_for("4 successful repairs counted", || {
        (metric(
            &daemon,
            "istio_cni_repair_actions_total{action=\"repair\",result=\"success\"}",
        ) == Some(4.0))
        .then_some(())
    });
    assert_eq!(
        metric(&daemon, "istio_cni_repair_broken_pods_found_total"),
        Some(4.0)
    );
    // Upstream Istio's series (cni/pkg/repair/monitoring.go), parsed as Prometheus does.
    let m = daemon.scrape().expect("/metrics parses as OpenMetrics");
    assert_eq!(
        m.value(
            "istio_cni_repair_pods_repaired",
            Kind::Counter,
            &[("type", "repair"), ("result", "success")]
        ),
        Some(4.0)
    );
    assert_eq!(
        m.help("istio_cni_repair_pods_repaired"),
        Some("Total number of pods repaired by repair controller")
    );

    // The others were not touched: no rules appeared, no events, no pod writes.
    for name in ["healthy", "not-injected", "excluded", "deleting"] {
        assert!(
            s.events_for(name).is_empty(),
            "{name}: {:?}",
            s.events_for(name)
        );
    }
    assert!(not_injected.rules().is_empty() && excluded.rules().is_empty());
    assert_ne!(
        deleting.rules(),
        expected,
        "the deleting pod is left as it is"
    );
    assert_eq!(healthy.rules(), expected);
    let pod_writes: Vec<Value> = s.api.list("pods");
    assert!(
        pod_writes.iter().all(|p| p["metadata"]["labels"].is_null()),
        "repair mode writes no pods"
    );
    assert_eq!(
        s.api.writes() - writes_before,
        4,
        "the only API writes are the 4 events"
    );
    let never_now = s.api.get("pods", "default", "never-restarts").unwrap();
    assert_eq!(
        never_now["status"]["containerStatuses"][0]["restartCount"],
        0
    );
}

/// A meshed pod's rules are flushed while the agent runs: the next sweep finds and repairs
/// it. Prints the time from the flush to the repair.
#[test]
fn a_flush_while_running_is_repaired_by_the_next_sweep() {
    let mut s = Setup::new();
    let pod = s.pod(Layout::Cgroupfs, meshed("default", "web"));
    let expected = pod.rules();
    // The sweep alone: no drift watch.
    let daemon = s.agent(&[
        "--repair-resync-seconds",
        "1",
        "--repair-drift-watch",
        "false",
    ]);
    daemon.wait_ready();
    wait_for("a first sweep", || {
        metric(&daemon, "istio_cni_repair_last_sweep_timestamp_seconds").filter(|t| *t > 0.0)
    });
    pod.flush();
    let (_, took) = wait_for("the flushed pod repaired", || {
        (pod.rules() == expected).then_some(())
    });
    eprintln!("flush → repaired in {took:?} (resync 1 s)");
    wait_for("the event", || {
        (s.events_for("web") == ["IstioCNIRepaired"]).then_some(())
    });
}

/// The nsid this (the test's) netns gives the netns named `name` (`ip netns set NAME
/// auto`): it stays listed (`ip netns list-id`) for as long as anything holds that netns,
/// named or not, and goes when the kernel destroys it.
fn nsid_of(name: &str) -> String {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["netns", "set", name, "auto"]);
    let listed = run(&["netns", "list-id"]);
    let line = listed
        .lines()
        .find(|l| l.ends_with(&format!("name: {name})")))
        .unwrap_or_else(|| panic!("no nsid for {name}: {listed}"));
    line.split_whitespace().nth(1).unwrap().to_owned()
}

/// Whether netns id `nsid` ([`nsid_of`]) still exists.
fn nsid_alive(nsid: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["netns", "list-id"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(nsid))
}

/// Drift seen by the kernel's word, per backend, with the sweep an hour away: the pod's
/// rules flushed from inside its netns (`nft flush ruleset` on the nftables backend,
/// `iptables-nft -t nat -F`, `iptables-legacy -t nat -F`) are back, with an Event,
/// long before any sweep; the time from the flush is printed. Then the watch holds the
/// pod's netns only while the pod is in the API: once its netns is torn down (DEL and
/// sandbox removal) the kernel keeps it for the agent's socket, and destroys it when the
/// pod's deletion closes the watch.
#[test]
fn flushed_rules_are_repaired_at_once_by_the_kernels_word_and_no_netns_leaks() {
    // Backend (`FORCE_IPTABLES_BINARY`, or native nftables), the flush, the listing.
    type Backend<'a> = (&'a str, Option<&'a str>, &'a [&'a str], &'a [&'a str]);
    let backends: [Backend; 3] = [
        (
            "nftables",
            None,
            &["nft", "flush", "ruleset"],
            &["nft", "list", "ruleset"],
        ),
        (
            "iptables-nft",
            Some("nft"),
            &["iptables-nft", "-t", "nat", "-F"],
            &["iptables-nft-save", "-t", "nat"],
        ),
        (
            "iptables-legacy",
            Some("legacy"),
            &["iptables-legacy", "-t", "nat", "-F"],
            &["iptables-legacy-save", "-t", "nat"],
        ),
    ];
    for (backend, force, flush, list) in backends {
        let mut s = Setup::new();
        let mut chain = istio_chain(&s.kubeconfig);
        let env = match force {
            Some(variant) => {
                chain
                    .env
                    .push(("FORCE_IPTABLES_BINARY".into(), variant.into()));
                [("FORCE_IPTABLES_BINARY", variant)]
            }
            None => {
                chain.plugins[0]["native_nftables"] = json!(true);
                [("NATIVE_NFTABLES", "true")]
            }
        };
        let pod = s.start(Layout::Systemd);
        s.api
            .put("pods", pod.object(meshed("default", "web"), NODE));
        pod.add(&chain, "default", "web")
            .unwrap_or_else(|e| panic!("{backend}: ADD: {e:?}"));
        // What the pod holds, without what varies (comments with dates, counters).
        let held = |pod: &istio_cni_e2e::kubelet::RunningPod| -> Vec<String> {
            pod.netns
                .exec(list)
                .lines()
                .filter(|l| !l.starts_with('#') && !l.starts_with(':'))
                .map(|l| {
                    // Counters' values (nft's `packets N bytes M`, iptables' `[N:M]`).
                    let mut words = l.split_whitespace();
                    let mut kept = Vec::new();
                    while let Some(w) = words.next() {
                        match w {
                            "packets" | "bytes" => {
                                words.next();
                            }
                            w if w.starts_with('[') => {}
                            w => kept.push(w),
                        }
                    }
                    kept.join(" ")
                })
                .collect()
        };
        let before = held(&pod);
        assert!(
            before
                .iter()
                .any(|l| l.contains("istio") || l.contains("ISTIO")),
            "{backend}: {before:?}"
        );
        let daemon = s.agent_with_env(&env, &["--repair-resync-seconds", "3600"]);
        daemon.wait_ready();
        wait_for("the pod watched", || {
            metric(&daemon, "istio_cni_repair_drift_watched_pods").filter(|n| *n >= 1.0)
        });
        // The workload's own tables change as often as it likes: no check.
        let triggered = || metric(&daemon, "istio_cni_repair_drift_triggered_total");
        let before_app = triggered();
        assert!(before_app.is_some(), "the drift counter is exported");
        pod.netns.exec(&["nft", "add", "table", "inet", "app"]);
        pod.netns.exec(&["nft", "add", "chain", "inet", "app", "c"]);
        pod.netns
            .exec(&["nft", "add", "rule", "inet", "app", "c", "counter"]);
        pod.netns.exec(&["nft", "delete", "table", "inet", "app"]);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            triggered(),
            before_app,
            "{backend}: a workload's table is not drift"
        );
        let flushed = std::time::Instant::now();
        pod.netns.exec(flush);
        wait_for("the flushed rules back", || {
            (held(&pod) == before).then_some(())
        });
        eprintln!(
            "{backend}: flush → repaired in {:?} (sweep every hour)",
            flushed.elapsed()
        );
        wait_for("the event", || {
            (s.events_for("web") == ["IstioCNIRepaired"]).then_some(())
        });

        // The pod's sandbox goes (DEL, its processes, its netns file); the pod is still
        // in the API, and nothing makes the agent look at it (its watch was opened anew
        // after the repair, so the repair's own write brings no check), so the watch
        // still holds the netns: that is why it must be closed.
        std::thread::sleep(Duration::from_millis(500));
        let nsid = nsid_of(&pod.netns.name);
        drop(pod);
        std::thread::sleep(Duration::from_millis(300));
        assert!(nsid_alive(&nsid), "{backend}: the watch holds the netns");
        // Deleted from the API: the watch closes and the kernel destroys the netns.
        assert!(s.api.remove("pods", "default", "web"));
        wait_for("the netns destroyed", || (!nsid_alive(&nsid)).then_some(()));
        wait_for("no pod watched", || {
            metric(&daemon, "istio_cni_repair_drift_watched_pods").filter(|n| *n == 0.0)
        });
    }
}

/// A legacy-iptables pod that never had an ADD (it started before the plugin) has no
/// legacy table in its netns until the agent's repair writes its rules, which creates
/// them: the pod's drift watch is opened after that repair, so a later flush of those
/// tables is seen by the once-a-second poll, long before the hourly sweep.
#[test]
fn legacy_tables_that_the_repair_created_are_watched_too() {
    let mut s = Setup::new();
    let pod = s.start(Layout::Systemd);
    s.api
        .put("pods", pod.object(meshed("default", "late"), NODE));
    let legacy_tables = || pod.netns.exec(&["cat", "/proc/net/ip_tables_names"]);
    assert_eq!(legacy_tables().trim(), "", "no ADD, no legacy table yet");
    let save = ["iptables-legacy-save", "-t", "nat"];
    let istio_lines = || {
        pod.netns
            .exec(&save)
            .lines()
            .filter(|l| l.starts_with("-A") && l.contains("ISTIO"))
            .count()
    };
    let daemon = s.agent_with_env(
        &[("FORCE_IPTABLES_BINARY", "legacy")],
        &[
            "--repair-resync-seconds",
            "3600",
            // The second repair is the point here, not the cooldown's hold.
            "--repair-cooldown-seconds",
            "1",
        ],
    );
    daemon.wait_ready();
    // Nothing here reads a legacy table before the repair: asking for one creates it.
    wait_for("the first sweep's repair", || {
        (s.events_for("late") == ["IstioCNIRepaired"]).then_some(())
    });
    assert!(legacy_tables().contains("nat"), "the repair made the table");
    assert!(istio_lines() > 0, "the repair wrote the rules");
    wait_for("the pod watched", || {
        metric(&daemon, "istio_cni_repair_drift_watched_pods").filter(|n| *n >= 1.0)
    });
    let repaired = istio_lines();
    pod.netns.exec(&["iptables-legacy", "-t", "nat", "-F"]);
    assert_eq!(istio_lines(), 0);
    let (_, took) = wait_for("the flushed rules back", || {
        (istio_lines() == repaired).then_some(())
    });
    eprintln!("legacy flush → repaired in {took:?} (sweep every hour)");
    assert!(s.api.remove("pods", "default", "late"));
}

/// A workload that commits to an `ip` table in a loop (iptables-nft, as a pod with
/// `NET_ADMIN` may) makes its pod due at most once a second, however many commits it
/// makes: the first right away, the rest taken by one check per second.
#[test]
fn a_workload_committing_in_a_loop_costs_one_check_a_second() {
    let mut s = Setup::new();
    let pod = s.pod(Layout::Systemd, meshed("default", "busy"));
    let daemon = s.agent(&["--repair-resync-seconds", "3600"]);
    daemon.wait_ready();
    wait_for("the pod watched", || {
        metric(&daemon, "istio_cni_repair_drift_watched_pods").filter(|n| *n >= 1.0)
    });
    let triggered = || metric(&daemon, "istio_cni_repair_drift_triggered_total").unwrap();
    let before = triggered();
    let started = std::time::Instant::now();
    const COMMITS: usize = 30;
    for _ in 0..COMMITS {
        pod.netns.exec(&[
            "iptables-nft",
            "-t",
            "filter",
            "-A",
            "INPUT",
            "-j",
            "ACCEPT",
        ]);
    }
    let looped = started.elapsed();
    // The last commits' check comes at most a second after the one before.
    std::thread::sleep(Duration::from_millis(1200));
    let checks = triggered() - before;
    // One at once, then at most one per second of the loop, and one for its tail.
    let bound = 2.0 + looped.as_secs_f64().ceil();
    eprintln!("{COMMITS} commits in {looped:?}: {checks} check(s) asked for (bound {bound})");
    assert!(checks >= 1.0, "the commits were seen");
    assert!(
        checks <= bound,
        "{checks} checks for {COMMITS} commits in {looped:?}"
    );
    assert!(!pod.rules().is_empty(), "the pod keeps its rules");
}

/// A dual-stack pod: ADD wrote rules for both families; when only its IPv6 rules are
/// flushed, the agent finds it (IPv6 from `status.podIPs`) and restores them.
#[test]
fn a_dual_stack_pod_missing_only_its_ipv6_rules_is_repaired() {
    let mut s = Setup::new();
    let pod = s
        .start(Layout::Systemd)
        .with_ipv6("fd77::11".parse().unwrap());
    let object = pod.object(meshed("default", "dual"), NODE);
    s.api.put("pods", object);
    pod.add(&istio_chain(&s.kubeconfig), "default", "dual")
        .unwrap_or_else(|e| panic!("ADD: {e:?}"));
    let (v4, v6) = (pod.rules(), pod.rules_v6());
    assert!(!v4.is_empty() && !v6.is_empty(), "ADD wrote both families");
    pod.flush_v6();
    assert_ne!(pod.rules_v6(), v6);

    let daemon = s.agent(&["--repair-resync-seconds", "3600"]);
    daemon.wait_ready();
    wait_for("the IPv6 rules restored", || {
        (pod.rules_v6() == v6).then_some(())
    });
    assert_eq!(pod.rules(), v4, "the IPv4 rules are as they were");
    wait_for("the event", || {
        (s.events_for("dual") == ["IstioCNIRepaired"]).then_some(())
    });
}

/// Delete mode deletes broken pods with preconditions and an Event; label mode labels them
/// once. Healthy pods stay.
#[test]
fn delete_and_label_modes() {
    let mut s = Setup::new();
    let _healthy = s.pod(Layout::Systemd, meshed("default", "healthy"));
    let to_delete = s.pod(Layout::Systemd, meshed("default", "to-delete"));
    let to_label = s.pod(Layout::Cgroupfs, meshed("default", "to-label"));
    to_delete.flush();
    to_label.flush();

    // Delete mode, on the only broken pod it may see (to-label is not yet broken: it is
    // labeled by the second agent).
    let mut label_obj = s.api.get("pods", "default", "to-label").unwrap();
    label_obj["status"]["phase"] = json!("Pending");
    s.api.put("pods", label_obj.clone());
    let mut daemon = s.agent(&["--repair-mode", "delete", "--repair-resync-seconds", "3600"]);
    daemon.wait_ready();
    wait_for("the broken pod deleted", || {
        s.api
            .get("pods", "default", "to-delete")
            .is_none()
            .then_some(())
    });
    wait_for("its event", || {
        (s.events_for("to-delete") == ["IstioCNIDeletedBrokenPod"]).then_some(())
    });
    assert!(s.api.get("pods", "default", "healthy").is_some());
    let upstream = |daemon: &Daemon, kind: &str| {
        daemon.scrape()?.value(
            "istio_cni_repair_pods_repaired",
            Kind::Counter,
            &[("type", kind), ("result", "success")],
        )
    };
    wait_for("the deletion counted under upstream's name", || {
        (upstream(&daemon, "delete") == Some(1.0)).then_some(())
    });
    assert!(daemon.sigterm().success());

    // Label mode: the pod becomes Running (a watch event) and is labeled, once.
    let daemon = s.agent(&["--repair-mode", "label", "--repair-resync-seconds", "1"]);
    daemon.wait_ready();
    label_obj["status"]["phase"] = json!("Running");
    label_obj["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    s.api.put("pods", label_obj);
    wait_for("the broken pod labeled", || {
        let p = s.api.get("pods", "default", "to-label")?;
        (p["metadata"]["labels"]["cni.istio.io/uninitialized"] == "true").then_some(())
    });
    wait_for("its event", || {
        (s.events_for("to-label") == ["IstioCNILabeledBrokenPod"]).then_some(())
    });
    // Later sweeps neither label again nor record more events (cooldown, and the label is
    // already there).
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(s.events_for("to-label"), ["IstioCNILabeledBrokenPod"]);
    assert_eq!(upstream(&daemon, "label"), Some(1.0));
    assert!(
        to_label.rules().iter().all(|r| !r.starts_with("-A")),
        "label mode writes no rules"
    );
}

/// A node-wide failure breaks 50 pods. Delete mode spaces deletions by the rate limit;
/// repair mode repairs each once, and a second flush within the cooldown is not repaired.
#[test]
fn rate_limit_and_cooldown_hold_under_a_node_wide_failure() {
    let mut s = Setup::new();
    let pods: Vec<RunningPod> = (0..50)
        .map(|i| {
            let layout = if i % 2 == 0 {
                Layout::Systemd
            } else {
                Layout::Cgroupfs
            };
            s.pod(layout, meshed("default", &format!("p{i}")))
        })
        .collect();
    let expected = pods[0].rules();
    pods.iter().for_each(RunningPod::flush);

    // Delete mode at 30/min: one deletion every 2 s, no burst.
    let mut daemon = s.agent(&[
        "--repair-mode",
        "delete",
        "--repair-max-deletes-per-minute",
        "30",
        "--repair-resync-seconds",
        "3600",
    ]);
    daemon.wait_ready();
    let count = |s: &Setup| s.api.list("pods").len();
    wait_for("the first deletion", || (count(&s) == 49).then_some(()));
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(4500));
    let deleted = 50 - count(&s);
    let window = started.elapsed().as_secs_f64();
    assert!(
        deleted >= 2 && deleted as f64 <= 1.0 + window / 2.0 + 1.0,
        "{deleted} deletions in {window:.1}s after the first, at one per 2 s"
    );
    assert!(
        metric(
            &daemon,
            "istio_cni_repair_actions_total{action=\"delete\",result=\"rate_limited\"}"
        )
        .unwrap_or(0.0)
            >= 40.0
    );
    assert!(daemon.sigterm().success());

    // Repair mode: every remaining pod is repaired once.
    let left: Vec<&RunningPod> = pods
        .iter()
        .filter(|p| {
            s.api
                .list("pods")
                .iter()
                .any(|o| o["metadata"]["uid"] == p.uid.as_str())
        })
        .collect();
    let daemon = s.agent(&["--repair-resync-seconds", "1"]);
    daemon.wait_ready();
    let (_, took) = wait_for("every remaining pod repaired", || {
        left.iter().all(|p| p.rules() == expected).then_some(())
    });
    eprintln!("{} pods repaired in {took:?}", left.len());
    // They break again at once: the cooldown (5 min) holds them, sweep after sweep.
    left.iter().for_each(|p| p.flush());
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        left.iter().all(|p| p.rules() != expected),
        "no repair within the cooldown"
    );
    assert!(
        metric(
            &daemon,
            "istio_cni_repair_actions_total{action=\"repair\",result=\"cooldown\"}"
        )
        .unwrap_or(0.0)
            >= left.len() as f64
    );
    assert_eq!(
        metric(
            &daemon,
            "istio_cni_repair_actions_total{action=\"repair\",result=\"success\"}"
        ),
        Some(left.len() as f64)
    );
}

/// Upstream Istio's repair settings, as an `env:` override from an upstream install sets
/// them: `REPAIR_LABEL_PODS=true` selects label mode, `REPAIR_LABEL_SELECTORS` limits the
/// repair loop to matching pods; two modes on stop the agent at start, naming both
/// variables (upstream would silently take the first).
#[test]
fn upstream_repair_settings_select_the_mode_and_the_pods() {
    let mut s = Setup::new();
    let mut chosen = meshed("default", "chosen");
    chosen["metadata"]["labels"] = json!({"repair": "yes"});
    let chosen = s.pod(Layout::Systemd, chosen);
    let other = s.pod(Layout::Systemd, meshed("default", "other"));
    chosen.flush();
    other.flush();

    let mut conflict = s.agent_with_env(
        &[
            ("REPAIR_REPAIR_PODS", "true"),
            ("REPAIR_DELETE_PODS", "true"),
        ],
        &[],
    );
    let status = wait_for("the agent to refuse", || conflict.child.try_wait().unwrap()).0;
    assert_eq!(status.code(), Some(2));
    let log = std::fs::read_to_string(&conflict.log).unwrap();
    assert!(
        log.contains("REPAIR_REPAIR_PODS=true") && log.contains("REPAIR_DELETE_PODS=true"),
        "{log}"
    );

    let daemon = s.agent_with_env(
        &[
            ("REPAIR_LABEL_PODS", "true"),
            ("REPAIR_LABEL_SELECTORS", "repair=yes"),
            ("REPAIR_INIT_CONTAINER_NAME", "istio-validation"),
        ],
        &["--repair-resync-seconds", "1"],
    );
    daemon.wait_ready();
    wait_for("the selected broken pod labeled", || {
        let p = s.api.get("pods", "default", "chosen")?;
        (p["metadata"]["labels"]["cni.istio.io/uninitialized"] == "true").then_some(())
    });
    // Two sweeps later the other broken pod is still untouched: outside the selector.
    std::thread::sleep(Duration::from_millis(2500));
    let other_obj = s.api.get("pods", "default", "other").unwrap();
    assert!(other_obj["metadata"]["labels"]
        .get("cni.istio.io/uninitialized")
        .is_none());
    assert!(s.events_for("other").is_empty());
    assert!(
        chosen.rules().iter().all(|r| !r.starts_with("-A")),
        "label mode writes no rules"
    );
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        log.contains("REPAIR_INIT_CONTAINER_NAME has no effect here"),
        "{log}"
    );
}

/// `NATIVE_NFTABLES`: pods programmed with the nftables backend are read back with nft,
/// and one whose table lost its rules is repaired with one nft transaction, in place.
#[test]
fn nftables_pods_are_read_back_and_repaired_with_nft() {
    let mut s = Setup::new();
    let mut chain = istio_chain(&s.kubeconfig);
    chain.plugins[0]["native_nftables"] = json!(true);
    let mut pods = Vec::new();
    for name in ["nft-a", "nft-b"] {
        let pod = s.start(Layout::Systemd);
        let object = pod.object(meshed("default", name), NODE);
        s.api.put("pods", object);
        pod.add(&chain, "default", name)
            .unwrap_or_else(|e| panic!("ADD for {name}: {e:?}"));
        pods.push(pod);
    }
    let healthy = pods[0]
        .netns
        .exec(&["nft", "list", "table", "inet", "istio-proxy-nat"]);
    assert!(healthy.contains("istio-output"), "{healthy}");
    assert!(pods[0].rules().is_empty(), "no iptables rules");
    // One pod's outbound chain is flushed.
    pods[1].netns.exec(&[
        "nft",
        "flush",
        "chain",
        "inet",
        "istio-proxy-nat",
        "istio-output",
    ]);

    let daemon = s.agent_with_env(
        &[("NATIVE_NFTABLES", "true")],
        &["--repair-resync-seconds", "3600"],
    );
    daemon.wait_ready();
    wait_for("the flushed pod repaired", || {
        (s.events_for("nft-b") == ["IstioCNIRepaired"]).then_some(())
    });
    let repaired = pods[1]
        .netns
        .exec(&["nft", "list", "table", "inet", "istio-proxy-nat"]);
    assert_eq!(
        repaired.lines().filter(|l| l.contains("counter")).count(),
        healthy.lines().filter(|l| l.contains("counter")).count(),
        "{repaired}"
    );
    assert!(
        pods[1].rules().is_empty(),
        "repaired with nft, not iptables"
    );
    assert!(
        s.events_for("nft-a").is_empty(),
        "the healthy pod is left alone"
    );
}

/// A stale meshed pod (Running in the API with IP X, but no process left on the node)
/// and a live plain pod whose pinned netns now holds X: the agent never writes the stale
/// pod's rules into the other pod's netns, since a process of another pod lives there. The
/// stale pod is "netns not found"; nothing is written and no repair is recorded. A broken
/// pod found through the same fallback (no process, only its netns file) is still repaired.
#[test]
fn a_stale_pod_never_gets_its_rules_written_into_another_pods_netns() {
    let mut s = Setup::new();
    let mut other = s.pod(Layout::Systemd, plain("live-plain"));
    s.pods.pin(&mut other);
    let mut stale = meshed("default", "stale");
    stale["metadata"]["uid"] = json!(unique_uid());
    stale["spec"]["nodeName"] = json!(NODE);
    stale["status"] = json!({
        "phase": "Running",
        "podIP": other.ip.to_string(),
        "podIPs": [{"ip": other.ip.to_string()}],
        "containerStatuses": [{"name": "istio-proxy", "ready": true, "restartCount": 0,
                               "image": "proxy", "imageID": "", "started": true}],
    });
    s.api.put("pods", stale);
    let broken = s.pod(
        Layout::BindMountOnly,
        meshed("default", "broken-no-process"),
    );
    let expected = broken.rules();
    broken.flush();

    let daemon = s.agent(&["--repair-resync-seconds", "1"]);
    daemon.wait_ready();
    wait_for("the control pod repaired", || {
        (broken.rules() == expected).then_some(())
    });
    // Two more sweeps, each of which would have "repaired" the stale pod.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        other.rules().is_empty(),
        "the live pod's netns got another pod's rules: {:?}",
        other.rules()
    );
    assert!(
        s.events_for("stale").is_empty(),
        "nothing is recorded for the stale pod: {:?}",
        s.events_for("stale")
    );
}

/// Drift that leaves every rule of ours in place is still drift for the repair loop, and
/// a repair undoes it: a dormant `ip nat` table (iptables-nft: none of its rules takes
/// effect), and a rule of other software ahead of our jump that takes the pod's TCP around
/// the sidecar (`-I OUTPUT 1 -p tcp -j RETURN`; the repair puts ours back at the head).
#[test]
fn a_dormant_table_and_a_bypass_ahead_of_our_jump_are_repaired() {
    let mut s = Setup::new();
    let dormant = s.pod(Layout::Systemd, meshed("default", "dormant"));
    let bypassed = s.pod(Layout::Cgroupfs, meshed("default", "bypassed"));
    let env = [("FORCE_IPTABLES_BINARY", "nft")];
    let daemon = s.agent_with_env(&env, &["--repair-resync-seconds", "1"]);
    daemon.wait_ready();
    wait_for("a first sweep", || {
        metric(&daemon, "istio_cni_repair_last_sweep_timestamp_seconds").filter(|t| *t > 0.0)
    });
    dormant
        .netns
        .exec(&["nft", "add", "table", "ip", "nat", "{ flags dormant; }"]);
    bypassed.netns.exec(&[
        "iptables-nft",
        "-t",
        "nat",
        "-I",
        "OUTPUT",
        "1",
        "-p",
        "tcp",
        "-j",
        "RETURN",
    ]);
    wait_for("both repaired", || {
        let woken = !dormant
            .netns
            .exec(&["nft", "list", "table", "ip", "nat"])
            .contains("dormant");
        let first = bypassed
            .netns
            .exec(&["iptables-nft-save", "-t", "nat"])
            .lines()
            .find(|l| l.starts_with("-A OUTPUT"))
            .is_some_and(|l| l.contains("ISTIO_OUTPUT"));
        (woken && first).then_some(())
    });
    wait_for("the events", || {
        (s.events_for("dormant") == ["IstioCNIRepaired"]
            && s.events_for("bypassed") == ["IstioCNIRepaired"])
        .then_some(())
    });
}

/// The window the previous test cannot see: a new pod's netns holds the IP that a stale
/// pod still claims, before the new pod's first process starts (nothing in the netns says
/// whose it is yet). The loop waits for a netns found by its pinned file only to settle;
/// the new pod's process starts meanwhile, and nothing is ever written into its netns.
#[test]
fn a_new_pods_netns_before_its_first_process_never_gets_a_stale_pods_rules() {
    let mut s = Setup::new();
    let mut fresh = s.start(Layout::BindMountOnly);
    let mut stale = meshed("default", "stale");
    stale["metadata"]["uid"] = json!(unique_uid());
    stale["spec"]["nodeName"] = json!(NODE);
    stale["status"] = json!({
        "phase": "Running",
        "podIP": fresh.ip.to_string(),
        "podIPs": [{"ip": fresh.ip.to_string()}],
        "containerStatuses": [{"name": "istio-proxy", "ready": true, "restartCount": 0,
                               "image": "proxy", "imageID": "", "started": true}],
    });
    s.api.put("pods", stale);
    let daemon = s.agent(&["--repair-resync-seconds", "1"]);
    daemon.wait_ready();
    std::thread::sleep(Duration::from_secs(3));
    s.pods.start_first_process(&mut fresh);
    std::thread::sleep(istio_cni_node_agent::repair::PINNED_SETTLE + Duration::from_secs(3));
    assert!(
        fresh.rules().is_empty(),
        "the new pod's netns got the stale pod's rules: {:?}",
        fresh.rules()
    );
    assert!(
        s.events_for("stale").is_empty(),
        "{:?}",
        s.events_for("stale")
    );
}
