"""The integration tier runs against the Kubernetes release it says it runs against.

``make test`` runs this tier once per supported release with ``DYNVOL_KUBERNETES_VERSION``
set; these tests fail that run if the apiserver that answers is another release, and show
that a control plane given another release's binaries refuses to start.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dynvol.testing import ControlPlane, processes
from dynvol.testing.controlplane import (
    KUBERNETES_VERSION_ENV,
    WrongRelease,
    requested_kubernetes_version,
)

pytestmark = pytest.mark.integration

TOP = Path(__file__).resolve().parents[2]


def _pinned() -> list[str]:
    """The pinned releases, newest (the default) first."""
    return subprocess.run(
        ["bash", str(TOP / "hack" / "tools" / "build.sh"), "--versions"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()


def _expected() -> str:
    return requested_kubernetes_version() or _pinned()[0]


async def test_the_apiserver_is_the_release_asked_for(
    control_plane: ControlPlane, kube_client: Any
) -> None:
    from kubernetes_asyncio import client

    info = await client.VersionApi(kube_client).get_code()
    assert info.git_version == _expected()
    assert control_plane.versions["kube-apiserver"] == _expected()
    kubectl = control_plane.kubectl("version", "--client", "-o", "json")
    assert f'"gitVersion": "{_expected()}"' in kubectl


def test_a_release_is_pinned_when_asked_for() -> None:
    wanted = os.environ.get(KUBERNETES_VERSION_ENV)
    if wanted:
        assert wanted in _pinned(), f"{KUBERNETES_VERSION_ENV}={wanted} is not pinned"
    else:
        assert requested_kubernetes_version() is None


def test_another_releases_binaries_are_refused(control_plane: ControlPlane, tmp_path: Path) -> None:
    # Lay out the binaries of the release under test as if they were another pinned
    # release's; the control plane must refuse them before it starts anything.
    running = control_plane.versions["kube-apiserver"]
    other = next(v for v in _pinned() if v != running)
    bin_dir = tmp_path / "tools" / "bin"
    k8s_dir = tmp_path / "tools" / "k8s" / other / "bin"
    bin_dir.mkdir(parents=True)
    k8s_dir.mkdir(parents=True)
    (bin_dir / "etcd").symlink_to(control_plane.binary("etcd"))
    for name in ("kube-apiserver", "kubectl"):
        (k8s_dir / name).symlink_to(control_plane.binary(name))
    before = {p.pid for p in processes.live_processes()}
    plane = ControlPlane(dir=tmp_path / "cp", bin_dir=bin_dir, kubernetes_version=other)
    try:
        with pytest.raises(WrongRelease, match=f"is {running}, not the {other}"):
            plane.start()
        assert {p.pid for p in processes.live_processes()} == before
        assert plane.etcd is None
        assert plane.apiserver is None
    finally:
        plane.stop()
