//! The agent's ZDS server and socket against the real ztunnel (istio/ztunnel, built from
//! `../shared/peers/ztunnel/` by its `build.sh` into `target/peers/`), in in-pod mode
//! without istiod: ztunnel connects to the agent's socket, takes the snapshot, and serves
//! a pod the agent adds (its listeners appear in the pod's netns, as the agent reads them)
//! until the agent deletes it. A pod added while ztunnel was away is in the snapshot of the
//! next connection; an enrolment (rules, ack, listeners) is proved or undone. Needs root;
//! the tests with the real ztunnel run in `make e2e` (`--ignored`).
//!
//! Without `../shared` (the shared peer kit), the test says how to get it and passes
//! without running.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use istio_cni::netns::Netns;
use istio_cni::rules::ambient::NodeSettings;
use istio_cni_e2e::net::{unique_name, TestNetns};
use istio_cni_e2e::ztunnel::{self, LocalWorkload, Ztunnel};
use istio_cni_node_agent::ambient::enrol::{AmbientPod, EnrolError, Enroller, LISTENER_WAIT};
use istio_cni_node_agent::ambient::listeners::missing_ztunnel_listeners;
use istio_cni_node_agent::ambient::server::{ServerError, Workload, ZdsServer};
use istio_cni_node_agent::ambient::socket::{accept_loop, bind_zds};
use istio_cni_node_agent::ambient::zds::WorkloadInfo;

const NODE_NAME: &str = "node1";

/// A pod netns with `ip`/24 on `eth0` (a veth kept inside) and `lo` up.
fn pod_netns(ip: Ipv4Addr) -> TestNetns {
    let ns = TestNetns::new("ztp");
    ns.exec(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ]);
    ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    ns.exec(&["ip", "link", "set", "eth0", "up"]);
    ns.exec(&["ip", "link", "set", "peer0", "up"]);
    ns
}

fn local_yaml(ip: Ipv4Addr) -> String {
    ztunnel::local_yaml(
        NODE_NAME,
        &[LocalWorkload {
            name: "web".into(),
            namespace: "default".into(),
            ip: ip.into(),
        }],
    )
}

/// Waits up to 30 s for `cond`, panicking with `what` and ztunnel's log tail after.
async fn eventually(what: &str, dir: &Path, mut cond: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if cond().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "timed out waiting for {what}; ztunnel log (last lines, newest first):\n{}",
        ztunnel::log_tail(&dir.join("ztunnel.log"), 30)
    );
}

