//! The plugin's ADD event of an ambient pod, checked and acted on (upstream
//! `cni/pkg/nodeagent/cni-watcher.go`, `ReconcileCNIAddEvent`; the checks are ours).
//!
//! Anything that can reach the plugin-event socket can send an event, so an event is a
//! claim, checked before the agent enters any netns on its behalf:
//! 1. the pod it names is read from the API: it must exist, be scheduled to this node, and
//!    be ambient by this agent's settings (enablement selectors, excluded namespaces, not
//!    the agent's own pod, not host-network, no sidecar);
//! 2. the netns it names is opened once, as the host sees it (`<host root>/<path>`), and
//!    must be a network namespace other than the host's (and the agent's);
//! 3. every address of the event must be on an interface inside that netns, and when the
//!    API already lists the pod's addresses, they must be the event's;
//! 4. no process of another pod (by its cgroup's pod UID) may live in that netns.
//!
//! Only then is the pod enrolled ([`Enroller::enrol`]: rules, ztunnel's ack, its listeners
//! in the netns) and annotated `ambient.istio.io/redirection: enabled`. Anything that fails
//! after the first write undoes the enrolment, so the plugin's ADD fails with nothing left
//! in the netns. The whole exchange is bounded by [`AGENT_DEADLINE`]; it runs on its own
//! task, so a plugin that hangs up midway cannot cut an enrolment in half.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use istio_cni::enablement::Enablement;
use istio_cni::netns::{Netns, NetnsError};
use istio_cni::pluginevent::{CheckedAddEvent, AGENT_DEADLINE};
use k8s_openapi::api::core::v1::{Namespace, Pod};

use super::annotate::{self, Redirection};
use super::enrol::{api_pod_ips, AmbientPod, EnrolError, Enroller};
use super::pluginevents::{Answer, Handler};
use crate::apiclient::ApiClient;
use crate::config::Exclusions;
use crate::locate::{addresses_in, ProcIndex};

/// How long each API request of an admission may take (the pod, its namespace, the
/// annotation).
pub const API_WAIT: Duration = Duration::from_secs(5);

/// Why an event was not acted on, or its enrolment failed (and was undone).
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The API could not be asked, or did not answer.
    #[error("reading {what} from the Kubernetes API: {reason}")]
    Api {
        /// The object.
        what: String,
        /// The error.
        reason: String,
    },
    /// The pod the event names is not one this agent may enrol.
    #[error("pod {pod} is not enrolled by this agent: {why}")]
    NotOurs {
        /// `namespace/name`.
        pod: String,
        /// Why.
        why: String,
    },
    /// The netns the event names cannot be used.
    #[error("the netns of the event ({path}): {source}")]
    Netns {
        /// The path as the event gives it.
        path: PathBuf,
        /// Why.
        source: NetnsError,
    },
    /// The event and the netns (or the API) disagree about the pod's addresses.
    #[error("the event does not match netns {path}: {why}")]
    Mismatch {
        /// The path as the event gives it.
        path: PathBuf,
        /// What differs.
        why: String,
    },
    /// Enrolment failed; it was undone.
    #[error(transparent)]
    Enrol(#[from] EnrolError),
    /// The pod was enrolled, but its annotation could not be written: undone.
    #[error("annotating the pod {REDIRECTION}=enabled failed ({0}); the enrolment was undone")]
    Annotate(String),
    /// No ztunnel serves the node: nothing was done.
    #[error("no ztunnel is connected to this node's istio-cni agent (waited {0:?}); is the ztunnel DaemonSet running on this node? Ambient pods start once it is")]
    NoZtunnel(Duration),
    /// Over [`AGENT_DEADLINE`]; what was done was undone.
    #[error("the enrolment took longer than {0:?}; it was undone")]
    Deadline(Duration),
}

const REDIRECTION: &str = annotate::REDIRECTION_ANNOTATION;

