//! A pod template (a rendered DaemonSet's `spec.template`) run as kubelet runs it, through
//! containerd's CRI: the sandbox and container configs kubelet would send, built from the
//! template's JSON without interpretation by the code under test.
//!
//! What kubelet does and where (kubernetes/kubernetes, `pkg/kubelet`):
//! - `kuberuntime/kuberuntime_sandbox.go` `generatePodSandboxConfig`, and
//!   `kuberuntime/util.go` `namespacesForPod`: network `NODE` with `hostNetwork`, PID
//!   `CONTAINER` unless `hostPID`/`shareProcessNamespace`, IPC `POD`.
//! - `kuberuntime/kuberuntime_container.go` `generateContainerConfig`: `command` and `args`
//!   as given (the runtime falls back on the image's entry point and cmd), env, mounts,
//!   `log_path` `<container>/<attempt>.log` below the sandbox's log dir.
//! - `kubelet_pods.go` `makeEnvironmentVariables`: the service variables
//!   (`KUBERNETES_SERVICE_HOST`, `_PORT`), then `envFrom` (ConfigMap data), then `env`,
//!   later ones winning; `fieldRef` resolved from the pod (`metadata.name`,
//!   `metadata.namespace`, `spec.nodeName`).
//! - `kubelet_pods.go` `makeMounts`: each `volumeMount` of a `hostPath` (the node's path,
//!   created first by the hostPath volume plugin, `pkg/volume/hostpath`, when its type is
//!   `DirectoryOrCreate`) or `emptyDir` (a dir of the pod's), `readOnly`, and
//!   `mountPropagation` (`HostToContainer` → rslave, `Bidirectional` → rshared); plus the
//!   service-account token volume at `/var/run/secrets/kubernetes.io/serviceaccount`
//!   (`token`, `ca.crt`, `namespace`, read-only), which admission adds to every pod.
//! - `kuberuntime/security_context.go` `determineEffectiveSecurityContext`: capabilities
//!   `add`/`drop` as written, `privileged`, `runAsUser`/`runAsGroup`,
//!   `readOnlyRootFilesystem`, and `seccompProfile` `RuntimeDefault`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use k8s_cri::v1::{
    security_profile::ProfileType, Capability, ContainerConfig, ContainerMetadata, ImageSpec,
    Int64Value, KeyValue, LinuxContainerConfig, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, MountPropagation, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, SecurityProfile,
};
use serde_json::Value;

/// Where the service account volume is mounted in every container.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The pod kubelet runs from the template: what the API server and the scheduler filled in.
#[derive(Debug, Clone)]
pub struct PodIdentity {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name` (the DaemonSet controller's `<daemonset>-<suffix>`).
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.nodeName`.
    pub node_name: String,
}

/// kubelet's view of the node and cluster for one pod: where its dirs go, the ConfigMaps
/// it may read, the service variables, and the service account's files.
pub struct Kubelet {
    /// The root of the node whose paths `hostPath` volumes name, as this machine reaches
    /// it ([`crate::node::Node::path`] of `/`).
    pub node_root: PathBuf,
    /// kubelet's root dir on this machine (pods' `emptyDir` volumes, service account
    /// files, logs); visible in the node (not under a path the node replaces).
    pub root: PathBuf,
    /// ConfigMaps by name: their data.
    pub config_maps: HashMap<String, HashMap<String, String>>,
    /// The `kubernetes` service's address, as `KUBERNETES_SERVICE_HOST` and `_PORT`.
    pub service: (String, u16),
    /// Variables the test adds after the template's (each named in the test).
    pub extra_env: Vec<(String, String)>,
    /// The service account's token and CA, as the token volume projects them.
    pub token: String,
    /// See [`Kubelet::token`].
    pub ca_pem: String,
}

impl Kubelet {
    fn on_node(&self, path: &str) -> PathBuf {
        crate::node::resolve_in(&self.node_root, Path::new(path))
    }

