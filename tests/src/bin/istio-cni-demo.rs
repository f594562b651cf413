//! `make demo`: the main job on a built-in example. Creates a pod sandbox in test network
//! namespaces, runs the chain loopback → bridge + host-local + istio-cni against the
//! in-repo fake API server, prints the rules the pod got and proves them with a redirected
//! connection, then tears everything down. Needs root.

use std::net::SocketAddr;
use std::time::Instant;

use istio_cni_e2e::sandbox::{
    connect_and_accept, injected_pod, listen_in, original_dst, Options, Sandbox,
};
use serde_json::json;

fn main() {
    let pod = injected_pod(
        "default",
        "demo-web",
        json!({"traffic.sidecar.istio.io/excludeOutboundPorts": "9090"}),
        json!({"securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}),
    );
    println!("== pod default/demo-web (injected, istio-proxy as uid 1337)");
    let sandbox = Sandbox::with(
        pod,
        Options {
            log_level: "info",
            ..Options::default()
        },
    );
    let start = Instant::now();
    let result = match sandbox.add() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ADD failed: {e:?}");
            std::process::exit(1);
        }
    };
    println!(
        "== CNI ADD (loopback, bridge, host-local, istio-cni) took {:?}; result:\n{}",
        start.elapsed(),
        serde_json::to_string_pretty(&result).expect("json")
    );
    println!("== rules in the pod netns (iptables-save):");
    for line in sandbox.pod.istio_rules(false) {
        println!("  {line}");
    }

    let outbound = listen_in(&sandbox.pod, "0.0.0.0:15001");
    let dst = SocketAddr::new(Sandbox::gateway(&result, false), 80);
    let conn = connect_and_accept(&sandbox.pod, dst, &outbound);
    println!(
        "== the app connected to {dst}; the connection arrived at the sidecar's outbound port {} with SO_ORIGINAL_DST {}",
        conn.local_addr().expect("local addr").port(),
        original_dst(&conn)
    );
    let inbound = listen_in(&sandbox.pod, "0.0.0.0:15006");
    let dst = SocketAddr::new(Sandbox::ip(&result, false), 8080);
    let conn = connect_and_accept(&sandbox.host, dst, &inbound);
    println!(
        "== a client on the node connected to {dst}; it arrived at the sidecar's inbound port {} with SO_ORIGINAL_DST {}",
        conn.local_addr().expect("local addr").port(),
        original_dst(&conn)
    );
    sandbox
        .chain
        .del(&sandbox.attachment, Some(&result))
        .expect("DEL");
    println!(
        "== CNI DEL done; rules left: {}",
        sandbox.pod.istio_rules(false).len()
    );
}
