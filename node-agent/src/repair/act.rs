//! What the repair loop does to a broken pod, chosen by `--repair-mode`, each recorded as an
//! Event on the pod.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use istio_cni::lock::NetnsLock;

use istio_cni::plugin::{read_back_rules, reprogram_rules, Tools};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::ResourceExt;
use serde_json::json;

use super::inspect::{join, Candidate};
use crate::events::{EventType, Events};
use crate::locate::{local_addresses, PodNetns};

/// Event reason: the rules were written again in place.
pub const REASON_REPAIRED: &str = "IstioCNIRepaired";
/// Event reason: writing the rules in place failed.
pub const REASON_REPAIR_FAILED: &str = "IstioCNIRepairFailed";
/// Event reason: ztunnel does not capture an ambient pod after it was handed the pod
/// again; the pod is annotated `pending`.
pub const REASON_AMBIENT_PENDING: &str = "IstioCNIAmbientPending";
/// Event reason: the pod was deleted so that its controller recreates it.
pub const REASON_DELETED: &str = "IstioCNIDeletedBrokenPod";
/// Event reason: the pod was labeled as broken.
pub const REASON_LABELED: &str = "IstioCNILabeledBrokenPod";

/// The action for a broken pod (`--repair-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Write the rules in place through ADD's code path, then read them back. The pod keeps
    /// running; connections opened while it was unredirected bypassed the sidecar.
    #[default]
    Repair,
    /// Delete the pod (with UID and resourceVersion preconditions) so that its controller
    /// recreates it through a fresh ADD. Bare pods are gone for good.
    Delete,
    /// Label the pod (`--repair-broken-pod-label-key`=`-value`) and leave it to the
    /// operator or another controller.
    Label,
}

impl Mode {
    /// The mode's name, as the flag takes it; also the `action` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Repair => "repair",
            Mode::Delete => "delete",
            Mode::Label => "label",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "repair" => Ok(Mode::Repair),
            "delete" => Ok(Mode::Delete),
            "label" => Ok(Mode::Label),
            other => Err(format!(
                "unknown repair mode {other:?}: use repair, delete or label"
            )),
        }
    }
}

/// How an action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done.
    Done,
    /// Nothing to do after all (the pod changed or is already labeled).
    Moot(String),
    /// Failed, with why.
    Failed(String),
}

/// The pod's broken state, for messages: at most the first three problems.
pub fn summary(problems: &[String]) -> String {
    let mut s = problems
        .iter()
        .take(3)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > 3 {
        s.push_str(&format!("; and {} more", problems.len() - 3));
    }
    s
}

