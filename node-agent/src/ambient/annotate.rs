//! The pod's ambient state in the API: the `ambient.istio.io/redirection` annotation
//! (upstream `cni/pkg/util/podutil.go`, `AnnotateEnrolledPod`,
//! `AnnotatePartiallyEnrolledPod`, `AnnotateUnenrollPod`), which istiod and ztunnel read to
//! tell a captured pod from one that is not. Written with a JSON merge patch on the
//! `pods/status` subresource, as upstream does: it can change metadata too, and needs
//! less privilege than `pods`.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use serde_json::json;

/// The annotation's key.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

/// The value of [`REDIRECTION_ANNOTATION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirection {
    /// The in-pod rules are written and ztunnel took the pod (`enabled`).
    Enabled,
    /// The in-pod rules are written; ztunnel has not taken the pod yet (`pending`).
    Pending,
}

impl Redirection {
    /// The annotation's value, as upstream writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Redirection::Enabled => "enabled",
            Redirection::Pending => "pending",
        }
    }

    /// The state a pod's annotations record, if any.
    pub fn of(pod: &Pod) -> Option<Redirection> {
        match pod
            .metadata
            .annotations
            .as_ref()?
            .get(REDIRECTION_ANNOTATION)?
            .as_str()
        {
            "enabled" => Some(Redirection::Enabled),
            "pending" => Some(Redirection::Pending),
            _ => None,
        }
    }
}

/// Sets the annotation of pod `namespace/name` to `state` (`None`: removes it).
///
/// Errors: the API's error; a pod that is gone is not an error when removing.
pub async fn set(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    state: Option<Redirection>,
) -> Result<(), kube::Error> {
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let value = state.map(Redirection::as_str);
    let patch = json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}});
    match pods
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 && state.is_none() => Ok(()),
        Err(e) => Err(e),
    }
}
