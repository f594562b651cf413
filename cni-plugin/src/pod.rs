//! Which pods get rules: the decision, and the pod lookup through the Kubernetes API.
//!
//! The decision follows upstream Istio's `istio-cni` plugin (`cni/pkg/plugin/plugin.go`),
//! in this order: no Kubernetes pod args → pass; the node agent's own pod → pass (before
//! any API call, so a rebooted node cannot deadlock); excluded namespace → pass; then the
//! pod is read from the API (bounded retries, failing closed with CNI code 11) and checked
//! for a sidecar ([`decide`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Namespace, Pod};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::cni::CniArgs;
use crate::config::NetConf;

/// Name of the sidecar container.
pub const ISTIO_PROXY: &str = "istio-proxy";
/// Name of the init container of non-CNI injection; its presence means "not ours".
pub const ISTIO_INIT: &str = "istio-init";
/// Pod name prefix of the node agent (DaemonSet `istio-cni-node`).
pub const NODE_AGENT_PREFIX: &str = "istio-cni-node-";
/// Annotation and label: `sidecar.istio.io/inject`; false excludes the pod. The label wins.
pub const INJECT_KEY: &str = "sidecar.istio.io/inject";
/// Annotation written by the injector; without it the pod was not injected.
pub const STATUS_KEY: &str = "sidecar.istio.io/status";
/// Proxy env var that turns the proxy off.
pub const ENV_DISABLE_ENVOY: &str = "DISABLE_ENVOY";

pub use crate::cni::env::{ARG_POD_NAME, ARG_POD_NAMESPACE, ARG_POD_UID};

/// Go's `strconv.ParseBool`, which upstream uses for boolean annotations, labels and the
/// proxy's env vars: `1 t T TRUE true True` / `0 f F FALSE false False`; anything else is
/// `None`, for the caller to refuse or ignore as upstream does.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Largest pod the plugin reads, from the API or `local_pod_file`, in bytes. A real Pod is
/// a few KiB to a few hundred KiB (the API server's own request limit is 3 MiB,
/// `--max-request-bytes` of etcd at 1.5 MiB per object by default); a longer answer is
/// not a Pod, and reading it would only grow memory on the node.
pub const MAX_POD_BYTES: usize = 4 << 20;

/// Namespace, name and (when the runtime passes it) UID of the pod being set up, from
/// `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID`, when given.
    pub uid: Option<String>,
}

impl PodRef {
    /// Checks that `pod` is the pod asked for: same namespace and name, and the same UID
    /// when `K8S_POD_UID` was given. A pod recreated under the same name has a new UID; a
    /// proxy or server answering for another object is a fault. Either way the answer
    /// must not decide this sandbox's rules.
    ///
    /// Errors: [`LookupError::WrongPod`].
    pub fn check(&self, pod: &Pod) -> Result<(), LookupError> {
        let meta = &pod.metadata;
        let got_ns = meta.namespace.as_deref().unwrap_or_default();
        let got_name = meta.name.as_deref().unwrap_or_default();
        let got_uid = meta.uid.as_deref();
        let uid_ok = self.uid.as_deref().is_none_or(|want| got_uid == Some(want));
        if got_ns == self.namespace && got_name == self.name && uid_ok {
            return Ok(());
        }
        Err(LookupError::WrongPod {
            pod: self.clone(),
            got: format!(
                "{got_ns:?}/{got_name:?} uid {:?}",
                got_uid.unwrap_or_default()
            ),
        })
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a pod gets no rules. Each is a normal outcome: ADD passes the result through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// `K8S_POD_NAME` or `K8S_POD_NAMESPACE` is missing: not a Kubernetes pod.
    NotKubernetes,
    /// The pod is the node agent itself.
    NodeAgent,
    /// The namespace is listed in `exclude_namespaces`.
    ExcludedNamespace,
    /// The pod has an `istio-init` init container: the rules come from there.
    HasIstioInit,
    /// No `istio-proxy` container (among containers or init containers).
    NoSidecar,
    /// `istio-proxy` runs `proxy <type>` with a type other than `sidecar`.
    NotSidecarProxy(String),
    /// `istio-proxy` has `DISABLE_ENVOY=true`.
    EnvoyDisabled,
    /// Label or annotation `sidecar.istio.io/inject` is false.
    InjectionDisabled,
    /// Annotation `sidecar.istio.io/status` is absent: the injector did not run.
    NotInjected,
    /// `spec.hostNetwork` is true: the pod shares the node's netns, which never gets
    /// rules (kubelet does not call CNI for such pods, so a call is a mistake somewhere).
    HostNetwork,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::NotKubernetes => write!(f, "no K8S_POD_NAME/K8S_POD_NAMESPACE in CNI_ARGS"),
            Skip::NodeAgent => write!(f, "the pod is the istio-cni node agent"),
            Skip::ExcludedNamespace => write!(f, "the namespace is in exclude_namespaces"),
            Skip::HasIstioInit => write!(f, "the pod has an {ISTIO_INIT} init container"),
            Skip::NoSidecar => write!(f, "the pod has no {ISTIO_PROXY} container"),
            Skip::NotSidecarProxy(t) => write!(f, "{ISTIO_PROXY} runs proxy type {t:?}"),
            Skip::EnvoyDisabled => write!(f, "{ISTIO_PROXY} has {ENV_DISABLE_ENVOY}=true"),
            Skip::InjectionDisabled => write!(f, "{INJECT_KEY} is false"),
            Skip::NotInjected => write!(f, "annotation {STATUS_KEY} is absent"),
            Skip::HostNetwork => write!(f, "the pod uses the host network (spec.hostNetwork)"),
        }
    }
}

