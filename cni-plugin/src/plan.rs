//! From a pod read from the API to what ADD will program: the decision, the redirect and
//! the ruleset. Shared by ADD, CHECK, `istio-cni render` and the conformance tests, so
//! that they cannot drift apart.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

use crate::cni::result::pod_ips;
use crate::config::NetConf;
use crate::pod::{decide, skip_by_name, Skip};
use crate::redirect::{Redirect, RedirectError};
use crate::rules::{iptables, Ruleset};

/// What ADD does for a pod: `R` is the iptables [`Ruleset`], or with `native_nftables` the
/// [`NftRuleset`](crate::rules::nftables::NftRuleset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan<R = Ruleset> {
    /// Pass through: the pod gets no rules, for this reason.
    Skip(Skip),
    /// Program this ruleset.
    Redirect(Box<R>),
}

/// Decides for `pod` and builds its ruleset. IPv6 rules are added when the `prevResult` in
/// `conf` gives the pod an IPv6 address (or the proxy asks for dual stack).
///
/// Errors: [`RedirectError`] when an annotation or proxy setting does not parse.
pub fn plan_for_pod(conf: &NetConf, pod: &Pod) -> Result<Plan, RedirectError> {
    plan_for_pod_with_ips(pod, &pod_ips(conf.prev_result.as_ref()))
}

/// [`plan_for_pod`] with the pod's addresses given: IPv6 rules when one of `pod_ips` is
/// IPv6 (or the proxy asks for dual stack). ADD without a `prevResult` (standalone mode)
/// takes them from the netns ([`crate::routing::pod_addresses`]).
///
/// Errors: [`RedirectError`] when an annotation or proxy setting does not parse.
pub fn plan_for_pod_with_ips(pod: &Pod, pod_ips: &[IpAddr]) -> Result<Plan, RedirectError> {
    plan_with(pod, |r| iptables::build(r, iptables::has_ipv6(pod_ips)))
}

/// The decision for `pod` ([`decide`]) and, when it is meshed, its redirect: `Err` of the
/// inner result is why it passes through.
///
/// Errors: [`RedirectError`] when an annotation or proxy setting does not parse.
pub fn redirect_for_pod(pod: &Pod) -> Result<Result<Redirect, Skip>, RedirectError> {
    match decide(pod) {
        Ok(meshed) => Redirect::from_pod(&meshed).map(Ok),
        Err(skip) => Ok(Err(skip)),
    }
}

/// [`redirect_for_pod`], then `build` of the redirect.
fn plan_with<R>(pod: &Pod, build: impl FnOnce(&Redirect) -> R) -> Result<Plan<R>, RedirectError> {
    Ok(match redirect_for_pod(pod)? {
        Ok(redirect) => Plan::Redirect(Box::new(build(&redirect))),
        Err(skip) => Plan::Skip(skip),
    })
}

/// A pod's rules with either backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rules {
    /// The iptables rules (the default).
    Iptables(Ruleset),
    /// The nftables transaction (`native_nftables`).
    Nftables(crate::rules::nftables::NftRuleset),
}

impl Rules {
    /// The rules of `redirect` with the chosen backend: nftables when `nftables`, else
    /// iptables; IPv6 rules with `ipv6` (or dual stack).
    pub fn build(redirect: &Redirect, ipv6: bool, nftables: bool) -> Rules {
        if nftables {
            Rules::Nftables(crate::rules::nftables::build(redirect, ipv6))
        } else {
            Rules::Iptables(iptables::build(redirect, ipv6))
        }
    }

    /// The proxy's UID (the probe connects as it).
    pub fn proxy_uid(&self) -> u32 {
        match self {
            Rules::Iptables(r) => r.proxy_uid,
            Rules::Nftables(r) => r.proxy_uid,
        }
    }

    /// Where the validation probe connects, if a loopback probe can pass.
    pub fn probe_port(&self) -> Option<u16> {
        match self {
            Rules::Iptables(r) => r.probe_port,
            Rules::Nftables(r) => r.probe_port,
        }
    }

    /// What the rules need besides themselves (see [`crate::routing`]).
    pub fn routing_needs(&self) -> crate::rules::RoutingNeeds {
        match self {
            Rules::Iptables(r) => r.routing_needs(),
            Rules::Nftables(r) => r.routing_needs(),
        }
    }
}

/// The in-pod rules of an ambient pod with pod-level `overrides`, on a node with `node`'s
/// settings, in the chosen backend: the `inet istio-ambient-*` nftables tables when
/// `nftables` (`NATIVE_NFTABLES`), else the iptables rules (upstream
/// `cni/pkg/iptables/iptables.go`, `AppendInpodRules`; `cni/pkg/nftables/`). Shared by the
/// agent's enrolment and its repair loop.
pub fn ambient_rules(
    node: &crate::rules::ambient::NodeSettings,
    overrides: &crate::rules::ambient::PodOverrides,
    nftables: bool,
) -> Rules {
    use crate::rules::ambient;
    if nftables {
        Rules::Nftables(ambient::nftables::build_inpod(node, overrides).ruleset())
    } else {
        Rules::Iptables(ambient::iptables::build_inpod(node, overrides).ruleset())
    }
}

