//! Kubernetes Events the agent records (`kubectl describe node|pod`, `kubectl events` show
//! them), through `kube-runtime`'s [`Recorder`]: `events.k8s.io/v1` Events, a repeat of the
//! same event within the recorder's cache time becoming a series (a count and a last
//! time, one PATCH) rather than a new object. One [`Events`] per process, so that the
//! series span every loop. Best effort: a failure to record is logged, never fatal.

use kube::runtime::events::{Event, Recorder, Reporter};
use kube::Resource;

pub use kube::runtime::events::EventType;

use crate::apiclient::{ApiClient, REQUEST_TIMEOUT};

/// Component name in Events (`reportingController`).
pub const COMPONENT: &str = "istio-cni-node-agent";

/// The process's Event recorder, built on first use from the shared API client's request
/// client ([`ApiClient::get`]), so that each of its requests is bounded by
/// [`REQUEST_TIMEOUT`].
pub struct Events {
    api: ApiClient,
    reporter: Reporter,
    recorder: tokio::sync::OnceCell<Recorder>,
}

impl Events {
    /// A recorder for the agent on node `host` (`reportingInstance`
    /// `istio-cni-node-agent-<host>`).
    pub fn new(api: ApiClient, host: &str) -> Events {
        Events {
            api,
            reporter: Reporter {
                controller: COMPONENT.into(),
                instance: Some(format!("{COMPONENT}-{host}")),
            },
            recorder: tokio::sync::OnceCell::new(),
        }
    }

    /// Records an Event about `obj` (a Node or a Pod): `reason` (CamelCase, e.g.
    /// `IstioCNIRepaired`), `note` for people, and `action` (what the agent did, e.g.
    /// `RepairRules`). Node Events go to the `default` namespace, others to the object's.
    /// Waits at most [`REQUEST_TIMEOUT`].
    pub async fn record<K>(&self, obj: &K, type_: EventType, reason: &str, note: &str, action: &str)
    where
        K: Resource<DynamicType = ()>,
    {
        let recorder = match self
            .recorder
            .get_or_try_init(|| async {
                let client = self.api.get().await?;
                Ok::<_, crate::apiclient::ApiClientError>(Recorder::new(
                    client,
                    self.reporter.clone(),
                ))
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                log::warn!("recording event {reason}: {e}");
                return;
            }
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.into()),
            action: action.into(),
            secondary: None,
        };
        let reference = obj.object_ref(&());
        match tokio::time::timeout(REQUEST_TIMEOUT, recorder.publish(&event, &reference)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::warn!("recording event {reason}: {e}"),
            Err(_) => log::warn!("recording event {reason}: no answer in time"),
        }
    }
}
