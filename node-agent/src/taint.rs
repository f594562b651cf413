//! The node's not-ready taint and `IstioCNIReady` condition, driven by [`Readiness`].
//!
//! Nodes register with the taint (kubelet `--register-with-taints`, Karpenter
//! `startupTaints`), so meshed pods stay off a node until the plugin is proven there. The
//! controller removes the taint as soon as the agent is ready, puts it back when the agent
//! stays not ready longer than the grace period, and mirrors the state in the node
//! condition (`kubectl describe node` shows why a node is gated) and in Events.
//!
//! The node is read as raw JSON and only our taint (by key) and our condition (by type) are
//! changed in it; every other entry is written back exactly as read, fields this build's
//! `k8s-openapi` does not know included. Writes are JSON patches that first `test`
//! `metadata.resourceVersion`, so a concurrent writer is never clobbered: its change makes
//! the patch fail, and the controller reads again and retries. kube-apiserver answers a
//! failed `test` with 422 `Invalid` and a generic message (`applyJSPatch` in
//! `staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go`, through
//! `NewGenericServerResponse`), which cannot be told apart from other patch errors, so 422
//! is retried like 409 `Conflict`, a bounded number of times. When the node already is as
//! desired nothing is written: the steady state costs no API writes.
//!
//! Every request (each read, each patch, each Event) is bounded by
//! [`REQUEST_TIMEOUT`], on its own: a request lost in a black-holed connection fails after
//! that and the loop retries with backoff, so once the API answers again the node follows
//! within one request timeout. The metrics say what the agent last saw of its node:
//! `istio_cni_node_tainted` (our taint present, by key) and
//! `istio_cni_node_taint_state_known` (1 once the node was read; 0 before and after a failed
//! read, when `istio_cni_node_tainted` means nothing).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::apiclient::{ApiClient, REQUEST_TIMEOUT};
use crate::backoff::Backoff;
use crate::events::{EventType, Events};
use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// Type of the node condition this agent owns.
pub const CONDITION_TYPE: &str = "IstioCNIReady";
/// The taint and where it goes.
#[derive(Debug, Clone)]
pub struct TaintConfig {
    /// The node (`--node-name`, from the downward API).
    pub node: String,
    /// Taint key (default `cni.istio.io/not-ready`).
    pub key: String,
    /// Taint effect: `NoSchedule` (default) or `NoExecute`.
    pub effect: String,
    /// How long the agent may be not ready before the taint comes back.
    pub grace: Duration,
}

/// `current` (the node's `spec.taints`, raw) with our taint present (`tainted`) or absent;
/// every other taint unchanged, as read, and in place. `None` when `current` already is
/// that.
pub fn with_taint(current: &[Value], key: &str, effect: &str, tainted: bool) -> Option<Vec<Value>> {
    let ours = |t: &Value| t["key"] == key;
    let present = current.iter().any(|t| ours(t) && t["effect"] == effect);
    let others_of_ours = current.iter().filter(|t| ours(t)).count() != usize::from(present);
    if present == tainted && !others_of_ours {
        return None;
    }
    let mut out: Vec<Value> = current.iter().filter(|t| !ours(t)).cloned().collect();
    if tainted {
        out.push(json!({"key": key, "effect": effect}));
    }
    Some(out)
}

/// `current` (the node's `status.conditions`, raw) with our condition set to `ready` with
/// `reason` and `message`; other conditions unchanged, as read. `None` when ours already
/// says the same. The transition time moves only when the status changes.
pub fn with_condition(
    current: &[Value],
    ready: bool,
    reason: &str,
    message: &str,
    now: Time,
) -> Option<Vec<Value>> {
    let status = if ready { "True" } else { "False" };
    let old = current.iter().find(|c| c["type"] == CONDITION_TYPE);
    if let Some(c) = old {
        if c["status"] == status && c["reason"] == reason && c["message"] == message {
            return None;
        }
    }
    let transition = match old {
        Some(c) if c["status"] == status => c["lastTransitionTime"].clone(),
        _ => json!(now),
    };
    let ours = json!({
        "type": CONDITION_TYPE,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
        "lastHeartbeatTime": now,
    });
    let mut out: Vec<Value> = current
        .iter()
        .filter(|c| c["type"] != CONDITION_TYPE)
        .cloned()
        .collect();
    out.push(ours);
    Some(out)
}

