//! `make bench`, repair part: the real `istio-cni-node-agent run` over N running pods (real
//! netns, each with a process in a kubelet-style cgroup and rules from the real plugin's
//! ADD).
//!
//! - **Idle**: the agent at 110 pods (kubelet's default maximum) and at N, every pod's
//!   rules watched, the sweep at its default 60 s: CPU time over [`IDLE`], RSS and open
//!   file descriptors.
//! - **Sweep**: the agent's own sweep time over N healthy pods (from its debug log), against
//!   the floor measured in the same run: one bare `iptables-save` per pod netns, run
//!   serially from a thread inside each netns, which is the least a sweep must do.
//! - **Flush → repaired, end to end**, with the sweep an hour away, so that only the drift
//!   watch can find it: [`FLUSHES`] pods, one at a time, each flushed from a process
//!   inside its netns (`iptables-nft -t nat -F`; `nft flush ruleset` on the nftables
//!   backend; `iptables-legacy -t nat -F`, ten at a time), timed from the flush's start
//!   until the pod's rules read back whole (polled in-process every 1 ms for nftables,
//!   with `iptables-save` for iptables). Also the agent's own detect-to-repaired time
//!   (from "redirection broken" to "repair done" in its log).
//!
//! No timing is asserted; the goals of issue 24 are printed next to what was measured.
//! Usage: `istio-cni-repair-bench [PODS]` (default 500). Needs root, iptables and nft.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use istio_cni::apply::Xtables;
use istio_cni::netns::Netns;
use istio_cni::rules::Family;
use istio_cni_e2e::agent::{Daemon, Node, PRIMARY};
use istio_cni_e2e::fake_api::FakeApi;
use istio_cni_e2e::kubelet::{istio_chain, Layout, NodePods, RunningPod};
use istio_cni_e2e::sandbox::injected_pod;
use istio_cni_e2e::stats::{ms, parse_debug_duration, quantile};
use serde_json::json;

