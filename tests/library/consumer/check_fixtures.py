"""What ``dynvol[testing]`` adds for a library user: the fixtures that talk to the apiserver.

Run by tests/integration/test_wheel.py after ``pip install 'dynvol[testing]'`` into the
same virtualenv, from outside the checkout. The control plane, its CRDs (dynvol's from the
installed package, the consumer's from pytest.ini) and the namespace come from dynvol's
pytest plugin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client

from dynvol.testing import ControlPlane
from dynvol_core import DynamicVolumeClaim

GROUP, VERSION = "dynamicvolume.csi.cloudnative101.net", "v1alpha1"


async def test_a_claim_through_the_kubernetes_client(
    control_plane: ControlPlane, kube_client: Any, namespace: str, seed_claims: list[dict[str, Any]]
) -> None:
    api = client.CustomObjectsApi(kube_client)
    raw = seed_claims[1]
    raw["metadata"]["namespace"] = namespace
    await api.create_namespaced_custom_object(GROUP, VERSION, namespace, "dynamicvolumeclaims", raw)
    stored = await api.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "dynamicvolumeclaims", raw["metadata"]["name"]
    )
    claim = DynamicVolumeClaim.from_object(stored)
    assert claim.namespace == namespace
    assert claim.read_only
    assert claim.uid == stored["metadata"]["uid"]

    bad = {**raw, "metadata": {"name": "bad", "namespace": namespace}}
    bad["spec"] = {**raw["spec"], "mountpoint": "/"}
    with pytest.raises(client.ApiException) as info:
        await api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, "dynamicvolumeclaims", bad
        )
    assert info.value.status == 422
    assert "spec.mountpoint" in str(info.value.body)


async def test_the_consumers_own_crd_is_served(kube_client: Any, namespace: str) -> None:
    api = client.CustomObjectsApi(kube_client)
    widget = {
        "apiVersion": "consumer.example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w", "namespace": namespace},
        "spec": {"size": 2},
    }
    await api.create_namespaced_custom_object(
        "consumer.example.com", "v1", namespace, "widgets", widget
    )
    got = await api.get_namespaced_custom_object(
        "consumer.example.com", "v1", namespace, "widgets", "w"
    )
    assert got["spec"] == {"size": 2}


def test_the_extra_crds_came_from_the_ini_option(dynvol_extra_crds: list[Path]) -> None:
    assert [p.name for p in dynvol_extra_crds] == ["widgets.yaml"]
    assert dynvol_extra_crds[0].is_file()