/// A JSON patch that sets `path` to `new` only if the object is still at
/// `resource_version` (`add` replaces a member that exists, RFC 6902 section 4.1).
pub fn test_and_set(path: &str, resource_version: &str, new: Value) -> json_patch::Patch {
    let ops = json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
        {"op": "add", "path": path, "value": new},
    ]);
    serde_json::from_value(ops).unwrap_or_else(|_| json_patch::Patch(Vec::new()))
}

/// Whether a failed patch means "the node changed since it was read": 409 `Conflict`, or
/// 422, which kube-apiserver answers for a failed JSON-patch `test`.
fn changed_since_read(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 || s.code == 422)
}

/// A write of the taint or the condition failed.
#[derive(Debug, thiserror::Error)]
pub enum TaintError {
    /// No API client.
    #[error(transparent)]
    Client(#[from] crate::apiclient::ApiClientError),
    /// Reading the node failed.
    #[error("reading the node: {0}")]
    Read(#[source] kube::Error),
    /// A patch was refused for another reason than a concurrent change.
    #[error("patching {what}: {source}")]
    Patch {
        /// `the taints` or `the condition IstioCNIReady`.
        what: &'static str,
        /// The API's answer.
        source: kube::Error,
    },
    /// Every attempt met a concurrent change.
    #[error("the node kept changing under us ({0} conflicts)")]
    KeptChanging(u32),
    /// One request got no answer within [`REQUEST_TIMEOUT`]; it is retried on a new
    /// connection.
    #[error("{what}: no answer from the API server within {timeout:?} (is it reachable from this node?)")]
    Timeout {
        /// The request: `reading the node`, `patching the taints`, …
        what: &'static str,
        /// How long it was given.
        timeout: Duration,
    },
}

/// `call` (one API request) within [`REQUEST_TIMEOUT`]; [`TaintError::Timeout`] naming
/// `what` when it takes longer.
async fn within<T>(what: &'static str, call: impl Future<Output = T>) -> Result<T, TaintError> {
    tokio::time::timeout(REQUEST_TIMEOUT, call)
        .await
        .map_err(|_| TaintError::Timeout {
            what,
            timeout: REQUEST_TIMEOUT,
        })
}

/// Drives the taint and condition of one node.
pub struct TaintController {
    cfg: TaintConfig,
    api: ApiClient,
    events: Arc<Events>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
}

/// What the node should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Desired {
    /// `Some(true)`: tainted; `Some(false)`: untainted; `None`: leave the taint as it is.
    tainted: Option<bool>,
    ready: bool,
    reason: &'static str,
    message: String,
}

impl TaintController {
    /// A controller for `cfg.node`, using the agent's shared API client.
    pub fn new(
        cfg: TaintConfig,
        api: ApiClient,
        events: Arc<Events>,
        readiness: Arc<Readiness>,
        metrics: Arc<Metrics>,
    ) -> TaintController {
        TaintController {
            cfg,
            api,
            events,
            readiness,
            metrics,
        }
    }

    /// [`TaintController::run`] for a shared controller (the agent also uses it on exit).
    pub async fn run_shared(self: Arc<Self>) {
        self.run().await
    }

