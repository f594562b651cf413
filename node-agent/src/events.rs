//! Kubernetes Events the agent records (`kubectl describe node|pod` shows them), best
//! effort: a failure to record is logged, never fatal.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::PostParams;
use kube::{Resource, ResourceExt};

/// Component name in Events.
pub const COMPONENT: &str = "istio-cni-node-agent";

/// `Normal` or `Warning`, as the Event API spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Something expected happened.
    Normal,
    /// Something an operator may want to look at.
    Warning,
}

/// Records an Event about `obj` (a Node or a Pod) with `reason` and `message`, from this
/// agent on `host` (the node name). Node Events go to the `default` namespace, as the
/// kubelet's do; others to the object's namespace.
pub async fn record<K>(
    client: &kube::Client,
    obj: &K,
    type_: EventType,
    reason: &str,
    message: &str,
    host: &str,
) where
    K: Resource<DynamicType = ()>,
{
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_else(|| "default".into());
    let ev = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}.")),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: Some(name),
            namespace: obj.namespace(),
            uid: obj.meta().uid.clone(),
            resource_version: obj.meta().resource_version.clone(),
            ..ObjectReference::default()
        },
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some(
            match type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .into(),
        ),
        source: Some(EventSource {
            component: Some(COMPONENT.into()),
            host: Some(host.into()),
        }),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        reporting_component: Some(COMPONENT.into()),
        reporting_instance: Some(format!("{COMPONENT}-{host}")),
        ..Event::default()
    };
    let events: kube::Api<Event> = kube::Api::namespaced(client.clone(), &namespace);
    let params = PostParams::default();
    let created = events.create(&params, &ev);
    match tokio::time::timeout(crate::apiclient::REQUEST_TIMEOUT, created).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => log::warn!("recording event {reason}: {e}"),
        Err(_) => log::warn!("recording event {reason}: no answer in time"),
    }
}