const RESYNC: &str = "2";
const SWEEPS: usize = 7;
const FLUSHES: usize = 100;
/// How long the idle agent is watched.
const IDLE: Duration = Duration::from_secs(60);

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("PODS is a number"))
        .unwrap_or(500);
    let api = FakeApi::start();
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).expect("conf dir");
    std::fs::write(node.conf(), PRIMARY).expect("primary config");
    let kubeconfig = api.write_kubeconfig(node.dir.path());
    let node_pods = NodePods::new();
    let chain = istio_chain(&kubeconfig);
    println!("istio-cni repair bench: {n} running pods");
    let agent = |extra: &[&str], env: &[(&str, String)]| {
        let mut flags = vec![
            "--self-test",
            "false",
            "--taint-enabled",
            "false",
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8"),
            "--node-name",
            "node-1",
            "--host-proc-dir",
            "/proc",
            "--netns-dirs",
            node_pods.netns_dir().to_str().expect("utf-8"),
        ];
        flags.extend_from_slice(extra);
        let mut env = env.to_vec();
        env.push(("KUBERNETES_SERVICE_HOST", "10.96.0.1".into()));
        node.spawn(None, &env, &flags)
    };
    let setup = Instant::now();
    let mut adds = Vec::with_capacity(n);
    let mut pods = start_pods(
        &api,
        &node_pods,
        &chain,
        "bench",
        78,
        0..110.min(n),
        &mut adds,
    );
    println!(
        "  {} pods set up in {:.1} s",
        pods.len(),
        setup.elapsed().as_secs_f64()
    );
    {
        let daemon = agent(&[], &[]);
        daemon.wait_ready();
        idle(&daemon, pods.len());
    }
    pods.extend(start_pods(
        &api,
        &node_pods,
        &chain,
        "bench",
        78,
        110.min(n)..n,
        &mut adds,
    ));
    println!(
        "  {n} pods set up in {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    // The floor: a bare iptables-save in every pod netns, serially.
    let xt = Xtables::detect().expect("iptables");
    let save = xt.binaries(Family::V4).expect("v4").save.clone();
    let mut floor = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        for p in &pods {
            Netns::open(&p.netns.path())
                .expect("open netns")
                .run(|_| {
                    let out = Command::new(&save).output().expect("iptables-save");
                    assert!(out.status.success());
                })
                .expect("enter netns");
        }
        floor.push(start.elapsed());
    }

    let daemon = agent(&["--repair-resync-seconds", RESYNC], &[]);
    daemon.wait_ready();
    let sweep_line = format!("repair: swept {n} meshed pod(s) in ");
    let sweeps = |log: &str| -> Vec<Duration> {
        log.lines()
            .filter_map(|l| l.split_once(&sweep_line))
            .filter_map(|(_, rest)| parse_debug_duration(rest.split(',').next()?))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut swept = Vec::new();
    while swept.len() < SWEEPS + 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        swept = sweeps(&std::fs::read_to_string(&daemon.log).unwrap_or_default());
    }
    assert!(
        swept.len() > SWEEPS,
        "the agent did not sweep {SWEEPS} times"
    );
    drop(daemon);
    // The first sweep also warms caches; keep the rest.
    let mut swept = swept[1..].to_vec();
    let (sweep_med, _) = stats(&mut swept);
    let (floor_med, _) = stats(&mut floor);
    println!(
        "sweep over {n} healthy pods (agent's own, 2 workers), {} sweeps:",
        swept.len()
    );
    println!("  median {}", ms(sweep_med));
    println!(
        "floor ({:?} iptables-save in each netns, serial), 3 runs:",
        xt.binaries(Family::V4).expect("v4").backend
    );
    println!("  median {}", ms(floor_med));
    println!(
        "ratio sweep/floor: {:.2}x   per pod: {} vs {}",
        sweep_med.as_secs_f64() / floor_med.as_secs_f64(),
        ms(sweep_med / n as u32),
        ms(floor_med / n as u32)
    );

    // Idle at N pods, with the default sweep.
    {
        let daemon = agent(&[], &[]);
        daemon.wait_ready();
        idle(&daemon, n);
    }
    // Drift: the sweep an hour away, so only the drift watch repairs; each run starts
    // once every pod is watched.
    let drift_agent = |env: &[(&str, String)], pods: usize| {
        let daemon = agent(&["--repair-resync-seconds", "3600"], env);
        daemon.wait_ready();
        wait_watched(&daemon, pods);
        daemon
    };
    // Drift on the node's iptables (iptables-nft on Debian 12).
    let daemon = drift_agent(&[], n);
    let expected = held_iptables(&pods[0], "iptables-save");
    let probe = |p: &RunningPod| held_iptables(p, "iptables-save") == expected;
    let picked: Vec<&RunningPod> = pods
        .iter()
        .skip(1)
        .step_by((n / FLUSHES).max(1))
        .take(FLUSHES)
        .collect();
    let mut latency = flush_each(&picked, &["iptables-nft", "-t", "nat", "-F"], 1, probe);
    report_drift(
        "iptables-nft",
        &mut latency,
        Duration::from_millis(100),
        &daemon,
        &mut adds,
    );
    drop(daemon);
    forget(&api, "bench", pods);

    // The nftables backend.
    let mut nft_chain = istio_chain(&kubeconfig);
    nft_chain.plugins[0]["native_nftables"] = json!(true);
    let mut nft_adds = Vec::new();
    let nft_pods = start_pods(
        &api,
        &node_pods,
        &nft_chain,
        "nft",
        79,
        0..FLUSHES,
        &mut nft_adds,
    );
    let ruleset = {
        let conf = istio_cni::config::NetConf::parse(
            json!({"cniVersion": "1.0.0", "type": "istio-cni", "native_nftables": true})
                .to_string()
                .as_bytes(),
        )
        .expect("conf");
        let pod = serde_json::from_value(injected_pod("default", "x", json!({}), json!({})))
            .expect("pod");
        let istio_cni::plan::Plan::Redirect(r) =
            istio_cni::plan::plan_nft_for_pod(&conf, &pod).expect("plan")
        else {
            panic!("bench pod must be meshed")
        };
        r
    };
    let daemon = drift_agent(&[("NATIVE_NFTABLES", "true".into())], nft_pods.len());
    let probe = |p: &RunningPod| {
        Netns::open(&p.netns.path())
            .and_then(|ns| ns.run(|inside| istio_cni::nft::read_back(inside, &ruleset).is_ok()))
            .unwrap_or(false)
    };
    let picked: Vec<&RunningPod> = nft_pods.iter().collect();
    let mut latency = flush_each(&picked, &["nft", "flush", "ruleset"], 1, probe);
    report_drift(
        "nftables",
        &mut latency,
        Duration::from_millis(100),
        &daemon,
        &mut nft_adds,
    );
    drop(daemon);
    forget(&api, "nft", nft_pods);

    // Legacy iptables: polled once a second, so ten pods are flushed at a time.
    let mut legacy_chain = istio_chain(&kubeconfig);
    legacy_chain
        .env
        .push(("FORCE_IPTABLES_BINARY".into(), "legacy".into()));
    let mut legacy_adds = Vec::new();
    let legacy_pods = start_pods(
        &api,
        &node_pods,
        &legacy_chain,
        "legacy",
        80,
        0..FLUSHES,
        &mut legacy_adds,
    );
    let daemon = drift_agent(
        &[("FORCE_IPTABLES_BINARY", "legacy".into())],
        legacy_pods.len(),
    );
    let expected = held_iptables(&legacy_pods[0], "iptables-legacy-save");
    let probe = |p: &RunningPod| held_iptables(p, "iptables-legacy-save") == expected;
    let picked: Vec<&RunningPod> = legacy_pods.iter().collect();
    let mut latency = flush_each(&picked, &["iptables-legacy", "-t", "nat", "-F"], 10, probe);
    report_drift(
        "iptables-legacy",
        &mut latency,
        Duration::from_millis(1500),
        &daemon,
        &mut legacy_adds,
    );
    drop(daemon);
    forget(&api, "legacy", legacy_pods);
}

