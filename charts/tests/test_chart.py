"""Tests of charts/istio-cni with Helm 4's own engine (helm-python-sdk binds the Go SDK).

Every case is rendered and linted, every rendered object is validated against the
Kubernetes OpenAPI schemas of each version the chart claims, and the security properties,
RBAC verbs, values schema, ValidatingAdmissionPolicy CEL and the agent's command line are
checked on the rendered output.

Run with `make chart-test` (creates the venv), or `pytest charts/tests` in it. The agent
command-line test needs `cargo build` first (or AGENT_BIN).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import celpy
import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parent.parent / "istio-cni"
REPO = CHART.parent.parent
NAMESPACE = "istio-system"
# The Kubernetes versions the chart claims (Chart.yaml kubeVersion >=1.30).
KUBE_VERSIONS = ["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0"]
ALLOWED_CAPS = {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_CHROOT", "SYS_PTRACE", "DAC_OVERRIDE", "SETUID"}
# Kinds from CRDs (multus), which the Kubernetes schemas do not know.
CUSTOM_KINDS = {"NetworkAttachmentDefinition"}
PROFILES = sorted(p.stem.removeprefix("profile-") for p in (CHART / "files").glob("profile-*.yaml"))
PLATFORMS = sorted(p.stem.removeprefix("platform-") for p in (CHART / "files").glob("platform-*.yaml"))


def chart_file(name: str) -> dict:
    return yaml.safe_load((CHART / "files" / f"{name}.yaml").read_text()) or {}


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def effective(values: dict) -> dict:
    """What the chart's zzz_values.yaml computes for our own keys: defaults, then the
    profile and platform, then the values (cni.* descoped), with empty repair.mode and
    logLevel resolved to their defaults. Upstream's keys are checked by their own tests."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["_internal_defaults_do_not_set"]
    user = {k: v for k, v in values.items() if k != "cni"}
    user = deep_merge(user, values.get("cni", {}))
    glob = user.get("global", {})
    layered = defaults
    if user.get("profile") or glob.get("profile"):
        layered = deep_merge(layered, chart_file(f"profile-{user.get('profile') or glob['profile']}"))
    if user.get("platform") or glob.get("platform"):
        layered = deep_merge(layered, chart_file(f"platform-{user.get('platform') or glob['platform']}"))
    v = deep_merge(layered, user)
    v["repair"]["mode"] = v["repair"]["mode"] or "repair"
    v["logLevel"] = v["logLevel"] or "info"
    return v


CASES: dict[str, dict] = {
    "default": {},
    **{f"profile-{p}": {"profile": p} for p in PROFILES},
    **{f"platform-{p}": {"platform": p} for p in PLATFORMS},
    "repair-off": {"repair": {"enabled": False}},
    "repair-delete": {"repair": {"mode": "delete"}},
    "repair-label": {"repair": {"mode": "label"}},
    "taint-off": {"taint": {"enabled": False}},
    "taint-noexecute": {"taint": {"effect": "NoExecute", "key": "example.com/cni-not-ready"}},
    "all-off": {"repair": {"enabled": False}, "taint": {"enabled": False}, "validatingAdmissionPolicy": {"enabled": False}, "selfTest": False},
    "env-override": {"env": {"KUBECONFIG_MODE": "640", "RESYNC_SECONDS": 30}},
    "taint-new-nodes": {"mutatingAdmissionPolicy": {"enabled": True}},
}
# Kinds that exist only from a Kubernetes version on (admissionregistration.k8s.io/v1
# MutatingAdmissionPolicy: 1.36, KEP-3962).
KIND_SINCE = {"MutatingAdmissionPolicy": (1, 36), "MutatingAdmissionPolicyBinding": (1, 36)}


UPSTREAM = yaml.safe_load((Path(__file__).parent / "upstream-values.yaml").read_text())
# Cases that must render, lint and validate; the security checks run on CASES only (the
# upstream file changes tolerations on purpose).
RENDER_CASES = {**CASES, "upstream-values": UPSTREAM}


def render(values: dict) -> list[dict]:
    """The rendered objects (NOTES.txt left out)."""
    chart = helm.Chart.load(str(CHART))
    out = chart.render(values, name="istio-cni", namespace=NAMESPACE, is_install=True)
    objs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        objs.extend(d for d in yaml.safe_load_all(text) if d)
    return objs


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def container(objs: list[dict]) -> dict:
    ds = one(objs, "DaemonSet")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("case", RENDER_CASES)
def test_renders_lints_and_validates(case: str) -> None:
    values = RENDER_CASES[case]
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report
    objs = render(values)
    assert objs
    for obj in objs:
        if obj["kind"] in CUSTOM_KINDS:
            continue  # a CRD's kind: no OpenAPI schema in Kubernetes itself
        for version in KUBE_VERSIONS:
            if tuple(int(x) for x in version.split(".")[:2]) < KIND_SINCE.get(obj["kind"], (0, 0)):
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{case}: {obj['kind']} {obj['metadata']['name']} on {version}: {e}")