    /// Runs until the task is dropped: applies the desired state whenever readiness changes
    /// or the grace period ends, retrying failed writes with backoff (200 ms doubling to
    /// 10 s). It watches its own node (field selector `metadata.name`), so a taint or
    /// condition that someone else changed is put back as soon as the change is seen, and
    /// nothing is read while nothing changes. Without a watch (no client), it re-checks
    /// every minute instead.
    pub async fn run(&self) {
        let mut changed = self.readiness.subscribe();
        let mut node_events = self.node_watch().await;
        let mut not_ready_since: Option<Instant> = Some(Instant::now());
        let mut applied: Option<Desired> = None;
        let mut backoff = Backoff::with_jitter(Duration::from_millis(200), Duration::from_secs(10));
        // After a failed write, no new attempt before this instant, whatever wakes us.
        let mut retry_at: Option<Instant> = None;
        loop {
            let status = self.readiness.status();
            let now = Instant::now();
            let ready = status.is_ok();
            if ready {
                not_ready_since = None;
            } else if not_ready_since.is_none() {
                not_ready_since = Some(now);
            }
            let grace_end = not_ready_since.map(|t| t + self.cfg.grace);
            let desired = match &status {
                Ok(()) => Desired {
                    tainted: Some(false),
                    ready: true,
                    reason: "Ready",
                    message: "istio-cni is installed and its self-test passed".into(),
                },
                Err(reasons) => Desired {
                    // Before the grace period ends the taint is left as it is: a node that
                    // registered tainted stays tainted, a brief hiccup does not taint.
                    tainted: grace_end.is_some_and(|end| now >= end).then_some(true),
                    ready: false,
                    reason: "NotReady",
                    message: reasons.join("; "),
                },
            };
            let poll = node_events.is_none().then_some(Duration::from_secs(60));
            let mut wake = now + poll.unwrap_or(Duration::from_secs(3600));
            if let Some(at) = retry_at.filter(|at| now < *at) {
                wake = at;
            } else if applied.as_ref() != Some(&desired) {
                match self.apply(&desired).await {
                    Ok(()) => {
                        applied = Some(desired.clone());
                        backoff.reset();
                        retry_at = None;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        log::warn!("node {}: {e}; retrying in {delay:?}", self.cfg.node);
                        wake = now + delay;
                        retry_at = Some(wake);
                    }
                }
            }
            if desired.tainted.is_none() {
                if let Some(end) = grace_end {
                    wake = wake.min(end);
                }
            }
            let next_node = async {
                match node_events.as_mut() {
                    Some(events) => events.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                ev = next_node => match ev {
                    Some(Ok(node)) => {
                        self.observe(&node);
                        if applied.as_ref() == Some(&desired) && !self.is_as_desired(&node, &desired) {
                            log::info!("node {}: our taint or condition was changed by someone else; setting it again", self.cfg.node);
                            applied = None;
                        }
                    }
                    Some(Err(e)) => log::debug!("node {}: watch: {e}", self.cfg.node),
                    None => node_events = None,
                },
                _ = tokio::time::sleep_until(wake) => {
                    // Without a watch, the minute's re-check compares with the node itself.
                    if poll.is_some() && applied.as_ref() == Some(&desired) && Instant::now() >= now + Duration::from_secs(60) {
                        applied = None;
                    }
                }
            }
        }
    }

    /// A watch on this controller's node (its applies and changes, after the initial
    /// list), with `kube-runtime`'s backoff on errors; `None` without a client. Each list
    /// is bounded by [`REQUEST_TIMEOUT`] ([`crate::apiclient::watch_bounding_lists`]).
    async fn node_watch(
        &self,
    ) -> Option<futures::stream::BoxStream<'static, Result<Value, kube::runtime::watcher::Error>>>
    {
        use kube::runtime::WatchStreamExt as _;
        let client = match self.api.watch_client().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!(
                    "node {}: no watch ({e}); re-checking every minute",
                    self.cfg.node
                );
                return None;
            }
        };
        let nodes: kube::Api<kube::core::DynamicObject> =
            kube::Api::all_with(client, &kube::discovery::ApiResource::erase::<Node>(&()));
        let config = kube::runtime::watcher::Config::default()
            .fields(&format!("metadata.name={}", self.cfg.node));
        let stream = crate::apiclient::watch_bounding_lists(nodes, config)
            .default_backoff()
            .applied_objects()
            .map(|r| r.map(|o| json!({"spec": o.data["spec"], "status": o.data["status"]})));
        Some(stream.boxed())
    }