/// What the redirect needs from a pod that is in the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshedPod {
    /// All pod annotations.
    pub annotations: BTreeMap<String, String>,
    /// `istio-proxy` `securityContext.runAsUser`.
    pub proxy_uid: Option<i64>,
    /// `istio-proxy` `securityContext.runAsGroup`.
    pub proxy_gid: Option<i64>,
    /// `istio-proxy` env vars with literal values (`valueFrom` entries are left out).
    pub proxy_env: BTreeMap<String, String>,
}

/// The checks that need no API call (decision steps 1 to 3).
///
/// Returns the pod to look up, or why the pod passes through.
pub fn pre_api(conf: &NetConf, args: &CniArgs) -> Result<PodRef, Skip> {
    let (Some(name), Some(namespace)) = (args.get(ARG_POD_NAME), args.get(ARG_POD_NAMESPACE))
    else {
        return Err(Skip::NotKubernetes);
    };
    if let Some(skip) = skip_by_name(namespace, name, &conf.pod_namespace, |ns| {
        conf.is_excluded(ns)
    }) {
        return Err(skip);
    }
    Ok(PodRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: args.get(ARG_POD_UID).map(str::to_owned),
    })
}

/// Decision steps 2 and 3, from the pod's namespace and name alone: the node agent's own
/// pods (named `istio-cni-node-*` in `agent_namespace`) and pods in a namespace for which
/// `excluded` is true pass through. Shared by ADD and the node agent's repair loop.
pub fn skip_by_name(
    namespace: &str,
    name: &str,
    agent_namespace: &str,
    excluded: impl Fn(&str) -> bool,
) -> Option<Skip> {
    if namespace == agent_namespace && name.starts_with(NODE_AGENT_PREFIX) {
        Some(Skip::NodeAgent)
    } else if excluded(namespace) {
        Some(Skip::ExcludedNamespace)
    } else {
        None
    }
}

/// Decision step 5: whether a pod read from the API gets sidecar rules. A host-network
/// pod never does, whatever its annotations.
pub fn decide(pod: &Pod) -> Result<MeshedPod, Skip> {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Err(Skip::HostNetwork);
    }
    let init = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or(&[]);
    let main = spec.map(|s| s.containers.as_slice()).unwrap_or(&[]);
    if init.iter().any(|c| c.name == ISTIO_INIT) {
        return Err(Skip::HasIstioInit);
    }
    // Native sidecars are init containers; look there first, as upstream does.
    let proxy = init
        .iter()
        .chain(main)
        .find(|c| c.name == ISTIO_PROXY)
        .ok_or(Skip::NoSidecar)?;
    if let [first, kind, ..] = proxy.args.as_deref().unwrap_or(&[]) {
        if first == "proxy" && kind != "sidecar" {
            return Err(Skip::NotSidecarProxy(kind.clone()));
        }
    }
    let proxy_env = literal_env(proxy);
    if proxy_env
        .get(ENV_DISABLE_ENVOY)
        .and_then(|v| parse_go_bool(v))
        .unwrap_or(false)
    {
        return Err(Skip::EnvoyDisabled);
    }
    let meta = &pod.metadata;
    let annotations: BTreeMap<String, String> = meta.annotations.clone().unwrap_or_default();
    let inject = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_KEY))
        .or_else(|| annotations.get(INJECT_KEY));
    if inject.and_then(|v| parse_go_bool(v)) == Some(false) {
        return Err(Skip::InjectionDisabled);
    }
    if !annotations.contains_key(STATUS_KEY) {
        return Err(Skip::NotInjected);
    }
    let sc = proxy.security_context.as_ref();
    Ok(MeshedPod {
        annotations,
        proxy_uid: sc.and_then(|s| s.run_as_user),
        proxy_gid: sc.and_then(|s| s.run_as_group),
        proxy_env,
    })
}