/// An in-place repair failed; nothing was removed from the pod.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// The netns no longer holds any of the pod's IPs: it is not (or no longer) the pod's.
    #[error("netns {netns} no longer holds the pod IP {ips}; not touching it")]
    PodIpGone {
        /// The netns, as found.
        netns: String,
        /// The pod's IPs.
        ips: String,
    },
    /// The addresses in the netns could not be read.
    #[error("netns {netns}: {reason}")]
    Addresses {
        /// The netns, as found.
        netns: String,
        /// Why.
        reason: String,
    },
    /// The netns could not be entered.
    #[error(transparent)]
    Netns(#[from] istio_cni::netns::NetnsError),
    /// Writing or reading back the rules failed (the plugin's error).
    #[error(transparent)]
    Program(#[from] istio_cni::Error),
    /// The iptables binaries are unusable.
    #[error(transparent)]
    Xtables(#[from] istio_cni::apply::ApplyError),
    /// Processes of another pod now live in the netns: it is not (or no longer) the pod's.
    #[error("netns {netns} now holds processes of pod(s) {pods}; not touching it")]
    OtherPod {
        /// The netns, as found.
        netns: String,
        /// The other pods' UIDs.
        pods: String,
    },
    /// Another operation (an ADD, CHECK or DEL of the plugin) holds the pod's netns, or
    /// the lock file cannot be used; nothing was written, the next pass tries again.
    #[error(transparent)]
    Lock(#[from] istio_cni::lock::LockError),
    /// The blocking task running the repair died.
    #[error("the repair task failed: {0}")]
    Task(String),
}

/// Whose netns a repair writes into, to check again under the lock: the pod's UID, and
/// the host's `/proc` to look for other pods' processes in the netns (`None`: not checked,
/// for tests of the write alone).
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    /// The pod's UID.
    pub uid: &'a str,
    /// The host's `/proc` as mounted in the agent.
    pub host_proc: Option<&'a Path>,
}

/// How long a repair waits for the plugin's lock on the pod's netns ([`istio_cni::lock`]):
/// an ADD holds it for milliseconds; a longer hold means the next pass will do.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Writes the candidate's rules into the netns that was inspected (the same open handle,
/// never the path again) and reads them back, holding the plugin's per-netns lock in
/// `lock_dir` (so a repair and an ADD never interleave). Under the lock it looks again:
/// no other pod's process may live in the netns (with `owner.host_proc`), the netns must
/// still hold one of the pod's IPs, and when the rules now read back as they should,
/// nothing is written ([`Repair::AlreadyInPlace`]). A failed write or read-back removes
/// nothing ([`reprogram_rules`]): the pod keeps what it had. Blocking; run it off the async
/// runtime.
///
/// Errors: [`RepairError`]; [`RepairError::PodIpGone`] when the netns no longer holds the
/// pod's IP, [`RepairError::OtherPod`] when another pod's process now lives in it (then
/// nothing is written); [`RepairError::Lock`] when the lock is not had within
/// [`LOCK_WAIT`].
pub fn repair_in_place(
    netns: &PodNetns,
    candidate: &Candidate,
    tools: &Tools,
    lock_dir: &Path,
    owner: &Owner<'_>,
) -> Result<Repair, RepairError> {
    let _lock = NetnsLock::acquire(lock_dir, netns.netns.id(), LOCK_WAIT)?;
    // What the pass saw may be old by now (a new pod's first process may have started in
    // this netns): look again, under the lock.
    if let Some(host_proc) = owner.host_proc {
        let procs =
            crate::locate::ProcIndex::scan(host_proc).map_err(|e| RepairError::Addresses {
                netns: netns.to_string(),
                reason: format!("reading {}: {e}", host_proc.display()),
            })?;
        let others = procs.other_pods_in(netns.netns.id(), owner.uid);
        if !others.is_empty() {
            return Err(RepairError::OtherPod {
                netns: netns.to_string(),
                pods: others.join(", "),
            });
        }
    }
    netns.netns.run(|inside| {
        let here = local_addresses().map_err(|reason| RepairError::Addresses {
            netns: netns.to_string(),
            reason,
        })?;
        if !candidate.ips.iter().any(|ip| here.contains(ip)) {
            return Err(RepairError::PodIpGone {
                netns: netns.to_string(),
                ips: join(&candidate.ips),
            });
        }
        // Read back once more under the lock: what the pass saw may have been an ADD or a
        // DEL halfway through, since finished.
        match read_back_rules(inside, tools, &candidate.ruleset) {
            Ok(()) => return Ok(Repair::AlreadyInPlace),
            Err(e) => log::debug!("repair: read-back under the lock: {e}"),
        }
        reprogram_rules(inside, tools, &candidate.ruleset)?;
        Ok(Repair::Written)
    })?
}

/// What an in-place repair did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// The rules were written and read back.
    Written,
    /// Under the lock, the rules read back as they should: nothing was written (the pass
    /// had seen another operation halfway through).
    AlreadyInPlace,
}

/// Records the outcome of an in-place repair as an Event on `pod`.
pub async fn report_repair(
    events: &Events,
    pod: &Pod,
    problems: &[String],
    result: &Result<Repair, RepairError>,
) {
    report_rules(events, pod, problems, result, false).await
}

/// [`report_repair`] for an ambient pod (`ambient`): its rules hold its traffic for ztunnel,
/// and a failed rewrite keeps what it had, so the message does not speak of a sidecar.
pub async fn report_rules(
    events: &Events,
    pod: &Pod,
    problems: &[String],
    result: &Result<Repair, RepairError>,
    ambient: bool,
) {
    match result {
        Ok(Repair::AlreadyInPlace) => {}
        Ok(Repair::Written) => {
            let message = format!(
                "istio-cni restored the traffic redirection rules in the pod's netns (found: {})",
                summary(problems)
            );
            events
                .record(
                    pod,
                    EventType::Normal,
                    REASON_REPAIRED,
                    &message,
                    "RepairRules",
                )
                .await;
        }
        Err(e) => {
            let message = if ambient {
                format!(
                    "istio-cni could not restore the ambient redirection rules ({e}); the pod keeps the rules it had, and may not be captured by ztunnel"
                )
            } else {
                format!(
                    "istio-cni could not restore the traffic redirection rules ({e}); the pod's traffic bypasses the sidecar"
                )
            };
            events
                .record(
                    pod,
                    EventType::Warning,
                    REASON_REPAIR_FAILED,
                    &message,
                    "RepairRules",
                )
                .await;
        }
    }
}

/// Records the outcome of handing an ambient pod to ztunnel again as an Event on `pod`:
/// Normal [`REASON_REPAIRED`] when ztunnel listens in it again, else Warning
/// [`REASON_AMBIENT_PENDING`] with why.
pub async fn report_resend(
    events: &Events,
    pod: &Pod,
    problems: &[String],
    result: &Result<(), crate::ambient::enrol::EnrolError>,
) {
    let (kind, reason, message) = match result {
        Ok(()) => (
            EventType::Normal,
            REASON_REPAIRED,
            format!(
                "istio-cni handed the pod to ztunnel again, which listens in its netns again (found: {})",
                summary(problems)
            ),
        ),
        Err(e) => (
            EventType::Warning,
            REASON_AMBIENT_PENDING,
            format!(
                "ztunnel does not capture the pod after istio-cni handed it over again ({e}); its traffic is held by the in-pod rules until a ztunnel takes it (annotated ambient.istio.io/redirection=pending)"
            ),
        ),
    };
    events
        .record(pod, kind, reason, &message, "RepairAmbient")
        .await;
}

/// Deletes `pod` if it is still the same pod, not yet terminating: a fresh read gives the
/// resourceVersion for the preconditions, so a pod that changes in between is not deleted.
pub async fn delete(
    client: &kube::Client,
    events: &Events,
    pod: &Pod,
    problems: &[String],
) -> Outcome {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &ns);
    let fresh = match pods.get_opt(&name).await {
        Ok(Some(p)) => p,
        Ok(None) => return Outcome::Moot("the pod is gone".into()),
        Err(e) => return Outcome::Failed(format!("reading the pod: {e}")),
    };
    if fresh.metadata.uid != pod.metadata.uid {
        return Outcome::Moot("the pod was replaced".into());
    }
    if fresh.metadata.deletion_timestamp.is_some() {
        return Outcome::Moot("the pod is already being deleted".into());
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: fresh.metadata.uid.clone(),
            resource_version: fresh.metadata.resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    match pods.delete(&name, &params).await {
        Ok(_) => {
            let message = format!(
                "istio-cni deleted the pod because its traffic redirection rules are missing or wrong ({}); its controller recreates it",
                summary(problems)
            );
            events
                .record(
                    &fresh,
                    EventType::Warning,
                    REASON_DELETED,
                    &message,
                    "DeletePod",
                )
                .await;
            Outcome::Done
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            Outcome::Moot("the pod changed since it was read".into())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Outcome::Moot("the pod is gone".into()),
        Err(e) => Outcome::Failed(format!("deleting the pod: {e}")),
    }
}

/// Sets the label `key=value` on `pod`, unless it already has it.
pub async fn label(
    client: &kube::Client,
    events: &Events,
    pod: &Pod,
    (key, value): (&str, &str),
    problems: &[String],
) -> Outcome {
    if pod.labels().get(key).map(String::as_str) == Some(value) {
        return Outcome::Moot(format!("already labeled {key}={value}"));
    }
    let ns = pod.namespace().unwrap_or_default();
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &ns);
    let patch = json!({"metadata": {"labels": {key: value}}});
    match pods
        .patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(labeled) => {
            let message = format!(
                "istio-cni labeled the pod {key}={value} because its traffic redirection rules are missing or wrong ({})",
                summary(problems)
            );
            events
                .record(
                    &labeled,
                    EventType::Warning,
                    REASON_LABELED,
                    &message,
                    "LabelPod",
                )
                .await;
            Outcome::Done
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Outcome::Moot("the pod is gone".into()),
        Err(e) => Outcome::Failed(format!("labeling the pod: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in [Mode::Repair, Mode::Delete, Mode::Label] {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
        }
        assert!("fix"
            .parse::<Mode>()
            .unwrap_err()
            .contains("repair, delete or label"));
    }

    #[test]
    fn summaries_are_short() {
        let p: Vec<String> = (1..=5).map(|i| format!("p{i}")).collect();
        assert_eq!(summary(&p[..2]), "p1; p2");
        assert_eq!(summary(&p), "p1; p2; p3; and 2 more");
    }
}
