"""The local control plane itself: what tests, developers and other controllers rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dynvol.testing import ControlPlane
from dynvol.testing.controlplane import wait_for_exit

pytestmark = pytest.mark.integration

CRDS = {
    "storageproviderclasses.dynamicvolume.csi.cloudnative101.net": "Cluster",
    "dynamicvolumeclaims.dynamicvolume.csi.cloudnative101.net": "Namespaced",
    "dynamicvolumemounts.dynamicvolume.csi.cloudnative101.net": "Namespaced",
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
    up = subprocess.run(
        [sys.executable, "-m", "dynvol", "dev", "control-plane", "up", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    state = json.loads((directory / "supervisor.json").read_text())
    try:
        assert up.returncode == 0, up.stderr
        assert "export KUBECONFIG=" in up.stdout
        kubeconfig = directory / "kubeconfig"
        out = subprocess.run(
            [
                str(control_plane.binary("kubectl")),
                "--kubeconfig",
                str(kubeconfig),
                "get",
                "crd",
                "-o",
                "name",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        for name in CRDS:
            assert f"customresourcedefinition.apiextensions.k8s.io/{name}" in out
    finally:
        down = subprocess.run(
            [
                sys.executable,
                "-m",
                "dynvol",
                "dev",
                "control-plane",
                "down",
                "--dir",
                str(directory),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert down.returncode == 0, down.stderr
    assert wait_for_exit(int(state["pid"]), 5)
    assert not directory.exists()