@pytest.mark.parametrize("case", CASES)
def test_security_properties(case: str) -> None:
    objs = render(CASES[case])
    text = json.dumps(objs)
    assert '"privileged": true' not in text
    ds = one(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c = container(objs)
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == ALLOWED_CAPS, sc["capabilities"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    # It must land on tainted nodes, ours first of all.
    tol = pod["tolerations"]
    assert {"effect": "NoSchedule", "operator": "Exists"} in tol
    assert {"effect": "NoExecute", "operator": "Exists"} in tol
    assert {"key": "CriticalAddonsOnly", "operator": "Exists"} in tol
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c["env"]}
    assert env["POD_NAME"] == "metadata.name", "the upgrade marker: the agent asks for its DaemonSet"
    assert env["NODE_NAME"] == "spec.nodeName"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    repair_on = effective(CASES[case])["repair"]["enabled"]
    self_test_on = effective(CASES[case])["selfTest"]
    ambient_on = effective(CASES[case])["ambient"]["enabled"]
    assert ("/host/proc" in mounts) == (repair_on or self_test_on or ambient_on)
    if repair_on or self_test_on or ambient_on:
        assert mounts["/host/proc"]["readOnly"] is True
    if repair_on or ambient_on:
        assert mounts["/host/var/run/netns"]["mountPropagation"] == "HostToContainer"
    assert ("/var/run/ztunnel" in mounts) == ambient_on
    volumes = {v["name"]: v for v in pod["volumes"]}
    bin_dir = effective(CASES[case])["cniBinDir"]
    assert volumes["cni-bin-dir"]["hostPath"]["path"] == bin_dir


def verbs(objs: list[dict]) -> dict[str, set[str]]:
    role = one(objs, "ClusterRole")
    out: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for r in rule["resources"]:
            out.setdefault(r, set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize(
    "values,expected",
    [
        ({}, {"pods": {"get", "list", "watch"}, "nodes": {"get", "list", "watch", "patch"}, "nodes/status": {"patch"}, "events": {"create", "patch"}}),
        ({"repair": {"mode": "delete"}}, {"pods": {"get", "list", "watch", "delete"}, "nodes": {"get", "list", "watch", "patch"}, "nodes/status": {"patch"}, "events": {"create", "patch"}}),
        ({"repair": {"mode": "label"}}, {"pods": {"get", "list", "watch", "patch"}, "nodes": {"get", "list", "watch", "patch"}, "nodes/status": {"patch"}, "events": {"create", "patch"}}),
        ({"taint": {"enabled": False}}, {"pods": {"get", "list", "watch"}, "events": {"create", "patch"}}),
        ({"repair": {"enabled": False}, "taint": {"enabled": False}}, {"pods": {"get"}}),
        ({"ambient": {"enabled": True}, "repair": {"enabled": False}, "taint": {"enabled": False}},
         {"pods": {"get", "list", "watch"}, "namespaces": {"get", "list", "watch"}, "pods/status": {"patch"}}),
    ],
)
def test_rbac_verbs_per_mode(values: dict, expected: dict) -> None:
    objs = render(values)
    assert verbs(objs) == expected
    role = one(objs, "Role")
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get"]}]
    assert role["metadata"]["namespace"] == NAMESPACE


def test_multus_gets_a_network_attachment_definition() -> None:
    kinds = lambda v: [o["kind"] for o in render(v)]  # noqa: E731
    assert "NetworkAttachmentDefinition" not in kinds({})
    (nad,) = [o for o in render({"platform": "openshift"}) if o["kind"] == "NetworkAttachmentDefinition"]
    assert nad["metadata"] == {**nad["metadata"], "name": "istio-cni", "namespace": "default"}
    assert "spec" not in nad, "multus takes the agent's standalone config named istio-cni"
    env = one(render({"global": {"platform": "openshift"}}), "ConfigMap")["data"]
    assert env["CHAINED_CNI_PLUGIN"] == "false" and env["CNI_CONF_NAME"] == "istio-cni.conf"


def test_validating_admission_policy_toggle() -> None:
    kinds = lambda v: {o["kind"] for o in render(v)}  # noqa: E731
    assert {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= kinds({})
    assert "ValidatingAdmissionPolicy" not in kinds({"validatingAdmissionPolicy": {"enabled": False}})
    assert "ValidatingAdmissionPolicy" not in kinds({"taint": {"enabled": False}})


@pytest.mark.parametrize(
    "values",
    [
        {"repair": {"mode": "fix"}},
        {"repair": {"maxDeletesPerMinute": 0}},
        {"taint": {"effect": "PreferNoSchedule"}},
        {"taint": {"graceSeconds": "ten"}},
        {"cniBinDir": 5},
        {"cniConfDir": "relative/path"},
        {"chained": "yes"},
        {"logLevel": "verbose"},
        {"excludeNamespaces": "kube-system"},
        {"repiar": {"enabled": False}},
        {"provider": "calico"},
        {"repair": {"enabeld": False}},
    ],
)
def test_schema_rejects_bad_values(values: dict) -> None:
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        chart.render(values, name="istio-cni", namespace=NAMESPACE)


def test_schema_accepts_defaults_and_profiles() -> None:
    chart = helm.Chart.load(str(CHART))
    for values in RENDER_CASES.values():
        chart.validate_schema(values)


# --- ValidatingAdmissionPolicy CEL, evaluated as the API server would -------------------

SA_USER = f"system:serviceaccount:{NAMESPACE}:istio-cni"
KEY = "cni.istio.io/not-ready"


def node(name: str = "node-1", taints=None, conditions=None, labels=None) -> dict:
    n = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {"kubernetes.io/os": "linux"}},
         "spec": {"podCIDR": "10.0.1.0/24"}, "status": {"capacity": {"cpu": "2"}}}
    if taints is not None:
        n["spec"]["taints"] = taints
    if conditions is not None:
        n["status"]["conditions"] = conditions
    return n


OTHER_TAINT = {"key": "example.com/other", "effect": "NoSchedule"}
OUR_TAINT = {"key": KEY, "effect": "NoSchedule"}
KUBELET_READY = {"type": "Ready", "status": "True", "reason": "KubeletReady"}


class Policy:
    """The rendered policy's CEL, compiled once, evaluated per admission request."""

    def __init__(self, values: dict | None = None) -> None:
        vap = one(render(values or {}), "ValidatingAdmissionPolicy")["spec"]
        self.env = celpy.Environment()
        compile_ = lambda e: self.env.program(self.env.compile(e))  # noqa: E731
        self.match = [compile_(m["expression"]) for m in vap["matchConditions"]]
        self.variables = [(v["name"], compile_(v["expression"])) for v in vap["variables"]]
        self.validations = [(compile_(v["expression"]), v) for v in vap["validations"]]
        rules = vap["matchConstraints"]["resourceRules"]
        assert rules == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes", "nodes/status"]}]

    def admit(self, old: dict, new: dict, *, user: str = SA_USER, node_claim: str | None = "node-1", sub: str = "") -> str | None:
        """None when admitted, else the failing validation's message."""
        extra = {"authentication.kubernetes.io/node-name": [node_claim]} if node_claim else {}
        data = celpy.json_to_cel({
            "request": {"userInfo": {"username": user, "extra": extra}, "subResource": sub, "operation": "UPDATE"},
            "object": new, "oldObject": old,
        })
        act = {k: data[celpy.celtypes.StringType(k)] for k in ("request", "object", "oldObject")}
        if not all(bool(m.evaluate(act)) for m in self.match):
            return None  # not our service account: not this policy's business
        variables: dict = {}
        for name, prog in self.variables:
            act["variables"] = celpy.celtypes.MapType(variables)
            variables[celpy.celtypes.StringType(name)] = prog.evaluate(act)
        act["variables"] = celpy.celtypes.MapType(variables)
        for prog, v in self.validations:
            result = prog.evaluate(act)
            assert isinstance(result, celpy.celtypes.BoolType), f"{v['expression']}: {result!r}"
            if not result:
                return v.get("message") or v.get("messageExpression")
        return None


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy()


def test_cel_own_node_taint_changes_are_allowed(policy: Policy) -> None:
    tainted = node(taints=[OTHER_TAINT, OUR_TAINT])
    untainted = node(taints=[OTHER_TAINT])
    assert policy.admit(tainted, untainted) is None, "remove our taint"
    assert policy.admit(untainted, tainted) is None, "add it back"
    assert policy.admit(node(), node(taints=[OUR_TAINT])) is None, "first taint on a node without any"


def test_cel_own_node_condition_is_allowed(policy: Policy) -> None:
    ours = {"type": "IstioCNIReady", "status": "True", "reason": "Ready"}
    before = node(conditions=[KUBELET_READY])
    after = node(conditions=[KUBELET_READY, ours])
    assert policy.admit(before, after, sub="status") is None


def test_cel_another_node_is_denied(policy: Policy) -> None:
    msg = policy.admit(node("node-2", taints=[OUR_TAINT]), node("node-2", taints=[]))
    assert msg and "may only change the node it runs on" in msg
    msg = policy.admit(node(taints=[OUR_TAINT]), node(taints=[]), node_claim=None)
    assert msg and "node-name claim" in msg


def test_cel_another_taint_key_is_denied(policy: Policy) -> None:
    assert policy.admit(node(taints=[OTHER_TAINT, OUR_TAINT]), node(taints=[OUR_TAINT])) is not None
    changed = {"key": "example.com/other", "effect": "NoExecute"}
    assert policy.admit(node(taints=[OTHER_TAINT]), node(taints=[changed])) is not None
    assert policy.admit(node(taints=[]), node(taints=[{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}])) is not None


def test_cel_other_node_fields_are_denied(policy: Policy) -> None:
    assert policy.admit(node(), node(labels={"kubernetes.io/os": "linux", "evil": "1"})) is not None
    cordoned = node()
    cordoned["spec"]["unschedulable"] = True
    assert policy.admit(node(), cordoned) is not None
    other_condition = node(conditions=[{**KUBELET_READY, "status": "False"}])
    assert policy.admit(node(conditions=[KUBELET_READY]), other_condition, sub="status") is not None
    capacity = node(conditions=[KUBELET_READY])
    capacity["status"]["capacity"] = {"cpu": "64"}
    assert policy.admit(node(conditions=[KUBELET_READY]), capacity, sub="status") is not None


def test_cel_other_users_are_not_matched(policy: Policy) -> None:
    assert policy.admit(node("node-2"), node("node-2", labels={"x": "y"}), user="system:node:node-2") is None


def test_cel_follows_a_custom_taint_key() -> None:
    p = Policy({"taint": {"key": "example.com/cni-not-ready"}})
    custom = {"key": "example.com/cni-not-ready", "effect": "NoSchedule"}
    assert p.admit(node(taints=[custom]), node(taints=[])) is None
    assert p.admit(node(taints=[OUR_TAINT]), node(taints=[])) is not None


# --- The agent accepts the DaemonSet's command line and environment ---------------------

def agent_bin() -> Path:
    path = Path(os.environ.get("AGENT_BIN", REPO / "target" / "debug" / "istio-cni-node-agent"))
    if not path.is_file():
        pytest.fail(f"{path} not found: run `cargo build` first (or set AGENT_BIN)")
    return path


@pytest.mark.parametrize("case", ["default", "repair-delete", "repair-label", "taint-noexecute", "all-off", "platform-openshift", "env-override", "profile-ambient"])
def test_agent_parses_the_daemonset_command(case: str) -> None:
    objs = render(CASES[case])
    c = container(objs)
    config = one(objs, "ConfigMap")["data"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    for src in c.get("envFrom", []):
        assert src["configMapRef"]["name"] == one(objs, "ConfigMap")["metadata"]["name"]
        env.update(config)
    for e in c["env"]:
        env[e["name"]] = e["value"] if "value" in e else f"downward-{e['name'].lower()}"
    argv = [str(agent_bin()), *c["args"], "--print-config"]
    assert c["command"] == ["istio-cni-node-agent"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"{argv}\n{out.stderr}"
    got = json.loads(out.stdout)
    values = effective(CASES[case])
    run, agent = got["run"], got["agent"]
    assert run["repair_enabled"] == values["repair"]["enabled"]
    assert got["effective"]["repair_mode"] == values["repair"]["mode"]
    assert run["taint_enabled"] == values["taint"]["enabled"]
    assert run["taint_key"] == values["taint"]["key"]
    assert run["taint_effect"] == values["taint"]["effect"]
    assert run["node_name"] == "downward-node_name"
    assert run["pod_name"] == "downward-pod_name"
    assert run["readiness_port"] == values["ports"]["readiness"]
    assert run["netns_dirs"] == [f"/host{d}" for d in values["repair"]["netnsDirs"]]
    assert agent["ambient_enabled"] == values["ambient"]["enabled"]
    assert run["ambient_dns_capture"] == values["ambient"]["dnsCapture"]
    assert run["ambient_ipv6"] == values["ambient"]["ipv6"]
    assert run["ambient_reconcile_pod_rules_on_startup"] == values["ambient"]["reconcileIptablesOnStartup"]
    assert run["ztunnel_uds_address"] == f"{values['ambient']['ztunnelSocketDir']}/ztunnel.sock"
    assert run["host_root"] == "/host"
    assert json.loads(agent["ambient_enablement_selector"]) == values["ambient"]["enablementSelectors"]
    assert agent["chained_cni_plugin"] == values["chained"]
    assert agent["exclude_namespaces"] == values["excludeNamespaces"]
    # An empty name means "pick the first valid config", as unset does.
    assert (agent["cni_conf_name"] or None) == (values["cniConfFileName"] or None)
    assert agent["validation_timeout_ms"] == values["validation"]["timeoutMs"]
    # The self-test runs the plugin from the host's bin dir in the host's mount namespace.
    assert agent["self_test"] == values["selfTest"]
    assert agent["host_mount_ns"] == "/host/proc/1/ns/mnt"
    assert agent["host_cni_bin_dir"] == values["cniBinDir"]
    assert agent["native_nftables"] == values["global"]["nativeNftables"]
    # `env` reaches every other option, and wins over the ConfigMap.
    assert agent["kubeconfig_mode"] == int(str(values["env"].get("KUBECONFIG_MODE", "600")), 8)
    assert run["resync_seconds"] == int(values["env"].get("RESYNC_SECONDS", 60))


# --- istiod values ----------------------------------------------------------------------

def test_istiod_values_drop_the_validation_init_container() -> None:
    values = yaml.safe_load((CHART / "files" / "istiod-values.yaml").read_text())
    assert values["pilot"]["cni"]["enabled"] is True
    inj = values["sidecarInjectorWebhook"]
    assert inj["defaultTemplates"][0] == "sidecar", "the custom template applies after sidecar"
    (custom,) = inj["defaultTemplates"][1:]
    patch = yaml.safe_load(inj["templates"][custom])
    assert patch == {"spec": {"initContainers": [{"name": "istio-validation", "$patch": "delete"}]}}


# --- Upstream Istio's values ------------------------------------------------------------

def notes(values: dict) -> str:
    out = helm.Chart.load(str(CHART)).render(values, name="istio-cni", namespace=NAMESPACE, is_install=True)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def test_an_upstream_values_file_has_upstream_effects() -> None:
    objs = render(UPSTREAM)
    ds = one(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c = container(objs)
    env = one(objs, "ConfigMap")["data"]
    # hub, tag and image compose the reference as upstream does (top level over global).
    assert c["image"] == "registry.example.com/istio/istio-cni-node-agent:1.28.0"
    assert c["imagePullPolicy"] == "Always"
    # logging.level's default scope; global.logAsJson.
    assert env["LOG_LEVEL"] == "debug" and env["PLUGIN_LOG_LEVEL"] == "debug"
    assert env["LOG_AS_JSON"] == "true"
    # cni.* is descoped; cniNetnsDir joins the repair loop's netns dirs.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cni-bin-dir"]["hostPath"]["path"] == "/opt/cni/bin"
    assert env["NETNS_DIRS"].split(",")[0] == "/host/var/run/docker/netns"
    assert env["EXCLUDE_NAMESPACES"] == "kube-system,istio-system"
    # repair.labelPods selects label mode, with its RBAC and label.
    assert env["REPAIR_MODE"] == "label"
    assert env["REPAIR_BROKEN_POD_LABEL_KEY"] == "example.com/broken"
    assert env["REPAIR_BROKEN_POD_LABEL_VALUE"] == "yes"
    pod_verbs = next(r for r in one(objs, "ClusterRole")["rules"] if r["resources"] == ["pods"])["verbs"]
    assert "patch" in pod_verbs and "delete" not in pod_verbs
    # ambient.* reaches the agent (here with the nftables backend).
    assert env["AMBIENT_ENABLED"] == "true"
    assert env["AMBIENT_DNS_CAPTURE"] == "true" and env["AMBIENT_IPV6"] == "true"
    # Labels, annotations, scheduling, security, resources, as upstream renders them.
    assert ds["metadata"]["labels"]["team"] == "platform"
    assert ds["metadata"]["labels"]["istio.io/rev"] == "canary"
    assert ds["metadata"]["labels"]["install.operator.istio.io/owning-resource"] == "istio-control"
    meta = ds["spec"]["template"]["metadata"]
    assert meta["annotations"]["example.com/owner"] == "platform"
    assert meta["labels"]["example.com/tier"] == "node"
    assert pod["affinity"] == UPSTREAM["affinity"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["updateStrategy"] == UPSTREAM["updateStrategy"]
    assert pod["terminationGracePeriodSeconds"] == 20
    assert pod["securityContext"]["seLinuxOptions"] == {"type": "spc_t"}
    assert c["securityContext"]["appArmorProfile"] == {"type": "Unconfined"}
    assert "container.apparmor.security.beta.kubernetes.io/install-cni" not in meta["annotations"]
    assert c["resources"] == UPSTREAM["resources"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "RESYNC_SECONDS", "value": "30"} in c["env"]
    # resourceQuotas (upstream's spelling); global.networkPolicy.
    quota = one(objs, "ResourceQuota")
    assert str(quota["spec"]["hard"]["pods"]) == "1000"
    policy = one(objs, "NetworkPolicy")
    assert {p["port"] for p in policy["spec"]["ingress"][0]["ports"]} == {8000, 15014}
    # What has no effect here is named, never a schema error.
    text = notes(UPSTREAM)
    for key in ["istioOwnedCNIConfig", "istioOwnedCNIConfigFileName",
                "repair.initContainerName", "pilot", "meshConfig"]:
        assert f"  - {key}:" in text, key
    # global.nativeNftables selects the nftables backend.
    assert env["NATIVE_NFTABLES"] == "true"


@pytest.mark.parametrize(
    ("values", "image"),
    [
        ({}, "docker.io/istio-cni/istio-cni-node-agent:0.1.0"),
        ({"image": {"repository": "r.example/agent", "tag": "7"}}, "r.example/agent:7"),
        ({"global": {"hub": "g.example/istio"}}, "g.example/istio/istio-cni-node-agent:0.1.0"),
        ({"global": {"hub": "g.example/istio", "tag": "2.0", "variant": "debug"}}, "g.example/istio/istio-cni-node-agent:2.0-debug"),
        ({"hub": "h.example", "image": "agent", "tag": "3"}, "h.example/agent:3"),
        ({"image": "full.example/path/agent:9"}, "full.example/path/agent:9"),
        ({"cni": {"hub": "c.example", "tag": "4"}, "hub": "top.example"}, "c.example/istio-cni-node-agent:4"),
    ],
)
def test_image_reference_composes_as_upstream(values: dict, image: str) -> None:
    assert container(render(values))["image"] == image


@pytest.mark.parametrize(
    ("values", "mode"),
    [
        ({}, "repair"),
        ({"repair": {"deletePods": True}}, "delete"),
        ({"repair": {"repairPods": False, "labelPods": True}}, "label"),
        ({"repair": {"mode": "delete", "deletePods": True}}, "delete"),
    ],
)
def test_upstream_repair_switches_select_the_mode(values: dict, mode: str) -> None:
    assert one(render(values), "ConfigMap")["data"]["REPAIR_MODE"] == mode


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"repair": {"repairPods": True, "deletePods": True}}, ["repair.repairPods", "repair.deletePods"]),
        ({"repair": {"mode": "repair", "labelPods": True}}, ["repair.mode=repair", "repair.labelPods"]),
        ({"profile": "nope"}, ["/profile"]),
        ({"global": {"platform": "nope"}}, ["/global/platform"]),
    ],
)
def test_conflicting_or_unknown_values_fail_naming_them(values: dict, named: list[str]) -> None:
    with pytest.raises(helm.HelmError) as e:
        helm.Chart.load(str(CHART)).render(values, name="istio-cni", namespace=NAMESPACE, is_install=True)
    for n in named:
        assert n in str(e.value), str(e.value)


@pytest.mark.parametrize("level,expect", [("debug", "debug"), ("default:warn", "warn"), ("all:error,cni:debug", "error"), ("none", "off")])
def test_upstream_logging_level(level: str, expect: str) -> None:
    env = one(render({"logging": {"level": level}}), "ConfigMap")["data"]
    assert env["LOG_LEVEL"] == expect
    env = one(render({"global": {"logging": {"level": level}}, "logLevel": "info"}), "ConfigMap")["data"]
    assert env["LOG_LEVEL"] == "info", "logLevel (ours) wins over upstream's"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_platforms_render_with_their_paths(platform: str) -> None:
    objs = render({"global": {"platform": platform}})
    expect = effective({"platform": platform})
    volumes = {v["name"]: v for v in one(objs, "DaemonSet")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cni-bin-dir"]["hostPath"]["path"] == expect["cniBinDir"]
    assert volumes["cni-net-dir"]["hostPath"]["path"] == expect["cniConfDir"]
    rules = one(objs, "ClusterRole")["rules"]
    scc = [r for r in rules if r.get("apiGroups") == ["security.openshift.io"]]
    assert bool(scc) == (platform == "openshift")
    if platform == "openshift":
        assert scc == [{"apiGroups": ["security.openshift.io"], "resources": ["securitycontextconstraints"],
                        "resourceNames": ["privileged"], "verbs": ["use"]}]
        assert "NetworkAttachmentDefinition" in {o["kind"] for o in objs}
    if platform == "minikube":
        assert one(objs, "ConfigMap")["data"]["NETNS_DIRS"].startswith("/host/var/run/docker/netns,")
    if platform == "gke":
        assert one(objs, "ResourceQuota")


@pytest.mark.parametrize("scope,namespaced,cluster", [("all", True, True), ("namespace", True, False), ("cluster", False, True)])
def test_resource_scope(scope: str, namespaced: bool, cluster: bool) -> None:
    kinds = {o["kind"] for o in render({"global": {"resourceScope": scope}})}
    assert ("DaemonSet" in kinds) == namespaced and ("ConfigMap" in kinds) == namespaced
    assert ("ClusterRole" in kinds) == cluster and ("ValidatingAdmissionPolicy" in kinds) == cluster


def test_upstream_profiles_files_render_unchanged() -> None:
    """Values files shaped like upstream's shared profiles (manifests/helm-profiles), which
    carry keys for every Istio chart, render: other charts' keys are accepted and named."""
    for values in [
        {"cni": {"cniConfDir": "/var/lib/rancher/k3s/agent/etc/cni/net.d", "cniBinDir": "/var/lib/rancher/k3s/data/cni"}},
        {"cni": {"cniBinDir": "", "resourceQuotas": {"enabled": True}}, "resourceQuotas": {"enabled": True}},
        {"meshConfig": {"accessLogFile": "/dev/stdout"}, "cni": {"resources": {"requests": {"cpu": "10m", "memory": "40Mi"}}},
         "ztunnel": {"resources": {}}, "global": {"proxy": {"resources": {}}, "waypoint": {}}, "pilot": {"autoscaleEnabled": False},
         "gateways": {"istio-ingressgateway": {}}},
        {"cni": {"chained": False, "provider": "multus", "cniConfFileName": "istio-cni.conf"}, "pilot": {"cni": {"enabled": True}},
         "seLinuxOptions": {"type": "spc_t"}, "trustedZtunnelNamespace": "kube-system"},
        {"compatibilityVersion": "1.25", "pilot": {"env": {}}, "cni": {"ambient": {"dnsCapture": False}}, "ambient": {"dnsCapture": False}},
    ]:
        helm.Chart.load(str(CHART)).validate_schema(values)
        assert one(render(values), "DaemonSet")


def test_schema_checks_cni_keys_the_same_at_the_top_and_under_cni() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    cni = schema["definitions"]["cni"]["properties"]
    top = schema["properties"]
    assert {k: top[k] for k in cni} == cni
    assert schema["additionalProperties"] is False and schema["definitions"]["cni"]["additionalProperties"] is False


def test_the_defaults_pass_the_schema_as_values() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["_internal_defaults_do_not_set"]
    helm.Chart.load(str(CHART)).validate_schema(defaults)
    helm.Chart.load(str(CHART)).validate_schema({"cni": {k: v for k, v in defaults.items() if k != "global"}})


@pytest.mark.parametrize("typo", [{"cniBinDirr": "/x"}, {"cni": {"chainedd": True}}, {"repair": {"labelPod": True}}, {"global": {"logAsJson": "yes"}}])
def test_schema_rejects_typos_in_upstream_style_keys(typo: dict) -> None:
    with pytest.raises(helm.HelmValuesError):
        helm.Chart.load(str(CHART)).validate_schema(typo)


# --- Against upstream's own values files (charts/tests/upstream, see SOURCE.md) ---------

UPSTREAM_DIR = Path(__file__).parent / "upstream"


def key_paths(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        path = f"{prefix}{k}"
        out.append(path)
        if isinstance(v, dict) and v:
            out.extend(key_paths(v, f"{path}."))
    return out


def test_upstream_istio_cni_defaults_are_accepted_as_values() -> None:
    """Every key of upstream's istio-cni chart, with upstream's default values, given to
    our chart as an operator's values file: it passes the schema and renders."""
    upstream = yaml.safe_load((UPSTREAM_DIR / "istio-cni-values.yaml").read_text())["_internal_defaults_do_not_set"]
    helm.Chart.load(str(CHART)).validate_schema(upstream)
    objs = render(upstream)
    # Upstream's defaults mean repair mode, info logs, /opt/cni/bin.
    env = one(objs, "ConfigMap")["data"]
    assert env["REPAIR_MODE"] == "repair" and env["LOG_LEVEL"] == "info"
    # Upstream's image name and hub, composed the way upstream composes them.
    assert container(objs)["image"] == "registry.istio.io/testing/install-cni:latest"


def test_istiod_values_file_uses_upstream_istiod_keys() -> None:
    """files/istiod-values.yaml names only keys that upstream's istiod chart has (pilot.*
    descoped as that chart does; the names inside templates are free)."""
    upstream = yaml.safe_load((UPSTREAM_DIR / "istiod-values.yaml").read_text())["_internal_defaults_do_not_set"]
    known = set(key_paths(upstream))
    ours = yaml.safe_load((CHART / "files" / "istiod-values.yaml").read_text())
    for path in key_paths(ours):
        if path == "pilot" or path.startswith("sidecarInjectorWebhook.templates."):
            continue
        descoped = path.removeprefix("pilot.")
        assert descoped in known, f"{path} is not a key of upstream's istiod chart"
    assert "taint.enabled" in known and ours["pilot"]["taint"]["enabled"] is False


# --- MutatingAdmissionPolicy: the cluster taints its own new nodes ----------------------

class Mutation:
    """The rendered MutatingAdmissionPolicy's CEL, evaluated per Node CREATE as the API
    server would: match conditions, then the JSONPatch mutation, applied to the node."""

    def __init__(self, values: dict | None = None) -> None:
        objs = render({"mutatingAdmissionPolicy": {"enabled": True}, **(values or {})})
        self.spec = one(objs, "MutatingAdmissionPolicy")["spec"]
        binding = one(objs, "MutatingAdmissionPolicyBinding")["spec"]
        assert binding["policyName"] == one(objs, "MutatingAdmissionPolicy")["metadata"]["name"]
        env = celpy.Environment()
        compile_ = lambda e: env.program(env.compile(e))  # noqa: E731
        self.match = [(m["name"], compile_(m["expression"])) for m in self.spec["matchConditions"]]
        (m,) = self.spec["mutations"]
        assert m["patchType"] == "JSONPatch"
        self.patch = compile_(m["jsonPatch"]["expression"])

    def create(self, node_obj: dict) -> dict:
        """The node as stored after admission of its CREATE."""
        assert self.spec["matchConstraints"]["resourceRules"] == [
            {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["nodes"]}]
        assert self.spec["failurePolicy"] == "Ignore"
        act = {"object": celpy.json_to_cel(node_obj)}
        if not all(bool(prog.evaluate(act)) for _, prog in self.match):
            return node_obj
        ctor = lambda fields: celpy.celtypes.MapType(fields)  # noqa: E731
        act["JSONPatch"] = ctor
        act["Object"] = celpy.celtypes.MapType({celpy.celtypes.StringType("spec"): celpy.celtypes.MapType(
            {celpy.celtypes.StringType("taints"): ctor})})
        out = json.loads(json.dumps(node_obj))
        for op in self.patch.evaluate(act):
            op = json.loads(json.dumps(op, default=lambda x: str(x)))
            op = {str(k): v for k, v in op.items()}
            assert op["op"] == "add"
            parts = op["path"].strip("/").split("/")
            target = out
            for p in parts[:-1]:
                target = target[p]
            if parts[-1] == "-":
                target.append(op["value"])
            else:
                target[parts[-1]] = op["value"]
        return out


def taints(n: dict) -> list:
    return n["spec"].get("taints", [])


def test_new_nodes_get_the_taint_once_and_only_where_the_daemonset_runs() -> None:
    m = Mutation()
    # A new Linux node: tainted with the agent's own key and effect.
    env = one(render({}), "ConfigMap")["data"]
    ours = {"key": env["TAINT_KEY"], "effect": env["TAINT_EFFECT"]}
    assert taints(m.create(node())) == [ours]
    # Other registration taints are kept, ours appended; tolerated by the DaemonSet.
    assert taints(m.create(node(taints=[OTHER_TAINT]))) == [OTHER_TAINT, ours]
    # Already tainted (kubelet --register-with-taints): left as it is.
    assert taints(m.create(node(taints=[OUR_TAINT]))) == [OUR_TAINT]
    # Not a node the DaemonSet selects (Windows): never tainted by it.
    windows = node(labels={"kubernetes.io/os": "windows"})
    assert taints(m.create(windows)) == []
    assert taints(m.create(node(labels={"example.com/pool": "a"}))) == [], "no OS label: not selected"


def test_nodes_the_daemonset_cannot_reach_are_left_alone() -> None:
    # A node registering with a taint the DaemonSet does not tolerate.
    m = Mutation({"tolerations": [{"key": "example.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    gpu = {"key": "example.com/gpu", "value": "a100", "effect": "NoSchedule"}
    assert taints(m.create(node(taints=[gpu]))) == [gpu, {"key": KEY, "effect": "NoSchedule"}]
    assert taints(m.create(node(taints=[OTHER_TAINT]))) == [OTHER_TAINT]
    # nodeSelector and required node affinity, as the scheduler reads them.
    m = Mutation({"nodeSelector": {"kubernetes.io/os": "linux", "pool": "mesh"},
                  "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                      {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]},
                                            {"key": "no-mesh", "operator": "DoesNotExist"}]},
                      {"matchExpressions": [{"key": "edge", "operator": "Exists"}, {"key": "tier", "operator": "NotIn", "values": ["x"]}]}]}}}})
    base = {"kubernetes.io/os": "linux", "pool": "mesh"}
    for labels, tainted in [
        ({**base, "zone": "a"}, True),
        ({**base, "zone": "c"}, False),
        ({**base, "zone": "a", "no-mesh": ""}, False),
        ({**base, "edge": "1"}, True),
        ({**base, "edge": "1", "tier": "x"}, False),
        ({"kubernetes.io/os": "linux", "zone": "a"}, False),
    ]:
        assert bool(taints(m.create(node(labels=labels)))) == tainted, labels


def test_the_policy_renders_only_when_served_or_forced_and_expressible() -> None:
    kinds = lambda v: {o["kind"] for o in render(v)}  # noqa: E731
    # auto: offline rendering sees no MutatingAdmissionPolicy API, so none.
    assert "MutatingAdmissionPolicy" not in kinds({})
    assert "MutatingAdmissionPolicy" in kinds({"mutatingAdmissionPolicy": {"enabled": True}})
    assert "MutatingAdmissionPolicy" not in kinds({"mutatingAdmissionPolicy": {"enabled": True}, "taint": {"enabled": False}})
    # Affinity it cannot express (Gt): rather no policy than tainting unreachable nodes.
    gt = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["4"]}]}]}}}
    assert "MutatingAdmissionPolicy" not in kinds({"mutatingAdmissionPolicy": {"enabled": True}, "affinity": gt})


