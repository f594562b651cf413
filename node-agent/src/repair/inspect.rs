//! One pod, checked: should it have rules (the plugin's own decision), where is its netns,
//! and does the netns hold exactly what ADD would have written (the plugin's read-back
//! validator). The loopback probe is not run: the sidecar's own listener holds the
//! capture port in a running pod.
//!
//! An ambient pod ([`ambient_candidate`]) is one this node's agent enrolled (annotated
//! `ambient.istio.io/redirection`): its in-pod rules are read back the same way, and
//! while a ztunnel serves the node, ztunnel's listeners (15001, 15006, 15008) must be in
//! its netns.

use std::fmt;
use std::net::IpAddr;

use istio_cni::plan::{plan_rules_for_running_pod, running_pod_ips, Plan, Rules};
use istio_cni::plugin::{read_back_rules, Tools};
use istio_cni::validate::ValidateError;
use k8s_openapi::api::core::v1::Pod;

use crate::config::Exclusions;
use crate::locate::{self, PodNetns};

/// Why a pod is not checked. None of these is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ineligible {
    /// `metadata.deletionTimestamp` is set: the pod is going away.
    Deleting,
    /// `spec.hostNetwork`: the pod shares the node's netns.
    HostNetwork,
    /// `status.phase` is not `Running` (ADD may still be in progress).
    NotRunning,
    /// The pod has no IP in its status yet.
    NoPodIp,
    /// The plugin's decision gives it no rules.
    NoRules(String),
    /// An annotation does not parse; ADD would have refused the pod.
    BadSetting(String),
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ineligible::Deleting => write!(f, "being deleted"),
            Ineligible::HostNetwork => write!(f, "on the host network"),
            Ineligible::NotRunning => write!(f, "not running"),
            Ineligible::NoPodIp => write!(f, "no pod IP yet"),
            Ineligible::NoRules(why) => write!(f, "gets no rules: {why}"),
            Ineligible::BadSetting(why) => write!(f, "has a bad setting: {why}"),
        }
    }
}

/// A pod that should be redirected: its ruleset and addresses.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// What ADD would program, with the configured backend.
    pub ruleset: Box<Rules>,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// What captures the pod's traffic.
    pub kind: Kind,
}

/// What captures a candidate's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Its sidecar, through the sidecar rules.
    Sidecar,
    /// ztunnel, through the ambient in-pod rules.
    Ambient {
        /// ztunnel's listeners must be in the pod's netns: a ztunnel has taken its
        /// snapshot and the agent holds the pod.
        listeners: bool,
    },
}

/// What the repair loop needs to check ambient pods: this node's ambient settings, the
/// pods the agent holds, and which of them ztunnel should be listening in now.
#[derive(Debug, Clone)]
pub struct AmbientView {
    /// UIDs of the pods the agent's ZDS server holds (enrolled, pending or restored): an
    /// annotated pod it does not hold is being enrolled or unenrolled, or its enrolment
    /// was undone, and is left alone.
    pub held: std::collections::HashSet<String>,
    /// How many snapshots ztunnel connections had acked when the view was taken: a repair
    /// that finds another count (a ztunnel came or went meanwhile) still rewrites wrong
    /// rules, but hands nothing to ztunnel again.
    pub snapshots: u64,
    /// DNS capture and IPv6 (the agent's `AMBIENT_*` settings).
    pub node: istio_cni::rules::ambient::NodeSettings,
    /// `NATIVE_NFTABLES`.
    pub nftables: bool,
    /// UIDs of the pods in which ztunnel's listeners are expected: those the agent holds,
    /// while a ztunnel that took its snapshot is connected.
    pub listening: std::collections::HashSet<String>,
}

/// Whether `pod` should hold rules now, from the pod object alone (no side effects); its
/// rules are the nftables backend's with `nftables` (`NATIVE_NFTABLES`).
///
/// Errors: [`Ineligible`], why it is not checked.
pub fn candidate(
    pod: &Pod,
    exclusions: &Exclusions,
    nftables: bool,
) -> Result<Candidate, Ineligible> {
    let ips = running(pod)?;
    match plan_rules_for_running_pod(
        pod,
        &exclusions.agent_namespace,
        &exclusions.exclude_namespaces,
        nftables,
    ) {
        Ok(Plan::Redirect(ruleset)) => Ok(Candidate {
            ruleset,
            ips,
            kind: Kind::Sidecar,
        }),
        Ok(Plan::Skip(skip)) => Err(Ineligible::NoRules(skip.to_string())),
        Err(e) => Err(Ineligible::BadSetting(e.to_string())),
    }
}

