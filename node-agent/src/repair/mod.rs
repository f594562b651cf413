//! The repair loop: finds running pods on this node whose netns lacks the redirection
//! rules, and repairs, deletes or labels them (see [`act::Mode`]). It replaces upstream
//! Istio's detection by the `istio-validation` init container's exit code, which needs a
//! crash first and misses `restartPolicy: Never` pods: here each pod's netns is read.
//!
//! - **Input**: one `kube-runtime` watcher on pods with field selector
//!   `spec.nodeName=<node>`, cached by a reflector; no periodic LISTs. A pod is checked
//!   when it is first seen (including the watcher's initial list, `InitApply`), when it
//!   becomes Running, when its containers restart or its IPs change, and on every resync
//!   sweep over the cache (`--repair-resync-seconds`).
//! - **Check** ([`inspect`]): the plugin's own decision for the pod; its netns found through
//!   its cgroup or a bind-mounted netns file ([`locate`]); the plugin's read-back.
//! - **Brakes** ([`policy`]): nothing happens while the agent is not ready; a pod is acted
//!   on at most once per cooldown (`--repair-cooldown-seconds`, 5 min); deletions are spaced
//!   node-wide (`--repair-max-deletes-per-minute`).
//! - **Ambient pods** (with ambient mode on, [`RepairController::with_ambient`]): the
//!   pods this agent enrolled are checked too ([`inspect::ambient_candidate`]): their
//!   in-pod rules, and while a ztunnel serves the node, its listeners in their netns. In
//!   repair mode, wrong rules are written again (one atomic write, as for sidecar pods),
//!   and a pod without ztunnel's listeners is handed to ztunnel again
//!   ([`Enroller::resend`]); if ztunnel still does not listen in it, the pod is annotated
//!   `pending` with a Warning Event, its traffic held by the rules until a ztunnel takes
//!   it. The cooldown and the rate limit are the same; delete and label modes act on an
//!   ambient pod whose rules are wrong, but one whose only fault is ztunnel's missing
//!   listeners is always handed over again, never deleted or labeled.

pub mod act;
pub mod drift;
pub mod inspect;
pub mod policy;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{FutureExt, StreamExt};
use istio_cni::netns::NetnsId;
use istio_cni::plan::running_pod_ips;
use istio_cni::plugin::Tools;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use tokio::time::Instant;

use self::act::{Mode, Outcome};
use self::drift::DriftWatch;
use self::inspect::{AmbientView, Candidate, Health, InspectError, Kind};
use self::policy::{Cooldown, DeleteBudget};
use crate::ambient::annotate::{self, Redirection};
use crate::ambient::enrol::{AmbientPod, EnrolError, Enroller};
use crate::ambient::server::ServerError;
use crate::apiclient::{ApiClient, REQUEST_TIMEOUT};
use crate::backoff::Backoff;
use crate::config::Exclusions;
use crate::events::Events;
use crate::locate::{self, Finder, PodNetns, ProcIndex};
use crate::metrics::{Metrics, RepairAction};
use crate::readiness::Readiness;

/// The repair loop's settings (`--repair-*`, `--host-proc-dir`, `--netns-dirs`).
#[derive(Debug, Clone)]
pub struct RepairConfig {
    /// This node (`--node-name`): only its pods are watched.
    pub node: String,
    /// What to do with a broken pod.
    pub mode: Mode,
    /// The nftables backend (`NATIVE_NFTABLES`): read back and repair over nfnetlink.
    pub native_nftables: bool,
    /// Only pods with these labels (`REPAIR_LABEL_SELECTORS`), as a label selector.
    pub label_selector: Option<String>,
    /// Only pods matching these fields (`REPAIR_FIELD_SELECTORS`), besides this node.
    pub field_selector: Option<String>,
    /// Interval of the sweep over every cached pod.
    pub resync: Duration,
    /// Watch checked pods' rules between sweeps ([`drift`], `--repair-drift-watch`).
    pub drift_watch: bool,
    /// Minimum time between two actions on the same pod.
    pub cooldown: Duration,
    /// Node-wide limit on pod deletions per minute (delete mode), evenly spaced.
    pub max_deletes_per_minute: u32,
    /// Label set in label mode: key and value.
    pub label: (String, String),
    /// The host's `/proc` as mounted in the agent.
    pub host_proc: PathBuf,
    /// Dirs of bind-mounted netns files, for pods without a process.
    pub netns_dirs: Vec<PathBuf>,
    /// Where the plugin's per-netns lock lives (`--cni-agent-run-dir`, the same host
    /// directory as the plugin's `cni_agent_run_dir`): a repair holds it while it writes,
    /// as ADD does ([`istio_cni::lock`]).
    pub lock_dir: PathBuf,
    /// Pods the plugin passes through.
    pub exclusions: Exclusions,
}

