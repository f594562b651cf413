//! `make bench`: wall time of `istio-cni` ADD (chained, fake API on loopback, rules applied,
//! read back and probed), against the floor measured in the same run: one bare
//! `iptables-restore` plus one `iptables-save` of the same rules in a fresh netns, run from
//! a thread inside that netns as the plugin runs them. Prints median and p99 of both and
//! their ratio, then 50 concurrent ADDs with their error count. No timing is asserted.
//!
//! With `ISTIO_CNI_STATIC_BIN` set (`make bench` sets it to the static release plugin), each
//! pod's ADD is also run with that binary, the two interleaved (alternating which goes
//! first) so that drift hits both alike, and the static/dynamic ratio is printed.
//!
//! The nftables backend (`native_nftables`) is measured in the same run, interleaved with
//! the iptables ADDs, against its own floor: one `nft -f` of the same transaction plus one
//! `nft -j list table` in a fresh netns, as separate processes. Then 50 concurrent ADDs
//! with each backend.
//!
//! Usage: `istio-cni-bench [PODS]` (default 200). Needs root, iptables and nft.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use istio_cni::apply::Xtables;
use istio_cni::config::NetConf;
use istio_cni::plan::{plan_for_pod, Plan};
use istio_cni::rules::Family;
use istio_cni_e2e::chain::istio_cni_bin;
use istio_cni_e2e::fake_api::FakeApi;
use istio_cni_e2e::net::TestNetns;
use istio_cni_e2e::sandbox::injected_pod;
use istio_cni_e2e::stats::{ms, quantile, timed_add};
use serde_json::json;

const CONCURRENT: usize = 50;
/// ADDs run with the plugin's debug log, for the profile of where an ADD's time goes.
const PROFILED: usize = 50;