/// Whether `pod` is an ambient pod whose capture the repair loop checks: annotated
/// `ambient.istio.io/redirection` (`enabled` or `pending`, written by this node's agent
/// when it enrolled the pod), without a sidecar, not in an excluded namespace, and
/// running. `None` when it is not an ambient pod at all ([`candidate`] decides then).
///
/// Errors: [`Ineligible`], why an ambient pod is not checked.
pub fn ambient_candidate(
    pod: &Pod,
    exclusions: &Exclusions,
    view: &AmbientView,
) -> Option<Result<Candidate, Ineligible>> {
    use istio_cni::rules::ambient::PodOverrides;
    crate::ambient::annotate::Redirection::of(pod)?;
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if annotations.contains_key(istio_cni::pod::STATUS_KEY) {
        return None;
    }
    let check = || {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        if !view.held.contains(uid) {
            return Err(Ineligible::NoRules(
                "an ambient pod this agent does not hold (being enrolled or unenrolled)".into(),
            ));
        }
        let ips = running(pod)?;
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        if let Some(skip) =
            istio_cni::pod::skip_by_name(namespace, name, &exclusions.agent_namespace, |ns| {
                exclusions.exclude_namespaces.iter().any(|e| e == ns)
            })
        {
            return Err(Ineligible::NoRules(skip.to_string()));
        }
        let overrides = PodOverrides::from_annotations(&annotations)
            .map_err(|e| Ineligible::BadSetting(e.to_string()))?;
        Ok(Candidate {
            ruleset: Box::new(istio_cni::plan::ambient_rules(
                &view.node,
                &overrides,
                view.nftables,
            )),
            ips,
            kind: Kind::Ambient {
                listeners: view.listening.contains(uid),
            },
        })
    };
    Some(check())
}

/// The pod's addresses if it is running in its own netns.
///
/// Errors: [`Ineligible`] when it is being deleted, on the host network, not running, or
/// without an address.
fn running(pod: &Pod) -> Result<Vec<IpAddr>, Ineligible> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(Ineligible::Deleting);
    }
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return Err(Ineligible::HostNetwork);
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if phase != Some("Running") {
        return Err(Ineligible::NotRunning);
    }
    let ips = running_pod_ips(pod);
    if ips.is_empty() {
        return Err(Ineligible::NoPodIp);
    }
    Ok(ips)
}

/// The state of a candidate's netns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Every expected rule is in place.
    Healthy,
    /// Rules are missing or wrong: what read-back found (for an ambient pod, ztunnel's
    /// missing listeners too).
    Broken(Vec<String>),
    /// An ambient pod's rules are in place, but ztunnel's listeners on these ports are not
    /// in its netns: ztunnel's failure, not the pod's (see [`crate::repair`]).
    NoListeners(Vec<u16>),
}

/// A candidate could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Neither a process in the pod's cgroup nor a netns file with its IP was found.
    #[error("no netns found for the pod (no process in a cgroup naming its UID, no netns file holding {0})")]
    NotFound(String),
    /// The netns found does not hold the pod's IP: it is not (or no longer) this pod's.
    #[error("netns {netns} does not hold the pod IP {ips}; not touching it")]
    WrongNetns {
        /// The netns found.
        netns: String,
        /// The pod IPs.
        ips: String,
    },
    /// The netns could not be entered.
    #[error("netns {netns}: {reason}")]
    Enter {
        /// The netns.
        netns: String,
        /// What failed.
        reason: String,
    },
    /// `iptables-save`, or the nf_tables dumps with `NATIVE_NFTABLES`, failed.
    #[error("netns {netns}: {source}")]
    ReadBack {
        /// The netns.
        netns: String,
        /// The read-back error.
        #[source]
        source: ValidateError,
    },
    /// The iptables binaries are missing for a pod with iptables rules (the nftables
    /// backend needs no tool).
    #[error("netns {netns}: {source}")]
    Backend {
        /// The netns.
        netns: String,
        /// The plugin's error.
        #[source]
        source: Box<istio_cni::Error>,
    },
}

