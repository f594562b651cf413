//! The fake API server's semantics, through the real `kube` client over HTTP: 404s,
//! resourceVersion, JSON patch with `test` (409 on mismatch), merge patch, the status
//! subresource, named API groups, and the write counter.

use istio_cni_e2e::fake_api::FakeApi;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use serde_json::json;

async fn client(api: &FakeApi, dir: &std::path::Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(api.write_kubeconfig(dir)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
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
        let n = nodes.patch("n1", &PatchParams::default(), &Patch::<()>::Json(patch.clone())).await.unwrap();
        assert_eq!(n.spec.unwrap().taints.unwrap().len(), 2);
        assert_ne!(n.metadata.resource_version.unwrap(), rv);

        // Another writer changes the taints first: the same test fails with 409.
        api.before_next_patch("nodes", "n1", |n| n["spec"]["taints"] = json!([]));
        let err = nodes.patch("n1", &PatchParams::default(), &Patch::<()>::Json(patch)).await.unwrap_err();
        assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409), "{err}");
        assert_eq!(api.get("nodes", "", "n1").unwrap()["spec"]["taints"], json!([]), "their change stays");

        // Merge patch on the status subresource.
        let before = api.writes();
        let status = json!({"status": {"conditions": [{"type": "IstioCNIReady", "status": "True"}]}});
        nodes.patch_status("n1", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
        assert_eq!(api.get("nodes", "", "n1").unwrap()["status"]["conditions"][0]["type"], "IstioCNIReady");
        assert_eq!(api.writes(), before + 1);
    });
}