def test_ambient_mode_reaches_the_agent_with_its_mounts_and_rbac() -> None:
    values = {"ambient": {"enabled": True, "dnsCapture": False, "ztunnelSocketDir": "/run/zt",
                          "enablementSelectors": [{"podSelector": {"matchLabels": {"mesh": "ambient"}}}]}}
    objs = render(values)
    env = one(objs, "ConfigMap")["data"]
    assert env["AMBIENT_ENABLED"] == "true"
    assert env["AMBIENT_DNS_CAPTURE"] == "false"
    assert env["ZTUNNEL_UDS_ADDRESS"] == "/run/zt/ztunnel.sock"
    assert json.loads(env["AMBIENT_ENABLEMENT_SELECTOR"]) == values["ambient"]["enablementSelectors"]
    pod = one(objs, "DaemonSet")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in container(objs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/run/zt"]["name"]]["hostPath"] == {"path": "/run/zt", "type": "DirectoryOrCreate"}
    assert pod["hostNetwork"] is True, "the node's probe rules and ipsets are written in its netns"
    # Off: no ztunnel mount, no namespace access, and the agent is told so.
    objs = render({})
    assert "/var/run/ztunnel" not in {m["mountPath"] for m in container(objs)["volumeMounts"]}
    assert "namespaces" not in verbs(objs)
    assert one(objs, "ConfigMap")["data"]["AMBIENT_ENABLED"] == "false"
    # Accepted upstream keys without effect are named.
    text = notes({"ambient": {"enabled": True, "shareHostNetworkNamespace": True, "configDir": "/x"}})
    assert "  - ambient.shareHostNetworkNamespace:" in text and "  - ambient.configDir:" in text