    /// Records what `node` (raw `spec` and `status`, just read or watched) carries: the
    /// taint state is known, and tainted when a taint with our key is there.
    fn observe(&self, node: &Value) {
        let ours = node["spec"]["taints"]
            .as_array()
            .is_some_and(|ts| ts.iter().any(|t| t["key"] == self.cfg.key.as_str()));
        self.metrics.node_tainted.set(i64::from(ours));
        self.metrics.node_taint_state_known.set(1);
    }

    /// Whether the watched `node` (raw `spec` and `status`) already shows `d`: our taint as
    /// desired (when `d` decides it) and our condition with its status, reason and message.
    fn is_as_desired(&self, node: &Value, d: &Desired) -> bool {
        let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
        let taints = list(&node["spec"]["taints"]);
        let conditions = list(&node["status"]["conditions"]);
        let taint_ok = d
            .tainted
            .is_none_or(|t| with_taint(&taints, &self.cfg.key, &self.cfg.effect, t).is_none());
        let epoch = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let condition_ok =
            with_condition(&conditions, d.ready, d.reason, &d.message, epoch).is_none();
        taint_ok && condition_ok
    }

    /// Sets the taint (and the condition to not ready) once, as the agent leaves for good.
    ///
    /// Errors: the API error.
    pub async fn taint_on_exit(&self, why: &str) -> Result<(), TaintError> {
        self.apply(&Desired {
            tainted: Some(true),
            ready: false,
            reason: "Uninstalled",
            message: format!("istio-cni was removed from this node: {why}"),
        })
        .await
    }

