"""charts/dynvol renders what the kustomize manifests render, and its values do what they say.

On default values the chart must produce exactly the objects of ``kubectl kustomize
manifests/base`` (CRDs included, from the chart's ``crds/``); with
``charts/dynvol/ci/local-values.yaml`` exactly those of ``manifests/overlays/local``. Both are
compared object by object after parsing, with a readable diff of each object that differs,
so an addition to the base that the chart lacks (or the other way round) fails here with
what to change. Other values are checked on the rendered objects, and the rendered objects
are sent to a real kube-apiserver (server-side dry run) so that what the chart writes is
also what the apiserver accepts.

Needs the pinned helm and kubectl (``make tools``).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dynvol.testing import ControlPlane

pytestmark = pytest.mark.integration

TOP = Path(__file__).resolve().parents[2]
CHART = TOP / "charts" / "dynvol"
LOCAL_VALUES = CHART / "ci" / "local-values.yaml"
HELM = TOP / ".tools" / "bin" / "helm"
KUBECTL = TOP / ".tools" / "bin" / "kubectl"
NAMESPACE = "dynvol-system"
BASE_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/part-of")

Key = tuple[str, str, str, str]


def _tool(path: Path) -> str:
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path.name} is missing: CI must build it (make tools)")
        pytest.skip(f"{path.name} is missing (make tools)")
    return str(path)


def _docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def helm_template(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [_tool(HELM), "template", "dynvol", str(CHART), "--namespace", NAMESPACE]
    argv += ["--include-crds", *args]
    out = subprocess.run(argv, text=True, capture_output=True, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def render_chart(*args: str) -> list[dict[str, Any]]:
    return _docs(helm_template(*args).stdout)


def render_kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [_tool(KUBECTL), "kustomize", str(path)], text=True, capture_output=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return _docs(out.stdout)


def key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    group = obj["apiVersion"].rpartition("/")[0]
    return (group, obj["kind"], meta.get("namespace", ""), meta["name"])


def normalised(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with the environment of each container sorted by name.

    A strategic merge patch (the overlays') puts the variables it adds first, a template
    puts them where it writes them; the order is not significant (no variable refers to
    another with ``$(NAME)``), so it is not compared.
    """
    obj = copy.deepcopy(obj)
    template = obj.get("spec", {}).get("template", {}).get("spec", {})
    for container in template.get("containers", []) + template.get("initContainers", []):
        if "env" in container:
            container["env"].sort(key=lambda e: e["name"])
    return obj


def index(docs: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    found: dict[Key, dict[str, Any]] = {}
    for doc in map(normalised, docs):
        k = key(doc)
        assert k not in found, f"{k} is rendered twice"
        found[k] = doc
    return found


def differences(chart: list[dict[str, Any]], kustomize: list[dict[str, Any]]) -> str:
    """A readable report of what differs between the two renderings ('' when nothing)."""
    ours, theirs = index(chart), index(kustomize)
    report = []
    for k in sorted(theirs.keys() - ours.keys()):
        report.append(f"only in kustomize: {'/'.join(filter(None, k))}")
    for k in sorted(ours.keys() - theirs.keys()):
        report.append(f"only in the chart: {'/'.join(filter(None, k))}")
    for k in sorted(ours.keys() & theirs.keys()):
        if ours[k] == theirs[k]:
            continue
        diff = difflib.unified_diff(
            yaml.safe_dump(theirs[k], sort_keys=True).splitlines(),
            yaml.safe_dump(ours[k], sort_keys=True).splitlines(),
            fromfile=f"kustomize {'/'.join(filter(None, k))}",
            tofile="chart",
            lineterm="",
        )
        report.append("\n".join(diff))
    return "\n\n".join(report)


# --------------------------------------------------------------------------- equality


def test_default_values_render_the_kustomize_base() -> None:
    chart = render_chart()
    base = render_kustomize(TOP / "manifests" / "base")
    assert {d["kind"] for d in chart} >= {"CustomResourceDefinition", "DaemonSet", "Deployment"}
    report = differences(chart, base)
    assert not report, (
        "helm template charts/dynvol differs from kubectl kustomize manifests/base "
        "(CRDs: run make chart-crds; other objects: edit charts/dynvol/templates):\n" + report
    )


def test_local_values_render_the_local_overlay() -> None:
    chart = render_chart("--values", str(LOCAL_VALUES))
    local = render_kustomize(TOP / "manifests" / "overlays" / "local")
    # The overlay's own objects (the webhook registration RBAC) are not labelled by the
    # base's kustomization; the chart labels every object alike.
    base = index(render_kustomize(TOP / "manifests" / "base"))
    for doc in chart:
        if key(doc) not in base:
            labels = doc["metadata"].get("labels", {})
            for name in BASE_LABELS:
                labels.pop(name, None)
            if not labels:
                doc["metadata"].pop("labels", None)
    report = differences(chart, local)
    assert not report, (
        "helm template -f charts/dynvol/ci/local-values.yaml differs from "
        "manifests/overlays/local:\n" + report
    )


def test_the_comparison_sees_a_changed_field() -> None:
    """The equality above is not vacuous: one changed value shows up as a diff of it."""
    chart = render_chart("--set", "node.terminationGracePeriodSeconds=31")
    report = differences(chart, render_kustomize(TOP / "manifests" / "base"))
    assert "DaemonSet" in report
    assert "-      terminationGracePeriodSeconds: 30" in report
    assert "+      terminationGracePeriodSeconds: 31" in report


# --------------------------------------------------------------------------- values


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (workload,) = by_kind(docs, kind)
    return workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]