impl AdmitError {
    /// The HTTP status the plugin gets (its message is the error's text).
    pub fn status(&self) -> StatusCode {
        match self {
            AdmitError::Api { .. } | AdmitError::Annotate(_) | AdmitError::NoZtunnel(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            // ztunnel went away between the wait and the hand-over: try again later.
            AdmitError::Enrol(EnrolError::Ztunnel(super::server::ServerError::NoZtunnel)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AdmitError::NotOurs { .. } | AdmitError::Mismatch { .. } => StatusCode::CONFLICT,
            AdmitError::Netns { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AdmitError::Enrol(_) => StatusCode::BAD_GATEWAY,
            AdmitError::Deadline(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// What admitting an event needs.
#[derive(Clone)]
pub struct Admitter {
    /// The agent's API client.
    pub api: ApiClient,
    /// This node's name (`spec.nodeName` of the pods it may enrol).
    pub node: String,
    /// Which pods are ambient (`AMBIENT_ENABLEMENT_SELECTOR`).
    pub enablement: Arc<Enablement>,
    /// The agent's namespace and the excluded namespaces.
    pub exclusions: Exclusions,
    /// The host's root as the agent sees it: an event's netns path is read below it.
    pub host_root: PathBuf,
    /// The runtime's netns dirs as the agent sees them (`NETNS_DIRS`): an event's netns
    /// must be a file directly in one of them (or `/proc/<pid>/ns/net`).
    pub netns_dirs: Vec<PathBuf>,
    /// This node's pods as the watch last listed them (none before its first list).
    pub pods: super::watch::SharedPods,
    /// The host's `/proc` as the agent sees it (the host's netns, pods' processes).
    pub host_proc: PathBuf,
    /// Enrols the pod once admitted.
    pub enroller: Enroller,
}

impl Admitter {
    /// The plugin-event handler: each event on its own task, answered within
    /// [`AGENT_DEADLINE`].
    pub fn handler(self) -> Handler {
        let me = Arc::new(self);
        Arc::new(move |event: CheckedAddEvent| {
            let me = me.clone();
            Box::pin(async move {
                let task = tokio::spawn(async move { me.admit(event).await });
                let answer: Answer = match task.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err((e.status(), e.to_string())),
                    Err(e) => Err((
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("the enrolment task failed: {e}"),
                    )),
                };
                answer
            })
        })
    }

    /// Checks `event` (see the module docs), then enrols and annotates its pod.
    ///
    /// Errors: [`AdmitError`]; nothing of the enrolment is left behind.
    pub async fn admit(&self, event: CheckedAddEvent) -> Result<(), AdmitError> {
        let start = Instant::now();
        let pod_name = format!("{}/{}", event.pod_namespace, event.pod_name);
        let client = self.api.get().await.map_err(|e| AdmitError::Api {
            what: format!("pod {pod_name}"),
            reason: e.to_string(),
        })?;
        let (pod, namespace_labels) = self.read(&client, &event).await?;
        let read = start.elapsed();
        let uid = self.check_pod(&pod, &pod_name, &namespace_labels)?;
        let netns = self.check_netns(&event, &pod, &uid).await?;
        let checked = start.elapsed();
        // No rules are written for a ztunnel that is not there.
        if !self
            .enroller
            .server
            .wait_for_ztunnel(super::ZTUNNEL_WAIT)
            .await
        {
            return Err(AdmitError::NoZtunnel(super::ZTUNNEL_WAIT));
        }
        // From here to the end (undo included), nothing else acts on this pod.
        let _pod_lock = self.enroller.pods.lock(&uid).await;
        let mut ambient = AmbientPod::of(&pod, &uid);
        // The API has no addresses yet during ADD: the event's, checked in the netns.
        ambient.ips = event.ips.iter().map(|n| n.addr()).collect();
        self.enroller.enrol(&ambient, netns.clone()).await?;
        let enrolled = start.elapsed();
        let undo = |why: AdmitError| async {
            if let Err(e) = self.enroller.unenrol(&uid, Some(netns.clone())).await {
                log::warn!("ambient: undoing the enrolment of pod {pod_name}: {e}");
            }
            // The patch may have landed although its answer did not: best effort, bounded.
            let cleared = tokio::time::timeout(
                API_WAIT,
                annotate::set(&client, &event.pod_namespace, &event.pod_name, None),
            )
            .await;
            if !matches!(cleared, Ok(Ok(()))) {
                log::warn!(
                    "ambient: removing the annotation of pod {pod_name} after an undo failed"
                );
            }
            Err(why)
        };
        if start.elapsed() > AGENT_DEADLINE {
            return undo(AdmitError::Deadline(AGENT_DEADLINE)).await;
        }
        let annotated = tokio::time::timeout(
            API_WAIT,
            annotate::set(
                &client,
                &event.pod_namespace,
                &event.pod_name,
                Some(Redirection::Enabled),
            ),
        )
        .await;
        match annotated {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return undo(AdmitError::Annotate(e.to_string())).await,
            Err(_) => {
                return undo(AdmitError::Annotate(format!(
                    "no answer within {API_WAIT:?}"
                )))
                .await
            }
        }
        if start.elapsed() > AGENT_DEADLINE {
            return undo(AdmitError::Deadline(AGENT_DEADLINE)).await;
        }
        log::info!(
            "ambient: pod {pod_name} enrolled (netns {}) in {:?}",
            event.netns.display(),
            start.elapsed()
        );
        log::debug!(
            "ambient: pod {pod_name}: API read {read:?}, checks {:?}, enrolment {:?}, annotation {:?}",
            checked - read,
            enrolled - checked,
            start.elapsed() - enrolled
        );
        Ok(())
    }

    /// The pod and its namespace's labels, each read within [`API_WAIT`].
    async fn read(
        &self,
        client: &kube::Client,
        event: &CheckedAddEvent,
    ) -> Result<(Pod, BTreeMap<String, String>), AdmitError> {
        let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &event.pod_namespace);
        let namespaces: kube::Api<Namespace> = kube::Api::all(client.clone());
        let api = |what: String, reason: String| AdmitError::Api { what, reason };
        let pod_what = format!("pod {}/{}", event.pod_namespace, event.pod_name);
        let pod = tokio::time::timeout(API_WAIT, pods.get(&event.pod_name))
            .await
            .map_err(|_| api(pod_what.clone(), format!("no answer within {API_WAIT:?}")))?
            .map_err(|e| api(pod_what, e.to_string()))?;
        let ns_what = format!("namespace {}", event.pod_namespace);
        let ns = tokio::time::timeout(API_WAIT, namespaces.get(&event.pod_namespace))
            .await
            .map_err(|_| api(ns_what.clone(), format!("no answer within {API_WAIT:?}")))?
            .map_err(|e| api(ns_what, e.to_string()))?;
        Ok((pod, ns.metadata.labels.unwrap_or_default()))
    }

    /// Check 1 of the module docs. Returns the pod's UID.
    fn check_pod(
        &self,
        pod: &Pod,
        pod_name: &str,
        namespace_labels: &BTreeMap<String, String>,
    ) -> Result<String, AdmitError> {
        let not_ours = |why: String| AdmitError::NotOurs {
            pod: pod_name.to_owned(),
            why,
        };
        let uid = pod
            .metadata
            .uid
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| not_ours("it has no UID in the API".into()))?;
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(not_ours("it is being deleted".into()));
        }
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        if node != Some(self.node.as_str()) {
            return Err(not_ours(format!(
                "it is scheduled to node {:?}, not to this node ({})",
                node.unwrap_or(""),
                self.node
            )));
        }
        let (namespace, name) = pod_name.split_once('/').unwrap_or(("", pod_name));
        if let Some(skip) =
            istio_cni::pod::skip_by_name(namespace, name, &self.exclusions.agent_namespace, |ns| {
                self.exclusions.exclude_namespaces.iter().any(|e| e == ns)
            })
        {
            return Err(not_ours(skip.to_string()));
        }
        if !self.enablement.matches(pod, namespace_labels) {
            return Err(not_ours(
                "it is not ambient by this agent's enablement selectors (or it is on the \
                 host network, or has a sidecar)"
                    .into(),
            ));
        }
        Ok(uid)
    }

    /// Checks 2 to 4 of the module docs. Returns the netns, opened once.
    async fn check_netns(
        &self,
        event: &CheckedAddEvent,
        pod: &Pod,
        uid: &str,
    ) -> Result<Arc<Netns>, AdmitError> {
        let mismatch = |why: String| AdmitError::Mismatch {
            path: event.netns.clone(),
            why,
        };
        let event_ips: Vec<IpAddr> = event.ips.iter().map(|n| n.addr()).collect();
        if event_ips.is_empty() {
            return Err(mismatch(
                "the event lists no pod address (the chained plugin got no prevResult \
                 addresses), so the netns cannot be checked"
                    .into(),
            ));
        }
        let api_ips = api_pod_ips(pod);
        if let Some(ip) = api_ips.iter().find(|ip| !event_ips.contains(ip)) {
            return Err(mismatch(format!(
                "the API lists pod address {ip}, which the event does not"
            )));
        }
        // Another pod of this node that the API says holds one of these addresses: the
        // netns is that pod's (or the event is stale); never write this pod's rules there.
        if let Some(pods) = self.pods.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            for other in pods.state() {
                let other_uid = other.metadata.uid.as_deref().unwrap_or_default();
                let phase = other.status.as_ref().and_then(|s| s.phase.as_deref());
                if other_uid == uid || matches!(phase, Some("Succeeded" | "Failed")) {
                    continue;
                }
                let claimed = api_pod_ips(&other)
                    .into_iter()
                    .find(|ip| event_ips.contains(ip));
                if let Some(ip) = claimed {
                    return Err(mismatch(format!(
                        "address {ip} is pod {}/{}'s in the API",
                        other.metadata.namespace.as_deref().unwrap_or_default(),
                        other.metadata.name.as_deref().unwrap_or_default()
                    )));
                }
            }
        }
        let (host_proc, uid, event_path) =
            (self.host_proc.clone(), uid.to_owned(), event.netns.clone());
        let (host_root, netns_dirs) = (self.host_root.clone(), self.netns_dirs.clone());
        tokio::task::spawn_blocking(move || -> Result<Arc<Netns>, AdmitError> {
            let netns = open_event_netns(&event_path, &host_root, &host_proc, &netns_dirs)
                .map_err(|source| AdmitError::Netns {
                    path: event_path.clone(),
                    source,
                })?;
            let mismatch = |why: String| AdmitError::Mismatch {
                path: event_path.clone(),
                why,
            };
            if istio_cni::netns::host_netns_ids(&host_proc).contains(&netns.id()) {
                return Err(AdmitError::Netns {
                    path: event_path.clone(),
                    source: NetnsError::HostNamespace {
                        path: event_path.clone(),
                        which: "the host's network namespace",
                    },
                });
            }
            let present = addresses_in(&netns).map_err(mismatch)?;
            let missing: Vec<String> = event_ips
                .iter()
                .filter(|ip| !present.contains(ip))
                .map(ToString::to_string)
                .collect();
            if !missing.is_empty() {
                return Err(mismatch(format!(
                    "address(es) {} of the event are not on its interfaces",
                    missing.join(", ")
                )));
            }
            let procs = ProcIndex::scan(&host_proc).map_err(|e| {
                mismatch(format!(
                    "cannot list the host's processes in {}: {e}",
                    host_proc.display()
                ))
            })?;
            let others = procs.other_pods_in(netns.id(), &uid);
            if !others.is_empty() {
                return Err(mismatch(format!(
                    "processes of other pod(s) ({}) live in it",
                    others.join(", ")
                )));
            }
            Ok(Arc::new(netns))
        })
        .await
        .map_err(|e| AdmitError::Enrol(EnrolError::Task(e.to_string())))?
    }
}

/// Opens the netns an event names (a path on the host), confined to where runtimes put
/// pod netns: `/proc/<pid>/ns/net` is opened in `host_proc`; any other path must be a
/// file directly in one of `netns_dirs` (as the agent sees them, below `host_root`), and
/// is opened without following a symlink there ([`Netns::open_in`]).
///
/// Errors: [`NetnsError`]; a path elsewhere is [`NetnsError::Open`] naming the dirs.
pub fn open_event_netns(
    path: &std::path::Path,
    host_root: &std::path::Path,
    host_proc: &std::path::Path,
    netns_dirs: &[PathBuf],
) -> Result<Netns, NetnsError> {
    use std::path::Component;
    let parts: Vec<&str> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => p.to_str(),
            _ => None,
        })
        .collect();
    if let ["proc", pid, "ns", "net"] = parts.as_slice() {
        if pid.bytes().all(|b| b.is_ascii_digit()) {
            return Netns::open(&host_proc.join(pid).join("ns/net"));
        }
    }
    let refused = || NetnsError::Open {
        path: path.to_owned(),
        reason: format!(
            "not a file in the runtime's netns directories ({}) nor /proc/<pid>/ns/net",
            netns_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
    else {
        return Err(refused());
    };
    let dir = host_root.join(parent.strip_prefix("/").unwrap_or(parent));
    if !netns_dirs.contains(&dir) {
        return Err(refused());
    }
    Netns::open_in(&dir, name)
}
