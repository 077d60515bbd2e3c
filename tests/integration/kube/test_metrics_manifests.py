"""The manifests' probes and scrapes find the status endpoints the processes open.

Rendered with the pinned kubectl's kustomize (no cluster needed): in every overlay, the
node plugin and the controller are told a ``--metrics-address`` whose port is the
container port their probes use; the monitoring overlay's PodMonitors and ServiceMonitor
select those pods and ports; its dashboard asks only for metric families the code
registers.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from dynvol_core import constants as c
from dynvol_csi.metrics import CsiMetrics
from dynvol_dmp.metrics import DmpMetrics
from dynvol_kube import Metrics
from tests.integration.shared import TOP, render_kustomize

pytestmark = pytest.mark.integration

MONITORING = TOP / "manifests" / "overlays" / "monitoring"


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("overlay", ["local", "kind", "production", "monitoring"])
def test_probes_use_the_port_the_process_listens_on(overlay: str) -> None:
    docs = render_kustomize(TOP / "manifests" / "overlays" / overlay)
    for kind in ("DaemonSet", "Deployment"):
        container = _container(_one(docs, kind))
        (address,) = [a for a in container["args"] if a.startswith("--metrics-address=")]
        port = int(address.rsplit(":", 1)[1])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == port, (kind, address, ports)
        live, ready = container["livenessProbe"], container["readinessProbe"]
        assert live["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert ready["httpGet"] == {"path": "/readyz", "port": "metrics"}
        host = address.split("=", 1)[1].rsplit(":", 1)[0]
        on_host_network = _one(docs, kind)["spec"]["template"]["spec"].get("hostNetwork")
        if on_host_network:
            # Never every address of a node: the pod's own (the node's) address only.
            assert host == "$(POD_IP)", (kind, address)
            env = {e["name"]: e for e in container["env"]}
            assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_the_monitoring_overlay_scrapes_every_process() -> None:
    docs = render_kustomize(MONITORING)
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodMonitor"}
    daemonset = _one(docs, "DaemonSet")
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    node = monitors["dynvol-node"]
    assert node["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in node["spec"]["podMetricsEndpoints"]] == ["metrics"]
    dmps = monitors["dynvol-mount-pods"]["spec"]["selector"]["matchLabels"]
    assert dmps == {c.LABEL_COMPONENT: c.COMPONENT_DMP}

    service_monitor = _one(docs, "ServiceMonitor")
    (service,) = [
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics")
    ]
    assert service_monitor["spec"]["selector"]["matchLabels"] == service["metadata"]["labels"]
    deployment = _one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]

    (dashboard,) = [d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard"
                    in d["metadata"].get("labels", {})]  # fmt: skip
    assert json.loads(dashboard["data"]["dynvol.json"])["uid"] == "dynvol"


def _families() -> set[str]:
    metrics = Metrics()
    CsiMetrics(metrics.registry)
    DmpMetrics.of(metrics, lambda: [])
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
    return names


def test_the_dashboard_asks_only_for_registered_families() -> None:
    board = json.loads((MONITORING / "dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used = {name for e in exprs for name in re.findall(r"\bdynvol_[a-z_]+", e)}
    unknown = used - _families()
    assert not unknown, f"the dashboard asks for families nobody registers: {sorted(unknown)}"
    # Every panel's query shows something of dynvol's.
    assert all(re.search(r"\bdynvol_", e) for e in exprs)
