//! The fake API server's semantics, through the real `kube` client over HTTP: 404s,
//! resourceVersion, JSON patch with `test` (422 Invalid on mismatch, as kube-apiserver), merge patch, the status
//! subresource, named API groups, and the write counter.

use istio_cni_e2e::fake_api::FakeApi;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams};
use serde_json::json;

async fn client(api: &FakeApi, dir: &std::path::Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(api.write_kubeconfig(dir)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// Runs `f` to completion on a fresh single-threaded runtime.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn nodes_patches_and_conflicts() {
    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    api.put(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
        "spec": {"taints": [{"key": "other", "effect": "NoSchedule"}]}}),
    );
    block_on(async {
        let nodes: kube::Api<Node> = kube::Api::all(client(&api, dir.path()).await);
        assert!(nodes.get_opt("missing").await.unwrap().is_none());
        let n = nodes.get("n1").await.unwrap();
        let rv = n.metadata.resource_version.clone().unwrap();

        // test + replace succeeds on the current value and bumps resourceVersion.
        let taints = json!([{"key": "other", "effect": "NoSchedule"}]);
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": "/spec/taints", "value": taints},
            {"op": "replace", "path": "/spec/taints", "value": [{"key": "other", "effect": "NoSchedule"}, {"key": "mine", "effect": "NoSchedule"}]},
        ]))
        .unwrap();
        let n = nodes
            .patch(
                "n1",
                &PatchParams::default(),
                &Patch::<()>::Json(patch.clone()),
            )
            .await
            .unwrap();
        assert_eq!(n.spec.unwrap().taints.unwrap().len(), 2);
        assert_ne!(n.metadata.resource_version.unwrap(), rv);

        // Another writer changes the taints first: the same test fails, and kube-apiserver
        // answers 422 Invalid with the generic message and empty details (applyJSPatch).
        api.before_next_patch("nodes", "n1", |n| n["spec"]["taints"] = json!([]));
        let err = nodes
            .patch("n1", &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
            .unwrap_err();
        let kube::Error::Api(s) = &err else {
            panic!("{err}")
        };
        assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"), "{err}");
        assert_eq!(
            s.message,
            "the server rejected our request due to an error in our request"
        );
        assert_eq!(
            api.get("nodes", "", "n1").unwrap()["spec"]["taints"],
            json!([]),
            "their change stays"
        );

        // Merge patch on the status subresource.
        let before = api.writes();
        let status =
            json!({"status": {"conditions": [{"type": "IstioCNIReady", "status": "True"}]}});
        nodes
            .patch_status("n1", &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
        assert_eq!(
            api.get("nodes", "", "n1").unwrap()["status"]["conditions"][0]["type"],
            "IstioCNIReady"
        );
        assert_eq!(api.writes(), before + 1);
    });
}

fn pod(name: &str, node: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "app"}]}})
}

fn names(pods: &[Pod]) -> Vec<String> {
    let mut n: Vec<String> = pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    n.sort();
    n
}

type PodEvents = futures::stream::BoxStream<
    'static,
    Result<kube::runtime::watcher::Event<Pod>, kube::runtime::watcher::Error>,
>;

/// The watcher's next event, within 5 s.
async fn next_event(
    events: &mut PodEvents,
) -> Result<kube::runtime::watcher::Event<Pod>, kube::runtime::watcher::Error> {
    use futures::StreamExt;
    tokio::time::timeout(std::time::Duration::from_secs(5), events.next())
        .await
        .expect("an event within 5s")
        .expect("stream open")
}

/// A (re)list: Init, one InitApply for the pod `name`, InitDone.
async fn expect_list(events: &mut PodEvents, name: &str) {
    use kube::runtime::watcher::Event;
    let ev = next_event(events).await.expect("no watch error");
    assert!(matches!(ev, Event::Init), "Init expected");
    let Event::InitApply(p) = next_event(events).await.expect("no watch error") else {
        panic!("InitApply expected")
    };
    assert_eq!(names(&[p]), [name]);
    let ev = next_event(events).await.expect("no watch error");
    assert!(matches!(ev, Event::InitDone), "InitDone expected");
}

