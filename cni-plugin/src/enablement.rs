//! Which pods are in ambient mode: upstream Istio's enablement selectors
//! (`cni/pkg/util/enablement_selector.go`, `podutil.go`; the chart's
//! `ambient.enablementSelectors`, the netconf's `enablement_selectors`, the agent's
//! `AMBIENT_ENABLEMENT_SELECTOR`). Pure: the pod and its namespace's labels in, a decision
//! out; used by ADD (with `ambient_enabled`) and the node agent.
//!
//! A pod is ambient when one selector matches: its pod selector matches the pod's labels
//! and its namespace selector the namespace's labels. Each is a Kubernetes
//! `LabelSelector` with the API's semantics (apimachinery
//! `metav1.LabelSelectorAsSelector`): `matchLabels` and `matchExpressions` (`In`, `NotIn`,
//! `Exists`, `DoesNotExist`) all must hold, and an empty selector matches everything.
//! Never ambient, whatever the labels: a host-network pod (its netns is the node's) and a
//! pod with a sidecar (`sidecar.istio.io/status`; ztunnel and a sidecar for one pod is not
//! supported upstream either).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use serde::{Deserialize, Serialize};

/// The label upstream's default selectors read: `istio.io/dataplane-mode`.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The annotation that marks a pod with an injected sidecar (`sidecar.istio.io/status`).
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// One enablement selector, spelled as upstream's JSON (`podSelector`,
/// `namespaceSelector`); a missing selector is empty, which matches everything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnablementSelector {
    /// Must match the pod's labels.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    /// Must match the labels of the pod's namespace.
    #[serde(default)]
    pub namespace_selector: LabelSelector,
}

/// A selector that cannot be compiled; it names the selector and the requirement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ambient enablement selector {index} ({which}): {reason}")]
pub struct SelectorError {
    /// The selector's position in the list, from 0.
    pub index: usize,
    /// `podSelector` or `namespaceSelector`.
    pub which: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// One requirement of a compiled selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// A `LabelSelector`, compiled: every requirement must hold (none: matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Compiles `s` with the API's rules: `matchLabels` entries are `In` with one value;
    /// `In`/`NotIn` need values, `Exists`/`DoesNotExist` take none; keys are non-empty.
    ///
    /// Errors: the reason, as a string (the caller names the selector).
    pub fn compile(s: &LabelSelector) -> Result<Selector, String> {
        let mut requirements = Vec::new();
        for (k, v) in s.match_labels.iter().flatten() {
            if k.is_empty() {
                return Err("matchLabels has an empty key".into());
            }
            requirements.push(Requirement::In(k.clone(), vec![v.clone()]));
        }
        for LabelSelectorRequirement {
            key,
            operator,
            values,
        } in s.match_expressions.iter().flatten()
        {
            if key.is_empty() {
                return Err("a matchExpressions entry has an empty key".into());
            }
            let values = values.clone().unwrap_or_default();
            let requirement = match operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!("{key} {operator}: values must not be empty"))
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!("{key} {operator}: values must be empty"))
                }
                "In" => Requirement::In(key.clone(), values),
                "NotIn" => Requirement::NotIn(key.clone(), values),
                "Exists" => Requirement::Exists(key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(key.clone()),
                other => {
                    return Err(format!(
                        "{key}: {other:?} is not a valid operator (In, NotIn, Exists, DoesNotExist)"
                    ))
                }
            };
            requirements.push(requirement);
        }
        Ok(Selector { requirements })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector has no requirement (matches everything).
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// The compiled enablement selectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enablement {
    selectors: Vec<(Selector, Selector)>,
}

impl Enablement {
    /// Compiles `selectors`.
    ///
    /// Errors: [`SelectorError`] naming the first selector that does not compile.
    pub fn compile(selectors: &[EnablementSelector]) -> Result<Enablement, SelectorError> {
        let mut out = Vec::with_capacity(selectors.len());
        for (index, s) in selectors.iter().enumerate() {
            let err = |which, reason| SelectorError {
                index,
                which,
                reason,
            };
            let pod = Selector::compile(&s.pod_selector).map_err(|r| err("podSelector", r))?;
            let ns = Selector::compile(&s.namespace_selector)
                .map_err(|r| err("namespaceSelector", r))?;
            out.push((pod, ns));
        }
        Ok(Enablement { selectors: out })
    }