/// Checks `candidate`'s rules in `netns`: the netns must hold one of the pod's IPs, then
/// read-back compares its rules with the ruleset.
///
/// Errors: [`InspectError`] when the netns cannot be used or read.
pub fn inspect(
    netns: &PodNetns,
    candidate: &Candidate,
    tools: &Tools,
) -> Result<Health, InspectError> {
    let name = netns.to_string();
    let enter = |reason: String| InspectError::Enter {
        netns: name.clone(),
        reason,
    };
    let outcome = netns
        .netns
        .run(|inside| {
            let here = locate::local_addresses().map_err(&enter)?;
            if !candidate.ips.iter().any(|ip| here.contains(ip)) {
                return Err(InspectError::WrongNetns {
                    netns: name.clone(),
                    ips: join(&candidate.ips),
                });
            }
            let mut problems = match read_back_rules(inside, tools, &candidate.ruleset) {
                Ok(()) => Vec::new(),
                Err(istio_cni::Error::Validate(ValidateError::Mismatch(problems))) => problems,
                Err(istio_cni::Error::Validate(source)) => {
                    return Err(InspectError::ReadBack {
                        netns: name.clone(),
                        source,
                    })
                }
                Err(source) => {
                    return Err(InspectError::Backend {
                        netns: name.clone(),
                        source: Box::new(source),
                    })
                }
            };
            let mut missing = Vec::new();
            if candidate.kind == (Kind::Ambient { listeners: true }) {
                missing = crate::ambient::listeners::missing_ztunnel_listeners(inside)
                    .map_err(|e| enter(format!("reading its sockets: {e}")))?;
            }
            Ok(match (problems.is_empty(), missing.is_empty()) {
                (true, true) => Health::Healthy,
                (true, false) => Health::NoListeners(missing),
                (false, true) => Health::Broken(problems),
                (false, false) => {
                    problems.push(no_listeners(&missing));
                    Health::Broken(problems)
                }
            })
        })
        .map_err(|e| enter(e.to_string()))?;
    outcome
}

/// The problem of a pod in whose netns ztunnel's listeners on `missing` are gone.
pub fn no_listeners(missing: &[u16]) -> String {
    let ports: Vec<String> = missing.iter().map(u16::to_string).collect();
    format!(
        "ztunnel is not listening on port(s) {} in the pod's netns",
        ports.join(", ")
    )
}

/// `ips` as a comma-separated list.
pub fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(extra: serde_json::Value) -> Pod {
        let mut base = json!({
            "metadata": {"namespace": "default", "name": "web", "uid": "u1",
                "annotations": {"sidecar.istio.io/status": "{}"}},
            "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.5"}]},
        });
        json_patch::merge(&mut base, &extra);
        serde_json::from_value(base).expect("pod")
    }

    fn excl() -> Exclusions {
        Exclusions {
            agent_namespace: "istio-system".into(),
            exclude_namespaces: vec!["kube-system".into()],
        }
    }

    #[test]
    fn a_running_meshed_pod_is_a_candidate() {
        let c = candidate(&pod(json!({})), &excl(), false).unwrap();
        assert_eq!(c.ips, ["10.0.0.5".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn pods_that_are_left_alone() {
        let cases = [
            (
                json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
                Ineligible::Deleting,
            ),
            (
                json!({"spec": {"hostNetwork": true}}),
                Ineligible::HostNetwork,
            ),
            (
                json!({"status": {"phase": "Pending"}}),
                Ineligible::NotRunning,
            ),
            (json!({"status": {"podIPs": null}}), Ineligible::NoPodIp),
        ];
        for (patch, want) in cases {
            assert_eq!(
                candidate(&pod(patch.clone()), &excl(), false).unwrap_err(),
                want,
                "{patch}"
            );
        }
        let skipped = [
            json!({"metadata": {"namespace": "kube-system"}}),
            json!({"metadata": {"annotations": {"sidecar.istio.io/status": null}}}),
            json!({"metadata": {"labels": {"sidecar.istio.io/inject": "false"}}}),
        ];
        for patch in skipped {
            assert!(
                matches!(
                    candidate(&pod(patch.clone()), &excl(), false),
                    Err(Ineligible::NoRules(_))
                ),
                "{patch}"
            );
        }
        let bad = json!({"metadata": {"annotations": {"traffic.sidecar.istio.io/includeInboundPorts": "80,x"}}});
        assert!(matches!(
            candidate(&pod(bad), &excl(), false),
            Err(Ineligible::BadSetting(_))
        ));
    }
}
