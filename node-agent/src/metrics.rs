//! The agent's Prometheus metrics, created in one place and handed down.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label of an outcome: `result="success"` or `result="failure"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `success` or `failure`.
    pub result: &'static str,
}

impl Outcome {
    /// The label for `ok`.
    pub fn of(ok: bool) -> Outcome {
        Outcome {
            result: if ok { "success" } else { "failure" },
        }
    }
}

/// Labels of a repair action: `action` (`repair`, `delete`, `label`) and `result`
/// (`success`, `failure`, `cooldown`, `rate_limited`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairAction {
    /// The repair mode.
    pub action: &'static str,
    /// How it ended, or why it was held back.
    pub result: &'static str,
}

/// Labels of upstream Istio's `istio_cni_installs_total`: `result` is `SUCCESS`,
/// `COPY_BINARIES_FAILURE`, `CREATE_KUBECONFIG_FAILURE` or `CREATE_CNI_CONFIG_FAILURE`
/// (istio/istio `cni/pkg/install/monitoring.go`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamInstall {
    /// One of the four values above.
    pub result: &'static str,
}

/// Labels of upstream Istio's `istio_cni_repair_pods_repaired_total`: `type` is `repair`,
/// `delete` or `label`; `result` is `success`, `skip` or `fail` (istio/istio
/// `cni/pkg/repair/monitoring.go`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamRepair {
    /// The repair mode.
    pub r#type: &'static str,
    /// How it ended.
    pub result: &'static str,
}