    /// Upstream's default (the chart's `ambient.enablementSelectors`): a pod labelled
    /// `istio.io/dataplane-mode=ambient`, or a pod in a namespace so labelled whose own
    /// label is not `none`.
    pub fn default_selectors() -> Vec<EnablementSelector> {
        let ambient = BTreeMap::from([(DATAPLANE_MODE_LABEL.to_owned(), "ambient".to_owned())]);
        vec![
            EnablementSelector {
                pod_selector: LabelSelector {
                    match_labels: Some(ambient.clone()),
                    match_expressions: None,
                },
                namespace_selector: LabelSelector::default(),
            },
            EnablementSelector {
                pod_selector: LabelSelector {
                    match_labels: None,
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: DATAPLANE_MODE_LABEL.to_owned(),
                        operator: "NotIn".to_owned(),
                        values: Some(vec!["none".to_owned()]),
                    }]),
                },
                namespace_selector: LabelSelector {
                    match_labels: Some(ambient),
                    match_expressions: None,
                },
            },
        ]
    }

    /// Whether `pod`, in a namespace labelled `namespace_labels`, is ambient (see the
    /// module docs; host-network and sidecar pods never are).
    pub fn matches(&self, pod: &Pod, namespace_labels: &BTreeMap<String, String>) -> bool {
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let sidecar = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION));
        if host_network || sidecar {
            return false;
        }
        let empty = BTreeMap::new();
        let pod_labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
        self.selectors
            .iter()
            .any(|(p, n)| p.matches(pod_labels) && n.matches(namespace_labels))
    }

    /// Whether a namespace's labels alone can enrol its pods: some selector with a
    /// non-empty namespace selector matches them. The agent watches namespaces for it.
    pub fn matches_namespace(&self, namespace_labels: &BTreeMap<String, String>) -> bool {
        self.selectors
            .iter()
            .any(|(_, n)| !n.is_empty() && n.matches(namespace_labels))
    }
}

impl Default for Enablement {
    fn default() -> Self {
        Enablement::compile(&Enablement::default_selectors())
            .expect("upstream's default selectors compile")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn upstreams_default_selectors() {
        let e = Enablement::default();
        let plain = pod(json!({"metadata": {"name": "p"}}));
        let labelled = pod(json!({"metadata": {"labels": {DATAPLANE_MODE_LABEL: "ambient"}}}));
        let opted_out = pod(json!({"metadata": {"labels": {DATAPLANE_MODE_LABEL: "none"}}}));
        let ns_ambient = labels(&[(DATAPLANE_MODE_LABEL, "ambient")]);
        let ns_plain = labels(&[("team", "a")]);
        assert!(e.matches(&labelled, &ns_plain), "the pod's own label");
        assert!(e.matches(&plain, &ns_ambient), "the namespace's label");
        assert!(!e.matches(&opted_out, &ns_ambient), "none opts a pod out");
        assert!(!e.matches(&plain, &ns_plain));
        assert!(e.matches_namespace(&ns_ambient) && !e.matches_namespace(&ns_plain));
        let host = pod(
            json!({"metadata": {"labels": {DATAPLANE_MODE_LABEL: "ambient"}},
                              "spec": {"hostNetwork": true, "containers": []}}),
        );
        assert!(!e.matches(&host, &ns_ambient), "host network: never");
        let sidecar = pod(json!({"metadata": {
            "labels": {DATAPLANE_MODE_LABEL: "ambient"},
            "annotations": {SIDECAR_STATUS_ANNOTATION: "{}"}}}));
        assert!(!e.matches(&sidecar, &ns_ambient), "a sidecar pod: never");
    }

    #[test]
    fn selectors_parse_from_upstreams_json_and_follow_the_apis_semantics() {
        let sel: Vec<EnablementSelector> = serde_json::from_value(json!([
            {"podSelector": {"matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["web", "api"]},
                {"key": "legacy", "operator": "DoesNotExist"}]},
             "namespaceSelector": {"matchExpressions": [
                {"key": "mesh", "operator": "Exists"}]}}
        ]))
        .unwrap();
        let e = Enablement::compile(&sel).unwrap();
        let p = |l: serde_json::Value| pod(json!({"metadata": {"labels": l}}));
        let mesh = labels(&[("mesh", "")]);
        assert!(e.matches(&p(json!({"tier": "web"})), &mesh));
        assert!(!e.matches(&p(json!({"tier": "db"})), &mesh));
        assert!(!e.matches(&p(json!({"tier": "web", "legacy": "1"})), &mesh));
        assert!(!e.matches(&p(json!({"tier": "web"})), &BTreeMap::new()));
        // An empty list enrols nothing; an empty selector matches everything.
        assert!(!Enablement::compile(&[])
            .unwrap()
            .matches(&p(json!({})), &mesh));
        assert!(Enablement::compile(&[EnablementSelector::default()])
            .unwrap()
            .matches(&p(json!({})), &BTreeMap::new()));
    }

    #[test]
    fn bad_selectors_are_named() {
        for (expr, needle) in [
            (
                json!({"key": "a", "operator": "Equals", "values": ["x"]}),
                "not a valid operator",
            ),
            (
                json!({"key": "a", "operator": "In", "values": []}),
                "must not be empty",
            ),
            (
                json!({"key": "a", "operator": "Exists", "values": ["x"]}),
                "must be empty",
            ),
            (json!({"key": "", "operator": "Exists"}), "empty key"),
        ] {
            let sel: Vec<EnablementSelector> = serde_json::from_value(json!([
                {"podSelector": {}},
                {"namespaceSelector": {"matchExpressions": [expr]}}
            ]))
            .unwrap();
            let e = Enablement::compile(&sel).unwrap_err();
            assert_eq!((e.index, e.which), (1, "namespaceSelector"), "{e}");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }
}
