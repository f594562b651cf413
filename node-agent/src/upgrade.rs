//! On SIGTERM: is the agent going away for good (uninstall: remove the plugin), or only
//! being replaced (DaemonSet update, restart: keep it, since removing the plugin
//! mid-upgrade breaks pod teardown on the node)?
//!
//! The marker is the DaemonSet that owns the agent's pod: `helm uninstall` deletes it,
//! `helm upgrade` updates it. So: owner gone or being deleted → uninstall; owner present →
//! upgrade or restart. When the API cannot tell, the plugin stays: a plugin left behind is
//! harmless until the next agent, a plugin removed too early breaks pods.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;

use crate::apiclient::REQUEST_TIMEOUT;

/// What to do on exit, with the reason for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnExit {
    /// Remove the plugin.
    Cleanup(String),
    /// Keep the plugin installed.
    Keep(String),
}

/// `api.get_opt(name)` within [`REQUEST_TIMEOUT`]; a timeout is an error message.
async fn get_opt<K>(api: &kube::Api<K>, name: &str) -> Result<Option<K>, String>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match tokio::time::timeout(REQUEST_TIMEOUT, api.get_opt(name)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "no answer from the API server within {REQUEST_TIMEOUT:?}"
        )),
    }
}

/// Decides for the agent pod `namespace/name`, reading it and its DaemonSet through
/// `client` (the request client, [`crate::apiclient::ApiClient::get`]); each read is
/// bounded by [`REQUEST_TIMEOUT`]. When the API cannot tell, the answer is
/// [`OnExit::Keep`] with the reason.
pub async fn decide(client: kube::Client, namespace: &str, name: &str) -> OnExit {
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let pod = match get_opt(&pods, name).await {
        Ok(Some(p)) => p,
        Ok(None) => return OnExit::Cleanup(format!("own pod {namespace}/{name} is gone")),
        Err(e) => return OnExit::Keep(format!("cannot read own pod {namespace}/{name}: {e}")),
    };
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "DaemonSet" && o.controller == Some(true));
    let Some(owner) = owner else {
        return OnExit::Cleanup(format!("pod {namespace}/{name} has no DaemonSet owner"));
    };
    let daemonsets: kube::Api<DaemonSet> = kube::Api::namespaced(client, namespace);
    match get_opt(&daemonsets, &owner.name).await {
        Ok(None) => OnExit::Cleanup(format!(
            "DaemonSet {namespace}/{} is gone: uninstall",
            owner.name
        )),
        Ok(Some(ds)) if ds.metadata.uid.as_deref() != Some(owner.uid.as_str()) => {
            OnExit::Cleanup(format!(
                "DaemonSet {namespace}/{} was replaced by another object: uninstall",
                owner.name
            ))
        }
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_some() => OnExit::Cleanup(format!(
            "DaemonSet {namespace}/{} is being deleted: uninstall",
            owner.name
        )),
        Ok(Some(_)) => OnExit::Keep(format!(
            "DaemonSet {namespace}/{} still exists: upgrade or restart",
            owner.name
        )),
        Err(e) => OnExit::Keep(format!(
            "cannot read DaemonSet {namespace}/{}: {e}",
            owner.name
        )),
    }
}