fn missing(netns: &Netns) -> Vec<u16> {
    netns
        .run(|inside| missing_ztunnel_listeners(inside).unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "builds and runs the real ztunnel: make e2e"]
async fn the_real_ztunnel_takes_snapshots_adds_and_deletes_from_the_agent() {
    let Some(bin) = ztunnel::binary() else { return };
    let dir = tempfile::Builder::new().prefix("zds-").tempdir().unwrap();
    let ip = Ipv4Addr::new(10, 91, 0, 2);
    std::fs::write(dir.path().join("local.yaml"), local_yaml(ip)).unwrap();
    let uds = dir.path().join(format!("{}.sock", unique_name("zt")));
    let node = TestNetns::new("ztn");
    let pod = pod_netns(ip);
    let pod_handle = Arc::new(pod.open());

    let server = ZdsServer::new(Duration::from_secs(5));
    let accepting = tokio::spawn(accept_loop(bind_zds(&uds).unwrap(), server.clone()));
    let zt = Ztunnel::start(&bin, &node, NODE_NAME, dir.path(), &uds);
    let took = eventually(
        "ztunnel to connect and take the snapshot",
        dir.path(),
        async || server.connections().await == 1,
    )
    .await;
    eprintln!("ztunnel connected and took the (empty) snapshot {took:?} after start");
    eventually("ztunnel ready", dir.path(), async || ztunnel::ready(&node)).await;

    let web = Workload {
        uid: "uid-web".into(),
        info: WorkloadInfo {
            name: "web".into(),
            namespace: "default".into(),
            service_account: "web".into(),
        },
        netns: Some(pod_handle.clone()),
    };
    let t = Instant::now();
    server.add(web.clone()).await.expect("ztunnel acks the add");
    let acked = t.elapsed();
    eventually(
        "ztunnel's listeners in the pod netns",
        dir.path(),
        async || missing(&pod_handle).is_empty(),
    )
    .await;
    eprintln!(
        "add acked in {acked:?}; 15001, 15006 and 15008 listening in the pod netns {:?} after the add",
        t.elapsed()
    );

    // ztunnel restarts: the pod comes back through the next snapshot.
    drop(zt);
    eventually("the connection to end", dir.path(), async || {
        server.connections().await == 0
    })
    .await;
    let zt = Ztunnel::start(&bin, &node, NODE_NAME, dir.path(), &uds);
    eventually("the new ztunnel's snapshot", dir.path(), async || {
        server.connections().await == 1
    })
    .await;
    eventually(
        "the listeners back after the snapshot",
        dir.path(),
        async || missing(&pod_handle).is_empty(),
    )
    .await;

    server
        .del("uid-web")
        .await
        .expect("ztunnel acks the delete");
    eventually(
        "the listeners gone after the delete",
        dir.path(),
        async || missing(&pod_handle).len() == 3,
    )
    .await;

    drop(zt);
    eventually("the connection to end", dir.path(), async || {
        server.connections().await == 0
    })
    .await;
    assert!(matches!(server.add(web).await, Err(ServerError::NoZtunnel)));
    accepting.abort();
}

fn enroller(server: &ZdsServer, lock_dir: &Path) -> Enroller {
    Enroller {
        node: NodeSettings::new(true, false),
        tools: istio_cni::plugin::Tools::detect(),
        lock_dir: lock_dir.to_owned(),
        server: server.clone(),
        listener_wait: LISTENER_WAIT,
        host: None,
        pods: Default::default(),
        native_nftables: false,
    }
}

fn ambient_pod() -> AmbientPod {
    AmbientPod {
        uid: "uid-web".into(),
        info: WorkloadInfo {
            name: "web".into(),
            namespace: "default".into(),
            service_account: "web".into(),
        },
        annotations: Default::default(),
        ips: Vec::new(),
    }
}

/// An enrolment counts only when ztunnel's listeners are in the pod's netns: with no
/// ztunnel, or one that acks without listening, it fails with the reason and leaves the
/// netns without rules and ztunnel without the pod. Needs root (no ztunnel binary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolment_is_proved_or_undone() {
    let dir = tempfile::Builder::new().prefix("zds-").tempdir().unwrap();
    let uds = dir.path().join("ztunnel.sock");
    let pod = pod_netns(Ipv4Addr::new(10, 91, 0, 3));
    let netns = Arc::new(pod.open());
    let server = ZdsServer::new(Duration::from_secs(5));
    let e = enroller(&server, dir.path());

    let err = e.enrol(&ambient_pod(), netns.clone()).await.unwrap_err();
    assert!(err.to_string().contains("no ztunnel is connected"), "{err}");
    assert!(
        pod.istio_rules(false).is_empty(),
        "{:?}",
        pod.istio_rules(false)
    );
    assert!(server.pods().await.is_empty());

    let accepting = tokio::spawn(accept_loop(bind_zds(&uds).unwrap(), server.clone()));
    let _double = ztunnel::acking_double(&uds);
    eventually("the double's snapshot", dir.path(), async || {
        server.connections().await == 1
    })
    .await;
    let err = e.enrol(&ambient_pod(), netns.clone()).await.unwrap_err();
    assert!(
        matches!(&err, EnrolError::NoListeners { missing, .. } if missing.len() == 3),
        "{err}"
    );
    assert!(
        pod.istio_rules(false).is_empty(),
        "{:?}",
        pod.istio_rules(false)
    );
    assert!(server.pods().await.is_empty());
    assert!(!pod.exec(&["ip", "rule", "show"]).contains("0x111"));
    accepting.abort();
}

/// With the real ztunnel: the pod's in-pod rules and policy routing are written and read
/// back, ztunnel takes it and listens in its netns; unenrolment removes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "builds and runs the real ztunnel: make e2e"]
async fn the_real_ztunnel_serves_an_enrolled_pod() {
    let Some(bin) = ztunnel::binary() else { return };
    let dir = tempfile::Builder::new().prefix("zds-").tempdir().unwrap();
    let ip = Ipv4Addr::new(10, 91, 0, 4);
    std::fs::write(dir.path().join("local.yaml"), local_yaml(ip)).unwrap();
    let uds = dir.path().join("ztunnel.sock");
    let node = TestNetns::new("ztn");
    let pod = pod_netns(ip);
    let netns = Arc::new(pod.open());
    let server = ZdsServer::new(Duration::from_secs(5));
    let accepting = tokio::spawn(accept_loop(bind_zds(&uds).unwrap(), server.clone()));
    let _zt = Ztunnel::start(&bin, &node, NODE_NAME, dir.path(), &uds);
    eventually("ztunnel's snapshot", dir.path(), async || {
        server.connections().await == 1
    })
    .await;
    let e = enroller(&server, dir.path());
    let t = Instant::now();
    e.enrol(&ambient_pod(), netns.clone())
        .await
        .expect("enrolled");
    eprintln!("enrolled (rules, ack, listeners) in {:?}", t.elapsed());
    let rules = pod.istio_rules(false);
    assert!(
        rules
            .iter()
            .any(|l| l.contains("-j REDIRECT --to-ports 15001")),
        "{rules:?}"
    );
    assert!(pod
        .exec(&["ip", "rule", "show"])
        .contains("fwmark 0x111/0xfff lookup 100"));
    assert!(missing(&netns).is_empty());
    e.unenrol("uid-web", Some(netns.clone())).await.unwrap();
    assert!(pod.istio_rules(false).is_empty());
    eventually("the listeners gone", dir.path(), async || {
        missing(&netns).len() == 3
    })
    .await;
    accepting.abort();
}
