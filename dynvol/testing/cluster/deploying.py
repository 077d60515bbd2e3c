"""dynvol on a multi-node cluster, from the base manifests as users apply them.

``kubectl kustomize manifests/base`` renders the base; the only changes are what an
overlay for this cluster sets: the locally built image (``imagePullPolicy: Never``, there
is no registry), the webhook's serving certificate (a Secret ``dynvol-webhook-tls`` from
the cluster's CA, for the Service name) and that CA as the webhook configurations'
``caBundle``, and a short idle grace for shared DMPs. Everything else (the webhook behind
its Service, pods on the pod network reaching the apiserver through the ``kubernetes``
Service) runs as the base has it.

Neighbours: :class:`dynvol.testing.cluster.cluster.MultiNodeCluster` (the cluster),
``tests/e2e/test_multinode.py`` (the user).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import yaml

from dynvol.testing.cluster.cluster import ClusterError, MultiNodeCluster
from dynvol.testing.cluster.pki import CertificateAuthority

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
    """The base's objects with this cluster's image, webhook certificate and caBundle."""
    out = cluster.kubectl("kustomize", str(checkout / "manifests" / "base")).stdout
    objs = [o for o in yaml.safe_load_all(out) if o]
    ca = CertificateAuthority(dir=cluster.layout.pki).load_or_create()
    dns = f"{WEBHOOK_SERVICE}.{SYSTEM_NAMESPACE}.svc"
    cert, key = ca.issue(
        "dynvol-webhook", common_name=dns, hosts=(dns, f"{dns}.cluster.local"), server=True
    )
    bundle = base64.b64encode(ca.cert_path.read_bytes()).decode()
    for obj in objs:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind in ("Deployment", "DaemonSet"):
            for c in _containers(obj):
                c["image"], c["imagePullPolicy"] = IMAGE, "Never"
        if kind == "DaemonSet" and name == "dynvol-node":
            (node,) = [c for c in _containers(obj) if c["name"] == "node"]
            for env in node.get("env", []):
                if env["name"] == "DYNVOL_IMAGE":
                    env["value"] = IMAGE
            node["args"] += ["--dmp-image-pull-policy=Never", "--shared-idle-grace=20"]
        if kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            for hook in obj.get("webhooks", []):
                hook["clientConfig"]["caBundle"] = bundle
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": "dynvol-webhook-tls", "namespace": SYSTEM_NAMESPACE},
        "data": {
            "tls.crt": base64.b64encode(cert.read_bytes()).decode(),
            "tls.key": base64.b64encode(key.read_bytes()).decode(),
        },
    }
    at = next(i for i, o in enumerate(objs) if o["kind"] == "Namespace") + 1
    objs.insert(at, secret)
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
            return
        if time.monotonic() > deadline:
            raise ClusterError("the webhook Service has no ready endpoint after 60 s")
        time.sleep(0.5)


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
