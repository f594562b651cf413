//! Our entry of the network configuration (`"type": "istio-cni"`), read from stdin.
//!
//! Field names follow upstream Istio's `istio-cni` plugin so that existing conflists keep
//! working; `validation`, `plugin_log_file`, `local_pod_file` and
//! `kubernetes.api_timeout_ms` are ours.
//! Unknown fields are ignored. A field of the wrong type is an error naming the field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::cni::{CniVersion, ErrorCode};

/// Default of `cni_agent_run_dir`: where the node agent writes the plugin's kubeconfig.
pub const DEFAULT_AGENT_RUN_DIR: &str = "/var/run/istio-cni";
/// File name of the kubeconfig inside `cni_agent_run_dir`.
pub const KUBECONFIG_FILE: &str = "istio-cni-kubeconfig";
/// Default of `pod_namespace`, the node agent's namespace.
pub const DEFAULT_POD_NAMESPACE: &str = "istio-system";

/// Why the network configuration on stdin was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Stdin is not a JSON object (CNI code 6).
    #[error("network configuration on stdin is not valid JSON: {0}")]
    Decode(#[source] serde_json::Error),
    /// A field has the wrong type (CNI code 7). `field` is the JSON path, e.g. `validation.probe`.
    #[error("network configuration field `{field}` is invalid: {reason}")]
    InvalidField {
        /// Dotted JSON path of the field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Neither `cniVersion` nor a usable `cniVersions` entry (CNI code 1 or 7).
    #[error("{0}")]
    Version(String, ErrorCode),
}

impl ConfigError {
    /// The CNI error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            ConfigError::Decode(_) => ErrorCode::DECODING_FAILURE,
            ConfigError::InvalidField { .. } => ErrorCode::INVALID_NETWORK_CONFIG,
            ConfigError::Version(_, code) => *code,
        }
    }
}

/// Log verbosity (`plugin_log_level`): upstream's names `debug`, `info`, `warn`, `error`,
/// plus `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything, including per-step timings.
    Debug,
    /// One line per decision and result.
    #[default]
    Info,
    /// Only problems.
    #[serde(alias = "warning")]
    Warn,
    /// Only failures.
    Error,
    /// Nothing.
    None,
}

impl LogLevel {
    /// The matching `log` filter.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::None => log::LevelFilter::Off,
        }
    }
}

/// `kubernetes` block: how the plugin reaches the API server.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(default)]
pub struct Kubernetes {
    /// Path of the kubeconfig; default `<cni_agent_run_dir>/istio-cni-kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// Total deadline for the pod lookup, retries included, in milliseconds (default 30000).
    pub api_timeout_ms: Option<u64>,
}

/// `validation` block (ours): what ADD checks after writing the rules.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Validation {
    /// Run the loopback probe (a redirected TCP connection inside the netns). Default true.
    pub probe: bool,
    /// How long the probe may take, in milliseconds. Default 2000.
    pub timeout_ms: u64,
}

