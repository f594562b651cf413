//! This node's pods and all namespaces, watched, so that ambient mode follows the API
//! after ADD (upstream `cni/pkg/nodeagent/informers.go`):
//! - a **running** pod that becomes ambient (its own label, or its namespace's, changed) is
//!   enrolled without a restart: its netns is found from the host (a process of the pod,
//!   by the pod UID in its cgroup, never a netns another pod's process lives in), then
//!   [`Enroller::enrol`] proves it or undoes it, and the pod is annotated `enabled`;
//! - an enrolled pod that stops being ambient is unenrolled: its in-pod rules are removed,
//!   ztunnel drops it, and the annotation goes;
//! - a pod that is deleted or terminal (`Succeeded`, `Failed`) is dropped from ztunnel,
//!   without entering its netns (which may be gone, or another's by now); one being
//!   deleted keeps its capture through its grace period;
//! - after each (re)list, pods that ztunnel holds but the API no longer lists are dropped.
//!
//! A pod still starting (not `Running`, or without an address) is left to the plugin's
//! ADD, which enrols it through [`super::admit`]. An enrolment that fails is tried again
//! on the next change of the pod or its namespace, and at least every
//! [`RETRY_INTERVAL`], when the node's probe rules and sets are also checked and put back
//! if something removed them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use istio_cni::enablement::Enablement;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::ResourceExt as _;

use super::annotate::{self, Redirection};
use super::enrol::{api_pod_ips, AmbientPod, Enroller};
use super::server::Workload;
use crate::apiclient::{watch_bounding_lists, ApiClient};
use crate::backoff::Backoff;
use crate::config::Exclusions;
use crate::locate::{Finder, ProcIndex, Via};

/// How often pods whose enrolment failed (or is due) are looked at again without a change
/// in the API.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(10);

/// This node's pods as the watch last listed them, shared with the plugin-event checks.
pub type SharedPods = Arc<std::sync::RwLock<Option<Store<Pod>>>>;

/// The watches of one node.
#[derive(Clone)]
pub struct PodWatch {
    /// The agent's API client.
    pub api: ApiClient,
    /// This node's name.
    pub node: String,
    /// Which pods are ambient.
    pub enablement: Arc<Enablement>,
    /// The agent's namespace and the excluded namespaces.
    pub exclusions: Exclusions,
    /// The host's `/proc` as the agent sees it.
    pub host_proc: PathBuf,
    /// `NETNS_DIRS`: the runtime's pinned netns files, for pods without a process.
    pub netns_dirs: Vec<PathBuf>,
    /// Enrols and unenrols.
    pub enroller: Enroller,
    /// `AMBIENT_RECONCILE_POD_RULES_ON_STARTUP`: rewrite the in-pod rules of pods enrolled
    /// before the agent started (else they are kept as they are).
    pub reconcile_on_startup: bool,
    /// Told once the first lists are in and the pods enrolled before are restored into
    /// the ZDS server: ztunnel is served only then, so its first snapshot holds them.
    pub restored: Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
    /// Where the pod list is shared ([`super::admit`] reads it).
    pub shared: SharedPods,
    /// Records Events on pods (a pod restored without its netns).
    pub events: Arc<crate::events::Events>,
}

/// Event reason: after a restart the agent found no netns of an enrolled pod (no process of
/// it, no pinned netns holding its address), and told ztunnel to keep serving it as it was
/// (`KeepWorkload`).
pub const REASON_KEPT: &str = "IstioCNIAmbientNetnsNotFound";

/// What the pod should be, by the API.
#[derive(Debug, PartialEq, Eq)]
enum Want {
    /// Enrolled.
    In,
    /// Not enrolled.
    Out,
    /// Gone from ztunnel, netns untouched (deleted or terminal).
    Forget,
    /// Nothing yet (starting: ADD enrols it).
    Wait,
}

