"""The local control plane itself: what tests, developers and other controllers rely on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dynvol.testing import ControlPlane
from dynvol.testing.controlplane import wait_for_exit
from tests.integration.shared import dev_control_plane, kubectl_crd_names

pytestmark = pytest.mark.integration

CRDS = {
    "storageproviderclasses.dynamicvolume.csi.cloudnative101.net": "Cluster",
    "dynamicvolumeclaims.dynamicvolume.csi.cloudnative101.net": "Namespaced",
    "dynamicvolumemounts.dynamicvolume.csi.cloudnative101.net": "Namespaced",
    "dynamicvolumeclaimslices.dynamicvolume.csi.cloudnative101.net": "Cluster",
}


async def test_fixture_serves_the_api_with_crds_established(
    control_plane: ControlPlane, kube_client: Any
) -> None:
    from kubernetes_asyncio import client

    ext = client.ApiextensionsV1Api(kube_client)
    for name, scope in CRDS.items():
        crd = await ext.read_custom_resource_definition(name)
        assert crd.spec.scope == scope
        established = {c.type: c.status for c in crd.status.conditions}
        assert established.get("Established") == "True", name
    assert control_plane.versions["kube-apiserver"].startswith("v1.")
    assert control_plane.versions["etcd"][0].isdigit()


async def test_namespace_fixture_creates_a_namespace(kube_client: Any, namespace: str) -> None:
    from kubernetes_asyncio import client

    ns = await client.CoreV1Api(kube_client).read_namespace(namespace)
    assert ns.status.phase == "Active"


def test_cli_up_and_down(tmp_path: Path, control_plane: ControlPlane) -> None:
    # Depends on control_plane only so that it skips/fails the same way when tools are
    # missing; it starts a second, independent control plane through the CLI.
    directory = tmp_path / "cp"
    up = dev_control_plane("up", "--dir", str(directory))
    state = json.loads((directory / "supervisor.json").read_text())
    try:
        assert up.returncode == 0, up.stderr
        assert "export KUBECONFIG=" in up.stdout
        kubeconfig = directory / "kubeconfig"
        out = kubectl_crd_names(control_plane, kubeconfig)
        for name in CRDS:
            assert f"customresourcedefinition.apiextensions.k8s.io/{name}" in out
    finally:
        down = dev_control_plane("down", "--dir", str(directory), timeout=120)
    assert down.returncode == 0, down.stderr
    assert wait_for_exit(int(state["pid"]), 5)
    assert not directory.exists()