impl Default for Validation {
    fn default() -> Self {
        Validation {
            probe: true,
            timeout_ms: 2000,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Raw {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    #[serde(rename = "cniVersions")]
    cni_versions: Option<Vec<String>>,
    name: Option<String>,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    plugin_log_level: LogLevel,
    plugin_log_file: Option<PathBuf>,
    cni_agent_run_dir: Option<PathBuf>,
    exclude_namespaces: Vec<String>,
    pod_namespace: Option<String>,
    kubernetes: Kubernetes,
    native_nftables: bool,
    validation: Validation,
    local_pod_file: Option<PathBuf>,
    ambient_enabled: bool,
    enablement_selectors: Option<Vec<crate::enablement::EnablementSelector>>,
}

/// The parsed configuration, defaults filled in.
#[derive(Debug, Clone)]
pub struct NetConf {
    /// The version of this request: `cniVersion`, or the newest common entry of `cniVersions`.
    pub cni_version: CniVersion,
    /// Network name (`name`), for logs.
    pub name: String,
    /// The previous plugin's result (`prevResult`), passed through by ADD.
    pub prev_result: Option<Value>,
    /// `plugin_log_level`.
    pub log_level: LogLevel,
    /// `plugin_log_file` (ours): also append logs to this file. Logs always go to stderr.
    pub log_file: Option<PathBuf>,
    /// `cni_agent_run_dir`: the node agent's run directory.
    pub agent_run_dir: PathBuf,
    /// `exclude_namespaces`: pods in these namespaces never get rules.
    pub exclude_namespaces: Vec<String>,
    /// `pod_namespace`: the node agent's namespace.
    pub pod_namespace: String,
    /// Resolved kubeconfig path.
    pub kubeconfig: PathBuf,
    /// Pod lookup deadline, retries included.
    pub api_timeout: Duration,
    /// `native_nftables` (upstream's netconf field, chart `global.nativeNftables`): write
    /// the rules with nftables (`inet istio-proxy-*` tables, see
    /// [`crate::rules::nftables`]) instead of iptables.
    pub native_nftables: bool,
    /// `validation` block.
    pub validation: Validation,
    /// `local_pod_file` (ours): read the pod from this JSON file instead of the API. The
    /// node agent's self-test uses it; production chains never set it.
    pub local_pod_file: Option<PathBuf>,
    /// `ambient_enabled` (upstream's field, chart `ambient.enabled`): ADD reads the pod's
    /// namespace too, and an ambient pod ([`NetConf::enablement`]) is enrolled by the
    /// node agent instead of getting sidecar rules.
    pub ambient_enabled: bool,
    /// `enablement_selectors` (upstream's field, chart `ambient.enablementSelectors`),
    /// compiled; upstream's defaults when absent.
    pub enablement: crate::enablement::Enablement,
}

impl NetConf {
    /// Parses the configuration from the bytes on stdin.
    ///
    /// Errors: [`ConfigError::Decode`] when it is not JSON, [`ConfigError::InvalidField`]
    /// when a known field has the wrong type or an out-of-range value,
    /// [`ConfigError::Version`] when no supported version is given.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, ConfigError> {
        let value: Value = serde_json::from_slice(stdin).map_err(ConfigError::Decode)?;
        if !value.is_object() {
            return Err(ConfigError::InvalidField {
                field: "(top level)".into(),
                reason: "the network configuration must be a JSON object".into(),
            });
        }
        let raw: Raw =
            serde_path_to_error::deserialize(&value).map_err(|e| ConfigError::InvalidField {
                field: e.path().to_string(),
                reason: e.into_inner().to_string(),
            })?;
        let cni_version = resolve_version(raw.cni_version.as_deref(), raw.cni_versions)?;
        let v = raw.validation;
        if v.timeout_ms == 0 || v.timeout_ms > 60_000 {
            return Err(ConfigError::InvalidField {
                field: "validation.timeout_ms".into(),
                reason: format!("{} is outside 1..=60000 milliseconds", v.timeout_ms),
            });
        }
        let api_timeout_ms = raw.kubernetes.api_timeout_ms.unwrap_or(30_000);
        if api_timeout_ms == 0 || api_timeout_ms > 300_000 {
            return Err(ConfigError::InvalidField {
                field: "kubernetes.api_timeout_ms".into(),
                reason: format!("{api_timeout_ms} is outside 1..=300000 milliseconds"),
            });
        }
        let enablement = match &raw.enablement_selectors {
            Some(selectors) => crate::enablement::Enablement::compile(selectors).map_err(|e| {
                ConfigError::InvalidField {
                    field: "enablement_selectors".into(),
                    reason: e.to_string(),
                }
            })?,
            None => crate::enablement::Enablement::default(),
        };
        let agent_run_dir = raw
            .cni_agent_run_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_RUN_DIR));
        let kubeconfig = raw
            .kubernetes
            .kubeconfig
            .unwrap_or_else(|| agent_run_dir.join(KUBECONFIG_FILE));
        Ok(NetConf {
            cni_version,
            name: raw.name.unwrap_or_default(),
            prev_result: raw.prev_result,
            log_level: raw.plugin_log_level,
            log_file: raw.plugin_log_file,
            agent_run_dir,
            exclude_namespaces: raw.exclude_namespaces,
            pod_namespace: raw
                .pod_namespace
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| DEFAULT_POD_NAMESPACE.into()),
            kubeconfig,
            api_timeout: Duration::from_millis(api_timeout_ms),
            native_nftables: raw.native_nftables,
            validation: v,
            local_pod_file: raw.local_pod_file,
            ambient_enabled: raw.ambient_enabled,
            enablement,
        })
    }

    /// Whether `namespace` is listed in `exclude_namespaces`.
    pub fn is_excluded(&self, namespace: &str) -> bool {
        self.exclude_namespaces.iter().any(|n| n == namespace)
    }

    /// The kubeconfig path, for error messages.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }
}

/// Reads only the version of a request, for VERSION and for error results: `cniVersion`
/// if it is a string, else the newest supported one. Never fails.
pub fn request_version(stdin: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(stdin).ok()?;
    value.get("cniVersion")?.as_str().map(str::to_owned)
}