/// Every metric of the agent.
pub struct Metrics {
    registry: Registry,
    /// `istio_cni_install_attempts_total{result}`: install passes.
    pub install_attempts: Family<Outcome, Counter>,
    /// `istio_cni_ready`: 1 when ready (see [`crate::readiness`]), else 0.
    pub ready: Gauge,
    /// `istio_cni_conflist_rewrites_total`: times another writer dropped our entry and we
    /// chained it again.
    pub conflist_rewrites: Counter,
    /// `istio_cni_conflict`: 1 while backing off from a fight with another writer.
    pub conflict: Gauge,
    /// `istio_cni_self_test_runs_total{result}`.
    pub self_test_runs: Family<Outcome, Counter>,
    /// `istio_cni_self_test_duration_seconds`.
    pub self_test_duration: Histogram,
    /// `istio_cni_node_tainted`: 1 while the node carries the not-ready taint (our key), as
    /// the agent last read, watched or wrote it; 0 otherwise, including before the node
    /// was ever read (see [`Metrics::node_taint_state_known`]).
    pub node_tainted: Gauge,
    /// `istio_cni_node_taint_state_known`: 1 once the agent has read its node (a GET or the
    /// watch), so that `istio_cni_node_tainted` is what the node carries; 0 before that and
    /// after a read that failed (an API error, or no answer within the request timeout),
    /// until the next successful read. Alert on it being 0, not on `istio_cni_node_tainted`
    /// alone.
    pub node_taint_state_known: Gauge,
    /// `istio_cni_repair_pods_checked_total`: meshed pods whose netns was read.
    pub repair_pods_checked: Counter,
    /// `istio_cni_repair_broken_pods_found_total`: checks that found rules missing or wrong.
    pub repair_broken_found: Counter,
    /// `istio_cni_repair_actions_total{action,result}`.
    pub repair_actions: Family<RepairAction, Counter>,
    /// `istio_cni_repair_sweep_duration_seconds`: wall time of a sweep over every pod.
    pub repair_sweep_duration: Histogram,
    /// `istio_cni_repair_last_sweep_timestamp_seconds`: Unix time of the last sweep's end.
    pub repair_last_sweep: Gauge,
    /// `istio_cni_repair_drift_watched_pods`: pods whose rules the kernel's notifications
    /// (or, for legacy iptables, the once-a-second table poll) are watched for.
    pub repair_drift_watched: Gauge,
    /// `istio_cni_repair_drift_triggered_total`: times a watched pod was queued for a
    /// check because its rules changed (not by the sweep); a pod already queued is not
    /// counted again.
    pub repair_drift_triggered: Counter,
    /// Upstream's `istio_cni_installs_total{result}`: one `SUCCESS` per install pass that
    /// leaves everything in place, one failure per pass that fails, by the step that failed.
    pub installs: Family<UpstreamInstall, Counter>,
    /// Upstream's `istio_cni_install_ready`: the same value as `istio_cni_ready`.
    pub install_ready: Gauge,
    /// Upstream's `istio_cni_repair_pods_repaired_total{type,result}`: repair actions
    /// taken (`success`, `fail`) or found unnecessary when acted on (`skip`, for example a
    /// pod already labeled). Actions held back by the cooldown or the rate limit are only in
    /// `istio_cni_repair_actions_total`.
    pub pods_repaired: Family<UpstreamRepair, Counter>,
    /// Upstream's `ztunnel_connected` (no prefix, as upstream exports it): ztunnel
    /// connections to the ZDS socket, past their hello.
    pub ztunnel_connected: Gauge,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Metrics {
        let install_attempts = Family::<Outcome, Counter>::default();
        let ready = Gauge::default();
        let conflist_rewrites = Counter::default();
        let conflict = Gauge::default();
        let self_test_runs = Family::<Outcome, Counter>::default();
        let self_test_duration = Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        let node_tainted = Gauge::default();
        let node_taint_state_known = Gauge::default();
        let repair_pods_checked = Counter::default();
        let repair_broken_found = Counter::default();
        let repair_actions = Family::<RepairAction, Counter>::default();
        let repair_sweep_duration =
            Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        let repair_last_sweep = Gauge::default();
        let repair_drift_watched = Gauge::default();
        let repair_drift_triggered = Counter::default();
        let installs = Family::<UpstreamInstall, Counter>::default();
        let install_ready = Gauge::default();
        let pods_repaired = Family::<UpstreamRepair, Counter>::default();
        let ztunnel_connected = Gauge::default();
        let mut root = Registry::default();
        root.register(
            "ztunnel_connected",
            "number of connections to ztunnel",
            ztunnel_connected.clone(),
        );
        let registry = root.sub_registry_with_prefix("istio_cni");
        registry.register(
            "install_attempts",
            "Install passes, by result",
            install_attempts.clone(),
        );
        registry.register(
            "ready",
            "1 when the plugin is installed and proven on this node",
            ready.clone(),
        );
        registry.register(
            "conflist_rewrites",
            "Times another writer dropped the istio-cni entry from the primary CNI config",
            conflist_rewrites.clone(),
        );
        registry.register(
            "conflict",
            "1 while backing off from another writer of the CNI config",
            conflict.clone(),
        );
        registry.register(
            "self_test_runs",
            "Self-tests, by result",
            self_test_runs.clone(),
        );
        registry.register(
            "self_test_duration_seconds",
            "Self-test wall time",
            self_test_duration.clone(),
        );
        registry.register(
            "node_tainted",
            "1 while the node carries the not-ready taint set by this agent",
            node_tainted.clone(),
        );
        registry.register(
            "node_taint_state_known",
            "1 once the agent has read its node, so that istio_cni_node_tainted is what the node carries; 0 before that and after a failed read",
            node_taint_state_known.clone(),
        );
        registry.register(
            "repair_pods_checked",
            "Meshed pods whose netns rules were read back by the repair loop",
            repair_pods_checked.clone(),
        );
        registry.register(
            "repair_broken_pods_found",
            "Checks that found a pod's redirection rules missing or wrong",
            repair_broken_found.clone(),
        );
        registry.register(
            "repair_actions",
            "Repair actions on broken pods, by action and result",
            repair_actions.clone(),
        );
        registry.register(
            "repair_sweep_duration_seconds",
            "Wall time of a repair sweep over every pod on the node",
            repair_sweep_duration.clone(),
        );
        registry.register(
            "repair_last_sweep_timestamp_seconds",
            "Unix time at which the last repair sweep ended",
            repair_last_sweep.clone(),
        );
        registry.register(
            "repair_drift_watched_pods",
            "Pods whose rules are watched for changes between sweeps",
            repair_drift_watched.clone(),
        );
        registry.register(
            "repair_drift_triggered",
            "Times a pod was queued for a check because its rules changed",
            repair_drift_triggered.clone(),
        );
        // Upstream's names, types, labels and help texts, for existing dashboards and alerts.
        registry.register(
            "installs",
            "Total number of CNI plugins installed by the Istio CNI installer",
            installs.clone(),
        );
        registry.register(
            "install_ready",
            "Whether the CNI plugin installation is ready or not",
            install_ready.clone(),
        );
        registry.register(
            "repair_pods_repaired",
            "Total number of pods repaired by repair controller",
            pods_repaired.clone(),
        );
        Metrics {
            registry: root,
            ztunnel_connected,
            installs,
            install_ready,
            pods_repaired,
            repair_pods_checked,
            repair_broken_found,
            repair_actions,
            repair_sweep_duration,
            repair_last_sweep,
            repair_drift_watched,
            repair_drift_triggered,
            node_tainted,
            node_taint_state_known,
            install_attempts,
            ready,
            conflist_rewrites,
            conflict,
            self_test_runs,
            self_test_duration,
        }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