fn literal_env(c: &Container) -> BTreeMap<String, String> {
    c.env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}

/// Why the pod could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The kubeconfig is missing or unusable; the node agent writes it. Retryable (code 11).
    #[error("cannot use kubeconfig {path}: {reason} (the istio-cni node agent writes it; is it running on this node?)")]
    Kubeconfig {
        /// The kubeconfig path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The API server did not answer in time or kept failing. Retryable (code 11).
    #[error("Kubernetes API unreachable for {elapsed:?} while reading pod {pod} ({attempts} attempts): {last}")]
    Unreachable {
        /// The pod.
        pod: PodRef,
        /// Time spent, retries included.
        elapsed: Duration,
        /// Number of GETs sent.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The API answered with a definite error: not found, forbidden, … (code 100).
    #[error("reading pod {pod} from the Kubernetes API failed: {status}")]
    Rejected {
        /// The pod.
        pod: PodRef,
        /// The API status (code and message).
        status: String,
    },
    /// The answer is a different pod than the one asked for (code 100).
    #[error("the pod read for {pod} is another pod: {got}; refusing to decide its rules from it")]
    WrongPod {
        /// The pod asked for.
        pod: PodRef,
        /// Namespace, name and UID of what came back.
        got: String,
    },
    /// The local pod file cannot be read or is not a Pod (code 100).
    #[error("local pod file {path}: {reason}")]
    LocalFile {
        /// The file (`local_pod_file`).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Where the pod comes from.
#[derive(Debug, Clone, Copy)]
pub enum PodSource<'a> {
    /// The Kubernetes API, through the kubeconfig, within a total deadline ([`lookup`]).
    Api {
        /// The kubeconfig path.
        kubeconfig: &'a Path,
        /// Total deadline, retries included.
        deadline: Duration,
    },
    /// A Pod JSON file (netconf `local_pod_file`): the node agent's self-test, which must
    /// not depend on cluster state. No API call is made.
    File(&'a Path),
}

impl<'a> PodSource<'a> {
    /// Where ADD and CHECK read the pod from, by the netconf: `local_pod_file` if set,
    /// else the API through `kubernetes.kubeconfig` within `kubernetes.api_timeout_ms`.
    pub fn of(conf: &'a NetConf) -> PodSource<'a> {
        match &conf.local_pod_file {
            Some(path) => PodSource::File(path),
            None => PodSource::Api {
                kubeconfig: conf.kubeconfig(),
                deadline: conf.api_timeout,
            },
        }
    }

    /// Reads the pod `pod` and checks that the answer is that pod ([`PodRef::check`]).
    /// At most [`MAX_POD_BYTES`] are read.
    ///
    /// Errors: see [`LookupError`].
    pub fn fetch(&self, pod: &PodRef) -> Result<Pod, LookupError> {
        let got = match *self {
            PodSource::Api {
                kubeconfig,
                deadline,
            } => lookup(kubeconfig, pod, deadline)?,
            PodSource::File(path) => {
                let err = |reason: String| LookupError::LocalFile {
                    path: path.into(),
                    reason,
                };
                let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(file, MAX_POD_BYTES as u64 + 1),
                    &mut bytes,
                )
                .map_err(|e| err(e.to_string()))?;
                if bytes.len() > MAX_POD_BYTES {
                    return Err(err(format!("larger than {MAX_POD_BYTES} bytes")));
                }
                serde_json::from_slice(&bytes).map_err(|e| err(format!("not a Pod: {e}")))?
            }
        };
        pod.check(&got)?;
        Ok(got)
    }

    /// Reads the pod as [`PodSource::fetch`] does, and the labels of its namespace: from
    /// the API ([`lookup_with_namespace`]), or none with a local pod file (the self-test's
    /// pod is enrolled by its own labels, if ever).
    ///
    /// Errors: see [`LookupError`].
    pub fn fetch_with_namespace(
        &self,
        pod: &PodRef,
    ) -> Result<(Pod, BTreeMap<String, String>), LookupError> {
        let (got, labels) = match *self {
            PodSource::Api {
                kubeconfig,
                deadline,
            } => lookup_with_namespace(kubeconfig, pod, deadline)?,
            PodSource::File(_) => return Ok((self.fetch(pod)?, BTreeMap::new())),
        };
        pod.check(&got)?;
        Ok((got, labels))
    }
}

/// Reads the pod through the kubeconfig, retrying transient failures (connection errors,
/// timeouts, 429, 5xx, 401 while the token rotates) with exponential backoff from 50 ms to
/// 1 s, until `deadline` has passed in total.
///
/// Errors: see [`LookupError`]. A missing pod is [`LookupError::Rejected`]; the plugin fails
/// closed and never treats an unreadable pod as "not meshed".
pub fn lookup(kubeconfig: &Path, pod: &PodRef, deadline: Duration) -> Result<Pod, LookupError> {
    Ok(lookup_objects(kubeconfig, pod, deadline, false)?.0)
}

/// Reads the pod and then its namespace (`GET /api/v1/namespaces/{ns}`, for the ambient
/// decision, as upstream's plugin does in `isAmbientPod`), both within `deadline` in
/// total, with [`lookup`]'s retries. Returns the pod and the namespace's labels.
///
/// Errors: see [`LookupError`]; a namespace that cannot be read fails the lookup (its
/// status says "namespace …"), since without its labels the pod's mode is unknown.
pub fn lookup_with_namespace(
    kubeconfig: &Path,
    pod: &PodRef,
    deadline: Duration,
) -> Result<(Pod, BTreeMap<String, String>), LookupError> {
    let (pod, ns) = lookup_objects(kubeconfig, pod, deadline, true)?;
    let labels = ns.and_then(|n| n.metadata.labels).unwrap_or_default();
    Ok((pod, labels))
}

fn lookup_objects(
    kubeconfig: &Path,
    pod: &PodRef,
    deadline: Duration,
    with_namespace: bool,
) -> Result<(Pod, Option<Namespace>), LookupError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LookupError::Kubeconfig {
            path: kubeconfig.into(),
            reason: format!("cannot start the async runtime: {e}"),
        })?;
    rt.block_on(async {
        let start = Instant::now();
        let client = client(kubeconfig, deadline).await?;
        log::debug!("API client set up in {:?}", start.elapsed());
        let pod_url = format!("/api/v1/namespaces/{}/pods", pod.namespace);
        let got: Pod = get_retrying(&client, pod, start, deadline, &pod_url, &pod.name, "").await?;
        if !with_namespace {
            return Ok((got, None));
        }
        let ns: Namespace = get_retrying(
            &client,
            pod,
            start,
            deadline,
            "/api/v1/namespaces",
            &pod.namespace,
            "its namespace: ",
        )
        .await?;
        Ok((got, Some(ns)))
    })
}

/// `GET {collection}/{name}` with retries until `deadline` after `start`; failures are
/// reported for `pod`, their text prefixed with `what`.
async fn get_retrying<T: serde::de::DeserializeOwned>(
    client: &kube::Client,
    pod: &PodRef,
    start: Instant,
    deadline: Duration,
    collection: &str,
    name: &str,
    what: &str,
) -> Result<T, LookupError> {
    let mut backoff = Duration::from_millis(50);
    let mut attempts = 0;
    // The most telling failure so far: a timeout at the deadline does not hide the 500s
    // before it.
    let mut cause: Option<String> = None;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_sub(start.elapsed());
        let failure =
            match tokio::time::timeout(remaining, get_object(client, collection, name)).await {
                Ok(Ok(p)) => return Ok(p),
                Ok(Err(Attempt::Rejected(status))) => {
                    return Err(LookupError::Rejected {
                        pod: pod.clone(),
                        status: format!("{what}{status}"),
                    })
                }
                Ok(Err(Attempt::Retry(e))) => {
                    cause = Some(e.clone());
                    format!("{what}{e}")
                }
                Err(_) => match &cause {
                    Some(c) => format!("{what}request timed out; before that: {c}"),
                    None => format!("{what}request timed out"),
                },
            };
        log::debug!("GET {collection}/{name} attempt {attempts} failed: {failure}");
        let remaining = deadline.saturating_sub(start.elapsed());
        if remaining.is_zero() {
            return Err(LookupError::Unreachable {
                pod: pod.clone(),
                elapsed: start.elapsed(),
                attempts,
                last: failure,
            });
        }
        tokio::time::sleep(backoff.min(remaining)).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// How one GET failed.
enum Attempt {
    /// A definite answer (404, 403, a body that is not a Pod, …): do not retry.
    Rejected(String),
    /// Worth another try (connection error, 401, 429, 5xx).
    Retry(String),
}

/// One `GET {collection}/{name}` (a pod, a namespace), reading at most [`MAX_POD_BYTES`]
/// of the body. Error bodies are `metav1.Status` objects; their message is kept.
async fn get_object<T: serde::de::DeserializeOwned>(
    client: &kube::Client,
    collection: &str,
    name: &str,
) -> Result<T, Attempt> {
    use http_body_util::BodyExt as _;
    let request = kube::core::Request::new(collection)
        .get(name, &kube::api::GetParams::default())
        .map_err(|e| Attempt::Rejected(e.to_string()))?;
    let response = client
        .send(request.map(kube::client::Body::from))
        .await
        .map_err(|e| Attempt::Retry(e.to_string()))?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), MAX_POD_BYTES)
        .collect()
        .await
        .map_err(|e| {
            let e = if e.is::<http_body_util::LengthLimitError>() {
                format!("the answer is larger than {MAX_POD_BYTES} bytes")
            } else {
                format!("reading the answer: {e}")
            };
            if status.is_success() {
                Attempt::Rejected(e)
            } else {
                Attempt::Retry(format!("{status}: {e}"))
            }
        })?
        .to_bytes();
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|e| {
            Attempt::Rejected(format!("the answer is not the object asked for: {e}"))
        });
    }
    let detail = match serde_json::from_slice::<kube::core::Status>(&body) {
        Ok(s) => format!("{} {}: {}", status.as_u16(), s.reason, s.message),
        Err(_) => format!(
            "{status}: {}",
            String::from_utf8_lossy(body.get(..512).unwrap_or(&body)).trim()
        ),
    };
    if is_retryable(status.as_u16()) {
        Err(Attempt::Retry(detail))
    } else {
        Err(Attempt::Rejected(detail))
    }
}

