"""dynvol on a multi-node cluster, from the base manifests as users apply them.

``kubectl kustomize manifests/base`` renders the base; the only changes are what an
overlay for this cluster sets: the locally built image (``imagePullPolicy: Never``, there
is no registry) and a short idle grace for shared DMPs. Everything else runs as the base
has it: the webhook behind its Service, with the serving certificate and ``caBundle`` the
controller makes itself (:func:`deploy` waits until the apiserver's calls to it succeed),
pods on the pod network reaching the apiserver through the ``kubernetes`` Service.

Neighbours: :class:`dynvol.testing.cluster.cluster.MultiNodeCluster` (the cluster),
``tests/e2e/test_multinode.py`` (the user).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from dynvol.testing.cluster.cluster import ClusterError, MultiNodeCluster
from dynvol_core import constants

__all__ = ["IMAGE", "SYSTEM_NAMESPACE", "deploy", "render", "undeploy"]

IMAGE = "localhost/dynvol/dynvol:dev"
SYSTEM_NAMESPACE = "dynvol-system"
WEBHOOK_SERVICE = "dynvol-webhook"
_WORKLOADS = ("daemonset/dynvol-node", "deployment/dynvol-controller")


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"]
    found: list[dict[str, Any]] = spec.get("containers", []) + spec.get("initContainers", [])
    return found


def render(cluster: MultiNodeCluster, checkout: Path) -> list[dict[str, Any]]:
    """The base's objects with this cluster's image."""
    out = cluster.kubectl("kustomize", str(checkout / "manifests" / "base")).stdout
    objs = [o for o in yaml.safe_load_all(out) if o]
    for obj in objs:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind in ("Deployment", "DaemonSet"):
            for c in _containers(obj):
                c["image"], c["imagePullPolicy"] = IMAGE, "Never"
        if kind == "DaemonSet" and name == "dynvol-node":
            # DMPs run the node plugin's image (read from its Pod), set just above.
            (node,) = [c for c in _containers(obj) if c["name"] == "node"]
            node["args"] += ["--dmp-image-pull-policy=Never", "--shared-idle-grace=20"]
    return objs


def deploy(cluster: MultiNodeCluster, checkout: Path, *, timeout: float = 240) -> None:
    """Apply dynvol and wait until its node plugin runs on every node and the webhook
    answers through its Service."""
    objs = render(cluster, checkout)
    crds = [o for o in objs if o["kind"] == "CustomResourceDefinition"]
    rest = [o for o in objs if o["kind"] != "CustomResourceDefinition"]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in crds))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd", *(o["metadata"]["name"] for o in crds)
    )
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in rest))
    for what in _WORKLOADS:
        cluster.kubectl(
            "-n", SYSTEM_NAMESPACE, "rollout", "status", what, f"--timeout={int(timeout)}s",
            timeout=timeout + 10,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        slices = cluster.items(
            "endpointslices", "-n", SYSTEM_NAMESPACE,
            "-l", f"kubernetes.io/service-name={WEBHOOK_SERVICE}",
        )  # fmt: skip
        if any(
            e.get("conditions", {}).get("ready") for s in slices for e in s.get("endpoints") or []
        ):
            break
        if time.monotonic() > deadline:
            raise ClusterError("the webhook Service has no ready endpoint after 60 s")
        time.sleep(0.5)
    _wait_for_admission(cluster, within=90)


def _wait_for_admission(cluster: MultiNodeCluster, *, within: float) -> None:
    """Until the apiserver calls the webhook with the caBundle the controller wrote: a
    server-side dry run of an opted-in pod comes back with the volume injected (the pod
    webhook ignores failures, so only a successful TLS call injects it)."""
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "dynvol-webhook-probe",
            "namespace": "default",
            "annotations": {
                constants.ANNOTATION_STORAGE_PROVIDER_CLASS: "webhook-probe",
                constants.ANNOTATION_MOUNT_PATH_ROOT: "/dynamic",
            },
        },
        "spec": {"containers": [{"name": "probe", "image": IMAGE}]},
    }
    deadline = time.monotonic() + within
    last = ""
    while True:
        proc = cluster.kubectl(
            "create", "--dry-run=server", "-o", "json", "-f", "-",
            input=json.dumps(probe), check=False,
        )  # fmt: skip
        if proc.returncode == 0:
            volumes = json.loads(proc.stdout)["spec"].get("volumes") or []
            if any(v["name"] == constants.VOLUME_NAME for v in volumes):
                return
            last = "the pod came back without the dynvol volume"
        else:
            last = proc.stderr.strip()
        if time.monotonic() > deadline:
            raise ClusterError(
                f"the webhook is not called successfully after {within:.0f} s: {last}"
            )
        time.sleep(1)


def undeploy(cluster: MultiNodeCluster, checkout: Path, *, timeout: float = 180) -> None:
    """Remove dynvol once no DynamicVolumeMount is left (their finalizers need it)."""
    deadline = time.monotonic() + timeout
    while cluster.items("dynamicvolumemounts", "-A"):
        if time.monotonic() > deadline:
            raise ClusterError("DynamicVolumeMounts are left; dynvol stays to release them")
        time.sleep(1)
    objs = render(cluster, checkout)
    cluster.kubectl(
        "delete", "--ignore-not-found", "--wait=true", "-f", "-",
        input="\n---\n".join(json.dumps(o) for o in reversed(objs)), timeout=timeout,
    )  # fmt: skip