/// Tears `pods` (`{prefix}-{i}`) down and deletes them from the API.
fn forget(api: &FakeApi, prefix: &str, pods: Vec<RunningPod>) {
    let n = pods.len();
    drop(pods);
    for i in 0..n {
        api.remove("pods", "default", &format!("{prefix}-{i}"));
    }
}

/// Starts pods `{prefix}-{i}` for `range`, each with its address in `10.{net}.x.y`,
/// stored in the API and given their rules by `chain`'s ADD (timed into `adds`).
fn start_pods(
    api: &FakeApi,
    node_pods: &NodePods,
    chain: &istio_cni_e2e::chain::Chain,
    prefix: &str,
    net: u8,
    range: std::ops::Range<usize>,
    adds: &mut Vec<Duration>,
) -> Vec<RunningPod> {
    range
        .map(|i| {
            let layout = if i % 2 == 0 {
                Layout::Systemd
            } else {
                Layout::Cgroupfs
            };
            let ip = Ipv4Addr::new(10, net, (i / 250) as u8, (i % 250) as u8 + 2);
            let pod = node_pods.start(layout, ip);
            let name = format!("{prefix}-{i}");
            let object = pod.object(
                injected_pod("default", &name, json!({}), json!({})),
                "node-1",
            );
            api.put("pods", object);
            let start = Instant::now();
            pod.add(chain, "default", &name)
                .unwrap_or_else(|e| panic!("ADD {name}: {e:?}"));
            adds.push(start.elapsed());
            pod
        })
        .collect()
}