/// What kube-runtime's watcher (list, then watch from the list's version) sees through a
/// field selector: the initial list as InitApply, later matching pods as Apply, a pod that
/// stops matching and a deleted pod as Delete, other nodes' pods never; after compaction,
/// a 410 makes it list again.
#[test]
fn watcher_with_field_selector_and_relist() {
    use futures::StreamExt;
    use kube::runtime::watcher::{self, Event};
    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    api.put("pods", pod("a", "n1"));
    api.put("pods", pod("other", "n2"));
    block_on(async {
        let pods: kube::Api<Pod> = kube::Api::all(client(&api, dir.path()).await);
        // Watches end after 1 s and resume from the last version seen; no bookmarks, so
        // that version stays the last matching change's.
        api.set_bookmark_interval(std::time::Duration::from_secs(600));
        let config = watcher::Config::default()
            .fields("spec.nodeName=n1")
            .timeout(1);
        let mut events = watcher::watcher(pods.clone(), config).boxed();
        expect_list(&mut events, "a").await;

        api.put("pods", pod("other2", "n2"));
        api.put("pods", pod("b", "n1"));
        let Event::Apply(p) = next_event(&mut events).await.expect("no watch error") else {
            panic!("Apply expected")
        };
        assert_eq!(names(&[p]), ["b"]);

        // `a` moves to another node: DELETED for this watcher; `b` is deleted.
        api.put("pods", pod("a", "n2"));
        let Event::Delete(p) = next_event(&mut events).await.expect("no watch error") else {
            panic!("Delete expected")
        };
        assert_eq!(names(&[p]), ["a"]);
        assert!(api.remove("pods", "default", "b"));
        let Event::Delete(p) = next_event(&mut events).await.expect("no watch error") else {
            panic!("Delete expected")
        };
        assert_eq!(names(&[p]), ["b"]);

        // Compaction while the watch is open changes nothing for it; once it times out,
        // the next watch from its version gets 410 and the watcher lists again.
        api.put("pods", pod("c", "n1"));
        let Event::Apply(_) = next_event(&mut events).await.expect("no watch error") else {
            panic!("Apply expected")
        };
        api.put("pods", pod("other3", "n2"));
        api.compact();
        let err = next_event(&mut events).await.unwrap_err();
        assert!(err.to_string().contains("Expired"), "{err}");
        expect_list(&mut events, "c").await;
        assert!(api.watches() >= 2);
    });
}

/// Raw watch: bookmarks arrive, carrying the current resourceVersion; a watch from a
/// compacted version gets a 410 error event.
#[test]
fn bookmarks_and_expired_versions() {
    use futures::StreamExt;
    use kube::api::{WatchEvent, WatchParams};
    let api = FakeApi::start();
    api.set_bookmark_interval(std::time::Duration::from_millis(50));
    let dir = tempfile::tempdir().unwrap();
    let created = api.put("pods", pod("a", "n1"));
    let rv = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    block_on(async {
        let pods: kube::Api<Pod> = kube::Api::all(client(&api, dir.path()).await);
        let params = WatchParams::default().fields("spec.nodeName=n1");
        let mut stream = pods.watch(&params, &rv).await.unwrap().boxed();
        let ev = stream.next().await.unwrap().unwrap();
        let WatchEvent::Bookmark(b) = ev else {
            panic!("bookmark expected, got {ev:?}")
        };
        assert_eq!(b.metadata.resource_version, rv);
        drop(stream);

        api.put("pods", pod("b", "n1"));
        api.compact();
        let mut stream = pods.watch(&params, &rv).await.unwrap().boxed();
        match stream.next().await.unwrap().unwrap() {
            WatchEvent::Error(e) => assert_eq!(e.code, 410),
            other => panic!("410 expected, got {other:?}"),
        }
    });
}

/// DELETE with preconditions: a stale uid or resourceVersion is a 409 and the pod stays.
#[test]
fn delete_preconditions() {
    use kube::api::{DeleteParams, Preconditions};
    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let created = api.put("pods", pod("a", "n1"));
    let uid = created["metadata"]["uid"].as_str().unwrap().to_owned();
    let rv = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    block_on(async {
        let pods: kube::Api<Pod> = kube::Api::namespaced(client(&api, dir.path()).await, "default");
        let with = |uid: &str, rv: &str| DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.into()),
                resource_version: Some(rv.into()),
            }),
            ..DeleteParams::default()
        };
        let err = pods
            .delete("a", &with("someone-else", &rv))
            .await
            .unwrap_err();
        assert!(
            matches!(err, kube::Error::Api(ref s) if s.code == 409),
            "{err}"
        );
        let err = pods.delete("a", &with(&uid, "1")).await.unwrap_err();
        assert!(
            matches!(err, kube::Error::Api(ref s) if s.code == 409),
            "{err}"
        );
        assert!(api.get("pods", "default", "a").is_some());
        pods.delete("a", &with(&uid, &rv)).await.unwrap();
        assert!(api.get("pods", "default", "a").is_none());
    });
}

/// Over HTTPS, as kube-apiserver serves: a client that trusts the CA of
/// [`FakeApi::ca_pem`] (what a service account's `ca.crt` holds) gets answers; one that
/// trusts another CA is refused at the handshake.
#[test]
fn https_with_the_service_account_ca() {
    let api = FakeApi::start_tls();
    let dir = tempfile::tempdir().unwrap();
    api.put(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
    );
    block_on(async {
        let nodes: kube::Api<Node> = kube::Api::all(client(&api, dir.path()).await);
        assert_eq!(
            nodes.get("n1").await.unwrap().metadata.name.as_deref(),
            Some("n1")
        );
        // The same server, trusted through another server's CA: refused.
        let other = FakeApi::start_tls();
        let kc = kube::config::Kubeconfig::read_from(api.write_kubeconfig(dir.path())).unwrap();
        let mut kc = kc;
        let ca = base64::prelude::Engine::encode(
            &base64::prelude::BASE64_STANDARD,
            other.ca_pem().as_bytes(),
        );
        kc.clusters[0]
            .cluster
            .as_mut()
            .unwrap()
            .certificate_authority_data = Some(ca);
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        let untrusted: kube::Api<Node> = kube::Api::all(kube::Client::try_from(config).unwrap());
        assert!(
            untrusted.get("n1").await.is_err(),
            "a certificate from an untrusted CA"
        );
    });
}
