//! Enrolling one pod into ambient mode, proved before it counts (ours; upstream trusts
//! ztunnel's ack alone): the in-pod rules are written and read back, ztunnel takes the
//! pod's netns and acks, and ztunnel's listeners are then seen in that netns. If any step
//! fails, what the earlier ones did is undone (ztunnel is told to drop the pod, the rules
//! are removed), so a pod is either captured by ztunnel or left as it was.
//!
//! Upstream's order (`cni/pkg/nodeagent/net_linux.go`, `AddPodToMesh`): rules first, then
//! ztunnel, so that no packet reaches a listener before the rules that protect ztunnel's
//! own traffic exist.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use istio_cni::lock::{LockError, NetnsLock};
use istio_cni::netns::{Netns, NetnsError};
use istio_cni::plan::Rules;
use istio_cni::plugin::{program, program_nft, Tools};
use istio_cni::rules::ambient::{NodeSettings, OverrideError, PodOverrides};

use super::annotate::Redirection;
use super::listeners::missing_ztunnel_listeners;
use super::server::{ServerError, Workload, ZdsServer};
use super::zds::WorkloadInfo;

/// How long ztunnel's listeners may take to appear in the pod's netns after its ack. The
/// real ztunnel opens them before it acks (about 10 ms in `ztunnel_zds.rs`); the wait only
/// absorbs scheduling on a busy node.
pub const LISTENER_WAIT: Duration = Duration::from_secs(2);

/// How long an enrolment waits for the pod's netns lock ([`istio_cni::lock`]).
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// The pod, as enrolment needs it.
#[derive(Debug, Clone)]
pub struct AmbientPod {
    /// `metadata.uid`.
    pub uid: String,
    /// Name, namespace and service account, for ztunnel.
    pub info: WorkloadInfo,
    /// `metadata.annotations` (the pod-level overrides).
    pub annotations: BTreeMap<String, String>,
    /// Its addresses, for the node's probe sets.
    pub ips: Vec<std::net::IpAddr>,
}

impl AmbientPod {
    /// The pod `pod` from the API, whose UID is `uid`: its name, namespace, service
    /// account (`default` when unset, as the API defaults it) and annotations.
    pub fn of(pod: &k8s_openapi::api::core::v1::Pod, uid: &str) -> AmbientPod {
        let meta = &pod.metadata;
        AmbientPod {
            uid: uid.to_owned(),
            info: WorkloadInfo {
                name: meta.name.clone().unwrap_or_default(),
                namespace: meta.namespace.clone().unwrap_or_default(),
                service_account: pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "default".into()),
            },
            annotations: meta.annotations.clone().unwrap_or_default(),
            ips: api_pod_ips(pod),
        }
    }
}

/// The addresses the API lists for `pod` (`status.podIPs`); none that does not parse.
pub fn api_pod_ips(pod: &k8s_openapi::api::core::v1::Pod) -> Vec<std::net::IpAddr> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect()
}