fn main() {
    let pods: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("PODS is a number"))
        .unwrap_or(200);
    let bin = istio_cni_bin();
    let host = TestNetns::new("bh");
    let api = FakeApi::start_in(&host);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.write_kubeconfig(dir.path());
    for i in 0..pods.max(CONCURRENT).max(PROFILED) {
        api.put(
            "pods",
            injected_pod("default", &format!("bench-{i}"), json!({}), json!({})),
        );
        // The same pod, opted out: its ADD reads it from the API and writes nothing.
        api.put(
            "pods",
            injected_pod(
                "default",
                &format!("plain-{i}"),
                json!({"sidecar.istio.io/inject": "false"}),
                json!({}),
            ),
        );
    }
    let conf = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
        "plugin_log_level": "error",
        "kubernetes": {"kubeconfig": kubeconfig},
        "prevResult": {"cniVersion": "1.0.0",
                       "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
                       "ips": [{"address": "10.88.0.2/24", "gateway": "10.88.0.1", "interface": 0}]}
    })
    .to_string();
    println!("istio-cni bench: {} ({pods} pods)", bin.display());
    let static_bin = std::env::var_os("ISTIO_CNI_STATIC_BIN")
        .filter(|s| !s.is_empty())
        .map(std::path::PathBuf::from);

    let conf_nft = {
        let mut v: serde_json::Value = serde_json::from_str(&conf).expect("conf");
        v["native_nftables"] = json!(true);
        v.to_string()
    };

    // ADD, one pod at a time, each in a fresh netns: iptables, the static binary (if
    // given) and nftables, interleaved, the order rotating from pod to pod.
    let mut add = Vec::with_capacity(pods);
    let mut add_static = Vec::with_capacity(pods);
    let mut add_nft = Vec::with_capacity(pods);
    let mut add_plain = Vec::with_capacity(pods);
    for i in 0..pods {
        let mut runs: Vec<(&std::path::Path, &str, &str, &mut Vec<Duration>)> = vec![
            (&bin, &conf, "bench", &mut add),
            (&bin, &conf_nft, "bench", &mut add_nft),
            (&bin, &conf, "plain", &mut add_plain),
        ];
        if let Some(s) = &static_bin {
            runs.push((s, &conf, "bench", &mut add_static));
        }
        let n = runs.len();
        runs.rotate_left(i % n);
        for (b, c, name, into) in runs {
            let ns = TestNetns::new("b");
            let (took, ok) = run_add(b, &host, &ns, c, &format!("{name}-{i}"));
            assert!(
                ok.is_ok(),
                "ADD {i} ({}) failed: {}",
                b.display(),
                ok.unwrap_err()
            );
            into.push(took);
        }
    }

    // The floor: the same rules, one restore and one save, in fresh netns.
    let rules = {
        let conf = NetConf::parse(conf.as_bytes()).expect("conf");
        let pod = serde_json::from_value(injected_pod("default", "x", json!({}), json!({})))
            .expect("pod");
        let Plan::Redirect(ruleset) = plan_for_pod(&conf, &pod).expect("plan") else {
            panic!("bench pod must be meshed")
        };
        ruleset.family(Family::V4).expect("v4").restore_text()
    };
    let xt = host
        .open()
        .run(|_| Xtables::detect())
        .expect("netns")
        .expect("iptables");
    let bins = xt.binaries(Family::V4).expect("v4 binaries").clone();
    let mut floor = Vec::with_capacity(pods);
    for _ in 0..pods {
        let ns = TestNetns::new("f");
        let took = ns
            .open()
            .run(|_| {
                let start = Instant::now();
                let mut child = Command::new(&bins.restore)
                    .arg("--noflush")
                    .stdin(Stdio::piped())
                    .spawn()
                    .expect("restore");
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(rules.as_bytes())
                    .unwrap();
                assert!(child.wait().unwrap().success(), "floor restore failed");
                let out = Command::new(&bins.save).output().expect("save");
                assert!(out.status.success());
                start.elapsed()
            })
            .expect("enter netns");
        floor.push(took);
    }

    let (add_med, add_p99) = stats(&mut add);
    let (floor_med, floor_p99) = stats(&mut floor);
    println!("ADD (chained, fake API on loopback, applied + read back + probed), {pods} pods:");
    println!("  median {}   p99 {}", ms(add_med), ms(add_p99));
    println!(
        "floor ({:?} iptables-restore + iptables-save of the same rules, fresh netns), {pods} runs:",
        bins.backend
    );
    println!("  median {}   p99 {}", ms(floor_med), ms(floor_p99));
    println!(
        "ratio ADD/floor: median {:.2}x   p99 {:.2}x",
        add_med.as_secs_f64() / floor_med.as_secs_f64(),
        add_p99.as_secs_f64() / floor_p99.as_secs_f64()
    );
    if let Some(s) = &static_bin {
        let (st_med, st_p99) = stats(&mut add_static);
        println!(
            "ADD with the static plugin {}, interleaved with the above:",
            s.display()
        );
        println!("  median {}   p99 {}", ms(st_med), ms(st_p99));
        println!(
            "ratio static/dynamic: median {:.2}x   p99 {:.2}x   (static ADD/floor: median {:.2}x)",
            st_med.as_secs_f64() / add_med.as_secs_f64(),
            st_p99.as_secs_f64() / add_p99.as_secs_f64(),
            st_med.as_secs_f64() / floor_med.as_secs_f64()
        );
    }

    // The nftables floor: the same transaction, one `nft -f` and one `nft -j list`.
    let transaction = {
        let conf = NetConf::parse(conf_nft.as_bytes()).expect("conf");
        let pod = serde_json::from_value(injected_pod("default", "x", json!({}), json!({})))
            .expect("pod");
        let Plan::Redirect(r) = istio_cni::plan::plan_nft_for_pod(&conf, &pod).expect("plan")
        else {
            panic!("bench pod must be meshed")
        };
        r.transaction()
    };
    let nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .map(std::path::Path::new)
        .find(|p| p.is_file())
        .expect("nft (install nftables)");
    let mut nft_floor = Vec::with_capacity(pods);
    for _ in 0..pods {
        let ns = TestNetns::new("n");
        let took = ns
            .open()
            .run(|_| {
                let start = Instant::now();
                let mut child = Command::new(nft)
                    .args(["-f", "-"])
                    .stdin(Stdio::piped())
                    .spawn()
                    .expect("nft");
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(transaction.as_bytes())
                    .unwrap();
                assert!(child.wait().unwrap().success(), "floor nft -f failed");
                let out = Command::new(nft)
                    .args(["-j", "list", "table", "inet", "istio-proxy-nat"])
                    .output()
                    .expect("nft -j list");
                assert!(out.status.success());
                start.elapsed()
            })
            .expect("enter netns");
        nft_floor.push(took);
    }
    let (nft_med, nft_p99) = stats(&mut add_nft);
    let (nf_med, nf_p99) = stats(&mut nft_floor);
    let (plain_med, plain_p99) = stats(&mut add_plain);
    println!("ADD with native_nftables, interleaved with the above:");
    println!("  median {}   p99 {}", ms(nft_med), ms(nft_p99));
    println!("ADD of the same pod opted out (read from the API, nothing written), interleaved:");
    println!("  median {}   p99 {}", ms(plain_med), ms(plain_p99));
    println!(
        "for comparison, the nft processes the nftables ADD no longer runs (one nft -f + one nft -j list of the same transaction, fresh netns), {pods} runs:"
    );
    println!("  median {}   p99 {}", ms(nf_med), ms(nf_p99));

    // The backends against each other, with the goals of issue 24.
    let ratio = nft_med.as_secs_f64() / add_med.as_secs_f64();
    let ipt_part = add_med.saturating_sub(plain_med);
    let nft_part = nft_med.saturating_sub(plain_med);
    let part_ratio = nft_part.as_secs_f64() / ipt_part.as_secs_f64();
    let readback = readback_medians(&conf, &conf_nft, pods.min(100));
    println!("nftables against iptables (medians; goal in brackets):");
    println!(
        "  ADD: {} / {} = {ratio:.2}x  [<= 0.80x: {}]",
        ms(nft_med),
        ms(add_med),
        verdict(ratio <= 0.80)
    );
    println!(
        "  the backend's own part (ADD minus the opted-out ADD): {} / {} = {part_ratio:.2}x  [<= 0.50x: {}]",
        ms(nft_part),
        ms(ipt_part),
        verdict(part_ratio <= 0.50)
    );
    println!(
        "  read-back in the pod's netns: nftables {} (iptables {})  [nftables <= 0.20 ms: {}]",
        ms(readback.0),
        ms(readback.1),
        verdict(readback.0 <= Duration::from_micros(200))
    );
    profile(&bin, &host, &conf, "iptables");
    profile(&bin, &host, &conf_nft, "nftables");

    for (label, c) in [("iptables", &conf), ("nftables", &conf_nft)] {
        concurrent(label, &bin, &host, c);
    }
}