/// The agent's `istio_cni_repair_drift_watched_pods`.
fn watched(daemon: &Daemon) -> Option<usize> {
    let (_, body) = daemon.get(daemon.metrics_port, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix("istio_cni_repair_drift_watched_pods "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as usize)
}

/// Waits until the agent watches `pods` pods.
fn wait_watched(daemon: &Daemon, pods: usize) {
    let start = Instant::now();
    while watched(daemon) != Some(pods) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the agent watches {:?} pods, not {pods}",
            watched(daemon)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent idle over [`IDLE`] with `pods` pods watched: CPU time, RSS, open fds.
fn idle(daemon: &Daemon, pods: usize) {
    wait_watched(daemon, pods);
    let pid = daemon.child.id();
    // (the agent's own, its reaped children's: the sweep's iptables-save), in seconds.
    let cpu = || -> (f64, f64) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let after_comm = stat.rsplit_once(')').expect("comm").1;
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // utime, stime, cutime, cstime: fields 14 to 17 of proc(5), in clock ticks.
        let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let f = |i: usize| fields[i].parse::<f64>().unwrap() / tick;
        (f(11) + f(12), f(13) + f(14))
    };
    let before = cpu();
    std::thread::sleep(IDLE);
    let after = cpu();
    let (used, children) = (after.0 - before.0, after.1 - before.1);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    println!(
        "agent idle at {pods} pods (all watched, sweep every 60 s): CPU {:.2} s over {} s ({:.2}%), and {:.2} s in its children (the sweep's iptables-save); RSS {rss}, {fds} open fds",
        used,
        IDLE.as_secs(),
        used / IDLE.as_secs_f64() * 100.0,
        children
    );
}

/// Lines of `save -t nat` in `pod` that name an ISTIO chain (without counters), from a
/// thread inside its netns.
fn held_iptables(pod: &RunningPod, save: &str) -> Vec<String> {
    Netns::open(&pod.netns.path())
        .and_then(|ns| {
            ns.run(|_| {
                Command::new(save)
                    .args(["-t", "nat"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            })
        })
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ISTIO"))
        .map(str::to_owned)
        .collect()
}

/// Flushes each of `pods` with `cmd`, run from a thread inside its netns, `at_once` pods
/// at a time, and times each from the flush's start until `healthy` says its rules are
/// whole again.
fn flush_each(
    pods: &[&RunningPod],
    cmd: &[&str],
    at_once: usize,
    healthy: impl Fn(&RunningPod) -> bool + Sync,
) -> Vec<Duration> {
    let mut out = Vec::new();
    for batch in pods.chunks(at_once) {
        let times: Vec<Duration> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|p| {
                    let healthy = &healthy;
                    s.spawn(move || {
                        let start = Instant::now();
                        Netns::open(&p.netns.path())
                            .expect("open netns")
                            .run(|_| {
                                let st = Command::new(cmd[0])
                                    .args(&cmd[1..])
                                    .status()
                                    .expect("flush");
                                assert!(st.success(), "{cmd:?} failed");
                            })
                            .expect("enter netns");
                        // The repair may be done before the first look: no wait then.
                        while !healthy(p) {
                            assert!(
                                start.elapsed() < Duration::from_secs(30),
                                "not repaired within 30 s"
                            );
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        start.elapsed()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        out.extend(times);
    }
    out
}

/// Prints flush → repaired for `backend` against `goal` (p99), with the agent's own
/// share and the ADD of the same rules as the baseline.
fn report_drift(
    backend: &str,
    latency: &mut [Duration],
    goal: Duration,
    daemon: &Daemon,
    adds: &mut [Duration],
) {
    let (med, p99) = stats(latency);
    println!(
        "flush → repaired, {backend}, end to end from the flush (sweep an hour away: the drift watch alone), {} pods:",
        latency.len()
    );
    println!(
        "  median {}   p99 {}  [p99 <= {}: {}]",
        ms(med),
        ms(p99),
        ms(goal),
        if p99 <= goal { "met" } else { "NOT met" }
    );
    // The last repair's log line may come just after its rules are back.
    std::thread::sleep(Duration::from_millis(200));
    let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
    let mut in_agent = detect_to_repaired(&log);
    println!(
        "  repairs the agent recorded: {} of {} flushes",
        in_agent.len(),
        latency.len()
    );
    if !in_agent.is_empty() && !adds.is_empty() {
        let (a_med, a_p99) = stats(&mut in_agent);
        let (add_med, _) = stats(adds);
        println!(
            "  of which detected → repaired in the agent: median {}   p99 {};   the plugin's ADD of the same rules: median {} (ratio {:.2}x)",
            ms(a_med),
            ms(a_p99),
            ms(add_med),
            a_med.as_secs_f64() / add_med.as_secs_f64()
        );
    }
}

/// From the agent log: for each pod, the time from its "redirection broken" line to its
/// "repair done" line (log timestamps have millisecond resolution).
fn detect_to_repaired(log: &str) -> Vec<Duration> {
    let stamp = |l: &str| -> Option<f64> {
        // 2026-11-22T07:27:07.923Z
        let t = l
            .split_whitespace()
            .next()?
            .split('T')
            .nth(1)?
            .trim_end_matches('Z');
        let mut parts = t.split(':');
        let (h, m, s): (f64, f64, f64) = (
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
        );
        Some(h * 3600.0 + m * 60.0 + s)
    };
    let pod_of = |l: &str, marker: &str| -> Option<String> {
        let rest = l.split_once("repair: ")?.1;
        let (pod, tail) = rest.split_once(": ")?;
        tail.starts_with(marker).then(|| pod.to_owned())
    };
    let mut broken_at = std::collections::HashMap::new();
    let mut out = Vec::new();
    for l in log.lines() {
        if let Some(pod) = pod_of(l, "redirection broken") {
            broken_at.entry(pod).or_insert(stamp(l));
        } else if let Some(pod) = pod_of(l, "repair done") {
            if let (Some(Some(a)), Some(b)) = (broken_at.get(&pod), stamp(l)) {
                out.push(Duration::from_secs_f64((b - a).max(0.0)));
            }
        }
    }
    out
}

fn stats(v: &mut [Duration]) -> (Duration, Duration) {
    (quantile(v, 0.5), quantile(v, 0.99))
}