/// [`plan_for_running_pod`] with the backend chosen: the nftables transaction when
/// `nftables` (the agent's `NATIVE_NFTABLES`), else the iptables rules.
///
/// Errors: [`RedirectError`] when an annotation or proxy setting does not parse.
pub fn plan_rules_for_running_pod(
    pod: &Pod,
    agent_namespace: &str,
    exclude_namespaces: &[String],
    nftables: bool,
) -> Result<Plan<Rules>, RedirectError> {
    if let Some(skip) = skip_running(pod, agent_namespace, exclude_namespaces) {
        return Ok(Plan::Skip(skip));
    }
    let ipv6 = iptables::has_ipv6(&running_pod_ips(pod));
    plan_with(pod, |r| Rules::build(r, ipv6, nftables))
}

/// [`plan_for_pod`] for the nftables backend (`native_nftables`): the same decision and
/// redirect, as one nftables transaction (`cni/pkg/plugin/sidecar_nftables_linux.go` maps a
/// pod to upstream's capture configuration exactly as the iptables path does).
///
/// Errors: [`RedirectError`] when an annotation or proxy setting does not parse.
pub fn plan_nft_for_pod(
    conf: &NetConf,
    pod: &Pod,
) -> Result<Plan<crate::rules::nftables::NftRuleset>, RedirectError> {
    plan_nft_for_pod_with_ips(pod, &pod_ips(conf.prev_result.as_ref()))
}

/// [`plan_nft_for_pod`] with the pod's addresses given (see [`plan_for_pod_with_ips`]).
///
/// Errors: [`RedirectError`] when an annotation or proxy setting does not parse.
pub fn plan_nft_for_pod_with_ips(
    pod: &Pod,
    pod_ips: &[IpAddr],
) -> Result<Plan<crate::rules::nftables::NftRuleset>, RedirectError> {
    plan_with(pod, |r| {
        crate::rules::nftables::build(r, iptables::has_ipv6(pod_ips))
    })
}

/// What ADD would program for a pod that is already running, as the node agent's repair
/// loop needs it: the whole decision (the agent's own pods in `agent_namespace` and pods in
/// `exclude_namespaces` pass through, then [`decide`]), with IPv6 rules when
/// `status.podIPs` holds an IPv6 address (ADD reads the same addresses from `prevResult`).
///
/// Errors: [`RedirectError`] when an annotation or proxy setting does not parse.
pub fn plan_for_running_pod(
    pod: &Pod,
    agent_namespace: &str,
    exclude_namespaces: &[String],
) -> Result<Plan, RedirectError> {
    if let Some(skip) = skip_running(pod, agent_namespace, exclude_namespaces) {
        return Ok(Plan::Skip(skip));
    }
    let ipv6 = iptables::has_ipv6(&running_pod_ips(pod));
    plan_with(pod, |r| iptables::build(r, ipv6))
}

/// What ADD decides from the pod's name alone: the agent's own pods and excluded
/// namespaces pass through.
fn skip_running(pod: &Pod, agent_namespace: &str, exclude_namespaces: &[String]) -> Option<Skip> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    skip_by_name(namespace, name, agent_namespace, |ns| {
        exclude_namespaces.iter().any(|e| e == ns)
    })
}

/// The addresses in a pod's `status.podIPs` (or `status.podIP`); unparsable entries are
/// left out.
pub fn running_pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    let ips: Vec<IpAddr> = listed.filter_map(|ip| ip.parse().ok()).collect();
    if ips.is_empty() {
        status
            .pod_ip
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect()
    } else {
        ips
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(namespace: &str, name: &str, ips: &[&str]) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "namespace": namespace,
                "name": name,
                "annotations": {"sidecar.istio.io/status": "{}"},
            },
            "spec": {"containers": [
                {"name": "app"},
                {"name": "istio-proxy", "args": ["proxy", "sidecar"]},
            ]},
            "status": {"podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()},
        }))
        .expect("pod")
    }

    fn families(plan: Plan) -> Vec<crate::rules::Family> {
        match plan {
            Plan::Redirect(r) => r.families.iter().map(|f| f.family).collect(),
            Plan::Skip(s) => panic!("skipped: {s}"),
        }
    }

    #[test]
    fn running_pod_gets_the_families_of_its_status_ips() {
        use crate::rules::Family::{V4, V6};
        let excluded = ["kube-system".to_owned()];
        let v4 = pod("default", "web", &["10.0.0.5"]);
        let dual = pod("default", "web", &["10.0.0.5", "fd00::5"]);
        assert_eq!(
            families(plan_for_running_pod(&v4, "istio-system", &excluded).unwrap()),
            [V4]
        );
        assert_eq!(
            families(plan_for_running_pod(&dual, "istio-system", &excluded).unwrap()),
            [V4, V6]
        );
    }

    #[test]
    fn running_pod_decision_includes_the_name_checks() {
        let excluded = ["kube-system".to_owned()];
        let system = pod("kube-system", "dns", &["10.0.0.5"]);
        let agent = pod("istio-system", "istio-cni-node-abcde", &["10.0.0.6"]);
        assert_eq!(
            plan_for_running_pod(&system, "istio-system", &excluded).unwrap(),
            Plan::Skip(Skip::ExcludedNamespace)
        );
        assert_eq!(
            plan_for_running_pod(&agent, "istio-system", &excluded).unwrap(),
            Plan::Skip(Skip::NodeAgent)
        );
    }
}
