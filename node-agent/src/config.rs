//! The agent's options: every one a long flag with a matching env var, named as upstream
//! Istio's `install-cni` names them, so that existing DaemonSet manifests keep working.

use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args};

use crate::install::{InstallConfig, PluginSettings};

/// Options shared by `install` and `uninstall`.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct AgentArgs {
    /// The node's CNI conf dir, as mounted in the agent.
    #[arg(
        long,
        env = "MOUNTED_CNI_NET_DIR",
        default_value = "/host/etc/cni/net.d"
    )]
    pub mounted_cni_net_dir: PathBuf,
    /// The node's CNI bin dir, as mounted in the agent.
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The agent run dir (kubeconfig, plugin log socket); the same path on the host.
    #[arg(long, env = "CNI_AGENT_RUN_DIR", default_value = "/var/run/istio-cni")]
    pub cni_agent_run_dir: PathBuf,
    /// The plugin binary to install [default: `istio-cni` beside this executable].
    #[arg(long, env = "PLUGIN_BIN")]
    pub plugin_bin: Option<PathBuf>,
    /// The primary config to chain into [default: the first valid one by name]; in
    /// standalone mode, the name of our config [default: YYY-istio-cni.conf].
    #[arg(long, env = "CNI_CONF_NAME", value_parser = parse_conf_name)]
    pub cni_conf_name: Option<String>,
    /// Chain into the primary config (true) or write a standalone config (false).
    #[arg(long, env = "CHAINED_CNI_PLUGIN", default_value_t = true, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub chained_cni_plugin: bool,
    /// Permission bits of the kubeconfig, in octal.
    #[arg(long, env = "KUBECONFIG_MODE", default_value = "600", value_parser = parse_mode)]
    pub kubeconfig_mode: u32,
    /// CA file for the API server [default: ca.crt in the service account dir].
    #[arg(long, env = "KUBE_CA_FILE")]
    pub kube_ca_file: Option<PathBuf>,
    /// Write a kubeconfig that does not verify the API server's certificate.
    #[arg(long, env = "SKIP_TLS_VERIFY", default_value_t = false, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub skip_tls_verify: bool,
    /// The service account dir with `token` and `ca.crt`.
    #[arg(
        long,
        env = "SERVICE_ACCOUNT_DIR",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount"
    )]
    pub service_account_dir: PathBuf,
    /// Namespaces whose pods never get rules, comma-separated.
    #[arg(
        long,
        env = "EXCLUDE_NAMESPACES",
        default_value = "kube-system",
        value_delimiter = ','
    )]
    pub exclude_namespaces: Vec<String>,
    /// The agent's own namespace (its pods pass through the plugin).
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub pod_namespace: String,
    /// The plugin's log level: debug, info, warn, error, none (checked with the plugin's
    /// own parser before anything is written; see `install::validate_entry`).
    #[arg(long, env = "PLUGIN_LOG_LEVEL", default_value = "info")]
    pub plugin_log_level: String,
    /// Run the plugin's loopback probe at ADD.
    #[arg(long, env = "VALIDATION_PROBE", default_value_t = true, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub validation_probe: bool,
    /// How long the plugin's probe may take, in milliseconds (checked with the plugin's own
    /// parser: 1 to 60000).
    #[arg(long, env = "VALIDATION_TIMEOUT_MS", default_value_t = 2000)]
    pub validation_timeout_ms: u64,
    /// Write the rules with nftables instead of iptables (upstream's `native_nftables`,
    /// the chart's `global.nativeNftables`): the chained entry asks the plugin for it, and
    /// the self-test and the repair loop use it too.
    #[arg(long, env = "NATIVE_NFTABLES", default_value_t = false, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub native_nftables: bool,
    /// Ambient mode (upstream's `AMBIENT_ENABLED`, the chart's `ambient.enabled`): the
    /// chained entry asks the plugin to send ambient pods to the agent, which enrols them
    /// into ztunnel (see [`crate::ambient`]).
    #[arg(long, env = "AMBIENT_ENABLED", default_value_t = false, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub ambient_enabled: bool,
    /// Which pods are ambient (upstream's `AMBIENT_ENABLEMENT_SELECTOR`, the chart's
    /// `ambient.enablementSelectors`): a YAML or JSON list of `{podSelector,
    /// namespaceSelector}` label selectors. Empty: upstream's defaults (pod label
    /// `istio.io/dataplane-mode=ambient`, or that namespace label unless the pod's is
    /// `none`), which the chart also sets by default.
    #[arg(long, env = "AMBIENT_ENABLEMENT_SELECTOR", default_value = "",
          value_parser = parse_enablement_selectors)]
    pub ambient_enablement_selector: String,
    /// After installing, prove the plugin works here: a real ADD/CHECK/DEL in a scratch
    /// netns with a synthetic pod.
    #[arg(long, env = "SELF_TEST", default_value_t = true, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub self_test: bool,
    /// The node's mount namespace, in which the self-test runs the plugin as the node's
    /// runtime does (the host's PID 1's, through the DaemonSet's /host/proc mount). Empty:
    /// the agent's own, for an agent that runs on the host itself.
    #[arg(long, env = "HOST_MOUNT_NS", default_value = "/host/proc/1/ns/mnt")]
    pub host_mount_ns: String,
    /// The node's CNI bin dir as the host sees it (CNI_BIN_DIR is where the agent mounts
    /// it): the self-test runs the installed plugin from here. Used with HOST_MOUNT_NS.
    #[arg(long, env = "HOST_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub host_cni_bin_dir: PathBuf,
    /// `PATH` of the node's runtime, which its CNI plugins inherit; the self-test gives it
    /// to the plugin, which looks for `iptables` there.
    #[arg(long, env = "HOST_PATH", default_value = crate::selftest::DEFAULT_HOST_PATH)]
    pub host_path: String,
    /// The agent's log level: error, warn, info, debug, trace, off.
    #[arg(long, env = "LOG_LEVEL", default_value = "info",
          value_parser = ["error", "warn", "info", "debug", "trace", "off"])]
    pub log_level: String,
    /// Log one JSON object per line instead of text (upstream's `global.logAsJson`).
    #[arg(long, env = "LOG_AS_JSON", default_value_t = false, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub log_as_json: bool,
}

