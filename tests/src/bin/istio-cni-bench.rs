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
    for i in 0..pods.max(CONCURRENT) {
        api.put(
            "pods",
            injected_pod("default", &format!("bench-{i}"), json!({}), json!({})),
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
    let static_bin = std::env::var_os("ISTIO_CNI_STATIC_BIN").map(std::path::PathBuf::from);

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
    for i in 0..pods {
        let mut runs: Vec<(&std::path::Path, &str, &mut Vec<Duration>)> =
            vec![(&bin, &conf, &mut add), (&bin, &conf_nft, &mut add_nft)];
        if let Some(s) = &static_bin {
            runs.push((s, &conf, &mut add_static));
        }
        let n = runs.len();
        runs.rotate_left(i % n);
        for (b, c, into) in runs {
            let ns = TestNetns::new("b");
            let (took, ok) = run_add(b, &host, &ns, c, i);
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
    println!("ADD with native_nftables, interleaved with the above:");
    println!("  median {}   p99 {}", ms(nft_med), ms(nft_p99));
    println!(
        "floor (one nft -f + one nft -j list of the same transaction, fresh netns), {pods} runs:"
    );
    println!("  median {}   p99 {}", ms(nf_med), ms(nf_p99));
    println!(
        "ratio nftables ADD/its floor: median {:.2}x   p99 {:.2}x;   nftables/iptables ADD: median {:.2}x",
        nft_med.as_secs_f64() / nf_med.as_secs_f64(),
        nft_p99.as_secs_f64() / nf_p99.as_secs_f64(),
        nft_med.as_secs_f64() / add_med.as_secs_f64()
    );

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
                    run_add(bin, host, ns, conf, i)
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
    i: usize,
) -> (Duration, Result<(), String>) {
    host.open()
        .run(|_| {
            timed_add(
                bin,
                &ns.path(),
                &format!("bench{i}"),
                &format!("bench-{i}"),
                conf,
            )
        })
        .expect("enter host netns")
}

fn stats(v: &mut [Duration]) -> (Duration, Duration) {
    (quantile(v, 0.5), quantile(v, 0.99))
}