CUSTOM = {
    "image": {"repository": "registry.example/dynvol", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry-login"}],
    "commonLabels": {"team": "storage"},
    "logging": {"level": "DEBUG", "format": "json"},
    "node": {
        "resources": {"requests": {"cpu": "20m", "memory": "64Mi"}},
        "nodeSelector": {"storage": "yes"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "node-prio",
        "updateStrategy": {"type": "OnDelete", "rollingUpdate": None},
        "mountsRelist": 120,
    },
    "controller": {
        "replicas": 2,
        "resources": {"limits": {"memory": "128Mi"}},
        "nodeSelector": {"role": "infra"},
        "tolerations": [{"key": "infra", "operator": "Exists"}],
        "priorityClassName": "controller-prio",
        "leaderElection": {"leaseDuration": 20, "renewDeadline": 15, "retryPeriod": 3},
    },
    "webhook": {"caBundle": "Q0E=", "configurationAnnotations": {"note": "x"}},
    "dmp": {
        "image": "registry.example/dmp:9",
        "imagePullPolicy": "IfNotPresent",
        "hostNetwork": True,
        "env": {"HTTPS_PROXY": "http://proxy.example:3128"},
        "sharedIdleGrace": 45,
    },
    "priorityClasses": {"mount": {"create": True}},
    "metrics": {"enabled": True, "serviceMonitor": {"enabled": True, "labels": {"prom": "x"}}},
}


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    path = tmp_path_factory.mktemp("values") / "values.yaml"
    path.write_text(json.dumps(CUSTOM))
    return render_chart("--values", str(path))


def test_per_component_scheduling_values_reach_their_component(
    custom: list[dict[str, Any]],
) -> None:
    node, controller = pod_spec(custom, "DaemonSet"), pod_spec(custom, "Deployment")
    for spec, values in ((node, CUSTOM["node"]), (controller, CUSTOM["controller"])):
        assert spec["nodeSelector"] == values["nodeSelector"]
        assert spec["tolerations"] == values["tolerations"]
        assert spec["priorityClassName"] == values["priorityClassName"]
        assert spec["containers"][0]["resources"] == values["resources"]
        assert spec["imagePullSecrets"] == [{"name": "registry-login"}]
        assert spec["containers"][0]["image"] == "registry.example/dynvol:1.2.3"
        assert spec["containers"][0]["imagePullPolicy"] == "Always"
        assert spec["containers"][0]["args"][:2] == ["--log-level=DEBUG", "--log-format=json"]
    assert node["affinity"] == CUSTOM["node"]["affinity"]  # type: ignore[index]
    assert "affinity" not in controller
    (daemonset,) = by_kind(custom, "DaemonSet")
    assert daemonset["spec"]["updateStrategy"] == {"type": "OnDelete"}
    (deployment,) = by_kind(custom, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    args = controller["containers"][0]["args"]
    assert {"--lease-duration=20", "--renew-deadline=15", "--retry-period=3"} <= set(args)


def test_dmp_values_become_node_plugin_flags(custom: list[dict[str, Any]]) -> None:
    (container,) = pod_spec(custom, "DaemonSet")["containers"]
    args = container["args"]
    assert args[:3] == ["--log-level=DEBUG", "--log-format=json", "node"]
    for flag in (
        "--dmp-image=registry.example/dmp:9",
        "--dmp-image-pull-policy=IfNotPresent",
        "--dmp-host-network",
        "--dmp-env=HTTPS_PROXY=http://proxy.example:3128",
        "--shared-idle-grace=45",
        "--mounts-relist=120",
    ):
        assert flag in args
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "DYNVOL_IMAGE" not in env


def test_labels_annotations_priority_class_and_monitors(custom: list[dict[str, Any]]) -> None:
    for doc in custom:
        labels = doc["metadata"].get("labels", {})
        if doc["kind"] == "CustomResourceDefinition":
            continue  # crds/ is never templated
        assert labels.get("team") == "storage", f"{key(doc)} lacks commonLabels"
        assert labels["app.kubernetes.io/part-of"] == "dynvol"
    (priority,) = by_kind(custom, "PriorityClass")
    assert priority["metadata"]["name"] == "dynvol-mount"
    assert priority["preemptionPolicy"] == "Never"
    assert {s["metadata"]["name"] for s in by_kind(custom, "Service")} == {
        "dynvol-webhook",
        "dynvol-node-metrics",
        "dynvol-controller-metrics",
    }
    monitors = by_kind(custom, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"dynvol-node", "dynvol-controller"}
    assert all(m["metadata"]["labels"]["prom"] == "x" for m in monitors)
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        (config,) = by_kind(custom, kind)
        assert config["metadata"]["annotations"] == {"note": "x"}
        assert {h["clientConfig"]["caBundle"] for h in config["webhooks"]} == {"Q0E="}


def test_another_namespace_is_named_everywhere_the_base_names_dynvol_system() -> None:
    out = subprocess.run(
        [_tool(HELM), "template", "dynvol", str(CHART), "--namespace", "storage-system"],
        text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "dynvol-system" not in out.stdout
    docs = _docs(out.stdout)
    (namespace,) = by_kind(docs, "Namespace")
    assert namespace["metadata"]["name"] == "storage-system"
    policies = json.dumps(by_kind(docs, "ValidatingAdmissionPolicy"))
    assert "system:serviceaccount:storage-system:dynvol-node" in policies


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("logging.level=LOUD", "level"),
        ("logging.format=xml", "format"),
        ("node.updateStrategy.type=Sideways", "type"),
        ("controller.replicas=-1", "replicas"),
        ("webhook.port=70000", "port"),
        ("dmp.env.BAD\\,NAME=x", "BAD,NAME"),
        ("dmp.sharedIdleGrace=soon", "sharedIdleGrace"),
        ("node.mountsRelist=0", "mountsRelist"),
        ("controller.leaderElection.leaseDuration=-5", "leaseDuration"),
        ("image.repository=evil repo", "repository"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(setting: str, field: str) -> None:
    out = helm_template("--set", setting, check=False)
    assert out.returncode != 0, f"--set {setting} was accepted"
    assert field in out.stderr, out.stderr
    assert "values don't meet the specifications of the schema" in out.stderr


def test_self_registration_needs_its_url() -> None:
    out = helm_template("--set", "webhook.selfRegister.enabled=true", check=False)
    assert out.returncode != 0
    assert "webhook.selfRegister.url is required" in out.stderr


# --------------------------------------------------------------------------- apiserver


def test_the_apiserver_accepts_what_the_chart_renders(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Server-side dry run of every object the custom values render, into a namespace of
    its own (the chart's CRDs are in the control plane already; ServiceMonitor's CRD is
    not, so that object is left out)."""
    namespace = f"chart-{secrets.token_hex(4)}"
    values = tmp_path / "values.yaml"
    values.write_text(json.dumps({**CUSTOM, "namespace": {"create": False}}))
    out = subprocess.run(
        [_tool(HELM), "template", "dynvol", str(CHART), "--namespace", namespace,
         "--values", str(values)],
        text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    objects = [d for d in _docs(out.stdout) if d["kind"] != "ServiceMonitor"]
    assert by_kind(objects, "DaemonSet")
    assert by_kind(objects, "PriorityClass")
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    control_plane.kubectl("create", "namespace", namespace)
    try:
        applied = control_plane.kubectl("apply", "--dry-run=server", "-f", str(path), "-o", "name")
    finally:
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false")
    assert len(applied.split()) == len(objects), applied