/// Longest interval or grace period the agent accepts, in seconds (one day). Larger values
/// are mistakes, and would overflow when added to a clock reading.
pub const MAX_SECONDS: u64 = 86_400;

/// `CNI_CONF_NAME`: a file name in the conf dir (no `/`, not `.` or `..`) that a runtime
/// reads, i.e. ending in `.conf`, `.conflist` or `.json` (libcni's `ConfFiles` extensions).
fn parse_conf_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    if s.contains('/') || s == "." || s == ".." || s.chars().any(char::is_control) {
        return Err(format!(
            "{s:?} must be a file name in the CNI conf dir, without '/'"
        ));
    }
    if crate::install::conflist::shape_of(s).is_none() {
        return Err(format!(
            "{s:?} must end in .conf, .conflist or .json: runtimes ignore other files"
        ));
    }
    Ok(s.to_owned())
}

/// A taint key: a Kubernetes qualified name, `[prefix/]name`, where the prefix is a DNS-1123
/// subdomain and the name is 1 to 63 characters of letters, digits, `-`, `_` and `.`,
/// starting and ending with a letter or digit (`IsQualifiedName` in
/// `k8s.io/apimachinery/pkg/util/validation`, which the API server applies to taint keys).
fn parse_taint_key(s: &str) -> Result<String, String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let b = name.as_bytes();
    let edge = |c: &u8| c.is_ascii_alphanumeric();
    let name_ok = (1..=63).contains(&b.len())
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| edge(c) || matches!(c, b'-' | b'_' | b'.'));
    let prefix_ok = prefix.is_none_or(istio_cni::cni::env::is_dns1123_subdomain);
    if name_ok && prefix_ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a valid taint key ([DNS subdomain/]name, name of 1-63 letters, digits, '-', '_', '.')"
        ))
    }
}