impl PodWatch {
    /// Runs until the task is dropped; watch errors are retried with backoff.
    pub async fn run(self) {
        let mut backoff = Backoff::with_jitter(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            match self.api.watch_client().await {
                Ok(client) => {
                    backoff.reset();
                    self.watch(client).await;
                    log::debug!("ambient: pod and namespace watches ended; restarting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    log::warn!("ambient: no API client: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn watch(&self, client: kube::Client) {
        let pods_api: kube::Api<Pod> = kube::Api::all(client.clone());
        let ns_api: kube::Api<Namespace> = kube::Api::all(client);
        let pod_config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let (pods, pod_writer) = reflector::store();
        *self.shared.write().unwrap_or_else(|p| p.into_inner()) = Some(pods.clone());
        let (namespaces, ns_writer) = reflector::store();
        let mut pod_events =
            reflector::reflector(pod_writer, watch_bounding_lists(pods_api, pod_config))
                .default_backoff()
                .boxed();
        let mut ns_events = reflector::reflector(
            ns_writer,
            watch_bounding_lists(ns_api, watcher::Config::default()),
        )
        .default_backoff()
        .boxed();
        let (mut pods_synced, mut ns_synced) = (false, false);
        // Pods to look at once both lists are in.
        let mut due: HashMap<String, Arc<Pod>> = HashMap::new();
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        let mut snapshots = self.enroller.server.snapshots();
        loop {
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_ok() && pods_synced {
                        self.promote(&pods).await;
                    }
                }
                ev = pod_events.next() => match ev {
                    None => return,
                    Some(Err(e)) => log::warn!("ambient: watching pods on {}: {e}", self.node),
                    Some(Ok(Event::Init)) => {}
                    Some(Ok(Event::InitApply(pod) | Event::Apply(pod))) => {
                        due.insert(pod.uid().unwrap_or_default(), Arc::new(pod));
                    }
                    Some(Ok(Event::Delete(pod))) => {
                        let uid = pod.uid().unwrap_or_default();
                        due.remove(&uid);
                        let _pod_lock = self.enroller.pods.lock(&uid).await;
                        self.forget(&uid, &pod_name(&pod)).await;
                    }
                    Some(Ok(Event::InitDone)) => {
                        pods_synced = true;
                        self.forget_unlisted(&pods).await;
                    }
                },
                ev = ns_events.next() => match ev {
                    None => return,
                    Some(Err(e)) => log::warn!("ambient: watching namespaces: {e}"),
                    Some(Ok(Event::InitApply(ns) | Event::Apply(ns))) => {
                        let name = ns.name_any();
                        for pod in pods.state() {
                            if pod.namespace().as_deref() == Some(name.as_str()) {
                                due.insert(pod.uid().unwrap_or_default(), pod);
                            }
                        }
                    }
                    Some(Ok(Event::InitDone)) => ns_synced = true,
                    Some(Ok(_)) => {}
                },
                _ = retry.tick() => {
                    for pod in pods.state() {
                        due.insert(pod.uid().unwrap_or_default(), pod);
                    }
                    self.reconcile_host().await;
                }
            }
            if pods_synced && ns_synced {
                let first = self
                    .restored
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                if let Some(restored) = first {
                    let kept = self.restore(&pods, &namespaces).await;
                    let _ = restored.send(());
                    // Recorded once ztunnel is served: ambient ADDs wait for it.
                    for pod in kept {
                        self.events
                            .record(
                                pod.as_ref(),
                                crate::events::EventType::Warning,
                                REASON_KEPT,
                                "istio-cni restarted and did not find this pod's netns on the \
                                 node (no process of the pod, no pinned netns holding its \
                                 address): ztunnel was told to keep serving the pod as it was \
                                 (KeepWorkload) rather than given its netns again",
                                "RestoreAmbient",
                            )
                            .await;
                    }
                }
                for (_, pod) in due.drain() {
                    self.reconcile(&pod, &namespaces).await;
                }
            }
        }
    }

    /// What `pod` should be, by the API (see the module docs).
    fn want(&self, pod: &Pod, namespaces: &Store<Namespace>) -> Want {
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return Want::Forget;
        }
        // A pod being deleted keeps its capture through its grace period (its containers
        // still run, its rules still redirect) and is dropped on the DELETE event; one not
        // enrolled is not enrolled now.
        if pod.metadata.deletion_timestamp.is_some() {
            return Want::Wait;
        }
        let namespace = pod.namespace().unwrap_or_default();
        let excluded = istio_cni::pod::skip_by_name(
            &namespace,
            &pod.name_any(),
            &self.exclusions.agent_namespace,
            |ns| self.exclusions.exclude_namespaces.iter().any(|e| e == ns),
        )
        .is_some();
        let empty = BTreeMap::new();
        // A namespace not in the store yet (created a moment ago) decides nothing: a pod
        // ADD enrolled by its labels must not be unenrolled for a stale cache.
        let Some(ns) = namespaces.get(&reflector::ObjectRef::new(&namespace)) else {
            return Want::Wait;
        };
        let labels = ns.metadata.labels.as_ref().unwrap_or(&empty);
        if excluded || !self.enablement.matches(pod, labels) {
            return Want::Out;
        }
        let has_ip = status
            .and_then(|s| s.pod_ips.as_ref())
            .is_some_and(|ips| !ips.is_empty());
        if phase == Some("Running") && has_ip {
            Want::In
        } else {
            Want::Wait
        }
    }

    async fn reconcile(&self, pod: &Pod, namespaces: &Store<Namespace>) {
        let Some(uid) = pod.uid() else { return };
        // Not while the plugin's event for this pod is being acted on.
        let _pod_lock = self.enroller.pods.lock(&uid).await;
        let name = pod_name(pod);
        let known = self.enroller.server.knows(&uid).await;
        let annotated = Redirection::of(pod);
        match self.want(pod, namespaces) {
            Want::Forget if known => self.forget(&uid, &name).await,
            // A terminal pod's address may go to another pod: its entry goes now.
            Want::Forget => self.enroller.remove_from_host(&uid).await,
            // Pending, and a ztunnel is connected now: enabled once it listens (the event
            // of our own pending patch may have come after the snapshot's).
            Want::In
                if known
                    && annotated == Some(Redirection::Pending)
                    && self.enroller.server.connections().await > 0 =>
            {
                // Looked at once: a pod ztunnel does not serve must not hold up the watch.
                self.promote_one(pod, &uid, Duration::ZERO).await;
                self.keep_on_host(pod, &uid, &name).await;
            }
            // Captured by an earlier agent (this one restarted): its rules are in place.
            // Enrolment undoes its rules when ztunnel does not take the pod, which must
            // not uncapture it while ztunnel is away; until one is connected the pod is
            // left as it is (restoring such pods into the first snapshot is issue 23).
            Want::In
                if !known
                    && annotated.is_some()
                    && self.enroller.server.connections().await == 0 =>
            {
                log::info!(
                    "ambient: pod {name} was enrolled before this agent started; waiting for \
                     ztunnel to enrol it again"
                );
            }
            Want::In if !known => self.enrol(pod, &uid, &name).await,
            // Enrolled, its annotation lost (a `pending` one becomes `enabled` only when a
            // ztunnel takes the pod: see `promote`).
            Want::In if annotated.is_none() => {
                let state = if self.enroller.server.connections().await > 0 {
                    Redirection::Enabled
                } else {
                    Redirection::Pending
                };
                self.annotate(pod, Some(state)).await;
                self.keep_on_host(pod, &uid, &name).await;
            }
            Want::Out if known || annotated.is_some() => self.unenrol(pod, &uid, &name).await,
            // Enrolled and still starting, or being deleted: its entries stay too.
            Want::In | Want::Wait if known => self.keep_on_host(pod, &uid, &name).await,
            _ => {}
        }
    }

    /// An enrolled pod's probe-set entries stay: added again if something removed them
    /// (or the sets themselves, which [`PodWatch::reconcile_host`] creates again).
    async fn keep_on_host(&self, pod: &Pod, uid: &str, name: &str) {
        if let Err(e) = self
            .enroller
            .add_to_host_only(&AmbientPod::of(pod, uid))
            .await
        {
            log::warn!("ambient: pod {name}: {e}");
        }
    }

    async fn enrol(&self, pod: &Pod, uid: &str, name: &str) {
        let Some(found) = self.netns_of(pod, uid).await else {
            log::info!(
                "ambient: pod {name} is ambient, but no process of it (by its UID) is on this \
                 node in a netns holding its address; trying again later"
            );
            return;
        };
        let ambient = AmbientPod::of(pod, uid);
        match self
            .enroller
            .enrol_running(&ambient, found.netns.clone())
            .await
        {
            Ok(state) => {
                log::info!(
                    "ambient: running pod {name} enrolled (netns {found}): {}",
                    state.as_str()
                );
                self.annotate(pod, Some(state)).await;
            }
            Err(e) => log::warn!("ambient: enrolling running pod {name}: {e}; trying again later"),
        }
    }

    async fn unenrol(&self, pod: &Pod, uid: &str, name: &str) {
        // A pod with a sidecar holds sidecar rules, never ours to remove here (an
        // annotation left by another agent must not cost it its redirection).
        let sidecar = pod.annotations().contains_key(istio_cni::pod::STATUS_KEY);
        // The netns the pod was enrolled with, else the one a process of it lives in.
        let netns = match self.enroller.server.netns_of(uid).await {
            Some(n) => Some(n),
            None => self.netns_of(pod, uid).await.map(|found| found.netns),
        }
        .filter(|_| !sidecar);
        match self.enroller.unenrol(uid, netns).await {
            Ok(()) => log::info!("ambient: pod {name} unenrolled"),
            Err(e) => log::warn!("ambient: unenrolling pod {name}: {e}"),
        }
        self.annotate(pod, None).await;
    }

    /// After the agent (re)started, before ztunnel is served: every pod the API says is
    /// enrolled here (annotated, still ambient, not terminal) goes back into the ZDS server with its
    /// netns, found as the repair loop finds it ([`PodWatch::locate`]), so that ztunnel's
    /// first snapshot hands it over again (a pod whose netns is not found is sent as
    /// `KeepWorkload` and logged; they are returned, for an Event [`REASON_KEPT`] each once
    /// ztunnel is served); its probe-set entry is written again. Its rules are kept as they
    /// are, or rewritten with `AMBIENT_RECONCILE_POD_RULES_ON_STARTUP` (a failed rewrite
    /// keeps what it had) when a process of the pod lives in the netns: a netns found by
    /// its pinned file alone is never written (it might be a new pod's before its first
    /// process starts).
    async fn restore(&self, pods: &Store<Pod>, namespaces: &Store<Namespace>) -> Vec<Arc<Pod>> {
        let all = pods.state();
        // A pod still starting (its ADD enrolled it; kubelet has not reported it `Running`
        // or its address yet) or being deleted (captured through its grace period) is
        // restored too: left out, ztunnel would drop it.
        let enrolled: Vec<Arc<Pod>> = all
            .iter()
            .filter(|pod| {
                Redirection::of(pod).is_some()
                    && matches!(self.want(pod, namespaces), Want::In | Want::Wait)
            })
            .cloned()
            .collect();
        let mut found = self.locate(&enrolled, &all).await;
        let mut restored = 0;
        let mut kept = Vec::new();
        for pod in enrolled {
            let Some(uid) = pod.uid() else { continue };
            let _pod_lock = self.enroller.pods.lock(&uid).await;
            if self.enroller.server.knows(&uid).await {
                continue;
            }
            let name = pod_name(&pod);
            let located = found.remove(&uid);
            let ambient = AmbientPod::of(&pod, &uid);
            if let (Some(l), true) = (&located, self.reconcile_on_startup) {
                // A failed rewrite keeps what the pod had; the pod is restored either way.
                if matches!(l.via, Via::Process(_)) {
                    match self.enroller.rewrite_rules(&ambient, l.netns.clone()).await {
                        Ok(true) => log::info!(
                            "ambient: restored pod {name}: its rules differed and were rewritten"
                        ),
                        Ok(false) => {}
                        Err(e) => {
                            log::warn!("ambient: rewriting the rules of restored pod {name}: {e}")
                        }
                    }
                }
            }
            let netns = located.map(|l| l.netns);
            if netns.is_none() {
                log::warn!(
                    "ambient: pod {name} was enrolled, but its netns is not found on this \
                     node (no process of it, no pinned netns with its address); ztunnel is \
                     told to keep it as it is"
                );
                kept.push(pod.clone());
            }
            self.enroller
                .server
                .remember(Workload {
                    uid: uid.clone(),
                    info: ambient.info.clone(),
                    netns,
                })
                .await;
            if let Err(e) = self.enroller.add_to_host_only(&ambient).await {
                log::warn!("ambient: restoring pod {name}: {e}");
            }
            restored += 1;
        }
        log::info!(
            "ambient: {restored} pod(s) enrolled before this start restored ({} without their \
             netns); serving ztunnel",
            kept.len()
        );
        kept
    }

    /// The netns of each pod of `enrolled`, found as the repair loop finds them
    /// ([`Finder`]): through a process of the pod, else through a pinned netns file
    /// holding one of its API addresses (a runtime without a process per pod), which no
    /// other pod of `all` that is not terminal claims and no other pod's process lives in;
    /// either way holding one of the pod's API addresses when it has any.
    /// One `/proc` scan for all; pods not found are not in the map.
    async fn locate(
        &self,
        enrolled: &[Arc<Pod>],
        all: &[Arc<Pod>],
    ) -> HashMap<String, crate::locate::PodNetns> {
        let wanted: Vec<(String, Vec<std::net::IpAddr>)> = enrolled
            .iter()
            .filter_map(|p| Some((p.uid()?, api_pod_ips(p))))
            .collect();
        let claims: Vec<(String, Vec<std::net::IpAddr>)> = all
            .iter()
            .filter(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
            .filter_map(|p| Some((p.uid()?, api_pod_ips(p))))
            .collect();
        let (host_proc, dirs) = (self.host_proc.clone(), self.netns_dirs.clone());
        let found = tokio::task::spawn_blocking(move || {
            let procs = match ProcIndex::scan(&host_proc) {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("ambient: reading {}: {e}", host_proc.display());
                    return HashMap::new();
                }
            };
            let finder = Finder::new(&procs, &dirs);
            wanted
                .into_iter()
                .filter_map(|(uid, ips)| {
                    let found = finder.find(&uid, &ips)?;
                    // The pod's address, once the API has one, must be in the netns (a
                    // pod still starting has none to check).
                    if !ips.is_empty() {
                        let here = crate::locate::addresses_in(&found.netns).unwrap_or_default();
                        if !ips.iter().any(|ip| here.contains(ip)) {
                            log::warn!(
                                "ambient: pod {uid}: netns {found} does not hold its address; \
                                 not handing it to ztunnel"
                            );
                            return None;
                        }
                    }
                    let claimed = claims.iter().any(|(other, theirs)| {
                        *other != uid && theirs.iter().any(|ip| ips.contains(ip))
                    });
                    if found.via == Via::BindMount && claimed {
                        log::warn!(
                            "ambient: pod {uid}: netns {found} holds an address another pod \
                             claims; not handing it to ztunnel"
                        );
                        return None;
                    }
                    Some((uid, found))
                })
                .collect()
        })
        .await;
        found.unwrap_or_default()
    }

    /// After a ztunnel took a snapshot: the pods annotated `pending` that it now serves
    /// (its listeners are in their netns) are annotated `enabled`. (A pod whose `pending`
    /// patch the store has not seen yet is promoted by `reconcile` when it does.)
    async fn promote(&self, pods: &Store<Pod>) {
        for pod in pods.state() {
            let Some(uid) = pod.uid() else { continue };
            if Redirection::of(&pod) != Some(Redirection::Pending) {
                continue;
            }
            let _pod_lock = self.enroller.pods.lock(&uid).await;
            self.promote_one(&pod, &uid, self.enroller.listener_wait)
                .await;
        }
    }

    /// Annotates pending pod `pod` `enabled` if ztunnel listens in its netns, looking for up
    /// to `wait` (ztunnel opens its listeners around its ack). The caller holds the pod's
    /// lock.
    async fn promote_one(&self, pod: &Pod, uid: &str, wait: Duration) {
        let Some(netns) = self.enroller.server.netns_of(uid).await else {
            return;
        };
        let start = tokio::time::Instant::now();
        loop {
            match self.enroller.listening(netns.clone()).await {
                Ok(true) => {
                    log::info!("ambient: ztunnel took pending pod {}", pod_name(pod));
                    self.annotate(pod, Some(Redirection::Enabled)).await;
                    return;
                }
                Ok(false) if start.elapsed() < wait => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(false) => {
                    log::info!(
                        "ambient: ztunnel does not listen in pending pod {} yet; it stays pending",
                        pod_name(pod)
                    );
                    return;
                }
                Err(e) => {
                    log::warn!("ambient: pod {}: {e}", pod_name(pod));
                    return;
                }
            }
        }
    }

    /// The netns of running pod `pod` (UID `uid`): that of a process of it, not shared
    /// with another pod's, never the host's, and holding one of the pod's API addresses:
    /// a process caught before it entered its pod's netns, or a cgroup that only looks
    /// like the pod's, must not make another netns the pod's. `None` as well when the API
    /// lists no address for the pod.
    async fn netns_of(&self, pod: &Pod, uid: &str) -> Option<crate::locate::PodNetns> {
        let ips = api_pod_ips(pod);
        if ips.is_empty() {
            return None;
        }
        let (host_proc, owner) = (self.host_proc.clone(), uid.to_owned());
        tokio::task::spawn_blocking(move || {
            let found = ProcIndex::scan(&host_proc).ok()?.netns_of(&owner)?;
            let here = crate::locate::addresses_in(&found.netns).ok()?;
            ips.iter().any(|ip| here.contains(ip)).then_some(found)
        })
        .await
        .ok()
        .flatten()
    }

    /// The node's probe rules and sets, made right again if something changed them (a
    /// flush by another tool, a firewall reload): checked every [`RETRY_INTERVAL`], one
    /// `iptables-save -t nat` per family when nothing changed (upstream installs them once,
    /// istio/istio#60607).
    async fn reconcile_host(&self) {
        let Some(host) = self.enroller.host.clone() else {
            return;
        };
        match tokio::task::spawn_blocking(move || host.install()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::warn!("ambient: the node's probe rules: {e}"),
            Err(e) => log::warn!("ambient: the node's probe rules: {e}"),
        }
    }

    /// Drops a deleted or terminal pod from ztunnel and the node's probe sets (its netns
    /// is not entered).
    async fn forget(&self, uid: &str, name: &str) {
        self.enroller.remove_from_host(uid).await;
        if !self.enroller.server.knows(uid).await {
            return;
        }
        let connected = self.enroller.server.connections().await > 0;
        match self.enroller.server.del(uid).await {
            Ok(()) if connected => log::info!("ambient: pod {name} is gone; ztunnel dropped it"),
            Ok(()) => log::info!(
                "ambient: pod {name} is gone; no ztunnel is connected, and the next one's \
                 snapshot leaves it out"
            ),
            Err(e) => log::warn!("ambient: telling ztunnel to drop pod {name}: {e}"),
        }
    }

    /// After a (re)list: drops the pods ztunnel holds that the API no longer lists, and
    /// the probe-set entries of pods it no longer lists.
    async fn forget_unlisted(&self, pods: &Store<Pod>) {
        let listed: Vec<String> = pods.state().iter().filter_map(|p| p.uid()).collect();
        if let Some(host) = self.enroller.host.clone() {
            // Pods enrolled since the list was taken are not in it: keep theirs too.
            let live = listed
                .iter()
                .cloned()
                .chain(self.enroller.server.pods().await)
                .collect();
            let kept = tokio::task::spawn_blocking(move || host.retain(&live)).await;
            if let Ok(Err(e)) = kept {
                log::warn!("ambient: removing gone pods from the node's probe sets: {e}");
            }
        }
        for uid in self.enroller.server.pods().await {
            if !listed.contains(&uid) {
                let _pod_lock = self.enroller.pods.lock(&uid).await;
                self.forget(&uid, &format!("with UID {uid}")).await;
            }
        }
    }

    async fn annotate(&self, pod: &Pod, state: Option<Redirection>) {
        let Ok(client) = self.api.get().await else {
            return;
        };
        let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        match tokio::time::timeout(
            super::admit::API_WAIT,
            annotate::set(&client, &ns, &name, state),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::warn!("ambient: annotating pod {ns}/{name}: {e}"),
            Err(_) => log::warn!("ambient: annotating pod {ns}/{name}: no answer"),
        }
    }
}

fn pod_name(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}
