//! `make bench`, repair part: the real `istio-cni-node-agent run` over N running pods (real
//! netns, each with a process in a kubelet-style cgroup and rules from the real plugin's
//! ADD).
//!
//! - **Sweep**: the agent's own sweep time over N healthy pods (from its debug log), against
//!   the floor measured in the same run: one bare `iptables-save` per pod netns, run
//!   serially from a thread inside each netns, which is the least a sweep must do.
//! - **Flush → repaired**: one pod's nat table is flushed; time until its rules are back,
//!   with a resync of `RESYNC` s (detection waits for the next sweep). Also the agent's own
//!   detect-to-repaired time (from "redirection broken" to "repair done" in its log).
//!
//! No timing is asserted. Usage: `istio-cni-repair-bench [PODS]` (default 500). Needs root.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use istio_cni::apply::Xtables;
use istio_cni::netns::Netns;
use istio_cni::rules::Family;
use istio_cni_e2e::agent::{Node, PRIMARY};
use istio_cni_e2e::fake_api::FakeApi;
use istio_cni_e2e::kubelet::{istio_chain, Layout, NodePods, RunningPod};
use istio_cni_e2e::sandbox::injected_pod;
use istio_cni_e2e::stats::{ms, quantile};
use serde_json::json;

const RESYNC: &str = "2";
const SWEEPS: usize = 7;
const FLUSHES: usize = 10;

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
    let setup = Instant::now();
    let mut adds = Vec::with_capacity(n);
    let pods: Vec<RunningPod> = (0..n)
        .map(|i| {
            let layout = if i % 2 == 0 {
                Layout::Systemd
            } else {
                Layout::Cgroupfs
            };
            let ip = Ipv4Addr::new(10, 78, (i / 250) as u8, (i % 250) as u8 + 2);
            let pod = node_pods.start(layout, ip);
            let name = format!("bench-{i}");
            let object = pod.object(
                injected_pod("default", &name, json!({}), json!({})),
                "node-1",
            );
            api.put("pods", object);
            let start = Instant::now();
            pod.add(&chain, "default", &name)
                .unwrap_or_else(|e| panic!("ADD {name}: {e:?}"));
            adds.push(start.elapsed());
            pod
        })
        .collect();
    println!("  set up in {:.1} s", setup.elapsed().as_secs_f64());

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

    let daemon = node.daemon(&[
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
        "--repair-resync-seconds",
        RESYNC,
    ]);
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

    // Flush → repaired, on different pods (each is acted on once per cooldown).
    let expected = pods[0].rules();
    let mut latency = Vec::new();
    let resync = Duration::from_secs(RESYNC.parse().expect("seconds"));
    for (i, p) in pods
        .iter()
        .skip(1)
        .step_by(n / FLUSHES)
        .take(FLUSHES)
        .enumerate()
    {
        // Flush at spread-out points of the resync period, not right after a repair.
        std::thread::sleep(resync.mul_f64(((i * 7) % FLUSHES) as f64 / FLUSHES as f64));
        p.flush();
        let start = Instant::now();
        while p.rules() != expected {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "not repaired within 30 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        latency.push(start.elapsed());
    }
    let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
    let mut in_agent = detect_to_repaired(&log);
    let (lat_med, lat_p90) = stats_p90(&mut latency);
    println!(
        "flush → repaired (resync {RESYNC} s, so the wait for the next sweep dominates), {} pods:",
        latency.len()
    );
    println!("  median {}   p90 {}", ms(lat_med), ms(lat_p90));
    if !in_agent.is_empty() {
        let (med, p90) = stats_p90(&mut in_agent);
        println!(
            "  of which detected → repaired in the agent: median {}   p90 {}",
            ms(med),
            ms(p90)
        );
        let (add_med, _) = stats(&mut adds);
        println!(
            "  baseline: the plugin's ADD of the same rules (setup, {n} pods): median {}",
            ms(add_med)
        );
        println!(
            "  ratio detected→repaired / ADD: {:.2}x",
            med.as_secs_f64() / add_med.as_secs_f64()
        );
    }
    drop(daemon);
    drop(pods);
}

/// Parses a `Duration`'s `Debug` text: `812.3ms`, `1.2s`, `950µs`.
fn parse_debug_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_alphabetic() || c == 'µ')?);
    let v: f64 = num.parse().ok()?;
    let secs = match unit {
        "s" => v,
        "ms" => v / 1e3,
        "µs" | "us" => v / 1e6,
        "ns" => v / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
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

fn stats_p90(v: &mut [Duration]) -> (Duration, Duration) {
    (quantile(v, 0.5), quantile(v, 0.9))
}