/// A comma-separated selector of `key=value`, `key==value` or `key!=value` terms (what
/// `fields.ParseSelector` in `k8s.io/apimachinery/pkg/fields/selector.go` accepts, and the
/// equality subset of label selectors); empty means none. Checked at start, so that a typo
/// stops the agent with a message instead of failing every watch with 400.
fn parse_selector(s: &str) -> Result<String, String> {
    let s = s.trim();
    for term in s.split(',').filter(|_| !s.is_empty()) {
        let (key, value) = term
            .split_once("!=")
            .or_else(|| term.split_once("=="))
            .or_else(|| term.split_once('='))
            .ok_or_else(|| format!("{term:?} is not key=value, key==value or key!=value"))?;
        let bad = |x: &str| {
            x.chars()
                .any(|c| c.is_control() || c.is_whitespace() || "=!,".contains(c))
        };
        if key.is_empty() || bad(key) || bad(value) {
            return Err(format!(
                "{term:?} is not key=value, key==value or key!=value"
            ));
        }
    }
    Ok(s.to_owned())
}

/// `AMBIENT_ENABLEMENT_SELECTOR`: parsed and compiled at start, so that a typo stops the
/// agent with a message naming the selector.
fn parse_enablement_selectors(s: &str) -> Result<String, String> {
    let selectors = enablement_selectors(s)?;
    istio_cni::enablement::Enablement::compile(&selectors).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// The selectors in `s` (YAML, of which JSON is a subset); upstream's defaults when it is
/// blank.
fn enablement_selectors(s: &str) -> Result<Vec<istio_cni::enablement::EnablementSelector>, String> {
    if s.trim().is_empty() {
        return Ok(istio_cni::enablement::Enablement::default_selectors());
    }
    serde_saphyr::from_str(s).map_err(|e| {
        format!(
            "not a list of ambient enablement selectors ({{podSelector, namespaceSelector}}): {e}"
        )
    })
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.trim_start_matches("0o");
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode such as 600"))
}

impl AgentArgs {
    /// How the self-test runs the plugin (see [`crate::selftest::HostView`]), or `None`
    /// with `--self-test false`. With an empty `--host-mount-ns` the agent's own view is
    /// the host's: the plugin is run from `--cni-bin-dir`.
    pub fn self_test_view(&self) -> Option<crate::selftest::HostView> {
        if !self.self_test {
            return None;
        }
        let own = self.host_mount_ns.is_empty();
        Some(crate::selftest::HostView {
            mount_ns: (!own).then(|| PathBuf::from(&self.host_mount_ns)),
            cni_bin_dir: if own {
                self.cni_bin_dir.clone()
            } else {
                self.host_cni_bin_dir.clone()
            },
            path: self.host_path.clone().into(),
        })
    }

    /// The ambient enablement selectors (`--ambient-enablement-selector`, checked at
    /// start; upstream's defaults when empty).
    pub fn enablement_selectors(&self) -> Vec<istio_cni::enablement::EnablementSelector> {
        enablement_selectors(&self.ambient_enablement_selector).unwrap_or_else(|e| {
            log::error!("--ambient-enablement-selector: {e}; using upstream's defaults");
            istio_cni::enablement::Enablement::default_selectors()
        })
    }

    /// `--exclude-namespaces`, trimmed, without empty entries.
    pub fn excluded_namespaces(&self) -> Vec<String> {
        self.exclude_namespaces
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect()
    }

    /// The install configuration, with the API server from the pod environment.
    ///
    /// Errors: a message when the API server address or the plugin binary cannot be
    /// determined.
    pub fn install_config(&self) -> Result<InstallConfig, String> {
        let server = crate::install::kubeconfig::server_from_env(|k| std::env::var(k).ok())
            .map_err(|e| e.to_string())?;
        let plugin_bin = match &self.plugin_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(|e| format!("cannot find the agent's own executable: {e}"))?
                .with_file_name(crate::install::PLUGIN_BINARY),
        };
        Ok(InstallConfig {
            conf_dir: self.mounted_cni_net_dir.clone(),
            bin_dir: self.cni_bin_dir.clone(),
            agent_run_dir: self.cni_agent_run_dir.clone(),
            plugin_bin,
            conf_name: self.cni_conf_name.clone().filter(|n| !n.is_empty()),
            chained: self.chained_cni_plugin,
            kubeconfig_mode: self.kubeconfig_mode,
            server,
            service_account_dir: self.service_account_dir.clone(),
            kube_ca_file: self.kube_ca_file.clone(),
            skip_tls_verify: self.skip_tls_verify,
            plugin: PluginSettings {
                log_level: self.plugin_log_level.clone(),
                exclude_namespaces: self.excluded_namespaces(),
                pod_namespace: self.pod_namespace.clone(),
                probe: self.validation_probe,
                probe_timeout_ms: self.validation_timeout_ms,
                native_nftables: self.native_nftables,
                ambient: self.ambient_enabled.then(|| self.enablement_selectors()),
            },
        })
    }
}