fn is_retryable(code: u16) -> bool {
    code == 401 || code == 429 || code >= 500
}

async fn client(path: &Path, deadline: Duration) -> Result<kube::Client, LookupError> {
    let err = |reason: String| LookupError::Kubeconfig {
        path: path.into(),
        reason,
    };
    let kc = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    let per_request = deadline.min(Duration::from_secs(10));
    config.connect_timeout = Some(per_request);
    config.read_timeout = Some(per_request);
    config.write_timeout = Some(per_request);
    kube::Client::try_from(config).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf() -> NetConf {
        NetConf::parse(br#"{"cniVersion":"1.0.0","exclude_namespaces":["kube-system"],"pod_namespace":"istio-system"}"#).unwrap()
    }

    fn args(s: &str) -> CniArgs {
        CniArgs::parse(s).unwrap()
    }

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn injected(extra_meta: serde_json::Value, proxy: serde_json::Value) -> Pod {
        let mut meta = json!({"name": "p", "namespace": "default",
            "annotations": {"sidecar.istio.io/status": "{}"}});
        for (k, v) in extra_meta.as_object().unwrap() {
            meta[k] = v.clone();
        }
        let mut proxy_c = json!({"name": "istio-proxy", "args": ["proxy", "sidecar"]});
        for (k, v) in proxy.as_object().unwrap() {
            proxy_c[k] = v.clone();
        }
        pod(json!({"metadata": meta, "spec": {"containers": [{"name": "app"}, proxy_c]}}))
    }

    #[test]
    fn pre_api_steps_in_order() {
        let c = conf();
        assert_eq!(
            pre_api(&c, &args("K8S_POD_NAME=x")),
            Err(Skip::NotKubernetes)
        );
        assert_eq!(
            pre_api(
                &c,
                &args("K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=istio-cni-node-abcde")
            ),
            Err(Skip::NodeAgent)
        );
        assert_eq!(
            pre_api(
                &c,
                &args("K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns")
            ),
            Err(Skip::ExcludedNamespace)
        );
        let r = pre_api(
            &c,
            &args("K8S_POD_NAME=istio-cni-node-x;K8S_POD_NAMESPACE=default"),
        );
        assert_eq!(r.unwrap().to_string(), "default/istio-cni-node-x");
    }

    #[test]
    fn meshed_pod_settings() {
        let p = injected(
            json!({}),
            json!({"env": [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"},
                           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                   "securityContext": {"runAsUser": 1000, "runAsGroup": 2000}}),
        );
        let m = decide(&p).unwrap();
        assert_eq!((m.proxy_uid, m.proxy_gid), (Some(1000), Some(2000)));
        assert_eq!(m.proxy_env.len(), 1);
        assert!(m.annotations.contains_key(STATUS_KEY));
    }

    #[test]
    fn skip_reasons() {
        let no_status = pod(json!({"metadata": {"name": "p"},
            "spec": {"containers": [{"name": "istio-proxy"}]}}));
        assert_eq!(decide(&no_status), Err(Skip::NotInjected));
        let plain =
            pod(json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}}));
        assert_eq!(decide(&plain), Err(Skip::NoSidecar));
        let gw = injected(json!({}), json!({"args": ["proxy", "router"]}));
        assert_eq!(decide(&gw), Err(Skip::NotSidecarProxy("router".into())));
        let off = injected(
            json!({}),
            json!({"env": [{"name": "DISABLE_ENVOY", "value": "true"}]}),
        );
        assert_eq!(decide(&off), Err(Skip::EnvoyDisabled));
        let label_off = injected(
            json!({"labels": {"sidecar.istio.io/inject": "false"},
                   "annotations": {"sidecar.istio.io/status": "{}", "sidecar.istio.io/inject": "true"}}),
            json!({}),
        );
        assert_eq!(decide(&label_off), Err(Skip::InjectionDisabled));
        let ann_off = injected(
            json!({"annotations": {"sidecar.istio.io/status": "{}", "sidecar.istio.io/inject": "f"}}),
            json!({}),
        );
        assert_eq!(decide(&ann_off), Err(Skip::InjectionDisabled));
        let garbage = injected(
            json!({"annotations": {"sidecar.istio.io/status": "{}", "sidecar.istio.io/inject": "maybe"}}),
            json!({}),
        );
        assert!(
            decide(&garbage).is_ok(),
            "an unparsable inject value does not exclude"
        );
        let mut init = injected(json!({}), json!({}));
        init.spec.as_mut().unwrap().init_containers =
            Some(vec![
                serde_json::from_value(json!({"name": "istio-init"})).unwrap()
            ]);
        assert_eq!(decide(&init), Err(Skip::HasIstioInit));
        let mut host = injected(json!({}), json!({}));
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(decide(&host), Err(Skip::HostNetwork));
    }

    #[test]
    fn the_answer_must_be_the_pod_asked_for() {
        let want = PodRef {
            namespace: "default".into(),
            name: "p".into(),
            uid: Some("u1".into()),
        };
        let mut got = injected(json!({"uid": "u1"}), json!({}));
        assert!(want.check(&got).is_ok());
        got.metadata.name = Some("other".into());
        let e = want.check(&got).unwrap_err();
        assert!(e.to_string().contains("\"other\""), "{e}");
        let got = injected(json!({"uid": "u2"}), json!({}));
        assert!(matches!(
            want.check(&got),
            Err(LookupError::WrongPod { .. })
        ));
        let no_uid = PodRef { uid: None, ..want };
        assert!(no_uid.check(&got).is_ok());
    }

    #[test]
    fn native_sidecar_in_init_containers() {
        let p = pod(
            json!({"metadata": {"name": "p", "annotations": {"sidecar.istio.io/status": "{}"}},
            "spec": {"initContainers": [{"name": "istio-proxy", "restartPolicy": "Always",
                                          "args": ["proxy", "sidecar"]}],
                     "containers": [{"name": "app"}]}}),
        );
        assert!(decide(&p).is_ok());
    }
}