fn resolve_version(
    version: Option<&str>,
    versions: Option<Vec<String>>,
) -> Result<CniVersion, ConfigError> {
    if let Some(v) = version {
        let parsed: CniVersion =
            v.parse()
                .map_err(|e: crate::cni::version::ParseVersionError| {
                    ConfigError::Version(e.to_string(), ErrorCode::INCOMPATIBLE_VERSION)
                })?;
        if !parsed.is_supported() {
            return Err(ConfigError::Version(
                format!("cniVersion {parsed} is not supported (supported: 0.3.0 to 1.1.0)"),
                ErrorCode::INCOMPATIBLE_VERSION,
            ));
        }
        return Ok(parsed);
    }
    match versions {
        Some(list) => CniVersion::negotiate(list.iter().map(String::as_str)).ok_or_else(|| {
            ConfigError::Version(
                format!("none of cniVersions {list:?} is supported (supported: 0.3.0 to 1.1.0)"),
                ErrorCode::INCOMPATIBLE_VERSION,
            )
        }),
        None => Err(ConfigError::Version(
            "network configuration has neither cniVersion nor cniVersions".into(),
            ErrorCode::INVALID_NETWORK_CONFIG,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConf, ConfigError> {
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn ambient_fields() {
        let c = parse(r#"{"cniVersion":"1.0.0","ambient_enabled":true}"#).unwrap();
        assert!(c.ambient_enabled);
        assert_eq!(c.enablement, crate::enablement::Enablement::default());
        let c = parse(
            r#"{"cniVersion":"1.0.0","enablement_selectors":[{"podSelector":{"matchLabels":{"a":"b"}}}]}"#,
        )
        .unwrap();
        assert!(!c.ambient_enabled);
        assert_ne!(c.enablement, crate::enablement::Enablement::default());
        let e = parse(
            r#"{"cniVersion":"1.0.0","enablement_selectors":[{"podSelector":{"matchExpressions":[{"key":"a","operator":"Near"}]}}]}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&e, ConfigError::InvalidField { field, .. } if field == "enablement_selectors"),
            "{e}"
        );
        assert_eq!(e.code(), crate::cni::ErrorCode::INVALID_NETWORK_CONFIG);
    }

    #[test]
    fn defaults_and_upstream_fields() {
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"k8s","type":"istio-cni","unknown":{"x":1},
                "plugin_log_level":"debug","exclude_namespaces":["kube-system"],
                "kubernetes":{"kubeconfig":"/etc/kc","cni_bin_dir":"/opt/cni/bin"}}"#,
        )
        .unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
        assert_eq!(c.log_level, LogLevel::Debug);
        assert!(c.is_excluded("kube-system"));
        assert!(!c.is_excluded("default"));
        assert_eq!(c.kubeconfig, PathBuf::from("/etc/kc"));
        assert_eq!(c.pod_namespace, "istio-system");
        assert_eq!(c.validation, Validation::default());
        assert_eq!(c.api_timeout, Duration::from_secs(30));
        let c = parse(r#"{"cniVersion":"0.3.1","cni_agent_run_dir":"/run/x"}"#).unwrap();
        assert_eq!(c.kubeconfig, PathBuf::from("/run/x/istio-cni-kubeconfig"));
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = parse(r#"{"cniVersion":"1.0.0","validation":{"probe":"yes"}}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::INVALID_NETWORK_CONFIG);
        assert!(e.to_string().contains("`validation.probe`"), "{e}");
        let e = parse(r#"{"cniVersion":"1.0.0","exclude_namespaces":"kube-system"}"#).unwrap_err();
        assert!(e.to_string().contains("`exclude_namespaces`"), "{e}");
        let e = parse(r#"{"cniVersion":"1.0.0","validation":{"timeout_ms":0}}"#).unwrap_err();
        assert!(e.to_string().contains("validation.timeout_ms"), "{e}");
        let e = parse(r#"{"cniVersion":"1.0.0","plugin_log_level":"loud"}"#).unwrap_err();
        assert!(e.to_string().contains("`plugin_log_level`"), "{e}");
    }

    #[test]
    fn decode_and_version_errors() {
        assert_eq!(
            parse("{not json").unwrap_err().code(),
            ErrorCode::DECODING_FAILURE
        );
        assert_eq!(
            parse("[1]").unwrap_err().code(),
            ErrorCode::INVALID_NETWORK_CONFIG
        );
        assert_eq!(
            parse(r#"{"cniVersion":"0.2.0"}"#).unwrap_err().code(),
            ErrorCode::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            parse("{}").unwrap_err().code(),
            ErrorCode::INVALID_NETWORK_CONFIG
        );
        let c = parse(r#"{"cniVersions":["0.4.0","1.0.0","9.0.0"]}"#).unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
    }
}
