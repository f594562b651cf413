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


def profile(name: str) -> dict:
    return yaml.safe_load((CHART / "files" / f"profile-{name}.yaml").read_text())


CASES: dict[str, dict] = {
    "default": {},
    **{f"profile-{p}": profile(p) for p in PROFILES},
    "repair-off": {"repair": {"enabled": False}},
    "repair-delete": {"repair": {"mode": "delete"}},
    "repair-label": {"repair": {"mode": "label"}},
    "taint-off": {"taint": {"enabled": False}},
    "taint-noexecute": {"taint": {"effect": "NoExecute", "key": "example.com/cni-not-ready"}},
    "all-off": {"repair": {"enabled": False}, "taint": {"enabled": False}, "validatingAdmissionPolicy": {"enabled": False}, "selfTest": False},
    "env-override": {"env": {"KUBECONFIG_MODE": "640", "RESYNC_SECONDS": 30}},
}


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


@pytest.mark.parametrize("case", CASES)
def test_renders_lints_and_validates(case: str) -> None:
    values = CASES[case]
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report
    objs = render(values)
    assert objs
    for obj in objs:
        if obj["kind"] in CUSTOM_KINDS:
            continue  # a CRD's kind: no OpenAPI schema in Kubernetes itself
        for version in KUBE_VERSIONS:
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
    repair_on = CASES[case].get("repair", {}).get("enabled", True)
    self_test_on = CASES[case].get("selfTest", True)
    assert ("/host/proc" in mounts) == (repair_on or self_test_on)
    if repair_on or self_test_on:
        assert mounts["/host/proc"]["readOnly"] is True
    if repair_on:
        assert mounts["/host/var/run/netns"]["mountPropagation"] == "HostToContainer"
    volumes = {v["name"]: v for v in pod["volumes"]}
    bin_dir = CASES[case].get("cniBinDir", "/opt/cni/bin")
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
    (nad,) = [o for o in render(profile("openshift")) if o["kind"] == "NetworkAttachmentDefinition"]
    assert nad["metadata"] == {**nad["metadata"], "name": "istio-cni", "namespace": "default"}
    assert "spec" not in nad, "multus takes the agent's standalone config named istio-cni"
    env = one(render(profile("openshift")), "ConfigMap")["data"]
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
    for values in CASES.values():
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


@pytest.mark.parametrize("case", ["default", "repair-delete", "repair-label", "taint-noexecute", "all-off", "profile-openshift", "env-override"])
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
    values = helm.Chart.load(str(CHART)).merge_values(CASES[case])
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
    assert agent["chained_cni_plugin"] == values["chained"]
    assert agent["exclude_namespaces"] == values["excludeNamespaces"]
    # An empty name means "pick the first valid config", as unset does.
    assert (agent["cni_conf_name"] or None) == (values["cniConfFileName"] or None)
    assert agent["validation_timeout_ms"] == values["validation"]["timeoutMs"]
    # The self-test runs the plugin from the host's bin dir in the host's mount namespace.
    assert agent["self_test"] == values["selfTest"]
    assert agent["host_mount_ns"] == "/host/proc/1/ns/mnt"
    assert agent["host_cni_bin_dir"] == values["cniBinDir"]
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