impl RunArgs {
    /// The repair mode: `--repair-mode`, or upstream's `REPAIR_REPAIR_PODS`,
    /// `REPAIR_DELETE_PODS` or `REPAIR_LABEL_PODS` set to true (istio/istio
    /// `cni/pkg/cmd/root.go`), or `repair` when none is given.
    ///
    /// Errors: two of them ask for different modes. Upstream takes the first true of
    /// repair, delete, label in that order without a word; here both variables are named.
    pub fn effective_repair_mode(&self) -> Result<crate::repair::act::Mode, String> {
        use crate::repair::act::Mode;
        let upstream: Vec<(&str, Mode)> = [
            ("REPAIR_REPAIR_PODS", Mode::Repair, self.repair_repair_pods),
            ("REPAIR_DELETE_PODS", Mode::Delete, self.repair_delete_pods),
            ("REPAIR_LABEL_PODS", Mode::Label, self.repair_label_pods),
        ]
        .into_iter()
        .filter(|(_, _, on)| *on == Some(true))
        .map(|(var, mode, _)| (var, mode))
        .collect();
        match (upstream.as_slice(), self.repair_mode) {
            ([], mode) => Ok(mode.unwrap_or_default()),
            ([(_, m)], None) => Ok(*m),
            ([(_, m)], Some(mode)) if *m == mode => Ok(mode),
            ([(var, m)], Some(mode)) => Err(format!(
                "REPAIR_MODE={mode} and {var}=true ask for different repair modes ({mode}, {m}): set only one \
                 (with the Helm chart, set repair.mode or repair.{}Pods in its values, which also grants the RBAC the mode needs)",
                m.as_str()
            )),
            ([(a, _), (b, _), ..], _) => Err(format!(
                "{a}=true and {b}=true both select a repair mode: set only one of them (or REPAIR_MODE)"
            )),
        }
    }

    /// Upstream settings given that have no effect here, for a warning at start.
    pub fn ignored_upstream_settings(&self) -> Vec<&'static str> {
        [
            (
                "REPAIR_INIT_CONTAINER_NAME",
                &self.repair_init_container_name,
            ),
            (
                "REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE",
                &self.repair_init_container_termination_message,
            ),
            (
                "REPAIR_INIT_CONTAINER_EXIT_CODE",
                &self.repair_init_container_exit_code,
            ),
            ("REPAIR_SIDECAR_ANNOTATION", &self.repair_sidecar_annotation),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| k)
        .collect()
    }
}

/// Which pods the agent leaves to the plugin's pass-through: the same settings as the
/// plugin's config (the agent's namespace, `EXCLUDE_NAMESPACES`).
#[derive(Debug, Clone, Default)]
pub struct Exclusions {
    /// The agent's namespace: its own pods are never touched.
    pub agent_namespace: String,
    /// Namespaces whose pods never get rules.
    pub exclude_namespaces: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::parse_mode;