    /// The sandbox config for `template` (a pod template's JSON).
    pub fn sandbox_config(&self, pod: &PodIdentity, template: &Value) -> PodSandboxConfig {
        let spec = &template["spec"];
        let flag = |k: &str| spec[k].as_bool().unwrap_or(false);
        let labels = string_map(&template["metadata"]["labels"]);
        let annotations = string_map(&template["metadata"]["annotations"]);
        let log_dir = self.pod_dir(pod).join("logs");
        std::fs::create_dir_all(&log_dir).expect("pod log dir");
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            hostname: if flag("hostNetwork") {
                String::new()
            } else {
                pod.name.clone()
            },
            log_directory: log_dir.display().to_string(),
            labels,
            annotations,
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces(spec)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The config of `template`'s container `name`, its hostPath dirs created on the
    /// node as the volume plugin does and its `emptyDir`s and service account files
    /// written below [`Kubelet::root`].
    ///
    /// Panics when the template names a volume it does not define, a ConfigMap this
    /// kubelet does not have, or a volume kind this kubelet does not know.
    pub fn container_config(
        &self,
        pod: &PodIdentity,
        template: &Value,
        name: &str,
    ) -> ContainerConfig {
        let spec = &template["spec"];
        let c = spec["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name} in the template"));
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|s| s.as_str().expect("a string").to_owned())
                .collect()
        };
        let sc = &c["securityContext"];
        let security_context = LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                add_capabilities: strings(&sc["capabilities"]["add"]),
                drop_capabilities: strings(&sc["capabilities"]["drop"]),
                ..Default::default()
            }),
            privileged: sc["privileged"].as_bool().unwrap_or(false),
            namespace_options: Some(namespaces(spec)),
            run_as_user: sc["runAsUser"].as_i64().map(|value| Int64Value { value }),
            run_as_group: sc["runAsGroup"].as_i64().map(|value| Int64Value { value }),
            readonly_rootfs: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
            seccomp: match sc["seccompProfile"]["type"].as_str() {
                Some("RuntimeDefault") => Some(SecurityProfile {
                    profile_type: ProfileType::RuntimeDefault as i32,
                    ..Default::default()
                }),
                None | Some("Unconfined") => None,
                Some(other) => panic!("seccomp profile {other} is not supported here"),
            },
            ..Default::default()
        };
        let log_path = format!("{name}/0.log");
        std::fs::create_dir_all(self.pod_dir(pod).join("logs").join(name)).expect("log dir");
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: c["image"].as_str().expect("image").into(),
                ..Default::default()
            }),
            command: strings(&c["command"]),
            args: strings(&c["args"]),
            envs: self.env(pod, c),
            mounts: self.mounts(pod, spec, c),
            log_path,
            linux: Some(LinuxContainerConfig {
                security_context: Some(security_context),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod_dir(&self, pod: &PodIdentity) -> PathBuf {
        self.root.join("pods").join(&pod.uid)
    }

    fn env(&self, pod: &PodIdentity, c: &Value) -> Vec<KeyValue> {
        let mut env: Vec<(String, String)> = vec![
            ("KUBERNETES_SERVICE_HOST".into(), self.service.0.clone()),
            ("KUBERNETES_SERVICE_PORT".into(), self.service.1.to_string()),
        ];
        for from in c["envFrom"].as_array().into_iter().flatten() {
            let name = from["configMapRef"]["name"]
                .as_str()
                .expect("envFrom: only configMapRef is supported here");
            let data = self
                .config_maps
                .get(name)
                .unwrap_or_else(|| panic!("no ConfigMap {name}"));
            let mut keys: Vec<_> = data.iter().collect();
            keys.sort();
            env.extend(keys.into_iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().expect("env name").to_owned();
            let value = match (
                &e["value"],
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (_, Some("metadata.name")) => pod.name.clone(),
                (_, Some("metadata.namespace")) => pod.namespace.clone(),
                (_, Some("spec.nodeName")) => pod.node_name.clone(),
                (_, Some(other)) => panic!("fieldRef {other} is not supported here"),
                (Value::String(v), None) => v.clone(),
                (_, None) => String::new(),
            };
            env.push((name, value));
        }
        env.extend(self.extra_env.iter().cloned());
        // Later definitions win, as in the container's environment.
        let mut seen = HashMap::new();
        for (i, (k, _)) in env.iter().enumerate() {
            seen.insert(k.clone(), i);
        }
        env.iter()
            .enumerate()
            .filter(|(i, (k, _))| seen[k] == *i)
            .map(|(_, (key, value))| KeyValue {
                key: key.clone(),
                value: value.clone(),
            })
            .collect()
    }

    fn mounts(&self, pod: &PodIdentity, spec: &Value, c: &Value) -> Vec<Mount> {
        let volumes: HashMap<&str, &Value> = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| (v["name"].as_str().expect("volume name"), v))
            .collect();
        let mut mounts = Vec::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().expect("volumeMount name");
            let volume = volumes
                .get(name)
                .unwrap_or_else(|| panic!("volumeMount {name} names no volume"));
            let host_path = if let Some(path) = volume["hostPath"]["path"].as_str() {
                match volume["hostPath"]["type"].as_str().unwrap_or("") {
                    "DirectoryOrCreate" => {
                        std::fs::create_dir_all(self.on_node(path)).expect("hostPath dir")
                    }
                    "Directory" => assert!(
                        self.on_node(path).is_dir(),
                        "hostPath {path} is not a directory on the node"
                    ),
                    "" => {}
                    other => panic!("hostPath type {other} is not supported here"),
                }
                path.to_owned()
            } else if volume.get("emptyDir").is_some() {
                let dir = self.pod_dir(pod).join("volumes").join(name);
                std::fs::create_dir_all(&dir).expect("emptyDir");
                dir.display().to_string()
            } else {
                panic!("volume {name}: only hostPath and emptyDir are supported here");
            };
            let propagation = match m["mountPropagation"].as_str() {
                Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
                Some("Bidirectional") => MountPropagation::PropagationBidirectional,
                _ => MountPropagation::PropagationPrivate,
            };
            mounts.push(Mount {
                container_path: m["mountPath"].as_str().expect("mountPath").into(),
                host_path,
                readonly: m["readOnly"].as_bool().unwrap_or(false),
                propagation: propagation as i32,
                ..Default::default()
            });
        }
        if spec["automountServiceAccountToken"].as_bool() != Some(false) {
            let sa = self.service_account_files(pod);
            mounts.push(Mount {
                container_path: SERVICE_ACCOUNT_DIR.into(),
                host_path: sa.display().to_string(),
                readonly: true,
                ..Default::default()
            });
        }
        mounts
    }

    /// Writes the token volume's files as kubelet's atomic writer does (a timestamped dir,
    /// `..data` linking to it, each file linked through `..data`).
    fn service_account_files(&self, pod: &PodIdentity) -> PathBuf {
        let dir = self.pod_dir(pod).join("volumes").join("kube-api-access");
        if dir.exists() {
            return dir;
        }
        let data = dir.join("..2026_01_01_00_00_00.000000001");
        std::fs::create_dir_all(&data).expect("token volume");
        for (file, content) in [
            ("token", self.token.as_str()),
            ("ca.crt", self.ca_pem.as_str()),
            ("namespace", pod.namespace.as_str()),
        ] {
            std::fs::write(data.join(file), content).expect("token volume file");
        }
        std::os::unix::fs::symlink(data.file_name().expect("name"), dir.join("..data"))
            .expect("..data");
        for file in ["token", "ca.crt", "namespace"] {
            std::os::unix::fs::symlink(Path::new("..data").join(file), dir.join(file))
                .expect("token volume link");
        }
        dir
    }
}

/// `namespacesForPod`: see the module docs.
fn namespaces(spec: &Value) -> NamespaceOption {
    let flag = |k: &str| spec[k].as_bool().unwrap_or(false);
    NamespaceOption {
        network: if flag("hostNetwork") {
            NamespaceMode::Node
        } else {
            NamespaceMode::Pod
        } as i32,
        pid: if flag("hostPID") {
            NamespaceMode::Node
        } else if flag("shareProcessNamespace") {
            NamespaceMode::Pod
        } else {
            NamespaceMode::Container
        } as i32,
        ipc: if flag("hostIPC") {
            NamespaceMode::Node
        } else {
            NamespaceMode::Pod
        } as i32,
        ..Default::default()
    }
}

fn string_map(v: &Value) -> HashMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect()
}
