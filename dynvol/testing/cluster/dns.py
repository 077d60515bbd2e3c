"""Cluster DNS of the multi-node local cluster: CoreDNS behind the Service ``kube-dns``.

CoreDNS (``hack/tools/coredns``: the pinned release with only the plugins used here) runs
as a Deployment of two replicas in ``kube-system``, spread over the nodes, behind the
Service ``kube-dns`` at :data:`~dynvol.testing.cluster.addressing.DNS_SERVICE_ADDRESS`,
which every kubelet hands to its pods as ``clusterDNS``. It answers for ``cluster.local``
and the reverse zones of the pod and Service networks from the API (the ``kubernetes``
plugin, reaching the apiserver through the ``kubernetes`` Service). There is no
``forward`` plugin and no other zone: every other name is ``REFUSED``, so no query leaves
the machine.

Neighbours: :meth:`dynvol.testing.cluster.cluster.MultiNodeCluster.up` applies
:func:`objects` and waits with :func:`wait_ready`; ``hack/images/build.py coredns`` builds
the image.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from dynvol.testing.cluster.addressing import DNS_SERVICE_ADDRESS

if TYPE_CHECKING:
    from dynvol.testing.cluster.cluster import MultiNodeCluster

__all__ = [
    "CLUSTER_DOMAIN",
    "COREFILE",
    "IMAGE",
    "NAME",
    "NAMESPACE",
    "dns_status",
    "objects",
    "wait_ready",
]

IMAGE = "localhost/dynvol/coredns:dev"
NAME = "coredns"
SERVICE = "kube-dns"
NAMESPACE = "kube-system"
CLUSTER_DOMAIN = "cluster.local"
REPLICAS = 2
HEALTH_PORT = 8080
READY_PORT = 8181
#: The server block's zones: the cluster domain and the reverse zones of 10.0.0.0/8 (pods
#: 10.234.0.0/16 and Services 10.235.0.0/24). A query for any other name matches no
#: server block, and CoreDNS refuses it.
ZONES = (CLUSTER_DOMAIN, "10.in-addr.arpa")
COREFILE = f"""\
{" ".join(f"{zone}:53" for zone in ZONES)} {{
    errors
    health {{
        lameduck 5s
    }}
    ready
    kubernetes {" ".join(ZONES)} {{
        pods insecure
        ttl 30
    }}
    cache 30
    loadbalance
}}
"""
_LABELS = {"k8s-app": SERVICE}


def objects() -> list[dict[str, Any]]:
    """The ServiceAccount, RBAC, Corefile, Deployment and Service of the cluster DNS."""
    meta = {"namespace": NAMESPACE, "labels": dict(_LABELS)}
    role_name = "dynvol-multinode:coredns"
    role: dict[str, Any] = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": role_name, "labels": dict(_LABELS)},
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["services", "namespaces"],
                "verbs": ["list", "watch"],
            },
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["list", "watch"],
            },
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "dynvol-multinode:coredns", "labels": dict(_LABELS)},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role_name,
        },
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}],
    }
    container = {
        "name": NAME,
        "image": IMAGE,
        "imagePullPolicy": "Never",
        "args": ["-conf", "/etc/coredns/Corefile"],
        "ports": [
            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
        ],
        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": HEALTH_PORT},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 5,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": READY_PORT},
            "periodSeconds": 2,
        },
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
        },
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": NAME, **meta},
        "spec": {
            "replicas": REPLICAS,
            "selector": {"matchLabels": dict(_LABELS)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": dict(_LABELS)},
                "spec": {
                    "serviceAccountName": NAME,
                    "priorityClassName": "system-cluster-critical",
                    # Its own resolver is the host's file: it must not ask itself.
                    "dnsPolicy": "Default",
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": dict(_LABELS)},
                        }
                    ],
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "config",
                            "configMap": {
                                "name": NAME,
                                "items": [{"key": "Corefile", "path": "Corefile"}],
                            },
                        }
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICE, **meta},
        "spec": {
            "clusterIP": str(DNS_SERVICE_ADDRESS),
            "selector": dict(_LABELS),
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
            ],
        },
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": NAME, **meta}},
        role,
        binding,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": NAME, **meta},
            "data": {"Corefile": COREFILE},
        },
        deployment,
        service,
    ]


def dns_status(cluster: MultiNodeCluster) -> dict[str, Any]:
    """Ready replicas of CoreDNS, where they run, and the ready endpoints of ``kube-dns``."""
    pods = cluster.kubectl(
        "get", "pods", "-n", NAMESPACE, "-l", f"k8s-app={SERVICE}", "-o", "json",
        check=False, timeout=15,
    )  # fmt: skip
    slices = cluster.kubectl(
        "get", "endpointslices", "-n", NAMESPACE,
        "-l", f"kubernetes.io/service-name={SERVICE}", "-o", "json",
        check=False, timeout=15,
    )  # fmt: skip
    report: dict[str, Any] = {"address": str(DNS_SERVICE_ADDRESS), "replicas": [], "endpoints": 0}
    if pods.returncode == 0:
        for pod in json.loads(pods.stdout)["items"]:
            ready = any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in pod.get("status", {}).get("conditions", [])
            )
            report["replicas"].append(
                {
                    "name": pod["metadata"]["name"],
                    "node": pod["spec"].get("nodeName"),
                    "ready": ready,
                }
            )
    if slices.returncode == 0:
        report["endpoints"] = sum(
            1
            for s in json.loads(slices.stdout)["items"]
            for e in s.get("endpoints") or []
            if e.get("conditions", {}).get("ready")
        )
    report["ready"] = report["endpoints"] >= 1 and any(r["ready"] for r in report["replicas"])
    return report


def wait_ready(cluster: MultiNodeCluster, *, timeout: float = 120) -> dict[str, Any]:
    """Wait until every replica is ready and ``kube-dns`` has their endpoints."""
    deadline = time.monotonic() + timeout
    while True:
        report = dns_status(cluster)
        ready = [r for r in report["replicas"] if r["ready"]]
        if len(ready) >= REPLICAS and report["endpoints"] >= REPLICAS:
            return report
        if time.monotonic() > deadline:
            from dynvol.testing.cluster.cluster import ClusterError

            raise ClusterError(
                f"the cluster DNS is not ready after {timeout:.0f} s: {report}; "
                f"kubectl -n {NAMESPACE} describe pods -l k8s-app={SERVICE}"
            )
        time.sleep(1)
