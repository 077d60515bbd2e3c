"""The cluster DNS objects: a fixed address in the Service network, the cluster's zones
only, nothing forwarded, read-only RBAC, replicas spread over the nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dynvol.testing.cluster import dns
from dynvol.testing.cluster.addressing import (
    DNS_SERVICE_ADDRESS,
    KUBERNETES_SERVICE_ADDRESS,
    POD_NETWORK,
    SERVICE_NETWORK,
    plan_nodes,
)
from dynvol.testing.cluster.configs import kubelet_config
from dynvol.testing.cluster.layout import Layout


def _by_kind(kind: str) -> dict[str, Any]:
    (found,) = [o for o in dns.objects() if o["kind"] == kind]
    return found


def test_service_is_kube_dns_at_a_fixed_address_of_the_service_network() -> None:
    service = _by_kind("Service")
    assert service["metadata"] == {
        "name": "kube-dns",
        "namespace": "kube-system",
        "labels": {"k8s-app": "kube-dns"},
    }
    address = service["spec"]["clusterIP"]
    assert address == str(DNS_SERVICE_ADDRESS) != str(KUBERNETES_SERVICE_ADDRESS)
    assert DNS_SERVICE_ADDRESS in SERVICE_NETWORK
    assert {(p["port"], p["protocol"]) for p in service["spec"]["ports"]} == {
        (53, "UDP"),
        (53, "TCP"),
    }
    assert service["spec"]["selector"] == _by_kind("Deployment")["spec"]["selector"]["matchLabels"]


def test_corefile_serves_only_the_cluster_zones_and_forwards_nothing() -> None:
    corefile = _by_kind("ConfigMap")["data"]["Corefile"]
    assert corefile == dns.COREFILE
    first = corefile.splitlines()[0]
    assert first == "cluster.local:53 10.in-addr.arpa:53 {", "no root zone: other names are refused"
    words = set(corefile.split())
    assert not words & {"forward", "proxy", "grpc", "etcd", "hosts", "file"}
    assert "kubernetes" in words
    # The reverse zone covers the pod and Service networks.
    for address in (POD_NETWORK[5], DNS_SERVICE_ADDRESS):
        assert address.reverse_pointer.endswith(".10.in-addr.arpa")


def test_rbac_reads_services_endpointslices_and_namespaces_only() -> None:
    rules = _by_kind("ClusterRole")["rules"]
    granted = {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert granted == {
        (group, resource, verb)
        for group, resource in (
            ("", "services"),
            ("", "namespaces"),
            ("discovery.k8s.io", "endpointslices"),
        )
        for verb in ("list", "watch")
    }
    binding = _by_kind("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == _by_kind("ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}
    ]


def test_two_replicas_spread_unprivileged_from_the_local_image() -> None:
    deployment = _by_kind("Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == _by_kind("ServiceAccount")["metadata"]["name"]
    assert pod["dnsPolicy"] == "Default", "CoreDNS must not resolve through itself"
    assert [c["topologyKey"] for c in pod["topologySpreadConstraints"]] == [
        "kubernetes.io/hostname"
    ]
    (container,) = pod["containers"]
    assert (container["image"], container["imagePullPolicy"]) == (dns.IMAGE, "Never")
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    assert security["allowPrivilegeEscalation"] is False
    assert "hostNetwork" not in pod


def test_kubelets_point_pods_at_the_cluster_dns(tmp_path: Path) -> None:
    for plan in plan_nodes(3):
        config = kubelet_config(Layout(tmp_path), plan, [str(DNS_SERVICE_ADDRESS)])
        assert config["clusterDNS"] == [str(DNS_SERVICE_ADDRESS)]
        assert config["clusterDomain"] == dns.CLUSTER_DOMAIN