    #[test]
    fn conf_names_and_taint_keys() {
        use super::{parse_conf_name, parse_taint_key};
        for ok in [
            "10-calico.conflist",
            "x.conf",
            "YYY-istio-cni.conf",
            "a.json",
            "",
        ] {
            assert!(parse_conf_name(ok).is_ok(), "{ok}");
        }
        for bad in ["../x.conf", "a/b.conf", "x.txt", "..", "x.conf\n"] {
            assert!(parse_conf_name(bad).is_err(), "{bad:?}");
        }
        for ok in [
            "cni.istio.io/not-ready",
            "not-ready",
            "a_b.c",
            "example.com/K",
        ] {
            assert!(parse_taint_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "bad key!",
            "",
            "/x",
            "a/",
            "-a",
            "a/b/c",
            "Example.com/x",
            &"k".repeat(64),
        ] {
            assert!(parse_taint_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn upstream_repair_switches_select_the_mode_and_conflicts_name_both() {
        use crate::repair::act::Mode;
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: super::RunArgs,
        }
        let mode = |args: &[&str]| {
            let cli =
                Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied())).unwrap();
            cli.run.effective_repair_mode()
        };
        assert_eq!(mode(&[]), Ok(Mode::Repair));
        assert_eq!(mode(&["--repair-mode", "label"]), Ok(Mode::Label));
        assert_eq!(mode(&["--repair-delete-pods", "true"]), Ok(Mode::Delete));
        assert_eq!(
            mode(&["--repair-repair-pods", "false", "--repair-label-pods", "1"]),
            Ok(Mode::Label)
        );
        assert_eq!(
            mode(&["--repair-mode", "delete", "--repair-delete-pods", "true"]),
            Ok(Mode::Delete)
        );
        let both = mode(&[
            "--repair-repair-pods",
            "true",
            "--repair-delete-pods",
            "true",
        ]);
        let msg = both.unwrap_err();
        assert!(
            msg.contains("REPAIR_REPAIR_PODS=true") && msg.contains("REPAIR_DELETE_PODS=true"),
            "{msg}"
        );
        let msg = mode(&["--repair-mode", "repair", "--repair-label-pods", "true"]).unwrap_err();
        assert!(
            msg.contains("REPAIR_MODE=repair") && msg.contains("REPAIR_LABEL_PODS=true"),
            "{msg}"
        );
    }

    #[test]
    fn selectors_are_checked_at_start() {
        use super::parse_selector;
        for ok in [
            "",
            "app=web",
            "a=b,c!=d",
            "metadata.namespace==default",
            "k=",
        ] {
            assert!(parse_selector(ok).is_ok(), "{ok:?}");
        }
        for bad in ["app", "=x", "a=b,", "a b=c", "a=b\nc", "a=b=c"] {
            assert!(parse_selector(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0644"), Ok(0o644));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        assert!(parse_mode("rw").is_err());
        assert!(parse_mode("99999").is_err());
    }
}

/// Options of the daemon (`run`) only.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct RunArgs {
    /// A kubeconfig for the agent's own API access, instead of the in-cluster settings
    /// (service account and `KUBERNETES_SERVICE_*`).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The agent's own pod name (downward API). With it, SIGTERM asks the API whether the
    /// DaemonSet is being removed (clean up) or updated (keep the plugin installed).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Port of `/healthz` and `/readyz`.
    #[arg(long, env = "READINESS_PORT", default_value_t = 8000)]
    pub readiness_port: u16,
    /// Port of `/metrics`.
    #[arg(long, env = "MONITORING_PORT", default_value_t = 15014)]
    pub monitoring_port: u16,
    /// Address the HTTP endpoints listen on.
    #[arg(long, env = "BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind_address: std::net::IpAddr,
    /// On SIGTERM, remove our entry, the kubeconfig and the binary, unless the DaemonSet
    /// is only being updated (see `--pod-name`). False never removes anything: removing the
    /// plugin mid-upgrade breaks pod teardown on the node.
    #[arg(long, env = "CLEANUP_ON_EXIT", default_value_t = true, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub cleanup_on_exit: bool,
    /// Re-check the installation at least this often, in seconds (1 to 86400), even
    /// without file events.
    #[arg(long, env = "RESYNC_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub resync_seconds: u64,
    /// The node this agent runs on (downward API `spec.nodeName`); needed for the taint.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Keep the not-ready taint on the node until the plugin is proven here.
    #[arg(long, env = "TAINT_ENABLED", default_value_t = true, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub taint_enabled: bool,
    /// Key of the not-ready taint (a Kubernetes qualified name).
    #[arg(long, env = "TAINT_KEY", default_value = "cni.istio.io/not-ready",
          value_parser = parse_taint_key)]
    pub taint_key: String,
    /// Effect of the not-ready taint.
    #[arg(long, env = "TAINT_EFFECT", default_value = "NoSchedule",
          value_parser = ["NoSchedule", "NoExecute"])]
    pub taint_effect: String,
    /// How long the agent may be not ready before the taint comes back, in seconds (0 to
    /// 86400).
    #[arg(long, env = "TAINT_GRACE_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS))]
    pub taint_grace_seconds: u64,
    /// Find running pods on this node whose netns lacks the rules, and act on them.
    #[arg(long, env = "REPAIR_ENABLED", default_value_t = true, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub repair_enabled: bool,
    /// What to do with a broken pod: repair (rewrite the rules in place), delete (its
    /// controller recreates it) or label (leave it to the operator) [default: repair, or
    /// the one of upstream's REPAIR_*_PODS that is true].
    #[arg(long, env = "REPAIR_MODE")]
    pub repair_mode: Option<crate::repair::act::Mode>,
    /// Upstream Istio's switch for repair mode (`repair-repair-pods`).
    #[arg(long, env = "REPAIR_REPAIR_PODS", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub repair_repair_pods: Option<bool>,
    /// Upstream Istio's switch for delete mode (`repair-delete-pods`).
    #[arg(long, env = "REPAIR_DELETE_PODS", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub repair_delete_pods: Option<bool>,
    /// Upstream Istio's switch for label mode (`repair-label-pods`).
    #[arg(long, env = "REPAIR_LABEL_PODS", action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub repair_label_pods: Option<bool>,
    /// Only pods with these labels are repaired: a label selector (`k=v,k2!=v2`), added to
    /// the repair loop's watch, as upstream's `repair-label-selectors`.
    #[arg(long, env = "REPAIR_LABEL_SELECTORS", default_value = "",
          value_parser = parse_selector)]
    pub repair_label_selectors: String,
    /// Only pods matching these field selectors (`k=v,k2!=v2`) are repaired, added to the
    /// watch's `spec.nodeName`, as upstream's `repair-field-selectors`.
    #[arg(long, env = "REPAIR_FIELD_SELECTORS", default_value = "",
          value_parser = parse_selector)]
    pub repair_field_selectors: String,
    /// Upstream's settings of its init-container-based detection
    /// (`REPAIR_INIT_CONTAINER_NAME`, `REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE`,
    /// `REPAIR_INIT_CONTAINER_EXIT_CODE`, `REPAIR_SIDECAR_ANNOTATION`): accepted, and named
    /// at start as without effect, since the agent reads each pod's rules instead.
    #[arg(long, env = "REPAIR_INIT_CONTAINER_NAME", hide = true)]
    pub repair_init_container_name: Option<String>,
    /// See [`RunArgs::repair_init_container_name`].
    #[arg(long, env = "REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE", hide = true)]
    pub repair_init_container_termination_message: Option<String>,
    /// See [`RunArgs::repair_init_container_name`].
    #[arg(long, env = "REPAIR_INIT_CONTAINER_EXIT_CODE", hide = true)]
    pub repair_init_container_exit_code: Option<String>,
    /// See [`RunArgs::repair_init_container_name`].
    #[arg(long, env = "REPAIR_SIDECAR_ANNOTATION", hide = true)]
    pub repair_sidecar_annotation: Option<String>,
    /// Interval of the sweep over every pod on the node, in seconds (1 to 86400).
    #[arg(long, env = "REPAIR_RESYNC_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub repair_resync_seconds: u64,
    /// Watch each checked pod's rules between sweeps: nf_tables commits announced by the
    /// kernel, legacy iptables tables asked once a second; a changed pod is checked at once.
    /// One socket per pod (two with legacy IPv4 and IPv6 tables).
    #[arg(long, env = "REPAIR_DRIFT_WATCH", default_value_t = true, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub repair_drift_watch: bool,
    /// Minimum time between two actions on the same pod, in seconds (0 to 86400).
    #[arg(long, env = "REPAIR_COOLDOWN_SECONDS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS))]
    pub repair_cooldown_seconds: u64,
    /// Node-wide limit on pod deletions per minute (delete mode), evenly spaced (1 to 6000).
    #[arg(long, env = "REPAIR_MAX_DELETES_PER_MINUTE", default_value_t = 6,
          value_parser = clap::value_parser!(u32).range(1..=6000))]
    pub repair_max_deletes_per_minute: u32,
    /// Label key set on broken pods in label mode.
    #[arg(
        long,
        env = "REPAIR_BROKEN_POD_LABEL_KEY",
        default_value = "cni.istio.io/uninitialized"
    )]
    pub repair_broken_pod_label_key: String,
    /// Label value set on broken pods in label mode.
    #[arg(long, env = "REPAIR_BROKEN_POD_LABEL_VALUE", default_value = "true")]
    pub repair_broken_pod_label_value: String,
    /// The host's /proc as mounted in the agent (pod processes and their netns).
    #[arg(long, env = "HOST_PROC_DIR", default_value = "/host/proc")]
    pub host_proc_dir: PathBuf,
    /// Dirs of runtime-pinned netns files, comma-separated: the repair loop's fallback for
    /// pods without a process, and the only dirs an ambient plugin event may name a netns
    /// in (besides `/proc/<pid>/ns/net`).
    #[arg(
        long,
        env = "NETNS_DIRS",
        default_value = "/host/var/run/netns,/host/run/netns",
        value_delimiter = ','
    )]
    pub netns_dirs: Vec<PathBuf>,
    /// Capture each ambient pod's DNS (UDP and TCP port 53) to ztunnel's DNS proxy
    /// (upstream's `AMBIENT_DNS_CAPTURE`, the chart's `ambient.dnsCapture`); a pod may
    /// override it with `ambient.istio.io/dns-capture`.
    #[arg(long, env = "AMBIENT_DNS_CAPTURE", default_value_t = true, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub ambient_dns_capture: bool,
    /// Also redirect ambient pods' IPv6 traffic (upstream's `AMBIENT_IPV6`, the chart's
    /// `ambient.ipv6`).
    #[arg(long, env = "AMBIENT_IPV6", default_value_t = true, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    pub ambient_ipv6: bool,
    /// Upstream's `AMBIENT_RECONCILE_POD_RULES_ON_STARTUP` (the chart's
    /// `ambient.reconcileIptablesOnStartup`): rewrite the in-pod rules of pods already
    /// enrolled when the agent starts, before ztunnel is served (a pod found only by its
    /// pinned netns file is not rewritten); off, their rules are kept as they are until
    /// the repair loop, if on, finds them different from what this agent writes.
    #[arg(long, env = "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP", default_value_t = false,
          action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub ambient_reconcile_pod_rules_on_startup: bool,
    /// The ZDS socket ztunnel connects to (upstream's `ZTUNNEL_UDS_ADDRESS`); its
    /// directory is the chart's ztunnel socket dir, mounted from the host.
    #[arg(
        long,
        env = "ZTUNNEL_UDS_ADDRESS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub ztunnel_uds_address: PathBuf,
    /// The host's root as mounted in the agent: the netns path of a plugin event
    /// (`CNI_NETNS` on the host, e.g. `/var/run/netns/cni-…`) is opened below it.
    #[arg(long, env = "HOST_ROOT", default_value = "/host")]
    pub host_root: PathBuf,
    /// Parse every flag and env var, print the effective settings as JSON on stdout and
    /// exit: checks a DaemonSet's command line and environment without running anything.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
}