/// CONCURRENT ADDs at once, each on its own netns: errors, wall time, per-ADD times.
fn concurrent(label: &str, bin: &std::path::Path, host: &TestNetns, conf: &str) {
    let netns: Vec<TestNetns> = (0..CONCURRENT).map(|_| TestNetns::new("c")).collect();
    let barrier = Arc::new(std::sync::Barrier::new(CONCURRENT));
    let start = Instant::now();
    let results: Vec<(Duration, Result<(), String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = netns
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let barrier = barrier.clone();
                s.spawn(move || {
                    barrier.wait();
                    run_add(bin, host, ns, conf, &format!("bench-{i}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let wall = start.elapsed();
    let errors: Vec<&String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    let mut times: Vec<Duration> = results.iter().map(|(d, _)| *d).collect();
    let (c_med, c_p99) = stats(&mut times);
    println!(
        "concurrency ({label}): {CONCURRENT} ADDs at once: {} ok, {} errors, wall {}, per ADD median {} p99 {}",
        CONCURRENT - errors.len(),
        errors.len(),
        ms(wall),
        ms(c_med),
        ms(c_p99)
    );
    for e in errors.iter().take(3) {
        println!("  error: {e}");
    }
}

/// Runs our plugin's ADD for pod `bench-{i}` in `ns`, from the host-side netns, and times it.
fn run_add(
    bin: &std::path::Path,
    host: &TestNetns,
    ns: &TestNetns,
    conf: &str,
    pod: &str,
) -> (Duration, Result<(), String>) {
    host.open()
        .run(|_| timed_add(bin, &ns.path(), pod, pod, conf))
        .expect("enter host netns")
}

fn stats(v: &mut [Duration]) -> (Duration, Duration) {
    (quantile(v, 0.5), quantile(v, 0.99))
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// The read-back alone, in-process, from a thread inside the pod's netns: medians of
/// `pods` netns each for nftables (rules written by [`istio_cni::nft::apply`], then
/// [`istio_cni::nft::read_back`]: the nf_tables dumps and the comparison) and iptables
/// (`iptables-restore`, then [`istio_cni::validate::read_back`]: one `iptables-save`
/// per family and the comparison).
fn readback_medians(conf: &str, conf_nft: &str, pods: usize) -> (Duration, Duration) {
    let pod =
        || serde_json::from_value(injected_pod("default", "x", json!({}), json!({}))).expect("pod");
    let nft_conf = NetConf::parse(conf_nft.as_bytes()).expect("conf");
    let Plan::Redirect(nft_rules) =
        istio_cni::plan::plan_nft_for_pod(&nft_conf, &pod()).expect("plan")
    else {
        panic!("bench pod must be meshed")
    };
    let ipt_conf = NetConf::parse(conf.as_bytes()).expect("conf");
    let Plan::Redirect(ipt_rules) = plan_for_pod(&ipt_conf, &pod()).expect("plan") else {
        panic!("bench pod must be meshed")
    };
    let xt = Xtables::detect().expect("iptables");
    let (mut nft, mut ipt) = (Vec::new(), Vec::new());
    for _ in 0..pods {
        let ns = TestNetns::new("r");
        let took = ns
            .open()
            .run(|inside| {
                istio_cni::nft::apply(inside, &nft_rules).expect("nft apply");
                istio_cni::routing::apply_needs(inside, &nft_rules.routing_needs())
                    .expect("routing");
                let start = Instant::now();
                istio_cni::nft::read_back(inside, &nft_rules).expect("nft read-back");
                start.elapsed()
            })
            .expect("enter netns");
        nft.push(took);
        let ns = TestNetns::new("r");
        let took = ns
            .open()
            .run(|inside| {
                istio_cni::apply::apply(inside, &xt, &ipt_rules).expect("iptables apply");
                let start = Instant::now();
                istio_cni::validate::read_back(inside, &xt, &ipt_rules)
                    .expect("iptables read-back");
                start.elapsed()
            })
            .expect("enter netns");
        ipt.push(took);
    }
    (quantile(&mut nft, 0.5), quantile(&mut ipt, 0.5))
}

/// Where an ADD's time goes: [`PROFILED`] ADDs with the plugin's debug log, each phase's
/// median from the durations it logs (`API client set up in`, `read pod … in`, `netns
/// opened and locked in`, `… read back …`, `probed after`, `ADD done in … in the
/// process`); what the process does before its `main` (exec, loading, runtime set-up)
/// is the ADD's wall time minus its in-process time.
fn profile(bin: &std::path::Path, host: &TestNetns, conf: &str, label: &str) {
    let mut v: serde_json::Value = serde_json::from_str(conf).expect("conf");
    v["plugin_log_level"] = json!("debug");
    let conf = v.to_string();
    let phases = [
        "API client set up in ",
        "read pod ",
        "netns opened and locked in ",
        "read back ",
        "probed after ",
        "ADD done in ",
    ];
    let mut got: Vec<Vec<Duration>> = vec![Vec::new(); phases.len()];
    let mut walls = Vec::new();
    for i in 0..PROFILED {
        let ns = TestNetns::new("p");
        let pod = format!("bench-{i}");
        let (wall, ok, log) = host
            .open()
            .run(|_| istio_cni_e2e::stats::timed_add_logged(bin, &ns.path(), &pod, &pod, &conf))
            .expect("enter host netns");
        assert!(ok.is_ok(), "profiled ADD failed: {ok:?}");
        walls.push(wall);
        for line in log.lines() {
            for (p, into) in phases.iter().zip(got.iter_mut()) {
                let Some((_, rest)) = line.split_once(p) else {
                    continue;
                };
                // The first word after the phrase that reads as a duration.
                if let Some(d) = rest
                    .split_whitespace()
                    .find_map(istio_cni_e2e::stats::parse_debug_duration)
                {
                    into.push(d);
                }
            }
        }
    }
    let med = |v: &mut Vec<Duration>| {
        if v.is_empty() {
            Duration::ZERO
        } else {
            quantile(v, 0.5)
        }
    };
    let [client, read, netns, applied, probed, total] = &mut got[..] else {
        unreachable!()
    };
    let (client, read, netns, applied, probed, total) = (
        med(client),
        med(read),
        med(netns),
        med(applied),
        med(probed),
        med(total),
    );
    let wall = quantile(&mut walls, 0.5);
    println!("where a {label} ADD's time goes ({PROFILED} ADDs with the debug log; medians):");
    println!("  wall time                                   {}", ms(wall));
    println!(
        "  before main (exec, loading, runtime set-up) {}",
        ms(wall.saturating_sub(total))
    );
    println!(
        "  API client (kubeconfig, TLS set-up)         {}",
        ms(client)
    );
    println!(
        "  pod GET                                     {}",
        ms(read.saturating_sub(client))
    );
    println!(
        "  netns opened and locked                     {}",
        ms(netns)
    );
    println!(
        "  rules written and read back                 {}",
        ms(applied)
    );
    println!(
        "  probe                                       {}",
        ms(probed.saturating_sub(applied))
    );
    println!(
        "  the rest in the process (config, plan, output) {}",
        ms(total.saturating_sub(read + netns + probed))
    );
}