    /// Reads the node and patches what differs from `d`, re-reading after a concurrent
    /// change (five rounds at most). Each request is bounded by [`REQUEST_TIMEOUT`] on its
    /// own; the caller retries the whole with backoff.
    ///
    /// Errors: [`TaintError`] for the first request that failed or timed out, or
    /// [`TaintError::KeptChanging`].
    async fn apply(&self, d: &Desired) -> Result<(), TaintError> {
        let client = self.api.get().await?;
        let nodes: kube::Api<Node> = kube::Api::all(client.clone());
        let name = &self.cfg.node;
        let raw: kube::Api<kube::core::DynamicObject> = kube::Api::all_with(
            client.clone(),
            &kube::discovery::ApiResource::erase::<Node>(&()),
        );
        let params = PatchParams::default();
        // Conflicts (another writer between our read and our patch) are retried at once.
        for _ in 0..5 {
            let read = within("reading the node", raw.get(name))
                .await
                .and_then(|r| r.map_err(TaintError::Read));
            let node = match read {
                Ok(node) => node,
                Err(e) => {
                    self.metrics.node_taint_state_known.set(0);
                    return Err(e);
                }
            };
            self.observe(&node.data);
            let rv = node.metadata.resource_version.clone().unwrap_or_default();
            let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
            let taints = list(&node.data["spec"]["taints"]);
            let conditions = list(&node.data["status"]["conditions"]);
            if let Some(tainted) = d.tainted {
                if let Some(new) = with_taint(&taints, &self.cfg.key, &self.cfg.effect, tainted) {
                    let patch = Patch::<()>::Json(test_and_set("/spec/taints", &rv, json!(new)));
                    let patched = nodes.patch(name, &params, &patch);
                    match within("patching the taints", patched).await? {
                        Ok(_) => {
                            let (reason, verb) = if tainted {
                                ("IstioCNITaintAdded", "added")
                            } else {
                                ("IstioCNITaintRemoved", "removed")
                            };
                            log::info!(
                                "node {name}: taint {}:{} {verb} ({})",
                                self.cfg.key,
                                self.cfg.effect,
                                d.message
                            );
                            self.metrics.node_tainted.set(i64::from(tainted));
                            let type_ = if tainted {
                                EventType::Warning
                            } else {
                                EventType::Normal
                            };
                            let message = format!("taint {} {verb}: {}", self.cfg.key, d.message);
                            // The Event refers to the node by its metadata (name, uid).
                            let involved = Node {
                                metadata: node.metadata.clone(),
                                ..Node::default()
                            };
                            let action = if tainted { "TaintNode" } else { "UntaintNode" };
                            self.events
                                .record(&involved, type_, reason, &message, action)
                                .await;
                            continue; // re-read for the condition patch
                        }
                        Err(e) if changed_since_read(&e) => {
                            log::debug!(
                                "node {name}: changed since read ({e}); reading the taints again"
                            );
                            continue;
                        }
                        Err(source) => {
                            return Err(TaintError::Patch {
                                what: "the taints",
                                source,
                            })
                        }
                    }
                }
            }
            let now = Time(k8s_openapi::jiff::Timestamp::now());
            let Some(new) = with_condition(&conditions, d.ready, d.reason, &d.message, now) else {
                return Ok(());
            };
            let patch = Patch::<()>::Json(test_and_set("/status/conditions", &rv, json!(new)));
            let patched = nodes.patch_status(name, &params, &patch);
            match within("patching the condition IstioCNIReady", patched).await? {
                Ok(_) => return Ok(()),
                Err(e) if changed_since_read(&e) => {
                    log::debug!(
                        "node {name}: changed since read ({e}); reading the conditions again"
                    );
                    continue;
                }
                Err(source) => {
                    return Err(TaintError::Patch {
                        what: "the condition IstioCNIReady",
                        source,
                    })
                }
            }
        }
        Err(TaintError::KeptChanging(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, effect: &str) -> Value {
        json!({"key": key, "effect": effect})
    }

    #[test]
    fn only_our_taint_changes() {
        // A field this build does not know survives, as read.
        let others = vec![
            json!({"key": "a", "effect": "NoSchedule", "futureField": {"x": 1}}),
            taint("b", "NoExecute"),
        ];
        let key = "cni.istio.io/not-ready";
        let added = with_taint(&others, key, "NoSchedule", true).unwrap();
        assert_eq!(added[..2], others[..]);
        assert_eq!(added[2], taint(key, "NoSchedule"));
        assert_eq!(
            with_taint(&added, key, "NoSchedule", true),
            None,
            "already tainted"
        );
        assert_eq!(
            with_taint(&added, key, "NoSchedule", false).unwrap(),
            others
        );
        assert_eq!(
            with_taint(&others, key, "NoSchedule", false),
            None,
            "already untainted"
        );
        let other_effect = with_taint(&added, key, "NoExecute", true).unwrap();
        assert_eq!(
            other_effect[2],
            taint(key, "NoExecute"),
            "the effect is corrected"
        );
    }

    #[test]
    fn condition_is_ours_only_and_written_on_change() {
        let t = |s: &str| Time(s.parse().unwrap());
        let kubelet = json!({"type": "Ready", "status": "True", "futureField": 1});
        let c1 = with_condition(
            std::slice::from_ref(&kubelet),
            false,
            "NotReady",
            "install: x",
            t("2026-01-01T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(c1[0], kubelet);
        assert_eq!(c1[1]["status"], "False");
        assert_eq!(
            with_condition(
                &c1,
                false,
                "NotReady",
                "install: x",
                t("2026-01-01T00:01:00Z")
            ),
            None
        );
        let c2 = with_condition(&c1, true, "Ready", "ok", t("2026-01-01T00:02:00Z")).unwrap();
        assert_eq!(
            c2[1]["lastTransitionTime"],
            json!(t("2026-01-01T00:02:00Z"))
        );
    }
}