/// A pod's state as far as triggering a check goes: a change means "check again".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    running: bool,
    restarts: i32,
    ips: Vec<String>,
}

impl Fingerprint {
    fn of(pod: &Pod) -> Fingerprint {
        let status = pod.status.as_ref();
        let restarts = status
            .into_iter()
            .flat_map(|s| {
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(s.init_container_statuses.iter().flatten())
            })
            .map(|c| c.restart_count)
            .sum();
        Fingerprint {
            running: status.and_then(|s| s.phase.as_deref()) == Some("Running"),
            restarts,
            ips: status
                .and_then(|s| s.pod_ips.as_ref())
                .map(|ips| ips.iter().map(|i| i.ip.clone()).collect())
                .unwrap_or_default(),
        }
    }
}

/// Whether `pod` is going away: it has a deletion timestamp or a terminal phase, so its
/// netns is torn down (or soon will be).
fn is_leaving(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
        || matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// State that outlives a watcher restart.
struct State {
    fingerprints: HashMap<String, Fingerprint>,
    /// Pods to check at the next pass.
    due: HashSet<ObjectRef<Pod>>,
    /// Check every cached pod at the next pass.
    sweep: bool,
    /// Pods whose deletion waits for the budget, and when it allows the next one.
    deferred: HashSet<ObjectRef<Pod>>,
    deferred_until: Option<Instant>,
    cooldown: Cooldown,
    budget: DeleteBudget,
    /// Pods found broken through a pinned netns file only: which netns, first seen when.
    pinned_seen: HashMap<String, (NetnsId, std::time::Instant)>,
    /// The kernel-notified watches of the checked pods' rules.
    drift: DriftWatch,
}

/// How long a netns found only through a pinned file (no process of the pod in it) must
/// stay the pod's before the loop acts on it. A new pod's netns holds its IP from its
/// CNI ADD on, before its first process starts (normally within a second): an IP that a
/// stale pod still claims in the API may sit in a new pod's netns for that long, with
/// nothing yet saying whose it is. Once that pod's process runs, its netns is another
/// pod's ([`ProcIndex::unless_foreign`](crate::locate::ProcIndex::unless_foreign)).
pub const PINNED_SETTLE: Duration = Duration::from_secs(10);

/// How a watch ended.
enum WatchEnd {
    /// The credentials were refused: build a new client (the token may have rotated).
    Unauthorized,
    /// The stream ended.
    Closed,
}

/// A broken pod, as found by a pass.
struct Broken {
    pod: Arc<Pod>,
    candidate: Candidate,
    netns: PodNetns,
    problems: Vec<String>,
    /// An ambient pod whose rules are right but which ztunnel does not serve: ztunnel's
    /// failure, so it is handed over again whatever the mode (never deleted or labeled).
    listeners_only: bool,
}

/// The repair loop of one node.
pub struct RepairController {
    cfg: RepairConfig,
    api: ApiClient,
    events: Arc<Events>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    /// Ambient mode's enroller, when it is on: ambient pods are checked and repaired too.
    ambient: Option<Enroller>,
}

impl RepairController {
    /// A controller for `cfg.node`, using the agent's shared API client.
    pub fn new(
        cfg: RepairConfig,
        api: ApiClient,
        events: Arc<Events>,
        readiness: Arc<Readiness>,
        metrics: Arc<Metrics>,
    ) -> RepairController {
        RepairController {
            cfg,
            api,
            events,
            readiness,
            metrics,
            ambient: None,
        }
    }

    /// Checks and repairs the ambient pods that `enroller` enrolled too (see the module
    /// docs).
    pub fn with_ambient(mut self, enroller: Enroller) -> RepairController {
        self.ambient = Some(enroller);
        self
    }

    /// What checking ambient pods needs now, when ambient mode is on.
    async fn ambient_view(&self) -> Option<AmbientView> {
        let enroller = self.ambient.as_ref()?;
        let snapshots = enroller.server.snapshot_count();
        let synced = enroller.server.ztunnels().borrow().synced > 0;
        let held: HashSet<String> = enroller.server.pods().await.into_iter().collect();
        let listening = if synced { held.clone() } else { HashSet::new() };
        Some(AmbientView {
            held,
            snapshots,
            node: enroller.node.clone(),
            nftables: enroller.native_nftables,
            listening,
        })
    }

    /// Runs until the task is dropped. API errors are retried with the watcher's backoff; a
    /// refused token is retried too (the shared client re-reads the rotated token file).
    pub async fn run(self) {
        let (drift, mut drifted) = DriftWatch::new();
        let mut st = State {
            fingerprints: HashMap::new(),
            due: HashSet::new(),
            sweep: false,
            deferred: HashSet::new(),
            deferred_until: None,
            cooldown: Cooldown::new(self.cfg.cooldown),
            budget: DeleteBudget::new(self.cfg.max_deletes_per_minute),
            pinned_seen: HashMap::new(),
            drift,
        };
        let mut backoff = Backoff::with_jitter(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            // The pods are watched through the watch client, each list bounded by the
            // request timeout (see `watch`).
            let client = match self.api.watch_client().await {
                Ok(c) => c,
                Err(e) => {
                    let delay = backoff.next_delay();
                    log::warn!("repair: no API client: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            backoff.reset();
            match self.watch(client, &mut st, &mut drifted).await {
                WatchEnd::Unauthorized => {
                    log::warn!("repair: the API refused the credentials; reconnecting")
                }
                WatchEnd::Closed => log::debug!("repair: pod watch ended; restarting"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Watches this node's pods through `client` ([`ApiClient::watch_client`]) and runs
    /// passes until the watch ends. The watcher's lists (the initial one and any re-list)
    /// are bounded by [`REQUEST_TIMEOUT`] each
    /// ([`crate::apiclient::watch_bounding_lists`]): a list lost in a black-holed
    /// connection is made again within that, rather than after the watch client's read
    /// timeout of minutes.
    async fn watch(
        &self,
        client: kube::Client,
        st: &mut State,
        drifted: &mut tokio::sync::mpsc::UnboundedReceiver<ObjectRef<Pod>>,
    ) -> WatchEnd {
        let pods: kube::Api<Pod> = kube::Api::all(client);
        let mut fields = format!("spec.nodeName={}", self.cfg.node);
        if let Some(extra) = &self.cfg.field_selector {
            fields = format!("{fields},{extra}");
        }
        let mut config = watcher::Config::default().fields(&fields);
        if let Some(labels) = &self.cfg.label_selector {
            config = config.labels(labels);
        }
        let (reader, writer) = reflector::store();
        let pods_watch = crate::apiclient::watch_bounding_lists(pods, config);
        let mut events = reflector::reflector(writer, pods_watch)
            .default_backoff()
            .boxed();
        let mut ready_rx = self.readiness.subscribe();
        let mut was_ready = false;
        let mut synced = false;
        let mut next_sweep = Instant::now() + self.cfg.resync;
        loop {
            let deferred_until = st.deferred_until;
            tokio::select! {
                ev = events.next() => match ev {
                    None => return WatchEnd::Closed,
                    Some(ev) => if let Some(end) = self.on_event(ev, st, &reader, &mut synced) {
                        return end;
                    },
                },
                _ = tokio::time::sleep_until(next_sweep) => {
                    st.sweep = true;
                    next_sweep = Instant::now() + self.cfg.resync;
                }
                _ = async { tokio::time::sleep_until(deferred_until.expect("guarded")).await },
                    if deferred_until.is_some() => {
                    st.due.extend(st.deferred.drain());
                    st.deferred_until = None;
                }
                r = ready_rx.changed() => if r.is_err() { return WatchEnd::Closed },
                Some(key) = drifted.recv() => self.drifted(key, st),
            }
            // Every pod whose rules changed meanwhile is taken in the same pass.
            while let Ok(key) = drifted.try_recv() {
                self.drifted(key, st);
            }
            // Take in everything already received before checking.
            while let Some(Some(ev)) = events.next().now_or_never() {
                if let Some(end) = self.on_event(ev, st, &reader, &mut synced) {
                    return end;
                }
            }
            self.metrics
                .repair_drift_watched
                .set(st.drift.watched() as i64);
            let ready = self.readiness.status().is_ok();
            if ready && !was_ready {
                // Whatever happened while not ready is looked at now.
                st.sweep = true;
            }
            was_ready = ready;
            if ready && synced && (st.sweep || !st.due.is_empty()) {
                self.pass(&reader, st).await;
            }
        }
    }

    /// A drift watch says pod `key`'s rules may have changed: it is due, and counted once
    /// until it is checked.
    fn drifted(&self, key: ObjectRef<Pod>, st: &mut State) {
        if st.due.insert(key) {
            self.metrics.repair_drift_triggered.inc();
        }
    }

    /// Applies one watcher event to the trigger state.
    fn on_event(
        &self,
        ev: Result<Event<Pod>, watcher::Error>,
        st: &mut State,
        reader: &Store<Pod>,
        synced: &mut bool,
    ) -> Option<WatchEnd> {
        match ev {
            Err(e) => {
                log::warn!("repair: watching pods on {}: {e}", self.cfg.node);
                return is_unauthorized(&e).then_some(WatchEnd::Unauthorized);
            }
            Ok(Event::Init) => {}
            Ok(Event::InitApply(pod) | Event::Apply(pod)) => {
                if is_leaving(&pod) {
                    // Its netns is about to go: our sockets must not keep it.
                    st.drift.forget(&pod.uid().unwrap_or_default());
                }
                let fp = Fingerprint::of(&pod);
                let running = fp.running;
                if st
                    .fingerprints
                    .insert(pod.uid().unwrap_or_default(), fp.clone())
                    != Some(fp)
                    && running
                {
                    st.due.insert(ObjectRef::from(&pod));
                }
            }
            Ok(Event::Delete(pod)) => {
                let uid = pod.uid().unwrap_or_default();
                st.fingerprints.remove(&uid);
                st.pinned_seen.remove(&uid);
                st.drift.forget(&uid);
                st.cooldown.forget(&uid, std::time::Instant::now());
                let key = ObjectRef::from(&pod);
                st.due.remove(&key);
                st.deferred.remove(&key);
            }
            Ok(Event::InitDone) => {
                *synced = true;
                let live: HashSet<String> = reader.state().iter().filter_map(|p| p.uid()).collect();
                st.fingerprints.retain(|uid, _| live.contains(uid));
                st.drift.retain(|uid| live.contains(uid));
            }
        }
        None
    }

    /// Checks the due pods (every cached pod on a sweep) and acts on the broken ones.
    async fn pass(&self, reader: &Store<Pod>, st: &mut State) {
        let sweep = std::mem::take(&mut st.sweep);
        let pods: Vec<Arc<Pod>> = if sweep {
            st.due.clear();
            reader.state()
        } else {
            st.due.drain().filter_map(|k| reader.get(&k)).collect()
        };
        let started = std::time::Instant::now();
        let looked_at: Vec<String> = pods.iter().filter_map(|p| p.uid()).collect();
        let ambient = self.ambient_view().await;
        let candidates: Vec<(Arc<Pod>, Candidate)> = pods
            .into_iter()
            .filter_map(|pod| {
                let checked = ambient
                    .as_ref()
                    .and_then(|view| inspect::ambient_candidate(&pod, &self.cfg.exclusions, view))
                    .unwrap_or_else(|| {
                        inspect::candidate(&pod, &self.cfg.exclusions, self.cfg.native_nftables)
                    });
                match checked {
                    Ok(c) => Some((pod, c)),
                    Err(why) => {
                        log::trace!("repair: {}: {why}", pod_name(&pod));
                        None
                    }
                }
            })
            .collect();
        let checked = candidates.len();
        // A pod looked at that is not checked any more (it left the mesh) keeps no watch;
        // a sweep looks at every pod.
        let kept: HashSet<String> = candidates.iter().filter_map(|(p, _)| p.uid()).collect();
        if sweep {
            st.drift.retain(|uid| kept.contains(uid));
        }
        for uid in looked_at.iter().filter(|uid| !kept.contains(*uid)) {
            st.drift.forget(uid);
        }
        let host_proc = self.cfg.host_proc.clone();
        let netns_dirs = self.cfg.netns_dirs.clone();
        let results =
            tokio::task::spawn_blocking(move || check_all(candidates, &host_proc, &netns_dirs))
                .await;
        let results = match results {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                log::warn!("repair: cannot check pods: {e}");
                return;
            }
            Err(e) => {
                log::error!("repair: check task failed: {e}");
                return;
            }
        };
        self.metrics.repair_pods_checked.inc_by(checked as u64);
        let to_watch = self.drift_watches_to_open(&results, st);
        let mut broken = Vec::new();
        for (pod, candidate, result) in results {
            match result {
                Ok((_, Health::Healthy)) => {}
                Ok((netns, Health::Broken(problems))) => {
                    broken.push(Broken {
                        pod,
                        candidate,
                        netns,
                        problems,
                        listeners_only: false,
                    });
                }
                Ok((netns, Health::NoListeners(missing))) => {
                    broken.push(Broken {
                        pod,
                        candidate,
                        netns,
                        problems: vec![inspect::no_listeners(&missing)],
                        listeners_only: true,
                    });
                }
                // A pod just started or stopped, or a runtime we cannot see into: logged,
                // and looked at again on the next sweep.
                Err(e @ InspectError::NotFound(_)) => {
                    log::debug!("repair: {}: {e}", pod_name(&pod))
                }
                Err(e) => log::warn!("repair: {}: {e}", pod_name(&pod)),
            }
        }
        if sweep {
            self.metrics
                .repair_sweep_duration
                .observe(started.elapsed().as_secs_f64());
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            self.metrics.repair_last_sweep.set(now.as_secs() as i64);
            log::debug!(
                "repair: swept {checked} meshed pod(s) in {:?}, {} broken",
                started.elapsed(),
                broken.len()
            );
        }
        let broken = settled(broken, reader, st);
        // Counted once the pod's netns is known to be its own (see `settled`).
        self.metrics.repair_broken_found.inc_by(broken.len() as u64);
        if !broken.is_empty() {
            let snapshots = ambient.map(|v| v.snapshots).unwrap_or_default();
            self.act_on(broken, st, snapshots).await;
        }
        // After the repairs: a repaired pod's watch then asks the legacy tables they made.
        self.open_drift_watches(to_watch, st).await;
        self.metrics
            .repair_drift_watched
            .set(st.drift.watched() as i64);
    }

    /// The drift watches ([`drift`]) this pass opens: one for every checked pod whose
    /// netns was found and that is not watched there yet (a pod whose sandbox was
    /// recreated gets a new one), and every pod found broken, whose repair may create
    /// legacy tables its watch does not poll yet ([`DriftWatch::start`] keeps a running
    /// watch and adds those). Closes the watch of a pod whose netns was not found.
    fn drift_watches_to_open(&self, results: &[Checked], st: &mut State) -> Vec<ToWatch> {
        if !self.cfg.drift_watch {
            return Vec::new();
        }
        let mut new = Vec::new();
        for (pod, _, result) in results {
            let Some(uid) = pod.uid() else {
                continue;
            };
            match result {
                // Only a netns a process of the pod lives in: one found by its pinned
                // file alone may be a new pod's, before its first process starts.
                Ok((netns, health)) if matches!(netns.via, locate::Via::Process(_)) => {
                    let broken = matches!(health, Health::Broken(_));
                    if !is_leaving(pod) && (broken || !st.drift.watches(&uid, netns.netns.id())) {
                        new.push((ObjectRef::from(&**pod), uid, netns.netns.clone()));
                    }
                }
                // Its netns is gone or unknown: a watch must not keep the old one alive.
                _ => st.drift.forget(&uid),
            }
        }
        new
    }

    /// Opens the drift watches of `pods` ([`Self::drift_watches_to_open`]).
    async fn open_drift_watches(&self, pods: Vec<ToWatch>, st: &mut State) {
        if pods.is_empty() {
            return;
        }
        match tokio::task::spawn_blocking(move || drift::open_all(pods)).await {
            Ok(opened) => {
                for (key, uid, netns, sockets) in opened {
                    st.drift.start(key, &uid, netns, sockets);
                }
            }
            Err(e) => log::error!("repair: opening drift watches failed: {e}"),
        }
    }

    /// Acts on `broken` pods; `snapshots` is the ambient view's snapshot count.
    async fn act_on(&self, broken: Vec<Broken>, st: &mut State, snapshots: u64) {
        let client = match self.api.get().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("repair: no API client to act on broken pods: {e}");
                return;
            }
        };
        for b in broken {
            // ztunnel not serving a pod whose rules are right is ztunnel's failure: the pod
            // is handed over again, never deleted or labeled for it.
            let mode = if b.listeners_only {
                Mode::Repair
            } else {
                self.cfg.mode
            };
            let name = pod_name(&b.pod);
            let uid = b.pod.uid().unwrap_or_default();
            let what = act::summary(&b.problems);
            let now = std::time::Instant::now();
            if let Err(until) = st.cooldown.check(&uid, now) {
                log::info!(
                    "repair: {name}: redirection broken ({what}); cooling down for {:?}",
                    until - now
                );
                self.count(mode, "cooldown");
                continue;
            }
            let mut taken = None;
            if mode == Mode::Delete {
                match st.budget.take(now) {
                    Ok(()) => taken = Some(now),
                    Err(next) => {
                        log::info!(
                            "repair: {name}: redirection broken ({what}); deletion waits for the rate limit ({:?})",
                            next - now
                        );
                        self.count(mode, "rate_limited");
                        st.deferred.insert(ObjectRef::from(b.pod.as_ref()));
                        let next = Instant::from_std(next);
                        st.deferred_until = Some(st.deferred_until.map_or(next, |d| d.min(next)));
                        continue;
                    }
                }
            }
            st.cooldown.record(&uid, now);
            log::warn!(
                "repair: {name}: redirection broken in netns {} ({what}); action: {mode}",
                b.netns
            );
            let outcome = match (mode, &self.ambient) {
                (Mode::Repair, Some(enroller))
                    if matches!(b.candidate.kind, Kind::Ambient { .. }) =>
                {
                    self.repair_ambient(&client, enroller, &b, snapshots).await
                }
                (Mode::Repair, _) => {
                    let result = self.rewrite(&b).await;
                    act::report_repair(&self.events, &b.pod, &b.problems, &result).await;
                    match result {
                        Ok(act::Repair::Written) => Outcome::Done,
                        Ok(act::Repair::AlreadyInPlace) => {
                            Outcome::Moot("the rules were in place under the lock".into())
                        }
                        Err(e) => Outcome::Failed(e.to_string()),
                    }
                }
                (Mode::Delete, _) => {
                    let deleted = act::delete(&client, &self.events, &b.pod, &b.problems);
                    tokio::time::timeout(REQUEST_TIMEOUT * 3, deleted)
                        .await
                        .unwrap_or_else(|_| {
                            Outcome::Failed("the API did not answer in time".into())
                        })
                }
                (Mode::Label, _) => {
                    let (k, v) = &self.cfg.label;
                    let labeled = act::label(&client, &self.events, &b.pod, (k, v), &b.problems);
                    tokio::time::timeout(REQUEST_TIMEOUT * 3, labeled)
                        .await
                        .unwrap_or_else(|_| {
                            Outcome::Failed("the API did not answer in time".into())
                        })
                }
            };
            match &outcome {
                Outcome::Done => {
                    log::info!("repair: {name}: {mode} done");
                    self.count(mode, "success");
                    self.count_upstream(mode, "success");
                }
                Outcome::Moot(why) => {
                    log::info!("repair: {name}: nothing to {mode}: {why}");
                    self.count_upstream(mode, "skip");
                    if let Some(t) = taken {
                        st.budget.give_back(t);
                    }
                }
                Outcome::Failed(e) => {
                    log::warn!("repair: {name}: {mode} failed: {e}");
                    self.count(mode, "failure");
                    self.count_upstream(mode, "fail");
                }
            }
        }
    }

    /// The broken pod's rules written again in place ([`act::repair_in_place`]), on a
    /// blocking thread.
    async fn rewrite(&self, b: &Broken) -> Result<act::Repair, act::RepairError> {
        let (netns, candidate) = (b.netns.clone(), b.candidate.clone());
        let lock_dir = self.cfg.lock_dir.clone();
        let host_proc = self.cfg.host_proc.clone();
        let pod_uid = b.pod.uid().unwrap_or_default();
        tokio::task::spawn_blocking(move || {
            let owner = act::Owner {
                uid: &pod_uid,
                host_proc: Some(&host_proc),
            };
            act::repair_in_place(&netns, &candidate, &Tools::detect(), &lock_dir, &owner)
        })
        .await
        .unwrap_or_else(|e| Err(act::RepairError::Task(e.to_string())))
    }

    /// Repairs an ambient pod in place (see the module docs), holding the pod's lock so
    /// that no enrolment or unenrolment of it runs meanwhile: its rules first, under the
    /// netns lock and read back ([`act::repair_in_place`]), then ztunnel's listeners, the
    /// pod handed to ztunnel again if they are gone.
    async fn repair_ambient(
        &self,
        client: &kube::Client,
        enroller: &Enroller,
        b: &Broken,
        snapshots: u64,
    ) -> Outcome {
        let uid = b.pod.uid().unwrap_or_default();
        let _pod_lock = enroller.pods.lock(&uid).await;
        if !enroller.server.knows(&uid).await {
            return Outcome::Moot(
                "the agent does not hold the pod (its enrolment was undone, or the ambient \
                 watch has not restored it yet)"
                    .into(),
            );
        }
        // The netns the pod was enrolled with is the one ztunnel must get; another one
        // found now is not acted on.
        if let Some(held) = enroller.server.netns_of(&uid).await {
            if held.id() != b.netns.netns.id() {
                return Outcome::Moot(format!(
                    "netns {} is not the one the pod was enrolled with",
                    b.netns
                ));
            }
        }
        let rules = self.rewrite(b).await;
        act::report_rules(&self.events, &b.pod, &b.problems, &rules, true).await;
        let rules = match rules {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        if b.candidate.kind != (Kind::Ambient { listeners: true }) {
            return match rules {
                act::Repair::Written => Outcome::Done,
                act::Repair::AlreadyInPlace => {
                    Outcome::Moot("the rules were in place under the lock".into())
                }
            };
        }
        match enroller.listening(b.netns.netns.clone()).await {
            Ok(true) if rules == act::Repair::Written => return Outcome::Done,
            Ok(true) => return Outcome::Moot("ztunnel listens in the pod's netns".into()),
            Ok(false) => {}
            Err(e) => return Outcome::Failed(e.to_string()),
        }
        // What the pass saw may be a ztunnel restarting (its listeners gone from every
        // pod): only the ztunnel that took the snapshot the pass knew is asked again.
        let unchanged = enroller.server.snapshot_count() == snapshots
            && enroller.server.ztunnels().borrow().synced > 0;
        if !unchanged {
            return Outcome::Moot("a ztunnel connected or went away since the check".into());
        }
        let pod = AmbientPod::of(&b.pod, &uid);
        let resent = enroller.resend(&pod, b.netns.netns.clone()).await;
        if let Err(EnrolError::Ztunnel(ServerError::NoZtunnel)) = &resent {
            return Outcome::Moot(
                "ztunnel went away; the next one gets the pod in its snapshot".into(),
            );
        }
        let (ns, name) = (b.pod.namespace().unwrap_or_default(), b.pod.name_any());
        let state = if resent.is_ok() {
            Redirection::Enabled
        } else {
            Redirection::Pending
        };
        if Redirection::of(&b.pod) != Some(state) {
            let patched = tokio::time::timeout(
                REQUEST_TIMEOUT,
                annotate::set(client, &ns, &name, Some(state)),
            )
            .await;
            if !matches!(patched, Ok(Ok(()))) {
                log::warn!(
                    "repair: {ns}/{name}: annotating it {}: no success",
                    state.as_str()
                );
            }
        }
        act::report_resend(&self.events, &b.pod, &b.problems, &resent).await;
        match resent {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    /// Upstream's `istio_cni_repair_pods_repaired_total{type,result}`.
    fn count_upstream(&self, mode: Mode, result: &'static str) {
        self.metrics
            .pods_repaired
            .get_or_create(&crate::metrics::UpstreamRepair {
                r#type: mode.as_str(),
                result,
            })
            .inc();
    }

    fn count(&self, mode: Mode, result: &'static str) {
        self.metrics
            .repair_actions
            .get_or_create(&RepairAction {
                action: mode.as_str(),
                result,
            })
            .inc();
    }
}

/// `namespace/name` of a pod.
fn pod_name(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// The broken pods the loop may act on now. A pod found through a pinned netns file only
/// (no process of its own, see `locate`) must pass two more checks, since nothing in the
/// netns itself says whose it is:
/// - no other pod of this node that is not terminal claims one of its IPs in the API;
/// - the same netns was found for it at least [`PINNED_SETTLE`] ago; until then it is
///   looked at again when that time is up.
fn settled(broken: Vec<Broken>, reader: &Store<Pod>, st: &mut State) -> Vec<Broken> {
    let now = std::time::Instant::now();
    st.pinned_seen
        .retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(3600));
    let mut out = Vec::with_capacity(broken.len());
    for b in broken {
        if b.netns.via != locate::Via::BindMount {
            out.push(b);
            continue;
        }
        let uid = b.pod.uid().unwrap_or_default();
        let claimed = reader.state().into_iter().find(|p| {
            p.uid().as_deref() != Some(uid.as_str())
                && !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
                && running_pod_ips(p)
                    .iter()
                    .any(|ip| b.candidate.ips.contains(ip))
        });
        if let Some(other) = claimed {
            log::info!(
                "repair: {}: netns {} holds an IP that pod {} claims too; not touching it",
                pod_name(&b.pod),
                b.netns,
                pod_name(&other)
            );
            continue;
        }
        let id = b.netns.netns.id();
        match st.pinned_seen.get(&uid) {
            Some((seen, at)) if *seen == id && now.duration_since(*at) >= PINNED_SETTLE => {
                st.pinned_seen.remove(&uid);
                out.push(b);
            }
            Some((seen, _)) if *seen == id => {}
            _ => {
                log::info!(
                    "repair: {}: redirection broken in netns {} (found by its pinned file only); acting if it is still so in {PINNED_SETTLE:?}",
                    pod_name(&b.pod),
                    b.netns
                );
                st.pinned_seen.insert(uid, (id, now));
                let key = ObjectRef::from(b.pod.as_ref());
                let at = Instant::from_std(now + PINNED_SETTLE);
                st.deferred.insert(key);
                st.deferred_until = Some(st.deferred_until.map_or(at, |d| d.min(at)));
            }
        }
    }
    out
}

/// Where a pod's netns is and what it holds, or why that is unknown.
type CheckResult = Result<(PodNetns, Health), InspectError>;

/// The outcome of checking one pod.
type Checked = (Arc<Pod>, Candidate, CheckResult);

/// A pod whose drift watch is to be opened: its key, UID and netns.
type ToWatch = (ObjectRef<Pod>, String, Arc<istio_cni::netns::Netns>);

/// Checks candidates in parallel (one worker per CPU, at most 8): one `/proc` scan for all,
/// then per pod its netns and the read-back. Blocking.
///
/// Errors: a message when the iptables binaries or `host_proc` are unusable.
fn check_all(
    candidates: Vec<(Arc<Pod>, Candidate)>,
    host_proc: &std::path::Path,
    netns_dirs: &[PathBuf],
) -> Result<Vec<Checked>, String> {
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    // Without iptables, only nftables pods can be checked; each iptables pod says so.
    let tools = Tools::detect();
    let procs =
        ProcIndex::scan(host_proc).map_err(|e| format!("reading {}: {e}", host_proc.display()))?;
    let finder = Finder::new(&procs, netns_dirs);
    let check = |pod: &Pod, c: &Candidate| {
        let uid = pod.uid().unwrap_or_default();
        let netns = finder
            .find(&uid, &c.ips)
            .ok_or_else(|| InspectError::NotFound(inspect::join(&c.ips)))?;
        let health = inspect::inspect(&netns, c, &tools)?;
        Ok((netns, health))
    };
    let workers = std::thread::available_parallelism()
        .map_or(2, usize::from)
        .clamp(1, 8)
        .min(candidates.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<CheckResult>>> = candidates
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((pod, c)) = candidates.get(i) else {
                    return;
                };
                *results[i].lock().expect("result slot") = Some(check(pod, c));
            });
        }
    });
    Ok(candidates
        .into_iter()
        .zip(results)
        .map(|((pod, c), r)| {
            let r = r
                .into_inner()
                .expect("result slot")
                .expect("every slot filled");
            (pod, c, r)
        })
        .collect())
}

/// Whether a watch error means the credentials were refused.
fn is_unauthorized(e: &watcher::Error) -> bool {
    let code = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => return false,
    };
    code == 401
}
