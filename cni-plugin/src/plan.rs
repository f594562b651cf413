//! From a pod read from the API to what ADD will program: the decision, the redirect and
//! the ruleset. Shared by ADD, CHECK, `istio-cni render` and the conformance tests, so
//! that they cannot drift apart.

use k8s_openapi::api::core::v1::Pod;

use crate::cni::result::pod_ips;
use crate::config::NetConf;
use crate::pod::{decide, Skip};
use crate::redirect::{Redirect, RedirectError};
use crate::rules::{iptables, Ruleset};

/// What ADD does for a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Pass through: the pod gets no rules, for this reason.
    Skip(Skip),
    /// Program this ruleset.
    Redirect(Box<Ruleset>),
}

/// Decides for `pod` and builds its ruleset. IPv6 rules are added when the `prevResult` in
/// `conf` gives the pod an IPv6 address (or the proxy asks for dual stack).
///
/// Errors: [`RedirectError`] when an annotation or proxy setting does not parse.
pub fn plan_for_pod(conf: &NetConf, pod: &Pod) -> Result<Plan, RedirectError> {
    let meshed = match decide(pod) {
        Ok(m) => m,
        Err(skip) => return Ok(Plan::Skip(skip)),
    };
    let redirect = Redirect::from_pod(&meshed)?;
    let ipv6 = iptables::has_ipv6(&pod_ips(conf.prev_result.as_ref()));
    Ok(Plan::Redirect(Box::new(iptables::build(&redirect, ipv6))))
}