/// An enrolment failed; what it had done was undone.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// A pod-level override annotation is invalid.
    #[error(transparent)]
    Settings(#[from] OverrideError),
    /// The pod's netns could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Another operation holds the pod's netns.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Writing or reading back the in-pod rules failed (the plugin's error).
    #[error("in-pod rules: {0}")]
    Rules(#[source] Box<istio_cni::Error>),
    /// ztunnel did not take the pod.
    #[error(transparent)]
    Ztunnel(#[from] ServerError),
    /// The pod's addresses could not be added to the node's probe sets.
    #[error("the node's probe sets: {0}")]
    Host(#[source] super::hostrules::HostRulesError),
    /// ztunnel acked, but its sockets are not listening in the pod's netns.
    #[error("ztunnel acked the pod, but nothing listens on port(s) {missing:?} in its netns after {waited:?}; the pod would not be captured")]
    NoListeners {
        /// The ports without a listener.
        missing: Vec<u16>,
        /// How long the agent looked.
        waited: Duration,
    },
    /// A blocking task died.
    #[error("the enrolment task failed: {0}")]
    Task(String),
}

/// One lock per pod UID: the plugin's event and the watch never act on one pod at once
/// (an admission's undo must not remove what a retried ADD just enrolled).
#[derive(Debug, Clone, Default)]
pub struct PodLocks {
    locks: Arc<std::sync::Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl PodLocks {
    /// Waits for pod `uid`'s lock; it is held until the guard is dropped.
    pub async fn lock(&self, uid: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            // Locks nobody holds or waits for are dropped as others are taken.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(uid.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

/// What enrolment needs of the node.
#[derive(Clone)]
pub struct Enroller {
    /// The node-wide settings (DNS capture, IPv6, probe SNAT addresses).
    pub node: NodeSettings,
    /// The iptables (and nft) tools of this node.
    pub tools: Tools,
    /// Where the plugin's per-netns lock lives (`cni_agent_run_dir`).
    pub lock_dir: PathBuf,
    /// The ZDS server ztunnel is connected to.
    pub server: ZdsServer,
    /// How long to wait for ztunnel's listeners after its ack ([`LISTENER_WAIT`]).
    pub listener_wait: Duration,
    /// The node's probe sets, when the agent manages them (the pod's addresses are added
    /// last, once ztunnel listens, and removed on unenrolment).
    pub host: Option<super::hostrules::HostProbes>,
    /// One lock per pod, taken by the callers of [`Enroller::enrol`] and
    /// [`Enroller::unenrol`] around all they do for the pod.
    pub pods: PodLocks,
    /// `NATIVE_NFTABLES`: the in-pod rules are nftables tables (`inet istio-ambient-*`).
    pub native_nftables: bool,
}

impl Enroller {
    /// The in-pod rules of a pod with `overrides`, in this node's backend (the same
    /// builders as `istio-cni render`).
    pub fn ruleset(&self, overrides: &PodOverrides) -> Rules {
        istio_cni::plan::ambient_rules(&self.node, overrides, self.native_nftables)
    }

    /// Enrols `pod` whose netns is `netns` (see the module docs): ADD's enrolment, which
    /// counts only when ztunnel listens in the pod.
    ///
    /// Errors: [`EnrolError`]; nothing of the enrolment is left behind.
    pub async fn enrol(&self, pod: &AmbientPod, netns: Arc<Netns>) -> Result<(), EnrolError> {
        self.enrol_with(pod, netns, false).await.map(drop)
    }

    /// Enrols a pod that is already running (its label changed, or the agent restarted):
    /// as [`Enroller::enrol`], except that with no ztunnel connected the rules are kept
    /// and the pod stays recorded for the next ztunnel's snapshot
    /// ([`Redirection::Pending`]), as upstream does: its traffic is held for ztunnel rather
    /// than let out uncaptured.
    ///
    /// Errors: [`EnrolError`] (ztunnel refused, or acked without listening); nothing of
    /// the enrolment is left behind.
    pub async fn enrol_running(
        &self,
        pod: &AmbientPod,
        netns: Arc<Netns>,
    ) -> Result<Redirection, EnrolError> {
        self.enrol_with(pod, netns, true).await
    }

    async fn enrol_with(
        &self,
        pod: &AmbientPod,
        netns: Arc<Netns>,
        pending_without_ztunnel: bool,
    ) -> Result<Redirection, EnrolError> {
        let t = Instant::now();
        let overrides = PodOverrides::from_annotations(&pod.annotations)?;
        let ruleset = self.ruleset(&overrides);
        self.blocking({
            let (netns, ruleset) = (netns.clone(), ruleset.clone());
            move |me| me.write_rules(&netns, &ruleset)
        })
        .await?;
        log::debug!(
            "ambient: pod {}: rules written and read back in {:?}",
            pod.uid,
            t.elapsed()
        );
        let workload = Workload {
            uid: pod.uid.clone(),
            info: pod.info.clone(),
            netns: Some(netns.clone()),
        };
        match self.server.add(workload).await {
            Ok(()) => {}
            // Recorded by `add`: the next ztunnel's snapshot brings it.
            Err(ServerError::NoZtunnel) if pending_without_ztunnel => {
                self.add_to_host(pod, &netns, &ruleset).await?;
                return Ok(Redirection::Pending);
            }
            Err(e) => {
                // `add` records the pod even when no ztunnel took it; it is not enrolled.
                let _ = self.server.del(&pod.uid).await;
                self.undo_rules(&netns, &ruleset).await;
                return Err(e.into());
            }
        }
        log::debug!(
            "ambient: pod {}: ztunnel acked {:?} after the start",
            pod.uid,
            t.elapsed()
        );
        if let Err(e) = self.wait_for_listeners(&netns).await {
            let _ = self.server.del(&pod.uid).await;
            self.undo_rules(&netns, &ruleset).await;
            return Err(e);
        }
        self.add_to_host(pod, &netns, &ruleset).await?;
        Ok(Redirection::Enabled)
    }

    /// Waits up to `listener_wait` for ztunnel's listeners in `netns`.
    ///
    /// Errors: [`EnrolError::NoListeners`] naming the ports still missing, or why the
    /// netns could not be read.
    async fn wait_for_listeners(&self, netns: &Arc<Netns>) -> Result<(), EnrolError> {
        let start = Instant::now();
        // ztunnel opens its listeners around its ack: look again soon, then less often.
        let mut pause = Duration::from_millis(1);
        loop {
            let missing = self
                .blocking({
                    let netns = netns.clone();
                    move |_| {
                        netns
                            .run(missing_ztunnel_listeners)
                            .map_err(EnrolError::from)?
                            .map_err(|e| {
                                EnrolError::Task(format!("reading the netns's sockets: {e}"))
                            })
                    }
                })
                .await?;
            if missing.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= self.listener_wait {
                return Err(EnrolError::NoListeners {
                    missing,
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Hands an enrolled pod whose netns lacks ztunnel's listeners to ztunnel again (the
    /// repair loop's action, [`crate::repair`]): ztunnel is told to drop it, then to add it
    /// with `netns` (ztunnel takes an add of a pod it holds with the same netns as done,
    /// istio/ztunnel `src/inpod/statemanager.rs`), and its listeners must then appear
    /// within `listener_wait`. The in-pod rules are left as they are: they keep the pod's
    /// traffic for ztunnel whatever happens here. The caller holds the pod's lock.
    ///
    /// Errors: [`EnrolError::Ztunnel`] when no ztunnel is connected or it refuses the pod,
    /// [`EnrolError::NoListeners`] when it acks without listening, [`EnrolError::Netns`]
    /// or [`EnrolError::Task`] when the netns's sockets cannot be read. In every case the
    /// pod stays recorded, so the next ztunnel's snapshot brings it.
    pub async fn resend(&self, pod: &AmbientPod, netns: Arc<Netns>) -> Result<(), EnrolError> {
        if let Err(e) = self.server.del(&pod.uid).await {
            log::debug!(
                "ambient: pod {}: dropping it from ztunnel before re-sending: {e}",
                pod.uid
            );
        }
        self.server
            .add(Workload {
                uid: pod.uid.clone(),
                info: pod.info.clone(),
                netns: Some(netns.clone()),
            })
            .await?;
        self.wait_for_listeners(&netns).await
    }

    /// Adds the pod's addresses to the node's probe sets; on failure the enrolment is
    /// undone.
    async fn add_to_host(
        &self,
        pod: &AmbientPod,
        netns: &Arc<Netns>,
        ruleset: &Rules,
    ) -> Result<(), EnrolError> {
        let (uid, ips) = (pod.uid.clone(), pod.ips.clone());
        let added = self
            .blocking(move |me| match &me.host {
                Some(host) => host.add(&uid, &ips).map_err(EnrolError::Host),
                None => Ok(()),
            })
            .await;
        if let Err(e) = added {
            let _ = self.server.del(&pod.uid).await;
            self.undo_rules(netns, ruleset).await;
            self.remove_from_host(&pod.uid).await;
            return Err(e);
        }
        Ok(())
    }

    /// Reads back the in-pod rules of a pod enrolled before the agent started and, when
    /// they differ from this agent's, rewrites them (`AMBIENT_RECONCILE_POD_RULES_ON_STARTUP`),
    /// under the netns lock, read back. A failure removes nothing: the pod keeps what it
    /// had (the repair loop's semantics, [`istio_cni::plugin::reprogram`]). Returns
    /// whether they were rewritten.
    ///
    /// Errors: [`EnrolError`].
    pub async fn rewrite_rules(
        &self,
        pod: &AmbientPod,
        netns: Arc<Netns>,
    ) -> Result<bool, EnrolError> {
        let overrides = PodOverrides::from_annotations(&pod.annotations)?;
        let ruleset = self.ruleset(&overrides);
        self.blocking(move |me| {
            let _lock = NetnsLock::acquire(&me.lock_dir, netns.id(), LOCK_WAIT)?;
            netns
                .run(|inside| {
                    if istio_cni::plugin::read_back_rules(inside, &me.tools, &ruleset).is_ok() {
                        return Ok(false);
                    }
                    istio_cni::plugin::reprogram_rules(inside, &me.tools, &ruleset).map(|()| true)
                })?
                .map_err(|e| EnrolError::Rules(Box::new(e)))
        })
        .await
    }

    /// Whether ztunnel's listeners are all up in `netns` now.
    ///
    /// Errors: [`EnrolError`] when the netns cannot be read.
    pub async fn listening(&self, netns: Arc<Netns>) -> Result<bool, EnrolError> {
        self.blocking(move |_| {
            netns
                .run(missing_ztunnel_listeners)
                .map_err(EnrolError::from)?
                .map(|m| m.is_empty())
                .map_err(|e| EnrolError::Task(format!("reading the netns's sockets: {e}")))
        })
        .await
    }

    /// Adds the pod's addresses to the node's probe sets, for a pod restored after a
    /// restart (its rules and ztunnel's state are from before).
    ///
    /// Errors: [`EnrolError::Host`].
    pub async fn add_to_host_only(&self, pod: &AmbientPod) -> Result<(), EnrolError> {
        let (uid, ips) = (pod.uid.clone(), pod.ips.clone());
        self.blocking(move |me| match &me.host {
            Some(host) => host.add(&uid, &ips).map_err(EnrolError::Host),
            None => Ok(()),
        })
        .await
    }

    /// Removes pod `uid`'s entries from the node's probe sets (logged on failure).
    pub async fn remove_from_host(&self, uid: &str) {
        let owner = uid.to_owned();
        let removed = self
            .blocking(move |me| match &me.host {
                Some(host) => host.remove(&owner).map_err(EnrolError::Host),
                None => Ok(()),
            })
            .await;
        if let Err(e) = removed {
            log::warn!("ambient: pod {uid}: {e}");
        }
    }

    /// Takes `pod` out of ambient mode: ztunnel drops it, and its in-pod rules are removed
    /// when its netns is still there.
    ///
    /// Errors: [`EnrolError::Ztunnel`] when ztunnel does not ack; the rules are removed
    /// anyway.
    pub async fn unenrol(&self, uid: &str, netns: Option<Arc<Netns>>) -> Result<(), EnrolError> {
        let told = self.server.del(uid).await;
        self.remove_from_host(uid).await;
        if let Some(netns) = netns {
            let removed = self
                .blocking(move |me| {
                    let _lock = NetnsLock::acquire(&me.lock_dir, netns.id(), LOCK_WAIT)?;
                    netns
                        .run(|inside| remove_everything(inside, &me.tools))?
                        .map_err(|e| EnrolError::Rules(Box::new(e)))
                })
                .await;
            if let Err(e) = removed {
                log::warn!("ambient: removing the in-pod rules of pod {uid}: {e}");
            }
        }
        Ok(told?)
    }

    /// Writes and reads back `rules` under the netns lock; on failure nothing is left
    /// (the plugin's ADD semantics, [`program`] and [`program_nft`], without their
    /// loopback probe: ztunnel's listeners prove the capture instead).
    fn write_rules(&self, netns: &Netns, rules: &Rules) -> Result<(), EnrolError> {
        let _lock = NetnsLock::acquire(&self.lock_dir, netns.id(), LOCK_WAIT)?;
        let written = netns.run(|inside| match rules {
            Rules::Iptables(r) => match &self.tools.xt {
                Some(xt) => program(inside, xt, r, None),
                // Not found at start: look again, for the error that says what is missing.
                None => istio_cni::apply::Xtables::detect()
                    .map_err(istio_cni::Error::from)
                    .and_then(|xt| program(inside, &xt, r, None)),
            },
            Rules::Nftables(r) => program_nft(inside, self.tools.xt.as_ref(), r, None),
        })?;
        written.map_err(|e| EnrolError::Rules(Box::new(e)))
    }

    async fn undo_rules(&self, netns: &Arc<Netns>, rules: &Rules) {
        let (netns, rules) = (netns.clone(), rules.clone());
        let undone = self
            .blocking(move |me| {
                let _lock = NetnsLock::acquire(&me.lock_dir, netns.id(), LOCK_WAIT)?;
                netns
                    .run(|inside| match &rules {
                        Rules::Iptables(r) => match &me.tools.xt {
                            Some(xt) => istio_cni::apply::remove(inside, xt, Some(r))
                                .map_err(istio_cni::Error::from),
                            None => Ok(()),
                        },
                        Rules::Nftables(_) => remove_everything(inside, &me.tools),
                    })?
                    .map_err(|e| EnrolError::Rules(Box::new(e)))
            })
            .await;
        if let Err(e) = undone {
            log::error!("ambient: undoing the in-pod rules after a failed enrolment: {e}");
        }
    }

    /// Runs `f` with this enroller on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Enroller) -> Result<T, EnrolError> + Send + 'static,
    ) -> Result<T, EnrolError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| EnrolError::Task(e.to_string()))?
    }
}

/// Removes every rule of ours from the netns `inside` is in, whichever backend wrote them:
/// the iptables chains, our nftables tables, and the policy routing.
///
/// Errors: the first failure; the rest is still removed.
fn remove_everything(
    inside: &istio_cni::netns::Inside<'_>,
    tools: &Tools,
) -> Result<(), istio_cni::Error> {
    let mut first: Option<istio_cni::Error> = None;
    if let Some(xt) = &tools.xt {
        if let Err(e) = istio_cni::apply::remove(inside, xt, None) {
            first.get_or_insert(e.into());
        }
    }
    if let Err(e) = istio_cni::nft::remove(inside) {
        first.get_or_insert(e.into());
    }
    if let Err(e) = istio_cni::routing::remove(inside) {
        first.get_or_insert(istio_cni::apply::ApplyError::Routing(e).into());
    }
    first.map_or(Ok(()), Err)
}
